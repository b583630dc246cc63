/**
 * One schedule of the fault suite, on a fresh local stack (its own tables on the run's DynamoDB
 * Local) with the schedule's faults:
 *
 * - alice and bob: xmpp.js with XEP-0198, exchanging numbered messages while their sockets are
 *   killed at random (either side, both at once, half-open) and resumed at once — the issue's
 *   scenario. alice also writes to dave.
 * - carol: xmpp.js without stream management, killed at random too, reconnecting to a new
 *   session; she writes to alice and dave. Nobody writes to her: without XEP-0198 a message the
 *   server hands to a socket that then dies is lost by design, and no server can do better.
 * - dave: xmpp.js without stream management, never killed by the suite (only by PostToConnection
 *   410s), receiving from alice and carol, writing to bob.
 *
 * Every message goes to the recipient's bare JID, so it reaches the available resource or, when
 * there is none, offline storage. At the end the traffic stops, the clients come back and
 * settle their acknowledgements, close cleanly, and every user logs in once more (a raw RFC 7395
 * client) to receive the offline flood. The ledger then says what was lost, duplicated or
 * reordered.
 */
import { randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { parse } from 'ltx';
import { createTables, tableNamesOf } from '../../infra/local/create-tables.ts';
import { faultStream, type Random } from '../../infra/local/faults.ts';
import { RawClient } from '../../infra/local/raw-client.ts';
import { type LocalStack, startLocalStack } from '../../infra/local/stack.ts';
import { loadConfig } from '../../shared/config.ts';
import { entryFields, type Logger } from '../../shared/log.ts';
import { deriveScramCredentials } from '../../shared/sasl/scram.ts';
import { UserExistsError } from '../../shared/store/users.ts';
import { type Channel, idOfBody, Ledger, type Tally } from './ledger.ts';
import { type KillableLink, type KillMode, startKillableLink } from './link.ts';
import { Participant, RESOURCE, sleep } from './participant.ts';
import type { Schedule } from './schedule.ts';
import type { Problem, ProblemKind } from './verdict.ts';

const DOMAIN = 'localhost';
const REGION = 'us-east-1';
const DELAY = 'urn:xmpp:delay';

interface Role {
  user: string;
  streamManagement: boolean;
  /** Whether the suite kills its sockets. */
  killed: boolean;
  /** Share of the schedule's messages. */
  share: number;
  /** Recipients and their weights. */
  to: ReadonlyArray<readonly [string, number]>;
}

const ROLES: readonly Role[] = [
  {
    user: 'alice',
    streamManagement: true,
    killed: true,
    share: 0.35,
    to: [
      ['bob', 0.8],
      ['dave', 0.2],
    ],
  },
  { user: 'bob', streamManagement: true, killed: true, share: 0.35, to: [['alice', 1]] },
  {
    user: 'carol',
    streamManagement: false,
    killed: true,
    share: 0.15,
    to: [
      ['alice', 0.5],
      ['dave', 0.5],
    ],
  },
  { user: 'dave', streamManagement: false, killed: false, share: 0.15, to: [['bob', 1]] },
];

/** Most stanzas a sender leaves unacknowledged before it waits (an application's send window). */
const SEND_WINDOW = 100;
const ONLINE_TIMEOUT_MS = 20_000;
const SETTLE_TIMEOUT_MS = 10_000;
/** How long a final login waits for a flood the server is still holding (see finalLogin). */
const FLOOD_TIMEOUT_MS = 60_000;
/**
 * How long the end waits for the frame queue to drain, before and after the clients close. A
 * persistent DynamoDB storm keeps a connection's frames behind one that fails again and again
 * (each failure waits out the visibility timeout); a final login started before a closed stream's
 * last `<a/>` was handled replaces a session whose client had acknowledged what it holds, and
 * gets it again (see README, Limits).
 */
const DRAIN_TIMEOUT_MS = 60_000;
/** Kills after the traffic stopped: nothing in flight. */
const QUIET_KILLS = 3;

export interface Kill {
  at: number;
  users: string[];
  mode: KillMode;
  lagMs: number;
  /** Stanzas the victims had sent and not seen acknowledged (in flight) at the kill. */
  inFlight: number;
}

export interface ScheduleRun {
  schedule: Schedule;
  /** The `--messages` the schedule ran with (a replay needs the same). */
  messagesOption: number;
  tally: Tally;
  ledger: Ledger;
  kills: Kill[];
  resumes: number;
  freshSessions: number;
  faultsInjected: Record<string, number>;
  deadLetters: number;
  /**
   * Problems of the run itself (a client that never came back, a timeout while settling);
   * verdict.ts says which of them fail the schedule.
   */
  problems: Problem[];
  trace: string[];
  startedAt: number;
  durationMs: number;
  logFile: string;
}

export interface RunOptions {
  schedule: Schedule;
  messages: number;
  dynamodbEndpoint: string;
  logFile: string;
  logLevel: string;
}

/** The server's log as JSON lines in the schedule's log file, with the harness's trace. */
function fileLogger(write: (line: string) => void, level: string): Logger {
  const levels = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 } as const;
  const threshold = levels[(level in levels ? level : 'warn') as keyof typeof levels];
  const at =
    (name: keyof typeof levels) =>
    (message: string, fields?: Record<string, unknown>): void => {
      if (levels[name] < threshold) return;
      const error =
        fields?.error instanceof Error ? { error: fields.error.stack ?? fields.error.message } : {};
      // With the log context (connection, JID, element of the frame being handled), as on AWS.
      write(JSON.stringify({ t: Date.now(), level: name, message, ...entryFields(fields), ...error }));
    };
  return {
    debug: at('debug'),
    info: at('info'),
    warn: at('warn'),
    error: at('error'),
    isEnabled: (name) => levels[name] >= threshold,
  };
}

