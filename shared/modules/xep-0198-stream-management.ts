/**
 * XEP-0198 Stream Management: `urn:xmpp:sm:3` (v1.6, what clients speak) and the seed draft
 * `urn:xmpp:sm:1` (v0.7, u/h sequence attributes). Acks and resumption, with both counters
 * and the unacknowledged queue in DynamoDB (shared/store/sm-queue.ts), since every frame may
 * run in another Lambda and the socket may vanish at any time.
 *
 * Choices where the seed's examples contradict its normative text (the text wins):
 * - `<a u='1'/>` (seed §6 examples): "An <a/> element MUST contain an 'h' attribute" →
 *   `<failed><bad-request/></failed>`.
 * - `<resume previd='…' h='foo'/>` (seed §5 example): `h` is an xs:integer → bad-request.
 * - `<r/>` without `u`: "An <r/> element MUST contain a 'u' attribute" → bad-request. A
 *   repeated or older `u` is still acknowledged ("the recipient MUST acknowledge it"); the
 *   optional `h` on `<r/>` and `u` on `<a/>` are honoured; `<resume/>` "SHOULD include an
 *   'h'", so one without acknowledges nothing new.
 * - The seed's `<enabled/>` schema has no `id`; its §5 text requires one when resumable, so
 *   `<enabled id='…' resume='true'/>` is sent, as in its §5 example.
 */
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { Element, parse } from 'ltx';
import { closeConnection, DIRECT_POST_BOUND_MS, post, postExactly } from '../core/delivery.ts';
import {
  frameAge,
  frameRedelivered,
  frameTimeLeft,
  nextDeliveryKey,
  peekDeliveryKey,
  sequenceAtMost,
} from '../core/frame.ts';
import {
  type DeliveryGroup,
  type DeliveryItem,
  type DeliveryOptions,
  type DeliveryResult,
  HANDLED,
  isBound,
  type Server,
  type SessionEndReason,
  type SessionRef,
  type Stream,
  type SweepRun,
  type UndeliveredStanza,
} from '../core/host.ts';
import { endSession, kickConnection, tellRevoked } from '../core/lifecycle.ts';
import { rerouteUndelivered } from '../core/router.ts';
import { stampDelay } from '../core/stanzas.ts';
import { isTransient, RetryLaterError, withTransientRetries } from '../core/transient.ts';
import { StreamError } from '../errors.ts';
import {
  ConnectionFencedError,
  type ConnectionState,
  MAX_CARRIED_TRANSFER_BYTES,
  type OfflineTransfer,
  ResourceTakenError,
  type SmState,
} from '../store/sessions.ts';
import {
  AckBeyondQueueError,
  type AppendManyResult,
  type AppendResult,
  boundReached,
  countCovers,
  isSweepShardOf,
  markCovers,
  markFrame,
  movedOn,
  NotSessionOwnerError,
  PROBE_AFTER_MS,
  postedUpTo,
  REROUTE_RETRY_MS,
  REROUTE_SHARD,
  type SenderMark,
  type SmEntry,
  type SmQueueItem,
  type SmVersion,
  UncertainQueueError,
  windowAt,
} from '../store/sm-queue.ts';
import { NS } from '../xml/namespaces.ts';

export const SM3 = 'urn:xmpp:sm:3';
export const SM1 = 'urn:xmpp:sm:1';
const WRAP = 2 ** 32;

const namespaceOf = (version: SmVersion) => (version === 'sm3' ? SM3 : SM1);

export function register(server: Server): void {
  const { host } = server;
  host.nonza(SM3, (stream, element) => handle(stream, element, 'sm3'));
  host.nonza(SM1, (stream, element) => handle(stream, element, 'sm1'));
  host.hook('stream-features', ({ stream, features }) => {
    if (stream.user && !stream.state.resource) advertise(features, server);
    return undefined;
  });
  // XEP-0198 §4: every stanza counts, even one that is refused: counted before routing, and
  // the count is written before the stanza goes anywhere, unless a resume fenced this
  // connection: so every stanza the old connection routes is in the h that <resumed/> reports.
  host.hook('stanza-in', (event) => countInbound(event.stream, event.repeatable), { priority: 100 });
  host.provideStanzaQueue({
    deliver: (smId, stanza, options) => deliverToSmSession(server, smId, stanza, options),
    queuedBefore: (smId) => queuedBefore(server, smId),
    requestAck: (stream) => requestAckIfUnacknowledged(stream),
    queuedStored: (stream) => {
      const sm = smState(stream);
      // Serial posting only: see removeStoredFirst.
      if (sm && !sm.stored && server.config.smPostOrder === 'serial')
        stream.update({ sm: { ...sm, stored: true } });
    },
    attached: (smIds) => server.smQueue.attached(smIds),
    deliverTogether: (stream, send) => deliverTogether(server, stream, send),
    deliverMany: (smId, items) => deliverMany(server, smId, items),
  });
  host.hook('connection-vanished', (event) => keepResumable(server, event), { priority: 10 });
  host.hook('session-ending', ({ session, reason, undelivered, afterReroute }) =>
    endSmSession(server, session, reason, undelivered, afterReroute),
  );
  // The sweeper's phases, each on its own (core/lifecycle.ts `runSweep`): expiries and
  // interrupted re-routes first, then the other modules' phases (XEP-0136's, priority 10), and
  // the liveness probes last: they post to API Gateway, one per attached session due, and a post
  // that keeps failing (429, 5xx) must not hold up the rest. A session a probe detaches expires
  // in a later run (its window starts at the detach). Only where sweeps run: the condition is
  // folded at build time, and the other functions' bundles drop this code (`bundleDefines`).
  if (process.env.NIMBUS_SWEEPS !== 'false') {
    host.hook('sweep', (run) => run.phase('expire', () => expireDetachedSessions(server, run)), {
      priority: 30,
    });
    host.hook('sweep', (run) => run.phase('reroute', () => finishInterruptedReroutes(server, run)), {
      priority: 20,
    });
    host.hook('sweep', (run) => run.phase('probe', () => probeAttachedSessions(server, run)), {
      priority: -10,
    });
  }
}

function advertise(features: Element, server: Server): void {
  // XEP-0198 1.6.3: <sm xmlns='urn:xmpp:sm:3'/> ("Remove leftover <optional/> and <required/>").
  features.c('sm', { xmlns: SM3 });
  // Seed §4: 'max' is the longest resumption time, 'stanzas' the preferred ack interval.
  features
    .c('sm', {
      xmlns: SM1,
      max: String(server.config.smMaxSeconds),
      stanzas: String(server.config.smAckEvery),
    })
    .c('optional');
}

// ---------------------------------------------------------------------------------------------
// Encode

function failed(version: SmVersion, condition: string, h?: number): Element {
  const el = new Element('failed', {
    xmlns: namespaceOf(version),
    // sm:3 (1.6) §5: <failed h='…'/> tells the client what was handled. The seed's <failed/> has
    // no attributes (its schema: only the stanza error), and no count to tell with them.
    ...(h === undefined || version !== 'sm3' ? {} : { h: String(h % WRAP) }),
  });
  el.c(condition, { xmlns: NS.stanzas });
  return el;
}

function ackRequest(version: SmVersion, number: number): Element {
  return new Element('r', {
    xmlns: namespaceOf(version),
    ...(version === 'sm1' ? { u: String(number % WRAP) } : {}),
  });
}

function ack(version: SmVersion, h: number): Element {
  return new Element('a', { xmlns: namespaceOf(version), h: String(h % WRAP) });
}

function tooHigh(version: SmVersion, h: number, sendCount: number): StreamError {
  const text = 'You acknowledged more stanzas than were sent';
  // sm:3 §4's detail; the seed (sm:1) defines none.
  if (version === 'sm1') return new StreamError('undefined-condition', text);
  return new StreamError(
    'undefined-condition',
    text,
    new Element('handled-count-too-high', {
      xmlns: SM3,
      h: String(h),
      'send-count': String(sendCount % WRAP),
    }),
  );
}

/**
 * An `h` behind the last acknowledged count: forward of it by half the counter's range or more
 * (a count never runs that far ahead of the last ack). An answer to an older `<r/>` of ours
 * overtaken by a newer one (the seed's `u`, echoed), not a count of more than was sent.
 */
export function isStaleCount(h: number, acked: number): boolean {
  return unwrap(h, acked) - acked >= WRAP / 2;
}

/** XEP-0203 stamp of when a stanza was first queued, unless the server already stamped it. */
function withDelay(server: Server, stanzaXml: string, time: number): Element {
  const stanza = parse(stanzaXml);
  // XEP-0203 stamps messages and presence alike; an iq is never stamped.
  if (stanza.name === 'message' || stanza.name === 'presence') stampDelay(stanza, server.config.domain, time);
  return stanza;
}

// ---------------------------------------------------------------------------------------------
// Decode

/** A counter attribute: an integer 0 ≤ n < 2^32, or undefined when malformed or missing. */
export function counter(value: string | undefined): number | undefined {
  if (value === undefined || !/^\d{1,10}$/.test(value)) return undefined;
  const n = Number(value);
  return n < WRAP ? n : undefined;
}

/** The unwrapped count a wire value `h` (mod 2^32) stands for, given the last known count. */
export function unwrap(h: number, from: number): number {
  return from + ((h - (from % WRAP) + WRAP) % WRAP);
}

// ---------------------------------------------------------------------------------------------
// Sending through the queue

export interface SmSendOptions {
  /** The offline message this stanza came from: removed from storage once acknowledged. */
  offlineId?: string;
  /** A XEP-0013 view/fetch copy of a message that stays stored: never re-routed. */
  offlineCopy?: boolean;
}

/**
 * Whether an earlier delivery of the current frame gave this session the stanza its next
 * delivery would (StanzaQueue.queuedBefore): its entry is queued (an ended session's too, which
 * its re-route delivers), its append holds the stream, or it was acknowledged since (what
 * `append` answers 'acknowledged' for). Read only for a redelivered frame.
 */
async function queuedBefore(server: Server, smId: string): Promise<boolean> {
  const delivery = peekDeliveryKey(`sm:${smId}`);
  if (!delivery?.redelivered) return false;
  const item = await server.smQueue.get(smId);
  if (!item) return false;
  if (item.entries.some((entry) => entry.k === delivery.key)) return true;
  if (item.ended) return false;
  if (item.lastKey === delivery.key) return true;
  if (server.config.smPostOrder !== 'serial') return false;
  return (
    heldBy(item, delivery.key) ||
    (delivery.from !== undefined && markCovers(item.senderMarks?.[delivery.from], delivery.key))
  );
}

/**
 * Queues a stanza for an SM session and posts it if the session is attached and not
 * replaying. Returns 'sent' when the session took responsibility for it (posted or queued),
 * 'gone' when there is no session any more and the caller must re-route.
 */
