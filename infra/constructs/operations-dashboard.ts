import { Duration, Stack } from 'aws-cdk-lib';
import type * as apigwv2 from 'aws-cdk-lib/aws-apigatewayv2';
import * as cloudwatch from 'aws-cdk-lib/aws-cloudwatch';
import type * as dynamodb from 'aws-cdk-lib/aws-dynamodb';
import type * as lambda from 'aws-cdk-lib/aws-lambda';
import type * as sqs from 'aws-cdk-lib/aws-sqs';
import { Construct } from 'constructs';
import {
  dimensionOf,
  METRIC_NAMESPACE,
  METRIC_SERVICE,
  METRICS,
  type MetricName,
} from '../../shared/metrics.ts';

export interface OperationsDashboardProps {
  /** The XMPP domain: the `domain` dimension of Nimbus's own metrics. */
  domain: string;
  api: apigwv2.IWebSocketApi;
  stageName: string;
  frameQueue: sqs.IQueue;
  deadLetterQueue: sqs.IQueue;
  functions: { connect: lambda.IFunction; stream: lambda.IFunction; sweeper: lambda.IFunction };
  tables: { id: string; table: dynamodb.ITableV2; indexes: string[] }[];
}

const PERIOD = Duration.minutes(5);
const WIDE = 12;
const HEIGHT = 6;

/**
 * One CloudWatch dashboard for one deployment: traffic, latency (frame queue age, function
 * duration), errors, throttles and the cost drivers (API Gateway messages, DynamoDB request
 * units, Lambda time, SQS requests). AWS's own metrics sit next to Nimbus's business metrics
 * (shared/metrics.ts, embedded metric format); every metric of the catalogue is on it.
 */
export class OperationsDashboard extends Construct {
  readonly dashboard: cloudwatch.Dashboard;
  /** The catalogue metrics the dashboard shows (the stack test checks it is all of them). */
  readonly businessMetrics = new Set<MetricName>();

