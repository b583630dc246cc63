/**
 * The module host (Prosody's model): the registries modules fill when they are registered, and
 * the named events the core fires. The core never imports a module; a module receives the host
 * in its `register(host)` and hooks what it needs.
 *
 * - Events: `host.hook(name, handler, { priority })`; handlers run from the highest priority
 *   down (equal priorities in registration order) and one may return `HANDLED` to stop the
 *   rest (and the core's default behaviour, where the event has one).
 * - iq handlers: `host.iq(type, namespace, element, handler, options)`, looked up by the
 *   router for iqs addressed to the server or to an account (RFC 6120 §10.3.3).
 * - Nonza handlers: `host.nonza(namespace, handler)` for top-level elements that are not
 *   stanzas (SASL, stream management).
 * - Items: `host.add(kind, item)` / `host.items(kind)`, lists modules offer each other through
 *   the host (disco features, disco nodes) without importing each other.
 */
import type { Element } from 'ltx';
import type { Config } from '../config.ts';
import type { StanzaError, StreamError } from '../errors.ts';
import type { Jid } from '../jid.ts';
import type { Logger } from '../log.ts';
import type { MetricsRecorder } from '../metrics.ts';
import type { Outbound, PostResult } from '../outbound.ts';
import type { ArchiveStore } from '../store/archive.ts';
import type { OfflineStore } from '../store/offline.ts';
import type { RosterStore } from '../store/roster.ts';
import type { ConnectionState, ResourceRecord, Revocation, SessionStore } from '../store/sessions.ts';
import type { SmQueueStore } from '../store/sm-queue.ts';
import type { UserStore } from '../store/users.ts';
import type { RateLimiter } from './rate-limit.ts';

/** The server's context, built once per process (core/server.ts); modules get it in `register`. */
export interface Server {
  config: Config;
  sessions: SessionStore;
  users: UserStore;
  offline: OfflineStore;
  smQueue: SmQueueStore;
  roster: RosterStore;
  /** XEP-0136 Message Archiving. */
  archive: ArchiveStore;
  /** Only the delivery path (core/delivery.ts) posts through it. */
  outbound: Outbound;
  host: Host;
  /** Per-connection rate limits (core/rate-limit.ts), remembered per process. */
  rates: RateLimiter;
  log: Logger;
  /** Business metrics, drained and published once per invocation by the function (shared/metrics.ts). */
  metrics: MetricsRecorder;
  /** Secret for SASL decoys of unknown users (stable per deployment, never sent). */
  decoySecret(): Promise<string>;
}

/** A module: one specification, everything it offers registered in one call. */
export interface Module {
  register(server: Server): void;
}

export type StreamStateChanges = Partial<Omit<ConnectionState, 'connectionId' | 'connectedAt'>>;

/** One XMPP stream during one frame (core/stream.ts): its state, its changes and its sends. */
export interface Stream {
  readonly server: Server;
  readonly state: ConnectionState;
  readonly connectionId: string;
  /** The authenticated bare JID, once SASL succeeded. */
  readonly user: string | undefined;
  readonly ended: boolean;
  /** API Gateway's id of the frame being handled (the same on a redelivery), '' when unknown. */
  readonly frameId: string;
  /** The frame's SQS sequence number, when it came through the queue (grows per connection). */
  readonly seq?: string;
  update(changes: StreamStateChanges): void;
  /**
   * Writes the pending state changes now, unless a stream-management resume on another
   * connection fenced this one: then throws ConnectionFencedError and the frame stops here.
   */
  commit(): Promise<void>;
  /**
   * The frame's pending changes include a XEP-0198 count that waits for the frame's save (a
   * repeatable stanza's): that save then lands only on a row no resume fenced, since a fenced
   * row's count is the one the resume reported, and raised after it would vouch for stanzas the
   * old stream dropped at the fence.
   */
  countWaitsForSave(): void;
  /** Through the delivery path: with stream management on, stanzas are numbered and queued. */
  send(element: Element, options?: DeliveryOptions): Promise<DeliveryResult>;
  /**
   * Sends stanzas in order, as `send` would one by one, and stops at the first that is not taken
   * ('gone', 'full'): the results of those tried, a stanza too large to send (XEP-0478) as its
   * policy-violation StanzaError, passed over. With stream management, a group's stanzas
   * (DeliveryOptions.group) are queued in one write when they all fit.
   */
  sendAll(items: readonly DeliveryItem[]): Promise<SendAllResult[]>;
  /**
   * Sends an answer that a redelivery of this frame repeats instead of deciding again (a refusal
   * whose cause may be gone by then): saved with the frame's id and its changes so far, before it
   * goes out. For answers outside stream management's count (nonzas, answers before bind).
   */
  answerOnce(element: Element): Promise<void>;
  /** Sends the stream error and `<close/>`, ends the session and closes the socket. */
  fail(error: StreamError): Promise<void>;
  /** Sends `<close/>`, ends the session and closes the socket. */
  close(): Promise<void>;
}

