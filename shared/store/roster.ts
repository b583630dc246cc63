/**
 * Roster table (RFC 6121 §2–3): per user, one item per contact the user has a relation with,
 * and one meta item with the roster version and the item counts.
 *
 *   pk = <bare JID>  sk = c#<contact bare JID>  → RosterEntry (+ rev)
 *   pk = <bare JID>  sk = ver                   → { v, epoch, items, requests }
 *
 * A contact item is either a roster item (`listed`) or only a pending inbound subscription
 * request from someone not in the roster (RFC 6121 §3.1.3 keeps such requests without adding
 * the sender to the roster). The meta item sorts after every contact (`c#…` < `ver`), so one
 * Query on the partition reads the whole roster, the pending requests and the version.
 *
 * Every write is a read-modify-write guarded by conditions: the contact item's `rev` for the
 * item, and the meta item's `v` whenever the version moves, so concurrent changes of one
 * roster never interleave and the version a push carries is exactly the stored one. A
 * subscription change writes both users' rosters in one TransactWriteItems.
 */
import { randomBytes } from 'node:crypto';
import { TransactionCanceledException } from '@aws-sdk/client-dynamodb';
import {
  BatchGetCommand,
  type DynamoDBDocumentClient,
  GetCommand,
  QueryCommand,
  TransactWriteCommand,
} from '@aws-sdk/lib-dynamodb';

/** RFC 6121 §2.1.2.5: the subscription attribute of a roster item. */
export type Subscription = 'none' | 'to' | 'from' | 'both';

/** What the server knows about one contact of one user. */
export interface RosterEntry {
  /** The contact's bare JID (normalised). */
  contact: string;
  /**
   * The contact is a roster item. False for a row that only keeps a pending inbound request
   * from someone the user has not added (RFC 6121 §3.1.3).
   */
  listed: boolean;
  /** RFC 6121 §2.1.2.4: the user's handle for the contact. */
  name?: string;
  /** RFC 6121 §2.1.2.6: groups, distinct, in the order the client set them. */
  groups: string[];
  subscription: Subscription;
  /** Pending out: the user asked the contact for a subscription (`ask='subscribe'`, §2.1.2.2). */
  pendingOut: boolean;
  /**
   * Pending in: the contact's `subscribe` presence as received (serialised). Kept until the
   * user answers it and redelivered at each initial presence (RFC 6121 §3.1.3).
   */
  pendingIn?: string;
  /** RFC 6121 §3.4: the user pre-approved a subscription request from the contact. */
  approved: boolean;
  /**
   * Whom the pre-approval was given to (RFC 6121 §3.4), since session 33: the contact's account,
   * by its creation time (`approvedFor`); for another domain's JID, only when (`approvedAt`, ms),
   * and it approves nobody (no server-to-server). An account that holds the JID before or after
   * the approved one (deleted, made again for someone else) is asked like anyone. A local JID
   * without an account is not pre-approved at all. Neither: stored before session 33, approves
   * as it did.
   */
  approvedFor?: number;
  approvedAt?: number;
}

/** An entry as stored, with the revision its next write is conditioned on. */
export interface StoredRosterEntry extends RosterEntry {
  rev: number;
}

export interface Roster {
  /** RFC 6121 §2.6: opaque; changes on every modification of the roster. */
  version: string;
  /** Roster items (listed entries), sorted by contact. */
  items: StoredRosterEntry[];
  /** Entries holding a pending inbound request, listed or not: what is redelivered at login. */
  pendingIn: StoredRosterEntry[];
}

/** A side of a change: the new entry, `null` to delete the row, or `undefined` for "unchanged". */
export type EntryChange = RosterEntry | null | undefined;

/** What a decision returns for the rosters it read. */
export interface PairDecision<T> {
  /** The new entry in the user's roster for the contact. */
  user?: EntryChange;
  /** The new entry in the contact's roster for the user (only when the contact is local). */
  contact?: EntryChange;
  /** Anything the caller wants back (e.g. which stanzas to send). */
  outcome: T;
}

