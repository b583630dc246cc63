/**
 * The Sessions store (shared/store/sessions.ts) against the run's DynamoDB Local: connection
 * rows (the stream's state between frames) and bound-resource rows (what routing reads), with
 * every conditional write tried by its owner and by someone else.
 */
import { GetCommand, UpdateCommand } from '@aws-sdk/lib-dynamodb';
import { beforeAll, describe, expect, it } from 'vitest';
import { createDocumentClient } from '../../shared/store/dynamo.ts';
import {
  createOfflineStore,
  OfflineGuardFailedError,
  type OfflineStore,
} from '../../shared/store/offline.ts';
import {
  boundedRevocation,
  createSessionStore,
  DIRECT_POST_LEASE_MS,
  fitsResourceKey,
  HOLD_LEASE_MS,
  isHeld,
  LAST_UNAVAILABLE_KEEP_SECONDS,
  LAST_UNAVAILABLE_MAX_CHARS,
  MAY_QUEUE_AFTER_PRESENCE_MS,
  REVOCATION_MAX_BYTES,
  REVOCATION_MAX_CONTACTS,
  type ResourceRecord,
  ResourceTakenError,
  type SessionStore,
} from '../../shared/store/sessions.ts';
import { TTL_ATTRIBUTE } from '../../shared/tables.ts';
import { createTestTables, TEST_REGION, useDynamoDbLocal } from '../support/dynamodb.ts';
import { intercept } from '../support/intercept.ts';

const CONNECTION_TTL_SECONDS = 3 * 3600;

let table: string;
let sessions: SessionStore;
let offline: OfflineStore;
let doc: ReturnType<typeof createDocumentClient>;
let counter = 0;
const fresh = (name: string) => `${name}${++counter}-${Date.now().toString(36)}`;
const freshUser = (name: string) => `${fresh(name)}@localhost`;

beforeAll(async () => {
  const tables = await createTestTables();
  table = tables.sessions;
  doc = createDocumentClient({ endpoint: useDynamoDbLocal(), region: TEST_REGION });
  sessions = createSessionStore(doc, table, CONNECTION_TTL_SECONDS);
  offline = createOfflineStore(doc, tables.offline, { quota: 100, ttlSeconds: 3600 });
});

async function rawItem(pk: string, sk: string): Promise<Record<string, unknown> | undefined> {
  const { Item } = await doc.send(
    new GetCommand({ TableName: table, Key: { pk, sk }, ConsistentRead: true }),
  );
  return Item;
}

function record(user: string, resource: string, connectionId: string, extra: Partial<ResourceRecord> = {}) {
  return {
    user,
    resource,
    connectionId,
    available: false,
    priority: 0,
    boundAt: Date.now(),
    ...extra,
  } satisfies ResourceRecord;
}

