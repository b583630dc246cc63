/**
 * The CDK stack as CloudFormation sees it: routes and integrations, the FIFO queue, the tables
 * (from the same definitions the local runner uses), grants, and cdk-nag's AwsSolutions checks.
 * Synthesizes once, with the context of cdk.json, so it checks what `cdk synth` produces.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { PolicyValidationPluginReport } from 'aws-cdk-lib';
import { App, AssetStaging, type CfnElement, Stack } from 'aws-cdk-lib';
import { Match, Template } from 'aws-cdk-lib/assertions';
import { AwsSolutionsChecks } from 'cdk-nag';
import { beforeAll, describe, expect, it } from 'vitest';
import { createMetricsPublisher } from '../../functions/telemetry.ts';
import { RETIRED_INDEXES, XmppTables } from '../../infra/constructs/tables.ts';
import { STAGE_NAME } from '../../infra/constructs/websocket-gateway.ts';
import { FUNCTION_MEMORY_MB } from '../../infra/constructs/xmpp-function.ts';
import { DEPLOYED_EVENT_SOURCE } from '../../infra/local/event-source.ts';
import { checkedSettings, NimbusStack, STREAM_TIMEOUT } from '../../infra/stack.ts';
import { METRIC_NAMESPACE } from '../../shared/metrics.ts';
import { decodeQueueMessage } from '../../shared/queue-message.ts';
import {
  allTables,
  type IndexDefinition,
  projectionOf,
  SWEEP_INDEX,
  usersTable,
} from '../../shared/tables.ts';

const DOMAIN = 'chat.example.org';
const TABLE_ENV_VARS = allTables.map((def) => def.envVar);

// biome-ignore lint/suspicious/noExplicitAny: synthesized CloudFormation is untyped JSON; the expectations are the type check.
type CfnProperties = Record<string, any>;

interface Resource {
  Type: string;
  Properties: CfnProperties;
  DeletionPolicy?: string;
  DependsOn?: string[];
}
interface Statement {
  Action: string | string[];
  Effect: string;
  Resource: unknown;
}

let stack: NimbusStack;
let template: Template;
let resources: Record<string, Resource>;
let nagReport: PolicyValidationPluginReport;

const logicalId = (construct: { node: { defaultChild?: unknown } }) =>
  stack.getLogicalId(construct.node.defaultChild as CfnElement);

function resourcesOfType(type: string): [string, Resource][] {
  return Object.entries(resources).filter(([, resource]) => resource.Type === type);
}

function routeIntegration(routeKey: string): Resource {
  const [[, route]] = resourcesOfType('AWS::ApiGatewayV2::Route').filter(
    ([, r]) => r.Properties.RouteKey === routeKey,
  );
  const [, parts] = route.Properties.Target['Fn::Join'];
  expect(parts[0]).toBe('integrations/');
  return resources[parts[1].Ref];
}

function statementsOfRole(roleLogicalId: string): Statement[] {
  return resourcesOfType('AWS::IAM::Policy')
    .filter(([, p]) => p.Properties.Roles.some((role: { Ref: string }) => role.Ref === roleLogicalId))
    .flatMap(([, p]) => p.Properties.PolicyDocument.Statement as Statement[]);
}

const actionsOf = (statement: Statement) => [statement.Action].flat();

function functionProperties(name: keyof typeof FUNCTION_MEMORY_MB): CfnProperties {
  return resources[logicalId(stack.functions[name].fn)].Properties;
}

function functionRoleStatements(name: keyof typeof FUNCTION_MEMORY_MB): Statement[] {
  return statementsOfRole(logicalId(stack.functions[name].role));
}

beforeAll(() => {
  const cdkJson = JSON.parse(readFileSync(new URL('../../cdk.json', import.meta.url), 'utf8'));
  const app = new App({ context: cdkJson.context });
  stack = new NimbusStack(app, 'Nimbus', { domain: DOMAIN, settings: { SM_MAX_SECONDS: '600' } });
  template = Template.fromStack(stack);
  resources = template.toJSON().Resources;
  nagReport = new AwsSolutionsChecks(app).validateScope(stack);
}, 120_000);

describe('WebSocket API', () => {
  it('has exactly the $connect, $default and $disconnect routes', () => {
    const routeKeys = resourcesOfType('AWS::ApiGatewayV2::Route').map(([, r]) => r.Properties.RouteKey);
    expect(routeKeys.sort()).toEqual(['$connect', '$default', '$disconnect']);
  });

  it('routes $connect to the connect function through a Lambda proxy integration', () => {
    const integration = routeIntegration('$connect');
    expect(integration.Properties.IntegrationType).toBe('AWS_PROXY');
    expect(JSON.stringify(integration.Properties.IntegrationUri)).toContain(
      logicalId(stack.functions.connect.fn),
    );
  });

  it.each(['$default', '$disconnect'])('sends %s to the FIFO queue with SendMessage', (routeKey) => {
    const { Properties: integration } = routeIntegration(routeKey);
    expect(integration.IntegrationType).toBe('AWS');
    expect(integration.IntegrationMethod).toBe('POST');
    const uri = JSON.stringify(integration.IntegrationUri);
    expect(uri).toContain(':sqs:path/');
    expect(uri).toContain(logicalId(stack.frameQueue.queue));
    expect(integration.RequestParameters).toEqual({
      'integration.request.header.Content-Type': "'application/x-www-form-urlencoded'",
    });
    expect(integration.TemplateSelectionExpression).toBe('\\$default');
    expect(integration.PassthroughBehavior).toBe('NEVER');
    const requestTemplate: string = integration.RequestTemplates.$default;
    expect(requestTemplate).toContain('Action=SendMessage');
    expect(requestTemplate).toContain('&MessageGroupId=$util.urlEncode($context.connectionId)&');
    expect(requestTemplate).toContain('&MessageDeduplicationId=$util.urlEncode($context.requestId)&');
    expect(requestTemplate).toContain('&MessageBody=$util.urlEncode($message)');
  });

  it('lets API Gateway only send messages to the frame queue', () => {
    const { Properties: integration } = routeIntegration('$default');
    const roleLogicalId = integration.CredentialsArn['Fn::GetAtt'][0];
    expect(statementsOfRole(roleLogicalId)).toEqual([
      {
        Action: 'sqs:SendMessage',
        Effect: 'Allow',
        Resource: { 'Fn::GetAtt': [logicalId(stack.frameQueue.queue), 'Arn'] },
      },
    ]);
  });

  it('deploys one auto-deployed stage with throttling and JSON access logs', () => {
    template.resourceCountIs('AWS::ApiGatewayV2::Stage', 1);
    template.hasResourceProperties('AWS::ApiGatewayV2::Stage', {
      StageName: STAGE_NAME,
      AutoDeploy: true,
      DefaultRouteSettings: { ThrottlingRateLimit: Match.anyValue(), ThrottlingBurstLimit: Match.anyValue() },
      AccessLogSettings: {
        DestinationArn: { 'Fn::GetAtt': [logicalId(stack.gateway.accessLogs), 'Arn'] },
        Format: Match.stringLikeRegexp('"connectionId":"\\$context.connectionId".*"integrationError"'),
      },
    });
  });

  it('outputs the wss URL of the stage and the name of every table', () => {
    const outputs = template.toJSON().Outputs;
    expect(JSON.stringify(outputs.WebSocketUrl.Value)).toMatch(
      /^\{"Fn::Join":\["",\["wss:\/\/".*\/xmpp"\]\]\}$/,
    );
    for (const def of allTables) {
      expect(outputs[`${def.id}TableName`]).toEqual({
        Description: def.envVar,
        Value: { Ref: logicalId(stack.tables.table(def)) },
      });
    }
    expect(outputs.FrameQueueName.Value).toEqual({
      'Fn::GetAtt': [logicalId(stack.frameQueue.queue), 'QueueName'],
    });
  });
});

/**
 * Renders a SendMessage request template the way API Gateway would for the few constructs it
 * uses (`#set`, `${q}`, `$context.*`, `$util.*`). Any reference left unrendered fails the test,
 * so a misspelt variable cannot slip through. A shape check, not a Velocity engine.
 */
