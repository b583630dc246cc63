import { fileURLToPath } from 'node:url';
import { type CfnElement, CfnOutput, Duration, Stack, type StackProps, Validations } from 'aws-cdk-lib';
import * as events from 'aws-cdk-lib/aws-events';
import * as targets from 'aws-cdk-lib/aws-events-targets';
import { SqsEventSource } from 'aws-cdk-lib/aws-lambda-event-sources';
import type { Construct } from 'constructs';
import { loadConfig, TUNABLE_SETTINGS } from '../shared/config.ts';
import { isLogLevel, LOG_LEVELS, type LogLevel } from '../shared/log.ts';
import {
  archiveTable,
  offlineTable,
  rosterTable,
  sessionsTable,
  type TableDefinition,
  usersTable,
} from '../shared/tables.ts';
import { Alarms } from './constructs/alarms.ts';
import { CustomDomain } from './constructs/custom-domain.ts';
import { FrameQueue } from './constructs/frame-queue.ts';
import { OperationsDashboard } from './constructs/operations-dashboard.ts';
import { bindTable, RETIRED_INDEXES, type TableAccess, XmppTables } from './constructs/tables.ts';
import { STAGE_THROTTLE, WebSocketGateway } from './constructs/websocket-gateway.ts';
import { FUNCTION_MEMORY_MB, XmppFunction } from './constructs/xmpp-function.ts';

const PROJECT_ROOT = fileURLToPath(new URL('..', import.meta.url));

type FunctionName = keyof typeof FUNCTION_MEMORY_MB;

/** Which tables each function touches, and how. Nothing gets a table it does not use. */
const TABLE_ACCESS: Record<FunctionName, readonly [TableDefinition, TableAccess][]> = {
  // The handshake only: the stream's first frame writes the connection row.
  connect: [],
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
  /** See `XmppTablesProps.keepRetiredIndexes` (README, "Upgrading"). Default false. */
  keepRetiredIndexes?: boolean;
  /**
   * Tuning for the stream and sweeper functions (names from `TUNABLE_SETTINGS`) and the
   * deployment's own settings (`DEPLOY_SETTINGS`: log level per function, tracing).
   */
  settings?: Record<string, string>;
  /** A custom host name for the WebSocket endpoint (`-c domainName=… -c certificateArn=…`). */
  customDomain?: { domainName: string; certificateArn: string };
}

/**
 * Settings the stack reads itself, next to the functions' tunables: `LOG_LEVEL` (a tunable)
 * sets every function's level, `<FUNCTION>_LOG_LEVEL` one function's; `TRACING=true` turns on
 * X-Ray tracing of the stream function; concurrency, API Gateway's stage throttle and alarm
 * thresholds (README, "Configuration").
 */
export const DEPLOY_SETTINGS = [
  'CONNECT_LOG_LEVEL',
  'STREAM_LOG_LEVEL',
  'SWEEPER_LOG_LEVEL',
  'TRACING',
  'CONNECT_RESERVED_CONCURRENCY',
  'STREAM_MAX_CONCURRENCY',
  'ALARM_OLDEST_FRAME_SECONDS',
  'STAGE_RATE_LIMIT',
  'STAGE_BURST_LIMIT',
  'ALARM_CLIENT_ERRORS',
] as const;

/**
 * Defaults of the concurrency settings: WebSocket handshakes (`$connect`) keep
 * `CONNECT_RESERVED_CONCURRENCY` instances of their own however busy the streams are (which also
 * caps them: see the README), and the streams take at most `STREAM_MAX_CONCURRENCY` (the event
 * source's maximum concurrency), so a flood of frames cannot take the account's whole pool. `0`
 * leaves either unset (an account with the default unreserved minimum of 10 and a low limit
 * cannot reserve any).
 */
const CONCURRENCY_DEFAULTS = { CONNECT_RESERVED_CONCURRENCY: 10, STREAM_MAX_CONCURRENCY: 100 };

function intSetting(settings: Record<string, string>, name: string, fallback: number, min = 0): number {
  const raw = settings[name];
  if (raw === undefined) return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min)
    throw new Error(`${name} must be an integer ≥ ${min}, got '${raw}'`);
  return value;
}

