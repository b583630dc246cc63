/**
 * A frame whose stanza may be handled twice harmlessly (router.ts `repeatable`): an iq the server
 * only answers (an XEP-0199 ping, a disco or version query: handlers registered `repeatable`), or
 * a XEP-0085 typing notification. Such a frame is not marked done in its connection row, and with
 * XEP-0198 its count is saved with the frame's end, not ahead of the handling: a keepalive or a
 * notification costs one write less.
 */
import { describe, expect, it } from 'vitest';
import type { RecordingPort } from '../../shared/outbound.ts';
import type { Server } from '../../shared/server.ts';
import { intercept } from '../support/intercept.ts';
import { sendFrame, testServer } from '../support/stream.ts';

const PING_NS = 'urn:xmpp:ping';

/** A bound stream of a new user, with XEP-0198 (urn:xmpp:sm:3) enabled when `sm`. */
async function boundStream(name: string, sm: boolean) {
  const { port, server } = await testServer();
  const connectionId = `${name}${Date.now()}`;
  const user = `${name}${Date.now()}@localhost`;
  await server.sessions.createConnection(connectionId, Date.now());
  const smId = `sm-${connectionId}`;
  await server.sessions.updateConnection(connectionId, {
    streamOpen: true,
    user,
    resource: 'r',
    ...(sm
      ? { sm: { version: 'sm3' as const, id: smId, inbound: 0, acked: 0, resumable: true, max: 300 } }
      : {}),
  });
  if (sm) {
    await server.smQueue.create({
      smId,
      user,
      resource: 'r',
      version: 'sm3',
      resumable: true,
      max: 300,
      connectionId,
    });
    // <enabled/> went out: the queue's hold from the <enable/> is let go.
    await server.smQueue.release(smId, 0);
  }
  return { port, server, connectionId, user };
}

/** Counts the writes of `connectionId`'s row (Sessions.updateConnection), and which carried the done mark. */
function rowWrites(server: Server, connectionId: string) {
  const writes: { done: boolean; inbound?: number }[] = [];
  const original = server.sessions.updateConnection.bind(server.sessions);
  intercept(server.sessions, 'updateConnection', async (id, changes, options) => {
    if (id === connectionId)
      writes.push({ done: changes.savedFrame !== undefined, inbound: changes.sm?.inbound });
    return original(id, changes, options);
  });
  return writes;
}

function frames(server: Server, connectionId: string) {
  return (frameId: string, seq: string, xml: string, receiveCount = 1) =>
    sendFrame(server, connectionId, xml, { frameId, seq, receiveCount });
}

const ping = (id: string, to?: string) =>
  `<iq xmlns='jabber:client' type='get' id='${id}'${to ? ` to='${to}'` : ''}><ping xmlns='${PING_NS}'/></iq>`;

/** The iq results the stream was posted for `id`. */
function results(port: RecordingPort, connectionId: string, id: string): string[] {
  return (port.frames.get(connectionId) ?? []).filter(
    (frame) => frame.startsWith('<iq') && frame.includes(`id="${id}"`) && frame.includes('type="result"'),
  );
}

describe('a keepalive ping without stream management', () => {
  it('is answered without a write, and a redelivery answers it again (XEP-0199 §4.2)', async () => {
    const { port, server, connectionId } = await boundStream('pinger', false);
    const writes = rowWrites(server, connectionId);
    const frame = frames(server, connectionId);
    // XEP-0199 §4.2, Example 2: <iq from='capulet.lit' to='juliet@capulet.lit/balcony' id='c2s1' type='result'/>
    await frame('p1', '100', ping('c2s1', 'localhost'));
    expect(results(port, connectionId, 'c2s1')).toHaveLength(1);
    expect(writes).toEqual([]);
    expect((await server.sessions.getConnection(connectionId))?.doneSeq).toBeUndefined();
    // SQS brings it again (a lost delete): the same answer again, nothing else.
    await frame('p1', '100', ping('c2s1', 'localhost'), 2);
    expect(results(port, connectionId, 'c2s1')).toHaveLength(2);
    expect(writes).toEqual([]);
  });

  it('answers disco#info and software version queries alike, but marks anything else done', async () => {
    const { port, server, connectionId, user } = await boundStream('asker', false);
    const writes = rowWrites(server, connectionId);
    const frame = frames(server, connectionId);
    await frame(
      'd1',
      '100',
      "<iq xmlns='jabber:client' type='get' id='info1' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
    );
    await frame(
      'v1',
      '101',
      "<iq xmlns='jabber:client' type='get' id='ver1' to='localhost'><query xmlns='jabber:iq:version'/></iq>",
    );
    // RFC 6120 §10.3.3: a ping without 'to' is answered for the account.
    await frame('p1', '102', ping('self1'));
    expect(results(port, connectionId, 'info1')).toHaveLength(1);
    expect(results(port, connectionId, 'ver1')).toHaveLength(1);
    expect(results(port, connectionId, 'self1')).toHaveLength(1);
    expect(writes).toEqual([]);
    // A ping to another user's account is a stanza error (XEP-0030 §8's rule), still only an answer.
    await frame('p2', '103', ping('other1', `nobody${Date.now()}@localhost`));
    expect(port.frames.get(connectionId)?.at(-1)).toContain('service-unavailable');
    expect(writes).toEqual([]);
    // A roster get records that the resource asked for the roster (RFC 6121 §2.1.6 pushes):
    // not repeatable, marked done as every routed stanza is.
    await frame(
      'r1',
      '104',
      "<iq xmlns='jabber:client' type='get' id='roster1'><query xmlns='jabber:iq:roster'/></iq>",
    );
    expect(writes.at(-1)).toMatchObject({ done: true });
    expect((await server.sessions.getConnection(connectionId))?.doneSeq).toBe('104');
    // And a message to a contact.
    await frame(
      'm1',
      '105',
      `<message xmlns='jabber:client' to='${user}' type='chat' id='m1'><body>hi</body></message>`,
    );
    expect((await server.sessions.getConnection(connectionId))?.doneSeq).toBe('105');
  });
});

