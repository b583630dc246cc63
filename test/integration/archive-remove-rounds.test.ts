/**
 * XEP-0136 0.9 §8.3 remove of many collections, within the stream function's time: removed in
 * rounds, and when too little of the invocation is left for another round the frame is handed
 * back (SQS brings it again within seconds) and its next attempt goes on. Before, one request
 * ran 100 rounds of 1,000 collections with no look at the clock, past the 30 s timeout, and a
 * timed-out batch held its other connections' frames for the queue's 180 s visibility timeout.
 */
import { parse } from 'ltx';
import { describe, expect, it } from 'vitest';
import { handleStreamEvent } from '../../shared/core/stream.ts';
import { RetryLaterError } from '../../shared/core/transient.ts';
import { createLogger } from '../../shared/log.ts';
import { RecordingPort } from '../../shared/outbound.ts';
import { createServer } from '../../shared/server.ts';
import { createTestConfig } from '../support/dynamodb.ts';

const ARCHIVE = 'http://jabber.org/protocol/archive';
const STANZAS = 'urn:ietf:params:xml:ns:xmpp-stanzas';

async function boundStream() {
  const port = new RecordingPort();
  const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
  const connectionId = `remover${Date.now()}`;
  const user = `remover${Date.now()}@localhost`;
  await server.sessions.createConnection(connectionId, Date.now());
  await server.sessions.updateConnection(connectionId, { streamOpen: true, user, resource: 'r' });
  let seq = 100;
  const frame = (
    frameId: string,
    xml: string,
    options: { receiveCount?: number; timeLeftMs?: () => number; sameSeq?: boolean } = {},
  ) =>
    handleStreamEvent(server, {
      connectionId,
      kind: 'frame',
      frame: xml,
      receivedAt: Date.now(),
      frameId,
      seq: String(options.sameSeq ? seq : ++seq),
      receiveCount: options.receiveCount ?? 1,
      ...(options.timeLeftMs ? { timeLeftMs: options.timeLeftMs } : {}),
    });
  const answers = (id: string) =>
    (port.frames.get(connectionId) ?? []).map((f) => parse(f)).filter((el) => el.attrs.id === id);
  return { server, user, frame, answers };
}

describe('XEP-0136 §8.3 remove of many collections', () => {
  it('hands the frame back when too little time is left for another round, and the next attempt finishes', async () => {
    const { server, user, frame, answers } = await boundStream();
    // 251 collections with one contact: one round (250) and one more.
    const base = Date.UTC(2020, 0, 1);
    for (let i = 0; i < 251; i++) {
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
    expect((await server.archive.listCollections(user, {}, { max: 1000 })).items).toHaveLength(1);
    // SQS brings the frame again: the rest is removed and the request answered once, a result.
    await frame('remove', remove, { receiveCount: 2, sameSeq: true, timeLeftMs: () => 20_000 });
    expect(answers('rm').map((a) => a.attrs.type)).toEqual(['result']);
    expect((await server.archive.listCollections(user, {}, { max: 1000 })).items).toEqual([]);
  });

  it('answers item-not-found when nothing matches, except on a later attempt, whose earlier ones may have removed it all', async () => {
    const { frame, answers } = await boundStream();
    const remove = (id: string) =>
      `<iq xmlns='jabber:client' type='set' id='${id}'><remove xmlns='${ARCHIVE}' with='nobody@capulet.com'/></iq>`;
    // §8.3: "If the specified collection (or collections) do not exist then the server MUST
    // return an <item-not-found/> error".
    await frame('first', remove('r1'));
    const [refused] = answers('r1');
    expect(refused?.attrs.type).toBe('error');
    expect(refused?.getChild('error')?.getChild('item-not-found', STANZAS)).toBeDefined();
    // The same request on its second delivery (its first attempt's outcome unknown): a result.
    await frame('again', remove('r2'), { receiveCount: 2 });
    expect(answers('r2').map((a) => a.attrs.type)).toEqual(['result']);
  });
});
