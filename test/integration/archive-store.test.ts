/**
 * The XEP-0136 archive store against DynamoDB Local (never a mock): appends, keyset paging both
 * ways, filters through the `with` indexes, removal, TTL, the change log, keys, preferences, and
 * what a page costs in read units (page k must cost what page 1 costs).
 */
import { GetCommand, PutCommand, QueryCommand } from '@aws-sdk/lib-dynamodb';
import { beforeAll, beforeEach, describe, expect, test, vi } from 'vitest';
import {
  type ArchiveStore,
  changeKeyOf,
  createArchiveStore,
  type EntryInput,
  type OpenCollection,
  PrefsVersionConflictError,
  RETRIEVE_READ_BYTES,
  timeKey,
} from '../../shared/store/archive.ts';
import { createDocumentClient, DynamoMeter } from '../../shared/store/dynamo.ts';
import { TTL_ATTRIBUTE } from '../../shared/tables.ts';
import { createTestTables, TEST_REGION, useDynamoDbLocal } from '../support/dynamodb.ts';

const ROMEO = 'romeo@montague.net';
const JULIET = 'juliet@capulet.com/chamber';
const at = (iso: string) => Date.parse(iso);
const START = at('1469-07-21T02:56:15Z');

let table: string;
const meter = new DynamoMeter();
let doc: ReturnType<typeof createDocumentClient>;
let clock: number;
let store: ArchiveStore;
let owner: string;

beforeAll(async () => {
  table = (await createTestTables()).archive;
  doc = createDocumentClient({ endpoint: useDynamoDbLocal(), region: TEST_REGION, meter });
});

let ownerCount = 0;
beforeEach(() => {
  clock = at('2026-03-01T12:00:00Z');
  store = createArchiveStore(doc, table, { now: () => clock, changeWindowMs: 60_000, purgeBudget: 50 });
  // A fresh owner per test: the tests share one table.
  ownerCount += 1;
  owner = `romeo${ownerCount}-${Math.random().toString(36).slice(2, 8)}@montague.net`;
});

/** Items of equal size (padded text, times with the same significant digits): equal pages cost the same. */
function chat(kind: 'to' | 'from', text: string, when: number): EntryInput {
  return { kind, at: when, xml: `<${kind}><body>${text}</body></${kind}>` };
}

async function seedCollection(
  withJid: string,
  start: number,
  count: number,
  options: { expireSeconds?: number } = {},
) {
  const entries = Array.from({ length: count }, (_, i) =>
    chat(i % 2 ? 'to' : 'from', `m${i.toString().padStart(5, '0')}`, start + i * 1000 + 1),
  );
  return store.storeManual(owner, { ref: { with: withJid, start }, entries, ...options });
}

describe('automatic archiving: open collection and appends', () => {
  test('the first message starts a collection; later ones append with consecutive seqs and prevAt', async () => {
    expect(await store.findOpenCollection(owner, JULIET)).toBeUndefined();
    let open: OpenCollection = await store.startCollection(owner, {
      with: JULIET,
      start: clock,
      thread: 't1',
    });
    for (let i = 0; i < 3; i++) {
      const result = await store.appendMessage(owner, open, chat('from', `hello ${i}`, clock + i * 1500));
      expect(result.entry.seq).toBe(i);
      open = result.open;
    }
    const found = await store.findOpenCollection(owner, JULIET);
    expect(found?.header.cid).toBe(open.header.cid);
    expect(found?.thread).toBe('t1');
    expect(found?.last).toEqual({ seq: 2, at: clock + 3000, messageAt: clock + 3000 });
    const page = await store.retrieveMessages(owner, { with: JULIET, start: clock }, { max: 10 });
    expect(page?.items.map((e) => [e.seq, e.at, e.prevAt])).toEqual([
      [0, clock, undefined],
      [1, clock + 1500, clock],
      [2, clock + 3000, clock + 1500],
    ]);
    expect(page?.count).toBe(3);
    expect(page?.first).toBe('0');
    expect(page?.last).toBe('2');
  });

  test('two writers appending from the same stale state both land, on distinct seqs', async () => {
    const open = await store.startCollection(owner, { with: JULIET, start: clock });
    const [a, b] = await Promise.all([
      store.appendMessage(owner, open, chat('from', 'a', clock)),
      store.appendMessage(owner, open, chat('to', 'b', clock + 1)),
    ]);
    expect(new Set([a.entry.seq, b.entry.seq])).toEqual(new Set([0, 1]));
    const page = await store.retrieveMessages(owner, { with: JULIET, start: clock }, { max: 10 });
    expect(page?.count).toBe(2);
  });

  test('a concurrent start loses to the first and gets its collection', async () => {
    const first = await store.startCollection(owner, { with: JULIET, start: clock });
    const second = await store.startCollection(owner, { with: JULIET, start: clock + 5 });
    expect(second.header.cid).toBe(first.header.cid);
  });

  test('a start whose previous pointer was dropped meanwhile (a <remove/>) starts without it', async () => {
    const first = await store.startCollection(owner, { with: JULIET, start: clock });
    const previous = await store.findOpenCollection(owner, JULIET);
    expect(previous?.header.cid).toBe(first.header.cid);
    // <remove open='true'/> finds the conversation quiet and drops its pointer (or removes it).
    await store.closeOpenCollections(owner, JULIET);
    const next = await store.startCollection(owner, { with: JULIET, start: clock + 3_600_000 }, previous);
    expect(next.header.cid).not.toBe(first.header.cid);
    expect((await store.findOpenCollection(owner, JULIET))?.header.cid).toBe(next.header.cid);
  });

  test('message ids sort by time across collections, including before 1970', async () => {
    await seedCollection(JULIET, START, 2);
    await seedCollection('nurse@capulet.com/kitchen', START - 500, 2);
    const a = await store.retrieveMessages(owner, { with: JULIET, start: START }, { max: 5 });
    const b = await store.retrieveMessages(
      owner,
      { with: 'nurse@capulet.com/kitchen', start: START - 500 },
      { max: 5 },
    );
    const ids = [...(a?.items ?? []), ...(b?.items ?? [])].sort((x, y) => x.at - y.at).map((e) => e.id);
    expect([...ids].sort()).toEqual(ids);
  });
});

describe('retrieve: keyset paging', () => {
  beforeEach(async () => {
    await seedCollection(JULIET, START, 10);
  });
  const ref = () => ({ with: JULIET, start: START });
  const seqs = (page: { items: { seq: number }[] } | undefined) => page?.items.map((e) => e.seq);

  test('forwards with after', async () => {
    const first = await store.retrieveMessages(owner, ref(), { max: 4 });
    expect(seqs(first)).toEqual([0, 1, 2, 3]);
    expect(first?.firstIndex).toBe(0);
    const second = await store.retrieveMessages(owner, ref(), { max: 4, after: first?.last });
    expect(seqs(second)).toEqual([4, 5, 6, 7]);
    expect(second?.firstIndex).toBe(4);
    const third = await store.retrieveMessages(owner, ref(), { max: 4, after: second?.last });
    expect(seqs(third)).toEqual([8, 9]);
    const beyond = await store.retrieveMessages(owner, ref(), { max: 4, after: third?.last });
    expect(seqs(beyond)).toEqual([]);
    expect(beyond?.count).toBe(10);
  });

  test('an empty before is the last page; before pages backwards', async () => {
    const last = await store.retrieveMessages(owner, ref(), { max: 4, lastPage: true });
    expect(seqs(last)).toEqual([6, 7, 8, 9]);
    expect(last?.firstIndex).toBe(6);
    const previous = await store.retrieveMessages(owner, ref(), { max: 4, before: last?.first });
    expect(seqs(previous)).toEqual([2, 3, 4, 5]);
    const rest = await store.retrieveMessages(owner, ref(), { max: 4, before: previous?.first });
    expect(seqs(rest)).toEqual([0, 1]);
  });

  test('index jumps to a position by key', async () => {
    const page = await store.retrieveMessages(owner, ref(), { max: 3, index: 5 });
    expect(seqs(page)).toEqual([5, 6, 7]);
    expect(page?.firstIndex).toBe(5);
  });

  test('a UID it never gave out matches nothing; a missing collection is undefined', async () => {
    expect(seqs(await store.retrieveMessages(owner, ref(), { max: 3, after: 'bogus' }))).toEqual([]);
    expect(
      await store.retrieveMessages(owner, { with: JULIET, start: START + 1 }, { max: 3 }),
    ).toBeUndefined();
  });
});

