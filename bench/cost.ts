/**
 * What a delivered message costs on AWS, from what the bench counted per delivered message and
 * the list prices in `prices.ts`.
 */
import { prices } from './prices.ts';

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
