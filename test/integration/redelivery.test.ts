/**
 * SQS redelivers a frame whose invocation timed out or whose delete was lost, even when the
 * frame's work was done: a frame whose state changes were saved is recognised by its id
 * (API Gateway's request id, saved with the state in the same write) and skipped.
 */
import { describe, expect, it } from 'vitest';
import { handleStreamEvent } from '../../shared/core/stream.ts';
import { createLogger } from '../../shared/log.ts';
import { RecordingPort } from '../../shared/outbound.ts';
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