describe('connections', () => {
  it('creates a connection row with a fresh stream state', async () => {
    const id = fresh('conn');
    const connectedAt = Date.now();
    await sessions.createConnection(id, connectedAt);
    expect(await sessions.getConnection(id)).toEqual({
      connectionId: id,
      connectedAt,
      streamOpen: false,
      streamId: undefined,
      user: undefined,
      resource: undefined,
      sasl: undefined,
      authFailures: 0,
      flexibleOffline: undefined,
      sm: undefined,
      transfer: undefined,
      flooded: undefined,
      directedTo: undefined,
    });
  });

  it('records a re-routed message for the frame that queued it, never over another frame’s record', async () => {
    const id = fresh('rerouted');
    await sessions.createConnection(id, Date.now());
    expect(await sessions.recordRerouted(id, 'f1', 'bob@localhost')).toBe(true);
    expect((await sessions.getConnection(id))?.storedOffline).toBe('f1 bob@localhost');
    // The same frame again (another of its recipients' sessions ended): its record.
    expect(await sessions.recordRerouted(id, 'f1', 'carol@localhost')).toBe(true);
    expect((await sessions.getConnection(id))?.storedOffline).toBe('f1 carol@localhost');
    // A later frame's record (its own store offline, not done yet) stays: that frame is the one
    // a redelivery brings back, f1 was done before it started.
    await sessions.updateConnection(id, { storedOffline: 'f2 dave@localhost' });
    expect(await sessions.recordRerouted(id, 'f1', 'bob@localhost')).toBe(false);
    expect((await sessions.getConnection(id))?.storedOffline).toBe('f2 dave@localhost');
    // A frame whose id merely begins like the recorded one is another frame.
    expect(await sessions.recordRerouted(id, 'f', 'bob@localhost')).toBe(false);
    // A frame saved as done is never redelivered to use one: nothing written.
    await sessions.updateConnection(id, { storedOffline: undefined, savedFrame: 'f3' });
    expect(await sessions.recordRerouted(id, 'f3', 'bob@localhost')).toBe(false);
    expect((await sessions.getConnection(id))?.storedOffline).toBeUndefined();
    expect(await sessions.recordRerouted(id, 'f4', 'bob@localhost')).toBe(true);
    // No row (the sender's connection is gone): nothing is created.
    const gone = fresh('rerouted-gone');
    expect(await sessions.recordRerouted(gone, 'f1', 'bob@localhost')).toBe(false);
    expect(await sessions.getConnection(gone)).toBeUndefined();
  });

  it('an unknown connection is undefined', async () => {
    expect(await sessions.getConnection(fresh('never'))).toBeUndefined();
  });

  it("revokes an open connection's row (account deletion), keeps the mark through later saves, and never writes a row that is gone", async () => {
    const id = fresh('revoked');
    await sessions.createConnection(id, Date.now());
    await sessions.updateConnection(id, { user: 'gone@localhost', streamOpen: true });
    const many = Array.from({ length: REVOCATION_MAX_CONTACTS + 5 }, (_, i) => `c${i}@localhost`);
    const notify = [{ contact: 'c0@localhost', deliver: ['unsubscribe', 'unsubscribed'] }];
    expect(await sessions.revokeConnection(id, { presenceTo: many, notify })).toBe(true);
    // A frame in flight saves its state after the mark: the mark stays.
    await sessions.updateConnection(id, { doneSeq: '7' });
    const row = await sessions.getConnection(id);
    expect(row).toMatchObject({ user: 'gone@localhost', revoked: { notify } });
    // Bounded: the row stays far below DynamoDB's item size.
    expect(row?.revoked?.presenceTo).toEqual(many.slice(0, REVOCATION_MAX_CONTACTS));

    const gone = fresh('gone');
    expect(await sessions.revokeConnection(gone)).toBe(false);
    expect(await rawItem(`conn#${gone}`, 'conn')).toBeUndefined();
    // A row whose stream ended already is not marked: its $disconnect would tell nobody, so the
    // notices go to another of the account's streams.
    const ended = fresh('ended');
    await sessions.createConnection(ended, Date.now());
    await sessions.updateConnection(ended, { user: 'gone@localhost', ended: true });
    expect(await sessions.revokeConnection(ended, { notify })).toBe(false);
    expect((await sessions.getConnection(ended))?.revoked).toBeUndefined();
    // Marked once: a rerun of the deletion (which finds the roster gone) keeps what the first told.
    expect(await sessions.revokeConnection(id, {})).toBe(false);
    expect((await sessions.getConnection(id))?.revoked?.notify).toEqual(notify);
    // Long JIDs, multi-byte ones: bounded by UTF-8 bytes too (each list at most REVOCATION_MAX_BYTES).
    const long = Array.from({ length: 300 }, (_, i) => `${'ü'.repeat(500)}${i}@localhost`);
    const kept = boundedRevocation({ presenceTo: long }).presenceTo ?? [];
    expect(kept.length).toBeGreaterThan(0);
    expect(Buffer.byteLength(kept.join(''))).toBeLessThanOrEqual(REVOCATION_MAX_BYTES);
  });

  it('sets the TTL attribute to connectedAt + CONNECTION_TTL_SECONDS', async () => {
    const id = fresh('ttl');
    const connectedAt = Date.now() - 5000;
    await sessions.createConnection(id, connectedAt);
    const item = await rawItem(`conn#${id}`, 'conn');
    expect(item?.[TTL_ATTRIBUTE]).toBe(Math.floor(connectedAt / 1000) + CONNECTION_TTL_SECONDS);
  });

  it('an update sets the given fields and leaves the others', async () => {
    const id = fresh('update');
    await sessions.createConnection(id, Date.now());
    await sessions.updateConnection(id, {
      streamOpen: true,
      streamId: 's1',
      sasl: { mechanism: 'SCRAM-SHA-1', state: { nonce: 'abc' }, jid: 'alice@localhost' },
      authFailures: 2,
    });
    await sessions.updateConnection(id, { user: 'alice@localhost' });
    expect(await sessions.getConnection(id)).toMatchObject({
      streamOpen: true,
      streamId: 's1',
      sasl: { mechanism: 'SCRAM-SHA-1', state: { nonce: 'abc' }, jid: 'alice@localhost' },
      authFailures: 2,
      user: 'alice@localhost',
    });
  });

  it('"With `returnRow`, returns the row as the write left it": the whole row, as a read finds it', async () => {
    const id = fresh('returned');
    const connectedAt = Date.now() - 1000;
    // The first write creates the row; a write by something else (a stored message's record)
    // comes in between; the returned row holds all of them, not only the fields written.
    const created = await sessions.updateConnection(
      id,
      { streamOpen: true },
      { create: { connectedAt, sourceIp: '203.0.113.9' }, returnRow: true },
    );
    expect(created).toEqual(await sessions.getConnection(id));
    await sessions.updateConnection(id, { storedOffline: 'f1 bob@localhost' });
    const row = await sessions.updateConnection(id, { user: 'alice@localhost' }, { returnRow: true });
    expect(row).toEqual(await sessions.getConnection(id));
    expect(row).toMatchObject({
      connectionId: id,
      connectedAt,
      sourceIp: '203.0.113.9',
      streamOpen: true,
      storedOffline: 'f1 bob@localhost',
      user: 'alice@localhost',
    });
    // Without it nothing comes back; nor when the row is gone and not written again.
    expect(await sessions.updateConnection(id, { streamOpen: false })).toBeUndefined();
    await sessions.deleteConnection(id);
    expect(await sessions.updateConnection(id, { streamOpen: true }, { returnRow: true })).toBeUndefined();
  });

  it('"`undefined` values are removed": the attribute leaves the row', async () => {
    const id = fresh('remove');
    await sessions.createConnection(id, Date.now());
    await sessions.updateConnection(id, {
      sasl: { mechanism: 'PLAIN', state: {} },
      transfer: { kind: 'flood', after: 'x' },
      directedTo: ['bob@localhost'],
    });
    await sessions.updateConnection(id, { sasl: undefined, transfer: undefined, streamOpen: true });
    const item = await rawItem(`conn#${id}`, 'conn');
    expect(item).not.toHaveProperty('sasl');
    expect(item).not.toHaveProperty('transfer');
    expect(item?.directedTo).toEqual(['bob@localhost']);
    expect(await sessions.getConnection(id)).toMatchObject({
      sasl: undefined,
      transfer: undefined,
      streamOpen: true,
      directedTo: ['bob@localhost'],
    });
  });

  it('every update refreshes the TTL to now + CONNECTION_TTL_SECONDS', async () => {
    const id = fresh('refresh');
    await sessions.createConnection(id, Date.now() - 3_600_000);
    const before = Math.floor(Date.now() / 1000);
    await sessions.updateConnection(id, { streamOpen: true });
    const after = Math.floor(Date.now() / 1000);
    const expiresAt = (await rawItem(`conn#${id}`, 'conn'))?.[TTL_ATTRIBUTE] as number;
    expect(expiresAt).toBeGreaterThanOrEqual(before + CONNECTION_TTL_SECONDS);
    expect(expiresAt).toBeLessThanOrEqual(after + CONNECTION_TTL_SECONDS);
  });

  it('an update of a deleted connection is ignored and does not recreate the row', async () => {
    const id = fresh('gone');
    await sessions.createConnection(id, Date.now());
    await sessions.deleteConnection(id);
    await expect(sessions.updateConnection(id, { user: 'alice@localhost' })).resolves.toBeUndefined();
    await expect(sessions.updateConnection(fresh('never'), { streamOpen: true })).resolves.toBeUndefined();
    expect(await sessions.getConnection(id)).toBeUndefined();
    expect(await rawItem(`conn#${id}`, 'conn')).toBeUndefined();
  });

  it('deletes a connection; deleting it again is harmless', async () => {
    const id = fresh('delete');
    await sessions.createConnection(id, Date.now());
    await sessions.deleteConnection(id);
    expect(await sessions.getConnection(id)).toBeUndefined();
    await expect(sessions.deleteConnection(id)).resolves.toBeUndefined();
  });
});

