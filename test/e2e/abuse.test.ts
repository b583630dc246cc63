/**
 * Password guessing through the local stack, with clients connecting from different loopback
 * addresses (API Gateway's `identity.sourceIp`). Prosody's mod_limit_auth and ejabberd's
 * mod_fail2ban refuse attempts from a throttled address before checking the password; Nimbus
 * does the same, slows guessing on one account from many addresses without ever locking the
 * account's owner out, and answers existing and unknown accounts alike.
 */
import type { Element } from 'ltx';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RawClient } from '../../infra/local/raw-client.ts';
import { deriveScramCredentials } from '../../shared/sasl/scram.ts';
import { eventually } from '../support/eventually.ts';
import { scramClientFinal, scramClientFirst } from '../support/scram-client.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

const SASL = 'urn:ietf:params:xml:ns:xmpp-sasl';

let stack: TestStack;
const clients: RawClient[] = [];

beforeAll(async () => {
  stack = await startTestStack({
    AUTH_FAILURES_PER_ADDRESS: '10',
    AUTH_FAILURES_PER_ACCOUNT: '10',
    AUTH_FAILURES_PER_CONNECTION: '3',
    AUTH_FAILURE_WINDOW_SECONDS: '300',
    AUTH_ACCOUNT_SLOWDOWN_SECONDS: '2',
    // Tighter than the defaults (50/s, burst 1000) so a flood trips them quickly.
    RATE_STANZAS_PER_SECOND: '10',
    RATE_STANZA_BURST: '100',
  });
  for (const user of ['grace', 'heidi', 'ivan', 'kate', 'lena'])
    await stack.addUser(`${user}@localhost`, `${user}-secret`);
});

afterAll(async () => {
  for (const client of clients) client.terminate();
  await stack?.gateway.drained();
  await stack?.close();
});

async function connectFrom(address: string): Promise<RawClient> {
  const client = await RawClient.connect(stack.url, ['xmpp'], address);
  clients.push(client);
  await client.open();
  return client;
}

/** `count` SCRAM exchanges begun (client-first sent, challenge read) on as many connections from `address`. */
async function stageScram(address: string, user: string, count: number, nonce: string) {
  const staged: { client: RawClient; clientFirst: string; serverFirst: string }[] = [];
  for (let i = 0; i < count; i++) {
    const client = await connectFrom(address);
    const clientFirst = scramClientFirst(user, `${nonce}-${i}`);
    client.send(
      `<auth xmlns='${SASL}' mechanism='SCRAM-SHA-256'>${Buffer.from(clientFirst).toString('base64')}</auth>`,
    );
    const challenge = await client.next();
    expect(challenge.name).toBe('challenge');
    staged.push({ client, clientFirst, serverFirst: Buffer.from(challenge.getText(), 'base64').toString() });
  }
  return staged;
}

const plain = (user: string, password: string) => Buffer.from(`\0${user}\0${password}`).toString('base64');

/** One PLAIN attempt on a fresh connection from `address`; the server's answer. */
async function attempt(address: string, user: string, password: string): Promise<Element> {
  const client = await connectFrom(address);
  client.send(`<auth xmlns='${SASL}' mechanism='PLAIN'>${plain(user, password)}</auth>`);
  const answer = await client.next();
  client.terminate();
  return answer;
}

const condition = (answer: Element) =>
  answer.name === 'success' ? 'success' : answer.getChildElements()[0]?.name;

