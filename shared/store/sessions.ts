/**
 * Sessions table: one item per WebSocket connection (the stream's state between frames, since
 * every frame may run in another Lambda) and one item per bound resource (what routing reads).
 *
 *   pk = conn#<connectionId>  sk = conn            → ConnectionState
 *   pk = user#<bare JID>      sk = res#<resource>  → ResourceRecord
 *   pk = user#<bare JID>      sk = avail           → { res: string set of available resources }
 *
 * Routing to a bare JID is one strongly consistent Query on `user#<bare>`. The `avail` item
 * names the user's available resources, so the resources of many users (a roster's contacts)
 * are read with BatchGetItem, 100 keys a request, instead of one Query per user: first the
 * `avail` items, then the resource rows they name (`availableResourcesOf`).
 */
import { randomBytes } from 'node:crypto';
import type { AttributeValue } from '@aws-sdk/client-dynamodb';
import {
  DeleteCommand,
  type DynamoDBDocumentClient,
  GetCommand,
  PutCommand,
  QueryCommand,
  ScanCommand,
  type TransactWriteCommand,
  UpdateCommand,
} from '@aws-sdk/lib-dynamodb';
import { unmarshall } from '@aws-sdk/util-dynamodb';
import { TTL_ATTRIBUTE } from '../tables.ts';
import { adminOnly, batchGetAll, isConditionFailure } from './dynamo.ts';

/** Tries of a bind whose takeover found the row changed since it was told of it. */
const BIND_ATTEMPTS = 4;

/**
 * The sweep index's kind of entry for sessions detached from their socket, awaiting resumption
 * (spread over partition key values `detached#0`… by sweepShardOf, store/sm-queue.ts).
 */
export const DETACHED_SHARD = 'detached';
/**
 * The kind for sessions attached to a socket, due for a probe at `sweepAt` (a lost `$disconnect`
 * would otherwise leave them attached to a dead socket until their TTL); sharded alike.
 */
export const ATTACHED_SHARD = 'attached';

export interface SaslProgress {
  mechanism: string;
  /** The mechanism's state between challenge and response (JSON-serialisable). */
  state: Record<string, unknown>;
  /** The bare JID being authenticated (for the per-account failure count). */
  jid?: string;
  /** What the password-guessing limits read at the first step, for the last one. */
  gate?: { authFailures: number; knownAddresses: Record<string, number> };
  /** The account's creation time as read at the first step (`ConnectionState.accountCreatedAt`). */
  createdAt?: number;
  /** The challenge may have gone out twice (its `<auth/>` frame was handled again). */
  repeated?: boolean;
}

/** XEP-0198 state of a stream, saved with the connection after every frame. */
export interface SmState {
  version: 'sm3' | 'sm1';
  /** Key of the session's queue item; sent to the client as `id` only when resumable. */
  id: string;
  /** sm:3: stanzas handled from the client (unwrapped); sm:1: the last `u` received. */
  inbound: number;
  /** Stanzas the client has acknowledged (unwrapped): the queue's base. */
  acked: number;
  resumable: boolean;
  /** Resumption window in seconds. */
  max: number;
  /**
   * Set while `<enabled/>` waits out a late switch to the queue (ms: until when): a redelivery
   * of the `<enable/>` frame goes on waiting, then answers.
   */
  enabledAt?: number;
  /**
   * An ack fell short of a late post's bound (SmQueueItem entries' `b`) and the client was asked
   * again: the bound it waited for. A second ack short of it makes the client resume.
   */
  askedFor?: number;
  /**
   * Set by a resume that went ahead while the old stream (`connectionId`) had not routed a stanza
   * it counted: this stream's own stanzas wait for it, until `until` (ms; SM_RESUME_ORDER_MS).
   */
  after?: { connectionId: string; until: number };
  /**
   * The queue may hold stored messages this stream was sent (SmEntry.o; StanzaQueue.queuedStored):
   * an ack reads the queue and removes those it covers from storage before trimming them.
   */
  stored?: true;
}

/**
 * An offline transfer paced by stream-management acks (a flood, or a XEP-0013 fetch or view): the
 * next batch goes out when the client has acknowledged enough of the last one.
 */
export interface OfflineTransfer {
  kind: 'flood' | 'fetch' | 'view';
  /** The last stored message sent. */
  after?: string;
  /** For a view: the stored messages (their nodes) still to send, in the request's order. */
  nodes?: string[];
  /** For a fetch or a view: the iq to answer once every message is out. */
  iqId?: string;
  iqFrom?: string;
  /** A flood holding the session's messages: the hold's count when the flood last looked. */
  held?: number;
  /** Going through the inbox from its start, skipping what the session's queue holds. */
  restart?: boolean;
  /** The session's outbound count the last `<r/>` after a window asked the client to acknowledge. */
  askedUpTo?: number;
  /** Fetches and views asked for while this one was in progress, served in turn after it. */
  waiting?: OfflineTransfer[];
  /**
   * A XEP-0013 fetch's or view's own id (the request id of the frame that asked for it): its
   * copies are queued under `c:<id>:<node>`, its result under `c:<id>`, so that a redelivered
   * frame or a resume finds them queued and sends none of them twice.
   */
  id?: string;
  /**
   * The window being posted, saved before its first post (write-ahead, with `after` or `nodes`
   * already past it): the nodes of the copies, `[]` for the result alone. Removed by the frame's
   * save after the posts; found by a later frame (a redelivery) or a resume, the window is
   * finished first, skipping what the session's queue holds or held.
   */
  window?: string[];
}

/**
 * Largest offline transfer (serialised) a stream-management session keeps on its queue item at a
 * detach, for the resume to go on with: every append is billed on the item's size.
 */
export const MAX_CARRIED_TRANSFER_BYTES = 16 * 1024;

/**
 * Largest a transfer may grow by the requests it serves (views' nodes, those waiting): the rest
 * of MAX_CARRIED_TRANSFER_BYTES is for the window being posted (up to 50 node ids). A request
 * that would pass it is refused, so that every transfer can be carried across a resume.
 */
export const MAX_REQUESTED_TRANSFER_BYTES = MAX_CARRIED_TRANSFER_BYTES - 4 * 1024;

/**
 * What account deletion leaves on each open stream's connection row (revokeConnection): the
 * stream ends at its next frame or `$disconnect`, and then tells the account's contacts what
 * the deletion changed for them (the deleting command cannot post). Bounded by
 * REVOCATION_MAX_CONTACTS.
 */
export interface Revocation {
  /** The stream's resource was available: the contacts (bare JIDs) that had its presence. */
  presenceTo?: string[];
  /**
   * On one of the account's rows: the local contacts whose roster the deletion changed, each
   * with the subscription stanzas (RFC 6121 §2.5.2's `unsubscribe`, `unsubscribed`) delivered
   * to it.
   */
  notify?: { contact: string; deliver: string[] }[];
  /**
   * On a XEP-0198 session item: its stream's connection row carries the revocation (the stream
   * tells); without it, the session was detached at the deletion and its end tells.
   */
  viaStream?: boolean;
}

/** Contacts a revocation names at most, each list. */
export const REVOCATION_MAX_CONTACTS = 1000;

/**
 * The bytes each list of a revocation takes at most (UTF-8, with DynamoDB's overhead per entry
 * counted generously): both lists together stay under 100 KB, so a XEP-0198 session item that
 * carries them beside a full queue (SM_QUEUE_MAX_BYTES, at most 240 KB) and its transfer (16 KB)
 * stays under DynamoDB's 400 KB.
 */
export const REVOCATION_MAX_BYTES = 48_000;

/** A revocation within REVOCATION_MAX_CONTACTS and REVOCATION_MAX_BYTES per list (the first ones kept). */
export function boundedRevocation(revocation: Revocation): Revocation {
  const within = <T>(list: readonly T[], size: (item: T) => number): T[] => {
    const kept: T[] = [];
    let bytes = 0;
    for (const item of list) {
      bytes += size(item);
      if (kept.length >= REVOCATION_MAX_CONTACTS || bytes > REVOCATION_MAX_BYTES) break;
      kept.push(item);
    }
    return kept;
  };
  return {
    ...(revocation.presenceTo
      ? { presenceTo: within(revocation.presenceTo, (jid) => Buffer.byteLength(jid) + 4) }
      : {}),
    ...(revocation.notify
      ? { notify: within(revocation.notify, (n) => Buffer.byteLength(n.contact) + 48) }
      : {}),
    ...(revocation.viaStream ? { viaStream: true } : {}),
  };
}