/** A stream whose resource is bound: it has a full JID. */
export interface BoundStream extends Stream {
  readonly user: string;
  readonly resource: string;
  readonly jid: Jid;
}

export function isBound(stream: Stream): stream is BoundStream {
  return stream.state.user !== undefined && stream.state.resource !== undefined;
}

/** A hook's answer meaning "this stanza or event is dealt with; stop here". */
export const HANDLED = Symbol('handled');
export type HookResult = typeof HANDLED | undefined;

/** Why a session ended (fired with `session-ended`). */
export type SessionEndReason =
  /** `<close/>`, a stream error, or a socket gone for good without stream management. */
  | 'closed'
  /** The socket vanished (410 Gone or `$disconnect`) and nothing keeps the session. */
  | 'gone'
  /** A stream-management session's resumption window closed. */
  | 'expired'
  /** A new bind of the same resource took it over (RFC 6120 §7.7.2.2). */
  | 'replaced';

/** A stanza received from a bound client: message, presence or iq, by target. */
export interface StanzaEvent {
  stream: BoundStream;
  stanza: Element;
  /** The sender (the stream's full JID; `from` is already rewritten). */
  from: Jid;
  /** The addressee; a stanza without `to` is addressed to the sender's own bare JID. */
  to: Jid;
  /** The stanza had no `to` (RFC 6120 §10.3: handled by the server for the account). */
  self: boolean;
}

/** Targets of a stanza: a full JID, a bare JID (an account), or the server (host). */
export type StanzaTarget = 'full' | 'bare' | 'host';
export type StanzaKind = 'message' | 'presence' | 'iq';
export type StanzaEventName = `${StanzaKind}/${StanzaTarget}`;

/** What ends a session: the session's address and who owns it. */
export interface SessionRef {
  user: string;
  resource: string;
  /** The attached connection, if any (a detached stream-management session has none). */
  connectionId?: string;
  /** The stream-management session that owns the resource, if any. */
  smId?: string;
  /** RFC 6121 §4.6: JIDs the session sent directed presence to. */
  directedTo?: string[];
  /** The connection's state, when the session ends from its own stream or row. */
  state?: ConnectionState;
}

/** A stanza that an ended session had not got acknowledged, handed back for re-routing. */
export interface UndeliveredStanza {
  stanza: Element;
  /** When the server first accepted it (its XEP-0203 stamp on delivery). */
  acceptedAt: number;
  /** Called once it has been re-routed (or dropped for good): the progress is recorded. */
  done?: () => Promise<void>;
  /**
   * Names this re-route of it: the deliveries it causes are keyed by it (core/frame.ts), so a
   * re-route repeated after a failure, or run twice at once, does not deliver or store it twice.
   */
  key?: string;
  /** Its place among the stanzas re-routed with it (orders those of one millisecond). */
  sequence?: number;
  /** The other sessions its routing gave it to (DeliveryOptions.alsoTo): still there, they have it. */
  alsoTo?: string[];
  /**
   * Its session belonged to an account since deleted: it goes back to its sender as to a JID
   * without an account (RFC 6121 §8.5.1), never routed to the JID again, where an account created
   * since under it (someone else) would get it.
   */
  ownerDeleted?: boolean;
}

