/**
 * Runtime configuration, read from the environment once per cold start. Every limit a
 * deployment may want to change is here, with its default; the README's configuration table
 * lists the same names.
 */
import { localTableName, TABLE_NAMES, type TableDefinition } from './tables.ts';

export interface Config {
  /** The XMPP domain served (the `to` of `<open/>`, the domain part of every local JID). */
  domain: string;
  tables: { users: string; sessions: string; offline: string; roster: string; archive: string };
  /** DynamoDB endpoint override (DynamoDB Local); unset on AWS. */
  dynamodbEndpoint?: string;
  region: string;
  /** API Gateway Management API endpoint (`https://{api}.execute-api.{region}.amazonaws.com/{stage}`). */
  connectionsEndpoint?: string;
  /** The frame queue's URL (`FRAME_QUEUE_URL`): frames handed back are retried soon (shared/frame-queue.ts). */
  frameQueueUrl?: string;
  /** Where to send SQS requests (`FRAME_QUEUE_ENDPOINT`); default the origin of the queue URL. */
  frameQueueEndpoint?: string;
  /** A frame handed back comes again after 1, 2, 4 … seconds by receive count, at most this. */
  frameRetryMaxSeconds: number;
  /** Largest stanza accepted, in bytes of UTF-8; above it the stream ends with policy-violation. */
  maxStanzaBytes: number;
  /** Offline messages kept per user; above it the sender gets service-unavailable (XEP-0160 §2). */
  offlineQuota: number;
  /**
   * Stored messages sent per window of a transfer paced by XEP-0198 acks (a XEP-0160 flood, a
   * XEP-0013 fetch or view): the next window goes once half of one is acknowledged. A window is
   * queued in one append (billed once on the queue item, which holds up to one and a half
   * windows), and each window costs an ack round: 20 was the cheapest per flooded message
   * (`bench/offline.ts --flood 200`, session 27: 2.29 write units against 2.57 with 10, 2.52 with
   * 30).
   */
  offlineWindow: number;
  /**
   * RFC 6121 §2: contacts kept per user (roster items and pending inbound requests); a roster
   * set or subscription past it is refused with `not-allowed`.
   */
  rosterMaxItems: number;
  /**
   * RFC 6120 §7.6.2.1: resources one account may have bound at once (0: no limit); a bind past it
   * is refused with `resource-constraint`.
   */
  maxResourcesPerAccount: number;
  /** Seconds an offline message is kept. */
  offlineTtlSeconds: number;
  /** Failed SASL attempts allowed per connection: the one reaching it is answered, then the stream ends (policy-violation). */
  authFailuresPerConnection: number;
  /**
   * Seconds from the WebSocket's connection within which its stream must authenticate; a frame of
   * an unauthenticated stream arriving later ends it with `connection-timeout` (0: no limit).
   */
  authTimeoutSeconds: number;
  /**
   * Failed SASL attempts per account within `authFailureWindowSeconds`; past it, attempts on the
   * account from addresses it never logged in from are slowed to one per `authAccountSlowdownSeconds`.
   */
  authFailuresPerAccount: number;
  /** Failed SASL attempts per source address within the window; past it, that address is refused unchecked. */
  authFailuresPerAddress: number;
  authFailureWindowSeconds: number;
  authAccountSlowdownSeconds: number;
  /** PBKDF2 iterations for newly stored SCRAM keys. */
  scramIterations: number;
  /** XEP-0198: longest resumption window offered, in seconds (a smaller client `max` wins). */
  smMaxSeconds: number;
  /** XEP-0198: unacknowledged stanzas kept per session; beyond it senders are told to wait (resource-constraint). */
  smQueueMax: number;
  /** XEP-0198: the server asks for an ack (`<r/>`) after this many stanzas. */
  smAckEvery: number;
  /** XEP-0198: ...and after this many bytes queued. */
  smAckBytes: number;
  /** XEP-0198: unacknowledged bytes a session may hold; past it, senders are told to wait. */
  smQueueMaxBytes: number;
  /** XEP-0198: a session whose queue is full and that acknowledged nothing for this long ends. */
  smAckTimeoutSeconds: number;
  /**
   * XEP-0198: a queued stanza whose post landed this long after its append is marked uncertain
   * when later stanzas were queued meanwhile: they may have reached the client before it. 0 (the
   * default): every post is checked (a GetItem), so two posts crossing at a socket's death cannot
   * lose the earlier one.
   */
  smLatePostMs: number;
  /**
   * XEP-0198: how stanzas queued for one stream go out. `checked`: each sender posts its own, and
   * every answered post reads the queue again (SM_LATE_POST_MS) to mark what later stanzas may have
   * overtaken. `serial`: the sender that finds nobody posting holds the session and posts what is
   * queued in order, until the queue is out; the others only queue. Posts never cross, so a
   * client's count is always a prefix, and a resume sends again exactly what it lacks.
   */
  smPostOrder: 'checked' | 'serial';
  /**
   * SM_POST_ORDER=serial: a hold older than this (ms) belongs to a poster that died (a function
   * stopped mid-burst): the next sender closes the socket, and the client's resume takes over.
   */
  smPosterLeaseMs: number;
  /**
   * XEP-0198: how long (since it arrived) a `<resume/>` waits for the old stream to finish routing
   * a stanza it counted, before it goes ahead anyway (the client's later stanzas could overtake it).
   */
  smResumeSettleMs: number;
  /**
   * XEP-0198: after a resume went ahead unsettled (SM_RESUME_SETTLE_MS), how long the resumed
   * stream's own stanzas wait (handed back to the queue) for the old stream to route the stanza it
   * counted, so that they do not overtake it; past it they go (ms since the resume).
   */
  smResumeOrderMs: number;
  /**
   * Which stanza frames are marked done in their connection row (a redelivery of a marked frame is
   * skipped): `all` (exactly once under lost deletes and deaths too, one write unit per stanza), or
   * `batched` (only a frame another record follows in its batch: a timed-out or failed batch
   * repeats nothing, a lost delete or a death after the batch's last record can repeat that one).
   */
  frameDoneMarks: 'all' | 'batched';
  /** Per-connection rate limits (core/rate-limit.ts): steady rates and bursts of frames and bytes. */
  rateFramesPerSecond: number;
  rateFrameBurst: number;
  rateBytesPerSecond: number;
  rateByteBurst: number;
  /** Seconds an unbound or idle connection row lives without activity (a safety net for lost $disconnect). */
  connectionTtlSeconds: number;
  /** XEP-0136: an idle gap longer than this (seconds) starts a new collection. */
  archiveCollectionGapSeconds: number;
  /** XEP-0136 replication: days a removed collection's tombstone is remembered for `<modified/>`. */
  archiveTombstoneDays: number;
  /** XEP-0136 replication: granularity (seconds) of a collection's recorded change time. */
  archiveChangeWindowSeconds: number;
  /** XEP-0136 §3.2: the service's Save Mode for users who never set a default (false, body, all). */
  archiveDefaultSave: 'false' | 'body' | 'all';
  /** XEP-0136 §3.2: the service's OTR Mode for users who never set a default. */
  archiveDefaultOtr: 'allow' | 'deny' | 'require' | 'try';
  /** XEP-0136 §3.2: seconds the service keeps archived messages when the user's mode says nothing; 0: forever. */
  archiveDefaultExpireSeconds: number;
  /**
   * Longest the service keeps an archived message, whatever the user's modes say (0: no limit). A
   * mode without `expire`, or with a longer one, is kept this long, and shown so in `<pref/>`.
   */
  archiveMaxExpireSeconds: number;
  /** XEP-0136 §3.3: whether save='all' (whole stanzas) is accepted; otherwise feature-not-implemented. */
  archiveAllowSaveAll: boolean;
  /**
   * XEP-0136 §7.1: "unless administrator policies require that every message is logged
   * automatically": every stream starts with auto-archiving on and may not switch it off.
   */
  archiveAutoRequired: boolean;
  /** XEP-0136 §5.3: entries one collection may hold; a store beyond it is not-acceptable. */
  archiveMaxCollectionEntries: number;
}

