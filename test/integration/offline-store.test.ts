/**
 * The Offline store (shared/store/offline.ts) against the run's DynamoDB Local: ids in storing
 * order, paging, the counter kept by ADD and corrected at the quota, removal that counts only
 * what it removed, purge, and expiry checked by the reader before DynamoDB's TTL deletes.
 */
import { DeleteCommand, GetCommand, PutCommand, UpdateCommand } from '@aws-sdk/lib-dynamodb';
import { beforeAll, describe, expect, it } from 'vitest';
import { seedOffline } from '../../infra/local/offline-seed.ts';
import { createDocumentClient, isTransientStoreError } from '../../shared/store/dynamo.ts';
import {
  COUNT_RECOUNT_INTERVAL_MS,
  createOfflineStore,
  HELD_QUOTA_FACTOR,
  type OfflineMessage,
  OfflineQuotaExceededError,
  type OfflineStore,
  RECOUNT_INTERVAL_MS,
} from '../../shared/store/offline.ts';
import { TTL_ATTRIBUTE } from '../../shared/tables.ts';
import { createTestTables, TEST_REGION, useDynamoDbLocal } from '../support/dynamodb.ts';
import { intercept } from '../support/intercept.ts';

const TTL_SECONDS = 7 * 86400;
const QUOTA = 5;

let table: string;
let doc: ReturnType<typeof createDocumentClient>;
let offline: OfflineStore;
let counter = 0;
const freshUser = (name: string) => `${name}${++counter}-${Date.now().toString(36)}@localhost`;

beforeAll(async () => {
  table = (await createTestTables()).offline;
  doc = createDocumentClient({ endpoint: useDynamoDbLocal(), region: TEST_REGION });
  offline = createOfflineStore(doc, table, { quota: QUOTA, ttlSeconds: TTL_SECONDS });
});

function message(n: number, storedAt = Date.now()): Omit<OfflineMessage, 'id'> {
  return {
    from: `sender@localhost/r${n}`,
    storedAt,
    stanza: `<message id='m${n}'><body>${n}</body></message>`,
  };
}

async function storeMany(user: string, count: number): Promise<OfflineMessage[]> {
  const stored: OfflineMessage[] = [];
  for (let i = 1; i <= count; i++) stored.push(await offline.store(user, message(i), { ignoreQuota: true }));
  return stored;
}

async function rawItem(pk: string, sk: string): Promise<Record<string, unknown> | undefined> {
  const { Item } = await doc.send(
    new GetCommand({ TableName: table, Key: { pk, sk }, ConsistentRead: true }),
  );
  return Item;
}

/** A message whose `expiresAt` has passed but which DynamoDB's TTL has not deleted yet. */
async function writeExpired(user: string, id: string): Promise<void> {
  const storedAt = Date.now() - 2 * TTL_SECONDS * 1000;
  await doc.send(
    new PutCommand({
      TableName: table,
      Item: {
        pk: user,
        sk: `m#${id}`,
        from: 'old@localhost/r',
        storedAt,
        stanza: '<message><body>expired</body></message>',
        [TTL_ATTRIBUTE]: Math.floor(Date.now() / 1000) - 60,
      },
    }),
  );
}

const ids = (messages: OfflineMessage[]) => messages.map((m) => m.id);

/** Sets attributes of `user`'s counter item directly (what races and expiries leave it as). */
async function setCounter(user: string, expression: string, values: Record<string, unknown>): Promise<void> {
  await doc.send(
    new UpdateCommand({
      TableName: table,
      Key: { pk: user, sk: 'count' },
      UpdateExpression: expression,
      ExpressionAttributeValues: values,
    }),
  );
}

