/**
 * RFC 6121 roster and subscriptions, the pure logic: the Appendix A state tables row by row,
 * the §2 roster get/set decode grid with its error cases, §2.6 versioning, pre-approval (§3.4)
 * and the §4 presence recipients.
 */
import { parse } from 'ltx';
import { describe, expect, it } from 'vitest';
import { StanzaError } from '../../shared/errors.ts';
import {
  answerProbe,
  mayQueryAccount,
  pendingRequestsToRedeliver,
  presenceSubscribers,
  probeTargets,
} from '../../shared/modules/rfc6121-roster/presence-recipients.ts';
import {
  decideRosterGet,
  decodeRosterGet,
  decodeRosterSet,
  encodeRosterPush,
  encodeRosterResult,
  entryAfterSet,
  rosterStreamFeatures,
} from '../../shared/modules/rfc6121-roster/roster-management.ts';
import {
  answerForUnknownAccount,
  contactReceivesSubscription,
  contactSeesRemoval,
  inboundTransition,
  outboundTransition,
  removalStanzas,
  STATE_NAMES,
  type StateName,
  type SubscriptionStanza,
  stateName,
  stateNamed,
  userSendsSubscription,
} from '../../shared/modules/rfc6121-roster/subscription-states.ts';
import type { RosterEntry } from '../../shared/store/roster.ts';

const USER = 'juliet@example.com';
const CONTACT = 'romeo@example.net';

/** A row of an A.2 table: | EXISTING STATE | NEW STATE |, `null` for "no state change". */
type OutboundRow = [StateName, StateName | null];
/** A row of an A.3 table: | EXISTING STATE | DELIVER? | NEW STATE |. */
type InboundRow = [StateName, boolean, StateName | null];

const A2: Record<SubscriptionStanza, OutboundRow[]> = {
  // A.2.1.  Outbound "subscribe"
  subscribe: [
    ['None', 'None + Pending Out'],
    ['None + Pending Out', null],
    ['None + Pending In', 'None + Pending Out + Pending In'],
    ['None + Pending Out + Pending In', null],
    ['To', null],
    ['To + Pending In', null],
    ['From', 'From + Pending Out'],
    ['From + Pending Out', null],
    ['Both', null],
  ],
  // A.2.2.  Outbound "unsubscribe"
  unsubscribe: [
    ['None', null],
    ['None + Pending Out', 'None'],
    ['None + Pending In', null],
    ['None + Pending Out + Pending In', 'None + Pending In'],
    ['To', 'None'],
    ['To + Pending In', 'None + Pending In'],
    ['From', null],
    ['From + Pending Out', 'From'],
    ['Both', 'From'],
  ],
  // A.2.3.  Outbound "subscribed"
  subscribed: [
    ['None', null],
    ['None + Pending Out', null],
    ['None + Pending In', 'From'],
    ['None + Pending Out + Pending In', 'From + Pending Out'],
    ['To', null],
    ['To + Pending In', 'Both'],
    ['From', null],
    ['From + Pending Out', null],
    ['Both', null],
  ],
  // A.2.4.  Outbound "unsubscribed"
  unsubscribed: [
    ['None', null],
    ['None + Pending Out', null],
    ['None + Pending In', 'None'],
    ['None + Pending Out + Pending In', 'None + Pending Out'],
    ['To', null],
    ['To + Pending In', 'To'],
    ['From', 'None'],
    ['From + Pending Out', 'None + Pending Out'],
    ['Both', 'To'],
  ],
};

