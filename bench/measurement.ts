/**
 * One measured operation of the store benches (`bench/offline.ts`, `bench/archive.ts`), per run,
 * and the table they print.
 */
import type { MeterSnapshot } from '../shared/store/dynamo.ts';

export interface Measurement {
  operation: string;
  /** How many times it ran; the figures below are per run. */
  runs: number;
  medianMs: number;
  p95Ms: number;
  dynamoRequests: number;
  readUnits: number;
  writeUnits: number;
  /** Frames the server posted to the client (API Gateway messages), and their bytes. */
  frames: number;
  bytes: number;
  /** Per DynamoDB operation, per run. */
  dynamodb: MeterSnapshot['operations'];
  /** Per operation and kind of item (`UpdateItem sm`, `GetItem conn`), per run, when measured. */
  dynamodbByItem?: MeterSnapshot['operations'];
}

export function printMeasurements(results: Measurement[]): void {
  const header = ['operation', 'runs', 'median ms', 'p95 ms', 'DDB req', 'RCU', 'WCU', 'frames', 'KB out'];
  const rows = results.map((r) => [
    r.operation,
    String(r.runs),
    r.medianMs.toFixed(1),
    r.p95Ms.toFixed(1),
    r.dynamoRequests.toFixed(1),
    r.readUnits.toFixed(1),
    r.writeUnits.toFixed(1),
    r.frames.toFixed(0),
    (r.bytes / 1024).toFixed(1),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => (row[i] as string).length)));
  const line = (cells: string[]) =>
    cells
      .map((cell, i) => (i === 0 ? cell.padEnd(widths[i] as number) : cell.padStart(widths[i] as number)))
      .join('  ');
  process.stdout.write(`\n${line(header)}\n${widths.map((w) => '-'.repeat(w)).join('  ')}\n`);
  for (const row of rows) process.stdout.write(`${line(row)}\n`);
  process.stdout.write(
    '(per run; DynamoDB units as DynamoDB Local reports them, session reads and writes included)\n',
  );
}
