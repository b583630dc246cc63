/**
 * The bench's client process: stock xmpp.js clients (`@xmpp/client`), two per pair, logged in
 * over the runner's gateway. Each pair passes `window` chat messages back and forth (a
 * receiver answers each message with the pair's next one) until it has exchanged its share.
 * Every body carries its send time; the receiver, in this same process and clock, takes the
 * difference. The runner's `go` separates the warm-up from the measured messages.
 */
import { pbkdf2, randomUUID } from 'node:crypto';
import { createRequire } from 'node:module';
import { promisify } from 'node:util';
import { client as createClient, xml } from '@xmpp/client';
import type { Element } from 'ltx';
import WebSocket from 'ws';
import type { ClientPlan, ClientResult, FromClients, ToClients } from './ipc.ts';

// @xmpp/websocket uses the global WebSocket, which Node gets only from version 22.
(globalThis as { WebSocket?: unknown }).WebSocket ??= WebSocket;

/**
 * xmpp.js's SCRAM-SHA-1 (package `sasl-scram-sha-1`) computes Hi() as 4096 awaited WebCrypto
 * HMACs, about 0.5 s of this process per login here: half a minute before every run. Hi() is
 * PBKDF2-HMAC-SHA-1 with one 20-byte block (RFC 5802 §2.2), so Node's native PBKDF2 gives the
 * same bytes; the rest of the client's SCRAM exchange is untouched. The client's own CPU is
 * never counted as the server's.
 */
const scramPrimitives = createRequire(import.meta.url)('sasl-scram-sha-1/lib/bitops.js') as {
  Hi: (text: string, salt: Uint8Array, iterations: number) => Promise<Uint8Array>;
};
const pbkdf2Async = promisify(pbkdf2);
scramPrimitives.Hi = async (text, salt, iterations) =>
  new Uint8Array(await pbkdf2Async(text, salt, iterations, 20, 'sha1'));

const NS_STREAMS = 'http://etherx.jabber.org/streams';
const NS_SM3 = 'urn:xmpp:sm:3';
const LOGIN_CONCURRENCY = 10;
const SM_ENABLE_WAIT_MS = 5_000;
const WARMUP_TIMEOUT_MS = 60_000;
const RESUME_PAUSE_MS = 300;

type XmppClient = ReturnType<typeof createClient>;

interface BenchClient {
  xmpp: XmppClient;
  bare: string;
  peer?: BenchClient;
  pair: PairState;
}

interface PairState {
  sent: number;
  delivered: number;
  target: number;
  phase: 'warmup' | 'measured';
  done: () => void;
}

let smAdvertised = false;
let clients: BenchClient[] = [];
let latenciesMs: number[] = [];
let errors = 0;
let phaseStarted = 0;
let lastDelivery = 0;
let plan: ClientPlan | undefined;
/** A client that loses its stream before `stop` makes the run fail at once instead of timing out. */
let stopping = false;
/** While the resume phase closes sockets on purpose. */
let resuming = false;
let lost: ((error: Error) => void) | undefined;
const lostStream = new Promise<never>((_, reject) => {
  lost = reject;
});
lostStream.catch(() => {});

function report(message: FromClients): void {
  process.send?.(message);
}

function plainMessage(to: string, n: number, body: string): Element {
  return xml('message', { to, type: 'chat', id: `b${n}` }, xml('body', {}, body));
}

/** Filler after the timing fields (about 28 characters): a chat line of about 70 characters in all. */
const CHAT_LINE = 'see you at the usual place around eight, ok?';

/**
 * A chat message as Converse.js sends one (src/headless/shared/model-with-messages.js,
 * `createMessageStanza`): UUID id, body, XEP-0085 `<active/>`, XEP-0184 `<request/>` and
 * XEP-0359 `<origin-id/>` with a UUID of its own.
 */
function converseMessage(to: string, body: string): Element {
  return xml(
    'message',
    { to, type: 'chat', id: randomUUID() },
    xml('body', {}, `${body} ${CHAT_LINE}`),
    xml('active', { xmlns: 'http://jabber.org/protocol/chatstates' }),
    xml('request', { xmlns: 'urn:xmpp:receipts' }),
    xml('origin-id', { xmlns: 'urn:xmpp:sid:0', id: randomUUID() }),
  );
}

