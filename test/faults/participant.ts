/**
 * One user of the fault suite: a stock xmpp.js client (`@xmpp/client` 0.14), with or without
 * XEP-0198, reconnecting at once when its socket dies (xmpp.js's own reconnect with no delay;
 * with stream management it resumes, as `@xmpp/stream-management` does by itself), connected
 * through a killable relay (link.ts). Every numbered message it sends or receives goes into the
 * ledger.
 *
 * What counts as acknowledged:
 * - with stream management, what xmpp.js reports as acknowledged: counted in an `<a h/>` or a
 *   `<resumed h/>` it received (its `ack` event);
 * - without, a message is accepted once a ping sent after it on the same stream is answered
 *   with a result and no error came back for it: the server handles one stream's frames in
 *   order and posts its answers in order, so an error for the message would have arrived first.
 */
import { randomBytes } from 'node:crypto';
import { type Client, client as createClient, xml } from '@xmpp/client';
import type { Element } from 'ltx';
import WebSocket from 'ws';
import { type Channel, idOfBody, type Ledger, messageBody, messageId } from './ledger.ts';
import type { KillableLink } from './link.ts';

/** Every LARGE_EVERY-th message carries about 3 KB of random padding (see `sendNext`). */
const LARGE_EVERY = 5;
const PADDING = 'urn:nimbus:faults:padding';
const largePadding = () => randomBytes(2_400).toString('base64');

// @xmpp/websocket uses the global WebSocket, which Node has only from version 22.
(globalThis as { WebSocket?: unknown }).WebSocket ??= WebSocket;

const SM3 = 'urn:xmpp:sm:3';
const STREAMS = 'http://etherx.jabber.org/streams';
const DELAY = 'urn:xmpp:delay';
const STANZAS = 'urn:ietf:params:xml:ns:xmpp-stanzas';
/** The resource every client binds (its final login binds it too). */
export const RESOURCE = 'faults';
/** Pings (acceptance barriers of a client without stream management) every so many messages. */
const PING_EVERY = 4;
const PING_TIMEOUT_MS = 20_000;
/**
 * A client neither online nor changing status for this long has its socket dropped, so that it
 * reconnects and resumes; stuck once more, or stuck offline, it is started anew: its socket is
 * dropped and the client restarted with its XEP-0198 state kept, so that it resumes (a new
 * session only when the server answers `<failed/>`; the client then gets again what it had
 * received but not acknowledged, by design). Longer than two redelivery cycles of the
 * schedules' event source (function timeout 1 s + visibility timeout 2 s): a login whose frame timed out is waiting for its redelivery,
 * not stuck (xmpp.js's own reconnect meanwhile retries, resuming when it can).
 */
const STUCK_MS = 8_000;

/** The parts of xmpp.js's stream management state the suite reads (not in types/xmpp-client.d.ts). */
interface StreamManagementState {
  enabled: boolean;
  id: string;
  inbound: number;
  outbound: number;
  outbound_q: unknown[];
}

export interface ParticipantOptions {
  user: string;
  password: string;
  domain: string;
  streamManagement: boolean;
  link: KillableLink;
  ledger: Ledger;
  /** Something happened worth a line in a failure report. */
  trace: (line: string) => void;
}

/**
 * xmpp.js 0.14 gives its session up (`failed()`: the id emptied, the queue failed) on any error of
 * the `<resume/>` exchange, the send's included: a socket that dies just as the `<resume/>` goes
 * out (a kill, API Gateway's cut) ends a session the server still holds, and the next socket binds
 * anew and replaces it (its queue re-routed, behind later messages: duplicates and reorders; seed
 * 2 of session 8's runs). A session is lost only on the server's `<failed/>`: a `<resume/>` that
 * did not go out is tried again on the next socket. So the send's failure is kept from the
 * exchange (the suite's 'disconnect' listener then ends its wait). Pinned, with the client's own
 * behaviour, by test/unit/xmpp-js-resume.test.ts; the README's "Connecting a client" tells
 * applications.
 */
export function keepSessionWhenResumeUnsent(xmpp: Client, trace: (message: string) => void): void {
  const send = xmpp.send.bind(xmpp);
  xmpp.send = async (element: Element) => {
    if (!element.is('resume', SM3)) return send(element);
    try {
      await send(element);
    } catch (error) {
      trace(`<resume/> not sent (${(error as Error).message}); resumed on the next socket`);
    }
  };
}

