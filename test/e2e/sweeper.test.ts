/**
 * The sweeper's run, each phase and each item on its own (functions/sweeper.ts, core/lifecycle.ts
 * `runSweep`): a liveness probe whose post fails with a 500 past the SDK's retries used to end the
 * whole run, so the sessions due for expiry and the XEP-0136 sweep waited, and the next run met
 * the same probe first. Now the failure is logged and counted, the rest of the run goes on, the
 * probe is tried again a minute later, and the invocation still fails in the end (the alarm).
 */
import type { Element } from 'ltx';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSweeperHandler, SweepFailedError } from '../../functions/sweeper.ts';
import { RawClient } from '../../infra/local/raw-client.ts';
import { frameTimeLeft } from '../../shared/core/frame.ts';
import { runSweep } from '../../shared/core/lifecycle.ts';
import type { MetricSample } from '../../shared/metrics.ts';
import { PROBE_RETRY_MS } from '../../shared/modules/xep-0198-stream-management.ts';
import type { ConnectionPort } from '../../shared/outbound.ts';
import { PROBE_AFTER_MS } from '../../shared/store/sm-queue.ts';
import { eventually } from '../support/eventually.ts';
import { intercept } from '../support/intercept.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

const SM3 = 'urn:xmpp:sm:3';

let stack: TestStack;
const raws: RawClient[] = [];

beforeAll(async () => {
  stack = await startTestStack();
  for (const user of ['leaver', 'failing', 'alive', 'late'])
    await stack.addUser(`${user}@localhost`, `${user}-pw`);
});

afterAll(async () => {
  for (const client of raws) client.terminate();
  await stack?.gateway.drained();
  await stack?.close();
});

/** A resumable stream-management session of `user`: its id and its client. */
async function resumable(user: string): Promise<{ client: RawClient; smId: string }> {
  const client = await RawClient.connect(stack.url);
  raws.push(client);
  await client.login(user, `${user}-pw`, 'res');
  client.send(`<enable xmlns='${SM3}' resume='true'/>`);
  const enabled: Element = await client.next();
  expect(enabled.name).toBe('enabled');
  return { client, smId: enabled.attrs.id as string };
}

/** API Gateway's answer to a post once the SDK has given up retrying it. */
function internalServerError(): Error {
  return Object.assign(new Error('Internal server error'), {
    name: 'InternalServerErrorException',
    $fault: 'server',
    $metadata: { httpStatusCode: 500 },
  });
}

describe('a liveness probe failing with a 500', () => {
  it('stops neither the expiries nor the archive sweep nor the other probes; it is counted, and tried again later', async () => {
    // Detached, its window (300 s) closed by the sweep's clock below.
    const leaver = await resumable('leaver');
    leaver.client.terminate();
    await eventually(async () => {
      const item = await stack.server.smQueue.get(leaver.smId);
      expect(item?.connectionId).toBeUndefined();
      expect(item?.sweepAt).toBeGreaterThan(0);
    });
    // Attached, both due for a probe by then; `failing` first (its probe is the older).
    const failing = await resumable('failing');
    const alive = await resumable('alive');
    const failingConnection = (await stack.server.smQueue.get(failing.smId))?.connectionId as string;
    expect(failingConnection).toBeDefined();

    const port = (stack.server.outbound as unknown as { port: ConnectionPort }).port;
    const post = port.post.bind(port);
    const restorePost = intercept(port, 'post', async (connectionId, data, notAfter) => {
      if (connectionId === failingConnection) throw internalServerError();
      return post(connectionId, data, notAfter);
    });
    const archive = stack.server.archive;
    const archiveSteps: string[] = [];
    const purgePending = archive.purgePending.bind(archive);
    const sweepExpiring = archive.sweepExpiring.bind(archive);
    const restorePurge = intercept(archive, 'purgePending', async (...args) => {
      archiveSteps.push('purge');
      return purgePending(...args);
    });
    const restoreExpiring = intercept(archive, 'sweepExpiring', async (...args) => {
      archiveSteps.push('expiry');
      return sweepExpiring(...args);
    });

    const clock = Date.now() + PROBE_AFTER_MS + 1000;
    const samples: MetricSample[] = [];
    try {
      const handler = createSweeperHandler(stack.server, {
        now: () => clock,
        publishMetrics: (drained) => samples.push(...drained),
      });
      // The run goes to the end, then fails the invocation (the function's Errors alarm).
      const failure = await handler().catch((error: unknown) => error);
      expect(failure).toBeInstanceOf(SweepFailedError);
      expect((failure as SweepFailedError).outcome).toEqual({ swept: 1, failed: 1, cutShort: false });
    } finally {
      restorePost();
      restorePurge();
      restoreExpiring();
    }

    // The expiry ran: the detached session ended.
    expect((await stack.server.smQueue.get(leaver.smId))?.ended).toBe(true);
    // The archive sweep ran.
    expect(archiveSteps).toEqual(['purge', 'expiry']);
    // The probe behind the failing one was made: the live client was asked for an ack.
    expect((await alive.client.until((el) => el.name === 'r')).attrs.xmlns).toBe(SM3);
    expect((await stack.server.smQueue.get(alive.smId))?.connectionId).toBeDefined();
    // The failure was counted by phase, and the expiry too.
    const sum = (name: string, phase?: string) =>
      samples
        .filter((s) => s.name === name && (phase === undefined || s.dimension?.value === phase))
        .reduce((total, s) => total + s.value, 0);
    expect(sum('SweepFailures', 'probe')).toBe(1);
    expect(sum('SweepFailures')).toBe(1);
    expect(sum('SessionsExpired')).toBe(1);
    // The failed probe waits a minute, behind the others due by then, instead of heading every
    // run; the session stays attached.
    const failed = await stack.server.smQueue.get(failing.smId);
    expect(failed?.connectionId).toBe(failingConnection);
    expect(failed?.sweepAt).toBe(clock + PROBE_RETRY_MS);
    expect(await runSweep(stack.server, clock)).toEqual({ swept: 0, failed: 0, cutShort: false });

    // A minute later, API Gateway answering again, it is probed.
    expect(await runSweep(stack.server, clock + PROBE_RETRY_MS)).toEqual({
      swept: 0,
      failed: 0,
      cutShort: false,
    });
    expect((await failing.client.until((el) => el.name === 'r')).attrs.xmlns).toBe(SM3);
  });
});

