/**
 * Adversarial probes over raw RFC 7395 frames: what a hostile or buggy client sends, and
 * what the server must answer (RFC 6120, RFC 6121, RFC 7622, XEP-0198). Each test quotes the
 * rule it holds the server to.
 */
import type { Element } from 'ltx';
import { SaxesParser } from 'saxes';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RawClient } from '../../infra/local/raw-client.ts';
import { MAX_RESOURCE_BYTES } from '../../shared/store/sessions.ts';
import { eventually } from '../support/eventually.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

const FRAMING = 'urn:ietf:params:xml:ns:xmpp-framing';
const SASL = 'urn:ietf:params:xml:ns:xmpp-sasl';
const BIND = 'urn:ietf:params:xml:ns:xmpp-bind';
const STANZAS = 'urn:ietf:params:xml:ns:xmpp-stanzas';
const STREAMS = 'urn:ietf:params:xml:ns:xmpp-streams';
const SM3 = 'urn:xmpp:sm:3';
const PING = `<ping xmlns='urn:xmpp:ping'/>`;

let stack: TestStack;
const clients: RawClient[] = [];
/** Every frame any probe received, for the leak scan at the end. */
const everyFrame: string[] = [];

const USERS = [
  'ann',
  'bob',
  'cat',
  'dan',
  'eve',
  'fay',
  'gus',
  'hal',
  'ida',
  'jon',
  'kim',
  'leo',
  'mia',
  'ned',
  'oli',
  'pam',
  'quin',
  'rex',
  'sal',
  'tom',
  'uma',
  'vic',
  'wes',
  'xia',
  'yan',
  'zed',
  'abe',
  'bea',
];

beforeAll(async () => {
  // SM_ACK_EVERY high: no server <r/> in the middle of what a probe reads.
  stack = await startTestStack({ SM_ACK_EVERY: '1000', SM_MAX_SECONDS: '300' });
  for (const user of USERS) await stack.addUser(`${user}@localhost`, `${user}-pw`);
});

afterAll(async () => {
  for (const client of clients) client.terminate();
  await stack?.close();
});

async function connect(): Promise<RawClient> {
  const client = await RawClient.connect(stack.url);
  client.socket.on('message', (data) => everyFrame.push(data.toString()));
  clients.push(client);
  return client;
}

async function bound(user: string, resource?: string): Promise<RawClient> {
  const client = await connect();
  await client.login(user, `${user}-pw`, resource);
  return client;
}

function plain(user: string, password = `${user}-pw`): string {
  return `<auth xmlns='${SASL}' mechanism='PLAIN'>${Buffer.from(`\0${user}\0${password}`).toString('base64')}</auth>`;
}

function stanzaCondition(el: Element): string | undefined {
  return el
    .getChild('error')
    ?.getChildElements()
    .find((c) => c.attrs.xmlns === STANZAS)?.name;
}

function streamCondition(el: Element): string | undefined {
  return el.getChildElements().find((c) => c.attrs.xmlns === STREAMS)?.name;
}

/**
 * Reads frames until one matches `done` (it is included) or the server closes the stream,
 * whichever comes first; fails if neither happens within `timeoutMs`.
 */
async function framesUntil(
  client: RawClient,
  done: (el: Element) => boolean,
  timeoutMs = 10_000,
): Promise<Element[]> {
  const frames: Element[] = [];
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let el: Element;
    try {
      el = await client.next(Math.max(1, deadline - Date.now()));
    } catch (error) {
      if (client.isClosed) return frames;
      throw error;
    }
    frames.push(el);
    if (done(el)) return frames;
  }
}

async function expectStreamError(client: RawClient, ...conditions: string[]): Promise<Element> {
  const error = await client.until((el) => el.name === 'stream:error');
  expect(conditions).toContain(streamCondition(error));
  expect((await client.next()).is('close', FRAMING)).toBe(true);
  expect((await client.closed).code).toBe(1000);
  return error;
}

async function ping(client: RawClient, id: string): Promise<Element> {
  client.send(`<iq type='get' id='${id}' to='localhost'>${PING}</iq>`);
  return client.until((el) => el.name === 'iq' && el.attrs.id === id);
}

