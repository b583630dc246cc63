/**
 * RFC 6121 §3 and Appendix A: presence subscriptions as a state machine, with §3.4
 * pre-approval (`urn:xmpp:features:pre-approval`). Pure functions: a state and a
 * subscription-related presence in, the next state and what the server does out.
 *
 * Appendix A names nine states from the point of view of one side of a relation: the
 * subscription (None/To/From/Both) plus "Pending Out" (the user asked the contact) and
 * "Pending In" (the contact asked the user). A.2 is what the user's server does with a stanza
 * the user sends; A.3 what the contact's server does with the stanza when it arrives. A
 * relation between two local users is both at once, applied to the two rows in one write
 * (`RosterStore.apply`).
 */
import type { RosterEntry, Subscription } from '../../store/roster.ts';
import { rosterItemChanged } from '../../store/roster.ts';

export const NS_PRE_APPROVAL = 'urn:xmpp:features:pre-approval';

export type SubscriptionStanza = 'subscribe' | 'unsubscribe' | 'subscribed' | 'unsubscribed';

export interface SubscriptionState {
  subscription: Subscription;
  pendingOut: boolean;
  pendingIn: boolean;
}

/** RFC 6121 Appendix A.1: the defined states. */
export const STATE_NAMES = [
  'None',
  'None + Pending Out',
  'None + Pending In',
  'None + Pending Out + Pending In',
  'To',
  'To + Pending In',
  'From',
  'From + Pending Out',
  'Both',
] as const;
export type StateName = (typeof STATE_NAMES)[number];

/**
 * The Appendix A name of a state. Combinations the appendix does not define (e.g. To + Pending
 * Out: a subscription the user already has cannot be pending) are read as the defined state
 * they collapse to.
 */
export function stateName(state: SubscriptionState): StateName {
  switch (state.subscription) {
    case 'both':
      return 'Both';
    case 'to':
      return state.pendingIn ? 'To + Pending In' : 'To';
    case 'from':
      return state.pendingOut ? 'From + Pending Out' : 'From';
    default:
      if (state.pendingOut && state.pendingIn) return 'None + Pending Out + Pending In';
      if (state.pendingOut) return 'None + Pending Out';
      return state.pendingIn ? 'None + Pending In' : 'None';
  }
}

export function stateNamed(name: StateName): SubscriptionState {
  const [head, ...flags] = name.split(' + ');
  return {
    subscription: head.toLowerCase() as Subscription,
    pendingOut: flags.includes('Pending Out'),
    pendingIn: flags.includes('Pending In'),
  };
}

const named = (name: StateName) => stateNamed(name);

/**
 * Appendix A.2: the user's server, on a subscription-related presence the user sends.
 * Each table maps EXISTING STATE to NEW STATE; a missing row is "no state change".
 */
const OUTBOUND: Record<SubscriptionStanza, Partial<Record<StateName, StateName>>> = {
  // A.2.1 Outbound "subscribe"
  subscribe: {
    None: 'None + Pending Out',
    'None + Pending In': 'None + Pending Out + Pending In',
    From: 'From + Pending Out',
  },
  // A.2.2 Outbound "unsubscribe"
  unsubscribe: {
    'None + Pending Out': 'None',
    'None + Pending Out + Pending In': 'None + Pending In',
    To: 'None',
    'To + Pending In': 'None + Pending In',
    'From + Pending Out': 'From',
    Both: 'From',
  },
  // A.2.3 Outbound "subscribed"
  subscribed: {
    'None + Pending In': 'From',
    'None + Pending Out + Pending In': 'From + Pending Out',
    'To + Pending In': 'Both',
  },
  // A.2.4 Outbound "unsubscribed"
  unsubscribed: {
    'None + Pending In': 'None',
    'None + Pending Out + Pending In': 'None + Pending Out',
    'To + Pending In': 'To',
    From: 'None',
    'From + Pending Out': 'None + Pending Out',
    Both: 'To',
  },
};

/**
 * Appendix A.3: the contact's server, on a subscription-related presence that arrives for the
 * contact. Each row: EXISTING STATE → [DELIVER?, NEW STATE]; a missing row is "no, no state
 * change".
 */