describe('store', () => {
  it('returns the message with an id; ids increase in storing order, even for an older time stamp', async () => {
    const user = freshUser('order');
    const now = Date.now();
    const first = await offline.store(user, message(1, now));
    // A re-routed message keeps its original, older stamp (docs: "Ids follow the order of storing").
    const second = await offline.store(user, message(2, now - 3_600_000));
    const third = await offline.store(user, message(3, now));
    expect(first).toMatchObject({ ...message(1, now), id: expect.any(String) });
    expect(first.id < second.id && second.id < third.id).toBe(true);
    expect(ids((await offline.list(user)).messages)).toEqual([first.id, second.id, third.id]);
  });

  it('gives distinct, increasing ids to messages stored in the same millisecond', async () => {
    const user = freshUser('burst');
    const stored = await Promise.all(
      Array.from({ length: 8 }, (_, i) => offline.store(user, message(i), { ignoreQuota: true })),
    );
    expect(new Set(ids(stored)).size).toBe(8);
    const listed = ids((await offline.list(user)).messages);
    expect(listed).toEqual([...listed].sort());
    expect([...listed].sort()).toEqual([...ids(stored)].sort());
  });

  it('sets the TTL attribute to storedAt + ttlSeconds', async () => {
    const user = freshUser('ttl');
    const storedAt = Date.now() - 12_345;
    const { id } = await offline.store(user, message(1, storedAt));
    const item = await rawItem(user, `m#${id}`);
    expect(item?.[TTL_ATTRIBUTE]).toBe(Math.floor(storedAt / 1000) + TTL_SECONDS);
    expect(await rawItem(user, 'count')).not.toHaveProperty(TTL_ATTRIBUTE);
  });
});

describe('store with a record (the sender’s connection row, in the same transaction)', () => {
  const recordItem = (pk: string, value: string) => ({
    Update: {
      TableName: table,
      Key: { pk, sk: 'record' },
      UpdateExpression: 'SET storedOffline = :value',
      ConditionExpression: 'attribute_exists(pk)',
      ExpressionAttributeValues: { ':value': value },
    },
  });

  it('writes the record with the message', async () => {
    const user = freshUser('recorded');
    const pk = `row-${user}`;
    await doc.send(new PutCommand({ TableName: table, Item: { pk, sk: 'record' } }));
    const { id } = await offline.store(user, message(1), { record: recordItem(pk, 'frame-1 someone') });
    expect(await rawItem(user, `m#${id}`)).toBeDefined();
    expect((await rawItem(pk, 'record'))?.storedOffline).toBe('frame-1 someone');
  });

  it('stores the message without the record when the record’s item is gone, and creates no item for it', async () => {
    const user = freshUser('unrecorded');
    const pk = `row-${user}`;
    const { id } = await offline.store(user, message(1), { record: recordItem(pk, 'frame-2 someone') });
    expect(await rawItem(user, `m#${id}`)).toBeDefined();
    expect(await offline.count(user)).toBe(1);
    expect(await rawItem(pk, 'record')).toBeUndefined();
  });
});

describe('list', () => {
  let user: string;
  let all: string[];

  beforeAll(async () => {
    user = freshUser('list');
    all = ids(await storeMany(user, 5));
    await storeMany(freshUser('neighbour'), 2);
  });

  it('lists oldest first, only this user’s messages, with no cursor when everything fits', async () => {
    const page = await offline.list(user);
    expect(ids(page.messages)).toEqual(all);
    expect(page.messages[0]).toMatchObject({
      from: 'sender@localhost/r1',
      stanza: expect.stringContaining("id='m1'"),
    });
    expect(page.next).toBeUndefined();
    expect(await offline.list(freshUser('empty'))).toEqual({ messages: [], next: undefined });
  });

  it('pages with limit and the next cursor, passed back as after', async () => {
    const seen: string[][] = [];
    let after: string | undefined;
    do {
      const page = await offline.list(user, { limit: 2, after });
      seen.push(ids(page.messages));
      after = page.next;
      if (page.next) expect(page.next).toBe(page.messages.at(-1)?.id);
    } while (after);
    expect(seen).toEqual([all.slice(0, 2), all.slice(2, 4), all.slice(4)]);
  });

  it('after and before are exclusive bounds', async () => {
    expect(ids((await offline.list(user, { after: all[1] })).messages)).toEqual(all.slice(2));
    expect(ids((await offline.list(user, { before: all[3] })).messages)).toEqual(all.slice(0, 3));
    expect(ids((await offline.list(user, { after: all[0], before: all[4] })).messages)).toEqual(
      all.slice(1, 4),
    );
    expect(ids((await offline.list(user, { after: all[0], before: all[4], limit: 2 })).messages)).toEqual(
      all.slice(1, 3),
    );
  });

  it('newestFirst walks backwards; with before it pages back from the end (XEP-0059 "before")', async () => {
    expect(ids((await offline.list(user, { newestFirst: true })).messages)).toEqual([...all].reverse());
    const last2 = await offline.list(user, { newestFirst: true, limit: 2 });
    expect(ids(last2.messages)).toEqual([all[4], all[3]]);
    expect(last2.next).toBe(all[3]);
    const previous = await offline.list(user, { newestFirst: true, before: last2.next, limit: 2 });
    expect(ids(previous.messages)).toEqual([all[2], all[1]]);
    const first = await offline.list(user, { newestFirst: true, before: all[1], limit: 2 });
    // The counter item sorts before every message; it is never listed as one.
    expect(ids(first.messages)).toEqual([all[0]]);
  });
});

