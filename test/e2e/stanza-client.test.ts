/**
 * A second, independent client library end to end: the stock `stanza` client (StanzaJS 12.22.1,
 * as an application uses it: `createClient`, its own SASL, bind, roster and XEP-0198 code) against
 * the local stack, with a stock xmpp.js peer. RFC 7395 framing, RFC 6120 SASL and bind, RFC 6121
 * roster versioning, messages and presence, XEP-0198 acknowledgements and resumption.
 *
 * StanzaJS in Node uses the `ws` package (its platform/node), so it needs no global WebSocket.
 * Every frame it writes or reads is recorded from its `raw` event, every other event from `*`:
 * the tests wait for frames and events, never for a fixed time.
 */
import { xml } from '@xmpp/client';
import { type Element, parse } from 'ltx';
import { type Agent, type AgentConfig, createClient } from 'stanza';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type WebSocket from 'ws';
import { eventually } from '../support/eventually.ts';
import { scramClientFinal } from '../support/scram-client.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';
import { type StartedClient, startClient } from '../support/xmpp-client.ts';

const SASL = 'urn:ietf:params:xml:ns:xmpp-sasl';
const BIND = 'urn:ietf:params:xml:ns:xmpp-bind';
const FRAMING = 'urn:ietf:params:xml:ns:xmpp-framing';
const ROSTER = 'jabber:iq:roster';
const STANZAS = 'urn:ietf:params:xml:ns:xmpp-stanzas';
const SM3 = 'urn:xmpp:sm:3';
const DELAY = 'urn:xmpp:delay';

/** How long a test waits for one frame or event: generous, for a loaded machine. */
const WAIT = 10_000;

type Direction = 'incoming' | 'outgoing';
type Match = (element: Element) => boolean;

interface Frame {
  direction: Direction;
  text: string;
  element: Element;
}

interface AgentEvent {
  name: string;
  args: unknown[];
}

/** A stock StanzaJS agent and everything it sent, received and emitted, in order. */
class StanzaUnderTest {
  readonly frames: Frame[] = [];
  readonly events: AgentEvent[] = [];
  private readonly waiters = new Set<() => void>();

  constructor(readonly agent: Agent) {
    agent.on('raw', (direction: Direction, text: string) => {
      this.frames.push({ direction, text, element: parse(text) });
      this.wake();
    });
    (agent as unknown as { on(name: '*', listener: (name: string, ...args: unknown[]) => void): void }).on(
      '*',
      (name, ...args) => {
        if (name.startsWith('raw')) return;
        this.events.push({ name, args });
        this.wake();
      },
    );
  }

  private wake(): void {
    for (const wake of this.waiters) wake();
  }

  /** The WebSocket under the agent's current transport (a `ws` socket in Node). */
  get socket(): WebSocket {
    return (this.agent.transport as unknown as { socket: WebSocket }).socket;
  }

  incoming(match: Match = () => true, from = 0): Element[] {
    return this.frames
      .slice(from)
      .filter((f) => f.direction === 'incoming' && match(f.element))
      .map((f) => f.element);
  }

  outgoing(match: Match = () => true, from = 0): Element[] {
    return this.frames
      .slice(from)
      .filter((f) => f.direction === 'outgoing' && match(f.element))
      .map((f) => f.element);
  }

