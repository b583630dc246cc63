/**
 * XEP-0136 0.9 §8.3 remove of many collections, within the stream function's time: removed in
 * rounds, and when too little of the invocation is left for another round the frame is handed
 * back (SQS brings it again within seconds) and its next attempt goes on. Before, one request
 * ran 100 rounds of 1,000 collections with no look at the clock, past the 30 s timeout, and a
 * timed-out batch held its other connections' frames for the queue's 180 s visibility timeout.
 */
import { QueryCommand } from '@aws-sdk/lib-dynamodb';
import { parse } from 'ltx';
import { describe, expect, it } from 'vitest';
import { RetryLaterError } from '../../shared/core/transient.ts';
import { REMOVE_ROUND_COLLECTIONS } from '../../shared/modules/xep-0136-message-archiving.ts';
import type { Server } from '../../shared/server.ts';
import { documentClientFor } from '../../shared/store/dynamo.ts';
import { openConnection, sendFrame, testServer } from '../support/stream.ts';

const ARCHIVE = 'http://jabber.org/protocol/archive';
const STANZAS = 'urn:ietf:params:xml:ns:xmpp-stanzas';

async function boundStream() {
  const { port, server } = await testServer();
  const connectionId = `remover${Date.now()}`;
  const user = `remover${Date.now()}@localhost`;
  await openConnection(server, connectionId, user, 'r');
  let seq = 100;
  const frame = (
    frameId: string,
    xml: string,
    options: { receiveCount?: number; timeLeftMs?: () => number; sameSeq?: boolean } = {},
  ) =>
    sendFrame(server, connectionId, xml, {
      frameId,
      seq: String(options.sameSeq ? seq : ++seq),
      receiveCount: options.receiveCount ?? 1,
      ...(options.timeLeftMs ? { timeLeftMs: options.timeLeftMs } : {}),
    });
  const answers = (id: string) =>
    (port.frames.get(connectionId) ?? []).map((f) => parse(f)).filter((el) => el.attrs.id === id);
  return { server, user, connectionId, frame, answers };
}

/** The owner's open-collection pointers: the archive table's `open#<with>` rows, read directly. */
async function openPointers(server: Server, owner: string): Promise<string[]> {
  const doc = documentClientFor(server.config);
  const keys: string[] = [];
  let from: Record<string, unknown> | undefined;
  do {
    const page = await doc.send(
      new QueryCommand({
        TableName: server.config.tables.archive,
        KeyConditionExpression: 'pk = :pk AND begins_with(sk, :open)',
        ExpressionAttributeValues: { ':pk': owner, ':open': 'open#' },
        ConsistentRead: true,
        ...(from ? { ExclusiveStartKey: from } : {}),
      }),
    );
    keys.push(...(page.Items ?? []).map((item) => String(item.sk)));
    from = page.LastEvaluatedKey;
  } while (from);
  return keys;
}

