/**
 * The client setting the README recommends to Nimbus's xmpp.js users (Connecting a client, "A
 * third point is the bill"): xmpp.js 0.14 sends `<r/>` `requestAckDebounce` ms (250) after
 * whatever it sent, one per message at a chat's pace, each a frame and an `<a/>` the server pays
 * for; raised, one after a pause in the client's sending. XEP-0198 §4: "a client MAY request an
 * acknowledgement at any time". When these tests fail, xmpp.js changed how it asks: revisit the
 * README's advice and the bench's `--ack-debounce`.
 */
import { client, xml } from '@xmpp/client';
import type { Element } from 'ltx';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';

interface SmSettings {
  enabled: boolean;
  requestAckDebounce: number;
  requestAckInterval: number;
}

/** A client never started, with stream management enabled, recording what it sends. */
function enabledClient() {
  const xmpp = client({ service: 'ws://127.0.0.1:9/xmpp-websocket', domain: 'localhost' });
  const sm = xmpp.streamManagement as unknown as SmSettings;
  sm.enabled = true;
  const sent: string[] = [];
  (xmpp as unknown as { send: (element: Element) => Promise<void> }).send = async (element) => {
    sent.push(element.name);
  };
  // What the outgoing middleware sees of a message the application sends.
  const chat = (id: string) =>
    xmpp.emit('send', xml('message', { to: 'bob@localhost', id }, xml('body', {}, id)));
  return { sm, sent, chat };
}

describe("xmpp.js 0.14's acknowledgement requests", () => {
  beforeEach(() => {
    vi.useFakeTimers();
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  it('asks 250 ms after each message it sends: one <r/> per message at a chat pace', () => {
    const { sm, sent, chat } = enabledClient();
    expect(sm.requestAckDebounce).toBe(250);
    for (const id of ['m1', 'm2', 'm3']) {
      chat(id);
      vi.advanceTimersByTime(6_000);
    }
    expect(sent).toEqual(['r', 'r', 'r']);
  });

  it('with requestAckDebounce at 10 s, asks once after a pause in its sending, not per message', () => {
    const { sm, sent, chat } = enabledClient();
    sm.requestAckDebounce = 10_000;
    for (const id of ['m1', 'm2', 'm3']) {
      chat(id);
      vi.advanceTimersByTime(6_000);
    }
    expect(sent).toEqual([]);
    vi.advanceTimersByTime(4_000);
    expect(sent).toEqual(['r']);
  });
});
