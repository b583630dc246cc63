/**
 * XEP-0198 unacknowledged-stanza queue, one item per stream-management session in the
 * Sessions table:
 *
 *   pk = sm#<smId>  sk = queue  → SmQueueItem
 *
 * Every stanza for an SM session is appended here (with its number) in the same atomic
 * UpdateItem that reads who owns the session now, so a stanza is either in the queue a
 * resuming stream reads, or is posted to the stream that resumed: none is lost in a
 * hand-over. Acknowledged entries are trimmed from the head. Detached sessions carry
 * `sweepShard`/`sweepAt` (the sparse sweep index), attached ones too, with the time of their next
 * liveness probe (PROBE_AFTER_MS after attaching); an ended session keeps its last inbound
 * count for a day so a late `<resume/>` is told `<failed h='…'/>`.
 */

import { randomUUID } from 'node:crypto';
import { deflateRawSync, inflateRawSync } from 'node:zlib';
import {
  DeleteCommand,
  type DynamoDBDocumentClient,
  GetCommand,
  PutCommand,
  QueryCommand,
  UpdateCommand,
} from '@aws-sdk/lib-dynamodb';
import { SWEEP_INDEX, TTL_ATTRIBUTE } from '../tables.ts';
import {
  AmbiguousWriteError,
  adminOnly,
  batchGetAll,
  isConditionFailure,
  sendOnce,
  sweeperOnly,
} from './dynamo.ts';
import {
  ATTACHED_SHARD,
  boundedRevocation,
  DETACHED_SHARD,
  type OfflineTransfer,
  type Revocation,
} from './sessions.ts';

export type SmVersion = 'sm3' | 'sm1';

export interface SmEntry {
  /**
   * The stanza as sent, serialised. Absent in an entry read back whose stanza is kept in an item
   * of its own (`x`): `SmQueueStore.stanzas` reads it.
   */
  s?: string;
  /**
   * A large stanza's own item (`pk = sm#<smId>`, `sk = x`, SM_OWN_ITEM_BYTES): the queue holds
   * this key, so an append behind it is billed on the small queue item, not on the stanza.
   */
  x?: string;
  /** With `x`: the stanza's size in bytes (the queue's byte bound counts it). */
  n?: number;
  /** When it was first queued (ms): the delay stamp on a resend. */
  t: number;
  /** The offline message it came from: removed from offline storage once acknowledged. */
  o?: string;
  /** A XEP-0013 view/fetch copy: the message stays stored, so the copy is never re-routed. */
  c?: boolean;
  /** The other sessions the message's routing gave it to before (DeliveryOptions.alsoTo). */
  a?: string[];
  /**
   * The delivery key of the frame that queued it (core/frame.ts): a redelivery of that frame
   * finds it here instead of queueing a second copy.
   */
  k?: string;
  /**
   * Its post failed, timed out, or may never have happened (the frame that queued it failed
   * after the append and was redelivered) while later entries may have been posted: the
   * client's count no longer says whether it has this one (`true`, see `countCovers`). `'missed'`:
   * its only post was refused with 410 (the connection was gone): the client surely lacks it.
   */
  u?: true | 'missed';
  /**
   * An uncertain entry whose post was answered, late (`SM_LATE_POST_MS`): `out` when the mark was
   * made. Every entry that can have reached the client before it is numbered at most this, so a
   * count that covers this many entries covers it too, wherever it landed (see `countCovers`).
   */
  b?: number;
}

/**
 * A client's message appended for another connection's frame: its connection (`from`) and its
 * frame's delivery key (`<frame id>:<n>`, SmEntry.k). One connection's frames are handled one at
 * a time and in order (SQS FIFO, one message group per connection), so while a frame is
 * redelivered, no later frame of its connection has appended anything: the append records the
 * key per sender (`f#<from>`) and refuses one whose frame already appended there at that
 * position or later. Unlike `lk` (the last key of any sender), that record outlives later
 * senders' appends and the entry's acknowledgement: a redelivery after both does not queue the
 * stanza a second time (`dave-144`, seed 6 of session 12's final target run).
 *
 * Sound only where an acknowledged entry surely reached the client: with one poster per stream
 * (SM_POST_ORDER=serial), whose counts are prefixes of what went out in order. With `checked`,
 * another sender's later entry can reach the client first and an ack trim one never posted.
 */
export interface SenderMark {
  from: string;
  key: string;
}

export interface SmQueueItem {
  smId: string;
  user: string;
  resource: string;
  /**
   * Its account was deleted (infra/account-deletion.ts): never resumed again; for a session that
   * was detached then, whom its end tells (core/host.ts 'stream-revoked').
   */
  revoked?: Revocation;
  version: SmVersion;
  resumable: boolean;
  /** Resumption window in seconds. */
  max: number;
  /** The connection the session is attached to; absent while detached. */
  connectionId?: string;
  /** While set, appenders queue without posting: the owner is replaying the queue in order. */
  holding?: boolean;
  /**
   * SM_POST_ORDER=serial: the token (`<delivery key>#<random>`) of the appender that holds the
   * session and posts its queue in order (`holding` is then this string rather than `true`).
   * `holdingAt`: when that appender, or a resume's attach, took the hold.
   */
  holder?: string;
  holdingAt?: number;
  /** Number of stanzas ever queued (the server's outbound count, unwrapped). */
  out: number;
  /** Number of stanzas acknowledged; `entries[0]` has number `base + 1`. */
  base: number;
  entries: SmEntry[];
  /** Inbound count at detach or end (the owner's connection row has it while attached). */
  inbound?: number;
  /** At detach: the JIDs the stream had sent directed presence to (told at the end). */
  directedTo?: string[];
  /**
   * At detach: the stream's offline transfer in progress (a resume goes on with it); removed
   * when the resumed stream's replay lets the hold go, or at the end.
   */
  transfer?: OfflineTransfer;
  ended?: boolean;
  sweepAt?: number;
  /**
   * Too many bytes are waiting for the client's ack: appends are refused (the senders are told to
   * wait) until an ack brings the queue down. Set and cleared by the XEP-0198 module.
   */
  congested?: boolean;
  /** When the client last acknowledged anything (or the session started), epoch ms. */
  ackedAt?: number;
  /** An ended session: how many of its entries have been re-routed so far. */
  rerouted?: number;
  /** The key of the last keyed entry appended (see SmEntry.k). */
  lastKey?: string;
  /** Per sender connection, its last append's mark (`<frame id>:<n>/<seconds, base 36>`; see SenderMark). */
  senderMarks?: Record<string, string>;
  /** Some entry is uncertain (SmEntry.u): a plain ack cannot tell what it covers. */
  uncertain?: boolean;
  /** Marks of uncertain entries so far: a resume's rewrite is conditional on it (none came meanwhile). */
  marks?: number;
  /** The sweep index's partition the item is in (attached, detached, reroute), if any. */
  sweepShard?: string;
  /** While detached: the connection it was detached from (a `</close>` from there still ends it). */
  detachedFrom?: string;
  /** While detached: `out` when it was detached. Entries numbered above it were never posted. */
  detachedOut?: number;
  /**
   * Set by the attach of a resume that found the session detached: its `detachedOut`. The entries
   * numbered above it were queued while no stream held the session, so the client surely lacks
   * them (see `countCovers`).
   */
  unpostedAfter?: number;
  /**
   * `out` when the session last stopped holding (`release`, `releasePoster`): every entry
   * numbered up to it was acknowledged or posted, in order, by the replay or the poster that
   * ended there (or none, after an enable).
   */
  settledOut?: number;
}

/** A connection that no longer owns the session (it was resumed elsewhere) tried to change it. */
export class NotSessionOwnerError extends Error {
  constructor(readonly smId: string) {
    super(`not the owner of ${smId}`);
    this.name = 'NotSessionOwnerError';
  }
}

/** An ack of a queue holding an uncertain entry (SmEntry.u): only a resume settles the count. */
export class UncertainQueueError extends Error {
  constructor(readonly smId: string) {
    super(`the queue of ${smId} holds an entry whose post is uncertain`);
    this.name = 'UncertainQueueError';
  }
}

/**
 * What a client's count acknowledges of `entries` (numbered from `base + 1`), having received
 * `received` stanzas since `base`. Without uncertain entries, the first `received`. With some,
 * what the count cannot vouch for is kept, to be sent again: the client received the certain
 * entries in order, so at least `received - maybe` of them, `maybe` being the entries it may or
 * may not have (a missed one it surely lacks does not count); every uncertain entry and every
 * certain one past those may be missing. A count of exactly every entry but the missed ones
 * vouches for all of them, uncertain ones included. `ordered`: every answered post was checked
 * for later entries (SM_LATE_POST_MS=0), so each certain entry reached the client before every
 * later one, and the count covers the certain entries numbered up to it. A resend may repeat a
 * stanza (XEP-0198 §5 allows it), never lose one.
 */
