/**
 * Structured logs: one line per entry (CloudWatch on AWS, stderr locally), each carrying the
 * context of the work it belongs to (`LogContext`: connection id, bare JID, the frame's element,
 * request id). The context follows the work (shared/context.ts), so concurrent frames of
 * different connections (the local runner runs them in one process) never mix their fields, and
 * code deep in the core logs without passing ids around.
 *
 * Never put a password, a SASL payload or a frame's text in a log field: the logger does not
 * redact, and the tests check a login's log lines for both.
 */
import { contextStore, useSequentialContexts } from './context.ts';

export const LOG_LEVELS = ['debug', 'info', 'warn', 'error', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export interface Logger {
  debug(message: string, fields?: Record<string, unknown>): void;
  info(message: string, fields?: Record<string, unknown>): void;
  warn(message: string, fields?: Record<string, unknown>): void;
  error(message: string, fields?: Record<string, unknown>): void;
  /** Whether an entry at `level` would be written (to skip building costly fields). */
  isEnabled(level: Exclude<LogLevel, 'silent'>): boolean;
}

/** What every line written while handling one frame (or one `$connect`) carries. */
export interface LogContext {
  connectionId?: string;
  /** The authenticated bare JID, once known. */
  jid?: string;
  /** The frame's top-level element (`message`, `auth`, `r`, …), once parsed. */
  element?: string;
  /** API Gateway's request id of the frame or handshake (also in the stage's access log). */
  requestId?: string;
}

const contexts = contextStore<LogContext>();

/**
 * The log context in a plain variable, for a process that handles one frame at a time (a Lambda
 * function): see shared/context.ts. Switches every context store of the process.
 */
export function useSequentialLogContext(sequential = true): void {
  useSequentialContexts(sequential);
}

/** Runs `work` with `context` on every line it logs (nested calls see a copy they may extend). */
export function withLogContext<T>(context: LogContext, work: () => Promise<T>): Promise<T> {
  return contexts.run({ ...contexts.get(), ...context }, work);
}

/** Adds fields to the current context (the element once parsed, the JID once authenticated). */
export function addLogContext(fields: LogContext): void {
  const current = contexts.get();
  if (current) Object.assign(current, fields);
}

export function currentLogContext(): LogContext | undefined {
  return contexts.get();
}

/** The levels' order (the Lambda logger in functions/telemetry.ts uses the same scale). */
export const LOG_SEVERITY: Readonly<Record<LogLevel, number>> = {
  debug: 10,
  info: 20,
  warn: 30,
  error: 40,
  silent: 100,
};

export function isLogLevel(value: string): value is LogLevel {
  return (LOG_LEVELS as readonly string[]).includes(value);
}

/** The entry's fields as they are written: the context first, errors made serialisable. */
export function entryFields(fields?: Record<string, unknown>): Record<string, unknown> {
  const line: Record<string, unknown> = { ...currentLogContext(), ...fields };
  for (const [key, value] of Object.entries(line)) {
    if (value === undefined) delete line[key];
    else if (value instanceof Error)
      line[key] = { name: value.name, message: value.message, stack: value.stack };
  }
  return line;
}

export interface LoggerOptions {
  /** `json` (default): one JSON object per line. `text`: the same fields, for a terminal. */
  format?: 'json' | 'text';
  /** Where lines go; default stderr. */
  write?: (line: string) => void;
}

function textLine(level: LogLevel, message: string, fields: Record<string, unknown>): string {
  const time = new Date().toISOString().slice(11, 23);
  const parts = Object.entries(fields).map(([key, value]) => {
    if (key === 'error' && typeof value === 'object' && value !== null) {
      const { stack, message: text } = value as { stack?: string; message?: string };
      return `\n${stack ?? text}`;
    }
    return `${key}=${typeof value === 'string' ? value : JSON.stringify(value)}`;
  });
  return `${time} ${level.toUpperCase().padEnd(5)} ${message}${parts.length ? `  ${parts.join(' ')}` : ''}`;
}

/**
 * The logger of the local runner, the tests and the bench (on AWS the functions write the same
 * fields with the Lambda context, see functions/telemetry.ts).
 */
export function createLogger(
  level: string = process.env.LOG_LEVEL ?? 'info',
  options: LoggerOptions = {},
): Logger {
  const threshold = LOG_SEVERITY[isLogLevel(level) ? level : 'info'];
  const write = options.write ?? ((line: string) => process.stderr.write(`${line}\n`));
  const text = options.format === 'text';
  const log = (at: LogLevel, message: string, fields?: Record<string, unknown>) => {
    if (LOG_SEVERITY[at] < threshold) return;
    const entry = entryFields(fields);
    write(text ? textLine(at, message, entry) : JSON.stringify({ level: at, message, ...entry }));
  };
  return {
    debug: (message, fields) => log('debug', message, fields),
    info: (message, fields) => log('info', message, fields),
    warn: (message, fields) => log('warn', message, fields),
    error: (message, fields) => log('error', message, fields),
    isEnabled: (at) => LOG_SEVERITY[at] >= threshold,
  };
}
