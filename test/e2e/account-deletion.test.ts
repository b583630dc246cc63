/**
 * An account deleted while its streams are open (`npm run user -- delete`, infra/account-deletion.ts):
 * the command cannot post or close sockets, so it marks the streams' connections revoked, and each
 * stream ends at its next frame with the stream error `<not-authorized/>` (RFC 6120 §4.9.3.12:
 * the entity "is not authorized to perform an action related to stream negotiation"; the
 * identity it authenticated as is gone). What that frame carried is not handled: nothing more is
 * sent as the deleted account, and its XEP-0198 session cannot be resumed (a resume needs a login).
 */
import { type Element, parse } from 'ltx';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSweeperHandler } from '../../functions/sweeper.ts';
import { deleteAccount } from '../../infra/account-deletion.ts';
import { RawClient } from '../../infra/local/raw-client.ts';
import type { RosterEntry } from '../../shared/store/roster.ts';
import { eventually } from '../support/eventually.ts';
import { intercept } from '../support/intercept.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';
import { startClient } from '../support/xmpp-client.ts';

const STREAMS = 'urn:ietf:params:xml:ns:xmpp-streams';
const SM3 = 'urn:xmpp:sm:3';

let stack: TestStack;
const clients: RawClient[] = [];

beforeAll(async () => {
  stack = await startTestStack();
  for (const user of [
    'ava',
    'ben',
    'cid',
    'dee',
    'eve',
    'fay',
    'gil',
    'hana',
    'ivy',
    'kim',
    'lea',
    'max',
    'ned',
    'ora',
    'pip',
    'quin',
    'rex',
    'sal',
  ])
    await stack.addUser(`${user}@localhost`, `${user}-pw`);
});

afterAll(async () => {
  for (const client of clients) client.terminate();
  await stack?.close();
});

async function bound(user: string, resource: string): Promise<RawClient> {
  const client = await RawClient.connect(stack.url);
  clients.push(client);
  await client.login(user, `${user}-pw`, resource);
  client.send('<presence/>');
  await client.framesBeforePong();
  return client;
}

/** Both ways subscribed, as §3's exchange leaves two accounts (written as the roster module does). */
async function befriend(a: string, b: string): Promise<void> {
  const entry = (contact: string): RosterEntry => ({
    contact,
    listed: true,
    groups: [],
    subscription: 'both',
    pendingOut: false,
    approved: false,
  });
  await stack.server.roster.apply(`${a}@localhost`, `${b}@localhost`, { contactIsLocal: true }, () => ({
    user: entry(`${b}@localhost`),
    contact: entry(`${a}@localhost`),
    outcome: undefined,
  }));
}

/**
 * Bound, the roster asked for (an interested resource, §2.1.6), then available; `seen` holds
 * what came before its presence was handled (the presence of the contacts it probed, §4.3).
 */
async function interested(user: string, resource: string): Promise<RawClient & { seen: string }> {
  const client = await RawClient.connect(stack.url);
  clients.push(client);
  await client.login(user, `${user}-pw`, resource);
  client.send(`<iq type='get' id='roster'><query xmlns='jabber:iq:roster'/></iq>`);
  await client.until((el) => el.attrs.id === 'roster');
  client.send('<presence/>');
  return Object.assign(client, { seen: (await client.framesBeforePong()).join('') });
}

function streamCondition(el: Element): string | undefined {
  return el.getChildElements().find((c) => c.attrs.xmlns === STREAMS)?.name;
}

/** Every frame up to the socket's close. */
async function framesToClose(client: RawClient): Promise<Element[]> {
  const frames: Element[] = [];
  for (;;) {
    try {
      frames.push(await client.next(10_000));
    } catch (error) {
      if (client.isClosed) return frames;
      throw error;
    }
  }
}

