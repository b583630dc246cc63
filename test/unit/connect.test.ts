/**
 * The $connect handler's handshake decision (RFC 7395 §3.3.1), as deployed: built from the
 * environment alone, with no management endpoint (connect never posts).
 */
import { describe, expect, it } from 'vitest';
import { handler } from '../../functions/connect.ts';
import { handleConnect } from '../../shared/core/connect.ts';
import { throttlingError } from '../support/intercept.ts';

describe('functions/connect', () => {
  it('refuses a client that does not offer the xmpp subprotocol, without CONNECTIONS_ENDPOINT', async () => {
    delete process.env.CONNECTIONS_ENDPOINT;
    const result = await handler({
      headers: { 'Sec-WebSocket-Protocol': 'chat, superchat' },
      requestContext: { connectionId: 'Ab+c/DEF12gCIdw=', requestTimeEpoch: Date.now() },
    });
    expect(result.statusCode).toBe(400);
    expect(result.body).toMatch(/subprotocol 'xmpp'/);
  });
});

describe('handleConnect: the handshake’s one write', () => {
  const throttle = throttlingError;
  const event = {
    headers: { 'Sec-WebSocket-Protocol': 'xmpp' },
    requestContext: { connectionId: 'Zz9+conn=', requestTimeEpoch: 1_700_000_000_000 },
  };
  /** Only what handleConnect touches: the sessions store's createConnection. */
  function serverWith(createConnection: () => Promise<void>) {
    return { sessions: { createConnection } } as unknown as Parameters<typeof handleConnect>[0];
  }

  it('is tried again in place on throttling past the SDK’s retries: the socket opens', async () => {
    let calls = 0;
    const result = await handleConnect(
      serverWith(async () => {
        calls += 1;
        if (calls < 3) throw throttle();
      }),
      event,
    );
    expect(calls).toBe(3);
    expect(result).toEqual({ statusCode: 200, headers: { 'Sec-WebSocket-Protocol': 'xmpp' } });
  });

  it('gives up after three tries, and never retries an error that is not transient', async () => {
    let calls = 0;
    await expect(
      handleConnect(
        serverWith(async () => {
          calls += 1;
          throw throttle();
        }),
        event,
      ),
    ).rejects.toThrow(/throughput/);
    expect(calls).toBe(3);
    calls = 0;
    await expect(
      handleConnect(
        serverWith(async () => {
          calls += 1;
          throw new TypeError('bug');
        }),
        event,
      ),
    ).rejects.toThrow(TypeError);
    expect(calls).toBe(1);
  });
});
