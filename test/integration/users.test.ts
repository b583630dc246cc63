/**
 * The Users store and `npm run user` against the test run's DynamoDB Local, on fresh tables
 * built from shared/tables.ts (test/support/dynamodb.ts): conditional writes, the atomic failure
 * counter, and a CLI-created account that SCRAM and PLAIN logins accept.
 */
import { execFile } from 'node:child_process';
import { type DynamoDBDocumentClient, GetCommand } from '@aws-sdk/lib-dynamodb';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runUserCli } from '../../infra/user-cli.ts';
import {
  deriveCredentialSet,
  parseClientFirst,
  type ScramHash,
  serverFirst,
  verifyClientFinal,
  verifyPlain,
} from '../../shared/sasl/scram.ts';
import { documentClientFor } from '../../shared/store/dynamo.ts';
import {
  type AuthAttempt,
  createUserStore,
  UnknownUserError,
  UserExistsError,
  type UserStore,
} from '../../shared/store/users.ts';
import { createTestConfig, useDynamoDbLocal } from '../support/dynamodb.ts';
import { scramClientFinal, scramClientFirst } from '../support/scram-client.ts';

let table: string;
/** The other tables `delete` clears (an account's roster, offline inbox, archive). */
let ownedTables: Record<string, string>;
let endpoint: string;
let doc: DynamoDBDocumentClient;
let users: UserStore;

beforeAll(async () => {
  const config = await createTestConfig();
  table = config.tables.users;
  ownedTables = {
    SESSIONS_TABLE: config.tables.sessions,
    ROSTER_TABLE: config.tables.roster,
    OFFLINE_TABLE: config.tables.offline,
    ARCHIVE_TABLE: config.tables.archive,
  };
  endpoint = useDynamoDbLocal();
  doc = documentClientFor(config);
  users = createUserStore(doc, table);
});

afterAll(() => {
  doc?.destroy();
});

/** A SCRAM exchange between the test client and the server functions, with stored keys. */
async function scramLogin(jid: string, hash: ScramHash, password: string): Promise<boolean> {
  const user = await users.get(jid);
  if (!user) throw new Error(`${jid} is not stored`);
  const clientFirst = scramClientFirst(jid.split('@')[0], 'integrationnonce');
  const first = serverFirst(parseClientFirst(clientFirst), hash, user.scram[hash]);
  const final = scramClientFinal({ hash, password, clientFirst, serverFirst: first.message });
  const result = verifyClientFinal(first.state, final.message);
  if (result.ok) expect(result.serverFinal).toBe(final.expectedServerFinal);
  return result.ok;
}

