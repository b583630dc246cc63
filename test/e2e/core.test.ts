/**
 * The XMPP core end to end: stock xmpp.js clients and raw frames through the local gateway,
 * real handlers, DynamoDB Local. RFC 6120 (SASL, bind), RFC 6121 (presence, routing) and
 * XEP-0160 (offline storage).
 */
import { readFileSync } from 'node:fs';
import { xml } from '@xmpp/client';
import { parse } from 'ltx';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RawClient } from '../../infra/local/raw-client.ts';
import { MAX_DIRECTED_BYTES, MAX_PRESENCE_BYTES } from '../../shared/modules/rfc6121-presence.ts';
import type { ConnectionPort } from '../../shared/outbound.ts';
import { encodeSaslPayload } from '../../shared/sasl/scram.ts';
import { eventually } from '../support/eventually.ts';
import { intercept } from '../support/intercept.ts';
import { scramClientFinal, scramClientFirst } from '../support/scram-client.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';
import { type StartedClient, startClient } from '../support/xmpp-client.ts';

const PACKAGE_VERSION = (
  JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }
).version;
const SASL = 'urn:ietf:params:xml:ns:xmpp-sasl';
const STANZAS = 'urn:ietf:params:xml:ns:xmpp-stanzas';
const DELAY = 'urn:xmpp:delay';

let stack: TestStack;
const running: StartedClient[] = [];

async function login(user: string, password: string, options: Parameters<typeof startClient>[3] = {}) {
  const client = await startClient(stack.url, user, password, options);
  running.push(client);
  return client;
}

function errorCondition(stanza: {
  getChild(name: string): { getChildElements(): { name: string }[] } | undefined;
}) {
  return stanza.getChild('error')?.getChildElements()[0]?.name;
}

beforeAll(async () => {
  // Many failed logins come from 127.0.0.1 here; the per-address limit is the abuse suite's subject.
  stack = await startTestStack({ OFFLINE_QUOTA: '5', AUTH_FAILURES_PER_ADDRESS: '1000' });
  for (const user of ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace']) {
    await stack.addUser(`${user}@localhost`, `${user}-secret`);
  }
});

afterAll(async () => {
  await Promise.all(running.map((c) => c.stop()));
  // Every <close/> and $disconnect handled (their posts made) before the gateway stops listening.
  await stack?.gateway.drained();
  await stack?.close();
});

