/**
 * ARCHIVE_MAX_EXPIRE_SECONDS: the longest the service keeps an archived message, whatever the
 * user's modes ask. XEP-0136 0.9 §3.2: each mode "is RECOMMENDED to also include an 'expire'
 * attribute which indicates how many seconds after messages are archived that the server SHOULD
 * delete them". With a cap, a mode without one, or with a longer one, is kept for the cap, and
 * `<pref/>` shows the expire the server applies.
 */
import { GetCommand, QueryCommand } from '@aws-sdk/lib-dynamodb';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { documentClientFor } from '../../shared/store/dynamo.ts';
import { TTL_ATTRIBUTE } from '../../shared/tables.ts';
import { ARCHIVE, ArchiveWorld, attrsOf, chat, ok, PREF_GET, stores } from '../support/archive.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

const CAP = 3600;

let stack: TestStack;
let world: ArchiveWorld;

beforeAll(async () => {
  stack = await startTestStack({ ARCHIVE_MAX_EXPIRE_SECONDS: String(CAP), ARCHIVE_DEFAULT_SAVE: 'body' });
  world = new ArchiveWorld(stack);
});

afterAll(async () => {
  world?.closeAll();
  await stack?.close();
});

/** The TTLs of the message items of `owner`'s collections with `withJid`. */
async function messageTtls(owner: string, withJid: string): Promise<number[]> {
  const doc = documentClientFor(stack.server.config);
  const table = stack.server.config.tables.archive;
  const headers = await doc.send(
    new QueryCommand({
      TableName: table,
      KeyConditionExpression: 'pk = :pk AND begins_with(sk, :c)',
      ExpressionAttributeValues: { ':pk': owner, ':c': 'c#' },
    }),
  );
  const ttls: number[] = [];
  for (const header of headers.Items ?? []) {
    if (!String(header.sk).endsWith(`/${withJid}`)) continue;
    const first = await doc.send(
      new GetCommand({ TableName: table, Key: { pk: `${owner}/${header.cid}`, sk: 'm#0000000000' } }),
    );
    ttls.push(first.Item?.[TTL_ATTRIBUTE] as number);
  }
  return ttls;
}

