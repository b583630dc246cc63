/**
 * Behaviours of the stock client the fault suite uses, which the README states (Connecting a
 * client) and the suite works around (test/faults/participant.ts): xmpp.js 0.14 gives its XEP-0198
 * session up when the send of its `<resume/>` fails (a socket that dies just then), though the
 * server never answered `<failed/>` (`keepSessionWhenResumeUnsent`); and it wipes its session on
 * every 'offline', which `stop()` emits even on a client already offline
 * (`keepSessionAcrossRestarts`).
 *
 * XEP-0198 §5: "If the server does not support session resumption, it MUST return a <failed/>
 * element"; a session the server still holds is resumable on the next connection. When the first
 * test fails, xmpp.js keeps its session: drop the workaround and the README's caveat.
 */
import { client, xml } from '@xmpp/client';
import type { Element } from 'ltx';
import { describe, expect, it } from 'vitest';
import { keepSessionAcrossRestarts, keepSessionWhenResumeUnsent } from '../faults/participant.ts';

interface SmState {
  id: string;
  inbound: number;
  outbound_q: { stanza: Element; stamp: string }[];
  on(event: 'fail', listener: (stanza: Element) => void): void;
}

/** A client never started, holding a session to resume, whose socket fails every send. */
function clientWithSession() {
  const xmpp = client({ service: 'ws://127.0.0.1:9/xmpp-websocket', domain: 'localhost' });
  const sm = xmpp.streamManagement as unknown as SmState;
  sm.id = 'session-1';
  sm.inbound = 3;
  sm.outbound_q = [{ stanza: xml('message', { id: 'unacknowledged' }), stamp: '2026-11-29T00:00:00Z' }];
  const failed: string[] = [];
  sm.on('fail', (stanza) => failed.push(stanza.attrs.id as string));
  (xmpp as unknown as { send: () => Promise<void> }).send = async () => {
    throw new Error('socket closed');
  };
  return { xmpp, sm, failed };
}

/** The server's features on the next stream, offering XEP-0198 (the client resumes). */
function offerStreamManagement(xmpp: ReturnType<typeof client>): Promise<void> {
  xmpp.emit(
    'element',
    xml('features', { xmlns: 'http://etherx.jabber.org/streams' }, xml('sm', { xmlns: 'urn:xmpp:sm:3' })),
  );
  return new Promise((resolve) => setTimeout(resolve, 20));
}

describe('xmpp.js 0.14 resuming on a socket that dies as the <resume/> goes out', () => {
  it('gives the session up: its id emptied, its unacknowledged stanzas failed', async () => {
    const { xmpp, sm, failed } = clientWithSession();
    await offerStreamManagement(xmpp);
    expect(sm.id).toBe('');
    expect(failed).toEqual(['unacknowledged']);
  });

  it('with the suite’s workaround, keeps the session to resume on the next socket', async () => {
    const { xmpp, sm, failed } = clientWithSession();
    const traced: string[] = [];
    keepSessionWhenResumeUnsent(xmpp, (message) => traced.push(message));
    await offerStreamManagement(xmpp);
    expect(sm.id).toBe('session-1');
    expect(sm.outbound_q.map((item) => item.stanza.attrs.id)).toEqual(['unacknowledged']);
    expect(failed).toEqual([]);
    expect(traced).toEqual(['<resume/> not sent (socket closed); resumed on the next socket']);
  });
});

describe('xmpp.js 0.14 stopped again while offline (an application restarting it twice)', () => {
  it('emits offline again and wipes the session: its id emptied, its unacknowledged stanzas failed', async () => {
    const { xmpp, sm, failed } = clientWithSession();
    expect(xmpp.status).toBe('offline');
    let offline = 0;
    xmpp.on('offline', () => {
      offline += 1;
    });
    await xmpp.stop().catch(() => {});
    expect(offline).toBe(1);
    expect(sm.id).toBe('');
    expect(failed).toEqual(['unacknowledged']);
  });

  it('with the suite’s workaround, keeps the session through every stop until it is released', async () => {
    const { xmpp, sm, failed } = clientWithSession();
    const traced: string[] = [];
    const release = keepSessionAcrossRestarts(xmpp, (message) => traced.push(message));
    await xmpp.stop().catch(() => {});
    await xmpp.stop().catch(() => {});
    expect(sm.id).toBe('session-1');
    expect(sm.inbound).toBe(3);
    expect(sm.outbound_q.map((item) => item.stanza.attrs.id)).toEqual(['unacknowledged']);
    expect(failed).toEqual([]);
    expect(traced).toEqual([
      'restarted with its session session-1 (h=3, 1 unacknowledged)',
      'restarted with its session session-1 (h=3, 1 unacknowledged)',
    ]);
    // Released (online again): xmpp.js's own rules.
    release();
    await xmpp.stop().catch(() => {});
    expect(sm.id).toBe('');
    expect(failed).toEqual(['unacknowledged']);
  });
});
