/**
 * Fault injection for the local stack: which faults, at what rate, drawn from a seeded
 * deterministic schedule so that a failing run can be replayed with its seed.
 *
 * Each kind of fault source (the queue, the `@connections` endpoint, DynamoDB) draws from its
 * own stream derived from the seed, so the faults one source injects do not shift when another
 * source is called more or less often. Within a source, the same seed and the same order of
 * calls give the same faults; concurrent connections can still interleave their calls
 * differently from run to run.
 */

export interface FaultOptions {
  /** Seed of the schedule (any integer; it is taken modulo 2^32). */
  seed: number;
  /**
   * Per record the stream function handled successfully: the event source's delete of it is
   * lost, so the same message (same `messageId`, higher `ApproximateReceiveCount`) is delivered
   * again after the visibility timeout, before the rest of its connection's frames.
   */
  duplicate?: number;
  /**
   * Per invocation of the stream function: it dies after k of its n records (k drawn in 1..n;
   * k = n is a function that did everything but never returned). The records before the death
   * have had their effects; the whole batch is delivered again after the visibility timeout.
   */
  dieMidBatch?: number;
  /**
   * Per socket that closes: its `$disconnect` never reaches the queue (API Gateway delivers
   * `$disconnect` on a best-effort basis).
   */
  lostDisconnect?: number;
  /** PostToConnection faults of the `@connections` endpoint, per request. */
  post?: PostFaultRates;
  /** DynamoDB faults, per request the server's document client sends (see `dynamodb-faults.ts`). */
  dynamodb?: DynamoDbFaultRates;
}

export interface PostFaultRates {
  /** 410 GoneException; the socket is then dropped (the client sees 1006) and `$disconnect` follows. */
  gone?: number;
  /** 429 LimitExceededException; the frame is not delivered. */
  throttle?: number;
  /** 500 InternalServerErrorException; the frame is not delivered. */
  serverError?: number;
  /** The frame is delivered, but no answer comes: the HTTP connection drops after `timeoutMs`. */
  timeout?: number;
  /** The frame is delivered and answered only after `slowMs`. */
  slow?: number;
  /** Default 1,000 ms. */
  timeoutMs?: number;
  /** Default 1,000 ms. */
  slowMs?: number;
}

export interface DynamoDbFaultRates {
  /** ThrottlingException or ProvisionedThroughputExceededException (400), the request not executed. */
  throttle?: number;
  /**
   * TransactWriteItems/TransactGetItems: TransactionCanceledException with one item's reason
   * `TransactionConflict`; PutItem/UpdateItem/DeleteItem: TransactionConflictException (400);
   * the request not executed. Other operations are never conflicted.
   */
  transactionConflict?: number;
  /** InternalServerError (500), the request not executed. */
  serverError?: number;
  /** InternalServerError (500) after DynamoDB executed the request: the write happened. */
  serverErrorAfterWrite?: number;
  /**
   * When true, a request that draws a fault fails on every retry the SDK makes of it, so the
   * error outlives the SDK's retries and reaches the server (as a throttle that lasts longer
   * than the SDK's backoff). By default each attempt draws anew, as on AWS.
   */
  persistent?: boolean;
}

/** The rates of one source share one draw per request, so they must add up to at most 1. */
const RATE_KEYS = {
  post: ['gone', 'throttle', 'serverError', 'timeout', 'slow'],
  dynamodb: ['throttle', 'transactionConflict', 'serverError', 'serverErrorAfterWrite'],
} as const;

/** A source of uniform numbers in [0, 1). */
export type Random = () => number;

/** mulberry32: a 32-bit PRNG, small and good enough to schedule faults. */
export function mulberry32(seed: number): Random {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The stream of one fault source: the seed mixed with the source's name (FNV-1a). */
export function faultStream(seed: number, source: string): Random {
  let hash = 0x811c9dc5 ^ (seed >>> 0);
  for (const char of source) hash = Math.imul(hash ^ (char.codePointAt(0) ?? 0), 0x01000193);
  return mulberry32(hash);
}

/**
 * Picks at most one of several faults with one draw: `rates` are consecutive slices of [0, 1).
 * Answers the fault and where in its slice the draw fell (in [0, 1)), for a second choice
 * within the fault without another draw; or undefined for no fault.
 */
export function pickFault<K extends string>(
  random: Random,
  rates: ReadonlyArray<readonly [K, number | undefined]>,
): { fault: K; within: number } | undefined {
  const draw = random();
  let low = 0;
  for (const [fault, rate] of rates) {
    if (!rate) continue;
    if (draw < low + rate) return { fault, within: (draw - low) / rate };
    low += rate;
  }
  return undefined;
}

/** Counts of the faults injected, by name (`post.gone`, `dynamodb.throttle`, `duplicate`, …). */
export class FaultCounts {
  private readonly counts = new Map<string, number>();

  add(name: string): void {
    this.counts.set(name, (this.counts.get(name) ?? 0) + 1);
  }

  get(name: string): number {
    return this.counts.get(name) ?? 0;
  }

  snapshot(): Record<string, number> {
    return Object.fromEntries([...this.counts].sort(([a], [b]) => a.localeCompare(b)));
  }
}

export class FaultOptionsError extends Error {}

function checkRate(where: string, value: unknown): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || !(value >= 0 && value <= 1)) {
    throw new FaultOptionsError(`${where} must be a rate between 0 and 1, got ${JSON.stringify(value)}`);
  }
  return value;
}

