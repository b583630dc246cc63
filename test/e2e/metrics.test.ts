/**
 * Business metrics end to end: raw RFC 7395 clients and a stock xmpp.js client through the local
 * gateway, the real handlers and DynamoDB Local. The local stack hands every embedded metric
 * format line to the test (as the functions write them to stdout on AWS); each scenario checks
 * the counts it caused. The last part checks what an operator reads locally: the same metric
 * lines at debug level on stderr, and log lines that carry the frame's context but never a
 * password or a SASL payload.
 */
import type { Element } from 'ltx';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { RawClient } from '../../infra/local/raw-client.ts';
import { createLogger } from '../../shared/log.ts';
import type { MetricName } from '../../shared/metrics.ts';
import { eventually } from '../support/eventually.ts';
import { intercept, throttlingError } from '../support/intercept.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';
import { type StartedClient, startClient } from '../support/xmpp-client.ts';

const SASL = 'urn:ietf:params:xml:ns:xmpp-sasl';
const SM3 = 'urn:xmpp:sm:3';
const PASSWORD = 'correct horse battery staple';

// biome-ignore lint/suspicious/noExplicitAny: EMF documents are JSON read back by the test.
type Emf = Record<string, any>;

let stack: TestStack;
let lines: string[] = [];
const raws: RawClient[] = [];
const clients: StartedClient[] = [];

/** The sum of `name` over every line since the last reset (or `from`), for one value of its dimension. */
function total(name: MetricName, dimensionValue?: string, from: string[] = lines): number {
  let sum = 0;
  for (const line of from) {
    const document: Emf = JSON.parse(line);
    const [directive] = document._aws.CloudWatchMetrics;
    if (!directive.Metrics.some((m: { Name: string }) => m.Name === name)) continue;
    const own = (directive.Dimensions[0] as string[]).filter((d) => d !== 'service' && d !== 'domain');
    if (dimensionValue !== undefined && document[own[0] as string] !== dimensionValue) continue;
    sum += document[name];
  }
  return sum;
}

async function raw(): Promise<RawClient> {
  const client = await RawClient.connect(stack.url);
  raws.push(client);
  return client;
}

async function online(user: string, resource: string): Promise<RawClient> {
  const client = await raw();
  await client.login(user, PASSWORD, resource);
  return client;
}

function plain(user: string, password: string): string {
  return `<auth xmlns='${SASL}' mechanism='PLAIN'>${Buffer.from(`\0${user}\0${password}`).toString('base64')}</auth>`;
}

beforeAll(async () => {
  stack = await startTestStack({}, { metricLines: (line) => lines.push(line) });
  for (const user of ['alice', 'bob', 'carol', 'dave']) await stack.addUser(`${user}@localhost`, PASSWORD);
});

afterEach(() => {
  lines = [];
});

afterAll(async () => {
  for (const client of raws) client.terminate();
  await Promise.all(clients.map((client) => client.stop()));
  // Let the clients' last frames finish before the gateway goes (they would be retried against it).
  await new Promise((resolve) => setTimeout(resolve, 200));
  await stack?.gateway.drained();
  await stack?.close();
});

describe('logins', () => {
  it('counts handshakes, frames, successful logins by mechanism and failures by condition', async () => {
    const wrong = await raw();
    await wrong.open();
    wrong.send(plain('alice', 'wrong'));
    expect((await wrong.next()).name).toBe('failure');
    await online('alice', 'metrics-1');
    const scram = await startClient(stack.url, 'bob', PASSWORD, { mechanism: 'SCRAM-SHA-1' });
    clients.push(scram);
    await eventually(() => {
      expect(total('LoginFailures', 'not-authorized')).toBe(1);
      expect(total('Logins', 'PLAIN')).toBe(1);
      expect(total('Logins', 'SCRAM-SHA-1')).toBe(1);
      expect(total('ConnectionsOpened')).toBe(3);
      expect(total('FramesIn')).toBeGreaterThanOrEqual(10);
    });
  });

  it('counts a handshake refused for want of the xmpp subprotocol (left out of the IntegrationErrors alarm)', async () => {
    // RFC 7395 §3.3.1: the client offers "xmpp" in Sec-WebSocket-Protocol; one that does not is
    // refused at the handshake, which API Gateway counts as an integration 4XX.
    await expect(RawClient.connect(stack.url, [])).rejects.toThrow();
    await eventually(() => expect(total('HandshakesRefused')).toBe(1));
    expect(total('ConnectionsOpened')).toBe(0);
  });

  it('counts a stream error by condition', async () => {
    const client = await raw();
    client.send("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='elsewhere.example' version='1.0'/>");
    await client.closed;
    await eventually(() => expect(total('StreamErrors', 'host-unknown')).toBe(1));
  });
});