describe('an account deleted while its streams are open', () => {
  it('ends each stream at its next frame with <not-authorized/>, and sends nothing it carried', async () => {
    const ava = await bound('ava', 'phone');
    const ben = await bound('ben', 'desk');
    const deleted = await deleteAccount(stack.server, 'ava@localhost', 'localhost');
    expect(deleted.sessions).toBe(1);

    ava.send(`<message type='chat' to='ben@localhost' id='after'><body>sent after deletion</body></message>`);
    const frames = await framesToClose(ava);
    expect(frames.map((f) => f.name)).toEqual(['stream:error', 'close']);
    expect(streamCondition(frames[0] as Element)).toBe('not-authorized');
    expect(frames[0]?.getChildText('text', STREAMS)).toBe('Account deleted');
    expect((await ava.closed).code).toBe(1000);

    await stack.gateway.drained();
    // The message never left: ben got nothing from ava.
    expect((await ben.framesBeforePong()).filter((f) => f.includes('sent after deletion'))).toEqual([]);
  });

  it('ends a stream-management session the same way, and it cannot be resumed', async () => {
    const cid = await bound('cid', 'laptop');
    cid.send(`<enable xmlns='${SM3}' resume='true'/>`);
    const enabled = await cid.next();
    expect(enabled.name).toBe('enabled');
    // A message in cid's queue, received but never acknowledged when the account goes.
    const ben = await bound('ben', 'queue');
    ben.send(
      `<message type='chat' to='cid@localhost/laptop' id='queued'><body>unacknowledged</body></message>`,
    );
    expect((await cid.until((el) => el.attrs.id === 'queued')).getChildText('body')).toBe('unacknowledged');
    await deleteAccount(stack.server, 'cid@localhost', 'localhost');

    cid.send(`<r xmlns='${SM3}'/>`);
    const frames = await framesToClose(cid);
    expect(frames.map((f) => (f.name === 'stream:error' ? streamCondition(f) : f.name))).toEqual([
      'not-authorized',
      'close',
    ]);
    // XEP-0198 §5: the session's unacknowledged stanzas are handled as for an unavailable
    // recipient; the account is gone, so the sender gets the error (RFC 6121 §8.5.2.2.1's
    // service-unavailable), and nothing is stored for the deleted JID.
    await stack.gateway.drained();
    const bounce = await ben.until((el) => el.name === 'message' && el.attrs.id === 'queued');
    expect(bounce.attrs.type).toBe('error');
    expect(bounce.getChild('error')?.getChild('service-unavailable')).toBeDefined();
    expect((await stack.server.offline.list('cid@localhost', { limit: 10 })).messages).toEqual([]);
    // A resume starts with a login, which the deleted account no longer has.
    const again = await RawClient.connect(stack.url);
    clients.push(again);
    await expect(again.login('cid', 'cid-pw', 'laptop')).rejects.toThrow(/not-authorized/);
  });

  it("tells the contacts' online clients as the stream ends: unsubscribe and unsubscribed, the roster push, its unavailable presence (RFC 6121 §2.5.2)", async () => {
    // eve and fay: Both (§3 done both ways), each online with the roster asked for (interested,
    // §2.1.6) and available.
    await befriend('eve', 'fay');
    const eve = await interested('eve', 'laptop');
    const fay = await interested('fay', 'phone');
    // fay's login probed eve: eve's presence reached fay (§4.3).
    expect(fay.seen).toContain(`from="eve@localhost/laptop"`);
    await deleteAccount(stack.server, 'eve@localhost', 'localhost');
    eve.send(`<iq type='get' id='late'><ping xmlns='urn:xmpp:ping'/></iq>`);
    // (fay's presence, sent to eve at fay's login, is still unread before them.)
    expect((await framesToClose(eve)).map((f) => f.name).slice(-2)).toEqual(['stream:error', 'close']);
    await stack.gateway.drained();

    const frames = (await fay.framesBeforePong()).map((text) => parse(text));
    const told = frames.map((f) =>
      f.name === 'presence'
        ? `presence ${f.attrs.type} from ${f.attrs.from}`
        : `push ${f.getChild('query')?.getChild('item')?.attrs.jid} subscription=${f.getChild('query')?.getChild('item')?.attrs.subscription}`,
    );
    // §2.5.2: "unsubscribe" (the user was subscribed to the contact) and "unsubscribed" (the
    // contact was subscribed to the user), then the contact's item as it is now, then the
    // deleted resource's unavailable presence (§3.2.2: the contact's subscription is gone).
    expect(told).toEqual([
      'presence unsubscribe from eve@localhost',
      'presence unsubscribed from eve@localhost',
      'push eve@localhost subscription=none',
      'presence unavailable from eve@localhost/laptop',
    ]);
    const push = frames[2] as Element;
    expect(push.attrs.type).toBe('set');
    expect(push.getChild('query')?.attrs.ver).toBe(await stack.server.roster.getVersion('fay@localhost'));
  });

  it('tells them at its $disconnect when the deleted stream sends nothing more', async () => {
    await befriend('gil', 'hana');
    const gil = await interested('gil', 'desk');
    const hana = await interested('hana', 'phone');
    expect(hana.seen).toContain(`from="gil@localhost/desk"`);
    // ivy is no contact: gil sent it directed presence (§4.6), so it is told too (§4.6.3).
    const ivy = await bound('ivy', 'pad');
    gil.send(`<presence to='ivy@localhost/pad'/>`);
    await gil.framesBeforePong();
    await stack.gateway.drained();
    expect((await ivy.framesBeforePong()).join('')).toContain(`from="gil@localhost/desk"`);
    await deleteAccount(stack.server, 'gil@localhost', 'localhost');
    gil.close();
    await gil.closed;
    await stack.gateway.drained();
    const frames = (await hana.framesBeforePong()).map((text) => parse(text));
    expect(frames.map((f) => `${f.name} ${f.attrs.type ?? ''}`.trim())).toEqual([
      'presence unsubscribe',
      'presence unsubscribed',
      'iq set',
      'presence unavailable',
    ]);
    const directed = (await ivy.framesBeforePong()).map((text) => parse(text));
    expect(directed.map((f) => `${f.name} ${f.attrs.type} from ${f.attrs.from}`)).toEqual([
      'presence unavailable from gil@localhost/desk',
    ]);
  });

  it("refuses a resume of the deleted account's session by a stream that had logged in before the deletion (XEP-0198 item-not-found)", async () => {
    const kim = await bound('kim', 'phone');
    kim.send(`<enable xmlns='${SM3}' resume='true'/>`);
    const previd = (await kim.next()).attrs.id as string;
    expect(previd).toBeTruthy();
    // A second connection authenticates as kim while the account still exists...
    const second = await RawClient.connect(stack.url);
    clients.push(second);
    await second.open();
    second.send(
      `<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>${Buffer.from('\0kim\0kim-pw').toString('base64')}</auth>`,
    );
    expect((await second.next()).name).toBe('success');
    await second.open();
    // ...and asks to resume kim's session once the account is gone.
    await deleteAccount(stack.server, 'kim@localhost', 'localhost');
    second.send(`<resume xmlns='${SM3}' previd='${previd}' h='0'/>`);
    const answer = await second.next();
    expect(answer.name).toBe('failed');
    expect(answer.getChild('item-not-found')).toBeDefined();
  });

  it("ends a resumable session at once when the deleted stream's socket goes: its queue goes back to the senders", async () => {
    const lea = await bound('lea', 'tab');
    lea.send(`<enable xmlns='${SM3}' resume='true'/>`);
    expect((await lea.next()).name).toBe('enabled');
    const sender = await bound('ben', 'sender');
    sender.send(
      `<message type='chat' to='lea@localhost/tab' id='held'><body>never acknowledged</body></message>`,
    );
    await lea.until((el) => el.attrs.id === 'held');
    await deleteAccount(stack.server, 'lea@localhost', 'localhost');
    lea.terminate();
    await lea.closed;
    await stack.gateway.drained();
    // Not kept for SM_MAX_SECONDS (300 s here): the bounce is there as soon as the $disconnect is handled.
    const bounce = await sender.until((el) => el.name === 'message' && el.attrs.id === 'held');
    expect(bounce.attrs.type).toBe('error');
  });

  it('tells the contacts when a session detached at the deletion ends, and that session cannot be resumed', async () => {
    await befriend('max', 'ned');
    const max = await interested('max', 'mobile');
    max.send(`<enable xmlns='${SM3}' resume='true'/>`);
    const previd = (await max.next()).attrs.id as string;
    const ned = await interested('ned', 'desk');
    expect(ned.seen).toContain(`from="max@localhost/mobile"`);
    // max's socket drops: the session waits, detached, for a resume (XEP-0198 §5).
    max.terminate();
    await max.closed;
    await eventually(async () => {
      expect((await stack.server.smQueue.get(previd))?.connectionId).toBeUndefined();
    });
    await deleteAccount(stack.server, 'max@localhost', 'localhost');
    expect((await stack.server.smQueue.get(previd))?.revoked).toBeDefined();
    expect(await ned.framesBeforePong()).toEqual([]);

    // Its window closes (the sweeper's clock past it): the contacts are told then.
    const sweep = createSweeperHandler(stack.server, {
      now: () => Date.now() + 3_600_000,
      publishMetrics: () => {},
    });
    await sweep().catch(() => undefined);
    await stack.gateway.drained();
    const frames = (await ned.framesBeforePong()).map((text) => parse(text));
    expect(frames.map((f) => `${f.name} ${f.attrs.type ?? ''}`.trim())).toEqual([
      'presence unsubscribe',
      'presence unsubscribed',
      'iq set',
      'presence unavailable',
    ]);
    expect(frames[3]?.attrs.from).toBe('max@localhost/mobile');
  });

  it("sends a detached session's queue back to its senders when it ends, even once the JID has a new account", async () => {
    const quin = await bound('quin', 'mobile');
    quin.send(`<enable xmlns='${SM3}' resume='true'/>`);
    const previd = (await quin.next()).attrs.id as string;
    const sender = await bound('ben', 'to-quin');
    sender.send(
      `<message type='chat' to='quin@localhost/mobile' id='for-old-quin'><body>private</body></message>`,
    );
    await quin.until((el) => el.attrs.id === 'for-old-quin');
    // The socket drops unacknowledged: the session waits, detached, holding the message.
    quin.terminate();
    await quin.closed;
    await eventually(async () => {
      expect((await stack.server.smQueue.get(previd))?.connectionId).toBeUndefined();
    });
    // Deleted, and someone else is given the JID at once (an operator's "reset").
    await deleteAccount(stack.server, 'quin@localhost', 'localhost');
    await stack.addUser('quin@localhost', 'new-quin-pw');
    const newQuin = await RawClient.connect(stack.url);
    clients.push(newQuin);
    await newQuin.login('quin', 'new-quin-pw', 'phone');
    newQuin.send('<presence/>');
    await newQuin.framesBeforePong();
    // The old session's window closes: XEP-0198 §4 treats what it held "in the same way that [the
    // server] would treat a stanza sent to an unavailable resource"; the account it was for is
    // gone (RFC 6121 §8.5.1: service-unavailable), and the new account is someone else.
    const sweep = createSweeperHandler(stack.server, {
      now: () => Date.now() + 3_600_000,
      publishMetrics: () => {},
    });
    await sweep().catch(() => undefined);
    await stack.gateway.drained();
    const bounce = await sender.until((el) => el.name === 'message' && el.attrs.id === 'for-old-quin');
    expect(bounce.attrs.type).toBe('error');
    expect(
      bounce.getChild('error')?.getChild('service-unavailable', 'urn:ietf:params:xml:ns:xmpp-stanzas'),
    ).toBeDefined();
    expect((await newQuin.framesBeforePong()).filter((frame) => frame.includes('for-old-quin'))).toEqual([]);
    expect(await stack.server.offline.count('quin@localhost')).toBe(0);
  });

  it("does not let an account created again under the JID use the deleted one's pre-approval (RFC 6121 §3.4)", async () => {
    // ora pre-approves pip (§3.4.2: "the user's server MUST note the subscription pre-approval by
    // setting the 'approved' flag"): only ora's roster is written; pip's has nothing of ora.
    const ora = await bound('ora', 'desk');
    ora.send(`<presence type='subscribed' to='pip@localhost'/>`);
    await eventually(async () =>
      expect(await stack.server.roster.getEntry('ora@localhost', 'pip@localhost')).toMatchObject({
        approved: true,
      }),
    );
    await deleteAccount(stack.server, 'pip@localhost', 'localhost');
    // Someone else gets the JID.
    await stack.addUser('pip@localhost', 'pip-pw');
    const newPip = await bound('pip', 'phone');
    newPip.send(`<presence type='subscribe' to='ora@localhost' id='ask'/>`);
    // §3.1.3: the request reaches ora, who decides; nothing answers it on ora's behalf.
    const asked = await ora.until((el) => el.name === 'presence' && el.attrs.type === 'subscribe');
    expect(asked.attrs.from).toBe('pip@localhost');
    const afterAsk = await newPip.framesBeforePong();
    expect(
      afterAsk.some((frame) => frame.includes("type='subscribed'") || frame.includes('type="subscribed"')),
    ).toBe(false);
    expect(await stack.server.roster.getEntry('ora@localhost', 'pip@localhost')).toMatchObject({
      approved: false,
      subscription: 'none',
    });
    // A local JID without an account has nobody to approve: whoever gets it later is asked.
    ora.send(`<presence type='subscribed' to='nobody-yet@localhost'/>`);
    expect(await ora.framesBeforePong()).toEqual([]);
    expect(await stack.server.roster.getEntry('ora@localhost', 'nobody-yet@localhost')).toBeUndefined();
    ora.close();
    newPip.close();
  });

  it('ends a stream that logged in before the deletion and binds late, even once the JID has a new account', async () => {
    // Authenticated (and restarted), not bound yet: the deletion finds streams by their
    // resources, so it cannot mark this one.
    const stale = await RawClient.connect(stack.url);
    clients.push(stale);
    await stale.open();
    stale.send(
      `<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>${Buffer.from('\0rex\0rex-pw').toString('base64')}</auth>`,
    );
    expect((await stale.next()).name).toBe('success');
    await stale.open();
    await deleteAccount(stack.server, 'rex@localhost', 'localhost');
    await stack.addUser('rex@localhost', 'someone-else-pw');
    // Its bind comes long after its login (LATE_BIND_MS): the account is read, and it is another.
    const sessions = stack.server.sessions;
    const getConnection = sessions.getConnection.bind(sessions);
    const restore = intercept(sessions, 'getConnection', async (id) => {
      const row = await getConnection(id);
      if (row?.user && !row.resource) row.authenticatedAt = Date.now() - 60_000;
      return row;
    });
    try {
      stale.send(
        `<iq type='set' id='late'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>r</resource></bind></iq>`,
      );
      const frames = await framesToClose(stale);
      // RFC 6120 §4.9.3.12 <not-authorized/>, as a revoked stream ends.
      expect(frames.map((frame) => streamCondition(frame)).filter(Boolean)).toEqual(['not-authorized']);
      expect(frames.some((frame) => frame.attrs.id === 'late')).toBe(false);
      expect(await sessions.getResource('rex@localhost', 'r')).toBeUndefined();

      // A late bind of an account that is still the one it logged in as binds.
      const slow = await RawClient.connect(stack.url);
      clients.push(slow);
      await slow.open();
      slow.send(
        `<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>${Buffer.from('\0sal\0sal-pw').toString('base64')}</auth>`,
      );
      expect((await slow.next()).name).toBe('success');
      await slow.open();
      slow.send(
        `<iq type='set' id='late-ok'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>r</resource></bind></iq>`,
      );
      expect((await slow.until((el) => el.attrs.id === 'late-ok')).attrs.type).toBe('result');
    } finally {
      restore();
    }
    // A SCRAM login (stock xmpp.js) records the account it is too, carried from its first step.
    const scram = await startClient(stack.url, 'sal', 'sal-pw', { resource: 'scram' });
    try {
      const row = await sessions.getResource('sal@localhost', 'scram');
      const connection = await sessions.getConnection(row?.connectionId as string);
      expect(connection?.accountCreatedAt).toBe(await stack.server.users.createdAtOf('sal@localhost'));
      expect(connection?.authenticatedAt).toBeTypeOf('number');
    } finally {
      await scram.stop();
    }
  });

  it("leaves other accounts' streams alone", async () => {
    const dee = await bound('dee', 'tablet');
    const ben = await bound('ben', 'second');
    await deleteAccount(stack.server, 'dee@localhost', 'localhost');
    ben.send(`<message type='chat' to='ben@localhost/second' id='self'><body>still here</body></message>`);
    const before = await ben.framesBeforePong();
    expect(before.some((f) => f.includes('still here'))).toBe(true);
    dee.close();
  });
});
