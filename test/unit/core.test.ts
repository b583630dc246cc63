/**
 * The core without DynamoDB: the host's events and registries, and the one delivery path
 * through the recording outbound port (size check, stream-management hand-over, 410 Gone).
 */
import { Element, parse } from 'ltx';
import { describe, expect, it } from 'vitest';
import { loadConfig } from '../../shared/config.ts';
import { deliver, deliverToMany, POST_LIMIT_BYTES, post } from '../../shared/core/delivery.ts';
import { type DeliveryResult, HANDLED, Host, type Server, type SweepRun } from '../../shared/core/host.ts';
import { runSweep } from '../../shared/core/lifecycle.ts';
import { RateLimiter } from '../../shared/core/rate-limit.ts';
import { messageTargets } from '../../shared/core/router.ts';
import { StanzaError } from '../../shared/errors.ts';
import { createLogger } from '../../shared/log.ts';
import { MetricsRecorder } from '../../shared/metrics.ts';
import { sweepEach } from '../../shared/modules/xep-0198-stream-management.ts';
import { Outbound, RecordingPort } from '../../shared/outbound.ts';
import type { RateBucket, ResourceRecord } from '../../shared/store/sessions.ts';

function coreOnly(port = new RecordingPort()): { server: Server; port: RecordingPort } {
  const server = {
    config: loadConfig({}),
    host: new Host(),
    outbound: new Outbound(port),
    log: createLogger('silent'),
    metrics: new MetricsRecorder(),
  } as unknown as Server;
  return { server, port };
}

describe('Host events', () => {
  it('runs hooks from the highest priority down, equal priorities in registration order', async () => {
    const host = new Host();
    const order: string[] = [];
    host.hook('sweep', () => void order.push('default'));
    host.hook('sweep', () => void order.push('low'), { priority: -5 });
    host.hook('sweep', () => void order.push('high'), { priority: 10 });
    host.hook('sweep', () => void order.push('default, second'));
    expect(await host.fire('sweep', { now: 0, swept: 0 } as SweepRun)).toBe(false);
    expect(order).toEqual(['high', 'default', 'default, second', 'low']);
  });

  it('stops at a hook that returns HANDLED and reports it', async () => {
    const host = new Host();
    const seen: string[] = [];
    host.hook(
      'message/bare',
      () => {
        seen.push('archive');
        return undefined;
      },
      { priority: 10 },
    );
    host.hook('message/bare', () => {
      seen.push('takeover');
      return HANDLED;
    });
    host.hook('message/bare', () => void seen.push('never'), { priority: -1 });
    const handled = await host.fire('message/bare', {} as never);
    expect(handled).toBe(true);
    expect(seen).toEqual(['archive', 'takeover']);
  });

  it('fireEach runs every hook whatever the others did: a throw goes to onError, HANDLED stops nothing', async () => {
    const host = new Host();
    const seen: string[] = [];
    const errors: unknown[] = [];
    host.hook('sweep', () => {
      seen.push('first');
      throw new Error('first failed');
    });
    host.hook('sweep', () => {
      seen.push('second');
      return HANDLED;
    });
    host.hook('sweep', () => void seen.push('third'), { priority: -1 });
    await host.fireEach('sweep', { now: 0, swept: 0 } as SweepRun, (error) => errors.push(error));
    expect(seen).toEqual(['first', 'second', 'third']);
    expect(errors.map((error) => (error as Error).message)).toEqual(['first failed']);
  });

  it('refuses two handlers for the same iq and finds handlers by target, type, namespace and element', () => {
    const host = new Host();
    const handler = async () => undefined;
    host.iq('get', 'urn:xmpp:ping', 'ping', handler, { targets: ['server'] });
    expect(() => host.iq('get', 'urn:xmpp:ping', 'ping', handler)).toThrow(/two handlers/);
    const ping = new Element('ping', { xmlns: 'urn:xmpp:ping' });
    expect(host.iqHandler('server', 'get', ping)).toBe(handler);
    expect(host.iqHandler('account', 'get', ping)).toBeUndefined();
    expect(host.iqHandler('server', 'set', ping)).toBeUndefined();
  });
});