async function deliverToSmSession(
  server: Server,
  smId: string,
  stanza: Element,
  options: DeliveryOptions = {},
): Promise<DeliveryResult> {
  const delivery = nextDeliveryKey(`sm:${smId}`);
  // A stored message sent from offline storage is keyed by its id: the same whatever else the
  // frame delivers to this session, and it is flooded to a session once.
  // Outside a frame (the sweeper's work), a key of its own: an entry whose post fails can still
  // be found and marked uncertain.
  // A XEP-0013 transfer's copy or result is keyed by its transfer (DeliveryOptions.key).
  const key =
    options.offlineId && delivery
      ? `o:${options.offlineId}`
      : (options.key ?? delivery?.key ?? `x:${randomBytes(9).toString('base64url')}`);
  const entry: SmEntry = {
    s: stanza.toString(),
    t: delivery?.at ?? Date.now(),
    ...(options.offlineId ? { o: options.offlineId } : {}),
    ...(options.offlineCopy ? { c: true } : {}),
    ...(options.alsoTo?.length ? { a: options.alsoTo } : {}),
    ...(key ? { k: key } : {}),
  };
  const serial = server.config.smPostOrder === 'serial';
  const group =
    serial && options.group instanceof SerialGroup && options.group.smId === smId ? options.group : undefined;
  if (delivery?.redelivered && key) {
    // An earlier delivery of this frame may have queued it already, and posted it or not; or,
    // its entry acknowledged since, may still hold the stream (SM_POST_ORDER=serial).
    const queued = await server.smQueue.get(smId);
    // Resumed on another connection since: that resume goes on from the queue as it found it
    // (settling this key here would close the new connection and mark what it replayed).
    if (movedFrom(queued, options.attachedTo)) {
      group?.abandon();
      return 'gone';
    }
    const at = queued?.entries.findIndex((waiting) => waiting.k === key) ?? -1;
    if (queued && (at >= 0 || (serial && heldBy(queued, key)))) {
      server.log.debug('stanza already in the stream-management queue', { smId, id: stanza.attrs.id });
      return settleUnknownPost(server, smId, key, queued, 'redelivered');
    }
  }
  // From before the append: an append the SDK tried again may have been written (and later
  // entries posted) long before it returned.
  const appendedAt = Date.now();
  // The hold is this attempt's alone: a retry of the frame, or another delivery of the same
  // stored message, has a key like it but never the same token.
  // A group's appends share one token: whichever of them takes the hold, the group posts once
  // its sends are queued.
  const token = serial ? (group?.token ?? `${key}#${randomBytes(6).toString('base64url')}`) : undefined;
  // A client's message (one stanza per frame, one delivery per session): marked with its
  // sender's connection, so that a redelivery of its frame never queues it twice, even once it was
  // acknowledged and other senders' entries came after it (see SenderMark). Not a presence
  // broadcast or a probe's answers, nor an error bounced to the sender: what such a frame
  // delivers to one session may differ from one delivery of the frame to the next, and a mark
  // would refuse what the earlier one never queued. Serial posting only: with `checked`, an
  // acknowledged entry is not surely one the client got (settledPastIt queues it again).
  const mark =
    serial &&
    delivery?.from &&
    stanza.name === 'message' &&
    stanza.attrs.type !== 'error' &&
    !options.offlineId &&
    !options.offlineCopy
      ? { from: delivery.from, key }
      : undefined;
  const result = await appendOnce(
    server,
    smId,
    entry,
    token,
    mark,
    options.answer ? 'answer' : options.reply ? 'reply' : undefined,
    options.attachedTo,
  );
  // The group's hold, whoever of its appends took it and whatever this one's outcome: the group
  // posts what is queued once its sends are done.
  if (group && 'item' in result && result.item) {
    const { item } = result;
    const at = result.kind === 'found' ? item.entries.findIndex((queued) => queued.k === key) : -1;
    group.seen(item, result.kind === 'queued' ? result.number : at >= 0 ? item.base + at + 1 : undefined);
  }
  if (result.kind === 'found') {
    // Found by its key after a failed write, on a session resumed elsewhere since: the resume that
    // took it found this entry queued and goes on from it. (Detached, it is settled as any other:
    // a later entry may have reached the client first, and the resume's count must not cover it.)
    if (movedFrom(result.item, options.attachedTo)) {
      group?.abandon();
      return 'gone';
    }
    // Queued under the group's own hold: nobody has posted it (a resume's attach takes the hold),
    // and the group will.
    if (group?.holds(result.item)) return 'sent';
    return settleUnknownPost(server, smId, key, result.item, 'uncertain-append');
  }
  server.log.debug('stanza to a stream-management queue', {
    smId,
    id: stanza.attrs.id,
    result: result.kind,
    ...(result.kind === 'queued'
      ? { number: result.number, attached: result.item.connectionId, holding: result.item.holding }
      : {}),
  });
  if (result.kind === 'ended' || result.kind === 'moved') {
    group?.abandon();
    return 'gone';
  }
  if (result.kind === 'acknowledged') return 'sent';
  if (result.kind === 'full') {
    // The client asked and is not acknowledging what it was sent: its answer is not dropped
    // (RFC 6120 §8.2.3 "MUST reply"; its request is counted handled already), nor waited for.
    if (options.answer) throw new StreamError('policy-violation', 'Too many unacknowledged stanzas');
    const full = await whenFull(server, smId, result.item);
    // Ended (an overflow): the group posts nothing into the kicked socket.
    if (full === 'gone') group?.abandon();
    return full;
  }
  const { item, number } = result;
  if (result.found === 'refused' && !group?.holds(item))
    return settleUnknownPost(server, smId, key, item, 'uncertain-append', 'found by its key');
  if (
    result.found === 'ambiguous' &&
    ((item.holding && item.holder !== token) || (item.settledOut !== undefined && number <= item.settledOut))
  ) {
    // Written, its answer lost, and a resume attached the session meanwhile: the replay that
    // stopped holding at `settledOut` posted it (or its count covered it), and the one holding now
    // will. Posting it as well would reach the client twice, counted twice, and its next ack
    // would be "too high" for the queue (seed 10 of session 11's final target run: bob's resumed
    // stream ended with handled-count-too-high).
    server.log.info('an append whose answer was lost was sent by a resume meanwhile', { smId, number });
    return 'sent';
  }
  // Written, its answer lost, and the session detached meanwhile: it was never posted, and a later
  // entry may have reached the client first, which the resume's count must not take as covering
  // it. Settled as one found by its key (marked uncertain unless last).
  if (result.found === 'ambiguous' && !item.connectionId)
    return settleUnknownPost(server, smId, key, item, 'uncertain-append', 'answer lost, detached');
  // Acks are asked for by count and by bytes, and a queue holding too many bytes refuses more
  // (the senders wait) rather than grow toward DynamoDB's 400 KB item limit and end the stream.
  const bytes = queuedBytes(item.entries);
  const size = entryBytes(entry);
  // The stream's own answers pass congestion, within their count margin; a large one is an item
  // of its own (SM_OWN_ITEM_BYTES), so the queue item's size does not bound their bytes: this does.
  if (options.answer && bytes > ANSWER_BYTES_BOUND)
    throw new StreamError('policy-violation', 'Too many unacknowledged stanzas');
  const congested = bytes > server.config.smQueueMaxBytes;
  if (congested) await server.smQueue.setCongested(smId, true);
  if (!item.connectionId) {
    // Detached: the stanza waits for a resume, unless the window has already closed.
    if (item.sweepAt !== undefined && item.sweepAt <= Date.now())
      await endSession(server, sessionOfItem(item), 'expired');
    return 'sent';
  }
  if (group) {
    // Asked for by the group's caller once the window is out.
    group.queued(key, stanza);
    return 'sent';
  }
  const askByBytes =
    Math.floor(bytes / server.config.smAckBytes) > Math.floor((bytes - size) / server.config.smAckBytes);
  if (token)
    return postInOrder(
      server,
      smId,
      token,
      { item, number },
      new Map([[key, stanza]]),
      askByBytes || congested,
    );
  if (item.holding) {
    if (holdExpired(server, item)) await forceResume(server, item.connectionId, 'lease', 'replay');
    return 'sent';
  }
  // From here the stanza is queued: whatever happens to the post, it is the session's, and the
  // sender's frame must not fail (a redelivery would queue it again).
  const posted = await postQueued(server, item.connectionId, stanza);
  // Landed late (a slow post, a 429 tried again, a paused invocation): other senders' later
  // entries, appended meanwhile, may have reached the client before it, and a socket lost in
  // between leaves the client with them and without this one, which its count would then cover
  // as a prefix does (seed 9 of session 10's first target run: a post 582 ms after its append,
  // seven later entries before it, the socket gone in between, and the entry lost). Marked
  // uncertain when a later entry was queued, with its bound (SmEntry.b): a count that reaches
  // the bound settles it, a lower one sends it again. With SM_LATE_POST_MS at 0 (the default)
  // every answered post is checked, however fast: two posts crossing within milliseconds of a
  // socket's death did lose the earlier one (seed 17 of session 11's second target run). A
  // resume or an ack that counts past it before the mark has it queued again (below).
  const tookMs = Date.now() - appendedAt;
  const late = posted === 'sent' && tookMs >= server.config.smLatePostMs;
  // Logged at info when slow (SLOW_POST_MS); with SM_LATE_POST_MS at 0, every post is "late".
  if (late && tookMs > SLOW_POST_MS)
    server.log.info('a stream-management post landed late', { smId, ms: tookMs });
  try {
    // Failed, unanswered or refused (410) while other senders' later entries may have gone out:
    // the client's count can no longer tell whether it has this one (the socket is closed or
    // gone: it resumes, and that resume sends it again). Refused, it surely does not have it.
    // Tried again at once when DynamoDB fails it: left to the frame's redelivery, the mark would
    // be made without what this post learnt (a 410 says the client surely lacks the entry), and
    // a resume's count could then no longer vouch for the entries after it (seed 5 of session 8's
    // target run: a 410 whose mark met four 500s in a row, and a stanza the client had came again).
    if (posted !== 'sent' || late) {
      const connectionId = item.connectionId;
      const marked = await withTransientRetries(MARK_ATTEMPTS, () =>
        // A 410 is marked even on the last entry: that the client surely lacks it lets a resume's
        // count vouch for the uncertain entries before it (an exact count, see countCovers).
        server.smQueue.markUncertain(
          smId,
          key,
          posted === 'unclosed' || posted === 'gone',
          connectionId,
          posted === 'gone',
          // Answered: it did land, and the mark records before which entries (SmEntry.b).
          posted === 'sent',
        ),
      );
      // Too late to mark: an ack or a resume already settled the count while the post was on its
      // way (late, timed out, refused), and took it as a prefix (it is no longer queued) though
      // later entries were queued after it, which may have overtaken it. Whether the client has
      // it, nobody can tell now: it is queued again (a duplicate at worst), or re-routed if the
      // session has ended.
      if (marked === false && (await settledPastIt(server, smId, key, number, connectionId))) {
        server.log.info('a post that was late or failed was settled before its mark: queued again', {
          smId,
          id: stanza.attrs.id,
        });
        return deliverToSmSession(server, smId, stanza, options.offlineCopy ? { offlineCopy: true } : {});
      }
    }
  } finally {
    // Kept in the queue: the session detaches (or ends, re-routing it) through the lifecycle.
    if (posted === 'gone') await server.host.fire('connection-vanished', { connectionId: item.connectionId });
  }
  if (posted === 'gone') return 'sent';
  if (posted !== 'sent') return 'sent';
  if (number % server.config.smAckEvery === 0 || askByBytes || congested) {
    // Batched: one <r/> per smAckEvery stanzas or smAckBytes queued, each being a paid
    // message and invocation.
    await postQueued(server, item.connectionId, ackRequest(item.version, number));
  }
  return 'sent';
}

/**
 * An `attachedTo` delivery's session resumed on another connection since (attached there, or
 * detached from there: see `movedOn`); not one merely detached, whose resume is still to come.
 */
function movedFrom(item: SmQueueItem | undefined, attachedTo: string | undefined): boolean {
  return attachedTo !== undefined && item !== undefined && !item.ended && movedOn(item, attachedTo);
}

/** Whether the stream is held by a delivery of `key` (an attempt's token is `<key>#<random>`). */
function heldBy(item: SmQueueItem, key: string): boolean {
  return item.holder?.startsWith(`${key}#`) === true;
}

/**
 * A hold older than its lease (a poster's, or a resume's replay's): no living function has it,
 * or its replay stopped without closing the socket (the close failed). An `<enable/>`'s hold
 * has no time (its late switch may wait long).
 */
function holdExpired(server: Server, item: SmQueueItem): boolean {
  return (
    item.holding === true &&
    item.holdingAt !== undefined &&
    Date.now() - item.holdingAt > server.config.smPosterLeaseMs
  );
}

/**
 * Time kept in hand to close the socket when a poster's invocation runs out (ms): a post may take
 * 2 s to time out. At most half of what was left when the poster started (short timeouts).
 */
const POSTER_MARGIN_MS = 3_000;

/**
 * SM_POST_ORDER=serial: the delivery that queued `key` posts the session's queue in order if its
 * append took the hold (nobody held it); every other delivery only queues. The holder posts each
 * entry after the last one posted (`settledOut`) once the one before was answered, then lets the
 * hold go with a write conditional on nothing having been appended since (else it posts those
 * too). No two posts to the stream are ever in flight at once, so the client's count is always a
 * prefix of the queue: a resume sends again exactly what it lacks, and nothing is marked.
 *
 * A post that fails or goes unanswered closes the socket (postQueued) and the hold stays until
 * the resume's attach takes it over; a resume that attaches meanwhile takes it too, and the
 * holder stops at its next release. A hold past its lease (the poster's function died) makes the
 * next delivery close the socket.
 */
async function postInOrder(
  server: Server,
  smId: string,
  token: string,
  { item, number: ownNumber }: { item: SmQueueItem; number: number },
  /** The stanzas the caller queued, by key: posted as they are rather than parsed again. */
  own: ReadonlyMap<string, Element>,
  askAtEnd: boolean,
): Promise<DeliveryResult> {
  const connectionId = item.connectionId as string;
  if (item.holder !== token) {
    // A replay (`true`) or another sender holds the session: it posts this entry before it lets go.
    if (holdExpired(server, item)) await forceResume(server, connectionId, 'lease', 'poster');
    return 'sent';
  }
  let current = item;
  const margin = Math.min(POSTER_MARGIN_MS, (frameTimeLeft() ?? Number.POSITIVE_INFINITY) / 2);
  // A hold older than its lease reads as its poster's death: the next sender closes the socket.
  // A poster stops before its own hold would read so, whatever its invocation's time left (the
  // sweeper's, 50 s, outlives the lease; a local runner's deliveries have no deadline).
  const leaseMargin = Math.min(POSTER_MARGIN_MS, server.config.smPosterLeaseMs / 2);
  // Every entry up to `settledOut` went out in order (or was acknowledged) when the last hold was let go.
  let sent = Math.max(current.settledOut ?? ownNumber - 1, current.base);
  let asked = 0;
  // Another group's window of stored messages (queued while this poster held the stream): that
  // group asked for an ack when it was queued, and its `<r/>` went out ahead of it. Asked again
  // once it is posted, or its transfer waits for an ack nobody asked for.
  let othersWindow = false;
  for (;;) {
    for (let number = sent + 1; number <= current.out; number++) {
      const entry = current.entries[number - current.base - 1];
      // Acknowledged already (posted by an earlier replay): nothing to post.
      if (!entry) {
        sent = number;
        continue;
      }
      if ((entry.o !== undefined || entry.c) && !(entry.k !== undefined && own.has(entry.k)))
        othersWindow = true;
      const left = frameTimeLeft();
      const leaseLeft =
        current.holdingAt === undefined
          ? Number.POSITIVE_INFINITY
          : current.holdingAt + server.config.smPosterLeaseMs - Date.now();
      if ((left !== undefined && left < margin) || leaseLeft < leaseMargin) {
        // Out of time mid-burst (the invocation's, or the hold's lease): the resume carries on
        // where the client's count says.
        await forceResume(server, connectionId, 'out-of-time');
        return 'sent';
      }
      const mine = entry.k === undefined ? undefined : own.get(entry.k);
      const text = mine
        ? undefined
        : (await withTransientRetries(MARK_ATTEMPTS, () => server.smQueue.stanzas(smId, [entry])))[0];
      if (!mine && text === undefined) {
        // A large stanza's own item, gone: acknowledged meanwhile (its trim deletes it).
        server.log.warn(OWN_ITEM_GONE, { smId, number });
        sent = number;
        continue;
      }
      const posted = await postQueued(server, connectionId, mine ?? parse(text as string));
      if (posted !== 'sent') {
        // Closed (failed, unanswered) or gone (410): the client resumes, and the hold stays ours
        // until that resume's attach takes it; nothing after this entry was posted.
        if (posted === 'gone') await server.host.fire('connection-vanished', { connectionId });
        return 'sent';
      }
      sent = number;
      if (number % server.config.smAckEvery === 0) {
        asked = number;
        await postQueued(server, connectionId, ackRequest(current.version, number));
      }
    }
    const outcome = await withTransientRetries(MARK_ATTEMPTS, () =>
      server.smQueue.releasePoster(smId, token, sent, connectionId),
    );
    if (outcome.released) break;
    const now = outcome.item;
    // The session ended, or a resume took the hold (its replay starts at the client's count).
    if (!now || now.holder !== token || now.connectionId !== connectionId) return 'sent';
    // More was queued meanwhile: posted too, then the hold is let go again.
    current = now;
  }
  if ((askAtEnd || othersWindow) && asked !== sent)
    await postQueued(server, connectionId, ackRequest(current.version, sent));
  return 'sent';
}

