import { fileURLToPath } from 'node:url';
import { type CfnElement, CfnOutput, Duration, Stack, type StackProps, Validations } from 'aws-cdk-lib';
import * as events from 'aws-cdk-lib/aws-events';
import * as targets from 'aws-cdk-lib/aws-events-targets';
import { SqsEventSource } from 'aws-cdk-lib/aws-lambda-event-sources';
import type { Construct } from 'constructs';
import { loadConfig, TUNABLE_SETTINGS } from '../shared/config.ts';
import {
  archiveTable,
  offlineTable,
  rosterTable,
  sessionsTable,
  type TableDefinition,
  usersTable,
} from '../shared/tables.ts';
import { FrameQueue } from './constructs/frame-queue.ts';
import { bindTable, type TableAccess, XmppTables } from './constructs/tables.ts';
import { WebSocketGateway } from './constructs/websocket-gateway.ts';
import { FUNCTION_MEMORY_MB, XmppFunction } from './constructs/xmpp-function.ts';

const PROJECT_ROOT = fileURLToPath(new URL('..', import.meta.url));

type FunctionName = keyof typeof FUNCTION_MEMORY_MB;

/** Which tables each function touches, and how. Nothing gets a table it does not use. */
const TABLE_ACCESS: Record<FunctionName, readonly [TableDefinition, TableAccess][]> = {
  // Writes the connection row; authentication happens later, on the stream.
  connect: [[sessionsTable, 'readWrite']],
  // SASL (Users: SCRAM keys read, auth-failure counters written), sessions, offline storage,
  // rosters and subscriptions (RFC 6121); XEP-0136 archiving (messages archived as they are
  // routed; the archive iqs).
  stream: [
    [usersTable, 'readWrite'],
    [sessionsTable, 'readWrite'],
    [offlineTable, 'readWrite'],
    [rosterTable, 'readWrite'],
    [archiveTable, 'readWrite'],
  ],
  // Ends expired resumable sessions and moves their unacknowledged messages to offline storage.
  // Reads rosters to tell a swept session's contacts it is unavailable (RFC 6121 §4.5.2);
  // finishes the bounded purges of removed archive collections.
  sweeper: [
    [usersTable, 'read'],
    [sessionsTable, 'readWrite'],
    [offlineTable, 'readWrite'],
    [rosterTable, 'read'],
    [archiveTable, 'readWrite'],
  ],
};

/** Timeout of the stream function; the frame queue's visibility timeout is six times this. */
export const STREAM_TIMEOUT = Duration.seconds(30);

export interface NimbusStackProps extends StackProps {
  /** The XMPP domain served (`XMPP_DOMAIN`). */
  domain: string;
  /** See `WebSocketGatewayProps.manageAccountLogRole`. Default true. */
  manageApiGatewayAccountRole?: boolean;
  /** Tuning for the stream and sweeper functions: names from `TUNABLE_SETTINGS` only. */
  settings?: Record<string, string>;
}

export function checkedSettings(settings: Record<string, string> = {}): Record<string, string> {
  for (const [name, value] of Object.entries(settings)) {
    if (!(TUNABLE_SETTINGS as readonly string[]).includes(name)) {
      throw new Error(`Unknown setting ${name}; tunable: ${TUNABLE_SETTINGS.join(', ')}`);
    }
    // Validated the way the functions will read it, so a typo fails the synth, not a cold start.
    loadConfig({ [name]: String(value) });
  }
  return Object.fromEntries(Object.entries(settings).map(([name, value]) => [name, String(value)]));
}

/** One Nimbus deployment: one XMPP domain. See DESIGN.md ("Shape"). */
export class NimbusStack extends Stack {
  readonly tables: XmppTables;
  readonly frameQueue: FrameQueue;
  readonly gateway: WebSocketGateway;
  readonly functions: Record<FunctionName, XmppFunction>;