/** The connection was fenced by a stream-management resume on another connection (or ended). */
export class ConnectionFencedError extends Error {
  constructor(readonly connectionId: string) {
    super(`connection ${connectionId} was fenced`);
    this.name = 'ConnectionFencedError';
  }
}

/** A bind's takeover found the resource row changed each time it tried: tried again later. */
export class ResourceBusyError extends Error {
  constructor(
    readonly user: string,
    readonly resource: string,
  ) {
    super(`resource ${user}/${resource} kept changing while it was taken over`);
    this.name = 'ResourceBusyError';
  }
}

/** The resource row belongs to another connection now (a new bind took it over). */
export class ResourceTakenError extends Error {
  constructor(
    readonly user: string,
    readonly resource: string,
  ) {
    super(`resource ${user}/${resource} is bound by another connection`);
    this.name = 'ResourceTakenError';
  }
}

/** A per-connection token bucket (core/rate-limit.ts), kept only while the connection is busy. */
export interface RateBucket {
  frames: number;
  bytes: number;
  /** Arrival time (epoch ms) of the last frame charged. */
  at: number;
}

/**
 * XEP-0136 per-stream state: automatic archiving (§7.1, off for every new stream), the public
 * keys it encrypts for (§7.2), and whether the stream asked for preferences (0.9 `<pref/>`, 0.5
 * `<save/>`, `<otr/>`), which makes it receive their pushes. Kept on the connection (the stream's
 * own frames) and on the resource row (what routing and pushes read for other streams).
 */
export interface ArchiveStreamState {
  auto?: boolean;
  /** RSA public keys from `<auto encrypt='true'>`: base64 modulus and exponent, by KeyName. */
  encryptKeys?: { name: string; modulus: string; exponent: string }[];
  pref?: boolean;
  save?: boolean;
  otr?: boolean;
}

export interface ConnectionState {
  connectionId: string;
  connectedAt: number;
  /** The client's source address at `$connect` (password-guessing limits count per address). */
  sourceIp?: string;
  /** Set once `<open/>` was answered on the current stream (reset by a SASL success). */
  streamOpen: boolean;
  /**
   * RFC 6120 §4.7.4: the `xml:lang` of the client's `<open/>`, when it is not the server's own
   * (`en`): added to the client's stanzas that carry none as they are routed.
   */
  lang?: string;
  /**
   * XEP-0136 §8.3: the frame whose `<remove/>` removed collections and was handed back to go on
   * (too little of its invocation was left): its next attempt answers a result even if it
   * finds nothing left.
   */
  archiveRemoving?: string;
  /**
   * XEP-0013 §2.4: the frame whose remove request found its nodes and began removing them: its
   * redelivery removes what is left and answers a result, though some nodes are gone now.
   */
  offlineRemoving?: string;
  streamId?: string;
  /** Authenticated bare JID: the only identity (docs/design.md "Identity and trust"). */
  user?: string;
  /**
   * When the stream authenticated (epoch ms), and the creation time of the account it
   * authenticated as: a bind long after (rfc6120-bind.ts) checks that the account is still that
   * one, since an account deletion finds only bound streams to revoke.
   */
  authenticatedAt?: number;
  accountCreatedAt?: number;
  resource?: string;
  sasl?: SaslProgress;
  authFailures: number;
  /** XEP-0013: the session asked for the count, headers or a fetch, so it is never flooded. */
  flexibleOffline?: boolean;
  sm?: SmState;
  transfer?: OfflineTransfer;
  /** The session has had its offline messages flooded (XEP-0160: at the first non-negative presence). */
  flooded?: boolean;
  /** RFC 6121 §4.6: local JIDs this session sent directed presence to; told when it goes away. */
  directedTo?: string[];
  /** The rate limits' buckets while the connection is busy (absent: calm). */
  rate?: RateBucket;
  /** XEP-0198: a resume on another connection took this stream's session over (see fenceConnection). */
  fenced?: boolean;
  /**
   * The stream's account was deleted while it was open (revokeConnection): its next frame ends it
   * with a stream error instead of being handled, and whom to tell is here.
   */
  revoked?: Revocation;
  /**
   * The connection's own frame ended its stream (`</close>`, a stream error): the frames its
   * client sent before the socket closed are not a new stream's, they are dropped, and the row
   * expires (core/lifecycle.ts, `ownEnd`).
   */
  ended?: boolean;
  /** XEP-0198: the queue message id of the last frame whose stanza was counted (a redelivery is not counted twice). */
  countedFrame?: string;
  /**
   * XEP-0198: the SQS sequence number of the last frame whose stanza was counted: a redelivery of
   * it or of an earlier frame (a timed-out batch comes back whole) is not counted again.
   */
  countedSeq?: string;
  /** XEP-0198: the frame that enabled or resumed this stream's session (saved before the answer went out). */
  smFrame?: string;
  /**
   * A frame whose answer a redelivery must repeat rather than decide again (XmppStream.answerOnce:
   * a refusal whose cause may be gone by then), and that answer, serialised.
   */
  answeredFrame?: string;
  answer?: string;
  /**
   * XEP-0198: the session a `<resume/>` on this stream is taking over, until the stream has saved
   * it: a socket that vanishes meanwhile ends that session (it was attached to this connection,
   * holding, and nothing else would let go of it).
   */
  resuming?: string;
  /** RFC 6120 §7.7.2.2: the session this stream's bind took the resource from, until it has ended. */
  replacing?: ResourceRecord;
  /** The id of the last frame whose state changes were saved (a redelivery of it is skipped). */
  savedFrame?: string;
  /**
   * The SQS sequence number of the last frame handled to the end (its sends, queue appends and
   * stores done): a redelivery of it or of any earlier frame of the connection is skipped.
   */
  doneSeq?: string;
  /**
   * The last message this stream's sender stored offline, written by the storing transaction
   * (core/frame.ts offlineRecord): a redelivery of that frame does not route the message again.
   */
  storedOffline?: string;
  /**
   * The frame whose roster change (RFC 6121 roster set, remove, subscription) was written with its
   * outcome (`rosterApplied`, JSON: the contact and the store's result), in the change's own
   * transaction: a redelivery of that frame does the rest from it instead of deciding again.
   */
  rosterFrame?: string;
  rosterApplied?: string;
  /** RFC 6121 §2.1.6: the session requested the roster (its resource row is marked for pushes). */
  rosterInterested?: boolean;
  archive?: ArchiveStreamState;
}

/**
 * RFC 6121 §4.3.2: the last unavailable presence the server received from a user (or made for
 * it when a session ended without one), kept on the user's `avail` item by the write that takes
 * the resource out of its set, and read with it: no request of its own.
 */
export interface LastUnavailable {
  /** Epoch ms: when the server received it (XEP-0203's stamp in a probe's answer). */
  at: number;
  /** Its children (status, show, priority, extensions) serialised in a `<presence/>`; '' for none. */
  presence: string;
}

/** What `presenceOf` reads: the users' available resources and their last unavailable presence. */
export interface UsersPresence {
  /** Users without an available resource are absent. */
  online: Map<string, ResourceRecord[]>;
  /** Users for whom one is kept (whether or not they have an available resource now). */
  lastUnavailable: Map<string, LastUnavailable>;
}

/**
 * How long a user's last unavailable presence is kept after it (the `avail` item's TTL, renewed
 * by every unavailable presence): a contact's probe learns when the user was last seen.
 */
export const LAST_UNAVAILABLE_KEEP_SECONDS = 30 * 24 * 3600;

/** A last unavailable presence larger than this is kept without its children. */
export const LAST_UNAVAILABLE_MAX_CHARS = 1024;

