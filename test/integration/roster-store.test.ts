/**
 * The Roster store against the run's DynamoDB Local: items, versions, both sides of a
 * subscription in one transaction, pending requests (at most one per contact), the
 * 500-contact login read measured through the meter, and the bounds.
 */
import { GetCommand, PutCommand, UpdateCommand } from '@aws-sdk/lib-dynamodb';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  contactReceivesSubscription,
  userSendsSubscription,
} from '../../shared/modules/rfc6121-roster/subscription-states.ts';
import { createDocumentClient, DynamoMeter } from '../../shared/store/dynamo.ts';
import {
  createRosterStore,
  itemBytes,
  type RosterEntry,
  RosterFullError,
  type RosterStore,
} from '../../shared/store/roster.ts';
import { createTestTables, TEST_REGION, useDynamoDbLocal } from '../support/dynamodb.ts';

let table: string;
let roster: RosterStore;
const meter = new DynamoMeter();
let doc: ReturnType<typeof createDocumentClient>;
let counter = 0;
const fresh = (name: string) => `${name}${++counter}-${Date.now().toString(36)}@localhost`;

beforeAll(async () => {
  table = (await createTestTables()).roster;
  doc = createDocumentClient({ endpoint: useDynamoDbLocal(), region: TEST_REGION, meter });
  roster = createRosterStore(doc, table, { maxItems: 1000 });
});

function item(contact: string, extra: Partial<RosterEntry> = {}): RosterEntry {
  return {
    contact,
    listed: true,
    groups: [],
    subscription: 'none',
    pendingOut: false,
    approved: false,
    ...extra,
  };
}

/** A roster set as the module will do it: one side, no contact read. */
function setItem(store: RosterStore, user: string, entry: RosterEntry) {
  return store.apply(user, entry.contact, { contactIsLocal: false }, () => ({
    user: entry,
    outcome: undefined,
  }));
}

describe('items and versions', () => {
  it('an empty roster has version 0 and no items', async () => {
    const user = fresh('empty');
    expect(await roster.getRoster(user)).toEqual({ version: '0', items: [], pendingIn: [] });
    expect(await roster.getVersion(user)).toBe('0');
  });

  it('creates, updates and removes an item; every change moves the version', async () => {
    const user = fresh('crud');
    const contact = fresh('nurse');
    const created = await setItem(roster, user, item(contact, { name: 'Nurse', groups: ['Servants'] }));
    expect(created.user).toMatchObject({ itemChanged: true });
    const v1 = created.user.version;
    expect(v1).toMatch(/^[0-9a-f]{8}-1$/);
    expect(await roster.getEntry(user, contact)).toMatchObject({
      name: 'Nurse',
      groups: ['Servants'],
      rev: 1,
    });

    const renamed = await setItem(roster, user, item(contact, { name: 'Angelica', groups: ['Servants'] }));
    expect(renamed.user.version).not.toBe(v1);
    expect(renamed.user.version).toBe(v1.replace(/-1$/, '-2'));

    const same = await setItem(roster, user, item(contact, { name: 'Angelica', groups: ['Servants'] }));
    expect(same.user).toMatchObject({ itemChanged: false, version: renamed.user.version });

    const removed = await roster.apply(user, contact, { contactIsLocal: false }, () => ({
      user: null,
      outcome: 0,
    }));
    expect(removed.user).toMatchObject({ itemChanged: true, after: undefined });
    const after = await roster.getRoster(user);
    expect(after.items).toEqual([]);
    expect(after.version).toBe(v1.replace(/-1$/, '-3'));
    expect(await roster.getVersion(user)).toBe(after.version);
  });

  it('a writer that read a stale row decides again on the fresh one', async () => {
    const user = fresh('race');
    const contact = fresh('race-contact');
    await setItem(roster, user, item(contact, { name: 'A' }));
    const seen: (string | undefined)[] = [];
    const result = await roster.apply(user, contact, { contactIsLocal: false }, async (pair) => {
      seen.push(pair.user?.name);
      if (seen.length === 1) {
        // Another writer renames the item between this read and this write.
        await setItem(roster, user, item(contact, { name: 'B' }));
      }
      return { user: { ...(pair.user as RosterEntry), groups: ['G'] }, outcome: pair.user?.name };
    });
    expect(seen).toEqual(['A', 'B']);
    expect(result.outcome).toBe('B');
    expect(await roster.getEntry(user, contact)).toMatchObject({ name: 'B', groups: ['G'], rev: 3 });
    expect(result.user.version).toMatch(/-3$/);
  });
});

