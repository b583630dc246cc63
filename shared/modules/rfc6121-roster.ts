/**
 * RFC 6121 §2–4: the roster (`jabber:iq:roster`, §2) with roster versioning
 * (`urn:xmpp:features:rosterver`, §2.6) and pre-approval (`urn:xmpp:features:pre-approval`,
 * §3.4), presence subscriptions (§3, Appendix A), and presence between contacts (§4: broadcast
 * to subscribers, probes at initial presence, unavailable when a session ends in any way).
 *
 * The decisions are pure functions in `rfc6121-roster/` (codec, Appendix A state machine,
 * recipients); the rows are in `store/roster.ts`; this file joins them to the host: iq
 * handlers, hooks on `presence/*` for subscription stanzas and probes, on
 * `availability-changed` and `session-ended` for contacts' presence, and the `account-access`
 * item the router asks before answering for another user's account.
 *
 * Local users only: a contact of another domain is kept in the roster, and every stanza the
 * server would route there is answered with <remote-server-not-found/> (RFC 6120 §10.4.3), as
 * for a server that cannot be reached.
 */
import { randomBytes } from 'node:crypto';
import { clone, Element, parse } from 'ltx';
import { deliver, deliverToMany, eachLimited, FAN_OUT_CONCURRENCY } from '../core/delivery.ts';
import {
  type BoundStream,
  DEFERRED_RESULT,
  type DeliveryResult,
  HANDLED,
  type HookResult,
  type IqRequest,
  type Server,
  type StanzaEvent,
} from '../core/host.ts';
import { iqResult, stampDelay } from '../core/stanzas.ts';
import { StanzaError } from '../errors.ts';
import { bareJid, fullJid, fullJidOf } from '../jid.ts';
import {
  fitsContactKey,
  type PairDecision,
  type PairResult,
  type PairSnapshot,
  type Roster,
  RosterContentionError,
  type RosterEntry,
  RosterFullError,
  type SideResult,
} from '../store/roster.ts';
import type { LastUnavailable, ResourceRecord, Revocation } from '../store/sessions.ts';
import {
  answerProbe,
  mayQueryAccount,
  pendingRequestsToRedeliver,
  presenceSubscribers,
  probeTargets,
} from './rfc6121-roster/presence-recipients.ts';
import {
  decideRosterGet,
  decodeRosterGet,
  decodeRosterSet,
  encodeRosterPush,
  encodeRosterResult,
  entryAfterSet,
  NS_ROSTER,
  rosterItemElement,
  rosterStreamFeatures,
} from './rfc6121-roster/roster-management.ts';
import {
  answerForUnknownAccount,
  contactReceivesSubscription,
  contactSeesRemoval,
  type InboundOutcome,
  type OutboundOutcome,
  type PresenceEffect,
  removalStanzas,
  type SubscriptionStanza,
  userSendsSubscription,
} from './rfc6121-roster/subscription-states.ts';

/** RFC 6121 §3.4.1: this server supports pre-approvals and says so in its stream features. */
const PRE_APPROVAL = true;

const SUBSCRIPTION_TYPES = new Set<string>(['subscribe', 'subscribed', 'unsubscribe', 'unsubscribed']);

export function register(server: Server): void {
  const { host } = server;
  host.hook('stream-features', ({ stream, features }) => {
    // Offered with bind, after authentication (§2.6.1, §3.4.1).
    if (!stream.user || stream.state.resource) return undefined;
    for (const feature of rosterStreamFeatures({ preApproval: PRE_APPROVAL })) features.cnode(feature);
    return undefined;
  });

  const rosterIq =
    (handler: (request: IqRequest) => Promise<Element | undefined | typeof DEFERRED_RESULT>) =>
    async (request: IqRequest) => {
      // §2.1.5 / §2.3.3: "The server MUST return a <forbidden/> stanza error to the client if the
      // sender of the roster set is not authorized to update the roster (where typically only an
      // authenticated resource of the account itself is authorized)." The same answer for an
      // account that does not exist, so the roster tells nothing about other accounts.
      if (request.to.local && bareJid(request.to) !== request.stream.user) {
        throw new StanzaError('auth', 'forbidden', 'Only the account itself may read or change its roster');
      }
      try {
        return await handler(request);
      } catch (error) {
        throw asStanzaError(error, request.stream.user);
      }
    };
  // The roster is the account's, never the server's: one addressed to the domain is
  // service-unavailable (RFC 6120 §8.2.3, no such payload there), as Prosody answers it.
  host.iq('get', NS_ROSTER, 'query', rosterIq(rosterGet), {
    answersForAnyAccount: true,
    targets: ['account'],
  });
  host.iq('set', NS_ROSTER, 'query', rosterIq(rosterSet), {
    answersForAnyAccount: true,
    targets: ['account'],
  });

  for (const target of ['bare', 'full', 'host'] as const) {
    // Above the presence module (priority 0), which only knows the user's own resources.
    host.hook(`presence/${target}`, (event) => subscriptionOrProbe(event), { priority: 10 });
  }
  host.hook('availability-changed', async ({ stream, stanza, available, initial }) => {
    await contactsOnAvailability(stream, stanza, available, initial);
    return undefined;
  });
  host.hook(
    'session-ended',
    async ({ session, wasAvailable }) => {
      if (!wasAvailable) return undefined;
      const from = fullJid(fullJidOf(session.user, session.resource));
      const told = await broadcastToSubscribers(
        server,
        session.user,
        (to) => new Element('presence', { from, to, type: 'unavailable' }),
      );
      // The presence module tells directed-presence recipients next: not those told here.
      if (session.directedTo) session.directedTo = notTold(session.directedTo, told);
      return undefined;
    },
    { priority: 10 },
  );

  host.hook(
    'stream-revoked',
    async (event) => {
      const told = await tellOfDeletion(server, event.user, event.resource, event.revocation);
      // The presence module tells directed-presence recipients next: not those told here.
      if (event.directedTo) event.directedTo = notTold(event.directedTo, told);
      return undefined;
    },
    { priority: 10 },
  );

  host.add('account-access', async (requester, account) =>
    mayQueryAccount(requester, account, await server.roster.getEntry(account, requester)),
  );
}

