/**
 * Sessions table: one item per WebSocket connection (the stream's state between frames, since
 * every frame may run in another Lambda) and one item per bound resource (what routing reads).
 *
 *   pk = conn#<connectionId>  sk = conn            → ConnectionState
 *   pk = user#<bare JID>      sk = res#<resource>  → ResourceRecord
 *
 * Routing to a bare JID is one strongly consistent Query on `user#<bare>`.
 */
import {
  DeleteCommand,
  type DynamoDBDocumentClient,
  GetCommand,
  PutCommand,
  QueryCommand,
  ScanCommand,
  UpdateCommand,
} from '@aws-sdk/lib-dynamodb';
import { TTL_ATTRIBUTE } from '../tables.ts';
import { isConditionFailure } from './dynamo.ts';

/** The sweep index's one partition: sessions detached from their socket, awaiting resumption. */
export const DETACHED_SHARD = 'detached';

export interface SaslProgress {
  mechanism: string;
  /** The mechanism's state between challenge and response (JSON-serialisable). */
  state: Record<string, unknown>;
  /** The bare JID being authenticated (for the per-account failure count). */
  jid?: string;
  /** What the password-guessing limits read at the first step, for the last one. */
  gate?: { authFailures: number; knownAddresses: Record<string, number> };
}

/** XEP-0198 state of a stream, saved with the connection after every frame. */
export interface SmState {
  version: 'sm3' | 'sm1';
  /** Key of the session's queue item; sent to the client as `id` only when resumable. */
  id: string;
  /** sm:3: stanzas handled from the client (unwrapped); sm:1: the last `u` received. */
  inbound: number;
  /** Stanzas the client has acknowledged (unwrapped): the queue's base. */
  acked: number;
  resumable: boolean;
  /** Resumption window in seconds. */
  max: number;
}

/**
 * An offline transfer paced by stream-management acks (a flood, or a XEP-0013 fetch): the
 * next batch goes out when the client has acknowledged enough of the last one.
 */
export interface OfflineTransfer {
  kind: 'flood' | 'fetch';
  /** The last stored message sent. */
  after?: string;
  /** For a fetch: the iq to answer once every message is out. */
  iqId?: string;
  iqFrom?: string;
}

export interface ConnectionState {
  connectionId: string;
  connectedAt: number;
  /** The client's source address at `$connect` (password-guessing limits count per address). */
  sourceIp?: string;
  /** Set once `<open/>` was answered on the current stream (reset by a SASL success). */
  streamOpen: boolean;
  streamId?: string;
  /** Authenticated bare JID: the only identity (DESIGN.md "Identity and trust"). */
  user?: string;
  resource?: string;
  sasl?: SaslProgress;
  authFailures: number;
  /** XEP-0013: the session asked for the count, headers or a fetch, so it is never flooded. */
  flexibleOffline?: boolean;
  sm?: SmState;
  transfer?: OfflineTransfer;
  /** The session has had its offline messages flooded (XEP-0160: at the first non-negative presence). */
  flooded?: boolean;
  /** RFC 6121 §4.6: local JIDs this session sent directed presence to; told when it goes away. */
  directedTo?: string[];
}

export interface ResourceRecord {
  user: string;
  resource: string;
  connectionId: string;
  available: boolean;
  priority: number;
  /** The last broadcast presence stanza, serialised. */
  presence?: string;
  boundAt: number;
  flexibleOffline?: boolean;
  /** Set when the session has stream management: deliveries go through its queue. */
  smId?: string;
}

const connKey = (connectionId: string) => ({ pk: `conn#${connectionId}`, sk: 'conn' });
const resourceKey = (user: string, resource: string) => ({ pk: `user#${user}`, sk: `res#${resource}` });

/**
 * DynamoDB sort keys hold at most 1024 bytes, so a bound resource may have 1020 (RFC 7622
 * allows 1023): bind refuses longer ones, and no such resource is ever online.
 */
export function fitsResourceKey(resource: string): boolean {
  return Buffer.byteLength(`res#${resource}`, 'utf8') <= 1024;
}

type Mutable = Omit<ConnectionState, 'connectionId' | 'connectedAt' | 'sourceIp'>;

