/** XEP-0199 XMPP Ping (v2.0.1), `urn:xmpp:ping`: the server answers for itself and for accounts. */
import type { Router } from '../router.ts';
import { NS } from '../xml/namespaces.ts';

export function register(router: Router): void {
  router.feature(NS.ping);
  // XEP-0199 §4.2: "the server MUST respond with an IQ-result" (or an error).
  router.iq(['server', 'account'], 'get', NS.ping, 'ping', async () => undefined);
}
