/**
 * `npm run bench`: N pairs of stock xmpp.js clients exchange M chat messages through the local
 * stack, once without stream management and once with it on both sides (reported as skipped
 * if the server does not advertise it). Per delivered message it reports throughput,
 * latency, DynamoDB requests and capacity units (ReturnConsumedCapacity), API Gateway
 * messages, the stream function's CPU and wall time, and the resulting $ per million
 * messages (`prices.ts`): projected for AWS from CPU and sequential calls (`cost.ts`), and at
 * the wall time measured here. The logins before the messages, keepalives after them and,
 * with SM, reconnects with resumption are measured in windows of their own; the stream
 * bundle's size and cold init before the load (`cold-start.ts`).
 *
 * Three processes keep the measurements apart: this one (DynamoDB Local's keeper, the gateway
 * emulator), the function worker (the stream function, and the connect function's
 * `$connect`s: its CPU time is the functions') and the client process (the xmpp.js clients).
 * Everything listens on 127.0.0.1.
 *
 *   npm run bench -- --pairs 20 --messages 300 [--sm | --no-sm] [--window 1] [--name run1]
 */
import { type ChildProcess, fork } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { availableParallelism, cpus, loadavg } from 'node:os';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import type { SQSBatchResponse, SQSEvent } from 'aws-lambda';
import { createTables, tableNamesOf } from '../infra/local/create-tables.ts';
import { findFreePort, startDynamoDbLocal } from '../infra/local/dynamodb-local.ts';
import { startGateway } from '../infra/local/gateway.ts';
import { type Config, loadConfig } from '../shared/config.ts';
import type { ConnectEvent, ConnectResult } from '../shared/core/connect.ts';
import { createLogger } from '../shared/log.ts';
import { apiGatewayPort } from '../shared/outbound.ts';
import { decodeQueueMessage } from '../shared/queue-message.ts';
import { deriveScramCredentials } from '../shared/sasl/scram.ts';
import { createServer } from '../shared/server.ts';
import { dynamoMeter, type MeterSnapshot, type OperationUsage } from '../shared/store/dynamo.ts';
import { allTables } from '../shared/tables.ts';
import { measureColdStart } from './cold-start.ts';
import {
  connectionCostPerMillionMessages,
  costPerMillionMessages,
  gbSeconds,
  projectedDurationMs,
  SQS_REQUESTS_PER_BATCH,
} from './cost.ts';
import type {
  BenchUser,
  ClientPlan,
  ClientResult,
  FromClients,
  FromStreamWorker,
  StreamWorkerSnapshot,
  ToClients,
  ToStreamWorker,
} from './ipc.ts';
import { AWS_CALL_LATENCY_MS, PRICES_AS_OF, PRICES_REGION, prices } from './prices.ts';
import {
  type ActivityResult,
  type BenchOptions,
  type BenchReport,
  type MessageCost,
  printReport,
  type Scenario,
  type ScenarioResult,
  TARGETS,
  type TrafficPer,
} from './report.ts';

process.env.NIMBUS_METER = '1';
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

const HOST = '127.0.0.1';
function resultsDirectory(): string {
  return fileURLToPath(new URL('./results/', import.meta.url));
}

/** The stream function's memory when `infra/constructs/xmpp-function.ts` cannot be read. */
const DEFAULT_STREAM_MEMORY_MB = 512;
/** After the last delivery, time for trailing acks (`<r/>` after xmpp.js's 250 ms debounce). */
const SETTLE_MS = 1_000;
const STOP_TIMEOUT_MS = 15_000;
/** As the stack's event source mapping (and `infra/local/stack.ts`): up to ten records of one connection per invocation. */
const STREAM_BATCH_SIZE = 10;
/** Keepalive pings per client after the measured messages, and the pause after each. */
const PINGS_PER_CLIENT = 3;
const PING_GAP_MS = 400;

// ---------------------------------------------------------------------------------------------
// Options