export interface EventPayloads {
  /** Stream features are being built for a new `<open/>` (modules add their children). */
  'stream-features': { stream: Stream; features: Element };
  /** A top-level stanza before bind; the bind module takes the bind request. */
  'stanza-before-bind': { stream: Stream & { user: string }; stanza: Element };
  /** Every stanza a bound client sends, before it is checked or routed (XEP-0198 counts here). */
  'stanza-in': {
    stream: BoundStream;
    stanza: Element;
    /** Handling it twice is harmless (router.ts `repeatable`: a ping, a typing notification). */
    repeatable: boolean;
  };
  /** A session has bound its resource. */
  'session-bound': { stream: BoundStream };
  /**
   * A session is about to become available (RFC 6121 §4.2, §4.4): a module that must bring it up
   * to date before live messages reach it (XEP-0160's flood) asks for a hold on its messages.
   */
  'availability-changing': { stream: BoundStream; priority: number; hold: boolean };
  /** A session's availability changed (RFC 6121 §4: initial, update or unavailable). */
  'availability-changed': {
    stream: BoundStream;
    stanza: Element;
    available: boolean;
    /** First available presence of the session. */
    initial: boolean;
    /** RFC 6121 §4.7.2.3: the session's priority now (0 when unavailable). */
    priority: number;
    /** The user's resources after the change (the sender's included). */
    resources: ResourceRecord[];
    /**
     * The hold asked for in `availability-changing` is on: what it counted when the change was
     * written (ResourceRecord.held; 0 when this change put it on).
     */
    held?: number;
  };
  /**
   * A session is ending: modules that keep state for it release it and hand back what was not
   * delivered. A hook that finds the session is no longer this caller's to end (resumed on
   * another connection, or already ended) returns HANDLED: nothing is released or announced.
   */
  'session-ending': {
    session: SessionRef;
    reason: SessionEndReason;
    undelivered: UndeliveredStanza[];
    /** Run once every undelivered stanza has been re-routed (a module drops what it kept for that). */
    afterReroute: (() => Promise<void>)[];
  };
  /** A session has ended; its resource row is gone. Fired exactly once per session. */
  'session-ended': { session: SessionRef; reason: SessionEndReason; wasAvailable: boolean };
  /**
   * A connection's socket is gone ($disconnect, or 410 Gone on a post). A module that keeps the
   * session alive without its socket (resumable stream management) returns HANDLED.
   */
  'connection-vanished': {
    connectionId: string;
    /** The connection's row, when the firer has it (hooks may load and set it). */
    state?: ConnectionState;
    /** The resource the failed post was for, when the connection row is already gone. */
    resource?: ResourceRecord;
    /**
     * The connection's own `$disconnect`: the queue has handed over every frame before it, so
     * nothing of the connection is still to run (a 410 or a probe can come before its last frames).
     */
    disconnected?: boolean;
  };
  /** A stream-management session was resumed on a new stream. */
  'session-resumed': {
    stream: BoundStream;
    resource?: ResourceRecord;
    /** The newest stored (offline) message the resume's replay sent again, if any. */
    offlineReplayedUpTo?: string;
    /**
     * The keys of the queue's entries (SmEntry.k: a frame's delivery key, or DeliveryOptions.key)
     * when the resume took it (`appended`: acknowledged by the resume's count or not) and after
     * its replay (`unacknowledged`), while the stream has a transfer in progress: what of a
     * transfer's window is out already (its entries are keyed by the transfer).
     */
    queuedKeys?: { appended: string[]; unacknowledged: string[] };
  };
  /**
   * The client acknowledged stanzas (XEP-0198) up to the session's outbound count `acked`;
   * `unacknowledged` are still outstanding.
   */
  'stanzas-acknowledged': {
    stream: BoundStream;
    acked: number;
    unacknowledged: number;
    /** As in `session-resumed` (the queue before this ack's trim), while a window is in progress. */
    queuedKeys?: { appended: string[]; unacknowledged: string[] };
  };
  /**
   * A message for a local user with no resource to take it (RFC 6121 §8.5.2.2.1): offline
   * storage takes it (HANDLED); without a taker the sender gets service-unavailable.
   */
  'message-offline': {
    stanza: Element;
    user: string;
    acceptedAt?: number;
    /**
     * Routing found a hold on this resource (ResourceRecord.held): the message is stored behind
     * what is already stored, under the condition that the hold is still on. A message not worth
     * storing is left to routing (not HANDLED), which posts it.
     */
    heldBy?: ResourceRecord;
    /** Routing found no available resource: stored under the condition that none became available. */
    noneAvailable?: boolean;
    /** Set by the taker when its condition no longer held: routing starts over. */
    routeAgain?: boolean;
  };
  /** A message was put on a recipient's session (posted, or queued by stream management). */
  'message-routed': { stanza: Element; to: ResourceRecord };
  /** A message was stored for an offline user (XEP-0160). */
  'message-stored-offline': { stanza: Element; user: string; id: string; storedAt: number };
  /**
   * The sweeper's periodic run: expire what has outlived its time. Fired with `fireEach`: each
   * hook is one phase, run in priority order whatever the others did (core/lifecycle.ts).
   */
  sweep: SweepRun;
  /**
   * A stream is being ended with a stream error (RFC 6120 §4.9): fired by the core for the
   * stream's own errors and for one it ends from outside (a `<conflict/>` kick). For observers
   * (metrics, logs); HANDLED changes nothing.
   */
  'stream-error': { connectionId: string; condition: string; user?: string };
  /**
   * A stream of a deleted account is ending (its row revoked by infra/account-deletion.ts, which
   * cannot post): at its next frame or its `$disconnect`, whichever comes first, and again if
   * that frame is redelivered; or a XEP-0198 session detached at the deletion, at its end.
   * Modules tell the account's contacts what the deletion changed for them (`revocation` says
   * whom); the session's resource row is gone already, so no `session-ended` follows. Fired
   * through core/lifecycle.ts `tellRevoked`: a hook's failure never stops the end.
   */
  'stream-revoked': {
    user: string;
    resource?: string;
    revocation: Revocation;
    /** RFC 6121 §4.6: the local JIDs the stream sent directed presence to. */
    directedTo?: string[];
  };
  /**
   * The outcome of one SASL attempt (RFC 6120 §6), fired by the SASL module: `success` with the
   * account, or the `<failure/>` condition sent. For observers; HANDLED changes nothing.
   */
  'auth-result': { stream: Stream; mechanism: string; success: boolean; condition?: string };
}

