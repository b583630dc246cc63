/**
 * Administration: `npm run user -- [--stack <name>] add|passwd|delete|list|sessions|offline`.
 *
 * Stores salted SCRAM-SHA-1 and SCRAM-SHA-256 keys (RFC 5802 §3, RFC 7677), never the
 * password. Talks to the same DynamoDB as `npm start` by default, so it works while the local
 * stack runs; against AWS it reads the table names and the domain from a deployed stack's
 * CloudFormation outputs (`--stack Nimbus`), or takes them from the environment.
 */
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import {
  CloudFormationClient,
  DescribeStacksCommand,
  type DescribeStacksCommandOutput,
  type Output as StackOutput,
} from '@aws-sdk/client-cloudformation';
import { loadConfig } from '../shared/config.ts';
import { deriveCredentialSet, MIN_ITERATIONS } from '../shared/sasl/scram.ts';
import { createArchiveStore } from '../shared/store/archive.ts';
import { createDocumentClient } from '../shared/store/dynamo.ts';
import { createOfflineStore } from '../shared/store/offline.ts';
import { createRosterStore } from '../shared/store/roster.ts';
import { createSessionStore, MAX_LOCALPART_BYTES } from '../shared/store/sessions.ts';
import { createSmQueueStore } from '../shared/store/sm-queue.ts';
import { createUserStore, UnknownUserError, UserExistsError } from '../shared/store/users.ts';
import {
  allTables,
  archiveTable,
  offlineTable,
  rosterTable,
  sessionsTable,
  usersTable,
} from '../shared/tables.ts';
import { deleteAccount } from './account-deletion.ts';

const USAGE = `Usage: npm run user -- [--stack <name>] [--region <region>] <command>

  add <bare-jid> <password>      create an account
  passwd <bare-jid> <password>   change an account's password
  delete <bare-jid>              remove an account and what it owned: its roster (every
                                 subscription cancelled on the contacts' side too), its
                                 offline messages and its message archive; its open
                                 streams end at their next frame (<not-authorized/>)
  list                           print every account's JID
  sessions                       print every online session (bound resource)
  offline <bare-jid>             print how many offline messages wait for an account

A password of "-" is read from standard input (keeps it out of the process list).

Where the accounts are:
  local stack (default)   DynamoDB Local at http://127.0.0.1:$DYNAMODB_PORT (8000), table
                          nimbus-users ($TABLE_PREFIX-users), as used by \`npm start\`
  DYNAMODB_ENDPOINT=url   another DynamoDB Local, e.g. docker run -p 8000:8000 amazon/dynamodb-local
  --stack Nimbus          a deployed stack: the table names and the domain are read from its
                          CloudFormation outputs, in --region (or AWS_REGION), with AWS credentials
  USERS_TABLE=name        the same by hand (SESSIONS_TABLE, OFFLINE_TABLE, ROSTER_TABLE,
                          ARCHIVE_TABLE for sessions, offline, delete)

The JID's domain must be the served domain, XMPP_DOMAIN (default localhost; --stack reads it).
SCRAM_ITERATIONS sets the PBKDF2 iteration count (default and minimum 4096).
\`list\` and \`sessions\` read the whole table (a Scan): administration only.

Exit status: 0 done, 1 usage error, 2 failure.`;

/** What the CLI asks CloudFormation: the deployed stack's outputs (a client, or a stub in tests). */
export interface CloudFormationPort {
  send(command: DescribeStacksCommand): Promise<DescribeStacksCommandOutput>;
}

export interface CliDependencies {
  /** Builds the CloudFormation client for a region; the default is the AWS SDK's. */
  cloudFormation?: (region: string) => CloudFormationPort;
}

class StackError extends Error {}

/** The outputs the CLI needs: the served domain and the tables of the commands. */
const REQUIRED_OUTPUTS = [
  'XmppDomain',
  ...[usersTable, sessionsTable, offlineTable, rosterTable, archiveTable].map((def) => `${def.id}TableName`),
];

/**
 * The environment a deployed stack's outputs stand for (infra/stack.ts writes them):
 * `XmppDomain` → XMPP_DOMAIN, `<Table>TableName` → that table's variable (USERS_TABLE, …),
 * `ScramIterations` → SCRAM_ITERATIONS.
 */