// ---------------------------------------------------------------------------------------------

describe('XML a client may not send (RFC 6120 §4.9.3.13, §11)', () => {
  // RFC 6120 §4.9.3.13: <not-well-formed/> "The initiating entity has sent XML that violates
  // the well-formedness rules of [XML] or [XML-NAMES]." The stanzas below are addressed to an
  // account that does not exist: a server that parsed them answers service-unavailable instead.
  const grid: Array<[string, string, string[]]> = [
    [
      // XML 1.0 §3.1 WFC Unique Att Spec: "An attribute name MUST NOT appear more than once".
      'a duplicated attribute',
      `<message to='nobody@localhost' to='alsonobody@localhost'><body>x</body></message>`,
      ['not-well-formed'],
    ],
    [
      // XML 1.0 §3.1 WFC No < in Attribute Values.
      "a '<' in an attribute value",
      `<message to='nobody@localhost' id='a<b'><body>x</body></message>`,
      ['not-well-formed'],
    ],
    [
      // Namespaces in XML 1.0 §5 NSC Prefix Declared: "The namespace prefix ... MUST have been declared";
      // RFC 6120 §4.9.3.2 names the condition: bad-namespace-prefix.
      'an undeclared namespace prefix',
      `<message to='nobody@localhost'><body>x</body><q:x/></message>`,
      ['bad-namespace-prefix'],
    ],
    [
      // XML 1.0 §2.4: "The ampersand character (&) ... MUST NOT appear in their literal form".
      "an unescaped '&'",
      `<message to='nobody@localhost'><body>fish & chips</body></message>`,
      ['not-well-formed'],
    ],
    [
      // XML 1.0 §2.2 Char: #x9 | #xA | #xD | [#x20-#xD7FF] | ... ; U+0001 is not a character.
      'a raw control character in an attribute',
      `<message to='nobody@localhost' id='a\u0001b'><body>x</body></message>`,
      ['not-well-formed'],
    ],
    [
      // RFC 6120 §11.1: comments MUST NOT appear (restricted-xml); here one hides behind a
      // CDATA opener inside an attribute value, which is itself not well-formed.
      'a comment smuggled behind a CDATA opener in an attribute',
      `<message to='nobody@localhost' a='<![CDATA['><!-- ']]>' --><body>x</body></message>`,
      ['restricted-xml', 'not-well-formed'],
    ],
  ];
  for (const entry of grid) {
    const [name, frame, conditions] = entry;
    it(`ends the stream on ${name}`, async () => {
      const client = await bound('ann', `wf-${grid.indexOf(entry)}`);
      client.send(frame);
      const first = await client.next();
      expect(first.name, `answered with ${first.toString()}`).toBe('stream:error');
      expect(conditions).toContain(streamCondition(first));
    });
  }

  it('never forwards raw control characters to another user (who could not parse them)', async () => {
    const bob = await bound('bob', 'ctl');
    const ann = await bound('ann', 'ctl');
    ann.send(`<message to='bob@localhost/ctl' type='chat' id='c1'><body>a\u0001b\u0000c</body></message>`);
    // RFC 6120 §4.9.3.13: the sender's stream ends with not-well-formed.
    await expectStreamError(ann, 'not-well-formed');
    // What bob would get is not XML: his client's parser fails and his stream dies. Once ann's
    // frames are handled, bob's pong comes after anything the server had posted to him.
    await stack.gateway.drained();
    expect(await bob.framesBeforePong()).toEqual([]);
  });

  it('never stores raw control characters for an offline user (a flood that breaks every login)', async () => {
    // RFC 6120 §4.9.3.13 again: the stanza is not XML, so it is refused, not stored. Stored, it
    // would reach bea at each initial presence and break her client's parser every time.
    const abe = await bound('abe', 'ctl');
    abe.send(`<message to='bea@localhost' id='c2'><body>poison\u0001</body></message>`);
    // The stream must end: every frame up to its close.
    const answers = await framesUntil(abe, () => false);
    expect(await stack.server.offline.count('bea@localhost')).toBe(0);
    expect(answers.map((el) => (el.name === 'stream:error' ? streamCondition(el) : el.name))).toContain(
      'not-well-formed',
    );
  });

  it('ends a stream sending a payload nested past the depth limit with policy-violation; nothing is routed', async () => {
    const cat = await bound('cat', 'deep'); // an online recipient
    const dan = await bound('dan', 'deep');
    const depth = 3000; // ~21 KB: well under the 64 KB stanza limit, far past MAX_DEPTH (64).
    dan.send(
      `<message to='cat@localhost/deep' id='d1'><x xmlns='urn:example:deep'>${'<a>'.repeat(depth)}${'</a>'.repeat(depth)}</x></message>`,
    );
    // RFC 6120 §4.9.3.18 <policy-violation/>: "...some local service policy (e.g., a stanza
    // exceeds a configured size limit)"; the frame parser refuses elements nested deeper than
    // 64 with it (shared/xml/frame.ts). internal-server-error is for the server's own faults.
    dan.send(`<iq type='get' id='after-deep' to='localhost'>${PING}</iq>`);
    const answers = await framesUntil(dan, (el) => el.attrs.id === 'after-deep');
    // The stream error, then the close: the ping after it is never handled.
    expect(answers.map((el) => el.name)).toEqual(['stream:error', 'close']);
    expect(streamCondition(answers[0] as Element)).toBe('policy-violation');
    expect((await dan.closed).code).toBe(1000);
    await stack.gateway.drained();
    expect(await cat.framesBeforePong()).toEqual([]);
  });

  // RFC 7395 §3.3.3: each WebSocket message is one complete XML element (a client keeps the
  // connection alive with WebSocket pings, not whitespace). A frame without an element is not an
  // XML document: the frame parser (shared/xml/frame.ts) refuses it as not-well-formed (RFC 6120
  // §4.9.3.13), which ends the stream; the frames behind it are dropped unhandled.
  for (const [name, frame] of [
    ['a space', ' '],
    ['a newline', '\n'],
    ['an empty frame', ''],
  ] as const) {
    it(`ends the stream on ${name} with not-well-formed, never an internal error`, async () => {
      const eve = await bound('eve', `ws-${name.replace(/ /g, '-')}`);
      eve.send(frame);
      eve.send(`<iq type='get' id='after-ws' to='localhost'>${PING}</iq>`);
      const frames = await framesUntil(eve, (el) => el.attrs.id === 'after-ws');
      expect(frames.map((el) => el.name)).toEqual(['stream:error', 'close']);
      expect(streamCondition(frames[0] as Element)).toBe('not-well-formed');
      expect((await eve.closed).code).toBe(1000);
    });
  }

  it('delivers CDATA content as escaped text, never as markup', async () => {
    const fay = await bound('fay', 'cdata');
    const gus = await bound('gus', 'cdata');
    gus.send(
      `<message to='fay@localhost/cdata' id='cd'><body><![CDATA[<b>fish & chips</b> ]]]]><![CDATA[>]]></body></message>`,
    );
    const message = await fay.until((el) => el.name === 'message');
    expect(message.getChildText('body')).toBe('<b>fish & chips</b> ]]>');
    expect(message.getChild('body')?.getChildElements()).toHaveLength(0);
    expect(message.attrs.from).toBe('gus@localhost/cdata');
  });
});

