import * as apigwv2 from 'aws-cdk-lib/aws-apigatewayv2';
import * as acm from 'aws-cdk-lib/aws-certificatemanager';
import { Construct } from 'constructs';

export interface CustomDomainProps {
  /** The host name clients connect to, e.g. `xmpp.example.com`. */
  domainName: string;
  /** An ACM certificate for `domainName`, in the stack's region (a regional endpoint). */
  certificateArn: string;
  api: apigwv2.IWebSocketApi;
  stage: apigwv2.IWebSocketStage;
}

/**
 * A custom host name for the WebSocket API: an API Gateway custom domain (regional, TLS 1.2)
 * and an API mapping of the stage at its root, so clients connect to `wss://<domainName>`
 * instead of `wss://<api>.execute-api.<region>.amazonaws.com/xmpp`. The DNS record is the
 * operator's: a CNAME (or a Route 53 alias) from `domainName` to `regionalDomainName`.
 */
export class CustomDomain extends Construct {
  readonly domain: apigwv2.DomainName;
  /** What clients connect to. */
  readonly url: string;

  constructor(scope: Construct, id: string, props: CustomDomainProps) {
    super(scope, id);
    this.url = `wss://${props.domainName}`;
    this.domain = new apigwv2.DomainName(this, 'DomainName', {
      domainName: props.domainName,
      certificate: acm.Certificate.fromCertificateArn(this, 'Certificate', props.certificateArn),
      endpointType: apigwv2.EndpointType.REGIONAL,
      securityPolicy: apigwv2.SecurityPolicy.TLS_1_2,
    });
    new apigwv2.ApiMapping(this, 'Mapping', { api: props.api, domainName: this.domain, stage: props.stage });
  }

  /** The target of the DNS record (`d-….execute-api.<region>.amazonaws.com`). */
  get regionalDomainName(): string {
    return this.domain.regionalDomainName;
  }

  /** The hosted zone of `regionalDomainName`, for a Route 53 alias record. */
  get regionalHostedZoneId(): string {
    return this.domain.regionalHostedZoneId;
  }
}
