/**
 * XEP-0013 Flexible Offline Message Retrieval (v1.2, the seed), `http://jabber.org/protocol/offline`,
 * over the XEP-0160 offline store: a POP3-like inbox. Count and headers through XEP-0030 disco on
 * the node `http://jabber.org/protocol/offline`; view, remove, fetch and purge through `<offline/>`.
 *
 * Headers are paged with XEP-0059 Result Set Management (v1.0). A request without `<set/>` gets
 * the first page only, sized to fit API Gateway's 128 KB message limit, with a `<set/>` carrying
 * `<count/>`, `<first/>` and `<last/>` so the client can ask for the rest: the seed's "MUST return
 * headers for all of the user's offline messages" cannot hold for a 10,000-message inbox in one
 * WebSocket message.
 *
 * Costs (docs/design.md: count request units): count is one GetItem on the maintained counter; a page
 * of headers is that GetItem plus one key-ordered Query with a Limit. Nothing here scans.
 */
import { Element } from 'ltx';
import { POST_LIMIT_BYTES } from '../core/delivery.ts';
import { type BoundStream, DEFERRED_RESULT, type IqRequest, type Server } from '../core/host.ts';
import { decodePageRequest as decodeRsm, encodePageReply, type PageRequest } from '../core/rsm.ts';
import { StanzaError } from '../errors.ts';
import { bareJid } from '../jid.ts';
import type { OfflineMessage } from '../store/offline.ts';
import { MAX_REQUESTED_TRANSFER_BYTES } from '../store/sessions.ts';
import { NS } from '../xml/namespaces.ts';
import { deliveredCopy, sendStored, startTransfer } from './xep-0160-offline-storage.ts';

/** XEP-0013 §2.2: the well-known disco node of the offline message queue. */
const NODE = NS.offline;

/**
 * Headers per page when the client's `<set/>` has no `<max/>`, and the most it may ask for.
 * Without `<set/>`, as many as one reply holds (`listWithin`).
 */
export const DEFAULT_HEADERS_PAGE = 100;
export const MAX_HEADERS_PAGE = 250;
/** Room kept for the iq wrapper, the `<query/>` and the `<set/>` around the items. */
const ENVELOPE_BYTES = 4096;
/** Messages read per Query while fetching: one page in flight while the previous one is sent. */
const FETCH_PAGE = 100;

/**
 * Ids made by `newOfflineId` (ms time, per-process sequence, randomness) or `keyedOfflineId`
 * (ms time, SQS sequence number, position). Anything else never existed.
 */
const OFFLINE_ID = /^\d{15}-(\d{4}-[0-9a-f]{8}|\d{40}-\d{4})$/;

export function register(server: Server): void {
  const { host } = server;
  host.add('disco-feature', NS.offline);
  // XEP-0059 §4: headers are paged with Result Set Management, which is advertised.
  host.add('disco-feature', NS.rsm);
  // Only the server names offline nodes: an <offline/> a sender put in a live message would
  // look to a flexible-retrieval client like the server's marker of a stored one (as in
  // stampedStanza, which strips it from stored messages).
  host.hook('stanza-in', ({ stanza }) => {
    if (stanza.name === 'message')
      for (const forged of stanza.getChildren('offline', NS.offline)) stanza.remove(forged);
    return undefined;
  });
  host.add('disco-node', {
    node: NODE,
    info: (request) => countInfo(server, request),
    items: (request) => headers(server, request),
  });
  // The handler refuses every other account with forbidden itself, existing or not, so the
  // answer never tells whether an account exists.
  host.iq('get', NS.offline, 'offline', (request) => command(server, request), {
    answersForAnyAccount: true,
  });
  host.iq('set', NS.offline, 'offline', (request) => command(server, request), {
    answersForAnyAccount: true,
  });
}

// ---------------------------------------------------------------------------------------------
// Decode

export type OfflineCommand =
  | { action: 'view'; nodes: string[] }
  | { action: 'remove'; nodes: string[] }
  | { action: 'fetch' }
  | { action: 'purge' };

function badRequest(text: string): StanzaError {
  return new StanzaError('modify', 'bad-request', text);
}