/**
 * SM_POST_ORDER=serial: deliveries to one session queued one after the other and posted in one
 * run (StanzaQueue.deliverTogether), a window of stored messages. The group's appends share a
 * token: the first to find the session's hold free takes it, the later ones find it theirs, and
 * none posts; once the group's sends are queued, `postInOrder` posts from where the hold started
 * through whatever is queued by then (other senders' stanzas too) and lets the hold go once.
 * One by one, each message's own poster let the hold go after its post: a write of the whole
 * queue item per message, about half of a flood's writes to it (`bench/offline.ts --flood`).
 *
 * The hold lasts the group's appends and posts. The token names the frame (`<frame id>:g#...`,
 * never a delivery key): a redelivery of a frame that died holding finds its hold and closes the
 * socket (the resume sends what the client lacks) before it sends anything, whatever it then
 * sends; outside a frame the lease is the only way out, as for a poster dying mid-burst.
 */
class SerialGroup implements DeliveryGroup {
  readonly token: string;
  /** The queue as the group's appends last saw it. */
  private item?: SmQueueItem;
  /** Whether one of the group's appends took the hold. */
  private held = false;
  /** The number of the first entry seen queued under the group's hold. */
  private first?: number;
  /** A delivery found the session moved on or ended: the group posts nothing. */
  private abandoned = false;
  private readonly own = new Map<string, Element>();

  constructor(
    readonly smId: string,
    frameId: string,
  ) {
    this.token = `${frameId ? `${frameId}:g` : 'g'}#${randomBytes(6).toString('base64url')}`;
  }

  holds(item: SmQueueItem): boolean {
    return item.holder === this.token;
  }

  seen(item: SmQueueItem, number?: number): void {
    this.item = item;
    if (!this.holds(item)) return;
    this.held = true;
    if (this.first === undefined && number !== undefined) this.first = number;
  }

  queued(key: string, stanza: Element): void {
    this.own.set(key, stanza);
  }

  abandon(): void {
    this.abandoned = true;
  }

  async post(server: Server): Promise<void> {
    const { item } = this;
    if (!item || this.abandoned) return;
    if (!this.held) {
      // Another poster or a resume's replay held the session at each append: it posts them.
      if (item.connectionId && holdExpired(server, item))
        await forceResume(server, item.connectionId, 'lease', 'poster');
      return;
    }
    // From `settledOut` (set when the hold was last let go, and unchanged while the group holds);
    // without one, from the group's first entry.
    const from = item.settledOut !== undefined ? item.settledOut + 1 : (this.first ?? item.out + 1);
    await postInOrder(server, this.smId, this.token, { item, number: from }, this.own, false);
  }
}

/**
 * A redelivered frame: an earlier attempt of it may have died while a group of its deliveries
 * held the stream (`<frame id>:g#...`), its entries queued and not posted. The socket is closed
 * so that the client resumes; the resume's attach takes the hold over. Read at the start of a
 * redelivered frame's group, and of a redelivered `<a/>` (whose ack may no longer start a window).
 */
async function settleDeadGroup(server: Server, smId: string, frameId: string): Promise<void> {
  if (frameId === '') return;
  const item = await server.smQueue.get(smId);
  if (!item || item.ended || !item.connectionId || !item.holder?.startsWith(`${frameId}:g#`)) return;
  await forceResume(server, item.connectionId, 'redelivered', 'a group of its deliveries held the stream');
}

/** StanzaQueue.deliverTogether: a group only with serial posting, to the stream's own session. */
async function deliverTogether<T>(
  server: Server,
  stream: Stream,
  send: (group: DeliveryGroup | undefined) => Promise<T>,
): Promise<T> {
  const sm = smState(stream);
  if (!sm || server.config.smPostOrder !== 'serial') return send(undefined);
  const group = new SerialGroup(sm.id, stream.frameId);
  if (frameRedelivered()) await settleDeadGroup(server, sm.id, stream.frameId);
  let result: T;
  try {
    result = await send(group);
  } catch (error) {
    // What the group queued before the failure goes out, as it would have one by one; the frame
    // still fails (its redelivery finds those entries queued).
    await group.post(server).catch((postError: unknown) =>
      server.log.warn('posting a group of deliveries after a failure failed', {
        smId: sm.id,
        error: postError,
      }),
    );
    throw error;
  }
  await group.post(server);
  return result;
}

/**
 * StanzaQueue.deliverMany: a group's window in one append when it can be (`appendWindow`), else
 * one by one, stopping at the first not taken.
 */
async function deliverMany(
  server: Server,
  smId: string,
  items: readonly DeliveryItem[],
): Promise<DeliveryResult[]> {
  const together = await appendWindow(server, smId, items);
  if (together) return together;
  const results: DeliveryResult[] = [];
  for (const { stanza, options } of items) {
    const result = await deliverToSmSession(server, smId, stanza, options);
    results.push(result);
    if (result !== 'sent') break;
  }
  return results;
}

/**
 * A window of a group's stanzas (SM_POST_ORDER=serial: XEP-0160 and XEP-0013 windows of stored
 * messages, the contacts' presence a login's probes are answered with) queued in one write
 * (SmQueueStore.appendMany), billed once on the queue item instead of once per stanza on an item
 * that grows with each. Only deliveries to a session still on the stream's connection, never an
 * answer, each keyed as one by one would key it (its own key, else the frame's delivery key);
 * not on a redelivered frame, whose deliveries each look for an earlier attempt's entry first.
 * Undefined when it was not done (those cases, or the window does not fit the queue now): the
 * caller delivers one by one, which tells which fit, and takes the frame's delivery keys as it
 * would have.
 */
async function appendWindow(
  server: Server,
  smId: string,
  items: readonly DeliveryItem[],
): Promise<DeliveryResult[] | undefined> {
  const group = items[0]?.options.group;
  const attachedTo = items[0]?.options.attachedTo;
  if (
    items.length < 2 ||
    server.config.smPostOrder !== 'serial' ||
    !(group instanceof SerialGroup) ||
    group.smId !== smId ||
    attachedTo === undefined ||
    frameRedelivered() ||
    !items.every(
      ({ options }) =>
        options.group === group && options.attachedTo === attachedTo && !options.answer && !options.reply,
    )
  )
    return undefined;
  // The keys and times deliverToSmSession gives them, in a frame: each takes the frame's next
  // delivery key for the session (`<frame id>:<n>`), which keys it unless it has a key of its own.
  const delivery = peekDeliveryKey(`sm:${smId}`);
  if (!delivery) return undefined;
  const frameKey = delivery.key.slice(0, delivery.key.length - String(delivery.position).length);
  const keyOf = (options: DeliveryOptions, at: number) =>
    options.offlineId ? `o:${options.offlineId}` : (options.key ?? `${frameKey}${delivery.position + at}`);
  const entries: SmEntry[] = items.map(({ stanza, options }, at) => ({
    s: stanza.toString(),
    t: delivery.at,
    ...(options.offlineId ? { o: options.offlineId } : {}),
    ...(options.offlineCopy ? { c: true } : {}),
    k: keyOf(options, at),
  }));
  // Congestion is seen after an append: one by one, an append passes the byte bound by one
  // stanza at most; a window, by no more than this.
  if (queuedBytes(entries) > WINDOW_APPEND_MAX_BYTES) return undefined;
  const result = await appendManyOnce(server, smId, entries, group.token, attachedTo);
  if (result.kind === 'unfit') return undefined;
  // Each took a delivery key of the frame, as one by one; one not taken stopped them at the first.
  const taken = result.kind === 'queued' || result.kind === 'acknowledged' ? items.length : 1;
  for (let n = 0; n < taken; n++) nextDeliveryKey(`sm:${smId}`);
  const sent = () => items.map((): DeliveryResult => 'sent');
  if (result.kind === 'ended' || result.kind === 'moved') {
    group.abandon();
    return ['gone'];
  }
  if (result.kind === 'acknowledged') return sent();
  const { item, first } = result;
  group.seen(item, first);
  if (result.found) {
    // Found by its keys after a write whose answer was lost: see deliverToSmSession.
    if (movedFrom(item, attachedTo)) {
      group.abandon();
      return ['gone'];
    }
    if (!group.holds(item)) {
      await settleUnknownPost(server, smId, entries[0]?.k as string, item, 'uncertain-append', 'a window');
      return sent();
    }
  }
  server.log.debug('window to a stream-management queue', { smId, first, count: items.length });
  for (const [at, { stanza }] of items.entries()) group.queued(entries[at]?.k as string, stanza);
  // As one by one: past the byte bound, later appends wait for an ack.
  if (queuedBytes(item.entries) > server.config.smQueueMaxBytes)
    await server.smQueue.setCongested(smId, true);
  return sent();
}

/**
 * The most a window appended in one write may hold (bytes, as sent): past it (a window holding a
 * large message), one by one.
 */
const WINDOW_APPEND_MAX_BYTES = 32 * 1024;

/** `appendOnce` for a window: an append that failed but was written is found by its first key. */
async function appendManyOnce(
  server: Server,
  smId: string,
  entries: SmEntry[],
  poster: string,
  attachedTo: string,
): Promise<AppendManyResult> {
  try {
    return await server.smQueue.appendMany(smId, entries, server.config.smQueueMax, poster, attachedTo);
  } catch (error) {
    if (!isTransient(error)) throw error;
    const found = await withTransientRetries(3, () => server.smQueue.get(smId)).catch(() => undefined);
    // Written as a whole, in order, or not at all.
    const at =
      found && !found.ended
        ? windowAt(
            found,
            entries.map((entry) => entry.k),
          )
        : -1;
    if (!found || at < 0) throw error;
    server.log.info('an append of a window that failed had queued it', { smId });
    return { kind: 'queued', first: found.base + at + 1, item: found, found: 'ambiguous' };
  }
}

/**
 * Whether the entry numbered `number` (key `key`) is no longer queued, while entries were queued
 * after it: an ack or a resume counted past it (or, the session having ended since, it was
 * acknowledged or re-routed: sent again all the same, at least once). Not when the session is
 * still on the connection it was posted to (`postedTo`) and its acks emptied the queue: that
 * count covers every entry numbered up to `out` as read here, and a client counts only what
 * reached it, each entry posted to a connection once; so it has them all, this one included, and
 * queued again it would come twice (as `dave-150` did in seed 6 of session 11's final target run,
 * whether or not that queue was empty).
 */
async function settledPastIt(
  server: Server,
  smId: string,
  key: string,
  number: number,
  postedTo: string,
): Promise<boolean> {
  const item = await withTransientRetries(MARK_ATTEMPTS, () => server.smQueue.get(smId));
  if (!item || item.out <= number) return false;
  if (!item.ended && item.connectionId === postedTo && item.base === item.out) return false;
  return !item.entries.some((entry) => entry.k === key);
}

/** A post this long after its append is logged at info (a slow post, a 429 tried again). */
const SLOW_POST_MS = 250;

/** Tries of an uncertain mark after a post (each after the SDK's own retries). */
const MARK_ATTEMPTS = 3;

/**
 * How many stanzas past SM_QUEUE_MAX (and past the byte bound's congestion, up to DynamoDB's
 * item size) a queue takes of the stream's own answers to its client (DeliveryOptions.answer),
 * on top of REPLY_MARGIN: a client slow to acknowledge a burst from its contacts still gets its
 * iq results.
 */
export const ANSWER_MARGIN = 50;

/**
 * The bytes of unacknowledged stanzas past which the stream's own answers end it
 * (`policy-violation`) rather than queue: what DynamoDB's item size bounded while every stanza
 * was in the queue item, and what a resume's replay and a re-route read back at once. The item
 * can then be near DynamoDB's 400 KB: a detach that would not fit ends the session instead
 * (`detach` answers `too-large`), and an end never makes an attached session's item larger.
 */
export const ANSWER_BYTES_BOUND = 400 * 1024;

/**
 * How many stanzas past SM_QUEUE_MAX a queue takes of other entities' iq results and errors to
 * it (DeliveryOptions.reply), within the byte bound: nothing tells a result the recipient asked
 * for from one it did not, so they get a margin of their own, below the stream's own answers'
 * (which stay ANSWER_MARGIN above it), and never past the bytes: another user cannot fill the
 * room the stream's answers need, nor grow its queue toward DynamoDB's item size.
 */
export const REPLY_MARGIN = 20;

/**
 * Appends to the queue; an append that failed in a way that may have written it (a 500 after
 * DynamoDB ran it, a timeout) is looked for at once (`found`). Left for the frame's redelivery,
 * other senders' later entries would be posted first meanwhile. It is not posted from here: a
 * resume may have attached the session since the write, and its replay sent it already.
 */
async function appendOnce(
  server: Server,
  smId: string,
  entry: SmEntry,
  poster?: string,
  mark?: SenderMark,
  margin?: 'answer' | 'reply',
  attachedTo?: string,
): Promise<AppendResult | { kind: 'found'; item: SmQueueItem }> {
  const bound =
    server.config.smQueueMax +
    (margin === 'answer' ? REPLY_MARGIN + ANSWER_MARGIN : margin === 'reply' ? REPLY_MARGIN : 0);
  try {
    // Past the byte bound's congestion: only the stream's own answers.
    const answer = margin === 'answer';
    return await server.smQueue.append(smId, entry, bound, poster, mark, answer, attachedTo);
  } catch (error) {
    if (entry.k === undefined || !isTransient(error)) throw error;
    const found = await withTransientRetries(3, () => server.smQueue.get(smId)).catch(() => undefined);
    const at = found && !found.ended ? found.entries.findIndex((queued) => queued.k === entry.k) : -1;
    if (!found || at < 0) throw error;
    server.log.info('an append that failed had queued its stanza', { smId });
    return { kind: 'found', item: found };
  }
}

/**
 * A stanza found queued whose post may or may not have happened (an earlier attempt of its
 * frame, a replay since its append): posting it now could count it twice, not posting it could
 * let later entries' posts make the client's count cover it. The socket is closed first (no entry
 * appended after the mark's read can reach the client), then the entry is marked uncertain if a
 * later one was queued (or the close failed): the resume sends it again (see countCovers).
 */
