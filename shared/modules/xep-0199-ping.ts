/** XEP-0199 XMPP Ping (v2.0.1), `urn:xmpp:ping`: the server answers for itself and for accounts. */
import type { Server } from '../core/host.ts';
import { NS } from '../xml/namespaces.ts';

export function register(server: Server): void {
  server.host.add('disco-feature', NS.ping);
  // XEP-0199 §4.2: "the server MUST respond with an IQ-result" (or an error).
  server.host.iq('get', NS.ping, 'ping', async () => undefined);
}
