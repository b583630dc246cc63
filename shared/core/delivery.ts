/**
 * The one delivery path (docs/design.md "One outbound port"): the only code that puts anything on a
 * connection. It (0) serialises and checks the size against what the transport accepts
 * (XEP-0478), (1) hands stanzas for a stream-management session to its queue, which numbers and
 * keeps them, (2) posts, (3) on 410 Gone tells the session lifecycle, which ends or detaches the
 * session, so the caller re-routes what must not be lost.
 */
import { createHash } from 'node:crypto';
import { Element } from 'ltx';
import { StanzaError } from '../errors.ts';
import { type BoundedPostResult, POST_TIMEOUT_MS, type PostResult, serialize } from '../outbound.ts';
import type { ResourceRecord } from '../store/sessions.ts';
import { NS } from '../xml/namespaces.ts';
import { nextDeliveryKey } from './frame.ts';
import type { DeliveryItem, DeliveryOptions, DeliveryResult, SendAllResult, Server } from './host.ts';
import { RetryLaterError } from './transient.ts';

/** API Gateway's limit for one message to a client (PostToConnection), in bytes. */
export const POST_LIMIT_BYTES = 128 * 1024;

/**
 * Room kept, when a stanza is accepted, for what its delivered copies may carry beyond one
 * XEP-0203 stamp of this server's (counted apart, by the domain's length): XEP-0013's
 * `<offline><item node/></offline>` on a viewed or fetched message (at most 138 bytes) and the
 * client namespace.
 */
const DELIVERY_ADDITIONS_BYTES = 192;

/**
 * XEP-0478 §3: "If, after serialization, a stanza exceeds the limits that have been advertised
 * on a stream, it SHOULD NOT be sent on that stream. Instead, a server SHOULD return an error to
 * the sender. Such an error SHOULD contain the <policy-violation/> error condition, and SHOULD
 * NOT contain a 'by' attribute". Escaping can grow a stanza (an attribute of `'` six-fold), so
 * the check is on the serialised form.
 */
export function tooLargeError(): StanzaError {
  return new StanzaError(
    'modify',
    'policy-violation',
    `The stanza would exceed the ${POST_LIMIT_BYTES}-byte message limit of the recipient's transport`,
  );
}

/**
 * The answer to a sender whose recipient's stream-management queue is congested: RFC 6120
 * §8.3.3.18 <resource-constraint/> of type wait ("retry after waiting").
 */
export function congestedError(): StanzaError {
  return new StanzaError('wait', 'resource-constraint', 'The recipient is not keeping up; try again shortly');
}

/**
 * Whether a stanza accepted now can still be delivered later, stamps and all (the check when a
 * client's stanza is accepted: what passes it is never refused for its size further on).
 */
export function fitsTransport(stanza: Element, domain: string): boolean {
  return (
    Buffer.byteLength(serialize(stanza)) + delayStampBytes(domain) + DELIVERY_ADDITIONS_BYTES <=
    POST_LIMIT_BYTES
  );
}

/**
 * Whether a stanza being delivered now fits the transport as it is sent, or sent again after a
 * resume with the XEP-0203 stamp the stream-management queue adds to one without this server's.
 * No room is kept twice: a copy of a stored message, stamped and carrying its XEP-0013 node,
 * is checked as it is, not against the margin it was accepted with.
 */
export function fitsDelivery(stanza: Element, domain: string): boolean {
  const stamped = stanza.getChildren('delay', NS.delay).some((delay) => delay.attrs.from === domain);
  return Buffer.byteLength(serialize(stanza)) + (stamped ? 0 : delayStampBytes(domain)) <= POST_LIMIT_BYTES;
}

let stampBytes: { domain: string; bytes: number } | undefined;

/** The bytes of this server's `<delay/>` (core/stanzas.ts stampDelay), whose stamp has a fixed length. */
export function delayStampBytes(domain: string): number {
  if (stampBytes?.domain !== domain) {
    const delay = new Element('delay', { xmlns: NS.delay, from: domain, stamp: new Date(0).toISOString() });
    stampBytes = { domain, bytes: Buffer.byteLength(delay.toString()) };
  }
  return stampBytes.bytes;
}

/** Where a delivery goes: a bound resource, or a stream (its connection and SM session). */
export interface DeliveryTarget {
  connectionId: string;
  smId?: string;
}