export function environmentFromStackOutputs(
  stackName: string,
  outputs: StackOutput[],
): Record<string, string> {
  const byKey = new Map(outputs.map((output) => [output.OutputKey, output.OutputValue]));
  const missing = REQUIRED_OUTPUTS.filter((key) => !byKey.get(key));
  if (missing.length > 0) {
    throw new StackError(
      `stack ${stackName} has no output ${missing.join(', ')}: is it a Nimbus stack, deployed by this version?`,
    );
  }
  const environment: Record<string, string> = { XMPP_DOMAIN: byKey.get('XmppDomain') as string };
  for (const def of allTables) {
    const name = byKey.get(`${def.id}TableName`);
    if (name) environment[def.envVar] = name;
  }
  // The deployment's SCRAM_ITERATIONS setting (a stack from before this output keeps the local one).
  const iterations = byKey.get('ScramIterations');
  if (iterations) environment.SCRAM_ITERATIONS = iterations;
  return environment;
}

async function stackEnvironment(
  stackName: string,
  region: string,
  dependencies: CliDependencies,
): Promise<Record<string, string>> {
  const client = (dependencies.cloudFormation ?? ((r) => new CloudFormationClient({ region: r })))(region);
  let answer: DescribeStacksCommandOutput;
  try {
    answer = await client.send(new DescribeStacksCommand({ StackName: stackName }));
  } catch (error) {
    if ((error as Error).name === 'ValidationError') {
      throw new StackError(`no stack ${stackName} in ${region} (deploy it, or give --region)`);
    }
    throw new StackError(`cannot read stack ${stackName} in ${region}: ${(error as Error).message}`);
  }
  const [stack] = answer.Stacks ?? [];
  if (!stack) throw new StackError(`no stack ${stackName} in ${region}`);
  return environmentFromStackOutputs(stackName, stack.Outputs ?? []);
}

/** `--stack` and `--region` may stand anywhere; the rest is the command and its arguments. */
function splitOptions(args: string[]): { stack?: string; region?: string; rest: string[] } | UsageError {
  const rest: string[] = [];
  const options: { stack?: string; region?: string } = {};
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] as string;
    if (arg === '--stack' || arg === '--region') {
      const value = args[i + 1];
      if (value === undefined || value.startsWith('--')) return new UsageError(`${arg} needs a value`);
      options[arg === '--stack' ? 'stack' : 'region'] = value;
      i += 1;
    } else rest.push(arg);
  }
  return { ...options, rest };
}

class UsageError extends Error {}

