/**
 * SQS redelivers a frame whose invocation timed out or whose delete was lost, even when the
 * frame's work was done: a frame whose state changes were saved is recognised by its id
 * (API Gateway's request id, saved with the state in the same write) and skipped.
 */
import { describe, expect, it } from 'vitest';
import { handleStreamEvent } from '../../shared/core/stream.ts';
import { createLogger } from '../../shared/log.ts';
import { RecordingPort } from '../../shared/outbound.ts';
import { deriveCredentialSet } from '../../shared/sasl/scram.ts';
import { createServer } from '../../shared/server.ts';
import { createTestConfig } from '../support/dynamodb.ts';

const OPEN = "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>";

describe('a redelivered frame', () => {
  it('is skipped once its state was saved, and handled when it was not', async () => {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    await server.sessions.createConnection('c1', Date.now());
    const frame = (frameId: string, xml: string) =>
      handleStreamEvent(server, {
        connectionId: 'c1',
        kind: 'frame',
        frame: xml,
        receivedAt: Date.now(),
        frameId,
      });

    await frame('req-1', OPEN);
    // RFC 7395 §3.4: <open/> answered, then the features.
    expect(port.frames.get('c1')).toHaveLength(2);
    expect((await server.sessions.getConnection('c1'))?.savedFrame).toBe('req-1');

    // The same frame again (the same request id): nothing is sent a second time.
    await frame('req-1', OPEN);
    expect(port.frames.get('c1')).toHaveLength(2);

    // A new frame with the same content is a new frame: handled (a stream restart answers again).
    await frame('req-2', OPEN);
    expect(port.frames.get('c1')).toHaveLength(4);
  });
});

describe('a redelivered stanza frame', () => {
  it('is skipped when it, or a later frame of the connection, was handled to the end', async () => {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    const sender = `alice${Date.now()}@localhost`;
    const recipient = `bob${Date.now()}@localhost`;
    await server.users.create(recipient, await deriveCredentialSet('pw', 4096));
    await server.sessions.createConnection('s1', Date.now());
    await server.sessions.updateConnection('s1', { streamOpen: true, user: sender, resource: 'r' });
    const message = (n: number) =>
      `<message xmlns='jabber:client' to='${recipient}' type='chat' id='m${n}'><body>${n}</body></message>`;
    const frame = (frameId: string, seq: string, xml: string, receiveCount = 1) =>
      handleStreamEvent(server, {
        connectionId: 's1',
        kind: 'frame',
        frame: xml,
        receivedAt: 1_790_000_000_000,
        frameId,
        seq,
        receiveCount,
      });
    const stored = async () =>
      (await server.offline.list(recipient)).messages.map((m) => /<body>(\d+)</.exec(m.stanza)?.[1]);

    // bob has no session: XEP-0160 stores the message.
    await frame('f1', '18880000000000000100', message(1));
    expect(await stored()).toEqual(['1']);
    expect((await server.sessions.getConnection('s1'))?.doneSeq).toBe('18880000000000000100');

    // The lost delete: the same message again, after its work was done.
    await frame('f1', '18880000000000000100', message(1), 2);
    expect(await stored()).toEqual(['1']);

    // A failure after the store, before the frame was marked done: the redelivery finds the
    // message stored under the frame's key and does not store it again.
    await frame('f2', '18880000000000000105', message(2));
    await server.sessions.updateConnection('s1', { doneSeq: '18880000000000000100' });
    await frame('f2', '18880000000000000105', message(2), 2);
    expect(await stored()).toEqual(['1', '2']);

    // A timed-out batch comes back whole: its earlier frame after the later one was marked done.
    await frame('f3', '18880000000000000107', message(3));
    await frame('f2', '18880000000000000105', message(2), 3);
    expect(await stored()).toEqual(['1', '2', '3']);
    // Frames of the same millisecond keep the sender's order (their sequence numbers).
    expect(await server.offline.count(recipient)).toBe(3);
  });
});
