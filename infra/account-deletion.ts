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
 *   so it marks their connections revoked (core/stream.ts): each open stream ends at its next
 *   frame with the stream error `<not-authorized/>` ("Account deleted"), that frame not handled,
 *   or at its `$disconnect` (API Gateway's 10-minute idle cut at the latest); it cannot log in
 *   again, nor resume. As it ends, the contacts' online clients are told what an account's own
 *   roster removal would have told them (the roster module): `unsubscribe`/`unsubscribed`, the
 *   push of their changed item, and, from an available stream, its unavailable presence to the
 *   contacts that had it. With no stream open, nothing is posted: contacts see the change at
 *   their next roster get. Its last unavailable presence (what a contact's probe is answered
 *   with, RFC 6121 §4.3.2) goes too.
 *
 * Run again for a JID whose credentials are gone already (an earlier run that failed part-way),
 * it finishes the rest; UnknownUserError only when nothing was left.
 */
import { contactSeesRemoval, removalStanzas } from '../shared/modules/rfc6121-roster/subscription-states.ts';
import type { ArchiveStore } from '../shared/store/archive.ts';
import type { OfflineStore } from '../shared/store/offline.ts';
import type { RosterEntry, RosterStore } from '../shared/store/roster.ts';
import type { Revocation, SessionStore } from '../shared/store/sessions.ts';
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
  const isLocal = (contact: string) => contact.slice(contact.indexOf('@') + 1) === domain;
  const roster = await stores.roster.getRoster(jid);
  const entries = new Map<string, RosterEntry>();
  for (const entry of [...roster.items, ...roster.pendingIn]) entries.set(entry.contact, entry);
  const contacts = [...entries.keys()];
  // Whom the open streams tell when they end (this command cannot post): the local contacts
  // whose roster changes, with the stanzas a removal delivers to them (as read now), and the
  // contacts that had the account's presence.
  const notify: Revocation['notify'] = [];
  for (const [contact, entry] of entries) {
    const stanzas = removalStanzas(entry);
    if (!isLocal(contact) || stanzas.length === 0) continue;
    const seen = contactSeesRemoval(await stores.roster.getEntry(contact, jid), jid, stanzas);
    if (seen.deliver.length > 0 || seen.push) notify.push({ contact, deliver: seen.deliver });
  }
  const presenceTo = [...entries.values()]
    .filter((e) => e.listed && isLocal(e.contact) && (e.subscription === 'from' || e.subscription === 'both'))
    .map((e) => e.contact);
  let sessions = 0;
  let notified = notify.length === 0;
  for (const resource of await stores.sessions.listResources(jid)) {
    // The open stream ends at its next frame (a stream error) or its $disconnect: it may not go
    // on sending as the account, nor keep its XEP-0198 session for a resume. One stream carries
    // the contacts' notices; each available one its own unavailable presence.
    const revocation: Revocation = {
      ...(resource.available && presenceTo.length > 0 ? { presenceTo } : {}),
      ...(notified ? {} : { notify }),
    };
    if (await stores.sessions.revokeConnection(resource.connectionId, revocation)) notified = true;
    if (await stores.sessions.releaseResource(jid, resource.resource, resource.connectionId)) sessions += 1;
  }
  // What the account's contacts would be told of its last unavailable presence (RFC 6121 §4.3.2):
  // an account created again under the JID was never seen.
  await stores.sessions.forgetLastUnavailable(jid);
  for (const contact of contacts) {
    const contactIsLocal = isLocal(contact);
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
