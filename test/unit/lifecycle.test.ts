/**
 * A session ended among deliveries running side by side (a broadcast's fan-out) where the frame's
 * context is a variable, as on Lambda: its re-route, which runs each stanza under a frame of its
 * own, is left to the sweeper instead of changing the context the deliveries beside it read.
 */
import { Element } from 'ltx';
import { describe, expect, it } from 'vitest';
import { useSequentialContexts } from '../../shared/context.ts';
import { eachLimited } from '../../shared/core/delivery.ts';
import type { Server } from '../../shared/core/host.ts';
import { endSession } from '../../shared/core/lifecycle.ts';

/** Just what endSession uses: a session-ending hook that hands back one stanza and a finishing step. */
function fakeServer(calls: string[]): Server {
  const note = (message: string): void => {
    calls.push(message);
  };
  return {
    host: {
      fire: async (event: string, payload: Record<string, unknown>) => {
        if (event === 'session-ending') {
          (payload.undelivered as unknown[]).push({
            stanza: new Element('iq', { type: 'result', id: 'r1' }),
            acceptedAt: 1,
            done: async () => note('re-routed'),
          });
          (payload.afterReroute as (() => Promise<void>)[]).push(async () => note('finished'));
        }
        return undefined;
      },
    },
    sessions: { releaseSmResource: async () => undefined },
    metrics: { count: () => {} },
    log: { debug: () => {}, info: note, warn: note, error: note },
  } as unknown as Server;
}

const session = { user: 'ada@localhost', resource: 'phone', smId: 'sm-1' };

async function endAmongTwo(calls: string[]): Promise<void> {
  await eachLimited(['ending', 'beside'], 2, async (which) => {
    if (which === 'ending') await endSession(fakeServer(calls), session, 'expired');
    else await new Promise((resolve) => setTimeout(resolve, 5));
  });
}

describe('endSession among concurrent deliveries', () => {
  it('leaves the re-route to the sweeper where the context is a variable (Lambda)', async () => {
    useSequentialContexts(true);
    try {
      const calls: string[] = [];
      await endAmongTwo(calls);
      // Neither re-routed nor finished: the queue keeps the stanza for the sweeper's re-route.
      expect(calls).toEqual(['re-route left to the sweeper: the session ended among concurrent deliveries']);
      // Alone (no fan-out), it re-routes at once.
      const alone: string[] = [];
      await endSession(fakeServer(alone), session, 'expired');
      expect(alone).toEqual(['re-routed', 'finished']);
    } finally {
      useSequentialContexts(false);
    }
  });

  it('re-routes at once where each chain has its own context (AsyncLocalStorage)', async () => {
    const calls: string[] = [];
    await endAmongTwo(calls);
    expect(calls).toEqual(['re-routed', 'finished']);
  });
});