describe('get', () => {
  it('returns the messages asked for; missing ids and other users’ ids are absent', async () => {
    const user = freshUser('get');
    const other = freshUser('get-other');
    const [a, b, c] = await storeMany(user, 3);
    const [foreign] = await storeMany(other, 1);
    const found = await offline.get(user, [c?.id, a?.id, 'never-stored', foreign?.id, a?.id] as string[]);
    expect([...found.keys()].sort()).toEqual([a?.id, c?.id].sort());
    expect(found.get(a?.id as string)).toEqual(a);
    expect(found.has(b?.id as string)).toBe(false);
    expect((await offline.get(user, [])).size).toBe(0);
  });

  it('reads more than one batch of 100 keys', async () => {
    const user = freshUser('get-many');
    const seeded = await seedOffline(doc, table, user, 130);
    const found = await offline.get(user, [...ids(seeded), 'missing']);
    expect(found.size).toBe(130);
    expect(found.get(seeded[129]?.id as string)).toEqual(seeded[129]);
  });
});

describe('the counter and the quota', () => {
  it('count follows store and remove (atomic ADD), and is 0 for an unknown user', async () => {
    const user = freshUser('count');
    expect(await offline.count(user)).toBe(0);
    const stored = await Promise.all([1, 2, 3, 4].map((n) => offline.store(user, message(n))));
    expect(await offline.count(user)).toBe(4);
    await offline.remove(user, [stored[0]?.id as string]);
    expect(await offline.count(user)).toBe(3);
  });

  it('refuses a message at the quota with OfflineQuotaExceededError, storing nothing', async () => {
    const user = freshUser('quota');
    for (let n = 1; n <= QUOTA; n++) await offline.store(user, message(n));
    const refused = offline.store(user, message(99));
    await expect(refused).rejects.toBeInstanceOf(OfflineQuotaExceededError);
    await expect(refused).rejects.toMatchObject({ user });
    expect(await offline.count(user)).toBe(QUOTA);
    expect((await offline.list(user)).messages).toHaveLength(QUOTA);
  });

  it('ignoreQuota stores past the quota, and the counter follows', async () => {
    const user = freshUser('ignore');
    for (let n = 1; n <= QUOTA; n++) await offline.store(user, message(n));
    await offline.store(user, message(6), { ignoreQuota: true });
    expect(await offline.count(user)).toBe(QUOTA + 1);
    expect((await offline.list(user)).messages).toHaveLength(QUOTA + 1);
    await expect(offline.store(user, message(7))).rejects.toBeInstanceOf(OfflineQuotaExceededError);
  });

  it('stores a message held behind a flood past the quota, but not past HELD_QUOTA_FACTOR times it', async () => {
    // XEP-0160 §2: "if not (e.g., because the recipient's offline message queue is full), the
    // server returns a <service-unavailable/> error": a flood kept alive by slow acknowledgements
    // must not let a sender store without bound behind it.
    const user = freshUser('held');
    for (let n = 1; n <= QUOTA; n++) await offline.store(user, message(n));
    for (let n = QUOTA + 1; n <= QUOTA * HELD_QUOTA_FACTOR; n++)
      await offline.store(user, message(n), { ignoreQuota: 'held' });
    await expect(offline.store(user, message(99), { ignoreQuota: 'held' })).rejects.toBeInstanceOf(
      OfflineQuotaExceededError,
    );
    // A re-route (accepted already) is never refused.
    await offline.store(user, message(100), { ignoreQuota: true });
    expect(await offline.count(user)).toBe(QUOTA * HELD_QUOTA_FACTOR + 1);
  });

  it('concurrent stores never take the inbox past the quota', async () => {
    const user = freshUser('quota-race');
    const results = await Promise.allSettled(
      Array.from({ length: QUOTA + 4 }, (_, n) => offline.store(user, message(n))),
    );
    const stored = results.filter((r) => r.status === 'fulfilled').length;
    // DynamoDB may cancel a transaction that collides with another on the counter
    // (TransactionConflict): the store passes that on as a transient error, retried by the frame.
    for (const r of results) {
      if (r.status === 'rejected')
        expect(r.reason instanceof OfflineQuotaExceededError || isTransientStoreError(r.reason)).toBe(true);
    }
    expect(stored).toBeLessThanOrEqual(QUOTA);
    expect(
      results.filter((r) => r.status === 'rejected' && r.reason instanceof OfflineQuotaExceededError).length,
    ).toBeGreaterThan(0);
    expect(await offline.count(user)).toBe(stored);
    expect((await offline.list(user)).messages).toHaveLength(stored);
  });

  // docs/data-model.md: "The counter can run high … The quota check corrects the counter with
  // one counting Query when it would refuse a message".
  it('at the quota, a counter that counted expired messages is corrected and the message stored', async () => {
    const user = freshUser('recount');
    for (let n = 1; n < QUOTA; n++) await offline.store(user, message(n));
    await writeExpired(user, '000000000000001-0000-00000000');
    await doc.send(new PutCommand({ TableName: table, Item: { pk: user, sk: 'count', n: QUOTA } }));
    const stored = await offline.store(user, message(QUOTA));
    expect(await offline.count(user)).toBe(QUOTA);
    expect(ids((await offline.list(user)).messages)).toContain(stored.id);
    await expect(offline.store(user, message(QUOTA + 1))).rejects.toBeInstanceOf(OfflineQuotaExceededError);
  });

  it('recounts a full inbox at most once an hour, however often senders are refused', async () => {
    const user = freshUser('recount-bound');
    await storeMany(user, QUOTA);
    // Refused: the recount (claimed now) finds the inbox really full.
    await expect(offline.store(user, message(1))).rejects.toBeInstanceOf(OfflineQuotaExceededError);
    // One message expires (the counter does not know): within the hour no recount finds that out.
    const [oldest] = ids((await offline.list(user, { limit: 1 })).messages) as [string];
    await offline.remove(user, [oldest]);
    await writeExpired(user, oldest);
    await doc.send(
      new UpdateCommand({
        TableName: table,
        Key: { pk: user, sk: 'count' },
        UpdateExpression: 'ADD n :one',
        ExpressionAttributeValues: { ':one': 1 },
      }),
    );
    await expect(offline.store(user, message(2))).rejects.toBeInstanceOf(OfflineQuotaExceededError);
    // An hour later the next refusal recounts, and the message is stored.
    await doc.send(
      new UpdateCommand({
        TableName: table,
        Key: { pk: user, sk: 'count' },
        UpdateExpression: 'SET recountedAt = :past',
        ExpressionAttributeValues: { ':past': Date.now() - RECOUNT_INTERVAL_MS - 1 },
      }),
    );
    const stored = await offline.store(user, message(3));
    expect(ids((await offline.list(user)).messages)).toContain(stored.id);
  });
});

