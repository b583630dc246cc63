/**
 * The fault suite's book of every numbered message: what each sender sent, what the server
 * acknowledged (XEP-0198 `<a h/>` or `<resumed h/>`) or accepted (no stream management: a later
 * ping on the same stream answered, and no error for the message before it), and every copy each
 * recipient received, in the order it arrived. `tally()` turns that into the figures the suite
 * prints: lost, duplicated, reordered.
 *
 * A message is counted by its sequence id (`<sender>-<seq>`), never by its copies: a client's
 * XEP-0198 resend of a stanza the server had not counted is the same message, so a resend the
 * server delivers once is fine, and one it delivers twice is a duplicate.
 *
 * Kept free of clients and servers so that a unit test can check the counting itself
 * (test/unit/fault-ledger.test.ts): a harness that counts wrong is worse than none.
 */

/** How a copy reached its recipient. */
export type Channel =
  /** A live message without a delay stamp. */
  | 'online'
  /** Carries the sending client's XEP-0203 delay: its XEP-0198 resend after a resume. */
  | 'resent'
  /** Carries the server's XEP-0203 delay: flooded from offline storage. */
  | 'offline';

export interface SentMessage {
  id: string;
  sender: string;
  recipient: string;
  seq: number;
  sentAt: number;
  /** The sender's stream (its n-th session or connection) the first sending used. */
  stream: number;
  /** Counted in an `<a h/>` or `<resumed h/>` the sender received (SM), or accepted (no SM). */
  acknowledged: boolean;
  acknowledgedAt?: number;
  /** The error condition the server answered with, if any (the message is then refused). */
  refused?: string;
  /** xmpp.js gave up on it: its session could not be resumed. */
  failed?: boolean;
}

export interface Receipt {
  id: string;
  /** The user whose client received it. */
  recipient: string;
  at: number;
  channel: Channel;
  /** Which of the recipient's streams, e.g. `bob#3`, or `bob#final` for the last login. */
  stream: string;
}

export interface Finding {
  kind: 'lost' | 'duplicated' | 'reordered' | 'misrouted' | 'refused-but-delivered';
  id: string;
  message: SentMessage | undefined;
  receipts: Receipt[];
  /** For a reordered message: the id that arrived before it although sent after it. */
  after?: string;
}

export interface Tally {
  /** Messages sent (each sequence id once). */
  messages: number;
  acknowledged: number;
  delivered: number;
  lost: Finding[];
  duplicated: Finding[];
  reordered: Finding[];
  /** Not part of L/D/R, but worth reading: copies at the wrong user, delivered refusals. */
  anomalies: Finding[];
}

export function messageId(sender: string, seq: number): string {
  return `${sender}-${seq}`;
}

export function messageBody(sender: string, seq: number): string {
  return `${sender} ${seq}`;
}

/** The id in a body made by `messageBody`, or undefined for anything else. */
export function idOfBody(body: string | null | undefined): string | undefined {
  const match = /^([a-z]+) (\d+)$/.exec(body ?? '');
  return match ? messageId(match[1], Number(match[2])) : undefined;
}

export class Ledger {
  private readonly sent = new Map<string, SentMessage>();
  private readonly receipts: Receipt[] = [];
  /** Things the clients saw that break a rule even if no message suffers (an `h` too high…). */
  readonly notes: string[] = [];
  /** XEP-0198 acks from the server counting more stanzas than the client sent (participant.ts). */
  readonly overcounts: string[] = [];

  /** Records a sending; a resend of the same id keeps the first record. */
  send(message: Omit<SentMessage, 'id' | 'acknowledged'>): SentMessage {
    const id = messageId(message.sender, message.seq);
    const existing = this.sent.get(id);
    if (existing) return existing;
    const record: SentMessage = { ...message, id, acknowledged: false };
    this.sent.set(id, record);
    return record;
  }

  get(id: string): SentMessage | undefined {
    return this.sent.get(id);
  }

  acknowledge(id: string, at = Date.now()): void {
    const message = this.sent.get(id);
    if (message === undefined || message.acknowledged) return;
    message.acknowledged = true;
    message.acknowledgedAt = at;
  }

  refuse(id: string, condition: string): void {
    const message = this.sent.get(id);
    if (message !== undefined) message.refused ??= condition;
  }

  fail(id: string): void {
    const message = this.sent.get(id);
    if (message !== undefined) message.failed = true;
  }

  receive(receipt: Receipt): void {
    this.receipts.push(receipt);
  }

  messages(): SentMessage[] {
    return [...this.sent.values()];
  }

  receiptsOf(id: string): Receipt[] {
    return this.receipts.filter((receipt) => receipt.id === id);
  }

  tally(): Tally {
    const byId = new Map<string, Receipt[]>();
    for (const receipt of this.receipts) {
      const list = byId.get(receipt.id);
      if (list) list.push(receipt);
      else byId.set(receipt.id, [receipt]);
    }
    const lost: Finding[] = [];
    const duplicated: Finding[] = [];
    const anomalies: Finding[] = [];
    let acknowledged = 0;
    let delivered = 0;

    for (const [id, receipts] of byId) {
      const message = this.sent.get(id);
      const atRecipient = receipts.filter((receipt) => receipt.recipient === message?.recipient);
      if (atRecipient.length < receipts.length) {
        anomalies.push({ kind: 'misrouted', id, message, receipts });
      }
      if (atRecipient.length > 1) duplicated.push({ kind: 'duplicated', id, message, receipts: atRecipient });
      if (atRecipient.length > 0) {
        delivered += 1;
        if (message?.refused) anomalies.push({ kind: 'refused-but-delivered', id, message, receipts });
      }
    }
    for (const message of this.sent.values()) {
      if (!message.acknowledged) continue;
      acknowledged += 1;
      if (message.refused) continue;
      const receipts = (byId.get(message.id) ?? []).filter((r) => r.recipient === message.recipient);
      if (receipts.length === 0) lost.push({ kind: 'lost', id: message.id, message, receipts: [] });
    }
    return {
      messages: this.sent.size,
      acknowledged,
      delivered,
      lost,
      duplicated,
      reordered: this.reordered(),
      anomalies,
    };
  }

  /**
   * Per sender and recipient, the first copies of the acknowledged messages in the order they
   * arrived: each one sent before a message that arrived ahead of it is reordered. Messages that
   * were never acknowledged may be lost, so they are left out rather than judged.
   */
  private reordered(): Finding[] {
    const findings: Finding[] = [];
    const seen = new Set<string>();
    const highest = new Map<string, { seq: number; id: string }>();
    for (const receipt of this.receipts) {
      if (seen.has(receipt.id)) continue;
      seen.add(receipt.id);
      const message = this.sent.get(receipt.id);
      if (message === undefined || !message.acknowledged || message.recipient !== receipt.recipient) continue;
      const route = `${message.sender}>${message.recipient}`;
      const top = highest.get(route);
      if (top !== undefined && message.seq < top.seq) {
        findings.push({
          kind: 'reordered',
          id: message.id,
          message,
          receipts: this.receiptsOf(message.id),
          after: top.id,
        });
      } else {
        highest.set(route, { seq: message.seq, id: message.id });
      }
    }
    return findings;
  }
}