export function countCovers(
  entries: SmEntry[],
  received: number,
  base = 0,
  ordered = false,
): { acked: SmEntry[]; kept: SmEntry[] } {
  if (entries.some((entry) => entry.u === true && entry.b !== undefined)) {
    // A late post landed after some later entries, none numbered above its bound `b`: a count of
    // at least `b - base` entries is a prefix of the landing order that reaches it, and so covers
    // the first `received` entries by number too. Such an entry is settled, not uncertain (seed 16
    // of session 11's target run: a late post the client had, sent again by the next resume).
    entries = entries.map((entry) => (boundReached(entry, received, base) ? certain(entry) : entry));
  }
  if (!entries.some((entry) => entry.u))
    return { acked: entries.slice(0, received), kept: entries.slice(received) };
  const reachable = entries.filter((entry) => entry.u !== 'missed');
  if (received === reachable.length) {
    // A count of every entry but the missed ones: the client has each of them, the uncertain
    // ones too (a missed one it surely lacks), and only the missed ones are sent again.
    return { acked: reachable, kept: entries.filter((entry) => entry.u === 'missed').map(certain) };
  }
  if (ordered) {
    // Every answered post was checked (SM_LATE_POST_MS=0): an entry left certain had nothing
    // queued after it when it landed, so it reached the client before every later-numbered one,
    // and sits at or before its own number in the order the client got them. A count of
    // `received` then covers every certain entry numbered up to it, however many uncertain ones
    // there are (seed 11 of session 11's third target run: certain entries the client had, sent
    // again because later ones were uncertain).
    return {
      acked: entries.filter((entry, at) => !entry.u && at < received),
      kept: entries.filter((entry, at) => entry.u || at >= received).map(certain),
    };
  }
  const maybe = entries.filter((entry) => entry.u === true).length;
  let sure = Math.max(0, received - maybe);
  const acked: SmEntry[] = [];
  const kept: SmEntry[] = [];
  for (const entry of entries) {
    if (!entry.u && sure > 0) {
      acked.push(entry);
      sure -= 1;
    } else kept.push(certain(entry));
  }
  return { acked, kept };
}

/**
 * Whether a count of `received` entries since `base` reaches the bound of a late post's entry
 * (SmEntry.b), and so covers it wherever it landed.
 */
export function boundReached(entry: SmEntry, received: number, base: number): boolean {
  return entry.u === true && entry.b !== undefined && received >= entry.b - base;
}

/** An entry to be sent again: no longer uncertain. */
function certain(entry: SmEntry): SmEntry {
  const { u: _uncertain, b: _bound, ...resent } = entry;
  return resent;
}

/** An ack for more stanzas than were queued (or from a stale base): XEP-0198's handled-count-too-high. */
export class AckBeyondQueueError extends Error {
  constructor(readonly smId: string) {
    super(`acknowledgement beyond the queue of ${smId}`);
    this.name = 'AckBeyondQueueError';
  }
}

export type AppendResult =
  | {
      kind: 'queued';
      number: number;
      item: SmQueueItem;
      /**
       * Found by a read after the write's answer was lost (`ambiguous`: this append's own write,
       * whose answer a 500 or a timeout took) or refused (another write with this key): `item`
       * is the queue as it is now, not as it was at the write.
       */
      found?: 'ambiguous' | 'refused';
    }
  /** A resend of an append that had run (its key was the last appended) and was acknowledged since. */
  | { kind: 'acknowledged' }
  | { kind: 'full'; item?: SmQueueItem }
  | { kind: 'ended' }
  /** Appended with `attachedTo`, and the session is no longer attached to that connection. */
  | { kind: 'moved' };

/**
 * Where a window appended in one write (`appendMany`) sits in the queue: the index of its first
 * entry when all of its keys are there, in order, one after the other; -1 otherwise.
 */
export function windowAt(item: Pick<SmQueueItem, 'entries'>, keys: readonly (string | undefined)[]): number {
  const at = item.entries.findIndex((queued) => queued.k === keys[0]);
  return at >= 0 && keys.every((k, n) => item.entries[at + n]?.k === k) ? at : -1;
}

/** What `appendMany` did: `first` is the number of its first entry (the others follow it). */
export type AppendManyResult =
  | { kind: 'queued'; first: number; item: SmQueueItem; found?: 'ambiguous' | 'refused' }
  /** Appended by a try whose answer was lost, and acknowledged since (`lk` is still its last key). */
  | { kind: 'acknowledged' }
  | { kind: 'unfit' }
  | { kind: 'ended' }
  | { kind: 'moved' };

const key = (smId: string) => ({ pk: `sm#${smId}`, sk: 'queue' });
/** Tries of a keyed append whose attempt may or may not have been applied (then a read tells). */
const APPEND_ATTEMPTS = 4;
/** First wait before trying a keyed append again, doubled each time (with jitter, as the SDK's). */
const APPEND_BACKOFF_MS = 25;
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * What stanzas repeat, as a preset dictionary for deflate: a queued chat message shrinks to
 * about 40 % (DynamoDB bills every append and ack on the whole queue item, by the KB). Stored
 * entries depend on these exact bytes (`z`): a different dictionary needs another attribute.
 */
const STANZA_DICTIONARY_V1 = Buffer.from(
  '<delay xmlns="urn:xmpp:delay" stamp="Z"/><stanza-id xmlns="urn:xmpp:sid:0" by="<origin-id xmlns="urn:xmpp:sid:0" id="' +
    '<markable xmlns="urn:xmpp:chat-markers:0"/><received xmlns="urn:xmpp:receipts" id="<request xmlns="urn:xmpp:receipts"/>' +
    '<active xmlns="http://jabber.org/protocol/chatstates"/><composing xmlns="http://jabber.org/protocol/chatstates"/>' +
    '<presence xmlns="jabber:client" <iq xmlns="jabber:client" type="result" type="error"><error type="cancel">' +
    '<thread></thread><subject></subject><body></body></message>' +
    '<message xmlns="jabber:client" to="@localhost/" from="@localhost/" type="chat" id="',
);

/** An entry as stored: the stanza deflated (`z`) when that is smaller, or in an item of its own (`x`). */
type StoredEntry = Omit<SmEntry, 's'> & { s?: string; z?: Uint8Array };

/**
 * A stanza larger than this as stored (deflated) goes into an item of its own, written before the
 * append that queues its key. DynamoDB bills every write of the queue item (each append, each
 * poster's release, each ack's trim) on the whole item, by the KB: one 100 KB answer left
 * unacknowledged would make every later append to that session cost 100 write units or more. On
 * its own it costs its size twice: its write, and its removal once acknowledged (a delete is
 * billed on the item's size too).
 */
export const SM_OWN_ITEM_BYTES = 1024;
/**
 * A stanza's own item outlives any queue that names it: its key leaves the queue when acknowledged
 * or re-routed, and the item is deleted then; this expiry only collects what an interrupted append
 * or removal left behind (an entry rebased away by a resume's count, too).
 */
const OWN_ITEM_TTL_SECONDS = 30 * 86400;

function deflated(s: string): { s: string } | { z: Uint8Array } {
  const z = deflateRawSync(s, { dictionary: STANZA_DICTIONARY_V1 });
  return z.length < Buffer.byteLength(s) ? { z } : { s };
}

function inflated(stored: { s?: string; z?: Uint8Array }): string | undefined {
  return stored.z === undefined
    ? stored.s
    : inflateRawSync(stored.z, { dictionary: STANZA_DICTIONARY_V1 }).toString('utf8');
}

/** The entry as stored, and the item of its own it needs first (a large stanza), if any. */
function storedEntry(smId: string, entry: SmEntry): { stored: StoredEntry; own?: Record<string, unknown> } {
  const { s, ...rest } = entry;
  if (s === undefined) return { stored: rest };
  const body = deflated(s);
  const size = 'z' in body ? body.z.length : Buffer.byteLength(s);
  if (size <= SM_OWN_ITEM_BYTES) return { stored: { ...rest, ...body } };
  const x = `x#${randomUUID()}`;
  return {
    stored: { ...rest, x, n: Buffer.byteLength(s) },
    own: { pk: `sm#${smId}`, sk: x, ...body, [TTL_ATTRIBUTE]: nowSeconds() + OWN_ITEM_TTL_SECONDS },
  };
}

function loadedEntry(stored: StoredEntry): SmEntry {
  if (stored.z === undefined) return stored as SmEntry;
  const { z, ...rest } = stored;
  return { ...rest, s: inflated({ z }) as string };
}

function loadedEntries(raw: unknown): SmEntry[] {
  return ((raw as StoredEntry[] | undefined) ?? []).map(loadedEntry);
}
/**
 * An attached session is probed (a post that a vanished socket answers 410) this long after it
 * attached, and as long again after each probe it survives: past API Gateway's 10-minute idle
 * cut, so a socket that is really gone has been cut, whether or not its `$disconnect` arrived.
 */
export const PROBE_AFTER_MS = 11 * 60_000;
/** The sweep index's partition of ended sessions whose unacknowledged entries await re-routing. */
export const REROUTE_SHARD = 'reroute';
/**
 * Each kind of sweep entry (`attached`, `detached`, `reroute`) is spread over this many partition
 * key values of the sweep index, `<kind>#<n>` by the session id: one value takes every write of
 * its kind (an attach, a detach, a probe), and a partition of an index takes about 1,000 writes a
 * second, past which its throttling holds back the table's own writes (a mass reconnection after
 * an outage). The sweeper reads every value, and the bare `<kind>` written before session 22.
 */
