/**
 * The alarms an operator needs to know that Nimbus is failing safely or not: every function's
 * errors and throttles, the frame queue's oldest message (frames waiting: a stream falling
 * behind), frames given up on (the dead-letter queue's depth, and the `FramesDeadLettered`
 * count), a sweeper that stopped running, API Gateway's integration and execution errors (frames
 * that never reached the queue) and its client errors past a threshold (requests it refused
 * itself, throttled ones among them). Each notifies one SNS topic, whose ARN is a stack output.
 */
import { Aws, Duration, RemovalPolicy } from 'aws-cdk-lib';
import * as cloudwatch from 'aws-cdk-lib/aws-cloudwatch';
import * as actions from 'aws-cdk-lib/aws-cloudwatch-actions';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as kms from 'aws-cdk-lib/aws-kms';
import type * as lambda from 'aws-cdk-lib/aws-lambda';
import * as sns from 'aws-cdk-lib/aws-sns';
import type * as sqs from 'aws-cdk-lib/aws-sqs';
import { Construct } from 'constructs';
import { METRIC_NAMESPACE, METRIC_SERVICE, type MetricName } from '../../shared/metrics.ts';

export interface AlarmsProps {
  functions: Record<string, lambda.IFunction>;
  /** The sweeper, run every minute by a schedule: silence from it is an alarm. */
  sweeper: lambda.IFunction;
  frameQueue: sqs.IQueue;
  /** Alarms made elsewhere (the dead-letter queue's) that should notify the topic too. */
  existing: cloudwatch.Alarm[];
  /** The WebSocket API's id and stage, for API Gateway's metrics. */
  apiId: string;
  stageName: string;
  /** Seconds the oldest frame may wait in the queue before the alarm goes off. */
  oldestFrameSeconds: number;
  /** The XMPP domain: the `domain` dimension of Nimbus's own metrics. */
  domain: string;
  /** API Gateway client errors (4XX before the integration) per 5 minutes above which the alarm goes off. */
  clientErrors: number;
}

export class Alarms extends Construct {
  readonly topic: sns.Topic;
  readonly alarms: cloudwatch.Alarm[] = [];

