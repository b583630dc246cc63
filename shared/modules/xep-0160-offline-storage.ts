/**
 * XEP-0160 (Best Practices for Handling Offline Messages) with XEP-0334 hints and XEP-0203
 * delay stamps: what is stored for a user with no available resource, and the flood of
 * stored messages when a session sends initial presence with a non-negative priority.
 */
import { randomBytes } from 'node:crypto';
import { Element, parse } from 'ltx';
import { frameAge, frameTime, nextDeliveryKey, offlineRecord } from '../core/frame.ts';
import {
  type BoundStream,
  type DeliveryGroup,
  type DeliveryOptions,
  type DeliveryResult,
  HANDLED,
  type HookResult,
  type Server,
} from '../core/host.ts';
import { iqResult, removeForgedDelay } from '../core/stanzas.ts';
import { withTransientRetries } from '../core/transient.ts';
import { StanzaError } from '../errors.ts';
import { fullJid } from '../jid.ts';
import { OfflineGuardFailedError, type OfflineMessage, OfflineQuotaExceededError } from '../store/offline.ts';
import {
  MAX_REQUESTED_TRANSFER_BYTES,
  type OfflineTransfer,
  type ResourceRecord,
  type TransactItem,
} from '../store/sessions.ts';
import { NS } from '../xml/namespaces.ts';

export function register(server: Server): void {
  const { host } = server;
  host.add('disco-feature', 'msgoffline');
  host.hook('message-offline', async (event): Promise<HookResult> => {
    const { stanza, user, acceptedAt, heldBy, noneAvailable } = event;
    // Behind a flood's hold: only what the flood would deliver; the rest is posted live.
    if (heldBy && !shouldStore(stanza)) return undefined;
    const guard = heldBy
      ? server.sessions.holdGuard(heldBy.user, heldBy.resource, heldBy.connectionId)
      : noneAvailable
        ? server.sessions.noneAvailableGuard(user)
        : undefined;
    try {
      // A message for a session being flooded is stored past the quota: the flood drains it.
      await storeIfWanted(server, user, stanza, acceptedAt, guard, heldBy?.resource);
    } catch (error) {
      if (!(error instanceof OfflineGuardFailedError)) throw error;
      event.routeAgain = true;
      return undefined;
    }
    return HANDLED;
  });
  // XEP-0160 §3: stored messages go out "when the recipient next sends non-negative available
  // presence": the first such presence of the session, even if an earlier one was negative.
  // Until the flood has sent everything stored, live messages are stored behind it (a hold on
  // the session's messages, put on with that presence): the sender's order is kept.
  host.hook('availability-changing', async (event) => {
    const { stream, priority } = event;
    if (priority < 0 || stream.state.flooded || stream.state.flexibleOffline) return undefined;
    // XEP-0013 §2.2: while another session of the user retrieves flexibly there is no flood, so
    // no hold either: "the user's server MUST deliver in-session messages as usual". Put on and
    // let go only after the presence's broadcast, it would store what came meanwhile for good.
    const resources = await stream.server.sessions.listResources(stream.user);
    if (resources.some((other) => other.flexibleOffline && other.resource !== stream.resource))
      return undefined;
    event.hold = true;
    return undefined;
  });
  host.hook('availability-changed', async ({ stream, available, priority, resources, held }) => {
    if (available && priority >= 0 && !stream.state.flooded) {
      // Flooded before, then negative or unavailable (messages were stored meanwhile): "when
      // the recipient next sends non-negative available presence", again, from the inbox's
      // start, skipping what a stream-management queue still holds from the first flood.
      const again = stream.state.flooded === false;
      await floodOffline(stream, resources, held, again ? {} : undefined);
    } else {
      if (held !== undefined) await releaseHold(stream);
      if (stream.state.flooded && (!available || priority < 0)) stream.update({ flooded: false });
      if (!available || priority < 0) await stopFlood(stream);
    }
    return undefined;
  });
  // A flood cut short by the lost socket (its messages are still stored) carries on after a
  // resume: from the start when it still holds the session's messages (what was stored behind
  // the hold may sort before what was sent), skipping what the queue already holds.
  host.hook('session-resumed', async ({ stream, resource, offlineReplayedUpTo, queuedKeys: keys }) => {
    // A XEP-0013 fetch or view the old stream was serving goes on now: when the resume's count
    // covered its last window, no ack will come to move it.
    if (stream.state.transfer) {
      await transferStep(stream, queuedTransferKeys(keys));
    }
    if (!resource?.available || resource.priority < 0) return undefined;
    // Its flood was skipped for the rest of its availability (see floodOffline), which the
    // resume continues: a flexible session that ended meanwhile does not make this one "next".
    if (resource.floodSkipped) {
      stream.update({ flooded: true });
      return undefined;
    }
    // XEP-0013 §2.2: no flood while another session of the user retrieves flexibly ("the
    // server MUST NOT flood the second resource"): all of the user's resources are asked.
    const others = (await stream.server.sessions.listResources(stream.user)).filter(
      (other) => other.resource !== resource.resource,
    );
    await floodOffline(stream, [resource, ...others], resource.held, { resumedAfter: offlineReplayedUpTo });
    return undefined;
  });
  host.hook('stanzas-acknowledged', async ({ stream, acked, unacknowledged, queuedKeys: keys }) => {
    await continueTransfer(stream, acked, unacknowledged, queuedTransferKeys(keys));
    return undefined;
  });
}

