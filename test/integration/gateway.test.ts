import { createHash } from 'node:crypto';
import { setImmediate } from 'node:timers/promises';
import {
  ApiGatewayManagementApiClient,
  DeleteConnectionCommand,
  GetConnectionCommand,
  GoneException,
  PayloadTooLargeException,
  PostToConnectionCommand,
} from '@aws-sdk/client-apigatewaymanagementapi';
import type { SQSBatchResponse, SQSEvent, SQSRecord } from 'aws-lambda';
import { afterEach, describe, expect, test } from 'vitest';
import WebSocket from 'ws';
import {
  type ConnectEvent,
  type ConnectHandler,
  type Gateway,
  type GatewayOptions,
  type StreamHandler,
  startGateway,
} from '../../infra/local/gateway.ts';
import { decodeQueueMessage, type QueueMessage, type StreamEvent } from '../../shared/queue-message.ts';

// ---------------------------------------------------------------------------------------------
// Test handlers: a $connect that accepts only subprotocol xmpp, a stream handler that records.

interface Handled {
  record: SQSRecord;
  event: StreamEvent;
}

/** Decides one delivery of a record: resolve 'ok', 'fail' (a batchItemFailure), or throw. */
type Behaviour = (handled: Handled) => Promise<'ok' | 'fail'> | 'ok' | 'fail';

interface Harness {
  gateway: Gateway;
  connects: ConnectEvent[];
  /** Every delivery, in the order the handler was called (failed ones included). */
  deliveries: Handled[];
  /** Records the handler accepted, in order. */
  handled: Handled[];
  logs: string[];
  management: ApiGatewayManagementApiClient;
  framesOf(connectionId: string): string[];
  disconnectsOf(connectionId: string): Handled[];
}

const acceptXmppOnly: ConnectHandler = async (event) => {
  const offered = (event.headers['Sec-WebSocket-Protocol'] ?? '').split(',').map((name) => name.trim());
  if (!offered.includes('xmpp')) {
    return { statusCode: 400, body: 'This endpoint speaks XMPP (RFC 7395): offer subprotocol xmpp' };
  }
  return { statusCode: 200, headers: { 'Sec-WebSocket-Protocol': 'xmpp' } };
};

const running: Gateway[] = [];
const clients: WebSocket[] = [];

afterEach(async () => {
  for (const client of clients.splice(0)) {
    // A socket still in its handshake reports terminate() as an error.
    client.on('error', () => {});
    client.terminate();
  }
  await Promise.all(running.splice(0).map((gateway) => gateway.close()));
});

function managementClient(endpoint: string): ApiGatewayManagementApiClient {
  return new ApiGatewayManagementApiClient({
    endpoint,
    region: 'us-east-1',
    credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
    maxAttempts: 1,
  });
}

async function startHarness(
  behaviour: Behaviour = () => 'ok',
  options: Partial<GatewayOptions> = {},
): Promise<Harness> {
  const connects: ConnectEvent[] = [];
  const deliveries: Handled[] = [];
  const handled: Handled[] = [];
  const logs: string[] = [];
  const stream: StreamHandler = async (event: SQSEvent): Promise<SQSBatchResponse> => {
    const batchItemFailures: SQSBatchResponse['batchItemFailures'] = [];
    for (const record of event.Records) {
      const item = { record, event: decodeQueueMessage(record.body) };
      deliveries.push(item);
      if ((await behaviour(item)) === 'fail') batchItemFailures.push({ itemIdentifier: record.messageId });
      else handled.push(item);
    }
    return { batchItemFailures };
  };
  const gateway = await startGateway({
    port: 0,
    connect: async (event, context) => {
      connects.push(event);
      return acceptXmppOnly(event, context);
    },
    stream,
    log: (line) => logs.push(line),
    ...options,
  });
  running.push(gateway);
  const byConnection = (connectionId: string) =>
    handled.filter((item) => item.event.connectionId === connectionId);
  return {
    gateway,
    connects,
    deliveries,
    handled,
    logs,
    management: managementClient(gateway.managementEndpoint),
    framesOf: (connectionId) =>
      byConnection(connectionId)
        .filter((item) => item.event.kind === 'frame')
        .map((item) => item.event.frame),
    disconnectsOf: (connectionId) =>
      byConnection(connectionId).filter((item) => item.event.kind === 'disconnect'),
  };
}

