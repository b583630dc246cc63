/**
 * `npm run bench:abuse`: what an attacker gets and what a bystander feels, through the local
 * stack on DynamoDB Local with the default limits.
 *
 * - Bystander latency: a pair of clients exchanges numbered messages one at a time (send, wait
 *   for the recipient to get it) — first on a quiet server, then while another connection floods
 *   the server with pings as fast as it can write them (until the rate limit ends its stream).
 *   Reports p50/p95/max of the bystander's one-way latency in both phases.
 * - Password guessing: one address guessing one account's password, counting the attempts the
 *   server actually checked (the others are refused unchecked) over a fixed span.
 * - A client that never acknowledges (XEP-0198): it asks for one large answer (an error echoing
 *   a `--hoard-kb` payload), then pings `--hoard-pings` times and never sends `<a/>`. Reports the
 *   DynamoDB write units each ping's answer cost (its append and its post's release are writes of
 *   the session's queue item, which DynamoDB bills by the item's size).
 *
 *   npm run bench:abuse -- [--messages 100] [--flood 3000] [--guess-seconds 20]
 *                          [--hoard-kb 24] [--hoard-pings 50] [--hoard-only]
 */
import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { createTables, tableNamesOf } from '../infra/local/create-tables.ts';
import { findFreePort, startDynamoDbLocal } from '../infra/local/dynamodb-local.ts';
import { RawClient } from '../infra/local/raw-client.ts';
import { type LocalStack, startLocalStack } from '../infra/local/stack.ts';
import { type Config, loadConfig } from '../shared/config.ts';
import { createLogger } from '../shared/log.ts';
import { deriveScramCredentials } from '../shared/sasl/scram.ts';
import { dynamoMeter } from '../shared/store/dynamo.ts';
import { allTables, localTableName } from '../shared/tables.ts';

const { values } = parseArgs({
  options: {
    messages: { type: 'string', default: '100' },
    flood: { type: 'string', default: '3000' },
    'guess-seconds': { type: 'string', default: '20' },
    'hoard-kb': { type: 'string', default: '24' },
    'hoard-pings': { type: 'string', default: '50' },
    /** Only the client that never acknowledges. */
    'hoard-only': { type: 'boolean', default: false },
  },
});

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? Number.NaN;
}

function summary(latencies: number[]): string {
  const sorted = [...latencies].sort((a, b) => a - b);
  return `p50 ${percentile(sorted, 50).toFixed(1)} ms, p95 ${percentile(sorted, 95).toFixed(1)} ms, max ${(sorted.at(-1) ?? 0).toFixed(1)} ms (${sorted.length} messages)`;
}

async function online(
  stack: LocalStack,
  user: string,
  resource: string,
  address?: string,
): Promise<RawClient> {
  const client = await RawClient.connect(stack.url, ['xmpp'], address);
  await client.login(user, 'secret', resource);
  client.send('<presence/>');
  await client.until((el) => el.name === 'presence');
  return client;
}

async function exchange(alice: RawClient, bob: RawClient, count: number, tag: string): Promise<number[]> {
  const latencies: number[] = [];
  for (let i = 0; i < count; i++) {
    const id = `${tag}-${i}`;
    const sent = performance.now();
    alice.send(`<message to='bob@localhost/b' type='chat' id='${id}'><body>${i}</body></message>`);
    await bob.until((el) => el.name === 'message' && el.attrs.id === id, 30_000);
    latencies.push(performance.now() - sent);
  }
  return latencies;
}

/**
 * The write units one ping's answer costs a client with stream management that never acknowledges,
 * after one answer of about `kb` KB (an error echoing the payload of an iq nobody serves).
 */
async function hoarding(stack: LocalStack, kb: number, pings: number) {
  const client = await RawClient.connect(stack.url, ['xmpp']);
  await client.login('hoarder', 'secret', 'h');
  client.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>");
  await client.until((el) => el.name === 'enabled');
  // Random text: it does not deflate away (queued stanzas are stored deflated).
  const payload = randomBytes(Math.floor((kb * 1024 * 3) / 4)).toString('base64');
  client.send(`<iq type='get' id='big' to='localhost'><x xmlns='urn:example:unserved'>${payload}</x></iq>`);
  await client.until((el) => el.name === 'iq' && el.attrs.id === 'big');
  await stack.gateway.drained();
  dynamoMeter.reset();
  for (let i = 0; i < pings; i++) {
    client.send(`<iq type='get' id='p${i}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>`);
    await client.until((el) => el.name === 'iq' && el.attrs.id === `p${i}`);
  }
  await stack.gateway.drained();
  const used = dynamoMeter.snapshot();
  client.terminate();
  return {
    writeUnits: used.writeUnits / pings,
    queueWriteUnits:
      Object.entries(used.items ?? {})
        .filter(([name]) => name.endsWith(' sm'))
        .reduce((sum, [, usage]) => sum + usage.writeUnits, 0) / pings,
    requests: used.requests / pings,
  };
}

