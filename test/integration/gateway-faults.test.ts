/**
 * The local stack fails like AWS: the event source's visibility timeout, function timeout,
 * mixed batches, lost deletes and deaths mid-batch; PostToConnection faults; DynamoDB faults
 * as the SDK's own exceptions. Each switch is shown doing what it says, and nothing else.
 */
import {
  ApiGatewayManagementApiClient,
  GoneException,
  LimitExceededException,
  PostToConnectionCommand,
} from '@aws-sdk/client-apigatewaymanagementapi';
import {
  ConditionalCheckFailedException,
  InternalServerError,
  ProvisionedThroughputExceededException,
  ThrottlingException,
  TransactionCanceledException,
  TransactionConflictException,
} from '@aws-sdk/client-dynamodb';
import {
  type DynamoDBDocumentClient,
  GetCommand,
  PutCommand,
  TransactWriteCommand,
} from '@aws-sdk/lib-dynamodb';
import { Stack } from 'aws-cdk-lib';
import { Template } from 'aws-cdk-lib/assertions';
import type { Context, SQSBatchResponse, SQSEvent, SQSRecord } from 'aws-lambda';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import WebSocket from 'ws';
import { FrameQueue } from '../../infra/constructs/frame-queue.ts';
import { injectDynamoDbFaults } from '../../infra/local/dynamodb-faults.ts';
import { DEPLOYED_EVENT_SOURCE, parseEventSourceSettings } from '../../infra/local/event-source.ts';
import {
  FaultCounts,
  type FaultOptions,
  FaultOptionsError,
  parseFaultOptions,
} from '../../infra/local/faults.ts';
import { type Gateway, type GatewayOptions, startGateway } from '../../infra/local/gateway.ts';
import { startLocalStack } from '../../infra/local/stack.ts';
import { STREAM_TIMEOUT } from '../../infra/stack.ts';
import { type FrameQueuePort, sqsFrameQueue } from '../../shared/frame-queue.ts';
import { apiGatewayPort, POST_ATTEMPTS } from '../../shared/outbound.ts';
import { decodeQueueMessage } from '../../shared/queue-message.ts';
import { createDocumentClient } from '../../shared/store/dynamo.ts';
import { createTestConfig, useDynamoDbLocal } from '../support/dynamodb.ts';
import { eventually } from '../support/eventually.ts';

// ---------------------------------------------------------------------------------------------
// Harness: a gateway whose stream handler records every invocation.

interface Delivery {
  connectionId: string;
  frame: string | undefined;
  kind: 'frame' | 'disconnect';
  messageId: string;
  receiveCount: number;
  receiptHandle: string;
  /** When the handler was given it (the invocation's start, after the receive). */
  at: number;
  /** SQS's ApproximateFirstReceiveTimestamp: when the queue first received it. */
  firstReceivedAt: number;
}

interface Invocation {
  deliveries: Delivery[];
  context: Context;
  startedAt: number;
}

type Behaviour = (
  invocation: Invocation,
) => Promise<SQSBatchResponse | undefined> | SQSBatchResponse | undefined;

interface Harness {
  gateway: Gateway;
  invocations: Invocation[];
  logs: string[];
  /** Every record the handler was given, in order. */
  deliveries(): Delivery[];
  framesOf(connectionId: string): string[];
}

const running: Gateway[] = [];
const sockets: WebSocket[] = [];

afterEach(async () => {
  for (const socket of sockets.splice(0)) {
    socket.on('error', () => {});
    socket.terminate();
  }
  await Promise.all(running.splice(0).map((gateway) => gateway.close()));
});

function toDelivery(record: SQSRecord): Delivery {
  const event = decodeQueueMessage(record.body);
  return {
    connectionId: event.connectionId,
    frame: event.kind === 'frame' ? event.frame : undefined,
    kind: event.kind,
    messageId: record.messageId,
    receiveCount: Number(record.attributes.ApproximateReceiveCount),
    receiptHandle: record.receiptHandle,
    at: Date.now(),
    firstReceivedAt: Number(record.attributes.ApproximateFirstReceiveTimestamp),
  };
}

async function startHarness(behaviour: Behaviour, options: Partial<GatewayOptions> = {}): Promise<Harness> {
  const invocations: Invocation[] = [];
  const logs: string[] = [];
  const gateway = await startGateway({
    port: 0,
    connect: async () => ({ statusCode: 200, headers: { 'Sec-WebSocket-Protocol': 'xmpp' } }),
    stream: async (event: SQSEvent, context: Context) => {
      const invocation = { deliveries: event.Records.map(toDelivery), context, startedAt: Date.now() };
      invocations.push(invocation);
      return behaviour(invocation);
    },
    log: (line) => logs.push(line),
    ...options,
  });
  running.push(gateway);
  const deliveries = () => invocations.flatMap((invocation) => invocation.deliveries);
  return {
    gateway,
    invocations,
    logs,
    deliveries,
    framesOf: (connectionId) =>
      deliveries()
        .filter((delivery) => delivery.connectionId === connectionId && delivery.kind === 'frame')
        .map((delivery) => delivery.frame as string),
  };
}

interface Client {
  socket: WebSocket;
  received: string[];
  closed: Promise<number>;
}

