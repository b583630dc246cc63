/**
 * XEP-0136 Message Archiving, `http://jabber.org/protocol/archive`: every request element of the
 * 0.9 draft (the contract) and the 0.5 draft's own requests (`<save/>`, `<otr/>`, `<record/>`,
 * `maxitems` on `<list/>`), decoded into typed values and validated as the drafts say. Where the
 * drafts differ, 0.9 wins: a 0.9 element carrying a 0.5 value (e.g. `<default save='true'/>` in
 * `<pref/>`) is `bad-request`, and so is a request mixing the two drafts' paging.
 */
import type { Element } from 'ltx';
import { StanzaError } from '../../errors.ts';
import { bareJid, fullJid, parseJid } from '../../jid.ts';
import type { EncryptedKeyInput, EntryKind, Mode, WithFilter } from '../../store/archive.ts';
import { NS } from '../../xml/namespaces.ts';
import { type DateTimeValue, LAST_DATETIME_MS, parseDateTime } from './datetime.ts';
import { decodeRsm, type RsmRequest } from './rsm.ts';

export const ARCHIVE_NS = 'http://jabber.org/protocol/archive';

/** Every element of the namespace a client may send (0.9 and the 0.5 requests); decodeRequest says which iq type each takes. */
export const ARCHIVE_REQUESTS = [
  'pref',
  'auto',
  'list',
  'retrieve',
  'remove',
  'store',
  'keys',
  'delete',
  'modified',
  'save',
  'otr',
  'record',
] as const;
export const XMLENC_NS = 'http://www.w3.org/2001/04/xmlenc#';
export const XMLDSIG_NS = 'http://www.w3.org/2000/09/xmldsig#';

/**
 * §2: "'http://jabber.org/protocol/archive#name', where "name" is "auto" …, "encrypt" for the
 * server-side encryption feature, "manage" …, "manual" …, or "pref"". No `#encrypt`: the server
 * does not encrypt what it archives (§7.2 requests get feature-not-implemented).
 */
export const ARCHIVE_FEATURES = ['auto', 'manage', 'manual', 'pref'].map((name) => `${ARCHIVE_NS}#${name}`);

/** Page sizes: the default when `<max/>` is absent, and the most one page holds. */
export const PAGE_LIMITS = {
  list: { defaultMax: 100, max: 250 },
  retrieve: { defaultMax: 100, max: 250 },
  keys: { defaultMax: 50, max: 100 },
  modified: { defaultMax: 100, max: 250 },
} as const;

export type SaveMode = Mode['save'];
export type OtrMode = Mode['otr'];
export type MethodType = 'auto' | 'local' | 'manual';
export type MethodUse = 'prefer' | 'allow' | 'never';

export interface ManualEntry {
  kind: EntryKind;
  /** XEP-0136 §5.2: seconds after the previous message (or, for the first, the start). */
  secs?: number;
  /** XEP-0136 §5.4: an absolute time instead of `secs`; for notes, when the note was written. */
  utc?: number;
  /** The element to store, without `secs`/`utc` (a note keeps its `utc`). */
  element: Element;
  /** EncryptedData: the name of its symmetric key. */
  keyName?: string;
}

export type ArchiveRequest =
  | { kind: 'pref-get' }
  | {
      kind: 'pref-set';
      default?: Mode;
      items: { jid: string; mode: Mode }[];
      methods: { type: MethodType; use: MethodUse }[];
    }
  | { kind: 'auto'; save: boolean; encrypt: boolean }
  | {
      kind: 'list';
      with?: WithFilter;
      start?: number;
      end?: number;
      page: RsmRequest;
      /** 0.5: `maxitems` instead of `<set/>`; the reply says `partial='true'` when cut. */
      maxitems?: number;
    }
  | { kind: 'retrieve'; with: string; start: number; keyNames: string[]; page: RsmRequest }
  | { kind: 'remove'; with?: WithFilter; start?: number; end?: number; open: boolean; exact: boolean }
  | {
      kind: 'store';
      with: string;
      start: number;
      subject?: string;
      entries: ManualEntry[];
      keys: EncryptedKeyInput[];
    }
  | { kind: 'keys'; keyName: string; page: RsmRequest }
  | { kind: 'delete'; with: string; start: number; keyNames: string[] }
  | { kind: 'modified'; after?: DateTimeValue; page: RsmRequest }
  // XEP-0136 0.5 §3.1: Save Mode.
  | { kind: 'save-get' }
  | { kind: 'save-set'; default?: boolean; items: { jid: string; save: boolean }[] }
  // XEP-0136 0.5 §3.2: Off-the-Record Mode.
  | { kind: 'otr-get' }
  | { kind: 'record-set'; jid: string; otr: boolean };

