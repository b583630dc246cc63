/**
 * XEP-0136 and a frame delivered more than once: SQS redelivers a frame whose first attempt did
 * its durable writes and then died before the frame's final save, and the stream function retries
 * a frame in place after a transient failure (functions/stream.ts). Automatic archiving, a manual
 * `<store/>` and a `<remove/>` must come out as if the frame had been handled once: nothing
 * archived twice, nothing lost, the same answer. (The first test of each group is a review probe
 * of commit 5f67376, test/integration/review-redelivery.test.ts.)
 */
import { PutCommand } from '@aws-sdk/lib-dynamodb';
import { parse } from 'ltx';
import { describe, expect, it } from 'vitest';
import { createStreamHandler } from '../../functions/stream.ts';
import { createLogger } from '../../shared/log.ts';
import { RecordingPort } from '../../shared/outbound.ts';
import { createServer } from '../../shared/server.ts';
import type { ArchivedEntry } from '../../shared/store/archive.ts';
import { createDocumentClient } from '../../shared/store/dynamo.ts';
import { createTestConfig, TEST_REGION, useDynamoDbLocal } from '../support/dynamodb.ts';
import { intercept, throttlingError } from '../support/intercept.ts';
import { dieBeforeFinalSave, frameDriver, sqsRecord, subscribedPair } from '../support/stream.ts';

const ARCHIVE = 'http://jabber.org/protocol/archive';
const JULIET = 'juliet@capulet.com/chamber';
const START = '2020-01-01T00:00:00Z';

/**
 * Alice and Bob, subscribed both ways; `login` binds a connection; `frame` hands it a frame;
 * `auto` switches a stream's automatic archiving on (§7.1) and makes it available.
 */
async function world(env: Record<string, string> = {}) {
  const port = new RecordingPort();
  const doc = createDocumentClient({ endpoint: useDynamoDbLocal(), region: TEST_REGION });
  const server = createServer({
    config: await createTestConfig(env),
    port,
    doc,
    log: createLogger('silent'),
  });
  const { alice, bob } = await subscribedPair(server);
  const { frame, login } = frameDriver(server);
  const auto = async (connectionId: string) => {
    await frame(
      connectionId,
      `<iq type='set' id='auto'><auto xmlns='${ARCHIVE}' save='true'/></iq>`,
      `${connectionId}-auto`,
    );
    await frame(connectionId, '<presence/>', `${connectionId}-presence`);
  };
  const sent = (connectionId: string) => port.frames.get(connectionId) ?? [];
  /** Every entry of `owner`'s archive, collection by collection, with the collection's JID. */
  const archived = async (owner: string) => {
    const entries: (ArchivedEntry & { with: string; cid: string })[] = [];
    for (const header of (await server.archive.listCollections(owner, {}, { max: 100 })).items) {
      const page = await server.archive.retrieveMessages(owner, header, { max: 100 });
      for (const entry of page?.items ?? []) entries.push({ ...entry, with: header.with, cid: header.cid });
    }
    return entries;
  };
  const bodies = async (owner: string) =>
    (await archived(owner)).map((e) => /<body>([^<]*)</.exec(e.xml)?.[1]);
  /**
   * A conversation of `owner` with `withJid` recorded automatically for an hour (begun an hour
   * ago, its last message a minute ago): the next message joins it.
   */
  const conversation = async (owner: string, withJid: string, thread?: string) => {
    const now = Date.now();
    const open = await server.archive.startCollection(owner, {
      with: withJid,
      start: now - 3_600_000,
      ...(thread ? { thread } : {}),
    });
    await server.archive.appendMessage(owner, open, {
      kind: 'to',
      at: now - 60_000,
      xml: '<to><body>earlier</body></to>',
    });
  };
  return { port, doc, server, alice, bob, frame, login, auto, sent, archived, bodies, conversation };
}

