/**
 * Creates the tables of `shared/tables.ts` on DynamoDB Local (the local runner, the tests), the
 * same definitions the CDK stack deploys. Idempotent: tables that exist are left as they are.
 */
import {
  type AttributeDefinition,
  CreateTableCommand,
  DescribeTimeToLiveCommand,
  DynamoDBClient,
  type KeySchemaElement,
  type Projection,
  ResourceInUseException,
  UpdateTimeToLiveCommand,
  waitUntilTableExists,
} from '@aws-sdk/client-dynamodb';
import type { Config } from '../../shared/config.ts';
import {
  allTables,
  type IndexDefinition,
  type KeyDefinition,
  localTableName,
  projectionOf,
  type TableDefinition,
} from '../../shared/tables.ts';

export type TableNames = Record<TableDefinition['id'], string>;

/** The key of a table in `Config['tables']`: its id in lower case. */
const configKey = (definition: TableDefinition) => definition.id.toLowerCase() as keyof Config['tables'];

/** The physical names of `Config['tables']` keyed by table id. */
export function tableNamesOf(tables: Config['tables']): TableNames {
  return Object.fromEntries(
    allTables.map((definition) => [definition.id, tables[configKey(definition)]]),
  ) as TableNames;
}

/**
 * Every table of the definitions, named `<prefix>-<id>`, created on the DynamoDB Local at
 * `endpoint` (benches and tests): the `Config['tables']` that names them.
 */
export async function createPrefixedTables(
  endpoint: string,
  region: string,
  prefix: string,
): Promise<Config['tables']> {
  const tables = Object.fromEntries(
    allTables.map((definition) => [configKey(definition), localTableName(definition, prefix)]),
  ) as Config['tables'];
  const client = new DynamoDBClient({
    endpoint,
    region,
    credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
  });
  try {
    await createTables(client, tableNamesOf(tables));
  } finally {
    client.destroy();
  }
  return tables;
}

export async function createTables(
  client: DynamoDBClient,
  names: TableNames,
  definitions: readonly TableDefinition[] = allTables,
): Promise<void> {
  await Promise.all(definitions.map((definition) => createTable(client, names[definition.id], definition)));
}

async function createTable(
  client: DynamoDBClient,
  tableName: string,
  definition: TableDefinition,
): Promise<void> {
  try {
    await client.send(
      new CreateTableCommand({
        TableName: tableName,
        BillingMode: 'PAY_PER_REQUEST',
        AttributeDefinitions: attributeDefinitions(definition),
        KeySchema: keySchema(definition.partitionKey, definition.sortKey),
        GlobalSecondaryIndexes:
          definition.globalSecondaryIndexes.length === 0
            ? undefined
            : definition.globalSecondaryIndexes.map((index) => ({
                IndexName: index.indexName,
                KeySchema: keySchema(index.partitionKey, index.sortKey),
                Projection: projection(index),
              })),
      }),
    );
  } catch (error) {
    if (!(error instanceof ResourceInUseException)) throw error;
  }
  await waitUntilTableExists({ client, maxWaitTime: 60, minDelay: 1, maxDelay: 2 }, { TableName: tableName });
  await enableTimeToLive(client, tableName, definition.timeToLiveAttribute);
}

async function enableTimeToLive(client: DynamoDBClient, tableName: string, attribute: string): Promise<void> {
  const current = await client.send(new DescribeTimeToLiveCommand({ TableName: tableName }));
  const status = current.TimeToLiveDescription?.TimeToLiveStatus;
  // Enabling it twice is a ValidationException, so only a table without TTL gets the update.
  if (status === 'ENABLED' || status === 'ENABLING') return;
  await client.send(
    new UpdateTimeToLiveCommand({
      TableName: tableName,
      TimeToLiveSpecification: { AttributeName: attribute, Enabled: true },
    }),
  );
}

function projection(index: IndexDefinition): Projection {
  const wanted = projectionOf(index);
  return wanted.type === 'INCLUDE'
    ? { ProjectionType: 'INCLUDE', NonKeyAttributes: wanted.attributes }
    : { ProjectionType: wanted.type };
}

function keySchema(partitionKey: KeyDefinition, sortKey?: KeyDefinition): KeySchemaElement[] {
  const schema: KeySchemaElement[] = [{ AttributeName: partitionKey.name, KeyType: 'HASH' }];
  if (sortKey) schema.push({ AttributeName: sortKey.name, KeyType: 'RANGE' });
  return schema;
}

/** Every attribute used by the table's or an index's key, declared once. */
function attributeDefinitions(definition: TableDefinition): AttributeDefinition[] {
  const keys = [
    definition.partitionKey,
    definition.sortKey,
    ...definition.globalSecondaryIndexes.flatMap((index) =>
      index.sortKey ? [index.partitionKey, index.sortKey] : [index.partitionKey],
    ),
  ];
  const byName = new Map<string, KeyDefinition>();
  for (const key of keys) {
    const known = byName.get(key.name);
    if (known && known.type !== key.type) {
      throw new Error(
        `${definition.id}: attribute ${key.name} is declared both ${known.type} and ${key.type}`,
      );
    }
    byName.set(key.name, key);
  }
  return [...byName.values()].map((key) => ({ AttributeName: key.name, AttributeType: key.type }));
}
