/**
 * XEP-0013 Flexible Offline Message Retrieval (v1.2, the seed) end to end: raw frames and stock
 * xmpp.js clients through the local gateway, real handlers, DynamoDB Local. Every example of the
 * seed (quoted above the test that plays it, with our domain and real node ids), the negative
 * grids, the no-flood rules, XEP-0059 paging of a 10,000-message inbox, quota and expiry.
 */

import type { DynamoDBDocumentClient } from '@aws-sdk/lib-dynamodb';
import { xml } from '@xmpp/client';
import { type Element, parse } from 'ltx';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { seedOffline } from '../../infra/local/offline-seed.ts';
import { RawClient } from '../../infra/local/raw-client.ts';
import { createDocumentClient } from '../../shared/store/dynamo.ts';
import type { OfflineMessage } from '../../shared/store/offline.ts';
import { eventually } from '../support/eventually.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';
import { type StartedClient, startClient } from '../support/xmpp-client.ts';

const OFFLINE = 'http://jabber.org/protocol/offline';
const DISCO_INFO = 'http://jabber.org/protocol/disco#info';
const DISCO_ITEMS = 'http://jabber.org/protocol/disco#items';
const RSM = 'http://jabber.org/protocol/rsm';
const DATA_FORMS = 'jabber:x:data';
const STANZAS = 'urn:ietf:params:xml:ns:xmpp-stanzas';
const DELAY = 'urn:xmpp:delay';
const MESSAGE_LIMIT = 128 * 1024;
const DAY_MS = 86_400_000;

let stack: TestStack;
let doc: DynamoDBDocumentClient;
let juliet: StartedClient;
let mercutio: StartedClient;
const sockets: RawClient[] = [];
const clients: StartedClient[] = [];

let userCount = 0;
/** A fresh account (password `secret`); returns its localpart. */
async function newUser(prefix = 'romeo', on: TestStack = stack): Promise<string> {
  userCount += 1;
  const local = `${prefix}${userCount}`;
  await on.addUser(`${local}@localhost`, 'secret');
  return local;
}

async function connect(local: string, resource: string, on: TestStack = stack): Promise<RawClient> {
  const raw = await RawClient.connect(on.url);
  sockets.push(raw);
  await raw.login(local, 'secret', resource);
  return raw;
}

interface Exchange {
  /** Everything the server sent before the reply, in order. */
  before: Element[];
  reply: Element;
  replyBytes: number;
}

/** Sends one iq and reads frames until its reply. */
async function exchange(raw: RawClient, frame: string, timeoutMs = 10_000): Promise<Exchange> {
  const id = parse(frame).attrs.id;
  raw.send(frame);
  const before: Element[] = [];
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = await raw.nextText(Math.max(1, deadline - Date.now()));
    const element = parse(text);
    if (element.name === 'iq' && element.attrs.id === id) {
      return { before, reply: element, replyBytes: Buffer.byteLength(text) };
    }
    before.push(element);
  }
}

function errorCondition(reply: Element): string | undefined {
  return reply
    .getChild('error')
    ?.getChildElements()
    .find((c) => c.getNS() === STANZAS && c.name !== 'text')?.name;
}

function expectError(reply: Element, condition: string): void {
  expect(reply.attrs.type).toBe('error');
  expect(errorCondition(reply)).toBe(condition);
}

interface Header {
  jid: string;
  node: string;
  name: string;
}

function headerItems(reply: Element): Header[] {
  const query = reply.getChild('query', DISCO_ITEMS);
  return (query?.getChildren('item') ?? []).map((item) => ({
    jid: item.attrs.jid,
    node: item.attrs.node,
    name: item.attrs.name,
  }));
}

let ids = 0;
function nextId(prefix: string): string {
  ids += 1;
  return `${prefix}${ids}`;
}

const countRequest = (to = '') =>
  `<iq type='get' id='${nextId('count')}'${to ? ` to='${to}'` : ''}><query xmlns='${DISCO_INFO}' node='${OFFLINE}'/></iq>`;
const headersRequest = (set = '', to = '') =>
  `<iq type='get' id='${nextId('headers')}'${to ? ` to='${to}'` : ''}><query xmlns='${DISCO_ITEMS}' node='${OFFLINE}'>${set}</query></iq>`;
const offlineRequest = (type: 'get' | 'set', inner: string, to = '') =>
  `<iq type='${type}' id='${nextId(type)}'${to ? ` to='${to}'` : ''}><offline xmlns='${OFFLINE}'>${inner}</offline></iq>`;
const viewItems = (nodes: string[]) => nodes.map((n) => `<item action='view' node='${n}'/>`).join('');
const removeItems = (nodes: string[]) => nodes.map((n) => `<item action='remove' node='${n}'/>`).join('');

function numberOfMessages(reply: Element): string | undefined {
  const form = reply.getChild('query', DISCO_INFO)?.getChild('x', DATA_FORMS);
  return form
    ?.getChildren('field')
    .find((f) => f.attrs.var === 'number_of_messages')
    ?.getChildText('value') as string | undefined;
}

async function inbox(user: string): Promise<string[]> {
  const page = await stack.server.offline.list(`${user}@localhost`, { limit: 1000 });
  return page.messages.map((m) => m.id);
}

/** Leaves chat messages for `to` through a real client and waits until they are stored. */
async function leaveMessages(sender: StartedClient, to: string, bodies: string[]): Promise<void> {
  const before = await stack.server.offline.count(to);
  for (const body of bodies) {
    await sender.xmpp.send(xml('message', { to, type: 'chat' }, xml('body', {}, body)));
  }
  await eventually(async () => expect(await stack.server.offline.count(to)).toBe(before + bodies.length));
}

/** Stores messages straight through the offline store (what routing does for an offline user). */
async function storeMessages(user: string, bodies: string[], from = 'juliet@localhost/balcony') {
  const stored: OfflineMessage[] = [];
  for (const body of bodies) {
    stored.push(
      await stack.server.offline.store(`${user}@localhost`, {
        from,
        storedAt: Date.now(),
        stanza: `<message xmlns='jabber:client' from='${from}' to='${user}@localhost' type='chat'><body>${body}</body></message>`,
      }),
    );
  }
  return stored;
}

function bodies(messages: Element[]): string[] {
  return messages.filter((m) => m.name === 'message').map((m) => m.getChildText('body') ?? '');
}