describe('binding and reading resources', () => {
  it('bind returns undefined for a free resource and the replaced record on a take-over', async () => {
    const user = freshUser('bind');
    const first = record(user, 'phone', 'c1', { available: true, priority: 5, presence: '<presence/>' });
    expect(await sessions.bindResource(first)).toBeUndefined();
    const second = record(user, 'phone', 'c2');
    expect(await sessions.bindResource(second)).toEqual({
      ...first,
      flexibleOffline: undefined,
      smId: undefined,
    });
    expect(await sessions.getResource(user, 'phone')).toMatchObject({ connectionId: 'c2', available: false });
  });

  it('tells the binder of another connection’s row before taking it, and takes it only as it was told', async () => {
    const user = freshUser('takeover');
    await sessions.bindResource(record(user, 'r', 'c1', { connectedAt: 1 }));
    const told: ResourceRecord[] = [];
    const reads = { count: 0 };
    const getResource = sessions.getResource.bind(sessions);
    const restore = intercept(sessions, 'getResource', async (...args) => {
      reads.count++;
      return getResource(...args);
    });
    try {
      // Told of c1's row (taken from the failed condition's answer, no read), then taken.
      const c2 = record(user, 'r', 'c2', { connectedAt: 2, mayQueue: true });
      const taken = await sessions.bindResource(c2, async (held) => {
        told.push(held);
      });
      expect(told.map((row) => row.connectionId)).toEqual(['c1']);
      expect(taken?.connectionId).toBe('c1');
      expect(reads.count).toBe(0);
      // Its own row again (a redelivered bind): taken at once, nobody told.
      await sessions.bindResource(c2, async (held) => {
        told.push(held);
      });
      expect(told).toHaveLength(1);
      // c3 is told of c2's row; meanwhile c2's stream switches it to a stream-management queue:
      // the row is not the one c3 was told of, so it is looked at and told again.
      await sessions.bindResource(record(user, 'r', 'c3', { connectedAt: 3 }), async (held) => {
        told.push(held);
        if (told.length === 2) await sessions.switchToQueue(user, 'r', 'c2', 'sm-late');
      });
      expect(told.slice(1).map((row) => [row.connectionId, row.smId])).toEqual([
        ['c2', undefined],
        ['c2', 'sm-late'],
      ]);
      expect(await sessions.getResource(user, 'r')).toMatchObject({ connectionId: 'c3' });
      // An older connection's late bind is refused, and nobody is told.
      await expect(
        sessions.bindResource(record(user, 'r', 'c0', { connectedAt: 0 }), async (held) => {
          told.push(held);
        }),
      ).rejects.toBeInstanceOf(ResourceTakenError);
      expect(told).toHaveLength(3);
    } finally {
      restore();
    }
  });

  it('sets the TTL attribute to boundAt + CONNECTION_TTL_SECONDS', async () => {
    const user = freshUser('bind-ttl');
    const bound = record(user, 'r', 'c1', { boundAt: Date.now() - 7000 });
    await sessions.bindResource(bound);
    const item = await rawItem(`user#${user}`, 'res#r');
    expect(item?.[TTL_ATTRIBUTE]).toBe(Math.floor(bound.boundAt / 1000) + CONNECTION_TTL_SECONDS);
  });

  it('listResources sees a bind at once (strongly consistent) and only that user’s resources', async () => {
    const user = freshUser('list');
    const other = `${user}.other`;
    await sessions.bindResource(record(other, 'a', 'c9'));
    await sessions.bindResource(record(user, 'a', 'c1'));
    expect((await sessions.listResources(user)).map((r) => r.resource)).toEqual(['a']);
    await sessions.bindResource(record(user, 'b', 'c2'));
    const listed = await sessions.listResources(user);
    expect(listed.map((r) => [r.resource, r.connectionId])).toEqual([
      ['a', 'c1'],
      ['b', 'c2'],
    ]);
    expect(listed.every((r) => r.user === user)).toBe(true);
    expect(await sessions.listResources(freshUser('nobody'))).toEqual([]);
  });

  it('getResource finds a bound resource, not another user’s or a missing one', async () => {
    const user = freshUser('get');
    await sessions.bindResource(record(user, 'desk', 'c1', { smId: 'sm-1' }));
    expect(await sessions.getResource(user, 'desk')).toMatchObject({
      user,
      resource: 'desk',
      connectionId: 'c1',
      smId: 'sm-1',
    });
    expect(await sessions.getResource(user, 'laptop')).toBeUndefined();
    expect(await sessions.getResource(freshUser('stranger'), 'desk')).toBeUndefined();
  });
});