const A3: Record<SubscriptionStanza, InboundRow[]> = {
  // A.3.1.  Inbound "subscribe" ("no *": "Server SHOULD auto-reply with "subscribed".")
  subscribe: [
    ['None', true, 'None + Pending In'],
    ['None + Pending Out', true, 'None + Pending Out + Pending In'],
    ['None + Pending In', false, null],
    ['None + Pending Out + Pending In', false, null],
    ['To', true, 'To + Pending In'],
    ['To + Pending In', false, null],
    ['From', false, null],
    ['From + Pending Out', false, null],
    ['Both', false, null],
  ],
  // A.3.2.  Inbound "unsubscribe"
  unsubscribe: [
    ['None', false, null],
    ['None + Pending Out', false, null],
    ['None + Pending In', true, 'None'],
    ['None + Pending Out + Pending In', true, 'None + Pending Out'],
    ['To', false, null],
    ['To + Pending In', true, 'To'],
    ['From', true, 'None'],
    ['From + Pending Out', true, 'None + Pending Out'],
    ['Both', true, 'To'],
  ],
  // A.3.3.  Inbound "subscribed"
  subscribed: [
    ['None', false, null],
    ['None + Pending Out', true, 'To'],
    ['None + Pending In', false, null],
    ['None + Pending Out + Pending In', true, 'To + Pending In'],
    ['To', false, null],
    ['To + Pending In', false, null],
    ['From', false, null],
    ['From + Pending Out', true, 'Both'],
    ['Both', false, null],
  ],
  // A.3.4.  Inbound "unsubscribed"
  unsubscribed: [
    ['None', false, null],
    ['None + Pending Out', true, 'None'],
    ['None + Pending In', false, null],
    ['None + Pending Out + Pending In', true, 'None + Pending In'],
    ['To', true, 'None'],
    ['To + Pending In', true, 'None + Pending In'],
    ['From', false, null],
    ['From + Pending Out', true, 'From'],
    ['Both', true, 'From'],
  ],
};

const TYPES: SubscriptionStanza[] = ['subscribe', 'unsubscribe', 'subscribed', 'unsubscribed'];

describe('Appendix A.1: the nine states', () => {
  it.each(STATE_NAMES.map((name) => [name]))('"%s" reads back to its own name', (name) => {
    expect(stateName(stateNamed(name))).toBe(name);
  });

  it('every table has exactly one row per state', () => {
    for (const type of TYPES) {
      expect(A2[type].map(([state]) => state)).toEqual([...STATE_NAMES]);
      expect(A3[type].map(([state]) => state)).toEqual([...STATE_NAMES]);
    }
  });
});

describe("Appendix A.2: user's server, outbound subscription-related presence", () => {
  for (const type of TYPES) {
    it.each(A2[type])(`outbound "${type}" | %s | %s`, (existing, expected) => {
      const transition = outboundTransition(stateNamed(existing), type);
      expect(stateName(transition.next)).toBe(expected ?? existing);
      expect(transition.changed).toBe(expected !== null);
    });
  }
});

describe("Appendix A.3: contact's server, inbound subscription-related presence", () => {
  for (const type of TYPES) {
    it.each(A3[type])(`inbound "${type}" | %s | deliver %s | %s`, (existing, deliver, expected) => {
      const transition = inboundTransition(stateNamed(existing), type);
      expect(stateName(transition.next)).toBe(expected ?? existing);
      expect(transition.deliver).toBe(deliver);
      const autoReplies =
        type === 'subscribe' && ['From', 'From + Pending Out', 'Both'].includes(existing)
          ? 'subscribed'
          : undefined;
      // A.3.1: "* Server SHOULD auto-reply with "subscribed"."
      expect(transition.autoReply).toBe(autoReplies);
    });
  }
});

function entry(state: StateName, extra: Partial<RosterEntry> = {}): RosterEntry {
  const s = stateNamed(state);
  return {
    contact: CONTACT,
    listed: true,
    groups: [],
    subscription: s.subscription,
    pendingOut: s.pendingOut,
    pendingIn: s.pendingIn ? `<presence type='subscribe' from='${CONTACT}'/>` : undefined,
    approved: false,
    ...extra,
  };
}

const SUBSCRIBE = `<presence from='${USER}' to='${CONTACT}' type='subscribe'><status>hi</status></presence>`;

