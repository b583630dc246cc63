/**
 * XEP-0136 replies and pushes, built last from what the store returned (decode → decide → encode).
 */
import { Element, parse } from 'ltx';
import type {
  ArchivedEntry,
  ArchivePrefs,
  Change,
  CollectionHeader,
  Mode,
  Page,
  StoredEncryptedKey,
} from '../../store/archive.ts';
import { timeAttribute } from './collections.ts';
import { formatDateTime } from './datetime.ts';
import { ARCHIVE_NS, type MethodType } from './decode.ts';
import { retention, SERVICE_POLICY, type ServicePolicy } from './preferences.ts';
import { encodeRsm, type RsmRequest } from './rsm.ts';

/** A mode's attributes; its `expire` as the server applies it (capped by the service's longest). */
function modeAttrs(mode: Mode, maxExpire = 0): Record<string, string> {
  const attrs: Record<string, string> = { save: mode.save, otr: mode.otr };
  // A mode that saves nothing shows what it says (no expire where none was set).
  const expire = maxExpire > 0 && mode.save !== 'false' ? retention(mode, maxExpire) : mode.expire;
  if (expire !== undefined) attrs.expire = String(expire);
  return attrs;
}

const METHOD_ORDER: MethodType[] = ['auto', 'local', 'manual'];

/**
 * §3.2: the default (with `unset='true'` and the service's modes when the user never set one),
 * one item per contact, "at least three" `<method/>` elements, and `<auto/>` for this stream.
 */
export function encodePrefs(
  prefs: ArchivePrefs,
  autoSave: boolean,
  policy: ServicePolicy = SERVICE_POLICY,
): Element {
  const pref = new Element('pref', { xmlns: ARCHIVE_NS });
  const max = policy.maxExpire;
  if (prefs.default) pref.c('default', modeAttrs(prefs.default, max));
  else pref.c('default', { ...modeAttrs(policy.default, max), unset: 'true' });
  for (const [jid, mode] of Object.entries(prefs.items)) pref.c('item', { jid, ...modeAttrs(mode, max) });
  for (const type of METHOD_ORDER)
    pref.c('method', { type, use: prefs.methods[type] ?? policy.methods[type] });
  pref.c('auto', { save: String(autoSave) });
  return pref;
}

/** §3.3/§3.4 push: the changed default, items and methods only (never `<auto/>`). */
export function encodePrefPush(
  change: {
    default?: Mode;
    items: { jid: string; mode: Mode }[];
    methods: { type: MethodType; use: string }[];
  },
  maxExpire = 0,
): Element {
  const pref = new Element('pref', { xmlns: ARCHIVE_NS });
  if (change.default) pref.c('default', modeAttrs(change.default, maxExpire));
  for (const { jid, mode } of change.items) pref.c('item', { jid, ...modeAttrs(mode, maxExpire) });
  for (const { type, use } of change.methods) pref.c('method', { type, use });
  return pref;
}

function storeAttrs(header: Pick<CollectionHeader, 'with' | 'start' | 'subject'>): Record<string, string> {
  const attrs: Record<string, string> = { with: header.with, start: formatDateTime(header.start) };
  if (header.subject !== undefined) attrs.subject = header.subject;
  return attrs;
}

/**
 * §8.1: "The server MUST list the collections (empty <store/> elements including all
 * attributes) in chronological order … If the collection contains <EncryptedData/> or
 * <EncryptedKey/> elements then the 'crypt' attribute … MUST be set to 'true'"; "If no
 * collections correspond to the request the server MUST return an empty <list/> element".
 * 0.5 (`maxitems`): `partial='true'` when more follow, and no `<set/>`; without either, a cut
 * list has both.
 */
export function encodeList(
  page: Page<CollectionHeader>,
  request: { page: RsmRequest; maxitems?: number },
  /** Whether more follow the page, when the caller read past it (exact, unlike `count`). */
  more?: boolean,
): Element {
  const partial = more ?? page.count > page.items.length;
  const list = new Element('list', { xmlns: ARCHIVE_NS });
  if (page.count === 0 && page.items.length === 0) return list;
  for (const header of page.items) {
    list.c('store', header.crypt ? { ...storeAttrs(header), crypt: 'true' } : storeAttrs(header));
  }
  if (request.maxitems !== undefined) {
    if (partial) list.attrs.partial = 'true';
    return list;
  }
  // A request without <set/> may be a 0.5 client's (0.5 §4.2, whose example has neither
  // <set/> nor maxitems): "the server MUST indicate that the list is incomplete by setting the
  // optional 'partial' attribute … to 'true'". A 0.9 client reads the <set/> beside it.
  if (!request.page.present && partial) list.attrs.partial = 'true';
  list.cnode(
    encodeRsm({ first: page.first, firstIndex: page.firstIndex, last: page.last, count: page.count }),
  );
  return list;
}