function renderSendMessageTemplate(
  requestTemplate: string,
  context: Record<string, string | number>,
  body: string,
): string {
  const match = /^#set\(\$q = '"'\)#set\(\$message = "(.*)"\)(Action=.*)$/.exec(requestTemplate);
  if (!match) throw new Error(`unexpected template shape: ${requestTemplate}`);
  const quoteReference = '$' + '{q}';
  const expand = (text: string) =>
    text
      .replaceAll(quoteReference, '"')
      .replaceAll('$util.base64Encode($input.body)', Buffer.from(body).toString('base64'))
      .replace(/\$context\.(\w+(?:\.\w+)*)/g, (reference, name: string) =>
        name in context ? String(context[name]) : reference,
      );
  const message = expand(match[1]);
  expect(message).not.toContain('$');
  const form = match[2].replace(/\$util\.urlEncode\((\$[\w.]+)\)/g, (_, reference: string) =>
    encodeURIComponent(reference === '$message' ? message : expand(reference)),
  );
  expect(form).not.toContain('$');
  return form;
}

describe('queue message template', () => {
  // Connection and request ids are base64: `+`, `/` and `=` must survive form encoding.
  const context = {
    connectionId: 'Ab+c/DEF12gCIdw=',
    requestId: 'Xy+z/QRS34hDJew=',
    requestTimeEpoch: 1735689600123,
    connectedAt: 1735689599001,
    'identity.sourceIp': '198.51.100.7',
  };

  it('puts a frame on the queue as the QueueMessage of shared/queue-message.ts, grouped by connection', () => {
    const frame = `<message to='juliet@${DOMAIN}' type='chat'><body>it's 1 + 1 & "quoted"</body></message>`;
    const requestTemplate = routeIntegration('$default').Properties.RequestTemplates.$default;
    const form = new URLSearchParams(
      renderSendMessageTemplate(requestTemplate, { ...context, eventType: 'MESSAGE' }, frame),
    );

    expect(form.get('Action')).toBe('SendMessage');
    expect(form.get('MessageGroupId')).toBe(context.connectionId);
    expect(form.get('MessageDeduplicationId')).toBe(context.requestId);
    const messageBody = form.get('MessageBody') ?? '';
    expect(JSON.parse(messageBody)).toEqual({
      connectionId: context.connectionId,
      eventType: 'MESSAGE',
      requestTimeEpoch: context.requestTimeEpoch,
      requestId: context.requestId,
      body: Buffer.from(frame).toString('base64'),
      // What the stream's first frame writes into the connection row ($connect writes none).
      connectedAt: context.connectedAt,
      sourceIp: context['identity.sourceIp'],
    });
    expect(decodeQueueMessage(messageBody)).toEqual({
      connectionId: context.connectionId,
      kind: 'frame',
      frame,
      receivedAt: context.requestTimeEpoch,
      frameId: context.requestId,
      requestId: context.requestId,
      connectedAt: context.connectedAt,
      sourceIp: context['identity.sourceIp'],
    });
  });

  it('puts a disconnect on the queue without a body, in the same group', () => {
    const requestTemplate = routeIntegration('$disconnect').Properties.RequestTemplates.$default;
    const form = new URLSearchParams(
      renderSendMessageTemplate(requestTemplate, { ...context, eventType: 'DISCONNECT' }, ''),
    );

    expect(form.get('MessageGroupId')).toBe(context.connectionId);
    expect(form.get('MessageDeduplicationId')).toBe(context.requestId);
    const messageBody = form.get('MessageBody') ?? '';
    expect(JSON.parse(messageBody)).toEqual({
      connectionId: context.connectionId,
      eventType: 'DISCONNECT',
      requestTimeEpoch: context.requestTimeEpoch,
      requestId: context.requestId,
    });
    expect(decodeQueueMessage(messageBody)).toEqual({
      connectionId: context.connectionId,
      kind: 'disconnect',
      frame: '',
      receivedAt: context.requestTimeEpoch,
      frameId: context.requestId,
      requestId: context.requestId,
    });
  });
});