beforeAll(async () => {
  stack = await startTestStack({ OFFLINE_QUOTA: '20000' });
  doc = createDocumentClient({
    endpoint: stack.server.config.dynamodbEndpoint,
    region: stack.server.config.region,
  });
  await stack.addUser('juliet@localhost', 'juliet-secret');
  await stack.addUser('mercutio@localhost', 'mercutio-secret');
  juliet = await startClient(stack.url, 'juliet', 'juliet-secret', { resource: 'balcony' });
  mercutio = await startClient(stack.url, 'mercutio', 'mercutio-secret', { resource: 'pda' });
  clients.push(juliet, mercutio);
});

afterAll(async () => {
  for (const raw of sockets) raw.close();
  await Promise.all([...sockets.map((raw) => raw.closed), ...clients.map((c) => c.stop())]);
  // Every $disconnect handled (unavailable presence posted) before the gateway stops listening.
  await stack?.gateway.drained();
  doc?.destroy();
  await stack?.close();
});

describe('XEP-0013 §2: the seed’s examples', () => {
  let romeo: string;
  let raw: RawClient;
  let nodes: string[];

  beforeAll(async () => {
    romeo = await newUser('romeo');
    await leaveMessages(mercutio, `${romeo}@localhost`, ['A plague o’ both your houses!']);
    await leaveMessages(juliet, `${romeo}@localhost`, [
      'O Romeo, Romeo! wherefore art thou Romeo?',
      'Deny thy father and refuse thy name;',
      'Or, if thou wilt not, be but sworn my love,',
      'And I’ll no longer be a Capulet.',
    ]);
    nodes = await inbox(romeo);
    expect(nodes).toHaveLength(5);
    // The requests below are all made before initial presence: a client may read its inbox
    // without going online.
    raw = await connect(romeo, 'orchard');
  });

  it('§2.1 advertises the feature in the server’s disco#info', async () => {
    // <iq type='get' to='montague.net'>
    //   <query xmlns='http://jabber.org/protocol/disco#info'/>
    // </iq>
    const { reply } = await exchange(
      raw,
      `<iq type='get' id='disco1' to='localhost'><query xmlns='${DISCO_INFO}'/></iq>`,
    );
    // <iq type='result' from='montague.net' to='romeo@montague.net/orchard'>
    //   <query xmlns='http://jabber.org/protocol/disco#info'>
    //     <feature var='http://jabber.org/protocol/offline'/>
    //   </query>
    // </iq>
    expect(reply.attrs).toMatchObject({
      type: 'result',
      from: 'localhost',
      to: `${romeo}@localhost/orchard`,
    });
    const features = reply
      .getChild('query', DISCO_INFO)
      ?.getChildren('feature')
      .map((f) => f.attrs.var);
    expect(features).toContain(OFFLINE);
  });

  it('§2.2 returns the number of messages, sent without to, to the own bare JID and to the domain', async () => {
    // <iq type='get'>
    //   <query xmlns='http://jabber.org/protocol/disco#info'
    //          node='http://jabber.org/protocol/offline'/>
    // </iq>
    for (const to of ['', `${romeo}@localhost`, 'localhost']) {
      const { reply, before } = await exchange(raw, countRequest(to));
      expect(before).toEqual([]);
      // <iq type='result' to='romeo@montague.net/orchard'>
      //   <query xmlns='http://jabber.org/protocol/disco#info'
      //          node='http://jabber.org/protocol/offline'>
      //     <identity category='automation' type='message-list'/>
      //     <feature var='http://jabber.org/protocol/offline'/>
      //     <x xmlns='jabber:x:data' type='result'>
      //       <field var='FORM_TYPE' type='hidden'>
      //         <value>http://jabber.org/protocol/offline</value>
      //       </field>
      //       <field var='number_of_messages'>
      //         <value>66</value>
      //       </field>
      //     </x>
      //   </query>
      // </iq>
      expect(reply.attrs).toMatchObject({ type: 'result', to: `${romeo}@localhost/orchard` });
      const query = reply.getChild('query', DISCO_INFO);
      expect(query?.attrs.node).toBe(OFFLINE);
      expect(query?.getChild('identity')?.attrs).toMatchObject({
        category: 'automation',
        type: 'message-list',
      });
      expect(query?.getChildren('feature').map((f) => f.attrs.var)).toEqual([OFFLINE]);
      const form = query?.getChild('x', DATA_FORMS);
      expect(form?.attrs.type).toBe('result');
      const formType = form?.getChildren('field').find((f) => f.attrs.var === 'FORM_TYPE');
      expect(formType?.attrs.type).toBe('hidden');
      expect(formType?.getChildText('value')).toBe(OFFLINE);
      expect(numberOfMessages(reply)).toBe('5');
    }
  });

  it('§2.3 returns the headers, oldest first: jid = the user, name = the sender’s full JID, node = the id', async () => {
    // <iq type='get'>
    //   <query xmlns='http://jabber.org/protocol/disco#items'
    //          node='http://jabber.org/protocol/offline'/>
    // </iq>
    const { reply } = await exchange(raw, headersRequest());
    // <iq type='result' to='romeo@montague.net/orchard'>
    //   <query xmlns='http://jabber.org/protocol/disco#items'
    //          node='http://jabber.org/protocol/offline'>
    //     <item jid='romeo@montague.net' node='2003-02-27T22:49:17.008Z'
    //           name='mercutio@shakespeare.lit/pda'/>
    //     <item jid='romeo@montague.net' node='2003-02-27T22:52:37.225Z'
    //           name='juliet@capulet.com/balcony'/>
    //     [three more from juliet@capulet.com/balcony]
    //   </query>
    // </iq>
    expect(reply.attrs).toMatchObject({ type: 'result', to: `${romeo}@localhost/orchard` });
    expect(reply.getChild('query', DISCO_ITEMS)?.attrs.node).toBe(OFFLINE);
    const items = headerItems(reply);
    expect(items).toEqual([
      { jid: `${romeo}@localhost`, node: nodes[0], name: 'mercutio@localhost/pda' },
      ...nodes
        .slice(1)
        .map((node) => ({ jid: `${romeo}@localhost`, node, name: 'juliet@localhost/balcony' })),
    ]);
    // "applications MAY perform character-by-character dictionary ordering on the values".
    expect([...items.map((i) => i.node)].sort()).toEqual(items.map((i) => i.node));
    // The whole inbox fits: the seed's shape, no XEP-0059 set.
    expect(reply.getChild('query', DISCO_ITEMS)?.getChild('set', RSM)).toBeUndefined();
  });

  it('§2.4 sends the requested message with its node and one delay stamp, then the result', async () => {
    // <iq type='get' id='view1'>
    //   <offline xmlns='http://jabber.org/protocol/offline'>
    //     <item action='view' node='2003-02-27T22:52:37.225Z'/>
    //   </offline>
    // </iq>
    const { before, reply } = await exchange(
      raw,
      `<iq type='get' id='view1'><offline xmlns='${OFFLINE}'><item action='view' node='${nodes[1]}'/></offline></iq>`,
    );
    // <message to='romeo@montague.net' from='juliet@capulet.com/balcony'>
    //   <body>O Romeo, Romeo! wherefore art thou Romeo?</body>
    //   <offline xmlns='http://jabber.org/protocol/offline'>
    //     <item node='2003-02-27T22:52:37.225Z'/>
    //   </offline>
    // </message>
    // <iq type='result' to='user@domain/resource' id='view1'/>
    expect(before).toHaveLength(1);
    const message = before[0] as Element;
    expect(message.attrs).toMatchObject({ to: `${romeo}@localhost`, from: 'juliet@localhost/balcony' });
    expect(message.getChildText('body')).toBe('O Romeo, Romeo! wherefore art thou Romeo?');
    const marker = message.getChildren('offline', OFFLINE);
    expect(marker).toHaveLength(1);
    expect(marker[0]?.getChildren('item').map((i) => i.attrs.node)).toEqual([nodes[1]]);
    const delays = message.getChildren('delay', DELAY);
    expect(delays).toHaveLength(1);
    expect(delays[0]?.attrs.from).toBe('localhost');
    expect(Number.isNaN(Date.parse(delays[0]?.attrs.stamp))).toBe(false);
    expect(reply.attrs).toMatchObject({ type: 'result', id: 'view1', to: `${romeo}@localhost/orchard` });
    expect(reply.getChildElements()).toEqual([]);
    // Viewing deletes nothing.
    expect(await inbox(romeo)).toEqual(nodes);
  });

  it('§2.5 removes the requested messages and keeps the rest', async () => {
    // <iq type='set' id='remove1'>
    //   <offline xmlns='http://jabber.org/protocol/offline'>
    //     <item action='remove' node='2003-02-27T22:49:17.008Z'/>
    //     <item action='remove' node='2003-02-27T22:52:37.225Z'/>
    //   </offline>
    // </iq>
    const { before, reply } = await exchange(
      raw,
      `<iq type='set' id='remove1'><offline xmlns='${OFFLINE}'><item action='remove' node='${nodes[0]}'/><item action='remove' node='${nodes[1]}'/></offline></iq>`,
    );
    // <iq type='result' to='romeo@montague.net/orchard' id='remove1'/>
    expect(before).toEqual([]);
    expect(reply.attrs).toMatchObject({ type: 'result', id: 'remove1', to: `${romeo}@localhost/orchard` });
    expect(await inbox(romeo)).toEqual(nodes.slice(2));
    expect(numberOfMessages((await exchange(raw, countRequest())).reply)).toBe('3');
  });

  it('§2.6 fetches every message, then the result; nothing is deleted', async () => {
    // <iq type='get' id='fetch1'>
    //   <offline xmlns='http://jabber.org/protocol/offline'>
    //     <fetch/>
    //   </offline>
    // </iq>
    const { before, reply } = await exchange(
      raw,
      `<iq type='get' id='fetch1'><offline xmlns='${OFFLINE}'><fetch/></offline></iq>`,
    );
    // <message to='romeo@montague.net' from='juliet@capulet.com/balcony'>
    //   <body>O Romeo, Romeo! wherefore art thou Romeo?</body>
    //   <offline xmlns='http://jabber.org/protocol/offline'>
    //     <item node='2003-02-27T22:52:37.225Z'/>
    //   </offline>
    // </message>
    // <iq type='result' to='romeo@montague.net/orchard' id='fetch1'/>
    expect(bodies(before)).toEqual([
      'Deny thy father and refuse thy name;',
      'Or, if thou wilt not, be but sworn my love,',
      'And I’ll no longer be a Capulet.',
    ]);
    expect(before.map((m) => m.getChild('offline', OFFLINE)?.getChild('item')?.attrs.node)).toEqual(
      nodes.slice(2),
    );
    for (const message of before) expect(message.getChildren('delay', DELAY)).toHaveLength(1);
    expect(reply.attrs).toMatchObject({ type: 'result', id: 'fetch1', to: `${romeo}@localhost/orchard` });
    expect(await inbox(romeo)).toEqual(nodes.slice(2));
  });

  it('§2.7 purges every message', async () => {
    // <iq type='set' id='purge1'>
    //   <offline xmlns='http://jabber.org/protocol/offline'>
    //     <purge/>
    //   </offline>
    // </iq>
    const { before, reply } = await exchange(
      raw,
      `<iq type='set' id='purge1'><offline xmlns='${OFFLINE}'><purge/></offline></iq>`,
    );
    // <iq type='result' to='romeo@montague.net/orchard' id='purge1'/>
    expect(before).toEqual([]);
    expect(reply.attrs).toMatchObject({ type: 'result', id: 'purge1', to: `${romeo}@localhost/orchard` });
    expect(numberOfMessages((await exchange(raw, countRequest())).reply)).toBe('0');
    expect(await inbox(romeo)).toEqual([]);
    // §2.3: "If there are no offline messages for this user, the server MUST return an empty query".
    const empty = (await exchange(raw, headersRequest())).reply;
    expect(empty.attrs.type).toBe('result');
    expect(empty.getChild('query', DISCO_ITEMS)?.getChildElements()).toEqual([]);
  });
});

