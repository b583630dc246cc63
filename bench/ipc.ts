/**
 * Messages between the bench's three processes: the runner (gateway emulator, DynamoDB
 * Local), the stream worker (the stream function, and `$connect`s run by the connect function,
 * nothing else, so its CPU time is the functions')
 * and the client process (the xmpp.js clients, whose work must not count as the server's).
 */
import type { SQSBatchResponse, SQSEvent } from 'aws-lambda';
import type { Config } from '../shared/config.ts';
import type { ConnectEvent, ConnectResult } from '../shared/core/connect.ts';
import type { OutboundCounters } from '../shared/outbound.ts';
import type { MeterSnapshot } from '../shared/store/dynamo.ts';
import type { Payload } from './report.ts';

export interface CpuTime {
  userMs: number;
  systemMs: number;
}

// -- runner ⇄ stream worker ------------------------------------------------------------------

export type ToStreamWorker =
  | { type: 'init'; config: Config; logLevel: string }
  | { type: 'invoke'; id: number; event: SQSEvent }
  /** `$connect`: the connect function runs in this process too, so a login's CPU is all here. */
  | { type: 'connect'; id: number; event: ConnectEvent }
  /** Starts the measured window; with `profileFile`, under the V8 sampling profiler. */
  | { type: 'reset'; profileFile?: string }
  | { type: 'snapshot' };

export interface StreamWorkerSnapshot {
  cpu: CpuTime;
  wallMs: number;
  invocations: number;
  /** `$connect` invocations (the connect function's, not counted in `invocations`). */
  connectInvocations: number;
  /** Handler durations, one per invocation, in milliseconds. */
  durationsMs: number[];
  /** Sum of the durations rounded up to Lambda's billing step. */
  billedMs: number;
  dynamodb: MeterSnapshot;
  outbound: OutboundCounters;
  /** Posts by top-level element (`message`, `r`, `a`, …). */
  postsByElement: Record<string, number>;
  /** API Gateway message units of the posts (32 KB increments). */
  postUnits: number;
  /** Peak resident set size of the stream process (MB): what sizes the function's memory. */
  maxRssMb: number;
  /** V8 heap in use at the snapshot (MB). */
  heapUsedMb: number;
  /** With `--profile`: sampled self time (ms) by category. */
  profile?: Record<string, number>;
}

export type FromStreamWorker =
  | { type: 'ready' }
  | { type: 'result'; id: number; response: SQSBatchResponse | undefined; error?: string }
  | { type: 'connect-result'; id: number; result: ConnectResult }
  | { type: 'reset-done' }
  | { type: 'snapshot'; snapshot: StreamWorkerSnapshot };

// -- runner ⇄ client process -----------------------------------------------------------------

export interface BenchUser {
  username: string;
  password: string;
}

export interface ClientPlan {
  url: string;
  domain: string;
  /** Pair i is users[2i] and users[2i + 1]. */
  users: BenchUser[];
  messagesPerPair: number;
  warmupPerPair: number;
  /** Messages in flight per pair. */
  window: number;
  /** The chat messages' shape (bench/report.ts BenchOptions.payload). */
  payload: Payload;
  /** Pause before each reply (ms; BenchOptions.intervalMs). */
  intervalMs: number;
  /** xmpp.js's `requestAckDebounce` (ms), when set. */
  ackDebounceMs?: number;
  streamManagement: boolean;
  timeoutMs: number;
}

export interface ClientResult {
  sent: number;
  delivered: number;
  errors: number;
  /** Send-to-receive times of the measured messages, milliseconds. */
  latenciesMs: number[];
  /** From `go` to the last measured delivery. */
  elapsedMs: number;
  timedOut: boolean;
}

/**
 * In order: `start` (log in: the login phase), `warmup` (initial presence, warm-up messages),
 * `go` (the measured messages), `ping` (keepalives), `resume` (with SM: reconnect and resume),
 * `stop`.
 */
export type ToClients =
  | { type: 'start'; plan: ClientPlan }
  | { type: 'warmup' }
  | { type: 'go' }
  /** `ping`: an XEP-0199 ping to the server; `r`: an XEP-0198 `<r/>` (with SM), answered `<a/>`. */
  | { type: 'ping'; perClient: number; gapMs: number; element: 'ping' | 'r' }
  | { type: 'resume' }
  | { type: 'stop' };

export type FromClients =
  | { type: 'logged-in'; clients: number; smAdvertised: boolean; smEnabled: number }
  | { type: 'ready' }
  | { type: 'pinged'; pings: number }
  | { type: 'resumed'; resumes: number }
  | { type: 'skip'; reason: string }
  | { type: 'done'; result: ClientResult }
  | { type: 'stopped' }
  | { type: 'failed'; message: string };
