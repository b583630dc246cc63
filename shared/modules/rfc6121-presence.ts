/**
 * RFC 6121 §4 presence, the user's side: a session's broadcast presence reaches the user's own
 * resources (§4.2.2, §4.4.2) and fires `availability-changed`, which the roster module hooks to
 * reach the contacts subscribed to it and to probe the contacts it is subscribed to; directed
 * presence reaches the local JID it names (§4.6). When a session ends in any way, its available
 * presence is withdrawn from the user's other resources and from directed-presence recipients
 * (the roster module takes those that are contacts first, so none is told twice).
 */
import { clone, Element, parse } from 'ltx';
import { deliver } from '../core/delivery.ts';
import { frameTime } from '../core/frame.ts';
import { type BoundStream, HANDLED, type Server, type StanzaEvent } from '../core/host.ts';
import { StanzaError, StreamError } from '../errors.ts';
import { bareJid, fullJid, fullJidOf, type Jid, parseJid } from '../jid.ts';
import type { ResourceRecord } from '../store/sessions.ts';
import { NS } from '../xml/namespaces.ts';

export function register(server: Server): void {
  const { host } = server;
  for (const target of ['bare', 'full', 'host'] as const) {
    host.hook(`presence/${target}`, (event) => presenceFromClient(event));
  }
  host.hook('session-ended', async ({ session, wasAvailable }) => {
    const from = fullJid(fullJidOf(session.user, session.resource));
    if (wasAvailable) {
      await broadcastToOwnResources(
        server,
        session.user,
        new Element('presence', { from, type: 'unavailable' }),
      );
    }
    await tellDirectedRecipients(server, from, session.directedTo);
    return undefined;
  });
  // A deleted account's stream (core/stream.ts): its resource row is gone, so no session-ended
  // comes; its directed-presence recipients are told here (the roster module took its contacts).
  host.hook('stream-revoked', async ({ user, resource, directedTo }) => {
    if (resource) await tellDirectedRecipients(server, fullJid(fullJidOf(user, resource)), directedTo);
    return undefined;
  });
}

/**
 * RFC 6121 §4.7.2.3: priority is an integer from -128 to +127 (`xs:byte`), default 0. Written as
 * an integer (an optional sign and digits, leading zeros allowed, XML whitespace around it):
 * `1e2`, `0x10`, `5.0` or an empty element would be taken as a number here and forwarded as
 * written, read otherwise by the clients that get it.
 */
function priorityOf(stanza: Element): number {
  const text = stanza.getChildText('priority');
  if (text === null || text === undefined) return 0;
  // XML's own whitespace only around it (String.trim would take a no-break space too).
  const digits = /^[\t\n\r ]*([+-]?\d+)[\t\n\r ]*$/.exec(text)?.[1];
  const value = digits === undefined ? Number.NaN : Number(digits);
  if (!Number.isInteger(value) || value < -128 || value > 127) {
    throw new StanzaError('modify', 'bad-request', 'priority must be an integer from -128 to 127');
  }
  return value;
}

async function broadcastToOwnResources(
  server: Server,
  user: string,
  stanza: Element,
  options: { exceptConnectionId?: string; resources?: ResourceRecord[] } = {},
): Promise<ResourceRecord[]> {
  const resources = options.resources ?? (await server.sessions.listResources(user));
  for (const resource of resources) {
    if (!resource.available || resource.connectionId === options.exceptConnectionId) continue;
    await deliver(server, resource, clone(stanza));
  }
  return resources;
}

/** The largest available presence a session may broadcast (its status, caps, avatar hash…). */
export const MAX_PRESENCE_BYTES = 8 * 1024;

/** RFC 6121 §4.7.1's values of 'type' (none: available). */
const PRESENCE_TYPES = new Set([
  'error',
  'probe',
  'subscribe',
  'subscribed',
  'unavailable',
  'unsubscribe',
  'unsubscribed',
]);

