/**
 * Deleting an account (`npm run user -- delete <jid>`) deletes what the account owned, not only
 * its credentials: an account created later under the same JID starts empty, and nobody keeps a
 * relation with a JID whose owner is gone.
 *
 * - The roster: every subscription is cancelled as RFC 6121 §2.5.2's removal does ("unsubscribe"
 *   where the user is or asked to be subscribed, "unsubscribed" where the contact is or asked to
 *   be), applied to both rosters in one transaction per contact; the contact keeps the item,
 *   with the subscription it has left (none). XEP-0077 §3.2 asks the same of an account's
 *   cancellation: "cancel all existing presence subscriptions related to that entity".
 * - The offline inbox (XEP-0160, XEP-0013) and the message archive (XEP-0136), with no
 *   tombstone left.
 * - The resource rows of its sessions: nothing is routed to them any more (a message to the JID
 *   is answered as for any JID without an account). This command cannot post or close sockets,
 *   so it marks their connections revoked (core/stream.ts), after the roster is written: each
 *   open stream ends at its next frame with the stream error `<not-authorized/>` ("Account
 *   deleted"), that frame not handled, or at its `$disconnect`; as it ends, the contacts' online
 *   clients are told what the account's own roster removal would have told them (the roster
 *   module): `unsubscribe`/`unsubscribed`, the push of their item as written, and, from an
 *   available stream, its unavailable presence to the contacts that had it. Its XEP-0198
 *   sessions are marked too: never resumed again, and one detached now tells the contacts when
 *   its window ends. With no stream open, nothing is posted: contacts see the change at their
 *   next roster get. Its last unavailable presence (what a contact's probe is answered with,
 *   RFC 6121 §4.3.2) goes too.
 *
 * Run again for a JID whose credentials are gone already (an earlier run that failed part-way),
 * it finishes the rest; UnknownUserError only when nothing was left.
 */
import { contactSeesRemoval, removalStanzas } from '../shared/modules/rfc6121-roster/subscription-states.ts';
import type { ArchiveStore } from '../shared/store/archive.ts';
import type { OfflineStore } from '../shared/store/offline.ts';
import type { RosterStore } from '../shared/store/roster.ts';
import type { Revocation, SessionStore } from '../shared/store/sessions.ts';
import type { SmQueueStore } from '../shared/store/sm-queue.ts';
import { UnknownUserError, type UserStore } from '../shared/store/users.ts';

export interface AccountStores {
  users: UserStore;
  roster: RosterStore;
  offline: OfflineStore;
  archive: ArchiveStore;
  sessions: SessionStore;
  smQueue: SmQueueStore;
}

export interface AccountDeletion {
  /** Roster entries removed (items and pending requests), each with its contact's side. */
  contacts: number;
  offlineMessages: number;
  archivedCollections: number;
  /** Resource rows released (sessions still open when the account was deleted). */
  sessions: number;
}

/** Deletes `jid` (a bare JID of `domain`); UnknownUserError when there is no such account. */
export async function deleteAccount(
  stores: AccountStores,
  jid: string,
  domain: string,
): Promise<AccountDeletion> {
  // The credentials first: from here on nobody logs in as the account, and the roster treats
  // the JID as one without an account.
  let existed = true;
  try {
    await stores.users.delete(jid);
  } catch (error) {
    if (!(error instanceof UnknownUserError)) throw error;
    existed = false;
  }
  const isLocal = (contact: string) => contact.slice(contact.indexOf('@') + 1) === domain;
  const roster = await stores.roster.getRoster(jid);
  const contacts = [...new Set([...roster.items, ...roster.pendingIn].map((entry) => entry.contact))];
  // The contacts that had the account's presence: its available streams tell them it is gone.
  const presenceTo = roster.items
    .filter((e) => isLocal(e.contact) && (e.subscription === 'from' || e.subscription === 'both'))
    .map((e) => e.contact);
  // The roster first, so that what the streams tell the contacts (this command cannot post) is
  // what was written: the stanzas a removal delivers to each, and its item as it is now.
  const notify: NonNullable<Revocation['notify']> = [];
  for (const contact of contacts) {
    const contactIsLocal = isLocal(contact);
    const applied = await stores.roster.apply(jid, contact, { contactIsLocal }, (pair) => {
      const stanzas = pair.user ? removalStanzas(pair.user) : [];
      const seen =
        contactIsLocal && stanzas.length > 0 ? contactSeesRemoval(pair.contact, jid, stanzas) : undefined;
      return { user: null, contact: seen ? seen.entry : undefined, outcome: seen };
    });
    const seen = applied.outcome;
    if (seen && (seen.deliver.length > 0 || seen.push)) notify.push({ contact, deliver: seen.deliver });
  }
  let sessions = 0;
  let notified = notify.length === 0;
  for (const resource of await stores.sessions.listResources(jid)) {
    // Its stream ends at its next frame (a stream error) or its $disconnect, and tells the
    // contacts then: it may not go on as the account. One stream carries the contacts' notices;
    // each available one its own unavailable presence. A stream-management session is never
    // resumed again; one detached now (no connection row) tells them when its window ends.
    const revocation: Revocation = {
      ...(resource.available && presenceTo.length > 0 ? { presenceTo } : {}),
      ...(notified ? {} : { notify }),
    };
    const revoked = await stores.sessions.revokeConnection(resource.connectionId, revocation);
    const detachedRevoked = resource.smId
      ? await stores.smQueue.revoke(resource.smId, revoked ? { viaStream: true } : revocation)
      : false;
    if (revoked || detachedRevoked) notified = true;
    if (await stores.sessions.releaseResource(jid, resource.resource, resource.connectionId)) sessions += 1;
  }
  // What the account's contacts would be told of its last unavailable presence (RFC 6121 §4.3.2):
  // an account created again under the JID was never seen.
  await stores.sessions.forgetLastUnavailable(jid);
  const offlineMessages = await stores.offline.purge(jid);
  const archivedCollections = await stores.archive.deleteOwner(jid);
  const deleted = { contacts: contacts.length, offlineMessages, archivedCollections, sessions };
  if (!existed && contacts.length + offlineMessages + archivedCollections + sessions === 0)
    throw new UnknownUserError(jid);
  return deleted;
}