describe('RFC 6120 §6 SASL', () => {
  it('logs in a stock xmpp.js client with SCRAM-SHA-1 and binds', async () => {
    const alice = await login('alice', 'alice-secret', { resource: 'laptop' });
    expect(alice.jid).toBe('alice@localhost/laptop');
  });

  it('logs in with PLAIN', async () => {
    const bob = await login('bob', 'bob-secret', { mechanism: 'PLAIN', resource: 'plain' });
    expect(bob.jid).toBe('bob@localhost/plain');
  });

  it('logs in with SCRAM-SHA-256 (RFC 7677) in a raw exchange and verifies the server signature', async () => {
    const raw = await RawClient.connect(stack.url);
    await raw.open();
    const clientFirst = scramClientFirst('carol', 'rOprNGfwEbeRWgbNEkqO');
    raw.send(`<auth xmlns='${SASL}' mechanism='SCRAM-SHA-256'>${encodeSaslPayload(clientFirst)}</auth>`);
    const challenge = await raw.next();
    expect(challenge.is('challenge', SASL)).toBe(true);
    const serverFirst = Buffer.from(challenge.getText(), 'base64').toString();
    // RFC 5802 §7: server-first-message = [reserved-mext ","] nonce "," salt "," iteration-count
    expect(serverFirst).toMatch(/^r=rOprNGfwEbeRWgbNEkqO[^,]+,s=[A-Za-z0-9+/=]+,i=4096$/);
    const final = scramClientFinal({ hash: 'sha256', password: 'carol-secret', clientFirst, serverFirst });
    raw.send(`<response xmlns='${SASL}'>${encodeSaslPayload(final.message)}</response>`);
    const success = await raw.next();
    expect(success.is('success', SASL)).toBe(true);
    expect(Buffer.from(success.getText(), 'base64').toString()).toBe(final.expectedServerFinal);
    const { features } = await raw.open();
    expect(features.getChild('bind', 'urn:ietf:params:xml:ns:xmpp-bind')).toBeDefined();
    raw.close();
  });

  // RFC 6120 §6.4.6 / §6.6: an authorization identity other than the authenticated one is
  // refused with <invalid-authzid/> (the module's own check, before any credential is read).
  it('refuses a SCRAM client-first whose authzid names another account: <invalid-authzid/>', async () => {
    const raw = await RawClient.connect(stack.url);
    await raw.open();
    const gs2Header = 'n,a=romeo@localhost,';
    const clientFirst = scramClientFirst('frank', 'authzidNonce0123456789', gs2Header);
    expect(clientFirst).toBe('n,a=romeo@localhost,n=frank,r=authzidNonce0123456789');
    raw.send(`<auth xmlns='${SASL}' mechanism='SCRAM-SHA-256'>${encodeSaslPayload(clientFirst)}</auth>`);
    const failure = await raw.next();
    expect(failure.is('failure', SASL)).toBe(true);
    expect(failure.getChildElements().map((child) => child.name)).toEqual(['invalid-authzid', 'text']);
    // The stream goes on: the same exchange without the foreign authzid succeeds.
    const own = scramClientFirst('frank', 'authzidNonce9876543210', 'n,a=frank@localhost,');
    raw.send(`<auth xmlns='${SASL}' mechanism='SCRAM-SHA-256'>${encodeSaslPayload(own)}</auth>`);
    const challenge = await raw.next();
    expect(challenge.is('challenge', SASL)).toBe(true);
    const serverFirst = Buffer.from(challenge.getText(), 'base64').toString();
    const final = scramClientFinal({
      hash: 'sha256',
      password: 'frank-secret',
      clientFirst: own,
      serverFirst,
      gs2Header: 'n,a=frank@localhost,',
    });
    raw.send(`<response xmlns='${SASL}'>${encodeSaslPayload(final.message)}</response>`);
    expect((await raw.next()).is('success', SASL)).toBe(true);
    raw.close();
  });

  it('refuses a PLAIN login whose authzid names another account, right password or not: <invalid-authzid/>', async () => {
    const failuresBefore = await stack.server.users.authFailures('frank@localhost');
    for (const password of ['frank-secret', 'wrong']) {
      const raw = await RawClient.connect(stack.url);
      await raw.open();
      raw.send(
        `<auth xmlns='${SASL}' mechanism='PLAIN'>${encodeSaslPayload(`romeo@localhost\0frank\0${password}`)}</auth>`,
      );
      const failure = await raw.next();
      expect(failure.is('failure', SASL)).toBe(true);
      expect(failure.getChild('invalid-authzid')).toBeDefined();
      raw.close();
    }
    // Refused before the password is looked at: no guess was checked, none is counted.
    expect(await stack.server.users.authFailures('frank@localhost')).toBe(failuresBefore);
  });

  async function failedScram(user: string, password: string) {
    const raw = await RawClient.connect(stack.url);
    await raw.open();
    const clientFirst = scramClientFirst(user, 'fyko+d2lbbFgONRv9qkxdawL');
    raw.send(`<auth xmlns='${SASL}' mechanism='SCRAM-SHA-1'>${encodeSaslPayload(clientFirst)}</auth>`);
    const challenge = await raw.next();
    const serverFirst = Buffer.from(challenge.getText(), 'base64').toString();
    const final = scramClientFinal({ hash: 'sha1', password, clientFirst, serverFirst });
    raw.send(`<response xmlns='${SASL}'>${encodeSaslPayload(final.message)}</response>`);
    const failure = await raw.next();
    raw.close();
    return { serverFirst, failure };
  }

  it('answers a wrong password and an unknown user alike: <not-authorized/>', async () => {
    const wrong = await failedScram('dave', 'not-the-password');
    const unknown = await failedScram('nobody', 'whatever');
    for (const { failure, serverFirst } of [wrong, unknown]) {
      expect(failure.is('failure', SASL)).toBe(true);
      expect(failure.getChild('not-authorized')).toBeDefined();
      // A plausible salt and the same iteration count for an unknown user: no enumeration.
      expect(serverFirst).toMatch(/,s=[A-Za-z0-9+/]{22}==,i=4096$/);
    }
    // The decoy salt is stable, as a real one is.
    expect((await failedScram('nobody', 'again')).serverFirst.split(',')[1]).toBe(
      unknown.serverFirst.split(',')[1],
    );
  });

  it('rejects a wrong password through xmpp.js', async () => {
    await expect(startClient(stack.url, 'erin', 'wrong', {})).rejects.toThrow(/not-authorized/);
  });

  const saslGrid: Array<[string, string, string]> = [
    ['an unknown mechanism', `<auth xmlns='${SASL}' mechanism='DIGEST-MD5'/>`, 'invalid-mechanism'],
    [
      'a payload that is not base64',
      `<auth xmlns='${SASL}' mechanism='PLAIN'>!!!</auth>`,
      'incorrect-encoding',
    ],
    [
      'a broken PLAIN message',
      `<auth xmlns='${SASL}' mechanism='PLAIN'>${encodeSaslPayload('no-nul-here')}</auth>`,
      'malformed-request',
    ],
    [
      'a broken SCRAM message',
      `<auth xmlns='${SASL}' mechanism='SCRAM-SHA-1'>${encodeSaslPayload('x,y')}</auth>`,
      'malformed-request',
    ],
    [
      'a response without auth',
      `<response xmlns='${SASL}'>${encodeSaslPayload('c=biws')}</response>`,
      'malformed-request',
    ],
    ['<abort/>', `<abort xmlns='${SASL}'/>`, 'aborted'],
    // RFC 6120 §6.4.2: "If the initiating entity needs to send a zero-length initial response, it
    // MUST transmit the response as a single equals sign character ("="), which indicates that
    // the response is present but contains no data." A SCRAM client-first message is never empty.
    [
      'an empty SCRAM initial response (=)',
      `<auth xmlns='${SASL}' mechanism='SCRAM-SHA-256'>=</auth>`,
      'malformed-request',
    ],
  ];
  for (const [name, frame, condition] of saslGrid) {
    it(`answers ${name} with <${condition}/> and keeps the stream`, async () => {
      const raw = await RawClient.connect(stack.url);
      await raw.open();
      raw.send(frame);
      const failure = await raw.next();
      expect(failure.is('failure', SASL)).toBe(true);
      expect(failure.getChild(condition)).toBeDefined();
      // The stream is still usable: a correct login follows.
      const payload = Buffer.from('\0frank\0frank-secret').toString('base64');
      raw.send(`<auth xmlns='${SASL}' mechanism='PLAIN'>${payload}</auth>`);
      expect((await raw.next()).is('success', SASL)).toBe(true);
      raw.close();
    });
  }

  it('ends the stream after repeated failures on a connection, each one told not-authorized', async () => {
    const raw = await RawClient.connect(stack.url);
    await raw.open();
    const bad = Buffer.from('\0grace\0wrong').toString('base64');
    for (let attempt = 1; attempt <= 2; attempt++) {
      raw.send(`<auth xmlns='${SASL}' mechanism='PLAIN'>${bad}</auth>`);
      expect((await raw.next()).getChild('not-authorized')).toBeDefined();
    }
    // RFC 6120 §6.5.10: <not-authorized/> "the initiating entity did not provide proper
    // credentials", also for the attempt that reaches the limit (never §6.5.12's
    // <temporary-auth-failure/>, which would have the client retry the same wrong password).
    raw.send(`<auth xmlns='${SASL}' mechanism='PLAIN'>${bad}</auth>`);
    const last = await raw.next();
    expect(last.getChild('not-authorized')).toBeDefined();
    expect(last.getChild('temporary-auth-failure')).toBeUndefined();
    const error = await raw.next();
    expect(error.name).toBe('stream:error');
    expect((await raw.closed).code).toBe(1000);
  });
  it('counts every failed exchange on the connection, not only wrong passwords (RFC 6120 §6.4.5)', async () => {
    // §6.4.5: "the receiving entity SHOULD allow a configurable but reasonable number of retries
    // (at least 2 and no more than 5)": an unknown mechanism and an aborted exchange are
    // failures too, so no client loops through them on one connection for ever.
    const raw = await RawClient.connect(stack.url);
    await raw.open();
    raw.send(`<auth xmlns='${SASL}' mechanism='DIGEST-MD5'/>`);
    expect((await raw.next()).getChild('invalid-mechanism')).toBeDefined();
    raw.send(`<auth xmlns='${SASL}' mechanism='SCRAM-SHA-256'/>`);
    // RFC 6120 §6.4.2: without an initial response, an empty challenge: no character data (the
    // '=' of "present but empty" is the client's convention for responses; Strophe decodes a
    // challenge with atob, which throws on '=').
    const empty = await raw.next();
    expect(empty.name).toBe('challenge');
    expect(empty.getText()).toBe('');
    raw.send(`<abort xmlns='${SASL}'/>`);
    expect((await raw.next()).getChild('aborted')).toBeDefined();
    raw.send(`<auth xmlns='${SASL}' mechanism='X-UNKNOWN'/>`);
    expect((await raw.next()).getChild('invalid-mechanism')).toBeDefined();
    const error = await raw.next();
    expect(error.name).toBe('stream:error');
    expect(error.getChild('policy-violation', 'urn:ietf:params:xml:ns:xmpp-streams')).toBeDefined();
    expect((await raw.closed).code).toBe(1000);
  });
  it('does not count a <response/> with no exchange in progress (a copy of a redelivered challenge answered late)', async () => {
    const raw = await RawClient.connect(stack.url);
    await raw.open();
    for (let i = 0; i < 4; i++) {
      raw.send(`<response xmlns='${SASL}'>${encodeSaslPayload('c=biws')}</response>`);
      expect((await raw.next()).getChild('malformed-request')).toBeDefined();
    }
    const payload = Buffer.from('\0frank\0frank-secret').toString('base64');
    raw.send(`<auth xmlns='${SASL}' mechanism='PLAIN'>${payload}</auth>`);
    expect((await raw.next()).is('success', SASL)).toBe(true);
    raw.close();
  });
  // Guessing across connections, addresses and accounts: test/e2e/abuse.test.ts.
});