async function presenceFromClient(event: StanzaEvent): Promise<typeof HANDLED> {
  const { stream, stanza } = event;
  const type = stanza.attrs.type;
  // RFC 6121 §4.7.1: "If the value of the 'type' attribute is not one of the foregoing values,
  // the recipient or an intermediate router SHOULD return a stanza error of <bad-request/>."
  if (type !== undefined && !PRESENCE_TYPES.has(type))
    throw new StanzaError('modify', 'bad-request', `unknown presence type '${type}'`);
  if (event.self) {
    // The broadcast presence is kept on the resource row, which every message to the user's bare
    // JID, every probe answer and every contact's presence broadcast reads.
    if (type === undefined) {
      const presence = stanza.toString();
      if (Buffer.byteLength(presence, 'utf8') > MAX_PRESENCE_BYTES)
        throw new StanzaError(
          'modify',
          'policy-violation',
          `presence is limited to ${MAX_PRESENCE_BYTES} bytes`,
        );
      await becomeAvailable(stream, stanza, presence);
    }
    if (type === 'unavailable') await becomeUnavailable(stream, stanza);
    // Subscription requests and probes to oneself: "No self contacts" (the roster refuses the
    // user's own JID), so there is nothing to subscribe to or probe.
    return HANDLED;
  }
  if (type !== undefined && type !== 'unavailable' && type !== 'error') return HANDLED;
  const { server } = stream;
  const to = event.to;
  if (to.domain !== server.config.domain) {
    // RFC 6120 §10.4.3: the remote domain cannot be reached (no server-to-server here); the
    // sender is told, as for a message or an iq (a multi-user chat join is directed presence).
    if (type === 'error') return HANDLED;
    throw new StanzaError('cancel', 'remote-server-not-found', 'Server-to-server is not available');
  }
  if (!to.local) return HANDLED;
  // The user's own resources are not "entities it sent directed presence to": they get the
  // session's unavailable presence anyway (§4.5.2), and would get it twice.
  if (type !== 'error' && bareJid(to) !== stream.user)
    rememberDirected(stream, fullJid(to), type === undefined);
  await deliverDirected(server, to, stanza);
  return HANDLED;
}

/** Directed presence to a full JID goes to that resource; to a bare JID, to every available one. */
async function deliverDirected(server: Server, to: Jid, stanza: Element): Promise<void> {
  const resources = await server.sessions.listResources(bareJid(to));
  for (const resource of resources) {
    if (to.resource ? resource.resource === to.resource : resource.available) {
      await deliver(server, resource, clone(stanza));
    }
  }
}

/**
 * Bounded: a session that directs presence at more JIDs than this, or at JIDs of more bytes in
 * all, stops tracking new ones. The list lives on the connection row (and the stream-management
 * item at a detach), which every frame rewrites: its size is billed on each.
 */
const MAX_DIRECTED = 100;
export const MAX_DIRECTED_BYTES = 8 * 1024;

function rememberDirected(stream: BoundStream, jid: string, available: boolean): void {
  const current = stream.state.directedTo ?? [];
  const bytes = current.reduce((sum, entry) => sum + Buffer.byteLength(entry, 'utf8'), 0);
  const full = current.length >= MAX_DIRECTED || bytes + Buffer.byteLength(jid, 'utf8') > MAX_DIRECTED_BYTES;
  const next = available
    ? current.includes(jid) || full
      ? current
      : [...current, jid]
    : current.filter((entry) => entry !== jid);
  if (next !== current) stream.update({ directedTo: next.length > 0 ? next : undefined });
}

/**
 * RFC 6121 §4.6.3: when the session becomes unavailable, "the user's server MUST send
 * unavailable presence" to the entities it sent directed presence to.
 */
async function tellDirectedRecipients(
  server: Server,
  from: string,
  directedTo: string[] | undefined,
  stanza?: Element,
): Promise<void> {
  for (const jid of directedTo ?? []) {
    const presence = new Element('presence', { from, to: jid, type: 'unavailable' });
    // The client's own unavailable presence, when it sent one: its status and extensions too,
    // as its contacts get them (RFC 6121 §4.5.2).
    for (const child of stanza?.children ?? []) {
      if (typeof child !== 'string') presence.cnode(clone(child));
    }
    await deliverDirected(server, parseJid(jid), presence);
  }
}

