/**
 * SQS redelivers a frame whose invocation timed out or whose delete was lost, even when the
 * frame's work was done: a frame whose state changes were saved is recognised by its id
 * (API Gateway's request id, saved with the state in the same write) and skipped.
 */
import { GetCommand, UpdateCommand } from '@aws-sdk/lib-dynamodb';
import { describe, expect, it } from 'vitest';
import { handleStreamEvent } from '../../shared/core/stream.ts';
import { RetryLaterError } from '../../shared/core/transient.ts';
import { createLogger } from '../../shared/log.ts';
import { RecordingPort } from '../../shared/outbound.ts';
import { deriveCredentialSet } from '../../shared/sasl/scram.ts';
import { createServer } from '../../shared/server.ts';
import { createDocumentClient } from '../../shared/store/dynamo.ts';
import { ConnectionFencedError } from '../../shared/store/sessions.ts';
import { createTestConfig, TEST_REGION, useDynamoDbLocal } from '../support/dynamodb.ts';
import { intercept, serverError, throttlingError } from '../support/intercept.ts';
import { scramClientFinal, scramClientFirst } from '../support/scram-client.ts';
import { dieBeforeFinalSave, frameDriver, subscribedPair } from '../support/stream.ts';

const SASL = 'urn:ietf:params:xml:ns:xmpp-sasl';
/**
 * API Gateway's time of the frames these tests hand the server, the same for every delivery of
 * a frame: a few seconds back (a stored message's stamp and its TTL count from it).
 */
const FRAME_TIME = Date.now() - 5_000;
const OPEN = "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>";
/** SASL PLAIN for an account that does not exist: a failure, counted. */
const BAD_AUTH = `<auth xmlns='${SASL}' mechanism='PLAIN'>${Buffer.from('\0nobody\0pw').toString('base64')}</auth>`;

/**
 * A server whose connection `connectionId` is a bound stream of `senderName`, and an account for
 * `recipientName` with no session (what it is sent is stored offline).
 */
async function boundSenderAndRecipient(
  connectionId: string,
  senderName: string,
  recipientName: string,
  env: Record<string, string> = {},
) {
  const port = new RecordingPort();
  const server = createServer({ config: await createTestConfig(env), port, log: createLogger('silent') });
  const sender = `${senderName}${Date.now()}@localhost`;
  const recipient = `${recipientName}${Date.now()}@localhost`;
  await server.users.create(recipient, await deriveCredentialSet('pw', 4096));
  await server.sessions.createConnection(connectionId, Date.now());
  await server.sessions.updateConnection(connectionId, { streamOpen: true, user: sender, resource: 'r' });
  return { port, server, sender, recipient };
}

describe("a connection's row (`$connect` writes none)", () => {
  /** A server and a connection with no row; `frame` hands it a frame as the queue would. */
  async function newConnection(name: string, from: { connectedAt?: number; sourceIp?: string } = {}) {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    const connectionId = `${name}${Date.now()}`;
    let n = 0;
    const frame = (xml: string, frameId = `req-${++n}`) =>
      handleStreamEvent(server, {
        connectionId,
        kind: 'frame',
        frame: xml,
        receivedAt: Date.now(),
        frameId,
        connectedAt: from.connectedAt ?? Date.now(),
        ...(from.sourceIp ? { sourceIp: from.sourceIp } : {}),
      });
    return { port, server, connectionId, frame };
  }

  it("is created by the stream's first frame, with API Gateway's connection time and address", async () => {
    const connectedAt = Date.now() - 1500;
    const { port, server, connectionId, frame } = await newConnection('first', {
      connectedAt,
      sourceIp: '198.51.100.7',
    });
    expect(await server.sessions.getConnection(connectionId)).toBeUndefined();
    await frame(OPEN, 'req-1');
    expect(port.frames.get(connectionId)).toHaveLength(2);
    expect(await server.sessions.getConnection(connectionId)).toMatchObject({
      connectionId,
      connectedAt,
      sourceIp: '198.51.100.7',
      streamOpen: true,
      authFailures: 0,
      savedFrame: 'req-1',
    });
    // Redelivered: recognised by the row it created, nothing sent again.
    await frame(OPEN, 'req-1');
    expect(port.frames.get(connectionId)).toHaveLength(2);
    // The next frames update that row and keep its time and address (the SASL limits read it).
    await frame(BAD_AUTH, 'req-2');
    expect(await server.sessions.getConnection(connectionId)).toMatchObject({
      connectedAt,
      sourceIp: '198.51.100.7',
      savedFrame: 'req-2',
      authFailures: 1,
    });
  });

  it("stays, marked ended, when its own frame ended the stream: the frames queued behind are not a new stream's", async () => {
    const { port, server, connectionId, frame } = await newConnection('closed', { sourceIp: '198.51.100.7' });
    await frame(OPEN);
    // RFC 7395 §3.6: the client closes; the server answers with its own <close/>.
    await frame("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>");
    const sent = port.frames.get(connectionId)?.length ?? 0;
    expect(port.frames.get(connectionId)?.at(-1)).toContain('<close');
    expect(await server.sessions.getConnection(connectionId)).toMatchObject({ ended: true });
    // What the client pipelined before it saw the close: dropped, never a fresh stream (no
    // <open/> answered, no row made new, no SASL attempt on a closed socket).
    await frame(OPEN);
    await frame(BAD_AUTH);
    expect(port.frames.get(connectionId)?.length).toBe(sent);
    expect(await server.sessions.getConnection(connectionId)).toMatchObject({ ended: true, authFailures: 0 });
    // Its $disconnect has nothing left to end.
    await handleStreamEvent(server, {
      connectionId,
      kind: 'disconnect',
      frame: '',
      receivedAt: Date.now(),
      frameId: 'req-disconnect',
    });
    expect(port.frames.get(connectionId)?.length).toBe(sent);
  });

  it('is created, marked ended, by a first frame that ends its stream: what was pipelined after it does not start one', async () => {
    const { port, server, connectionId, frame } = await newConnection('early');
    await frame("<message to='a@localhost'><body>hi</body></message>");
    // RFC 6120 §4.9: a stream error, then the stream is closed.
    expect(port.frames.get(connectionId)?.some((text) => text.includes('stream:error'))).toBe(true);
    expect(port.closed.has(connectionId)).toBe(true);
    expect(await server.sessions.getConnection(connectionId)).toMatchObject({ connectionId, ended: true });
    const sent = port.frames.get(connectionId)?.length;
    // The client had pipelined a login: none of it is handled on the closed socket.
    await frame(OPEN);
    await frame(BAD_AUTH);
    expect(port.frames.get(connectionId)?.length).toBe(sent);
    expect(await server.sessions.getConnection(connectionId)).toMatchObject({
      ended: true,
      streamOpen: false,
    });
  });

  it('closes the socket again for a frame that finds its stream ended (a close that failed after the mark)', async () => {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    const connectionId = `reclose${Date.now()}`;
    await server.sessions.createConnection(connectionId, Date.now());
    await server.sessions.updateConnection(connectionId, { ended: true });
    await handleStreamEvent(server, {
      connectionId,
      kind: 'frame',
      frame: OPEN,
      receivedAt: Date.now(),
      frameId: 'req-1',
    });
    expect(port.frames.get(connectionId)).toBeUndefined();
    expect(port.closed.has(connectionId)).toBe(true);
  });
});

