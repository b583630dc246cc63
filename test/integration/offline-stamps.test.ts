/**
 * XEP-0203 stamps on the way to and around offline storage: "the <delay/> element MUST possess a
 * 'stamp' attribute" and a server "SHOULD include a 'from' attribute" naming itself. Only the
 * server stamps as itself: a client's own delay claiming to be the server's is removed, and the
 * server's stamp of a re-routed message survives a store that is given up for live delivery.
 */
import { parse } from 'ltx';
import { describe, expect, it, vi } from 'vitest';
import { routeMessage } from '../../shared/core/router.ts';
import { parseJid } from '../../shared/jid.ts';
import type { RecordingPort } from '../../shared/outbound.ts';
import type { Server } from '../../shared/server.ts';
import { OfflineGuardFailedError } from '../../shared/store/offline.ts';
import { useDynamoDbLocal } from '../support/dynamodb.ts';
import { openConnection, sendFrame, testServer } from '../support/stream.ts';

const DELAY = 'urn:xmpp:delay';
const BIND = 'urn:ietf:params:xml:ns:xmpp-bind';

let counter = 0;

/** A bound stream of `user` (no presence yet); `frame` sends it one more frame. */
async function bound(server: Server, user: string, resource: string) {
  const connectionId = `s${++counter}-${Date.now()}`;
  await openConnection(server, connectionId, user);
  let frames = 0;
  const frame = (xml: string) =>
    sendFrame(server, connectionId, xml, {
      frameId: `${connectionId}-${++frames}`,
      seq: String(100 + frames),
    });
  await frame(
    `<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='${BIND}'><resource>${resource}</resource></bind></iq>`,
  );
  return { connectionId, frame };
}

const messagesTo = (port: RecordingPort, connectionId: string) =>
  (port.frames.get(connectionId) ?? []).map((frame) => parse(frame)).filter((el) => el.name === 'message');

describe('XEP-0203 server stamps', () => {
  useDynamoDbLocal();

  it("keeps a re-routed message's stamp when its store is given up and it is delivered live", async () => {
    const { port, server } = await testServer();
    const user = `reroute${Date.now()}@localhost`;
    const phone = await bound(server, user, 'phone');
    // The recipient has no available resource when the message is routed: it is to be stored.
    // Before the store lands the resource becomes available, so the store's guard fails and
    // the message is routed again, to the session.
    const store = vi.spyOn(server.offline, 'store').mockImplementationOnce(async () => {
      await phone.frame(`<presence xmlns='jabber:client'/>`);
      throw new OfflineGuardFailedError(user);
    });
    const acceptedAt = Date.parse('2026-11-30T10:00:00.000Z');
    const stanza = parse(
      `<message xmlns='jabber:client' from='romeo@localhost/orchard' to='${user}' type='chat' id='r1'><body>again</body></message>`,
    );
    await routeMessage(server, stanza, parseJid(user), { originalTime: acceptedAt });
    store.mockRestore();

    const [live] = messagesTo(port, phone.connectionId).filter((m) => m.attrs.id === 'r1');
    // XEP-0203 §3: <delay xmlns='urn:xmpp:delay' from='capulet.com' stamp='2002-09-10T23:08:25Z'/>
    const delays = live?.getChildren('delay', DELAY) ?? [];
    expect(delays.map((d) => d.attrs)).toEqual([
      { xmlns: DELAY, from: 'localhost', stamp: '2026-11-30T10:00:00.000Z' },
    ]);
    expect(await server.offline.count(user)).toBe(0);
  });

  it("removes a client's delay that claims to be the server's from a live message, and keeps its own", async () => {
    const { port, server } = await testServer();
    const sender = await bound(server, `forger${Date.now()}@localhost`, 'pc');
    const recipientJid = `victim${Date.now()}@localhost`;
    const recipient = await bound(server, recipientJid, 'phone');
    await recipient.frame(`<presence xmlns='jabber:client'/>`);

    await sender.frame(
      `<message xmlns='jabber:client' to='${recipientJid}/phone' type='chat' id='f1'><body>hi</body>` +
        `<delay xmlns='${DELAY}' from='localhost' stamp='1999-01-01T00:00:00Z'/>` +
        `<delay xmlns='${DELAY}' from='LocalHost' stamp='1999-01-01T00:00:01Z'/>` +
        `<x xmlns='jabber:x:delay' from='localhost' stamp='19990101T00:00:02'/>` +
        `<delay xmlns='${DELAY}' from='forger@example.org' stamp='2000-01-01T00:00:00Z'/></message>`,
    );
    const [live] = messagesTo(port, recipient.connectionId).filter((m) => m.attrs.id === 'f1');
    expect(live?.getChildren('delay', DELAY).map((d) => d.attrs.from)).toEqual(['forger@example.org']);
    expect(live?.getChildren('x', 'jabber:x:delay')).toEqual([]);
  });

  it("removes a sender's XEP-0013 <offline/> marker from a live message", async () => {
    const { port, server } = await testServer();
    const sender = await bound(server, `marker${Date.now()}@localhost`, 'pc');
    const recipientJid = `reader${Date.now()}@localhost`;
    const recipient = await bound(server, recipientJid, 'phone');
    await recipient.frame(`<presence xmlns='jabber:client'/>`);

    // XEP-0013 §2.4: the server's copy carries <offline xmlns='http://jabber.org/protocol/offline'>
    // <item node='2003-02-27T22:49:17.008Z'/></offline>; a sender's would name another message.
    await sender.frame(
      `<message xmlns='jabber:client' to='${recipientJid}/phone' type='chat' id='o1'><body>hi</body>` +
        `<offline xmlns='http://jabber.org/protocol/offline'><item node='2003-02-27T22:49:17.008Z'/></offline></message>`,
    );
    const [live] = messagesTo(port, recipient.connectionId).filter((m) => m.attrs.id === 'o1');
    expect(live?.getChildText('body')).toBe('hi');
    expect(live?.getChild('offline', 'http://jabber.org/protocol/offline')).toBeUndefined();
  });
});