describe('both sides of a subscription in one transaction', () => {
  function subscribe(user: string, contact: string, stanza: string) {
    return roster.apply(user, contact, { contactIsLocal: true }, (pair) => {
      const out = userSendsSubscription(pair.user, contact, 'subscribe', { preApproval: true });
      const inbound = out.route
        ? contactReceivesSubscription(pair.contact, user, 'subscribe', stanza)
        : undefined;
      return { user: out.entry, contact: inbound?.entry, outcome: { out, inbound } };
    });
  }
  function approve(approver: string, requester: string) {
    return roster.apply(approver, requester, { contactIsLocal: true }, (pair) => {
      const out = userSendsSubscription(pair.user, requester, 'subscribed', { preApproval: true });
      const inbound = out.route
        ? contactReceivesSubscription(pair.contact, approver, 'subscribed', '')
        : undefined;
      return { user: out.entry, contact: inbound?.entry, outcome: { out, inbound } };
    });
  }

  it('subscribe → pending on both sides; subscribed → to/from; versions move only where the item changed', async () => {
    const juliet = fresh('juliet');
    const romeo = fresh('romeo');
    const stanza = `<presence from='${juliet}' to='${romeo}' type='subscribe'/>`;
    const asked = await subscribe(juliet, romeo, stanza);
    expect(asked.outcome.inbound?.deliver).toBe(true);
    expect(asked.user).toMatchObject({ itemChanged: true });
    // Romeo's roster is unchanged as a client sees it: a request from a stranger is no item.
    expect(asked.contact).toMatchObject({ itemChanged: false, version: '0' });

    const romeoRoster = await roster.getRoster(romeo);
    expect(romeoRoster.items).toEqual([]);
    expect(romeoRoster.pendingIn).toMatchObject([{ contact: juliet, listed: false, pendingIn: stanza }]);
    expect((await roster.getRoster(juliet)).items).toMatchObject([
      { contact: romeo, subscription: 'none', pendingOut: true },
    ]);

    meter.reset();
    const approved = await approve(romeo, juliet);
    const cost = meter.snapshot();
    // One BatchGetItem (4 keys: both items, both meta items), one TransactWriteItems (4 writes).
    expect(cost.operations.BatchGetItem.requests).toBe(1);
    expect(cost.operations.TransactWriteItems.requests).toBe(1);
    expect(cost.requests).toBe(2);
    // On AWS a transaction bills 2 write units per item of up to 1 KB: 4 small items → 8 WRU.
    // DynamoDB Local reports one figure for the whole transaction (2 here), so only a floor
    // is asserted; the 4 reads are reported as on AWS (1 RCU per consistent read up to 4 KB).
    expect(cost.readUnits).toBe(4);
    expect(cost.writeUnits).toBeGreaterThanOrEqual(2);
    console.log(
      `two-sided approval: ${cost.requests} requests, ${cost.readUnits} RCU, ${cost.writeUnits} WRU`,
    );
    expect(approved.outcome.out).toMatchObject({ route: true, presence: 'available' });
    expect(approved.user.itemChanged).toBe(true);
    expect(approved.contact?.itemChanged).toBe(true);

    const [j, r] = [await roster.getRoster(juliet), await roster.getRoster(romeo)];
    expect(j.items).toMatchObject([{ contact: romeo, subscription: 'to', pendingOut: false }]);
    expect(r.items).toMatchObject([{ contact: juliet, subscription: 'from', listed: true }]);
    expect(r.pendingIn).toEqual([]);
    expect(j.version).toBe(approved.contact?.version);
    expect(r.version).toBe(approved.user.version);
  });

  it('pending requests: at most one per contact, the first stanza kept, never duplicated', async () => {
    const juliet = fresh('juliet');
    const romeo = fresh('romeo');
    const first = `<presence from='${juliet}' type='subscribe'><status>first</status></presence>`;
    await subscribe(juliet, romeo, first);
    const again = await subscribe(
      juliet,
      romeo,
      `<presence from='${juliet}' type='subscribe'><status>second</status></presence>`,
    );
    expect(again.outcome.inbound?.deliver).toBe(false);
    const r = await roster.getRoster(romeo);
    expect(r.pendingIn).toHaveLength(1);
    expect(r.pendingIn[0].pendingIn).toBe(first);
  });

  it('a failing side cancels the whole transaction: neither roster changes', async () => {
    const small = createRosterStore(doc, table, { maxItems: 1 });
    const juliet = fresh('juliet');
    const romeo = fresh('romeo');
    const nurse = fresh('nurse');
    // Romeo already keeps one unlisted request (from the nurse): his request slots are full.
    await small.apply(nurse, romeo, { contactIsLocal: true }, (pair) => ({
      user: userSendsSubscription(pair.user, romeo, 'subscribe', { preApproval: true }).entry,
      contact: contactReceivesSubscription(pair.contact, nurse, 'subscribe', '<presence/>').entry,
      outcome: undefined,
    }));
    const attempt = small.apply(juliet, romeo, { contactIsLocal: true }, (pair) => ({
      user: userSendsSubscription(pair.user, romeo, 'subscribe', { preApproval: true }).entry,
      contact: contactReceivesSubscription(pair.contact, juliet, 'subscribe', '<presence/>').entry,
      outcome: undefined,
    }));
    await expect(attempt).rejects.toMatchObject({ name: 'RosterFullError', owner: romeo, kind: 'requests' });
    expect(await small.getRoster(juliet)).toEqual({ version: '0', items: [], pendingIn: [] });
    expect((await small.getRoster(romeo)).pendingIn.map((e) => e.contact)).toEqual([nurse]);
  });
});

