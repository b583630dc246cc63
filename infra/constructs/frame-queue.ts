import { Duration } from 'aws-cdk-lib';
import * as cloudwatch from 'aws-cdk-lib/aws-cloudwatch';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import { Construct } from 'constructs';

export interface FrameQueueProps {
  /** Timeout of the function consuming the queue; the visibility timeout is derived from it. */
  consumerTimeout: Duration;
  /** Receives before a message goes to the dead-letter queue. */
  maxReceiveCount?: number;
}

/**
 * The FIFO queue between API Gateway and the stream function (docs/design.md: MessageGroupId =
 * connectionId, so the frames of one stream are processed in order, RFC 6120 §10.1).
 */
export class FrameQueue extends Construct {
  readonly queue: sqs.Queue;
  readonly deadLetterQueue: sqs.Queue;
  readonly maxReceiveCount: number;
  /** Frames given up on: the operator's alarm topic is added by the stack. */
  readonly deadLettersAlarm: cloudwatch.Alarm;

  constructor(scope: Construct, id: string, props: FrameQueueProps) {
    super(scope, id);
    // 20, not the usual 5: when a frame fails, its connection's later frames of the batch are
    // handed back unprocessed (they must wait, in order), and each such return counts as a receive
    // for them too; a throttle that outlasts a few batches must not dead-letter frames that never
    // failed themselves.
    this.maxReceiveCount = props.maxReceiveCount ?? 20;

    this.deadLetterQueue = new sqs.Queue(this, 'DeadLetters', {
      fifo: true,
      encryption: sqs.QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
      retentionPeriod: Duration.days(14),
    });

    this.queue = new sqs.Queue(this, 'Frames', {
      fifo: true,
      // De-duplication by API Gateway's request id, never by content: a client may legitimately
      // send the same frame twice (two identical <r/> requests, two pings with one id).
      contentBasedDeduplication: false,
      // High-throughput FIFO: every connection is its own message group, so the 300 msg/s limit of
      // a queue-wide FIFO would cap the whole server; per group is the ordering we need anyway.
      deduplicationScope: sqs.DeduplicationScope.MESSAGE_GROUP,
      fifoThroughputLimit: sqs.FifoThroughputLimit.PER_MESSAGE_GROUP_ID,
      // AWS guidance for Lambda event sources: at least six times the function timeout, so that
      // retries of a throttled batch do not make a message visible again while it is processed.
      visibilityTimeout: Duration.seconds(props.consumerTimeout.toSeconds() * 6),
      encryption: sqs.QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
      deadLetterQueue: { queue: this.deadLetterQueue, maxReceiveCount: this.maxReceiveCount },
    });

    // A frame in the dead-letter queue is a stream that stopped being processed: worth a look.
    // It stays in ALARM until the queue is emptied (README, "Dead letters"), so it notifies
    // once; the FramesDeadLettered alarm (alarms.ts) notifies for each later one. This one also
    // catches what that count cannot: a frame whose last receive timed out or crashed.
    this.deadLettersAlarm = new cloudwatch.Alarm(this, 'DeadLettersAlarm', {
      alarmDescription: 'XMPP frames that failed processing landed in the dead-letter queue',
      metric: this.deadLetterQueue.metricApproximateNumberOfMessagesVisible({ period: Duration.minutes(5) }),
      threshold: 0,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      evaluationPeriods: 1,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
  }
}
