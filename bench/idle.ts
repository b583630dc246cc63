/**
 * What a deployment costs a month with nobody connected: the floor under every per-message and
 * per-user figure. `npm run bench:idle [-- --runs 30]`.
 *
 * Measured: the sweeper's run on empty tables (the stack runs it every minute), against DynamoDB
 * Local with the project's meter: its DynamoDB requests and read units, and its CPU time. The
 * run's duration on AWS is projected as elsewhere in the bench: its CPU plus its DynamoDB
 * requests times `AWS_CALL_LATENCY_MS` (all of them, as if sequential: an upper bound, the
 * phases query their shards in parallel). Counted from the synthesized stack: the alarms and
 * dashboards it bills monthly, and its customer managed KMS keys. Estimated: the frame queue's
 * event source polling an empty queue (`prices.sqsIdlePolling`).
 */
import { readFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { App } from 'aws-cdk-lib';
import { Template } from 'aws-cdk-lib/assertions';
import { createSweeperHandler } from '../functions/sweeper.ts';
import { FUNCTION_MEMORY_MB } from '../infra/constructs/xmpp-function.ts';
import { createPrefixedTables } from '../infra/local/create-tables.ts';
import { findFreePort, startDynamoDbLocal } from '../infra/local/dynamodb-local.ts';
import { NimbusStack } from '../infra/stack.ts';
import { type Config, loadConfig } from '../shared/config.ts';
import { createLogger } from '../shared/log.ts';
import { createServer } from '../shared/server.ts';
import { dynamoMeter } from '../shared/store/dynamo.ts';
import { AWS_CALL_LATENCY_MS, HOURS_PER_MONTH, PRICES_AS_OF, PRICES_REGION, prices } from './prices.ts';

process.env.NIMBUS_METER = '1';
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

const RESULT_FILE = new URL('./results/idle.json', import.meta.url);
const SWEEPS_PER_MONTH = HOURS_PER_MONTH * 60;

/** The stack's resources billed by the month whatever the traffic. */
export function monthlyResources(): { alarms: number; dashboards: number; kmsKeys: number } {
  const cdkJson = JSON.parse(readFileSync(new URL('../cdk.json', import.meta.url), 'utf8'));
  const app = new App({ context: { ...cdkJson.context, 'aws:cdk:bundling-stacks': [] } });
  const template = Template.fromStack(new NimbusStack(app, 'Nimbus', { domain: 'example.org' }));
  const count = (type: string) => Object.keys(template.findResources(type)).length;
  return {
    alarms: count('AWS::CloudWatch::Alarm'),
    dashboards: count('AWS::CloudWatch::Dashboard'),
    kmsKeys: count('AWS::KMS::Key'),
  };
}

async function main(): Promise<void> {
  const { values: args } = parseArgs({ options: { runs: { type: 'string', default: '30' } } });
  const runs = Number(args.runs);
  if (!Number.isInteger(runs) || runs < 1) throw new Error('--runs takes a positive integer');

  const database = await startDynamoDbLocal({ port: await findFreePort() });
  let sweep: { requests: number; readUnits: number; writeUnits: number; cpuMs: number; wallMs: number };
  try {
    const base = loadConfig(process.env);
    const config: Config = {
      ...base,
      tables: await createPrefixedTables(database.endpoint, base.region, `idle${Date.now().toString(36)}`),
      dynamodbEndpoint: database.endpoint,
    };
    const server = createServer({ config, log: createLogger('warn') });
    const handle = createSweeperHandler(server);
    const context = { getRemainingTimeInMillis: () => 50_000 };
    // A first run warms the clients and the process, as the stack's minute-by-minute runs are.
    await handle(context);
    dynamoMeter.reset();
    const cpuBefore = process.cpuUsage();
    const startedAt = performance.now();
    for (let i = 0; i < runs; i++) await handle(context);
    const wallMs = (performance.now() - startedAt) / runs;
    const cpu = process.cpuUsage(cpuBefore);
    const totals = Object.values(dynamoMeter.snapshot().operations).reduce(
      (sum, usage) => ({
        requests: sum.requests + usage.requests,
        readUnits: sum.readUnits + usage.readUnits,
        writeUnits: sum.writeUnits + usage.writeUnits,
      }),
      { requests: 0, readUnits: 0, writeUnits: 0 },
    );
    sweep = {
      requests: totals.requests / runs,
      readUnits: totals.readUnits / runs,
      writeUnits: totals.writeUnits / runs,
      cpuMs: (cpu.user + cpu.system) / 1000 / runs,
      wallMs,
    };
  } finally {
    await database.stop();
  }

  const resources = monthlyResources();
  const projectedMs = sweep.cpuMs + sweep.requests * AWS_CALL_LATENCY_MS.dynamodbRequest;
  const gbSeconds = (FUNCTION_MEMORY_MB.sweeper / 1024) * (Math.ceil(projectedMs) / 1000);
  const lines = {
    sweeperInvocations: (SWEEPS_PER_MONTH * prices.lambda.perMillionRequests) / 1e6,
    sweeperDuration: SWEEPS_PER_MONTH * gbSeconds * prices.lambda.perGbSecondArm,
    sweeperDynamoDb:
      (SWEEPS_PER_MONTH *
        (sweep.readUnits * prices.dynamodbOnDemand.perMillionReadRequestUnits +
          sweep.writeUnits * prices.dynamodbOnDemand.perMillionWriteRequestUnits)) /
      1e6,
    queuePolling:
      (prices.sqsIdlePolling.requestsPerMinute * SWEEPS_PER_MONTH * prices.sqsFifo.perMillionRequests) / 1e6,
    alarms: resources.alarms * prices.cloudwatch.perAlarmMonth,
    dashboards: resources.dashboards * prices.cloudwatch.perDashboardMonth,
    kmsKeys: resources.kmsKeys * prices.kms.perKeyMonth,
  };
  const total = Object.values(lines).reduce((a, b) => a + b, 0);
  // The alarm key rotates yearly: from its second rotation on, it bills $3 a month, not $1.
  const kmsRotations = resources.kmsKeys * prices.kms.perRotationMonth * prices.kms.billedRotations;
  const result = {
    pricesAsOf: PRICES_AS_OF,
    region: PRICES_REGION,
    runs,
    sweepRun: { ...sweep, projectedMs },
    resources,
    monthly: {
      ...lines,
      total,
      kmsRotationsFromThirdYear: kmsRotations,
      totalFromThirdYear: total + kmsRotations,
    },
  };
  const dollars = (value: number) => `$${value.toFixed(value < 0.1 ? 4 : 2)}`;
  process.stdout.write(
    [
      `A deployment with nobody connected, per 30-day month (${PRICES_REGION} list prices as of ${PRICES_AS_OF}):`,
      `  sweeper run on empty tables (mean of ${runs} runs): ${sweep.requests.toFixed(1)} DynamoDB requests, ` +
        `${sweep.readUnits.toFixed(1)} read units, ${sweep.cpuMs.toFixed(1)} ms CPU (${sweep.wallMs.toFixed(1)} ms here), ` +
        `projected ${projectedMs.toFixed(0)} ms on AWS`,
      `  sweeper: ${SWEEPS_PER_MONTH} invocations ${dollars(lines.sweeperInvocations)}, duration ${dollars(lines.sweeperDuration)}, DynamoDB ${dollars(lines.sweeperDynamoDb)}`,
      `  frame queue's event source polling the empty queue (estimate): ${dollars(lines.queuePolling)}`,
      `  ${resources.alarms} alarms ${dollars(lines.alarms)}, ${resources.dashboards} dashboard ${dollars(lines.dashboards)}, ${resources.kmsKeys} KMS key ${dollars(lines.kmsKeys)}`,
      `  total ${dollars(total)} a month; ${dollars(total + kmsRotations)} from the key's second yearly rotation on (+${dollars(kmsRotations)})`,
      '',
    ].join('\n'),
  );
  await mkdir(new URL('./results/', import.meta.url), { recursive: true });
  await writeFile(RESULT_FILE, `${JSON.stringify(result, null, 2)}\n`);
}

await main();
