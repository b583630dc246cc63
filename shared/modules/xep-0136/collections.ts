/**
 * XEP-0136 0.9 collections: which messages are archived automatically (§7, with XEP-0334 hints
 * and the §13.3 store header), when a new collection starts, and how entry times are written
 * (`secs` relative to the previous message, or an absolute `utc`).
 */
import { Element } from 'ltx';
import { StanzaError } from '../../errors.ts';
import type { CollectionHeader, EntryInput } from '../../store/archive.ts';
import { NS } from '../../xml/namespaces.ts';
import { LAST_DATETIME_MS } from './datetime.ts';
import type { ManualEntry } from './decode.ts';
import type { EffectiveMode } from './preferences.ts';

/** A new collection after this much silence (ARCHIVE_COLLECTION_GAP_SECONDS). */
export const DEFAULT_COLLECTION_GAP_MS = 30 * 60 * 1000;

const SHIM_NS = 'http://jabber.org/protocol/shim';
const XHTML_IM_NS = 'http://jabber.org/protocol/xhtml-im';

/**
 * §5.2: "<thread/> elements and elements qualified by the 'jabber:x:delay', 'jabber:x:event' and
 * 'http://jabber.org/protocol/chatstates' namespaces MUST NOT be included"; XHTML-IM "SHOULD NOT".
 * Hints are for servers, not for the archive's readers.
 */
const NOT_ARCHIVED_NAMESPACES = new Set([
  'jabber:x:delay',
  'jabber:x:event',
  NS.chatStates,
  XHTML_IM_NS,
  NS.hints,
  NS.delay,
]);

export type ArchiveDecision = { archive: true; save: 'body' | 'all' } | { archive: false; reason: string };

/** Whether a routed message is archived automatically for a user whose mode for the contact is `mode`. */
export function archiveDecision(stanza: Element, mode: EffectiveMode): ArchiveDecision {
  const type = stanza.attrs.type ?? 'normal';
  if (type === 'error') return { archive: false, reason: 'error' };
  // Collections are 1:1 conversations; §5.5 leaves room logs to the client (manual archiving).
  if (type === 'groupchat') return { archive: false, reason: 'groupchat' };
  if (mode.save === 'false') return { archive: false, reason: 'save-mode' };
  // XEP-0334 §4: no-permanent-store — "MUST NOT store the message in a permanent archive";
  // no-store — "SHOULD NOT store … in any permanent or temporary storage".
  if (stanza.getChild('no-permanent-store', NS.hints) || stanza.getChild('no-store', NS.hints))
    return { archive: false, reason: 'hint' };
  // §13.3: "The recipient MUST NOT archive such a message" (a SHIM 'store' header of 'false').
  const headers = stanza.getChild('headers', SHIM_NS);
  if (headers?.getChildren('header').some((h) => h.attrs.name === 'store' && h.getText().trim() === 'false'))
    return { archive: false, reason: 'store-header' };
  const hasBody = stanza.getChildren('body').length > 0;
  if (mode.save === 'body' && !hasBody) return { archive: false, reason: 'no-body' };
  // XEP-0334 §4: <store/> asks to keep a message that would not be (one without a body).
  if (mode.save === 'all' && !hasBody && !stanza.getChild('store', NS.hints))
    return { archive: false, reason: 'no-body' };
  return { archive: true, save: mode.save };
}

/** The `<to/>` or `<from/>` element archived for a message (without its time attributes). */
export function archivedElement(stanza: Element, direction: 'to' | 'from', save: 'body' | 'all'): Element {
  const el = new Element(direction);
  for (const child of stanza.getChildElements()) {
    if (
      save === 'body'
        ? child.name !== 'body'
        : child.name === 'thread' || NOT_ARCHIVED_NAMESPACES.has(child.getNS() ?? '')
    )
      continue;
    const copy = new Element(child.name, { ...child.attrs });
    if (copy.attrs.xmlns === NS.client) delete copy.attrs.xmlns;
    copy.children = child.children;
    el.cnode(copy);
  }
  return el;
}

export function entryFromMessage(
  stanza: Element,
  direction: 'to' | 'from',
  save: 'body' | 'all',
  at: number,
): EntryInput {
  return { kind: direction, at, xml: archivedElement(stanza, direction, save).toString() };
}

/** The message's `<thread/>`, which names a conversation of its own. */
export function threadOf(stanza: Element): string | undefined {
  const thread = stanza.getChildText('thread')?.trim();
  return thread || undefined;
}

