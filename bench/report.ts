/**
 * The bench's result shape, its targets (issues #3, #4 and #13), the printed table and the
 * verdict.
 */

import type { MeterSnapshot } from '../shared/store/dynamo.ts';
import type { ColdStart } from './cold-start.ts';
import type { CostPerMillion } from './cost.ts';
import type { AWS_CALL_LATENCY_MS, prices } from './prices.ts';

export type Scenario = 'plain' | 'sm';

/** Per delivered 1:1 chat message to an online recipient. */
export const TARGETS = {
  /** Issues #3 and #13: without stream management. */
  plain: { dynamodbRequests: 2, cpuMs: 1, dollarsPerMillion: 4 },
  /** Issues #4 and #13: stream management on both sides. */
  sm: { dynamodbRequests: 4, apiGatewayMessages: 2.2, writeUnits: 1.5, dollarsPerMillion: 5 },
  /** Issue #13: per SCRAM login (open → bound, and `<enable/>` with SM), functions only. */
  login: { cpuMs: 5, dynamodbRequests: 10 },
  /** Issue #13: the stream function's bundle (KB = 1024 bytes) and cold init on this machine. */
  coldStart: { bundleKb: 500, initMs: 150 },
} as const;

/**
 * One kind of event other than a chat message (a login, a keepalive ping, a reconnect with
 * resumption), per event: what the functions did and what it costs.
 */
/** The requests and messages of a phase, per event (per delivered message, per login, …). */
export interface TrafficPer {
  dynamodbRequests: number;
  dynamodbByOperation: Record<string, number>;
  /** Requests and units by operation and kind of item (`UpdateItem conn`, `UpdateItem sm`, …). */
  dynamodbByItem?: Record<string, { requests: number; readUnits: number; writeUnits: number }>;
  readUnits: number;
  writeUnits: number;
  /** Frames in plus posts out, in 32 KB units (the `$connect` handshake not counted). */
  apiGatewayMessages: number;
  framesIn: number;
  postsOut: number;
  framesInByElement: Record<string, number>;
  postsOutByElement: Record<string, number>;
  /** Stream invocations here, where simultaneous clients' records share batches. */
  streamInvocations: number;
}

export interface ActivityResult extends TrafficPer {
  /** Events measured (logins, pings, resumptions). */
  count: number;
  /** CPU of the stream and connect functions together (DynamoDB Local and the emulator excluded). */
  cpuMs: number;
  /** With `--profile` (logins only): that CPU split by sampled self time. */
  cpuBreakdownMs?: Record<string, number>;
  /** Queue messages (frames and `$disconnect`s): SendMessage requests, and at chat pace one batch each. */
  queuedRecords: number;
  connectInvocations: number;
  sqsRequests: number;
  /** Handler wall time on the local stack, stream and connect. */
  localWallMs: number;
  /** CPU plus sequential AWS calls at the stated latencies (see `cost.ts`). */
  projectedLambdaMs: number;
  /** $ per million such events, projected; Lambda duration priced at the stream function's memory. */
  costPerMillion: CostPerMillion;
}

/** The projected-AWS cost (`total`) with the local-wall-time figure beside it. */
export type MessageCost = CostPerMillion & {
  basis: 'projected-aws';
  localWallTime: CostPerMillion;
};