/**
 * One run of the sweeper, as its hooks see it. Each hook is a phase (or several, each through
 * `phase`); a phase works through its due items oldest first, each on its own: an item that fails
 * is reported with `failed` and the phase goes on past it (the next run tries it again). A phase
 * starts no new item once `hasTime()` is false: the rest waits for the next run.
 */
export interface SweepRun {
  /** The sweep's clock (ms): what is due by it is swept. */
  readonly now: number;
  /** Sessions the run ended (`SessionsExpired`). */
  swept: number;
  /** False once the invocation is short of time (checked before each item). */
  hasTime(): boolean;
  /**
   * Runs one phase: not at all when out of time; a failure of the whole phase (its Query) is
   * reported as `failed(name, error)` instead of ending the run.
   */
  phase(name: string, work: () => Promise<unknown>): Promise<undefined>;
  /** An item or a phase failed: logged at error and counted (`SweepFailures` by phase); the run goes on. */
  failed(phase: string, error: unknown, fields?: Record<string, unknown>): void;
}

export type EventName = keyof EventPayloads | StanzaEventName;
export type PayloadOf<E extends EventName> = E extends keyof EventPayloads ? EventPayloads[E] : StanzaEvent;
export type Hook<E extends EventName> = (payload: PayloadOf<E>) => Promise<HookResult> | HookResult;

/** Who an iq is addressed to: the server itself, or a user's account (its bare JID). */
export type IqTarget = 'server' | 'account';

