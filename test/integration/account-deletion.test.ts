/**
 * `npm run user -- delete <jid>` (infra/account-deletion.ts) against DynamoDB Local: the account's
 * roster, offline inbox and archive go with its credentials, and its contacts' rosters no longer
 * hold a subscription with it. An account created again under the JID starts empty and is given
 * nobody's presence.
 */

import { QueryCommand } from '@aws-sdk/lib-dynamodb';
import { describe, expect, it } from 'vitest';
import { deleteAccount } from '../../infra/account-deletion.ts';
import { createLogger } from '../../shared/log.ts';
import { RecordingPort } from '../../shared/outbound.ts';
import { deriveCredentialSet } from '../../shared/sasl/scram.ts';
import { createServer, type Server } from '../../shared/server.ts';
import { documentClientFor } from '../../shared/store/dynamo.ts';
import type { RosterEntry } from '../../shared/store/roster.ts';
import { UnknownUserError } from '../../shared/store/users.ts';
import { createTestConfig } from '../support/dynamodb.ts';

const entry = (contact: string, changes: Partial<RosterEntry>): RosterEntry => ({
  contact,
  listed: true,
  groups: [],
  subscription: 'none',
  pendingOut: false,
  approved: false,
  ...changes,
});

/** Writes both sides of a relation as the roster module leaves them. */
async function relate(
  server: Server,
  user: string,
  contact: string,
  mine: RosterEntry,
  theirs?: RosterEntry,
) {
  await server.roster.apply(user, contact, { contactIsLocal: theirs !== undefined }, () => ({
    user: mine,
    contact: theirs,
    outcome: undefined,
  }));
}

describe('deleting an account', () => {
  it("removes its roster, cancelling each subscription on the contact's side, its offline messages and its archive", async () => {
    const config = await createTestConfig();
    const server = createServer({
      config,
      port: new RecordingPort(),
      log: createLogger('silent'),
    });
    const stamp = Date.now();
    const dave = `dave${stamp}@localhost`;
    const carol = `carol${stamp}@localhost`;
    const erin = `erin${stamp}@localhost`;
    for (const jid of [dave, carol, erin])
      await server.users.create(jid, await deriveCredentialSet('pw', 4096));
    // carol and dave: Both. erin asked dave for a subscription (pending in for dave, pending out
    // for erin). dave has a contact on another domain.
    await relate(
      server,
      dave,
      carol,
      entry(carol, { subscription: 'both', name: 'Carol' }),
      entry(dave, { subscription: 'both' }),
    );
    await relate(
      server,
      dave,
      erin,
      entry(erin, { listed: false, pendingIn: `<presence from='${erin}' type='subscribe'/>` }),
      entry(dave, { pendingOut: true }),
    );
    await relate(server, dave, 'romeo@example.org', entry('romeo@example.org', { subscription: 'to' }));
    await server.offline.store(dave, {
      from: `${carol}/r`,
      storedAt: stamp,
      stanza: '<message><body>1</body></message>',
    });
    await server.offline.store(dave, {
      from: `${carol}/r`,
      storedAt: stamp + 1,
      stanza: '<message><body>2</body></message>',
    });
    const open = await server.archive.startCollection(dave, { with: `${carol}/r`, start: stamp });
    await server.archive.appendMessage(dave, open, {
      kind: 'to',
      at: stamp,
      xml: '<to><body>hi</body></to>',
    });
    await server.archive.putPrefs(dave, { ...(await server.archive.getPrefs(dave)) });

    // An earlier session's unavailable presence, kept for contacts' probes (RFC 6121 §4.3.2).
    await server.sessions.bindResource({
      user: dave,
      resource: 'laptop',
      connectionId: `laptop${stamp}`,
      available: true,
      priority: 0,
      boundAt: stamp,
    });
    await server.sessions.updatePresence(dave, 'laptop', `laptop${stamp}`, {
      available: false,
      priority: 0,
      presence: '',
      unavailable: '<presence><status>moving house</status></presence>',
    });
    expect((await server.sessions.presenceOf([dave])).lastUnavailable.get(dave)?.presence).toContain(
      'moving house',
    );

    // A session still open: its resource row goes (nothing is routed to it any more).
    await server.sessions.bindResource({
      user: dave,
      resource: 'phone',
      connectionId: `phone${stamp}`,
      available: true,
      priority: 0,
      boundAt: stamp,
    });

    const deleted = await deleteAccount(server, dave, 'localhost');
    expect(deleted).toEqual({ contacts: 3, offlineMessages: 2, archivedCollections: 1, sessions: 2 });
    expect(await server.sessions.listResources(dave)).toEqual([]);
    // Not even the server's unavailable for the session it released: the JID was never seen.
    expect((await server.sessions.presenceOf([dave])).lastUnavailable.has(dave)).toBe(false);

    expect(await server.users.exists(dave)).toBe(false);
    const left = await server.roster.getRoster(dave);
    expect([...left.items, ...left.pendingIn]).toEqual([]);
    expect(await server.offline.count(dave)).toBe(0);
    expect((await server.archive.listCollections(dave, {}, { max: 10 })).items).toEqual([]);
    expect(await server.archive.modifiedSince(dave, undefined, 10)).toMatchObject({ items: [] });
    // No item left in the collection's own partition, nor in the owner's (no tombstone).
    for (const pk of [`${dave}/${open.header.cid}`, dave]) {
      const { Items } = await documentClientFor(config).send(
        new QueryCommand({
          TableName: config.tables.archive,
          KeyConditionExpression: 'pk = :pk',
          ExpressionAttributeValues: { ':pk': pk },
        }),
      );
      expect(Items).toEqual([]);
    }

    // RFC 6121 §2.5.2's removal, as the contacts' servers apply it: carol's Both becomes None
    // (her item stays: her roster is hers); erin's request is refused ("unsubscribed"), so her
    // pending out is gone.
    expect(await server.roster.getEntry(carol, dave)).toMatchObject({
      listed: true,
      subscription: 'none',
      pendingOut: false,
    });
    expect(await server.roster.getEntry(erin, dave)).toMatchObject({
      subscription: 'none',
      pendingOut: false,
    });

    // The JID taken again: nothing of the old owner's.
    await server.users.create(dave, await deriveCredentialSet('other', 4096));
    const fresh = await server.roster.getRoster(dave);
    expect([...fresh.items, ...fresh.pendingIn]).toEqual([]);
    expect(await server.offline.count(dave)).toBe(0);

    await expect(deleteAccount(server, `nobody${stamp}@localhost`, 'localhost')).rejects.toBeInstanceOf(
      UnknownUserError,
    );
  });

  it('finishes, run again, what a run that failed part-way left (its credentials already gone)', async () => {
    const server = createServer({
      config: await createTestConfig(),
      port: new RecordingPort(),
      log: createLogger('silent'),
    });
    const stamp = Date.now();
    const frank = `frank${stamp}@localhost`;
    await server.users.create(frank, await deriveCredentialSet('pw', 4096));
    await server.offline.store(frank, {
      from: 'x@localhost/r',
      storedAt: stamp,
      stanza: '<message><body>1</body></message>',
    });
    // The first run deleted the credentials, then failed (a throttle, Ctrl-C).
    await server.users.delete(frank);
    expect(await deleteAccount(server, frank, 'localhost')).toMatchObject({ offlineMessages: 1 });
    expect(await server.offline.count(frank)).toBe(0);
    // Nothing left: the JID is unknown.
    await expect(deleteAccount(server, frank, 'localhost')).rejects.toBeInstanceOf(UnknownUserError);
  });
});