describe('frame queue', () => {
  it('is FIFO, de-duplicated by request id only, encrypted, with a FIFO dead-letter queue', () => {
    const queue = resources[logicalId(stack.frameQueue.queue)].Properties;
    const deadLetterQueueId = logicalId(stack.frameQueue.deadLetterQueue);
    expect(queue).toMatchObject({
      FifoQueue: true,
      ContentBasedDeduplication: false,
      SqsManagedSseEnabled: true,
      RedrivePolicy: {
        deadLetterTargetArn: { 'Fn::GetAtt': [deadLetterQueueId, 'Arn'] },
        // A connection's frames behind a failing one are returned unprocessed, and that counts.
        maxReceiveCount: 20,
      },
    });
    expect(resources[deadLetterQueueId].Properties).toMatchObject({
      FifoQueue: true,
      SqsManagedSseEnabled: true,
    });
  });

  it('keeps a message invisible for at least six times the stream timeout', () => {
    const queue = resources[logicalId(stack.frameQueue.queue)].Properties;
    expect(STREAM_TIMEOUT.toSeconds()).toBe(30);
    expect(queue.VisibilityTimeout).toBeGreaterThanOrEqual(6 * STREAM_TIMEOUT.toSeconds());
    expect(functionProperties('stream').Timeout).toBe(STREAM_TIMEOUT.toSeconds());
  });

  it('refuses requests without TLS on both queues', () => {
    for (const queue of [stack.frameQueue.queue, stack.frameQueue.deadLetterQueue]) {
      template.hasResourceProperties('AWS::SQS::QueuePolicy', {
        Queues: [{ Ref: logicalId(queue) }],
        PolicyDocument: {
          Statement: Match.arrayWith([
            Match.objectLike({ Effect: 'Deny', Condition: { Bool: { 'aws:SecureTransport': 'false' } } }),
          ]),
        },
      });
    }
  });

  it('feeds the stream function in batches of 10 with partial batch responses', () => {
    expect(DEPLOYED_EVENT_SOURCE.concurrency).toBe(100);
    template.resourceCountIs('AWS::Lambda::EventSourceMapping', 1);
    template.hasResourceProperties('AWS::Lambda::EventSourceMapping', {
      EventSourceArn: { 'Fn::GetAtt': [logicalId(stack.frameQueue.queue), 'Arn'] },
      FunctionName: { Ref: logicalId(stack.functions.stream.fn) },
      BatchSize: 10,
      FunctionResponseTypes: ['ReportBatchItemFailures'],
      // A flood of frames may take at most this many instances, so logins are never starved;
      // the local emulator's default is the same (README, "Failing like AWS, locally").
      ScalingConfig: { MaximumConcurrency: DEPLOYED_EVENT_SOURCE.concurrency },
    });
  });
});