describe('guessing from one address', () => {
  it('past the limit, refuses the right password from that address unchecked; the owner elsewhere logs in', async () => {
    // grace has logged in from 127.0.0.3 before: a known address of hers.
    expect(condition(await attempt('127.0.0.3', 'grace', 'grace-secret'))).toBe('success');
    for (let guess = 0; guess < 12; guess++) await attempt('127.0.0.2', 'grace', `guess-${guess}`);
    expect(await stack.server.users.addressFailures('127.0.0.2')).toBe(10);
    // The right password from the throttled address: refused before it is checked.
    const refused = await attempt('127.0.0.2', 'grace', 'grace-secret');
    expect(condition(refused)).toBe('temporary-auth-failure');
    expect(refused.getChildText('text')).toMatch(/your address/);
    // The owner from her usual address is never held up.
    expect(condition(await attempt('127.0.0.3', 'grace', 'grace-secret'))).toBe('success');
    // Refused attempts are not counted: the address's window does not grow.
    expect(await stack.server.users.addressFailures('127.0.0.2')).toBe(10);
  });

  it('judges a SCRAM exchange again at its last step: ones staged before the limit are not checked past it', async () => {
    // RFC 6120 §6.4.5 lets a server limit retries; staging many client-firsts while the address
    // has no failures, then sending the finals, must not get more guesses checked than the limit.
    const staged = await stageScram('127.0.0.4', 'heidi', 12, 'staged-nonce');
    const final = (at: number, password: string) => {
      const { client, clientFirst, serverFirst } = staged[at] as (typeof staged)[number];
      const { message } = scramClientFinal({ hash: 'sha256', password, clientFirst, serverFirst });
      client.send(`<response xmlns='${SASL}'>${Buffer.from(message).toString('base64')}</response>`);
      return client.next();
    };
    for (let i = 0; i < 10; i++) await final(i, `guess-${i}`);
    expect(await stack.server.users.addressFailures('127.0.0.4')).toBe(10);
    // The right password on an exchange begun before the limit: refused unchecked now.
    const refused = await final(10, 'heidi-secret');
    expect(condition(refused)).toBe('temporary-auth-failure');
    expect(refused.getChildText('text')).toMatch(/your address/);
    // A wrong one likewise, and not counted.
    expect(condition(await final(11, 'guess-11'))).toBe('temporary-auth-failure');
    expect(await stack.server.users.addressFailures('127.0.0.4')).toBe(10);
  });

  it('counts an exchange abandoned for a new <auth/> on its connection, as an <abort/>', async () => {
    // RFC 6120 §6.4.5: "a configurable but reasonable number of retries (at least 2 and no more
    // than 5)". Beginning exchanges and never finishing one is no way around it.
    const client = await connectFrom('127.0.0.21');
    const begin = (i: number) =>
      client.send(
        `<auth xmlns='${SASL}' mechanism='SCRAM-SHA-256'>${Buffer.from(scramClientFirst('lena', `restart-${i}`)).toString('base64')}</auth>`,
      );
    for (let i = 0; i < 3; i++) {
      begin(i);
      expect((await client.next()).name).toBe('challenge');
    }
    // The fourth abandons the third exchange: three abandoned (AUTH_FAILURES_PER_CONNECTION).
    begin(3);
    const ended = await client.until((el) => el.name === 'stream:error' || el.name === 'error');
    expect(ended.getChildElements()[0]?.name).toBe('policy-violation');
  });

  it('charges a malformed SCRAM client-final to its connection, never to the address: it guesses no password', async () => {
    // RFC 5802 §7: client-final-message = channel-binding "," nonce ["," extensions] "," proof.
    // One without a proof is malformed-request; a buggy client behind a shared address must not
    // use up that address's guesses for everyone (they count checked passwords).
    const staged = await stageScram('127.0.0.20', 'lena', 3, 'malformed-nonce');
    for (const { client, serverFirst } of staged) {
      const nonce = /r=([^,]+)/.exec(serverFirst)?.[1];
      client.send(
        `<response xmlns='${SASL}'>${Buffer.from(`c=biws,r=${nonce}`).toString('base64')}</response>`,
      );
      expect(condition(await client.next())).toBe('malformed-request');
    }
    expect(await stack.server.users.addressFailures('127.0.0.20')).toBe(0);
    expect(condition(await attempt('127.0.0.20', 'lena', 'lena-secret'))).toBe('success');
  });

  it('checks no more guesses than the limit when the finals of staged exchanges arrive all at once', async () => {
    // Each final is its own connection's frame, handled concurrently: a limit read before the
    // check and counted after it would let every one of them through. The guess is counted as
    // it is admitted (given back on success), so the limit holds however many arrive together.
    const staged = await stageScram('127.0.0.14', 'kate', 16, 'burst-nonce');
    const answers = await Promise.all(
      staged.map(({ client, clientFirst, serverFirst }, i) => {
        const { message } = scramClientFinal({
          hash: 'sha256',
          password: `guess-${i}`,
          clientFirst,
          serverFirst,
        });
        client.send(`<response xmlns='${SASL}'>${Buffer.from(message).toString('base64')}</response>`);
        return client.next();
      }),
    );
    // Checked: not-authorized (the one reaching the limit too); refused unchecked:
    // temporary-auth-failure naming the address.
    const unchecked = answers.filter((answer) => /your address/.test(answer.getChildText('text') ?? ''));
    expect(answers.every((answer) => answer.name === 'failure')).toBe(true);
    expect(answers.length - unchecked.length).toBe(10);
    expect(answers.filter((answer) => condition(answer) === 'not-authorized')).toHaveLength(10);
    expect(await stack.server.users.addressFailures('127.0.0.14')).toBe(10);
  });

  it('answers an unknown account from a throttled address exactly as an existing one', async () => {
    const existing = await attempt('127.0.0.2', 'heidi', 'wrong');
    const unknown = await attempt('127.0.0.2', 'nobody-at-all', 'wrong');
    expect(existing.toString()).toBe(unknown.toString());
  });
});

