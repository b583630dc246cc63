/**
 * A fault schedule from its seed: the emulator's fault rates (every fault it offers, one family
 * stressed more than the others), the event source's short timeouts, and the seeded streams the
 * suite draws its own choices from (routes and pace of messages, socket kills). The same seed
 * gives the same schedule; what the server and the clients do with it still depends on timing.
 */
import type { EventSourceSettings } from '../../infra/local/event-source.ts';
import { type FaultOptions, faultStream, type Random } from '../../infra/local/faults.ts';
import type { KillMode } from './link.ts';

/**
 * The families a schedule stresses (three times their base rate; `kills`: three times as many
 * kills and no emulator faults at all).
 */
export const FAMILIES = ['queue', 'post', 'dynamodb', 'kills'] as const;
export type Family = (typeof FAMILIES)[number];

export interface KillPlan {
  /** Mean time between kills while messages flow, in ms (0: no kills). */
  meanGapMs: number;
  /** How long the far end of a `client` or `server` kill lives on, at most. */
  maxLagMs: number;
  /** How long a `silent` kill leaves the server's end half-open, at most. */
  maxHalfOpenMs: number;
  modes: readonly KillMode[];
}

export interface Schedule {
  seed: number;
  /** Undefined for the self-check: no faults at all. */
  faults: FaultOptions | undefined;
  eventSource: EventSourceSettings;
  kills: KillPlan;
  stressed: Family | 'none';
  /** Draws of the message senders (route, pace). */
  traffic: Random;
  /** Draws of the socket killer (when, whom, how). */
  killer: Random;
}

/** `visibilityTimeoutMs` 2 s and `functionTimeoutMs` 1 s: redeliveries happen within a run. */
export const FAULT_EVENT_SOURCE: EventSourceSettings = {
  visibilityTimeoutMs: 2_000,
  functionTimeoutMs: 1_000,
  // Few invocations at once, so batches mix connections as they do on AWS when busy.
  concurrency: 2,
  batchSize: 10,
};

export interface ScheduleOptions {
  /** Multiplies every fault rate (1 by default). */
  rate: number;
  /** No faults, no kills, the deployed event source: the harness must then count 0/0/0. */
  selfCheck: boolean;
}

function between(random: Random, low: number, high: number): number {
  return low + random() * (high - low);
}

export function scheduleOf(seed: number, options: ScheduleOptions): Schedule {
  const traffic = faultStream(seed, 'suite-traffic');
  const killer = faultStream(seed, 'suite-kills');
  if (options.selfCheck) {
    return {
      seed,
      faults: undefined,
      eventSource: {},
      kills: { meanGapMs: 0, maxLagMs: 0, maxHalfOpenMs: 0, modes: [] },
      stressed: 'none',
      traffic,
      killer,
    };
  }
  const draw = faultStream(seed, 'suite-schedule');
  // Seeds take the families in turn, so any four consecutive seeds stress each one once.
  const stressed = FAMILIES[seed % FAMILIES.length];
  const scale = (family: Family) => options.rate * (family === stressed ? 3 : 1) * between(draw, 0.5, 1.5);
  const queue = scale('queue');
  const post = scale('post');
  const dynamodb = scale('dynamodb');
  // Stressing kills is the issue's own scenario: sockets killed and resumed at once, no other
  // fault than the event source's short timeouts.
  const faults: FaultOptions =
    stressed === 'kills'
      ? { seed }
      : {
          seed,
          duplicate: Math.min(0.2, 0.01 * queue),
          dieMidBatch: Math.min(0.2, 0.008 * queue),
          post: {
            gone: Math.min(0.05, 0.002 * post),
            throttle: Math.min(0.2, 0.008 * post),
            serverError: Math.min(0.2, 0.004 * post),
            timeout: Math.min(0.05, 0.002 * post),
            slow: Math.min(0.1, 0.005 * post),
            timeoutMs: Math.round(between(draw, 200, 1_500)),
            slowMs: Math.round(between(draw, 100, 1_500)),
          },
          dynamodb: {
            throttle: Math.min(0.2, 0.008 * dynamodb),
            transactionConflict: Math.min(0.1, 0.004 * dynamodb),
            serverError: Math.min(0.1, 0.004 * dynamodb),
            serverErrorAfterWrite: Math.min(0.05, 0.002 * dynamodb),
            // A quarter of the schedules let errors outlive the SDK's retries and reach the server.
            persistent: draw() < 1 / 4,
          },
        };
  return {
    seed,
    faults,
    eventSource: FAULT_EVENT_SOURCE,
    kills: {
      meanGapMs: Math.round(1_500 / (stressed === 'kills' ? 3 : 1) / Math.max(options.rate, 0.1)),
      maxLagMs: 300,
      maxHalfOpenMs: 3_000,
      modes: ['client', 'server', 'both', 'silent'],
    },
    stressed,
    traffic,
    killer,
  };
}

/** The schedule in one line, for the report. */
export function describeSchedule(schedule: Schedule): string {
  if (schedule.faults === undefined) return `seed ${schedule.seed}: self-check (no faults, no kills)`;
  if (schedule.faults.post === undefined) {
    return `seed ${schedule.seed} (stressing kills): no emulator faults; kills every ~${schedule.kills.meanGapMs} ms`;
  }
  const { duplicate, dieMidBatch, post, dynamodb } = schedule.faults;
  const pct = (rate: number | undefined) => `${((rate ?? 0) * 100).toFixed(1)}%`;
  return (
    `seed ${schedule.seed} (stressing ${schedule.stressed}): duplicate ${pct(duplicate)}, die ${pct(dieMidBatch)}; ` +
    `post gone ${pct(post?.gone)} 429 ${pct(post?.throttle)} 500 ${pct(post?.serverError)} ` +
    `timeout ${pct(post?.timeout)}/${post?.timeoutMs}ms slow ${pct(post?.slow)}/${post?.slowMs}ms; ` +
    `dynamodb throttle ${pct(dynamodb?.throttle)} conflict ${pct(dynamodb?.transactionConflict)} ` +
    `500 ${pct(dynamodb?.serverError)} 500-after-write ${pct(dynamodb?.serverErrorAfterWrite)}` +
    `${dynamodb?.persistent ? ' (persistent)' : ''}; kills every ~${schedule.kills.meanGapMs} ms`
  );
}
