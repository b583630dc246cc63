/**
 * The local stack: the same handlers that run on AWS (functions/*), behind the gateway
 * emulator, with the outbound port pointed at the emulator's `@connections` endpoint through
 * the real API Gateway Management API client. With `faults`, the emulator and the server's
 * DynamoDB client fail on a seeded schedule (faults.ts).
 */
import { createConnectHandler } from '../../functions/connect.ts';
import { createStreamHandler } from '../../functions/stream.ts';
import { createSweeperHandler } from '../../functions/sweeper.ts';
import { createMetricsPublisher } from '../../functions/telemetry.ts';
import type { Config } from '../../shared/config.ts';
import { sqsFrameQueue } from '../../shared/frame-queue.ts';
import { createLogger, type Logger } from '../../shared/log.ts';
import { apiGatewayPort } from '../../shared/outbound.ts';
import { createServer, type Server } from '../../shared/server.ts';
import { createDocumentClient } from '../../shared/store/dynamo.ts';
import { injectDynamoDbFaults } from './dynamodb-faults.ts';
import { DEPLOYED_EVENT_SOURCE, type EventSourceSettings } from './event-source.ts';
import { FaultCounts, type FaultOptions } from './faults.ts';
import { type Gateway, startGateway } from './gateway.ts';

export interface LocalStackOptions {
  config: Config;
  host?: string;
  /** 0 picks a free port. */
  port?: number;
  idleTimeoutMs?: number;
  /** How often the sweeper runs, as the stack's one-minute schedule does; 0 turns it off. */
  sweepIntervalMs?: number;
  log?: Logger;
  /** The queue and event source (see GatewayOptions); each default is the deployed value. */
  eventSource?: EventSourceSettings;
  /** Faults to inject; none by default. */
  faults?: FaultOptions;
  /**
   * Where the embedded-metric-format lines go (the lines CloudWatch reads on AWS); default:
   * stderr when the log level is debug, nowhere otherwise.
   */
  metricLines?: (line: string) => void;
}

export interface LocalStack {
  url: string;
  gateway: Gateway;
  server: Server;
  /** Faults injected so far, by name (`post.gone`, `dynamodb.throttle`, `duplicate`, …). */
  faultsInjected(): Record<string, number>;
  close(): Promise<void>;
}

/** The emulator's lines through the stack's logger: injected faults at debug, trouble at warn. */
function gatewayLog(log: Logger | undefined): ((line: string) => void) | undefined {
  if (log === undefined) return undefined;
  return (line) => (line.includes('] fault: ') ? log.debug(line) : log.warn(line));
}

export async function startLocalStack(options: LocalStackOptions): Promise<LocalStack> {
  let server: Server | undefined;
  const ready = () => {
    if (!server) throw new Error('local stack not ready');
    return server;
  };
  const { faults } = options;
  const gateway = await startGateway({
    host: options.host ?? '127.0.0.1',
    port: options.port ?? 5280,
    idleTimeoutMs: options.idleTimeoutMs,
    region: options.config.region,
    // As the stack's event source mapping: up to ten records per invocation.
    batchSize: DEPLOYED_EVENT_SOURCE.batchSize,
    ...options.eventSource,
    faults,
    log: gatewayLog(options.log),
    connect: (event) => connect(event),
    stream: (event, context) => stream(event, context),
  });
  const config: Config = { ...options.config, connectionsEndpoint: gateway.managementEndpoint };
  const doc = createDocumentClient({ endpoint: config.dynamodbEndpoint, region: config.region });
  const dynamoDbFaults = new FaultCounts();
  if (faults?.dynamodb) {
    injectDynamoDbFaults(doc, {
      seed: faults.seed,
      rates: faults.dynamodb,
      counts: dynamoDbFaults,
      log: (line) => options.log?.debug(line),
    });
  }
  const log = options.log ?? createLogger();
  server = createServer({
    config,
    port: apiGatewayPort(gateway.managementEndpoint, config.region),
    doc,
    log,
  });
  const write =
    options.metricLines ??
    (log.isEnabled('debug') ? (line: string) => void process.stderr.write(`${line}\n`) : undefined);
  // The same lines the functions write on AWS; without a reader they are not even built.
  const publishMetrics = write
    ? createMetricsPublisher({ domain: config.domain, write })
    : () => void ready().metrics.drain();
  const connect = createConnectHandler(server, { publishMetrics });
  const visibilitySeconds = Math.floor(
    (options.eventSource?.visibilityTimeoutMs ?? DEPLOYED_EVENT_SOURCE.visibilityTimeoutMs) / 1000,
  );
  const stream = createStreamHandler(server, {
    publishMetrics,
    // As deployed: handed-back frames come again soon (never later than the timeout would).
    frameQueue: sqsFrameQueue({
      queueUrl: 'local-frame-queue',
      region: config.region,
      endpoint: gateway.queueEndpoint,
      credentials: async () => ({ accessKeyId: 'local', secretAccessKey: 'local' }),
    }),
    retryMaxSeconds: Math.max(0, Math.min(config.frameRetryMaxSeconds, visibilitySeconds - 1)),
    // The emulator's dead-letter point, as the stack gives the function the queue's (FRAME_MAX_RECEIVES).
    maxReceiveCount: Math.max(
      options.eventSource?.maxReceiveCount ?? DEPLOYED_EVENT_SOURCE.maxReceiveCount,
      1,
    ),
  });
  const sweep = createSweeperHandler(server, { publishMetrics });
  const sweepIntervalMs = options.sweepIntervalMs ?? 60_000;
  const sweeper =
    sweepIntervalMs > 0
      ? setInterval(() => {
          sweep().catch((error) => server?.log.error('sweep failed', { error }));
        }, sweepIntervalMs).unref()
      : undefined;
  return {
    url: gateway.url,
    gateway,
    server,
    faultsInjected: () => ({ ...gateway.faultsInjected(), ...dynamoDbFaults.snapshot() }),
    close: async () => {
      clearInterval(sweeper);
      await gateway.close();
    },
  };
}
