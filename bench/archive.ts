/**
 * XEP-0136 at scale: what archiving a message costs (write units, latency) and what a list page
 * and a retrieve page cost on 100,000 archived messages — page 1 against page k, backwards, and
 * by index — against the local stack (real handlers, gateway emulator, DynamoDB Local).
 *
 *   npm run bench:archive [-- --messages 100000 --collections 10000 --repeat 20]
 *
 * One user holds one collection of `messages` messages (retrieve) and `collections` collections
 * of `messages / collections` messages each (list): 2 × `messages` message items, seeded with
 * BatchWrite in the store's item format. Prints a table and writes `bench/results/archive.json`.
 * Units are what DynamoDB Local reports (`ReturnConsumedCapacity: 'TOTAL'`, indexes included),
 * with the stream's own session reads and writes around each frame, as on AWS.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { BatchWriteCommand, type DynamoDBDocumentClient } from '@aws-sdk/lib-dynamodb';
import { createPrefixedTables } from '../infra/local/create-tables.ts';
import { findFreePort, startDynamoDbLocal } from '../infra/local/dynamodb-local.ts';
import { RawClient } from '../infra/local/raw-client.ts';
import { startLocalStack } from '../infra/local/stack.ts';
import { type Config, loadConfig } from '../shared/config.ts';
import { createLogger } from '../shared/log.ts';
import { deriveScramCredentials } from '../shared/sasl/scram.ts';
import { changeKeyOf, newArchiveId, timeKey } from '../shared/store/archive.ts';
import {
  createDocumentClient,
  DynamoMeter,
  dynamoMeter,
  type MeterSnapshot,
} from '../shared/store/dynamo.ts';
import { type Measurement, printMeasurements } from './measurement.ts';

process.env.NIMBUS_METER = '1';
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

const ARCHIVE = 'http://jabber.org/protocol/archive';
const RSM = 'http://jabber.org/protocol/rsm';
const RESULT_FILE = new URL('./results/archive.json', import.meta.url);

const { values: args } = parseArgs({
  options: {
    messages: { type: 'string', default: '100000' },
    collections: { type: 'string', default: '10000' },
    repeat: { type: 'string', default: '20' },
  },
});
const messages = Number(args.messages);
const collections = Number(args.collections);
const repeat = Number(args.repeat);
if (![messages, collections, repeat].every((n) => Number.isInteger(n) && n > 0) || collections > messages) {
  throw new Error('--messages, --collections and --repeat are positive integers, collections ≤ messages');
}

const OWNER = 'reader@localhost';
const BIG_WITH = 'juliet@localhost/chamber';
const BIG_START = Date.UTC(2020, 0, 1);

/** Items of one collection as the store writes them: its header and `count` messages. */
function collectionItems(withJid: string, start: number, count: number): Record<string, unknown>[] {
  const cid = `${timeKey(start).replace(/[-:.]/g, '')}-${randomBytes(6).toString('hex')}`;
  const [bare] = withJid.split('/') as [string];
  const domain = bare.split('@')[1] as string;
  const items: Record<string, unknown>[] = [
    {
      pk: OWNER,
      sk: `c#${timeKey(start)}/${withJid}`,
      with: withJid,
      start,
      cid,
      plain: true,
      wFull: `${OWNER}/${withJid}`,
      wBare: `${OWNER}/${bare}`,
      wDomain: `${OWNER}/${domain}`,
      changeOwner: OWNER,
      changeKey: changeKeyOf(Date.now() - 60_000, '000000001'),
    },
  ];
  for (let seq = 0; seq < count; seq++) {
    const at = start + seq * 1000;
    items.push({
      pk: `${OWNER}/${cid}`,
      sk: `m#${seq.toString().padStart(10, '0')}`,
      seq,
      id: newArchiveId(at),
      owner: OWNER,
      kind: seq % 2 ? 'to' : 'from',
      at,
      prevAt: seq === 0 ? undefined : at - 1000,
      xml: `<${seq % 2 ? 'to' : 'from'}><body>message ${seq} of a long conversation, about sixty bytes</body></${seq % 2 ? 'to' : 'from'}>`,
    });
  }
  return items;
}

