/**
 * A TCP relay between one client and the gateway emulator that the fault suite kills the way a
 * network or a crash does, on either side, never with a WebSocket close frame or `</close>`:
 *
 * - `client`: the client's end is reset at once (it sees 1006 and reconnects); the gateway's end
 *   lives on for `lagMs` (frames the server posts meanwhile vanish) and is then reset, so the
 *   server hears of it late, as of a client that crashed.
 * - `server`: the gateway's end is reset at once (`$disconnect` follows); the client learns of it
 *   `lagMs` later, and whatever it sends meanwhile vanishes.
 * - `both`: both ends reset at the same moment.
 * - `silent`: the client's end is reset and the gateway's end stays open, unread by anyone, for
 *   `lagMs` (a half-open connection: a lost `$disconnect` for that long), then closes.
 */
import { type AddressInfo, createServer, type Socket, connect as tcpConnect } from 'node:net';

export type KillMode = 'client' | 'server' | 'both' | 'silent';
export const KILL_MODES: readonly KillMode[] = ['client', 'server', 'both', 'silent'];

interface Pair {
  client: Socket;
  upstream: Socket;
  killed: boolean;
}

export interface KillableLink {
  /** The gateway's WebSocket URL through this relay. */
  url: string;
  /** Whether a relayed connection is up (a killed one no longer counts). */
  live(): boolean;
  /** Kills every live relayed connection; answers how many it killed. */
  kill(mode: KillMode, lagMs: number): number;
  close(): Promise<void>;
}

export async function startKillableLink(targetUrl: string): Promise<KillableLink> {
  const target = new URL(targetUrl);
  const pairs = new Set<Pair>();
  const timers = new Set<NodeJS.Timeout>();
  const sockets = new Set<Socket>();

  const later = (ms: number, action: () => void): void => {
    const timer = setTimeout(() => {
      timers.delete(timer);
      action();
    }, ms);
    timers.add(timer);
  };

  const server = createServer((client) => {
    client.setNoDelay(true);
    const upstream = tcpConnect(Number(target.port), target.hostname);
    upstream.setNoDelay(true);
    const pair: Pair = { client, upstream, killed: false };
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.once('close', () => sockets.delete(socket));
    }
    pairs.add(pair);
    const drop = () => {
      if (pair.killed) return;
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', drop).on('close', drop);
    upstream.on('error', drop).on('close', drop);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;

  /** Stops relaying: from now on each end's bytes go nowhere. */
  const sever = (pair: Pair): void => {
    pair.killed = true;
    pairs.delete(pair);
    pair.client.unpipe(pair.upstream);
    pair.upstream.unpipe(pair.client);
    // Keep reading what still arrives, so that neither end is held up by a full buffer.
    pair.client.on('data', () => {});
    pair.upstream.on('data', () => {});
  };
  const reset = (socket: Socket): void => {
    if (!socket.destroyed) socket.resetAndDestroy();
  };

  return {
    url: `ws://127.0.0.1:${port}${target.pathname}`,
    live: () => [...pairs].some((pair) => !pair.killed),
    kill(mode, lagMs) {
      let killed = 0;
      for (const pair of [...pairs]) {
        if (pair.killed) continue;
        killed += 1;
        sever(pair);
        switch (mode) {
          case 'client':
          case 'silent':
            reset(pair.client);
            later(lagMs, () => reset(pair.upstream));
            break;
          case 'server':
            reset(pair.upstream);
            later(lagMs, () => reset(pair.client));
            break;
          case 'both':
            reset(pair.client);
            reset(pair.upstream);
            break;
        }
      }
      return killed;
    },
    close() {
      for (const timer of timers) clearTimeout(timer);
      for (const socket of sockets) socket.destroy();
      return new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