function parseOptions(): BenchOptions {
  const env = process.env;
  const { values } = parseArgs({
    options: {
      pairs: { type: 'string' },
      messages: { type: 'string' },
      warmup: { type: 'string' },
      window: { type: 'string' },
      payload: { type: 'string' },
      interval: { type: 'string' },
      'ack-debounce': { type: 'string' },
      sm: { type: 'boolean' },
      'no-sm': { type: 'boolean' },
      name: { type: 'string' },
      'memory-mb': { type: 'string' },
      'timeout-seconds': { type: 'string' },
      'log-level': { type: 'string' },
      profile: { type: 'boolean' },
      'cold-runs': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(
      [
        'npm run bench -- [options]   (each also as an environment variable)',
        '  --pairs N            client pairs (BENCH_PAIRS, default 20)',
        '  --messages M         measured messages per pair (BENCH_MESSAGES, default 100)',
        '  --warmup W           warm-up messages per pair, not measured (BENCH_WARMUP, default 25)',
        '  --window K           messages in flight per pair (BENCH_WINDOW, default 1)',
        '  --payload SHAPE      plain (an id and a short body, default) or converse (as Converse.js',
        '                       sends: <active/>, receipt <request/>, <origin-id/>, a body of ~70 characters)',
        '  --interval MS        a pair waits this long after a message before its reply (BENCH_INTERVAL_MS,',
        "                       default 0: at once); a chat's pace. Raise --timeout-seconds to match",
        "  --ack-debounce MS    xmpp.js's delay before its <r/> after what it sent (default 250, xmpp.js's)",
        '  --sm | --no-sm       only the run with / without stream management (default: both)',
        '  --name NAME          bench/results/NAME.json (BENCH_NAME, default bench-<time>)',
        '  --memory-mb MB       stream function memory for the Lambda price (default: the CDK constant)',
        '  --timeout-seconds S  limit per phase (BENCH_TIMEOUT_SECONDS, default 180)',
        '  --log-level LEVEL    server log level (LOG_LEVEL, default warn)',
        '  --profile            sample the stream function with the V8 profiler and split its CPU',
        '  --cold-runs N        cold starts of the stream bundle for its init median (default 11, 0: skip)',
        '  --roster             instead: RFC 6121 login with --contacts N (500) and broadcast to',
        '                       --broadcast N (1000) online contacts, --post-ms per post (20)',
        '',
      ].join('\n'),
    );
    process.exit(0);
  }
  const number = (value: string | undefined, fallback: number, name: string, min = 1): number => {
    if (value === undefined || value === '') return fallback;
    const parsed = Number(value);
    if (!Number.isInteger(parsed) || parsed < min) throw new Error(`--${name} must be an integer ≥ ${min}`);
    return parsed;
  };
  const payload = values.payload ?? env.BENCH_PAYLOAD ?? 'plain';
  if (payload !== 'plain' && payload !== 'converse') throw new Error('--payload must be plain or converse');
  const scenarios: Scenario[] = values.sm ? ['sm'] : values['no-sm'] ? ['plain'] : ['plain', 'sm'];
  return {
    pairs: number(values.pairs ?? env.BENCH_PAIRS, 20, 'pairs'),
    messages: number(values.messages ?? env.BENCH_MESSAGES, 100, 'messages'),
    warmup: number(values.warmup ?? env.BENCH_WARMUP, 25, 'warmup', 0),
    window: number(values.window ?? env.BENCH_WINDOW, 1, 'window'),
    payload,
    intervalMs: number(values.interval ?? env.BENCH_INTERVAL_MS, 0, 'interval', 0),
    ...(values['ack-debounce'] !== undefined
      ? { ackDebounceMs: number(values['ack-debounce'], 250, 'ack-debounce', 0) }
      : {}),
    scenarios,
    name: values.name ?? env.BENCH_NAME ?? `bench-${new Date().toISOString().replace(/[:.]/g, '-')}`,
    memoryMb: values['memory-mb'] ? number(values['memory-mb'], 0, 'memory-mb') : undefined,
    timeoutMs: number(values['timeout-seconds'] ?? env.BENCH_TIMEOUT_SECONDS, 180, 'timeout-seconds') * 1000,
    logLevel: values['log-level'] ?? env.LOG_LEVEL ?? 'warn',
    profile: values.profile ?? false,
    coldRuns: number(values['cold-runs'], 11, 'cold-runs', 0),
  };
}

// ---------------------------------------------------------------------------------------------
// Child processes

/** A forked bench process with typed messages and bounded waits. */
class Child<In, Out extends { type: string }> {
  private readonly inbox: Out[] = [];
  private readonly waiting = new Set<() => void>();
  private exited = false;
  readonly process: ChildProcess;

  constructor(file: string, label: string) {
    // Inherits tsx's loader flags from this process, so the child runs TypeScript too.
    this.process = fork(fileURLToPath(new URL(file, import.meta.url)), [], { stdio: 'inherit' });
    this.process.on('message', (message: Out) => this.deliver(message));
    this.process.once('exit', (code, signal) => {
      this.exited = true;
      this.deliver({ type: 'exit', code, signal, label } as unknown as Out);
    });
  }

  protected deliver(message: Out): void {
    this.inbox.push(message);
    for (const wake of this.waiting) wake();
  }

  send(message: In): void {
    if (!this.exited) this.process.send(message as object);
  }

  /** The next message of one of `types` (earlier ones of other types are kept); `exit` always ends the wait. */
  next<T extends Out['type']>(types: T[], timeoutMs: number): Promise<Extract<Out, { type: T }>> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const index = this.inbox.findIndex((m) => (types as string[]).includes(m.type) || m.type === 'exit');
        if (index < 0) return;
        const [message] = this.inbox.splice(index, 1);
        finish();
        if ((message as { type: string }).type === 'exit') {
          const { code, signal, label } = message as unknown as {
            code: number;
            signal: string;
            label: string;
          };
          reject(
            new Error(`the ${label} process exited (${code ?? signal}) while waiting for ${types.join('/')}`),
          );
        } else resolve(message as Extract<Out, { type: T }>);
      };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`no ${types.join('/')} within ${timeoutMs} ms`));
      }, timeoutMs);
      const finish = () => {
        clearTimeout(timer);
        this.waiting.delete(check);
      };
      this.waiting.add(check);
      check();
    });
  }

  async stop(): Promise<void> {
    if (this.exited) return;
    const exited = new Promise<void>((resolve) => this.process.once('exit', () => resolve()));
    this.process.disconnect();
    const timer = setTimeout(() => this.process.kill('SIGKILL'), 5_000);
    await exited;
    clearTimeout(timer);
  }
}

