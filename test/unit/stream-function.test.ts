/**
 * The stream function's use of the invocation's time: a record is started only with
 * TIME_IN_HAND_MS left, so a slow record cannot time out a batch that mixes connections (a
 * timeout redelivers every record, finished ones included; a reported failure only itself).
 */
import type { SQSRecord } from 'aws-lambda';
import { describe, expect, it } from 'vitest';
import {
  createStreamHandler,
  followedRecords,
  processFifoBatch,
  TIME_IN_HAND_MS,
} from '../../functions/stream.ts';
import type { FrameRetry } from '../../shared/frame-queue.ts';
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

/** A server whose every use but logging and counting throws `message`: nothing may be handled. */
function untouchableServer(message: string): Server {
  const metrics = new MetricsRecorder();
  return new Proxy(
    {},
    {
      get: (_target, name) => {
        if (name === 'log') return createLogger('silent');
        if (name === 'metrics') return metrics;
        throw new Error(message);
      },
    },
  ) as Server;
}

describe('functions/stream and the remaining time', () => {
  it('always starts the first record, then leaves those it cannot start in time for redelivery', async () => {
    const untouchable = untouchableServer('handled a record out of time');
    const handler = createStreamHandler(untouchable);
    // The first record is unreadable (dropped without touching the server), so it shows that it
    // was started; by the second, less than TIME_IN_HAND_MS of a 30 s invocation is left.
    const remaining = [30_000, TIME_IN_HAND_MS - 1, TIME_IN_HAND_MS - 2];
    const malformed = { ...record('m1', 'c1'), body: 'not json' } as SQSRecord;
    const result = await handler(
      { Records: [malformed, record('m2', 'c2'), record('m3', 'c3')] },
      { getRemainingTimeInMillis: () => remaining.shift() ?? 0 },
    );
    expect(result.batchItemFailures).toEqual([{ itemIdentifier: 'm2' }, { itemIdentifier: 'm3' }]);
  });

  it('keeps a fifth of a short invocation in hand instead of five seconds', async () => {
    const server = untouchableServer('touched');
    const handler = createStreamHandler(server);
    // A 1 s invocation with 400 ms left for the second record: more than a fifth, so it starts
    // (and, unreadable, is dropped); the third, with 150 ms left, is handed back.
    const remaining = [1000, 400, 150];
    const bad = (id: string, group: string) => ({ ...record(id, group), body: 'not json' }) as SQSRecord;
    const result = await handler(
      { Records: [bad('m1', 'c1'), bad('m2', 'c2'), bad('m3', 'c3')] },
      { getRemainingTimeInMillis: () => remaining.shift() ?? 0 },
    );
    expect(result.batchItemFailures).toEqual([{ itemIdentifier: 'm3' }]);
  });
});

describe('functions/stream and the records it hands back', () => {
  it('asks the queue to bring them again after 1, 2, 4 … seconds by receive count, not after the visibility timeout', async () => {
    const server = untouchableServer('touched');
    const asked: FrameRetry[][] = [];
    const handler = createStreamHandler(server, {
      frameQueue: { retryIn: async (retries) => void asked.push([...retries]) },
      retryMaxSeconds: 5,
    });
    const withReceipt = (id: string, group: string, receives: number) =>
      ({
        ...record(id, group),
        receiptHandle: `receipt-${id}`,
        attributes: { MessageGroupId: group, ApproximateReceiveCount: String(receives) },
      }) as SQSRecord;
    // The first is started (unreadable, dropped); the rest are out of time: handed back.
    const remaining = [30_000, 1, 1, 1, 10_000];
    const result = await handler(
      {
        Records: [
          { ...record('m1', 'c1'), body: 'not json' } as SQSRecord,
          withReceipt('m2', 'c2', 1),
          withReceipt('m3', 'c3', 3),
          withReceipt('m4', 'c4', 9),
        ],
      },
      { getRemainingTimeInMillis: () => remaining.shift() ?? 0 },
    );
    expect(result.batchItemFailures.map((f) => f.itemIdentifier)).toEqual(['m2', 'm3', 'm4']);
    expect(asked).toEqual([
      [
        { receiptHandle: 'receipt-m2', seconds: 1 },
        { receiptHandle: 'receipt-m3', seconds: 4 },
        { receiptHandle: 'receipt-m4', seconds: 5 },
      ],
    ]);
  });

  it('returns the batch response even when the queue refuses the change (the timeout then applies)', async () => {
    const server = untouchableServer('touched');
    const handler = createStreamHandler(server, {
      frameQueue: {
        retryIn: async () => {
          throw new Error('AccessDenied');
        },
      },
    });
    const remaining = [30_000, 1, 10_000];
    const result = await handler(
      {
        Records: [
          { ...record('m1', 'c1'), body: 'not json' } as SQSRecord,
          { ...record('m2', 'c2'), receiptHandle: 'r2' } as SQSRecord,
        ],
      },
      { getRemainingTimeInMillis: () => remaining.shift() ?? 0 },
    );
    expect(result.batchItemFailures).toEqual([{ itemIdentifier: 'm2' }]);
  });
});

