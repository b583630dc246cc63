/**
 * Builders every handler shares: the iq result, the error reply to a stanza (RFC 6120 §8.3),
 * and the XEP-0203 delay stamp of this server.
 */
import { Element } from 'ltx';
import { errorReply, type StanzaError } from '../errors.ts';
import { NS } from '../xml/namespaces.ts';

/** RFC 6120 §8.2.3: a result carries the request's id, goes back to its sender, from its addressee. */
export function iqResult(request: Element, payload?: Element): Element {
  const attrs: Record<string, string> = { type: 'result', id: request.attrs.id };
  if (request.attrs.from) attrs.to = request.attrs.from;
  if (request.attrs.to) attrs.from = request.attrs.to;
  const reply = new Element('iq', attrs);
  if (payload) reply.cnode(payload);
  return reply;
}

/**
 * The error reply to a stanza, or nothing: RFC 6120 §8.3.1 "An entity that receives an error
 * stanza MUST NOT respond to the stanza with a further error stanza", and an iq result is
 * never answered (§8.2.3).
 */
export function errorReplyTo(stanza: Element, error: StanzaError): Element | undefined {
  const type = stanza.attrs.type;
  if (type === 'error' || (stanza.name === 'iq' && type === 'result')) return undefined;
  return errorReply(stanza, error);
}

/** XEP-0203: the one stamp of this server on a stanza, unless it already carries one. */
export function stampDelay(stanza: Element, domain: string, time: number): Element {
  if (!stanza.getChildren('delay', NS.delay).some((d) => d.attrs.from === domain)) {
    stanza.c('delay', { xmlns: NS.delay, from: domain, stamp: new Date(time).toISOString() });
  }
  return stanza;
}

/**
 * Removes delay stamps that claim to be this server's (only the server may stamp as itself): a
 * XEP-0203 `<delay/>`, or the legacy XEP-0091 `jabber:x:delay` `<x/>`, whose 'from' is the domain
 * (compared as a domain is, case-insensitively, with or without a trailing dot).
 */
export function removeForgedDelay(stanza: Element, domain: string): void {
  const ours = (from: unknown) =>
    typeof from === 'string' && [domain, `${domain}.`].includes(from.toLowerCase());
  for (const delay of stanza.getChildren('delay', NS.delay)) {
    if (ours(delay.attrs.from)) stanza.remove(delay);
  }
  for (const legacy of stanza.getChildren('x', LEGACY_DELAY)) {
    if (ours(legacy.attrs.from)) stanza.remove(legacy);
  }
}

/** XEP-0091 Legacy Delayed Delivery. */
const LEGACY_DELAY = 'jabber:x:delay';
