/**
 * XEP-0136 0.9 §7 automated archiving end to end: what the server records for a stream with
 * `<auto save='true'/>`, by the rule that applies to the contact (§3 precedence), in which
 * collection (idle gap, new thread), with `secs` summing to each message's time; and each
 * message exactly once, whether delivered online, stored offline and flooded later, fanned out
 * to several resources, or re-routed by stream management.
 */
import type { Element } from 'ltx';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RawClient } from '../../infra/local/raw-client.ts';
import { ARCHIVE, ArchiveWorld, chat, exchange, ok, stores } from '../support/archive.ts';
import { eventually } from '../support/eventually.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

const SM3 = 'urn:xmpp:sm:3';
const DELAY = 'urn:xmpp:delay';
const AUTO_ON = `<iq type='set' id='auto1'><auto save='true' xmlns='${ARCHIVE}'/></iq>`;

let stack: TestStack;
let world: ArchiveWorld;

beforeAll(async () => {
  stack = await startTestStack();
  world = new ArchiveWorld(stack);
});

afterAll(async () => {
  world?.closeAll();
  await stack?.close();
});

async function setPrefs(raw: RawClient, inner: string): Promise<void> {
  await ok(raw, `<iq type='set'><pref xmlns='${ARCHIVE}'>${inner}</pref></iq>`);
}

/** Every collection of the user (as the user lists them) with its entries. */
async function archiveOf(raw: RawClient): Promise<{ with: string; start: string; entries: Element[] }[]> {
  const list = await ok(
    raw,
    `<iq type='get'><list xmlns='${ARCHIVE}'><set xmlns='http://jabber.org/protocol/rsm'><max>250</max></set></list></iq>`,
  );
  const out: { with: string; start: string; entries: Element[] }[] = [];
  for (const store of stores(list)) {
    const collection = await ok(
      raw,
      `<iq type='get'><retrieve xmlns='${ARCHIVE}' with='${store.attrs.with}' start='${store.attrs.start}'><set xmlns='http://jabber.org/protocol/rsm'><max>250</max></set></retrieve></iq>`,
    );
    out.push({
      with: store.attrs.with,
      start: store.attrs.start,
      entries: (collection?.getChildElements() ?? []).filter((e) => e.name !== 'set'),
    });
  }
  return out;
}

function bodies(collections: { entries: Element[] }[]): string[] {
  return collections.flatMap((c) => c.entries.map((e) => `${e.name}:${e.getChildText('body')}`));
}

