/**
 * XEP-0136 and a frame delivered more than once: SQS redelivers a frame whose first attempt did
 * its durable writes and then died before the frame's final save, and the stream function retries
 * a frame in place after a transient failure (functions/stream.ts). A `<remove/>` must come
 * out as if the frame had been handled once: the same answer. (The first test of each group is a
 * review probe of commit 5f67376, test/integration/review-redelivery.test.ts.)
 */
import { parse } from 'ltx';
import { describe, expect, it } from 'vitest';
import { handleStreamEvent } from '../../shared/core/stream.ts';
import { createLogger } from '../../shared/log.ts';
import { RecordingPort } from '../../shared/outbound.ts';
import { deriveCredentialSet } from '../../shared/sasl/scram.ts';
import { createServer, type Server } from '../../shared/server.ts';
import { createTestConfig } from '../support/dynamodb.ts';
import { intercept } from '../support/intercept.ts';

const ARCHIVE = 'http://jabber.org/protocol/archive';
const JULIET = 'juliet@capulet.com/chamber';
const START = '2020-01-01T00:00:00Z';

/** The invocation dies before the frame's last save (a timeout): that save fails, once. */
function dieBeforeFinalSave(server: Server): () => void {
  const original = server.sessions.updateConnection.bind(server.sessions);
  let died = false;
  return intercept(server.sessions, 'updateConnection', async (connectionId, changes, options) => {
    if (!died && changes.savedFrame !== undefined) {
      died = true;
      throw new Error('Task timed out after 30.00 seconds');
    }
    return original(connectionId, changes, options);
  });
}

/** Alice and Bob, subscribed both ways; `login` binds a connection; `frame` hands it a frame. */
async function world(env: Record<string, string> = {}) {
  const port = new RecordingPort();
  const server = createServer({ config: await createTestConfig(env), port, log: createLogger('silent') });
  const stamp = `${Date.now()}${Math.floor(Math.random() * 1000)}`;
  const alice = `alice${stamp}@localhost`;
  const bob = `bob${stamp}@localhost`;
  for (const user of [alice, bob]) await server.users.create(user, await deriveCredentialSet('pw', 4096));
  const both = (contact: string) => ({
    contact,
    listed: true,
    groups: [],
    subscription: 'both' as const,
    pendingOut: false,
    approved: false,
  });
  await server.roster.apply(alice, bob, { contactIsLocal: true }, () => ({
    user: both(bob),
    contact: both(alice),
    outcome: undefined,
  }));
  let seq = 100;
  const frame = (connectionId: string, xml: string, frameId: string, s = String(seq++), receiveCount = 1) =>
    handleStreamEvent(server, {
      connectionId,
      kind: 'frame',
      frame: xml,
      receivedAt: Date.now(),
      frameId,
      seq: s,
      receiveCount,
    });
  const login = async (connectionId: string, user: string, resource: string) => {
    await server.sessions.createConnection(connectionId, Date.now());
    await server.sessions.updateConnection(connectionId, { streamOpen: true, user });
    await frame(
      connectionId,
      `<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>${resource}</resource></bind></iq>`,
      `${connectionId}-bind`,
    );
  };
  const sent = (connectionId: string) => port.frames.get(connectionId) ?? [];
  return { port, server, alice, bob, frame, login, sent };
}

describe('a redelivered XEP-0136 <remove/> whose first attempt removed the collection', () => {
  const answersTo = (sent: string[], id: string) =>
    sent
      .map((text) => parse(text))
      .filter((el) => el.attrs.id === id)
      .map((el) => (el.attrs.type === 'error' ? el.getChild('error')?.children[0] : el.attrs.type))
      .map((answer) =>
        typeof answer === 'string' || answer === undefined ? answer : (answer as { name: string }).name,
      );

  // §8.3: "If the specified collection (or collections) do not exist then the server MUST return
  // an <item-not-found/> error": they existed when the request came; its redelivery is the same
  // request, and its answer is the one the client may not have received.
  it('answers the same result again, not item-not-found (§8.3)', async () => {
    const { server, alice, frame, login, sent } = await world();
    await login('alice-1', alice, 'phone');
    await frame(
      'alice-1',
      `<iq type='set' id='st1'><store xmlns='${ARCHIVE}' with='${JULIET}' start='${START}'><to secs='0'><body>x</body></to></store></iq>`,
      'alice-store',
    );
    const remove = `<iq type='set' id='rm1'><remove xmlns='${ARCHIVE}' with='${JULIET}' start='${START}'/></iq>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', remove, 'alice-rm', '900')).rejects.toThrow();
    restore();
    await frame('alice-1', remove, 'alice-rm', '900', 2);
    const answers = sent('alice-1')
      .map((text) => parse(text))
      .filter((el) => el.attrs.id === 'rm1');
    expect(answers.map((el) => el.attrs.type)).toEqual(['result', 'result']);
  });

  it('of a range answers the same result again, and the record goes with the frame’s end', async () => {
    const { server, alice, frame, login, sent } = await world();
    await login('alice-1', alice, 'phone');
    for (const [i, day] of ['01', '02'].entries())
      await frame(
        'alice-1',
        `<iq type='set' id='st${i}'><store xmlns='${ARCHIVE}' with='${JULIET}' start='2020-01-${day}T00:00:00Z'><to secs='0'><body>x</body></to></store></iq>`,
        `alice-store-${i}`,
      );
    const remove = `<iq type='set' id='rm1'><remove xmlns='${ARCHIVE}' with='juliet@capulet.com' start='2020-01-01T00:00:00Z' end='2020-02-01T00:00:00Z'/></iq>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', remove, 'alice-rm', '900')).rejects.toThrow();
    restore();
    expect((await server.archive.listCollections(alice, {}, { max: 10 })).items).toEqual([]);
    expect((await server.sessions.getConnection('alice-1'))?.archiveRemoving).toBe('alice-rm');
    await frame('alice-1', remove, 'alice-rm', '900', 2);
    expect(answersTo(sent('alice-1'), 'rm1')).toEqual(['result', 'result']);
    expect((await server.sessions.getConnection('alice-1'))?.archiveRemoving).toBeUndefined();
    // The next <remove/> of the same range is another request: nothing is there any more.
    await frame('alice-1', remove.replace("id='rm1'", "id='rm2'"), 'alice-rm2', '901');
    expect(answersTo(sent('alice-1'), 'rm2')).toEqual(['item-not-found']);
  });

  it('of nothing answers item-not-found every time, and records nothing before it', async () => {
    const { server, alice, frame, login, sent } = await world();
    await login('alice-1', alice, 'phone');
    const writes: string[] = [];
    const update = server.sessions.updateConnection.bind(server.sessions);
    intercept(server.sessions, 'updateConnection', async (connectionId, changes, options) => {
      writes.push(...Object.keys(changes));
      return update(connectionId, changes, options);
    });
    const remove = `<iq type='set' id='rm1'><remove xmlns='${ARCHIVE}' with='${JULIET}' start='${START}'/></iq>`;
    await frame('alice-1', remove, 'alice-rm', '900');
    await frame('alice-1', remove, 'alice-rm', '900', 2);
    expect(answersTo(sent('alice-1'), 'rm1')).toEqual(['item-not-found']);
    expect(writes).not.toContain('archiveRemoving');
  });
});