describe('entries: the user sends (§3.1.2, §3.1.5, §3.2.2, §3.3.2)', () => {
  it('§3.1.2: "subscribe" to someone not in the roster adds an item None + Pending Out, pushed and routed', () => {
    const outcome = userSendsSubscription(undefined, CONTACT, 'subscribe', { preApproval: true });
    expect(outcome).toMatchObject({ route: true, push: true });
    expect(outcome.entry).toMatchObject({
      contact: CONTACT,
      listed: true,
      subscription: 'none',
      pendingOut: true,
    });
  });

  it('"subscribe" again while pending changes nothing and pushes nothing, but is routed', () => {
    const outcome = userSendsSubscription(entry('None + Pending Out'), CONTACT, 'subscribe', {
      preApproval: true,
    });
    expect(outcome).toMatchObject({ route: true, push: false });
  });

  it('§3.1.5: approving a pending request from a stranger adds the item with From, sends presence', () => {
    const stranger = { ...entry('None + Pending In'), listed: false };
    const outcome = userSendsSubscription(stranger, CONTACT, 'subscribed', { preApproval: true });
    expect(outcome).toMatchObject({ route: true, push: true, presence: 'available' });
    expect(outcome.entry).toMatchObject({ listed: true, subscription: 'from', pendingIn: undefined });
  });

  it('§3.2.2: "unsubscribed" to a subscriber cancels it and tells the contact the user is unavailable', () => {
    const outcome = userSendsSubscription(entry('Both'), CONTACT, 'unsubscribed', { preApproval: true });
    expect(outcome).toMatchObject({ route: true, push: true, presence: 'unavailable' });
    expect(outcome.entry?.subscription).toBe('to');
  });

  it("denying a stranger's request deletes the row and routes the refusal, without a push", () => {
    const stranger = { ...entry('None + Pending In'), listed: false };
    const outcome = userSendsSubscription(stranger, CONTACT, 'unsubscribed', { preApproval: true });
    expect(outcome).toEqual({ entry: null, route: true, push: false, presence: undefined });
  });

  it('"unsubscribed" with nothing to cancel goes nowhere', () => {
    expect(
      userSendsSubscription(entry('None'), CONTACT, 'unsubscribed', { preApproval: true }),
    ).toMatchObject({
      route: false,
      push: false,
    });
  });
});

