/**
 * The SQS FIFO queue between API Gateway and the stream function, and the Lambda event source
 * mapping that feeds the function from it, with the semantics that decide whether a frame is
 * lost or handled twice on AWS:
 *
 * - A message group (one connection) is locked while any of its messages is in flight: its
 *   messages are never in two batches at once, and come in order.
 * - A batch holds up to `batchSize` records and may mix groups: SQS "first attempts to return
 *   as many messages with the same message group ID as possible", then fills the batch from
 *   other groups, oldest first. Mixed batches show when invocations are busy (`concurrency`).
 * - A received message stays invisible for the visibility timeout, counted from the receive.
 *   The event source deletes what the function handled; a record named in `batchItemFailures`,
 *   or every record of an invocation that threw or ran past the function timeout, is simply not
 *   deleted, so it comes back when its visibility timeout ends (Lambda never shortens it).
 * - A timed-out invocation is abandoned, not stopped: the work it did stays done. Locally its
 *   promise runs on in the background, where AWS stops the runtime; so that it never overlaps
 *   the redelivery of its records (which AWS's stop guarantees), they stay invisible until it
 *   settles as well as for the visibility timeout.
 * - After `maxReceiveCount` receives a message moves to the dead-letter queue.
 * - Faults (faults.ts): a lost delete (the same message delivered again) and a function that
 *   dies mid-batch.
 */
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import type { Context, SQSBatchResponse, SQSEvent, SQSRecord } from 'aws-lambda';
import { type FaultCounts, type FaultOptions, faultStream, type Random } from './faults.ts';
import { lambdaContext } from './lambda-context.ts';

/** A batch response naming the records to deliver again, or nothing when all succeeded. */
// biome-ignore lint/suspicious/noConfusingVoidType: a handler declared `Promise<void>` must fit too
export type StreamResult = SQSBatchResponse | undefined | void;
export type StreamHandler = (event: SQSEvent, context: Context) => Promise<StreamResult>;

/**
 * The deployed values (infra/stack.ts, infra/constructs/frame-queue.ts), checked against the
 * CDK stack by test/integration/gateway-faults.test.ts.
 */
export const DEPLOYED_EVENT_SOURCE = {
  /** `STREAM_TIMEOUT`. */
  functionTimeoutMs: 30_000,
  /** Six times the function timeout (`FrameQueue`). */
  visibilityTimeoutMs: 180_000,
  /** The redrive policy of `FrameQueue`. */
  maxReceiveCount: 20,
  /** The `SqsEventSource` of the stream function. */
  batchSize: 10,
  /**
   * The event source's maximum concurrency: `STREAM_MAX_CONCURRENCY`, 100 unless the deploy
   * settings say otherwise (with `0` none is set, and invocations are bounded by the account's
   * concurrency, 1,000 by default); a FIFO event source scales up to the number of active
   * message groups below it.
   */
  concurrency: 100,
} as const;

/** The event source's settings a caller may change (`NIMBUS_EVENT_SOURCE` for `npm start`). */
export interface EventSourceSettings {
  batchSize?: number;
  maxReceiveCount?: number;
  visibilityTimeoutMs?: number;
  functionTimeoutMs?: number;
  concurrency?: number;
}

const SETTING_NAMES = [
  'batchSize',
  'maxReceiveCount',
  'visibilityTimeoutMs',
  'functionTimeoutMs',
  'concurrency',
];

/** `NIMBUS_EVENT_SOURCE` as JSON, e.g. `{"visibilityTimeoutMs":2000,"concurrency":2}`. */
export function parseEventSourceSettings(json: string): EventSourceSettings {
  let parsed: unknown;
  try {
    parsed = JSON.parse(json);
  } catch (error) {
    throw new Error(`NIMBUS_EVENT_SOURCE is not JSON: ${(error as Error).message}`);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new Error('NIMBUS_EVENT_SOURCE must be a JSON object');
  }
  for (const [name, value] of Object.entries(parsed)) {
    if (!SETTING_NAMES.includes(name)) {
      throw new Error(`unknown event source setting ${name}; known: ${SETTING_NAMES.join(', ')}`);
    }
    if (
      typeof value !== 'number' ||
      !Number.isInteger(value) ||
      value < (name === 'visibilityTimeoutMs' ? 0 : 1)
    ) {
      throw new Error(
        `event source setting ${name} must be a positive integer, got ${JSON.stringify(value)}`,
      );
    }
  }
  return parsed as EventSourceSettings;
}

