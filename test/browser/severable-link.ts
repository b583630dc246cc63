/**
 * A TCP relay between the browser and the gateway that the test can cut, as a network does: the
 * live connections are reset (no WebSocket close frame, no `</close>`: both ends see 1006), and
 * while the link is down new connections are accepted but held, unanswered, until it comes back.
 *
 * Holding rather than refusing matters: Converse treats a reconnect that fails before it ever
 * connected as final and clears its session, stream-management id included; a held connection
 * is what a client sees on a network that is slow to return, and resumes once it does.
 */
import { type AddressInfo, createServer, type Socket, connect as tcpConnect } from 'node:net';

export interface SeverableLink {
  /** The gateway's WebSocket URL, through the relay. */
  url: string;
  /** Connections relayed so far (held ones included). */
  connectionsAccepted(): number;
  /** Resets every live connection and holds new ones until `restore()`. */
  cut(): void;
  /** Relays the held connections and every new one. */
  restore(): void;
  close(): Promise<void>;
}

export async function startSeverableLink(targetUrl: string): Promise<SeverableLink> {
  const target = new URL(targetUrl);
  const live = new Set<Socket>();
  const held: Socket[] = [];
  let down = false;
  let accepted = 0;

  const relay = (client: Socket) => {
    const upstream = tcpConnect(Number(target.port), target.hostname);
    live.add(client);
    live.add(upstream);
    const drop = () => {
      live.delete(client);
      live.delete(upstream);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', drop).on('close', drop);
    upstream.on('error', drop).on('close', drop);
    client.pipe(upstream);
    upstream.pipe(client);
  };

  const server = createServer((client) => {
    accepted += 1;
    client.setNoDelay(true);
    if (down) {
      client.pause();
      client.on('error', () => client.destroy());
      held.push(client);
      return;
    }
    relay(client);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;

  return {
    url: `ws://127.0.0.1:${port}${target.pathname}`,
    connectionsAccepted: () => accepted,
    cut() {
      down = true;
      for (const socket of live) socket.resetAndDestroy();
      live.clear();
    },
    restore() {
      down = false;
      for (const client of held.splice(0)) {
        if (client.destroyed) continue;
        relay(client);
        client.resume();
      }
    },
    close() {
      for (const socket of [...live, ...held]) socket.destroy();
      return new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