/**
 * Delivers a stanza to a session. Throws the policy-violation StanzaError when it can never be
 * sent. 'gone' means the session no longer exists and the caller must re-route; 'full' that the
 * session's stream-management queue is congested (see congestedError).
 */
export async function deliver(
  server: Server,
  target: DeliveryTarget | ResourceRecord,
  stanza: Element,
  options: DeliveryOptions = {},
): Promise<DeliveryResult> {
  const queue = server.host.stanzaQueue;
  if (target.smId && queue) {
    if (!fitsDelivery(stanza, server.config.domain)) throw tooLargeError();
    return queue.deliver(target.smId, stanza, options);
  }
  if ('user' in target && queue) return deliverDirect(server, target, stanza, options);
  return (await postDirect(server, target, stanza)) as DeliveryResult;
}

/**
 * Delivers stanzas to one stream in order (Stream.sendAll), stopping at the first not taken
 * ('gone', 'full'): the results of those tried. One too large to send is its policy-violation
 * error and is passed over, as the rest go on. With stream management, the session's queue takes
 * them together (StanzaQueue.deliverMany: a group's window in one write).
 */
export async function deliverAll(
  server: Server,
  target: DeliveryTarget,
  items: readonly DeliveryItem[],
): Promise<SendAllResult[]> {
  const queue = server.host.stanzaQueue;
  if (!target.smId || !queue)
    return oneByOne(items, (stanza, options) => deliver(server, target, stanza, options));
  const refused = items.map(({ stanza }) =>
    fitsDelivery(stanza, server.config.domain) ? undefined : tooLargeError(),
  );
  const delivered = await queue.deliverMany(
    target.smId,
    items.filter((_, at) => refused[at] === undefined),
  );
  const results: SendAllResult[] = [];
  let next = 0;
  for (const error of refused) {
    if (error) {
      results.push(error);
      continue;
    }
    const result = delivered[next++];
    // Not tried: an earlier one was not taken.
    if (result === undefined) break;
    results.push(result);
    if (result !== 'sent') break;
  }
  return results;
}

/**
 * `send` for each in order, stopping at the first not taken; a StanzaError (too large to send) is
 * that one's result, and the rest go on.
 */
export async function oneByOne(
  items: readonly DeliveryItem[],
  send: (stanza: Element, options: DeliveryOptions) => Promise<DeliveryResult>,
): Promise<SendAllResult[]> {
  const results: SendAllResult[] = [];
  for (const { stanza, options } of items) {
    try {
      const result = await send(stanza, options);
      results.push(result);
      if (result !== 'sent') break;
    } catch (error) {
      if (!(error instanceof StanzaError)) throw error;
      results.push(error);
    }
  }
  return results;
}

/**
 * A direct post starts within this of the read of the row that sent it there (`readAt`), or the
 * row is read again: so a post that went by a row read before a stream switched to its XEP-0198
 * queue is over within READ_BOUND_MS + POST_TIMEOUT_MS of the switch (`DIRECT_POST_BOUND_MS`),
 * which is what a late switch waits before `<enabled/>`.
 */
// Long enough that a broadcast to a thousand contacts (about 1.6 s of posts, 16 at a time)
// reads no row twice; a late <enable/> waits it out once.
export const READ_BOUND_MS = 2_000;

/** How long after a switch to a queue a direct post by an older read of the row can still land. */
export const DIRECT_POST_BOUND_MS = READ_BOUND_MS + POST_TIMEOUT_MS;

/**
 * A direct post to a bound resource (no stream-management queue): within READ_BOUND_MS of the
 * row's read, and counted in flight while its stream may still switch to a queue exactly
 * (`mayQueue`: from bind until a grace after its first presence), so the switch waits for it.
 * A row that changed meanwhile (switched, its window over) is read again, and the stanza goes
 * the way it says now.
 */