describe('view and remove', () => {
  let user: string;
  let raw: RawClient;
  let stored: OfflineMessage[];

  beforeAll(async () => {
    user = await newUser('viewer');
    stored = await storeMessages(user, ['one', 'two', 'three', 'four']);
    raw = await connect(user, 'desk');
  });

  it('gives two messages stored in the same millisecond distinct, increasing ids', async () => {
    const twins = await newUser('twins');
    const at = Date.now();
    const stanza = `<message xmlns='jabber:client' to='${twins}@localhost'><body>twin</body></message>`;
    const a = await stack.server.offline.store(`${twins}@localhost`, {
      from: 'x@localhost/a',
      storedAt: at,
      stanza,
    });
    const b = await stack.server.offline.store(`${twins}@localhost`, {
      from: 'x@localhost/b',
      storedAt: at,
      stanza,
    });
    const client = await connect(twins, 'r');
    const nodes = headerItems((await exchange(client, headersRequest())).reply).map((i) => i.node);
    expect(nodes).toEqual([a.id, b.id]);
    expect(a.id < b.id).toBe(true);
  });

  it('views several messages in one get, in the order asked, then the result', async () => {
    const { before, reply } = await exchange(
      raw,
      offlineRequest('get', viewItems([stored[2]?.id, stored[0]?.id] as string[])),
    );
    expect(reply.attrs.type).toBe('result');
    expect(bodies(before)).toEqual(['three', 'one']);
    expect(before.map((m) => m.getChild('offline', OFFLINE)?.getChild('item')?.attrs.node)).toEqual([
      stored[2]?.id,
      stored[0]?.id,
    ]);
    expect(await inbox(user)).toEqual(stored.map((m) => m.id));
  });

  it('answers a view with an unknown node with item-not-found and sends nothing', async () => {
    for (const unknown of ['2003-02-27T22:52:37.225Z', '000000000000001-0000-00000000', '']) {
      const items = `<item action='view' node='${stored[0]?.id}'/><item action='view' node='${unknown}'/>`;
      const { before, reply } = await exchange(raw, offlineRequest('get', items));
      expect(before).toEqual([]);
      expectError(reply, unknown === '' ? 'bad-request' : 'item-not-found');
    }
    expect(await raw.framesBeforePong()).toEqual([]);
  });

  it('answers a remove with an unknown node with item-not-found and removes nothing', async () => {
    const { before, reply } = await exchange(
      raw,
      offlineRequest('set', removeItems([stored[0]?.id, '000000000000001-0000-00000000'] as string[])),
    );
    expect(before).toEqual([]);
    expectError(reply, 'item-not-found');
    expect(await inbox(user)).toEqual(stored.map((m) => m.id));
  });

  it('removes several messages in one set; removing one twice is then item-not-found', async () => {
    const { reply } = await exchange(
      raw,
      offlineRequest('set', removeItems([stored[1]?.id, stored[3]?.id] as string[])),
    );
    expect(reply.attrs.type).toBe('result');
    expect(await inbox(user)).toEqual([stored[0]?.id, stored[2]?.id]);
    expect(await stack.server.offline.count(`${user}@localhost`)).toBe(2);
    expectError(
      (await exchange(raw, offlineRequest('set', removeItems([stored[1]?.id as string])))).reply,
      'item-not-found',
    );
    // A removed message can no longer be viewed either.
    expectError(
      (await exchange(raw, offlineRequest('get', viewItems([stored[3]?.id as string])))).reply,
      'item-not-found',
    );
  });
});

