/**
 * XEP-0136 0.9 §2 (disco), §3 (preferences), §7.1/§7.3 (the `<auto/>` toggle) and the 0.5
 * draft's Save Mode and Off-the-Record requests, end to end with raw frames through the local
 * stack. Each test quotes the seed example it plays (montague.net and capulet.com become our
 * `localhost`; romeo, juliet and benvolio are fresh accounts).
 */
import { type Element, parse } from 'ltx';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RawClient } from '../../infra/local/raw-client.ts';
import { MAX_PREF_ITEMS } from '../../shared/modules/xep-0136-message-archiving.ts';
import {
  ARCHIVE,
  ArchiveWorld,
  attrsOf,
  condition,
  errorCondition,
  exchange,
  ok,
  PREF_GET,
} from '../support/archive.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

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

/** Juliet and Romeo as contacts both ways (RFC 6121 subscription 'both'), as the roster module leaves them. */
async function relate(juliet: string, romeo: string): Promise<void> {
  const entry = (contact: string) => ({
    contact,
    listed: true,
    groups: [],
    subscription: 'both' as const,
    pendingOut: false,
    approved: false,
  });
  await stack.server.roster.apply(juliet, romeo, { contactIsLocal: true }, () => ({
    user: entry(romeo),
    contact: entry(juliet),
    outcome: undefined,
  }));
}

/** Reads frames until `count` archive pushes arrived; returns their payloads. */
async function pushes(raw: RawClient, count: number): Promise<Element[]> {
  const found: Element[] = [];
  while (found.length < count) {
    const el = await raw.until((e) => e.name === 'iq' && e.attrs.type === 'set');
    // The client acknowledges a push; the server must take the result silently.
    raw.send(`<iq type='result' id='${el.attrs.id}'/>`);
    found.push(el);
  }
  return found;
}

describe('XEP-0136 0.9 §2 and 0.5 §2: service discovery', () => {
  it('advertises #auto #manage #manual #pref (0.9) and #save #otr (0.5)', async () => {
    // <iq type='get' to='montague.net'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>
    const romeo = await world.connect(await world.newUser('romeo'), 'orchard');
    const query = await ok(
      romeo,
      `<iq type='get' to='localhost' id='disco1'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>`,
    );
    const features = (query?.getChildren('feature') ?? []).map((f) => f.attrs.var);
    for (const name of ['auto', 'manage', 'manual', 'pref', 'save', 'otr']) {
      expect(features).toContain(`${ARCHIVE}#${name}`);
    }
  });
});

