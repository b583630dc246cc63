/**
 * The XMPP stream over one WebSocket (RFC 6120 §4, RFC 7395): one call per frame, in order,
 * with the stream's state loaded from and saved to the Sessions table around it.
 */
import { randomBytes } from 'node:crypto';
import { Element } from 'ltx';
import { isTransient, StreamError, streamErrorElement } from './errors.ts';
import * as bind from './features/bind.ts';
import * as sasl from './features/sasl.ts';
import type { SmSendOptions } from './features/stream-management.ts';
import * as sm from './features/stream-management.ts';
import { fullJidOf, type Jid } from './jid.ts';
import type { PostResult } from './outbound.ts';
import type { StreamEvent } from './queue-message.ts';
import { routeFromClient } from './router.ts';
import type { Server } from './server.ts';
import type { ConnectionState } from './store/sessions.ts';
import { parseFrame } from './xml/frame.ts';
import { NS } from './xml/namespaces.ts';

type StateChanges = Partial<Omit<ConnectionState, 'connectionId' | 'connectedAt'>>;

/** One stream's view during one frame: its state, pending state changes and its outbox. */
export class Stream {
  private changes: StateChanges = {};
  ended = false;

  constructor(
    readonly server: Server,
    readonly state: ConnectionState,
  ) {}

  get connectionId(): string {
    return this.state.connectionId;
  }

  /** The authenticated, bound full JID; only valid after bind. */
  get jid(): Jid {
    if (!this.state.user || !this.state.resource) throw new Error('stream is not bound');
    return fullJidOf(this.state.user, this.state.resource);
  }

  update(changes: StateChanges): void {
    Object.assign(this.state, changes);
    Object.assign(this.changes, changes);
  }

  /** Everything this stream sends; with stream management on, stanzas are numbered and queued. */
  send(element: Element, options: SmSendOptions = {}): Promise<PostResult> {
    if (this.state.sm && STANZAS.has(element.name)) return sm.sendOnStream(this, element, options);
    return this.server.outbound.send(this.connectionId, element);
  }

  /** Sends the stream error and `<close/>`, ends the session and closes the socket. */
  async fail(error: StreamError): Promise<void> {
    if (this.ended) return;
    if (!this.state.streamOpen) await this.send(openElement(this.server.config.domain, newStreamId()));
    await this.send(streamErrorElement(error));
    await this.close();
  }

  /** Sends `<close/>`, ends the session (presence, resource) and closes the socket. */
  async close(): Promise<void> {
    if (this.ended) return;
    await this.send(new Element('close', { xmlns: NS.framing }));
    await this.end();
    await this.server.outbound.close(this.connectionId);
  }

  /** Ends the session without a word to the client (the socket is already gone). */
  async end(): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    await sm.endStream(this.server, this.state);
  }

  async save(): Promise<void> {
    if (this.ended || Object.keys(this.changes).length === 0) return;
    await this.server.sessions.updateConnection(this.connectionId, this.changes);
    this.changes = {};
  }
}

export function newStreamId(): string {
  return randomBytes(12).toString('base64url');
}

export function openElement(domain: string, id: string): Element {
  // RFC 7395 §3.4: the server's <open/> answers with from, id, version and xml:lang.
  return new Element('open', { xmlns: NS.framing, from: domain, id, version: '1.0', 'xml:lang': 'en' });
}

function featuresElement(stream: Stream): Element {
  const features = new Element('stream:features', { 'xmlns:stream': NS.stream });
  if (!stream.state.user) sasl.advertise(features);
  else if (!stream.state.resource) {
    bind.advertise(features);
    sm.advertise(features, stream.server);
  }
  return features;
}

async function openStream(stream: Stream, open: Element): Promise<void> {
  const { domain } = stream.server.config;
  const to = open.attrs.to?.toLowerCase();
  const version = open.attrs.version;
  const streamId = newStreamId();
  if (to !== undefined && to !== domain && to !== `${domain}.`) {
    throw new StreamError('host-unknown', `This server serves ${domain}`);
  }
  if (version !== undefined && !/^1\.\d+$/.test(version)) {
    throw new StreamError('unsupported-version', 'This server speaks XMPP 1.0');
  }
  stream.update({ streamOpen: true, streamId });
  await stream.send(openElement(domain, streamId));
  await stream.send(featuresElement(stream));
}

const STANZAS = new Set(['message', 'presence', 'iq']);

/** Decides what a top-level element is and hands it to its owner. */
async function dispatch(stream: Stream, element: Element): Promise<void> {
  const ns = element.attrs.xmlns as string | undefined;

  if (element.name === 'open') {
    if (ns !== NS.framing)
      throw new StreamError('invalid-namespace', 'open must be in the framing namespace');
    return openStream(stream, element);
  }
  if (element.name === 'close' && ns === NS.framing) return stream.close();
  if (element.name === 'stream:stream' || element.name === 'stream') {
    // RFC 7395 §3.3.2: WebSocket streams are opened with <open/>, never <stream:stream>.
    throw new StreamError('invalid-namespace', 'Use the RFC 7395 <open/> element');
  }
  if (!stream.state.streamOpen)
    throw new StreamError('unsupported-stanza-type', 'The stream is not open: send <open/> first');

  if (ns === NS.sasl) return sasl.handle(stream, element);
  if (sm.isSmNamespace(ns)) return sm.handle(stream, element);

  if (STANZAS.has(element.name)) {
    if (ns !== undefined && ns !== NS.client) {
      throw new StreamError('invalid-namespace', `Stanzas are qualified by ${NS.client}`);
    }
    if (!stream.state.user) throw new StreamError('not-authorized', 'Authenticate first');
    if (!stream.state.resource) return bind.handleUnbound(stream, element);
    // XEP-0198 §4: every stanza counts, even one that is refused.
    sm.countInbound(stream);
    return routeFromClient(stream, element);
  }
  throw new StreamError('unsupported-stanza-type', `Unknown element <${element.name}>`);
}

/** Handles one queue event of one connection: a frame, or the socket's disappearance. */
export async function handleStreamEvent(server: Server, event: StreamEvent): Promise<void> {
  const stored = await server.sessions.getConnection(event.connectionId);
  const state: ConnectionState = stored ?? {
    connectionId: event.connectionId,
    connectedAt: event.receivedAt,
    streamOpen: false,
    authFailures: 0,
  };
  const stream = new Stream(server, state);

  if (event.kind === 'disconnect') {
    // A resumable stream-management session outlives its socket; anything else ends here.
    if (stored) await sm.connectionVanished(server, event.connectionId, stored);
    return;
  }
  try {
    const element = parseFrame(event.frame, server.config.maxStanzaBytes);
    await dispatch(stream, element);
  } catch (error) {
    if (error instanceof StreamError) await stream.fail(error);
    else if (isTransient(error)) {
      // DynamoDB or API Gateway hiccup: let the queue redeliver this frame (in order).
      throw error;
    } else {
      server.log.error('frame failed', { connectionId: event.connectionId, error });
      await stream.fail(new StreamError('internal-server-error'));
    }
    return;
  }
  await stream.save();
}
