/**
 * The local stack: the same handlers that run on AWS (functions/*), behind the gateway
 * emulator, with the outbound port pointed at the emulator's `@connections` endpoint through
 * the real API Gateway Management API client.
 */
import { createConnectHandler } from '../../functions/connect.ts';
import { createStreamHandler } from '../../functions/stream.ts';
import { createSweeperHandler } from '../../functions/sweeper.ts';
import { createMetricsPublisher } from '../../functions/telemetry.ts';
import type { Config } from '../../shared/config.ts';
import { createLogger, type Logger } from '../../shared/log.ts';
import { apiGatewayPort } from '../../shared/outbound.ts';
import { createServer, type Server } from '../../shared/server.ts';
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
  close(): Promise<void>;
}

export async function startLocalStack(options: LocalStackOptions): Promise<LocalStack> {
  let server: Server | undefined;
  const ready = () => {
    if (!server) throw new Error('local stack not ready');
    return server;
  };
  const gateway = await startGateway({
    host: options.host ?? '127.0.0.1',
    port: options.port ?? 5280,
    idleTimeoutMs: options.idleTimeoutMs,
    region: options.config.region,
    // As the stack's event source mapping: up to ten records of one connection per invocation.
    batchSize: 10,
    connect: (event) => connect(event),
    stream: (event, context) => stream(event, context),
  });
  const config: Config = { ...options.config, connectionsEndpoint: gateway.managementEndpoint };
  const log = options.log ?? createLogger();
  server = createServer({
    config,
    port: apiGatewayPort(gateway.managementEndpoint, config.region),
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
  const stream = createStreamHandler(server, { publishMetrics });
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
    close: async () => {
      clearInterval(sweeper);
      await gateway.close();
    },
  };
}