describe('RFC 6120 §7 binding', () => {
  it('generates a resource when none is asked for', async () => {
    const raw = await RawClient.connect(stack.url);
    const jid = await raw.login('dave', 'dave-secret');
    expect(jid).toMatch(/^dave@localhost\/[0-9a-f]{12}$/);
    raw.close();
  });

  it('answers a bind request of the wrong shape with <bad-request/> (RFC 6120 §8.2.3, §7.7.2.1)', async () => {
    // §8.2.3: "An IQ stanza of type 'get' or 'set' MUST contain exactly one child element".
    const raw = await RawClient.connect(stack.url);
    await raw.open();
    raw.send(
      `<auth xmlns='${SASL}' mechanism='PLAIN'>${Buffer.from('\0dave\0dave-secret').toString('base64')}</auth>`,
    );
    expect((await raw.next()).name).toBe('success');
    await raw.open();
    const BIND = 'urn:ietf:params:xml:ns:xmpp-bind';
    for (const [id, frame] of [
      ['b1', `<iq type='set' id='b1'><bind xmlns='${BIND}'/><x xmlns='urn:x'/></iq>`],
      ['b2', `<iq type='get' id='b2'><bind xmlns='${BIND}'/></iq>`],
    ] as const) {
      raw.send(frame);
      const reply = await raw.next();
      expect(reply.attrs).toMatchObject({ type: 'error', id });
      expect(reply.getChild('error')?.attrs.type).toBe('modify');
      expect(reply.getChild('error')?.getChild('bad-request', STANZAS)).toBeDefined();
    }
    // The stream still binds.
    raw.send(`<iq type='set' id='b3'><bind xmlns='${BIND}'><resource>shape</resource></bind></iq>`);
    expect((await raw.next()).attrs).toMatchObject({ type: 'result', id: 'b3' });
    raw.close();
  });

  it('answers the legacy session iq with a result', async () => {
    const raw = await RawClient.connect(stack.url);
    await raw.login('dave', 'dave-secret', 'session');
    raw.send(`<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>`);
    const result = await raw.next();
    expect(result.attrs).toMatchObject({ type: 'result', id: 's1' });
    raw.close();
  });

  it('closes the old session with <conflict/> when the same resource binds again', async () => {
    const first = await RawClient.connect(stack.url);
    await first.login('dave', 'dave-secret', 'phone');
    const second = await RawClient.connect(stack.url);
    expect(await second.login('dave', 'dave-secret', 'phone')).toBe('dave@localhost/phone');
    const error = await first.until((el) => el.name === 'stream:error');
    expect(error.getChild('conflict', 'urn:ietf:params:xml:ns:xmpp-streams')).toBeDefined();
    expect((await first.closed).code).toBe(1000);
    // The new session works.
    second.send(`<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>`);
    expect((await second.next()).attrs.type).toBe('result');
    second.close();
  });

  // RFC 6120 §7.7.2.2: the server may "disallow the new resource binding attempt and maintain
  // the existing session". A bind from a connection older than the one holding the resource is
  // one handled late (retried through a storm after its client had connected anew): it must not
  // close the newer, live stream.
  it('refuses with <conflict/> a bind from an older connection than the one holding the resource', async () => {
    const older = await RawClient.connect(stack.url);
    await older.open();
    older.send(
      `<auth xmlns='${SASL}' mechanism='PLAIN'>${Buffer.from('\0dave\0dave-secret').toString('base64')}</auth>`,
    );
    expect((await older.next()).name).toBe('success');
    await older.open();
    const newer = await RawClient.connect(stack.url);
    expect(await newer.login('dave', 'dave-secret', 'tablet')).toBe('dave@localhost/tablet');
    older.send(
      `<iq type='set' id='late'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>tablet</resource></bind></iq>`,
    );
    const refused = await older.until((el) => el.attrs.id === 'late');
    expect(refused.attrs.type).toBe('error');
    expect(
      refused.getChild('error')?.getChild('conflict', 'urn:ietf:params:xml:ns:xmpp-stanzas'),
    ).toBeDefined();
    // The newer stream keeps the resource and works.
    newer.send(`<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>`);
    expect((await newer.next()).attrs).toMatchObject({ type: 'result', id: 'p' });
    older.close();
    newer.close();
  });

  it('before binding, refuses a stanza to the server or the account alone, and ends the stream for one to anyone else (RFC 6120 §7.1)', async () => {
    const raw = await RawClient.connect(stack.url);
    await raw.open();
    raw.send(
      `<auth xmlns='${SASL}' mechanism='PLAIN'>${Buffer.from('\0dave\0dave-secret').toString('base64')}</auth>`,
    );
    await raw.next();
    await raw.open();
    // "If, before completing the resource binding step, the client attempts to send an XML
    // stanza to an entity other than the server itself or the client's account, the server MUST
    // NOT process the stanza and MUST close the stream with a <not-authorized/> stream error".
    // To the server itself, or the account (no 'to'): not processed, and the stream goes on.
    for (const [id, to] of [
      ['early-server', " to='localhost'"],
      ['early-account', " to='dave@localhost'"],
      ['early-self', ''],
    ]) {
      raw.send(`<iq type='get' id='${id}'${to}><ping xmlns='urn:xmpp:ping'/></iq>`);
      const refused = await raw.until((el) => el.attrs.id === id);
      expect(refused.attrs.type).toBe('error');
      expect(refused.getChild('error')?.attrs.type).toBe('auth');
      expect(refused.getChild('error')?.getChild('not-authorized', STANZAS)).toBeDefined();
    }
    raw.send(`<message to='alice@localhost'><body>unbound</body></message>`);
    const error = await raw.until((el) => el.name === 'stream:error');
    expect(error.getChild('not-authorized', 'urn:ietf:params:xml:ns:xmpp-streams')).toBeDefined();
  });
});