describe('XEP-0136 0.9 §3 archiving preferences', () => {
  it('returns the service defaults with unset=true to a user who never set any', async () => {
    // <iq type='result' id='pref1' to='juliet@capulet.com/chamber'>
    //   <pref xmlns='http://jabber.org/protocol/archive'>
    //     <default save='false' otr='allow' unset='true'/>
    //     <method type='auto' use='allow'/> <method type='local' use='allow'/>
    //     <method type='manual' use='allow'/> <auto save='false'/> </pref></iq>
    const juliet = await world.connect(await world.newUser('juliet'), 'chamber');
    const { reply } = await exchange(juliet, PREF_GET);
    expect(reply.attrs).toMatchObject({ type: 'result', id: 'pref1' });
    expect(reply.attrs.to).toMatch(/^juliet\d+@localhost\/chamber$/);
    const pref = reply.getChild('pref', ARCHIVE);
    expect(attrsOf(pref, 'default')).toEqual([{ save: 'false', otr: 'allow', unset: 'true' }]);
    expect(attrsOf(pref, 'method')).toEqual([
      { type: 'auto', use: 'allow' },
      { type: 'local', use: 'allow' },
      { type: 'manual', use: 'allow' },
    ]);
    expect(attrsOf(pref, 'auto')).toEqual([{ save: 'false' }]);
    expect(pref?.getChildren('item')).toHaveLength(0);
  });

  it('plays "Server Returns Preferences" after the user set them', async () => {
    const juliet = await world.connect(await world.newUser('juliet'), 'chamber');
    await ok(
      juliet,
      `<iq type='set' id='s1'><pref xmlns='${ARCHIVE}'>
        <default save='body' otr='allow' expire='31536000'/>
        <item jid='romeo@montague.net' save='false' otr='require'/>
        <item jid='benvolio@montague.net' save='all' expire='630720000' otr='deny'/>
        <method type='auto' use='never'/>
        <method type='local' use='allow'/>
        <method type='manual' use='prefer'/>
      </pref></iq>`,
    );
    // <default save='body' otr='allow' expire='31536000'/>
    // <item jid='romeo@montague.net' save='false' otr='require'/>
    // <item jid='benvolio@montague.net' save='all' expire='630720000' otr='deny'/>
    // <method type='auto' use='never'/> <method type='local' use='allow'/>
    // <method type='manual' use='prefer'/> <auto save='false'/>
    const pref = await ok(juliet, PREF_GET);
    expect(attrsOf(pref, 'default')).toEqual([{ save: 'body', otr: 'allow', expire: '31536000' }]);
    expect(attrsOf(pref, 'item')).toEqual(
      expect.arrayContaining([
        { jid: 'romeo@montague.net', save: 'false', otr: 'require' },
        { jid: 'benvolio@montague.net', save: 'all', expire: '630720000', otr: 'deny' },
      ]),
    );
    expect(attrsOf(pref, 'method')).toEqual([
      { type: 'auto', use: 'never' },
      { type: 'local', use: 'allow' },
      { type: 'manual', use: 'prefer' },
    ]);
    expect(attrsOf(pref, 'auto')).toEqual([{ save: 'false' }]);
  });

  it('pushes a new default (pref2) to chamber and pda, which asked for preferences, and not to a resource that did not', async () => {
    const bare = await world.newUser('juliet');
    const chamber = await world.connect(bare, 'chamber');
    const pda = await world.connect(bare, 'pda');
    const balcony = await world.connect(bare, 'balcony');
    await ok(pda, PREF_GET);
    await ok(chamber, PREF_GET);
    // <iq type='set' id='pref2'><pref xmlns='http://jabber.org/protocol/archive'>
    //   <default save='false' otr='try'/></pref></iq>
    const { reply } = await exchange(
      chamber,
      `<iq type='set' id='pref2'><pref xmlns='${ARCHIVE}'><default save='false' otr='try'/></pref></iq>`,
    );
    // <iq type='result' id='pref2' to='juliet@capulet.com/chamber'/>
    expect(reply.attrs).toMatchObject({ type: 'result', id: 'pref2', to: `${bare}/chamber` });
    expect(reply.getChildElements()).toHaveLength(0);
    // <iq type='set' id='push1' to='juliet@capulet.com/chamber'><pref …><default save='false' otr='try'/></pref></iq>
    // <iq type='set' id='push2' to='juliet@capulet.com/pda'>…</iq>
    for (const [raw, resource] of [
      [chamber, 'chamber'],
      [pda, 'pda'],
    ] as const) {
      const [push] = await pushes(raw, 1);
      expect(push?.attrs).toMatchObject({ type: 'set', to: `${bare}/${resource}` });
      const pref = push?.getChild('pref', ARCHIVE);
      expect(attrsOf(pref, 'default')).toEqual([{ save: 'false', otr: 'try' }]);
      expect(pref?.getChildren('auto')).toHaveLength(0);
    }
    await stack.gateway.drained();
    expect(await balcony.framesBeforePong()).toEqual([]);
    // The client's result to the push was taken silently: the stream still answers.
    expect(attrsOf(await ok(chamber, PREF_GET), 'default')).toEqual([{ save: 'false', otr: 'try' }]);
  });

  it('pushes a contact item (pref3) and method preferences (pref4)', async () => {
    const bare = await world.newUser('juliet');
    const chamber = await world.connect(bare, 'chamber');
    const pda = await world.connect(bare, 'pda');
    await ok(chamber, PREF_GET);
    await ok(pda, PREF_GET);
    // <item jid='romeo@montague.net' save='body' expire='604800' otr='allow'/>
    const { reply } = await exchange(
      chamber,
      `<iq type='set' id='pref3'><pref xmlns='${ARCHIVE}'><item jid='romeo@montague.net' save='body' expire='604800' otr='allow'/></pref></iq>`,
    );
    expect(reply.attrs).toMatchObject({ type: 'result', id: 'pref3' });
    for (const raw of [chamber, pda]) {
      const [push] = await pushes(raw, 1);
      expect(attrsOf(push?.getChild('pref', ARCHIVE), 'item')).toEqual([
        { jid: 'romeo@montague.net', save: 'body', expire: '604800', otr: 'allow' },
      ]);
    }
    // <method type='auto' use='allow'/> <method type='local' use='never'/> <method type='manual' use='prefer'/>
    await exchange(
      chamber,
      `<iq type='set' id='pref4'><pref xmlns='${ARCHIVE}'><method type='auto' use='allow'/><method type='local' use='never'/><method type='manual' use='prefer'/></pref></iq>`,
    );
    for (const raw of [chamber, pda]) {
      const [push] = await pushes(raw, 1);
      expect(attrsOf(push?.getChild('pref', ARCHIVE), 'method')).toEqual([
        { type: 'auto', use: 'allow' },
        { type: 'local', use: 'never' },
        { type: 'manual', use: 'prefer' },
      ]);
    }
  });

  it('keeps items by JID whatever the JID: `constructor` is a contact like any, `__proto__` is no JID (jid-malformed)', async () => {
    const bare = await world.newUser('juliet');
    const chamber = await world.connect(bare, 'chamber');
    // RFC 6120 §8.3.3.8 jid-malformed: `__proto__` is no domainpart (RFC 7622's are IDNA2008
    // labels); stored as a key it would be read back as the preferences' prototype.
    expect(
      await condition(
        chamber,
        `<iq type='set' id='proto'><pref xmlns='${ARCHIVE}'><item jid='__proto__' save='body' otr='allow'/></pref></iq>`,
      ),
    ).toBe('jid-malformed');
    // A contact at the domain `constructor` follows the default until it has an item of its own.
    const before = await ok(chamber, PREF_GET);
    expect(attrsOf(before?.getChild('pref', ARCHIVE) ?? before, 'item')).toEqual([]);
    await ok(
      chamber,
      `<iq type='set' id='ctor'><pref xmlns='${ARCHIVE}'><item jid='constructor' save='false' otr='deny'/></pref></iq>`,
    );
    const after = await ok(chamber, PREF_GET);
    expect(attrsOf(after?.getChild('pref', ARCHIVE) ?? after, 'item')).toEqual([
      { jid: 'constructor', save: 'false', otr: 'deny' },
    ]);
  });

  it('refuses a preference change that grows them past MAX_PREF_ITEMS contacts, and takes one that does not', async () => {
    // The preferences are one item, read for every message archived for the user (README, Limits).
    const juliet = await world.connect(await world.newUser('juliet'), 'chamber');
    const items = (from: number, to: number, save = 'body') =>
      Array.from(
        { length: to - from },
        (_, i) => `<item jid='c${from + i}@montague.net' save='${save}' otr='allow'/>`,
      ).join('');
    for (let from = 0; from < MAX_PREF_ITEMS; from += 250)
      await ok(juliet, `<iq type='set'><pref xmlns='${ARCHIVE}'>${items(from, from + 250)}</pref></iq>`);
    const { reply } = await exchange(
      juliet,
      `<iq type='set' id='one-more'><pref xmlns='${ARCHIVE}'>${items(MAX_PREF_ITEMS, MAX_PREF_ITEMS + 1)}</pref></iq>`,
    );
    expect(errorCondition(reply)).toBe('not-acceptable');
    // Changing a contact's mode adds none.
    await ok(juliet, `<iq type='set'><pref xmlns='${ARCHIVE}'>${items(0, 1, 'false')}</pref></iq>`);
    const prefs = await ok(juliet, PREF_GET);
    expect(attrsOf(prefs, 'item')).toHaveLength(MAX_PREF_ITEMS);
    expect(attrsOf(prefs, 'item').find((item) => item.jid === 'c0@montague.net')?.save).toBe('false');
  });

  it.each([
    ["save='true' (a 0.5 value in a 0.9 element)", "<default save='true' otr='allow'/>", 'bad-request'],
    ["otr='maybe'", "<default save='body' otr='maybe'/>", 'bad-request'],
    ["otr='require' with save='body'", "<default save='body' otr='require'/>", 'bad-request'],
    ["expire='-1'", "<default save='body' otr='allow' expire='-1'/>", 'bad-request'],
    ["expire='soon'", "<default save='body' otr='allow' expire='soon'/>", 'bad-request'],
    ['an item without jid', "<item save='body' otr='allow'/>", 'bad-request'],
    ['an invalid jid', "<item jid='a@b@c' save='body' otr='allow'/>", 'jid-malformed'],
    ['a missing otr', "<default save='body'/>", 'bad-request'],
    ["method use='sometimes'", "<method type='auto' use='sometimes'/>", 'bad-request'],
    ['<auto/> inside <pref/>', "<auto save='true'/>", 'bad-request'],
    ['an unknown archive child', '<frobnicate/>', 'bad-request'],
    ['nothing to set', '', 'bad-request'],
  ])('refuses a pref set with %s', async (_name, inner, expected) => {
    const juliet = await world.connect(await world.newUser('juliet'), 'chamber');
    expect(await condition(juliet, `<iq type='set'><pref xmlns='${ARCHIVE}'>${inner}</pref></iq>`)).toBe(
      expected,
    );
    // Nothing was stored.
    expect(attrsOf(await ok(juliet, PREF_GET), 'default')[0]?.unset).toBe('true');
  });
});