/** The stream function's process: invokes are answered by id, in any order. */
class StreamWorker extends Child<ToStreamWorker, FromStreamWorker | { type: 'exit' }> {
  private nextId = 1;
  private readonly pending = new Map<
    number,
    (message: Extract<FromStreamWorker, { type: 'result' }>) => void
  >();
  private readonly connecting = new Map<number, (result: ConnectResult) => void>();

  constructor() {
    super('./stream-worker.ts', 'stream worker');
  }

  protected override deliver(message: FromStreamWorker | { type: 'exit' }): void {
    if (message.type === 'result') {
      this.pending.get(message.id)?.(message);
      this.pending.delete(message.id);
      return;
    }
    if (message.type === 'connect-result') {
      this.connecting.get(message.id)?.(message.result);
      this.connecting.delete(message.id);
      return;
    }
    if (message.type === 'exit') {
      for (const [id, resolve] of this.pending)
        resolve({ type: 'result', id, response: undefined, error: 'exit' });
      this.pending.clear();
      for (const resolve of this.connecting.values()) resolve({ statusCode: 500, body: 'exit' });
      this.connecting.clear();
    }
    super.deliver(message);
  }

  async invoke(event: SQSEvent): Promise<SQSBatchResponse | undefined> {
    const id = this.nextId++;
    const result = new Promise<Extract<FromStreamWorker, { type: 'result' }>>((resolve) =>
      this.pending.set(id, resolve),
    );
    this.send({ type: 'invoke', id, event });
    const { response, error } = await result;
    // A throw makes the emulated queue deliver the records again, as Lambda's would.
    if (error) throw new Error(`stream function failed: ${error}`);
    return response;
  }

  /** `$connect`, run by the connect function in the worker's process. */
  connect(event: ConnectEvent): Promise<ConnectResult> {
    const id = this.nextId++;
    const result = new Promise<ConnectResult>((resolve) => this.connecting.set(id, resolve));
    this.send({ type: 'connect', id, event });
    return result;
  }
}

// ---------------------------------------------------------------------------------------------
// Frames in (what API Gateway receives from clients and puts on the queue)

class FrameCounter {
  records = 0;
  frames = 0;
  units = 0;
  sqsChunks = 0;
  byElement: Record<string, number> = {};

  count(event: SQSEvent): void {
    for (const record of event.Records) {
      // Redeliveries are the queue's business, not new client messages.
      if (record.attributes.ApproximateReceiveCount !== '1') continue;
      // Every record (a frame or a `$disconnect`) was one SendMessage to the queue.
      this.records += 1;
      this.sqsChunks += Math.max(
        1,
        Math.ceil(Buffer.byteLength(record.body) / prices.sqsFifo.requestChunkBytes),
      );
      const decoded = decodeQueueMessage(record.body);
      if (decoded.kind !== 'frame') continue;
      const bytes = Buffer.byteLength(decoded.frame);
      const element = /^\s*<([A-Za-z:_-]+)/.exec(decoded.frame)?.[1] ?? '?';
      this.frames += 1;
      this.units += Math.max(1, Math.ceil(bytes / prices.apiGateway.messageIncrementBytes));
      this.byElement[element] = (this.byElement[element] ?? 0) + 1;
    }
  }