describe('the last unavailable presence (RFC 6121 §4.3.2), kept on the `avail` item', () => {
  it('is written by the update that takes the resource out of the set, replaced by the next, and read with the set', async () => {
    const user = freshUser('lastoff');
    const other = freshUser('lastoff-other');
    await sessions.bindResource(record(user, 'a', 'c1', { available: true }));
    await sessions.bindResource(record(user, 'b', 'c2', { available: true }));
    expect((await sessions.presenceOf([user])).lastUnavailable.has(user)).toBe(false);

    const before = Date.now();
    await sessions.updatePresence(user, 'a', 'c1', {
      available: false,
      priority: 0,
      presence: '',
      unavailable: '<presence><status>lunch</status></presence>',
    });
    const seen = await sessions.presenceOf([user, other]);
    // Kept even while another resource is available; the reader decides when it applies.
    expect(seen.online.get(user)?.map((r) => r.resource)).toEqual(['b']);
    expect(seen.lastUnavailable.get(user)).toEqual({
      at: expect.any(Number),
      presence: '<presence><status>lunch</status></presence>',
    });
    expect(seen.lastUnavailable.get(user)?.at).toBeGreaterThanOrEqual(before);
    expect(seen.lastUnavailable.has(other)).toBe(false);
    // The item is kept for it past the connection TTL.
    const item = await rawItem(`user#${user}`, 'avail');
    expect(item?.[TTL_ATTRIBUTE]).toBeGreaterThanOrEqual(
      Math.floor(before / 1000) + LAST_UNAVAILABLE_KEEP_SECONDS,
    );

    // The session's end (no presence of the client's): the server's unavailable, no children.
    await sessions.releaseResource(user, 'b', 'c2');
    const ended = (await sessions.presenceOf([user])).lastUnavailable.get(user);
    expect(ended?.presence).toBe('');
    expect(ended?.at).toBeGreaterThanOrEqual(seen.lastUnavailable.get(user)?.at as number);
    expect((await sessions.presenceOf([user])).online.has(user)).toBe(false);
  });

  it('keeps one too large without its children, and forgets it on request (account deletion)', async () => {
    const user = freshUser('lastoff-big');
    await sessions.bindResource(record(user, 'a', 'c1', { available: true }));
    const status = 'x'.repeat(LAST_UNAVAILABLE_MAX_CHARS);
    await sessions.updatePresence(user, 'a', 'c1', {
      available: false,
      priority: 0,
      presence: '',
      unavailable: `<presence><status>${status}</status></presence>`,
    });
    expect((await sessions.presenceOf([user])).lastUnavailable.get(user)?.presence).toBe('');
    // Past its keeping, though DynamoDB's TTL has not deleted the item yet: not served.
    await doc.send(
      new UpdateCommand({
        TableName: table,
        Key: { pk: `user#${user}`, sk: 'avail' },
        UpdateExpression: 'SET #ttl = :past',
        ExpressionAttributeNames: { '#ttl': TTL_ATTRIBUTE },
        ExpressionAttributeValues: { ':past': Math.floor(Date.now() / 1000) - 1 },
      }),
    );
    expect((await sessions.presenceOf([user])).lastUnavailable.has(user)).toBe(false);
    await sessions.bindResource(record(user, 'b', 'c2', { available: true }));
    await sessions.releaseResource(user, 'b', 'c2');
    expect((await sessions.presenceOf([user])).lastUnavailable.get(user)?.presence).toBe('');
    // Forgotten (account deletion): the item goes with it, naming no resource.
    await sessions.forgetLastUnavailable(user);
    expect(await rawItem(`user#${user}`, 'avail')).toBeUndefined();
    expect((await sessions.presenceOf([user])).lastUnavailable.has(user)).toBe(false);
    // A user without an `avail` item at all: nothing to forget, no item made.
    const nobody = freshUser('lastoff-none');
    await sessions.forgetLastUnavailable(nobody);
    expect(await rawItem(`user#${nobody}`, 'avail')).toBeUndefined();
  });
});

describe('rebindResumed: a resume binds its session’s resource again, never a newer bind’s', () => {
  it('takes the row while it is the session’s (or gone), and keeps its availability', async () => {
    const user = freshUser('resumed');
    await sessions.bindResource(record(user, 'r', 'old', { smId: 'sm-1', available: true, priority: 3 }));
    await sessions.rebindResumed({
      ...record(user, 'r', 'new', { available: true, priority: 3 }),
      smId: 'sm-1',
    });
    expect(await sessions.getResource(user, 'r')).toMatchObject({ connectionId: 'new', smId: 'sm-1' });
    expect((await sessions.availableResourcesOf([user])).get(user)?.map((r) => r.resource)).toEqual(['r']);
    // Its redelivery finds the row its own already.
    await sessions.rebindResumed({
      ...record(user, 'r', 'new', { available: true, priority: 3 }),
      smId: 'sm-1',
    });
    const gone = freshUser('resumed-gone');
    await sessions.rebindResumed({ ...record(gone, 'r', 'c2'), smId: 'sm-2' });
    expect((await sessions.getResource(gone, 'r'))?.connectionId).toBe('c2');
  });

  it('fails with ResourceTakenError once a new bind (without or with another session) took the row', async () => {
    const user = freshUser('taken');
    await sessions.bindResource(record(user, 'r', 'old', { smId: 'sm-1' }));
    await sessions.bindResource(record(user, 'r', 'newer'));
    await expect(
      sessions.rebindResumed({ ...record(user, 'r', 'resuming'), smId: 'sm-1' }),
    ).rejects.toBeInstanceOf(ResourceTakenError);
    await sessions.bindResource(record(user, 'r', 'newest', { smId: 'sm-9' }));
    await expect(
      sessions.rebindResumed({ ...record(user, 'r', 'resuming'), smId: 'sm-1' }),
    ).rejects.toBeInstanceOf(ResourceTakenError);
    expect((await sessions.getResource(user, 'r'))?.connectionId).toBe('newest');
  });
});