describe('list: filters and paging', () => {
  const collections = [
    { with: 'juliet@capulet.com/chamber', start: at('1469-07-21T02:56:15Z') },
    { with: 'juliet@capulet.com/pda', start: at('1469-07-21T03:01:00Z') },
    { with: 'balcony@house.capulet.com', start: at('1469-07-21T03:16:37Z') },
    { with: 'nurse@capulet.com/kitchen', start: at('1469-07-22T10:00:00Z') },
    { with: 'benvolio@montague.net/street', start: at('1469-07-23T09:00:00Z') },
    { with: 'juliet@capulet.com/chamber', start: at('1469-07-24T21:00:00Z') },
  ];
  beforeEach(async () => {
    for (const c of collections) {
      await store.storeManual(owner, {
        ref: c,
        subject: `s ${c.start}`,
        entries: [chat('from', 'x', c.start)],
      });
    }
  });
  const withs = (page: { items: { with: string; start: number }[] }) =>
    page.items.map((c) => `${c.with}@${timeKey(c.start).slice(0, 10)}`);

  test('all, in chronological order, with count and RSM UIDs', async () => {
    const page = await store.listCollections(owner, {}, { max: 30 });
    expect(page.items.map((c) => c.with)).toEqual(collections.map((c) => c.with));
    expect(page.count).toBe(6);
    expect(page.firstIndex).toBe(0);
    expect(page.first).toBe('1469-07-21T02:56:15.000Z/juliet@capulet.com/chamber');
    expect(page.items[0]?.subject).toBe(`s ${collections[0]?.start}`);
  });

  test('by full JID, bare JID and domain, through the indexes', async () => {
    const full = await store.listCollections(owner, { with: { kind: 'full', jid: JULIET } }, { max: 30 });
    expect(withs(full)).toEqual([
      'juliet@capulet.com/chamber@1469-07-21',
      'juliet@capulet.com/chamber@1469-07-24',
    ]);
    const bare = await store.listCollections(
      owner,
      { with: { kind: 'bare', jid: 'juliet@capulet.com' } },
      { max: 30 },
    );
    expect(bare.items.map((c) => c.with)).toEqual([
      'juliet@capulet.com/chamber',
      'juliet@capulet.com/pda',
      'juliet@capulet.com/chamber',
    ]);
    expect(bare.count).toBe(3);
    const domain = await store.listCollections(
      owner,
      { with: { kind: 'domain', jid: 'capulet.com' } },
      { max: 30 },
    );
    expect(domain.items.map((c) => c.with)).toEqual([
      'juliet@capulet.com/chamber',
      'juliet@capulet.com/pda',
      'nurse@capulet.com/kitchen',
      'juliet@capulet.com/chamber',
    ]);
    const room = await store.listCollections(
      owner,
      { with: { kind: 'domain', jid: 'house.capulet.com' } },
      { max: 30 },
    );
    expect(room.items.map((c) => c.with)).toEqual(['balcony@house.capulet.com']);
  });

  test('start is inclusive and end exclusive, alone and with a JID', async () => {
    const range = await store.listCollections(
      owner,
      { start: at('1469-07-21T03:01:00Z'), end: at('1469-07-23T09:00:00Z') },
      { max: 30 },
    );
    expect(range.items.map((c) => c.with)).toEqual([
      'juliet@capulet.com/pda',
      'balcony@house.capulet.com',
      'nurse@capulet.com/kitchen',
    ]);
    expect(range.count).toBe(3);
    const bareRange = await store.listCollections(
      owner,
      {
        with: { kind: 'bare', jid: 'juliet@capulet.com' },
        start: at('1469-07-21T02:00:00Z'),
        end: at('1469-07-21T04:00:00Z'),
      },
      { max: 30 },
    );
    expect(bareRange.items.map((c) => c.with)).toEqual([
      'juliet@capulet.com/chamber',
      'juliet@capulet.com/pda',
    ]);
  });

  test('keyset pages forwards and backwards, and the last page', async () => {
    const first = await store.listCollections(owner, {}, { max: 4 });
    expect(first.items).toHaveLength(4);
    const second = await store.listCollections(owner, {}, { max: 4, after: first.last });
    expect(second.items.map((c) => c.with)).toEqual([
      'benvolio@montague.net/street',
      'juliet@capulet.com/chamber',
    ]);
    expect(second.count).toBe(6);
    const last = await store.listCollections(owner, {}, { max: 4, lastPage: true });
    expect(last.items.map((c) => c.with)).toEqual(collections.slice(2).map((c) => c.with));
    expect(last.firstIndex).toBe(2);
    const before = await store.listCollections(owner, {}, { max: 4, before: last.first });
    expect(before.items.map((c) => c.with)).toEqual(collections.slice(0, 2).map((c) => c.with));
    const bareAfter = await store.listCollections(
      owner,
      { with: { kind: 'bare', jid: 'juliet@capulet.com' } },
      { max: 1, after: first.first },
    );
    expect(bareAfter.items.map((c) => c.with)).toEqual(['juliet@capulet.com/pda']);
  });

  test('an owner sees only their own collections', async () => {
    const other = await store.listCollections(ROMEO, {}, { max: 30 });
    expect(other.items).toEqual([]);
    expect(other.count).toBe(0);
  });
});

