/**
 * `npm run bench:per-user -- --from bench/results/NAME.json [--ping-minutes 5,9]`: what one user
 * who stays online all month and sends nothing costs, from what a bench run measured: API
 * Gateway's connection minutes, a keepalive (XEP-0199 ping to the server) often enough for
 * API Gateway's 10-minute idle cut, and a reconnect every 2 hours (API Gateway's connection
 * limit), with XEP-0198 resumption, or without SM a fresh SCRAM login. The arithmetic is
 * `cost.ts`'s `alwaysOnlineUserMonth` (unit-tested); the usage per ping, resumption and login is
 * the run's (`keepalive`, `reconnect`, `login`), with the projected Lambda duration.
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { alwaysOnlineUserMonth, gbSeconds, SQS_REQUESTS_PER_BATCH, type UsagePerMessage } from './cost.ts';
import { PRICES_AS_OF, PRICES_REGION, prices } from './prices.ts';
import type { ActivityResult, BenchReport, ScenarioResult } from './report.ts';

/** API Gateway ends every WebSocket connection after 2 hours. */
const RECONNECT_EVERY_HOURS = 2;

const { values } = parseArgs({
  options: {
    from: { type: 'string' },
    'ping-minutes': { type: 'string', default: '5,9' },
  },
});
if (!values.from) {
  process.stderr.write(
    'usage: npm run bench:per-user -- --from bench/results/NAME.json [--ping-minutes 5,9]\n',
  );
  process.exit(2);
}
const report = JSON.parse(readFileSync(values.from, 'utf8')) as BenchReport;
const memoryMb = report.assumptions.streamMemoryMb;

/**
 * The usage of one event as the bench measured it, with one record per batch (one invocation
 * and one ReceiveMessage + DeleteMessageBatch each): an idle user's frames are minutes apart,
 * while the bench's clients ping at the same moment and their records share batches. Lambda at
 * the projected duration.
 */
function usageOf(activity: ActivityResult): UsagePerMessage {
  const records = activity.queuedRecords ?? activity.framesIn;
  return {
    apiGatewayMessages: activity.apiGatewayMessages,
    sqsRequests: records * (1 + SQS_REQUESTS_PER_BATCH),
    lambdaInvocations: records + activity.connectInvocations,
    lambdaGbSeconds: gbSeconds(
      activity.projectedLambdaMs + (records - activity.streamInvocations) * (prices.lambda.billingStepMs / 2),
      memoryMb,
    ),
    readRequestUnits: activity.readUnits,
    writeRequestUnits: activity.writeUnits,
  };
}

function scenario(name: 'plain' | 'sm'): ScenarioResult | undefined {
  return report.results.find((r) => r.scenario === name && !r.failed && !r.skipped);
}

const rows: { title: string; ping: ActivityResult; reconnect: ActivityResult; how: string }[] = [];
const sm = scenario('sm');
if (sm?.keepalive && sm.reconnect)
  rows.push({
    title: 'with SM, XEP-0199 ping',
    ping: sm.keepalive,
    reconnect: sm.reconnect,
    how: 'resumption',
  });
if (sm?.keepaliveAckRequest && sm.reconnect)
  rows.push({
    title: 'with SM, `<r/>`',
    ping: sm.keepaliveAckRequest,
    reconnect: sm.reconnect,
    how: 'resumption',
  });
const plain = scenario('plain');
if (plain?.keepalive && plain.login)
  rows.push({
    title: 'without SM, XEP-0199 ping',
    ping: plain.keepalive,
    reconnect: plain.login,
    how: 'fresh login',
  });
if (rows.length === 0) {
  process.stderr.write(`${values.from} has no keepalive and reconnect measurements\n`);
  process.exit(1);
}

const fmt = (value: number) => `$${value.toFixed(4)}`;
const lines = [
  `An always-online idle user, per 30-day month (${PRICES_REGION} list prices as of ${PRICES_AS_OF}; ` +
    `measured in bench run "${report.name}" of ${report.at.slice(0, 10)}; Lambda at the projected duration, ${memoryMb} MB)`,
  '',
  '| | keepalive every | connection minutes | keepalives | reconnects | total | per 1,000 users |',
  '| --- | --- | --- | --- | --- | --- | --- |',
];
for (const minutes of values['ping-minutes'].split(',').map(Number)) {
  for (const row of rows) {
    const month = alwaysOnlineUserMonth({
      pingEveryMinutes: minutes,
      reconnectEveryHours: RECONNECT_EVERY_HOURS,
      perPing: usageOf(row.ping),
      perReconnect: usageOf(row.reconnect),
    });
    lines.push(
      `| ${row.title} | ${minutes} min | ${fmt(month.connectionCost)} | ${month.pings.toLocaleString('en-US')}: ${fmt(month.pingCost)} | ` +
        `${month.reconnects} ${row.how}s: ${fmt(month.reconnectCost)} | ${fmt(month.total)} | $${(month.total * 1000).toFixed(2)} |`,
    );
  }
}
lines.push('', 'Per event, as measured:');
const listed = new Set<ActivityResult>();
for (const row of rows) {
  for (const [what, activity] of [
    ['keepalive', row.ping],
    [row.how, row.reconnect],
  ] as const) {
    if (listed.has(activity)) continue;
    listed.add(activity);
    lines.push(
      `- ${row.title}, ${what}: ${activity.framesIn.toFixed(2)} frames in + ${activity.postsOut.toFixed(2)} posts out, ` +
        `${(activity.queuedRecords ?? activity.framesIn).toFixed(2)} queued records, ${activity.connectInvocations.toFixed(2)} $connect, ` +
        `${activity.dynamodbRequests.toFixed(2)} DynamoDB requests (${activity.readUnits.toFixed(2)} RRU, ${activity.writeUnits.toFixed(2)} WRU), ` +
        `${activity.cpuMs.toFixed(1)} ms CPU, ${activity.projectedLambdaMs.toFixed(1)} ms projected Lambda`,
    );
  }
}
process.stdout.write(`${lines.join('\n')}\n`);
