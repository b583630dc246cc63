/**
 * `npm run bench:parser`: time to parse hostile frames of up to 64 KB (what a client may send
 * before it has logged in), median of several runs each. Prints one line per pattern.
 */
import { parseFrame } from '../shared/xml/frame.ts';

const LIMIT = 65536;
const patterns: Record<string, (n: number) => string> = {
  'unterminated <![CDATA[ repeated': (n) => `<message><body>${'<![CDATA['.repeat(n)}</body></message>`,
  'terminated CDATA sections': (n) => `<message><body>${'<![CDATA[x]]>'.repeat(n)}</body></message>`,
  'stray ampersands': (n) => `<message><body>${'&a'.repeat(n)}</body></message>`,
  'deep nesting': (n) => `${'<a>'.repeat(n)}${'</a>'.repeat(n)}`,
  'many attributes': (n) => `<message ${Array.from({ length: n }, (_, i) => `a${i}='v'`).join(' ')}/>`,
};

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] as number;
}

for (const [name, build] of Object.entries(patterns)) {
  let n = 1;
  while (Buffer.byteLength(build(n * 2)) <= LIMIT) n *= 2;
  const frame = build(n);
  const times: number[] = [];
  for (let run = 0; run < 7; run++) {
    const start = process.hrtime.bigint();
    try {
      parseFrame(frame, LIMIT);
    } catch {
      // Refusing is the expected outcome for most of these; only the time matters here.
    }
    times.push(Number(process.hrtime.bigint() - start) / 1e6);
  }
  console.log(
    `${name.padEnd(36)} ${String(Buffer.byteLength(frame)).padStart(6)} bytes  ${median(times).toFixed(2)} ms`,
  );
}