function asStanzaError(error: unknown, requester: string): unknown {
  if (error instanceof RosterFullError) {
    // Another user's roster is not described (its size, its pending requests) to the sender.
    if (error.owner !== requester)
      return new StanzaError('cancel', 'not-allowed', 'The contact cannot take this request');
    return new StanzaError(
      'cancel',
      'not-allowed',
      error.kind === 'bytes'
        ? `Your roster is full (its items may take at most ${error.limit} bytes, to fit one roster result)`
        : `Your roster is full (at most ${error.limit} ${error.kind === 'items' ? 'items' : 'pending requests'})`,
    );
  }
  if (error instanceof RosterContentionError) {
    return new StanzaError('wait', 'resource-constraint', 'The roster is being changed; try again');
  }
  return error;
}

/* ------------------------------------------------------------------------------------------
 * §2 roster get and set, and pushes
 * ---------------------------------------------------------------------------------------- */

async function rosterGet(request: IqRequest): Promise<Element | undefined | typeof DEFERRED_RESULT> {
  const { stream } = request;
  const { server } = stream;
  // §2.1.6: "An interested resource is a resource that has requested the roster"; marked before
  // the roster is read, so a change made meanwhile reaches it as a push.
  if (!stream.state.rosterInterested) {
    await server.sessions.markRosterInterested(stream.user, stream.resource, stream.connectionId);
    stream.update({ rosterInterested: true });
  }
  const get = decodeRosterGet(request.payload);
  // §2.6.3: the version alone (one GetItem) tells whether the client's cache is current. Read in
  // any case: it is the version before the roster's read (see pushChangedSince).
  const before = await server.roster.getVersion(stream.user);
  if (get.ver && decideRosterGet(get, before).kind === 'unchanged') return undefined;
  const roster = await server.roster.getRoster(stream.user);
  const result = encodeRosterResult(decideRosterGet(get, roster.version), roster.items);
  await stream.send(iqResult(request.stanza, result));
  await pushChangedSince(stream, before, roster);
  return DEFERRED_RESULT;
}

/**
 * A change committed after the roster was read is missing from the result, and its push to this
 * (already interested) resource may have gone out before the result, which the client then let
 * overwrite it (RFC 6121 §2.1.6: the roster stays right through pushes alone). So is one that
 * landed while the Query ran, after it had passed the item but before the version (which sorts
 * last): the result then names a version whose item it lacks. So once the result is sent, the
 * version is read again (one GetItem); when it moved since the version read before the roster
 * (`before`), the items that changed since the read are pushed again to this resource, after the
 * result, each with the result's version but the last, which carries the current one (a client
 * cut off half-way asks again with the older version, and gets the whole roster). A push twice is
 * harmless.
 */
async function pushChangedSince(stream: BoundStream, before: string, read: Roster): Promise<void> {
  const { server } = stream;
  if (read.version === before && (await server.roster.getVersion(stream.user)) === before) return;
  const now = await server.roster.getRoster(stream.user);
  const shown = (items: RosterEntry[]) =>
    new Map(
      items
        .filter((entry) => entry.listed)
        .map((entry) => [entry.contact, rosterItemElement(entry).toString()]),
    );
  const was = shown(read.items);
  const is = shown(now.items);
  const changed = [...is].filter(([jid, item]) => was.get(jid) !== item).map(([jid]) => jid);
  const removed = [...was.keys()].filter((jid) => !is.has(jid));
  const entries = new Map(now.items.map((entry) => [entry.contact, entry]));
  const contacts = [...changed, ...removed];
  for (const [i, contact] of contacts.entries()) {
    await stream.send(
      encodeRosterPush({
        user: stream.user,
        to: fullJid(stream.jid),
        id: `push-${randomBytes(6).toString('hex')}`,
        contact,
        entry: entries.get(contact) ?? null,
        ver: i === contacts.length - 1 ? now.version : read.version,
      }),
    );
  }
}

/**
 * server.roster.apply for the frame being handled, once: the outcome is written to the
 * connection's row in the change's own transaction. A redelivery of the frame (it failed after
 * the change: a push, a delivery, the invocation's time) takes that outcome and does the rest
 * from it; deciding again would find the change made and do nothing, answer a removal with
 * item-not-found, and never tell the contact.
 */