/** One archived entry with its `secs` or `utc` (§5.2, §5.4); notes and EncryptedData as stored. */
export function encodeEntry(
  header: Pick<CollectionHeader, 'start'>,
  entry: ArchivedEntry,
  relativeTo: 'previous' | 'start' = 'previous',
): Element {
  const el = parse(entry.xml) as Element;
  if (entry.kind === 'to' || entry.kind === 'from') {
    const time = timeAttribute(header.start, entry, relativeTo);
    if ('secs' in time) el.attrs.secs = String(time.secs);
    else el.attrs.utc = formatDateTime(time.utc);
  }
  return el;
}

/**
 * §8.2: the collection's `<store/>` with a page of its entries, "all the <EncryptedKey/>
 * elements … whose symmetric key name … is referenced" by the page's EncryptedData, and the RSM
 * `<set/>`; "If the requested collection is empty the server MUST return an empty <store/>".
 * Without `<set/>` in the request (0.5), a cut collection says `partial='true'` instead.
 */
export function encodeCollection(
  header: CollectionHeader,
  page: Page<ArchivedEntry>,
  keys: StoredEncryptedKey[],
  rsm: RsmRequest,
): Element {
  const store = new Element('store', { xmlns: ARCHIVE_NS, ...storeAttrs(header) });
  if (page.items.length === 0 && page.count === 0) return store;
  // A request without <set/> is answered as 0.5 (its `partial`, its continuation): so are its
  // `secs`, from the collection's start, which "one second after the time of the last" adds to.
  for (const entry of page.items) store.cnode(encodeEntry(header, entry, rsm.present ? 'previous' : 'start'));
  for (const key of keys) store.cnode(parse(key.xml) as Element);
  if (!rsm.present) {
    if (page.count > page.items.length) store.attrs.partial = 'true';
    return store;
  }
  store.cnode(
    encodeRsm({ first: page.first, firstIndex: page.firstIndex, last: page.last, count: page.count }),
  );
  return store;
}

/** §9: EncryptedKeys grouped in `<store with start/>` per collection, in collection order. */
export function encodeKeys(page: Page<StoredEncryptedKey>): Element {
  const keys = new Element('keys', { xmlns: ARCHIVE_NS });
  let current: Element | undefined;
  let currentId = '';
  for (const key of page.items) {
    const id = `${key.collection.start}/${key.collection.with}`;
    if (!current || id !== currentId) {
      current = keys.c('store', storeAttrs(key.collection));
      keys.up();
      currentId = id;
    }
    current.cnode(parse(key.xml) as Element);
  }
  if (page.count > 0 || page.items.length > 0)
    keys.cnode(
      encodeRsm({ first: page.first, firstIndex: page.firstIndex, last: page.last, count: page.count }),
    );
  return keys;
}

/**
 * §10: `<changed/>` and `<removed/>` with "only 'with' and 'start'", oldest change first, and
 * "<last/> … the UTC time … that the last collection on the page was modified".
 */
export function encodeModified(page: Page<Change>): Element {
  const modified = new Element('modified', { xmlns: ARCHIVE_NS });
  for (const change of page.items) {
    modified.c(change.kind, { with: change.collection.with, start: formatDateTime(change.collection.start) });
  }
  modified.cnode(encodeRsm({ last: page.last, count: page.count }));
  return modified;
}

/** XEP-0136 0.5 §3.1: `<save/>` with a boolean default and items. */
export function encodeSave(prefs: ArchivePrefs, policy: ServicePolicy = SERVICE_POLICY): Element {
  const save = new Element('save', { xmlns: ARCHIVE_NS });
  save.c('default', { save: String((prefs.default ?? policy.default).save !== 'false') });
  for (const jid of Object.keys(prefs.items)) {
    save.c('item', { jid, save: String((prefs.items[jid] as Mode).save !== 'false') });
  }
  return save;
}

/** XEP-0136 0.5 §3.2: "the list of contacts whose Off-the-Record Mode state is 'true'". */
export function encodeOtr(prefs: ArchivePrefs): Element {
  const otr = new Element('otr', { xmlns: ARCHIVE_NS });
  for (const jid of Object.keys(prefs.items)) {
    if ((prefs.items[jid] as Mode).otr === 'require') otr.c('record', { jid, otr: 'true' });
  }
  return otr;
}

/** XEP-0136 0.5 §3.2 push to the user's OTR-aware resources. */
export function encodeRecordPush(jid: string, otr: boolean): Element {
  return new Element('record', { xmlns: ARCHIVE_NS, jid, otr: String(otr) });
}
