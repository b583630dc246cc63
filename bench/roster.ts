/**
 * RFC 6121 rosters at size: what a login with a large roster and a presence broadcast to many
 * online contacts cost. The real server (core and modules) runs in this process against
 * DynamoDB Local; the outbound port is a stand-in for API Gateway's PostToConnection that
 * waits `--post-ms` per post (API Gateway's management API answers in about 10–30 ms from a
 * Lambda in the same region) and counts, so the fan-out's concurrency shows in the time.
 *
 *   npm run bench -- --roster [--contacts 500] [--broadcast 1000] [--post-ms 20] [--sm]
 *
 * Two measurements:
 * - login: roster get (`<query ver=''/>`) and initial presence of a user with `--contacts`
 *   contacts, all with subscription both and all online (one resource each): the user's
 *   presence goes to each contact, and each contact's presence comes back (the probe answered
 *   locally).
 * - broadcast: a presence update of a user with `--broadcast` online subscribers.
 * For each: wall time, DynamoDB requests and capacity units per operation (the project's meter,
 * `ReturnConsumedCapacity`), posts. Writes `bench/results/roster.json`.
 *
 * `--sm`: the logging-in stream enables XEP-0198 first (what it is sent is queued), and its
 * client acknowledges as asked: after each frame that posted it an `<r/>`, an `<a/>` frame with
 * the count of stanzas posted to it (measured with the frame). Writes `roster-sm.json`.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { createPrefixedTables } from '../infra/local/create-tables.ts';
import { findFreePort, startDynamoDbLocal } from '../infra/local/dynamodb-local.ts';
import { type Config, loadConfig } from '../shared/config.ts';
import { handleStreamEvent } from '../shared/core/stream.ts';
import { createLogger } from '../shared/log.ts';
import type { ConnectionPort, PostResult } from '../shared/outbound.ts';
import { createServer, type Server } from '../shared/server.ts';
import { createDocumentClient, DynamoMeter, type MeterSnapshot } from '../shared/store/dynamo.ts';
import type { RosterEntry } from '../shared/store/roster.ts';

const RESULT_FILE = new URL('./results/roster.json', import.meta.url);
const SM_RESULT_FILE = new URL('./results/roster-sm.json', import.meta.url);

/** PostToConnection with a fixed latency, counting posts per connection. */
class SlowPort implements ConnectionPort {
  posts = 0;
  inFlight = 0;
  maxInFlight = 0;
  /** Per connection: stanzas posted, and whether an ack was asked for since the last look. */
  readonly stanzas = new Map<string, number>();
  readonly asked = new Set<string>();
  constructor(private readonly latencyMs: number) {}
  async post(connectionId: string, data: string): Promise<PostResult> {
    if (/^<(message|presence|iq)[\s>]/.test(data))
      this.stanzas.set(connectionId, (this.stanzas.get(connectionId) ?? 0) + 1);
    else if (data.startsWith('<r ')) this.asked.add(connectionId);
    this.posts++;
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    await new Promise((resolve) => setTimeout(resolve, this.latencyMs));
    this.inFlight--;
    return 'sent';
  }
  async close(): Promise<void> {}
}

interface Measurement {
  scenario: string;
  contacts: number;
  ms: number;
  posts: number;
  maxPostsInFlight: number;
  dynamoRequests: number;
  readUnits: number;
  writeUnits: number;
  dynamodb: MeterSnapshot['operations'];
}

function entry(contact: string): RosterEntry {
  return {
    contact,
    listed: true,
    groups: ['Bench'],
    subscription: 'both',
    pendingOut: false,
    approved: false,
  };
}

/** `user` and `count` contacts with mutual subscriptions, each contact online with one resource. */
async function seed(server: Server, user: string, prefix: string, count: number): Promise<void> {
  const contacts = Array.from(
    { length: count },
    (_, i) => `${prefix}${String(i).padStart(4, '0')}@localhost`,
  );
  // One roster pair at a time: every pair moves the user's roster version (a conditioned write).
  for (const contact of contacts) {
    await server.roster.apply(user, contact, { contactIsLocal: true }, () => ({
      user: entry(contact),
      contact: entry(user),
      outcome: undefined,
    }));
  }
  let next = 0;
  const worker = async () => {
    while (next < contacts.length) {
      const contact = contacts[next++] as string;
      const connectionId = `conn-${contact}`;
      await server.sessions.bindResource({
        user: contact,
        resource: 'bench',
        connectionId,
        available: false,
        priority: 0,
        boundAt: Date.now(),
      });
      await server.sessions.updatePresence(contact, 'bench', connectionId, {
        available: true,
        priority: 0,
        presence: `<presence from='${contact}/bench'><status>benchmarking</status></presence>`,
      });
    }
  };
  await Promise.all(Array.from({ length: 8 }, worker));
}

/**
 * A bound stream for `user` (as SASL and bind leave it), driven frame by frame like the stream
 * function. With `port` (`--sm`): XEP-0198 enabled, and after each frame an ack when asked.
 */
