/**
 * The stream function: consumes the SQS FIFO queue that API Gateway fills with `$default`
 * frames and `$disconnect` events, grouped by connection, so each stream runs in order.
 */
import type { Context, SQSBatchResponse, SQSEvent, SQSRecord } from 'aws-lambda';
import { loadConfig } from '../shared/config.ts';
import { handleStreamEvent } from '../shared/core/stream.ts';
import { decodeQueueMessage, MalformedQueueMessageError } from '../shared/queue-message.ts';
import { createServer, type Server } from '../shared/server.ts';

function groupOf(record: SQSRecord): string {
  return record.attributes.MessageGroupId ?? record.messageId;
}

/**
 * Time kept in hand: a record is started only while at least this much of the invocation is
 * left. A timeout would redeliver the whole batch, other connections' finished records
 * included; reporting the records not started as failures redelivers only those.
 */
export const TIME_IN_HAND_MS = 5000;

export function createStreamHandler(server: Server) {
  return async (
    event: SQSEvent,
    context?: Pick<Context, 'getRemainingTimeInMillis'>,
  ): Promise<SQSBatchResponse> => {
    const failedGroups = new Set<string>();
    const batchItemFailures: SQSBatchResponse['batchItemFailures'] = [];
    for (const record of event.Records) {
      const group = groupOf(record);
      // FIFO: once a frame of a connection fails, its later frames must wait for the retry.
      if (failedGroups.has(group)) {
        batchItemFailures.push({ itemIdentifier: record.messageId });
        continue;
      }
      if (context && context.getRemainingTimeInMillis() < TIME_IN_HAND_MS) {
        server.log.warn('out of time: frame left for redelivery', { messageId: record.messageId, group });
        failedGroups.add(group);
        batchItemFailures.push({ itemIdentifier: record.messageId });
        continue;
      }
      try {
        await handleStreamEvent(server, decodeQueueMessage(record.body));
      } catch (error) {
        if (error instanceof MalformedQueueMessageError) {
          server.log.error('dropping malformed queue message', { messageId: record.messageId, error });
          continue;
        }
        server.log.warn('frame will be retried', { messageId: record.messageId, group, error });
        failedGroups.add(group);
        batchItemFailures.push({ itemIdentifier: record.messageId });
      }
    }
    return { batchItemFailures };
  };
}

let server: Server | undefined;

export const handler = (event: SQSEvent, context: Context): Promise<SQSBatchResponse> => {
  server ??= createServer({ config: loadConfig() });
  return createStreamHandler(server)(event, context);
};