describe('shapes, addresses and authorization', () => {
  let user: string;
  let victim: string;
  let raw: RawClient;
  let node: string;
  let victimNodes: string[];

  beforeAll(async () => {
    user = await newUser('shaper');
    victim = await newUser('victim');
    node = (await storeMessages(user, ['mine']))[0]?.id as string;
    victimNodes = (await storeMessages(victim, ['secret one', 'secret two'])).map((m) => m.id);
    raw = await connect(user, 'grid');
  });

  const badShapes: Array<[string, 'get' | 'set', (node: string) => string]> = [
    ['fetch in a set', 'set', () => '<fetch/>'],
    ['view in a set', 'set', (n) => `<item action='view' node='${n}'/>`],
    ['purge in a get', 'get', () => '<purge/>'],
    ['remove in a get', 'get', (n) => `<item action='remove' node='${n}'/>`],
    ['an empty offline in a get', 'get', () => ''],
    ['an empty offline in a set', 'set', () => ''],
    ['fetch mixed with items', 'get', (n) => `<fetch/><item action='view' node='${n}'/>`],
    ['purge mixed with items', 'set', (n) => `<item action='remove' node='${n}'/><purge/>`],
    ['fetch with purge', 'get', () => '<fetch/><purge/>'],
    ['two fetches', 'get', () => '<fetch/><fetch/>'],
    [
      'view mixed with remove',
      'get',
      (n) => `<item action='view' node='${n}'/><item action='remove' node='${n}'/>`,
    ],
    ['an item without action', 'get', (n) => `<item node='${n}'/>`],
    ['an item with an unknown action', 'set', (n) => `<item action='delete' node='${n}'/>`],
    ['an item without node', 'get', () => `<item action='view'/>`],
    ['an unknown element', 'get', () => '<peek/>'],
    ['an element of another namespace', 'get', () => `<fetch xmlns='urn:example'/>`],
  ];

  for (const [name, type, inner] of badShapes) {
    it(`answers ${name} with bad-request, and forbidden for another user’s inbox`, async () => {
      const own = await exchange(raw, offlineRequest(type, inner(node)));
      expect(own.before).toEqual([]);
      expectError(own.reply, 'bad-request');
      const other = await exchange(
        raw,
        offlineRequest(type, inner(victimNodes[0] as string), `${victim}@localhost`),
      );
      expect(other.before).toEqual([]);
      expectError(other.reply, 'forbidden');
      expect(await inbox(user)).toEqual([node]);
      expect(await inbox(victim)).toEqual(victimNodes);
    });
  }

  it('answers every request on another user’s inbox with forbidden, revealing nothing', async () => {
    const empty = await newUser('empty');
    const requests = (target: string, nodes: string[]) => [
      countRequest(target),
      headersRequest('', target),
      headersRequest(`<set xmlns='${RSM}'><max>1</max></set>`, target),
      offlineRequest('get', viewItems(nodes), target),
      offlineRequest('set', removeItems(nodes), target),
      offlineRequest('get', '<fetch/>', target),
      offlineRequest('set', '<purge/>', target),
    ];
    const anonymous = (reply: Element) =>
      reply
        .toString()
        .replace(/ id="[^"]*"|id='[^']*'/g, '')
        .replaceAll(victim, 'X')
        .replaceAll(empty, 'X');
    const full = requests(`${victim}@localhost`, victimNodes);
    // The same requests (same nodes) on an account with an empty inbox answer alike.
    const none = requests(`${empty}@localhost`, victimNodes);
    for (let i = 0; i < full.length; i++) {
      const a = await exchange(raw, full[i] as string);
      const b = await exchange(raw, none[i] as string);
      expect(a.before).toEqual([]);
      expectError(a.reply, 'forbidden');
      expect(a.reply.getChild('query', DISCO_INFO)?.getChild('x')).toBeUndefined();
      expect(a.reply.getChild('query', DISCO_ITEMS)?.getChild('item')).toBeUndefined();
      expect(anonymous(a.reply)).toBe(anonymous(b.reply));
    }
    expect(await raw.framesBeforePong()).toEqual([]);
    expect(await inbox(victim)).toEqual(victimNodes);
    expect(await stack.server.offline.count(`${victim}@localhost`)).toBe(2);
  });

  it('answers <item/> without the <offline/> wrapper with service-unavailable', async () => {
    const { reply } = await exchange(
      raw,
      `<iq type='get' id='bare-item'><item xmlns='${OFFLINE}' action='view' node='${node}'/></iq>`,
    );
    expectError(reply, 'service-unavailable');
  });

  it('answers a disco request on an unknown node with item-not-found', async () => {
    const { reply } = await exchange(
      raw,
      `<iq type='get' id='nonode'><query xmlns='${DISCO_ITEMS}' node='http://jabber.org/protocol/offline#x'/></iq>`,
    );
    expectError(reply, 'item-not-found');
  });

  const rsmGrid: Array<[string, string, string]> = [
    ['a max that is not a number', `<max>ten</max>`, 'bad-request'],
    ['a negative max', `<max>-1</max>`, 'bad-request'],
    ['after and before together', `<after>${'0'.repeat(15)}-0000-00000000</after><before/>`, 'bad-request'],
    ['an empty after', `<after/>`, 'bad-request'],
    ['an after that names no item', `<after>2003-02-27T22:52:37.225Z</after>`, 'item-not-found'],
    ['a before that names no item', `<before>nope</before>`, 'item-not-found'],
    ['an index other than 0', `<index>371</index>`, 'feature-not-implemented'],
  ];
  for (const [name, set, condition] of rsmGrid) {
    it(`answers headers with ${name} with ${condition}`, async () => {
      const { reply } = await exchange(raw, headersRequest(`<set xmlns='${RSM}'>${set}</set>`));
      expectError(reply, condition);
    });
  }
});

