/**
 * The decide functions of the modules, without DynamoDB: the XEP-0198 resume decision, XEP-0013
 * command and page decoding, XEP-0160 storage rules and XEP-0059 set decoding.
 */
import { parse } from 'ltx';
import { describe, expect, it } from 'vitest';
import { decodePageRequest as decodeRsm, encodePageReply } from '../../shared/core/rsm.ts';
import { decodeCommand, decodePageRequest } from '../../shared/modules/xep-0013-flexible-offline.ts';
import { shouldStore } from '../../shared/modules/xep-0160-offline-storage.ts';
import { decodeResume, judgeResume } from '../../shared/modules/xep-0198-stream-management.ts';
import type { SmQueueItem } from '../../shared/store/sm-queue.ts';

const item = (extra: Partial<SmQueueItem> = {}): SmQueueItem => ({
  smId: 'abc',
  user: 'alice@localhost',
  resource: 'phone',
  version: 'sm3',
  resumable: true,
  max: 300,
  out: 10,
  base: 4,
  entries: [],
  ...extra,
});
const context = { user: 'alice@localhost', version: 'sm3' as const, now: 1_000_000 };

describe('XEP-0198 resume decision', () => {
  it('decodes previd and h; sm:3 requires h, the seed sm:1 does not', () => {
    expect(decodeResume(parse("<resume xmlns='urn:xmpp:sm:3' previd='abc' h='7'/>"), 'sm3')).toEqual({
      ok: true,
      previd: 'abc',
      h: 7,
    });
    expect(decodeResume(parse("<resume xmlns='urn:xmpp:sm:3' previd='abc'/>"), 'sm3')).toEqual({
      ok: false,
      condition: 'bad-request',
    });
    // Seed §5: the resume "SHOULD include an 'h' attribute": without one, nothing new is acknowledged.
    expect(decodeResume(parse("<resume xmlns='urn:xmpp:sm:1' previd='abc'/>"), 'sm1')).toEqual({
      ok: true,
      previd: 'abc',
      h: -1,
    });
    expect(decodeResume(parse("<resume xmlns='urn:xmpp:sm:3' previd='abc' h='foo'/>"), 'sm3')).toMatchObject({
      condition: 'bad-request',
    });
    expect(
      decodeResume(parse(`<resume xmlns='urn:xmpp:sm:3' previd='${'x'.repeat(65)}' h='1'/>`), 'sm3'),
    ).toEqual({
      ok: false,
      condition: 'item-not-found',
    });
  });

  it('resumes within the window, acknowledging up to h', () => {
    expect(judgeResume({ previd: 'abc', h: 8 }, item(), context)).toEqual({ kind: 'resume', acked: 8 });
    expect(judgeResume({ previd: 'abc', h: -1 }, item(), context)).toEqual({ kind: 'resume', acked: 4 });
  });

  it('never reveals another user’s session or a bogus one', () => {
    expect(judgeResume({ previd: 'abc', h: 1 }, undefined, context)).toEqual({
      kind: 'refuse',
      condition: 'item-not-found',
    });
    expect(judgeResume({ previd: 'abc', h: 1 }, item({ user: 'mallory@localhost' }), context)).toEqual({
      kind: 'refuse',
      condition: 'item-not-found',
    });
  });

  it('tells an ended session’s h, refuses another version, and expires a closed window', () => {
    expect(judgeResume({ previd: 'abc', h: 1 }, item({ ended: true, inbound: 3 }), context)).toEqual({
      kind: 'refuse',
      condition: 'item-not-found',
      h: 3,
    });
    expect(judgeResume({ previd: 'abc', h: 1 }, item({ version: 'sm1' }), context)).toEqual({
      kind: 'refuse',
      condition: 'unexpected-request',
    });
    expect(
      judgeResume(
        { previd: 'abc', h: 5 },
        item({ connectionId: undefined, sweepAt: context.now, inbound: 2 }),
        context,
      ),
    ).toEqual({ kind: 'expired', h: 2 });
  });

  it('refuses an h beyond what was sent (handled-count-too-high)', () => {
    expect(judgeResume({ previd: 'abc', h: 11 }, item(), context)).toEqual({
      kind: 'too-high',
      h: 11,
      sendCount: 10,
    });
  });

  it('ends a session resumed with an h behind what the client acknowledged before, never "too high"', () => {
    // sm:3 §7 keeps <handled-count-too-high/> for "an 'h' value that is too high"; a count below
    // the last acknowledged one (base 4) could never meet the server's numbering again.
    expect(judgeResume({ previd: 'abc', h: 3 }, item({ inbound: 6 }), context)).toEqual({
      kind: 'behind',
      h: 6,
    });
    expect(judgeResume({ previd: 'abc', h: 4 }, item(), context)).toEqual({ kind: 'resume', acked: 4 });
    // Across the wrap: base 2^32 - 2 (mod 2^32), h 1 is three ahead; 2^32 - 3 is one behind.
    const wrapped = item({ base: 2 ** 32 - 2, out: 2 ** 32 + 5 });
    expect(judgeResume({ previd: 'abc', h: 1 }, wrapped, context)).toEqual({
      kind: 'resume',
      acked: 2 ** 32 + 1,
    });
    expect(judgeResume({ previd: 'abc', h: 2 ** 32 - 3 }, wrapped, context)).toMatchObject({
      kind: 'behind',
    });
  });
});

