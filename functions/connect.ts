/** `$connect`: a direct Lambda integration, because it must answer the WebSocket handshake. */
import { loadConfig } from '../shared/config.ts';
import { type ConnectEvent, type ConnectResult, handleConnect } from '../shared/core/connect.ts';
import { createServer, type Server } from '../shared/server.ts';

export function createConnectHandler(server: Server) {
  return async (event: ConnectEvent): Promise<ConnectResult> => {
    try {
      return await handleConnect(server, event);
    } catch (error) {
      server.log.error('connect failed', { connectionId: event.requestContext?.connectionId, error });
      return { statusCode: 500, body: 'Internal error' };
    }
  };
}

let server: Server | undefined;

export const handler = (event: ConnectEvent): Promise<ConnectResult> => {
  server ??= createServer({ config: loadConfig() });
  return createConnectHandler(server)(event);
};