/**
 * A restart keeps the client's XEP-0198 state (session id, counts, unacknowledged stanzas), as
 * Converse.js keeps it across a page reload: the restarted client resumes, and falls back to a new
 * session only on the server's `<failed/>`. xmpp.js 0.14 wipes that state (and fails its queue) on
 * every 'offline', and `stop()` emits one even on a client already offline (it passes through
 * 'close' and 'disconnect' first): seed 6 of a session-9 target run lost its session to the second
 * of two restarts 200 ms apart. So until the returned function is called (the client is online
 * again), every 'offline' is bracketed: the state is set aside before xmpp.js's listener runs (its
 * queue emptied, so that nothing is failed) and put back after it. Pinned, with the client's own
 * behaviour, by test/unit/xmpp-js-resume.test.ts.
 */
export function keepSessionAcrossRestarts(xmpp: Client, trace: (message: string) => void): () => void {
  const state = () => xmpp.streamManagement as unknown as StreamManagementState;
  let kept: { id: string; inbound: number; outbound: number; queue: unknown[] } | undefined;
  const setAside = () => {
    const sm = state();
    // A session the server refused (`<failed/>`) is gone: nothing to keep.
    kept = sm.id
      ? { id: sm.id, inbound: sm.inbound, outbound: sm.outbound, queue: sm.outbound_q }
      : undefined;
    sm.outbound_q = [];
  };
  const putBack = () => {
    if (!kept) return;
    const sm = state();
    sm.id = kept.id;
    sm.inbound = kept.inbound;
    sm.outbound = kept.outbound;
    sm.outbound_q = kept.queue;
    trace(`restarted with its session ${kept.id} (h=${kept.inbound}, ${kept.queue.length} unacknowledged)`);
  };
  xmpp.prependListener('offline', setAside);
  xmpp.on('offline', putBack);
  return () => {
    xmpp.removeListener('offline', setAside);
    xmpp.removeListener('offline', putBack);
  };
}

export class Participant {
  readonly user: string;
  readonly streamManagement: boolean;
  readonly xmpp: Client;
  /** Counts the streams it opened: 1 for the first session, +1 per reconnection (resumed or not). */
  stream = 0;
  private seq = 0;
  /** Without SM: the messages sent on the current stream since the last ping. */
  private unpinged: string[] = [];
  private readonly pings = new Set<Promise<unknown>>();
  resumes = 0;
  freshSessions = 0;
  private pingSeq = 0;
  private supervising = false;
  /** Ends the keeping of the XEP-0198 state across a restart (keepSessionAcrossRestart). */
  private releaseKeptSession: (() => void) | undefined;

