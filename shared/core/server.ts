/**
 * The server core's context, built once per process (per Lambda cold start, per local runner,
 * per test): configuration, one store per table, the outbound port and the module host. It
 * knows no module: the composition root (`shared/server.ts`) registers them on `host`.
 */
import type { DynamoDBDocumentClient } from '@aws-sdk/lib-dynamodb';
import type { Config } from '../config.ts';
import { createLogger, type Logger } from '../log.ts';
import { MetricsRecorder } from '../metrics.ts';
import { apiGatewayPort, type ConnectionPort, Outbound } from '../outbound.ts';
import { createArchiveStore } from '../store/archive.ts';
import { documentClientFor } from '../store/dynamo.ts';
import { createOfflineStore } from '../store/offline.ts';
import { createRosterStore } from '../store/roster.ts';
import { createSessionStore } from '../store/sessions.ts';
import { createSmQueueStore } from '../store/sm-queue.ts';
import { createUserStore } from '../store/users.ts';
import { Host, type Server } from './host.ts';
import { registerLifecycle } from './lifecycle.ts';
import { RateLimiter } from './rate-limit.ts';

export type { Module, Server } from './host.ts';

export interface ServerOptions {
  config: Config;
  port?: ConnectionPort;
  doc?: DynamoDBDocumentClient;
  log?: Logger;
  metrics?: MetricsRecorder;
  /**
   * Wraps each AWS SDK client the server builds (DynamoDB, the Management API): the stream
   * function passes Powertools Tracer's `captureAWSv3Client` when tracing is on.
   */
  instrumentClient?: <T>(client: T) => T;
}

export function createServerCore(options: ServerOptions): Server {
  const { config } = options;
  const metrics = options.metrics ?? new MetricsRecorder();
  const doc =
    options.doc ??
    documentClientFor(config, {
      instrument: options.instrumentClient,
      onThrottle: (operation) => metrics.count('DynamoDbThrottles', 1, operation),
    });
  // Built on first use: $connect never posts, and needs no management endpoint.
  let apiGateway: ConnectionPort | undefined;
  const gateway = () =>
    (apiGateway ??= apiGatewayPort(
      config.connectionsEndpoint ?? missing('CONNECTIONS_ENDPOINT (the API Gateway Management API endpoint)'),
      config.region,
      { instrument: options.instrumentClient },
    ));
  const port: ConnectionPort = options.port ?? {
    post: (connectionId, data, notAfter) => gateway().post(connectionId, data, notAfter),
    close: (connectionId) => gateway().close(connectionId),
  };
  const users = createUserStore(doc, config.tables.users);
  let decoySecret: Promise<string> | undefined;
  const server: Server = {
    config,
    sessions: createSessionStore(doc, config.tables.sessions, config.connectionTtlSeconds),
    users,
    offline: createOfflineStore(doc, config.tables.offline, {
      quota: config.offlineQuota,
      ttlSeconds: config.offlineTtlSeconds,
    }),
    smQueue: createSmQueueStore(doc, config.tables.sessions),
    roster: createRosterStore(doc, config.tables.roster, { maxItems: config.rosterMaxItems }),
    archive: createArchiveStore(doc, config.tables.archive, {
      changeWindowMs: config.archiveChangeWindowSeconds * 1000,
      tombstoneSeconds: config.archiveTombstoneDays * 86_400,
      maxCollectionEntries: config.archiveMaxCollectionEntries,
    }),
    outbound: new Outbound(port),
    host: new Host(),
    rates: new RateLimiter({
      framesPerSecond: config.rateFramesPerSecond,
      frameBurst: config.rateFrameBurst,
      bytesPerSecond: config.rateBytesPerSecond,
      byteBurst: config.rateByteBurst,
    }),
    log: options.log ?? createLogger(),
    metrics,
    decoySecret() {
      decoySecret ??= users.decoySecret().catch((error) => {
        decoySecret = undefined;
        throw error;
      });
      return decoySecret;
    },
  };
  registerLifecycle(server);
  return server;
}

function missing(what: string): never {
  throw new Error(`Missing configuration: ${what}`);
}