describe('failing safely', () => {
  it('throttles $connect below the frames of established streams, per route', () => {
    template.hasResourceProperties('AWS::ApiGatewayV2::Stage', {
      RouteSettings: {
        $connect: { ThrottlingRateLimit: 100, ThrottlingBurstLimit: 200 },
        $default: { ThrottlingRateLimit: 1000, ThrottlingBurstLimit: 2000 },
      },
    });
    // CloudFormation creates the routes before the stage that names them.
    const [[, stage]] = resourcesOfType('AWS::ApiGatewayV2::Stage');
    const routes = resourcesOfType('AWS::ApiGatewayV2::Route').map(([id]) => id);
    expect(routes).toHaveLength(3);
    for (const route of routes) expect(stage.DependsOn).toContain(route);
  });

  it('reserves concurrency for logins', () => {
    expect(functionProperties('connect').ReservedConcurrentExecutions).toBe(10);
    expect(functionProperties('stream').ReservedConcurrentExecutions).toBeUndefined();
  });

  it('alarms on every function’s errors and throttles, the oldest frame, dead letters (depth and count), a silent sweeper, integration, execution and client errors, all to one topic', () => {
    const alarms = resourcesOfType('AWS::CloudWatch::Alarm').map(([, alarm]) => alarm.Properties);
    const topic = logicalId(stack.alarms.topic);
    for (const alarm of alarms) expect(alarm.AlarmActions).toEqual([{ Ref: topic }]);
    const byMetric = (namespace: string, name: string) =>
      alarms.filter((alarm) => alarm.Namespace === namespace && alarm.MetricName === name);
    expect(byMetric('AWS/Lambda', 'Errors')).toHaveLength(3);
    expect(byMetric('AWS/Lambda', 'Throttles')).toHaveLength(3);
    expect(byMetric('AWS/SQS', 'ApproximateAgeOfOldestMessage')).toEqual([
      expect.objectContaining({ Threshold: 60, Statistic: 'Maximum' }),
    ]);
    expect(byMetric('AWS/SQS', 'ApproximateNumberOfMessagesVisible')).toHaveLength(1);
    expect(byMetric(METRIC_NAMESPACE, 'FramesDeadLettered')).toHaveLength(1);
    // IntegrationError less the handshakes the connect function refused (a 4XX of its own).
    const integration = alarms.filter((alarm) =>
      JSON.stringify(alarm.Metrics ?? []).includes('"MetricName":"IntegrationError"'),
    );
    expect(integration).toHaveLength(1);
    const metrics = integration[0]?.Metrics as {
      Id: string;
      Expression?: string;
      MetricStat?: { Metric: { Namespace: string; MetricName: string } };
    }[];
    expect(metrics.find((m) => m.Expression)?.Expression).toBe('FILL(errors, 0) - FILL(refused, 0)');
    expect(metrics.find((m) => m.Id === 'errors')?.MetricStat?.Metric).toMatchObject({
      Namespace: 'AWS/ApiGateway',
      MetricName: 'IntegrationError',
    });
    expect(metrics.find((m) => m.Id === 'refused')?.MetricStat?.Metric).toMatchObject({
      Namespace: METRIC_NAMESPACE,
      MetricName: 'HandshakesRefused',
    });
    expect(integration[0]).toMatchObject({ Threshold: 0, ComparisonOperator: 'GreaterThanThreshold' });
    expect(byMetric('AWS/ApiGateway', 'ExecutionError')).toEqual([
      expect.objectContaining({ Threshold: 0, ComparisonOperator: 'GreaterThanThreshold' }),
    ]);
    // The sweeper runs every minute: a quarter hour with no invocation (no datapoint at all) alarms.
    const sweeper = logicalId(stack.functions.sweeper.fn);
    expect(
      byMetric('AWS/Lambda', 'Invocations').filter((alarm) =>
        (alarm.Dimensions as { Value: unknown }[]).some((d) => JSON.stringify(d.Value).includes(sweeper)),
      ),
    ).toEqual([
      expect.objectContaining({
        Threshold: 1,
        ComparisonOperator: 'LessThanThreshold',
        Period: 900,
        TreatMissingData: 'breaching',
      }),
    ]);
    // Client errors (throttled requests among them) past a threshold, not at the first one.
    expect(byMetric('AWS/ApiGateway', 'ClientError')).toEqual([
      expect.objectContaining({ Threshold: 100, Statistic: 'Sum', Period: 300 }),
    ]);
    template.hasOutput('AlarmTopicArn', { Value: { Ref: topic } });
  });

  it.each([
    // The depth alarm stays in ALARM until the queue is emptied; this one notifies again.
    ['every period with dead-lettered frames', 'FramesDeadLettered', 1],
    // One sweep cut short is a burst; a quarter hour of them, a sweeper falling behind.
    ['three periods in a row of sweeps cut short', 'SweepsCutShort', 3],
  ] as const)('alarms on %s, on the metric the function writes', (_what, name, periods) => {
    const [alarm, ...others] = resourcesOfType('AWS::CloudWatch::Alarm')
      .map(([, resource]) => resource.Properties)
      .filter((properties) => properties.MetricName === name);
    expect(others).toEqual([]);
    expect(alarm).toMatchObject({
      Statistic: 'Sum',
      Threshold: 0,
      ComparisonOperator: 'GreaterThanThreshold',
      EvaluationPeriods: periods,
      TreatMissingData: 'notBreaching',
    });
    if (periods > 1) expect(alarm.DatapointsToAlarm).toBe(periods);
    // The namespace and dimensions of the EMF line functions/telemetry.ts writes for the count.
    const lines: string[] = [];
    createMetricsPublisher({ domain: DOMAIN, write: (line) => lines.push(line) })([{ name, value: 1 }]);
    const [line] = lines.map((text) => JSON.parse(text));
    const [directive] = line._aws.CloudWatchMetrics;
    expect(directive.Metrics).toEqual([{ Name: name, Unit: 'Count' }]);
    expect(alarm.Namespace).toBe(directive.Namespace);
    const [dimensionNames] = directive.Dimensions as string[][];
    expect(
      (alarm.Dimensions as { Name: string; Value: string }[]).sort((a, b) => a.Name.localeCompare(b.Name)),
    ).toEqual(
      dimensionNames
        .map((name) => ({ Name: name, Value: line[name] }))
        .sort((a, b) => a.Name.localeCompare(b.Name)),
    );
  });

  it("lets this account's CloudWatch alarms publish to the alarm topic, which every alarm notifies", () => {
    // A topic policy replaces SNS's default one: without this Allow, enforceSSL's policy would
    // leave CloudWatch "not authorized to perform: SNS:Publish".
    const topic = logicalId(stack.alarms.topic);
    template.hasResourceProperties('AWS::SNS::TopicPolicy', {
      Topics: [{ Ref: topic }],
      PolicyDocument: Match.objectLike({
        Statement: Match.arrayWith([
          Match.objectLike({
            Effect: 'Allow',
            Principal: { Service: 'cloudwatch.amazonaws.com' },
            Action: 'sns:Publish',
            Resource: { Ref: topic },
            Condition: Match.objectLike({
              StringEquals: { 'aws:SourceAccount': { Ref: 'AWS::AccountId' } },
              ArnLike: { 'aws:SourceArn': Match.anyValue() },
            }),
          }),
        ]),
      }),
    });
    const alarms = Object.values(template.findResources('AWS::CloudWatch::Alarm'));
    expect(alarms.length).toBeGreaterThan(5);
    for (const alarm of alarms) expect(alarm.Properties.AlarmActions).toEqual([{ Ref: topic }]);
  });

  it('encrypts the alarm topic and refuses it without TLS; its key goes with the stack', () => {
    template.hasResourceProperties('AWS::SNS::Topic', { KmsMasterKeyId: Match.anyValue() });
    // Nothing else uses the key: kept after the stack it would cost $1 a month protecting nothing.
    template.hasResource('AWS::KMS::Key', {
      DeletionPolicy: 'Delete',
      Properties: Match.objectLike({ EnableKeyRotation: true, PendingWindowInDays: 7 }),
    });
    // CloudWatch may use the key for what publishing to an encrypted topic needs, and only that.
    const [key, ...others] = Object.values(template.findResources('AWS::KMS::Key'));
    expect(others).toEqual([]);
    const forCloudWatch = (
      key.Properties.KeyPolicy.Statement as { Principal?: { Service?: string }; Action: string[] }[]
    ).filter((s) => s.Principal?.Service === 'cloudwatch.amazonaws.com');
    expect(forCloudWatch.map((s) => s.Action)).toEqual([['kms:Decrypt', 'kms:GenerateDataKey*']]);
    template.hasResourceProperties('AWS::SNS::TopicPolicy', {
      PolicyDocument: Match.objectLike({
        Statement: Match.arrayWith([
          Match.objectLike({ Effect: 'Deny', Condition: { Bool: { 'aws:SecureTransport': 'false' } } }),
        ]),
      }),
    });
  });

  it('takes the concurrency settings, 0 leaving them unset, and refuses nonsense', () => {
    expect(() => checkedSettings({ STREAM_MAX_CONCURRENCY: '1' })).toThrow(/STREAM_MAX_CONCURRENCY/);
    expect(() => checkedSettings({ CONNECT_RESERVED_CONCURRENCY: '-1' })).toThrow(
      /CONNECT_RESERVED_CONCURRENCY/,
    );
    expect(checkedSettings({ STREAM_MAX_CONCURRENCY: '0', CONNECT_RESERVED_CONCURRENCY: '0' })).toEqual({
      STREAM_MAX_CONCURRENCY: '0',
      CONNECT_RESERVED_CONCURRENCY: '0',
    });
  });
});

