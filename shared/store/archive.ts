/**
 * Archive table: XEP-0136 Message Archiving (v0.9), collections of messages per user.
 * docs/data-model.md ("Archive table") lists every item kind and access pattern.
 *
 *   pk = <owner>              sk = c#<start>/<with>        → collection header (one per collection)
 *   pk = <owner>              sk = open#<with>             → the collection being recorded with a full JID
 *   pk = <owner>              sk = r#<start>/<with>        → tombstone of a removed collection
 *   pk = <owner>              sk = prefs                   → archiving preferences
 *   pk = <owner>/<cid>        sk = m#<seq>                 → one archived message, note or EncryptedData
 *   pk = <owner>/<cid>        sk = k#<carried>#<public>    → one EncryptedKey
 *   pk = <owner>/<cid>        sk = f#<frame key>           → a frame's manual store: where its entries go
 *   pk = #purge               sk = <time>/<owner>/<cid>    → items of a removed collection still to delete
 *
 * `<owner>` is the archiving user's bare JID (it has no `/`, so `<owner>/…` never collides with
 * another owner), `<start>` a 24-character ISO time with milliseconds (`1469-07-21T02:56:15.000Z`,
 * sorts as time for the years 0000–9999 XEP-0082 allows), `<with>` the normalised JID.
 *
 * Cost of archiving one message (the point of the layout): one PutItem of the message item,
 * i.e. one write unit per KB of message, and nothing else on most messages. The collection's
 * message count is derived (the last item's `seq`), never a counter; the header is written when
 * a collection starts, and after that only when the collection's recorded change time moves to a
 * new window (`changeWindowMs`, default a minute: at most one header update per active minute)
 * or when its messages would outlive its expiry (at most once per day of activity). The reads
 * before the write (the open-collection pointer and the collection's last item, 1 read unit
 * together) are what the idle-gap and thread rules need anyway.
 *
 * A frame delivered again writes nothing twice: an automatic entry carries its frame's key
 * (`fk`), which a redelivery looks for (`archivedByFrame`: the last item read anyway, more only
 * when that is not it), so the first delivery pays nothing for it; a manual store writes its plan
 * first (`f#`, one PutItem a request), and a redelivery puts the same entries where it says.
 */

import { createHash, randomBytes } from 'node:crypto';
import { TransactionCanceledException } from '@aws-sdk/client-dynamodb';
import {
  BatchWriteCommand,
  DeleteCommand,
  type DynamoDBDocumentClient,
  GetCommand,
  PutCommand,
  QueryCommand,
  type QueryCommandInput,
  TransactWriteCommand,
  UpdateCommand,
} from '@aws-sdk/lib-dynamodb';
import {
  ARCHIVE_CHANGE_INDEX,
  ARCHIVE_EXPIRY_INDEX,
  ARCHIVE_KEY_NAME_INDEX,
  ARCHIVE_WITH_BARE_INDEX,
  ARCHIVE_WITH_DOMAIN_INDEX,
  ARCHIVE_WITH_FULL_INDEX,
  TTL_ATTRIBUTE,
} from '../tables.ts';
import { adminOnly, isConditionFailure, sweeperOnly } from './dynamo.ts';

// ---------------------------------------------------------------------------------------------
// Domain

/** A collection's identity (XEP-0136 §5.2: "'with' … and 'start'"). */
export interface CollectionRef {
  /** Normalised JID the messages were exchanged with (full, bare or a domain). */
  with: string;
  /** Start time, ms since the epoch (negative before 1970: the seed's examples are in 1469). */
  start: number;
}

export interface CollectionHeader extends CollectionRef {
  /** XEP-0059 UID of the collection in lists: `<start>/<with>`. Opaque to clients. */
  id: string;
  /** Partition id of its items; a collection removed and created again gets a new one. */
  cid: string;
  subject?: string;
  /** Holds EncryptedData or EncryptedKey elements (the list's `crypt='true'`). */
  crypt: boolean;
  /** Holds `<to/>`, `<from/>` or `<note/>` elements. */
  plain: boolean;
  /** Epoch seconds after which the header (and, before it, every item) is gone. */
  expiresAt?: number;
  /** Its change key (replication's order), when read from the table. */
  changeKey?: string;
}

export type EntryKind = 'to' | 'from' | 'note' | 'data';

export interface EntryInput {
  kind: EntryKind;
  /** Absolute time of the message or note, ms since the epoch. */
  at: number;
  /** Shown with an absolute `utc` attribute rather than `secs` (XEP-0136 §5.4). */
  utc?: boolean;
  /** The element as returned by `<retrieve/>`, serialised, without its `secs`/`utc` attributes. */
  xml: string;
  /** EncryptedData only: the symmetric key's name (its KeyInfo/KeyName). */
  keyName?: string;
  /**
   * The frame delivery that wrote it (core/frame.ts: the same key on every delivery of the
   * frame): a redelivery finds it (`archivedByFrame`, a manual store's plan) and writes nothing
   * twice. Absent outside a frame.
   */
  frameKey?: string;
}

export interface ArchivedEntry extends EntryInput {
  /** Position in the collection from 0; the XEP-0059 UID of the entry in `<retrieve/>`. */
  seq: number;
  /** Time-ordered across all of the owner's collections (a future XEP-0313 archive id). */
  id: string;
  /** Time of the entry before it (undefined for the first): `secs` is relative to it. */
  prevAt?: number;
}

export interface EncryptedKeyInput {
  /** `<CarriedKeyName/>`: the symmetric key it carries. */
  carriedKeyName: string;
  /** KeyInfo/KeyName: the public key that encrypts it. */
  publicKeyName: string;
  xml: string;
}

export interface StoredEncryptedKey extends EncryptedKeyInput {
  collection: CollectionRef;
  /** Its UID in a `<keys/>` page (XEP-0059 `<first/>`, `<last/>`): set by `listKeys`. */
  ref?: string;
}

/** The collection recorded automatically with one full JID, and its last entry. */
/**
 * A collection's last entry: its position and time, and the time of the last message (`<to/>`
 * or `<from/>`) up to it, which the next message's `secs` counts from (a note is not one).
 */
export interface Tail {
  seq: number;
  at: number;
  messageAt?: number;
  /** Its frame key (EntryInput.frameKey): a redelivery of its frame finds it here for free. */
  frameKey?: string;
}

const isMessage = (kind: EntryKind) => kind === 'to' || kind === 'from';

function tailOf(entry: ArchivedEntry): Tail {
  return {
    seq: entry.seq,
    at: entry.at,
    messageAt: isMessage(entry.kind) ? entry.at : entry.prevAt,
    ...(entry.frameKey !== undefined ? { frameKey: entry.frameKey } : {}),
  };
}

export interface OpenCollection {
  header: CollectionHeader;
  thread?: string;
  last?: Tail;
  /** Change time recorded on the header (epoch ms, window-aligned after the first append). */
  changedUntil: number;
  /**
   * The `expire` (seconds) its messages are archived with, undefined when they are kept for ever;
   * `'unknown'` on a pointer written before it was recorded (session 30) to a collection that
   * expires. A message archived with another expiry starts a new collection
   * (`startsNewCollection`), so a collection's messages expire in the order they came.
   */
  expireSeconds?: number | 'unknown';
}

export type WithFilter = { jid: string; kind: 'full' | 'bare' | 'domain' };

export interface CollectionFilter {
  with?: WithFilter;
  /** Inclusive lower bound of `start` (ms). */
  start?: number;
  /** Exclusive upper bound of `start` (ms). */
  end?: number;
}

/** A XEP-0059 page request after decoding; UIDs are the ones this store handed out. */
export interface PageRequest {
  max: number;
  after?: string;
  before?: string;
  /** An empty `<before/>`: the last page. */
  lastPage?: boolean;
  /** `<index/>`: the page starting at this position (served where it is cheap). */
  index?: number;
}

export interface Page<T> {
  items: T[];
  /** Items matching the request in all pages (see each function for what it costs). */
  count: number;
  /** Position of the first item, when known. */
  firstIndex?: number;
  /** UIDs of the first and last item of the page. */
  first?: string;
  last?: string;
}

export interface ArchivePrefs {
  default?: Mode;
  /** Keyed by normalised JID (full, bare or domain). */
  items: Record<string, Mode>;
  methods: Partial<Record<'auto' | 'local' | 'manual', 'prefer' | 'allow' | 'never'>>;
  /** Optimistic-locking version; 0 when never stored. */
  version: number;
}

export interface Mode {
  save: 'false' | 'body' | 'all';
  otr: 'allow' | 'deny' | 'require' | 'try';
  /** Seconds after archiving that messages are deleted. */
  expire?: number;
  /**
   * XEP-0136 0.5 §3.2: what the item was before `<record otr='true'/>` took the contact off the
   * record (`'default'`: there was no item), so that `otr='false'` gives it back.
   */
  beforeOtr?: Omit<Mode, 'beforeOtr'> | 'default';
}

export interface Change {
  kind: 'changed' | 'removed';
  collection: CollectionRef;
  /** The change's cursor: pass it back (as `after`) for what changed later. */
  key: string;
  /** The same as an XEP-0082 DateTime: the seed's `<last/>`. */
  time: string;
}

export class ArchiveConflictError extends Error {
  constructor(what: string) {
    super(`concurrent archive update: ${what}`);
    this.name = 'ArchiveConflictError';
  }
}

export class CollectionTooLargeError extends Error {
  constructor(readonly collection: CollectionRef) {
    super(`collection with ${collection.with} is full`);
    this.name = 'CollectionTooLargeError';
  }
}

export class PrefsVersionConflictError extends Error {
  constructor(readonly owner: string) {
    super(`archiving preferences of ${owner} changed concurrently`);
    this.name = 'PrefsVersionConflictError';
  }
}

// ---------------------------------------------------------------------------------------------
// Keys

/** Sortable 24-character time (`0000-01-01T00:00:00.000Z` … `9999-12-31T23:59:59.999Z`). */
export function timeKey(ms: number): string {
  const iso = new Date(ms).toISOString();
  if (iso.length !== 24) throw new RangeError(`time outside the years 0000-9999: ${ms}`);
  return iso;
}

/**
 * A retrieve stops reading once the entries it has pass a reply's worth (API Gateway posts at
 * most 128 KB; the module cuts the page to fit): entries of tens of KB would otherwise have a
 * page of `max` 250 read megabytes to answer a few.
 */
export const RETRIEVE_READ_BYTES = 128 * 1024;

/** An item's size as DynamoDB bills it, roughly: names and string values, 8 bytes for others. */
function approximateBytes(item: Record<string, unknown>): number {
  let bytes = 0;
  for (const [name, value] of Object.entries(item))
    bytes += name.length + (typeof value === 'string' ? Buffer.byteLength(value, 'utf8') : 8);
  return bytes;
}