async function withRetries<T>(attempts: number, action: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await action();
    } catch (error) {
      if (attempt >= attempts) throw error;
      await sleep(100 * attempt);
    }
  }
}

function within<T>(ms: number, promise: Promise<T>): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), ms);
    }),
  ]);
}

function pick<T>(random: Random, weighted: ReadonlyArray<readonly [T, number]>): T {
  const total = weighted.reduce((sum, [, weight]) => sum + weight, 0);
  let draw = random() * total;
  for (const [value, weight] of weighted) {
    draw -= weight;
    if (draw < 0) return value;
  }
  return weighted[weighted.length - 1][0];
}

export async function runSchedule(options: RunOptions): Promise<ScheduleRun> {
  const { schedule } = options;
  const startedAt = Date.now();
  const log = createWriteStream(options.logFile);
  const trace: string[] = [];
  const problems: Problem[] = [];
  const problem = (kind: ProblemKind, text: string): void => {
    problems.push({ kind, text });
  };
  const note = (line: string): void => {
    const stamped = `+${String(Date.now() - startedAt).padStart(6)} ms ${line}`;
    trace.push(stamped);
    log.write(`${JSON.stringify({ t: Date.now(), harness: line })}\n`);
  };
  const ledger = new Ledger();
  const kills: Kill[] = [];

  const prefix = `faults${schedule.seed}x${randomBytes(3).toString('hex')}`;
  const config = {
    ...loadConfig({
      AWS_REGION: REGION,
      XMPP_DOMAIN: DOMAIN,
      TABLE_PREFIX: prefix,
      SCRAM_ITERATIONS: '4096',
      SM_ACK_EVERY: '5',
      // A login that meets a fault may be refused; the suite's clients log in again at once, and
      // must not be locked out for it (the refusal itself shows in the log).
      AUTH_FAILURES_PER_ADDRESS: '100000',
      AUTH_FAILURES_PER_ACCOUNT: '100000',
      // The suite measures the server as configured by default; `FRAME_DONE_MARKS=batched npm run
      // test:faults` measures the cheaper setting's trade (README, Configuration).
      ...(process.env.FRAME_DONE_MARKS ? { FRAME_DONE_MARKS: process.env.FRAME_DONE_MARKS } : {}),
      // Likewise `SM_LATE_POST_MS=0`: every post that later entries were queued behind is marked.
      ...(process.env.SM_LATE_POST_MS ? { SM_LATE_POST_MS: process.env.SM_LATE_POST_MS } : {}),
      // And `SM_POST_ORDER=serial`: one poster per stream at a time (README, Configuration).
      ...(process.env.SM_POST_ORDER ? { SM_POST_ORDER: process.env.SM_POST_ORDER } : {}),
    }),
    dynamodbEndpoint: options.dynamodbEndpoint,
  };
  const admin = new DynamoDBClient({
    endpoint: options.dynamodbEndpoint,
    region: REGION,
    credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
  });
  await createTables(admin, tableNamesOf(config.tables));
  admin.destroy();

  const stack: LocalStack = await startLocalStack({
    config,
    port: 0,
    log: fileLogger((line) => log.write(`${line}\n`), options.logLevel),
    eventSource: schedule.eventSource,
    faults: schedule.faults,
  });
  const links = new Map<string, KillableLink>();
  const participants = new Map<string, Participant>();
  let finals: RawClient[] = [];
  try {
    for (const role of ROLES) {
      const password = `${role.user}-pw`;
      const credentials = {
        sha1: await deriveScramCredentials(password, 'sha1', config.scramIterations),
        sha256: await deriveScramCredentials(password, 'sha256', config.scramIterations),
      };
      // The schedule's DynamoDB faults hit this client too: a retry after a 500 that followed
      // the write finds the user there.
      await withRetries(8, () =>
        stack.server.users.create(`${role.user}@${DOMAIN}`, credentials).catch((error: unknown) => {
          if (!(error instanceof UserExistsError)) throw error;
        }),
      );
      const link = await startKillableLink(stack.url);
      links.set(role.user, link);
      const participant = new Participant({
        user: role.user,
        password,
        domain: DOMAIN,
        streamManagement: role.streamManagement,
        link,
        ledger,
        trace: note,
      });
      participants.set(role.user, participant);
      participant.start();
    }
    for (const participant of participants.values()) {
      if (!(await participant.waitOnline(ONLINE_TIMEOUT_MS)))
        problem('offline', `${participant.user} never came online`);
    }
    // With XEP-0198, wait for <enabled/> so the first messages are counted.
    for (const participant of participants.values()) {
      const deadline = Date.now() + ONLINE_TIMEOUT_MS;
      while (participant.streamManagement && !participant.xmpp.streamManagement.enabled) {
        if (Date.now() > deadline) {
          problem('sm-not-enabled', `${participant.user}: stream management never enabled`);
          break;
        }
        await sleep(10);
      }
    }
    note('clients online; traffic starts');

    // -- traffic and kills -----------------------------------------------------------------
    let trafficDone = false;
    const senders = ROLES.map(async (role) => {
      const participant = participants.get(role.user) as Participant;
      const random = faultStream(schedule.seed, `suite-traffic-${role.user}`);
      const count = Math.max(1, Math.round(options.messages * role.share));
      for (let sent = 0; sent < count; ) {
        if (!(await participant.waitOnline(ONLINE_TIMEOUT_MS))) {
          problem('offline', `${role.user} stayed offline; it sent ${sent} of ${count}`);
          return;
        }
        if (participant.unacknowledged() >= SEND_WINDOW) {
          await sleep(5);
          continue;
        }
        await participant.sendNext(pick(random, role.to));
        sent += 1;
        const draw = random();
        // Mostly back to back, sometimes a pause: bursts and lulls.
        if (draw < 0.5) continue;
        await sleep(draw < 0.9 ? 1 + Math.floor(random() * 15) : 20 + Math.floor(random() * 80));
      }
    });
    const killable = ROLES.filter((role) => role.killed).map((role) => role.user);
    const kill = (random: Random, users: string[]): void => {
      const { kills: plan } = schedule;
      const mode = plan.modes[Math.floor(random() * plan.modes.length)];
      const lagMs = Math.floor(random() * (mode === 'silent' ? plan.maxHalfOpenMs : plan.maxLagMs));
      const victims = users.filter((user) => participants.get(user)?.online());
      if (victims.length === 0) return;
      const inFlight = victims.reduce(
        (sum, user) => sum + (participants.get(user)?.unacknowledged() ?? 0),
        0,
      );
      for (const user of victims) links.get(user)?.kill(mode, lagMs);
      kills.push({ at: Date.now(), users: victims, mode, lagMs, inFlight });
      note(`kill ${victims.join('+')} (${mode}, lag ${lagMs} ms, ${inFlight} in flight)`);
    };
    const killer = (async () => {
      const { meanGapMs } = schedule.kills;
      if (meanGapMs <= 0) return;
      const random = schedule.killer;
      while (!trafficDone) {
        await sleep(Math.round(-Math.log(1 - random()) * meanGapMs));
        if (trafficDone) break;
        // Either side of the issue's pair, both of them at once, or the client without SM.
        const target = pick<string[]>(random, [
          [['alice'], 1],
          [['bob'], 1],
          [['alice', 'bob'], 1],
          [['carol'], 0.7],
        ]);
        kill(
          random,
          target.filter((user) => killable.includes(user)),
        );
      }
    })();
    await Promise.all(senders);
    trafficDone = true;
    await killer;
    note('traffic done');

    // Kills with nothing in flight: once everyone is acknowledged, kill and let them resume.
    if (schedule.kills.meanGapMs > 0) {
      for (let quiet = 0; quiet < QUIET_KILLS; quiet++) {
        await settle(participants, note, 5_000);
        kill(
          schedule.killer,
          pick<string[]>(schedule.killer, [
            [['alice'], 1],
            [['bob'], 1],
            [['alice', 'bob'], 1],
          ]),
        );
        await sleep(50);
      }
    }

    // -- settle, close, and log in once more -----------------------------------------------
    // Half-open ends of `silent` kills close by themselves within maxHalfOpenMs.
    await sleep(schedule.kills.maxHalfOpenMs);
    for (const participant of participants.values()) {
      if (!(await participant.waitOnline(ONLINE_TIMEOUT_MS)))
        problem('offline', `${participant.user} did not come back`);
    }
    if (!(await settle(participants, note, SETTLE_TIMEOUT_MS))) {
      problem('acks-unsettled', 'acknowledgements did not settle');
    }
    if ((await within(DRAIN_TIMEOUT_MS, stack.gateway.drained())) === 'timeout') {
      problem('queue-busy', 'the queue did not drain before the clients closed');
    }
    for (const participant of participants.values()) {
      // A socket that dies under the last <a/> takes it along: the client resumes (xmpp.js does
      // by itself) and acknowledges again, as one that means to close cleanly would.
      const deadline = Date.now() + DRAIN_TIMEOUT_MS;
      let confirmed = false;
      while (!confirmed && Date.now() < deadline) {
        if (!(await participant.waitOnline(Math.max(0, deadline - Date.now())))) break;
        if (participant.unacknowledging()) break;
        confirmed = await participant.acknowledgeReceived(SETTLE_TIMEOUT_MS);
        if (!confirmed) await sleep(200);
      }
      if (!confirmed) note(`${participant.user}: its last <a/> was not confirmed`);
    }
    note('settled; closing the clients');
    await Promise.all([...participants.values()].map((participant) => participant.stop()));
    for (const link of links.values()) await link.close();
    if ((await within(DRAIN_TIMEOUT_MS, stack.gateway.drained())) === 'timeout') {
      problem('queue-stuck', 'the queue did not drain after the clients closed');
    }
    note('final logins');
    finals = await Promise.all(
      ROLES.map((role) =>
        finalLogin(stack, role.user, ledger, note).catch((error: Error) => {
          problem('final-login', `final login of ${role.user}: ${error.message}`);
          return undefined;
        }),
      ),
    ).then((clients) => clients.filter((client) => client !== undefined));
    const left = await leftBehind(
      stack,
      ROLES.map((role) => role.user),
    ).catch((error: Error) => `(not read: ${error.message})`);
    if (left) note(`left after the final logins: ${left}`);
  } finally {
    for (const participant of participants.values()) await participant.stop();
    for (const link of links.values()) await link.close().catch(() => {});
    for (const client of finals) client.terminate();
    if ((await within(30_000, stack.close())) === 'timeout')
      problem('stack-hung', 'the stack did not close in 30 s');
  }
  for (const line of new Set(ledger.overcounts)) problem('sm-overcount', line);
  const run: ScheduleRun = {
    schedule,
    messagesOption: options.messages,
    tally: ledger.tally(),
    ledger,
    kills,
    resumes: [...participants.values()].reduce((sum, p) => sum + p.resumes, 0),
    freshSessions: [...participants.values()].reduce((sum, p) => sum + p.freshSessions, 0),
    faultsInjected: stack.faultsInjected(),
    deadLetters: stack.gateway.deadLetters().length,
    problems,
    trace,
    startedAt,
    durationMs: Date.now() - startedAt,
    logFile: options.logFile,
  };
  for (const letter of stack.gateway.deadLetters()) {
    log.write(`${JSON.stringify({ t: Date.now(), deadLetter: letter })}\n`);
  }
  await new Promise<void>((resolve) => log.end(resolve));
  return run;
}