function sendNext(from: BenchClient, reserved?: { n: number; phase: string }): void {
  const to = from.peer;
  if (!to) return;
  const { pair } = from;
  // A reply sent after a pause (--interval) was counted when it was scheduled, in its phase: one
  // whose phase is over is not sent.
  if (reserved && reserved.phase !== pair.phase) return;
  const n = reserved ? reserved.n : ++pair.sent;
  const body = `${pair.phase} ${n} ${performance.now()}`;
  from.xmpp
    .send(plan?.payload === 'converse' ? converseMessage(to.bare, body) : plainMessage(to.bare, n, body))
    .catch(() => {
      errors += 1;
    });
}

function onStanza(receiver: BenchClient, stanza: Element): void {
  if (stanza.name !== 'message') return;
  if (stanza.attrs.type === 'error') {
    errors += 1;
    return;
  }
  const body = stanza.getChildText('body');
  if (!body) return;
  const [phase, , sentAt] = body.split(' ');
  const { pair } = receiver;
  if (phase !== pair.phase) return;
  const now = performance.now();
  if (phase === 'measured') {
    latenciesMs.push(now - Number(sentAt));
    lastDelivery = now;
  }
  pair.delivered += 1;
  if (pair.sent < pair.target) {
    // A chat's pace (--interval): the reply after a pause, counted now so that a window of
    // several in flight sends no more than the target.
    if (plan?.intervalMs) {
      const reserved = { n: ++pair.sent, phase: pair.phase };
      setTimeout(() => sendNext(receiver, reserved), plan.intervalMs).unref();
    } else sendNext(receiver);
  }
  if (pair.delivered === pair.target) pair.done();
}

async function startClient(username: string, password: string, domain: string, url: string, sm: boolean) {
  const xmpp = createClient({
    service: url,
    domain,
    resource: 'bench',
    credentials: async (authenticate: (c: object, m: string) => Promise<void>, mechanisms: string[]) => {
      await authenticate({ username, password }, mechanisms.find((m) => m !== 'PLAIN') ?? 'PLAIN');
    },
  });
  xmpp.reconnect.stop();
  // --ack-debounce: how long xmpp.js waits after what it sent before its <r/> (its default 250 ms).
  // (A property of @xmpp/stream-management's object since 0.14 that its type declarations omit.)
  if (plan?.ackDebounceMs !== undefined)
    (xmpp.streamManagement as unknown as { requestAckDebounce: number }).requestAckDebounce =
      plan.ackDebounceMs;
  let lastError = '';
  xmpp.on('error', (error: Error) => {
    lastError = error.message;
  });
  xmpp.on('disconnect', () => {
    if (!stopping && !resuming)
      lost?.(new Error(`${username} lost its stream${lastError ? `: ${lastError}` : ''}`));
  });
  // Runs before xmpp.js's own listener, so its stream-management module never sees the
  // feature when the run is without it (xmpp.js enables SM whenever the server offers it).
  xmpp.prependListener('element', (element: Element) => {
    if (!element.is('features', NS_STREAMS) || !element.getChild('sm', NS_SM3)) return;
    smAdvertised = true;
    if (!sm) element.children = element.children.filter((child) => !isSm3(child));
  });
  await xmpp.start();
  return xmpp;
}

function isSm3(child: unknown): boolean {
  const element = child as Element;
  return typeof element === 'object' && element.name === 'sm' && element.attrs?.xmlns === NS_SM3;
}

