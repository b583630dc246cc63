/**
 * XEP-0478 Stream Limits Advertisement (v0.2), `urn:xmpp:stream-limits:0`: the limits this
 * deployment really enforces, told to the client in every stream features element.
 *
 * - max-bytes: API Gateway accepts WebSocket frames of at most 32 KB from a client and closes
 *   the socket with 1009 on a bigger one, and a browser sends each message as one frame; the
 *   stream itself refuses stanzas over MAX_STANZA_BYTES. The smaller of the two is advertised.
 * - idle-seconds: API Gateway closes a connection idle for 10 minutes.
 *
 * The outbound half of XEP-0478 (refusing to the sender what the recipient's transport can never
 * take) is the core's delivery path (core/delivery.ts).
 */
import type { Server } from '../core/host.ts';

export const NS_STREAM_LIMITS = 'urn:xmpp:stream-limits:0';
/** API Gateway's limit on one frame from a client. */
export const FRAME_LIMIT_BYTES = 32 * 1024;
/** API Gateway's idle timeout for WebSocket connections. */
export const IDLE_SECONDS = 600;

export function register(server: Server): void {
  const maxBytes = Math.min(FRAME_LIMIT_BYTES, server.config.maxStanzaBytes);
  server.host.hook('stream-features', ({ features }) => {
    // XEP-0478 §2: "This element SHOULD contain the following child elements: <max-bytes/> [...] <idle-seconds/>".
    const limits = features.c('limits', { xmlns: NS_STREAM_LIMITS });
    limits.c('max-bytes').t(String(maxBytes));
    limits.c('idle-seconds').t(String(IDLE_SECONDS));
    return undefined;
  });
}
