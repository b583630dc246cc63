#!/usr/bin/env node
/**
 * The CDK app: `npx cdk synth`, `npx cdk deploy -c domain=example.com`.
 *
 * Context: `domain` (the XMPP domain, default `localhost`); `manageApiGatewayAccountRole=false`
 * when the account's API Gateway CloudWatch role is managed elsewhere; `nag=false` to skip
 * cdk-nag's AwsSolutions checks during synth (the test suite always runs them); `settings`, a
 * JSON object of tunables for the functions (see TUNABLE_SETTINGS in shared/config.ts), e.g.
 * `-c settings='{"OFFLINE_QUOTA":"5000","SM_MAX_SECONDS":"600"}'`, plus the stack's own settings
 * (DEPLOY_SETTINGS in infra/stack.ts: `STREAM_LOG_LEVEL` and the like, `TRACING`); `domainName` and
 * `certificateArn` together, a custom host name for the WebSocket endpoint (an ACM certificate
 * in the stack's region); `keepRetiredIndexes=true` for the first of two deployments that replace
 * an index (README, "Upgrading").
 *
 * The stack is environment-agnostic (no account or region, no lookups), so synth runs offline.
 */
import { App, Validations } from 'aws-cdk-lib';
import { AwsSolutionsChecks } from 'cdk-nag';
import { NimbusStack } from './stack.ts';

const app = new App();
const domain = String(app.node.tryGetContext('domain') ?? 'localhost').toLowerCase();
const manageApiGatewayAccountRole = String(app.node.tryGetContext('manageApiGatewayAccountRole')) !== 'false';
const keepRetiredIndexes = String(app.node.tryGetContext('keepRetiredIndexes')) === 'true';
const rawSettings: unknown = app.node.tryGetContext('settings') ?? {};
const settings = (typeof rawSettings === 'string' ? JSON.parse(rawSettings) : rawSettings) as Record<
  string,
  string
>;

const domainName = app.node.tryGetContext('domainName') as string | undefined;
const certificateArn = app.node.tryGetContext('certificateArn') as string | undefined;
if (Boolean(domainName) !== Boolean(certificateArn)) {
  throw new Error(
    'A custom domain needs both -c domainName=… and -c certificateArn=… (an ACM certificate in the region)',
  );
}

new NimbusStack(app, 'Nimbus', {
  description: `Nimbus: serverless XMPP server for ${domain}`,
  domain,
  manageApiGatewayAccountRole,
  keepRetiredIndexes,
  settings,
  ...(domainName && certificateArn
    ? {
        customDomain: {
          domainName: String(domainName).toLowerCase(),
          certificateArn: String(certificateArn),
        },
      }
    : {}),
});

// Any finding that is neither fixed nor acknowledged in infra/ stops the synth (and so the deploy).
if (String(app.node.tryGetContext('nag')) !== 'false') {
  Validations.of(app).addPlugins(new AwsSolutionsChecks(app, { verbose: true }));
}