async function applyOnce<T>(
  stream: BoundStream,
  contact: string,
  contactIsLocal: boolean,
  decide: (pair: PairSnapshot) => PairDecision<T> | Promise<PairDecision<T>>,
): Promise<PairResult<T>> {
  const { server, frameId, state } = stream;
  if (frameId && state.rosterFrame === frameId && state.rosterApplied) {
    const applied = JSON.parse(state.rosterApplied) as { contact: string; result: PairResult<T> };
    if (applied.contact === contact) {
      server.log.info('roster change found made by an earlier attempt of the frame', { contact });
      return applied.result;
    }
  }
  return server.roster.apply<T>(
    stream.user,
    contact,
    {
      contactIsLocal,
      ...(frameId
        ? {
            record: (result: PairResult<T>) =>
              server.sessions.rosterAppliedRecord(
                stream.connectionId,
                frameId,
                JSON.stringify({ contact, result }),
              ),
          }
        : {}),
    },
    decide,
  );
}

async function rosterSet(request: IqRequest): Promise<Element | undefined> {
  const { stream } = request;
  const { server } = stream;
  const set = decodeRosterSet(request.payload, stream.user);
  if (set.kind === 'update') {
    const result = await applyOnce(stream, set.contact, false, (pair) => ({
      user: entryAfterSet(pair.user, set),
      outcome: undefined,
    }));
    // §2.3.2: the push goes to every interested resource, the requester's included; then the
    // result. §2.4.2: "the server MUST update the item ..., push the updated item to all of the
    // user's interested resources, and send an IQ result": a set that changes nothing is pushed
    // too (a client may wait for its push), with the version it leaves.
    await pushRosterItem(server, stream.user, set.contact, result.user, { always: true });
    return undefined;
  }
  await removeContact(stream, set.contact);
  return undefined;
}

/**
 * §3.1.6, §3.2.3, §3.3.3: the contact's server delivers the subscription stanzas to `recipients`
 * first, then pushes the contact's changed item about `user` (to its interested resources,
 * `listed` when read already for the recipients: one Query for both).
 */
async function deliverThenPush(
  server: Server,
  contact: string,
  user: string,
  recipients: ResourceRecord[],
  stanzas: () => Element[],
  item: SideResult | undefined,
  listed: ResourceRecord[] | undefined,
): Promise<void> {
  if (recipients.length > 0) await deliverToMany(server, recipients, stanzas);
  if (item) await pushRosterItem(server, contact, user, item, listed ? { resources: listed } : {});
}

/**
 * §2.1.6 roster push: the changed item, with the new version, to each interested resource of
 * `user` (one Query on the user's resources). Their answers (results) are dropped by the router.
 */
async function pushRosterItem(
  server: Server,
  user: string,
  contact: string,
  side: SideResult,
  options: {
    /** Push the item even if it did not change (a client's own roster set, §2.4.2). */
    always?: boolean;
    /** The user's resources as just read (`listResources`), saving the Query. */
    resources?: ResourceRecord[];
  } = {},
): Promise<void> {
  if (!side.itemChanged && !(options.always && side.after)) return;
  const resources = options.resources ?? (await server.sessions.listResources(user));
  const interested = resources.filter((r) => r.rosterInterested);
  await eachLimited(interested, FAN_OUT_CONCURRENCY, async (resource) => {
    const push = encodeRosterPush({
      user,
      to: `${user}/${resource.resource}`,
      id: `push-${randomBytes(6).toString('hex')}`,
      contact,
      entry: side.after,
      // §2.6.3's empty answer to a current `ver` relies on every push having reached the client:
      // one that was refused makes the versions of the later ones a lie (rosterStale).
      ver: resource.rosterStale ?? side.version,
    });
    let result: DeliveryResult;
    try {
      result = await deliver(server, resource, push);
    } catch (error) {
      if (error instanceof StanzaError) return;
      throw error;
    }
    // Refused by a congested stream-management queue (a client slow to acknowledge): the push
    // is not kept, so the client's cache goes without it; its later pushes carry a version no
    // roster has, and its next versioned roster get answers with the whole roster.
    if (result === 'full' && resource.smId && resource.rosterStale === undefined)
      await server.sessions.markRosterStale(
        user,
        resource.resource,
        resource.smId,
        `${side.version}-incomplete`,
      );
  });
}

/**
 * §2.5 roster delete: "the user's server MUST ... send a presence stanza of type 'unsubscribe'
 * to the contact" when the user is subscribed (or asked to be), "'unsubscribed'" when the
 * contact is (or asked to be), push the removal, and, where a subscription ends, the
 * unavailable presence §3.2.2 and §3.3.3 require, both ways.
 */