describe('presence and flags: only the owning connection writes', () => {
  it('updatePresence by the owner returns the old record and stores the new presence', async () => {
    const user = freshUser('presence');
    await sessions.bindResource(record(user, 'r', 'c1'));
    const old = await sessions.updatePresence(user, 'r', 'c1', {
      available: true,
      priority: 3,
      presence: '<presence><show>away</show></presence>',
    });
    // The old record tells the caller this presence is the initial one.
    expect(old).toMatchObject({ connectionId: 'c1', available: false, priority: 0 });
    expect(await sessions.getResource(user, 'r')).toMatchObject({
      available: true,
      priority: 3,
      presence: '<presence><show>away</show></presence>',
    });
    const again = await sessions.updatePresence(user, 'r', 'c1', { available: false, priority: 0 });
    expect(again).toMatchObject({ available: true, priority: 3 });
  });

  it('updatePresence by another connection returns undefined and changes nothing', async () => {
    const user = freshUser('presence-other');
    await sessions.bindResource(record(user, 'r', 'c1'));
    expect(
      await sessions.updatePresence(user, 'r', 'c2', {
        available: true,
        priority: 1,
        presence: '<presence/>',
      }),
    ).toBeUndefined();
    expect(await sessions.getResource(user, 'r')).toMatchObject({ connectionId: 'c1', available: false });
  });

  it('updatePresence on an unbound resource returns undefined and does not create it', async () => {
    const user = freshUser('presence-none');
    expect(await sessions.updatePresence(user, 'r', 'c1', { available: true, priority: 0 })).toBeUndefined();
    expect(await sessions.getResource(user, 'r')).toBeUndefined();
  });

  it('markFlexibleOffline sets the flag for the owner only, and never creates a row', async () => {
    const user = freshUser('flex');
    await sessions.bindResource(record(user, 'r', 'c1'));
    await sessions.markFlexibleOffline(user, 'r', 'c2');
    expect((await sessions.getResource(user, 'r'))?.flexibleOffline).toBeUndefined();
    await sessions.markFlexibleOffline(user, 'r', 'c1');
    expect((await sessions.getResource(user, 'r'))?.flexibleOffline).toBe(true);
    await sessions.markFlexibleOffline(user, 'gone', 'c1');
    expect(await sessions.getResource(user, 'gone')).toBeUndefined();
  });

  it('switchToQueue sets smId for the owner while the stream may switch; another connection is refused', async () => {
    const user = freshUser('sm');
    await sessions.bindResource(record(user, 'r', 'c1', { mayQueue: true }));
    expect(await sessions.switchToQueue(user, 'r', 'c1', 'sm-a')).toEqual({ kind: 'switched', smId: 'sm-a' });
    const row = await rawItem(`user#${user}`, 'res#r');
    expect(row?.smId).toBe('sm-a');
    expect(row).not.toHaveProperty('mayQueue');
    // A redelivered <enable/> of the same connection keeps the queue its first attempt switched to
    // (it may hold stanzas already): the answer names it.
    expect(await sessions.switchToQueue(user, 'r', 'c1', 'sm-b')).toEqual({ kind: 'switched', smId: 'sm-a' });
    await expect(sessions.switchToQueue(user, 'r', 'c2', 'sm-x')).rejects.toBeInstanceOf(ResourceTakenError);
    expect((await sessions.getResource(user, 'r'))?.smId).toBe('sm-a');
    await expect(sessions.switchToQueue(user, 'unbound', 'c1', 'sm-c')).rejects.toBeInstanceOf(
      ResourceTakenError,
    );
    expect(await sessions.getResource(user, 'unbound')).toBeUndefined();
  });

  it('endDirectPost is tried again when refused (a transaction conflict), so the post ends', async () => {
    const user = freshUser('conflicted');
    await sessions.bindResource(record(user, 'r', 'c1', { mayQueue: true }));
    const token = await sessions.beginDirectPost(user, 'r', 'c1');
    expect(token).toEqual(expect.any(String));
    // The first UpdateItem meets a transaction in progress on the row (DynamoDB applied nothing).
    let refused = 0;
    const conflicting = {
      send: (command: unknown) => {
        if (
          refused === 0 &&
          (command as { constructor: { name: string } }).constructor.name === 'UpdateCommand'
        ) {
          refused += 1;
          return Promise.reject(
            Object.assign(
              new Error('Operation was rejected because there is an ongoing transaction for the item.'),
              {
                name: 'TransactionConflictException',
                $metadata: { httpStatusCode: 400 },
              },
            ),
          );
        }
        return doc.send(command as never);
      },
    } as unknown as typeof doc;
    await createSessionStore(conflicting, table, CONNECTION_TTL_SECONDS).endDirectPost(
      user,
      'r',
      'c1',
      token as string,
    );
    expect(refused).toBe(1);
    // Ended: nothing holds the switch.
    expect(await rawItem(`user#${user}`, 'res#r')).not.toHaveProperty('posts');
    expect(await sessions.switchToQueue(user, 'r', 'c1', 'sm-a')).toEqual({ kind: 'switched', smId: 'sm-a' });
  });

  it('an end the SDK sends again (a 500 after DynamoDB applied it) ends only its own post: the switch still waits for the other', async () => {
    // Two stanzas posted directly at once to a stream that may still send <enable/>. With a
    // count, the end's resend took it down twice: the switch went ahead with the second post in
    // flight, and that stanza could reach the client after <enabled/>, unnumbered by the server.
    const user = freshUser('resent-end');
    await sessions.bindResource(record(user, 'r', 'c1', { mayQueue: true }));
    const first = (await sessions.beginDirectPost(user, 'r', 'c1')) as string;
    const second = (await sessions.beginDirectPost(user, 'r', 'c1')) as string;
    expect(first).not.toBe(second);
    const client = createDocumentClient({ endpoint: useDynamoDbLocal(), region: TEST_REGION });
    let attempts = 0;
    client.middlewareStack.add(
      (next, context) => async (args) => {
        const input = args.input as { UpdateExpression?: string };
        if (
          context.commandName !== 'UpdateItemCommand' ||
          !input.UpdateExpression?.startsWith('DELETE posts')
        )
          return next(args);
        attempts += 1;
        if (attempts > 1) return next(args);
        await next(args);
        const body = Buffer.from(
          JSON.stringify({
            __type: 'com.amazonaws.dynamodb.v20120810#InternalServerError',
            message: 'Internal server error',
          }),
        );
        return {
          response: {
            statusCode: 500,
            reason: 'Internal Server Error',
            headers: { 'content-type': 'application/x-amz-json-1.0', 'content-length': String(body.length) },
            body: new Uint8Array(body),
          },
          output: undefined as never,
        };
      },
      { step: 'deserialize', priority: 'low', name: 'testFailAfterWrite' },
    );
    await createSessionStore(client, table, CONNECTION_TTL_SECONDS).endDirectPost(user, 'r', 'c1', first);
    // The SDK sent the applied end again.
    expect(attempts).toBe(2);
    expect((await sessions.getResource(user, 'r'))?.posts).toEqual([second]);
    const waiting = await sessions.switchToQueue(user, 'r', 'c1', 'sm-a');
    expect(waiting.kind).toBe('posting');
    expect((await sessions.getResource(user, 'r'))?.smId).toBeUndefined();
    await sessions.endDirectPost(user, 'r', 'c1', second);
    expect(await sessions.switchToQueue(user, 'r', 'c1', 'sm-a')).toEqual({ kind: 'switched', smId: 'sm-a' });
  });

  it('switchToQueue waits for the direct posts in flight; past a grace after presence it is late', async () => {
    const user = freshUser('posting');
    await sessions.bindResource(record(user, 'r', 'c1', { mayQueue: true }));
    const token = (await sessions.beginDirectPost(user, 'r', 'c1')) as string;
    expect(token).toEqual(expect.any(String));
    expect(await sessions.beginDirectPost(user, 'r', 'other')).toBeUndefined();
    const waiting = await sessions.switchToQueue(user, 'r', 'c1', 'sm-a');
    expect(waiting.kind).toBe('posting');
    expect(waiting.kind === 'posting' && waiting.until).toBeGreaterThan(
      Date.now() + DIRECT_POST_LEASE_MS - 5000,
    );
    await sessions.endDirectPost(user, 'r', 'c1', token);
    expect(await sessions.switchToQueue(user, 'r', 'c1', 'sm-a')).toEqual({ kind: 'switched', smId: 'sm-a' });
    // Switched: posts are no longer recorded (they go to the queue), and the record is gone.
    expect(await sessions.beginDirectPost(user, 'r', 'c1')).toBeUndefined();
    await sessions.endDirectPost(user, 'r', 'c1', token);
    const row = await rawItem(`user#${user}`, 'res#r');
    expect(row).not.toHaveProperty('posts');
    expect(row).not.toHaveProperty('postingUntil');

    // The first presence starts the grace; a later one does not move it.
    const present = freshUser('present');
    await sessions.bindResource(record(present, 'r', 'c1', { mayQueue: true }));
    const before = Date.now();
    await sessions.updatePresence(present, 'r', 'c1', { available: true, priority: 0 });
    const until = (await sessions.getResource(present, 'r'))?.mayQueueUntil as number;
    expect(until).toBeGreaterThanOrEqual(before + MAY_QUEUE_AFTER_PRESENCE_MS);
    await sessions.updatePresence(present, 'r', 'c1', { available: true, priority: 1 });
    expect((await sessions.getResource(present, 'r'))?.mayQueueUntil).toBe(until);
    expect(await sessions.switchToQueue(present, 'r', 'c1', 'sm-a')).toEqual({
      kind: 'switched',
      smId: 'sm-a',
    });

    // Past the grace the switch is late: made unconditionally by the owner.
    const late = freshUser('late');
    await sessions.bindResource(record(late, 'r', 'c1', { mayQueue: true, mayQueueUntil: Date.now() - 1 }));
    expect(await sessions.switchToQueue(late, 'r', 'c1', 'sm-a')).toEqual({ kind: 'late' });
    expect((await sessions.getResource(late, 'r'))?.smId).toBeUndefined();
    await expect(sessions.switchToQueueLate(late, 'r', 'c2', 'sm-x')).rejects.toBeInstanceOf(
      ResourceTakenError,
    );
    const before2 = Date.now();
    const made = await sessions.switchToQueueLate(late, 'r', 'c1', 'sm-a');
    expect(made.smId).toBe('sm-a');
    expect(made.lateSince).toBeGreaterThanOrEqual(before2);
    const switched = await rawItem(`user#${late}`, 'res#r');
    expect(switched?.smId).toBe('sm-a');
    // A redelivery keeps the first attempt's queue and the time of its switch.
    expect(await sessions.switchToQueueLate(late, 'r', 'c1', 'sm-b')).toEqual({
      smId: 'sm-a',
      lateSince: switched?.lateSince,
    });
    expect(await sessions.switchToQueue(late, 'r', 'c1', 'sm-c')).toEqual({
      kind: 'switched',
      smId: 'sm-a',
      lateSince: switched?.lateSince,
    });
    expect(switched).not.toHaveProperty('mayQueue');
    expect(switched).not.toHaveProperty('mayQueueUntil');
  });

  it('switchToQueue goes ahead past the lease of a post whose frame died', async () => {
    const user = freshUser('dead-post');
    await sessions.bindResource(record(user, 'r', 'c1', { mayQueue: true }));
    expect(await sessions.beginDirectPost(user, 'r', 'c1')).toEqual(expect.any(String));
    const setUntil = (until: number) =>
      doc.send(
        new UpdateCommand({
          TableName: table,
          Key: { pk: `user#${user}`, sk: 'res#r' },
          UpdateExpression: 'SET postingUntil = :until',
          ExpressionAttributeValues: { ':until': until },
        }),
      );
    await setUntil(Date.now() + 60_000);
    expect((await sessions.switchToQueue(user, 'r', 'c1', 'sm-a')).kind).toBe('posting');
    await setUntil(Date.now() - 1);
    expect(await sessions.switchToQueue(user, 'r', 'c1', 'sm-a')).toEqual({ kind: 'switched', smId: 'sm-a' });
  });

  it('switchToQueue also waits for a post counted by a function from before session 19 (`posting`)', async () => {
    const user = freshUser('legacy-post');
    await sessions.bindResource(record(user, 'r', 'c1', { mayQueue: true }));
    await doc.send(
      new UpdateCommand({
        TableName: table,
        Key: { pk: `user#${user}`, sk: 'res#r' },
        UpdateExpression: 'SET posting = :one, postingUntil = :until',
        ExpressionAttributeValues: { ':one': 1, ':until': Date.now() + 60_000 },
      }),
    );
    expect((await sessions.switchToQueue(user, 'r', 'c1', 'sm-a')).kind).toBe('posting');
    await doc.send(
      new UpdateCommand({
        TableName: table,
        Key: { pk: `user#${user}`, sk: 'res#r' },
        UpdateExpression: 'ADD posting :minus',
        ExpressionAttributeValues: { ':minus': -1 },
      }),
    );
    expect(await sessions.switchToQueue(user, 'r', 'c1', 'sm-a')).toEqual({ kind: 'switched', smId: 'sm-a' });
    expect(await rawItem(`user#${user}`, 'res#r')).not.toHaveProperty('posting');
  });
});