export interface SessionStore {
  /** `sourceIp`: the client's address as API Gateway saw it (`identity.sourceIp`). */
  createConnection(connectionId: string, connectedAt: number, sourceIp?: string): Promise<void>;
  getConnection(connectionId: string): Promise<ConnectionState | undefined>;
  /** Sets the given fields; `undefined` values are removed. */
  updateConnection(connectionId: string, changes: Partial<Mutable>): Promise<void>;
  deleteConnection(connectionId: string): Promise<void>;
  listResources(user: string): Promise<ResourceRecord[]>;
  getResource(user: string, resource: string): Promise<ResourceRecord | undefined>;
  /** Binds (or takes over) a resource; returns the record it replaced. */
  bindResource(record: ResourceRecord): Promise<ResourceRecord | undefined>;
  /** Updates availability if the resource still belongs to `connectionId`; returns the old record. */
  updatePresence(
    user: string,
    resource: string,
    connectionId: string,
    changes: Pick<ResourceRecord, 'available' | 'priority' | 'presence'>,
  ): Promise<ResourceRecord | undefined>;
  markFlexibleOffline(user: string, resource: string, connectionId: string): Promise<void>;
  /** Routes the resource's deliveries through the SM queue `smId` (or back to direct posts). */
  setResourceSm(
    user: string,
    resource: string,
    connectionId: string,
    smId: string | undefined,
  ): Promise<void>;
  /** Removes the resource if it still belongs to SM session `smId`; returns it, or undefined. */
  releaseSmResource(user: string, resource: string, smId: string): Promise<ResourceRecord | undefined>;
  /** Removes the resource if it still belongs to `connectionId`; returns it, or undefined. */
  releaseResource(user: string, resource: string, connectionId: string): Promise<ResourceRecord | undefined>;
  /** Every bound resource of every user, by JID. Administration only: a full Scan (see below). */
  listAllResources(): Promise<ResourceRecord[]>;
}

function ttl(seconds: number, now = Date.now()): number {
  return Math.floor(now / 1000) + seconds;
}

function toConnection(item: Record<string, unknown>): ConnectionState {
  return {
    connectionId: item.connectionId as string,
    connectedAt: item.connectedAt as number,
    sourceIp: item.sourceIp as string | undefined,
    streamOpen: Boolean(item.streamOpen),
    streamId: item.streamId as string | undefined,
    user: item.user as string | undefined,
    resource: item.resource as string | undefined,
    sasl: item.sasl as SaslProgress | undefined,
    authFailures: (item.authFailures as number | undefined) ?? 0,
    flexibleOffline: item.flexibleOffline as boolean | undefined,
    sm: item.sm as SmState | undefined,
    transfer: item.transfer as OfflineTransfer | undefined,
    flooded: item.flooded as boolean | undefined,
    directedTo: item.directedTo as string[] | undefined,
  };
}

function toResource(item: Record<string, unknown>): ResourceRecord {
  return {
    user: item.user as string,
    resource: item.resource as string,
    connectionId: item.connectionId as string,
    available: Boolean(item.available),
    priority: (item.priority as number | undefined) ?? 0,
    presence: item.presence as string | undefined,
    boundAt: item.boundAt as number,
    flexibleOffline: item.flexibleOffline as boolean | undefined,
    smId: item.smId as string | undefined,
  };
}

