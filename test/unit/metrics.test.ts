/**
 * Business metrics without DynamoDB: each event and counting point of shared/metrics.ts's
 * catalogue produces its count, and the counts leave as CloudWatch embedded metric format lines
 * built by functions/telemetry.ts (captured here as the function would write them to stdout).
 * Failing DynamoDB answers come from a small HTTP server speaking DynamoDB's JSON protocol, so
 * the real SDK client, its retries and the middleware that counts throttles are exercised.
 */
import { createServer as createHttpServer, type Server as HttpServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { GetCommand } from '@aws-sdk/lib-dynamodb';
import type { SQSRecord } from 'aws-lambda';
import { Element, parse } from 'ltx';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStreamHandler } from '../../functions/stream.ts';
import { createMetricsPublisher, EMF_MAX_METRICS, emfDocument } from '../../functions/telemetry.ts';
import { loadConfig } from '../../shared/config.ts';
import { post } from '../../shared/core/delivery.ts';
import type { Server, Stream } from '../../shared/core/host.ts';
import { createLogger } from '../../shared/log.ts';
import {
  dimensionOf,
  METRIC_NAMESPACE,
  METRIC_SERVICE,
  METRICS,
  type MetricName,
  MetricsRecorder,
} from '../../shared/metrics.ts';
import { RecordingPort } from '../../shared/outbound.ts';
import { encodeQueueMessage } from '../../shared/queue-message.ts';
import { createServer } from '../../shared/server.ts';
import { createDocumentClient } from '../../shared/store/dynamo.ts';

const DOMAIN = 'example.org';

// biome-ignore lint/suspicious/noExplicitAny: EMF documents are JSON read back by the test.
type Emf = Record<string, any>;

/** Publishes what `server.metrics` holds the way a function does, and returns the EMF documents. */
function publish(server: Server, functionName?: string): Emf[] {
  const lines: string[] = [];
  createMetricsPublisher({ domain: DOMAIN, functionName, write: (line) => lines.push(line) })(
    server.metrics.drain(),
  );
  return lines.map((line) => JSON.parse(line));
}

/** The value of `name` in the documents, for one value of its dimension (or undimensioned). */
function metricValue(documents: Emf[], name: MetricName, dimensionValue?: string): number | undefined {
  for (const document of documents) {
    const [directive] = document._aws.CloudWatchMetrics;
    if (!directive.Metrics.some((m: { Name: string }) => m.Name === name)) continue;
    const [dimensions] = directive.Dimensions as string[][];
    const own = dimensions.filter((d) => d !== 'service' && d !== 'domain');
    if (
      dimensionValue === undefined
        ? own.length === 0
        : own.length === 1 && document[own[0] as string] === dimensionValue
    )
      return document[name];
  }
  return undefined;
}

function testServer(config = loadConfig({ XMPP_DOMAIN: DOMAIN })): { server: Server; port: RecordingPort } {
  const port = new RecordingPort();
  return { server: createServer({ config, port, log: createLogger('silent') }), port };
}

/** A stand-in stream for events that carry one (the other modules' hooks see it too). */
const someStream = {
  state: { connectionId: 'c', connectedAt: 0, streamOpen: true, authFailures: 0 },
  update: () => {},
} as unknown as Stream;

