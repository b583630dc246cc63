/**
 * Whether a failure is worth retrying the whole frame (it goes back to the FIFO queue, in
 * order): the stores and the outbound port each know their own service's transient errors.
 */
import { isTransientPostError } from '../outbound.ts';
import { isTransientStoreError } from '../store/dynamo.ts';

export function isTransient(error: unknown): boolean {
  return isTransientStoreError(error) || isTransientPostError(error);
}