async function removeContact(stream: BoundStream, contact: string): Promise<void> {
  const { server } = stream;
  const user = stream.user;
  const kind = await contactKind(server, contact);
  const result = await applyOnce(stream, contact, kind === 'account', (pair) => {
    // §2.5.3: "If the value of the 'jid' attribute specifies an item that is not in the roster,
    // then the server MUST return an <item-not-found/> stanza error."
    if (!pair.user?.listed) throw new StanzaError('cancel', 'item-not-found');
    const stanzas = removalStanzas(pair.user);
    const seen = kind === 'account' ? contactSeesRemoval(pair.contact, user, stanzas) : undefined;
    return {
      user: null,
      contact: seen ? seen.entry : undefined,
      outcome: { before: pair.user as RosterEntry, stanzas, seen },
    };
  });
  await pushRosterItem(server, user, contact, result.user);
  const { before, stanzas, seen } = result.outcome;
  if (!seen) return;
  const online = await server.sessions.availableResourcesOf([user, contact]);
  const contactResources = online.get(contact) ?? [];
  const userResources = online.get(user) ?? [];
  // §3.2.2: the user cancelled the contact's subscription: "While the user is still subscribed
  // to the contact's presence (i.e., before the contact's server routes or delivers the presence
  // stanza of type 'unsubscribed' to the user), the contact's server MUST send a presence stanza
  // of type 'unavailable' from all of the contact's online resources to the user" (the roles
  // named the other way round there: here the user cancels).
  if (stanzas.includes('unsubscribed') && hasFrom(before)) {
    await sendPresenceOf(server, userResources, contactResources, 'unavailable');
  }
  const contactListed = seen.deliver.length > 0 ? await server.sessions.listResources(contact) : undefined;
  await deliverThenPush(
    server,
    contact,
    user,
    contactListed ? subscriptionRecipients(contactResources, contactListed) : [],
    () => seen.deliver.map((type) => subscriptionStanza(type, user, contact)),
    result.contact,
    contactListed,
  );
  // §3.3.3: the contact's server, on the 'unsubscribe', sends the contact's unavailable presence
  // to the user.
  if (seen.presence === 'unavailable') {
    await sendPresenceOf(server, contactResources, userResources, 'unavailable');
  }
}

/* ------------------------------------------------------------------------------------------
 * §3 subscriptions and §4.3 probes sent by a client
 * ---------------------------------------------------------------------------------------- */

type ContactKind = 'account' | 'no-account' | 'remote';

/** Where a contact lives: a local account, a local JID without an account, another domain. */
async function contactKind(server: Server, contact: string): Promise<ContactKind> {
  return (await contactAccount(server, contact, false)).kind;
}

/**
 * contactKind, and with `created` the account's creation time. Read strongly consistent either
 * way: a subscribe to an account created a moment ago must not be answered `unsubscribed` on its
 * behalf (§3.1.3 allows that only for no account), nor one to an account deleted a moment ago
 * leave a request in its roster.
 */
async function contactAccount(
  server: Server,
  contact: string,
  created: boolean,
): Promise<{ kind: ContactKind; createdAt?: number }> {
  const at = contact.indexOf('@');
  const domain = contact.slice(at + 1);
  if (domain !== server.config.domain) return { kind: 'remote' };
  if (at < 0) return { kind: 'no-account' };
  const createdAt = await server.users.createdAtOf(contact);
  if (!created) return { kind: createdAt === undefined ? 'no-account' : 'account' };
  return createdAt === undefined ? { kind: 'no-account' } : { kind: 'account', createdAt };
}

function remoteUnreachable(): StanzaError {
  // RFC 6120 §10.4.3: the server cannot reach the remote domain (no server-to-server here).
  return new StanzaError('cancel', 'remote-server-not-found', 'Server-to-server is not available');
}

async function subscriptionOrProbe(event: StanzaEvent): Promise<HookResult> {
  const { stream, stanza } = event;
  const type = stanza.attrs.type as string | undefined;
  if (type === undefined || (!SUBSCRIPTION_TYPES.has(type) && type !== 'probe')) return undefined;
  // No `to`: the presence module drops it (nobody to subscribe to).
  if (event.self) return undefined;
  // §3.1.3: a subscription request to a full JID is treated as directed to the bare JID.
  const contact = bareJid(event.to);
  // Nothing to subscribe to or probe: the user's own presence reaches the user's resources.
  if (contact === stream.user) return HANDLED;
  if (type === 'probe') await probe(stream, contact);
  else await subscription(stream, stanza, contact, type as SubscriptionStanza);
  return HANDLED;
}

/** §3.1.2 (and §3.2–3.4 alike): the stanza as it leaves the user's server, from the bare JID. */
function stamped(stanza: Element, user: string, contact: string): Element {
  const copy = clone(stanza);
  // §3.1.2: "the user's server MUST stamp the outbound subscription request with the bare JID
  // <user@domainpart> of the user"; the contact is addressed by its bare JID too (§3.1.3).
  copy.attrs.from = user;
  copy.attrs.to = contact;
  return copy;
}

/**
 * What is kept of a pending "subscribe" (§3.1.3) to be delivered again at each initial
 * presence: the stanza as received up to KEPT_REQUEST_BYTES (a status or XEP-0172 nick), its
 * bare form beyond. Every login and every broadcast reads the whole roster partition, pending
 * requests included: a stranger's request must not make them megabytes.
 */
const KEPT_REQUEST_BYTES = 2048;