describe('XEP-0136 0.9 §7 the <auto/> toggle', () => {
  it("plays auto1: <auto save='true'/> is per stream, shown in <pref/>, and never pushed", async () => {
    const bare = await world.newUser('romeo');
    const orchard = await world.connect(bare, 'orchard');
    const castle = await world.connect(bare, 'castle');
    await ok(castle, PREF_GET);
    // <iq type='set' id='auto1'><auto save='true' xmlns='http://jabber.org/protocol/archive'/></iq>
    const { reply } = await exchange(
      orchard,
      `<iq type='set' id='auto1'><auto save='true' xmlns='${ARCHIVE}'/></iq>`,
    );
    expect(reply.attrs).toMatchObject({ type: 'result', id: 'auto1' });
    expect(attrsOf(await ok(orchard, PREF_GET), 'auto')).toEqual([{ save: 'true' }]);
    expect(attrsOf(await ok(castle, PREF_GET), 'auto')).toEqual([{ save: 'false' }]);
    // §3.2: "changes to the <auto/> element MUST NOT be replicated".
    await stack.gateway.drained();
    expect(await castle.framesBeforePong()).toEqual([]);
    // A new stream of the same user starts with auto-archiving off again (§7.1).
    const again = await world.connect(bare, 'orchard2');
    expect(attrsOf(await ok(again, PREF_GET), 'auto')).toEqual([{ save: 'false' }]);
  });

  it.each([
    ["save='maybe'", "<auto save='maybe' xmlns='ARCHIVE'/>", 'bad-request'],
    ['no save', "<auto xmlns='ARCHIVE'/>", 'bad-request'],
    ["encrypt='perhaps'", "<auto save='true' encrypt='perhaps' xmlns='ARCHIVE'/>", 'bad-request'],
  ])('refuses <auto/> with %s', async (_name, payload, expected) => {
    const romeo = await world.connect(await world.newUser('romeo'), 'orchard');
    expect(await condition(romeo, `<iq type='set'>${payload.replace('ARCHIVE', ARCHIVE)}</iq>`)).toBe(
      expected,
    );
  });

  it('answers an <auto/> get with bad-request (it is an iq set)', async () => {
    const romeo = await world.connect(await world.newUser('romeo'), 'orchard');
    expect(await condition(romeo, `<iq type='get'><auto xmlns='${ARCHIVE}' save='true'/></iq>`)).toBe(
      'bad-request',
    );
  });
});

