/**
 * RFC 6120 §7.6.2.1 Resource Constraint: "If the account has reached a limit on the number of
 * simultaneous connected resources allowed, the server MUST return a <resource-constraint/>
 * stanza error." (MAX_RESOURCES_PER_ACCOUNT). Without it one account could bind thousands of
 * resources, and a message to its bare JID would post to each of them from one frame.
 */
import { UpdateCommand } from '@aws-sdk/lib-dynamodb';
import { parse } from 'ltx';
import { describe, expect, it } from 'vitest';
import type { RecordingPort } from '../../shared/outbound.ts';
import type { Server } from '../../shared/server.ts';
import { createDocumentClient } from '../../shared/store/dynamo.ts';
import { TTL_ATTRIBUTE } from '../../shared/tables.ts';
import { TEST_REGION, useDynamoDbLocal } from '../support/dynamodb.ts';
import { openConnection, sendFrame, testServer } from '../support/stream.ts';

const BIND = 'urn:ietf:params:xml:ns:xmpp-bind';
const STANZAS = 'urn:ietf:params:xml:ns:xmpp-stanzas';

const limitedServer = (limit: string) => testServer({ MAX_RESOURCES_PER_ACCOUNT: limit });

let counter = 0;

/** An authenticated stream of `user`, not yet bound; `bind` sends it a bind request. */
async function authenticated(server: Server, port: RecordingPort, user: string) {
  const connectionId = `c${++counter}-${Date.now()}`;
  await openConnection(server, connectionId, user);
  let frames = 0;
  const bind = async (resource: string) => {
    const frameId = `${connectionId}-${++frames}`;
    const before = (port.frames.get(connectionId) ?? []).length;
    await sendFrame(
      server,
      connectionId,
      `<iq xmlns='jabber:client' type='set' id='bind-${resource}'><bind xmlns='${BIND}'><resource>${resource}</resource></bind></iq>`,
      { frameId, seq: String(100 + frames) },
    );
    const answers = (port.frames.get(connectionId) ?? []).slice(before).map((frame) => parse(frame));
    return answers.find((answer) => answer.name === 'iq');
  };
  return { connectionId, bind };
}

/**
 * XEP-0198 on a bound stream, as `<enable resume='true'/>` leaves it (the queue, the resource
 * switched to it); returns what its socket's loss does (the session detached, waiting).
 */
async function enableResumption(server: Server, user: string, resource: string, connectionId: string) {
  const smId = `sm-${connectionId}`;
  await server.smQueue.create({
    smId,
    user,
    resource,
    version: 'sm3',
    resumable: true,
    max: 300,
    connectionId,
  });
  await server.smQueue.release(smId, 0);
  await server.sessions.switchToQueueLate(user, resource, connectionId, smId);
  return async () => {
    expect(await server.smQueue.detach(smId, connectionId, 0, Date.now() + 300_000, [])).toBe(true);
  };
}

