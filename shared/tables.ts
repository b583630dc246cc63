/**
 * The DynamoDB tables, defined once. The CDK stack, the local runner and the tests all build
 * their tables from these definitions; `docs/data-model.md` explains each access pattern.
 *
 * Every table uses generic `pk`/`sk` string keys so one table can hold the few item kinds of
 * one concern (see the store modules under `shared/store/`).
 */
export interface KeyDefinition {
  name: string;
  type: 'S' | 'N';
}

export interface IndexDefinition {
  indexName: string;
  partitionKey: KeyDefinition;
  sortKey?: KeyDefinition;
  /**
   * What the index copies. Default ALL. INCLUDE names the non-key attributes copied: an update
   * of an attribute the index does not copy writes nothing to the index (no write units).
   */
  projection?: { type: 'ALL' } | { type: 'KEYS_ONLY' } | { type: 'INCLUDE'; attributes: string[] };
}

export interface TableDefinition {
  /** Logical id: used for the CDK construct, the environment variable and the local name. */
  id: 'Users' | 'Sessions' | 'Offline' | 'Roster' | 'Archive';
  /** Environment variable that carries the physical table name to a function. */
  envVar: string;
  partitionKey: KeyDefinition;
  sortKey: KeyDefinition;
  globalSecondaryIndexes: IndexDefinition[];
  /** Attribute holding an epoch-seconds expiry; DynamoDB's TTL deletes the item after it. */
  timeToLiveAttribute: string;
  /** Tables holding user data get point-in-time recovery. */
  pointInTimeRecovery: boolean;
  /**
   * Written with BatchWriteItem (the archive's removals and purges, 25 deletes a request): only
   * such a table's writers are granted that action.
   */
  batchWrites?: boolean;
}

/**
 * Each table's logical id and the environment variable that names it to a function: all the
 * functions need of the definitions below (`shared/config.ts`), kept apart so that their bundles
 * leave the key schemas and indexes out.
 */
export const TABLE_NAMES = {
  users: { id: 'Users', envVar: 'USERS_TABLE' },
  sessions: { id: 'Sessions', envVar: 'SESSIONS_TABLE' },
  offline: { id: 'Offline', envVar: 'OFFLINE_TABLE' },
  roster: { id: 'Roster', envVar: 'ROSTER_TABLE' },
  archive: { id: 'Archive', envVar: 'ARCHIVE_TABLE' },
} as const satisfies Record<string, Pick<TableDefinition, 'id' | 'envVar'>>;

/** A table's definition under its names; a pure call, so that a bundle using only the names drops it. */
function table(
  name: keyof typeof TABLE_NAMES,
  rest: Omit<TableDefinition, 'id' | 'envVar'>,
): TableDefinition {
  return { ...TABLE_NAMES[name], ...rest };
}

const pk: KeyDefinition = { name: 'pk', type: 'S' };
const sk: KeyDefinition = { name: 'sk', type: 'S' };

export const TTL_ATTRIBUTE = 'expiresAt';

export const usersTable = /* @__PURE__ */ table('users', {
  partitionKey: pk,
  sortKey: sk,
  globalSecondaryIndexes: [],
  timeToLiveAttribute: TTL_ATTRIBUTE,
  pointInTimeRecovery: true,
});

/**
 * Index of stream-management sessions by when the sweeper looks at them (sparse: attached ones
 * for their liveness probe, detached ones for their resumption window, interrupted re-routes).
 * Keys only: the sweeper reads the items by key, and a queued stanza or an ack writes no index
 * entry (with the whole item projected, each doubled its write units).
 */
export const SWEEP_INDEX = 'bySweepKeys';

export const sessionsTable = /* @__PURE__ */ table('sessions', {
  partitionKey: pk,
  sortKey: sk,
  globalSecondaryIndexes: [
    {
      indexName: SWEEP_INDEX,
      partitionKey: { name: 'sweepShard', type: 'S' },
      sortKey: { name: 'sweepAt', type: 'N' },
      projection: { type: 'KEYS_ONLY' },
    },
  ],
  timeToLiveAttribute: TTL_ATTRIBUTE,
  // Connection state is ephemeral: it dies with the socket or the resumption window.
  pointInTimeRecovery: false,
});

export const offlineTable = /* @__PURE__ */ table('offline', {
  partitionKey: pk,
  sortKey: sk,
  globalSecondaryIndexes: [],
  timeToLiveAttribute: TTL_ATTRIBUTE,
  pointInTimeRecovery: true,
});

/**
 * RFC 6121 rosters: per user, one item per contact (roster item, pending inbound request or
 * pre-approval) and one meta item with the roster version and item counts
 * (`shared/store/roster.ts`).
 */
