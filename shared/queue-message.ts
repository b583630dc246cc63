/**
 * What API Gateway puts on the SQS FIFO queue for `$default` and `$disconnect` (the request
 * template lives in `infra/stack.ts`; the local gateway emulator builds the same body).
 *
 * The frame travels base64-encoded: `$util.escapeJavaScript` would turn `'` into `\'`, which
 * is not JSON, and XMPP frames are full of single quotes.
 */
export interface QueueMessage {
  connectionId: string;
  /** API Gateway's `$context.eventType`. */
  eventType: 'MESSAGE' | 'DISCONNECT';
  /** API Gateway's `$context.requestTimeEpoch` (milliseconds). */
  requestTimeEpoch: number;
  /** API Gateway's `$context.requestId`, also the FIFO de-duplication id. */
  requestId: string;
  /** The WebSocket text frame, base64 (absent for DISCONNECT). */
  body?: string;
  /**
   * API Gateway's `$context.connectedAt` (ms) and `$context.identity.sourceIp`: what a stream's
   * first frame writes into its connection row (`$connect` writes nothing).
   */
  connectedAt?: number;
  sourceIp?: string;
}

export interface StreamEvent {
  connectionId: string;
  kind: 'frame' | 'disconnect';
  frame: string;
  receivedAt: number;
  /** API Gateway's request id of the frame: the same on every redelivery of it. */
  frameId: string;
  /**
   * The SQS FIFO sequence number of the frame's queue message (a decimal string that only grows
   * within the connection's message group), when it came through the queue: the stream's
   * "handled up to" mark compares against it.
   */
  seq?: string;
  /** How many times the queue has delivered this frame (SQS ApproximateReceiveCount). */
  receiveCount?: number;
  /** Another record (of any connection) follows this one in the invocation's batch. */
  followed?: boolean;
  /** What is left of the invocation (ms), when the runtime says (Lambda's getRemainingTimeInMillis). */
  timeLeftMs?: () => number;
  /** API Gateway's request id, for the logs (it is also in the stage's access log). */
  requestId?: string;
  /** When the WebSocket connected (ms), and the client's address, as API Gateway saw them. */
  connectedAt?: number;
  sourceIp?: string;
}

export class MalformedQueueMessageError extends Error {}

export function decodeQueueMessage(raw: string): StreamEvent {
  let parsed: Partial<QueueMessage>;
  try {
    parsed = JSON.parse(raw) as Partial<QueueMessage>;
  } catch {
    throw new MalformedQueueMessageError('queue message is not JSON');
  }
  if (typeof parsed.connectionId !== 'string' || parsed.connectionId === '') {
    throw new MalformedQueueMessageError('queue message without connectionId');
  }
  const receivedAt = Number(parsed.requestTimeEpoch) || Date.now();
  const frameId = typeof parsed.requestId === 'string' ? parsed.requestId : '';
  const requestId = frameId ? { requestId: frameId } : {};
  if (parsed.eventType === 'DISCONNECT') {
    return {
      connectionId: parsed.connectionId,
      kind: 'disconnect',
      frame: '',
      receivedAt,
      frameId,
      ...requestId,
    };
  }
  const connectedAt = Number(parsed.connectedAt);
  return {
    connectionId: parsed.connectionId,
    kind: 'frame',
    frame: Buffer.from(parsed.body ?? '', 'base64').toString('utf8'),
    receivedAt,
    frameId,
    ...requestId,
    ...(Number.isFinite(connectedAt) && connectedAt > 0 ? { connectedAt } : {}),
    ...(typeof parsed.sourceIp === 'string' && parsed.sourceIp !== '' ? { sourceIp: parsed.sourceIp } : {}),
  };
}

export function encodeQueueMessage(message: QueueMessage): string {
  return JSON.stringify(message);
}
