/**
 * The stream function: consumes the SQS FIFO queue that API Gateway fills with `$default`
 * frames and `$disconnect` events, grouped by connection, so each stream runs in order.
 *
 * A FIFO partial batch (`processFifoBatch`, what Powertools' SQS FIFO processor does with
 * `skipGroupOnError`, in 20 lines instead of its 9 KB): once a frame of a connection fails, that
 * connection's later frames in the batch are handed back unprocessed (they must wait for the
 * retry, RFC 6120 §10.1) while other connections' frames go on.
 */
import { fromEnv } from '@aws-sdk/credential-provider-env';
import type { Context, SQSBatchResponse, SQSEvent, SQSRecord } from 'aws-lambda';
import { loadConfig } from '../shared/config.ts';
import { handleStreamEvent, type RowCarry } from '../shared/core/stream.ts';
import { type FrameQueuePort, retryDelaySeconds, sqsFrameQueue } from '../shared/frame-queue.ts';
import { withLogContext } from '../shared/log.ts';
import { decodeQueueMessage, MalformedQueueMessageError, type StreamEvent } from '../shared/queue-message.ts';
import { createServer, type Server } from '../shared/server.ts';
import type { ConnectionState } from '../shared/store/sessions.ts';
import {
  inSubsegment,
  instrumentFor,
  lambdaTelemetry,
  type MetricsPublisher,
  type Tracer,
} from './telemetry.ts';

export interface StreamHandlerOptions {
  /** Where the invocation's metrics go (default: nowhere; counts are dropped). */
  publishMetrics?: MetricsPublisher;
  tracer?: Tracer;
  /** The queue's maxReceiveCount: a record failing on that receive goes to the dead-letter queue. */
  maxReceiveCount?: number;
  /** Brings records handed back again soon, instead of after the visibility timeout. */
  frameQueue?: FrameQueuePort;
  /** The longest wait before a record handed back comes again (Config.frameRetryMaxSeconds). */
  retryMaxSeconds?: number;
}

/**
 * Time kept in hand: after the batch's first record, a record is started only while at least
 * this much of the invocation is left (or a fifth of what the invocation started with, for short
 * timeouts). A timeout would redeliver the whole batch, other connections' finished records
 * included; a record refused for lack of time is handed back alone (with the rest of its group).
 */
export const TIME_IN_HAND_MS = 5000;

/** Whether a record may start: the first always does, so every invocation makes progress. */
function timeToStart(
  remainingMs: (() => number) | undefined,
  started: { count: number; initial: number },
): boolean {
  if (!remainingMs) return true;
  const remaining = remainingMs();
  if (started.count === 0) started.initial = remaining;
  started.count += 1;
  return started.count === 1 || remaining >= Math.min(TIME_IN_HAND_MS, started.initial / 5);
}

class OutOfTimeError extends Error {
  constructor() {
    super('too little of the invocation left to start a frame');
    this.name = 'OutOfTimeError';
  }
}

/** Tries of a frame within one invocation, for errors that a moment's wait cures. */
export const FRAME_ATTEMPTS = 3;

/**
 * A transient error (a throttle that outlived the SDK's retries, a 500) is retried here first,
 * as a redelivery would be (the frame's keyed writes are not repeated, core/frame.ts): handing
 * the frame back to the queue also hands back the connection's later frames of the batch, and
 * every such return counts toward their maxReceiveCount, the dead-letter queue.
 */
async function handleWithRetries(
  server: Server,
  event: StreamEvent,
  mayRetry: () => boolean,
  carry: RowCarry,
): Promise<ConnectionState | undefined> {
  const receiveCount = event.receiveCount ?? 1;
  for (let attempt = 1; ; attempt++) {
    try {
      // A retry reads the row: the failed attempt may have written some of it.
      return await handleStreamEvent(
        server,
        { ...event, receiveCount: receiveCount + attempt - 1 },
        attempt === 1 ? carry : { keepRow: carry.keepRow ?? false },
      );
    } catch (error) {
      if (attempt >= FRAME_ATTEMPTS || !mayRetry()) throw error;
      server.log.info('frame retried in place', { attempt, error });
      await new Promise((resolve) => setTimeout(resolve, 100 * 2 ** attempt * (0.5 + Math.random())));
    }
  }
}