describe('user store', () => {
  it('creates, reads, checks, re-keys and deletes an account', async () => {
    const jid = 'store-a@localhost';
    const scram = await deriveCredentialSet('first', 4096);
    expect(await users.exists(jid)).toBe(false);
    expect(await users.get(jid)).toBeUndefined();

    const created = await users.create(jid, scram);
    expect(created).toMatchObject({ jid, scram });
    expect(await users.exists(jid)).toBe(true);
    expect(await users.get(jid)).toEqual(created);
    await expect(users.create(jid, scram)).rejects.toBeInstanceOf(UserExistsError);

    const rekeyed = await deriveCredentialSet('second', 4096);
    await users.replaceCredentials(jid, rekeyed);
    const after = await users.get(jid);
    expect(after?.scram).toEqual(rekeyed);
    expect(after?.createdAt).toBe(created.createdAt);

    await users.delete(jid);
    expect(await users.exists(jid)).toBe(false);
    await expect(users.delete(jid)).rejects.toBeInstanceOf(UnknownUserError);
    await expect(users.replaceCredentials(jid, rekeyed)).rejects.toBeInstanceOf(UnknownUserError);
    // The failed re-key did not create an item behind the condition's back.
    expect(await users.exists(jid)).toBe(false);
  });

  it('lists accounts only, not failure counters', async () => {
    const scram = await deriveCredentialSet('pw', 4096);
    await users.create('list-b@localhost', scram);
    await users.create('list-a@localhost', scram);
    await users.recordAuthFailure('list-a@localhost', 300);
    await users.recordAuthFailure('list-ghost@localhost', 300);
    const listed = (await users.list()).filter((jid) => jid.startsWith('list-'));
    expect(listed).toEqual(['list-a@localhost', 'list-b@localhost']);
  });

  it('reads the account and its failure count with one query at login', async () => {
    const scram = await deriveCredentialSet('pw', 4096);
    await users.create('login-a@localhost', scram);
    await users.recordAuthFailure('login-a@localhost', 300);
    await users.recordAuthFailure('login-a@localhost', 300);
    expect(await users.loginRecord('login-a@localhost')).toMatchObject({ user: { scram }, authFailures: 2 });
    expect(await users.loginRecord('login-nobody@localhost')).toEqual({
      authFailures: 0,
      knownAddresses: {},
    });
  });

  it('remembers the addresses an account logged in from, the newest ten, rewriting at most daily', async () => {
    await users.create('addr-a@localhost', await deriveCredentialSet('pw', 4096));
    let known = (await users.loginRecord('addr-a@localhost')).knownAddresses;
    for (let i = 0; i < 12; i++) {
      await users.rememberAddress('addr-a@localhost', `192.0.2.${i}`, known);
      known = (await users.loginRecord('addr-a@localhost')).knownAddresses;
    }
    expect(Object.keys(known)).toHaveLength(10);
    expect(known['192.0.2.11']).toBeDefined();
    expect(known['192.0.2.0']).toBeUndefined();
  });

  it('counts failures per source address in their own window, apart from accounts', async () => {
    expect(await users.recordAddressFailure('198.51.100.7', 300)).toBe(1);
    expect(await users.recordAddressFailure('198.51.100.7', 300)).toBe(2);
    expect(await users.addressFailures('198.51.100.7')).toBe(2);
    expect(await users.addressFailures('198.51.100.8')).toBe(0);
    // An address item is no account: listing accounts never shows it.
    expect((await users.list()).some((jid) => jid.includes('198.51.100.7'))).toBe(false);
  });

  it('records every iteration count of the keys it stores, for the decoys', async () => {
    await users.create('iter-a@localhost', await deriveCredentialSet('pw', 5000));
    expect(await users.scramIterations()).toContain(5000);
    await users.replaceCredentials('iter-a@localhost', await deriveCredentialSet('pw', 6000));
    // Other accounts may keep keys of the first count: both stay in use.
    const counts = await users.scramIterations();
    expect(counts).toEqual(expect.arrayContaining([5000, 6000]));
    expect(counts).toEqual([...counts].sort((a, b) => a - b));
  });
});