  constructor(scope: Construct, id: string, props: OperationsDashboardProps) {
    super(scope, id);
    const { functions, frameQueue, deadLetterQueue } = props;
    const nimbus = (name: MetricName, label?: string): cloudwatch.IMetric => {
      this.businessMetrics.add(name);
      const dimension = dimensionOf(name);
      if (!dimension) {
        return new cloudwatch.Metric({
          namespace: METRIC_NAMESPACE,
          metricName: name,
          dimensionsMap: { service: METRIC_SERVICE, domain: props.domain },
          statistic: cloudwatch.Stats.SUM,
          period: PERIOD,
          label: label ?? name,
        });
      }
      // One line per value of the metric's own dimension, whatever values appear.
      return new cloudwatch.MathExpression({
        expression: `SEARCH('{${METRIC_NAMESPACE},${dimension},domain,service} MetricName="${name}" domain="${props.domain}"', 'Sum', ${PERIOD.toSeconds()})`,
        label: label ?? name,
        period: PERIOD,
        usingMetrics: {},
      });
    };
    const apiGateway = (metricName: string, statistic: string = cloudwatch.Stats.SUM) =>
      new cloudwatch.Metric({
        namespace: 'AWS/ApiGateway',
        metricName,
        dimensionsMap: { ApiId: props.api.apiId, Stage: props.stageName },
        statistic,
        period: PERIOD,
      });
    const perTable = (metricName: string) =>
      props.tables.map(
        ({ id: tableId, table }) =>
          new cloudwatch.Metric({
            namespace: 'AWS/DynamoDB',
            metricName,
            dimensionsMap: { TableName: table.tableName },
            statistic: cloudwatch.Stats.SUM,
            period: PERIOD,
            label: tableId,
          }),
      );
    // DynamoDB's throttles: `ThrottledRequests` exists only per table and operation, so the graph
    // takes the read and write throttle events, which exist per table and per index (an index's
    // throttled writes hold back its table's: the sweep indexes have few partition key values).
    const throttleEvents = props.tables.flatMap(({ id: tableId, table, indexes }) =>
      [undefined, ...indexes].flatMap((index) =>
        ['ReadThrottleEvents', 'WriteThrottleEvents'].map(
          (metricName) =>
            new cloudwatch.Metric({
              namespace: 'AWS/DynamoDB',
              metricName,
              dimensionsMap: {
                TableName: table.tableName,
                ...(index ? { GlobalSecondaryIndexName: index } : {}),
              },
              statistic: cloudwatch.Stats.SUM,
              period: PERIOD,
              label: `${tableId}${index ? ` ${index}` : ''} ${metricName.startsWith('Read') ? 'reads' : 'writes'} (AWS)`,
            }),
        ),
      ),
    );
    const perFunction = (metric: (fn: lambda.IFunction) => cloudwatch.Metric) =>
      Object.entries(functions).map(([name, fn]) => metric(fn).with({ label: name, period: PERIOD }));
    const graph = (title: string, left: cloudwatch.IMetric[], right: cloudwatch.IMetric[] = []) =>
      new cloudwatch.GraphWidget({ title, left, right, width: WIDE, height: HEIGHT });
    const header = (markdown: string) => new cloudwatch.TextWidget({ markdown, width: 24, height: 1 });

    this.dashboard = new cloudwatch.Dashboard(this, 'Dashboard', {
      // Dashboard names are one namespace per account, across regions: the region keeps the same
      // domain deployed in two regions apart.
      dashboardName: `Nimbus-${props.domain.replace(/[^A-Za-z0-9_-]/g, '-')}-${Stack.of(this).region}`,
      defaultInterval: Duration.hours(3),
    });
    this.dashboard.addWidgets(
      header(`## Traffic — ${props.domain}`),
      graph(
        'Connections and frames',
        [
          apiGateway('ConnectCount'),
          nimbus('ConnectionsOpened'),
          nimbus('HandshakesRefused'),
          apiGateway('MessageCount'),
        ],
        [nimbus('FramesIn')],
      ),
      graph('Stanzas by kind', [nimbus('StanzasIn')], [nimbus('StanzasOut')]),
      graph(
        'Logins (by mechanism) and failures (by condition)',
        [nimbus('Logins')],
        [nimbus('LoginFailures')],
      ),
      graph('Messages', [
        nimbus('MessagesDelivered', 'delivered online'),
        nimbus('MessagesStoredOffline', 'stored offline'),
        nimbus('MessagesFlooded', 'flooded at login'),
      ]),
      graph(
        'Stream management (XEP-0198)',
        [nimbus('SmEnabled'), nimbus('SmResumed'), nimbus('SessionsExpired'), nimbus('StanzasRerouted')],
        [nimbus('SmResumeFailed'), nimbus('SmEnableRefused'), nimbus('SmEnabledLate')],
      ),
      graph('XEP-0013 and XEP-0136 requests', [nimbus('OfflineRequests')], [nimbus('ArchiveRequests')]),

      header('## Latency'),
      graph('Frame queue: age of the oldest frame (s)', [
        frameQueue.metricApproximateAgeOfOldestMessage({
          statistic: cloudwatch.Stats.MAXIMUM,
          period: PERIOD,
        }),
      ]),
      graph(
        'Function duration (ms)',
        [
          functions.stream.metricDuration({
            statistic: cloudwatch.Stats.p(50),
            label: 'stream p50',
            period: PERIOD,
          }),
          functions.stream.metricDuration({
            statistic: cloudwatch.Stats.p(99),
            label: 'stream p99',
            period: PERIOD,
          }),
          functions.connect.metricDuration({
            statistic: cloudwatch.Stats.p(99),
            label: 'connect p99',
            period: PERIOD,
          }),
        ],
        [
          functions.sweeper.metricDuration({
            statistic: cloudwatch.Stats.MAXIMUM,
            label: 'sweeper max',
            period: PERIOD,
          }),
        ],
      ),

      header('## Errors and throttles'),
      graph(
        'Function errors; frames retried and dead-lettered',
        perFunction((fn) => fn.metricErrors()),
        [
          nimbus('FramesRetried'),
          nimbus('FramesDeadLettered'),
          nimbus('FramesMalformed'),
          deadLetterQueue.metricApproximateNumberOfMessagesVisible({
            label: 'in dead-letter queue',
            statistic: cloudwatch.Stats.MAXIMUM,
            period: PERIOD,
          }),
        ],
      ),
      graph(
        'Stream errors (by condition); API Gateway errors',
        [nimbus('StreamErrors')],
        [apiGateway('ClientError'), apiGateway('ExecutionError'), apiGateway('IntegrationError')],
      ),
      graph(
        'Throttles: Lambda, DynamoDB',
        perFunction((fn) => fn.metricThrottles()),
        [nimbus('DynamoDbThrottles', 'DynamoDB (seen by Nimbus)'), ...throttleEvents],
      ),
      graph(
        'Cold starts; posts unanswered, resumes forced and unsettled, uncertain stanzas resent',
        [nimbus('ColdStarts')],
        [
          nimbus('PostsUnanswered'),
          nimbus('SmResumesForced'),
          nimbus('ResumesUnsettled'),
          nimbus('SmUncertainResent'),
        ],
      ),
      graph(
        'Sweeper: failures (by phase), runs cut short',
        [nimbus('SweepFailures')],
        [nimbus('SweepsCutShort')],
      ),

      header('## Cost drivers'),
      graph(
        'API Gateway messages and SQS requests',
        [apiGateway('MessageCount')],
        [
          frameQueue.metricNumberOfMessagesSent({ period: PERIOD }),
          frameQueue.metricNumberOfMessagesReceived({ period: PERIOD }),
        ],
      ),
      graph(
        'DynamoDB read and write units',
        perTable('ConsumedReadCapacityUnits'),
        perTable('ConsumedWriteCapacityUnits'),
      ),
      graph(
        'Lambda invocations and time (ms)',
        perFunction((fn) => fn.metricInvocations()),
        perFunction((fn) => fn.metricDuration({ statistic: cloudwatch.Stats.SUM })),
      ),
    );
  }
}

/** Every metric of the catalogue, for the completeness check. */
export const ALL_BUSINESS_METRICS = Object.keys(METRICS) as MetricName[];