describe('XEP-0136 0.5 §3.1 Save Mode', () => {
  it('plays save1 (get), save2 (default) and save3 (contact) with pushes to save-aware resources', async () => {
    const bare = await world.newUser('juliet');
    const chamber = await world.connect(bare, 'chamber');
    const pda = await world.connect(bare, 'pda');
    const other = await world.connect(bare, 'other');
    // <iq type='get' id='save1' from='juliet@capulet.com/chamber'><save xmlns='http://jabber.org/protocol/archive'/></iq>
    // → <save xmlns='http://jabber.org/protocol/archive'> <default save='true'/> </save>
    const first = await ok(chamber, `<iq type='get' id='save1'><save xmlns='${ARCHIVE}'/></iq>`);
    expect(attrsOf(first, 'default')).toEqual([{ save: 'false' }]);
    await ok(pda, `<iq type='get' id='save1'><save xmlns='${ARCHIVE}'/></iq>`);

    // <iq type='set' id='save2'><save …><default save='true'/></save></iq> → result, then
    // savepush1 to chamber and savepush2 to pda.
    const { reply } = await exchange(
      chamber,
      `<iq type='set' id='save2'><save xmlns='${ARCHIVE}'><default save='true'/></save></iq>`,
    );
    expect(reply.attrs).toMatchObject({ type: 'result', id: 'save2' });
    for (const raw of [chamber, pda]) {
      const [push] = await pushes(raw, 1);
      expect(attrsOf(push?.getChild('save', ARCHIVE), 'default')).toEqual([{ save: 'true' }]);
    }
    // <item jid='romeo@montague.net' save='false'/> (save3, savepush3/4)
    await exchange(
      chamber,
      `<iq type='set' id='save3'><save xmlns='${ARCHIVE}'><item jid='romeo@montague.net' save='false'/></save></iq>`,
    );
    for (const raw of [chamber, pda]) {
      const [push] = await pushes(raw, 1);
      expect(attrsOf(push?.getChild('save', ARCHIVE), 'item')).toEqual([
        { jid: 'romeo@montague.net', save: 'false' },
      ]);
    }
    await stack.gateway.drained();
    expect(await other.framesBeforePong()).toEqual([]);
    // <default save='true'/> <item jid='romeo@montague.net' save='false'/>
    const after = await ok(chamber, `<iq type='get' id='save1'><save xmlns='${ARCHIVE}'/></iq>`);
    expect(attrsOf(after, 'default')).toEqual([{ save: 'true' }]);
    expect(attrsOf(after, 'item')).toEqual([{ jid: 'romeo@montague.net', save: 'false' }]);
    // The 0.9 view of the same preferences: true keeps bodies.
    const pref = await ok(chamber, PREF_GET);
    expect(attrsOf(pref, 'default')[0]?.save).toBe('body');
  });

  it.each([
    ["save='body' (a 0.9 value in a 0.5 element)", "<default save='body'/>"],
    ['otr on a 0.5 item', "<item jid='romeo@montague.net' save='true' otr='allow'/>"],
    ['expire on a 0.5 default', "<default save='true' expire='10'/>"],
    ['two defaults', "<default save='true'/><default save='false'/>"],
  ])('refuses a 0.5 save set with %s', async (_name, inner) => {
    const juliet = await world.connect(await world.newUser('juliet'), 'chamber');
    expect(await condition(juliet, `<iq type='set'><save xmlns='${ARCHIVE}'>${inner}</save></iq>`)).toBe(
      'bad-request',
    );
  });
});

