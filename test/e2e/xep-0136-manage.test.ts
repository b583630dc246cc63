/**
 * XEP-0136 0.9 §5 (manual archiving), §6 (encrypted collections), §8 (list, retrieve, remove),
 * §9 (keys, delete), §10 (replication with tombstones) and the 0.5 `maxitems`/`partial`
 * requests, end to end with raw frames. Each test quotes the seed example it plays; the seeds'
 * montague.net and capulet.com become `localhost`, romeo a fresh account.
 */
import { GetCommand } from '@aws-sdk/lib-dynamodb';
import type { Element } from 'ltx';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RawClient } from '../../infra/local/raw-client.ts';
import { documentClientFor } from '../../shared/store/dynamo.ts';
import { TTL_ATTRIBUTE } from '../../shared/tables.ts';
import {
  ARCHIVE,
  ArchiveWorld,
  chat,
  condition,
  exchange,
  ok,
  RSM,
  rsmOf,
  stores,
  XMLDSIG,
  XMLENC,
} from '../support/archive.ts';
import { eventually } from '../support/eventually.ts';
import { intercept } from '../support/intercept.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';

let stack: TestStack;
let world: ArchiveWorld;

beforeAll(async () => {
  stack = await startTestStack({ ARCHIVE_CHANGE_WINDOW_SECONDS: '1' });
  world = new ArchiveWorld(stack);
});

afterAll(async () => {
  world?.closeAll();
  await stack?.close();
});

async function romeo(): Promise<{ jid: string; raw: RawClient }> {
  const jid = await world.newUser('romeo');
  return { jid, raw: await world.connect(jid, 'orchard') };
}

const UP1 = `<iq type='set' to='localhost' id='up1'>
<store xmlns='${ARCHIVE}'
with='juliet@capulet.com/chamber'
start='1469-07-21T02:56:15Z'
subject='She speaks!'>
<from secs='0'><body>Art thou not Romeo, and a Montague?</body></from>
<to secs='11'><body>Neither, fair saint, if either thee dislike.</body></to>
<from secs='14'><body>How cam'st thou hither, tell me, and wherefore?</body></from>
<note utc='1469-07-21T03:04:35Z'>I think she might fancy me.</note>
</store>
</iq>`;

const CRYPT1 = `<iq type='set' to='localhost' id='crypt1'>
<store xmlns='${ARCHIVE}'
with='juliet@capulet.com/chamber'
start='1469-07-23T19:22:31Z'
subject='She speaks!'>
<EncryptedData xmlns='${XMLENC}'
Type='http://www.w3.org/2001/04/xmlenc#Content'>
<EncryptionMethod Algorithm='http://www.w3.org/2001/04/xmlenc#aes128-cbc'/>
<KeyInfo xmlns='${XMLDSIG}'>
<KeyName>dataKey1</KeyName>
</KeyInfo>
<CipherData><CipherValue>+OGQ0SR+ysraP6LnD43m77VkIVni5c7yPeIbkFdicZ</CipherValue></CipherData>
</EncryptedData>
<EncryptedKey xmlns='${XMLENC}'>
<CarriedKeyName>dataKey1</CarriedKeyName>
<EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#rsa-1_5"/>
<KeyInfo xmlns='${XMLDSIG}'>
<KeyName>romeoPublicKey1fingerprint</KeyName>
</KeyInfo>
<CipherData><CipherValue>E5Qbvfa2gI5lBZMAHryv4g</CipherValue></CipherData>
</EncryptedKey>
<EncryptedKey xmlns='${XMLENC}'>
<CarriedKeyName>dataKey1</CarriedKeyName>
<EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#rsa-1_5"/>
<KeyInfo xmlns='${XMLDSIG}'>
<KeyName>romeoPublicKey2fingerprint</KeyName>
</KeyInfo>
<CipherData><CipherValue>E5Qbvfa2gI5lBZMAHryv4g</CipherValue></CipherData>
</EncryptedKey>
</store>
</iq>`;

function encryptedData(keyName: string, value: string): string {
  return `<EncryptedData xmlns='${XMLENC}' Type='http://www.w3.org/2001/04/xmlenc#Content'><EncryptionMethod Algorithm='http://www.w3.org/2001/04/xmlenc#aes128-cbc'/><KeyInfo xmlns='${XMLDSIG}'><KeyName>${keyName}</KeyName></KeyInfo><CipherData><CipherValue>${value}</CipherValue></CipherData></EncryptedData>`;
}

function encryptedKey(carried: string, pub: string): string {
  return `<EncryptedKey xmlns='${XMLENC}'><CarriedKeyName>${carried}</CarriedKeyName><EncryptionMethod Algorithm='http://www.w3.org/2001/04/xmlenc#rsa-1_5'/><KeyInfo xmlns='${XMLDSIG}'><KeyName>${pub}</KeyName></KeyInfo><CipherData><CipherValue>E5Qbvfa2gI5lBZMAHryv4g</CipherValue></CipherData></EncryptedKey>`;
}

function retrieve(withJid: string, start: string, set = '', extra = ''): string {
  return `<iq type='get' to='localhost'><retrieve xmlns='${ARCHIVE}' with='${withJid}' start='${start}'>${extra}${set ? `<set xmlns='${RSM}'>${set}</set>` : ''}</retrieve></iq>`;
}

function entries(store: Element | undefined): Element[] {
  return (store?.getChildElements() ?? []).filter((e) => e.name !== 'set');
}

/** Eight messages of 20 KB in one collection: together past the 128 KB post limit. */
async function storeLargeMessages(raw: RawClient): Promise<void> {
  const big = 'x'.repeat(20_000);
  for (let i = 0; i < 8; i++) {
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z'><to secs='1'><body>${i}${big}</body></to></store></iq>`,
    );
  }
}

