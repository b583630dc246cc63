import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  DescribeTableCommand,
  DescribeTimeToLiveCommand,
  DynamoDBClient,
  ListTablesCommand,
} from '@aws-sdk/client-dynamodb';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createTables, type TableNames } from '../../infra/local/create-tables.ts';
import { type DynamoDbLocal, findFreePort, startDynamoDbLocal } from '../../infra/local/dynamodb-local.ts';
import { allTables, type IndexDefinition, projectionOf } from '../../shared/tables.ts';
import { createTestTables, testDynamoDbClient } from '../support/dynamodb.ts';

function clientFor(endpoint: string): DynamoDBClient {
  return new DynamoDBClient({
    endpoint,
    region: 'us-east-1',
    credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
    maxAttempts: 1,
  });
}

function includedAttributes(index: IndexDefinition): string[] | undefined {
  const projection = projectionOf(index);
  return projection.type === 'INCLUDE' ? projection.attributes : undefined;
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code !== 'ESRCH';
  }
}

const names: TableNames = {
  Users: 'it-users',
  Sessions: 'it-sessions',
  Offline: 'it-offline',
  Roster: 'it-roster',
  Archive: 'it-archive',
};

describe('DynamoDB Local started on a free port, in memory', () => {
  let database: DynamoDbLocal;
  let client: DynamoDBClient;

  beforeAll(async () => {
    database = await startDynamoDbLocal({ port: await findFreePort() });
    client = clientFor(database.endpoint);
  });

  afterAll(async () => {
    client?.destroy();
    await database?.stop();
  });

  test('answers on 127.0.0.1 at the port it was given', async () => {
    expect(database.endpoint).toBe(`http://127.0.0.1:${database.port}`);
    const listed = await client.send(new ListTablesCommand({}));
    expect(listed.TableNames).toEqual([]);
  });

  test('creates every table of the definitions, and running it again changes nothing', async () => {
    await createTables(client, names);
    await createTables(client, names);
    const listed = await client.send(new ListTablesCommand({}));
    expect(listed.TableNames?.sort()).toEqual(Object.values(names).sort());
  });

  test.each(allTables.map((definition) => [definition.id, definition] as const))(
    '%s has the keys, indexes and TTL of its definition',
    async (id, definition) => {
      await createTables(client, names);
      const { Table: table } = await client.send(new DescribeTableCommand({ TableName: names[id] }));
      expect(table?.BillingModeSummary?.BillingMode).toBe('PAY_PER_REQUEST');
      expect(table?.KeySchema).toEqual([
        { AttributeName: definition.partitionKey.name, KeyType: 'HASH' },
        { AttributeName: definition.sortKey.name, KeyType: 'RANGE' },
      ]);
      const indexes = (table?.GlobalSecondaryIndexes ?? []).map((index) => ({
        name: index.IndexName,
        keys: index.KeySchema,
        projection: index.Projection?.ProjectionType,
        included: index.Projection?.NonKeyAttributes,
      }));
      // DescribeTable lists indexes in no particular order.
      const byName = (a: { name?: string }, b: { name?: string }) =>
        String(a.name).localeCompare(String(b.name));
      indexes.sort(byName);
      expect(indexes).toEqual(
        definition.globalSecondaryIndexes
          .map((index) => ({
            name: index.indexName,
            keys: [
              { AttributeName: index.partitionKey.name, KeyType: 'HASH' },
              ...(index.sortKey ? [{ AttributeName: index.sortKey.name, KeyType: 'RANGE' }] : []),
            ],
            projection: projectionOf(index).type,
            included: includedAttributes(index),
          }))
          .sort(byName),
      );
      const ttl = await client.send(new DescribeTimeToLiveCommand({ TableName: names[id] }));
      expect(ttl.TimeToLiveDescription).toMatchObject({
        TimeToLiveStatus: 'ENABLED',
        AttributeName: definition.timeToLiveAttribute,
      });
    },
  );

  test('the sessions table carries the sweep index with its numeric sort key', async () => {
    await createTables(client, names);
    const { Table: table } = await client.send(new DescribeTableCommand({ TableName: names.Sessions }));
    expect(table?.GlobalSecondaryIndexes?.map((index) => index.IndexName)).toEqual(['bySweepKeys']);
    // Keys only: a queued stanza or an ack writes no index entry.
    expect(table?.GlobalSecondaryIndexes?.[0]?.Projection?.ProjectionType).toBe('KEYS_ONLY');
    expect(table?.AttributeDefinitions).toContainEqual({ AttributeName: 'sweepAt', AttributeType: 'N' });
  });

  test('refuses to start on a port that is taken', async () => {
    await expect(startDynamoDbLocal({ port: database.port })).rejects.toThrow(/port \d+ is already in use/);
  });
});

describe('stopping DynamoDB Local', () => {
  test('stop() ends the Java process and frees the port', async () => {
    const database = await startDynamoDbLocal({ port: await findFreePort() });
    expect(isRunning(database.pid)).toBe(true);
    await database.stop();
    expect(isRunning(database.pid)).toBe(false);
    const client = clientFor(database.endpoint);
    await expect(client.send(new ListTablesCommand({}))).rejects.toThrow();
    client.destroy();
    await database.stop();
  });

  test('keeps its tables on disk across restarts with a data directory, created if missing', async () => {
    const root = await mkdtemp(join(tmpdir(), 'nimbus-ddb-'));
    const dataDir = join(root, 'nested', 'data');
    try {
      const first = await startDynamoDbLocal({ port: await findFreePort(), dataDir });
      const firstClient = clientFor(first.endpoint);
      await createTables(firstClient, names);
      firstClient.destroy();
      await first.stop();

      const second = await startDynamoDbLocal({ port: await findFreePort(), dataDir });
      const secondClient = clientFor(second.endpoint);
      try {
        const listed = await secondClient.send(new ListTablesCommand({}));
        expect(listed.TableNames?.sort()).toEqual(Object.values(names).sort());
      } finally {
        secondClient.destroy();
        await second.stop();
      }
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });

  test('reports a Java that dies during start-up, with its output', async () => {
    const previous = process.env.JAVA_TOOL_OPTIONS;
    process.env.JAVA_TOOL_OPTIONS = '-XX:+NimbusNoSuchOption';
    try {
      await expect(startDynamoDbLocal({ port: await findFreePort() })).rejects.toThrow(
        /exited during start-up[\s\S]*Unrecognized VM option 'NimbusNoSuchOption'/,
      );
    } finally {
      if (previous === undefined) delete process.env.JAVA_TOOL_OPTIONS;
      else process.env.JAVA_TOOL_OPTIONS = previous;
    }
  });
});

describe('the shared test database', () => {
  test('createTestTables makes fresh, uniquely named tables on it', async () => {
    const first = await createTestTables();
    const second = await createTestTables();
    expect(first.users).toMatch(/^t[0-9a-f]{12}-users$/);
    expect(new Set([...Object.values(first), ...Object.values(second)]).size).toBe(2 * allTables.length);
    const client = testDynamoDbClient();
    try {
      // ListTables answers at most 100 names a page, and the run's other suites make many tables.
      const names: string[] = [];
      let start: string | undefined;
      do {
        const page = await client.send(new ListTablesCommand({ ExclusiveStartTableName: start }));
        names.push(...(page.TableNames ?? []));
        start = page.LastEvaluatedTableName;
      } while (start);
      expect(names).toEqual(expect.arrayContaining([...Object.values(first), ...Object.values(second)]));
    } finally {
      client.destroy();
    }
  });
});