describe('a change made through one draft, pushed to resources that asked in the other', () => {
  it('"MUST send any subsequent changes to any of the user\'s archiving preferences" (0.9 §3.2), in the form each asked in', async () => {
    const bare = await world.newUser('juliet');
    const p = await world.connect(bare, 'pref'); // 0.9: asked with <pref/>
    const s = await world.connect(bare, 'save'); // 0.5: "save-mode aware"
    const o = await world.connect(bare, 'otr'); // 0.5: "OTR aware"
    await ok(p, PREF_GET);
    await ok(s, `<iq type='get'><save xmlns='${ARCHIVE}'/></iq>`);
    await ok(o, `<iq type='get'><otr xmlns='${ARCHIVE}'/></iq>`);

    // 0.5 <save><default save='true'/></save> from the save-aware resource.
    await ok(s, `<iq type='set'><save xmlns='${ARCHIVE}'><default save='true'/></save></iq>`);
    const [fromSave] = await pushes(p, 1);
    expect(attrsOf(fromSave?.getChild('pref', ARCHIVE), 'default')).toEqual([{ save: 'body', otr: 'allow' }]);
    const [ownSave] = await pushes(s, 1);
    expect(attrsOf(ownSave?.getChild('save', ARCHIVE), 'default')).toEqual([{ save: 'true' }]);

    // 0.5 <record otr='true'/>: the 0.9 resource sees the contact's item, the save-aware one
    // that nothing is saved with it.
    // (Its own record push comes before its result, 0.5 §3.2.)
    const { before: ownRecord } = await exchange(
      o,
      `<iq type='set'><record xmlns='${ARCHIVE}' jid='tybalt@capulet.com' otr='true'/></iq>`,
    );
    expect(ownRecord.map((el) => attrsOf(el, 'record'))).toEqual([
      [{ jid: 'tybalt@capulet.com', otr: 'true' }],
    ]);
    const [fromRecord] = await pushes(p, 1);
    expect(attrsOf(fromRecord?.getChild('pref', ARCHIVE), 'item')).toEqual([
      { jid: 'tybalt@capulet.com', save: 'false', otr: 'require' },
    ]);
    const [saveView] = await pushes(s, 1);
    expect(attrsOf(saveView?.getChild('save', ARCHIVE), 'item')).toEqual([
      { jid: 'tybalt@capulet.com', save: 'false' },
    ]);

    // 0.5 <record otr='false'/> for that contact removes its item (it had none before): the 0.9
    // resource is told the item it amounts to now, the default's modes, instead of keeping
    // otr='require' ("MUST send any subsequent changes", 0.9 §3.2).
    await exchange(
      o,
      `<iq type='set'><record xmlns='${ARCHIVE}' jid='tybalt@capulet.com' otr='false'/></iq>`,
    );
    const [offRecord] = await pushes(p, 1);
    expect(attrsOf(offRecord?.getChild('pref', ARCHIVE), 'item')).toEqual([
      { jid: 'tybalt@capulet.com', save: 'body', otr: 'allow' },
    ]);
    await pushes(s, 1);
    expect((await stack.server.archive.getPrefs(bare)).items['tybalt@capulet.com']).toBeUndefined();

    // 0.9 <pref><item … save='false' otr='require'/></pref>: the OTR-aware resource gets a record.
    await ok(
      p,
      `<iq type='set'><pref xmlns='${ARCHIVE}'><item jid='mercutio@montague.net' save='false' otr='require'/></pref></iq>`,
    );
    await pushes(p, 1);
    const [otrView] = await pushes(o, 1);
    expect(attrsOf(otrView, 'record')).toEqual([{ jid: 'mercutio@montague.net', otr: 'true' }]);
    const [saveView2] = await pushes(s, 1);
    expect(attrsOf(saveView2?.getChild('save', ARCHIVE), 'item')).toEqual([
      { jid: 'mercutio@montague.net', save: 'false' },
    ]);

    // A change none of a form's words show (an expiry) is not pushed in that form.
    await ok(
      p,
      `<iq type='set'><pref xmlns='${ARCHIVE}'><default save='body' otr='allow' expire='600'/></pref></iq>`,
    );
    await pushes(p, 1);
    await stack.gateway.drained();
    expect(await s.framesBeforePong()).toEqual([]);
    expect(await o.framesBeforePong()).toEqual([]);
  });
});