async function handleRecord(
  server: Server,
  record: SQSRecord,
  tracer: Tracer | undefined,
  mayStart: () => boolean,
  mayRetry: () => boolean,
  followed: ReadonlySet<string>,
  batch: BatchRows,
  timeLeftMs?: () => number,
): Promise<void> {
  // Only the record right after it may take the previous record's row.
  const carried = batch.carried;
  batch.carried = undefined;
  if (!mayStart()) {
    server.log.warn('out of time: frame left for redelivery', { messageId: record.messageId });
    throw new OutOfTimeError();
  }
  server.metrics.count('FramesIn');
  let event: StreamEvent;
  try {
    event = decodeQueueMessage(record.body);
    // FIFO: the sequence number grows within the connection's group, redeliveries keep theirs.
    const seq = record.attributes.SequenceNumber;
    if (seq) event.seq = seq;
    event.receiveCount = Number(record.attributes.ApproximateReceiveCount) || 1;
    if (followed.has(record.messageId)) event.followed = true;
    if (timeLeftMs) event.timeLeftMs = timeLeftMs;
  } catch (error) {
    if (!(error instanceof MalformedQueueMessageError)) throw error;
    // Retrying cannot make it readable: dropped (a success for the queue).
    server.log.error('dropping malformed queue message', { messageId: record.messageId, error });
    server.metrics.count('FramesMalformed');
    return;
  }
  const context = {
    connectionId: event.connectionId,
    ...(event.requestId ? { requestId: event.requestId } : {}),
  };
  await withLogContext(context, () =>
    inSubsegment(tracer, `## ${event.kind}`, { connectionId: event.connectionId }, async () => {
      const started = performance.now();
      try {
        const keepRow = batch.followedByOwn.has(record.messageId);
        const row = carried?.connectionId === event.connectionId ? carried.row : undefined;
        const saved = await handleWithRetries(server, event, mayRetry, { ...(row ? { row } : {}), keepRow });
        if (keepRow && saved) batch.carried = { connectionId: event.connectionId, row: saved };
        server.log.debug('frame handled', { kind: event.kind, ms: Math.round(performance.now() - started) });
      } catch (error) {
        server.log.warn('frame will be retried', {
          messageId: record.messageId,
          receiveCount: Number(record.attributes.ApproximateReceiveCount),
          error,
        });
        throw error;
      }
    }),
  );
}

/**
 * Handles the records one after the other, in the batch's order; a record that throws is
 * reported failed, and so is every later record of its message group, unstarted. A batch whose
 * every record failed is reported like any other (all retried), not thrown.
 *
 * Except on a last receive (`lastReceive`, the queue's maxReceiveCount reached): a record there
 * that fails goes to the dead-letter queue, so it holds nothing back (the group's later records
 * would otherwise wait for a retry that never comes, and, received as often as it was, follow it
 * there untried). A record is never tried behind a failure that will be retried: its done mark
 * (the connection row's `doneSeq`) would make the earlier one's retry look handled.
 */
export async function processFifoBatch(
  records: readonly SQSRecord[],
  handle: (record: SQSRecord) => Promise<void>,
  lastReceive: (record: SQSRecord) => boolean = () => false,
): Promise<SQSBatchResponse> {
  const failedGroups = new Set<string>();
  const batchItemFailures: SQSBatchResponse['batchItemFailures'] = [];
  for (const record of records) {
    const group = record.attributes.MessageGroupId;
    if (group !== undefined && failedGroups.has(group)) {
      batchItemFailures.push({ itemIdentifier: record.messageId });
      continue;
    }
    try {
      await handle(record);
    } catch {
      batchItemFailures.push({ itemIdentifier: record.messageId });
      if (group !== undefined && !lastReceive(record)) failedGroups.add(group);
    }
  }
  return { batchItemFailures };
}

/**
 * A batch's connection rows handed from record to record: a connection's frames come one after
 * the other in a batch (SQS FIFO fills it group by group), and the row a frame's final save
 * leaves is what the connection's next frame would read (core/stream.ts handleStreamEvent).
 */
interface BatchRows {
  /** The records whose next record in the batch is of the same connection. */
  followedByOwn: ReadonlySet<string>;
  /** The row the record just handled left, for the record right after it. */
  carried?: { connectionId: string; row: ConnectionState };
}

/** The records followed, next in the batch, by a record of their own message group (connection). */
export function followedByOwnGroup(records: readonly SQSRecord[]): Set<string> {
  const ids = new Set<string>();
  for (let i = 0; i + 1 < records.length; i++) {
    const group = records[i].attributes.MessageGroupId;
    if (group !== undefined && group === records[i + 1].attributes.MessageGroupId)
      ids.add(records[i].messageId);
  }
  return ids;
}

/**
 * The records another record follows in the batch, of whatever connection: all but the last. An
 * invocation that times out on a later record has the whole batch delivered again, these
 * included (FRAME_DONE_MARKS=batched marks them done).
 */
export function followedRecords(records: readonly SQSRecord[]): Set<string> {
  return new Set(records.slice(0, -1).map((record) => record.messageId));
}

