/**
 * The sweeper, every minute: ends sessions whose resumption window closed without a resume
 * (XEP-0198) so nothing addressed to them waits forever: the stream-management module hooks
 * the `sweep` event; with no detached sessions a sweep costs one Query on an empty sparse index.
 */
import type { Context } from 'aws-lambda';
import { loadConfig } from '../shared/config.ts';
import { sweep } from '../shared/core/lifecycle.ts';
import { createServer, type Server } from '../shared/server.ts';
import { instrumentFor, lambdaTelemetry, type MetricsPublisher } from './telemetry.ts';

export interface SweeperHandlerOptions {
  publishMetrics?: MetricsPublisher;
}

export function createSweeperHandler(server: Server, options: SweeperHandlerOptions = {}) {
  return async (): Promise<{ swept: number }> => {
    try {
      const swept = await sweep(server, Date.now());
      server.metrics.count('SessionsExpired', swept);
      return { swept };
    } finally {
      options.publishMetrics?.(server.metrics.drain());
    }
  };
}

let started:
  | Promise<{ handle: ReturnType<typeof createSweeperHandler>; begin(context: Context): void }>
  | undefined;

async function start() {
  const config = loadConfig();
  const telemetry = await lambdaTelemetry(config, 'sweeper');
  const server = createServer({ config, log: telemetry.log, ...instrumentFor(telemetry.tracer) });
  return {
    handle: createSweeperHandler(server, telemetry),
    begin: (context: Context) => telemetry.startInvocation(context),
  };
}

export const handler = async (_event: unknown, context: Context): Promise<{ swept: number }> => {
  started ??= start();
  const { handle, begin } = await started;
  begin(context);
  return handle();
};
