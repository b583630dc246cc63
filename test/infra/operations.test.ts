/**
 * What an operator gets from the stack (issue 14): the CloudWatch dashboard, the metric
 * namespace and log level of each function, tracing only when asked for, and the custom domain
 * only when configured. Bundling is skipped (`aws:cdk:bundling-stacks`): these stacks are about
 * resources and settings, and test/infra/stack.test.ts synthesizes the bundled one.
 */
import { readFileSync } from 'node:fs';
import { App, type CfnElement, type PolicyValidationPluginReport } from 'aws-cdk-lib';
import { Template } from 'aws-cdk-lib/assertions';
import { AwsSolutionsChecks } from 'cdk-nag';
import { beforeAll, describe, expect, it } from 'vitest';
import { ALL_BUSINESS_METRICS } from '../../infra/constructs/operations-dashboard.ts';
import { METRIC_DESCRIPTIONS } from '../../infra/metric-descriptions.ts';
import { checkedSettings, NimbusStack, type NimbusStackProps } from '../../infra/stack.ts';
import { METRIC_NAMESPACE, METRIC_SERVICE, METRICS, type MetricName } from '../../shared/metrics.ts';
import { ARCHIVE_EXPIRY_INDEX, allTables, SWEEP_INDEX } from '../../shared/tables.ts';

const DOMAIN = 'chat.example.org';
const CUSTOM = {
  domainName: 'xmpp.example.org',
  certificateArn: 'arn:aws:acm:eu-west-1:123456789012:certificate/11111111-2222-3333-4444-555555555555',
};

// biome-ignore lint/suspicious/noExplicitAny: synthesized CloudFormation is untyped JSON.
type Json = any;

interface Synth {
  stack: NimbusStack;
  template: Template;
  resources: Record<string, Json>;
  outputs: Record<string, Json>;
  nag: PolicyValidationPluginReport;
}

function synth(props: Partial<NimbusStackProps> = {}): Synth {
  const cdkJson = JSON.parse(readFileSync(new URL('../../cdk.json', import.meta.url), 'utf8'));
  const app = new App({ context: { ...cdkJson.context, 'aws:cdk:bundling-stacks': [] } });
  const stack = new NimbusStack(app, 'Nimbus', { domain: DOMAIN, ...props });
  const template = Template.fromStack(stack);
  const json = template.toJSON();
  return {
    stack,
    template,
    resources: json.Resources,
    outputs: json.Outputs,
    nag: new AwsSolutionsChecks(app).validateScope(stack),
  };
}

const logicalId = (stack: NimbusStack, construct: { node: { defaultChild?: unknown } }) =>
  stack.getLogicalId(construct.node.defaultChild as CfnElement);

function functionProperties(s: Synth, name: 'connect' | 'stream' | 'sweeper'): Json {
  return s.resources[logicalId(s.stack, s.stack.functions[name].fn)].Properties;
}

function roleActions(s: Synth, name: 'connect' | 'stream' | 'sweeper'): string[] {
  const role = logicalId(s.stack, s.stack.functions[name].role);
  return Object.values(s.resources)
    .filter(
      (r: Json) => r.Type === 'AWS::IAM::Policy' && r.Properties.Roles.some((x: Json) => x.Ref === role),
    )
    .flatMap((p: Json) => p.Properties.PolicyDocument.Statement.flatMap((st: Json) => [st.Action].flat()));
}

/** The dashboard body with its tokens (table names, ids) left as `{…}` placeholders. */
function dashboardBody(s: Synth): Json {
  const [dashboard] = Object.values(s.resources).filter((r: Json) => r.Type === 'AWS::CloudWatch::Dashboard');
  const parts: Json[] = dashboard.Properties.DashboardBody['Fn::Join'][1];
  return JSON.parse(parts.map((part) => (typeof part === 'string' ? part : 'TOKEN')).join(''));
}

let plain: Synth;
let operated: Synth;

beforeAll(() => {
  plain = synth();
  operated = synth({
    customDomain: CUSTOM,
    settings: { LOG_LEVEL: 'warn', STREAM_LOG_LEVEL: 'debug', TRACING: 'true' },
  });
}, 120_000);