describe('a redelivered frame', () => {
  it('is skipped once its state was saved, and handled when it was not', async () => {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    await server.sessions.createConnection('c1', Date.now());
    const frame = (frameId: string, xml: string) =>
      handleStreamEvent(server, {
        connectionId: 'c1',
        kind: 'frame',
        frame: xml,
        receivedAt: Date.now(),
        frameId,
      });

    await frame('req-1', OPEN);
    // RFC 7395 §3.4: <open/> answered, then the features.
    expect(port.frames.get('c1')).toHaveLength(2);
    expect((await server.sessions.getConnection('c1'))?.savedFrame).toBe('req-1');

    // The same frame again (the same request id): nothing is sent a second time.
    await frame('req-1', OPEN);
    expect(port.frames.get('c1')).toHaveLength(2);

    // A new frame with the same content is a new frame: handled (a stream restart answers again).
    await frame('req-2', OPEN);
    expect(port.frames.get('c1')).toHaveLength(4);
  });
});

describe('a redelivered <enable/> whose first attempt was refused', () => {
  it('answers <failed/> again and enables nothing, though the posts it waited on are over now', async () => {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    const user = `sam${Date.now()}@localhost`;
    const connectionId = `enable${Date.now()}`;
    await server.sessions.createConnection(connectionId, Date.now());
    await server.sessions.updateConnection(connectionId, { streamOpen: true, user, resource: 'r' });
    // Bound, before its first presence: direct posts to it are counted while it may still switch.
    await server.sessions.bindResource({
      user,
      resource: 'r',
      connectionId,
      available: false,
      priority: 0,
      boundAt: Date.now(),
      mayQueue: true,
    });
    const token = (await server.sessions.beginDirectPost(user, 'r', connectionId)) as string;
    expect(token).toEqual(expect.any(String));
    const enable = (timeLeftMs?: () => number) =>
      handleStreamEvent(server, {
        connectionId,
        kind: 'frame',
        frame: "<enable xmlns='urn:xmpp:sm:3' resume='true'/>",
        receivedAt: Date.now(),
        frameId: 'req-enable',
        ...(timeLeftMs ? { timeLeftMs } : {}),
      });
    // A post stays in flight past half of what the invocation has left: refused.
    const restore = dieBeforeFinalSave(server);
    await expect(enable(() => 400)).rejects.toThrow();
    restore();
    const sent = () => port.frames.get(connectionId) ?? [];
    expect(sent()).toHaveLength(1);
    // XEP-0198 §3: "<failed xmlns='urn:xmpp:sm:3'/>" (here with the reason the server had).
    expect(sent()[0]).toContain('<failed xmlns="urn:xmpp:sm:3"');
    expect(sent()[0]).toContain('resource-constraint');

    // The post is answered; the batch timed out and comes back whole. The client took the
    // refusal: its stream has no stream management, so nothing may be queued for it to count.
    await server.sessions.endDirectPost(user, 'r', connectionId, token);
    await enable();
    expect(sent()).toHaveLength(2);
    expect(sent()[1]).toContain('<failed xmlns="urn:xmpp:sm:3"');
    expect((await server.sessions.getConnection(connectionId))?.sm).toBeUndefined();
    expect((await server.sessions.listResources(user))[0]?.smId).toBeUndefined();

    // A new <enable/> (a new frame) is the client asking again: enabled.
    await handleStreamEvent(server, {
      connectionId,
      kind: 'frame',
      frame: "<enable xmlns='urn:xmpp:sm:3' resume='true'/>",
      receivedAt: Date.now(),
      frameId: 'req-enable-2',
    });
    expect(sent().at(-1)).toContain('<enabled');
    expect((await server.sessions.listResources(user))[0]?.smId).toBeDefined();
  });
});

describe('a redelivered bind', () => {
  const BIND = 'urn:ietf:params:xml:ns:xmpp-bind';
  async function authenticated(name: string, connectedAt = Date.now()) {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    const user = `${name}${Date.now()}@localhost`;
    const connectionId = `${name}${Date.now()}`;
    await server.sessions.createConnection(connectionId, connectedAt);
    await server.sessions.updateConnection(connectionId, { streamOpen: true, user });
    const bind = (xml: string) =>
      handleStreamEvent(server, {
        connectionId,
        kind: 'frame',
        frame: xml,
        receivedAt: Date.now(),
        frameId: 'req-bind',
      });
    const sent = () => port.frames.get(connectionId) ?? [];
    return { server, user, connectionId, bind, sent };
  }

  it('binds the resource name it generated the first time, not a second one', async () => {
    const { server, user, connectionId, bind, sent } = await authenticated('gen');
    await bind(`<iq type='set' id='b1'><bind xmlns='${BIND}'/></iq>`);
    // RFC 6120 §7.6: "the server MUST generate a resourcepart on behalf of the client".
    const told = /<jid>([^<]+)<\/jid>/.exec(sent()[0] ?? '')?.[1];
    expect(told).toMatch(new RegExp(`^${user}/.+`));
    // The bind went out but the frame's save did not land (the invocation timed out after it):
    // the row is as before the frame, and the batch comes back.
    await server.sessions.updateConnection(connectionId, { resource: undefined, savedFrame: undefined });
    await bind(`<iq type='set' id='b1'><bind xmlns='${BIND}'/></iq>`);
    expect(/<jid>([^<]+)<\/jid>/.exec(sent()[1] ?? '')?.[1]).toBe(told);
    const resources = await server.sessions.listResources(user);
    expect(resources.map((r) => `${user}/${r.resource}`)).toEqual([told]);
  });

  it('answers <conflict/> again when the newer connection let the resource go in between', async () => {
    const { server, user, bind, sent } = await authenticated('late', Date.now() - 60_000);
    await server.sessions.bindResource({
      user,
      resource: 'desk',
      connectionId: 'newer',
      connectedAt: Date.now(),
      available: false,
      priority: 0,
      boundAt: Date.now(),
    });
    const restore = dieBeforeFinalSave(server);
    await expect(
      bind(`<iq type='set' id='b2'><bind xmlns='${BIND}'><resource>desk</resource></bind></iq>`),
    ).rejects.toThrow();
    restore();
    // RFC 6120 §7.7.2.2: the server may "disallow the new resource binding attempt".
    expect(sent()[0]).toContain('<conflict');
    await server.sessions.releaseResource(user, 'desk', 'newer');
    await bind(`<iq type='set' id='b2'><bind xmlns='${BIND}'><resource>desk</resource></bind></iq>`);
    expect(sent()).toHaveLength(2);
    expect(sent()[1]).toBe(sent()[0]);
    expect(await server.sessions.listResources(user)).toEqual([]);
  });
});

/**
 * Two accounts subscribed to each other ('both'), each able to log in on a connection of its own
 * (`login`: bound, not yet available), and `failReadOfOnlineOnce`: the next read of who is
 * online fails past the SDK's retries (a throttled DynamoDB), once.
 */
async function twoContacts() {
  const port = new RecordingPort();
  const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
  const { alice, bob } = await subscribedPair(server);
  const { frame, login } = frameDriver(server);
  const failReadOfOnlineOnce = () => {
    let calls = 0;
    // `presenceOf` is the read behind both (availableResourcesOf calls it).
    const original = server.sessions.presenceOf.bind(server.sessions);
    return intercept(server.sessions, 'presenceOf', async (users: string[]) => {
      if (calls++ === 0) throw throttlingError();
      return original(users);
    });
  };
  /**
   * Bob on 'bob-1' (resource home) and Alice on 'alice-1' (phone), both available; `bobSm`: Bob's
   * stream enables stream management (resumable) before its presence.
   */
  const bothOnline = async ({ bobSm = false } = {}) => {
    for (const [connectionId, user, resource] of [
      ['bob-1', bob, 'home'],
      ['alice-1', alice, 'phone'],
    ] as const) {
      await login(connectionId, user, resource);
      if (bobSm && user === bob)
        await frame(connectionId, "<enable xmlns='urn:xmpp:sm:3' resume='true'/>", `${connectionId}-enable`);
      await frame(connectionId, '<presence/>', `${connectionId}-presence`);
    }
  };
  return { port, server, alice, bob, frame, login, failReadOfOnlineOnce, bothOnline };
}

