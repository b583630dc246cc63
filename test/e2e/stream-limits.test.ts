/**
 * XEP-0478 Stream Limits Advertisement (v0.2) over the local stack: the limits the deployment
 * enforces are advertised, and what could never be sent on is refused to its sender with
 * policy-violation — never delivered, stored offline or queued for stream management. An inbox
 * that already holds such a message (stored before the check existed) never blocks a login.
 */
import type { Element } from 'ltx';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RawClient } from '../../infra/local/raw-client.ts';
import { POST_LIMIT_BYTES } from '../../shared/core/delivery.ts';
import { eventually } from '../support/eventually.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

const LIMITS = 'urn:xmpp:stream-limits:0';
const STANZAS = 'urn:ietf:params:xml:ns:xmpp-stanzas';
const SM3 = 'urn:xmpp:sm:3';

let stack: TestStack;
const clients: RawClient[] = [];

beforeAll(async () => {
  stack = await startTestStack({ SM_ACK_EVERY: '1000' });
  for (const user of ['alice', 'bob', 'carol', 'dave', 'erin'])
    await stack.addUser(`${user}@localhost`, `${user}-pw`);
});

afterAll(async () => {
  for (const client of clients) client.terminate();
  await stack?.close();
});

async function connect(): Promise<RawClient> {
  const client = await RawClient.connect(stack.url);
  clients.push(client);
  return client;
}

async function online(user: string, resource = 'r'): Promise<RawClient> {
  const client = await connect();
  await client.login(user, `${user}-pw`, resource);
  client.send('<presence/>');
  await client.until((el) => el.name === 'presence');
  return client;
}

/** A FIFO barrier: everything the server sent before the pong has arrived once the pong has. */
async function barrier(client: RawClient, id: string): Promise<Element[]> {
  client.send(`<iq type='get' id='${id}'><ping xmlns='urn:xmpp:ping'/></iq>`);
  const seen: Element[] = [];
  for (;;) {
    const el = await client.next();
    if (el.name === 'iq' && el.attrs.id === id) return seen;
    seen.push(el);
  }
}

/** A message whose attribute of apostrophes grows six-fold when serialised (`&apos;`). */
function swollenMessage(to: string, id: string): string {
  return `<message to='${to}' type='chat' id='${id}' x="${"'".repeat(30 * 1024)}"><body>big</body></message>`;
}

describe('advertisement', () => {
  it('advertises max-bytes and idle-seconds in the features before and after authentication', async () => {
    // XEP-0478 §2 Example: <limits xmlns="urn:xmpp:stream-limits:0"><max-bytes>10000</max-bytes>
    // <idle-seconds>1800</idle-seconds></limits>
    const client = await connect();
    const { features } = await client.open();
    const before = features.getChild('limits', LIMITS);
    expect(before?.getChildText('max-bytes')).toBe('32768');
    expect(before?.getChildText('idle-seconds')).toBe('600');
    client.terminate();

    const bound = await connect();
    await bound.open();
    bound.send(
      `<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>${Buffer.from('\0alice\0alice-pw').toString('base64')}</auth>`,
    );
    expect((await bound.next()).name).toBe('success');
    const { features: afterAuth } = await bound.open();
    expect(afterAuth.getChild('limits', LIMITS)?.getChildText('max-bytes')).toBe('32768');
  });
});