describe('the sweep (runSweep)', () => {
  /** Phases as the modules register them: expiry first, the probes last. */
  function phases(server: Server, order: string[], probe: () => Promise<void>) {
    server.host.hook(
      'sweep',
      (run) =>
        run.phase('probe', async () => {
          order.push('probe');
          await probe();
        }),
      { priority: -10 },
    );
    server.host.hook(
      'sweep',
      (run) =>
        run.phase('expire', async () => {
          order.push('expire');
          run.swept += 2;
        }),
      { priority: 30 },
    );
    server.host.hook('sweep', (run) => run.phase('archive-expiry', async () => void order.push('archive')), {
      priority: 10,
    });
  }

  it('runs every phase in priority order, and a failing one is logged and counted, not the end of the run', async () => {
    const { server } = coreOnly();
    const order: string[] = [];
    phases(server, order, async () => {
      throw Object.assign(new Error('Internal server error'), { $metadata: { httpStatusCode: 500 } });
    });
    // A hook that throws outside a phase is isolated too.
    server.host.hook('sweep', () => {
      throw new Error('not in a phase');
    });
    server.host.hook('sweep', (run) => run.phase('after', async () => void order.push('after')), {
      priority: -20,
    });
    expect(await runSweep(server, Date.now())).toEqual({ swept: 2, failed: 2, cutShort: false });
    expect(order).toEqual(['expire', 'archive', 'probe', 'after']);
    expect(server.metrics.drain()).toEqual(
      expect.arrayContaining([
        { name: 'SweepFailures', value: 1, dimension: { name: 'phase', value: 'probe' } },
        { name: 'SweepFailures', value: 1, dimension: { name: 'phase', value: 'hook' } },
      ]),
    );
  });

  it('starts no phase once the time is short, and says so', async () => {
    const { server } = coreOnly();
    const order: string[] = [];
    let left = 2;
    phases(server, order, async () => undefined);
    const outcome = await runSweep(server, Date.now(), { hasTime: () => left-- > 0 });
    expect(outcome).toEqual({ swept: 2, failed: 0, cutShort: true });
    expect(order).toEqual(['expire', 'archive']);
    expect(server.metrics.drain()).toEqual([{ name: 'SweepsCutShort', value: 1 }]);
  });
});

describe('the delivery path', () => {
  const resource = (connectionId: string, extra: Partial<ResourceRecord> = {}): ResourceRecord => ({
    user: 'bob@localhost',
    resource: 'phone',
    connectionId,
    available: true,
    priority: 0,
    boundAt: 0,
    ...extra,
  });

  it('posts a stanza with the content namespace (RFC 7395 §3.3.3)', async () => {
    const { server, port } = coreOnly();
    expect(
      await deliver(server, resource('c1'), parse("<message to='bob@localhost'><body>hi</body></message>")),
    ).toBe('sent');
    expect(port.frames.get('c1')).toEqual([
      '<message to="bob@localhost" xmlns="jabber:client"><body>hi</body></message>',
    ]);
  });

  it('refuses with policy-violation what escaping grows past the 128 KB post limit, posting nothing', async () => {
    const { server, port } = coreOnly();
    // XEP-0478 §3: "If, after serialization, a stanza exceeds the limits [...] it SHOULD NOT be sent".
    const stanza = new Element('message', { to: 'bob@localhost', id: "'".repeat(30 * 1024) });
    expect(Buffer.byteLength(stanza.toString())).toBeGreaterThan(POST_LIMIT_BYTES);
    const refused = await deliver(server, resource('c1'), stanza).catch((error) => error);
    expect(refused).toBeInstanceOf(StanzaError);
    expect(refused).toMatchObject({ type: 'modify', condition: 'policy-violation' });
    expect(port.frames.size).toBe(0);
    await expect(post(server, 'c1', stanza)).rejects.toMatchObject({ condition: 'policy-violation' });
  });

  it('hands a stanza for a stream-management session to the stanza queue, never posting it itself', async () => {
    const { server, port } = coreOnly();
    const queued: { smId: string; xml: string; options: object }[] = [];
    server.host.provideStanzaQueue({
      async deliver(smId, stanza, options) {
        queued.push({ smId, xml: stanza.toString(), options });
        return 'sent';
      },
      async queuedBefore() {
        return false;
      },
      async requestAck() {
        return undefined;
      },
      async attached() {
        return new Set<string>();
      },
      queuedStored() {},
      deliverTogether: (_stream, send) => send(undefined),
      async deliverMany(smId, items) {
        const results: DeliveryResult[] = [];
        for (const { stanza, options } of items) results.push(await this.deliver(smId, stanza, options));
        return results;
      },
    });
    const stanza = parse("<message to='bob@localhost'><body>queued</body></message>");
    expect(await deliver(server, resource('c1', { smId: 'sm-1' }), stanza, { offlineId: 'o1' })).toBe('sent');
    expect(queued).toEqual([{ smId: 'sm-1', xml: stanza.toString(), options: { offlineId: 'o1' } }]);
    expect(port.frames.size).toBe(0);
  });

  it('on 410 Gone tells the lifecycle (connection-vanished, with the resource) and reports gone', async () => {
    const { server, port } = coreOnly();
    port.gone.add('c-gone');
    const vanished: unknown[] = [];
    server.host.hook('connection-vanished', (event) => void vanished.push(event));
    const target = resource('c-gone');
    expect(await deliver(server, target, new Element('presence'))).toBe('gone');
    expect(vanished).toEqual([{ connectionId: 'c-gone', resource: target }]);
    expect(server.outbound.counters.gone).toBe(1);
  });
});