describe('the EMF lines', () => {
  it('are EMF documents in the Nimbus namespace, with the service and domain dimensions', () => {
    const { server } = testServer();
    server.metrics.count('MessagesDelivered', 2);
    server.metrics.count('StreamErrors', 1, 'host-unknown');
    const documents = publish(server);
    expect(documents).toHaveLength(2);
    expect(documents[0]).toMatchObject({
      _aws: {
        Timestamp: expect.any(Number),
        CloudWatchMetrics: [
          {
            Namespace: METRIC_NAMESPACE,
            Dimensions: [['service', 'domain']],
            Metrics: [{ Name: 'MessagesDelivered', Unit: 'Count' }],
          },
        ],
      },
      service: METRIC_SERVICE,
      domain: DOMAIN,
      MessagesDelivered: 2,
    });
    expect(documents[1]).toMatchObject({
      _aws: { CloudWatchMetrics: [{ Dimensions: [['service', 'domain', 'condition']] }] },
      condition: 'host-unknown',
      StreamErrors: 1,
    });
  });

  it('are one document per dimension value, and nothing when nothing was counted', () => {
    const { server } = testServer();
    server.metrics.count('StanzasIn', 1, 'message');
    server.metrics.count('StanzasIn', 1, 'message');
    server.metrics.count('StanzasIn', 1, 'iq');
    server.metrics.count('FramesIn', 3);
    const documents = publish(server);
    expect(documents).toHaveLength(3);
    expect(metricValue(documents, 'StanzasIn', 'message')).toBe(2);
    expect(metricValue(documents, 'StanzasIn', 'iq')).toBe(1);
    expect(metricValue(documents, 'FramesIn')).toBe(3);
    expect(publish(server)).toEqual([]);
  });

  it("are exactly the specification's shape: the directive, then the dimensions' and counts' values", () => {
    // CloudWatch EMF specification, example: {"_aws":{"Timestamp":1574109732004,
    // "CloudWatchMetrics":[{"Namespace":"lambda-function-metrics","Dimensions":[["functionVersion"]],
    // "Metrics":[{"Name":"time","Unit":"Milliseconds","StorageResolution":60}]}]},
    // "functionVersion":"$LATEST","time":100,"requestId":"989ffbf8-9ace-4817-a57c-e4dd734019ee"}
    expect(
      emfDocument(
        { service: METRIC_SERVICE, domain: DOMAIN, kind: 'iq' },
        [
          { name: 'StanzasIn', value: 3 },
          { name: 'StanzasOut', value: 4 },
        ],
        1574109732004,
      ),
    ).toStrictEqual({
      _aws: {
        Timestamp: 1574109732004,
        CloudWatchMetrics: [
          {
            Namespace: 'Nimbus',
            Dimensions: [['service', 'domain', 'kind']],
            Metrics: [
              { Name: 'StanzasIn', Unit: 'Count' },
              { Name: 'StanzasOut', Unit: 'Count' },
            ],
          },
        ],
      },
      service: 'nimbus',
      domain: DOMAIN,
      kind: 'iq',
      StanzasIn: 3,
      StanzasOut: 4,
    });
  });

  it("never let a metric's value overwrite a dimension's (a name is never a dimension)", () => {
    const dimensions = new Set([
      'service',
      'domain',
      ...Object.keys(METRICS).map((n) => dimensionOf(n as MetricName)),
    ]);
    for (const name of Object.keys(METRICS)) expect(dimensions.has(name)).toBe(false);
  });

  it(`split a dimension's counts over documents of at most ${EMF_MAX_METRICS} metrics (CloudWatch's bound)`, () => {
    const lines: string[] = [];
    const samples = Array.from({ length: EMF_MAX_METRICS + 5 }, (_, i) => ({
      name: `Count${i}` as MetricName,
      value: i + 1,
    }));
    createMetricsPublisher({ domain: DOMAIN, write: (line) => lines.push(line) })(samples);
    const documents = lines.map((line) => JSON.parse(line));
    expect(documents.map((d) => d._aws.CloudWatchMetrics[0].Metrics.length)).toEqual([EMF_MAX_METRICS, 5]);
    expect(documents[1].Count104).toBe(105);
    expect(documents[1]._aws.CloudWatchMetrics[0].Metrics[0]).toEqual({ Name: 'Count100', Unit: 'Count' });
  });

  it('count a cold start once per process, by function', () => {
    const recorder = new MetricsRecorder();
    const lines: string[] = [];
    const publisher = createMetricsPublisher({
      domain: DOMAIN,
      functionName: 'stream',
      write: (l) => lines.push(l),
    });
    publisher(recorder.drain());
    publisher(recorder.drain());
    const documents = lines.map((line) => JSON.parse(line));
    expect(documents).toHaveLength(1);
    expect(metricValue(documents, 'ColdStarts', 'stream')).toBe(1);
  });
});