function checkMs(where: string, value: unknown): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0) {
    throw new FaultOptionsError(
      `${where} must be a whole number of milliseconds, got ${JSON.stringify(value)}`,
    );
  }
  return value;
}

function checkKeys(where: string, value: object, allowed: readonly string[]): void {
  for (const key of Object.keys(value)) {
    if (!allowed.includes(key)) {
      throw new FaultOptionsError(`unknown fault option ${where}${key}; known: ${allowed.join(', ')}`);
    }
  }
}

function checkSum(where: string, rates: Array<number | undefined>): void {
  const sum = rates.reduce<number>((total, rate) => total + (rate ?? 0), 0);
  if (sum > 1 + 1e-9) throw new FaultOptionsError(`the rates of ${where} add up to ${sum}, more than 1`);
}

/** Validates fault options (from code or from `NIMBUS_FAULTS`); throws FaultOptionsError. */
export function checkFaultOptions(input: unknown): FaultOptions {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) {
    throw new FaultOptionsError('fault options must be an object');
  }
  const raw = input as Record<string, unknown>;
  checkKeys('', raw, ['seed', 'duplicate', 'dieMidBatch', 'lostDisconnect', 'post', 'dynamodb']);
  if (typeof raw.seed !== 'number' || !Number.isInteger(raw.seed)) {
    throw new FaultOptionsError(`seed must be an integer, got ${JSON.stringify(raw.seed)}`);
  }
  const options: FaultOptions = {
    seed: raw.seed,
    duplicate: checkRate('duplicate', raw.duplicate),
    dieMidBatch: checkRate('dieMidBatch', raw.dieMidBatch),
    lostDisconnect: checkRate('lostDisconnect', raw.lostDisconnect),
  };
  if (raw.post !== undefined) {
    const post = raw.post as Record<string, unknown>;
    if (typeof post !== 'object' || post === null) throw new FaultOptionsError('post must be an object');
    checkKeys('post.', post, [...RATE_KEYS.post, 'timeoutMs', 'slowMs']);
    options.post = {
      gone: checkRate('post.gone', post.gone),
      throttle: checkRate('post.throttle', post.throttle),
      serverError: checkRate('post.serverError', post.serverError),
      timeout: checkRate('post.timeout', post.timeout),
      slow: checkRate('post.slow', post.slow),
      timeoutMs: checkMs('post.timeoutMs', post.timeoutMs),
      slowMs: checkMs('post.slowMs', post.slowMs),
    };
    checkSum(
      'post',
      RATE_KEYS.post.map((key) => options.post?.[key]),
    );
  }
  if (raw.dynamodb !== undefined) {
    const dynamodb = raw.dynamodb as Record<string, unknown>;
    if (typeof dynamodb !== 'object' || dynamodb === null)
      throw new FaultOptionsError('dynamodb must be an object');
    checkKeys('dynamodb.', dynamodb, [...RATE_KEYS.dynamodb, 'persistent']);
    if (dynamodb.persistent !== undefined && typeof dynamodb.persistent !== 'boolean') {
      throw new FaultOptionsError('dynamodb.persistent must be true or false');
    }
    options.dynamodb = {
      throttle: checkRate('dynamodb.throttle', dynamodb.throttle),
      transactionConflict: checkRate('dynamodb.transactionConflict', dynamodb.transactionConflict),
      serverError: checkRate('dynamodb.serverError', dynamodb.serverError),
      serverErrorAfterWrite: checkRate('dynamodb.serverErrorAfterWrite', dynamodb.serverErrorAfterWrite),
      persistent: dynamodb.persistent as boolean | undefined,
    };
    checkSum(
      'dynamodb',
      RATE_KEYS.dynamodb.map((key) => options.dynamodb?.[key]),
    );
  }
  return options;
}

/** `NIMBUS_FAULTS` as JSON, e.g. `{"seed":1,"duplicate":0.01,"post":{"gone":0.01}}`. */
export function parseFaultOptions(json: string): FaultOptions {
  let parsed: unknown;
  try {
    parsed = JSON.parse(json);
  } catch (error) {
    throw new FaultOptionsError(`NIMBUS_FAULTS is not JSON: ${(error as Error).message}`);
  }
  return checkFaultOptions(parsed);
}