  reset(): void {
    this.records = 0;
    this.frames = 0;
    this.units = 0;
    this.sqsChunks = 0;
    this.byElement = {};
  }

  copy(): FrameCounts {
    return {
      records: this.records,
      frames: this.frames,
      units: this.units,
      sqsChunks: this.sqsChunks,
      byElement: { ...this.byElement },
    };
  }
}

type FrameCounts = Pick<FrameCounter, 'records' | 'frames' | 'units' | 'sqsChunks' | 'byElement'>;

// ---------------------------------------------------------------------------------------------
// One scenario

interface ScenarioContext {
  endpoint: string;
  options: BenchOptions;
  memoryMb: number;
}

/** One progress line per phase, with its duration, so a slow phase shows where the time went. */
function phase(): (what: string) => void {
  let last = performance.now();
  return (what) => {
    const now = performance.now();
    process.stdout.write(`  ${what} (${((now - last) / 1000).toFixed(1)} s)\n`);
    last = now;
  };
}

async function runScenario(scenario: Scenario, context: ScenarioContext): Promise<ScenarioResult> {
  const { endpoint, options } = context;
  const progress = phase();
  const prefix = `bench${randomBytes(4).toString('hex')}`;
  // Fresh tables named from the prefix, whatever table names the environment holds.
  const env: Record<string, string | undefined> = { ...process.env, TABLE_PREFIX: prefix };
  for (const table of allTables) delete env[table.envVar];
  const config: Config = { ...loadConfig(env), dynamodbEndpoint: endpoint };
  const admin = new DynamoDBClient({
    endpoint,
    region: config.region,
    credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
  });
  try {
    await createTables(admin, tableNamesOf(config.tables));
  } finally {
    admin.destroy();
  }

  const log = createLogger(options.logLevel);
  const frames = new FrameCounter();
  const worker = new StreamWorker();
  let clients: Child<ToClients, FromClients | { type: 'exit' }> | undefined;
  const gateway = await startGateway({
    host: HOST,
    port: 0,
    region: config.region,
    batchSize: STREAM_BATCH_SIZE,
    connect: (event) => worker.connect(event),
    stream: (event) => {
      frames.count(event);
      return worker.invoke(event);
    },
  });

  /** Resets every meter, runs `during`, waits for the queue to drain, and reads the meters. */
  const measure = async <T>(during: () => Promise<T>, profileFile?: string) => {
    dynamoMeter.reset();
    frames.reset();
    worker.send({ type: 'reset', profileFile });
    await worker.next(['reset-done'], 10_000);
    const runnerCpu = process.cpuUsage();
    const value = await during();
    await delay(SETTLE_MS);
    await withTimeout(gateway.drained(), options.timeoutMs, 'the queue to drain');
    worker.send({ type: 'snapshot' });
    const { snapshot } = await worker.next(['snapshot'], 30_000);
    const runnerCpuUsage = process.cpuUsage(runnerCpu);
    return {
      value,
      phase: {
        worker: snapshot,
        runnerMeter: dynamoMeter.snapshot(),
        runnerCpuMs: (runnerCpuUsage.user + runnerCpuUsage.system) / 1000,
        frames: frames.copy(),
      } satisfies Phase,
    };
  };

  try {
    const served: Config = { ...config, connectionsEndpoint: gateway.managementEndpoint };
    const server = createServer({
      config: served,
      port: apiGatewayPort(gateway.managementEndpoint, config.region),
      log,
    });
    worker.send({ type: 'init', config: served, logLevel: options.logLevel });
    await worker.next(['ready'], 30_000);

    const users = await createUsers(server, options.pairs * 2, config.scramIterations);
    progress(`tables, stack and ${users.length} users ready`);
    const child = new Child<ToClients, FromClients | { type: 'exit' }>('./clients.ts', 'client');
    clients = child;
    const plan: ClientPlan = {
      url: gateway.url,
      domain: config.domain,
      users,
      messagesPerPair: options.messages,
      warmupPerPair: options.warmup,
      window: options.window,
      payload: options.payload,
      intervalMs: options.intervalMs,
      ...(options.ackDebounceMs !== undefined ? { ackDebounceMs: options.ackDebounceMs } : {}),
      streamManagement: scenario === 'sm',
      timeoutMs: options.timeoutMs,
    };

    // The login phase, measured on its own: open, SCRAM, bind (and <enable/> with SM).
    const loggedIn = await measure(
      async () => {
        child.send({ type: 'start', plan });
        return child.next(['logged-in', 'skip', 'failed'], options.timeoutMs * 3);
      },
      options.profile ? `${resultsDirectory()}${options.name}-${scenario}-login.cpuprofile` : undefined,
    );
    const started = loggedIn.value;
    if (started.type === 'skip') return { scenario, skipped: started.reason };
    if (started.type === 'failed') throw new Error(`clients: ${started.message}`);
    const login = summarizeActivity(started.clients, loggedIn.phase, context.memoryMb);
    progress(`${started.clients} clients logged in`);

    child.send({ type: 'warmup' });
    const warmed = await child.next(['ready', 'failed'], options.timeoutMs * 2);
    if (warmed.type === 'failed') throw new Error(`clients: ${warmed.message}`);
    await withTimeout(gateway.drained(), options.timeoutMs, 'the warm-up to drain');
    progress('available, warmed up');

    // The measured messages: everything counted in this window is their doing.
    const messages = await measure(
      async () => {
        child.send({ type: 'go' });
        const done = await child.next(['done', 'failed'], options.timeoutMs + 30_000);
        if (done.type === 'failed') throw new Error(`clients: ${done.message}`);
        progress(`${done.result.delivered} measured messages delivered`);
        return done.result;
      },
      options.profile ? `${resultsDirectory()}${options.name}-${scenario}-stream.cpuprofile` : undefined,
    );

    // Keepalives, as an idle always-online client sends them before API Gateway's idle cut.
    const keepaliveOf = async (element: 'ping' | 'r') => {
      const pinged = await measure(async () => {
        child.send({ type: 'ping', perClient: PINGS_PER_CLIENT, gapMs: PING_GAP_MS, element });
        const answer = await child.next(['pinged', 'failed'], options.timeoutMs + 30_000);
        if (answer.type === 'failed') throw new Error(`clients: ${answer.message}`);
        return answer.pings;
      });
      progress(`${pinged.value} keepalive ${element === 'r' ? '<r/>s' : 'pings'}`);
      return summarizeActivity(pinged.value, pinged.phase, context.memoryMb);
    };
    const keepalive = await keepaliveOf('ping');
    const keepaliveAckRequest = scenario === 'sm' ? await keepaliveOf('r') : undefined;

    // With SM: API Gateway's 2-hour cut and the client's resumption.
    let reconnect: ActivityResult | undefined;
    if (scenario === 'sm') {
      const resumed = await measure(async () => {
        child.send({ type: 'resume' });
        const answer = await child.next(['resumed', 'failed'], options.timeoutMs + 30_000);
        if (answer.type === 'failed') throw new Error(`clients: ${answer.message}`);
        return answer.resumes;
      });
      reconnect = summarizeActivity(resumed.value, resumed.phase, context.memoryMb);
      progress(`${resumed.value} reconnects with resumption`);
    }

    return {
      ...summarize(scenario, context, {
        clients: started.clients,
        result: messages.value,
        ...messages.phase,
      }),
      login,
      keepalive,
      keepaliveAckRequest,
      reconnect,
    };
  } finally {
    if (clients) {
      clients.send({ type: 'stop' });
      await clients.next(['stopped'], STOP_TIMEOUT_MS).catch(() => {});
      await clients.stop();
    }
    // The clients' $disconnects end their sessions through the stream function.
    await withTimeout(gateway.drained(), STOP_TIMEOUT_MS, 'the disconnects').catch(() => {});
    await gateway.close();
    await worker.stop();
    progress('stopped');
  }
}

