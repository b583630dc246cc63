/**
 * Users table: accounts and their per-account SASL failure count. The only module that
 * reads or writes it.
 *
 *   pk = <bare JID>        sk = credentials  → StoredUser (salted SCRAM keys, never a password)
 *   pk = <bare JID>        sk = authfail     → failures in the current window, expiring by TTL
 *   pk = <bare JID>        sk = addresses    → addresses the account recently logged in from
 *   pk = #addr#<address>   sk = authfail     → failures from one source address, expiring by TTL
 *   pk = #server           sk = sasl-decoy-secret → the decoy secret, the SCRAM iteration count
 *
 * The authfail item exists for any JID someone tried to log in as, account or not, so its
 * presence reveals nothing. A login reads the account's partition (credentials, failures,
 * known addresses) with one Query and its address's failures with one GetItem; the counts are
 * only written (ADD) when an attempt fails.
 */

import { randomBytes } from 'node:crypto';
import {
  DeleteCommand,
  type DynamoDBDocumentClient,
  GetCommand,
  PutCommand,
  QueryCommand,
  ScanCommand,
  UpdateCommand,
} from '@aws-sdk/lib-dynamodb';
import { unmarshall } from '@aws-sdk/util-dynamodb';
import type { ScramCredentials, ScramHash } from '../sasl/scram.ts';
import { TTL_ATTRIBUTE } from '../tables.ts';
import { adminOnly, isConditionFailure } from './dynamo.ts';

const CREDENTIALS = 'credentials';
const AUTH_FAILURES = 'authfail';
const ADDRESSES = 'addresses';
/** '#' cannot start a bare JID, so these items never collide with an account. */
const SERVER_KEY = { pk: '#server', sk: 'sasl-decoy-secret' };
const addressKey = (address: string) => ({ pk: `#addr#${address}`, sk: AUTH_FAILURES });
/** How many recent login addresses an account keeps. */
const KNOWN_ADDRESSES = 10;
/** A known address is refreshed at most this often (a write per login would be waste). */
const ADDRESS_REFRESH_MS = 86_400_000;

/** SCRAM keys for every hash we offer, derived from one password. */
export type UserCredentials = Record<ScramHash, ScramCredentials>;

export interface StoredUser {
  jid: string;
  scram: UserCredentials;
  /** Epoch milliseconds. */
  createdAt: number;
  /** Epoch milliseconds of the last password change. */
  updatedAt: number;
}

export interface LoginRecord {
  user?: StoredUser;
  /** Failures in the current window for this JID. */
  authFailures: number;
  /** When the window's last failure happened (epoch ms), if there was one. */
  lastFailureAt?: number;
  /** Source addresses of the account's recent successful logins, with when (epoch ms). */
  knownAddresses: Record<string, number>;
}

export class UserExistsError extends Error {
  override readonly name = 'UserExistsError';
  constructor(readonly jid: string) {
    super(`user ${jid} already exists`);
  }
}

export class UnknownUserError extends Error {
  override readonly name = 'UnknownUserError';
  constructor(readonly jid: string) {
    super(`no user ${jid}`);
  }
}

