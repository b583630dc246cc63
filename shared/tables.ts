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
}

export interface TableDefinition {
  /** Logical id: used for the CDK construct, the environment variable and the local name. */
  id: 'Users' | 'Sessions' | 'Offline' | 'Roster';
  /** Environment variable that carries the physical table name to a function. */
  envVar: string;
  partitionKey: KeyDefinition;
  sortKey: KeyDefinition;
  globalSecondaryIndexes: IndexDefinition[];
  /** Attribute holding an epoch-seconds expiry; DynamoDB's TTL deletes the item after it. */
  timeToLiveAttribute: string;
  /** Tables holding user data get point-in-time recovery. */
  pointInTimeRecovery: boolean;
}

const pk: KeyDefinition = { name: 'pk', type: 'S' };
const sk: KeyDefinition = { name: 'sk', type: 'S' };

export const TTL_ATTRIBUTE = 'expiresAt';

export const usersTable: TableDefinition = {
  id: 'Users',
  envVar: 'USERS_TABLE',
  partitionKey: pk,
  sortKey: sk,
  globalSecondaryIndexes: [],
  timeToLiveAttribute: TTL_ATTRIBUTE,
  pointInTimeRecovery: true,
};

/** Index of sessions waiting for their resumption window to close (sparse: only detached ones). */
export const SWEEP_INDEX = 'bySweepTime';

export const sessionsTable: TableDefinition = {
  id: 'Sessions',
  envVar: 'SESSIONS_TABLE',
  partitionKey: pk,
  sortKey: sk,
  globalSecondaryIndexes: [
    {
      indexName: SWEEP_INDEX,
      partitionKey: { name: 'sweepShard', type: 'S' },
      sortKey: { name: 'sweepAt', type: 'N' },
    },
  ],
  timeToLiveAttribute: TTL_ATTRIBUTE,
  // Connection state is ephemeral: it dies with the socket or the resumption window.
  pointInTimeRecovery: false,
};

export const offlineTable: TableDefinition = {
  id: 'Offline',
  envVar: 'OFFLINE_TABLE',
  partitionKey: pk,
  sortKey: sk,
  globalSecondaryIndexes: [],
  timeToLiveAttribute: TTL_ATTRIBUTE,
  pointInTimeRecovery: true,
};

/**
 * RFC 6121 rosters: per user, one item per contact (roster item, pending inbound request or
 * pre-approval) and one meta item with the roster version and item counts
 * (`shared/store/roster.ts`).
 */
export const rosterTable: TableDefinition = {
  id: 'Roster',
  envVar: 'ROSTER_TABLE',
  partitionKey: pk,
  sortKey: sk,
  globalSecondaryIndexes: [],
  // No roster item expires; the attribute is declared so every table has the same shape.
  timeToLiveAttribute: TTL_ATTRIBUTE,
  pointInTimeRecovery: true,
};

export const allTables: readonly TableDefinition[] = [usersTable, sessionsTable, offlineTable, rosterTable];

/** Physical name used by the local runner and tests (`<prefix>-users`, …). */
export function localTableName(def: TableDefinition, prefix = 'nimbus'): string {
  return `${prefix}-${def.id.toLowerCase()}`;
}