describe('a redelivered message with automatic archiving on (XEP-0136 §7)', () => {
  // §7.1: "Once automatic archiving is switched on then the server MUST automatically archive
  // messages only according to the user's general Archiving Preferences": the message, once.
  it('is archived once for its sender, as it was delivered once (recipient with XEP-0198)', async () => {
    const { server, alice, bob, frame, login } = await world({ ARCHIVE_DEFAULT_SAVE: 'body' });
    await login('bob-1', bob, 'home');
    await frame('bob-1', "<enable xmlns='urn:xmpp:sm:3' resume='true'/>", 'bob-enable');
    await frame('bob-1', '<presence/>', 'bob-presence');
    await login('alice-1', alice, 'phone');
    await frame(
      'alice-1',
      `<iq type='set' id='auto'><auto xmlns='${ARCHIVE}' save='true'/></iq>`,
      'alice-auto',
    );
    await frame('alice-1', '<presence/>', 'alice-presence');
    const message = `<message to='${bob}/home' type='chat' id='m1'><body>only-once</body></message>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', message, 'alice-m1', '900')).rejects.toThrow();
    restore();
    await frame('alice-1', message, 'alice-m1', '900', 2);
    // Bob's session got it once (its XEP-0198 queue is keyed by the frame).
    const smId = (await server.sessions.listResources(bob))[0]?.smId as string;
    const queued = ((await server.smQueue.get(smId))?.entries ?? []).filter((e) =>
      (e.s ?? '').includes('only-once'),
    );
    expect(queued).toHaveLength(1);
    // Alice's archive should hold it once too.
    const collections = (await server.archive.listCollections(alice, {}, { max: 100 })).items;
    let entries = 0;
    for (const header of collections) {
      const page = await server.archive.retrieveMessages(alice, header, { max: 100 });
      entries += page?.items.filter((entry) => entry.xml.includes('only-once')).length ?? 0;
    }
    expect(entries).toBe(1);
  });

  it('is archived once for its recipient too, and each copy keeps its first time', async () => {
    const { server, alice, bob, frame, login, auto, archived } = await world({
      ARCHIVE_DEFAULT_SAVE: 'body',
    });
    await login('bob-1', bob, 'home');
    await auto('bob-1');
    await login('alice-1', alice, 'phone');
    await auto('alice-1');
    const message = `<message to='${bob}/home' type='chat' id='m1'><body>both-sides</body></message>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', message, 'alice-m1', '900')).rejects.toThrow();
    restore();
    const [sender] = await archived(alice);
    const [recipient] = await archived(bob);
    await frame('alice-1', message, 'alice-m1', '900', 2);
    expect(await archived(alice)).toEqual([sender]);
    expect(await archived(bob)).toEqual([recipient]);
    expect(sender).toMatchObject({ kind: 'to', with: `${bob}/home` });
    expect(recipient).toMatchObject({ kind: 'from', with: `${alice}/phone` });
  });

  it('is found behind the reply the contact sent meanwhile, in the same collection', async () => {
    const { server, alice, bob, frame, login, auto, bodies } = await world({ ARCHIVE_DEFAULT_SAVE: 'body' });
    await login('bob-1', bob, 'home');
    await frame('bob-1', '<presence/>', 'bob-presence');
    await login('alice-1', alice, 'phone');
    await auto('alice-1');
    const message = `<message to='${bob}/home' type='chat' id='m1'><body>question</body></message>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', message, 'alice-m1', '900')).rejects.toThrow();
    restore();
    // Bob answers before SQS brings Alice's frame back: his reply is archived for her after it.
    await frame(
      'bob-1',
      `<message to='${alice}/phone' type='chat' id='r1'><body>answer</body></message>`,
      'bob-r1',
    );
    await frame('alice-1', message, 'alice-m1', '900', 2);
    expect(await bodies(alice)).toEqual(['question', 'answer']);
  });

  it('is found in its collection after a new thread started another one with the contact', async () => {
    const { server, alice, bob, frame, login, auto, archived, conversation } = await world({
      ARCHIVE_DEFAULT_SAVE: 'body',
    });
    await login('bob-1', bob, 'home');
    await frame('bob-1', '<presence/>', 'bob-presence');
    await login('alice-1', alice, 'phone');
    await auto('alice-1');
    // The thread's collection was begun an hour before the frame arrived: the message joins it.
    await conversation(alice, `${bob}/home`, 't1');
    const message = `<message to='${bob}/home' type='chat' id='m1'><thread>t1</thread><body>first-thread</body></message>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', message, 'alice-m1', '900')).rejects.toThrow();
    restore();
    // A reply in another thread starts a new collection with bob/home in Alice's archive.
    await frame(
      'bob-1',
      `<message to='${alice}/phone' type='chat' id='r1'><thread>t2</thread><body>second-thread</body></message>`,
      'bob-r1',
    );
    expect(new Set((await archived(alice)).map((e) => e.cid)).size).toBe(2);
    await frame('alice-1', message, 'alice-m1', '900', 2);
    const entries = await archived(alice);
    expect(entries.map((e) => /<body>([^<]*)</.exec(e.xml)?.[1])).toEqual([
      'earlier',
      'first-thread',
      'second-thread',
    ]);
    // No third collection was started for the redelivered message's thread.
    expect(new Set(entries.map((e) => e.cid)).size).toBe(2);
  });

  it('is archived once when the stream function retries its frame in place after a throttled post to a second resource', async () => {
    const { port, server, alice, bob, frame, login, auto, archived } = await world({
      ARCHIVE_DEFAULT_SAVE: 'body',
    });
    await login('bob-1', bob, 'home');
    await auto('bob-1');
    await login('bob-2', bob, 'work');
    await frame('bob-2', '<presence/>', 'bob-2-presence');
    await login('alice-1', alice, 'phone');
    await auto('alice-1');
    // To the bare JID: both of Bob's resources get it (RFC 6121 §8.5.2.1.1), home first. The post
    // to work is refused by API Gateway (429) past its retries, once: the frame fails after the
    // delivery to home archived both copies, and functions/stream.ts tries it again at once.
    const post = port.post.bind(port);
    let refused = 0;
    intercept(port, 'post', async (connectionId, data, notAfter) => {
      if (connectionId === 'bob-2' && data.includes('two-resources') && refused++ === 0)
        throw Object.assign(new Error('Too Many Requests'), {
          name: 'LimitExceededException',
          $metadata: { httpStatusCode: 429 },
        });
      return post(connectionId, data, notAfter);
    });
    const handler = createStreamHandler(server);
    const response = await handler({
      Records: [
        sqsRecord('alice-1', `<message to='${bob}' type='chat' id='m1'><body>two-resources</body></message>`),
      ],
    });
    expect(response.batchItemFailures).toEqual([]);
    expect(refused).toBe(2);
    expect((await archived(alice)).map((e) => [e.kind, e.with])).toEqual([['to', `${bob}/home`]]);
    expect((await archived(bob)).map((e) => [e.kind, e.with])).toEqual([['from', `${alice}/phone`]]);
  });

  it("is found in the collection with the resource that took it first, when its redelivery reaches another of the contact's", async () => {
    const { alice, bob, frame, login, auto, archived, server, conversation } = await world({
      ARCHIVE_DEFAULT_SAVE: 'body',
    });
    await login('bob-1', bob, 'home');
    await frame('bob-1', '<presence/>', 'bob-presence');
    await login('alice-1', alice, 'phone');
    await auto('alice-1');
    // An hour-long conversation with bob/home, begun before the frame arrived: the message joins it.
    await conversation(alice, `${bob}/home`);
    const message = `<message to='${bob}' type='chat' id='m1'><body>roaming</body></message>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', message, 'alice-m1', '900')).rejects.toThrow();
    restore();
    // Bob's home stream ends, his work stream comes: the redelivery is delivered there.
    await frame('bob-1', "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>", 'bob-close');
    await login('bob-2', bob, 'work');
    await frame('bob-2', '<presence/>', 'bob-2-presence');
    await frame('alice-1', message, 'alice-m1', '900', 2);
    // §5.2 names the full JID the message was exchanged with: the first one's, once.
    expect((await archived(alice)).map((e) => [e.kind, e.with, /<body>([^<]*)</.exec(e.xml)?.[1]])).toEqual([
      ['to', `${bob}/home`, 'earlier'],
      ['to', `${bob}/home`, 'roaming'],
    ]);
  });

  it('to oneself keeps both copies once each (one collection holds them)', async () => {
    const { server, alice, frame, login, auto, archived } = await world({ ARCHIVE_DEFAULT_SAVE: 'body' });
    await login('alice-1', alice, 'phone');
    await auto('alice-1');
    const message = `<message to='${alice}/phone' type='chat' id='m1'><body>note-to-self</body></message>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', message, 'alice-m1', '900')).rejects.toThrow();
    restore();
    await frame('alice-1', message, 'alice-m1', '900', 2);
    expect((await archived(alice)).map((e) => [e.kind, e.with])).toEqual([
      ['to', `${alice}/phone`],
      ['from', `${alice}/phone`],
    ]);
  });

  it('is another message when the client sends it again in a frame of its own', async () => {
    const { alice, bob, frame, login, auto, bodies } = await world({ ARCHIVE_DEFAULT_SAVE: 'body' });
    await login('bob-1', bob, 'home');
    await frame('bob-1', '<presence/>', 'bob-presence');
    await login('alice-1', alice, 'phone');
    await auto('alice-1');
    const message = `<message to='${bob}/home' type='chat' id='m1'><body>said-twice</body></message>`;
    await frame('alice-1', message, 'alice-m1');
    // The same stanza in another frame (its own request id), even one on its second receive.
    await frame('alice-1', message, 'alice-m2', undefined, 2);
    expect(await bodies(alice)).toEqual(['said-twice', 'said-twice']);
  });
});