export interface UserStore {
  /** Adds an account; `UserExistsError` if the JID has one. */
  create(jid: string, scram: UserCredentials): Promise<StoredUser>;
  /** Replaces the keys (a password change); `UnknownUserError` if there is no such account. */
  replaceCredentials(jid: string, scram: UserCredentials): Promise<void>;
  get(jid: string): Promise<StoredUser | undefined>;
  exists(jid: string): Promise<boolean>;
  /**
   * When the JID's account was created (ms), read strongly consistent; undefined without one. It
   * tells accounts apart that held one JID one after the other (a deletion, then a new one).
   */
  createdAtOf(jid: string): Promise<number | undefined>;
  /** Removes the account and its failure count; `UnknownUserError` if there is none. */
  delete(jid: string): Promise<void>;
  /** Every account's bare JID, sorted. Administration only: a full Scan (see below). */
  list(): Promise<string[]>;
  /** The account (if any), its failure count and known addresses, in one strongly consistent Query. */
  loginRecord(jid: string): Promise<LoginRecord>;
  /** Remembers a successful login's source address (bounded; rewritten at most daily per address). */
  rememberAddress(jid: string, address: string, known: Record<string, number>): Promise<void>;
  /** Counts one failed attempt from a source address; returns the count in its window. */
  recordAddressFailure(address: string, windowSeconds: number): Promise<number>;
  addressFailures(address: string): Promise<number>;
  /**
   * The iteration count the deployment's SCRAM keys were last made with (by the admin CLI or a
   * password change): decoys for unknown users use it, so their challenge looks the same.
   */
  scramIterations(): Promise<number[]>;
  /**
   * Counts one failed attempt for `jid` (existing or not) and returns the count in the
   * current window, which starts at the first failure and lasts `windowSeconds`. With `frame`
   * (the request id of the frame that failed), a redelivery of that frame is not counted again.
   */
  recordAuthFailure(jid: string, windowSeconds: number, frame?: string): Promise<number>;
  authFailures(jid: string): Promise<number>;
  clearAuthFailures(jid: string): Promise<void>;
  /**
   * Counts an attempt on `of` (an account or a source address) before its password is checked,
   * in the same write that checks the limit: while the window's count is below `below`, or, for
   * an account, its last attempt is at or before `orLastAtMost` (epoch ms: one let through per
   * slowdown). Attempts arriving together cannot all pass a limit read before any was counted.
   * Undefined when refused (nothing counted). A failed attempt stays counted; one that succeeds
   * or is refused by another limit is given back (`giveBackAuthAttempt`). With `frame` (the
   * request id of the frame that makes the attempt), an attempt that frame counted already (its
   * first delivery died before its answer was saved, and SQS redelivered it) is not counted
   * again: it is returned as counted then, whatever the limit says now.
   */
  takeAuthAttempt(
    of: { account: string } | { address: string },
    windowSeconds: number,
    admit: { below: number; orLastAtMost?: number },
    frame?: string,
  ): Promise<AuthAttempt | undefined>;
  /** Uncounts a taken attempt, unless its window has ended since (a new one never counted it). */
  giveBackAuthAttempt(attempt: AuthAttempt): Promise<void>;
  /**
   * A random secret of the deployment, created on first use and the same for every Lambda:
   * keys the SASL decoys for unknown users, so their salts are stable yet unpredictable.
   */
  decoySecret(): Promise<string>;
}

export interface UserStoreOptions {
  /** Epoch milliseconds; tests move it to cross a failure window. */
  now?: () => number;
}

interface CredentialsItem {
  pk: string;
  sk: typeof CREDENTIALS;
  scram: UserCredentials;
  createdAt: number;
  updatedAt: number;
}

/** An attempt counted by `takeAuthAttempt`: its item, the count with it, and its window's end. */
export interface AuthAttempt {
  key: { pk: string; sk: string };
  failures: number;
  /** Epoch seconds (the item's TTL attribute). */
  expiresAt: number;
  /** The frame that counted it (`frames` on the item), given back with it. */
  frame?: string;
}

interface AuthFailureItem {
  pk: string;
  sk: typeof AUTH_FAILURES;
  failures: number;
  lastAt?: number;
  /**
   * The frames whose attempts the window counts (and has not given back): a redelivered frame
   * finds its own and is not counted twice. At most a window's failures (the limits keep those
   * few) plus the attempts in flight; a new window starts the set anew.
   */
  frames?: Set<string>;
  [TTL_ATTRIBUTE]: number;
}

function toUser(item: CredentialsItem): StoredUser {
  return { jid: item.pk, scram: item.scram, createdAt: item.createdAt, updatedAt: item.updatedAt };
}