async function main(): Promise<void> {
  // The stores' clients count requests and units into `dynamoMeter`.
  process.env.NIMBUS_METER = '1';
  const messages = Number(values.messages);
  const flood = Number(values.flood);
  const guessSeconds = Number(values['guess-seconds']);
  const database = await startDynamoDbLocal({ port: await findFreePort() });
  const prefix = `abuse${Date.now().toString(36)}`;
  const base = loadConfig({ ...process.env, SCRAM_ITERATIONS: '4096' });
  const tables = Object.fromEntries(
    allTables.map((def) => [def.id.toLowerCase(), localTableName(def, prefix)]),
  ) as Config['tables'];
  const config: Config = { ...base, tables, dynamodbEndpoint: database.endpoint };
  const admin = new DynamoDBClient({
    endpoint: database.endpoint,
    region: config.region,
    credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
  });
  await createTables(admin, tableNamesOf(config.tables));
  admin.destroy();
  const stack = await startLocalStack({ config, port: 0, log: createLogger('error') });
  try {
    for (const user of ['alice', 'bob', 'mallory', 'victim', 'hoarder']) {
      await stack.server.users.create(`${user}@localhost`, {
        sha1: await deriveScramCredentials('secret', 'sha1', 4096),
        sha256: await deriveScramCredentials('secret', 'sha256', 4096),
      });
    }
    const hoardKb = Number(values['hoard-kb']);
    const hoard = await hoarding(stack, hoardKb, Number(values['hoard-pings']));
    const hoardLine = `a client that never acknowledges, after one ${hoardKb} KB answer: ${hoard.writeUnits.toFixed(2)} write units per ping (the queue item's ${hoard.queueWriteUnits.toFixed(2)}), ${hoard.requests.toFixed(2)} DynamoDB requests`;
    if (values['hoard-only']) {
      console.log(hoardLine);
      return;
    }
    const alice = await online(stack, 'alice', 'a');
    const bob = await online(stack, 'bob', 'b');
    await exchange(alice, bob, 10, 'warm');
    const quiet = await exchange(alice, bob, messages, 'quiet');

    const mallory = await online(stack, 'mallory', 'm');
    for (let i = 0; i < flood; i++)
      mallory.send(`<iq type='get' id='f${i}'><ping xmlns='urn:xmpp:ping'/></iq>`);
    const during = await exchange(alice, bob, messages, 'flood');
    const cut = await Promise.race([
      mallory.closed.then(() => 'cut by the rate limit (policy-violation)'),
      new Promise<string>((resolve) => setTimeout(() => resolve('still open'), 60_000)),
    ]);

    // Guessing from one address: count the attempts the server checked in the span.
    let checked = 0;
    let refused = 0;
    const until = Date.now() + guessSeconds * 1000;
    while (Date.now() < until) {
      const client = await RawClient.connect(stack.url, ['xmpp'], '127.0.0.66');
      await client.open();
      const payload = Buffer.from(`\0victim\0guess-${checked + refused}`).toString('base64');
      client.send(`<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>${payload}</auth>`);
      const answer = await client.next();
      if (
        /try again later/i.test(answer.getChildText('text') ?? '') &&
        /address|account/.test(answer.getChildText('text') ?? '')
      )
        refused += 1;
      else checked += 1;
      client.terminate();
    }
    console.log(`machine: load ${(await import('node:os')).loadavg()[0]?.toFixed(1)}`);
    console.log(`bystander latency, quiet server:        ${summary(quiet)}`);
    console.log(
      `bystander latency, during a ${flood}-ping flood: ${summary(during)}; the flooder was ${cut}`,
    );
    console.log(
      `guessing from one address for ${guessSeconds} s: ${checked} attempts checked (${(checked / guessSeconds).toFixed(2)}/s), ${refused} refused unchecked; limits: ${config.authFailuresPerAddress} per address and ${config.authFailuresPerAccount} per account per ${config.authFailureWindowSeconds} s, then one per ${config.authAccountSlowdownSeconds} s on the account`,
    );
    console.log(hoardLine);
    for (const client of [alice, bob, mallory]) client.terminate();
  } finally {
    await stack.gateway.drained();
    await stack.close();
    await database.stop();
  }
}

main().catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
