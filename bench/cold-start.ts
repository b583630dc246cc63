/**
 * `npx tsx bench/cold-start.ts [stream|connect|sweeper ...] [--runs N] [--tracing]`: builds each
 * function the way the CDK stack does (`infra/constructs/xmpp-function.ts`: esbuild, ESM,
 * minified, target node22, ESM builds first, AWS SDK bundled with the Lambda credential chain,
 * source map without sources, `NIMBUS_TRACING` and `NIMBUS_SWEEPS` folded in (`bundleDefines`);
 * `--tracing` as with `TRACING=true`) and reports the bundle's size and its cold init:
 * a fresh `node` process importing the bundle and running the handler's first-call setup
 * (`server ??= createServer(...)`, with an empty event, so no network is touched). Median of
 * N runs; every run is a new process, as a Lambda cold start is.
 *
 * `--contents` also prints what the bundle is made of (esbuild's metafile): minified bytes per
 * package, and per file of ours, largest first: where to look when the 500 KB target is crossed.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { gzipSync } from 'node:zlib';
import { build, type Metafile } from 'esbuild';
import { BUNDLE_ALIASES, BUNDLE_MAIN_FIELDS, bundleDefines } from '../infra/constructs/xmpp-function.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
/** The banner of `XmppFunction`'s bundling options. */
const BANNER = "import { createRequire } from 'module'; const require = createRequire(import.meta.url);";
/** An event each handler accepts without doing any I/O. */
const EMPTY_EVENTS: Record<string, string> = {
  stream: '{"Records":[]}',
  connect: 'undefined',
  sweeper: 'undefined',
};

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] as number;
}

/** Import time of the bundle, and the setup of the first call (connect is not invoked: it would query DynamoDB). */
function coldInit(
  file: string,
  name: string,
  tracing: string,
): { importMs: number; firstCallSetupMs: number } {
  // The context Lambda passes (the stream function reads the invocation's remaining time).
  const context = '{ awsRequestId: "cold", getRemainingTimeInMillis: () => 30000 }';
  const firstCall = name === 'stream' ? `await handler(${EMPTY_EVENTS[name]}, ${context});` : '';
  const script = `
    const t0 = performance.now();
    const { handler } = await import(${JSON.stringify(file)});
    const t1 = performance.now();
    ${firstCall}
    const t2 = performance.now();
    console.log('COLD-INIT ' + JSON.stringify({ importMs: t1 - t0, firstCallSetupMs: t2 - t1 }));`;
  const result = spawnSync(process.execPath, ['--enable-source-maps', '--input-type=module', '-e', script], {
    env: {
      PATH: process.env.PATH,
      AWS_REGION: 'us-east-1',
      XMPP_DOMAIN: 'example.org',
      CONNECTIONS_ENDPOINT: 'https://example.execute-api.us-east-1.amazonaws.com/xmpp',
      AWS_LAMBDA_FUNCTION_NAME: `Nimbus-${name}`,
      AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true',
      LOG_LEVEL: 'warn',
      NIMBUS_TRACING: tracing,
    },
    encoding: 'utf8',
  });
  if (result.status !== 0) throw new Error(`cold init of ${name} failed: ${result.stderr}`);
  // The handler writes its own lines (metrics) to stdout too.
  const line = result.stdout.split('\n').find((l) => l.startsWith('COLD-INIT '));
  if (!line) throw new Error(`cold init of ${name}: no timing in ${result.stdout}`);
  return JSON.parse(line.slice('COLD-INIT '.length));
}

export interface ColdStart {
  function: string;
  tracing: boolean;
  bundleBytes: number;
  /** Minified bytes per package (`@scope/name`) or per directory of ours, largest first. */
  contents: { source: string; bytes: number }[];
  gzippedBytes: number;
  /** Medians of `runs` fresh processes. */
  importMs: number;
  firstCallSetupMs: number;
  /** Import plus first-call setup, median of the per-run sums. */
  initMs: number;
  runs: number;
}

/** The bundle's bytes by source: a package, or one of our files (its path from the project root). */
function bundleContents(metafile: Metafile): { source: string; bytes: number }[] {
  const bySource = new Map<string, number>();
  for (const output of Object.values(metafile.outputs)) {
    if (!output.entryPoint) continue;
    for (const [path, input] of Object.entries(output.inputs)) {
      const source = path.match(/node_modules\/((?:@[^/]+\/)?[^/]+)/)?.[1] ?? path;
      bySource.set(source, (bySource.get(source) ?? 0) + input.bytesInOutput);
    }
  }
  return [...bySource].map(([source, bytes]) => ({ source, bytes })).sort((a, b) => b.bytes - a.bytes);
}

/** Builds one function as the stack does and measures its bundle and cold init. */
export async function measureColdStart(name: string, runs: number, tracing = false): Promise<ColdStart> {
  const out = mkdtempSync(join(tmpdir(), 'nimbus-bundle-'));
  try {
    const outfile = join(out, name, 'index.mjs');
    const result = await build({
      entryPoints: [join(ROOT, 'functions', `${name}.ts`)],
      bundle: true,
      platform: 'node',
      target: 'node22',
      format: 'esm',
      minify: true,
      sourcemap: true,
      sourcesContent: false,
      // As XmppFunction: non-ASCII characters as written.
      charset: 'utf8',
      // As XmppFunction: license notices in a file beside the bundle.
      legalComments: 'external',
      banner: { js: BANNER },
      define: bundleDefines({ tracing, sweeps: name === 'sweeper' }),
      mainFields: BUNDLE_MAIN_FIELDS,
      alias: Object.fromEntries(Object.entries(BUNDLE_ALIASES).map(([from, to]) => [from, join(ROOT, to)])),
      outfile,
      metafile: true,
      logLevel: 'error',
    });
    const samples = Array.from({ length: runs }, () => coldInit(outfile, name, String(tracing)));
    return {
      function: name,
      tracing,
      bundleBytes: statSync(outfile).size,
      contents: bundleContents(result.metafile),
      gzippedBytes: gzipSync(readFileSync(outfile)).length,
      importMs: median(samples.map((s) => s.importMs)),
      firstCallSetupMs: median(samples.map((s) => s.firstCallSetupMs)),
      initMs: median(samples.map((s) => s.importMs + s.firstCallSetupMs)),
      runs,
    };
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const runsAt = args.indexOf('--runs');
  const runs = runsAt >= 0 ? Number(args[runsAt + 1]) : 9;
  const names = args.filter((a, i) => !a.startsWith('--') && args[i - 1] !== '--runs');
  const tracing = args.includes('--tracing');
  const contents = args.includes('--contents');
  for (const name of names.length > 0 ? names : ['stream']) {
    const cold = await measureColdStart(name, runs, tracing);
    console.log(
      `${name.padEnd(8)} ${(cold.bundleBytes / 1024).toFixed(0).padStart(6)} KB minified, ${(
        cold.gzippedBytes / 1024
      )
        .toFixed(0)
        .padStart(
          4,
        )} KB gzipped; import ${cold.importMs.toFixed(1)} ms, first-call setup ${cold.firstCallSetupMs.toFixed(
        1,
      )} ms (median of ${runs})`,
    );
    if (contents)
      for (const { source, bytes } of cold.contents.slice(0, 30))
        console.log(`  ${(bytes / 1024).toFixed(1).padStart(6)} KB  ${source}`);
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) await main();