const MAX_SEQ_DIGITS = 10;
const seqKey = (seq: number) => `m#${seq.toString().padStart(MAX_SEQ_DIGITS, '0')}`;
const collectionUid = (ref: CollectionRef) => `${timeKey(ref.start)}/${ref.with}`;
const headerKey = (owner: string, ref: CollectionRef) => ({ pk: owner, sk: `c#${collectionUid(ref)}` });
const pointerKey = (owner: string, withJid: string) => ({ pk: owner, sk: `open#${withJid}` });
const prefsKey = (owner: string) => ({ pk: owner, sk: 'prefs' });
const partitionOf = (owner: string, cid: string) => `${owner}/${cid}`;

/** An entry's item as stored (a message, a note or a key, at its position in the collection). */
function entryItem(
  owner: string,
  cid: string,
  entry: ArchivedEntry,
  expiresAt: number | undefined,
): Record<string, unknown> {
  return {
    pk: partitionOf(owner, cid),
    sk: seqKey(entry.seq),
    seq: entry.seq,
    id: entry.id,
    // With `id`, what a XEP-0313 index over the owner's messages needs.
    owner,
    kind: entry.kind,
    at: entry.at,
    prevAt: entry.prevAt,
    utc: entry.utc || undefined,
    xml: entry.xml,
    keyName: entry.keyName,
    // The key of the frame that archived it (automatic archiving, a manual store's plan).
    fk: entry.frameKey,
    [TTL_ATTRIBUTE]: expiresAt,
  };
}
const PURGE_PARTITION = '#purge';
// Key and public-key names are free text: escaped so `#` separates them without ambiguity.
const keySk = (carried: string, pub: string) => `k#${encodeURIComponent(carried)}#${encodeURIComponent(pub)}`;

function parseUid(uid: string): CollectionRef | undefined {
  const start = Date.parse(uid.slice(0, 24));
  if (uid.length < 26 || uid[24] !== '/' || Number.isNaN(start) || timeKey(start) !== uid.slice(0, 24))
    return undefined;
  return { start, with: uid.slice(25) };
}

function withParts(jid: string): { full: string; bare: string; domain: string } {
  const slash = jid.indexOf('/');
  const bare = slash === -1 ? jid : jid.slice(0, slash);
  const at = bare.indexOf('@');
  return { full: jid, bare, domain: at === -1 ? bare : bare.slice(at + 1) };
}

let lastMillis = 0;
let sequence = 0;
/** Epoch of the ids: 0000-01-01T00:00:00Z, so ids of the years 0000–9999 sort as 15 digits. */
const ID_EPOCH_OFFSET = 62_167_219_200_000;

/**
 * Ids sort by time across all of an owner's collections: ms since year 0, a per-process sequence
 * for the same millisecond, randomness against two Lambdas in the same millisecond. The same
 * id can serve XEP-0313 later (a GSI on `owner`/`id` over the items already written).
 */
export function newArchiveId(at: number): string {
  if (at === lastMillis) sequence += 1;
  else {
    lastMillis = at;
    sequence = 0;
  }
  const ms = (at + ID_EPOCH_OFFSET).toString().padStart(15, '0');
  return `${ms}-${(sequence % 10000).toString().padStart(4, '0')}-${randomBytes(4).toString('hex')}`;
}

/**
 * The id of the `index`-th entry of a frame's manual store (`frameKey`: core/frame.ts): the form
 * of `newArchiveId`, its last two parts taken from the frame and the index, so that a redelivery
 * of the frame writes the entry with the id it had.
 */
function frameArchiveId(at: number, frameKey: string, index: number): string {
  const ms = (at + ID_EPOCH_OFFSET).toString().padStart(15, '0');
  const hash = createHash('sha256').update(`${frameKey}#${index}`).digest('hex').slice(0, 8);
  return `${ms}-${(index % 10000).toString().padStart(4, '0')}-${hash}`;
}

/**
 * A frame's manual store (`f#<frame key>` in the collection's partition), written before its
 * entries: entry `i` goes to `seqs[i]` with time `ats[i]` and previous message time `prevs[i]`
 * (null: none). A redelivery of the frame writes the same entries again, not new ones.
 */
interface StorePlan {
  seqs: number[];
  ats: number[];
  prevs: (number | null)[];
  version: number;
}

/**
 * How long a store's plan is kept: a frame comes back within its queue's 20 receives of 180 s
 * (an hour), or never (infra/constructs/frame-queue.ts).
 */
const PLAN_TTL_SECONDS = 86_400;

/**
 * How far before its frame reached the server a redelivery looks for the entry an earlier
 * delivery archived (`archivedByFrame`): that delivery took the entry's time after the frame
 * arrived, and whatever was appended after it was accepted by an invocation (30 s at most, Lambda
 * 15 min) running when it was written; the rest is clock skew between API Gateway and Lambda.
 */
const FRAME_SEARCH_MARGIN_MS = 15 * 60_000;
/** Entries a redelivery reads per collection at most, newest first, looking for its entry. */
const FRAME_SEARCH_MAX_ENTRIES = 1000;

/**
 * A change cursor: the time (ISO, ms, without `Z`) and nine more digits of fraction that order
 * changes recorded in the same millisecond. Rendered as an XEP-0082 DateTime for `<last/>`.
 */
export function changeKeyOf(ms: number, subMillisecond = '000000000'): string {
  return `${timeKey(ms).slice(0, 23)}${subMillisecond.padEnd(9, '0').slice(0, 9)}`;
}

function changeTime(key: string): string {
  return `${key}Z`;
}

function randomDigits(): string {
  return (randomBytes(4).readUInt32BE(0) % 1_000_000_000).toString().padStart(9, '0');
}

const notExpired = `(attribute_not_exists(#ttl) OR #ttl > :now)`;

function toHeader(item: Record<string, unknown>): CollectionHeader {
  const uid = (item.sk as string).slice(2);
  return {
    id: uid,
    with: item.with as string,
    start: item.start as number,
    cid: item.cid as string,
    subject: item.subject as string | undefined,
    crypt: item.crypt === true,
    plain: item.plain === true,
    expiresAt: item[TTL_ATTRIBUTE] as number | undefined,
    changeKey: item.changeKey as string | undefined,
  };
}

function toEntry(item: Record<string, unknown>): ArchivedEntry {
  return {
    seq: item.seq as number,
    id: item.id as string,
    kind: item.kind as EntryKind,
    at: item.at as number,
    prevAt: item.prevAt as number | undefined,
    utc: item.utc === true ? true : undefined,
    xml: item.xml as string,
    keyName: item.keyName as string | undefined,
    frameKey: item.fk as string | undefined,
  };
}

// ---------------------------------------------------------------------------------------------
// Store

export interface ArchiveStoreOptions {
  /** Granularity of a collection's recorded change time (`<modified/>`). Default 60 s. */
  changeWindowMs?: number;
  /** How long a removed collection's tombstone is kept. Default 90 days. */
  tombstoneSeconds?: number;
  /** Entries one collection may hold; beyond it a store is refused (`not-acceptable`). */
  maxCollectionEntries?: number;
  /** Items deleted synchronously per `removeCollections` call before the rest is queued. */
  purgeBudget?: number;
  /** The clock (tests move it). */
  now?: () => number;
}

const DAY_SECONDS = 86_400;
/** Shards of the expiry index (`expShard` = `x<n>`), each swept on its own. */
const EXPIRY_SHARDS = 4;
/** Message expiries closer together than this are recorded as one change of the collection. */
const EXPIRY_BATCH_SECONDS = 60;

function expiryShard(owner: string): string {
  let hash = 0;
  for (let i = 0; i < owner.length; i++) hash = (hash * 31 + owner.charCodeAt(i)) >>> 0;
  return `x${hash % EXPIRY_SHARDS}`;
}
/** Changes younger than this are not listed yet: a GSI can lag, and a cursor must never pass one. */
const CHANGE_VISIBILITY_LAG_MS = 2000;

export type ArchiveStore = ReturnType<typeof createArchiveStore>;

/** How a sweeper step (`sweepExpiring`, `purgePending`) treats its items, each on its own. */
export interface SweepStep {
  /** Whether to start another item (the sweeper's time left); default: always. */
  hasTime?: () => boolean;
  /**
   * An item failed: reported here, and the step goes on with the next (tried again next run).
   * Without it, the failure is thrown and the step ends.
   */
  onError?: (error: unknown, fields: Record<string, unknown>) => void;
}