describe('metrics from host events (shared/modules/metrics.ts)', () => {
  it('counts logins by mechanism and failures by condition (auth-result)', async () => {
    const { server } = testServer();
    const fire = (mechanism: string, success: boolean, condition?: string) =>
      server.host.fire('auth-result', {
        stream: someStream,
        mechanism,
        success,
        ...(condition ? { condition } : {}),
      });
    await fire('SCRAM-SHA-256', true);
    await fire('SCRAM-SHA-256', true);
    await fire('PLAIN', true);
    await fire('PLAIN', false, 'not-authorized');
    await fire('SCRAM-SHA-1', false, 'temporary-auth-failure');
    const documents = publish(server);
    expect(metricValue(documents, 'Logins', 'SCRAM-SHA-256')).toBe(2);
    expect(metricValue(documents, 'Logins', 'PLAIN')).toBe(1);
    expect(metricValue(documents, 'LoginFailures', 'not-authorized')).toBe(1);
    expect(metricValue(documents, 'LoginFailures', 'temporary-auth-failure')).toBe(1);
  });

  it('counts stanzas in by kind (stanza-in)', async () => {
    const { server } = testServer();
    for (const kind of ['message', 'message', 'presence', 'iq']) {
      await server.host.fire('stanza-in', {
        stream: someStream as never,
        stanza: new Element(kind),
        repeatable: false,
      });
    }
    const documents = publish(server);
    expect(metricValue(documents, 'StanzasIn', 'message')).toBe(2);
    expect(metricValue(documents, 'StanzasIn', 'presence')).toBe(1);
    expect(metricValue(documents, 'StanzasIn', 'iq')).toBe(1);
  });

  it('counts messages delivered online and stored offline, resumptions and stream errors', async () => {
    const { server } = testServer();
    const stanza = parse('<message><body>hi</body></message>');
    const to = {
      user: 'bob@example.org',
      resource: 'r',
      connectionId: 'c',
      available: true,
      priority: 0,
      boundAt: 0,
    };
    await server.host.fire('message-routed', { stanza, to });
    await server.host.fire('message-routed', { stanza, to });
    await server.host.fire('message-stored-offline', {
      stanza,
      user: 'bob@example.org',
      id: '1',
      storedAt: 0,
    });
    await server.host.fire('session-resumed', { stream: someStream as never });
    await server.host.fire('stream-error', { connectionId: 'c', condition: 'policy-violation' });
    const documents = publish(server);
    expect(metricValue(documents, 'MessagesDelivered')).toBe(2);
    expect(metricValue(documents, 'MessagesStoredOffline')).toBe(1);
    expect(metricValue(documents, 'SmResumed')).toBe(1);
    expect(metricValue(documents, 'StreamErrors', 'policy-violation')).toBe(1);
  });

  it('counts XEP-0013 requests by action and XEP-0136 requests by element, never a client-made name', async () => {
    const { server } = testServer();
    const iqs = [
      "<iq type='get' id='1'><query xmlns='http://jabber.org/protocol/disco#info' node='http://jabber.org/protocol/offline'/></iq>",
      "<iq type='get' id='2'><query xmlns='http://jabber.org/protocol/disco#items' node='http://jabber.org/protocol/offline'/></iq>",
      "<iq type='get' id='3'><offline xmlns='http://jabber.org/protocol/offline'><item action='view' node='x'/></offline></iq>",
      "<iq type='set' id='4'><offline xmlns='http://jabber.org/protocol/offline'><item action='remove' node='x'/></offline></iq>",
      "<iq type='get' id='5'><offline xmlns='http://jabber.org/protocol/offline'><fetch/></offline></iq>",
      "<iq type='set' id='6'><offline xmlns='http://jabber.org/protocol/offline'><purge/></offline></iq>",
      "<iq type='get' id='7'><list xmlns='http://jabber.org/protocol/archive'/></iq>",
      "<iq type='get' id='8'><retrieve xmlns='http://jabber.org/protocol/archive' with='a@b'/></iq>",
      "<iq type='get' id='9'><made-up-by-a-client xmlns='http://jabber.org/protocol/archive'/></iq>",
      // Not requests: a result, and a disco#info without the offline node.
      "<iq type='result' id='10'><list xmlns='http://jabber.org/protocol/archive'/></iq>",
      "<iq type='get' id='11'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
    ];
    for (const [i, iq] of iqs.entries()) {
      const target = i % 2 === 0 ? 'iq/host' : 'iq/bare';
      await server.host.fire(target, { stanza: parse(iq) } as never);
    }
    const documents = publish(server);
    for (const action of ['count', 'headers', 'view', 'remove', 'fetch', 'purge']) {
      expect(metricValue(documents, 'OfflineRequests', action), action).toBe(1);
    }
    expect(metricValue(documents, 'ArchiveRequests', 'list')).toBe(1);
    expect(metricValue(documents, 'ArchiveRequests', 'retrieve')).toBe(1);
    expect(metricValue(documents, 'ArchiveRequests', 'other')).toBe(1);
    expect(metricValue(documents, 'ArchiveRequests', 'made-up-by-a-client')).toBeUndefined();
  });
});

describe('counting points where no event exists', () => {
  it('counts what the delivery path posts, by kind (API Gateway messages out)', async () => {
    const { server, port } = testServer();
    await post(server, 'c1', parse("<message to='bob@example.org'><body>hi</body></message>"));
    await post(server, 'c1', new Element('presence'));
    await post(server, 'c1', new Element('r', { xmlns: 'urn:xmpp:sm:3' }));
    port.gone.add('c2');
    await post(server, 'c2', new Element('message'));
    const documents = publish(server);
    expect(metricValue(documents, 'StanzasOut', 'message')).toBe(1);
    expect(metricValue(documents, 'StanzasOut', 'presence')).toBe(1);
    expect(metricValue(documents, 'StanzasOut', 'nonza')).toBe(1);
  });
});

