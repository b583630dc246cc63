/**
 * A local stand-in for the API Gateway WebSocket API of the AWS stack, calling the same handlers:
 *
 * - `$connect` → the connect handler, with the event API Gateway builds; its answer decides the
 *   handshake (status, `Sec-WebSocket-Protocol`).
 * - `$default` and `$disconnect` → an emulation of the SQS FIFO queue (MessageGroupId =
 *   connectionId) and its Lambda event source → the stream handler, with SQS records carrying
 *   the same body as the API Gateway → SQS integration (`shared/queue-message.ts`). One
 *   connection's records are handled one batch at a time, in order; connections proceed
 *   concurrently; failures come back after the visibility timeout (event-source.ts).
 * - The `@connections` management API (POST, GET, DELETE) on the same HTTP server, so the real
 *   `@aws-sdk/client-apigatewaymanagementapi` client works against `managementEndpoint`.
 * - API Gateway's limits: 32 KB frames and 128 KB messages from clients (1009), 128 KB posts
 *   (413), no binary frames (1003), the idle timeout (1001) and the two-hour connection cut.
 * - Optional faults from a seeded schedule (faults.ts): PostToConnection answering 410, 429,
 *   500, slowly or never, lost deletes and functions dying mid-batch in the event source.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse, STATUS_CODES } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import type { Context } from 'aws-lambda';
import { type RawData, WebSocket, WebSocketServer } from 'ws';
import { encodeQueueMessage, type QueueMessage } from '../../shared/queue-message.ts';
import {
  DEPLOYED_EVENT_SOURCE,
  type DeadLetter,
  FifoEventSource,
  type StreamHandler,
} from './event-source.ts';
import { FaultCounts, type FaultOptions, faultStream, pickFault, type Random } from './faults.ts';
import { watchFrameSizes } from './frame-limit.ts';
import { lambdaContext } from './lambda-context.ts';

export type { DeadLetter, StreamHandler, StreamResult } from './event-source.ts';

// ---------------------------------------------------------------------------------------------
// Public types

/**
 * The `$connect` event as API Gateway delivers it to a Lambda proxy integration.
 *
 * Header names keep the client's spelling, except the handshake headers (`Host`, `User-Agent`,
 * `Origin`, `Sec-WebSocket-Protocol`, `Sec-WebSocket-Key`, `Sec-WebSocket-Version`,
 * `Sec-WebSocket-Extensions`), which are given in that canonical casing, so a handler can read
 * `event.headers['Sec-WebSocket-Protocol']`. On AWS the casing is whatever the client sent:
 * handlers deployed there should still look the name up case-insensitively. `headers` holds the
 * last value of a repeated header, `multiValueHeaders` all of them. As on AWS, `Connection` and
 * `Upgrade` are absent and `X-Forwarded-*` and `X-Amzn-Trace-Id` are added.
 */
export interface ConnectEvent {
  headers: Record<string, string>;
  multiValueHeaders: Record<string, string[]>;
  queryStringParameters?: Record<string, string>;
  multiValueQueryStringParameters?: Record<string, string[]>;
  requestContext: ConnectRequestContext;
  isBase64Encoded: false;
}

export interface ConnectRequestContext {
  routeKey: '$connect';
  eventType: 'CONNECT';
  messageDirection: 'IN';
  stage: string;
  connectionId: string;
  requestId: string;
  extendedRequestId: string;
  /** `21/Nov/2025:09:41:07 +0000` */
  requestTime: string;
  requestTimeEpoch: number;
  connectedAt: number;
  identity: { sourceIp: string; userAgent?: string };
  /** The `Host` the client connected to (on AWS `{apiId}.execute-api.{region}.amazonaws.com`). */
  domainName: string;
  apiId: string;
}

/** The connect handler's answer; a status outside 2xx refuses the handshake with it and `body`. */
export interface ConnectResult {
  statusCode: number;
  headers?: Record<string, string | number | boolean>;
  body?: string;
}

export type ConnectHandler = (event: ConnectEvent, context: Context) => Promise<ConnectResult>;