describe('a redelivered manual <store/> (XEP-0136 §5.3)', () => {
  // §5.3: "If the collection already exists then the server MUST append the messages to the
  // existing collection" — the messages of the request, once.
  it('does not store its entries a second time', async () => {
    const { server, alice, frame, login } = await world();
    await login('alice-1', alice, 'phone');
    const store = `<iq type='set' id='st1'><store xmlns='${ARCHIVE}' with='${JULIET}' start='${START}'><to secs='0'><body>uploaded-once</body></to><from secs='5'><body>reply-once</body></from></store></iq>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', store, 'alice-store', '900')).rejects.toThrow();
    restore();
    await frame('alice-1', store, 'alice-store', '900', 2);
    const page = await server.archive.retrieveMessages(
      alice,
      { with: JULIET, start: Date.UTC(2020, 0, 1) },
      { max: 100 },
    );
    expect(page?.items.map((entry) => entry.seq)).toEqual([0, 1]);
  });

  it('keeps the times and ids its first delivery gave the entries (§5.2 secs count from the previous message)', async () => {
    const { server, alice, frame, login, archived } = await world();
    await login('alice-1', alice, 'phone');
    await frame(
      'alice-1',
      `<iq type='set' id='st0'><store xmlns='${ARCHIVE}' with='${JULIET}' start='${START}'><from secs='0'><body>hello</body></from></store></iq>`,
      'alice-store-0',
    );
    // §5.2: 'secs' is "relative to the previous message in the collection": 20 s after hello,
    // then 7 s after that. A redelivery that counted from the entries its first delivery stored
    // would put them 27 s later.
    const store = `<iq type='set' id='st1'><store xmlns='${ARCHIVE}' with='${JULIET}' start='${START}'><to secs='20'><body>twenty</body></to><from secs='7'><body>seven</body></from></store></iq>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', store, 'alice-store-1', '900')).rejects.toThrow();
    restore();
    const first = await archived(alice);
    const start = Date.UTC(2020, 0, 1);
    expect(first.map((e) => [e.seq, e.at - start])).toEqual([
      [0, 0],
      [1, 20_000],
      [2, 27_000],
    ]);
    await frame('alice-1', store, 'alice-store-1', '900', 2);
    expect(await archived(alice)).toEqual(first);
  });

  it('writes each entry once when the stream function retries it in place after a throttled entry write', async () => {
    const { doc, server, alice, login, archived, sent } = await world();
    await login('alice-1', alice, 'phone');
    // The second entry's PutItem is throttled past the SDK's retries, once: the first was written.
    const send = doc.send.bind(doc) as (command: unknown) => Promise<unknown>;
    let throttled = 0;
    intercept(doc, 'send', (async (command: unknown) => {
      if (
        command instanceof PutCommand &&
        command.input.Item?.sk === 'm#0000000001' &&
        String(command.input.Item?.xml).includes('second') &&
        throttled++ === 0
      )
        throw throttlingError();
      return send(command);
    }) as typeof doc.send);
    const handler = createStreamHandler(server);
    const response = await handler({
      Records: [
        sqsRecord(
          'alice-1',
          `<iq type='set' id='st1'><store xmlns='${ARCHIVE}' with='${JULIET}' start='${START}'><to secs='0'><body>first</body></to><from secs='5'><body>second</body></from><to secs='5'><body>third</body></to></store></iq>`,
        ),
      ],
    });
    expect(response.batchItemFailures).toEqual([]);
    expect(throttled).toBe(2);
    const entries = await archived(alice);
    expect(entries.map((e) => [e.seq, /<body>([^<]*)</.exec(e.xml)?.[1]])).toEqual([
      [0, 'first'],
      [1, 'second'],
      [2, 'third'],
    ]);
    const answers = sent('alice-1').filter((text) => text.includes('id="st1"') || text.includes("id='st1'"));
    expect(answers.map((text) => parse(text).attrs.type)).toEqual(['result']);
  });
});

