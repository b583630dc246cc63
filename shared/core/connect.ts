/**
 * The `$connect` decision (RFC 7395 §3.3.1): a client must offer the `xmpp` subprotocol and
 * gets it back in `Sec-WebSocket-Protocol`; browsers drop a socket whose answer lacks it.
 */
import type { Server } from './host.ts';
import { withTransientRetries } from './transient.ts';

/**
 * Tries of the handshake's one write on a transient error (throttling past the SDK's retries, a
 * 500): a failed `$connect` is a refused socket the client has to open again.
 */
const CONNECT_ATTEMPTS = 3;

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

export async function handleConnect(server: Server, event: ConnectEvent): Promise<ConnectResult> {
  if (!offeredProtocols(event.headers).includes('xmpp')) {
    return {
      statusCode: 400,
      body: "XMPP over WebSocket (RFC 7395): offer the subprotocol 'xmpp' (Sec-WebSocket-Protocol: xmpp)",
    };
  }
  const { connectionId } = event.requestContext;
  // An unconditional Put: trying it again is harmless.
  await withTransientRetries(CONNECT_ATTEMPTS, () =>
    server.sessions.createConnection(
      connectionId,
      event.requestContext.connectedAt ?? event.requestContext.requestTimeEpoch ?? Date.now(),
      event.requestContext.identity?.sourceIp,
    ),
  );
  return { statusCode: 200, headers: { 'Sec-WebSocket-Protocol': 'xmpp' } };
}
