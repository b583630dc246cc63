/**
 * The $connect handler's handshake decision (RFC 7395 §3.3.1), as deployed: built from the
 * environment alone, with no management endpoint (connect never posts).
 */
import { describe, expect, it } from 'vitest';
import { handler } from '../../functions/connect.ts';

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
