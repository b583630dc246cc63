/**
 * `npm run bench:breakeven [-- --peak-to-mean 10 --record-bytes 1024 --from bench/results/NAME.json]`:
 * what the frame queue costs a month as SQS FIFO (Nimbus's) and as a Kinesis data stream
 * partitioned by connection id (provisioned, polled or with enhanced fan-out, and on-demand),
 * and the monthly volume above which each Kinesis mode costs less. The prices are
 * `prices.ts`'s; the arithmetic is `cost.ts`'s (unit-tested). With `--from`, volumes are also
 * given in messages, from the frames per message a bench run measured.
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import {
  breakEvenFramesPerMonth,
  kinesisShards,
  type QueueLoad,
  type QueueOption,
  queueMonthly,
} from './cost.ts';
import { PRICES_AS_OF, PRICES_REGION } from './prices.ts';
import type { BenchReport } from './report.ts';

const { values } = parseArgs({
  options: {
    'peak-to-mean': { type: 'string', default: '10' },
    'record-bytes': { type: 'string', default: '1024' },
    'frames-per-batch': { type: 'string', default: '1' },
    from: { type: 'string' },
  },
});

const shape: Omit<QueueLoad, 'framesPerMonth'> = {
  peakToMean: Number(values['peak-to-mean']),
  recordBytes: Number(values['record-bytes']),
  framesPerBatch: Number(values['frames-per-batch']),
};

const OPTIONS: { option: QueueOption | 'sqs-fifo'; title: string }[] = [
  { option: 'sqs-fifo', title: 'SQS FIFO' },
  { option: 'kinesis-provisioned', title: 'Kinesis provisioned (polled)' },
  { option: 'kinesis-provisioned-efo', title: 'Kinesis provisioned + fan-out' },
  { option: 'kinesis-on-demand', title: 'Kinesis on-demand' },
];

const VOLUMES = [1e6, 3e6, 1e7, 3e7, 1e8, 3e8, 1e9];

const millions = (frames: number) =>
  frames >= 1e9
    ? `${(frames / 1e9).toFixed(frames % 1e9 === 0 ? 0 : 2)}B`
    : `${(frames / 1e6).toFixed(frames < 1e7 ? 1 : 0)}M`;
const dollars = (value: number) => `$${value.toFixed(2)}`;

/** Frames in per message of each scenario of a bench run. */
function framesPerMessage(file: string | undefined): { scenario: string; frames: number }[] {
  if (!file) return [];
  const report = JSON.parse(readFileSync(file, 'utf8')) as BenchReport;
  return report.results.flatMap((result) =>
    result.perMessage ? [{ scenario: result.scenario, frames: result.perMessage.framesIn }] : [],
  );
}

const lines: string[] = [];
lines.push(
  `Frame queue, $ per 30-day month (${PRICES_REGION} list prices as of ${PRICES_AS_OF}); ` +
    `peak ${shape.peakToMean}× the mean rate, ${shape.recordBytes}-byte records, ${shape.framesPerBatch} frame(s) per Lambda batch`,
  '',
  `| frames / month | ${OPTIONS.map((o) => o.title).join(' | ')} | shards |`,
  `| --- | ${OPTIONS.map(() => '---').join(' | ')} | --- |`,
);
for (const framesPerMonth of VOLUMES) {
  const load: QueueLoad = { ...shape, framesPerMonth };
  lines.push(
    `| ${millions(framesPerMonth)} | ${OPTIONS.map((o) => dollars(queueMonthly(o.option, load))).join(' | ')} | ${kinesisShards(load)} |`,
  );
}
lines.push('', 'Break-even against SQS FIFO (Kinesis costs less above):');
const perMessage = framesPerMessage(values.from);
for (const { option, title } of OPTIONS.slice(1)) {
  const frames = breakEvenFramesPerMonth(option as QueueOption, shape);
  if (frames === undefined) {
    lines.push(`- ${title}: never at this peak-to-mean ratio`);
    continue;
  }
  const perSecond = frames / (30 * 24 * 3600);
  const asMessages = perMessage
    .map((p) => `${millions(frames / p.frames)} messages ${p.scenario === 'sm' ? 'with SM' : 'without SM'}`)
    .join(', ');
  lines.push(
    `- ${title}: ${millions(frames)} frames a month (${perSecond.toFixed(1)} frames/s on average)${asMessages ? `; ${asMessages}` : ''}`,
  );
}
process.stdout.write(`${lines.join('\n')}\n`);