async function createUsers(server: ReturnType<typeof createServer>, count: number, iterations: number) {
  const users: BenchUser[] = Array.from({ length: count }, (_, i) => ({
    username: `bench${i}`,
    password: randomBytes(9).toString('base64url'),
  }));
  await Promise.all(
    users.map(async (user) =>
      server.users.create(`${user.username}@${server.config.domain}`, {
        sha1: await deriveScramCredentials(user.password, 'sha1', iterations),
        sha256: await deriveScramCredentials(user.password, 'sha256', iterations),
      }),
    ),
  );
  return users;
}

/** What the meters read over one measured phase. */
interface Phase {
  worker: StreamWorkerSnapshot;
  runnerMeter: MeterSnapshot;
  runnerCpuMs: number;
  frames: FrameCounts;
}

interface Measured extends Phase {
  clients: number;
  result: ClientResult;
}

/** What a phase's requests and messages come to per event (message, login, ping, resumption). */
function trafficPer(per: (value: number) => number, phase: Phase, dynamodb: MeterSnapshot): TrafficPer {
  const { worker, frames } = phase;
  const byOperation: Record<string, number> = {};
  for (const [operation, usage] of Object.entries(dynamodb.operations))
    byOperation[operation] = per(usage.requests);
  // Where the units go: requests / RRU / WRU per operation and kind of item.
  const byItem: Record<string, { requests: number; readUnits: number; writeUnits: number }> = {};
  for (const [name, usage] of Object.entries(dynamodb.items ?? {}))
    byItem[name] = {
      requests: per(usage.requests),
      readUnits: per(usage.readUnits),
      writeUnits: per(usage.writeUnits),
    };
  return {
    dynamodbRequests: per(dynamodb.requests),
    dynamodbByOperation: byOperation,
    dynamodbByItem: byItem,
    readUnits: per(dynamodb.readUnits),
    writeUnits: per(dynamodb.writeUnits),
    apiGatewayMessages: per(frames.units + worker.postUnits),
    framesIn: per(frames.frames),
    postsOut: per(worker.outbound.posts),
    framesInByElement: mapValues(frames.byElement, per),
    postsOutByElement: mapValues(worker.postsByElement, per),
    streamInvocations: per(worker.invocations),
  };
}