export interface EventSourceOptions {
  handler: StreamHandler;
  batchSize: number;
  maxReceiveCount: number;
  visibilityTimeoutMs: number;
  functionTimeoutMs: number;
  concurrency: number;
  queueArn: string;
  region: string;
  log: (line: string) => void;
  faults?: Pick<FaultOptions, 'seed' | 'duplicate' | 'dieMidBatch'>;
  faultCounts: FaultCounts;
}

/** A message the dead-letter queue received. */
export interface DeadLetter {
  messageId: string;
  groupId: string;
  body: string;
  receiveCount: number;
}

interface QueuedMessage {
  messageId: string;
  body: string;
  groupId: string;
  deduplicationId: string;
  sequenceNumber: bigint;
  sentTimestamp: number;
  firstReceiveTimestamp?: number;
  receiveCount: number;
  /** The receipt handle of the latest receive; deletes with an older one are ignored. */
  receipt?: string;
  /** In flight until then (after a receive). */
  invisibleUntil: number;
  /** Held by an invocation that has not settled yet (used to speed up a shutdown). */
  held: boolean;
  /** Received by an invocation that timed out and is still running in the background. */
  abandoned?: boolean;
}

export class FifoEventSource {
  /** Each group's messages, in order. */
  private readonly groups = new Map<string, QueuedMessage[]>();
  private readonly idleWaiters: Array<() => void> = [];
  private readonly deadLetterQueue: DeadLetter[] = [];
  // SQS FIFO sequence numbers are large decimal strings that only grow.
  private nextSequence = 18_000_000_000_000_000_000n;
  private running = 0;
  private pollScheduled = false;
  private visibilityTimer: NodeJS.Timeout | undefined;
  private visibilityWakeAt = Number.POSITIVE_INFINITY;
  /** Set while the gateway shuts down: failed records come back at once instead of waiting. */
  private hurried = false;
  private readonly random: Random | undefined;

  constructor(private readonly options: EventSourceOptions) {
    if (options.faults) this.random = faultStream(options.faults.seed, 'queue');
  }

  send(groupId: string, body: string, deduplicationId: string): void {
    const message: QueuedMessage = {
      messageId: randomUUID(),
      body,
      groupId,
      deduplicationId,
      sequenceNumber: this.nextSequence++,
      sentTimestamp: Date.now(),
      receiveCount: 0,
      invisibleUntil: 0,
      held: false,
    };
    const group = this.groups.get(groupId);
    if (group === undefined) this.groups.set(groupId, [message]);
    else group.push(message);
    this.schedulePoll();
  }

