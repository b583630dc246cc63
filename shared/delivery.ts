/**
 * Delivering to a bound session. A 410 Gone on the way means the socket vanished without a
 * `$disconnect` reaching us yet: the session is ended on the spot (presence, resource row),
 * and the caller re-routes what must not be lost.
 */
import type { Element } from 'ltx';
import { endSession } from './features/presence.ts';
import { connectionVanished, deliverToSmSession } from './features/stream-management.ts';
import type { PostResult } from './outbound.ts';
import type { Server } from './server.ts';
import type { ResourceRecord } from './store/sessions.ts';

export async function deliverToResource(
  server: Server,
  resource: ResourceRecord,
  stanza: Element,
): Promise<PostResult> {
  if (resource.smId) return deliverToSmSession(server, resource.smId, stanza);
  const result = await server.outbound.send(resource.connectionId, stanza);
  if (result === 'gone') {
    server.log.info('connection gone on delivery', { connectionId: resource.connectionId });
    const state = await server.sessions.getConnection(resource.connectionId);
    if (state) await connectionVanished(server, resource.connectionId, state);
    else {
      // No row left (its $disconnect was lost): release the resource all the same.
      await endSession(server, {
        connectionId: resource.connectionId,
        connectedAt: resource.boundAt,
        streamOpen: false,
        authFailures: 0,
        user: resource.user,
        resource: resource.resource,
      });
    }
  }
  return result;
}