describe('ARCHIVE_MAX_EXPIRE_SECONDS caps how long archived messages are kept', () => {
  it("shows the service default's expire as the cap (the service default keeps forever)", async () => {
    const juliet = await world.connect(await world.newUser('juliet'), 'chamber');
    const pref = await ok(juliet, PREF_GET);
    expect(attrsOf(pref, 'default')).toEqual([
      { save: 'body', otr: 'allow', expire: String(CAP), unset: 'true' },
    ]);
  });

  it('shows longer and missing expires as the cap, shorter ones as set, and none where nothing is saved', async () => {
    const julietJid = await world.newUser('juliet');
    const juliet = await world.connect(julietJid, 'chamber');
    // pda asked for the preferences, so it is told of changes (§3.3 "Server Pushes New Modes").
    const pda = await world.connect(julietJid, 'pda');
    await ok(pda, PREF_GET);
    // The seed's §3.3 example values: a year for the default, twenty for benvolio.
    await ok(
      juliet,
      `<iq type='set' id='s1'><pref xmlns='${ARCHIVE}'>
        <default save='body' otr='allow' expire='31536000'/>
        <item jid='romeo@montague.net' save='false' otr='require'/>
        <item jid='benvolio@montague.net' save='all' expire='630720000' otr='deny'/>
        <item jid='nurse@capulet.com' save='body' expire='600' otr='allow'/>
        <item jid='tybalt@capulet.com' save='body' otr='allow'/>
      </pref></iq>`,
    );
    const pref = await ok(juliet, PREF_GET);
    expect(attrsOf(pref, 'default')).toEqual([{ save: 'body', otr: 'allow', expire: String(CAP) }]);
    expect(attrsOf(pref, 'item')).toEqual(
      expect.arrayContaining([
        { jid: 'romeo@montague.net', save: 'false', otr: 'require' },
        { jid: 'benvolio@montague.net', save: 'all', expire: String(CAP), otr: 'deny' },
        { jid: 'nurse@capulet.com', save: 'body', expire: '600', otr: 'allow' },
        { jid: 'tybalt@capulet.com', save: 'body', expire: String(CAP), otr: 'allow' },
      ]),
    );
    const push = await pda.until((el) => el.name === 'iq' && el.attrs.type === 'set');
    const pushed = push.getChild('pref', ARCHIVE);
    expect(attrsOf(pushed, 'default')).toEqual([{ save: 'body', otr: 'allow', expire: String(CAP) }]);
    expect(attrsOf(pushed, 'item')).toEqual(
      expect.arrayContaining([
        { jid: 'benvolio@montague.net', save: 'all', expire: String(CAP), otr: 'deny' },
        { jid: 'nurse@capulet.com', save: 'body', expire: '600', otr: 'allow' },
      ]),
    );
  });

  it('keeps manually stored messages at most the cap, and less when the mode asks for less', async () => {
    const romeoJid = await world.newUser('romeo');
    const romeo = await world.connect(romeoJid, 'orchard');
    await ok(
      romeo,
      `<iq type='set'><pref xmlns='${ARCHIVE}'>
        <item jid='juliet@capulet.com' save='body' otr='allow' expire='630720000'/>
        <item jid='nurse@capulet.com' save='body' otr='allow' expire='60'/>
        <item jid='tybalt@capulet.com' save='false' otr='allow' expire='630720000'/>
      </pref></iq>`,
    );
    const storedAt = Math.floor(Date.now() / 1000);
    for (const withJid of [
      'juliet@capulet.com/chamber',
      'nurse@capulet.com/garden',
      'tybalt@capulet.com/street',
    ]) {
      await ok(
        romeo,
        `<iq type='set'><store xmlns='${ARCHIVE}' with='${withJid}' start='1469-07-21T02:56:15Z'>
          <from secs='0'><body>Art thou not Romeo, and a Montague?</body></from>
        </store></iq>`,
      );
    }
    // Every store is answered: each TTL was taken between the two.
    const storedBy = Math.floor(Date.now() / 1000);
    const [juliet] = await messageTtls(romeoJid, 'juliet@capulet.com/chamber');
    expect(juliet).toBeGreaterThanOrEqual(storedAt + CAP);
    expect(juliet).toBeLessThanOrEqual(storedBy + CAP);
    const [nurse] = await messageTtls(romeoJid, 'nurse@capulet.com/garden');
    expect(nurse).toBeGreaterThanOrEqual(storedAt + 60);
    expect(nurse).toBeLessThanOrEqual(storedBy + 60);
    // A mode that saves nothing automatically does not lift the cap off a manual store.
    const [tybalt] = await messageTtls(romeoJid, 'tybalt@capulet.com/street');
    expect(tybalt).toBeGreaterThanOrEqual(storedAt + CAP);
    expect(tybalt).toBeLessThanOrEqual(storedBy + CAP);
  });

  it('keeps automatically archived messages at most the cap when no mode sets an expire', async () => {
    const romeoJid = await world.newUser('romeo');
    const julietJid = await world.newUser('juliet');
    const romeo = await world.online(romeoJid, 'orchard');
    const juliet = await world.online(julietJid, 'balcony');
    await ok(romeo, `<iq type='set'><auto xmlns='${ARCHIVE}' save='true'/></iq>`);
    const storedAt = Math.floor(Date.now() / 1000);
    await chat(romeo, juliet, `${julietJid}/balcony`, 'What light through yonder window breaks?');

    const ttls = await messageTtls(romeoJid, `${julietJid}/balcony`);
    // Read back: the archiving is done, its TTL taken before now.
    const storedBy = Math.floor(Date.now() / 1000);
    expect(ttls).toHaveLength(1);
    expect(ttls[0]).toBeGreaterThanOrEqual(storedAt + CAP);
    expect(ttls[0]).toBeLessThanOrEqual(storedBy + CAP);
  });

  it('starts a new collection when the expire a message is archived with changes mid-conversation', async () => {
    // §3.2: 'expire' "indicates how many seconds after messages are archived that the server
    // SHOULD delete them" — each message by the mode in force when it was archived. A collection
    // goes with its last message, so messages kept longer must not share a collection with ones
    // that expire first: before session 30 they joined it, and went when its first expiry passed.
    const romeoJid = await world.newUser('romeo');
    const julietJid = await world.newUser('juliet');
    const romeo = await world.online(romeoJid, 'orchard');
    const juliet = await world.online(julietJid, 'balcony');
    await ok(romeo, `<iq type='set'><auto xmlns='${ARCHIVE}' save='true'/></iq>`);
    await ok(
      romeo,
      `<iq type='set'><pref xmlns='${ARCHIVE}'><item jid='${julietJid}' save='body' otr='allow' expire='600'/></pref></iq>`,
    );
    const firstAt = Math.floor(Date.now() / 1000);
    await chat(romeo, juliet, `${julietJid}/balcony`, 'It is the east, and Juliet is the sun.');
    // The same conversation a moment later, the item now without expire (kept the cap).
    await ok(
      romeo,
      `<iq type='set'><pref xmlns='${ARCHIVE}'><item jid='${julietJid}' save='body' otr='allow'/></pref></iq>`,
    );
    await chat(romeo, juliet, `${julietJid}/balcony`, 'Arise, fair sun, and kill the envious moon.');
    const storedBy = Math.floor(Date.now() / 1000);

    const list = await ok(romeo, `<iq type='get'><list xmlns='${ARCHIVE}' with='${julietJid}'/></iq>`);
    expect(stores(list)).toHaveLength(2);
    const ttls = (await messageTtls(romeoJid, `${julietJid}/balcony`)).sort((a, b) => a - b);
    expect(ttls).toHaveLength(2);
    expect(ttls[0]).toBeGreaterThanOrEqual(firstAt + 600);
    expect(ttls[0]).toBeLessThanOrEqual(storedBy + 600);
    expect(ttls[1]).toBeGreaterThanOrEqual(firstAt + CAP);
    expect(ttls[1]).toBeLessThanOrEqual(storedBy + CAP);

    // The same expire again: the conversation goes on in the collection it is in.
    await chat(romeo, juliet, `${julietJid}/balcony`, 'It is my lady, O, it is my love!');
    const again = await ok(romeo, `<iq type='get'><list xmlns='${ARCHIVE}' with='${julietJid}'/></iq>`);
    expect(stores(again)).toHaveLength(2);
  });
});