  /** Resolves once the queue is empty (every message handled or dead-lettered). */
  drained(): Promise<void> {
    if (this.groups.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * For a shutdown: what waits for its visibility timeout is delivered again now, and so is
   * whatever fails from here on, so that `drained()` does not wait out the timeouts.
   */
  hurry(): void {
    this.hurried = true;
    for (const group of this.groups.values()) {
      for (const message of group) if (!message.held) message.invisibleUntil = 0;
    }
    this.schedulePoll();
  }

  /**
   * SQS ChangeMessageVisibility: an in-flight message received with `receiptHandle` becomes
   * visible `seconds` from now. False when no message holds that handle (deleted, or received
   * again since: SQS answers such a handle with an error too).
   */
  changeVisibility(receiptHandle: string, seconds: number): boolean {
    for (const group of this.groups.values()) {
      const message = group.find((candidate) => candidate.receipt === receiptHandle);
      if (message === undefined) continue;
      if (message.invisibleUntil <= Date.now()) return false;
      const now = Date.now();
      message.invisibleUntil = now + seconds * 1000;
      this.wakeAtNextVisibility(now);
      return true;
    }
    return false;
  }

  /** Messages in the queue, in flight or not (SQS's ApproximateNumberOfMessages + …NotVisible). */
  size(): number {
    let size = 0;
    for (const group of this.groups.values()) size += group.length;
    return size;
  }

  deadLetters(): readonly DeadLetter[] {
    return this.deadLetterQueue;
  }

  // -- receiving ------------------------------------------------------------------------------

  /** Polls on a later turn of the event loop, so frames arriving together can share a batch. */
  private schedulePoll(): void {
    if (this.pollScheduled) return;
    this.pollScheduled = true;
    setImmediate(() => {
      this.pollScheduled = false;
      this.poll();
    });
  }

  private poll(): void {
    let now = Date.now();
    while (this.running < this.options.concurrency) {
      now = Date.now();
      const batch = this.receive(now);
      if (batch.length === 0) break;
      this.running += 1;
      void this.invoke(batch).finally(() => {
        this.running -= 1;
        // What arrived meanwhile is queued already: no need to wait for more.
        this.poll();
      });
    }
    this.wakeAtNextVisibility(now);
    this.notifyIfDrained();
  }

  /** ReceiveMessage on the FIFO queue: whole groups first, oldest first, never a locked group. */
  private receive(now: number): QueuedMessage[] {
    const available = [...this.groups.values()]
      .filter((group) => group.every((message) => message.invisibleUntil <= now && !message.abandoned))
      .sort((a, b) => (a[0].sequenceNumber < b[0].sequenceNumber ? -1 : 1));
    const batch: QueuedMessage[] = [];
    for (const group of available) {
      let index = 0;
      while (batch.length < this.options.batchSize && index < group.length) {
        const message = group[index];
        if (message.receiveCount >= this.options.maxReceiveCount) {
          this.deadLetter(message);
          continue;
        }
        message.receiveCount += 1;
        message.firstReceiveTimestamp ??= now;
        message.receipt = randomBytes(48).toString('base64');
        message.invisibleUntil = now + this.options.visibilityTimeoutMs;
        message.held = true;
        batch.push(message);
        index += 1;
      }
      if (batch.length >= this.options.batchSize) break;
    }
    this.forgetEmptyGroups();
    return batch;
  }

  private forgetEmptyGroups(): void {
    for (const [groupId, group] of this.groups) if (group.length === 0) this.groups.delete(groupId);
  }

  private deadLetter(message: QueuedMessage): void {
    this.remove(message);
    this.deadLetterQueue.push({
      messageId: message.messageId,
      groupId: message.groupId,
      body: message.body,
      receiveCount: message.receiveCount,
    });
    this.options.log(
      `[gateway] dropped message ${message.messageId} of connection ${message.groupId} after ` +
        `${message.receiveCount} deliveries (the dead-letter queue on AWS): ${message.body}`,
    );
  }

  private remove(message: QueuedMessage): void {
    const group = this.groups.get(message.groupId);
    if (group === undefined) return;
    const index = group.indexOf(message);
    if (index >= 0) group.splice(index, 1);
  }

  /**
   * Polls again when the next in-flight message becomes visible. `now` must be the time the
   * last receive used: a group it found locked has to be woken even if that moment has passed.
   */
  private wakeAtNextVisibility(now: number): void {
    let next = Number.POSITIVE_INFINITY;
    for (const group of this.groups.values()) {
      for (const message of group)
        if (message.invisibleUntil > now) next = Math.min(next, message.invisibleUntil);
    }
    if (next === this.visibilityWakeAt || next === Number.POSITIVE_INFINITY) return;
    clearTimeout(this.visibilityTimer);
    this.visibilityWakeAt = next;
    this.visibilityTimer = setTimeout(
      () => {
        this.visibilityWakeAt = Number.POSITIVE_INFINITY;
        this.schedulePoll();
      },
      Math.max(0, next - Date.now()),
    ).unref();
  }

  private notifyIfDrained(): void {
    if (this.groups.size > 0) return;
    clearTimeout(this.visibilityTimer);
    this.visibilityWakeAt = Number.POSITIVE_INFINITY;
    for (const resolve of this.idleWaiters.splice(0)) resolve();
  }

  // -- invoking -------------------------------------------------------------------------------

  private async invoke(batch: QueuedMessage[]): Promise<void> {
    const receipts = new Map(batch.map((message) => [message, message.receipt]));
    const diesAfter = this.chance(this.options.faults?.dieMidBatch)
      ? 1 + Math.floor((this.random?.() ?? 0) * batch.length)
      : undefined;
    const handled = await this.call(diesAfter === undefined ? batch : batch.slice(0, diesAfter));
    for (const message of batch) if (message.receipt === receipts.get(message)) message.held = false;

    let deleted: QueuedMessage[] = [];
    if (diesAfter !== undefined) {
      this.options.faultCounts.add('dieMidBatch');
      this.options.log(
        `[gateway] fault: the stream function died after ${diesAfter} of ${batch.length} records`,
      );
    } else if (handled !== undefined) {
      deleted = batch.filter((message) => !handled.failed.has(message.messageId));
    }
    for (const message of deleted) {
      if (this.chance(this.options.faults?.duplicate)) {
        this.options.faultCounts.add('duplicate');
        this.options.log(`[gateway] fault: the delete of message ${message.messageId} was lost`);
        continue;
      }
      // A receipt handle from before the message was received again deletes nothing.
      if (message.receipt === receipts.get(message)) this.remove(message);
    }
    if (this.hurried) {
      for (const message of batch) if (!message.held) message.invisibleUntil = 0;
    }
    this.forgetEmptyGroups();
  }

  private chance(rate: number | undefined): boolean {
    return rate !== undefined && rate > 0 && this.random !== undefined && this.random() < rate;
  }

  /**
   * One invocation: the ids the function reported as failed, or undefined when the invocation
   * failed as a whole (threw, timed out, or answered an identifier it was not given).
   */
  private async call(batch: QueuedMessage[]): Promise<{ failed: Set<string> } | undefined> {
    const { functionTimeoutMs } = this.options;
    const records = batch.map((message) => this.record(message));
    const invocation = Promise.resolve().then(() =>
      this.options.handler(
        { Records: records },
        lambdaContext('stream', this.options.region, functionTimeoutMs),
      ),
    );
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<'timed out'>((resolve) => {
      timer = setTimeout(() => resolve('timed out'), functionTimeoutMs);
    });
    let response: StreamResult | 'timed out';
    try {
      response = await Promise.race([invocation, timedOut]);
    } catch (error) {
      this.options.log(`[gateway] stream handler failed: ${describe(error)}`);
      return undefined;
    } finally {
      clearTimeout(timer);
    }
    if (response === 'timed out') {
      // The abandoned invocation runs on here (AWS would have stopped it): its records are not
      // received again before it settles.
      for (const message of batch) message.abandoned = true;
      const settled = () => {
        for (const message of batch) message.abandoned = false;
        this.schedulePoll();
      };
      invocation.then(settled, settled);
      this.options.log(
        `[gateway] stream handler timed out after ${functionTimeoutMs} ms; its ${batch.length} ` +
          'records will be delivered again after the visibility timeout',
      );
      return undefined;
    }
    const given = new Set(batch.map((message) => message.messageId));
    const failed = new Set<string>();
    for (const failure of response?.batchItemFailures ?? []) {
      // Lambda treats an unknown or empty identifier as the failure of the whole batch.
      if (!given.has(failure.itemIdentifier)) {
        this.options.log(`[gateway] stream handler reported unknown item '${failure.itemIdentifier}'`);
        return undefined;
      }
      failed.add(failure.itemIdentifier);
    }
    return { failed };
  }

  private record(message: QueuedMessage): SQSRecord {
    return {
      messageId: message.messageId,
      receiptHandle: message.receipt ?? '',
      body: message.body,
      attributes: {
        ApproximateReceiveCount: String(message.receiveCount),
        SentTimestamp: String(message.sentTimestamp),
        SequenceNumber: String(message.sequenceNumber),
        MessageGroupId: message.groupId,
        SenderId: 'AROALOCALGATEWAY:apigateway',
        MessageDeduplicationId: message.deduplicationId,
        ApproximateFirstReceiveTimestamp: String(message.firstReceiveTimestamp ?? message.sentTimestamp),
      },
      messageAttributes: {},
      md5OfBody: createHash('md5').update(message.body).digest('hex'),
      eventSource: 'aws:sqs',
      eventSourceARN: this.options.queueArn,
      awsRegion: this.options.region,
    };
  }
}

function describe(error: unknown): string {
  return error instanceof Error ? (error.stack ?? error.message) : String(error);
}
