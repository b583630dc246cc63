/**
 * `npm start`: DynamoDB Local (or DYNAMODB_ENDPOINT), the tables, and the gateway emulator
 * serving ws://127.0.0.1:5280/xmpp-websocket for the domain `localhost`. NIMBUS_EVENT_SOURCE
 * changes the queue's settings and NIMBUS_FAULTS injects faults (both JSON, see the README).
 */
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { loadConfig } from '../../shared/config.ts';
import { createLogger } from '../../shared/log.ts';
import { createTables, tableNamesOf } from './create-tables.ts';
import { type DynamoDbLocal, startDynamoDbLocal } from './dynamodb-local.ts';
import { parseEventSourceSettings } from './event-source.ts';
import { parseFaultOptions } from './faults.ts';
import { startLocalStack } from './stack.ts';

// The runtime on AWS is Node.js 22; locally Node 20 is fine, without the SDK's nag about it.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

const started = Date.now();
const env = process.env;
// The fields of the JSON lines on AWS, as text on a terminal (LOG_FORMAT=json|text to choose).
const log = createLogger(env.LOG_LEVEL, {
  format:
    env.LOG_FORMAT === 'json' || env.LOG_FORMAT === 'text'
      ? env.LOG_FORMAT
      : process.stderr.isTTY
        ? 'text'
        : 'json',
});

async function main(): Promise<void> {
  // Checked before anything starts, so a typo costs no Java start-up.
  const faults = env.NIMBUS_FAULTS ? parseFaultOptions(env.NIMBUS_FAULTS) : undefined;
  const eventSource = env.NIMBUS_EVENT_SOURCE ? parseEventSourceSettings(env.NIMBUS_EVENT_SOURCE) : undefined;
  let database: DynamoDbLocal | undefined;
  let endpoint = env.DYNAMODB_ENDPOINT;
  if (!endpoint) {
    database = await startDynamoDbLocal({
      port: Number(env.DYNAMODB_PORT || 8000),
      dataDir: env.NIMBUS_DATA_DIR,
    });
    endpoint = database.endpoint;
  }
  const config = { ...loadConfig({ ...env, DYNAMODB_ENDPOINT: endpoint }), dynamodbEndpoint: endpoint };
  const client = new DynamoDBClient({
    endpoint,
    region: config.region,
    credentials: {
      accessKeyId: env.AWS_ACCESS_KEY_ID || 'local',
      secretAccessKey: env.AWS_SECRET_ACCESS_KEY || 'local',
    },
  });
  await createTables(client, tableNamesOf(config.tables));
  client.destroy();

  const stack = await startLocalStack({
    config,
    host: env.HOST || '127.0.0.1',
    port: Number(env.PORT || 5280),
    idleTimeoutMs: env.IDLE_TIMEOUT_SECONDS ? Number(env.IDLE_TIMEOUT_SECONDS) * 1000 : undefined,
    log,
    eventSource,
    faults,
  });

  const lines = [
    `Nimbus is ready in ${Date.now() - started} ms`,
    `  XMPP over WebSocket: ${stack.url}  (subprotocol 'xmpp', RFC 7395)`,
    `  XMPP domain:         ${config.domain}`,
    `  DynamoDB:            ${endpoint}${database ? (env.NIMBUS_DATA_DIR ? ` (DynamoDB Local, data in ${env.NIMBUS_DATA_DIR})` : ' (DynamoDB Local, in memory)') : ''}`,
    `  Add a user:          npm run user -- add alice@${config.domain} secret`,
    ...(eventSource ? [`  Event source:        ${JSON.stringify(eventSource)}`] : []),
    ...(faults ? [`  Injecting faults:    ${JSON.stringify(faults)}`] : []),
  ];
  process.stdout.write(`${lines.join('\n')}\n`);

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    process.stdout.write(`\n${signal}: stopping\n`);
    if (faults) process.stdout.write(`Faults injected: ${JSON.stringify(stack.faultsInjected())}\n`);
    await stack.close();
    await database?.stop();
    process.exit(0);
  };
  process.on('SIGINT', () => void stop('SIGINT'));
  process.on('SIGTERM', () => void stop('SIGTERM'));
}

main().catch((error) => {
  log.error('start failed', { error });
  process.exit(1);
});
