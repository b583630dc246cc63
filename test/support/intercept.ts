/**
 * Forcing a race or an AWS failure at one call of the real stack: a store method replaced until
 * the test puts it back, and the error DynamoDB's throttling reaches the server as once the SDK
 * has given up retrying.
 */

/** Replaces one method of a store until the returned function puts the original back. */
export function intercept<S extends object, K extends keyof S>(
  store: S,
  name: K,
  replacement: S[K],
): () => void {
  const original = store[name];
  store[name] = replacement;
  return () => {
    store[name] = original;
  };
}

/** A DynamoDB throttle that outlived the SDK's retries (transient: the server tries again). */
export function throttlingError(): Error {
  return Object.assign(new Error('Rate of requests exceeds the allowed throughput'), {
    name: 'ThrottlingException',
    $metadata: { httpStatusCode: 400 },
  });
}

/** A DynamoDB 500 that outlived the SDK's retries (transient; it may have come after the write). */
export function serverError(): Error {
  return Object.assign(new Error('Internal server error'), {
    name: 'InternalServerError',
    $metadata: { httpStatusCode: 500 },
  });
}