/** With `--profile`: the CPU split by sampled self time, per event. */
function cpuBreakdown(
  per: (value: number) => number,
  cpuMs: number,
  profile: Record<string, number> | undefined,
): Record<string, number> | undefined {
  if (!profile) return undefined;
  const profiled = Object.values(profile).reduce((sum, ms) => sum + ms, 0);
  return mapValues(profile, (ms) => per((cpuMs * ms) / profiled));
}

/** Per event (login, ping, resumption) of a phase: the functions' work and its projected cost. */
function summarizeActivity(count: number, phase: Phase, memoryMb: number): ActivityResult {
  const { worker, frames } = phase;
  const per = (value: number) => (count === 0 ? Number.NaN : value / count);
  const dynamodb = mergeMeters(worker.dynamodb, phase.runnerMeter);
  const invocations = worker.invocations + worker.connectInvocations;
  const projectedMs = projectedDurationMs({
    cpuMs: worker.cpu.userMs + worker.cpu.systemMs,
    dynamodbRequests: dynamodb.requests,
    connectionCalls: worker.outbound.posts,
    invocations,
  });
  const sqsRequests = frames.sqsChunks + worker.invocations * SQS_REQUESTS_PER_BATCH;
  const apiGatewayUnits = frames.units + worker.postUnits;
  const cpuMs = worker.cpu.userMs + worker.cpu.systemMs;
  return {
    count,
    cpuBreakdownMs: cpuBreakdown(per, cpuMs, worker.profile),
    cpuMs: per(cpuMs),
    ...trafficPer(per, phase, dynamodb),
    queuedRecords: per(frames.records),
    connectInvocations: per(worker.connectInvocations),
    sqsRequests: per(sqsRequests),
    localWallMs: per(worker.durationsMs.reduce((sum, ms) => sum + ms, 0)),
    projectedLambdaMs: per(projectedMs),
    costPerMillion: costPerMillionMessages({
      apiGatewayMessages: per(apiGatewayUnits),
      sqsRequests: per(sqsRequests),
      lambdaInvocations: per(invocations),
      lambdaGbSeconds: per(gbSeconds(projectedMs, memoryMb)),
      readRequestUnits: per(dynamodb.readUnits),
      writeRequestUnits: per(dynamodb.writeUnits),
    }),
  };
}

