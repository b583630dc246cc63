/**
 * The sweeper, every minute: ends sessions whose resumption window closed without a resume
 * (XEP-0198) so nothing addressed to them waits forever. Until stream management lands there
 * are no detached sessions, and a sweep costs one Query on a sparse index that is empty.
 */
import { loadConfig } from '../shared/config.ts';
import { createServer, type Server } from '../shared/server.ts';
import { sweepExpiredSessions } from '../shared/sweep.ts';

export function createSweeperHandler(server: Server) {
  return async (): Promise<{ swept: number }> => ({ swept: await sweepExpiredSessions(server, Date.now()) });
}

let server: Server | undefined;

export const handler = (): Promise<{ swept: number }> => {
  server ??= createServer({ config: loadConfig() });
  return createSweeperHandler(server)();
};