function requestToKeep(stanza: Element): string {
  const whole = stanza.toString();
  if (Buffer.byteLength(whole) <= KEPT_REQUEST_BYTES) return whole;
  // The bare form keeps only what a request is (an attribute of 30 KB would be kept whole else).
  const kept: Record<string, string> = {};
  for (const name of KEPT_REQUEST_ATTRIBUTES) {
    const value = stanza.attrs[name];
    if (typeof value === 'string') kept[name] = value;
  }
  const bare = new Element('presence', kept);
  // An id or language of kilobytes goes too.
  if (Buffer.byteLength(bare.toString()) > KEPT_REQUEST_BYTES) {
    delete kept.id;
    delete kept['xml:lang'];
  }
  return new Element('presence', kept).toString();
}

/** The attributes of a request's bare form: from and to are JIDs (at most 3 KB each, bare here). */
const KEPT_REQUEST_ATTRIBUTES = ['xmlns', 'from', 'to', 'type', 'id', 'xml:lang'] as const;

function subscriptionStanza(type: SubscriptionStanza, from: string, to: string): Element {
  return new Element('presence', { from, to, type });
}

interface PairOutcome {
  out: OutboundOutcome;
  inbound?: InboundOutcome;
  /** The contact's server answered itself (A.3.1 auto-reply, pre-approval, unknown account). */
  reply?: { type: SubscriptionStanza; atUser: InboundOutcome };
}

async function subscription(
  stream: BoundStream,
  stanza: Element,
  contact: string,
  type: SubscriptionStanza,
): Promise<void> {
  const { server } = stream;
  const user = stream.user;
  if (!fitsContactKey(contact))
    throw new StanzaError('modify', 'not-acceptable', 'JID too long for a roster item');
  // RFC 6121 §3.4: a pre-approval is for the contact's account, told apart from one that holds
  // its JID later by its creation time (read for a `subscribed`, and of the requester's account
  // for a `subscribe` to a local account).
  const { kind, createdAt: contactCreatedAt } = await contactAccount(server, contact, type === 'subscribed');
  const requesterCreatedAt =
    type === 'subscribe' && kind === 'account' ? await server.users.createdAtOf(user) : undefined;
  const outgoing = stamped(stanza, user, contact);
  let result: PairResult<PairOutcome>;
  try {
    result = await applyOnce<PairOutcome>(stream, contact, kind === 'account', (pair) => {
      const out = userSendsSubscription(pair.user, contact, type, {
        // A local JID without an account has nobody to approve: whoever gets it later is someone
        // the user has not met, and is asked (the `subscribed` is dropped, as without the feature).
        preApproval: PRE_APPROVAL && kind !== 'no-account',
        ...(contactCreatedAt !== undefined ? { contactCreatedAt } : {}),
      });
      if (!out.route || kind === 'remote') return { user: out.entry, outcome: { out } };
      if (kind === 'no-account') {
        // RFC 6121 §8.5.1 (no such user): a "subscribe" is answered with "unsubscribed" on
        // the would-be contact's behalf; the other three types are ignored.
        const answer = answerForUnknownAccount(type);
        if (!answer) return { user: out.entry, outcome: { out } };
        const atUser = contactReceivesSubscription(out.entry, contact, answer, '');
        return { user: atUser.entry, outcome: { out, reply: { type: answer, atUser } } };
      }
      const inbound = contactReceivesSubscription(
        pair.contact,
        user,
        type,
        requestToKeep(outgoing),
        requesterCreatedAt,
      );
      let userEntry = out.entry;
      let reply: PairOutcome['reply'];
      if (inbound.autoReply) {
        // A.3.1: "Server SHOULD auto-reply with 'subscribed'" (and §3.4 for a pre-approval):
        // the reply reaches the user's server at once, in the same write.
        const atUser = contactReceivesSubscription(userEntry, contact, inbound.autoReply, '');
        userEntry = atUser.entry;
        reply = { type: inbound.autoReply, atUser };
      }
      return { user: userEntry, contact: inbound.entry, outcome: { out, inbound, reply } };
    });
  } catch (error) {
    throw asStanzaError(error, user);
  }
  const { out, inbound, reply } = result.outcome;
  // Who receives a subscription stanza gets it before the roster push it causes (§3.1.6: "This
  // MUST occur before sending the roster push"; §3.2.3, §3.3.3 in the same order). The sender's
  // own push comes first (§3.1.2: "before locally delivering or remotely routing"), unless an
  // answer on the contact's behalf (A.3.1's auto-reply, a pre-approval, an unknown account) is
  // delivered to it too: then one push, after that answer, with the state it leaves.
  const pushUser = () => pushRosterItem(server, user, contact, result.user);
  if (!reply || !out.route || kind === 'remote') await pushUser();
  if (kind === 'remote') {
    if (out.route) throw remoteUnreachable();
    return;
  }
  if (!out.route) return;
  const online = await server.sessions.availableResourcesOf(kind === 'account' ? [user, contact] : [user]);
  const userResources = online.get(user) ?? [];
  const contactResources = online.get(contact) ?? [];
  // §3.2.2: an 'unsubscribed' ends the contact's subscription to the user, who is seen going
  // unavailable "before the contact's server routes or delivers the presence stanza of type
  // 'unsubscribed'" (the RFC names the roles the other way round). Other changes' presence
  // follows the stanza that causes it (§3.1.5: an approval, then the presence).
  const unavailableFirst = out.presence === 'unavailable';
  if (unavailableFirst) await presenceEffect(server, out.presence, userResources, contactResources);
  const contactListed =
    inbound?.deliver && type !== 'subscribe' ? await server.sessions.listResources(contact) : undefined;
  // §3.1.3: a "subscribe" is delivered to the contact's available resources now, also kept
  // (Pending In) and delivered again at the contact's next initial presence until answered.
  // The other three go to its interested resources (§3.1.6, §3.2.3, §3.3.3), which get the push.
  await deliverThenPush(
    server,
    contact,
    user,
    !inbound?.deliver
      ? []
      : contactListed
        ? subscriptionRecipients(contactResources, contactListed)
        : contactResources,
    () => [clone(outgoing)],
    result.contact,
    contactListed,
  );
  if (reply) {
    const userListed = reply.atUser.deliver ? await server.sessions.listResources(user) : undefined;
    if (userListed) {
      const recipients = subscriptionRecipients(userResources, userListed);
      await deliverToMany(server, recipients, () => subscriptionStanza(reply.type, contact, user));
    }
    await pushRosterItem(server, user, contact, result.user, userListed ? { resources: userListed } : {});
  }
  // The presence that follows a change (the appendix's tables say who is subscribed now).
  if (!unavailableFirst) await presenceEffect(server, out.presence, userResources, contactResources);
  await presenceEffect(server, inbound?.presence, contactResources, userResources);
  if (reply?.type === 'subscribed' && inbound?.presence !== 'available') {
    // The contact approved (already approved, A.3.1): §3.1.5, its resources' presence goes to the
    // user. A pre-approval's own transition sent it just above (once: §3.1.5 "current presence
    // … from each of the contact's available resources").
    await sendPresenceOf(server, contactResources, userResources, 'available');
  }
}