async function deliverDirect(
  server: Server,
  target: ResourceRecord,
  stanza: Element,
  options: DeliveryOptions,
): Promise<DeliveryResult> {
  // The frame's n-th direct post of this very stanza to this connection: the same key on a retry
  // of the frame that posts it again, whatever else that try posts or no longer does.
  // Serialised once, for the digest and the post.
  const data = serialize(stanza);
  const digest = createHash('sha256').update(data).digest('base64url').slice(0, 22);
  const delivery = nextDeliveryKey(`direct:${target.connectionId}:${digest}`);
  const posted = delivery && `${target.connectionId} ${digest} ${delivery.key}`;
  if (posted && postedDirect.has(posted)) {
    server.log.debug('direct post made by an earlier try of the frame', {
      connectionId: target.connectionId,
    });
    return 'sent';
  }
  const result = await deliverDirectOnce(server, target, stanza, options, data);
  if (posted && result === 'sent') {
    postedDirect.add(posted);
    if (postedDirect.size > POSTED_DIRECT_KEPT)
      postedDirect.delete(postedDirect.values().next().value as string);
  }
  return result;
}

/**
 * Direct posts made in this process, by connection, stanza and delivery key. A client without stream
 * management has no count that could tell a second copy: a frame tried again (in place after a
 * throttled write or post, or redelivered to this instance) does not post again what its
 * earlier try did, while it goes on with the targets that try did not reach. (Another instance
 * that gets the redelivery has no such record: README, Limits.)
 */
const postedDirect = new Set<string>();
const POSTED_DIRECT_KEPT = 10_000;

async function deliverDirectOnce(
  server: Server,
  target: ResourceRecord,
  stanza: Element,
  options: DeliveryOptions,
  data: string,
  reads = 0,
): Promise<DeliveryResult> {
  const { user, resource, connectionId } = target;
  // A record of unknown age is read again before anything is posted by it.
  const readAt = target.readAt ?? Number.NEGATIVE_INFINITY;
  const again = async (): Promise<DeliveryResult> => {
    const now = await server.sessions.getResource(user, resource);
    // Gone: the session ended; the caller re-routes (its end re-routes what it held).
    if (!now) return 'gone';
    if (now.smId || now.connectionId !== connectionId) return deliver(server, now, stanza, options);
    if (reads < 3) return deliverDirectOnce(server, now, stanza, options, data, reads + 1);
    // Three reads, each too old by the time its post would start: the frame is tried again.
    throw new RetryLaterError('a direct post could not start in time after its row was read');
  };
  const counted = target.mayQueue === true && readAt < (target.mayQueueUntil ?? Number.POSITIVE_INFINITY);
  const token = counted ? await server.sessions.beginDirectPost(user, resource, connectionId) : undefined;
  if (counted && token === undefined) return again();
  try {
    const result = await postDirect(server, target, stanza, readAt + READ_BOUND_MS, data);
    return result === 'stale' ? await again() : result;
  } finally {
    // A lost end only holds a switch until the count's lease runs out: never fails the delivery.
    if (token !== undefined)
      await server.sessions.endDirectPost(user, resource, connectionId, token).catch((error: unknown) => {
        server.log.warn('direct post count not ended (its lease will)', { connectionId, error });
      });
  }
}

async function postDirect(
  server: Server,
  target: DeliveryTarget | ResourceRecord,
  stanza: Element,
  notAfter?: number,
  data?: string,
): Promise<DeliveryResult | 'stale'> {
  const outcome = await postBounded(server, target.connectionId, stanza, notAfter, data);
  if (outcome === 'stale') return 'stale';
  const result = outcome === 'unknown' ? 'sent' : outcome;
  if (result === 'gone') {
    server.log.info('connection gone on delivery', { connectionId: target.connectionId });
    await server.host.fire('connection-vanished', {
      connectionId: target.connectionId,
      ...('user' in target ? { resource: target } : {}),
    });
  }
  return result;
}

/**
 * Posts one element on a connection as it is: a stanza or a nonza. Callers that own the
 * connection's session (the stream itself, stream management replaying its queue, a kick)
 * handle 'gone' themselves; everything else goes through `deliver`. A post whose fate is
 * unknown (no answer came) counts as sent: without stream management XMPP delivers at most once,
 * and a second copy could arrive twice; stream management uses `postExactly`.
 */
export async function post(
  server: Server,
  connectionId: string,
  element: Element,
): Promise<Exclude<PostResult, 'unknown'>> {
  const result = await postExactly(server, connectionId, element);
  return result === 'unknown' ? 'sent' : result;
}

/** `post`, telling 'unknown' apart: the frame may or may not have reached the client. */
export async function postExactly(
  server: Server,
  connectionId: string,
  element: Element,
): Promise<PostResult> {
  // Without `notAfter` a post is never 'stale'.
  return (await postBounded(server, connectionId, element)) as PostResult;
}