describe('a keepalive ping with stream management (urn:xmpp:sm:3)', () => {
  it('is counted in the one write that ends its frame, where a message is counted before it is routed', async () => {
    const { port, server, connectionId, user } = await boundStream('smpinger', true);
    const writes = rowWrites(server, connectionId);
    const frame = frames(server, connectionId);
    await frame('p1', '100', ping('c2s1', 'localhost'));
    expect(results(port, connectionId, 'c2s1')).toHaveLength(1);
    // One write: the count and the done mark together.
    expect(writes).toEqual([{ done: true, inbound: 1 }]);
    expect((await server.sessions.getConnection(connectionId))?.sm?.inbound).toBe(1);
    // XEP-0198 §4: the <a/> for an <r/> counts it.
    await frame('r1', '101', "<r xmlns='urn:xmpp:sm:3'/>");
    expect(port.frames.get(connectionId)?.at(-1)).toMatch(/<a xmlns="urn:xmpp:sm:3" h="1"\/>/);

    // A message: counted (a write) before it is routed, then marked done (a second write).
    writes.length = 0;
    await frame(
      'm1',
      '102',
      `<message xmlns='jabber:client' to='${user}/elsewhere' type='chat' id='m1'><body>hi</body></message>`,
    );
    expect(writes).toEqual([
      { done: false, inbound: 2 },
      { done: true, inbound: undefined },
    ]);
  });

  it('counts once and answers once when its frame comes back after a failure before the end', async () => {
    const { port, server, connectionId } = await boundStream('smretry', true);
    const frame = frames(server, connectionId);
    const original = server.sessions.updateConnection.bind(server.sessions);
    let died = false;
    const restore = intercept(server.sessions, 'updateConnection', async (id, changes, options) => {
      if (!died && id === connectionId && changes.savedFrame !== undefined) {
        died = true;
        throw new Error('Task timed out after 30.00 seconds');
      }
      return original(id, changes, options);
    });
    await expect(frame('p1', '100', ping('c2s1', 'localhost'))).rejects.toThrow(/timed out/);
    restore();
    // The answer is queued in the session (and posted); the count was never saved.
    expect((await server.sessions.getConnection(connectionId))?.sm?.inbound).toBe(0);
    await frame('p1', '100', ping('c2s1', 'localhost'), 2);
    expect((await server.sessions.getConnection(connectionId))?.sm?.inbound).toBe(1);
    // The redelivery finds its answer in the queue under the frame's key: not queued twice.
    const queue = await server.smQueue.get(`sm-${connectionId}`);
    expect(queue?.entries.filter((entry) => (entry.s ?? '').includes('c2s1'))).toHaveLength(1);
    expect(results(port, connectionId, 'c2s1').length).toBeGreaterThanOrEqual(1);
  });
});