describe('guessing one account from many addresses', () => {
  // Counting the slowed guesses needs a slowdown no loaded machine outlasts between two attempts;
  // the file's stack keeps a short one (2 s) so the owner gets back in quickly below.
  let slow: TestStack;
  const slowClients: RawClient[] = [];

  beforeAll(async () => {
    slow = await startTestStack({
      AUTH_FAILURES_PER_ADDRESS: '10',
      AUTH_FAILURES_PER_ACCOUNT: '10',
      AUTH_FAILURE_WINDOW_SECONDS: '3600',
      AUTH_ACCOUNT_SLOWDOWN_SECONDS: '3600',
    });
    await slow.addUser('ivan@localhost', 'ivan-secret');
  });

  afterAll(async () => {
    for (const client of slowClients) client.terminate();
    await slow?.gateway.drained();
    await slow?.close();
  });

  it('slows the account for addresses it never logged in from: guesses within the slowdown are refused unchecked', async () => {
    const attemptOnSlow = async (address: string, password: string): Promise<Element> => {
      const client = await RawClient.connect(slow.url, ['xmpp'], address);
      slowClients.push(client);
      await client.open();
      client.send(`<auth xmlns='${SASL}' mechanism='PLAIN'>${plain('ivan', password)}</auth>`);
      const answer = await client.next();
      client.terminate();
      return answer;
    };
    // 20 addresses, one guess each: no address reaches its limit; the account passes its own.
    const answers: string[] = [];
    for (let i = 10; i < 30; i++) {
      const answer = await attemptOnSlow(`127.0.1.${i}`, `guess-${i}`);
      answers.push(answer.getChildText('text')?.includes('this account') ? 'slowed' : 'checked');
    }
    // The first ten were checked and counted; after that, within the slowdown (an hour here),
    // every guess from a new address is refused unchecked.
    expect(answers).toEqual([...Array(10).fill('checked'), ...Array(10).fill('slowed')]);
    expect(await slow.server.users.authFailures('ivan@localhost')).toBe(10);
    // The right password from yet another new address: refused unchecked too.
    const slowed = await attemptOnSlow('127.0.1.200', 'ivan-secret');
    expect(condition(slowed)).toBe('temporary-auth-failure');
    expect(slowed.getChildText('text')).toMatch(/this account/);
  });

  it('never locks it: once the slowdown has passed, the owner gets in from a new address', async () => {
    // Ten guesses from as many addresses, each checked: the account reaches its limit on the
    // file's stack.
    for (let i = 10; i < 20; i++) {
      const answer = await attempt(`127.0.1.${i}`, 'ivan', `guess-${i}`);
      expect(answer.name).toBe('failure');
      expect(answer.getChildText('text') ?? '').not.toMatch(/this account/);
    }
    expect(await stack.server.users.authFailures('ivan@localhost')).toBe(10);
    // Once the slowdown (2 s here) has passed since the last failure, the password is checked
    // again and the owner gets in, even from an address the account never logged in from.
    await eventually(async () => {
      expect(condition(await attempt('127.0.1.201', 'ivan', 'ivan-secret'))).toBe('success');
    }, 10_000);
  });
});

