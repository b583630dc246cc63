/**
 * The sweeper's work: XEP-0198 sessions whose socket is gone and whose resumption window has
 * closed are ended, and what they had not delivered is re-routed (shared/features/stream-management.ts).
 */
import { expireDetachedSessions } from './features/stream-management.ts';
import type { Server } from './server.ts';

export function sweepExpiredSessions(server: Server, now: number): Promise<number> {
  return expireDetachedSessions(server, now);
}