describe('releasing a resource: only its owner, exactly once', () => {
  it('releaseResource by another connection returns undefined and keeps the row', async () => {
    const user = freshUser('rel-other');
    await sessions.bindResource(record(user, 'r', 'c1'));
    expect(await sessions.releaseResource(user, 'r', 'c2')).toBeUndefined();
    expect(await sessions.getResource(user, 'r')).toMatchObject({ connectionId: 'c1' });
  });

  it('releaseResource by the owner returns the record and removes it; a second release gets nothing', async () => {
    const user = freshUser('rel-owner');
    await sessions.bindResource(record(user, 'r', 'c1', { available: true, priority: 2 }));
    expect(await sessions.releaseResource(user, 'r', 'c1')).toMatchObject({
      user,
      resource: 'r',
      connectionId: 'c1',
      available: true,
      priority: 2,
    });
    expect(await sessions.getResource(user, 'r')).toBeUndefined();
    expect(await sessions.releaseResource(user, 'r', 'c1')).toBeUndefined();
  });

  it('a replaced session’s release does not remove the binding that replaced it', async () => {
    const user = freshUser('rel-replaced');
    await sessions.bindResource(record(user, 'r', 'old'));
    await sessions.bindResource(record(user, 'r', 'new'));
    expect(await sessions.releaseResource(user, 'r', 'old')).toBeUndefined();
    expect(await sessions.getResource(user, 'r')).toMatchObject({ connectionId: 'new' });
  });

  it('releaseSmResource only by the SM session that owns the row', async () => {
    const user = freshUser('rel-sm');
    await sessions.bindResource(record(user, 'r', 'c1', { smId: 'sm-1' }));
    expect(await sessions.releaseSmResource(user, 'r', 'sm-2')).toBeUndefined();
    expect(await sessions.releaseSmResource(user, 'r', 'c1')).toBeUndefined();
    expect(await sessions.getResource(user, 'r')).toBeDefined();
    expect(await sessions.releaseSmResource(user, 'r', 'sm-1')).toMatchObject({ smId: 'sm-1' });
    expect(await sessions.getResource(user, 'r')).toBeUndefined();
  });

  it('a row without smId is never released as an SM session’s', async () => {
    const user = freshUser('rel-nosm');
    await sessions.bindResource(record(user, 'r', 'c1'));
    expect(await sessions.releaseSmResource(user, 'r', 'c1')).toBeUndefined();
    expect(await sessions.getResource(user, 'r')).toBeDefined();
  });

  // docs/data-model.md: "Release a resource when its session ends | DeleteItem, condition
  // `connectionId = :me` … `ReturnValues: ALL_OLD`": the one caller that gets the record is
  // the one that announces the session's end.
  it('concurrent releases by the owner: exactly one gets the record', async () => {
    const user = freshUser('rel-race');
    await sessions.bindResource(record(user, 'r', 'c1', { smId: 'sm-1' }));
    const results = await Promise.all([
      sessions.releaseResource(user, 'r', 'c1'),
      sessions.releaseResource(user, 'r', 'c1'),
      sessions.releaseSmResource(user, 'r', 'sm-1'),
      sessions.releaseResource(user, 'r', 'c1'),
      sessions.releaseSmResource(user, 'r', 'sm-1'),
    ]);
    expect(results.filter((r) => r !== undefined)).toHaveLength(1);
    expect(results.find((r) => r !== undefined)).toMatchObject({ connectionId: 'c1', smId: 'sm-1' });
    expect(await sessions.getResource(user, 'r')).toBeUndefined();
  });

  it('a release racing a re-bind never removes the new binding', async () => {
    const user = freshUser('rel-rebind');
    await sessions.bindResource(record(user, 'r', 'old'));
    const [released, replaced] = await Promise.all([
      sessions.releaseResource(user, 'r', 'old'),
      sessions.bindResource(record(user, 'r', 'new')),
    ]);
    // Either the release came first (and the bind replaced nothing) or the bind did (and the
    // release found someone else's row): never both, never neither.
    expect([released?.connectionId, replaced?.connectionId].filter(Boolean)).toEqual(['old']);
    expect(await sessions.getResource(user, 'r')).toMatchObject({ connectionId: 'new' });
  });
});