async function batchWrite(
  doc: DynamoDBDocumentClient,
  table: string,
  items: Record<string, unknown>[],
): Promise<void> {
  const batches: Record<string, unknown>[][] = [];
  for (let i = 0; i < items.length; i += 25) batches.push(items.slice(i, i + 25));
  let next = 0;
  const workers = Array.from({ length: 16 }, async () => {
    while (next < batches.length) {
      let requests = (batches[next++] as Record<string, unknown>[]).map((Item) => ({ PutRequest: { Item } }));
      for (let attempt = 0; requests.length > 0; attempt++) {
        if (attempt > 10) throw new Error('BatchWrite kept leaving items unprocessed');
        const { UnprocessedItems } = await doc.send(
          new BatchWriteCommand({ RequestItems: { [table]: requests } }),
        );
        requests = (UnprocessedItems?.[table] ?? []) as typeof requests;
        if (requests.length > 0) await new Promise((resolve) => setTimeout(resolve, 20 * 2 ** attempt));
      }
    }
  });
  await Promise.all(workers);
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length - 1) * p))] as number;
}

async function main(): Promise<void> {
  const database = await startDynamoDbLocal({ port: await findFreePort() });
  const prefix = `bench${Date.now().toString(36)}`;
  const tables = await createPrefixedTables(database.endpoint, loadConfig(process.env).region, prefix);
  const config: Config = {
    ...loadConfig({ ...process.env, SCRAM_ITERATIONS: '4096' }),
    tables,
    dynamodbEndpoint: database.endpoint,
  };
  const stack = await startLocalStack({ config, port: 0, log: createLogger('warn') });
  const seeder = createDocumentClient({
    endpoint: database.endpoint,
    region: config.region,
    meter: new DynamoMeter(),
  });
  const results: Measurement[] = [];
  try {
    for (const user of [OWNER, 'sender@localhost', 'receiver@localhost']) {
      await stack.server.users.create(user, {
        sha1: await deriveScramCredentials('secret', 'sha1', 4096),
        sha256: await deriveScramCredentials('secret', 'sha256', 4096),
      });
    }
    const seedStarted = Date.now();
    await batchWrite(seeder, config.tables.archive, collectionItems(BIG_WITH, BIG_START, messages));
    const perCollection = Math.floor(messages / collections);
    const listStarts: number[] = [];
    const headers: Record<string, unknown>[] = [];
    for (let i = 0; i < collections; i++) {
      const start = Date.UTC(2021, 0, 1) + i * 3_600_000;
      listStarts.push(start);
      headers.push(...collectionItems(`contact${i % 500}@localhost/r`, start, perCollection));
    }
    await batchWrite(seeder, config.tables.archive, headers);
    process.stdout.write(
      `seeded ${messages} messages in one collection and ${collections} collections of ${perCollection} in ${Date.now() - seedStarted} ms\n`,
    );

    const connect = async (local: string, resource: string) => {
      const raw = await RawClient.connect(stack.url);
      await raw.login(local, 'secret', resource);
      return raw;
    };
    const reader = await connect('reader', 'bench');
    let ids = 0;
    const ask = async (raw: RawClient, type: 'get' | 'set', payload: string) => {
      const id = `b${++ids}`;
      raw.send(`<iq type='${type}' id='${id}'>${payload}</iq>`);
      for (;;) {
        const el = await raw.next(120_000);
        if (el.name === 'iq' && el.attrs.id === id) {
          if (el.attrs.type !== 'result') throw new Error(`${payload} failed: ${el.toString()}`);
          return el;
        }
      }
    };

    async function measure(
      operation: string,
      runs: number,
      body: (run: number) => Promise<unknown>,
    ): Promise<void> {
      const times: number[] = [];
      dynamoMeter.reset();
      const posts = stack.server.outbound.counters.posts;
      const bytes = stack.server.outbound.counters.bytes;
      for (let run = 0; run < runs; run++) {
        const started = performance.now();
        await body(run);
        times.push(performance.now() - started);
      }
      const meter = dynamoMeter.snapshot();
      times.sort((a, b) => a - b);
      const perRun: MeterSnapshot['operations'] = {};
      for (const [name, usage] of Object.entries(meter.operations)) {
        perRun[name] = {
          requests: usage.requests / runs,
          failures: usage.failures / runs,
          reported: usage.reported / runs,
          readUnits: usage.readUnits / runs,
          writeUnits: usage.writeUnits / runs,
        };
      }
      results.push({
        operation,
        runs,
        medianMs: percentile(times, 0.5),
        p95Ms: percentile(times, 0.95),
        dynamoRequests: meter.requests / runs,
        readUnits: meter.readUnits / runs,
        writeUnits: meter.writeUnits / runs,
        frames: (stack.server.outbound.counters.posts - posts) / runs,
        bytes: (stack.server.outbound.counters.bytes - bytes) / runs,
        dynamodb: perRun,
      });
    }

    // --- Archiving one message: the same chat message with archiving off, then on for both sides.
    const sender = await connect('sender', 'a');
    const receiver = await connect('receiver', 'b');
    receiver.send('<presence/>');
    await receiver.until((el) => el.name === 'presence');
    const send = async (run: number, label: string) => {
      sender.send(
        `<message type='chat' to='receiver@localhost/b' id='m${label}${run}'><body>bench message ${label} ${run}</body></message>`,
      );
      await receiver.until((el) => el.name === 'message' && el.attrs.id === `m${label}${run}`);
      // The sender's frame (routing and both sides' archiving) is over when its next iq is answered.
      await ask(sender, 'get', "<ping xmlns='urn:xmpp:ping'/>");
    };
    await measure('chat message + ping, archiving off', repeat, (run) => send(run, 'off'));
    for (const raw of [sender, receiver]) {
      await ask(raw, 'set', `<auto xmlns='${ARCHIVE}' save='true'/>`);
      await ask(raw, 'set', `<pref xmlns='${ARCHIVE}'><default save='body' otr='allow'/></pref>`);
    }
    await send(0, 'warm');
    await measure('chat message + ping, archived by both sides', repeat, (run) => send(run, 'on'));

    // --- A retrieve page on the 100,000-message collection: page 1, page k, last, by index.
    const retrieve = (set: string) =>
      ask(
        reader,
        'get',
        `<retrieve xmlns='${ARCHIVE}' with='${BIG_WITH}' start='${new Date(BIG_START).toISOString()}'><set xmlns='${RSM}'>${set}</set></retrieve>`,
      );
    await measure('retrieve page 1 (max 100)', repeat, () => retrieve('<max>100</max>'));
    await measure(`retrieve page k (max 100, after ~${Math.floor(messages / 2)})`, repeat, (run) =>
      retrieve(`<max>100</max><after>${(Math.floor(messages / 2) + run * 100) % messages}</after>`),
    );
    await measure('retrieve last page (max 100, before empty)', repeat, () =>
      retrieve('<max>100</max><before/>'),
    );
    await measure(`retrieve by index ${Math.floor(messages * 0.9)} (max 100)`, repeat, () =>
      retrieve(`<max>100</max><index>${Math.floor(messages * 0.9)}</index>`),
    );

    // --- A list page over the collections: page 1, page k (by its own UIDs), last, by index.
    const list = (set: string) =>
      ask(
        reader,
        'get',
        `<list xmlns='${ARCHIVE}' start='2021-01-01T00:00:00Z'><set xmlns='${RSM}'>${set}</set></list>`,
      );
    const first = await list('<max>100</max>');
    const uidAt = (i: number) => `${timeKey(listStarts[i] as number)}/contact${i % 500}@localhost/r`;
    expect(first.getChild('list')?.getChildren('store').length === 100, 'list page 1 holds 100');
    await measure(`list page 1 (max 100) of ${collections}`, repeat, () => list('<max>100</max>'));
    await measure(`list page k (max 100, after #${Math.floor(collections / 2)})`, repeat, (run) =>
      list(`<max>100</max><after>${uidAt((Math.floor(collections / 2) + run * 100) % collections)}</after>`),
    );
    await measure('list last page (before empty)', repeat, () => list('<max>100</max><before/>'));
    await measure(`list by index ${Math.floor(collections * 0.9)} (max 100)`, repeat, () =>
      list(`<max>100</max><index>${Math.floor(collections * 0.9)}</index>`),
    );
    await measure('list with one bare JID (max 100)', repeat, () =>
      ask(
        reader,
        'get',
        `<list xmlns='${ARCHIVE}' with='contact7@localhost'><set xmlns='${RSM}'><max>100</max></set></list>`,
      ),
    );
    for (const raw of [reader, sender, receiver]) raw.close();
  } finally {
    seeder.destroy();
    await stack.close();
    await database.stop();
  }

  printMeasurements(results);
  await mkdir(new URL('./results/', import.meta.url), { recursive: true });
  await writeFile(
    RESULT_FILE,
    `${JSON.stringify({ at: new Date().toISOString(), messages, collections, repeat, node: process.version, results }, null, 2)}\n`,
  );
  process.stdout.write(`\nwritten to ${RESULT_FILE.pathname}\n`);
}

function expect(condition: boolean, what: string): void {
  if (!condition) throw new Error(`bench precondition failed: ${what}`);
}

main().catch((error) => {
  process.stderr.write(`${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exit(1);
});