function projectionTemplate(index: IndexDefinition): Record<string, unknown> {
  const wanted = projectionOf(index);
  return wanted.type === 'INCLUDE'
    ? { ProjectionType: 'INCLUDE', NonKeyAttributes: wanted.attributes }
    : { ProjectionType: wanted.type };
}

describe('tables', () => {
  it('builds exactly one table per definition', () => {
    template.resourceCountIs('AWS::DynamoDB::GlobalTable', allTables.length);
  });

  it('keeps and protects every table with user data: all but Sessions', () => {
    const kept = allTables.filter((def) => {
      const table = resources[logicalId(stack.tables.table(def))];
      return (
        table.DeletionPolicy === 'Retain' &&
        table.Properties.Replicas[0].DeletionProtectionEnabled === true &&
        table.Properties.Replicas[0].PointInTimeRecoverySpecification.PointInTimeRecoveryEnabled === true
      );
    });
    expect(kept.map((def) => def.id).sort()).toEqual(['Archive', 'Offline', 'Roster', 'Users']);
  });

  it.each(allTables.map((def) => [def.id, def] as const))('%s matches its definition', (_, def) => {
    const table = resources[logicalId(stack.tables.table(def))];
    const props = table.Properties;
    expect(props.BillingMode).toBe('PAY_PER_REQUEST');
    expect(props.KeySchema).toEqual([
      { AttributeName: def.partitionKey.name, KeyType: 'HASH' },
      { AttributeName: def.sortKey.name, KeyType: 'RANGE' },
    ]);
    const keys = [
      def.partitionKey,
      def.sortKey,
      ...def.globalSecondaryIndexes.flatMap((i) => [i.partitionKey, i.sortKey ?? []].flat()),
    ];
    expect(props.AttributeDefinitions).toEqual(
      expect.arrayContaining(keys.map((k) => ({ AttributeName: k.name, AttributeType: k.type }))),
    );
    expect(props.TimeToLiveSpecification).toEqual({ AttributeName: def.timeToLiveAttribute, Enabled: true });
    expect(props.Replicas).toHaveLength(1);
    expect(props.Replicas[0].PointInTimeRecoverySpecification).toEqual({
      PointInTimeRecoveryEnabled: def.pointInTimeRecovery,
    });
    expect(table.DeletionPolicy).toBe(def.pointInTimeRecovery ? 'Retain' : 'Delete');
    // User data is also protected from a DeleteTable outside the stack.
    expect(props.Replicas[0].DeletionProtectionEnabled ?? false).toBe(def.pointInTimeRecovery);
    expect(props.GlobalSecondaryIndexes ?? []).toEqual(
      def.globalSecondaryIndexes.map((index) => ({
        IndexName: index.indexName,
        KeySchema: [
          { AttributeName: index.partitionKey.name, KeyType: 'HASH' },
          ...(index.sortKey ? [{ AttributeName: index.sortKey.name, KeyType: 'RANGE' }] : []),
        ],
        Projection: projectionTemplate(index),
      })),
    );
  });

  it('never allows a Scan, to any role', () => {
    const policies = resourcesOfType('AWS::IAM::Policy');
    // An empty list would make the loop below check nothing.
    expect(policies.length).toBeGreaterThan(0);
    const actions: string[] = [];
    for (const [, policy] of policies) {
      for (const statement of policy.Properties.PolicyDocument.Statement as Statement[]) {
        actions.push(...actionsOf(statement));
        expect(actionsOf(statement)).not.toContain('dynamodb:Scan');
        expect(actionsOf(statement)).not.toContain('dynamodb:*');
      }
    }
    // The policies read are the ones granting table access.
    expect(actions).toContain('dynamodb:Query');
  });
});