export interface GatewayOptions {
  /** Default `127.0.0.1`. */
  host?: string;
  /** Default 5280; 0 picks a free port. */
  port?: number;
  /** The WebSocket path; default `/xmpp-websocket`. Other paths answer 404. */
  path?: string;
  connect: ConnectHandler;
  stream: StreamHandler;
  /** No frame in or out for this long closes the socket with 1001; default 10 minutes as on AWS. */
  idleTimeoutMs?: number;
  /** Connections are cut (1001) after this long; default 2 hours as on AWS. */
  maxConnectionMs?: number;
  /** Largest message in either direction; default 128 KB as on AWS. */
  maxMessageBytes?: number;
  /**
   * Largest single frame from a client; default 32 KB as on AWS. A bigger one closes the socket
   * with 1009 even when the message it belongs to is within `maxMessageBytes`.
   */
  maxFrameBytes?: number;
  /** Stage name in events and the optional `/{stage}` prefix of the management API; default `local`. */
  stage?: string;
  apiId?: string;
  region?: string;
  /**
   * Records per stream invocation (the event source's BatchSize), possibly of several
   * connections; default 1, at most 10 (the stack and `startLocalStack` use 10).
   */
  batchSize?: number;
  /**
   * Deliveries of a record before it is dropped, where AWS moves it to the dead-letter queue;
   * default 5, the redrive policy of the stack's FrameQueue.
   */
  maxReceiveCount?: number;
  /**
   * How long a received record stays invisible: a record reported failed, or the batch of an
   * invocation that threw or timed out, is delivered again this long after it was received.
   * Default 180 s, the FrameQueue's (six times the stream function's timeout).
   */
  visibilityTimeoutMs?: number;
  /**
   * A stream invocation running longer is abandoned (its batch delivered again after the
   * visibility timeout, whatever it already did); default 30 s, the stream function's timeout.
   */
  functionTimeoutMs?: number;
  /**
   * Stream invocations at once; default 100, the maximum concurrency the stack sets on the
   * event source (`STREAM_MAX_CONCURRENCY`). A small value makes batches mix connections, as
   * they do on AWS when invocations are busy.
   */
  concurrency?: number;
  /** Faults to inject (the `duplicate`, `dieMidBatch` and `post` parts; `dynamodb` is the stack's). */
  faults?: FaultOptions;
  /** Where failures are reported; default stderr. */
  log?: (line: string) => void;
}

