/**
 * The $connect handler's handshake decision (RFC 7395 §3.3.1), as deployed: built from the
 * environment alone, with no management endpoint (connect never posts).
 */
import { describe, expect, it } from 'vitest';
import { handler } from '../../functions/connect.ts';
import { handleConnect } from '../../shared/core/connect.ts';

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

describe('handleConnect: the handshake writes nothing', () => {
  // RFC 7395's handshake: the client offers 'xmpp' in Sec-WebSocket-Protocol and the server's
  // reply carries it back. The connection's row is written by its first frame instead.
  it('answers with the subprotocol, whatever the case and the other protocols offered', () => {
    const result = handleConnect({
      headers: { 'sec-websocket-protocol': 'chat, XMPP' },
      requestContext: { connectionId: 'Zz9+conn=', requestTimeEpoch: 1_700_000_000_000 },
    });
    expect(result).toEqual({ statusCode: 200, headers: { 'Sec-WebSocket-Protocol': 'xmpp' } });
  });
});