/**
 * Drops `client`'s socket, waits for its $disconnect to detach the XEP-0198 session `smId`, and
 * resumes it on a new connection of `user` (PLAIN, then `<resume h='0'/>`).
 */
async function dropAndResume(client: RawClient, user: string, smId: string): Promise<RawClient> {
  client.terminate();
  await eventually(async () => expect((await stack.server.smQueue.get(smId))?.detachedFrom).toBeDefined());
  const again = await RawClient.connect(stack.url);
  sockets.push(again);
  await again.open();
  again.send(
    `<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>${Buffer.from(`\0${user}\0secret`).toString('base64')}</auth>`,
  );
  expect((await again.next()).name).toBe('success');
  await again.open();
  again.send(`<resume xmlns='urn:xmpp:sm:3' previd='${smId}' h='0'/>`);
  await again.until((el) => el.name === 'resumed', 15_000);
  return again;
}

describe('XEP-0013 §2.2: no flood once the session chose flexible retrieval', () => {
  /**
   * Sends initial presence and returns the messages of the flood (if any). Without stream
   * management the whole flood goes out while the presence is handled, so it all comes before
   * the answer to a ping sent next.
   */
  async function goOnline(raw: RawClient): Promise<Element[]> {
    raw.send('<presence/>');
    const frames = await raw.framesBeforePong(30_000);
    return frames.map((f) => parse(f)).filter((el) => el.name === 'message');
  }

  for (const [what, request] of [
    ['the count', () => countRequest()],
    ['the headers', () => headersRequest()],
    ['a fetch', () => offlineRequest('get', '<fetch/>')],
  ] as const) {
    it(`does not flood after ${what}, nor a second resource while the first is active; in-session messages flow`, async () => {
      const user = await newUser('nofl');
      const stored = await storeMessages(user, ['waiting 1', 'waiting 2']);
      const first = await connect(user, 'one');
      const asked = await exchange(first, request());
      expect(asked.reply.attrs.type).toBe('result');
      expect(await goOnline(first)).toEqual([]);
      const second = await connect(user, 'two');
      expect(await goOnline(second)).toEqual([]);
      expect(await inbox(user)).toEqual(stored.map((m) => m.id));

      // In-session messages are delivered as usual, without an offline marker.
      await juliet.xmpp.send(
        xml('message', { to: `${user}@localhost`, type: 'chat' }, xml('body', {}, 'live')),
      );
      for (const session of [first, second]) {
        const live = await session.until((el) => el.name === 'message');
        expect(live.getChildText('body')).toBe('live');
        expect(live.getChild('offline', OFFLINE)).toBeUndefined();
      }
      expect(await inbox(user)).toEqual(stored.map((m) => m.id));
    });
  }

  it('does not flood the second resource at a later presence change once the flexible session ended', async () => {
    // "the server MUST NOT flood the second resource": its availability began while the first
    // retrieved flexibly, so an auto-away after the first left is no new availability; only
    // going unavailable and available again is (XEP-0160 "next sends ... available presence").
    const user = await newUser('away');
    const stored = await storeMessages(user, ['managed 1', 'managed 2']);
    const first = await connect(user, 'pop');
    await exchange(first, headersRequest());
    expect(await goOnline(first)).toEqual([]);
    const second = await connect(user, 'desk');
    expect(await goOnline(second)).toEqual([]);
    first.close();
    await eventually(async () =>
      expect((await stack.server.sessions.listResources(`${user}@localhost`)).map((r) => r.resource)).toEqual(
        ['desk'],
      ),
    );
    second.send('<presence><show>away</show></presence>');
    const frames = (await second.framesBeforePong(30_000)).map((f) => parse(f));
    expect(frames.filter((el) => el.name === 'message')).toEqual([]);
    expect(await inbox(user)).toEqual(stored.map((m) => m.id));

    second.send(`<presence type='unavailable'/>`);
    expect(bodies(await goOnline(second))).toEqual(['managed 1', 'managed 2']);
  });

  it('keeps a resumed flexible session unflooded and without a hold at its presence changes', async () => {
    const user = await newUser('flexresume');
    const stored = await storeMessages(user, ['kept 1']);
    const pop = await connect(user, 'pop');
    await exchange(pop, headersRequest());
    pop.send(`<enable xmlns='urn:xmpp:sm:3' resume='true'/>`);
    const enabled = await pop.until((el) => el.name === 'enabled');
    expect(await goOnline(pop)).toEqual([]);
    const again = await dropAndResume(pop, user, enabled.attrs.id);
    // The resumed stream knows its session chose flexible retrieval: a presence change puts no
    // hold on its messages (a hold would store live messages arriving meanwhile, then be let go
    // without a flood, leaving them in the inbox).
    const row = await stack.server.sessions.getResource(`${user}@localhost`, 'pop');
    const state = await stack.server.sessions.getConnection(row?.connectionId as string);
    expect(state?.flexibleOffline).toBe(true);
    const hold = vi.spyOn(stack.server.sessions, 'releaseHold');
    again.send('<presence><show>away</show></presence>');
    const frames = (await again.framesBeforePong(30_000)).map((f) => parse(f));
    expect(frames.filter((el) => el.name === 'message')).toEqual([]);
    expect(hold).not.toHaveBeenCalled();
    hold.mockRestore();
    expect(await inbox(user)).toEqual(stored.map((m) => m.id));
  });

  it('does not flood a stream-management session that resumes while another resource is flexible', async () => {
    // "if the user authenticates and provides presence for another resource while the first
    // (non-flood) resource still has an active session, the server MUST NOT flood the second
    // resource" — a resumed session of that second resource neither.
    const user = await newUser('resumer');
    const stored = await storeMessages(user, ['kept 1', 'kept 2']);
    const first = await connect(user, 'pop');
    await exchange(first, headersRequest());
    expect(await goOnline(first)).toEqual([]);
    const second = await connect(user, 'phone');
    second.send(`<enable xmlns='urn:xmpp:sm:3' resume='true'/>`);
    const enabled = await second.until((el) => el.name === 'enabled');
    expect(await goOnline(second)).toEqual([]);
    // The socket is gone (its $disconnect detached the session); the client resumes on a new one.
    const again = await dropAndResume(second, user, enabled.attrs.id);
    // Everything the resume sent (the replay, and a flood if there were one) comes before the
    // answer to a ping sent after it (a fresh id: the replay resends the old stream's pong).
    const { before: after } = await exchange(
      again,
      `<iq type='get' id='after-resume' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>`,
      15_000,
    );
    expect(after.some((el) => el.name === 'presence')).toBe(true);
    expect(bodies(after.filter((el) => el.name === 'message'))).toEqual([]);
    expect(await inbox(user)).toEqual(stored.map((m) => m.id));
  });

  it('does not flood the second resource when it resumes after the flexible session ended', async () => {
    // "the server MUST NOT flood the second resource": the resume continues the session whose
    // availability began while the first retrieved flexibly; the first leaving meanwhile makes
    // the resume no "next" available presence (XEP-0160 §3). Going unavailable and back is.
    const user = await newUser('laterresume');
    const stored = await storeMessages(user, ['held 1', 'held 2']);
    const first = await connect(user, 'pop');
    await exchange(first, headersRequest());
    expect(await goOnline(first)).toEqual([]);
    const second = await connect(user, 'tablet');
    second.send(`<enable xmlns='urn:xmpp:sm:3' resume='true'/>`);
    const enabled = await second.until((el) => el.name === 'enabled');
    expect(await goOnline(second)).toEqual([]);
    first.close();
    await eventually(async () =>
      expect((await stack.server.sessions.listResources(`${user}@localhost`)).map((r) => r.resource)).toEqual(
        ['tablet'],
      ),
    );
    const again = await dropAndResume(second, user, enabled.attrs.id);
    const { before: after } = await exchange(
      again,
      `<iq type='get' id='after-late-resume' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>`,
      15_000,
    );
    expect(bodies(after.filter((el) => el.name === 'message'))).toEqual([]);
    expect(await inbox(user)).toEqual(stored.map((m) => m.id));
    // Nor at an auto-away of the resumed stream.
    again.send('<presence><show>away</show></presence>');
    const away = (await again.framesBeforePong(30_000)).map((f) => parse(f));
    expect(away.filter((el) => el.name === 'message')).toEqual([]);

    again.send(`<presence type='unavailable'/>`);
    again.send('<presence/>');
    const flood = await again.until(
      (el) => el.name === 'message' && el.getChildText('body') === 'held 2',
      15_000,
    );
    expect(flood.getChild('delay', 'urn:xmpp:delay')).toBeDefined();
  });

  it('floods at initial presence when no flexible request was made, and again once the flexible session ended', async () => {
    const user = await newUser('flood');
    // More than one page of the store (the flood reads 50 at a time).
    await seedOffline(doc, stack.server.config.tables.offline, `${user}@localhost`, 120, {
      body: (i) => `flood ${i}`,
    });
    const flexible = await connect(user, 'flex');
    await exchange(flexible, headersRequest());
    flexible.close();
    await eventually(async () =>
      expect(await stack.server.sessions.listResources(`${user}@localhost`)).toEqual([]),
    );

    const plain = await connect(user, 'plain');
    const flood = await goOnline(plain);
    expect(bodies(flood)).toEqual(Array.from({ length: 120 }, (_, i) => `flood ${i}`));
    for (const message of flood) {
      expect(message.getChildren('delay', DELAY)).toHaveLength(1);
      expect(message.getChild('offline', OFFLINE)).toBeUndefined();
    }
    await eventually(async () => expect(await inbox(user)).toEqual([]));
  });

  it('lets view, remove and purge work without marking the session (the flood still comes)', async () => {
    const user = await newUser('viewonly');
    const stored = await storeMessages(user, ['x', 'y', 'z']);
    const raw = await connect(user, 'v');
    expect(
      (await exchange(raw, offlineRequest('get', viewItems([stored[0]?.id as string])))).before,
    ).toHaveLength(1);
    expect(
      (await exchange(raw, offlineRequest('set', removeItems([stored[1]?.id as string])))).reply.attrs.type,
    ).toBe('result');
    expect(bodies(await goOnline(raw))).toEqual(['x', 'z']);
  });
});

