/**
 * Account enumeration: a request addressed to another user's bare JID gets the same answer
 * whether that account exists or not, so nobody learns who has an account here (XEP-0030 §8:
 * "the server MUST return a <service-unavailable/> error if the target entity does not exist or
 * if the requesting entity is not authorized"; XEP-0013 §2.3: <forbidden/> to anyone but the
 * user's own resources).
 */
import { clone, type Element } from 'ltx';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RawClient } from '../../infra/local/raw-client.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

const OFFLINE = 'http://jabber.org/protocol/offline';
const INFO = 'http://jabber.org/protocol/disco#info';
const ITEMS = 'http://jabber.org/protocol/disco#items';

let stack: TestStack;
let mallory: RawClient;

beforeAll(async () => {
  stack = await startTestStack();
  await stack.addUser('alice@localhost', 'alice-pw');
  await stack.addUser('mallory@localhost', 'mallory-pw');
  mallory = await RawClient.connect(stack.url);
  await mallory.login('mallory', 'mallory-pw', 'probe');
});

afterAll(async () => {
  mallory?.terminate();
  await stack?.close();
});

let counter = 0;
async function ask(to: string, type: 'get' | 'set', payload: string): Promise<Element> {
  const id = `q${++counter}`;
  mallory.send(`<iq type='${type}' id='${id}' to='${to}'>${payload}</iq>`);
  return mallory.until((el) => el.name === 'iq' && el.attrs.id === id);
}

/** The answer with the addressee and id taken out: what is left must not depend on existence. */
function shape(reply: Element): string {
  const copy = clone(reply);
  delete copy.attrs.id;
  delete copy.attrs.from;
  return copy.toString();
}

const requests: [string, 'get' | 'set', string][] = [
  // XEP-0199 §4.3 ping of another user's bare JID: answered for contacts only (RFC 6121 roster).
  ['a ping', 'get', `<ping xmlns='urn:xmpp:ping'/>`],
  ['disco#info', 'get', `<query xmlns='${INFO}'/>`],
  ['disco#items', 'get', `<query xmlns='${ITEMS}'/>`],
  [
    'the XEP-0013 count (disco#info on the offline node)',
    'get',
    `<query xmlns='${INFO}' node='${OFFLINE}'/>`,
  ],
  [
    'XEP-0013 headers (disco#items on the offline node)',
    'get',
    `<query xmlns='${ITEMS}' node='${OFFLINE}'/>`,
  ],
  ['a XEP-0013 fetch', 'get', `<offline xmlns='${OFFLINE}'><fetch/></offline>`],
  ['a XEP-0013 view', 'get', `<offline xmlns='${OFFLINE}'><item action='view' node='x'/></offline>`],
  ['a XEP-0013 purge', 'set', `<offline xmlns='${OFFLINE}'><purge/></offline>`],
];

describe('requests to another user’s bare JID', () => {
  for (const [name, type, payload] of requests) {
    it(`answer ${name} the same for an existing and an unknown account`, async () => {
      const existing = await ask('alice@localhost', type, payload);
      const unknown = await ask('nobody-here@localhost', type, payload);
      expect(shape(existing)).toBe(shape(unknown));
      // Nothing about alice's inbox is revealed to mallory.
      expect(existing.attrs.type === 'error' || name === 'disco#items').toBe(true);
    });
  }
});
