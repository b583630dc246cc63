/**
 * The stream function's use of the invocation's time: a record is started only with
 * TIME_IN_HAND_MS left, so a slow record cannot time out a batch that mixes connections (a
 * timeout redelivers every record, finished ones included; a reported failure only itself).
 */
import type { SQSRecord } from 'aws-lambda';
import { describe, expect, it } from 'vitest';
import { createStreamHandler, TIME_IN_HAND_MS } from '../../functions/stream.ts';
import { createLogger } from '../../shared/log.ts';
import { MetricsRecorder } from '../../shared/metrics.ts';
import type { Server } from '../../shared/server.ts';

function record(messageId: string, group: string): SQSRecord {
  return {
    messageId,
    body: JSON.stringify({
      connectionId: group,
      eventType: 'MESSAGE',
      requestTimeEpoch: 0,
      requestId: messageId,
    }),
    attributes: { MessageGroupId: group },
  } as unknown as SQSRecord;
}

describe('functions/stream and the remaining time', () => {
  it('leaves every record it cannot start in time for redelivery, touching nothing', async () => {
    // A server whose every use would throw: nothing may be handled.
    const metrics = new MetricsRecorder();
    const untouchable = new Proxy(
      {},
      {
        get: (_target, name) => {
          if (name === 'log') return createLogger('silent');
          // Counting the retried records is bookkeeping, not handling.
          if (name === 'metrics') return metrics;
          throw new Error('handled a record out of time');
        },
      },
    );
    const handler = createStreamHandler(untouchable as Server);
    const result = await handler(
      { Records: [record('m1', 'c1'), record('m2', 'c2'), record('m3', 'c1')] },
      { getRemainingTimeInMillis: () => TIME_IN_HAND_MS - 1 },
    );
    expect(result.batchItemFailures).toEqual([
      { itemIdentifier: 'm1' },
      { itemIdentifier: 'm2' },
      { itemIdentifier: 'm3' },
    ]);
  });
});
