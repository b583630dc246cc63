/**
 * Context that follows one piece of work through the calls it makes (the log's fields, the
 * frame being handled), without passing it around.
 *
 * Where many frames run at once in one process (the local runner, the tests), each async chain
 * needs its own: AsyncLocalStorage. A Lambda function handles one frame at a time (one
 * invocation per execution environment, the batch's records one after another), so there a
 * plain variable is enough — and cheaper: AsyncLocalStorage, once used, makes Node (before 24)
 * run a hook on every promise the process creates, and the AWS SDK creates dozens per request,
 * about a tenth of the CPU of each DynamoDB or API Gateway call. The functions' entry points
 * switch every store at once (`useSequentialContexts`, functions/telemetry.ts).
 */
import { AsyncLocalStorage } from 'node:async_hooks';

export interface ContextStore<T> {
  get(): T | undefined;
  run<R>(context: T, work: () => Promise<R>): Promise<R>;
}

function asyncStore<T>(): ContextStore<T> {
  const storage = new AsyncLocalStorage<T>();
  return { get: () => storage.getStore(), run: (context, work) => storage.run(context, work) };
}

/** One piece of work at a time: the context in a variable, restored when the work ends. */
function sequentialStore<T>(): ContextStore<T> {
  let current: T | undefined;
  return {
    get: () => current,
    async run(context, work) {
      const outer = current;
      current = context;
      try {
        return await work();
      } finally {
        current = outer;
      }
    },
  };
}

let sequential = false;
const switchers: Array<(sequential: boolean) => void> = [];

/** A store that follows the process's mode (AsyncLocalStorage unless `useSequentialContexts`). */
export function contextStore<T>(): ContextStore<T> {
  let store: ContextStore<T> = sequential ? sequentialStore() : asyncStore();
  switchers.push((on) => {
    store = on ? sequentialStore() : asyncStore();
  });
  return { get: () => store.get(), run: (context, work) => store.run(context, work) };
}

/** Whether the stores are variables (`useSequentialContexts`): one chain of work may change them at a time. */
export function sequentialContexts(): boolean {
  return sequential;
}

/** For a process that handles one frame at a time, as a Lambda function does (see above). */
export function useSequentialContexts(on = true): void {
  sequential = on;
  for (const switchTo of switchers) switchTo(on);
}
