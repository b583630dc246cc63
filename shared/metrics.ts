/**
 * Business metrics: the catalogue of every metric Nimbus emits, and the per-process recorder
 * the core and the modules count into. Nothing here talks to CloudWatch: each Lambda entry
 * point drains the recorder once per invocation and writes the counts as CloudWatch embedded
 * metric format lines (functions/telemetry.ts), which CloudWatch turns into metrics with no API
 * call. The CDK dashboard reads the same catalogue, so a renamed metric cannot leave a graph
 * empty.
 *
 * Every metric is a count, in the namespace `Nimbus`, with the dimensions `service` and
 * `domain` (the XMPP domain served), plus at most one dimension of its own. Values of that
 * dimension come from fixed sets (a mechanism offered, a defined error condition, a stanza
 * kind), never from what a client wrote, so a client cannot create metrics.
 */

export const METRIC_NAMESPACE = 'Nimbus';
/** Powertools' `service` dimension of every metric. */
export const METRIC_SERVICE = 'nimbus';

interface MetricDefinition {
  /** What one count means (the README's metric list is this text). */
  description: string;
  /** The metric's own dimension, if it is split. */
  dimension?: string;
}

export const METRICS = {
  FramesIn: { description: 'Queue records the stream function handled: frames and `$disconnect` events' },
  FramesRetried: {
    description:
      'Records handed back to the queue for another try: a transient DynamoDB or API Gateway failure, or a frame queued behind one of its connection',
  },
  FramesDeadLettered: {
    description:
      'Records that failed on their last allowed receive (the queue’s maxReceiveCount): SQS moves them to the dead-letter queue',
  },
  FramesMalformed: { description: 'Queue messages that were not a frame or a disconnect, dropped' },
  ConnectionsOpened: { description: '`$connect` handshakes accepted' },
  Logins: { description: 'Successful SASL authentications', dimension: 'mechanism' },
  LoginFailures: {
    description:
      'Failed SASL attempts, by the `<failure/>` condition sent (`not-authorized`, `temporary-auth-failure`, …)',
    dimension: 'condition',
  },
  StanzasIn: { description: 'Stanzas received from bound clients', dimension: 'kind' },
  StanzasOut: {
    description:
      'Elements posted to clients (API Gateway messages out), by kind: `message`, `presence`, `iq`, or `nonza` for everything else',
    dimension: 'kind',
  },
  MessagesDelivered: {
    description: 'Messages put on an online session (posted, or queued for a stream-management session)',
  },
  MessagesStoredOffline: { description: 'Messages stored for an offline user (XEP-0160)' },
  MessagesFlooded: { description: 'Stored messages sent to a user at login (XEP-0160 offline flood)' },
  OfflineRequests: {
    description: 'XEP-0013 requests: `count`, `headers`, `view`, `remove`, `fetch`, `purge`',
    dimension: 'action',
  },
  ArchiveRequests: {
    description:
      'XEP-0136 requests, by request element (`list`, `retrieve`, `pref`, …; `other` for the rest)',
    dimension: 'action',
  },
  SmEnabled: { description: 'XEP-0198 stream management enabled', dimension: 'version' },
  SmEnableRefused: {
    description:
      'XEP-0198 `<enable/>`s refused, by `<failed/>` condition (`unexpected-request`: a replaced stream; `resource-constraint`: direct posts stayed in flight)',
    dimension: 'condition',
  },
  SmEnabledLate: {
    description:
      'XEP-0198 `<enable/>`s that came after the window of counted direct posts (over 5 s after presence): `<enabled/>` waited for uncounted posts to be over',
  },
  SmResumed: { description: 'XEP-0198 sessions resumed' },
  SmResumeFailed: {
    description: 'XEP-0198 resumptions refused, by `<failed/>` condition',
    dimension: 'condition',
  },
  StanzasRerouted: {
    description:
      'Unacknowledged stanzas of an ended stream-management session sent to another resource or offline storage',
  },
  StreamErrors: { description: 'Streams ended with a stream error, by condition', dimension: 'condition' },
  SessionsExpired: { description: 'Detached XEP-0198 sessions the sweeper ended' },
  ColdStarts: { description: 'Lambda execution environments started, by function', dimension: 'function' },
  DynamoDbThrottles: {
    description: 'DynamoDB requests throttled (each attempt, retried ones included)',
    dimension: 'operation',
  },
  PostsUnanswered: {
    description:
      'Posts to a socket that got no answer (timeout, dropped connection): not resent; a stream-management client is made to resume',
  },
  ResumesUnsettled: {
    description:
      'XEP-0198 resumes that went ahead while the old stream had not finished routing a stanza it counted (the client’s next stanzas may overtake it)',
  },
  SmResumesForced: {
    description:
      'XEP-0198 sockets the server closed so that the client resumes, by reason: `uncertain-post` (a post failed or went unanswered), `out-of-time` (a poster short of invocation time), `lease` (a hold past `SM_POSTER_LEASE_MS`), `redelivered`, `uncertain-append`, `uncertain-entry`, `fenced`',
    dimension: 'reason',
  },
  SmUncertainResent: {
    description:
      'XEP-0198 stanzas sent again on a resume because a post failed or was never made while later ones went out: the client may get some twice, never none',
  },
} as const satisfies Record<string, MetricDefinition>;

export type MetricName = keyof typeof METRICS;

/** One metric's count since the last drain, for one value of its dimension. */
export interface MetricSample {
  name: MetricName;
  value: number;
  dimension?: { name: string; value: string };
}

export function dimensionOf(name: MetricName): string | undefined {
  return (METRICS[name] as MetricDefinition).dimension;
}

/** Counts between two drains; one per process, on the server (`server.metrics`). */
export class MetricsRecorder {
  private samples = new Map<string, MetricSample>();

  /**
   * Adds `value` to `name`. A split metric needs the value of its dimension; one counted
   * without it is counted under `unknown`.
   */
  count(name: MetricName, value = 1, dimensionValue?: string): void {
    if (value === 0) return;
    const dimension = dimensionOf(name);
    const key = dimension ? `${name}\u0000${dimensionValue ?? 'unknown'}` : name;
    const sample = this.samples.get(key);
    if (sample) {
      sample.value += value;
      return;
    }
    this.samples.set(key, {
      name,
      value,
      ...(dimension ? { dimension: { name: dimension, value: dimensionValue ?? 'unknown' } } : {}),
    });
  }

  /** Everything counted since the last drain; the recorder starts again from zero. */
  drain(): MetricSample[] {
    const samples = [...this.samples.values()];
    this.samples.clear();
    return samples;
  }
}