export interface ResourceRecord {
  user: string;
  resource: string;
  connectionId: string;
  available: boolean;
  priority: number;
  /** The last broadcast presence stanza, serialised. */
  presence?: string;
  boundAt: number;
  /**
   * When the bound stream's connection opened (ms): a bind from an older connection does not
   * take the row from a newer one (`bindResource`). A connection's frames may be handled late
   * (a bind retried through a storm, after its client had given up and connected anew).
   */
  connectedAt?: number;
  flexibleOffline?: boolean;
  /**
   * XEP-0013 §2.2: the session's flood was skipped while another resource retrieved flexibly,
   * for its whole availability; a resume keeps that (the stream's `flooded` is on its old
   * connection). Cleared when the session goes unavailable or negative.
   */
  floodSkipped?: boolean;
  /** Set when the session has stream management: deliveries go through its queue. */
  smId?: string;
  /**
   * The frame whose presence made the resource available (until it is unavailable again): its
   * redelivery, finding the resource available already, is still the initial presence.
   */
  availableFrame?: string;
  /**
   * The frame whose presence made the resource unavailable (until it is available again): its
   * redelivery, finding the resource unavailable already, still owes the broadcast.
   */
  unavailableFrame?: string;
  /** RFC 6121 §2.1.6: the session requested the roster, so it gets roster pushes. */
  rosterInterested?: boolean;
  /**
   * A roster push to this session was refused (its stream-management queue congested): the
   * `ver` its later pushes carry instead of the roster's (RFC 6121 §2.6: opaque), one no roster
   * ever has, so that the client's cache, missing that push, is not taken as current at its next
   * versioned roster get (which then answers with the whole roster).
   */
  rosterStale?: string;
  archive?: ArchiveStreamState;
  /**
   * A hold on the session's messages while it is brought up to date (XEP-0160's flood): set,
   * routing stores its messages behind what is already stored instead of posting them ahead of
   * it, and counts each one here; the holder releases it once nothing came in behind since it
   * last looked (`releaseHold`).
   */
  held?: number;
  /**
   * Until when the hold stands (ms): the flood renews it as it goes (HOLD_LEASE_MS), so a flood
   * whose frame died does not hold the session's messages for the rest of the session.
   */
  heldUntil?: number;
  /**
   * The stream may still switch its deliveries to a stream-management queue (XEP-0198
   * `<enable/>`) exactly: from bind until `mayQueueUntil` (set by its first presence, a grace
   * after it) or its enable. Meanwhile a direct post to it is recorded in `posts` while in
   * flight (`beginDirectPost`/`endDirectPost`), and the switch (`switchToQueue`) waits until none
   * is: no stanza the server did not number can reach the client after `<enabled/>`.
   */
  mayQueue?: boolean;
  /** The end of that window (ms), once the stream has sent presence. */
  mayQueueUntil?: number;
  /** When the resource switched to its queue after that window (ms; see `switchToQueueLate`). */
  lateSince?: number;
  /**
   * When this copy of the row was read (ms, taken before the request went out; not stored): a
   * direct post must start within a bound of it (see core/delivery.ts), or read the row again.
   */
  readAt?: number;
  /**
   * Direct posts in flight while `mayQueue` (see there), one token each: a string set, so that
   * the SDK's resend of a begin or an end (a 500 after the write) changes nothing more. A count
   * (`posting`, before session 19) went down twice on a resent end, and a switch could pass a
   * post still in flight.
   */
  posts?: string[];
  /** Until when those posts count (ms): one whose frame died stops counting then. */
  postingUntil?: number;
}

/**
 * How long a direct post counts as in flight for `switchToQueue`: longer than a post with its
 * retries takes (three attempts, well under a second apart).
 */
export const DIRECT_POST_LEASE_MS = 10_000;

/** How far apart the functions' clocks may be, for the window of counted posts. */
const CLOCK_MARGIN_MS = 100;

/**
 * How long after a stream's first presence its direct posts are still counted (mayQueue): xmpp.js
 * sends presence before its `<enable/>`, and the presence frame (an offline flood, a redelivery)
 * may hold the enable back for seconds.
 */
export const MAY_QUEUE_AFTER_PRESENCE_MS = 5_000;

/** What `switchToQueue` found. */
export type QueueSwitch =
  /** The resource's deliveries go to the queue from now on. */
  | {
      kind: 'switched';
      /**
       * The queue the row names now: an earlier attempt of this `<enable/>` (a redelivery whose
       * first attempt switched but did not save its session) keeps its own, which may hold
       * stanzas already; the caller then drops the queue it has just made.
       */
      smId: string;
      /**
       * When the switch may have let a post by an uncounted read through (ms): it was late (an
       * earlier attempt's), or the write landed past the window. `<enabled/>` waits until
       * DIRECT_POST_BOUND_MS after it.
       */
      lateSince?: number;
    }
  /** Direct posts to it are in flight, counting until `until` (ms): try again after them. */
  | { kind: 'posting'; until: number }
  /**
   * The window of counted posts is over (`<enable/>` came well after presence): switch with
   * `switchToQueueLate` and wait out the bound on uncounted direct posts.
   */
  | { kind: 'late' };

/** How long a hold stands unless its flood renews it: routing posts again past it. */
export const HOLD_LEASE_MS = 60_000;

/** Whether routing finds the resource's messages held (a flood running, its lease not run out). */
export function isHeld(resource: ResourceRecord, now = Date.now()): boolean {
  return resource.held !== undefined && (resource.heldUntil ?? 0) > now;
}

/** One item of a DynamoDB transaction, for a store to add to another store's write. */
export type TransactItem = NonNullable<
  ConstructorParameters<typeof TransactWriteCommand>[0]['TransactItems']
>[number];

const connKey = (connectionId: string) => ({ pk: `conn#${connectionId}`, sk: 'conn' });
const resourceKey = (user: string, resource: string) => ({ pk: `user#${user}`, sk: `res#${resource}` });
const availKey = (user: string) => ({ pk: `user#${user}`, sk: 'avail' });

/**
 * The longest resource bind accepts (RFC 7622 allows 1023 bytes). A full JID is part of
 * DynamoDB sort keys of 1024 bytes (a resource row's, XEP-0136's collections with a contact):
 * with a localpart of at most MAX_LOCALPART_BYTES and a DNS domain it always fits.
 */
export const MAX_RESOURCE_BYTES = 256;

/** The longest localpart the user CLI creates an account with (see MAX_RESOURCE_BYTES). */
export const MAX_LOCALPART_BYTES = 256;

/**
 * DynamoDB sort keys hold at most 1024 bytes: a resource row's key fits a resource of 1020
 * bytes; names longer than that (never bound) are skipped where rows are listed by name.
 */
export function fitsResourceKey(resource: string): boolean {
  return Buffer.byteLength(`res#${resource}`, 'utf8') <= 1024;
}

type Mutable = Omit<ConnectionState, 'connectionId' | 'connectedAt' | 'sourceIp'>;

/** What a connection's row starts with, from API Gateway (`$context.connectedAt`, `identity.sourceIp`). */
export interface NewConnection {
  connectedAt: number;
  sourceIp?: string;
}

