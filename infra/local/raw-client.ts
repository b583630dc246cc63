/**
 * A raw RFC 7395 (XMPP over WebSocket) client for driving a local stack frame by frame: the
 * wire-level tests ("send this frame, expect that frame") and the bench use it. It speaks just
 * enough to get a bound stream (`login`) and otherwise sends and reads frames as they are.
 */
import { randomBytes } from 'node:crypto';
import { type Element, parse } from 'ltx';
import WebSocket from 'ws';

export class RawClient {
  private readonly frames: string[] = [];
  private waiters: Array<() => void> = [];
  private barriers = 0;
  readonly closed: Promise<{ code: number; reason: string }>;
  isClosed = false;

  private constructor(readonly socket: WebSocket) {
    socket.on('message', (data) => {
      this.frames.push(data.toString());
      this.wake();
    });
    this.closed = new Promise((resolve) => {
      socket.on('close', (code, reason) => {
        this.isClosed = true;
        this.wake();
        resolve({ code, reason: reason.toString() });
      });
    });
  }

  private wake(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }

  /**
   * `localAddress` connects from another loopback address (127.0.0.2, …): API Gateway's
   * `identity.sourceIp`, as the gateway emulator reports it, is the socket's remote address.
   */
  static connect(url: string, protocols: string[] = ['xmpp'], localAddress?: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(url, protocols, localAddress ? { localAddress } : {});
      const client = new RawClient(socket);
      socket.once('open', () => resolve(client));
      socket.once('error', reject);
    });
  }

  send(frame: string): void {
    this.socket.send(frame);
  }

  /** The next frame the server sent, as text. */
  async nextText(timeoutMs = 5000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    while (this.frames.length === 0) {
      if (this.isClosed) throw new Error('socket closed while waiting for a frame');
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new Error(`no frame within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, remaining);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    return this.frames.shift() as string;
  }

  async next(timeoutMs?: number): Promise<Element> {
    return parse(await this.nextText(timeoutMs));
  }

  /** Skips frames until one matches; returns it. */
  async until(match: (el: Element) => boolean, timeoutMs = 5000): Promise<Element> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const el = await this.next(Math.max(1, deadline - Date.now()));
      if (match(el)) return el;
    }
  }

  /**
   * Every frame the server sent before its answer to a ping sent now, as text. The server
   * handles one connection's frames in order and a socket delivers in order, so whatever this
   * connection's earlier frames caused arrives before the pong: `expect(await
   * client.framesBeforePong()).toEqual([])` asserts that nothing was sent, without waiting a
   * fixed time. For what another connection's frames may cause, wait until those are handled
   * first (`stack.gateway.drained()`).
   */
  async framesBeforePong(timeoutMs = 5000): Promise<string[]> {
    // Unique across clients and streams: after a resume, the old stream's pong (replayed, same
    // session) must not pass for this one.
    const id = `pong-barrier-${++this.barriers}-${randomBytes(4).toString('hex')}`;
    this.send(`<iq type='get' id='${id}'><ping xmlns='urn:xmpp:ping'/></iq>`);
    const before: string[] = [];
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const text = await this.nextText(Math.max(1, deadline - Date.now()));
      const frame = parse(text);
      if (frame.name === 'iq' && frame.attrs.id === id) {
        if (frame.attrs.type !== 'result') throw new Error(`ping answered with ${text}`);
        return before;
      }
      before.push(text);
    }
  }

  pending(): string[] {
    return [...this.frames];
  }

  close(): void {
    this.socket.close();
  }

  terminate(): void {
    this.socket.terminate();
  }

  /** Opens the stream and reads the `<open/>` and features frames. */
  async open(domain = 'localhost'): Promise<{ open: Element; features: Element }> {
    this.send(`<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='${domain}' version='1.0'/>`);
    const open = await this.next();
    const features = await this.next();
    return { open, features };
  }

  /** PLAIN login, stream restart and bind; returns the bound full JID. */
  async login(user: string, password: string, resource?: string, domain = 'localhost'): Promise<string> {
    await this.open(domain);
    const payload = Buffer.from(`\0${user}\0${password}`).toString('base64');
    this.send(`<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>${payload}</auth>`);
    const success = await this.next();
    if (success.name !== 'success') throw new Error(`login failed: ${success.toString()}`);
    await this.open(domain);
    const resourceXml = resource ? `<resource>${resource}</resource>` : '';
    this.send(
      `<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>${resourceXml}</bind></iq>`,
    );
    const bound = await this.next();
    const jid = bound.getChild('bind')?.getChildText('jid');
    if (!jid) throw new Error(`bind failed: ${bound.toString()}`);
    return jid;
  }
}