describe('namespaces with prefixes (Namespaces in XML 1.0)', () => {
  it('answers a ping whose payload uses a prefix like any other ping', async () => {
    // Namespaces in XML 1.0 §6.1: a prefixed name's namespace is the one bound to its prefix;
    // <p:ping xmlns:p='urn:xmpp:ping'/> is the element {urn:xmpp:ping}ping.
    // XEP-0199 §4.2: "the server MUST respond with an IQ-result" (or an error if unsupported).
    const hal = await bound('hal', 'prefix');
    hal.send(`<iq type='get' id='pp' to='localhost'><p:ping xmlns:p='urn:xmpp:ping'/></iq>`);
    const reply = await hal.next();
    expect(reply.attrs, reply.toString()).toMatchObject({ type: 'result', id: 'pp' });
  });

  it('does not call a prefixed jabber:client stanza an unsupported stanza type', async () => {
    // RFC 6120 §4.9.3.22 <unsupported-stanza-type/>: "a first-level child of the stream that
    // is not supported by the server" — an iq is supported. The prefix is either honoured or,
    // per §4.9.3.2, refused as <bad-namespace-prefix/>.
    const hal = await bound('hal', 'prefix2');
    hal.send(
      `<c:iq xmlns:c='jabber:client' type='get' id='cp' to='localhost'><ping xmlns='urn:xmpp:ping'/></c:iq>`,
    );
    const reply = await hal.next();
    if (reply.name === 'stream:error') expect(streamCondition(reply)).toBe('bad-namespace-prefix');
    else expect(reply.attrs).toMatchObject({ type: 'result', id: 'cp' });
  });
});