/**
 * The one command an `<offline/>` element carries. XEP-0013 schema: `<offline/>` holds items;
 * §2.5/§2.6 add `<fetch/>` (a get) and `<purge/>` (a set), each on its own. View is a get
 * (§2.3), remove a set (§2.4); any other shape is `bad-request`.
 */
export function decodeCommand(type: 'get' | 'set', offline: Element): OfflineCommand {
  const children = offline.getChildElements();
  if (children.length === 0) throw badRequest('offline needs items, fetch or purge');
  const names = new Set<string>();
  for (const child of children) {
    if (child.getNS() !== NS.offline || !['item', 'fetch', 'purge'].includes(child.name)) {
      throw badRequest(`unexpected <${child.name}/> in offline`);
    }
    names.add(child.name);
  }
  if (names.has('fetch') || names.has('purge')) {
    if (children.length !== 1) throw badRequest('fetch and purge stand alone');
    const action = children[0]?.name === 'fetch' ? 'fetch' : 'purge';
    const expected = action === 'fetch' ? 'get' : 'set';
    if (type !== expected) throw badRequest(`${action} is an iq of type ${expected}`);
    return { action };
  }
  // XEP-0013 §2.3: "A user MAY request one or more messages in the same IQ get"; §2.4 likewise
  // for removal in an IQ set.
  const action = type === 'get' ? 'view' : 'remove';
  const nodes: string[] = [];
  for (const item of children) {
    if (item.attrs.action !== action) throw badRequest(`items of an iq ${type} have action='${action}'`);
    const node = item.attrs.node;
    if (typeof node !== 'string' || node === '') throw badRequest('an item needs a node');
    if (!nodes.includes(node)) nodes.push(node);
  }
  return { action, nodes };
}

/** A page of headers as XEP-0059 asks for it. */
export type HeadersPageRequest = PageRequest;

export function decodePageRequest(query: Element): HeadersPageRequest {
  const page = decodeRsm(query, { defaultMax: DEFAULT_HEADERS_PAGE, maxMax: MAX_HEADERS_PAGE });
  // XEP-0059 §2.6: page jumping MAY be refused with feature-not-implemented when deriving a UID
  // from an index is resource intensive; here it would mean reading every earlier item.
  if (page.index !== undefined && page.index !== 0) {
    throw new StanzaError('cancel', 'feature-not-implemented', 'Page with after or before');
  }
  return page;
}

// ---------------------------------------------------------------------------------------------
// Decide

/**
 * XEP-0013 §2.3: "If the requester is a JID other than an authorized resource of the user [...]
 * the server MUST return a <forbidden/> error." Checked before anything else, so the shape of a
 * request to another user's inbox tells nothing either.
 */
function inboxOwner(request: IqRequest): string {
  const owner = bareJid(request.from);
  if (request.to.local && bareJid(request.to) !== owner) {
    throw new StanzaError('auth', 'forbidden', 'Only the account’s own resources read its offline messages');
  }
  return owner;
}

/**
 * XEP-0013 §2.2: after a disco request on the node (and §2.5 after a fetch) the server "MUST NOT
 * send a flood of offline messages if the user subsequently sends initial presence [...] if the
 * user authenticates and provides presence for another resource while the first (non-flood)
 * resource still has an active session, the server MUST NOT flood the second resource". The
 * stream's own state covers the first; the resource record, which other sessions' flood reads
 * and which ends with the session, covers the second.
 */
async function chooseFlexibleRetrieval(stream: BoundStream): Promise<void> {
  if (stream.state.flexibleOffline) return;
  stream.update({ flexibleOffline: true });
  const { user, resource } = stream.state;
  if (user && resource) await stream.server.sessions.markFlexibleOffline(user, resource, stream.connectionId);
}