describe('routing choice (RFC 6121 §8.5.2.1.1)', () => {
  const r = (name: string, available: boolean, priority: number) =>
    ({
      user: 'bob@localhost',
      resource: name,
      connectionId: name,
      available,
      priority,
      boundAt: 0,
    }) as ResourceRecord;
  const resources = [r('a', true, 5), r('b', true, 5), r('c', true, 1), r('d', true, -1), r('e', false, 9)];

  it('sends chat and normal to the available resources of highest non-negative priority', () => {
    expect(messageTargets('chat', resources).map((t) => t.resource)).toEqual(['a', 'b']);
    expect(messageTargets('normal', resources).map((t) => t.resource)).toEqual(['a', 'b']);
  });

  it('sends headline to every available resource of non-negative priority', () => {
    expect(messageTargets('headline', resources).map((t) => t.resource)).toEqual(['a', 'b', 'c']);
  });

  it('finds no target when only negative priorities or unavailable resources remain', () => {
    // RFC 6121 §8.5.2.1.1: a resource with negative priority never gets a message to the bare JID.
    expect(messageTargets('chat', [r('d', true, -1), r('e', false, 9)])).toEqual([]);
  });
});

describe('per-connection rate limits (token buckets)', () => {
  const limits = { framesPerSecond: 10, frameBurst: 20, bytesPerSecond: 1000, byteBurst: 4000 };

  it('lets a burst through, then refuses until the bucket refills at the steady rate', () => {
    const limiter = new RateLimiter(limits);
    let stored: RateBucket | undefined;
    const send = (at: number, bytes = 10) => {
      const decision = limiter.admit('c1', stored, bytes, at);
      stored = decision.persist;
      return decision.allowed;
    };
    // Twenty frames at once: the burst.
    for (let i = 0; i < 20; i++) expect(send(1000)).toBe(true);
    expect(send(1000)).toBe(false);
    // A tenth of a second later, one frame's worth has come back.
    expect(send(1100)).toBe(true);
    expect(send(1100)).toBe(false);
  });

  it('counts bytes too: a few large frames exhaust the byte bucket before the frame bucket', () => {
    const limiter = new RateLimiter(limits);
    expect(limiter.admit('c2', undefined, 3000, 0).allowed).toBe(true);
    expect(limiter.admit('c2', undefined, 3000, 0).allowed).toBe(false);
  });

  it('keeps a calm connection out of DynamoDB and a stressed one in it, across instances', () => {
    const first = new RateLimiter(limits);
    // One frame now and then: more than half of both buckets left, nothing to write.
    expect(first.admit('c3', undefined, 10, 0).persist).toBeUndefined();
    expect(first.admit('c3', undefined, 10, 5000).persist).toBeUndefined();
    // A burst: below half of the frame bucket, so the bucket goes to the connection row...
    let persisted: RateBucket | undefined;
    for (let i = 0; i < 12; i++) persisted = first.admit('c3', persisted, 10, 6000).persist;
    expect(persisted?.frames).toBeLessThan(10);
    // ...and another Lambda instance that knows nothing of c3 in memory goes on from it.
    const second = new RateLimiter(limits);
    let decision = second.admit('c3', persisted, 10, 6000);
    for (let i = 0; i < 7; i++) decision = second.admit('c3', decision.persist, 10, 6000);
    expect(decision.allowed).toBe(true);
    expect(second.admit('c3', decision.persist, 10, 6000).allowed).toBe(false);
  });

  it('judges frames by their arrival at API Gateway, not by when a backlog is processed', () => {
    const limiter = new RateLimiter(limits);
    // Thirty frames that arrived over six seconds (5 per second) are within the rate, even if
    // processed in one go later.
    let stored: RateBucket | undefined;
    for (let i = 0; i < 30; i++) {
      const decision = limiter.admit('c4', stored, 10, i * 200);
      expect(decision.allowed).toBe(true);
      stored = decision.persist;
    }
  });
});

