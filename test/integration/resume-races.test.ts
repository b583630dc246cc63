/**
 * XEP-0198 §5: "<resumed xmlns='urn:xmpp:sm:3' h='another-sequence-number' previd='some-long-sm-id'/>"
 * and "<failed xmlns='urn:xmpp:sm:3' h='another-sequence-number'>" tell the client how many of its
 * stanzas the server handled; it sends the rest again. A count lower than what the session's old
 * streams routed doubles messages, a higher one loses them. These races run against DynamoDB
 * Local, each at the call where AWS's throttling (an SDK retrying for seconds) lets another
 * invocation in; each test fails without its fix.
 */

import type { DynamoDBDocumentClient } from '@aws-sdk/lib-dynamodb';
import { Element } from 'ltx';
import { describe, expect, it } from 'vitest';
import { deliver } from '../../shared/core/delivery.ts';
import { inFrame, withTimeLeft } from '../../shared/core/frame.ts';
import { sweep } from '../../shared/core/lifecycle.ts';
import { handleStreamEvent } from '../../shared/core/stream.ts';
import { RetryLaterError } from '../../shared/core/transient.ts';
import { createLogger } from '../../shared/log.ts';
import { RecordingPort } from '../../shared/outbound.ts';
import { deriveCredentialSet } from '../../shared/sasl/scram.ts';
import { createServer, type Server } from '../../shared/server.ts';
import { AmbiguousWriteError, createDocumentClient } from '../../shared/store/dynamo.ts';
import { ResourceTakenError } from '../../shared/store/sessions.ts';
import { createTestConfig } from '../support/dynamodb.ts';
import { intercept } from '../support/intercept.ts';

/**
 * A session `smId` of a fresh user (resource `r`, created on connection 'first'), and a contact;
 * `doc`, a document client of the test's own (one that fails on cue).
 */
async function sessionOf(
  smId: string,
  env: Record<string, string> = {},
  port = new RecordingPort(),
  doc?: DynamoDBDocumentClient,
) {
  const server = createServer({
    config: await createTestConfig(env),
    port,
    log: createLogger('silent'),
    ...(doc ? { doc } : {}),
  });
  const stamp = `${Date.now()}${Math.floor(Math.random() * 1000)}`;
  const user = `kate${stamp}@localhost`;
  const contact = `rob${stamp}@localhost`;
  await server.users.create(user, await deriveCredentialSet('pw', 4096));
  await server.users.create(contact, await deriveCredentialSet('pw', 4096));
  await server.smQueue.create({
    smId,
    user,
    resource: 'r',
    version: 'sm3',
    resumable: true,
    max: 300,
    connectionId: 'first',
  });
  /** A connection row: a stream of `user`, bound with the session when `inbound` is given. */
  const stream = async (connectionId: string, inbound?: number) => {
    await server.sessions.createConnection(connectionId, Date.now());
    await server.sessions.updateConnection(connectionId, {
      streamOpen: true,
      user,
      ...(inbound === undefined
        ? {}
        : {
            resource: 'r',
            sm: { version: 'sm3', id: smId, inbound, acked: 0, resumable: true, max: 300 },
          }),
    });
  };
  const frame = (connectionId: string, xml: string, frameId: string, seq: string) =>
    handleStreamEvent(server, {
      connectionId,
      kind: 'frame',
      frame: xml,
      receivedAt: Date.now(),
      frameId,
      seq,
    });
  const resume = (connectionId: string, h = 0) =>
    frame(
      connectionId,
      `<resume xmlns='urn:xmpp:sm:3' previd='${smId}' h='${h}'/>`,
      `resume-${connectionId}`,
      '10',
    );
  const message = (connectionId: string, body: string) =>
    frame(
      connectionId,
      `<message xmlns='jabber:client' to='${contact}' type='chat'><body>${body}</body></message>`,
      `m-${connectionId}-${body}`,
      String(100 + Number(body)),
    );
  const sent = (connectionId: string) => (port.frames.get(connectionId) ?? []).join('');
  const storedFor = async (who: string) =>
    (await server.offline.list(who)).messages.map((m) => /<body>([^<]*)</.exec(m.stanza)?.[1]);
  return { port, server, user, contact, stream, frame, resume, message, sent, storedFor };
}