describe('a repeatable stanza on a stream a resume fenced', () => {
  it('does not raise the count the resume reported: the message before it, dropped at the fence, is not vouched for', async () => {
    const { port, server, connectionId, user } = await boundStream('fenced', true);
    // A resume on another connection fenced this one, reading h = 0 (XEP-0198 §5: the client
    // resends what h does not cover).
    expect((await server.sessions.fenceConnection(connectionId))?.sm?.inbound).toBe(0);
    const frame = frames(server, connectionId);
    // The frames the old socket sent last: a message (stopped at the fence, uncounted) ...
    await frame(
      'm1',
      '100',
      `<message xmlns='jabber:client' to='${user}/elsewhere' type='chat' id='m1'><body>hi</body></message>`,
    );
    // ... then a typing notification and a ping.
    await frame(
      'c1',
      '101',
      `<message xmlns='jabber:client' to='${user}/elsewhere' type='chat' id='c1'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>`,
    );
    await frame('p1', '102', ping('after-fence', 'localhost'));
    // Had the count risen to 1, a second look at the session would report h = 1 and the client
    // would not resend the message.
    expect((await server.sessions.getConnection(connectionId))?.sm?.inbound).toBe(0);
    expect(results(port, connectionId, 'after-fence')).toEqual([]);
  });

  it('is not saved when the fence comes while it is handled', async () => {
    const { server, connectionId } = await boundStream('fencedlate', true);
    const frame = frames(server, connectionId);
    // The fence lands between the frame's read of the row and its save.
    const original = server.sessions.updateConnection.bind(server.sessions);
    let fenced = false;
    intercept(server.sessions, 'updateConnection', async (id, changes, options) => {
      if (!fenced && id === connectionId) {
        fenced = true;
        await server.sessions.fenceConnection(connectionId);
      }
      return original(id, changes, options);
    });
    await frame('p1', '100', ping('late', 'localhost'));
    expect(fenced).toBe(true);
    expect((await server.sessions.getConnection(connectionId))?.sm?.inbound).toBe(0);
  });
});

describe('a XEP-0085 typing notification', () => {
  it('is delivered without a write of the sender’s row; a message with a body is marked done', async () => {
    const { port, server, connectionId } = await boundStream('typist', false);
    // The reader: an available resource on the same server, without stream management.
    const peer = { user: `reader${Date.now()}@localhost`, connectionId: `reader${Date.now()}` };
    await server.sessions.createConnection(peer.connectionId, Date.now());
    await server.sessions.bindResource({
      user: peer.user,
      resource: 'r',
      connectionId: peer.connectionId,
      available: false,
      priority: 0,
      boundAt: Date.now(),
    });
    await server.sessions.updatePresence(peer.user, 'r', peer.connectionId, {
      available: true,
      priority: 0,
      presence: '<presence/>',
    });
    const writes = rowWrites(server, connectionId);
    const frame = frames(server, connectionId);
    // XEP-0085 §5.2 Example 4: <message from='bernardo@shakespeare.lit/pda' to='francisco@shakespeare.lit' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>
    const composing = `<message xmlns='jabber:client' to='${peer.user}' type='chat' id='cs1'><composing xmlns='http://jabber.org/protocol/chatstates'/><no-store xmlns='urn:xmpp:hints'/></message>`;
    await frame('c1', '100', composing);
    const delivered = () =>
      (port.frames.get(peer.connectionId) ?? []).filter((frame) => frame.includes('composing')).length;
    expect(delivered()).toBe(1);
    expect(writes).toEqual([]);
    // A lost delete: handled again without a write. This instance remembers its direct post and
    // makes it once (another instance would post it again, saying again that bernardo is typing).
    await frame('c1', '100', composing, 2);
    expect(delivered()).toBe(1);
    expect(writes).toEqual([]);
    // One without type='chat' is a normal message, which offline storage keeps: marked done.
    await frame(
      'n1',
      '101',
      `<message xmlns='jabber:client' to='${peer.user}' id='cs0'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>`,
    );
    expect(writes).toEqual([{ done: true, inbound: undefined }]);
    // One that asks to be kept (XEP-0334 <store/>: offline, in the archive) is marked done.
    await frame(
      's1',
      '102',
      `<message xmlns='jabber:client' to='${peer.user}' type='chat' id='cs2'><paused xmlns='http://jabber.org/protocol/chatstates'/><store xmlns='urn:xmpp:hints'/></message>`,
    );
    expect(writes).toHaveLength(2);
    expect(writes.at(-1)).toMatchObject({ done: true });
    // With a body it is a message: marked done, never delivered twice.
    const message = `<message xmlns='jabber:client' to='${peer.user}' type='chat' id='m1'><body>hi</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>`;
    await frame('m1', '103', message);
    expect(writes).toHaveLength(3);
    expect(writes.at(-1)).toMatchObject({ done: true });
    await frame('m1', '103', message, 2);
    expect((port.frames.get(peer.connectionId) ?? []).filter((frame) => frame.includes('>hi<'))).toHaveLength(
      1,
    );
  });
});
