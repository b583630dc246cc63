/**
 * XEP-0013 over a large inbox: time, DynamoDB requests and capacity units, and API Gateway
 * messages for count, headers, view, remove and fetch, against the local stack (the real
 * handlers behind the gateway emulator, DynamoDB Local) with one raw client.
 *
 *   npx tsx bench/offline.ts [--size 10000] [--repeat 20] [--purge] [--flood 200]
 *
 * Also a XEP-0160 flood with XEP-0198 (`--flood` messages stored for another user, who logs in,
 * enables stream management, sends presence and answers every `<r/>`): what the whole flood
 * costs, until storage is empty.
 *
 * Prints a table and writes `bench/results/offline.json`. Capacity units are what DynamoDB
 * Local reports with `ReturnConsumedCapacity: 'TOTAL'` (the project's meter in
 * `shared/store/dynamo.ts`); they include the stream's own session reads and writes around
 * each frame, as on AWS.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { parse } from 'ltx';
import { createPrefixedTables } from '../infra/local/create-tables.ts';
import { findFreePort, startDynamoDbLocal } from '../infra/local/dynamodb-local.ts';
import { seedOffline } from '../infra/local/offline-seed.ts';
import { RawClient } from '../infra/local/raw-client.ts';
import { startLocalStack } from '../infra/local/stack.ts';
import { type Config, loadConfig } from '../shared/config.ts';
import { createLogger } from '../shared/log.ts';
import { deriveScramCredentials } from '../shared/sasl/scram.ts';
import {
  createDocumentClient,
  DynamoMeter,
  dynamoMeter,
  type MeterSnapshot,
} from '../shared/store/dynamo.ts';
import { type Measurement, printMeasurements } from './measurement.ts';

process.env.NIMBUS_METER = '1';
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

const OFFLINE = 'http://jabber.org/protocol/offline';
const DISCO_INFO = 'http://jabber.org/protocol/disco#info';
const DISCO_ITEMS = 'http://jabber.org/protocol/disco#items';
const RSM = 'http://jabber.org/protocol/rsm';
const SM3 = 'urn:xmpp:sm:3';
const RESULT_FILE = new URL('./results/offline.json', import.meta.url);

const { values: args } = parseArgs({
  options: {
    size: { type: 'string', default: '10000' },
    repeat: { type: 'string', default: '20' },
    purge: { type: 'boolean', default: false },
    flood: { type: 'string', default: '200' },
  },
});
const size = Number(args.size);
const repeat = Number(args.repeat);
const flood = Number(args.flood);
if (!Number.isInteger(flood) || flood < 0) throw new Error('--flood is an integer ≥ 0');
if (!Number.isInteger(size) || size < 200 || !Number.isInteger(repeat) || repeat < 1) {
  throw new Error('--size is an integer ≥ 200, --repeat an integer ≥ 1');
}

let ids = 0;
async function exchange(raw: RawClient, frame: string): Promise<number> {
  const id = parse(frame).attrs.id;
  raw.send(frame);
  let before = 0;
  for (;;) {
    const element = await raw.next(120_000);
    if (element.name === 'iq' && element.attrs.id === id) {
      if (element.attrs.type !== 'result') throw new Error(`${frame} failed: ${element.toString()}`);
      return before;
    }
    before += 1;
  }
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length - 1) * p))] as number;
}

function perRun(usages: MeterSnapshot['operations'], runs: number): MeterSnapshot['operations'] {
  const operations: MeterSnapshot['operations'] = {};
  for (const [name, usage] of Object.entries(usages)) {
    operations[name] = {
      requests: usage.requests / runs,
      failures: usage.failures / runs,
      reported: usage.reported / runs,
      readUnits: usage.readUnits / runs,
      writeUnits: usage.writeUnits / runs,
    };
  }
  return operations;
}

async function main(): Promise<void> {
  const database = await startDynamoDbLocal({ port: await findFreePort() });
  const prefix = `bench${Date.now().toString(36)}`;
  const tables = await createPrefixedTables(database.endpoint, loadConfig(process.env).region, prefix);
  const config: Config = {
    ...loadConfig({ ...process.env, OFFLINE_QUOTA: String(size * 2), SCRAM_ITERATIONS: '4096' }),
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
    const user = 'reader@localhost';
    await stack.server.users.create(user, {
      sha1: await deriveScramCredentials('secret', 'sha1', 4096),
      sha256: await deriveScramCredentials('secret', 'sha256', 4096),
    });
    const seedStarted = Date.now();
    const seeded = (await seedOffline(seeder, config.tables.offline, user, size)).map((m) => m.id);
    process.stdout.write(`seeded ${size} offline messages in ${Date.now() - seedStarted} ms\n`);

    const raw = await RawClient.connect(stack.url);
    await raw.login('reader', 'secret', 'bench');

    /** Times `runs` runs of `body`; every DynamoDB request and frame in between counts. */
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
        dynamodb: perRun(meter.operations, runs),
        ...(meter.items ? { dynamodbByItem: perRun(meter.items, runs) } : {}),
      });
    }

    /**
     * XEP-0160 §3 with XEP-0198: the stored messages flood in windows, each followed by the
     * server's `<r/>`; every one leaves storage once the client's `<a/>` covers it.
     */
    async function measureFlood(count: number): Promise<void> {
      const flooder = 'flooder@localhost';
      await stack.server.users.create(flooder, {
        sha1: await deriveScramCredentials('secret', 'sha1', 4096),
        sha256: await deriveScramCredentials('secret', 'sha256', 4096),
      });
      await seedOffline(seeder, config.tables.offline, flooder, count);
      const client = await RawClient.connect(stack.url);
      await client.login('flooder', 'secret', 'bench');
      client.send(`<enable xmlns='${SM3}'/>`);
      await client.until((element) => element.name === 'enabled');
      await stack.gateway.drained();
      await measure(`flood ${count} with SM (presence to storage empty)`, 1, async () => {
        let handled = 0;
        let flooded = 0;
        client.send('<presence/>');
        while (flooded < count || (await stack.server.offline.count(flooder)) > 0) {
          const element = flooded < count ? await client.next(60_000) : undefined;
          if (element && ['message', 'presence', 'iq'].includes(element.name)) handled += 1;
          if (element?.name === 'message') flooded += 1;
          if (!element || element.name === 'r') {
            client.send(`<a xmlns='${SM3}' h='${handled}'/>`);
            await stack.gateway.drained();
          }
        }
      });
      const last = results.at(-1) as Measurement;
      process.stdout.write(
        `flood: ${(last.dynamoRequests / count).toFixed(2)} DynamoDB requests, ${(last.writeUnits / count).toFixed(2)} WRU, ${(last.readUnits / count).toFixed(2)} RRU, ${(last.frames / count).toFixed(2)} posts per flooded message\n`,
      );
      client.close();
    }

    const ask = (type: 'get' | 'set', payload: string) =>
      exchange(raw, `<iq type='${type}' id='b${++ids}'>${payload}</iq>`);

    // The first request marks the session for flexible retrieval (one session write, once).
    await ask('get', `<query xmlns='${DISCO_INFO}' node='${OFFLINE}'/>`);
    // Its state is saved after the reply is posted: let that write land before measuring.
    await stack.gateway.drained();
    await measure('count (disco#info node)', repeat, () =>
      ask('get', `<query xmlns='${DISCO_INFO}' node='${OFFLINE}'/>`),
    );
    await measure('headers without <set/> (as many as fit 128 KB)', repeat, () =>
      ask('get', `<query xmlns='${DISCO_ITEMS}' node='${OFFLINE}'/>`),
    );
    const middle = Math.floor(size / 2);
    await measure('headers, RSM max=100 after=<mid>', repeat, (run) =>
      ask(
        'get',
        `<query xmlns='${DISCO_ITEMS}' node='${OFFLINE}'><set xmlns='${RSM}'><max>100</max><after>${seeded[middle + run]}</after></set></query>`,
      ),
    );
    await measure('headers, RSM max=250 before=<last page>', repeat, () =>
      ask(
        'get',
        `<query xmlns='${DISCO_ITEMS}' node='${OFFLINE}'><set xmlns='${RSM}'><max>250</max><before/></set></query>`,
      ),
    );
    const pages = Math.ceil(size / 250);
    await measure(`headers, whole inbox (${pages} pages of 250)`, 1, async () => {
      for (let page = 0; page < pages; page++) {
        const after = page === 0 ? '' : `<after>${seeded[page * 250 - 1]}</after>`;
        await ask(
          'get',
          `<query xmlns='${DISCO_ITEMS}' node='${OFFLINE}'><set xmlns='${RSM}'><max>250</max>${after}</set></query>`,
        );
      }
    });
    await measure('view 1 message', repeat, (run) =>
      ask('get', `<offline xmlns='${OFFLINE}'><item action='view' node='${seeded[run]}'/></offline>`),
    );
    await measure('view 10 messages', repeat, (run) =>
      ask(
        'get',
        `<offline xmlns='${OFFLINE}'>${seeded
          .slice(run * 10, run * 10 + 10)
          .map((node) => `<item action='view' node='${node}'/>`)
          .join('')}</offline>`,
      ),
    );
    await measure(`fetch all ${size}`, 1, () => ask('get', `<offline xmlns='${OFFLINE}'><fetch/></offline>`));
    await measure('remove 10 messages', Math.min(repeat, Math.floor(size / 20)), (run) =>
      ask(
        'set',
        `<offline xmlns='${OFFLINE}'>${seeded
          .slice(size - 10 * (run + 1), size - 10 * run)
          .map((node) => `<item action='remove' node='${node}'/>`)
          .join('')}</offline>`,
      ),
    );
    if (args.purge) {
      await measure(`purge (${await stack.server.offline.count(user)} messages)`, 1, () =>
        ask('set', `<offline xmlns='${OFFLINE}'><purge/></offline>`),
      );
    }
    raw.close();
    if (flood > 0) await measureFlood(flood);
  } finally {
    seeder.destroy();
    await stack.close();
    await database.stop();
  }

  printMeasurements(results);
  await mkdir(new URL('./results/', import.meta.url), { recursive: true });
  await writeFile(
    RESULT_FILE,
    `${JSON.stringify({ at: new Date().toISOString(), size, repeat, flood, node: process.version, results }, null, 2)}\n`,
  );
  process.stdout.write(`\nwritten to ${RESULT_FILE.pathname}\n`);
}

main().catch((error) => {
  process.stderr.write(`${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exit(1);
});