async function settleUnknownPost(
  server: Server,
  smId: string,
  key: string,
  item: SmQueueItem,
  reason: 'redelivered' | 'uncertain-append',
  detail?: string,
): Promise<DeliveryResult> {
  // A resume since the append sent it again in order (or its count acknowledged it), and the
  // client's count is a prefix again: nothing is uncertain (seed 14 of session 8's target run: a
  // redelivery after the resume marked it all the same, and the next resume could not vouch
  // for it).
  const at = item.entries.findIndex((entry) => entry.k === key);
  if (at >= 0 && item.settledOut !== undefined && item.base + at + 1 <= item.settledOut) {
    server.log.debug('stanza sent again by a resume since its append: settled', { smId, reason, detail });
    return 'sent';
  }
  if (server.config.smPostOrder === 'serial') {
    // Posts go out in order, each by whoever holds the session: detached, a resume replays it;
    // held by a replay or a living poster, that one posts it. Held by this very delivery (an
    // earlier attempt of its frame took the hold, and how far it posted nobody knows) or by a
    // dead poster: the socket is closed, and the client's count, a prefix, tells the resume.
    if (!item.connectionId) return 'sent';
    if (item.holding && !heldBy(item, key) && !holdExpired(server, item)) return 'sent';
    await forceResume(server, item.connectionId, reason, detail);
    return 'sent';
  }
  const closed =
    item.connectionId && !item.holding ? await forceResume(server, item.connectionId, reason, detail) : true;
  await server.smQueue.markUncertain(smId, key, !closed);
  return 'sent';
}

/**
 * Posts what the session's queue holds. A post that failed, or whose fate is unknown, would
 * break the count both ends keep if it were resent or skipped: the socket is closed instead,
 * and the client resumes and is sent exactly what it has not acknowledged.
 */
async function postQueued(
  server: Server,
  connectionId: string,
  element: Element,
): Promise<'sent' | 'gone' | 'resuming' | 'unclosed'> {
  try {
    const result = await postExactly(server, connectionId, element);
    if (result !== 'unknown') return result;
  } catch (error) {
    if (!isTransient(error)) throw error;
    server.log.warn('post to a stream-management session failed', { connectionId, error });
  }
  return (await forceResume(server, connectionId, 'uncertain-post')) ? 'resuming' : 'unclosed';
}

/**
 * Why the server closed a stream-management client's socket (the `SmResumesForced` metric's
 * dimension): a hold past its lease, a poster out of invocation time, a post that failed or went
 * unanswered, an entry whose post is uncertain (SM_POST_ORDER=checked), a redelivered frame or an
 * append whose outcome is unknown, a stream fenced by a resume.
 */
type ForcedResumeReason =
  | 'lease'
  | 'out-of-time'
  | 'uncertain-post'
  | 'uncertain-entry'
  | 'uncertain-append'
  | 'redelivered'
  | 'fenced';

/**
 * Closes a stream-management client's socket, as a network would: it resumes. False when the
 * close failed (the socket may stay up, and later posts reach it).
 */
async function forceResume(
  server: Server,
  connectionId: string,
  reason: ForcedResumeReason,
  detail?: string,
): Promise<boolean> {
  server.log.info('closing the socket so the client resumes', { connectionId, reason, detail });
  server.metrics.count('SmResumesForced', 1, reason);
  try {
    await closeConnection(server, connectionId);
    return true;
  } catch (error) {
    // Left to the liveness probe: a socket that is really gone is found within minutes.
    server.log.warn('closing the socket failed', { connectionId, error });
    return false;
  }
}

/** The log line of a queued stanza whose own item (SmEntry.x) was not found where it was to be posted. */
const OWN_ITEM_GONE = 'queued stanza: its own item is gone';

/** A queued stanza's bytes (one kept in an item of its own records its size). */
function entryBytes(entry: SmEntry): number {
  return entry.n ?? Buffer.byteLength(entry.s ?? '');
}

function queuedBytes(entries: SmEntry[]): number {
  let bytes = 0;
  for (const entry of entries) {
    bytes += entryBytes(entry);
    // The sessions a copy names (SmEntry.a) are stored with it: the bound counts them too.
    for (const session of entry.a ?? []) bytes += session.length;
  }
  return bytes;
}

/**
 * The queue refused a stanza (full by count, or congested by bytes). A client that keeps
 * acknowledging is only slow: the sender is told to wait ('full'), the recipient keeps its
 * stream. One that has acknowledged nothing for SM_ACK_TIMEOUT_SECONDS, or a detached session,
 * is not coming back soon: it ends, and everything it held is re-routed.
 */
async function whenFull(server: Server, smId: string, known?: SmQueueItem): Promise<DeliveryResult> {
  const item = known ?? (await server.smQueue.get(smId));
  if (!item || item.ended) return 'gone';
  const silentFor = Date.now() - (item.ackedAt ?? 0);
  if (!item.connectionId || silentFor > server.config.smAckTimeoutSeconds * 1000) {
    await overflow(server, smId);
    return 'gone';
  }
  return 'full';
}

function sessionOfItem(item: SmQueueItem, connectionId?: string): SessionRef {
  return {
    user: item.user,
    resource: item.resource,
    smId: item.smId,
    ...(connectionId ? { connectionId } : {}),
    ...(item.directedTo ? { directedTo: item.directedTo } : {}),
  };
}

/** The queue is over its bound: the stream ends with policy-violation, nothing is lost. */
async function overflow(server: Server, smId: string): Promise<void> {
  const item = await server.smQueue.get(smId);
  if (!item || item.ended) return;
  server.log.warn('stream management queue full', { smId, user: item.user });
  if (!item.connectionId) return endSession(server, sessionOfItem(item), 'expired');
  await kickConnection(
    server,
    item.connectionId,
    new StreamError('policy-violation', 'Too many unacknowledged stanzas'),
  );
  // Fenced, not just read: the connection's frames queued before the kick may still count and
  // route a stanza, which the count recorded at the end (a later resume's <failed h/>) must hold.
  const state = await server.sessions.fenceConnection(item.connectionId);
  await endSession(
    server,
    {
      ...sessionOfItem(item, item.connectionId),
      ...(state ? { state, ...(state.directedTo ? { directedTo: state.directedTo } : {}) } : {}),
    },
    'closed',
    // Kicked from a sender's frame: the connection's own frames and $disconnect are still to come.
    { keepRow: true },
  );
}

// ---------------------------------------------------------------------------------------------
// Ending: detach, expire, re-route

/**
 * The socket is gone ($disconnect, or a 410 on a post). XEP-0198 §5: a resumable session is
 * kept, detached, for its window; any other session ends (the lifecycle's default).
 */
async function keepResumable(
  server: Server,
  event: {
    connectionId: string;
    state?: import('../store/sessions.ts').ConnectionState;
    disconnected?: boolean;
  },
): Promise<typeof HANDLED | undefined> {
  // Fenced, not just read: the connection's frames may still be running (a 410 seen by another
  // invocation, a probe), and a stanza counted after this read would be routed yet missing from
  // the count a resume reports. From here on such a frame stops instead.
  event.state = (await server.sessions.fenceConnection(event.connectionId)) ?? event.state;
  const state = event.state;
  if (!state?.sm && state?.resuming)
    await endAbandonedResume(server, event.connectionId, state.resuming, !event.disconnected);
  // A deleted account's stream (its row revoked) is not kept for a resume: it ends now, and what
  // its queue held goes back to its senders at once (core/lifecycle.ts's default).
  if (!state?.sm?.resumable || state.revoked) return undefined;
  const until = Date.now() + state.sm.max * 1000;
  const detached = await server.smQueue.detach(
    state.sm.id,
    event.connectionId,
    state.sm.inbound,
    until,
    state.directedTo ?? [],
    carriedTransfer(server, state),
  );
  if (detached === 'too-large') {
    // No room in the queue item to keep the session for a resume (a client that never
    // acknowledged its answers): it ends now, as without resumption (core/lifecycle.ts's default),
    // rather than fail this $disconnect on every receive.
    server.log.warn('session too large to keep for a resume: ended', { smId: state.sm.id });
    return undefined;
  }
  // The row stays, fenced, until the connection's own $disconnect: a frame of it still queued
  // (one being retried) whose stanza was counted must find it and still route that stanza (the
  // count is in what a resume reports); an uncounted one is stopped by the fence.
  if (event.disconnected) await server.sessions.deleteConnection(event.connectionId);
  return HANDLED;
}

/**
 * The stream's offline transfer in progress, to keep for a resume (XEP-0013 fetches and views go
 * on there). Requests are refused that would make it larger than MAX_CARRIED_TRANSFER_BYTES
 * (MAX_REQUESTED_TRANSFER_BYTES, xep-0160): one that is all the same (a transfer saved before
 * that bound) is not carried, and its requests go unanswered.
 */
function carriedTransfer(server: Server, state: ConnectionState): OfflineTransfer | undefined {
  if (!state.transfer) return undefined;
  if (Buffer.byteLength(JSON.stringify(state.transfer)) <= MAX_CARRIED_TRANSFER_BYTES) return state.transfer;
  server.log.warn('offline transfer too large to keep for a resume: not carried', {
    connectionId: state.connectionId,
  });
  return undefined;
}

/**
 * The socket of a `<resume/>` vanished after the resume attached the session and before its
 * stream saved it (a frame that kept failing, a client that gave up): the session is attached to
 * a dead connection, holding, and neither a new bind (the resource row may not name it) nor the
 * sweeper's window would end it soon. It ends here and what it held is re-routed; the client's
 * next resume is told item-not-found. Found before the connection's own `$disconnect` (a 410, a
 * probe), its row stays, fenced, for that `$disconnect`: frames of it still queued find it.
 */
async function endAbandonedResume(
  server: Server,
  connectionId: string,
  smId: string,
  keepRow: boolean,
): Promise<void> {
  const item = await server.smQueue.get(smId);
  if (!item || item.ended || item.connectionId !== connectionId) return;
  server.log.info('a resume whose socket vanished before it was saved: its session ends', { smId });
  await endSession(server, sessionOfItem(item, connectionId), 'gone', { keepRow });
}

/**
 * A session with stream management is ending: its queue is ended exactly once and what it held
 * unacknowledged is handed back for re-routing (not what is still in offline storage: it is
 * delivered from there, never stored twice). HANDLED when the queue is not this caller's to
 * end: resumed on another connection, or ended already.
 */
async function endSmSession(
  server: Server,
  session: SessionRef,
  reason: SessionEndReason,
  undelivered: UndeliveredStanza[],
  afterReroute: (() => Promise<void>)[],
): Promise<typeof HANDLED | undefined> {
  if (!session.smId) return undefined;
  // The connection that must still own it; 'any' for a replaced resource; undefined: detached.
  const owner = reason === 'replaced' ? 'any' : session.connectionId;
  const inbound = session.state?.sm?.inbound ?? (await server.smQueue.get(session.smId))?.inbound ?? 0;
  const ended =
    (await server.smQueue.end(session.smId, owner, inbound)) ??
    // A clean close (`</close>`, or a stream error) on the connection the session was detached
    // from: a 410 or a probe took the socket for gone while the client was still there. XEP-0198:
    // a closed stream's session is over (its client will not resume it), so it ends here, not
    // at the end of its window; the resource row this stream removes no longer names it.
    (reason === 'closed' && session.connectionId
      ? await server.smQueue.end(session.smId, { detachedFrom: session.connectionId }, inbound)
      : undefined);
  if (!ended) {
    // Ended already, its re-route perhaps cut short (this is a redelivery of the frame that
    // ended it, or another end at once): carried on from where it stopped. Re-routes are keyed,
    // so running one twice delivers nothing twice.
    const item = await server.smQueue.get(session.smId);
    if (
      item?.ended &&
      isSweepShardOf(item.sweepShard, REROUTE_SHARD) &&
      (item.rerouted ?? 0) < item.entries.length
    )
      await handBack(server, item, undelivered, afterReroute);
    return HANDLED;
  }
  server.log.debug('stream-management session ended', {
    smId: session.smId,
    reason,
    base: ended.base,
    entries: ended.entries.length,
  });
  // A detached session's directed-presence recipients were carried in its queue item.
  if (ended.directedTo?.length)
    session.directedTo = [...new Set([...(session.directedTo ?? []), ...ended.directedTo])];
  // Its account was deleted while it was detached (no connection row to mark): its end tells the
  // contacts the deletion names, as a revoked stream's next frame does (core/stream.ts).
  const revocation = ended.revoked;
  if (revocation && !revocation.viaStream) {
    await tellRevoked(server, {
      user: ended.user,
      resource: ended.resource,
      revocation,
      ...(session.directedTo ? { directedTo: session.directedTo } : {}),
    });
  }
  await handBack(server, ended, undelivered, afterReroute);
  return undefined;
}

/** An ended session's entries not yet re-routed, handed to the lifecycle to re-route. */
async function handBack(
  server: Server,
  item: SmQueueItem,
  undelivered: UndeliveredStanza[],
  afterReroute: (() => Promise<void>)[],
): Promise<void> {
  undelivered.push(...(await toReroute(server, item, item.rerouted ?? 0)));
  afterReroute.push(() => server.smQueue.finishReroute(item.smId));
}

/**
 * An ended session's entries from `from` on, as stanzas to re-route, each recording its progress
 * once done. A XEP-0013 copy is dropped, and so is a message the flood took from offline
 * storage: while it is still stored, it is delivered from there (never stored twice); once it is
 * not, the client acknowledged it (with serial posting an ack removes it from storage before
 * trimming it, and the session ended between the two), or it left storage by other means: a XEP-0013 remove or purge
 * (XEP-0013 §2.4, §2.6: "the server MUST remove"), another resource's flood that delivered it,
 * or its expiry. Routed again, it would come back as a new message, stamped with the flood's
 * time.
 */
