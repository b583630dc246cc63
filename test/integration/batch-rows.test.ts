/**
 * A connection's frames in one batch (a client that sends faster than one invocation handles, or
 * the burst a client sends right after binding: SQS FIFO fills a batch group by group, so they come
 * one after the other): the row a frame's final save leaves is handed to the next frame, which
 * reads nothing. What must not change: each frame finds what the one before it saved, a frame that
 * ended its stream ends it for the frames behind it, and a retry reads the row afresh.
 */
import type { SQSRecord } from 'aws-lambda';
import { describe, expect, it } from 'vitest';
import { createStreamHandler, followedByOwnGroup } from '../../functions/stream.ts';
import { createLogger } from '../../shared/log.ts';
import { RecordingPort } from '../../shared/outbound.ts';
import { deriveCredentialSet } from '../../shared/sasl/scram.ts';
import { createServer, type Server } from '../../shared/server.ts';
import { createTestConfig } from '../support/dynamodb.ts';
import { intercept, serverError } from '../support/intercept.ts';
import { sqsRecord } from '../support/stream.ts';

/** Bound streams for `senders` (connection ids), and an account with no session to write to. */
async function setUp(...senders: string[]) {
  const port = new RecordingPort();
  const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
  const stamp = `${Date.now()}${Math.floor(Math.random() * 1000)}`;
  const recipient = `inbox${stamp}@localhost`;
  await server.users.create(recipient, await deriveCredentialSet('pw', 4096));
  const ids = senders.map((name) => `${name}${stamp}`);
  for (const [i, connectionId] of ids.entries()) {
    await server.sessions.createConnection(connectionId, Date.now());
    await server.sessions.updateConnection(connectionId, {
      streamOpen: true,
      user: `${senders[i]}${stamp}@localhost`,
      resource: 'r',
    });
  }
  const reads = countReads(server);
  const message = (body: string) =>
    `<message xmlns='jabber:client' to='${recipient}' type='chat'><body>${body}</body></message>`;
  const inbox = async () =>
    (await server.offline.list(recipient)).messages.map((m) => /<body>([^<]*)</.exec(m.stanza)?.[1]);
  return { port, server, ids, recipient, reads, message, inbox, handler: createStreamHandler(server) };
}

/** Counts the connection rows read from the table, per connection. */
function countReads(server: Server): Map<string, number> {
  const reads = new Map<string, number>();
  const get = server.sessions.getConnection.bind(server.sessions);
  intercept(server.sessions, 'getConnection', async (connectionId) => {
    reads.set(connectionId, (reads.get(connectionId) ?? 0) + 1);
    return get(connectionId);
  });
  return reads;
}

describe("a connection's consecutive frames in one batch", () => {
  it('read its row once, each finding what the frame before it saved', async () => {
    const { server, ids, reads, message, inbox, handler } = await setUp('burst');
    const [a] = ids;
    const batch = [sqsRecord(a, message('1')), sqsRecord(a, message('2')), sqsRecord(a, message('3'))];
    expect(await handler({ Records: batch })).toEqual({ batchItemFailures: [] });
    expect(await inbox()).toEqual(['1', '2', '3']);
    expect(reads.get(a)).toBe(1);
    // The last frame's done mark is the row's: each save went to the row the previous one left.
    const row = await server.sessions.getConnection(a);
    expect(row?.doneSeq).toBe(batch[2].attributes.SequenceNumber);
    expect(row?.savedFrame).toBe(batch[2].messageId);
    // The batch again (its delete was lost): every frame is known done, nothing is stored twice.
    const again = batch.map((r) => ({ ...r, attributes: { ...r.attributes, ApproximateReceiveCount: '2' } }));
    expect(await handler({ Records: again })).toEqual({ batchItemFailures: [] });
    expect(await inbox()).toEqual(['1', '2', '3']);
  });

  it("do not hand the row over another connection's record", async () => {
    const { ids, reads, message, inbox, handler } = await setUp('first', 'second');
    const [a, b] = ids;
    await handler({
      Records: [sqsRecord(a, message('a1')), sqsRecord(b, message('b1')), sqsRecord(a, message('a2'))],
    });
    expect(await inbox()).toEqual(['a1', 'b1', 'a2']);
    expect(reads.get(a)).toBe(2);
    expect(reads.get(b)).toBe(1);
  });

  it('stop at a frame that ended its stream: the frames behind it find the row ended', async () => {
    const { port, server, ids, reads, message, inbox, handler } = await setUp('closer');
    const [a] = ids;
    // RFC 7395 §3.6: the client closes, and had sent a message after its <close/>.
    await handler({
      Records: [
        sqsRecord(a, message('before')),
        sqsRecord(a, "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>"),
        sqsRecord(a, message('after')),
      ],
    });
    expect(await inbox()).toEqual(['before']);
    // The message read the row the close left: a carried row would have routed it.
    expect(reads.get(a)).toBe(2);
    expect(port.frames.get(a)?.at(-1)).toContain('<close');
    expect(await server.sessions.getConnection(a)).toMatchObject({ ended: true });
  });

  it('read the row afresh on a retry: the failed attempt may have written some of it', async () => {
    const { server, ids, reads, message, inbox, handler } = await setUp('retry');
    const [a] = ids;
    const offline = server.offline;
    const store = offline.store.bind(offline);
    let failures = 1;
    // The second frame's store is written and its answer lost (a 500 after the write): its
    // stream records the stored message on its row before failing, and the retry in place
    // must see that record, which the row carried from the first frame does not hold.
    const restore = intercept(offline, 'store', async (...args) => {
      const result = await store(...args);
      if (args[1].stanza.includes('<body>2</body>') && failures-- > 0) throw serverError();
      return result;
    });
    try {
      expect(await handler({ Records: [sqsRecord(a, message('1')), sqsRecord(a, message('2'))] })).toEqual({
        batchItemFailures: [],
      });
    } finally {
      restore();
    }
    expect(failures).toBe(0);
    expect(await inbox()).toEqual(['1', '2']);
    // The first frame's read, and the retry's; the second frame's first attempt read nothing.
    expect(reads.get(a)).toBe(2);
  });
});

describe('followedByOwnGroup', () => {
  it("names the records whose next record in the batch is their own connection's", () => {
    const r = (id: string, group: string) =>
      ({ messageId: id, attributes: { MessageGroupId: group } }) as SQSRecord;
    expect([
      ...followedByOwnGroup([r('1', 'a'), r('2', 'a'), r('3', 'b'), r('4', 'a'), r('5', 'a')]),
    ]).toEqual(['1', '4']);
    expect([...followedByOwnGroup([r('1', 'a')])]).toEqual([]);
  });
});