describe('§3.4 pre-approval', () => {
  it.each([['None'], ['None + Pending Out'], ['To']] as const)(
    '"subscribed" in %s sets approved=true, pushes, and is not sent',
    (state) => {
      // §3.4.2: "the user's server MUST NOT send the presence stanza of type "subscribed" to the contact"
      const outcome = userSendsSubscription(entry(state), CONTACT, 'subscribed', { preApproval: true });
      expect(outcome).toMatchObject({ route: false, push: true });
      expect(outcome.entry).toMatchObject({ approved: true, subscription: stateNamed(state).subscription });
    },
  );

  it('a contact not yet in the roster gets an item with state None and approved=true', () => {
    const outcome = userSendsSubscription(undefined, CONTACT, 'subscribed', { preApproval: true });
    expect(outcome.entry).toMatchObject({ listed: true, subscription: 'none', approved: true });
    expect(outcome.route).toBe(false);
  });

  it.each([['From'], ['From + Pending Out'], ['Both']] as const)(
    '"subscribed" in %s is silently ignored',
    (state) => {
      const outcome = userSendsSubscription(entry(state), CONTACT, 'subscribed', { preApproval: true });
      expect(outcome).toMatchObject({ route: false, push: false });
    },
  );

  it('without pre-approval, "subscribed" with no pending request is dropped and stores nothing', () => {
    expect(userSendsSubscription(undefined, CONTACT, 'subscribed', { preApproval: false })).toEqual({
      entry: null,
      route: false,
      push: false,
      presence: undefined,
    });
  });

  it.each([
    ['None', 'From'],
    ['None + Pending Out', 'From + Pending Out'],
    ['To', 'Both'],
  ] as const)('a pre-approved "subscribe" in %s is auto-approved to %s, not delivered', (state, expected) => {
    // Given to the requesting account (created at 1000).
    const outcome = contactReceivesSubscription(
      entry(state, { approved: true, approvedFor: 1_000 }),
      CONTACT,
      'subscribe',
      SUBSCRIBE,
      1_000,
    );
    expect(outcome).toMatchObject({
      deliver: false,
      autoReply: 'subscribed',
      push: true,
      presence: 'available',
    });
    const after = outcome.entry as RosterEntry;
    expect(stateName({ ...after, pendingIn: after.pendingIn !== undefined })).toBe(expected);
    expect(outcome.entry?.approved).toBe(false);
  });

  it('a pre-approval names the account it approves (its creation time), or when it was given to a JID of another domain', () => {
    const toAccount = userSendsSubscription(undefined, CONTACT, 'subscribed', {
      preApproval: true,
      contactCreatedAt: 1_000,
      at: 7_000,
    });
    expect(toAccount.entry).toMatchObject({ approved: true, approvedFor: 1_000 });
    expect(toAccount.entry?.approvedAt).toBeUndefined();
    const toNoAccount = userSendsSubscription(undefined, CONTACT, 'subscribed', {
      preApproval: true,
      at: 7_000,
    });
    expect(toNoAccount.entry).toMatchObject({ approved: true, approvedAt: 7_000 });
    expect(toNoAccount.entry?.approvedFor).toBeUndefined();
  });

  /** A "subscribe" from CONTACT (its account created at `createdAt`) to a user who pre-approved it. */
  const subscribeToApproved = (given: Partial<RosterEntry>, createdAt: number | undefined) =>
    contactReceivesSubscription(
      entry('None', { approved: true, ...given }),
      CONTACT,
      'subscribe',
      SUBSCRIBE,
      createdAt,
    );

  it.each([
    ['the account it was given to', { approvedFor: 1_000 }, 1_000],
    ['any account, given before approvals named one (stored before session 33)', {}, 9_000],
  ] as const)('auto-approves a "subscribe" from %s', (_, given, createdAt) => {
    const outcome = subscribeToApproved(given, createdAt);
    expect(outcome).toMatchObject({ deliver: false, autoReply: 'subscribed' });
  });

  it.each([
    [
      'an account created again under the JID after the approved one was deleted',
      { approvedFor: 1_000 },
      9_000,
    ],
    ['a JID whose approval named no account (given to another domain)', { approvedAt: 5_000 }, 9_000],
    ['a JID whose account is gone (a stream outliving its deletion)', { approvedFor: 1_000 }, undefined],
  ] as const)('delivers a "subscribe" from %s, and the approval goes', (_, given, createdAt) => {
    // §3.1.3: the request reaches the user, who decides: the approval was for another account.
    const outcome = subscribeToApproved(given, createdAt);
    expect(outcome).toMatchObject({ deliver: true, push: true });
    expect(outcome.autoReply).toBeUndefined();
    expect(outcome.entry).toMatchObject({ approved: false, subscription: 'none', pendingIn: SUBSCRIBE });
    expect(outcome.entry?.approvedFor).toBeUndefined();
    expect(outcome.entry?.approvedAt).toBeUndefined();
  });

  it('"unsubscribed" cancels a pre-approval without sending anything', () => {
    const outcome = userSendsSubscription(entry('None', { approved: true }), CONTACT, 'unsubscribed', {
      preApproval: true,
    });
    expect(outcome).toMatchObject({ route: false, push: true });
    expect(outcome.entry?.approved).toBe(false);
  });
});

describe('entries: the contact receives (§3.1.3, §3.3.3)', () => {
  it('§3.1.3: a "subscribe" from a stranger is kept with its stanza, not added to the roster', () => {
    const outcome = contactReceivesSubscription(undefined, USER, 'subscribe', SUBSCRIBE);
    expect(outcome).toMatchObject({ deliver: true, push: false });
    expect(outcome.entry).toMatchObject({ contact: USER, listed: false, pendingIn: SUBSCRIBE });
  });

  it('at most one pending request per contact: a second "subscribe" keeps the first stanza and is not delivered', () => {
    const first = contactReceivesSubscription(undefined, USER, 'subscribe', SUBSCRIBE);
    const second = contactReceivesSubscription(
      first.entry,
      USER,
      'subscribe',
      '<presence type="subscribe"/>',
    );
    expect(second).toMatchObject({ deliver: false, push: false });
    expect(second.entry?.pendingIn).toBe(SUBSCRIBE);
  });

  it('the requester withdrawing ("unsubscribe") removes the stranger\'s row, delivered', () => {
    const pending = contactReceivesSubscription(undefined, USER, 'subscribe', SUBSCRIBE).entry;
    const outcome = contactReceivesSubscription(pending, USER, 'unsubscribe', '');
    expect(outcome).toMatchObject({ entry: null, deliver: true, push: false });
  });

  it('§3.3.3: "unsubscribe" from a subscriber ends it, pushes, and sends unavailable presence back', () => {
    const outcome = contactReceivesSubscription(entry('Both'), CONTACT, 'unsubscribe', '');
    expect(outcome).toMatchObject({ deliver: true, push: true, presence: 'unavailable' });
    expect(outcome.entry?.subscription).toBe('to');
  });

  it('§3.1.6: "subscribed" while pending out makes To and is delivered', () => {
    const outcome = contactReceivesSubscription(entry('None + Pending Out'), CONTACT, 'subscribed', '');
    expect(outcome).toMatchObject({ deliver: true, push: true });
    expect(outcome.entry).toMatchObject({ subscription: 'to', pendingOut: false });
  });

  it('§3.1.3: "subscribe" for an account that does not exist is answered "unsubscribed"', () => {
    expect(answerForUnknownAccount('subscribe')).toBe('unsubscribed');
    expect(answerForUnknownAccount('unsubscribe')).toBeUndefined();
  });
});