/**
 * What is kept of an unavailable presence for RFC 6121 §4.3.2 ("the full XML of the last presence
 * stanza of type 'unavailable' received by the server from the contact"): its children, in a bare
 * `<presence/>`, without delay stamps (the probe's answer carries the server's own). Addresses and
 * id are the answer's.
 */
function keptUnavailable(stanza: Element): string {
  const kept = new Element('presence');
  for (const child of stanza.children) {
    if (typeof child === 'string') continue;
    if ((child.name === 'delay' && child.attrs.xmlns === NS.delay) || child.attrs.xmlns === 'jabber:x:delay')
      continue;
    kept.cnode(clone(child));
  }
  return kept.children.length === 0 ? '' : kept.toString();
}

/** `presence`: the stanza serialised, as it is stored on the resource row. */
async function becomeAvailable(stream: BoundStream, stanza: Element, presence: string): Promise<void> {
  const { server } = stream;
  const priority = priorityOf(stanza);
  const changing = { stream, priority, hold: false };
  await server.host.fire('availability-changing', changing);
  const previous = await server.sessions.updatePresence(stream.user, stream.resource, stream.connectionId, {
    available: true,
    priority,
    presence,
    ...(changing.hold ? { hold: true } : {}),
    ...(stream.frameId ? { frame: stream.frameId } : {}),
  });
  // The resource row is gone or another connection's (a resume of the session this stream
  // replaced landed after its bind, or the session was ended from outside): this stream is no
  // longer routable and must not go on as if it were. RFC 6120 §7.7.2.2, the server's policy for
  // a resource bound twice is that the other session is terminated with <conflict/>.
  if (!previous) throw new StreamError('conflict', 'This session no longer holds its resource');
  // RFC 6121 §4.2: the initial presence, also when this frame is that presence handled again (an
  // invocation that timed out, a failure after the resource became available): its probes, the
  // other resources' presence and the pending subscription requests are owed all the same.
  const initial =
    !previous.available || (stream.frameId !== '' && previous.availableFrame === stream.frameId);
  // RFC 6121 §4.2.2: initial presence goes to all of the user's available resources,
  // including the one that sent it; later updates likewise.
  const resources = await broadcastToOwnResources(server, stream.user, stanza);
  if (initial) {
    for (const other of resources) {
      if (other.connectionId === stream.connectionId || !other.available || !other.presence) continue;
      await stream.send(parse(other.presence));
    }
  }
  await server.host.fire('availability-changed', {
    stream,
    stanza,
    available: true,
    initial,
    priority,
    resources,
    ...(changing.hold ? { held: previous.held ?? 0 } : {}),
  });
}

async function becomeUnavailable(stream: BoundStream, stanza: Element): Promise<void> {
  const { server } = stream;
  const previous = await server.sessions.updatePresence(stream.user, stream.resource, stream.connectionId, {
    available: false,
    priority: 0,
    presence: '',
    unavailable: keptUnavailable(stanza),
    // The frame's own time: a redelivery of it stamps the same.
    unavailableAt: frameTime(),
    ...(stream.frameId ? { frame: stream.frameId } : {}),
  });
  // Also when this frame is the presence that made it unavailable, handled again (its first
  // attempt failed after the write): the contacts and the other resources are still owed it, and
  // nothing later would tell them (the session's end finds the resource unavailable).
  const wasAvailable =
    previous?.available === true || (stream.frameId !== '' && previous?.unavailableFrame === stream.frameId);
  let resources: ResourceRecord[] = [];
  if (wasAvailable) {
    resources = await broadcastToOwnResources(server, stream.user, stanza, {
      exceptConnectionId: stream.connectionId,
    });
  }
  if (wasAvailable) {
    // Fired first: the roster module tells the contacts subscribed to the user and drops them
    // from `directedTo`, so a contact that also had directed presence is told once.
    await server.host.fire('availability-changed', {
      stream,
      stanza,
      available: false,
      initial: false,
      priority: 0,
      resources,
    });
  }
  await tellDirectedRecipients(server, fullJid(stream.jid), stream.state.directedTo, stanza);
  stream.update({ directedTo: undefined });
}
