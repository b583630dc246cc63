/**
 * AWS list prices the bench turns its counts into dollars with: us-east-1 (N. Virginia),
 * on-demand, first volume tier, no free tier. The one place to update when AWS changes a price.
 *
 * Assumed current on PRICES_AS_OF; the figures were last cross-checked against published
 * summaries of the pages named below dated up to mid-2026 (the SQS FIFO rate in June 2026, the
 * DynamoDB on-demand rates after the November 2024 cut in July 2025; the Kinesis Data Streams
 * rates, added 2026-11-29, are the long-standing published list prices).
 */

export const PRICES_AS_OF = '2026-11-29';
export const PRICES_REGION = 'us-east-1';

export const prices = {
  /**
   * "Amazon API Gateway pricing", WebSocket APIs: $1.00 per million messages for the first
   * 1 billion a month (sent or received), "messages are metered in 32 KB increments" (a 33 KB
   * message counts as two); $0.25 per million connection minutes.
   */
  apiGateway: {
    perMillionMessages: 1.0,
    messageIncrementBytes: 32 * 1024,
    perMillionConnectionMinutes: 0.25,
  },
  /**
   * "AWS Lambda pricing", Arm: $0.0000133334 per GB-second (first 7.5 billion GB-s a month),
   * $0.20 per million requests; duration billed in 1 ms steps.
   */
  lambda: {
    perGbSecondArm: 0.0000133334,
    perMillionRequests: 0.2,
    billingStepMs: 1,
  },
  /**
   * "Amazon SQS pricing", FIFO queues: $0.50 per million requests; "each 64 KB chunk of a
   * payload is billed as 1 request".
   */
  sqsFifo: {
    perMillionRequests: 0.5,
    requestChunkBytes: 64 * 1024,
  },
  /**
   * "Amazon DynamoDB pricing — on-demand capacity", Standard table class, after the
   * November 2024 cut: $0.625 per million write request units, $0.125 per million read
   * request units.
   */
  dynamodbOnDemand: {
    perMillionWriteRequestUnits: 0.625,
    perMillionReadRequestUnits: 0.125,
  },
  /**
   * The frame queue's event source with no frame to take (`npm run bench:idle`), an estimate:
   * "Lambda uses long polling to poll a queue until it becomes active"; at low traffic it "scales
   * back to 5 concurrent batches, and can optimize to as few as 2 ... However, this
   * optimization is not available when you enable the maximum concurrency setting" (AWS Lambda
   * developer guide, "Configuring scaling behavior for SQS event source mappings"; the stack sets
   * maximum concurrency). Five pollers whose ReceiveMessage waits SQS's longest 20 s is an
   * assumption: AWS does not publish the wait Lambda uses.
   */
  sqsIdlePolling: {
    requestsPerMinute: 5 * 3,
  },
  /**
   * "Amazon CloudWatch pricing": $0.10 per standard-resolution alarm metric a month; $3.00 per
   * dashboard a month (the free tier's 3 dashboards of up to 50 metrics each left aside).
   */
  cloudwatch: {
    perAlarmMonth: 0.1,
    perDashboardMonth: 3.0,
  },
  /**
   * "AWS Key Management Service pricing": $1.00 per customer managed key a month (requests
   * aside). With automatic rotation (yearly by default), the first and second rotations' key
   * material add $1.00 a month each; later rotations are not billed (AWS's April 2024 change).
   */
  kms: {
    perKeyMonth: 1.0,
    perRotationMonth: 1.0,
    billedRotations: 2,
  },
  /**
   * "Amazon Kinesis Data Streams pricing", for the queue break-even (`npm run bench:breakeven`),
   * not used by Nimbus. Provisioned: $0.015 per shard-hour, $0.014 per million PUT payload units
   * (a record is billed in 25 KB units); a shard takes 1,000 records/s or 1 MB/s in. Enhanced
   * fan-out (a consumer that is pushed records instead of polling): $0.015 per consumer-shard-hour
   * and $0.013 per GB retrieved. On-demand: $0.04 per stream-hour, $0.08 per GB in and $0.04 per
   * GB out, each record rounded up to 1 KB. Neither mode scales to zero: a stream bills its
   * hours whether or not a frame passes.
   */
  kinesis: {
    provisioned: {
      perShardHour: 0.015,
      perMillionPutPayloadUnits: 0.014,
      putPayloadUnitBytes: 25 * 1024,
      shardRecordsPerSecond: 1_000,
      shardBytesPerSecond: 1024 * 1024,
    },
    enhancedFanOut: {
      perConsumerShardHour: 0.015,
      perGbRetrieved: 0.013,
    },
    onDemand: {
      perStreamHour: 0.04,
      perGbIn: 0.08,
      perGbOut: 0.04,
      recordRoundingBytes: 1024,
    },
  },
} as const;

/**
 * What a call to another AWS service costs the stream function in wall time on AWS, for the
 * projected Lambda duration (`projectedCostPerMillionMessages` in `cost.ts`): the function is
 * billed for the time it waits on its calls, and on the local stack that wait is DynamoDB
 * Local's and the emulator's, on a busy machine, not AWS's. Assumptions, stated in the README;
 * change them here.
 */
export const AWS_CALL_LATENCY_MS = {
  /**
   * One DynamoDB GetItem, Query or UpdateItem of a small item from Lambda in the same region,
   * the SDK's HTTPS round trip on a kept-alive connection included. AWS's DynamoDB documentation
   * and product page state "single-digit millisecond" latency; 4 ms is an assumption inside that
   * range, neither its floor nor its ceiling.
   */
  dynamodbRequest: 4,
  /**
   * One `@connections` PostToConnection (API Gateway Management API) in the same region: an
   * HTTPS request to API Gateway's management endpoint. AWS publishes no latency figure for it;
   * 10 ms (two and a half DynamoDB requests) is an assumption. A deployed stack's X-Ray traces (`TRACING=true`) measure both.
   */
  connectionPost: 10,
} as const;

/** Hours in a 30-day month, the month every monthly figure here uses. */
export const HOURS_PER_MONTH = 30 * 24;
