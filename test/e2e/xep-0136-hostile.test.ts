/**
 * XEP-0136 against hostile and confused clients: nobody reads, lists, changes or learns the
 * existence of another user's archive (the same answer whether that account exists or not), and
 * a grid of malformed requests — bad dates, unknown children, huge `max`, negative `index`, the
 * 0.5 and 0.9 drafts mixed — each answered with a stanza error, never a crash.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RawClient } from '../../infra/local/raw-client.ts';
import {
  ARCHIVE,
  ArchiveWorld,
  condition,
  exchange,
  ok,
  RSM,
  rsmOf,
  stores,
  XMLDSIG,
  XMLENC,
} from '../support/archive.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

let stack: TestStack;
let world: ArchiveWorld;
let romeo: string;
let juliet: string;
let orchard: RawClient;
let chamber: RawClient;

const UP1 = `<store xmlns='${ARCHIVE}' with='nurse@localhost/garden' start='1469-07-21T02:56:15Z' subject='secret'><from secs='0'><body>private</body></from></store>`;

beforeAll(async () => {
  stack = await startTestStack();
  world = new ArchiveWorld(stack);
  romeo = await world.newUser('romeo');
  juliet = await world.newUser('juliet');
  orchard = await world.connect(romeo, 'orchard');
  chamber = await world.connect(juliet, 'chamber');
  await ok(chamber, `<iq type='set'>${UP1}</iq>`);
});

afterAll(async () => {
  world?.closeAll();
  await stack?.close();
});

const REQUESTS: [string, 'get' | 'set', string][] = [
  ['pref get', 'get', `<pref xmlns='${ARCHIVE}'/>`],
  ['pref set', 'set', `<pref xmlns='${ARCHIVE}'><default save='body' otr='allow'/></pref>`],
  ['auto', 'set', `<auto xmlns='${ARCHIVE}' save='true'/>`],
  ['list', 'get', `<list xmlns='${ARCHIVE}'/>`],
  [
    'retrieve',
    'get',
    `<retrieve xmlns='${ARCHIVE}' with='nurse@localhost/garden' start='1469-07-21T02:56:15Z'/>`,
  ],
  ['remove', 'set', `<remove xmlns='${ARCHIVE}'/>`],
  ['store', 'set', UP1],
  ['keys', 'get', `<keys xmlns='${ARCHIVE}'><KeyName xmlns='${XMLDSIG}'>k</KeyName></keys>`],
  [
    'delete',
    'set',
    `<delete xmlns='${ARCHIVE}' with='nurse@localhost/garden' start='1469-07-21T02:56:15Z'><KeyName xmlns='${XMLDSIG}'>k</KeyName></delete>`,
  ],
  ['modified', 'get', `<modified xmlns='${ARCHIVE}'/>`],
  ['save get', 'get', `<save xmlns='${ARCHIVE}'/>`],
  ['otr get', 'get', `<otr xmlns='${ARCHIVE}'/>`],
  ['record', 'set', `<record xmlns='${ARCHIVE}' jid='a@localhost' otr='true'/>`],
];

describe("cross-user isolation: another user's archive", () => {
  it.each(REQUESTS)(
    'answers %s addressed to another account the same whether it exists or not',
    async (_name, type, payload) => {
      const existing = await exchange(orchard, `<iq type='${type}' to='${juliet}'>${payload}</iq>`);
      const missing = await exchange(orchard, `<iq type='${type}' to='ghost@localhost'>${payload}</iq>`);
      const shape = (reply: typeof existing.reply) => {
        const copy = reply
          .toString()
          .replace(/ id="[^"]*"/, '')
          .replace(/ from="[^"]*"/, '');
        return copy;
      };
      expect(existing.reply.attrs.type).toBe('error');
      expect(shape(existing.reply)).toBe(shape(missing.reply).replace('ghost@localhost', juliet));
      expect(existing.reply.getChild('error')?.getChild('service-unavailable')).toBeDefined();
    },
  );

  it("never shows, changes or removes another user's collections through one's own archive", async () => {
    // Romeo asks for what Juliet stored: the same item-not-found as for a collection nobody has.
    const theirs = await exchange(
      orchard,
      `<iq type='get'><retrieve xmlns='${ARCHIVE}' with='nurse@localhost/garden' start='1469-07-21T02:56:15Z'/></iq>`,
    );
    const nobodys = await exchange(
      orchard,
      `<iq type='get'><retrieve xmlns='${ARCHIVE}' with='nurse@localhost/garden' start='1470-07-21T02:56:15Z'/></iq>`,
    );
    expect(theirs.reply.getChild('error')?.toString()).toBe(nobodys.reply.getChild('error')?.toString());
    expect(stores(await ok(orchard, `<iq type='get'><list xmlns='${ARCHIVE}'/></iq>`))).toEqual([]);
    expect(await condition(orchard, `<iq type='set'><remove xmlns='${ARCHIVE}'/></iq>`)).toBe(
      'item-not-found',
    );
    expect(
      await condition(
        orchard,
        `<iq type='set'><remove xmlns='${ARCHIVE}' with='nurse@localhost/garden' start='1469-07-21T02:56:15Z'/></iq>`,
      ),
    ).toBe('item-not-found');
    // Romeo stores a collection with the same with/start: it is his own; Juliet's is untouched.
    await ok(
      orchard,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='nurse@localhost/garden' start='1469-07-21T02:56:15Z' subject='mine'/></iq>`,
    );
    const hers = await ok(
      chamber,
      `<iq type='get'><retrieve xmlns='${ARCHIVE}' with='nurse@localhost/garden' start='1469-07-21T02:56:15Z'/></iq>`,
    );
    expect(hers?.attrs.subject).toBe('secret');
    expect(hers?.getChildren('from')).toHaveLength(1);
    const modified = await ok(orchard, `<iq type='get'><modified xmlns='${ARCHIVE}'/></iq>`);
    expect(rsmOf(modified).count ?? 0).toBeLessThanOrEqual(1);
  });

  it("never pushes one user's preference changes to another user's resources", async () => {
    await ok(orchard, `<iq type='get'><pref xmlns='${ARCHIVE}'/></iq>`);
    await ok(
      chamber,
      `<iq type='set'><pref xmlns='${ARCHIVE}'><default save='body' otr='allow'/></pref></iq>`,
    );
    await stack.gateway.drained();
    expect(await orchard.framesBeforePong()).toEqual([]);
  });
});

describe('hostile grid', () => {
  const set = (inner: string) => `<set xmlns='${RSM}'>${inner}</set>`;
  const grid: [string, 'get' | 'set', string, string][] = [
    ['a month 13', 'get', `<list xmlns='${ARCHIVE}' start='2024-13-01T00:00:00Z'/>`, 'bad-request'],
    ['February 30', 'get', `<list xmlns='${ARCHIVE}' end='2023-02-30T00:00:00Z'/>`, 'bad-request'],
    [
      'a local-time start',
      'get',
      `<list xmlns='${ARCHIVE}' start='2024-01-01T00:00:00+02:00'/>`,
      'bad-request',
    ],
    ['a date without time', 'get', `<list xmlns='${ARCHIVE}' start='2024-01-01'/>`, 'bad-request'],
    [
      'the year 10000',
      'set',
      `<store xmlns='${ARCHIVE}' with='a@b' start='10000-01-01T00:00:00Z'/>`,
      'bad-request',
    ],
    // A `with` that cannot be a collection's key (a valid JID of three 1023-byte parts less
    // a little): refused as a request, never a crash of the store.
    // The bounds apply to what is stored and queried, after the checks a request passes: NFC
    // makes U+0958 (3 bytes) two characters of 6, and U+1D160 (4 bytes) three of 12; secs add up.
    [
      'a remove whose with grows past the key bound under NFC',
      'set',
      `<remove xmlns='${ARCHIVE}' with='a@b/${'x'.repeat(990)}\u0958' start='2020-01-01T00:00:00Z'/>`,
      'bad-request',
    ],
    [
      'a list whose with grows past the key bound under NFC',
      'get',
      `<list xmlns='${ARCHIVE}' with='${'\u{1D160}'.repeat(83)}@${'\u{1D160}'.repeat(83)}/${'\u{1D160}'.repeat(82)}'/>`,
      'bad-request',
    ],
    [
      'a store whose secs run past the year 9999',
      'set',
      `<store xmlns='${ARCHIVE}' with='a@example.com' start='2020-01-01T00:00:00Z'><to secs='9999999999999'><body>x</body></to></store>`,
      'bad-request',
    ],
    [
      'an EncryptedData whose KeyName is over 128 bytes',
      'set',
      `<store xmlns='${ARCHIVE}' with='a@example.com' start='2020-01-02T00:00:00Z' crypt='true'><EncryptedData xmlns='${XMLENC}'><KeyInfo xmlns='${XMLDSIG}'><KeyName>${'k'.repeat(2000)}</KeyName></KeyInfo><CipherData><CipherValue>AAAA</CipherValue></CipherData></EncryptedData></store>`,
      'bad-request',
    ],
    // XEP-0059 §2.6: a UID longer than any key names no item.
    [
      'a list after a UID longer than any key',
      'get',
      `<list xmlns='${ARCHIVE}'><set xmlns='${RSM}'><after>${'u'.repeat(2000)}</after></set></list>`,
      'item-not-found',
    ],
    [
      'keys before a UID longer than any key',
      'get',
      `<keys xmlns='${ARCHIVE}'><KeyName xmlns='${XMLDSIG}'>k</KeyName><set xmlns='${RSM}'><before>${'u'.repeat(2000)}</before></set></keys>`,
      'item-not-found',
    ],
    // A keys UID is a key's keyRef, up to a sort key's 1,024 bytes: such a cursor is a cursor.
    [
      'nothing: keys after a 1,024-byte UID (a page after it, empty)',
      'get',
      `<keys xmlns='${ARCHIVE}'><KeyName xmlns='${XMLDSIG}'>k</KeyName><set xmlns='${RSM}'><after>${'u'.repeat(1024)}</after></set></keys>`,
      'result',
    ],
    [
      'a store with a 1,000-byte resource in with',
      'set',
      `<store xmlns='${ARCHIVE}' with='a@b/${'r'.repeat(1000)}' start='2024-01-01T00:00:00Z'><from secs='0'><body>x</body></from></store>`,
      'bad-request',
    ],
    [
      'a retrieve with a 1,000-byte resource in with',
      'get',
      `<retrieve xmlns='${ARCHIVE}' with='a@b/${'r'.repeat(1000)}' start='2024-01-01T00:00:00Z'/>`,
      'bad-request',
    ],
    [
      'an EncryptedKey whose CarriedKeyName is over 128 bytes',
      'set',
      `<store xmlns='${ARCHIVE}' with='a@b' start='2024-01-01T00:00:00Z'><EncryptedKey xmlns='${XMLENC}'><CarriedKeyName>${'c'.repeat(129)}</CarriedKeyName><KeyInfo xmlns='${XMLDSIG}'><KeyName>pub</KeyName></KeyInfo></EncryptedKey></store>`,
      'bad-request',
    ],
    [
      // 24 + 1 + 900 + 1 + 120 bytes: past the key index's 1024-byte sort key.
      'an EncryptedKey in a collection whose with leaves it no room',
      'set',
      `<store xmlns='${ARCHIVE}' with='a@b/${'r'.repeat(896)}' start='2024-01-01T00:00:00Z'><EncryptedKey xmlns='${XMLENC}'><CarriedKeyName>${'c'.repeat(120)}</CarriedKeyName><KeyInfo xmlns='${XMLDSIG}'><KeyName>pub</KeyName></KeyInfo></EncryptedKey></store>`,
      'bad-request',
    ],
    [
      'a keys request naming a KeyName over 128 bytes',
      'get',
      `<keys xmlns='${ARCHIVE}'><KeyName xmlns='${XMLDSIG}'>${'k'.repeat(129)}</KeyName></keys>`,
      'bad-request',
    ],
    [
      'a list with a 1,000-byte with',
      'get',
      `<list xmlns='${ARCHIVE}' with='a@b/${'r'.repeat(1000)}'/>`,
      'bad-request',
    ],
    ['start=yesterday', 'get', `<retrieve xmlns='${ARCHIVE}' with='a@b' start='yesterday'/>`, 'bad-request'],
    ['a retrieve without start', 'get', `<retrieve xmlns='${ARCHIVE}' with='a@b'/>`, 'bad-request'],
    ['an unknown archive child of list', 'get', `<list xmlns='${ARCHIVE}'><frob/></list>`, 'bad-request'],
    [
      'an unknown archive child of retrieve',
      'get',
      `<retrieve xmlns='${ARCHIVE}' with='a@b' start='2024-01-01T00:00:00Z'><x/></retrieve>`,
      'bad-request',
    ],
    ['an unknown child of set', 'get', `<list xmlns='${ARCHIVE}'>${set('<frob/>')}</list>`, 'bad-request'],
    ['two max', 'get', `<list xmlns='${ARCHIVE}'>${set('<max>1</max><max>2</max>')}</list>`, 'bad-request'],
    ['a negative index', 'get', `<list xmlns='${ARCHIVE}'>${set('<index>-1</index>')}</list>`, 'bad-request'],
    ['a negative max', 'get', `<list xmlns='${ARCHIVE}'>${set('<max>-5</max>')}</list>`, 'bad-request'],
    [
      'a ten-digit max',
      'get',
      `<list xmlns='${ARCHIVE}'>${set('<max>9999999999</max>')}</list>`,
      'bad-request',
    ],
    ['max=lots', 'get', `<list xmlns='${ARCHIVE}'>${set('<max>lots</max>')}</list>`, 'bad-request'],
    [
      'index with after',
      'get',
      `<list xmlns='${ARCHIVE}'>${set('<index>1</index><after>x</after>')}</list>`,
      'bad-request',
    ],
    [
      'after and before',
      'get',
      `<list xmlns='${ARCHIVE}'>${set('<after>x</after><before>y</before>')}</list>`,
      'bad-request',
    ],
    ['an empty after', 'get', `<list xmlns='${ARCHIVE}'>${set('<after/>')}</list>`, 'bad-request'],
    [
      '0.5 maxitems with a 0.9 set',
      'get',
      `<list xmlns='${ARCHIVE}' maxitems='5'>${set('<max>5</max>')}</list>`,
      'bad-request',
    ],
    ['maxitems=0', 'get', `<list xmlns='${ARCHIVE}' maxitems='0'/>`, 'bad-request'],
    ["a request's partial", 'get', `<list xmlns='${ARCHIVE}' partial='true'/>`, 'bad-request'],
    [
      'a 0.5 boolean save in pref',
      'set',
      `<pref xmlns='${ARCHIVE}'><default save='true' otr='allow'/></pref>`,
      'bad-request',
    ],
    [
      'a 0.9 otr in save',
      'set',
      `<save xmlns='${ARCHIVE}'><default save='true' otr='allow'/></save>`,
      'bad-request',
    ],
    ['a list set', 'set', `<list xmlns='${ARCHIVE}'/>`, 'bad-request'],
    [
      'a retrieve set',
      'set',
      `<retrieve xmlns='${ARCHIVE}' with='a@b' start='2024-01-01T00:00:00Z'/>`,
      'bad-request',
    ],
    [
      'a modified with before',
      'get',
      `<modified xmlns='${ARCHIVE}'>${set('<before>2024-01-01T00:00:00Z</before>')}</modified>`,
      'bad-request',
    ],
    [
      'a modified after a non-date',
      'get',
      `<modified xmlns='${ARCHIVE}'>${set('<after>abc</after>')}</modified>`,
      'bad-request',
    ],
    [
      "remove open='true' with a start",
      'set',
      `<remove xmlns='${ARCHIVE}' open='true' start='2024-01-01T00:00:00Z'/>`,
      'bad-request',
    ],
    ["remove open='perhaps'", 'set', `<remove xmlns='${ARCHIVE}' open='perhaps'/>`, 'bad-request'],
    ['a malformed with', 'get', `<list xmlns='${ARCHIVE}' with='a@@b'/>`, 'jid-malformed'],
    [
      'keys with two KeyNames',
      'get',
      `<keys xmlns='${ARCHIVE}'><KeyName xmlns='${XMLDSIG}'>a</KeyName><KeyName xmlns='${XMLDSIG}'>b</KeyName></keys>`,
      'bad-request',
    ],
    [
      'delete without KeyName',
      'set',
      `<delete xmlns='${ARCHIVE}' with='a@b' start='2024-01-01T00:00:00Z'/>`,
      'bad-request',
    ],
    ['an unknown archive element', 'get', `<frobnicate xmlns='${ARCHIVE}'/>`, 'service-unavailable'],
    [
      'a note with children',
      'set',
      `<store xmlns='${ARCHIVE}' with='a@b' start='2024-01-01T00:00:00Z'><note><b/></note></store>`,
      'bad-request',
    ],
    [
      'EncryptedData without KeyName',
      'set',
      `<store xmlns='${ARCHIVE}' with='a@b' start='2024-01-01T00:00:00Z'><EncryptedData xmlns='http://www.w3.org/2001/04/xmlenc#'/></store>`,
      'bad-request',
    ],
  ];

  it.each(grid)('refuses %s', async (_name, type, payload, expected) => {
    expect(await condition(orchard, `<iq type='${type}'>${payload}</iq>`)).toBe(expected);
  });

  it('caps a huge max at the page limit, ignores children of other namespaces, and treats an unknown UID as an empty page', async () => {
    for (let i = 0; i < 3; i++) {
      await ok(
        orchard,
        `<iq type='set'><store xmlns='${ARCHIVE}' with='x@localhost/y' start='2024-01-0${i + 1}T00:00:00Z'/></iq>`,
      );
    }
    const huge = await ok(
      orchard,
      `<iq type='get'><list xmlns='${ARCHIVE}'><set xmlns='${RSM}'><max>999999999</max></set></list></iq>`,
    );
    expect(stores(huge).length).toBeGreaterThanOrEqual(3);
    const other = await ok(
      orchard,
      `<iq type='get'><list xmlns='${ARCHIVE}'><x xmlns='urn:example:extension'/></list></iq>`,
    );
    expect(stores(other).length).toBeGreaterThanOrEqual(3);
    const unknown = await ok(
      orchard,
      `<iq type='get'><list xmlns='${ARCHIVE}'><set xmlns='${RSM}'><after>~~~</after></set></list></iq>`,
    );
    expect(stores(unknown)).toEqual([]);
    const unknownSeq = await ok(
      orchard,
      `<iq type='get'><retrieve xmlns='${ARCHIVE}' with='x@localhost/y' start='2024-01-01T00:00:00Z'><set xmlns='${RSM}'><after>not-a-seq</after></set></retrieve></iq>`,
    );
    expect(unknownSeq?.getChildren('from')).toEqual([]);
    // Still serving after all of it.
    expect(await condition(orchard, `<iq type='get'><pref xmlns='${ARCHIVE}'/></iq>`)).toBe('result');
  });

  it('removes at the last millisecond a DateTime names: nothing starts then, so nothing to remove (§8.3 item-not-found)', async () => {
    // A start without an end removes the collections starting at that time (its end is the next
    // millisecond, which no DateTime names: no end is needed there).
    expect(
      await condition(
        orchard,
        `<iq type='set'><remove xmlns='${ARCHIVE}' start='9999-12-31T23:59:59.999Z'/></iq>`,
      ),
    ).toBe('item-not-found');
  });

  it('refuses <auto encrypt=true> with feature-not-implemented, for that request only', async () => {
    // §7.3: "If the client is trying to enable encryption, but the server does not support encryption".
    const { reply } = await exchange(
      orchard,
      `<iq type='set' id='auto2'><auto save='true' encrypt='true' xmlns='${ARCHIVE}'><KeyInfo xmlns='${XMLDSIG}'><KeyValue><KeyName>romeoPublicKey3fingerprint</KeyName><RSAKeyValue><Modulus>xA7SEU+e0yQH5rm9kbCDN9o3aPIo7HbP7tX6WOocLZAtNfyxSZDU16ksL6W</Modulus><Exponent>AQAB</Exponent></RSAKeyValue></KeyValue></KeyInfo></auto></iq>`,
    );
    expect(reply.getChild('error')?.getChild('feature-not-implemented')).toBeDefined();
    // Auto-archiving itself stays off (nothing was half-done), and a plain auto works.
    const pref = await ok(orchard, `<iq type='get'><pref xmlns='${ARCHIVE}'/></iq>`);
    expect(pref?.getChild('auto')?.attrs.save).toBe('false');
    await ok(orchard, `<iq type='set'><auto xmlns='${ARCHIVE}' save='true'/></iq>`);
  });
});