describe('remove', () => {
  test('one collection exactly, with its messages; a second time nothing is found', async () => {
    const { header } = await seedCollection(JULIET, START, 5);
    await seedCollection(JULIET, START + 60_000, 1);
    const result = await store.removeCollections(owner, {
      with: { kind: 'full', jid: JULIET },
      start: START,
      exact: true,
    });
    expect(result.removed).toEqual([{ with: JULIET, start: START }]);
    expect(await store.retrieveMessages(owner, { with: JULIET, start: START }, { max: 10 })).toBeUndefined();
    const left = await doc.send(
      new QueryCommand({
        TableName: table,
        KeyConditionExpression: 'pk = :pk',
        ExpressionAttributeValues: { ':pk': `${owner}/${header.cid}` },
      }),
    );
    expect(left.Items).toEqual([]);
    expect((await store.listCollections(owner, {}, { max: 10 })).count).toBe(1);
    const again = await store.removeCollections(owner, {
      with: { kind: 'full', jid: JULIET },
      start: START,
      exact: true,
    });
    expect(again.removed).toEqual([]);
  });

  test('a range by bare JID, and everything', async () => {
    await seedCollection('juliet@capulet.com/chamber', at('1469-07-21T02:56:15Z'), 1);
    await seedCollection('juliet@capulet.com/pda', at('1469-07-21T03:30:00Z'), 1);
    await seedCollection('juliet@capulet.com/pda', at('1469-07-21T05:00:00Z'), 1);
    await seedCollection('nurse@capulet.com/kitchen', at('1469-07-21T03:00:00Z'), 1);
    const ranged = await store.removeCollections(owner, {
      with: { kind: 'bare', jid: 'juliet@capulet.com' },
      start: at('1469-07-21T02:00:00Z'),
      end: at('1469-07-21T04:00:00Z'),
    });
    expect(ranged.removed.map((c) => c.with)).toEqual([
      'juliet@capulet.com/chamber',
      'juliet@capulet.com/pda',
    ]);
    expect((await store.listCollections(owner, {}, { max: 10 })).items.map((c) => c.with)).toEqual([
      'nurse@capulet.com/kitchen',
      'juliet@capulet.com/pda',
    ]);
    const all = await store.removeCollections(owner, {});
    expect(all.removed).toHaveLength(2);
    expect((await store.listCollections(owner, {}, { max: 10 })).count).toBe(0);
  });

  test('open: only collections being recorded, and the pointer goes with them', async () => {
    const open = await store.startCollection(owner, { with: JULIET, start: clock });
    await store.appendMessage(owner, open, chat('from', 'psst', clock));
    await seedCollection(JULIET, START, 1);
    const result = await store.removeCollections(owner, { open: true, with: { kind: 'full', jid: JULIET } });
    expect(result.removed).toEqual([{ with: JULIET, start: clock }]);
    expect(await store.findOpenCollection(owner, JULIET)).toBeUndefined();
    expect((await store.listCollections(owner, {}, { max: 10 })).items.map((c) => c.start)).toEqual([START]);
  });

  test('open: a conversation gone quiet past the idle gap is no longer "currently being recorded"', async () => {
    // XEP-0136 0.9 §8.3: "If the value of the optional 'open' attribute is set to 'true' then
    // only collections that are currently being recorded automatically by the server … are
    // removed." A client that just disconnected leaves its pointer: yesterday's talk is not that.
    const gap = 30 * 60_000;
    const quiet = await store.startCollection(owner, { with: JULIET, start: clock });
    await store.appendMessage(owner, quiet, chat('from', 'yesterday', clock));
    clock += gap + 1000;
    const nurse = 'nurse@capulet.com/kitchen';
    const live = await store.startCollection(owner, { with: nurse, start: clock - 60_000 });
    await store.appendMessage(owner, live, chat('to', 'now', clock - 5_000));
    const result = await store.removeCollections(owner, { open: true, openWithinMs: gap });
    expect(result.removed).toEqual([{ with: nurse, start: clock - 60_000 }]);
    expect((await store.listCollections(owner, {}, { max: 10 })).items.map((c) => c.with)).toEqual([JULIET]);
    // With one JID: the quiet one is not found (the module answers item-not-found).
    const again = await store.removeCollections(owner, {
      open: true,
      openWithinMs: gap,
      with: { kind: 'full', jid: JULIET },
    });
    expect(again.removed).toEqual([]);
  });

  test('a start after the end matches nothing, in a list and in a removal (never a DynamoDB validation error)', async () => {
    // §8.1: "If no collections correspond to the request the server MUST return an empty <list/>".
    await seedCollection(JULIET, START, 1);
    const reversed = { start: START + 3_600_000, end: START - 3_600_000 };
    const listed = await store.listCollections(owner, reversed, { max: 10 });
    expect(listed.items).toEqual([]);
    expect(listed.count).toBe(0);
    const bare = { ...reversed, with: { kind: 'bare' as const, jid: 'juliet@capulet.com' } };
    expect((await store.listCollections(owner, bare, { max: 10, index: 2 })).items).toEqual([]);
    expect((await store.removeCollections(owner, bare)).removed).toEqual([]);
    expect((await store.removeCollections(owner, reversed)).removed).toEqual([]);
    expect((await store.listCollections(owner, {}, { max: 10 })).count).toBe(1);
  });

  test('a collection larger than the budget disappears at once; its items are purged later', async () => {
    const { header } = await seedCollection(JULIET, START, 120);
    const result = await store.removeCollections(owner, {});
    expect(result.queuedPurges).toBe(1);
    expect((await store.listCollections(owner, {}, { max: 10 })).count).toBe(0);
    let deleted = 0;
    for (let i = 0; i < 5; i++) deleted += await store.purgePending(1000);
    expect(deleted).toBeGreaterThanOrEqual(70);
    const left = await doc.send(
      new QueryCommand({
        TableName: table,
        KeyConditionExpression: 'pk = :pk',
        ExpressionAttributeValues: { ':pk': `${owner}/${header.cid}` },
      }),
    );
    expect(left.Items).toEqual([]);
  });

  test('a collection created again after removal does not see the old items', async () => {
    await seedCollection(JULIET, START, 3);
    await store.removeCollections(owner, { with: { kind: 'full', jid: JULIET }, start: START, exact: true });
    await seedCollection(JULIET, START, 1);
    expect((await store.retrieveMessages(owner, { with: JULIET, start: START }, { max: 10 }))?.count).toBe(1);
  });
});

describe('expire → DynamoDB TTL', () => {
  test('every item of the collection carries expiresAt; the header covers its messages', async () => {
    const { header } = await seedCollection(JULIET, START, 2, { expireSeconds: 604800 });
    const items = await doc.send(
      new QueryCommand({
        TableName: table,
        KeyConditionExpression: 'pk = :pk',
        ExpressionAttributeValues: { ':pk': `${owner}/${header.cid}` },
      }),
    );
    const nowSeconds = Math.floor(clock / 1000);
    expect(items.Items?.map((i) => i[TTL_ATTRIBUTE])).toEqual([nowSeconds + 604800, nowSeconds + 604800]);
    const { Item } = await doc.send(
      new GetCommand({ TableName: table, Key: { pk: owner, sk: `c#${header.id}` } }),
    );
    expect(Item?.[TTL_ATTRIBUTE]).toBeGreaterThanOrEqual(nowSeconds + 604800);
  });

  test('expired entries and headers are not returned before TTL deletes them', async () => {
    await seedCollection(JULIET, START, 2, { expireSeconds: 10 });
    clock += 11_000;
    const page = await store.retrieveMessages(owner, { with: JULIET, start: START }, { max: 10 });
    expect(page?.items).toEqual([]);
    expect(page?.count).toBe(0);
    clock += 2 * 86_400_000;
    expect((await store.listCollections(owner, {}, { max: 10 })).count).toBe(0);
  });

  test('an auto-archived collection without expire has no TTL', async () => {
    const open = await store.startCollection(owner, { with: JULIET, start: clock });
    await store.appendMessage(owner, open, chat('to', 'forever', clock));
    const { Item } = await doc.send(
      new GetCommand({ TableName: table, Key: { pk: owner, sk: `c#${open.header.id}` } }),
    );
    expect(Item).toBeDefined();
    expect(Item?.[TTL_ATTRIBUTE]).toBeUndefined();
  });
});

