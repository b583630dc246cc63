import { Aws, RemovalPolicy } from 'aws-cdk-lib';
import { AccessLogFormat, CfnAccount } from 'aws-cdk-lib/aws-apigateway';
import * as apigwv2 from 'aws-cdk-lib/aws-apigatewayv2';
import {
  WebSocketAwsIntegration,
  WebSocketLambdaIntegration,
} from 'aws-cdk-lib/aws-apigatewayv2-integrations';
import * as iam from 'aws-cdk-lib/aws-iam';
import type * as lambda from 'aws-cdk-lib/aws-lambda';
import * as logs from 'aws-cdk-lib/aws-logs';
import type * as sqs from 'aws-cdk-lib/aws-sqs';
import { Construct } from 'constructs';
import type { QueueMessage } from '../../shared/queue-message.ts';
import { LOG_RETENTION } from './xmpp-function.ts';

/** The stage: clients connect to `wss://{api}.execute-api.{region}.amazonaws.com/xmpp`. */
export const STAGE_NAME = 'xmpp';

/** API Gateway's throttle: messages per second, steady and burst. */
export interface Throttle {
  rateLimit: number;
  burstLimit: number;
}

/**
 * Stage-wide message rate cap by default (the deploy settings `STAGE_RATE_LIMIT` and
 * `STAGE_BURST_LIMIT` change it). Far above what one deployment of this size is expected to
 * carry, low enough that a runaway client cannot run up the bill at the account's 10,000/s
 * default; raise it with measured load.
 */
export const STAGE_THROTTLE: Throttle = { rateLimit: 1000, burstLimit: 2000 };

/** `$connect`'s own cap, never above the stage's. */
export const CONNECT_THROTTLE: Throttle = { rateLimit: 100, burstLimit: 200 };

/**
 * Per-route throttling on top of the stage's: new connections are the expensive part of a
 * flood (each ends in a SCRAM login, tens of milliseconds of CPU), so `$connect` gets a lower
 * cap of its own than the frames of established streams on `$default`, which get the stage's.
 */
export function routeThrottle(stage: Throttle): Record<'$connect' | '$default', Throttle> {
  return {
    $connect: {
      rateLimit: Math.min(CONNECT_THROTTLE.rateLimit, stage.rateLimit),
      burstLimit: Math.min(CONNECT_THROTTLE.burstLimit, stage.burstLimit),
    },
    $default: stage,
  };
}

/**
 * Velocity has no escape for `"` inside a string literal, so the template keeps one in `$q`
 * (`#set($q = '"')`) and writes `${q}` wherever the JSON needs a quote. Concatenated here so
 * that it is not mistaken for a TypeScript template placeholder.
 */
const QUOTE = '$' + '{q}';

type FieldKind = 'string' | 'number';

/** The JSON fields of a queue message, each with the API Gateway expression that fills it. */
const MESSAGE_FIELDS: readonly [keyof QueueMessage, string, FieldKind][] = [
  ['connectionId', '$context.connectionId', 'string'],
  ['eventType', '$context.eventType', 'string'],
  ['requestTimeEpoch', '$context.requestTimeEpoch', 'number'],
  ['requestId', '$context.requestId', 'string'],
  // Base64, because XMPP frames are full of quotes and `$util.escapeJavaScript` writes `\'`, which is not JSON.
  ['body', '$util.base64Encode($input.body)', 'string'],
  // For the connection row a stream's first frame creates (`$connect` writes nothing).
  ['connectedAt', '$context.connectedAt', 'number'],
  ['sourceIp', '$context.identity.sourceIp', 'string'],
];

/** What only a frame's message carries (`$disconnect`'s has no body and needs no row). */
const FRAME_ONLY_FIELDS = new Set<keyof QueueMessage>(['body', 'connectedAt', 'sourceIp']);

/**
 * The request template that turns a WebSocket event into an SQS SendMessage call whose body is
 * a `QueueMessage` (shared/queue-message.ts). `withBody: false` is for `$disconnect`, which
 * carries no frame.
 *
 * - Every value is URL-encoded: connection and request ids are base64 and may hold `+`, which
 *   form decoding would turn into a space (not allowed in a MessageGroupId), and `=`/`/`.
 * - One line, no whitespace between directives: anything outside a directive is output, and a
 *   stray newline before `Action=` would rename the first form field.
 * - The JSON is built in a `#set` string rather than passed as `$util.urlEncode({...})`, where
 *   Velocity would read the braces as a map literal and encode `{connectionId=…}`.
 */
export function sendMessageTemplate({ withBody }: { withBody: boolean }): string {
  const json = MESSAGE_FIELDS.filter(([name]) => withBody || !FRAME_ONLY_FIELDS.has(name))
    .map(([name, expression, kind]) => {
      const value = kind === 'string' ? `${QUOTE}${expression}${QUOTE}` : expression;
      return `${QUOTE}${name}${QUOTE}:${value}`;
    })
    .join(',');
  return [
    `#set($q = '"')`,
    `#set($message = "{${json}}")`,
    'Action=SendMessage',
    '&MessageGroupId=$util.urlEncode($context.connectionId)',
    '&MessageDeduplicationId=$util.urlEncode($context.requestId)',
    '&MessageBody=$util.urlEncode($message)',
  ].join('');
}

