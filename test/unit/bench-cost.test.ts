/**
 * The bench's cost arithmetic (bench/cost.ts): the projected Lambda duration, the price of a
 * message, the frame queue's break-even against Kinesis and an always-online user's month.
 * Every expected value is worked out by hand from the list prices in bench/prices.ts (us-east-1:
 * API Gateway $1.00/M messages and $0.25/M connection minutes, Lambda arm64 $0.20/M requests
 * and $0.0000133334/GB-s, SQS FIFO $0.50/M requests, DynamoDB $0.125/M RRU and $0.625/M WRU,
 * Kinesis $0.015/shard-hour, $0.014/M PUT units, on-demand $0.04/stream-hour + $0.08/GB in +
 * $0.04/GB out, enhanced fan-out $0.015/consumer-shard-hour + $0.013/GB) and the stated call
 * latencies (4 ms a DynamoDB request, 10 ms a post); a 30-day month is 720 hours.
 */
import { describe, expect, it } from 'vitest';
import {
  alwaysOnlineUserMonth,
  breakEvenFramesPerMonth,
  costPerMillionMessages,
  gbSeconds,
  kinesisOnDemandMonthly,
  kinesisProvisionedMonthly,
  kinesisShards,
  projectedDurationMs,
  sqsFifoMonthly,
} from '../../bench/cost.ts';

const KB = 1024;

describe('projected Lambda duration', () => {
  it('adds CPU, each sequential call at its latency and half a 1 ms billing step per invocation', () => {
    // 2 + 2 × 4 + 1 × 10 + 1 × 0.5
    expect(projectedDurationMs({ cpuMs: 2, dynamodbRequests: 2, connectionCalls: 1, invocations: 1 })).toBe(
      20.5,
    );
    // Latencies given: 1.5 + 4 × 3 + 2 × 7 + 2 × 0.5
    expect(
      projectedDurationMs(
        { cpuMs: 1.5, dynamodbRequests: 4, connectionCalls: 2, invocations: 2 },
        { dynamodbRequest: 3, connectionPost: 7 },
      ),
    ).toBe(28.5);
  });

  it('prices a message from its usage', () => {
    // 20.5 ms at 512 MB = 0.0205 s × 0.5 GB = 0.01025 GB-s
    expect(gbSeconds(20.5, 512)).toBeCloseTo(0.01025, 12);
    const cost = costPerMillionMessages({
      apiGatewayMessages: 2,
      sqsRequests: 3,
      lambdaInvocations: 1,
      lambdaGbSeconds: 0.01025,
      readRequestUnits: 2,
      writeRequestUnits: 0.5,
    });
    expect(cost.apiGatewayMessages).toBeCloseTo(2, 10);
    expect(cost.sqs).toBeCloseTo(1.5, 10);
    expect(cost.lambdaRequests).toBeCloseTo(0.2, 10);
    // 0.01025 × 1e6 × 0.0000133334 = 0.136667…
    expect(cost.lambdaDuration).toBeCloseTo(0.13666735, 6);
    expect(cost.dynamodbReads).toBeCloseTo(0.25, 10);
    expect(cost.dynamodbWrites).toBeCloseTo(0.3125, 10);
    // 2 + 1.5 + 0.2 + 0.136667 + 0.25 + 0.3125
    expect(cost.total).toBeCloseTo(4.39916735, 6);
  });
});

