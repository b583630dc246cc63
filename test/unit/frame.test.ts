/**
 * core/frame.ts and the ids made from it: what a frame writes is keyed so that every delivery
 * of the frame (SQS delivers at least once) writes the same thing.
 */
import { describe, expect, it } from 'vitest';
import { useSequentialContexts } from '../../shared/context.ts';
import {
  frameTimeLeft,
  inFrame,
  nextDeliveryKey,
  offlineRecord,
  sequenceAtMost,
  storedOfflineBefore,
  withTimeLeft,
} from '../../shared/core/frame.ts';
import { keyedOfflineId, newOfflineId } from '../../shared/store/offline.ts';

describe('sequenceAtMost', () => {
  it('compares SQS sequence numbers as numbers, not as strings', () => {
    expect(sequenceAtMost('18880000000000000100', '18880000000000000100')).toBe(true);
    expect(sequenceAtMost('18880000000000000099', '18880000000000000100')).toBe(true);
    expect(sequenceAtMost('18880000000000000101', '18880000000000000100')).toBe(false);
    // "99" sorts after "100" as text.
    expect(sequenceAtMost('99', '100')).toBe(true);
    expect(sequenceAtMost('100', '99')).toBe(false);
  });
});

describe('the record of a message stored offline (offlineRecord, storedOfflineBefore)', () => {
  const frame = (frameId: string, storedOffline?: string) => ({
    frameId,
    receivedAt: 5,
    receiveCount: 2,
    connectionId: 'conn-1',
    ...(storedOffline ? { storedOffline } : {}),
  });

  it('is made for the frame being handled, naming the recipient and the resource it was held for', async () => {
    expect(
      await inFrame(frame('req-1'), async () => [
        offlineRecord('juliet@localhost'),
        offlineRecord('juliet@localhost', 'my phone'),
      ]),
    ).toEqual([
      { connectionId: 'conn-1', record: 'req-1 juliet@localhost' },
      { connectionId: 'conn-1', record: 'req-1 juliet@localhost my phone' },
    ]);
    // Outside a client's frame (a re-route has no connection): nothing to record.
    expect(offlineRecord('juliet@localhost')).toBeUndefined();
    expect(
      await inFrame({ frameId: 'reroute:s:1', receivedAt: 5 }, async () => offlineRecord('j@localhost')),
    ).toBe(undefined);
  });

  it('tells a redelivery of that frame what it stored, for that recipient only', async () => {
    const recalled = (frameId: string, record: string | undefined, user: string) =>
      inFrame(frame(frameId, record), async () => storedOfflineBefore(user));
    expect(await recalled('req-1', 'req-1 juliet@localhost', 'juliet@localhost')).toEqual({});
    expect(await recalled('req-1', 'req-1 juliet@localhost my phone', 'juliet@localhost')).toEqual({
      heldFor: 'my phone',
    });
    // Another frame's record, another recipient, no record: route as usual.
    expect(await recalled('req-2', 'req-1 juliet@localhost', 'juliet@localhost')).toBeUndefined();
    expect(await recalled('req-1', 'req-1 juliet@localhost', 'nurse@localhost')).toBeUndefined();
    expect(await recalled('req-1', undefined, 'juliet@localhost')).toBeUndefined();
  });
});