/** Payloads that do not make a chat message worth storing on their own. */
const EPHEMERAL = new Set<string>([NS.chatStates, NS.hints]);

/**
 * XEP-0160 §3: messages of type normal and chat are stored; headline, groupchat and error are
 * not; chat-state-only messages are not worth storing. XEP-0334: `<no-store/>` refuses
 * storage, `<store/>` asks for it.
 */
export function shouldStore(stanza: Element): boolean {
  const type = stanza.attrs.type ?? 'normal';
  // Headlines never, even with <store/> (they are never routed to storage; a hold's flood, which
  // stores what arrives meanwhile, must not keep one either).
  if (type === 'error' || type === 'groupchat' || type === 'headline') return false;
  if (stanza.getChild('store', NS.hints)) return true;
  // Only <no-store/> refuses it: <no-permanent-store/> (XEP-0334 §3) may be "stored
  // temporarily as a normal part of delivery (e.g. if the recipient is offline at the time of
  // sending)"; it keeps the message out of archives only.
  if (stanza.getChild('no-store', NS.hints)) return false;
  // "Messages that contain only chat state notifications SHOULD NOT be stored": a chat
  // message with any other payload (a body, a receipt, a marker) is stored.
  if (type === 'chat') {
    return stanza
      .getChildElements()
      .some((child) => child.name !== 'thread' && !EPHEMERAL.has(child.attrs.xmlns ?? ''));
  }
  return true;
}

/**
 * Stores the message for later, or drops it when it is not worth keeping. `acceptedAt` marks a
 * message the server accepted earlier (re-routed from an ended stream-management session): it
 * keeps that time as its stamp and is stored even past the quota, since refusing it now would
 * lose it.
 */
async function storeIfWanted(
  server: Server,
  user: string,
  stanza: Element,
  acceptedAt?: number,
  guard?: TransactItem,
  heldFor?: string,
): Promise<void> {
  if (!shouldStore(stanza)) return;
  const pastQuota = heldFor !== undefined;
  // A client's message (not a re-route) leaves a record of the store on its connection's row.
  const sender = acceptedAt === undefined ? offlineRecord(user, heldFor) : undefined;
  // Only our own delay stamp may appear on delivery: drop any that claims to be ours. On a copy:
  // a re-routed message carries the server's stamp of its acceptance, which it keeps if this
  // store's guard fails and it is routed again, live.
  const kept = parse(stanza.toString()) as Element;
  removeForgedDelay(kept, server.config.domain);
  try {
    // Stored from a frame or a re-route: keyed by it, so a redelivery of the frame (a repeated
    // re-route) does not store it twice.
    const delivery = nextDeliveryKey(`offline:${user}`);
    const stored = await server.offline.store(
      user,
      // XEP-0203: the stamp is when the server received it (the frame's arrival, also when the
      // frame waited in the queue or is handled again), not when this store runs.
      {
        from: kept.attrs.from,
        storedAt: acceptedAt ?? frameTime(),
        stanza: kept.toString(),
      },
      {
        // A re-route was accepted already: never refused. Behind a hold: past the quota, to a point.
        ignoreQuota: acceptedAt !== undefined ? true : pastQuota ? 'held' : false,
        ...(delivery ? { key: delivery } : {}),
        ...(guard ? { guard } : {}),
        ...(sender
          ? { record: server.sessions.storedOfflineRecord(sender.connectionId, sender.record) }
          : {}),
      },
    );
    if (stored.alreadyStored) return;
    // The routed stanza itself: archiving knows it (sent, re-routed) by identity.
    await server.host.fire('message-stored-offline', {
      stanza,
      user,
      id: stored.id,
      storedAt: stored.storedAt,
    });
  } catch (error) {
    // XEP-0160 §2: "if not (e.g., because the recipient's offline message queue is full), the
    // server returns a <service-unavailable/> error to the sender": the same answer as for an
    // account that does not exist (RFC 6121 §8.5.2.2.1), so a full inbox tells nobody it exists.
    if (error instanceof OfflineQuotaExceededError) throw new StanzaError('cancel', 'service-unavailable');
    throw error;
  }
}

/**
 * The stored stanza as it is delivered: with exactly one XEP-0203 delay of its arrival, and
 * without an XEP-0013 `<offline/>` child a sender put in (only the server names its nodes: a
 * forged one would point a flexible-offline client at another stored message).
 */