/** A store with room for two items of a 300-byte name and a group, not three; the two are set. */
async function twoOfThreeFit(prefix: string) {
  const user = fresh(prefix);
  const [a, b, c] = [fresh('a'), fresh('b'), fresh('c')];
  const named = (contact: string, name: string) => item(contact, { name, groups: ['g'] });
  const room = itemBytes(named(a, 'x'.repeat(300))) * 2 + 10;
  const small = createRosterStore(doc, table, { maxItems: 1000, maxBytes: room });
  await setItem(small, user, named(a, 'x'.repeat(300)));
  await setItem(small, user, named(b, 'x'.repeat(300)));
  return { user, a, b, c, named, room, small };
}

describe('bounds', () => {
  it('refuses the item past maxItems with RosterFullError, and accepts it after a removal', async () => {
    const small = createRosterStore(doc, table, { maxItems: 3 });
    const user = fresh('bounded');
    const contacts = [fresh('a'), fresh('b'), fresh('c'), fresh('d')];
    for (const contact of contacts.slice(0, 3)) await setItem(small, user, item(contact));
    await expect(setItem(small, user, item(contacts[3]))).rejects.toBeInstanceOf(RosterFullError);
    // Updating an existing item is not adding one.
    await setItem(small, user, item(contacts[0], { name: 'renamed' }));
    await small.apply(user, contacts[1], { contactIsLocal: false }, () => ({
      user: null,
      outcome: undefined,
    }));
    await setItem(small, user, item(contacts[3]));
    expect((await small.getRoster(user)).items.map((e) => e.contact).sort()).toEqual(
      [contacts[0], contacts[2], contacts[3]].sort(),
    );
  });

  it('refuses an item past maxBytes (the roster result must fit one post), counting renames and removals', async () => {
    const { user, a, b, c, named, room, small } = await twoOfThreeFit('bytes');
    await expect(setItem(small, user, named(c, 'x'.repeat(300)))).rejects.toMatchObject({
      name: 'RosterFullError',
      owner: user,
      kind: 'bytes',
      limit: room,
    });
    // Growing an item's name past the room is refused the same way; shrinking frees room.
    await expect(setItem(small, user, named(a, 'x'.repeat(320)))).rejects.toMatchObject({ kind: 'bytes' });
    await setItem(small, user, named(a, 'short'));
    await setItem(small, user, named(c, 'x'.repeat(150)));
    await small.apply(user, b, { contactIsLocal: false }, () => ({ user: null, outcome: undefined }));
    await setItem(small, user, named(b, 'x'.repeat(300)));
    expect((await small.getRoster(user)).items.map((e) => e.contact).sort()).toEqual([a, b, c].sort());
  });

  it('counts a roster written before the byte count from its items at its next change', async () => {
    const { user, a, b, named, c, small } = await twoOfThreeFit('legacy');
    // As a roster of an earlier version left it: items counted, their bytes not.
    await doc.send(
      new UpdateCommand({ TableName: table, Key: { pk: user, sk: 'ver' }, UpdateExpression: 'REMOVE bytes' }),
    );
    await expect(setItem(small, user, named(c, 'x'.repeat(300)))).rejects.toMatchObject({ kind: 'bytes' });
    // A change that fits records the total its Query found.
    await setItem(small, user, named(a, 'short'));
    const { Item } = await doc.send(new GetCommand({ TableName: table, Key: { pk: user, sk: 'ver' } }));
    expect(Item?.bytes).toBe(itemBytes(named(a, 'short')) + itemBytes(named(b, 'x'.repeat(300))));
  });

  it('a contact JID too long for a sort key is never looked up', async () => {
    expect(await roster.getEntry(fresh('u'), `${'x'.repeat(1023)}@${'y'.repeat(100)}`)).toBeUndefined();
  });
});

