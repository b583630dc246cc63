/**
 * Seeded fuzzing over raw RFC 7395 frames: four streams of three accounts send stanzas drawn by
 * test/support/fuzz.ts (every namespace Nimbus serves, hostile attribute values, bad JIDs) at
 * each other and at the server, while each client behaves as a client should (answers `<r/>`,
 * answers iq requests addressed to it). What must hold, whatever was sent:
 *
 * - RFC 6120 §8.2.3: "an entity that receives an IQ request of type "get" or "set" MUST reply
 *   with an IQ response of type "result" or "error"": every iq get or set the fuzzers send is
 *   answered exactly once (unless a stream error ended its stream first).
 * - Bad input gets an XMPP error, never a failure of the server: no `internal-server-error`
 *   (the router's answer to a handler that threw), no error logged, no stack trace in a frame,
 *   no stream closed without a stream error, and only stream errors a client's input explains.
 * - Nothing leaks across users: what a fifth account keeps (an offline message, a roster
 *   item's name, an archived collection) and what one fuzzer keeps privately (a roster item's
 *   name) never reaches another account's stream; and nothing the fuzzers sent changes the
 *   fifth account's data: its offline message, roster item and collection are all still there.
 *
 * `FUZZ_SEEDS=1,2,3 FUZZ_COUNT=2000 npx vitest run test/e2e/fuzz.test.ts` (`npm run fuzz`) runs
 * longer and other seeds; `npm test` runs seeds 1 to 3 with 300 stanzas each.
 */
import { type Element, parse } from 'ltx';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RawClient } from '../../infra/local/raw-client.ts';
import type { Logger } from '../../shared/log.ts';
import { NS, StanzaFuzzer, seeded } from '../support/fuzz.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

const SEEDS = (process.env.FUZZ_SEEDS ?? '1,2,3').split(',').map((seed) => Number(seed.trim()));
const COUNT = Number(process.env.FUZZ_COUNT ?? 300);
const DOMAIN = 'localhost';
const STREAMS = 'urn:ietf:params:xml:ns:xmpp-streams';
/** Stream errors a client's own input explains (RFC 6120 §4.9.3, XEP-0198 §4's count too high). */
const EXPLAINED_STREAM_ERRORS = new Set([
  'unsupported-stanza-type',
  'undefined-condition',
  'policy-violation',
  'invalid-namespace',
  'invalid-from',
  'bad-format',
  'not-authorized',
  'conflict',
]);

const USERS = ['fza', 'fzb', 'fzc'].map((u) => `${u}@${DOMAIN}`);
/** Never fuzzed: its data must come through untouched and unseen. */
const KEEPER = `fzd@${DOMAIN}`;
/** Not in the fuzzers' JID pool, so nobody removes or renames its roster items by chance. */
const SECRET_CONTACT = `secret-contact@${DOMAIN}`;
const SECRETS = {
  keeperOffline: 'SECRET-OFFLINE-7f3a',
  keeperRoster: 'SECRET-ROSTER-c41d',
  keeperArchive: 'SECRET-ARCHIVE-9be2',
  fzaRoster: 'SECRET-ROSTER-FZA-55e0',
};
/** Who may see each secret: the accounts that wrote it or received it. */
const MAY_SEE: Record<string, ReadonlySet<string>> = {
  [SECRETS.keeperOffline]: new Set([KEEPER, USERS[1] as string]),
  [SECRETS.keeperRoster]: new Set([KEEPER]),
  [SECRETS.keeperArchive]: new Set([KEEPER]),
  [SECRETS.fzaRoster]: new Set([USERS[0] as string]),
};

interface Seat {
  user: string;
  resource: string;
  /** Enable XEP-0198 after bind (urn:xmpp:sm:3). */
  wantsSm: boolean;
  client: RawClient;
  /** XEP-0198 namespace once `<enabled/>` came (a fuzzed `<enable/>` may turn it on), and the inbound count. */
  sm?: string;
  inbound: number;
  fuzzer: StanzaFuzzer;
  pending: Map<string, string>;
  /** The answer each request got, by id. */
  answered: Map<string, string>;
  /** What this seat sent, by id, and its last frame (for a failure's message). */
  sent: Map<string, string>;
  last?: string;
  barriers: number;
}

const errorLines: string[] = [];
const recordingLog: Logger = {
  debug() {},
  info() {},
  warn() {},
  error(message, fields) {
    errorLines.push(
      `${message} ${JSON.stringify(fields, (_key, value) => (value instanceof Error ? value.stack : value))}`,
    );
  },
  isEnabled: (level) => level === 'error',
};

