/**
 * Structured logs: the per-frame context on every line (connection id, bare JID, element,
 * request id), kept apart between frames running at once, in JSON and in the local text
 * format; and the same fields with the Lambda context, as the functions write them on AWS.
 */
import type { Context } from 'aws-lambda';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { lambdaLogger } from '../../functions/telemetry.ts';
import { addLogContext, createLogger, useSequentialLogContext, withLogContext } from '../../shared/log.ts';

function capture(level = 'debug', format: 'json' | 'text' = 'json') {
  const lines: string[] = [];
  return { lines, log: createLogger(level, { format, write: (line) => lines.push(line) }) };
}

describe('the log context', () => {
  it('is on every line written inside it, extended as the frame is understood', async () => {
    const { lines, log } = capture();
    await withLogContext({ connectionId: 'Ab+c=', requestId: 'req-1' }, async () => {
      log.debug('parsed');
      addLogContext({ element: 'message', jid: 'alice@example.org' });
      await Promise.resolve();
      log.warn('frame will be retried', { error: new Error('throttled') });
    });
    log.info('outside');
    const [first, second, outside] = lines.map((line) => JSON.parse(line));
    expect(first).toEqual({ level: 'debug', message: 'parsed', connectionId: 'Ab+c=', requestId: 'req-1' });
    expect(second).toMatchObject({
      level: 'warn',
      connectionId: 'Ab+c=',
      requestId: 'req-1',
      element: 'message',
      jid: 'alice@example.org',
      error: { name: 'Error', message: 'throttled' },
    });
    expect(outside).toEqual({ level: 'info', message: 'outside' });
  });

  it('keeps frames of different connections apart when they run at once', async () => {
    const { lines, log } = capture();
    const frame = (connectionId: string, jid: string) =>
      withLogContext({ connectionId }, async () => {
        await new Promise((resolve) => setTimeout(resolve, 5));
        addLogContext({ jid });
        await new Promise((resolve) => setTimeout(resolve, 5));
        log.info('handled');
      });
    await Promise.all([frame('c1', 'alice@example.org'), frame('c2', 'bob@example.org')]);
    const seen = lines
      .map((line) => JSON.parse(line))
      .map(({ connectionId, jid }) => `${connectionId} ${jid}`);
    expect(seen.sort()).toEqual(['c1 alice@example.org', 'c2 bob@example.org']);
  });

  it('works the same kept in a variable, as in a Lambda function (one frame at a time)', async () => {
    useSequentialLogContext();
    try {
      const { lines, log } = capture();
      for (const connectionId of ['c1', 'c2']) {
        await withLogContext({ connectionId }, async () => {
          await new Promise((resolve) => setTimeout(resolve, 1));
          addLogContext({ element: 'message' });
          await withLogContext({ jid: 'alice@example.org' }, async () => log.info('inner'));
          log.info('outer');
        });
      }
      log.info('outside');
      expect(lines.map((line) => JSON.parse(line))).toEqual([
        { level: 'info', message: 'inner', connectionId: 'c1', element: 'message', jid: 'alice@example.org' },
        { level: 'info', message: 'outer', connectionId: 'c1', element: 'message' },
        { level: 'info', message: 'inner', connectionId: 'c2', element: 'message', jid: 'alice@example.org' },
        { level: 'info', message: 'outer', connectionId: 'c2', element: 'message' },
        { level: 'info', message: 'outside' },
      ]);
    } finally {
      useSequentialLogContext(false);
    }
  });

  it('reads as text on a terminal, with the same fields', async () => {
    const { lines, log } = capture('info', 'text');
    await withLogContext({ connectionId: 'c1', element: 'iq' }, async () => log.info('hello', { ms: 3 }));
    expect(lines[0]).toMatch(/^\d\d:\d\d:\d\d\.\d{3} INFO {2}hello {2}connectionId=c1 element=iq ms=3$/);
  });

  it('honours the level', () => {
    const { lines, log } = capture('warn');
    log.info('quiet');
    log.error('loud');
    expect(lines).toHaveLength(1);
    expect(log.isEnabled('debug')).toBe(false);
    expect(log.isEnabled('error')).toBe(true);
  });
});

/** What the process writes to stdout and stderr from now on (until the mocks are restored). */
function captureOutput(): string[] {
  const written: string[] = [];
  const collect = (chunk: unknown) => {
    written.push(String(chunk));
    return true;
  };
  vi.spyOn(process.stdout, 'write').mockImplementation(collect);
  vi.spyOn(process.stderr, 'write').mockImplementation(collect);
  return written;
}

