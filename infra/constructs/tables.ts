import { RemovalPolicy } from 'aws-cdk-lib';
import * as dynamodb from 'aws-cdk-lib/aws-dynamodb';
import * as iam from 'aws-cdk-lib/aws-iam';
import type * as lambda from 'aws-cdk-lib/aws-lambda';
import { Construct } from 'constructs';
import {
  allTables,
  type IndexDefinition,
  type KeyDefinition,
  projectionOf,
  type TableDefinition,
} from '../../shared/tables.ts';

/** What a function may do with a table's items. */
export type TableAccess = 'read' | 'readWrite';

/*
 * Item-level actions only, and deliberately no `dynamodb:Scan`: every access pattern in
 * docs/data-model.md is a GetItem or a Query, so a Scan creeping onto a request path fails
 * with AccessDenied instead of quietly reading the whole table. (`grantReadData` would allow Scan.)
 * Transactions need no action of their own: DynamoDB checks each item's Put/Update/Delete/ConditionCheck.
 */
const READ_ACTIONS = [
  'dynamodb:GetItem',
  'dynamodb:BatchGetItem',
  'dynamodb:Query',
  'dynamodb:ConditionCheckItem',
];
const WRITE_ACTIONS = ['dynamodb:PutItem', 'dynamodb:UpdateItem', 'dynamodb:DeleteItem'];
/** Only for a table whose definition says it is written in batches (TableDefinition.batchWrites). */
const BATCH_WRITE_ACTION = 'dynamodb:BatchWriteItem';

function attribute(key: KeyDefinition): dynamodb.Attribute {
  return {
    name: key.name,
    type: key.type === 'N' ? dynamodb.AttributeType.NUMBER : dynamodb.AttributeType.STRING,
  };
}

function projection(
  index: IndexDefinition,
): Pick<dynamodb.GlobalSecondaryIndexPropsV2, 'projectionType' | 'nonKeyAttributes'> {
  const wanted = projectionOf(index);
  if (wanted.type === 'INCLUDE')
    return { projectionType: dynamodb.ProjectionType.INCLUDE, nonKeyAttributes: wanted.attributes };
  return {
    projectionType:
      wanted.type === 'KEYS_ONLY' ? dynamodb.ProjectionType.KEYS_ONLY : dynamodb.ProjectionType.ALL,
  };
}

/**
 * Indexes a stack deployed before may still carry, kept for one deployment when asked
 * (`keepRetiredIndexes`): CloudFormation cannot delete one global secondary index and create
 * another in the same update, so a stack moves from one to the other in two deployments.
 */
export const RETIRED_INDEXES: Partial<Record<TableDefinition['id'], IndexDefinition[]>> = {
  // Until 2026-11-29: the sweep index with the whole item projected (now `bySweepKeys`, keys only).
  Sessions: [
    {
      indexName: 'bySweepTime',
      partitionKey: { name: 'sweepShard', type: 'S' },
      sortKey: { name: 'sweepAt', type: 'N' },
    },
  ],
};

export interface XmppTablesProps {
  /** Keep RETIRED_INDEXES beside the current ones (the first of two deployments that replace them). */
  keepRetiredIndexes?: boolean;
}

/** One DynamoDB table per definition in `shared/tables.ts`; nothing about a table is restated here. */
export class XmppTables extends Construct {
  private readonly tables = new Map<TableDefinition['id'], dynamodb.TableV2>();

  constructor(scope: Construct, id: string, props: XmppTablesProps = {}) {
    super(scope, id);
    for (const def of allTables) {
      this.tables.set(
        def.id,
        new dynamodb.TableV2(this, def.id, {
          partitionKey: attribute(def.partitionKey),
          sortKey: attribute(def.sortKey),
          globalSecondaryIndexes: [
            ...def.globalSecondaryIndexes,
            ...(props.keepRetiredIndexes ? (RETIRED_INDEXES[def.id] ?? []) : []),
          ].map((index) => ({
            indexName: index.indexName,
            partitionKey: attribute(index.partitionKey),
            sortKey: index.sortKey && attribute(index.sortKey),
            ...projection(index),
          })),
          billing: dynamodb.Billing.onDemand(),
          timeToLiveAttribute: def.timeToLiveAttribute,
          pointInTimeRecoverySpecification: { pointInTimeRecoveryEnabled: def.pointInTimeRecovery },
          // Tables with user data (accounts, SCRAM keys, stored messages, rosters, archives)
          // outlive the stack; session rows are worthless once the stack that served the sockets
          // is gone.
          removalPolicy: def.pointInTimeRecovery ? RemovalPolicy.RETAIN : RemovalPolicy.DESTROY,
          // And nothing deletes them by mistake either (a console click, a script, a replacement
          // CloudFormation would make): DeleteTable fails until the protection is turned off.
          deletionProtection: def.pointInTimeRecovery,
        }),
      );
    }
  }

  table(def: TableDefinition): dynamodb.TableV2 {
    const table = this.tables.get(def.id);
    if (!table) throw new Error(`no table built for definition '${def.id}'`);
    return table;
  }

  all(): { def: TableDefinition; table: dynamodb.TableV2 }[] {
    return allTables.map((def) => ({ def, table: this.table(def) }));
  }
}

/**
 * Gives a function a table: the IAM statement (the table and exactly the indexes its definition
 * declares) and the environment variable that carries the physical table name.
 */
export function bindTable(
  fn: lambda.Function,
  table: dynamodb.TableV2,
  def: TableDefinition,
  access: TableAccess,
): void {
  fn.addToRolePolicy(
    new iam.PolicyStatement({
      actions:
        access === 'readWrite'
          ? [...READ_ACTIONS, ...WRITE_ACTIONS, ...(def.batchWrites ? [BATCH_WRITE_ACTION] : [])]
          : READ_ACTIONS,
      resources: [
        table.tableArn,
        ...def.globalSecondaryIndexes.map((index) => `${table.tableArn}/index/${index.indexName}`),
      ],
    }),
  );
  fn.addEnvironment(def.envVar, table.tableName);
}