describe('a redelivered initial presence', () => {
  it('is still the initial presence: the contacts\u2019 presence is probed for and reaches the user', async () => {
    const { port, server, alice, bob, frame, login, failReadOfOnlineOnce } = await twoContacts();
    await login('bob-1', bob, 'home');
    await frame('bob-1', '<presence/>', 'bob-presence');
    await login('alice-1', alice, 'phone');
    // Alice's initial presence fails part-way, after her resource became available (DynamoDB
    // throttles the read of her contacts' resources past the SDK's retries): SQS brings it back.
    const restore = failReadOfOnlineOnce();
    await expect(frame('alice-1', '<presence/>', 'alice-presence', '900')).rejects.toThrow();
    restore();
    await frame('alice-1', '<presence/>', 'alice-presence', '900');
    // RFC 6121 §4.2.2: on initial presence the server "MUST send a presence probe [...] to each
    // contact to which the user has a subscription of type \"to\" or \"both\"", and the contact's
    // server answers with the contact's current presence.
    const fromBob = (port.frames.get('alice-1') ?? []).filter(
      (text) => text.startsWith('<presence') && text.includes(`from="${bob}/home"`),
    );
    expect(fromBob).toHaveLength(1);
    // And Bob, subscribed to Alice, is told she is available.
    const fromAlice = (port.frames.get('bob-1') ?? []).filter(
      (text) => text.startsWith('<presence') && text.includes(`from="${alice}/phone"`),
    );
    expect(fromAlice.length).toBeGreaterThanOrEqual(1);
    expect((await server.sessions.availableResourcesOf([alice])).get(alice)?.map((r) => r.resource)).toEqual([
      'phone',
    ]);
  });
});

describe('a redelivered unavailable presence whose first attempt made the resource unavailable', () => {
  const unavailableFromAlice = (sent: string[], alice: string) =>
    sent.filter(
      (text) =>
        text.startsWith('<presence') &&
        text.includes(`from="${alice}/phone"`) &&
        text.includes('type="unavailable"'),
    );

  it('still tells the contacts, once, and the session’s end tells nobody again (RFC 6121 §4.5.2)', async () => {
    const { port, server, alice, frame, failReadOfOnlineOnce, bothOnline } = await twoContacts();
    await bothOnline();
    // Alice goes unavailable; the read of her contacts' resources is throttled past the SDK's
    // retries after her resource row was written unavailable: SQS brings the frame back.
    const restore = failReadOfOnlineOnce();
    await expect(frame('alice-1', "<presence type='unavailable'/>", 'alice-off', '900')).rejects.toThrow();
    restore();
    await frame('alice-1', "<presence type='unavailable'/>", 'alice-off', '900', 2);
    // RFC 6121 §4.5.2: "the user's server MUST broadcast that presence stanza to all contacts
    // [...] that have a subscription to the user's presence".
    expect(unavailableFromAlice(port.frames.get('bob-1') ?? [], alice)).toHaveLength(1);
    expect((await server.sessions.availableResourcesOf([alice])).get(alice) ?? []).toEqual([]);
    // Her stream then closes: the end finds her unavailable and says nothing more.
    await frame('alice-1', "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>", 'alice-close', '901');
    expect(unavailableFromAlice(port.frames.get('bob-1') ?? [], alice)).toHaveLength(1);
  });

  it('keeps the time the presence reached the server, the same on its redelivery, for a contact’s probe (RFC 6121 §4.3.2)', async () => {
    const { server, alice, failReadOfOnlineOnce, bothOnline } = await twoContacts();
    await bothOnline();
    // API Gateway's time of the frame, a while before its deliveries are handled.
    const receivedAt = Date.now() - 45_000;
    const off = (receiveCount: number) =>
      handleStreamEvent(server, {
        connectionId: 'alice-1',
        kind: 'frame',
        frame: "<presence type='unavailable'><status>back soon</status></presence>",
        receivedAt,
        frameId: 'alice-off-stamped',
        seq: '950',
        receiveCount,
      });
    const restore = failReadOfOnlineOnce();
    await expect(off(1)).rejects.toThrow();
    restore();
    await off(2);
    // XEP-0203 in the probe's answer: "the time when the last unavailable presence stanza was
    // generated", not when a delivery of its frame happened to run.
    expect((await server.sessions.presenceOf([alice])).lastUnavailable.get(alice)).toEqual({
      at: receivedAt,
      presence: '<presence><status>back soon</status></presence>',
    });
  });

  it('takes the user out of the set of available resources when that failed the first time', async () => {
    const { port, server, alice, frame, bothOnline } = await twoContacts();
    await bothOnline();
    // The state the first attempt left when it died between the row's write and the set's: the
    // row unavailable, marked with the frame; the set still naming the resource.
    const doc = createDocumentClient({ endpoint: useDynamoDbLocal(), region: TEST_REGION });
    /** The user's set of available resources (the `avail` item), as stored. */
    const availableNames = async () =>
      (
        await doc.send(
          new GetCommand({
            TableName: server.config.tables.sessions,
            Key: { pk: `user#${alice}`, sk: 'avail' },
          }),
        )
      ).Item?.res;
    await doc.send(
      new UpdateCommand({
        TableName: server.config.tables.sessions,
        Key: { pk: `user#${alice}`, sk: 'res#phone' },
        UpdateExpression: 'SET available = :no, unavailableFrame = :frame REMOVE availableFrame',
        ExpressionAttributeValues: { ':no': false, ':frame': 'alice-off' },
      }),
    );
    expect(await availableNames()).toBeDefined();
    await frame('alice-1', "<presence type='unavailable'/>", 'alice-off', '900', 2);
    expect(await availableNames()).toBeUndefined();
    expect(unavailableFromAlice(port.frames.get('bob-1') ?? [], alice)).toHaveLength(1);
  });

  it('tells nobody when the resource was never available (a presence before the initial one)', async () => {
    const { port, alice, bob, frame, login } = await twoContacts();
    await login('bob-1', bob, 'home');
    await frame('bob-1', '<presence/>', 'bob-presence');
    await login('alice-1', alice, 'phone');
    for (const receiveCount of [1, 2])
      await frame('alice-1', "<presence type='unavailable'/>", 'alice-off', '900', receiveCount);
    expect(unavailableFromAlice(port.frames.get('bob-1') ?? [], alice)).toEqual([]);
  });
});