export interface SessionStore {
  /** `sourceIp`: the client's address as API Gateway saw it (`identity.sourceIp`). */
  createConnection(connectionId: string, connectedAt: number, sourceIp?: string): Promise<void>;
  getConnection(connectionId: string): Promise<ConnectionState | undefined>;
  /**
   * Sets the given fields; `undefined` values are removed. With `unlessFenced`, throws
   * ConnectionFencedError when a resume fenced the row (or the row is gone) instead. With
   * `create`, the row is written whether or not it exists (a stream's first save: `$connect`
   * writes none), with the connection's time and address; otherwise a row that is gone (the
   * connection ended) is not written again. With `returnRow`, returns the row as the write left
   * it (the write's own result: no read); otherwise, and when nothing was written, undefined.
   */
  updateConnection(
    connectionId: string,
    changes: Partial<Mutable>,
    options?: { unlessFenced?: boolean; create?: NewConnection; returnRow?: boolean },
  ): Promise<ConnectionState | undefined>;
  /**
   * XEP-0198 resume: marks a connection's row so that no further `unlessFenced` write (a stanza
   * being counted) succeeds, and returns the row as it is then; undefined when it is gone.
   */
  fenceConnection(connectionId: string): Promise<ConnectionState | undefined>;
  /**
   * Account deletion: marks an open connection's row so that its stream handles no further frame
   * (its next one ends it); false when the row is gone (the connection ended).
   */
  revokeConnection(connectionId: string, revocation?: Revocation): Promise<boolean>;
  deleteConnection(connectionId: string): Promise<void>;
  listResources(user: string): Promise<ResourceRecord[]>;
  /**
   * The resources of `user` other than `resource` bound by connections other than
   * `connectionId`, with their stream-management session if any (RFC 6120 §7.6.2.1's limit; a
   * row past its TTL is a safety net's leftover and is left out), and whether a row of
   * `connectionId` is there (`own`: an earlier attempt of its bind wrote it). One Query of the
   * keys, owners and sessions only.
   */
  otherResources(
    user: string,
    resource: string,
    connectionId: string,
  ): Promise<{ others: { resource: string; smId?: string }[]; own: boolean }>;
  getResource(user: string, resource: string): Promise<ResourceRecord | undefined>;
  /**
   * Binds (or takes over) a resource; returns the record it replaced. ResourceTakenError when
   * the row is a newer connection's (`connectedAt`). A row of another connection is taken only
   * after `beforeTakeover` was told of it (and returned), and only as it was then: the binder
   * records what it displaces before the write that displaces it, so that a redelivery of its
   * frame, finding the row its own already, still knows which session to end.
   */
  bindResource(
    record: ResourceRecord,
    beforeTakeover?: (held: ResourceRecord) => Promise<void>,
  ): Promise<ResourceRecord | undefined>;
  /**
   * A stream-management resume binds its session's resource again: only while the row is that
   * session's (`record.smId`) or gone. A newer bind of the resource took it over (and ends that
   * session): ResourceTakenError, the newer stream keeps its row. Returns the row it replaced.
   */
  rebindResumed(record: ResourceRecord & { smId: string }): Promise<ResourceRecord | undefined>;
  /** Updates availability if the resource still belongs to `connectionId`; returns the old record. */
  updatePresence(
    user: string,
    resource: string,
    connectionId: string,
    changes: Pick<ResourceRecord, 'available' | 'priority' | 'presence'> & {
      /** Puts a hold on the resource's messages (see ResourceRecord.held), unless one is on. */
      hold?: boolean;
      /**
       * The frame of the presence: recorded as `availableFrame` by the one that makes it
       * available, as `unavailableFrame` by the one that makes it unavailable.
       */
      frame?: string;
      /**
       * An unavailable presence's children, serialised (`lastUnavailableOf`): kept for RFC 6121
       * §4.3.2's answer to a probe once the user has no available resource.
       */
      unavailable?: string;
      /** When the unavailable presence reached the server (epoch ms; its frame's time): now without. */
      unavailableAt?: number;
    },
  ): Promise<ResourceRecord | undefined>;
  /**
   * The condition of a message stored behind a hold, as an item of the storing transaction: the
   * hold is still on the resource of `connectionId`, and counts the message.
   */
  holdGuard(user: string, resource: string, connectionId: string): TransactItem;
  /**
   * The condition of a message stored because the user had no available resource, as an item
   * of the storing transaction: none has become available since (its flood may have begun).
   */
  noneAvailableGuard(user: string): TransactItem;
  /**
   * The record of a message stored offline from a frame of `connectionId`, as an item of the
   * storing transaction (core/frame.ts offlineRecord). Its condition fails when the connection's
   * row is gone (nothing to redeliver to then).
   */
  storedOfflineRecord(connectionId: string, record: string): TransactItem;
  /**
   * The same record written alone, by the re-route of an ended session's entry that `frameId`
   * queued (core/frame.ts offlineRecord): unless that frame was saved as done (`savedFrame`), the
   * row holds another frame's record, or is gone. False when not written.
   */
  recordRerouted(connectionId: string, frameId: string, user: string): Promise<boolean>;
  /** A roster change's outcome on the connection's row, as an item of the change's transaction. */
  rosterAppliedRecord(connectionId: string, frame: string, applied: string): TransactItem;
  /**
   * Releases the hold if nothing was stored behind it since the holder saw it at `seen` (or
   * whatever it counts, without `seen`). Returns the count now when something was (the holder
   * goes through the stored messages again); undefined when released or when the resource is
   * no longer this connection's.
   */
  releaseHold(
    user: string,
    resource: string,
    connectionId: string,
    seen?: number,
  ): Promise<number | undefined>;
  /** The flood is still going: its hold stands for another HOLD_LEASE_MS. */
  renewHold(user: string, resource: string, connectionId: string): Promise<void>;
  markFlexibleOffline(user: string, resource: string, connectionId: string): Promise<void>;
  /** XEP-0013 §2.2: the session's flood was skipped (ResourceRecord.floodSkipped). */
  markFloodSkipped(user: string, resource: string, connectionId: string): Promise<void>;
  /** RFC 6121 §2.1.6: the resource requested the roster and gets pushes from now on. */
  markRosterInterested(user: string, resource: string, connectionId: string): Promise<void>;
  /**
   * A roster push to the resource's stream-management session `smId` was refused
   * (ResourceRecord.rosterStale); the first mark stays. Keyed by the session, not the connection:
   * a resume moves the row to another connection and keeps the mark (`rebindResumed`).
   */
  markRosterStale(user: string, resource: string, smId: string, ver: string): Promise<void>;
  /**
   * The available resources of many users (a roster's contacts): BatchGetItem on their `avail`
   * items, then on the resource rows those name, strongly consistent, 100 keys a request with
   * a bounded number in flight. Users without an available resource are absent from the map.
   */
  availableResourcesOf(users: readonly string[]): Promise<Map<string, ResourceRecord[]>>;
  /**
   * `availableResourcesOf` with, from the same reads, each user's last unavailable presence
   * (`LastUnavailable`) where one is kept.
   */
  presenceOf(users: readonly string[]): Promise<UsersPresence>;
  /** Account deletion: the user's `LastUnavailable` goes. */
  forgetLastUnavailable(user: string): Promise<void>;
  /** XEP-0136: the stream's archiving state, if the resource still belongs to `connectionId`. */
  setResourceArchive(
    user: string,
    resource: string,
    connectionId: string,
    archive: ArchiveStreamState,
  ): Promise<void>;
  /**
   * Routes the resource's deliveries through the SM queue `smId`, if its stream still may
   * (`mayQueue`, or a queue of this very connection set before: a redelivered `<enable/>`) and no
   * direct post to it is in flight. ResourceTakenError when the row is another connection's.
   */
  switchToQueue(user: string, resource: string, connectionId: string, smId: string): Promise<QueueSwitch>;
  /**
   * The switch once the window is over: unconditional but for the owner (ResourceTakenError).
   * Returns when it was made (kept as `lateSince` on the row for a redelivered `<enable/>`).
   */
  switchToQueueLate(
    user: string,
    resource: string,
    connectionId: string,
    smId: string,
  ): Promise<{ smId: string; lateSince: number }>;
  /**
   * Records a direct post to a resource that may still switch to a queue, and returns its token;
   * undefined when it may not (it switched, its window is over, or the row is another
   * connection's): read it again.
   */
  beginDirectPost(user: string, resource: string, connectionId: string): Promise<string | undefined>;
  /** The post `beginDirectPost` recorded as `token` is done (answered, or given up on). */
  endDirectPost(user: string, resource: string, connectionId: string, token: string): Promise<void>;
  /** Removes the resource if it still belongs to SM session `smId`; returns it, or undefined. */
  releaseSmResource(user: string, resource: string, smId: string): Promise<ResourceRecord | undefined>;
  /** Removes the resource if it still belongs to `connectionId`; returns it, or undefined. */
  releaseResource(user: string, resource: string, connectionId: string): Promise<ResourceRecord | undefined>;
  /** Every bound resource of every user, by JID. Administration only: a full Scan (see below). */
  listAllResources(): Promise<ResourceRecord[]>;
}

/** Tries of `endDirectPost` (50, 100, 200 … ms apart): its DELETE may be repeated harmlessly. */
const END_DIRECT_POST_ATTEMPTS = 5;

function ttl(seconds: number, now = Date.now()): number {
  return Math.floor(now / 1000) + seconds;
}

function toConnection(item: Record<string, unknown>): ConnectionState {
  return {
    connectionId: item.connectionId as string,
    connectedAt: item.connectedAt as number,
    sourceIp: item.sourceIp as string | undefined,
    streamOpen: Boolean(item.streamOpen),
    streamId: item.streamId as string | undefined,
    ...(typeof item.lang === 'string' ? { lang: item.lang } : {}),
    ...(typeof item.archiveRemoving === 'string' ? { archiveRemoving: item.archiveRemoving } : {}),
    ...(typeof item.offlineRemoving === 'string' ? { offlineRemoving: item.offlineRemoving } : {}),
    user: item.user as string | undefined,
    ...(typeof item.authenticatedAt === 'number' ? { authenticatedAt: item.authenticatedAt } : {}),
    ...(typeof item.accountCreatedAt === 'number' ? { accountCreatedAt: item.accountCreatedAt } : {}),
    resource: item.resource as string | undefined,
    sasl: item.sasl as SaslProgress | undefined,
    authFailures: (item.authFailures as number | undefined) ?? 0,
    flexibleOffline: item.flexibleOffline as boolean | undefined,
    sm: item.sm as SmState | undefined,
    transfer: item.transfer as OfflineTransfer | undefined,
    flooded: item.flooded as boolean | undefined,
    directedTo: item.directedTo as string[] | undefined,
    rate: item.rate as RateBucket | undefined,
    fenced: item.fenced as boolean | undefined,
    ...(item.revoked !== undefined ? { revoked: item.revoked as Revocation } : {}),
    ...(item.ended === true ? { ended: true } : {}),
    countedFrame: item.countedFrame as string | undefined,
    countedSeq: item.countedSeq as string | undefined,
    smFrame: item.smFrame as string | undefined,
    answeredFrame: item.answeredFrame as string | undefined,
    answer: item.answer as string | undefined,
    resuming: item.resuming as string | undefined,
    replacing: item.replacing as ResourceRecord | undefined,
    savedFrame: item.savedFrame as string | undefined,
    doneSeq: item.doneSeq as string | undefined,
    storedOffline: item.storedOffline as string | undefined,
    rosterFrame: item.rosterFrame as string | undefined,
    rosterApplied: item.rosterApplied as string | undefined,
    rosterInterested: item.rosterInterested as boolean | undefined,
    archive: item.archive as ArchiveStreamState | undefined,
  };
}