describe('a resume whose fence finds the old stream’s row already gone', () => {
  it('reports the count that stream’s $disconnect recorded, not the one read before it (fault suite, seed 10 of session 9)', async () => {
    const { server, user, stream, resume, sent } = await sessionOf('sm-gone-row');
    // An earlier resume on 'old' recorded h = 1; the stream then counted two more stanzas.
    expect(await server.smQueue.attach('sm-gone-row', user, 'old', 1)).toBeDefined();
    await server.smQueue.release('sm-gone-row', 0);
    await stream('old', 3);
    await stream('new');
    // The resume read the session (h = 1, attached to 'old'); its fence of 'old' is throttled, and
    // the SDK's retries outlast that stream's $disconnect, which fences, detaches (recording
    // h = 3) and deletes the row: the fence then finds no row.
    const fence = server.sessions.fenceConnection.bind(server.sessions);
    // Read inside the server's frame handler and checked after it: an assertion thrown there
    // would end up as the frame's internal-server-error, not as this test's failure.
    let whenFenced: { row: unknown; inbound: number | undefined } | undefined;
    const restore = intercept(server.sessions, 'fenceConnection', async (connectionId) => {
      if (connectionId === 'old') {
        restore();
        await server.host.fire('connection-vanished', { connectionId: 'old', disconnected: true });
        whenFenced = {
          row: await server.sessions.getConnection('old'),
          inbound: (await server.smQueue.get('sm-gone-row'))?.inbound,
        };
      }
      return fence(connectionId);
    });
    try {
      await resume('new');
    } finally {
      restore();
    }
    // The $disconnect had deleted the row and recorded h = 3 before the fence.
    expect(whenFenced).toEqual({ row: undefined, inbound: 3 });
    // h = 3, or the client sends two of them again.
    expect(sent('new')).toMatch(/<resumed [^>]*h=['"]3['"]/);
    expect((await server.smQueue.get('sm-gone-row'))?.inbound).toBe(3);
  });
});

describe('a <resume/> redelivered on a connection that a later resume fenced', () => {
  it('closes its own socket and leaves the session with the later resume, which keeps routing', async () => {
    const smId = 'sm-fenced-resumer';
    const { server, user, contact, stream, resume, message, sent, storedFor, port } = await sessionOf(smId);
    // R1 on n1 attached the session and failed before saving; the client resumed on n2 (R2
    // fenced n1 and took the session, h = 2).
    await stream('n1');
    await server.sessions.updateConnection('n1', { resuming: smId });
    expect(await server.smQueue.attach(smId, user, 'n2', 2)).toBeDefined();
    await server.smQueue.release(smId, 0);
    await stream('n2', 2);
    await server.sessions.fenceConnection('n1');
    // R1's redelivery on n1.
    await resume('n1');
    expect(sent('n1')).not.toContain('<resumed');
    expect(port.closed.has('n1')).toBe(true);
    expect((await server.sessions.getConnection('n2'))?.fenced).toBeUndefined();
    expect((await server.smQueue.get(smId))?.connectionId).toBe('n2');
    // The live stream still counts and routes what its client sends.
    await message('n2', '3');
    expect((await server.sessions.getConnection('n2'))?.sm?.inbound).toBe(3);
    expect(await storedFor(contact)).toEqual(['3']);
  });
});

describe('a <resume/> redelivered after it attached the session, its connection fenced meanwhile by another resume', () => {
  it('detaches the session (not ended by its socket’s $disconnect), so the other resume or the next one takes it (seed 2 of session 10’s third target run)', async () => {
    const smId = 'sm-attached-fenced';
    const { server, user, stream, resume, sent, port } = await sessionOf(smId);
    // R1 on x recorded what it takes over, attached the session (h = 4) and failed before saving;
    // R2, deciding from x as the owner, fenced x and has not attached yet.
    await stream('x');
    await server.sessions.updateConnection('x', { resuming: smId });
    expect(await server.smQueue.attach(smId, user, 'x', 4)).toBeDefined();
    await server.sessions.fenceConnection('x');
    // R1's redelivery.
    await resume('x');
    expect(sent('x')).not.toContain('<resumed');
    expect(port.closed.has('x')).toBe(true);
    const detached = await server.smQueue.get(smId);
    expect(detached).toMatchObject({ detachedFrom: 'x', inbound: 4 });
    expect(detached?.connectionId).toBeUndefined();
    expect(detached?.ended).toBeFalsy();
    // x's $disconnect does not end it: the client's next resume takes it, with h = 4.
    await server.host.fire('connection-vanished', { connectionId: 'x', disconnected: true });
    expect((await server.smQueue.get(smId))?.ended).toBeFalsy();
    await stream('n3');
    await resume('n3');
    expect(sent('n3')).toMatch(/<resumed [^>]*h=['"]4['"]/);
  });
});

describe('a resume fenced itself just after it fenced the session’s owner', () => {
  it('closes that owner’s socket, whose row now routes nothing, so its client resumes with the exact count', async () => {
    const smId = 'sm-both-fenced';
    const { server, user, stream, resume, sent, port } = await sessionOf(smId);
    // The session is on n2 (h = 2). A late <resume/> on n1 fences n2; just then another resume
    // (which had read the session on n1) fences n1.
    expect(await server.smQueue.attach(smId, user, 'n2', 2)).toBeDefined();
    await server.smQueue.release(smId, 0);
    await stream('n2', 2);
    await stream('n1');
    const fence = server.sessions.fenceConnection.bind(server.sessions);
    const restore = intercept(server.sessions, 'fenceConnection', async (connectionId) => {
      if (connectionId === 'n2') {
        restore();
        await fence('n1');
      }
      return fence(connectionId);
    });
    try {
      await resume('n1');
    } finally {
      restore();
    }
    expect(sent('n1')).not.toContain('<resumed');
    // n2 routes nothing now: its socket is closed, and the client's next resume gets h = 2.
    expect((await server.sessions.getConnection('n2'))?.fenced).toBe(true);
    expect(port.closed.has('n2')).toBe(true);
    await stream('n3');
    await resume('n3');
    expect(sent('n3')).toMatch(/<resumed [^>]*h=['"]2['"]/);
    expect((await server.smQueue.get(smId))?.connectionId).toBe('n3');
  });
});

describe('a resume refused because the resource was bound again meanwhile', () => {
  it('reports in <failed h/> the count it took from the fenced old stream, not the one read before', async () => {
    const smId = 'sm-rebind-taken';
    const { server, user, stream, resume, sent } = await sessionOf(smId);
    expect(await server.smQueue.attach(smId, user, 'old', 1)).toBeDefined();
    await server.smQueue.release(smId, 0);
    await stream('old', 3);
    await stream('new');
    const restore = intercept(server.sessions, 'rebindResumed', async () => {
      throw new ResourceTakenError(user, 'r');
    });
    try {
      await resume('new');
    } finally {
      restore();
    }
    expect(sent('new')).toMatch(/<failed [^>]*h=['"]3['"]/);
    expect(sent('new')).toContain('item-not-found');
  });
});

describe('a session ended because its queue overflowed', () => {
  it('ends with a count that holds every stanza its stream routed: the stream is fenced before the count is read', async () => {
    const smId = 'sm-overflow';
    const { server, user, contact, stream, message, storedFor } = await sessionOf(smId, {
      SM_QUEUE_MAX: '1',
      SM_ACK_TIMEOUT_SECONDS: '0',
    });
    await server.smQueue.release(smId, 0);
    await stream('first', 3);
    const toUser = () =>
      new Element('message', { to: `${user}/r`, from: contact, type: 'chat' }).c('body').t('x').root();
    expect(await deliver(server, { connectionId: 'first', smId }, toUser())).toBe('sent');
    // The overflow's end is slow; meanwhile a frame of 'first' queued before the kick comes up.
    const end = server.smQueue.end.bind(server.smQueue);
    const restore = intercept(server.smQueue, 'end', async (id, owner, inbound) => {
      restore();
      await message('first', '4');
      return end(id, owner, inbound);
    });
    try {
      expect(await deliver(server, { connectionId: 'first', smId }, toUser())).toBe('gone');
    } finally {
      restore();
    }
    const ended = await server.smQueue.get(smId);
    expect(ended?.ended).toBe(true);
    // Routed and counted, or neither: never routed outside the count a resume is told.
    const routed = (await storedFor(contact)).length;
    expect(ended?.inbound).toBe(3 + routed);
  });
});

describe('an expiry whose end is slow', () => {
  it('never records a count below the one a resume and a new detach recorded meanwhile', async () => {
    const smId = 'sm-slow-expiry';
    const { server, user } = await sessionOf(smId);
    await server.smQueue.detach(smId, 'first', 3, Date.now() - 1000, []);
    const end = server.smQueue.end.bind(server.smQueue);
    // Recorded inside the sweep and checked after it: the sweep logs and counts an item's error
    // (an assertion's too) and goes on.
    let meanwhile: { attached: boolean; detached: boolean | 'too-large' } | undefined;
    const restore = intercept(server.smQueue, 'end', async (id, owner, inbound) => {
      restore();
      // A resume decided before the window closed attaches; its stream counts two more and goes.
      const attached = (await server.smQueue.attach(smId, user, 'n', 3, null)) !== undefined;
      const detached = await server.smQueue.detach(smId, 'n', 5, Date.now() + 300_000, []);
      meanwhile = { attached, detached };
      return end(id, owner, inbound);
    });
    try {
      await sweep(server, Date.now());
    } finally {
      restore();
    }
    expect(meanwhile).toEqual({ attached: true, detached: true });
    const item = await server.smQueue.get(smId);
    // Ended or not, the count a later resume is told is 5.
    expect(item?.inbound).toBe(5);
  });
});

/**
 * A port whose posts of a stanza containing `held` (to `only`, when given) wait until
 * `release()`; `reached` once one does.
 */
class HoldingPort extends RecordingPort {
  private gate: Promise<void>;
  release: () => void = () => {};
  reached: Promise<void>;
  private arrived: () => void = () => {};
  constructor(
    private readonly held: string,
    private readonly only?: string,
  ) {
    super();
    this.gate = new Promise((resolve) => {
      this.release = resolve;
    });
    this.reached = new Promise((resolve) => {
      this.arrived = resolve;
    });
  }
  override async post(connectionId: string, data: string, notAfter?: number) {
    if (data.includes(this.held) && (this.only === undefined || connectionId === this.only)) {
      this.arrived();
      await this.gate;
    }
    return super.post(connectionId, data, notAfter);
  }
}

/**
 * The session `smId` attached to 'live' (SM_LATE_POST_MS 50): 'first' is queued as number 1 and
 * its post held (until `port.release()`), then 'second' is queued as number 2 and posted. The
 * stanzas `before` are delivered ahead of 'first' (numbered from 1; 'first' and 'second' after).
 */
async function crossingPosts(
  smId: string,
  env: Record<string, string> = { SM_LATE_POST_MS: '50' },
  before: string[] = [],
) {
  const port = new HoldingPort('first');
  // Crossing posts exist only when each sender posts its own (see 'posts in order' below).
  const session = await sessionOf(smId, { SM_POST_ORDER: 'checked', ...env }, port);
  const { server, user, contact, stream } = session;
  expect(await server.smQueue.attach(smId, user, 'live', 0)).toBeDefined();
  await server.smQueue.release(smId, 0);
  await stream('live', 0);
  const chat = (body: string) =>
    new Element('message', { to: `${user}/r`, from: contact, type: 'chat' }).c('body').t(body).root();
  for (const body of before)
    expect(await deliver(server, { connectionId: 'live', smId }, chat(body))).toBe('sent');
  const first = deliver(server, { connectionId: 'live', smId }, chat('first'));
  // Its post has begun, so its append (number 1) is done.
  await port.reached;
  expect(await deliver(server, { connectionId: 'live', smId }, chat('second'))).toBe('sent');
  const queuedBodies = async () =>
    (await server.smQueue.get(smId))?.entries.map((e) => /<body>([^<]*)</.exec(e.s ?? '')?.[1]);
  /** Lets 'first' land, past SM_LATE_POST_MS (50), after 'second' did. */
  const landLate = async () => {
    await new Promise((resolve) => setTimeout(resolve, 80));
    port.release();
    expect(await first).toBe('sent');
  };
  return { ...session, port, first, queuedBodies, landLate };
}

describe('a queued stanza whose post lands after a later one’s (seed 9 of session 10’s first target run)', () => {
  it('is marked uncertain, so a resume whose count covers the later one sends it again', async () => {
    const smId = 'sm-late-post';
    // 'first' is queued as number 1, but its post is slow; 'second' (number 2) goes out before it.
    const { server, stream, resume, sent, landLate } = await crossingPosts(smId);
    await landLate();
    expect((await server.smQueue.get(smId))?.entries.map((e) => e.u)).toEqual([true, undefined]);
    // The socket died between the two: the client has 'second' only, and counts 1. Taken as a
    // prefix, that 1 would acknowledge 'first'.
    await stream('new');
    await resume('new', 1);
    expect(sent('new')).toMatch(/<resumed [^>]*h=/);
    expect(sent('new')).toContain('<body>first</body>');
  });

  it('is marked however fast both posts were, with the default setting (seed 17 of session 11’s second target run)', async () => {
    const smId = 'sm-fast-crossing';
    // SM_LATE_POST_MS as deployed: 'first' lands right after 'second', both within milliseconds.
    const { server, stream, resume, sent, port, first } = await crossingPosts(smId, {});
    port.release();
    expect(await first).toBe('sent');
    expect((await server.smQueue.get(smId))?.entries.map((e) => [e.u, e.b])).toEqual([
      [true, 2],
      [undefined, undefined],
    ]);
    // The socket died between the two: the client has 'second' only, and counts 1.
    await stream('fast');
    await resume('fast', 1);
    expect(sent('fast')).toMatch(/<resumed [^>]*h=/);
    expect(sent('fast')).toContain('<body>first</body>');
  });

  it('leaves the certain entries a resume’s count reaches acknowledged, however many later ones are uncertain (seed 11 of session 11’s third target run)', async () => {
    const smId = 'sm-ordered-count';
    const { server, user, contact, stream, resume, sent } = await sessionOf(smId);
    expect(await server.smQueue.attach(smId, user, 'ordered', 0)).toBeDefined();
    await server.smQueue.release(smId, 0);
    await stream('ordered', 0);
    const chat = (body: string) =>
      new Element('message', { to: `${user}/r`, from: contact, type: 'chat' }).c('body').t(body).root();
    for (const body of ['one', 'two', 'three'])
      expect(await deliver(server, { connectionId: 'ordered', smId }, chat(body))).toBe('sent');
    // 'three''s post went unanswered, then 'four' was queued: 'three' is uncertain.
    const three = (await server.smQueue.get(smId))?.entries[2]?.k as string;
    expect(await deliver(server, { connectionId: 'ordered', smId }, chat('four'))).toBe('sent');
    expect(await server.smQueue.markUncertain(smId, three, true, 'ordered')).toBe(true);
    // The socket died after 'one' and 'two': each was checked after its answer and had nothing
    // queued behind it, so nothing later reached the client first. A count of 2 is those two.
    await stream('ordered-new');
    await resume('ordered-new', 2);
    expect(sent('ordered-new')).toMatch(/<resumed [^>]*h=/);
    expect(sent('ordered-new')).not.toContain('<body>two</body>');
    expect(sent('ordered-new')).toContain('<body>three</body>');
    expect(sent('ordered-new')).toContain('<body>four</body>');
  });

  it('is not sent again by a resume whose count reaches every entry queued before it landed (seed 16 of session 11’s target run)', async () => {
    const smId = 'sm-late-vouched';
    const { server, user, contact, stream, resume, sent, landLate } = await crossingPosts(smId);
    await landLate();
    // Marked when 'second' (number 2) was the last queued: nothing numbered above 2 can have
    // reached the client before it.
    const marked = await server.smQueue.get(smId);
    expect(marked?.entries.map((e) => [e.u, e.b])).toEqual([
      [true, 2],
      [undefined, undefined],
    ]);
    const third = new Element('message', { to: `${user}/r`, from: contact, type: 'chat' })
      .c('body')
      .t('third');
    expect(await deliver(server, { connectionId: 'live', smId }, third.root())).toBe('sent');
    // The socket died after 'first' and 'second' landed, before 'third': the client counts 2.
    // Whichever order the two landed in, it has both; only 'third' is sent again (before the
    // bound, the uncertain 'first' went again too, and the client had it twice).
    await stream('vouched');
    await resume('vouched', 2);
    expect(sent('vouched')).toMatch(/<resumed [^>]*h=/);
    expect(sent('vouched')).toContain('<body>third</body>');
    expect(sent('vouched')).not.toContain('<body>first</body>');
    expect(sent('vouched')).not.toContain('<body>second</body>');
  });

  it('is settled by an ack whose count reaches its bound, without making the client resume', async () => {
    const smId = 'sm-late-ack-vouched';
    const { server, frame, port, landLate } = await crossingPosts(smId);
    await landLate();
    expect((await server.smQueue.get(smId))?.uncertain).toBe(true);
    // The client has both, in whichever order they landed: h = 2 reaches the bound (2).
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='2'/>", 'ack-2', '20');
    const item = await server.smQueue.get(smId);
    expect([item?.base, item?.entries.length, Boolean(item?.uncertain)]).toEqual([2, 0, false]);
    expect(port.closed.has('live')).toBe(false);
  });

  it('makes an ack that reaches its bound close the socket all the same when another entry’s post went unanswered', async () => {
    const smId = 'sm-late-ack-mixed';
    const { server, frame, port, landLate } = await crossingPosts(smId);
    await landLate();
    // 'second' (number 2): its post went unanswered, it may land at any time (no bound).
    const second = (await server.smQueue.get(smId))?.entries[1]?.k as string;
    expect(await server.smQueue.markUncertain(smId, second, true, 'live')).toBe(true);
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='2'/>", 'ack-2', '20');
    expect(port.closed.has('live')).toBe(true);
    expect((await server.smQueue.get(smId))?.base).toBe(0);
  });

  it('makes an ack below its bound ask the client again once, and a second one close the socket', async () => {
    const smId = 'sm-late-ack-short';
    const { server, frame, port, sent, landLate } = await crossingPosts(smId);
    await landLate();
    const asks = () => sent('live').match(/<r xmlns=["']urn:xmpp:sm:3["']\/>/g)?.length ?? 0;
    const before = asks();
    // h = 1: the client has one of the two, and which one nobody can tell yet (the other post
    // may still be on its way). Nothing is acknowledged; the client is asked for its count again.
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='1'/>", 'ack-1', '20');
    expect(port.closed.has('live')).toBe(false);
    expect(asks()).toBe(before + 1);
    const item = await server.smQueue.get(smId);
    expect([item?.base, item?.entries.length, Boolean(item?.uncertain)]).toEqual([0, 2, true]);
    // Its answer falls short of the same bound again: only a resume can tell now.
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='1'/>", 'ack-1-again', '21');
    expect(port.closed.has('live')).toBe(true);
    expect((await server.smQueue.get(smId))?.base).toBe(0);
  });

  it('with every post checked, trims what an ack below its bound vouches for and waits for the next, the socket kept', async () => {
    const smId = 'sm-late-ack-partial';
    const { server, frame, port, sent, landLate, queuedBodies } = await crossingPosts(
      smId,
      { SM_LATE_POST_MS: '0' },
      ['zero'],
    );
    await landLate();
    // 'zero' (1) certain, 'first' (2) landed after 'second' (3) was queued: bound 3.
    expect((await server.smQueue.get(smId))?.entries.map((e) => [e.u, e.b])).toEqual([
      [undefined, undefined],
      [true, 3],
      [undefined, undefined],
    ]);
    const asks = () => sent('live').match(/<r xmlns=["']urn:xmpp:sm:3["']\/>/g)?.length ?? 0;
    const before = asks();
    // h = 2: 'zero' reached the client before every later entry, so the count covers it; of
    // 'first' and 'second' it has one, which nobody can tell yet. 'zero' goes, the client is asked.
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='2'/>", 'ack-2', '20');
    expect(asks()).toBe(before + 1);
    let item = await server.smQueue.get(smId);
    expect([item?.base, Boolean(item?.uncertain)]).toEqual([1, true]);
    expect(await queuedBodies()).toEqual(['first', 'second']);
    // Its answer is short of the bound again (the other post still on its way, say): the socket
    // stays, nothing more is trimmed, and no resume sends 'first' again to a client that has it.
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='2'/>", 'ack-2-again', '21');
    expect(port.closed.has('live')).toBe(false);
    expect(asks()).toBe(before + 1);
    expect((await server.smQueue.get(smId))?.base).toBe(1);
    // The next count reaches the bound: everything is settled as a plain ack.
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='3'/>", 'ack-3', '22');
    item = await server.smQueue.get(smId);
    expect([item?.base, item?.entries.length, Boolean(item?.uncertain)]).toEqual([3, 0, false]);
    expect(port.closed.has('live')).toBe(false);
  });

  it('makes an ack below its bound ask again, and the answer that reaches the bound settles it', async () => {
    const smId = 'sm-late-ack-asked';
    const { server, frame, port, landLate } = await crossingPosts(smId);
    await landLate();
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='1'/>", 'ack-1', '20');
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='2'/>", 'ack-2', '21');
    const item = await server.smQueue.get(smId);
    expect([item?.base, item?.entries.length, Boolean(item?.uncertain)]).toEqual([2, 0, false]);
    expect(port.closed.has('live')).toBe(false);
  });

  it('is queued again when an ack counted past it while its post was on the way (too late to mark)', async () => {
    const smId = 'sm-late-acked';
    const { server, frame, port, first, queuedBodies } = await crossingPosts(smId);
    // The client has 'second' only and says so: h = 1, which the ack takes as a prefix.
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='1'/>", 'ack-1', '20');
    expect((await server.smQueue.get(smId))?.base).toBe(1);
    await new Promise((resolve) => setTimeout(resolve, 60));
    port.release();
    expect(await first).toBe('sent');
    // Queued again as number 3: a later ack or resume counts it like any other.
    expect((await server.smQueue.get(smId))?.out).toBe(3);
    expect(await queuedBodies()).toEqual(['second', 'first']);
  });

  it('is not queued again when the acks counted every entry queued by then', async () => {
    const smId = 'sm-late-all-acked';
    const { server, frame, port, first, queuedBodies } = await crossingPosts(smId);
    // The client has both (the answer to 'first' is what is slow) and says so: h = 2. A count
    // can only reach what reached the client, so it has 'first' wherever it landed.
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='2'/>", 'ack-2', '20');
    expect((await server.smQueue.get(smId))?.base).toBe(2);
    await new Promise((resolve) => setTimeout(resolve, 60));
    port.release();
    expect(await first).toBe('sent');
    const item = await server.smQueue.get(smId);
    expect([item?.out, item?.base]).toEqual([2, 2]);
    expect(await queuedBodies()).toEqual([]);
  });

  it('is sent again when a resume counted past it while its post was on the way', async () => {
    const smId = 'sm-late-resumed';
    const { stream, resume, sent, port, first, queuedBodies } = await crossingPosts(smId);
    // The socket died with 'second' delivered; the client resumes at once with h = 1.
    await stream('new');
    await resume('new', 1);
    expect(sent('new')).toMatch(/<resumed [^>]*h=/);
    // Landing past SM_LATE_POST_MS (50 here). A resume done within it (DynamoDB Local answers in
    // milliseconds) would leave a post under the bound: the crossing this design cannot see.
    await new Promise((resolve) => setTimeout(resolve, 60));
    port.release();
    expect(await first).toBe('sent');
    // Queued again on the resumed session (posted to it, or replayed once it stops holding).
    expect(await queuedBodies()).toContain('first');
  });

  it('is not marked when nothing was queued after it (the count stays a prefix)', async () => {
    const smId = 'sm-late-alone';
    const port = new HoldingPort('alone');
    const { server, user, contact, stream } = await sessionOf(smId, { SM_LATE_POST_MS: '50' }, port);
    expect(await server.smQueue.attach(smId, user, 'live', 0)).toBeDefined();
    await server.smQueue.release(smId, 0);
    await stream('live', 0);
    const pending = deliver(
      server,
      { connectionId: 'live', smId },
      new Element('message', { to: `${user}/r`, from: contact, type: 'chat' }).c('body').t('alone').root(),
    );
    await new Promise((resolve) => setTimeout(resolve, 80));
    port.release();
    expect(await pending).toBe('sent');
    const item = await server.smQueue.get(smId);
    expect(item?.entries.map((e) => e.u)).toEqual([undefined]);
    expect(item?.uncertain).toBeFalsy();
  });
});

describe('an append whose answer was lost while a resume replayed it (seed 10 of session 11’s final target run)', () => {
  it('is not posted a second time: the client counts it once and its ack is taken', async () => {
    const config = await createTestConfig({});
    const doc = createDocumentClient({ region: config.region, endpoint: config.dynamodbEndpoint });
    const send = doc.send.bind(doc) as (command: unknown, ...rest: unknown[]) => Promise<unknown>;
    let resumed: () => void = () => {};
    const resumeDone = new Promise<void>((resolve) => {
      resumed = resolve;
    });
    let armed = true;
    // The first append is written, then its answer is lost (DynamoDB ran it and answered 500;
    // sendOnce turns the SDK's resend into AmbiguousWriteError) after the resume below.
    (doc as unknown as { send: typeof send }).send = async (command, ...rest) => {
      const answer = await send(command, ...rest);
      const update = (command as { input?: { UpdateExpression?: string } }).input?.UpdateExpression ?? '';
      if (armed && update.includes('list_append')) {
        armed = false;
        await resumeDone;
        throw new AmbiguousWriteError('UpdateItem');
      }
      return answer;
    };
    const port = new RecordingPort();
    const smId = 'sm-lost-append-answer';
    const { server, user, contact, stream, frame, resume } = await sessionOf(smId, {}, port, doc);
    await server.smQueue.release(smId, 0);
    await stream('first', 0);
    await stream('new');
    const chat = new Element('message', { to: `${user}/r`, from: contact, type: 'chat' })
      .c('body')
      .t('E')
      .root();
    // Queued while the session is on 'first'; the answer is on its way back.
    const delivery = deliver(server, { connectionId: 'first', smId }, chat);
    await new Promise((resolve) => setTimeout(resolve, 100));
    // The client lost 'first' before E reached it and resumes on 'new' with h = 0: the replay sends E.
    await resume('new', 0);
    resumed();
    expect(await delivery).toBe('sent');
    const onNew = (port.frames.get('new') ?? []).join('');
    expect(onNew.match(/<body>E<\/body>/g)?.length).toBe(1);
    // The client counted one stanza and says so; XEP-0198 §4: "h ... the last handled stanza".
    await frame('new', "<a xmlns='urn:xmpp:sm:3' h='1'/>", 'a-new', '11');
    const after = (port.frames.get('new') ?? []).join('');
    expect(after).not.toContain('handled-count-too-high');
    expect(port.closed.has('new')).toBe(false);
    const item = await server.smQueue.get(smId);
    expect([item?.out, item?.base]).toEqual([1, 1]);
  });
});

describe('an append whose answer was lost while the session was detached, a later entry posted before the detach', () => {
  it('is marked uncertain (SM_POST_ORDER=checked), so a resume whose count covers the later one sends it again', async () => {
    const config = await createTestConfig({ SM_POST_ORDER: 'checked' });
    const doc = createDocumentClient({ region: config.region, endpoint: config.dynamodbEndpoint });
    const send = doc.send.bind(doc) as (command: unknown, ...rest: unknown[]) => Promise<unknown>;
    let armed = true;
    let later: () => Promise<unknown> = async () => undefined;
    let detach: () => Promise<unknown> = async () => undefined;
    // X is written while the session is on 'first'; before its answer (lost: a 500 after the
    // write) comes back, another sender's Y is queued and posted to 'first', then the socket goes
    // and the session is detached from it.
    (doc as unknown as { send: typeof send }).send = async (command, ...rest) => {
      const answer = await send(command, ...rest);
      const update = (command as { input?: { UpdateExpression?: string } }).input?.UpdateExpression ?? '';
      if (armed && update.includes('list_append')) {
        armed = false;
        await later();
        await detach();
        throw new AmbiguousWriteError('UpdateItem');
      }
      return answer;
    };
    const port = new RecordingPort();
    const smId = 'sm-lost-answer-detached';
    const { server, user, contact, stream, resume } = await sessionOf(
      smId,
      { SM_POST_ORDER: 'checked' },
      port,
      doc,
    );
    await server.smQueue.release(smId, 0);
    await stream('first', 0);
    await stream('new');
    const chat = (body: string) =>
      new Element('message', { to: `${user}/r`, from: contact, type: 'chat' }).c('body').t(body).root();
    later = () => deliver(server, { connectionId: 'first', smId }, chat('Y'));
    detach = () => server.smQueue.detach(smId, 'first', 0, Date.now() + 60_000, []);
    expect(await deliver(server, { connectionId: 'first', smId }, chat('X'))).toBe('sent');
    // The client got Y alone (X's post was never made) and counts one stanza.
    expect((port.frames.get('first') ?? []).join('')).not.toContain('<body>X</body>');
    expect((port.frames.get('first') ?? []).join('')).toContain('<body>Y</body>');
    const item = await server.smQueue.get(smId);
    expect(item?.entries.map((entry) => Boolean(entry.u))).toEqual([true, false]);
    await resume('new', 1);
    // XEP-0198 §5: the server resends what the client did not receive: X is not lost.
    expect((port.frames.get('new') ?? []).join('')).toContain('<body>X</body>');
  });
});

/**
 * SM_POST_ORDER=serial: the delivery whose append finds nobody holding the session posts its
 * queue in order; no two posts to a stream are in flight at once, so XEP-0198 §4's "h" ("the
 * sequence number of the last handled stanza") always counts a prefix of the queue.
 */
describe('posts in order (SM_POST_ORDER=serial)', () => {
  const SERIAL = { SM_POST_ORDER: 'serial' };

  async function serialSession(smId: string, port: RecordingPort, env: Record<string, string> = {}) {
    const session = await sessionOf(smId, { ...SERIAL, ...env }, port);
    const { server, user, contact, stream } = session;
    expect(await server.smQueue.attach(smId, user, 'live', 0)).toBeDefined();
    await server.smQueue.release(smId, 0);
    await stream('live', 0);
    const chat = (body: string) =>
      new Element('message', { to: `${user}/r`, from: contact, type: 'chat' }).c('body').t(body).root();
    const send = (body: string) => deliver(server, { connectionId: 'live', smId }, chat(body));
    const bodies = (connectionId: string) =>
      (port.frames.get(connectionId) ?? []).flatMap((data) => /<body>([^<]*)</.exec(data)?.[1] ?? []);
    return { ...session, send, bodies };
  }

  it('posts what other senders queued during its post after it, one at a time, and lets the hold go', async () => {
    const port = new HoldingPort('first');
    const { server, send, bodies } = await serialSession('sm-serial-order', port);
    const first = send('first');
    await port.reached;
    // Queued behind 'first' (its post is on its way): not posted by its own sender.
    expect(await send('second')).toBe('sent');
    expect(await send('third')).toBe('sent');
    expect(bodies('live')).toEqual([]);
    expect((await server.smQueue.get('sm-serial-order'))?.holder).toBeDefined();
    port.release();
    expect(await first).toBe('sent');
    expect(bodies('live')).toEqual(['first', 'second', 'third']);
    const item = await server.smQueue.get('sm-serial-order');
    expect([item?.holding, item?.settledOut, item?.out, Boolean(item?.uncertain)]).toEqual([
      false,
      3,
      3,
      false,
    ]);
    // The next stanza finds nobody holding: its own sender posts it.
    expect(await send('fourth')).toBe('sent');
    expect(bodies('live')).toEqual(['first', 'second', 'third', 'fourth']);
  });

  it('leaves nothing to guess at a socket lost mid-burst: the resume sends exactly what the count lacks', async () => {
    const port = new HoldingPort('second', 'live');
    const { server, send, stream, resume, bodies } = await serialSession('sm-serial-lost', port);
    expect(await send('first')).toBe('sent');
    // 'second' is on its way when 'third' is queued (behind it, not posted).
    const second = send('second');
    await port.reached;
    expect(await send('third')).toBe('sent');
    // The socket dies with 'first' delivered: the client counts 1, and nothing it lacks can
    // have overtaken anything it has. The resume takes the hold and sends 'second' and 'third'.
    await stream('new');
    await resume('new', 1);
    expect(bodies('new')).toEqual(['second', 'third']);
    // 'second' lands on the dead socket; its sender's release finds the hold taken and stops.
    port.release();
    expect(await second).toBe('sent');
    expect(bodies('live')).toEqual(['first', 'second']);
    expect(bodies('new')).toEqual(['second', 'third']);
    const item = await server.smQueue.get('sm-serial-lost');
    expect([item?.connectionId, item?.holding, Boolean(item?.uncertain), item?.marks]).toEqual([
      'new',
      false,
      false,
      undefined,
    ]);
  });

  it('closes the socket at an unanswered post and keeps the hold: later stanzas wait for the resume, in order', async () => {
    const port = new UnansweredPort('second');
    const { server, send, stream, resume, bodies } = await serialSession('sm-serial-unanswered', port);
    expect(await send('first')).toBe('sent');
    expect(await send('second')).toBe('sent');
    expect(port.closed.has('live')).toBe(true);
    // Operators see why clients resume: one socket closed for an uncertain post.
    expect(forcedResumes(server)).toEqual({ 'uncertain-post': 1 });
    // Nothing goes out behind an entry whose fate is unknown.
    expect(await send('third')).toBe('sent');
    expect(bodies('live')).toEqual(['first']);
    // The client got 'second' after all (h = 2): the resume sends 'third' only, once.
    await stream('new');
    await resume('new', 2);
    expect(bodies('new')).toEqual(['third']);
    const item = await server.smQueue.get('sm-serial-unanswered');
    expect([item?.holding, item?.base, item?.out, Boolean(item?.uncertain)]).toEqual([false, 2, 3, false]);
  });

  it('asks for an ack every SM_ACK_EVERY stanzas it posts, whoever queued them', async () => {
    const port = new HoldingPort('s1');
    const { send, sent } = await serialSession('sm-serial-acks', port, { SM_ACK_EVERY: '2' });
    const first = send('s1');
    await port.reached;
    for (const body of ['s2', 's3', 's4']) expect(await send(body)).toBe('sent');
    port.release();
    await first;
    expect(sent('live').match(/<r xmlns=["']urn:xmpp:sm:3["']\/>/g)?.length).toBe(2);
  });

  it('makes a redelivered frame whose earlier attempt held the session close the socket', async () => {
    const smId = 'sm-serial-redelivered';
    const port = new RecordingPort();
    const { server, user, contact } = await serialSession(smId, port);
    const chat = new Element('message', { to: `${user}/r`, from: contact, type: 'chat' })
      .c('body')
      .t('x')
      .root();
    // An earlier attempt of the frame queued its stanza, took the hold and stopped (how far it
    // posted nobody knows): the entry is queued, held by the frame's delivery key.
    const entry = { s: chat.toString(), t: Date.now(), k: 'dead-frame:0' };
    const appended = await server.smQueue.append(smId, entry, 100, 'dead-frame:0#earlier');
    expect(appended.kind === 'queued' && appended.item.holder).toBe('dead-frame:0#earlier');
    const again = inFrame({ frameId: 'dead-frame', receivedAt: Date.now(), receiveCount: 2 }, () =>
      deliver(server, { connectionId: 'live', smId }, chat),
    );
    expect(await again).toBe('sent');
    expect(port.closed.has('live')).toBe(true);
    expect((await server.smQueue.get(smId))?.out).toBe(1);
  });

  it('never lets a retry of a frame take the hold its earlier attempt still has: the socket is closed, nothing is queued twice', async () => {
    const smId = 'sm-serial-retry';
    const port = new RecordingPort();
    const { server, frame, user, contact, bodies } = await serialSession(smId, port);
    const chat = new Element('message', { to: `${user}/r`, from: contact, type: 'chat' })
      .c('body')
      .t('mine')
      .root();
    // The first attempt posts its stanza, then cannot let the hold go (DynamoDB keeps failing).
    const restore = intercept(server.smQueue, 'releasePoster', async () => {
      throw new RetryLaterError('throttled past the retries');
    });
    try {
      await expect(
        inFrame({ frameId: 'F', receivedAt: Date.now(), receiveCount: 1 }, () =>
          deliver(server, { connectionId: 'live', smId }, chat),
        ),
      ).rejects.toThrow('throttled');
    } finally {
      restore();
    }
    expect(bodies('live')).toEqual(['mine']);
    // The client has it and says so: the entry is trimmed, the first attempt's hold stays.
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='1'/>", 'ack-1', '20');
    expect((await server.smQueue.get(smId))?.entries).toEqual([]);
    // The retry finds no entry of its own, but its frame's hold: how far that attempt posted
    // nobody knows, so the client resumes; the stanza is not queued (or posted) a second time.
    expect(
      await inFrame({ frameId: 'F', receivedAt: Date.now(), receiveCount: 2 }, () =>
        deliver(server, { connectionId: 'live', smId }, chat),
      ),
    ).toBe('sent');
    expect(port.closed.has('live')).toBe(true);
    expect(bodies('live')).toEqual(['mine']);
    expect((await server.smQueue.get(smId))?.out).toBe(1);
  });

  it('makes the next delivery close the socket when a resume’s replay held the session past the lease', async () => {
    const smId = 'sm-serial-replay-lease';
    const port = new RecordingPort();
    const { server, user, send } = await serialSession(smId, port, { SM_POSTER_LEASE_MS: '3000' });
    // A resume attached on 'live' again and its replay stopped without letting go (the close of
    // a socket whose post went unanswered failed): `holding` stays, with the attach's time.
    expect(await server.smQueue.attach(smId, user, 'live', 0, 'live')).toBeDefined();
    expect(await send('within')).toBe('sent');
    expect(port.closed.has('live')).toBe(false);
    // The lease counts from the attach (or the append), before 'within'.
    await new Promise((resolve) => setTimeout(resolve, 3100));
    expect(await send('after')).toBe('sent');
    expect(port.closed.has('live')).toBe(true);
  });

  it('stops a poster without an invocation deadline (the sweeper) before its hold outlives the lease', async () => {
    // Outside a frame (as the sweeper delivers) no deadline stops a long burst; a hold past
    // SM_POSTER_LEASE_MS reads as a dead poster, whose socket the next sender closes while this
    // one still posts. The poster itself stops first: the client resumes from its count.
    const port = new HoldingPort('first');
    const { server, send, bodies } = await serialSession('sm-serial-own-lease', port, {
      SM_POSTER_LEASE_MS: '3000',
    });
    const first = send('first');
    await port.reached;
    for (const body of ['second', 'third']) expect(await send(body)).toBe('sent');
    // Past the lease's last margin (half the lease, 1.5 s, at this lease) but within it.
    await new Promise((resolve) => setTimeout(resolve, 1700));
    server.metrics.drain();
    port.release();
    expect(await first).toBe('sent');
    expect(bodies('live')).toEqual(['first']);
    expect(port.closed.has('live')).toBe(true);
    expect(forcedResumes(server)).toEqual({ 'out-of-time': 1 });
    expect((await server.smQueue.get('sm-serial-own-lease'))?.out).toBe(3);
  });

  it('stops a sweeper delivery before its invocation ends, though its hold is far from the lease', async () => {
    // The sweeper's deliveries run outside any frame; its invocation's time left
    // (runSweep's `timeLeftMs`) is what stops a burst before Lambda kills it holding the session.
    const port = new HoldingPort('first');
    const { server, send, bodies } = await serialSession('sm-serial-sweeper-deadline', port, {
      SM_POSTER_LEASE_MS: '60000',
    });
    const deadline = Date.now() + 4000;
    const first = withTimeLeft(
      () => deadline - Date.now(),
      () => send('first'),
    );
    await port.reached;
    for (const body of ['second', 'third']) expect(await send(body)).toBe('sent');
    // The poster's margin is half the 4 s it had (2 s): past it, the invocation still alive.
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, deadline - 1900 - Date.now())));
    server.metrics.drain();
    port.release();
    expect(await first).toBe('sent');
    expect(bodies('live')).toEqual(['first']);
    expect(port.closed.has('live')).toBe(true);
    expect(forcedResumes(server)).toEqual({ 'out-of-time': 1 });
    expect((await server.smQueue.get('sm-serial-sweeper-deadline'))?.out).toBe(3);
  });

  it('makes the next delivery close the socket when a hold outlived its lease (its poster died)', async () => {
    const port = new RecordingPort();
    const { server, send } = await serialSession('sm-serial-lease', port, { SM_POSTER_LEASE_MS: '3000' });
    const entry = { s: '<message><body>y</body></message>', t: Date.now(), k: 'died:0' };
    expect((await server.smQueue.append('sm-serial-lease', entry, 100, 'died:0')).kind).toBe('queued');
    // Within the lease, a delivery only queues: the holder posts it.
    expect(await send('within')).toBe('sent');
    expect(port.closed.has('live')).toBe(false);
    // The lease counts from the attach (or the append), before 'within'.
    await new Promise((resolve) => setTimeout(resolve, 3100));
    server.metrics.drain();
    expect(await send('after')).toBe('sent');
    expect(port.closed.has('live')).toBe(true);
    expect(forcedResumes(server)).toEqual({ lease: 1 });
  });
});

/** The `SmResumesForced` counts drained from the server's metrics, by reason. */
function forcedResumes(server: Server): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const sample of server.metrics.drain())
    if (sample.name === 'SmResumesForced') counts[sample.dimension?.value ?? ''] = sample.value;
  return counts;
}

/** A port whose post of a stanza containing `unanswered` reaches nobody and is never answered. */
class UnansweredPort extends RecordingPort {
  constructor(private readonly unanswered: string) {
    super();
  }
  override async post(connectionId: string, data: string, notAfter?: number) {
    if (data.includes(this.unanswered)) return 'unknown' as const;
    return super.post(connectionId, data, notAfter);
  }
}

/** A port whose post of a stanza containing `body` to `connectionId` waits for its gate. */
class GatedPort extends RecordingPort {
  private readonly gates = new Map<
    string,
    { open: () => void; opened: Promise<void>; reached: () => void; arrived: Promise<void> }
  >();
  gate(connectionId: string, body: string) {
    let open: () => void = () => {};
    let reached: () => void = () => {};
    const opened = new Promise<void>((resolve) => {
      open = resolve;
    });
    const arrived = new Promise<void>((resolve) => {
      reached = resolve;
    });
    this.gates.set(`${connectionId} ${body}`, { open, opened, reached, arrived });
    return { open, arrived };
  }
  override async post(connectionId: string, data: string, notAfter?: number) {
    for (const [name, gate] of this.gates) {
      const [to, body] = name.split(' ') as [string, string];
      if (to === connectionId && data.includes(`<body>${body}</body>`)) {
        this.gates.delete(name);
        gate.reached();
        await gate.opened;
      }
    }
    return super.post(connectionId, data, notAfter);
  }
}

describe('a replay slow enough that its client resumed elsewhere meanwhile', () => {
  for (const order of ['checked', 'serial']) {
    it(`does not end the new replay's hold, so nothing is posted twice (SM_POST_ORDER=${order})`, async () => {
      const smId = `sm-stale-release-${order}`;
      const port = new GatedPort();
      const { server, user, contact, stream, resume } = await sessionOf(smId, { SM_POST_ORDER: order }, port);
      const chat = (body: string) =>
        new Element('message', { to: `${user}/r`, from: contact, type: 'chat' }).c('body').t(body).root();
      // Queued while detached: 'first' and 'second'.
      expect(await server.smQueue.detach(smId, 'first', 0, Date.now() + 300_000, [])).toBe(true);
      expect(await deliver(server, { connectionId: 'first', smId }, chat('first'))).toBe('sent');
      expect(await deliver(server, { connectionId: 'first', smId }, chat('second'))).toBe('sent');
      // The resume on 'c9' replays; its post of 'second' is slow.
      const slow = port.gate('c9', 'second');
      await stream('c9');
      const c9 = resume('c9', 0);
      await slow.arrived;
      // The client gave up on 'c9' and resumes on 'c10', whose replay is slow too.
      const replaying = port.gate('c10', 'first');
      await stream('c10');
      const c10 = resume('c10', 0);
      await replaying.arrived;
      // 'c9''s post is answered at last: its replay must not let go of 'c10''s hold.
      slow.open();
      await c9;
      // A stanza queued now waits for 'c10''s replay (held), rather than going out beside it.
      expect(await deliver(server, { connectionId: 'c10', smId }, chat('third'))).toBe('sent');
      replaying.open();
      await c10;
      const onC10 = (port.frames.get('c10') ?? []).flatMap((data) => /<body>([^<]*)</.exec(data)?.[1] ?? []);
      expect(onC10).toEqual(['first', 'second', 'third']);
      const item = await server.smQueue.get(smId);
      expect([item?.connectionId, item?.holding, item?.settledOut]).toEqual(['c10', false, 3]);
    });
  }
});

/**
 * `dave-144`, seed 6 of session 12's final target run: a sender's frame queued its message and
 * posted it (the recipient's client counted it), then failed before its done mark. Before the
 * frame came again, a resume's count acknowledged the entry (trimmed from the queue) and another
 * sender's stanza was queued after it (`lk` moved on). The redelivery found neither its key, nor
 * its hold, nor `lk`, queued the message a second time numbered past the client's count, and the
 * next resume sent it again. XEP-0198 §4: "h ... the sequence number of the last handled stanza":
 * a count the client keeps exactly must never be met by a stanza it already handled.
 */
describe('a sender’s frame redelivered after its message was acknowledged and others queued behind it', () => {
  // Serial posting only: with SM_POST_ORDER=checked the marks are off (see the next test), and
  // the redelivery may queue the message again, a duplicate that mode accepts.
  for (const order of ['serial']) {
    it(`does not queue the message again (SM_POST_ORDER=${order})`, async () => {
      const smId = `sm-redelivered-after-ack-${order}`;
      const port = new RecordingPort();
      const { server, user, contact, stream, resume } = await sessionOf(smId, { SM_POST_ORDER: order }, port);
      expect(await server.smQueue.attach(smId, user, 'live', 0)).toBeDefined();
      await server.smQueue.release(smId, 0);
      await stream('live', 0);
      const chat = (body: string) =>
        new Element('message', { to: `${user}/r`, from: contact, type: 'chat' }).c('body').t(body).root();
      const bodies = (connectionId: string) =>
        (port.frames.get(connectionId) ?? []).flatMap((data) => /<body>([^<]*)</.exec(data)?.[1] ?? []);
      // Dave's frame F (of his connection 'dave-conn', whose frames are handled in order).
      const frameF = (receiveCount: number) =>
        inFrame(
          { frameId: 'F', receivedAt: Date.now(), receiveCount, seq: '500', connectionId: 'dave-conn' },
          () => deliver(server, { connectionId: 'live', smId }, chat('dave-144')),
        );
      if (order === 'serial') {
        // F posts dave-144 and cannot let the hold go (DynamoDB keeps failing): it fails unmarked.
        const restore = intercept(server.smQueue, 'releasePoster', async () => {
          throw new RetryLaterError('throttled past the retries');
        });
        try {
          await expect(frameF(1)).rejects.toThrow('throttled');
        } finally {
          restore();
        }
      } else {
        // F posts dave-144; the frame fails later (its done mark never written).
        expect(await frameF(1)).toBe('sent');
      }
      expect(bodies('live')).toEqual(['dave-144']);
      // The client counted it (h = 1); its resume acknowledges it: trimmed from the queue.
      await stream('third');
      await resume('third', 1);
      expect((await server.smQueue.get(smId))?.entries).toEqual([]);
      // Another sender's stanza is queued behind it (`lk` moves on) and reaches the client: h = 2.
      expect(
        await inFrame({ frameId: 'G', receivedAt: Date.now(), seq: '900', connectionId: 'alice-conn' }, () =>
          deliver(server, { connectionId: 'third', smId }, chat('alice-1')),
        ),
      ).toBe('sent');
      expect(bodies('third')).toEqual(['alice-1']);
      await server.host.fire('connection-vanished', { connectionId: 'third', disconnected: true });
      // F comes again: its message was queued once, and acknowledged; it is not queued again.
      expect(await frameF(2)).toBe('sent');
      expect((await server.smQueue.get(smId))?.out).toBe(2);
      // The client resumes with its exact count: nothing it handled comes again.
      await stream('fourth');
      await resume('fourth', 2);
      expect([...bodies('live'), ...bodies('third'), ...bodies('fourth')]).toEqual(['dave-144', 'alice-1']);
    });
  }
});

/**
 * SM_POST_ORDER=checked: each sender posts its own entry, so another sender's later entry can
 * reach the client first and a plain ack trim an entry never posted. A sender's mark would then
 * take the trimmed entry for one the client got and refuse its frame's redelivery: a loss (found
 * by the review of the marks). The marks are for serial posting only.
 */
describe('a sender’s frame redelivered after an ack trimmed its never-posted entry (SM_POST_ORDER=checked)', () => {
  it('queues and posts the message: nothing is lost', async () => {
    const smId = 'sm-checked-trimmed-unposted';
    const port = new RecordingPort();
    const { server, user, contact, stream, frame } = await sessionOf(
      smId,
      { SM_POST_ORDER: 'checked' },
      port,
    );
    expect(await server.smQueue.attach(smId, user, 'live', 0)).toBeDefined();
    await server.smQueue.release(smId, 0);
    await stream('live', 0);
    const chat = (body: string) =>
      new Element('message', { to: `${user}/r`, from: contact, type: 'chat' }).c('body').t(body).root();
    const bodies = () =>
      (port.frames.get('live') ?? []).flatMap((data) => /<body>([^<]*)</.exec(data)?.[1] ?? []);
    // Dave's frame F appended dave-144 (with its mark, as serial posting would) and its function
    // died before the post.
    const first = await server.smQueue.append(
      smId,
      { s: chat('dave-144').toString(), t: Date.now(), k: 'F:0' },
      100,
      undefined,
      { from: 'dave-conn', key: 'F:0' },
    );
    expect(first.kind).toBe('queued');
    // Alice's stanza is queued after it and posted; the client counts one stanza and says so.
    expect(
      await inFrame({ frameId: 'G', receivedAt: Date.now(), seq: '900', connectionId: 'alice-conn' }, () =>
        deliver(server, { connectionId: 'live', smId }, chat('alice-1')),
      ),
    ).toBe('sent');
    await frame('live', "<a xmlns='urn:xmpp:sm:3' h='1'/>", 'ack-1', '20');
    expect((await server.smQueue.get(smId))?.entries.map((entry) => entry.k)).toEqual(['G:0']);
    // F comes again: its message reaches the client.
    expect(
      await inFrame(
        { frameId: 'F', receivedAt: Date.now(), receiveCount: 2, seq: '500', connectionId: 'dave-conn' },
        () => deliver(server, { connectionId: 'live', smId }, chat('dave-144')),
      ),
    ).toBe('sent');
    expect(bodies()).toEqual(['alice-1', 'dave-144']);
  });
});

/**
 * A resume that went ahead after SM_RESUME_SETTLE_MS while the old stream's frame of a counted
 * stanza was still being retried (the target run of session 13, seed 17, and the default run on
 * its final code, seed 2): the client's next stanza, sent on the resumed stream, reached the
 * recipient first. The resumed stream's own stanzas now wait for that one (SmState.after).
 */
describe('the stanzas of a stream resumed before the old stream routed the one it counted', () => {
  async function resumedUnsettled(smId: string, env: Record<string, string>) {
    const session = await sessionOf(smId, { SM_RESUME_SETTLE_MS: '100', ...env });
    const { server, stream, resume } = session;
    // The old stream counted frame 300 (the count is written before routing); its routing keeps
    // failing, its done mark stays at 200.
    await stream('first', 1);
    await server.sessions.updateConnection('first', {
      countedFrame: 'f300',
      countedSeq: '300',
      doneSeq: '200',
    });
    await stream('new');
    await resume('new', 0);
    expect((await server.sessions.getConnection('new'))?.sm?.after?.connectionId).toBe('first');
    return session;
  }

  it('wait, handed back to the queue, until the old stream has routed it; then go, in order', async () => {
    const { server, contact, message, storedFor } = await resumedUnsettled('sm-order-after', {});
    // Sent after the one the old stream counted: not routed before it.
    await expect(message('new', '1')).rejects.toThrow('has not routed');
    expect(await storedFor(contact)).toEqual([]);
    expect((await server.sessions.getConnection('new'))?.sm?.inbound).toBe(1);
    // The old frame is done: the queue's next delivery of the frame routes it, counted once.
    await server.sessions.updateConnection('first', { doneSeq: '300' });
    await message('new', '1');
    expect(await storedFor(contact)).toEqual(['1']);
    const row = await server.sessions.getConnection('new');
    expect([row?.sm?.inbound, row?.sm?.after]).toEqual([2, undefined]);
  });

  it('go at once when the old stream ended itself (its frame failed for good): it routes nothing more', async () => {
    const { server, contact, message, storedFor } = await resumedUnsettled('sm-order-ended', {});
    await expect(message('new', '1')).rejects.toThrow('has not routed');
    // The old stream's retried frame ends it with a stream error: its row is marked ended.
    await server.sessions.updateConnection('first', { ended: true });
    await message('new', '1');
    expect(await storedFor(contact)).toEqual(['1']);
  });

  it('go ahead past SM_RESUME_ORDER_MS when the old stream never routes it', async () => {
    const { contact, message, storedFor } = await resumedUnsettled('sm-order-expired', {
      // Long enough that the first try surely comes within it on a loaded machine.
      SM_RESUME_ORDER_MS: '3000',
    });
    await expect(message('new', '1')).rejects.toThrow('has not routed');
    // The wait counts from the resume, which came before the first try.
    await new Promise((resolve) => setTimeout(resolve, 3100));
    await message('new', '1');
    expect(await storedFor(contact)).toEqual(['1']);
  });
});
