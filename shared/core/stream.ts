/**
 * The XMPP stream over one WebSocket (RFC 6120 §4, RFC 7395): one call per frame, in order,
 * with the stream's state loaded from and saved to the Sessions table around it. The frame is
 * parsed, then dispatched: `<open/>`/`<close/>` here, nonzas to the module registered for their
 * namespace, stanzas to the router once the stream is bound.
 */
import { randomBytes } from 'node:crypto';
import { Element, parse } from 'ltx';
import { StanzaError, StreamError, streamErrorElement } from '../errors.ts';
import { bareJid, fullJidOf, type Jid, parseJid } from '../jid.ts';
import { addLogContext } from '../log.ts';
import type { StreamEvent } from '../queue-message.ts';
import { ConnectionFencedError, type ConnectionState, type NewConnection } from '../store/sessions.ts';
import { parseFrame } from '../xml/frame.ts';
import { NS } from '../xml/namespaces.ts';
import { closeConnection, deliver, deliverAll, oneByOne, post } from './delivery.ts';
import { inFrame, sequenceAtMost } from './frame.ts';
import {
  type BoundStream,
  type DeliveryItem,
  type DeliveryOptions,
  type DeliveryResult,
  isBound,
  type SendAllResult,
  type Server,
  type Stream,
  type StreamStateChanges,
} from './host.ts';
import { endStream, tellRevoked } from './lifecycle.ts';
import { repeatable, routeFromClient } from './router.ts';
import { errorReplyTo } from './stanzas.ts';
import { isTransient, withTransientRetries } from './transient.ts';

const STANZAS = new Set(['message', 'presence', 'iq']);
/** Tries of the state write that ends a frame (each after the SDK's own retries). */
const SAVE_ATTEMPTS = 3;

/** An iq (a result or error for the client's request) or an error about its own stanza. */
function isAnswer(element: Element): boolean {
  return element.name === 'iq' || element.attrs.type === 'error';
}

/** One stream's view during one frame: its state, pending state changes and its sends. */
export class XmppStream implements Stream {
  private changes: StreamStateChanges = {};
  ended = false;
  /** The frame was a stanza: its routing sent or stored something (recorded with `doneSeq`). */
  routed = false;
  /** Ask the frame's last write for the row it leaves (the next frame in the batch is this connection's). */
  keepRow = false;
  /** A XEP-0198 count is among the changes the save writes (Stream.countWaitsForSave). */
  private countInSave = false;
  /** That row, when the frame ended with a write of the whole row's state (see handleStreamEvent). */
  savedRow: ConnectionState | undefined;

  constructor(
    readonly server: Server,
    readonly state: ConnectionState,
    readonly frameId = '',
    readonly seq?: string,
    /** Another record follows in the batch (see Config.frameDoneMarks). */
    readonly followed = false,
    /**
     * The connection has no row yet (`$connect` writes none): the first write creates it, with
     * API Gateway's connection time and client address.
     */
    private newRow?: NewConnection,
  ) {}

  get connectionId(): string {
    return this.state.connectionId;
  }

  get user(): string | undefined {
    return this.state.user;
  }

  get resource(): string | undefined {
    return this.state.resource;
  }

  /** The bound full JID (only read through a BoundStream). */
  get jid(): Jid {
    if (!this.state.user || !this.state.resource) throw new Error('stream is not bound');
    return fullJidOf(this.state.user, this.state.resource);
  }

  update(changes: StreamStateChanges): void {
    if (changes.user) addLogContext({ jid: changes.user });
    Object.assign(this.state, changes);
    Object.assign(this.changes, changes);
  }

  send(element: Element, options: DeliveryOptions = {}): Promise<DeliveryResult> {
    if (this.state.sm && STANZAS.has(element.name)) {
      return deliver(
        this.server,
        { connectionId: this.connectionId, smId: this.state.sm.id },
        element,
        isAnswer(element) ? { ...options, answer: true } : options,
      );
    }
    // The stream's own socket: a 410 here is followed by its $disconnect, in order, on the queue.
    return post(this.server, this.connectionId, element);
  }

  async sendAll(items: readonly DeliveryItem[]): Promise<SendAllResult[]> {
    if (this.state.sm && items.every(({ stanza }) => STANZAS.has(stanza.name))) {
      const smId = this.state.sm.id;
      return deliverAll(
        this.server,
        { connectionId: this.connectionId, smId },
        items.map((item) =>
          isAnswer(item.stanza) ? { ...item, options: { ...item.options, answer: true } } : item,
        ),
      );
    }
    return oneByOne(items, (stanza, options) => this.send(stanza, options));
  }