const INBOUND: Record<SubscriptionStanza, Partial<Record<StateName, [boolean, StateName]>>> = {
  // A.3.1 Inbound "subscribe"; From, From + Pending Out and Both: "no *" with
  // "* Server SHOULD auto-reply with "subscribed"."
  subscribe: {
    None: [true, 'None + Pending In'],
    'None + Pending Out': [true, 'None + Pending Out + Pending In'],
    To: [true, 'To + Pending In'],
  },
  // A.3.2 Inbound "unsubscribe"
  unsubscribe: {
    'None + Pending In': [true, 'None'],
    'None + Pending Out + Pending In': [true, 'None + Pending Out'],
    'To + Pending In': [true, 'To'],
    From: [true, 'None'],
    'From + Pending Out': [true, 'None + Pending Out'],
    Both: [true, 'To'],
  },
  // A.3.3 Inbound "subscribed"
  subscribed: {
    'None + Pending Out': [true, 'To'],
    'None + Pending Out + Pending In': [true, 'To + Pending In'],
    'From + Pending Out': [true, 'Both'],
  },
  // A.3.4 Inbound "unsubscribed"
  unsubscribed: {
    'None + Pending Out': [true, 'None'],
    'None + Pending Out + Pending In': [true, 'None + Pending In'],
    To: [true, 'None'],
    'To + Pending In': [true, 'None + Pending In'],
    'From + Pending Out': [true, 'From'],
    Both: [true, 'From'],
  },
};

const hasFrom = (s: SubscriptionState) => s.subscription === 'from' || s.subscription === 'both';

export interface OutboundTransition {
  next: SubscriptionState;
  changed: boolean;
}

/** Appendix A.2 alone: the user's next state after sending `type`. */
export function outboundTransition(state: SubscriptionState, type: SubscriptionStanza): OutboundTransition {
  const from = stateName(state);
  const to = OUTBOUND[type][from];
  return { next: to ? named(to) : named(from), changed: to !== undefined };
}

export interface InboundTransition {
  next: SubscriptionState;
  changed: boolean;
  deliver: boolean;
  /** A.3.1's footnote: the contact's server answers the request itself. */
  autoReply?: 'subscribed';
}

/** Appendix A.3 alone: the contact's next state when `type` arrives. */
export function inboundTransition(state: SubscriptionState, type: SubscriptionStanza): InboundTransition {
  const from = stateName(state);
  const row = INBOUND[type][from];
  const autoReply = type === 'subscribe' && hasFrom(named(from)) ? 'subscribed' : undefined;
  if (!row) return { next: named(from), changed: false, deliver: false, autoReply };
  return { next: named(row[1]), changed: true, deliver: row[0] };
}

/* ------------------------------------------------------------------------------------------
 * Entries: the transitions applied to what the roster keeps (listing, the pending request's
 * stanza, the pre-approval flag), and what the server must do around them.
 * ---------------------------------------------------------------------------------------- */

/** Presence the server sends, on the side that changed, from the side's available resources. */
export type PresenceEffect = 'available' | 'unavailable';

export interface OutboundOutcome {
  /** The user's entry afterwards (`null`: no row). */
  entry: RosterEntry | null;
  /** The stanza goes on to the contact, stamped with the user's bare JID. */
  route: boolean;
  /** RFC 6121 §2.1.6: the roster item changed; push it to the user's interested resources. */
  push: boolean;
  /** Presence of the user's available resources to send to the contact. */
  presence?: PresenceEffect;
}

export interface InboundOutcome {
  /** The recipient's entry afterwards (`null`: no row). */
  entry: RosterEntry | null;
  /** Deliver the stanza to the recipient's available resources (or keep it, for `subscribe`). */
  deliver: boolean;
  push: boolean;
  /** The recipient's server answers the sender itself with this presence type. */
  autoReply?: 'subscribed';
  /** Presence of the recipient's available resources to send to the sender. */
  presence?: PresenceEffect;
}

function stateOfEntry(entry: RosterEntry | null | undefined): SubscriptionState {
  return {
    subscription: entry?.subscription ?? 'none',
    pendingOut: entry?.pendingOut ?? false,
    pendingIn: entry?.pendingIn !== undefined,
  };
}

function blankEntry(contact: string): RosterEntry {
  return { contact, listed: false, groups: [], subscription: 'none', pendingOut: false, approved: false };
}

/** Writes a state into an entry; the pending request's stanza goes when Pending In does. */
function withState(entry: RosterEntry, state: SubscriptionState, pendingStanza?: string): RosterEntry {
  const next: RosterEntry = {
    ...entry,
    subscription: state.subscription,
    pendingOut: state.pendingOut,
    pendingIn: state.pendingIn ? (entry.pendingIn ?? pendingStanza) : undefined,
  };
  // Pre-approval is consumed by the subscription it approves, and means nothing beside one.
  return hasFrom(state) ? withoutApproval(next) : next;
}