/**
 * Waits until every client has its messages acknowledged (SM: asks with `<r/>` each second;
 * without SM: its pings answered); false after `timeoutMs`.
 */
async function settle(
  participants: Map<string, Participant>,
  note: (line: string) => void,
  timeoutMs: number,
): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (const participant of participants.values()) {
    if (!participant.streamManagement) {
      const settled = await within(Math.max(1, deadline - Date.now()), participant.settlePings());
      if (settled === 'timeout') note(`${participant.user}: pings unanswered`);
    }
  }
  let lastRequest = 0;
  for (;;) {
    const waiting = [...participants.values()].filter((p) => p.streamManagement && p.unacknowledged() > 0);
    if (waiting.length === 0) return true;
    if (Date.now() > deadline) {
      note(
        `unacknowledged at the deadline: ${waiting.map((p) => `${p.user} ${p.unacknowledged()}`).join(', ')}`,
      );
      return false;
    }
    if (Date.now() - lastRequest > 1_000) {
      lastRequest = Date.now();
      for (const participant of waiting) {
        if (participant.online()) {
          participant.xmpp.send(parse("<r xmlns='urn:xmpp:sm:3'/>")).catch(() => {});
        }
      }
    }
    await sleep(20);
  }
}

/**
 * What the server still holds for the users once their final logins are done: messages in
 * offline storage, stream-management sessions not ended, re-routes not finished. Anything here
 * points at where a lost message went.
 */