/** Stores `n` one-message collections with `with` one minute apart from `base`. */
async function seedCollections(
  raw: RawClient,
  n: number,
  withJid = 'juliet@capulet.com/chamber',
  base = Date.UTC(1469, 6, 21, 2, 0, 0),
): Promise<string[]> {
  const starts: string[] = [];
  for (let i = 0; i < n; i++) {
    const start = new Date(base + i * 60_000).toISOString().replace('.000Z', 'Z');
    starts.push(start);
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='${withJid}' start='${start}'><to secs='0'><body>m${i}</body></to></store></iq>`,
    );
  }
  return starts;
}

describe('XEP-0136 0.9 §5 manual archiving', () => {
  it('plays up1: creates the collection, then retrieve returns the messages with their secs and the note', async () => {
    // A 0.9 client pages with XEP-0059 (§8.2: "The client SHOULD use Result Set Management"), and
    // reads 0.9's `secs`; a request without <set/> is 0.5's, answered with 0.5's (see below).
    const { raw } = await romeo();
    // <iq type='result' to='romeo@montague.net/orchard' id='up1'/>
    const { reply } = await exchange(raw, UP1);
    expect(reply.attrs).toMatchObject({ type: 'result', id: 'up1' });
    const store = await ok(
      raw,
      retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', '<max>100</max>'),
    );
    expect(store?.attrs).toMatchObject({
      with: 'juliet@capulet.com/chamber',
      start: '1469-07-21T02:56:15Z',
      subject: 'She speaks!',
    });
    expect(
      entries(store).map((e) => [e.name, e.attrs.secs ?? e.attrs.utc, e.getChildText('body') ?? e.getText()]),
    ).toEqual([
      ['from', '0', 'Art thou not Romeo, and a Montague?'],
      ['to', '11', 'Neither, fair saint, if either thee dislike.'],
      ['from', '14', "How cam'st thou hither, tell me, and wherefore?"],
      ['note', '1469-07-21T03:04:35Z', 'I think she might fancy me.'],
    ]);
    // "If the collection already exists then the server MUST append the messages".
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z'><to secs='5'><body>appended</body></to></store></iq>`,
    );
    const again = await ok(
      raw,
      retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', '<max>100</max>'),
    );
    expect(entries(again).at(-1)?.attrs.secs).toBe('5');
    expect(entries(again).at(-1)?.getChildText('body')).toBe('appended');
  });

  it('tells a 0.5 retrieve (no <set/>) each time from the start, a 0.9 one from the previous message', async () => {
    const { raw } = await romeo();
    // 0.9 §5.2's upload: 0, 11 and 14 seconds after the message before: at +0, +11 and +25 s.
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='nurse@capulet.com/balcony' start='1469-07-21T05:00:00Z'><from secs='0'><body>a</body></from><to secs='11'><body>b</body></to><from secs='14'><body>c</body></from></store></iq>`,
    );
    const secs = (store: Element | undefined) => entries(store).map((e) => e.attrs.secs);
    // 0.9 §5.2: "relative to the previous message in the collection".
    const nine = await ok(
      raw,
      retrieve('nurse@capulet.com/balcony', '1469-07-21T05:00:00Z', '<max>10</max>'),
    );
    expect(secs(nine)).toEqual(['0', '11', '14']);
    // 0.5: "The time in seconds of the message relative to the start-time of the collection".
    const five = await ok(raw, retrieve('nurse@capulet.com/balcony', '1469-07-21T05:00:00Z'));
    expect(secs(five)).toEqual(['0', '11', '25']);
  });

  it('counts secs "relative to the previous message in the collection" (§5.2): a note between two messages is not one', async () => {
    const { raw } = await romeo();
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z'>
<from secs='0'><body>one</body></from><to secs='100'><body>two</body></to>
<note utc='1469-07-21T02:57:05Z'>between</note><from secs='10'><body>three</body></from>
</store></iq>`,
    );
    // Appended later: 5 s after "three", the last message, wherever the note lies.
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z'><note utc='1469-07-21T03:10:00Z'>later note</note></store></iq>`,
    );
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z'><to secs='5'><body>four</body></to></store></iq>`,
    );
    const store = await ok(
      raw,
      retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', '<max>100</max>'),
    );
    // "the sum of the 'secs' attribute and the 'secs' attributes of the preceeding messages will
    // accurately reflect the absolute time of the message": 0, 100, 110, 115 seconds after start.
    expect(entries(store).map((e) => [e.name, e.attrs.secs ?? e.attrs.utc])).toEqual([
      ['from', '0'],
      ['to', '100'],
      ['note', '1469-07-21T02:57:05Z'],
      ['from', '10'],
      ['note', '1469-07-21T03:10:00Z'],
      ['to', '5'],
    ]);
  });

  it('plays up2: a message with an absolute utc before the collection start', async () => {
    const { raw } = await romeo();
    await ok(
      raw,
      `<iq type='set' to='localhost' id='up2'>
<store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z' subject='She speaks!'>
<from utc='1469-07-21T00:32:29Z'><body>Art thou not Romeo, and a Montague?</body></from>
<to secs='11'><body>Neither, fair saint, if either thee dislike.</body></to>
<from secs='14'><body>How cam'st thou hither, tell me, and wherefore?</body></from>
</store></iq>`,
    );
    const list = entries(
      await ok(raw, retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', '<max>100</max>')),
    );
    expect(list[0]?.attrs.utc).toBe('1469-07-21T00:32:29Z');
    expect(list.slice(1).map((e) => e.attrs.secs ?? e.attrs.utc)).toHaveLength(2);
  });

  it('plays up3 (groupchat names) and subject1 (a new subject alone)', async () => {
    const { raw } = await romeo();
    await ok(
      raw,
      `<iq type='set' to='localhost' id='up3'>
<store xmlns='${ARCHIVE}' with='balcony@house.capulet.com' start='1469-07-21T03:16:37Z'>
<from secs='0' name='benvolio'><body>She will indite him to some supper.</body></from>
<from secs='5' name='mercutio'><body>A bawd, a bawd, a bawd! So ho!</body></from>
<from secs='11' name='romeo'><body>What hast thou found?</body></from>
</store></iq>`,
    );
    const room = entries(
      await ok(raw, retrieve('balcony@house.capulet.com', '1469-07-21T03:16:37Z', '<max>100</max>')),
    );
    expect(room.map((e) => [e.attrs.name, e.attrs.secs])).toEqual([
      ['benvolio', '0'],
      ['mercutio', '5'],
      ['romeo', '11'],
    ]);
    await ok(raw, UP1);
    // <store … with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z' subject='She speaks twice!'/>
    await ok(
      raw,
      `<iq type='set' to='localhost' id='subject1'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z' subject='She speaks twice!'/></iq>`,
    );
    const store = await ok(raw, retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z'));
    expect(store?.attrs.subject).toBe('She speaks twice!');
    expect(entries(store)).toHaveLength(4);
  });

  it('refuses what the seed forbids in a store', async () => {
    const { raw } = await romeo();
    const bad = (inner: string, attrs = "with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z'") =>
      condition(raw, `<iq type='set'><store xmlns='${ARCHIVE}' ${attrs}>${inner}</store></iq>`);
    expect(await bad('<from secs="1" utc="1469-07-21T02:56:15Z"><body>x</body></from>')).toBe('bad-request');
    expect(await bad('<from><body>x</body><thread>t</thread></from>')).toBe('bad-request');
    expect(await bad("<from><body>x</body><x xmlns='jabber:x:delay'/></from>")).toBe('bad-request');
    expect(await bad('<from secs="-3"><body>x</body></from>')).toBe('bad-request');
    expect(await bad('<message/>')).toBe('bad-request');
    expect(await bad('', "with='juliet@capulet.com/chamber'")).toBe('bad-request');
    expect(await bad('', "start='1469-07-21T02:56:15Z'")).toBe('bad-request');
    expect(await bad('', "with='juliet@capulet.com' start='yesterday'")).toBe('bad-request');
    expect(await bad('', "with='@@' start='1469-07-21T02:56:15Z'")).toBe('jid-malformed');
    // §6: "A collection that contains <EncryptedData/> or <EncryptedKey/> elements MUST NOT contain <to/> or <from/> or <note/> elements."
    await ok(raw, UP1);
    expect(await bad(encryptedData('k', 'AA=='))).toBe('not-acceptable');
    // §5.3: "Clients MUST take care to append each sequence of messages to the collection before
    // the sequence becomes so large that uploading it may violate common rate limiting
    // restrictions", and "If the server cannot service a store request because the collection is
    // too large then it MUST return a <not-acceptable/> error": 256 children a request at most.
    const many = (n: number) =>
      Array.from({ length: n }, (_, i) => `<to secs='1'><body>${i}</body></to>`).join('');
    const attrs = "with='juliet@capulet.com/chamber' start='1469-07-22T00:00:00Z'";
    expect(await bad(many(257), attrs)).toBe('not-acceptable');
    await ok(raw, `<iq type='set'><store xmlns='${ARCHIVE}' ${attrs}>${many(256)}</store></iq>`);
  });
});