export const rosterTable = /* @__PURE__ */ table('roster', {
  partitionKey: pk,
  sortKey: sk,
  globalSecondaryIndexes: [],
  // No roster item expires; the attribute is declared so every table has the same shape.
  timeToLiveAttribute: TTL_ATTRIBUTE,
  pointInTimeRecovery: true,
});

/*
 * XEP-0136 Message Archiving. Item kinds and access patterns: docs/data-model.md ("Archive
 * table") and shared/store/archive.ts. Collection headers live in the owner's partition
 * (`pk = <owner bare JID>`, `sk = c#<start>/<with>`), each collection's messages and
 * EncryptedKeys in a partition of their own (`pk = <owner>/<collection id>`).
 */

/** Collection headers by the full JID they were exchanged with (sort: the header's `sk`, i.e. start). */
export const ARCHIVE_WITH_FULL_INDEX = 'byWithFull';
/** Collection headers by the bare JID they were exchanged with. */
export const ARCHIVE_WITH_BARE_INDEX = 'byWithBare';
/** Collection headers by the domain they were exchanged with. */
export const ARCHIVE_WITH_DOMAIN_INDEX = 'byWithDomain';
/** Headers and removal tombstones by change time: the `<modified/>` log. */
export const ARCHIVE_CHANGE_INDEX = 'byChange';
/**
 * Headers of collections that expire, by the time their next message expires (`nextExpiry`,
 * epoch seconds), in a few shards (`expShard`): the sweep that records expiries for `<modified/>`.
 */
export const ARCHIVE_EXPIRY_INDEX = 'byExpiry';
/** EncryptedKey items by the public key that encrypts them (`<keys/>`). */
export const ARCHIVE_KEY_NAME_INDEX = 'byKeyName';

/** What a list page shows of a header: the `with` indexes copy only these (not the change time). */
const HEADER_LIST_ATTRIBUTES = ['with', 'start', 'subject', 'crypt', 'cid', TTL_ATTRIBUTE];

export const archiveTable = /* @__PURE__ */ table('archive', {
  batchWrites: true,
  partitionKey: pk,
  sortKey: sk,
  globalSecondaryIndexes: [
    {
      indexName: ARCHIVE_WITH_FULL_INDEX,
      partitionKey: { name: 'wFull', type: 'S' },
      sortKey: sk,
      projection: { type: 'INCLUDE', attributes: HEADER_LIST_ATTRIBUTES },
    },
    {
      indexName: ARCHIVE_WITH_BARE_INDEX,
      partitionKey: { name: 'wBare', type: 'S' },
      sortKey: sk,
      projection: { type: 'INCLUDE', attributes: HEADER_LIST_ATTRIBUTES },
    },
    {
      indexName: ARCHIVE_WITH_DOMAIN_INDEX,
      partitionKey: { name: 'wDomain', type: 'S' },
      sortKey: sk,
      projection: { type: 'INCLUDE', attributes: HEADER_LIST_ATTRIBUTES },
    },
    {
      indexName: ARCHIVE_CHANGE_INDEX,
      partitionKey: { name: 'changeOwner', type: 'S' },
      sortKey: { name: 'changeKey', type: 'S' },
      // The table's keys say it all: `sk` is c#<start>/<with> (changed) or r#<start>/<with> (removed).
      projection: { type: 'KEYS_ONLY' },
    },
    {
      indexName: ARCHIVE_EXPIRY_INDEX,
      partitionKey: { name: 'expShard', type: 'S' },
      sortKey: { name: 'nextExpiry', type: 'N' },
      projection: { type: 'INCLUDE', attributes: ['cid', 'changeKey', TTL_ATTRIBUTE] },
    },
    {
      indexName: ARCHIVE_KEY_NAME_INDEX,
      partitionKey: { name: 'keyOwner', type: 'S' },
      sortKey: { name: 'keyRef', type: 'S' },
      projection: { type: 'INCLUDE', attributes: ['with', 'start', 'xml'] },
    },
  ],
  timeToLiveAttribute: TTL_ATTRIBUTE,
  pointInTimeRecovery: true,
});

export const allTables: readonly TableDefinition[] = [
  usersTable,
  sessionsTable,
  offlineTable,
  rosterTable,
  archiveTable,
];

/** The projection of an index, ALL when its definition does not say. */
export function projectionOf(index: IndexDefinition): NonNullable<IndexDefinition['projection']> {
  return index.projection ?? { type: 'ALL' };
}

/** Physical name used by the local runner and tests (`<prefix>-users`, …). */
export function localTableName(def: Pick<TableDefinition, 'id'>, prefix = 'nimbus'): string {
  return `${prefix}-${def.id.toLowerCase()}`;
}