async function inBatches<T>(items: T[], size: number, run: (item: T) => Promise<void>): Promise<void> {
  for (let i = 0; i < items.length; i += size) await Promise.all(items.slice(i, i + size).map(run));
}

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function login(current: ClientPlan): Promise<void> {
  const { users, domain, url, streamManagement } = current;
  const started: BenchClient[] = new Array(users.length);
  await inBatches(
    users.map((user, index) => ({ user, index })),
    LOGIN_CONCURRENCY,
    async ({ user, index }) => {
      const xmpp = await startClient(user.username, user.password, domain, url, streamManagement);
      started[index] = { xmpp, bare: `${user.username}@${domain}`, pair: idlePair() };
    },
  );
  clients = started;
  for (let i = 0; i + 1 < clients.length; i += 2) {
    const a = clients[i] as BenchClient;
    const b = clients[i + 1] as BenchClient;
    a.peer = b;
    b.peer = a;
  }
  for (const client of clients) client.xmpp.on('stanza', (stanza: Element) => onStanza(client, stanza));
}

function idlePair(): PairState {
  return { sent: 0, delivered: 0, target: 0, phase: 'warmup', done: () => {} };
}

/** Initial presence makes each session available; the ping answer proves the server handled it. */
async function goAvailable(): Promise<void> {
  await inBatches(clients, LOGIN_CONCURRENCY, async (client) => {
    await client.xmpp.send(xml('presence'));
    await client.xmpp.iqCaller.request(
      xml('iq', { type: 'get', to: plan?.domain }, xml('ping', { xmlns: 'urn:xmpp:ping' })),
      10_000,
    );
  });
}