describe('XEP-0136 0.9 §7.1 automatic archiving', () => {
  it('records both directions for streams with auto on, by the contact full JID, with secs from the start', async () => {
    const romeo = await world.newUser('romeo');
    const juliet = await world.newUser('juliet');
    const orchard = await world.online(romeo, 'orchard');
    const chamber = await world.online(juliet, 'chamber');
    await ok(orchard, AUTO_ON);
    await ok(chamber, AUTO_ON);
    await setPrefs(orchard, "<default save='body' otr='allow'/>");
    await setPrefs(chamber, "<default save='body' otr='allow'/>");
    await chat(chamber, orchard, romeo, 'Art thou not Romeo, and a Montague?');
    await chat(orchard, chamber, `${juliet}/chamber`, 'Neither, fair saint, if either thee dislike.');
    await chat(chamber, orchard, `${romeo}/orchard`, "How cam'st thou hither, tell me, and wherefore?");

    const romeos = await archiveOf(orchard);
    expect(romeos.map((c) => c.with)).toEqual([`${juliet}/chamber`]);
    expect(bodies(romeos)).toEqual([
      'from:Art thou not Romeo, and a Montague?',
      'to:Neither, fair saint, if either thee dislike.',
      "from:How cam'st thou hither, tell me, and wherefore?",
    ]);
    // §5.2: each secs is relative to the previous message; they sum to the message's time.
    const start = Date.parse(romeos[0]?.start as string);
    let sum = 0;
    for (const entry of romeos[0]?.entries ?? []) {
      expect(entry.attrs.secs).toMatch(/^\d+$/);
      sum += Number(entry.attrs.secs);
    }
    expect(sum).toBeLessThanOrEqual(Math.ceil((Date.now() - start) / 1000));
    const juliets = await archiveOf(chamber);
    expect(juliets.map((c) => c.with)).toEqual([`${romeo}/orchard`]);
    expect(bodies(juliets)).toEqual([
      'to:Art thou not Romeo, and a Montague?',
      'from:Neither, fair saint, if either thee dislike.',
      "to:How cam'st thou hither, tell me, and wherefore?",
    ]);
  });

  it('records nothing for a stream that did not turn auto on, even with a saving default', async () => {
    const romeo = await world.newUser('romeo');
    const juliet = await world.newUser('juliet');
    const orchard = await world.online(romeo, 'orchard');
    const chamber = await world.online(juliet, 'chamber');
    await setPrefs(orchard, "<default save='body' otr='allow'/>");
    await setPrefs(chamber, "<default save='body' otr='allow'/>");
    await chat(orchard, chamber, juliet, 'unrecorded');
    expect(await archiveOf(orchard)).toEqual([]);
    expect(await archiveOf(chamber)).toEqual([]);
  });

  it("keeps whole stanzas with save='all' (no thread, delay or chat states), bodies only with save='body'", async () => {
    const romeo = await world.newUser('romeo');
    const juliet = await world.newUser('juliet');
    const orchard = await world.online(romeo, 'orchard');
    const chamber = await world.online(juliet, 'chamber');
    await ok(orchard, AUTO_ON);
    await ok(chamber, AUTO_ON);
    await setPrefs(orchard, "<default save='all' otr='allow'/>");
    await setPrefs(chamber, "<default save='body' otr='allow'/>");
    await chat(
      orchard,
      chamber,
      juliet,
      'full',
      "<subject>s</subject><active xmlns='http://jabber.org/protocol/chatstates'/><x xmlns='jabber:x:oob'><url>http://a/b</url></x>",
    );
    const [full] = (await archiveOf(orchard))[0]?.entries ?? [];
    expect(full?.getChildElements().map((e) => e.name)).toEqual(['body', 'subject', 'x']);
    const [bodyOnly] = (await archiveOf(chamber))[0]?.entries ?? [];
    expect(bodyOnly?.getChildElements().map((e) => e.name)).toEqual(['body']);
  });

  it('follows full JID > bare JID > domain > default > service default for each contact', async () => {
    const owner = await world.newUser('juliet');
    const full = await world.newUser('romeo');
    const bare = await world.newUser('benvolio');
    const other = await world.newUser('tybalt');
    const chamber = await world.online(owner, 'chamber');
    await ok(chamber, AUTO_ON);
    const a = await world.online(full, 'a');
    const b = await world.online(bare, 'b');
    const c = await world.online(other, 'c');
    await setPrefs(
      chamber,
      `<default save='false' otr='allow'/>
       <item jid='localhost' save='body' otr='allow'/>
       <item jid='${bare}' save='false' otr='allow'/>
       <item jid='${full}' save='false' otr='allow'/>
       <item jid='${full}/a' save='all' otr='allow'/>`,
    );
    await chat(chamber, a, `${full}/a`, 'to the full JID item (all)', '<subject>kept</subject>');
    await chat(chamber, b, `${bare}/b`, 'to the bare JID item (false)');
    await chat(chamber, c, `${other}/c`, 'to the domain item (body)', '<subject>dropped</subject>');
    const collections = await archiveOf(chamber);
    expect(collections.map((x) => x.with).sort()).toEqual([`${full}/a`, `${other}/c`].sort());
    const byWith = new Map(collections.map((x) => [x.with, x.entries]));
    expect(byWith.get(`${full}/a`)?.[0]?.getChildText('subject')).toBe('kept');
    expect(byWith.get(`${other}/c`)?.[0]?.getChildText('subject')).toBeNull();

    // Without items, the user's default; without a default, the service's (save='false').
    const plain = await world.newUser('paris');
    const p = await world.online(plain, 'p');
    await ok(p, AUTO_ON);
    await chat(p, a, `${full}/a`, 'service default: not saved');
    expect(await archiveOf(p)).toEqual([]);
    await setPrefs(p, "<default save='body' otr='allow'/>");
    await chat(p, a, `${full}/a`, 'user default: saved');
    expect(bodies(await archiveOf(p))).toEqual(['to:user default: saved']);
  });

  it("never archives otr='require' contacts, save='false', XEP-0334 no-store / no-permanent-store, groupchat, errors, or messages without a body", async () => {
    const romeo = await world.newUser('romeo');
    const juliet = await world.newUser('juliet');
    const nurse = await world.newUser('nurse');
    const orchard = await world.online(romeo, 'orchard');
    const chamber = await world.online(juliet, 'chamber');
    const garden = await world.online(nurse, 'garden');
    await ok(orchard, AUTO_ON);
    await setPrefs(
      orchard,
      `<default save='body' otr='allow'/><item jid='${nurse}' save='false' otr='require'/>`,
    );
    await chat(orchard, garden, nurse, 'off the record');
    await chat(orchard, chamber, juliet, 'no-store', "<no-store xmlns='urn:xmpp:hints'/>");
    await chat(
      orchard,
      chamber,
      juliet,
      'no-permanent-store',
      "<no-permanent-store xmlns='urn:xmpp:hints'/>",
    );
    orchard.send(
      `<message type='chat' to='${juliet}'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>`,
    );
    await chamber.until((el) => el.name === 'message' && el.getChild('composing') !== undefined);
    await chat(orchard, chamber, juliet, 'kept');
    expect(bodies(await archiveOf(orchard))).toEqual(['to:kept']);
  });

  it('starts a new collection for a new <thread/>', async () => {
    const romeo = await world.newUser('romeo');
    const juliet = await world.newUser('juliet');
    const orchard = await world.online(romeo, 'orchard');
    const chamber = await world.online(juliet, 'chamber');
    await ok(orchard, AUTO_ON);
    await setPrefs(orchard, "<default save='body' otr='allow'/>");
    await chat(orchard, chamber, juliet, 'one', '<thread>t1</thread>');
    await chat(orchard, chamber, juliet, 'two', '<thread>t1</thread>');
    await chat(orchard, chamber, juliet, 'three', '<thread>t2</thread>');
    const collections = await archiveOf(orchard);
    expect(collections.map((c) => c.entries.length)).toEqual([2, 1]);
  });

  it('closes the collections being recorded when the last stream turns auto off', async () => {
    const romeo = await world.newUser('romeo');
    const juliet = await world.newUser('juliet');
    const orchard = await world.online(romeo, 'orchard');
    const chamber = await world.online(juliet, 'chamber');
    await ok(orchard, AUTO_ON);
    await setPrefs(orchard, "<default save='body' otr='allow'/>");
    await chat(orchard, chamber, juliet, 'before');
    // "If the client switches off all auto-archiving then the server MUST close and store all active collections."
    await ok(orchard, `<iq type='set'><auto save='false' xmlns='${ARCHIVE}'/></iq>`);
    expect(
      await ok(orchard, `<iq type='set'><remove xmlns='${ARCHIVE}' open='true'/></iq>`).catch((e) =>
        String(e),
      ),
    ).toMatch(/item-not-found/);
    await ok(orchard, AUTO_ON);
    await chat(orchard, chamber, juliet, 'after');
    expect((await archiveOf(orchard)).map((c) => c.entries.length)).toEqual([1, 1]);
  });
});