describe('a stanza that would exceed the post limit once serialised', () => {
  it('is refused to the sender with policy-violation and never reaches an online recipient', async () => {
    const frame = swollenMessage('bob@localhost', 'big1');
    expect(Buffer.byteLength(frame)).toBeLessThan(32 * 1024);
    const alice = await online('alice');
    const bob = await online('bob');
    alice.send(frame);
    // XEP-0478 §3: "a server SHOULD return an error to the sender. Such an error SHOULD contain
    // the <policy-violation/> error condition, and SHOULD NOT contain a 'by' attribute".
    const error = await alice.until((el) => el.name === 'message' && el.attrs.id === 'big1');
    expect(error.attrs.type).toBe('error');
    const condition = error.getChild('error');
    expect(condition?.attrs).toMatchObject({ type: 'modify' });
    expect(condition?.attrs.by).toBeUndefined();
    expect(condition?.getChild('policy-violation', STANZAS)).toBeDefined();
    expect(Buffer.byteLength(error.toString())).toBeLessThan(POST_LIMIT_BYTES);
    expect((await barrier(bob, 'b1')).filter((el) => el.name === 'message')).toEqual([]);
    alice.terminate();
    bob.terminate();
  });

  it('swollen in its body (which an error may copy back), still gets policy-violation and the stream lives', async () => {
    // `&` grows five-fold serialised (`&amp;`): the body is what the error reply copies back
    // (RFC 6120 §8.3.1), so a copy could never be posted either; the error goes without it.
    const alice = await online('alice', 'r4');
    alice.send(
      `<message to='bob@localhost' type='chat' id='big4'><body><![CDATA[${'&'.repeat(30 * 1024)}]]></body></message>`,
    );
    const error = await alice.until((el) => el.name === 'message' && el.attrs.id === 'big4');
    expect(error.attrs.type).toBe('error');
    expect(error.getChild('error')?.getChild('policy-violation', STANZAS)).toBeDefined();
    expect(error.getChild('body')).toBeUndefined();
    // Never a stream error (a <stream:error/>, then the close): the stream goes on and answers
    // a ping, with nothing before the pong.
    const before = await barrier(alice, 'a4');
    expect(before).toEqual([]);
    expect(alice.isClosed).toBe(false);
    alice.terminate();
  });

  it('is never stored offline for an offline recipient', async () => {
    const alice = await online('alice', 'r2');
    alice.send(swollenMessage('carol@localhost', 'big2'));
    const error = await alice.until((el) => el.name === 'message' && el.attrs.id === 'big2');
    expect(error.getChild('error')?.getChild('policy-violation', STANZAS)).toBeDefined();
    expect(await stack.server.offline.count('carol@localhost')).toBe(0);
    alice.terminate();
  });

  it('is never queued for a recipient with stream management', async () => {
    const alice = await online('alice', 'r3');
    const dave = await connect();
    await dave.login('dave', 'dave-pw', 'sm');
    dave.send(`<enable xmlns='${SM3}' resume='true'/>`);
    await dave.until((el) => el.name === 'enabled');
    dave.send('<presence/>');
    await dave.until((el) => el.name === 'presence');
    alice.send(swollenMessage('dave@localhost/sm', 'big3'));
    const error = await alice.until((el) => el.name === 'message' && el.attrs.id === 'big3');
    expect(error.getChild('error')?.getChild('policy-violation', STANZAS)).toBeDefined();
    dave.send(`<r xmlns='${SM3}'/>`);
    const ack = await dave.until((el) => el.name === 'a');
    // dave sent one stanza since <enable/>: his presence.
    expect(ack.attrs.h).toBe('1');
    const smId = (await stack.server.sessions.getResource('dave@localhost', 'sm'))?.smId as string;
    const queue = await stack.server.smQueue.get(smId);
    // Only dave's own presence was queued to him; the swollen message never was.
    const stanzas = await stack.server.smQueue.stanzas(smId, queue?.entries ?? []);
    expect(stanzas.some((s) => s?.includes('big3'))).toBe(false);
    alice.terminate();
    dave.terminate();
  });
});

describe('an inbox that holds a message too large to deliver (stored before the check)', () => {
  async function seedSwollen(user: string): Promise<void> {
    const swollen = `<message from='mallory@localhost/x' to='${user}' type='chat' id='old-big' xmlns='jabber:client' x="${"'".repeat(30 * 1024)}"><body>big</body></message>`;
    await stack.server.offline.store(user, {
      from: 'mallory@localhost/x',
      storedAt: Date.now() - 2000,
      stanza: swollen,
    });
    await stack.server.offline.store(user, {
      from: 'alice@localhost/r',
      storedAt: Date.now() - 1000,
      stanza: `<message from='alice@localhost/r' to='${user}' type='chat' id='after-big' xmlns='jabber:client'><body>still here</body></message>`,
    });
  }

  it('does not block the flood of later messages, and the oversized one is dropped', async () => {
    await seedSwollen('erin@localhost');
    const erin = await connect();
    await erin.login('erin', 'erin-pw', 'first');
    erin.send('<presence/>');
    const delivered = await erin.until((el) => el.name === 'message' && el.attrs.id === 'after-big');
    expect(delivered.getChildText('body')).toBe('still here');
    await eventually(async () => expect(await stack.server.offline.count('erin@localhost')).toBe(0));
    erin.terminate();
  });

  it('does not fail a XEP-0013 fetch without stream management: the oversized one is dropped', async () => {
    await seedSwollen('erin@localhost');
    const erin = await connect();
    await erin.login('erin', 'erin-pw', 'fetcher');
    // XEP-0013 §2.5: <iq type='get' id='fetch1'><offline xmlns='http://jabber.org/protocol/offline'>
    // <fetch/></offline></iq>, answered after the messages.
    erin.send(
      `<iq type='get' id='fetch1'><offline xmlns='http://jabber.org/protocol/offline'><fetch/></offline></iq>`,
    );
    const seen: Element[] = [];
    const reply = await erin.until((el) => {
      seen.push(el);
      return el.name === 'iq' && el.attrs.id === 'fetch1';
    });
    expect(reply.attrs.type).toBe('result');
    expect(seen.filter((el) => el.name === 'message').map((el) => el.attrs.id)).toEqual(['after-big']);
    // The one that can never be sent is gone; the fetched one stays until removed (§2.4).
    expect(await stack.server.offline.count('erin@localhost')).toBe(1);
    erin.send(
      `<iq type='set' id='purge1'><offline xmlns='http://jabber.org/protocol/offline'><purge/></offline></iq>`,
    );
    await erin.until((el) => el.name === 'iq' && el.attrs.id === 'purge1');
    erin.terminate();
  });

  it('does not block a stream-management login either', async () => {
    await seedSwollen('erin@localhost');
    const erin = await connect();
    await erin.login('erin', 'erin-pw', 'second');
    erin.send(`<enable xmlns='${SM3}'/>`);
    await erin.until((el) => el.name === 'enabled');
    erin.send('<presence/>');
    await erin.until((el) => el.name === 'message' && el.attrs.id === 'after-big');
    const r = await erin.until((el) => el.name === 'r');
    expect(r.attrs.xmlns).toBe(SM3);
    erin.send(`<a xmlns='${SM3}' h='2'/>`);
    await eventually(async () => expect(await stack.server.offline.count('erin@localhost')).toBe(0));
    erin.terminate();
  });
});