describe('authentication failure counter', () => {
  it('counts 20 concurrent failures exactly once each', async () => {
    const jid = 'concurrent@localhost';
    const counts = await Promise.all(Array.from({ length: 20 }, () => users.recordAuthFailure(jid, 300)));
    expect([...counts].sort((a, b) => a - b)).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    expect(await users.authFailures(jid)).toBe(20);
  });

  it('counts for JIDs without an account, identically', async () => {
    expect(await users.exists('ghost@localhost')).toBe(false);
    expect(await users.recordAuthFailure('ghost@localhost', 300)).toBe(1);
    expect(await users.recordAuthFailure('ghost@localhost', 300)).toBe(2);
    expect(await users.authFailures('ghost@localhost')).toBe(2);
  });

  it('sets the TTL attribute to the end of the window and restarts after it', async () => {
    let clock = Date.UTC(2030, 0, 1);
    const timed = createUserStore(doc, table, { now: () => clock });
    const jid = 'window@localhost';
    await timed.recordAuthFailure(jid, 60);
    clock += 30_000;
    expect(await timed.recordAuthFailure(jid, 60)).toBe(2);
    const { Item } = await doc.send(new GetCommand({ TableName: table, Key: { pk: jid, sk: 'authfail' } }));
    // The window runs from the first failure, not the latest.
    expect(Item).toMatchObject({ failures: 2, expiresAt: Date.UTC(2030, 0, 1) / 1000 + 60 });

    // Past the window but before DynamoDB's TTL sweep removed the item: reads ignore it...
    clock += 31_000;
    expect(await timed.authFailures(jid)).toBe(0);
    expect((await timed.loginRecord(jid)).authFailures).toBe(0);
    // ...and the next failure starts a new window.
    expect(await timed.recordAuthFailure(jid, 60)).toBe(1);
    expect(await timed.recordAuthFailure(jid, 60)).toBe(2);
  });

  it('restarts an expired window once under concurrency', async () => {
    let clock = Date.UTC(2031, 0, 1);
    const timed = createUserStore(doc, table, { now: () => clock });
    const jid = 'window-race@localhost';
    await timed.recordAuthFailure(jid, 10);
    clock += 20_000;
    const counts = await Promise.all(Array.from({ length: 10 }, () => timed.recordAuthFailure(jid, 10)));
    expect([...counts].sort((a, b) => a - b)).toEqual(Array.from({ length: 10 }, (_, i) => i + 1));
    expect(await timed.authFailures(jid)).toBe(10);
  });

  it('admits exactly as many of 20 concurrent attempts as the limit leaves, counting each in the same write', async () => {
    const address = '203.0.113.50';
    await users.recordAddressFailure(address, 300);
    const taken = await Promise.all(
      Array.from({ length: 20 }, () => users.takeAuthAttempt({ address }, 300, { below: 10 })),
    );
    const admitted = taken.filter((attempt) => attempt !== undefined);
    // One failure before: nine more fit under the limit of ten; the other eleven are refused uncounted.
    expect(admitted).toHaveLength(9);
    expect(admitted.map((attempt) => attempt?.failures).sort((a, b) => (a ?? 0) - (b ?? 0))).toEqual([
      2, 3, 4, 5, 6, 7, 8, 9, 10,
    ]);
    expect(await users.addressFailures(address)).toBe(10);
    // Given back (a success): one fits again.
    await users.giveBackAuthAttempt(admitted[0] as NonNullable<(typeof admitted)[number]>);
    expect(await users.addressFailures(address)).toBe(9);
    expect(await users.takeAuthAttempt({ address }, 300, { below: 10 })).toMatchObject({ failures: 10 });
    expect(await users.takeAuthAttempt({ address }, 300, { below: 10 })).toBeUndefined();
  });

  it('counts an attempt once per frame: a redelivered frame finds its own attempt counted, and its give-back is made once', async () => {
    let clock = Date.UTC(2033, 0, 1);
    const timed = createUserStore(doc, table, { now: () => clock });
    const address = '203.0.113.61';
    const admit = { below: 3 };
    const first = await timed.takeAuthAttempt({ address }, 60, admit, 'frame-a');
    expect(first).toMatchObject({ failures: 1, frame: 'frame-a' });
    // The same frame again (SQS redelivered it): counted already, returned as it stands.
    expect(await timed.takeAuthAttempt({ address }, 60, admit, 'frame-a')).toEqual(first);
    expect(await timed.addressFailures(address)).toBe(1);
    // Other frames count; at the limit a new frame is refused, but the frames counted before it
    // still find their attempt (the answer they owe was decided on it).
    await timed.takeAuthAttempt({ address }, 60, admit, 'frame-b');
    await timed.takeAuthAttempt({ address }, 60, admit, 'frame-c');
    expect(await timed.takeAuthAttempt({ address }, 60, admit, 'frame-d')).toBeUndefined();
    expect(await timed.takeAuthAttempt({ address }, 60, admit, 'frame-b')).toMatchObject({ failures: 3 });
    expect(await timed.addressFailures(address)).toBe(3);
    // A success gives its attempt back once, however often it runs; its frame, run again after
    // that, is a new attempt.
    const success = (await timed.takeAuthAttempt({ address }, 60, admit, 'frame-c')) as AuthAttempt;
    await timed.giveBackAuthAttempt(success);
    await timed.giveBackAuthAttempt(success);
    expect(await timed.addressFailures(address)).toBe(2);
    expect(await timed.takeAuthAttempt({ address }, 60, admit, 'frame-c')).toMatchObject({ failures: 3 });
    // A failure counted on the account at the answer, likewise once per frame.
    const account = 'frames@localhost';
    expect(await timed.recordAuthFailure(account, 60, 'frame-e')).toBe(1);
    expect(await timed.recordAuthFailure(account, 60, 'frame-e')).toBe(1);
    expect(await timed.recordAuthFailure(account, 60, 'frame-f')).toBe(2);
    // A new window starts the set anew: the frame of an expired window counts in the new one.
    clock += 61_000;
    expect(await timed.takeAuthAttempt({ address }, 60, admit, 'frame-a')).toMatchObject({ failures: 1 });
    expect(await timed.takeAuthAttempt({ address }, 60, admit, 'frame-b')).toMatchObject({ failures: 2 });
  });

  it("lets one attempt on an account past its limit through per slowdown, and a new window's first always", async () => {
    let clock = Date.UTC(2032, 0, 1);
    const timed = createUserStore(doc, table, { now: () => clock });
    const account = 'slowed@localhost';
    for (let i = 0; i < 3; i++) await timed.recordAuthFailure(account, 60);
    const slowdown = 10_000;
    const admit = () => ({ below: 3, orLastAtMost: clock - slowdown });
    // At the limit, within the slowdown of the last attempt: refused, and nothing counted.
    expect(await timed.takeAuthAttempt({ account }, 60, admit())).toBeUndefined();
    expect(await timed.authFailures(account)).toBe(3);
    clock += slowdown;
    // Once the slowdown has passed, five attempts at once: one goes through.
    const taken = await Promise.all(
      Array.from({ length: 5 }, () => timed.takeAuthAttempt({ account }, 60, admit())),
    );
    expect(taken.filter((attempt) => attempt !== undefined)).toHaveLength(1);
    expect(await timed.authFailures(account)).toBe(4);
    // Past the window: a new one starts with this attempt, admitted.
    clock += 60_000;
    expect(await timed.takeAuthAttempt({ account }, 60, admit())).toMatchObject({ failures: 1 });
    // An attempt from the old window given back changes nothing in the new one.
    await timed.giveBackAuthAttempt(
      taken.find((attempt) => attempt !== undefined) as NonNullable<(typeof taken)[number]>,
    );
    expect(await timed.authFailures(account)).toBe(1);
  });

  it('clears', async () => {
    await users.recordAuthFailure('clear@localhost', 300);
    await users.clearAuthFailures('clear@localhost');
    expect(await users.authFailures('clear@localhost')).toBe(0);
  });
});

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