describe('XEP-0013 command decoding', () => {
  const OFFLINE = 'http://jabber.org/protocol/offline';
  it('reads the seed’s view, remove, fetch and purge requests', () => {
    // XEP-0013 §2.3 Example: <offline xmlns='http://jabber.org/protocol/offline'><item action='view' node='…'/></offline>
    expect(
      decodeCommand(
        'get',
        parse(`<offline xmlns='${OFFLINE}'><item action='view' node='2003-02-27T22:52:37.225Z'/></offline>`),
      ),
    ).toEqual({ action: 'view', nodes: ['2003-02-27T22:52:37.225Z'] });
    expect(
      decodeCommand('set', parse(`<offline xmlns='${OFFLINE}'><item action='remove' node='n1'/></offline>`)),
    ).toEqual({
      action: 'remove',
      nodes: ['n1'],
    });
    expect(decodeCommand('get', parse(`<offline xmlns='${OFFLINE}'><fetch/></offline>`))).toEqual({
      action: 'fetch',
    });
    expect(decodeCommand('set', parse(`<offline xmlns='${OFFLINE}'><purge/></offline>`))).toEqual({
      action: 'purge',
    });
  });

  const bad: [string, 'get' | 'set', string][] = [
    ['an empty offline element', 'get', `<offline xmlns='${OFFLINE}'/>`],
    ['fetch in a set', 'set', `<offline xmlns='${OFFLINE}'><fetch/></offline>`],
    ['purge in a get', 'get', `<offline xmlns='${OFFLINE}'><purge/></offline>`],
    [
      'fetch with items',
      'get',
      `<offline xmlns='${OFFLINE}'><fetch/><item action='view' node='n'/></offline>`,
    ],
    [
      'a remove item in a get',
      'get',
      `<offline xmlns='${OFFLINE}'><item action='remove' node='n'/></offline>`,
    ],
    ['an item without node', 'get', `<offline xmlns='${OFFLINE}'><item action='view'/></offline>`],
    ['an unknown child', 'get', `<offline xmlns='${OFFLINE}'><shred/></offline>`],
  ];
  for (const [name, type, xml] of bad) {
    it(`answers ${name} with bad-request`, () => {
      expect(() => decodeCommand(type, parse(xml))).toThrow(
        expect.objectContaining({ condition: 'bad-request' }),
      );
    });
  }

  it('pages headers with RSM, refusing page jumps it cannot serve cheaply', () => {
    const RSM = 'http://jabber.org/protocol/rsm';
    expect(
      decodePageRequest(parse(`<query><set xmlns='${RSM}'><max>5000</max><before/></set></query>`)),
    ).toEqual({
      rsm: true,
      max: 250,
      lastPage: true,
    });
    expect(() =>
      decodePageRequest(parse(`<query><set xmlns='${RSM}'><index>3</index></set></query>`)),
    ).toThrow(expect.objectContaining({ condition: 'feature-not-implemented' }));
  });
});