describe('messages', () => {
  it('counts a message stored offline, flooded at login, and one delivered online', async () => {
    const alice = await online('alice', 'messages');
    alice.send(
      "<message to='carol@localhost' type='chat' id='m1'><body>while you were away</body></message>",
    );
    await eventually(() => expect(total('MessagesStoredOffline')).toBe(1));
    const carol = await online('carol', 'phone');
    carol.send('<presence/>');
    await carol.until((el) => el.name === 'message' && el.getChildText('body') === 'while you were away');
    // The flood is over (its hold released) before the next message: sent earlier, it would be
    // stored behind the hold and flooded too.
    await eventually(() => expect(total('MessagesFlooded')).toBe(1));
    alice.send(
      "<message to='carol@localhost/phone' type='chat' id='m2'><body>now you are here</body></message>",
    );
    await carol.until((el) => el.name === 'message' && el.getChildText('body') === 'now you are here');
    await eventually(() => {
      expect(total('MessagesFlooded')).toBe(1);
      expect(total('MessagesDelivered')).toBe(1);
      expect(total('StanzasIn', 'message')).toBe(2);
      expect(total('StanzasIn', 'presence')).toBe(1);
      expect(total('StanzasOut', 'message')).toBe(2);
    });
  });

  it('counts XEP-0013 and XEP-0136 requests by action', async () => {
    const dave = await online('dave', 'requests');
    dave.send(
      "<iq type='get' id='c1'><query xmlns='http://jabber.org/protocol/disco#info' node='http://jabber.org/protocol/offline'/></iq>",
    );
    await dave.until((el) => el.attrs.id === 'c1');
    dave.send("<iq type='get' id='a1'><list xmlns='http://jabber.org/protocol/archive'/></iq>");
    await dave.until((el) => el.attrs.id === 'a1');
    await eventually(() => {
      expect(total('OfflineRequests', 'count')).toBe(1);
      expect(total('ArchiveRequests', 'list')).toBe(1);
    });
  });
});

describe('stream management', () => {
  it('counts enables, a refused and a successful resumption, and the stanzas re-routed at a close', async () => {
    const first = await online('dave', 'sm');
    first.send(`<enable xmlns='${SM3}' resume='true'/>`);
    const enabled = await first.until((el) => el.name === 'enabled');
    first.terminate();

    const bogus = await raw();
    await bogus.open();
    bogus.send(plain('dave', PASSWORD));
    await bogus.until((el) => el.name === 'success');
    await bogus.open();
    bogus.send(`<resume xmlns='${SM3}' previd='no-such-session' h='0'/>`);
    expect((await bogus.until((el) => el.name === 'failed')).getChildElements()[0]?.name).toBe(
      'item-not-found',
    );

    const second = await raw();
    await second.open();
    second.send(plain('dave', PASSWORD));
    await second.until((el) => el.name === 'success');
    await second.open();
    // The terminated socket's $disconnect detaches the session; a resume may race it.
    await eventually(async () => {
      second.send(`<resume xmlns='${SM3}' previd='${enabled.attrs.id}' h='0'/>`);
      const answer: Element = await second.until((el) => el.name === 'resumed' || el.name === 'failed');
      expect(answer.name).toBe('resumed');
    });

    // A stanza the client never acknowledges goes to offline storage when the stream closes.
    const alice = await online('alice', 'sm-sender');
    alice.send("<message to='dave@localhost/sm' type='chat' id='r1'><body>unacknowledged</body></message>");
    await second.until((el) => el.name === 'message');
    second.send("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>");
    await second.closed;
    await eventually(() => {
      expect(total('SmEnabled', 'sm3')).toBe(1);
      expect(total('SmResumeFailed', 'item-not-found')).toBeGreaterThanOrEqual(1);
      expect(total('SmResumed')).toBe(1);
      expect(total('StanzasRerouted')).toBe(1);
      expect(total('MessagesStoredOffline')).toBe(1);
    });
  });
});

