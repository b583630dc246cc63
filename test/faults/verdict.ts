/**
 * Whether one schedule of the fault suite passed, and if not why: kept apart from the clients
 * and the server, like the ledger, so that a unit test can check it
 * (test/unit/fault-verdict.test.ts). A suite that prints a defect and exits 0 hides it.
 *
 * A schedule fails on:
 * - a message lost, duplicated or reordered (the ledger's figures);
 * - a copy at the wrong user (`misrouted`) or a message delivered although the server refused it
 *   with an error (`refused-but-delivered`): the server broke its word, whatever the counts say;
 * - no message delivered at all: nothing was exercised, and 0/0/0 would then mean nothing;
 * - a problem of the run that only the server explains (`SERVER_DEFECTS`): frames still in the
 *   queue a minute after every client closed, a stack that does not close, or an XEP-0198 `h`
 *   from the server above what the client sent.
 *
 * The other problems are printed and do not fail the schedule: a client that stayed offline, an
 * `<enable/>` refused, acknowledgements or a queue that did not settle while the clients were
 * still there, a final login that gave up. A persistent DynamoDB storm causes them on a busy
 * machine (docs/fault-runs.md: "bob stayed offline; it sent 55 of 105"), and whatever a message
 * suffers from them is counted as lost or duplicated anyway. In the self-check there is no fault
 * to blame, so every problem fails it.
 */
import type { Tally } from './ledger.ts';

export type ProblemKind =
  /** A client never came online, stayed offline while it had messages to send, or did not come back. */
  | 'offline'
  /** An XEP-0198 client's `<enable/>` never got `<enabled/>`. */
  | 'sm-not-enabled'
  /** An XEP-0198 client still had unacknowledged stanzas after the settle timeout. */
  | 'acks-unsettled'
  /** The frame queue was not empty after the drain timeout, the clients still connected. */
  | 'queue-busy'
  /** The frame queue was not empty after the drain timeout, every client closed: frames stuck. */
  | 'queue-stuck'
  /** A final login gave up (what it should have received is counted as lost). */
  | 'final-login'
  /** The stack did not close: something in it never settles. */
  | 'stack-hung'
  /**
   * The server's `<a h/>` or `<resumed h/>` counted more stanzas than the client sent (XEP-0198
   * §4): it acknowledged what it never received, so the client dropped it from its queue.
   */
  | 'sm-overcount';

export interface Problem {
  kind: ProblemKind;
  text: string;
}

/** The problems that fail a schedule with faults: nothing but the server explains them. */
export const SERVER_DEFECTS: ReadonlySet<ProblemKind> = new Set<ProblemKind>([
  'queue-stuck',
  'stack-hung',
  'sm-overcount',
]);

export interface VerdictInput {
  tally: Pick<Tally, 'delivered' | 'lost' | 'duplicated' | 'reordered' | 'anomalies'>;
  problems: readonly Problem[];
  /** The self-check: no faults, no kills. */
  selfCheck: boolean;
}

/** Why the schedule failed, one reason a line; empty when it passed. */
export function failuresOf(run: VerdictInput): string[] {
  const { tally } = run;
  const failures: string[] = [];
  const counted = (count: number, what: string) => {
    if (count > 0) failures.push(`${count} ${what}`);
  };
  counted(tally.lost.length, 'lost');
  counted(tally.duplicated.length, 'duplicated');
  counted(tally.reordered.length, 'reordered');
  counted(tally.anomalies.filter((finding) => finding.kind === 'misrouted').length, 'misrouted');
  counted(
    tally.anomalies.filter((finding) => finding.kind === 'refused-but-delivered').length,
    'refused but delivered',
  );
  if (tally.delivered === 0) failures.push('no message delivered: the schedule exercised nothing');
  for (const problem of run.problems) {
    if (run.selfCheck || SERVER_DEFECTS.has(problem.kind)) failures.push(problem.text);
  }
  return failures;
}