describe('functions', () => {
  const names = Object.keys(FUNCTION_MEMORY_MB) as (keyof typeof FUNCTION_MEMORY_MB)[];

  it.each(names)('%s runs on Node.js 22 arm64 with its memory figure and the domain', (name) => {
    const props = functionProperties(name);
    expect(props.Runtime).toBe('nodejs22.x');
    expect(props.Architectures).toEqual(['arm64']);
    expect(props.MemorySize).toBe(FUNCTION_MEMORY_MB[name]);
    expect(props.Handler).toBe('index.handler');
    expect(props.Environment.Variables.XMPP_DOMAIN).toBe(DOMAIN);
  });

  it.each(names)('%s logs to its own log group, kept 30 days', (name) => {
    const logGroupId = logicalId(stack.functions[name].logGroup);
    expect(functionProperties(name).LoggingConfig.LogGroup).toEqual({ Ref: logGroupId });
    expect(resources[logGroupId].Properties.RetentionInDays).toBe(30);
  });

  it('keeps API Gateway access logs 30 days', () => {
    expect(resources[logicalId(stack.gateway.accessLogs)].Properties.RetentionInDays).toBe(30);
  });

  const expectStageManagementEndpoint = (variables: CfnProperties) =>
    expect(JSON.stringify(variables.CONNECTIONS_ENDPOINT)).toMatch(
      new RegExp(
        `^\\{"Fn::Join":\\["",\\["https://",\\{"Ref":"${logicalId(stack.gateway.api)}"\\}.*/${STAGE_NAME}"\\]\\]\\}$`,
      ),
    );

  it('gives connect no table and no management endpoint (it only answers the handshake)', () => {
    const variables = functionProperties('connect').Environment.Variables;
    expect(Object.keys(variables).filter((name) => TABLE_ENV_VARS.includes(name))).toEqual([]);
    expect(variables.CONNECTIONS_ENDPOINT).toBeUndefined();
    expect(JSON.stringify(functionRoleStatements('connect'))).not.toContain('dynamodb:');
  });

  it('updates connect after stream: the code that creates connection rows is in place first', () => {
    expect(resources[logicalId(stack.functions.connect.fn)].DependsOn).toContain(
      logicalId(stack.functions.stream.fn),
    );
  });

  it.each(['stream', 'sweeper'] as const)(
    'gives %s every table and the stage management endpoint',
    (name) => {
      const variables = functionProperties(name).Environment.Variables;
      for (const def of allTables) {
        expect(variables[def.envVar]).toEqual({ Ref: logicalId(stack.tables.table(def)) });
      }
      expectStageManagementEndpoint(variables);
    },
  );

  it('lets sweeper only read Users, and write Sessions and Offline', () => {
    const statements = functionRoleStatements('sweeper');
    const usersArn = { 'Fn::GetAtt': [logicalId(stack.tables.table(usersTable)), 'Arn'] };
    const onUsers = statements.filter((s) => JSON.stringify(s.Resource).includes(JSON.stringify(usersArn)));
    expect(onUsers.flatMap(actionsOf).sort()).toEqual(
      ['dynamodb:BatchGetItem', 'dynamodb:ConditionCheckItem', 'dynamodb:GetItem', 'dynamodb:Query'].sort(),
    );
  });

  it('grants BatchWriteItem only on the tables written in batches (the archive), to any role', () => {
    const policies = resourcesOfType('AWS::IAM::Policy');
    const batchWriting = allTables.filter((def) => def.batchWrites).map((def) => def.id);
    expect(batchWriting).toEqual(['Archive']);
    const granted = new Set<string>();
    for (const [, policy] of policies) {
      for (const statement of policy.Properties.PolicyDocument.Statement as Statement[]) {
        if (!actionsOf(statement).includes('dynamodb:BatchWriteItem')) continue;
        const resources = JSON.stringify(statement.Resource);
        for (const def of allTables)
          if (resources.includes(`"${logicalId(stack.tables.table(def))}"`)) granted.add(def.id);
      }
    }
    expect([...granted]).toEqual(['Archive']);
  });

  it('lets only stream and sweeper manage connections, on this stage only', () => {
    const manageConnections = (name: keyof typeof FUNCTION_MEMORY_MB) =>
      functionRoleStatements(name).filter((s) => actionsOf(s).includes('execute-api:ManageConnections'));
    for (const name of ['stream', 'sweeper'] as const) {
      const [statement, ...others] = manageConnections(name);
      expect(others).toEqual([]);
      expect(JSON.stringify(statement.Resource)).toContain(
        `{"Ref":"${logicalId(stack.gateway.api)}"},"/${STAGE_NAME}/*/@connections/*"`,
      );
    }
    expect(manageConnections('connect')).toEqual([]);
    const grantedAnywhere = resourcesOfType('AWS::IAM::Policy').filter(([, p]) =>
      (p.Properties.PolicyDocument.Statement as Statement[]).some((s) =>
        actionsOf(s).includes('execute-api:ManageConnections'),
      ),
    );
    expect(grantedAnywhere).toHaveLength(2);
  });

  it('lets only stream bring its handed-back frames again soon: ChangeMessageVisibility on the frame queue, and its URL', () => {
    const queueArn = { 'Fn::GetAtt': [logicalId(stack.frameQueue.queue), 'Arn'] };
    const changes = (name: keyof typeof FUNCTION_MEMORY_MB) =>
      functionRoleStatements(name).filter((s) => actionsOf(s).includes('sqs:ChangeMessageVisibility'));
    const [statement, ...others] = changes('stream');
    expect(others).toEqual([]);
    expect(statement.Resource).toEqual(queueArn);
    expect(changes('sweeper')).toEqual([]);
    expect(changes('connect')).toEqual([]);
    expect(functionProperties('stream').Environment.Variables.FRAME_QUEUE_URL).toEqual({
      Ref: logicalId(stack.frameQueue.queue),
    });
  });

  it('bundles the sweeper’s phases into the sweeper only (NIMBUS_SWEEPS, folded at build time)', () => {
    // The staged asset of each function: the bundle CloudFormation deploys.
    const bundle = (name: keyof typeof FUNCTION_MEMORY_MB) => {
      const fn = stack.functions[name].fn;
      const code = fn.node.findAll().find((child) => child instanceof AssetStaging) as AssetStaging;
      return readFileSync(join(code.absoluteStagedPath, 'index.mjs'), 'utf8');
    };
    // A log line of the probe phase (xep-0198), the archive step's isolation, and the store
    // methods only the sweeper calls: the sweep index's listing (sm-queue.ts listSwept), a probe's
    // deferral (deferProbe), the archive's expiry sweep (its index query) and queued purges.
    const sweeperOnly = [
      'sweepShard = :shard AND sweepAt <= :upTo',
      'SET sweepAt = :at, sweepShard = :shard',
      'expShard = :shard AND nextExpiry <= :now',
    ];
    expect(bundle('sweeper')).toContain('probe found a vanished socket');
    expect(bundle('sweeper')).toContain('"archive-expiry"');
    for (const text of sweeperOnly) expect(bundle('sweeper')).toContain(text);
    for (const name of ['stream', 'connect'] as const) {
      expect(bundle(name)).not.toContain('probe found a vanished socket');
      expect(bundle(name)).not.toContain('"archive-expiry"');
      for (const text of sweeperOnly) expect(bundle(name)).not.toContain(text);
    }
    expect(bundle('stream')).toContain("the sweeper's work, not in this function's bundle");
  });

  it("leaves the operator's commands (listings, account creation, passwords, deletion) out of every function bundle (NIMBUS_ADMIN)", () => {
    const bundle = (name: keyof typeof FUNCTION_MEMORY_MB) => {
      const fn = stack.functions[name].fn;
      const code = fn.node.findAll().find((child) => child instanceof AssetStaging) as AssetStaging;
      return readFileSync(join(code.absoluteStagedPath, 'index.mjs'), 'utf8');
    };
    // The Scans' filters (users.ts `list`, sessions.ts `listAllResources`).
    for (const name of ['stream', 'connect', 'sweeper'] as const) {
      expect(bundle(name)).not.toContain('begins_with(pk, :user) AND begins_with(sk, :res)');
      expect(bundle(name)).not.toContain('sk = :credentials');
      // Account deletion's marks (sessions.ts revokeConnection, sm-queue.ts revoke).
      expect(bundle(name)).not.toContain('SET revoked = :revocation');
      expect(bundle(name)).toContain("an operator's command, not in a function's bundle");
    }
  });

  it('runs the sweeper every minute, a run never retried nor held back past its minute', () => {
    template.hasResourceProperties('AWS::Events::Rule', {
      ScheduleExpression: 'rate(1 minute)',
      Targets: [
        Match.objectLike({
          Arn: { 'Fn::GetAtt': [logicalId(stack.functions.sweeper.fn), 'Arn'] },
          RetryPolicy: { MaximumRetryAttempts: 0, MaximumEventAgeInSeconds: 60 },
        }),
      ],
    });
    template.hasResourceProperties('AWS::Lambda::EventInvokeConfig', {
      FunctionName: { Ref: logicalId(stack.functions.sweeper.fn) },
      MaximumRetryAttempts: 0,
      MaximumEventAgeInSeconds: 60,
    });
  });
});