describe('a redelivered XEP-0013 remove', () => {
  const OFFLINE = 'http://jabber.org/protocol/offline';
  /** Two messages from Bob stored for Alice while she is offline; Alice then bound, not available. */
  async function twoStored() {
    const contacts = await twoContacts();
    const { server, alice, bob, frame, login } = contacts;
    await login('bob-1', bob, 'home');
    await frame('bob-1', '<presence/>', 'bob-presence');
    for (const id of ['o1', 'o2'])
      await frame(
        'bob-1',
        `<message to='${alice}' type='chat' id='${id}'><body>${id}</body></message>`,
        `bob-${id}`,
      );
    expect(await server.offline.count(alice)).toBe(2);
    await login('alice-1', alice, 'phone');
    const nodes = (await server.offline.list(alice, { limit: 10 })).messages.map((m) => m.id);
    const items = nodes.map((node) => `<item action='remove' node='${node}'/>`).join('');
    const remove = `<iq type='set' id='orm'><offline xmlns='${OFFLINE}'>${items}</offline></iq>`;
    const answers = () =>
      (contacts.port.frames.get('alice-1') ?? []).filter((text) => text.includes('id="orm"'));
    return { ...contacts, remove, answers };
  }

  it('answers a result again, not item-not-found, when its first attempt removed the messages', async () => {
    const { port, server, alice, frame, remove, answers } = await twoStored();
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', remove, 'alice-orm', '900')).rejects.toThrow();
    restore();
    await frame('alice-1', remove, 'alice-orm', '900', 2);
    // XEP-0013 §2.4: "the server MUST remove the messages and return an IQ result"; its post
    // may not have reached the client the first time.
    expect(answers().map((text) => /type="(\w+)"/.exec(text)?.[1])).toEqual(['result', 'result']);
    expect(await server.offline.count(alice)).toBe(0);
    // Saved with the frame: a later remove of a node that is gone is item-not-found again.
    await frame('alice-1', remove.replace("id='orm'", "id='orm2'"), 'alice-orm2', '901');
    const later = (port.frames.get('alice-1') ?? []).filter((text) => text.includes('id="orm2"'));
    expect(later).toHaveLength(1);
    expect(later[0]).toMatch(/type="error"[\s\S]*<item-not-found/);
  });

  it('removes what its first attempt left, when that failed part-way, and answers a result', async () => {
    const { server, alice, frame, remove, answers } = await twoStored();
    let deletes = 0;
    const original = server.offline.remove.bind(server.offline);
    const restore = intercept(server.offline, 'remove', async (user: string, ids: string[]) => {
      // The first message is deleted, then DynamoDB throttles past the SDK's retries.
      if (deletes++ === 0) {
        await original(user, ids.slice(0, 1));
        throw throttlingError();
      }
      return original(user, ids);
    });
    await expect(frame('alice-1', remove, 'alice-orm', '900')).rejects.toThrow();
    restore();
    expect((await server.offline.list(alice, { limit: 10 })).messages).toHaveLength(1);
    await frame('alice-1', remove, 'alice-orm', '900', 2);
    expect(answers().map((text) => /type="(\w+)"/.exec(text)?.[1])).toEqual(['result']);
    expect((await server.offline.list(alice, { limit: 10 })).messages).toEqual([]);
  });
});