export function checkedSettings(settings: Record<string, string> = {}): Record<string, string> {
  const known = [...TUNABLE_SETTINGS, ...DEPLOY_SETTINGS] as readonly string[];
  for (const [name, raw] of Object.entries(settings)) {
    const value = String(raw);
    if (!known.includes(name)) {
      throw new Error(`Unknown setting ${name}; known: ${known.join(', ')}`);
    }
    if (name.endsWith('LOG_LEVEL') && !isLogLevel(value)) {
      throw new Error(`${name} must be one of ${LOG_LEVELS.join(', ')}, got '${value}'`);
    }
    if (name === 'TRACING' && value !== 'true' && value !== 'false') {
      throw new Error(`TRACING must be true or false, got '${value}'`);
    }
    if (name === 'STREAM_MAX_CONCURRENCY' && value !== '0') intSetting(settings, name, 0, 2);
    if (
      name === 'CONNECT_RESERVED_CONCURRENCY' ||
      name === 'ALARM_OLDEST_FRAME_SECONDS' ||
      name === 'ALARM_CLIENT_ERRORS'
    )
      intSetting(settings, name, 0);
    if (name === 'STAGE_RATE_LIMIT' || name === 'STAGE_BURST_LIMIT') intSetting(settings, name, 0, 1);
    // Validated the way the functions will read it, so a typo fails the synth, not a cold start.
    if ((TUNABLE_SETTINGS as readonly string[]).includes(name)) loadConfig({ [name]: value });
  }
  // And together: some rules span settings (ARCHIVE_AUTO_REQUIRED with ARCHIVE_DEFAULT_SAVE or
  // ARCHIVE_DEFAULT_OTR), which each one alone passes; the functions would refuse the pair at
  // every start, leaving frames to be retried into the dead-letter queue.
  loadConfig(
    Object.fromEntries(
      Object.entries(settings)
        .filter(([name]) => (TUNABLE_SETTINGS as readonly string[]).includes(name))
        .map(([name, value]) => [name, String(value)]),
    ),
  );
  return Object.fromEntries(Object.entries(settings).map(([name, value]) => [name, String(value)]));
}

/** The functions' tunables: the deployment's own settings stay with the stack. */
function tunables(settings: Record<string, string>): Record<string, string> {
  return Object.fromEntries(
    Object.entries(settings).filter(([name]) => !(DEPLOY_SETTINGS as readonly string[]).includes(name)),
  );
}

function logLevelOf(settings: Record<string, string>, fn: FunctionName): LogLevel {
  const level = settings[`${fn.toUpperCase()}_LOG_LEVEL`] ?? settings.LOG_LEVEL ?? 'info';
  return level as LogLevel;
}

/** One Nimbus deployment: one XMPP domain. See docs/design.md ("Shape"). */
export class NimbusStack extends Stack {
  readonly tables: XmppTables;
  readonly frameQueue: FrameQueue;
  readonly gateway: WebSocketGateway;
  readonly functions: Record<FunctionName, XmppFunction>;
  readonly dashboard: OperationsDashboard;
  readonly customDomain?: CustomDomain;
  readonly alarms: Alarms;

