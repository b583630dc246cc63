/**
 * `npm run bench:floor [-- --calls 2000]`: what one AWS call costs this process in CPU, through the
 * clients the functions use and through bare HTTP, to tell how far the stream function's CPU per
 * message can fall while it makes the calls it makes (issue 13's "stream function CPU per message,
 * no SM ≤ 1.0 ms").
 *
 * Measured, each as `--calls` sequential calls after `--warmup` (2,000) not measured (the JIT settles), with `process.cpuUsage`
 * (user + system: this process only; DynamoDB Local's JVM and the stand-in for API Gateway run in
 * other processes):
 * - the stores' document client (`createDocumentClient`, every middleware the functions run but
 *   the meter): GetItem (strongly consistent) of a connection row, UpdateItem of one attribute
 *   (the done mark), Query of a user's resource rows;
 * - the functions' PostToConnection (`apiGatewayPort`) to a stand-in that answers 200;
 * - the same requests signed with the SDK's SigV4 signer (as `shared/frame-queue.ts` signs its one
 *   SQS request) and sent as `node:http` POSTs on a kept-alive socket: no middleware stack, no
 *   retries, the JSON written by hand;
 * - the same, unsigned (DynamoDB Local accepts any signature): bare HTTP, the floor.
 * Plain HTTP throughout; on AWS every call is HTTPS, which adds TLS to each.
 *
 * A message without SM makes four such calls one after the other (GetItem, Query, the post, the
 * done mark: `perMessage.sequentialAwsCalls` in the main bench), so four bare calls are the least
 * CPU the stream function can spend on a message on this machine, before any XMPP work.
 * Writes `bench/results/call-floor.json`.
 */