export interface IqRequest {
  stream: BoundStream;
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
 * Returns the result's payload, nothing for an empty result, or DEFERRED_RESULT when it will
 * send the result itself. Throws StanzaError to refuse.
 */
export type IqHandler = (request: IqRequest) => Promise<Element | undefined | typeof DEFERRED_RESULT>;

export interface IqOptions {
  /** Default: both. */
  targets?: IqTarget[];
  /** The handler decides itself what to say about another user's account, existing or not. */
  answersForAnyAccount?: boolean;
  /**
   * Handling the iq twice is harmless: it answers twice, and what it records (a choice of the
   * stream's, like XEP-0013's flexible retrieval) comes out the same (ping, disco, software
   * version). A frame holding such an iq is not marked done (a write per keepalive), and its
   * XEP-0198 count is saved with the frame's state instead of before it is handled: SQS's rare
   * redelivery, or a resume in between, only brings the same answer again.
   */
  repeatable?: boolean;
}

/** A top-level element of a namespace that is not a stanza (SASL, XEP-0198). */
export type NonzaHandler = (stream: Stream, element: Element) => Promise<void>;

/** Options a delivery carries to the stanza queue of a session (XEP-0198). */
export interface DeliveryOptions {
  /** The offline message this stanza came from: removed from storage once acknowledged. */
  offlineId?: string;
  /** A copy of a message that stays stored (XEP-0013 view/fetch): never re-routed. */
  offlineCopy?: boolean;
  /**
   * A message to a bare JID that its routing gave to these other sessions before this one (RFC
   * 6121 §8.5.2.1.1: to each of the most available; a stream-management session's id, else the
   * connection's): kept with a queued copy, so that the copy's re-route, when this session ends
   * without the client acknowledging it, does not give it again to those of them still there
   * (they have it, or their own session's queue does).
   */
  alsoTo?: string[];
  /**
   * The entry's key in a stream-management queue, instead of the frame's delivery key: a XEP-0013
   * transfer's copy or result (`c:<transfer id>:<node>`, `c:<transfer id>`), which a redelivered
   * frame or a resume finds there by the transfer alone (see modules/xep-0160-offline-storage.ts).
   */
  key?: string;
  /**
   * The stream's own answer to its client (`Stream.send` of an iq, or of an error about the
   * client's own stanza). A stream-management queue takes it past its bound, within a margin;
   * one full even so ends the stream (policy-violation) rather than drop it unanswered.
   */
  answer?: boolean;
  /**
   * Another entity's answer to the recipient's request (an iq result or error routed to it, or an
   * error the server bounces to a stanza's local sender): taken past the count bound within a
   * margin of its own (REPLY_MARGIN, below the stream's own answers'), but not past the byte
   * bound, so a client slow to acknowledge a burst still gets the results it asked for and nobody
   * can use unasked results to fill another stream's queue. Past that it is refused as anything
   * else ('full'; the recipient's stream ends when it has been silent past
   * SM_ACK_TIMEOUT_SECONDS), never the sender's stream.
   */
  reply?: boolean;
  /**
   * Queued only while the session is attached to this connection (the sender's own): a transfer
   * of stored messages (XEP-0013 fetch or view, XEP-0160 flood) posted by a frame the client
   * does not count (its `<a/>`), which a resume elsewhere does not wait for. That resume takes
   * the transfer over from what the queue held when it attached; what the old frame would append
   * after is refused ('gone'), so that the client does not get it from both.
   */
  attachedTo?: string;
  /** Posted with the rest of its group, once the group's sends are queued (StanzaQueue.deliverTogether). */
  group?: DeliveryGroup;
}

/** One of the stanzas `Stream.sendAll` and `StanzaQueue.deliverMany` deliver, with its options. */
export interface DeliveryItem {
  stanza: Element;
  options: DeliveryOptions;
}

/** What `Stream.sendAll` did with one stanza. */
export type SendAllResult = DeliveryResult | StanzaError;

/**
 * Deliveries to a stream's own session that go out together (StanzaQueue.deliverTogether): what
 * it holds is the stanza queue's own business.
 */
export interface DeliveryGroup {
  readonly smId: string;
}

/**
 * A session whose stanzas are numbered and kept until acknowledged (XEP-0198). Provided by the
 * stream-management module; the core's delivery path hands it every stanza for such a session.
 * 'sent' means the queue took responsibility (posted or kept), 'gone' that the session no
 * longer exists and the caller must re-route.
 */
/**
 * What a delivery did: 'sent' (posted, or taken by a stream-management queue), 'gone' (no such
 * session any more: re-route), 'full' (the session's XEP-0198 queue is congested: the client is
 * slow to acknowledge; a sender is told to wait).
 */
export type DeliveryResult = Exclude<PostResult, 'unknown'> | 'full';

export interface StanzaQueue {
  deliver(smId: string, stanza: Element, options: DeliveryOptions): Promise<DeliveryResult>;
  /**
   * Whether an earlier delivery of the current frame (a redelivery) already gave the session its
   * next stanza from this frame: queued it, or queued it and had it acknowledged since. The
   * router then delivers it there again (which finds it) instead of storing a second copy.
   */
  queuedBefore(smId: string): Promise<boolean>;
  /**
   * Asks the client for an ack when some of what it was sent is unacknowledged: the outbound
   * count asked for, or undefined when nothing was asked.
   */
  requestAck(stream: BoundStream): Promise<number | undefined>;
  /**
   * Stored messages (DeliveryOptions.offlineId) were queued to the stream's own session: until
   * its queue holds none, an ack removes those it covers from storage before trimming them, so
   * that no failure or resume in between finds them stored and acknowledged (XEP-0160 with
   * XEP-0198).
   */
  queuedStored(stream: BoundStream): void;
  /**
   * Runs `send`, whose deliveries to the stream's own session carry `group` (DeliveryOptions), and
   * posts what they queued once it returns, in order: a window of stored messages (XEP-0160,
   * XEP-0013) is then one posting run for the queue, not one per message. `group` is undefined
   * when the stream has no session whose posts can be grouped; the deliveries then go out one by
   * one, as without it.
   */
  deliverTogether<T>(stream: BoundStream, send: (group: DeliveryGroup | undefined) => Promise<T>): Promise<T>;
  /**
   * Delivers stanzas to one session in order, stopping at the first that is not 'sent'; returns
   * the results of those tried. A group's stanzas (DeliveryOptions.group) are queued in one write
   * when they all fit: a window of stored messages billed once on the queue item, not once per
   * message.
   */
  deliverMany(smId: string, items: readonly DeliveryItem[]): Promise<DeliveryResult[]>;
  /**
   * Which of these sessions have a stream attached: the others are detached, waiting for a
   * resume, and are not "connected" resources (RFC 6120 §7.6.2.1's limit counts those).
   */
  attached(smIds: readonly string[]): Promise<Set<string>>;
}

/** Items modules offer each other through the host. */
export interface ItemKinds {
  /** A disco#info feature of the server (XEP-0030). */
  'disco-feature': string;
  /**
   * A disco#info feature of an account (a user's bare JID), shown to whoever may query it
   * (XEP-0030 §8): what the server answers for the account, like XEP-0199 ping.
   */
  'disco-account-feature': string;
  /** A disco node with its own info and items (e.g. XEP-0013's offline node). */
  'disco-node': {
    node: string;
    /** Harmless when handled twice: disco is `repeatable` (see IqOptions). */
    info(request: IqRequest): Promise<Element>;
    items(request: IqRequest): Promise<Element>;
  };
  /**
   * Whether `requester` (a bare JID) may have the server answer iqs addressed to `account`'s
   * bare JID on the account's behalf (RFC 6120 §10.3.3; XEP-0030 §8: only an entity "authorized
   * to receive presence from the target entity"). Any item granting is enough; without items
   * only the account's own resources may. The router asks it for another user's account only.
   */
  'account-access': (requester: string, account: string) => Promise<boolean>;
}

interface Registration {
  handler: Hook<EventName>;
  priority: number;
  order: number;
}

export class Host {
  private readonly hooks = new Map<string, Registration[]>();
  private readonly iqHandlers = new Map<string, IqHandler>();
  private readonly anyAccount = new Set<IqHandler>();
  private readonly repeatable = new Set<IqHandler>();
  private readonly nonzas = new Map<string, NonzaHandler>();
  private readonly lists = new Map<keyof ItemKinds, unknown[]>();
  private registrations = 0;
  private queue?: StanzaQueue;