describe('RFC 6120 §7.6.2.1: a limit on the resources one account has bound', () => {
  it('refuses the bind past the limit with <resource-constraint/> of type wait, and binds nothing', async () => {
    const { port, server } = await limitedServer('2');
    const user = `limited${Date.now()}@localhost`;
    expect((await (await authenticated(server, port, user)).bind('one'))?.attrs.type).toBe('result');
    expect((await (await authenticated(server, port, user)).bind('two'))?.attrs.type).toBe('result');

    const third = await authenticated(server, port, user);
    const refused = await third.bind('three');
    // RFC 6120 §7.6.2.1, Example:
    //   <iq id='yhc13a95' type='error'>
    //     <error type='wait'>
    //       <resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>
    //     </error>
    //   </iq>
    expect(refused?.attrs).toMatchObject({ type: 'error', id: 'bind-three' });
    expect(refused?.getChild('error')?.attrs.type).toBe('wait');
    expect(refused?.getChild('error')?.getChild('resource-constraint', STANZAS)).toBeDefined();
    expect((await server.sessions.listResources(user)).map((r) => r.resource).sort()).toEqual(['one', 'two']);
    expect((await server.sessions.getConnection(third.connectionId))?.resource).toBeUndefined();

    // Another account is not limited by this one's resources.
    const other = `other${Date.now()}@localhost`;
    expect((await (await authenticated(server, port, other)).bind('one'))?.attrs.type).toBe('result');
  });

  it('neither binds nor answers again a refused bind redelivered after a resource was let go', async () => {
    const { port, server } = await limitedServer('1');
    const user = `refusedagain${Date.now()}@localhost`;
    const holder = await authenticated(server, port, user);
    expect((await holder.bind('one'))?.attrs.type).toBe('result');
    const late = await authenticated(server, port, user);
    const frame = `<iq xmlns='jabber:client' type='set' id='bind-two'><bind xmlns='${BIND}'><resource>two</resource></bind></iq>`;
    const delivery = { frameId: `${late.connectionId}-refused`, seq: '500' };
    await sendFrame(server, late.connectionId, frame, delivery);
    // The batch failed after this record (a later one's error): SQS brings it back after the
    // holder's resource was let go.
    expect(await server.sessions.releaseResource(user, 'one', holder.connectionId)).toBeDefined();
    await sendFrame(server, late.connectionId, frame, { ...delivery, receiveCount: 2 });
    const answers = (port.frames.get(late.connectionId) ?? [])
      .map((text) => parse(text))
      .filter((el) => el.attrs.id === 'bind-two');
    // Told that the bind failed, never after that it succeeded: one answer per request (RFC 6120
    // §8.2.3). The answer was saved with the frame, which is now known handled.
    expect(answers.map((el) => el.attrs.type)).toEqual(['error']);
    expect(answers[0]?.getChild('error')?.getChild('resource-constraint', STANZAS)).toBeDefined();
    expect((await server.sessions.listResources(user)).map((r) => r.resource)).toEqual([]);
  });

  it('finishes a bind whose first attempt wrote its row, though another bind landed meanwhile at the limit', async () => {
    const { port, server } = await limitedServer('1');
    const user = `racing${Date.now()}@localhost`;
    // Two binds passed the check at once (none bound yet); the first wrote its row and its
    // function died before the answer, the second bound. SQS brings the first frame again.
    const first = await authenticated(server, port, user);
    const second = await authenticated(server, port, user);
    const row = (resource: string, connectionId: string) => ({
      user,
      resource,
      connectionId,
      available: false,
      priority: 0,
      boundAt: Date.now(),
    });
    await server.sessions.bindResource(row('one', first.connectionId));
    await server.sessions.bindResource(row('two', second.connectionId));
    // Refused now, its row would stay bound to a stream told it has no resource.
    expect((await first.bind('one'))?.attrs.type).toBe('result');
    expect((await server.sessions.getConnection(first.connectionId))?.resource).toBe('one');
    // A third name is refused.
    expect((await (await authenticated(server, port, user)).bind('three'))?.attrs.type).toBe('error');
  });

  it('still lets a bound resource be taken over at the limit', async () => {
    const { port, server } = await limitedServer('2');
    const user = `full${Date.now()}@localhost`;
    const first = await authenticated(server, port, user);
    expect((await first.bind('one'))?.attrs.type).toBe('result');
    expect((await (await authenticated(server, port, user)).bind('two'))?.attrs.type).toBe('result');
    // RFC 6120 §7.7.2.2: a new connection binding a resource the account holds replaces the
    // old session; the account's resources stay two.
    const newer = await authenticated(server, port, user);
    const answer = await newer.bind('one');
    expect(answer?.attrs.type).toBe('result');
    expect(answer?.getChild('bind', BIND)?.getChildText('jid')).toBe(`${user}/one`);
    const rows = await server.sessions.listResources(user);
    expect(rows.map((r) => r.resource).sort()).toEqual(['one', 'two']);
    expect(rows.find((r) => r.resource === 'one')?.connectionId).toBe(newer.connectionId);
    // A third name is still refused.
    expect((await (await authenticated(server, port, user)).bind('three'))?.attrs.type).toBe('error');
  });

  it('does not count a row past its TTL (a lost $disconnect the table has not deleted yet)', async () => {
    const { port, server, config } = await limitedServer('1');
    const user = `stale${Date.now()}@localhost`;
    expect((await (await authenticated(server, port, user)).bind('gone'))?.attrs.type).toBe('result');
    expect((await (await authenticated(server, port, user)).bind('next'))?.getChild('error')).toBeDefined();
    const doc = createDocumentClient({ endpoint: useDynamoDbLocal(), region: TEST_REGION });
    await doc.send(
      new UpdateCommand({
        TableName: config.tables.sessions,
        Key: { pk: `user#${user}`, sk: 'res#gone' },
        UpdateExpression: 'SET #ttl = :past',
        ExpressionAttributeNames: { '#ttl': TTL_ATTRIBUTE },
        ExpressionAttributeValues: { ':past': Math.floor(Date.now() / 1000) - 1 },
      }),
    );
    expect((await (await authenticated(server, port, user)).bind('next'))?.attrs.type).toBe('result');
  });

  it('counts connected resources: a stream-management session detached from its socket does not count (nor one ended)', async () => {
    // A browser client reloading its page binds a new resource each time, and each page it left
    // keeps a stream-management session waiting for a resume (XEP-0198 §5): not connected.
    const { port, server } = await limitedServer('1');
    const user = `reloader${Date.now()}@localhost`;
    const page1 = await authenticated(server, port, user);
    expect((await page1.bind('page1'))?.attrs.type).toBe('result');
    const detach = await enableResumption(server, user, 'page1', page1.connectionId);
    // Attached: connected, so the next page is refused at a limit of one.
    expect((await (await authenticated(server, port, user)).bind('page2'))?.getChild('error')).toBeDefined();
    // The page is left: its socket is gone and the session waits, detached.
    await detach();
    expect((await server.sessions.getResource(user, 'page1'))?.smId).toBe(`sm-${page1.connectionId}`);
    expect((await (await authenticated(server, port, user)).bind('page2'))?.attrs.type).toBe('result');
  });

  it('bounds the rows, detached sessions included, at four times the limit', async () => {
    const { port, server } = await limitedServer('1');
    const user = `dropper${Date.now()}@localhost`;
    // A client that connects, enables resumption and drops, four times over.
    for (let i = 1; i <= 4; i++) {
      const page = await authenticated(server, port, user);
      expect((await page.bind(`drop${i}`))?.attrs.type).toBe('result');
      await (await enableResumption(server, user, `drop${i}`, page.connectionId))();
    }
    const fifth = await (await authenticated(server, port, user)).bind('drop5');
    expect(fifth?.getChild('error')?.getChild('resource-constraint', STANZAS)).toBeDefined();
  });

  it('0 means no limit', async () => {
    const { port, server } = await limitedServer('0');
    const user = `free${Date.now()}@localhost`;
    for (const resource of ['a', 'b', 'c', 'd']) {
      expect((await (await authenticated(server, port, user)).bind(resource))?.attrs.type).toBe('result');
    }
    expect(await server.sessions.listResources(user)).toHaveLength(4);
  });
});
