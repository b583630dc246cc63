/**
 * Per-connection rate limits, like Prosody's mod_limits: one token bucket for frames and one
 * for bytes, refilled at the time each frame reached API Gateway (so a backlog in the queue is
 * judged by when the client sent it, not when it is processed). Past either bucket the stream
 * ends with `policy-violation`: a frame cannot be delayed in a FIFO queue without holding the
 * whole connection for a visibility timeout, and ending the stream stops the cost at once.
 *
 * Cost: a calm connection (a bucket more than half full) costs no DynamoDB write. The bucket is
 * kept in the Lambda instance's memory and written to the connection row only while the
 * connection is stressed (below half of either burst), so any instance that picks up a busy
 * connection's next batch sees where it stands.
 */
import type { RateBucket } from '../store/sessions.ts';

export interface RateLimits {
  framesPerSecond: number;
  frameBurst: number;
  bytesPerSecond: number;
  byteBurst: number;
}

export interface RateDecision {
  allowed: boolean;
  /** The bucket to keep in the connection row: a bucket while stressed, undefined when calm. */
  persist: RateBucket | undefined;
}

/** Connections remembered per instance; the least recently seen are forgotten first. */
const TRACKED = 10_000;

export class RateLimiter {
  private readonly recent = new Map<string, RateBucket>();

  constructor(private readonly limits: RateLimits) {}

  /** Charges one frame of `bytes` that arrived at `at` (epoch ms) against the connection's buckets. */
  admit(connectionId: string, stored: RateBucket | undefined, bytes: number, at: number): RateDecision {
    const { framesPerSecond, frameBurst, bytesPerSecond, byteBurst } = this.limits;
    const remembered = this.recent.get(connectionId);
    const start =
      [stored, remembered].filter((b): b is RateBucket => b !== undefined).sort((a, b) => b.at - a.at)[0] ??
      ({ frames: frameBurst, bytes: byteBurst, at } satisfies RateBucket);
    const elapsed = Math.max(0, at - start.at) / 1000;
    const refilled: RateBucket = {
      frames: Math.min(frameBurst, start.frames + elapsed * framesPerSecond),
      bytes: Math.min(byteBurst, start.bytes + elapsed * bytesPerSecond),
      at: Math.max(at, start.at),
    };
    const allowed = refilled.frames >= 1 && refilled.bytes >= bytes;
    // A refused frame is not charged: what is left stays for the next one.
    const bucket = allowed
      ? { ...refilled, frames: refilled.frames - 1, bytes: refilled.bytes - bytes }
      : refilled;
    this.recent.delete(connectionId);
    this.recent.set(connectionId, bucket);
    if (this.recent.size > TRACKED) this.recent.delete(this.recent.keys().next().value as string);
    const stressed = bucket.frames < frameBurst / 2 || bucket.bytes < byteBurst / 2;
    return { allowed, persist: stressed ? bucket : undefined };
  }

  forget(connectionId: string): void {
    this.recent.delete(connectionId);
  }
}