describe('JIDs at the limits (RFC 7622 §3)', () => {
  // RFC 7622 §3.4: "A resourcepart MUST NOT be zero octets in length and MUST NOT be more
  // than 1023 octets in length." 1023 octets is therefore a valid resourcepart.
  const longResource = 'r'.repeat(1023);

  it('binds a resource of 256 bytes, and refuses a longer one (a 1023-octet one too) with bad-request', async () => {
    // RFC 6120 §7.7.2.1: a resource the server cannot process is <bad-request/> (a stanza
    // error the client can recover from by binding another resource). Nimbus's bound is
    // MAX_RESOURCE_BYTES: a full JID is part of DynamoDB sort keys (README, Limits).
    const client = await connect();
    await client.open();
    client.send(plain('ida'));
    expect((await client.next()).is('success', SASL)).toBe(true);
    await client.open();
    for (const [id, resource] of [
      ['long', longResource],
      // 257 bytes: 127 two-byte characters and three more.
      ['over', `${'é'.repeat(MAX_RESOURCE_BYTES / 2 - 1)}rrr`],
    ]) {
      client.send(
        `<iq type='set' id='${id}'><bind xmlns='${BIND}'><resource>${resource}</resource></bind></iq>`,
      );
      const reply = await client.next();
      expect(reply.attrs, reply.toString()).toMatchObject({ type: 'error', id });
      expect(stanzaCondition(reply)).toBe('bad-request');
    }
    const longest = `${'é'.repeat(MAX_RESOURCE_BYTES / 2 - 1)}rr`;
    client.send(`<iq type='set' id='fits'><bind xmlns='${BIND}'><resource>${longest}</resource></bind></iq>`);
    const bound = await client.next();
    expect(bound.attrs.type).toBe('result');
    expect(bound.getChild('bind')?.getChildText('jid')).toBe(`ida@localhost/${longest}`);
  });

  it('answers an iq to a 1023-octet full JID that is not online with service-unavailable', async () => {
    // RFC 6121 §8.5.3.2.2 (no resource matches): "For an IQ stanza, the server MUST return a
    // <service-unavailable/> stanza error to the sender."
    const jon = await bound('jon', 'long');
    jon.send(`<iq type='get' id='lq' to='ida@localhost/${longResource}'>${PING}</iq>`);
    const reply = await jon.next();
    expect(reply.attrs.type).toBe('error');
    expect(stanzaCondition(reply), reply.toString()).toBe('service-unavailable');
  });

  it('normalises a resource to NFC, and keeps xml:lang and astral characters intact', async () => {
    // RFC 7622 §3.4.3: the resourcepart is an OpaqueString, "enforced" with NFC.
    const kim = await bound('kim', '📱 Téléphone');
    const leo = await bound('leo', 'uni');
    leo.send(
      `<message to='kim@localhost/📱 Te\u0301le\u0301phone' xml:lang='de' id='u1'><body xml:lang='de'>Grüße 🎉</body></message>`,
    );
    const message = await kim.until((el) => el.name === 'message');
    expect(message.attrs).toMatchObject({ from: 'leo@localhost/uni', to: 'kim@localhost/📱 Téléphone' });
    // RFC 6120 §8.1.5: xml:lang is kept on the routed stanza.
    expect(message.attrs['xml:lang']).toBe('de');
    expect(message.getChildText('body')).toBe('Grüße 🎉');
  });

  it("adds the stream's xml:lang to the stanzas it routes without one (RFC 6120 §4.7.4)", async () => {
    // "If the initiating entity included the 'xml:lang' attribute in its initial stream header,
    // the receiving entity SHOULD remember that value as the default xml:lang for all stanzas
    // sent by the initiating entity over the current stream … the receiving entity SHOULD add
    // the 'xml:lang' attribute to the stanza when routing it".
    const kim = await bound('kim', 'lang');
    const open = (lang: string) =>
      `<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0' xml:lang='${lang}'/>`;
    /** leo logs in with `first` in the initial header and `restart` in the one after SASL. */
    const leoSpeaking = async (first: string, restart: string, resource: string) => {
      const leo = await connect();
      leo.send(open(first));
      await leo.next();
      await leo.next();
      leo.send(plain('leo'));
      expect((await leo.next()).name).toBe('success');
      leo.send(open(restart));
      await leo.next();
      await leo.next();
      leo.send(
        `<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>${resource}</resource></bind></iq>`,
      );
      expect((await leo.next()).attrs.type).toBe('result');
      return leo;
    };
    const leo = await leoSpeaking('fr', 'de-CH', 'lang');
    leo.send(`<message to='kim@localhost/lang' id='l1'><body>Grüezi</body></message>`);
    leo.send(`<message to='kim@localhost/lang' id='l2' xml:lang='it'><body>Ciao</body></message>`);
    const first = await kim.until((el) => el.name === 'message' && el.attrs.id === 'l1');
    // The restart's header is the stream's now.
    expect(first.attrs['xml:lang']).toBe('de-CH');
    const second = await kim.until((el) => el.name === 'message' && el.attrs.id === 'l2');
    expect(second.attrs['xml:lang']).toBe('it');
    // The server's own language ('en', in its header to every client) is not repeated on each stanza.
    const english = await leoSpeaking('en', 'en', 'en');
    english.send(`<message to='kim@localhost/lang' id='l3'><body>Hello</body></message>`);
    const third = await kim.until((el) => el.name === 'message' && el.attrs.id === 'l3');
    expect(third.attrs['xml:lang']).toBeUndefined();
  });
});