describe('settings', () => {
  it('passes tunables to the functions that read them, not to connect', () => {
    expect(functionProperties('stream').Environment.Variables.SM_MAX_SECONDS).toBe('600');
    expect(functionProperties('sweeper').Environment.Variables.SM_MAX_SECONDS).toBe('600');
    expect(functionProperties('connect').Environment.Variables.SM_MAX_SECONDS).toBeUndefined();
  });

  it('refuses an unknown setting and a malformed value at synth time', () => {
    expect(() => checkedSettings({ SM_MAX_SECOND: '1' })).toThrow(/Unknown setting SM_MAX_SECOND/);
    expect(() => checkedSettings({ OFFLINE_QUOTA: 'many' })).toThrow(/OFFLINE_QUOTA/);
    expect(checkedSettings({ OFFLINE_QUOTA: '5000' })).toEqual({ OFFLINE_QUOTA: '5000' });
  });
});

describe('cdk-nag AwsSolutions', () => {
  it('has no finding left that is neither fixed nor acknowledged with a reason in infra/', () => {
    const findings = nagReport.violations.map((violation) => ({
      rule: violation.ruleName,
      severity: violation.severity,
      resources: violation.violatingResources.map((resource) => resource.resourceLogicalId),
    }));
    expect(findings).toEqual([]);
    expect(nagReport.success).toBe(true);
  });
});