export const SWEEP_SHARDS = 4;

/** The sweep index partition of a session's entry of `kind`: `<kind>#<n>`, stable per session. */
export function sweepShardOf(kind: string, smId: string): string {
  // FNV-1a: a spread, not a secret.
  let hash = 0x811c9dc5;
  for (let i = 0; i < smId.length; i++) hash = Math.imul(hash ^ smId.charCodeAt(i), 0x01000193) >>> 0;
  return `${kind}#${hash % SWEEP_SHARDS}`;
}

/** Every partition key value of `kind` the sweeper reads: the shards, and the unsharded value of older entries. */
export function sweepShardsOf(kind: string): string[] {
  return [kind, ...Array.from({ length: SWEEP_SHARDS }, (_, n) => `${kind}#${n}`)];
}

/** Whether a session's `sweepShard` is of `kind` (sharded or written before the shards). */
export function isSweepShardOf(shard: string | undefined, kind: string): boolean {
  return shard === kind || (shard?.startsWith(`${kind}#`) ?? false);
}
/** A re-route not finished this long after the session ended is taken over by the sweeper. */
export const REROUTE_RETRY_MS = 60_000;
const DAY_SECONDS = 86400;

/**
 * The last number surely posted in order: `out`, unless a replay or a poster holds the session
 * (then what its last release recorded). An sm:1 `<r u/>` asks for no more: the seed's client
 * answers with an h at least `u`, and counts it as handled.
 */
export function postedUpTo(item: Pick<SmQueueItem, 'out' | 'base' | 'holding' | 'settledOut'>): number {
  return item.holding ? Math.max(item.base, item.settledOut ?? item.base) : item.out;
}

/** DynamoDB refuses items over 400 KB: for a queue that is "full" too. */
function isItemTooLarge(error: unknown): boolean {
  return (error as Error).name === 'ValidationException' && /size/i.test((error as Error).message);
}

function toItem(raw: Record<string, unknown>): SmQueueItem {
  return {
    smId: (raw.pk as string).slice(3),
    user: raw.user as string,
    resource: raw.resource as string,
    version: raw.version as SmVersion,
    resumable: Boolean(raw.resumable),
    max: raw.max as number,
    connectionId: raw.connectionId as string | undefined,
    holding: Boolean(raw.holding),
    ...(typeof raw.holding === 'string' ? { holder: raw.holding } : {}),
    ...(typeof raw.holdingAt === 'number' ? { holdingAt: raw.holdingAt } : {}),
    out: (raw.out as number | undefined) ?? 0,
    base: (raw.base as number | undefined) ?? 0,
    entries: loadedEntries(raw.q),
    inbound: raw.inbound as number | undefined,
    directedTo: raw.directedTo as string[] | undefined,
    ...(raw.transfer ? { transfer: raw.transfer as OfflineTransfer } : {}),
    ...(raw.revoked !== undefined ? { revoked: raw.revoked as Revocation } : {}),
    ended: Boolean(raw.ended),
    sweepAt: raw.sweepAt as number | undefined,
    congested: Boolean(raw.congested),
    rerouted: raw.rerouted as number | undefined,
    ackedAt: raw.ackedAt as number | undefined,
    lastKey: raw.lk as string | undefined,
    ...senderMarksOf(raw),
    ...(raw.uncertain ? { uncertain: true } : {}),
    ...(typeof raw.marks === 'number' ? { marks: raw.marks } : {}),
    sweepShard: raw.sweepShard as string | undefined,
    detachedFrom: raw.detachedFrom as string | undefined,
    ...(typeof raw.detachedOut === 'number' ? { detachedOut: raw.detachedOut } : {}),
    ...(typeof raw.unpostedAfter === 'number' && raw.unpostedAfter >= 0
      ? { unpostedAfter: raw.unpostedAfter }
      : {}),
    ...(typeof raw.settledOut === 'number' ? { settledOut: raw.settledOut } : {}),
  };
}

/** Attribute names of sender marks: `f#<connection id>`. */
const MARK_PREFIX = 'f#';

function senderMarksOf(raw: Record<string, unknown>): { senderMarks?: Record<string, string> } {
  const marks = Object.entries(raw).filter(
    (pair): pair is [string, string] => pair[0].startsWith(MARK_PREFIX) && typeof pair[1] === 'string',
  );
  if (marks.length === 0) return {};
  return {
    senderMarks: Object.fromEntries(marks.map(([name, value]) => [name.slice(MARK_PREFIX.length), value])),
  };
}

/**
 * A delivery key as a mark: its position padded, so that marks of one frame compare as its
 * positions do (`<frame id>:<n, 6 digits>`).
 */
function markOf(entryKey: string): { frame: string; at: string } {
  const colon = entryKey.lastIndexOf(':');
  const frame = entryKey.slice(0, colon + 1);
  return { frame, at: `${frame}${entryKey.slice(colon + 1).padStart(6, '0')}` };
}

/** The frame id a recorded mark names (`<frame id>:<position>/<seconds>`). */
export function markFrame(recorded: string): string {
  const slash = recorded.lastIndexOf('/');
  const at = slash < 0 ? recorded : recorded.slice(0, slash);
  return at.slice(0, Math.max(0, at.lastIndexOf(':')));
}

/** Whether a recorded mark says its frame appended at `key`'s position or later. */
export function markCovers(recorded: string | undefined, entryKey: string): boolean {
  if (recorded === undefined) return false;
  const { frame, at } = markOf(entryKey);
  return recorded.startsWith(frame) && recorded >= at;
}

/**
 * Sender marks kept before a prune is tried, and how old a mark must be to go. A frame is
 * redelivered within the queue's maxReceiveCount visibility timeouts of its first receipt
 * (20 × 180 s as deployed): a mark two hours old guards nothing. Past MARKS_KEPT_AT_MOST the
 * oldest go too, down to MARKS_KEPT_AFTER_CUT, so that a recipient many connections write to
 * (a bot) pays one prune per some appends, not one per append, and its item stays small.
 */
const MARKS_PRUNE_AT = 8;
const MARKS_KEPT_AT_MOST = 32;
const MARKS_KEPT_AFTER_CUT = 16;
const MARK_LIFETIME_SECONDS = 2 * 60 * 60;

/** The marks a prune removes: every one older than the lifetime and, past 32, the oldest down to 16. */
export function marksToPrune(marks: Record<string, string>, nowS = nowSeconds()): string[] {
  const dated = Object.entries(marks).map(([from, value]) => {
    const slash = value.lastIndexOf('/');
    const at = slash >= 0 ? Number.parseInt(value.slice(slash + 1), 36) : 0;
    return { from, at: Number.isFinite(at) ? at : 0 };
  });
  if (dated.length <= MARKS_PRUNE_AT) return [];
  dated.sort((a, b) => a.at - b.at);
  const stale = dated.filter((mark) => mark.at < nowS - MARK_LIFETIME_SECONDS).length;
  const over = dated.length - stale > MARKS_KEPT_AT_MOST ? dated.length - MARKS_KEPT_AFTER_CUT : stale;
  return dated.slice(0, over).map((mark) => mark.from);
}

function nowSeconds(): number {
  return Math.floor(Date.now() / 1000);
}

/**
 * A safety net only (the sweeper or a clean end comes first): API Gateway cuts a connection
 * after 2 hours, so an attached queue outlives its connection; each attach and detach renews it.
 */
function attachedExpiry(): number {
  return nowSeconds() + 3 * 3600 + DAY_SECONDS;
}

