#!/usr/bin/env node
/**
 * `npm run check`'s architecture gate (docs/design.md "Core and modules"). Fails, listing every
 * violation, when:
 * - any import cycle exists among shared/, functions/ and infra/ (type-only imports and
 *   re-exports count: a cycle of types is still a knot to untie);
 * - the core (shared/core/) imports a module (shared/modules/) or the composition root
 *   (shared/server.ts), or a module imports the root;
 * - a store (shared/store/) imports the core or a module;
 * - anything but the stores, the outbound port and the core's context imports the AWS SDK
 *   (infra/ and functions/ aside);
 * - anything but the core's delivery path posts through the outbound port;
 * - anything outside test/ (the product or bench/) imports from test/: what the tests share
 *   with the bench lives in infra/local/.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';

const root = resolve(dirname(new URL(import.meta.url).pathname), '..');
const roots = ['shared', 'functions', 'infra'];
const IMPORT = /(?:^|\n)\s*(?:import|export)\s+(?:type\s+)?(?:[^'";]*?\sfrom\s+)?['"]([^'"]+)['"]/g;

function filesUnder(dir) {
  const out = [];
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) out.push(...filesUnder(path));
    else if (/\.(ts|mts|js|mjs)$/.test(name) && !name.endsWith('.d.ts')) out.push(path);
  }
  return out;
}

const files = roots.flatMap((r) => filesUnder(join(root, r)));
const rel = (p) => relative(root, p);
const graph = new Map();
const specifiers = new Map();
for (const file of files) {
  const text = readFileSync(file, 'utf8');
  const deps = [];
  const all = [];
  for (const match of text.matchAll(IMPORT)) {
    const spec = match[1];
    all.push(spec);
    if (spec.startsWith('.')) deps.push(rel(resolve(dirname(file), spec)));
  }
  graph.set(
    rel(file),
    deps.filter((d) => graph.has(d) || files.some((f) => rel(f) === d)),
  );
  specifiers.set(rel(file), all);
}

const problems = [];

for (const file of [...files, ...filesUnder(join(root, 'bench'))]) {
  for (const match of readFileSync(file, 'utf8').matchAll(IMPORT)) {
    const spec = match[1];
    if (spec.startsWith('.') && rel(resolve(dirname(file), spec)).startsWith('test/'))
      problems.push(`imports from test/ outside the tests: ${rel(file)} imports ${spec}`);
  }
}

// Tarjan's strongly connected components: every component of more than one file is a cycle.
let index = 0;
const stack = [];
const state = new Map();
function connect(node) {
  state.set(node, { index, low: index, onStack: true });
  index += 1;
  stack.push(node);
  for (const next of graph.get(node) ?? []) {
    if (!state.has(next)) {
      connect(next);
      state.get(node).low = Math.min(state.get(node).low, state.get(next).low);
    } else if (state.get(next).onStack) {
      state.get(node).low = Math.min(state.get(node).low, state.get(next).index);
    }
  }
  if (state.get(node).low === state.get(node).index) {
    const component = [];
    let member;
    do {
      member = stack.pop();
      state.get(member).onStack = false;
      component.push(member);
    } while (member !== node);
    const selfLoop = (graph.get(node) ?? []).includes(node);
    if (component.length > 1 || selfLoop) problems.push(`import cycle: ${component.sort().join(' <-> ')}`);
  }
}
for (const node of graph.keys()) if (!state.has(node)) connect(node);

const AWS_ALLOWED = (file) =>
  file.startsWith('shared/store/') ||
  file === 'shared/outbound.ts' ||
  file === 'shared/core/server.ts' ||
  file.startsWith('infra/') ||
  file.startsWith('functions/');

for (const [file, deps] of graph) {
  for (const dep of deps) {
    if (file.startsWith('shared/core/') && (dep.startsWith('shared/modules/') || dep === 'shared/server.ts'))
      problems.push(`the core imports a module or the composition root: ${file} -> ${dep}`);
    if (file.startsWith('shared/modules/') && dep === 'shared/server.ts')
      problems.push(`a module imports the composition root: ${file} -> ${dep}`);
    if (
      file.startsWith('shared/store/') &&
      (dep.startsWith('shared/core/') || dep.startsWith('shared/modules/'))
    )
      problems.push(`a store imports the core or a module: ${file} -> ${dep}`);
  }
  for (const spec of specifiers.get(file) ?? []) {
    if (spec.startsWith('@aws-sdk/') && !AWS_ALLOWED(file))
      problems.push(`AWS SDK outside the stores and the outbound port: ${file} imports ${spec}`);
  }
  if (file.startsWith('shared/') && file !== 'shared/core/delivery.ts') {
    const text = readFileSync(join(root, file), 'utf8');
    if (/\.outbound\.(send|post|close)\(/.test(text))
      problems.push(`posts around the delivery path (use core/delivery.ts): ${file}`);
  }
}

if (problems.length > 0) {
  for (const problem of problems) console.error(problem);
  console.error(`architecture check: ${problems.length} problem(s) in ${graph.size} files`);
  process.exit(1);
}
console.log(`architecture check: 0 import cycles, layers respected, ${graph.size} files`);