describe('idle gap (ARCHIVE_COLLECTION_GAP_SECONDS)', () => {
  let gapless: TestStack;
  let gapWorld: ArchiveWorld;
  beforeAll(async () => {
    gapless = await startTestStack({ ARCHIVE_COLLECTION_GAP_SECONDS: '0' });
    gapWorld = new ArchiveWorld(gapless);
  });
  afterAll(async () => {
    gapWorld?.closeAll();
    await gapless?.close();
  });

  it('starts a new collection after the gap (0 s: every later message), one collection within it (30 min default)', async () => {
    const romeo = await gapWorld.newUser('romeo');
    const juliet = await gapWorld.newUser('juliet');
    const orchard = await gapWorld.online(romeo, 'orchard');
    const chamber = await gapWorld.online(juliet, 'chamber');
    await ok(orchard, AUTO_ON);
    await setPrefs(orchard, "<default save='body' otr='allow'/>");
    await chat(orchard, chamber, juliet, 'one');
    await chat(orchard, chamber, juliet, 'two');
    const list = await ok(orchard, `<iq type='get'><list xmlns='${ARCHIVE}'/></iq>`);
    expect(stores(list)).toHaveLength(2);
  });
});

describe('exactly once', () => {
  async function pair(): Promise<{ romeo: string; juliet: string; orchard: RawClient }> {
    const romeo = await world.newUser('romeo');
    const juliet = await world.newUser('juliet');
    const orchard = await world.online(romeo, 'orchard');
    await ok(orchard, AUTO_ON);
    await setPrefs(orchard, "<default save='body' otr='allow'/>");
    return { romeo, juliet, orchard };
  }

  it('a message to the bare JID delivered to two resources with auto on is archived once for each side', async () => {
    const { juliet, orchard } = await pair();
    const chamber = await world.online(juliet, 'chamber');
    const pda = await world.online(juliet, 'pda');
    for (const raw of [chamber, pda]) await ok(raw, AUTO_ON);
    await setPrefs(chamber, "<default save='body' otr='allow'/>");
    orchard.send(`<message type='chat' to='${juliet}'><body>to both</body></message>`);
    await chamber.until((el) => el.getChildText('body') === 'to both');
    await pda.until((el) => el.getChildText('body') === 'to both');
    expect(bodies(await archiveOf(chamber))).toEqual(['from:to both']);
    expect(bodies(await archiveOf(orchard))).toEqual(['to:to both']);
  });

  it('a message stored offline and flooded later is archived once (at storage, for a user who prefers auto archiving)', async () => {
    const { juliet, orchard } = await pair();
    const setup = await world.connect(juliet, 'setup');
    await setPrefs(setup, "<default save='body' otr='allow'/><method type='auto' use='prefer'/>");
    setup.close();
    await setup.closed;
    orchard.send(`<message type='chat' to='${juliet}'><body>while you were out</body></message>`);
    await eventually(async () => expect(await stack.server.offline.count(juliet)).toBe(1));
    const chamber = await world.connect(juliet, 'chamber');
    await ok(chamber, AUTO_ON);
    chamber.send('<presence/>');
    const flooded = await chamber.until((el) => el.getChildText('body') === 'while you were out');
    expect(flooded.getChildren('delay', DELAY)).toHaveLength(1);
    expect(bodies(await archiveOf(chamber))).toEqual(['from:while you were out']);
    expect(bodies(await archiveOf(orchard))).toEqual(['to:while you were out']);
  });

  it('a message stored offline for a user who does not prefer auto archiving is not archived for the recipient, and the sender keeps its copy', async () => {
    const { juliet, orchard } = await pair();
    orchard.send(`<message type='chat' to='${juliet}'><body>stored</body></message>`);
    await eventually(async () => expect(await stack.server.offline.count(juliet)).toBe(1));
    const chamber = await world.connect(juliet, 'chamber');
    await ok(chamber, AUTO_ON);
    await setPrefs(chamber, "<default save='body' otr='allow'/>");
    chamber.send('<presence/>');
    await chamber.until((el) => el.getChildText('body') === 'stored');
    expect(await archiveOf(chamber)).toEqual([]);
    expect(bodies(await archiveOf(orchard))).toEqual(['to:stored']);
  });

  it('a message re-routed by stream management to another resource is archived once', async () => {
    const { juliet, orchard } = await pair();
    const chamber = await world.connect(juliet, 'chamber');
    chamber.send(`<enable xmlns='${SM3}'/>`);
    await chamber.until((el) => el.name === 'enabled');
    chamber.send('<presence/>');
    await chamber.until((el) => el.name === 'presence');
    await ok(chamber, AUTO_ON);
    const pda = await world.online(juliet, 'pda');
    await ok(pda, AUTO_ON);
    await setPrefs(pda, "<default save='body' otr='allow'/>");
    await chat(orchard, chamber, `${juliet}/chamber`, 'unacknowledged');
    // The SM session vanishes without acknowledging it: the router puts it on pda, stamped.
    chamber.terminate();
    const rerouted = await pda.until((el) => el.getChildText('body') === 'unacknowledged');
    expect(rerouted.getChildren('delay', DELAY)).toHaveLength(1);
    expect(bodies(await archiveOf(pda))).toEqual(['from:unacknowledged']);
    expect(bodies(await archiveOf(orchard))).toEqual(['to:unacknowledged']);
  });

  it('a message re-routed by stream management to offline storage and flooded is archived once', async () => {
    const { juliet, orchard } = await pair();
    const setup = await world.connect(juliet, 'setup');
    await setPrefs(setup, "<default save='body' otr='allow'/><method type='auto' use='prefer'/>");
    setup.close();
    await setup.closed;
    const chamber = await world.connect(juliet, 'chamber');
    chamber.send(`<enable xmlns='${SM3}'/>`);
    await chamber.until((el) => el.name === 'enabled');
    chamber.send('<presence/>');
    await chamber.until((el) => el.name === 'presence');
    await ok(chamber, AUTO_ON);
    await chat(orchard, chamber, `${juliet}/chamber`, 'unacked, then stored');
    chamber.terminate();
    await eventually(async () => expect(await stack.server.offline.count(juliet)).toBe(1));
    const back = await world.connect(juliet, 'back');
    await ok(back, AUTO_ON);
    back.send('<presence/>');
    await back.until((el) => el.getChildText('body') === 'unacked, then stored');
    expect(bodies(await archiveOf(back))).toEqual(['from:unacked, then stored']);
    expect(bodies(await archiveOf(orchard))).toEqual(['to:unacked, then stored']);
  });

  it("ignores a client's forged server delay stamp (it would pass for a re-route)", async () => {
    const { juliet, orchard } = await pair();
    const chamber = await world.online(juliet, 'chamber');
    await ok(chamber, AUTO_ON);
    await setPrefs(chamber, "<default save='body' otr='allow'/>");
    const received = await chat(
      orchard,
      chamber,
      juliet,
      'forged',
      "<delay xmlns='urn:xmpp:delay' from='localhost' stamp='2002-09-10T23:08:25Z'/>",
    );
    expect(received.getChildren('delay', DELAY)).toHaveLength(0);
    expect(bodies(await archiveOf(chamber))).toEqual(['from:forged']);
  });

  it('a refused message (unknown user) is not archived for its sender', async () => {
    const { orchard } = await pair();
    const { reply } = await exchange(
      orchard,
      `<message id='m1' type='chat' to='nobody@localhost'><body>void</body></message>`,
    );
    expect(reply.attrs.type).toBe('error');
    expect(await archiveOf(orchard)).toEqual([]);
  });

  it('keeps the auto flag across a stream-management resumption', async () => {
    const { juliet, orchard } = await pair();
    const first = await world.connect(juliet, 'chamber');
    first.send(`<enable xmlns='${SM3}' resume='true'/>`);
    const enabled = await first.until((el) => el.name === 'enabled');
    first.send('<presence/>');
    await first.until((el) => el.name === 'presence');
    await ok(first, AUTO_ON);
    await setPrefs(first, "<default save='body' otr='allow'/>");
    first.terminate();
    const second = await RawClient.connect(stack.url);
    world.sockets.push(second);
    await second.open();
    second.send(
      `<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>${Buffer.from(`\0${juliet.split('@')[0]}\0secret`).toString('base64')}</auth>`,
    );
    await second.until((el) => el.name === 'success');
    await second.open();
    second.send(`<resume xmlns='${SM3}' previd='${enabled.attrs.id}' h='0'/>`);
    await second.until((el) => el.name === 'resumed');
    const pref = await ok(second, `<iq type='get'><pref xmlns='${ARCHIVE}'/></iq>`);
    expect(pref?.getChild('auto')?.attrs.save).toBe('true');
    await chat(orchard, second, `${juliet}/chamber`, 'after resume');
    expect(bodies(await archiveOf(second))).toEqual(['from:after resume']);
  });
});