describe('the expiry sweep, collection by collection', () => {
  test('goes past collections that fail at the head of a shard to the ones behind them', async () => {
    // Its own table: the shard holds only this owner's collections, in the order they expire.
    const own = createArchiveStore(doc, (await createTestTables()).archive, {
      now: () => clock,
      changeWindowMs: 60_000,
      purgeBudget: 50,
    });
    const t0 = clock;
    const starts = [0, 1, 2].map((i) => START + i * 3_600_000);
    for (const [i, start] of starts.entries()) {
      clock = t0 + i * 1000;
      await own.storeManual(owner, {
        ref: { with: JULIET, start },
        entries: [chat('to', `first ${i}`, start), chat('to', `kept ${i}`, start + 1000)],
        expireSeconds: 60,
      });
      clock = t0 + 10_000 + i * 1000;
      // A later message keeps each collection alive past its first message's expiry.
      await own.storeManual(owner, {
        ref: { with: JULIET, start },
        entries: [chat('to', `later ${i}`, start + 2000)],
        expireSeconds: 60,
      });
    }
    // The change log up to now (it shows changes 2 s old or more).
    clock = t0 + 20_000;
    const cursor = (await own.modifiedSince(owner, undefined, 10)).items.at(-1)?.key;
    // The first two collections' records fail (DynamoDB past the SDK's retries).
    const failing = new Set(starts.slice(0, 2).map((start) => `c#${timeKey(start)}/${JULIET}`));
    const send = doc.send.bind(doc);
    const spy = vi.spyOn(doc, 'send').mockImplementation((async (command: {
      constructor: { name: string };
      input?: { Key?: { sk?: string } };
    }) => {
      if (command.constructor.name === 'UpdateCommand' && failing.has(String(command.input?.Key?.sk)))
        throw Object.assign(new Error('throttled'), { name: 'ThrottlingException' });
      return send(command as never);
    }) as never);
    const errors: unknown[] = [];
    clock = t0 + 65_000;
    try {
      // One collection a shard this run: the two failures do not use it up.
      await own.sweepExpiring(1, { onError: (error) => errors.push(error) });
    } finally {
      spy.mockRestore();
    }
    expect(errors).toHaveLength(2);
    clock += 3_000;
    const changed = await own.modifiedSince(owner, cursor, 10);
    expect(changed.items.map((c) => [c.kind, c.collection.start])).toEqual([['changed', starts[2]]]);
  });
});

describe('modified: the change log with tombstones', () => {
  test('created, appended and removed collections in change order; the cursor moves on', async () => {
    const t0 = clock;
    await seedCollection(JULIET, START, 1);
    clock += 10_000;
    await seedCollection('balcony@house.capulet.com', at('1469-07-21T03:16:37Z'), 1);
    clock += 10_000;
    await store.removeCollections(owner, { with: { kind: 'full', jid: JULIET }, start: START, exact: true });
    clock += 10_000;
    const all = await store.modifiedSince(owner, changeKeyOf(t0 - 1000), 50);
    // The removed collection's header is gone with its change entry: only the tombstone tells.
    expect(all.items.map((c) => [c.kind, c.collection.with])).toEqual([
      ['changed', 'balcony@house.capulet.com'],
      ['removed', JULIET],
    ]);
    expect(all.items[1]?.collection.start).toBe(START);
    expect(all.count).toBe(2);
    expect(all.last).toMatch(/^2026-03-01T12:00:20\.000\d{9}Z$/);
    const page = await store.modifiedSince(owner, undefined, 1);
    expect(page.items).toHaveLength(1);
    const rest = await store.modifiedSince(owner, page.items[0]?.key, 2);
    expect(rest.items.map((c) => c.kind)).toEqual(['removed']);
    const none = await store.modifiedSince(owner, rest.items[0]?.key, 2);
    expect(none.items).toEqual([]);
  });

  test('what expires is reported: changed when earlier messages expire, removed with the collection', async () => {
    // 0.9 §10: "If a collection has been modified, created or removed *after* the time specified
    // by the <after/> element then the server MUST include it"; §3.2: `expire` is how long after
    // archiving "the server SHOULD delete" messages.
    const t0 = clock;
    await seedCollection(JULIET, START, 1, { expireSeconds: 60 });
    clock += 10_000;
    const existing = await store.getCollection(owner, { with: JULIET, start: START });
    await store.storeManual(
      owner,
      {
        ref: { with: JULIET, start: START },
        entries: [chat('to', 'later', START + 5000)],
        expireSeconds: 60,
      },
      existing,
    );
    clock += 5_000;
    const synced = await store.modifiedSince(owner, undefined, 10);
    expect(synced.items.map((c) => c.kind)).toEqual(['changed']);
    const cursor = synced.items.at(-1)?.key;
    // Nothing has expired yet: the sweep records nothing.
    await store.sweepExpiring(500);
    clock += 3_000;
    expect((await store.modifiedSince(owner, cursor, 10)).items).toEqual([]);

    // The first message expires (archived at t0, kept 60 s): the collection changed.
    clock = t0 + 61_000;
    await store.sweepExpiring(500);
    clock += 3_000;
    const changed = await store.modifiedSince(owner, cursor, 10);
    expect(changed.items.map((c) => [c.kind, c.collection.with])).toEqual([['changed', JULIET]]);
    const left = await store.retrieveMessages(owner, { with: JULIET, start: START }, { max: 10 });
    expect(left?.items.map((entry) => entry.xml)).toEqual([expect.stringContaining('later')]);

    // The header outlives its last message by a day; past it, the collection is removed.
    clock = t0 + 86_460_000 + 2_000;
    await store.sweepExpiring(500);
    clock += 3_000;
    const removed = await store.modifiedSince(owner, changed.items.at(-1)?.key, 10);
    expect(removed.items.map((c) => [c.kind, c.collection.with, c.collection.start])).toEqual([
      ['removed', JULIET, START],
    ]);
    expect((await store.listCollections(owner, {}, { max: 10 })).items).toEqual([]);
  });

  test('a manual store into a collection being recorded never moves its change time back', async () => {
    // §10: "If a collection has been modified, created or removed after the time specified by
    // the <after/> element then the server MUST include it". Auto appends stamp the end of their
    // change window; a manual store in the same window must not stamp an earlier time, or the
    // window's later appends (which leave the stamp alone) hide from a client that synced between.
    clock = at('2026-03-01T12:00:05Z');
    let open = await store.startCollection(owner, { with: JULIET, start: clock });
    open = (await store.appendMessage(owner, open, chat('from', 'a', clock))).open;
    clock = at('2026-03-01T12:00:15Z');
    const existing = await store.getCollection(owner, { with: JULIET, start: open.header.start });
    await store.storeManual(
      owner,
      { ref: { with: JULIET, start: open.header.start }, subject: 'duel', entries: [] },
      existing,
    );
    clock = at('2026-03-01T12:00:25Z');
    const first = await store.modifiedSince(owner, undefined, 10);
    clock = at('2026-03-01T12:00:35Z');
    await store.appendMessage(owner, open, chat('to', 'b', clock));
    clock = at('2026-03-01T12:05:00Z');
    const second = await store.modifiedSince(owner, first.items.at(-1)?.key, 10);
    // Whichever sync reports it, the last report comes after the last append.
    const reports = [...first.items, ...second.items].filter((c) => c.collection.with === JULIET);
    expect(reports.length).toBeGreaterThan(0);
    expect(second.items.map((c) => c.collection.with)).toEqual([JULIET]);
  });

  test('appends move the change time once per window; changes in the current window wait', async () => {
    let open = await store.startCollection(owner, { with: JULIET, start: clock });
    clock += 5_000;
    const syncedAt = await store.modifiedSince(owner, undefined, 10);
    expect(syncedAt.items).toHaveLength(1);
    const cursor = syncedAt.items[0]?.key;
    meter.reset();
    open = (await store.appendMessage(owner, open, chat('from', 'a', clock))).open;
    const firstAppend = meter.snapshot();
    meter.reset();
    open = (await store.appendMessage(owner, open, chat('from', 'b', clock + 1000))).open;
    const secondAppend = meter.snapshot();
    // The first append moved the header's change time to the window's end; the second did not.
    expect(firstAppend.operations.UpdateItem?.requests).toBe(2);
    expect(secondAppend.operations.UpdateItem).toBeUndefined();
    expect(secondAppend.operations.PutItem?.requests).toBe(1);
    expect((await store.modifiedSince(owner, cursor, 10)).items).toEqual([]);
    clock += 60_000;
    const later = await store.modifiedSince(owner, cursor, 10);
    expect(later.items.map((c) => c.kind)).toEqual(['changed']);
  });

  test('tombstones expire after the retention', async () => {
    const short = createArchiveStore(doc, table, { now: () => clock, tombstoneSeconds: 3600 });
    await seedCollection(JULIET, START, 1);
    await short.removeCollections(owner, {});
    const { Item } = await doc.send(
      new GetCommand({ TableName: table, Key: { pk: owner, sk: `r#${timeKey(START)}/${JULIET}` } }),
    );
    expect(Item?.[TTL_ATTRIBUTE]).toBe(Math.floor(clock / 1000) + 3600);
  });
});

