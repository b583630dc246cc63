/**
 * The fault suite's counting (test/faults/ledger.ts): lost, duplicated and reordered must mean
 * exactly what the README says, or the suite's figures mean nothing.
 */
import { describe, expect, it } from 'vitest';
import { type Channel, idOfBody, Ledger, messageBody } from '../faults/ledger.ts';

function sent(ledger: Ledger, sender: string, recipient: string, seqs: number[], acknowledged = true): void {
  for (const seq of seqs) {
    ledger.send({ sender, recipient, seq, sentAt: seq, stream: 1 });
    if (acknowledged) ledger.acknowledge(`${sender}-${seq}`);
  }
}

function received(ledger: Ledger, recipient: string, ids: string[], channel: Channel = 'online'): void {
  for (const id of ids) ledger.receive({ id, recipient, at: 0, channel, stream: `${recipient}#1` });
}

describe('fault ledger', () => {
  it('reads back the ids it writes into bodies, and nothing else', () => {
    expect(idOfBody(messageBody('alice', 17))).toBe('alice-17');
    expect(idOfBody('alice 17 and more')).toBeUndefined();
    expect(idOfBody(undefined)).toBeUndefined();
  });

  it('counts nothing when every acknowledged message arrives once, in order', () => {
    const ledger = new Ledger();
    sent(ledger, 'alice', 'bob', [1, 2, 3]);
    received(ledger, 'bob', ['alice-1', 'alice-2']);
    received(ledger, 'bob', ['alice-3'], 'offline');
    const tally = ledger.tally();
    expect(tally).toMatchObject({ messages: 3, acknowledged: 3, delivered: 3 });
    expect([tally.lost, tally.duplicated, tally.reordered]).toEqual([[], [], []]);
  });

  it('counts an acknowledged message that never arrived as lost, an unacknowledged one not', () => {
    const ledger = new Ledger();
    sent(ledger, 'alice', 'bob', [1, 2]);
    sent(ledger, 'alice', 'bob', [3], false);
    received(ledger, 'bob', ['alice-1']);
    expect(ledger.tally().lost.map((finding) => finding.id)).toEqual(['alice-2']);
  });

  it('counts a message refused with an error as not owed, and its delivery as an anomaly', () => {
    const ledger = new Ledger();
    sent(ledger, 'alice', 'bob', [1, 2]);
    ledger.refuse('alice-1', 'internal-server-error');
    ledger.refuse('alice-2', 'internal-server-error');
    received(ledger, 'bob', ['alice-2']);
    const tally = ledger.tally();
    expect(tally.lost).toEqual([]);
    expect(tally.anomalies.map((finding) => [finding.kind, finding.id])).toEqual([
      ['refused-but-delivered', 'alice-2'],
    ]);
  });

  it('counts a message delivered twice once, acknowledged or not, whatever the channels', () => {
    const ledger = new Ledger();
    sent(ledger, 'alice', 'bob', [1]);
    sent(ledger, 'alice', 'bob', [2], false);
    received(ledger, 'bob', ['alice-1', 'alice-2']);
    received(ledger, 'bob', ['alice-1', 'alice-1', 'alice-2'], 'resent');
    const tally = ledger.tally();
    expect(tally.duplicated.map((finding) => [finding.id, finding.receipts.length])).toEqual([
      ['alice-1', 3],
      ['alice-2', 2],
    ]);
    expect(tally.messages).toBe(2);
  });

  it('counts a client resend of the same sequence id as one message', () => {
    const ledger = new Ledger();
    ledger.send({ sender: 'alice', recipient: 'bob', seq: 1, sentAt: 1, stream: 1 });
    ledger.send({ sender: 'alice', recipient: 'bob', seq: 1, sentAt: 5, stream: 2 });
    ledger.acknowledge('alice-1');
    received(ledger, 'bob', ['alice-1'], 'resent');
    const tally = ledger.tally();
    expect(tally.messages).toBe(1);
    expect(ledger.get('alice-1')?.stream).toBe(1);
    expect([tally.lost, tally.duplicated]).toEqual([[], []]);
  });

  it('counts reordering per sender and recipient, by first copies of acknowledged messages', () => {
    const ledger = new Ledger();
    sent(ledger, 'alice', 'bob', [1, 2, 3, 4]);
    sent(ledger, 'alice', 'bob', [5], false);
    sent(ledger, 'carol', 'bob', [1, 2]);
    // alice-3 overtakes alice-2 (one reordered); a later copy of alice-1 changes nothing;
    // the unacknowledged alice-5 first is not judged; carol's messages are another route.
    received(ledger, 'bob', ['alice-5', 'carol-2', 'alice-1', 'alice-3', 'alice-2', 'alice-1', 'alice-4']);
    received(ledger, 'bob', ['carol-1']);
    const reordered = ledger.tally().reordered.map((finding) => [finding.id, finding.after]);
    expect(reordered).toEqual([
      ['alice-2', 'alice-3'],
      ['carol-1', 'carol-2'],
    ]);
  });

  it('reports a copy at the wrong user as misrouted, and still owes it to its recipient', () => {
    const ledger = new Ledger();
    sent(ledger, 'alice', 'bob', [1]);
    received(ledger, 'dave', ['alice-1']);
    const tally = ledger.tally();
    expect(tally.anomalies.map((finding) => finding.kind)).toEqual(['misrouted']);
    expect(tally.lost.map((finding) => finding.id)).toEqual(['alice-1']);
  });
});