/**
 * Whether a message starts a new collection: none is open, the conversation was idle longer
 * than the gap, or the message names another `<thread/>` (§5.2: "a set of messages … that are
 * received near each other in time or as part of the same conversation thread"); or it is
 * archived with another `expire` than the open collection's messages (§3.2: the user changed
 * the preference meanwhile). A collection's messages then expire in the order they came, the
 * collection with its last one: one kept for ever is never removed with an expiring
 * collection, and an expired prefix is all that is ever missing (its `secs` and `<count/>`
 * stay right).
 */
export function startsNewCollection(
  open: { start: number; thread?: string; lastAt?: number; expireSeconds?: number | 'unknown' } | undefined,
  message: { at: number; thread?: string; expireSeconds?: number },
  gapMs = DEFAULT_COLLECTION_GAP_MS,
): boolean {
  if (!open) return true;
  if (message.thread !== undefined && message.thread !== open.thread) return true;
  if (message.expireSeconds !== open.expireSeconds) return true;
  return message.at - (open.lastAt ?? open.start) > gapMs;
}

/** Whole seconds from the collection's start, rounded: the running sum the `secs` attributes add up to. */
function offsetSeconds(start: number, at: number): number {
  return Math.round((at - start) / 1000);
}

/**
 * The time attribute of an archived `<to/>`/`<from/>`. §5.2: "The time in whole seconds of the
 * message relative to the previous message … Entities MUST ensure that the sum of the 'secs'
 * attribute and the 'secs' attributes of the preceeding messages will accurately reflect the
 * absolute time of the message": each `secs` is the difference of rounded offsets from the start,
 * so the sum is the message's own rounded offset (0.51 s steps give 1, 0, 1, 1, 0, …). A message
 * that was stored with `utc`, or lies before its predecessor, gets `utc` (§5.4).
 */
export function timeAttribute(
  start: number,
  entry: { at: number; prevAt?: number; utc?: boolean },
  relativeTo: 'previous' | 'start' = 'previous',
): { secs: number } | { utc: number } {
  // 0.5 (Manual Archiving): "The time in seconds of the message relative to the start-time of
  // the collection": the rounded offset itself, for a 0.5 reply (a retrieve without <set/>).
  const from = relativeTo === 'start' ? start : (entry.prevAt ?? start);
  const secs = offsetSeconds(start, entry.at) - offsetSeconds(start, from);
  if (entry.utc || secs < 0) return { utc: entry.at };
  return { secs };
}

/**
 * Absolute times of uploaded entries (§5.3/§5.4): `secs` after the previous message (the
 * collection's last stored one for the first entry, or its start), or `utc`; a note without
 * `utc` takes the time of the message before it.
 */
export function resolveEntryTimes(
  start: number,
  previousAt: number | undefined,
  entries: ManualEntry[],
  now: number,
): { at: number; utc: boolean }[] {
  let prev = previousAt;
  return entries.map((entry) => {
    let at: number;
    let utc = false;
    if (entry.utc !== undefined) {
      at = entry.utc;
      utc = entry.kind !== 'note';
    } else if (entry.secs !== undefined) {
      at = start + (offsetSeconds(start, prev ?? start) + entry.secs) * 1000;
    } else if (entry.kind === 'data') {
      at = now;
    } else {
      at = prev ?? start;
    }
    // §5.3's secs add up: past what a DateTime can name (the year 9999) no time can be stored
    // nor shown.
    if (at > LAST_DATETIME_MS)
      throw new StanzaError('modify', 'bad-request', "the entries' secs run past the year 9999");
    if (entry.kind !== 'note' && entry.kind !== 'data') prev = at;
    return { at, utc };
  });
}

/**
 * §6: "A collection that contains <EncryptedData/> or <EncryptedKey/> elements MUST NOT contain
 * <to/> or <from/> or <note/> elements." A store that would mix them is `not-acceptable`.
 */
export function checkContentMix(
  existing: Pick<CollectionHeader, 'crypt' | 'plain'> | undefined,
  incoming: { entries: { kind: string }[]; keys: unknown[] },
): void {
  const crypt =
    (existing?.crypt ?? false) || incoming.keys.length > 0 || incoming.entries.some((e) => e.kind === 'data');
  const plain = (existing?.plain ?? false) || incoming.entries.some((e) => e.kind !== 'data');
  if (crypt && plain)
    throw new StanzaError(
      'modify',
      'not-acceptable',
      'an encrypted collection holds no plain messages or notes',
    );
}