export function createArchiveStore(
  doc: DynamoDBDocumentClient,
  table: string,
  options: ArchiveStoreOptions = {},
) {
  const changeWindowMs = options.changeWindowMs ?? 60_000;
  const tombstoneSeconds = options.tombstoneSeconds ?? 90 * DAY_SECONDS;
  const maxEntries = options.maxCollectionEntries ?? 1_000_000;
  const purgeBudget = options.purgeBudget ?? 1000;
  const now = options.now ?? Date.now;
  const nowSeconds = () => Math.floor(now() / 1000);

  /** Gives a collection's stored `<EncryptedKey/>` items a later expiry (never shortens one). */
  /**
   * Entries that expire in a collection kept for ever: the expiry index learns of them, so that
   * `<modified/>` (0.9 §10) reports them going (the sweep moves it on to the next one). Sooner
   * only: an index entry already due earlier stays. One UpdateItem, only for such a store.
   */
  async function expireNoLaterThan(owner: string, header: CollectionHeader, at: number): Promise<void> {
    try {
      await doc.send(
        new UpdateCommand({
          TableName: table,
          Key: headerKey(owner, header),
          UpdateExpression: 'SET nextExpiry = :next, expShard = :shard',
          ConditionExpression: 'cid = :cid AND (attribute_not_exists(nextExpiry) OR nextExpiry > :next)',
          ExpressionAttributeValues: { ':next': at, ':shard': expiryShard(owner), ':cid': header.cid },
        }),
      );
    } catch (error) {
      if (!isConditionFailure(error)) throw error;
    }
  }

  /** Moves the collection's keys' expiry on to `expiresAt`; undefined: they are kept for ever. */
  async function extendKeys(
    owner: string,
    header: CollectionHeader,
    expiresAt: number | undefined,
  ): Promise<void> {
    const { items } = await queryItems(
      {
        TableName: table,
        KeyConditionExpression: 'pk = :pk AND begins_with(sk, :k)',
        ExpressionAttributeValues: { ':pk': partitionOf(owner, header.cid), ':k': 'k#' },
        ProjectionExpression: 'pk, sk',
        ConsistentRead: true,
      },
      10_000,
    );
    for (const item of items) {
      try {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: { pk: item.pk, sk: item.sk },
            // A key deleted meanwhile (§9 <delete/>) stays deleted; a longer expiry, or none, stays.
            ...(expiresAt === undefined
              ? { UpdateExpression: 'REMOVE #ttl', ConditionExpression: 'attribute_exists(pk)' }
              : {
                  UpdateExpression: 'SET #ttl = :exp',
                  ConditionExpression: 'attribute_exists(pk) AND #ttl < :exp',
                  ExpressionAttributeValues: { ':exp': expiresAt },
                }),
            ExpressionAttributeNames: { '#ttl': TTL_ATTRIBUTE },
          }),
        );
      } catch (error) {
        if (!isConditionFailure(error)) throw error;
      }
    }
  }

  /**
   * Paginates a Query until `limit` items passed `keep`, or the range ends. `skips` is how many
   * items `keep` will drop (an inclusive bound's cursor item): they are read in the same request,
   * so a page after a cursor costs what the first page costs.
   */
  async function queryItems(
    input: QueryCommandInput,
    limit: number,
    keep: (item: Record<string, unknown>) => boolean = () => true,
    skips = 0,
    /** No further page is read once the items kept pass this many bytes (a reply's worth). */
    maxBytes = Number.POSITIVE_INFINITY,
  ): Promise<{ items: Record<string, unknown>[]; more: boolean; skipped: Record<string, unknown>[] }> {
    const skipped: Record<string, unknown>[] = [];
    // XEP-0059 §2.7 `<max>0</max>` asks for the count alone; DynamoDB refuses `Limit: 0`.
    if (limit <= 0) return { items: [], more: false, skipped };
    const items: Record<string, unknown>[] = [];
    let skipsLeft = skips;
    let start: Record<string, unknown> | undefined;
    let more = false;
    let bytes = 0;
    do {
      const page = await doc.send(
        new QueryCommand({ ...input, Limit: limit - items.length + skipsLeft, ExclusiveStartKey: start }),
      );
      start = page.LastEvaluatedKey;
      const found = page.Items ?? [];
      for (const [i, item] of found.entries()) {
        if (!keep(item)) {
          skipsLeft = Math.max(0, skipsLeft - 1);
          skipped.push(item);
          continue;
        }
        items.push(item);
        if (maxBytes !== Number.POSITIVE_INFINITY) bytes += approximateBytes(item);
        if (items.length === limit || bytes > maxBytes) {
          more = i < found.length - 1 || start !== undefined;
          break;
        }
      }
    } while (start && items.length < limit && bytes <= maxBytes);
    return { items, more, skipped };
  }

  async function countQuery(input: QueryCommandInput): Promise<number> {
    let total = 0;
    let start: Record<string, unknown> | undefined;
    do {
      const page = await doc.send(new QueryCommand({ ...input, Select: 'COUNT', ExclusiveStartKey: start }));
      total += page.Count ?? 0;
      start = page.LastEvaluatedKey;
    } while (start);
    return total;
  }

  /** The `seq` of the first live message (`<to/>`, `<from/>`) at or after `seq`. */
  async function firstMessageFrom(owner: string, cid: string, seq: number): Promise<number | undefined> {
    const { items } = await queryItems(
      {
        TableName: table,
        KeyConditionExpression: 'pk = :pk AND sk BETWEEN :lo AND :hi',
        FilterExpression: `${notExpired} AND (#kind = :to OR #kind = :from)`,
        ProjectionExpression: '#seq',
        ExpressionAttributeNames: { '#ttl': TTL_ATTRIBUTE, '#kind': 'kind', '#seq': 'seq' },
        ExpressionAttributeValues: {
          ':pk': partitionOf(owner, cid),
          ':lo': seqKey(seq),
          ':hi': seqKey(10 ** MAX_SEQ_DIGITS - 1),
          ':now': nowSeconds(),
          ':to': 'to',
          ':from': 'from',
        },
        ConsistentRead: true,
      },
      1,
    );
    return items[0]?.seq as number | undefined;
  }

  /** First or last live entry of a collection partition (a TTL-expired prefix is skipped). */
  async function edgeEntry(owner: string, cid: string, forward: boolean): Promise<ArchivedEntry | undefined> {
    const { items } = await queryItems(
      {
        TableName: table,
        KeyConditionExpression: 'pk = :pk AND begins_with(sk, :m)',
        FilterExpression: notExpired,
        ExpressionAttributeNames: { '#ttl': TTL_ATTRIBUTE },
        ExpressionAttributeValues: { ':pk': partitionOf(owner, cid), ':m': 'm#', ':now': nowSeconds() },
        ScanIndexForward: forward,
        ConsistentRead: true,
      },
      1,
    );
    return items[0] ? toEntry(items[0]) : undefined;
  }

  async function getHeader(owner: string, ref: CollectionRef): Promise<CollectionHeader | undefined> {
    const { Item } = await doc.send(
      new GetCommand({ TableName: table, Key: headerKey(owner, ref), ConsistentRead: true }),
    );
    if (!Item) return undefined;
    const expiresAt = Item[TTL_ATTRIBUTE] as number | undefined;
    if (expiresAt !== undefined && expiresAt <= nowSeconds()) return undefined;
    return toHeader(Item);
  }

  function headerItem(owner: string, header: CollectionHeader, changeKey: string): Record<string, unknown> {
    const parts = withParts(header.with);
    return {
      ...headerKey(owner, header),
      with: header.with,
      start: header.start,
      cid: header.cid,
      subject: header.subject,
      crypt: header.crypt || undefined,
      plain: header.plain || undefined,
      wFull: `${owner}/${parts.full}`,
      wBare: `${owner}/${parts.bare}`,
      wDomain: `${owner}/${parts.domain}`,
      changeOwner: owner,
      changeKey,
      [TTL_ATTRIBUTE]: header.expiresAt,
      // A collection that expires is swept when its first message does (`sweepExpiring`): the
      // header outlives its messages by a day, so that is a day before the header's own TTL.
      ...(header.expiresAt !== undefined
        ? { expShard: expiryShard(owner), nextExpiry: header.expiresAt - DAY_SECONDS }
        : {}),
    };
  }

  /** The TTL of the collection's first message not yet expired (messages expire in order). */
  async function nextMessageExpiry(owner: string, cid: string, nowSec: number): Promise<number | undefined> {
    let startKey: Record<string, unknown> | undefined;
    do {
      const page = await doc.send(
        new QueryCommand({
          TableName: table,
          KeyConditionExpression: 'pk = :pk AND begins_with(sk, :m)',
          FilterExpression: '#ttl > :now',
          ProjectionExpression: '#ttl',
          ExpressionAttributeNames: { '#ttl': TTL_ATTRIBUTE },
          ExpressionAttributeValues: { ':pk': partitionOf(owner, cid), ':m': 'm#', ':now': nowSec },
          ConsistentRead: true,
          Limit: 100,
          ...(startKey ? { ExclusiveStartKey: startKey } : {}),
        }),
      );
      const first = page.Items?.[0];
      if (first) return first[TTL_ATTRIBUTE] as number;
      startKey = page.LastEvaluatedKey;
    } while (startKey);
    return undefined;
  }

  function newHeader(
    ref: CollectionRef,
    extra: { subject?: string; expireSeconds?: number; crypt?: boolean; plain?: boolean },
  ): CollectionHeader {
    return {
      id: collectionUid(ref),
      with: ref.with,
      start: ref.start,
      cid: `${timeKey(ref.start).replace(/[-:.]/g, '')}-${randomBytes(6).toString('hex')}`,
      subject: extra.subject,
      crypt: extra.crypt ?? false,
      plain: extra.plain ?? false,
      // The header outlives its messages by a day: `ensureCovers` pushes it on as they come.
      expiresAt:
        extra.expireSeconds === undefined ? undefined : nowSeconds() + extra.expireSeconds + DAY_SECONDS,
    };
  }

  /** Window end of a change at `at`: the header's change time moves at most once per window. */
  function windowEnd(at: number): number {
    return Math.ceil(at / changeWindowMs) * changeWindowMs;
  }

  /**
   * Puts entries after `last` with consecutive `seq`s, each PutItem conditional on its slot being
   * free; a slot taken by a concurrent append moves the entry after the new last one.
   */
  async function appendEntries(
    owner: string,
    header: CollectionHeader,
    last: Tail | undefined,
    entries: EntryInput[],
    expireSeconds: number | undefined,
  ): Promise<ArchivedEntry[]> {
    const written: ArchivedEntry[] = [];
    let tail = last;
    let pending = entries;
    for (let round = 0; pending.length > 0; round++) {
      if (round > 5) throw new ArchiveConflictError(`appends to ${header.id}`);
      const base = tail ? tail.seq + 1 : 0;
      if (base + pending.length > maxEntries) throw new CollectionTooLargeError(header);
      const expiresAt = expireSeconds === undefined ? undefined : nowSeconds() + expireSeconds;
      const putEntry = (entry: ArchivedEntry) =>
        doc.send(
          new PutCommand({
            TableName: table,
            Item: entryItem(owner, header.cid, entry, expiresAt),
            ConditionExpression: 'attribute_not_exists(sk)',
          }),
        );
      // §5.2: `secs` is "relative to the previous message in the collection": each entry keeps
      // the time of the last message before it (a note's is carried on to the next message).
      let messageAt = tail?.messageAt;
      const planned = pending.map((entry, i): ArchivedEntry => {
        const prevAt = messageAt;
        if (isMessage(entry.kind)) messageAt = entry.at;
        return { ...entry, seq: base + i, id: newArchiveId(entry.at), prevAt };
      });
      const results: PromiseSettledResult<unknown>[] = [];
      // At most 25 requests in flight: a long manual upload must not open hundreds of sockets.
      for (let i = 0; i < planned.length; i += 25) {
        results.push(...(await Promise.allSettled(planned.slice(i, i + 25).map((entry) => putEntry(entry)))));
      }
      const retry: EntryInput[] = [];
      results.forEach((result, i) => {
        const entry = planned[i] as ArchivedEntry;
        if (result.status === 'fulfilled') written.push(entry);
        else if (isConditionFailure(result.reason)) retry.push(pending[i] as EntryInput);
        else throw result.reason;
      });
      pending = retry;
      if (pending.length > 0) {
        const edge = await edgeEntry(owner, header.cid, false);
        tail = edge ? tailOf(edge) : undefined;
      }
    }
    return written;
  }

  /** Positions after `tail` for entries at the given times, and the message time before each. */
  function planAfter(
    header: CollectionHeader,
    tail: Tail | undefined,
    entries: { kind: EntryKind; at: number }[],
  ): { seqs: number[]; prevs: (number | null)[] } {
    const base = tail ? tail.seq + 1 : 0;
    if (base + entries.length > maxEntries) throw new CollectionTooLargeError(header);
    let messageAt = tail?.messageAt;
    const prevs = entries.map((entry) => {
      const prev = messageAt ?? null;
      if (isMessage(entry.kind)) messageAt = entry.at;
      return prev;
    });
    return { seqs: entries.map((_, i) => base + i), prevs };
  }

  async function readPlan(key: { pk: string; sk: string }): Promise<StorePlan | undefined> {
    const { Item } = await doc.send(new GetCommand({ TableName: table, Key: key, ConsistentRead: true }));
    if (!Item) return undefined;
    return {
      seqs: Item.seqs as number[],
      ats: Item.ats as number[],
      prevs: Item.prevs as (number | null)[],
      version: Item.version as number,
    };
  }

  /**
   * A frame's manual store (`frameKey`, core/frame.ts), once: its plan (StorePlan) is written
   * first, PutItem `f#<frame key>` with `attribute_not_exists(sk)`, then its entries, each a
   * PutItem whose slot must be free or hold this frame's entry. A redelivery of the frame
   * (`redelivered`) reads the plan and puts the same entries, with the same times and ids, at the
   * same positions: what the earlier delivery wrote is written again unchanged, what it did not is
   * written now. A slot another writer took moves its entry after the last one, the plan updated
   * before the entry is written (condition: the plan's version).
   */
  async function appendOnce(
    owner: string,
    header: CollectionHeader,
    last: Tail | undefined,
    entries: EntryInput[],
    expireSeconds: number | undefined,
    frame: { key: string; redelivered: boolean },
  ): Promise<ArchivedEntry[]> {
    const planItemKey = { pk: partitionOf(owner, header.cid), sk: `f#${frame.key}` };
    let plan = frame.redelivered ? await readPlan(planItemKey) : undefined;
    if (plan) {
      if (plan.seqs.length !== entries.length) throw new ArchiveConflictError(`store plan ${frame.key}`);
    } else {
      const ats = entries.map((entry) => entry.at);
      const fresh: StorePlan = { ...planAfter(header, last, entries), ats, version: 1 };
      try {
        await doc.send(
          new PutCommand({
            TableName: table,
            Item: {
              ...planItemKey,
              seqs: fresh.seqs,
              ats: fresh.ats,
              prevs: fresh.prevs,
              version: fresh.version,
              [TTL_ATTRIBUTE]: nowSeconds() + PLAN_TTL_SECONDS,
            },
            ConditionExpression: 'attribute_not_exists(sk)',
          }),
        );
        plan = fresh;
      } catch (error) {
        // An earlier delivery planned it (a retry whose receive count did not say so).
        if (!isConditionFailure(error)) throw error;
        plan = await readPlan(planItemKey);
        if (!plan || plan.seqs.length !== entries.length)
          throw new ArchiveConflictError(`store plan ${frame.key}`);
      }
    }
    const current = plan;
    const expiresAt = expireSeconds === undefined ? undefined : nowSeconds() + expireSeconds;
    const archived = (i: number): ArchivedEntry => {
      const entry = entries[i] as EntryInput;
      const at = current.ats[i] as number;
      const prevAt = current.prevs[i];
      return {
        ...entry,
        at,
        seq: current.seqs[i] as number,
        id: frameArchiveId(at, frame.key, i),
        ...(prevAt !== null && prevAt !== undefined ? { prevAt } : {}),
        frameKey: frame.key,
      };
    };
    const putEntry = (entry: ArchivedEntry) =>
      doc.send(
        new PutCommand({
          TableName: table,
          Item: entryItem(owner, header.cid, entry, expiresAt),
          ConditionExpression: 'attribute_not_exists(sk) OR fk = :fk',
          ExpressionAttributeValues: { ':fk': frame.key },
        }),
      );
    let pending = entries.map((_, i) => i);
    for (let round = 0; pending.length > 0; round++) {
      if (round > 5) throw new ArchiveConflictError(`appends to ${header.id}`);
      const results: PromiseSettledResult<unknown>[] = [];
      // At most 25 requests in flight, as appendEntries.
      for (let i = 0; i < pending.length; i += 25) {
        const chunk = pending.slice(i, i + 25);
        results.push(...(await Promise.allSettled(chunk.map((index) => putEntry(archived(index))))));
      }
      const taken: number[] = [];
      results.forEach((result, j) => {
        if (result.status === 'fulfilled') return;
        if (isConditionFailure(result.reason)) taken.push(pending[j] as number);
        else throw result.reason;
      });
      pending = taken;
      if (taken.length === 0) break;
      // Another writer's entries are in those slots: after the last entry, planned before written.
      const edge = await edgeEntry(owner, header.cid, false);
      const moved = planAfter(
        header,
        edge && tailOf(edge),
        taken.map((i) => ({ kind: (entries[i] as EntryInput).kind, at: current.ats[i] as number })),
      );
      const seqs = [...current.seqs];
      const prevs = [...current.prevs];
      taken.forEach((i, j) => {
        seqs[i] = moved.seqs[j] as number;
        prevs[i] = moved.prevs[j] ?? null;
      });
      try {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: planItemKey,
            UpdateExpression: 'SET seqs = :seqs, prevs = :prevs, version = :next',
            ConditionExpression: 'version = :v',
            ExpressionAttributeValues: {
              ':seqs': seqs,
              ':prevs': prevs,
              ':next': current.version + 1,
              ':v': current.version,
            },
          }),
        );
      } catch (error) {
        if (isConditionFailure(error)) throw new ArchiveConflictError(`store plan ${frame.key}`);
        throw error;
      }
      current.seqs = seqs;
      current.prevs = prevs;
      current.version += 1;
    }
    return entries.map((_, i) => archived(i));
  }

  /**
   * Whether the collection `cid` holds the entry written with `frameKey`: its entries newest
   * first (consistent), until one older than `floor` (an entry written before the frame arrived)
   * or FRAME_SEARCH_MAX_ENTRIES were read.
   */
  async function frameEntryIn(owner: string, cid: string, frameKey: string, floor: number): Promise<boolean> {
    let start: Record<string, unknown> | undefined;
    let read = 0;
    do {
      const page = await doc.send(
        new QueryCommand({
          TableName: table,
          KeyConditionExpression: 'pk = :pk AND begins_with(sk, :m)',
          ProjectionExpression: 'fk, #at',
          ExpressionAttributeNames: { '#at': 'at' },
          ExpressionAttributeValues: { ':pk': partitionOf(owner, cid), ':m': 'm#' },
          ScanIndexForward: false,
          ConsistentRead: true,
          Limit: 100,
          ...(start ? { ExclusiveStartKey: start } : {}),
        }),
      );
      for (const item of page.Items ?? []) {
        if (item.fk === frameKey) return true;
        if ((item.at as number) < floor) return false;
      }
      read += page.Items?.length ?? 0;
      start = page.LastEvaluatedKey;
    } while (start && read < FRAME_SEARCH_MAX_ENTRIES);
    return false;
  }

  /** Moves the header's change time (and expiry) forward when an append needs it. */
  async function touchHeader(
    owner: string,
    open: OpenCollection,
    at: number,
    expireSeconds: number | undefined,
  ): Promise<OpenCollection> {
    const changedUntil = windowEnd(at);
    const neededExpiry = expireSeconds === undefined ? undefined : nowSeconds() + expireSeconds;
    const expiresAt = open.header.expiresAt;
    const extend = neededExpiry !== undefined && expiresAt !== undefined && neededExpiry > expiresAt;
    if (changedUntil <= open.changedUntil && !extend) return open;
    const newExpiry = extend ? (neededExpiry as number) + DAY_SECONDS : expiresAt;
    const set = ['changeKey = :ck'];
    const values: Record<string, unknown> = {
      ':ck': changeKeyOf(Math.max(changedUntil, open.changedUntil), randomDigits()),
    };
    if (extend) {
      set.push('#ttl = :exp');
      values[':exp'] = newExpiry;
    }
    try {
      await doc.send(
        new UpdateCommand({
          TableName: table,
          Key: headerKey(owner, open.header),
          UpdateExpression: `SET ${set.join(', ')}`,
          ConditionExpression: 'cid = :cid',
          ExpressionAttributeNames: extend ? { '#ttl': TTL_ATTRIBUTE } : undefined,
          ExpressionAttributeValues: { ...values, ':cid': open.header.cid },
        }),
      );
      await doc.send(
        new UpdateCommand({
          TableName: table,
          Key: pointerKey(owner, open.header.with),
          UpdateExpression: `SET changedUntil = :cu${extend ? ', headerExpiresAt = :exp, #ttl = :exp' : ''}`,
          ConditionExpression: 'cid = :cid',
          ExpressionAttributeNames: extend ? { '#ttl': TTL_ATTRIBUTE } : undefined,
          ExpressionAttributeValues: {
            ':cu': Math.max(changedUntil, open.changedUntil),
            ':cid': open.header.cid,
            ...(extend ? { ':exp': newExpiry } : {}),
          },
        }),
      );
    } catch (error) {
      // The collection was removed or replaced meanwhile: nothing to keep current.
      if (!isConditionFailure(error)) throw error;
    }
    return {
      ...open,
      changedUntil: Math.max(changedUntil, open.changedUntil),
      header: { ...open.header, expiresAt: newExpiry },
    };
  }

  /** Key condition of a header range, on the table or on a `with` index. */
  function headerRange(
    owner: string,
    filter: CollectionFilter,
  ): Omit<QueryCommandInput, 'TableName'> & {
    lo: string;
    hi: string;
    partitionName: string;
    partition: string;
  } {
    const lo = `c#${filter.start === undefined ? '' : timeKey(filter.start)}`;
    // `c#<end>` sorts before every `c#<end>/…`: the end is exclusive, as "prior to that date".
    const hi = filter.end === undefined ? 'c#~' : `c#${timeKey(filter.end)}`;
    const w = filter.with;
    if (!w) return { lo, hi, partitionName: 'pk', partition: owner };
    const indexName =
      w.kind === 'full'
        ? ARCHIVE_WITH_FULL_INDEX
        : w.kind === 'bare'
          ? ARCHIVE_WITH_BARE_INDEX
          : ARCHIVE_WITH_DOMAIN_INDEX;
    const partitionName = w.kind === 'full' ? 'wFull' : w.kind === 'bare' ? 'wBare' : 'wDomain';
    return { IndexName: indexName, lo, hi, partitionName, partition: `${owner}/${w.jid}` };
  }

  function rangeQuery(
    range: ReturnType<typeof headerRange>,
    lo: string,
    hi: string,
    extra: Partial<QueryCommandInput> = {},
  ): QueryCommandInput {
    return {
      TableName: table,
      IndexName: range.IndexName,
      KeyConditionExpression: '#p = :p AND sk BETWEEN :lo AND :hi',
      FilterExpression: notExpired,
      ExpressionAttributeNames: { '#p': range.partitionName, '#ttl': TTL_ATTRIBUTE },
      ExpressionAttributeValues: { ':p': range.partition, ':lo': lo, ':hi': hi, ':now': nowSeconds() },
      // Indexes are eventually consistent; the table's own range is read consistently.
      ConsistentRead: range.IndexName === undefined,
      ...extra,
    };
  }

  /** BatchWriteItem deletes, 25 at a time, unprocessed ones tried again with backoff. */
  async function deleteKeys(keys: { pk: string; sk: string }[]): Promise<void> {
    for (let i = 0; i < keys.length; i += 25) {
      let requests = keys.slice(i, i + 25).map((Key) => ({ DeleteRequest: { Key } }));
      for (let attempt = 0; requests.length > 0; attempt++) {
        if (attempt > 0) await new Promise((resolve) => setTimeout(resolve, 25 * 2 ** attempt));
        if (attempt > 6)
          throw Object.assign(new Error('BatchWriteItem kept items unprocessed'), {
            name: 'ThrottlingException',
          });
        const { UnprocessedItems } = await doc.send(
          new BatchWriteCommand({ RequestItems: { [table]: requests } }),
        );
        requests = (UnprocessedItems?.[table] ?? []) as typeof requests;
      }
    }
  }

  async function purgePartition(
    owner: string,
    cid: string,
    budget: number,
  ): Promise<{ deleted: number; done: boolean }> {
    let deleted = 0;
    for (;;) {
      const page = await doc.send(
        new QueryCommand({
          TableName: table,
          KeyConditionExpression: 'pk = :pk',
          ExpressionAttributeValues: { ':pk': partitionOf(owner, cid) },
          ProjectionExpression: 'pk, sk',
          Limit: Math.min(100, budget - deleted),
        }),
      );
      const keys = (page.Items ?? []) as { pk: string; sk: string }[];
      await deleteKeys(keys);
      deleted += keys.length;
      if (!page.LastEvaluatedKey) return { deleted, done: true };
      if (deleted >= budget) return { deleted, done: false };
    }
  }

  /** Removes one collection: header → tombstone (one transaction), pointer, then its items. */
  async function removeOne(owner: string, header: CollectionHeader, budget: number): Promise<number> {
    const removedAt = now();
    try {
      await doc.send(
        new TransactWriteCommand({
          TransactItems: [
            {
              Delete: {
                TableName: table,
                Key: headerKey(owner, header),
                ConditionExpression: 'cid = :cid',
                ExpressionAttributeValues: { ':cid': header.cid },
              },
            },
            {
              Put: {
                TableName: table,
                Item: {
                  pk: owner,
                  sk: `r#${collectionUid(header)}`,
                  with: header.with,
                  start: header.start,
                  changeOwner: owner,
                  changeKey: changeKeyOf(removedAt, randomDigits()),
                  [TTL_ATTRIBUTE]: Math.floor(removedAt / 1000) + tombstoneSeconds,
                },
              },
            },
          ],
        }),
      );
    } catch (error) {
      if (error instanceof TransactionCanceledException) return -1;
      throw error;
    }
    await dropPointer(owner, header.with, header.cid);
    const { deleted, done } = await purgePartition(owner, header.cid, budget);
    if (!done) {
      await doc.send(
        new PutCommand({
          TableName: table,
          Item: {
            pk: PURGE_PARTITION,
            sk: `${timeKey(removedAt)}/${owner}/${header.cid}`,
            owner,
            cid: header.cid,
          },
        }),
      );
    }
    return deleted;
  }

  /** Deletes the open-collection pointer for `withJid` if it still points at collection `cid`. */
  async function dropPointer(owner: string, withJid: string, cid: string): Promise<void> {
    try {
      await doc.send(
        new DeleteCommand({
          TableName: table,
          Key: pointerKey(owner, withJid),
          ConditionExpression: 'cid = :cid',
          ExpressionAttributeValues: { ':cid': cid },
        }),
      );
    } catch (error) {
      if (!isConditionFailure(error)) throw error;
    }
  }

  async function openPointers(owner: string): Promise<Record<string, unknown>[]> {
    const { items } = await queryItems(
      {
        TableName: table,
        KeyConditionExpression: 'pk = :pk AND begins_with(sk, :o)',
        ExpressionAttributeValues: { ':pk': owner, ':o': 'open#' },
        ConsistentRead: true,
      },
      10_000,
    );
    return items;
  }

  return {
    /** The collection being recorded with `withJid`: GetItem on the pointer + Query Limit 1 (consistent). */
    async findOpenCollection(owner: string, withJid: string): Promise<OpenCollection | undefined> {
      const { Item } = await doc.send(
        new GetCommand({ TableName: table, Key: pointerKey(owner, withJid), ConsistentRead: true }),
      );
      if (!Item) return undefined;
      const header: CollectionHeader = {
        id: collectionUid({ with: withJid, start: Item.start as number }),
        with: withJid,
        start: Item.start as number,
        cid: Item.cid as string,
        subject: Item.subject as string | undefined,
        crypt: false,
        plain: true,
        expiresAt: Item.headerExpiresAt as number | undefined,
      };
      const last = await edgeEntry(owner, header.cid, false);
      const expire = Item.expire as number | undefined;
      return {
        header,
        thread: Item.thread as string | undefined,
        last: last && tailOf(last),
        changedUntil: Item.changedUntil as number,
        expireSeconds:
          expire === undefined
            ? header.expiresAt === undefined
              ? undefined
              : 'unknown'
            : expire || undefined,
      };
    },

    /**
     * Starts a collection for automatic archiving and makes it the open one for its `with`:
     * TransactWriteItems (header, condition new; pointer, condition "still `previous`"). Losing
     * a race to another writer returns the winner's collection.
     */
    async startCollection(
      owner: string,
      start: { with: string; start: number; thread?: string; subject?: string; expireSeconds?: number },
      previous?: OpenCollection,
    ): Promise<OpenCollection> {
      const header = newHeader(start, { ...start, plain: true });
      const createdAt = now();
      try {
        await doc.send(
          new TransactWriteCommand({
            TransactItems: [
              {
                Put: {
                  TableName: table,
                  Item: headerItem(owner, header, changeKeyOf(createdAt, randomDigits())),
                  ConditionExpression: 'attribute_not_exists(sk)',
                },
              },
              {
                Put: {
                  TableName: table,
                  Item: {
                    ...pointerKey(owner, start.with),
                    start: start.start,
                    cid: header.cid,
                    thread: start.thread,
                    subject: start.subject,
                    changedUntil: createdAt,
                    headerExpiresAt: header.expiresAt,
                    // 0: kept for ever.
                    expire: start.expireSeconds ?? 0,
                    [TTL_ATTRIBUTE]: header.expiresAt,
                  },
                  ConditionExpression: previous ? 'cid = :previous' : 'attribute_not_exists(sk)',
                  ExpressionAttributeValues: previous ? { ':previous': previous.header.cid } : undefined,
                },
              },
            ],
          }),
        );
      } catch (error) {
        if (!(error instanceof TransactionCanceledException)) throw error;
        const winner = await this.findOpenCollection(owner, start.with);
        // The pointer read was dropped meanwhile (a <remove/> took its collection, or found its
        // conversation quiet): start without one, once.
        if (!winner && previous) return this.startCollection(owner, start);
        if (!winner || winner.header.cid === previous?.header.cid)
          throw new ArchiveConflictError(`start with ${start.with}`);
        return winner;
      }
      return {
        header,
        thread: start.thread,
        changedUntil: createdAt,
        ...(start.expireSeconds !== undefined ? { expireSeconds: start.expireSeconds } : {}),
      };
    },

    /**
     * Appends one message to an open collection: one conditional PutItem (1 write unit per KB),
     * plus the header's bookkeeping once per change window. Returns the entry and the collection
     * as it is now (pass it to the next append of the same stream to save the reads).
     */
    async appendMessage(
      owner: string,
      open: OpenCollection,
      entry: EntryInput,
      options: { expireSeconds?: number } = {},
    ): Promise<{ entry: ArchivedEntry; open: OpenCollection }> {
      const [written] = await appendEntries(owner, open.header, open.last, [entry], options.expireSeconds);
      const archived = written as ArchivedEntry;
      const touched = await touchHeader(owner, open, entry.at, options.expireSeconds);
      return { entry: archived, open: { ...touched, last: tailOf(archived) } };
    },

    /**
     * Whether an earlier delivery of the current frame archived its entry with `withJid` for
     * `owner` (EntryInput.frameKey `key`; `since`: when the frame reached the server). Read
     * only for a redelivered frame, never on a message's first delivery. The open collection's
     * last entry (read with it, `open`) answers most; otherwise the collections the entry can be
     * in, each newest entry first back to FRAME_SEARCH_MARGIN_MS before `since`: the open one, the
     * ones open with the contact's other resources (the sender's copy names the session that
     * took it), the contact's collections begun since then (a new thread started one meanwhile),
     * and, for each of their full JIDs, the one begun before them.
     */
    async archivedByFrame(
      owner: string,
      written: { with: string; key: string; since: number },
      open?: OpenCollection,
    ): Promise<boolean> {
      if (open?.last?.frameKey === written.key) return true;
      const floor = written.since - FRAME_SEARCH_MARGIN_MS;
      const searched = new Set<string>();
      const holds = async (cid: string): Promise<boolean> => {
        if (searched.has(cid)) return false;
        searched.add(cid);
        return frameEntryIn(owner, cid, written.key, floor);
      };
      if (open && (await holds(open.header.cid))) return true;
      const { bare } = withParts(written.with);
      const ofContact = (jid: string) => jid === bare || jid.startsWith(`${bare}/`);
      const pointers = await queryItems(
        {
          TableName: table,
          KeyConditionExpression: 'pk = :pk AND begins_with(sk, :o)',
          ExpressionAttributeValues: { ':pk': owner, ':o': `open#${bare}` },
          ConsistentRead: true,
        },
        100,
      );
      for (const pointer of pointers.items) {
        if (ofContact((pointer.sk as string).slice(5)) && (await holds(pointer.cid as string))) return true;
      }
      const floorKey = `c#${timeKey(floor)}`;
      const recent = await queryItems(
        rangeQuery(headerRange(owner, { with: { kind: 'bare', jid: bare } }), floorKey, 'c#~'),
        50,
      );
      for (const item of recent.items) if (await holds(item.cid as string)) return true;
      for (const withJid of new Set(recent.items.map((item) => item.with as string))) {
        const before = await queryItems(
          rangeQuery(headerRange(owner, { with: { kind: 'full', jid: withJid } }), 'c#', floorKey, {
            ScanIndexForward: false,
          }),
          1,
        );
        const previous = before.items[0];
        if (previous && (await holds(previous.cid as string))) return true;
      }
      return false;
    },

    /** XEP-0136 §7.1: "If the client switches off all auto-archiving then the server MUST close … all active collections." */
    async closeOpenCollections(owner: string, withJid?: string): Promise<number> {
      const pointers = withJid
        ? [pointerKey(owner, withJid)]
        : (await openPointers(owner)).map((p) => ({ pk: owner, sk: p.sk as string }));
      for (const Key of pointers) await doc.send(new DeleteCommand({ TableName: table, Key }));
      return pointers.length;
    },

    /** A collection's header and last entry: GetItem + Query Limit 1, both consistent. */
    async getCollection(
      owner: string,
      ref: CollectionRef,
    ): Promise<{ header: CollectionHeader; last?: Tail } | undefined> {
      const header = await getHeader(owner, ref);
      if (!header) return undefined;
      const last = await edgeEntry(owner, header.cid, false);
      return { header, last: last && tailOf(last) };
    },

    /**
     * XEP-0136 §5.3 manual archiving: creates the collection if it does not exist (condition
     * new), updates its subject and content kind when they change, appends the entries (one
     * conditional PutItem each; in a frame, after one PutItem of their plan: appendOnce) and puts
     * the EncryptedKeys (one PutItem each).
     */
    async storeManual(
      owner: string,
      input: {
        ref: CollectionRef;
        subject?: string;
        entries: EntryInput[];
        keys?: EncryptedKeyInput[];
        expireSeconds?: number;
      },
      existing?: { header: CollectionHeader; last?: Tail },
      /**
       * The frame storing it (core/frame.ts: its delivery key, and whether an earlier delivery
       * may have stored it): its entries are written once (appendOnce), as planned by the first.
       */
      options: { frame?: { key: string; redelivered: boolean } } = {},
    ): Promise<{ header: CollectionHeader; created: boolean; entries: ArchivedEntry[] }> {
      const crypt = input.entries.some((e) => e.kind === 'data') || (input.keys?.length ?? 0) > 0;
      const plain = input.entries.some((e) => e.kind !== 'data');
      let state = existing;
      let created = false;
      if (!state) {
        const header = newHeader(input.ref, { ...input, crypt, plain });
        try {
          await doc.send(
            new PutCommand({
              TableName: table,
              Item: headerItem(owner, header, changeKeyOf(now(), randomDigits())),
              ConditionExpression: 'attribute_not_exists(sk)',
            }),
          );
          state = { header };
          created = true;
        } catch (error) {
          if (!isConditionFailure(error)) throw error;
          state = await this.getCollection(owner, input.ref);
          if (!state) throw new ArchiveConflictError(`create ${collectionUid(input.ref)}`);
        }
      }
      let header = state.header;
      const changes: string[] = [];
      const values: Record<string, unknown> = {};
      if (!created && input.subject !== undefined && input.subject !== header.subject) {
        changes.push('subject = :subject');
        values[':subject'] = input.subject;
      }
      if (!created && crypt && !header.crypt) changes.push('crypt = :true');
      if (!created && plain && !header.plain) changes.push('plain = :true');
      if (changes.includes('crypt = :true') || changes.includes('plain = :true')) values[':true'] = true;
      const neededExpiry = input.expireSeconds === undefined ? undefined : nowSeconds() + input.expireSeconds;
      if (
        !created &&
        neededExpiry !== undefined &&
        header.expiresAt !== undefined &&
        neededExpiry > header.expiresAt
      ) {
        changes.push('#ttl = :exp');
        values[':exp'] = neededExpiry + DAY_SECONDS;
        // §6: a client "SHOULD NOT resend <EncryptedKey/> elements" for a key it uploaded before,
        // so the keys stored with earlier entries must live as long as the entries that now use
        // them: they follow the header's expiry (an encrypted collection holds a few keys). Before
        // the header's write: a retry after a failure here still finds the header to extend.
        if (header.crypt) await extendKeys(owner, header, values[':exp'] as number);
      }
      // §3.2: entries kept for ever in a collection that expires (a manual store after the user's
      // preference changed): the collection is kept too, else its expiry would remove them with
      // it. Its earlier entries still expire (their own TTL), reported by the sweep as changes.
      // Its keys are kept with it, and automatic archiving records no more into it (its pointer
      // knows the old expiry): the next message starts a new collection.
      const keepForever =
        !created && input.entries.length > 0 && neededExpiry === undefined && header.expiresAt !== undefined;
      if (keepForever) {
        if (header.crypt) await extendKeys(owner, header, undefined);
        await dropPointer(owner, header.with, header.cid);
      }
      const expiringInForever =
        !created && input.entries.length > 0 && neededExpiry !== undefined && header.expiresAt === undefined;
      if (
        !created &&
        (changes.length > 0 || keepForever || input.entries.length > 0 || (input.keys?.length ?? 0) > 0)
      ) {
        changes.push('changeKey = :ck');
        // Never backwards: automatic appends set the end of their change window, which may be
        // ahead of now; a key moved back would hide the window's later appends from <modified/>.
        const nowKey = changeKeyOf(now(), randomDigits());
        values[':ck'] =
          header.changeKey !== undefined && header.changeKey > nowKey ? header.changeKey : nowKey;
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: headerKey(owner, header),
            UpdateExpression: `SET ${changes.join(', ')}${keepForever ? ' REMOVE #ttl' : ''}`,
            ConditionExpression: 'cid = :cid',
            ExpressionAttributeNames:
              changes.includes('#ttl = :exp') || keepForever ? { '#ttl': TTL_ATTRIBUTE } : undefined,
            ExpressionAttributeValues: { ...values, ':cid': header.cid },
          }),
        );
        header = {
          ...header,
          subject: input.subject ?? header.subject,
          crypt: header.crypt || crypt,
          plain: header.plain || plain,
          expiresAt: keepForever ? undefined : ((values[':exp'] as number | undefined) ?? header.expiresAt),
        };
      }
      if (expiringInForever) await expireNoLaterThan(owner, header, neededExpiry as number);
      const entries = options.frame
        ? await appendOnce(owner, header, state.last, input.entries, input.expireSeconds, options.frame)
        : await appendEntries(owner, header, state.last, input.entries, input.expireSeconds);
      for (const key of input.keys ?? []) {
        await doc.send(
          new PutCommand({
            TableName: table,
            Item: {
              pk: partitionOf(owner, header.cid),
              sk: keySk(key.carriedKeyName, key.publicKeyName),
              keyOwner: `${owner}/${key.publicKeyName}`,
              // Collection order, then the symmetric key (escaped, so the last `#` splits).
              keyRef: `${collectionUid(header)}#${encodeURIComponent(key.carriedKeyName)}`,
              with: header.with,
              start: header.start,
              carried: key.carriedKeyName,
              public: key.publicKeyName,
              xml: key.xml,
              [TTL_ATTRIBUTE]: header.expiresAt,
            },
          }),
        );
      }
      return { header, created, entries };
    },

    /**
     * XEP-0136 §8.1 list, in chronological order. One Query on the owner's headers (no `with`) or
     * on the `with` index of the filter's kind, key-bounded by start/end and the RSM cursor, with
     * Limit: page k reads what page 1 reads. `count` is a second Query with `Select: COUNT` over
     * the whole filtered range, eventually consistent (the same for every page: 0.5 read unit per
     * 4 KB of headers, a header being ~350 B: ~14 units for 300 collections, ~440 for 10,000).
     */
    async listCollections(
      owner: string,
      filter: CollectionFilter,
      page: PageRequest,
    ): Promise<Page<CollectionHeader>> {
      const range = headerRange(owner, filter);
      // A `start` after the `end`: nothing matches (§8.1: an empty <list/>), and DynamoDB
      // refuses a BETWEEN whose bounds are reversed.
      if (range.lo > range.hi) return { items: [], count: 0 };
      let lo = range.lo;
      let hi = range.hi;
      const backwards = page.before !== undefined || page.lastPage === true;
      if (page.after !== undefined) {
        const key = `c#${page.after}`;
        if (key > lo) lo = key;
      }
      if (page.before !== undefined) {
        const key = `c#${page.before}`;
        if (key < hi) hi = key;
      }
      const skip = new Set([`c#${page.after}`, `c#${page.before}`]);
      let skips = page.after !== undefined || page.before !== undefined ? 1 : 0;
      if (page.index !== undefined && page.index > 0 && !backwards) {
        // XEP-0059 §2.6 page jumping: the `index` headers before the page are read (eventually
        // consistent, 0.5 unit per 4 KB: ~45 units per 1,000 skipped headers), never returned.
        const skipped = await queryItems(
          rangeQuery(range, lo, hi, { ConsistentRead: false, ProjectionExpression: 'sk' }),
          page.index,
        );
        const lastSkipped = skipped.items.at(-1)?.sk as string | undefined;
        if (skipped.items.length < page.index || lastSkipped === undefined) lo = 'c#~';
        else {
          lo = lastSkipped;
          skip.add(lastSkipped);
          skips = 1;
        }
      }
      // A page after or before a cursor inside the range: the count is taken in two parts, up to
      // the cursor and from it (the same headers read, the same units), and the part up to it is
      // the page's position (XEP-0059 §2.3: "The <first/> element SHOULD include an 'index'
      // attribute"). Both parts hold the cursor's header if it is still there, which the page's
      // own Query reads first and skips.
      const cursor = page.index ? undefined : (page.after ?? (page.lastPage ? undefined : page.before));
      const cursorKey = cursor === undefined ? undefined : `c#${cursor}`;
      const split = cursorKey !== undefined && page.max > 0 && cursorKey >= range.lo && cursorKey <= range.hi;
      // XEP-0059 §2.6 lets a count be approximate: eventually consistent, half the units.
      const countOf = (from: string, to: string) =>
        countQuery(rangeQuery(range, from, to, { ConsistentRead: false }));
      const [listed, counted] = await Promise.all([
        lo > hi
          ? { items: [], more: false, skipped: [] }
          : queryItems(
              rangeQuery(range, lo, hi, { ScanIndexForward: !backwards }),
              page.max,
              (item) => !skip.has(item.sk as string),
              skips,
            ),
        split
          ? Promise.all([countOf(range.lo, cursorKey), countOf(cursorKey, range.hi)])
          : countOf(range.lo, range.hi).then((all) => [all, 0] as const),
      ]);
      const headers = listed.items.map(toHeader);
      if (backwards) headers.reverse();
      const atCursor = split && listed.skipped.some((item) => item.sk === cursorKey) ? 1 : 0;
      // Headers before the cursor (not counting it).
      const beforeCursor = counted[0] - atCursor;
      const count = counted[0] + counted[1] - atCursor;
      let firstIndex: number | undefined;
      if (page.lastPage) firstIndex = Math.max(0, count - headers.length);
      else if (page.index !== undefined && !backwards) firstIndex = page.index;
      else if (split) firstIndex = backwards ? Math.max(0, beforeCursor - headers.length) : counted[0];
      else if (cursorKey !== undefined && cursorKey < range.lo) firstIndex = backwards ? undefined : 0;
      else if (cursorKey !== undefined)
        firstIndex = backwards ? Math.max(0, count - headers.length) : undefined;
      else if (!backwards) firstIndex = 0;
      return { items: headers, count, firstIndex, first: headers[0]?.id, last: headers.at(-1)?.id };
    },

    /**
     * XEP-0136 §8.2 retrieve: GetItem on the header, then one Query on the collection's partition
     * keyed by `seq` (after/before/index are key conditions, so page k reads what page 1 reads).
     * `count` is derived from the first and last live entries (two Query Limit 1), never counted.
     * Undefined when the collection does not exist.
     */
    async retrieveMessages(
      owner: string,
      ref: CollectionRef,
      page: PageRequest,
      /**
       * XEP-0136 0.5's continuation of a partial collection: only entries at or after this time
       * (`count` is then the entries from the first returned one to the collection's end).
       */
      options: { atOrAfter?: number } = {},
    ): Promise<(Page<ArchivedEntry> & { header: CollectionHeader }) | undefined> {
      const header = await getHeader(owner, ref);
      if (!header) return undefined;
      const pk = partitionOf(owner, header.cid);
      const [firstEntry, lastEntry] = await Promise.all([
        edgeEntry(owner, header.cid, true),
        edgeEntry(owner, header.cid, false),
      ]);
      if (!firstEntry || !lastEntry) return { header, items: [], count: 0 };
      const count = lastEntry.seq - firstEntry.seq + 1;
      const seqOf = (uid: string | undefined) =>
        uid !== undefined && /^\d{1,10}$/.test(uid) ? Number(uid) : undefined;
      const backwards = page.before !== undefined || page.lastPage === true;
      let lo = seqKey(firstEntry.seq);
      let hi = seqKey(lastEntry.seq);
      if (page.index !== undefined) lo = seqKey(firstEntry.seq + page.index);
      const after = seqOf(page.after);
      const before = seqOf(page.before);
      // A UID this store never gave out matches nothing (XEP-0059 §2.5 item-not-found is the caller's).
      if (
        (page.after !== undefined && after === undefined) ||
        (page.before !== undefined && before === undefined)
      ) {
        return { header, items: [], count };
      }
      if (after !== undefined) lo = seqKey(Math.max(after + 1, firstEntry.seq));
      if (before !== undefined) hi = seqKey(Math.min(before - 1, lastEntry.seq));
      if (before !== undefined && before - 1 < firstEntry.seq) return { header, items: [], count };
      const { items } =
        lo > hi
          ? { items: [] }
          : await queryItems(
              {
                TableName: table,
                KeyConditionExpression: 'pk = :pk AND sk BETWEEN :lo AND :hi',
                FilterExpression:
                  options.atOrAfter === undefined ? notExpired : `${notExpired} AND #at >= :from`,
                ExpressionAttributeNames: {
                  '#ttl': TTL_ATTRIBUTE,
                  ...(options.atOrAfter === undefined ? {} : { '#at': 'at' }),
                },
                ExpressionAttributeValues: {
                  ':pk': pk,
                  ':lo': lo,
                  ':hi': hi,
                  ':now': nowSeconds(),
                  ...(options.atOrAfter === undefined ? {} : { ':from': options.atOrAfter }),
                },
                ScanIndexForward: !backwards,
                ConsistentRead: true,
              },
              page.max,
              () => true,
              0,
              RETRIEVE_READ_BYTES,
            );
      // §5.2: the first message's `secs` is "relative to the start of the collection". Once the
      // messages before it expired, the first one left is that first message: its time is told
      // from the start, not from a message the client can no longer retrieve. (A note or
      // EncryptedData left first carries that time on to the message after it: found by one more
      // Query, only then.)
      const firstMessage =
        firstEntry.prevAt === undefined
          ? undefined
          : isMessage(firstEntry.kind)
            ? firstEntry.seq
            : await firstMessageFrom(owner, header.cid, firstEntry.seq);
      const entries = items
        .map(toEntry)
        .map((entry) =>
          entry.seq === firstMessage && entry.prevAt !== undefined ? { ...entry, prevAt: undefined } : entry,
        );
      if (backwards) entries.reverse();
      const first = entries[0];
      return {
        header,
        items: entries,
        count: options.atOrAfter === undefined ? count : first ? lastEntry.seq - first.seq + 1 : 0,
        firstIndex: first ? first.seq - firstEntry.seq : undefined,
        first: first ? String(first.seq) : undefined,
        last: entries.length > 0 ? String(entries.at(-1)?.seq) : undefined,
      };
    },

    /**
     * XEP-0136 §8.3 remove. Exactly one collection (full `with` and `start`, no `end`): GetItem.
     * Several: the same key-bounded Queries as `list`, or the owner's open pointers (`open`).
     * At most `maxCollections` per call; each becomes a tombstone at once (so it disappears from
     * lists and shows in `<modified/>`), and its items are deleted with BatchWriteItem up to the
     * call's budget; a larger remainder is queued (`#purge`) for `purgePending`.
     */
    async removeCollections(
      owner: string,
      filter: CollectionFilter & { exact?: boolean; open?: boolean; openWithinMs?: number },
      limits: {
        maxCollections?: number;
        /** Called once before the first collection is removed (none found: never). */
        beforeRemoving?: () => Promise<void>;
      } = {},
    ): Promise<{ removed: CollectionRef[]; more: boolean; queuedPurges: number }> {
      const maxCollections = limits.maxCollections ?? 1000;
      let headers: CollectionHeader[] = [];
      let more = false;
      if (filter.open) {
        const pointers = await openPointers(owner);
        const wanted = pointers.filter((p) => {
          const jid = (p.sk as string).slice(5);
          if (!filter.with) return true;
          const parts = withParts(jid);
          return parts[filter.with.kind] === filter.with.jid;
        });
        // Each pointer looked at goes, whatever it is: with its collection when that is being
        // recorded, alone when it is not (its header is gone, or its conversation went quiet:
        // the next message would start a new collection anyway, as it does without a pointer).
        // So the next call looks at the next ones, and a caller calling while `more` finishes.
        for (const pointer of wanted.slice(0, maxCollections)) {
          const withJid = (pointer.sk as string).slice(5);
          const header = await getHeader(owner, { with: withJid, start: pointer.start as number });
          if (!header || header.cid !== pointer.cid) {
            await dropPointer(owner, withJid, pointer.cid as string);
            continue;
          }
          // Still being recorded: its next message would join it (the idle gap has not passed).
          if (filter.openWithinMs !== undefined) {
            const last = await edgeEntry(owner, header.cid, false);
            if (now() - (last?.at ?? header.start) > filter.openWithinMs) {
              await dropPointer(owner, withJid, header.cid);
              continue;
            }
          }
          headers.push(header);
        }
        more = wanted.length > maxCollections;
      } else if (filter.exact && filter.with && filter.start !== undefined) {
        const header = await getHeader(owner, { with: filter.with.jid, start: filter.start });
        if (header) headers = [header];
      } else {
        const range = headerRange(owner, filter);
        // A `start` after the `end` matches nothing (the module answers item-not-found).
        const listed =
          range.lo > range.hi
            ? { items: [], more: false }
            : await queryItems(rangeQuery(range, range.lo, range.hi), maxCollections);
        headers = listed.items.map(toHeader);
        more = listed.more;
      }
      const removed: CollectionRef[] = [];
      let budget = purgeBudget;
      let queuedPurges = 0;
      if (headers.length > 0) await limits.beforeRemoving?.();
      for (const header of headers) {
        const deleted = await removeOne(owner, header, Math.max(budget, 1));
        if (deleted < 0) continue;
        removed.push({ with: header.with, start: header.start });
        budget -= deleted;
        if (budget <= 0) queuedPurges += 1;
      }
      return { removed, more, queuedPurges };
    },

    /**
     * Everything `owner` archived, gone (an account's deletion): each collection's partition
     * (messages, notes, keys), then the owner's own items (headers, open pointers, tombstones,
     * preferences), with no tombstone left behind. Returns the collections deleted.
     */
    // An operator's command (`npm run user`), folded out of the functions' bundles (`adminOnly`).
    deleteOwner:
      process.env.NIMBUS_ADMIN === 'false'
        ? adminOnly
        : async (owner: string): Promise<number> => {
            let collections = 0;
            for (;;) {
              const page = await doc.send(
                new QueryCommand({
                  TableName: table,
                  KeyConditionExpression: 'pk = :pk',
                  ExpressionAttributeValues: { ':pk': owner },
                  ProjectionExpression: 'pk, sk, cid',
                  ConsistentRead: true,
                  Limit: 100,
                }),
              );
              const items = page.Items ?? [];
              if (items.length === 0) return collections;
              for (const item of items) {
                if (typeof item.cid !== 'string') continue;
                while (!(await purgePartition(owner, item.cid, 5000)).done);
                if ((item.sk as string).startsWith('c#')) collections += 1;
              }
              await deleteKeys(items.map((item) => ({ pk: item.pk as string, sk: item.sk as string })));
            }
          },

    /**
     * Records what expired (the sweeper, every minute), so that `<modified/>` (0.9 §10) reports
     * it: a collection whose header's TTL passed is removed as a `<remove/>` would remove it
     * (tombstone, purge); one whose earlier messages expired is marked changed now, and waits for
     * its next message's expiry (at least EXPIRY_BATCH_SECONDS on) or, with none left, for the
     * header's. One Query per shard on `byExpiry`, up to `limit` collections each.
     */
    // The sweeper's only (as the purge below): folded out of the other functions' bundles.
    sweepExpiring:
      process.env.NIMBUS_SWEEPS === 'false'
        ? sweeperOnly
        : async (limit = 25, step: SweepStep = {}): Promise<{ changed: number; removed: number }> => {
            const nowSec = nowSeconds();
            let changed = 0;
            let removed = 0;
            for (let shard = 0; shard < EXPIRY_SHARDS; shard++) {
              // Per shard up to `limit` collections handled; a page with failures (reported, tried
              // again next run) is followed by the next one, so failing collections at the head of a
              // shard never hide the rest; 5 failures in a row leave the shard for this run.
              let startKey: Record<string, unknown> | undefined;
              let handled = 0;
              let inARow = 0;
              let failedOnPage = false;
              do {
                // Out of time: not even the next Query.
                if (step.hasTime?.() === false) return { changed, removed };
                failedOnPage = false;
                const page = await doc.send(
                  new QueryCommand({
                    TableName: table,
                    IndexName: ARCHIVE_EXPIRY_INDEX,
                    KeyConditionExpression: 'expShard = :shard AND nextExpiry <= :now',
                    ExpressionAttributeValues: { ':shard': `x${shard}`, ':now': nowSec },
                    Limit: limit,
                    ExclusiveStartKey: startKey,
                  }),
                );
                startKey = page.LastEvaluatedKey;
                for (const item of page.Items ?? []) {
                  if (step.hasTime?.() === false) return { changed, removed };
                  const ok = await sweepOne(item);
                  if (ok) {
                    handled += 1;
                    inARow = 0;
                  } else {
                    failedOnPage = true;
                    inARow += 1;
                    if (inARow >= 5) break;
                  }
                }
              } while (startKey && failedOnPage && inARow < 5 && handled < limit);
            }
            return { changed, removed };

            /** One collection whose expiry is due: false when it failed (reported through onError). */
            async function sweepOne(item: Record<string, unknown>): Promise<boolean> {
              const owner = item.pk as string;
              const cid = item.cid as string;
              const expiresAt = item[TTL_ATTRIBUTE] as number | undefined;
              // Each collection on its own: one that fails is reported and tried again next run.
              try {
                if (expiresAt !== undefined && expiresAt <= nowSec) {
                  const { Item } = await doc.send(
                    new GetCommand({
                      TableName: table,
                      Key: { pk: owner, sk: item.sk },
                      ConsistentRead: true,
                    }),
                  );
                  // The index is eventually consistent: an append may have pushed the TTL on since.
                  const ttl = Item?.[TTL_ATTRIBUTE] as number | undefined;
                  if (
                    Item?.cid === cid &&
                    ttl !== undefined &&
                    ttl <= nowSec &&
                    (await removeOne(owner, toHeader(Item), 100)) >= 0
                  )
                    removed += 1;
                  return true;
                }
                const next = (await nextMessageExpiry(owner, cid, nowSec)) ?? expiresAt;
                // Never backwards (see storeManual): an append's key may be ahead of now.
                const seenKey = item.changeKey as string;
                const nowKey = changeKeyOf(now(), randomDigits());
                try {
                  await doc.send(
                    new UpdateCommand({
                      TableName: table,
                      Key: { pk: owner, sk: item.sk },
                      UpdateExpression:
                        next === undefined
                          ? 'SET changeKey = :ck REMOVE nextExpiry, expShard'
                          : 'SET changeKey = :ck, nextExpiry = :next',
                      // An append meanwhile moved the key itself: the collection is reported changed.
                      ConditionExpression: 'cid = :cid AND nextExpiry <= :now AND changeKey = :seen',
                      ExpressionAttributeValues: {
                        ':ck': seenKey > nowKey ? seenKey : nowKey,
                        ':seen': seenKey,
                        ':cid': cid,
                        ':now': nowSec,
                        ...(next === undefined
                          ? {}
                          : { ':next': Math.max(next, nowSec + EXPIRY_BATCH_SECONDS) }),
                      },
                    }),
                  );
                  changed += 1;
                } catch (error) {
                  if (!isConditionFailure(error)) throw error;
                }
                return true;
              } catch (error) {
                if (!step.onError) throw error;
                step.onError(error, { owner, cid });
                return false;
              }
            }
          },

    /** Continues queued purges (the sweeper): Query `#purge`, BatchWriteItem deletes up to `budget` items. */
    purgePending:
      process.env.NIMBUS_SWEEPS === 'false'
        ? sweeperOnly
        : async (budget = 5000, step: SweepStep = {}): Promise<number> => {
            const { Items } = await doc.send(
              new QueryCommand({
                TableName: table,
                KeyConditionExpression: 'pk = :p',
                ExpressionAttributeValues: { ':p': PURGE_PARTITION },
                Limit: 25,
              }),
            );
            let deleted = 0;
            for (const job of Items ?? []) {
              if (deleted >= budget || step.hasTime?.() === false) break;
              try {
                const result = await purgePartition(job.owner as string, job.cid as string, budget - deleted);
                deleted += result.deleted;
                if (result.done)
                  await doc.send(
                    new DeleteCommand({ TableName: table, Key: { pk: PURGE_PARTITION, sk: job.sk } }),
                  );
              } catch (error) {
                if (!step.onError) throw error;
                step.onError(error, { owner: job.owner, cid: job.cid });
              }
            }
            return deleted;
          },

    /**
     * XEP-0136 §9 `<keys/>`: EncryptedKeys encrypted with one public key, across collections in
     * collection order. One Query on `byKeyName` (keyset on `keyRef`), one COUNT Query for `count`.
     */
    async listKeys(
      owner: string,
      publicKeyName: string,
      page: PageRequest,
    ): Promise<Page<StoredEncryptedKey>> {
      const input = (lo: string | undefined, extra: Partial<QueryCommandInput> = {}): QueryCommandInput => ({
        TableName: table,
        IndexName: ARCHIVE_KEY_NAME_INDEX,
        KeyConditionExpression: lo === undefined ? 'keyOwner = :o' : 'keyOwner = :o AND keyRef > :lo',
        ExpressionAttributeValues: {
          ':o': `${owner}/${publicKeyName}`,
          ...(lo === undefined ? {} : { ':lo': lo }),
        },
        ...extra,
      });
      const backwards = page.before !== undefined || page.lastPage === true;
      const query: QueryCommandInput = backwards
        ? {
            TableName: table,
            IndexName: ARCHIVE_KEY_NAME_INDEX,
            KeyConditionExpression: page.before ? 'keyOwner = :o AND keyRef < :hi' : 'keyOwner = :o',
            ExpressionAttributeValues: {
              ':o': `${owner}/${publicKeyName}`,
              ...(page.before ? { ':hi': page.before } : {}),
            },
            ScanIndexForward: false,
          }
        : input(page.after);
      const [listed, count] = await Promise.all([queryItems(query, page.max), countQuery(input(undefined))]);
      if (backwards) listed.items.reverse();
      const keys = listed.items.map(
        (item): StoredEncryptedKey => ({
          carriedKeyName: decodeURIComponent(
            (item.keyRef as string).slice((item.keyRef as string).lastIndexOf('#') + 1),
          ),
          publicKeyName,
          xml: item.xml as string,
          collection: { with: item.with as string, start: item.start as number },
          ref: item.keyRef as string,
        }),
      );
      // XEP-0059 §2.2: "The <first/> element SHOULD include an 'index' attribute"; past the
      // first and last pages it is the count of the keys before the page's first (a COUNT Query).
      let firstIndex: number | undefined;
      const firstRef = listed.items[0]?.keyRef as string | undefined;
      if (page.lastPage) firstIndex = Math.max(0, count - keys.length);
      else if (!backwards && page.after === undefined) firstIndex = 0;
      else if (firstRef !== undefined) {
        firstIndex = await countQuery({
          TableName: table,
          IndexName: ARCHIVE_KEY_NAME_INDEX,
          KeyConditionExpression: 'keyOwner = :o AND keyRef < :first',
          ExpressionAttributeValues: { ':o': `${owner}/${publicKeyName}`, ':first': firstRef },
        });
      }
      return {
        items: keys,
        count,
        firstIndex,
        first: listed.items[0]?.keyRef as string | undefined,
        last: listed.items.at(-1)?.keyRef as string | undefined,
      };
    },

    /**
     * XEP-0136 §8.2: the EncryptedKeys of a collection whose CarriedKeyName is one of `carried`,
     * optionally only those of the given public keys. One Query per symmetric key name.
     */
    async keysForCollection(
      owner: string,
      header: CollectionHeader,
      carried: string[],
      publicKeyNames?: string[],
    ): Promise<StoredEncryptedKey[]> {
      const found: StoredEncryptedKey[] = [];
      for (const name of [...new Set(carried)]) {
        const { items } = await queryItems(
          {
            TableName: table,
            KeyConditionExpression: 'pk = :pk AND begins_with(sk, :k)',
            ExpressionAttributeValues: {
              ':pk': partitionOf(owner, header.cid),
              ':k': `k#${encodeURIComponent(name)}#`,
            },
            ConsistentRead: true,
          },
          1000,
        );
        for (const item of items) {
          if (publicKeyNames && !publicKeyNames.includes(item.public as string)) continue;
          found.push({
            carriedKeyName: item.carried as string,
            publicKeyName: item.public as string,
            xml: item.xml as string,
            collection: { with: header.with, start: header.start },
          });
        }
      }
      return found;
    },

    /** XEP-0136 §9 `<delete/>`: Query the collection's `k#` items, DeleteItem those of the named public keys. */
    async deleteKeys(
      owner: string,
      ref: CollectionRef,
      publicKeyNames: string[],
    ): Promise<number | undefined> {
      const header = await getHeader(owner, ref);
      if (!header) return undefined;
      const { items } = await queryItems(
        {
          TableName: table,
          KeyConditionExpression: 'pk = :pk AND begins_with(sk, :k)',
          ExpressionAttributeValues: { ':pk': partitionOf(owner, header.cid), ':k': 'k#' },
          ConsistentRead: true,
        },
        10_000,
      );
      let deleted = 0;
      for (const item of items) {
        if (!publicKeyNames.includes(item.public as string)) continue;
        await doc.send(new DeleteCommand({ TableName: table, Key: { pk: item.pk, sk: item.sk } }));
        deleted += 1;
      }
      if (deleted > 0) {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: headerKey(owner, header),
            UpdateExpression: 'SET changeKey = :ck',
            ConditionExpression: 'cid = :cid',
            ExpressionAttributeValues: { ':ck': changeKeyOf(now(), randomDigits()), ':cid': header.cid },
          }),
        );
      }
      return deleted;
    },

    /**
     * XEP-0136 §10 `<modified/>`: collections changed or removed after `after`, oldest change
     * first. One Query on `byChange` bounded by the cursor and by now minus the index's lag, and
     * one COUNT Query over the same range for `count`.
     */
    async modifiedSince(owner: string, after: string | undefined, max: number): Promise<Page<Change>> {
      // Cursors are fixed-length (32 characters): every key above `after` sorts at or above `after0`.
      // '0' sorts below every key (they start with a year) and is not empty, as a key value must be.
      const lo = after === undefined ? '0' : `${after}0`;
      const hi = changeKeyOf(now() - CHANGE_VISIBILITY_LAG_MS, '999999999');
      const input: QueryCommandInput = {
        TableName: table,
        IndexName: ARCHIVE_CHANGE_INDEX,
        KeyConditionExpression: 'changeOwner = :o AND changeKey BETWEEN :lo AND :hi',
        ExpressionAttributeValues: { ':o': owner, ':lo': lo, ':hi': hi },
      };
      if (lo > hi) return { items: [], count: 0 };
      const [listed, count] = await Promise.all([queryItems(input, max), countQuery(input)]);
      const changes = listed.items.map((item): Change => {
        const sk = item.sk as string;
        const collection = parseUid(sk.slice(2)) as CollectionRef;
        return {
          kind: sk.startsWith('r#') ? 'removed' : 'changed',
          collection,
          key: item.changeKey as string,
          time: changeTime(item.changeKey as string),
        };
      });
      return {
        items: changes,
        count,
        first: changes[0]?.time,
        last: changes.at(-1)?.time,
      };
    },

    /** Preferences: GetItem (consistent). */
    async getPrefs(owner: string): Promise<ArchivePrefs> {
      const { Item } = await doc.send(
        new GetCommand({ TableName: table, Key: prefsKey(owner), ConsistentRead: true }),
      );
      if (!Item) return { items: {}, methods: {}, version: 0 };
      return {
        default: Item.default as Mode | undefined,
        items: (Item.items as Record<string, Mode> | undefined) ?? {},
        methods: (Item.methods as ArchivePrefs['methods'] | undefined) ?? {},
        version: Item.version as number,
      };
    },

    /** Preferences: PutItem, condition "still the version read" (PrefsVersionConflictError otherwise). */
    async putPrefs(owner: string, prefs: ArchivePrefs): Promise<ArchivePrefs> {
      const next = { ...prefs, version: prefs.version + 1 };
      try {
        await doc.send(
          new PutCommand({
            TableName: table,
            Item: {
              ...prefsKey(owner),
              default: next.default,
              // A Map: the marshaller takes a plain object with an own `constructor` key (a
              // contact at the domain `constructor`) for a class instance, and refuses it.
              items: new Map(Object.entries(next.items)),
              methods: next.methods,
              version: next.version,
              updatedAt: now(),
            },
            ConditionExpression: prefs.version === 0 ? 'attribute_not_exists(sk)' : 'version = :v',
            ExpressionAttributeValues: prefs.version === 0 ? undefined : { ':v': prefs.version },
          }),
        );
      } catch (error) {
        if (isConditionFailure(error)) throw new PrefsVersionConflictError(owner);
        throw error;
      }
      return next;
    },
  };
}
