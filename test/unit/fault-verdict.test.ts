/**
 * The fault suite's verdict (test/faults/verdict.ts): which findings and problems of a schedule
 * fail the run. A defect the suite prints but passes is a defect hidden.
 */
import { describe, expect, it } from 'vitest';
import type { Finding, Tally } from '../faults/ledger.ts';
import { failuresOf, type Problem, type VerdictInput } from '../faults/verdict.ts';

function finding(kind: Finding['kind'], id: string): Finding {
  return { kind, id, message: undefined, receipts: [] };
}

function clean(): VerdictInput['tally'] {
  return { delivered: 10, lost: [], duplicated: [], reordered: [], anomalies: [] };
}

function verdict(tally: Partial<Tally>, problems: Problem[] = [], selfCheck = false): string[] {
  return failuresOf({ tally: { ...clean(), ...tally }, problems, selfCheck });
}

describe('fault verdict', () => {
  it('passes a schedule that delivered messages and found nothing', () => {
    expect(verdict({})).toEqual([]);
  });

  it('fails on anything lost, duplicated or reordered', () => {
    expect(verdict({ lost: [finding('lost', 'alice-1')] })).toEqual(['1 lost']);
    expect(
      verdict({ duplicated: [finding('duplicated', 'alice-1'), finding('duplicated', 'bob-2')] }),
    ).toEqual(['2 duplicated']);
    expect(verdict({ reordered: [finding('reordered', 'alice-2')] })).toEqual(['1 reordered']);
  });

  it('fails on a misrouted copy and on a refused message delivered, each named', () => {
    expect(verdict({ anomalies: [finding('misrouted', 'alice-1')] })).toEqual(['1 misrouted']);
    expect(verdict({ anomalies: [finding('refused-but-delivered', 'alice-1')] })).toEqual([
      '1 refused but delivered',
    ]);
    expect(
      verdict({
        anomalies: [finding('misrouted', 'alice-1'), finding('refused-but-delivered', 'bob-3')],
        lost: [finding('lost', 'carol-4')],
      }),
    ).toEqual(['1 lost', '1 misrouted', '1 refused but delivered']);
  });

  it('fails a schedule that delivered nothing: 0/0/0 of nothing proves nothing', () => {
    expect(verdict({ delivered: 0 })).toEqual(['no message delivered: the schedule exercised nothing']);
  });

  it('fails on frames stuck after the clients closed and on a stack that does not close', () => {
    expect(
      verdict({}, [{ kind: 'queue-stuck', text: 'the queue did not drain after the clients closed' }]),
    ).toEqual(['the queue did not drain after the clients closed']);
    expect(verdict({}, [{ kind: 'stack-hung', text: 'the stack did not close in 30 s' }])).toEqual([
      'the stack did not close in 30 s',
    ]);
  });

  it('fails on a server h above what the client sent: it acknowledged stanzas it never received', () => {
    // XEP-0198 §4: "The value of 'h' is then incremented to one for the first stanza handled and
    // incremented by one again with each subsequent stanza handled": an h above what the client
    // sent counts stanzas the server never handled.
    const text = "alice: server's <a h='7'/> counts more than the client sent (5 acknowledged + 1 queued)";
    expect(verdict({}, [{ kind: 'sm-overcount', text }])).toEqual([text]);
  });

  it('does not fail a faulty schedule on what a persistent DynamoDB storm may cause', () => {
    const problems: Problem[] = [
      { kind: 'offline', text: 'bob stayed offline; it sent 55 of 105' },
      { kind: 'sm-not-enabled', text: 'bob: stream management never enabled' },
      { kind: 'acks-unsettled', text: 'acknowledgements did not settle' },
      { kind: 'queue-busy', text: 'the queue did not drain before the clients closed' },
      { kind: 'final-login', text: 'final login of bob: timed out' },
    ];
    expect(verdict({}, problems)).toEqual([]);
  });

  it('fails the self-check on any problem: without faults nothing excuses one', () => {
    expect(verdict({}, [{ kind: 'offline', text: 'bob never came online' }], true)).toEqual([
      'bob never came online',
    ]);
  });
});
