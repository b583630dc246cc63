/**
 * The stores' document client sends lib-dynamodb's commands directly as low-level commands
 * (shared/store/dynamo.ts): the same requests on the wire and the same results as lib-dynamodb's
 * own path, for every kind of command the stores use, with items of every attribute type.
 */
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import {
  BatchGetCommand,
  BatchWriteCommand,
  DeleteCommand,
  DynamoDBDocumentClient,
  GetCommand,
  PutCommand,
  QueryCommand,
  ScanCommand,
  TransactWriteCommand,
  UpdateCommand,
} from '@aws-sdk/lib-dynamodb';
import { describe, expect, it } from 'vitest';
import { billedCapacity, documentClientOver } from '../../shared/store/dynamo.ts';

const ITEM = {
  pk: 'user#alice@example.org',
  sk: 'resource#phone',
  n: 42,
  big: 2 ** 40,
  f: 1.5,
  yes: true,
  nothing: null,
  bin: new Uint8Array([1, 2, 3]),
  list: ['a', 1, { deep: ['x', { deeper: true }] }],
  map: { a: 'b', nested: { n: 1, l: [1, 2] } },
  strings: new Set(['x', 'y']),
  numbers: new Set([1, 2]),
  skipped: undefined,
};

const STORED = {
  pk: { S: 'user#alice@example.org' },
  n: { N: '7' },
  list: { L: [{ S: 'a' }, { M: { b: { BOOL: false } } }] },
  map: { M: { x: { NS: ['1', '2'] }, y: { NULL: true } } },
  bin: { B: Buffer.from([9]).toString('base64') },
};

/** A client whose every request is recorded and answered with `answer`. */
function recordingClient(answer: Record<string, unknown>) {
  const bodies: string[] = [];
  const client = new DynamoDBClient({
    region: 'us-east-1',
    credentials: { accessKeyId: 'test', secretAccessKey: 'test' },
    maxAttempts: 1,
    requestHandler: {
      handle: async (request: { body?: unknown; headers: Record<string, string> }) => {
        // TransactWriteItems' idempotency token is a fresh UUID per request.
        const body = String(request.body).replace(
          /"ClientRequestToken":"[0-9a-f-]{36}"/,
          '"ClientRequestToken":"…"',
        );
        bodies.push(`${request.headers['x-amz-target']} ${body}`);
        return {
          response: {
            statusCode: 200,
            headers: { 'content-type': 'application/x-amz-json-1.0' },
            body: new TextEncoder().encode(JSON.stringify(answer)),
          },
        };
      },
    } as never,
  });
  return { client, bodies };
}