async function boundStream(
  server: Server,
  user: string,
  port?: SlowPort,
): Promise<(frame: string) => Promise<void>> {
  const connectionId = `conn-${user}`;
  await server.sessions.createConnection(connectionId, Date.now());
  await server.sessions.updateConnection(connectionId, { streamOpen: true, user, resource: 'desk' });
  await server.sessions.bindResource({
    user,
    resource: 'desk',
    connectionId,
    available: false,
    priority: 0,
    boundAt: Date.now(),
  });
  // Each frame with an id, as API Gateway's request id names it: the stream's keyed deliveries need one.
  let frames = 0;
  const send = (frame: string) =>
    handleStreamEvent(server, {
      connectionId,
      kind: 'frame',
      frame,
      receivedAt: Date.now(),
      frameId: `${connectionId}-${++frames}`,
    });
  if (!port) return async (frame) => void (await send(frame));
  await send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>");
  // <enabled/> is no stanza: the client's count starts at the first stanza after it.
  port.stanzas.set(connectionId, 0);
  return async (frame) => {
    await send(frame);
    // A client that acknowledges as asked, once the frame is over (a connection's frames are handled one at a time).
    while (port.asked.delete(connectionId))
      await send(`<a xmlns='urn:xmpp:sm:3' h='${port.stanzas.get(connectionId) ?? 0}'/>`);
  };
}

export async function runRosterBench(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      roster: { type: 'boolean' },
      contacts: { type: 'string', default: '500' },
      broadcast: { type: 'string', default: '1000' },
      'post-ms': { type: 'string', default: '20' },
      sm: { type: 'boolean', default: false },
    },
  });
  const loginContacts = Number(values.contacts);
  const broadcastContacts = Number(values.broadcast);
  const postMs = Number(values['post-ms']);

  const database = await startDynamoDbLocal({ port: await findFreePort() });
  const prefix = `roster${Date.now().toString(36)}`;
  const tables = await createPrefixedTables(database.endpoint, loadConfig(process.env).region, prefix);
  const config: Config = {
    ...loadConfig({
      ...process.env,
      ROSTER_MAX_ITEMS: String(Math.max(loginContacts, broadcastContacts) + 10),
    }),
    tables,
    dynamodbEndpoint: database.endpoint,
  };

  const meter = new DynamoMeter();
  const port = new SlowPort(postMs);
  const server = createServer({
    config,
    port,
    doc: createDocumentClient({ endpoint: database.endpoint, region: config.region, meter }),
    log: createLogger('warn'),
  });
  const results: Measurement[] = [];
  async function measure(scenario: string, contacts: number, body: () => Promise<void>): Promise<void> {
    meter.reset();
    port.posts = 0;
    port.maxInFlight = 0;
    const started = performance.now();
    await body();
    const ms = performance.now() - started;
    const snapshot = meter.snapshot();
    results.push({
      scenario,
      contacts,
      ms: Math.round(ms),
      posts: port.posts,
      maxPostsInFlight: port.maxInFlight,
      dynamoRequests: snapshot.requests,
      readUnits: snapshot.readUnits,
      writeUnits: snapshot.writeUnits,
      dynamodb: snapshot.operations,
    });
  }

  try {
    const seedStarted = Date.now();
    await seed(server, 'login@localhost', 'friend', loginContacts);
    await seed(server, 'popular@localhost', 'fan', broadcastContacts);
    process.stdout.write(
      `seeded ${loginContacts + broadcastContacts} contacts in ${Date.now() - seedStarted} ms\n`,
    );

    const login = await boundStream(server, 'login@localhost', values.sm ? port : undefined);
    await measure('login: roster get', loginContacts, () =>
      login(`<iq type='get' id='r1'><query xmlns='jabber:iq:roster' ver=''/></iq>`),
    );
    await measure('login: initial presence (broadcast + probes)', loginContacts, () => login('<presence/>'));

    const popular = await boundStream(server, 'popular@localhost');
    await popular('<presence/>');
    await measure('presence update to online subscribers', broadcastContacts, () =>
      popular('<presence><show>away</show></presence>'),
    );
  } finally {
    await database.stop();
  }

  process.stdout.write(`\nPostToConnection stand-in: ${postMs} ms per post\n`);
  process.stdout.write(
    `${'scenario'.padEnd(46)} ${'contacts'.padStart(8)} ${'ms'.padStart(7)} ${'posts'.padStart(6)} ${'inflight'.padStart(8)} ${'requests'.padStart(8)} ${'RCU'.padStart(7)} ${'WCU'.padStart(6)}  by operation\n`,
  );
  for (const r of results) {
    const ops = Object.entries(r.dynamodb)
      .map(([name, usage]) => `${name} ${usage.requests}`)
      .join(', ');
    process.stdout.write(
      `${r.scenario.padEnd(46)} ${String(r.contacts).padStart(8)} ${String(r.ms).padStart(7)} ${String(r.posts).padStart(6)} ${String(r.maxPostsInFlight).padStart(8)} ${String(r.dynamoRequests).padStart(8)} ${r.readUnits.toFixed(1).padStart(7)} ${r.writeUnits.toFixed(1).padStart(6)}  ${ops}\n`,
    );
  }
  await mkdir(new URL('./results/', import.meta.url), { recursive: true });
  await writeFile(
    values.sm ? SM_RESULT_FILE : RESULT_FILE,
    `${JSON.stringify({ postMs, sm: values.sm, results }, null, 2)}\n`,
  );
}