  hook<E extends EventName>(name: E, handler: Hook<E>, options: { priority?: number } = {}): void {
    const list = this.hooks.get(name) ?? [];
    list.push({
      handler: handler as Hook<EventName>,
      priority: options.priority ?? 0,
      order: this.registrations++,
    });
    list.sort((a, b) => b.priority - a.priority || a.order - b.order);
    this.hooks.set(name, list);
  }

  /** Runs the hooks of `name` in priority order; true when one of them returned HANDLED. */
  async fire<E extends EventName>(name: E, payload: PayloadOf<E>): Promise<boolean> {
    const list = this.hooks.get(name);
    if (!list) return false;
    for (const { handler } of list) {
      if ((await handler(payload)) === HANDLED) return true;
    }
    return false;
  }

  /**
   * Runs every hook of `name` in priority order, each on its own: one that throws is handed to
   * `onError` and the next runs; HANDLED stops nothing. For an event whose hooks are independent
   * tasks (the sweeper's phases), where one failing must not cost the others their turn.
   */
  async fireEach<E extends EventName>(
    name: E,
    payload: PayloadOf<E>,
    onError: (error: unknown) => void,
  ): Promise<void> {
    for (const { handler } of this.hooks.get(name) ?? []) {
      try {
        await handler(payload);
      } catch (error) {
        onError(error);
      }
    }
  }

