/**
 * RFC 6121 §2: roster management (`jabber:iq:roster`) with §2.6 roster versioning
 * (`urn:xmpp:features:rosterver`). Decode a roster get or set into a typed request, decide,
 * encode the result and the roster pushes. No storage here: `shared/store/roster.ts` keeps
 * the items, and the module's handlers join the two.
 */
import { Element } from 'ltx';
import { StanzaError } from '../../errors.ts';
import { bareJid, parseJid } from '../../jid.ts';
import type { RosterEntry } from '../../store/roster.ts';
import { fitsContactKey } from '../../store/roster.ts';

export const NS_ROSTER = 'jabber:iq:roster';
export const NS_ROSTER_VERSIONING = 'urn:xmpp:features:rosterver';

export interface RosterBounds {
  /** §2.3.3: "a server-configured limit" on the 'name' attribute, in UTF-8 bytes. */
  maxNameBytes: number;
  /** §2.3.3: the limit on a <group/>'s character data, in UTF-8 bytes. */
  maxGroupBytes: number;
  /** Groups per item (server policy; refused like an over-long group). */
  maxGroups: number;
  /**
   * The name and the groups together, in UTF-8 bytes (server policy; refused alike). Every
   * presence change reads the whole roster: 64 groups of 1023 bytes made an item of 64 KB, and
   * a full roster of them 64 MB to read each time.
   */
  maxItemBytes: number;
}

/**
 * 1023 bytes, the bound RFC 7622 puts on each part of a JID, is ample for a handle or a group;
 * 2 KB for all of an item's (a roster of 1,000 such items is 2 MB at most).
 */
export const DEFAULT_ROSTER_BOUNDS: RosterBounds = {
  maxNameBytes: 1023,
  maxGroupBytes: 1023,
  maxGroups: 64,
  maxItemBytes: 2048,
};

export interface RosterGet {
  /**
   * §2.6.2: the client's cached version; `''` when it supports versioning but has no cache.
   * Undefined when the client did not include 'ver' (no versioning: no ver in replies).
   */
  ver?: string;
}

export type RosterSet =
  | { kind: 'update'; contact: string; name?: string; groups: string[] }
  | { kind: 'remove'; contact: string };

const bytes = (text: string) => Buffer.byteLength(text, 'utf8');

/** §2.2 roster get. */
export function decodeRosterGet(query: Element): RosterGet {
  const ver = query.attrs.ver;
  return typeof ver === 'string' ? { ver } : {};
}

/**
 * §2.3 roster set, §2.5 roster delete, with the §2.3.3 error rules. `user` is the requester's
 * bare JID.
 */
export function decodeRosterSet(
  query: Element,
  user: string,
  bounds: RosterBounds = DEFAULT_ROSTER_BOUNDS,
): RosterSet {
  const items = query.getChildElements().filter((child) => child.name === 'item');
  // §2.3.3: "The <query/> element contains more than one <item/> child element." → bad-request.
  if (items.length > 1)
    throw new StanzaError('modify', 'bad-request', 'a roster set carries exactly one item');
  const item = items[0];
  if (!item) throw new StanzaError('modify', 'bad-request', 'a roster set carries exactly one item');
  const jidText = item.attrs.jid;
  if (typeof jidText !== 'string') throw new StanzaError('modify', 'bad-request', "the item has no 'jid'");
  // RFC 6120 §8.3.3.8: an address that does not adhere to the JID syntax is jid-malformed.
  const jid = parseJid(jidText);
  if (jid.resource) {
    // Subscriptions are between bare JIDs (RFC 6121 §3); this server keeps roster items by bare JID.
    throw new StanzaError('modify', 'bad-request', 'roster items are bare JIDs');
  }
  const contact = bareJid(jid);
  if (contact === user) {
    // The user's own presence already reaches all of the user's resources (§4.2.2, §4.4.2):
    // an item for oneself would add a second, contradictory path. Refused as Prosody does.
    throw new StanzaError('cancel', 'not-allowed', 'the roster cannot hold your own JID');
  }
  if (!fitsContactKey(contact))
    throw new StanzaError('modify', 'not-acceptable', 'JID too long for a roster item');

  // §2.1.2.5: "in a roster set the server MUST ignore all values of the 'subscription'
  // attribute other than "remove"". 'ask' and 'approved' are changed by presence only.
  if (item.attrs.subscription === 'remove') return { kind: 'remove', contact };

  const nameAttr = item.attrs.name;
  // An empty handle is no handle.
  const name = typeof nameAttr === 'string' && nameAttr !== '' ? nameAttr : undefined;
  // §2.3.3: a 'name' longer than the server-configured limit → not-acceptable.
  if (name !== undefined && bytes(name) > bounds.maxNameBytes) {
    throw new StanzaError('modify', 'not-acceptable', `name over ${bounds.maxNameBytes} bytes`);
  }
  const groups: string[] = [];
  for (const group of item.getChildElements().filter((child) => child.name === 'group')) {
    const text = group.getText();
    // §2.3.3: a <group/> whose character data is of zero length → not-acceptable ("to remove
    // an item from all groups, the client instead needs to exclude any <group/> element").
    if (text.length === 0) throw new StanzaError('modify', 'not-acceptable', 'empty group name');
    if (bytes(text) > bounds.maxGroupBytes) {
      throw new StanzaError('modify', 'not-acceptable', `group name over ${bounds.maxGroupBytes} bytes`);
    }
    // §2.3.3: duplicate <group/> elements → bad-request.
    if (groups.includes(text)) throw new StanzaError('modify', 'bad-request', `duplicate group '${text}'`);
    groups.push(text);
  }
  if (groups.length > bounds.maxGroups) {
    throw new StanzaError('modify', 'not-acceptable', `more than ${bounds.maxGroups} groups`);
  }
  if (bytes(name ?? '') + groups.reduce((sum, group) => sum + bytes(group), 0) > bounds.maxItemBytes) {
    throw new StanzaError('modify', 'not-acceptable', `name and groups over ${bounds.maxItemBytes} bytes`);
  }
  return { kind: 'update', contact, name, groups };
}