export interface ScenarioResult {
  scenario: Scenario;
  skipped?: string;
  failed?: string;
  clients?: number;
  delivered?: number;
  sent?: number;
  errors?: number;
  timedOut?: boolean;
  elapsedMs?: number;
  throughputPerSecond?: number;
  latencyMs?: { p50: number; p95: number; p99: number; max: number; mean: number };
  perMessage?: TrafficPer & {
    cpuMs: number;
    wallMs: number;
    billedMs: number;
    /** DynamoDB requests plus `@connections` calls, counted as made one after the other. */
    sequentialAwsCalls: number;
    /** `cpuMs` plus the sequential calls at the stated latencies, plus half a billing step per invocation. */
    projectedLambdaMs: number;
    runnerCpuMs: number;
  };
  /** With `--profile`: the stream function's CPU per message split by sampled self time. */
  cpuBreakdownMs?: Record<string, number>;
  perInvocation?: { cpuMs: number; wallMsMean: number; wallMsP50: number; wallMsP95: number };
  /** The stream process's peak RSS and heap in use (MB), for sizing the function's memory. */
  streamProcessMemoryMb?: { maxRss: number; heapUsed: number };
  dynamodb?: MeterSnapshot;
  /** Operations some of whose answers carried no ConsumedCapacity (their units are missing). */
  dynamodbUnreported?: string[];
  /** `total` is the projected-AWS figure; `localWallTime` prices the wall time measured here. */
  costPerMillionMessages?: MessageCost;
  /** The login phase before the measured messages: per login. */
  login?: ActivityResult;
  /** XEP-0199 pings to the server after the measured messages: per ping. */
  keepalive?: ActivityResult;
  /** With SM: an XEP-0198 `<r/>` as the keepalive instead of a ping: per `<r/>`. */
  keepaliveAckRequest?: ActivityResult;
  /** With SM: socket closed, reconnect, SCRAM, `<resume/>`: per resumption. */
  reconnect?: ActivityResult;
  connectionMinutesPerMessage?: number;
  connectionCostPerMillionMessages?: number;
}

export type Payload = 'plain' | 'converse';

export interface BenchOptions {
  pairs: number;
  messages: number;
  warmup: number;
  window: number;
  /**
   * The chat messages' shape: `plain`, an id and a short body (the default); `converse`, as
   * Converse.js sends one (XEP-0085 `<active/>`, XEP-0184 `<request/>`, XEP-0359 `<origin-id/>`,
   * UUID ids, a body of about 70 characters).
   */
  payload: Payload;
  /** A pair's pause between receiving a message and sending the next (ms): a chat's pace. */
  intervalMs: number;
  /** xmpp.js's delay before its `<r/>` after a burst it sent (ms; its default 250). */
  ackDebounceMs?: number;
  scenarios: Scenario[];
  name: string;
  memoryMb?: number;
  timeoutMs: number;
  logLevel: string;
  profile: boolean;
  /** Cold-start runs of the stream bundle (0: not measured). */
  coldRuns: number;
}

export interface BenchReport {
  name: string;
  at: string;
  options: BenchOptions;
  machine: {
    node: string;
    cpus: number;
    cpuModel: string | undefined;
    /** 1-minute load averages before and after: other work on the box slows wall times and latency. */
    loadBefore: number;
    loadAfter: number;
  };
  assumptions: {
    prices: { asOf: string; region: string } & typeof prices;
    streamMemoryMb: number;
    streamMemorySource: string;
    sqsRequestsPerBatch: number;
    lambdaBatchSize: number;
    /** Per-call latencies of the projected Lambda duration. */
    awsCallLatencyMs: typeof AWS_CALL_LATENCY_MS;
  };
  targets: typeof TARGETS;
  /** The stream function's bundle and cold init (`bench/cold-start.ts`). */
  coldStart?: ColdStart;
  results: ScenarioResult[];
}

const TITLES: Record<Scenario, string> = { plain: 'without SM', sm: 'with SM' };

const fixed = (digits: number) => (value: number | undefined) =>
  value === undefined || Number.isNaN(value) ? '—' : value.toFixed(digits);
const f0 = fixed(0);
const f1 = fixed(1);
const f2 = fixed(2);
const f3 = fixed(3);
const dollars = (value: number | undefined) =>
  value === undefined || Number.isNaN(value) ? '—' : `$${value.toFixed(value < 1 ? 3 : 2)}`;

function breakdown(record: Record<string, number> | undefined): string {
  if (!record) return '—';
  const entries = Object.entries(record).filter(([, value]) => value > 0);
  if (entries.length === 0) return '0';
  return entries
    .sort(([, a], [, b]) => b - a)
    .map(([key, value]) => `${key} ${value.toFixed(2)}`)
    .join(', ');
}

type Row = [label: string, cell: (result: ScenarioResult) => string, target?: string];