type Env = Record<string, string | undefined>;

/** Settings a deployment may tune (`npx cdk deploy -c settings='{"OFFLINE_QUOTA":"5000"}'`). */
export const TUNABLE_SETTINGS = [
  'MAX_STANZA_BYTES',
  'OFFLINE_QUOTA',
  'OFFLINE_TTL_DAYS',
  'OFFLINE_WINDOW',
  'ROSTER_MAX_ITEMS',
  'MAX_RESOURCES_PER_ACCOUNT',
  'AUTH_FAILURES_PER_CONNECTION',
  'AUTH_TIMEOUT_SECONDS',
  'AUTH_FAILURES_PER_ACCOUNT',
  'AUTH_FAILURES_PER_ADDRESS',
  'AUTH_FAILURE_WINDOW_SECONDS',
  'AUTH_ACCOUNT_SLOWDOWN_SECONDS',
  'SCRAM_ITERATIONS',
  'CONNECTION_TTL_SECONDS',
  'SM_MAX_SECONDS',
  'SM_QUEUE_MAX',
  'SM_ACK_EVERY',
  'SM_ACK_BYTES',
  'SM_QUEUE_MAX_BYTES',
  'SM_ACK_TIMEOUT_SECONDS',
  'SM_LATE_POST_MS',
  'SM_POST_ORDER',
  'SM_POSTER_LEASE_MS',
  'SM_RESUME_SETTLE_MS',
  'SM_RESUME_ORDER_MS',
  'FRAME_DONE_MARKS',
  'FRAME_RETRY_MAX_SECONDS',
  'ARCHIVE_COLLECTION_GAP_SECONDS',
  'ARCHIVE_TOMBSTONE_DAYS',
  'ARCHIVE_CHANGE_WINDOW_SECONDS',
  'RATE_STANZAS_PER_SECOND',
  'RATE_STANZA_BURST',
  'RATE_BYTES_PER_SECOND',
  'RATE_BYTES_BURST',
  'ARCHIVE_DEFAULT_SAVE',
  'ARCHIVE_DEFAULT_OTR',
  'ARCHIVE_DEFAULT_EXPIRE_SECONDS',
  'ARCHIVE_MAX_EXPIRE_SECONDS',
  'ARCHIVE_ALLOW_SAVE_ALL',
  'ARCHIVE_AUTO_REQUIRED',
  'ARCHIVE_MAX_COLLECTION_ENTRIES',
  'LOG_LEVEL',
] as const;