/**
 * XEP-0059 §2.6: "If it would be either impossible or exceptionally resource intensive for the
 * responding entity to derive the first UID from the specified index … the responding entity MAY
 * return a <feature-not-implemented/> error" (rather than a page labelled with the wrong index).
 */
function noPageJumps(request: string): StanzaError {
  return new StanzaError('cancel', 'feature-not-implemented', `${request} pages with after, not by index`);
}

function badRequest(text: string): StanzaError {
  return new StanzaError('modify', 'bad-request', text);
}

const SAVE_VALUES: readonly SaveMode[] = ['false', 'body', 'all'];
const OTR_VALUES: readonly OtrMode[] = ['allow', 'deny', 'require', 'try'];
const METHOD_TYPES: readonly MethodType[] = ['auto', 'local', 'manual'];
const METHOD_USES: readonly MethodUse[] = ['prefer', 'allow', 'never'];

function attr(el: Element, name: string): string | undefined {
  const value = el.attrs[name];
  return typeof value === 'string' ? value : undefined;
}

function required(el: Element, name: string): string {
  const value = attr(el, name);
  if (value === undefined || value === '') throw badRequest(`<${el.name}/> needs '${name}'`);
  return value;
}

function oneOf<T extends string>(el: Element, name: string, values: readonly T[]): T {
  const value = required(el, name);
  if (!(values as readonly string[]).includes(value))
    throw badRequest(`${name}='${value}' is not one of ${values.join(', ')}`);
  return value as T;
}

/** xs:boolean: true, false, 1, 0. */
function xsBoolean(el: Element, name: string, fallback?: boolean): boolean {
  const value = attr(el, name);
  if (value === undefined) {
    if (fallback === undefined) throw badRequest(`<${el.name}/> needs '${name}'`);
    return fallback;
  }
  if (value === 'true' || value === '1') return true;
  if (value === 'false' || value === '0') return false;
  throw badRequest(`${name} is a boolean`);
}

/** xs:nonNegativeInteger, up to what a number holds exactly. */
function nonNegativeInteger(el: Element, name: string): number | undefined {
  const value = attr(el, name);
  if (value === undefined) return undefined;
  if (!/^\+?\d{1,15}$/.test(value)) throw badRequest(`${name} is a non-negative integer`);
  return Number(value);
}

function dateTime(el: Element, name: string): number | undefined {
  const value = attr(el, name);
  return value === undefined ? undefined : parseDateTime(value, name).ms;
}

/**
 * A JID attribute, normalised; an invalid one is `jid-malformed` (RFC 6120 §8.3.3.8). `__proto__`
 * (a domainpart no DNS name has: RFC 7622's are IDNA2008 labels, without `_`) is refused too: the
 * preferences keep items by JID in a map, which a JavaScript object reads that key of as its prototype.
 */
function jidAttr(el: Element, name: string): string | undefined {
  const value = attr(el, name);
  if (value === undefined) return undefined;
  const jid = fullJid(parseJid(value));
  if (jid === '__proto__') throw new StanzaError('modify', 'jid-malformed', 'Invalid domainpart');
  return jid;
}

/** XEP-0136 §8.1: "The 'with' attribute MAY be specified to limit the list to a single participating full JID, bare JID or domain." */
export function withFilter(text: string): WithFilter {
  const jid = parseJid(text);
  if (jid.resource) return { kind: 'full', jid: fullJid(jid) };
  if (jid.local) return { kind: 'bare', jid: bareJid(jid) };
  return { kind: 'domain', jid: jid.domain };
}