export function stampedStanza(server: Server, message: OfflineMessage): Element {
  const stanza = parse(message.stanza);
  for (const forged of stanza.getChildren('offline', NS.offline)) stanza.remove(forged);
  stanza.cnode(
    new Element('delay', {
      xmlns: NS.delay,
      from: server.config.domain,
      stamp: new Date(message.storedAt).toISOString(),
    }),
  );
  return stanza;
}

/**
 * Sends every stored message to the stream, oldest first, removing each only once delivery
 * is confirmed: a successful post, or with stream management the client's ack (the SM queue
 * remembers which offline message each stanza came from). XEP-0013 §2.1: no flood while a
 * session of the user asked for flexible offline retrieval. `held`: the session's messages are
 * held (ResourceRecord.held) and this is the count the flood last saw; the flood releases the
 * hold once nothing came in behind it since.
 */
async function floodOffline(
  stream: BoundStream,
  resources: ResourceRecord[],
  held?: number,
  resumed?: { resumedAfter?: string },
): Promise<void> {
  const { server } = stream;
  if (stream.state.flexibleOffline || resources.some((r) => r.flexibleOffline)) {
    if (held !== undefined) await releaseHold(stream);
    // Not flooded, for the session's whole availability: "the server MUST NOT flood the second
    // resource", and a later presence change (auto-away) after the flexible session ended is no
    // "next" presence either. Only one after going negative or unavailable floods (XEP-0160).
    stream.update({ flooded: true });
    // A resume reads it from the resource row (stream management may be enabled after this
    // presence); a session that retrieves flexibly itself is marked there already.
    if (!stream.state.flexibleOffline)
      await server.sessions.markFloodSkipped(stream.user, stream.resource, stream.connectionId);
    return;
  }
  stream.update({ flooded: true });
  if (stream.state.sm) {
    if (held === undefined) {
      const after = resumed?.resumedAfter;
      return startTransfer(stream, { kind: 'flood', ...(after ? { after } : {}) });
    }
    // After a resume, from the start: what was stored behind the hold may sort before what the
    // flood sent before the socket went (the queue holds that, and it is skipped).
    return startTransfer(stream, { kind: 'flood', held, ...(resumed ? { restart: true } : {}) });
  }
  const user = stream.user;
  let after: string | undefined = resumed?.resumedAfter;
  let seen = held;
  for (let pages = 0; ; pages++) {
    // The hold's lease (HOLD_LEASE_MS from the presence) is renewed page by page.
    if (seen !== undefined && pages > 0) await renewHold(stream);
    const page = await withTransientRetries(LIST_ATTEMPTS, () =>
      server.offline.list(user, { limit: 50, after }),
    );
    let delivered = 0;
    for (const message of page.messages) {
      const result = await sendStored(stream, message, stampedStanza(server, message), {});
      if (result === 'gone' || result === 'full') {
        // The session is gone: its hold went with its resource row.
        server.metrics.count('MessagesFlooded', delivered);
        return;
      }
      if (result !== 'sent') continue;
      delivered += 1;
      // Removed as soon as it is out, and given a few more tries than the SDK's: a failure now
      // would have the frame redelivered and the message flooded a second time.
      await withTransientRetries(REMOVE_ATTEMPTS, () => server.offline.remove(user, [message.id]));
    }
    server.metrics.count('MessagesFlooded', delivered);
    if (page.next) {
      after = page.next;
      continue;
    }
    if (seen === undefined) return;
    const now = await server.sessions.releaseHold(user, stream.resource, stream.connectionId, seen);
    if (now === undefined) return;
    // Messages were stored behind the hold meanwhile: their ids may sort before the last one
    // sent (a frame stores under its arrival time), so the inbox is read again from its start
    // (what was sent is removed already).
    seen = now;
    after = undefined;
  }
}

/** The flood goes on: its hold stands for another lease. */
async function renewHold(stream: BoundStream): Promise<void> {
  await stream.server.sessions.renewHold(stream.user, stream.resource, stream.connectionId);
}

/**
 * The session went unavailable or negative (XEP-0160 §3: stored messages go to a session "when
 * the recipient next sends non-negative available presence"): a paced flood in progress goes no
 * further, or its next windows would take messages stored for the user now to a session that
 * said it wants none, and remove them from storage on its acks, while another resource's flood
 * sends them too. What it queued already stays queued. A fetch or view waiting behind it starts;
 * one it waits behind keeps its place. The next non-negative presence floods again.
 */
async function stopFlood(stream: BoundStream): Promise<void> {
  const transfer = stream.state.transfer;
  if (!transfer) return;
  const { waiting: before = [], ...current } = transfer;
  const waiting = before.filter((queued) => queued.kind !== 'flood');
  if (transfer.kind !== 'flood') {
    if (waiting.length < before.length)
      stream.update({ transfer: waiting.length > 0 ? { ...current, waiting } : current });
    return;
  }
  const [next, ...rest] = waiting;
  stream.update({ transfer: next ? { ...next, ...(rest.length > 0 ? { waiting: rest } : {}) } : undefined });
  if (next) await transferStep(stream);
}