describe('RFC 6121 presence and chat', () => {
  it('two users chat both ways; from is the sender’s full JID', async () => {
    const alice = await login('alice', 'alice-secret', { resource: 'chat' });
    const bob = await login('bob', 'bob-secret', { resource: 'chat' });
    await alice.xmpp.send(xml('presence'));
    await bob.xmpp.send(xml('presence'));
    await alice.xmpp.send(xml('message', { to: 'bob@localhost', type: 'chat' }, xml('body', {}, 'hi bob')));
    const atBob = await bob.waitFor((s) => s.is('message') && s.getChildText('body') === 'hi bob');
    expect(atBob.attrs.from).toBe('alice@localhost/chat');
    await bob.xmpp.send(xml('message', { to: atBob.attrs.from, type: 'chat' }, xml('body', {}, 'hi alice')));
    const atAlice = await alice.waitFor((s) => s.is('message') && s.getChildText('body') === 'hi alice');
    expect(atAlice.attrs.from).toBe('bob@localhost/chat');
  });

  it('never honours a spoofed from', async () => {
    const alice = await login('alice', 'alice-secret', { resource: 'spoof' });
    const bob = await login('bob', 'bob-secret', { resource: 'spoofed' });
    await bob.xmpp.send(xml('presence'));
    await alice.xmpp.send(
      xml(
        'message',
        { to: 'bob@localhost/spoofed', from: 'carol@localhost/x', type: 'chat' },
        xml('body', {}, 'who am i'),
      ),
    );
    const got = await bob.waitFor((s) => s.getChildText('body') === 'who am i');
    expect(got.attrs.from).toBe('alice@localhost/spoof');
  });

  it('routes a bare-JID chat to the highest non-negative priority; ties go to all; negative never', async () => {
    const high = await login('carol', 'carol-secret', { resource: 'high' });
    const low = await login('carol', 'carol-secret', { resource: 'low' });
    const negative = await login('carol', 'carol-secret', { resource: 'negative' });
    await high.xmpp.send(xml('presence', {}, xml('priority', {}, '10')));
    await low.xmpp.send(xml('presence', {}, xml('priority', {}, '1')));
    await negative.xmpp.send(xml('presence', {}, xml('priority', {}, '-1')));
    const sender = await login('dave', 'dave-secret', { resource: 'sender' });
    await high.waitFor((s) => s.is('presence') && s.attrs.from === 'carol@localhost/negative');

    await sender.xmpp.send(
      xml('message', { to: 'carol@localhost', type: 'chat' }, xml('body', {}, 'to the top')),
    );
    await high.waitFor((s) => s.getChildText('body') === 'to the top');

    await low.xmpp.send(xml('presence', {}, xml('priority', {}, '10')));
    // The update, not the initial presence at priority 1 that high saw before.
    await high.waitFor(
      (s) =>
        s.is('presence') && s.attrs.from === 'carol@localhost/low' && s.getChildText('priority') === '10',
    );
    await sender.xmpp.send(xml('message', { to: 'carol@localhost', type: 'chat' }, xml('body', {}, 'a tie')));
    await high.waitFor((s) => s.getChildText('body') === 'a tie');
    await low.waitFor((s) => s.getChildText('body') === 'a tie');

    // A full JID reaches that resource whatever its priority.
    await sender.xmpp.send(
      xml('message', { to: 'carol@localhost/negative', type: 'chat' }, xml('body', {}, 'direct')),
    );
    await negative.waitFor((s) => s.getChildText('body') === 'direct');

    // Headlines go to every non-negative resource.
    await sender.xmpp.send(
      xml('message', { to: 'carol@localhost', type: 'headline' }, xml('body', {}, 'news')),
    );
    await high.waitFor((s) => s.getChildText('body') === 'news');
    await low.waitFor((s) => s.getChildText('body') === 'news');
    // RFC 6121 §8.5.3.2.1: a headline to a full JID that matches no resource is silently
    // ignored, not spread over the others (nor stored); a chat message goes to the bare JID.
    await sender.xmpp.send(
      xml('message', { to: 'carol@localhost/gone', type: 'headline' }, xml('body', {}, 'stale news')),
    );
    await sender.xmpp.send(
      xml('message', { to: 'carol@localhost/gone', type: 'chat' }, xml('body', {}, 'after the news')),
    );
    await high.waitFor((s) => s.getChildText('body') === 'after the news');

    const bodies = (c: StartedClient) => c.received.map((s) => s.getChildText('body')).filter(Boolean);
    expect(bodies(low)).not.toContain('to the top');
    expect(bodies(negative)).toEqual(['direct']);
    for (const c of [high, low]) expect(bodies(c)).not.toContain('stale news');
    for (const c of [high, low, negative]) await c.stop();
  });

  it('shows a user’s resources to each other, never to other users', async () => {
    const one = await login('erin', 'erin-secret', { resource: 'one' });
    const other = await login('frank', 'frank-secret', { resource: 'watcher' });
    await other.xmpp.send(xml('presence'));
    await one.xmpp.send(xml('presence'));
    const two = await login('erin', 'erin-secret', { resource: 'two' });
    await two.xmpp.send(xml('presence', {}, xml('status', {}, 'here')));
    // The new resource learns of the existing one, and the existing one of the new.
    await two.waitFor((s) => s.is('presence') && s.attrs.from === 'erin@localhost/one');
    await one.waitFor((s) => s.is('presence') && s.attrs.from === 'erin@localhost/two');
    await two.xmpp.send(xml('presence', { type: 'unavailable' }));
    await one.waitFor(
      (s) => s.is('presence') && s.attrs.from === 'erin@localhost/two' && s.attrs.type === 'unavailable',
    );
    await one.stop();
    // Every frame handled (erin's close included), frank's pong comes after anything the server
    // had posted to him.
    await stack.gateway.drained();
    const atFrank = await other.stanzasBeforePong();
    expect(atFrank.filter((s) => s.is('presence') && s.attrs.from?.startsWith('erin@'))).toEqual([]);
  });

  it('delivers directed presence to a local full JID', async () => {
    const from = await login('alice', 'alice-secret', { resource: 'directed' });
    const to = await login('bob', 'bob-secret', { resource: 'directed' });
    await from.xmpp.send(xml('presence', { to: 'bob@localhost/directed' }));
    const got = await to.waitFor((s) => s.is('presence') && s.attrs.from === 'alice@localhost/directed');
    expect(got.attrs.type).toBeUndefined();
    // RFC 6121 §4.6.3: when the sender goes away, the recipient of its directed presence is told.
    await from.stop();
    const gone = await to.waitFor(
      (s) =>
        s.is('presence') && s.attrs.from === 'alice@localhost/directed' && s.attrs.type === 'unavailable',
    );
    expect(gone.attrs.to).toBe('bob@localhost/directed');
  });

  it("tells a directed-presence recipient the session's own unavailable presence, status included", async () => {
    // RFC 6121 §4.6.3 with §4.5.2: the user's unavailable presence, "possibly containing a
    // <status/> element", goes to the entities it sent directed presence to, as to its contacts.
    const from = await login('alice', 'alice-secret', { resource: 'dir-status' });
    const to = await login('bob', 'bob-secret', { resource: 'dir-status' });
    await from.xmpp.send(xml('presence', { to: 'bob@localhost/dir-status' }));
    await to.waitFor(
      (s) => s.is('presence') && s.attrs.from === 'alice@localhost/dir-status' && !s.attrs.type,
    );
    await from.xmpp.send(xml('presence', { type: 'unavailable' }, xml('status', {}, 'gone fishing')));
    const gone = await to.waitFor(
      (s) =>
        s.is('presence') && s.attrs.from === 'alice@localhost/dir-status' && s.attrs.type === 'unavailable',
    );
    expect(gone.getChildText('status')).toBe('gone fishing');
    await from.stop();
    await to.stop();
  });

  it("posts a bare JID's message once to a resource without stream management when the frame is tried again", async () => {
    // RFC 6121 §8.5.2.1.1: to each most available resource. The post to one is refused by API
    // Gateway past its retries (429), so the sender's frame is tried again; the resource the
    // first try reached has no count that could tell a second copy, and gets none.
    const one = await RawClient.connect(stack.url);
    await one.login('grace', 'grace-secret', 'one');
    one.send('<presence/>');
    await one.until((el) => el.name === 'presence');
    const two = await RawClient.connect(stack.url);
    await two.login('grace', 'grace-secret', 'two');
    two.send('<presence/>');
    await two.until((el) => el.name === 'presence' && el.attrs.from === 'grace@localhost/two');
    const sender = await RawClient.connect(stack.url);
    await sender.login('frank', 'frank-secret', 'twice');
    const port = (stack.server.outbound as unknown as { port: ConnectionPort }).port;
    const post = port.post.bind(port);
    const reached: string[] = [];
    let refused = false;
    const restore = intercept(port, 'post', async (connectionId, data, notAfter) => {
      if (data.includes('only once')) {
        // The second resource's first post is refused, after the first resource's went out.
        if (reached.length === 1 && !reached.includes(connectionId) && !refused) {
          refused = true;
          throw Object.assign(new Error('Too Many Requests'), {
            name: 'LimitExceededException',
            $metadata: { httpStatusCode: 429 },
          });
        }
        reached.push(connectionId);
      }
      return post(connectionId, data, notAfter);
    });
    try {
      sender.send(`<message to='grace@localhost' type='chat' id='once'><body>only once</body></message>`);
      await one.until((el) => el.name === 'message' && el.attrs.id === 'once');
      await two.until((el) => el.name === 'message' && el.attrs.id === 'once');
      await sender.framesBeforePong();
    } finally {
      restore();
    }
    expect(refused).toBe(true);
    const copies = [...(await one.framesBeforePong()), ...(await two.framesBeforePong())];
    expect(copies.filter((frame) => frame.includes('only once'))).toEqual([]);
    expect(reached).toHaveLength(2);
    for (const client of [one, two, sender]) client.terminate();
  });

  it('remembers directed presence for at most 8 KB of JIDs (the row every frame rewrites)', async () => {
    // RFC 6121 §4.6.3 asks the server to tell them when the session ends; the list is bounded
    // (README, Limits): past it, new recipients get the presence but are not remembered.
    const sender = await RawClient.connect(stack.url);
    await sender.login('alice', 'alice-secret', 'many');
    for (let i = 0; i < 40; i++)
      sender.send(`<presence to='${'x'.repeat(240)}${i}@localhost/${'r'.repeat(200)}'/>`);
    await sender.framesBeforePong();
    const row = await stack.server.sessions.getResource('alice@localhost', 'many');
    const state = await stack.server.sessions.getConnection(row?.connectionId as string);
    const remembered = state?.directedTo ?? [];
    const bytes = remembered.reduce((sum, jid) => sum + Buffer.byteLength(jid), 0);
    expect(bytes).toBeLessThanOrEqual(MAX_DIRECTED_BYTES);
    // As many as fit, the first ones, in order.
    expect(remembered.length).toBe(Math.floor(MAX_DIRECTED_BYTES / Buffer.byteLength(remembered[0] ?? 'x')));
    expect(remembered[0]).toBe(`${'x'.repeat(240)}0@localhost/${'r'.repeat(200)}`);
    sender.terminate();
  });

  it('refuses a broadcast presence over 8 KB with policy-violation, keeping the one before', async () => {
    // RFC 6120 §8.3.3.12 <policy-violation/>: "the entity has violated some local service
    // policy"; the presence is stored on the resource row that routing reads (README, Limits).
    const client = await RawClient.connect(stack.url);
    await client.login('alice', 'alice-secret', 'chatty');
    client.send(`<presence><status>here</status></presence>`);
    await client.until((el) => el.name === 'presence' && el.attrs.from === 'alice@localhost/chatty');
    client.send(`<presence id='big'><status>${'s'.repeat(MAX_PRESENCE_BYTES)}</status></presence>`);
    const refused = await client.until((el) => el.attrs.id === 'big');
    expect(refused.attrs.type).toBe('error');
    expect(refused.getChild('error')?.getChild('policy-violation', STANZAS)).toBeDefined();
    const row = await stack.server.sessions.getResource('alice@localhost', 'chatty');
    expect(row?.available).toBe(true);
    expect(parse(row?.presence as string).getChildText('status')).toBe('here');
    client.terminate();
  });

  it('announces unavailable to the other resources when a socket vanishes', async () => {
    const stay = await login('frank', 'frank-secret', { resource: 'stay' });
    const vanish = await RawClient.connect(stack.url);
    await vanish.login('frank', 'frank-secret', 'vanish');
    await stay.xmpp.send(xml('presence'));
    vanish.send('<presence/>');
    await stay.waitFor((s) => s.is('presence') && s.attrs.from === 'frank@localhost/vanish' && !s.attrs.type);
    vanish.terminate();
    await stay.waitFor(
      (s) => s.is('presence') && s.attrs.from === 'frank@localhost/vanish' && s.attrs.type === 'unavailable',
    );
  });
});

