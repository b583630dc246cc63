/**
 * Offline table: messages waiting for a user (XEP-0160), oldest first, with a maintained
 * per-user counter so quota checks and XEP-0013 counts never read the whole inbox.
 *
 *   pk = <bare JID>  sk = m#<id>   → OfflineMessage (id sorts by arrival)
 *   pk = <bare JID>  sk = count    → { n }
 */

import { createHash, randomBytes } from 'node:crypto';
import { TransactionCanceledException } from '@aws-sdk/client-dynamodb';
import {
  BatchGetCommand,
  DeleteCommand,
  type DynamoDBDocumentClient,
  GetCommand,
  QueryCommand,
  TransactWriteCommand,
  UpdateCommand,
} from '@aws-sdk/lib-dynamodb';
import { TTL_ATTRIBUTE } from '../tables.ts';
import { isConditionFailure, UnprocessedKeysError } from './dynamo.ts';
import type { TransactItem } from './sessions.ts';

/**
 * A message stored behind a flood's hold (its resource is online, and the flood delivers it next)
 * may pass the quota, up to this many times it: a flood kept going by slow acknowledgements must
 * not let another sender store without bound.
 */
export const HELD_QUOTA_FACTOR = 2;

export interface OfflineMessage {
  /** Opaque, unique, increasing with arrival time (see newOfflineId and keyedOfflineId). */
  id: string;
  /** Full JID of the sender. */
  from: string;
  /** Arrival time (ms since epoch): the XEP-0203 delay stamp. */
  storedAt: number;
  /** The message stanza as received, serialised. */
  stanza: string;
}

export class OfflineQuotaExceededError extends Error {
  constructor(readonly user: string) {
    super(`offline quota reached for ${user}`);
    this.name = 'OfflineQuotaExceededError';
  }
}

/**
 * The store's transaction was refused by the condition the caller added (`guard`): what it was
 * stored on the strength of has changed, and the caller routes the message again.
 */
export class OfflineGuardFailedError extends Error {
  constructor(readonly user: string) {
    super(`offline store for ${user}: the routing it was decided on has changed`);
    this.name = 'OfflineGuardFailedError';
  }
}

export interface OfflinePage {
  messages: OfflineMessage[];
  /** Pass back to get the next page; undefined on the last one. */
  next?: string;
}

export interface OfflineStore {
  /**
   * With `key` (a frame's delivery key, core/frame.ts) the id is made from it, so a redelivered
   * frame finds its message stored and does not store it twice (`alreadyStored`). With `guard`
   * (a condition on another item, as one item of the same transaction) nothing is stored unless
   * it holds: OfflineGuardFailedError. With `record` (an update of another item, as one more
   * item of the transaction: the sender's record of the store) the message is stored with it, or
   * without it when its condition fails.
   */
  store(
    user: string,
    message: Omit<OfflineMessage, 'id'>,
    options?: {
      /** true: no bound (a re-route: accepted already). 'held': up to HELD_QUOTA_FACTOR × the quota. */
      ignoreQuota?: boolean | 'held';
      key?: OfflineKey;
      guard?: TransactItem;
      record?: TransactItem;
    },
  ): Promise<OfflineMessage & { alreadyStored?: boolean }>;
  /** Oldest first; expired messages are skipped even before DynamoDB's TTL removes them. */
  list(
    user: string,
    options?: { limit?: number; after?: string; before?: string; newestFirst?: boolean },
  ): Promise<OfflinePage>;
  get(user: string, ids: string[]): Promise<Map<string, OfflineMessage>>;
  count(user: string): Promise<number>;
  /** Deletes the given messages; returns the ids that existed. */
  remove(user: string, ids: string[]): Promise<string[]>;
  purge(user: string): Promise<number>;
}

let lastMillis = 0;
let sequence = 0;

/**
 * The id of a message a frame stores, the same for every delivery of the frame: its arrival at
 * API Gateway, then its SQS sequence number (one sender's frames of the same millisecond keep
 * their order) and its place among the frame's deliveries; without a sequence number (not from
 * the queue), a hash of the key.
 */
export function keyedOfflineId(delivery: OfflineKey): string {
  const at = delivery.at.toString().padStart(15, '0');
  const position = (delivery.position % 10_000).toString().padStart(4, '0');
  if (delivery.seq && /^\d{1,40}$/.test(delivery.seq))
    return `${at}-${delivery.seq.padStart(40, '0')}-${position}`;
  const hash = createHash('sha256').update(delivery.key).digest('hex').slice(0, 8);
  return `${at}-${position}-${hash}`;
}

