/**
 * XEP-0199 XMPP Ping (v2.0.1), `urn:xmpp:ping`: the server answers for itself and for accounts:
 * the user's own, or a contact's that shares its presence with the requester (XEP-0030 §8's
 * rule); any other account, existing or not, gets the same service-unavailable.
 */
import type { Server } from '../core/host.ts';
import { mayQueryAccount } from '../core/router.ts';
import { StanzaError } from '../errors.ts';
import { bareJid } from '../jid.ts';
import { NS } from '../xml/namespaces.ts';

export function register(server: Server): void {
  server.host.add('disco-feature', NS.ping);
  // XEP-0199 §5: an entity that supports ping "MUST report that fact"; the server answers for
  // the account (its owner, and contacts it shares presence with), so the account reports it.
  server.host.add('disco-account-feature', NS.ping);
  // XEP-0199 §4.2: "the server MUST respond with an IQ-result" (or an error).
  server.host.iq(
    'get',
    NS.ping,
    'ping',
    async (request) => {
      if (request.to.local && !(await mayQueryAccount(server, bareJid(request.from), bareJid(request.to)))) {
        throw new StanzaError('cancel', 'service-unavailable');
      }
      return undefined;
    },
    { repeatable: true },
  );
}
