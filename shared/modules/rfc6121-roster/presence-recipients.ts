/**
 * RFC 6121 §4 with subscriptions: who receives a user's presence, whom the server probes for
 * the user, how a probe is answered, which pending requests go out again at login, and who may
 * query the user's account (bare JID) at all. Pure functions over the user's roster.
 */
import type { RosterEntry } from '../../store/roster.ts';

const hasFrom = (entry: RosterEntry) => entry.subscription === 'from' || entry.subscription === 'both';
const hasTo = (entry: RosterEntry) => entry.subscription === 'to' || entry.subscription === 'both';

/**
 * §4.2.2 and §4.4.2: initial presence and updates are broadcast to the contacts subscribed to
 * the user's presence, subscription 'from' or 'both' (and to the user's own resources, which
 * the core already does). §4.5.2: unavailable presence goes to the same contacts.
 */
export function presenceSubscribers(entries: readonly RosterEntry[]): string[] {
  return entries.filter((entry) => entry.listed && hasFrom(entry)).map((entry) => entry.contact);
}

/**
 * §4.2.2: at the user's initial presence, the user's server probes the contacts the user is
 * subscribed to, subscription 'to' or 'both', on the user's behalf.
 */
export function probeTargets(entries: readonly RosterEntry[]): string[] {
  return entries.filter((entry) => entry.listed && hasTo(entry)).map((entry) => entry.contact);
}

export type ProbeAnswer =
  /** Send the last presence of each available resource (or unavailable when there is none). */
  | 'presence'
  /** The prober has no subscription: reveal nothing, say "unsubscribed". */
  | 'unsubscribed';

/**
 * §4.3.2: a probe from `prober` to a user whose entry for the prober is `entry`. Only a
 * contact with a subscription to the user's presence (the user's entry says 'from' or 'both')
 * learns anything; anyone else is answered "unsubscribed" and the user's presence stays
 * private. A probe to an account that does not exist is answered the same way, by the caller.
 */
export function answerProbe(entry: RosterEntry | null | undefined): ProbeAnswer {
  return entry && hasFrom(entry) ? 'presence' : 'unsubscribed';
}

/**
 * §3.1.3: a subscription request that waits for the user's answer is delivered again when the
 * user next has an available resource: the stored stanzas, one per contact (a contact's row
 * holds at most one), oldest contact row first as stored.
 */
export function pendingRequestsToRedeliver(entries: readonly RosterEntry[]): string[] {
  return entries.flatMap((entry) => (entry.pendingIn === undefined ? [] : [entry.pendingIn]));
}

/**
 * Who may send an iq (disco#info, ping, …) to the user's bare JID and get the server's answer
 * on the account's behalf (RFC 6120 §10.3.3). The user's own resources may; another entity
 * only when the user shares presence with it (the user's entry for it is 'from' or 'both'),
 * the rule XEP-0030 gives for an account's info. Anyone else is answered as if the account
 * did not exist (service-unavailable), so the account's existence does not leak either.
 */
export function mayQueryAccount(
  requesterBare: string,
  user: string,
  entryForRequester: RosterEntry | null | undefined,
): boolean {
  if (requesterBare === user) return true;
  return entryForRequester ? hasFrom(entryForRequester) : false;
}