describe('a 10,000-message inbox', () => {
  const SIZE = 10_000;
  let user: string;
  let raw: RawClient;
  let seeded: string[];

  beforeAll(async () => {
    user = await newUser('crowd');
    seeded = (await seedOffline(doc, stack.server.config.tables.offline, `${user}@localhost`, SIZE)).map(
      (m) => m.id,
    );
    raw = await connect(user, 'pager');
  }, 120_000);

  it('counts 10,000 from the counter', async () => {
    expect(numberOfMessages((await exchange(raw, countRequest())).reply)).toBe(String(SIZE));
  });

  it('returns as many headers as fit 128 KB, with a set carrying count, first and last, without <set/> in the request', async () => {
    // §2.3: "The server now MUST return headers for all of the user's offline messages": all
    // that one WebSocket message holds (not a page of 100), the rest by XEP-0059.
    const { reply, replyBytes } = await exchange(raw, headersRequest());
    expect(replyBytes).toBeLessThan(MESSAGE_LIMIT);
    expect(replyBytes).toBeGreaterThan(MESSAGE_LIMIT - 8 * 1024);
    const items = headerItems(reply);
    expect(items.length).toBeGreaterThan(500);
    expect(items.map((i) => i.node)).toEqual(seeded.slice(0, items.length));
    const set = reply.getChild('query', DISCO_ITEMS)?.getChild('set', RSM);
    expect(set?.getChildText('count')).toBe(String(SIZE));
    expect(set?.getChild('first')?.attrs.index).toBe('0');
    expect(set?.getChildText('first')).toBe(seeded[0]);
    expect(set?.getChildText('last')).toBe(seeded[items.length - 1]);
  });

  it('walks the whole inbox forwards with <after/>, every page under 128 KB, without duplicates', async () => {
    const walked: string[] = [];
    let after: string | undefined;
    let pages = 0;
    let firstPage = 0;
    for (;;) {
      const set = after ? `<set xmlns='${RSM}'><after>${after}</after></set>` : '';
      const { reply, replyBytes } = await exchange(raw, headersRequest(set));
      expect(replyBytes).toBeLessThan(MESSAGE_LIMIT);
      const items = headerItems(reply);
      if (items.length === 0) {
        expect(reply.getChild('query', DISCO_ITEMS)?.getChild('set', RSM)?.getChildText('count')).toBe(
          String(SIZE),
        );
        break;
      }
      pages += 1;
      if (pages === 1) firstPage = items.length;
      walked.push(...items.map((i) => i.node));
      after = reply.getChild('query', DISCO_ITEMS)?.getChild('set', RSM)?.getChildText('last') ?? undefined;
      expect(after).toBe(items.at(-1)?.node);
    }
    // The first request without <set/> (as many as fit), then pages of 100 (<set/> without <max/>).
    expect(pages).toBe(1 + Math.ceil((SIZE - firstPage) / 100));
    expect(new Set(walked).size).toBe(SIZE);
    expect(walked).toEqual(seeded);
  }, 60_000);

  it('walks it backwards from the last page with <before/> and <max/>', async () => {
    const walked: string[][] = [];
    let before = '';
    for (;;) {
      const set = `<set xmlns='${RSM}'><max>250</max>${before ? `<before>${before}</before>` : '<before/>'}</set>`;
      const { reply, replyBytes } = await exchange(raw, headersRequest(set));
      expect(replyBytes).toBeLessThan(MESSAGE_LIMIT);
      const items = headerItems(reply);
      if (items.length === 0) break;
      const rsm = reply.getChild('query', DISCO_ITEMS)?.getChild('set', RSM);
      if (walked.length === 0) expect(rsm?.getChild('first')?.attrs.index).toBe(String(SIZE - 250));
      walked.unshift(items.map((i) => i.node));
      before = rsm?.getChildText('first') as string;
      expect(before).toBe(items[0]?.node);
    }
    expect(walked).toHaveLength(SIZE / 250);
    expect(walked.flat()).toEqual(seeded);
  }, 60_000);

  it('answers <max>0</max> with the count only, caps a large max, and honours index 0', async () => {
    const counted = (await exchange(raw, headersRequest(`<set xmlns='${RSM}'><max>0</max></set>`))).reply;
    expect(headerItems(counted)).toEqual([]);
    const set = counted.getChild('query', DISCO_ITEMS)?.getChild('set', RSM);
    expect(set?.getChildElements().map((e) => e.name)).toEqual(['count']);
    expect(set?.getChildText('count')).toBe(String(SIZE));

    const large = await exchange(raw, headersRequest(`<set xmlns='${RSM}'><max>100000</max></set>`));
    expect(large.replyBytes).toBeLessThan(MESSAGE_LIMIT);
    expect(headerItems(large.reply)).toHaveLength(250);

    const indexed = await exchange(
      raw,
      headersRequest(`<set xmlns='${RSM}'><max>3</max><index>0</index></set>`),
    );
    expect(headerItems(indexed.reply).map((i) => i.node)).toEqual(seeded.slice(0, 3));
  });

  it('continues after a removed item (ids are ordered)', async () => {
    const removed = seeded[4] as string;
    expect((await exchange(raw, offlineRequest('set', removeItems([removed])))).reply.attrs.type).toBe(
      'result',
    );
    const { reply } = await exchange(
      raw,
      headersRequest(`<set xmlns='${RSM}'><max>2</max><after>${removed}</after></set>`),
    );
    expect(headerItems(reply).map((i) => i.node)).toEqual(seeded.slice(5, 7));
    seeded.splice(4, 1);
  });

  it('fetches every message as a separate frame, oldest first, then the result', async () => {
    const { before, reply } = await exchange(raw, offlineRequest('get', '<fetch/>'), 110_000);
    expect(reply.attrs.type).toBe('result');
    expect(before).toHaveLength(seeded.length);
    expect(before.map((m) => m.getChild('offline', OFFLINE)?.getChild('item')?.attrs.node)).toEqual(seeded);
    expect(before.every((m) => m.name === 'message' && m.getChildren('delay', DELAY).length === 1)).toBe(
      true,
    );
    expect(await stack.server.offline.count(`${user}@localhost`)).toBe(seeded.length);
  }, 120_000);
});