/** What makes a stored message's id (core/frame.ts's DeliveryKey). */
export interface OfflineKey {
  key: string;
  at: number;
  seq?: string;
  position: number;
}

/**
 * Ids sort by arrival: the time in ms, then a per-process sequence for ids made in the same
 * millisecond, then randomness so two Lambdas storing in the same millisecond never collide.
 */
export function newOfflineId(now = Date.now()): string {
  if (now === lastMillis) sequence += 1;
  else {
    lastMillis = now;
    sequence = 0;
  }
  return `${now.toString().padStart(15, '0')}-${sequence.toString().padStart(4, '0')}-${randomBytes(4).toString('hex')}`;
}

const messageKey = (user: string, id: string) => ({ pk: user, sk: `m#${id}` });
const counterKey = (user: string) => ({ pk: user, sk: 'count' });

function toMessage(item: Record<string, unknown>): OfflineMessage {
  return {
    id: (item.sk as string).slice(2),
    from: item.from as string,
    storedAt: item.storedAt as number,
    stanza: item.stanza as string,
  };
}

/** Keys DynamoDB left unprocessed (throttling) are asked again after a pause; at last, a retryable error. */
async function unprocessedBackoff(attempt: number): Promise<void> {
  if (attempt > 6) {
    // Transient (isTransientStoreError): the stream retries the frame.
    throw new UnprocessedKeysError('BatchGetItem');
  }
  await new Promise((resolve) => setTimeout(resolve, 25 * 2 ** attempt));
}

/** At the quota, the counter is recounted from the items at most this often per inbox. */
export const RECOUNT_INTERVAL_MS = 3_600_000;
/**
 * For a XEP-0013 count, at most this often per inbox (a recount reads the whole inbox: a client
 * asking in a loop, its inbox filled with large messages, would have it read each time).
 */
export const COUNT_RECOUNT_INTERVAL_MS = 60_000;

function nowSeconds(): number {
  return Math.floor(Date.now() / 1000);
}

/** Deletes in flight at once in one `remove`. */
const REMOVE_CONCURRENCY = 10;