describe('XEP-0136 0.5 §3.2 Off-the-Record Mode', () => {
  it('plays otr1 (get), otr2 (record) with update1/update2 to OTR-aware resources, the result, and update3 to the contact', async () => {
    const juliet = await world.newUser('juliet');
    const romeo = await world.newUser('romeo');
    // Contacts: "a shared off-the-record state" needs a relationship to share it in.
    await relate(juliet, romeo);
    const chamber = await world.connect(juliet, 'chamber');
    const pda = await world.connect(juliet, 'pda');
    const orchard = await world.connect(romeo, 'orchard');
    const unaware = await world.connect(juliet, 'unaware');
    // <iq type='get' id='otr1'><otr xmlns='http://jabber.org/protocol/archive'/></iq>
    const empty = await ok(chamber, `<iq type='get' id='otr1'><otr xmlns='${ARCHIVE}'/></iq>`);
    expect(empty?.getChildren('record')).toHaveLength(0);
    await ok(pda, `<iq type='get' id='otr1'><otr xmlns='${ARCHIVE}'/></iq>`);
    await ok(orchard, `<iq type='get' id='otr1'><otr xmlns='${ARCHIVE}'/></iq>`);
    // <iq type='set' id='otr2'><record xmlns='http://jabber.org/protocol/archive' jid='romeo@montague.net' otr='true'/></iq>
    const { before, reply } = await exchange(
      chamber,
      `<iq type='set' id='otr2'><record xmlns='${ARCHIVE}' jid='${romeo}' otr='true'/></iq>`,
    );
    // "The user's server also broadcasts to all of the user's otr-aware resources … then sends the result".
    expect(before.map((el) => attrsOf(el, 'record'))).toEqual([[{ jid: romeo, otr: 'true' }]]);
    expect(reply.attrs).toMatchObject({ type: 'result', id: 'otr2' });
    const [update2] = await pushes(pda, 1);
    expect(attrsOf(update2, 'record')).toEqual([{ jid: romeo, otr: 'true' }]);
    // update3: "swaps the JIDs … and broadcasts the change to all of the contact's otr-aware resources".
    const [update3] = await pushes(orchard, 1);
    expect(update3?.attrs.to).toBe(`${romeo}/orchard`);
    expect(attrsOf(update3, 'record')).toEqual([{ jid: juliet, otr: 'true' }]);
    await stack.gateway.drained();
    expect(await unaware.framesBeforePong()).toEqual([]);
    // <record jid='priest@church.org' otr='true'/>: the contacts whose OTR Mode is true.
    const listed = await ok(chamber, `<iq type='get' id='otr1'><otr xmlns='${ARCHIVE}'/></iq>`);
    expect(attrsOf(listed, 'record')).toEqual([{ jid: romeo, otr: 'true' }]);
    // 0.9 view: otr='require' with save='false'.
    expect(attrsOf(await ok(chamber, PREF_GET), 'item')).toEqual([
      { jid: romeo, save: 'false', otr: 'require' },
    ]);
    // The contact's own preferences were not changed by Juliet.
    expect(attrsOf(await ok(orchard, PREF_GET), 'item')).toEqual([]);
  });

  it('tells no one who is not a contact: a stranger cannot push iq sets to an account by naming it', async () => {
    const mallory = await world.newUser('mallory');
    const romeo = await world.newUser('romeo');
    const orchard = await world.connect(romeo, 'orchard');
    await ok(orchard, `<iq type='get' id='otr1'><otr xmlns='${ARCHIVE}'/></iq>`);
    const cellar = await world.connect(mallory, 'cellar');
    await ok(cellar, `<iq type='set' id='spam'><record xmlns='${ARCHIVE}' jid='${romeo}' otr='true'/></iq>`);
    // Mallory's own OTR Mode with romeo is recorded: it is Mallory's archive.
    const listed = await ok(cellar, `<iq type='get' id='otr1'><otr xmlns='${ARCHIVE}'/></iq>`);
    expect(attrsOf(listed, 'record')).toEqual([{ jid: romeo, otr: 'true' }]);
    await stack.gateway.drained();
    expect(await orchard.framesBeforePong()).toEqual([]);
  });

  it.each([
    ['no jid', "<record xmlns='ARCHIVE' otr='true'/>", 'set', 'bad-request'],
    ["otr='yes'", "<record xmlns='ARCHIVE' jid='a@b' otr='yes'/>", 'set', 'bad-request'],
    ['a get', "<record xmlns='ARCHIVE' jid='a@b' otr='true'/>", 'get', 'bad-request'],
    ['an otr set', "<otr xmlns='ARCHIVE'/>", 'set', 'bad-request'],
  ])('refuses a record or otr request with %s', async (_name, payload, type, expected) => {
    const juliet = await world.connect(await world.newUser('juliet'), 'chamber');
    expect(await condition(juliet, `<iq type='${type}'>${payload.replace('ARCHIVE', ARCHIVE)}</iq>`)).toBe(
      expected,
    );
  });
});