// ---------------------------------------------------------------------------------------------
// Client helpers

interface Client {
  socket: WebSocket;
  /** Text frames received, in order. */
  received: string[];
  closed: Promise<{ code: number; reason: string }>;
}

async function connect(
  url: string,
  protocols: string | string[] = 'xmpp',
  headers: Record<string, string> = {},
): Promise<Client> {
  const socket = new WebSocket(url, protocols, { headers });
  clients.push(socket);
  const received: string[] = [];
  socket.on('message', (data) => received.push(data.toString()));
  const closed = new Promise<{ code: number; reason: string }>((resolve) =>
    socket.once('close', (code, reason) => resolve({ code, reason: reason.toString() })),
  );
  await new Promise<void>((resolve, reject) => {
    socket.once('open', () => resolve());
    socket.once('error', reject);
  });
  return { socket, received, closed };
}

/** The refused handshake as the client sees it: status and body. */
function refusedHandshake(url: string, protocols?: string[]): Promise<{ status: number; body: string }> {
  const socket = new WebSocket(url, protocols);
  clients.push(socket);
  return new Promise((resolve, reject) => {
    socket.once('open', () => reject(new Error('handshake accepted')));
    socket.once('unexpected-response', (_request, response) => {
      let body = '';
      response.on('data', (chunk: Buffer) => {
        body += chunk.toString();
      });
      response.on('end', () => resolve({ status: response.statusCode ?? 0, body }));
    });
  });
}

function handshakeError(url: string, protocols?: string[]): Promise<Error> {
  const socket = new WebSocket(url, protocols);
  clients.push(socket);
  return new Promise((resolve, reject) => {
    socket.once('open', () => reject(new Error('handshake accepted')));
    socket.once('error', resolve);
  });
}

