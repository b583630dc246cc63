/**
 * AWS list prices the bench turns its counts into dollars with: us-east-1 (N. Virginia),
 * on-demand, first volume tier, no free tier. The one place to update when AWS changes a price.
 *
 * Assumed current on PRICES_AS_OF; the figures were last cross-checked against published
 * summaries of the pages named below dated up to mid-2026 (the SQS FIFO rate in June 2026, the
 * DynamoDB on-demand rates after the November 2024 cut in July 2025).
 */

export const PRICES_AS_OF = '2026-11-22';
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
} as const;