describe('followedRecords', () => {
  it('names every record another record follows, of whatever connection: all but the last', () => {
    // A batch mixes connections: a1, b1, a2, c1, a3 (each connection's records in order). An
    // invocation that times out on a3 has b1 and c1 delivered again too: they are marked as well.
    const batch = [
      record('a1', 'A'),
      record('b1', 'B'),
      record('a2', 'A'),
      record('c1', 'C'),
      record('a3', 'A'),
    ];
    expect([...followedRecords(batch)].sort()).toEqual(['a1', 'a2', 'b1', 'c1']);
    expect(followedRecords([record('x', 'X')]).size).toBe(0);
  });
});

describe('functions/stream: the FIFO partial batch', () => {
  it("reports a failed record and its connection's later ones, and goes on with the other connections", async () => {
    const handled: string[] = [];
    const records = [
      record('a1', 'A'),
      record('b1', 'B'),
      record('a2', 'A'),
      record('b2', 'B'),
      record('a3', 'A'),
    ];
    const response = await processFifoBatch(records, async (r) => {
      handled.push(r.messageId);
      if (r.messageId === 'a2') throw new Error('transient');
    });
    // RFC 6120 §10.1: a3 must not overtake a2, so it waits for a2's retry, unstarted.
    expect(handled).toEqual(['a1', 'b1', 'a2', 'b2']);
    expect(response.batchItemFailures.map((failure) => failure.itemIdentifier)).toEqual(['a2', 'a3']);
  });

  it("on a failure's last receive, does not hold the group's later records behind it", async () => {
    // A record failing on its last receive (maxReceiveCount) leaves for the dead-letter queue:
    // its group's later records, received as often, would follow it there without being tried.
    const receivedTwenty = (id: string, group: string) => {
      const r = record(id, group);
      return { ...r, attributes: { ...r.attributes, ApproximateReceiveCount: '20' } } as SQSRecord;
    };
    const handled: string[] = [];
    const response = await processFifoBatch(
      [receivedTwenty('a1', 'A'), receivedTwenty('a2', 'A'), record('b1', 'B'), record('b2', 'B')],
      async (r) => {
        handled.push(r.messageId);
        if (r.messageId === 'a1' || r.messageId === 'b1') throw new Error('transient');
      },
      (r) => Number(r.attributes.ApproximateReceiveCount) >= 20,
    );
    expect(handled).toEqual(['a1', 'a2', 'b1']);
    // a1 goes to the dead-letter queue alone; b1, with receives left, still holds b2 back.
    expect(response.batchItemFailures.map((failure) => failure.itemIdentifier)).toEqual(['a1', 'b1', 'b2']);
  });

  it('reports a batch whose every record failed, instead of throwing', async () => {
    const records = [record('a1', 'A'), record('b1', 'B')];
    const response = await processFifoBatch(records, async () => {
      throw new Error('down');
    });
    expect(response.batchItemFailures.map((failure) => failure.itemIdentifier)).toEqual(['a1', 'b1']);
  });
});
