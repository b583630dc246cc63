/**
 * Every dispatch rule of the server (RFC 6120 §8, §10; RFC 6121 §8.5): a stanza from a bound
 * client is stamped, checked and fired as `<kind>/<target>` so modules can take it; what no
 * module takes is routed here. Messages go to resources or, through `message-offline`, to
 * storage; iqs to the handler registered for their payload; a thrown StanzaError becomes the
 * error reply.
 */
import { Element } from 'ltx';
import { StanzaError, StreamError } from '../errors.ts';
import { bareJid, fullJid, type Jid, parseJid } from '../jid.ts';
import { isHeld, type ResourceRecord } from '../store/sessions.ts';
import { congestedError, deliver, fitsDelivery, fitsTransport, tooLargeError } from './delivery.ts';
import { inFrame, storedOfflineBefore } from './frame.ts';
import {
  type BoundStream,
  DEFERRED_RESULT,
  type IqHandler,
  type IqTarget,
  type Server,
  type StanzaEvent,
  type StanzaEventName,
  type StanzaKind,
  type StanzaTarget,
  type UndeliveredStanza,
} from './host.ts';
import { errorReplyTo, iqResult, removeForgedDelay, stampDelay } from './stanzas.ts';
import { isTransient, withTransientRetries } from './transient.ts';

/**
 * The error for a stanza the server gave up on outside its sender's frame (a re-route), sent
 * to the sender's full JID when it is a session of this server still bound; otherwise dropped
 * (an error is never stored).
 */
async function bounceToLocalSender(server: Server, stanza: Element, error: StanzaError): Promise<void> {
  let reply = errorReplyTo(stanza, error);
  // As replyWithError: one too large to post with the original payload goes without it.
  if (reply && !fitsDelivery(reply, server.config.domain))
    reply = errorReplyTo(new Element(stanza.name, { ...stanza.attrs }), error);
  if (!reply || !stanza.attrs.from) return;
  const sender = parseJid(stanza.attrs.from);
  if (!sender.local || !sender.resource || sender.domain !== server.config.domain) return;
  const resource = await server.sessions.getResource(bareJid(sender), sender.resource);
  try {
    if (resource) await deliver(server, resource, reply, { reply: true });
  } catch (failure) {
    if (!(failure instanceof StanzaError)) throw failure;
  }
}

/** Replies to a stanza with an error unless it is itself an error (or an iq result). */
export async function replyWithError(
  stream: BoundStream,
  stanza: Element,
  error: StanzaError,
): Promise<void> {
  let reply = errorReplyTo(stanza, error);
  // RFC 6120 §8.3.1 lets the error carry the original payload; one too large to post (a stanza
  // refused for its size, XEP-0478) goes without it, so that the error itself can be sent.
  if (reply && !fitsDelivery(reply, stream.server.config.domain))
    reply = errorReplyTo(new Element(stanza.name, { ...stanza.attrs }), error);
  if (reply) await stream.send(reply);
}

function targetOf(to: Jid | undefined): StanzaTarget {
  if (!to) return 'bare';
  if (!to.local) return 'host';
  return to.resource ? 'full' : 'bare';
}

/** A stanza from a bound client: stamp its sender, check its address and size, route it. */
export async function routeFromClient(stream: BoundStream, stanza: Element): Promise<void> {
  const { server } = stream;
  // docs/design.md: "A stanza's from is always rewritten by the server."
  stanza.attrs.from = fullJid(stream.jid);
  // XEP-0203: a delay "from" this server is the server's own stamp (of an offline or re-routed
  // message); one a client wrote would tell its recipient the server delayed the stanza.
  if (stanza.name !== 'iq') removeForgedDelay(stanza, server.config.domain);
  // RFC 6120 §4.7.4: "the receiving entity SHOULD add the 'xml:lang' attribute to the stanza when
  // routing it to a remote server or delivering it to a connected client" (the stream's, when
  // the stanza has none and the stream's is not the server's own, which recipients inherit).
  if (stream.state.lang !== undefined && stanza.attrs['xml:lang'] === undefined)
    stanza.attrs['xml:lang'] = stream.state.lang;
  try {
    let to: Jid | undefined;
    if (stanza.attrs.to !== undefined) {
      to = parseJid(stanza.attrs.to);
      stanza.attrs.to = fullJid(to);
    }
    // XEP-0478: what could never be sent on is refused now, never stored or queued.
    if (!fitsTransport(stanza, server.config.domain)) throw tooLargeError();
    const event: StanzaEvent = {
      stream,
      stanza,
      from: stream.jid,
      to: to ?? { ...stream.jid, resource: '' },
      self: to === undefined,
    };
    const kind = stanza.name as StanzaKind;
    const name: StanzaEventName = `${kind}/${targetOf(to)}`;
    if (await server.host.fire(name, event)) return;
    if (kind === 'message') await routeMessage(server, stanza, event.to);
    else if (kind === 'iq') await routeIq(event);
    // Presence nobody took is dropped (the presence module takes every kind it serves).
  } catch (error) {
    if (error instanceof StanzaError) return replyWithError(stream, stanza, error);
    // A module ends the stream (RFC 6120 §4.9): the stream answers with the error and closes.
    if (isTransient(error) || error instanceof StreamError) throw error;
    server.log.error('stanza failed', { connectionId: stream.connectionId, error });
    await replyWithError(stream, stanza, new StanzaError('cancel', 'internal-server-error'));
  }
}