export function printReport(report: BenchReport): void {
  const { results, assumptions } = report;
  const memory = `${assumptions.streamMemoryMb} MB`;
  const cost = (pick: (cost: CostPerMillion) => number) => (r: ScenarioResult) =>
    r.costPerMillionMessages ? dollars(pick(r.costPerMillionMessages)) : '—';
  const rows: (Row | string)[] = [
    'Per delivered 1:1 chat message to an online recipient (warm-up excluded)',
    ['clients / messages delivered', (r) => `${r.clients ?? '—'} / ${r.delivered ?? '—'}`],
    ['errors / timed out', (r) => `${r.errors ?? '—'} / ${r.timedOut ? 'yes' : 'no'}`],
    ['throughput (messages/s)', (r) => f0(r.throughputPerSecond)],
    [
      'latency p50 / p95 / p99 (ms)',
      (r) => (r.latencyMs ? `${f1(r.latencyMs.p50)} / ${f1(r.latencyMs.p95)} / ${f1(r.latencyMs.p99)}` : '—'),
    ],
    [
      'latency mean / max (ms)',
      (r) => (r.latencyMs ? `${f1(r.latencyMs.mean)} / ${f1(r.latencyMs.max)}` : '—'),
    ],
    [
      'DynamoDB requests',
      (r) => f2(r.perMessage?.dynamodbRequests),
      `≤ ${TARGETS.plain.dynamodbRequests} / ≤ ${TARGETS.sm.dynamodbRequests}`,
    ],
    ['  by operation', (r) => breakdown(r.perMessage?.dynamodbByOperation)],
    [
      '  read / write units (RRU / WRU)',
      (r) => `${f2(r.perMessage?.readUnits)} / ${f2(r.perMessage?.writeUnits)}`,
    ],
    [
      'API Gateway messages (in + out)',
      (r) =>
        r.perMessage
          ? `${f2(r.perMessage.apiGatewayMessages)} (${f2(r.perMessage.framesIn)} + ${f2(r.perMessage.postsOut)})`
          : '—',
      `— / ≤ ${TARGETS.sm.apiGatewayMessages}`,
    ],
    ['  frames in, by element', (r) => breakdown(r.perMessage?.framesInByElement)],
    ['  posts out, by element', (r) => breakdown(r.perMessage?.postsOutByElement)],
    ['stream function invocations', (r) => f2(r.perMessage?.streamInvocations)],
    ['stream function CPU (ms)', (r) => f3(r.perMessage?.cpuMs), `≤ ${TARGETS.plain.cpuMs} / —`],
    ['  CPU per invocation (ms)', (r) => f3(r.perInvocation?.cpuMs)],
    ...(results.some((r) => r.cpuBreakdownMs) ? ['  split by sampled self time (--profile), ms:'] : []),
    ...profileRows(results),
    [
      '  wall per invocation mean / p50 / p95 (ms)',
      (r) =>
        r.perInvocation
          ? `${f2(r.perInvocation.wallMsMean)} / ${f2(r.perInvocation.wallMsP50)} / ${f2(r.perInvocation.wallMsP95)}`
          : '—',
    ],
    ['  billed Lambda ms (1 ms steps)', (r) => f2(r.perMessage?.billedMs)],
    ['sequential AWS calls (DynamoDB + posts)', (r) => f2(r.perMessage?.sequentialAwsCalls)],
    [
      `projected Lambda ms (CPU + calls at ${assumptions.awsCallLatencyMs.dynamodbRequest} / ${assumptions.awsCallLatencyMs.connectionPost} ms)`,
      (r) => f2(r.perMessage?.projectedLambdaMs),
    ],
    [
      'stream process peak RSS / heap used (MB)',
      (r) =>
        r.streamProcessMemoryMb
          ? `${r.streamProcessMemoryMb.maxRss.toFixed(0)} / ${r.streamProcessMemoryMb.heapUsed.toFixed(0)}`
          : '—',
    ],
    ['runner CPU, not billed (gateway emulator) (ms)', (r) => f3(r.perMessage?.runnerCpuMs)],
    `$ per million messages (${assumptions.prices.region} list prices as of ${assumptions.prices.asOf})`,
    ['API Gateway messages', cost((c) => c.apiGatewayMessages)],
    [`SQS FIFO (1 per frame + ${assumptions.sqsRequestsPerBatch} per batch)`, cost((c) => c.sqs)],
    ['Lambda requests', cost((c) => c.lambdaRequests)],
    [`Lambda duration (arm64, ${memory}, projected)`, cost((c) => c.lambdaDuration)],
    ['DynamoDB reads (on-demand)', cost((c) => c.dynamodbReads)],
    ['DynamoDB writes (on-demand)', cost((c) => c.dynamodbWrites)],
    [
      'total per million messages, projected AWS',
      cost((c) => c.total),
      `≤ $${TARGETS.plain.dollarsPerMillion} / ≤ $${TARGETS.sm.dollarsPerMillion}`,
    ],
    [
      '  Lambda duration at local wall time',
      (r) => dollars(r.costPerMillionMessages?.localWallTime.lambdaDuration),
    ],
    ['  total with local wall time', (r) => dollars(r.costPerMillionMessages?.localWallTime.total)],
    [
      'connection minutes per message (this bench)',
      (r) =>
        r.connectionMinutesPerMessage === undefined
          ? '—'
          : `${f3(r.connectionMinutesPerMessage)} (${dollars(r.connectionCostPerMillionMessages)}/M, not in total)`,
    ],
    ...activityRows(
      'Per SCRAM login (open → bound, <enable/> with SM), functions only',
      (r) => r.login,
      [`≤ ${TARGETS.login.cpuMs}`, `≤ ${TARGETS.login.dynamodbRequests}`],
      results.some((r) => r.login?.cpuBreakdownMs),
    ),
    ...activityRows(
      'Per keepalive (XEP-0199 ping to the server, and with SM its <r/>/<a/>)',
      (r) => r.keepalive,
    ),
    ...activityRows('Per keepalive <r/> (with SM, answered <a/>)', (r) => r.keepaliveAckRequest),
    ...activityRows(
      'Per reconnect with XEP-0198 resumption ($disconnect, $connect, SCRAM, <resume/>)',
      (r) => r.reconnect,
    ),
  ];

  const labelWidth = Math.max(...rows.map((row) => (typeof row === 'string' ? 0 : row[0].length))) + 2;
  const cells = rows.map((row) =>
    typeof row === 'string'
      ? []
      : results.map((r) => (r.skipped ? 'skipped' : r.failed ? 'failed' : row[1](r))),
  );
  const widths = results.map((_, i) => Math.max(12, ...cells.map((c) => (c[i] ?? '').length)) + 2);
  const header = `${''.padEnd(labelWidth)}${results.map((r, i) => TITLES[r.scenario].padEnd(widths[i] as number)).join('')}target (no SM / SM)`;
  const lines = ['', header, '-'.repeat(header.length)];
  rows.forEach((row, index) => {
    if (typeof row === 'string') {
      lines.push(row);
      return;
    }
    const values = (cells[index] ?? []).map((cell, i) => cell.padEnd(widths[i] as number)).join('');
    lines.push(`${row[0].padEnd(labelWidth)}${values}${row[2] ?? ''}`);
  });
  for (const result of results) {
    if (result.dynamodbUnreported?.length) {
      lines.push(
        `${TITLES[result.scenario]}: no ConsumedCapacity reported for ${result.dynamodbUnreported.join('; ')}`,
      );
    }
  }
  const { machine } = report;
  lines.push(
    `machine: ${machine.cpus} CPUs (${machine.cpuModel ?? '?'}), Node ${machine.node}, load average ${machine.loadBefore.toFixed(1)} before / ${machine.loadAfter.toFixed(1)} after`,
  );
  const cold = report.coldStart;
  if (cold) {
    lines.push(
      `stream bundle: ${(cold.bundleBytes / 1024).toFixed(0)} KB minified (${(cold.gzippedBytes / 1024).toFixed(0)} KB gzipped); ` +
        `cold init ${cold.initMs.toFixed(1)} ms (import ${cold.importMs.toFixed(1)} + first-call setup ${cold.firstCallSetupMs.toFixed(1)}, median of ${cold.runs})`,
    );
  }
  lines.push('', verdict(results, cold));
  process.stdout.write(`${lines.join('\n')}\n`);
}