/** The stored messages of every node, or item-not-found if any does not exist (or has expired). */
async function existingMessages(server: Server, user: string, nodes: string[]): Promise<OfflineMessage[]> {
  // XEP-0013 §2.3/§2.4: "If the requester is authorized but the node does not exist, the server
  // MUST return an <item-not-found/> error." All nodes are checked before anything is sent or removed.
  const notFound = () => new StanzaError('cancel', 'item-not-found', 'No such offline message');
  if (nodes.some((node) => !OFFLINE_ID.test(node))) throw notFound();
  const found = await server.offline.get(user, nodes);
  const messages: OfflineMessage[] = [];
  for (const node of nodes) {
    const message = found.get(node);
    if (!message) throw notFound();
    messages.push(message);
  }
  return messages;
}

export interface HeadersPage {
  messages: OfflineMessage[];
  /** The maintained counter: approximate (XEP-0059 §2.1 allows it) until TTL-expired items are recounted. */
  count: number;
  /** Position of the first message, when it is known without reading earlier items. */
  firstIndex?: number;
}

/**
 * One page of headers: the counter and one key-ordered Query. Backwards pages (`<before/>`) read
 * newest first from their bound and are returned oldest first. The page stops early when its
 * items would not fit `budgetBytes`, keeping the items nearest the cursor.
 */
export async function headersPage(
  server: Server,
  user: string,
  page: HeadersPageRequest,
  budgetBytes: number,
): Promise<HeadersPage> {
  // XEP-0059 §2.4: UIDs in after/before that cannot exist name no page: item-not-found. Ids that
  // existed and were removed are fine, since the order of ids tells where the next page starts.
  const cursor = page.after ?? page.before;
  if (cursor !== undefined && !OFFLINE_ID.test(cursor)) {
    throw new StanzaError('cancel', 'item-not-found', 'No such item in the offline message list');
  }
  const backwards = page.before !== undefined || page.lastPage;
  const [counted, listed] = await Promise.all([
    server.offline.count(user),
    page.max === 0
      ? { messages: [] }
      : !page.rsm
        ? listWithin(server, user, budgetBytes)
        : server.offline.list(user, {
            limit: page.max,
            after: page.after,
            before: page.before,
            newestFirst: backwards,
          }),
  ]);
  // A listing from the start that reached the end is the inbox itself: the counter may still
  // count messages DynamoDB's TTL removed (recounted only at the quota), and §2.3's "If there are
  // no offline messages for this user, the server MUST return an empty query" needs the truth.
  const whole =
    page.max !== 0 &&
    !backwards &&
    page.after === undefined &&
    page.before === undefined &&
    'next' in listed &&
    listed.next === undefined;
  const count = whole ? listed.messages.length : counted;
  const messages: OfflineMessage[] = [];
  let bytes = 0;
  for (const message of listed.messages) {
    bytes += Buffer.byteLength(headerItem(user, message).toString());
    if (bytes > budgetBytes) break;
    messages.push(message);
  }
  if (backwards) messages.reverse();
  let firstIndex: number | undefined;
  if (page.lastPage) firstIndex = Math.max(0, count - messages.length);
  else if (!backwards && page.after === undefined) firstIndex = 0;
  return { messages, count, firstIndex };
}

/**
 * XEP-0013 §2.3, a request without `<set/>`: "The server now MUST return headers for all of the
 * user's offline messages", as many as one reply can carry: the inbox read oldest first, a
 * Query of MAX_HEADERS_PAGE at a time, until the headers fill `budgetBytes` or the inbox ends.
 */
async function listWithin(
  server: Server,
  user: string,
  budgetBytes: number,
): Promise<{ messages: OfflineMessage[]; next?: string }> {
  const messages: OfflineMessage[] = [];
  let bytes = 0;
  let after: string | undefined;
  for (;;) {
    const listed = await server.offline.list(user, {
      limit: MAX_HEADERS_PAGE,
      ...(after === undefined ? {} : { after }),
    });
    messages.push(...listed.messages);
    for (const message of listed.messages) bytes += Buffer.byteLength(headerItem(user, message).toString());
    if (listed.next === undefined || bytes > budgetBytes) return { messages, next: listed.next };
    after = listed.next;
  }
}

/** What a headers reply may spend on items: the message limit less everything around them. */
function headersBudget(request: IqRequest): number {
  const echoed = [request.stanza.attrs.id, request.stanza.attrs.from, request.stanza.attrs.to];
  const envelope = echoed.reduce((sum: number, text) => sum + Buffer.byteLength(String(text ?? '')) * 6, 0);
  return POST_LIMIT_BYTES - ENVELOPE_BYTES - envelope;
}