describe('XEP-0136 §8.3 remove of many collections', () => {
  it('hands the frame back when too little time is left for another round, and the next attempt finishes', async () => {
    const { server, user, frame, answers } = await boundStream();
    // One round's worth of collections with one contact, and one more.
    const base = Date.UTC(2020, 0, 1);
    for (let i = 0; i <= REMOVE_ROUND_COLLECTIONS; i++) {
      const start = new Date(base + i * 60_000).toISOString();
      await frame(
        `store-${i}`,
        `<iq xmlns='jabber:client' type='set' id='s${i}'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='${start}'><to secs='0'><body>b${i}</body></to></store></iq>`,
      );
    }
    // "Removing all collections" (§8.3). The runtime says 20 s left before the first round and
    // 5 s before the second: the frame is handed back, nothing answered yet.
    const left = [20_000, 5_000];
    const remove = `<iq xmlns='jabber:client' type='set' id='rm'><remove xmlns='${ARCHIVE}'/></iq>`;
    await expect(frame('remove', remove, { timeLeftMs: () => left.shift() ?? 5_000 })).rejects.toBeInstanceOf(
      RetryLaterError,
    );
    expect(answers('rm')).toEqual([]);
    // The first round's collections are gone already (tombstones): one is left.
    const left1 = (await server.archive.listCollections(user, {}, { max: 1000 })).items;
    expect(left1).toHaveLength(1);
    // SQS brings the frame again: the rest is removed and the request answered once, a result.
    await frame('remove', remove, { receiveCount: 2, sameSeq: true, timeLeftMs: () => 20_000 });
    expect(answers('rm').map((a) => a.attrs.type)).toEqual(['result']);
    expect((await server.archive.listCollections(user, {}, { max: 1000 })).items).toEqual([]);
  });

  it('answers the success an earlier attempt earned when its next attempt finds nothing left; item-not-found when nothing ever matched', async () => {
    const { server, user, connectionId, frame, answers } = await boundStream();
    const base = Date.UTC(2021, 0, 1);
    for (let i = 0; i <= REMOVE_ROUND_COLLECTIONS; i++) {
      const start = new Date(base + i * 60_000).toISOString();
      await frame(
        `store-${i}`,
        `<iq xmlns='jabber:client' type='set' id='s${i}'><store xmlns='${ARCHIVE}' with='nurse@capulet.com/hall' start='${start}'><to secs='0'><body>b${i}</body></to></store></iq>`,
      );
    }
    const remove = `<iq xmlns='jabber:client' type='set' id='rm'><remove xmlns='${ARCHIVE}' with='nurse@capulet.com'/></iq>`;
    const left = [20_000, 5_000];
    await expect(frame('remove', remove, { timeLeftMs: () => left.shift() ?? 5_000 })).rejects.toBeInstanceOf(
      RetryLaterError,
    );
    // Another resource's request removes the last one before the frame comes again.
    const [last] = (await server.archive.listCollections(user, {}, { max: 1000 })).items;
    expect(last).toBeDefined();
    const gone = await server.archive.removeCollections(user, {
      with: { kind: 'full', jid: last?.with as string },
      start: last?.start,
      exact: true,
    });
    expect(gone.removed).toHaveLength(1);
    await frame('remove', remove, { receiveCount: 2, sameSeq: true, timeLeftMs: () => 20_000 });
    expect(answers('rm').map((a) => a.attrs.type)).toEqual(['result']);
    expect((await server.sessions.getConnection(connectionId))?.archiveRemoving).toBeUndefined();

    // §8.3: "If the specified collection (or collections) do not exist then the server MUST
    // return an <item-not-found/> error", on any delivery of a request that never removed any.
    const none = (id: string) =>
      `<iq xmlns='jabber:client' type='set' id='${id}'><remove xmlns='${ARCHIVE}' with='nobody@capulet.com'/></iq>`;
    await frame('first', none('n1'));
    await frame('again', none('n2'), { receiveCount: 2 });
    for (const id of ['n1', 'n2']) {
      const [refused] = answers(id);
      expect(refused?.attrs.type).toBe('error');
      expect(refused?.getChild('error')?.getChild('item-not-found', STANZAS)).toBeDefined();
    }
  });

  it("removes open='true' over many pointers to quiet conversations, which it drops as it goes", async () => {
    // A pointer per full JID stays after its conversation went quiet. Each round looked at the
    // same first ones again (removing none) and never finished.
    const { server, user, frame, answers } = await boundStream();
    for (let i = 0; i < 260; i++) {
      await server.archive.startCollection(user, {
        with: `juliet@capulet.com/r${i}`,
        start: Date.UTC(2020, 0, 1) + i,
      });
    }
    expect(await openPointers(server, user)).toHaveLength(260);
    const remove = `<iq xmlns='jabber:client' type='set' id='open'><remove xmlns='${ARCHIVE}' open='true'/></iq>`;
    await frame('open', remove, { timeLeftMs: () => 20_000 });
    // §8.3: none is being recorded, so none matches.
    expect(answers('open')[0]?.getChild('error')?.getChild('item-not-found', STANZAS)).toBeDefined();
    // The collections stay (they are not being recorded); the next message starts a new one.
    expect((await server.archive.listCollections(user, {}, { max: 1000 })).items).toHaveLength(260);
    // The pointers to the quiet conversations are gone: none is read again.
    expect(await openPointers(server, user)).toEqual([]);
  });
});
