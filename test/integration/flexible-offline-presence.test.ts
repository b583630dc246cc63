/**
 * XEP-0013 §2.2: "once the user sends presence, the user's server MUST deliver in-session messages
 * as usual". A second resource coming online while another retrieves flexibly (no flood: "the
 * server MUST NOT flood the second resource") must get what is sent to it during its presence's
 * handling live: it puts no flood hold on its messages, so nothing is stored behind one.
 */
import { describe, expect, it } from 'vitest';
import { deriveCredentialSet } from '../../shared/sasl/scram.ts';
import type { Server } from '../../shared/server.ts';
import { intercept } from '../support/intercept.ts';
import { openConnection, sendFrame, testServer } from '../support/stream.ts';

/** A bound connection of `user`/`resource`, with no presence yet. */
async function bound(server: Server, user: string, resource: string, connectionId: string) {
  await openConnection(server, connectionId, user, resource);
  await server.sessions.bindResource({
    user,
    resource,
    connectionId,
    available: false,
    priority: 0,
    boundAt: Date.now(),
  });
}

function frame(server: Server, connectionId: string, xml: string) {
  return sendFrame(server, connectionId, xml, { frameId: `f-${Math.random().toString(36).slice(2)}` });
}

describe('a second resource’s presence while another retrieves flexibly (XEP-0013 §2.2)', () => {
  it('gets a message sent during that presence’s handling live, not stored behind a hold', async () => {
    const { port, server } = await testServer();
    const stamp = Date.now();
    const juliet = `juliet${stamp}@localhost`;
    const romeo = `romeo${stamp}@localhost`;
    for (const jid of [juliet, romeo]) await server.users.create(jid, await deriveCredentialSet('pw', 4096));
    await bound(server, juliet, 'flex', `flex${stamp}`);
    await bound(server, juliet, 'two', `two${stamp}`);
    await bound(server, romeo, 'orchard', `romeo${stamp}`);
    // juliet/flex asks for the offline node's headers (XEP-0013 §2.2: choosing flexible
    // retrieval), then sends negative presence.
    await frame(
      server,
      `flex${stamp}`,
      "<iq type='get' id='h1'><query xmlns='http://jabber.org/protocol/disco#items' node='http://jabber.org/protocol/offline'/></iq>",
    );
    await frame(server, `flex${stamp}`, '<presence><priority>-1</priority></presence>');
    expect((await server.sessions.getResource(juliet, 'flex'))?.flexibleOffline).toBe(true);

    // While juliet/two's presence is being handled (its broadcast to contacts reads the roster),
    // romeo writes to juliet.
    const original = server.roster.getRoster.bind(server.roster);
    let sent = false;
    intercept(server.roster, 'getRoster', async (user) => {
      if (!sent && user === juliet) {
        sent = true;
        await frame(
          server,
          `romeo${stamp}`,
          `<message to='${juliet}' type='chat' id='during'><body>art thou there?</body></message>`,
        );
      }
      return original(user);
    });
    await frame(server, `two${stamp}`, '<presence/>');
    expect(sent).toBe(true);

    expect((port.frames.get(`two${stamp}`) ?? []).some((posted) => posted.includes('art thou there?'))).toBe(
      true,
    );
    expect(await server.offline.count(juliet)).toBe(0);
    expect((await server.sessions.getResource(juliet, 'two'))?.held).toBeUndefined();
  });
});