describe('the largest message the server accepts', () => {
  /** A chat message swollen to a chosen size: apostrophes grow six-fold serialised, the body pads. */
  function sized(to: string, id: string, pad: number): string {
    return `<message to='${to}' type='chat' id='${id}' x="${"'".repeat(21_700)}"><body>${'a'.repeat(pad)}</body></message>`;
  }

  /** Whether the server takes a message of this size from alice: no policy-violation before the pong. */
  async function accepted(alice: RawClient, pad: number): Promise<boolean> {
    const id = `probe${pad}`;
    alice.send(sized('bob@localhost/probe', id, pad));
    const before = await barrier(alice, `ping-${id}`);
    return !before.some((el) => el.name === 'message' && el.attrs.id === id && el.attrs.type === 'error');
  }

  it('is delivered by every path that sends a stored message, never dropped as too large', async () => {
    const alice = await online('alice', 'sizer');
    const bob = await online('bob', 'probe');
    // The largest size accepted, found by asking the server itself (binary search on the padding).
    let low = 0;
    let high = 1500;
    expect(await accepted(alice, low)).toBe(true);
    expect(await accepted(alice, high)).toBe(false);
    while (high - low > 1) {
      const middle = Math.floor((low + high) / 2);
      if (await accepted(alice, middle)) low = middle;
      else high = middle;
    }
    bob.terminate();
    await stack.addUser('frank@localhost', 'frank-pw');
    await stack.addUser('grace@localhost', 'grace-pw');
    alice.send(sized('frank@localhost', 'largest-f', low));
    alice.send(sized('grace@localhost', 'largest-g', low));
    await eventually(async () => {
      expect(await stack.server.offline.count('frank@localhost')).toBe(1);
      expect(await stack.server.offline.count('grace@localhost')).toBe(1);
    });

    // XEP-0013 §2.5 with stream management: the fetched copy carries its node and a delay stamp
    // (§2.3: "each message MUST contain the node value"), and is still delivered.
    const frank = await connect();
    await frank.login('frank', 'frank-pw', 'sm');
    frank.send(`<enable xmlns='${SM3}'/>`);
    await frank.until((el) => el.name === 'enabled');
    frank.send(
      `<iq type='get' id='fetch-largest'><offline xmlns='http://jabber.org/protocol/offline'><fetch/></offline></iq>`,
    );
    const seen: Element[] = [];
    const reply = await frank.until((el) => {
      seen.push(el);
      return el.name === 'iq' && el.attrs.id === 'fetch-largest';
    });
    expect(reply.attrs.type).toBe('result');
    const fetched = seen.find((el) => el.name === 'message' && el.attrs.id === 'largest-f');
    expect(
      fetched?.getChild('offline', 'http://jabber.org/protocol/offline')?.getChild('item')?.attrs.node,
    ).toBeTypeOf('string');
    expect(fetched?.getChildText('body')).toBe('a'.repeat(low));
    // §2.4: "A server MUST NOT remove a message simply because it has been requested by and
    // delivered to the user": still stored.
    expect(await stack.server.offline.count('frank@localhost')).toBe(1);

    // XEP-0160's flood to a stream-management session: delivered, and gone from storage once
    // acknowledged.
    const grace = await connect();
    await grace.login('grace', 'grace-pw', 'sm');
    grace.send(`<enable xmlns='${SM3}'/>`);
    await grace.until((el) => el.name === 'enabled');
    grace.send('<presence/>');
    const flooded = await grace.until((el) => el.name === 'message' && el.attrs.id === 'largest-g');
    expect(flooded.getChildText('body')).toBe('a'.repeat(low));
    grace.send(`<a xmlns='${SM3}' h='2'/>`);
    await eventually(async () => expect(await stack.server.offline.count('grace@localhost')).toBe(0));
    alice.terminate();
    frank.terminate();
    grace.terminate();
  });
});
