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
/** The `service` dimension of every metric, and the service of every log line (Powertools' Logger). */
export const METRIC_SERVICE = 'nimbus';

interface MetricDefinition {
  /** The metric's own dimension, if it is split. (What one count means: infra/metric-descriptions.ts.) */
  dimension?: string;
}

export const METRICS = {
  FramesIn: {},
  FramesRetried: {},
  FramesDeadLettered: {},
  FramesMalformed: {},
  ConnectionsOpened: {},
  HandshakesRefused: {},
  Logins: { dimension: 'mechanism' },
  LoginFailures: { dimension: 'condition' },
  StanzasIn: { dimension: 'kind' },
  StanzasOut: { dimension: 'kind' },
  MessagesDelivered: {},
  MessagesStoredOffline: {},
  MessagesFlooded: {},
  OfflineRequests: { dimension: 'action' },
  ArchiveRequests: { dimension: 'action' },
  SmEnabled: { dimension: 'version' },
  SmEnableRefused: { dimension: 'condition' },
  SmEnabledLate: {},
  SmResumed: {},
  SmResumeFailed: { dimension: 'condition' },
  StanzasRerouted: {},
  StreamErrors: { dimension: 'condition' },
  SessionsExpired: {},
  SweepFailures: { dimension: 'phase' },
  SweepsCutShort: {},
  ColdStarts: { dimension: 'function' },
  DynamoDbThrottles: { dimension: 'operation' },
  PostsUnanswered: {},
  ResumesUnsettled: {},
  SmResumesForced: { dimension: 'reason' },
  SmUncertainResent: {},
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
