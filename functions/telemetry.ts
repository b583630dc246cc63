/**
 * Observability of the Lambda functions, with Powertools for AWS Lambda (TypeScript):
 *
 * - Logger: the core's `Logger` interface writing the lines Powertools' Logger wrote (the same
 *   keys: `level`, `message`, `timestamp`, `service`, and the Lambda context `function_request_id`,
 *   `cold_start`, `function_name`, `function_arn`, `function_memory_size`, `xray_trace_id`), with
 *   the core's log context (connection id, bare JID, element, API Gateway request id:
 *   shared/log.ts) merged into each entry. The level is the function's `LOG_LEVEL` (a deploy
 *   setting). Since session 26 without Powertools' Logger: 21 KB of the stream bundle for what
 *   is a few keys on a JSON line.
 * - Metrics: the counts of `server.metrics` (shared/metrics.ts) become CloudWatch embedded metric
 *   format lines once per invocation (`createMetricsPublisher`): no API call, no latency.
 * - Tracer: loaded only when the stack was deployed with tracing on (`NIMBUS_TRACING`, which the
 *   stack also bakes into the bundle, so a bundle without tracing carries none of its code).
 *
 * Locally (infra/local/stack.ts) the same handlers run with shared/log.ts's logger, and the same
 * metric lines are printed at debug level.
 */
import type { Tracer } from '@aws-lambda-powertools/tracer';
import type { Context } from 'aws-lambda';
import type { Config } from '../shared/config.ts';
import {
  entryFields,
  isLogLevel,
  LOG_SEVERITY,
  type Logger,
  useSequentialLogContext,
} from '../shared/log.ts';
import { METRIC_NAMESPACE, METRIC_SERVICE, type MetricSample } from '../shared/metrics.ts';

export type { Tracer };

/** Writes metric lines: stdout on Lambda (where CloudWatch Logs extracts them). */
export type MetricLineWriter = (line: string) => void;

/** Turns drained counts into embedded metric format lines. */
export type MetricsPublisher = (samples: MetricSample[]) => void;

const stdoutLine: MetricLineWriter = (line) => void process.stdout.write(`${line}\n`);

export interface PublisherOptions {
  /** The XMPP domain: the `domain` dimension of every metric. */
  domain: string;
  /** When set, the first publish also counts `ColdStarts` for this function. */
  functionName?: string;
  write?: MetricLineWriter;
}

/** CloudWatch's bound on the metrics of one EMF directive. */
export const EMF_MAX_METRICS = 100;

/**
 * One CloudWatch embedded metric format document: counts that share one set of dimensions
 * (https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html).
 * The dimensions' values and the metrics' values are members of the document itself, so a metric
 * name must not be a dimension's name (shared/metrics.ts's names are PascalCase, its dimensions
 * lower case; test/unit/metrics.test.ts checks it).
 */
export function emfDocument(
  dimensions: Record<string, string>,
  counts: { name: string; value: number }[],
  timestamp: number,
): Record<string, unknown> {
  const document: Record<string, unknown> = {
    _aws: {
      Timestamp: timestamp,
      CloudWatchMetrics: [
        {
          Namespace: METRIC_NAMESPACE,
          Dimensions: [Object.keys(dimensions)],
          Metrics: counts.map(({ name }) => ({ Name: name, Unit: 'Count' })),
        },
      ],
    },
    ...dimensions,
  };
  for (const { name, value } of counts) document[name] = value;
  return document;
}

/**
 * One EMF document per dimension combination: CloudWatch applies a document's dimensions to
 * every metric in it, so a metric split by `condition` cannot share a document with one split by
 * `kind`. Most invocations write one or two lines. (Built here rather than by Powertools'
 * Metrics: the format is a few JSON members, and that utility was 10 KB of the stream bundle.)
 */
export function createMetricsPublisher(options: PublisherOptions): MetricsPublisher {
  const write = options.write ?? stdoutLine;
  let coldStart = options.functionName !== undefined;
  return (samples) => {
    const groups = new Map<string, MetricSample[]>();
    for (const sample of samples) {
      const key = sample.dimension ? `${sample.dimension.name}=${sample.dimension.value}` : '';
      groups.set(key, [...(groups.get(key) ?? []), sample]);
    }
    if (coldStart) {
      coldStart = false;
      const key = `function=${options.functionName}`;
      groups.set(key, [
        ...(groups.get(key) ?? []),
        {
          name: 'ColdStarts',
          value: 1,
          dimension: { name: 'function', value: options.functionName as string },
        },
      ]);
    }
    const timestamp = Date.now();
    for (const group of groups.values()) {
      const dimension = group[0]?.dimension;
      const dimensions: Record<string, string> = { service: METRIC_SERVICE, domain: options.domain };
      if (dimension) dimensions[dimension.name] = dimension.value;
      for (let from = 0; from < group.length; from += EMF_MAX_METRICS)
        write(JSON.stringify(emfDocument(dimensions, group.slice(from, from + EMF_MAX_METRICS), timestamp)));
    }
  };
}

/** Lambda's application log levels (AWS_LAMBDA_LOG_LEVEL) on the core's scale. */
const LAMBDA_SEVERITY: Record<string, number> = {
  TRACE: LOG_SEVERITY.debug - 1,
  DEBUG: LOG_SEVERITY.debug,
  INFO: LOG_SEVERITY.info,
  WARN: LOG_SEVERITY.warn,
  ERROR: LOG_SEVERITY.error,
  FATAL: LOG_SEVERITY.error + 1,
};

/** A function's logger and the per-invocation Lambda context its lines carry. */
export interface LambdaLogger {
  log: Logger;
  /** The invocation's Lambda context, on every line from now on. */
  addContext(context: Context): void;
}

