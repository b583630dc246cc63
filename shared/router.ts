/**
 * Every dispatch rule of the server: which iq handler answers, where a message or presence
 * goes (RFC 6120 §10, RFC 6121 §8.5), and how a thrown error becomes the reply.
 */
import { Element } from 'ltx';
import { deliverToResource } from './delivery.ts';
import { errorReply, isTransient, StanzaError } from './errors.ts';
import * as offlineStorage from './features/offline-storage.ts';
import * as presence from './features/presence.ts';
import { bareJid, fullJid, type Jid, parseJid } from './jid.ts';
import type { Server } from './server.ts';
import type { ResourceRecord } from './store/sessions.ts';
import type { Stream } from './stream.ts';
import { NS } from './xml/namespaces.ts';

/** Who an iq is addressed to: the server itself, or a user's account (its bare JID). */
export type IqTarget = 'server' | 'account';

export interface IqRequest {
  stream: Stream;
  server: Server;
  stanza: Element;
  payload: Element;
  type: 'get' | 'set';
  /** The requester's full JID. */
  from: Jid;
  /** The addressed entity (the domain for the server; a bare JID for an account). */
  to: Jid;
}

/** A handler's answer meaning "the result goes out later" (an ack-paced XEP-0013 fetch). */
export const DEFERRED_RESULT = Symbol('deferred iq result');

/**
 * Returns the result's payload, or nothing for an empty result, or DEFERRED_RESULT when it
 * will send the result itself. Throws StanzaError to refuse.
 */
export type IqHandler = (request: IqRequest) => Promise<Element | undefined | typeof DEFERRED_RESULT>;

export class Router {
  private readonly iqHandlers = new Map<string, IqHandler>();
  /** Handlers that answer for other users' accounts themselves (existing or not). */
  private readonly answersForAnyAccount = new Set<IqHandler>();
  /** disco#info features of the server, gathered from what features register. */
  readonly features = new Set<string>();

  private static key(target: IqTarget, type: string, ns: string, name: string): string {
    return `${target} ${type} ${ns} ${name}`;
  }

  iq(
    targets: IqTarget[],
    type: 'get' | 'set',
    ns: string,
    name: string,
    handler: IqHandler,
    options: { answersForAnyAccount?: boolean } = {},
  ): void {
    for (const target of targets) this.iqHandlers.set(Router.key(target, type, ns, name), handler);
    if (options.answersForAnyAccount) this.answersForAnyAccount.add(handler);
  }

  /** False when the handler itself decides what to say about another user's account. */
  needsAccount(handler: IqHandler): boolean {
    return !this.answersForAnyAccount.has(handler);
  }

  feature(...namespaces: string[]): void {
    for (const ns of namespaces) this.features.add(ns);
  }

  iqHandler(target: IqTarget, type: string, payload: Element): IqHandler | undefined {
    return this.iqHandlers.get(Router.key(target, type, payload.attrs.xmlns ?? '', payload.name));
  }
}

/** Replies to a stanza with an error unless it is itself an error (or an iq result). */
export async function replyWithError(stream: Stream, stanza: Element, error: StanzaError): Promise<void> {
  const type = stanza.attrs.type;
  if (type === 'error' || (stanza.name === 'iq' && type === 'result')) return;
  await stream.send(errorReply(stanza, error));
}

/** A stanza from a bound client: stamp its sender, check its address, route it. */
export async function routeFromClient(stream: Stream, stanza: Element): Promise<void> {
  // DESIGN.md: "A stanza's from is always rewritten by the server."
  stanza.attrs.from = fullJid(stream.jid);
  let to: Jid | undefined;
  try {
    if (stanza.attrs.to !== undefined) {
      to = parseJid(stanza.attrs.to);
      stanza.attrs.to = fullJid(to);
    }
    if (stanza.name === 'message')
      await routeMessage(stream.server, stanza, to ?? { ...stream.jid, resource: '' });
    else if (stanza.name === 'presence') await presence.handleFromClient(stream, stanza, to);
    else await routeIq(stream, stanza, to);
  } catch (error) {
    if (error instanceof StanzaError) return replyWithError(stream, stanza, error);
    if (isTransient(error)) throw error;
    stream.server.log.error('stanza failed', { connectionId: stream.connectionId, error });
    await replyWithError(stream, stanza, new StanzaError('cancel', 'internal-server-error'));
  }
}