describe('the time budget', () => {
  it('starts nothing with too little of the invocation left, and fails nothing for it', async () => {
    // A detached session due for expiry by the runs' clock (its 300 s window closed).
    const late = await resumable('late');
    late.client.terminate();
    await eventually(async () => {
      const item = await stack.server.smQueue.get(late.smId);
      expect(item?.connectionId).toBeUndefined();
      expect(item?.sweepAt).toBeGreaterThan(0);
    });
    const now = () => Date.now() + 2 * PROBE_AFTER_MS;
    const timedSamples: MetricSample[] = [];
    const timed = createSweeperHandler(stack.server, {
      now,
      publishMetrics: (drained) => timedSamples.push(...drained),
    });
    expect(await timed({ getRemainingTimeInMillis: () => 5_000 })).toEqual({ swept: 0 });
    expect(timedSamples.filter((s) => s.name === 'SweepsCutShort')).toEqual([
      { name: 'SweepsCutShort', value: 1 },
    ]);
    // Nothing started: the due session is still there.
    expect((await stack.server.smQueue.get(late.smId))?.ended).toBeFalsy();
    // With time, the same run does its work, and is not cut short.
    const samples: MetricSample[] = [];
    const handler = createSweeperHandler(stack.server, {
      now,
      publishMetrics: (drained) => samples.push(...drained),
    });
    await expect(handler({ getRemainingTimeInMillis: () => 45_000 })).resolves.toEqual({ swept: 1 });
    expect(samples.filter((s) => s.name === 'SweepsCutShort')).toEqual([]);
    expect((await stack.server.smQueue.get(late.smId))?.ended).toBe(true);
  });

  it('hands its phases the invocation’s time left, which a delivery outside any frame stops by', async () => {
    // XEP-0198's posts in order stop before `frameTimeLeft()` runs out; the sweeper's deliveries
    // are no frame's, so the handler passes Lambda's remaining time down (test/integration/
    // resume-races.test.ts has the poster that stops by it).
    const seen: (number | undefined)[] = [];
    stack.server.host.hook('sweep', async () => {
      seen.push(frameTimeLeft());
      return undefined;
    });
    let remaining = 45_000;
    const handler = createSweeperHandler(stack.server, { publishMetrics: () => {} });
    await handler({ getRemainingTimeInMillis: () => remaining-- });
    expect(seen).toHaveLength(1);
    expect(seen[0]).toBeGreaterThan(44_000);
    expect(seen[0]).toBeLessThan(45_000);
    // Outside the handler's run, no deadline is left behind.
    expect(frameTimeLeft()).toBeUndefined();
  });
});
