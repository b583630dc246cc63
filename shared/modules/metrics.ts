/**
 * Business metrics from the host's events (the catalogue is shared/metrics.ts). This module only
 * observes: every hook returns undefined, so nothing it does changes what a client sees, and the
 * iq hooks run first (high priority) only so that a module taking the stanza cannot hide it.
 *
 * Counted elsewhere, where no event exists: `StanzasOut` in the delivery path (core/delivery.ts),
 * `StanzasRerouted` in the session lifecycle, `SmEnabled`/`SmResumeFailed` in XEP-0198,
 * `MessagesFlooded` in XEP-0160, `DynamoDbThrottles` in the DynamoDB client, and the frame,
 * connection and sweep counts in the Lambda entry points (functions/).
 */
import type { Element } from 'ltx';
import type { Server, StanzaEvent } from '../core/host.ts';
import type { MetricsRecorder } from '../metrics.ts';
import { NS } from '../xml/namespaces.ts';
import { ARCHIVE_NS, ARCHIVE_REQUESTS } from './xep-0136/decode.ts';

/** XEP-0136 requests are counted by element, from the archive module's own list (its pure decoder). */
const ARCHIVE_REQUEST_NAMES = new Set<string>(ARCHIVE_REQUESTS);

export function register(server: Server): void {
  const { host, metrics } = server;
  host.hook('auth-result', ({ mechanism, success, condition }) => {
    if (success) metrics.count('Logins', 1, mechanism);
    else metrics.count('LoginFailures', 1, condition);
    return undefined;
  });
  host.hook('stanza-in', ({ stanza }) => void metrics.count('StanzasIn', 1, stanza.name));
  host.hook('message-routed', () => void metrics.count('MessagesDelivered'));
  host.hook('message-stored-offline', () => void metrics.count('MessagesStoredOffline'));
  host.hook('session-resumed', () => void metrics.count('SmResumed'));
  host.hook('stream-error', ({ condition }) => void metrics.count('StreamErrors', 1, condition));
  for (const target of ['host', 'bare'] as const) {
    host.hook(`iq/${target}`, (event) => void countRequest(metrics, event), { priority: 1000 });
  }
}

/** XEP-0013 and XEP-0136 requests, by action; other iqs are not counted here. */
function countRequest(metrics: MetricsRecorder, { stanza }: StanzaEvent): void {
  const type = stanza.attrs.type;
  if (type !== 'get' && type !== 'set') return;
  const [payload, ...more] = stanza.getChildElements();
  if (!payload || more.length > 0) return;
  const ns = payload.attrs.xmlns;
  const offlineAction = offlineActionOf(ns, payload);
  if (offlineAction) metrics.count('OfflineRequests', 1, offlineAction);
  else if (ns === ARCHIVE_NS)
    metrics.count('ArchiveRequests', 1, ARCHIVE_REQUEST_NAMES.has(payload.name) ? payload.name : 'other');
}

/** XEP-0013 §2.2–2.6: count and headers through disco on the offline node, the rest through `<offline/>`. */
function offlineActionOf(ns: string | undefined, payload: Element): string | undefined {
  if (payload.name === 'query' && payload.attrs.node === NS.offline) {
    if (ns === NS.discoInfo) return 'count';
    if (ns === NS.discoItems) return 'headers';
    return undefined;
  }
  if (payload.name !== 'offline' || ns !== NS.offline) return undefined;
  const children = payload.getChildElements();
  if (children.some((child) => child.name === 'fetch')) return 'fetch';
  if (children.some((child) => child.name === 'purge')) return 'purge';
  const action = children[0]?.attrs.action;
  return action === 'view' || action === 'remove' ? action : 'other';
}
