/**
 * RFC 6121 §3 presence subscriptions and §4 presence between contacts, end to end over raw
 * frames: the Appendix A state tables through both rosters, inbound requests stamped from the
 * bare JID, the offline request kept and delivered once per initial presence, automatic
 * replies, unknown and remote contacts, broadcast and probes, unavailable presence on every
 * way a session ends, and isolation of users who share no subscription.
 */
import type { Element } from 'ltx';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sweep } from '../../shared/core/lifecycle.ts';
import { eventually } from '../support/eventually.ts';
import { type Match, Peer } from '../support/peer.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

const ROSTER = 'jabber:iq:roster';
const STANZAS = 'urn:ietf:params:xml:ns:xmpp-stanzas';
const USERS = [
  'alice',
  'bob',
  'carol',
  'dave',
  'erin',
  'frank',
  'gina',
  'hank',
  'ivy',
  'jack',
  'kate',
  'liam',
  'mona',
  'nick',
  'olga',
  'pete',
  'quin',
  'rita',
  'sam',
  'tina',
  'uma',
  'vic',
  'walt',
  'xena',
  'yuri',
  'zara',
  'abel',
  'bert',
  'cleo',
  'dora',
  'ezra',
  'fern',
  'gus',
  'hope',
];

let stack: TestStack;
const peers: Peer[] = [];

beforeAll(async () => {
  stack = await startTestStack({ SM_MAX_SECONDS: '300' });
  for (const user of USERS) await stack.addUser(`${user}@localhost`, `${user}-pw`);
});

afterAll(async () => {
  for (const peer of peers) peer.close();
  await stack?.close();
});

/** Logs in, asks for the roster (an interested resource), sends initial presence. */
async function online(user: string, resource = 'r', options: { presence?: boolean; roster?: boolean } = {}) {
  const peer = await Peer.login(stack.url, user, `${user}-pw`, resource);
  peers.push(peer);
  if (options.roster !== false) {
    const result = await peer.iq(`<iq type='get' id='roster1'><query xmlns='${ROSTER}'/></iq>`, 'roster1');
    expect(result.attrs.type).toBe('result');
  }
  if (options.presence !== false) {
    peer.send('<presence/>');
    await peer.waitFor(presence(undefined, peer.jid));
  }
  return peer;
}

function presence(type: string | undefined, from?: string): Match {
  return (el) =>
    el.name === 'presence' && el.attrs.type === type && (from === undefined || el.attrs.from === from);
}

function push(contact: string, check: (item: Element) => boolean = () => true): Match {
  return (el) => {
    if (el.name !== 'iq' || el.attrs.type !== 'set') return false;
    const item = el.getChild('query', ROSTER)?.getChild('item');
    return item?.attrs.jid === contact && check(item);
  };
}

const sub = (subscription: string, ask?: string) => (item: Element) =>
  item.attrs.subscription === subscription && item.attrs.ask === ask;

async function rosterItems(peer: Peer): Promise<Record<string, Record<string, string>>> {
  const id = `get-${Math.random().toString(36).slice(2)}`;
  const result = await peer.iq(`<iq type='get' id='${id}'><query xmlns='${ROSTER}'/></iq>`, id);
  const items: Record<string, Record<string, string>> = {};
  for (const item of result.getChild('query')?.getChildren('item') ?? []) items[item.attrs.jid] = item.attrs;
  return items;
}

/**
 * RFC 6121 §3.1.6 (and §3.2.3, §3.3.3 likewise): the server delivers the inbound subscription
 * stanza "to all of the user's interested resources [...] This MUST occur before sending the
 * roster push described in the next step."
 */
function deliveredBeforePush(peer: Peer, stanza: Element, rosterPush: Element): void {
  expect(peer.log.indexOf(stanza)).toBeGreaterThanOrEqual(0);
  expect(peer.log.indexOf(stanza)).toBeLessThan(peer.log.indexOf(rosterPush));
}