describe('XEP-0136 0.9 §6 encrypted collections and §9 keys', () => {
  it('plays crypt1, then list says crypt=true and retrieve returns the referenced EncryptedKeys, all or by KeyName', async () => {
    const { raw } = await romeo();
    await ok(raw, CRYPT1);
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-23T19:22:31Z'>${encryptedData('dataKey2', 'BBBB')}${encryptedKey('dataKey2', 'romeoPublicKey1fingerprint')}${encryptedKey('dataKey2', 'romeoPublicKey2fingerprint')}${encryptedKey('unused', 'romeoPublicKey1fingerprint')}</store></iq>`,
    );
    // <store with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z' subject='She speaks!' crypt='true'/>
    const list = await ok(raw, `<iq type='get'><list xmlns='${ARCHIVE}'/></iq>`);
    expect(stores(list).map((s) => s.attrs.crypt)).toEqual(['true']);
    // "Requesting the first page of an encrypted collection with all versions of keys" (max 5).
    const page = await ok(
      raw,
      retrieve('juliet@capulet.com/chamber', '1469-07-23T19:22:31Z', '<max>5</max>'),
    );
    const data = page?.getChildren('EncryptedData', XMLENC) ?? [];
    expect(data.map((d) => d.getChild('KeyInfo', XMLDSIG)?.getChildText('KeyName', XMLDSIG))).toEqual([
      'dataKey1',
      'dataKey2',
    ]);
    const keys = page?.getChildren('EncryptedKey', XMLENC) ?? [];
    expect(
      keys
        .map(
          (k) =>
            `${k.getChildText('CarriedKeyName', XMLENC)}:${k.getChild('KeyInfo', XMLDSIG)?.getChildText('KeyName', XMLDSIG)}`,
        )
        .sort(),
    ).toEqual([
      'dataKey1:romeoPublicKey1fingerprint',
      'dataKey1:romeoPublicKey2fingerprint',
      'dataKey2:romeoPublicKey1fingerprint',
      'dataKey2:romeoPublicKey2fingerprint',
    ]);
    expect(rsmOf(page)).toMatchObject({ first: '0', index: '0', last: '1', count: 2 });
    // "…with specified version of keys": <KeyName …>romeoPublicKey1fingerprint</KeyName>, max 1.
    const filtered = await ok(
      raw,
      retrieve(
        'juliet@capulet.com/chamber',
        '1469-07-23T19:22:31Z',
        '<max>1</max>',
        `<KeyName xmlns='${XMLDSIG}'>romeoPublicKey1fingerprint</KeyName>`,
      ),
    );
    expect(filtered?.getChildren('EncryptedData', XMLENC)).toHaveLength(1);
    expect(
      filtered?.getChildren('EncryptedKey', XMLENC).map((k) => k.getChildText('CarriedKeyName', XMLENC)),
    ).toEqual(['dataKey1']);
  });

  it('pages a <keys/> answer that would pass the 128 KB post limit, every key once', async () => {
    const { raw } = await romeo();
    const cipher = 'K'.repeat(8_000);
    for (let i = 0; i < 20; i++) {
      const start = `1469-08-${String(i + 1).padStart(2, '0')}T10:00:00Z`;
      await ok(
        raw,
        `<iq type='set'><store xmlns='${ARCHIVE}' with='nurse@house.capulet.com' start='${start}'>${encryptedData(`bigKey${i}`, 'AA')}<EncryptedKey xmlns='${XMLENC}'><CarriedKeyName>bigKey${i}</CarriedKeyName><KeyInfo xmlns='${XMLDSIG}'><KeyName>bigPublicKey</KeyName></KeyInfo><CipherData><CipherValue>${cipher}</CipherValue></CipherData></EncryptedKey></store></iq>`,
      );
    }
    const ask = (set: string) =>
      `<iq type='get' to='localhost'><keys xmlns='${ARCHIVE}'><KeyName xmlns='${XMLDSIG}'>bigPublicKey</KeyName><set xmlns='${RSM}'><max>50</max>${set}</set></keys></iq>`;
    const seen: string[] = [];
    let after = '';
    for (let round = 0; round < 20 && seen.length < 20; round++) {
      const { reply, bytes } = await exchange(raw, ask(after));
      expect(reply.attrs.type).toBe('result');
      expect(bytes).toBeLessThanOrEqual(128 * 1024);
      const keys = reply.getChild('keys', ARCHIVE);
      const carried = stores(keys).flatMap((store) =>
        store.getChildren('EncryptedKey', XMLENC).map((k) => k.getChildText('CarriedKeyName', XMLENC) ?? ''),
      );
      // 20 keys of 8 KB do not fit one answer.
      if (round === 0) expect(carried.length).toBeLessThan(20);
      expect(rsmOf(keys).count).toBe(20);
      seen.push(...carried);
      after = `<after>${rsmOf(keys).last}</after>`;
    }
    expect([...seen].sort()).toEqual(Array.from({ length: 20 }, (_, i) => `bigKey${i}`).sort());
  });

  it('plays pubkey1 (keys), the re-store of keys for a new public key, and the delete of the obsolete ones', async () => {
    const { raw } = await romeo();
    await ok(raw, CRYPT1);
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='balcony@house.capulet.com' start='1469-08-03T13:24:06Z'>${encryptedData('dataKey3', 'CC')}${encryptedKey('dataKey3', 'romeoPublicKey1fingerprint')}</store></iq>`,
    );
    // <keys xmlns='http://jabber.org/protocol/archive'><KeyName …>romeoPublicKey1fingerprint</KeyName><set …><max>50</max></set></keys>
    const keys = await ok(
      raw,
      `<iq type='get' to='localhost' id='pubkey1'><keys xmlns='${ARCHIVE}'><KeyName xmlns='${XMLDSIG}'>romeoPublicKey1fingerprint</KeyName><set xmlns='${RSM}'><max>50</max></set></keys></iq>`,
    );
    expect(
      stores(keys).map((s) => [s.attrs.with, s.attrs.start, s.getChildren('EncryptedKey', XMLENC).length]),
    ).toEqual([
      ['juliet@capulet.com/chamber', '1469-07-23T19:22:31Z', 1],
      ['balcony@house.capulet.com', '1469-08-03T13:24:06Z', 1],
    ]);
    expect(rsmOf(keys)).toMatchObject({ index: '0', count: 2 });
    // "Storing encrypted keys in a collection" for romeoPublicKey3, then "delete" of key 1.
    await ok(
      raw,
      `<iq type='set' id='crypt1'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-23T19:22:31Z'>${encryptedKey('dataKey1', 'romeoPublicKey3fingerprint')}</store></iq>`,
    );
    // The seed sends <delete/> in an iq get; a set is taken too.
    await ok(
      raw,
      `<iq type='get' to='localhost' id='pubkey1'><delete xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-23T19:22:31Z'><KeyName xmlns='${XMLDSIG}'>romeoPublicKey1fingerprint</KeyName></delete></iq>`,
    );
    const after = await ok(raw, retrieve('juliet@capulet.com/chamber', '1469-07-23T19:22:31Z'));
    expect(
      after
        ?.getChildren('EncryptedKey', XMLENC)
        .map((k) => k.getChild('KeyInfo', XMLDSIG)?.getChildText('KeyName', XMLDSIG))
        .sort(),
    ).toEqual(['romeoPublicKey2fingerprint', 'romeoPublicKey3fingerprint']);
    expect(
      await condition(
        raw,
        `<iq type='set'><delete xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1999-01-01T00:00:00Z'><KeyName xmlns='${XMLDSIG}'>x</KeyName></delete></iq>`,
      ),
    ).toBe('item-not-found');
    expect(await condition(raw, `<iq type='get'><keys xmlns='${ARCHIVE}'/></iq>`)).toBe('bad-request');
  });
});