let stack: TestStack;
const sockets: RawClient[] = [];

async function connect(user: string, resource: string): Promise<RawClient> {
  const client = await RawClient.connect(stack.url);
  sockets.push(client);
  const local = user.split('@')[0] as string;
  await client.login(local, `${local}-pw`, resource);
  return client;
}

async function ask(client: RawClient, xml: string, id: string): Promise<Element> {
  client.send(xml);
  return client.until((el) => el.name === 'iq' && el.attrs.id === id, 10_000);
}

beforeAll(async () => {
  stack = await startTestStack({ SM_MAX_SECONDS: '300' }, { log: recordingLog });
  for (const user of [...USERS, KEEPER]) await stack.addUser(user, `${user.split('@')[0]}-pw`);
  // The keeper's data, written by the keeper (and one message from fzb), before anyone fuzzes.
  const keeper = await connect(KEEPER, 'home');
  await ask(
    keeper,
    `<iq type='set' id='k1'><query xmlns='${NS.roster}'><item jid='${SECRET_CONTACT}' name='${SECRETS.keeperRoster}'/></query></iq>`,
    'k1',
  );
  await ask(
    keeper,
    `<iq type='set' id='k2'><store xmlns='${NS.archive}' with='${SECRET_CONTACT}' start='2026-01-01T00:00:00Z'><to secs='0'><body>${SECRETS.keeperArchive}</body></to></store></iq>`,
    'k2',
  );
  keeper.close();
  await keeper.closed;
  await stack.gateway.drained();
  const fzb = await connect(USERS[1] as string, 'setup');
  fzb.send(`<message type='chat' to='${KEEPER}' id='k3'><body>${SECRETS.keeperOffline}</body></message>`);
  await fzb.framesBeforePong();
  fzb.close();
  const fza = await connect(USERS[0] as string, 'setup');
  await ask(
    fza,
    `<iq type='set' id='a1'><query xmlns='${NS.roster}'><item jid='${SECRET_CONTACT}' name='${SECRETS.fzaRoster}'/></query></iq>`,
    'a1',
  );
  fza.close();
  await stack.gateway.drained();
});

afterAll(async () => {
  for (const client of sockets) client.terminate();
  await stack?.close();
});