describe('pages of large headers', () => {
  it('stops a page before 128 KB when sender JIDs are long and escaped', async () => {
    const user = await newUser('wide');
    // Each name is a 1000-byte resource of '&', escaped to five bytes each on the wire.
    const seeded = await seedOffline(doc, stack.server.config.tables.offline, `${user}@localhost`, 150, {
      from: (i) => `sender@localhost/${i}${'&'.repeat(1000)}`,
    });
    const raw = await connect(user, 'w');
    const walked: string[] = [];
    let after = '';
    for (;;) {
      const set = after ? `<set xmlns='${RSM}'><after>${after}</after></set>` : '';
      const { reply, replyBytes } = await exchange(raw, headersRequest(set));
      expect(replyBytes).toBeLessThan(MESSAGE_LIMIT);
      const items = headerItems(reply);
      if (items.length === 0) break;
      expect(items.length).toBeLessThan(100);
      walked.push(...items.map((i) => i.node));
      expect(items[0]?.name).toMatch(/^sender@localhost\/\d+&{1000}$/);
      after = items.at(-1)?.node as string;
    }
    expect(walked).toEqual(seeded.map((m) => m.id));
  });
});

describe('XEP-0160 limits still hold', () => {
  it('drops expired messages from headers, view, remove and fetch', async () => {
    const user = await newUser('expiry');
    const old = await stack.server.offline.store(`${user}@localhost`, {
      from: 'juliet@localhost/balcony',
      storedAt: Date.now() - 31 * DAY_MS,
      stanza: `<message xmlns='jabber:client' to='${user}@localhost' type='chat'><body>stale</body></message>`,
    });
    const [fresh] = await storeMessages(user, ['fresh']);
    const raw = await connect(user, 'e');
    expect(headerItems((await exchange(raw, headersRequest())).reply).map((i) => i.node)).toEqual([
      fresh?.id,
    ]);
    expectError((await exchange(raw, offlineRequest('get', viewItems([old.id])))).reply, 'item-not-found');
    expectError((await exchange(raw, offlineRequest('set', removeItems([old.id])))).reply, 'item-not-found');
    expect(bodies((await exchange(raw, offlineRequest('get', '<fetch/>'))).before)).toEqual(['fresh']);
  });

  it('§2.3: an inbox whose messages all expired is an empty query, and §2.2 counts none of them', async () => {
    const user = await newUser('expired');
    for (const body of ['gone1', 'gone2']) {
      await stack.server.offline.store(`${user}@localhost`, {
        from: 'juliet@localhost/balcony',
        storedAt: Date.now() - 31 * DAY_MS,
        stanza: `<message xmlns='jabber:client' to='${user}@localhost' type='chat'><body>${body}</body></message>`,
      });
    }
    // DynamoDB's TTL removes them late, and never tells the counter: §2.2's count recounts
    // once a counted message has expired (before session 34 it said 2 until the quota recounted).
    const raw = await connect(user, 'e');
    expect(numberOfMessages((await exchange(raw, countRequest())).reply)).toBe('0');
    const { reply } = await exchange(raw, headersRequest());
    // "If there are no offline messages for this user, the server MUST return an empty query as
    // defined in XEP-0030."
    const query = reply.getChild('query', DISCO_ITEMS);
    expect(query?.attrs.node).toBe(OFFLINE);
    expect(query?.children).toEqual([]);
    // One fresh message: the whole inbox in one reply, the seed's plain list without a <set/>.
    const [fresh] = await storeMessages(user, ['fresh']);
    expect(numberOfMessages((await exchange(raw, countRequest())).reply)).toBe('1');
    const again = (await exchange(raw, headersRequest())).reply;
    expect(headerItems(again).map((i) => i.node)).toEqual([fresh?.id]);
    expect(again.getChild('query', DISCO_ITEMS)?.getChild('set', RSM)).toBeUndefined();
  });

  describe('with OFFLINE_QUOTA=3', () => {
    let small: TestStack;
    beforeAll(async () => {
      small = await startTestStack({ OFFLINE_QUOTA: '3' });
    });
    afterAll(async () => {
      await small?.close();
    });

    it('refuses past the quota, and accepts again after a remove and after a purge', async () => {
      const owner = await newUser('quota', small);
      const sender = await newUser('sender', small);
      const to = `${owner}@localhost`;
      const out = await connect(sender, 's', small);
      const send = (id: string) => {
        out.send(`<message to='${to}' type='chat' id='${id}'><body>${id}</body></message>`);
      };
      for (const id of ['m1', 'm2', 'm3']) send(id);
      await eventually(async () => expect(await small.server.offline.count(to)).toBe(3));
      send('m4');
      const refused = await out.until((el) => el.attrs.id === 'm4');
      expect(refused.attrs.type).toBe('error');
      // XEP-0160 §2: "because the recipient's offline message queue is full, the server returns
      // a <service-unavailable/> error to the sender".
      expect(refused.getChild('error')?.attrs.type).toBe('cancel');
      expectError(refused, 'service-unavailable');

      const raw = await connect(owner, 'q', small);
      const nodes = headerItems((await exchange(raw, headersRequest())).reply).map((i) => i.node);
      expect(nodes).toHaveLength(3);
      expect(
        (await exchange(raw, offlineRequest('set', removeItems([nodes[0] as string])))).reply.attrs.type,
      ).toBe('result');
      send('m5');
      await eventually(async () => expect(await small.server.offline.count(to)).toBe(3));
      const afterRemove = (await exchange(raw, offlineRequest('get', '<fetch/>'))).before;
      expect(bodies(afterRemove)).toEqual(['m2', 'm3', 'm5']);

      expect((await exchange(raw, offlineRequest('set', '<purge/>'))).reply.attrs.type).toBe('result');
      send('m6');
      await eventually(async () => expect(await small.server.offline.count(to)).toBe(1));
      // m5 and m6 were accepted: no error came back.
      expect(await out.framesBeforePong()).toEqual([]);
      // Closed while this stack still runs, so no disconnect reaches a stopped gateway.
      out.close();
      raw.close();
      await eventually(async () => {
        expect(await small.server.sessions.listResources(to)).toEqual([]);
        expect(await small.server.sessions.listResources(`${sender}@localhost`)).toEqual([]);
      });
    });
  });
});

describe('a stock xmpp.js client', () => {
  it('reads the count and the headers with iqCaller', async () => {
    const user = await newUser('stock');
    await leaveMessages(juliet, `${user}@localhost`, ['hello', 'again']);
    const client = await startClient(stack.url, user, 'secret', { resource: 'js' });
    clients.push(client);
    const info = await client.xmpp.iqCaller.get(xml('query', { xmlns: DISCO_INFO, node: OFFLINE }));
    const field = info
      .getChild('x', DATA_FORMS)
      ?.getChildren('field')
      .find((f: Element) => f.attrs.var === 'number_of_messages');
    expect(field?.getChildText('value')).toBe('2');
    const items = await client.xmpp.iqCaller.get(xml('query', { xmlns: DISCO_ITEMS, node: OFFLINE }));
    expect(items.getChildren('item').map((i: Element) => i.attrs.name)).toEqual([
      'juliet@localhost/balcony',
      'juliet@localhost/balcony',
    ]);
    // The session asked for headers: its initial presence brings no flood.
    await client.xmpp.send(xml('presence'));
    expect((await client.stanzasBeforePong()).filter((s) => s.is('message'))).toHaveLength(0);
    expect(await stack.server.offline.count(`${user}@localhost`)).toBe(2);
  });
});