/** An integer of at least 1 (XEP-0198 seed §4: `max` is an xs:positiveInteger). */
function positive(env: Env, name: string, fallback: number): number {
  const value = int(env, name, fallback);
  if (value < 1) throw new Error(`${name} must be at least 1, got '${env[name]}'`);
  return value;
}

function int(env: Env, name: string, fallback: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0)
    throw new Error(`${name} must be a non-negative integer, got '${raw}'`);
  return value;
}

function oneOf<T extends string>(env: Env, name: string, values: readonly T[], fallback: T): T {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  if (!(values as readonly string[]).includes(raw))
    throw new Error(`${name} must be one of ${values.join(', ')}, got '${raw}'`);
  return raw as T;
}

function bool(env: Env, name: string, fallback: boolean): boolean {
  return oneOf(env, name, ['true', 'false'] as const, fallback ? 'true' : 'false') === 'true';
}

function tableName(env: Env, def: Pick<TableDefinition, 'id' | 'envVar'>): string {
  return env[def.envVar] || localTableName(def, env.TABLE_PREFIX || 'nimbus');
}

/**
 * XEP-0136's service default modes. With ARCHIVE_AUTO_REQUIRED ("administrator policies require
 * that at least the <body/> … of every message is logged automatically", 0.9 §3.3) the default
 * Save Mode is `body` unless set, and a default that would log nothing is refused at start.
 */
function archivePolicy(
  env: Env,
): Pick<Config, 'archiveAutoRequired' | 'archiveDefaultSave' | 'archiveDefaultOtr'> {
  const required = bool(env, 'ARCHIVE_AUTO_REQUIRED', false);
  const save = oneOf(
    env,
    'ARCHIVE_DEFAULT_SAVE',
    ['false', 'body', 'all'] as const,
    required ? 'body' : 'false',
  );
  const otr = oneOf(env, 'ARCHIVE_DEFAULT_OTR', ['allow', 'deny', 'require', 'try'] as const, 'allow');
  if (required && (save === 'false' || otr === 'require'))
    throw new Error(
      `ARCHIVE_AUTO_REQUIRED=true logs every message: ARCHIVE_DEFAULT_SAVE must be body or all and ARCHIVE_DEFAULT_OTR not require, got '${save}' and '${otr}'`,
    );
  return { archiveAutoRequired: required, archiveDefaultSave: save, archiveDefaultOtr: otr };
}