describe('XEP-0136 0.9 §8.1 list with XEP-0059 paging', () => {
  it('plays juliet1, period1, list1 and list2, and answers an empty list when nothing matches', async () => {
    const { raw } = await romeo();
    await ok(raw, UP1);
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='balcony@house.capulet.com' start='1469-07-21T03:16:37Z'/></iq>`,
    );
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/balcony' start='1469-07-22T01:00:00Z'/></iq>`,
    );
    // juliet1: <list with='juliet@capulet.com'><set><max>30</max></set></list> — a bare JID matches full JIDs.
    const juliet1 = await ok(
      raw,
      `<iq type='get' to='localhost' id='juliet1'><list xmlns='${ARCHIVE}' with='juliet@capulet.com'><set xmlns='${RSM}'><max>30</max></set></list></iq>`,
    );
    expect(stores(juliet1).map((s) => s.attrs.with)).toEqual([
      'juliet@capulet.com/chamber',
      'juliet@capulet.com/balcony',
    ]);
    // period1: start='1469-07-21T02:00:00Z' end='1479-07-21T04:00:00Z'
    const period1 = await ok(
      raw,
      `<iq type='get' id='period1'><list xmlns='${ARCHIVE}' with='juliet@capulet.com' start='1469-07-21T02:00:00Z' end='1469-07-21T04:00:00Z'><set xmlns='${RSM}'><max>30</max></set></list></iq>`,
    );
    expect(stores(period1).map((s) => s.attrs.start)).toEqual(['1469-07-21T02:56:15Z']);
    // list1: start='1469-07-21T02:00:00Z', max 30: chronological, with first/last/count.
    const list1 = await ok(
      raw,
      `<iq type='get' id='list1'><list xmlns='${ARCHIVE}' start='1469-07-21T02:00:00Z'><set xmlns='${RSM}'><max>2</max></set></list></iq>`,
    );
    expect(stores(list1).map((s) => [s.attrs.with, s.attrs.start, s.attrs.subject])).toEqual([
      ['juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', 'She speaks!'],
      ['balcony@house.capulet.com', '1469-07-21T03:16:37Z', undefined],
    ]);
    const rsm = rsmOf(list1);
    expect(rsm).toMatchObject({ index: '0', count: 3 });
    // list2: <after> the last UID of the first page.
    const list2 = await ok(
      raw,
      `<iq type='get' id='list2'><list xmlns='${ARCHIVE}' start='1469-07-21T02:00:00Z'><set xmlns='${RSM}'><max>30</max><after>${rsm.last}</after></set></list></iq>`,
    );
    expect(stores(list2).map((s) => s.attrs.with)).toEqual(['juliet@capulet.com/balcony']);
    // "If no collections correspond to the request the server MUST return an empty <list/> element".
    const { reply } = await exchange(
      raw,
      `<iq type='get' id='list1'><list xmlns='${ARCHIVE}' with='nobody@nowhere.example'/></iq>`,
    );
    const empty = reply.getChild('list', ARCHIVE);
    expect(empty?.getChildElements()).toHaveLength(0);
    // Domain filter.
    const domain = await ok(raw, `<iq type='get'><list xmlns='${ARCHIVE}' with='house.capulet.com'/></iq>`);
    expect(stores(domain).map((s) => s.attrs.with)).toEqual(['balcony@house.capulet.com']);
  });

  it('pages forwards, backwards (empty before = last page), by index, and counts with max 0', async () => {
    const { raw } = await romeo();
    const starts = await seedCollections(raw, 12);
    const page = async (set: string) =>
      ok(raw, `<iq type='get'><list xmlns='${ARCHIVE}'><set xmlns='${RSM}'>${set}</set></list></iq>`);
    const startsOf = (el: Element | undefined) => stores(el).map((s) => s.attrs.start);
    // Forwards, 5 at a time.
    const seen: string[] = [];
    let after: string | undefined;
    for (;;) {
      const p = await page(`<max>5</max>${after ? `<after>${after}</after>` : ''}`);
      const rsm = rsmOf(p);
      expect(rsm.count).toBe(12);
      if (!rsm.last) break;
      // XEP-0059 §2.3: "The <first/> element SHOULD include an 'index' attribute. This integer
      // specifies the position within the full set [...] of the first item in the page": on
      // every page, the ones fetched with <after/> too.
      expect(rsm.index).toBe(String(seen.length));
      seen.push(...startsOf(p));
      after = rsm.last;
    }
    expect(seen).toEqual(starts);
    // XEP-0059 §2.5: empty <before/> is the last page; then backwards with before.
    const last = await page('<max>5</max><before/>');
    expect(startsOf(last)).toEqual(starts.slice(7));
    expect(rsmOf(last).index).toBe('7');
    const previous = await page(`<max>5</max><before>${rsmOf(last).first}</before>`);
    expect(startsOf(previous)).toEqual(starts.slice(2, 7));
    expect(rsmOf(previous)).toMatchObject({ index: '2', count: 12 });
    const earliest = await page(`<max>5</max><before>${rsmOf(previous).first}</before>`);
    expect(startsOf(earliest)).toEqual(starts.slice(0, 2));
    expect(rsmOf(earliest)).toMatchObject({ index: '0', count: 12 });
    // §2.6 page by index.
    const jumped = await page('<max>3</max><index>4</index>');
    expect(startsOf(jumped)).toEqual(starts.slice(4, 7));
    expect(rsmOf(jumped).index).toBe('4');
    expect(startsOf(await page('<max>3</max><index>12</index>'))).toEqual([]);
    // §2.7 count only.
    const counted = await page('<max>0</max>');
    expect(startsOf(counted)).toEqual([]);
    expect(rsmOf(counted).count).toBe(12);
    // A cursor whose collection was removed meanwhile still places the page.
    const cursor = rsmOf(await page('<max>4</max>')).last;
    await ok(
      raw,
      `<iq type='set'><remove xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='${starts[3]}'/></iq>`,
    );
    const afterGone = await page(`<max>2</max><after>${cursor}</after>`);
    expect(startsOf(afterGone)).toEqual(starts.slice(4, 6));
    expect(rsmOf(afterGone)).toMatchObject({ index: '3', count: 11 });
  });

  it('0.5: maxitems with partial=true, and the continuation one second after the last start', async () => {
    const { raw } = await romeo();
    const starts = await seedCollections(raw, 5);
    // <list xmlns='http://jabber.org/protocol/archive' maxitems='50'/>
    const first = await ok(raw, `<iq type='get'><list xmlns='${ARCHIVE}' maxitems='3'/></iq>`);
    expect(first?.attrs.partial).toBe('true');
    expect(first?.getChild('set', RSM)).toBeUndefined();
    expect(stores(first).map((s) => s.attrs.start)).toEqual(starts.slice(0, 3));
    // "set the value of the 'start' attribute to one second after the time of the last collection in the partial list".
    const next = new Date(Date.parse(starts[2] as string) + 1000).toISOString().replace('.000Z', 'Z');
    const rest = await ok(raw, `<iq type='get'><list xmlns='${ARCHIVE}' maxitems='3' start='${next}'/></iq>`);
    expect(rest?.attrs.partial).toBeUndefined();
    expect(stores(rest).map((s) => s.attrs.start)).toEqual(starts.slice(3));
  });

  it('0.5: partial=true rests on the collection read past the page, not on a count that lags', async () => {
    // 0.5: "the server MUST indicate that the list is incomplete by setting the optional
    // 'partial' attribute of the <list/> element to 'true'". The count is an eventually
    // consistent COUNT on DynamoDB: just after new collections it may not include them yet.
    const { raw } = await romeo();
    const starts = await seedCollections(raw, 4);
    const archive = stack.server.archive;
    const list = archive.listCollections.bind(archive);
    const restore = intercept(archive, 'listCollections', async (...args) => {
      const page = await list(...args);
      return { ...page, count: page.items.length - 1 };
    });
    try {
      const first = await ok(raw, `<iq type='get'><list xmlns='${ARCHIVE}' maxitems='3'/></iq>`);
      expect(stores(first).map((s) => s.attrs.start)).toEqual(starts.slice(0, 3));
      expect(first?.attrs.partial).toBe('true');
    } finally {
      restore();
    }
  });

  it('0.5: a partial list ends where "one second after" its last start finds the next collection', async () => {
    const { raw } = await romeo();
    // Starts 0 s, 1 s, 1.5 s and 5 s after the base: the third is less than a second after the second.
    const base = Date.UTC(1469, 6, 21, 3, 0, 0);
    const starts = [0, 1000, 1500, 5000].map((offset) =>
      new Date(base + offset).toISOString().replace('.000Z', 'Z'),
    );
    for (const [i, start] of starts.entries()) {
      await ok(
        raw,
        `<iq type='set'><store xmlns='${ARCHIVE}' with='c${i}@capulet.com' start='${start}'><to secs='0'><body>m${i}</body></to></store></iq>`,
      );
    }
    const seen: string[] = [];
    let from: string | undefined;
    for (let round = 0; round < 4; round++) {
      const list = await ok(
        raw,
        `<iq type='get'><list xmlns='${ARCHIVE}' maxitems='2'${from ? ` start='${from}'` : ''}/></iq>`,
      );
      const got = stores(list).map((s) => s.attrs.start as string);
      seen.push(...got);
      if (list?.attrs.partial !== 'true') break;
      // "set the value of the 'start' attribute to one second after the time of the last
      // collection in the partial list".
      from = new Date(Date.parse(got.at(-1) as string) + 1000).toISOString();
    }
    // Every collection once: the first page stopped before the 1 s one, whose next is closer
    // than a second, instead of losing the 1.5 s one to the continuation.
    expect(seen).toEqual(starts);
  });
});