/** Children of the archive namespace must be the ones listed; other namespaces are the schema's `any ##other`. */
function ownChildren(el: Element, allowed: readonly string[]): Element[] {
  const own = el.getChildElements().filter((child) => child.getNS() === ARCHIVE_NS);
  for (const child of own) {
    if (!allowed.includes(child.name)) throw badRequest(`unexpected <${child.name}/> in <${el.name}/>`);
  }
  return own;
}

function noOwnChildren(el: Element): void {
  ownChildren(el, []);
}

/**
 * The longest key name (a KeyName or a CarriedKeyName): they are parts of DynamoDB keys, URI
 * encoded (up to three times as long), with the collection's start and `with` in one of them.
 */
export const MAX_KEY_NAME_BYTES = 128;

function keyName(text: string, what: string): string {
  if (Buffer.byteLength(text, 'utf8') > MAX_KEY_NAME_BYTES)
    throw badRequest(`${what} is over ${MAX_KEY_NAME_BYTES} bytes`);
  return text;
}

function keyNames(el: Element): string[] {
  return el.getChildren('KeyName', XMLDSIG_NS).map((k) => {
    const name = k.getText().trim();
    if (name === '') throw badRequest('KeyName is empty');
    return keyName(name, 'KeyName');
  });
}

/**
 * A `<default/>` or `<item/>` of `<pref/>`. XEP-0136 §3.2: "Each <default/> or <item/> element
 * … MUST include a 'save' attribute" (false, body or all) and "MUST include an 'otr' attribute"
 * (deny, allow, try or require); "If the OTR Mode is 'require' then the Save Mode MUST be 'false'."
 */
export function decodeMode(el: Element): Mode {
  const save = oneOf(el, 'save', SAVE_VALUES);
  const otr = oneOf(el, 'otr', OTR_VALUES);
  if (otr === 'require' && save !== 'false') throw badRequest("otr='require' needs save='false'");
  const expire = nonNegativeInteger(el, 'expire');
  if (attr(el, 'unset') !== undefined) xsBoolean(el, 'unset');
  return expire === undefined ? { save, otr } : { save, otr, expire };
}

function decodePrefSet(pref: Element): ArchiveRequest {
  const children = ownChildren(pref, ['default', 'item', 'method', 'auto']);
  if (children.length === 0) throw badRequest('<pref/> of an iq set needs something to set');
  const defaults = children.filter((c) => c.name === 'default');
  if (defaults.length > 1) throw badRequest('one <default/> at most');
  const items: { jid: string; mode: Mode }[] = [];
  for (const item of children.filter((c) => c.name === 'item')) {
    const jid = jidAttr(item, 'jid');
    if (jid === undefined) throw badRequest('<item/> needs a jid');
    if (items.some((i) => i.jid === jid)) throw badRequest(`two items for ${jid}`);
    items.push({ jid, mode: decodeMode(item) });
  }
  const methods: { type: MethodType; use: MethodUse }[] = [];
  for (const method of children.filter((c) => c.name === 'method')) {
    const type = oneOf(method, 'type', METHOD_TYPES);
    if (methods.some((m) => m.type === type)) throw badRequest(`two methods of type ${type}`);
    methods.push({ type, use: oneOf(method, 'use', METHOD_USES) });
  }
  // XEP-0136 §3.2: "changes to the <auto/> element MUST NOT be replicated": it is per stream and
  // set with its own request (§7.1), never through <pref/>.
  if (children.some((c) => c.name === 'auto'))
    throw badRequest('set auto-archiving with <auto/>, not <pref/>');
  const first = defaults[0];
  return { kind: 'pref-set', default: first ? decodeMode(first) : undefined, items, methods };
}