async function leftBehind(stack: LocalStack, users: string[]): Promise<string> {
  const { server } = stack;
  const parts: string[] = [];
  for (const user of users) {
    const bare = `${user}@${DOMAIN}`;
    const inbox = await withRetries(5, () => server.offline.list(bare, { limit: 1000 }));
    if (inbox.messages.length > 0) parts.push(`offline ${user} ${inbox.messages.length}`);
  }
  const far = Date.now() + 3_600_000;
  const detached = await withRetries(5, () => server.smQueue.listExpired(far, 100));
  for (const item of detached) parts.push(`detached session of ${item.user} holding ${item.entries.length}`);
  const reroutes = await withRetries(5, () => server.smQueue.listReroutes(far, 100));
  for (const item of reroutes)
    parts.push(`re-route of ${item.user} at ${item.rerouted ?? 0} of ${item.entries.length}`);
  const resources = await withRetries(5, () => server.sessions.listAllResources());
  for (const row of resources) if (row.held !== undefined) parts.push(`hold on ${row.user}/${row.resource}`);
  return parts.join('; ');
}

/**
 * Logs `user` in once more without stream management and takes the offline flood; tried again
 * (as a user would) while it fails, for FLOOD_TIMEOUT_MS: in a persistent storm a login or its
 * flood can fail again and again, and what the server stored for the user waits for the next
 * login.
 */
