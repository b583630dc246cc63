/**
 * `npm run user -- --stack Nimbus …` against a deployed stack, as far as this machine can go
 * without AWS: CloudFormation's DescribeStacks answer is stubbed at the CLI's boundary (the
 * outputs infra/stack.ts writes), and the tables it names are real ones on DynamoDB Local.
 * Covers the parsing of the outputs, the served domain taken from them, the online sessions
 * and a user's offline count.
 */
import type {
  DescribeStacksCommand,
  DescribeStacksCommandOutput,
  Output,
} from '@aws-sdk/client-cloudformation';
import { beforeAll, describe, expect, it } from 'vitest';
import { environmentFromStackOutputs, runUserCli } from '../../infra/user-cli.ts';
import type { Config } from '../../shared/config.ts';
import { createDocumentClient } from '../../shared/store/dynamo.ts';
import { createOfflineStore } from '../../shared/store/offline.ts';
import { createSessionStore } from '../../shared/store/sessions.ts';
import { createUserStore } from '../../shared/store/users.ts';
import { allTables } from '../../shared/tables.ts';
import { createTestTables, TEST_REGION, useDynamoDbLocal } from '../support/dynamodb.ts';

const DOMAIN = 'chat.example.org';
const STACK = 'Nimbus';

let tables: Config['tables'];
let endpoint: string;
const doc = () => createDocumentClient({ endpoint, region: TEST_REGION });

/** The outputs of a deployed stack, as CloudFormation lists them. */
function outputsFor(names: Config['tables']): Output[] {
  const byId: Record<string, string> = {
    Users: names.users,
    Sessions: names.sessions,
    Offline: names.offline,
    Roster: names.roster,
    Archive: names.archive,
  };
  return [
    { OutputKey: 'WebSocketUrl', OutputValue: 'wss://xmpp.example.org' },
    { OutputKey: 'XmppDomain', OutputValue: DOMAIN, Description: 'XMPP_DOMAIN' },
    ...allTables.map((def) => ({
      OutputKey: `${def.id}TableName`,
      OutputValue: byId[def.id],
      Description: def.envVar,
    })),
    { OutputKey: 'FrameQueueName', OutputValue: 'Nimbus-FrameQueueFrames.fifo' },
  ];
}

interface Call {
  region: string;
  stackName?: string;
}

function stubCloudFormation(answer: (stackName?: string) => Output[] | Error) {
  const calls: Call[] = [];
  return {
    calls,
    cloudFormation: (region: string) => ({
      async send(command: DescribeStacksCommand): Promise<DescribeStacksCommandOutput> {
        calls.push({ region, stackName: command.input.StackName });
        const outputs = answer(command.input.StackName);
        if (outputs instanceof Error) throw outputs;
        return {
          $metadata: {},
          Stacks: [
            {
              StackName: command.input.StackName,
              CreationTime: new Date(),
              StackStatus: 'UPDATE_COMPLETE',
              Outputs: outputs,
            },
          ],
        };
      },
    }),
  };
}

async function cli(args: string[], stub = stubCloudFormation(() => outputsFor(tables))) {
  const out: string[] = [];
  const err: string[] = [];
  const code = await runUserCli(
    args,
    { DYNAMODB_ENDPOINT: endpoint, SCRAM_ITERATIONS: '4096' },
    { out: (line) => out.push(line), err: (line) => err.push(line) },
    { cloudFormation: stub.cloudFormation },
  );
  return { code, out, err, calls: stub.calls };
}

beforeAll(async () => {
  endpoint = useDynamoDbLocal();
  tables = await createTestTables();
});