// ---------------------------------------------------------------------------------------------
// Handlers

/** XEP-0013 §2.2: the number of messages, as XEP-0128 extended disco#info on the node. */
async function countInfo(server: Server, request: IqRequest): Promise<Element> {
  const user = inboxOwner(request);
  await chooseFlexibleRetrieval(request.stream);
  return countElement(await server.offline.count(user));
}

/** XEP-0013 §2.3: one disco item per message, oldest first, paged with XEP-0059. */
async function headers(server: Server, request: IqRequest): Promise<Element> {
  const user = inboxOwner(request);
  const pageRequest = decodePageRequest(request.payload);
  const page = await headersPage(server, user, pageRequest, headersBudget(request));
  await chooseFlexibleRetrieval(request.stream);
  return headersElement(user, page, pageRequest.rsm);
}

async function command(
  server: Server,
  request: IqRequest,
): Promise<Element | undefined | typeof DEFERRED_RESULT> {
  const user = inboxOwner(request);
  const { stream } = request;
  const decoded = decodeCommand(request.type, request.payload);
  switch (decoded.action) {
    case 'view': {
      // As many nodes as a view with stream management may name (MAX_REQUESTED_TRANSFER_BYTES),
      // without it too: each is a stored message read and posted whole (up to 64 KB) from this
      // one invocation, and a 64 KB frame could name a thousand. RFC 6120 §8.3.3.12: ask for fewer.
      if (Buffer.byteLength(JSON.stringify(decoded.nodes)) > MAX_REQUESTED_TRANSFER_BYTES)
        throw new StanzaError(
          'modify',
          'not-acceptable',
          'too many messages asked for at once: ask for fewer',
        );
      // XEP-0013 §2.3: "the server MUST send the requested message(s) plus an IQ result".
      const messages = await existingMessages(server, user, decoded.nodes);
      if (stream.state.sm) {
        // Paced by acks, as a fetch is: the result follows the last message.
        await startTransfer(stream, {
          kind: 'view',
          nodes: messages.map((message) => message.id),
          iqId: request.stanza.attrs.id,
          ...(request.stanza.attrs.to ? { iqFrom: request.stanza.attrs.to } : {}),
        });
        return DEFERRED_RESULT;
      }
      await deliverCopies(stream, messages);
      return undefined;
    }
    case 'remove': {
      // A redelivery of a remove whose first attempt began removing (recorded before the first
      // delete): the nodes it removed are gone, and the request was valid; what is left goes too.
      const begun = stream.frameId !== '' && stream.state.offlineRemoving === stream.frameId;
      if (!begun) {
        refuseWhileDelivering(stream);
        await existingMessages(server, user, decoded.nodes);
        if (stream.frameId !== '') {
          stream.update({ offlineRemoving: stream.frameId });
          await stream.commit();
        }
      }
      await server.offline.remove(user, decoded.nodes);
      // Saved with the frame's done mark: a later frame finds nothing recorded.
      if (stream.state.offlineRemoving !== undefined) stream.update({ offlineRemoving: undefined });
      return undefined;
    }
    case 'fetch': {
      // XEP-0013 §2.5: "the semantics here are the same as for requesting message headers".
      await chooseFlexibleRetrieval(stream);
      if (stream.state.sm) {
        // Paced by acks so the SM queue never overflows; the result follows the last message.
        await startTransfer(stream, {
          kind: 'fetch',
          iqId: request.stanza.attrs.id,
          ...(request.stanza.attrs.to ? { iqFrom: request.stanza.attrs.to } : {}),
        });
        return DEFERRED_RESULT;
      }
      await fetchAll(stream, user);
      return undefined;
    }
    case 'purge':
      refuseWhileDelivering(stream);
      await server.offline.purge(user);
      return undefined;
  }
}