describe('XEP-0160 offline messages', () => {
  it('stores chat for an offline user and delivers it at initial presence, oldest first, with one delay stamp', async () => {
    const sender = await login('alice', 'alice-secret', { resource: 'offline-sender' });
    await stack.addUser('ophelia@localhost', 'ophelia-secret');
    const before = Date.now();
    for (const body of ['first', 'second', 'third']) {
      await sender.xmpp.send(
        xml('message', { to: 'ophelia@localhost', type: 'chat' }, xml('body', {}, body)),
      );
    }
    // Not stored (XEP-0160 §3, XEP-0334): chat states alone, headlines, no-store hints, errors.
    await sender.xmpp.send(
      xml(
        'message',
        { to: 'ophelia@localhost', type: 'chat' },
        xml('composing', { xmlns: 'http://jabber.org/protocol/chatstates' }),
      ),
    );
    await sender.xmpp.send(
      xml('message', { to: 'ophelia@localhost', type: 'headline' }, xml('body', {}, 'headline')),
    );
    await sender.xmpp.send(
      xml(
        'message',
        { to: 'ophelia@localhost', type: 'chat' },
        xml('body', {}, 'ephemeral'),
        xml('no-store', { xmlns: 'urn:xmpp:hints' }),
      ),
    );
    // Forced by <store/>.
    await sender.xmpp.send(
      xml(
        'message',
        { to: 'ophelia@localhost', type: 'chat' },
        xml('gone', { xmlns: 'http://jabber.org/protocol/chatstates' }),
        xml('store', { xmlns: 'urn:xmpp:hints' }),
      ),
    );
    // A claimed delay from our domain is not carried over: exactly one stamp on delivery.
    await sender.xmpp.send(
      xml(
        'message',
        { to: 'ophelia@localhost' },
        xml('body', {}, 'normal'),
        xml('delay', { xmlns: DELAY, from: 'localhost', stamp: '2000-01-01T00:00:00Z' }),
      ),
    );
    // Stored: the three chats, the one forced by <store/>, and the normal one.
    await eventually(async () => expect(await stack.server.offline.count('ophelia@localhost')).toBe(5));

    const ophelia = await login('ophelia', 'ophelia-secret', { resource: 'back' });
    // Logged in and bound, but no presence yet: no flood.
    expect((await ophelia.stanzasBeforePong()).filter((s) => s.is('message'))).toHaveLength(0);
    await ophelia.xmpp.send(xml('presence'));
    const normal = await ophelia.waitFor((s) => s.is('message') && s.getChildText('body') === 'normal');
    const messages = ophelia.received.filter((s) => s.is('message'));
    expect(messages.map((m) => m.getChildText('body') ?? '(gone)')).toEqual([
      'first',
      'second',
      'third',
      '(gone)',
      'normal',
    ]);
    for (const message of messages) {
      const delays = message.getChildren('delay', DELAY);
      expect(delays).toHaveLength(1);
      expect(delays[0]?.attrs.from).toBe('localhost');
      const stamp = Date.parse(delays[0]?.attrs.stamp);
      expect(stamp).toBeGreaterThanOrEqual(before - 1000);
      expect(stamp).toBeLessThanOrEqual(Date.now());
      expect(message.attrs.from).toBe('alice@localhost/offline-sender');
    }
    expect(normal.attrs.to).toBe('ophelia@localhost');
    // Delivered messages are removed from storage once posted.
    await eventually(async () => expect(await stack.server.offline.count('ophelia@localhost')).toBe(0));
  });

  it('stores a receipt-only chat message, floods at the first non-negative presence, ids follow storing order', async () => {
    await stack.addUser('portia@localhost', 'portia-pw');
    const sender = await login('bob', 'bob-secret', { resource: 'receipts' });
    // XEP-0160 §3: only messages "that contain only chat state notifications" are not stored.
    await sender.xmpp.send(
      xml(
        'message',
        { to: 'portia@localhost', type: 'chat', id: 'rcpt' },
        xml('received', { xmlns: 'urn:xmpp:receipts', id: 'm1' }),
      ),
    );
    await eventually(async () => expect(await stack.server.offline.count('portia@localhost')).toBe(1));
    const portia = await RawClient.connect(stack.url);
    await portia.login('portia', 'portia-pw', 'belmont');
    // "...when the recipient next sends non-negative available presence": not a negative one.
    portia.send(`<presence><priority>-1</priority></presence>`);
    // Its presence comes back (a user's presence reaches all its resources), and no flood.
    const answered = (await portia.framesBeforePong()).map((frame) => parse(frame).name);
    expect(answered).toEqual(['presence']);
    portia.send(`<presence><priority>1</priority></presence>`);
    const receipt = await portia.until((el) => el.name === 'message');
    expect(receipt.getChild('received', 'urn:xmpp:receipts')?.attrs.id).toBe('m1');
    portia.close();
  });

  it('refuses beyond the quota with service-unavailable, as for an account that does not exist', async () => {
    await stack.addUser('quota@localhost', 'quota-secret');
    const sender = await login('bob', 'bob-secret', { resource: 'quota' });
    for (let i = 1; i <= 5; i++) {
      await sender.xmpp.send(
        xml('message', { to: 'quota@localhost', type: 'chat', id: `q${i}` }, xml('body', {}, `m${i}`)),
      );
    }
    await sender.xmpp.send(
      xml('message', { to: 'quota@localhost', type: 'chat', id: 'q6' }, xml('body', {}, 'm6')),
    );
    const error = await sender.waitFor((s) => s.is('message') && s.attrs.type === 'error');
    expect(error.attrs.id).toBe('q6');
    // XEP-0160 §2: "if not (e.g., because the recipient's offline message queue is full), the
    // server returns a <service-unavailable/> error to the sender".
    expect(error.getChild('error')?.attrs.type).toBe('cancel');
    expect(errorCondition(error)).toBe('service-unavailable');
    // Nothing in the error says the account exists: no text.
    expect(error.getChild('error')?.getChild('text', STANZAS)).toBeUndefined();
    expect(await stack.server.offline.count('quota@localhost')).toBe(5);
  });

  it('answers a message to a user that does not exist with service-unavailable', async () => {
    const sender = await login('bob', 'bob-secret', { resource: 'nouser' });
    await sender.xmpp.send(
      xml('message', { to: 'nobody@localhost', type: 'chat', id: 'n1' }, xml('body', {}, 'hello?')),
    );
    const error = await sender.waitFor((s) => s.attrs.id === 'n1' && s.attrs.type === 'error');
    expect(errorCondition(error)).toBe('service-unavailable');
    expect(error.attrs.from).toBe('nobody@localhost');
  });

  it('answers another domain with remote-server-not-found and groupchat with service-unavailable', async () => {
    const sender = await login('bob', 'bob-secret', { resource: 'remote' });
    await sender.xmpp.send(
      xml('message', { to: 'someone@example.org', type: 'chat', id: 'r1' }, xml('body', {}, 'far')),
    );
    expect(errorCondition(await sender.waitFor((s) => s.attrs.id === 'r1'))).toBe('remote-server-not-found');
    await sender.xmpp.send(
      xml('message', { to: 'alice@localhost', type: 'groupchat', id: 'g1' }, xml('body', {}, 'room')),
    );
    expect(errorCondition(await sender.waitFor((s) => s.attrs.id === 'g1'))).toBe('service-unavailable');
  });

  it('answers directed presence to another domain with remote-server-not-found (a room join), and an unknown type with bad-request', async () => {
    const sender = await login('bob', 'bob-secret', { resource: 'far-presence' });
    // A XEP-0045 join is directed presence; RFC 6120 §10.4.3: "the stanza error MUST be
    // <remote-server-not-found/>" when the remote domain cannot be reached.
    await sender.xmpp.send(
      xml(
        'presence',
        { to: 'room@conference.example.org/bob', id: 'join1' },
        xml('x', { xmlns: 'http://jabber.org/protocol/muc' }),
      ),
    );
    const refused = await sender.waitFor((s) => s.attrs.id === 'join1');
    expect(refused.name).toBe('presence');
    expect(refused.attrs).toMatchObject({ type: 'error', from: 'room@conference.example.org/bob' });
    expect(errorCondition(refused)).toBe('remote-server-not-found');
    await sender.xmpp.send(
      xml('presence', { to: 'room@conference.example.org/bob', type: 'unavailable', id: 'leave1' }),
    );
    expect(errorCondition(await sender.waitFor((s) => s.attrs.id === 'leave1'))).toBe(
      'remote-server-not-found',
    );
    // RFC 6121 §4.7.1: an unknown 'type' "SHOULD return a stanza error of <bad-request/>".
    await sender.xmpp.send(xml('presence', { to: 'alice@localhost', type: 'bogus', id: 't1' }));
    const bad = await sender.waitFor((s) => s.attrs.id === 't1');
    expect(bad.attrs.type).toBe('error');
    expect(errorCondition(bad)).toBe('bad-request');
    await sender.xmpp.send(xml('presence', { type: 'away', id: 't2' }));
    expect(errorCondition(await sender.waitFor((s) => s.attrs.id === 't2'))).toBe('bad-request');
  });

  it('re-routes a message whose target connection is gone (410) to offline storage', async () => {
    await stack.addUser('ghost@localhost', 'ghost-secret');
    // A resource whose socket vanished without a $disconnect reaching the server.
    await stack.server.sessions.bindResource({
      user: 'ghost@localhost',
      resource: 'stale',
      connectionId: 'GoneConnId0000=',
      available: true,
      priority: 5,
      boundAt: Date.now(),
    });
    const sender = await login('alice', 'alice-secret', { resource: 'to-ghost' });
    // The counter is the stack's, cumulative since the file began.
    const goneBefore = stack.server.outbound.counters.gone;
    await sender.xmpp.send(xml('message', { to: 'ghost@localhost', type: 'chat' }, xml('body', {}, 'boo')));
    await eventually(async () => expect(await stack.server.offline.count('ghost@localhost')).toBe(1));
    expect(await stack.server.sessions.listResources('ghost@localhost')).toEqual([]);
    // The post to the vanished connection met its 410.
    expect(stack.server.outbound.counters.gone).toBeGreaterThan(goneBefore);
  });
});

