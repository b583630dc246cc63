/**
 * Deleting an account (`npm run user -- delete <jid>`) deletes what the account owned, not only
 * its credentials: an account created later under the same JID starts empty, and nobody keeps a
 * relation with a JID whose owner is gone.
 *
 * - The roster: every subscription is cancelled as RFC 6121 §2.5.2's removal does ("unsubscribe"
 *   where the user is or asked to be subscribed, "unsubscribed" where the contact is or asked to
 *   be), applied to both rosters in one transaction per contact; the contact keeps the item,
 *   with the subscription it has left (none). XEP-0077 §3.2 asks the same of an account's
 *   cancellation: "cancel all existing presence subscriptions related to that entity". The
 *   contacts' online clients are not told (this command posts nothing): they see the change at
 *   their next roster get.
 * - The offline inbox (XEP-0160, XEP-0013) and the message archive (XEP-0136), with no
 *   tombstone left.
 *
 * Sessions already open keep running until they end; they cannot log in again.
 */
import { contactSeesRemoval, removalStanzas } from '../shared/modules/rfc6121-roster/subscription-states.ts';
import type { ArchiveStore } from '../shared/store/archive.ts';
import type { OfflineStore } from '../shared/store/offline.ts';
import type { RosterStore } from '../shared/store/roster.ts';
import type { UserStore } from '../shared/store/users.ts';

export interface AccountStores {
  users: UserStore;
  roster: RosterStore;
  offline: OfflineStore;
  archive: ArchiveStore;
}

export interface AccountDeletion {
  /** Roster entries removed (items and pending requests), each with its contact's side. */
  contacts: number;
  offlineMessages: number;
  archivedCollections: number;
}

/** Deletes `jid` (a bare JID of `domain`); UnknownUserError when there is no such account. */
export async function deleteAccount(
  stores: AccountStores,
  jid: string,
  domain: string,
): Promise<AccountDeletion> {
  // The credentials first: from here on nobody logs in as the account, and the roster treats
  // the JID as one without an account.
  await stores.users.delete(jid);
  const roster = await stores.roster.getRoster(jid);
  const contacts = [...new Set([...roster.items, ...roster.pendingIn].map((entry) => entry.contact))];
  for (const contact of contacts) {
    const contactIsLocal = contact.slice(contact.indexOf('@') + 1) === domain;
    await stores.roster.apply(jid, contact, { contactIsLocal }, (pair) => {
      const stanzas = pair.user ? removalStanzas(pair.user) : [];
      const seen =
        contactIsLocal && stanzas.length > 0 ? contactSeesRemoval(pair.contact, jid, stanzas) : undefined;
      return { user: null, contact: seen ? seen.entry : undefined, outcome: undefined };
    });
  }
  const offlineMessages = await stores.offline.purge(jid);
  const archivedCollections = await stores.archive.deleteOwner(jid);
  return { contacts: contacts.length, offlineMessages, archivedCollections };
}
