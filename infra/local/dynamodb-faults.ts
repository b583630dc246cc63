/**
 * DynamoDB faults for the local stack, injected into the server's document client as AWS SDK
 * v3 middleware.
 *
 * The middleware sits in the `deserialize` step below the SDK's deserializer and inside its
 * retry loop, where the HTTP response arrives. A fault replaces that response with the one
 * DynamoDB sends for the error (status, `x-amzn-RequestId`, the JSON body with `__type`), so
 * the SDK itself builds the exception: the real class from `@aws-sdk/client-dynamodb`, with the
 * `$metadata`, `$fault` and (absent) `$retryable` a real one has, retried or not by the SDK's
 * own rules (`maxAttempts` 4 in shared/store/dynamo.ts), exactly as on AWS.
 *
 * A fault either replaces the request (the operation never ran) or, for
 * `serverErrorAfterWrite`, follows it: DynamoDB executed the request but the caller sees an
 * InternalServerError, and the SDK's retry sends it again. ConditionalCheckFailedException is
 * never injected: it is an answer, not a fault, and only DynamoDB can give it truthfully.
 */
import { randomBytes } from 'node:crypto';
import type { DynamoDBDocumentClient } from '@aws-sdk/lib-dynamodb';
import { type DynamoDbFaultRates, type FaultCounts, faultStream, pickFault, type Random } from './faults.ts';

type DynamoDbFault = 'throttle' | 'transactionConflict' | 'serverError' | 'serverErrorAfterWrite';

/** What DynamoDB answers for each fault: status and body (the SDK reads `__type`). */
interface FaultResponse {
  statusCode: number;
  body: Record<string, unknown>;
}

const ERROR_TYPE_PREFIX = 'com.amazonaws.dynamodb.v20120810#';
const TRANSACTIONS = new Set(['TransactWriteItems', 'TransactGetItems']);
const SINGLE_ITEM_WRITES = new Set(['PutItem', 'UpdateItem', 'DeleteItem']);

/** A response shaped like the SDK's `HttpResponse` (it checks the shape, not the class). */
interface RawResponse {
  statusCode: number;
  reason?: string;
  headers: Record<string, string>;
  body: unknown;
}

function faultResponse(
  fault: DynamoDbFault,
  operation: string,
  within: number,
  input: unknown,
): FaultResponse | undefined {
  switch (fault) {
    case 'throttle':
      return within < 0.5
        ? {
            statusCode: 400,
            body: {
              __type: `${ERROR_TYPE_PREFIX}ThrottlingException`,
              message: 'Throughput exceeds the current capacity for one or more global secondary indexes.',
            },
          }
        : {
            statusCode: 400,
            body: {
              __type: `${ERROR_TYPE_PREFIX}ProvisionedThroughputExceededException`,
              message:
                'The level of configured provisioned throughput for the table was exceeded. ' +
                'Consider increasing your provisioning level with the UpdateTable API.',
            },
          };
    case 'transactionConflict': {
      if (TRANSACTIONS.has(operation)) {
        const items = (input as { TransactItems?: unknown[] }).TransactItems?.length ?? 1;
        const conflicting = Math.min(Math.floor(within * items), items - 1);
        const reasons = Array.from({ length: items }, (_, index) =>
          index === conflicting
            ? { Code: 'TransactionConflict', Message: 'Transaction is ongoing for the item' }
            : { Code: 'None' },
        );
        return {
          statusCode: 400,
          body: {
            __type: `${ERROR_TYPE_PREFIX}TransactionCanceledException`,
            Message: `Transaction cancelled, please refer cancellation reasons for specific reasons [${reasons
              .map((reason) => reason.Code)
              .join(', ')}]`,
            CancellationReasons: reasons,
          },
        };
      }
      if (SINGLE_ITEM_WRITES.has(operation)) {
        return {
          statusCode: 400,
          body: {
            __type: `${ERROR_TYPE_PREFIX}TransactionConflictException`,
            message: 'Operation was rejected because there is an ongoing transaction for the item.',
          },
        };
      }
      return undefined;
    }
    case 'serverError':
    case 'serverErrorAfterWrite':
      return {
        statusCode: 500,
        body: { __type: `${ERROR_TYPE_PREFIX}InternalServerError`, message: 'Internal server error' },
      };
  }
}

function rawResponse({ statusCode, body }: FaultResponse): RawResponse {
  const payload = Buffer.from(JSON.stringify(body));
  return {
    statusCode,
    reason: statusCode === 500 ? 'Internal Server Error' : 'Bad Request',
    headers: {
      'x-amzn-requestid': requestId(),
      'content-type': 'application/x-amz-json-1.0',
      'content-length': String(payload.length),
    },
    body: new Uint8Array(payload),
  };
}

const REQUEST_ID_ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789';

/** DynamoDB's request ids are 52 characters of A-Z and 0-9. */
function requestId(): string {
  return [...randomBytes(52)].map((byte) => REQUEST_ID_ALPHABET[byte % REQUEST_ID_ALPHABET.length]).join('');
}

/** The answer of the request that really ran is discarded; read it so its socket is reused. */
function discard(response: unknown): void {
  const body = (response as { body?: { resume?: () => void } } | undefined)?.body;
  body?.resume?.();
}

export interface DynamoDbFaultsHandle {
  /** Removes the middleware. */
  remove(): void;
}

/**
 * Adds fault injection to `doc` (and so to the DynamoDBClient it wraps: they share one
 * middleware stack). Faults are counted into `counts` as `dynamodb.<fault>`.
 */
export function injectDynamoDbFaults(
  doc: DynamoDBDocumentClient,
  options: { seed: number; rates: DynamoDbFaultRates; counts: FaultCounts; log?: (line: string) => void },
): DynamoDbFaultsHandle {
  const random: Random = faultStream(options.seed, 'dynamodb');
  const { rates } = options;
  const name = 'nimbusDynamoDbFaults';
  /**
   * With `persistent`, the fault a request drew, kept for its retries: keyed by the request's
   * input, which every attempt shares (the handler context may be shared by all requests of a
   * command class, as with the SDK's `cacheMiddleware`).
   */
  const drawn = new WeakMap<object, { fault: DynamoDbFault; within: number } | null>();

  doc.middlewareStack.add(
    (next, context) => async (args) => {
      const operation = (context.commandName ?? 'Unknown').replace(/Command$/, '');
      let pick = rates.persistent ? drawn.get(args.input as object) : undefined;
      if (pick === undefined) {
        pick =
          pickFault<DynamoDbFault>(random, [
            ['throttle', rates.throttle],
            ['transactionConflict', rates.transactionConflict],
            ['serverError', rates.serverError],
            ['serverErrorAfterWrite', rates.serverErrorAfterWrite],
          ]) ?? null;
        if (rates.persistent) drawn.set(args.input as object, pick);
      }
      const response = pick && faultResponse(pick.fault, operation, pick.within, args.input);
      if (!pick || !response) return next(args);
      if (pick.fault === 'serverErrorAfterWrite') {
        const executed = await next(args);
        discard(executed.response);
      }
      options.counts.add(`dynamodb.${pick.fault}`);
      options.log?.(`[dynamodb] fault: ${operation}: ${pick.fault}`);
      return { response: rawResponse(response), output: undefined as never };
    },
    // Inside the retry loop (finalizeRequest) and below the deserializer ('normal' priority).
    { step: 'deserialize', priority: 'low', name, override: true },
  );
  return { remove: () => doc.middlewareStack.remove(name) };
}