export function messageType(stanza: Element): string {
  const type = stanza.attrs.type;
  // RFC 6121 §5.2.2: an unknown type is treated as normal.
  return ['chat', 'error', 'groupchat', 'headline', 'normal'].includes(type) ? type : 'normal';
}

/**
 * RFC 6121 §8.5.2.1: which of a user's resources a message to the bare JID goes to. Headline:
 * every available resource with a non-negative priority (§8.5.2.1.1 allows all); normal and
 * chat: "the server MUST deliver the message to the 'most available' resource or resources"
 * — here all with the highest non-negative priority.
 */
export function messageTargets(type: string, resources: ResourceRecord[]): ResourceRecord[] {
  const candidates = resources.filter((r) => r.available && r.priority >= 0);
  if (type === 'headline') return candidates;
  const top = Math.max(...candidates.map((r) => r.priority));
  return candidates.filter((r) => r.priority === top);
}

export interface RouteOptions {
  /**
   * The message was accepted earlier (re-routed from an ended stream-management session): it
   * carries a delay stamp of this time on delivery, and offline storage keeps this time.
   */
  originalTime?: number;
  /**
   * Sessions a re-routed copy's first routing gave the message to (UndeliveredStanza.alsoTo, by
   * `sessionIdentity`): those still there have it, and are not given it again.
   */
  alsoTo?: string[];
}

/**
 * Puts a message on one resource; fires `message-routed` when the session took it. 'full': a
 * congested stream-management queue, which makes a client's sender wait (resource-constraint)
 * unless another resource takes the message; a message being re-routed, which nobody can
 * resend, goes on to the next resource or to offline storage instead (false).
 */
async function deliverMessage(
  server: Server,
  resource: ResourceRecord,
  stanza: Element,
  rerouting: boolean,
  alsoTo: string[],
): Promise<boolean | 'full'> {
  const result = await deliver(server, resource, stanza, alsoTo.length > 0 ? { alsoTo } : {});
  if (result === 'full' && !rerouting) return 'full';
  if (result !== 'sent') return false;
  await server.host.fire('message-routed', { stanza, to: resource });
  return true;
}

/** An earlier delivery of the current frame queued its message in the resource's session. */
async function queuedBefore(server: Server, resource: ResourceRecord): Promise<boolean> {
  const queue = server.host.stanzaQueue;
  return resource.smId !== undefined && queue !== undefined && (await queue.queuedBefore(resource.smId));
}

/** Tries of one routing whose stored message's condition failed (something changed meanwhile). */
const ROUTE_ATTEMPTS = 4;

/** Sessions a queued copy names at most (DeliveryOptions.alsoTo): past them, a re-route may repeat it. */
const MAX_ALSO_TO = 8;

/**
 * A session as a re-route recognises it: its stream-management session (the same across a
 * resume, and its own queue holds its copy), else its connection. Not the resource's name: a
 * client that connected again under the same name, or another device, never had the message.
 */
function sessionIdentity(resource: ResourceRecord): string {
  return resource.smId ?? resource.connectionId;
}

/**
 * Routes a message to a local or remote JID (RFC 6121 §8.5). Throws the StanzaError the sender
 * gets back; returns quietly when the message was delivered, stored or dropped.
 */