  private wait<T>(find: () => T | undefined, describe: () => string, timeoutMs: number): Promise<T> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const found = find();
        if (found === undefined) return;
        this.waiters.delete(check);
        clearTimeout(timer);
        resolve(found);
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`${describe()} within ${timeoutMs} ms; frames:\n${this.transcript()}`));
      }, timeoutMs);
      this.waiters.add(check);
      check();
    });
  }

  /** The first frame in `direction` matching, at or after frame index `from`. */
  frame(direction: Direction, match: Match, from = 0, timeoutMs = WAIT): Promise<Element> {
    return this.wait(
      () => this.frames.slice(from).find((f) => f.direction === direction && match(f.element))?.element,
      () => `no ${direction} frame matching`,
      timeoutMs,
    );
  }

  /** The first event `name` (whose first argument matches) at or after event index `from`. */
  event<T = unknown>(
    name: string,
    match: (arg: T) => boolean = () => true,
    from = 0,
    timeoutMs = WAIT,
  ): Promise<T> {
    return this.wait(
      () => {
        const found = this.events.slice(from).find((e) => e.name === name && match(e.args[0] as T));
        return found ? ({ value: found.args[0] as T } as const) : undefined;
      },
      () => `no '${name}' event`,
      timeoutMs,
    ).then((found) => found.value);
  }

  transcript(): string {
    return this.frames.map((f) => `${f.direction === 'incoming' ? '<-' : '->'} ${f.text}`).join('\n');
  }

  /**
   * `agent.disconnect()`: StanzaJS writes `<close/>` and waits for the server's before closing
   * the socket, but only 1 s (a timer its WebSocket transport sets as it writes `<close/>`). On a
   * loaded machine the answer can take longer, and StanzaJS would then drop the socket before it
   * came: that one timer is given 10 s here. Resolves once the agent is disconnected.
   */
  async disconnect(): Promise<void> {
    const from = this.events.length;
    const setTimer = globalThis.setTimeout;
    globalThis.setTimeout = ((run: () => void, ms?: number) =>
      setTimer(run, ms === 1000 ? 10_000 : ms)) as typeof setTimeout;
    try {
      this.agent.disconnect();
    } finally {
      globalThis.setTimeout = setTimer;
    }
    await this.event('disconnected', () => true, from, 15_000);
  }

  /** A clean close, if the agent still has a stream. */
  async stop(): Promise<void> {
    if (this.agent.transport) await this.disconnect().catch(() => {});
  }
}

let stack: TestStack;
const stanzaClients: StanzaUnderTest[] = [];
const xmppClients: StartedClient[] = [];

const USERS = [
  'ann',
  'ben',
  'cleo',
  'dan',
  'eve',
  'fay',
  'gus',
  'hal',
  'ivy',
  'jon',
  'kim',
  'lou',
  'max',
  'nia',
];

beforeAll(async () => {
  stack = await startTestStack();
  for (const user of USERS) await stack.addUser(`${user}@localhost`, `${user}-pw`);
});

afterAll(async () => {
  await Promise.all([...stanzaClients.map((c) => c.stop()), ...xmppClients.map((c) => c.stop())]);
  // Every <close/> and $disconnect handled (their posts made) before the gateway stops listening.
  await stack?.gateway.drained();
  await stack?.close();
});

/**
 * Logs a stock StanzaJS agent in as `user` and binds `resource`. With stream management (its
 * default), also waits until it is enabled: StanzaJS sends `<enable/>` after bind, past
 * `session:started`.
 */
async function stanzaLogin(
  user: string,
  resource: string,
  config: AgentConfig = {},
): Promise<StanzaUnderTest> {
  const agent = createClient({
    jid: `${user}@localhost`,
    password: `${user}-pw`,
    resource,
    server: 'localhost',
    transports: { websocket: stack.url, bosh: false },
    ...config,
  });
  const client = new StanzaUnderTest(agent);
  stanzaClients.push(client);
  agent.connect();
  await client.event('session:started');
  if (config.useStreamManagement !== false) {
    await client.event<{ type: string }>('sm', (sm) => sm.type === 'enabled');
  }
  return client;
}

async function xmppLogin(user: string, resource: string): Promise<StartedClient> {
  const client = await startClient(stack.url, user, `${user}-pw`, { resource });
  xmppClients.push(client);
  return client;
}

const text = (element: Element | undefined) => Buffer.from(element?.getText() ?? '', 'base64').toString();
const isMessage =
  (id: string): Match =>
  (el) =>
    el.name === 'message' && el.attrs.id === id;
const isStanza = (el: Element) => ['message', 'presence', 'iq'].includes(el.name);

/** Waits until the server has seen the socket go and keeps the XEP-0198 session for its window. */
async function detached(smId: string): Promise<void> {
  await eventually(async () => {
    const item = await stack.server.smQueue.get(smId);
    expect(item?.ended).toBeFalsy();
    expect(item?.connectionId).toBeUndefined();
  });
}

/**
 * `user` (StanzaJS) and `contact` (xmpp.js), both available, subscribe to each other through
 * their own APIs (RFC 6121 §3.1: each request is answered with 'subscribed').
 */
