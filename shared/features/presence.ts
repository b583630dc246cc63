/**
 * RFC 6121 §4 presence, without subscriptions yet: a session's broadcast presence reaches the
 * user's own resources only; directed presence reaches the local JID it names. Nothing about
 * a user's availability leaks to other users.
 */
import { clone, Element, parse } from 'ltx';
import { deliverToResource } from '../delivery.ts';
import { StanzaError } from '../errors.ts';
import { bareJid, fullJid, fullJidOf, type Jid, parseJid } from '../jid.ts';
import type { Router } from '../router.ts';
import type { Server } from '../server.ts';
import type { ConnectionState, ResourceRecord } from '../store/sessions.ts';
import type { Stream } from '../stream.ts';
import { floodOffline } from './offline-storage.ts';

export function register(_router: Router): void {
  // Presence has no iq handlers; it is dispatched by the router for every presence stanza.
}

/** RFC 6121 §4.7.2.3: priority is an integer from -128 to +127, default 0. */
function priorityOf(stanza: Element): number {
  const text = stanza.getChildText('priority');
  if (text === null || text === undefined) return 0;
  const value = Number(text.trim());
  if (!Number.isInteger(value) || value < -128 || value > 127) {
    throw new StanzaError('modify', 'bad-request', 'priority must be an integer from -128 to 127');
  }
  return value;
}

async function broadcastToOwnResources(
  server: Server,
  user: string,
  stanza: Element,
  options: { exceptConnectionId?: string; resources?: ResourceRecord[] },
): Promise<ResourceRecord[]> {
  const resources = options.resources ?? (await server.sessions.listResources(user));
  for (const resource of resources) {
    if (!resource.available || resource.connectionId === options.exceptConnectionId) continue;
    await deliverToResource(server, resource, clone(stanza));
  }
  return resources;
}

export async function handleFromClient(stream: Stream, stanza: Element, to: Jid | undefined): Promise<void> {
  const type = stanza.attrs.type;
  if (to === undefined) {
    if (type === undefined) return becomeAvailable(stream, stanza);
    if (type === 'unavailable') return becomeUnavailable(stream, stanza);
    // Subscription requests and probes need a roster (a later feature): not served yet.
    return;
  }
  if (type !== undefined && type !== 'unavailable' && type !== 'error') return;
  const { server } = stream;
  if (to.domain !== server.config.domain || !to.local) return;
  if (type !== 'error') rememberDirected(stream, fullJid(to), type === undefined);
  await deliverDirected(server, to, stanza);
}

/** Directed presence to a full JID goes to that resource; to a bare JID, to every available one. */
async function deliverDirected(server: Server, to: Jid, stanza: Element): Promise<void> {
  const resources = await server.sessions.listResources(bareJid(to));
  for (const resource of resources) {
    if (to.resource ? resource.resource === to.resource : resource.available) {
      await deliverToResource(server, resource, clone(stanza));
    }
  }
}

/** Bounded: a session that directs presence at more JIDs than this stops tracking new ones. */
const MAX_DIRECTED = 100;

function rememberDirected(stream: Stream, jid: string, available: boolean): void {
  const current = stream.state.directedTo ?? [];
  const next = available
    ? current.includes(jid) || current.length >= MAX_DIRECTED
      ? current
      : [...current, jid]
    : current.filter((entry) => entry !== jid);
  if (next !== current) stream.update({ directedTo: next.length > 0 ? next : undefined });
}

/**
 * RFC 6121 §4.6.3: when the session becomes unavailable, "the user's server MUST send
 * unavailable presence" to the entities it sent directed presence to.
 */
export async function tellDirectedRecipients(
  server: Server,
  from: string,
  directedTo: string[] | undefined,
): Promise<void> {
  for (const jid of directedTo ?? []) {
    await deliverDirected(
      server,
      parseJid(jid),
      new Element('presence', { from, to: jid, type: 'unavailable' }),
    );
  }
}

async function becomeAvailable(stream: Stream, stanza: Element): Promise<void> {
  const { server } = stream;
  const user = stream.state.user as string;
  const resource = stream.state.resource as string;
  const priority = priorityOf(stanza);
  const previous = await server.sessions.updatePresence(user, resource, stream.connectionId, {
    available: true,
    priority,
    presence: stanza.toString(),
  });
  if (!previous) return;
  const initial = !previous.available;
  // RFC 6121 §4.2.2: initial presence goes to all of the user's available resources,
  // including the one that sent it; later updates likewise.
  const others = await broadcastToOwnResources(server, user, stanza, {});
  if (initial) {
    for (const other of others) {
      if (other.connectionId === stream.connectionId || !other.available || !other.presence) continue;
      await stream.send(parse(other.presence));
    }
  }
  // XEP-0160 §3: stored messages go out "when the recipient next sends non-negative available
  // presence": the first such presence of the session, even if an earlier one was negative.
  if (priority >= 0 && !stream.state.flooded) await floodOffline(stream, others);
}

async function becomeUnavailable(stream: Stream, stanza: Element): Promise<void> {
  const { server } = stream;
  const user = stream.state.user as string;
  const previous = await server.sessions.updatePresence(
    user,
    stream.state.resource as string,
    stream.connectionId,
    {
      available: false,
      priority: 0,
      presence: '',
    },
  );
  if (previous?.available) {
    await broadcastToOwnResources(server, user, stanza, { exceptConnectionId: stream.connectionId });
  }
  await tellDirectedRecipients(server, fullJid(stream.jid), stream.state.directedTo);
  stream.update({ directedTo: undefined });
}

/** The session is over (clean close, stream error, vanished socket): release and announce. */
export async function endSession(server: Server, state: ConnectionState): Promise<void> {
  if (state.user && state.resource) {
    const released: ResourceRecord | undefined = await server.sessions.releaseResource(
      state.user,
      state.resource,
      state.connectionId,
    );
    if (released?.available) {
      const unavailable = new Element('presence', {
        from: fullJid(fullJidOf(state.user, state.resource)),
        type: 'unavailable',
      });
      await broadcastToOwnResources(server, state.user, unavailable, {});
    }
    await tellDirectedRecipients(server, fullJid(fullJidOf(state.user, state.resource)), state.directedTo);
  }
  await server.sessions.deleteConnection(state.connectionId);
}