async function smEnabledCount(): Promise<number> {
  const deadline = Date.now() + SM_ENABLE_WAIT_MS;
  for (;;) {
    const enabled = clients.filter((client) => client.xmpp.streamManagement.enabled).length;
    if (enabled === clients.length || Date.now() > deadline) return enabled;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Runs one phase over every pair; resolves when all pairs are done (or the timeout passes). */
async function exchange(phase: PairState['phase'], perPair: number, window: number, timeoutMs: number) {
  const pairs: Promise<void>[] = [];
  for (let i = 0; i + 1 < clients.length; i += 2) {
    const a = clients[i] as BenchClient;
    const b = clients[i + 1] as BenchClient;
    pairs.push(
      new Promise<void>((done) => {
        const state: PairState = { sent: 0, delivered: 0, target: perPair, phase, done };
        a.pair = state;
        b.pair = state;
        if (perPair === 0) done();
        // The window's messages start from both sides in turn.
        for (let w = 0; w < Math.min(window, perPair); w++) sendNext(w % 2 === 0 ? a : b);
      }),
    );
  }
  let timedOut = false;
  await withTimeout(Promise.race([Promise.all(pairs), lostStream]), timeoutMs, `the ${phase} phase`).catch(
    (error: Error) => {
      if (!error.message.includes('took longer')) throw error;
      timedOut = true;
    },
  );
  return timedOut;
}

/**
 * Keepalives as an idle always-online client sends them: an XEP-0199 ping to the server, its
 * answer awaited (or with SM an `<r/>`, answered `<a/>`), then a pause (longer than xmpp.js's 250 ms `<r/>` debounce, so that with SM
 * each ping brings its own `<r/>` and `<a/>`, as pings minutes apart would).
 */
async function keepalives(perClient: number, gapMs: number, element: 'ping' | 'r'): Promise<number> {
  let pings = 0;
  await Promise.all(
    clients.map(async (client) => {
      for (let i = 0; i < perClient; i++) {
        if (element === 'r') {
          // The server's <a/> comes back within the gap; xmpp.js takes it.
          await client.xmpp.send(xml('r', { xmlns: NS_SM3 }));
        } else {
          await client.xmpp.iqCaller.request(
            xml('iq', { type: 'get', to: plan?.domain }, xml('ping', { xmlns: 'urn:xmpp:ping' })),
            10_000,
          );
        }
        pings += 1;
        await new Promise((resolve) => setTimeout(resolve, gapMs));
      }
    }),
  );
  return pings;
}

/**
 * What API Gateway's 2-hour cut costs an SM client: the socket closes without `</stream>` (the
 * server detaches the session on `$disconnect`), and the stock client reconnects, logs in
 * again (SCRAM) and sends `<resume/>` instead of binding.
 */
async function resumeAll(): Promise<number> {
  let resumes = 0;
  resuming = true;
  try {
    await inBatches(clients, LOGIN_CONCURRENCY, async (client) => {
      const { xmpp } = client;
      // The socket closes without `<close/>` (xmpp.js's `disconnect()` would close the stream
      // first, and the server would end the session).
      await (xmpp as unknown as { _closeSocket(): Promise<void> })._closeSocket();
      // Let the $disconnect reach the server first, as it does when API Gateway cuts the socket.
      await new Promise((resolve) => setTimeout(resolve, RESUME_PAUSE_MS));
      const resumed = new Promise<void>((resolve, reject) => {
        xmpp.streamManagement.once('resumed', () => resolve());
        xmpp.once('error', reject);
      });
      await xmpp.reconnect.reconnect();
      await withTimeout(resumed, 10_000, `${client.bare}'s resumption`);
      resumes += 1;
    });
  } finally {
    resuming = false;
  }
  return resumes;
}

async function stopAll(): Promise<void> {
  stopping = true;
  await Promise.all(clients.map((client) => withTimeout(client.xmpp.stop(), 5_000, 'stop').catch(() => {})));
}

process.on('message', (message: ToClients) => {
  const handle = async () => {
    switch (message.type) {
      case 'start': {
        // The login phase: open, SASL SCRAM, bind, and with SM <enable/>.
        plan = message.plan;
        await withTimeout(login(plan), plan.timeoutMs, 'logging in');
        if (plan.streamManagement && !smAdvertised) {
          report({ type: 'skip', reason: `the server does not advertise <sm xmlns='${NS_SM3}'/>` });
          return;
        }
        const smEnabled = plan.streamManagement ? await smEnabledCount() : 0;
        if (plan.streamManagement && smEnabled < clients.length) {
          throw new Error(`stream management enabled on ${smEnabled} of ${clients.length} clients`);
        }
        report({ type: 'logged-in', clients: clients.length, smAdvertised, smEnabled });
        return;
      }
      case 'warmup': {
        const current = plan;
        if (!current) throw new Error('warmup before start');
        await withTimeout(goAvailable(), current.timeoutMs, 'initial presence');
        if (
          await exchange(
            'warmup',
            current.warmupPerPair,
            current.window,
            // With --interval a warm-up message takes its pause too.
            Math.min(current.timeoutMs, WARMUP_TIMEOUT_MS + current.warmupPerPair * current.intervalMs),
          )
        ) {
          throw new Error('the warm-up did not finish');
        }
        report({ type: 'ready' });
        return;
      }
      case 'ping': {
        const current = plan;
        if (!current) throw new Error('ping before start');
        const pings = await withTimeout(
          keepalives(message.perClient, message.gapMs, message.element),
          current.timeoutMs,
          'the keepalive pings',
        );
        report({ type: 'pinged', pings });
        return;
      }
      case 'resume': {
        const current = plan;
        if (!current) throw new Error('resume before start');
        const resumes = await withTimeout(resumeAll(), current.timeoutMs, 'the resumptions');
        report({ type: 'resumed', resumes });
        return;
      }
      case 'go': {
        const current = plan;
        if (!current) throw new Error('go before start');
        latenciesMs = [];
        errors = 0;
        phaseStarted = performance.now();
        lastDelivery = phaseStarted;
        const timedOut = await exchange(
          'measured',
          current.messagesPerPair,
          current.window,
          current.timeoutMs,
        );
        const result: ClientResult = {
          sent: sumOfPairs((pair) => pair.sent),
          delivered: latenciesMs.length,
          errors,
          latenciesMs,
          elapsedMs: lastDelivery - phaseStarted,
          timedOut,
        };
        report({ type: 'done', result });
        return;
      }
      case 'stop':
        await stopAll();
        report({ type: 'stopped' });
        return;
    }
  };
  handle().catch((error: unknown) => {
    report({ type: 'failed', message: error instanceof Error ? error.message : String(error) });
  });
});

function sumOfPairs(value: (pair: PairState) => number): number {
  let sum = 0;
  for (let i = 0; i < clients.length; i += 2) sum += value((clients[i] as BenchClient).pair);
  return sum;
}

process.on('disconnect', () => process.exit(0));