describe('upgrading across an index change', () => {
  // CloudFormation cannot delete one global secondary index and create another in one update:
  // a stack deployed with the retired index moves in two deployments (README, "Upgrading").
  const sessionsIndexes = (keepRetiredIndexes: boolean) => {
    const scope = new Stack(new App(), 'Tables');
    new XmppTables(scope, 'Tables', { keepRetiredIndexes });
    const [table] = Object.values(
      Template.fromStack(scope).findResources('AWS::DynamoDB::GlobalTable'),
    ).filter((resource) =>
      (resource.Properties.GlobalSecondaryIndexes ?? []).some(
        (index: { IndexName: string }) => index.IndexName === SWEEP_INDEX,
      ),
    );
    return (
      table.Properties.GlobalSecondaryIndexes as {
        IndexName: string;
        Projection: { ProjectionType: string };
      }[]
    ).map((index) => `${index.IndexName} ${index.Projection.ProjectionType}`);
  };

  it('keeps the retired sweep index beside the new one when asked, and drops it otherwise', () => {
    expect(sessionsIndexes(false)).toEqual(['bySweepKeys KEYS_ONLY']);
    expect(sessionsIndexes(true)).toEqual(['bySweepKeys KEYS_ONLY', 'bySweepTime ALL']);
    expect(RETIRED_INDEXES.Sessions?.map((index) => index.indexName)).toEqual(['bySweepTime']);
  });
});