/** Releases the session's hold whatever was stored behind it (nothing will be flooded now). */
async function releaseHold(stream: BoundStream): Promise<void> {
  await stream.server.sessions.releaseHold(stream.user, stream.resource, stream.connectionId);
}

const REMOVE_ATTEMPTS = 3;
/** A flood's read of the inbox, tried again in place: a failure would have the whole frame tried again. */
const LIST_ATTEMPTS = 3;

// ---------------------------------------------------------------------------------------------
// Transfers paced by stream-management acks
//
// A frame is handled to its end before the next frame of the same connection, so the
// client's <a/> cannot be read while one frame sends a whole inbox: the unacknowledged queue
// would overflow (SM_QUEUE_MAX, DynamoDB's 400 KB item) and end the stream every time. With
// stream management on, a flood or a XEP-0013 fetch therefore sends one window, asks for an
// ack, and sends the next window from the frame that carries the client's <a/>.

/**
 * Largest batch before asking for an ack: by count (OFFLINE_WINDOW, within half the queue's bound)
 * and by bytes. A window is queued in one append, billed on the queue item, which holds up to one
 * and a half windows (see Config.offlineWindow).
 */
const WINDOW_BYTES = 16 * 1024;

function windowSize(server: Server): number {
  return Math.max(1, Math.min(server.config.offlineWindow, Math.floor(server.config.smQueueMax / 2)));
}

/**
 * Sends one stored message. One that can never be sent (stored before the size check existed,
 * or grown past the post limit by its stamp) is dropped from storage with a warning rather than
 * block every later login: 'dropped'.
 */
export async function sendStored(
  stream: BoundStream,
  message: OfflineMessage,
  stanza: Element,
  options: DeliveryOptions,
): Promise<DeliveryResult | 'dropped'> {
  try {
    return await stream.send(stanza, options);
  } catch (error) {
    if (!(error instanceof StanzaError) || error.condition !== 'policy-violation') throw error;
    stream.server.log.warn('stored message too large to deliver; dropped', {
      user: stream.user,
      id: message.id,
    });
    await stream.server.offline.remove(stream.user, [message.id]);
    return 'dropped';
  }
}

/**
 * `sendStored` for a window, in order (Stream.sendAll: with stream management, one append): the
 * results of those tried, which stop at the first not taken ('gone', 'full'). One too large to
 * send is removed from storage ('dropped').
 */
async function sendStoredAll(
  stream: BoundStream,
  items: readonly { message: OfflineMessage; stanza: Element; options: DeliveryOptions }[],
): Promise<(DeliveryResult | 'dropped')[]> {
  if (items.length === 0) return [];
  const results = await stream.sendAll(items);
  const dropped: string[] = [];
  const outcomes = results.map((result, at) => {
    if (!(result instanceof StanzaError)) return result;
    if (result.condition !== 'policy-violation') throw result;
    const id = items[at]?.message.id as string;
    stream.server.log.warn('stored message too large to deliver; dropped', { user: stream.user, id });
    dropped.push(id);
    return 'dropped' as const;
  });
  if (dropped.length > 0) await stream.server.offline.remove(stream.user, dropped);
  return outcomes;
}

/** Fetches and views a session may have waiting behind the transfer in progress. */
const MAX_WAITING = 4;

/** A transfer's size as the session's queue item would carry it (MAX_CARRIED_TRANSFER_BYTES). */
function transferBytes(transfer: OfflineTransfer): number {
  return Buffer.byteLength(JSON.stringify(transfer));
}

/**
 * Starts a transfer, or, while another is in progress, lets it wait its turn: a second fetch or
 * a view during a fetch (or during a flood) is served in full after the first, each answered
 * after its own last message; nothing is overwritten, so no request goes unanswered. A flood
 * started again (a resume, presence again) takes the place of the flood in progress.
 */