describe('service policy from configuration', () => {
  let strict: TestStack;
  let strictWorld: ArchiveWorld;
  beforeAll(async () => {
    strict = await startTestStack({
      ARCHIVE_AUTO_REQUIRED: 'true',
      ARCHIVE_DEFAULT_SAVE: 'body',
      ARCHIVE_ALLOW_SAVE_ALL: 'false',
      ARCHIVE_DEFAULT_EXPIRE_SECONDS: '86400',
    });
    strictWorld = new ArchiveWorld(strict);
  });
  afterAll(async () => {
    strictWorld?.closeAll();
    await strict?.close();
  });

  it('starts every stream with auto on and refuses what the policy forbids with the errors the seeds name', async () => {
    const juliet = await strictWorld.connect(await strictWorld.newUser('juliet'), 'chamber');
    const pref = await ok(juliet, PREF_GET);
    expect(attrsOf(pref, 'default')).toEqual([
      { save: 'body', otr: 'allow', expire: '86400', unset: 'true' },
    ]);
    expect(attrsOf(pref, 'auto')).toEqual([{ save: 'true' }]);
    // §7.3: disabling auto-archiving when policy requires it.
    expect(await condition(juliet, `<iq type='set'><auto xmlns='${ARCHIVE}' save='false'/></iq>`)).toBe(
      'feature-not-implemented',
    );
    // §3.3: save='all' not kept; save='false' where everything is logged.
    expect(
      await condition(
        juliet,
        `<iq type='set'><pref xmlns='${ARCHIVE}'><default save='all' otr='allow'/></pref></iq>`,
      ),
    ).toBe('feature-not-implemented');
    expect(
      await condition(
        juliet,
        `<iq type='set'><pref xmlns='${ARCHIVE}'><default save='false' otr='allow'/></pref></iq>`,
      ),
    ).toBe('feature-not-implemented');
    // 0.5 §3.2: "Such a deployment MUST return a <not-allowed/> error in response to a request to enter Off-the-Record mode".
    expect(
      await condition(
        juliet,
        `<iq type='set'><record xmlns='${ARCHIVE}' jid='romeo@localhost' otr='true'/></iq>`,
      ),
    ).toBe('not-allowed');
  });
});

