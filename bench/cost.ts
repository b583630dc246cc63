/**
 * What a delivered message costs on AWS, from what the bench counted per delivered message and
 * the list prices in `prices.ts`.
 */
import { AWS_CALL_LATENCY_MS, HOURS_PER_MONTH, prices } from './prices.ts';

/**
 * SQS FIFO requests besides API Gateway's SendMessage of each frame: the Lambda event source's
 * ReceiveMessage and DeleteMessageBatch, once per batch it hands the stream function (one
 * batch, one invocation). The event source's empty long polls cost the same whatever the
 * traffic and are left out.
 */
export const SQS_REQUESTS_PER_BATCH = 2;

/** Resources one delivered message used, on average. */
export interface UsagePerMessage {
  /** Frames in plus posts out, in 32 KB units. */
  apiGatewayMessages: number;
  /** Queue requests, in 64 KB chunks. */
  sqsRequests: number;
  lambdaInvocations: number;
  lambdaGbSeconds: number;
  readRequestUnits: number;
  writeRequestUnits: number;
}

export interface CostPerMillion {
  apiGatewayMessages: number;
  sqs: number;
  lambdaRequests: number;
  lambdaDuration: number;
  dynamodbReads: number;
  dynamodbWrites: number;
  total: number;
}

export function costPerMillionMessages(usage: UsagePerMessage): CostPerMillion {
  const cost = {
    apiGatewayMessages: usage.apiGatewayMessages * prices.apiGateway.perMillionMessages,
    sqs: usage.sqsRequests * prices.sqsFifo.perMillionRequests,
    lambdaRequests: usage.lambdaInvocations * prices.lambda.perMillionRequests,
    lambdaDuration: usage.lambdaGbSeconds * 1e6 * prices.lambda.perGbSecondArm,
    dynamodbReads: usage.readRequestUnits * prices.dynamodbOnDemand.perMillionReadRequestUnits,
    dynamodbWrites: usage.writeRequestUnits * prices.dynamodbOnDemand.perMillionWriteRequestUnits,
  };
  const total = Object.values(cost).reduce((sum, value) => sum + value, 0);
  return { ...cost, total };
}

/** Connection minutes are paid per connected user, not per message: $ per million messages for a given pattern. */
export function connectionCostPerMillionMessages(connectionMinutesPerMessage: number): number {
  return connectionMinutesPerMessage * prices.apiGateway.perMillionConnectionMinutes;
}

// ---------------------------------------------------------------------------------------------
// The projected AWS figure (issue #13): Lambda duration from CPU and sequential AWS calls

/** What the stream function did for one message (or one login, one ping, …), on average. */
export interface FunctionWork {
  /** CPU time of the function's process (user + system). */
  cpuMs: number;
  /** DynamoDB requests (GetItem, Query, UpdateItem, …). */
  dynamodbRequests: number;
  /** `@connections` calls: PostToConnection (and DeleteConnection). */
  connectionCalls: number;
  invocations: number;
}

export interface CallLatencyMs {
  dynamodbRequest: number;
  connectionPost: number;
}

/**
 * The billed Lambda duration the work would take on AWS: its measured CPU, plus every AWS call
 * waited for one after the other at the latency `prices.ts` assumes (calls a piece of code
 * runs in parallel, such as SASL's reads or a fan-out's posts, are counted as sequential, so
 * this is an upper bound), plus half a billing step per invocation (each invocation is rounded
 * up to the step).
 */
export function projectedDurationMs(
  work: FunctionWork,
  latency: CallLatencyMs = AWS_CALL_LATENCY_MS,
  billingStepMs: number = prices.lambda.billingStepMs,
): number {
  return (
    work.cpuMs +
    work.dynamodbRequests * latency.dynamodbRequest +
    work.connectionCalls * latency.connectionPost +
    work.invocations * (billingStepMs / 2)
  );
}

/** Lambda GB-seconds for a duration at a memory size. */
export function gbSeconds(durationMs: number, memoryMb: number): number {
  return (durationMs / 1000) * (memoryMb / 1024);
}

/** The dollars one event (a message, a ping, a reconnect) costs, from its usage. */
export function costOf(usage: UsagePerMessage): number {
  return costPerMillionMessages(usage).total / 1e6;
}

// ---------------------------------------------------------------------------------------------
// The frame queue: SQS FIFO against a Kinesis data stream (`npm run bench:breakeven`)

/** A month of frames into the queue. */
export interface QueueLoad {
  framesPerMonth: number;
  /** Peak rate over the month's mean rate: what a provisioned stream's shard count must carry. */
  peakToMean: number;
  /** A queued frame's size (the JSON queue message, base64 frame included). */
  recordBytes: number;
  /** Frames per Lambda batch (1 at chat pace: FIFO event sources have no batching window). */
  framesPerBatch: number;
}

const SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600;
const GB = 1024 ** 3;

export function peakFramesPerSecond(load: QueueLoad): number {
  return (load.framesPerMonth / SECONDS_PER_MONTH) * load.peakToMean;
}

/** SQS FIFO: SendMessage per frame (per 64 KB chunk), ReceiveMessage + DeleteMessageBatch per batch. */
export function sqsFifoMonthly(load: QueueLoad): number {
  const chunks = Math.max(1, Math.ceil(load.recordBytes / prices.sqsFifo.requestChunkBytes));
  const requests =
    load.framesPerMonth * chunks + (load.framesPerMonth / load.framesPerBatch) * SQS_REQUESTS_PER_BATCH;
  return requests * (prices.sqsFifo.perMillionRequests / 1e6);
}