export async function startTransfer(stream: BoundStream, transfer: OfflineTransfer): Promise<void> {
  const current = stream.state.transfer;
  // A fetch or view is named by the frame that asked for it (its copies are queued under that).
  if (transfer.kind !== 'flood' && transfer.id === undefined)
    transfer = { ...transfer, id: stream.frameId || randomBytes(9).toString('base64url') };
  const id = transfer.id;
  if (id !== undefined && current && [current, ...(current.waiting ?? [])].some((known) => known.id === id)) {
    // A redelivery of the frame that asked: its first attempt saved the transfer (a window's
    // write-ahead) and died. It is not started twice; a window it was posting is finished.
    if (current.window !== undefined || current.askedUpTo === undefined) await transferStep(stream);
    return;
  }
  // A transfer is kept on the session's queue item for a resume (XEP-0198): one too large to keep
  // would leave its requests unanswered after a resume. A view that alone passes the bound can
  // never be served so: RFC 6120 §8.3.3.12 "does not meet criteria defined by the recipient".
  if (transfer.kind !== 'flood' && transferBytes(transfer) > MAX_REQUESTED_TRANSFER_BYTES)
    throw new StanzaError('modify', 'not-acceptable', 'too many messages asked for at once: ask for fewer');
  if (current && !(transfer.kind === 'flood' && current.kind === 'flood')) {
    const waiting = current.waiting ?? [];
    if (transfer.kind === 'flood') {
      // A flood is never refused (its presence is not an iq): it waits, in place of one waiting.
      const others = waiting.filter((queued) => queued.kind !== 'flood');
      stream.update({ transfer: { ...current, waiting: [...others, transfer] } });
    } else {
      const next = { ...current, waiting: [...waiting, transfer] };
      // RFC 6120 §8.3.3.18: "the recipient [...] lacks the system resources necessary to service
      // the request": too many waiting, or too many of their messages to keep for a resume.
      if (waiting.length >= MAX_WAITING || transferBytes(next) > MAX_REQUESTED_TRANSFER_BYTES)
        throw new StanzaError('wait', 'resource-constraint', 'too many offline requests in progress');
      stream.update({ transfer: next });
    }
    // The one in progress never asked for an ack (its windows sent nothing): no ack will move it
    // on, so it is moved on now.
    if (current.askedUpTo === undefined) await transferStep(stream);
    return;
  }
  stream.update({ transfer: current?.waiting ? { ...transfer, waiting: current.waiting } : transfer });
  await transferStep(stream);
}

/**
 * After an ack: the next window, once the client has caught up with half of the last one. When
 * it acknowledged all of the window and what keeps it from the next is what was sent after (an
 * iq answered meanwhile, presence, live messages), it is asked for an ack of that too: the
 * server's own `<r/>` every SM_ACK_EVERY stanzas may not come, and the transfer would wait for
 * an ack nobody asked for. A window whose posts were not saved as done (the frame that posted it
 * died before its save, and this is its redelivery) is finished first, whatever the count.
 */
async function continueTransfer(
  stream: BoundStream,
  acked: number,
  unacknowledged: number,
  known?: QueuedTransfer,
): Promise<void> {
  const transfer = stream.state.transfer;
  if (!transfer) return;
  // The queue as this ack found it, before its trim: read after it, a copy the client has just
  // acknowledged would look never queued, and be sent again.
  if (transfer.window !== undefined) return transferStep(stream, known);
  if (unacknowledged <= windowSize(stream.server) / 2) return transferStep(stream);
  if (transfer.askedUpTo !== undefined && acked < transfer.askedUpTo) return;
  const asked = await stream.server.host.stanzaQueue?.requestAck(stream);
  stream.update({ transfer: { ...transfer, ...(asked === undefined ? {} : { askedUpTo: asked }) } });
}

/**
 * One window of the transfer in progress: how many stanzas went out (or wait unacknowledged),
 * whether it is over, and `blocked` when it stopped at a full queue or a session gone (another
 * window now would not go out either).
 */
interface Window {
  sent: number;
  done: boolean;
  blocked?: boolean;
  /** The row holds this window's write-ahead (a redelivery or a resume finishes it, result included). */
  ahead?: boolean;
}

/**
 * What the session's queue holds of XEP-0013 transfers (`c:` keys): `appended`, queued at some
 * point (acknowledged since or not); `unacknowledged`, still queued.
 */
interface QueuedTransfer {
  appended: Set<string>;
  unacknowledged: Set<string>;
}

/** What of the queue's keys (the events' `queuedKeys`) are transfer entries. */
function queuedTransferKeys(keys?: {
  appended: string[];
  unacknowledged: string[];
}): QueuedTransfer | undefined {
  return keys
    ? { appended: transferKeysOf(keys.appended), unacknowledged: transferKeysOf(keys.unacknowledged) }
    : undefined;
}

/** Transfer entries are keyed `c:<transfer id>[:<node>]` (transferKey). */
const TRANSFER_KEY_PREFIX = 'c:';

function transferKeysOf(keys: (string | undefined)[]): Set<string> {
  return new Set(keys.filter((key): key is string => key?.startsWith(TRANSFER_KEY_PREFIX) === true));
}

/** A XEP-0013 transfer's key for the copy of `node` in a stream-management queue, or for its result. */
function transferKey(transfer: OfflineTransfer, node?: string): string {
  const key = `${TRANSFER_KEY_PREFIX}${transfer.id}`;
  return node === undefined ? key : `${key}:${node}`;
}

/**
 * The session's queue as it is now (a redelivered frame): nothing of it can have been
 * acknowledged since the frame's first attempt queued it, since the client's acks come in later
 * frames of the connection, handled after this one.
 */
async function queuedTransfer(stream: BoundStream): Promise<QueuedTransfer> {
  const smId = stream.state.sm?.id;
  const item = smId ? await stream.server.smQueue.get(smId) : undefined;
  const keys = transferKeysOf(item?.entries.map((entry) => entry.k) ?? []);
  return { appended: keys, unacknowledged: keys };
}