describe('XEP-0136 0.9 §8.2 retrieve with XEP-0059 paging', () => {
  it('plays page1/page2 over a 217-message collection, backwards and by index, and 0.5 partial without <set/>', async () => {
    const { raw } = await romeo();
    const body = Array.from(
      { length: 217 },
      (_, i) =>
        `<${i % 2 ? 'to' : 'from'} secs='${i ? 1 : 0}'><body>line ${i}</body></${i % 2 ? 'to' : 'from'}>`,
    );
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z' subject='She speaks!'>${body.join('')}</store></iq>`,
    );
    // page1: <max>100</max> → <first index='0'>0</first> <last>99</last> <count>217</count>
    const page1 = await ok(
      raw,
      retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', '<max>100</max>'),
    );
    expect(entries(page1)).toHaveLength(100);
    expect(rsmOf(page1)).toEqual({ first: '0', index: '0', last: '99', count: 217 });
    // page2: <after>99</after>
    const page2 = await ok(
      raw,
      retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', '<max>100</max><after>99</after>'),
    );
    expect(entries(page2)[0]?.getChildText('body')).toBe('line 100');
    expect(rsmOf(page2)).toMatchObject({ first: '100', last: '199' });
    const lastPage = await ok(
      raw,
      retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', '<max>10</max><before/>'),
    );
    expect(entries(lastPage).map((e) => e.getChildText('body'))).toEqual(
      Array.from({ length: 10 }, (_, i) => `line ${207 + i}`),
    );
    expect(rsmOf(lastPage).index).toBe('207');
    const before = await ok(
      raw,
      retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', '<max>2</max><before>207</before>'),
    );
    expect(entries(before).map((e) => e.getChildText('body'))).toEqual(['line 205', 'line 206']);
    const indexed = await ok(
      raw,
      retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', '<max>2</max><index>150</index>'),
    );
    expect(entries(indexed).map((e) => e.getChildText('body'))).toEqual(['line 150', 'line 151']);
    expect(rsmOf(indexed).index).toBe('150');
    // secs: 1 each after the first; the sum is each message's offset.
    expect(entries(page2).every((e) => e.attrs.secs === '1')).toBe(true);
    // 0.5 down1: no <set/> → the first part with partial='true'.
    const down1 = await ok(raw, retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z'));
    expect(down1?.attrs.partial).toBe('true');
    expect(down1?.getChild('set', RSM)).toBeUndefined();
    // 0.5 §4.3: "the client MAY then request the remainder of the collection, taking care to set
    // the value of the 'start' attribute to one second after the time of the last <from/> or
    // <to/> element in the partial collection that it received". line 99 is 99 s after the start,
    // and a 0.5 reply says so itself: "The time in seconds of the message relative to the
    // start-time of the collection SHOULD be specified with a 'secs' attribute" (0.5, where 0.9
    // §5.2 counts from the previous message).
    const bodies = (store: Element | undefined) => entries(store).map((e) => e.getChildText('body'));
    expect(bodies(down1).at(-1)).toBe('line 99');
    expect(entries(down1).map((e) => e.attrs.secs)).toEqual(Array.from({ length: 100 }, (_, i) => String(i)));
    const oneSecondAfter = (store: Element | undefined) =>
      new Date(Date.parse('1469-07-21T02:56:15Z') + (Number(entries(store).at(-1)?.attrs.secs) + 1) * 1000)
        .toISOString()
        .replace('.000Z', 'Z');
    expect(oneSecondAfter(down1)).toBe('1469-07-21T02:57:55Z');
    const down2 = await ok(raw, retrieve('juliet@capulet.com/chamber', oneSecondAfter(down1)));
    expect(down2?.attrs).toMatchObject({ with: 'juliet@capulet.com/chamber', start: '1469-07-21T02:56:15Z' });
    expect(bodies(down2)).toEqual(Array.from({ length: 100 }, (_, i) => `line ${100 + i}`));
    expect(down2?.attrs.partial).toBe('true');
    expect(entries(down2)[0]?.attrs.secs).toBe('100');
    const down3 = await ok(raw, retrieve('juliet@capulet.com/chamber', oneSecondAfter(down2)));
    expect(bodies(down3)).toEqual(Array.from({ length: 17 }, (_, i) => `line ${200 + i}`));
    expect(down3?.attrs.partial).toBeUndefined();
    // Past the collection's last entry (line 216, 216 s after the start) the time lies in no
    // collection: 0.5 §4.3 "If the collection does not exist then the server MUST return an
    // <item-not-found/> error", and never another collection's empty <store/>.
    expect(await condition(raw, retrieve('juliet@capulet.com/chamber', '1469-07-21T02:59:52Z'))).toBe(
      'item-not-found',
    );
    expect(await condition(raw, retrieve('juliet@capulet.com/chamber', '2000-01-01T00:00:00Z'))).toBe(
      'item-not-found',
    );
    // A page is cut where "one second after" its last entry finds the next one: lines 99 and 100
    // of another collection are shown at the same second, so the first part ends at line 98.
    const sameSecond = Array.from(
      { length: 101 },
      (_, i) => `<to secs='${i === 0 || i === 100 ? 0 : 1}'><body>line ${i}</body></to>`,
    );
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='nurse@capulet.com/chamber' start='1469-07-21T03:00:00Z'>${sameSecond.join('')}</store></iq>`,
    );
    const part1 = await ok(raw, retrieve('nurse@capulet.com/chamber', '1469-07-21T03:00:00Z'));
    expect(part1?.attrs.partial).toBe('true');
    expect(bodies(part1).at(-1)).toBe('line 98');
    // Line 98 is 98 s after the start: the remainder from 99 s holds lines 99 and 100.
    const part2 = await ok(raw, retrieve('nurse@capulet.com/chamber', '1469-07-21T03:01:39Z'));
    expect(bodies(part2)).toEqual(['line 99', 'line 100']);
    expect(part2?.attrs.partial).toBeUndefined();
    // Nor on an entry shown with its exact `utc` time (line 99, 98.3 s after the start): "one
    // second after" it would pass line 100, 99 s after the start, by.
    const withUtc = Array.from({ length: 101 }, (_, i) =>
      i === 99
        ? `<to utc='1469-07-21T03:11:38.300Z'><body>line 99</body></to>`
        : `<to secs='${i === 0 ? 0 : 1}'><body>line ${i}</body></to>`,
    );
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='nurse@capulet.com/garden' start='1469-07-21T03:10:00Z'>${withUtc.join('')}</store></iq>`,
    );
    const utc1 = await ok(raw, retrieve('nurse@capulet.com/garden', '1469-07-21T03:10:00Z'));
    expect(bodies(utc1).at(-1)).toBe('line 97');
    const utc2 = await ok(raw, retrieve('nurse@capulet.com/garden', '1469-07-21T03:11:38Z'));
    expect(bodies(utc2)).toEqual(['line 98', 'line 99', 'line 100']);
    // A 0.9 request (with <set/>) names a collection by its start: that time begins none.
    expect(
      await condition(raw, retrieve('juliet@capulet.com/chamber', '1469-07-21T02:57:55Z', '<max>10</max>')),
    ).toBe('item-not-found');
  });

  it('answers item-not-found for a missing collection and an empty <store/> for an empty one', async () => {
    const { raw } = await romeo();
    // <error code='404' type='cancel'><item-not-found …/></error>
    const { reply } = await exchange(raw, retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z'));
    expect(reply.attrs.type).toBe('error');
    expect(reply.getChild('error')?.attrs.type).toBe('cancel');
    expect(reply.getChild('error')?.getChild('item-not-found')).toBeDefined();
    // "If the requested collection is empty the server MUST return an empty <store/> element".
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z' subject='She speaks!'/></iq>`,
    );
    const empty = await ok(
      raw,
      retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', '<max>100</max>'),
    );
    expect(empty?.attrs).toMatchObject({
      with: 'juliet@capulet.com/chamber',
      start: '1469-07-21T02:56:15Z',
      subject: 'She speaks!',
    });
    expect(empty?.getChildElements()).toHaveLength(0);
  });

  it('pages an answer that would pass the 128 KB post limit instead of truncating it', async () => {
    const { raw } = await romeo();
    await storeLargeMessages(raw);
    const { reply, bytes } = await exchange(
      raw,
      retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', '<max>100</max>'),
    );
    expect(bytes).toBeLessThanOrEqual(128 * 1024);
    const first = reply.getChild('store', ARCHIVE);
    const got = entries(first).length;
    expect(got).toBeGreaterThan(0);
    expect(got).toBeLessThan(8);
    const rest = await ok(
      raw,
      retrieve(
        'juliet@capulet.com/chamber',
        '1469-07-21T02:56:15Z',
        `<max>100</max><after>${rsmOf(first).last}</after>`,
      ),
    );
    expect(got + entries(rest).length).toBeGreaterThanOrEqual(Math.min(8, got * 2));
    expect(rsmOf(first).count).toBe(8);
  });

  it('cuts a backwards page at its start: "the *last* item in the page … MUST be the item that immediately *preceeds*" (XEP-0059 §2.5)', async () => {
    const { raw } = await romeo();
    await storeLargeMessages(raw);
    const numbers = (store: Element | undefined) =>
      entries(store).map((e) => Number(e.getChildText('body')?.slice(0, 1)));
    // An empty <before/>: the last page, which must end with the newest message.
    const { reply, bytes } = await exchange(
      raw,
      retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z', '<max>100</max><before/>'),
    );
    expect(bytes).toBeLessThanOrEqual(128 * 1024);
    const last = reply.getChild('store', ARCHIVE);
    const got = numbers(last);
    expect(got.length).toBeGreaterThan(0);
    expect(got.length).toBeLessThan(8);
    expect(got).toEqual(Array.from({ length: got.length }, (_, i) => 8 - got.length + i));
    expect(rsmOf(last).count).toBe(8);
    // Scrolling back from its first item reaches every earlier one, none twice.
    const seen = [...got];
    let before = rsmOf(last).first;
    for (let round = 0; round < 8 && seen[0] !== 0; round++) {
      const page = await ok(
        raw,
        retrieve(
          'juliet@capulet.com/chamber',
          '1469-07-21T02:56:15Z',
          `<max>100</max><before>${before}</before>`,
        ),
      );
      const store = page;
      seen.unshift(...numbers(store));
      before = rsmOf(store).first;
    }
    expect(seen).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
  });
});

