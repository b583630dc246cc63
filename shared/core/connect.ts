/**
 * The `$connect` decision (RFC 7395 §3.3.1): a client must offer the `xmpp` subprotocol and
 * gets it back in `Sec-WebSocket-Protocol`; browsers drop a socket whose answer lacks it.
 */
export interface ConnectEvent {
  headers?: Record<string, string | undefined>;
  requestContext: {
    connectionId: string;
    /** API Gateway's request id of the handshake (for the logs). */
    requestId?: string;
    connectedAt?: number;
    requestTimeEpoch?: number;
    identity?: { sourceIp?: string };
  };
}

export interface ConnectResult {
  statusCode: number;
  headers?: Record<string, string>;
  body?: string;
}

function offeredProtocols(headers: ConnectEvent['headers']): string[] {
  for (const [name, value] of Object.entries(headers ?? {})) {
    if (name.toLowerCase() === 'sec-websocket-protocol' && value) {
      return value.split(',').map((p) => p.trim().toLowerCase());
    }
  }
  return [];
}

export function handleConnect(event: ConnectEvent): ConnectResult {
  if (!offeredProtocols(event.headers).includes('xmpp')) {
    return {
      statusCode: 400,
      body: "XMPP over WebSocket (RFC 7395): offer the subprotocol 'xmpp' (Sec-WebSocket-Protocol: xmpp)",
    };
  }
  // Nothing is written: the stream's first frame creates its connection row, with the connection
  // time and address API Gateway puts on every frame's queue message (shared/queue-message.ts).
  // A socket that never sends a frame costs no DynamoDB request.
  return { statusCode: 200, headers: { 'Sec-WebSocket-Protocol': 'xmpp' } };
}