export interface Gateway {
  /** `ws://host:port/xmpp-websocket` */
  url: string;
  port: number;
  /** `http://host:port`, the `endpoint` of an `ApiGatewayManagementApiClient`. */
  managementEndpoint: string;
  /** Where the frame queue takes SQS's ChangeMessageVisibilityBatch (shared/frame-queue.ts). */
  queueEndpoint: string;
  /** Open sockets. */
  connectionCount(): number;
  /** Resolves once every queued record has been handled (or dropped). */
  drained(): Promise<void>;
  /** Messages in the queue, in flight or waiting. */
  queuedMessages(): number;
  /** Records the dead-letter queue received (dropped after `maxReceiveCount` deliveries). */
  deadLetters(): readonly DeadLetter[];
  /** Faults injected so far, by name (`duplicate`, `dieMidBatch`, `post.gone`, …). */
  faultsInjected(): Record<string, number>;
  /** Closes every socket (1001), delivers the resulting `$disconnect`s, stops listening. */
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Gateway

interface Connection {
  id: string;
  socket: WebSocket;
  connectedAt: number;
  lastActiveAt: number;
  sourceIp: string;
  userAgent: string | undefined;
  idleTimer: NodeJS.Timeout;
  lifetimeTimer: NodeJS.Timeout;
}

const HANDSHAKE_HEADERS = new Map(
  [
    'Host',
    'User-Agent',
    'Origin',
    'Sec-WebSocket-Protocol',
    'Sec-WebSocket-Key',
    'Sec-WebSocket-Version',
    'Sec-WebSocket-Extensions',
  ].map((name) => [name.toLowerCase(), name]),
);
const HOP_BY_HOP_HEADERS = new Set(['connection', 'upgrade']);
const WEBSOCKET_KEY = /^[+/0-9A-Za-z]{22}==$/;

export async function startGateway(options: GatewayOptions): Promise<Gateway> {
  const host = options.host ?? '127.0.0.1';
  const path = options.path ?? '/xmpp-websocket';
  const stage = options.stage ?? 'local';
  const apiId = options.apiId ?? 'local';
  const region = options.region ?? 'us-east-1';
  const idleTimeoutMs = options.idleTimeoutMs ?? 600_000;
  const maxConnectionMs = options.maxConnectionMs ?? 2 * 3600_000;
  const maxMessageBytes = options.maxMessageBytes ?? 128 * 1024;
  const maxFrameBytes = options.maxFrameBytes ?? 32 * 1024;
  const log = options.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const faults = options.faults;
  const faultCounts = new FaultCounts();
  const postFaults: Random | undefined = faults?.post ? faultStream(faults.seed, 'post') : undefined;
  const disconnectFaults: Random | undefined = faults?.lostDisconnect
    ? faultStream(faults.seed, 'disconnect')
    : undefined;

  const connections = new Map<string, Connection>();
  const pendingHandshakes = new Set<Promise<void>>();
  const queue = new FifoEventSource({
    handler: options.stream,
    batchSize: Math.min(Math.max(options.batchSize ?? 1, 1), 10),
    maxReceiveCount: Math.max(options.maxReceiveCount ?? DEPLOYED_EVENT_SOURCE.maxReceiveCount, 1),
    visibilityTimeoutMs: options.visibilityTimeoutMs ?? DEPLOYED_EVENT_SOURCE.visibilityTimeoutMs,
    functionTimeoutMs: options.functionTimeoutMs ?? DEPLOYED_EVENT_SOURCE.functionTimeoutMs,
    concurrency: Math.max(options.concurrency ?? DEPLOYED_EVENT_SOURCE.concurrency, 1),
    queueArn: `arn:aws:sqs:${region}:000000000000:nimbus-${stage}-stream.fifo`,
    region,
    log,
    faults,
    faultCounts,
  });
  let closing = false;

  /** The subprotocol the connect handler chose, read by `handleProtocols` during the upgrade. */
  const chosenProtocols = new WeakMap<IncomingMessage, string>();
  const wss = new WebSocketServer({
    noServer: true,
    clientTracking: false,
    perMessageDeflate: false,
    // ws answers an over-long message with close code 1009, as API Gateway does.
    maxPayload: maxMessageBytes,
    handleProtocols: (_offered, request) => chosenProtocols.get(request) ?? false,
  });

  const server = createServer((request, response) => {
    serveManagementApi(request, response).catch((error: unknown) => {
      log(`[gateway] management API: ${describe(error)}`);
      if (!response.headersSent)
        sendError(response, 500, 'InternalServerErrorException', 'Internal server error');
      else response.destroy();
    });
  });

  server.on('upgrade', (request: IncomingMessage, socket: Duplex, head: Buffer) => {
    const handshake = upgrade(request, socket, head).catch((error: unknown) => {
      log(`[gateway] handshake: ${describe(error)}`);
      refuseHandshake(socket, 500, JSON.stringify({ message: 'Internal server error' }));
    });
    pendingHandshakes.add(handshake);
    void handshake.finally(() => pendingHandshakes.delete(handshake));
  });

  async function upgrade(request: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    socket.on('error', () => socket.destroy());
    const url = new URL(request.url ?? '/', 'http://gateway.invalid');
    if (url.pathname !== path) return refuseHandshake(socket, 404, JSON.stringify({ message: 'Not Found' }));
    if (closing) return refuseHandshake(socket, 503, JSON.stringify({ message: 'Service Unavailable' }));
    // Malformed handshakes never reach $connect on AWS either.
    const key = request.headers['sec-websocket-key'];
    if (
      request.method !== 'GET' ||
      request.headers.upgrade?.toLowerCase() !== 'websocket' ||
      typeof key !== 'string' ||
      !WEBSOCKET_KEY.test(key) ||
      request.headers['sec-websocket-version'] !== '13'
    ) {
      return refuseHandshake(socket, 400, JSON.stringify({ message: 'Bad Request' }));
    }

    const connectionId = newConnectionId(connections);
    const event = connectEvent(request, url, { connectionId, stage, apiId });
    const result = await options.connect(event, lambdaContext('connect', region, CONNECT_TIMEOUT_MS));
    const statusCode = result?.statusCode ?? 200;
    if (statusCode < 200 || statusCode > 299) {
      return refuseHandshake(socket, statusCode, result.body ?? '', result.headers);
    }
    if (closing || socket.destroyed || !socket.writable) {
      // $connect succeeded, so the backend knows the connection: it must hear that it is gone.
      if (!socket.destroyed) refuseHandshake(socket, 503, JSON.stringify({ message: 'Service Unavailable' }));
      enqueueDisconnect(connectionId);
      return;
    }
    const protocol = headerValue(result.headers, 'Sec-WebSocket-Protocol');
    if (protocol !== undefined) chosenProtocols.set(request, protocol);
    wss.handleUpgrade(request, socket, head, (ws) => {
      // Ahead of ws's own listener, so an oversized frame is refused before ws could deliver it.
      socket.prependListener(
        'data',
        watchFrameSizes(maxFrameBytes, () => ws.close(1009, 'Frame too big')),
      );
      open(connectionId, ws, event.requestContext);
    });
  }

  function open(id: string, socket: WebSocket, context: ConnectRequestContext): void {
    const goAway = (): void => socket.close(1001, 'Going away');
    const connection: Connection = {
      id,
      socket,
      connectedAt: context.connectedAt,
      lastActiveAt: Date.now(),
      sourceIp: context.identity.sourceIp,
      userAgent: context.identity.userAgent,
      idleTimer: setTimeout(goAway, idleTimeoutMs).unref(),
      lifetimeTimer: setTimeout(goAway, maxConnectionMs).unref(),
    };
    connections.set(id, connection);

    socket.on('message', (data: RawData, isBinary: boolean) => {
      // Frames arriving after a close began are dropped, as once API Gateway stops reading.
      if (socket.readyState !== WebSocket.OPEN) return;
      if (isBinary) {
        socket.close(1003, 'Binary frames are not supported');
        return;
      }
      touch(connection);
      const requestId = newRequestId();
      enqueue({
        connectionId: id,
        eventType: 'MESSAGE',
        requestTimeEpoch: Date.now(),
        requestId,
        body: toBuffer(data).toString('base64'),
        connectedAt: connection.connectedAt,
        sourceIp: connection.sourceIp,
      });
    });
    socket.on('ping', () => touch(connection));
    socket.on('error', (error: Error & { code?: string }) => {
      // ws has already closed the socket with the right code (1009 for an oversized message).
      if (error.code !== 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH') log(`[gateway] ${id}: ${error.message}`);
    });
    socket.once('close', () => {
      clearTimeout(connection.idleTimer);
      clearTimeout(connection.lifetimeTimer);
      connections.delete(id);
      // API Gateway's $disconnect is best effort: the fault schedule may lose it.
      if (disconnectFaults && disconnectFaults() < (faults?.lostDisconnect ?? 0)) {
        faultCounts.add('lostDisconnect');
        log(`[gateway] ${id}: $disconnect lost (fault)`);
        return;
      }
      enqueueDisconnect(id);
    });
  }

  function touch(connection: Connection): void {
    connection.lastActiveAt = Date.now();
    connection.idleTimer.refresh();
  }

  function enqueue(message: QueueMessage): void {
    queue.send(message.connectionId, encodeQueueMessage(message), message.requestId);
  }

  function enqueueDisconnect(connectionId: string): void {
    enqueue({
      connectionId,
      eventType: 'DISCONNECT',
      requestTimeEpoch: Date.now(),
      requestId: newRequestId(),
    });
  }

  // -- the frame queue: SQS ChangeMessageVisibilityBatch (JSON protocol) ----------------------

  async function changeVisibility(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const body = await readBody(request, 256 * 1024);
    let entries: { Id?: unknown; ReceiptHandle?: unknown; VisibilityTimeout?: unknown }[];
    try {
      entries = JSON.parse(body?.toString('utf8') ?? '').Entries;
      if (!Array.isArray(entries)) throw new Error('no Entries');
    } catch {
      return sendError(response, 400, 'InvalidParameterValue', 'Malformed ChangeMessageVisibilityBatch');
    }
    const successful: { Id: string }[] = [];
    const failed: { Id: string; Code: string; SenderFault: boolean }[] = [];
    for (const entry of entries) {
      const id = String(entry.Id);
      const seconds = Number(entry.VisibilityTimeout);
      const ok =
        typeof entry.ReceiptHandle === 'string' &&
        Number.isInteger(seconds) &&
        seconds >= 0 &&
        seconds <= 43_200 &&
        queue.changeVisibility(entry.ReceiptHandle, seconds);
      if (ok) successful.push({ Id: id });
      else failed.push({ Id: id, Code: 'MessageNotInflight', SenderFault: true });
    }
    sendJson(response, 200, { Successful: successful, Failed: failed });
  }

  // -- @connections ---------------------------------------------------------------------------

  async function serveManagementApi(request: IncomingMessage, response: ServerResponse): Promise<void> {
    if (request.method === 'POST' && request.headers['x-amz-target'] === SQS_CHANGE_VISIBILITY)
      return changeVisibility(request, response);
    const url = new URL(request.url ?? '/', 'http://gateway.invalid');
    const match = /^(?:\/[^/]+)?\/@connections\/([^/]+)\/?$/.exec(url.pathname);
    if (match === null) {
      request.resume();
      if (url.pathname === path) {
        response.writeHead(426, {
          'content-type': 'text/plain',
          upgrade: 'websocket',
          connection: 'Upgrade',
        });
        response.end('WebSocket upgrade required');
        return;
      }
      sendError(response, 404, 'NotFoundException', 'Not Found');
      return;
    }
    let connectionId: string;
    try {
      connectionId = decodeURIComponent(match[1]);
    } catch {
      request.resume();
      sendError(response, 400, 'BadRequestException', 'Invalid connection id');
      return;
    }
    const connection = connections.get(connectionId);
    const gone = (): void =>
      sendError(response, 410, 'GoneException', `Connection ${connectionId} is gone or was never there`);

    switch (request.method) {
      case 'POST': {
        const data = await readBody(request, maxMessageBytes);
        if (data === undefined) {
          sendError(response, 413, 'PayloadTooLargeException', `Message exceeds ${maxMessageBytes} bytes`);
          return;
        }
        if (connection === undefined || connection.socket.readyState !== WebSocket.OPEN) return gone();
        const fault = postFaults && pickPostFault(postFaults, faults?.post ?? {});
        if (fault !== undefined) {
          faultCounts.add(`post.${fault}`);
          log(`[gateway] fault: PostToConnection ${connectionId}: ${fault}`);
        }
        switch (fault) {
          case 'gone':
            // Gone means gone: the socket drops as a vanished client's would, and $disconnect follows.
            connection.socket.terminate();
            return gone();
          case 'throttle':
            return sendError(response, 429, 'LimitExceededException', 'Rate exceeded');
          case 'serverError':
            return sendError(response, 500, 'InternalServerErrorException', 'Internal server error');
          case 'slow':
            await delay(faults?.post?.slowMs ?? 1_000);
            if (connection.socket.readyState !== WebSocket.OPEN) return gone();
            break;
        }
        try {
          await sendFrame(connection.socket, data);
        } catch {
          return gone();
        }
        touch(connection);
        if (fault === 'timeout') {
          // Delivered, but the caller never hears so: its connection drops unanswered.
          await delay(faults?.post?.timeoutMs ?? 1_000);
          response.socket?.destroy();
          return;
        }
        sendEmpty(response, 200);
        return;
      }
      case 'GET': {
        request.resume();
        if (connection === undefined || connection.socket.readyState !== WebSocket.OPEN) return gone();
        // The member names of the wire format (the SDK maps them to ConnectedAt, Identity, …).
        sendJson(response, 200, {
          connectedAt: new Date(connection.connectedAt).toISOString(),
          lastActiveAt: new Date(connection.lastActiveAt).toISOString(),
          identity: { sourceIp: connection.sourceIp, userAgent: connection.userAgent },
        });
        return;
      }
      case 'DELETE': {
        request.resume();
        if (connection === undefined || connection.socket.readyState !== WebSocket.OPEN) return gone();
        connection.socket.close(1000);
        sendEmpty(response, 204);
        return;
      }
      default:
        request.resume();
        sendError(response, 405, 'MethodNotAllowedException', `${request.method} is not supported`);
    }
  }

  // -- lifecycle ------------------------------------------------------------------------------

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 5280, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (error) => log(`[gateway] server: ${describe(error)}`));
  const port = (server.address() as AddressInfo).port;
  const authority = `${host.includes(':') ? `[${host}]` : host}:${port}`;

  return {
    url: `ws://${authority}${path}`,
    port,
    managementEndpoint: `http://${authority}`,
    queueEndpoint: `http://${authority}/`,
    connectionCount: () => connections.size,
    drained: () => queue.drained(),
    queuedMessages: () => queue.size(),
    deadLetters: () => queue.deadLetters(),
    faultsInjected: () => faultCounts.snapshot(),
    async close(): Promise<void> {
      if (closing) return;
      closing = true;
      const stopped = new Promise<void>((resolve) => server.close(() => resolve()));
      await Promise.all([...pendingHandshakes]);
      await Promise.all([...connections.values()].map((connection) => closeSocket(connection.socket)));
      server.closeAllConnections();
      await stopped;
      queue.hurry();
      await queue.drained();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Handshake and management API helpers

/** The connect function's timeout in the stack. */
const CONNECT_TIMEOUT_MS = 10_000;

type PostFault = 'gone' | 'throttle' | 'serverError' | 'timeout' | 'slow';

function pickPostFault(random: Random, rates: NonNullable<FaultOptions['post']>): PostFault | undefined {
  return pickFault<PostFault>(random, [
    ['gone', rates.gone],
    ['throttle', rates.throttle],
    ['serverError', rates.serverError],
    ['timeout', rates.timeout],
    ['slow', rates.slow],
  ])?.fault;
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}

function connectEvent(
  request: IncomingMessage,
  url: URL,
  ids: { connectionId: string; stage: string; apiId: string },
): ConnectEvent {
  const now = Date.now();
  const sourceIp = (request.socket.remoteAddress ?? '127.0.0.1').replace(/^::ffff:/, '');
  const headers: Record<string, string> = {};
  const multiValueHeaders: Record<string, string[]> = {};
  const add = (name: string, value: string): void => {
    headers[name] = value;
    multiValueHeaders[name] = [...(multiValueHeaders[name] ?? []), value];
  };
  const raw = request.rawHeaders;
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const lower = raw[i].toLowerCase();
    if (HOP_BY_HOP_HEADERS.has(lower) || lower.startsWith('x-forwarded-') || lower === 'x-amzn-trace-id')
      continue;
    add(HANDSHAKE_HEADERS.get(lower) ?? raw[i], raw[i + 1]);
  }
  const forwardedFor = request.headers['x-forwarded-for'];
  add('X-Amzn-Trace-Id', `Root=1-${Math.floor(now / 1000).toString(16)}-${randomBytes(12).toString('hex')}`);
  add('X-Forwarded-For', forwardedFor ? `${forwardedFor}, ${sourceIp}` : sourceIp);
  add('X-Forwarded-Port', String(request.socket.localPort ?? ''));
  add('X-Forwarded-Proto', 'http');

  const requestId = newRequestId();
  const userAgent = request.headers['user-agent'];
  const event: ConnectEvent = {
    headers,
    multiValueHeaders,
    requestContext: {
      routeKey: '$connect',
      eventType: 'CONNECT',
      messageDirection: 'IN',
      stage: ids.stage,
      connectionId: ids.connectionId,
      requestId,
      extendedRequestId: requestId,
      requestTime: formatRequestTime(new Date(now)),
      requestTimeEpoch: now,
      connectedAt: now,
      identity: userAgent === undefined ? { sourceIp } : { sourceIp, userAgent },
      domainName: request.headers.host ?? '',
      apiId: ids.apiId,
    },
    isBase64Encoded: false,
  };
  if (url.search !== '') {
    event.queryStringParameters = {};
    event.multiValueQueryStringParameters = {};
    for (const [name, value] of url.searchParams) {
      event.queryStringParameters[name] = value;
      event.multiValueQueryStringParameters[name] = [
        ...(event.multiValueQueryStringParameters[name] ?? []),
        value,
      ];
    }
  }
  return event;
}

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

/** API Gateway's `$context.requestTime`: `21/Nov/2025:09:41:07 +0000`. */
function formatRequestTime(date: Date): string {
  const two = (value: number): string => String(value).padStart(2, '0');
  return (
    `${two(date.getUTCDate())}/${MONTHS[date.getUTCMonth()]}/${date.getUTCFullYear()}:` +
    `${two(date.getUTCHours())}:${two(date.getUTCMinutes())}:${two(date.getUTCSeconds())} +0000`
  );
}

/** Ids shaped like API Gateway's (`Lk4qVcsKoAMCFrQ=`): 11 random bytes, URL-safe base64, padded. */
function newGatewayId(): string {
  return `${randomBytes(11).toString('base64url')}=`;
}

function newConnectionId(inUse: ReadonlyMap<string, unknown>): string {
  let id = newGatewayId();
  while (inUse.has(id)) id = newGatewayId();
  return id;
}

function newRequestId(): string {
  return newGatewayId();
}

function toBuffer(data: RawData): Buffer {
  if (Buffer.isBuffer(data)) return data;
  return Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data);
}

function headerValue(headers: ConnectResult['headers'], name: string): string | undefined {
  if (headers === undefined) return undefined;
  const lower = name.toLowerCase();
  for (const [key, value] of Object.entries(headers)) {
    if (key.toLowerCase() === lower) return String(value);
  }
  return undefined;
}

/** A plain HTTP answer on the upgrade socket, then hang up (the handshake is refused). */
function refuseHandshake(
  socket: Duplex,
  statusCode: number,
  body: string,
  headers: ConnectResult['headers'] = {},
): void {
  if (socket.destroyed) return;
  const payload = Buffer.from(body, 'utf8');
  const lines = [`HTTP/1.1 ${statusCode} ${STATUS_CODES[statusCode] ?? 'Unknown'}`];
  let hasContentType = false;
  for (const [name, value] of Object.entries(headers)) {
    const lower = name.toLowerCase();
    if (lower === 'content-length' || HOP_BY_HOP_HEADERS.has(lower)) continue;
    if (lower === 'content-type') hasContentType = true;
    lines.push(`${name}: ${String(value).replace(/[\r\n]/g, ' ')}`);
  }
  if (!hasContentType) lines.push('Content-Type: application/json');
  lines.push(`Content-Length: ${payload.length}`, 'Connection: close', '', '');
  socket.once('finish', () => socket.destroy());
  socket.write(lines.join('\r\n'));
  socket.end(payload);
}

/** The request body, or undefined once it exceeds `limit` bytes. */
async function readBody(request: IncomingMessage, limit: number): Promise<Buffer | undefined> {
  const chunks: Buffer[] = [];
  let size = 0;
  let tooLarge = false;
  for await (const chunk of request as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) tooLarge = true;
    if (!tooLarge) chunks.push(chunk);
  }
  return tooLarge ? undefined : Buffer.concat(chunks);
}

/** Resolves once ws has handed the frame to the socket, so posts to one connection keep their order. */
function sendFrame(socket: WebSocket, data: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    socket.send(data, { binary: false }, (error) => (error ? reject(error) : resolve()));
  });
}

function closeSocket(socket: WebSocket): Promise<void> {
  if (socket.readyState === WebSocket.CLOSED) return Promise.resolve();
  return new Promise((resolve) => {
    const force = setTimeout(() => socket.terminate(), 1_000);
    socket.once('close', () => {
      clearTimeout(force);
      resolve();
    });
    socket.close(1001, 'Going away');
  });
}

function sendEmpty(response: ServerResponse, statusCode: number): void {
  response.writeHead(statusCode, { 'x-amzn-RequestId': randomUUID(), 'content-length': '0' });
  response.end();
}

function sendJson(response: ServerResponse, statusCode: number, body: unknown): void {
  const payload = JSON.stringify(body);
  response.writeHead(statusCode, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(payload),
    'x-amzn-RequestId': randomUUID(),
  });
  response.end(payload);
}

const SQS_CHANGE_VISIBILITY = 'AmazonSQS.ChangeMessageVisibilityBatch';

function sendError(response: ServerResponse, statusCode: number, errorType: string, message: string): void {
  response.setHeader('x-amzn-ErrorType', errorType);
  sendJson(response, statusCode, { message });
}

function describe(error: unknown): string {
  return error instanceof Error ? (error.stack ?? error.message) : String(error);
}
