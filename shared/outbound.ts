/**
 * The one outbound port (docs/design.md "One outbound port"). Everything that leaves the server
 * — stanzas, nonzas, stream errors — is serialised and posted by the core's delivery path
 * (core/delivery.ts) through `Outbound.post`, which counts it and reports a vanished
 * connection as 'gone', so the delivery path can re-route what must not be lost.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import {
  ApiGatewayManagementApiClient,
  DeleteConnectionCommand,
  GoneException,
  PostToConnectionCommand,
} from '@aws-sdk/client-apigatewaymanagementapi';
import type { Element } from 'ltx';
import { NS } from './xml/namespaces.ts';

/**
 * 'unknown': the request went out but no answer came (a timeout, a dropped socket): the frame
 * may or may not have reached the client. It is never retried blindly — a second copy would
 * break stream management's count — the caller decides (core/delivery.ts).
 */
export type PostResult = 'sent' | 'gone' | 'unknown';

/**
 * 'stale': a post given `notAfter` (ms) did not start, or did not retry, past it; nothing was
 * delivered (see core/delivery.ts: a direct post starts within a bound of its row's read).
 */
export type BoundedPostResult = PostResult | 'stale';

/** The transport: API Gateway's Management API on AWS and locally, a recorder in unit tests. */
export interface ConnectionPort {
  /** With `notAfter`, no attempt starts after that time (ms): 'stale' instead. */
  post(connectionId: string, data: string, notAfter?: number): Promise<BoundedPostResult>;
  /** Closes the socket; `$disconnect` follows. Closing an already gone connection is not an error. */
  close(connectionId: string): Promise<void>;
}

export interface PortOptions {
  /** Wraps the Management API client (X-Ray tracing through Powertools' `captureAWSv3Client`). */
  instrument?: <T>(client: T) => T;
}

/** Attempts of a post that API Gateway refused before delivering it (429, 5xx). */
export const POST_ATTEMPTS = 3;

/**
 * How long one attempt of a post may take before it is given up ('unknown'): a hung request
 * no longer holds the invocation, and a post is over within this of its start (what the
 * late switch to a stream-management queue waits for, core/delivery.ts).
 */
export const POST_TIMEOUT_MS = 2_000;

export function apiGatewayPort(endpoint: string, region: string, options: PortOptions = {}): ConnectionPort {
  const settings = {
    endpoint,
    region,
    ...(endpoint.startsWith('http://') && !process.env.AWS_ACCESS_KEY_ID
      ? { credentials: { accessKeyId: 'local', secretAccessKey: 'local' } }
      : {}),
  };
  // Posts are retried here, not by the SDK: the SDK would also resend after a timeout or a
  // dropped socket, when the first copy may already have reached the client. Each client
  // resolves its middleware once per command class instead of on every send (its stack is
  // complete here: nothing is added after the first send).
  const client = new ApiGatewayManagementApiClient({
    ...settings,
    maxAttempts: 1,
    cacheMiddleware: true,
    requestHandler: { requestTimeout: POST_TIMEOUT_MS, throwOnRequestTimeout: true },
  });
  const closer = new ApiGatewayManagementApiClient({ ...settings, cacheMiddleware: true });
  // The SDK's logger middleware filters every request for a logger these clients are not given.
  client.middlewareStack.remove('loggerMiddleware');
  closer.middlewareStack.remove('loggerMiddleware');
  options.instrument?.(client);
  options.instrument?.(closer);
  return {
    async post(connectionId, data, notAfter) {
      for (let attempt = 1; ; attempt++) {
        if (notAfter !== undefined && Date.now() > notAfter) return 'stale';
        try {
          await client.send(new PostToConnectionCommand({ ConnectionId: connectionId, Data: data }));
          return 'sent';
        } catch (error) {
          if (error instanceof GoneException || (error as Error).name === 'GoneException') return 'gone';
          if (!refusedBeforeDelivery(error)) {
            if (isNetworkError(error as Error) || answerless(error)) return 'unknown';
            throw error;
          }
          if (attempt >= POST_ATTEMPTS) throw error;
          await sleep(50 * 2 ** attempt * (0.5 + Math.random()));
        }
      }
    },
    async close(connectionId) {
      try {
        await closer.send(new DeleteConnectionCommand({ ConnectionId: connectionId }));
      } catch (error) {
        if (error instanceof GoneException || (error as Error).name === 'GoneException') return;
        throw error;
      }
    },
  };
}