function withoutApproval(entry: RosterEntry): RosterEntry {
  const { approvedFor: _for, approvedAt: _at, ...rest } = entry;
  return { ...rest, approved: false };
}

/**
 * RFC 6121 §3.4: a pre-approval approves the account it was given to (RosterEntry.approvedFor,
 * its creation time), not whoever holds the JID later: a JID deleted and created again, for
 * someone else, must not be subscribed to the user's presence without the user's word. One given
 * to another domain's JID (`approvedAt` only) approves nobody: no request comes from there
 * without server-to-server. One stored before session 33 (neither) approves as it did.
 * `requesterCreatedAt`: the requesting account's creation time (undefined: it has none).
 */
export function approvalHolds(entry: RosterEntry, requesterCreatedAt: number | undefined): boolean {
  if (!entry.approved || requesterCreatedAt === undefined) return false;
  if (entry.approvedFor !== undefined) return entry.approvedFor === requesterCreatedAt;
  return entry.approvedAt === undefined;
}

function settle(entry: RosterEntry): RosterEntry | null {
  const empty =
    !entry.listed &&
    entry.pendingIn === undefined &&
    !entry.approved &&
    entry.subscription === 'none' &&
    !entry.pendingOut;
  return empty ? null : entry;
}

export interface OutboundOptions {
  /** The server advertises `<sub xmlns='urn:xmpp:features:pre-approval'/>` (RFC 6121 §3.4). */
  preApproval: boolean;
  /**
   * For a pre-approval (RosterEntry.approvedFor): the contact's account's creation time, or
   * undefined when the JID has no account; and the time it is given at (ms; default now).
   */
  contactCreatedAt?: number;
  at?: number;
}

/**
 * The user sends subscription-related presence to `contact` (RFC 6121 §3.1.2, §3.1.5, §3.2.2,
 * §3.3.2, §3.4.2): the user's new entry and what the user's server does.
 */
export function userSendsSubscription(
  current: RosterEntry | null | undefined,
  contact: string,
  type: SubscriptionStanza,
  options: OutboundOptions,
): OutboundOutcome {
  const before = current ?? null;
  const base = current ?? blankEntry(contact);
  const state = stateOfEntry(current);
  const name = stateName(state);
  const transition = outboundTransition(state, type);
  let entry: RosterEntry = withState(base, transition.next);
  let route = true;
  let presence: PresenceEffect | undefined;

  switch (type) {
    case 'subscribe':
      // RFC 6121 §3.1.2 (paraphrased): the user's server adds the contact to the roster if it
      // is not there yet, and pushes the item with subscription='none' ask='subscribe'.
      entry = { ...entry, listed: true };
      break;
    case 'unsubscribe':
      break;
    case 'subscribed':
      if (transition.changed) {
        // §3.1.5: approving a pending request puts the user (the requester) in the roster
        // with subscription 'from', and the approver's available resources send presence.
        entry = { ...entry, listed: true };
        presence = 'available';
      } else if (options.preApproval && (name === 'None' || name === 'None + Pending Out' || name === 'To')) {
        // §3.4.2: "the user's server MUST note the subscription pre-approval by setting the
        // 'approved' flag to a value of "true" ... However, the user's server MUST NOT send the
        // presence stanza of type "subscribed" to the contact." A contact not yet in the
        // roster gets an item with state None and approved='true'.
        const { approvedFor: _for, approvedAt: _at, ...rest } = entry;
        entry = {
          ...rest,
          listed: true,
          approved: true,
          ...(options.contactCreatedAt !== undefined
            ? { approvedFor: options.contactCreatedAt }
            : { approvedAt: options.at ?? Date.now() }),
        };
        route = false;
      } else {
        // §3.4.2: in Both, From or From + Pending Out the stanza is silently ignored; without
        // pre-approval there is nothing to approve either.
        route = false;
      }
      break;
    case 'unsubscribed':
      if (transition.changed) {
        // §3.2.2: cancelling the contact's subscription (or denying its request); when the
        // contact had a subscription, it is told the user's resources are now unavailable.
        if (hasFrom(state)) presence = 'unavailable';
      } else if (base.approved) {
        // §3.4: an "unsubscribed" cancels a pre-approval; it goes nowhere.
        entry = withoutApproval(entry);
        route = false;
      } else {
        route = false;
      }
      break;
  }
  const after = settle(entry);
  return { entry: after, route, push: rosterItemChanged(before, after), presence };
}

