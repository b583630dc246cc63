/**
 * The frame queue port (shared/frame-queue.ts): SQS's ChangeMessageVisibilityBatch in its JSON
 * protocol, SigV4-signed for `sqs`, ten entries a request, as AWS documents it
 * (https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_ChangeMessageVisibilityBatch.html).
 * Against a recording HTTP server; the emulator's side is in test/integration/gateway-faults.test.ts.
 */
import { createServer, type IncomingHttpHeaders } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { retryDelaySeconds, sqsEndpoint, sqsFrameQueue } from '../../shared/frame-queue.ts';

interface Seen {
  url?: string;
  headers: IncomingHttpHeaders;
  body: { QueueUrl: string; Entries: { Id: string; ReceiptHandle: string; VisibilityTimeout: number }[] };
}

const seen: Seen[] = [];
let answer: { status: number; body: unknown } = { status: 200, body: { Successful: [], Failed: [] } };
const server = createServer((request, response) => {
  const chunks: Buffer[] = [];
  request.on('data', (chunk: Buffer) => chunks.push(chunk));
  request.on('end', () => {
    seen.push({
      url: request.url,
      headers: request.headers,
      body: JSON.parse(Buffer.concat(chunks).toString('utf8')),
    });
    response.writeHead(answer.status, { 'content-type': 'application/x-amz-json-1.0' });
    response.end(JSON.stringify(answer.body));
  });
});
let endpoint = '';

beforeAll(async () => {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}/`;
});

afterAll(() => new Promise<void>((resolve) => server.close(() => resolve())));

const queue = () =>
  sqsFrameQueue({
    queueUrl: 'https://sqs.eu-west-1.amazonaws.com/123456789012/Nimbus-Frames.fifo',
    region: 'eu-west-1',
    endpoint,
    credentials: async () => ({
      accessKeyId: 'AKIDEXAMPLE',
      secretAccessKey: 'secret',
      sessionToken: 'token',
    }),
  });

describe('sqsFrameQueue', () => {
  it('sends ChangeMessageVisibilityBatch in the JSON protocol, SigV4-signed for sqs in the region', async () => {
    seen.length = 0;
    answer = { status: 200, body: { Successful: [{ Id: '0' }, { Id: '1' }], Failed: [] } };
    await queue().retryIn([
      { receiptHandle: 'r-a', seconds: 1 },
      { receiptHandle: 'r-b', seconds: 4 },
    ]);
    expect(seen).toHaveLength(1);
    const [{ headers, body }] = seen;
    expect(headers['x-amz-target']).toBe('AmazonSQS.ChangeMessageVisibilityBatch');
    expect(headers['content-type']).toBe('application/x-amz-json-1.0');
    expect(headers['x-amz-security-token']).toBe('token');
    expect(headers['x-amz-date']).toMatch(/^\d{8}T\d{6}Z$/);
    const date = (headers['x-amz-date'] as string).slice(0, 8);
    expect(headers.authorization).toMatch(
      new RegExp(
        `^AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/${date}/eu-west-1/sqs/aws4_request, SignedHeaders=[a-z0-9;-]*host[a-z0-9;-]*x-amz-target[a-z0-9;-]*, Signature=[0-9a-f]{64}$`,
      ),
    );
    expect(body).toEqual({
      QueueUrl: 'https://sqs.eu-west-1.amazonaws.com/123456789012/Nimbus-Frames.fifo',
      Entries: [
        { Id: '0', ReceiptHandle: 'r-a', VisibilityTimeout: 1 },
        { Id: '1', ReceiptHandle: 'r-b', VisibilityTimeout: 4 },
      ],
    });
  });

  it('sends at most ten entries a request (the API limit)', async () => {
    seen.length = 0;
    answer = { status: 200, body: { Successful: [], Failed: [] } };
    await queue().retryIn(Array.from({ length: 23 }, (_, i) => ({ receiptHandle: `r${i}`, seconds: 2 })));
    expect(seen.map((request) => request.body.Entries.length)).toEqual([10, 10, 3]);
  });

  it('throws on an HTTP error and on failed entries (the caller logs it; the timeout then applies)', async () => {
    answer = {
      status: 400,
      body: { __type: 'com.amazonaws.sqs#AccessDenied', message: 'Access to the resource is denied' },
    };
    await expect(queue().retryIn([{ receiptHandle: 'r', seconds: 1 }])).rejects.toThrow(
      /HTTP 400 Access to the resource/,
    );
    answer = {
      status: 200,
      body: { Successful: [], Failed: [{ Id: '0', Code: 'ReceiptHandleIsInvalid', SenderFault: true }] },
    };
    await expect(queue().retryIn([{ receiptHandle: 'r', seconds: 1 }])).rejects.toThrow(
      /ReceiptHandleIsInvalid/,
    );
  });
});

describe('the SQS endpoint', () => {
  it("is the queue URL's origin when none is given: right in every partition", () => {
    expect(sqsEndpoint('https://sqs.eu-west-1.amazonaws.com/123456789012/Nimbus-Frames.fifo').href).toBe(
      'https://sqs.eu-west-1.amazonaws.com/',
    );
    expect(sqsEndpoint('https://sqs.cn-north-1.amazonaws.com.cn/123456789012/Nimbus-Frames.fifo').href).toBe(
      'https://sqs.cn-north-1.amazonaws.com.cn/',
    );
    expect(sqsEndpoint('https://sqs.us-gov-west-1.amazonaws.com/123456789012/Nimbus-Frames.fifo').href).toBe(
      'https://sqs.us-gov-west-1.amazonaws.com/',
    );
  });

  it('is FRAME_QUEUE_ENDPOINT when given, and a queue "URL" that is none needs it', () => {
    expect(sqsEndpoint('local-frame-queue', 'http://127.0.0.1:5280/').href).toBe('http://127.0.0.1:5280/');
    expect(() => sqsEndpoint('local-frame-queue')).toThrow(/FRAME_QUEUE_ENDPOINT/);
  });

  it('takes the request to the host of the queue URL, signed for the configured region', async () => {
    seen.length = 0;
    answer = { status: 200, body: { Successful: [{ Id: '0' }], Failed: [] } };
    const queueUrl = `${endpoint}123456789012/Nimbus-Frames.fifo`;
    await sqsFrameQueue({
      queueUrl,
      region: 'cn-north-1',
      credentials: async () => ({ accessKeyId: 'AKIDEXAMPLE', secretAccessKey: 'secret' }),
    }).retryIn([{ receiptHandle: 'r', seconds: 2 }]);
    expect(seen).toHaveLength(1);
    expect(seen[0].url).toBe('/');
    expect(seen[0].headers.host).toBe(new URL(endpoint).host);
    expect(seen[0].headers.authorization).toContain('/cn-north-1/sqs/aws4_request');
    expect(seen[0].body.QueueUrl).toBe(queueUrl);
  });
});

describe('retryDelaySeconds', () => {
  it('doubles with the receive count from 1 s, up to the maximum', () => {
    expect([1, 2, 3, 4, 5, 6, 7].map((count) => retryDelaySeconds(count, 30))).toEqual([
      1, 2, 4, 8, 16, 30, 30,
    ]);
    expect(retryDelaySeconds(3, 0)).toBe(0);
    expect(retryDelaySeconds(0, 30)).toBe(1);
  });
});