async function finalLogin(
  stack: LocalStack,
  user: string,
  ledger: Ledger,
  note: (line: string) => void,
): Promise<RawClient> {
  const giveUp = Date.now() + FLOOD_TIMEOUT_MS;
  for (let attempt = 1; ; attempt++) {
    try {
      return await finalLoginOnce(stack, user, ledger, note);
    } catch (error) {
      if (Date.now() >= giveUp) throw error;
      note(`${user}: final login failed (${(error as Error).message}); logging in again`);
      await sleep(Math.min(500 * attempt, 5_000));
    }
  }
}

/** One try of the final login. */
async function finalLoginOnce(
  stack: LocalStack,
  user: string,
  ledger: Ledger,
  note: (line: string) => void,
): Promise<RawClient> {
  // The schedule's faults go on: a login may meet one, and is then tried again.
  const client = await withRetries(5, async () => {
    const attempt = await RawClient.connect(stack.url);
    try {
      // The client's own resource: a session it abandoned (its client gave up resuming) is
      // replaced, RFC 6120 §7.7.2.2, and what it held is re-routed here, as when the same device
      // logs in again; under another resource it would wait out its resumption window first.
      await attempt.login(user, `${user}-pw`, RESOURCE);
      return attempt;
    } catch (error) {
      attempt.terminate();
      throw error;
    }
  });
  try {
    await collectFlood(stack, client, user, ledger, note);
  } catch (error) {
    client.terminate();
    throw error;
  }
  return client;
}