/** The TTLs of a collection's items, by sort-key prefix (`m#` entries, `k#` keys). */
async function itemTtls(cid: string): Promise<(prefix: string) => number[]> {
  const items = await doc.send(
    new QueryCommand({
      TableName: table,
      KeyConditionExpression: 'pk = :pk',
      ExpressionAttributeValues: { ':pk': `${owner}/${cid}` },
    }),
  );
  return (prefix) =>
    (items.Items ?? []).filter((i) => String(i.sk).startsWith(prefix)).map((i) => i[TTL_ATTRIBUTE] as number);
}

describe('entries archived with another expire than their collection (§3.2)', () => {
  // §3.2: 'expire' "indicates how many seconds after messages are archived that the server SHOULD
  // delete them": each entry by the mode in force when it was stored. Automatic archiving starts
  // a new collection then (test/e2e/xep-0136-retention.test.ts); a manual store names its
  // collection, so the collection adapts.
  test('entries kept for ever keep a collection that expired otherwise, and its keys', async () => {
    const t0 = clock;
    const ref = { with: JULIET, start: START };
    await store.storeManual(owner, {
      ref,
      entries: [chat('from', 'soon gone', START)],
      keys: [
        {
          carriedKeyName: 'k1',
          publicKeyName: 'romeoPublicKey1fingerprint',
          xml: '<EncryptedKey xmlns="http://www.w3.org/2001/04/xmlenc#"><CarriedKeyName>k1</CarriedKeyName></EncryptedKey>',
        },
      ],
      expireSeconds: 60,
    });
    clock += 10_000;
    const { header } = await store.storeManual(owner, {
      ref,
      entries: [chat('to', 'for ever', START + 5000)],
    });
    expect(header.expiresAt).toBeUndefined();
    const ttlOf = await itemTtls(header.cid);
    expect(ttlOf('k#')).toEqual([undefined]);

    // Past the first entry's expiry and past the day the header outlived it by: only it is gone.
    clock = t0 + 61_000;
    await store.sweepExpiring(500);
    clock = t0 + 2 * 86_400_000;
    await store.sweepExpiring(500);
    const left = await store.retrieveMessages(owner, ref, { max: 10 });
    expect(left?.items.map((entry) => entry.xml)).toEqual([expect.stringContaining('for ever')]);
    expect((await store.listCollections(owner, {}, { max: 10 })).items.map((h) => h.start)).toEqual([START]);
  });

  test('an entry kept for ever ends automatic recording into a collection that expires', async () => {
    const open = await store.startCollection(owner, { with: JULIET, start: clock, expireSeconds: 60 });
    expect(open.expireSeconds).toBe(60);
    await store.appendMessage(owner, open, chat('from', 'auto', clock), { expireSeconds: 60 });
    expect((await store.findOpenCollection(owner, JULIET))?.expireSeconds).toBe(60);
    clock += 1000;
    await store.storeManual(owner, {
      ref: { with: JULIET, start: open.header.start },
      entries: [chat('to', 'manual, for ever', clock)],
    });
    // Its pointer named the old expiry: the next automatic message starts a new collection.
    expect(await store.findOpenCollection(owner, JULIET)).toBeUndefined();
  });

  test('entries that expire in a collection kept for ever are reported when they go (0.9 §10)', async () => {
    const t0 = clock;
    const ref = { with: JULIET, start: START };
    await store.storeManual(owner, { ref, entries: [chat('from', 'for ever', START)] });
    clock += 10_000;
    await store.storeManual(owner, {
      ref,
      entries: [chat('to', 'soon gone', START + 5000)],
      expireSeconds: 60,
    });
    clock += 5_000;
    const synced = await store.modifiedSince(owner, undefined, 10);
    const cursor = synced.items.at(-1)?.key;
    clock = t0 + 71_000;
    await store.sweepExpiring(500);
    clock += 3_000;
    const changed = await store.modifiedSince(owner, cursor, 10);
    expect(changed.items.map((c) => [c.kind, c.collection.start])).toEqual([['changed', START]]);
    const left = await store.retrieveMessages(owner, ref, { max: 10 });
    expect(left?.items.map((entry) => entry.xml)).toEqual([expect.stringContaining('for ever')]);
  });

  test('an upload without entries changes no expiry: a subject alone leaves the collection to expire', async () => {
    const ref = { with: JULIET, start: START };
    const { header } = await store.storeManual(owner, {
      ref,
      entries: [chat('from', 'soon gone', START)],
      expireSeconds: 60,
    });
    const after = await store.storeManual(owner, { ref, subject: 'renamed', entries: [] });
    expect(after.header.expiresAt).toBe(header.expiresAt);
    const { Item } = await doc.send(
      new GetCommand({ TableName: table, Key: { pk: owner, sk: `c#${header.id}` } }),
    );
    expect(Item?.[TTL_ATTRIBUTE]).toBe(header.expiresAt);
  });

  test('the entry of a collection kept for ever that expires first is the one reported first', async () => {
    const t0 = clock;
    const ref = { with: JULIET, start: START };
    await store.storeManual(owner, { ref, entries: [chat('from', 'for ever', START)] });
    await store.storeManual(owner, {
      ref,
      entries: [chat('to', 'an hour', START + 1000)],
      expireSeconds: 3600,
    });
    await store.storeManual(owner, {
      ref,
      entries: [chat('to', 'a minute', START + 2000)],
      expireSeconds: 60,
    });
    clock += 5_000;
    const cursor = (await store.modifiedSince(owner, undefined, 10)).items.at(-1)?.key;
    clock = t0 + 61_000;
    await store.sweepExpiring(500);
    clock += 3_000;
    const changed = await store.modifiedSince(owner, cursor, 10);
    expect(changed.items.map((c) => [c.kind, c.collection.start])).toEqual([['changed', START]]);
  });

  test('a note left first after the expired messages passes their time on to no one (§5.2)', async () => {
    const t0 = clock;
    const ref = { with: JULIET, start: START };
    await store.storeManual(owner, {
      ref,
      entries: [chat('from', 'gone', START + 60_000)],
      expireSeconds: 60,
    });
    clock += 30_000;
    await store.storeManual(owner, {
      ref,
      entries: [
        { kind: 'note', at: START + 60_000, xml: '<note>n</note>' },
        chat('to', 'left', START + 1_200_000),
      ],
      expireSeconds: 600,
    });
    clock = t0 + 61_000;
    const after = await store.retrieveMessages(owner, ref, { max: 10 });
    expect(after?.items.map((entry) => [entry.kind, entry.prevAt])).toEqual([
      ['note', START + 60_000],
      ['to', undefined],
    ]);
  });

  test("the first message left after the earlier ones expired is timed from the collection's start (§5.2)", async () => {
    // §5.2: 'secs' is "relative to the previous message in the collection (or, for the first
    // message, relative to the start of the collection)".
    const t0 = clock;
    const ref = { with: JULIET, start: START };
    await store.storeManual(owner, {
      ref,
      entries: [chat('from', 'gone', START + 60_000)],
      expireSeconds: 60,
    });
    clock += 30_000;
    await store.storeManual(owner, {
      ref,
      entries: [chat('to', 'left', START + 1_200_000)],
      expireSeconds: 60,
    });
    const before = await store.retrieveMessages(owner, ref, { max: 10 });
    expect(before?.items.map((entry) => entry.prevAt)).toEqual([undefined, START + 60_000]);
    clock = t0 + 61_000;
    const after = await store.retrieveMessages(owner, ref, { max: 10 });
    expect(after?.items.map((entry) => [entry.xml.includes('left'), entry.prevAt])).toEqual([
      [true, undefined],
    ]);
  });
});