/**
 * The records handed back (failed, skipped behind a failure of their connection, not started for
 * lack of time) come back after 1, 2, 4 … seconds by receive count rather than the queue's
 * visibility timeout (six times the function timeout), during which their connection's later
 * frames would wait behind them. Best effort: a change that fails leaves the timeout.
 */
async function retrySoon(
  server: Server,
  event: SQSEvent,
  response: SQSBatchResponse,
  options: StreamHandlerOptions,
  timeoutMs: number,
): Promise<void> {
  if (!options.frameQueue || response.batchItemFailures.length === 0) return;
  const failed = new Set(response.batchItemFailures.map((failure) => failure.itemIdentifier));
  const maxSeconds = options.retryMaxSeconds ?? 30;
  const retries = event.Records.filter((record) => failed.has(record.messageId) && record.receiptHandle).map(
    (record) => ({
      receiptHandle: record.receiptHandle,
      seconds: retryDelaySeconds(Number(record.attributes.ApproximateReceiveCount) || 1, maxSeconds),
    }),
  );
  try {
    await options.frameQueue.retryIn(retries, timeoutMs);
  } catch (error) {
    server.log.warn('frames handed back wait for the visibility timeout', { error });
  }
}

/** Retried and dead-lettered records, from the batch response (skipped records of a failed group included). */
function countFailures(server: Server, event: SQSEvent, response: SQSBatchResponse, maxReceiveCount: number) {
  const failed = new Set(response.batchItemFailures.map((failure) => failure.itemIdentifier));
  for (const record of event.Records) {
    if (!failed.has(record.messageId)) continue;
    const receives = Number(record.attributes.ApproximateReceiveCount) || 1;
    if (receives >= maxReceiveCount) {
      server.metrics.count('FramesDeadLettered');
      server.log.error('frame goes to the dead-letter queue', {
        messageId: record.messageId,
        connectionId: record.attributes.MessageGroupId,
        receiveCount: receives,
      });
    } else server.metrics.count('FramesRetried');
  }
}

export function createStreamHandler(server: Server, options: StreamHandlerOptions = {}) {
  const maxReceiveCount = options.maxReceiveCount ?? (Number(process.env.FRAME_MAX_RECEIVES) || 20);
  return async (
    event: SQSEvent,
    context?: Partial<Context> & Pick<Context, 'getRemainingTimeInMillis'>,
  ): Promise<SQSBatchResponse> => {
    const remainingMs = context ? () => context.getRemainingTimeInMillis() : undefined;
    const started = { count: 0, initial: 0 };
    const mayStart = () => timeToStart(remainingMs, started);
    const followed = followedRecords(event.Records);
    const batch: BatchRows = { followedByOwn: followedByOwnGroup(event.Records) };
    // A retry in place needs the time a record would need to start, and more for the wait.
    const mayRetry = () =>
      !remainingMs || remainingMs() >= 2 * Math.min(TIME_IN_HAND_MS, started.initial / 5);
    try {
      const response = await processFifoBatch(
        event.Records,
        (record) =>
          handleRecord(server, record, options.tracer, mayStart, mayRetry, followed, batch, remainingMs),
        (record) => (Number(record.attributes.ApproximateReceiveCount) || 1) >= maxReceiveCount,
      );
      countFailures(server, event, response, maxReceiveCount);
      // Within the time left (a timeout would redeliver the whole batch, handled records too).
      const timeoutMs = Math.min(2000, (remainingMs?.() ?? 2200) - 200);
      if (timeoutMs >= 100) await retrySoon(server, event, response, options, timeoutMs);
      return response;
    } finally {
      options.publishMetrics?.(server.metrics.drain());
    }
  };
}

let started:
  | Promise<{ handle: ReturnType<typeof createStreamHandler>; begin(context: Context): void }>
  | undefined;

async function start() {
  const config = loadConfig();
  const telemetry = await lambdaTelemetry(config, 'stream');
  const server = createServer({ config, log: telemetry.log, ...instrumentFor(telemetry.tracer) });
  const frameQueue = config.frameQueueUrl
    ? sqsFrameQueue({
        queueUrl: config.frameQueueUrl,
        region: config.region,
        credentials: fromEnv(),
        ...(config.frameQueueEndpoint ? { endpoint: config.frameQueueEndpoint } : {}),
      })
    : undefined;
  return {
    handle: createStreamHandler(server, {
      ...telemetry,
      ...(frameQueue ? { frameQueue } : {}),
      retryMaxSeconds: config.frameRetryMaxSeconds,
    }),
    begin: (context: Context) => telemetry.startInvocation(context),
  };
}

export const handler = async (event: SQSEvent, context: Context): Promise<SQSBatchResponse> => {
  started ??= start();
  const { handle, begin } = await started;
  begin(context);
  return handle(event, context);
};