describe('XEP-0136 0.9 §8.3 remove', () => {
  it('plays every removal example, and item-not-found when nothing matches', async () => {
    const { raw } = await romeo();
    const list = async () =>
      stores(await ok(raw, `<iq type='get'><list xmlns='${ARCHIVE}'/></iq>`)).map(
        (s) => `${s.attrs.with} ${s.attrs.start}`,
      );
    const seed = async () => {
      for (const [w, s] of [
        ['juliet@capulet.com/chamber', '1469-07-21T02:56:15Z'],
        ['juliet@capulet.com/balcony', '1469-07-21T03:30:00Z'],
        ['benvolio@montague.net/street', '1469-07-21T05:00:00Z'],
        ['balcony@house.capulet.com', '1469-07-20T01:00:00Z'],
      ]) {
        await ok(
          raw,
          `<iq type='set'><store xmlns='${ARCHIVE}' with='${w}' start='${s}'><to secs='0'><body>b</body></to></store></iq>`,
        );
      }
    };
    await seed();
    // "Removing a single collection"
    await ok(
      raw,
      `<iq type='set' to='localhost'><remove xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z'/></iq>`,
    );
    expect(await list()).not.toContain('juliet@capulet.com/chamber 1469-07-21T02:56:15Z');
    // "Removing all collections with a specified bare JID between two times"
    await ok(
      raw,
      `<iq type='set' to='localhost'><remove xmlns='${ARCHIVE}' with='juliet@capulet.com' start='1469-07-21T02:00:00Z' end='1469-07-21T04:00:00Z'/></iq>`,
    );
    expect(await list()).toEqual([
      'balcony@house.capulet.com 1469-07-20T01:00:00Z',
      'benvolio@montague.net/street 1469-07-21T05:00:00Z',
    ]);
    // "Removing all collections after a date" (end in 2038)
    await ok(
      raw,
      `<iq type='set'><remove xmlns='${ARCHIVE}' start='1469-07-21T02:00:00Z' end='2038-01-01T00:00:00Z'/></iq>`,
    );
    expect(await list()).toEqual(['balcony@house.capulet.com 1469-07-20T01:00:00Z']);
    // "Removing all collections before a date" (start 0000-01-01)
    await ok(
      raw,
      `<iq type='set'><remove xmlns='${ARCHIVE}' start='0000-01-01T00:00:00Z' end='1469-07-21T04:00:00Z'/></iq>`,
    );
    expect(await list()).toEqual([]);
    // A start alone (neither with nor end): the collections that start then, with any JID, not
    // everything after it (the seed's range names both dates: "If the end date is in the future").
    await seed();
    const seeded = await list();
    await ok(raw, `<iq type='set'><remove xmlns='${ARCHIVE}' start='1469-07-21T02:56:15Z'/></iq>`);
    expect(await list()).toEqual(seeded.filter((entry) => !entry.endsWith(' 1469-07-21T02:56:15Z')));
    expect(seeded.length - (await list()).length).toBe(1);
    // "Removing all collections"
    await ok(raw, `<iq type='set'><remove xmlns='${ARCHIVE}'/></iq>`);
    expect(await list()).toEqual([]);
    // "Unsuccessful reply": item-not-found.
    expect(
      await condition(
        raw,
        `<iq type='set'><remove xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z'/></iq>`,
      ),
    ).toBe('item-not-found');
    expect(await condition(raw, `<iq type='set'><remove xmlns='${ARCHIVE}'/></iq>`)).toBe('item-not-found');
  });

  it("removes the collections being recorded (open='true'), with one JID or all", async () => {
    const jid = await world.newUser('romeo');
    const juliet = await world.newUser('juliet');
    const nurse = await world.newUser('nurse');
    const orchard = await world.online(jid, 'orchard');
    const chamber = await world.online(juliet, 'chamber');
    const garden = await world.online(nurse, 'garden');
    await ok(orchard, `<iq type='set'><auto xmlns='${ARCHIVE}' save='true'/></iq>`);
    await ok(
      orchard,
      `<iq type='set'><pref xmlns='${ARCHIVE}'><default save='body' otr='allow'/></pref></iq>`,
    );
    await chat(orchard, chamber, `${juliet}/chamber`, 'recorded 1');
    await chat(orchard, garden, `${nurse}/garden`, 'recorded 2');
    await ok(orchard, UP1);
    // <remove xmlns='http://jabber.org/protocol/archive' with='juliet@capulet.com/chamber' open='true'/>
    await ok(
      orchard,
      `<iq type='set'><remove xmlns='${ARCHIVE}' with='${juliet}/chamber' open='true'/></iq>`,
    );
    let listed = stores(await ok(orchard, `<iq type='get'><list xmlns='${ARCHIVE}'/></iq>`)).map(
      (s) => s.attrs.with,
    );
    expect(listed.sort()).toEqual(['juliet@capulet.com/chamber', `${nurse}/garden`].sort());
    // <remove xmlns='http://jabber.org/protocol/archive' open='true'/>
    await ok(orchard, `<iq type='set'><remove xmlns='${ARCHIVE}' open='true'/></iq>`);
    listed = stores(await ok(orchard, `<iq type='get'><list xmlns='${ARCHIVE}'/></iq>`)).map(
      (s) => s.attrs.with,
    );
    expect(listed).toEqual(['juliet@capulet.com/chamber']);
    expect(await condition(orchard, `<iq type='set'><remove xmlns='${ARCHIVE}' open='true'/></iq>`)).toBe(
      'item-not-found',
    );
  });
});