describe('a redelivered XEP-0136 <remove/> whose first attempt removed the collection', () => {
  const answersTo = (sent: string[], id: string) =>
    sent
      .map((text) => parse(text))
      .filter((el) => el.attrs.id === id)
      .map((el) => (el.attrs.type === 'error' ? el.getChild('error')?.children[0] : el.attrs.type))
      .map((answer) =>
        typeof answer === 'string' || answer === undefined ? answer : (answer as { name: string }).name,
      );

  // §8.3: "If the specified collection (or collections) do not exist then the server MUST return
  // an <item-not-found/> error": they existed when the request came; its redelivery is the same
  // request, and its answer is the one the client may not have received.
  it('answers the same result again, not item-not-found (§8.3)', async () => {
    const { server, alice, frame, login, sent } = await world();
    await login('alice-1', alice, 'phone');
    await frame(
      'alice-1',
      `<iq type='set' id='st1'><store xmlns='${ARCHIVE}' with='${JULIET}' start='${START}'><to secs='0'><body>x</body></to></store></iq>`,
      'alice-store',
    );
    const remove = `<iq type='set' id='rm1'><remove xmlns='${ARCHIVE}' with='${JULIET}' start='${START}'/></iq>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', remove, 'alice-rm', '900')).rejects.toThrow();
    restore();
    await frame('alice-1', remove, 'alice-rm', '900', 2);
    const answers = sent('alice-1')
      .map((text) => parse(text))
      .filter((el) => el.attrs.id === 'rm1');
    expect(answers.map((el) => el.attrs.type)).toEqual(['result', 'result']);
  });

  it('of a range answers the same result again, and the record goes with the frame’s end', async () => {
    const { server, alice, frame, login, sent } = await world();
    await login('alice-1', alice, 'phone');
    for (const [i, day] of ['01', '02'].entries())
      await frame(
        'alice-1',
        `<iq type='set' id='st${i}'><store xmlns='${ARCHIVE}' with='${JULIET}' start='2020-01-${day}T00:00:00Z'><to secs='0'><body>x</body></to></store></iq>`,
        `alice-store-${i}`,
      );
    const remove = `<iq type='set' id='rm1'><remove xmlns='${ARCHIVE}' with='juliet@capulet.com' start='2020-01-01T00:00:00Z' end='2020-02-01T00:00:00Z'/></iq>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', remove, 'alice-rm', '900')).rejects.toThrow();
    restore();
    expect((await server.archive.listCollections(alice, {}, { max: 10 })).items).toEqual([]);
    expect((await server.sessions.getConnection('alice-1'))?.archiveRemoving).toBe('alice-rm');
    await frame('alice-1', remove, 'alice-rm', '900', 2);
    expect(answersTo(sent('alice-1'), 'rm1')).toEqual(['result', 'result']);
    expect((await server.sessions.getConnection('alice-1'))?.archiveRemoving).toBeUndefined();
    // The next <remove/> of the same range is another request: nothing is there any more.
    await frame('alice-1', remove.replace("id='rm1'", "id='rm2'"), 'alice-rm2', '901');
    expect(answersTo(sent('alice-1'), 'rm2')).toEqual(['item-not-found']);
  });

  it('of nothing answers item-not-found every time, and records nothing before it', async () => {
    const { server, alice, frame, login, sent } = await world();
    await login('alice-1', alice, 'phone');
    const writes: string[] = [];
    const update = server.sessions.updateConnection.bind(server.sessions);
    intercept(server.sessions, 'updateConnection', async (connectionId, changes, options) => {
      writes.push(...Object.keys(changes));
      return update(connectionId, changes, options);
    });
    const remove = `<iq type='set' id='rm1'><remove xmlns='${ARCHIVE}' with='${JULIET}' start='${START}'/></iq>`;
    await frame('alice-1', remove, 'alice-rm', '900');
    await frame('alice-1', remove, 'alice-rm', '900', 2);
    expect(answersTo(sent('alice-1'), 'rm1')).toEqual(['item-not-found']);
    expect(writes).not.toContain('archiveRemoving');
  });
});
