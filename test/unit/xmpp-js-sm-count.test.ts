/**
 * A behaviour of the stock client the fault suite uses, which the README states (Connecting a
 * client) and the suite works around (test/faults/participant.ts, `pingCounted`): xmpp.js 0.14
 * does not count, in its XEP-0198 `h`, the answer to an iq it sent through `iqCaller`.
 *
 * XEP-0198 §4: "'h' ... the sequence number of the last handled stanza": every stanza received,
 * an iq result included. When this test fails, xmpp.js counts them: drop the workaround and the
 * README's caveat.
 */
import { client, xml } from '@xmpp/client';
import { describe, expect, it } from 'vitest';

interface Counters {
  inbound: number;
}

function offlineClient() {
  // Never started: elements are fed to it as its connection would.
  const xmpp = client({ service: 'ws://127.0.0.1:9/xmpp-websocket', domain: 'localhost' });
  const handlers = (xmpp.iqCaller as unknown as { handlers: Map<string, unknown> }).handlers;
  return { xmpp, sm: xmpp.streamManagement as unknown as Counters, handlers };
}

const settle = () => new Promise((resolve) => setTimeout(resolve, 5));

describe('xmpp.js 0.14 stream management counts', () => {
  it('does not count the answer to its own iqCaller request', async () => {
    const { xmpp, sm, handlers } = offlineClient();
    handlers.set('own-request', { resolve() {}, reject() {} });
    xmpp.emit('element', xml('iq', { type: 'result', id: 'own-request' }));
    await settle();
    expect(sm.inbound).toBe(0);
  });

  it('counts an iq answer it did not ask for through iqCaller, and a message', async () => {
    const { xmpp, sm } = offlineClient();
    xmpp.emit('element', xml('iq', { type: 'result', id: 'own-id-outside-iqCaller' }));
    xmpp.emit('element', xml('message', { id: 'm1' }, xml('body', {}, 'hi')));
    await settle();
    expect(sm.inbound).toBe(2);
  });
});
