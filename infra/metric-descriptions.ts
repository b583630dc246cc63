/**
 * What one count of each business metric means: the text of the README's metric list and of
 * the dashboard's readers. Kept out of shared/metrics.ts so that the functions' bundles do not
 * carry it; the type makes a metric without a description a compile error.
 */
import type { MetricName } from '../shared/metrics.ts';

export const METRIC_DESCRIPTIONS: Record<MetricName, string> = {
  FramesIn: 'Queue records the stream function handled: frames and `$disconnect` events',
  FramesRetried:
    'Records handed back to the queue for another try: a transient DynamoDB or API Gateway failure, or a frame queued behind one of its connection',
  FramesDeadLettered:
    'Records that failed on their last allowed receive (the queue’s maxReceiveCount): SQS moves them to the dead-letter queue',
  FramesMalformed: 'Queue messages that were not a frame or a disconnect, dropped',
  ConnectionsOpened: '`$connect` handshakes accepted',
  HandshakesRefused:
    '`$connect` handshakes refused (no `xmpp` subprotocol offered, RFC 7395 §3.3.1): API Gateway counts them in `IntegrationError`, which the `IntegrationErrors` alarm leaves them out of',
  Logins: 'Successful SASL authentications',
  LoginFailures:
    'Failed SASL attempts, by the `<failure/>` condition sent (`not-authorized`, `temporary-auth-failure`, …)',
  StanzasIn: 'Stanzas received from bound clients',
  StanzasOut:
    'Elements posted to clients (API Gateway messages out), by kind: `message`, `presence`, `iq`, or `nonza` for everything else',
  MessagesDelivered: 'Messages put on an online session (posted, or queued for a stream-management session)',
  MessagesStoredOffline: 'Messages stored for an offline user (XEP-0160)',
  MessagesFlooded: 'Stored messages sent to a user at login (XEP-0160 offline flood)',
  OfflineRequests:
    'XEP-0013 requests: `count`, `headers`, `view`, `remove`, `fetch`, `purge`; `other` for the rest',
  ArchiveRequests:
    'XEP-0136 requests, by request element (`list`, `retrieve`, `pref`, …; `other` for the rest)',
  SmEnabled: 'XEP-0198 stream management enabled',
  SmEnableRefused:
    'XEP-0198 `<enable/>`s refused, by `<failed/>` condition (`unexpected-request`: a replaced stream; `resource-constraint`: direct posts stayed in flight)',
  SmEnabledLate:
    'XEP-0198 `<enable/>`s that came after the window of counted direct posts (over 5 s after presence): `<enabled/>` waited for uncounted posts to be over',
  SmResumed: 'XEP-0198 sessions resumed',
  SmResumeFailed: 'XEP-0198 resumptions refused, by `<failed/>` condition',
  StanzasRerouted:
    'Unacknowledged stanzas of an ended stream-management session sent to another resource or offline storage',
  StreamErrors: 'Streams ended with a stream error, by condition',
  SessionsExpired: 'Detached XEP-0198 sessions the sweeper ended',
  SweepFailures:
    "Sweeper items or phases that failed, by phase (`expire`, `reroute`, `probe`, `archive-purge`, `archive-expiry`, or `hook` for a module's sweep hook that threw): logged, tried again next run; the run went on with the rest (a phase stops after 5 failures in a row)",
  SweepsCutShort:
    'Sweeper runs that stopped starting work with little of the invocation left: the rest waits for the next run',
  ColdStarts: 'Lambda execution environments started, by function',
  DynamoDbThrottles: 'DynamoDB requests throttled (each attempt, retried ones included)',
  PostsUnanswered:
    'Posts that got no answer (timeout, dropped connection): never resent; a stream-management client is made to resume',
  ResumesUnsettled:
    "XEP-0198 resumes that went ahead after `SM_RESUME_SETTLE_MS` while the old stream had not finished routing a stanza it counted (its frame kept failing): the resumed stream's stanzas wait for it, at most `SM_RESUME_ORDER_MS`",
  SmResumesForced:
    "XEP-0198 sockets the server closed so that the client resumes and is sent exactly what its count lacks: `uncertain-post` (a post failed or went unanswered), `out-of-time` (a poster short of its invocation's time, or of its hold's lease), `lease` (a hold older than `SM_POSTER_LEASE_MS`), `redelivered` (a frame that may have posted part of its work), `uncertain-append`, `uncertain-entry` (`SM_POST_ORDER=checked`), `fenced` (a stream a resume took over)",
  SmUncertainResent:
    "XEP-0198 stanzas sent again on a resume because one's post failed, went unanswered or was never made (its frame failed after queueing it) while later ones went out: the client's count could not say whether it had them, so some may arrive twice, none is lost",
};