describe('CloudWatch dashboard', () => {
  it('is one dashboard named after the domain and the region (names are per account, not per region)', () => {
    plain.template.resourceCountIs('AWS::CloudWatch::Dashboard', 1);
    plain.template.hasResourceProperties('AWS::CloudWatch::Dashboard', {
      DashboardName: { 'Fn::Join': ['', ['Nimbus-chat-example-org-', { Ref: 'AWS::Region' }]] },
    });
    expect(plain.outputs.DashboardName).toBeDefined();
  });

  it('shows every metric of the catalogue, in the Nimbus namespace, for this domain', () => {
    expect([...plain.stack.dashboard.businessMetrics].sort()).toEqual([...ALL_BUSINESS_METRICS].sort());
    const body = JSON.stringify(dashboardBody(plain));
    for (const name of Object.keys(METRICS) as (keyof typeof METRICS)[]) {
      const dimension = (METRICS[name] as { dimension?: string }).dimension;
      if (dimension) {
        expect(body).toContain(
          `SEARCH('{${METRIC_NAMESPACE},${dimension},domain,service} MetricName=\\"${name}\\" domain=\\"${DOMAIN}\\"', 'Sum', 300)`,
        );
      } else {
        expect(body).toContain(
          `["${METRIC_NAMESPACE}","${name}","domain","${DOMAIN}","service","${METRIC_SERVICE}"`,
        );
      }
    }
  });

  it("is the README's metric list: one row per metric, with its dimension and its description", () => {
    const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
    const section = readme.slice(
      readme.indexOf('### Metrics'),
      readme.indexOf('\n### ', readme.indexOf('### Metrics') + 1),
    );
    const rows = section.split('\n').filter((line) => /^\| `[A-Za-z]+` \| /.test(line));
    expect(rows.sort()).toEqual(
      (Object.keys(METRICS) as MetricName[])
        .map((name) => {
          const dimension = (METRICS[name] as { dimension?: string }).dimension;
          return `| \`${name}\` | ${dimension ? `\`${dimension}\`` : '—'} | ${METRIC_DESCRIPTIONS[name]} |`;
        })
        .sort(),
    );
  });

  it('covers traffic, latency, errors, throttles and the cost drivers', () => {
    const widgets: Json[] = dashboardBody(plain).widgets;
    const titles = widgets.map((w) => w.properties.title ?? w.properties.markdown);
    expect(titles.join('\n')).toMatch(/Traffic[\s\S]*Latency[\s\S]*Errors and throttles[\s\S]*Cost drivers/);
    const metrics = JSON.stringify(widgets.flatMap((w) => w.properties.metrics ?? []));
    for (const [namespace, metric] of [
      ['AWS/SQS', 'ApproximateAgeOfOldestMessage'],
      ['AWS/Lambda', 'Duration'],
      ['AWS/Lambda', 'Errors'],
      ['AWS/Lambda', 'Throttles'],
      ['AWS/DynamoDB', 'ReadThrottleEvents'],
      ['AWS/DynamoDB', 'WriteThrottleEvents'],
      ['AWS/DynamoDB', 'ConsumedReadCapacityUnits'],
      ['AWS/DynamoDB', 'ConsumedWriteCapacityUnits'],
      ['AWS/ApiGateway', 'MessageCount'],
      ['AWS/ApiGateway', 'ConnectCount'],
      ['AWS/SQS', 'ApproximateNumberOfMessagesVisible'],
    ]) {
      expect(metrics).toContain(`"${namespace}","${metric}"`);
    }
  });

  it("graphs DynamoDB's throttles per table and per index, with dimensions the metrics exist with", () => {
    const metrics = JSON.stringify(
      dashboardBody(plain).widgets.flatMap((w: Json) => w.properties.metrics ?? []),
    );
    // ThrottledRequests exists only per table *and operation*: with the table alone it is empty.
    expect(metrics).not.toContain('ThrottledRequests');
    for (const index of [SWEEP_INDEX, ARCHIVE_EXPIRY_INDEX])
      for (const metric of ['ReadThrottleEvents', 'WriteThrottleEvents'])
        expect(metrics).toContain(
          `"AWS/DynamoDB","${metric}","GlobalSecondaryIndexName","${index}","TableName","TOKEN"`,
        );
    const tableLines = metrics.match(/"AWS\/DynamoDB","WriteThrottleEvents","TableName","TOKEN",\{/g) ?? [];
    expect(tableLines).toHaveLength(allTables.length);
    expect(metrics).not.toContain('"GlobalSecondaryIndexName","bySweepTime"');
  });

  it('graphs a retired index kept for one deployment too (it is rebuilt then)', () => {
    const metrics = JSON.stringify(
      dashboardBody(synth({ keepRetiredIndexes: true })).widgets.flatMap(
        (w: Json) => w.properties.metrics ?? [],
      ),
    );
    for (const metric of ['ReadThrottleEvents', 'WriteThrottleEvents'])
      expect(metrics).toContain(
        `"AWS/DynamoDB","${metric}","GlobalSecondaryIndexName","bySweepTime","TableName","TOKEN"`,
      );
  });
});

describe('metrics and logs of the functions', () => {
  it.each(['connect', 'stream', 'sweeper'] as const)('%s logs as the nimbus service', (name) => {
    const variables = functionProperties(plain, name).Environment.Variables;
    expect(variables.POWERTOOLS_SERVICE_NAME).toBe(METRIC_SERVICE);
    // The EMF namespace is the code's (functions/telemetry.ts), not a variable to drift from it.
    expect(variables.POWERTOOLS_METRICS_NAMESPACE).toBeUndefined();
  });

  it('logs at info by default, in JSON', () => {
    for (const name of ['connect', 'stream', 'sweeper'] as const) {
      const props = functionProperties(plain, name);
      expect(props.Environment.Variables.LOG_LEVEL).toBe('info');
      expect(props.LoggingConfig).toMatchObject({ LogFormat: 'JSON', ApplicationLogLevel: 'INFO' });
    }
  });

  it('sets the log level per function from the settings, and Lambda lets those lines through', () => {
    expect(functionProperties(operated, 'stream').Environment.Variables.LOG_LEVEL).toBe('debug');
    expect(functionProperties(operated, 'stream').LoggingConfig.ApplicationLogLevel).toBe('DEBUG');
    for (const name of ['connect', 'sweeper'] as const) {
      expect(functionProperties(operated, name).Environment.Variables.LOG_LEVEL).toBe('warn');
      // Never above INFO: Lambda reads the metric lines (EMF, no `level` field) as INFO, and
      // would drop them at WARN; the function's own logger filters by LOG_LEVEL.
      expect(functionProperties(operated, name).LoggingConfig.ApplicationLogLevel).toBe('INFO');
    }
    // The stack's own settings are not passed on as the functions' environment.
    expect(functionProperties(operated, 'stream').Environment.Variables.TRACING).toBeUndefined();
    expect(functionProperties(operated, 'stream').Environment.Variables.STREAM_LOG_LEVEL).toBeUndefined();
  });

  it('keeps Lambda at INFO for error and silent too, so the metric lines still get through', () => {
    const quiet = synth({ settings: { LOG_LEVEL: 'silent', STREAM_LOG_LEVEL: 'error' } });
    expect(functionProperties(quiet, 'stream').Environment.Variables.LOG_LEVEL).toBe('error');
    expect(functionProperties(quiet, 'sweeper').Environment.Variables.LOG_LEVEL).toBe('silent');
    for (const name of ['connect', 'stream', 'sweeper'] as const) {
      expect(functionProperties(quiet, name).LoggingConfig.ApplicationLogLevel).toBe('INFO');
    }
  }, 60_000);

  it('tells the stream function when a frame goes to the dead-letter queue', () => {
    expect(functionProperties(plain, 'stream').Environment.Variables.FRAME_MAX_RECEIVES).toBe(
      String(plain.stack.frameQueue.maxReceiveCount),
    );
  });

  it('refuses a malformed log level or tracing setting at synth time', () => {
    expect(() => checkedSettings({ STREAM_LOG_LEVEL: 'verbose' })).toThrow(/STREAM_LOG_LEVEL must be one of/);
    expect(() => checkedSettings({ LOG_LEVEL: 'loud' })).toThrow(/LOG_LEVEL/);
    expect(() => checkedSettings({ TRACING: 'yes' })).toThrow(/TRACING must be true or false/);
    // Each alone is valid; together the functions would refuse them at every start.
    expect(checkedSettings({ ARCHIVE_AUTO_REQUIRED: 'true' })).toEqual({ ARCHIVE_AUTO_REQUIRED: 'true' });
    expect(checkedSettings({ ARCHIVE_DEFAULT_SAVE: 'false' })).toEqual({ ARCHIVE_DEFAULT_SAVE: 'false' });
    expect(() => checkedSettings({ ARCHIVE_AUTO_REQUIRED: 'true', ARCHIVE_DEFAULT_SAVE: 'false' })).toThrow(
      /ARCHIVE_AUTO_REQUIRED/,
    );
    expect(checkedSettings({ TRACING: 'true', SWEEPER_LOG_LEVEL: 'error' })).toEqual({
      TRACING: 'true',
      SWEEPER_LOG_LEVEL: 'error',
    });
  });
});

describe('SCRAM_ITERATIONS', () => {
  it('is a stack output, which `npm run user -- --stack` stores keys with (no function stores any)', () => {
    expect(synth().outputs.ScramIterations.Value).toBe('4096');
    expect(synth({ settings: { SCRAM_ITERATIONS: '20000' } }).outputs.ScramIterations.Value).toBe('20000');
  });
});

describe('API Gateway throttle and client errors', () => {
  const stage = (s: Synth): Json =>
    Object.values(s.resources).find((r: Json) => r.Type === 'AWS::ApiGatewayV2::Stage').Properties;
  const clientErrorAlarm = (s: Synth): Json =>
    Object.values(s.resources).find(
      (r: Json) => r.Type === 'AWS::CloudWatch::Alarm' && r.Properties.MetricName === 'ClientError',
    ).Properties;

  it('takes the stage throttle from the settings, for the stage and $default; $connect never above it', () => {
    expect(stage(plain).DefaultRouteSettings).toMatchObject({
      ThrottlingRateLimit: 1000,
      ThrottlingBurstLimit: 2000,
    });
    const raised = synth({
      settings: { STAGE_RATE_LIMIT: '5000', STAGE_BURST_LIMIT: '8000', ALARM_CLIENT_ERRORS: '500' },
    });
    expect(stage(raised).DefaultRouteSettings).toMatchObject({
      ThrottlingRateLimit: 5000,
      ThrottlingBurstLimit: 8000,
    });
    expect(stage(raised).RouteSettings).toEqual({
      $connect: { ThrottlingRateLimit: 100, ThrottlingBurstLimit: 200 },
      $default: { ThrottlingRateLimit: 5000, ThrottlingBurstLimit: 8000 },
    });
    expect(clientErrorAlarm(raised).Threshold).toBe(500);
    const lowered = synth({ settings: { STAGE_RATE_LIMIT: '50', STAGE_BURST_LIMIT: '80' } });
    expect(stage(lowered).RouteSettings).toEqual({
      $connect: { ThrottlingRateLimit: 50, ThrottlingBurstLimit: 80 },
      $default: { ThrottlingRateLimit: 50, ThrottlingBurstLimit: 80 },
    });
    // The stack's own settings, not the functions'.
    expect(functionProperties(raised, 'stream').Environment.Variables.STAGE_RATE_LIMIT).toBeUndefined();
  }, 60_000);

  it('alarms on client errors past ALARM_CLIENT_ERRORS (100 by default) in 5 minutes', () => {
    expect(clientErrorAlarm(plain)).toMatchObject({
      Namespace: 'AWS/ApiGateway',
      Statistic: 'Sum',
      Period: 300,
      Threshold: 100,
      ComparisonOperator: 'GreaterThanThreshold',
    });
  });

  it('refuses a throttle below 1 and a malformed alarm threshold', () => {
    expect(() => checkedSettings({ STAGE_RATE_LIMIT: '0' })).toThrow(
      /STAGE_RATE_LIMIT must be an integer ≥ 1/,
    );
    expect(() => checkedSettings({ STAGE_BURST_LIMIT: 'lots' })).toThrow(/STAGE_BURST_LIMIT/);
    expect(() => checkedSettings({ ALARM_CLIENT_ERRORS: '-1' })).toThrow(/ALARM_CLIENT_ERRORS/);
  });
});

describe('tracing', () => {
  it('is off by default: no active tracing, no X-Ray permission', () => {
    for (const name of ['connect', 'stream', 'sweeper'] as const) {
      expect(functionProperties(plain, name).TracingConfig).toBeUndefined();
      expect(functionProperties(plain, name).Environment.Variables.NIMBUS_TRACING).toBe('false');
      expect(roleActions(plain, name).filter((a) => a.startsWith('xray:'))).toEqual([]);
    }
  });

  it('is on for the stream function with TRACING=true, and only there', () => {
    const stream = functionProperties(operated, 'stream');
    expect(stream.TracingConfig).toEqual({ Mode: 'Active' });
    expect(stream.Environment.Variables.NIMBUS_TRACING).toBe('true');
    expect(roleActions(operated, 'stream')).toEqual(
      expect.arrayContaining(['xray:PutTraceSegments', 'xray:PutTelemetryRecords']),
    );
    for (const name of ['connect', 'sweeper'] as const) {
      expect(functionProperties(operated, name).TracingConfig).toBeUndefined();
    }
  });
});

describe('custom domain', () => {
  it('is not created unless configured, and clients get the execute-api URL', () => {
    plain.template.resourceCountIs('AWS::ApiGatewayV2::DomainName', 0);
    plain.template.resourceCountIs('AWS::ApiGatewayV2::ApiMapping', 0);
    expect(JSON.stringify(plain.outputs.WebSocketUrl.Value)).toContain('.execute-api.');
    expect(plain.outputs.CustomDomainTarget).toBeUndefined();
  });

  it('maps the stage at the root of a regional TLS 1.2 custom domain with the given certificate', () => {
    const { stack, template } = operated;
    template.resourceCountIs('AWS::ApiGatewayV2::DomainName', 1);
    template.hasResourceProperties('AWS::ApiGatewayV2::DomainName', {
      DomainName: CUSTOM.domainName,
      DomainNameConfigurations: [
        { CertificateArn: CUSTOM.certificateArn, EndpointType: 'REGIONAL', SecurityPolicy: 'TLS_1_2' },
      ],
    });
    const domainId = logicalId(stack, stack.customDomain?.domain as never);
    template.hasResourceProperties('AWS::ApiGatewayV2::ApiMapping', {
      ApiId: { Ref: logicalId(stack, stack.gateway.api) },
      DomainName: { Ref: domainId },
      Stage: stack.gateway.stage.stageName,
    });
  });

  it('outputs the wss:// URL of the custom domain and the DNS target', () => {
    const { stack, outputs } = operated;
    const domainId = logicalId(stack, stack.customDomain?.domain as never);
    expect(outputs.WebSocketUrl.Value).toBe(`wss://${CUSTOM.domainName}`);
    expect(outputs.CustomDomainTarget.Value).toEqual({ 'Fn::GetAtt': [domainId, 'RegionalDomainName'] });
    expect(outputs.CustomDomainHostedZoneId.Value).toEqual({
      'Fn::GetAtt': [domainId, 'RegionalHostedZoneId'],
    });
    expect(JSON.stringify(outputs.ExecuteApiUrl.Value)).toContain('.execute-api.');
  });
});

describe('cdk-nag AwsSolutions', () => {
  it('stays clean with the custom domain and tracing on', () => {
    const findings = operated.nag.violations.map((v) => ({
      rule: v.ruleName,
      resources: v.violatingResources.map((r) => r.resourceLogicalId),
    }));
    expect(findings).toEqual([]);
  });
});