async function toReroute(server: Server, item: SmQueueItem, from: number): Promise<UndeliveredStanza[]> {
  const entries = item.entries.slice(from);
  await tellSenders(server, item, entries);
  const stanzas: UndeliveredStanza[] = [];
  // XEP-0013 view copies and flooded stored messages stay in storage: never routed again, never read.
  const texts = await withTransientRetries(MARK_ATTEMPTS, () =>
    server.smQueue.stanzas(
      item.smId,
      entries.map((entry) => (entry.c || entry.o ? { ...entry, x: undefined } : entry)),
    ),
  );
  entries.forEach((entry, i) => {
    const text = texts[i];
    if (entry.c || entry.o) return;
    const position = from + i + 1;
    if (text === undefined) {
      // An ended session's queue is not trimmed: its own items stay until the re-route is done.
      server.log.error(OWN_ITEM_GONE, {
        smId: item.smId,
        position,
      });
      return;
    }
    stanzas.push({
      stanza: parse(text),
      acceptedAt: entry.t,
      done: () => server.smQueue.markRerouted(item.smId, position),
      key: `reroute:${item.smId}:${item.base + position}`,
      sequence: item.base + position,
      ...(entry.a ? { alsoTo: entry.a } : {}),
      ...(item.revoked ? { ownerDeleted: true } : {}),
    });
  });
  return stanzas;
}

/**
 * A client's frame that queued a message here and failed before its done mark comes again; by
 * then this session is over and its queue re-routed, so routing the message again would deliver
 * it twice (to the resource bound since, or to storage). Before the re-route, the sender's row
 * gets the record a store offline leaves (core/frame.ts offlineRecord): the redelivery finds its
 * message delivered. Serial posting's sender marks (SenderMark) name the frame, a sender's last
 * append here: one conditional write per such sender, only when a session ends with entries.
 */
async function tellSenders(server: Server, item: SmQueueItem, entries: SmEntry[]): Promise<void> {
  for (const [from, mark] of Object.entries(item.senderMarks ?? {})) {
    const frameId = markFrame(mark);
    if (!frameId || !entries.some((entry) => entry.k?.startsWith(`${frameId}:`) && !entry.o)) continue;
    const told = await server.sessions.recordRerouted(from, frameId, item.user);
    server.log.debug('re-route recorded for the frame that queued it', { smId: item.smId, told });
  }
}

/** Failures in a row that stop a sweep phase for this run. */
const SWEEP_FAILURES_IN_A_ROW = 5;

/**
 * Works through one sweep phase's due items, oldest first, each on its own: an item that fails
 * is reported (`run.failed`: logged, counted) and the phase goes on past it. The next page asks
 * for as many more as this run has tried and skips them, so items at the head that stay due
 * (failed, or done without leaving the list) never hide the ones behind; the next run tries them
 * again. After SWEEP_FAILURES_IN_A_ROW failures in a row the phase stops (what it calls is in
 * trouble: the next run tries again). No item starts once the run is short of time.
 */
export async function sweepEach(
  run: SweepRun,
  phase: string,
  list: (limit: number) => Promise<SmQueueItem[]>,
  work: (item: SmQueueItem) => Promise<void>,
  onFailure?: (item: SmQueueItem) => Promise<void>,
  pageSize = 50,
): Promise<void> {
  const tried = new Set<string>();
  let inARow = 0;
  for (;;) {
    if (!run.hasTime()) return;
    const limit = pageSize + tried.size;
    const listed = await list(limit);
    // Only what this run has not tried: a failed item is still listed (and one that succeeded
    // may be, for a moment); none new means the phase is done.
    const fresh = listed.filter((item) => !tried.has(item.smId));
    if (fresh.length === 0) return;
    for (const item of fresh) {
      if (!run.hasTime()) return;
      tried.add(item.smId);
      try {
        await work(item);
        inARow = 0;
      } catch (error) {
        inARow += 1;
        run.failed(phase, error, { smId: item.smId });
        await onFailure?.(item).catch(() => undefined);
        if (inARow >= SWEEP_FAILURES_IN_A_ROW) return;
      }
    }
    if (listed.length < limit) return;
  }
}

/**
 * The sweeper finishes re-routes an invocation did not (a timeout, a crash, a DynamoDB failure
 * after retries): from the last recorded position on, so nothing is lost and what was already
 * re-routed is not re-routed again (at most the one in flight at the failure).
 */
async function finishInterruptedReroutes(server: Server, run: SweepRun): Promise<void> {
  await sweepEach(
    run,
    'reroute',
    (limit) => server.smQueue.listReroutes(run.now - REROUTE_RETRY_MS, limit),
    async (item) => {
      server.log.warn('finishing an interrupted re-route', { smId: item.smId, done: item.rerouted ?? 0 });
      await rerouteUndelivered(server, item.user, await toReroute(server, item, item.rerouted ?? 0));
      await server.smQueue.finishReroute(item.smId);
    },
    undefined,
    25,
  );
}

/** The sweeper's part: sessions whose resumption window closed. */
async function expireDetachedSessions(server: Server, run: SweepRun): Promise<void> {
  await sweepEach(
    run,
    'expire',
    (limit) => server.smQueue.listExpired(run.now, limit),
    async (item) => {
      await endSession(server, sessionOfItem(item), 'expired');
      run.swept += 1;
    },
  );
}

/** A probe that failed (429, 5xx past the SDK's retries) is tried again after this long. */
export const PROBE_RETRY_MS = 60_000;

/**
 * The sweeper's other part: `$disconnect` is best effort, and a lost one would leave a session
 * attached to a dead socket, its stanzas queued and posted into the void until the item's TTL.
 * Each attached session is probed with an ack request once it has been attached longer than
 * API Gateway's idle cut: a vanished socket answers 410 Gone and the session detaches (or ends)
 * through the lifecycle; a live one acknowledges, and is probed again a period later. One whose
 * probe failed is probed again after PROBE_RETRY_MS, behind the others due by then.
 */
async function probeAttachedSessions(server: Server, run: SweepRun): Promise<void> {
  await sweepEach(
    run,
    'probe',
    (limit) => server.smQueue.listDueProbes(run.now, limit),
    async (item) => {
      const connectionId = item.connectionId as string;
      // A poster that died mid-burst (SM_POST_ORDER=serial) and no delivery since to notice it:
      // the socket is closed, and the client's resume sends what waited.
      if (holdExpired(server, item)) await forceResume(server, connectionId, 'lease', 'poster');
      const posted = await post(server, connectionId, ackRequest(item.version, postedUpTo(item)));
      if (posted === 'sent') {
        await server.smQueue.deferProbe(item.smId, connectionId, run.now + PROBE_AFTER_MS);
        return;
      }
      server.log.info('probe found a vanished socket', { smId: item.smId, connectionId });
      const state = await server.sessions.getConnection(connectionId);
      // With its row, the session detaches (resumable) or ends, as on any 410; without one (the
      // row expired too), nothing is left to resume from: it ends.
      if (state) await server.host.fire('connection-vanished', { connectionId, state });
      else await endSession(server, sessionOfItem(item, connectionId), 'gone');
    },
    (item) => server.smQueue.deferProbe(item.smId, item.connectionId as string, run.now + PROBE_RETRY_MS),
  );
}

// ---------------------------------------------------------------------------------------------
// The stream's own sends and counts

/** Why a resume or a resumed stream's stanza waits (a frame handed back to the queue). */
const OLD_UNROUTED = 'the old stream has not routed a stanza it counted';

/**
 * After a resume that went ahead unsettled (SmState.after): the resumed stream's stanzas wait,
 * handed back to the queue (its later frames wait behind them, in order), until the old stream
 * has routed the stanza it counted, or its row is gone, or SM_RESUME_ORDER_MS has passed. A
 * stanza of the client's sent after the one the old stream counted then never overtakes it,
 * while the client already has `<resumed/>` and what was queued for it.
 */
async function awaitOldStream(stream: Stream): Promise<void> {
  const sm = stream.state.sm;
  const after = sm?.after;
  // A stream fenced since (resumed elsewhere) routes nothing uncounted: no use waiting.
  if (!sm || !after || stream.state.fenced) return;
  // Counted already by an earlier attempt of this frame: it waited then.
  if (stream.frameId && stream.state.countedFrame === stream.frameId) return;
  const { server } = stream;
  if (Date.now() < after.until) {
    const old = await server.sessions.getConnection(after.connectionId);
    if (old && !countedHandled(server, old)) {
      server.log.info('stanza waits for the old stream', {
        connectionId: stream.connectionId,
        old: after.connectionId,
      });
      throw new RetryLaterError(OLD_UNROUTED);
    }
  } else {
    server.log.warn('stanzas go ahead of the old stream', {
      connectionId: stream.connectionId,
      old: after.connectionId,
    });
  }
  const { after: _done, ...rest } = sm;
  stream.update({ sm: rest });
}

/**
 * Counts a stanza the client sent (sm:3 counts stanzas; sm:1 learns numbers from `<r u/>`). The
 * count is saved before the stanza is routed: a resume's `h` then covers every stanza whose
 * effects another entity may have seen. One whose handling may be repeated harmlessly
 * (`repeatable`: a ping, a typing notification) is counted in the frame's own save instead, one
 * write for both: a resume in between has the client send it again, and it is handled again.
 */