describe('what the local stack prints', () => {
  afterEach(() => vi.restoreAllMocks());

  it('prints the same metric lines on stderr at debug level, and log lines with the frame context', async () => {
    const logLines: string[] = [];
    const printed: string[] = [];
    vi.spyOn(process.stderr, 'write').mockImplementation((chunk: unknown) => {
      printed.push(String(chunk));
      return true;
    });
    const debug = await startTestStack(
      {},
      { log: createLogger('debug', { write: (line) => logLines.push(line) }) },
    );
    try {
      await debug.addUser('erin@localhost', PASSWORD);
      const client = await RawClient.connect(debug.url);
      raws.push(client);
      const jid = await client.login('erin', PASSWORD, 'debug');
      client.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>");
      await client.until((el) => el.attrs.id === 'p1');
      await eventually(() => {
        const emf = printed.filter((line) => line.startsWith('{"_aws"')).map((line) => JSON.parse(line));
        expect(emf.some((document) => document.Logins === 1 && document.mechanism === 'PLAIN')).toBe(true);
      });
      const entries = logLines.map((line) => JSON.parse(line));
      const ping = entries.find((entry) => entry.message === 'frame handled' && entry.element === 'iq');
      expect(ping).toMatchObject({
        level: 'debug',
        jid: 'erin@localhost',
        connectionId: expect.any(String),
        requestId: expect.any(String),
      });
      expect(jid.startsWith('erin@localhost/')).toBe(true);
      // Never the password, nor the SASL payload that carries it.
      const payload = Buffer.from(`\0erin\0${PASSWORD}`).toString('base64');
      for (const line of [...logLines, ...printed]) {
        expect(line).not.toContain(PASSWORD);
        expect(line).not.toContain(payload);
      }
    } finally {
      await debug.close();
    }
  });

  it('prints no metric lines above debug level', async () => {
    const printed: string[] = [];
    vi.spyOn(process.stderr, 'write').mockImplementation((chunk: unknown) => {
      printed.push(String(chunk));
      return true;
    });
    const quiet = await startTestStack({}, { log: createLogger('info', { write: () => {} }) });
    try {
      const client = await RawClient.connect(quiet.url);
      raws.push(client);
      await client.open();
      await new Promise((resolve) => setTimeout(resolve, 200));
    } finally {
      await quiet.close();
    }
    expect(printed.filter((line) => line.includes('"_aws"'))).toEqual([]);
  });
});

describe('frames the queue gives up on', () => {
  it("count as dead-lettered at the emulator's maxReceiveCount, as the stack's FRAME_MAX_RECEIVES makes them on AWS", async () => {
    const own: string[] = [];
    const short = await startTestStack(
      {},
      {
        metricLines: (line) => own.push(line),
        log: createLogger('error', { write: () => {} }),
        eventSource: { maxReceiveCount: 2, visibilityTimeoutMs: 5_000 },
      },
    );
    // Every read of the connection's row is throttled past the SDK's retries: each receive of
    // the stream's first frame fails (transient, so the function hands it back to the queue).
    const restore = intercept(short.server.sessions, 'getConnection', async () => {
      throw throttlingError();
    });
    try {
      const client = await RawClient.connect(short.url);
      raws.push(client);
      client.send("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>");
      await eventually(() => expect(short.gateway.deadLetters()).toHaveLength(1), 15_000);
      await eventually(() => expect(total('FramesDeadLettered', undefined, own)).toBe(1));
      // The first receive handed back (retried), the second, the last, dead-lettered: not
      // counted as retried twice, nor the connection's later frames held behind it.
      expect(total('FramesRetried', undefined, own)).toBe(1);
    } finally {
      restore();
      await short.close();
    }
  }, 30_000);
});
