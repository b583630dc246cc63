/**
 * `npx tsx bench/login.ts [--logins N] [--warmup W]`: what a SCRAM-SHA-256 login costs the
 * functions, from `<open/>` to the bound resource (open, auth, response, restart, bind), and
 * nothing else. The stream function runs in its own process (bench/stream-worker.ts, as in
 * `npm run bench`), so its CPU time is its own; `$connect` runs in this process, and its CPU is
 * taken around each call (the logins run one at a time, so little else runs meanwhile). The
 * client's side of SCRAM (its PBKDF2) runs here too, outside both windows.
 *
 * Reports, per login: the stream function's CPU and its DynamoDB requests, `$connect`'s CPU and
 * requests, frames in and posts out. W warm-up logins (default 20) are not measured.
 * `--profile FILE` writes a V8 profile of the stream function over the measured logins.
 */
import { type ChildProcess, fork } from 'node:child_process';
import { createHash, createHmac, pbkdf2Sync, randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import type { SQSEvent } from 'aws-lambda';
import { createConnectHandler } from '../functions/connect.ts';
import { createTables, tableNamesOf } from '../infra/local/create-tables.ts';
import { findFreePort, startDynamoDbLocal } from '../infra/local/dynamodb-local.ts';
import { startGateway } from '../infra/local/gateway.ts';
import { RawClient } from '../infra/local/raw-client.ts';
import { type Config, loadConfig } from '../shared/config.ts';
import { createLogger } from '../shared/log.ts';
import { apiGatewayPort } from '../shared/outbound.ts';
import { deriveScramCredentials } from '../shared/sasl/scram.ts';
import { createServer } from '../shared/server.ts';
import { dynamoMeter } from '../shared/store/dynamo.ts';
import { allTables } from '../shared/tables.ts';
import type { FromStreamWorker, StreamWorkerSnapshot, ToStreamWorker } from './ipc.ts';

process.env.NIMBUS_METER = '1';
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

const { values } = parseArgs({
  options: {
    logins: { type: 'string' },
    warmup: { type: 'string' },
    'log-level': { type: 'string' },
    /** A V8 profile of the stream function over the measured logins, written to this file. */
    profile: { type: 'string' },
  },
});
const LOGINS = Number(values.logins ?? 50);
const WARMUP = Number(values.warmup ?? 20);
const LOG_LEVEL = values['log-level'] ?? 'warn';

/** The stream function's process, driven over IPC (the protocol of bench/ipc.ts). */
class Worker {
  private readonly child: ChildProcess;
  private nextId = 1;
  private readonly results = new Map<number, (error?: string) => void>();
  private readonly waiting: Array<(message: FromStreamWorker) => boolean> = [];

  constructor() {
    this.child = fork(fileURLToPath(new URL('./stream-worker.ts', import.meta.url)), [], {
      stdio: 'inherit',
    });
    this.child.on('message', (message: FromStreamWorker) => {
      if (message.type === 'result') {
        this.results.get(message.id)?.(message.error);
        this.results.delete(message.id);
        return;
      }
      const index = this.waiting.findIndex((accept) => accept(message));
      if (index >= 0) this.waiting.splice(index, 1);
    });
  }

  send(message: ToStreamWorker): void {
    this.child.send(message);
  }

  next<T extends FromStreamWorker['type']>(type: T): Promise<Extract<FromStreamWorker, { type: T }>> {
    return new Promise((resolve) =>
      this.waiting.push((message) => {
        if (message.type !== type) return false;
        resolve(message as Extract<FromStreamWorker, { type: T }>);
        return true;
      }),
    );
  }

  invoke(event: SQSEvent): Promise<undefined> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.results.set(id, (error) => (error ? reject(new Error(error)) : resolve(undefined)));
      this.send({ type: 'invoke', id, event });
    });
  }

  stop(): void {
    this.child.disconnect();
  }
}

/** The client half of SCRAM-SHA-256 (RFC 5802 §3, RFC 7677). */
function clientFinal(password: string, clientFirstBare: string, serverFirst: string): string {
  const attributes = new Map(serverFirst.split(',').map((part) => [part[0], part.slice(2)]));
  const salted = pbkdf2Sync(
    password,
    Buffer.from(attributes.get('s') ?? '', 'base64'),
    Number(attributes.get('i')),
    32,
    'sha256',
  );
  const clientKey = createHmac('sha256', salted).update('Client Key').digest();
  const storedKey = createHash('sha256').update(clientKey).digest();
  const withoutProof = `c=biws,r=${attributes.get('r')}`;
  const signature = createHmac('sha256', storedKey)
    .update(`${clientFirstBare},${serverFirst},${withoutProof}`)
    .digest();
  return `${withoutProof},p=${Buffer.from(clientKey.map((byte, i) => byte ^ (signature[i] as number))).toString('base64')}`;
}

const b64 = (text: string) => Buffer.from(text).toString('base64');