/** Shards a provisioned stream needs for the load's peak (1,000 records/s and 1 MB/s a shard). */
export function kinesisShards(load: QueueLoad): number {
  const k = prices.kinesis.provisioned;
  const peak = peakFramesPerSecond(load);
  return Math.max(
    1,
    Math.ceil(peak / k.shardRecordsPerSecond),
    Math.ceil((peak * load.recordBytes) / k.shardBytesPerSecond),
  );
}

/**
 * A provisioned Kinesis stream: shard-hours for the peak whether or not frames pass, PUT payload
 * units (25 KB each) per frame; with `enhancedFanOut`, the Lambda consumer's shard-hours and
 * GB retrieved on top (records pushed as they arrive instead of polled once a second).
 */
export function kinesisProvisionedMonthly(load: QueueLoad, enhancedFanOut = false): number {
  const k = prices.kinesis.provisioned;
  const shards = kinesisShards(load);
  const units = Math.max(1, Math.ceil(load.recordBytes / k.putPayloadUnitBytes));
  let total =
    shards * HOURS_PER_MONTH * k.perShardHour +
    load.framesPerMonth * units * (k.perMillionPutPayloadUnits / 1e6);
  if (enhancedFanOut) {
    const efo = prices.kinesis.enhancedFanOut;
    total += shards * HOURS_PER_MONTH * efo.perConsumerShardHour;
    total += ((load.framesPerMonth * load.recordBytes) / GB) * efo.perGbRetrieved;
  }
  return total;
}

/** An on-demand Kinesis stream: the stream-hours, and GB in and out, each record rounded up to 1 KB. */
export function kinesisOnDemandMonthly(load: QueueLoad): number {
  const k = prices.kinesis.onDemand;
  const billedBytes = Math.ceil(load.recordBytes / k.recordRoundingBytes) * k.recordRoundingBytes;
  const gigabytes = (load.framesPerMonth * billedBytes) / GB;
  return HOURS_PER_MONTH * k.perStreamHour + gigabytes * (k.perGbIn + k.perGbOut);
}

export type QueueOption = 'kinesis-provisioned' | 'kinesis-provisioned-efo' | 'kinesis-on-demand';

export function queueMonthly(option: QueueOption | 'sqs-fifo', load: QueueLoad): number {
  switch (option) {
    case 'sqs-fifo':
      return sqsFifoMonthly(load);
    case 'kinesis-provisioned':
      return kinesisProvisionedMonthly(load);
    case 'kinesis-provisioned-efo':
      return kinesisProvisionedMonthly(load, true);
    case 'kinesis-on-demand':
      return kinesisOnDemandMonthly(load);
  }
}

/**
 * The smallest monthly frame volume at which `option` costs no more than SQS FIFO, for a load
 * shape (peak-to-mean, record size, frames per batch); `undefined` if it never does. Both costs
 * are linear in the volume between shard-count steps (a fixed part per shard plus a part per
 * frame), so the crossing is solved for one shard, then two, … until the shards carry it.
 */
export function breakEvenFramesPerMonth(
  option: QueueOption,
  shape: Omit<QueueLoad, 'framesPerMonth'>,
): number | undefined {
  const at = (framesPerMonth: number): QueueLoad => ({ ...shape, framesPerMonth });
  const sqsPerFrame = sqsFifoMonthly(at(1e6)) / 1e6;
  // One shard's (or the on-demand stream's) monthly fixed part, and the part per frame.
  const fixed = queueMonthly(option, at(0));
  const perFrame = (queueMonthly(option, at(1)) - fixed) / 1;
  if (perFrame >= sqsPerFrame) return undefined;
  for (let shards = 1; shards <= 100_000; shards++) {
    const volume = (shards * fixed) / (sqsPerFrame - perFrame);
    if (option === 'kinesis-on-demand' || kinesisShards(at(volume)) <= shards) return volume;
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// An always-online user's month (`npm run bench:per-user`)

export const MINUTES_PER_MONTH = HOURS_PER_MONTH * 60;

export interface AlwaysOnlinePlan {
  /** A keepalive (XEP-0199 ping to the server) every this many minutes, below API Gateway's 10-minute idle cut. */
  pingEveryMinutes: number;
  /** API Gateway ends every connection after 2 hours: a reconnect with resumption this often. */
  reconnectEveryHours: number;
  /** What one keepalive costs (its frames, posts, queue requests, invocations, DynamoDB units). */
  perPing: UsagePerMessage;
  /** What one reconnect with XEP-0198 resumption costs (`$disconnect`, `$connect`, SASL, `<resume/>`). */
  perReconnect: UsagePerMessage;
}

export interface UserMonth {
  connectionMinutes: number;
  connectionCost: number;
  pings: number;
  pingCost: number;
  reconnects: number;
  reconnectCost: number;
  total: number;
}

/** A 30-day month of one user connected the whole time and otherwise idle. */
export function alwaysOnlineUserMonth(plan: AlwaysOnlinePlan): UserMonth {
  const connectionMinutes = MINUTES_PER_MONTH;
  const connectionCost = connectionMinutes * (prices.apiGateway.perMillionConnectionMinutes / 1e6);
  const pings = MINUTES_PER_MONTH / plan.pingEveryMinutes;
  const reconnects = HOURS_PER_MONTH / plan.reconnectEveryHours;
  const pingCost = pings * costOf(plan.perPing);
  const reconnectCost = reconnects * costOf(plan.perReconnect);
  return {
    connectionMinutes,
    connectionCost,
    pings,
    pingCost,
    reconnects,
    reconnectCost,
    total: connectionCost + pingCost + reconnectCost,
  };
}