/** The rows of one kind of event (login, ping, reconnect), per event. */
function activityRows(
  title: string,
  pick: (result: ScenarioResult) => ActivityResult | undefined,
  targets: [cpu?: string, requests?: string] = [],
  profiled = false,
): (Row | string)[] {
  const cell = (format: (a: ActivityResult) => string) => (r: ScenarioResult) => {
    const activity = pick(r);
    return activity ? format(activity) : '—';
  };
  return [
    title,
    ['  events measured', cell((a) => String(a.count))],
    ['  functions CPU (ms)', cell((a) => f2(a.cpuMs)), targets[0]],
    ...(profiled
      ? [['    split by sampled self time (--profile)', cell((a) => breakdown(a.cpuBreakdownMs))] as Row]
      : []),
    ['  DynamoDB requests', cell((a) => f2(a.dynamodbRequests)), targets[1]],
    ['    by operation', cell((a) => breakdown(a.dynamodbByOperation))],
    ['  read / write units (RRU / WRU)', cell((a) => `${f2(a.readUnits)} / ${f2(a.writeUnits)}`)],
    [
      '  API Gateway messages (in + out)',
      cell((a) => `${f2(a.apiGatewayMessages)} (${f2(a.framesIn)} + ${f2(a.postsOut)})`),
    ],
    [
      '  invocations (stream + connect)',
      cell((a) => `${f2(a.streamInvocations)} + ${f2(a.connectInvocations)}`),
    ],
    ['  Lambda ms projected / local wall', cell((a) => `${f1(a.projectedLambdaMs)} / ${f1(a.localWallMs)}`)],
    ['  $ per million, projected', cell((a) => dollars(a.costPerMillion.total))],
  ];
}