/**
 * A subscription-related presence from `from` arrives for the owner of `current` (RFC 6121
 * §3.1.3, §3.1.6, §3.2.3, §3.3.3, §3.4): the recipient's new entry and what its server does.
 * `stanza` is the received presence, serialised: kept while a `subscribe` is pending.
 * `requesterCreatedAt`: when the sender's account was created (a `subscribe` meets a
 * pre-approval only if it was given to that account, see `approvalHolds`).
 */
export function contactReceivesSubscription(
  current: RosterEntry | null | undefined,
  from: string,
  type: SubscriptionStanza,
  stanza: string,
  requesterCreatedAt?: number,
): InboundOutcome {
  const before = current ?? null;
  const given = current ?? blankEntry(from);
  const approves = type === 'subscribe' && approvalHolds(given, requesterCreatedAt);
  // A pre-approval given to another account than the requester's (one that held the JID before)
  // goes: the request is delivered and kept like any other (§3.1.3).
  const base = type === 'subscribe' && given.approved && !approves ? withoutApproval(given) : given;
  const state = stateOfEntry(current);
  const name = stateName(state);
  if (approves && !hasFrom(state) && !state.pendingIn) {
    // §3.4 (paraphrased): a pre-approved request is approved by the contact's server itself
    // and not delivered to the contact, as if the contact had answered "subscribed".
    const approved = outboundTransition({ ...state, pendingIn: true }, 'subscribed');
    const entry = settle(withState(base, approved.next));
    return {
      entry,
      deliver: false,
      push: rosterItemChanged(before, entry),
      autoReply: 'subscribed',
      presence: 'available',
    };
  }
  const transition = inboundTransition(state, type);
  const entry = settle(withState(base, transition.next, stanza));
  // §3.3.3 (paraphrased): when the sender's subscription ends, the recipient's server sends
  // unavailable presence from each of the recipient's available resources to the sender.
  const presence =
    type === 'unsubscribe' && hasFrom(stateNamed(name)) && transition.changed ? 'unavailable' : undefined;
  return {
    entry,
    deliver: transition.deliver,
    push: rosterItemChanged(before, entry),
    autoReply: transition.autoReply,
    presence,
  };
}

/**
 * RFC 6121 §2.5.2: removing an item makes the user's server cancel both directions first:
 * "unsubscribe" to the contact when the user is or asked to be subscribed (To, Both, Pending
 * Out), and "unsubscribed" when the contact is or asked to be (From, Both, Pending In).
 */
export function removalStanzas(entry: RosterEntry): SubscriptionStanza[] {
  const state = stateOfEntry(entry);
  const stanzas: SubscriptionStanza[] = [];
  if (state.subscription === 'to' || state.subscription === 'both' || state.pendingOut)
    stanzas.push('unsubscribe');
  if (hasFrom(state) || state.pendingIn) stanzas.push('unsubscribed');
  return stanzas;
}

/**
 * The contact's side of a removal: the stanzas of `removalStanzas` arriving in order. The
 * result also says whether the contact's resources must tell the remover they are unavailable.
 */
export function contactSeesRemoval(
  current: RosterEntry | null | undefined,
  remover: string,
  stanzas: SubscriptionStanza[],
): { entry: RosterEntry | null; deliver: SubscriptionStanza[]; push: boolean; presence?: PresenceEffect } {
  let entry = current ?? null;
  const deliver: SubscriptionStanza[] = [];
  let presence: PresenceEffect | undefined;
  for (const type of stanzas) {
    const outcome = contactReceivesSubscription(entry, remover, type, '');
    entry = outcome.entry;
    if (outcome.deliver) deliver.push(type);
    presence ??= outcome.presence;
  }
  return { entry, deliver, push: rosterItemChanged(current, entry), presence };
}

/**
 * §3.1.3: a "subscribe" for a local account that does not exist is answered with
 * "unsubscribed" by the would-be contact's server; the other three types are dropped.
 */
export function answerForUnknownAccount(type: SubscriptionStanza): 'unsubscribed' | undefined {
  return type === 'subscribe' ? 'unsubscribed' : undefined;
}