/** The post itself: serialised, checked against the limit, counted; 'stale' only with `notAfter`. */
async function postBounded(
  server: Server,
  connectionId: string,
  element: Element,
  notAfter?: number,
  serialized?: string,
): Promise<BoundedPostResult> {
  const data = serialized ?? serialize(element);
  if (Buffer.byteLength(data) > POST_LIMIT_BYTES) throw tooLargeError();
  const result = await server.outbound.post(connectionId, data, notAfter);
  if (result !== 'stale') countPost(server, connectionId, element, result);
  return result;
}

function countPost(server: Server, connectionId: string, element: Element, result: PostResult): void {
  // Counted once posted: each is one API Gateway message (a cost driver), replays included.
  if (result !== 'gone')
    server.metrics.count('StanzasOut', 1, STANZA_KINDS.has(element.name) ? element.name : 'nonza');
  if (result === 'unknown') {
    server.metrics.count('PostsUnanswered');
    server.log.warn('post unanswered: it may or may not have reached the client', { connectionId });
  }
}

const STANZA_KINDS = new Set(['message', 'presence', 'iq']);

/** Closes a connection's socket (API Gateway then sends `$disconnect`). */
export function closeConnection(server: Server, connectionId: string): Promise<void> {
  return server.outbound.close(connectionId);
}

/** Deliveries to many sessions in flight at once (a broadcast): bounded, so one function's sockets stay few. */
export const FAN_OUT_CONCURRENCY = 16;

/**
 * Delivers to many sessions, at most `concurrency` sessions at a time (a broadcast to 1,000
 * contacts takes ~1000/16 post round trips, not 1,000). `stanzasFor` builds what each session
 * gets (stanzas are addressed per recipient); one session's stanzas go out in order, one after
 * the other, so its stream-management numbering follows the order of its posts. A delivery
 * that cannot be made (gone, too large) is skipped: presence is not stored for later. Returns
 * how many stanzas were put on a session.
 */
export async function deliverToMany<T extends DeliveryTarget | ResourceRecord>(
  server: Server,
  targets: readonly T[],
  stanzasFor: (target: T) => Element | Element[],
  concurrency = FAN_OUT_CONCURRENCY,
): Promise<number> {
  let sent = 0;
  await eachLimited(targets, concurrency, async (target) => {
    const built = stanzasFor(target);
    for (const stanza of Array.isArray(built) ? built : [built]) {
      let result: DeliveryResult;
      try {
        result = await deliver(server, target, stanza);
      } catch (error) {
        if (error instanceof StanzaError) continue;
        throw error;
      }
      if (result !== 'sent') break;
      sent++;
    }
  });
  return sent;
}

/**
 * Runs `work` on each item, at most `concurrency` at a time. After the first failure no worker
 * starts another item, and the failure is thrown only once every worker has stopped: the
 * frame's next attempt must not run beside this one's work.
 */
export async function eachLimited<T>(
  items: readonly T[],
  concurrency: number,
  work: (item: T) => Promise<void>,
): Promise<void> {
  const workers = Math.min(concurrency, items.length);
  if (workers > 1) fanOuts += 1;
  try {
    await runLimited(items, workers, work);
  } finally {
    if (workers > 1) fanOuts -= 1;
  }
}

/** eachLimited's fan-outs running now in this process (see inFanOut). */
let fanOuts = 0;

/**
 * Whether deliveries run side by side now (an eachLimited fan-out). Where the frame's context is
 * a variable (sequentialContexts, on Lambda), nothing may run under another frame meanwhile: the
 * deliveries beside it would read that frame's context, and take its keys.
 */
export function inFanOut(): boolean {
  return fanOuts > 0;
}

async function runLimited<T>(
  items: readonly T[],
  workers: number,
  work: (item: T) => Promise<void>,
): Promise<void> {
  let next = 0;
  let failed = false;
  const worker = async () => {
    while (next < items.length && !failed) {
      const item = items[next++] as T;
      try {
        await work(item);
      } catch (error) {
        failed = true;
        throw error;
      }
    }
  };
  const outcomes = await Promise.allSettled(Array.from({ length: workers }, worker));
  const failure = outcomes.find((outcome) => outcome.status === 'rejected');
  if (failure) throw failure.reason;
}