describe('§2.5.2 removal', () => {
  it.each([
    ['None', []],
    ['None + Pending Out', ['unsubscribe']],
    ['None + Pending In', ['unsubscribed']],
    ['To', ['unsubscribe']],
    ['From', ['unsubscribed']],
    ['Both', ['unsubscribe', 'unsubscribed']],
  ] as const)('removing an item in %s sends %j', (state, stanzas) => {
    expect(removalStanzas(entry(state))).toEqual(stanzas);
  });

  it('the contact of a mutual subscription ends at None, pushed, with both stanzas delivered', () => {
    const contactSide = { ...entry('Both'), contact: USER };
    const outcome = contactSeesRemoval(contactSide, USER, ['unsubscribe', 'unsubscribed']);
    expect(outcome.entry).toMatchObject({ listed: true, subscription: 'none' });
    expect(outcome).toMatchObject({
      deliver: ['unsubscribe', 'unsubscribed'],
      push: true,
      presence: 'unavailable',
    });
  });
});

function conditionOf(action: () => unknown): string | undefined {
  try {
    action();
    return undefined;
  } catch (error) {
    if (error instanceof StanzaError) return `${error.type}/${error.condition}`;
    throw error;
  }
}

const q = (items: string) => parse(`<query xmlns='jabber:iq:roster'>${items}</query>`);