export function loadConfig(env: Env = process.env): Config {
  return {
    domain: (env.XMPP_DOMAIN || 'localhost').toLowerCase(),
    tables: {
      users: tableName(env, TABLE_NAMES.users),
      sessions: tableName(env, TABLE_NAMES.sessions),
      offline: tableName(env, TABLE_NAMES.offline),
      roster: tableName(env, TABLE_NAMES.roster),
      archive: tableName(env, TABLE_NAMES.archive),
    },
    dynamodbEndpoint: env.DYNAMODB_ENDPOINT || undefined,
    region: env.AWS_REGION || env.AWS_DEFAULT_REGION || 'us-east-1',
    connectionsEndpoint: env.CONNECTIONS_ENDPOINT || undefined,
    frameQueueUrl: env.FRAME_QUEUE_URL || undefined,
    frameQueueEndpoint: env.FRAME_QUEUE_ENDPOINT || undefined,
    frameRetryMaxSeconds: int(env, 'FRAME_RETRY_MAX_SECONDS', 30),
    maxStanzaBytes: int(env, 'MAX_STANZA_BYTES', 65536),
    offlineQuota: int(env, 'OFFLINE_QUOTA', 1000),
    offlineWindow: positive(env, 'OFFLINE_WINDOW', 20),
    offlineTtlSeconds: int(env, 'OFFLINE_TTL_DAYS', 30) * 86400,
    rosterMaxItems: int(env, 'ROSTER_MAX_ITEMS', 1000),
    maxResourcesPerAccount: Math.max(0, int(env, 'MAX_RESOURCES_PER_ACCOUNT', 16)),
    authFailuresPerConnection: int(env, 'AUTH_FAILURES_PER_CONNECTION', 3),
    authTimeoutSeconds: Math.max(0, int(env, 'AUTH_TIMEOUT_SECONDS', 300)),
    authFailuresPerAccount: int(env, 'AUTH_FAILURES_PER_ACCOUNT', 10),
    authFailureWindowSeconds: int(env, 'AUTH_FAILURE_WINDOW_SECONDS', 300),
    authFailuresPerAddress: int(env, 'AUTH_FAILURES_PER_ADDRESS', 10),
    authAccountSlowdownSeconds: int(env, 'AUTH_ACCOUNT_SLOWDOWN_SECONDS', 20),
    scramIterations: int(env, 'SCRAM_ITERATIONS', 4096),
    connectionTtlSeconds: int(env, 'CONNECTION_TTL_SECONDS', 3 * 3600),
    rateFramesPerSecond: Math.max(1, int(env, 'RATE_STANZAS_PER_SECOND', 50)),
    rateFrameBurst: Math.max(1, int(env, 'RATE_STANZA_BURST', 1000)),
    rateBytesPerSecond: Math.max(1, int(env, 'RATE_BYTES_PER_SECOND', 262144)),
    rateByteBurst: Math.max(1, int(env, 'RATE_BYTES_BURST', 1048576)),
    smMaxSeconds: positive(env, 'SM_MAX_SECONDS', 300),
    smQueueMax: int(env, 'SM_QUEUE_MAX', 1000),
    smAckEvery: Math.max(1, int(env, 'SM_ACK_EVERY', 10)),
    smAckBytes: Math.max(1024, int(env, 'SM_ACK_BYTES', 32768)),
    // Below DynamoDB's 400 KB item limit with room for one more 128 KB stanza past the bound.
    smQueueMaxBytes: Math.min(240 * 1024, int(env, 'SM_QUEUE_MAX_BYTES', 192 * 1024)),
    smAckTimeoutSeconds: int(env, 'SM_ACK_TIMEOUT_SECONDS', 120),
    smLatePostMs: int(env, 'SM_LATE_POST_MS', 0),
    smPostOrder: oneOf(env, 'SM_POST_ORDER', ['checked', 'serial'] as const, 'serial'),
    // Past the stream function's 30 s timeout: a hold this old has no living poster.
    smPosterLeaseMs: Math.max(1000, int(env, 'SM_POSTER_LEASE_MS', 35_000)),
    smResumeSettleMs: int(env, 'SM_RESUME_SETTLE_MS', 5000),
    // Below xmpp.js's 60 s without an answer to its <r/>, which waits behind those stanzas.
    smResumeOrderMs: int(env, 'SM_RESUME_ORDER_MS', 30_000),
    frameDoneMarks: oneOf(env, 'FRAME_DONE_MARKS', ['all', 'batched'] as const, 'all'),
    archiveCollectionGapSeconds: int(env, 'ARCHIVE_COLLECTION_GAP_SECONDS', 30 * 60),
    archiveTombstoneDays: int(env, 'ARCHIVE_TOMBSTONE_DAYS', 90),
    archiveChangeWindowSeconds: Math.max(1, int(env, 'ARCHIVE_CHANGE_WINDOW_SECONDS', 60)),
    ...archivePolicy(env),
    archiveDefaultExpireSeconds: int(env, 'ARCHIVE_DEFAULT_EXPIRE_SECONDS', 0),
    archiveMaxExpireSeconds: Math.max(0, int(env, 'ARCHIVE_MAX_EXPIRE_SECONDS', 0)),
    archiveAllowSaveAll: bool(env, 'ARCHIVE_ALLOW_SAVE_ALL', true),
    archiveMaxCollectionEntries: Math.max(1, int(env, 'ARCHIVE_MAX_COLLECTION_ENTRIES', 1_000_000)),
  };
}