function toResource(item: Record<string, unknown>, readAt?: number): ResourceRecord {
  return {
    user: item.user as string,
    resource: item.resource as string,
    connectionId: item.connectionId as string,
    available: Boolean(item.available),
    priority: (item.priority as number | undefined) ?? 0,
    presence: item.presence as string | undefined,
    boundAt: item.boundAt as number,
    ...(typeof item.connectedAt === 'number' ? { connectedAt: item.connectedAt } : {}),
    flexibleOffline: item.flexibleOffline as boolean | undefined,
    ...(item.floodSkipped === true ? { floodSkipped: true } : {}),
    smId: item.smId as string | undefined,
    ...(typeof item.availableFrame === 'string' ? { availableFrame: item.availableFrame } : {}),
    ...(typeof item.unavailableFrame === 'string' ? { unavailableFrame: item.unavailableFrame } : {}),
    rosterInterested: item.rosterInterested as boolean | undefined,
    ...(typeof item.rosterStale === 'string' ? { rosterStale: item.rosterStale } : {}),
    archive: item.archive as ArchiveStreamState | undefined,
    held: item.held as number | undefined,
    heldUntil: item.heldUntil as number | undefined,
    mayQueue: item.mayQueue as boolean | undefined,
    mayQueueUntil: item.mayQueueUntil as number | undefined,
    lateSince: item.lateSince as number | undefined,
    ...(item.posts instanceof Set ? { posts: [...(item.posts as Set<string>)] } : {}),
    postingUntil: item.postingUntil as number | undefined,
    ...(readAt === undefined ? {} : { readAt }),
  };
}

/**
 * What a presence update removes from the resource row: the frame that made it available once
 * it is not, and the skipped flood's mark once it is unavailable or negative (the next
 * non-negative presence floods, XEP-0160 §3).
 */
function removed(changes: { available: boolean; priority: number }): string {
  const names = [
    ...(changes.available ? ['unavailableFrame'] : ['availableFrame']),
    ...(changes.available && changes.priority >= 0 ? [] : ['floodSkipped']),
  ];
  return names.length > 0 ? ` REMOVE ${names.join(', ')}` : '';
}

/** A row as stored: `readAt` describes a copy, not the row. */
function storedRow(record: ResourceRecord): Omit<ResourceRecord, 'readAt'> {
  const { readAt: _copy, ...row } = record;
  return row;
}

