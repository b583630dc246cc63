/**
 * The stream function in-process, without the gateway: a server on fresh tables with a port that
 * records posts, connection rows set up as a stream would have left them, and frames handed to
 * `handleStreamEvent` as the queue's event source would hand them.
 */
import type { SQSRecord } from 'aws-lambda';
import { handleStreamEvent } from '../../shared/core/stream.ts';
import { createLogger } from '../../shared/log.ts';
import { RecordingPort } from '../../shared/outbound.ts';
import { encodeQueueMessage, type StreamEvent } from '../../shared/queue-message.ts';
import { deriveCredentialSet } from '../../shared/sasl/scram.ts';
import { createServer, type Server } from '../../shared/server.ts';
import { createTestConfig } from './dynamodb.ts';
import { intercept } from './intercept.ts';

/** A server on fresh tables (`env` as the functions' environment), posting to a RecordingPort. */
export async function testServer(env: Record<string, string | undefined> = {}) {
  const port = new RecordingPort();
  const config = await createTestConfig(env);
  const server = createServer({ config, port, log: createLogger('silent') });
  return { port, server, config };
}

/** A connection row as a stream authenticated as `user` leaves it, bound to `resource` if given. */
export async function openConnection(
  server: Server,
  connectionId: string,
  user: string,
  resource?: string,
): Promise<void> {
  await server.sessions.createConnection(connectionId, Date.now());
  await server.sessions.updateConnection(connectionId, {
    streamOpen: true,
    user,
    ...(resource === undefined ? {} : { resource }),
  });
}

/** What the queue says of a frame besides its text: its id, and as it pleases, the rest. */
export type FrameDelivery = Pick<StreamEvent, 'frameId'> &
  Partial<Pick<StreamEvent, 'seq' | 'receiveCount' | 'timeLeftMs'>>;

/** Hands `xml` to the stream function as a frame of `connectionId`, arrived now. */
export function sendFrame(server: Server, connectionId: string, xml: string, delivery: FrameDelivery) {
  return handleStreamEvent(server, {
    connectionId,
    kind: 'frame',
    frame: xml,
    receivedAt: Date.now(),
    ...delivery,
  });
}

/**
 * The invocation dies before the frame's final save (a timeout): that save fails, once, after
 * the frame did all its other work; SQS then brings the frame back. Returns the restore.
 */
export function dieBeforeFinalSave(server: Server): () => void {
  const original = server.sessions.updateConnection.bind(server.sessions);
  let died = false;
  return intercept(server.sessions, 'updateConnection', async (connectionId, changes, options) => {
    if (!died && changes.savedFrame !== undefined) {
      died = true;
      throw new Error('Task timed out after 30.00 seconds');
    }
    return original(connectionId, changes, options);
  });
}

/**
 * Drives a server's connections frame by frame, as SQS hands a connection's frames to the stream
 * function: `frame` numbers each one (its SQS sequence number) unless told; `login` opens an
 * authenticated stream for `user` on `connectionId` and binds `resource`.
 */
export function frameDriver(server: Server, firstSeq = 100) {
  let seq = firstSeq;
  const nextSeq = () => String(seq++);
  const frame = (connectionId: string, xml: string, frameId: string, s = nextSeq(), receiveCount = 1) =>
    handleStreamEvent(server, {
      connectionId,
      kind: 'frame',
      frame: xml,
      receivedAt: Date.now(),
      frameId,
      seq: s,
      receiveCount,
    });
  const login = async (connectionId: string, user: string, resource: string) => {
    await server.sessions.createConnection(connectionId, Date.now());
    await server.sessions.updateConnection(connectionId, { streamOpen: true, user });
    await frame(
      connectionId,
      `<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>${resource}</resource></bind></iq>`,
      `${connectionId}-bind`,
    );
  };
  return { frame, login, nextSeq };
}

/** Two new local accounts (password `pw`), each subscribed to the other's presence (`both`). */
export async function subscribedPair(server: Server): Promise<{ alice: string; bob: string }> {
  const stamp = `${Date.now()}${Math.floor(Math.random() * 1000)}`;
  const alice = `alice${stamp}@localhost`;
  const bob = `bob${stamp}@localhost`;
  for (const user of [alice, bob]) await server.users.create(user, await deriveCredentialSet('pw', 4096));
  const both = (contact: string) => ({
    contact,
    listed: true,
    groups: [],
    subscription: 'both' as const,
    pendingOut: false,
    approved: false,
  });
  await server.roster.apply(alice, bob, { contactIsLocal: true }, () => ({
    user: both(bob),
    contact: both(alice),
    outcome: undefined,
  }));
  return { alice, bob };
}

let sqsSequence = 18_880_000_000_000_000_000n;

/** An SQS FIFO record of a client's frame, as the event source hands it to the stream function. */
export function sqsRecord(connectionId: string, xml: string, receiveCount = 1): SQSRecord {
  sqsSequence += 1n;
  const requestId = `req-${sqsSequence}`;
  return {
    messageId: requestId,
    receiptHandle: '',
    body: encodeQueueMessage({
      connectionId,
      eventType: 'MESSAGE',
      requestTimeEpoch: Date.now(),
      requestId,
      body: Buffer.from(xml).toString('base64'),
    }),
    attributes: {
      MessageGroupId: connectionId,
      SequenceNumber: String(sqsSequence),
      ApproximateReceiveCount: String(receiveCount),
    },
  } as unknown as SQSRecord;
}