describe('remove and purge', () => {
  it('remove returns what it removed and decrements the count by that much', async () => {
    const user = freshUser('remove');
    const [a, b, c] = ids(await storeMany(user, 3));
    expect(await offline.remove(user, [a, c] as string[])).toEqual([a, c]);
    expect(ids((await offline.list(user)).messages)).toEqual([b]);
    expect(await offline.count(user)).toBe(1);
  });

  it('removing an id twice, or one that never existed, leaves the count right', async () => {
    const user = freshUser('remove-twice');
    const [a, b] = ids(await storeMany(user, 2)) as [string, string];
    expect(await offline.remove(user, [a])).toEqual([a]);
    expect(await offline.remove(user, [a])).toEqual([]);
    expect(await offline.remove(user, ['000000000000000-0000-deadbeef'])).toEqual([]);
    expect(await offline.remove(user, [b, b])).toEqual([b]);
    expect(await offline.count(user)).toBe(0);
    expect(await offline.remove(user, [])).toEqual([]);
    expect(await offline.count(user)).toBe(0);
  });

  it('a remove that fails part way (one delete throttled past the retries) counts what it did remove', async () => {
    const user = freshUser('remove-partial');
    const [a, b, c] = ids(await storeMany(user, 3)) as [string, string, string];
    const failing = createDocumentClient({ endpoint: useDynamoDbLocal(), region: TEST_REGION });
    failing.middlewareStack.add(
      (next, context) => async (args) => {
        const key = (args.input as { Key?: { sk?: { S?: string } } }).Key?.sk?.S ?? '';
        if (context.commandName === 'DeleteItemCommand' && key.endsWith(b))
          throw Object.assign(new Error('Rate of requests exceeds the allowed throughput'), {
            name: 'ThrottlingException',
            $metadata: { httpStatusCode: 400 },
          });
        return next(args);
      },
      { step: 'initialize', name: 'failDeleteOfB' },
    );
    const store = createOfflineStore(failing, table, { quota: QUOTA, ttlSeconds: TTL_SECONDS });
    await expect(store.remove(user, [a, b, c])).rejects.toThrow(/throughput/);
    // What storage holds and what the count says agree (before: 3, with a and perhaps c gone).
    const left = ids((await offline.list(user)).messages);
    expect(left).toContain(b);
    expect(left).not.toContain(a);
    expect(await offline.count(user)).toBe(left.length);
    // Its retry removes the rest, and the count reaches 0.
    expect(await offline.remove(user, [a, b, c])).toEqual(left);
    expect(await offline.count(user)).toBe(0);
  });

  it('concurrent removes of the same message: one removes it, the count drops once', async () => {
    const user = freshUser('remove-race');
    const stored = ids(await storeMany(user, 9));
    const survivor = stored.pop() as string;
    // Three removers per message (an SM ack, a XEP-0013 remove, a purge), all at once.
    const results = await Promise.all(
      stored.flatMap((id) => [1, 2, 3].map(() => offline.remove(user, [id]))),
    );
    expect(results.flat().sort()).toEqual([...stored].sort());
    expect(await offline.count(user)).toBe(1);
    expect(ids((await offline.list(user)).messages)).toEqual([survivor]);
  });

  it('remove never touches another user’s message', async () => {
    const owner = freshUser('owner');
    const [message1] = await storeMany(owner, 1);
    expect(await offline.remove(freshUser('thief'), [message1?.id as string])).toEqual([]);
    expect(await offline.count(owner)).toBe(1);
  });

  it('purge removes every message, returns how many, and leaves the count at 0', async () => {
    const user = freshUser('purge');
    await seedOffline(doc, table, user, 230);
    await writeExpired(user, '000000000000001-0000-00000000');
    expect(await offline.count(user)).toBe(230);
    expect(await offline.purge(user)).toBe(230);
    expect(await offline.count(user)).toBe(0);
    expect((await offline.list(user)).messages).toEqual([]);
    expect(await offline.purge(user)).toBe(0);
  });
});

