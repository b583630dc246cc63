/**
 * AUTH_TIMEOUT_SECONDS: an unauthenticated stream has this long from its WebSocket's connection
 * to log in. RFC 6120 §4.9.3.4: "<connection-timeout/> One party is closing the stream because it
 * has reason to believe that the other party has permanently lost the ability to communicate over
 * the stream." (Prosody closes a stream that did not authenticate within `c2s_timeout` with it.)
 * No timer runs in a function: the first frame past the limit ends the stream.
 */
import { parse } from 'ltx';
import { describe, expect, it } from 'vitest';
import type { RecordingPort } from '../../shared/outbound.ts';
import type { Server } from '../../shared/server.ts';
import { useDynamoDbLocal } from '../support/dynamodb.ts';
import { sendFrame, testServer } from '../support/stream.ts';

const STREAMS = 'urn:ietf:params:xml:ns:xmpp-streams';
const OPEN = `<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>`;

let counter = 0;

/** A connection API Gateway accepted `secondsAgo` ago, `user` when its stream has authenticated. */
async function connectedAgo(server: Server, secondsAgo: number, user?: string): Promise<string> {
  const connectionId = `t${++counter}-${Date.now()}`;
  await server.sessions.createConnection(connectionId, Date.now() - secondsAgo * 1000);
  if (user) await server.sessions.updateConnection(connectionId, { streamOpen: true, user });
  return connectionId;
}

async function answersTo(server: Server, port: RecordingPort, connectionId: string, xml: string) {
  const before = (port.frames.get(connectionId) ?? []).length;
  await sendFrame(server, connectionId, xml, { frameId: `${connectionId}-${before}` });
  return (port.frames.get(connectionId) ?? []).slice(before).map((frame) => parse(frame));
}

describe('AUTH_TIMEOUT_SECONDS: an unauthenticated stream past its time is ended', () => {
  useDynamoDbLocal();

  it('ends a stream still unauthenticated past the limit with <connection-timeout/>, and closes the socket', async () => {
    const { port, server } = await testServer({ AUTH_TIMEOUT_SECONDS: '60' });
    const connectionId = await connectedAgo(server, 61);

    const answers = await answersTo(server, port, connectionId, OPEN);
    // Not yet open: the server opens the stream to carry the error (RFC 6120 §4.9.1.1), then closes.
    expect(answers.map((answer) => answer.name)).toEqual(['open', 'stream:error', 'close']);
    expect(answers[1]?.getChild('connection-timeout', STREAMS)).toBeDefined();
    expect(port.closed.has(connectionId)).toBe(true);
    expect((await server.sessions.getConnection(connectionId))?.ended).toBeTruthy();
  });

  it('serves a stream within the limit as usual', async () => {
    const { port, server } = await testServer({ AUTH_TIMEOUT_SECONDS: '60' });
    const connectionId = await connectedAgo(server, 50);

    const answers = await answersTo(server, port, connectionId, OPEN);
    expect(answers.map((answer) => answer.name)).toEqual(['open', 'stream:features']);
    expect(port.closed.has(connectionId)).toBe(false);
  });

  it('never applies to an authenticated stream, however old', async () => {
    const { port, server } = await testServer({ AUTH_TIMEOUT_SECONDS: '60' });
    const connectionId = await connectedAgo(server, 3600, `patient${Date.now()}@localhost`);

    // The restart after SASL success: its features offer resource binding.
    const answers = await answersTo(server, port, connectionId, OPEN);
    expect(answers.map((answer) => answer.name)).toEqual(['open', 'stream:features']);
    expect(answers[1]?.getChild('bind', 'urn:ietf:params:xml:ns:xmpp-bind')).toBeDefined();
  });

  it('0 sets no limit', async () => {
    const { port, server } = await testServer({ AUTH_TIMEOUT_SECONDS: '0' });
    const connectionId = await connectedAgo(server, 3600);

    const answers = await answersTo(server, port, connectionId, OPEN);
    expect(answers.map((answer) => answer.name)).toEqual(['open', 'stream:features']);
  });

  it('defaults to 300 seconds', async () => {
    const { port, server } = await testServer();
    // Time only adds to a connection's age: just past the limit stays past it, while the one
    // within keeps 10 s in hand for a loaded machine between its row and its frame.
    const late = await connectedAgo(server, 301);
    const early = await connectedAgo(server, 290);

    expect(
      (await answersTo(server, port, late, OPEN))[1]?.getChild('connection-timeout', STREAMS),
    ).toBeDefined();
    expect((await answersTo(server, port, early, OPEN)).map((answer) => answer.name)).toEqual([
      'open',
      'stream:features',
    ]);
  });
});