describe.each(SEEDS)('fuzz seed %i', (seed) => {
  const failures: string[] = [];
  const streamErrors: string[] = [];
  const framesByUser = new Map<string, string[]>();
  /** How the fuzzers' requests were answered (`result`, or the error condition): printed with FUZZ_VERBOSE. */
  const outcomes = new Map<string, number>();
  let unanswered: string[] = [];

  /** What each fuzzer sent with an id: who sent it, and to whom. */
  const sentById = new Map<string, { user: string; to?: string; xml: string }>();
  /** The account a JID names (RFC 7622: domain and localpart compare case-insensitively here). */
  const accountOf = (jid: string) => (jid.split('/')[0] ?? '').toLowerCase();

  /** Values from the server's answers to any seat, which every fuzzer may then use. */
  const harvest = new Map<string, string[]>();
  const keep = (name: string, value: string | undefined) => {
    if (!value) return;
    const list = harvest.get(name) ?? [];
    if (list.includes(value)) return;
    list.push(value);
    if (list.length > 40) list.shift();
    harvest.set(name, list);
  };
  const harvestFrom = (el: Element) => {
    for (const name of ['node', 'start', 'with']) keep(name, el.attrs[name]);
    if ((el.name === 'first' || el.name === 'last') && el.attrs.xmlns === undefined)
      keep('rsm', el.getText());
    for (const child of el.getChildElements()) harvestFrom(child);
  };

  const seatsFor = (random: () => number): Omit<Seat, 'client'>[] =>
    [
      { user: USERS[0] as string, resource: 'one', wantsSm: true },
      { user: USERS[0] as string, resource: 'two', wantsSm: false },
      { user: USERS[1] as string, resource: 'one', wantsSm: false },
      { user: USERS[2] as string, resource: 'one', wantsSm: true },
    ].map((seat, index) => ({
      ...seat,
      inbound: 0,
      fuzzer: new StanzaFuzzer(
        random,
        { domain: DOMAIN, users: [...USERS, KEEPER], resources: ['one', 'two'], harvest },
        `s${seed}-${index}`,
      ),
      pending: new Map(),
      answered: new Map(),
      sent: new Map(),
      barriers: 0,
    }));

  async function seatUp(seat: Omit<Seat, 'client'> & { client?: RawClient }): Promise<void> {
    seat.client = await connect(seat.user, seat.resource);
    seat.sm = undefined;
    seat.inbound = 0;
    if (seat.wantsSm) {
      seat.client.send(`<enable xmlns='${NS.sm3}' resume='true'/>`);
      const enabled = await seat.client.next(10_000);
      if (enabled.name !== 'enabled') throw new Error(`enable answered ${enabled.toString()}`);
      seat.sm = NS.sm3;
    }
    seat.client.send('<presence/>');
  }

  /** Handles one frame a seat received; false when it was the end of the stream. */
  function take(seat: Seat, text: string): boolean {
    framesByUser.get(seat.user)?.push(text);
    if (/\n\s+at |\.ts:\d+|\.js:\d+|Error: /.test(text))
      failures.push(`stack trace in a frame: ${text.slice(0, 300)}`);
    if (text.includes('internal-server-error')) failures.push(`internal-server-error: ${text.slice(0, 400)}`);
    const el = parse(text);
    harvestFrom(el);
    if (el.name === 'stream:error') {
      // RFC 7395 §3.6: the stream error, then <close/>.
      const condition = el.getChildElements().find((c) => c.attrs.xmlns === STREAMS)?.name ?? '?';
      streamErrors.push(condition);
      if (!EXPLAINED_STREAM_ERRORS.has(condition))
        failures.push(`unexplained stream error ${condition} after ${seat.last?.slice(0, 600)}: ${text}`);
      return true;
    }
    if (el.name === 'close') return false;
    if (el.name === 'enabled') {
      seat.sm = el.attrs.xmlns;
      seat.inbound = 0;
      return true;
    }
    if (el.name === 'r' && (el.attrs.xmlns === NS.sm3 || el.attrs.xmlns === NS.sm1) && seat.sm) {
      seat.client.send(`<a xmlns='${seat.sm}' h='${seat.inbound % 2 ** 32}'/>`);
      return true;
    }
    if (!['iq', 'message', 'presence'].includes(el.name)) return true;
    if (seat.sm) seat.inbound += 1;
    // RFC 6120 §10: a stanza reaches the account it is addressed to (its sender's own when it
    // has no 'to'); an error goes back to the sender. An iq without 'to' is the server's to
    // answer, never a client's.
    const origin = el.attrs.id === undefined ? undefined : sentById.get(el.attrs.id);
    const request = el.name === 'iq' && (el.attrs.type === 'get' || el.attrs.type === 'set');
    if (origin && (el.name === 'message' || request)) {
      const addressee =
        origin.to === undefined ? (el.name === 'iq' ? DOMAIN : origin.user) : accountOf(origin.to);
      const allowed = el.attrs.type === 'error' ? [origin.user, addressee] : [addressee];
      if (!allowed.includes(seat.user))
        failures.push(
          `${seat.user} received what ${origin.user} sent to ${origin.to}: ${origin.xml.slice(0, 300)}`,
        );
    }
    if (el.name !== 'iq') return true;
    const { type, id, from } = el.attrs;
    if (type === 'result' || type === 'error') {
      if (id && seat.pending.has(id)) {
        const condition =
          type === 'result'
            ? 'result'
            : (el
                .getChild('error')
                ?.getChildElements()
                .find((c) => c.attrs.xmlns === NS.stanzas)?.name ?? '?');
        const key = `${seat.pending.get(id)} ${condition}`;
        outcomes.set(key, (outcomes.get(key) ?? 0) + 1);
        if (process.env.FUZZ_VERBOSE === '2') console.log(`${seat.sent.get(id)}\n  → ${text}`);
        seat.pending.delete(id);
        seat.answered.set(id, text);
      } else if (id && seat.answered.has(id)) {
        failures.push(
          `iq ${id} answered twice: ${seat.sent.get(id)?.slice(0, 400)} → ${seat.answered.get(id)?.slice(0, 300)} and ${text.slice(0, 300)}`,
        );
      }
      return true;
    }
    if (type === 'get' || type === 'set') {
      // A client answers what is addressed to it: the server's pushes with a result, anything
      // else with service-unavailable (RFC 6120 §8.4).
      const fromServer = from === undefined || from === seat.user || from === DOMAIN;
      const to = from ? ` to='${from.replace(/'/g, '&apos;')}'` : '';
      const answer = fromServer
        ? `<iq type='result' id='${id}'${to}/>`
        : `<iq type='error' id='${id}'${to}><error type='cancel'><service-unavailable xmlns='${NS.stanzas}'/></error></iq>`;
      if (id !== undefined)
        seat.client.send(answer.replace(`id='${id}'`, `id='${id.replace(/'/g, '&apos;')}'`));
    }
    return true;
  }

  /** Reads a seat's frames up to the answer of a ping sent now; reconnects it after a stream error. */
  async function settle(seat: Seat): Promise<void> {
    seat.barriers += 1;
    const id = `barrier-${seed}-${seat.resource}-${seat.user}-${seat.barriers}`;
    if (!seat.client.isClosed) seat.client.send(`<iq type='get' id='${id}'><ping xmlns='${NS.ping}'/></iq>`);
    for (;;) {
      let text: string;
      try {
        text = await seat.client.nextText(15_000);
      } catch (error) {
        if (!seat.client.isClosed) {
          failures.push(`${seat.user}/${seat.resource}: ${(error as Error).message} (barrier ${id})`);
          return;
        }
        // Its stream ended: what it asked is not owed an answer any more (RFC 6120 §4.9).
        if (!streamErrors.length)
          failures.push(`${seat.user}/${seat.resource}: socket closed without a stream error`);
        seat.pending.clear();
        await seatUp(seat);
        return;
      }
      const parsed = parse(text);
      if (parsed.name === 'iq' && parsed.attrs.id === id) {
        framesByUser.get(seat.user)?.push(text);
        if (seat.sm) seat.inbound += 1;
        if (parsed.attrs.type !== 'result') failures.push(`barrier ping answered ${text}`);
        // XEP-0198 §4: "either party MAY send an <a/> element at any time". A client that has
        // answered an iq acknowledges it; one it never acknowledged is bounced with an error when
        // the session ends (§5), a second answer the requester would then get.
        if (seat.sm) seat.client.send(`<a xmlns='${seat.sm}' h='${seat.inbound % 2 ** 32}'/>`);
        return;
      }
      if (!take(seat, text)) {
        seat.pending.clear();
        await seat.client.closed;
        await seatUp(seat);
        return;
      }
    }
  }

  beforeAll(async () => {
    errorLines.length = 0;
    for (const user of [...USERS, KEEPER]) framesByUser.set(user, []);
    const random = seeded(seed);
    const seats = seatsFor(random) as Seat[];
    for (const seat of seats) await seatUp(seat);
    for (const seat of seats) await settle(seat);
    for (let i = 0; i < COUNT; i += 1) {
      const seat = seats[Math.floor(random() * seats.length)] as Seat;
      const stanza = seat.fuzzer.next();
      if (stanza.expectsResponse) {
        seat.pending.set(stanza.expectsResponse, stanza.label);
        seat.sent.set(stanza.expectsResponse, stanza.xml);
      }
      if (stanza.id)
        sentById.set(stanza.id, {
          user: seat.user,
          xml: stanza.xml,
          ...(stanza.to !== undefined ? { to: stanza.to } : {}),
        });
      seat.last = stanza.xml;
      seat.client.send(stanza.xml);
      if (i % 4 === 3) for (const each of seats) await settle(each);
    }
    // Answers between the fuzzers' own clients take a round or two.
    for (let round = 0; round < 6 && seats.some((s) => s.pending.size > 0); round += 1) {
      for (const seat of seats) await settle(seat);
    }
    unanswered = seats.flatMap((s) =>
      [...s.pending].map(([id, label]) => `${s.user}/${s.resource} ${id} (${label})`),
    );
    for (const seat of seats) seat.client.close();
    await stack.gateway.drained();
    if (process.env.FUZZ_VERBOSE)
      console.log(seed, { streamErrors, outcomes: Object.fromEntries([...outcomes].sort()) });
  }, 600_000);

  it('answers every iq get and set exactly once (RFC 6120 §8.2.3)', () => {
    expect(unanswered).toEqual([]);
  });

  it('meets bad input with XMPP errors: no internal-server-error, no error logged, no stack trace, only explained stream errors', () => {
    expect(failures).toEqual([]);
    expect(errorLines).toEqual([]);
  });

  it('keeps both sides of every subscription between local accounts in step (RFC 6121 Appendix A)', async () => {
    // A.2/A.3: each change of a subscription between two local accounts moves both sides at once
    // (one transaction here): "To" or "Both" at the user is "From" or "Both" at the contact, and
    // a request pending out at one is pending in at the other.
    const accounts = [...USERS, KEEPER];
    const sides = new Map<string, Map<string, { to: boolean; from: boolean; out: boolean; in: boolean }>>();
    for (const user of accounts) {
      const roster = await stack.server.roster.getRoster(user);
      const side = new Map<string, { to: boolean; from: boolean; out: boolean; in: boolean }>();
      for (const entry of [...roster.items, ...roster.pendingIn]) {
        side.set(entry.contact, {
          to: entry.subscription === 'to' || entry.subscription === 'both',
          from: entry.subscription === 'from' || entry.subscription === 'both',
          out: entry.pendingOut,
          in: entry.pendingIn !== undefined,
        });
      }
      sides.set(user, side);
    }
    const none = { to: false, from: false, out: false, in: false };
    const mismatches: string[] = [];
    let related = 0;
    for (const user of accounts) {
      for (const contact of accounts) {
        if (user === contact) continue;
        const mine = sides.get(user)?.get(contact) ?? none;
        const theirs = sides.get(contact)?.get(user) ?? none;
        if (mine.to || mine.out) related += 1;
        if (mine.to !== theirs.from) mismatches.push(`${user} to=${mine.to}, ${contact} from=${theirs.from}`);
        if (mine.out !== theirs.in)
          mismatches.push(`${user} pending out=${mine.out}, ${contact} pending in=${theirs.in}`);
      }
    }
    expect(mismatches).toEqual([]);
    if (process.env.FUZZ_VERBOSE) console.log(seed, { subscriptionsAndRequests: related });
  });

  it('leaks nothing across users', () => {
    const leaks: string[] = [];
    for (const [user, frames] of framesByUser) {
      for (const [secret, allowed] of Object.entries(MAY_SEE)) {
        if (allowed.has(user)) continue;
        const frame = frames.find((f) => f.includes(secret));
        if (frame) leaks.push(`${user} saw ${secret}: ${frame.slice(0, 300)}`);
      }
    }
    expect(leaks).toEqual([]);
  });

  it('leaves an account nobody fuzzed as it was: its offline message, roster item and archived collection', async () => {
    const keeper = await RawClient.connect(stack.url);
    sockets.push(keeper);
    await keeper.login('fzd', 'fzd-pw', `check-${seed}`);
    // XEP-0013 §2.2: the count of stored messages, then the headers; the keeper's one is there.
    const headers = await ask(
      keeper,
      `<iq type='get' id='h1'><query xmlns='http://jabber.org/protocol/disco#items' node='${NS.offline}'/></iq>`,
      'h1',
    );
    const roster = await ask(keeper, `<iq type='get' id='r1'><query xmlns='${NS.roster}'/></iq>`, 'r1');
    const item = roster
      .getChild('query')
      ?.getChildren('item')
      .find((i) => i.attrs.jid === SECRET_CONTACT);
    expect(item?.attrs.name).toBe(SECRETS.keeperRoster);
    const collection = await ask(
      keeper,
      `<iq type='get' id='c1'><retrieve xmlns='${NS.archive}' with='${SECRET_CONTACT}' start='2026-01-01T00:00:00Z'/></iq>`,
      'c1',
    );
    expect(collection.toString()).toContain(SECRETS.keeperArchive);
    const nodes = headers.getChild('query')?.getChildren('item') ?? [];
    const fromFzb = nodes.filter(
      (n) => n.attrs.name === USERS[1] || n.attrs.name?.startsWith(`${USERS[1]}/`),
    );
    expect(fromFzb.length).toBeGreaterThan(0);
    // XEP-0013 §2.4: the viewed messages come before the result.
    const id = 'v1';
    keeper.send(
      `<iq type='get' id='${id}'><offline xmlns='${NS.offline}'>${fromFzb.map((n) => `<item action='view' node='${n.attrs.node}'/>`).join('')}</offline></iq>`,
    );
    const before: string[] = [];
    for (;;) {
      const text = await keeper.nextText(10_000);
      const el = parse(text);
      if (el.name === 'iq' && el.attrs.id === id) {
        expect(el.attrs.type).toBe('result');
        break;
      }
      before.push(text);
    }
    expect(before.some((text) => text.includes(SECRETS.keeperOffline))).toBe(true);
    keeper.close();
  });
});