describe('the count after expiry (XEP-0013 §2.2: "the number of messages")', () => {
  // DynamoDB's TTL deletes an expired message in the background and tells nobody: a counter
  // kept by ADD alone went on counting it for good, and number_of_messages with it.
  it('leaves out messages that expired, whether DynamoDB deleted them yet or not', async () => {
    const user = freshUser('expiring');
    const longAgo = Date.now() - TTL_SECONDS * 1000 - 5000;
    for (let n = 1; n <= 3; n++) await offline.store(user, message(n, longAgo), { ignoreQuota: true });
    // Still in the table (DynamoDB Local never deletes them), past their time.
    expect((await offline.list(user)).messages).toEqual([]);
    expect(await offline.count(user)).toBe(0);
    const fresh = await offline.store(user, message(4));
    expect(await offline.count(user)).toBe(1);
    expect(ids((await offline.list(user)).messages)).toEqual([fresh.id]);
  });

  it('recounts once the earliest message it counts has expired and been deleted by the TTL', async () => {
    const user = freshUser('ttl-deleted');
    const [first] = await storeMany(user, 2);
    expect((await rawItem(user, 'count'))?.expiresFrom).toBe(
      Math.floor((first as OfflineMessage).storedAt / 1000) + TTL_SECONDS,
    );
    // Its time passes and DynamoDB's TTL deletes it (the counter is not told).
    await doc.send(
      new DeleteCommand({ TableName: table, Key: { pk: user, sk: `m#${(first as OfflineMessage).id}` } }),
    );
    await setCounter(user, 'SET expiresFrom = :past', { ':past': Math.floor(Date.now() / 1000) - 1 });
    expect(await offline.count(user)).toBe(1);
    // Counted again: the counter holds the truth and the next expiry to watch.
    const counter = await rawItem(user, 'count');
    expect(counter?.n).toBe(1);
    expect(counter?.expiresFrom as number).toBeGreaterThan(Date.now() / 1000);
  });

  it('does not count the removal of an expired message (a recount may have left it out already)', async () => {
    const user = freshUser('remove-expired');
    const [live] = ids(await storeMany(user, 1)) as [string];
    const expiredId = `${(Date.now() + 1).toString().padStart(15, '0')}-0000-0000abce`;
    await writeExpired(user, expiredId);
    expect(await offline.remove(user, [expiredId])).toEqual([]);
    expect(await offline.count(user)).toBe(1);
    expect(await offline.remove(user, [live])).toEqual([live]);
    expect(await offline.count(user)).toBe(0);
  });

  it("a recount between a removal's deletes and its subtraction is corrected by the next count", async () => {
    const user = freshUser('remove-race');
    const [a] = ids(await storeMany(user, 3)) as [string];
    // An earlier removal left the counter due for a recount.
    await setCounter(user, 'SET dirty = :yes', { ':yes': true });
    // The count's recount lands after the delete, before the subtraction: it counts 2, and the
    // subtraction then takes the counter to 1.
    const send = doc.send.bind(doc);
    let raced = false;
    const restore = intercept(doc, 'send', (async (command: { input?: { UpdateExpression?: string } }) => {
      if (!raced && command.input?.UpdateExpression?.startsWith('ADD n :minus')) {
        raced = true;
        expect(await offline.count(user)).toBe(2);
      }
      return send(command as never);
    }) as typeof doc.send);
    try {
      expect(await offline.remove(user, [a])).toEqual([a]);
    } finally {
      restore();
    }
    expect(raced).toBe(true);
    expect((await rawItem(user, 'count'))?.n).toBe(1);
    // Within the minute, the count answers from the counter.
    expect(await offline.count(user)).toBe(1);
    // The subtraction marked the counter: the next count recounts (once a minute at most).
    await setCounter(user, 'SET countedAt = :past', { ':past': Date.now() - COUNT_RECOUNT_INTERVAL_MS - 1 });
    expect(await offline.count(user)).toBe(2);
    expect((await rawItem(user, 'count'))?.dirty).toBeUndefined();
  });

  it('a recount does not take a store and a removal that cancel out for no change', async () => {
    const user = freshUser('recount-aba');
    await storeMany(user, 2);
    await setCounter(user, 'SET dirty = :yes', { ':yes': true });
    // A message is stored just before the recount's Query (which counts it: 3) and removed just
    // after (a flood's ack): the counter's n is back where the recount read it (2), the inbox
    // holds 2, and the recount must not write its 3.
    const send = doc.send.bind(doc);
    let moved = false;
    const restore = intercept(doc, 'send', (async (command: {
      input?: { ProjectionExpression?: string };
    }) => {
      if (moved || command.input?.ProjectionExpression !== '#ttl') return send(command as never);
      moved = true;
      const extra = await offline.store(user, message(3), { ignoreQuota: true });
      const result = await send(command as never);
      await offline.remove(user, [extra.id]);
      return result;
    }) as typeof doc.send);
    try {
      await offline.count(user);
    } finally {
      restore();
    }
    expect(moved).toBe(true);
    expect((await offline.list(user)).messages).toHaveLength(2);
    expect((await rawItem(user, 'count'))?.n).toBe(2);
    // Still due: the next count (a minute on) counts again.
    expect((await rawItem(user, 'count'))?.dirty).toBe(true);
  });

  it('a message held behind a flood is recounted against its own, larger quota', async () => {
    const user = freshUser('held-recount');
    // More than the quota stored (a flood's hold lets them in), fewer than HELD_QUOTA_FACTOR
    // times it; the counter also counts messages the TTL removed, and says the held quota is full.
    await storeMany(user, QUOTA + 1);
    await setCounter(user, 'SET n = :full', { ':full': QUOTA * HELD_QUOTA_FACTOR });
    const held = await offline.store(user, message(99), { ignoreQuota: 'held' });
    expect(ids((await offline.list(user)).messages)).toContain(held.id);
    expect((await rawItem(user, 'count'))?.n).toBe(QUOTA + 2);
  });

  it('at the quota, a recount whose write a concurrent store refused is tried again, and the message stored', async () => {
    const user = freshUser('quota-race');
    for (let n = 1; n < QUOTA - 1; n++) await offline.store(user, message(n));
    // The counter counts two messages that are gone (DynamoDB's TTL): it says the inbox is full.
    await doc.send(new PutCommand({ TableName: table, Item: { pk: user, sk: 'count', n: QUOTA } }));
    const send = doc.send.bind(doc);
    let concurrent = 0;
    const restore = intercept(doc, 'send', (async (command: {
      input?: { ProjectionExpression?: string };
    }) => {
      if (concurrent === 0 && command.input?.ProjectionExpression === '#ttl') {
        concurrent += 1;
        // Another message stored past the quota (a re-route) while the first recount counts.
        await offline.store(user, message(99), { ignoreQuota: true });
      }
      return send(command as never);
    }) as typeof doc.send);
    let stored: OfflineMessage;
    try {
      stored = await offline.store(user, message(QUOTA));
    } finally {
      restore();
    }
    expect(concurrent).toBe(1);
    expect(ids((await offline.list(user)).messages)).toContain(stored.id);
    expect((await rawItem(user, 'count'))?.n).toBe(QUOTA);
  });

  it('a recount does not undo a store that lands between its read and its write', async () => {
    const user = freshUser('recount-race');
    await storeMany(user, 2);
    await setCounter(user, 'SET n = :wrong, expiresFrom = :past', { ':wrong': 5, ':past': 0 });
    // The store lands while the recount queries: its ADD is kept, the recount's SET is dropped.
    const query = doc.send.bind(doc);
    let stored = false;
    const restore = intercept(doc, 'send', (async (command: {
      input?: { Select?: string; ProjectionExpression?: string };
    }) => {
      if (!stored && command.input?.ProjectionExpression === '#ttl') {
        stored = true;
        await offline.store(user, message(3), { ignoreQuota: true });
      }
      return query(command as never);
    }) as typeof doc.send);
    try {
      await offline.count(user);
    } finally {
      restore();
    }
    expect(stored).toBe(true);
    expect((await rawItem(user, 'count'))?.n).toBe(6);
  });
});