export interface WebSocketGatewayProps {
  connectFunction: lambda.IFunction;
  frameQueue: sqs.IQueue;
  /**
   * Set the region's API Gateway CloudWatch role (an account-wide setting), without which
   * WebSocket stages cannot log ("CloudWatch Logs role ARN must be set in account settings").
   * Turn off where the account already has one managed elsewhere.
   */
  manageAccountLogRole: boolean;
  /** The stage's throttle (and `$default`'s); default STAGE_THROTTLE. */
  throttle?: Throttle;
}

/**
 * The WebSocket API: `$connect` → the connect function (it must answer the subprotocol
 * handshake itself); `$default` and `$disconnect` → straight into the FIFO queue, no Lambda
 * in between, so frames keep their order and bursts are buffered.
 */
export class WebSocketGateway extends Construct {
  readonly api: apigwv2.WebSocketApi;
  readonly stage: apigwv2.WebSocketStage;
  readonly accessLogs: logs.LogGroup;
  /** The role API Gateway assumes to call SQS. */
  readonly queueWriterRole: iam.Role;
  /** The account-wide role API Gateway logs with, when this stack manages it. */
  readonly accountLogRole?: iam.Role;

  constructor(scope: Construct, id: string, props: WebSocketGatewayProps) {
    super(scope, id);
    const throttle = props.throttle ?? STAGE_THROTTLE;

    this.queueWriterRole = new iam.Role(this, 'QueueWriterRole', {
      assumedBy: new iam.ServicePrincipal('apigateway.amazonaws.com'),
      description: 'Lets API Gateway put WebSocket frames on the frame queue',
    });
    this.queueWriterRole.addToPolicy(
      new iam.PolicyStatement({ actions: ['sqs:SendMessage'], resources: [props.frameQueue.queueArn] }),
    );

    const toQueue = (integrationId: string, withBody: boolean) =>
      new WebSocketAwsIntegration(integrationId, {
        integrationUri: `arn:${Aws.PARTITION}:apigateway:${Aws.REGION}:sqs:path/${Aws.ACCOUNT_ID}/${props.frameQueue.queueName}`,
        integrationMethod: apigwv2.HttpMethod.POST,
        credentialsRole: this.queueWriterRole,
        requestParameters: {
          'integration.request.header.Content-Type': "'application/x-www-form-urlencoded'",
        },
        // One template for every message, whatever it looks like (XMPP frames are not JSON).
        templateSelectionExpression: '\\$default',
        requestTemplates: { $default: sendMessageTemplate({ withBody }) },
        passthroughBehavior: apigwv2.PassthroughBehavior.NEVER,
      });

    this.api = new apigwv2.WebSocketApi(this, 'Api', {
      description: 'XMPP over WebSocket (RFC 7395)',
      connectRouteOptions: { integration: new WebSocketLambdaIntegration('Connect', props.connectFunction) },
      defaultRouteOptions: { integration: toQueue('FrameToQueue', true) },
      disconnectRouteOptions: { integration: toQueue('DisconnectToQueue', false) },
    });

    this.accessLogs = new logs.LogGroup(this, 'AccessLogs', { retention: LOG_RETENTION });
    this.stage = new apigwv2.WebSocketStage(this, 'Stage', {
      webSocketApi: this.api,
      stageName: STAGE_NAME,
      autoDeploy: true,
      throttle,
      accessLogSettings: {
        destination: new apigwv2.LogGroupLogDestination(this.accessLogs),
        // $default has no route response: a frame SQS refused reaches no client and shows only here.
        format: AccessLogFormat.custom(
          JSON.stringify({
            requestId: '$context.requestId',
            connectionId: '$context.connectionId',
            eventType: '$context.eventType',
            routeKey: '$context.routeKey',
            status: '$context.status',
            requestTimeEpoch: '$context.requestTimeEpoch',
            sourceIp: '$context.identity.sourceIp',
            error: '$context.error.message',
            integrationStatus: '$context.integrationStatus',
            integrationError: '$context.integration.error',
          }),
        ),
      },
    });

    // RouteSettings name routes by key: CloudFormation must have created them first.
    for (const route of this.api.node.findAll()) {
      if (route instanceof apigwv2.CfnRoute) this.stage.node.addDependency(route);
    }
    (this.stage.node.defaultChild as apigwv2.CfnStage).routeSettings = Object.fromEntries(
      Object.entries(routeThrottle(throttle)).map(([route, limits]) => [
        route,
        { ThrottlingRateLimit: limits.rateLimit, ThrottlingBurstLimit: limits.burstLimit },
      ]),
    );

    if (props.manageAccountLogRole) {
      this.accountLogRole = new iam.Role(this, 'AccountLogRole', {
        assumedBy: new iam.ServicePrincipal('apigateway.amazonaws.com'),
        description: "API Gateway's CloudWatch Logs role for this account and region",
        managedPolicies: [
          iam.ManagedPolicy.fromAwsManagedPolicyName('service-role/AmazonAPIGatewayPushToCloudWatchLogs'),
        ],
      });
      // Other APIs of the account log through this role too: deleting the stack must not cut them off.
      this.accountLogRole.applyRemovalPolicy(RemovalPolicy.RETAIN);
      const account = new CfnAccount(this, 'Account', { cloudWatchRoleArn: this.accountLogRole.roleArn });
      this.stage.node.addDependency(account);
    }
  }

  /** The API Gateway Management API endpoint functions post frames to (`CONNECTIONS_ENDPOINT`). */
  get connectionsEndpoint(): string {
    return this.stage.callbackUrl;
  }
}