describe('§2.3 roster set: decode grid', () => {
  it('a plain item becomes an update with name and groups', () => {
    expect(
      decodeRosterSet(q(`<item jid='Nurse@Example.com' name='Nurse'><group>Servants</group></item>`), USER),
    ).toEqual({ kind: 'update', contact: 'nurse@example.com', name: 'Nurse', groups: ['Servants'] });
  });

  it('§2.5: subscription="remove" is a removal', () => {
    expect(decodeRosterSet(q(`<item jid='nurse@example.com' subscription='remove'/>`), USER)).toEqual({
      kind: 'remove',
      contact: 'nurse@example.com',
    });
  });

  it.each([['both'], ['from'], ['to'], ['none'], ['bogus']])(
    '"the server MUST ignore all values of the \'subscription\' attribute other than "remove"": %s',
    (value) => {
      expect(
        decodeRosterSet(
          q(`<item jid='nurse@example.com' subscription='${value}' ask='subscribe' approved='true'/>`),
          USER,
        ),
      ).toEqual({ kind: 'update', contact: 'nurse@example.com', name: undefined, groups: [] });
    },
  );

  const long = 'x'.repeat(1024);
  it.each([
    [
      'two items ("more than one <item/> child element")',
      `<item jid='a@b'/><item jid='c@d'/>`,
      'modify/bad-request',
    ],
    ['no item', '', 'modify/bad-request'],
    ['an item without jid', `<item name='x'/>`, 'modify/bad-request'],
    ['a malformed JID', `<item jid='@example.com'/>`, 'modify/jid-malformed'],
    ['an empty JID', `<item jid=''/>`, 'modify/jid-malformed'],
    ['a full JID', `<item jid='nurse@example.com/balcony'/>`, 'modify/bad-request'],
    ["the user's own JID", `<item jid='${USER}'/>`, 'cancel/not-allowed'],
    ["the user's own JID, other case", `<item jid='Juliet@Example.com'/>`, 'cancel/not-allowed'],
    ['an empty group (zero length)', `<item jid='a@b'><group/></item>`, 'modify/not-acceptable'],
    ['duplicate groups', `<item jid='a@b'><group>G</group><group>G</group></item>`, 'modify/bad-request'],
    ['a name over the limit', `<item jid='a@b' name='${long}'/>`, 'modify/not-acceptable'],
    ['a group over the limit', `<item jid='a@b'><group>${long}</group></item>`, 'modify/not-acceptable'],
    [
      'too many groups',
      `<item jid='a@b'>${Array.from({ length: 65 }, (_, i) => `<group>g${i}</group>`).join('')}</item>`,
      'modify/not-acceptable',
    ],
  ])('%s → %s', (_what, items, condition) => {
    expect(conditionOf(() => decodeRosterSet(q(items), USER))).toBe(condition);
  });

  it('limits are counted in UTF-8 bytes, up to and including the bound', () => {
    const name = 'é'.repeat(511); // 1022 bytes
    expect(conditionOf(() => decodeRosterSet(q(`<item jid='a@b' name='${name}'/>`), USER))).toBeUndefined();
    expect(conditionOf(() => decodeRosterSet(q(`<item jid='a@b' name='${name}é'/>`), USER))).toBe(
      'modify/not-acceptable',
    );
  });

  it("bounds an item's name and groups together at 2 KB (every presence change reads the whole roster)", () => {
    const group = (i: number) => `<group>${String(i).padStart(3, '0')}${'g'.repeat(509)}</group>`; // 512 bytes
    const groups = (n: number) => Array.from({ length: n }, (_, i) => group(i)).join('');
    expect(
      conditionOf(() => decodeRosterSet(q(`<item jid='a@b'>${groups(4)}</item>`), USER)),
    ).toBeUndefined();
    expect(conditionOf(() => decodeRosterSet(q(`<item jid='a@b' name='n'>${groups(4)}</item>`), USER))).toBe(
      'modify/not-acceptable',
    );
    expect(conditionOf(() => decodeRosterSet(q(`<item jid='a@b'>${groups(5)}</item>`), USER))).toBe(
      'modify/not-acceptable',
    );
  });

  it('an empty name means no name', () => {
    expect(decodeRosterSet(q(`<item jid='a@b' name=''/>`), USER)).toMatchObject({ name: undefined });
  });

  it('§2.3.2: a set keeps the subscription state and takes the new name and groups', () => {
    const current = entry('Both', { name: 'Old', groups: ['A'] });
    const next = entryAfterSet(current, {
      kind: 'update',
      contact: CONTACT,
      name: 'New',
      groups: ['B', 'C'],
    });
    expect(next).toMatchObject({ subscription: 'both', name: 'New', groups: ['B', 'C'], listed: true });
    const fresh = entryAfterSet(undefined, { kind: 'update', contact: CONTACT, groups: [] });
    expect(fresh).toMatchObject({ subscription: 'none', pendingOut: false, listed: true });
  });
});