export interface SmQueueStore {
  /** A new session's queue, holding until the owner has sent `<enabled/>`. */
  create(
    item: Pick<SmQueueItem, 'smId' | 'user' | 'resource' | 'version' | 'resumable' | 'max' | 'connectionId'>,
  ): Promise<void>;
  get(smId: string): Promise<SmQueueItem | undefined>;
  /**
   * The stanzas of `entries`, in order: a large one (SmEntry.x) read from its own item, consistently.
   * Undefined for one whose item is gone: acknowledged meanwhile (its trim deletes the item).
   */
  stanzas(smId: string, entries: readonly SmEntry[]): Promise<(string | undefined)[]>;
  /** Of these sessions, those a stream is attached to (not detached, not ended): one BatchGetItem. */
  attached(smIds: readonly string[]): Promise<Set<string>>;
  /** Just the counters (a projection: cheaper to move than the queue). */
  /**
   * The counts alone: `posted`, what surely went out in order (all of `out` unless a replay or a
   * poster holds the session, then `settledOut`): an sm:1 `<r u/>` never asks beyond it.
   */
  counts(smId: string): Promise<{ out: number; base: number; posted: number } | undefined>;
  /**
   * Account deletion: the session is never resumed again, and a detached one's end tells whom
   * `revocation` names. False when it is gone or ended.
   */
  revoke(smId: string, revocation: Revocation): Promise<boolean>;
  /**
   * Appends `entry`. With `poster` (SM_POST_ORDER=serial), the append also takes the session's
   * hold for that key if nobody holds it (`holding` is then the key: see SmQueueItem.holder).
   */
  append(
    smId: string,
    entry: SmEntry,
    maxEntries: number,
    poster?: string,
    mark?: SenderMark,
    /** The stream's own answer to its client: queued past congestion (within `maxEntries`). */
    answer?: boolean,
    /**
     * Appended only while the session is attached to this connection (else `moved`): see
     * DeliveryOptions.attachedTo.
     */
    attachedTo?: string,
  ): Promise<AppendResult>;
  /**
   * Appends several keyed entries at once, in order, under the same conditions as `append` (no
   * sender marks, never an answer's margin), with room for all of them (`maxEntries`): one
   * write, billed once on the queue item, for a window of stored messages. 'unfit' when they do
   * not all fit now (full, congested, past DynamoDB's item size) and nothing was appended: the
   * caller appends them one by one, which tells which fit.
   */
  appendMany(
    smId: string,
    entries: readonly SmEntry[],
    maxEntries: number,
    poster: string | undefined,
    attachedTo: string,
  ): Promise<AppendManyResult>;
  /**
   * Drops entries up to `newBase`; returns the dropped ones and those still waiting. Only the
   * owner `connectionId` may: anyone else gets NotSessionOwnerError (a late ack of a stream
   * that was resumed elsewhere changes nothing). Throws AckBeyondQueueError when fewer than
   * `newBase` stanzas were ever queued.
   */
  acknowledge(
    smId: string,
    oldBase: number,
    newBase: number,
    connectionId: string,
  ): Promise<{ removed: SmEntry[]; remaining: SmEntry[]; out: number; congested: boolean }>;
  /**
   * Marks the entry queued with delivery key `key` uncertain (SmEntry.u) when a later entry was
   * queued after it (one that may have been posted), or whatever follows it with `evenIfLast`
   * (the socket could not be closed: later entries may still go out). `'last'` when it is still
   * queued as the last and not `evenIfLast` (the client's count stays exact, it covers this one or
   * not, as a prefix). False when it was not marked otherwise: it is no longer queued, it kept moving (acks trimming it), or (with
   * `postedTo`) the session has moved on from that connection (a resume already sent it again).
   * `missed`: the post was refused (410), the client surely lacks the entry, as long as the
   * session is still attached to `postedTo` (detached, it may have been resumed and replayed
   * since: the mark is an ordinary one); a mark of an entry it may have had stays (SmEntry.u).
   */
  markUncertain(
    smId: string,
    key: string,
    evenIfLast?: boolean,
    postedTo?: string,
    missed?: boolean,
    landed?: boolean,
  ): Promise<boolean | 'last'>;
  /**
   * After a resume's count settled a queue holding uncertain entries, or an ack trimmed what it
   * vouches for: the queue becomes `kept`, numbered from `newBase + 1`. False when the queue changed since `seen` was read (an append,
   * an ack, a mark): read it again.
   */
  rebase(
    smId: string,
    seen: Pick<SmQueueItem, 'base' | 'out' | 'connectionId' | 'marks' | 'entries'>,
    newBase: number,
    kept: SmEntry[],
  ): Promise<boolean>;
  /** Marks or clears congestion (see SmQueueItem.congested). */
  setCongested(smId: string, congested: boolean): Promise<void>;
  /**
   * Moves the session to `connectionId` and starts holding; returns the queue at that instant.
   * `inbound`, the client's count the resume took from the old stream, is recorded with it: if
   * the resume fails before its stream saves the session, the next resume finds it here (the
   * new connection's row has no count to give). A count is never lowered: undefined when the
   * session recorded a higher one (the resume read it before a detach recorded it).
   * `from`, when given, is the owner the resume decided from (the connection it fenced, or null:
   * detached): undefined when the session moved meanwhile, and the resume decides again.
   */
  attach(
    smId: string,
    user: string,
    connectionId: string,
    inbound?: number,
    from?: string | null,
  ): Promise<SmQueueItem | undefined>;
  /**
   * Stops holding if nothing was appended since `seenOut`; false means: replay the rest, then retry.
   * With `connectionId` (the replaying stream's), only a replay's hold (`true`) on that connection
   * is let go: a replay slow enough that its client resumed elsewhere meanwhile must not end the
   * new replay's hold, or deliveries would post beside that replay, the same entries twice.
   */
  release(smId: string, seenOut: number, connectionId?: string): Promise<boolean>;
  /**
   * SM_POST_ORDER=serial: the poster `key` posted every entry up to `seenOut` to `connectionId`
   * and lets the hold go, if nothing was appended since and the hold is still its own on that
   * connection. Otherwise the queue as it is (to post the rest, or to stop: the hold went to a
   * resume), or undefined when the session ended.
   */
  releasePoster(
    smId: string,
    key: string,
    seenOut: number,
    connectionId: string,
  ): Promise<{ released: true } | { released: false; item?: SmQueueItem }>;
  /**
   * The socket is gone: keep the session for `sweepAt`, record the inbound count. False when
   * `connectionId` does not own it (or it ended); `too-large` when what the detach records (the
   * directed-presence JIDs, a transfer) would take the item past DynamoDB's 400 KB: nothing is
   * written, and the caller ends the session instead.
   */
  detach(
    smId: string,
    connectionId: string,
    inbound: number,
    sweepAt: number,
    directedTo: string[],
    transfer?: OfflineTransfer,
  ): Promise<boolean | 'too-large'>;
  /**
   * Ends the session once and for all (expiry, clean close, vanish without resumption): the
   * caller gets the unacknowledged entries exactly once. `owner` must still own it: a
   * connection id, `undefined` for "detached", `{ detachedFrom }` for "detached from that
   * connection" (and not resumed since), or `'any'`. The recorded count is never lowered: when
   * the session recorded more than `inbound` since the caller read it, that count is kept.
   */
  end(
    smId: string,
    owner: string | undefined | { detachedFrom: string },
    inbound: number,
  ): Promise<SmQueueItem | undefined>;
  /** Detached sessions whose window closed before `now` (ms), oldest first. */
  listExpired(now: number, limit: number): Promise<SmQueueItem[]>;
  /** Records that the first `count` entries of an ended session were re-routed. */
  markRerouted(smId: string, count: number): Promise<void>;
  /** All of an ended session's entries were re-routed: drop them, leave the sweep index. */
  finishReroute(smId: string): Promise<void>;
  /** Ended sessions whose re-route was interrupted (not finished by `now`), oldest first. */
  listReroutes(now: number, limit: number): Promise<SmQueueItem[]>;
  /** Attached sessions due for a liveness probe at `now` (ms), oldest first. */
  listDueProbes(now: number, limit: number): Promise<SmQueueItem[]>;
  /** The probe found the socket alive: the next one is due at `at`, if still attached to `connectionId`. */
  deferProbe(smId: string, connectionId: string, at: number): Promise<void>;
}

/**
 * Whether a session left `connectionId` for another: attached to another, or detached from
 * another (a resume took it, then lost its socket). Not one detached from that very connection,
 * whose resume is still to come. (An attach removes `detachedFrom`; a detach always sets it.)
 */
export function movedOn(item: SmQueueItem, connectionId: string): boolean {
  return item.connectionId !== undefined
    ? item.connectionId !== connectionId
    : item.detachedFrom !== undefined && item.detachedFrom !== connectionId;
}