describe('decoys for unknown accounts', () => {
  it('use the iteration count the accounts were made with, even when the function is configured otherwise', async () => {
    // The admin CLI made keys with 8192 iterations while the function's SCRAM_ITERATIONS is 4096.
    await stack.server.users.create('judy@localhost', {
      sha1: await deriveScramCredentials('judy-secret', 'sha1', 8192),
      sha256: await deriveScramCredentials('judy-secret', 'sha256', 8192),
    });
    const serverFirst = async (user: string) => {
      const client = await connectFrom('127.0.0.9');
      const clientFirst = Buffer.from(`n,,n=${user},r=abcdefghijklmnop`).toString('base64');
      client.send(`<auth xmlns='${SASL}' mechanism='SCRAM-SHA-256'>${clientFirst}</auth>`);
      const challenge = await client.next();
      client.terminate();
      return Buffer.from(challenge.getText(), 'base64').toString();
    };
    const real = await serverFirst('judy');
    expect(real).toMatch(/,i=8192$/);
    // The other accounts' keys have SCRAM_ITERATIONS' count: an unknown name announces one of
    // the counts in use, stable for the name (its salt too), so neither count singles it out.
    const others = (await serverFirst('heidi')).split(',i=')[1];
    expect(others).not.toBe('8192');
    const counts = new Set<string>();
    for (let i = 0; i < 12; i++) {
      const name = `nobody-${i}`;
      // The salt and count (s=…,i=…) after the connection's nonce (r=…).
      const saltAndCount = async () => (await serverFirst(name)).split(',').slice(1).join(',');
      const decoy = await saltAndCount();
      expect(await saltAndCount()).toBe(decoy);
      counts.add(decoy.split(',i=')[1] as string);
    }
    expect([...counts].sort()).toEqual([others, '8192'].sort());
  });
});

describe('a flood of stanzas from one connection', () => {
  it('ends the flooding stream with policy-violation past its burst, while a bystander pair keeps talking', async () => {
    const STREAMS = 'urn:ietf:params:xml:ns:xmpp-streams';
    const login = async (user: string, resource: string) => {
      const client = await RawClient.connect(stack.url);
      clients.push(client);
      await client.login(user, `${user}-secret`, resource);
      client.send('<presence/>');
      await client.until((el) => el.name === 'presence');
      return client;
    };
    const flooder = await login('heidi', 'flood');
    const alice = await login('grace', 'bystander');
    const bob = await login('ivan', 'bystander');
    // RATE_STANZA_BURST is 100 here: 300 pings at once are far past it.
    for (let i = 0; i < 300; i++)
      flooder.send(`<iq type='get' id='f${i}'><ping xmlns='urn:xmpp:ping'/></iq>`);
    for (let i = 0; i < 5; i++) {
      alice.send(
        `<message to='ivan@localhost/bystander' type='chat' id='b${i}'><body>still here ${i}</body></message>`,
      );
      const got = await bob.until((el) => el.name === 'message' && el.attrs.id === `b${i}`);
      expect(got.getChildText('body')).toBe(`still here ${i}`);
    }
    // The pongs the flooder received before its stream ended.
    let pongs = 0;
    const error = await flooder.until((el) => {
      if (el.name === 'iq' && el.attrs.type === 'result' && /^f\d+$/.test(el.attrs.id ?? '')) pongs += 1;
      return el.name === 'stream:error';
    }, 20_000);
    expect(error.getChild('policy-violation', STREAMS)).toBeDefined();
    expect((await flooder.closed).code).toBe(1000);
    // The burst was served, not the flood: about a hundred pings (the burst, less the login's
    // frames, plus what refilled meanwhile at 10/s) were answered before the stream ended.
    expect(pongs).toBeGreaterThanOrEqual(90);
    expect(pongs).toBeLessThan(200);
  });
});