export function createUserStore(
  doc: DynamoDBDocumentClient,
  tableName: string,
  options: UserStoreOptions = {},
): UserStore {
  const now = options.now ?? Date.now;
  const nowSeconds = () => Math.floor(now() / 1000);

  /** DynamoDB's TTL deletes late (hours, at worst), so a read ignores an expired count itself. */
  function liveFailures(item: AuthFailureItem | undefined): number {
    if (!item || item[TTL_ATTRIBUTE] <= nowSeconds()) return 0;
    return item.failures;
  }

  async function getAuthFailureItem(jid: string): Promise<AuthFailureItem | undefined> {
    const { Item } = await doc.send(
      new GetCommand({ TableName: tableName, Key: { pk: jid, sk: AUTH_FAILURES }, ConsistentRead: true }),
    );
    return Item as AuthFailureItem | undefined;
  }

  return {
    // An operator's command (`npm run user`), folded out of the functions' bundles (`adminOnly`).
    create:
      process.env.NIMBUS_ADMIN === 'false'
        ? adminOnly
        : async (jid, scram) => {
            const at = now();
            const item: CredentialsItem = { pk: jid, sk: CREDENTIALS, scram, createdAt: at, updatedAt: at };
            try {
              await doc.send(
                new PutCommand({
                  TableName: tableName,
                  Item: item,
                  ConditionExpression: 'attribute_not_exists(pk)',
                }),
              );
            } catch (error) {
              if (isConditionFailure(error)) throw new UserExistsError(jid);
              throw error;
            }
            await recordIterations(scram);
            return toUser(item);
          },

    // An operator's command (`npm run user`), folded out of the functions' bundles (`adminOnly`).
    replaceCredentials:
      process.env.NIMBUS_ADMIN === 'false'
        ? adminOnly
        : async (jid, scram) => {
            try {
              await doc.send(
                new UpdateCommand({
                  TableName: tableName,
                  Key: { pk: jid, sk: CREDENTIALS },
                  UpdateExpression: 'SET #scram = :scram, #updatedAt = :now',
                  ConditionExpression: 'attribute_exists(pk)',
                  ExpressionAttributeNames: { '#scram': 'scram', '#updatedAt': 'updatedAt' },
                  ExpressionAttributeValues: { ':scram': scram, ':now': now() },
                }),
              );
            } catch (error) {
              if (isConditionFailure(error)) throw new UnknownUserError(jid);
              throw error;
            }
            await recordIterations(scram);
          },

    async get(jid) {
      const { Item } = await doc.send(
        new GetCommand({ TableName: tableName, Key: { pk: jid, sk: CREDENTIALS } }),
      );
      return Item ? toUser(Item as CredentialsItem) : undefined;
    },

    async exists(jid) {
      const { Item } = await doc.send(
        new GetCommand({
          TableName: tableName,
          Key: { pk: jid, sk: CREDENTIALS },
          ProjectionExpression: 'pk',
        }),
      );
      return Item !== undefined;
    },

    async createdAtOf(jid) {
      const { Item } = await doc.send(
        new GetCommand({
          TableName: tableName,
          Key: { pk: jid, sk: CREDENTIALS },
          ProjectionExpression: 'createdAt',
          ConsistentRead: true,
        }),
      );
      return Item ? (Item.createdAt as number) : undefined;
    },

    // An operator's command (`npm run user`), folded out of the functions' bundles (`adminOnly`).
    delete:
      process.env.NIMBUS_ADMIN === 'false'
        ? adminOnly
        : async (jid) => {
            try {
              await doc.send(
                new DeleteCommand({
                  TableName: tableName,
                  Key: { pk: jid, sk: CREDENTIALS },
                  ConditionExpression: 'attribute_exists(pk)',
                }),
              );
            } catch (error) {
              if (isConditionFailure(error)) throw new UnknownUserError(jid);
              throw error;
            }
            await doc.send(new DeleteCommand({ TableName: tableName, Key: { pk: jid, sk: AUTH_FAILURES } }));
            await doc.send(new DeleteCommand({ TableName: tableName, Key: { pk: jid, sk: ADDRESSES } }));
          },

    // There is no index over all accounts, on purpose: no request path needs one. Listing is
    // an operator's command (`npm run user -- list`), so a Scan filtered to credentials items
    // is acceptable here and nowhere else; it reads (and pays for) the whole table. Folded out
    // of the functions' bundles (`adminOnly`).
    list:
      process.env.NIMBUS_ADMIN === 'false'
        ? adminOnly
        : async () => {
            const jids: string[] = [];
            let startKey: Record<string, unknown> | undefined;
            do {
              const page = await doc.send(
                new ScanCommand({
                  TableName: tableName,
                  FilterExpression: 'sk = :credentials',
                  ProjectionExpression: 'pk',
                  ExpressionAttributeValues: { ':credentials': CREDENTIALS },
                  ExclusiveStartKey: startKey,
                }),
              );
              for (const item of page.Items ?? []) jids.push(item.pk as string);
              startKey = page.LastEvaluatedKey;
            } while (startKey);
            return jids.sort();
          },

    async loginRecord(jid) {
      const { Items = [] } = await doc.send(
        new QueryCommand({
          TableName: tableName,
          KeyConditionExpression: 'pk = :jid',
          ExpressionAttributeValues: { ':jid': jid },
          ConsistentRead: true,
        }),
      );
      const credentials = Items.find((item) => item.sk === CREDENTIALS) as CredentialsItem | undefined;
      const failures = Items.find((item) => item.sk === AUTH_FAILURES) as AuthFailureItem | undefined;
      const addresses = Items.find((item) => item.sk === ADDRESSES)?.addresses as
        | Record<string, number>
        | undefined;
      const authFailures = liveFailures(failures);
      return {
        ...(credentials ? { user: toUser(credentials) } : {}),
        authFailures,
        ...(authFailures > 0 && failures?.lastAt !== undefined ? { lastFailureAt: failures.lastAt } : {}),
        knownAddresses: addresses ?? {},
      };
    },

    async recordAuthFailure(jid, windowSeconds, frame) {
      return countFailure({ pk: jid, sk: AUTH_FAILURES }, windowSeconds, frame);
    },

    async authFailures(jid) {
      return liveFailures(await getAuthFailureItem(jid));
    },

    async recordAddressFailure(address, windowSeconds) {
      return countFailure(addressKey(address), windowSeconds);
    },

    async addressFailures(address) {
      const { Item } = await doc.send(
        new GetCommand({ TableName: tableName, Key: addressKey(address), ConsistentRead: true }),
      );
      return liveFailures(Item as AuthFailureItem | undefined);
    },

    async rememberAddress(jid, address, known) {
      const now = Date.now();
      if ((known[address] ?? 0) > now - ADDRESS_REFRESH_MS) return;
      const kept = Object.entries({ ...known, [address]: now })
        .sort((a, b) => b[1] - a[1])
        .slice(0, KNOWN_ADDRESSES);
      await doc.send(
        new PutCommand({
          TableName: tableName,
          Item: { pk: jid, sk: ADDRESSES, addresses: Object.fromEntries(kept) },
        }),
      );
    },

    async scramIterations() {
      const { Item } = await doc.send(
        new GetCommand({ TableName: tableName, Key: SERVER_KEY, ConsistentRead: true }),
      );
      // `iterationSet` since the decoys pick among every count in use; `iterations`, the last one
      // recorded, before.
      const counts = new Set<number>((Item?.iterationSet as Set<number> | undefined) ?? []);
      if (typeof Item?.iterations === 'number') counts.add(Item.iterations);
      return [...counts].sort((a, b) => a - b);
    },

    async clearAuthFailures(jid) {
      await doc.send(new DeleteCommand({ TableName: tableName, Key: { pk: jid, sk: AUTH_FAILURES } }));
    },

    takeAuthAttempt(of, windowSeconds, admit, frame) {
      const key = 'account' in of ? { pk: of.account, sk: AUTH_FAILURES } : addressKey(of.address);
      return countAttempt(key, windowSeconds, admit, frame);
    },

    async giveBackAuthAttempt(attempt) {
      // With its frame: only while the window still counts it (given back once, however often
      // the frame runs), and the frame leaves the set, so that a redelivery counts anew.
      const byFrame = attempt.frame !== undefined;
      try {
        await doc.send(
          new UpdateCommand({
            TableName: tableName,
            Key: attempt.key,
            UpdateExpression: `ADD #failures :minusOne${byFrame ? ' DELETE #frames :frames' : ''}`,
            ConditionExpression: `#expiresAt = :expiresAt AND #failures > :zero${byFrame ? ' AND contains(#frames, :frame)' : ''}`,
            ExpressionAttributeNames: {
              '#failures': 'failures',
              '#expiresAt': TTL_ATTRIBUTE,
              ...(byFrame ? { '#frames': 'frames' } : {}),
            },
            ExpressionAttributeValues: {
              ':minusOne': -1,
              ':zero': 0,
              ':expiresAt': attempt.expiresAt,
              ...(byFrame ? { ':frames': new Set([attempt.frame]), ':frame': attempt.frame } : {}),
            },
          }),
        );
      } catch (error) {
        // Cleared (a success) or a new window since: nothing of this attempt is counted any more.
        if (!isConditionFailure(error)) throw error;
      }
    },

    async decoySecret() {
      const key = SERVER_KEY;
      const read = async () =>
        (await doc.send(new GetCommand({ TableName: tableName, Key: key, ConsistentRead: true }))).Item
          ?.secret as string | undefined;
      const existing = await read();
      if (existing) return existing;
      try {
        const secret = randomBytes(32).toString('base64');
        await doc.send(
          new UpdateCommand({
            TableName: tableName,
            Key: key,
            UpdateExpression: 'SET secret = :secret',
            ConditionExpression: 'attribute_not_exists(secret)',
            ExpressionAttributeValues: { ':secret': secret },
          }),
        );
        return secret;
      } catch (error) {
        // Another Lambda created it first: use theirs.
        if (!isConditionFailure(error)) throw error;
        return (await read()) as string;
      }
    },
  };

  /** Records the iteration count of keys just stored, for the decoys (see scramIterations). */
  async function recordIterations(scram: UserCredentials): Promise<void> {
    await doc.send(
      new UpdateCommand({
        TableName: tableName,
        Key: SERVER_KEY,
        UpdateExpression: 'SET iterations = :iterations ADD iterationSet :set',
        ExpressionAttributeValues: {
          ':iterations': scram.sha256.iterations,
          ':set': new Set([scram.sha256.iterations]),
        },
      }),
    );
  }

  /**
   * Counts a failure in the window that starts at the first failure and lasts `windowSeconds`
   * (the item expires with it).
   */
  async function countFailure(
    key: { pk: string; sk: string },
    windowSeconds: number,
    frame?: string,
  ): Promise<number> {
    return ((await countAttempt(key, windowSeconds, undefined, frame)) as AuthAttempt).failures;
  }

  /**
   * Counts one attempt in the live window (an ADD), else restarts an expired one (a SET, which
   * a concurrent attempt may do first, sending this one back to the ADD). With `admit`, the ADD
   * is made only while the count is below `admit.below` (or the last attempt is at or before
   * `admit.orLastAtMost`), in the same write: undefined when refused (nothing counted). With
   * `frame`, the frame goes into the window's `frames` in the same write, and a window that has
   * it already counted this frame's attempt: returned as it stands, counted once.
   */
  async function countAttempt(
    key: { pk: string; sk: string },
    windowSeconds: number,
    admit?: { below: number; orLastAtMost?: number },
    frame?: string,
  ): Promise<AuthAttempt | undefined> {
    const byFrame = frame !== undefined;
    const frameNames: Record<string, string> = byFrame ? { '#frames': 'frames' } : {};
    const frameValues: Record<string, unknown> = byFrame ? { ':frames': new Set([frame]) } : {};
    for (let attempt = 0; attempt < 3; attempt++) {
      const at = nowSeconds();
      const limit = admit
        ? ` AND (attribute_not_exists(#failures) OR #failures < :below${
            admit.orLastAtMost === undefined ? '' : ' OR lastAt <= :lastAtMost'
          })`
        : '';
      try {
        const { Attributes } = await doc.send(
          new UpdateCommand({
            TableName: tableName,
            Key: key,
            UpdateExpression: `ADD #failures :one${byFrame ? ', #frames :frames' : ''} SET #expiresAt = if_not_exists(#expiresAt, :expiresAt), lastAt = :lastAt`,
            ConditionExpression: `(attribute_not_exists(#expiresAt) OR #expiresAt > :now)${limit}${byFrame ? ' AND NOT contains(#frames, :frame)' : ''}`,
            ExpressionAttributeNames: { '#failures': 'failures', '#expiresAt': TTL_ATTRIBUTE, ...frameNames },
            ExpressionAttributeValues: {
              ':one': 1,
              ':expiresAt': at + windowSeconds,
              ':now': at,
              ':lastAt': now(),
              ...(admit ? { ':below': admit.below } : {}),
              ...(admit?.orLastAtMost === undefined ? {} : { ':lastAtMost': admit.orLastAtMost }),
              ...frameValues,
              ...(byFrame ? { ':frame': frame } : {}),
            },
            // The whole (small) item: the window's end is wanted even when if_not_exists kept it.
            ReturnValues: 'ALL_NEW',
            ...(admit || byFrame ? { ReturnValuesOnConditionCheckFailure: 'ALL_OLD' as const } : {}),
          }),
        );
        return {
          key,
          failures: Attributes?.failures as number,
          expiresAt: Attributes?.[TTL_ATTRIBUTE] as number,
          ...(byFrame ? { frame } : {}),
        };
      } catch (error) {
        if (!isConditionFailure(error)) throw error;
        const old = (error as { Item?: Parameters<typeof unmarshall>[0] }).Item;
        const item = old ? (unmarshall(old) as AuthFailureItem) : undefined;
        const live = item !== undefined && item[TTL_ATTRIBUTE] > at;
        // This frame's attempt, counted by its earlier delivery in this live window.
        if (byFrame && live && item.frames?.has(frame))
          return { key, failures: item.failures, expiresAt: item[TTL_ATTRIBUTE], frame };
        // Refused by the limit in a live window: not counted.
        if (admit && live) return undefined;
      }
      try {
        await doc.send(
          new UpdateCommand({
            TableName: tableName,
            Key: key,
            UpdateExpression: `SET #failures = :one, #expiresAt = :expiresAt, lastAt = :lastAt${byFrame ? ', #frames = :frames' : ' REMOVE #frames'}`,
            ConditionExpression: '#expiresAt <= :now',
            ExpressionAttributeNames: {
              '#failures': 'failures',
              '#expiresAt': TTL_ATTRIBUTE,
              '#frames': 'frames',
            },
            ExpressionAttributeValues: {
              ':one': 1,
              ':expiresAt': at + windowSeconds,
              ':now': at,
              ':lastAt': now(),
              ...frameValues,
            },
          }),
        );
        return { key, failures: 1, expiresAt: at + windowSeconds, ...(byFrame ? { frame } : {}) };
      } catch (error) {
        if (!isConditionFailure(error)) throw error;
      }
    }
    throw new Error(`could not count an authentication failure for ${key.pk}: window kept changing`);
  }
}