  hasHooks(name: EventName): boolean {
    return (this.hooks.get(name)?.length ?? 0) > 0;
  }

  iq(type: 'get' | 'set', ns: string, name: string, handler: IqHandler, options: IqOptions = {}): void {
    for (const target of options.targets ?? ['server', 'account']) {
      const key = iqKey(target, type, ns, name);
      if (this.iqHandlers.has(key)) throw new Error(`two handlers for iq ${key}`);
      this.iqHandlers.set(key, handler);
    }
    if (options.answersForAnyAccount) this.anyAccount.add(handler);
    if (options.repeatable) this.repeatable.add(handler);
  }

  /** Whether handling the iq twice only answers it twice (IqOptions.repeatable). */
  isRepeatable(handler: IqHandler): boolean {
    return this.repeatable.has(handler);
  }

  iqHandler(target: IqTarget, type: string, payload: Element): IqHandler | undefined {
    return this.iqHandlers.get(iqKey(target, type, payload.attrs.xmlns ?? '', payload.name));
  }

  /** False when the handler itself decides what to say about another user's account. */
  needsAccount(handler: IqHandler): boolean {
    return !this.anyAccount.has(handler);
  }

  nonza(ns: string, handler: NonzaHandler): void {
    if (this.nonzas.has(ns)) throw new Error(`two handlers for nonzas of ${ns}`);
    this.nonzas.set(ns, handler);
  }

  nonzaHandler(ns: string | undefined): NonzaHandler | undefined {
    return ns === undefined ? undefined : this.nonzas.get(ns);
  }

  add<K extends keyof ItemKinds>(kind: K, item: ItemKinds[K]): void {
    const list = this.lists.get(kind) ?? [];
    list.push(item);
    this.lists.set(kind, list);
  }

  items<K extends keyof ItemKinds>(kind: K): readonly ItemKinds[K][] {
    return (this.lists.get(kind) ?? []) as ItemKinds[K][];
  }

  /** The stream-management module provides the queue that sessions with an `smId` deliver through. */
  provideStanzaQueue(queue: StanzaQueue): void {
    if (this.queue) throw new Error('a stanza queue is already provided');
    this.queue = queue;
  }

  get stanzaQueue(): StanzaQueue | undefined {
    return this.queue;
  }
}

function iqKey(target: IqTarget, type: string, ns: string, name: string): string {
  return `${target} ${type} ${ns} ${name}`;
}