describe('stack outputs', () => {
  it('become the table names and the served domain', () => {
    expect(environmentFromStackOutputs(STACK, outputsFor(tables))).toEqual({
      XMPP_DOMAIN: DOMAIN,
      USERS_TABLE: tables.users,
      SESSIONS_TABLE: tables.sessions,
      OFFLINE_TABLE: tables.offline,
      ROSTER_TABLE: tables.roster,
      ARCHIVE_TABLE: tables.archive,
    });
  });

  it("carry the deployment's SCRAM_ITERATIONS, with which --stack stores keys", async () => {
    // No function stores keys, so the setting given to the stack reaches the keys only this way.
    const outputs = [...outputsFor(tables), { OutputKey: 'ScramIterations', OutputValue: '5000' }];
    expect(environmentFromStackOutputs(STACK, outputs)).toMatchObject({ SCRAM_ITERATIONS: '5000' });
    const add = async (jid: string, env: Record<string, string>) =>
      runUserCli(
        ['--stack', STACK, 'add', jid, 'pw'],
        { DYNAMODB_ENDPOINT: endpoint, ...env },
        { out: () => {}, err: () => {} },
        { cloudFormation: stubCloudFormation(() => outputs).cloudFormation },
      );
    const iterationsOf = async (jid: string) => {
      const client = doc();
      const stored = await createUserStore(client, tables.users).get(jid);
      client.destroy();
      return stored?.scram.sha256.iterations;
    };
    expect(await add('iterations@chat.example.org', {})).toBe(0);
    expect(await iterationsOf('iterations@chat.example.org')).toBe(5000);
    // One the operator gives here wins over the deployment's.
    expect(await add('iterations2@chat.example.org', { SCRAM_ITERATIONS: '6000' })).toBe(0);
    expect(await iterationsOf('iterations2@chat.example.org')).toBe(6000);
  });

  it('without the domain or a needed table are refused, naming what is missing', () => {
    const outputs = outputsFor(tables).filter(
      (o) => o.OutputKey !== 'XmppDomain' && o.OutputKey !== 'SessionsTableName',
    );
    expect(() => environmentFromStackOutputs(STACK, outputs)).toThrow(
      /stack Nimbus has no output XmppDomain, SessionsTableName/,
    );
  });

  it('are read from the named stack in the given region', async () => {
    const listed = await cli(['--stack', STACK, '--region', 'eu-west-1', 'list']);
    expect(listed.code).toBe(0);
    expect(listed.calls).toEqual([{ region: 'eu-west-1', stackName: STACK }]);
  });

  it('fail with exit status 2 for an unknown stack, and 1 for --stack without a name', async () => {
    const missing = Object.assign(new Error('Stack with id Nimbus-typo does not exist'), {
      name: 'ValidationError',
    });
    const unknown = await cli(
      ['--stack', 'Nimbus-typo', 'list'],
      stubCloudFormation(() => missing),
    );
    expect(unknown.code).toBe(2);
    expect(unknown.err.join('\n')).toMatch(/no stack Nimbus-typo in us-east-1/);
    const bare = await cli(['list', '--stack']);
    expect(bare.code).toBe(1);
    expect(bare.err[0]).toBe('--stack needs a value');
  });
});

describe('commands against the stack', () => {
  it('adds accounts only in the domain the stack serves', async () => {
    expect((await cli(['--stack', STACK, 'add', 'alice@chat.example.org', 'pw'])).code).toBe(0);
    const wrongDomain = await cli(['--stack', STACK, 'add', 'alice@localhost', 'pw']);
    expect(wrongDomain.code).toBe(1);
    expect(wrongDomain.err[0]).toMatch(/not in the served domain 'chat.example.org'/);
    // A localpart Nimbus's keys hold (RFC 7622 allows 1023 bytes; Nimbus 256).
    expect((await cli(['--stack', STACK, 'add', `${'l'.repeat(256)}@chat.example.org`, 'pw'])).code).toBe(0);
    const long = await cli(['--stack', STACK, 'add', `${'l'.repeat(257)}@chat.example.org`, 'pw']);
    expect(long.code).toBe(1);
    expect(long.err[0]).toMatch(/limits a new account's localpart to 256 bytes/);
    // Other commands still take an existing account with a longer one (made before the bound).
    expect(
      (await cli(['--stack', STACK, 'delete', `${'l'.repeat(257)}@chat.example.org`])).err.join('\n'),
    ).not.toMatch(/limits/);
  });

  it('lists the online sessions', async () => {
    const client = doc();
    const sessions = createSessionStore(client, tables.sessions, 3600);
    await sessions.createConnection('conn-1', 0);
    await sessions.bindResource({
      user: 'alice@chat.example.org',
      resource: 'phone',
      connectionId: 'conn-1',
      available: true,
      priority: 5,
      boundAt: Date.UTC(2026, 10, 22, 12),
      smId: 'sm-1',
    });
    await sessions.bindResource({
      user: 'bob@chat.example.org',
      resource: 'laptop',
      connectionId: 'conn-2',
      available: false,
      priority: 0,
      boundAt: Date.UTC(2026, 10, 22, 13),
    });
    client.destroy();
    const listed = await cli(['--stack', STACK, 'sessions']);
    expect(listed.code).toBe(0);
    expect(listed.out).toEqual([
      'alice@chat.example.org/phone  available, priority 5  stream management  bound 2026-11-22T12:00:00.000Z  connection conn-1',
      'bob@chat.example.org/laptop  not available  no stream management  bound 2026-11-22T13:00:00.000Z  connection conn-2',
      '2 online session(s)',
    ]);
  });

  it("prints a user's offline count", async () => {
    const client = doc();
    const offline = createOfflineStore(client, tables.offline, { quota: 10, ttlSeconds: 3600 });
    for (const body of ['one', 'two']) {
      await offline.store('carol@chat.example.org', {
        from: 'alice@chat.example.org/phone',
        storedAt: Date.now(),
        stanza: `<message type='chat'><body>${body}</body></message>`,
      });
    }
    client.destroy();
    expect((await cli(['--stack', STACK, 'offline', 'Carol@chat.example.org'])).out).toEqual([
      'carol@chat.example.org: 2 offline message(s)',
    ]);
    expect((await cli(['--stack', STACK, 'offline', 'dave@chat.example.org'])).out).toEqual([
      'dave@chat.example.org: 0 offline message(s)',
    ]);
  });
});
