/**
 * The frame being handled, for the work it causes: SQS delivers a frame at least once (a lost
 * delete, a timed-out or failed batch), so what a frame puts somewhere durable carries a key
 * that is the same on every delivery of that frame — its id and the position of the write among
 * the frame's deliveries — and a store that already holds the key does not take it twice.
 */
import { createHmac } from 'node:crypto';
import { contextStore } from '../context.ts';

interface FrameContext {
  frameId: string;
  receivedAt: number;
  redelivered: boolean;
  seq?: string;
  timeLeftMs?: () => number;
  /** Deliveries so far, per target: a broadcast's concurrent deliveries each count their own. */
  deliveries: Map<string, number>;
  /** The sender's connection, and its last message stored offline (see offlineRecord). */
  connectionId?: string;
  storedOffline?: string;
}

const frames = contextStore<FrameContext>();
/** The time left of an invocation doing work outside any frame (the sweeper). */
const invocations = contextStore<() => number>();

/** Runs the handling of one delivery of a frame. */
export function inFrame<T>(
  frame: {
    frameId: string;
    receivedAt: number;
    receiveCount?: number;
    seq?: string;
    timeLeftMs?: () => number;
    /** A client's frame: its connection, and the record its row holds (ConnectionState.storedOffline). */
    connectionId?: string;
    storedOffline?: string;
  },
  work: () => Promise<T>,
): Promise<T> {
  if (!frame.frameId) return work();
  // Work done under another frame's key (a re-route names each entry) runs in the same
  // invocation: its time left is that of the frame, or the sweep, it runs in.
  const timeLeftMs = frame.timeLeftMs ?? frames.get()?.timeLeftMs ?? invocations.get();
  return frames.run(
    {
      frameId: frame.frameId,
      receivedAt: frame.receivedAt,
      redelivered: (frame.receiveCount ?? 1) > 1,
      ...(frame.seq ? { seq: frame.seq } : {}),
      ...(timeLeftMs ? { timeLeftMs } : {}),
      ...(frame.connectionId ? { connectionId: frame.connectionId } : {}),
      ...(frame.storedOffline ? { storedOffline: frame.storedOffline } : {}),
      deliveries: new Map(),
    },
    work,
  );
}

export interface DeliveryKey {
  /** `<frame id>:<n>`: the frame's n-th durable delivery to its target. */
  key: string;
  /** When the frame reached API Gateway (ms): the same on every delivery of it. */
  at: number;
  /** Not the frame's first delivery: an earlier one may have done this delivery already. */
  redelivered: boolean;
  /** The frame's SQS sequence number, when it came through the queue: orders a sender's frames. */
  seq?: string;
  /** The position of this delivery among the frame's (the `n` of the key). */
  position: number;
  /**
   * A client's frame: its connection, whose frames are handled one at a time and in order (SQS
   * FIFO, one message group per connection).
   */
  from?: string;
}

/**
 * The key of the current frame's next durable delivery to `target` (a stream-management session,
 * an offline inbox); undefined outside a frame. Deliveries to one target are made one after the
 * other, so every delivery of the frame numbers them alike, whatever runs beside them.
 */
export function nextDeliveryKey(target: string): DeliveryKey | undefined {
  return deliveryKey(target, true);
}

/** The key `nextDeliveryKey` would give now, without taking it: to look for it first. */
export function peekDeliveryKey(target: string): DeliveryKey | undefined {
  return deliveryKey(target, false);
}

function deliveryKey(target: string, take: boolean): DeliveryKey | undefined {
  const frame = frames.get();
  if (!frame) return undefined;
  const position = frame.deliveries.get(target) ?? 0;
  if (take) frame.deliveries.set(target, position + 1);
  return {
    key: `${frame.frameId}:${position}`,
    at: frame.receivedAt,
    redelivered: frame.redelivered,
    ...(frame.seq ? { seq: frame.seq } : {}),
    position,
    ...(frame.connectionId ? { from: frame.connectionId } : {}),
  };
}

/**
 * A value the same on every delivery of the current frame and unguessable without `secret`
 * (HMAC-SHA-256 of the frame's id and `label`, base64url); undefined outside a frame. An answer
 * built from it is the same when a redelivery sends it again (a SCRAM server nonce: see
 * modules/rfc6120-sasl.ts).
 */
export function frameDerived(secret: string, label: string): string | undefined {
  const frame = frames.get();
  if (!frame) return undefined;
  return createHmac('sha256', secret).update(`${label}\n${frame.frameId}`).digest('base64url');
}

/**
 * A client's message stored offline leaves a record on the sender's connection row, written in
 * the storing transaction: `<frame id> <user>[ <resource it was held for>]`. A redelivery of the
 * frame (the transaction ran but answered with errors, or the invocation died after it) then
 * knows the message is stored, though the recipient may have come online and even been given the
 * stored copy by its flood since: routing it again would deliver it twice.
 */
export function offlineRecord(
  user: string,
  heldFor?: string,
): { connectionId: string; record: string } | undefined {
  const frame = frames.get();
  if (!frame?.connectionId) return undefined;
  return {
    connectionId: frame.connectionId,
    record: heldFor !== undefined ? `${frame.frameId} ${user} ${heldFor}` : `${frame.frameId} ${user}`,
  };
}

/**
 * What an earlier delivery of the current frame stored offline for `user`: `{}` when it stored
 * the message because nothing was available, `{ heldFor }` when behind the flood of that
 * resource (a name, which may hold spaces).
 */
export function storedOfflineBefore(user: string): { heldFor?: string } | undefined {
  const frame = frames.get();
  if (!frame?.storedOffline) return undefined;
  const [frameId, storedFor, ...resource] = frame.storedOffline.split(' ');
  if (frameId !== frame.frameId || storedFor !== user) return undefined;
  return resource.length > 0 ? { heldFor: resource.join(' ') } : {};
}

/** Whether the current frame was handled before (a redelivery, or a retry in place). */
export function frameRedelivered(): boolean {
  return frames.get()?.redelivered ?? false;
}

/** How long ago the current frame reached API Gateway (ms); undefined outside a frame. */
export function frameAge(now = Date.now()): number | undefined {
  const frame = frames.get();
  return frame ? now - frame.receivedAt : undefined;
}

/**
 * When the current frame reached the server (API Gateway's time), or now outside a frame. One
 * reading of the clock: `Date.now() - frameAge()` read it twice, a millisecond apart at times.
 */
export function frameTime(): number {
  const now = Date.now();
  return now - (frameAge(now) ?? 0);
}

/**
 * What is left of the invocation handling the current frame (ms), when the runtime says;
 * outside a frame, of the invocation `withTimeLeft` runs the work in (the sweeper's).
 */
export function frameTimeLeft(): number | undefined {
  const frame = frames.get();
  return frame ? frame.timeLeftMs?.() : invocations.get()?.();
}

/**
 * Runs work that is no frame's (the sweeper's deliveries and re-routes) under its invocation's
 * time left: what stops before a frame's invocation ends (a burst of XEP-0198 posts) stops
 * before this one's too.
 */
export function withTimeLeft<T>(timeLeftMs: () => number, work: () => Promise<T>): Promise<T> {
  return invocations.run(timeLeftMs, work);
}

/** Compares two SQS FIFO sequence numbers (decimal strings without leading zeros). */
export function sequenceAtMost(seq: string, mark: string): boolean {
  if (seq.length !== mark.length) return seq.length < mark.length;
  return seq <= mark;
}