describe('nothing crosses from one user to another', () => {
  it('drops iq results and message errors to a bare JID, and rewrites from on what it routes', async () => {
    const mia = await bound('mia', 'm1');
    mia.send('<presence/>');
    await mia.until((el) => el.name === 'presence');
    const ned = await bound('ned', 'n1');
    // RFC 6120 §8.2.3: a result or error answers a request; to a bare JID it answers nothing.
    ned.send(`<iq type='result' id='spoof1' to='mia@localhost' from='localhost'/>`);
    ned.send(
      `<message type='error' to='mia@localhost' from='localhost'><error type='cancel'><gone xmlns='${STANZAS}'/></error></message>`,
    );
    // RFC 6121 §4.3.2: a probe from someone without a subscription reveals nothing: "the
    // contact's server MUST return a presence stanza of type 'unsubscribed'"; A.3.3: a
    // 'subscribed' nobody asked for (mia in state None) is not delivered.
    ned.send(`<presence type='probe' to='mia@localhost'/>`);
    ned.send(`<presence type='subscribed' to='mia@localhost'/>`);
    const answer = await ned.next();
    expect(answer.attrs).toMatchObject({
      type: 'unsubscribed',
      from: 'mia@localhost',
      to: 'ned@localhost/n1',
    });
    // Ned's pong follows the handling of his stanzas; then mia's pong follows whatever that
    // handling had posted to her.
    expect(await ned.framesBeforePong()).toEqual([]);
    expect(await mia.framesBeforePong()).toEqual([]);
    // A result to a full JID is routed, but from the sender: never from the server.
    // docs/design.md: "A stanza's from is always rewritten by the server."
    ned.send(`<iq type='result' id='spoof2' to='mia@localhost/m1' from='localhost'/>`);
    const routed = await mia.until((el) => el.name === 'iq');
    expect(routed.attrs).toMatchObject({ id: 'spoof2', from: 'ned@localhost/n1', type: 'result' });
  });

  it('declares in an error reply the prefixes of the payload it echoes', async () => {
    // RFC 7395 §3.3.3: every WebSocket message is a stanza of its own, so a namespace prefix
    // the client declared on its stanza and used in a child must be declared again in the
    // error that echoes the child (RFC 6120 §8.3.1), or a namespace-aware parser (a browser's
    // DOMParser, under Strophe) refuses the whole frame.
    const rex = await bound('rex', 'prefix');
    rex.send(
      `<message xmlns:e='urn:example:hint' to='nobody-here@localhost' id='p1' type='chat'><body e:hint='x'>hi</body></message>`,
    );
    const frames: string[] = [];
    rex.socket.on('message', (data) => frames.push(data.toString()));
    const reply = await rex.until((el) => el.name === 'message' && el.attrs.id === 'p1');
    expect(reply.attrs.type).toBe('error');
    const frame = frames.find((text) => text.includes('id="p1"') || text.includes("id='p1'"));
    expect(frame).toBeDefined();
    const errors: string[] = [];
    const parser = new SaxesParser({ xmlns: true });
    parser.on('error', (error) => errors.push(error.message));
    parser.write(frame as string).close();
    expect(errors).toEqual([]);
  });

  it('does not let <auth/> after authentication switch the account', async () => {
    // RFC 6120 §6.4.6: after success, SASL is done for the stream; the server no longer offers
    // it, and the identity stays the one authenticated.
    const oli = await bound('oli', 'reauth');
    oli.send(plain('pam'));
    const answer = await oli.next();
    expect(answer.is('success', SASL)).toBe(false);
    expect(answer.name).toBe('stream:error');
  });

  it('refuses a second bind on a bound stream and keeps the bound JID', async () => {
    // RFC 6120 §7.1: the client binds one resource per stream (stream features no longer
    // offer bind once it is done).
    const quin = await bound('quin', 'first');
    quin.send(`<iq type='set' id='b2'><bind xmlns='${BIND}'><resource>second</resource></bind></iq>`);
    const reply = await quin.next();
    expect(reply.attrs.type).toBe('error');
    expect(reply.attrs.id).toBe('b2');
    const pong = await ping(quin, 'after-b2');
    expect(pong.attrs.to).toBe('quin@localhost/first');
    expect(await stack.server.sessions.getResource('quin@localhost', 'second')).toBeUndefined();
  });

  it('answers an iq without an id with bad-request', async () => {
    // RFC 6120 §8.1.3: "For <iq/> stanzas, it is REQUIRED" (the id attribute).
    const rex = await bound('rex', 'noid');
    rex.send(`<iq type='get' to='localhost'>${PING}</iq>`);
    const reply = await rex.next();
    expect(reply.attrs.type).toBe('error');
    expect(stanzaCondition(reply)).toBe('bad-request');
  });

  it('answers a bind without an id with bad-request, and binds the next one', async () => {
    // RFC 6120 §8.1.3: the id attribute "is REQUIRED" for iq stanzas, the bind request too.
    const client = await connect();
    await client.open();
    client.send(plain('rex'));
    expect((await client.next()).is('success', SASL)).toBe(true);
    await client.open();
    client.send(`<iq type='set'><bind xmlns='${BIND}'><resource>unnumbered</resource></bind></iq>`);
    const reply = await client.next();
    expect(reply.attrs.type).toBe('error');
    expect(stanzaCondition(reply)).toBe('bad-request');
    expect(await stack.server.sessions.getResource('rex@localhost', 'unnumbered')).toBeUndefined();
    client.send(
      `<iq type='set' id='withid'><bind xmlns='${BIND}'><resource>unnumbered</resource></bind></iq>`,
    );
    expect((await client.next()).attrs).toMatchObject({ type: 'result', id: 'withid' });
  });

  it('answers a presence priority outside -128..127 with bad-request', async () => {
    // RFC 6121 §4.7.2.3: "The value MUST be an integer between -128 and +127."
    const sal = await bound('sal', 'prio');
    // Nor a number written otherwise (xs:byte): forwarded as written, `1e2` would be 1 to a
    // client that parses it and 100 to the server's routing.
    for (const value of ['128', '-129', 'high', '1.5', '1e2', '0x10', '5.0', '', '\u00A05']) {
      sal.send(`<presence id='p${value}'><priority>${value}</priority></presence>`);
      const reply = await sal.next();
      expect(reply.attrs).toMatchObject({ type: 'error' });
      expect(stanzaCondition(reply)).toBe('bad-request');
    }
    // ...and the resource never became available.
    expect((await stack.server.sessions.getResource('sal@localhost', 'prio'))?.available).toBe(false);
    // An xs:byte may have leading zeros and XML whitespace around it.
    sal.send(`<presence id='ok'><priority>\n +007 </priority></presence>`);
    await sal.until((el) => el.name === 'presence' && el.attrs.type === undefined);
    const row = await stack.server.sessions.getResource('sal@localhost', 'prio');
    expect(row).toMatchObject({ available: true, priority: 7 });
  });

  it('routes a message to oneself, and a message of unknown type as normal', async () => {
    // RFC 6121 §5.2.2: "...does not understand the value of the 'type' attribute provided, it
    // MUST consider the message to be of type "normal"". XEP-0160: normal messages are stored.
    const tom = await bound('tom', 'self');
    tom.send(`<message to='tom@localhost/self' id='s1'><body>me</body></message>`);
    expect((await tom.next()).attrs).toMatchObject({ id: 's1', from: 'tom@localhost/self' });
    tom.send(`<message to='uma@localhost' type='fancy' id='f1'><body>stored</body></message>`);
    expect(await tom.framesBeforePong()).toEqual([]);
    const uma = await bound('uma', 'later');
    uma.send('<presence/>');
    const flooded = await uma.until((el) => el.name === 'message');
    expect(flooded.attrs).toMatchObject({ id: 'f1', from: 'tom@localhost/self' });
  });
});

