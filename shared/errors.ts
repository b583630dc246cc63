/**
 * XMPP-shaped errors. A handler throws one of these: the router (core/router.ts) answers a
 * StanzaError with the error reply, and the stream (core/stream.ts) ends on a StreamError.
 * Nothing else ever reaches a client: an unexpected exception is logged and becomes
 * `internal-server-error`, never a stack trace.
 */
import { clone, Element } from 'ltx';
import { NS } from './xml/namespaces.ts';

export type StanzaErrorType = 'auth' | 'cancel' | 'continue' | 'modify' | 'wait';

/** RFC 6120 §8.3.3 defined conditions. */
export type StanzaErrorCondition =
  | 'bad-request'
  | 'conflict'
  | 'feature-not-implemented'
  | 'forbidden'
  | 'gone'
  | 'internal-server-error'
  | 'item-not-found'
  | 'jid-malformed'
  | 'not-acceptable'
  | 'not-allowed'
  | 'not-authorized'
  | 'policy-violation'
  | 'recipient-unavailable'
  | 'redirect'
  | 'registration-required'
  | 'remote-server-not-found'
  | 'remote-server-timeout'
  | 'resource-constraint'
  | 'service-unavailable'
  | 'subscription-required'
  | 'undefined-condition'
  | 'unexpected-request';

export class StanzaError extends Error {
  constructor(
    readonly type: StanzaErrorType,
    readonly condition: StanzaErrorCondition,
    readonly text?: string,
  ) {
    super(text ?? condition);
    this.name = 'StanzaError';
  }
}

/** RFC 6120 §4.9.3 stream error conditions used by this server. */
export type StreamErrorCondition =
  | 'bad-format'
  | 'bad-namespace-prefix'
  | 'conflict'
  | 'connection-timeout'
  | 'host-unknown'
  | 'internal-server-error'
  | 'invalid-namespace'
  | 'not-authorized'
  | 'not-well-formed'
  | 'policy-violation'
  | 'reset'
  | 'resource-constraint'
  | 'restricted-xml'
  | 'system-shutdown'
  | 'undefined-condition'
  | 'unsupported-encoding'
  | 'unsupported-stanza-type'
  | 'unsupported-version';

export class StreamError extends Error {
  constructor(
    readonly condition: StreamErrorCondition,
    readonly text?: string,
    /** Application-specific condition element (RFC 6120 §4.9.4). */
    readonly appCondition?: Element,
  ) {
    super(text ?? condition);
    this.name = 'StreamError';
  }
}

/** `<stream:error>` as a standalone RFC 7395 frame: it must declare the stream prefix itself. */
export function streamErrorElement(error: StreamError): Element {
  const el = new Element('stream:error', { 'xmlns:stream': NS.stream });
  el.c(error.condition, { xmlns: NS.streams });
  if (error.text) el.c('text', { xmlns: NS.streams, 'xml:lang': 'en' }).t(error.text);
  if (error.appCondition) el.cnode(error.appCondition);
  return el;
}

function errorChild(error: StanzaError): Element {
  const el = new Element('error', { type: error.type });
  el.c(error.condition, { xmlns: NS.stanzas });
  if (error.text) el.c('text', { xmlns: NS.stanzas, 'xml:lang': 'en' }).t(error.text);
  return el;
}

/**
 * RFC 6120 §8.3.1: the error stanza swaps `to`/`from`, keeps the id and type-attribute
 * `error`; the original payload may be included. Only the first-level children are kept for
 * messages and presence (so a body is echoed back), none for iq.
 */
export function errorReply(stanza: Element, error: StanzaError, from?: string): Element {
  const attrs: Record<string, string> = { type: 'error' };
  if (stanza.attrs.id !== undefined) attrs.id = stanza.attrs.id;
  const replyTo = stanza.attrs.from;
  const replyFrom = from ?? stanza.attrs.to;
  if (replyTo) attrs.to = replyTo;
  if (replyFrom) attrs.from = replyFrom;
  // The payload kept may use prefixes the stanza declared (`xmlns:e` on it, `e:hint` on its
  // body): the reply declares them too, or it is no namespace-well-formed document (RFC 7395
  // §3.3.3: each message a document of its own; a strict parser such as a browser's refuses it).
  for (const [name, value] of Object.entries(stanza.attrs)) {
    if (name.startsWith('xmlns:')) attrs[name] = String(value);
  }
  const reply = new Element(stanza.name, attrs);
  if (stanza.name !== 'iq') {
    for (const child of stanza.getChildElements()) reply.cnode(clone(child));
  } else {
    const payload = stanza.getChildElements()[0];
    if (payload) reply.cnode(clone(payload));
  }
  reply.cnode(errorChild(error));
  return reply;
}