describe('EncryptedKeys', () => {
  const encrypted = (keyName: string): EntryInput => ({
    kind: 'data',
    at: START,
    keyName,
    xml: `<EncryptedData xmlns='http://www.w3.org/2001/04/xmlenc#'><KeyInfo xmlns='http://www.w3.org/2000/09/xmldsig#'><KeyName>${keyName}</KeyName></KeyInfo></EncryptedData>`,
  });
  const key = (carried: string, pub: string) => ({
    carriedKeyName: carried,
    publicKeyName: pub,
    xml: `<EncryptedKey xmlns='http://www.w3.org/2001/04/xmlenc#'><CarriedKeyName>${carried}</CarriedKeyName><KeyInfo xmlns='http://www.w3.org/2000/09/xmldsig#'><KeyName>${pub}</KeyName></KeyInfo></EncryptedKey>`,
  });

  test('stored with the collection, found by symmetric key, listed by public key, deleted by name', async () => {
    const crypt = { with: JULIET, start: at('1469-07-23T19:22:31Z') };
    const { header } = await store.storeManual(owner, {
      ref: crypt,
      entries: [encrypted('dataKey1'), encrypted('dataKey2')],
      keys: [
        key('dataKey1', 'romeoPublicKey1fingerprint'),
        key('dataKey1', 'romeoPublicKey2fingerprint'),
        key('dataKey2', 'romeoPublicKey1fingerprint'),
      ],
    });
    expect(header.crypt).toBe(true);
    await store.storeManual(owner, {
      ref: { with: 'balcony@house.capulet.com', start: at('1469-08-03T13:24:06Z') },
      entries: [encrypted('dataKey3')],
      keys: [key('dataKey3', 'romeoPublicKey1fingerprint')],
    });
    const forPage = await store.keysForCollection(owner, header, ['dataKey1']);
    expect(forPage.map((k) => k.publicKeyName).sort()).toEqual([
      'romeoPublicKey1fingerprint',
      'romeoPublicKey2fingerprint',
    ]);
    const onlyMine = await store.keysForCollection(
      owner,
      header,
      ['dataKey1', 'dataKey2'],
      ['romeoPublicKey2fingerprint'],
    );
    expect(onlyMine.map((k) => k.carriedKeyName)).toEqual(['dataKey1']);

    const listed = await store.listKeys(owner, 'romeoPublicKey1fingerprint', { max: 2 });
    expect(listed.items.map((k) => [k.collection.with, k.carriedKeyName])).toEqual([
      [JULIET, 'dataKey1'],
      [JULIET, 'dataKey2'],
    ]);
    expect(listed.count).toBe(3);
    const next = await store.listKeys(owner, 'romeoPublicKey1fingerprint', { max: 2, after: listed.last });
    expect(next.items.map((k) => k.carriedKeyName)).toEqual(['dataKey3']);
    // XEP-0059 §2.2: "The <first/> element SHOULD include an 'index' attribute", on every page.
    expect(next.firstIndex).toBe(2);
    const back = await store.listKeys(owner, 'romeoPublicKey1fingerprint', { max: 1, before: next.first });
    expect(back.items.map((k) => k.carriedKeyName)).toEqual(['dataKey2']);
    expect(back.firstIndex).toBe(1);

    expect(await store.deleteKeys(owner, crypt, ['romeoPublicKey1fingerprint'])).toBe(2);
    expect(
      (await store.keysForCollection(owner, header, ['dataKey1', 'dataKey2'])).map((k) => k.publicKeyName),
    ).toEqual(['romeoPublicKey2fingerprint']);
    expect(await store.deleteKeys(owner, { with: JULIET, start: START }, ['x'])).toBeUndefined();
  });

  test('live as long as the entries appended later that use them without resending them', async () => {
    // §6: "the client MAY reuse a symmetric KEY that has already been uploaded ... the client
    // SHOULD NOT resend <EncryptedKey/> elements"; §8.2: the server "MUST return all the
    // <EncryptedKey/> elements that it possesses" that the returned page references.
    const year = 365 * 86_400;
    const crypt = { with: JULIET, start: at('1469-07-23T19:22:31Z') };
    const { header } = await store.storeManual(owner, {
      ref: crypt,
      entries: [encrypted('dataKey1')],
      keys: [key('dataKey1', 'romeoPublicKey1fingerprint')],
      expireSeconds: year,
    });
    clock += 2 * 86_400_000;
    await store.storeManual(owner, { ref: crypt, entries: [encrypted('dataKey1')], expireSeconds: year });
    // DynamoDB deletes an item once its TTL has passed: the key must outlive the entry using it.
    const ttlOf = await itemTtls(header.cid);
    const entryTtls = ttlOf('m#');
    expect(entryTtls).toEqual([
      Math.floor(clock / 1000) - 2 * 86_400 + year,
      Math.floor(clock / 1000) + year,
    ]);
    const [keyTtl] = ttlOf('k#');
    expect(keyTtl).toBeGreaterThanOrEqual(Math.max(...entryTtls));
  });

  test("are extended by the store's next attempt when the first failed on the way", async () => {
    const year = 365 * 86_400;
    const crypt = { with: JULIET, start: at('1469-07-24T10:00:00Z') };
    const { header } = await store.storeManual(owner, {
      ref: crypt,
      entries: [encrypted('dataKey1')],
      keys: [key('dataKey1', 'romeoPublicKey1fingerprint')],
      expireSeconds: year,
    });
    clock += 2 * 86_400_000;
    // The key's extension is throttled past the SDK's retries: the store fails, the frame that
    // asked for it is delivered again, and the same store runs a second time.
    const send = doc.send.bind(doc);
    const failing = vi.spyOn(doc, 'send').mockImplementation((async (command: {
      input?: { Key?: { sk?: string } };
    }) => {
      if (String(command.input?.Key?.sk).startsWith('k#')) {
        failing.mockRestore();
        throw Object.assign(new Error('throttled'), { name: 'ThrottlingException' });
      }
      return send(command as never);
    }) as never);
    const later = { ref: crypt, entries: [encrypted('dataKey1')], expireSeconds: year };
    await expect(store.storeManual(owner, later)).rejects.toThrow('throttled');
    failing.mockRestore();
    await store.storeManual(owner, later);

    const [keyTtl] = (await itemTtls(header.cid))('k#');
    expect(keyTtl).toBeGreaterThanOrEqual(Math.floor(clock / 1000) + year);
  });
});