/** alice ↔ bob made mutual (Both), each answering the other's request. */
async function mutual(a: Peer, b: Peer): Promise<void> {
  a.send(`<presence type='subscribe' to='${b.bare}'/>`);
  await b.waitFor(presence('subscribe', a.bare));
  b.send(`<presence type='subscribed' to='${a.bare}'/>`);
  await a.waitFor(presence('subscribed', b.bare));
  b.send(`<presence type='subscribe' to='${a.bare}'/>`);
  await a.waitFor(presence('subscribe', b.bare));
  a.send(`<presence type='subscribed' to='${b.bare}'/>`);
  await b.waitFor(presence('subscribed', a.bare));
  await a.waitFor(push(b.bare, sub('both')));
  await b.waitFor(push(a.bare, sub('both')));
}

describe('RFC 6121 §3.1 requesting and approving a subscription', () => {
  it('walks None → Pending Out → To on one side and None → Pending In → From on the other', async () => {
    const alice = await online('alice');
    const bob = await online('bob');
    alice.send(`<presence type='subscribe' to='bob@localhost/r' id='s1'><status>hi</status></presence>`);
    // §3.1.2: "the user's server MUST ... push ... subscription='none' ask='subscribe'".
    await alice.waitFor(push('bob@localhost', sub('none', 'subscribe')));
    // §3.1.3: addressed to the bare JID, "stamp[ed] ... with the bare JID <user@domainpart>".
    const request = await bob.waitFor(presence('subscribe'));
    expect(request.attrs).toMatchObject({ from: 'alice@localhost', to: 'bob@localhost', id: 's1' });
    expect(request.getChildText('status')).toBe('hi');
    // A pending inbound request is no roster item (§3.1.3): bob's roster is still empty.
    expect(await rosterItems(bob)).toEqual({});

    bob.send(`<presence type='subscribed' to='alice@localhost'/>`);
    // §3.1.5: the contact's server pushes the item with subscription 'from'…
    await bob.waitFor(push('alice@localhost', sub('from')));
    // …§3.1.6: the user's server delivers 'subscribed', pushes 'to', and the user gets the
    // contact's presence.
    const approved = await alice.waitFor(presence('subscribed', 'bob@localhost'));
    expect(approved.attrs.to).toBe('alice@localhost');
    deliveredBeforePush(alice, approved, await alice.waitFor(push('bob@localhost', sub('to'))));
    await alice.waitFor(presence(undefined, 'bob@localhost/r'));
    expect((await rosterItems(alice))['bob@localhost']).toMatchObject({ subscription: 'to' });
    expect((await rosterItems(bob))['alice@localhost']).toMatchObject({ subscription: 'from' });
    // bob, not subscribed to alice, has not seen her presence.
    await bob.barrier();
    expect(bob.count(presence(undefined, 'alice@localhost/r'))).toBe(0);
  });

  it('A.2.1/A.3.1: a second request while pending changes nothing and is not delivered again', async () => {
    const carol = await online('carol');
    const dave = await online('dave');
    carol.send(`<presence type='subscribe' to='dave@localhost'/>`);
    await dave.waitFor(presence('subscribe', 'carol@localhost'));
    carol.send(`<presence type='subscribe' to='dave@localhost'/>`);
    await carol.barrier();
    await dave.barrier();
    expect(dave.count(presence('subscribe', 'carol@localhost'))).toBe(1);
    expect(carol.count(push('dave@localhost'))).toBe(1);
  });

  it('§3.1.3: a request to an offline user is kept and delivered at each initial presence until answered, once each', async () => {
    const erin = await online('erin');
    erin.send(`<presence type='subscribe' to='frank@localhost'/>`);
    erin.send(`<presence type='subscribe' to='frank@localhost'/>`);
    await erin.waitFor(push('frank@localhost', sub('none', 'subscribe')));
    await erin.barrier();

    const first = await online('frank', 'first', { presence: false });
    await first.barrier();
    // Nothing before available presence: "deliver the request when the contact next creates an
    // available resource".
    expect(first.count(presence('subscribe'))).toBe(0);
    first.send('<presence/>');
    const delivered = await first.waitFor(presence('subscribe', 'erin@localhost'));
    expect(delivered.attrs.to).toBe('frank@localhost');
    await first.barrier();
    expect(first.count(presence('subscribe'))).toBe(1);

    // Still unanswered: a second session gets it once at its own initial presence.
    const second = await online('frank', 'second', { presence: false });
    second.send('<presence/>');
    await second.waitFor(presence('subscribe', 'erin@localhost'));
    await second.barrier();
    await first.barrier();
    expect(second.count(presence('subscribe'))).toBe(1);
    expect(first.count(presence('subscribe'))).toBe(1);

    second.send(`<presence type='subscribed' to='erin@localhost'/>`);
    await erin.waitFor(presence('subscribed', 'frank@localhost'));
    const third = await online('frank', 'third');
    await third.barrier();
    expect(third.count(presence('subscribe'))).toBe(0);
  });

  it('keeps a request of a few kilobytes without its payload, so a stranger cannot bloat the roster', async () => {
    const tina = await online('tina', 'big');
    tina.send(
      `<presence type='subscribe' to='uma@localhost' id='big'><status>${'x'.repeat(4000)}</status></presence>`,
    );
    await tina.waitFor(push('uma@localhost'));
    const uma = await online('uma', 'big');
    const kept = await uma.waitFor(presence('subscribe', 'tina@localhost'));
    expect(kept.attrs.id).toBe('big');
    expect(kept.getChild('status')).toBeUndefined();
    // Bloated in an attribute rather than a child: the bare form keeps only what a request is.
    tina.send(`<presence type='unsubscribe' to='uma@localhost'/>`);
    await uma.waitFor(presence('unsubscribe', 'tina@localhost'));
    tina.send(`<presence type='subscribe' to='uma@localhost' id='big2' x='${'y'.repeat(20_000)}'/>`);
    const isBig2 = (el: Element) => presence('subscribe', 'tina@localhost')(el) && el.attrs.id === 'big2';
    await uma.waitFor(isBig2);
    const later = await online('uma', 'big2');
    const again = await later.waitFor(isBig2);
    expect(again.attrs.x).toBeUndefined();
    const row = (await stack.server.roster.getRoster('uma@localhost')).pendingIn.find(
      (entry) => entry.contact === 'tina@localhost',
    )?.pendingIn;
    expect(row).toMatch(/id=["']big2["']/);
    expect(Buffer.byteLength(row ?? '')).toBeLessThan(2048);
    // Withdrawn (A.2.2 None + Pending Out → None), so later tests start from None.
    tina.send(`<presence type='unsubscribe' to='uma@localhost'/>`);
    await uma.waitFor(presence('unsubscribe', 'tina@localhost'));
    tina.send(
      `<iq type='set' id='clean'><query xmlns='${ROSTER}'><item jid='uma@localhost' subscription='remove'/></query></iq>`,
    );
    await tina.waitFor((el) => el.attrs.id === 'clean');
  });

  it('§3.1.3 / §8.5.1: a request to a local JID without an account is answered "unsubscribed"', async () => {
    const gina = await online('gina');
    gina.send(`<presence type='subscribe' to='nobody@localhost'/>`);
    const answer = await gina.waitFor(presence('unsubscribed', 'nobody@localhost'));
    expect(answer.attrs.to).toBe('gina@localhost');
    // A.2.1 then A.3.4 (None → None + Pending Out → None) in one write: the item is added and
    // pushed once, in its final state; it stays in the roster.
    await gina.waitFor(push('nobody@localhost', sub('none')));
    await gina.barrier();
    expect(gina.count(push('nobody@localhost'))).toBe(1);
    expect((await rosterItems(gina))['nobody@localhost']).toMatchObject({ subscription: 'none' });
  });

  it('a contact of another domain is kept in the roster; the request is answered remote-server-not-found', async () => {
    const hank = await online('hank');
    hank.send(`<presence type='subscribe' to='romeo@montague.example' id='far'/>`);
    await hank.waitFor(push('romeo@montague.example', sub('none', 'subscribe')));
    const error = await hank.waitFor(presence('error'));
    expect(error.attrs).toMatchObject({ id: 'far', from: 'romeo@montague.example' });
    expect(error.getChild('error')?.getChild('remote-server-not-found', STANZAS)).toBeDefined();
    expect((await rosterItems(hank))['romeo@montague.example']).toMatchObject({
      subscription: 'none',
      ask: 'subscribe',
    });
  });

  it('§3.1.6: the approval reaches an interested resource that has sent no presence yet, before its push', async () => {
    // §3.1.6: "Deliver the inbound subscription approval to all of the user's interested
    // resources (this MUST occur before sending the roster push described in the next step)";
    // an interested resource is one that requested the roster (§2.1.6), available or not.
    const ezra = await online('ezra');
    const fern = await online('fern');
    const quiet = await online('ezra', 'quiet', { presence: false });
    ezra.send(`<presence type='subscribe' to='fern@localhost'/>`);
    await fern.waitFor(presence('subscribe', 'ezra@localhost'));
    fern.send(`<presence type='subscribed' to='ezra@localhost'/>`);
    const approval = await quiet.waitFor(presence('subscribed', 'fern@localhost'));
    deliveredBeforePush(quiet, approval, await quiet.waitFor(push('fern@localhost', sub('to'))));
    await ezra.waitFor(presence('subscribed', 'fern@localhost'));
    // The same for a cancellation (§3.2.3) and an unsubscribe (§3.3.3).
    fern.send(`<presence type='unsubscribed' to='ezra@localhost'/>`);
    const cancelled = await quiet.waitFor(presence('unsubscribed', 'fern@localhost'));
    deliveredBeforePush(quiet, cancelled, await quiet.waitFor(push('fern@localhost', sub('none'))));
    // A resource that asked for no roster and sent no presence is not told.
    const bystander = await online('ezra', 'bystander', { presence: false, roster: false });
    fern.send(`<presence type='subscribe' to='ezra@localhost'/>`);
    await ezra.waitFor(presence('subscribe', 'fern@localhost'));
    ezra.send(`<presence type='subscribed' to='fern@localhost'/>`);
    await fern.waitFor(presence('subscribed', 'ezra@localhost'));
    fern.send(`<presence type='unsubscribe' to='ezra@localhost'/>`);
    const unsubscribe = await quiet.waitFor(presence('unsubscribe', 'fern@localhost'));
    deliveredBeforePush(quiet, unsubscribe, await quiet.waitFor(push('fern@localhost', sub('none'))));
    await bystander.barrier();
    expect(bystander.count((el) => el.name === 'presence')).toBe(0);
  });

  it('A.2.4: denying a request (unsubscribed in None + Pending In) tells the requester', async () => {
    const ivy = await online('ivy');
    const jack = await online('jack');
    ivy.send(`<presence type='subscribe' to='jack@localhost'/>`);
    await jack.waitFor(presence('subscribe', 'ivy@localhost'));
    jack.send(`<presence type='unsubscribed' to='ivy@localhost'/>`);
    // A.3.4: None + Pending Out → None, delivered (before the push: §3.2.3).
    const denied = await ivy.waitFor(presence('unsubscribed', 'jack@localhost'));
    deliveredBeforePush(ivy, denied, await ivy.waitFor(push('jack@localhost', sub('none'))));
    // The request is no longer pending: jack's next session does not get it.
    const again = await online('jack', 'again');
    await again.barrier();
    expect(again.count(presence('subscribe'))).toBe(0);
  });
});

describe('RFC 6121 §3.4 pre-approval', () => {
  it('advertises the feature, marks the item approved, and approves the request without bothering the user', async () => {
    const kate = await online('kate');
    const liam = await online('liam');
    kate.send(`<presence type='subscribed' to='liam@localhost'/>`);
    // §3.4.2: "create a roster item ... with a state of 'None' and set the 'approved' flag".
    await kate.waitFor(push('liam@localhost', (item) => item.attrs.approved === 'true'));
    // "the user's server MUST NOT send the presence stanza of type 'subscribed' to the contact".
    await kate.barrier();
    await liam.barrier();
    expect(liam.count(presence('subscribed'))).toBe(0);

    liam.send(`<presence type='subscribe' to='kate@localhost'/>`);
    // The approval kate's server gives on her behalf reaches liam before his push (§3.1.6), and
    // liam gets one push, with the state it leaves (To), not Pending Out first.
    const approval = await liam.waitFor(presence('subscribed', 'kate@localhost'));
    deliveredBeforePush(liam, approval, await liam.waitFor(push('kate@localhost', sub('to'))));
    expect(liam.count(push('kate@localhost'))).toBe(1);
    await liam.waitFor(presence(undefined, 'kate@localhost/r'));
    await kate.waitFor(
      push('liam@localhost', (item) => item.attrs.subscription === 'from' && !item.attrs.approved),
    );
    await kate.barrier();
    expect(kate.count(presence('subscribe'))).toBe(0);
    // §3.1.5: the contact's server sends "current presence to the user from each of the
    // contact's available resources": once each, though the approval came from the server.
    await liam.barrier();
    expect(liam.count(presence(undefined, 'kate@localhost/r'))).toBe(1);
  });
});

describe('RFC 6121 §4 presence between contacts', () => {
  it('§4.2: initial presence goes to subscribers and the server probes on the user’s behalf; carol sees nothing', async () => {
    const mona = await online('mona');
    const nick = await online('nick');
    const carol = await online('carol', 'watcher');
    await mutual(mona, nick);
    // A new session of nick: mona gets its initial presence, and the session gets mona's.
    const later = await online('nick', 'later', { presence: false });
    later.send(`<presence><show>away</show><status>on the train</status></presence>`);
    const broadcast = await mona.waitFor(presence(undefined, 'nick@localhost/later'));
    expect(broadcast.getChildText('status')).toBe('on the train');
    // §4.3.2: "the full XML of the last presence stanza ... from each of the contact's available resources".
    const probed = await later.waitFor(presence(undefined, 'mona@localhost/r'));
    expect(probed.attrs.to).toBe('nick@localhost/later');
    // §4.4: an update reaches the subscriber too.
    later.send(`<presence><status>arrived</status></presence>`);
    await mona.waitFor((el) => el.name === 'presence' && el.getChildText('status') === 'arrived');
    await later.barrier();
    await carol.barrier();
    // Isolation: carol shares no subscription with mona or nick and sees none of their presence.
    expect(carol.count((el) => el.name === 'presence' && /^(mona|nick)@/.test(el.attrs.from ?? ''))).toBe(0);
  });

  it('§4.3: a probe from a client is answered with presence for a subscriber, "unsubscribed" for anyone else', async () => {
    const olga = await online('olga');
    const pete = await online('pete');
    await mutual(olga, pete);
    pete.send(`<presence type='probe' to='olga@localhost'/>`);
    await pete.waitFor(
      (el) => el.name === 'presence' && el.attrs.from === 'olga@localhost/r' && !el.attrs.type,
    );
    const carol = await online('carol', 'prober');
    carol.send(`<presence type='probe' to='olga@localhost'/>`);
    await carol.waitFor(presence('unsubscribed', 'olga@localhost'));
    await carol.barrier();
    expect(carol.count((el) => el.name === 'presence' && el.attrs.from === 'olga@localhost/r')).toBe(0);
  });

  it('§4.3.2: a client’s probe of a contact with no available resource is answered with its last unavailable presence, stamped when it was received', async () => {
    const bert = await online('bert');
    const cleo = await online('cleo');
    await mutual(bert, cleo);
    // dora shares a subscription with bert, and was last seen longer ago than the server keeps.
    const dora = await online('dora');
    await mutual(bert, dora);
    dora.send(`<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>`);
    await bert.waitFor(presence('unavailable', 'dora@localhost/r'));
    await stack.server.sessions.forgetLastUnavailable('dora@localhost');

    // cleo's own unavailable, with a status and a stamp claiming to be the server's.
    const before = Date.now();
    cleo.send(
      `<presence type='unavailable'><status>Gone fishing</status><delay xmlns='urn:xmpp:delay' from='localhost' stamp='2001-01-01T00:00:00Z'/></presence>`,
    );
    await bert.waitFor(presence('unavailable', 'cleo@localhost/r'));
    const after = Date.now();
    cleo.close();

    // "if the contact has no available resources, then the server SHOULD reply to the presence
    // probe by sending to the user a presence stanza of type 'unavailable'", which "SHOULD include
    // information about the time when the last unavailable presence stanza was generated
    // (formatted using the XMPP delayed delivery extension)" and "MAY include the full XML of the
    // last unavailable presence stanza".
    const stampOf = (el: Element) => {
      const delays = el.getChildren('delay', 'urn:xmpp:delay');
      expect(delays).toHaveLength(1);
      expect(delays[0]?.attrs.from).toBe('localhost');
      return Date.parse(delays[0]?.attrs.stamp as string);
    };
    const fromCleo = presence('unavailable', 'cleo@localhost');
    bert.send(`<presence type='probe' to='cleo@localhost'/>`);
    const answer = await bert.waitFor(fromCleo);
    expect(answer.attrs.to).toBe('bert@localhost/r');
    expect(answer.getChildText('status')).toBe('Gone fishing');
    expect(stampOf(answer)).toBeGreaterThanOrEqual(Math.floor(before / 1000) * 1000);
    expect(stampOf(answer)).toBeLessThanOrEqual(after);

    // The server's own probes at a new session's initial presence (§4.2.2) send nothing for an
    // offline contact (no queue crowded at login; no stale answer after a contact's own presence).
    const later = await online('bert', 'later', { presence: false });
    later.send('<presence/>');
    await later.waitFor(presence(undefined, 'bert@localhost/later'));
    await later.barrier();
    expect(later.count((el) => el.name === 'presence' && /^cleo@/.test(el.attrs.from ?? ''))).toBe(0);

    // The last one replaces it: a session that ends without one leaves the server's (no status).
    const again = await online('cleo', 'again');
    again.send(`<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>`);
    await bert.waitFor(presence('unavailable', 'cleo@localhost/again'));
    bert.send(`<presence type='probe' to='cleo@localhost'/>`);
    const replaced = await bert.waitFor(fromCleo);
    expect(replaced.getChild('status')).toBeUndefined();
    expect(stampOf(replaced)).toBeGreaterThan(stampOf(answer));

    // dora, not seen for that long: a probe gets a bare unavailable.
    bert.send(`<presence type='probe' to='dora@localhost'/>`);
    const unseen = await bert.waitFor(presence('unavailable', 'dora@localhost'));
    expect(unseen.children).toHaveLength(0);
  });

  it('unavailable reaches each contact exactly once on every way a session ends', async () => {
    const quin = await online('quin', 'watch');
    const rita = await online('rita', 'base');
    await mutual(quin, rita);
    const leaves = (resource: string) => (el: Element) =>
      el.name === 'presence' &&
      el.attrs.from === `rita@localhost/${resource}` &&
      el.attrs.type === 'unavailable';

    // Clean close.
    const closing = await online('rita', 'closing');
    await quin.waitFor(presence(undefined, 'rita@localhost/closing'));
    closing.send(`<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>`);
    await quin.waitFor(leaves('closing'));

    // Socket killed: $disconnect, no stream management.
    const killed = await online('rita', 'killed');
    await quin.waitFor(presence(undefined, 'rita@localhost/killed'));
    killed.raw.terminate();
    await quin.waitFor(leaves('killed'));

    // Replaced by a new bind of the same resource (RFC 6120 §7.7.2.2): the old session's
    // unavailable, then the new one's available presence.
    await online('rita', 'replaced');
    await quin.waitFor(presence(undefined, 'rita@localhost/replaced'));
    const successor = await online('rita', 'replaced');
    await quin.waitFor(leaves('replaced'));
    await quin.waitFor(presence(undefined, 'rita@localhost/replaced'));
    expect(successor.jid).toBe('rita@localhost/replaced');

    // Stream-management expiry: detached first (still available), unavailable only at expiry.
    const resumable = await online('rita', 'resumable', { presence: false });
    resumable.send(`<enable xmlns='urn:xmpp:sm:3' resume='true'/>`);
    await resumable.waitFor((el) => el.name === 'enabled');
    resumable.send('<presence/>');
    await quin.waitFor(presence(undefined, 'rita@localhost/resumable'));
    resumable.raw.terminate();
    await resumable.raw.closed;
    await quin.barrier();
    expect(quin.count(leaves('resumable'))).toBe(0);
    // The sweeper's run an hour later, once the server has handled the $disconnect.
    await eventually(async () => expect(await sweep(stack.server, Date.now() + 3_600_000)).toBe(1));
    await quin.waitFor(leaves('resumable'));

    await quin.barrier();
    for (const resource of ['closing', 'killed', 'replaced', 'resumable']) {
      expect(quin.count(leaves(resource)), resource).toBe(1);
    }
  });
});

describe('RFC 6121 §3.2–3.3 cancelling and unsubscribing', () => {
  it('§3.3 unsubscribe (Both → From): the contact is told, both rosters change, the user gets unavailable', async () => {
    const sam = await online('sam');
    const tina = await online('tina');
    await mutual(sam, tina);
    sam.send(`<presence type='unsubscribe' to='tina@localhost'/>`);
    // A.2.2: Both → From on sam's side; A.3.2: Both → To on tina's side, delivered.
    await sam.waitFor(push('tina@localhost', sub('from')));
    const unsubscribe = await tina.waitFor(presence('unsubscribe', 'sam@localhost'));
    deliveredBeforePush(tina, unsubscribe, await tina.waitFor(push('sam@localhost', sub('to'))));
    // §3.3.3: tina's server sends unavailable from tina's available resources to sam.
    await sam.waitFor(presence('unavailable', 'tina@localhost/r'));
    await tina.barrier();
    expect(tina.count(presence('unavailable', 'sam@localhost/r'))).toBe(0);
  });

  it('§3.2 unsubscribed (Both → To): the contact loses the subscription and gets unavailable', async () => {
    const uma = await online('uma');
    const vic = await online('vic');
    await mutual(uma, vic);
    // The push of vic's first approval (From), on the way to Both: taken, so that the one below
    // is the cancellation's.
    await vic.waitFor(push('uma@localhost', sub('from')));
    uma.send(`<presence type='unsubscribed' to='vic@localhost'/>`);
    // A.2.4: Both → To; A.3.4: Both → From.
    await uma.waitFor(push('vic@localhost', sub('to')));
    const cancelled = await vic.waitFor(presence('unsubscribed', 'uma@localhost'));
    deliveredBeforePush(vic, cancelled, await vic.waitFor(push('uma@localhost', sub('from'))));
    // §3.2.2: "While the user is still subscribed to the contact's presence (i.e., before the
    // contact's server routes or delivers the presence stanza of type 'unsubscribed' to the
    // user), the contact's server MUST send a presence stanza of type 'unavailable' from all of
    // the contact's online resources to the user."
    const gone = await vic.waitFor(presence('unavailable', 'uma@localhost/r'));
    expect(vic.log.indexOf(gone)).toBeLessThan(vic.log.indexOf(cancelled));
    // From now on uma's presence does not reach vic; vic's still reaches uma.
    const extra = await online('uma', 'extra');
    const vicExtra = await online('vic', 'extra');
    await extra.waitFor(presence(undefined, 'vic@localhost/extra'));
    await extra.barrier();
    await vic.barrier();
    expect(vic.count(presence(undefined, 'uma@localhost/extra'))).toBe(0);
    await vicExtra.barrier();
    expect(vicExtra.count(presence(undefined, 'uma@localhost/r'))).toBe(0);
  });

  it('§2.5 roster removal cancels both ways: unsubscribe and unsubscribed, pushes and unavailable on both sides', async () => {
    const walt = await online('walt');
    const xena = await online('xena');
    await mutual(walt, xena);
    const removal = await walt.iq(
      `<iq type='set' id='rm1'><query xmlns='${ROSTER}'><item jid='xena@localhost' subscription='remove'/></query></iq>`,
      'rm1',
    );
    expect(removal.attrs.type).toBe('result');
    await walt.waitFor(push('xena@localhost', (item) => item.attrs.subscription === 'remove'));
    await xena.waitFor(presence('unsubscribe', 'walt@localhost'));
    const removed = await xena.waitFor(presence('unsubscribed', 'walt@localhost'));
    deliveredBeforePush(xena, removed, await xena.waitFor(push('walt@localhost', sub('none'))));
    // §3.2.2: walt's resources go unavailable for xena before the 'unsubscribed' reaches her.
    const gone = await xena.waitFor(presence('unavailable', 'walt@localhost/r'));
    expect(xena.log.indexOf(gone)).toBeLessThan(xena.log.indexOf(removed));
    await walt.waitFor(presence('unavailable', 'xena@localhost/r'));
    expect(await rosterItems(walt)).toEqual({});
    expect((await rosterItems(xena))['walt@localhost']).toMatchObject({ subscription: 'none' });
  });
});

describe('the account of a contact (XEP-0030 §8, XEP-0199)', () => {
  it('answers disco#info and ping for a contact that shares its presence; identical errors otherwise', async () => {
    const bob = await online('bob', 'disco');
    const carol = await online('carol', 'disco');
    // alice subscribed to bob in the first test: bob shares presence with alice (from).
    const alice = await online('alice', 'disco');
    const info = await alice.iq(
      `<iq type='get' id='d1' to='bob@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>`,
      'd1',
    );
    expect(info.attrs.type).toBe('result');
    expect(info.getChild('query')?.getChild('identity')?.attrs).toMatchObject({ category: 'account' });
    const ping = await alice.iq(
      `<iq type='get' id='p1' to='bob@localhost'><ping xmlns='urn:xmpp:ping'/></iq>`,
      'p1',
    );
    expect(ping.attrs.type).toBe('result');
    // bob is not subscribed to alice: for him, her account is as one that does not exist.
    for (const [peer, target] of [
      [bob, 'alice@localhost'],
      [carol, 'bob@localhost'],
      [carol, 'nobody@localhost'],
    ] as const) {
      const id = `x-${target}-${peer.bare}`;
      const answer = await peer.iq(
        `<iq type='get' id='${id}' to='${target}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>`,
        id,
      );
      expect(answer.getChild('error')?.getChild('service-unavailable', STANZAS), id).toBeDefined();
      const pid = `p-${id}`;
      const pong = await peer.iq(
        `<iq type='get' id='${pid}' to='${target}'><ping xmlns='urn:xmpp:ping'/></iq>`,
        pid,
      );
      expect(pong.getChild('error')?.getChild('service-unavailable', STANZAS), pid).toBeDefined();
    }
  });
});

describe("RFC 6121 §4.6 directed presence to one's own account", () => {
  it("is delivered, and the session's unavailable presence reaches the other resource once (§4.5.2), not again as a directed one", async () => {
    const one = await online('yuri', 'one');
    const two = await online('yuri', 'two');
    one.send(`<presence to='yuri@localhost'><status>to myself</status></presence>`);
    await two.waitFor((el) => el.name === 'presence' && el.getChildText('status') === 'to myself');
    one.send(`<presence type='unavailable'/>`);
    await two.waitFor(presence('unavailable', 'yuri@localhost/one'));
    await one.barrier();
    await two.barrier();
    expect(two.count(presence('unavailable', 'yuri@localhost/one'))).toBe(1);
  });
});

describe("RFC 6121 §4.6.3 directed presence to a subscriber's resource that is not available", () => {
  it('gets the unavailable presence: the broadcast to subscribers reached only their available resources', async () => {
    const zara = await online('zara');
    const abel = await online('abel');
    await mutual(zara, abel);
    // A second session of abel, connected and never available (no initial presence).
    const quiet = await online('abel', 'quiet', { presence: false });
    zara.send(`<presence to='abel@localhost/quiet'><status>just you</status></presence>`);
    await quiet.waitFor((el) => el.name === 'presence' && el.getChildText('status') === 'just you');
    // "the user's server MUST send unavailable presence" to it when zara goes: the broadcast
    // reaches abel/r (available); abel/quiet only as the recipient of directed presence.
    zara.send(`<presence type='unavailable'/>`);
    await abel.waitFor(presence('unavailable', 'zara@localhost/r'));
    await quiet.waitFor(presence('unavailable', 'zara@localhost/r'));
    await abel.barrier();
    await quiet.barrier();
    expect(abel.count(presence('unavailable', 'zara@localhost/r'))).toBe(1);
    expect(quiet.count(presence('unavailable', 'zara@localhost/r'))).toBe(1);
  });
});
