/** `$connect`: a direct Lambda integration, because it must answer the WebSocket handshake. */
import type { Context } from 'aws-lambda';
import { loadConfig } from '../shared/config.ts';
import { type ConnectEvent, type ConnectResult, handleConnect } from '../shared/core/connect.ts';
import { withLogContext } from '../shared/log.ts';
import { createServer, type Server } from '../shared/server.ts';
import { lambdaTelemetry, type MetricsPublisher } from './telemetry.ts';

export interface ConnectHandlerOptions {
  publishMetrics?: MetricsPublisher;
}

export function createConnectHandler(server: Server, options: ConnectHandlerOptions = {}) {
  return async (event: ConnectEvent): Promise<ConnectResult> => {
    const { connectionId, requestId } = event.requestContext ?? {};
    try {
      return await withLogContext({ connectionId, requestId }, async () => {
        try {
          const result = handleConnect(event);
          if (result.statusCode === 200) server.metrics.count('ConnectionsOpened');
          else {
            server.metrics.count('HandshakesRefused');
            server.log.info('handshake refused', { statusCode: result.statusCode });
          }
          return result;
        } catch (error) {
          server.log.error('connect failed', { error });
          return { statusCode: 500, body: 'Internal error' };
        }
      });
    } finally {
      options.publishMetrics?.(server.metrics.drain());
    }
  };
}

let started:
  | Promise<{ handle: ReturnType<typeof createConnectHandler>; begin(context?: Context): void }>
  | undefined;

async function start() {
  const config = loadConfig();
  const telemetry = await lambdaTelemetry(config, 'connect');
  const server = createServer({ config, log: telemetry.log });
  return {
    handle: createConnectHandler(server, telemetry),
    begin: (context?: Context) => telemetry.startInvocation(context),
  };
}

export const handler = async (event: ConnectEvent, context?: Context): Promise<ConnectResult> => {
  started ??= start();
  const { handle, begin } = await started;
  begin(context);
  return handle(event);
};