async function waitFor(condition: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/**
 * Resolves once the gateway has read every frame the client sent before: RFC 6455 §5.5.2 has the
 * endpoint answer a Ping with a Pong, and ws reads a socket's frames in order, so the Pong comes
 * back only after the gateway has taken (queued) every earlier frame.
 */
function framesRead(client: Client): Promise<void> {
  return new Promise((resolve, reject) => {
    client.socket.once('pong', () => resolve());
    client.socket.ping((error?: Error) => {
      if (error) reject(error);
    });
  });
}

/** The id of the connection opened last (clients are opened one after the other). */
function lastConnectionId(harness: Harness): string {
  const event = harness.connects.at(-1);
  if (event === undefined) throw new Error('no connection yet');
  return event.requestContext.connectionId;
}

// ---------------------------------------------------------------------------------------------

describe('the $connect handshake', () => {
  test('a client offering subprotocol xmpp gets xmpp back', async () => {
    const harness = await startHarness();
    const client = await connect(harness.gateway.url, 'xmpp');
    expect(client.socket.protocol).toBe('xmpp');
    expect(harness.gateway.connectionCount()).toBe(1);
  });

  test('xmpp is chosen among several offered subprotocols', async () => {
    const harness = await startHarness();
    const client = await connect(harness.gateway.url, ['mqtt', 'xmpp']);
    expect(client.socket.protocol).toBe('xmpp');
  });

  test('a client without xmpp is refused with the handler’s status and body', async () => {
    const harness = await startHarness();
    const refused = await refusedHandshake(harness.gateway.url, ['mqtt']);
    expect(refused).toEqual({
      status: 400,
      body: 'This endpoint speaks XMPP (RFC 7395): offer subprotocol xmpp',
    });
    const error = await handshakeError(harness.gateway.url);
    expect(error.message).toBe('Unexpected server response: 400');
    expect(harness.connects).toHaveLength(2);
    await harness.gateway.drained();
    // A refused handshake never opened a connection, so no $disconnect follows.
    expect(harness.deliveries).toEqual([]);
    expect(harness.gateway.connectionCount()).toBe(0);
  });

  test('another path answers 404 without calling $connect', async () => {
    const harness = await startHarness();
    const url = harness.gateway.url.replace('/xmpp-websocket', '/elsewhere');
    await expect(refusedHandshake(url, ['xmpp'])).resolves.toMatchObject({ status: 404 });
    expect(harness.connects).toEqual([]);
  });

  test('a connect handler that throws refuses the handshake with 500', async () => {
    const logs: string[] = [];
    const gateway = await startGateway({
      port: 0,
      connect: async () => {
        throw new Error('session table unavailable');
      },
      stream: async () => {},
      log: (line) => logs.push(line),
    });
    running.push(gateway);
    await expect(refusedHandshake(gateway.url, ['xmpp'])).resolves.toMatchObject({ status: 500 });
    expect(logs.join('\n')).toContain('session table unavailable');
  });

  test('the $connect event has the shape API Gateway gives a Lambda proxy integration', async () => {
    const harness = await startHarness();
    const before = Date.now();
    await connect(`${harness.gateway.url}?lang=en`, 'xmpp', { 'User-Agent': 'nimbus-test/1.0' });
    const [event] = harness.connects;
    expect(event.isBase64Encoded).toBe(false);
    expect(event.headers).toMatchObject({
      'Sec-WebSocket-Protocol': 'xmpp',
      'Sec-WebSocket-Version': '13',
      'Sec-WebSocket-Key': expect.stringMatching(/^[A-Za-z0-9+/]{22}==$/),
      Host: `127.0.0.1:${harness.gateway.port}`,
      'User-Agent': 'nimbus-test/1.0',
      'X-Forwarded-For': '127.0.0.1',
      'X-Forwarded-Port': String(harness.gateway.port),
      'X-Forwarded-Proto': 'http',
      'X-Amzn-Trace-Id': expect.stringMatching(/^Root=1-[0-9a-f]{8}-[0-9a-f]{24}$/),
    });
    expect(event.headers).not.toHaveProperty('Connection');
    expect(event.headers).not.toHaveProperty('Upgrade');
    expect(event.multiValueHeaders['Sec-WebSocket-Protocol']).toEqual(['xmpp']);
    expect(event.queryStringParameters).toEqual({ lang: 'en' });
    expect(event.multiValueQueryStringParameters).toEqual({ lang: ['en'] });
    const context = event.requestContext;
    expect(context).toMatchObject({
      routeKey: '$connect',
      eventType: 'CONNECT',
      messageDirection: 'IN',
      stage: 'local',
      apiId: 'local',
      domainName: `127.0.0.1:${harness.gateway.port}`,
      identity: { sourceIp: '127.0.0.1', userAgent: 'nimbus-test/1.0' },
    });
    expect(context.connectionId).toMatch(/^[A-Za-z0-9_-]{15}=$/);
    expect(context.requestId).toMatch(/^[A-Za-z0-9_-]{15}=$/);
    expect(context.extendedRequestId).toBe(context.requestId);
    expect(context.requestTimeEpoch).toBeGreaterThanOrEqual(before);
    expect(context.connectedAt).toBe(context.requestTimeEpoch);
    expect(context.requestTime).toMatch(/^\d{2}\/[A-Z][a-z]{2}\/\d{4}:\d{2}:\d{2}:\d{2} \+0000$/);
  });

  test('connection ids are unique', async () => {
    const harness = await startHarness();
    await Promise.all(Array.from({ length: 20 }, () => connect(harness.gateway.url)));
    const ids = harness.connects.map((event) => event.requestContext.connectionId);
    expect(new Set(ids).size).toBe(20);
    expect(harness.gateway.connectionCount()).toBe(20);
  });
});

describe('frames through the FIFO queue', () => {
  test('each text frame becomes an SQS record as the API Gateway → SQS FIFO integration delivers it', async () => {
    const harness = await startHarness();
    const client = await connect(harness.gateway.url);
    const connectionId = harness.connects[0].requestContext.connectionId;
    const frames = [
      "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>",
      'zwei ✓',
    ];
    const sentAt = Date.now();
    for (const frame of frames) client.socket.send(frame);
    client.socket.close(1000);
    await client.closed;
    await waitFor(() => harness.disconnectsOf(connectionId).length === 1);
    await harness.gateway.drained();

    expect(harness.handled.map((item) => item.event.kind)).toEqual(['frame', 'frame', 'disconnect']);
    expect(harness.framesOf(connectionId)).toEqual(frames);
    const sequence = harness.handled.map((item) => BigInt(item.record.attributes.SequenceNumber ?? '0'));
    expect(sequence[0] < sequence[1] && sequence[1] < sequence[2]).toBe(true);
    for (const { record } of harness.handled) {
      const body = JSON.parse(record.body) as QueueMessage;
      expect(record).toMatchObject({
        eventSource: 'aws:sqs',
        eventSourceARN: expect.stringMatching(/^arn:aws:sqs:us-east-1:\d{12}:.+\.fifo$/),
        awsRegion: 'us-east-1',
        messageId: expect.stringMatching(/^[0-9a-f-]{36}$/),
        md5OfBody: createHash('md5').update(record.body).digest('hex'),
        attributes: {
          ApproximateReceiveCount: '1',
          MessageGroupId: connectionId,
          MessageDeduplicationId: body.requestId,
        },
      });
      expect(body.connectionId).toBe(connectionId);
      expect(body.requestTimeEpoch).toBeGreaterThanOrEqual(sentAt);
      expect(body.requestId).toMatch(/^[A-Za-z0-9_-]{15}=$/);
    }
    const [first, , last] = harness.handled.map((item) => JSON.parse(item.record.body) as QueueMessage);
    expect(first).toMatchObject({ eventType: 'MESSAGE', body: Buffer.from(frames[0]).toString('base64') });
    expect(last.eventType).toBe('DISCONNECT');
    expect(last).not.toHaveProperty('body');
  });

  test('1,000 pipelined frames of one connection are handled in order, one at a time, while another connection proceeds', async () => {
    const inFlight = new Map<string, number>();
    let overlapped = false;
    const completions: string[] = [];
    let harness: Harness | undefined;
    harness = await startHarness(async ({ event }): Promise<'ok'> => {
      const running = (inFlight.get(event.connectionId) ?? 0) + 1;
      inFlight.set(event.connectionId, running);
      if (running > 1) overlapped = true;
      // Hand the event loop over, so another delivery of this connection could start meanwhile.
      await setImmediate();
      if (event.kind === 'frame' && harness) {
        await harness.management.send(
          new PostToConnectionCommand({ ConnectionId: event.connectionId, Data: `echo ${event.frame}` }),
        );
      }
      completions.push(`${event.connectionId} ${event.frame}`);
      inFlight.set(event.connectionId, running - 1);
      return 'ok';
    });
    const first = await connect(harness.gateway.url);
    const second = await connect(harness.gateway.url);
    const [firstId, secondId] = harness.connects.map((event) => event.requestContext.connectionId);
    const firstFrames = Array.from({ length: 1000 }, (_, i) => `a${i}`);
    const secondFrames = Array.from({ length: 20 }, (_, i) => `b${i}`);

    for (const frame of firstFrames) first.socket.send(frame);
    await waitFor(() => completions.length >= 10);
    for (const frame of secondFrames) second.socket.send(frame);

    await waitFor(() => first.received.length === 1000 && second.received.length === 20, 60_000);
    expect(harness.framesOf(firstId)).toEqual(firstFrames);
    expect(harness.framesOf(secondId)).toEqual(secondFrames);
    expect(first.received).toEqual(firstFrames.map((frame) => `echo ${frame}`));
    expect(second.received).toEqual(secondFrames.map((frame) => `echo ${frame}`));
    expect(overlapped).toBe(false);
    // Interleaving: the second connection was not queued behind the first one's 1,000 frames.
    const secondDone = completions.indexOf(`${secondId} b19`);
    expect(secondDone).toBeGreaterThan(completions.indexOf(`${firstId} a0`));
    expect(secondDone).toBeLessThan(completions.indexOf(`${firstId} a999`));
  }, 90_000);

  test('a failed record is delivered again before the frames behind it, then dropped after maxReceiveCount', async () => {
    const attempts = new Map<string, number>();
    const harness = await startHarness(
      ({ event }) => {
        const attempt = (attempts.get(event.frame) ?? 0) + 1;
        attempts.set(event.frame, attempt);
        if (event.frame === 'b' && attempt === 1) return 'fail';
        if (event.frame === 'd' && attempt === 1) throw new Error('DynamoDB throttled');
        if (event.frame === 'poison') return 'fail';
        return 'ok';
      },
      { maxReceiveCount: 3, visibilityTimeoutMs: 100 },
    );
    const client = await connect(harness.gateway.url);
    const connectionId = harness.connects[0].requestContext.connectionId;
    for (const frame of ['a', 'b', 'c', 'd', 'poison', 'e']) client.socket.send(frame);
    await waitFor(() => harness.framesOf(connectionId).includes('e'));

    expect(harness.deliveries.map((item) => item.event.frame)).toEqual([
      'a',
      'b',
      'b',
      'c',
      'd',
      'd',
      'poison',
      'poison',
      'poison',
      'e',
    ]);
    expect(harness.framesOf(connectionId)).toEqual(['a', 'b', 'c', 'd', 'e']);
    const receiveCounts = harness.deliveries
      .filter((item) => item.event.frame === 'b')
      .map((item) => item.record.attributes.ApproximateReceiveCount);
    expect(receiveCounts).toEqual(['1', '2']);
    const [firstB, secondB] = harness.deliveries.filter((item) => item.event.frame === 'b');
    expect(secondB.record.messageId).toBe(firstB.record.messageId);
    expect(harness.logs.join('\n')).toContain('DynamoDB throttled');
    expect(harness.logs.some((line) => /dropped message .* after 3 deliveries/.test(line))).toBe(true);
  });

  test('records of one connection can come in batches, as with the event source’s BatchSize', async () => {
    let releaseFirst: () => void = () => {};
    const firstHeld = new Promise<void>((resolve) => {
      releaseFirst = resolve;
    });
    const batches: string[][] = [];
    const gateway = await startGateway({
      port: 0,
      batchSize: 10,
      connect: acceptXmppOnly,
      stream: async (event) => {
        const frames = event.Records.map((record) => decodeQueueMessage(record.body).frame);
        batches.push(frames);
        if (batches.length === 1) await firstHeld;
      },
    });
    running.push(gateway);
    const client = await connect(gateway.url);
    client.socket.send('0');
    await waitFor(() => batches.length === 1);
    for (let i = 1; i <= 12; i++) client.socket.send(String(i));
    // All twelve are queued behind the held batch before it is released.
    await framesRead(client);
    releaseFirst();
    await waitFor(() => batches.flat().length === 13);
    expect(batches).toEqual([['0'], ['1', '2', '3', '4', '5', '6', '7', '8', '9', '10'], ['11', '12']]);
  });
});

describe('limits as on AWS', () => {
  test('a frame of 32 KB passes; one of 33 KB closes the socket with 1009 and never reaches the queue', async () => {
    const harness = await startHarness();
    const client = await connect(harness.gateway.url);
    const connectionId = harness.connects[0].requestContext.connectionId;
    client.socket.send('x'.repeat(32 * 1024));
    await waitFor(() => harness.framesOf(connectionId).length === 1);
    client.socket.send('y'.repeat(33 * 1024));
    client.socket.send('after');
    expect((await client.closed).code).toBe(1009);
    await waitFor(() => harness.disconnectsOf(connectionId).length === 1);
    await harness.gateway.drained();
    expect(harness.framesOf(connectionId).map((frame) => frame.length)).toEqual([32 * 1024]);
  });

  test('a frame one byte over 32 KB is refused', async () => {
    const harness = await startHarness();
    const client = await connect(harness.gateway.url);
    const connectionId = harness.connects[0].requestContext.connectionId;
    client.socket.send('x'.repeat(32 * 1024 + 1));
    expect((await client.closed).code).toBe(1009);
    await waitFor(() => harness.disconnectsOf(connectionId).length === 1);
    await harness.gateway.drained();
    expect(harness.framesOf(connectionId)).toEqual([]);
  });

  test('a message of 128 KB in 32 KB fragments passes; one of 129 KB closes the socket with 1009', async () => {
    const harness = await startHarness();
    const client = await connect(harness.gateway.url);
    const connectionId = harness.connects[0].requestContext.connectionId;
    const sendFragmented = (message: string): void => {
      const fragment = 32 * 1024;
      for (let start = 0; start < message.length; start += fragment) {
        client.socket.send(message.slice(start, start + fragment), {
          fin: start + fragment >= message.length,
        });
      }
    };
    sendFragmented('x'.repeat(128 * 1024));
    await waitFor(() => harness.framesOf(connectionId).length === 1);
    sendFragmented('y'.repeat(129 * 1024));
    expect((await client.closed).code).toBe(1009);
    await waitFor(() => harness.disconnectsOf(connectionId).length === 1);
    await harness.gateway.drained();
    expect(harness.framesOf(connectionId).map((frame) => frame.length)).toEqual([128 * 1024]);
    expect(harness.disconnectsOf(connectionId)).toHaveLength(1);
  });

  test('a binary frame closes the socket with 1003', async () => {
    const harness = await startHarness();
    const client = await connect(harness.gateway.url);
    const connectionId = harness.connects[0].requestContext.connectionId;
    client.socket.send(Buffer.from('<open/>'), { binary: true });
    expect((await client.closed).code).toBe(1003);
    await waitFor(() => harness.disconnectsOf(connectionId).length === 1);
    await harness.gateway.drained();
    expect(harness.framesOf(connectionId)).toEqual([]);
  });

  test('an idle connection is closed with 1001 and $disconnect follows; traffic keeps one open', async () => {
    // A second of idle timeout against 100 ms ticks: a loaded machine may hold a tick back for
    // a while, never for most of a second.
    const IDLE_MS = 1_000;
    const harness = await startHarness(() => 'ok', { idleTimeoutMs: IDLE_MS });
    // Taken before the connections exist: their idle timers start after it.
    const openedAt = Date.now();
    const idle = await connect(harness.gateway.url);
    const busy = await connect(harness.gateway.url);
    const [idleId, busyId] = harness.connects.map((event) => event.requestContext.connectionId);
    // A frame every 100 ms for 2.5 s, well past the idle timeout, then silence.
    const TICKS = 25;
    let ticks = 0;
    let lastTickAt = openedAt;
    const ticker = setInterval(() => {
      busy.socket.send('<r/>');
      lastTickAt = Date.now();
      if (++ticks === TICKS) clearInterval(ticker);
    }, 100);
    try {
      const closed = await idle.closed;
      expect(closed).toEqual({ code: 1001, reason: 'Going away' });
      expect(Date.now() - openedAt).toBeGreaterThanOrEqual(IDLE_MS - 50);
      await waitFor(() => harness.disconnectsOf(idleId).length === 1);
      expect((await busy.closed).code).toBe(1001);
    } finally {
      clearInterval(ticker);
    }
    // Open through all its traffic (a frame arriving once a close began is dropped), and closed
    // only an idle timeout after the last frame.
    const busyClosedAt = Date.now();
    expect(ticks).toBe(TICKS);
    expect(busyClosedAt - lastTickAt).toBeGreaterThanOrEqual(IDLE_MS - 50);
    await waitFor(() => harness.disconnectsOf(busyId).length === 1);
    expect(harness.framesOf(busyId)).toEqual(Array.from({ length: TICKS }, () => '<r/>'));
    await harness.gateway.drained();
    expect(harness.disconnectsOf(idleId)).toHaveLength(1);
    expect(harness.handled.at(-1)?.event).toMatchObject({ connectionId: busyId, kind: 'disconnect' });
  });
});

describe('the @connections management API, through the real SDK client', () => {
  test('PostToConnection reaches the socket as one text frame, in order', async () => {
    const harness = await startHarness();
    const client = await connect(harness.gateway.url);
    const connectionId = lastConnectionId(harness);
    for (const stanza of ["<message to='a@localhost'/>", '<r/>', 'grüße']) {
      await harness.management.send(
        new PostToConnectionCommand({ ConnectionId: connectionId, Data: stanza }),
      );
    }
    await waitFor(() => client.received.length === 3);
    expect(client.received).toEqual(["<message to='a@localhost'/>", '<r/>', 'grüße']);
  });

  test('an unknown connection is GoneException (410) for POST, GET and DELETE', async () => {
    const harness = await startHarness();
    const unknown = 'Lk4qVcsKoAMCFrQ=';
    const commands = [
      new PostToConnectionCommand({ ConnectionId: unknown, Data: '<r/>' }),
      new GetConnectionCommand({ ConnectionId: unknown }),
      new DeleteConnectionCommand({ ConnectionId: unknown }),
    ];
    for (const command of commands) {
      // biome-ignore lint/suspicious/noExplicitAny: three command types through one client call
      const error = await harness.management.send(command as any).catch((caught: unknown) => caught);
      expect(error).toBeInstanceOf(GoneException);
      expect((error as GoneException).$metadata.httpStatusCode).toBe(410);
    }
  });

  test('GetConnection describes the connection', async () => {
    const harness = await startHarness();
    const before = Date.now();
    await connect(harness.gateway.url, 'xmpp', { 'User-Agent': 'nimbus-test/1.0' });
    const connectionId = lastConnectionId(harness);
    const description = await harness.management.send(
      new GetConnectionCommand({ ConnectionId: connectionId }),
    );
    expect(description.ConnectedAt).toBeInstanceOf(Date);
    expect(description.ConnectedAt?.getTime()).toBeGreaterThanOrEqual(before - 1000);
    expect(description.LastActiveAt?.getTime()).toBeGreaterThanOrEqual(
      description.ConnectedAt?.getTime() ?? 0,
    );
    expect(description.Identity).toEqual({ SourceIp: '127.0.0.1', UserAgent: 'nimbus-test/1.0' });
  });

  test('the endpoint also answers under the stage prefix', async () => {
    const harness = await startHarness();
    const client = await connect(harness.gateway.url);
    const connectionId = lastConnectionId(harness);
    const staged = managementClient(`${harness.gateway.managementEndpoint}/local`);
    await staged.send(new PostToConnectionCommand({ ConnectionId: connectionId, Data: '<staged/>' }));
    await waitFor(() => client.received.includes('<staged/>'));
  });

  test('DeleteConnection closes the socket with 1000, then $disconnect arrives once', async () => {
    const harness = await startHarness();
    const client = await connect(harness.gateway.url);
    const connectionId = lastConnectionId(harness);
    await harness.management.send(new DeleteConnectionCommand({ ConnectionId: connectionId }));
    expect((await client.closed).code).toBe(1000);
    await waitFor(() => harness.disconnectsOf(connectionId).length === 1);
    // The gateway saw its side of the socket close (where it sends $disconnect): any second
    // $disconnect is queued by now, and handled once the queue is drained.
    await waitFor(() => harness.gateway.connectionCount() === 0);
    await harness.gateway.drained();
    expect(harness.disconnectsOf(connectionId)).toHaveLength(1);
    await expect(
      harness.management.send(new PostToConnectionCommand({ ConnectionId: connectionId, Data: '<r/>' })),
    ).rejects.toBeInstanceOf(GoneException);
    expect(harness.gateway.connectionCount()).toBe(0);
  });

  test('a post over the 128 KB message limit is PayloadTooLargeException (413); one of 128 KB is delivered', async () => {
    const harness = await startHarness();
    const client = await connect(harness.gateway.url);
    const connectionId = lastConnectionId(harness);
    const tooLarge = await harness.management
      .send(new PostToConnectionCommand({ ConnectionId: connectionId, Data: 'x'.repeat(128 * 1024 + 1) }))
      .catch((error: unknown) => error);
    expect(tooLarge).toBeInstanceOf(PayloadTooLargeException);
    expect((tooLarge as PayloadTooLargeException).$metadata.httpStatusCode).toBe(413);
    // The post limit is the message limit, not the client's 32 KB frame limit.
    await harness.management.send(
      new PostToConnectionCommand({ ConnectionId: connectionId, Data: 'y'.repeat(128 * 1024) }),
    );
    await waitFor(() => client.received.length === 1);
    expect(client.received[0]).toHaveLength(128 * 1024);
    expect(client.socket.readyState).toBe(WebSocket.OPEN);
  });
});

describe('closing the gateway', () => {
  test('close() closes every socket with 1001 and delivers their $disconnect first', async () => {
    const harness = await startHarness();
    const clientsOpen = await Promise.all([connect(harness.gateway.url), connect(harness.gateway.url)]);
    await harness.gateway.close();
    for (const client of clientsOpen) expect((await client.closed).code).toBe(1001);
    const ids = harness.connects.map((event) => event.requestContext.connectionId);
    for (const id of ids) expect(harness.disconnectsOf(id)).toHaveLength(1);
    await expect(handshakeError(harness.gateway.url)).resolves.toBeInstanceOf(Error);
  });
});