  constructor(scope: Construct, id: string, props: NimbusStackProps) {
    super(scope, id, props);
    const domainEnvironment = { XMPP_DOMAIN: props.domain };
    const entry = (name: FunctionName) => `${PROJECT_ROOT}functions/${name}.ts`;

    this.tables = new XmppTables(this, 'Tables');
    this.frameQueue = new FrameQueue(this, 'FrameQueue', { consumerTimeout: STREAM_TIMEOUT });

    const connect = new XmppFunction(this, 'Connect', {
      entry: entry('connect'),
      description: 'XMPP $connect: subprotocol handshake (RFC 7395 §3.3.1) and connection row',
      memorySize: FUNCTION_MEMORY_MB.connect,
      // API Gateway gives up on the handshake after 29 s anyway.
      timeout: Duration.seconds(10),
      projectRoot: PROJECT_ROOT,
      environment: domainEnvironment,
    });

    this.gateway = new WebSocketGateway(this, 'WebSocket', {
      connectFunction: connect.fn,
      frameQueue: this.frameQueue.queue,
      manageAccountLogRole: props.manageApiGatewayAccountRole ?? true,
    });
    const outboundEnvironment = {
      ...checkedSettings(props.settings),
      ...domainEnvironment,
      CONNECTIONS_ENDPOINT: this.gateway.connectionsEndpoint,
    };
    // connect answers through its return value: no endpoint, no ManageConnections (the core
    // builds its outbound port on first use).

    const stream = new XmppFunction(this, 'Stream', {
      entry: entry('stream'),
      description: 'XMPP streams: frames and disconnects from the FIFO queue, in order per connection',
      memorySize: FUNCTION_MEMORY_MB.stream,
      timeout: STREAM_TIMEOUT,
      projectRoot: PROJECT_ROOT,
      environment: outboundEnvironment,
    });
    stream.fn.addEventSource(
      new SqsEventSource(this.frameQueue.queue, { batchSize: 10, reportBatchItemFailures: true }),
    );

    const sweeper = new XmppFunction(this, 'Sweeper', {
      entry: entry('sweeper'),
      description: 'Ends resumable sessions (XEP-0198) whose resumption window has closed',
      memorySize: FUNCTION_MEMORY_MB.sweeper,
      // Shorter than the schedule period, so runs do not pile up.
      timeout: Duration.seconds(50),
      projectRoot: PROJECT_ROOT,
      environment: outboundEnvironment,
    });
    // The next run a minute later does the same work: retrying a failed run only doubles it.
    sweeper.fn.configureAsyncInvoke({ retryAttempts: 0 });
    new events.Rule(this, 'SweepSchedule', {
      description: 'Runs the session sweeper every minute',
      schedule: events.Schedule.rate(Duration.minutes(1)),
      targets: [new targets.LambdaFunction(sweeper.fn)],
    });

    this.functions = { connect, stream, sweeper };
    for (const [name, fn] of Object.entries(this.functions) as [FunctionName, XmppFunction][]) {
      for (const [def, access] of TABLE_ACCESS[name]) bindTable(fn.fn, this.tables.table(def), def, access);
    }
    // Only the functions that send to clients may post to or close connections.
    this.gateway.stage.grantManagementApiAccess(stream.fn);
    this.gateway.stage.grantManagementApiAccess(sweeper.fn);

    new CfnOutput(this, 'WebSocketUrl', {
      description: 'XMPP over WebSocket endpoint (RFC 7395) for clients',
      value: this.gateway.stage.url,
    });
    new CfnOutput(this, 'ConnectionsEndpoint', {
      description: 'CONNECTIONS_ENDPOINT: API Gateway Management API of the stage',
      value: this.gateway.connectionsEndpoint,
    });
    new CfnOutput(this, 'XmppDomain', { description: 'XMPP_DOMAIN', value: props.domain });
    for (const { def, table } of this.tables.all()) {
      new CfnOutput(this, `${def.id}TableName`, { description: def.envVar, value: table.tableName });
    }
    new CfnOutput(this, 'FrameQueueName', { value: this.frameQueue.queue.queueName });
    new CfnOutput(this, 'DeadLetterQueueName', { value: this.frameQueue.deadLetterQueue.queueName });

    this.acknowledgeNagFindings();
  }

  /**
   * The cdk-nag AwsSolutions findings that stay, each with why. Everything else the checks
   * raised was fixed at the source (own function roles instead of AWSLambdaBasicExecutionRole,
   * DynamoDB grants naming tables and indexes, SSE and TLS-only queues, a dead-letter queue,
   * stage access logs and throttling).
   */
  private acknowledgeNagFindings(): void {
    for (const fn of Object.values(this.functions)) {
      Validations.of(fn).acknowledge({
        id: 'AwsSolutions-L1',
        reason:
          'Node.js 22 (LTS, maintained upstream until April 2027) is the runtime this project targets ' +
          '(issue #2) and the one esbuild builds for (target node22). Moving to Node.js 24 is a deliberate ' +
          'upgrade with its own test run, not something a newer runtime appearing in aws-cdk-lib should trigger.',
      });
    }

    Validations.of(this.gateway.api).acknowledge({
      id: 'AwsSolutions-APIG4',
      reason:
        'XMPP authenticates in-band: the client opens the stream and authenticates with SASL (RFC 6120 §6) ' +
        'over the socket, so the $connect handshake is public by design, like the port of any XMPP server. ' +
        'API Gateway accepts authorizers on $connect only, never on $default or $disconnect; the stream ' +
        'function answers every stanza sent before authentication with not-authorized.',
    });

    if (this.gateway.accountLogRole) {
      Validations.of(this.gateway.accountLogRole).acknowledge({
        id: 'AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AmazonAPIGatewayPushToCloudWatchLogs]',
        reason:
          "The policy AWS documents for API Gateway's account-level CloudWatch Logs role. That role is used " +
          'by every API of the account and region, each logging to groups of its own, so it cannot be ' +
          "scoped to this stack's log groups.",
      });
    }

    const apiLogicalId = this.getLogicalId(this.gateway.api.node.defaultChild as CfnElement);
    const connectionsArn = `arn:<AWS::Partition>:execute-api:<AWS::Region>:<AWS::AccountId>:<${apiLogicalId}>/${this.gateway.stage.stageName}/*/@connections/*`;
    for (const fn of [this.functions.stream, this.functions.sweeper]) {
      Validations.of(fn).acknowledge({
        id: `AwsSolutions-IAM5[Resource::${connectionsArn}]`,
        reason:
          "execute-api:ManageConnections on this API's own stage only. The wildcards are the HTTP method " +
          '(POST sends a frame, DELETE closes, GET inspects a connection) and the connection id, which API ' +
          'Gateway assigns when a client connects and so cannot be named in advance.',
      });
    }
  }
}
