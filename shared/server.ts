/**
 * The server core's dependencies, wired once per process (per Lambda cold start, per local
 * runner, per test). Feature modules register themselves with the router here.
 */
import type { DynamoDBDocumentClient } from '@aws-sdk/lib-dynamodb';
import type { Config } from './config.ts';
import * as bind from './features/bind.ts';
import * as disco from './features/disco.ts';
import * as offline from './features/offline.ts';
import * as offlineStorage from './features/offline-storage.ts';
import * as ping from './features/ping.ts';
import * as presence from './features/presence.ts';
import * as version from './features/version.ts';
import { createLogger, type Logger } from './log.ts';
import { apiGatewayPort, type ConnectionPort, Outbound } from './outbound.ts';
import { Router } from './router.ts';
import { documentClientFor } from './store/dynamo.ts';
import { createOfflineStore, type OfflineStore } from './store/offline.ts';
import { createSessionStore, type SessionStore } from './store/sessions.ts';
import { createSmQueueStore, type SmQueueStore } from './store/sm-queue.ts';
import { createUserStore, type UserStore } from './store/users.ts';

export interface Server {
  config: Config;
  sessions: SessionStore;
  users: UserStore;
  offline: OfflineStore;
  smQueue: SmQueueStore;
  outbound: Outbound;
  router: Router;
  log: Logger;
  /** Secret for SASL decoys of unknown users (stable per deployment, never sent). */
  decoySecret(): Promise<string>;
}

export interface ServerOptions {
  config: Config;
  port?: ConnectionPort;
  doc?: DynamoDBDocumentClient;
  log?: Logger;
}

export function createServer(options: ServerOptions): Server {
  const { config } = options;
  const doc = options.doc ?? documentClientFor(config);
  // Built on first use: $connect never posts, and needs no management endpoint.
  let apiGateway: ConnectionPort | undefined;
  const gateway = () =>
    (apiGateway ??= apiGatewayPort(
      config.connectionsEndpoint ?? missing('CONNECTIONS_ENDPOINT (the API Gateway Management API endpoint)'),
      config.region,
    ));
  const port: ConnectionPort = options.port ?? {
    post: (connectionId, data) => gateway().post(connectionId, data),
    close: (connectionId) => gateway().close(connectionId),
  };
  const users = createUserStore(doc, config.tables.users);
  let decoySecret: Promise<string> | undefined;
  const router = new Router();
  for (const feature of [bind, disco, ping, version, presence, offlineStorage, offline])
    feature.register(router);
  return {
    config,
    sessions: createSessionStore(doc, config.tables.sessions, config.connectionTtlSeconds),
    users,
    offline: createOfflineStore(doc, config.tables.offline, {
      quota: config.offlineQuota,
      ttlSeconds: config.offlineTtlSeconds,
    }),
    smQueue: createSmQueueStore(doc, config.tables.sessions),
    outbound: new Outbound(port),
    router,
    log: options.log ?? createLogger(),
    decoySecret() {
      decoySecret ??= users.decoySecret().catch((error) => {
        decoySecret = undefined;
        throw error;
      });
      return decoySecret;
    },
  };
}

function missing(what: string): never {
  throw new Error(`Missing configuration: ${what}`);
}