describe('manual store', () => {
  test("a note is not a message: the tail after it keeps the last message's time (§5.2 secs)", async () => {
    const ref = { with: JULIET, start: START };
    await store.storeManual(owner, {
      ref,
      entries: [chat('from', 'a', START + 1000), { kind: 'note', at: START + 50_000, xml: '<note>n</note>' }],
    });
    const existing = await store.getCollection(owner, ref);
    expect(existing?.last).toEqual({ seq: 1, at: START + 50_000, messageAt: START + 1000 });
    await store.storeManual(owner, { ref, entries: [chat('to', 'b', START + 2000)] }, existing);
    const page = await store.retrieveMessages(owner, ref, { max: 10 });
    expect(page?.items.map((e) => [e.kind, e.prevAt])).toEqual([
      ['from', undefined],
      ['note', START + 1000],
      ['to', START + 1000],
    ]);
  });

  test('creates, then appends and changes the subject; list shows the new subject', async () => {
    const ref = { with: JULIET, start: START };
    const created = await store.storeManual(owner, {
      ref,
      subject: 'She speaks!',
      entries: [chat('from', 'a', START)],
    });
    expect(created.created).toBe(true);
    const existing = await store.getCollection(owner, ref);
    expect(existing?.last).toEqual({ seq: 0, at: START, messageAt: START });
    const appended = await store.storeManual(
      owner,
      { ref, subject: 'She speaks twice!', entries: [chat('to', 'b', START + 11_000)] },
      existing,
    );
    expect(appended.created).toBe(false);
    expect(appended.entries.map((e) => [e.seq, e.prevAt])).toEqual([[1, START]]);
    const list = await store.listCollections(owner, {}, { max: 5 });
    expect(list.items.map((c) => c.subject)).toEqual(['She speaks twice!']);
    const again = await store.storeManual(owner, { ref, entries: [chat('to', 'c', START + 12_000)] });
    expect(again.entries[0]?.seq).toBe(2);
  });

  test('refuses entries beyond the collection limit', async () => {
    const small = createArchiveStore(doc, table, { now: () => clock, maxCollectionEntries: 3 });
    await small.storeManual(owner, {
      ref: { with: JULIET, start: START },
      entries: [chat('from', 'a', START)],
    });
    await expect(
      small.storeManual(owner, {
        ref: { with: JULIET, start: START },
        entries: [chat('from', 'b', START), chat('from', 'c', START), chat('from', 'd', START)],
      }),
    ).rejects.toThrow(/is full/);
  });
});

describe("a frame's manual store (written once, as planned)", () => {
  test('plans before it writes; a slot another writer took moves its entry after it; a redelivery writes the same entries', async () => {
    const ref = { with: JULIET, start: START };
    await store.storeManual(owner, { ref, entries: [chat('from', 'before', START)] });
    const frame = { key: 'frame-1:0', redelivered: false };
    // Another writer (an automatic append) takes slot 2 just before the frame's entry goes there.
    const send = doc.send.bind(doc);
    let intruded = false;
    const spy = vi.spyOn(doc, 'send').mockImplementation((async (command: unknown) => {
      if (
        !intruded &&
        command instanceof PutCommand &&
        command.input.Item?.sk === 'm#0000000002' &&
        command.input.Item?.fk === frame.key
      ) {
        intruded = true;
        await send(
          new PutCommand({
            TableName: table,
            Item: {
              ...command.input.Item,
              id: 'other',
              at: START + 2500,
              xml: '<to><body>other</body></to>',
              fk: undefined,
            },
          }),
        );
      }
      return send(command as never);
    }) as never);
    let first: Awaited<ReturnType<ArchiveStore['storeManual']>>;
    try {
      first = await store.storeManual(
        owner,
        { ref, entries: [chat('to', 'a', START + 1000), chat('from', 'b', START + 2000)] },
        await store.getCollection(owner, ref),
        { frame },
      );
    } finally {
      spy.mockRestore();
    }
    expect(intruded).toBe(true);
    expect(first.entries.map((e) => [e.seq, e.at, e.prevAt])).toEqual([
      [1, START + 1000, START],
      [3, START + 2000, START + 2500],
    ]);
    // The frame comes again: the times it brings now (counted from entries stored since) are not
    // the ones planned; the plan's are kept, and nothing is added.
    const existing = await store.getCollection(owner, ref);
    meter.reset();
    const again = await store.storeManual(
      owner,
      { ref, entries: [chat('to', 'a', START + 9000), chat('from', 'b', START + 9999)] },
      existing,
      { frame: { ...frame, redelivered: true } },
    );
    // The plan read (a redelivery only), the entries put again where it says.
    expect(meter.snapshot().operations.GetItem?.requests).toBe(1);
    expect(meter.snapshot().operations.PutItem?.requests).toBe(2);
    expect(again.entries).toEqual(first.entries);
    const page = await store.retrieveMessages(owner, ref, { max: 10 });
    expect(page?.items.map((e) => [e.seq, /<body>([^<]*)</.exec(e.xml)?.[1], e.at, e.id])).toEqual([
      [0, 'before', START, expect.any(String)],
      [1, 'a', START + 1000, first.entries[0]?.id],
      [2, 'other', START + 2500, 'other'],
      [3, 'b', START + 2000, first.entries[1]?.id],
    ]);
    // The plan is an item of the collection's partition: removing the collection removes it.
    await store.removeCollections(owner, { with: { kind: 'full', jid: JULIET }, start: START, exact: true });
    const left = await doc.send(
      new QueryCommand({
        TableName: table,
        KeyConditionExpression: 'pk = :pk',
        ExpressionAttributeValues: { ':pk': `${owner}/${first.header.cid}` },
      }),
    );
    expect(left.Items ?? []).toEqual([]);
  });

  test('a store outside a frame writes no plan: one conditional PutItem per entry, as before', async () => {
    const ref = { with: JULIET, start: START };
    await store.storeManual(owner, { ref, entries: [chat('from', 'a', START)] });
    const existing = await store.getCollection(owner, ref);
    meter.reset();
    await store.storeManual(owner, { ref, entries: [chat('to', 'b', START + 1000)] }, existing);
    expect(meter.snapshot().operations.PutItem?.requests).toBe(1);
    meter.reset();
    await store.storeManual(
      owner,
      { ref, entries: [chat('to', 'c', START + 2000)] },
      await store.getCollection(owner, ref),
      {
        frame: { key: 'frame-2:0', redelivered: false },
      },
    );
    // In a frame: the plan, then the entry.
    expect(meter.snapshot().operations.PutItem?.requests).toBe(2);
  });
});

describe('preferences', () => {
  test('absent until stored; versioned writes; a stale write is refused', async () => {
    const empty = await store.getPrefs(owner);
    expect(empty).toEqual({ items: {}, methods: {}, version: 0 });
    const stored = await store.putPrefs(owner, {
      ...empty,
      default: { save: 'body', otr: 'allow', expire: 31536000 },
      items: { 'romeo@montague.net': { save: 'false', otr: 'require' } },
      methods: { auto: 'never', local: 'allow', manual: 'prefer' },
    });
    expect(stored.version).toBe(1);
    expect(await store.getPrefs(owner)).toEqual(stored);
    await expect(
      store.putPrefs(owner, { ...empty, default: { save: 'all', otr: 'deny' } }),
    ).rejects.toBeInstanceOf(PrefsVersionConflictError);
  });
});