describe('login read of a 500-contact roster', () => {
  it('is one Query (one page), with read units bounded by the roster size', async () => {
    const user = fresh('popular');
    const big = createRosterStore(doc, table, { maxItems: 1000 });
    // Seeded directly (500 transactions would only slow the test down); same item shape.
    const writes: Promise<unknown>[] = [];
    for (let i = 0; i < 500; i++) {
      const contact = `contact${String(i).padStart(3, '0')}@example.net`;
      writes.push(
        doc.send(
          new PutCommand({
            TableName: table,
            Item: {
              pk: user,
              sk: `c#${contact}`,
              contact,
              listed: true,
              name: `Contact number ${i}`,
              groups: ['Friends', 'Work'],
              sub: i % 4 === 0 ? 'both' : 'to',
              rev: 1,
            },
          }),
        ),
      );
      if (writes.length === 25) await Promise.all(writes.splice(0));
    }
    await Promise.all(writes);
    await doc.send(
      new PutCommand({
        TableName: table,
        Item: { pk: user, sk: 'ver', v: 500, epoch: 'abcd1234', items: 500, requests: 0 },
      }),
    );

    meter.reset();
    const loaded = await big.getRoster(user);
    const usage = meter.snapshot();
    expect(loaded.items).toHaveLength(500);
    expect(loaded.version).toBe('abcd1234-500');
    expect(usage.operations.Query.requests).toBe(1);
    expect(usage.requests).toBe(1);
    // ~120 bytes an item: ~60 KB read strongly consistent = 1 RCU per 4 KB, so ~15 RCU.
    expect(usage.readUnits).toBeGreaterThan(0);
    expect(usage.readUnits).toBeLessThanOrEqual(30);
    console.log(`500-contact login read: ${usage.requests} request(s), ${usage.readUnits} RCU`);

    meter.reset();
    await big.getVersion(user);
    expect(meter.snapshot()).toMatchObject({ requests: 1, readUnits: 1 });
  });
});