export function createSmQueueStore(doc: DynamoDBDocumentClient, table: string): SmQueueStore {
  /**
   * The sessions of one kind of sweep entry due by `upTo`, oldest first, from all its partition
   * key values (sweepShardsOf). The index holds keys only (an append or an ack then writes no
   * index entry: a projection of the whole item doubled the write units of every queued stanza),
   * so the items are read by key after it, consistently; one that moved on since the index saw
   * it (the index lags) is left out. The shards' index pages are merged by `sweepAt`, so only the
   * `limit` oldest are read, and a shard is read further only when its page is used up.
   * Only the sweeper lists: the condition is folded at build time, and the other functions'
   * bundles drop this code (`bundleDefines`).
   */
  const listSwept =
    process.env.NIMBUS_SWEEPS === 'false'
      ? sweeperOnly
      : async (kind: string, upTo: number, limit: number): Promise<SmQueueItem[]> => {
          interface IndexKey {
            pk: string;
            sk: string;
            sweepAt: number;
            shard: string;
          }
          const shards = sweepShardsOf(kind).map((shard) => ({
            shard,
            keys: [] as IndexKey[],
            start: undefined as Record<string, unknown> | undefined,
            done: false,
          }));
          const found: SmQueueItem[] = [];
          // An entry moving between key values (a legacy entry to its shard) may be listed under both
          // while the index lags: its row is read once (BatchGetItem refuses a repeated key) and found once.
          const foundIds = new Set<string>();
          // Rounds until `limit` items are found or the index has no more: a round the check shortened
          // does not read as the last one to the sweeper (it stops at a short page).
          while (found.length < limit) {
            await Promise.all(
              shards.map(async (state) => {
                if (state.done || state.keys.length > 0) return;
                const { Items = [], LastEvaluatedKey } = await doc.send(
                  new QueryCommand({
                    TableName: table,
                    IndexName: SWEEP_INDEX,
                    KeyConditionExpression: 'sweepShard = :shard AND sweepAt <= :upTo',
                    ExpressionAttributeValues: { ':shard': state.shard, ':upTo': upTo },
                    Limit: limit,
                    ...(state.start ? { ExclusiveStartKey: state.start } : {}),
                  }),
                );
                for (const item of Items)
                  state.keys.push({
                    pk: item.pk as string,
                    sk: item.sk as string,
                    sweepAt: item.sweepAt as number,
                    shard: state.shard,
                  });
                state.start = LastEvaluatedKey;
                if (!LastEvaluatedKey) state.done = true;
              }),
            );
            // The oldest keys across the shards; a shard whose page ran out while it has more must be
            // read again before anything later than its last key is taken.
            const taken: IndexKey[] = [];
            while (taken.length < limit - found.length) {
              let oldest: (typeof shards)[number] | undefined;
              for (const state of shards) {
                const head = state.keys[0];
                if (head && (!oldest || head.sweepAt < (oldest.keys[0] as IndexKey).sweepAt)) oldest = state;
              }
              if (!oldest) break;
              const key = oldest.keys.shift() as IndexKey;
              if (!foundIds.has(key.pk)) taken.push(key);
              if (oldest.keys.length === 0 && !oldest.done) break;
            }
            if (taken.length === 0) {
              // Every key this round was a session found already: go on while a shard has more.
              if (shards.every((state) => state.done && state.keys.length === 0)) break;
              continue;
            }
            const shardsOf = new Map<string, { sk: string; shards: Set<string> }>();
            for (const { pk, sk, shard } of taken) {
              const known = shardsOf.get(pk);
              if (known) known.shards.add(shard);
              else shardsOf.set(pk, { sk, shards: new Set([shard]) });
            }
            const rows = await batchGetAll(
              doc,
              table,
              [...shardsOf].map(([pk, { sk }]) => ({ pk, sk })),
              { consistent: true, concurrency: 4 },
            );
            for (const row of rows) {
              const pk = row.pk as string;
              if (
                !foundIds.has(pk) &&
                shardsOf.get(pk)?.shards.has(row.sweepShard as string) &&
                typeof row.sweepAt === 'number' &&
                row.sweepAt <= upTo
              ) {
                foundIds.add(pk);
                found.push(toItem(row));
              }
            }
          }
          return found.sort((a, b) => (a.sweepAt ?? 0) - (b.sweepAt ?? 0));
        };

  /**
   * Removes stale sender marks (marksToPrune), all only if none changed since they were read: a
   * mark a sender rewrote meanwhile stays. Best effort, never failing the append it follows: a
   * later append tries again.
   */
  async function pruneMarks(smId: string, marks: Record<string, string>): Promise<void> {
    const going = marksToPrune(marks);
    if (going.length === 0) return;
    const names: Record<string, string> = {};
    const values: Record<string, string> = {};
    going.forEach((from, i) => {
      names[`#m${i}`] = `${MARK_PREFIX}${from}`;
      values[`:m${i}`] = marks[from] as string;
    });
    try {
      await doc.send(
        new UpdateCommand({
          TableName: table,
          Key: key(smId),
          UpdateExpression: `REMOVE ${going.map((_, i) => `#m${i}`).join(', ')}`,
          ConditionExpression: going.map((_, i) => `#m${i} = :m${i}`).join(' AND '),
          ExpressionAttributeNames: names,
          ExpressionAttributeValues: values,
        }),
      );
    } catch {
      // Rewritten meanwhile, throttled: the append it follows stands; a later one prunes.
    }
  }

  /**
   * The entries as stored; a large stanza's own item (SM_OWN_ITEM_BYTES) is written first, so a
   * queued key always names an item. An append refused after it deletes the item (dropUnqueued);
   * one that throws leaves it to its expiry. Undefined for a stanza that is no item even on its
   * own (400 KB deflated): no queue takes it.
   */
  async function storedEntries(
    smId: string,
    entries: readonly SmEntry[],
  ): Promise<StoredEntry[] | undefined> {
    const forms = entries.map((entry) => storedEntry(smId, entry));
    try {
      await Promise.all(
        forms.flatMap(({ own }) => (own ? [doc.send(new PutCommand({ TableName: table, Item: own }))] : [])),
      );
    } catch (error) {
      if (isItemTooLarge(error)) return undefined;
      throw error;
    }
    return forms.map(({ stored }) => stored);
  }

  /**
   * Deletes the own items of entries that left the queue (acknowledged, re-routed, refused), a few
   * at a time (they share the queue item's partition). Best effort: one not deleted expires
   * (OWN_ITEM_TTL_SECONDS); no queue names it any more.
   */
  async function dropOwnItems(smId: string, entries: readonly Pick<SmEntry, 'x'>[]): Promise<void> {
    const keys = entries.flatMap(({ x }) => (x === undefined ? [] : [x]));
    for (let i = 0; i < keys.length; i += 8)
      await Promise.all(
        keys
          .slice(i, i + 8)
          .map((x) =>
            doc
              .send(new DeleteCommand({ TableName: table, Key: { pk: `sm#${smId}`, sk: x } }))
              .catch(() => {}),
          ),
      );
  }

  /** An append's own items that the queue does not name after it (refused, or an earlier try's entry queued instead). */
  async function dropUnqueued(
    smId: string,
    stored: readonly StoredEntry[],
    result: { kind: string; item?: SmQueueItem },
  ): Promise<void> {
    const named = new Set(
      result.kind === 'queued'
        ? (result.item?.entries.flatMap(({ x }) => (x === undefined ? [] : [x])) ?? [])
        : [],
    );
    await dropOwnItems(
      smId,
      stored.filter(({ x }) => x !== undefined && !named.has(x)),
    );
  }

  async function readItem(smId: string): Promise<SmQueueItem | undefined> {
    const { Item } = await doc.send(
      new GetCommand({ TableName: table, Key: key(smId), ConsistentRead: true }),
    );
    return Item ? toItem(Item) : undefined;
  }

  /** One conditional end (see `end`); 'refused' when its condition failed. */
  async function endOnce(
    smId: string,
    owner: Parameters<SmQueueStore['end']>[1],
    connectionId: string | undefined,
    detachedFrom: string | undefined,
    inbound: number,
  ): Promise<SmQueueItem | undefined | 'refused'> {
    try {
      const { Attributes } = await doc.send(
        new UpdateCommand({
          TableName: table,
          Key: key(smId),
          // The entries stay until they are re-routed (finishReroute): a failure on the way
          // leaves them for the sweeper (the `reroute` partition), never lost.
          UpdateExpression:
            'SET ended = :yes, inbound = :inbound, #ttl = :ttl, rerouted = :zero, sweepShard = :reroute, sweepAt = :retry REMOVE connectionId, holding, holdingAt, transfer',
          // UpdateItem creates a missing item whose condition holds, and attribute_not_exists
          // holds on a missing item: "detached" must also name an existing one.
          ConditionExpression: `${
            owner === 'any'
              ? 'attribute_exists(q) AND attribute_not_exists(ended)'
              : detachedFrom !== undefined
                ? 'attribute_not_exists(connectionId) AND detachedFrom = :detachedFrom AND attribute_not_exists(ended)'
                : connectionId === undefined
                  ? 'attribute_exists(pk) AND attribute_not_exists(connectionId) AND attribute_not_exists(ended)'
                  : 'connectionId = :connectionId AND attribute_not_exists(ended)'
          } AND (attribute_not_exists(inbound) OR inbound <= :inbound)`,
          ExpressionAttributeNames: { '#ttl': TTL_ATTRIBUTE },
          ExpressionAttributeValues: {
            ':yes': true,
            ':inbound': inbound,
            // XEP-0198 §5: the last inbound count answers a late resume for at least a day.
            ':ttl': nowSeconds() + DAY_SECONDS,
            ':zero': 0,
            ':reroute': sweepShardOf(REROUTE_SHARD, smId),
            ':retry': Date.now() + REROUTE_RETRY_MS,
            ...(connectionId === undefined ? {} : { ':connectionId': connectionId }),
            ...(detachedFrom === undefined ? {} : { ':detachedFrom': detachedFrom }),
          },
          ReturnValues: 'ALL_OLD',
        }),
      );
      return Attributes ? toItem(Attributes) : undefined;
    } catch (error) {
      if (isConditionFailure(error)) return 'refused';
      throw error;
    }
  }

  /**
   * Stops holding when nothing was appended since `seenOut` (every entry up to it went out in
   * order, or was acknowledged), and, with `owner`, only a hold that is still `owner.holding` on
   * `owner.connectionId` of a session not ended. False when the condition failed.
   */
  async function letGo(
    smId: string,
    seenOut: number,
    owner?: { connectionId: string; holding: string | true },
  ): Promise<boolean> {
    try {
      await doc.send(
        new UpdateCommand({
          TableName: table,
          Key: key(smId),
          // A transfer kept at detach is the resumed stream's by now (its replay is over): it
          // goes, so that appends are not billed on it.
          UpdateExpression: 'REMOVE holding, holdingAt, transfer SET settledOut = :seen',
          ConditionExpression: `#out = :seen${
            owner
              ? ' AND connectionId = :connectionId AND holding = :holding AND attribute_not_exists(ended)'
              : ''
          }`,
          ExpressionAttributeNames: { '#out': 'out' },
          ExpressionAttributeValues: {
            ':seen': seenOut,
            ...(owner ? { ':connectionId': owner.connectionId, ':holding': owner.holding } : {}),
          },
        }),
      );
      return true;
    } catch (error) {
      if (isConditionFailure(error)) return false;
      throw error;
    }
  }

  return {
    async create(item) {
      await doc.send(
        new PutCommand({
          TableName: table,
          Item: {
            ...key(item.smId),
            user: item.user,
            resource: item.resource,
            version: item.version,
            resumable: item.resumable,
            max: item.max,
            connectionId: item.connectionId,
            holding: true,
            out: 0,
            base: 0,
            q: [],
            ackedAt: Date.now(),
            sweepShard: sweepShardOf(ATTACHED_SHARD, item.smId),
            sweepAt: Date.now() + PROBE_AFTER_MS,
            [TTL_ATTRIBUTE]: attachedExpiry(),
          },
          ConditionExpression: 'attribute_not_exists(pk)',
        }),
      );
    },

    get: readItem,

    async stanzas(smId, entries) {
      // BatchGetItem refuses a key named twice.
      const own = [...new Set(entries.flatMap(({ x }) => (x === undefined ? [] : [x])))].map((sk) => ({
        pk: `sm#${smId}`,
        sk,
      }));
      const items = own.length === 0 ? [] : await batchGetAll(doc, table, own, { consistent: true });
      const found = new Map(items.map((item) => [item.sk as string, item as { s?: string; z?: Uint8Array }]));
      return entries.map((entry) => {
        if (entry.x === undefined) return entry.s;
        const item = found.get(entry.x);
        return item ? inflated(item) : undefined;
      });
    },

    async attached(smIds) {
      if (smIds.length === 0) return new Set();
      const items = await batchGetAll(
        doc,
        table,
        smIds.map((smId) => key(smId)),
        { consistent: true, projection: ['pk', 'connectionId', 'ended'] },
      );
      return new Set(
        items
          .filter((item) => typeof item.connectionId === 'string' && item.ended !== true)
          .map((item) => (item.pk as string).slice('sm#'.length)),
      );
    },

    // An operator's command (`npm run user`), folded out of the functions' bundles (`adminOnly`).
    revoke:
      process.env.NIMBUS_ADMIN === 'false'
        ? adminOnly
        : async (smId, revocation) => {
            const mark = async (recorded: Revocation) => {
              await doc.send(
                new UpdateCommand({
                  TableName: table,
                  Key: key(smId),
                  UpdateExpression: 'SET revoked = :revocation',
                  // Marked once: a rerun of the deletion (its roster gone by then) keeps the first run's.
                  ConditionExpression:
                    'attribute_exists(pk) AND attribute_not_exists(ended) AND attribute_not_exists(revoked)',
                  ExpressionAttributeValues: { ':revocation': boundedRevocation(recorded) },
                }),
              );
            };
            try {
              await mark(revocation).catch(async (error: unknown) => {
                // A queue item near DynamoDB's 400 KB (a client that never acknowledged) has no
                // room for the notices: the session is revoked without them (never resumed; its
                // contacts are not told when its window ends).
                if (!isItemTooLarge(error)) throw error;
                await mark({});
              });
              return true;
            } catch (error) {
              if (isConditionFailure(error)) return false;
              throw error;
            }
          },

    async counts(smId) {
      const { Item } = await doc.send(
        new GetCommand({
          TableName: table,
          Key: key(smId),
          ConsistentRead: true,
          ProjectionExpression: '#out, #base, holding, settledOut',
          ExpressionAttributeNames: { '#out': 'out', '#base': 'base' },
        }),
      );
      if (!Item) return undefined;
      const out = (Item.out as number) ?? 0;
      const base = (Item.base as number) ?? 0;
      return {
        out,
        base,
        posted: postedUpTo({
          out,
          base,
          holding: Boolean(Item.holding),
          settledOut: Item.settledOut as number | undefined,
        }),
      };
    },

    async append(smId, entry, maxEntries, poster, mark, answer, attachedTo) {
      // `lk`, the last key appended: an append retried after DynamoDB ran it must not queue the
      // stanza twice. The SDK does not resend a keyed append (`sendOnce`): its resend would pass
      // that check once another sender's append came between, and queue the stanza a second time
      // (seed 18 of a session-7 fault run: a 500 after the write, a resend 10 ms later). The
      // queue is read instead, and the append tried again only if the stanza is not in it.
      const keyed = entry.k !== undefined;
      // A sender's mark (SenderMark): refused when its frame appended here at this position or later.
      const marked = mark && entry.k !== undefined ? { from: mark.from, ...markOf(entry.k) } : undefined;
      const stored = (await storedEntries(smId, [entry]))?.[0];
      if (!stored) return { kind: 'full' };
      const result = await (async (): Promise<AppendResult> => {
        for (let attempt = 1; ; attempt++) {
          const command = new UpdateCommand({
            TableName: table,
            Key: key(smId),
            UpdateExpression: `SET q = list_append(q, :entry)${keyed ? ', lk = :k' : ''}${
              marked ? ', #mark = :mark' : ''
            }${
              poster === undefined
                ? ''
                : ', holding = if_not_exists(holding, :poster), holdingAt = if_not_exists(holdingAt, :now)'
            } ADD #out :one`,
            ConditionExpression: `attribute_exists(q) AND size(q) < :max${answer ? '' : ' AND attribute_not_exists(congested)'} AND attribute_not_exists(ended)${attachedTo === undefined ? '' : ' AND connectionId = :attachedTo'}${keyed ? ' AND (attribute_not_exists(lk) OR lk <> :k)' : ''}${
              marked
                ? ' AND (attribute_not_exists(#mark) OR NOT begins_with(#mark, :frame) OR #mark < :at)'
                : ''
            }`,
            ExpressionAttributeNames: {
              '#out': 'out',
              ...(marked ? { '#mark': `${MARK_PREFIX}${marked.from}` } : {}),
            },
            ExpressionAttributeValues: {
              ':entry': [stored],
              ':one': 1,
              ':max': maxEntries,
              ...(keyed ? { ':k': entry.k } : {}),
              ...(attachedTo === undefined ? {} : { ':attachedTo': attachedTo }),
              ...(marked
                ? {
                    ':mark': `${marked.at}/${nowSeconds().toString(36)}`,
                    ':frame': marked.frame,
                    ':at': marked.at,
                  }
                : {}),
              ...(poster === undefined ? {} : { ':poster': poster, ':now': Date.now() }),
            },
            ReturnValues: 'ALL_NEW',
          });
          try {
            const { Attributes } = await (keyed ? sendOnce(doc, command) : doc.send(command));
            const item = toItem(Attributes as Record<string, unknown>);
            if (item.senderMarks) await pruneMarks(smId, item.senderMarks);
            return { kind: 'queued', number: item.out, item };
          } catch (error) {
            if (isItemTooLarge(error)) return { kind: 'full' };
            const ambiguous = error instanceof AmbiguousWriteError;
            if (!ambiguous && !isConditionFailure(error)) throw error;
            const current = await this.get(smId);
            // Taken by a resume elsewhere (attached there, or detached from there since): whether
            // this write ran or not, that resume found the queue as it was (and goes on from it), so
            // the appender stops here. Detached from the appender's own connection: likewise, unless
            // an earlier try of this very append queued it (its answer lost), which is found below
            // as before, so that the caller settles it (a later entry may have reached the client).
            if (
              attachedTo !== undefined &&
              current &&
              !current.ended &&
              current.connectionId !== attachedTo &&
              (movedOn(current, attachedTo) ||
                !(keyed && current.entries.some((queued) => queued.k === entry.k)))
            )
              return { kind: 'moved' };
            if (current && keyed) {
              const at = current.entries.findIndex((queued) => queued.k === entry.k);
              if (at >= 0)
                return {
                  kind: 'queued',
                  number: current.base + at + 1,
                  item: current,
                  found: ambiguous ? 'ambiguous' : 'refused',
                };
              if (current.lastKey === entry.k && !current.ended) return { kind: 'acknowledged' };
              // Appended by an earlier delivery of this frame, and acknowledged since, while other
              // senders appended after it (`lk` moved on): not queued a second time.
              if (
                marked &&
                markCovers(current.senderMarks?.[marked.from], entry.k as string) &&
                !current.ended
              )
                return { kind: 'acknowledged' };
            }
            if (ambiguous && current && !current.ended) {
              // Not applied: throttled, or a 5xx before the write. Again, as the SDK would have.
              if (attempt >= APPEND_ATTEMPTS) throw error;
              await sleep(APPEND_BACKOFF_MS * 2 ** (attempt - 1) * (0.5 + Math.random()));
              continue;
            }
            return current && !current.ended ? { kind: 'full', item: current } : { kind: 'ended' };
          }
        }
      })();
      await dropUnqueued(smId, [stored], result);
      return result;
    },

    async appendMany(smId, entries, maxEntries, poster, attachedTo) {
      const keys = entries.map((entry) => entry.k);
      const first = keys[0];
      const last = keys.at(-1);
      if (first === undefined || last === undefined || keys.some((k) => k === undefined))
        throw new Error('appendMany takes keyed entries only');
      const stored = await storedEntries(smId, entries);
      if (!stored) return { kind: 'unfit' };
      const result = await (async (): Promise<AppendManyResult> => {
        for (let attempt = 1; ; attempt++) {
          const command = new UpdateCommand({
            TableName: table,
            Key: key(smId),
            UpdateExpression: `SET q = list_append(q, :entries), lk = :k${
              poster === undefined
                ? ''
                : ', holding = if_not_exists(holding, :poster), holdingAt = if_not_exists(holdingAt, :now)'
            } ADD #out :n`,
            // Room for every one of them (`size(q) <= max - n`), else none is appended.
            ConditionExpression:
              'attribute_exists(q) AND size(q) <= :room AND attribute_not_exists(congested) AND ' +
              'attribute_not_exists(ended) AND connectionId = :attachedTo AND (attribute_not_exists(lk) OR lk <> :k)',
            ExpressionAttributeNames: { '#out': 'out' },
            ExpressionAttributeValues: {
              ':entries': stored,
              ':n': entries.length,
              ':room': maxEntries - entries.length,
              ':k': last,
              ':attachedTo': attachedTo,
              ...(poster === undefined ? {} : { ':poster': poster, ':now': Date.now() }),
            },
            ReturnValues: 'ALL_NEW',
          });
          try {
            // Not resent by the SDK (see `append`): a read tells whether a failed attempt ran.
            const { Attributes } = await sendOnce(doc, command);
            const item = toItem(Attributes as Record<string, unknown>);
            if (item.senderMarks) await pruneMarks(smId, item.senderMarks);
            return { kind: 'queued', first: item.out - entries.length + 1, item };
          } catch (error) {
            if (isItemTooLarge(error)) return { kind: 'unfit' };
            const ambiguous = error instanceof AmbiguousWriteError;
            if (!ambiguous && !isConditionFailure(error)) throw error;
            const current = await this.get(smId);
            if (!current || current.ended) return { kind: 'ended' };
            // One write: found only as a whole, in order (what else queued its first key is left
            // to the one-by-one appends to tell).
            const at = windowAt(current, keys);
            const whole = at >= 0;
            if (current.connectionId !== attachedTo && (movedOn(current, attachedTo) || !whole))
              return { kind: 'moved' };
            if (!whole && current.entries.some((queued) => queued.k === first)) return { kind: 'unfit' };
            if (whole)
              return {
                kind: 'queued',
                first: current.base + at + 1,
                item: current,
                found: ambiguous ? 'ambiguous' : 'refused',
              };
            if (current.lastKey === last) return { kind: 'acknowledged' };
            if (ambiguous) {
              // Not applied: throttled, or a 5xx before the write. Again, as the SDK would have.
              if (attempt >= APPEND_ATTEMPTS) throw error;
              await sleep(APPEND_BACKOFF_MS * 2 ** (attempt - 1) * (0.5 + Math.random()));
              continue;
            }
            return { kind: 'unfit' };
          }
        }
      })();
      await dropUnqueued(smId, stored, result);
      return result;
    },

    async markUncertain(smId, entryKey, evenIfLast = false, postedTo, missed = false, landed = false) {
      for (let attempt = 0; attempt < 5; attempt++) {
        const item = await this.get(smId);
        const at = item && !item.ended ? item.entries.findIndex((entry) => entry.k === entryKey) : -1;
        if (!item || at < 0) return false;
        // Still queued and the last: nothing queued after it could have reached the client first.
        if (at === item.entries.length - 1 && !evenIfLast) return 'last';
        // Resumed elsewhere since the post: that resume sent the entry again, or its count covers it.
        const moved =
          postedTo !== undefined && item.connectionId !== undefined && item.connectionId !== postedTo;
        if (moved) return false;
        // Missed only while the session is still on the connection that refused the post, or
        // detached from that very connection and not resumed since (an attach removes
        // `detachedFrom`): a session resumed elsewhere since may have had the entry sent by that
        // resume's replay, and then the client may well have it.
        const detachedFromIt = item.connectionId === undefined && item.detachedFrom === postedTo;
        const surelyMissed =
          missed && postedTo !== undefined && (item.connectionId === postedTo || detachedFromIt);
        try {
          await doc.send(
            new UpdateCommand({
              TableName: table,
              Key: key(smId),
              // The first mark stands: a later one knows no more (a redelivered frame cannot tell
              // what its post did), and a 410's `missed` must not become "uncertain" (seed 17 of
              // session 8's target run: the detach after a 410 failed, the frame's redelivery
              // marked the entry again, and the resume's count could no longer vouch for the
              // entries before it). A resume's rewrite clears the marks.
              // A late post's bound (SmEntry.b): `out` as read now, after its post was answered.
              // Whatever other mark it had or gets (a redelivery of its frame cannot tell what the
              // post did), it did land, before any entry numbered above that. The first bound
              // stands: a mark tried again (DynamoDB ran it, then answered 500) reads a higher one.
              UpdateExpression: `SET q[${at}].u = if_not_exists(q[${at}].u, ${
                surelyMissed ? ':missed' : ':yes'
              })${landed ? `, q[${at}].b = if_not_exists(q[${at}].b, :bound)` : ''}, uncertain = :yes ADD marks :one`,
              // The entry is still where it was read (an ack trims from the head), and the session
              // on the connection it was posted to (or detached from it; for a missed mark, still
              // on it).
              ConditionExpression: `q[${at}].k = :k AND attribute_not_exists(ended)${
                postedTo === undefined
                  ? ''
                  : surelyMissed
                    ? detachedFromIt
                      ? ' AND attribute_not_exists(connectionId) AND detachedFrom = :to'
                      : ' AND connectionId = :to'
                    : ' AND (connectionId = :to OR attribute_not_exists(connectionId))'
              }`,
              ExpressionAttributeValues: {
                ':yes': true,
                ...(surelyMissed ? { ':missed': 'missed' } : {}),
                ':k': entryKey,
                ':one': 1,
                ...(landed ? { ':bound': item.out } : {}),
                ...(postedTo === undefined ? {} : { ':to': postedTo }),
              },
            }),
          );
          return true;
        } catch (error) {
          if (!isConditionFailure(error)) throw error;
        }
      }
      // Acks kept trimming ahead of it: by now it is most likely acknowledged itself.
      return false;
    },

    async rebase(smId, seen, newBase, kept) {
      // Kept entries were read from the queue: a large one keeps its own item's key (no write).
      const q = await storedEntries(smId, kept);
      if (!q) throw new Error('a kept entry is stored as it was read');
      try {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: key(smId),
            // Kept entries may still carry their marks (an ack that trims only what it vouches
            // for, see ackPastBounds): the queue then stays uncertain.
            UpdateExpression: `SET q = :q, #base = :newBase, #out = :newOut, ackedAt = :now ${
              kept.some((entry) => entry.u) ? ', uncertain = :yes' : 'REMOVE uncertain'
            }`,
            ConditionExpression: `connectionId = :owner AND #base = :base AND #out = :out AND ${
              seen.marks === undefined ? 'attribute_not_exists(marks)' : 'marks = :marks'
            }`,
            ExpressionAttributeNames: { '#out': 'out', '#base': 'base' },
            ExpressionAttributeValues: {
              ...(seen.marks === undefined ? {} : { ':marks': seen.marks }),
              ':q': q,
              ...(kept.some((entry) => entry.u) ? { ':yes': true } : {}),
              ':now': Date.now(),
              ':newBase': newBase,
              ':newOut': newBase + kept.length,
              ':owner': seen.connectionId,
              ':base': seen.base,
              ':out': seen.out,
            },
          }),
        );
        // What the count vouched for left the queue: its own items go too.
        const keptKeys = new Set(kept.flatMap(({ x }) => (x === undefined ? [] : [x])));
        await dropOwnItems(
          smId,
          seen.entries.filter(({ x }) => x !== undefined && !keptKeys.has(x)),
        );
        return true;
      } catch (error) {
        if (isConditionFailure(error)) return false;
        throw error;
      }
    },

    async acknowledge(smId, oldBase, newBase, connectionId) {
      const count = newBase - oldBase;
      const removed: SmEntry[] = [];
      let remaining: SmEntry[] = [];
      let out = oldBase;
      let congested = false;
      // An update expression is limited in length: trim in slices (at least one update, which
      // also records the ack's time).
      for (let done = 0; done < count || done === 0; ) {
        const slice = Math.min(200, count - done);
        const removals = Array.from({ length: slice }, (_, i) => `q[${i}]`).join(', ');
        let Attributes: Record<string, unknown> | undefined;
        try {
          ({ Attributes } = await doc.send(
            new UpdateCommand({
              TableName: table,
              Key: key(smId),
              UpdateExpression: `${slice > 0 ? `REMOVE ${removals} ` : ''}SET #base = :newBase, ackedAt = :now`,
              // Every slice checks the whole ack against `out`: an ack too high is refused before
              // the first slice is trimmed, not after.
              ConditionExpression:
                'connectionId = :owner AND #base = :base AND #out >= :target AND attribute_not_exists(uncertain)',
              ExpressionAttributeNames: { '#out': 'out', '#base': 'base' },
              ExpressionAttributeValues: {
                ':owner': connectionId,
                ':base': oldBase + done,
                ':newBase': oldBase + done + slice,
                ':target': newBase,
                ':now': Date.now(),
              },
              ReturnValues: 'ALL_OLD',
            }),
          ));
        } catch (error) {
          if (!isConditionFailure(error)) throw error;
          const current = await this.get(smId);
          if (current && current.connectionId !== connectionId) throw new NotSessionOwnerError(smId);
          if (current && !current.ended && !current.uncertain && current.base > oldBase + done) {
            // Trimmed already by this very ack: the SDK resent an update DynamoDB had run (a 500
            // after the write), or the frame is tried again before its state was saved. What that
            // write removed is gone with its lost answer (the XEP-0198 module removes the flooded
            // stored messages an ack covers before its trim; one trimmed without that stays in
            // storage, and the next flood may bring it again).
            remaining = current.entries;
            out = current.out;
            congested = current.congested === true;
            if (current.base >= newBase) break;
            done = current.base - oldBase;
            continue;
          }
          throw current?.uncertain ? new UncertainQueueError(smId) : new AckBeyondQueueError(smId);
        }
        const before = loadedEntries(Attributes?.q);
        removed.push(...before.slice(0, slice));
        remaining = before.slice(slice);
        out = (Attributes?.out as number | undefined) ?? out;
        congested = Boolean(Attributes?.congested);
        done += Math.max(slice, 1);
      }
      await dropOwnItems(smId, removed);
      return { removed, remaining, out, congested };
    },

    async setCongested(smId, congested) {
      await doc
        .send(
          new UpdateCommand({
            TableName: table,
            Key: key(smId),
            UpdateExpression: congested ? 'SET congested = :yes' : 'REMOVE congested',
            ConditionExpression: 'attribute_exists(q) AND attribute_not_exists(ended)',
            ...(congested ? { ExpressionAttributeValues: { ':yes': true } } : {}),
          }),
        )
        .catch((error: unknown) => {
          // An ended session has nothing left to mark.
          if (!isConditionFailure(error)) throw error;
        });
    },

    async attach(smId, user, connectionId, inbound, from) {
      // Not a deleted account's session: a resume judged before the deletion marked it decides again.
      const conditions = ['#user = :user', 'attribute_not_exists(ended)', 'attribute_not_exists(revoked)'];
      if (inbound !== undefined) conditions.push('(attribute_not_exists(inbound) OR inbound <= :inbound)');
      if (from === null) conditions.push('attribute_not_exists(connectionId)');
      else if (from !== undefined) conditions.push('connectionId = :from');
      try {
        const { Attributes } = await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: key(smId),
            // What was queued while detached was never posted: its number bound moves to
            // unpostedAfter (-1 when the session was attached: a takeover), for this resume.
            // The replay's hold has a time too: a replay that stopped without closing the socket
            // (the close failed) is found past the lease, as a dead poster's is.
            UpdateExpression: `SET connectionId = :connectionId, holding = :yes, holdingAt = :now, #ttl = :ttl, sweepShard = :attached, sweepAt = :probe, unpostedAfter = if_not_exists(detachedOut, :none)${
              inbound === undefined ? '' : ', inbound = :inbound'
            } REMOVE detachedFrom, detachedOut`,
            ConditionExpression: conditions.join(' AND '),
            ExpressionAttributeNames: { '#user': 'user', '#ttl': TTL_ATTRIBUTE },
            ExpressionAttributeValues: {
              ':connectionId': connectionId,
              ...(typeof from === 'string' ? { ':from': from } : {}),
              ':yes': true,
              ':user': user,
              ':ttl': attachedExpiry(),
              ':attached': sweepShardOf(ATTACHED_SHARD, smId),
              ':probe': Date.now() + PROBE_AFTER_MS,
              ':now': Date.now(),
              ':none': -1,
              ...(inbound === undefined ? {} : { ':inbound': inbound }),
            },
            ReturnValues: 'ALL_NEW',
          }),
        );
        return toItem(Attributes as Record<string, unknown>);
      } catch (error) {
        if (isConditionFailure(error)) return undefined;
        throw error;
      }
    },

    release(smId, seenOut, connectionId) {
      // A replay's hold is `true`; without a connection, any hold (the tests' shortcut).
      return letGo(smId, seenOut, connectionId === undefined ? undefined : { connectionId, holding: true });
    },

    async releasePoster(smId, posterKey, seenOut, connectionId) {
      if (await letGo(smId, seenOut, { connectionId, holding: posterKey })) return { released: true };
      const item = await this.get(smId);
      return { released: false, ...(item && !item.ended ? { item } : {}) };
    },

    async detach(smId, connectionId, inbound, sweepAt, directedTo, transfer) {
      try {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: key(smId),
            UpdateExpression: `REMOVE connectionId, holding, holdingAt SET sweepShard = :shard, sweepAt = :at, inbound = :inbound, directedTo = :directed, #ttl = :ttl, detachedFrom = :connectionId, detachedOut = if_not_exists(#out, :zero)${transfer ? ', transfer = :transfer' : ''}`,
            ConditionExpression: 'connectionId = :connectionId AND attribute_not_exists(ended)',
            ExpressionAttributeNames: { '#ttl': TTL_ATTRIBUTE, '#out': 'out' },
            ExpressionAttributeValues: {
              ':shard': sweepShardOf(DETACHED_SHARD, smId),
              ':at': sweepAt,
              ':inbound': inbound,
              ':directed': directedTo,
              ':connectionId': connectionId,
              ':ttl': Math.floor(sweepAt / 1000) + DAY_SECONDS,
              ':zero': 0,
              ...(transfer ? { ':transfer': transfer } : {}),
            },
          }),
        );
        return true;
      } catch (error) {
        if (isConditionFailure(error)) return false;
        if (isItemTooLarge(error)) return 'too-large';
        throw error;
      }
    },

    async end(smId, owner, inbound) {
      const detachedFrom = typeof owner === 'object' ? owner.detachedFrom : undefined;
      const connectionId = owner === 'any' || typeof owner === 'object' ? undefined : owner;
      let recorded = inbound;
      for (let attempt = 1; ; attempt++) {
        const ended = await endOnce(smId, owner, connectionId, detachedFrom, recorded);
        if (ended !== 'refused' || attempt > 1) return ended === 'refused' ? undefined : ended;
        // The count is never lowered: a caller's read of it may be older than a detach that
        // recorded more (a resume and a new detach while an expiry's end was retried). The end
        // goes ahead with the session's count, under the same owner condition.
        const item = await readItem(smId);
        if (!item || item.ended || (item.inbound ?? 0) <= recorded) return undefined;
        recorded = item.inbound ?? recorded;
      }
    },

    async markRerouted(smId, count) {
      await doc
        .send(
          new UpdateCommand({
            TableName: table,
            Key: key(smId),
            UpdateExpression: 'SET rerouted = :count',
            ConditionExpression: 'attribute_exists(q) AND rerouted < :count',
            ExpressionAttributeValues: { ':count': count },
          }),
        )
        .catch((error: unknown) => {
          // Finished, or already past this point: nothing to record.
          if (!isConditionFailure(error)) throw error;
        });
    },

    async finishReroute(smId) {
      try {
        const { Attributes } = await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: key(smId),
            UpdateExpression: 'REMOVE q, rerouted, sweepShard, sweepAt',
            ConditionExpression: 'attribute_exists(ended)',
            ReturnValues: 'UPDATED_OLD',
          }),
        );
        await dropOwnItems(smId, (Attributes?.q as StoredEntry[] | undefined) ?? []);
      } catch (error) {
        if (!isConditionFailure(error)) throw error;
      }
    },

    listReroutes: (now, limit) => listSwept(REROUTE_SHARD, now, limit),

    listDueProbes: (now, limit) => listSwept(ATTACHED_SHARD, now, limit),

    deferProbe:
      process.env.NIMBUS_SWEEPS === 'false'
        ? sweeperOnly
        : async (smId, connectionId, at) => {
            try {
              await doc.send(
                new UpdateCommand({
                  TableName: table,
                  Key: key(smId),
                  // An entry from before the shards moves to its shard.
                  UpdateExpression: 'SET sweepAt = :at, sweepShard = :shard',
                  ConditionExpression:
                    'connectionId = :connectionId AND (sweepShard = :attached OR begins_with(sweepShard, :sharded))',
                  ExpressionAttributeValues: {
                    ':at': at,
                    ':connectionId': connectionId,
                    ':attached': ATTACHED_SHARD,
                    ':sharded': `${ATTACHED_SHARD}#`,
                    ':shard': sweepShardOf(ATTACHED_SHARD, smId),
                  },
                }),
              );
            } catch (error) {
              // Detached, resumed elsewhere or ended meanwhile: its own sweep time stands.
              if (!isConditionFailure(error)) throw error;
            }
          },

    listExpired: (now, limit) => listSwept(DETACHED_SHARD, now, limit),
  };
}