/**
 * Sends the next window of the transfer in progress. One that ends is answered, and the next
 * waiting one starts at once if nothing went out yet (else at the next ack); one ack request
 * follows whatever was sent. `known`: what the session's queue holds of transfers (a resume).
 */
async function transferStep(stream: BoundStream, known?: QueuedTransfer): Promise<void> {
  const { server } = stream;
  let sent = 0;
  let queued = known;
  for (;;) {
    const transfer = stream.state.transfer;
    if (!transfer) break;
    if (transfer.window !== undefined) {
      // Written ahead and never saved as done: the posts may have stopped anywhere in it.
      queued ??= await queuedTransfer(stream);
      const finished = await finishWindow(stream, transfer, queued);
      sent += finished.sent;
      if (finished.blocked) break;
      continue;
    }
    if (transfer.kind === 'flood' && sent > 0) break;
    // After what is out already, a fetch or view only looks whether anything is left to send.
    const budget = sent > 0 ? 0 : windowSize(server);
    const window =
      transfer.kind === 'view'
        ? await viewWindow(stream, transfer, budget)
        : transfer.kind === 'fetch'
          ? await fetchWindow(stream, transfer, budget)
          : await inboxWindow(stream, transfer);
    sent += window.sent;
    if (!window.done) {
      // Nothing went out (a window of messages removed meanwhile): the next one now, else the
      // client is never asked for an ack and the transfer stalls.
      if (window.sent === 0 && !window.blocked && budget > 0) continue;
      break;
    }
    const [next, ...rest] = transfer.waiting ?? [];
    const resultKey = transfer.iqId === undefined ? undefined : transferKey(transfer);
    // XEP-0013 §2.5: the messages first, then the result: once. The row says it may be going out
    // (the last window's write-ahead, or `[]` alone), so that a redelivery or a resume looks for
    // it in the queue before answering.
    if (resultKey && queued === undefined && !window.ahead) {
      stream.update({ transfer: { ...transfer, window: [] } });
      await stream.commit();
    }
    stream.update({
      transfer: next ? { ...next, ...(rest.length > 0 ? { waiting: rest } : {}) } : undefined,
    });
    if (resultKey && !queued?.appended.has(resultKey)) await answerTransfer(stream, transfer);
    if (sent > 0) break;
  }
  const transfer = stream.state.transfer;
  if (sent === 0) return;
  const asked = await server.host.stanzaQueue?.requestAck(stream);
  // The count asked for: once the client acknowledged it, the window is out of the way.
  if (transfer && asked !== undefined) stream.update({ transfer: { ...transfer, askedUpTo: asked } });
}

/**
 * Saves the window before its first post (one write to the connection's row, under the fence: a
 * connection a resume took over posts nothing more). Whatever happens to the posts from here on,
 * the row, and a detach or a resume reading it, knows where the transfer stands.
 */
async function writeAhead(stream: BoundStream, transfer: OfflineTransfer): Promise<void> {
  stream.update({ transfer });
  await stream.commit();
}

/**
 * Posts the copies of a window's nodes not queued yet (`skip`). Returns how many went out or
 * wait unacknowledged, and leaves the transfer without its window once every copy is out (with
 * what is left of it when the queue is full).
 */
function postWindow(
  stream: BoundStream,
  transfer: OfflineTransfer,
  messages: Map<string, OfflineMessage>,
  queued?: QueuedTransfer,
): Promise<Window> {
  return together(stream, (group) => postWindowIn(stream, transfer, messages, queued, group));
}

/**
 * Runs a window's sends as one group (StanzaQueue.deliverTogether): with stream management's
 * serial posting, queued one by one and posted in one run.
 */
function together<T>(
  stream: BoundStream,
  send: (group: DeliveryGroup | undefined) => Promise<T>,
): Promise<T> {
  const queue = stream.server.host.stanzaQueue;
  return queue ? queue.deliverTogether(stream, send) : send(undefined);
}

async function postWindowIn(
  stream: BoundStream,
  transfer: OfflineTransfer,
  messages: Map<string, OfflineMessage>,
  queued: QueuedTransfer | undefined,
  group: DeliveryGroup | undefined,
): Promise<Window> {
  const { server } = stream;
  const nodes = transfer.window ?? [];
  let sent = 0;
  // Queued already (a window finished after a failure or a resume), or removed meanwhile (by
  // another session, a purge): not sent.
  const picked = nodes.flatMap((node) => {
    const message = messages.get(node);
    return message && !queued?.appended.has(transferKey(transfer, node)) ? [message] : [];
  });
  const results = await sendStoredAll(
    stream,
    picked.map((message) => ({
      message,
      stanza: deliveredCopy(server, message),
      options: {
        offlineCopy: true,
        key: transferKey(transfer, message.id),
        attachedTo: stream.connectionId,
        ...(group ? { group } : {}),
      },
    })),
  );
  let next = 0;
  for (const [at, node] of nodes.entries()) {
    const key = transferKey(transfer, node);
    if (queued?.appended.has(key)) {
      if (queued.unacknowledged.has(key)) sent += 1;
      continue;
    }
    if (!messages.has(node)) continue;
    const result = results[next++];
    // Not tried: stopped at an earlier one (gone, full), which returned below.
    if (result === undefined) throw new Error('a window stopped without its reason');
    // The session is gone: nothing in progress or waiting can be answered.
    if (result === 'gone') {
      stream.update({ transfer: undefined });
      return { sent, done: false, blocked: true };
    }
    // Congested: this one and the rest follow from a later ack.
    if (result === 'full') {
      stream.update({ transfer: { ...transfer, window: nodes.slice(at) } });
      return { sent, done: false, blocked: true };
    }
    // One dropped (too large to send: removed from storage) went nowhere: no ack will count it.
    if (result === 'sent') sent += 1;
  }
  const { window: _posted, ...rest } = transfer;
  stream.update({ transfer: rest });
  return { sent, done: false };
}