/** With `--profile`: one row per category of the stream function's sampled CPU, largest first. */
function profileRows(results: ScenarioResult[]): Row[] {
  const totals = new Map<string, number>();
  for (const result of results) {
    for (const [category, ms] of Object.entries(result.cpuBreakdownMs ?? {})) {
      totals.set(category, (totals.get(category) ?? 0) + ms);
    }
  }
  return [...totals]
    .sort(([, a], [, b]) => b - a)
    .map(([category]): Row => [`    ${category}`, (r) => f3(r.cpuBreakdownMs?.[category])]);
}

function check(value: number | undefined, limit: number): string {
  if (value === undefined || Number.isNaN(value)) return 'not measured';
  return `${value.toFixed(2)} ${value <= limit ? '≤' : '>'} ${limit} ${value <= limit ? 'met' : 'MISSED'}`;
}

export function verdict(results: ScenarioResult[], cold?: ColdStart): string {
  const parts: string[] = [];
  for (const result of results) {
    if (result.skipped) {
      parts.push(`${TITLES[result.scenario]}: skipped (${result.skipped})`);
      continue;
    }
    if (result.failed) {
      parts.push(`${TITLES[result.scenario]}: FAILED (${result.failed})`);
      continue;
    }
    const per = result.perMessage;
    const dollarsPerMillion = result.costPerMillionMessages?.total;
    const login = result.login
      ? `, login CPU ms ${check(result.login.cpuMs, TARGETS.login.cpuMs)}, ` +
        `login DynamoDB requests ${check(result.login.dynamodbRequests, TARGETS.login.dynamodbRequests)}`
      : '';
    if (result.scenario === 'plain') {
      parts.push(
        `without SM: DynamoDB requests ${check(per?.dynamodbRequests, TARGETS.plain.dynamodbRequests)}, ` +
          `CPU ms ${check(per?.cpuMs, TARGETS.plain.cpuMs)}, ` +
          `$/M projected ${check(dollarsPerMillion, TARGETS.plain.dollarsPerMillion)}${login}`,
      );
    } else {
      parts.push(
        `with SM: DynamoDB requests ${check(per?.dynamodbRequests, TARGETS.sm.dynamodbRequests)}, ` +
          `API Gateway messages ${check(per?.apiGatewayMessages, TARGETS.sm.apiGatewayMessages)}, ` +
          `write units ${check(per?.writeUnits, TARGETS.sm.writeUnits)}, ` +
          `$/M projected ${check(dollarsPerMillion, TARGETS.sm.dollarsPerMillion)}${login}`,
      );
    }
  }
  if (cold) {
    parts.push(
      `stream bundle: KB ${check(cold.bundleBytes / 1024, TARGETS.coldStart.bundleKb)}, ` +
        `cold init ms ${check(cold.initMs, TARGETS.coldStart.initMs)}`,
    );
  }
  return `Verdict (per delivered message unless named) — ${parts.join('; ')}`;
}