  constructor(private readonly options: ParticipantOptions) {
    this.user = options.user;
    this.streamManagement = options.streamManagement;
    this.xmpp = createClient({
      service: options.link.url,
      domain: options.domain,
      resource: RESOURCE,
      credentials: async (authenticate: (c: object, m: string) => Promise<void>, mechanisms: string[]) => {
        await authenticate(
          { username: options.user, password: options.password },
          mechanisms.find((m) => m !== 'PLAIN') ?? 'PLAIN',
        );
      },
    });
    // "Resumed at once": xmpp.js waits a second by default.
    (this.xmpp.reconnect as unknown as { delay: number }).delay = 0;
    // xmpp.js 0.14 waits for the answer to a SASL step, an <enable/> or a <resume/> with a
    // listener on the client (`procedure` of @xmpp/events, the only 'nonza' listener), not on the
    // socket: when the socket dies first, the listener stays and answers the next socket's
    // exchange as well. A stale SCRAM step then sends a proof for the old nonce (the server
    // rightly answers <not-authorized/>, and xmpp.js stops reconnecting), and a stale <resume/>
    // takes the next <resumed/> too (`resumed` fires twice: the client resends its queue twice
    // and credits the server's count to stanzas it never sent). An application cannot reach into
    // that; the suite drops the stale listeners, so that what it measures is the server.
    this.xmpp.on('disconnect', () => {
      this.xmpp.removeAllListeners('nonza');
      // xmpp.js 0.14 queues what it sends once <enable/> is out; when the socket dies before
      // <enabled/> came, the session has no id to resume, yet the queue stays, and every later
      // enable then fails its "queue should be empty after enable" assertion: a new session on
      // each reconnect, for ever (seed 20 of a session-7 target run, 121 streams). Those stanzas
      // were never acknowledged (the ledger owes them nothing); the suite drops them as xmpp.js's
      // own failQueue would.
      if (this.streamManagement) {
        const sm = this.sm();
        if (!sm.id && sm.outbound_q.length > 0) {
          options.trace(
            `${this.user}: dropped ${sm.outbound_q.length} stanzas queued for an enable never answered`,
          );
          sm.outbound_q = [];
          sm.outbound = 0;
        }
      }
    });
    keepSessionWhenResumeUnsent(this.xmpp, (message) => options.trace(`${this.user}: ${message}`));
    this.xmpp.on('error', (error: Error) => options.trace(`${this.user}: xmpp.js error: ${error.message}`));
    if (!options.streamManagement) {
      // A client that never enables XEP-0198: it does not see the server offer it.
      this.xmpp.prependListener('element', (element: Element) => {
        if (element.is('features', STREAMS)) {
          element.children = element.children.filter(
            (child) => typeof child === 'string' || child.attrs.xmlns !== SM3,
          );
        }
      });
    } else {
      this.xmpp.prependListener('element', (element: Element) => this.checkAck(element));
      this.xmpp.streamManagement.on('ack', (stanza: Element) => {
        if (stanza.is('message') && stanza.attrs.id) options.ledger.acknowledge(stanza.attrs.id);
      });
      this.xmpp.streamManagement.on('fail', (stanza: Element) => {
        if (stanza.is('message') && stanza.attrs.id) options.ledger.fail(stanza.attrs.id);
      });
      this.xmpp.streamManagement.on('resumed', () => {
        this.stream += 1;
        this.resumes += 1;
        options.trace(`${this.user}: resumed as stream ${this.stream}`);
      });
    }
    // A new session (not a resume): say we are available, so bare-JID messages reach us.
    this.xmpp.on('online', () => {
      this.stream += 1;
      this.freshSessions += 1;
      this.unpinged = [];
      options.trace(`${this.user}: new session, stream ${this.stream}`);
      this.xmpp.send(xml('presence')).catch(() => {});
    });
    this.xmpp.on('stanza', (stanza: Element) => this.received(stanza));
  }

  private sm(): StreamManagementState {
    return this.xmpp.streamManagement as unknown as StreamManagementState;
  }

  /** XEP-0198 §4: an `h` above what the client sent is the server counting what it never got. */
  private checkAck(element: Element): void {
    if (!(element.is('a', SM3) || element.is('resumed', SM3))) return;
    const sm = this.sm();
    const h = Number(element.attrs.h);
    if (h - sm.outbound > sm.outbound_q.length) {
      const line = `${this.user}: server's <${element.name} h='${h}'/> counts more than the client sent (${sm.outbound} acknowledged + ${sm.outbound_q.length} queued)`;
      this.options.ledger.overcounts.push(line);
      this.options.trace(line);
    }
  }

  private received(stanza: Element): void {
    if (!stanza.is('message')) return;
    if (stanza.attrs.type === 'error') {
      const id = stanza.attrs.id as string | undefined;
      const condition =
        stanza
          .getChild('error')
          ?.getChildElements()
          .find((child) => child.attrs.xmlns === STANZAS)?.name ?? 'unknown';
      if (id) {
        this.options.ledger.refuse(id, condition);
        this.options.trace(`${this.user}: ${id} refused with ${condition}`);
      }
      return;
    }
    const id = idOfBody(stanza.getChildText('body'));
    if (id === undefined) return;
    const delays = stanza.getChildren('delay', DELAY);
    const channel: Channel =
      delays.length === 0
        ? 'online'
        : delays.some((delay) => delay.attrs.from === this.options.domain)
          ? 'offline'
          : 'resent';
    this.options.ledger.receive({
      id,
      recipient: this.user,
      at: Date.now(),
      channel,
      stream: `${this.user}#${this.stream}`,
    });
  }