  constructor(scope: Construct, id: string, props: AlarmsProps) {
    super(scope, id);
    const key = new kms.Key(this, 'TopicKey', {
      description: 'Nimbus alarm notifications',
      enableKeyRotation: true,
      // It protects only the topic's notifications: deleted with the stack (after KMS's shortest
      // waiting period), not kept at $1 to $3 a month (rotations) protecting nothing.
      removalPolicy: RemovalPolicy.DESTROY,
      pendingWindow: Duration.days(7),
    });
    // CloudWatch publishes to the encrypted topic only if it may use the key: the two actions
    // SNS's guide to encrypted topics names for an AWS service's events, no more (grantEncryptDecrypt
    // would add Encrypt and ReEncrypt*). Which alarms may publish is the topic policy's to say.
    key.addToResourcePolicy(
      new iam.PolicyStatement({
        sid: 'AlarmsEncryptNotifications',
        principals: [new iam.ServicePrincipal('cloudwatch.amazonaws.com')],
        actions: ['kms:Decrypt', 'kms:GenerateDataKey*'],
        resources: ['*'],
      }),
    );
    this.topic = new sns.Topic(this, 'Topic', {
      displayName: 'Nimbus alarms',
      masterKey: key,
      enforceSSL: true,
    });
    // A topic policy replaces SNS's default one (which lets the account's principals publish):
    // with only enforceSSL's Deny in it, CloudWatch's alarm actions would fail with "not
    // authorized to perform: SNS:Publish" (seen only in each alarm's history). This account's
    // alarms in this region may publish.
    this.topic.addToResourcePolicy(
      new iam.PolicyStatement({
        sid: 'AlarmsPublish',
        principals: [new iam.ServicePrincipal('cloudwatch.amazonaws.com')],
        actions: ['sns:Publish'],
        resources: [this.topic.topicArn],
        conditions: {
          StringEquals: { 'aws:SourceAccount': Aws.ACCOUNT_ID },
          ArnLike: {
            'aws:SourceArn': `arn:${Aws.PARTITION}:cloudwatch:${Aws.REGION}:${Aws.ACCOUNT_ID}:alarm:*`,
          },
        },
      }),
    );
    const period = Duration.minutes(5);
    const add = (name: string, description: string, metric: cloudwatch.IMetric, threshold: number) => {
      const alarm = new cloudwatch.Alarm(this, name, {
        alarmDescription: description,
        metric,
        threshold,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        evaluationPeriods: 1,
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
      });
      alarm.addAlarmAction(new actions.SnsAction(this.topic));
      this.alarms.push(alarm);
    };
    for (const [name, fn] of Object.entries(props.functions)) {
      add(`${name}Errors`, `The ${name} function failed (errors)`, fn.metricErrors({ period }), 0);
      add(`${name}Throttles`, `The ${name} function was throttled`, fn.metricThrottles({ period }), 0);
    }
    add(
      'OldestFrame',
      `A frame waited in the queue more than ${props.oldestFrameSeconds} s: streams are falling behind`,
      props.frameQueue.metricApproximateAgeOfOldestMessage({
        period: Duration.minutes(1),
        statistic: 'Maximum',
      }),
      props.oldestFrameSeconds,
    );
    for (const alarm of props.existing) {
      alarm.addAlarmAction(new actions.SnsAction(this.topic));
      this.alarms.push(alarm);
    }
    // The dead-letter queue's depth alarm stays in ALARM until the queue is emptied, so it
    // notifies once; this one counts the frames the stream function saw fail on their last
    // receive, per period, and notifies again for each later period that has any.
    const nimbus = (metricName: MetricName) =>
      new cloudwatch.Metric({
        namespace: METRIC_NAMESPACE,
        metricName,
        dimensionsMap: { service: METRIC_SERVICE, domain: props.domain },
        statistic: cloudwatch.Stats.SUM,
        period,
      });
    add(
      'FramesDeadLettered',
      'XMPP frames failed on their last receive and went to the dead-letter queue (FramesDeadLettered)',
      nimbus('FramesDeadLettered'),
      0,
    );
    // A sweep cut short (its invocation's time ran out with work left) now and then is a burst;
    // one in each of three 5-minute periods running means the sweeper is falling behind: sessions
    // whose window closed stay unswept and lost $disconnects unprobed.
    const sweepsBehind = new cloudwatch.Alarm(this, 'SweepsCutShort', {
      alarmDescription:
        'The sweeper ran out of time with work left in every 5 minutes of a quarter hour (SweepsCutShort)',
      metric: nimbus('SweepsCutShort'),
      threshold: 0,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      evaluationPeriods: 3,
      datapointsToAlarm: 3,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
    sweepsBehind.addAlarmAction(new actions.SnsAction(this.topic));
    this.alarms.push(sweepsBehind);
    const apiGateway = (metricName: string) =>
      new cloudwatch.Metric({
        namespace: 'AWS/ApiGateway',
        metricName,
        dimensionsMap: { ApiId: props.apiId, Stage: props.stageName },
        statistic: 'Sum',
        period,
      });
    // A handshake the connect function refuses (no 'xmpp' subprotocol: a scanner, a browser
    // probe) is a 4XX from the integration, which IntegrationError counts: taken out, so that
    // the alarm tells of frames not queued and handshakes failed, not of strangers knocking.
    add(
      'IntegrationErrors',
      'API Gateway could not hand frames to the queue or the connect function (IntegrationError, refused handshakes left out)',
      new cloudwatch.MathExpression({
        expression: 'FILL(errors, 0) - FILL(refused, 0)',
        usingMetrics: { errors: apiGateway('IntegrationError'), refused: nimbus('HandshakesRefused') },
        label: 'IntegrationError less HandshakesRefused',
        period,
      }),
      0,
    );
    // Errors of API Gateway's own while calling an integration (a queue-writer role it cannot
    // assume, a request template it cannot apply), which IntegrationError does not count: the
    // frame never reaches the queue and, $default having no route response, nobody is told.
    add(
      'ExecutionErrors',
      'API Gateway failed calling the queue or the connect function (ExecutionError)',
      apiGateway('ExecutionError'),
      0,
    );
    // The schedule runs the sweeper every minute: a quarter hour without one invocation (a
    // disabled rule, failed or dropped scheduled events) leaves expired stream-management
    // sessions unended and lost $disconnects unprobed, which no error metric shows. Missing
    // data is breaching here: no invocations reports no datapoint at all.
    const sweeperSilent = new cloudwatch.Alarm(this, 'SweeperNotRunning', {
      alarmDescription: 'The sweeper was not invoked for 15 minutes (it runs every minute)',
      metric: props.sweeper.metricInvocations({ period: Duration.minutes(15), statistic: 'Sum' }),
      threshold: 1,
      comparisonOperator: cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
      evaluationPeriods: 1,
      treatMissingData: cloudwatch.TreatMissingData.BREACHING,
    });
    sweeperSilent.addAlarmAction(new actions.SnsAction(this.topic));
    this.alarms.push(sweeperSilent);
    // 4XX answers of API Gateway itself, before any integration: a message or a connection the
    // stage or route throttle refused (429) is one, so many of them mean clients are being turned
    // away. A few are ordinary (a client that misbehaves), hence a threshold, not any.
    add(
      'ClientErrors',
      `API Gateway refused more than ${props.clientErrors} requests in 5 minutes before any integration (4XX, throttling among them)`,
      apiGateway('ClientError'),
      props.clientErrors,
    );
  }
}