describe("save='all' refused by policy only while a resource archives automatically", () => {
  let noAll: TestStack;
  let noAllWorld: ArchiveWorld;
  beforeAll(async () => {
    noAll = await startTestStack({ ARCHIVE_ALLOW_SAVE_ALL: 'false' });
    noAllWorld = new ArchiveWorld(noAll);
  });
  afterAll(async () => {
    noAllWorld?.closeAll();
    await noAll?.close();
  });

  it('takes it from a user with no auto-archiving stream, and then refuses turning auto on', async () => {
    // §3.3: feature-not-implemented "If it does not allow the saving of full message stanza
    // content, and the client set the value of the 'save' attribute to "all", and any of the
    // user's connected resources have Automated Archiving enabled" — here none has.
    const juliet = await noAllWorld.connect(await noAllWorld.newUser('juliet'), 'chamber');
    await ok(
      juliet,
      `<iq type='set'><pref xmlns='${ARCHIVE}'><item jid='benvolio@montague.net' save='all' expire='630720000' otr='deny'/></pref></iq>`,
    );
    // §7.3: enabling auto-archiving while the 'all' mode is set is what is refused then.
    expect(await condition(juliet, `<iq type='set'><auto xmlns='${ARCHIVE}' save='true'/></iq>`)).toBe(
      'feature-not-implemented',
    );
  });

  it('refuses it while another resource of the user archives automatically', async () => {
    const user = await noAllWorld.newUser('romeo');
    const phone = await noAllWorld.connect(user, 'phone');
    await ok(phone, `<iq type='set'><auto xmlns='${ARCHIVE}' save='true'/></iq>`);
    const desk = await noAllWorld.connect(user, 'desk');
    expect(
      await condition(
        desk,
        `<iq type='set'><pref xmlns='${ARCHIVE}'><default save='all' otr='allow'/></pref></iq>`,
      ),
    ).toBe('feature-not-implemented');
  });
});

describe('pushes', () => {
  it('are iq sets without a from, and the client result to them is dropped without an answer', async () => {
    const bare = await world.newUser('juliet');
    const chamber = await world.connect(bare, 'chamber');
    await ok(chamber, PREF_GET);
    await exchange(
      chamber,
      `<iq type='set' id='p'><pref xmlns='${ARCHIVE}'><default save='body' otr='allow'/></pref></iq>`,
    );
    const push = await chamber.until((e) => e.name === 'iq' && e.attrs.type === 'set');
    expect(push.attrs.from).toBeUndefined();
    chamber.send(`<iq type='result' id='${push.attrs.id}'/>`);
    chamber.send(
      `<iq type='error' id='${push.attrs.id}'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>`,
    );
    await stack.gateway.drained();
    expect(await chamber.framesBeforePong()).toEqual([]);
    const { reply } = await exchange(chamber, PREF_GET);
    expect(errorCondition(reply)).toBeUndefined();
    expect(parse(reply.toString()).attrs.type).toBe('result');
  });
});