import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { cpus, loadavg } from 'node:os';
import { parseArgs } from 'node:util';
import { CreateTableCommand, DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { GetCommand, PutCommand, QueryCommand, UpdateCommand } from '@aws-sdk/lib-dynamodb';
import { Hash } from '@smithy/core/serde';
import { SignatureV4 } from '@smithy/signature-v4';
import { findFreePort, startDynamoDbLocal } from '../infra/local/dynamodb-local.ts';
import { apiGatewayPort } from '../shared/outbound.ts';
import { createDocumentClient } from '../shared/store/dynamo.ts';

const { values } = parseArgs({
  options: { calls: { type: 'string', default: '2000' }, warmup: { type: 'string', default: '2000' } },
});
const CALLS = Number(values.calls);
const WARMUP = Number(values.warmup);
const TABLE = 'call_floor';
const REGION = 'us-east-1';
/** The target this measures against (issue 13). */
const TARGET_CPU_MS_PER_MESSAGE = 1.0;

interface Measured {
  cpuMsPerCall: number;
  wallMsPerCall: number;
}

async function measure(call: () => Promise<unknown>): Promise<Measured> {
  for (let i = 0; i < WARMUP; i++) await call();
  const cpu = process.cpuUsage();
  const started = performance.now();
  for (let i = 0; i < CALLS; i++) await call();
  const used = process.cpuUsage(cpu);
  return {
    cpuMsPerCall: (used.user + used.system) / 1000 / CALLS,
    wallMsPerCall: (performance.now() - started) / CALLS,
  };
}

/** A stand-in for API Gateway's management endpoint in a process of its own: 200 to every POST. */
async function startStandIn(): Promise<{ url: string; stop(): void }> {
  const child = spawn(
    process.execPath,
    [
      '-e',
      `const s = require('node:http').createServer((q, r) => { q.resume(); q.on('end', () => r.end()); });
       s.keepAliveTimeout = 60000;
       s.listen(0, '127.0.0.1', () => console.log(s.address().port));`,
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const port = await new Promise<string>((resolve) =>
    child.stdout.once('data', (d) => resolve(String(d).trim())),
  );
  return { url: `http://127.0.0.1:${port}`, stop: () => child.kill() };
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

function barePost(url: string, headers: Record<string, string>, body: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const request = http.request(url, { method: 'POST', agent, headers }, (response) => {
      response.on('data', () => {});
      response.on('end', () => resolve());
    });
    request.on('error', reject);
    request.end(body);
  });
}

const credentials = { accessKeyId: 'local', secretAccessKey: 'local' };
const signers = {
  dynamodb: new SignatureV4({
    service: 'dynamodb',
    region: REGION,
    credentials,
    sha256: Hash.bind(null, 'sha256'),
  }),
  'execute-api': new SignatureV4({
    service: 'execute-api',
    region: REGION,
    credentials,
    sha256: Hash.bind(null, 'sha256'),
  }),
};

/** A POST signed with SigV4, then sent as `barePost` sends. */
async function signedPost(
  service: keyof typeof signers,
  url: string,
  headers: Record<string, string>,
  body: string,
): Promise<void> {
  const target = new URL(url);
  const signed = await signers[service].sign({
    method: 'POST',
    protocol: target.protocol,
    hostname: target.hostname,
    port: Number(target.port),
    path: target.pathname,
    query: {},
    headers: { host: target.host, ...headers },
    body,
  });
  return barePost(url, signed.headers, body);
}

const dynamoTarget = (operation: string) => ({
  'content-type': 'application/x-amz-json-1.0',
  'x-amz-target': `DynamoDB_20120810.${operation}`,
});

const dynamoHeaders = (operation: string) => ({
  'content-type': 'application/x-amz-json-1.0',
  'x-amz-target': `DynamoDB_20120810.${operation}`,
  'x-amz-date': '20261129T000000Z',
  authorization:
    'AWS4-HMAC-SHA256 Credential=local/20261129/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0',
});

const external = process.env.DYNAMODB_ENDPOINT;
const local = external ? undefined : await startDynamoDbLocal({ port: await findFreePort() });
const endpoint = external ?? (local?.endpoint as string);
const standIn = await startStandIn();
try {
  const admin = new DynamoDBClient({
    region: REGION,
    endpoint,
    credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
  });
  await admin
    .send(
      new CreateTableCommand({
        TableName: TABLE,
        KeySchema: [
          { AttributeName: 'pk', KeyType: 'HASH' },
          { AttributeName: 'sk', KeyType: 'RANGE' },
        ],
        AttributeDefinitions: [
          { AttributeName: 'pk', AttributeType: 'S' },
          { AttributeName: 'sk', AttributeType: 'S' },
        ],
        BillingMode: 'PAY_PER_REQUEST',
      }),
    )
    .catch((error: Error) => {
      if (error.name !== 'ResourceInUseException') throw error;
    });
  const doc = createDocumentClient({ endpoint, region: REGION });
  const connection = { pk: 'conn#floor', sk: 'conn' };
  // A bound stream's row, about the size the bench's connection rows have.
  await doc.send(
    new PutCommand({
      TableName: TABLE,
      Item: {
        ...connection,
        connectionId: 'floor',
        connectedAt: Date.now(),
        streamOpen: true,
        streamId: 'b3Blbi1zdHJlYW0taWQ',
        user: 'alice@localhost',
        resource: 'laptop',
        authFailures: 0,
        doneSeq: '18889465931478580854784',
        expiresAt: Math.floor(Date.now() / 1000) + 7200,
      },
    }),
  );
  for (const resource of ['laptop', 'phone'])
    await doc.send(
      new PutCommand({
        TableName: TABLE,
        Item: {
          pk: 'bob@localhost',
          sk: `res#${resource}`,
          connectionId: `conn-${resource}`,
          available: true,
          priority: 0,
          boundAt: Date.now(),
        },
      }),
    );
  const port = apiGatewayPort(standIn.url, REGION);
  const stanza =
    "<message xmlns='jabber:client' to='bob@localhost' from='alice@localhost/laptop' type='chat' id='alice-1'><body>alice 1</body></message>";
  const getBody = JSON.stringify({
    TableName: TABLE,
    Key: { pk: { S: 'conn#floor' }, sk: { S: 'conn' } },
    ConsistentRead: true,
  });
  const updateBody = JSON.stringify({
    TableName: TABLE,
    Key: { pk: { S: 'conn#floor' }, sk: { S: 'conn' } },
    UpdateExpression: 'SET doneSeq = :s',
    ExpressionAttributeValues: { ':s': { S: '18889465931478580854785' } },
  });
  const queryBody = JSON.stringify({
    TableName: TABLE,
    KeyConditionExpression: 'pk = :pk',
    ExpressionAttributeValues: { ':pk': { S: 'bob@localhost' } },
    ConsistentRead: true,
  });

  const sdk = {
    GetItem: await measure(() =>
      doc.send(new GetCommand({ TableName: TABLE, Key: connection, ConsistentRead: true })),
    ),
    UpdateItem: await measure(() =>
      doc.send(
        new UpdateCommand({
          TableName: TABLE,
          Key: connection,
          UpdateExpression: 'SET doneSeq = :s',
          ExpressionAttributeValues: { ':s': '18889465931478580854785' },
        }),
      ),
    ),
    Query: await measure(() =>
      doc.send(
        new QueryCommand({
          TableName: TABLE,
          KeyConditionExpression: 'pk = :pk',
          ExpressionAttributeValues: { ':pk': 'bob@localhost' },
          ConsistentRead: true,
        }),
      ),
    ),
    PostToConnection: await measure(() => port.post('floor-connection', stanza)),
  };
  const postUrl = `${standIn.url}/@connections/floor-connection`;
  const signed = {
    GetItem: await measure(() => signedPost('dynamodb', endpoint, dynamoTarget('GetItem'), getBody)),
    UpdateItem: await measure(() => signedPost('dynamodb', endpoint, dynamoTarget('UpdateItem'), updateBody)),
    Query: await measure(() => signedPost('dynamodb', endpoint, dynamoTarget('Query'), queryBody)),
    PostToConnection: await measure(() => signedPost('execute-api', postUrl, {}, stanza)),
  };
  const bare = {
    GetItem: await measure(() => barePost(endpoint, dynamoHeaders('GetItem'), getBody)),
    UpdateItem: await measure(() => barePost(endpoint, dynamoHeaders('UpdateItem'), updateBody)),
    Query: await measure(() => barePost(endpoint, dynamoHeaders('Query'), queryBody)),
    PostToConnection: await measure(() => barePost(postUrl, {}, stanza)),
  };
  const perMessage = (calls: Record<string, Measured>) =>
    calls.GetItem.cpuMsPerCall +
    calls.Query.cpuMsPerCall +
    calls.PostToConnection.cpuMsPerCall +
    calls.UpdateItem.cpuMsPerCall;
  const result = {
    name: 'call-floor',
    at: new Date().toISOString(),
    machine: { node: process.version, cpus: cpus().length, loadAverage: loadavg()[0] },
    options: { calls: CALLS, warmup: WARMUP },
    sdk,
    signed,
    bare,
    messageWithoutSm: {
      calls: ['GetItem', 'Query', 'PostToConnection', 'UpdateItem'],
      sdkCpuMs: perMessage(sdk),
      signedCpuMs: perMessage(signed),
      bareCpuMs: perMessage(bare),
      targetCpuMs: TARGET_CPU_MS_PER_MESSAGE,
    },
  };
  type Call = keyof typeof sdk;
  const row = (name: Call) =>
    `| ${name} | ${[sdk, signed, bare].map((m) => m[name].cpuMsPerCall.toFixed(3)).join(' | ')} | ${[sdk, signed, bare].map((m) => m[name].wallMsPerCall.toFixed(2)).join(' | ')} |`;
  console.log(`CPU per call, ${CALLS} calls each (load average ${loadavg()[0].toFixed(2)} at the end)\n`);
  console.log(
    '| call | SDK client CPU ms | SigV4 + http CPU ms | bare http CPU ms | SDK wall ms | SigV4 + http wall ms | bare wall ms |',
  );
  console.log('| --- | --- | --- | --- | --- | --- | --- |');
  for (const name of ['GetItem', 'Query', 'PostToConnection', 'UpdateItem'] as const) console.log(row(name));
  console.log(
    `\nA message without SM (4 calls): ${result.messageWithoutSm.sdkCpuMs.toFixed(2)} ms through the SDK, ` +
      `${result.messageWithoutSm.signedCpuMs.toFixed(2)} ms signed without the SDK's stack, ` +
      `${result.messageWithoutSm.bareCpuMs.toFixed(2)} ms as bare HTTP; target ≤ ${TARGET_CPU_MS_PER_MESSAGE} ms ` +
      `for everything the stream function does per message.`,
  );
  mkdirSync(new URL('./results/', import.meta.url), { recursive: true });
  writeFileSync(
    new URL('./results/call-floor.json', import.meta.url),
    `${JSON.stringify(result, null, 2)}\n`,
  );
} finally {
  standIn.stop();
  agent.destroy();
  await local?.stop();
}