function summarize(scenario: Scenario, context: ScenarioContext, measured: Measured): ScenarioResult {
  const { result, worker, frames } = measured;
  const delivered = result.delivered;
  const per = (value: number) => (delivered === 0 ? Number.NaN : value / delivered);
  const dynamodb = mergeMeters(worker.dynamodb, measured.runnerMeter);
  const cpuMs = worker.cpu.userMs + worker.cpu.systemMs;
  const wallMs = worker.durationsMs.reduce((sum, ms) => sum + ms, 0);
  const durations = [...worker.durationsMs].sort((a, b) => a - b);
  const latencies = [...result.latenciesMs].sort((a, b) => a - b);
  const apiGatewayUnits = frames.units + worker.postUnits;
  const sequentialAwsCalls = dynamodb.requests + worker.outbound.posts;
  const projectedMs = projectedDurationMs({
    cpuMs,
    dynamodbRequests: dynamodb.requests,
    connectionCalls: worker.outbound.posts,
    invocations: worker.invocations,
  });
  const usage = {
    apiGatewayMessages: per(apiGatewayUnits),
    sqsRequests: per(frames.sqsChunks + worker.invocations * SQS_REQUESTS_PER_BATCH),
    lambdaInvocations: per(worker.invocations),
    readRequestUnits: per(dynamodb.readUnits),
    writeRequestUnits: per(dynamodb.writeUnits),
  };
  const cost: MessageCost = {
    ...costPerMillionMessages({ ...usage, lambdaGbSeconds: per(gbSeconds(projectedMs, context.memoryMb)) }),
    basis: 'projected-aws',
    localWallTime: costPerMillionMessages({
      ...usage,
      lambdaGbSeconds: per(gbSeconds(worker.billedMs, context.memoryMb)),
    }),
  };
  const connectionMinutes = (measured.clients * result.elapsedMs) / 60_000;
  const cpuBreakdownMs = cpuBreakdown(per, cpuMs, worker.profile);
  return {
    scenario,
    clients: measured.clients,
    delivered,
    sent: result.sent,
    errors: result.errors,
    timedOut: result.timedOut,
    elapsedMs: result.elapsedMs,
    throughputPerSecond: delivered / (result.elapsedMs / 1000),
    latencyMs: {
      p50: percentile(latencies, 50),
      p95: percentile(latencies, 95),
      p99: percentile(latencies, 99),
      max: latencies[latencies.length - 1] ?? Number.NaN,
      mean: latencies.reduce((sum, ms) => sum + ms, 0) / latencies.length,
    },
    perMessage: {
      ...trafficPer(per, measured, dynamodb),
      cpuMs: per(cpuMs),
      wallMs: per(wallMs),
      billedMs: per(worker.billedMs),
      sequentialAwsCalls: per(sequentialAwsCalls),
      projectedLambdaMs: per(projectedMs),
      runnerCpuMs: per(measured.runnerCpuMs),
    },
    cpuBreakdownMs,
    perInvocation: {
      cpuMs: cpuMs / worker.invocations,
      wallMsMean: wallMs / worker.invocations,
      wallMsP50: percentile(durations, 50),
      wallMsP95: percentile(durations, 95),
    },
    streamProcessMemoryMb: { maxRss: worker.maxRssMb, heapUsed: worker.heapUsedMb },
    dynamodb,
    dynamodbUnreported: Object.entries(dynamodb.operations)
      .filter(([, usage]) => usage.reported < usage.requests)
      .map(([operation, usage]) => `${operation}: ${usage.requests - usage.reported} of ${usage.requests}`),
    costPerMillionMessages: cost,
    connectionMinutesPerMessage: per(connectionMinutes),
    connectionCostPerMillionMessages: connectionCostPerMillionMessages(per(connectionMinutes)),
  };
}

function mergeUsage(maps: (Record<string, OperationUsage> | undefined)[]): Record<string, OperationUsage> {
  const merged: Record<string, OperationUsage> = {};
  for (const map of maps) {
    for (const [name, usage] of Object.entries(map ?? {})) {
      const sum = merged[name] ?? { requests: 0, failures: 0, reported: 0, readUnits: 0, writeUnits: 0 };
      merged[name] = {
        requests: sum.requests + usage.requests,
        failures: sum.failures + usage.failures,
        reported: sum.reported + usage.reported,
        readUnits: sum.readUnits + usage.readUnits,
        writeUnits: sum.writeUnits + usage.writeUnits,
      };
    }
  }
  return merged;
}

function mergeMeters(a: MeterSnapshot, b: MeterSnapshot): MeterSnapshot {
  return {
    operations: mergeUsage([a.operations, b.operations]),
    items: mergeUsage([a.items, b.items]),
    requests: a.requests + b.requests,
    readUnits: a.readUnits + b.readUnits,
    writeUnits: a.writeUnits + b.writeUnits,
  };
}

/** Nearest-rank percentile of sorted values. */
function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))] as number;
}