describe('a hold on a resource’s messages (a flood in progress) and the conditions of stores', () => {
  const note = (n: number) => ({
    from: 'romeo@localhost/pda',
    storedAt: Date.now(),
    stanza: `<message>${n}</message>`,
  });

  async function held(user: string, resource: string): Promise<number | undefined> {
    return (await sessions.getResource(user, resource))?.held;
  }

  it('is put on by an available presence that asks for it, and a second one keeps its count', async () => {
    const user = freshUser('hold');
    await sessions.bindResource(record(user, 'r', 'c1'));
    const first = await sessions.updatePresence(user, 'r', 'c1', {
      available: true,
      priority: 0,
      hold: true,
    });
    expect(first?.held).toBeUndefined();
    expect(await held(user, 'r')).toBe(0);
    await offline.store(user, note(1), { guard: sessions.holdGuard(user, 'r', 'c1') });
    const second = await sessions.updatePresence(user, 'r', 'c1', {
      available: true,
      priority: 5,
      hold: true,
    });
    expect(second?.held).toBe(1);
    expect(await held(user, 'r')).toBe(1);
    // A presence that does not ask leaves it alone.
    await sessions.updatePresence(user, 'r', 'c1', { available: true, priority: 1 });
    expect(await held(user, 'r')).toBe(1);
  });

  it('counts each message stored behind it; the holder releases it only with the latest count', async () => {
    const user = freshUser('hold');
    await sessions.bindResource(record(user, 'r', 'c1'));
    await sessions.updatePresence(user, 'r', 'c1', { available: true, priority: 0, hold: true });
    await offline.store(user, note(1), { guard: sessions.holdGuard(user, 'r', 'c1') });
    await offline.store(user, note(2), { guard: sessions.holdGuard(user, 'r', 'c1') });
    expect(await offline.count(user)).toBe(2);
    // The holder last looked before those two: not released, told the count to look again with.
    expect(await sessions.releaseHold(user, 'r', 'c1', 0)).toBe(2);
    expect(await held(user, 'r')).toBe(2);
    // Another connection cannot release it.
    expect(await sessions.releaseHold(user, 'r', 'c2', 2)).toBeUndefined();
    expect(await held(user, 'r')).toBe(2);
    expect(await sessions.releaseHold(user, 'r', 'c1', 2)).toBeUndefined();
    expect(await held(user, 'r')).toBeUndefined();
  });

  it('refuses a store behind a hold that is gone, or a resource another connection took: nothing is stored', async () => {
    const user = freshUser('hold');
    await sessions.bindResource(record(user, 'r', 'c1'));
    await sessions.updatePresence(user, 'r', 'c1', { available: true, priority: 0, hold: true });
    const guard = sessions.holdGuard(user, 'r', 'c1');
    await sessions.releaseHold(user, 'r', 'c1', 0);
    await expect(offline.store(user, note(1), { guard })).rejects.toBeInstanceOf(OfflineGuardFailedError);
    await sessions.bindResource(record(user, 'r', 'c2', { held: 0 }));
    await expect(offline.store(user, note(2), { guard })).rejects.toBeInstanceOf(OfflineGuardFailedError);
    expect(await offline.count(user)).toBe(0);
    expect((await offline.list(user)).messages).toEqual([]);
  });

  it('refuses a store for a user with no available resource once one became available', async () => {
    const user = freshUser('late');
    const guard = sessions.noneAvailableGuard(user);
    await offline.store(user, note(1), { guard });
    await sessions.bindResource(record(user, 'r', 'c1'));
    // Bound but not available: still none available.
    await offline.store(user, note(2), { guard });
    await sessions.updatePresence(user, 'r', 'c1', { available: true, priority: 0 });
    await expect(offline.store(user, note(3), { guard })).rejects.toBeInstanceOf(OfflineGuardFailedError);
    await sessions.updatePresence(user, 'r', 'c1', { available: false, priority: 0 });
    await offline.store(user, note(4), { guard });
    expect((await offline.list(user)).messages.map((m) => m.stanza)).toEqual([
      '<message>1</message>',
      '<message>2</message>',
      '<message>4</message>',
    ]);
  });

  it('stands for HOLD_LEASE_MS unless renewed: a flood that died does not hold the session’s messages', async () => {
    const user = freshUser('lease');
    await sessions.bindResource(record(user, 'r', 'c1'));
    const before = Date.now();
    await sessions.updatePresence(user, 'r', 'c1', { available: true, priority: 0, hold: true });
    const row = await sessions.getResource(user, 'r');
    expect(row?.heldUntil).toBeGreaterThanOrEqual(before + HOLD_LEASE_MS);
    expect(isHeld(row as ResourceRecord)).toBe(true);
    expect(isHeld(row as ResourceRecord, (row?.heldUntil ?? 0) + 1)).toBe(false);
    // The lease runs out (its flood stopped renewing it): routing posts again, and a store
    // decided on the hold is refused.
    await doc.send(
      new UpdateCommand({
        TableName: table,
        Key: { pk: `user#${user}`, sk: 'res#r' },
        UpdateExpression: 'SET heldUntil = :past',
        ExpressionAttributeValues: { ':past': Date.now() - 1 },
      }),
    );
    expect(isHeld((await sessions.getResource(user, 'r')) as ResourceRecord)).toBe(false);
    await expect(
      offline.store(user, note(1), { guard: sessions.holdGuard(user, 'r', 'c1') }),
    ).rejects.toBeInstanceOf(OfflineGuardFailedError);
    // Renewed by its flood: it stands again, for its connection only.
    await sessions.renewHold(user, 'r', 'c2');
    expect(isHeld((await sessions.getResource(user, 'r')) as ResourceRecord)).toBe(false);
    await sessions.renewHold(user, 'r', 'c1');
    expect(isHeld((await sessions.getResource(user, 'r')) as ResourceRecord)).toBe(true);
    await offline.store(user, note(2), { guard: sessions.holdGuard(user, 'r', 'c1') });
    expect((await sessions.getResource(user, 'r'))?.held).toBe(1);
    // Released: the lease goes with it.
    await sessions.releaseHold(user, 'r', 'c1', 1);
    const released = await sessions.getResource(user, 'r');
    expect(released?.held).toBeUndefined();
    expect(released?.heldUntil).toBeUndefined();
  });

  it('a stored message already there is reported as such, not as a failed condition', async () => {
    const user = freshUser('again');
    await sessions.bindResource(record(user, 'r', 'c1'));
    await sessions.updatePresence(user, 'r', 'c1', { available: true, priority: 0, hold: true });
    const key = { key: 'frame-1:1', at: Date.now(), position: 1 };
    await offline.store(user, note(1), { key, guard: sessions.holdGuard(user, 'r', 'c1') });
    await sessions.releaseHold(user, 'r', 'c1');
    const again = await offline.store(user, note(1), { key, guard: sessions.holdGuard(user, 'r', 'c1') });
    expect(again.alreadyStored).toBe(true);
    expect(await offline.count(user)).toBe(1);
  });
});

