/**
 * Fills a user's offline inbox on a local stack's DynamoDB fast, for the scale tests and the
 * bench: BatchWrite of 25 items, several in flight, then one atomic ADD to the counter. It
 * writes the items exactly as `shared/store/offline.ts` stores them (`m#<id>` with the TTL
 * attribute, the `count` item); the suites read them back through the store, so a layout
 * change fails them loudly.
 */
import { BatchWriteCommand, type DynamoDBDocumentClient, UpdateCommand } from '@aws-sdk/lib-dynamodb';
import type { OfflineMessage } from '../../shared/store/offline.ts';
import { newOfflineId } from '../../shared/store/offline.ts';
import { TTL_ATTRIBUTE } from '../../shared/tables.ts';

export interface SeedOptions {
  /** Sender full JID of message `i`; default `sender@localhost/r<i % 7>`. */
  from?: (i: number) => string;
  /** Body of message `i`; default `message <i>`. */
  body?: (i: number) => string;
  /** Arrival time of message 0; message i arrives i ms later (one id per millisecond). */
  firstStoredAt?: number;
  ttlSeconds?: number;
  /** BatchWrite requests in flight. */
  concurrency?: number;
}

export function escapeXml(text: string): string {
  return text
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/'/g, '&apos;')
    .replace(/"/g, '&quot;');
}

/** Stores `count` chat messages for `user`, oldest first; returns them in id order. */
export async function seedOffline(
  doc: DynamoDBDocumentClient,
  table: string,
  user: string,
  count: number,
  options: SeedOptions = {},
): Promise<OfflineMessage[]> {
  const from = options.from ?? ((i) => `sender@localhost/r${i % 7}`);
  const body = options.body ?? ((i) => `message ${i}`);
  const first = options.firstStoredAt ?? Date.now() - count - 1000;
  const ttlSeconds = options.ttlSeconds ?? 30 * 86400;
  const messages: OfflineMessage[] = [];
  for (let i = 0; i < count; i++) {
    const storedAt = first + i;
    const sender = from(i);
    messages.push({
      id: newOfflineId(storedAt),
      from: sender,
      storedAt,
      stanza: `<message from='${escapeXml(sender)}' to='${escapeXml(user)}' type='chat' id='seed-${i}' xmlns='jabber:client'><body>${escapeXml(body(i))}</body></message>`,
    });
  }
  const batches: OfflineMessage[][] = [];
  for (let i = 0; i < messages.length; i += 25) batches.push(messages.slice(i, i + 25));

  async function write(batch: OfflineMessage[]): Promise<void> {
    let requests = batch.map((m) => ({
      PutRequest: {
        Item: {
          pk: user,
          sk: `m#${m.id}`,
          from: m.from,
          storedAt: m.storedAt,
          stanza: m.stanza,
          [TTL_ATTRIBUTE]: Math.floor(m.storedAt / 1000) + ttlSeconds,
        },
      },
    }));
    for (let attempt = 0; requests.length > 0; attempt++) {
      if (attempt > 10) throw new Error('BatchWrite kept leaving items unprocessed');
      const { UnprocessedItems } = await doc.send(
        new BatchWriteCommand({ RequestItems: { [table]: requests } }),
      );
      requests = (UnprocessedItems?.[table] ?? []) as typeof requests;
      if (requests.length > 0) await new Promise((resolve) => setTimeout(resolve, 20 * 2 ** attempt));
    }
  }

  let next = 0;
  const workers = Array.from({ length: options.concurrency ?? 16 }, async () => {
    while (next < batches.length) {
      const batch = batches[next++] as OfflineMessage[];
      await write(batch);
    }
  });
  await Promise.all(workers);
  await doc.send(
    new UpdateCommand({
      TableName: table,
      Key: { pk: user, sk: 'count' },
      UpdateExpression: 'ADD n :count',
      ExpressionAttributeValues: { ':count': count },
    }),
  );
  return messages;
}