/**
 * The entry a roster set leaves (§2.3.2): a new item starts with subscription 'none'; an
 * existing one (or a pending request becoming an item) keeps its subscription state and
 * only takes the new name and groups.
 */
export function entryAfterSet(
  current: RosterEntry | null | undefined,
  set: Extract<RosterSet, { kind: 'update' }>,
): RosterEntry {
  const base: RosterEntry = current ?? {
    contact: set.contact,
    listed: false,
    groups: [],
    subscription: 'none',
    pendingOut: false,
    approved: false,
  };
  return { ...base, listed: true, name: set.name, groups: set.groups };
}

/** §2.1.2: a roster item as the client sees it. */
export function rosterItemElement(entry: RosterEntry): Element {
  const attrs: Record<string, string> = { jid: entry.contact, subscription: entry.subscription };
  if (entry.name !== undefined) attrs.name = entry.name;
  // §2.1.2.2: ask='subscribe' marks "Pending Out"; the subscription values never carry it.
  if (entry.pendingOut) attrs.ask = 'subscribe';
  // §2.1.2.1: the 'approved' attribute is included only with the value "true".
  if (entry.approved) attrs.approved = 'true';
  const item = new Element('item', attrs);
  for (const group of entry.groups) item.c('group').t(group);
  return item;
}

export type RosterGetAnswer = { kind: 'unchanged' } | { kind: 'full'; ver?: string };

/**
 * §2.6.3: a client whose cached version is the current one gets an empty result (the changes
 * come as pushes); any other client gets the whole roster, with 'ver' when it asked for
 * versioning. (Sending the changes since an older version as pushes is allowed too; this
 * server keeps no history, so it always sends the whole roster.)
 */
export function decideRosterGet(request: RosterGet, currentVersion: string): RosterGetAnswer {
  if (request.ver === undefined) return { kind: 'full' };
  if (request.ver !== '' && request.ver === currentVersion) return { kind: 'unchanged' };
  return { kind: 'full', ver: currentVersion };
}

/** The payload of a roster result (§2.1.4); undefined for the empty result of §2.6.3. */
export function encodeRosterResult(answer: RosterGetAnswer, items: RosterEntry[]): Element | undefined {
  if (answer.kind === 'unchanged') return undefined;
  const query = new Element(
    'query',
    answer.ver === undefined ? { xmlns: NS_ROSTER } : { xmlns: NS_ROSTER, ver: answer.ver },
  );
  for (const entry of items) if (entry.listed) query.cnode(rosterItemElement(entry));
  return query;
}

/**
 * §2.1.6 roster push: an iq set to each interested resource with the changed item (or
 * subscription='remove' when it left the roster) and, with versioning, the new 'ver'. It
 * comes from the user's bare JID, which a client checks (§2.1.6: a push from anyone else
 * MUST be ignored).
 */
export function encodeRosterPush(options: {
  user: string;
  to: string;
  id: string;
  contact: string;
  entry: RosterEntry | null | undefined;
  ver?: string;
}): Element {
  const iq = new Element('iq', { type: 'set', id: options.id, from: options.user, to: options.to });
  const query = iq.c(
    'query',
    options.ver === undefined ? { xmlns: NS_ROSTER } : { xmlns: NS_ROSTER, ver: options.ver },
  );
  if (options.entry?.listed) query.cnode(rosterItemElement(options.entry));
  else query.c('item', { jid: options.contact, subscription: 'remove' });
  return iq;
}

/** Stream features of the roster module (§2.6.1 and §3.4.1), for 'stream-features'. */
export function rosterStreamFeatures(options: { preApproval: boolean }): Element[] {
  const features = [new Element('ver', { xmlns: NS_ROSTER_VERSIONING })];
  if (options.preApproval) features.push(new Element('sub', { xmlns: 'urn:xmpp:features:pre-approval' }));
  return features;
}
