/**
 * Ends sessions whose socket is gone and whose XEP-0198 resumption window has closed. The
 * sweep index is sparse: only detached sessions carry `sweepShard`/`sweepAt`.
 */
import { endSession } from './features/presence.ts';
import type { Server } from './server.ts';

const PAGE = 100;

export async function sweepExpiredSessions(server: Server, now: number): Promise<number> {
  let swept = 0;
  for (;;) {
    const expired = await server.sessions.listExpiredDetached(now, PAGE);
    for (const state of expired) {
      await endSession(server, state);
      swept += 1;
    }
    if (expired.length < PAGE) return swept;
  }
}
