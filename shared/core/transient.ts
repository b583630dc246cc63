/**
 * Whether a failure is worth retrying the whole frame (it goes back to the FIFO queue, in
 * order): the stores and the outbound port each know their own service's transient errors.
 */
import { isTransientPostError } from '../outbound.ts';
import { isTransientStoreError } from '../store/dynamo.ts';

export function isTransient(error: unknown): boolean {
  return error instanceof RetryLaterError || isTransientStoreError(error) || isTransientPostError(error);
}

/**
 * The frame must wait longer than its invocation has left (e.g. a late XEP-0198 switch): it is
 * handed back to the queue, which brings it again soon, and its next attempt waits the rest.
 */
export class RetryLaterError extends Error {
  constructor(reason: string) {
    super(reason);
    this.name = 'RetryLaterError';
  }
}

/**
 * Runs `work`, trying it again (up to `attempts` in all, 100 ms, 200 ms, … apart) while it fails
 * transiently: for a write that ends work already done, whose failure would have the frame
 * redelivered and that work repeated. The write must be the same each time.
 */
export async function withTransientRetries<T>(attempts: number, work: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await work();
    } catch (error) {
      if (attempt >= attempts || !isTransient(error)) throw error;
      await new Promise((resolve) => setTimeout(resolve, 100 * attempt));
    }
  }
}
