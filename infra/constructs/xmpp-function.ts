import type { Duration } from 'aws-cdk-lib';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import { Charset, NodejsFunction, OutputFormat } from 'aws-cdk-lib/aws-lambda-nodejs';
import * as logs from 'aws-cdk-lib/aws-logs';
import { Construct } from 'constructs';
import type { LogLevel } from '../../shared/log.ts';
import { METRIC_SERVICE } from '../../shared/metrics.ts';

/**
 * Memory per function, in MB, from `npm run bench` (2026-11-22): the stream function's process
 * peaked at 145–178 MB RSS without and 153–184 MB with stream management (heap in use 23–67 MB), and
 * that was unbundled TypeScript under tsx, an upper bound for the esbuild bundle. 256 MB would
 * hold it; stream gets 512 MB because Lambda allots CPU in proportion to memory and the stream
 * function is CPU-bound (3.5–5 ms of CPU per message, mostly AWS SDK work, plus PBKDF2 for
 * PLAIN logins). connect and sweeper do a few DynamoDB calls each.
 */
export const FUNCTION_MEMORY_MB = { connect: 256, stream: 512, sweeper: 256 } as const;

export const FUNCTION_RUNTIME = lambda.Runtime.NODEJS_22_X;

/**
 * esbuild settings shared by `XmppFunction` and `bench/cold-start.ts` (which measures what the
 * stack deploys):
 * - `mainFields`: a package's ESM build (`module`) before its CommonJS one (`main`). The AWS SDK
 *   clients ship both; the CommonJS build require()s whole @smithy/@aws-sdk modules, so nothing
 *   could be tree-shaken (browser user-agent parsing, CBOR and XML codecs, event streams…). ESM:
 *   the stream bundle goes from 786 to 589 KB and its import from 110 to 80 ms.
 * - `alias`: the SDK's default credential chain replaced by functions/lambda-credentials.ts
 *   (environment, then container endpoint): a function never needs SSO, STS, INI files or EC2
 *   metadata, about 80 KB more; and `@aws-sdk/middleware-endpoint-discovery` by
 *   functions/endpoint-discovery.ts (discovery off, no endpoint cache: about 1.7 KB, and with it
 *   mnemonist's LRU cache, 7 KB, which an alias to a `Map` replaced until session 14); and
 *   `@smithy/core/event-streams` by functions/event-streams.ts (no operation Nimbus calls
 *   streams events; the protocols' dynamic import of it was inlined: about 15 KB).
 */
export const BUNDLE_MAIN_FIELDS = ['module', 'main'];
/** Relative to the project root, the directory esbuild runs in (`projectRoot`). */
export const BUNDLE_ALIASES: Record<string, string> = {
  '@aws-sdk/credential-provider-node': './functions/lambda-credentials.ts',
  // The DynamoDB client's endpoint discovery (never used: discovery stays off).
  '@aws-sdk/middleware-endpoint-discovery': './functions/endpoint-discovery.ts',
  // The SDK's event-stream codec (no DynamoDB or Management API operation streams events).
  '@smithy/core/event-streams': './functions/event-streams.ts',
  // The SDK's checksums: only SigV4's SHA-256, from node:crypto (no pure-JavaScript fallback).
  '@smithy/core/checksum': './functions/checksum.ts',
};

/**
 * Expressions esbuild folds at build time (`define`), for `XmppFunction` and
 * `bench/cold-start.ts`: `NIMBUS_TRACING` (a bundle without tracing carries no X-Ray SDK, see
 * functions/telemetry.ts) and `NIMBUS_SWEEPS`, false in every function but the sweeper: the
 * modules register their `sweep` phases only when it is not 'false', so the stream and connect
 * bundles carry none of the sweeper's code (about 1.5 KB of the stream bundle). Unbundled (the
 * local runner, the tests) it is unset: the phases are registered. `NIMBUS_ADMIN` is false in
 * every function: the stores' operator-only commands (the Scans of `npm run user -- list` and
 * `sessions`, an account's creation, new password and deletion; the admin CLI runs from source)
 * leave the bundles, with the SDK's Scan command.
 */
export function bundleDefines(options: { tracing: boolean; sweeps: boolean }): Record<string, string> {
  return {
    'process.env.NIMBUS_TRACING': JSON.stringify(options.tracing ? 'true' : 'false'),
    'process.env.NIMBUS_SWEEPS': JSON.stringify(options.sweeps ? 'true' : 'false'),
    'process.env.NIMBUS_ADMIN': JSON.stringify('false'),
  };
}

/** How long function logs are kept. */
export const LOG_RETENTION = logs.RetentionDays.ONE_MONTH;