describe('a redelivered message its first attempt queued in a stream-management session', () => {
  it('is not stored again behind a flood that took the resource since: the session has it', async () => {
    const { server, bob, frame, bothOnline } = await twoContacts();
    await bothOnline({ bobSm: true });
    const smId = (await server.sessions.listResources(bob))[0]?.smId;
    expect(smId).toBeDefined();
    const queued = async () =>
      ((await server.smQueue.get(smId as string))?.entries ?? []).filter((entry) =>
        (entry.s ?? '').includes('only-once'),
      );
    // Alice's message is queued for Bob's session; her invocation dies before its last save.
    const message = `<message to='${bob}' type='chat' id='m1'><body>only-once</body></message>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', message, 'alice-m1', '900')).rejects.toThrow();
    restore();
    expect(await queued()).toHaveLength(1);
    // Meanwhile Bob's resource is held by a flood of his offline messages (its presence took the
    // hold), and the batch comes back: the message is in his session's queue already.
    await server.sessions.updatePresence(bob, 'home', 'bob-1', { available: true, priority: 0, hold: true });
    await frame('alice-1', message, 'alice-m1', '900', 2);
    // Not stored behind the hold: the flood would send Bob a second copy (XEP-0198 §5's
    // acknowledgements cannot tell the two apart).
    expect(await server.offline.count(bob)).toBe(0);
    expect(await queued()).toHaveLength(1);
    // A new message of hers, while the hold stands, is stored for the flood as before.
    await frame(
      'alice-1',
      `<message to='${bob}' type='chat' id='m2'><body>behind</body></message>`,
      'alice-m2',
      '901',
    );
    expect(await server.offline.count(bob)).toBe(1);
  });
});

describe('a redelivered message whose recipient session ended after its first attempt queued it', () => {
  it('is not routed a second time: the end re-routed the queued copy', async () => {
    const { server, bob, frame, login, bothOnline } = await twoContacts();
    await bothOnline({ bobSm: true });
    const message = `<message to='${bob}' type='chat' id='m1'><body>only-once</body></message>`;
    const restore = dieBeforeFinalSave(server);
    await expect(frame('alice-1', message, 'alice-m1', '900')).rejects.toThrow();
    restore();
    // Bob's client starts anew (no resume): binding his resource again ends the old session, and
    // its queue, the message in it, is re-routed: to storage, his new stream not available yet.
    await login('bob-2', bob, 'home');
    expect(await server.offline.count(bob)).toBe(1);
    // Alice's batch comes back.
    await frame('alice-1', message, 'alice-m1', '900', 2);
    expect(await server.offline.count(bob)).toBe(1);
  });
});

describe('a bind that takes over a resource whose presence changed after it was recorded', () => {
  it('ends the session as the row was when taken: its contacts are told it is unavailable', async () => {
    const { port, server, alice, bob, frame, login } = await twoContacts();
    await login('alice-1', alice, 'phone');
    await frame('alice-1', '<presence/>', 'alice-presence');
    await login('bob-1', bob, 'home');
    // Bob's second stream binds the same resource. The takeover is recorded while bob-1 is not
    // available yet; bob-1's initial presence lands before the write that takes the row.
    await server.sessions.createConnection('bob-2', Date.now() + 1);
    await server.sessions.updateConnection('bob-2', { streamOpen: true, user: bob });
    const original = server.sessions.bindResource.bind(server.sessions);
    const restore = intercept(server.sessions, 'bindResource', (record, beforeTakeover) =>
      original(record, async (held) => {
        await beforeTakeover?.(held);
        if (held.connectionId === 'bob-1') await frame('bob-1', '<presence/>', 'bob-presence');
      }),
    );
    try {
      await frame(
        'bob-2',
        "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>home</resource></bind></iq>",
        'bob-2-bind',
      );
    } finally {
      restore();
    }
    const toAlice = (port.frames.get('alice-1') ?? []).filter((text) => text.includes(`from="${bob}/home"`));
    expect(toAlice.some((text) => text.startsWith('<presence') && !text.includes('type='))).toBe(true);
    // RFC 6121 §4.5.2: the replaced session's end is its unavailable presence to the contacts
    // that were told it was available.
    expect(toAlice.at(-1)).toContain('type="unavailable"');
  });
});

describe('a redelivered subscription presence whose change was written', () => {
  it('still tells the contact: the transition is taken from the outcome, not decided again', async () => {
    const { port, server, alice, bob, frame, failReadOfOnlineOnce, bothOnline } = await twoContacts();
    await bothOnline();
    // Alice cancels Bob's subscription to her presence; the change is written, then the read of
    // who is online fails past the SDK's retries.
    const cancel = `<presence to='${bob}' type='unsubscribed'/>`;
    const restore = failReadOfOnlineOnce();
    const sentBefore = (port.frames.get('bob-1') ?? []).length;
    await expect(frame('alice-1', cancel, 'alice-cancel', '900')).rejects.toThrow();
    restore();
    expect((await server.roster.getEntry(alice, bob))?.subscription).toBe('to');
    await frame('alice-1', cancel, 'alice-cancel', '900');
    const toBob = (port.frames.get('bob-1') ?? []).slice(sentBefore);
    // RFC 6121 §3.2: the 'unsubscribed' reaches the contact's available resources (§3.2.3), and
    // the user's server sends the contact unavailable presence from each of the user's available
    // resources (§3.2.2).
    expect(toBob.filter((text) => text.includes('type="unsubscribed"'))).toHaveLength(1);
    expect(
      toBob.filter((text) => text.includes('type="unavailable"') && text.includes(`${alice}/phone`)),
    ).toHaveLength(1);
  });
});

describe('a redelivered roster removal whose change was written', () => {
  it('does the rest from the outcome written with it: the contact is told, the user gets a result', async () => {
    const { port, server, alice, bob, frame, failReadOfOnlineOnce, bothOnline } = await twoContacts();
    await bothOnline();
    const remove = `<iq type='set' id='rm1'><query xmlns='jabber:iq:roster'><item jid='${bob}' subscription='remove'/></query></iq>`;
    // The removal is written, then the read of who is online fails past the SDK's retries.
    const restore = failReadOfOnlineOnce();
    const sentBefore = (port.frames.get('bob-1') ?? []).length;
    await expect(frame('alice-1', remove, 'alice-remove', '900')).rejects.toThrow();
    restore();
    expect(await server.roster.getEntry(alice, bob)).toBeUndefined();
    await frame('alice-1', remove, 'alice-remove', '900');
    const toAlice = port.frames.get('alice-1') ?? [];
    const answer = toAlice.filter((text) => text.includes('id="rm1"'));
    // RFC 6121 §2.5.2: the server "MUST [...] return an IQ result to the initiating resource".
    expect(answer).toHaveLength(1);
    expect(answer[0]).toContain('type="result"');
    // §2.5.2: "the user's server MUST [...] send a presence stanza of type \"unsubscribe\" to the
    // contact" and "a presence stanza of type \"unsubscribed\" to the contact".
    const toBob = (port.frames.get('bob-1') ?? []).slice(sentBefore);
    expect(toBob.filter((text) => text.includes('type="unsubscribe"'))).toHaveLength(1);
    expect(toBob.filter((text) => text.includes('type="unsubscribed"'))).toHaveLength(1);
  });
});

describe('a redelivered SASL <success/>', () => {
  it('is the same <success/> again, though the limits would refuse a new attempt from the address now', async () => {
    /** Records every post; the one matching `failOn` is then answered with an error, once. */
    class FlakyPort extends RecordingPort {
      failOn: string | undefined;
      override async post(connectionId: string, data: string, notAfter?: number) {
        const result = await super.post(connectionId, data, notAfter);
        if (this.failOn && data.includes(this.failOn)) {
          this.failOn = undefined;
          throw new RetryLaterError('the post was answered with an error after it went out');
        }
        return result;
      }
    }
    const port = new FlakyPort();
    const server = createServer({
      config: await createTestConfig({ AUTH_FAILURES_PER_ADDRESS: '2' }),
      port,
      log: createLogger('silent'),
    });
    const account = `pat${Date.now()}@localhost`;
    await server.users.create(account, await deriveCredentialSet('pw', 4096));
    const address = `198.51.100.${Math.floor(Math.random() * 200) + 1}`;
    const connectionId = `plain${Date.now()}`;
    await server.sessions.createConnection(connectionId, Date.now(), address);
    await server.sessions.updateConnection(connectionId, { streamOpen: true });
    const auth = `<auth xmlns='${SASL}' mechanism='PLAIN'>${Buffer.from(`\0${account.split('@')[0]}\0pw`).toString('base64')}</auth>`;
    const frame = () =>
      handleStreamEvent(server, {
        connectionId,
        kind: 'frame',
        frame: auth,
        receivedAt: Date.now(),
        frameId: 'req-auth',
      });
    port.failOn = '<success';
    await expect(frame()).rejects.toThrow(RetryLaterError);
    // Meanwhile other connections from the address fail to log in, up to its limit.
    for (let i = 0; i < 2; i++) await server.users.recordAddressFailure(address, 300);
    await frame();
    const sent = port.frames.get(connectionId) ?? [];
    // RFC 6120 §6.4.6: the client was told <success/>; it is told the same, never a failure.
    expect(sent).toHaveLength(2);
    expect(sent[1]).toBe(sent[0]);
    expect(sent[1]).toContain('<success');
    expect((await server.sessions.getConnection(connectionId))?.user).toBe(account);
    // Answered to the end this time, the frame is marked handled: a further delivery (a lost
    // delete) is skipped, not answered a third time.
    await frame();
    expect(port.frames.get(connectionId)).toHaveLength(2);
    expect(await server.sessions.getConnection(connectionId)).toMatchObject({ savedFrame: 'req-auth' });
  });
});

describe('a redelivered SASL attempt whose first delivery died before its answer was saved', () => {
  /**
   * PLAIN for `account` from a fresh address on a fresh connection, whose answer's save (the
   * write before `<success/>` or `<failure/>` goes out) fails once past the SDK's retries: SQS
   * redelivers the frame, and it is handled again.
   */
  async function attemptDyingOnce(password: string) {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    const account = `sam${Date.now()}${Math.floor(Math.random() * 1e6)}@localhost`;
    await server.users.create(account, await deriveCredentialSet('right', 4096));
    const address = `198.51.100.${Math.floor(Math.random() * 200) + 1}`;
    const connectionId = `sasl${Date.now()}${Math.floor(Math.random() * 1e6)}`;
    await server.sessions.createConnection(connectionId, Date.now(), address);
    await server.sessions.updateConnection(connectionId, { streamOpen: true });
    const before = {
      address: await server.users.addressFailures(address),
      account: await server.users.authFailures(account),
    };
    const auth = `<auth xmlns='${SASL}' mechanism='PLAIN'>${Buffer.from(`\0${account.split('@')[0]}\0${password}`).toString('base64')}</auth>`;
    const frame = (receiveCount: number) =>
      handleStreamEvent(server, {
        connectionId,
        kind: 'frame',
        frame: auth,
        receivedAt: Date.now(),
        frameId: 'req-sasl',
        receiveCount,
      });
    const original = server.sessions.updateConnection.bind(server.sessions);
    const restore = intercept(server.sessions, 'updateConnection', async (id, changes, options) => {
      if ('answeredFrame' in changes) {
        restore();
        throw serverError();
      }
      return original(id, changes, options);
    });
    await expect(frame(1)).rejects.toThrow();
    restore();
    await frame(2);
    return { server, port, connectionId, account, address, before };
  }

  it('counts a failure once on the address and the account, not once per delivery', async () => {
    const { server, port, connectionId, account, address, before } = await attemptDyingOnce('wrong');
    expect(before).toEqual({ address: 0, account: 0 });
    // RFC 6120 §6.4.5: the client is told <not-authorized/>, once.
    const sent = port.frames.get(connectionId) ?? [];
    expect(sent).toHaveLength(1);
    expect(sent[0]).toContain('<not-authorized');
    // One attempt, one failure each: the limits count what the client did, not what SQS did.
    expect(await server.users.addressFailures(address)).toBe(1);
    expect(await server.users.authFailures(account)).toBe(1);
  });

  it('leaves nothing counted after a success', async () => {
    const { server, port, connectionId, account, address } = await attemptDyingOnce('right');
    expect((port.frames.get(connectionId) ?? []).at(-1)).toContain('<success');
    expect(await server.users.addressFailures(address)).toBe(0);
    expect(await server.users.authFailures(account)).toBe(0);
  });
});

describe('a redelivered stanza frame', () => {
  it('stores a message stamped with the time its frame reached the server, on every delivery (XEP-0203)', async () => {
    // XEP-0203 §3: 'stamp' is "The time when the XML stanza was originally sent"; for what the
    // server stores offline, when it received it: API Gateway's time of the frame, not when a
    // delivery of the frame (after a queue backlog, or again after a failure) handled it.
    const { server, recipient } = await boundSenderAndRecipient('t1', 'iris', 'jon');
    const receivedAt = Date.now() - 45_000;
    await handleStreamEvent(server, {
      connectionId: 't1',
      kind: 'frame',
      frame: `<message xmlns='jabber:client' to='${recipient}' type='chat'><body>late</body></message>`,
      receivedAt,
      frameId: 'late-1',
      seq: '700',
    });
    const [stored] = (await server.offline.list(recipient)).messages;
    expect(stored?.storedAt).toBe(receivedAt);
  });

  it('is skipped when it, or a later frame of the connection, was handled to the end', async () => {
    const { server, recipient } = await boundSenderAndRecipient('s1', 'alice', 'bob');
    const message = (n: number) =>
      `<message xmlns='jabber:client' to='${recipient}' type='chat' id='m${n}'><body>${n}</body></message>`;
    const frame = (frameId: string, seq: string, xml: string, receiveCount = 1) =>
      handleStreamEvent(server, {
        connectionId: 's1',
        kind: 'frame',
        frame: xml,
        receivedAt: FRAME_TIME,
        frameId,
        seq,
        receiveCount,
      });
    const stored = async () =>
      (await server.offline.list(recipient)).messages.map((m) => /<body>(\d+)</.exec(m.stanza)?.[1]);

    // bob has no session: XEP-0160 stores the message.
    await frame('f1', '18880000000000000100', message(1));
    expect(await stored()).toEqual(['1']);
    expect((await server.sessions.getConnection('s1'))?.doneSeq).toBe('18880000000000000100');

    // The lost delete: the same message again, after its work was done.
    await frame('f1', '18880000000000000100', message(1), 2);
    expect(await stored()).toEqual(['1']);

    // A failure after the store, before the frame was marked done: the redelivery finds the
    // message stored under the frame's key and does not store it again.
    await frame('f2', '18880000000000000105', message(2));
    await server.sessions.updateConnection('s1', { doneSeq: '18880000000000000100' });
    await frame('f2', '18880000000000000105', message(2), 2);
    expect(await stored()).toEqual(['1', '2']);

    // A timed-out batch comes back whole: its earlier frame after the later one was marked done.
    await frame('f3', '18880000000000000107', message(3));
    await frame('f2', '18880000000000000105', message(2), 3);
    expect(await stored()).toEqual(['1', '2', '3']);
    // Frames of the same millisecond keep the sender's order (their sequence numbers).
    expect(await server.offline.count(recipient)).toBe(3);
  });
});

describe('the record of a message stored offline (storedOffline on the sender’s row)', () => {
  it('is written with the store, survives a frame that failed after it, and goes with the done mark', async () => {
    const { server, recipient } = await boundSenderAndRecipient('o1', 'gina', 'hal');
    const frame = (frameId: string, seq: string, body: string, receiveCount = 1) =>
      handleStreamEvent(server, {
        connectionId: 'o1',
        kind: 'frame',
        frame: `<message xmlns='jabber:client' to='${recipient}' type='chat'><body>${body}</body></message>`,
        receivedAt: FRAME_TIME,
        frameId,
        seq,
        receiveCount,
      });
    const row = () => server.sessions.getConnection('o1');
    const offline = server.offline;
    const store = offline.store.bind(offline);
    // The store runs, and its answer is lost (500s after the write): the frame fails.
    const restore = intercept(offline, 'store', async (...args) => {
      await store(...args);
      throw serverError();
    });
    try {
      await expect(frame('k1', '18880000000000000200', 'kept')).rejects.toThrow('Internal server error');
    } finally {
      restore();
    }
    expect((await row())?.storedOffline).toBe(`k1 ${recipient}`);
    expect((await row())?.doneSeq).toBeUndefined();
    // The redelivery: stored already, so not routed again; done, and the record goes with the mark.
    await frame('k1', '18880000000000000200', 'kept', 2);
    expect((await row())?.doneSeq).toBe('18880000000000000200');
    expect((await row())?.storedOffline).toBeUndefined();
    expect(await offline.count(recipient)).toBe(1);
    // A store answered at once: the frame's own done mark removes its record in the same write.
    await frame('k2', '18880000000000000201', 'next');
    expect((await row())?.storedOffline).toBeUndefined();
    expect(await offline.count(recipient)).toBe(2);
  });
});

describe('a stanza counted before its stream was resumed elsewhere', () => {
  it('is still routed when its frame comes back; one not counted is stopped by the fence', async () => {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    const sender = `carl${Date.now()}@localhost`;
    const recipient = `dora${Date.now()}@localhost`;
    await server.users.create(recipient, await deriveCredentialSet('pw', 4096));
    await server.sessions.createConnection('old', Date.now());
    // The old stream counted frame 300 (XEP-0198 writes the count before routing), then its
    // routing failed and the frame went back to the queue; meanwhile a post elsewhere met a 410
    // on its socket: the session detached with h = 1, which a resume will report, so the
    // client will not resend it.
    await server.sessions.updateConnection('old', {
      streamOpen: true,
      user: sender,
      resource: 'r',
      sm: { version: 'sm3', id: 'sm-old', inbound: 1, acked: 0, resumable: true, max: 300 },
      countedFrame: 'f300',
      countedSeq: '300',
    });
    await server.smQueue.create({
      smId: 'sm-old',
      user: sender,
      resource: 'r',
      version: 'sm3',
      resumable: true,
      max: 300,
      connectionId: 'old',
    });
    await server.host.fire('connection-vanished', { connectionId: 'old' });
    expect((await server.smQueue.get('sm-old'))?.inbound).toBe(1);
    const frame = (frameId: string, seq: string, body: string) =>
      handleStreamEvent(server, {
        connectionId: 'old',
        kind: 'frame',
        frame: `<message xmlns='jabber:client' to='${recipient}' type='chat'><body>${body}</body></message>`,
        receivedAt: Date.now(),
        frameId,
        seq,
        receiveCount: 2,
      });
    await frame('f300', '300', 'counted');
    // Not counted before the fence: the client resends it on its new stream.
    await frame('f301', '301', 'not counted');
    const bodies = (await server.offline.list(recipient)).messages.map(
      (m) => /<body>([^<]*)</.exec(m.stanza)?.[1],
    );
    expect(bodies).toEqual(['counted']);
  });
});

describe('a stanza whose count landed just before a resume fenced its stream', () => {
  it('is routed: the count DynamoDB ran is in the h the resume reports, though the write answered with the fence', async () => {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    const sender = `hugo${Date.now()}@localhost`;
    const recipient = `iris${Date.now()}@localhost`;
    await server.users.create(recipient, await deriveCredentialSet('pw', 4096));
    await server.sessions.createConnection('fenced', Date.now());
    await server.sessions.updateConnection('fenced', {
      streamOpen: true,
      user: sender,
      resource: 'r',
      sm: { version: 'sm3', id: 'sm-fenced', inbound: 0, acked: 0, resumable: true, max: 300 },
    });
    await server.smQueue.create({
      smId: 'sm-fenced',
      user: sender,
      resource: 'r',
      version: 'sm3',
      resumable: true,
      max: 300,
      connectionId: 'fenced',
    });
    // DynamoDB runs the count, answers with a 500; before the SDK's resend a resume fences the
    // row (reading h = 1 from it), and the resend meets the fence.
    const update = server.sessions.updateConnection.bind(server.sessions);
    // Read inside the server's frame handler and checked after it: an assertion failing there
    // would end up as the frame's internal-server-error.
    let fencedInbound: number | undefined;
    const restore = intercept(server.sessions, 'updateConnection', async (connectionId, changes, options) => {
      if (options?.unlessFenced && changes.countedFrame) {
        await update(connectionId, changes, options);
        const fenced = await server.sessions.fenceConnection(connectionId);
        fencedInbound = fenced?.sm?.inbound;
        throw new ConnectionFencedError(connectionId);
      }
      return update(connectionId, changes, options);
    });
    try {
      await handleStreamEvent(server, {
        connectionId: 'fenced',
        kind: 'frame',
        frame: `<message xmlns='jabber:client' to='${recipient}' type='chat'><body>counted</body></message>`,
        receivedAt: Date.now(),
        frameId: 'f-count',
        seq: '900',
      });
    } finally {
      restore();
    }
    // The resume's fence read h = 1: the count had landed.
    expect(fencedInbound).toBe(1);
    const bodies = (await server.offline.list(recipient)).messages.map(
      (m) => /<body>([^<]*)</.exec(m.stanza)?.[1],
    );
    expect(bodies).toEqual(['counted']);
  });
});

describe('a resume whose socket vanished after it attached the session, before its stream saved it', () => {
  it('ends that session on the $disconnect and re-routes what it held, instead of holding it for a dead socket', async () => {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    const user = `jude${Date.now()}@localhost`;
    await server.users.create(user, await deriveCredentialSet('pw', 4096));
    await server.smQueue.create({
      smId: 'sm-abandoned',
      user,
      resource: 'r',
      version: 'sm3',
      resumable: true,
      max: 300,
      connectionId: 'old',
    });
    await server.smQueue.release('sm-abandoned', 0);
    // The resume's stream recorded what it was taking over, then attached it (holding)...
    await server.sessions.createConnection('resumer', Date.now());
    await server.sessions.updateConnection('resumer', { streamOpen: true, user, resuming: 'sm-abandoned' });
    expect(await server.smQueue.attach('sm-abandoned', user, 'resumer', 0)).toBeDefined();
    // ...and a message queued for the session meanwhile waits behind the hold.
    await server.smQueue.append(
      'sm-abandoned',
      {
        s: `<message xmlns='jabber:client' to='${user}/r' type='chat'><body>held</body></message>`,
        t: Date.now(),
        k: 'h:0',
      },
      100,
    );
    // The socket is gone before the stream saved the session.
    await server.host.fire('connection-vanished', { connectionId: 'resumer', disconnected: true });
    expect((await server.smQueue.get('sm-abandoned'))?.ended).toBe(true);
    const bodies = (await server.offline.list(user)).messages.map(
      (m) => /<body>([^<]*)</.exec(m.stanza)?.[1],
    );
    expect(bodies).toEqual(['held']);
  });
});

describe('FRAME_DONE_MARKS=batched', () => {
  it('marks only a frame another record follows in the batch; keyed writes still hold', async () => {
    const { server, recipient } = await boundSenderAndRecipient('b1', 'erin', 'finn', {
      FRAME_DONE_MARKS: 'batched',
    });
    const frame = (
      frameId: string,
      seq: string,
      body: string,
      extra: { receiveCount?: number; followed?: boolean } = {},
    ) =>
      handleStreamEvent(server, {
        connectionId: 'b1',
        kind: 'frame',
        frame: `<message xmlns='jabber:client' to='${recipient}' type='chat'><body>${body}</body></message>`,
        receivedAt: FRAME_TIME,
        frameId,
        seq,
        ...extra,
      });
    // Alone in its batch (chat pace): no write beyond the store itself.
    await frame('g1', '500', 'one');
    expect((await server.sessions.getConnection('b1'))?.doneSeq).toBeUndefined();
    // Its lost delete brings it back: the keyed store finds it stored.
    await frame('g1', '500', 'one', { receiveCount: 2 });
    // Followed by another record of the batch: marked, so a timed-out batch skips it.
    await frame('g2', '501', 'two', { followed: true });
    expect((await server.sessions.getConnection('b1'))?.doneSeq).toBe('501');
    const bodies = (await server.offline.list(recipient)).messages.map(
      (m) => /<body>([^<]*)</.exec(m.stanza)?.[1],
    );
    expect(bodies).toEqual(['one', 'two']);
  });
});

describe('a redelivered SCRAM <auth/> whose challenge went out but whose state was not saved', () => {
  it('sends the same challenge again: the answer to the first succeeds, and a second answer is ignored', async () => {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    const user = `gail${Date.now()}`;
    await server.users.create(`${user}@localhost`, await deriveCredentialSet('gail-pw', 4096));
    await server.sessions.createConnection('a1', Date.now());
    const frame = (frameId: string, xml: string, receiveCount = 1) =>
      handleStreamEvent(server, {
        connectionId: 'a1',
        kind: 'frame',
        frame: xml,
        receivedAt: Date.now(),
        frameId,
        receiveCount,
      });
    const sent = () => port.frames.get('a1') ?? [];
    const challenges = () =>
      sent()
        .filter((data) => data.startsWith('<challenge'))
        .map((data) => Buffer.from(/>([^<]*)</.exec(data)?.[1] ?? '', 'base64').toString());
    await frame('h1', OPEN);

    const clientFirst = scramClientFirst(user, 'fyi6HkHOPvdt0kE7rqBZLO3M');
    const auth = `<auth xmlns='${SASL}' mechanism='SCRAM-SHA-256'>${Buffer.from(clientFirst).toString('base64')}</auth>`;
    // The save after the challenge meets errors past its retries: the frame goes back to the queue.
    const update = server.sessions.updateConnection.bind(server.sessions);
    const restore = intercept(server.sessions, 'updateConnection', async (connectionId, changes, options) => {
      if (changes.sasl) throw throttlingError();
      return update(connectionId, changes, options);
    });
    try {
      await expect(frame('h2', auth)).rejects.toMatchObject({ name: 'ThrottlingException' });
    } finally {
      restore();
    }
    await frame('h2', auth, 2);
    const [first, again] = challenges();
    expect(again).toBe(first);

    // RFC 5802 §3: the client's proof covers the server-first-message it received first.
    const final = scramClientFinal({ hash: 'sha256', password: 'gail-pw', clientFirst, serverFirst: first });
    const response = (payload: string) => `<response xmlns='${SASL}'>${payload}</response>`;
    await frame('h3', response(Buffer.from(final.message).toString('base64')));
    expect(sent().at(-1)).toMatch(/^<success/);
    // xmpp.js answers the second challenge with an empty <response/>: no failure, no stream error.
    const before = sent().length;
    await frame('h4', response(''));
    expect(sent()).toHaveLength(before);
    await frame('h5', OPEN);
    expect(sent().at(-1)).toContain('urn:ietf:params:xml:ns:xmpp-bind');
    expect((await server.sessions.getConnection('a1'))?.user).toBe(`${user}@localhost`);
  });

  /** A stream at the SCRAM challenge, its `<auth/>` handled twice or once; what it sent so far. */
  async function atChallenge(connectionId: string, authDeliveries: 1 | 2) {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    const user = `hal${Date.now()}${connectionId}`;
    await server.users.create(`${user}@localhost`, await deriveCredentialSet('hal-pw', 4096));
    await server.sessions.createConnection(connectionId, Date.now());
    const frame = (frameId: string, xml: string, receiveCount = 1) =>
      handleStreamEvent(server, {
        connectionId,
        kind: 'frame',
        frame: xml,
        receivedAt: Date.now(),
        frameId,
        receiveCount,
      });
    const sent = () => port.frames.get(connectionId) ?? [];
    await frame('k1', OPEN);
    const clientFirst = scramClientFirst(user, 'rOprNGfwEbeRWgbNEkqO');
    const auth = `<auth xmlns='${SASL}' mechanism='SCRAM-SHA-256'>${Buffer.from(clientFirst).toString('base64')}</auth>`;
    if (authDeliveries === 2) {
      // The save after the challenge fails past its retries; the frame's second delivery follows.
      const update = server.sessions.updateConnection.bind(server.sessions);
      const restore = intercept(server.sessions, 'updateConnection', async (id, changes, options) => {
        if (changes.sasl) throw throttlingError();
        return update(id, changes, options);
      });
      await expect(frame('k2', auth)).rejects.toMatchObject({ name: 'ThrottlingException' });
      restore();
    }
    await frame('k2', auth, authDeliveries);
    expect(sent().filter((data) => data.startsWith('<challenge'))).toHaveLength(authDeliveries);
    const serverFirst = Buffer.from(
      /<challenge[^>]*>([^<]*)</.exec(sent().find((data) => data.startsWith('<challenge')) ?? '')?.[1] ?? '',
      'base64',
    ).toString();
    const final = scramClientFinal({ hash: 'sha256', password: 'hal-pw', clientFirst, serverFirst });
    return { server, user, frame, sent, proof: Buffer.from(final.message).toString('base64') };
  }
  const response = (payload: string) => `<response xmlns='${SASL}'>${payload}</response>`;

  it('ignores the empty answer to the copy when it arrives before the proof (xmpp.js computes the proof asynchronously)', async () => {
    const { server, user, frame, sent, proof } = await atChallenge('a2', 2);
    const before = sent().length;
    await frame('k3', response(''));
    expect(sent()).toHaveLength(before);
    await frame('k4', response(proof));
    expect(sent().at(-1)).toMatch(/^<success/);
    expect((await server.sessions.getConnection('a2'))?.user).toBe(`${user}@localhost`);
  });

  it('still refuses an empty client-final message when the challenge went out once (RFC 5802 §7)', async () => {
    const { frame, sent } = await atChallenge('a3', 1);
    await frame('k3', response(''));
    expect(sent().at(-1)).toMatch(/^<failure[^>]*><malformed-request\/>/);
  });
});

/**
 * Seed 2 of a session-17 fault run: a bind that took over a resource whose row named a detached
 * XEP-0198 session failed right after (a throttled write later in the frame); its redelivery
 * found the row already its own and never ended that session, whose 40 stanzas waited for its
 * resumption window to close (the client that could resume it never got its id).
 */
const BIND = 'urn:ietf:params:xml:ns:xmpp-bind';
const bindFrame = (resource: string) =>
  `<iq type='set' id='bind'><bind xmlns='${BIND}'><resource>${resource}</resource></bind></iq>`;

async function takeoverScenario(failBindOnce: boolean, overtaken = false) {
  const port = new RecordingPort();
  const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
  const stamp = `${Date.now()}${Math.floor(Math.random() * 1000)}`;
  const bob = `bob${stamp}@localhost`;
  const alice = `alice${stamp}@localhost`;
  for (const user of [alice, bob]) await server.users.create(user, await deriveCredentialSet('pw', 4096));
  const frame = (connectionId: string, xml: string, frameId: string) =>
    handleStreamEvent(server, { connectionId, kind: 'frame', frame: xml, receivedAt: Date.now(), frameId });
  const open = async (connectionId: string, user: string, connectedAt: number) => {
    await server.sessions.createConnection(connectionId, connectedAt);
    await server.sessions.updateConnection(connectionId, { streamOpen: true, user });
  };

  // Bob's stream 2: bound, stream management enabled; then its socket dies. (In the run its
  // <enabled/> had met the 410 already; such a session is now ended at once, see below.)
  const old = `old${stamp}`;
  await open(old, bob, Date.now() - 10_000);
  await frame(old, bindFrame('faults'), 'old-bind');
  await frame(old, "<enable xmlns='urn:xmpp:sm:3' resume='true'/>", 'old-enable');
  port.gone.add(old);
  const smId = (await server.sessions.getConnection(old))?.sm?.id as string;
  expect(smId).toBeDefined();

  // Alice's message is queued for it; its post meets the 410 and the session detaches.
  const sender = `alice-1-${stamp}`;
  await open(sender, alice, Date.now() - 10_000);
  await frame(sender, bindFrame('phone'), 'alice-bind');
  await frame(
    sender,
    `<message to='${bob}/faults' id='alice-18' type='chat'><body>alice-18</body></message>`,
    'a18',
  );
  const detached = await server.smQueue.get(smId);
  expect(detached?.connectionId).toBeUndefined();
  expect(detached?.ended).toBeFalsy();
  expect(detached?.entries).toHaveLength(1);

  // Bob's stream 3 binds the same resource (RFC 6120 §7.7.2.2, policy "override").
  const next = `new${stamp}`;
  await open(next, bob, Date.now());
  if (failBindOnce) {
    // The takeover's PutItem lands; the next write of the frame (its availability's sync) is
    // throttled past the SDK's retries; the batch is redelivered.
    const original = server.sessions.bindResource.bind(server.sessions);
    let failed = false;
    const restore = intercept(server.sessions, 'bindResource', async (record, beforeTakeover) => {
      const previous = await original(record, beforeTakeover);
      if (!failed) {
        failed = true;
        throw throttlingError();
      }
      return previous;
    });
    await expect(frame(next, bindFrame('faults'), 'new-bind')).rejects.toThrow();
    restore();
  }
  if (overtaken) {
    // Before the redelivery, a third stream of Bob's binds the resource, taking it from the
    // second (whose redelivered bind then stops at its fenced row).
    const third = `third${stamp}`;
    await open(third, bob, Date.now() + 1);
    await frame(third, bindFrame('faults'), 'third-bind');
    expect(port.frames.get(third)?.at(-1)).toContain(`<jid>${bob}/faults</jid>`);
  }
  await frame(next, bindFrame('faults'), 'new-bind');
  if (!overtaken) expect(port.frames.get(next)?.at(-1)).toContain(`<jid>${bob}/faults</jid>`);
  return { server, bob, smId };
}

describe('a bind that takes over a detached stream-management session’s resource', () => {
  it('ends it and re-routes what it held (control: no fault)', async () => {
    const { server, bob, smId } = await takeoverScenario(false);
    expect((await server.smQueue.get(smId))?.ended).toBe(true);
    const bodies = (await server.offline.list(bob)).messages.map((m) => /<body>([^<]*)</.exec(m.stanza)?.[1]);
    expect(bodies).toEqual(['alice-18']);
  });

  it('still ends it when the first attempt of the bind failed after taking the row', async () => {
    const { server, bob, smId } = await takeoverScenario(true);
    expect((await server.smQueue.get(smId))?.ended).toBe(true);
    const bodies = (await server.offline.list(bob)).messages.map((m) => /<body>([^<]*)</.exec(m.stanza)?.[1]);
    expect(bodies).toEqual(['alice-18']);
  });

  it('is ended by a newer bind that takes the row before the failed one is redelivered', async () => {
    const { server, bob, smId } = await takeoverScenario(true, true);
    expect((await server.smQueue.get(smId))?.ended).toBe(true);
    const bodies = (await server.offline.list(bob)).messages.map((m) => /<body>([^<]*)</.exec(m.stanza)?.[1]);
    expect(bodies).toEqual(['alice-18']);
  });
});

describe('an <enable/> whose <enabled/> meets 410 Gone', () => {
  it('ends the session at once: its client never got the id, so nothing waits for a resume', async () => {
    const port = new RecordingPort();
    const server = createServer({ config: await createTestConfig(), port, log: createLogger('silent') });
    const stamp = `${Date.now()}${Math.floor(Math.random() * 1000)}`;
    const bob = `bob${stamp}@localhost`;
    await server.users.create(bob, await deriveCredentialSet('pw', 4096));
    const connectionId = `gone${stamp}`;
    await server.sessions.createConnection(connectionId, Date.now());
    await server.sessions.updateConnection(connectionId, { streamOpen: true, user: bob });
    const frame = (xml: string, frameId: string) =>
      handleStreamEvent(server, { connectionId, kind: 'frame', frame: xml, receivedAt: Date.now(), frameId });
    await frame(bindFrame('faults'), 'bind');
    // The client's socket is cut before the server handles its <enable/>.
    port.gone.add(connectionId);
    await frame("<enable xmlns='urn:xmpp:sm:3' resume='true'/>", 'enable');
    const smId = (await server.sessions.getConnection(connectionId))?.sm?.id;
    expect(smId).toBeDefined();
    // Not detached for SM_MAX_SECONDS: ended, the resource released, so what is sent to it now
    // goes to storage for the user's next login.
    const item = await server.smQueue.get(smId as string);
    expect(item === undefined || item.ended).toBe(true);
    expect(await server.sessions.getResource(bob, 'faults')).toBeUndefined();
    expect(
      (await server.smQueue.listExpired(Date.now() + 3_600_000, 100)).map((item) => item.smId),
    ).not.toContain(smId);
  });
});
