/**
 * The frame queue seen from the stream function: frames it hands back (a transient error that
 * outlived the retries in place, too little time left to start) come back soon instead of after
 * the queue's visibility timeout.
 *
 * The event source leaves a failed record in the queue; SQS delivers it again when its
 * visibility timeout ends, and that is six times the function timeout (three minutes deployed),
 * during which the connection's later frames wait behind it (FIFO). A `ChangeMessageVisibility`
 * with a short timeout, while the records are still in flight, brings them back after a backoff
 * (1, 2, 4 … seconds by receive count). FIFO keeps the order: the group stays locked until the
 * event source has deleted the batch's handled records.
 *
 * One request, so no SQS client: `ChangeMessageVisibilityBatch` in SQS's JSON protocol, signed
 * with the SDK's own SigV4 signer (already in the bundle, as is the credential chain). The full
 * `@aws-sdk/client-sqs` would add about 27 KB to the stream bundle (≤ 500 KB, issue 13).
 */
import { Hash } from '@smithy/core/serde';
import { SignatureV4 } from '@smithy/signature-v4';
import type { AwsCredentialIdentityProvider } from '@smithy/types';

export interface FrameRetry {
  /** The receipt handle of this receive of the record. */
  receiptHandle: string;
  /** Seconds until it is delivered again (SQS: 0 to 43,200). */
  seconds: number;
}

export interface FrameQueuePort {
  /**
   * Best effort: a record not changed comes back after the visibility timeout, as before.
   * `timeoutMs` bounds the whole call (default 2 s).
   */
  retryIn(retries: readonly FrameRetry[], timeoutMs?: number): Promise<void>;
}

/** How soon a record is retried: 1, 2, 4 … seconds by its receive count, at most `maxSeconds`. */
export function retryDelaySeconds(receiveCount: number, maxSeconds: number): number {
  return Math.max(0, Math.min(maxSeconds, 2 ** Math.max(0, Math.min(receiveCount - 1, 16))));
}

/** SQS's limit of entries per batch request. */
const BATCH_ENTRIES = 10;

/** The call's time limit by default: the handler is about to return, and a lost change costs only a delay. */
const REQUEST_TIMEOUT_MS = 2_000;

export interface SqsFrameQueueOptions {
  queueUrl: string;
  region: string;
  credentials: AwsCredentialIdentityProvider;
  /**
   * Where requests go (`FRAME_QUEUE_ENDPOINT`: the local gateway). Default: the origin of
   * `queueUrl`, the SQS endpoint of the queue's own region and partition (see `sqsEndpoint`).
   */
  endpoint?: string;
}

/**
 * The endpoint for requests about a queue: `endpoint` when given, else the queue URL's origin
 * (`https://sqs.cn-north-1.amazonaws.com.cn/` for a queue in China), as the AWS SDK for
 * JavaScript does by default (`useQueueUrlAsEndpoint`). A name built from the region alone
 * (`sqs.<region>.amazonaws.com`) is wrong outside the `aws` partition.
 */
export function sqsEndpoint(queueUrl: string, endpoint?: string): URL {
  if (endpoint) return new URL(endpoint);
  if (!URL.canParse(queueUrl))
    throw new Error(
      `the frame queue URL '${queueUrl}' is not a URL: give its endpoint (FRAME_QUEUE_ENDPOINT)`,
    );
  return new URL('/', queueUrl);
}

/** The frame queue on SQS (or the local gateway's queue, which speaks the same request). */
export function sqsFrameQueue(options: SqsFrameQueueOptions): FrameQueuePort {
  const endpoint = sqsEndpoint(options.queueUrl, options.endpoint);
  const signer = new SignatureV4({
    service: 'sqs',
    region: options.region,
    credentials: options.credentials,
    // The SDK's own Node hash, as its clients sign with.
    sha256: Hash.bind(null, 'sha256'),
  });
  const send = async (retries: readonly FrameRetry[], signal: AbortSignal): Promise<void> => {
    const body = JSON.stringify({
      QueueUrl: options.queueUrl,
      Entries: retries.map((retry, index) => ({
        Id: String(index),
        ReceiptHandle: retry.receiptHandle,
        VisibilityTimeout: retry.seconds,
      })),
    });
    const signed = await signer.sign({
      method: 'POST',
      protocol: endpoint.protocol,
      hostname: endpoint.hostname,
      ...(endpoint.port ? { port: Number(endpoint.port) } : {}),
      path: endpoint.pathname,
      query: {},
      headers: {
        host: endpoint.host,
        'content-type': 'application/x-amz-json-1.0',
        'x-amz-target': 'AmazonSQS.ChangeMessageVisibilityBatch',
      },
      body,
    });
    const response = await fetch(endpoint, {
      method: 'POST',
      headers: signed.headers,
      body,
      signal,
    });
    const answer = (await response.json().catch(() => ({}))) as { Failed?: unknown[]; message?: string };
    if (!response.ok)
      throw new Error(`ChangeMessageVisibilityBatch: HTTP ${response.status} ${answer.message ?? ''}`);
    if (answer.Failed?.length)
      throw new Error(
        `ChangeMessageVisibilityBatch: ${answer.Failed.length} entries failed: ${JSON.stringify(answer.Failed)}`,
      );
  };
  return {
    async retryIn(retries, timeoutMs = REQUEST_TIMEOUT_MS) {
      const signal = AbortSignal.timeout(timeoutMs);
      for (let i = 0; i < retries.length; i += BATCH_ENTRIES)
        await send(retries.slice(i, i + BATCH_ENTRIES), signal);
    },
  };
}