/** A window found in the row, saved ahead and not as done: finished, skipping what was queued. */
async function finishWindow(
  stream: BoundStream,
  transfer: OfflineTransfer,
  queued: QueuedTransfer,
): Promise<Window> {
  const missing = (transfer.window ?? []).filter((node) => !queued.appended.has(transferKey(transfer, node)));
  const messages = missing.length > 0 ? await stream.server.offline.get(stream.user, missing) : new Map();
  return postWindow(stream, transfer, messages, queued);
}

/**
 * A fetch's next window: the inbox read on from the last message of the window before, saved
 * ahead of its posts. `budget` 0: only whether anything is left.
 */
async function fetchWindow(stream: BoundStream, transfer: OfflineTransfer, budget: number): Promise<Window> {
  const { server } = stream;
  const page = await server.offline.list(stream.user, { limit: Math.max(1, budget), after: transfer.after });
  if (budget === 0) return { sent: 0, done: page.messages.length === 0 };
  const picked: OfflineMessage[] = [];
  let bytes = 0;
  for (const message of page.messages) {
    picked.push(message);
    bytes += Buffer.byteLength(message.stanza);
    if (bytes >= WINDOW_BYTES) break;
  }
  const last = picked.at(-1);
  if (!last) return { sent: 0, done: true };
  const more = page.next !== undefined || picked.length < page.messages.length;
  await writeAhead(stream, { ...transfer, after: last.id, window: picked.map((message) => message.id) });
  const window = await postWindow(
    stream,
    stream.state.transfer as OfflineTransfer,
    new Map(picked.map((message) => [message.id, message])),
  );
  return window.blocked ? window : { sent: window.sent, done: !more, ahead: true };
}

/** A flood's next window: the inbox read on from the last message sent. */
function inboxWindow(stream: BoundStream, start: OfflineTransfer): Promise<Window> {
  return together(stream, (group) => inboxWindowIn(stream, start, group));
}

async function inboxWindowIn(
  stream: BoundStream,
  start: OfflineTransfer,
  group: DeliveryGroup | undefined,
): Promise<Window> {
  const { server } = stream;
  const user = stream.user;
  let transfer = start;
  let after = transfer.after;
  let bytes = 0;
  let sent = 0;
  // Each window renews the hold's lease: a client that stops acknowledging lets it run out.
  if (
    transfer.kind === 'flood' &&
    transfer.held !== undefined &&
    (transfer.after !== undefined || transfer.restart)
  )
    await renewHold(stream);
  for (;;) {
    const page = await server.offline.list(user, { limit: windowSize(server), after });
    // Going through the inbox again from its start (a resume, or messages stored behind the
    // hold): what the queue holds was sent already and waits for the client's ack.
    const queued = transfer.restart ? await queuedOfflineIds(stream) : undefined;
    let stopped = false;
    let full = false;
    // The window: what the page holds that is not queued yet, up to the window's count and bytes.
    const picked: OfflineMessage[] = [];
    let pickedBytes = bytes;
    for (const message of page.messages) {
      if (queued?.has(message.id)) continue;
      if (sent + picked.length >= windowSize(server) || pickedBytes >= WINDOW_BYTES) break;
      picked.push(message);
      pickedBytes += Buffer.byteLength(message.stanza);
    }
    const results = await sendStoredAll(
      stream,
      picked.map((message) => ({
        message,
        stanza: stampedStanza(server, message),
        options: { offlineId: message.id, attachedTo: stream.connectionId, ...(group ? { group } : {}) },
      })),
    );
    let next = 0;
    for (const message of page.messages) {
      if (queued?.has(message.id)) {
        after = message.id;
        continue;
      }
      // Past the window: the rest follows from the next ack.
      const result = next < picked.length ? results[next++] : undefined;
      if (result === undefined) {
        stopped = true;
        break;
      }
      // The session is gone: nothing in progress or waiting can be answered.
      if (result === 'gone') {
        stream.update({ transfer: undefined });
        return { sent, done: false };
      }
      if (result === 'sent') {
        server.metrics.count('MessagesFlooded');
        server.host.stanzaQueue?.queuedStored(stream);
      }
      // Congested: the rest follows from a later ack, from this message on.
      if (result === 'full') {
        stopped = true;
        full = true;
        break;
      }
      after = message.id;
      // One dropped (too large to send: removed from storage) went nowhere: no ack will count it.
      if (result === 'dropped') continue;
      sent += 1;
      bytes += Buffer.byteLength(message.stanza);
      if (bytes >= WINDOW_BYTES) {
        stopped = true;
        break;
      }
    }
    if (stopped || page.next) {
      transfer = { ...transfer, ...(after ? { after } : {}) };
      stream.update({ transfer });
      // Nothing sent (all of the page was queued already): the next page now, not after an ack.
      if (sent === 0 && !stopped) continue;
      // Stopped at a congested queue: another window now would stop there too (transferStep).
      return { sent, done: false, ...(full ? { blocked: true } : {}) };
    }
    // The whole inbox is out.
    if (transfer.kind === 'flood' && transfer.held !== undefined) {
      const now = await server.sessions.releaseHold(
        user,
        stream.resource,
        stream.connectionId,
        transfer.held,
      );
      if (now !== undefined) {
        // Stored behind the hold meanwhile, under ids that may sort before the last one sent.
        transfer = {
          kind: 'flood',
          held: now,
          restart: true,
          ...(transfer.waiting ? { waiting: transfer.waiting } : {}),
        };
        stream.update({ transfer });
        if (sent === 0) {
          after = undefined;
          continue;
        }
        return { sent, done: false };
      }
    }
    return { sent, done: true };
  }
}

