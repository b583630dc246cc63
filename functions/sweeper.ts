/**
 * The sweeper, every minute: ends sessions whose resumption window closed without a resume
 * (XEP-0198) so nothing addressed to them waits forever, finishes interrupted re-routes, probes
 * attached sessions, and sweeps XEP-0136 expiries and purges: the modules hook the `sweep` event,
 * one phase per hook (core/lifecycle.ts `runSweep`). With nothing due a sweep costs one Query per
 * sparse index partition.
 *
 * Each phase and each item runs on its own: a failure is logged and counted (`SweepFailures`)
 * and the run goes on. An invocation with failures still fails in the end (after doing all it
 * could), so the function's Errors alarm tells of them as before. No new item starts once less
 * than SWEEP_TIME_RESERVE_MS of the invocation is left: what is left waits for the next run.
 */
import type { Context } from 'aws-lambda';
import { loadConfig } from '../shared/config.ts';
import { runSweep, type SweepOutcome } from '../shared/core/lifecycle.ts';
import { createServer, type Server } from '../shared/server.ts';
import { instrumentFor, lambdaTelemetry, type MetricsPublisher } from './telemetry.ts';

/**
 * Time kept in hand at the end of an invocation (the function's timeout is 50 s): an item
 * started just before it (an expiry re-routing a full queue, a probe retried by the SDK) can
 * still finish, and the metrics are written. One cut short is safe anyway (re-routes are
 * resumed from their recorded position), only later.
 */
export const SWEEP_TIME_RESERVE_MS = 10_000;

export interface SweeperHandlerOptions {
  publishMetrics?: MetricsPublisher;
  /** The sweep's clock (tests); default Date.now. */
  now?: () => number;
}

/** The run ended with failures (each logged with its phase): the invocation fails for the alarm. */
export class SweepFailedError extends Error {
  constructor(readonly outcome: SweepOutcome) {
    super(`sweep: ${outcome.failed} item(s) or phase(s) failed; the rest of the run went on`);
    this.name = 'SweepFailedError';
  }
}

export function createSweeperHandler(server: Server, options: SweeperHandlerOptions = {}) {
  return async (context?: Pick<Context, 'getRemainingTimeInMillis'>): Promise<{ swept: number }> => {
    try {
      const outcome = await runSweep(server, (options.now ?? Date.now)(), {
        ...(context
          ? {
              hasTime: () => context.getRemainingTimeInMillis() > SWEEP_TIME_RESERVE_MS,
              timeLeftMs: () => context.getRemainingTimeInMillis(),
            }
          : {}),
      });
      server.metrics.count('SessionsExpired', outcome.swept);
      if (outcome.failed > 0) throw new SweepFailedError(outcome);
      return { swept: outcome.swept };
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
  return handle(context);
};