describe('deliverToMany (a fan-out: roster pushes, subscription presence)', () => {
  it('starts no further delivery after one fails, and throws only once the running ones have stopped', async () => {
    // A frame whose fan-out fails is tried again: its next attempt must not run beside
    // deliveries of this one still on their way (two holders of one stream-management hold).
    class SlowPort extends RecordingPort {
      override async post(connectionId: string, data: string, notAfter?: number) {
        if (connectionId === 'broken')
          throw Object.assign(new Error('throttled'), { name: 'ThrottlingException' });
        await new Promise((resolve) => setTimeout(resolve, connectionId === 'slow' ? 50 : 1));
        return super.post(connectionId, data, notAfter);
      }
    }
    const { server, port } = coreOnly(new SlowPort());
    const targets = ['slow', 'broken', 'later-1', 'later-2', 'later-3'].map((connectionId) => ({
      connectionId,
    }));
    const failing = deliverToMany(server, targets, () => new Element('message').c('body').t('x').root(), 2);
    await expect(failing).rejects.toThrow('throttled');
    // The slow delivery started before the failure finished before the error came out.
    expect(port.frames.has('slow')).toBe(true);
    // After the failure, no worker took another target.
    expect([...port.frames.keys()].filter((id) => id.startsWith('later'))).toEqual([]);
  });
});

describe('settings checked at start', () => {
  it('refuses SM_MAX_SECONDS=0: the seed sm:1 feature advertises it as max, an xs:positiveInteger', () => {
    // XEP-0198 seed schema: <xs:attribute name='max' type='xs:positiveInteger' use='optional'/>
    expect(() => loadConfig({ SM_MAX_SECONDS: '0' })).toThrow('SM_MAX_SECONDS must be at least 1');
    expect(loadConfig({ SM_MAX_SECONDS: '1' }).smMaxSeconds).toBe(1);
  });
});

describe('a sweep phase, item by item (sweepEach)', () => {
  type Item = { smId: string };
  function fakeRun() {
    const failures: string[] = [];
    const run: SweepRun = {
      now: 0,
      swept: 0,
      hasTime: () => true,
      phase: async () => undefined,
      failed: (_phase, _error, fields) => void failures.push(String(fields?.smId)),
    };
    return { run, failures };
  }
  /** Due items, oldest first; `stays` stay listed after their work (failed or not). */
  function queue(ids: string[], stays: (id: string) => boolean) {
    let due = ids.map((smId) => ({ smId }));
    const list = async (limit: number) => due.slice(0, limit) as never;
    const done = (id: string) => {
      if (!stays(id)) due = due.filter((item) => item.smId !== id);
    };
    return { list, done };
  }

  it('reaches the items behind ones that stay due at the head, each once', async () => {
    const ids = Array.from({ length: 12 }, (_, i) => `s${i}`);
    const stuck = new Set(['s0', 's1', 's2', 's3']);
    const { list, done } = queue(ids, (id) => stuck.has(id));
    const worked: string[] = [];
    const { run } = fakeRun();
    await sweepEach(
      run,
      'expire',
      list,
      async (item: Item) => {
        worked.push(item.smId);
        done(item.smId);
      },
      undefined,
      3,
    );
    expect(worked).toEqual(ids);
  });

  it('stops the phase after five failures in a row, and not after fewer', async () => {
    const ids = Array.from({ length: 20 }, (_, i) => `s${i}`);
    // s0..s3 fail, s4 works, then s5.. all fail.
    const failing = (id: string) => id !== 's4';
    const { list, done } = queue(ids, failing);
    const worked: string[] = [];
    const { run, failures } = fakeRun();
    await sweepEach(
      run,
      'probe',
      list,
      async (item: Item) => {
        worked.push(item.smId);
        if (failing(item.smId)) throw new Error('500');
        done(item.smId);
      },
      undefined,
      50,
    );
    expect(worked).toEqual(['s0', 's1', 's2', 's3', 's4', 's5', 's6', 's7', 's8', 's9']);
    expect(failures).toEqual(['s0', 's1', 's2', 's3', 's5', 's6', 's7', 's8', 's9']);
  });
});