/** API Gateway answered 429 or 5xx: the frame was not put on the socket, a retry is safe. */
function refusedBeforeDelivery(error: unknown): boolean {
  if (!(error instanceof Error)) return false;
  if (error.name === 'LimitExceededException' || error.name === 'TooManyRequestsException') return true;
  const status = (error as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
  return status === 429 || (status !== undefined && status >= 500);
}

/** No HTTP answer at all (the request may have been executed). */
function answerless(error: unknown): boolean {
  const metadata = (error as { $metadata?: { httpStatusCode?: number } }).$metadata;
  return metadata !== undefined && metadata.httpStatusCode === undefined;
}

/** Test double: records every frame per connection; connections can be marked gone. */
export class RecordingPort implements ConnectionPort {
  readonly frames = new Map<string, string[]>();
  readonly closed = new Set<string>();
  readonly gone = new Set<string>();

  async post(connectionId: string, data: string, _notAfter?: number): Promise<BoundedPostResult> {
    if (this.gone.has(connectionId)) return 'gone';
    const list = this.frames.get(connectionId) ?? [];
    list.push(data);
    this.frames.set(connectionId, list);
    return 'sent';
  }

  async close(connectionId: string): Promise<void> {
    this.closed.add(connectionId);
  }
}

export interface OutboundCounters {
  posts: number;
  bytes: number;
  gone: number;
}

/** Stanzas sent to clients carry the content namespace explicitly (RFC 7395 §3.3.3). */
export function serialize(element: Element): string {
  if (
    (element.name === 'message' || element.name === 'presence' || element.name === 'iq') &&
    !element.attrs.xmlns
  ) {
    element.attrs.xmlns = NS.client;
  }
  return element.toString();
}

/**
 * API Gateway Management API failures worth a retry of the whole frame: throttling (429
 * LimitExceededException), 5xx, timeouts and dropped sockets. A 410 is not an error here: it
 * is the `gone` result.
 */
export function isTransientPostError(error: unknown): boolean {
  if (!(error instanceof Error)) return false;
  const metadata = (error as { $metadata?: { httpStatusCode?: number } }).$metadata;
  if ((error as { $retryable?: unknown }).$retryable) return true;
  if (error.name === 'LimitExceededException' || error.name === 'TooManyRequestsException') return true;
  if (metadata && (metadata.httpStatusCode === undefined || metadata.httpStatusCode >= 500)) return true;
  return isNetworkError(error);
}

/** A socket-level failure on the way to an AWS endpoint. */
export function isNetworkError(error: Error): boolean {
  const code = (error as NodeJS.ErrnoException).code ?? '';
  return (
    ['TimeoutError', 'RequestTimeout', 'ECONNREFUSED', 'ECONNRESET'].includes(error.name) ||
    ['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE'].includes(code)
  );
}

export class Outbound {
  readonly counters: OutboundCounters = { posts: 0, bytes: 0, gone: 0 };

  constructor(private readonly port: ConnectionPort) {}

  send(connectionId: string, element: Element): Promise<PostResult> {
    return this.post(connectionId, serialize(element));
  }

  /** Posts an already serialised frame. */
  post(connectionId: string, data: string): Promise<PostResult>;
  /** With `notAfter` (ms): no attempt starts after it ('stale', nothing posted). */
  post(connectionId: string, data: string, notAfter: number | undefined): Promise<BoundedPostResult>;
  async post(connectionId: string, data: string, notAfter?: number): Promise<BoundedPostResult> {
    if (notAfter !== undefined && Date.now() > notAfter) return 'stale';
    this.counters.posts += 1;
    this.counters.bytes += Buffer.byteLength(data);
    const result = await this.port.post(connectionId, data, notAfter);
    if (result === 'gone') this.counters.gone += 1;
    return result;
  }

  close(connectionId: string): Promise<void> {
    return this.port.close(connectionId);
  }
}