describe('stream management at odd times (XEP-0198)', () => {
  it('keeps counting right when a bind conflict announces an unavailable resource', async () => {
    // XEP-0198 §4: "a counter of stanzas it has received and handled ('h')" — the client acks
    // every stanza it got. The server must have counted (and queued) every stanza it sent, or
    // an honest ack looks "too high" and the stream is killed.
    const desk = await bound('vic', 'desk');
    desk.send(`<enable xmlns='${SM3}'/>`);
    expect((await desk.next()).name).toBe('enabled');
    let received = 0;
    desk.send('<presence/>');
    await desk.until((el) => el.name === 'presence' && el.attrs.from === 'vic@localhost/desk');
    received += 1;
    const phone = await bound('vic', 'phone');
    phone.send('<presence/>');
    await desk.until((el) => el.name === 'presence' && el.attrs.from === 'vic@localhost/phone');
    received += 1;
    // The same resource binds again: the old 'phone' stream is replaced, desk hears it leave.
    await bound('vic', 'phone');
    const gone = await desk.until((el) => el.name === 'presence' && el.attrs.type === 'unavailable');
    expect(gone.attrs.from).toBe('vic@localhost/phone');
    received += 1;
    desk.send(`<a xmlns='${SM3}' h='${received}'/>`);
    desk.send(`<iq type='get' id='still-there' to='localhost'>${PING}</iq>`);
    const next = await desk.next();
    expect(next.name, next.toString()).toBe('iq');
    expect(next.attrs.id).toBe('still-there');
  });

  it('answers a resume with an absurdly long previd with <failed><item-not-found/>', async () => {
    // XEP-0198 §5: "If the server does not recognize the 'previd' as an earlier session ...
    // it MUST return a <failed/> element, which SHOULD include an error condition of
    // <item-not-found/>." And the client "SHOULD [be allowed] to bind a resource at this point".
    const client = await connect();
    await client.open();
    client.send(plain('wes'));
    expect((await client.next()).is('success', SASL)).toBe(true);
    await client.open();
    client.send(`<resume xmlns='${SM3}' previd='${'x'.repeat(3000)}' h='0'/>`);
    const failed = await client.next();
    expect(failed.name, failed.toString()).toBe('failed');
    expect(failed.getChild('item-not-found', STANZAS)).toBeDefined();
    client.send(`<iq type='set' id='b'><bind xmlns='${BIND}'/></iq>`);
    expect((await client.next()).attrs.type).toBe('result');
  });

  it('answers 30 <r/> in a row with 30 <a/>, and counts none of them', async () => {
    // XEP-0198 §4: "When an <r/> element ("request") is received, the recipient MUST acknowledge
    // it"; §3: nonzas "are not counted or acked".
    const xia = await bound('xia', 'flood');
    xia.send(`<enable xmlns='${SM3}'/>`);
    expect((await xia.next()).name).toBe('enabled');
    for (let i = 0; i < 30; i++) xia.send(`<r xmlns='${SM3}'/>`);
    for (let i = 0; i < 30; i++) expect((await xia.next()).attrs).toMatchObject({ h: '0' });
  });

  it('refuses an h of 2^32 without ending the stream', async () => {
    // XEP-0198 §4: h is an xs:unsignedInt, reset "from 2^32-1 back to zero (rather than being
    // incremented to 2^32)": 4294967296 is never a valid h.
    const yan = await bound('yan', 'big');
    yan.send(`<enable xmlns='${SM3}'/>`);
    expect((await yan.next()).name).toBe('enabled');
    yan.send(`<a xmlns='${SM3}' h='4294967296'/>`);
    const answer = await yan.next();
    expect(answer.name).toBe('failed');
    expect((await ping(yan, 'after-big-h')).attrs.type).toBe('result');
  });
});

