/**
 * Stock xmpp.js clients (`@xmpp/client`) for end-to-end tests, as an application would use them.
 */
import { client as createClient, xml } from '@xmpp/client';
import WebSocket from 'ws';

// @xmpp/websocket uses the global WebSocket, which Node gets only from version 22.
(globalThis as { WebSocket?: unknown }).WebSocket ??= WebSocket;

export type XmppClient = ReturnType<typeof createClient>;
type Stanza = ReturnType<typeof xml>;

export interface ClientOptions {
  resource?: string;
  /** Force a mechanism; by default xmpp.js picks SCRAM-SHA-1 (the best it speaks). */
  mechanism?: 'PLAIN' | 'SCRAM-SHA-1';
  domain?: string;
  /** Keep xmpp.js's reconnect (and so XEP-0198 resumption) on; off by default. */
  reconnect?: boolean;
  /** Send `<presence/>` from the 'online' handler, as xmpp.js's README does. */
  presenceOnOnline?: boolean;
}

export interface StartedClient {
  xmpp: XmppClient;
  jid: string;
  /** Every stanza received, in order. */
  received: Stanza[];
  waitFor(match: (stanza: Stanza) => boolean, timeoutMs?: number): Promise<Stanza>;
  /**
   * Every stanza received before the server's answer to a ping sent now (a FIFO barrier, as
   * `RawClient.framesBeforePong`): asserts that nothing arrived, without waiting a fixed time.
   */
  stanzasBeforePong(timeoutMs?: number): Promise<Stanza[]>;
  stop(): Promise<void>;
}

export async function startClient(
  url: string,
  username: string,
  password: string,
  options: ClientOptions = {},
): Promise<StartedClient> {
  const xmpp = createClient({
    service: url,
    domain: options.domain ?? 'localhost',
    resource: options.resource,
    credentials: async (authenticate: (c: object, m: string) => Promise<void>, mechanisms: string[]) => {
      const mechanism = options.mechanism ?? mechanisms.find((m) => m !== 'PLAIN') ?? 'PLAIN';
      await authenticate({ username, password }, mechanism);
    },
  });
  // Tests decide when to reconnect.
  if (!options.reconnect) xmpp.reconnect.stop();
  xmpp.on('error', () => {});
  if (options.presenceOnOnline) xmpp.on('online', () => void xmpp.send(xml('presence')).catch(() => {}));
  const received: Stanza[] = [];
  const waiters = new Set<() => void>();
  xmpp.on('stanza', (stanza: Stanza) => {
    received.push(stanza);
    for (const wake of waiters) wake();
  });
  const address = await xmpp.start();
  let barriers = 0;
  const client: StartedClient = {
    xmpp,
    jid: address.toString(),
    received,
    waitFor(match, timeoutMs = 5000) {
      return new Promise((resolve, reject) => {
        let seen = 0;
        const check = () => {
          for (; seen < received.length; seen++) {
            const stanza = received[seen] as Stanza;
            if (match(stanza)) {
              waiters.delete(check);
              clearTimeout(timer);
              resolve(stanza);
              return;
            }
          }
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(
            new Error(`no matching stanza within ${timeoutMs} ms; got ${received.map(String).join('\n')}`),
          );
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
    async stanzasBeforePong(timeoutMs = 5000) {
      const id = `pong-barrier-${++barriers}`;
      await xmpp.send(xml('iq', { type: 'get', id }, xml('ping', { xmlns: 'urn:xmpp:ping' })));
      const pong = await client.waitFor((s) => s.is('iq') && s.attrs.id === id, timeoutMs);
      if (pong.attrs.type !== 'result') throw new Error(`ping answered with ${pong.toString()}`);
      return received.slice(0, received.indexOf(pong));
    },
    async stop() {
      xmpp.reconnect.stop();
      await xmpp.stop().catch(() => {});
    },
  };
  return client;
}