  /**
   * Starts the client and keeps it connected, as an application would: xmpp.js reconnects by
   * itself when a socket dies, but gives up when a login fails (a SASL `<failure/>`, a bind
   * error). A client stuck in one status for `STUCK_MS` has its socket dropped (it reconnects
   * and resumes); stuck again, or stuck offline, it is stopped and started anew (a new session).
   */
  start(): void {
    this.supervising = true;
    let since = Date.now();
    let status = this.xmpp.status;
    /** The socket was dropped once already in this stuck spell. */
    let dropped = false;
    const watch = async (): Promise<void> => {
      while (this.supervising) {
        await sleep(100);
        if (this.online() || this.xmpp.status !== status) {
          since = Date.now();
          status = this.xmpp.status;
          dropped = false;
          continue;
        }
        if (Date.now() - since < STUCK_MS && status !== 'offline') continue;
        if (!dropped && status !== 'offline' && this.options.link.live()) {
          // What an application does with a login that makes no progress: drop the socket and
          // reconnect. xmpp.js reconnects by itself and resumes its session (a fresh start would
          // abandon it, and get again what it received but had not acknowledged).
          this.options.trace(`${this.user}: stuck in '${status}', dropping the socket`);
          this.options.link.kill('both', 0);
          dropped = true;
          since = Date.now();
          continue;
        }
        this.options.trace(`${this.user}: stuck in '${status}', starting anew`);
        dropped = false;
        this.keepSessionAcrossRestart();
        // Abruptly, as a restarted application leaves its socket: a `</stream>` would end the
        // session it is about to resume.
        if (this.options.link.live()) this.options.link.kill('both', 0);
        this.xmpp.reconnect.stop();
        await Promise.race([this.xmpp.stop().catch(() => {}), sleep(2_000)]);
        if (!this.supervising) return;
        this.xmpp.reconnect.start();
        this.xmpp
          .start()
          .catch((error: Error) => this.options.trace(`${this.user}: start failed: ${error.message}`));
        since = Date.now();
        status = this.xmpp.status;
      }
    };
    this.xmpp
      .start()
      .catch((error: Error) => this.options.trace(`${this.user}: start failed: ${error.message}`));
    void watch();
  }

  /** With SM, a restart keeps the client's XEP-0198 state (see keepSessionAcrossRestarts). */
  private keepSessionAcrossRestart(): void {
    if (!this.streamManagement || this.releaseKeptSession || !this.sm().id) return;
    const release = keepSessionAcrossRestarts(this.xmpp, (message) =>
      this.options.trace(`${this.user}: ${message}`),
    );
    // Online again (resumed, or a new session after <failed/>): xmpp.js's own rules from there.
    const back = () => this.releaseKeptSession?.();
    this.releaseKeptSession = () => {
      release();
      this.xmpp.removeListener('online', back);
      this.xmpp.streamManagement.removeListener('resumed', back);
      this.releaseKeptSession = undefined;
    };
    this.xmpp.on('online', back);
    this.xmpp.streamManagement.on('resumed', back);
  }

  online(): boolean {
    return this.xmpp.status === 'online' && this.options.link.live();
  }