/** Takes what the server sends the final login until nothing more comes and nothing is held. */
async function collectFlood(
  stack: LocalStack,
  client: RawClient,
  user: string,
  ledger: Ledger,
  note: (line: string) => void,
): Promise<void> {
  client.send('<presence/>');
  let quiet = 0;
  const deadline = Date.now() + SETTLE_TIMEOUT_MS;
  // The flood may be held up by the schedule's faults (a persistent storm retries its frame for
  // many seconds): as a user would, the login waits while the server still holds stored messages
  // for it or its flood is still running, for FLOOD_TIMEOUT_MS at most.
  const floodDeadline = Date.now() + FLOOD_TIMEOUT_MS;
  const stillHeld = async (): Promise<boolean> => {
    const bare = `${user}@${DOMAIN}`;
    const [stored, row] = await Promise.all([
      withRetries(5, () => stack.server.offline.list(bare, { limit: 1 })),
      withRetries(5, () => stack.server.sessions.getResource(bare, RESOURCE)),
    ]).catch(() => [{ messages: [] }, undefined] as const);
    return stored.messages.length > 0 || row?.held !== undefined;
  };
  // Until two barriers in a row, with the queue drained between them, bring nothing.
  for (;;) {
    if (quiet >= 2 || Date.now() >= deadline) {
      if (Date.now() >= floodDeadline || !(await stillHeld())) break;
      quiet = 0;
    }
    const frames = await client.framesBeforePong(10_000);
    let messages = 0;
    for (const text of frames) {
      const element = parse(text);
      if (!element.is('message') || element.attrs.type === 'error') continue;
      const id = idOfBody(element.getChildText('body'));
      if (id === undefined) continue;
      messages += 1;
      const delays = element.getChildren('delay', DELAY);
      const channel: Channel =
        delays.length === 0 ? 'online' : delays.some((d) => d.attrs.from === DOMAIN) ? 'offline' : 'resent';
      ledger.receive({ id, recipient: user, at: Date.now(), channel, stream: `${user}#final` });
    }
    if (messages > 0) note(`${user}: final login received ${messages}`);
    quiet = messages === 0 ? quiet + 1 : 0;
    await within(5_000, stack.gateway.drained());
  }
}
