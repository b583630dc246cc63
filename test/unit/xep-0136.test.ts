/**
 * XEP-0136 Message Archiving, the pure protocol logic: every example of the 0.9 seed (quoted
 * verbatim; where the seed's own XML is broken or elided, the test says how it reads it), the
 * 0.5 requests served on the same namespace, and a grid of hostile requests.
 */
import { type Element, parse } from 'ltx';
import { describe, expect, test } from 'vitest';
import { loadConfig } from '../../shared/config.ts';
import { StanzaError } from '../../shared/errors.ts';
import { parseJid } from '../../shared/jid.ts';
import {
  archiveDecision,
  checkContentMix,
  entryFromMessage,
  resolveEntryTimes,
  startsNewCollection,
  threadOf,
  timeAttribute,
} from '../../shared/modules/xep-0136/collections.ts';
import { formatDateTime, parseDateTime } from '../../shared/modules/xep-0136/datetime.ts';
import {
  ARCHIVE_FEATURES,
  type ArchiveRequest,
  decodeRequest,
} from '../../shared/modules/xep-0136/decode.ts';
import {
  encodeCollection,
  encodeEntry,
  encodeKeys,
  encodeList,
  encodeModified,
  encodeOtr,
  encodePrefPush,
  encodePrefs,
  encodeRecordPush,
  encodeSave,
} from '../../shared/modules/xep-0136/encode.ts';
import { archiveStanzaError, collectionNotFound } from '../../shared/modules/xep-0136/errors.ts';
import {
  applyPrefChange,
  asksForRefusedSaveAll,
  checkAutoRequest,
  effectiveMode,
  SERVICE_POLICY,
} from '../../shared/modules/xep-0136/preferences.ts';
import { decodeRsm } from '../../shared/modules/xep-0136/rsm.ts';
import {
  type ArchivedEntry,
  type ArchivePrefs,
  type CollectionHeader,
  CollectionTooLargeError,
} from '../../shared/store/archive.ts';

// ---------------------------------------------------------------------------------------------
// Helpers

function xml(text: string): Element {
  return parse(text.trim()) as Element;
}

/** The archive element an iq example carries. */
function payloadOf(iq: string): Element {
  return xml(iq).getChildElements()[0] as Element;
}

function decodeIq(iq: string): ArchiveRequest {
  const el = xml(iq);
  return decodeRequest(el.attrs.type as 'get' | 'set', el.getChildElements()[0] as Element);
}

/** Name, attributes (any order) and children, whitespace-only text dropped: how XML compares. */
function canonical(node: Element | string): unknown {
  if (typeof node === 'string') return node.trim();
  return {
    name: node.name,
    attrs: Object.fromEntries(Object.entries(node.attrs).sort(([a], [b]) => a.localeCompare(b))),
    children: node.children
      .filter((c) => typeof c !== 'string' || c.trim() !== '')
      .map((c) => canonical(c as Element | string)),
  };
}

function expectSameXml(actual: Element, expected: Element): void {
  expect(canonical(actual)).toEqual(canonical(expected));
}

function stanzaError(fn: () => unknown): StanzaError {
  try {
    fn();
  } catch (error) {
    if (error instanceof StanzaError) return error;
    throw error;
  }
  throw new Error('no StanzaError thrown');
}

const ms = (iso: string) => parseDateTime(iso, 'test').ms;
const emptyPrefs: ArchivePrefs = { items: {}, methods: {}, version: 0 };

function header(extra: Partial<CollectionHeader> & { with: string; start: number }): CollectionHeader {
  return { id: 'uid', cid: 'cid', crypt: false, plain: true, ...extra };
}

// ---------------------------------------------------------------------------------------------
// §2 Determining Server Support

describe('XEP-0136 0.9 §2 service discovery', () => {
  test('Examples 1–2: the features, without #encrypt (the server does not encrypt)', () => {
    // XEP-0136 0.9 §2 Example 1:
    // <iq type='get' to='montague.net'>
    // <query xmlns='http://jabber.org/protocol/disco#info'/>
    // </iq>
    // XEP-0136 0.9 §2 Example 2:
    // <feature var='http://jabber.org/protocol/archive#auto'/>
    // <feature var='http://jabber.org/protocol/archive#encrypt'/>
    // <feature var='http://jabber.org/protocol/archive#manage'/>
    // <feature var='http://jabber.org/protocol/archive#manual'/>
    // <feature var='http://jabber.org/protocol/archive#pref'/>
    expect(ARCHIVE_FEATURES).toEqual([
      'http://jabber.org/protocol/archive#auto',
      'http://jabber.org/protocol/archive#manage',
      'http://jabber.org/protocol/archive#manual',
      'http://jabber.org/protocol/archive#pref',
    ]);
  });
});

// ---------------------------------------------------------------------------------------------
// §3 Archiving Preferences