  constructor(scope: Construct, id: string, props: NimbusStackProps) {
    super(scope, id, props);
    const settings = checkedSettings(props.settings);
    const tracing = settings.TRACING === 'true';
    const domainEnvironment = { XMPP_DOMAIN: props.domain };
    const entry = (name: FunctionName) => `${PROJECT_ROOT}functions/${name}.ts`;

    this.tables = new XmppTables(this, 'Tables', { keepRetiredIndexes: props.keepRetiredIndexes ?? false });
    this.frameQueue = new FrameQueue(this, 'FrameQueue', { consumerTimeout: STREAM_TIMEOUT });

    const connect = new XmppFunction(this, 'Connect', {
      entry: entry('connect'),
      description: 'XMPP $connect: subprotocol handshake (RFC 7395 §3.3.1)',
      memorySize: FUNCTION_MEMORY_MB.connect,
      // API Gateway gives up on the handshake after 29 s anyway.
      timeout: Duration.seconds(10),
      projectRoot: PROJECT_ROOT,
      environment: domainEnvironment,
      logLevel: logLevelOf(settings, 'connect'),
      reservedConcurrency: intSetting(
        settings,
        'CONNECT_RESERVED_CONCURRENCY',
        CONCURRENCY_DEFAULTS.CONNECT_RESERVED_CONCURRENCY,
      ),
    });

    this.gateway = new WebSocketGateway(this, 'WebSocket', {
      connectFunction: connect.fn,
      frameQueue: this.frameQueue.queue,
      manageAccountLogRole: props.manageApiGatewayAccountRole ?? true,
      throttle: {
        rateLimit: intSetting(settings, 'STAGE_RATE_LIMIT', STAGE_THROTTLE.rateLimit, 1),
        burstLimit: intSetting(settings, 'STAGE_BURST_LIMIT', STAGE_THROTTLE.burstLimit, 1),
      },
    });
    const outboundEnvironment = {
      ...tunables(settings),
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
      // A frame failing on this receive goes to the dead-letter queue (the FramesDeadLettered metric);
      // a frame handed back is made visible again soon (shared/frame-queue.ts).
      environment: {
        ...outboundEnvironment,
        FRAME_MAX_RECEIVES: String(this.frameQueue.maxReceiveCount),
        FRAME_QUEUE_URL: this.frameQueue.queue.queueUrl,
      },
      logLevel: logLevelOf(settings, 'stream'),
      tracing,
    });
    const streamMaxConcurrency = intSetting(
      settings,
      'STREAM_MAX_CONCURRENCY',
      CONCURRENCY_DEFAULTS.STREAM_MAX_CONCURRENCY,
    );
    // Its own records only: ChangeMessageVisibility on the frame queue (the event source
    // mapping's receive and delete rights come with addEventSource).
    this.frameQueue.queue.grant(stream.fn, 'sqs:ChangeMessageVisibility');
    stream.fn.addEventSource(
      new SqsEventSource(this.frameQueue.queue, {
        batchSize: 10,
        reportBatchItemFailures: true,
        ...(streamMaxConcurrency > 0 ? { maxConcurrency: streamMaxConcurrency } : {}),
      }),
    );

    const sweeper = new XmppFunction(this, 'Sweeper', {
      entry: entry('sweeper'),
      description: 'Ends resumable sessions (XEP-0198) whose resumption window has closed',
      memorySize: FUNCTION_MEMORY_MB.sweeper,
      // Shorter than the schedule period, so runs do not pile up.
      timeout: Duration.seconds(50),
      projectRoot: PROJECT_ROOT,
      environment: outboundEnvironment,
      logLevel: logLevelOf(settings, 'sweeper'),
      sweeps: true,
    });
    // The next run a minute later does the same work: retrying a failed run only doubles it, and
    // a run held back (the function throttled, its event kept by Lambda for up to 6 hours by
    // default) would arrive beside the later ones. A minute is the shortest age allowed.
    sweeper.fn.configureAsyncInvoke({ retryAttempts: 0, maxEventAge: Duration.minutes(1) });
    new events.Rule(this, 'SweepSchedule', {
      description: 'Runs the session sweeper every minute',
      schedule: events.Schedule.rate(Duration.minutes(1)),
      targets: [
        new targets.LambdaFunction(sweeper.fn, { retryAttempts: 0, maxEventAge: Duration.minutes(1) }),
      ],
    });

    // Updated after the stream function: a stack whose $connect wrote the connection row gets the
    // code that creates it from the first frame before $connect stops writing it.
    connect.fn.node.addDependency(stream.fn);

    this.functions = { connect, stream, sweeper };
    for (const [name, fn] of Object.entries(this.functions) as [FunctionName, XmppFunction][]) {
      for (const [def, access] of TABLE_ACCESS[name]) bindTable(fn.fn, this.tables.table(def), def, access);
    }
    // Only the functions that send to clients may post to or close connections.
    this.gateway.stage.grantManagementApiAccess(stream.fn);
    this.gateway.stage.grantManagementApiAccess(sweeper.fn);