async function mutualSubscription(user: StanzaUnderTest, contact: StartedClient): Promise<void> {
  const userBare = user.agent.jid.split('/')[0] as string;
  const contactBare = contact.jid.split('/')[0] as string;
  const from = user.events.length;
  user.agent.subscribe(contactBare);
  await contact.waitFor(
    (s) => s.is('presence') && s.attrs.type === 'subscribe' && s.attrs.from === userBare,
    WAIT,
  );
  await contact.xmpp.send(xml('presence', { to: userBare, type: 'subscribed' }));
  await contact.xmpp.send(xml('presence', { to: userBare, type: 'subscribe' }));
  await user.event<{ from: string }>('subscribe', (p) => p.from === contactBare, from);
  user.agent.acceptSubscription(contactBare);
  await contact.waitFor(
    (s) => s.is('presence') && s.attrs.type === 'subscribed' && s.attrs.from === userBare,
    WAIT,
  );
  await eventually(async () =>
    expect((await stack.server.roster.getEntry(userBare, contactBare))?.subscription).toBe('both'),
  );
}

/** Sends StanzaJS's initial presence and waits for the server's echo of it (RFC 6121 §4.2.2). */
async function available(client: StanzaUnderTest, presence: Parameters<Agent['sendPresence']>[0] = {}) {
  const from = client.events.length;
  client.agent.sendPresence(presence);
  await client.event<{ from: string }>('available', (p) => p.from === client.agent.jid, from);
}

async function xmppAvailable(client: StartedClient): Promise<void> {
  await client.xmpp.send(xml('presence'));
  await client.waitFor((s) => s.is('presence') && s.attrs.from === client.jid && !s.attrs.type, WAIT);
}