/**
 * Children (entries and keys) one `<store/>` may carry. Each is a write; a 64 KB stanza of empty
 * `<to/>` elements would otherwise be about 12,000 writes from one frame. §5.3 expects clients to
 * upload in parts: "Clients MUST take care to append each sequence of messages to the collection
 * before the sequence becomes so large that uploading it may violate common rate limiting
 * restrictions".
 */
export const MAX_STORE_ITEMS = 256;

/** The entries and keys of a `<store/>` (XEP-0136 §5.3–§6). */
function decodeStoreContent(store: Element): { entries: ManualEntry[]; keys: EncryptedKeyInput[] } {
  const entries: ManualEntry[] = [];
  const keys: EncryptedKeyInput[] = [];
  const children = store.getChildElements();
  // §5.3: "If the server cannot service a store request because the collection is too large then
  // it MUST return a <not-acceptable/> error": so too for a request too large to serve at once.
  if (children.length > MAX_STORE_ITEMS)
    throw new StanzaError('modify', 'not-acceptable', `at most ${MAX_STORE_ITEMS} entries per <store/>`);
  for (const child of children) {
    const ns = child.getNS();
    if (ns === ARCHIVE_NS && (child.name === 'to' || child.name === 'from')) {
      const secs = nonNegativeInteger(child, 'secs');
      const utc = dateTime(child, 'utc');
      if (secs !== undefined && utc !== undefined)
        throw badRequest(`<${child.name}/> has secs or utc, not both`);
      if (attr(child, 'name') === '') throw badRequest('an empty name');
      // XEP-0136 §5.2: "<thread/> elements and elements qualified by the 'jabber:x:delay',
      // 'jabber:x:event' and 'http://jabber.org/protocol/chatstates' namespaces MUST NOT be included."
      for (const inner of child.getChildElements()) {
        if (inner.name === 'thread' || FORBIDDEN_IN_MESSAGES.has(inner.getNS() ?? ''))
          throw badRequest(`<${inner.name}/> must not be archived`);
      }
      entries.push({ kind: child.name, secs, utc, element: child });
    } else if (ns === ARCHIVE_NS && child.name === 'note') {
      if (child.getChildElements().length > 0) throw badRequest('a note is text');
      entries.push({ kind: 'note', utc: dateTime(child, 'utc'), element: child });
    } else if (ns === XMLENC_NS && child.name === 'EncryptedData') {
      const named = child.getChild('KeyInfo', XMLDSIG_NS)?.getChildText('KeyName', XMLDSIG_NS)?.trim();
      if (!named) throw badRequest('EncryptedData needs KeyInfo/KeyName');
      entries.push({ kind: 'data', element: child, keyName: keyName(named, 'KeyName') });
    } else if (ns === XMLENC_NS && child.name === 'EncryptedKey') {
      const carriedKeyName = child.getChildText('CarriedKeyName', XMLENC_NS)?.trim();
      const publicKeyName = child
        .getChild('KeyInfo', XMLDSIG_NS)
        ?.getChildText('KeyName', XMLDSIG_NS)
        ?.trim();
      if (!carriedKeyName || !publicKeyName)
        throw badRequest('EncryptedKey needs CarriedKeyName and KeyInfo/KeyName');
      keys.push({
        carriedKeyName: keyName(carriedKeyName, 'CarriedKeyName'),
        publicKeyName: keyName(publicKeyName, 'KeyName'),
        xml: child.toString(),
      });
    } else if (ns === ARCHIVE_NS) {
      throw badRequest(`unexpected <${child.name}/> in <store/>`);
    }
    // Other namespaces: the schema's `any namespace='##other'`, ignored.
  }
  return { entries, keys };
}

const FORBIDDEN_IN_MESSAGES = new Set(['jabber:x:delay', 'jabber:x:event', NS.chatStates]);

/**
 * The longest `with` a collection can have: its JID is part of DynamoDB sort keys, which hold
 * 1024 bytes (`c#`, the 24-character start and a `/` before it). Accounts and bound resources
 * are short enough for any two of them (MAX_RESOURCE_BYTES); a client's own JID may be longer.
 */
export const MAX_WITH_BYTES = 1024 - 'c#'.length - 24 - 1;