describe('costs (DynamoDB Local reports consumed capacity)', () => {
  test('appending one message to an open collection: one PutItem of one write unit', async () => {
    const open = await store.startCollection(owner, { with: JULIET, start: clock });
    // The first append of a change window moves the header's change time; the next ones do not.
    const first = await store.appendMessage(owner, open, chat('from', 'warm up', clock + 500));
    meter.reset();
    await store.appendMessage(
      owner,
      first.open,
      chat('to', 'Neither, fair saint, if either thee dislike.', clock + 1000),
    );
    const cost = meter.snapshot();
    expect(cost.operations.PutItem).toMatchObject({ requests: 1, writeUnits: 1 });
    expect(cost.writeUnits).toBe(1);
    expect(cost.readUnits).toBe(0);
    meter.reset();
    const found = await store.findOpenCollection(owner, JULIET);
    const lookup = meter.snapshot();
    expect(found?.last?.seq).toBe(1);
    expect(lookup.readUnits).toBeLessThanOrEqual(2);
    expect(lookup.writeUnits).toBe(0);
    console.info('append', JSON.stringify(cost), 'find open', JSON.stringify(lookup));
  });

  test("retrieve of large entries stops reading at a reply's worth, whatever max asks", async () => {
    // 60 entries of 30 KB (1.8 MB): a page of max 250 would read all of them to answer the
    // four that fit a 128 KB reply.
    const big = 'x'.repeat(30_000);
    const entries = Array.from({ length: 60 }, (_, i) => chat('to', `${i}${big}`, START + i * 1000 + 1));
    await store.storeManual(owner, { ref: { with: JULIET, start: START }, entries });
    meter.reset();
    const page = await store.retrieveMessages(owner, { with: JULIET, start: START }, { max: 250 });
    const cost = meter.snapshot();
    if (!page) throw new Error('the collection was not found');
    // Past RETRIEVE_READ_BYTES by one entry at most, and every entry in order from the first.
    const read = Math.floor(RETRIEVE_READ_BYTES / 30_000) + 1;
    expect(page.items.map((entry) => Number(entry.xml.slice('<to><body>'.length).split('x')[0]))).toEqual(
      Array.from({ length: read }, (_, i) => i),
    );
    expect(page.count).toBe(60);
    // One Query page of 1 MB at most (strongly consistent: 4 KB a unit, 256 units) and the
    // collection's header and count; reading all 60 would be 1.8 MB, 450 units.
    expect(cost.readUnits).toBeLessThan(320);
    const next = await store.retrieveMessages(
      owner,
      { with: JULIET, start: START },
      { max: 250, after: page.last },
    );
    expect(next?.items[0]?.seq).toBe(read);
  });

  test('retrieve: page k of 2,000 messages costs what page 1 costs', async () => {
    await seedCollection(JULIET, START, 2000);
    const ref = { with: JULIET, start: START };
    meter.reset();
    const first = await store.retrieveMessages(owner, ref, { max: 100 });
    const page1 = meter.snapshot();
    meter.reset();
    const deep = await store.retrieveMessages(owner, ref, { max: 100, after: '1499' });
    const pageK = meter.snapshot();
    meter.reset();
    const viaIndex = await store.retrieveMessages(owner, ref, { max: 100, index: 1800 });
    const pageIndex = meter.snapshot();
    meter.reset();
    const last = await store.retrieveMessages(owner, ref, { max: 100, lastPage: true });
    const pageLast = meter.snapshot();
    expect(first?.items[0]?.seq).toBe(0);
    expect(deep?.items[0]?.seq).toBe(1500);
    expect(viaIndex?.items[0]?.seq).toBe(1800);
    expect(last?.items.at(-1)?.seq).toBe(1999);
    expect(first?.count).toBe(2000);
    expect(page1.readUnits).toBeGreaterThan(0);
    expect(pageK.readUnits).toBe(page1.readUnits);
    expect(pageIndex.readUnits).toBe(page1.readUnits);
    expect(pageLast.readUnits).toBe(page1.readUnits);
    expect(pageK.requests).toBe(page1.requests);
    console.info('retrieve page 1', JSON.stringify(page1), 'page 16', JSON.stringify(pageK));
  });

  test('list: page k of 300 collections costs what page 1 costs', async () => {
    for (let i = 0; i < 300; i += 25) {
      await Promise.all(
        Array.from({ length: 25 }, (_, j) =>
          store.storeManual(owner, {
            ref: { with: `c${(i + j) % 7}@capulet.com/r`, start: START + (i + j) * 60_000 + 1 },
            entries: [chat('from', 'x', START)],
          }),
        ),
      );
    }
    meter.reset();
    const first = await store.listCollections(owner, {}, { max: 30 });
    const page1 = meter.snapshot();
    let page = first;
    for (let k = 0; k < 6; k++) page = await store.listCollections(owner, {}, { max: 30, after: page.last });
    meter.reset();
    const deep = await store.listCollections(owner, {}, { max: 30, after: page.last });
    const pageK = meter.snapshot();
    console.info('LIST', JSON.stringify(page1.operations), JSON.stringify(pageK.operations));
    expect(first.count).toBe(300);
    expect(deep.items[0]?.start).toBe(START + 210 * 60_000 + 1);
    // A page after a cursor counts in two parts around it, to place itself (XEP-0059 §2.3 <first
    // index>): the same headers read, each part rounded up to its half unit.
    expect(pageK.readUnits).toBeGreaterThanOrEqual(page1.readUnits);
    expect(pageK.readUnits).toBeLessThanOrEqual(page1.readUnits + 0.5);
    expect(deep.firstIndex).toBe(210);
    meter.reset();
    const filtered1 = await store.listCollections(
      owner,
      { with: { kind: 'bare', jid: 'c3@capulet.com' } },
      { max: 10 },
    );
    const filteredPage1 = meter.snapshot();
    meter.reset();
    const filtered3 = await store.listCollections(
      owner,
      { with: { kind: 'bare', jid: 'c3@capulet.com' } },
      {
        max: 10,
        after: (
          await store.listCollections(
            owner,
            { with: { kind: 'bare', jid: 'c3@capulet.com' } },
            { max: 10, after: filtered1.last },
          )
        ).last,
      },
    );
    // The nested call above is metered too: subtract it by measuring it alone.
    const filteredBoth = meter.snapshot();
    expect(filtered1.count).toBe(43);
    expect(filtered3.items).toHaveLength(10);
    expect(filteredBoth.readUnits).toBeGreaterThanOrEqual(2 * filteredPage1.readUnits);
    expect(filteredBoth.readUnits).toBeLessThanOrEqual(2 * filteredPage1.readUnits + 1);
    meter.reset();
    await store.listCollections(owner, {}, { max: 1 });
    const withCountOnly = meter.snapshot();
    // A one-item page is about the COUNT Query alone: most of a list page's cost is its count.
    expect(withCountOnly.readUnits).toBeLessThan(page1.readUnits);
    console.info(
      'list page 1',
      JSON.stringify(page1),
      'page 8',
      JSON.stringify(pageK),
      'max 1',
      withCountOnly.readUnits,
    );
  });
});