function messageType(stanza: Element): string {
  const type = stanza.attrs.type;
  // RFC 6121 §5.2.2: an unknown type is treated as normal.
  return ['chat', 'error', 'groupchat', 'headline', 'normal'].includes(type) ? type : 'normal';
}

/** RFC 6121 §8.5.2.1.1: the available resources with the highest non-negative priority. */
function chatTargets(resources: ResourceRecord[]): ResourceRecord[] {
  const candidates = resources.filter((r) => r.available && r.priority >= 0);
  const top = Math.max(...candidates.map((r) => r.priority));
  return candidates.filter((r) => r.priority === top);
}

/**
 * Routes a message to a local or remote JID (RFC 6121 §8.5). Throws the StanzaError the
 * sender gets back; returns quietly when the message was delivered, stored or dropped.
 */
export interface RouteOptions {
  /**
   * The message was accepted earlier (re-routed from an ended stream-management session):
   * it carries a delay stamp of this time on delivery, and offline storage keeps this time.
   */
  originalTime?: number;
}

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
  const bare = bareJid(to);
  let resources = await server.sessions.listResources(bare);
  if (options.originalTime !== undefined) stampDelay(server, stanza, options.originalTime);

  if (to.resource) {
    const exact = resources.find((r) => r.resource === to.resource);
    // RFC 6121 §8.5.3.1: a connected resource that exactly matches gets the stanza.
    if (exact) {
      if ((await deliverToResource(server, exact, stanza)) === 'sent') return;
      resources = resources.filter((r) => r !== exact);
    }
    // RFC 6121 §8.5.3.2.1: otherwise groupchat is refused, error dropped, the rest go to the bare JID.
  }
  if (type === 'groupchat') throw new StanzaError('cancel', 'service-unavailable');
  if (type === 'error') return;

  for (;;) {
    const targets =
      type === 'headline' ? resources.filter((r) => r.available && r.priority >= 0) : chatTargets(resources);
    if (targets.length === 0) break;
    let delivered = false;
    for (const target of targets) {
      if ((await deliverToResource(server, target, stanza)) === 'sent') delivered = true;
      else resources = resources.filter((r) => r !== target);
    }
    if (delivered) return;
  }
  if (type === 'headline') return;
  if (resources.length === 0 && !(await server.users.exists(bare))) {
    throw new StanzaError('cancel', 'service-unavailable');
  }
  await offlineStorage.storeIfWanted(server, bare, stanza, options.originalTime);
}

/** XEP-0203: one stamp from this server, of when it first accepted the message. */
function stampDelay(server: Server, stanza: Element, time: number): void {
  if (stanza.getChildren('delay', NS.delay).some((d) => d.attrs.from === server.config.domain)) return;
  stanza.c('delay', { xmlns: NS.delay, from: server.config.domain, stamp: new Date(time).toISOString() });
}

async function routeIq(stream: Stream, stanza: Element, to: Jid | undefined): Promise<void> {
  const { server } = stream;
  const type = stanza.attrs.type;
  if (type === 'result' || type === 'error') {
    // Responses go only to the full JID they answer; anything else is dropped (RFC 6120 §8.2.3).
    if (to?.local && to.resource && to.domain === server.config.domain) {
      const resource = await server.sessions.getResource(bareJid(to), to.resource);
      if (resource) await deliverToResource(server, resource, stanza);
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
    if (!resource || (await deliverToResource(server, resource, stanza)) !== 'sent') {
      throw new StanzaError('cancel', 'service-unavailable');
    }
    return;
  }
  const target: IqTarget = to?.local ? 'account' : 'server';
  const handler = server.router.iqHandler(target, type, payload);
  if (!handler) throw new StanzaError('cancel', 'service-unavailable');
  if (
    target === 'account' &&
    to &&
    bareJid(to) !== bareJid(stream.jid) &&
    server.router.needsAccount(handler) &&
    !(await server.users.exists(bareJid(to)))
  ) {
    throw new StanzaError('cancel', 'service-unavailable');
  }
  const result = await handler({
    stream,
    server,
    stanza,
    payload,
    type,
    from: stream.jid,
    to: to ?? { local: '', domain: server.config.domain, resource: '' },
  });
  if (result === DEFERRED_RESULT) return;
  const attrs: Record<string, string> = { type: 'result', id: stanza.attrs.id, to: stanza.attrs.from };
  if (stanza.attrs.to) attrs.from = stanza.attrs.to;
  const reply = new Element('iq', attrs);
  if (result) reply.cnode(result);
  await stream.send(reply);
}