/**
 * Who gets an inbound 'subscribed', 'unsubscribed' or 'unsubscribe': §3.1.6 "Deliver the inbound
 * subscription approval to all of the user's interested resources (this MUST occur before
 * sending the roster push)", §3.2.3 and §3.3.3 alike: the resources that requested the roster,
 * whether or not they sent presence yet, as the push that follows goes to them. The available
 * ones that never asked for the roster get it too, as before session 30 (a client that shows
 * presence may still tell its user "approved"). `listed`: the user's resources (`listResources`,
 * one Query, only for these three stanzas; the push after the stanza takes the same list).
 */
function subscriptionRecipients(available: ResourceRecord[], listed: ResourceRecord[]): ResourceRecord[] {
  const interested = listed.filter(
    (resource) => resource.rosterInterested && !available.some((r) => r.resource === resource.resource),
  );
  return [...available, ...interested];
}

async function presenceEffect(
  server: Server,
  effect: PresenceEffect | undefined,
  from: ResourceRecord[],
  to: ResourceRecord[],
): Promise<void> {
  if (effect) await sendPresenceOf(server, from, to, effect);
}

/**
 * The presence of each of `from` (the last broadcast one, or unavailable) to each of `to`,
 * addressed to the recipient's bare JID as a broadcast is (§4.2.2).
 */
async function sendPresenceOf(
  server: Server,
  from: ResourceRecord[],
  to: ResourceRecord[],
  effect: PresenceEffect,
): Promise<void> {
  if (from.length === 0 || to.length === 0) return;
  await deliverToMany(server, to, (recipient) =>
    from.map((sender) => presenceOfResource(sender, recipient.user, effect)),
  );
}

/**
 * §4.3.2, a contact with no available resource: "a presence stanza of type 'unavailable'" from
 * its bare JID, which "SHOULD include information about the time when the last unavailable
 * presence stanza was generated (formatted using the XMPP delayed delivery extension)" and "MAY
 * include the full XML of the last unavailable presence stanza" (here its children: status,
 * show, extensions). Without a kept one (none in LAST_UNAVAILABLE_KEEP_SECONDS), a bare one.
 */
function unavailableAnswer(
  contact: string,
  to: string,
  last: LastUnavailable | undefined,
  domain: string,
): Element {
  const answer = last?.presence ? parse(last.presence) : new Element('presence');
  answer.attrs = { from: contact, to, type: 'unavailable' };
  return last ? stampDelay(answer, domain, last.at) : answer;
}

function presenceOfResource(sender: ResourceRecord, to: string, effect: PresenceEffect): Element {
  const from = `${sender.user}/${sender.resource}`;
  if (effect === 'unavailable' || !sender.presence) {
    return new Element('presence', { from, to, type: 'unavailable' });
  }
  const stanza = parse(sender.presence);
  stanza.attrs.from = from;
  stanza.attrs.to = to;
  return stanza;
}

/**
 * §4.3 a probe sent by a client (servers send them on a user's behalf; a client may too):
 * answered as the contact's server answers one (§4.3.2).
 */