describe('fitsResourceKey: DynamoDB sort keys hold at most 1024 bytes', () => {
  // shared/store/sessions.ts: "a bound resource may have 1020 (RFC 7622 allows 1023)", since
  // the sort key is `res#<resource>`.
  it('counts UTF-8 bytes: 1020 fit, 1021 do not', () => {
    expect(fitsResourceKey('a'.repeat(1020))).toBe(true);
    expect(fitsResourceKey('a'.repeat(1021))).toBe(false);
    expect(fitsResourceKey('é'.repeat(510))).toBe(true);
    expect(fitsResourceKey(`${'é'.repeat(510)}a`)).toBe(false);
    expect(fitsResourceKey('€'.repeat(340))).toBe(true);
    expect(fitsResourceKey('€'.repeat(341))).toBe(false);
  });

  it('a 1020-byte resource binds, lists, reads and releases', async () => {
    const user = freshUser('long');
    const resource = `${'€'.repeat(339)}abc`;
    expect(Buffer.byteLength(resource)).toBe(1020);
    await sessions.bindResource(record(user, resource, 'c1'));
    expect((await sessions.listResources(user)).map((r) => r.resource)).toEqual([resource]);
    expect(await sessions.getResource(user, resource)).toMatchObject({ resource });
    expect(await sessions.releaseResource(user, resource, 'c1')).toMatchObject({ resource });
  });

  it('DynamoDB refuses the 1021-byte resource fitsResourceKey rejects', async () => {
    const user = freshUser('too-long');
    const resource = 'a'.repeat(1021);
    await expect(sessions.bindResource(record(user, resource, 'c1'))).rejects.toThrow(/key|size|1024/i);
    // getResource answers "not bound" without asking DynamoDB a question it would refuse.
    expect(await sessions.getResource(user, resource)).toBeUndefined();
  });
});