function cli(
  args: string[],
  options: { stdin?: string; env?: Record<string, string> } = {},
): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = execFile(
      'npx',
      ['tsx', 'infra/user-cli.ts', ...args],
      {
        env: {
          ...process.env,
          DYNAMODB_ENDPOINT: endpoint,
          USERS_TABLE: table,
          ...ownedTables,
          XMPP_DOMAIN: 'localhost',
          SCRAM_ITERATIONS: '4096',
          ...options.env,
        },
      },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === 'number' ? error.code : -1) : 0;
        resolve({ code, stdout, stderr });
      },
    );
    child.stdin?.end(options.stdin ?? '');
  });
}

describe('npm run user', () => {
  const jid = 'alice@localhost';
  const password = 'Secret, with = and ünïcödé';

  it('adds an account storing both SCRAM key sets and no password', async () => {
    const added = await cli(['add', 'Alice@LocalHost', password]);
    expect(added).toMatchObject({ code: 0, stdout: `added ${jid}\n` });

    const { Item } = await doc.send(
      new GetCommand({ TableName: table, Key: { pk: jid, sk: 'credentials' } }),
    );
    expect(Item).toBeDefined();
    const stored = JSON.stringify(Item);
    expect(stored).not.toContain('Secret');
    expect(stored.toLowerCase()).not.toContain('password');
    expect(Object.keys(Item ?? {}).sort()).toEqual(['createdAt', 'pk', 'scram', 'sk', 'updatedAt']);
    for (const [hash, bytes] of [
      ['sha1', 20],
      ['sha256', 32],
    ] as const) {
      const keys = Item?.scram[hash];
      expect(keys.iterations).toBe(4096);
      expect(Buffer.from(keys.salt, 'base64')).toHaveLength(16);
      expect(Buffer.from(keys.storedKey, 'base64')).toHaveLength(bytes);
      expect(Buffer.from(keys.serverKey, 'base64')).toHaveLength(bytes);
    }
    expect(Item?.scram.sha1.salt).not.toBe(Item?.scram.sha256.salt);
  }, 30_000);

  it('the stored keys accept a SCRAM-SHA-1, SCRAM-SHA-256 and PLAIN login with that password only', async () => {
    expect(await scramLogin(jid, 'sha1', password)).toBe(true);
    expect(await scramLogin(jid, 'sha256', password)).toBe(true);
    expect(await scramLogin(jid, 'sha256', 'wrong')).toBe(false);
    const user = await users.get(jid);
    expect(await verifyPlain(password, 'sha256', user?.scram.sha256 ?? ({} as never))).toBe(true);
    expect(await verifyPlain('wrong', 'sha256', user?.scram.sha256 ?? ({} as never))).toBe(false);
  });

  it('refuses to add an existing account (exit 2)', async () => {
    const again = await cli(['add', jid, 'other']);
    expect(again.code).toBe(2);
    expect(again.stderr).toContain(`${jid} already exists`);
    expect(await scramLogin(jid, 'sha256', password)).toBe(true);
  }, 30_000);

  it('changes a password read from standard input', async () => {
    const changed = await cli(['passwd', jid, '-'], { stdin: 'n3w pa55\n' });
    expect(changed).toMatchObject({ code: 0, stdout: `changed the password of ${jid}\n` });
    expect(await scramLogin(jid, 'sha1', password)).toBe(false);
    expect(await scramLogin(jid, 'sha1', 'n3w pa55')).toBe(true);
    expect(await scramLogin(jid, 'sha256', 'n3w pa55')).toBe(true);
  }, 30_000);

  it('lists accounts', async () => {
    const listed = await cli(['list']);
    expect(listed.code).toBe(0);
    expect(listed.stdout.split('\n')).toContain(jid);
  }, 30_000);

  it('deletes, then reports an unknown account (exit 2)', async () => {
    expect(await cli(['delete', jid])).toMatchObject({
      code: 0,
      stdout: `deleted ${jid}\n  0 roster contact(s), 0 offline message(s), 0 archived collection(s), 0 session(s) released\n`,
    });
    expect(await users.exists(jid)).toBe(false);
    const again = await cli(['delete', jid]);
    expect(again.code).toBe(2);
    expect(again.stderr).toContain(`${jid} does not exist`);
    const passwd = await cli(['passwd', jid, 'x']);
    expect(passwd.code).toBe(2);
    expect(passwd.stderr).toContain('does not exist');
  }, 30_000);

  it('refuses bad input with a usage message and exit status 1', async () => {
    const spawned = await cli(['add', 'bob@localhost/phone', 'pw']);
    expect(spawned.code).toBe(1);
    expect(spawned.stderr).toContain('Usage: npm run user');

    // The rest of the grid runs the same entry point in-process (a process each is slow).
    const env = { DYNAMODB_ENDPOINT: endpoint, USERS_TABLE: table, XMPP_DOMAIN: 'localhost' };
    const cases: string[][] = [
      [],
      ['frobnicate'],
      ['list', 'extra'],
      ['add', 'bob@localhost'],
      ['delete'],
      ['add', 'bob', 'pw'],
      ['add', '@localhost', 'pw'],
      ['add', 'bob@', 'pw'],
      ['add', 'bob@local..host', 'pw'],
      ['add', 'b o b@localhost', 'pw'],
      ['add', 'bob<script>@localhost', 'pw'],
      ['add', "o'brien@localhost", 'pw'],
      ['add', `${'x'.repeat(1024)}@localhost`, 'pw'],
      ['add', 'bob@example.org', 'pw'],
      ['add', 'bob@localhost', 'bell\u0007'],
      ['add', 'bob@localhost', '\u00ad'],
      ['passwd', 'bob@localhost', ''],
    ];
    for (const args of cases) {
      const errors: string[] = [];
      const code = await runUserCli(args, env, { out: () => {}, err: (line) => errors.push(line) });
      expect({ args, code }).toEqual({ args, code: 1 });
      expect(errors.join('\n')).toContain('Usage: npm run user');
    }
    expect(await users.exists('bob@localhost')).toBe(false);
    const weak = await runUserCli(
      ['add', 'bob@localhost', 'pw'],
      { ...env, SCRAM_ITERATIONS: '1000' },
      {
        out: () => {},
        err: () => {},
      },
    );
    expect(weak).toBe(1);
    expect(await users.exists('bob@localhost')).toBe(false);
  }, 30_000);

  it('normalises the JID: case and a trailing dot on the domain', async () => {
    const output = { lines: [] as string[] };
    const io = {
      out: (line: string) => output.lines.push(line),
      err: (line: string) => output.lines.push(line),
    };
    const env = { DYNAMODB_ENDPOINT: endpoint, USERS_TABLE: table, XMPP_DOMAIN: 'LocalHost' };
    expect(await runUserCli(['add', 'ÉLODIE@localhost.', 'pw'], env, io)).toBe(0);
    expect(output.lines).toEqual(['added élodie@localhost']);
    expect(await users.exists('élodie@localhost')).toBe(true);
  });
});