/**
 * The core's logger on Lambda: one JSON object per line on stdout, with Powertools' keys and the
 * Lambda context. Lambda's application log level (AWS_LAMBDA_LOG_LEVEL, never above INFO: see
 * infra/constructs/xmpp-function.ts) and LOG_LEVEL both apply: the stricter wins. The entry (the
 * log context copied, errors made serialisable) is built only for a line that is written: a
 * debug line on every frame costs nothing at the default level.
 */
export function lambdaLogger(
  level: string,
  write: (line: string) => void = (line) => void process.stdout.write(`${line}\n`),
): LambdaLogger {
  const configured = LOG_SEVERITY[isLogLevel(level) ? level : 'info'];
  const lambdaLevel = LAMBDA_SEVERITY[(process.env.AWS_LAMBDA_LOG_LEVEL ?? '').toUpperCase()] ?? 0;
  const floor = Math.max(configured, lambdaLevel);
  const isEnabled: Logger['isEnabled'] = (at) => LOG_SEVERITY[at] >= floor;
  let invocation: Record<string, unknown> = {};
  let invocations = 0;
  const line = (
    at: 'debug' | 'info' | 'warn' | 'error',
    message: string,
    fields?: Record<string, unknown>,
  ) => {
    if (!isEnabled(at)) return;
    const head = {
      level: at.toUpperCase(),
      message,
      timestamp: new Date().toISOString(),
      service: METRIC_SERVICE,
      ...invocation,
    };
    let text: string;
    try {
      text = JSON.stringify({ ...head, ...entryFields(fields) });
    } catch (error) {
      // A field JSON cannot write (a cycle, a BigInt): the line goes out without its fields
      // rather than throw from a log call (often in a catch, over the error being handled).
      text = JSON.stringify({ ...head, ...entryFields(), unwritableFields: String(error) });
    }
    write(text);
  };
  return {
    log: {
      debug: (message, fields) => line('debug', message, fields),
      info: (message, fields) => line('info', message, fields),
      warn: (message, fields) => line('warn', message, fields),
      error: (message, fields) => line('error', message, fields),
      isEnabled,
    },
    addContext(context) {
      invocations += 1;
      // The X-Ray trace of this invocation, as Lambda announces it ("Root=1-...;Parent=...").
      const trace = /Root=([^;]+)/.exec(process.env._X_AMZN_TRACE_ID ?? '')?.[1];
      invocation = {
        // As Powertools counts it: the first invocation of an environment initialised on demand
        // (not one of provisioned concurrency or SnapStart, whose init was not on the request's path).
        cold_start:
          invocations === 1 && (process.env.AWS_LAMBDA_INITIALIZATION_TYPE ?? 'on-demand') === 'on-demand',
        function_arn: context.invokedFunctionArn,
        function_memory_size: Number(context.memoryLimitInMB),
        function_name: context.functionName,
        function_request_id: context.awsRequestId,
        ...(trace ? { xray_trace_id: trace } : {}),
      };
    },
  };
}

/**
 * X-Ray tracing through Powertools' Tracer, only when the function was deployed with tracing
 * (`-c settings='{"TRACING":"true"}'`). The condition stays an expression esbuild can fold: the
 * stack defines `process.env.NIMBUS_TRACING` at bundle time, and a bundle built without tracing
 * drops the import (and the X-Ray SDK) altogether.
 */
export async function loadTracer(): Promise<Tracer | undefined> {
  const module =
    process.env.NIMBUS_TRACING === 'true' ? await import('@aws-lambda-powertools/tracer') : undefined;
  return module ? new module.Tracer({ serviceName: METRIC_SERVICE, captureHTTPsRequests: false }) : undefined;
}

/** Runs `work` in an X-Ray subsegment (annotated, so traces can be searched by connection). */
export async function inSubsegment<T>(
  tracer: Tracer | undefined,
  name: string,
  annotations: Record<string, string>,
  work: () => Promise<T>,
): Promise<T> {
  const parent = tracer?.getSegment();
  if (!tracer || !parent) return work();
  const subsegment = parent.addNewSubsegment(name);
  tracer.setSegment(subsegment);
  for (const [key, value] of Object.entries(annotations)) tracer.putAnnotation(key, value);
  try {
    return await work();
  } catch (error) {
    subsegment.addError(error as Error);
    throw error;
  } finally {
    subsegment.close();
    tracer.setSegment(parent);
  }
}

/** What a function's entry point needs on AWS: its logger, its metrics publisher, its tracer. */
export interface LambdaTelemetry {
  log: Logger;
  publishMetrics: MetricsPublisher;
  tracer?: Tracer;
  /** Per invocation: the Lambda context on every log line. */
  startInvocation(context?: Context): void;
}

export async function lambdaTelemetry(config: Config, functionName: string): Promise<LambdaTelemetry> {
  // One invocation at a time per execution environment, unless Lambda runs several at once in it
  // (multi-concurrency, which announces itself with AWS_LAMBDA_MAX_CONCURRENCY).
  if (!('AWS_LAMBDA_MAX_CONCURRENCY' in process.env)) useSequentialLogContext();
  const { log, addContext } = lambdaLogger(process.env.LOG_LEVEL ?? 'info');
  const tracer = await loadTracer();
  return {
    log,
    publishMetrics: createMetricsPublisher({ domain: config.domain, functionName }),
    ...(tracer ? { tracer } : {}),
    startInvocation(context) {
      if (context) addContext(context);
    },
  };
}

/** The server option that traces every AWS SDK client the server builds. */
export function instrumentFor(tracer: Tracer | undefined): { instrumentClient?: <T>(client: T) => T } {
  return tracer ? { instrumentClient: <T>(client: T) => tracer.captureAWSv3Client(client) } : {};
}