/** The result of the fetch or view a transfer served, once its last message is out. */
async function answerTransfer(stream: BoundStream, transfer: OfflineTransfer): Promise<void> {
  if (transfer.iqId === undefined) return;
  const request = new Element('iq', { id: transfer.iqId, from: fullJid(stream.jid) });
  if (transfer.iqFrom) request.attrs.to = transfer.iqFrom;
  await stream.send(iqResult(request), { key: transferKey(transfer), attachedTo: stream.connectionId });
}

/**
 * XEP-0013 §2.4 view with stream management: "the server MUST send the requested message(s)
 * plus an IQ result", window by window as the client acknowledges (a view of many large
 * messages would overflow the queue, and then not even the result could go out). A message
 * removed meanwhile (by another session) is skipped; a window of nothing but removed ones sends
 * nothing and is passed at once (transferStep reads the next). `budget` 0: only whether any
 * node is left.
 */
async function viewWindow(stream: BoundStream, transfer: OfflineTransfer, budget: number): Promise<Window> {
  const { server } = stream;
  const nodes = transfer.nodes ?? [];
  if (budget === 0 || nodes.length === 0) return { sent: 0, done: nodes.length === 0 };
  const window = nodes.slice(0, budget);
  const found: Map<string, OfflineMessage> = await server.offline.get(stream.user, window);
  let passed = 0;
  let bytes = 0;
  const picked: string[] = [];
  for (const node of window) {
    passed += 1;
    const message = found.get(node);
    if (!message) continue;
    picked.push(node);
    bytes += Buffer.byteLength(message.stanza);
    if (bytes >= WINDOW_BYTES) break;
  }
  const rest = nodes.slice(passed);
  if (picked.length === 0) {
    stream.update({ transfer: { ...transfer, nodes: rest } });
    return { sent: 0, done: rest.length === 0 };
  }
  await writeAhead(stream, { ...transfer, nodes: rest, window: picked });
  const posted = await postWindow(stream, stream.state.transfer as OfflineTransfer, found);
  return posted.blocked ? posted : { sent: posted.sent, done: rest.length === 0, ahead: true };
}

/** The stored messages this session's stream-management queue holds, unacknowledged. */
async function queuedOfflineIds(stream: BoundStream): Promise<Set<string>> {
  const smId = stream.state.sm?.id;
  const item = smId ? await stream.server.smQueue.get(smId) : undefined;
  return new Set(item?.entries.flatMap((entry) => (entry.o ? [entry.o] : [])) ?? []);
}

/**
 * A stored message as XEP-0013 view and fetch deliver it. XEP-0013 §2.3: "each message MUST
 * contain the node value", and it carries one XEP-0203 delay stamp of its arrival.
 */
export function deliveredCopy(server: Server, message: OfflineMessage): Element {
  const stanza = stampedStanza(server, message);
  // XEP-0198: this copy stays in the offline store, so it is sent as an `offlineCopy`: if
  // stream management still holds it unacknowledged when the session ends, it is dropped,
  // never re-routed (that would store it a second time), and an ack does not remove the
  // stored message (XEP-0013 §2.4: viewing deletes nothing).
  stanza.c('offline', { xmlns: NS.offline }).c('item', { node: message.id });
  return stanza;
}