/**
 * A remove or purge asked for while this stream's fetch or view (paced by stream-management
 * acks) is still being delivered, or waits its turn: RFC 6120 §10.1 has the stanzas of a stream
 * processed in order, so the earlier fetch's "the server MUST retrieve all messages" (§2.5), or
 * the view's "the requested message(s) plus an IQ result" (§2.3), comes first. Done now, it
 * would remove what that request has not sent yet, which its result would then call complete.
 * Refused instead: RFC 6120 §8.3.3.22 <unexpected-request/>, "the request was out of order",
 * type wait (retry once the earlier request is answered).
 */
function refuseWhileDelivering(stream: BoundStream): void {
  const transfer = stream.state.transfer;
  if (!transfer) return;
  if (![transfer, ...(transfer.waiting ?? [])].some((t) => t.kind === 'fetch' || t.kind === 'view')) return;
  throw new StanzaError(
    'wait',
    'unexpected-request',
    'A fetch or view of offline messages is still being delivered; try again once it is answered',
  );
}

/**
 * Sends copies of stored messages to the requesting session. XEP-0013 §2.4: "A server MUST NOT
 * remove a message simply because it has been requested by and delivered to the user". Returns
 * false when the connection went away on the way (nothing else is lost: nothing was removed).
 */
async function deliverCopies(stream: BoundStream, messages: OfflineMessage[]): Promise<boolean> {
  for (const message of messages) {
    // One that can never be sent is dropped with a warning, as the flood and the paced
    // transfers drop it, instead of failing this request and every later one on it.
    const result = await sendStored(stream, message, deliveredCopy(stream.server, message), {
      offlineCopy: true,
    });
    if (result !== 'sent' && result !== 'dropped') return false;
  }
  return true;
}

/** Every message, oldest first, read page by page (the next page is read while one is sent). */
async function fetchAll(stream: BoundStream, user: string): Promise<void> {
  const { offline } = stream.server;
  let page = await offline.list(user, { limit: FETCH_PAGE });
  for (;;) {
    const next = page.next ? offline.list(user, { limit: FETCH_PAGE, after: page.next }) : undefined;
    // Observed here so a failed read-ahead is never an unhandled rejection when a send fails first.
    next?.catch(() => {});
    if (!(await deliverCopies(stream, page.messages)) || !next) return;
    page = await next;
  }
}

// ---------------------------------------------------------------------------------------------
// Encode

export function countElement(count: number): Element {
  const query = new Element('query', { xmlns: NS.discoInfo, node: NODE });
  // XEP-0013 §4.2: "message-list: The node for the offline message queue".
  query.c('identity', { category: 'automation', type: 'message-list' });
  query.c('feature', { var: NS.offline });
  const form = query.c('x', { xmlns: NS.dataForms, type: 'result' });
  form.c('field', { var: 'FORM_TYPE', type: 'hidden' }).c('value').t(NS.offline);
  form.c('field', { var: 'number_of_messages' }).c('value').t(String(count));
  return query;
}

/**
 * XEP-0013 §2.3: "the header information provided MUST include the full Jabber ID of the sender
 * (encoded in the 'name' attribute) and a unique identifier for the message [...] (encoded in the
 * 'node' attribute)"; "The 'jid' attribute is [...] the user himself."
 */
function headerItem(user: string, message: OfflineMessage): Element {
  return new Element('item', { jid: user, node: message.id, name: message.from });
}

export function headersElement(user: string, page: HeadersPage, rsm: boolean): Element {
  const query = new Element('query', { xmlns: NS.discoItems, node: NODE });
  for (const message of page.messages) query.cnode(headerItem(user, message));
  // XEP-0013 §2.3: "If there are no offline messages for this user, the server MUST return an
  // empty query"; XEP-0059 §2.3 agrees for an empty full result set.
  if (page.count === 0 && page.messages.length === 0) return query;
  if (!rsm && page.messages.length === page.count && page.firstIndex === 0) {
    // Everything fits in this reply: the seed's shape, without paging.
    return query;
  }
  query.cnode(
    encodePageReply({
      first: page.messages[0]?.id,
      last: page.messages.at(-1)?.id,
      firstIndex: page.firstIndex,
      count: page.count,
    }),
  );
  return query;
}