// RFC 7622 §3.3.1: the localpart MUST NOT contain " & ' / : < > @ (and no space, §3.3.1 via
// the PRECIS IdentifierClass, which also excludes other whitespace and controls).
const LOCALPART_FORBIDDEN = /["&'/:<>@\s\p{Cc}]/u;
const DOMAIN_FORBIDDEN = /[@/\s\p{Cc}]/u;
// RFC 7622 §3.1: each part is at most 1023 octets.
const MAX_PART_BYTES = 1023;

/**
 * Validate and normalise an account's bare JID (`localpart@domain`): lower-cased and NFC as
 * shared/jid.ts does for addresses, trailing dot of the domain dropped (RFC 7622 §3.2).
 */
export function parseAccountJid(text: string, servedDomain: string): string {
  if (text.includes('/')) throw new UsageError(`'${text}' has a resource: give a bare JID (user@domain)`);
  const at = text.indexOf('@');
  if (at < 0) throw new UsageError(`'${text}' is not a bare JID: expected user@domain`);
  const local = text.slice(0, at).normalize('NFC').toLowerCase();
  let domain = text
    .slice(at + 1)
    .normalize('NFC')
    .toLowerCase();
  if (domain.endsWith('.')) domain = domain.slice(0, -1);
  if (local === '') throw new UsageError(`'${text}' has an empty localpart`);
  if (LOCALPART_FORBIDDEN.test(local)) {
    throw new UsageError(`'${text}': a localpart may not contain spaces, controls or any of " & ' / : < > @`);
  }
  if (domain === '' || DOMAIN_FORBIDDEN.test(domain) || domain.split('.').includes('')) {
    throw new UsageError(`'${text}' has an invalid domain`);
  }
  if (Buffer.byteLength(local) > MAX_PART_BYTES || Buffer.byteLength(domain) > MAX_PART_BYTES) {
    throw new UsageError(`'${text}': localpart and domain are limited to ${MAX_PART_BYTES} bytes each`);
  }
  if (domain !== servedDomain) {
    throw new UsageError(
      `'${text}' is not in the served domain '${servedDomain}' (set XMPP_DOMAIN to the domain the server runs with)`,
    );
  }
  return `${local}@${domain}`;
}

function readPassword(argument: string): string {
  if (argument !== '-') return argument;
  return readFileSync(0, 'utf8').replace(/\r?\n$/, '');
}

type Env = Record<string, string | undefined>;

interface Output {
  out(line: string): void;
  err(line: string): void;
}

function target(env: Env) {
  const config = loadConfig(env);
  // Neither an endpoint nor a table name given: the local stack, as `npm start` runs it.
  const local = !env.DYNAMODB_ENDPOINT && !env.USERS_TABLE && !env.SESSIONS_TABLE && !env.OFFLINE_TABLE;
  const endpoint =
    config.dynamodbEndpoint ?? (local ? `http://127.0.0.1:${env.DYNAMODB_PORT || 8000}` : undefined);
  return {
    config,
    endpoint,
    where: endpoint ? `${config.tables.users} at ${endpoint}` : `${config.tables.users} in ${config.region}`,
  };
}

function explain(error: unknown, where: string): string {
  const name = (error as { name?: string }).name;
  const code = (error as { code?: string }).code;
  if (error instanceof UserExistsError)
    return `${error.jid} already exists (use passwd to change its password)`;
  if (error instanceof UnknownUserError) return `${error.jid} does not exist`;
  if (name === 'ResourceNotFoundException')
    return `table ${where} does not exist (is the stack deployed or started?)`;
  if (code === 'ECONNREFUSED' || name === 'TimeoutError') {
    return `cannot reach DynamoDB (${where}): start the local stack with \`npm start\`, or set DYNAMODB_ENDPOINT or USERS_TABLE`;
  }
  return `failed on ${where}: ${(error as Error).message}`;
}

function describeSession(resource: {
  user: string;
  resource: string;
  available: boolean;
  priority: number;
  smId?: string;
  boundAt: number;
  connectionId: string;
}): string {
  const state = resource.available ? `available, priority ${resource.priority}` : 'not available';
  return [
    `${resource.user}/${resource.resource}`,
    state,
    resource.smId ? 'stream management' : 'no stream management',
    `bound ${new Date(resource.boundAt).toISOString()}`,
    `connection ${resource.connectionId}`,
  ].join('  ');
}

/** Runs one command; returns the exit status. */
export async function runUserCli(
  args: string[],
  env: Env = process.env,
  output?: Output,
  dependencies: CliDependencies = {},
): Promise<number> {
  const io = output ?? { out: (line) => console.log(line), err: (line) => console.error(line) };
  const options = splitOptions(args);
  if (options instanceof UsageError) {
    io.err(options.message);
    io.err(USAGE);
    return 1;
  }
  if (options.stack) {
    const region = options.region ?? env.AWS_REGION ?? env.AWS_DEFAULT_REGION ?? 'us-east-1';
    try {
      const stack = await stackEnvironment(options.stack, region, dependencies);
      // The deployment's iteration count, unless the operator gives one here (it wins).
      env = {
        ...env,
        AWS_REGION: region,
        ...stack,
        ...(env.SCRAM_ITERATIONS ? { SCRAM_ITERATIONS: env.SCRAM_ITERATIONS } : {}),
      };
    } catch (error) {
      io.err((error as Error).message);
      return 2;
    }
  } else if (options.region) {
    env = { ...env, AWS_REGION: options.region };
  }
  const [command, ...rest] = options.rest;
  const arity: Record<string, number> = { add: 2, passwd: 2, delete: 1, list: 0, sessions: 0, offline: 1 };
  if (command === 'help' || command === '--help' || command === '-h') {
    io.out(USAGE);
    return 0;
  }
  if (command === undefined) {
    io.err(USAGE);
    return 1;
  }
  if (!(command in arity) || rest.length !== arity[command]) {
    io.err(
      command in arity ? `'${command}' takes ${arity[command]} argument(s)` : `unknown command '${command}'`,
    );
    io.err(USAGE);
    return 1;
  }

  let resolved: ReturnType<typeof target>;
  let jid = '';
  try {
    resolved = target(env);
    if (rest[0] !== undefined) jid = parseAccountJid(rest[0], resolved.config.domain);
    // Nimbus's own, lower bound for new accounts: the account's JID is part of DynamoDB keys (see
    // MAX_LOCALPART_BYTES). An older account with a longer one can still be changed or deleted.
    if (command === 'add' && Buffer.byteLength(jid.slice(0, jid.lastIndexOf('@'))) > MAX_LOCALPART_BYTES)
      throw new UsageError(
        `'${rest[0]}': Nimbus limits a new account's localpart to ${MAX_LOCALPART_BYTES} bytes`,
      );
    if (resolved.config.scramIterations < MIN_ITERATIONS) {
      throw new UsageError(`SCRAM_ITERATIONS must be at least ${MIN_ITERATIONS}`);
    }
  } catch (error) {
    io.err((error as Error).message);
    io.err(USAGE);
    return 1;
  }

  const doc = createDocumentClient({ endpoint: resolved.endpoint, region: resolved.config.region });
  const users = createUserStore(doc, resolved.config.tables.users);
  try {
    switch (command) {
      case 'add':
      case 'passwd': {
        let credentials: Awaited<ReturnType<typeof deriveCredentialSet>>;
        try {
          credentials = await deriveCredentialSet(readPassword(rest[1]), resolved.config.scramIterations);
        } catch (error) {
          // deriveCredentialSet refuses only the password itself (SASLprep, empty): bad input.
          io.err((error as Error).message);
          io.err(USAGE);
          return 1;
        }
        if (command === 'add') {
          await users.create(jid, credentials);
          io.out(`added ${jid}`);
        } else {
          await users.replaceCredentials(jid, credentials);
          io.out(`changed the password of ${jid}`);
        }
        return 0;
      }
      case 'delete': {
        const { config } = resolved;
        const deleted = await deleteAccount(
          {
            users,
            roster: createRosterStore(doc, config.tables.roster, { maxItems: config.rosterMaxItems }),
            offline: createOfflineStore(doc, config.tables.offline, {
              quota: config.offlineQuota,
              ttlSeconds: config.offlineTtlSeconds,
            }),
            archive: createArchiveStore(doc, config.tables.archive, {
              changeWindowMs: config.archiveChangeWindowSeconds * 1000,
              tombstoneSeconds: config.archiveTombstoneDays * 86_400,
              maxCollectionEntries: config.archiveMaxCollectionEntries,
            }),
            sessions: createSessionStore(doc, config.tables.sessions, config.connectionTtlSeconds),
            smQueue: createSmQueueStore(doc, config.tables.sessions),
          },
          jid,
          config.domain,
        );
        io.out(`deleted ${jid}`);
        io.out(
          `  ${deleted.contacts} roster contact(s), ${deleted.offlineMessages} offline message(s), ${deleted.archivedCollections} archived collection(s), ${deleted.sessions} session(s) released`,
        );
        return 0;
      }
      case 'sessions': {
        const sessions = createSessionStore(
          doc,
          resolved.config.tables.sessions,
          resolved.config.connectionTtlSeconds,
        );
        const resources = await sessions.listAllResources();
        for (const resource of resources) io.out(describeSession(resource));
        io.out(`${resources.length} online session(s)`);
        return 0;
      }
      case 'offline': {
        const offline = createOfflineStore(doc, resolved.config.tables.offline, {
          quota: resolved.config.offlineQuota,
          ttlSeconds: resolved.config.offlineTtlSeconds,
        });
        io.out(`${jid}: ${await offline.count(jid)} offline message(s)`);
        return 0;
      }
      default:
        for (const account of await users.list()) io.out(account);
        return 0;
    }
  } catch (error) {
    io.err(explain(error, resolved.where));
    return 2;
  } finally {
    doc.destroy();
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  // Deployed Lambdas run Node.js 22; this admin tool is fine on Node 20 without the SDK's nag.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  process.exitCode = await runUserCli(process.argv.slice(2));
}