export function createOfflineStore(
  doc: DynamoDBDocumentClient,
  table: string,
  limits: { quota: number; ttlSeconds: number },
): OfflineStore {
  /**
   * Claims the right to recount an inbox: at most one recount per RECOUNT_INTERVAL_MS per user,
   * so a sender hammering a full inbox costs one GetItem-sized write per refusal, not a read of
   * the whole inbox each time. False when another recount happened (or is happening) recently.
   * The XEP-0013 count claims its own (`countedAt`, COUNT_RECOUNT_INTERVAL_MS), so that a count
   * does not hold the quota's recount off for an hour.
   */
  async function claimRecount(user: string, forCount = false): Promise<boolean> {
    const now = Date.now();
    const attribute = forCount ? 'countedAt' : 'recountedAt';
    const intervalMs = forCount ? COUNT_RECOUNT_INTERVAL_MS : RECOUNT_INTERVAL_MS;
    try {
      await doc.send(
        new UpdateCommand({
          TableName: table,
          Key: counterKey(user),
          UpdateExpression: `SET ${attribute} = :now`,
          ConditionExpression: `attribute_not_exists(${attribute}) OR ${attribute} < :since`,
          ExpressionAttributeValues: { ':now': now, ':since': now - intervalMs },
        }),
      );
      return true;
    } catch (error) {
      if (isConditionFailure(error)) return false;
      throw error;
    }
  }

  /**
   * Counts the inbox's live messages (TTL not passed) and stores the count with the earliest
   * expiry among them (`expiresFrom`), clearing `dirty`, unless the counter moved meanwhile
   * (its version `v`, read before the Query: a store or a removal between the read and the
   * write, whose ADD an unconditional SET would undo): then the count is still answered
   * (`written` false).
   */
  async function recount(user: string, read?: { v?: number }): Promise<{ total: number; written: boolean }> {
    let total = 0;
    let earliest: number | undefined;
    let start: Record<string, unknown> | undefined;
    const { v: before } = read ?? (await readCounter(user));
    do {
      const page = await doc.send(
        new QueryCommand({
          TableName: table,
          KeyConditionExpression: 'pk = :pk AND begins_with(sk, :m)',
          FilterExpression: '#ttl > :now',
          // The same read units as Select COUNT (billed on what is read): the TTL besides.
          ProjectionExpression: '#ttl',
          ExpressionAttributeNames: { '#ttl': TTL_ATTRIBUTE },
          ExpressionAttributeValues: { ':pk': user, ':m': 'm#', ':now': nowSeconds() },
          ConsistentRead: true,
          ExclusiveStartKey: start,
        }),
      );
      for (const item of page.Items ?? []) {
        const ttl = item[TTL_ATTRIBUTE] as number;
        total += 1;
        if (earliest === undefined || ttl < earliest) earliest = ttl;
      }
      start = page.LastEvaluatedKey;
    } while (start);
    try {
      await doc.send(
        new UpdateCommand({
          TableName: table,
          Key: counterKey(user),
          UpdateExpression:
            earliest === undefined
              ? 'SET n = :n REMOVE expiresFrom, dirty'
              : 'SET n = :n, expiresFrom = :earliest REMOVE dirty',
          // `v` moves with every store and removal (`n` alone would not tell a store and a
          // removal that cancel out, the one counted by this Query and the other not).
          ConditionExpression: before === undefined ? 'attribute_not_exists(v)' : 'v = :seen',
          ExpressionAttributeValues: {
            ':n': total,
            ...(before === undefined ? {} : { ':seen': before }),
            ...(earliest === undefined ? {} : { ':earliest': earliest }),
          },
        }),
      );
    } catch (error) {
      if (!isConditionFailure(error)) throw error;
      return { total, written: false };
    }
    return { total, written: true };
  }

  async function readCounter(
    user: string,
  ): Promise<{ n: number; v?: number; expiresFrom?: number; dirty?: boolean; countedAt?: number }> {
    const { Item } = await doc.send(
      new GetCommand({ TableName: table, Key: counterKey(user), ConsistentRead: true }),
    );
    return {
      n: (Item?.n as number | undefined) ?? 0,
      ...(typeof Item?.expiresFrom === 'number' ? { expiresFrom: Item.expiresFrom } : {}),
      ...(typeof Item?.v === 'number' ? { v: Item.v } : {}),
      ...(Item?.dirty === true ? { dirty: true } : {}),
      ...(typeof Item?.countedAt === 'number' ? { countedAt: Item.countedAt } : {}),
    };
  }

  async function tryStore(
    user: string,
    item: OfflineMessage,
    quota: number,
    guard: TransactItem | undefined,
    record: TransactItem | undefined,
  ): Promise<void> {
    const expiresAt = Math.floor(item.storedAt / 1000) + limits.ttlSeconds;
    await doc.send(
      new TransactWriteCommand({
        TransactItems: [
          {
            Update: {
              TableName: table,
              Key: counterKey(user),
              // The earliest expiry the counter counts (a re-routed message, stamped earlier than
              // the first one stored, may expire before it: by the minutes a re-route takes).
              UpdateExpression: 'ADD n :one, v :one SET expiresFrom = if_not_exists(expiresFrom, :ttl)',
              ConditionExpression: 'attribute_not_exists(n) OR n < :quota',
              ExpressionAttributeValues: { ':one': 1, ':quota': quota, ':ttl': expiresAt },
            },
          },
          {
            Put: {
              TableName: table,
              Item: {
                ...messageKey(user, item.id),
                from: item.from,
                storedAt: item.storedAt,
                stanza: item.stanza,
                [TTL_ATTRIBUTE]: expiresAt,
              },
              ConditionExpression: 'attribute_not_exists(sk)',
            },
          },
          ...(guard ? [guard] : []),
          ...(record ? [record] : []),
        ],
      }),
    );
  }

  return {
    async store(user, message, options = {}) {
      // Ids follow the order of storing (XEP-0059 paging relies on it), even for a message
      // re-routed with its original, older time stamp.
      const item: OfflineMessage = {
        ...message,
        id: options.key ? keyedOfflineId(options.key) : newOfflineId(),
      };
      const quota =
        options.ignoreQuota === 'held'
          ? limits.quota * HELD_QUOTA_FACTOR
          : options.ignoreQuota
            ? Number.MAX_SAFE_INTEGER
            : limits.quota;
      let record = options.record;
      const attempt = async (): Promise<void> => {
        try {
          await tryStore(user, item, quota, options.guard, record);
        } catch (error) {
          if (!(error instanceof TransactionCanceledException)) throw error;
          const failed = (index: number) =>
            error.CancellationReasons?.[index]?.Code === 'ConditionalCheckFailed';
          if (failed(1)) throw error;
          if (options.guard && failed(2)) throw new OfflineGuardFailedError(user);
          // The sender's connection row is gone: no redelivery of its frame will route the message.
          if (record && failed(options.guard ? 3 : 2) && !failed(0)) {
            record = undefined;
            return attempt();
          }
          throw error;
        }
      };
      /** What a refused store is: already stored (its key), refused at the counter, or neither. */
      const refusal = (error: unknown): 'stored' | 'counter' | undefined => {
        if (!(error instanceof TransactionCanceledException)) return undefined;
        // The message is there already: an earlier delivery of the same frame stored it (or
        // this one did, and the SDK resent the transaction after a 500 that followed the write).
        if (options.key && error.CancellationReasons?.[1]?.Code === 'ConditionalCheckFailed') return 'stored';
        return error.CancellationReasons?.[0]?.Code === 'ConditionalCheckFailed' ? 'counter' : undefined;
      };
      try {
        await attempt();
      } catch (error) {
        const refused = refusal(error);
        if (refused === 'stored') return { ...item, alreadyStored: true };
        if (refused !== 'counter') throw error;
        // The counter only grows on store and shrinks on delete; messages that DynamoDB's TTL
        // removed are still in it. At the quota, count for real before refusing — at most once
        // an hour per inbox (messages live for days, so the drift is small between recounts).
        if (!(await claimRecount(user))) throw new OfflineQuotaExceededError(user);
        // A recount whose write was refused (the inbox changed while it counted) is tried again:
        // the retried store's condition reads the counter, not the count.
        for (let tries = 1; ; tries++) {
          const { total, written } = await recount(user);
          if (total >= quota) throw new OfflineQuotaExceededError(user);
          if (written) break;
          if (tries === 3) throw new OfflineQuotaExceededError(user);
        }
        try {
          await attempt();
        } catch (error) {
          const again = refusal(error);
          if (again === 'stored') return { ...item, alreadyStored: true };
          // Filled again meanwhile: the quota's answer, not an error.
          if (again === 'counter') throw new OfflineQuotaExceededError(user);
          throw error;
        }
      }
      return item;
    },

    async list(user, options = {}) {
      const values: Record<string, unknown> = { ':pk': user, ':now': nowSeconds() };
      // A Query's filter cannot name a key attribute: ranges are bounded by the key condition
      // alone. The counter item sorts before every message and has no TTL attribute, so the
      // TTL filter drops it from the one-sided ranges.
      let keyCondition = 'pk = :pk AND begins_with(sk, :m)';
      values[':m'] = 'm#';
      if (options.after && options.before) {
        keyCondition = 'pk = :pk AND sk BETWEEN :after AND :before';
        values[':after'] = `m#${options.after}`;
        values[':before'] = `m#${options.before}`;
        delete values[':m'];
      } else if (options.after) {
        keyCondition = 'pk = :pk AND sk > :after';
        values[':after'] = `m#${options.after}`;
        delete values[':m'];
      } else if (options.before && options.newestFirst) {
        keyCondition = 'pk = :pk AND sk < :before';
        values[':before'] = `m#${options.before}`;
        delete values[':m'];
      } else if (options.before) {
        keyCondition = 'pk = :pk AND sk BETWEEN :m AND :before';
        values[':before'] = `m#${options.before}`;
      }
      const messages: OfflineMessage[] = [];
      let start: Record<string, unknown> | undefined;
      const limit = options.limit ?? 100;
      do {
        const page = await doc.send(
          new QueryCommand({
            TableName: table,
            KeyConditionExpression: keyCondition,
            FilterExpression: '#ttl > :now',
            ExpressionAttributeNames: { '#ttl': TTL_ATTRIBUTE },
            ExpressionAttributeValues: values,
            ScanIndexForward: !options.newestFirst,
            ConsistentRead: true,
            Limit: limit - messages.length,
            ExclusiveStartKey: start,
          }),
        );
        for (const item of page.Items ?? []) {
          if (!(item.sk as string).startsWith('m#')) continue;
          const message = toMessage(item);
          // BETWEEN is inclusive; RSM's after/before are exclusive.
          if (message.id === options.after || message.id === options.before) continue;
          messages.push(message);
        }
        start = page.LastEvaluatedKey;
      } while (start && messages.length < limit);
      const last = messages.at(-1);
      return { messages, next: start && last ? last.id : undefined };
    },

    async get(user, ids) {
      const found = new Map<string, OfflineMessage>();
      const unique = [...new Set(ids)];
      // BatchGetItem: up to 100 keys per request, the same read units as one GetItem each.
      for (let i = 0; i < unique.length; i += 100) {
        let keys = unique.slice(i, i + 100).map((id) => messageKey(user, id));
        for (let attempt = 0; keys.length > 0; attempt++) {
          if (attempt > 0) await unprocessedBackoff(attempt);
          const { Responses, UnprocessedKeys } = await doc.send(
            new BatchGetCommand({ RequestItems: { [table]: { Keys: keys, ConsistentRead: true } } }),
          );
          for (const item of Responses?.[table] ?? []) {
            if ((item[TTL_ATTRIBUTE] as number) > nowSeconds())
              found.set((item.sk as string).slice(2), toMessage(item));
          }
          keys = (UnprocessedKeys?.[table]?.Keys ?? []) as typeof keys;
        }
      }
      return found;
    },

    async count(user) {
      const counter = await readCounter(user);
      const { n, expiresFrom, dirty, countedAt } = counter;
      // DynamoDB's TTL deletes expired messages without telling the counter (and a reader skips
      // them before): once the earliest one it counts has expired, it is counted again, exactly.
      // So is it after a removal (`dirty`: a recount between a removal's deletes and its
      // subtraction counts them out twice). Counters from before `expiresFrom` are counted once.
      const due = dirty || (n > 0 && (expiresFrom === undefined || expiresFrom <= nowSeconds()));
      // Counted within the minute: answered from the counter, without trying the claim's write.
      const recent = countedAt !== undefined && countedAt > Date.now() - COUNT_RECOUNT_INTERVAL_MS;
      if (due && !recent && (await claimRecount(user, true))) return (await recount(user, counter)).total;
      return Math.max(0, n);
    },

    async remove(user, asked) {
      const ids = [...new Set(asked)];
      const gone = new Set<string>();
      // Several deletes in flight (an ack of a flood's window removes ten): the ack's frame waits
      // for one round trip or two, not ten. After a failure no worker starts another, and what
      // was removed before it is still counted below: the counter follows what storage holds
      // (before, a failure mid-way left it above, until a recount at the quota).
      let next = 0;
      let failure: { error: unknown } | undefined;
      const worker = async () => {
        while (!failure && next < ids.length) {
          const id = ids[next++] as string;
          // Conditional, so that of two removers racing for one message exactly one counts it:
          // DynamoDB Local hands an unconditional delete's ALL_OLD to several concurrent callers.
          // A delete of a missing item costs the same write unit either way.
          try {
            // An expired one is left to DynamoDB's TTL and not counted: a recount may already
            // have left it out (`count`), and the reader sees it as gone either way.
            await doc.send(
              new DeleteCommand({
                TableName: table,
                Key: messageKey(user, id),
                ConditionExpression: 'attribute_exists(sk) AND #ttl > :now',
                ExpressionAttributeNames: { '#ttl': TTL_ATTRIBUTE },
                ExpressionAttributeValues: { ':now': nowSeconds() },
              }),
            );
            gone.add(id);
          } catch (error) {
            if (!isConditionFailure(error)) failure ??= { error };
          }
        }
      };
      await Promise.all(Array.from({ length: Math.min(REMOVE_CONCURRENCY, ids.length) }, worker));
      const removed = ids.filter((id) => gone.has(id));
      if (removed.length > 0) {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: counterKey(user),
            // `dirty`: the next count recounts (see `count`).
            UpdateExpression: 'ADD n :minus, v :one SET dirty = :yes',
            ExpressionAttributeValues: { ':minus': -removed.length, ':one': 1, ':yes': true },
          }),
        );
      }
      if (failure) throw failure.error;
      return removed;
    },

    async purge(user) {
      let removed = 0;
      for (;;) {
        const page = await this.list(user, { limit: 100 });
        if (page.messages.length === 0) break;
        removed += (
          await this.remove(
            user,
            page.messages.map((m) => m.id),
          )
        ).length;
        if (!page.next) break;
      }
      await recount(user);
      return removed;
    },
  };
}