describe('XEP-0059 set decoding and encoding', () => {
  const RSM = 'http://jabber.org/protocol/rsm';
  const limits = { defaultMax: 10, maxMax: 100 };
  const set = (inner: string) => parse(`<list><set xmlns='${RSM}'>${inner}</set></list>`);

  it('reads max, after, before, empty before and index', () => {
    expect(decodeRsm(parse('<list/>'), limits)).toEqual({ rsm: false, max: 10, lastPage: false });
    expect(decodeRsm(set('<max>3</max><after>x</after>'), limits)).toEqual({
      rsm: true,
      max: 3,
      after: 'x',
      lastPage: false,
    });
    expect(decodeRsm(set('<before>y</before>'), limits)).toEqual({
      rsm: true,
      max: 10,
      before: 'y',
      lastPage: false,
    });
    expect(decodeRsm(set('<max>1000000</max><before/>'), limits)).toEqual({
      rsm: true,
      max: 100,
      lastPage: true,
    });
    expect(decodeRsm(set('<index>7</index>'), limits)).toEqual({
      rsm: true,
      max: 10,
      lastPage: false,
      index: 7,
    });
  });

  for (const [name, inner] of [
    ['a negative max', '<max>-1</max>'],
    ['a negative index', '<index>-2</index>'],
    ['after and before together', '<after>a</after><before>b</before>'],
    ['an empty after', '<after/>'],
    ['index with after', '<index>1</index><after>a</after>'],
  ]) {
    it(`refuses ${name} with bad-request`, () => {
      expect(() => decodeRsm(set(inner as string), limits)).toThrow(
        expect.objectContaining({ condition: 'bad-request' }),
      );
    });
  }

  it('encodes first, last with index, and count; no first/last for an empty page (§2.2)', () => {
    expect(encodePageReply({ first: 'a', last: 'b', firstIndex: 0, count: 2 }).toString()).toBe(
      `<set xmlns="${RSM}"><first index="0">a</first><last>b</last><count>2</count></set>`,
    );
    expect(encodePageReply({ count: 0 }).toString()).toBe(`<set xmlns="${RSM}"><count>0</count></set>`);
  });
});

describe('XEP-0160 storage rules', () => {
  const cases: [string, string, boolean][] = [
    ['a chat message with a body', "<message type='chat'><body>hi</body></message>", true],
    ['a normal message', '<message><body>hi</body></message>', true],
    ['a headline', "<message type='headline'><body>news</body></message>", false],
    ['a groupchat message', "<message type='groupchat'><body>hi</body></message>", false],
    ['an error', "<message type='error'><body>hi</body></message>", false],
    // XEP-0160 §3: "Messages that contain only chat state notifications SHOULD NOT be stored".
    [
      'a chat state alone',
      "<message type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
      false,
    ],
    ['a receipt', "<message type='chat'><received xmlns='urn:xmpp:receipts' id='x'/></message>", true],
    // XEP-0334: <no-store/> refuses storage, <store/> asks for it.
    [
      'a no-store hint',
      "<message type='chat'><body>x</body><no-store xmlns='urn:xmpp:hints'/></message>",
      false,
    ],
    [
      'a store hint on a chat state',
      "<message type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/><store xmlns='urn:xmpp:hints'/></message>",
      true,
    ],
    // XEP-0160 §3 "SHOULD NOT be stored": a headline never is, hint or not (it is never routed to
    // storage; a flood's hold stores what arrives meanwhile, and must not keep one either).
    [
      'a store hint on a headline',
      "<message type='headline'><store xmlns='urn:xmpp:hints'/></message>",
      false,
    ],
  ];
  for (const [name, xml, stored] of cases) {
    it(`${stored ? 'stores' : 'does not store'} ${name}`, () => {
      expect(shouldStore(parse(xml))).toBe(stored);
    });
  }
});