export async function routeMessage(
  server: Server,
  stanza: Element,
  to: Jid,
  options: RouteOptions = {},
): Promise<void> {
  const type = messageType(stanza);
  if (to.domain !== server.config.domain) {
    throw new StanzaError('cancel', 'remote-server-not-found', 'Server-to-server is not available');
  }
  if (!to.local) {
    if (type === 'error') return;
    throw new StanzaError('cancel', 'service-unavailable');
  }
  if (options.originalTime !== undefined) stampDelay(stanza, server.config.domain, options.originalTime);
  // Storing is conditional on what routing read (a hold, no resource available): when that
  // changed before the store, the message is routed again from a fresh read. The last try
  // stores without the condition rather than fail the sender.
  const progress: RouteProgress = { reached: new Set(), storedBehind: false };
  // An earlier delivery of this frame stored the message (its transaction ran, its answer was
  // lost): stored is delivered, though the recipient may be online now (and have had it). Behind
  // a flood's hold: that resource's flood (its session's, resumed or not, or a later one's)
  // delivers it; the others are routed as usual.
  const stored = options.originalTime === undefined ? storedOfflineBefore(bareJid(to)) : undefined;
  if (stored) {
    server.log.debug('message stored by an earlier delivery of its frame', {
      id: stanza.attrs.id,
      user: bareJid(to),
      ...stored,
    });
    if (stored.heldFor === undefined) return;
    progress.storedBehind = true;
    progress.storedFor = stored.heldFor;
  }
  for (let attempt = 1; ; attempt++) {
    const routed = await routeOnce(server, stanza, to, type, options, attempt < ROUTE_ATTEMPTS, progress);
    if (routed) return;
  }
}

/** What the tries of one routing have done: a session already reached is not given it again. */
interface RouteProgress {
  /** Connections that took the message (posted, queued, or stored behind their flood). */
  reached: Set<string>;
  /** Those sessions (sessionIdentity), in the order they took it. */
  reachedSessions?: string[];
  /** Stored behind a flood's hold: once is enough, every holder floods the one inbox. */
  storedBehind: boolean;
  /** The resource an earlier delivery of the frame stored it behind (its flood delivers it). */
  storedFor?: string;
}