export function createSessionStore(
  doc: DynamoDBDocumentClient,
  table: string,
  connectionTtlSeconds: number,
): SessionStore {
  /**
   * Writes a resource row (a bind, or a resume's re-bind) under `condition`, ResourceTakenError
   * when it fails; returns the row it replaced. A resumed session keeps its availability (and
   * renews the set's TTL); a takeover by a new bind starts unavailable.
   */
  async function putResourceRow(
    record: ResourceRecord,
    condition: { expression: string; values: Record<string, unknown> } | undefined,
    onHeld?: (row: ResourceRecord) => void,
  ): Promise<ResourceRecord | undefined> {
    const { Attributes } = await doc
      .send(
        new PutCommand({
          TableName: table,
          Item: {
            ...resourceKey(record.user, record.resource),
            ...storedRow(record),
            // API Gateway cuts every connection after 2 hours; a resource whose $disconnect was
            // lost is found by a 410 on the next delivery, or expires with the connection TTL.
            [TTL_ATTRIBUTE]: ttl(connectionTtlSeconds, record.boundAt),
          },
          ...(condition
            ? { ConditionExpression: condition.expression, ExpressionAttributeValues: condition.values }
            : {}),
          ReturnValues: 'ALL_OLD',
          ...(onHeld ? { ReturnValuesOnConditionCheckFailure: 'ALL_OLD' as const } : {}),
        }),
      )
      .catch((error: unknown) => {
        if (!isConditionFailure(error)) throw error;
        const held = (error as { Item?: Record<string, AttributeValue> }).Item;
        if (onHeld && held) onHeld(toResource(unmarshall(held)));
        throw new ResourceTakenError(record.user, record.resource);
      });
    const previous = Attributes ? toResource(Attributes) : undefined;
    if (record.available || previous?.available) {
      await syncAvailability(record.user, record.resource, record.available, '');
    }
    return previous;
  }

  /** Sets a flag on the resource row while `connectionId` holds it. */
  async function markResource(
    user: string,
    resource: string,
    connectionId: string,
    flag: 'flexibleOffline' | 'floodSkipped' | 'rosterInterested',
  ): Promise<void> {
    try {
      await doc.send(
        new UpdateCommand({
          TableName: table,
          Key: resourceKey(user, resource),
          UpdateExpression: 'SET #flag = :yes',
          ConditionExpression: 'connectionId = :connectionId',
          ExpressionAttributeNames: { '#flag': flag },
          ExpressionAttributeValues: { ':yes': true, ':connectionId': connectionId },
        }),
      );
    } catch (error) {
      if (!isConditionFailure(error)) throw error;
    }
  }

  /** Deletes a resource row only if it still belongs to the given owner; returns it, or undefined. */
  async function releaseIfOwned(
    user: string,
    resource: string,
    owner: 'connectionId' | 'smId',
    value: string,
  ): Promise<ResourceRecord | undefined> {
    try {
      const { Attributes } = await doc.send(
        new DeleteCommand({
          TableName: table,
          Key: resourceKey(user, resource),
          ConditionExpression: `${owner} = :owner`,
          ExpressionAttributeValues: { ':owner': value },
          ReturnValues: 'ALL_OLD',
        }),
      );
      const released = Attributes ? toResource(Attributes) : undefined;
      if (released?.available) await syncAvailability(user, resource, false, '');
      return released;
    } catch (error) {
      if (isConditionFailure(error)) return undefined;
      throw error;
    }
  }

  /**
   * Keeps the `avail` item's set in step with a resource row whose availability is now
   * `available`. Written after the row, so a reader that finds a name reads the row it names;
   * a name left behind (a row that expired by TTL) only costs a read. The item expires with the
   * connection TTL, renewed whenever a resource becomes available; a resource that becomes
   * unavailable leaves `unavailable` (its presence's children, '' for one the server made) and
   * the time in the same write (`LastUnavailable`), and the item is then kept
   * LAST_UNAVAILABLE_KEEP_SECONDS for them.
   */
  async function syncAvailability(
    user: string,
    resource: string,
    available: boolean,
    unavailable?: string,
    unavailableAt = Date.now(),
  ): Promise<void> {
    const kept =
      unavailable === undefined || unavailable.length > LAST_UNAVAILABLE_MAX_CHARS ? '' : unavailable;
    try {
      await doc.send(
        new UpdateCommand({
          TableName: table,
          Key: availKey(user),
          UpdateExpression: available
            ? 'ADD #res :names SET #ttl = :ttl'
            : 'DELETE #res :names SET #ttl = :ttl, offAt = :offAt, offPresence = :offPresence',
          // A DELETE never creates the item (UpdateItem would, with only its key).
          ConditionExpression: available ? undefined : 'attribute_exists(pk)',
          ExpressionAttributeNames: { '#res': 'res', '#ttl': TTL_ATTRIBUTE },
          ExpressionAttributeValues: {
            ':names': new Set([resource]),
            ':ttl': available ? ttl(connectionTtlSeconds) : ttl(LAST_UNAVAILABLE_KEEP_SECONDS),
            ...(available ? {} : { ':offAt': unavailableAt, ':offPresence': kept }),
          },
        }),
      );
    } catch (error) {
      if (!isConditionFailure(error)) throw error;
    }
  }

  /** SessionStore.updateConnection (and createConnection, through `create`). */
  async function updateConnection(
    connectionId: string,
    changes: Partial<Mutable>,
    options: { unlessFenced?: boolean; create?: NewConnection; returnRow?: boolean } = {},
  ): Promise<ConnectionState | undefined> {
    const sets: string[] = [];
    const removes: string[] = [];
    const names: Record<string, string> = {};
    const values: Record<string, unknown> = {};
    for (const [field, value] of Object.entries(changes)) {
      names[`#${field}`] = field;
      if (value === undefined) removes.push(`#${field}`);
      else {
        sets.push(`#${field} = :${field}`);
        values[`:${field}`] = value;
      }
    }
    names['#ttl'] = TTL_ATTRIBUTE;
    sets.push('#ttl = :ttl');
    const { create } = options;
    // A new row expires counting from its connection, as the connection itself does.
    values[':ttl'] = ttl(connectionTtlSeconds, create?.connectedAt);
    if (create) {
      // A new connection's attributes, kept if a row is there already.
      const initial: Record<string, unknown> = {
        connectionId,
        connectedAt: create.connectedAt,
        ...(create.sourceIp ? { sourceIp: create.sourceIp } : {}),
        streamOpen: false,
        authFailures: 0,
      };
      for (const [field, value] of Object.entries(initial)) {
        if (field in changes) continue;
        names[`#${field}`] = field;
        values[`:${field}`] = value;
        sets.push(`#${field} = if_not_exists(#${field}, :${field})`);
      }
    }
    const expression = `SET ${sets.join(', ')}${removes.length ? ` REMOVE ${removes.join(', ')}` : ''}`;
    const exists = create ? undefined : 'attribute_exists(pk)';
    const condition = options.unlessFenced
      ? [exists, 'attribute_not_exists(fenced)'].filter(Boolean).join(' AND ')
      : exists;
    try {
      const { Attributes } = await doc.send(
        new UpdateCommand({
          TableName: table,
          Key: connKey(connectionId),
          UpdateExpression: expression,
          ConditionExpression: condition,
          ExpressionAttributeNames: names,
          ExpressionAttributeValues: values,
          // Costs no read unit: an update is billed on the larger of the item before and after.
          ...(options.returnRow ? { ReturnValues: 'ALL_NEW' as const } : {}),
        }),
      );
      return Attributes ? toConnection(Attributes) : undefined;
    } catch (error) {
      if (!isConditionFailure(error)) throw error;
      // Fenced by a resume elsewhere, or ended: with `unlessFenced` the caller must stop.
      if (options.unlessFenced) throw new ConnectionFencedError(connectionId);
      // The connection ended meanwhile (its row was deleted): nothing left to update.
      return undefined;
    }
  }

  return {
    async createConnection(connectionId, connectedAt, sourceIp) {
      // The row a stream's first frame would write (tests, benches): the same initial attributes.
      await updateConnection(
        connectionId,
        {},
        { create: { connectedAt, ...(sourceIp ? { sourceIp } : {}) } },
      );
    },

    async getConnection(connectionId) {
      const { Item } = await doc.send(
        new GetCommand({ TableName: table, Key: connKey(connectionId), ConsistentRead: true }),
      );
      return Item ? toConnection(Item) : undefined;
    },

    updateConnection,

    async fenceConnection(connectionId) {
      try {
        const { Attributes } = await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: connKey(connectionId),
            UpdateExpression: 'SET fenced = :yes',
            ConditionExpression: 'attribute_exists(pk)',
            ExpressionAttributeValues: { ':yes': true },
            ReturnValues: 'ALL_NEW',
          }),
        );
        return Attributes ? toConnection(Attributes) : undefined;
      } catch (error) {
        if (isConditionFailure(error)) return undefined;
        throw error;
      }
    },

    // An operator's command (`npm run user`), folded out of the functions' bundles (`adminOnly`).
    revokeConnection:
      process.env.NIMBUS_ADMIN === 'false'
        ? adminOnly
        : async (connectionId, revocation = {}) => {
            const bounded = boundedRevocation(revocation);
            try {
              await doc.send(
                new UpdateCommand({
                  TableName: table,
                  Key: connKey(connectionId),
                  UpdateExpression: 'SET revoked = :revocation',
                  // Not a row whose stream has ended already (its $disconnect would tell nobody), and
                  // marked once: a rerun of the deletion (its roster gone by then) keeps the first run's.
                  ConditionExpression:
                    'attribute_exists(pk) AND attribute_not_exists(ended) AND attribute_not_exists(revoked)',
                  ExpressionAttributeValues: { ':revocation': bounded },
                }),
              );
              return true;
            } catch (error) {
              if (isConditionFailure(error)) return false;
              throw error;
            }
          },

    async deleteConnection(connectionId) {
      await doc.send(new DeleteCommand({ TableName: table, Key: connKey(connectionId) }));
    },

    async listResources(user) {
      const readAt = Date.now();
      const { Items = [] } = await doc.send(
        new QueryCommand({
          TableName: table,
          KeyConditionExpression: 'pk = :pk AND begins_with(sk, :res)',
          ExpressionAttributeValues: { ':pk': `user#${user}`, ':res': 'res#' },
          ConsistentRead: true,
        }),
      );
      return Items.map((item) => toResource(item, readAt));
    },

    async otherResources(user, resource, connectionId) {
      const now = Math.floor(Date.now() / 1000);
      const others: { resource: string; smId?: string }[] = [];
      let own = false;
      let startKey: Record<string, unknown> | undefined;
      do {
        const page = await doc.send(
          new QueryCommand({
            TableName: table,
            KeyConditionExpression: 'pk = :pk AND begins_with(sk, :res)',
            ProjectionExpression: 'sk, connectionId, smId, #ttl',
            ExpressionAttributeNames: { '#ttl': TTL_ATTRIBUTE },
            ExpressionAttributeValues: { ':pk': `user#${user}`, ':res': 'res#' },
            ConsistentRead: true,
            ExclusiveStartKey: startKey,
          }),
        );
        for (const item of page.Items ?? []) {
          const expired = typeof item[TTL_ATTRIBUTE] === 'number' && (item[TTL_ATTRIBUTE] as number) <= now;
          const name = (item.sk as string).slice('res#'.length);
          if (item.connectionId === connectionId) own = true;
          if (expired || name === resource || item.connectionId === connectionId) continue;
          others.push({ resource: name, ...(typeof item.smId === 'string' ? { smId: item.smId } : {}) });
        }
        startKey = page.LastEvaluatedKey;
      } while (startKey);
      return { others, own };
    },

    async getResource(user, resource) {
      const readAt = Date.now();
      if (!fitsResourceKey(resource)) return undefined;
      const { Item } = await doc.send(
        new GetCommand({ TableName: table, Key: resourceKey(user, resource), ConsistentRead: true }),
      );
      return Item ? toResource(Item, readAt) : undefined;
    },

    async bindResource(record, beforeTakeover) {
      for (let attempt = 1; ; attempt++) {
        // Free, or this connection's already (a redelivered bind): taken at once.
        let held: ResourceRecord | undefined;
        try {
          return await putResourceRow(
            record,
            {
              expression: 'attribute_not_exists(pk) OR connectionId = :connectionId',
              values: { ':connectionId': record.connectionId },
            },
            (row) => {
              held = row;
            },
          );
        } catch (error) {
          if (!(error instanceof ResourceTakenError)) throw error;
        }
        // (An endpoint that answers a failed condition without the item: read it.)
        held ??= await this.getResource(record.user, record.resource);
        if (!held) {
          if (attempt >= BIND_ATTEMPTS) throw new ResourceBusyError(record.user, record.resource);
          continue;
        }
        // Another connection's. The newest connection keeps the resource: a late bind of an
        // older one does not replace it.
        const { connectedAt } = record;
        if (connectedAt !== undefined && held.connectedAt !== undefined && held.connectedAt > connectedAt)
          throw new ResourceTakenError(record.user, record.resource);
        await beforeTakeover?.(held);
        // Taken only as it was when told: changed since (a resume moved it, an <enable/> switched
        // it), it is looked at again.
        const seen = { connectionId: held.connectionId, smId: held.smId, boundAt: held.boundAt };
        const names = Object.keys(seen) as (keyof typeof seen)[];
        try {
          return await putResourceRow(record, {
            expression: names
              .map((name) =>
                seen[name] === undefined ? `attribute_not_exists(${name})` : `${name} = :${name}`,
              )
              .join(' AND '),
            values: Object.fromEntries(
              names.filter((name) => seen[name] !== undefined).map((name) => [`:${name}`, seen[name]]),
            ),
          });
        } catch (error) {
          if (!(error instanceof ResourceTakenError)) throw error;
          if (attempt >= BIND_ATTEMPTS) throw new ResourceBusyError(record.user, record.resource);
        }
      }
    },

    async rebindResumed(record) {
      return putResourceRow(record, {
        expression: 'attribute_not_exists(connectionId) OR smId = :smId',
        values: { ':smId': record.smId },
      });
    },

    async updatePresence(user, resource, connectionId, changes) {
      /**
       * One update of the row. `marking` an unavailable presence's frame: only where the row is
       * available (the write that makes it unavailable), so that a redelivery finding the mark
       * knows its first attempt did; a row unavailable already (a presence before the initial
       * one) gets the same update without the mark.
       */
      const write = async (marking: boolean) => {
        const frameSet = !changes.frame
          ? ''
          : changes.available
            ? ', availableFrame = if_not_exists(availableFrame, :frame)'
            : marking
              ? ', unavailableFrame = :frame'
              : '';
        const { Attributes } = await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: resourceKey(user, resource),
            // The first presence closes the window of counted posts (mayQueue), after a grace:
            // xmpp.js sends it on 'online', just before its <enable/>.
            UpdateExpression: `SET available = :available, priority = :priority, presence = :presence, mayQueueUntil = if_not_exists(mayQueueUntil, :mayQueueUntil)${changes.hold ? ', held = if_not_exists(held, :zero), heldUntil = :until' : ''}${frameSet}${removed(changes)}`,
            ConditionExpression: `connectionId = :connectionId${marking ? ' AND available = :true' : ''}`,
            ExpressionAttributeValues: {
              ':available': changes.available,
              ':priority': changes.priority,
              ':presence': changes.presence ?? '',
              ':connectionId': connectionId,
              ':mayQueueUntil': Date.now() + MAY_QUEUE_AFTER_PRESENCE_MS,
              ...(changes.hold ? { ':zero': 0, ':until': Date.now() + HOLD_LEASE_MS } : {}),
              ...(frameSet ? { ':frame': changes.frame } : {}),
              ...(marking ? { ':true': true } : {}),
            },
            ReturnValues: 'ALL_OLD',
          }),
        );
        return Attributes ? toResource(Attributes) : undefined;
      };
      const marking = !changes.available && Boolean(changes.frame);
      try {
        let previous: ResourceRecord | undefined;
        try {
          previous = await write(marking);
        } catch (error) {
          // Not available (or not this connection's: refused again below).
          if (!marking || !isConditionFailure(error)) throw error;
          previous = await write(false);
        }
        // Also when a redelivery of the presence that changed it finds it changed: that frame's
        // first attempt may have failed before the user's set of available resources followed
        // (adding or removing a name twice changes nothing).
        const again =
          changes.frame !== undefined &&
          (changes.available ? previous?.availableFrame : previous?.unavailableFrame) === changes.frame;
        if (previous && (previous.available !== changes.available || again)) {
          await syncAvailability(
            user,
            resource,
            changes.available,
            changes.unavailable ?? '',
            changes.unavailableAt,
          );
        }
        return previous;
      } catch (error) {
        if (isConditionFailure(error)) return undefined;
        throw error;
      }
    },

    holdGuard(user, resource, connectionId) {
      return {
        Update: {
          TableName: table,
          Key: resourceKey(user, resource),
          UpdateExpression: 'ADD held :one',
          ConditionExpression: 'attribute_exists(held) AND connectionId = :connectionId AND heldUntil > :now',
          ExpressionAttributeValues: { ':one': 1, ':connectionId': connectionId, ':now': Date.now() },
        },
      };
    },

    noneAvailableGuard(user) {
      return {
        ConditionCheck: {
          TableName: table,
          Key: availKey(user),
          ConditionExpression: 'attribute_not_exists(#res)',
          ExpressionAttributeNames: { '#res': 'res' },
        },
      };
    },

    rosterAppliedRecord(connectionId, frame, applied) {
      return {
        Update: {
          TableName: table,
          Key: connKey(connectionId),
          UpdateExpression: 'SET rosterFrame = :frame, rosterApplied = :applied',
          ConditionExpression: 'attribute_exists(pk)',
          ExpressionAttributeValues: { ':frame': frame, ':applied': applied },
        },
      };
    },

    storedOfflineRecord(connectionId, record) {
      return {
        Update: {
          TableName: table,
          Key: connKey(connectionId),
          UpdateExpression: 'SET storedOffline = :record',
          ConditionExpression: 'attribute_exists(pk)',
          ExpressionAttributeValues: { ':record': record },
        },
      };
    },

    async recordRerouted(connectionId, frameId, user) {
      try {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: connKey(connectionId),
            UpdateExpression: 'SET storedOffline = :record',
            // Not for a frame saved as done (its redelivery is skipped: the record would only
            // stand in the way of a later frame's), nor over another frame's record.
            ConditionExpression:
              'attribute_exists(pk) AND (attribute_not_exists(savedFrame) OR savedFrame <> :frameId) AND (attribute_not_exists(storedOffline) OR begins_with(storedOffline, :frame))',
            ExpressionAttributeValues: {
              ':record': `${frameId} ${user}`,
              ':frame': `${frameId} `,
              ':frameId': frameId,
            },
          }),
        );
        return true;
      } catch (error) {
        if (!isConditionFailure(error)) throw error;
        return false;
      }
    },

    async releaseHold(user, resource, connectionId, seen) {
      try {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: resourceKey(user, resource),
            UpdateExpression: 'REMOVE held, heldUntil',
            ConditionExpression: `connectionId = :connectionId${seen === undefined ? '' : ' AND (attribute_not_exists(held) OR held = :seen)'}`,
            ExpressionAttributeValues: {
              ':connectionId': connectionId,
              ...(seen === undefined ? {} : { ':seen': seen }),
            },
          }),
        );
        return undefined;
      } catch (error) {
        if (!isConditionFailure(error)) throw error;
      }
      const now = await this.getResource(user, resource);
      return now?.connectionId === connectionId ? now.held : undefined;
    },

    async renewHold(user, resource, connectionId) {
      try {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: resourceKey(user, resource),
            UpdateExpression: 'SET heldUntil = :until',
            ConditionExpression: 'attribute_exists(held) AND connectionId = :connectionId',
            ExpressionAttributeValues: {
              ':until': Date.now() + HOLD_LEASE_MS,
              ':connectionId': connectionId,
            },
          }),
        );
      } catch (error) {
        if (!isConditionFailure(error)) throw error;
      }
    },

    async markRosterInterested(user, resource, connectionId) {
      await markResource(user, resource, connectionId, 'rosterInterested');
    },

    async markRosterStale(user, resource, smId, ver) {
      try {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: resourceKey(user, resource),
            UpdateExpression: 'SET rosterStale = if_not_exists(rosterStale, :ver)',
            ConditionExpression: 'smId = :smId',
            ExpressionAttributeValues: { ':ver': ver, ':smId': smId },
          }),
        );
      } catch (error) {
        if (!isConditionFailure(error)) throw error;
      }
    },

    async availableResourcesOf(users) {
      return (await this.presenceOf(users)).online;
    },

    async presenceOf(users) {
      const result = new Map<string, ResourceRecord[]>();
      const lastUnavailable = new Map<string, LastUnavailable>();
      const unique = [...new Set(users)];
      if (unique.length === 0) return { online: result, lastUnavailable };
      const sets = await batchGetAll(
        doc,
        table,
        unique.map((user) => availKey(user)),
        { consistent: true, concurrency: 4 },
      );
      const nowSeconds = Math.floor(Date.now() / 1000);
      for (const item of sets) {
        if (typeof item.offAt !== 'number') continue;
        // Past its keeping (DynamoDB's TTL deletes late): not served.
        if (typeof item[TTL_ATTRIBUTE] === 'number' && item[TTL_ATTRIBUTE] <= nowSeconds) continue;
        lastUnavailable.set((item.pk as string).slice('user#'.length), {
          at: item.offAt,
          presence: typeof item.offPresence === 'string' ? item.offPresence : '',
        });
      }
      const rowKeys = sets.flatMap((item) => {
        const user = (item.pk as string).slice('user#'.length);
        const names = [...((item.res as Set<string> | undefined) ?? [])];
        return names.filter(fitsResourceKey).map((name) => resourceKey(user, name));
      });
      const readAt = Date.now();
      const rows = await batchGetAll(doc, table, rowKeys, { consistent: true, concurrency: 4 });
      for (const row of rows) {
        const record = toResource(row, readAt);
        if (!record.available) continue;
        const list = result.get(record.user) ?? [];
        list.push(record);
        result.set(record.user, list);
      }
      return { online: result, lastUnavailable };
    },

    // An operator's command (`npm run user`), folded out of the functions' bundles (`adminOnly`).
    forgetLastUnavailable:
      process.env.NIMBUS_ADMIN === 'false'
        ? adminOnly
        : async (user) => {
            // The item goes when it names no available resource: an unavailable presence still in
            // flight then finds no item (its update never creates one) and leaves nothing behind.
            try {
              await doc.send(
                new DeleteCommand({
                  TableName: table,
                  Key: availKey(user),
                  ConditionExpression: 'attribute_not_exists(#res)',
                  ExpressionAttributeNames: { '#res': 'res' },
                }),
              );
              return;
            } catch (error) {
              if (!isConditionFailure(error)) throw error;
            }
            try {
              await doc.send(
                new UpdateCommand({
                  TableName: table,
                  Key: availKey(user),
                  UpdateExpression: 'REMOVE offAt, offPresence',
                  ConditionExpression: 'attribute_exists(pk)',
                }),
              );
            } catch (error) {
              if (!isConditionFailure(error)) throw error;
            }
          },

    async markFlexibleOffline(user, resource, connectionId) {
      await markResource(user, resource, connectionId, 'flexibleOffline');
    },

    async markFloodSkipped(user, resource, connectionId) {
      await markResource(user, resource, connectionId, 'floodSkipped');
    },

    async setResourceArchive(user, resource, connectionId, archive) {
      try {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: resourceKey(user, resource),
            UpdateExpression: 'SET #archive = :archive',
            ConditionExpression: 'connectionId = :connectionId',
            ExpressionAttributeNames: { '#archive': 'archive' },
            ExpressionAttributeValues: { ':archive': archive, ':connectionId': connectionId },
          }),
        );
      } catch (error) {
        if (!isConditionFailure(error)) throw error;
      }
    },

    async switchToQueue(user, resource, connectionId, smId) {
      const now = Date.now();
      try {
        const { Attributes } = await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: resourceKey(user, resource),
            UpdateExpression:
              'SET smId = if_not_exists(smId, :smId) REMOVE mayQueue, mayQueueUntil, posts, posting, postingUntil',
            // Still in the window (with a margin for the clocks of the posters that read it), or
            // this connection's own earlier switch (a redelivered <enable/>); no post in flight
            // (an empty set is no attribute). `posting` is the count functions before session 19
            // kept: one of them may still be posting while a deployment replaces it.
            ConditionExpression:
              'connectionId = :connectionId AND (attribute_exists(smId) OR (attribute_exists(mayQueue) AND (attribute_not_exists(mayQueueUntil) OR mayQueueUntil > :soon))) AND ((attribute_not_exists(posts) AND (attribute_not_exists(posting) OR posting <= :zero)) OR postingUntil < :now)',
            ExpressionAttributeValues: {
              ':connectionId': connectionId,
              ':smId': smId,
              ':zero': 0,
              ':now': now,
              ':soon': now + CLOCK_MARGIN_MS,
            },
            ReturnValues: 'ALL_OLD',
          }),
        );
        const landed = Date.now();
        const earlier = Attributes?.smId as string | undefined;
        let lateSince = Attributes?.lateSince as number | undefined;
        // The SDK may have sent the write again later than `:soon` says: a poster that read the
        // row past the window's end did not count its post.
        const until = Attributes?.mayQueueUntil as number | undefined;
        if (earlier === undefined && until !== undefined && landed + CLOCK_MARGIN_MS >= until)
          lateSince = landed;
        return { kind: 'switched', smId: earlier ?? smId, ...(lateSince === undefined ? {} : { lateSince }) };
      } catch (error) {
        if (!isConditionFailure(error)) throw error;
      }
      const row = await this.getResource(user, resource);
      if (!row || row.connectionId !== connectionId) throw new ResourceTakenError(user, resource);
      const open =
        row.smId !== undefined ||
        (row.mayQueue && (row.mayQueueUntil ?? Number.POSITIVE_INFINITY) > now + CLOCK_MARGIN_MS);
      if (!open) return { kind: 'late' };
      return { kind: 'posting', until: row.postingUntil ?? now };
    },

    async switchToQueueLate(user, resource, connectionId, smId) {
      const { Attributes } = await doc
        .send(
          new UpdateCommand({
            TableName: table,
            Key: resourceKey(user, resource),
            UpdateExpression:
              'SET smId = if_not_exists(smId, :smId), lateSince = if_not_exists(lateSince, :now) REMOVE mayQueue, mayQueueUntil, posts, posting, postingUntil',
            ConditionExpression: 'connectionId = :connectionId',
            ExpressionAttributeValues: { ':connectionId': connectionId, ':smId': smId, ':now': Date.now() },
            ReturnValues: 'ALL_NEW',
          }),
        )
        .catch((error: unknown) => {
          throw isConditionFailure(error) ? new ResourceTakenError(user, resource) : error;
        });
      // The wait runs from when the switch was surely made: this answer, or the stored time of
      // an earlier attempt's switch.
      const effective = Attributes?.smId as string;
      return {
        smId: effective,
        lateSince: effective === smId ? Date.now() : (Attributes?.lateSince as number),
      };
    },

    async beginDirectPost(user, resource, connectionId) {
      const token = randomBytes(6).toString('base64url');
      try {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: resourceKey(user, resource),
            UpdateExpression: 'ADD posts :token SET postingUntil = :until',
            ConditionExpression:
              'connectionId = :connectionId AND attribute_exists(mayQueue) AND attribute_not_exists(smId)',
            ExpressionAttributeValues: {
              ':token': new Set([token]),
              ':until': Date.now() + DIRECT_POST_LEASE_MS,
              ':connectionId': connectionId,
            },
          }),
        );
        return token;
      } catch (error) {
        // A resend after a 500 that came after the write may find its own token's post switched
        // away meanwhile: the switch waited for that token, so nothing was posted by it yet.
        if (isConditionFailure(error)) return undefined;
        throw error;
      }
    },

    async endDirectPost(user, resource, connectionId, token) {
      // Tried again in place on any error but a failed condition: a record left in flight holds
      // an <enable/> until its lease runs out, and the enable is then refused. Removing a token
      // from a set is the same however often it is done (the SDK's resends too).
      for (let attempt = 1; ; attempt++) {
        try {
          await doc.send(
            new UpdateCommand({
              TableName: table,
              Key: resourceKey(user, resource),
              UpdateExpression: 'DELETE posts :token',
              // Gone with the switch (or the row): nothing left to end.
              ConditionExpression: 'connectionId = :connectionId AND attribute_exists(posts)',
              ExpressionAttributeValues: { ':token': new Set([token]), ':connectionId': connectionId },
            }),
          );
          return;
        } catch (error) {
          if (isConditionFailure(error)) return;
          if (attempt >= END_DIRECT_POST_ATTEMPTS) throw error;
          await new Promise((resolve) => setTimeout(resolve, 25 * 2 ** attempt));
        }
      }
    },

    releaseSmResource: (user, resource, smId) => releaseIfOwned(user, resource, 'smId', smId),

    releaseResource: (user, resource, connectionId) =>
      releaseIfOwned(user, resource, 'connectionId', connectionId),

    // No request path needs every session, so there is no index for it: listing them is an
    // operator's command (`npm run user -- sessions`), a Scan filtered to resource rows that
    // reads (and pays for) the whole table. The functions' roles are not allowed to Scan, and
    // their bundles leave it out (`adminOnly`).
    listAllResources:
      process.env.NIMBUS_ADMIN === 'false'
        ? adminOnly
        : async () => {
            const resources: ResourceRecord[] = [];
            let startKey: Record<string, unknown> | undefined;
            do {
              const page = await doc.send(
                new ScanCommand({
                  TableName: table,
                  FilterExpression: 'begins_with(pk, :user) AND begins_with(sk, :res)',
                  ExpressionAttributeValues: { ':user': 'user#', ':res': 'res#' },
                  ExclusiveStartKey: startKey,
                }),
              );
              for (const item of page.Items ?? []) resources.push(toResource(item));
              startKey = page.LastEvaluatedKey;
            } while (startKey);
            return resources.sort((a, b) =>
              a.user === b.user ? a.resource.localeCompare(b.resource) : a.user.localeCompare(b.user),
            );
          },
  };
}
