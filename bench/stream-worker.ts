/**
 * The stream function in a process of its own, as on Lambda: the runner's gateway emulator
 * hands it each SQS event over IPC, it runs `functions/stream.ts`'s handler with a metered
 * DynamoDB client and the real API Gateway Management API client, and answers. Nothing else
 * runs here, so this process's CPU time is the stream function's (plus the IPC, standing in
 * for the Lambda runtime's own invoke/response traffic). The connect function's `$connect`
 * runs here too (separate instances on AWS): in the measured message window there are none, and
 * a login's CPU and DynamoDB requests are then the functions' together.
 */
import { createConnectHandler } from '../functions/connect.ts';
import { createStreamHandler } from '../functions/stream.ts';
import { createLogger } from '../shared/log.ts';
import { apiGatewayPort, type ConnectionPort } from '../shared/outbound.ts';
import { createServer, type Server } from '../shared/server.ts';
import { dynamoMeter } from '../shared/store/dynamo.ts';
import type { CpuTime, FromStreamWorker, StreamWorkerSnapshot, ToStreamWorker } from './ipc.ts';
import { prices } from './prices.ts';
import { Profiler } from './profile.ts';

process.env.NIMBUS_METER = '1';
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

/** Counts what the outbound port posts, by element, in API Gateway's 32 KB message units. */
class MeteredPort implements ConnectionPort {
  postsByElement: Record<string, number> = {};
  units = 0;

  constructor(private readonly inner: ConnectionPort) {}

  post(connectionId: string, data: string, notAfter?: number) {
    const element = /^<([A-Za-z:_-]+)/.exec(data)?.[1] ?? '?';
    this.postsByElement[element] = (this.postsByElement[element] ?? 0) + 1;
    this.units += Math.max(1, Math.ceil(Buffer.byteLength(data) / prices.apiGateway.messageIncrementBytes));
    return this.inner.post(connectionId, data, notAfter);
  }

  close(connectionId: string) {
    return this.inner.close(connectionId);
  }

  reset(): void {
    this.postsByElement = {};
    this.units = 0;
  }
}

let server: Server | undefined;
let port: MeteredPort | undefined;
let handler: ReturnType<typeof createStreamHandler> | undefined;
let connectHandler: ReturnType<typeof createConnectHandler> | undefined;
let connectInvocations = 0;

let baselineCpu = process.cpuUsage();
let baselineWall = performance.now();
let baselineOutbound = { posts: 0, bytes: 0, gone: 0 };
let durationsMs: number[] = [];
let profiler: Profiler | undefined;
let profileFile: string | undefined;

function send(message: FromStreamWorker): void {
  process.send?.(message);
}

function cpuSince(start: NodeJS.CpuUsage): CpuTime {
  const delta = process.cpuUsage(start);
  return { userMs: delta.user / 1000, systemMs: delta.system / 1000 };
}

function reset(): void {
  if (!server || !port) throw new Error('stream worker not initialised');
  dynamoMeter.reset();
  port.reset();
  baselineOutbound = { ...server.outbound.counters };
  durationsMs = [];
  connectInvocations = 0;
  baselineWall = performance.now();
  baselineCpu = process.cpuUsage();
}

async function snapshot(): Promise<StreamWorkerSnapshot> {
  if (!server || !port) throw new Error('stream worker not initialised');
  const cpu = cpuSince(baselineCpu);
  const profile = profiler && profileFile ? await profiler.stop(profileFile) : undefined;
  profiler = undefined;
  const counters = server.outbound.counters;
  const step = prices.lambda.billingStepMs;
  return {
    cpu,
    wallMs: performance.now() - baselineWall,
    invocations: durationsMs.length,
    connectInvocations,
    durationsMs,
    billedMs: durationsMs.reduce((sum, ms) => sum + Math.max(step, Math.ceil(ms / step) * step), 0),
    dynamodb: dynamoMeter.snapshot(),
    outbound: {
      posts: counters.posts - baselineOutbound.posts,
      bytes: counters.bytes - baselineOutbound.bytes,
      gone: counters.gone - baselineOutbound.gone,
    },
    postsByElement: { ...port.postsByElement },
    postUnits: port.units,
    maxRssMb: process.resourceUsage().maxRSS / 1024,
    heapUsedMb: process.memoryUsage().heapUsed / 1024 / 1024,
    profile,
  };
}

process.on('message', (message: ToStreamWorker) => {
  switch (message.type) {
    case 'init': {
      const { config } = message;
      if (!config.connectionsEndpoint) throw new Error('stream worker needs connectionsEndpoint');
      port = new MeteredPort(apiGatewayPort(config.connectionsEndpoint, config.region));
      server = createServer({ config, port, log: createLogger(message.logLevel) });
      handler = createStreamHandler(server);
      connectHandler = createConnectHandler(server);
      reset();
      send({ type: 'ready' });
      return;
    }
    case 'invoke': {
      const run = handler;
      if (!run) throw new Error('stream worker not initialised');
      const started = performance.now();
      run(message.event).then(
        (response) => {
          durationsMs.push(performance.now() - started);
          send({ type: 'result', id: message.id, response });
        },
        (error: unknown) => {
          durationsMs.push(performance.now() - started);
          send({ type: 'result', id: message.id, response: undefined, error: String(error) });
        },
      );
      return;
    }
    case 'connect': {
      const run = connectHandler;
      if (!run) throw new Error('stream worker not initialised');
      connectInvocations += 1;
      void run(message.event).then((result) => send({ type: 'connect-result', id: message.id, result }));
      return;
    }
    case 'reset': {
      profileFile = message.profileFile;
      profiler = profileFile ? new Profiler() : undefined;
      void (profiler?.start() ?? Promise.resolve()).then(() => {
        reset();
        send({ type: 'reset-done' });
      });
      return;
    }
    case 'snapshot':
      void snapshot().then((result) => send({ type: 'snapshot', snapshot: result }));
      return;
  }
});

// The runner going away (or closing the channel) ends the function.
process.on('disconnect', () => process.exit(0));