const CASES: Array<[string, () => unknown, Record<string, unknown>]> = [
  [
    'Get',
    () => new GetCommand({ TableName: 't', Key: { pk: 'a', sk: 'b' }, ConsistentRead: true }),
    { Item: STORED },
  ],
  ['Get, nothing found', () => new GetCommand({ TableName: 't', Key: { pk: 'a' } }), {}],
  [
    'Put',
    () => new PutCommand({ TableName: 't', Item: ITEM, ConditionExpression: 'attribute_not_exists(pk)' }),
    {},
  ],
  [
    'Update',
    () =>
      new UpdateCommand({
        TableName: 't',
        Key: { pk: 'a', sk: 'b' },
        UpdateExpression: 'SET #q = list_append(#q, :s), #m = :m ADD #o :one',
        ConditionExpression: '#o = :n',
        ExpressionAttributeNames: { '#q': 'queue', '#m': 'map', '#o': 'out' },
        ExpressionAttributeValues: { ':s': [ITEM.map], ':m': ITEM.map, ':one': 1, ':n': 0 },
        ReturnValues: 'ALL_NEW',
      }),
    { Attributes: STORED },
  ],
  [
    'Delete',
    () => new DeleteCommand({ TableName: 't', Key: { pk: 'a' }, ReturnValues: 'ALL_OLD' }),
    { Attributes: STORED },
  ],
  [
    'Query',
    () =>
      new QueryCommand({
        TableName: 't',
        KeyConditionExpression: 'pk = :pk AND begins_with(sk, :p)',
        ExpressionAttributeValues: { ':pk': 'a', ':p': 'resource#' },
        ExclusiveStartKey: { pk: 'a', sk: 'resource#a' },
        Limit: 2,
      }),
    { Items: [STORED, STORED], Count: 2, LastEvaluatedKey: { pk: { S: 'a' }, sk: { S: 'z' } } },
  ],
  ['Scan', () => new ScanCommand({ TableName: 't', Limit: 1 }), { Items: [STORED], Count: 1 }],
  [
    'BatchGet',
    () =>
      new BatchGetCommand({
        RequestItems: {
          t: { Keys: [{ pk: 'a' }, { pk: 'b' }], ConsistentRead: true, ProjectionExpression: '#p0' },
        },
      }),
    { Responses: { t: [STORED] }, UnprocessedKeys: { t: { Keys: [{ pk: { S: 'b' } }] } } },
  ],
  [
    'BatchWrite',
    () =>
      new BatchWriteCommand({
        RequestItems: { t: [{ PutRequest: { Item: ITEM } }, { DeleteRequest: { Key: { pk: 'x' } } }] },
      }),
    { UnprocessedItems: { t: [{ DeleteRequest: { Key: { pk: { S: 'x' } } } }] } },
  ],
  [
    'TransactWrite',
    () =>
      new TransactWriteCommand({
        TransactItems: [
          { Put: { TableName: 't', Item: ITEM } },
          {
            Update: {
              TableName: 't',
              Key: { pk: 'a' },
              UpdateExpression: 'SET v = :v',
              ExpressionAttributeValues: { ':v': ITEM.list },
            },
          },
          {
            ConditionCheck: { TableName: 't', Key: { pk: 'c' }, ConditionExpression: 'attribute_exists(pk)' },
          },
          { Delete: { TableName: 't', Key: { pk: 'd' } } },
        ],
      }),
    {},
  ],
];

describe('the stores’ document client', () => {
  it.each(CASES)(
    'sends %s as lib-dynamodb does, and reads the answer as it does',
    async (_name, command, answer) => {
      const reference = recordingClient(answer);
      const direct = recordingClient(answer);
      const options = { marshallOptions: { removeUndefinedValues: true } };
      const expected = await DynamoDBDocumentClient.from(reference.client, options).send(command() as never);
      const got = await documentClientOver(direct.client).send(command() as never);
      expect(direct.bodies).toEqual(reference.bodies);
      expect(got).toEqual(expected);
    },
  );

  it('reuses one handler per command class, and drops them when the middleware changes', async () => {
    const { client, bodies } = recordingClient({});
    const doc = documentClientOver(client);
    await doc.send(new PutCommand({ TableName: 't', Item: { pk: 'a' } }));
    await doc.send(new PutCommand({ TableName: 't', Item: { pk: 'b' } }));
    let seen = 0;
    doc.middlewareStack.add(
      (next) => async (args) => {
        seen += 1;
        return next(args);
      },
      { step: 'initialize', name: 'countingTest' },
    );
    await doc.send(new PutCommand({ TableName: 't', Item: { pk: 'c' } }));
    expect(seen).toBe(1);
    expect(bodies.map((body) => JSON.parse(body.slice(body.indexOf(' ') + 1)).Item.pk.S)).toEqual([
      'a',
      'b',
      'c',
    ]);
  });
});

describe('the meter bills what DynamoDB bills', () => {
  it('counts an empty Query at the read minimum, which DynamoDB Local reports as 0', () => {
    // DynamoDB API reference, Query: "Queries that do not return results consume the minimum
    // read capacity units according to the type of read."
    expect(billedCapacity('Query', {}, { CapacityUnits: 0 })).toEqual({ CapacityUnits: 0.5 });
    expect(billedCapacity('Query', { ConsistentRead: true }, { CapacityUnits: 0 })).toEqual({
      CapacityUnits: 1,
    });
    // What was reported otherwise stands.
    expect(billedCapacity('Query', {}, { CapacityUnits: 2.5 })).toEqual({ CapacityUnits: 2.5 });
    expect(billedCapacity('GetItem', {}, { CapacityUnits: 0.5 })).toEqual({ CapacityUnits: 0.5 });
    expect(billedCapacity('UpdateItem', {}, { CapacityUnits: 0 })).toEqual({ CapacityUnits: 0 });
    expect(billedCapacity('Query', {}, undefined)).toBeUndefined();
  });
});
