/**
 * `--profile`: a V8 sampling profile of the stream worker over the measured window, with its
 * samples' self time grouped by where the code comes from, so a CPU figure can be split into
 * the AWS SDK, Node's HTTP stack, socket writes, the XMPP core, … Written next to the results
 * as a `.cpuprofile` (Chrome DevTools, speedscope).
 */
import { writeFile } from 'node:fs/promises';
import { Session } from 'node:inspector/promises';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string };
}

interface CpuProfile {
  nodes: ProfileNode[];
  samples?: number[];
  timeDeltas?: number[];
}

/** Self time of the non-idle samples, in milliseconds, by category. */
export type ProfileBreakdown = Record<string, number>;

/** Natives that are the socket syscalls themselves (the time the kernel spends sending and receiving). */
const SOCKET_NATIVES = new Set([
  'writev',
  'writeBuffer',
  'writeUtf8String',
  'writeLatin1String',
  'onStreamRead',
]);

function categoryOf(frame: ProfileNode['callFrame']): string | undefined {
  const { functionName, url } = frame;
  if (functionName === '(idle)') return undefined;
  if (functionName === '(garbage collector)') return 'GC';
  if (functionName === '(program)') return 'V8 / runtime';
  if (url === '' && SOCKET_NATIVES.has(functionName)) return 'socket reads and writes (syscalls)';
  if (/node_modules\/(@aws-sdk|@smithy|@aws-crypto|fast-xml-parser|bowser|tslib)\//.test(url))
    return 'AWS SDK';
  if (/node_modules\/ltx\//.test(url)) return 'ltx (XML)';
  if (/\/(shared|functions)\//.test(url) && !url.includes('node_modules')) return 'Nimbus core';
  if (url.startsWith('node:') || url === '') return 'Node (http, net, crypto, IPC)';
  if (/\/bench\//.test(url)) return 'bench harness';
  return 'other';
}

export class Profiler {
  private session: Session | undefined;

  async start(): Promise<void> {
    this.session = new Session();
    this.session.connect();
    await this.session.post('Profiler.enable');
    await this.session.post('Profiler.setSamplingInterval', { interval: 200 });
    await this.session.post('Profiler.start');
  }

  /** Stops, writes the profile to `file` and returns its breakdown. */
  async stop(file: string): Promise<ProfileBreakdown> {
    const session = this.session;
    if (!session) return {};
    const { profile } = (await session.post('Profiler.stop')) as { profile: CpuProfile };
    session.disconnect();
    this.session = undefined;
    await writeFile(file, JSON.stringify(profile));
    const byId = new Map(profile.nodes.map((node) => [node.id, node]));
    const breakdown: ProfileBreakdown = {};
    const samples = profile.samples ?? [];
    const deltas = profile.timeDeltas ?? [];
    for (let i = 0; i < samples.length; i++) {
      const node = byId.get(samples[i] as number);
      const category = node && categoryOf(node.callFrame);
      if (!category) continue;
      breakdown[category] = (breakdown[category] ?? 0) + (deltas[i] ?? 0) / 1000;
    }
    return breakdown;
  }
}