describe('the frame queue: SQS FIFO against Kinesis', () => {
  const shape = { peakToMean: 10, recordBytes: KB, framesPerBatch: 1 };

  it('SQS FIFO: one request per frame plus two per batch', () => {
    // 1M frames, one a batch: 3M requests × $0.50/M
    expect(sqsFifoMonthly({ ...shape, framesPerMonth: 1e6 })).toBeCloseTo(1.5, 10);
    // Ten a batch: 1M + 0.1M × 2 = 1.2M requests
    expect(sqsFifoMonthly({ ...shape, framesPerMonth: 1e6, framesPerBatch: 10 })).toBeCloseTo(0.6, 10);
    // A 65 KB record is two 64 KB chunks: 2M + 2M = 4M requests
    expect(sqsFifoMonthly({ ...shape, framesPerMonth: 1e6, recordBytes: 65 * KB })).toBeCloseTo(2, 10);
  });

  it('provisioned Kinesis: shard-hours for the peak and PUT payload units', () => {
    // 1 shard × 720 h × $0.015 = $10.80, + 1M units × $0.014/M
    expect(kinesisProvisionedMonthly({ ...shape, framesPerMonth: 1e6 })).toBeCloseTo(10.814, 10);
    // 1e9 frames: mean 385.8/s, peak 3,858/s → 4 shards by records (3.77 MB/s → 4 by bytes too)
    expect(kinesisShards({ ...shape, framesPerMonth: 1e9 })).toBe(4);
    // 4 × $10.80 + 1,000M × $0.014/M
    expect(kinesisProvisionedMonthly({ ...shape, framesPerMonth: 1e9 })).toBeCloseTo(57.2, 8);
    // 20 KB records at 500/s peak: 9.77 MB/s → 10 shards by bytes
    expect(
      kinesisShards({
        peakToMean: 1,
        recordBytes: 20 * KB,
        framesPerBatch: 1,
        framesPerMonth: 500 * 2_592_000,
      }),
    ).toBe(10);
    // Enhanced fan-out: + 720 × $0.015 and 1M KB = 0.95367 GB × $0.013
    expect(kinesisProvisionedMonthly({ ...shape, framesPerMonth: 1e6 }, true)).toBeCloseTo(
      10.814 + 10.8 + 0.0123977661,
      8,
    );
  });

  it('on-demand Kinesis: stream-hours and GB in and out, records rounded up to 1 KB', () => {
    // 720 × $0.04 = $28.80; 1M × 1 KB = 0.95367 GB × ($0.08 + $0.04)
    expect(kinesisOnDemandMonthly({ ...shape, framesPerMonth: 1e6 })).toBeCloseTo(28.8 + 0.114440918, 8);
    // 300-byte records are billed as 1 KB
    expect(kinesisOnDemandMonthly({ ...shape, framesPerMonth: 1e6, recordBytes: 300 })).toBeCloseTo(
      28.8 + 0.114440918,
      8,
    );
  });

  it('break-even volumes', () => {
    // $10.80 / ($1.50 − $0.014) per million frames = 7.2678M frames (peak 28/s: one shard)
    expect(breakEvenFramesPerMonth('kinesis-provisioned', shape)).toBeCloseTo(10.8 / 1.486e-6, 0);
    // $21.60 / ($1.50 − $0.014 − $0.0123978) per million
    expect(breakEvenFramesPerMonth('kinesis-provisioned-efo', shape)).toBeCloseTo(
      21.6 / (1.5e-6 - 1.4e-8 - 1.23977661e-8),
      0,
    );
    // $28.80 / ($1.50 − $0.1144409) per million
    expect(breakEvenFramesPerMonth('kinesis-on-demand', shape)).toBeCloseTo(
      28.8 / (1.5e-6 - 1.14440918e-7),
      0,
    );
    // A shard pays for itself at 7.27M frames a month; at a peak 300 times the mean it carries
    // 1,000 × 2,592,000 / 300 = 8.64M, so one shard still wins there …
    expect(breakEvenFramesPerMonth('kinesis-provisioned', { ...shape, peakToMean: 300 })).toBeCloseTo(
      10.8 / 1.486e-6,
      0,
    );
    // … at 400 times it carries 6.48M, less than it costs: each added shard too, so never.
    expect(breakEvenFramesPerMonth('kinesis-provisioned', { ...shape, peakToMean: 400 })).toBeUndefined();
    // With ten frames a batch SQS costs $0.60/M frames: $10.80 / ($0.60 − $0.014) per million
    expect(breakEvenFramesPerMonth('kinesis-provisioned', { ...shape, framesPerBatch: 10 })).toBeCloseTo(
      10.8 / 0.586e-6,
      0,
    );
  });
});

describe("an always-online user's month", () => {
  it('connection minutes, pings and reconnects', () => {
    const month = alwaysOnlineUserMonth({
      pingEveryMinutes: 5,
      reconnectEveryHours: 2,
      // $2 + $1.50 + $0.20 + 0.01 × $13.3334 + $0.125 per million = $3.958334 per million pings
      perPing: {
        apiGatewayMessages: 2,
        sqsRequests: 3,
        lambdaInvocations: 1,
        lambdaGbSeconds: 0.01,
        readRequestUnits: 1,
        writeRequestUnits: 0,
      },
      // $10 + $5 + $1 + 0.1 × $13.3334 + $1.25 + $12.50 per million = $31.08334 per million
      perReconnect: {
        apiGatewayMessages: 10,
        sqsRequests: 10,
        lambdaInvocations: 5,
        lambdaGbSeconds: 0.1,
        readRequestUnits: 10,
        writeRequestUnits: 20,
      },
    });
    // 30 × 24 × 60 minutes at $0.25 per million
    expect(month.connectionMinutes).toBe(43_200);
    expect(month.connectionCost).toBeCloseTo(0.0108, 10);
    expect(month.pings).toBe(8_640);
    expect(month.pingCost).toBeCloseTo(8_640 * 3.958334e-6, 10);
    expect(month.reconnects).toBe(360);
    expect(month.reconnectCost).toBeCloseTo(360 * 31.08334e-6, 10);
    expect(month.total).toBeCloseTo(0.0108 + 0.0342000058 + 0.0111900024, 8);
  });
});