/** One routing of a message from a fresh read of the resources; false when it must start over. */
async function routeOnce(
  server: Server,
  stanza: Element,
  to: Jid,
  type: string,
  options: RouteOptions,
  guarded: boolean,
  progress: RouteProgress,
): Promise<boolean> {
  const bare = bareJid(to);
  const rerouting = options.originalTime !== undefined;
  let resources = await server.sessions.listResources(bare);
  const noneAvailable = resources.every((r) => !r.available);
  const offline = { stanza, user: bare, ...(rerouting ? { acceptedAt: options.originalTime } : {}) };
  /**
   * Delivered (or stored behind the resource's hold, once), false to try the next, 'full' (its
   * queue is congested) likewise; undefined: start over.
   */
  const toResource = async (resource: ResourceRecord): Promise<boolean | 'full' | undefined> => {
    if (progress.reached.has(resource.connectionId) || resource.resource === progress.storedFor) return true;
    // A re-routed copy: this resource had the message from its first routing (or its session's
    // queue holds it, and its own end re-routes that copy).
    if (!to.resource && options.alsoTo?.includes(sessionIdentity(resource))) return true;
    // Behind a flood's hold a message is stored for the flood to deliver; but not one an earlier
    // delivery of its frame queued in the resource's XEP-0198 session already: the session gets
    // it there (a second copy would reach the client from the flood too).
    if (isHeld(resource) && guarded && !(await queuedBefore(server, resource))) {
      if (progress.storedBehind) return true;
      const event = { ...offline, heldBy: resource, routeAgain: false };
      const taken = await server.host.fire('message-offline', event);
      server.log.debug('message behind a flood', {
        id: stanza.attrs.id,
        user: bare,
        resource: resource.resource,
        taken: Boolean(taken),
        routeAgain: event.routeAgain,
      });
      if (taken) {
        progress.storedBehind = true;
        progress.reached.add(resource.connectionId);
        return true;
      }
      if (event.routeAgain) return undefined;
    }
    // To a bare JID, the sessions given it so far go with a stream-management copy (alsoTo).
    const alsoTo = to.resource ? [] : (progress.reachedSessions ?? []).slice(0, MAX_ALSO_TO);
    const delivered = await deliverMessage(server, resource, stanza, rerouting, alsoTo);
    server.log.debug('message to a session', {
      id: stanza.attrs.id,
      connectionId: resource.connectionId,
      smId: resource.smId,
      delivered,
      rerouting,
    });
    if (delivered === true) {
      progress.reached.add(resource.connectionId);
      progress.reachedSessions = [...(progress.reachedSessions ?? []), sessionIdentity(resource)];
    }
    return delivered;
  };

  if (to.resource) {
    const exact = resources.find((r) => r.resource === to.resource);
    // RFC 6121 §8.5.3.1: a connected resource that exactly matches gets the stanza.
    if (exact) {
      const done = await toResource(exact);
      if (done === undefined) return false;
      // The resource the sender chose is there but not keeping up: the sender waits.
      if (done === 'full') throw congestedError();
      if (done) return true;
      resources = resources.filter((r) => r !== exact);
    }
    // RFC 6121 §8.5.3.2.1: otherwise groupchat is refused, error dropped, and a headline (news
    // for one resource, worthless to another) silently ignored; chat and normal go to the bare
    // JID (as Prosody and ejabberd do for normal).
    if (type === 'headline') return true;
  }
  if (type === 'groupchat') throw new StanzaError('cancel', 'service-unavailable');
  if (type === 'error') return true;

  // RFC 6121 §8.5.2.1.1: to the "most available" resources. One whose queue is congested does not
  // keep the message from the others, nor turn a message they took into an error to the sender;
  // when none took it, the next most available do. Only when no available resource could take
  // it does the sender wait (resource-constraint): it is not stored while one is online.
  let congested = false;
  for (;;) {
    // Sessions with stream management last: a copy queued there (a detached one's, above all)
    // then names the sessions that had it before (alsoTo), which its re-route passes over.
    const targets = messageTargets(type, resources).sort(
      (a, b) => Number(a.smId !== undefined) - Number(b.smId !== undefined),
    );
    if (targets.length === 0) break;
    let delivered = false;
    for (const target of targets) {
      const done = await toResource(target);
      if (done === undefined) return false;
      if (done === true) delivered = true;
      else {
        if (done === 'full') congested = true;
        resources = resources.filter((r) => r !== target);
      }
    }
    if (delivered) return true;
  }
  if (congested && progress.reached.size === 0) throw congestedError();
  if (type === 'headline') return true;
  // An earlier try reached a session, and the sessions it could still reach are gone now.
  if (progress.reached.size > 0) return true;
  if (resources.length === 0 && !(await server.users.exists(bare))) {
    throw new StanzaError('cancel', 'service-unavailable');
  }
  const event = {
    ...offline,
    ...(noneAvailable && guarded ? { noneAvailable: true } : {}),
    routeAgain: false,
  };
  const taken = await server.host.fire('message-offline', event);
  server.log.debug('message to offline storage', {
    id: stanza.attrs.id,
    user: bare,
    taken: Boolean(taken),
    routeAgain: event.routeAgain,
  });
  if (event.routeAgain) return false;
  // RFC 6121 §8.5.2.2.1: without offline storage, "the server MUST return a <service-unavailable/>".
  if (!taken) throw new StanzaError('cancel', 'service-unavailable');
  return true;
}