function mapValues(record: Record<string, number>, map: (value: number) => number): Record<string, number> {
  return Object.fromEntries(Object.entries(record).map(([key, value]) => [key, map(value)]));
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`waited more than ${ms} ms for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** The stream function's configured memory, from the CDK construct when it is there. */
async function streamMemoryMb(override: number | undefined): Promise<{ mb: number; source: string }> {
  if (override !== undefined) return { mb: override, source: '--memory-mb' };
  // A computed specifier: the construct (and aws-cdk-lib behind it) is optional for the bench.
  const construct = '../infra/constructs/xmpp-function.ts';
  try {
    const module = (await import(construct)) as { FUNCTION_MEMORY_MB?: { stream?: number } };
    const mb = module.FUNCTION_MEMORY_MB?.stream;
    if (typeof mb === 'number')
      return { mb, source: 'FUNCTION_MEMORY_MB.stream (infra/constructs/xmpp-function.ts)' };
  } catch {
    // Fall through to the default.
  }
  return { mb: DEFAULT_STREAM_MEMORY_MB, source: 'default' };
}

// ---------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  if (process.argv.includes('--roster')) {
    // RFC 6121 at size (bench/roster.ts): a login with a large roster, a broadcast to many contacts.
    const { runRosterBench } = await import('./roster.ts');
    return runRosterBench(process.argv.slice(2));
  }
  const options = parseOptions();
  const memory = await streamMemoryMb(options.memoryMb);
  // The bench must end by itself: every wait is bounded, and this is the bound of all of them.
  const budgetMs = options.scenarios.length * (options.timeoutMs * 5 + 120_000);
  const watchdog = setTimeout(() => {
    process.stderr.write(`bench: no result after ${budgetMs} ms, giving up\n`);
    process.exit(2);
  }, budgetMs);
  watchdog.unref();

  process.stdout.write(
    `Nimbus bench: ${options.pairs} pairs × ${options.messages} messages (warm-up ${options.warmup}, window ${options.window}${options.payload === 'plain' ? '' : `, payload ${options.payload}`}${options.intervalMs ? `, interval ${options.intervalMs} ms` : ''}${options.ackDebounceMs !== undefined ? `, ack debounce ${options.ackDebounceMs} ms` : ''}), ` +
      `runs: ${options.scenarios.join(', ')}\n`,
  );
  await mkdir(resultsDirectory(), { recursive: true });
  // Before DynamoDB Local starts, so that the cold starts compete with less.
  let coldStart: BenchReport['coldStart'];
  if (options.coldRuns > 0) {
    coldStart = await measureColdStart('stream', options.coldRuns);
    process.stdout.write(
      `- stream bundle ${(coldStart.bundleBytes / 1024).toFixed(0)} KB minified, cold init ${coldStart.initMs.toFixed(0)} ms (median of ${coldStart.runs})\n`,
    );
  }
  const loadBefore = loadavg()[0] as number;
  const database = await startDynamoDbLocal({ port: await findFreePort() });
  const results: ScenarioResult[] = [];
  try {
    for (const scenario of options.scenarios) {
      process.stdout.write(
        `- ${scenario === 'sm' ? 'with stream management' : 'without stream management'} …\n`,
      );
      const result = await runScenario(scenario, {
        endpoint: database.endpoint,
        options,
        memoryMb: memory.mb,
      }).catch((error: unknown): ScenarioResult => {
        // One broken run must not cost the other its numbers.
        return { scenario, failed: error instanceof Error ? error.message : String(error) };
      });
      if (result.skipped) process.stdout.write(`  skipped: ${result.skipped}\n`);
      if (result.failed) process.stdout.write(`  FAILED: ${result.failed}\n`);
      results.push(result);
    }
  } finally {
    await database.stop();
  }

  const report: BenchReport = {
    name: options.name,
    at: new Date().toISOString(),
    options,
    machine: {
      node: process.version,
      cpus: availableParallelism(),
      cpuModel: cpus()[0]?.model,
      loadBefore,
      loadAfter: loadavg()[0] as number,
    },
    assumptions: {
      prices: { asOf: PRICES_AS_OF, region: PRICES_REGION, ...prices },
      streamMemoryMb: memory.mb,
      streamMemorySource: memory.source,
      sqsRequestsPerBatch: SQS_REQUESTS_PER_BATCH,
      lambdaBatchSize: STREAM_BATCH_SIZE,
      awsCallLatencyMs: AWS_CALL_LATENCY_MS,
    },
    targets: TARGETS,
    coldStart,
    results,
  };
  printReport(report);
  const file = `${resultsDirectory()}${options.name}.json`;
  await writeFile(file, `${JSON.stringify(report, null, 2)}\n`);
  process.stdout.write(`\nJSON: ${file}\n`);
  clearTimeout(watchdog);
}

main().then(
  // Keep-alive sockets of the SDK clients must not hold the process open.
  () => process.exit(0),
  (error: unknown) => {
    process.stderr.write(
      `bench failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`,
    );
    process.exit(1);
  },
);