async function probe(stream: BoundStream, contact: string): Promise<void> {
  const { server } = stream;
  const kind = await contactKind(server, contact);
  if (kind === 'remote') throw remoteUnreachable();
  const entry = kind === 'account' ? await server.roster.getEntry(contact, stream.user) : undefined;
  // §4.3.2: "If the user's bare JID is not in the contact's roster with a subscription state of
  // 'From', 'From + Pending Out', or 'Both', then the contact's server MUST return a presence
  // stanza of type 'unsubscribed'" (and §8.5.1 allows the same for an account that does not exist).
  if (answerProbe(entry) === 'unsubscribed') {
    await stream.send(subscriptionStanza('unsubscribed', contact, fullJid(stream.jid)));
    return;
  }
  const { online, lastUnavailable } = await server.sessions.presenceOf([contact]);
  const resources = online.get(contact) ?? [];
  if (resources.length === 0) {
    // §4.3.2: "if the contact has no available resources, then the server SHOULD reply to the
    // presence probe by sending to the user a presence stanza of type 'unavailable'", with the
    // time of the last one (XEP-0203) and its content where the server kept it.
    await stream.send(
      unavailableAnswer(contact, fullJid(stream.jid), lastUnavailable.get(contact), server.config.domain),
    );
    return;
  }
  for (const resource of resources) {
    await stream.send(presenceOfResource(resource, fullJid(stream.jid), 'available'));
  }
}

/* ------------------------------------------------------------------------------------------
 * §4 presence between contacts
 * ---------------------------------------------------------------------------------------- */

const hasFrom = (entry: RosterEntry) => entry.subscription === 'from' || entry.subscription === 'both';

function isLocal(server: Server, jid: string): boolean {
  return jid.slice(jid.indexOf('@') + 1) === server.config.domain;
}

/**
 * §4.2.2 / §4.4.2 / §4.5.2: the user's broadcast presence goes to every contact subscribed to it
 * (subscription 'from' or 'both'): one Query for the roster, one batch read of those contacts'
 * available resources, one post per resource. Returns the contacts it was addressed to.
 */
async function broadcastToSubscribers(
  server: Server,
  user: string,
  stanzaFor: (to: string) => Element,
): Promise<Told> {
  const roster = await server.roster.getRoster(user);
  const subscribers = presenceSubscribers(roster.items).filter((c) => isLocal(server, c));
  const online = await server.sessions.availableResourcesOf(subscribers);
  const targets = subscribers.flatMap((contact) => online.get(contact) ?? []);
  await deliverToMany(server, targets, (target) => stanzaFor(target.user));
  return toldBy(subscribers, targets);
}

/**
 * An account deleted while its stream was open (infra/account-deletion.ts): the command cancelled
 * the account's subscriptions in the contacts' rosters but could not post, so the stream's end
 * tells the contacts' online clients what an account's own roster removal would have (§2.5.2):
 * the subscription stanzas, then the push of the item as it is now (§3.2.3, §3.3.3), and, from
 * a stream whose resource was available, its unavailable presence to those that had it (§3.2.2,
 * §4.5.2). The revocation names the contacts: the deleted account's roster is gone.
 */
async function tellOfDeletion(
  server: Server,
  user: string,
  resource: string | undefined,
  revocation: Revocation,
): Promise<Told> {
  const notify = revocation.notify ?? [];
  const presenceTo = resource ? (revocation.presenceTo ?? []) : [];
  const online = await server.sessions.availableResourcesOf([...notify.map((n) => n.contact), ...presenceTo]);
  // Contacts in parallel (each contact's own stanzas in order): up to a thousand of them must
  // fit in the frame that ends the stream.
  await eachLimited(notify, FAN_OUT_CONCURRENCY, async ({ contact, deliver }) => {
    const resources = online.get(contact) ?? [];
    for (const type of deliver) {
      if (!isSubscriptionStanza(type)) continue;
      await deliverToMany(server, resources, () => subscriptionStanza(type, user, contact));
    }
    const entry = await server.roster.getEntry(contact, user);
    if (entry?.listed) {
      await pushRosterItem(server, contact, user, {
        after: entry,
        itemChanged: true,
        version: await server.roster.getVersion(contact),
      });
    }
  });
  const targets = presenceTo.flatMap((contact) => online.get(contact) ?? []);
  if (resource) {
    const from = fullJid(fullJidOf(user, resource));
    await deliverToMany(
      server,
      targets,
      (target) => new Element('presence', { from, to: target.user, type: 'unavailable' }),
    );
  }
  return toldBy(presenceTo, targets);
}

function isSubscriptionStanza(type: string): type is SubscriptionStanza {
  return SUBSCRIPTION_TYPES.has(type);
}

/** Who a broadcast reached: the subscribers (bare JIDs), and the resources it went to. */
interface Told {
  bare: Set<string>;
  full: Set<string>;
}

function toldBy(subscribers: string[], targets: ResourceRecord[]): Told {
  return { bare: new Set(subscribers), full: new Set(targets.map((t) => `${t.user}/${t.resource}`)) };
}

/**
 * Directed-presence recipients the broadcast did not reach: a bare JID that is a subscriber was
 * told (at each of its available resources, where directed presence to it went too); a full JID
 * only if that resource got the broadcast (a subscriber's resource that is connected but not
 * available gets none, §4.6.3 still owes it the unavailable).
 */
function notTold(directedTo: string[], told: Told): string[] | undefined {
  const rest = directedTo.filter((jid) => (jid.includes('/') ? !told.full.has(jid) : !told.bare.has(jid)));
  return rest.length > 0 ? rest : undefined;
}