describe('§2.2 roster get and §2.6 versioning', () => {
  const items = [
    entry('Both', { name: 'Romeo', groups: ['Friends'] }),
    entry('None + Pending Out', { contact: 'nurse@example.com' }),
  ];

  it('without ver, the whole roster and no ver attribute', () => {
    const request = decodeRosterGet(q(''));
    const answer = decideRosterGet(request, '1a2b-7');
    expect(answer).toEqual({ kind: 'full' });
    expect(encodeRosterResult(answer, items)?.toString()).toBe(
      `<query xmlns="jabber:iq:roster"><item jid="${CONTACT}" subscription="both" name="Romeo"><group>Friends</group></item><item jid="nurse@example.com" subscription="none" ask="subscribe"/></query>`,
    );
  });

  it('§2.6.3: a client presenting the current ver gets an empty result', () => {
    const request = decodeRosterGet(parse(`<query xmlns='jabber:iq:roster' ver='1a2b-7'/>`));
    const answer = decideRosterGet(request, '1a2b-7');
    expect(answer).toEqual({ kind: 'unchanged' });
    expect(encodeRosterResult(answer, items)).toBeUndefined();
  });

  it('an older or empty ver gets the whole roster with the current ver', () => {
    for (const ver of ['1a2b-6', '']) {
      const answer = decideRosterGet(
        decodeRosterGet(parse(`<query xmlns='jabber:iq:roster' ver='${ver}'/>`)),
        '1a2b-7',
      );
      expect(answer).toEqual({ kind: 'full', ver: '1a2b-7' });
      expect(encodeRosterResult(answer, items)?.attrs.ver).toBe('1a2b-7');
    }
  });

  it('unlisted rows (pending requests from strangers) are not roster items', () => {
    const stranger = { ...entry('None + Pending In'), listed: false, contact: 'x@y' };
    expect(encodeRosterResult({ kind: 'full' }, [stranger])?.children).toHaveLength(0);
  });

  it('§2.1.6: a push carries the item and ver; a removed item is subscription="remove"', () => {
    const push = encodeRosterPush({
      user: USER,
      to: `${USER}/balcony`,
      id: 'p1',
      contact: CONTACT,
      entry: items[0],
      ver: '1a2b-8',
    });
    expect(push.toString()).toBe(
      `<iq type="set" id="p1" from="${USER}" to="${USER}/balcony"><query xmlns="jabber:iq:roster" ver="1a2b-8"><item jid="${CONTACT}" subscription="both" name="Romeo"><group>Friends</group></item></query></iq>`,
    );
    const removal = encodeRosterPush({
      user: USER,
      to: `${USER}/balcony`,
      id: 'p2',
      contact: CONTACT,
      entry: null,
      ver: '1a2b-9',
    });
    expect(removal.getChild('query')?.getChild('item')?.attrs).toEqual({
      jid: CONTACT,
      subscription: 'remove',
    });
  });

  it('approved appears only as "true"', () => {
    const item = encodeRosterResult({ kind: 'full' }, [entry('None', { approved: true })])?.getChild('item');
    expect(item?.attrs.approved).toBe('true');
  });

  it('stream features: roster versioning, and pre-approval when offered', () => {
    expect(rosterStreamFeatures({ preApproval: true }).map(String)).toEqual([
      '<ver xmlns="urn:xmpp:features:rosterver"/>',
      '<sub xmlns="urn:xmpp:features:pre-approval"/>',
    ]);
    expect(rosterStreamFeatures({ preApproval: false })).toHaveLength(1);
  });
});

describe('§4 presence recipients', () => {
  const roster: RosterEntry[] = STATE_NAMES.map((state, i) => entry(state, { contact: `c${i}@example.net` }));
  const byState = (names: StateName[]) => names.map((name) => `c${STATE_NAMES.indexOf(name)}@example.net`);

  it('§4.2.2: presence is broadcast to contacts with subscription from or both', () => {
    expect(presenceSubscribers(roster)).toEqual(byState(['From', 'From + Pending Out', 'Both']));
  });

  it('§4.2.2: probes go to contacts with subscription to or both', () => {
    expect(probeTargets(roster)).toEqual(byState(['To', 'To + Pending In', 'Both']));
  });

  it('unlisted rows never receive presence and are never probed', () => {
    const stranger = { ...entry('Both'), listed: false };
    expect(presenceSubscribers([stranger])).toEqual([]);
    expect(probeTargets([stranger])).toEqual([]);
  });

  it('§4.3.2: a probe is answered with presence only for a subscriber', () => {
    expect(answerProbe(entry('From'))).toBe('presence');
    expect(answerProbe(entry('Both'))).toBe('presence');
    expect(answerProbe(entry('To'))).toBe('unsubscribed');
    expect(answerProbe(undefined)).toBe('unsubscribed');
  });

  it('§3.1.3: pending requests are redelivered, one per contact', () => {
    expect(pendingRequestsToRedeliver(roster)).toHaveLength(3);
  });

  it('account queries to the bare JID: the user, or a contact the user shares presence with', () => {
    expect(mayQueryAccount(USER, USER, undefined)).toBe(true);
    expect(mayQueryAccount(CONTACT, USER, entry('From'))).toBe(true);
    expect(mayQueryAccount(CONTACT, USER, entry('To'))).toBe(false);
    expect(mayQueryAccount(CONTACT, USER, undefined)).toBe(false);
  });
});