async function login(url: string, domain: string, username: string, password: string): Promise<RawClient> {
  const client = await RawClient.connect(url);
  await client.open(domain);
  const clientFirstBare = `n=${username},r=${randomBytes(12).toString('base64')}`;
  client.send(
    `<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>${b64(`n,,${clientFirstBare}`)}</auth>`,
  );
  const challenge = await client.next();
  if (challenge.name !== 'challenge') throw new Error(`no challenge: ${challenge.toString()}`);
  const serverFirst = Buffer.from(challenge.getText(), 'base64').toString();
  client.send(
    `<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>${b64(clientFinal(password, clientFirstBare, serverFirst))}</response>`,
  );
  const success = await client.next();
  if (success.name !== 'success') throw new Error(`login failed: ${success.toString()}`);
  await client.open(domain);
  client.send(`<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>`);
  const bound = await client.next();
  if (!bound.getChild('bind')?.getChildText('jid')) throw new Error(`bind failed: ${bound.toString()}`);
  return client;
}

const database = await startDynamoDbLocal({ port: await findFreePort() });
const worker = new Worker();
try {
  const env: Record<string, string | undefined> = {
    ...process.env,
    TABLE_PREFIX: `login${randomBytes(4).toString('hex')}`,
  };
  for (const table of allTables) delete env[table.envVar];
  const config: Config = { ...loadConfig(env), dynamodbEndpoint: database.endpoint };
  const admin = new DynamoDBClient({
    endpoint: database.endpoint,
    region: config.region,
    credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
  });
  await createTables(admin, tableNamesOf(config.tables));
  admin.destroy();

  let connect: ReturnType<typeof createConnectHandler> | undefined;
  let connectCpuMs = 0;
  let frames = 0;
  const gateway = await startGateway({
    host: '127.0.0.1',
    port: 0,
    region: config.region,
    batchSize: 10,
    connect: async (event) => {
      if (!connect) throw new Error('not ready');
      const started = process.cpuUsage();
      try {
        return await connect(event);
      } finally {
        const used = process.cpuUsage(started);
        connectCpuMs += (used.user + used.system) / 1000;
      }
    },
    stream: (event) => {
      frames += event.Records.length;
      return worker.invoke(event);
    },
  });
  const served: Config = { ...config, connectionsEndpoint: gateway.managementEndpoint };
  const server = createServer({
    config: served,
    port: apiGatewayPort(gateway.managementEndpoint, config.region),
    log: createLogger(LOG_LEVEL),
  });
  connect = createConnectHandler(server);
  worker.send({ type: 'init', config: served, logLevel: LOG_LEVEL });
  await worker.next('ready');

  const users = Array.from({ length: WARMUP + LOGINS }, (_, i) => ({
    username: `login${i}`,
    password: randomBytes(9).toString('base64url'),
  }));
  for (const user of users) {
    await server.users.create(`${user.username}@${config.domain}`, {
      sha1: await deriveScramCredentials(user.password, 'sha1', config.scramIterations),
      sha256: await deriveScramCredentials(user.password, 'sha256', config.scramIterations),
    });
  }

  const warm: RawClient[] = [];
  for (const user of users.slice(0, WARMUP))
    warm.push(await login(gateway.url, config.domain, user.username, user.password));
  for (const client of warm) client.close();
  await gateway.drained();

  worker.send({ type: 'reset', ...(values.profile ? { profileFile: values.profile } : {}) });
  await worker.next('reset-done');
  dynamoMeter.reset();
  connectCpuMs = 0;
  frames = 0;
  const measured: RawClient[] = [];
  const started = performance.now();
  for (const user of users.slice(WARMUP))
    measured.push(await login(gateway.url, config.domain, user.username, user.password));
  const wallMs = performance.now() - started;
  await gateway.drained();
  worker.send({ type: 'snapshot' });
  const snapshot: StreamWorkerSnapshot = (await worker.next('snapshot')).snapshot;
  const connectMeter = dynamoMeter.snapshot();
  for (const client of measured) client.close();
  await gateway.drained();
  await gateway.close();

  const per = (value: number) => (value / LOGINS).toFixed(2);
  const streamCpu = snapshot.cpu.userMs + snapshot.cpu.systemMs;
  const operations = (meter: typeof connectMeter) =>
    Object.entries(meter.operations)
      .map(([name, usage]) => `${name} ${per(usage.requests)}`)
      .join(', ');
  console.log(
    `SCRAM-SHA-256 logins (open → bound), ${LOGINS} measured after ${WARMUP} warm-up, one at a time:`,
  );
  console.log(
    `  stream function CPU per login      ${per(streamCpu)} ms (${per(snapshot.invocations)} invocations, ${per(frames)} frames)`,
  );
  console.log(`  $connect CPU per login (in-process) ${per(connectCpuMs)} ms`);
  console.log(`  functions' CPU per login           ${per(streamCpu + connectCpuMs)} ms`);
  console.log(
    `  DynamoDB requests per login        ${per(snapshot.dynamodb.requests + connectMeter.requests)} (stream: ${operations(snapshot.dynamodb)}; $connect: ${operations(connectMeter)})`,
  );
  console.log(`  posts out per login                ${per(snapshot.outbound.posts)}`);
  console.log(`  wall per login                     ${(wallMs / LOGINS).toFixed(1)} ms`);
} finally {
  worker.stop();
  await database.stop();
}
