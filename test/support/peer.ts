/**
 * A raw client that keeps everything it received: tests wait for a stanza (each is taken once),
 * count what arrived, and put up a ping barrier (the server answers a ping only after every
 * frame sent before it was handled) to assert that something did not arrive. No fixed sleeps.
 */
import type { Element } from 'ltx';
import { RawClient } from '../../infra/local/raw-client.ts';

export type Match = (stanza: Element) => boolean;

export class Peer {
  /** Every element received, in order. */
  readonly log: Element[] = [];
  private readonly untaken: Element[] = [];
  private barriers = 0;

  private constructor(
    readonly raw: RawClient,
    readonly jid: string,
  ) {}

  static async login(url: string, user: string, password: string, resource: string): Promise<Peer> {
    const raw = await RawClient.connect(url);
    const jid = await raw.login(user, password, resource);
    return new Peer(raw, jid);
  }

  get bare(): string {
    return this.jid.split('/')[0] as string;
  }

  send(frame: string): void {
    this.raw.send(frame);
  }

  private async receive(timeoutMs: number): Promise<Element> {
    const element = await this.raw.next(timeoutMs);
    this.log.push(element);
    this.untaken.push(element);
    return element;
  }

  /** The first received stanza matching, not taken before; waits for it if needed. */
  async waitFor(match: Match, timeoutMs = 5000): Promise<Element> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const index = this.untaken.findIndex(match);
      if (index >= 0) return this.untaken.splice(index, 1)[0] as Element;
      const remaining = deadline - Date.now();
      if (remaining <= 0) {
        throw new Error(`${this.jid}: no matching stanza; got\n${this.log.map(String).join('\n')}`);
      }
      try {
        await this.receive(remaining);
      } catch (error) {
        throw new Error(`${this.jid}: ${(error as Error).message}; got\n${this.log.map(String).join('\n')}`);
      }
    }
  }

  /** Sends a ping to the server and waits for its answer: whatever was sent before has arrived. */
  async barrier(): Promise<void> {
    const id = `barrier-${++this.barriers}`;
    this.send(`<iq type='get' id='${id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>`);
    await this.waitFor((el) => el.name === 'iq' && el.attrs.id === id && el.attrs.type === 'result');
  }

  /** How many of everything received so far match. */
  count(match: Match): number {
    return this.log.filter(match).length;
  }

  /** Sends an iq and waits for its answer. */
  async iq(frame: string, id: string): Promise<Element> {
    this.send(frame);
    return this.waitFor((el) => el.name === 'iq' && el.attrs.id === id && el.attrs.type !== 'set');
  }

  close(): void {
    this.raw.close();
  }
}
