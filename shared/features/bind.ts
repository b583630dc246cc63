/**
 * RFC 6120 §7 resource binding (`urn:ietf:params:xml:ns:xmpp-bind`) and the legacy session
 * iq of RFC 3921 (`urn:ietf:params:xml:ns:xmpp-session`), answered with an empty result.
 */
import { randomBytes } from 'node:crypto';
import { clone, Element } from 'ltx';
import { deliverToResource } from '../delivery.ts';
import { errorReply, StanzaError, StreamError, streamErrorElement } from '../errors.ts';
import { bareJid, fullJid, fullJidOf, parseJid } from '../jid.ts';
import type { Router } from '../router.ts';
import { fitsResourceKey } from '../store/sessions.ts';
import type { Stream } from '../stream.ts';
import { NS } from '../xml/namespaces.ts';
import { endSession } from './presence.ts';
import { endSmSession } from './stream-management.ts';

export function advertise(features: Element): void {
  features.c('bind', { xmlns: NS.bind });
  // RFC 6121 Appendix E: the session feature is advertised as optional for old clients.
  features.c('session', { xmlns: NS.session }).c('optional');
}

export function register(router: Router): void {
  router.iq(['server'], 'set', NS.session, 'session', async () => undefined);
  router.iq(['server'], 'set', NS.bind, 'bind', async () => {
    throw new StanzaError('cancel', 'not-allowed', 'This stream already has a resource');
  });
}

function requestedResource(bind: Element): string | undefined {
  const text = bind.getChildText('resource');
  if (text === null || text === undefined || text.trim() === '') return undefined;
  return text.trim();
}

/** Before bind, the only stanza allowed is the bind request (RFC 6120 §7.1). */
export async function handleUnbound(stream: Stream, stanza: Element): Promise<void> {
  const bind = stanza.getChild('bind', NS.bind);
  if (
    stanza.name !== 'iq' ||
    stanza.attrs.type !== 'set' ||
    !bind ||
    stanza.getChildElements().length !== 1
  ) {
    throw new StreamError('not-authorized', 'Bind a resource first');
  }
  const { server } = stream;
  const user = stream.state.user as string;
  const wanted = requestedResource(bind);
  let resource: string;
  try {
    resource = wanted === undefined ? randomBytes(6).toString('hex') : parseJid(`${user}/${wanted}`).resource;
    if (!fitsResourceKey(resource)) throw new Error('resource too long for this server');
  } catch {
    // RFC 6120 §7.7.2.1: a resource that cannot be processed is bad-request.
    await stream.send(errorReply(stanza, new StanzaError('modify', 'bad-request', 'Invalid resource')));
    return;
  }

  const previous = await server.sessions.bindResource({
    user,
    resource,
    connectionId: stream.connectionId,
    available: false,
    priority: 0,
    boundAt: Date.now(),
  });
  if (previous && previous.connectionId !== stream.connectionId) {
    // RFC 6120 §7.7.2.2: the server's policy here is "override": the old session gets a
    // <conflict/> stream error and is closed, the new one binds.
    await server.outbound.send(
      previous.connectionId,
      streamErrorElement(new StreamError('conflict', 'Replaced by a new connection')),
    );
    await server.outbound.send(previous.connectionId, new Element('close', { xmlns: NS.framing }));
    await server.outbound.close(previous.connectionId);
    await endSession(server, {
      connectionId: previous.connectionId,
      connectedAt: previous.boundAt,
      streamOpen: false,
      authFailures: 0,
      // The resource row now belongs to this stream; only the old connection row goes.
    });
    // A stream-management session of the replaced stream ends too; what it had not delivered
    // is re-routed (possibly to this very resource once it is available, or offline).
    if (previous.smId) await endSmSession(server, previous.smId, 'any');
    if (previous.available) {
      const unavailable = new Element('presence', {
        from: fullJid(fullJidOf(user, resource)),
        type: 'unavailable',
      });
      for (const other of await server.sessions.listResources(user)) {
        if (other.available && other.connectionId !== stream.connectionId) {
          // Through the delivery path: a stream-management session numbers and queues it.
          await deliverToResource(server, other, clone(unavailable));
        }
      }
    }
  }
  stream.update({ resource });
  const result = new Element('iq', { type: 'result', id: stanza.attrs.id });
  result
    .c('bind', { xmlns: NS.bind })
    .c('jid')
    .t(`${bareJid(stream.jid)}/${resource}`);
  await stream.send(result);
}