describe('XEP-0136 0.9 §3 preferences', () => {
  test('Example 3: an empty <pref/> get', () => {
    // XEP-0136 0.9 §3.2 Example 3:
    expect(
      decodeIq(`
<iq type='get' id='pref1' from='juliet@capulet.com/chamber'>
<pref xmlns='http://jabber.org/protocol/archive'/>
</iq>`),
    ).toEqual({ kind: 'pref-get' });
  });

  test('Example 4: the stored preferences as the server returns them', () => {
    // XEP-0136 0.9 §3.2 Example 4:
    const example = payloadOf(`
<iq type='result' id='pref1' to='juliet@capulet.com/chamber'>
<pref xmlns='http://jabber.org/protocol/archive'>
<default save='body' otr='allow' expire='31536000'/>
<item jid='romeo@montague.net' save='false' otr='require'/>
<item jid='benvolio@montague.net' save='all' expire='630720000' otr='deny'/>
<method type='auto' use='never'/>
<method type='local' use='allow'/>
<method type='manual' use='prefer'/>
<auto save='false'/>
</pref>
</iq>`);
    const prefs: ArchivePrefs = {
      default: { save: 'body', otr: 'allow', expire: 31536000 },
      items: {
        'romeo@montague.net': { save: 'false', otr: 'require' },
        'benvolio@montague.net': { save: 'all', otr: 'deny', expire: 630720000 },
      },
      methods: { auto: 'never', local: 'allow', manual: 'prefer' },
      version: 3,
    };
    expectSameXml(encodePrefs(prefs, false), example);
  });

  test('Example 5: a user who never set the default gets the service default, unset', () => {
    // XEP-0136 0.9 §3.2 Example 5:
    const example = payloadOf(`
<iq type='result' id='pref1' to='juliet@capulet.com/chamber'>
<pref xmlns='http://jabber.org/protocol/archive'>
<default save='false' otr='allow' unset='true'/>
<method type='auto' use='allow'/>
<method type='local' use='allow'/>
<method type='manual' use='allow'/>
<auto save='false'/>
</pref>
</iq>`);
    expectSameXml(encodePrefs(emptyPrefs, false), example);
  });

  test('Examples 6–8: setting the default modes, and the push', () => {
    // XEP-0136 0.9 §3.3 Example 6:
    const request = decodeIq(`
<iq type='set' id='pref2' from='juliet@capulet.com/chamber'>
<pref xmlns='http://jabber.org/protocol/archive'>
<default save='false' otr='try'/>
</pref>
</iq>`);
    expect(request).toEqual({
      kind: 'pref-set',
      default: { save: 'false', otr: 'try' },
      items: [],
      methods: [],
    });
    // XEP-0136 0.9 §3.3 Example 7 (the empty result is the router's):
    // <iq type='result' id='pref2' to='juliet@capulet.com/chamber'/>
    // XEP-0136 0.9 §3.3 Example 8 (one push per resource that asked for the preferences):
    const push = payloadOf(`
<iq type='set' id='push1' to='juliet@capulet.com/chamber'>
<pref xmlns='http://jabber.org/protocol/archive'>
<default save='false' otr='try'/>
</pref>
</iq>`);
    if (request.kind !== 'pref-set') throw new Error('pref-set');
    expectSameXml(encodePrefPush(request), push);
    expect(applyPrefChange(emptyPrefs, request).default).toEqual({ save: 'false', otr: 'try' });
  });

  test('Examples 9–11: setting the modes for a contact, and the push', () => {
    // XEP-0136 0.9 §3.4 Example 9:
    const request = decodeIq(`
<iq type='set' id='pref3' from='juliet@capulet.com/chamber'>
<pref xmlns='http://jabber.org/protocol/archive'>
<item jid='romeo@montague.net' save='body' expire='604800' otr='allow'/>
</pref>
</iq>`);
    expect(request).toEqual({
      kind: 'pref-set',
      default: undefined,
      items: [{ jid: 'romeo@montague.net', mode: { save: 'body', otr: 'allow', expire: 604800 } }],
      methods: [],
    });
    // XEP-0136 0.9 §3.4 Example 10:
    // <iq type='result' id='pref3' to='juliet@capulet.com/chamber'/>
    // XEP-0136 0.9 §3.4 Example 11:
    const push = payloadOf(`
<iq type='set' id='push3' to='juliet@capulet.com/chamber'>
<pref xmlns='http://jabber.org/protocol/archive'>
<item jid='romeo@montague.net' save='body' expire='604800' otr='allow'/>
</pref>
</iq>`);
    if (request.kind !== 'pref-set') throw new Error('pref-set');
    expectSameXml(encodePrefPush(request), push);
  });

  test('Examples 12–14: method preferences, and the push', () => {
    // XEP-0136 0.9 §3.5 Example 12:
    const request = decodeIq(`
<iq type='set' id='pref4' from='juliet@capulet.com/chamber'>
<pref xmlns='http://jabber.org/protocol/archive'>
<method type='auto' use='allow'/>
<method type='local' use='never'/>
<method type='manual' use='prefer'/>
</pref>
</iq>`);
    expect(request).toMatchObject({
      kind: 'pref-set',
      methods: [
        { type: 'auto', use: 'allow' },
        { type: 'local', use: 'never' },
        { type: 'manual', use: 'prefer' },
      ],
    });
    // XEP-0136 0.9 §3.5 Example 13:
    // <iq type='result' id='pref4' to='juliet@capulet.com/chamber'/>
    // XEP-0136 0.9 §3.5 Example 14:
    const push = payloadOf(`
<iq type='set' id='push5' to='juliet@capulet.com/chamber'>
<pref xmlns='http://jabber.org/protocol/archive'>
<method type='auto' use='allow'/>
<method type='local' use='never'/>
<method type='manual' use='prefer'/>
</pref>
</iq>`);
    if (request.kind !== 'pref-set') throw new Error('pref-set');
    expectSameXml(encodePrefPush(request), push);
    expect(applyPrefChange(emptyPrefs, request).methods).toEqual({
      auto: 'allow',
      local: 'never',
      manual: 'prefer',
    });
  });

  test('precedence: full-JID item > bare-JID item > domain item > user default > service default', () => {
    const prefs: ArchivePrefs = {
      default: { save: 'body', otr: 'allow' },
      items: {
        'juliet@capulet.com/chamber': { save: 'all', otr: 'allow' },
        'juliet@capulet.com': { save: 'false', otr: 'require' },
        'capulet.com': { save: 'body', otr: 'try', expire: 60 },
      },
      methods: {},
      version: 1,
    };
    const mode = (jid: string, p = prefs) => effectiveMode(p, parseJid(jid));
    expect(mode('juliet@capulet.com/chamber')).toMatchObject({ save: 'all', source: 'full' });
    expect(mode('juliet@capulet.com/pda')).toMatchObject({ save: 'false', otr: 'require', source: 'bare' });
    expect(mode('nurse@capulet.com/kitchen')).toMatchObject({
      save: 'body',
      otr: 'try',
      expire: 60,
      source: 'domain',
    });
    expect(mode('romeo@montague.net/orchard')).toMatchObject({
      save: 'body',
      otr: 'allow',
      source: 'default',
    });
    expect(mode('romeo@montague.net/orchard', emptyPrefs)).toMatchObject({
      ...SERVICE_POLICY.default,
      source: 'service',
    });
    // A JID item matches exactly: a bare-JID item for the domain's server does not match users.
    expect(mode('capulet.com')).toMatchObject({ source: 'domain' });
  });

  test('§3.3: save=all may be refused when the server keeps no full stanzas', () => {
    const request = decodeIq(
      `<iq type='set'><pref xmlns='http://jabber.org/protocol/archive'><item jid='a@b' save='all' otr='allow'/></pref></iq>`,
    );
    expect(asksForRefusedSaveAll(request, SERVICE_POLICY)).toBe(false);
    expect(asksForRefusedSaveAll(request, { ...SERVICE_POLICY, allowSaveAll: false })).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------------
// §5 Manual Archiving, §6 Encryption

describe('XEP-0136 0.9 §5 manual archiving', () => {
  const EXAMPLE_15 = `
<iq type='set' to='montague.net' id='up1'>
<store xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-21T02:56:15Z'
subject='She speaks!'>
<from secs='0'><body>Art thou not Romeo, and a Montague?</body></from>
<to secs='11'><body>Neither, fair saint, if either thee dislike.</body></to>
<from secs='14'><body>How cam'st thou hither, tell me, and wherefore?</body></from>
<note utc='1469-07-21T03:04:35Z'>I think she might fancy me.</note>
</store>
</iq>`;

  test('Example 15: storing messages and a note; the times they stand for', () => {
    // XEP-0136 0.9 §5.3 Example 15: (EXAMPLE_15 above)
    const request = decodeIq(EXAMPLE_15);
    if (request.kind !== 'store') throw new Error('store');
    expect(request).toMatchObject({
      with: 'juliet@capulet.com/chamber',
      start: ms('1469-07-21T02:56:15Z'),
      subject: 'She speaks!',
    });
    expect(request.entries.map((e) => [e.kind, e.secs, e.utc])).toEqual([
      ['from', 0, undefined],
      ['to', 11, undefined],
      ['from', 14, undefined],
      ['note', undefined, ms('1469-07-21T03:04:35Z')],
    ]);
    const times = resolveEntryTimes(request.start, undefined, request.entries, 0).map((t) =>
      formatDateTime(t.at),
    );
    // secs are relative to the previous message: 0, +11, +14.
    expect(times).toEqual([
      '1469-07-21T02:56:15Z',
      '1469-07-21T02:56:26Z',
      '1469-07-21T02:56:40Z',
      '1469-07-21T03:04:35Z',
    ]);
    expect(() => checkContentMix(undefined, request)).not.toThrow();
  });

  test('Examples 16–17: success is empty; a collection too large is not-acceptable', () => {
    // XEP-0136 0.9 §5.3 Example 16:
    // <iq type='result' to='romeo@montague.net/orchard' id='up1'/>
    // XEP-0136 0.9 §5.3 Example 17:
    // <iq type='error' to='romeo@montague.net/orchard'>
    // <error code='406' type='modify'>
    // <not-acceptable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>
    // </error>
    // </iq>
    const error = archiveStanzaError(
      new CollectionTooLargeError({ with: 'juliet@capulet.com/chamber', start: 0 }),
    );
    expect(error).toMatchObject({ type: 'modify', condition: 'not-acceptable' });
    expect(archiveStanzaError(new Error('boom'))).toBeUndefined();
  });

  test('Example 18: an offline message with an absolute utc before the start; the next secs follow it', () => {
    // XEP-0136 0.9 §5.4 Example 18:
    const request = decodeIq(`
<iq type='set' to='montague.net' id='up2'>
<store xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-21T02:56:15Z'
subject='She speaks!'>
<from utc='1469-07-21T00:32:29Z'><body>Art thou not Romeo, and a Montague?</body></from>
<to secs='11'><body>Neither, fair saint, if either thee dislike.</body></to>
<from secs='14'><body>How cam'st thou hither, tell me, and wherefore?</body></from>
</store>
</iq>`);
    if (request.kind !== 'store') throw new Error('store');
    const times = resolveEntryTimes(request.start, undefined, request.entries, 0);
    expect(times.map((t) => [formatDateTime(t.at), t.utc])).toEqual([
      ['1469-07-21T00:32:29Z', true],
      ['1469-07-21T00:32:40Z', false],
      ['1469-07-21T00:32:54Z', false],
    ]);
    // Encoded back: the first keeps utc, the others their secs.
    const entries: ArchivedEntry[] = request.entries.map((e, i) => ({
      kind: e.kind,
      seq: i,
      id: String(i),
      at: times[i]?.at as number,
      utc: times[i]?.utc,
      prevAt: i === 0 ? undefined : times[i - 1]?.at,
      xml: e.element.toString(),
    }));
    const start = request.start;
    expect(entries.map((e) => encodeEntry({ start }, e).attrs)).toEqual([
      { utc: '1469-07-21T00:32:29Z' },
      { secs: '11' },
      { secs: '14' },
    ]);
  });

  test('Example 19: groupchat messages keep the occupant name', () => {
    // XEP-0136 0.9 §5.5 Example 19:
    const request = decodeIq(`
<iq type='set' to='montague.net' id='up3'>
<store xmlns='http://jabber.org/protocol/archive'
with='balcony@house.capulet.com'
start='1469-07-21T03:16:37Z'>
<from secs='0' name='benvolio'><body>She will indite him to some supper.</body></from>
<from secs='5' name='mercutio'><body>A bawd, a bawd, a bawd! So ho!</body></from>
<from secs='11' name='romeo'><body>What hast thou found?</body></from>
</store>
</iq>`);
    if (request.kind !== 'store') throw new Error('store');
    expect(request.with).toBe('balcony@house.capulet.com');
    expect(request.entries.map((e) => e.element.attrs.name)).toEqual(['benvolio', 'mercutio', 'romeo']);
  });

  test('Example 20: changing the subject without appending', () => {
    // XEP-0136 0.9 §5.6 Example 20:
    const request = decodeIq(`
<iq type='set' to='montague.net' id='subject1'>
<store xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-21T02:56:15Z'
subject='She speaks twice!'/>
</iq>`);
    expect(request).toMatchObject({ kind: 'store', subject: 'She speaks twice!', entries: [], keys: [] });
  });

  test('Example 21: encrypted data and keys; mixing them with plain messages is not-acceptable', () => {
    // XEP-0136 0.9 §6 Example 21:
    const request = decodeIq(`
<iq type='set' to='montague.net' id='crypt1'>
<store xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-23T19:22:31Z'
subject='She speaks!'>
<EncryptedData xmlns='http://www.w3.org/2001/04/xmlenc#'
Type='http://www.w3.org/2001/04/xmlenc#Content'>
<EncryptionMethod Algorithm='http://www.w3.org/2001/04/xmlenc#aes128-cbc'/>
<KeyInfo xmlns='http://www.w3.org/2000/09/xmldsig#'>
<KeyName>dataKey1</KeyName>
</KeyInfo>
<CipherData><CipherValue>+OGQ0SR+ysraP6LnD43m77VkIVni5c7yPeIbkFdicZ</CipherValue></CipherData>
</EncryptedData>
<EncryptedKey xmlns='http://www.w3.org/2001/04/xmlenc#'>
<CarriedKeyName>dataKey1</CarriedKeyName>
<EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#rsa-1_5"/>
<KeyInfo xmlns='http://www.w3.org/2000/09/xmldsig#'>
<KeyName>romeoPublicKey1fingerprint</KeyName>
</KeyInfo>
<CipherData><CipherValue>E5Qbvfa2gI5lBZMAHryv4g</CipherValue></CipherData>
</EncryptedKey>
<EncryptedKey xmlns='http://www.w3.org/2001/04/xmlenc#'>
<CarriedKeyName>dataKey1</CarriedKeyName>
<EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#rsa-1_5"/>
<KeyInfo xmlns='http://www.w3.org/2000/09/xmldsig#'>
<KeyName>romeoPublicKey2fingerprint</KeyName>
</KeyInfo>
<CipherData><CipherValue>E5Qbvfa2gI5lBZMAHryv4g</CipherValue></CipherData>
</EncryptedKey>
</store>
</iq>`);
    if (request.kind !== 'store') throw new Error('store');
    expect(request.entries.map((e) => [e.kind, e.keyName])).toEqual([['data', 'dataKey1']]);
    expect(request.keys.map((k) => [k.carriedKeyName, k.publicKeyName])).toEqual([
      ['dataKey1', 'romeoPublicKey1fingerprint'],
      ['dataKey1', 'romeoPublicKey2fingerprint'],
    ]);
    expect(() => checkContentMix(undefined, request)).not.toThrow();
    expect(stanzaError(() => checkContentMix({ crypt: false, plain: true }, request)).condition).toBe(
      'not-acceptable',
    );
    expect(
      stanzaError(() =>
        checkContentMix({ crypt: true, plain: false }, { entries: [{ kind: 'note' }], keys: [] }),
      ).condition,
    ).toBe('not-acceptable');
  });
});

// ---------------------------------------------------------------------------------------------
// §7 Automated Archiving

describe('XEP-0136 0.9 §7 automated archiving', () => {
  test('Example 22: enabling auto-archiving', () => {
    // XEP-0136 0.9 §7.1 Example 22:
    const request = decodeIq(`
<iq type='set' id='auto1'>
<auto save='true' xmlns='http://jabber.org/protocol/archive'/>
</iq>`);
    expect(request).toEqual({ kind: 'auto', save: true, encrypt: false });
    if (request.kind !== 'auto') throw new Error('auto');
    expect(() => checkAutoRequest(request, emptyPrefs)).not.toThrow();
  });

  test('Example 23: with encryption, which this server answers feature-not-implemented (§7.3)', () => {
    // XEP-0136 0.9 §7.2 Example 23:
    const request = decodeIq(`
<iq type='set' id='auto2'>
<auto save='true'
encrypt='true'
xmlns='http://jabber.org/protocol/archive'>
<KeyInfo xmlns='http://www.w3.org/2000/09/xmldsig#'>
<KeyValue>
<KeyName>romeoPublicKey3fingerprint</KeyName>
<RSAKeyValue>
<Modulus>xA7SEU+e0yQH5rm9kbCDN9o3aPIo7HbP7tX6WOocLZAtNfyxSZDU16ksL6W
jubafOqNEpcwR3RdFsT7bCqnXPBe5ELh5u4VEy19MzxkXRgrMvavzyBpVRgBUwUlV
5foK5hhmbktQhyNdy/6LpQRhDUDsTvK+g9Ucj47es9AQJ3U=
</Modulus>
<Exponent>AQAB</Exponent>
</RSAKeyValue>
</KeyValue>
</KeyInfo>
</auto>
</iq>`);
    expect(request).toEqual({ kind: 'auto', save: true, encrypt: true });
    if (request.kind !== 'auto') throw new Error('auto');
    expect(stanzaError(() => checkAutoRequest(request, emptyPrefs))).toMatchObject({
      type: 'cancel',
      condition: 'feature-not-implemented',
    });
    const allPrefs: ArchivePrefs = { ...emptyPrefs, default: { save: 'all', otr: 'allow' } };
    const plain = { save: true, encrypt: false };
    expect(() => checkAutoRequest(plain, allPrefs)).not.toThrow();
    expect(
      stanzaError(() => checkAutoRequest(plain, allPrefs, { ...SERVICE_POLICY, allowSaveAll: false }))
        .condition,
    ).toBe('feature-not-implemented');
  });

  const message = (body: string, extra = '') =>
    xml(
      `<message xmlns='jabber:client' type='chat' to='juliet@capulet.com/chamber'><body>${body}</body>${extra}</message>`,
    );
  const body = { save: 'body', otr: 'allow', source: 'default' } as const;
  const all = { save: 'all', otr: 'allow', source: 'default' } as const;

  test('what is archived: modes, types, XEP-0334 hints and the §13.3 store header', () => {
    expect(archiveDecision(message('hi'), body)).toEqual({ archive: true, save: 'body' });
    expect(archiveDecision(message('hi'), { ...body, save: 'false' })).toMatchObject({
      archive: false,
      reason: 'save-mode',
    });
    expect(archiveDecision(message('hi', "<no-store xmlns='urn:xmpp:hints'/>"), all)).toMatchObject({
      archive: false,
      reason: 'hint',
    });
    expect(archiveDecision(message('hi', "<no-permanent-store xmlns='urn:xmpp:hints'/>"), all)).toMatchObject(
      {
        archive: false,
        reason: 'hint',
      },
    );
    expect(
      archiveDecision(
        message(
          'hi',
          "<headers xmlns='http://jabber.org/protocol/shim'><header name='store'>false</header></headers>",
        ),
        all,
      ),
    ).toMatchObject({ archive: false, reason: 'store-header' });
    const typing = xml(
      "<message xmlns='jabber:client' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
    );
    expect(archiveDecision(typing, body)).toMatchObject({ archive: false, reason: 'no-body' });
    expect(archiveDecision(typing, all)).toMatchObject({ archive: false, reason: 'no-body' });
    const kept = xml(
      "<message xmlns='jabber:client'><x xmlns='jabber:x:oob'/><store xmlns='urn:xmpp:hints'/></message>",
    );
    expect(archiveDecision(kept, all)).toEqual({ archive: true, save: 'all' });
    expect(archiveDecision(xml("<message type='error'><body>x</body></message>"), all)).toMatchObject({
      archive: false,
    });
    expect(archiveDecision(xml("<message type='groupchat'><body>x</body></message>"), all)).toMatchObject({
      archive: false,
    });
  });

  test('what is kept: the body, or all but thread, delay, event, chat states and XHTML-IM (§5.2)', () => {
    const stanza = message(
      'Art thou not Romeo?',
      "<thread>t1</thread><active xmlns='http://jabber.org/protocol/chatstates'/><delay xmlns='urn:xmpp:delay' stamp='x'/>" +
        "<x xmlns='jabber:x:event'/><html xmlns='http://jabber.org/protocol/xhtml-im'/><subject>s</subject>",
    );
    expect(entryFromMessage(stanza, 'from', 'body', 5).xml).toBe(
      '<from><body>Art thou not Romeo?</body></from>',
    );
    expect(entryFromMessage(stanza, 'to', 'all', 5)).toEqual({
      kind: 'to',
      at: 5,
      xml: '<to><body>Art thou not Romeo?</body><subject>s</subject></to>',
    });
    expect(threadOf(stanza)).toBe('t1');
  });

  test('collection splitting: none open, an idle gap over 30 minutes, or a new thread', () => {
    const start = ms('2026-03-01T12:00:00Z');
    const open = { start, lastAt: start + 60_000, thread: undefined };
    expect(startsNewCollection(undefined, { at: start })).toBe(true);
    expect(startsNewCollection(open, { at: start + 60_000 + 30 * 60_000 })).toBe(false);
    expect(startsNewCollection(open, { at: start + 60_000 + 30 * 60_000 + 1 })).toBe(true);
    expect(startsNewCollection(open, { at: start + 61_000, thread: 'new' })).toBe(true);
    expect(startsNewCollection({ ...open, thread: 'same' }, { at: start + 61_000, thread: 'same' })).toBe(
      false,
    );
    expect(startsNewCollection({ ...open, thread: 'same' }, { at: start + 61_000 })).toBe(false);
    expect(startsNewCollection({ start }, { at: start + 10 * 60_000 }, 5 * 60_000)).toBe(true);
    // §3.2: messages archived with another expire (the preference changed) start a new one.
    const expiring = { ...open, expireSeconds: 600 };
    expect(startsNewCollection(expiring, { at: start + 61_000, expireSeconds: 600 })).toBe(false);
    expect(startsNewCollection(expiring, { at: start + 61_000, expireSeconds: 3600 })).toBe(true);
    expect(startsNewCollection(expiring, { at: start + 61_000 })).toBe(true);
    expect(startsNewCollection(open, { at: start + 61_000, expireSeconds: 600 })).toBe(true);
    // A pointer from before the expire was recorded, to a collection that expires: unknown.
    expect(
      startsNewCollection({ ...open, expireSeconds: 'unknown' }, { at: start + 61_000, expireSeconds: 600 }),
    ).toBe(true);
  });

  test('secs add up to each message time: messages 0.51 s apart alternate 1 and 0 (§5.2)', () => {
    const start = 1_000_000;
    const times = Array.from({ length: 10 }, (_, i) => start + i * 510);
    const secs = times.map((at, i) =>
      timeAttribute(start, { at, prevAt: i === 0 ? undefined : times[i - 1] }),
    );
    const values = secs.map((s) => ('secs' in s ? s.secs : Number.NaN));
    let sum = 0;
    values.forEach((value, i) => {
      sum += value;
      expect(Math.abs(sum - ((times[i] as number) - start) / 1000)).toBeLessThanOrEqual(0.5);
    });
    expect(values).toEqual([0, 1, 0, 1, 0, 1, 0, 1, 0, 1]);
    expect(timeAttribute(start, { at: start - 5000, prevAt: start })).toEqual({ utc: start - 5000 });
    expect(timeAttribute(start, { at: start + 5000, utc: true })).toEqual({ utc: start + 5000 });
  });
});

// ---------------------------------------------------------------------------------------------
// §8 Archive Management

describe('XEP-0136 0.9 §8.1 list', () => {
  test('Examples 24–26: by JID, by JID between two times, after a time', () => {
    // XEP-0136 0.9 §8.1 Example 24:
    expect(
      decodeIq(`
<iq type='get' to='montague.net' id='juliet1'>
<list xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com'>
<set xmlns='http://jabber.org/protocol/rsm'>
<max>30</max>
</set>
</list>
</iq>`),
    ).toEqual({
      kind: 'list',
      with: { kind: 'bare', jid: 'juliet@capulet.com' },
      start: undefined,
      end: undefined,
      page: {
        present: true,
        max: 30,
        after: undefined,
        before: undefined,
        lastPage: false,
        index: undefined,
      },
      maxitems: undefined,
    });
    // XEP-0136 0.9 §8.1 Example 25:
    expect(
      decodeIq(`
<iq type='get' to='montague.net' id='period1'>
<list xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com'
start='1469-07-21T02:00:00Z'
end='1479-07-21T04:00:00Z'>
<set xmlns='http://jabber.org/protocol/rsm'>
<max>30</max>
</set>
</list>
</iq>`),
    ).toMatchObject({ start: ms('1469-07-21T02:00:00Z'), end: ms('1479-07-21T04:00:00Z') });
    // XEP-0136 0.9 §8.1 Example 26:
    expect(
      decodeIq(`
<iq type='get' to='montague.net' id='list1'>
<list xmlns='http://jabber.org/protocol/archive'
start='1469-07-21T02:00:00Z'>
<set xmlns='http://jabber.org/protocol/rsm'>
<max>30</max>
</set>
</list>
</iq>`),
    ).toMatchObject({ with: undefined, start: ms('1469-07-21T02:00:00Z'), page: { max: 30 } });
  });

  test('Example 27: a page of collections, crypt marked, with the RSM set', () => {
    // XEP-0136 0.9 §8.1 Example 27 (its 28 elided collections left out; its UIDs are opaque):
    // <iq type='result' to='romeo@montague.net/orchard' from='montague.net' id='list1'>
    // <list xmlns='http://jabber.org/protocol/archive'>
    // <store with='juliet@capulet.com/chamber'
    // start='1469-07-21T02:56:15Z'
    // subject='She speaks!'
    // crypt='true'/>
    // .
    // [28 more collections]
    // .
    // <store with='balcony@house.capulet.com'
    // start='1469-07-21T03:16:37Z'/>
    // <set xmlns='http://jabber.org/protocol/rsm'>
    // <first index='0'>1469-07-21T02:56:15Zjuliet@capulet.com</first>
    // <last>1469-07-21T03:16:37Zbalcony@house.capulet.com</last>
    // <count>1372</count>
    // </set>
    // </list>
    // </iq>
    const list = encodeList(
      {
        items: [
          header({
            with: 'juliet@capulet.com/chamber',
            start: ms('1469-07-21T02:56:15Z'),
            subject: 'She speaks!',
            crypt: true,
          }),
          header({ with: 'balcony@house.capulet.com', start: ms('1469-07-21T03:16:37Z') }),
        ],
        count: 1372,
        firstIndex: 0,
        first: '1469-07-21T02:56:15Zjuliet@capulet.com',
        last: '1469-07-21T03:16:37Zbalcony@house.capulet.com',
      },
      // Example 26's request: <set xmlns='http://jabber.org/protocol/rsm'><max>30</max></set>
      {
        page: decodeRsm(xml(`<list><set xmlns='http://jabber.org/protocol/rsm'><max>30</max></set></list>`), {
          defaultMax: 100,
          max: 250,
        }),
      },
    );
    expectSameXml(
      list,
      xml(`
<list xmlns='http://jabber.org/protocol/archive'>
<store with='juliet@capulet.com/chamber'
start='1469-07-21T02:56:15Z'
subject='She speaks!'
crypt='true'/>
<store with='balcony@house.capulet.com'
start='1469-07-21T03:16:37Z'/>
<set xmlns='http://jabber.org/protocol/rsm'>
<first index='0'>1469-07-21T02:56:15Zjuliet@capulet.com</first>
<last>1469-07-21T03:16:37Zbalcony@house.capulet.com</last>
<count>1372</count>
</set>
</list>`),
    );
  });

  test('0.5 §4.2: a list asked for without <set/> or maxitems and cut says partial, beside its <set/>', () => {
    // 0.5 §4.2: "If the requested list would be too long to return in its entirety … the server
    // MUST indicate that the list is incomplete by setting the optional 'partial' attribute of
    // the <list/> element to 'true'". Its example request: <list xmlns='…' with='juliet@capulet.com'/>
    const request = {
      page: decodeRsm(xml(`<list with='juliet@capulet.com'/>`), { defaultMax: 1, max: 250 }),
    };
    const only = header({ with: 'juliet@capulet.com/chamber', start: ms('1469-07-21T02:56:15Z') });
    const page = { items: [only], count: 2, firstIndex: 0, first: 'a', last: 'a' };
    const cut = encodeList(page, request);
    expect(cut.attrs.partial).toBe('true');
    expect(cut.getChild('set', 'http://jabber.org/protocol/rsm')?.getChildText('count')).toBe('2');
    // Whole: no partial.
    expect(encodeList({ ...page, count: 1 }, request).attrs.partial).toBeUndefined();
  });

  test('Example 28: nothing matches, an empty <list/>', () => {
    // XEP-0136 0.9 §8.1 Example 28:
    const example = payloadOf(`
<iq type='result' to='romeo@montague.net/orchard' from='montague.net' id='list1'>
<list xmlns='http://jabber.org/protocol/archive'/>
</iq>`);
    expectSameXml(
      encodeList({ items: [], count: 0 }, { page: decodeRsm(xml('<list/>'), { defaultMax: 1, max: 1 }) }),
      example,
    );
  });

  test('Example 29: the second page, after a UID', () => {
    // XEP-0136 0.9 §8.1 Example 29:
    expect(
      decodeIq(`
<iq type='get' to='montague.net' id='list2'>
<list xmlns='http://jabber.org/protocol/archive'
start='1469-07-21T02:00:00Z'>
<set xmlns='http://jabber.org/protocol/rsm'>
<max>30</max>
<after>1469-07-21T03:16:37Zbalcony@house.capulet.com</after>
</set>
</list>
</iq>`),
    ).toMatchObject({ page: { max: 30, after: '1469-07-21T03:16:37Zbalcony@house.capulet.com' } });
  });
});

describe('XEP-0136 0.9 §8.2 retrieve', () => {
  const juliet = header({
    with: 'juliet@capulet.com/chamber',
    start: ms('1469-07-21T02:56:15Z'),
    subject: 'She speaks!',
  });
  const entry = (
    seq: number,
    kind: 'to' | 'from',
    text: string,
    at: number,
    prevAt?: number,
  ): ArchivedEntry => ({
    seq,
    id: `id${seq}`,
    kind,
    at,
    prevAt,
    xml: `<${kind}><body>${text}</body></${kind}>`,
  });

  test('Example 30: the first page of a collection', () => {
    // XEP-0136 0.9 §8.2 Example 30:
    expect(
      decodeIq(`
<iq type='get' to='montague.net' id='page1'>
<retrieve xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-21T02:56:15Z'>
<set xmlns='http://jabber.org/protocol/rsm'>
<max>100</max>
</set>
</retrieve>
</iq>`),
    ).toMatchObject({
      kind: 'retrieve',
      with: 'juliet@capulet.com/chamber',
      start: ms('1469-07-21T02:56:15Z'),
      keyNames: [],
      page: { max: 100 },
    });
  });

  test('Example 31: messages with secs relative to the previous one, and the set', () => {
    // XEP-0136 0.9 §8.2 Example 31 (its 98 elided messages left out, so the last UID is 2):
    // <iq type='result' to='romeo@montague.net/orchard' from='montague.net' id='page1'>
    // <store xmlns='http://jabber.org/protocol/archive'
    // with='juliet@capulet.com/chamber'
    // start='1469-07-21T02:56:15Z'
    // subject='She speaks!'>
    // <from secs='0'><body>Art thou not Romeo, and a Montague?</body></from>
    // <to secs='11'><body>Neither, fair saint, if either thee dislike.</body></to>
    // .
    // [98 more messages]
    // .
    // <from secs='14'><body>How cam'st thou hither, tell me, and wherefore?</body></from>
    // <set xmlns='http://jabber.org/protocol/rsm'>
    // <first index='0'>0</first>
    // <last>99</last>
    // <count>217</count>
    // </set>
    // </store>
    // </iq>
    const t0 = juliet.start;
    const page = {
      items: [
        entry(0, 'from', 'Art thou not Romeo, and a Montague?', t0),
        entry(1, 'to', 'Neither, fair saint, if either thee dislike.', t0 + 11_000, t0),
        entry(2, 'from', 'How cam&apos;st thou hither, tell me, and wherefore?', t0 + 25_000, t0 + 11_000),
      ],
      count: 217,
      firstIndex: 0,
      first: '0',
      last: '2',
    };
    const rsm = decodeRsm(
      xml("<retrieve><set xmlns='http://jabber.org/protocol/rsm'><max>100</max></set></retrieve>"),
      {
        defaultMax: 100,
        max: 100,
      },
    );
    expectSameXml(
      encodeCollection(juliet, page, [], rsm),
      xml(`
<store xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-21T02:56:15Z'
subject='She speaks!'>
<from secs='0'><body>Art thou not Romeo, and a Montague?</body></from>
<to secs='11'><body>Neither, fair saint, if either thee dislike.</body></to>
<from secs='14'><body>How cam'st thou hither, tell me, and wherefore?</body></from>
<set xmlns='http://jabber.org/protocol/rsm'>
<first index='0'>0</first>
<last>2</last>
<count>217</count>
</set>
</store>`),
    );
  });

  test('Example 32: a collection that does not exist is item-not-found', () => {
    // XEP-0136 0.9 §8.2 Example 32:
    // <iq type='error' to='romeo@montague.net/orchard' from='montague.net' id='page1'>
    // <error code='404' type='cancel'>
    // <item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>
    // </error>
    // </iq>
    expect(collectionNotFound()).toMatchObject({ type: 'cancel', condition: 'item-not-found' });
  });

  test('Example 33: an empty collection is an empty <store/>', () => {
    // XEP-0136 0.9 §8.2 Example 33:
    const example = payloadOf(`
<iq type='result' to='romeo@montague.net/orchard' from='montague.net' id='page1'>
<store xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-21T02:56:15Z'
subject='She speaks!'/>
</iq>`);
    const rsm = decodeRsm(xml('<retrieve/>'), { defaultMax: 100, max: 100 });
    expectSameXml(encodeCollection(juliet, { items: [], count: 0 }, [], rsm), example);
  });

  test('Example 34: the second page, after 99', () => {
    // XEP-0136 0.9 §8.2 Example 34:
    expect(
      decodeIq(`
<iq type='get' to='montague.net' id='page2'>
<retrieve xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-21T02:56:15Z'>
<set xmlns='http://jabber.org/protocol/rsm'>
<max>100</max>
<after>99</after>
</set>
</retrieve>
</iq>`),
    ).toMatchObject({ page: { max: 100, after: '99' } });
  });

  test('Example 35: the seed leaves the <retrieve> tag unclosed; read with its ">" restored', () => {
    // XEP-0136 0.9 §8.2 Example 35 (as printed, not well-formed: "start='1469-07-23T19:22:31Z'" is
    // followed by "<set" without closing the <retrieve> start tag):
    // <iq type='get' to='montague.net' id='page1'>
    // <retrieve xmlns='http://jabber.org/protocol/archive'
    // with='juliet@capulet.com/chamber'
    // start='1469-07-23T19:22:31Z'
    // <set xmlns='http://jabber.org/protocol/rsm'>
    // <max>5</max>
    // </set>
    // </retrieve>
    // </iq>
    expect(() =>
      xml(`<retrieve xmlns='http://jabber.org/protocol/archive' start='x'\n<set/></retrieve>`),
    ).toThrow();
    expect(
      decodeIq(`
<iq type='get' to='montague.net' id='page1'>
<retrieve xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-23T19:22:31Z'>
<set xmlns='http://jabber.org/protocol/rsm'>
<max>5</max>
</set>
</retrieve>
</iq>`),
    ).toMatchObject({ start: ms('1469-07-23T19:22:31Z'), keyNames: [], page: { max: 5 } });
  });

  test('Example 36: EncryptedData with the EncryptedKeys of the symmetric keys it names', () => {
    // XEP-0136 0.9 §8.2 Example 36 (two of its EncryptedData and all four keys; 3 elided):
    const data = (key: string) =>
      `<EncryptedData xmlns='http://www.w3.org/2001/04/xmlenc#'
Type='http://www.w3.org/2001/04/xmlenc#Content'>
<EncryptionMethod Algorithm='http://www.w3.org/2001/04/xmlenc#aes128-cbc'/>
<KeyInfo xmlns='http://www.w3.org/2000/09/xmldsig#'>
<KeyName>${key}</KeyName>
</KeyInfo>
<CipherData><CipherValue>+OGQ0SR+ysraP6LnD43m77VkIVni5c7yPeIbkFdicZ</CipherValue></CipherData>
</EncryptedData>`;
    const key = (carried: string, pub: string) =>
      `<EncryptedKey xmlns='http://www.w3.org/2001/04/xmlenc#'>
<CarriedKeyName>${carried}</CarriedKeyName>
<EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#rsa-1_5"/>
<KeyInfo xmlns='http://www.w3.org/2000/09/xmldsig#'>
<KeyName>${pub}</KeyName>
</KeyInfo>
<CipherData><CipherValue>E5Qbvfa2gI5lBZMAHryv4g</CipherValue></CipherData>
</EncryptedKey>`;
    const crypt = header({
      with: 'juliet@capulet.com/chamber',
      start: ms('1469-07-23T19:22:31Z'),
      subject: 'She speaks!',
      crypt: true,
      plain: false,
    });
    const pairs: [string, string][] = [
      ['dataKey1', 'romeoPublicKey1fingerprint'],
      ['dataKey1', 'romeoPublicKey2fingerprint'],
      ['dataKey2', 'romeoPublicKey1fingerprint'],
      ['dataKey2', 'romeoPublicKey2fingerprint'],
    ];
    const rsm = decodeRsm(
      xml("<retrieve><set xmlns='http://jabber.org/protocol/rsm'><max>5</max></set></retrieve>"),
      {
        defaultMax: 5,
        max: 100,
      },
    );
    const element = encodeCollection(
      crypt,
      {
        items: [
          { seq: 0, id: 'a', kind: 'data', at: crypt.start, keyName: 'dataKey1', xml: data('dataKey1') },
          { seq: 4, id: 'b', kind: 'data', at: crypt.start, keyName: 'dataKey2', xml: data('dataKey2') },
        ],
        count: 7,
        firstIndex: 0,
        first: '0',
        last: '4',
      },
      pairs.map(([carried, pub]) => ({
        carriedKeyName: carried,
        publicKeyName: pub,
        xml: key(carried, pub),
        collection: crypt,
      })),
      rsm,
    );
    expectSameXml(
      element,
      xml(`
<store xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-23T19:22:31Z'
subject='She speaks!'>
${data('dataKey1')}
${data('dataKey2')}
${pairs.map(([c, p]) => key(c, p)).join('\n')}
<set xmlns='http://jabber.org/protocol/rsm'>
<first index='0'>0</first>
<last>4</last>
<count>7</count>
</set>
</store>`),
    );
  });

  test('Example 37: KeyName limits the EncryptedKeys returned', () => {
    // XEP-0136 0.9 §8.2 Example 37:
    expect(
      decodeIq(`
<iq type='get' to='montague.net' id='page1'>
<retrieve xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-23T19:22:31Z'>
<KeyName xmlns='http://www.w3.org/2000/09/xmldsig#'>romeoPublicKey1fingerprint</KeyName>
<set xmlns='http://jabber.org/protocol/rsm'>
<max>1</max>
</set>
</retrieve>
</iq>`),
    ).toMatchObject({ keyNames: ['romeoPublicKey1fingerprint'], page: { max: 1 } });
  });
});

describe('XEP-0136 0.9 §8.3 remove', () => {
  const remove = (attrs: string) =>
    decodeIq(
      `<iq type='set' to='montague.net'><remove xmlns='http://jabber.org/protocol/archive'${attrs}/></iq>`,
    );

  test('Examples 38–44: one, a range, after, before, all, open ones', () => {
    // XEP-0136 0.9 §8.3 Example 38:
    expect(
      decodeIq(`
<iq type='set' to='montague.net'>
<remove xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-21T02:56:15Z'/>
</iq>`),
    ).toEqual({
      kind: 'remove',
      with: { kind: 'full', jid: 'juliet@capulet.com/chamber' },
      start: ms('1469-07-21T02:56:15Z'),
      end: undefined,
      open: false,
      exact: true,
    });
    // XEP-0136 0.9 §8.3 Example 39:
    expect(
      decodeIq(`
<iq type='set' to='montague.net'>
<remove xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com'
start='1469-07-21T02:00:00Z'
end='1469-07-21T04:00:00Z'/>
</iq>`),
    ).toMatchObject({
      with: { kind: 'bare', jid: 'juliet@capulet.com' },
      end: ms('1469-07-21T04:00:00Z'),
      exact: false,
    });
    // XEP-0136 0.9 §8.3 Example 40:
    expect(
      decodeIq(`
<iq type='set' to='montague.net'>
<remove xmlns='http://jabber.org/protocol/archive'
start='1469-07-21T02:00:00Z'
end='2038-01-01T00:00:00Z'/>
</iq>`),
    ).toMatchObject({ with: undefined, end: ms('2038-01-01T00:00:00Z'), exact: false });
    // XEP-0136 0.9 §8.3 Example 41:
    expect(
      decodeIq(`
<iq type='set' to='montague.net'>
<remove xmlns='http://jabber.org/protocol/archive'
start='0000-01-01T00:00:00Z'
end='1469-07-21T04:00:00Z'/>
</iq>`),
    ).toMatchObject({ start: -62167219200000, exact: false });
    // XEP-0136 0.9 §8.3 Example 42:
    expect(
      decodeIq(`
<iq type='set' to='montague.net'>
<remove xmlns='http://jabber.org/protocol/archive'/>
</iq>`),
    ).toEqual({
      kind: 'remove',
      with: undefined,
      start: undefined,
      end: undefined,
      open: false,
      exact: false,
    });
    // XEP-0136 0.9 §8.3 Example 43:
    expect(
      decodeIq(`
<iq type='set' to='montague.net'>
<remove xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
open='true'/>
</iq>`),
    ).toMatchObject({ with: { kind: 'full' }, open: true, exact: false });
    // XEP-0136 0.9 §8.3 Example 44:
    expect(
      decodeIq(`
<iq type='set' to='montague.net'>
<remove xmlns='http://jabber.org/protocol/archive'
open='true'/>
</iq>`),
    ).toMatchObject({ with: undefined, open: true });
  });

  test('Example 45: nothing removed is item-not-found; a domain filter; open with a time is refused', () => {
    // XEP-0136 0.9 §8.3 Example 45:
    // <iq type='error' to='romeo@montague.net/orchard'>
    // <error code='404' type='cancel'>
    // <item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>
    // </error>
    // </iq>
    expect(collectionNotFound().condition).toBe('item-not-found');
    expect(remove(" with='capulet.com'")).toMatchObject({ with: { kind: 'domain', jid: 'capulet.com' } });
    expect(stanzaError(() => remove(" open='true' start='1469-07-21T02:00:00Z'")).condition).toBe(
      'bad-request',
    );
  });
});

// ---------------------------------------------------------------------------------------------
// §9 Replacing EncryptedKey Elements, §10 Replication, §11 File Format

describe('XEP-0136 0.9 §9 keys', () => {
  test('Examples 46–47: keys of one public key, grouped per collection', () => {
    // XEP-0136 0.9 §9 Example 46:
    const request = decodeIq(`
<iq type='get' to='montague.net' id='pubkey1'>
<keys xmlns='http://jabber.org/protocol/archive'>
<KeyName xmlns='http://www.w3.org/2000/09/xmldsig#'>romeoPublicKey1fingerprint</KeyName>
<set xmlns='http://jabber.org/protocol/rsm'>
<max>50</max>
</set>
</keys>
</iq>`);
    expect(request).toMatchObject({ kind: 'keys', keyName: 'romeoPublicKey1fingerprint', page: { max: 50 } });
    // XEP-0136 0.9 §9 Example 47 (its 49 elided sets left out; the last UID is then the first's):
    const key = (carried: string) => `<EncryptedKey xmlns='http://www.w3.org/2001/04/xmlenc#'>
<CarriedKeyName>${carried}</CarriedKeyName>
<EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#rsa-1_5"/>
<KeyInfo xmlns='http://www.w3.org/2000/09/xmldsig#'>
<KeyName>romeoPublicKey1fingerprint</KeyName>
</KeyInfo>
<CipherData><CipherValue>E5Qbvfa2gI5lBZMAHryv4g</CipherValue></CipherData>
</EncryptedKey>`;
    const collection = { with: 'juliet@capulet.com/chamber', start: ms('1469-07-23T19:22:31Z') };
    const element = encodeKeys({
      items: ['dataKey1', 'dataKey2'].map((c) => ({
        carriedKeyName: c,
        publicKeyName: 'romeoPublicKey1fingerprint',
        xml: key(c),
        collection,
      })),
      count: 3810,
      firstIndex: 0,
      first: '1469-07-23T19:22:31Zjuliet@capulet.com',
      last: '1469-08-03T13:24:06Zbalcony@house.capulet.com',
    });
    expectSameXml(
      element,
      xml(`
<keys xmlns='http://jabber.org/protocol/archive'>
<store with='juliet@capulet.com/chamber'
start='1469-07-23T19:22:31Z'>
${key('dataKey1')}
${key('dataKey2')}
</store>
<set xmlns='http://jabber.org/protocol/rsm'>
<first index='0'>1469-07-23T19:22:31Zjuliet@capulet.com</first>
<last>1469-08-03T13:24:06Zbalcony@house.capulet.com</last>
<count>3810</count>
</set>
</keys>`),
    );
  });

  test('Example 48: storing replacement keys (a store with keys only)', () => {
    // XEP-0136 0.9 §9 Example 48 (the first request; the seed's "[49 more …]" lines follow it):
    const request = decodeIq(`
<iq type='set' to='montague.net' id='crypt1'>
<store xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-23T19:22:31Z'>
<EncryptedKey xmlns='http://www.w3.org/2001/04/xmlenc#'>
<CarriedKeyName>dataKey1</CarriedKeyName>
<EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#rsa-1_5"/>
<KeyInfo xmlns='http://www.w3.org/2000/09/xmldsig#'>
<KeyName>romeoPublicKey2fingerprint</KeyName>
</KeyInfo>
<CipherData><CipherValue>E5Qbvfa2gI5lBZMAHryv4g</CipherValue></CipherData>
</EncryptedKey>
<EncryptedKey xmlns='http://www.w3.org/2001/04/xmlenc#'>
<CarriedKeyName>dataKey2</CarriedKeyName>
<EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#rsa-1_5"/>
<KeyInfo xmlns='http://www.w3.org/2000/09/xmldsig#'>
<KeyName>romeoPublicKey2fingerprint</KeyName>
</KeyInfo>
<CipherData><CipherValue>E5Qbvfa2gI5lBZMAHryv4g</CipherValue></CipherData>
</EncryptedKey>
</store>
</iq>`);
    if (request.kind !== 'store') throw new Error('store');
    expect(request.entries).toEqual([]);
    expect(request.keys.map((k) => `${k.carriedKeyName}/${k.publicKeyName}`)).toEqual([
      'dataKey1/romeoPublicKey2fingerprint',
      'dataKey2/romeoPublicKey2fingerprint',
    ]);
    expect(() => checkContentMix({ crypt: true, plain: false }, request)).not.toThrow();
  });

  test("Example 49: <delete/> of one public key's EncryptedKeys (sent as an iq get in the seed)", () => {
    // XEP-0136 0.9 §9 Example 49:
    const request = decodeIq(`
<iq type='get' to='montague.net' id='pubkey1'>
<delete xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com/chamber'
start='1469-07-23T19:22:31Z'>
<KeyName xmlns='http://www.w3.org/2000/09/xmldsig#'>romeoPublicKey1fingerprint</KeyName>
</delete>
</iq>`);
    expect(request).toEqual({
      kind: 'delete',
      with: 'juliet@capulet.com/chamber',
      start: ms('1469-07-23T19:22:31Z'),
      keyNames: ['romeoPublicKey1fingerprint'],
    });
  });
});

describe('XEP-0136 0.9 §10 replication', () => {
  test('Example 50: modifications after a UTC time', () => {
    // XEP-0136 0.9 §10 Example 50:
    const request = decodeIq(`
<iq type='get' to='montague.net' id='sync1'>
<modified xmlns='http://jabber.org/protocol/archive'>
<set xmlns='http://jabber.org/protocol/rsm'>
<max>50</max>
<after>1469-07-21T01:14:47Z</after>
</set>
</modified>
</iq>`);
    expect(request).toMatchObject({
      kind: 'modified',
      after: { ms: ms('1469-07-21T01:14:47Z'), subMillisecond: '' },
      page: { max: 50 },
    });
  });

  test('Example 51: changed and removed collections, with <last/> a time', () => {
    // XEP-0136 0.9 §10 Example 51 (up to 48 elided collections left out):
    const element = encodeModified({
      items: [
        {
          kind: 'changed',
          collection: { with: 'juliet@capulet.com/chamber', start: ms('1469-07-21T02:56:15Z') },
          key: 'k1',
          time: 't1',
        },
        {
          kind: 'removed',
          collection: { with: 'balcony@house.capulet.com', start: ms('1469-07-21T03:16:37Z') },
          key: 'k2',
          time: 't2',
        },
      ],
      count: 1372,
      last: '1469-07-21T04:22:39Z',
    });
    expectSameXml(
      element,
      payloadOf(`
<iq type='result' to='romeo@montague.net/orchard' from='montague.net' id='sync1'>
<modified xmlns='http://jabber.org/protocol/archive'>
<changed with='juliet@capulet.com/chamber'
start='1469-07-21T02:56:15Z'/>
<removed with='balcony@house.capulet.com'
start='1469-07-21T03:16:37Z'/>
<set xmlns='http://jabber.org/protocol/rsm'>
<last>1469-07-21T04:22:39Z</last>
<count>1372</count>
</set>
</modified>
</iq>`),
    );
    // The store's cursors carry nine more digits of fraction: a DateTime all the same.
    expect(parseDateTime('2026-03-01T12:00:20.000123456789Z', 'after')).toEqual({
      ms: ms('2026-03-01T12:00:20Z'),
      subMillisecond: '123456789',
    });
  });
});

describe('XEP-0136 0.9 §11 file format', () => {
  test('Example 52: <archive/> is a file format, not a request', () => {
    // XEP-0136 0.9 §11 Example 52:
    const file = xml(`
<archive xmlns='http://jabber.org/protocol/archive'
with='juliet@capulet.com'>
<store start='1469-07-21T02:56:15Z' subject='She speaks!'>
<from secs='0'><body>Art thou not Romeo, and a Montague?</body></from>
<to secs='11'><body>Neither, fair saint, if either thee dislike.</body></to>
<from secs='14'><body>How cam'st thou hither, tell me, and wherefore?</body></from>
</store>
</archive>`);
    expect(stanzaError(() => decodeRequest('get', file)).condition).toBe('feature-not-implemented');
  });
});

// ---------------------------------------------------------------------------------------------
// XEP-0136 0.5 requests on the same namespace

describe('XEP-0136 0.5 requests', () => {
  test('<save/>: get, set default and item, the boolean reply', () => {
    // XEP-0136 0.5 §3.1: <iq type='get' id='save1' from='juliet@capulet.com/chamber'> <save xmlns='http://jabber.org/protocol/archive'/> </iq>
    expect(
      decodeIq(
        `<iq type='get' id='save1' from='juliet@capulet.com/chamber'> <save xmlns='http://jabber.org/protocol/archive'/> </iq>`,
      ),
    ).toEqual({
      kind: 'save-get',
    });
    // XEP-0136 0.5 §3.1: <iq type='set' id='save2' from='juliet@capulet.com/chamber'> <save xmlns='http://jabber.org/protocol/archive'> <default save='true'/> </save> </iq>
    const setDefault = decodeIq(
      `<iq type='set' id='save2' from='juliet@capulet.com/chamber'> <save xmlns='http://jabber.org/protocol/archive'> <default save='true'/> </save> </iq>`,
    );
    expect(setDefault).toEqual({ kind: 'save-set', default: true, items: [] });
    // XEP-0136 0.5 §3.1 (the seed's "item='save3'" for an id is kept as it is; the iq's attributes are not ours):
    // <iq type='set' item='save3' from='juliet@capulet.com/chamber'> <save xmlns='http://jabber.org/protocol/archive'> <item jid='romeo@montague.net' save='false'/> </save> </iq>
    const setItem = decodeIq(
      `<iq type='set' item='save3' from='juliet@capulet.com/chamber'> <save xmlns='http://jabber.org/protocol/archive'> <item jid='romeo@montague.net' save='false'/> </save> </iq>`,
    );
    expect(setItem).toEqual({
      kind: 'save-set',
      default: undefined,
      items: [{ jid: 'romeo@montague.net', save: false }],
    });
    const prefs = applyPrefChange(applyPrefChange(emptyPrefs, setDefault), setItem);
    expect(prefs.default).toEqual({ save: 'body', otr: 'allow' });
    // XEP-0136 0.5 §3.1: <save xmlns='http://jabber.org/protocol/archive'> <default save='true'/> <item jid='romeo@montague.net' save='false'/> </save>
    expectSameXml(
      encodeSave(prefs),
      xml(
        `<save xmlns='http://jabber.org/protocol/archive'> <default save='true'/> <item jid='romeo@montague.net' save='false'/> </save>`,
      ),
    );
  });

  test('<otr/> and <record/>: off the record with a contact, the list and the push', () => {
    // XEP-0136 0.5 §3.2: <iq type='get' id='otr1' from='romeo@montague.net/castle'> <otr xmlns='http://jabber.org/protocol/archive'/> </iq>
    expect(
      decodeIq(
        `<iq type='get' id='otr1' from='romeo@montague.net/castle'> <otr xmlns='http://jabber.org/protocol/archive'/> </iq>`,
      ),
    ).toEqual({
      kind: 'otr-get',
    });
    // XEP-0136 0.5 §3.2 (the seed's closing "/iq>" restored to "</iq>"):
    // <iq type='set' id='otr2' from='juliet@capulet.com/chamber'> <record xmlns='http://jabber.org/protocol/archive' jid='romeo@montague.net' otr='true'/> /iq>
    const record = decodeIq(
      `<iq type='set' id='otr2' from='juliet@capulet.com/chamber'> <record xmlns='http://jabber.org/protocol/archive' jid='romeo@montague.net' otr='true'/> </iq>`,
    );
    expect(record).toEqual({ kind: 'record-set', jid: 'romeo@montague.net', otr: true });
    const prefs = applyPrefChange(emptyPrefs, record);
    expect(prefs.items['romeo@montague.net']).toMatchObject({ save: 'false', otr: 'require' });
    expect(effectiveMode(prefs, parseJid('romeo@montague.net/orchard'))).toMatchObject({
      save: 'false',
      source: 'bare',
    });
    // XEP-0136 0.5 §3.2: <otr xmlns='http://jabber.org/protocol/archive'> <record jid='priest@church.org' otr='true'/> </otr>
    const priest = applyPrefChange(emptyPrefs, { kind: 'record-set', jid: 'priest@church.org', otr: true });
    expectSameXml(
      encodeOtr(priest),
      xml(
        `<otr xmlns='http://jabber.org/protocol/archive'> <record jid='priest@church.org' otr='true'/> </otr>`,
      ),
    );
    // XEP-0136 0.5 §3.2: <record xmlns='http://jabber.org/protocol/archive' jid='romeo@montague.net' otr='true'/>
    expectSameXml(
      encodeRecordPush('romeo@montague.net', true),
      xml(`<record xmlns='http://jabber.org/protocol/archive' jid='romeo@montague.net' otr='true'/>`),
    );
    // "a shared off-the-record state that can be enabled and disabled by either user": off again,
    // the contact is saved as before (here, by the default: no item of its own was there).
    const back = applyPrefChange(prefs, { kind: 'record-set', jid: 'romeo@montague.net', otr: false });
    expect(back.items['romeo@montague.net']).toBeUndefined();
    expect(effectiveMode(back, parseJid('romeo@montague.net/orchard'))).toEqual(
      effectiveMode(emptyPrefs, parseJid('romeo@montague.net/orchard')),
    );
    // A contact with a Save Mode and expiry of its own gets them back, not save='false'.
    const own = applyPrefChange(
      emptyPrefs,
      decodeIq(
        `<iq type='set'><pref xmlns='http://jabber.org/protocol/archive'><item jid='nurse@capulet.com' save='body' otr='try' expire='3600'/></pref></iq>`,
      ),
    );
    expect(own.items['nurse@capulet.com']).toEqual({ save: 'body', otr: 'try', expire: 3600 });
    const offRecord = applyPrefChange(own, { kind: 'record-set', jid: 'nurse@capulet.com', otr: true });
    expect(offRecord.items['nurse@capulet.com']).toMatchObject({ save: 'false', otr: 'require' });
    // Asked twice, the first state is still what comes back.
    const twice = applyPrefChange(offRecord, { kind: 'record-set', jid: 'nurse@capulet.com', otr: true });
    const onRecord = applyPrefChange(twice, { kind: 'record-set', jid: 'nurse@capulet.com', otr: false });
    expect(onRecord.items['nurse@capulet.com']).toEqual(own.items['nurse@capulet.com']);
    // The 0.5 view: the contact is saved again.
    expect(
      encodeSave(onRecord)
        .getChildren('item')
        .map((item) => item.attrs),
    ).toEqual([{ jid: 'nurse@capulet.com', save: 'true' }]);
    // 0.5 §3.1: a user may "override the default setting for a particular contact". Set while
    // the contact is off the record, that Save Mode is what the record's end leaves.
    const offAgain = applyPrefChange(emptyPrefs, {
      kind: 'record-set',
      jid: 'romeo@montague.net',
      otr: true,
    });
    const saved = applyPrefChange(offAgain, {
      kind: 'save-set',
      items: [{ jid: 'romeo@montague.net', save: true }],
    });
    const onAgain = applyPrefChange(saved, { kind: 'record-set', jid: 'romeo@montague.net', otr: false });
    expect(onAgain.items['romeo@montague.net']).toMatchObject({ save: 'body' });
    expect(
      encodeSave(onAgain)
        .getChildren('item')
        .map((item) => item.attrs),
    ).toEqual([{ jid: 'romeo@montague.net', save: 'true' }]);
  });

  test('<list maxitems/> and the partial reply; <retrieve/> without <set/> says partial', () => {
    // XEP-0136 0.5 §4.2: <iq type='get' to='montague.net'> <list xmlns='http://jabber.org/protocol/archive' maxitems='50'/> </iq>
    const request = decodeIq(
      `<iq type='get' to='montague.net'> <list xmlns='http://jabber.org/protocol/archive' maxitems='50'/> </iq>`,
    );
    expect(request).toMatchObject({ kind: 'list', maxitems: 50, page: { present: false, max: 50 } });
    if (request.kind !== 'list') throw new Error('list');
    // XEP-0136 0.5 §4.2: <list partial='true' xmlns='http://jabber.org/protocol/archive'> <store with='juliet@capulet.com' start='1469-07-21T02:56:15Z' subject='She speaks!'/> <store with='balcony@house.capulet.com' start='1469-07-21T03:16:37Z'/> ... </list>
    const list = encodeList(
      {
        items: [
          header({ with: 'juliet@capulet.com', start: ms('1469-07-21T02:56:15Z'), subject: 'She speaks!' }),
          header({ with: 'balcony@house.capulet.com', start: ms('1469-07-21T03:16:37Z') }),
        ],
        count: 60,
      },
      request,
    );
    expectSameXml(
      list,
      xml(
        `<list partial='true' xmlns='http://jabber.org/protocol/archive'> <store with='juliet@capulet.com' start='1469-07-21T02:56:15Z' subject='She speaks!'/> <store with='balcony@house.capulet.com' start='1469-07-21T03:16:37Z'/> </list>`,
      ),
    );
    const noSet = decodeRsm(xml('<retrieve/>'), { defaultMax: 1, max: 1 });
    const store = encodeCollection(
      header({ with: 'juliet@capulet.com', start: 0 }),
      { items: [{ seq: 0, id: 'x', kind: 'from', at: 0, xml: '<from><body>a</body></from>' }], count: 3 },
      [],
      noSet,
    );
    expect(store.attrs.partial).toBe('true');
    expect(store.getChild('set')).toBeUndefined();
  });
});

// ---------------------------------------------------------------------------------------------
// Hostile grid

describe('hostile requests', () => {
  const ns = "xmlns='http://jabber.org/protocol/archive'";
  const rsmNs = "xmlns='http://jabber.org/protocol/rsm'";
  const cases: [string, 'get' | 'set', string, string][] = [
    // Dates
    ['a date without a time zone', 'get', `<list ${ns} start='1469-07-21T02:00:00'/>`, 'bad-request'],
    ['a date with a non-UTC offset', 'get', `<list ${ns} start='1469-07-21T02:00:00+02:00'/>`, 'bad-request'],
    ['a date only', 'get', `<list ${ns} start='1469-07-21'/>`, 'bad-request'],
    ['the 13th month', 'get', `<list ${ns} start='1469-13-21T02:00:00Z'/>`, 'bad-request'],
    ['the 30th of February', 'set', `<remove ${ns} start='2006-02-30T00:00:00Z'/>`, 'bad-request'],
    ['25 o’clock', 'get', `<list ${ns} end='1469-07-21T25:00:00Z'/>`, 'bad-request'],
    ['words for a date', 'set', `<store ${ns} with='a@b/c' start='yesterday'/>`, 'bad-request'],
    [
      'a note with a bad utc',
      'set',
      `<store ${ns} with='a@b/c' start='1469-07-21T02:00:00Z'><note utc='now'>x</note></store>`,
      'bad-request',
    ],
    [
      'a modified cursor that is no time',
      'get',
      `<modified ${ns}><set ${rsmNs}><after>99</after></set></modified>`,
      'bad-request',
    ],
    // Unknown or misplaced children
    ['an unknown archive child in list', 'get', `<list ${ns}><foo/></list>`, 'bad-request'],
    [
      'an unknown archive child in store',
      'set',
      `<store ${ns} with='a@b/c' start='1469-07-21T02:00:00Z'><body>x</body></store>`,
      'bad-request',
    ],
    [
      'a thread in an uploaded message',
      'set',
      `<store ${ns} with='a@b/c' start='1469-07-21T02:00:00Z'><to><thread>t</thread></to></store>`,
      'bad-request',
    ],
    [
      'chat states in an uploaded message',
      'set',
      `<store ${ns} with='a@b/c' start='1469-07-21T02:00:00Z'><to><active xmlns='http://jabber.org/protocol/chatstates'/></to></store>`,
      'bad-request',
    ],
    ['auto inside pref', 'set', `<pref ${ns}><auto save='true'/></pref>`, 'bad-request'],
    ['an unknown RSM child', 'get', `<list ${ns}><set ${rsmNs}><page>2</page></set></list>`, 'bad-request'],
    ['an unknown request', 'get', `<history ${ns}/>`, 'feature-not-implemented'],
    // RSM
    ['a negative index', 'get', `<list ${ns}><set ${rsmNs}><index>-1</index></set></list>`, 'bad-request'],
    ['a negative max', 'get', `<list ${ns}><set ${rsmNs}><max>-5</max></set></list>`, 'bad-request'],
    [
      'a max of 10^12',
      'get',
      `<list ${ns}><set ${rsmNs}><max>1000000000000</max></set></list>`,
      'bad-request',
    ],
    [
      'after and before together',
      'get',
      `<list ${ns}><set ${rsmNs}><after>a</after><before>b</before></set></list>`,
      'bad-request',
    ],
    [
      'index with after',
      'get',
      `<list ${ns}><set ${rsmNs}><index>2</index><after>a</after></set></list>`,
      'bad-request',
    ],
    ['two max', 'get', `<list ${ns}><set ${rsmNs}><max>1</max><max>2</max></set></list>`, 'bad-request'],
    [
      'modified paged backwards',
      'get',
      `<modified ${ns}><set ${rsmNs}><before/></set></modified>`,
      'bad-request',
    ],
    // XEP-0059 §2.6: "the responding entity MAY return a <feature-not-implemented/> error".
    [
      'modified by index',
      'get',
      `<modified ${ns}><set ${rsmNs}><max>5</max><index>50</index></set></modified>`,
      'feature-not-implemented',
    ],
    [
      'keys by index',
      'get',
      `<keys ${ns}><KeyName xmlns='http://www.w3.org/2000/09/xmldsig#'>k</KeyName><set ${rsmNs}><max>50</max><index>50</index></set></keys>`,
      'feature-not-implemented',
    ],
    // Preferences
    [
      "save='true' (0.5) in a 0.9 <pref/>",
      'set',
      `<pref ${ns}><default save='true' otr='allow'/></pref>`,
      'bad-request',
    ],
    ['an unknown otr', 'set', `<pref ${ns}><default save='body' otr='maybe'/></pref>`, 'bad-request'],
    [
      'otr require with save body',
      'set',
      `<pref ${ns}><item jid='a@b' save='body' otr='require'/></pref>`,
      'bad-request',
    ],
    [
      'a negative expire',
      'set',
      `<pref ${ns}><default save='body' otr='allow' expire='-1'/></pref>`,
      'bad-request',
    ],
    [
      'a fractional expire',
      'set',
      `<pref ${ns}><default save='body' otr='allow' expire='1.5'/></pref>`,
      'bad-request',
    ],
    ['a missing otr', 'set', `<pref ${ns}><default save='body'/></pref>`, 'bad-request'],
    ['an item without jid', 'set', `<pref ${ns}><item save='body' otr='allow'/></pref>`, 'bad-request'],
    [
      'an invalid jid',
      'set',
      `<pref ${ns}><item jid='a@@b' save='body' otr='allow'/></pref>`,
      'jid-malformed',
    ],
    ['an empty resource', 'get', `<list ${ns} with='juliet@capulet.com/'/>`, 'jid-malformed'],
    [
      'two defaults',
      'set',
      `<pref ${ns}><default save='body' otr='allow'/><default save='false' otr='allow'/></pref>`,
      'bad-request',
    ],
    ['an unknown method', 'set', `<pref ${ns}><method type='telepathy' use='allow'/></pref>`, 'bad-request'],
    ['an unknown method use', 'set', `<pref ${ns}><method type='auto' use='always'/></pref>`, 'bad-request'],
    ['an empty pref set', 'set', `<pref ${ns}/>`, 'bad-request'],
    // 0.5 and 0.9 mixed
    [
      'maxitems with <set/>',
      'get',
      `<list ${ns} maxitems='10'><set ${rsmNs}><max>5</max></set></list>`,
      'bad-request',
    ],
    ['maxitems of 0', 'get', `<list ${ns} maxitems='0'/>`, 'bad-request'],
    ['partial in a request', 'get', `<list ${ns} partial='true'/>`, 'bad-request'],
    ["save='body' (0.9) in a 0.5 <save/>", 'set', `<save ${ns}><default save='body'/></save>`, 'bad-request'],
    [
      'otr on a 0.5 save item',
      'set',
      `<save ${ns}><item jid='a@b' save='true' otr='allow'/></save>`,
      'bad-request',
    ],
    ['a 0.5 record with a 0.9 otr value', 'set', `<record ${ns} jid='a@b' otr='require'/>`, 'bad-request'],
    // Request types and required attributes
    ['a list set', 'set', `<list ${ns}/>`, 'bad-request'],
    ['a store get', 'get', `<store ${ns} with='a@b/c' start='1469-07-21T02:00:00Z'/>`, 'bad-request'],
    ['a retrieve without start', 'get', `<retrieve ${ns} with='a@b/c'/>`, 'bad-request'],
    [
      'secs and utc together',
      'set',
      `<store ${ns} with='a@b/c' start='1469-07-21T02:00:00Z'><to secs='1' utc='1469-07-21T02:00:00Z'/></store>`,
      'bad-request',
    ],
    [
      'a negative secs',
      'set',
      `<store ${ns} with='a@b/c' start='1469-07-21T02:00:00Z'><to secs='-3'/></store>`,
      'bad-request',
    ],
    [
      'EncryptedData without a key name',
      'set',
      `<store ${ns} with='a@b/c' start='1469-07-21T02:00:00Z'><EncryptedData xmlns='http://www.w3.org/2001/04/xmlenc#'/></store>`,
      'bad-request',
    ],
    ['keys without a KeyName', 'get', `<keys ${ns}/>`, 'bad-request'],
    ['auto without save', 'set', `<auto ${ns}/>`, 'bad-request'],
    ["auto save='yes'", 'set', `<auto ${ns} save='yes'/>`, 'bad-request'],
  ];

  test.each(cases)('%s', (_, type, request, condition) => {
    const error = stanzaError(() => decodeRequest(type, xml(request)));
    expect(error.condition).toBe(condition);
  });

  test('a huge max is capped, not refused (XEP-0059 §2.1 allows fewer items)', () => {
    const request = decodeRequest('get', xml(`<list ${ns}><set ${rsmNs}><max>999999999</max></set></list>`));
    expect(request).toMatchObject({ page: { max: 250 } });
    const maxitems = decodeRequest('get', xml(`<list ${ns} maxitems='999999'/>`));
    expect(maxitems).toMatchObject({ maxitems: 250 });
  });

  test('children of other namespaces are the schema’s "any ##other" and are ignored', () => {
    const request = decodeRequest(
      'set',
      xml(
        `<store ${ns} with='a@b/c' start='1469-07-21T02:00:00Z'><x xmlns='urn:example'/><to secs='1'><body>b</body></to></store>`,
      ),
    );
    expect(request).toMatchObject({ kind: 'store', entries: [{ kind: 'to', secs: 1 }] });
  });

  test('JIDs are normalised (case) before they key anything', () => {
    expect(decodeRequest('get', xml(`<list ${ns} with='Juliet@Capulet.COM'/>`))).toMatchObject({
      with: { kind: 'bare', jid: 'juliet@capulet.com' },
    });
  });

  test('DateTime: years 0000 to 0099 are not taken for 1900–1999; fractions keep their digits', () => {
    expect(formatDateTime(parseDateTime('0042-01-01T00:00:00Z', 'x').ms)).toBe('0042-01-01T00:00:00Z');
    expect(formatDateTime(parseDateTime('1469-07-21T02:56:15.5Z', 'x').ms)).toBe('1469-07-21T02:56:15.500Z');
    expect(parseDateTime('1469-07-21T02:56:15-00:00', 'x').ms).toBe(ms('1469-07-21T02:56:15Z'));
  });
});

describe('the service policy from configuration', () => {
  test('ARCHIVE_AUTO_REQUIRED alone logs bodies: "at least the <body/> … of every message is logged automatically" (0.9 §3.3)', () => {
    expect(loadConfig({ ARCHIVE_AUTO_REQUIRED: 'true' })).toMatchObject({
      archiveAutoRequired: true,
      archiveDefaultSave: 'body',
      archiveDefaultOtr: 'allow',
    });
    expect(
      loadConfig({ ARCHIVE_AUTO_REQUIRED: 'true', ARCHIVE_DEFAULT_SAVE: 'all' }).archiveDefaultSave,
    ).toBe('all');
    // Without it the service default stays as documented: nothing saved until the user asks.
    expect(loadConfig({}).archiveDefaultSave).toBe('false');
  });

  test('refuses, at start, a required archive whose default would log nothing', () => {
    expect(() => loadConfig({ ARCHIVE_AUTO_REQUIRED: 'true', ARCHIVE_DEFAULT_SAVE: 'false' })).toThrow(
      /ARCHIVE_DEFAULT_SAVE must be body or all/,
    );
    expect(() => loadConfig({ ARCHIVE_AUTO_REQUIRED: 'true', ARCHIVE_DEFAULT_OTR: 'require' })).toThrow(
      /ARCHIVE_AUTO_REQUIRED=true/,
    );
  });
});