describe('a stock StanzaJS client (stanza 12.22.1)', () => {
  it('logs in with SCRAM-SHA-256, the best mechanism offered, and binds the resource it asked for', async () => {
    const ann = await stanzaLogin('ann', 'desk', { useStreamManagement: false });
    // RFC 7395 §3.1: the client offers the subprotocol 'xmpp' and the server's handshake answer
    // names it (Sec-WebSocket-Protocol: xmpp).
    expect(ann.socket.protocol).toBe('xmpp');
    // RFC 6120 §6.3.3: the server offers its mechanisms, the client picks one. StanzaJS ranks
    // SCRAM-SHA-256 above SCRAM-SHA-1 and PLAIN (no -PLUS over WebSocket).
    const features = ann.incoming((el) => el.name === 'stream:features')[0];
    expect(
      features
        ?.getChild('mechanisms', SASL)
        ?.getChildren('mechanism')
        .map((m) => m.getText()),
    ).toEqual(['SCRAM-SHA-256', 'SCRAM-SHA-1', 'PLAIN']);
    const [auth] = ann.outgoing((el) => el.is('auth', SASL));
    expect(auth?.attrs.mechanism).toBe('SCRAM-SHA-256');
    expect(ann.events.some((e) => e.name === 'auth:success')).toBe(true);
    // RFC 5802 §5: the client-first message is "n,,n=user,r=<nonce>", and the client
    // authenticates the server by comparing the ServerSignature it computes with the 'v=' of the
    // server's last message (here the <success/>). StanzaJS 12.22.1 never makes that check (its
    // sasl plugin does not call the mechanism's finalize()), so this test does, with an
    // independent SCRAM client, which must also compute the very proof StanzaJS sent.
    const clientFirst = text(auth);
    expect(clientFirst).toMatch(/^n,,n=ann,r=[^,]+$/);
    const serverFirst = text(ann.incoming((el) => el.is('challenge', SASL))[0]);
    expect(serverFirst).toMatch(/^r=[^,]+,s=[A-Za-z0-9+/=]+,i=4096$/);
    const expected = scramClientFinal({ hash: 'sha256', password: 'ann-pw', clientFirst, serverFirst });
    expect(text(ann.outgoing((el) => el.is('response', SASL))[0])).toBe(expected.message);
    expect(text(ann.incoming((el) => el.is('success', SASL))[0])).toBe(expected.expectedServerFinal);
    // RFC 6120 §6.4.6: after <success/> the client restarts the stream; RFC 7395 §3.7: with an
    // <open/>, which the server answers with one of its own, carrying a new stream id.
    const opens = ann.incoming((el) => el.is('open', FRAMING));
    expect(opens).toHaveLength(2);
    expect(opens[1]?.attrs.id).not.toBe(opens[0]?.attrs.id);
    // RFC 6120 §7.7: the client asks for a resource; the server binds it and returns the full JID.
    const [bind] = ann.outgoing((el) => el.name === 'iq' && el.getChild('bind', BIND) !== undefined);
    expect(bind?.getChild('bind', BIND)?.getChildText('resource')).toBe('desk');
    const [bound] = ann.incoming((el) => el.name === 'iq' && el.attrs.id === bind?.attrs.id);
    expect(bound?.attrs.type).toBe('result');
    expect(bound?.getChild('bind', BIND)?.getChildText('jid')).toBe('ann@localhost/desk');
    expect(ann.agent.jid).toBe('ann@localhost/desk');
    // The session is the bound one: the server routes to that full JID.
    expect((await stack.server.sessions.getResource('ann@localhost', 'desk'))?.connectionId).toBeDefined();
  });

  it('gets a versioned roster; a roster set changes the version and comes back as a push (RFC 6121 §2.6)', async () => {
    const ben = await stanzaLogin('ben', 'desk');
    // §2.6.2: "If the client has not yet cached the roster or the cache is lost or corrupted, but
    // the client wishes to bootstrap the use of roster versioning, it MUST set the 'ver'
    // attribute to the empty string (i.e., ver="")." StanzaJS sends its config.rosterVer.
    ben.agent.config.rosterVer = '';
    const first = await ben.agent.getRoster();
    expect(
      ben.outgoing((el) => el.getChild('query', ROSTER) !== undefined)[0]?.getChild('query')?.attrs.ver,
    ).toBe('');
    expect(first.items).toEqual([]);
    const ver1 = first.version as string;
    expect(ver1).toBeTypeOf('string');
    expect(ver1).not.toBe('');

    // §2.3.2 / §2.1.6: a roster set is pushed to every interested resource, the requesting one
    // included, with the new 'ver'; the client answers the push with a result. StanzaJS's
    // RosterItem type makes the application give a 'subscription'; §2.1.2.5: "in a roster set
    // the server MUST ignore all values of the 'subscription' attribute other than 'remove'".
    const beforeSet = ben.frames.length;
    const updates = ben.events.length;
    await ben.agent.updateRosterItem({
      jid: 'lou@localhost',
      name: 'Lou',
      groups: ['Friends'],
      subscription: 'both',
    });
    expect(
      ben.outgoing((el) => el.name === 'iq' && el.attrs.type === 'set', beforeSet)[0]?.toString(),
    ).toContain(`subscription="both"`);
    const push = await ben.frame(
      'incoming',
      (el) => el.name === 'iq' && el.attrs.type === 'set' && el.getChild('query', ROSTER) !== undefined,
      beforeSet,
    );
    const ver2 = push.getChild('query')?.attrs.ver as string;
    expect(ver2).toBeTypeOf('string');
    expect(ver2).not.toBe(ver1);
    const item = push.getChild('query')?.getChild('item');
    expect(item?.attrs).toMatchObject({ jid: 'lou@localhost', name: 'Lou', subscription: 'none' });
    expect(item?.getChildText('group')).toBe('Friends');
    // StanzaJS took it as a push ('roster:update') and answered it.
    const update = await ben.event<{ roster: { version: string } }>('roster:update', () => true, updates);
    expect(update.roster.version).toBe(ver2);
    await ben.frame(
      'outgoing',
      (el) => el.name === 'iq' && el.attrs.id === push.attrs.id && el.attrs.type === 'result',
    );

    // §2.6.3: "the server MUST either return the complete roster as described under Section 2.1.4
    // (including a 'ver' attribute that signals the latest version) or return an empty
    // IQ-result". With the current version: the empty result.
    ben.agent.config.rosterVer = ver2;
    const beforeCurrent = ben.frames.length;
    expect(await ben.agent.getRoster()).toEqual({ items: [] });
    const [unchanged] = ben.incoming((el) => el.name === 'iq' && el.attrs.type === 'result', beforeCurrent);
    expect(unchanged?.children).toHaveLength(0);
    // With the old one: the whole roster, at the current version.
    ben.agent.config.rosterVer = ver1;
    const stale = await ben.agent.getRoster();
    expect(stale.version).toBe(ver2);
    expect(stale.items).toEqual([
      expect.objectContaining({
        jid: 'lou@localhost',
        name: 'Lou',
        groups: ['Friends'],
        subscription: 'none',
      }),
    ]);
  });

  it('exchanges messages both ways with an xmpp.js client: body, id and extensions as sent', async () => {
    const cleo = await stanzaLogin('cleo', 'desk');
    const dan = await xmppLogin('dan', 'phone');
    await available(cleo);

    // Characters XML must escape, and others outside ASCII, survive both libraries' serialisers.
    const tricky = `<b>&amp; "quotes" 'apostrophes' — ünïcödé 🚀`;
    const id = cleo.agent.sendMessage({
      to: 'dan@localhost/phone',
      type: 'chat',
      body: tricky,
      id: 'from-stanza-1',
    });
    expect(id).toBe('from-stanza-1');
    const atDan = await dan.waitFor((s) => s.is('message') && s.attrs.id === 'from-stanza-1', WAIT);
    // RFC 6120 §8.1.2.1: the server stamps 'from' with the sender's full JID.
    expect(atDan.attrs).toMatchObject({
      from: 'cleo@localhost/desk',
      to: 'dan@localhost/phone',
      type: 'chat',
    });
    expect(atDan.getChildText('body')).toBe(tricky);
    // StanzaJS adds a XEP-0359 <origin-id/>; the server passes extensions through untouched.
    expect(atDan.getChild('origin-id', 'urn:xmpp:sid:0')?.attrs.id).toBe('from-stanza-1');

    // RFC 6121 §8.5.2.1.1: a chat to the bare JID goes to the available resource.
    const before = cleo.events.length;
    await dan.xmpp.send(
      xml('message', { to: 'cleo@localhost', type: 'chat', id: 'from-xmpp-js-1' }, xml('body', {}, tricky)),
    );
    const atCleo = await cleo.event<{ id: string; from: string; to: string; body: string; type: string }>(
      'message',
      (m) => m.id === 'from-xmpp-js-1',
      before,
    );
    expect(atCleo).toMatchObject({
      from: 'dan@localhost/phone',
      to: 'cleo@localhost',
      type: 'chat',
      body: tricky,
    });
    // Exactly once, with nothing left in offline storage.
    await cleo.agent.ping();
    expect(cleo.incoming(isMessage('from-xmpp-js-1'))).toHaveLength(1);
    expect(await stack.server.offline.count('cleo@localhost')).toBe(0);
  });

  it('enables XEP-0198 and the two sides agree on every count, acknowledged both ways', async () => {
    const eve = await stanzaLogin('eve', 'desk');
    const fay = await xmppLogin('fay', 'phone');
    // §3: "If the client wants to be allowed to resume the stream, it includes a boolean 'resume'
    // attribute" (StanzaJS writes '1'); "the server MUST reply with an <enabled/> element".
    const [enable] = eve.outgoing((el) => el.is('enable', SM3));
    expect(['1', 'true']).toContain(enable?.attrs.resume);
    const [enabled] = eve.incoming((el) => el.is('enabled', SM3));
    expect(enabled?.attrs).toMatchObject({ resume: 'true', max: '300' });
    expect(eve.agent.sm.id).toBe(enabled?.attrs.id);
    const afterEnable = eve.frames.findIndex((f) => f.element.is('enable', SM3));

    // The client's stanzas: StanzaJS asks for an ack (<r/>) after each one it sends. §4: "The
    // 'h' attribute identifies the last handled stanza (i.e., the last stanza that the server
    // will acknowledge as having received)".
    for (let i = 1; i <= 5; i++) eve.agent.sendMessage({ to: fay.jid, type: 'chat', body: `to fay ${i}` });
    await fay.waitFor((s) => s.getChildText('body') === 'to fay 5', WAIT);
    const sent = () => eve.outgoing(isStanza, afterEnable).length;
    const answers = () => eve.incoming((el) => el.is('a', SM3)).map((a) => Number(a.attrs.h));
    await eventually(() => expect(answers().at(-1)).toBe(sent()));
    expect(sent()).toBe(5);
    expect(eve.outgoing((el) => el.is('r', SM3), afterEnable)).toHaveLength(5);
    expect(answers()).toEqual([...answers()].sort((a, b) => a - b));
    await eventually(() => expect(eve.agent.sm.unacked).toEqual([]));
    expect(eve.agent.sm.lastAck).toBe(5);
    expect(eve.events.filter((e) => e.name === 'message:acked')).toHaveLength(5);
    // The server's own count of what it handled from this stream, as saved with the connection.
    const row = await stack.server.sessions.getResource('eve@localhost', 'desk');
    const connection = await stack.server.sessions.getConnection(row?.connectionId as string);
    expect(connection?.sm?.inbound).toBe(5);

    // The server's stanzas: it asks for acks in batches (SM_ACK_EVERY, 10), StanzaJS answers each
    // <r/> with its count. "Either party MAY send an <a/> element at any time": a last unasked
    // one settles the rest.
    for (let i = 1; i <= 12; i++) {
      await fay.xmpp.send(
        xml('message', { to: 'eve@localhost/desk', type: 'chat' }, xml('body', {}, `to eve ${i}`)),
      );
    }
    await eve.event<{ body: string }>('message', (m) => m.body === 'to eve 12');
    await eve.frame('incoming', (el) => el.is('r', SM3));
    await eventually(() =>
      expect(eve.outgoing((el) => el.is('a', SM3)).length).toBe(eve.incoming((el) => el.is('r', SM3)).length),
    );
    eve.agent.sm.ack();
    await eventually(async () => {
      const queue = await stack.server.smQueue.get(eve.agent.sm.id as string);
      // Everything the server sent on this session (the 12 messages) was counted by StanzaJS
      // and acknowledged: nothing is left to resend.
      expect(queue?.out).toBe(eve.agent.sm.handled);
      expect(queue?.base).toBe(eve.agent.sm.handled);
      expect(queue?.entries).toEqual([]);
    });
    expect(eve.agent.sm.handled).toBe(12);
    // No stanza was refused, nor the stream ended, for any of this.
    expect(eve.incoming((el) => el.is('failed', SM3) || el.name === 'stream:error')).toEqual([]);
  });

  it('resumes after the socket is cut without </close>: a message sent meanwhile arrives once, in the same session', async () => {
    const gus = await stanzaLogin('gus', 'desk');
    const hal = await xmppLogin('hal', 'phone');
    // Directed presence (RFC 6121 §4.6): hal would be told if gus's session ended (§4.6.3).
    gus.agent.sendPresence({ to: 'hal@localhost/phone' });
    await hal.waitFor((s) => s.is('presence') && s.attrs.from === 'gus@localhost/desk', WAIT);
    const smId = gus.agent.sm.id as string;
    expect(smId).toBeTruthy();

    // The socket dies: no <close/>, no WebSocket close frame (ws's terminate() destroys it).
    const beforeCut = gus.events.length;
    gus.socket.terminate();
    await gus.event('disconnected', () => true, beforeCut);
    // XEP-0198 §7: "If the stream is not cleanly closed then the server SHOULD consider the
    // stream to be unfinished ... and SHOULD maintain the session on behalf of the client for a
    // limited amount of time."
    await detached(smId);
    await hal.xmpp.send(
      xml(
        'message',
        { to: 'gus@localhost/desk', type: 'chat', id: 'while-away' },
        xml('body', {}, 'are you there?'),
      ),
    );
    // hal's ping is answered after its message was routed: into the session's queue, not offline.
    await hal.stanzasBeforePong(WAIT);
    expect(
      (await stack.server.smQueue.get(smId))?.entries.map((e) => parse(e.s ?? '<x/>').attrs.id),
    ).toContain('while-away');
    expect(await stack.server.offline.count('gus@localhost')).toBe(0);

    // StanzaJS kept its XEP-0198 state (id, counts): connecting again, it resumes.
    const beforeResume = gus.frames.length;
    const resumedFrom = gus.events.length;
    gus.agent.connect();
    const resumed = await gus.event<{ previousSession: string; handled: number }>(
      'stream:management:resumed',
      () => true,
      resumedFrom,
    );
    // §5: <resumed previd='...' h='...'/>: the old session, and the server's count of gus's
    // stanzas (the directed presence).
    expect(resumed.previousSession).toBe(smId);
    expect(resumed.handled).toBe(1);
    // "Upon receiving a <resume/> or <resumed/> element the client and server use the 'h'
    // attribute to retransmit any stanzas lost by the disconnection": hal's message, once.
    const message = await gus.frame('incoming', isMessage('while-away'), beforeResume);
    expect(message.attrs.from).toBe('hal@localhost/phone');
    expect(message.getChildText('body')).toBe('are you there?');
    // Held while the session was detached, it carries the time it was first queued (XEP-0203).
    expect(message.getChild('delay', DELAY)?.attrs.from).toBe('localhost');
    // The same session: no new bind, the same full JID, the same stream-management id.
    expect(gus.outgoing((el) => el.getChild('bind', BIND) !== undefined, beforeResume)).toEqual([]);
    expect(gus.agent.jid).toBe('gus@localhost/desk');
    expect(gus.agent.sm.id).toBe(smId);
    // Nothing more comes after a ping's answer: no second copy.
    await gus.agent.ping();
    expect(gus.incoming(isMessage('while-away'))).toHaveLength(1);
    // hal was never told gus went away: the session never ended.
    const atHal = await hal.stanzasBeforePong(WAIT);
    expect(atHal.filter((s) => s.is('presence') && s.attrs.type === 'unavailable')).toEqual([]);
  });

  it('closes cleanly: the server answers </close>, the contact sees it unavailable, the full JID is gone', async () => {
    const ivy = await stanzaLogin('ivy', 'desk');
    const jon = await xmppLogin('jon', 'phone');
    await available(ivy, { status: 'here' });
    await xmppAvailable(jon);
    await mutualSubscription(ivy, jon);
    // RFC 6121 §3.1.5: once subscribed, jon gets ivy's current presence.
    await jon.waitFor(
      (s) => s.is('presence') && s.attrs.from === 'ivy@localhost/desk' && !s.attrs.type,
      WAIT,
    );
    const smId = ivy.agent.sm.id as string;

    // RFC 7395 §3.6: the closing party sends <close/>; the stream is closed when the other
    // party's <close/> comes back. StanzaJS's 'stream:end' event says the server's came (without
    // it StanzaJS drops the socket itself, with no such event).
    const beforeClose = ivy.frames.length;
    const events = ivy.events.length;
    await ivy.disconnect();
    expect(ivy.events.slice(events).map((e) => e.name)).toContain('stream:end');
    expect(ivy.outgoing((el) => el.is('close', FRAMING), beforeClose)).toHaveLength(1);
    expect(ivy.incoming((el) => el.is('close', FRAMING), beforeClose)).toHaveLength(1);

    // XEP-0198 §7: "If a client wishes to cleanly close its stream and end its session, it MUST
    // send a </stream:stream> so that the server can send unavailable presence on the client's
    // behalf."
    const gone = await jon.waitFor(
      (s) => s.is('presence') && s.attrs.from === 'ivy@localhost/desk' && s.attrs.type === 'unavailable',
      WAIT,
    );
    expect(gone.attrs.to).toBe('jon@localhost');
    // The session ended: it is not kept for a resumption, and its resource is free.
    await eventually(async () => {
      expect((await stack.server.smQueue.get(smId))?.ended).toBe(true);
      expect(await stack.server.sessions.getResource('ivy@localhost', 'desk')).toBeUndefined();
    });
    // RFC 6121 §8.5.3.2.3: an iq to a full JID that matches no resource is answered
    // <service-unavailable/>.
    await jon.xmpp.send(
      xml(
        'iq',
        { to: 'ivy@localhost/desk', type: 'get', id: 'after-close' },
        xml('ping', { xmlns: 'urn:xmpp:ping' }),
      ),
    );
    const refused = await jon.waitFor((s) => s.is('iq') && s.attrs.id === 'after-close', WAIT);
    expect(refused.attrs.type).toBe('error');
    expect(refused.getChild('error')?.getChild('service-unavailable', STANZAS)).toBeDefined();
    // §8.5.3.2.1: a chat to that full JID is handled as if to the bare JID: with no resource
    // online, offline storage (XEP-0160).
    const stored = await stack.server.offline.count('ivy@localhost');
    await jon.xmpp.send(
      xml(
        'message',
        { to: 'ivy@localhost/desk', type: 'chat', id: 'after-close-msg' },
        xml('body', {}, 'later'),
      ),
    );
    await eventually(async () => expect(await stack.server.offline.count('ivy@localhost')).toBe(stored + 1));
  });

  it('probes on initial presence: a new StanzaJS session gets its contact’s presence, and the contact gets its own (RFC 6121 §4.2)', async () => {
    const first = await stanzaLogin('kim', 'desk');
    const lou = await xmppLogin('lou', 'phone');
    await available(first);
    await xmppAvailable(lou);
    await mutualSubscription(first, lou);
    await lou.xmpp.send(xml('presence', {}, xml('show', {}, 'dnd'), xml('status', {}, 'in a meeting')));
    await lou.waitFor((s) => s.getChildText('status') === 'in a meeting', WAIT);

    // A second session of kim's, bound but not yet available, is sent nobody's presence.
    const kim = await stanzaLogin('kim', 'laptop');
    await kim.agent.ping();
    expect(kim.incoming((el) => el.name === 'presence')).toEqual([]);
    // §4.2.2: on the user's initial presence the server broadcasts it to the contacts subscribed
    // to it and probes those the user is subscribed to; §4.3.2: the answer to a probe is "the
    // full XML of the last presence stanza" from each of the contact's available resources.
    const beforeInitial = kim.events.length;
    kim.agent.sendPresence({ show: 'chat', status: 'free to talk', priority: 5 });
    const probed = await kim.event<{ from: string; show?: string; status?: string }>(
      'available',
      (p) => p.from === 'lou@localhost/phone',
      beforeInitial,
    );
    expect(probed).toMatchObject({ show: 'dnd', status: 'in a meeting' });
    const atLou = await lou.waitFor(
      (s) => s.is('presence') && s.attrs.from === 'kim@localhost/laptop' && !s.attrs.type,
      WAIT,
    );
    expect(atLou.getChildText('show')).toBe('chat');
    expect(atLou.getChildText('status')).toBe('free to talk');
    expect(atLou.getChildText('priority')).toBe('5');
    // The user's other resource sees it too (§4.2.2), and kim/laptop sees kim/desk.
    await first.event<{ from: string }>('available', (p) => p.from === 'kim@localhost/laptop');
    await kim.event<{ from: string }>('available', (p) => p.from === 'kim@localhost/desk', beforeInitial);
    // Once each: nothing is repeated after a ping's answer.
    await kim.agent.ping();
    expect(
      kim.incoming((el) => el.name === 'presence' && el.attrs.from === 'lou@localhost/phone'),
    ).toHaveLength(1);
  });

  // A StanzaJS quirk, and what the server does with it: StanzaJS 12.22.1 closes without a last
  // <a/>, so a stanza it received but was never asked to acknowledge is, for the server,
  // unacknowledged when the session ends.
  it('re-routes what StanzaJS received but never acknowledged before its clean close: it comes again at the next login (XEP-0198 §4)', async () => {
    const max = await stanzaLogin('max', 'desk');
    const nia = await xmppLogin('nia', 'phone');
    await available(max);
    const before = max.events.length;
    await nia.xmpp.send(
      xml('message', { to: 'max@localhost', type: 'chat', id: 'unacked' }, xml('body', {}, 'got it?')),
    );
    await max.event<{ id: string }>('message', (m) => m.id === 'unacked', before);
    // Fewer stanzas than SM_ACK_EVERY: the server never asked, and StanzaJS never volunteered.
    expect(max.outgoing((el) => el.is('a', SM3))).toEqual([]);
    await max.disconnect();
    expect(max.incoming((el) => el.is('close', FRAMING))).toHaveLength(1);
    // §4: "It is RECOMMENDED that initiating entities (usually clients) send an <a/> element
    // right before they gracefully close the stream, in order to inform the peer about received
    // stanzas. Otherwise it can happen that stanzas are re-sent (usually by the server) although
    // they were actually received." And "A server SHOULD treat unacknowledged stanzas in the
    // same way that it would treat a stanza sent to an unavailable resource": offline storage.
    await eventually(async () => expect(await stack.server.offline.count('max@localhost')).toBe(1));
    const again = await stanzaLogin('max', 'laptop');
    const flood = again.events.length;
    await available(again);
    await again.event<{ id: string }>('message', (m) => m.id === 'unacked', flood);
    await again.agent.ping();
    const stored = again.incoming(isMessage('unacked'));
    expect(stored).toHaveLength(1);
    expect(stored[0]?.getChild('delay', DELAY)?.attrs.from).toBe('localhost');

    // What an application can do: acknowledge (sm.ack(), an <a/> with its count) before
    // disconnect(). StanzaJS's disconnect() writes <close/> ahead of anything still queued, so
    // the <a/> must be out first.
    const next = again.events.length;
    await nia.xmpp.send(
      xml('message', { to: 'max@localhost', type: 'chat', id: 'acked' }, xml('body', {}, 'and this?')),
    );
    await again.event<{ id: string }>('message', (m) => m.id === 'acked', next);
    const beforeAck = again.frames.length;
    again.agent.sm.ack();
    const ack = await again.frame('outgoing', (el) => el.is('a', SM3), beforeAck);
    expect(Number(ack.attrs.h)).toBe(again.agent.sm.handled);
    await again.disconnect();
    // Every frame handled, the close included: nothing was left to store.
    await stack.gateway.drained();
    expect(await stack.server.offline.count('max@localhost')).toBe(0);
  });
});