async function countInbound(stream: Stream, repeatable: boolean): Promise<undefined> {
  await awaitOldStream(stream);
  const sm = stream.state.sm;
  // The seed's sm:1 learns counts from the client's 'u'; only sm:3 counts here.
  if (sm?.version !== 'sm3') return undefined;
  // A redelivered frame (the queue's retry after a failure) was counted the first time.
  if (stream.frameId && stream.state.countedFrame === stream.frameId) return undefined;
  const counted = stream.state.countedSeq;
  if (stream.seq && counted && sequenceAtMost(stream.seq, counted)) return undefined;
  stream.update({ sm: { ...sm, inbound: sm.inbound + 1 } });
  if (stream.frameId) stream.update({ countedFrame: stream.frameId });
  if (stream.seq) stream.update({ countedSeq: stream.seq });
  if (repeatable) {
    // A fenced stream counts nothing more (the resume reported its count): stopped here, as the
    // commit below would stop it. A fence after this read stops the frame's save instead.
    if (stream.state.fenced) throw new ConnectionFencedError(stream.connectionId);
    stream.countWaitsForSave();
    return undefined;
  }
  try {
    await stream.commit();
  } catch (error) {
    if (!(error instanceof ConnectionFencedError) || !stream.frameId) throw error;
    // The count may have landed just before the fence (DynamoDB ran the write but answered with
    // a 500, and the SDK's resend met the fence): then the h of <resumed/> covers this stanza,
    // the client will not send it again, and it must be routed.
    const row = await stream.server.sessions.getConnection(stream.connectionId);
    if (row?.countedFrame !== stream.frameId) throw error;
    stream.server.log.info('counted just before the fence: routed all the same', {
      connectionId: stream.connectionId,
    });
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Nonzas from the client

function smState(stream: Stream): SmState | undefined {
  return stream.state.sm;
}

async function enable(stream: Stream, element: Element, version: SmVersion): Promise<void> {
  const { server } = stream;
  if (!stream.state.user) return void (await stream.send(failed(version, 'not-authorized')));
  // XEP-0198 §3: "the client MUST NOT attempt to enable stream management until after it has
  // completed Resource Binding"; the server enforces it.
  if (!stream.state.resource || stream.state.sm)
    return void (await stream.send(failed(version, 'unexpected-request')));

  const wantsResume = element.attrs.resume === 'true' || element.attrs.resume === '1';
  const clientMax = counter(element.attrs.max);
  const max =
    clientMax && clientMax > 0 ? Math.min(clientMax, server.config.smMaxSeconds) : server.config.smMaxSeconds;
  const smId = randomBytes(18).toString('base64url');
  const user = stream.state.user;
  const resource = stream.state.resource;

  // Deliveries start queueing now but are held until <enabled/> is out, so no counted stanza
  // can reach the client before it.
  await server.smQueue.create({
    smId,
    user,
    resource,
    version,
    resumable: wantsResume,
    max,
    connectionId: stream.connectionId,
  });
  // Deliveries switch to the queue once no direct post to this resource is in flight (they are
  // counted while the stream may still switch: from bind until its first presence), so no
  // stanza the server did not number reaches the client after <enabled/>.
  let switched: Switched;
  try {
    switched = await switchToQueue(server, user, resource, stream.connectionId, smId);
  } catch (error) {
    if (!(error instanceof ResourceTakenError)) throw error;
    // A new bind of this resource replaced the stream meanwhile (it is being closed with
    // <conflict/>): nothing to enable.
    switched = { refusal: 'unexpected-request' };
  }
  if ('refusal' in switched) {
    await discardEmptyQueue(server, smId, stream.connectionId);
    server.metrics.count('SmEnableRefused', 1, switched.refusal);
    server.log.info('stream management refused', { resource, condition: switched.refusal });
    // The client takes the refusal as final: a redelivery (a timed-out batch) must not enable
    // what its first attempt refused (a refusal that waited on posts in flight would switch the
    // second time, and the session's stanzas would be queued for a client that never counts them).
    return stream.answerOnce(failed(version, switched.refusal));
  }
  if (switched.smId !== smId) {
    // An earlier attempt of this frame switched the row to its queue (and failed before saving
    // the session): that queue stays, it may hold stanzas already; the one just made goes.
    await discardEmptyQueue(server, smId, stream.connectionId);
  }
  const sm: SmState = {
    version,
    id: switched.smId,
    inbound: 0,
    acked: 0,
    resumable: wantsResume,
    max,
    ...(switched.lateSince === undefined ? {} : { enabledAt: switched.lateSince + DIRECT_POST_BOUND_MS }),
  };
  // Saved before <enabled/> goes out, with the frame that did it: see `handle`. A redelivery
  // finds the session and this queue (not a second one, whose switch would strand what the first
  // took meanwhile).
  stream.update({ sm, ...(stream.frameId ? { smFrame: stream.frameId } : {}) });
  await stream.commit();
  await answerEnable(stream, sm);
}

/**
 * Ends a queue no stanza reached (its id never went to the client) with nothing to re-route:
 * left ended but not finished, it would wait in the sweeper's re-route partition.
 */
async function discardEmptyQueue(server: Server, smId: string, connectionId: string): Promise<void> {
  await server.smQueue.end(smId, connectionId, 0);
  await server.smQueue.finishReroute(smId);
}

/**
 * `<enabled/>`, once any wait for a late switch is over, then what the queue took meanwhile.
 * A late switch's wait may not fit the invocation: the frame is handed back and its redelivery
 * comes here again (see `handle`).
 */
async function answerEnable(stream: Stream, saved: SmState): Promise<void> {
  const { server } = stream;
  let sm = saved;
  if (sm.enabledAt !== undefined) {
    await waitOutDirectPosts(server, sm.enabledAt);
    const { enabledAt: _done, ...rest } = sm;
    sm = rest;
    // Saved before <enabled/> goes out, as on the prompt path: a redelivery from here on makes
    // the client resume (see `handle`) rather than answer twice.
    stream.update({ sm });
    await stream.commit();
  }
  const enabled = new Element('enabled', { xmlns: namespaceOf(sm.version) });
  if (sm.resumable) {
    enabled.attrs.id = sm.id;
    enabled.attrs.resume = 'true';
    if (sm.version === 'sm3') enabled.attrs.max = String(sm.max);
  }
  if ((await post(server, stream.connectionId, enabled)) === 'gone' && sm.resumable) {
    // 410: the socket was gone before <enabled/> could reach it, so its client never learned the
    // session's id and nobody can resume it. Ended now, its queue re-routed, rather than kept
    // detached for a resume that cannot come while what is queued for it waits SM_MAX_SECONDS.
    stream.update({ sm: { ...sm, resumable: false } });
    await stream.commit();
    await server.host.fire('connection-vanished', { connectionId: stream.connectionId });
    return;
  }
  server.metrics.count('SmEnabled', 1, sm.version);
  await replayHeld(stream, sm, 0, []);
}

/**
 * Switches the resource's deliveries to the queue `smId` so that no stanza the server did not
 * number reaches the client after `<enabled/>`. While the stream may still switch exactly (from
 * bind until a grace after its first presence: every stock client enables in it), direct posts
 * to it are counted in flight, and the switch waits for them (checked 25, 50, 100, … ms apart,
 * within their lease and half of the invocation's time left). Later, the switch is made and
 * `<enabled/>` waits DIRECT_POST_BOUND_MS: a direct post by a read of the row from before the
 * switch is over by then (it starts within READ_BOUND_MS of its read, an attempt ends within
 * POST_TIMEOUT_MS). Returns the condition `<enable/>` is refused with, if it is.
 */
type Switched = { smId: string; lateSince?: number } | { refusal: string };

async function switchToQueue(
  server: Server,
  user: string,
  resource: string,
  connectionId: string,
  smId: string,
): Promise<Switched> {
  const started = Date.now();
  const budget = (frameTimeLeft() ?? Number.POSITIVE_INFINITY) / 2;
  for (let check = 0; ; check++) {
    const outcome = await server.sessions.switchToQueue(user, resource, connectionId, smId);
    if (outcome.kind === 'switched') {
      if (outcome.lateSince !== undefined) server.metrics.count('SmEnabledLate');
      return outcome;
    }
    if (outcome.kind === 'late') {
      server.metrics.count('SmEnabledLate');
      return server.sessions.switchToQueueLate(user, resource, connectionId, smId);
    }
    const pause = Math.min(25 * 2 ** check, 400);
    const now = Date.now();
    // Past the lease the switch goes ahead (a post whose frame died stops counting).
    if (now + pause > Math.min(outcome.until + 50, started + budget)) {
      server.log.warn('stream management refused: direct posts to the resource stayed in flight', {
        resource,
      });
      return { refusal: 'resource-constraint' };
    }
    await sleep(pause);
  }
}

/**
 * Waits until `until` (DIRECT_POST_BOUND_MS after a late switch): a direct post by a read of the
 * row from before the switch is over then. If the invocation has not that much time left, the
 * frame is handed back (retried soon) and its next attempt waits the rest.
 */
async function waitOutDirectPosts(server: Server, until: number): Promise<void> {
  // A margin for the latency of the write that made the switch (its time is taken around it).
  const wait = until + 250 - Date.now();
  if (wait <= 0) return;
  const left = frameTimeLeft();
  if (left !== undefined && wait > left - 1000) {
    server.log.info('late switch to the queue: the wait goes on in a later attempt', { wait });
    throw new RetryLaterError('the late switch to the stream-management queue needs more time');
  }
  await sleep(wait);
}

/**
 * Posts queued entries numbered above `from` in order, then stops holding; loops while
 * deliveries keep arriving, so nothing overtakes the replay and nothing is left behind.
 */
async function replayHeld(
  stream: Stream,
  sm: SmState,
  from: number,
  initial: SmEntry[],
  initialBase = from,
): Promise<void> {
  const { server } = stream;
  let sent = from;
  let entries = initial;
  let base = initialBase;
  for (;;) {
    const start = Math.max(sent - base, 0);
    const texts = await withTransientRetries(MARK_ATTEMPTS, () =>
      server.smQueue.stanzas(sm.id, entries.slice(start)),
    );
    for (let i = start; i < entries.length; i++) {
      const entry = entries[i] as SmEntry;
      const text = texts[i - start];
      // A replay cut short leaves the session holding: the client resumes again (the socket was
      // closed, or is gone) and the next replay starts where its ack says. A large stanza whose
      // own item is gone was acknowledged meanwhile (its trim deletes the item).
      if (text === undefined)
        server.log.warn(OWN_ITEM_GONE, {
          smId: sm.id,
          number: base + i + 1,
        });
      else if ((await postQueued(server, stream.connectionId, withDelay(server, text, entry.t))) !== 'sent')
        return;
      sent += 1;
    }
    if (await server.smQueue.release(sm.id, sent, stream.connectionId)) return;
    const item = await server.smQueue.get(sm.id);
    // Resumed elsewhere meanwhile (that resume's replay holds it now), or no longer held by a
    // replay: whatever is left is someone else's to post.
    if (!item || item.ended || item.connectionId !== stream.connectionId || !item.holding || item.holder)
      return;
    entries = item.entries;
    base = item.base;
  }
}

/**
 * Asks the client for an ack if some of what it was sent is still unacknowledged: at the end
 * of an offline flood, whose messages stay stored until acknowledged, rather than at the
 * next batch of `smAckEvery`.
 */
async function requestAckIfUnacknowledged(stream: Stream): Promise<number | undefined> {
  const sm = stream.state.sm;
  if (!sm) return undefined;
  const counts = await stream.server.smQueue.counts(sm.id);
  if (!counts || counts.out <= sm.acked) return undefined;
  await post(stream.server, stream.connectionId, ackRequest(sm.version, counts.posted));
  return counts.posted;
}

/**
 * sm:1: the last sequence number the client reported with 'u'. The seed's 'u' "MUST be
 * strictly increasing"; a repeated or older one changes nothing (the request is still
 * acknowledged, as the seed requires of every <r/>).
 */
function withClientNumber(sm: SmState, u: number): SmState {
  const forward = (u - (sm.inbound % WRAP) + WRAP) % WRAP;
  return forward > 0 && forward < WRAP / 2 ? { ...sm, inbound: sm.inbound + forward } : sm;
}

async function requestAck(stream: Stream, element: Element, version: SmVersion): Promise<void> {
  const sm = smState(stream);
  if (!sm || sm.version !== version) return void (await stream.send(failed(version, 'unexpected-request')));
  if (version === 'sm3') return void (await stream.send(ack(version, sm.inbound)));
  // Seed §6: "An <r/> element MUST contain a 'u' attribute and MAY contain an 'h' attribute."
  const u = counter(element.attrs.u);
  const h = element.attrs.h === undefined ? undefined : counter(element.attrs.h);
  if (u === undefined || (element.attrs.h !== undefined && h === undefined)) {
    return void (await stream.send(failed(version, 'bad-request')));
  }
  const updated = withClientNumber(sm, u);
  stream.update({ sm: updated });
  // Seed §6: "The response MUST contain a value of 'h' that is greater than or equal to the 'u'".
  await stream.send(ack(version, updated.inbound));
  if (h !== undefined) await applyAck(stream, h);
}

async function acknowledge(stream: Stream, element: Element, version: SmVersion): Promise<void> {
  const sm = smState(stream);
  if (!sm || sm.version !== version) return void (await stream.send(failed(version, 'unexpected-request')));
  // sm:3 §4 and seed §6: "An <a/> element MUST contain an 'h' attribute" (the seed: "and MAY
  // contain a 'u' attribute").
  const h = counter(element.attrs.h);
  const u = version === 'sm1' && element.attrs.u !== undefined ? counter(element.attrs.u) : undefined;
  if (h === undefined || (version === 'sm1' && element.attrs.u !== undefined && u === undefined)) {
    return void (await stream.send(failed(version, 'bad-request')));
  }
  if (u !== undefined) stream.update({ sm: withClientNumber(sm, u) });
  // Its first attempt's window may have died queued and unposted (SerialGroup), and this ack may
  // not start another one.
  if (frameRedelivered() && stream.server.config.smPostOrder === 'serial')
    await settleDeadGroup(stream.server, sm.id, stream.frameId);
  await applyAck(stream, h);
}

/** The client handled our stanzas up to `h`: drop them, release offline copies, pace transfers. */
async function applyAck(stream: Stream, h: number): Promise<void> {
  const { server } = stream;
  if (!isBound(stream)) return;
  const sm = smState(stream) as SmState;
  const newBase = unwrap(h, sm.acked);
  if (newBase === sm.acked) {
    // A redelivered ack whose first attempt trimmed the queue and saved the count (a XEP-0013
    // window written ahead commits the row), then died before finishing that window: told again,
    // or the window waits for an ack nobody asked for, and the request is never answered.
    if (frameRedelivered() && stream.state.transfer?.window !== undefined) {
      const item = await server.smQueue.get(sm.id);
      if (item && !item.ended && item.connectionId === stream.connectionId) {
        const keys = entryKeys(item.entries);
        await server.host.fire('stanzas-acknowledged', {
          stream,
          acked: sm.acked,
          unacknowledged: item.out - sm.acked,
          queuedKeys: { appended: keys, unacknowledged: keys },
        });
      }
    }
    return;
  }
  if (isStaleCount(h, sm.acked)) {
    server.log.debug('stream-management ack behind the last one ignored', { h, acked: sm.acked });
    return;
  }
  let removed: SmEntry[];
  let remaining: SmEntry[];
  let out: number;
  let congested: boolean;
  // What the queue was trimmed to: the count, or less when it vouches only for part of it.
  let trimmedTo = newBase;
  // XEP-0160 with SM: a stored message leaves storage only once the client acknowledged it, and
  // before its entry leaves the queue (see removeStoredFirst).
  const removedFirst = sm.stored ? await removeStoredFirst(server, stream, sm.id, newBase) : undefined;
  try {
    ({ removed, remaining, out, congested } = await server.smQueue.acknowledge(
      sm.id,
      sm.acked,
      newBase,
      stream.connectionId,
    ));
  } catch (error) {
    // This stream's session was resumed on another connection: its late ack changes nothing.
    if (error instanceof NotSessionOwnerError) return;
    if (!(error instanceof UncertainQueueError)) {
      if (!(error instanceof AckBeyondQueueError)) throw error;
      const item = await server.smQueue.get(sm.id);
      throw tooHigh(sm.version, h, item?.out ?? sm.acked);
    }
    const ordered = server.config.smLatePostMs === 0;
    const settled = await ackPastBounds(server, sm.id, sm.acked, newBase, stream.connectionId, ordered);
    if (settled?.kind === 'short') {
      // Only late posts' entries are uncertain, and their bound is beyond this count: posts
      // still on their way when the client counted. Once they land, its next count reaches the
      // bound; it is asked for that count (once per bound) instead of made to resume.
      const asked = sm.askedFor === settled.bound;
      if (!asked) {
        stream.update({ sm: { ...sm, askedFor: settled.bound } });
        await post(server, stream.connectionId, ackRequest(sm.version, settled.out));
      }
      if (settled.trimmed) {
        // Every answered post checked: what the count vouches for is trimmed, the rest waits for
        // a count that reaches its bound. These entries landed, so on a live socket the client
        // gets them and its counts go on; a resume's count settles them if the socket goes.
        // Closing the socket instead would make the resume send them again when its count fell
        // short too: a duplicate of a stanza the client most likely had.
        ({ removed, remaining, out, congested } = settled.trimmed);
        trimmedTo = settled.trimmed.base;
      } else if (!asked || ordered) return;
      else {
        await forceResume(server, stream.connectionId, 'uncertain-entry');
        return;
      }
    } else if (settled?.kind !== 'settled') {
      // Only a resume settles what the count covers: the socket goes, the client resumes.
      await forceResume(server, stream.connectionId, 'uncertain-entry');
      return;
    } else ({ removed, remaining, out, congested } = settled);
  }
  await uncongest(server, sm.id, congested, remaining);
  server.log.debug('stream-management ack', { smId: sm.id, h, removed: removed.length, out });
  // Stored messages still queued: the next ack removes first again (serial posting only).
  const stillStored = server.config.smPostOrder === 'serial' && remaining.some((e) => e.o);
  const { stored: _, ...current } = smState(stream) as SmState;
  stream.update({ sm: { ...current, acked: trimmedTo, ...(stillStored ? { stored: true } : {}) } });
  // What was trimmed and not removed first (SM_POST_ORDER=checked, a session from before
  // `stored`): removed now.
  const offlineIds = removed.flatMap((e) => (e.o && !removedFirst?.has(e.o) ? [e.o] : []));
  if (offlineIds.length > 0) await server.offline.remove(stream.user, offlineIds);
  await server.host.fire('stanzas-acknowledged', {
    stream,
    acked: trimmedTo,
    unacknowledged: out - trimmedTo,
    // A XEP-0013 window whose frame died before its save (its write-ahead is in the row): what of
    // it was queued, this ack's trim included, is not sent again.
    ...(stream.state.transfer?.window !== undefined
      ? {
          queuedKeys: {
            appended: entryKeys([...removed, ...remaining]),
            unacknowledged: entryKeys(remaining),
          },
        }
      : {}),
  });
}

/**
 * Removes from storage the stored messages (SmEntry.o) among the entries an ack up to `newBase`
 * covers, before the trim: trimmed first, a message whose removal then failed (the frame goes
 * back to the queue, and its redelivery finds nothing left to trim), or whose removal a resume
 * read the queue ahead of (and flooded it again from storage), would reach the client twice.
 * Removed first, a message whose trim then fails is covered by the count all the same: a
 * redelivery trims it, a resume's count (never below this one) covers it. Nothing when the ack
 * will be refused (too high, not this stream's session) or settled by a read of its own (an
 * uncertain queue: removed after its trim, as before). The ids removed.
 *
 * With serial posting only (SM_POST_ORDER=serial, the default; `sm.stored` is set only then): no
 * entry is ever marked uncertain there, so what the count covers in this read is what the trim
 * removes. With `checked`, another sender's mark landing after the read can make the count vouch
 * for less: an entry removed from storage would then be sent again from the queue alone, and
 * lost if the session ended before its ack (a re-route drops flooded entries). There the trim
 * goes first, as before: a failure or a resume between the two may send a flooded message twice,
 * never lose it.
 */
async function removeStoredFirst(
  server: Server,
  stream: Stream,
  smId: string,
  newBase: number,
): Promise<Set<string>> {
  const item = await server.smQueue.get(smId);
  if (
    !item ||
    item.ended ||
    item.uncertain ||
    item.connectionId !== stream.connectionId ||
    newBase > item.out
  )
    return new Set();
  return removeCovered(server, stream.user as string, item, newBase);
}

/** Removes from storage the stored messages among `item`'s entries a count of `upTo` covers. */
async function removeCovered(
  server: Server,
  user: string,
  item: SmQueueItem,
  upTo: number,
): Promise<Set<string>> {
  const covered = item.entries.slice(0, Math.max(0, upTo - item.base));
  const ids = covered.flatMap((e) => (e.o ? [e.o] : []));
  if (ids.length > 0) await server.offline.remove(user, ids);
  return new Set(ids);
}

/** The keys of queue entries (SmEntry.k), for the modules that keyed them (DeliveryOptions.key). */
function entryKeys(entries: SmEntry[]): string[] {
  return entries.flatMap((entry) => (entry.k ? [entry.k] : []));
}

interface Trimmed {
  removed: SmEntry[];
  remaining: SmEntry[];
  out: number;
  congested: boolean;
}

/**
 * An ack of a queue whose only uncertain entries are late posts (SmEntry.b) that this count
 * reaches: it covers them wherever they landed (see countCovers), and is applied as a plain ack
 * is, without making the client resume. 'short' when it falls short of a bound; with `ordered`
 * (every answered post checked) the entries before the first one it cannot vouch for are trimmed
 * then (`trimmed`, to `base`). Undefined when the count cannot vouch for every uncertain
 * entry, or the queue changed since its read (then the client resumes, as for any other mark).
 */
async function ackPastBounds(
  server: Server,
  smId: string,
  oldBase: number,
  newBase: number,
  connectionId: string,
  ordered: boolean,
): Promise<
  | ({ kind: 'settled' } & Trimmed)
  | { kind: 'short'; bound: number; out: number; trimmed?: Trimmed & { base: number } }
  | undefined
> {
  // Tried again from a fresh read when another sender's append came between the read and the write.
  for (let attempt = 0; attempt < 3; attempt++) {
    const item = await server.smQueue.get(smId);
    if (!item || item.ended || item.connectionId !== connectionId || item.base !== oldBase) return undefined;
    if (newBase > item.out) return undefined;
    const uncertain = item.entries.filter((entry) => entry.u);
    if (!uncertain.every((entry) => entry.u === true && entry.b !== undefined)) return undefined;
    const bound = Math.max(...uncertain.map((entry) => entry.b as number));
    // Every uncertain entry is a late post's: settled by a count that reaches its bound (and
    // numbered within the count), short of that only for now.
    const vouched = item.entries.every(
      (entry, at) =>
        !entry.u || (boundReached(entry, newBase - item.base, item.base) && item.base + 1 + at <= newBase),
    );
    if (!vouched) {
      // A certain entry numbered within the count reached the client before every later one
      // (countCovers, ordered), and a late one whose bound it reaches is covered: the run of
      // such entries from the head is trimmed; the first it cannot vouch for, and all after it,
      // stay as they are, marks and all.
      const received = newBase - item.base;
      let vouchedFor = 0;
      while (ordered && vouchedFor < received) {
        const entry = item.entries[vouchedFor] as SmEntry;
        if (entry.u && !boundReached(entry, received, item.base)) break;
        vouchedFor += 1;
      }
      if (vouchedFor === 0) return { kind: 'short', bound, out: item.out };
      const kept = item.entries.slice(vouchedFor);
      if (!(await server.smQueue.rebase(smId, item, item.base + vouchedFor, kept))) continue;
      return {
        kind: 'short',
        bound,
        out: item.out,
        trimmed: {
          base: item.base + vouchedFor,
          removed: item.entries.slice(0, vouchedFor),
          remaining: kept,
          out: item.out,
          congested: item.congested === true,
        },
      };
    }
    const remaining = item.entries.slice(newBase - item.base);
    if (!(await server.smQueue.rebase(smId, item, newBase, remaining))) continue;
    server.log.info('an ack reached the bound of every late entry: settled without a resume', { smId });
    return {
      kind: 'settled',
      removed: item.entries.slice(0, newBase - item.base),
      remaining,
      out: item.out,
      congested: item.congested === true,
    };
  }
  return undefined;
}

/** What a `<resume/>` asks for, read from the element alone. */
export type ResumeRequest = { ok: true; previd: string; h: number } | { ok: false; condition: string };

export function decodeResume(element: Element, version: SmVersion): ResumeRequest {
  const previd = element.attrs.previd;
  // sm:3 §5: <resume/> MUST carry 'h'; the seed: it "SHOULD include an 'h' attribute", so an
  // sm:1 resume without one acknowledges nothing new (h = -1: the queue's base).
  const h = element.attrs.h === undefined && version === 'sm1' ? -1 : counter(element.attrs.h);
  if (!previd || h === undefined) return { ok: false, condition: 'bad-request' };
  // Only ids this server could have issued are looked up (and DynamoDB keys are bounded).
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(previd)) return { ok: false, condition: 'item-not-found' };
  return { ok: true, previd, h };
}

export type ResumeVerdict =
  | { kind: 'refuse'; condition: string; h?: number }
  /** The window closed and the sweeper has not come by yet: expired all the same. */
  | { kind: 'expired'; h: number }
  /**
   * The client's count is behind what it acknowledged before: what it says it lacks was dropped
   * at that ack, and its later counts would never reach the server's numbering again.
   */
  | { kind: 'behind'; h: number }
  | { kind: 'too-high'; h: number; sendCount: number }
  | { kind: 'resume'; acked: number };

/** Decides whether a resume may proceed, from the stored session alone (no I/O). */
export function judgeResume(
  request: { previd: string; h: number },
  item: SmQueueItem | undefined,
  context: { user: string; version: SmVersion; now: number },
): ResumeVerdict {
  // Another user's id is as unknown as a bogus one: nothing about it is revealed.
  // A session of a deleted account is as unknown: a stream that authenticated before the
  // deletion, or an account created again under the JID, does not take it over.
  if (!item || item.user !== context.user || item.revoked || (!item.resumable && !item.ended)) {
    return { kind: 'refuse', condition: 'item-not-found' };
  }
  if (item.version !== context.version) return { kind: 'refuse', condition: 'unexpected-request' };
  if (item.ended) return { kind: 'refuse', condition: 'item-not-found', h: item.inbound ?? 0 };
  if (!item.connectionId && item.sweepAt !== undefined && item.sweepAt <= context.now) {
    return { kind: 'expired', h: item.inbound ?? 0 };
  }
  if (request.h >= 0 && isStaleCount(request.h, item.base)) return { kind: 'behind', h: item.inbound ?? 0 };
  const acked = request.h < 0 ? item.base : unwrap(request.h, item.base);
  if (acked > item.out) return { kind: 'too-high', h: request.h, sendCount: item.out };
  return { kind: 'resume', acked };
}

/** Decides whether a `<resume/>` may proceed; the reply is written by `resume`. */
async function decideResume(
  stream: Stream,
  element: Element,
  version: SmVersion,
): Promise<
  | { ok: false; reply: Element | undefined }
  | {
      ok: true;
      item: SmQueueItem;
      h: number;
      inbound: number;
      after?: SmState['after'];
      /** The old stream's offline transfer in progress (XEP-0013 fetches and views go on). */
      transfer?: OfflineTransfer;
    }
> {
  const { server } = stream;
  const user = stream.user;
  if (!user) return { ok: false, reply: failed(version, 'not-authorized') };
  if (stream.state.resource || stream.state.sm)
    return { ok: false, reply: failed(version, 'unexpected-request') };
  const request = decodeResume(element, version);
  if (!request.ok) return { ok: false, reply: failed(version, request.condition) };
  const item = await server.smQueue.get(request.previd);
  const verdict = judgeResume(request, item, { user, version, now: Date.now() });
  switch (verdict.kind) {
    case 'refuse':
      return { ok: false, reply: failed(version, verdict.condition, verdict.h) };
    case 'expired':
      await endSession(server, sessionOfItem(item as SmQueueItem), 'expired');
      return { ok: false, reply: failed(version, 'item-not-found', verdict.h) };
    case 'behind':
      // Not "too high" (sm:3 §7 keeps that for a count above what was sent), and no resume could
      // ever succeed with it: the session ends now, as an expired one (what it held goes back to
      // routing: offline storage, the senders), and the client binds anew.
      server.log.info('resume with a count behind the acknowledged one: session ended', {
        smId: (item as SmQueueItem).smId,
      });
      await endSession(server, sessionOfItem(item as SmQueueItem), 'expired');
      return { ok: false, reply: failed(version, 'item-not-found', verdict.h) };
    case 'too-high':
      // The seed: "If an error occurs with regard to an <enable/> or <resume/> element, the
      // receiving entity MUST return a <failed/> element"; sm:3 §4 asks for the stream error.
      // Either way the session stays detached, to be resumed with a count that fits.
      if (version === 'sm1') return { ok: false, reply: failed(version, 'bad-request') };
      throw tooHigh(version, verdict.h, verdict.sendCount);
    case 'resume': {
      const found = item as SmQueueItem;
      if (found.connectionId === stream.connectionId) {
        // An earlier attempt of this very frame took the session over and failed before saving
        // it (fencing this connection now would stop it for good): the session is detached again
        // (its count was recorded at the attach), the socket closed, and the client resumes
        // once more from a new connection.
        // (Also when a later resume has fenced this connection meanwhile: detached, the session is
        // that resume's to take, and this socket's $disconnect no longer ends it.)
        await server.smQueue.detach(
          found.smId,
          stream.connectionId,
          found.inbound ?? 0,
          Date.now() + found.max * 1000,
          found.directedTo ?? [],
        );
        stream.update({ resuming: undefined });
        await stream.commit().catch((error: unknown) => {
          if (!(error instanceof ConnectionFencedError)) throw error;
        });
        await forceResume(server, stream.connectionId, 'redelivered', '<resume/>');
        return { ok: false, reply: undefined };
      }
      if (stream.state.fenced) {
        // A later resume took the session from this connection while this one was being retried:
        // it is not this stream's to take back (fencing that newer owner would stop it for good).
        // The socket is closed; a client still there resumes from a new connection.
        await forceResume(server, stream.connectionId, 'fenced', 'resume on a fenced connection');
        return { ok: false, reply: undefined };
      }
      // The old connection is fenced first: from now on it routes no stanza it has not counted,
      // so the h of <resumed/> covers everything it ever routed (issue: a duplicate when the old
      // connection routed a stanza just after the resume read its count).
      const previous = found.connectionId
        ? await server.sessions.fenceConnection(found.connectionId)
        : undefined;
      // The old stream whose counted stanza is still on its way when the resume goes ahead: the
      // resumed stream's stanzas wait for it (SmState.after). One that was itself waiting for an
      // older stream passes its wait on.
      let after: SmState['after'];
      if (found.connectionId && previous) after = await orderAfter(server, found.connectionId, previous);
      else if (!found.connectionId && found.detachedFrom) {
        // Detached by a 410 or a probe while a frame of that connection was still being retried:
        // its row stays, fenced, until its $disconnect, and a stanza it counted (in the count the
        // detach took) may still be on its way. The resume waits for it all the same.
        const left = await server.sessions.getConnection(found.detachedFrom);
        if (left) after = await orderAfter(server, found.detachedFrom, left);
      }
      const transfer = previous?.transfer ?? found.transfer;
      return {
        ok: true,
        item: found,
        ...(after ? { after } : {}),
        h: verdict.acked,
        // The old row's count is the newest while attached; the session's, recorded at the last
        // attach or detach, is never above it (and is the only one once that row is gone).
        inbound: Math.max(previous?.sm?.inbound ?? 0, found.inbound ?? 0),
        // The old row's while attached; once detached, what the detach recorded.
        ...(transfer ? { transfer } : {}),
      };
    }
  }
}

/**
 * Whether the connection's last counted stanza has been handled to the end (routed): its
 * `doneSeq` has reached its `countedSeq`. Only known when every frame is marked done
 * (FRAME_DONE_MARKS=all); with `batched` the last frame of a batch is never marked. A stream
 * its own frame ended (`ended`: a stream error after its retries) routes nothing any more.
 */
function countedHandled(server: Server, state: ConnectionState): boolean {
  if (server.config.frameDoneMarks !== 'all' || state.countedSeq === undefined || state.ended) return true;
  return state.doneSeq !== undefined && sequenceAtMost(state.countedSeq, state.doneSeq);
}

/**
 * A stanza the old stream counted is in the `h` of <resumed/>, so the client will not send it
 * again; if its frame is still being handled (retried after a DynamoDB or API Gateway error),
 * what the client sends on the resumed stream would overtake it. The resume waits for it,
 * checking the old row 50, 100, 200, 400 ms apart, until SM_RESUME_SETTLE_MS after the resume
 * arrived. An invocation spends at most half of its time left on that; when the settle time is
 * not over by then, the resume goes back to the queue (RetryLaterError), which brings it again
 * in a second or so (the old stream's retried frame is often waiting for the same). After
 * SM_RESUME_SETTLE_MS it goes ahead with a warning (that frame may have ended the old stream
 * with an error, or keep failing).
 */
async function settleFenced(server: Server, connectionId: string, fenced: ConnectionState): Promise<boolean> {
  if (countedHandled(server, fenced)) return true;
  const now = Date.now();
  const settleUntil = now + server.config.smResumeSettleMs - (frameAge(now) ?? 0);
  const until = Math.min(settleUntil, now + (frameTimeLeft() ?? Number.POSITIVE_INFINITY) / 2);
  for (let check = 0; ; check++) {
    const pause = Math.min(50 * 2 ** check, 400, until - Date.now());
    if (pause <= 0) break;
    await sleep(pause);
    const state = await server.sessions.getConnection(connectionId);
    if (!state || countedHandled(server, state)) return true;
  }
  // The invocation's time, not SM_RESUME_SETTLE_MS, ended the wait: the queue brings it again.
  if (until < settleUntil - 50) {
    server.log.info('resume handed back: the old stream has not routed a stanza it counted', {
      connectionId,
    });
    throw new RetryLaterError(OLD_UNROUTED);
  }
  server.metrics.count('ResumesUnsettled');
  server.log.warn('resuming while the old stream has not routed a stanza it counted', { connectionId });
  return false;
}

/**
 * Settles the resume with the old stream (settleFenced); when it goes ahead unsettled, what the
 * resumed stream must wait for (SmState.after), or the old stream's own wait, still running.
 */
async function orderAfter(
  server: Server,
  connectionId: string,
  old: ConnectionState,
): Promise<SmState['after']> {
  if (!(await settleFenced(server, connectionId, old)))
    return { connectionId, until: Date.now() + server.config.smResumeOrderMs };
  return old.sm?.after && old.sm.after.until > Date.now() ? old.sm.after : undefined;
}

/** Decisions a resume may take before its attach holds: the session moved under each of them. */
const RESUME_DECISIONS = 3;

async function resume(stream: Stream, element: Element, version: SmVersion): Promise<void> {
  const { server } = stream;
  const user = stream.user as string;
  let decided: Extract<Awaited<ReturnType<typeof decideResume>>, { ok: true }> | undefined;
  let taken: SmQueueItem | undefined;
  for (let round = 1; round <= RESUME_DECISIONS && !taken; round++) {
    const decision = await decideResume(stream, element, version);
    if (!decision.ok) return decision.reply ? refuseResume(stream, decision.reply) : undefined;
    decided = decision;
    // Recorded first: if the socket goes before the session is saved, its $disconnect ends it.
    stream.update({ resuming: decision.item.smId });
    try {
      await stream.commit();
    } catch (error) {
      // A later resume fenced this connection after the check in decideResume, and this one has
      // fenced the owner it found, which now routes nothing: that socket is closed too, so its
      // client resumes once more (the fenced row's count is exact).
      if (error instanceof ConnectionFencedError && decision.item.connectionId)
        await forceResume(server, decision.item.connectionId, 'fenced', 'its resume was fenced');
      throw error;
    }
    // Taken only from the owner the decision fenced, and never with a lower count than the
    // session's: the old stream's $disconnect may have detached it (recording a count above the
    // one read) between the read and the fence, which then found its row gone; another resume
    // may have taken it. The decision is made again from the session as it is now.
    taken = await server.smQueue.attach(
      decision.item.smId,
      user,
      stream.connectionId,
      decision.inbound,
      decision.item.connectionId ?? null,
    );
    if (!taken) server.log.info('resume decided again: the session moved meanwhile', { round });
  }
  if (!taken || !decided) {
    // The session kept moving: the owner the last decision fenced, if it still holds it, routes
    // nothing now and is closed so its client resumes. The count is told only once it is final.
    const item = decided && (await server.smQueue.get(decided.item.smId));
    const fenced = decided?.item.connectionId;
    if (item && !item.ended && fenced && item.connectionId === fenced)
      await forceResume(server, fenced, 'fenced', 'its resume could not attach');
    return refuseResume(stream, failed(version, 'item-not-found', item?.ended ? item.inbound : undefined));
  }
  const { item, inbound } = decided;
  const previousConnection = item.connectionId;
  if (previousConnection && previousConnection !== stream.connectionId) {
    // XEP-0198 §5: the old stream, if still open, is terminated.
    // Its row stays, fenced, until its $disconnect (see keepResumable).
    await kickConnection(server, previousConnection, new StreamError('conflict', 'Resumed elsewhere'));
  }
  const record = await server.sessions.getResource(user, taken.resource);
  try {
    const replaced = await server.sessions.rebindResumed({
      user,
      resource: taken.resource,
      connectionId: stream.connectionId,
      connectedAt: stream.state.connectedAt,
      available: record?.available ?? false,
      priority: record?.priority ?? 0,
      presence: record?.presence,
      ...(record?.availableFrame ? { availableFrame: record.availableFrame } : {}),
      boundAt: Date.now(),
      smId: taken.smId,
      flexibleOffline: record?.flexibleOffline,
      ...(record?.floodSkipped ? { floodSkipped: true } : {}),
      rosterInterested: record?.rosterInterested,
      // The client's roster cache misses a refused push whatever connection it comes back on.
      ...(record?.rosterStale ? { rosterStale: record.rosterStale } : {}),
      // A flood's hold stays on: the flood carries on after the replay (session-resumed).
      held: record?.held,
      heldUntil: record?.heldUntil,
    });
    // A push refused between the read and the write marked the row this write replaced.
    if (replaced?.rosterStale && !record?.rosterStale)
      await server.sessions.markRosterStale(user, taken.resource, taken.smId, replaced.rosterStale);
  } catch (error) {
    if (!(error instanceof ResourceTakenError)) throw error;
    // A newer bind of the resource took its row after the attach: that bind replaces (ends) this
    // session and keeps its row; the resume is refused, as if it had come after the replace.
    server.log.info('resume refused: the resource was bound again meanwhile', { resource: taken.resource });
    // The count the attach recorded (from the fenced old stream), not the one read before it.
    return refuseResume(stream, failed(version, 'item-not-found', inbound));
  }

  const acked = Math.max(decided.h, taken.base);
  // Stored messages the count covers leave storage before the queue (see removeStoredFirst: serial
  // posting only).
  const serial = server.config.smPostOrder === 'serial';
  const removedFirst =
    taken.uncertain || !serial ? undefined : await removeCovered(server, user, taken, acked);
  const { removed, resend } = await settleCount(server, taken, acked, stream.connectionId);
  const offlineIds = removed.flatMap((e) => (e.o && !removedFirst?.has(e.o) ? [e.o] : []));
  if (offlineIds.length > 0) await server.offline.remove(user, offlineIds);

  const sm: SmState = {
    version,
    id: taken.smId,
    inbound,
    acked,
    resumable: true,
    max: taken.max,
    ...(decided.after ? { after: decided.after } : {}),
    ...(serial && resend.some((e) => e.o) ? { stored: true as const } : {}),
  };
  // XEP-0013 fetches and views the old stream was serving, or had waiting, go on here (a flood
  // starts again from session-resumed).
  const carried = decided.transfer;
  const pending = carried
    ? [...(carried.kind === 'flood' ? [] : [{ ...carried, waiting: undefined }]), ...(carried.waiting ?? [])]
    : [];
  const [first, ...rest] = pending;
  const { askedUpTo: _asked, ...next } = first ?? {};
  // Saved before <resumed/> goes out, with the frame that did it: see `handle`.
  stream.update({
    resource: taken.resource,
    sm,
    resuming: undefined,
    // XEP-0013 §2.2: a session that chose flexible retrieval is never flooded, after a resume
    // too; the mark lives on its resource row, and its stream's own state is read first.
    ...(record?.flexibleOffline ? { flexibleOffline: true } : {}),
    ...(stream.frameId ? { smFrame: stream.frameId } : {}),
    ...(first
      ? { transfer: { ...next, ...(rest.length > 0 ? { waiting: rest } : {}) } as OfflineTransfer }
      : {}),
  });
  await stream.commit();
  const resumed = new Element('resumed', { xmlns: namespaceOf(version), previd: taken.smId });
  // Seed §5: "If there is no known last acknowledged sequence number ... 'h' MUST NOT be included."
  if (version === 'sm3' || inbound > 0) resumed.attrs.h = String(inbound % WRAP);
  server.log.debug('stream-management resume', {
    smId: taken.smId,
    h: decided.h,
    inbound,
    base: taken.base,
    resent: resend.length,
  });
  await post(server, stream.connectionId, resumed);
  await replayHeld(stream, sm, acked, resend, acked);
  const after = await server.smQueue.get(sm.id);
  await post(server, stream.connectionId, ackRequest(version, after ? postedUpTo(after) : acked));
  // A flood cut short by the lost socket (its messages are still stored) carries on here, after
  // the last stored message the replay has just sent again: none is sent twice.
  const replayedOffline = (after?.entries ?? []).flatMap((e) => (e.o ? [e.o] : [])).sort();
  // A XEP-0013 window the old stream was posting: what of it was queued before this resume (its
  // count may have acknowledged part of that) is not sent again; what was not, is.
  if (isBound(stream))
    await server.host.fire('session-resumed', {
      stream,
      ...(record ? { resource: record } : {}),
      ...(replayedOffline.length > 0 ? { offlineReplayedUpTo: replayedOffline.at(-1) } : {}),
      ...(stream.state.transfer
        ? {
            queuedKeys: {
              appended: entryKeys([...taken.entries, ...removed, ...(after?.entries ?? [])]),
              unacknowledged: entryKeys(after?.entries ?? []),
            },
          }
        : {}),
    });
}

/**
 * Trims what the resuming client's count `acked` covers from the queue the resume attached
 * (`taken`, held: appends queue without posting) and returns what is to be sent again. A queue
 * holding uncertain entries is rewritten as `countCovers` says, numbered on from `acked`.
 */
async function settleCount(
  server: Server,
  taken: SmQueueItem,
  acked: number,
  connectionId: string,
): Promise<{ removed: SmEntry[]; resend: SmEntry[] }> {
  let item = taken;
  for (let attempt = 0; attempt < 10; attempt++) {
    if (!item.uncertain) {
      try {
        const { removed, remaining, congested } = await server.smQueue.acknowledge(
          item.smId,
          item.base,
          acked,
          connectionId,
        );
        await uncongest(server, item.smId, congested, remaining);
        return { removed, resend: item.entries.slice(acked - item.base) };
      } catch (error) {
        if (!(error instanceof UncertainQueueError)) throw error;
      }
    } else {
      const { acked: removed, kept } = countCovers(
        unpostedAsMissed(item, taken),
        acked - item.base,
        item.base,
        // Every answered post checked for later entries: each certain entry landed before them.
        server.config.smLatePostMs === 0,
      );
      if (await server.smQueue.rebase(item.smId, item, acked, kept)) {
        await uncongest(server, item.smId, item.congested === true, kept);
        server.log.info('resume sends uncertain entries again', { smId: item.smId, resent: kept.length });
        server.metrics.count('SmUncertainResent', kept.length);
        return { removed, resend: kept };
      }
    }
    // An append (held: queued, not posted) or a mark came meanwhile: read the queue again.
    const fresh = await server.smQueue.get(item.smId);
    if (!fresh || fresh.ended || fresh.connectionId !== connectionId)
      throw new NotSessionOwnerError(item.smId);
    item = fresh;
  }
  throw new RetryLaterError('the queue kept changing while a resume settled its count');
}

/**
 * Half the byte bound free again after a trim (an ack, or a resume's count): senders may queue
 * once more. A resume whose count emptied a congested queue clears it too, or every sender would
 * be told to wait until the stream's silence ended it.
 */
async function uncongest(
  server: Server,
  smId: string,
  congested: boolean,
  remaining: SmEntry[],
): Promise<void> {
  if (congested && queuedBytes(remaining) <= server.config.smQueueMaxBytes / 2)
    await server.smQueue.setCongested(smId, false);
}

/**
 * The queue's entries, those queued while the session was detached (numbered above the attach's
 * `unpostedAfter`) marked missed: no stream held the session, so none of them was posted and the
 * client's count cannot include them.
 */
function unpostedAsMissed(item: SmQueueItem, taken: SmQueueItem): SmEntry[] {
  const bound = taken.unpostedAfter;
  if (bound === undefined) return item.entries;
  return item.entries.map((entry, at) =>
    item.base + 1 + at > bound && !entry.u ? { ...entry, u: 'missed' as const } : entry,
  );
}

async function refuseResume(stream: Stream, reply: Element): Promise<void> {
  // A redelivery answers the same: a refusal for a session that kept moving, or whose resource
  // was bound again, could turn into <resumed/> for a client that has given up on it.
  await stream.answerOnce(reply);
  stream.server.metrics.count('SmResumeFailed', 1, reply.getChildElements()[0]?.name ?? 'unknown');
}

/** Every nonza of an SM namespace. */
async function handle(stream: Stream, element: Element, version: SmVersion): Promise<void> {
  if (
    (element.name === 'enable' || element.name === 'resume') &&
    stream.frameId &&
    stream.state.smFrame === stream.frameId
  ) {
    // A late switch's wait was cut short: <enabled/> has not gone out yet.
    if (element.name === 'enable' && stream.state.sm?.enabledAt !== undefined)
      return answerEnable(stream, stream.state.sm);
    // This very frame enabled or resumed the session, and failed later (its replay, the flood
    // after it): the client may hold <enabled/> or <resumed/> and part of a replay. Whatever it
    // got, a resume tells exactly: the socket is closed and the client resumes.
    return void (await forceResume(stream.server, stream.connectionId, 'redelivered', `<${element.name}/>`));
  }
  switch (element.name) {
    case 'enable':
      return enable(stream, element, version);
    case 'r':
      return requestAck(stream, element, version);
    case 'a':
      return acknowledge(stream, element, version);
    case 'resume':
      return resume(stream, element, version);
    default:
      throw new StreamError('unsupported-stanza-type', `Unknown stream management element <${element.name}>`);
  }
}