  async fail(error: StreamError): Promise<void> {
    if (this.ended) return;
    await this.server.host.fire('stream-error', {
      connectionId: this.connectionId,
      condition: error.condition,
      ...(this.state.user ? { user: this.state.user } : {}),
    });
    if (!this.state.streamOpen) await this.send(openElement(this.server.config.domain, newStreamId()));
    await this.send(streamErrorElement(error));
    await this.close();
  }

  async close(): Promise<void> {
    if (this.ended) return;
    await this.send(new Element('close', { xmlns: NS.framing }));
    this.ended = true;
    await endStream(this.server, this.state, 'closed', {
      ownEnd: this.newRow ? { create: this.newRow } : true,
    });
    await closeConnection(this.server, this.connectionId);
  }

  async answerOnce(element: Element): Promise<void> {
    if (this.frameId) {
      this.update({ answeredFrame: this.frameId, answer: element.toString() });
      await this.commit();
    }
    await this.send(element);
  }

  async commit(): Promise<void> {
    if (this.ended) return;
    await this.server.sessions.updateConnection(this.connectionId, this.changes, {
      unlessFenced: true,
      ...this.creating(),
    });
    this.newRow = undefined;
    this.changes = {};
  }

  private creating(): { create?: NewConnection } {
    return this.newRow ? { create: this.newRow } : {};
  }

  countWaitsForSave(): void {
    this.countInSave = true;
  }

  async save(): Promise<void> {
    if (this.ended) return;
    // A routed stanza is marked done even without state changes: a redelivery would repeat its
    // posts. (Its durable writes carry frame keys and would not repeat; see core/frame.ts.)
    const markDone =
      this.seq !== undefined && this.routed && (this.server.config.frameDoneMarks === 'all' || this.followed);
    // A frame that answered once (answerOnce) is saved at its end even with nothing left to save:
    // its answer went out, so a redelivery is skipped from now on, not answered a second time.
    const answered = this.frameId !== '' && this.state.answeredFrame === this.frameId;
    if (!markDone && !answered && Object.keys(this.changes).length === 0) return;
    // The frame's id goes with the state it produced, in the same write: a redelivery of a frame
    // whose work was saved (a timeout or a lost delete after the save) is recognised and skipped.
    const changes: StreamStateChanges = this.frameId
      ? { ...this.changes, savedFrame: this.frameId }
      : { ...this.changes };
    if (this.seq !== undefined) changes.doneSeq = this.seq;
    // A saved answer (answerOnce) or roster outcome has served its redeliveries once a frame is
    // saved: this one's (it is marked handled in this write), or an earlier one's.
    if (this.state.answeredFrame !== undefined) {
      changes.answeredFrame = undefined;
      changes.answer = undefined;
    }
    if (this.state.rosterFrame !== undefined) {
      changes.rosterFrame = undefined;
      changes.rosterApplied = undefined;
    }
    // The record of a message this frame stored offline (core/frame.ts offlineRecord) served its
    // frame's redeliveries, which the done mark now skips: it goes, in the same write, so that the
    // row (billed by size on every update) does not keep it.
    if (markDone) changes.storedOffline = undefined;
    // The frame's work is done: failing now would have it redelivered and repeated.
    const options = {
      ...this.creating(),
      ...(this.keepRow ? { returnRow: true } : {}),
      ...(this.countInSave ? { unlessFenced: true } : {}),
    };
    try {
      this.savedRow = await withTransientRetries(SAVE_ATTEMPTS, () =>
        this.server.sessions.updateConnection(this.connectionId, changes, options),
      );
    } catch (error) {
      if (!(this.countInSave && error instanceof ConnectionFencedError)) throw error;
      // A resume fenced the row while this frame was handled: its stanza (a repeatable one) is
      // not in the h the resume reported, so the client sends it again, and it is handled again.
      this.server.log.debug('count of a repeatable stanza met the fence: not saved', {
        connectionId: this.connectionId,
      });
    }
    this.newRow = undefined;
    this.changes = {};
  }
}

export function newStreamId(): string {
  return randomBytes(12).toString('base64url');
}

export function openElement(domain: string, id: string, to?: string): Element {
  // RFC 7395 §3.4: the server's <open/> answers with from, id, version and xml:lang.
  return new Element('open', {
    xmlns: NS.framing,
    from: domain,
    ...(to ? { to } : {}),
    id,
    version: '1.0',
    'xml:lang': SERVER_LANG,
  });
}