describe('stored state left behind', () => {
  async function rowsOf(user: string) {
    return stack.server.sessions.listResources(`${user}@localhost`);
  }

  it('removes the resource rows after <close/>, a stream error, a vanished socket and a conflict, and the connection rows or marks them ended', async () => {
    // RFC 6120 §4.4: once the stream is closed the session is over; RFC 6120 §7.7.2.2: on a
    // resource conflict the old session is terminated.
    const closing = await bound('zed', 'close');
    const failing = await bound('zed', 'fail');
    const vanishing = await bound('zed', 'vanish');
    const first = await bound('zed', 'dup');
    const ids = Object.fromEntries((await rowsOf('zed')).map((r) => [r.resource, r.connectionId]));
    expect(Object.keys(ids).sort()).toEqual(['close', 'dup', 'fail', 'vanish']);

    closing.send(`<close xmlns='${FRAMING}'/>`);
    expect((await closing.next()).is('close', FRAMING)).toBe(true);
    failing.send(`<foo xmlns='urn:example'/>`);
    await expectStreamError(failing, 'unsupported-stanza-type');
    vanishing.terminate();
    await bound('zed', 'dup');
    await expectStreamError(first, 'conflict');

    await eventually(async () => {
      const rows = await rowsOf('zed');
      expect(rows.map((r) => r.resource)).toEqual(['dup']);
      expect(rows[0]?.connectionId).not.toBe(ids.dup);
      // A stream its own frame ended keeps its row, marked ended, for the frames still queued
      // behind that one (they are dropped) until it expires; the others' $disconnect deleted theirs.
      for (const id of [ids.close, ids.fail]) {
        expect(await stack.server.sessions.getConnection(id as string)).toMatchObject({
          connectionId: id,
          ended: true,
        });
      }
      for (const id of [ids.vanish, ids.dup]) {
        expect(await stack.server.sessions.getConnection(id as string)).toBeUndefined();
      }
    });
  });
});

describe('what reaches clients', () => {
  it('never carries a stack trace or internal error text in any frame of this suite', () => {
    expect(everyFrame.length).toBeGreaterThan(50);
    for (const frame of everyFrame) {
      expect(frame).not.toMatch(/\.ts:\d+|\bat [\w.<>]+ \(|Error:|ValidationException|ConditionalCheck/);
    }
  });
});