/** Answers every DynamoDB request with the error of the current mode, counting requests. */
let dynamo: HttpServer;
let endpoint: string;
let mode: 'throttle' | 'unavailable' = 'throttle';
let requests = 0;

beforeAll(async () => {
  dynamo = createHttpServer((request, response) => {
    request.resume();
    request.on('end', () => {
      requests += 1;
      const [status, type] =
        mode === 'throttle' ? [400, 'ThrottlingException'] : [500, 'InternalServerError'];
      response.writeHead(status, {
        'content-type': 'application/x-amz-json-1.0',
        'x-amzn-requestid': 'test',
      });
      response.end(JSON.stringify({ __type: `com.amazonaws.dynamodb.v20120810#${type}`, message: type }));
    });
  });
  await new Promise<void>((resolve) => dynamo.listen(0, '127.0.0.1', resolve));
  endpoint = `http://127.0.0.1:${(dynamo.address() as AddressInfo).port}`;
});

afterAll(() => new Promise<void>((resolve) => dynamo.close(() => resolve())));

describe('DynamoDB throttles', () => {
  it('are counted per attempt, the ones the SDK retried included, by operation', async () => {
    mode = 'throttle';
    requests = 0;
    const recorder = new MetricsRecorder();
    const doc = createDocumentClient({
      endpoint,
      region: 'us-east-1',
      onThrottle: (operation) => recorder.count('DynamoDbThrottles', 1, operation),
    });
    const error = await doc
      .send(new GetCommand({ TableName: 't', Key: { pk: 'a', sk: 'b' } }))
      .catch((e) => e);
    doc.destroy();
    expect(error.name).toBe('ThrottlingException');
    expect(requests).toBeGreaterThan(1);
    expect(recorder.drain()).toEqual([
      { name: 'DynamoDbThrottles', value: requests, dimension: { name: 'operation', value: 'GetItem' } },
    ]);
  });
});

describe('the stream function', () => {
  function record(id: string, group: string, receiveCount: number, body?: string): SQSRecord {
    const frame = "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='example.org' version='1.0'/>";
    return {
      messageId: id,
      receiptHandle: id,
      body:
        body ??
        encodeQueueMessage({
          connectionId: group,
          eventType: 'MESSAGE',
          requestTimeEpoch: Date.now(),
          requestId: `req-${id}`,
          body: Buffer.from(frame).toString('base64'),
        }),
      attributes: {
        ApproximateReceiveCount: String(receiveCount),
        SentTimestamp: '0',
        SenderId: 'test',
        ApproximateFirstReceiveTimestamp: '0',
        MessageGroupId: group,
        MessageDeduplicationId: id,
        SequenceNumber: '1',
      },
      messageAttributes: {},
      md5OfBody: '',
      eventSource: 'aws:sqs',
      eventSourceARN: 'arn:aws:sqs:us-east-1:000000000000:frames.fifo',
      awsRegion: 'us-east-1',
    };
  }

  it('counts frames in, retried (the failed one and those behind it), dead-lettered and malformed', async () => {
    mode = 'unavailable';
    const { server } = testServer(loadConfig({ XMPP_DOMAIN: DOMAIN, DYNAMODB_ENDPOINT: endpoint }));
    const lines: string[] = [];
    const handle = createStreamHandler(server, {
      maxReceiveCount: 5,
      publishMetrics: createMetricsPublisher({ domain: DOMAIN, write: (line) => lines.push(line) }),
    });
    const response = await handle({
      Records: [
        record('a1', 'A', 1),
        record('a2', 'A', 1),
        record('b1', 'B', 1, 'not json'),
        record('c1', 'C', 5),
      ],
    });
    // RFC 6120 §10.1 in order: a2 waits for a1's retry; the malformed b1 is dropped, not retried.
    expect(response.batchItemFailures.map((f) => f.itemIdentifier)).toEqual(['a1', 'a2', 'c1']);
    const documents = lines.map((line) => JSON.parse(line));
    expect(metricValue(documents, 'FramesIn')).toBe(3);
    expect(metricValue(documents, 'FramesRetried')).toBe(2);
    expect(metricValue(documents, 'FramesDeadLettered')).toBe(1);
    expect(metricValue(documents, 'FramesMalformed')).toBe(1);
  });
});
