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
 * - The resource rows of its sessions: nothing is routed to them any more (a message to the JID
 *   is answered as for any JID without an account). Their connections are marked revoked: this
 *   command cannot post or close, so each open stream ends at its next frame, with
 *   the stream error `<not-authorized/>` ("Account deleted"), and whatever that frame carried is
 *   not handled; a client that sends nothing is cut by API
 *   Gateway's idle timeout (10 minutes) and cannot log in again. Its last unavailable presence
 *   (what a contact's probe is answered with, RFC 6121 §4.3.2) goes too.
 *
 * Run again for a JID whose credentials are gone already (an earlier run that failed part-way),
 * it finishes the rest; UnknownUserError only when nothing was left.
 */
import { contactSeesRemoval, removalStanzas } from '../shared/modules/rfc6121-roster/subscription-states.ts';
import type { ArchiveStore } from '../shared/store/archive.ts';
import type { OfflineStore } from '../shared/store/offline.ts';
import type { RosterStore } from '../shared/store/roster.ts';
import type { SessionStore } from '../shared/store/sessions.ts';
import { UnknownUserError, type UserStore } from '../shared/store/users.ts';

export interface AccountStores {
  users: UserStore;
  roster: RosterStore;
  offline: OfflineStore;
  archive: ArchiveStore;
  sessions: SessionStore;
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
  let sessions = 0;
  for (const resource of await stores.sessions.listResources(jid)) {
    // The open stream ends at its next frame (a stream error): it may not go on sending as the
    // account, nor keep its XEP-0198 session for a resume.
    await stores.sessions.revokeConnection(resource.connectionId);
    if (await stores.sessions.releaseResource(jid, resource.resource, resource.connectionId)) sessions += 1;
  }
  // What the account's contacts would be told of its last unavailable presence (RFC 6121 §4.3.2):
  // an account created again under the JID was never seen.
  await stores.sessions.forgetLastUnavailable(jid);
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
  const deleted = { contacts: contacts.length, offlineMessages, archivedCollections, sessions };
  if (!existed && contacts.length + offlineMessages + archivedCollections + sessions === 0)
    throw new UnknownUserError(jid);
  return deleted;
}