export interface XmppFunctionProps {
  /** Absolute path of the entry file; it must export `handler`. */
  entry: string;
  memorySize: number;
  timeout: Duration;
  description: string;
  /** Directory holding package.json and package-lock.json. */
  projectRoot: string;
  environment: Record<string, string>;
  /** `LOG_LEVEL` of this function (a deploy setting); default info. */
  logLevel?: LogLevel;
  /**
   * X-Ray active tracing, with Powertools' Tracer wrapping the AWS SDK clients. Off by default:
   * a bundle built without it carries no tracing code (see functions/telemetry.ts).
   */
  tracing?: boolean;
  /** Reserved concurrency; 0 or absent: none. */
  reservedConcurrency?: number;
  /** The function runs the sweeper's phases; the others are bundled without them (`bundleDefines`). */
  sweeps?: boolean;
}

/**
 * Lambda's application log level (advanced logging controls) for a `LOG_LEVEL`: DEBUG for
 * `debug`, INFO for every other level, never above. Lambda drops JSON lines below this level, and
 * it reads a line without a `level` field as INFO (AWS Lambda Developer Guide, "Log-level
 * filtering"): the metric lines (embedded metric format, written to stdout by
 * functions/telemetry.ts) have none, so at WARN or above Lambda would drop every metric. The
 * function's own logger filters its lines by `LOG_LEVEL` before they are written.
 */
function applicationLogLevel(level: LogLevel): lambda.ApplicationLogLevel {
  return level === 'debug' ? lambda.ApplicationLogLevel.DEBUG : lambda.ApplicationLogLevel.INFO;
}

/**
 * A Node.js 22 arm64 function bundled locally by esbuild as minified ESM, with its own log group
 * and its own role. The role only gets what the stack grants explicitly, plus writing to this
 * function's log group: no AWSLambdaBasicExecutionRole (which allows logs:* on every group).
 */
export class XmppFunction extends Construct {
  readonly fn: NodejsFunction;
  readonly logGroup: logs.LogGroup;
  readonly role: iam.Role;

  constructor(scope: Construct, id: string, props: XmppFunctionProps) {
    super(scope, id);
    this.logGroup = new logs.LogGroup(this, 'Logs', { retention: LOG_RETENTION });
    this.role = new iam.Role(this, 'Role', {
      assumedBy: new iam.ServicePrincipal('lambda.amazonaws.com'),
      description: `Execution role of the ${id} function`,
    });
    // The group exists already, so the function needs neither logs:CreateLogGroup nor a wildcard.
    this.logGroup.grant(this.role, 'logs:CreateLogStream', 'logs:PutLogEvents');

    this.fn = new NodejsFunction(this, 'Function', {
      entry: props.entry,
      handler: 'handler',
      description: props.description,
      runtime: FUNCTION_RUNTIME,
      architecture: lambda.Architecture.ARM_64,
      memorySize: props.memorySize,
      timeout: props.timeout,
      role: this.role,
      logGroup: this.logGroup,
      loggingFormat: lambda.LoggingFormat.JSON,
      applicationLogLevelV2: applicationLogLevel(props.logLevel ?? 'info'),
      ...(props.tracing ? { tracing: lambda.Tracing.ACTIVE } : {}),
      ...(props.reservedConcurrency ? { reservedConcurrentExecutions: props.reservedConcurrency } : {}),
      projectRoot: props.projectRoot,
      depsLockFilePath: `${props.projectRoot}/package-lock.json`,
      environment: {
        ...props.environment,
        LOG_LEVEL: props.logLevel ?? 'info',
        // Powertools' own setting: the service name (the Tracer's, when tracing is on).
        POWERTOOLS_SERVICE_NAME: METRIC_SERVICE,
        NIMBUS_TRACING: props.tracing ? 'true' : 'false',
        // Stack traces point into the TypeScript sources instead of the minified bundle.
        NODE_OPTIONS: '--enable-source-maps',
      },
      bundling: {
        minify: true,
        sourceMap: true,
        // Stack traces need the mappings, not the sources: a third of the map to parse at cold
        // start under --enable-source-maps (about 15 ms less import).
        sourcesContent: false,
        format: OutputFormat.ESM,
        target: 'node22',
        // Characters outside ASCII as written (Node reads sources as UTF-8), not as six-byte
        // `\uXXXX` escapes: the `§` and `’` of error texts, the XML name tables (about 0.3 KB).
        charset: Charset.UTF8,
        mainFields: BUNDLE_MAIN_FIELDS,
        esbuildArgs: {
          '--alias': Object.entries(BUNDLE_ALIASES).map(([from, to]) => `${from}=${to}`),
          // The bundled packages' license notices go to a file beside the bundle (shipped in the
          // same asset), not into the code every cold start parses.
          '--legal-comments': 'external',
        },
        // Some CommonJS dependencies call require() for Node built-ins; ESM has no require.
        banner: "import { createRequire } from 'module'; const require = createRequire(import.meta.url);",
        // Ship the SDK versions the tests ran against (package-lock.json), not whatever the
        // runtime happens to carry this month; minified and tree-shaken it also loads faster.
        bundleAwsSDK: true,
        // Folded at build time: a function deployed without tracing ships no X-Ray SDK, one that
        // does not sweep no sweeper code.
        define: bundleDefines({ tracing: props.tracing ?? false, sweeps: props.sweeps ?? false }),
      },
    });
  }
}