describe('nextDeliveryKey', () => {
  it('numbers the deliveries of one frame the same way on every delivery of it', async () => {
    const keys = (receiveCount: number) =>
      inFrame({ frameId: 'req-1', receivedAt: 5, receiveCount, seq: '42' }, async () => [
        nextDeliveryKey('sm:a'),
        nextDeliveryKey('sm:a'),
        nextDeliveryKey('offline:bob@localhost'),
      ]);
    const first = await keys(1);
    const again = await keys(2);
    // Numbered per target: another target's deliveries, however interleaved, change nothing.
    expect(first.map((k) => k?.key)).toEqual(['req-1:0', 'req-1:1', 'req-1:0']);
    expect(again.map((k) => k?.key)).toEqual(['req-1:0', 'req-1:1', 'req-1:0']);
    expect(first.map((k) => k?.redelivered)).toEqual([false, false, false]);
    expect(again.map((k) => k?.redelivered)).toEqual([true, true, true]);
  });

  it('works the same with the context in a variable, as on Lambda (one frame at a time)', async () => {
    useSequentialContexts(true);
    try {
      const keys = await inFrame({ frameId: 'req-2', receivedAt: 1 }, async () => {
        const outer = nextDeliveryKey('sm:a')?.key;
        // A re-route inside the frame has its own keys; the frame's resume after it.
        const inner = await inFrame(
          { frameId: 'reroute:x:1', receivedAt: 1 },
          async () => nextDeliveryKey('sm:a')?.key,
        );
        return [outer, inner, nextDeliveryKey('sm:a')?.key];
      });
      expect(keys).toEqual(['req-2:0', 'reroute:x:1:0', 'req-2:1']);
      expect(nextDeliveryKey('sm:a')).toBeUndefined();
    } finally {
      useSequentialContexts(false);
    }
  });

  it('has no key outside a frame (the sweeper, a frame without an id)', async () => {
    expect(nextDeliveryKey('sm:a')).toBeUndefined();
    expect(
      await inFrame({ frameId: '', receivedAt: 1 }, async () => nextDeliveryKey('sm:a')),
    ).toBeUndefined();
  });
});

describe('frameTimeLeft', () => {
  it.each([false, true])(
    'is the invocation’s, in a frame, in work under a frame’s key inside it, and in the sweep’s (sequential contexts: %s)',
    async (sequential) => {
      useSequentialContexts(sequential);
      try {
        expect(frameTimeLeft()).toBeUndefined();
        // A stream frame, and a re-route inside it that names each entry by its own key.
        const inStream = await inFrame({ frameId: 'f1', receivedAt: 0, timeLeftMs: () => 1234 }, async () => [
          frameTimeLeft(),
          await inFrame({ frameId: 'reroute:s:1', receivedAt: 0, receiveCount: 2 }, async () =>
            frameTimeLeft(),
          ),
        ]);
        expect(inStream).toEqual([1234, 1234]);
        // The sweeper: no frame of its own, its re-routes keyed likewise.
        const inSweep = await withTimeLeft(
          () => 5678,
          async () => [
            frameTimeLeft(),
            await inFrame({ frameId: 'reroute:s:2', receivedAt: 0, receiveCount: 2 }, async () =>
              frameTimeLeft(),
            ),
          ],
        );
        expect(inSweep).toEqual([5678, 5678]);
        // The local runner gives no deadline: none is made up.
        expect(await inFrame({ frameId: 'f2', receivedAt: 0 }, async () => frameTimeLeft())).toBeUndefined();
        expect(frameTimeLeft()).toBeUndefined();
      } finally {
        useSequentialContexts(false);
      }
    },
  );
});

describe('keyedOfflineId', () => {
  it('is the same for every delivery of the frame and orders one sender’s frames of one millisecond', () => {
    const key = (frameId: string, seq: string, position = 0) => ({
      key: `${frameId}:${position}`,
      at: 1_790_000_000_000,
      seq,
      position,
    });
    expect(keyedOfflineId(key('a', '100'))).toBe(keyedOfflineId(key('a', '100')));
    expect(keyedOfflineId(key('a', '100'))).toBe(
      '001790000000000-0000000000000000000000000000000000000100-0000',
    );
    const ids = [key('z', '99'), key('a', '100'), key('a', '100', 1), key('m', '1000')].map(keyedOfflineId);
    expect([...ids].sort()).toEqual(ids);
  });

  it('without a sequence number, hashes the key, in the shape of newOfflineId', () => {
    const shape = /^\d{15}-\d{4}-[0-9a-f]{8}$/;
    const id = keyedOfflineId({ key: 'req-9:2', at: 7, position: 2 });
    expect(id).toMatch(shape);
    expect(id.startsWith('000000000000007-0002-')).toBe(true);
    expect(newOfflineId()).toMatch(shape);
  });
});