async function connect(url: string): Promise<Client> {
  const socket = new WebSocket(url, 'xmpp');
  sockets.push(socket);
  const received: string[] = [];
  socket.on('message', (data) => received.push(data.toString()));
  const closed = new Promise<number>((resolve) => socket.once('close', (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    socket.once('open', () => resolve());
    socket.once('error', reject);
  });
  return { socket, received, closed };
}

/** The connection id of the next frame the harness sees from `client`. */
async function connectionIdOf(harness: Harness, client: Client, probe: string): Promise<string> {
  client.socket.send(probe);
  let id: string | undefined;
  await eventually(() => {
    id = harness.deliveries().find((delivery) => delivery.frame === probe)?.connectionId;
    expect(id).toBeDefined();
  });
  return id as string;
}

/** A promise and the function that settles it. */
function gate(): { opened: Promise<void>; open: () => void } {
  let open: () => void = () => {};
  const opened = new Promise<void>((resolve) => {
    open = resolve;
  });
  return { opened, open };
}

const ok = (): undefined => undefined;

function failedIds(invocation: Invocation, frames: string[]): SQSBatchResponse {
  return {
    batchItemFailures: invocation.deliveries
      .filter((delivery) => delivery.frame !== undefined && frames.includes(delivery.frame))
      .map((delivery) => ({ itemIdentifier: delivery.messageId })),
  };
}

function managementClient(endpoint: string): ApiGatewayManagementApiClient {
  return new ApiGatewayManagementApiClient({
    endpoint,
    region: 'us-east-1',
    credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
    maxAttempts: 1,
  });
}

// ---------------------------------------------------------------------------------------------

describe('defaults are the deployed values', () => {
  test('function timeout, visibility timeout, receives before the dead-letter queue', () => {
    expect(DEPLOYED_EVENT_SOURCE.functionTimeoutMs).toBe(STREAM_TIMEOUT.toMilliseconds());
    const stack = new Stack();
    new FrameQueue(stack, 'FrameQueue', { consumerTimeout: STREAM_TIMEOUT });
    Template.fromStack(stack).hasResourceProperties('AWS::SQS::Queue', {
      FifoQueue: true,
      VisibilityTimeout: DEPLOYED_EVENT_SOURCE.visibilityTimeoutMs / 1000,
      RedrivePolicy: { maxReceiveCount: DEPLOYED_EVENT_SOURCE.maxReceiveCount },
    });
  });

  test('a stream invocation is told the function timeout as its remaining time', async () => {
    const harness = await startHarness(ok);
    const client = await connect(harness.gateway.url);
    client.socket.send('<r/>');
    await eventually(() => expect(harness.invocations).toHaveLength(1));
    const remaining = harness.invocations[0].context.getRemainingTimeInMillis();
    expect(remaining).toBeLessThanOrEqual(DEPLOYED_EVENT_SOURCE.functionTimeoutMs);
    expect(remaining).toBeGreaterThan(DEPLOYED_EVENT_SOURCE.functionTimeoutMs - 5_000);
  });
});

describe('visibility timeout', () => {
  test('a failed record comes back only after the visibility timeout, and its connection waits for it', async () => {
    const visibilityTimeoutMs = 400;
    const harness = await startHarness(
      (invocation) =>
        invocation.deliveries.some((delivery) => delivery.frame === 'b' && delivery.receiveCount === 1)
          ? failedIds(invocation, ['b'])
          : undefined,
      { visibilityTimeoutMs },
    );
    const slowed = await connect(harness.gateway.url);
    const other = await connect(harness.gateway.url);
    const slowedId = await connectionIdOf(harness, slowed, 'a');
    const otherId = await connectionIdOf(harness, other, 'x0');
    slowed.socket.send('b');
    slowed.socket.send('c');
    await eventually(() => expect(harness.framesOf(slowedId)).toContain('b'));
    const firstB = harness.deliveries().find((delivery) => delivery.frame === 'b') as Delivery;
    // Meanwhile another connection is served at once.
    for (let i = 1; i <= 5; i++) other.socket.send(`x${i}`);
    await eventually(() => expect(harness.framesOf(otherId)).toHaveLength(6));
    expect(harness.framesOf(slowedId)).toEqual(['a', 'b']);

    await eventually(() => expect(harness.framesOf(slowedId)).toEqual(['a', 'b', 'b', 'c']));
    const [, secondB] = harness.deliveries().filter((delivery) => delivery.frame === 'b');
    expect(secondB.messageId).toBe(firstB.messageId);
    expect(secondB.receiveCount).toBe(2);
    // The visibility timeout runs from the first receive (SQS's ApproximateFirstReceiveTimestamp),
    // and the second delivery's invocation starts after its own receive: no slack is needed,
    // however late either invocation started after its receive on a loaded machine (comparing
    // the two starts failed once at 397 ms against 398). Redelivered at once, the gap would be a
    // few ms.
    expect(firstB.firstReceivedAt).toBeLessThanOrEqual(firstB.at);
    expect(secondB.firstReceivedAt).toBe(firstB.firstReceivedAt);
    expect(secondB.at - firstB.firstReceivedAt).toBeGreaterThanOrEqual(visibilityTimeoutMs);
    expect(secondB.at - firstB.firstReceivedAt).toBeLessThan(visibilityTimeoutMs + 2_000);
    expect(harness.framesOf(otherId).every((_, index, frames) => frames[index] === `x${index}`)).toBe(true);
    expect(
      Math.max(
        ...harness
          .deliveries()
          .filter((d) => d.connectionId === otherId)
          .map((d) => d.at),
      ),
    ).toBeLessThan(secondB.at);
  });

  test('ChangeMessageVisibility (as shared/frame-queue.ts sends it) brings a failed record back when asked, not after the timeout', async () => {
    let queue: FrameQueuePort | undefined;
    let firstReceipt = '';
    const harness = await startHarness(
      async (invocation) => {
        const b = invocation.deliveries.find(
          (delivery) => delivery.frame === 'b' && delivery.receiveCount === 1,
        );
        if (!b) return undefined;
        firstReceipt = b.receiptHandle;
        await queue?.retryIn([{ receiptHandle: b.receiptHandle, seconds: 1 }]);
        return failedIds(invocation, ['b']);
      },
      { visibilityTimeoutMs: 60_000 },
    );
    queue = sqsFrameQueue({
      queueUrl: 'local-frame-queue',
      region: 'us-east-1',
      endpoint: harness.gateway.queueEndpoint,
      credentials: async () => ({ accessKeyId: 'local', secretAccessKey: 'local' }),
    });
    const client = await connect(harness.gateway.url);
    const id = await connectionIdOf(harness, client, 'a');
    client.socket.send('b');
    client.socket.send('c');
    await eventually(() => expect(harness.framesOf(id)).toEqual(['a', 'b', 'b', 'c']), 10_000);
    const [firstB, secondB] = harness.deliveries().filter((delivery) => delivery.frame === 'b');
    expect(secondB.receiveCount).toBe(2);
    expect(secondB.at - firstB.at).toBeGreaterThanOrEqual(1000 - 2);
    expect(secondB.at - firstB.at).toBeLessThan(10_000);
    // A receipt handle of an earlier receive changes nothing (SQS: MessageNotInflight).
    await expect(queue.retryIn([{ receiptHandle: firstReceipt, seconds: 0 }])).rejects.toThrow(
      /1 entries failed/,
    );
  });

  test('an invocation that throws has its whole batch delivered again after the visibility timeout', async () => {
    const visibilityTimeoutMs = 300;
    const held = gate();
    const harness = await startHarness(
      async (invocation) => {
        if (invocation.deliveries[0].frame === 'hold') await held.opened;
        if (harness.invocations.length === 2) throw new Error('DynamoDB unavailable');
        return undefined;
      },
      { visibilityTimeoutMs, batchSize: 10 },
    );
    const client = await connect(harness.gateway.url);
    client.socket.send('hold');
    await eventually(() => expect(harness.invocations).toHaveLength(1));
    for (const frame of ['a', 'b', 'c']) client.socket.send(frame);
    // The three frames are queued behind 'hold' (its group is locked), so they share a batch.
    held.open();
    await eventually(() => expect(harness.invocations).toHaveLength(3));
    const [, failed, retried] = harness.invocations;
    expect(failed.deliveries.map((delivery) => delivery.frame)).toEqual(['a', 'b', 'c']);
    expect(retried.deliveries.map((delivery) => delivery.messageId)).toEqual(
      failed.deliveries.map((delivery) => delivery.messageId),
    );
    expect(retried.deliveries.map((delivery) => delivery.receiveCount)).toEqual([2, 2, 2]);
    expect(retried.startedAt - failed.startedAt).toBeGreaterThanOrEqual(visibilityTimeoutMs - 2);
    expect(harness.logs.join('\n')).toContain('DynamoDB unavailable');
  });

  test('a record after maxReceiveCount receives goes to the dead-letter queue, and its connection moves on', async () => {
    const harness = await startHarness((invocation) => failedIds(invocation, ['poison']), {
      visibilityTimeoutMs: 100,
      maxReceiveCount: 3,
    });
    const client = await connect(harness.gateway.url);
    const id = await connectionIdOf(harness, client, 'a');
    client.socket.send('poison');
    client.socket.send('after');
    await eventually(() => expect(harness.framesOf(id)).toContain('after'));
    expect(harness.framesOf(id)).toEqual(['a', 'poison', 'poison', 'poison', 'after']);
    expect(harness.gateway.deadLetters()).toMatchObject([{ groupId: id, receiveCount: 3 }]);
  });
});

describe('function timeout', () => {
  test('an invocation past the timeout is abandoned: its whole batch comes back, not before it stopped, and the work it did stays done', async () => {
    const functionTimeoutMs = 200;
    const visibilityTimeoutMs = 500;
    const held = gate();
    const stuck = gate();
    const effects: string[] = [];
    const harness = await startHarness(
      async (invocation) => {
        if (invocation.deliveries[0].frame === 'hold') {
          await held.opened;
          return undefined;
        }
        for (const delivery of invocation.deliveries) {
          effects.push(`${delivery.frame}#${delivery.receiveCount}`);
          // The first delivery of 'b' hangs, as on a call that never answers.
          if (delivery.frame === 'b' && delivery.receiveCount === 1) await stuck.opened;
        }
        return undefined;
      },
      { functionTimeoutMs, visibilityTimeoutMs, batchSize: 10 },
    );
    const client = await connect(harness.gateway.url);
    client.socket.send('hold');
    await eventually(() => expect(harness.invocations).toHaveLength(1));
    for (const frame of ['a', 'b', 'c']) client.socket.send(frame);
    held.open();
    await eventually(() => expect(effects).toContain('b#1'));
    await new Promise((resolve) => setTimeout(resolve, functionTimeoutMs + visibilityTimeoutMs + 300));
    // Past the timeout and the visibility timeout: AWS would have stopped the runtime; here the
    // abandoned invocation still runs, and its records wait for it, never handled twice at once.
    expect(harness.invocations).toHaveLength(2);
    const releasedAt = Date.now();
    stuck.open();
    await eventually(() => expect(effects).toContain('c#2'), 5_000);

    const [, timedOut, retried] = harness.invocations;
    expect(timedOut.deliveries.map((delivery) => delivery.frame)).toEqual(['a', 'b', 'c']);
    expect(timedOut.context.getRemainingTimeInMillis()).toBe(0);
    // 'a' was handled before the timeout and is handled again; 'c' only by the abandoned
    // invocation running on (locally), and before the whole batch came back.
    expect(effects.slice(0, 6)).toEqual(['a#1', 'b#1', 'c#1', 'a#2', 'b#2', 'c#2']);
    expect(retried.deliveries.map((delivery) => delivery.messageId)).toEqual(
      timedOut.deliveries.map((delivery) => delivery.messageId),
    );
    expect(retried.startedAt - timedOut.startedAt).toBeGreaterThanOrEqual(visibilityTimeoutMs - 2);
    expect(retried.startedAt).toBeGreaterThanOrEqual(releasedAt);
    expect(harness.logs.join('\n')).toMatch(/timed out after 200 ms/);
  });
});

describe('batches as the FIFO event source forms them', () => {
  test('with invocations busy, batches mix connections, up to batchSize, each connection in order', async () => {
    const held = gate();
    const harness = await startHarness(
      async (invocation) => {
        if (invocation.deliveries[0].frame === 'hold') await held.opened;
        return undefined;
      },
      { batchSize: 10, concurrency: 1 },
    );
    const holder = await connect(harness.gateway.url);
    holder.socket.send('hold');
    await eventually(() => expect(harness.invocations).toHaveLength(1));
    const clients = await Promise.all([0, 1, 2].map(() => connect(harness.gateway.url)));
    for (let i = 0; i < 6; i++) {
      for (const [index, client] of clients.entries()) client.socket.send(`${index}:${i}`);
    }
    // The only invocation slot is busy, so all 18 frames wait in the queue behind 'hold'.
    await eventually(() => expect(harness.gateway.queuedMessages()).toBe(19));
    held.open();
    await eventually(() => expect(harness.deliveries()).toHaveLength(19));

    const batches = harness.invocations.slice(1).map((invocation) => invocation.deliveries);
    expect(batches.map((batch) => batch.length)).toEqual([10, 8]);
    const runs = (batch: Delivery[]) =>
      batch.reduce<string[][]>((groups, delivery) => {
        const last = groups.at(-1);
        if (last && last[0].split(':')[0] === delivery.frame?.split(':')[0])
          last.push(delivery.frame as string);
        else groups.push([delivery.frame as string]);
        return groups;
      }, []);
    // SQS returns as many messages of one group as it can, then fills the batch from the next group.
    const [whole, partial] = runs(batches[0]);
    expect(whole.map((frame) => frame.split(':')[1])).toEqual(['0', '1', '2', '3', '4', '5']);
    expect(partial.map((frame) => frame.split(':')[1])).toEqual(['0', '1', '2', '3']);
    expect(runs(batches[1]).map((run) => run.map((frame) => frame.split(':')[1]))).toEqual(
      expect.arrayContaining([
        ['4', '5'],
        ['0', '1', '2', '3', '4', '5'],
      ]),
    );
    expect(runs(batches[1])).toHaveLength(2);
    for (const index of [0, 1, 2]) {
      const frames = harness.deliveries().filter((delivery) => delivery.frame?.startsWith(`${index}:`));
      expect(frames.map((delivery) => delivery.frame)).toEqual(
        [0, 1, 2, 3, 4, 5].map((i) => `${index}:${i}`),
      );
    }
  });

  test('a connection is never in two batches at once, whatever the concurrency and failures', async () => {
    const inFlight = new Map<string, number>();
    const handled: Delivery[] = [];
    const frameNumber = (delivery: Delivery) => Number(delivery.frame?.split(':')[1]);
    let overlaps = 0;
    let mixed = 0;
    const harness = await startHarness(
      async (invocation) => {
        const groups = new Set(invocation.deliveries.map((delivery) => delivery.connectionId));
        if (groups.size > 1) mixed += 1;
        for (const group of groups) {
          const count = (inFlight.get(group) ?? 0) + 1;
          if (count > 1) overlaps += 1;
          inFlight.set(group, count);
        }
        await new Promise((resolve) => setTimeout(resolve, Math.random() * 4));
        for (const group of groups) inFlight.set(group, (inFlight.get(group) ?? 1) - 1);
        // Every fifth frame fails on its first delivery, and with it the rest of its connection's
        // records in the batch (as functions/stream.ts does).
        const failing = new Set<string>();
        const failures: SQSBatchResponse['batchItemFailures'] = [];
        for (const delivery of invocation.deliveries) {
          if (
            failing.has(delivery.connectionId) ||
            (delivery.receiveCount === 1 && frameNumber(delivery) % 5 === 4)
          ) {
            failing.add(delivery.connectionId);
            failures.push({ itemIdentifier: delivery.messageId });
          } else handled.push(delivery);
        }
        return { batchItemFailures: failures };
      },
      // Well above an invocation's run time even on a loaded machine (CI runs every test file
      // at once on 2 cores; 500 ms was once not enough): were it shorter, the records would
      // rightly become visible again mid-invocation and be handled twice.
      { batchSize: 10, concurrency: 3, visibilityTimeoutMs: 2_000 },
    );
    const clients = await Promise.all(Array.from({ length: 8 }, () => connect(harness.gateway.url)));
    for (let i = 0; i < 40; i++) {
      for (const [index, client] of clients.entries()) client.socket.send(`${index}:${i}`);
    }
    await eventually(() => expect(handled.length).toBeGreaterThanOrEqual(8 * 40), 60_000);
    await harness.gateway.drained();
    expect(overlaps).toBe(0);
    // Whether batches mixed connections here depends on timing (a group's tail meeting another
    // group not locked nor waiting out a failure's visibility timeout; a loaded machine once had
    // none in a run): the test above shows mixing deterministically. Reported, not asserted.
    if (mixed === 0) console.info('no batch mixed connections in this run');
    expect(
      Math.max(...harness.invocations.map((invocation) => invocation.deliveries.length)),
    ).toBeLessThanOrEqual(10);
    // Handled exactly once each and in order per connection, failures and retries notwithstanding.
    for (const index of clients.keys()) {
      const frames = handled.filter((delivery) => delivery.frame?.startsWith(`${index}:`)).map(frameNumber);
      expect(frames).toEqual(Array.from({ length: 40 }, (_, i) => i));
    }
    expect(harness.deliveries().some((delivery) => delivery.receiveCount > 1)).toBe(true);
  }, 90_000);
});

describe('lost deletes: the same message delivered twice', () => {
  async function runDuplicates(
    seed: number,
    rate: number,
  ): Promise<{ duplicated: string[]; injected: number }> {
    const harness = await startHarness(ok, { faults: { seed, duplicate: rate }, visibilityTimeoutMs: 100 });
    const client = await connect(harness.gateway.url);
    const frames = Array.from({ length: 200 }, (_, i) => String(i));
    const id = await connectionIdOf(harness, client, 'start');
    for (const frame of frames) client.socket.send(frame);
    await eventually(
      () => expect(new Set(harness.framesOf(id))).toEqual(new Set(['start', ...frames])),
      20_000,
    );
    await harness.gateway.drained();
    const deliveries = harness.deliveries().filter((delivery) => delivery.kind === 'frame');
    // Same message id, higher receive count, before anything behind it.
    const seen = new Map<string, number>();
    for (const delivery of deliveries) {
      const before = seen.get(delivery.messageId);
      if (before !== undefined) expect(delivery.receiveCount).toBe(before + 1);
      seen.set(delivery.messageId, delivery.receiveCount);
    }
    const order = deliveries.map((delivery) => (delivery.frame === 'start' ? -1 : Number(delivery.frame)));
    expect(order).toEqual([...order].sort((a, b) => a - b));
    const duplicated = deliveries
      .filter((delivery) => delivery.receiveCount > 1)
      .map((delivery) => delivery.frame as string);
    await harness.gateway.close();
    return { duplicated, injected: harness.gateway.faultsInjected().duplicate ?? 0 };
  }

  test('happen at the configured rate, on the same messages for the same seed', async () => {
    const first = await runDuplicates(42, 0.1);
    // Each successful handling (201 frames plus the duplicates themselves) loses its delete with p = 0.1.
    const handlings = 201 + first.duplicated.length;
    expect(first.duplicated.length).toBe(first.injected);
    expect(first.duplicated.length / handlings).toBeGreaterThan(0.05);
    expect(first.duplicated.length / handlings).toBeLessThan(0.15);
    const again = await runDuplicates(42, 0.1);
    expect(again.duplicated).toEqual(first.duplicated);
    const otherSeed = await runDuplicates(43, 0.1);
    expect(otherSeed.duplicated).not.toEqual(first.duplicated);
    const none = await runDuplicates(42, 0);
    expect(none.duplicated).toEqual([]);
  }, 60_000);
});

describe('a function that dies mid-batch', () => {
  test('does the work of its first k records, then its whole batch comes back', async () => {
    const held = gate();
    const harness = await startHarness(
      async (invocation) => {
        if (invocation.deliveries[0].frame === 'hold' && invocation.deliveries[0].receiveCount === 1)
          await held.opened;
        return undefined;
      },
      {
        faults: { seed: 3, dieMidBatch: 1 },
        batchSize: 10,
        concurrency: 1,
        visibilityTimeoutMs: 100,
        maxReceiveCount: 4,
      },
    );
    const holder = await connect(harness.gateway.url);
    holder.socket.send('hold');
    await eventually(() => expect(harness.invocations).toHaveLength(1));
    const client = await connect(harness.gateway.url);
    for (const frame of ['a', 'b', 'c', 'd', 'e']) client.socket.send(frame);
    await eventually(() => expect(harness.gateway.queuedMessages()).toBe(6));
    held.open();
    // Every invocation dies, so everything ends in the dead-letter queue after four receives.
    await eventually(() => expect(harness.gateway.deadLetters()).toHaveLength(6));
    await harness.gateway.drained();

    expect(harness.gateway.faultsInjected().dieMidBatch).toBe(harness.invocations.length);
    const letters = harness.gateway.deadLetters().map((letter) => decodeQueueMessage(letter.body).frame);
    expect(letters.sort()).toEqual(['a', 'b', 'c', 'd', 'e', 'hold']);
    expect(harness.gateway.deadLetters().every((letter) => letter.receiveCount === 4)).toBe(true);
    const lettersFrames = harness.deliveries().filter((delivery) => delivery.frame !== 'hold');
    // A record left unhandled by a death was received all the same: it reappears with a higher count.
    const shown = new Map<string, number[]>();
    for (const delivery of lettersFrames)
      shown.set(delivery.frame as string, [
        ...(shown.get(delivery.frame as string) ?? []),
        delivery.receiveCount,
      ]);
    const skipped = [...shown.values()].some((counts) => counts.some((count, index) => count !== index + 1));
    expect(skipped).toBe(true);
    // Each invocation was handed a prefix of its connection's frames: the rest died with it.
    for (const invocation of harness.invocations) {
      const frames = invocation.deliveries
        .filter((delivery) => delivery.frame !== 'hold')
        .map((d) => d.frame);
      expect(frames).toEqual(['a', 'b', 'c', 'd', 'e'].slice(0, frames.length));
    }
    expect(harness.logs.some((line) => /died after \d+ of \d+ records/.test(line))).toBe(true);
  });
});

describe('PostToConnection faults', () => {
  async function postWith(post: FaultOptions['post']) {
    const harness = await startHarness(ok, { faults: { seed: 1, post } });
    const client = await connect(harness.gateway.url);
    const id = await connectionIdOf(harness, client, 'hello');
    const management = managementClient(harness.gateway.managementEndpoint);
    const send = (data: string) =>
      management.send(new PostToConnectionCommand({ ConnectionId: id, Data: data })).then(
        () => 'sent' as const,
        (error: unknown) => error as Error & { $metadata?: { httpStatusCode?: number } },
      );
    return { harness, client, id, send };
  }

  test('an injected 410 is a real Gone: the socket drops and $disconnect follows', async () => {
    const { harness, client, id, send } = await postWith({ gone: 1 });
    const error = await send('<message/>');
    expect(error).toBeInstanceOf(GoneException);
    expect((error as GoneException).$metadata.httpStatusCode).toBe(410);
    expect(await client.closed).toBe(1006);
    await eventually(() =>
      expect(harness.deliveries().some((d) => d.connectionId === id && d.kind === 'disconnect')).toBe(true),
    );
    expect(client.received).toEqual([]);
    expect(harness.gateway.connectionCount()).toBe(0);
    expect(harness.gateway.faultsInjected()).toEqual({ 'post.gone': 1 });
  });

  test('429 LimitExceededException and 500 deliver nothing; the socket stays open', async () => {
    const throttled = await postWith({ throttle: 1 });
    const limit = await throttled.send('<message/>');
    expect(limit).toBeInstanceOf(LimitExceededException);
    expect((limit as LimitExceededException).$metadata.httpStatusCode).toBe(429);
    const failing = await postWith({ serverError: 1 });
    const serverError = await failing.send('<message/>');
    expect((serverError as Error).name).toBe('InternalServerErrorException');
    expect((serverError as { $fault?: string }).$fault).toBe('server');
    expect((serverError as { $metadata: { httpStatusCode: number } }).$metadata.httpStatusCode).toBe(500);
    for (const { client } of [throttled, failing]) {
      expect(client.received).toEqual([]);
      expect(client.socket.readyState).toBe(WebSocket.OPEN);
    }
  });

  test('a timeout delivers the frame but the caller gets an error; a slow post answers late', async () => {
    const timingOut = await postWith({ timeout: 1, timeoutMs: 50 });
    const error = await timingOut.send('<message id="1"/>');
    expect(error).toBeInstanceOf(Error);
    expect(timingOut.client.received).toEqual(['<message id="1"/>']);
    const slow = await postWith({ slow: 1, slowMs: 300 });
    const started = Date.now();
    expect(await slow.send('<message id="2"/>')).toBe('sent');
    expect(Date.now() - started).toBeGreaterThanOrEqual(298);
    expect(slow.client.received).toEqual(['<message id="2"/>']);
  });

  test('rates are drawn per post from the seed', async () => {
    const outcomes = async () => {
      const { send } = await postWith({ throttle: 0.3, serverError: 0.2 });
      const results: string[] = [];
      for (let i = 0; i < 60; i++) {
        const result = await send(`<r n="${i}"/>`);
        results.push(result === 'sent' ? 'sent' : (result.name ?? 'error'));
      }
      return results;
    };
    const first = await outcomes();
    expect(await outcomes()).toEqual(first);
    const throttled = first.filter((name) => name === 'LimitExceededException').length;
    const failed = first.filter((name) => name === 'InternalServerErrorException').length;
    expect(throttled).toBeGreaterThan(6);
    expect(throttled).toBeLessThan(30);
    expect(failed).toBeGreaterThan(3);
    expect(failed).toBeLessThan(24);
    expect(first.filter((name) => name === 'sent').length).toBe(60 - throttled - failed);
  });
});

describe("Nimbus's post port under those faults (shared/outbound.ts)", () => {
  async function portWith(post: FaultOptions['post']) {
    const harness = await startHarness(ok, { faults: { seed: 1, post } });
    const client = await connect(harness.gateway.url);
    const id = await connectionIdOf(harness, client, 'hello');
    return { harness, client, id, port: apiGatewayPort(harness.gateway.managementEndpoint, 'us-east-1') };
  }

  test('a post that gets no answer is reported unknown and never sent a second time', async () => {
    const { client, id, port } = await portWith({ timeout: 1, timeoutMs: 50 });
    expect(await port.post(id, '<message id="once"/>')).toBe('unknown');
    // The SDK would have resent it after the dropped answer: the client would hold two copies,
    // one more than stream management's count says.
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(client.received).toEqual(['<message id="once"/>']);
  });

  test('a 429 or 500 (nothing delivered) is tried again, up to POST_ATTEMPTS in all', async () => {
    const refusing = await portWith({ throttle: 1 });
    await expect(refusing.port.post(refusing.id, '<message/>')).rejects.toMatchObject({
      name: 'LimitExceededException',
    });
    expect(refusing.harness.gateway.faultsInjected()).toEqual({ 'post.throttle': POST_ATTEMPTS });
    expect(refusing.client.received).toEqual([]);
    // Half the posts refused: every message arrives once, some after a retry.
    const flaky = await portWith({ throttle: 0.3, serverError: 0.2 });
    const results: string[] = [];
    for (let i = 0; i < 20; i++) {
      results.push(await flaky.port.post(flaky.id, `<m n="${i}"/>`).catch((error: Error) => error.name));
    }
    const sent = results.flatMap((result, i) => (result === 'sent' ? [`<m n="${i}"/>`] : []));
    expect(Object.values(flaky.harness.gateway.faultsInjected()).reduce((a, b) => a + b, 0)).toBeGreaterThan(
      5,
    );
    expect(sent.length).toBeGreaterThan(15);
    await eventually(() => expect(flaky.client.received).toEqual(sent));
  });
});

describe('DynamoDB faults, thrown by the SDK itself', () => {
  let tables: { users: string };
  const clients: DynamoDBDocumentClient[] = [];

  beforeAll(async () => {
    tables = (await createTestConfig()).tables;
  });
  afterAll(() => {
    for (const client of clients) client.destroy();
  });

  /** The server's document client (`maxAttempts` 4), with faults. */
  function faultyClient(rates: NonNullable<FaultOptions['dynamodb']>, seed = 1) {
    const doc = createDocumentClient({ endpoint: useDynamoDbLocal(), region: 'us-east-1' });
    clients.push(doc);
    const counts = new FaultCounts();
    injectDynamoDbFaults(doc, { seed, rates, counts });
    return { doc, counts };
  }

  const plain = () => {
    const doc = createDocumentClient({ endpoint: useDynamoDbLocal(), region: 'us-east-1' });
    clients.push(doc);
    return doc;
  };
  const key = (name: string) => ({ pk: `fault#${name}`, sk: 'x' });
  const exists = async (name: string) =>
    (await plain().send(new GetCommand({ TableName: tables.users, Key: key(name), ConsistentRead: true })))
      .Item !== undefined;
  const put = (doc: DynamoDBDocumentClient, name: string) =>
    doc.send(new PutCommand({ TableName: tables.users, Item: key(name) })).catch((error: unknown) => error);

  function expectAwsError(error: unknown, status: number, fault: 'client' | 'server'): void {
    const aws = error as { $metadata: Record<string, unknown>; $fault: string; $retryable?: unknown };
    expect(aws.$metadata).toMatchObject({
      httpStatusCode: status,
      requestId: expect.stringMatching(/^[A-Z0-9]{52}$/),
    });
    expect(aws.$fault).toBe(fault);
    // No DynamoDB exception carries the retryable trait; the SDK retries by name and status.
    expect(aws.$retryable).toBeUndefined();
  }

  test('throttling: ThrottlingException or ProvisionedThroughputExceededException, retried by the SDK, nothing written', async () => {
    const { doc, counts } = faultyClient({ throttle: 1 });
    const error = await put(doc, 'throttled');
    expect(
      [ThrottlingException, ProvisionedThroughputExceededException].some((type) => error instanceof type),
    ).toBe(true);
    expectAwsError(error, 400, 'client');
    expect((error as ThrottlingException).$metadata.attempts).toBe(4);
    expect(counts.get('dynamodb.throttle')).toBe(4);
    expect(await exists('throttled')).toBe(false);
  });

  test('InternalServerError (500) before the request: retried, nothing written', async () => {
    const { doc } = faultyClient({ serverError: 1 });
    const error = await put(doc, 'server-error');
    expect(error).toBeInstanceOf(InternalServerError);
    expectAwsError(error, 500, 'server');
    expect((error as InternalServerError).$metadata.attempts).toBe(4);
    expect(await exists('server-error')).toBe(false);
  });

  test('InternalServerError after the request: the caller sees an error, the write happened', async () => {
    const { doc, counts } = faultyClient({ serverErrorAfterWrite: 1 });
    const error = await put(doc, 'written-anyway');
    expect(error).toBeInstanceOf(InternalServerError);
    expectAwsError(error, 500, 'server');
    expect(await exists('written-anyway')).toBe(true);
    expect(counts.get('dynamodb.serverErrorAfterWrite')).toBe(4);
    // The SDK's retry of a conditional write meets its own first attempt: a real condition failure.
    const once = faultyClient({ serverErrorAfterWrite: 0.5 }, 2);
    const outcomes: string[] = [];
    for (let i = 0; i < 12; i++) {
      const result = await once.doc
        .send(
          new PutCommand({
            TableName: tables.users,
            Item: key(`conditional-${i}`),
            ConditionExpression: 'attribute_not_exists(pk)',
          }),
        )
        .then(
          () => 'ok',
          (caught: Error) => caught.name,
        );
      outcomes.push(result);
    }
    expect(outcomes).toContain(ConditionalCheckFailedException.name);
  });

  test('transaction conflicts: TransactionCanceledException with one TransactionConflict, TransactionConflictException for single writes; never retried', async () => {
    const { doc } = faultyClient({ transactionConflict: 1 });
    const transaction = await doc
      .send(
        new TransactWriteCommand({
          TransactItems: [
            { Put: { TableName: tables.users, Item: key('tx-1') } },
            { Put: { TableName: tables.users, Item: key('tx-2') } },
            { Put: { TableName: tables.users, Item: key('tx-3') } },
          ],
        }),
      )
      .catch((error: unknown) => error);
    expect(transaction).toBeInstanceOf(TransactionCanceledException);
    expectAwsError(transaction, 400, 'client');
    const reasons = (transaction as TransactionCanceledException).CancellationReasons ?? [];
    expect(reasons).toHaveLength(3);
    expect(reasons.filter((reason) => reason.Code === 'TransactionConflict')).toHaveLength(1);
    expect(reasons.filter((reason) => reason.Code === 'None')).toHaveLength(2);
    expect((transaction as TransactionCanceledException).$metadata.attempts).toBe(1);
    expect(await exists('tx-1')).toBe(false);

    const single = await put(doc, 'single');
    expect(single).toBeInstanceOf(TransactionConflictException);
    expectAwsError(single, 400, 'client');
    // Reads are never in conflict.
    await expect(
      doc.send(new GetCommand({ TableName: tables.users, Key: key('single') })),
    ).resolves.toMatchObject({ $metadata: { httpStatusCode: 200 } });
  });

  test('per attempt by default (the SDK absorbs most), persistent on request (the error reaches the caller)', async () => {
    const attemptsOf = async (persistent: boolean) => {
      const { doc } = faultyClient({ serverError: 0.4, persistent }, 5);
      const attempts: Array<{ failed: boolean; attempts: number }> = [];
      for (let i = 0; i < 15; i++) {
        const result = await doc.send(new GetCommand({ TableName: tables.users, Key: key('any') })).then(
          (output) => ({ failed: false, attempts: output.$metadata.attempts ?? 0 }),
          (error: InternalServerError) => ({ failed: true, attempts: error.$metadata.attempts ?? 0 }),
        );
        attempts.push(result);
      }
      return attempts;
    };
    const perAttempt = await attemptsOf(false);
    expect(perAttempt.some((call) => !call.failed && call.attempts > 1)).toBe(true);
    const persistent = await attemptsOf(true);
    expect(persistent.some((call) => call.failed)).toBe(true);
    for (const call of persistent) expect(call.attempts).toBe(call.failed ? 4 : 1);
  });
});

describe('the local stack', () => {
  test('passes DynamoDB faults to the server’s document client', async () => {
    const config = await createTestConfig();
    const stack = await startLocalStack({
      config,
      port: 0,
      sweepIntervalMs: 0,
      faults: { seed: 9, dynamodb: { serverError: 1, persistent: true } },
    });
    try {
      await expect(stack.server.users.create('nobody@localhost', {} as never)).rejects.toBeInstanceOf(
        InternalServerError,
      );
      expect(stack.faultsInjected()['dynamodb.serverError']).toBe(4);
    } finally {
      await stack.close();
    }
  });
});

describe('options', () => {
  test('NIMBUS_FAULTS is checked', () => {
    expect(parseFaultOptions('{"seed":1,"duplicate":0.1,"post":{"gone":0.5,"slowMs":10}}')).toMatchObject({
      seed: 1,
      duplicate: 0.1,
      post: { gone: 0.5, slowMs: 10 },
    });
    for (const bad of [
      '{"duplicate":0.1}',
      '{"seed":1,"duplicate":2}',
      '{"seed":1,"dynamodb":{"conditionalCheckFailed":0.1}}',
      '{"seed":1,"post":{"gone":0.6,"throttle":0.6}}',
      '{"seed":1,"redeliver":0.1}',
      'seed=1',
    ]) {
      expect(() => parseFaultOptions(bad), bad).toThrow(FaultOptionsError);
    }
  });

  test('NIMBUS_EVENT_SOURCE is checked', () => {
    expect(parseEventSourceSettings('{"visibilityTimeoutMs":2000,"concurrency":2}')).toEqual({
      visibilityTimeoutMs: 2000,
      concurrency: 2,
    });
    expect(() => parseEventSourceSettings('{"visibility":2000}')).toThrow(/unknown event source setting/);
    expect(() => parseEventSourceSettings('{"concurrency":0}')).toThrow(/positive integer/);
  });
});
