/** Structured one-line JSON logs (CloudWatch on AWS, stderr locally). */
export interface Logger {
  debug(message: string, fields?: Record<string, unknown>): void;
  info(message: string, fields?: Record<string, unknown>): void;
  warn(message: string, fields?: Record<string, unknown>): void;
  error(message: string, fields?: Record<string, unknown>): void;
}

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 } as const;
type Level = keyof typeof LEVELS;

export function createLogger(level: string = process.env.LOG_LEVEL ?? 'info'): Logger {
  const threshold = LEVELS[(level in LEVELS ? level : 'info') as Level];
  const write = (at: Level, message: string, fields?: Record<string, unknown>) => {
    if (LEVELS[at] < threshold) return;
    const line: Record<string, unknown> = { level: at, message, ...fields };
    if (fields?.error instanceof Error) {
      line.error = { name: fields.error.name, message: fields.error.message, stack: fields.error.stack };
    }
    process.stderr.write(`${JSON.stringify(line)}\n`);
  };
  return {
    debug: (message, fields) => write('debug', message, fields),
    info: (message, fields) => write('info', message, fields),
    warn: (message, fields) => write('warn', message, fields),
    error: (message, fields) => write('error', message, fields),
  };
}