  /** Waits until the client is online again; false after `timeoutMs`. */
  async waitOnline(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.online()) {
      if (Date.now() > deadline) return false;
      await sleep(5);
    }
    return true;
  }

  /** Stanzas sent but not yet acknowledged (SM), or messages not yet pinged (no SM). */
  unacknowledged(): number {
    return this.streamManagement ? this.sm().outbound_q.length : this.unpinged.length + this.pings.size;
  }

  /** Sends the next numbered message to `recipient` (bare JID); false when the send failed at once. */
  async sendNext(recipient: string): Promise<boolean> {
    this.seq += 1;
    const id = messageId(this.user, this.seq);
    const stream = this.stream;
    this.options.ledger.send({
      sender: this.user,
      recipient,
      seq: this.seq,
      sentAt: Date.now(),
      stream,
    });
    try {
      await this.xmpp.send(
        xml(
          'message',
          { to: `${recipient}@${this.options.domain}`, type: 'chat', id },
          xml('body', {}, messageBody(this.user, this.seq)),
          // Every fifth message is large: random text past SM_OWN_ITEM_BYTES even deflated, so a
          // recipient's XEP-0198 queue keeps it in an item of its own, under the same faults.
          ...(this.seq % LARGE_EVERY === 0 ? [xml('padding', { xmlns: PADDING }, largePadding())] : []),
        ),
      );
    } catch {
      return false;
    }
    if (!this.streamManagement) {
      this.unpinged.push(id);
      if (this.unpinged.length >= PING_EVERY) this.ping();
    }
    return true;
  }

  /** Without SM: a ping after the messages sent since the last one; its result accepts them. */
  ping(): void {
    if (this.streamManagement || this.unpinged.length === 0) return;
    const ids = this.unpinged;
    const stream = this.stream;
    this.unpinged = [];
    const ping = this.xmpp.iqCaller
      .request(
        xml('iq', { type: 'get', to: this.options.domain }, xml('ping', { xmlns: 'urn:xmpp:ping' })),
        PING_TIMEOUT_MS,
      )
      .then(
        () => {
          // An answer from another stream than the one the messages went out on proves nothing.
          if (this.stream !== stream) return;
          for (const id of ids)
            if (!this.options.ledger.get(id)?.refused) this.options.ledger.acknowledge(id);
        },
        () => {},
      );
    this.pings.add(ping);
    void ping.finally(() => this.pings.delete(ping));
  }

  /** Without SM: pings what is unpinged and waits for every ping in flight. */
  async settlePings(): Promise<void> {
    this.ping();
    await Promise.all([...this.pings]);
  }

  /**
   * With SM: tells the server what it received (`<a/>`, which XEP-0198 lets a party send at any
   * time) and waits until the server has handled it (a ping after it is answered: one stream's
   * frames are handled in order). xmpp.js sends its last `<a/>` only from its close hook, which a
   * close racing a reconnect skips; what the server never heard acknowledged would go to storage
   * when the session ends and arrive once more at the final login.
   */
  /** Online without stream management enabled (xmpp.js's enable never answered): nothing to acknowledge. */
  unacknowledging(): boolean {
    return this.streamManagement && this.online() && !this.sm().enabled;
  }

  async acknowledgeReceived(timeoutMs: number): Promise<boolean> {
    if (!this.streamManagement) return true;
    if (!this.online() || !this.sm().enabled) return false;
    try {
      await this.xmpp.send(xml('a', { xmlns: SM3, h: String(this.sm().inbound) }));
      await this.pingCounted(timeoutMs);
      return true;
    } catch {
      return false;
    }
  }

  /**
   * A ping whose answer XEP-0198 counts. xmpp.js 0.14's iqCaller takes the answer to a request it
   * made in its own middleware and stops there, before the stream-management middleware that
   * counts inbound stanzas (registered after it): the client's `h` then falls one short per answer
   * (seed 6 of session 8's target run: the final `<a h='196'/>` after 197 stanzas received, so the
   * server re-routed the last one to storage and the final login got it again). This ping goes
   * out with an id of its own, which iqCaller passes on, and its answer is watched for on the
   * connection's 'stanza' event.
   */
  private pingCounted(timeoutMs: number): Promise<void> {
    this.pingSeq += 1;
    const id = `${this.user}-ack-ping-${this.pingSeq}`;
    const answered = new Promise<void>((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        this.xmpp.removeListener('stanza', onStanza);
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error('ping unanswered'));
      }, timeoutMs);
      const onStanza = (stanza: Element) => {
        if (!stanza.is('iq') || stanza.attrs.id !== id) return;
        done();
        if (stanza.attrs.type === 'result') resolve();
        else reject(new Error(`ping answered with ${stanza.attrs.type}`));
      };
      this.xmpp.on('stanza', onStanza);
    });
    answered.catch(() => {});
    return this.xmpp
      .send(xml('iq', { type: 'get', to: this.options.domain, id }, xml('ping', { xmlns: 'urn:xmpp:ping' })))
      .then(() => answered);
  }

  /** A clean end: `</close>` (after a last `<a/>` with SM); the server ends the session. */
  async stop(): Promise<void> {
    this.supervising = false;
    this.releaseKeptSession?.();
    this.xmpp.reconnect.stop();
    await Promise.race([this.xmpp.stop().catch(() => {}), sleep(5_000)]);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