    if (props.customDomain) {
      this.customDomain = new CustomDomain(this, 'CustomDomain', {
        ...props.customDomain,
        api: this.gateway.api,
        stage: this.gateway.stage,
      });
      new CfnOutput(this, 'ExecuteApiUrl', {
        description: "The stage's own endpoint, still served next to the custom domain",
        value: this.gateway.stage.url,
      });
      new CfnOutput(this, 'CustomDomainTarget', {
        description: `DNS: a CNAME from ${props.customDomain.domainName} to this name (or a Route 53 alias)`,
        value: this.customDomain.regionalDomainName,
      });
      new CfnOutput(this, 'CustomDomainHostedZoneId', {
        description: 'Hosted zone of CustomDomainTarget, for a Route 53 alias record',
        value: this.customDomain.regionalHostedZoneId,
      });
    }
    new CfnOutput(this, 'WebSocketUrl', {
      description: 'XMPP over WebSocket endpoint (RFC 7395) for clients',
      value: this.customDomain?.url ?? this.gateway.stage.url,
    });
    new CfnOutput(this, 'ConnectionsEndpoint', {
      description: 'CONNECTIONS_ENDPOINT: API Gateway Management API of the stage',
      value: this.gateway.connectionsEndpoint,
    });
    new CfnOutput(this, 'XmppDomain', { description: 'XMPP_DOMAIN', value: props.domain });
    // No function stores keys: `npm run user -- --stack` does, with the deployment's count.
    new CfnOutput(this, 'ScramIterations', {
      description: 'SCRAM_ITERATIONS: PBKDF2 iterations of the keys `npm run user -- --stack` stores',
      value: String(loadConfig({ SCRAM_ITERATIONS: settings.SCRAM_ITERATIONS }).scramIterations),
    });
    for (const { def, table } of this.tables.all()) {
      new CfnOutput(this, `${def.id}TableName`, { description: def.envVar, value: table.tableName });
    }
    this.alarms = new Alarms(this, 'Alarms', {
      functions: { Connect: connect.fn, Stream: stream.fn, Sweeper: sweeper.fn },
      sweeper: sweeper.fn,
      frameQueue: this.frameQueue.queue,
      existing: [this.frameQueue.deadLettersAlarm],
      apiId: this.gateway.api.apiId,
      stageName: this.gateway.stage.stageName,
      oldestFrameSeconds: intSetting(settings, 'ALARM_OLDEST_FRAME_SECONDS', 60),
      clientErrors: intSetting(settings, 'ALARM_CLIENT_ERRORS', 100),
      domain: props.domain,
    });
    new CfnOutput(this, 'AlarmTopicArn', {
      description: 'SNS topic every Nimbus alarm notifies: subscribe an e-mail address or a pager to it',
      value: this.alarms.topic.topicArn,
    });
    new CfnOutput(this, 'FrameQueueName', { value: this.frameQueue.queue.queueName });
    new CfnOutput(this, 'DeadLetterQueueName', { value: this.frameQueue.deadLetterQueue.queueName });

    this.dashboard = new OperationsDashboard(this, 'Operations', {
      domain: props.domain,
      api: this.gateway.api,
      stageName: this.gateway.stage.stageName,
      frameQueue: this.frameQueue.queue,
      deadLetterQueue: this.frameQueue.deadLetterQueue,
      functions: { connect: connect.fn, stream: stream.fn, sweeper: sweeper.fn },
      tables: this.tables.all().map(({ def, table }) => ({
        id: def.id,
        table,
        // A retired index kept for one deployment is rebuilt then: its throttles shown too.
        indexes: [
          ...def.globalSecondaryIndexes,
          ...(props.keepRetiredIndexes ? (RETIRED_INDEXES[def.id] ?? []) : []),
        ].map((index) => index.indexName),
      })),
    });
    new CfnOutput(this, 'DashboardName', {
      description: 'CloudWatch dashboard of this deployment',
      value: this.dashboard.dashboard.dashboardName,
    });

    this.acknowledgeNagFindings(tracing);
  }

  /**
   * The cdk-nag AwsSolutions findings that stay, each with why. Everything else the checks
   * raised was fixed at the source (own function roles instead of AWSLambdaBasicExecutionRole,
   * DynamoDB grants naming tables and indexes, SSE and TLS-only queues, a dead-letter queue,
   * stage access logs and throttling).
   */
  private acknowledgeNagFindings(tracing: boolean): void {
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

    if (tracing) {
      Validations.of(this.functions.stream).acknowledge({
        id: 'AwsSolutions-IAM5[Resource::*]',
        reason:
          'xray:PutTraceSegments and xray:PutTelemetryRecords, added by Lambda active tracing (TRACING=true), ' +
          'support no resource-level permissions: AWS documents Resource "*" for them.',
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