describe('iq routing (RFC 6120 §8.2.3, §10)', () => {
  let raw: RawClient;
  beforeAll(async () => {
    raw = await RawClient.connect(stack.url);
    await raw.login('erin', 'erin-secret', 'iq');
  });
  afterAll(() => raw.close());

  async function ask(frame: string) {
    raw.send(frame);
    return raw.next();
  }

  it('answers disco#info with identity server/im and the registered features', async () => {
    const result = await ask(
      `<iq type='get' id='d1' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>`,
    );
    expect(result.attrs).toMatchObject({
      type: 'result',
      id: 'd1',
      from: 'localhost',
      to: 'erin@localhost/iq',
    });
    const query = result.getChild('query', 'http://jabber.org/protocol/disco#info');
    expect(query?.getChild('identity')?.attrs).toMatchObject({ category: 'server', type: 'im' });
    const features = query?.getChildren('feature').map((f) => f.attrs.var);
    expect(features).toEqual(
      expect.arrayContaining([
        'http://jabber.org/protocol/disco#info',
        'urn:xmpp:ping',
        'jabber:iq:version',
        'msgoffline',
      ]),
    );
  });

  it('answers disco#items, ping and software version', async () => {
    const items = await ask(
      `<iq type='get' id='d2' to='localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>`,
    );
    expect(items.attrs.type).toBe('result');
    // XEP-0199 §4.2 example: <iq from='capulet.lit' to='juliet@capulet.lit/balcony' id='c2s1' type='result'/>
    const pong = await ask(`<iq type='get' id='c2s1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>`);
    expect(pong.attrs).toMatchObject({ type: 'result', id: 'c2s1', from: 'localhost' });
    expect(pong.children).toHaveLength(0);
    const version = await ask(
      `<iq type='get' id='v1' to='localhost'><query xmlns='jabber:iq:version'/></iq>`,
    );
    expect(version.getChild('query')?.getChildText('name')).toBe('Nimbus');
    // XEP-0092 §2: <version/> is "the specific version of the software"; the package's own.
    expect(version.getChild('query')?.getChildText('version')).toBe(PACKAGE_VERSION);
  });

  it('answers for an account: ping to a bare JID, unknown payload service-unavailable', async () => {
    const pong = await ask(`<iq type='get' id='b1' to='erin@localhost'><ping xmlns='urn:xmpp:ping'/></iq>`);
    expect(pong.attrs).toMatchObject({ type: 'result', from: 'erin@localhost' });
    // Another user's account answers only a contact it shares presence with (XEP-0030 §8's
    // rule, test/e2e/subscriptions.test.ts); to erin, alice's is as one that does not exist.
    for (const target of ['alice@localhost', 'nobody@localhost']) {
      const refused = await ask(
        `<iq type='get' id='b-${target}' to='${target}'><ping xmlns='urn:xmpp:ping'/></iq>`,
      );
      expect(refused.getChild('error')?.getChild('service-unavailable', STANZAS)).toBeDefined();
    }
    const unknown = await ask(
      `<iq type='get' id='b2' to='erin@localhost'><query xmlns='urn:example:unknown'/></iq>`,
    );
    expect(unknown.attrs.type).toBe('error');
    expect(unknown.getChild('error')?.getChild('service-unavailable', STANZAS)).toBeDefined();
  });

  it('tells nothing about other accounts through disco (XEP-0030 §8)', async () => {
    // "the server MUST return a <service-unavailable/> error if the target entity does not exist
    // or if the requesting entity is not authorized to receive presence from the target entity"
    for (const target of ['alice@localhost', 'nobody@localhost']) {
      const info = await ask(
        `<iq type='get' id='di-${target}' to='${target}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>`,
      );
      expect(info.getChild('error')?.getChild('service-unavailable', STANZAS)).toBeDefined();
      // "...MUST return an empty result set if the target entity does not exist".
      const items = await ask(
        `<iq type='get' id='dt-${target}' to='${target}'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>`,
      );
      expect(items.attrs.type).toBe('result');
      expect(items.getChild('query')?.children).toHaveLength(0);
      // "...(no matter if the request specifies a node or not)".
      const nodeInfo = await ask(
        `<iq type='get' id='dn-${target}' to='${target}'><query xmlns='http://jabber.org/protocol/disco#info' node='urn:example:node'/></iq>`,
      );
      expect(nodeInfo.getChild('error')?.getChild('service-unavailable', STANZAS)).toBeDefined();
      const nodeItems = await ask(
        `<iq type='get' id='dm-${target}' to='${target}'><query xmlns='http://jabber.org/protocol/disco#items' node='urn:example:node'/></iq>`,
      );
      expect(nodeItems.attrs.type).toBe('result');
      expect(nodeItems.getChild('query')?.attrs.node).toBe('urn:example:node');
      expect(nodeItems.getChild('query')?.children).toHaveLength(0);
    }
    // On the user's own account an unknown node is item-not-found (XEP-0030 §3.2).
    const ownNode = await ask(
      `<iq type='get' id='dno' to='erin@localhost'><query xmlns='http://jabber.org/protocol/disco#info' node='urn:example:node'/></iq>`,
    );
    expect(ownNode.getChild('error')?.getChild('item-not-found', STANZAS)).toBeDefined();
    const own = await ask(
      `<iq type='get' id='do' to='erin@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>`,
    );
    expect(own.getChild('query')?.getChild('identity')?.attrs).toMatchObject({
      category: 'account',
      type: 'registered',
    });
    // XEP-0199 §5: "If an entity supports the XMPP Ping protocol, it MUST report that fact by
    // including a service discovery feature of 'urn:xmpp:ping'": the account answers pings.
    expect(
      own
        .getChild('query')
        ?.getChildren('feature')
        .map((f) => f.attrs.var),
    ).toEqual([
      'http://jabber.org/protocol/disco#info',
      'http://jabber.org/protocol/disco#items',
      'urn:xmpp:ping',
    ]);
  });

  it('serves the roster for the account only, never addressed to the server', async () => {
    const roster = await ask(`<iq type='get' id='ro1'><query xmlns='jabber:iq:roster'/></iq>`);
    expect(roster.attrs.type).toBe('result');
    const toServer = await ask(
      `<iq type='get' id='ro2' to='localhost'><query xmlns='jabber:iq:roster'/></iq>`,
    );
    expect(toServer.getChild('error')?.getChild('service-unavailable', STANZAS)).toBeDefined();
  });

  it('advertises Result Set Management, which XEP-0013 headers and XEP-0136 requests page with (XEP-0059 §4)', async () => {
    // <feature var='http://jabber.org/protocol/rsm'/>
    const info = await ask(
      `<iq type='get' id='rsm1' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>`,
    );
    expect(
      info
        .getChild('query')
        ?.getChildren('feature')
        .map((f) => f.attrs.var),
    ).toContain('http://jabber.org/protocol/rsm');
  });

  it('handles an iq without a to address on behalf of the account (RFC 6120 §10.3.3)', async () => {
    // "If the stanza possesses no 'to' attribute, the server MUST handle it directly on behalf of
    // the entity that sent it": a disco#info describes the account, not the server.
    const info = await ask(
      `<iq type='get' id='s1'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>`,
    );
    expect(info.attrs).toMatchObject({ type: 'result', id: 's1' });
    expect(info.getChild('query')?.getChild('identity')?.attrs).toMatchObject({
      category: 'account',
      type: 'registered',
    });
    // What only the server answers is still answered: RFC 3921's session establishment, which
    // old clients send without 'to' (RFC 6121 Appendix E), and the software version.
    const session = await ask(
      `<iq type='set' id='s2'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>`,
    );
    expect(session.attrs).toMatchObject({ type: 'result', id: 's2' });
    const version = await ask(`<iq type='get' id='s3'><query xmlns='jabber:iq:version'/></iq>`);
    expect(version.getChild('query')?.getChildText('name')).toBe('Nimbus');
    // And what nobody serves is refused as before.
    const unknown = await ask(`<iq type='get' id='s4'><query xmlns='urn:example:unknown'/></iq>`);
    expect(unknown.getChild('error')?.getChild('service-unavailable', STANZAS)).toBeDefined();
  });

  it('answers an iq to an offline full JID with service-unavailable', async () => {
    const reply = await ask(
      `<iq type='get' id='f1' to='alice@localhost/nowhere'><ping xmlns='urn:xmpp:ping'/></iq>`,
    );
    expect(reply.getChild('error')?.getChild('service-unavailable', STANZAS)).toBeDefined();
  });

  it('routes an iq to an online full JID and its result back', async () => {
    const callee = await login('frank', 'frank-secret', { resource: 'callee' });
    const reply = await ask(
      `<iq type='get' id='x1' to='frank@localhost/callee'><ping xmlns='urn:xmpp:ping'/></iq>`,
    );
    // xmpp.js answers pings itself.
    expect(reply.attrs).toMatchObject({ type: 'result', id: 'x1', from: 'frank@localhost/callee' });
    await callee.stop();
  });

  const badGrid: Array<[string, string, string]> = [
    [
      'an iq with two children',
      `<iq type='get' id='e1' to='localhost'><ping xmlns='urn:xmpp:ping'/><ping xmlns='urn:xmpp:ping'/></iq>`,
      'bad-request',
    ],
    ['an iq with no child', `<iq type='get' id='e2' to='localhost'/>`, 'bad-request'],
    [
      'an iq of unknown type',
      `<iq type='fetch' id='e3' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>`,
      'bad-request',
    ],
    [
      'an unknown payload to the server',
      `<iq type='get' id='e4' to='localhost'><query xmlns='urn:example'/></iq>`,
      'service-unavailable',
    ],
    [
      'an invalid JID',
      `<iq type='get' id='e5' to='a@b@localhost'><ping xmlns='urn:xmpp:ping'/></iq>`,
      'jid-malformed',
    ],
    [
      'a localpart over 1023 bytes',
      `<iq type='get' id='e6' to='${'a'.repeat(1024)}@localhost'><ping xmlns='urn:xmpp:ping'/></iq>`,
      'jid-malformed',
    ],
    [
      'another domain',
      `<iq type='get' id='e7' to='example.org'><ping xmlns='urn:xmpp:ping'/></iq>`,
      'remote-server-not-found',
    ],
  ];
  for (const [name, frame, condition] of badGrid) {
    it(`answers ${name} with ${condition}`, async () => {
      const reply = await ask(frame);
      expect(reply.attrs.type).toBe('error');
      expect(reply.getChild('error')?.getChild(condition, STANZAS)).toBeDefined();
    });
  }

  it('never answers an iq of type result or error', async () => {
    raw.send(`<iq type='result' id='r1' to='localhost'/>`);
    raw.send(
      `<iq type='error' id='r2' to='localhost'><error type='cancel'><bad-request xmlns='${STANZAS}'/></error></iq>`,
    );
    expect(await raw.framesBeforePong()).toEqual([]);
  });

  it('normalises the to address (case-folded localpart and domain)', async () => {
    const pong = await ask(`<iq type='get' id='n1' to='ERIN@LocalHost'><ping xmlns='urn:xmpp:ping'/></iq>`);
    expect(pong.attrs).toMatchObject({ type: 'result', from: 'erin@localhost' });
  });
});