describe('expiry: the reader checks expiresAt itself', () => {
  // docs/data-model.md: "DynamoDB deletes expired items in the background, often long after
  // `expiresAt` has passed … offline messages … are checked this way."
  it('list and get skip a message whose TTL has passed but which is still in the table', async () => {
    const user = freshUser('expired');
    const [a] = ids(await storeMany(user, 1));
    const expiredId = `${(Date.now() + 1).toString().padStart(15, '0')}-0000-0000abcd`;
    await writeExpired(user, expiredId);
    await new Promise((resolve) => setTimeout(resolve, 5));
    const [c] = ids(await storeMany(user, 1));
    // DynamoDB Local never deletes it: the reader's own check is what the test exercises.
    expect(await rawItem(user, `m#${expiredId}`)).toBeDefined();

    expect(ids((await offline.list(user)).messages)).toEqual([a, c]);
    expect(ids((await offline.list(user, { newestFirst: true })).messages)).toEqual([c, a]);
    expect(ids((await offline.list(user, { after: a, before: c })).messages)).toEqual([]);
    const firstPage = await offline.list(user, { limit: 1 });
    expect(ids(firstPage.messages)).toEqual([a]);
    expect(ids((await offline.list(user, { limit: 1, after: firstPage.next })).messages)).toEqual([c]);
    const found = await offline.get(user, [a, expiredId, c] as string[]);
    expect([...found.keys()].sort()).toEqual([a, c].sort());
  });
});
