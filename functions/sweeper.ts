/**
 * The sweeper, every minute: ends sessions whose resumption window closed without a resume
 * (XEP-0198) so nothing addressed to them waits forever: the stream-management module hooks
 * the `sweep` event; with no detached sessions a sweep costs one Query on an empty sparse index.
 */
import { loadConfig } from '../shared/config.ts';
import { sweep } from '../shared/core/lifecycle.ts';
import { createServer, type Server } from '../shared/server.ts';

export function createSweeperHandler(server: Server) {
  return async (): Promise<{ swept: number }> => ({ swept: await sweep(server, Date.now()) });
}

let server: Server | undefined;

export const handler = (): Promise<{ swept: number }> => {
  server ??= createServer({ config: loadConfig() });
  return createSweeperHandler(server)();
};