async function routeIq(event: StanzaEvent): Promise<void> {
  const { stream, stanza } = event;
  const { server } = stream;
  const to = event.self ? undefined : event.to;
  const type = stanza.attrs.type;
  if (type === 'result' || type === 'error') {
    // Responses go only to the full JID they answer; anything else is dropped (RFC 6120 §8.2.3).
    // RFC 6121 §8.5.3.1: "For an IQ stanza of type 'result' or 'error', the server MUST deliver
    // the stanza to the resource": a requester's congested stream-management queue takes it
    // within the margin its own answers get.
    if (to?.local && to.resource && to.domain === server.config.domain) {
      const resource = await server.sessions.getResource(bareJid(to), to.resource);
      const result = resource ? await deliver(server, resource, stanza, { reply: true }) : undefined;
      if (result === 'full')
        server.log.warn('iq response not delivered: the requester’s queue is full past its margin', {
          connectionId: resource?.connectionId,
        });
    }
    return;
  }
  if (type !== 'get' && type !== 'set')
    throw new StanzaError('modify', 'bad-request', 'iq type must be get or set');
  if (stanza.attrs.id === undefined) throw new StanzaError('modify', 'bad-request', 'iq needs an id');
  const children = stanza.getChildElements();
  // RFC 6120 §8.2.3: "An IQ stanza of type "get" or "set" MUST contain exactly one child element".
  if (children.length !== 1)
    throw new StanzaError('modify', 'bad-request', 'get and set carry exactly one child');
  const payload = children[0] as Element;

  if (to && to.domain !== server.config.domain) {
    throw new StanzaError('cancel', 'remote-server-not-found', 'Server-to-server is not available');
  }
  if (to?.local && to.resource) {
    const resource = await server.sessions.getResource(bareJid(to), to.resource);
    const result = resource ? await deliver(server, resource, stanza) : 'gone';
    if (result === 'full') throw congestedError();
    if (result !== 'sent') throw new StanzaError('cancel', 'service-unavailable');
    return;
  }
  // RFC 6120 §10.3.3: an iq without 'to' is handled "directly on behalf of the account" (a
  // disco#info without 'to' describes the account, as XEP-0013 §2.2's node query expects); what
  // only the server itself answers (session establishment, software version) is still answered.
  const found = findIqHandler(server, type, payload, to);
  if (!found) throw new StanzaError('cancel', 'service-unavailable');
  const { target, handler } = found;
  if (
    target === 'account' &&
    to &&
    bareJid(to) !== bareJid(stream.jid) &&
    server.host.needsAccount(handler) &&
    !(await server.users.exists(bareJid(to)))
  ) {
    throw new StanzaError('cancel', 'service-unavailable');
  }
  const result = await handler({
    stream,
    stanza,
    payload,
    type,
    from: stream.jid,
    to: target === 'account' ? event.to : (to ?? { local: '', domain: server.config.domain, resource: '' }),
  });
  if (result === DEFERRED_RESULT) return;
  await stream.send(iqResult(stanza, result));
}

/**
 * The handler of an iq get/set addressed to the server or to an account (`to` undefined: the
 * sender's own account, and the server's when no account handler takes it; RFC 6120 §10.3.3).
 */
function findIqHandler(
  server: Server,
  type: string,
  payload: Element,
  to: Jid | undefined,
): { target: IqTarget; handler: IqHandler } | undefined {
  const target: IqTarget = to === undefined || to.local ? 'account' : 'server';
  const handler = server.host.iqHandler(target, type, payload);
  if (handler) return { target, handler };
  const serverHandler = to === undefined ? server.host.iqHandler('server', type, payload) : undefined;
  return serverHandler ? { target: 'server', handler: serverHandler } : undefined;
}

const CHAT_STATES = 'http://jabber.org/protocol/chatstates';
const PROCESSING_HINTS = 'urn:xmpp:hints';

/**
 * Whether handling a bound client's `stanza` twice is harmless, so that the stream neither marks
 * its frame done nor saves its XEP-0198 count ahead of it (one write instead of two, or none):
 * - an iq a handler answers that IqOptions.repeatable marks (ping, disco, software version):
 *   handled twice, it is answered twice;
 * - a XEP-0085 standalone notification (a `chat` message whose children are chat states, with
 *   XEP-0334 hints other than <store/> at most): delivered twice, it says twice that the user is
 *   typing. Such a message is never stored offline nor archived (no body), so nothing durable
 *   comes of it; one of type `normal` (the default) would be stored, and is marked done as any.
 */
export function repeatable(server: Server, stanza: Element): boolean {
  if (stanza.name === 'message') return chatStateNotification(stanza);
  const type = stanza.attrs.type;
  if (stanza.name !== 'iq' || (type !== 'get' && type !== 'set') || stanza.attrs.id === undefined)
    return false;
  const children = stanza.getChildElements();
  if (children.length !== 1) return false;
  let to: Jid | undefined;
  if (stanza.attrs.to !== undefined) {
    try {
      to = parseJid(stanza.attrs.to);
    } catch {
      return false;
    }
    if (to.domain !== server.config.domain || (to.local && to.resource)) return false;
  }
  const found = findIqHandler(server, type, children[0] as Element, to);
  return found !== undefined && server.host.isRepeatable(found.handler);
}