/** One side after a change. */
export interface SideResult {
  before?: StoredRosterEntry;
  after?: RosterEntry;
  /** The roster item changed as a client sees it (RFC 6121 §2.1.6: push it). */
  itemChanged: boolean;
  /** That roster's version after the change. */
  version: string;
}

export interface PairResult<T> {
  user: SideResult;
  contact?: SideResult;
  outcome: T;
}

/** The pair of rows one decision reads: the user's entry for the contact and the reverse. */
export interface PairSnapshot {
  user?: StoredRosterEntry;
  /** Undefined also when the contact is not a local account (not read). */
  contact?: StoredRosterEntry;
}

export interface RosterLimits {
  /** Roster items per user; also, separately, unlisted pending requests per user. */
  maxItems: number;
  /** The roster result's bytes (itemBytes of every item); default ROSTER_MAX_BYTES. */
  maxBytes?: number;
}

/**
 * The most a roster's items may take in a roster result (RFC 6121 §2.1.3: one iq), under API
 * Gateway's 128 KB message with room for the iq around them and a push's margin.
 */
export const ROSTER_MAX_BYTES = 120 * 1024;

const SPECIAL = /[&<>'"]/g;

/** `text`'s bytes in XML, every special character escaped (at most 6 bytes each). */
function xmlBytes(text: string): number {
  return Buffer.byteLength(text, 'utf8') + 5 * (text.match(SPECIAL)?.length ?? 0);
}

/**
 * What a roster item takes in a roster result, at most: its JID, name and groups escaped, and
 * the markup (`<item jid='' name='' subscription='none' ask='subscribe' approved='true'>`,
 * `<group></group>` each). An unlisted entry (a pending request only) takes none.
 */
export function itemBytes(entry: RosterEntry | undefined): number {
  if (!entry?.listed) return 0;
  return (
    80 +
    xmlBytes(entry.contact) +
    (entry.name === undefined ? 0 : 8 + xmlBytes(entry.name)) +
    entry.groups.reduce((sum, group) => sum + 15 + xmlBytes(group), 0)
  );
}

/** A roster at its bound: the named owner's roster cannot take another item (or request). */
export class RosterFullError extends Error {
  constructor(
    readonly owner: string,
    readonly kind: 'items' | 'requests' | 'bytes',
    readonly limit: number,
  ) {
    super(`roster of ${owner} is full (${limit} ${kind})`);
    this.name = 'RosterFullError';
  }
}

/** Concurrent writers kept changing the same rows; the caller may report `wait`/`resource-constraint`. */
export class RosterContentionError extends Error {
  constructor(readonly user: string) {
    super(`roster of ${user} kept changing under concurrent writes`);
    this.name = 'RosterContentionError';
  }
}

/** A DynamoDB sort key holds at most 1024 bytes: longer contact JIDs cannot be stored. */
export function fitsContactKey(contact: string): boolean {
  return Buffer.byteLength(`c#${contact}`, 'utf8') <= 1024;
}

/**
 * Whether the roster item a client sees changed (so the version moves and a push goes out).
 * `pendingIn` and the stored stanza are invisible: RFC 6121 §2.1.2 gives a roster item no
 * attribute for a pending inbound request.
 */
export function rosterItemChanged(
  before: RosterEntry | undefined | null,
  after: RosterEntry | undefined | null,
): boolean {
  const wasItem = before?.listed === true;
  const isItem = after?.listed === true;
  if (!wasItem && !isItem) return false;
  if (wasItem !== isItem || !before || !after) return true;
  return (
    before.name !== after.name ||
    before.subscription !== after.subscription ||
    before.pendingOut !== after.pendingOut ||
    before.approved !== after.approved ||
    before.groups.length !== after.groups.length ||
    before.groups.some((group, i) => group !== after.groups[i])
  );
}

const META_SK = 'ver';
const entryKey = (user: string, contact: string) => ({ pk: user, sk: `c#${contact}` });
const metaKey = (user: string) => ({ pk: user, sk: META_SK });

interface Meta {
  v: number;
  epoch?: string;
  items: number;
  requests: number;
  /** The items' itemBytes. */
  bytes: number;
  /**
   * A roster written before the items' bytes were counted (items, no `bytes`): `bytes` is then
   * what a Query of its items found, and its next meta write sets it.
   */
  uncounted?: boolean;
}

/**
 * `<epoch>-<counter>`, or `0` before the first modification. The epoch (random, set with the
 * first version) tells a roster re-created after an account deletion from the old one, whose
 * counter restarts.
 */
function versionString(meta: Meta): string {
  return meta.v === 0 ? '0' : `${meta.epoch}-${meta.v}`;
}

function toMeta(item: Record<string, unknown> | undefined): Meta {
  return {
    v: (item?.v as number | undefined) ?? 0,
    epoch: item?.epoch as string | undefined,
    items: Math.max(0, (item?.items as number | undefined) ?? 0),
    requests: Math.max(0, (item?.requests as number | undefined) ?? 0),
    bytes: Math.max(0, (item?.bytes as number | undefined) ?? 0),
    ...(item && typeof item.bytes !== 'number' && ((item.items as number | undefined) ?? 0) > 0
      ? { uncounted: true }
      : {}),
  };
}

function toEntry(item: Record<string, unknown>): StoredRosterEntry {
  return {
    contact: item.contact as string,
    listed: Boolean(item.listed),
    name: item.name as string | undefined,
    groups: (item.groups as string[] | undefined) ?? [],
    subscription: (item.sub as Subscription | undefined) ?? 'none',
    pendingOut: item.ask === 'subscribe',
    pendingIn: item.pendingIn as string | undefined,
    approved: Boolean(item.approved),
    ...(item.approved && typeof item.approvedFor === 'number' ? { approvedFor: item.approvedFor } : {}),
    ...(item.approved && typeof item.approvedAt === 'number' ? { approvedAt: item.approvedAt } : {}),
    rev: (item.rev as number | undefined) ?? 0,
  };
}

function toItem(user: string, entry: RosterEntry, rev: number): Record<string, unknown> {
  return {
    ...entryKey(user, entry.contact),
    contact: entry.contact,
    listed: entry.listed,
    name: entry.name,
    groups: entry.groups.length > 0 ? entry.groups : undefined,
    sub: entry.subscription,
    ask: entry.pendingOut ? 'subscribe' : undefined,
    pendingIn: entry.pendingIn,
    approved: entry.approved ? true : undefined,
    approvedFor: entry.approved ? entry.approvedFor : undefined,
    approvedAt: entry.approved ? entry.approvedAt : undefined,
    rev,
  };
}

/** A row with no relation left (not listed, nothing pending, no pre-approval) is deleted. */
function isEmpty(entry: RosterEntry): boolean {
  return (
    !entry.listed &&
    entry.pendingIn === undefined &&
    !entry.approved &&
    entry.subscription === 'none' &&
    !entry.pendingOut
  );
}

export interface RosterStore {
  /**
   * The whole roster, its pending inbound requests and its version: one strongly consistent
   * Query on the user's partition, paginated (1 MB a page).
   */
  getRoster(user: string): Promise<Roster>;
  /** The version alone (GetItem on the meta item): enough to answer a roster get whose `ver` is current. */
  getVersion(user: string): Promise<string>;
  getEntry(user: string, contact: string): Promise<StoredRosterEntry | undefined>;
  /**
   * Reads the user's entry for the contact and, when `contactIsLocal`, the contact's entry for
   * the user (one BatchGetItem), lets `decide` compute both new entries, and writes them with
   * the version bumps and counts in one TransactWriteItems, conditioned on what was read.
   * A concurrent change of either row makes it read and decide again (up to 5 rounds).
   */
  apply<T>(
    user: string,
    contact: string,
    options: {
      contactIsLocal: boolean;
      /** One more write of the same transaction, made from the result (when anything changes). */
      record?: (result: PairResult<T>) => TransactItem;
    },
    decide: (pair: PairSnapshot) => PairDecision<T> | Promise<PairDecision<T>>,
  ): Promise<PairResult<T>>;
}

type TransactItem = NonNullable<
  ConstructorParameters<typeof TransactWriteCommand>[0]['TransactItems']
>[number];

const MAX_ROUNDS = 5;

export function createRosterStore(
  doc: DynamoDBDocumentClient,
  table: string,
  limits: RosterLimits,
): RosterStore {
  const maxBytes = limits.maxBytes ?? ROSTER_MAX_BYTES;
  async function readPair(
    user: string,
    contact: string,
    contactIsLocal: boolean,
  ): Promise<{ pair: PairSnapshot; userMeta: Meta; contactMeta: Meta }> {
    let keys: Record<string, string>[] = [entryKey(user, contact), metaKey(user)];
    if (contactIsLocal) keys.push(entryKey(contact, user), metaKey(contact));
    const found = new Map<string, Record<string, unknown>>();
    for (let attempt = 0; keys.length > 0; attempt++) {
      if (attempt > 0) await unprocessedBackoff(attempt);
      const { Responses, UnprocessedKeys } = await doc.send(
        new BatchGetCommand({ RequestItems: { [table]: { Keys: keys, ConsistentRead: true } } }),
      );
      for (const item of Responses?.[table] ?? []) found.set(`${item.pk}\n${item.sk}`, item);
      keys = (UnprocessedKeys?.[table]?.Keys ?? []) as typeof keys;
    }
    const get = (key: { pk: string; sk: string }) => found.get(`${key.pk}\n${key.sk}`);
    const userItem = get(entryKey(user, contact));
    const contactItem = contactIsLocal ? get(entryKey(contact, user)) : undefined;
    return {
      pair: {
        user: userItem ? toEntry(userItem) : undefined,
        contact: contactItem ? toEntry(contactItem) : undefined,
      },
      userMeta: toMeta(get(metaKey(user))),
      contactMeta: toMeta(contactIsLocal ? get(metaKey(contact)) : undefined),
    };
  }

  async function queryRoster(user: string): Promise<Roster> {
    const items: StoredRosterEntry[] = [];
    const pendingIn: StoredRosterEntry[] = [];
    let meta = toMeta(undefined);
    let start: Record<string, unknown> | undefined;
    do {
      const page = await doc.send(
        new QueryCommand({
          TableName: table,
          KeyConditionExpression: 'pk = :pk',
          ExpressionAttributeValues: { ':pk': user },
          ConsistentRead: true,
          ExclusiveStartKey: start,
        }),
      );
      for (const item of page.Items ?? []) {
        if (item.sk === META_SK) {
          meta = toMeta(item);
          continue;
        }
        const entry = toEntry(item);
        if (entry.listed) items.push(entry);
        if (entry.pendingIn !== undefined) pendingIn.push(entry);
      }
      start = page.LastEvaluatedKey;
    } while (start);
    return { version: versionString(meta), items, pendingIn };
  }

  /** An uncounted roster's bytes, from a Query of its items (once: its next meta write sets them). */
  async function withCountedBytes(owner: string, meta: Meta): Promise<Meta> {
    if (!meta.uncounted) return meta;
    const { items } = await queryRoster(owner);
    return { ...meta, bytes: items.reduce((sum, entry) => sum + itemBytes(entry), 0) };
  }

  /** The writes of one side, and what that side looks like afterwards. */
  function sideWrites(
    owner: string,
    before: StoredRosterEntry | undefined,
    change: EntryChange,
    meta: Meta,
  ): { writes: TransactItem[]; result: SideResult; bound?: Bound } {
    const unchanged = {
      writes: [],
      result: { before, after: before, itemChanged: false, version: versionString(meta) },
    };
    if (change === undefined) return unchanged;
    const after = change === null || isEmpty(change) ? undefined : change;
    if (!before && !after) return unchanged;
    const contact = (before ?? after)?.contact as string;
    const writes: TransactItem[] = [];
    const revCondition = before
      ? {
          ConditionExpression: '#rev = :rev',
          ExpressionAttributeNames: { '#rev': 'rev' },
          ExpressionAttributeValues: { ':rev': before.rev },
        }
      : { ConditionExpression: 'attribute_not_exists(sk)' };
    if (after) {
      writes.push({
        Put: { TableName: table, Item: toItem(owner, after, (before?.rev ?? 0) + 1), ...revCondition },
      });
    } else {
      writes.push({ Delete: { TableName: table, Key: entryKey(owner, contact), ...revCondition } });
    }
    const itemChanged = rosterItemChanged(before, after);
    const itemsDelta = Number(after?.listed === true) - Number(before?.listed === true);
    const requestsDelta =
      Number(after !== undefined && !after.listed) - Number(before !== undefined && !before.listed);
    const bytesDelta = itemBytes(after) - itemBytes(before);
    const next: Meta = {
      v: meta.v + (itemChanged ? 1 : 0),
      epoch: meta.epoch ?? randomBytes(4).toString('hex'),
      items: meta.items + itemsDelta,
      requests: meta.requests + requestsDelta,
      bytes: meta.bytes + bytesDelta,
    };
    if (itemChanged || itemsDelta !== 0 || requestsDelta !== 0 || bytesDelta !== 0 || meta.uncounted) {
      const conditions: string[] = [];
      const names: Record<string, string> = { '#items': 'items', '#requests': 'requests' };
      const values: Record<string, unknown> = { ':items': itemsDelta, ':requests': requestsDelta };
      const sets: string[] = [];
      const adds = ['#items :items', '#requests :requests'];
      if (itemChanged) {
        names['#v'] = 'v';
        names['#epoch'] = 'epoch';
        sets.push('#epoch = if_not_exists(#epoch, :epoch)');
        values[':epoch'] = next.epoch;
        adds.push('#v :one');
        values[':one'] = 1;
        // Conditioned on the version read, so the one a push carries is exactly the stored one.
        if (meta.v === 0) conditions.push('attribute_not_exists(#v)');
        else {
          conditions.push('#v = :v');
          values[':v'] = meta.v;
        }
      }
      if (itemsDelta > 0) conditions.push('(attribute_not_exists(#items) OR #items < :max)');
      if (requestsDelta > 0) conditions.push('(attribute_not_exists(#requests) OR #requests < :max)');
      if (itemsDelta > 0 || requestsDelta > 0) values[':max'] = limits.maxItems;
      if (meta.uncounted) {
        // The total found by a Query (see withCountedBytes), set once: a concurrent first count
        // makes this write fail, and the change is read and decided again.
        if (bytesDelta > 0 && next.bytes > maxBytes) throw new RosterFullError(owner, 'bytes', maxBytes);
        names['#bytes'] = 'bytes';
        sets.push('#bytes = :total');
        values[':total'] = next.bytes;
        conditions.push('attribute_not_exists(#bytes)');
      } else if (bytesDelta !== 0) {
        names['#bytes'] = 'bytes';
        adds.push('#bytes :bytes');
        values[':bytes'] = bytesDelta;
      }
      if (bytesDelta > 0 && !meta.uncounted) {
        conditions.push('(attribute_not_exists(#bytes) OR #bytes <= :room)');
        values[':room'] = maxBytes - bytesDelta;
      }
      writes.push({
        Update: {
          TableName: table,
          Key: metaKey(owner),
          UpdateExpression: `${sets.length > 0 ? `SET ${sets.join(', ')} ` : ''}ADD ${adds.join(', ')}`,
          ConditionExpression: conditions.length > 0 ? conditions.join(' AND ') : undefined,
          ExpressionAttributeNames: names,
          ExpressionAttributeValues: values,
        },
      });
    }
    const kind = itemsDelta > 0 ? 'items' : requestsDelta > 0 ? 'requests' : undefined;
    const bound: Bound | undefined =
      kind || bytesDelta > 0 ? { ...(kind ? { kind } : {}), bytes: Math.max(0, bytesDelta) } : undefined;
    return {
      writes,
      result: { before, after, itemChanged, version: versionString(itemChanged ? next : meta) },
      bound,
    };
  }

  return {
    getRoster: queryRoster,

    async getVersion(user) {
      const { Item } = await doc.send(
        new GetCommand({
          TableName: table,
          Key: metaKey(user),
          ConsistentRead: true,
          ProjectionExpression: '#v, #epoch',
          ExpressionAttributeNames: { '#v': 'v', '#epoch': 'epoch' },
        }),
      );
      return versionString(toMeta(Item));
    },

    async getEntry(user, contact) {
      if (!fitsContactKey(contact)) return undefined;
      const { Item } = await doc.send(
        new GetCommand({ TableName: table, Key: entryKey(user, contact), ConsistentRead: true }),
      );
      return Item ? toEntry(Item) : undefined;
    },

    async apply(user, contact, options, decide) {
      if (user === contact) throw new Error('a roster pair needs two different users');
      for (let round = 0; round < MAX_ROUNDS; round++) {
        const read = await readPair(user, contact, options.contactIsLocal);
        const { pair } = read;
        const [userMeta, contactMeta] = await Promise.all([
          withCountedBytes(user, read.userMeta),
          withCountedBytes(contact, read.contactMeta),
        ]);
        const decision = await decide(pair);
        const userSide = sideWrites(user, pair.user, decision.user, userMeta);
        const contactSide = options.contactIsLocal
          ? sideWrites(contact, pair.contact, decision.contact, contactMeta)
          : undefined;
        const writes = [...userSide.writes, ...(contactSide?.writes ?? [])];
        const result: PairResult<typeof decision.outcome> = {
          user: userSide.result,
          contact: contactSide?.result,
          outcome: decision.outcome,
        };
        if (writes.length === 0) return result;
        if (options.record) writes.push(options.record(result));
        try {
          // Both rosters in one transaction: the two sides of a subscription never disagree
          // (a crash between two plain writes could leave one user at 'to' and the other at
          // 'none'). The price: a transaction bills 2 write units per KB of each item, so a
          // two-sided change (2 contact items + 2 meta items) costs about 8 WRU instead of 4.
          await doc.send(new TransactWriteCommand({ TransactItems: writes }));
          return result;
        } catch (error) {
          if (!(error instanceof TransactionCanceledException)) throw error;
          const reasons = error.CancellationReasons ?? [];
          if (!reasons.some((reason) => reason.Code === 'ConditionalCheckFailed')) throw error;
          // A failed meta condition is either the bound or a version that moved: re-read to tell.
          const full = fullSide(reasons, userSide, contactSide, user, contact);
          if (full) {
            const fresh = await readPair(user, contact, options.contactIsLocal);
            const meta = full.owner === user ? fresh.userMeta : fresh.contactMeta;
            const { kind, bytes } = full.bound;
            const count = kind === 'items' ? meta.items : kind === 'requests' ? meta.requests : 0;
            if (kind && count >= limits.maxItems)
              throw new RosterFullError(full.owner, kind, limits.maxItems);
            if (bytes > 0 && meta.bytes + bytes > maxBytes)
              throw new RosterFullError(full.owner, 'bytes', maxBytes);
          }
        }
      }
      throw new RosterContentionError(user);
    },
  };
}

/** What a side's meta write is bounded by: a count it adds to, and the bytes it adds. */
interface Bound {
  kind?: 'items' | 'requests';
  bytes: number;
}

/** The side whose meta write failed while it was adding an item, a request or bytes, if any. */
function fullSide(
  reasons: { Code?: string }[],
  userSide: { writes: TransactItem[]; bound?: Bound },
  contactSide: { writes: TransactItem[]; bound?: Bound } | undefined,
  user: string,
  contact: string,
): { owner: string; bound: Bound } | undefined {
  const failed = (index: number) => reasons[index]?.Code === 'ConditionalCheckFailed';
  // Each side's writes are [entry, meta?]; the meta write is the side's second one.
  if (userSide.bound && userSide.writes.length === 2 && failed(1))
    return { owner: user, bound: userSide.bound };
  const offset = userSide.writes.length;
  if (contactSide?.bound && contactSide.writes.length === 2 && failed(offset + 1)) {
    return { owner: contact, bound: contactSide.bound };
  }
  return undefined;
}

/** Keys DynamoDB left unprocessed (throttling) are asked again after a pause; at last, a retryable error. */
async function unprocessedBackoff(attempt: number): Promise<void> {
  if (attempt > 6) {
    throw Object.assign(new Error('BatchGetItem kept keys unprocessed'), { name: 'ThrottlingException' });
  }
  await new Promise((resolve) => setTimeout(resolve, 25 * 2 ** attempt));
}
