/**
 * RFC 7395 framing and RFC 6120 stream errors, over a real socket through the gateway
 * emulator, with the real handlers and DynamoDB Local.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RawClient } from '../../infra/local/raw-client.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

const FRAMING = 'urn:ietf:params:xml:ns:xmpp-framing';
const OPEN = `<open xmlns='${FRAMING}' to='localhost' version='1.0'/>`;

let stack: TestStack;

beforeAll(async () => {
  stack = await startTestStack({ MAX_STANZA_BYTES: '16384' });
  await stack.addUser('alice@localhost', 'wonderland');
});
afterAll(() => stack?.close());

async function expectStreamError(client: RawClient, condition: string): Promise<void> {
  const error = await client.until((el) => el.name === 'stream:error');
  expect(error.attrs['xmlns:stream']).toBe('http://etherx.jabber.org/streams');
  expect(error.getChild(condition, 'urn:ietf:params:xml:ns:xmpp-streams')).toBeDefined();
  const close = await client.next();
  expect(close.is('close', FRAMING)).toBe(true);
  const closed = await client.closed;
  expect(closed.code).toBe(1000);
}

describe('RFC 7395 handshake', () => {
  it('answers subprotocol xmpp', async () => {
    const client = await RawClient.connect(stack.url, ['xmpp']);
    expect(client.socket.protocol).toBe('xmpp');
    client.close();
  });

  it('refuses a client that offers no xmpp subprotocol with a clear HTTP error', async () => {
    await expect(RawClient.connect(stack.url, [])).rejects.toThrow(/400/);
    await expect(RawClient.connect(stack.url, ['mqtt'])).rejects.toThrow(/400/);
  });
});

describe('RFC 7395 §3.4 stream opening', () => {
  it('answers <open/> with a self-closing <open/> and the features', async () => {
    const client = await RawClient.connect(stack.url);
    const { open, features } = await client.open();
    // RFC 7395 §3.4 example: <open xmlns="urn:ietf:params:xml:ns:xmpp-framing" from="example.com" id="++TR84Sm6A3hnt3Q065SnAbbk3Y=" xml:lang="en" version="1.0" />
    expect(open.name).toBe('open');
    expect(open.attrs).toMatchObject({ xmlns: FRAMING, from: 'localhost', version: '1.0', 'xml:lang': 'en' });
    expect(open.attrs.id).toMatch(/^[A-Za-z0-9_-]{16,}$/);
    expect(open.attrs.to).toBeUndefined();
    expect(open.children).toHaveLength(0);
    expect(features.name).toBe('stream:features');
    expect(features.attrs['xmlns:stream']).toBe('http://etherx.jabber.org/streams');
    const mechanisms = features.getChild('mechanisms', 'urn:ietf:params:xml:ns:xmpp-sasl');
    expect(mechanisms?.getChildren('mechanism').map((m) => m.getText())).toEqual([
      'SCRAM-SHA-256',
      'SCRAM-SHA-1',
      'PLAIN',
    ]);
    client.close();
  });

  it("answers a client's own stream error with <close/>, not with a stream error of its own (RFC 6120 §4.9)", async () => {
    const client = await RawClient.connect(stack.url);
    await client.open();
    client.send(
      `<stream:error xmlns:stream='http://etherx.jabber.org/streams'><undefined-condition xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>`,
    );
    const reply = await client.next();
    expect(reply.is('close', FRAMING)).toBe(true);
    expect((await client.closed).code).toBe(1000);
  });

  it("addresses its <open/> to the client's 'from', as a bare JID (RFC 6120 §4.7.2)", async () => {
    // "if the initiating entity included the 'from' attribute … the receiving entity MUST
    // include a 'to' attribute in the response stream header", set to that JID.
    const client = await RawClient.connect(stack.url);
    client.send(`<open xmlns='${FRAMING}' to='localhost' from='Juliet@LocalHost/balcony' version='1.0'/>`);
    const open = await client.next();
    expect(open.attrs).toMatchObject({ from: 'localhost', to: 'juliet@localhost' });
    client.close();
  });

  it('answers <close/> with <close/> and closes the socket', async () => {
    const client = await RawClient.connect(stack.url);
    await client.open();
    client.send(`<close xmlns='${FRAMING}'/>`);
    const close = await client.next();
    expect(close.is('close', FRAMING)).toBe(true);
    expect((await client.closed).code).toBe(1000);
  });

  it('stamps every outgoing stanza with xmlns jabber:client', async () => {
    const client = await RawClient.connect(stack.url);
    await client.login('alice', 'wonderland', 'framing');
    client.send(`<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>`);
    const text = await client.nextText();
    expect(text).toMatch(/^<iq[^>]* xmlns="jabber:client"/);
    client.close();
  });
});

describe('stream errors (RFC 6120 §4.9.3)', () => {
  const grid: Array<[string, string[], string]> = [
    ['not-well-formed: broken XML', [OPEN, '<message><body>x</message>'], 'not-well-formed'],
    ['not-well-formed: two elements in one frame', [OPEN, '<presence/><presence/>'], 'not-well-formed'],
    ['not-well-formed: text only', [OPEN, 'hello'], 'not-well-formed'],
    ['host-unknown: wrong to', [`<open xmlns='${FRAMING}' to='example.org' version='1.0'/>`], 'host-unknown'],
    // RFC 6120 §4.7.5: "If either entity receives a stream header with no 'version' attribute,
    // the entity MUST consider the version supported by the other entity to be '0.9'".
    [
      'unsupported-version: no version (0.9)',
      [`<open xmlns='${FRAMING}' to='localhost'/>`],
      'unsupported-version',
    ],
    [
      'unsupported-version: version 2.0',
      [`<open xmlns='${FRAMING}' to='localhost' version='2.0'/>`],
      'unsupported-version',
    ],
    [
      'invalid-namespace: open in another namespace',
      [`<open xmlns='jabber:client' to='localhost' version='1.0'/>`],
      'invalid-namespace',
    ],
    [
      'invalid-namespace: stanza in another namespace',
      [OPEN, `<message xmlns='jabber:server' to='a@localhost'/>`],
      'invalid-namespace',
    ],
    [
      'invalid-namespace: <stream:stream>',
      [`<stream:stream xmlns:stream='http://etherx.jabber.org/streams' to='localhost'/>`],
      'invalid-namespace',
    ],
    [
      'unsupported-stanza-type: a stanza before <open/>',
      [`<message to='a@localhost'><body>x</body></message>`],
      'unsupported-stanza-type',
    ],
    [
      'unsupported-stanza-type: unknown element',
      [OPEN, `<foo xmlns='urn:example'/>`],
      'unsupported-stanza-type',
    ],
    [
      'not-authorized: a stanza before authentication',
      [OPEN, `<message to='alice@localhost'><body>hi</body></message>`],
      'not-authorized',
    ],
    [
      'not-authorized: an iq before authentication',
      [OPEN, `<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>`],
      'not-authorized',
    ],
    ['restricted-xml: DOCTYPE', [OPEN, `<!DOCTYPE message [<!ENTITY x "y">]><message/>`], 'restricted-xml'],
    [
      'restricted-xml: entity declaration use',
      [OPEN, `<message><body>&xxe;</body></message>`],
      'restricted-xml',
    ],
    ['restricted-xml: comment', [OPEN, `<message><!-- hi --><body>x</body></message>`], 'restricted-xml'],
    ['restricted-xml: processing instruction', [OPEN, `<?app run='1'?><message/>`], 'restricted-xml'],
    [
      'unsupported-encoding: an XML declaration of another encoding than UTF-8',
      [`<?xml version='1.0' encoding='UTF-16'?>${OPEN}`],
      'unsupported-encoding',
    ],
    [
      // MAX_STANZA_BYTES is 16 KB in this suite: a 20 KB frame passes API Gateway's 32 KB limit
      // and is refused by the stream itself.
      'policy-violation: a stanza over the size limit',
      [OPEN, `<message><body>${'x'.repeat(20 * 1024)}</body></message>`],
      'policy-violation',
    ],
  ];
  for (const [name, frames, condition] of grid) {
    it(name, async () => {
      const client = await RawClient.connect(stack.url);
      for (const frame of frames) client.send(frame);
      await expectStreamError(client, condition);
    });
  }

  it('takes frames with an XML declaration: RFC 7395 §3.3.3 "The inclusion of XML declarations, however, is NOT RECOMMENDED"', async () => {
    const client = await RawClient.connect(stack.url);
    client.send(`<?xml version='1.0' encoding='UTF-8'?>${OPEN}`);
    expect((await client.next()).name).toBe('open');
    expect((await client.next()).name).toBe('stream:features');
    client.send(`<?xml version='1.0'?><close xmlns='${FRAMING}'/>`);
    expect((await client.next()).name).toBe('close');
    client.terminate();
  });

  it('opens the stream before the error when the error comes first (RFC 6120 §4.9.1.1)', async () => {
    const client = await RawClient.connect(stack.url);
    client.send(`<open xmlns='${FRAMING}' to='example.org' version='1.0'/>`);
    const open = await client.next();
    expect(open.is('open', FRAMING)).toBe(true);
    await expectStreamError(client, 'host-unknown');
  });

  it('never expands an entity and never leaks a stack trace', async () => {
    const client = await RawClient.connect(stack.url);
    client.send(OPEN);
    await client.next();
    await client.next();
    client.send(`<!DOCTYPE x [<!ENTITY a SYSTEM "file:///etc/passwd">]><x>&a;</x>`);
    // RFC 6120 §11.1: a DTD is restricted XML, so the stream ends; everything it sent is read.
    await client.closed;
    const frames = client.pending();
    expect(frames.join('')).toContain('restricted-xml');
    expect(frames.join('')).not.toMatch(/root:|at .*\.ts:\d+/);
  });
});

describe('gateway limits', () => {
  it('closes with 1009 on a message over 128 KB', async () => {
    const client = await RawClient.connect(stack.url);
    client.send(`<message><body>${'x'.repeat(129 * 1024)}</body></message>`);
    expect((await client.closed).code).toBe(1009);
  });
});