/**
 * RFC 6120 §4.7.2: when the client's header has a 'from', the response header's 'to' is that
 * bare JID. A 'from' that is no JID is left out (it is only a hint before authentication).
 */
function answeringTo(open: Element): string | undefined {
  const from = open.attrs.from;
  if (typeof from !== 'string' || from === '') return undefined;
  try {
    return bareJid(parseJid(from));
  } catch {
    return undefined;
  }
}

/** The server's own default language, in its `<open/>`. */
export const SERVER_LANG = 'en';

/**
 * RFC 6120 §4.7.4: "If the initiating entity included the 'xml:lang' attribute in its initial
 * stream header, the receiving entity SHOULD remember that value as the default xml:lang for all
 * stanzas sent by the initiating entity over the current stream", and add it to those it routes
 * without one. A language the server's own header already gives its recipients (`en`), or a
 * value that is no language tag (RFC 5646's shape, at most 35 characters), is not kept.
 */
function streamLanguage(open: Element): string | undefined {
  const lang = open.attrs['xml:lang'];
  if (typeof lang !== 'string' || lang.length > 35) return undefined;
  if (!/^[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*$/.test(lang)) return undefined;
  return lang.toLowerCase() === SERVER_LANG ? undefined : lang;
}

async function openStream(stream: XmppStream, open: Element): Promise<void> {
  const { server } = stream;
  const { domain } = server.config;
  const to = open.attrs.to?.toLowerCase();
  const version = open.attrs.version;
  if (to !== undefined && to !== domain && to !== `${domain}.`) {
    throw new StreamError('host-unknown', `This server serves ${domain}`);
  }
  // RFC 6120 §4.7.5: a header without 'version' means "0.9", which this server does not speak
  // (its streams have features); RFC 7395's clients all send version='1.0'.
  if (version === undefined || !/^1\.\d+$/.test(version)) {
    throw new StreamError('unsupported-version', 'This server speaks XMPP 1.0');
  }
  const streamId = newStreamId();
  stream.update({ streamOpen: true, streamId, lang: streamLanguage(open) });
  await stream.send(openElement(domain, streamId, answeringTo(open)));
  const features = new Element('stream:features', { 'xmlns:stream': NS.stream });
  await server.host.fire('stream-features', { stream, features });
  await stream.send(features);
}

/** Decides what a top-level element is and hands it to its owner. */
async function dispatch(stream: XmppStream, element: Element): Promise<void> {
  const { host } = stream.server;
  const ns = element.attrs.xmlns as string | undefined;

  if (element.name === 'open') {
    if (ns !== NS.framing)
      throw new StreamError('invalid-namespace', 'open must be in the framing namespace');
    return openStream(stream, element);
  }
  if (element.name === 'close' && ns === NS.framing) return stream.close();
  if (element.name === 'error' && ns === NS.stream) {
    // RFC 6120 §4.9: the client ended the stream with an error of its own; it is not answered
    // with another one: the stream is closed (RFC 7395 §3.6).
    stream.server.log.info('stream error from the client', {
      condition: element.getChildElements().find((child) => child.attrs.xmlns === NS.streams)?.name,
    });
    return stream.close();
  }
  if (element.name === 'stream:stream' || element.name === 'stream') {
    // RFC 7395 §3.3.2: WebSocket streams are opened with <open/>, never <stream:stream>.
    throw new StreamError('invalid-namespace', 'Use the RFC 7395 <open/> element');
  }
  const nonza = host.nonzaHandler(ns);
  // After SASL <success/> the stream restarts; a <response/> the client sent to a challenge it
  // got twice (a redelivered <auth/>) may come before the new <open/>: its module ignores it.
  const afterSuccess = stream.state.user !== undefined && ns === NS.sasl && element.name === 'response';
  if (!stream.state.streamOpen && !(afterSuccess && nonza))
    throw new StreamError('unsupported-stanza-type', 'The stream is not open: send <open/> first');

  if (nonza) return nonza(stream, element);

  if (STANZAS.has(element.name)) {
    if (ns !== undefined && ns !== NS.client) {
      throw new StreamError('invalid-namespace', `Stanzas are qualified by ${NS.client}`);
    }
    const user = stream.user;
    if (!user) throw new StreamError('not-authorized', 'Authenticate first');
    if (!isBound(stream)) {
      // RFC 6120 §7.1: before bind, only the bind request (taken by the bind module).
      if (
        await host.fire('stanza-before-bind', {
          stream: stream as XmppStream & { user: string },
          stanza: element,
        })
      )
        return;
      // RFC 6120 §7.1: "If, before completing the resource binding step, the client attempts to
      // send an XML stanza to an entity other than the server itself or the client's account,
      // the server MUST NOT process the stanza and MUST close the stream with a <not-authorized/>
      // stream error". One to the server or the account is refused alone (as Prosody does).
      if (!toServerOrAccount(element, user, stream.server.config.domain))
        throw new StreamError('not-authorized', 'Bind a resource first');
      const reply = errorReplyTo(element, new StanzaError('auth', 'not-authorized', 'Bind a resource first'));
      if (reply) await stream.send(reply);
      return;
    }
    const bound = stream as XmppStream & BoundStream;
    const harmlessTwice = repeatable(stream.server, element);
    // What a redelivery may repeat harmlessly (a ping's answer, a typing notification): no done mark.
    stream.routed = !harmlessTwice;
    await host.fire('stanza-in', { stream: bound, stanza: element, repeatable: harmlessTwice });
    return routeFromClient(bound, element);
  }
  throw new StreamError('unsupported-stanza-type', `Unknown element <${element.name}>`);
}

/** A stanza addressed to the server itself or to `user`'s account (no 'to' is the account). */
function toServerOrAccount(stanza: Element, user: string, domain: string): boolean {
  const to = stanza.attrs.to;
  if (to === undefined) return true;
  try {
    const jid = parseJid(to);
    return jid.resource === '' && (jid.local === '' ? jid.domain === domain : bareJid(jid) === user);
  } catch {
    return false;
  }
}

/** The connection's rate limits (core/rate-limit.ts): past them the stream ends. */
function chargeRate(stream: XmppStream, event: StreamEvent): void {
  const { server, state } = stream;
  const decision = server.rates.admit(
    state.connectionId,
    state.rate,
    Buffer.byteLength(event.frame),
    event.receivedAt,
  );
  if (decision.persist) stream.update({ rate: decision.persist });
  else if (state.rate) stream.update({ rate: undefined });
  if (!decision.allowed) {
    const { rateFramesPerSecond, rateBytesPerSecond } = server.config;
    throw new StreamError(
      'policy-violation',
      `Too fast: at most ${rateFramesPerSecond} stanzas and ${rateBytesPerSecond} bytes per second, with bursts`,
    );
  }
}

/**
 * An unauthenticated stream has AUTH_TIMEOUT_SECONDS from its connection (API Gateway's
 * `connectedAt`) to authenticate, as Prosody's `c2s_timeout` and ejabberd's
 * `negotiation_timeout` give. No timer runs here: a frame arriving later ends the stream (an idle
 * one is closed by API Gateway after 10 minutes). Bounds how long a connection that never logs in
 * can be kept by sending `<open/>` again and again.
 */
function checkAuthTime(stream: XmppStream, event: StreamEvent): void {
  const limit = stream.server.config.authTimeoutSeconds;
  if (limit === 0 || stream.state.user !== undefined) return;
  if (event.receivedAt - stream.state.connectedAt <= limit * 1000) return;
  // RFC 6120 §4.9.3.4 <connection-timeout/>, the condition Prosody closes such streams with.
  throw new StreamError('connection-timeout', `Authenticate within ${limit} seconds of connecting`);
}

/** What a batch hands from one record to the next of the same connection. */
export interface RowCarry {
  /** The row as the previous record's last write left it: read instead of from the table. */
  row?: ConnectionState;
  /** The next record is this connection's: return the row this one's last write leaves. */
  keepRow?: boolean;
}

/**
 * Handles one queue event of one connection: a frame, or the socket's disappearance. With
 * `keepRow`, returns the row the frame's final save left (undefined when it ended otherwise):
 * the batch gives it to the connection's next record as `row`, which then reads nothing. That
 * row is as fresh as a read would be: nothing runs between the two records, and what another
 * connection may write to it meanwhile (a resume's fence) could as well land just after a read.
 */
export async function handleStreamEvent(
  server: Server,
  event: StreamEvent,
  carry: RowCarry = {},
): Promise<ConnectionState | undefined> {
  const stored = carry.row ?? (await server.sessions.getConnection(event.connectionId));
  if (stored?.ended) {
    // Its own frame ended the stream: what the client had sent meanwhile is dropped, and its
    // $disconnect has nothing left to end (the row expires).
    if (event.kind === 'disconnect') server.rates.forget(event.connectionId);
    else {
      server.log.debug('frame after its stream ended', { connectionId: event.connectionId });
      // The ending frame may have failed after the mark, before the socket was closed (a
      // throttled DeleteConnection): its redelivery, or any frame after it, closes it again (a
      // 410 when it is gone already).
      await closeConnection(server, event.connectionId);
    }
    return;
  }
  if (event.kind === 'disconnect') {
    server.rates.forget(event.connectionId);
    // A deleted account's stream that sent nothing more: its contacts are told now.
    if (stored) await fireRevoked(server, stored);
    // A module may keep the session without its socket (resumable stream management).
    if (stored)
      await server.host.fire('connection-vanished', {
        connectionId: event.connectionId,
        state: stored,
        disconnected: true,
      });
    return;
  }
  if (
    (event.frameId && stored?.savedFrame === event.frameId) ||
    (event.seq !== undefined && stored?.doneSeq !== undefined && sequenceAtMost(event.seq, stored.doneSeq))
  ) {
    // Redelivered after its work and state were saved (SQS redelivers a batch whose invocation
    // timed out, or whose delete was lost): handling it again would repeat it.
    server.log.info('redelivered frame already handled', { connectionId: event.connectionId });
    return;
  }
  // No row yet: the stream's first frame (`$connect` writes none); or a frame after its
  // `$disconnect` deleted the row (a redrive from the dead-letter queue; README, Limits).
  const newRow: NewConnection | undefined = stored
    ? undefined
    : {
        connectedAt: event.connectedAt ?? event.receivedAt,
        ...(event.sourceIp ? { sourceIp: event.sourceIp } : {}),
      };
  const state: ConnectionState = stored ?? {
    connectionId: event.connectionId,
    connectedAt: newRow?.connectedAt ?? event.receivedAt,
    ...(newRow?.sourceIp ? { sourceIp: newRow.sourceIp } : {}),
    streamOpen: false,
    authFailures: 0,
  };
  if (state.user) addLogContext({ jid: state.user });
  const stream = new XmppStream(server, state, event.frameId, event.seq, event.followed ?? false, newRow);
  stream.keepRow = carry.keepRow ?? false;
  await inFrame(
    {
      ...event,
      ...(stored?.storedOffline ? { storedOffline: stored.storedOffline } : {}),
    },
    () => handleFrame(stream, event),
  );
  return stream.savedRow;
}

async function fireRevoked(server: Server, state: ConnectionState): Promise<void> {
  if (!state.revoked || !state.user) return;
  await tellRevoked(server, {
    user: state.user,
    ...(state.resource ? { resource: state.resource } : {}),
    revocation: state.revoked,
    ...(state.directedTo ? { directedTo: state.directedTo } : {}),
  });
}

async function handleFrame(stream: XmppStream, event: StreamEvent): Promise<void> {
  const { server } = stream;
  if (stream.frameId && stream.state.answeredFrame === stream.frameId && stream.state.answer) {
    // This frame answered already, saved before the answer went out (answerOnce): the same
    // answer again, since its post may not have reached the client; nothing is decided anew.
    server.log.info('redelivered frame answered again as before', { connectionId: event.connectionId });
    await stream.send(parse(stream.state.answer) as Element);
    await stream.save();
    return;
  }
  if (stream.state.revoked && stream.state.user) {
    // Its account was deleted while the stream was open (infra/account-deletion.ts): the identity
    // it authenticated as is gone, so it ends here with RFC 6120 §4.9.3.12's <not-authorized/>
    // (the frame is not handled: nothing more is sent as the account), once its contacts are
    // told what the deletion changed for them.
    server.log.info('frame of a deleted account: stream ended', { connectionId: event.connectionId });
    await fireRevoked(server, stream.state);
    await stream.fail(new StreamError('not-authorized', 'Account deleted'));
    return;
  }
  try {
    chargeRate(stream, event);
    checkAuthTime(stream, event);
    const element = parseFrame(event.frame, server.config.maxStanzaBytes);
    addLogContext({ element: element.name });
    await dispatch(stream, element);
  } catch (error) {
    // A resume on another connection took this stream's session over: whatever this frame was,
    // it is not this stream's to handle any more (the resumer closes the socket).
    if (error instanceof ConnectionFencedError) {
      server.log.debug('frame of a fenced connection stopped', { connectionId: event.connectionId });
      return;
    }
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