describe('XEP-0136 0.9 §10 replication', () => {
  it('plays sync1: changed and removed collections in change order, with <last/> to continue from, tombstones included', async () => {
    const { raw } = await romeo();
    const since = new Date(Date.now() - 1000).toISOString();
    await ok(raw, UP1);
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='balcony@house.capulet.com' start='1469-07-21T03:16:37Z'><to secs='0'><body>b</body></to></store></iq>`,
    );
    await ok(
      raw,
      `<iq type='set'><remove xmlns='${ARCHIVE}' with='balcony@house.capulet.com' start='1469-07-21T03:16:37Z'/></iq>`,
    );
    // <modified …><set …><max>50</max><after>1469-07-21T01:14:47Z</after></set></modified>
    const sync = async (after: string) =>
      ok(
        raw,
        `<iq type='get' to='localhost' id='sync1'><modified xmlns='${ARCHIVE}'><set xmlns='${RSM}'><max>50</max><after>${after}</after></set></modified></iq>`,
      );
    // Changes are listed once they are two seconds old (the change index may lag).
    let page: Element | undefined;
    await eventually(async () => {
      page = await sync(since);
      expect(page?.getChildElements().filter((e) => e.name !== 'set')).toHaveLength(2);
    });
    expect(
      page
        ?.getChildElements()
        .filter((e) => e.name !== 'set')
        .map((e) => [e.name, e.attrs.with, e.attrs.start]),
    ).toEqual([
      ['changed', 'juliet@capulet.com/chamber', '1469-07-21T02:56:15Z'],
      ['removed', 'balcony@house.capulet.com', '1469-07-21T03:16:37Z'],
    ]);
    const rsm = rsmOf(page);
    expect(rsm.count).toBe(2);
    expect(rsm.last).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$/);
    // Nothing after the last change; a later change shows up after it.
    expect((await sync(rsm.last as string))?.getChildElements().filter((e) => e.name !== 'set')).toHaveLength(
      0,
    );
    await ok(
      raw,
      `<iq type='set'><store xmlns='${ARCHIVE}' with='juliet@capulet.com/chamber' start='1469-07-21T02:56:15Z' subject='again'/></iq>`,
    );
    await eventually(async () => {
      const next = await sync(rsm.last as string);
      expect(
        next
          ?.getChildElements()
          .filter((e) => e.name !== 'set')
          .map((e) => e.name),
      ).toEqual(['changed']);
    });
    expect(
      await condition(
        raw,
        `<iq type='get'><modified xmlns='${ARCHIVE}'><set xmlns='${RSM}'><before/></set></modified></iq>`,
      ),
    ).toBe('bad-request');
  });
});

describe('expiry', () => {
  it("gives each archived item a DynamoDB TTL from the mode's expire and hides its messages once expired", async () => {
    const { jid, raw } = await romeo();
    await ok(
      raw,
      `<iq type='set'><pref xmlns='${ARCHIVE}'><item jid='juliet@capulet.com' save='body' otr='allow' expire='1'/></pref></iq>`,
    );
    const storedAt = Math.floor(Date.now() / 1000);
    await ok(raw, UP1);
    // The store is answered: its TTL was taken between the two.
    const storedBy = Math.floor(Date.now() / 1000);
    const doc = documentClientFor(stack.server.config);
    const header = await doc.send(
      new GetCommand({
        TableName: stack.server.config.tables.archive,
        Key: { pk: jid, sk: 'c#1469-07-21T02:56:15.000Z/juliet@capulet.com/chamber' },
      }),
    );
    // The header outlives its messages by a day (it is pushed on as messages come).
    expect(header.Item?.[TTL_ATTRIBUTE]).toBeGreaterThanOrEqual(storedAt + 1 + 86_400);
    const message = await doc.send(
      new GetCommand({
        TableName: stack.server.config.tables.archive,
        Key: { pk: `${jid}/${header.Item?.cid}`, sk: 'm#0000000000' },
      }),
    );
    expect(message.Item?.[TTL_ATTRIBUTE]).toBeGreaterThanOrEqual(storedAt + 1);
    expect(message.Item?.[TTL_ATTRIBUTE]).toBeLessThanOrEqual(storedBy + 1);
    // DynamoDB deletes expired items within days; reads filter them out at once.
    await eventually(async () => {
      const store = await ok(raw, retrieve('juliet@capulet.com/chamber', '1469-07-21T02:56:15Z'));
      expect(entries(store)).toHaveLength(0);
    });
  });
});