async function contactsOnAvailability(
  stream: BoundStream,
  stanza: Element,
  available: boolean,
  initial: boolean,
): Promise<void> {
  const { server } = stream;
  const user = stream.user;
  const roster = await server.roster.getRoster(user);
  const subscribers = presenceSubscribers(roster.items).filter((c) => isLocal(server, c));
  // §4.2.2: "the user's server MUST send a presence probe from the user's bare JID to each
  // contact to which the user is subscribed" — for a local contact, the probe is answered here
  // directly (§4.3.2) from the contact's resources as read.
  const probed = initial && available ? probeTargets(roster.items).filter((c) => isLocal(server, c)) : [];
  const online = await server.sessions.availableResourcesOf([...subscribers, ...probed]);

  const targets = subscribers.flatMap((contact) => online.get(contact) ?? []);
  await deliverToMany(server, targets, (target) => {
    const copy = clone(stanza);
    copy.attrs.to = target.user;
    return copy;
  });
  if (!available) {
    // The presence module tells directed-presence recipients after this hook: not those told here.
    const rest = stream.state.directedTo
      ? notTold(stream.state.directedTo, toldBy(subscribers, targets))
      : undefined;
    if (rest?.length !== stream.state.directedTo?.length) stream.update({ directedTo: rest });
    return;
  }
  if (!initial) return;
  const me = fullJid(stream.jid);
  // §4.3.2: "the full XML of the last presence stanza with no 'to' attribute received by the
  // server from each of the contact's available resources".
  // A contact with none gets no answer here (what a client's own probe gets, XEP-0318, is in
  // `probe`): one per offline contact would crowd a stream-management queue at login ahead of
  // what matters, and could land after that contact's own available presence sent meanwhile.
  const answers = probed.flatMap((contact) =>
    (online.get(contact) ?? []).map((resource) => presenceOfResource(resource, me, 'available')),
  );
  // §3.1.3: "the contact's server MUST keep a record of the subscription request and deliver
  // the request when the contact next creates an available resource, until the contact either
  // approves or denies the request" — one stored request per contact, never more. They go first:
  // a stream-management queue that the presence answers fill (many contacts online, a client
  // slow to acknowledge) refuses what comes after them, and a request not delivered now waits
  // for the next login, where presence is sent again anyway.
  const requests = pendingRequestsToRedeliver(roster.pendingIn).map((request) => {
    const element = parse(request);
    element.attrs.to = user;
    return element;
  });
  await sendAll(stream, [...requests, ...answers]);
}

/**
 * Many stanzas to the stream's own session. Without stream management their order does not
 * matter (presence of different contacts), so up to FAN_OUT_CONCURRENCY posts are in flight.
 * With it, one group (StanzaQueue.deliverTogether) queued in windows of PRESENCE_WINDOW, each one
 * append while the session is on this connection, and posted in one run: one by one, each append
 * and each poster's release was billed on a queue item that grew with every answer, about 24,000
 * write units for a login with 500 contacts online (`npm run bench -- --roster --sm`). A window
 * refused because the session left this connection (detached by a 410, resumed elsewhere) leaves
 * the rest to go one by one, queued for whoever resumes the session, as before; past one not
 * taken for a full queue the rest are not sent, as one by one they would not be taken either.
 */
async function sendAll(stream: BoundStream, stanzas: Element[]): Promise<void> {
  const queue = stream.server.host.stanzaQueue;
  let next = 0;
  if (stream.state.sm && queue && stanzas.length > 1) {
    let full = false;
    await queue.deliverTogether(stream, async (group) => {
      while (next < stanzas.length) {
        const results = await stream.sendAll(
          presenceWindow(stanzas, next).map((stanza) => ({
            stanza,
            options: { attachedTo: stream.connectionId, ...(group ? { group } : {}) },
          })),
        );
        const stopped = results.findIndex((result) => result === 'full' || result === 'gone');
        if (stopped < 0) {
          next += results.length;
          continue;
        }
        next += stopped;
        full = results[stopped] === 'full';
        return;
      }
    });
    if (full) return;
  }
  const worker = async () => {
    while (next < stanzas.length) await stream.send(stanzas[next++] as Element);
  };
  const concurrency = stream.state.sm ? 1 : FAN_OUT_CONCURRENCY;
  await Promise.all(Array.from({ length: Math.min(concurrency, stanzas.length - next) }, worker));
}

/** Presence stanzas queued in one append: at most this many, and this many bytes as sent. */
const PRESENCE_WINDOW = 50;
const PRESENCE_WINDOW_BYTES = 24 * 1024;

/**
 * The window of `stanzas` from `from`: up to PRESENCE_WINDOW of them within PRESENCE_WINDOW_BYTES
 * (a window past the stanza queue's 32 KB would go one by one), and at least one.
 */
function presenceWindow(stanzas: readonly Element[], from: number): Element[] {
  const window: Element[] = [];
  let bytes = 0;
  for (let at = from; at < stanzas.length && window.length < PRESENCE_WINDOW; at++) {
    const stanza = stanzas[at] as Element;
    bytes += Buffer.byteLength(stanza.toString());
    if (window.length > 0 && bytes > PRESENCE_WINDOW_BYTES) break;
    window.push(stanza);
  }
  return window;
}