export function createSessionStore(
  doc: DynamoDBDocumentClient,
  table: string,
  connectionTtlSeconds: number,
): SessionStore {
  /** Deletes a resource row only if it still belongs to the given owner; returns it, or undefined. */
  async function releaseIfOwned(
    user: string,
    resource: string,
    owner: 'connectionId' | 'smId',
    value: string,
  ): Promise<ResourceRecord | undefined> {
    try {
      const { Attributes } = await doc.send(
        new DeleteCommand({
          TableName: table,
          Key: resourceKey(user, resource),
          ConditionExpression: `${owner} = :owner`,
          ExpressionAttributeValues: { ':owner': value },
          ReturnValues: 'ALL_OLD',
        }),
      );
      return Attributes ? toResource(Attributes) : undefined;
    } catch (error) {
      if (isConditionFailure(error)) return undefined;
      throw error;
    }
  }

  return {
    async createConnection(connectionId, connectedAt, sourceIp) {
      await doc.send(
        new PutCommand({
          TableName: table,
          Item: {
            ...connKey(connectionId),
            connectionId,
            connectedAt,
            ...(sourceIp ? { sourceIp } : {}),
            streamOpen: false,
            authFailures: 0,
            [TTL_ATTRIBUTE]: ttl(connectionTtlSeconds, connectedAt),
          },
        }),
      );
    },

    async getConnection(connectionId) {
      const { Item } = await doc.send(
        new GetCommand({ TableName: table, Key: connKey(connectionId), ConsistentRead: true }),
      );
      return Item ? toConnection(Item) : undefined;
    },

    async updateConnection(connectionId, changes) {
      const sets: string[] = [];
      const removes: string[] = [];
      const names: Record<string, string> = {};
      const values: Record<string, unknown> = {};
      for (const [field, value] of Object.entries(changes)) {
        names[`#${field}`] = field;
        if (value === undefined) removes.push(`#${field}`);
        else {
          sets.push(`#${field} = :${field}`);
          values[`:${field}`] = value;
        }
      }
      names['#ttl'] = TTL_ATTRIBUTE;
      sets.push('#ttl = :ttl');
      values[':ttl'] = ttl(connectionTtlSeconds);
      const expression = `SET ${sets.join(', ')}${removes.length ? ` REMOVE ${removes.join(', ')}` : ''}`;
      try {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: connKey(connectionId),
            UpdateExpression: expression,
            ConditionExpression: 'attribute_exists(pk)',
            ExpressionAttributeNames: names,
            ExpressionAttributeValues: values,
          }),
        );
      } catch (error) {
        // The connection ended meanwhile (its row was deleted): nothing left to update.
        if (!isConditionFailure(error)) throw error;
      }
    },

    async deleteConnection(connectionId) {
      await doc.send(new DeleteCommand({ TableName: table, Key: connKey(connectionId) }));
    },

    async listResources(user) {
      const { Items = [] } = await doc.send(
        new QueryCommand({
          TableName: table,
          KeyConditionExpression: 'pk = :pk AND begins_with(sk, :res)',
          ExpressionAttributeValues: { ':pk': `user#${user}`, ':res': 'res#' },
          ConsistentRead: true,
        }),
      );
      return Items.map(toResource);
    },

    async getResource(user, resource) {
      if (!fitsResourceKey(resource)) return undefined;
      const { Item } = await doc.send(
        new GetCommand({ TableName: table, Key: resourceKey(user, resource), ConsistentRead: true }),
      );
      return Item ? toResource(Item) : undefined;
    },

    async bindResource(record) {
      const { Attributes } = await doc.send(
        new PutCommand({
          TableName: table,
          Item: {
            ...resourceKey(record.user, record.resource),
            ...record,
            // API Gateway cuts every connection after 2 hours; a resource whose $disconnect was
            // lost is found by a 410 on the next delivery, or expires with the connection TTL.
            [TTL_ATTRIBUTE]: ttl(connectionTtlSeconds, record.boundAt),
          },
          ReturnValues: 'ALL_OLD',
        }),
      );
      return Attributes ? toResource(Attributes) : undefined;
    },

    async updatePresence(user, resource, connectionId, changes) {
      try {
        const { Attributes } = await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: resourceKey(user, resource),
            UpdateExpression: 'SET available = :available, priority = :priority, presence = :presence',
            ConditionExpression: 'connectionId = :connectionId',
            ExpressionAttributeValues: {
              ':available': changes.available,
              ':priority': changes.priority,
              ':presence': changes.presence ?? '',
              ':connectionId': connectionId,
            },
            ReturnValues: 'ALL_OLD',
          }),
        );
        return Attributes ? toResource(Attributes) : undefined;
      } catch (error) {
        if (isConditionFailure(error)) return undefined;
        throw error;
      }
    },

    async markFlexibleOffline(user, resource, connectionId) {
      try {
        await doc.send(
          new UpdateCommand({
            TableName: table,
            Key: resourceKey(user, resource),
            UpdateExpression: 'SET flexibleOffline = :yes',
            ConditionExpression: 'connectionId = :connectionId',
            ExpressionAttributeValues: { ':yes': true, ':connectionId': connectionId },
          }),
        );
      } catch (error) {
        if (!isConditionFailure(error)) throw error;
      }
    },

    async setResourceSm(user, resource, connectionId, smId) {
      await doc.send(
        new UpdateCommand({
          TableName: table,
          Key: resourceKey(user, resource),
          UpdateExpression: smId ? 'SET smId = :smId' : 'REMOVE smId',
          ConditionExpression: 'connectionId = :connectionId',
          ExpressionAttributeValues: { ':connectionId': connectionId, ...(smId ? { ':smId': smId } : {}) },
        }),
      );
    },

    releaseSmResource: (user, resource, smId) => releaseIfOwned(user, resource, 'smId', smId),

    releaseResource: (user, resource, connectionId) =>
      releaseIfOwned(user, resource, 'connectionId', connectionId),

    // No request path needs every session, so there is no index for it: listing them is an
    // operator's command (`npm run user -- sessions`), a Scan filtered to resource rows that
    // reads (and pays for) the whole table. The functions' roles are not allowed to Scan.
    async listAllResources() {
      const resources: ResourceRecord[] = [];
      let startKey: Record<string, unknown> | undefined;
      do {
        const page = await doc.send(
          new ScanCommand({
            TableName: table,
            FilterExpression: 'begins_with(pk, :user) AND begins_with(sk, :res)',
            ExpressionAttributeValues: { ':user': 'user#', ':res': 'res#' },
            ExclusiveStartKey: startKey,
          }),
        );
        for (const item of page.Items ?? []) resources.push(toResource(item));
        startKey = page.LastEvaluatedKey;
      } while (startKey);
      return resources.sort((a, b) =>
        a.user === b.user ? a.resource.localeCompare(b.resource) : a.user.localeCompare(b.user),
      );
    },
  };
}