describe('the Lambda logger on AWS', () => {
  afterEach(() => {
    vi.restoreAllMocks();
    vi.unstubAllEnvs();
  });

  const lambdaContext = (requestId: string) =>
    ({
      awsRequestId: requestId,
      functionName: 'Nimbus-Stream',
      functionVersion: '$LATEST',
      invokedFunctionArn: 'arn:aws:lambda:us-east-1:000000000000:function:Nimbus-Stream',
      memoryLimitInMB: '512',
    }) as Context;

  it("writes the same fields plus the Lambda context, with Powertools' keys, at the configured level", async () => {
    vi.stubEnv(
      '_X_AMZN_TRACE_ID',
      'Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1',
    );
    const written = captureOutput();
    const { log, addContext } = lambdaLogger('info');
    addContext(lambdaContext('lambda-request-1'));
    await withLogContext({ connectionId: 'c1', requestId: 'apigw-1' }, async () => {
      addLogContext({ jid: 'alice@example.org', element: 'presence' });
      log.debug('not at info');
      log.warn('frame will be retried', { messageId: 'm1', error: new Error('throttled') });
    });
    addContext(lambdaContext('lambda-request-2'));
    log.info('second invocation');
    // A field JSON cannot write does not make the log call throw.
    const cyclic: Record<string, unknown> = {};
    cyclic.self = cyclic;
    log.error('still written', { cyclic, big: 1n });
    vi.restoreAllMocks();
    const entries = written.map((line) => JSON.parse(line));
    expect(entries).toHaveLength(3);
    expect(entries[0]).toMatchObject({
      level: 'WARN',
      message: 'frame will be retried',
      service: 'nimbus',
      cold_start: true,
      function_name: 'Nimbus-Stream',
      function_arn: 'arn:aws:lambda:us-east-1:000000000000:function:Nimbus-Stream',
      function_memory_size: 512,
      function_request_id: 'lambda-request-1',
      xray_trace_id: '1-5759e988-bd862e3fe1be46a994272793',
      connectionId: 'c1',
      requestId: 'apigw-1',
      jid: 'alice@example.org',
      element: 'presence',
      messageId: 'm1',
      error: { name: 'Error', message: 'throttled' },
    });
    expect(Number.isNaN(Date.parse(entries[0].timestamp))).toBe(false);
    // The log context ends with its work; the Lambda context stays for the invocation.
    expect(entries[1]).toMatchObject({ cold_start: false, function_request_id: 'lambda-request-2' });
    expect(entries[1].connectionId).toBeUndefined();
    expect(entries[2]).toMatchObject({
      level: 'ERROR',
      message: 'still written',
      function_request_id: 'lambda-request-2',
    });
    expect(entries[2].unwritableFields).toMatch(/circular|BigInt/i);
    expect(log.isEnabled('info')).toBe(true);
    expect(log.isEnabled('debug')).toBe(false);
  });

  it('reports no cold start for an environment initialised ahead of requests (provisioned concurrency)', () => {
    vi.stubEnv('AWS_LAMBDA_INITIALIZATION_TYPE', 'provisioned-concurrency');
    const written = captureOutput();
    const { log, addContext } = lambdaLogger('info');
    addContext(lambdaContext('lambda-request-3'));
    log.info('first invocation');
    vi.restoreAllMocks();
    expect(JSON.parse(written[0] as string)).toMatchObject({ cold_start: false });
  });

  it("keeps LOG_LEVEL when Lambda's application log level (INFO, so metric lines pass) is lower, and Lambda's when it is higher", () => {
    // The stack sets Lambda's level to INFO for warn, error and silent; Lambda passes it on as
    // AWS_LAMBDA_LOG_LEVEL.
    vi.stubEnv('AWS_LAMBDA_LOG_LEVEL', 'INFO');
    const written = captureOutput();
    const warn = lambdaLogger('warn').log;
    warn.info('not at warn');
    warn.warn('at warn');
    const silent = lambdaLogger('silent').log;
    silent.error('not when silent');
    const debug = lambdaLogger('debug').log;
    debug.debug('not below Lambda level');
    vi.stubEnv('AWS_LAMBDA_LOG_LEVEL', 'ERROR');
    lambdaLogger('info').log.warn('not below an ERROR Lambda level');
    vi.restoreAllMocks();
    expect(written.map((line) => JSON.parse(line).message)).toEqual(['at warn']);
    expect(warn.isEnabled('info')).toBe(false);
    expect(warn.isEnabled('warn')).toBe(true);
    expect(silent.isEnabled('error')).toBe(false);
    expect(debug.isEnabled('debug')).toBe(false);
  });
});