function fittingWith(el: Element, jid: string): string {
  if (Buffer.byteLength(jid, 'utf8') > MAX_WITH_BYTES)
    throw badRequest(`<${el.name}/>'s 'with' is over ${MAX_WITH_BYTES} bytes`);
  return jid;
}

function collectionRef(el: Element): { with: string; start: number } {
  const found = jidAttr(el, 'with');
  if (found === undefined) throw badRequest(`<${el.name}/> needs 'with'`);
  const withJid = fittingWith(el, found);
  const start = dateTime(el, 'start');
  if (start === undefined) throw badRequest(`<${el.name}/> needs 'start'`);
  return { with: withJid, start };
}

function range(el: Element): { with?: WithFilter; start?: number; end?: number } {
  const withText = attr(el, 'with');
  const start = dateTime(el, 'start');
  const end = dateTime(el, 'end');
  // The bound applies to the JID as normalised (as stored and queried): NFC can make it longer.
  const filter = withText === undefined ? undefined : withFilter(withText);
  if (filter) fittingWith(el, filter.jid);
  return { with: filter, start, end };
}

/** Decodes the one archive element an iq carries; `type` is the iq's. */
export function decodeRequest(type: 'get' | 'set', el: Element): ArchiveRequest {
  if (el.getNS() !== ARCHIVE_NS) throw badRequest('not an archive request');
  const expect = (wanted: 'get' | 'set' | 'any') => {
    if (wanted !== 'any' && type !== wanted) throw badRequest(`<${el.name}/> is an iq ${wanted}`);
  };
  switch (el.name) {
    case 'pref':
      if (type === 'get') {
        noOwnChildren(el);
        return { kind: 'pref-get' };
      }
      return decodePrefSet(el);
    case 'auto':
      expect('set');
      return { kind: 'auto', save: xsBoolean(el, 'save'), encrypt: xsBoolean(el, 'encrypt', false) };
    case 'list': {
      expect('get');
      ownChildren(el, []);
      const maxitemsText = attr(el, 'maxitems');
      const page = decodeRsm(el, PAGE_LIMITS.list);
      let maxitems: number | undefined;
      if (maxitemsText !== undefined) {
        // 0.5 §4.2: maxitems is an xs:positiveInteger; 0.9 pages with XEP-0059 instead.
        if (!/^\d{1,9}$/.test(maxitemsText) || Number(maxitemsText) === 0)
          throw badRequest('maxitems is a positive integer');
        if (page.present) throw badRequest('page with <set/> or maxitems, not both');
        maxitems = Math.min(Number(maxitemsText), PAGE_LIMITS.list.max);
        page.max = maxitems;
      }
      if (attr(el, 'partial') !== undefined) throw badRequest('partial is for replies');
      const bounds = range(el);
      return { kind: 'list', ...bounds, page, maxitems };
    }
    case 'retrieve': {
      expect('get');
      ownChildren(el, []);
      return {
        kind: 'retrieve',
        ...collectionRef(el),
        keyNames: keyNames(el),
        page: decodeRsm(el, PAGE_LIMITS.retrieve),
      };
    }
    case 'remove': {
      expect('set');
      noOwnChildren(el);
      const bounds = range(el);
      const open = xsBoolean(el, 'open', false);
      // §8.3: "The 'with' (full JID) and 'start' attributes MUST be included to uniquely identify
      // the collection" — with and start but no end name exactly one collection.
      const exact =
        !open && bounds.with !== undefined && bounds.start !== undefined && bounds.end === undefined;
      if (open && (bounds.start !== undefined || bounds.end !== undefined))
        throw badRequest("open='true' removes what is being recorded, whatever its start");
      // A start without an end or a with: the seed names a range only with both dates ("If the
      // end date is in the future then all collections after the start date are removed"), and a
      // single collection by its start. Removal cannot be undone, so this is the narrower reading:
      // the collections with any JID that start at that time (the end is exclusive).
      if (!open && bounds.with === undefined && bounds.start !== undefined && bounds.end === undefined)
        return {
          kind: 'remove',
          ...bounds,
          // At the last millisecond a DateTime names, nothing starts later: no end needed.
          ...(bounds.start < LAST_DATETIME_MS ? { end: bounds.start + 1 } : {}),
          open,
          exact,
        };
      return { kind: 'remove', ...bounds, open, exact };
    }
    case 'store': {
      expect('set');
      const ref = collectionRef(el);
      if (attr(el, 'crypt') !== undefined) xsBoolean(el, 'crypt');
      if (attr(el, 'partial') !== undefined) throw badRequest('partial is for replies');
      const content = decodeStoreContent(el);
      // A key's index entry is keyed `<start>/<with>#<CarriedKeyName>`, URI encoded.
      for (const key of content.keys) {
        const bytes =
          24 + 1 + Buffer.byteLength(ref.with, 'utf8') + 1 + encodeURIComponent(key.carriedKeyName).length;
        if (bytes > 1024) throw badRequest("the collection's 'with' is too long to store keys in");
      }
      return { kind: 'store', ...ref, subject: attr(el, 'subject'), ...content };
    }
    case 'keys': {
      expect('get');
      noOwnChildren(el);
      const names = keyNames(el);
      if (names.length !== 1) throw badRequest('<keys/> names one public key');
      // Its UIDs are keys' `keyRef`s, a sort key of up to 1,024 bytes without a prefix.
      const page = decodeRsm(el, PAGE_LIMITS.keys, 1024);
      if (page.index !== undefined) throw noPageJumps('<keys/>');
      return { kind: 'keys', keyName: names[0] as string, page };
    }
    case 'delete': {
      // The seed's only example sends <delete/> in an iq get; a removal is a set. Both are taken.
      noOwnChildren(el);
      const names = keyNames(el);
      if (names.length === 0) throw badRequest('<delete/> names the public keys');
      return { kind: 'delete', ...collectionRef(el), keyNames: names };
    }
    case 'modified': {
      expect('get');
      noOwnChildren(el);
      const page = decodeRsm(el, PAGE_LIMITS.modified);
      if (page.index !== undefined) throw noPageJumps('<modified/>');
      if (page.before !== undefined || page.lastPage)
        throw badRequest('<modified/> pages forwards, with after');
      // §10: "The content of the <after/> element SHOULD be a UTC time".
      const after = page.after === undefined ? undefined : parseDateTime(page.after, 'after');
      return { kind: 'modified', after, page };
    }
    case 'save': {
      if (type === 'get') {
        noOwnChildren(el);
        return { kind: 'save-get' };
      }
      const children = ownChildren(el, ['default', 'item']);
      if (children.length === 0) throw badRequest('<save/> of an iq set needs something to set');
      let saveDefault: boolean | undefined;
      const items: { jid: string; save: boolean }[] = [];
      for (const child of children) {
        // 0.5 §3.1: save is an xs:boolean here; the 0.9 values (body, all) belong to <pref/>.
        for (const name of ['otr', 'expire']) {
          if (attr(child, name) !== undefined) throw badRequest(`${name} belongs to <pref/>`);
        }
        if (child.name === 'default') {
          if (saveDefault !== undefined) throw badRequest('one <default/> at most');
          saveDefault = xsBoolean(child, 'save');
        } else {
          const jid = jidAttr(child, 'jid');
          if (jid === undefined) throw badRequest('<item/> needs a jid');
          items.push({ jid, save: xsBoolean(child, 'save') });
        }
      }
      return { kind: 'save-set', default: saveDefault, items };
    }
    case 'otr':
      expect('get');
      noOwnChildren(el);
      return { kind: 'otr-get' };
    case 'record': {
      expect('set');
      const jid = jidAttr(el, 'jid');
      if (jid === undefined) throw badRequest('<record/> of a client names the contact');
      return { kind: 'record-set', jid, otr: xsBoolean(el, 'otr') };
    }
    default:
      throw new StanzaError('cancel', 'feature-not-implemented', `<${el.name}/> is not an archive request`);
  }
}