function chatStateNotification(stanza: Element): boolean {
  if (stanza.attrs.type !== 'chat') return false;
  const children = stanza.getChildElements();
  // XEP-0334's <store/> asks for the message to be kept (offline, in the archive): not one.
  const hint = (child: Element) => child.attrs.xmlns === PROCESSING_HINTS && child.name !== 'store';
  return (
    children.some((child) => child.attrs.xmlns === CHAT_STATES) &&
    children.every((child) => child.attrs.xmlns === CHAT_STATES || hint(child))
  );
}

/**
 * Whether the server answers an iq for `account` on the account's behalf to `requester` (both
 * bare JIDs): always for the account's own resources; for anyone else only when a module (the
 * roster: a contact the account shares its presence with) grants it. Handlers whose rule is
 * XEP-0030 §8's ("...if the requesting entity is not authorized to receive presence from the
 * target entity") ask it, and answer a refusal exactly as for an account that does not exist.
 */
export async function mayQueryAccount(server: Server, requester: string, account: string): Promise<boolean> {
  if (requester === account) return true;
  for (const grant of server.host.items('account-access')) {
    if (await grant(requester, account)) return true;
  }
  return false;
}

/**
 * What an ended session had not got acknowledged: messages to another resource or offline
 * storage (one delay stamp of their first acceptance, never bounced to the sender), iq
 * requests answered with an error, presence and iq responses dropped (they describe a session
 * that is over).
 */
export async function rerouteUndelivered(
  server: Server,
  user: string,
  undelivered: UndeliveredStanza[],
): Promise<void> {
  // Each one is tried again in place on a transient error (its deliveries are keyed, so a second
  // try delivers nothing twice): the frame that ended the session may not end it again when it
  // is redelivered (its row is gone), and what is left would wait for the sweeper.
  for (const entry of undelivered)
    await withTransientRetries(REROUTE_ATTEMPTS, () => rerouteOne(server, user, entry));
}

/** Tries of one re-routed stanza within the invocation. */
const REROUTE_ATTEMPTS = 4;

async function rerouteOne(server: Server, user: string, entry: UndeliveredStanza): Promise<void> {
  const { stanza, acceptedAt, done, key, sequence } = entry;
  // The whole of it (routing, or the bounce) in the stanza's own frame when it has a key: what it
  // delivers is keyed by the entry alone, the same on every run of this re-route, and apart from
  // the deliveries of the frame or run doing the re-route.
  const handle = async () => {
    try {
      if (stanza.name === 'message' && entry.ownerDeleted) {
        // RFC 6121 §8.5.1: the account it was for is gone (a new one under the JID is someone
        // else): service-unavailable to its sender, as routing answers a JID without an account.
        throw new StanzaError('cancel', 'service-unavailable');
      }
      if (stanza.name === 'message') {
        await routeMessage(server, stanza, parseJid(user), {
          originalTime: acceptedAt,
          ...(entry.alsoTo ? { alsoTo: entry.alsoTo } : {}),
        });
      } else if (
        stanza.name === 'iq' &&
        (stanza.attrs.type === 'get' || stanza.attrs.type === 'set') &&
        stanza.attrs.from
      ) {
        await bounceToLocalSender(server, stanza, new StanzaError('cancel', 'service-unavailable'));
      }
    } catch (error) {
      if (!(error instanceof StanzaError)) throw error;
      // XEP-0198 §4: unacknowledged stanzas are treated "in the same way that [the server] would
      // treat a stanza sent to an unavailable resource, by either returning an error to the
      // sender, ...": a message routing refuses now (groupchat, an account deleted meanwhile)
      // is bounced to its sender as it would have been then.
      server.log.info('undelivered stanza refused on re-route', { user, condition: error.condition });
      if (stanza.name === 'message') await bounceToLocalSender(server, stanza, error);
    }
  };
  // Counted as a redelivery: an earlier run of this re-route may have delivered it.
  const seq = sequence === undefined ? {} : { seq: String(sequence) };
  if (key) await inFrame({ frameId: key, receivedAt: acceptedAt, receiveCount: 2, ...seq }, handle);
  else await handle();
  // Recorded before the next one: a failure later on resumes after this stanza, not before it.
  await done?.();
}
