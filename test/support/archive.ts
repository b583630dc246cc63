/**
 * Helpers for the XEP-0136 end-to-end suites: accounts, raw logins, one iq and its reply (with
 * whatever the server sent before it), stanza error conditions.
 */
import { type Element, parse } from 'ltx';
import { RawClient } from '../../infra/local/raw-client.ts';
import type { TestStack } from './stack.ts';

export const ARCHIVE = 'http://jabber.org/protocol/archive';
export const RSM = 'http://jabber.org/protocol/rsm';
export const STANZAS = 'urn:ietf:params:xml:ns:xmpp-stanzas';
export const XMLENC = 'http://www.w3.org/2001/04/xmlenc#';
export const XMLDSIG = 'http://www.w3.org/2000/09/xmldsig#';

export class ArchiveWorld {
  private users = 0;
  readonly sockets: RawClient[] = [];

  constructor(readonly stack: TestStack) {}

  /** A fresh account (password `secret`); returns its bare JID. */
  async newUser(prefix: string): Promise<string> {
    this.users += 1;
    const jid = `${prefix}${this.users}@localhost`;
    await this.stack.addUser(jid, 'secret');
    return jid;
  }

  async connect(bare: string, resource: string): Promise<RawClient> {
    const raw = await RawClient.connect(this.stack.url);
    this.sockets.push(raw);
    await raw.login(bare.split('@')[0] as string, 'secret', resource);
    return raw;
  }

  /** Connects and sends initial presence (messages to the bare JID then reach it). */
  async online(bare: string, resource: string): Promise<RawClient> {
    const raw = await this.connect(bare, resource);
    raw.send('<presence/>');
    await raw.until((el) => el.name === 'presence');
    return raw;
  }

  closeAll(): void {
    for (const socket of this.sockets) socket.close();
  }
}

export interface Exchange {
  /** Everything the server sent before the reply, in order. */
  before: Element[];
  reply: Element;
  bytes: number;
}

let ids = 0;
/** Sends one iq (its id is made unique when it has none) and reads frames until its reply. */
export async function exchange(raw: RawClient, frame: string, timeoutMs = 10_000): Promise<Exchange> {
  const kind = frame.trimStart().startsWith('<message') ? 'message' : 'iq';
  let element = parse(frame);
  if (!element.attrs.id) {
    ids += 1;
    element = parse(frame.replace(/^<(iq|message)/, `<$1 id='a${ids}'`));
    frame = element.toString();
  }
  const id = element.attrs.id;
  raw.send(frame);
  const before: Element[] = [];
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = await raw.nextText(Math.max(1, deadline - Date.now()));
    const el = parse(text);
    if (el.name === kind && el.attrs.id === id && (el.attrs.type === 'result' || el.attrs.type === 'error'))
      return { before, reply: el, bytes: Buffer.byteLength(text) };
    before.push(el);
  }
}

/** The reply's payload, failing loudly with the error when there is one. */
export async function ok(raw: RawClient, frame: string): Promise<Element | undefined> {
  const { reply } = await exchange(raw, frame);
  if (reply.attrs.type !== 'result') throw new Error(`expected a result, got ${reply.toString()}`);
  return reply.getChildElements()[0];
}

export function errorCondition(reply: Element): string | undefined {
  return reply
    .getChild('error')
    ?.getChildElements()
    .find((c) => c.getNS() === STANZAS && c.name !== 'text')?.name;
}

export async function condition(raw: RawClient, frame: string): Promise<string | undefined> {
  const { reply } = await exchange(raw, frame);
  return reply.attrs.type === 'error' ? errorCondition(reply) : 'result';
}

/**
 * Sends a chat message, waits until the recipient has it, then waits for a ping round trip on
 * the sender's stream: its frames are processed in order, so the frame that routed (and
 * archived, for both sides) the message has finished.
 */
export async function chat(
  from: RawClient,
  to: RawClient,
  toJid: string,
  body: string,
  extra = '',
): Promise<Element> {
  from.send(`<message type='chat' to='${toJid}'><body>${body}</body>${extra}</message>`);
  const received = await to.until((el) => el.name === 'message' && el.getChildText('body') === body);
  await settled(from);
  return received;
}

/** A ping round trip: every frame the stream sent before it has been processed. */
export async function settled(raw: RawClient): Promise<void> {
  await exchange(raw, "<iq type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>");
}

/** The `<store/>` elements of a list reply. */
export function stores(list: Element | undefined): Element[] {
  return list?.getChildren('store') ?? [];
}

export function rsmOf(el: Element | undefined): {
  first?: string;
  index?: string;
  last?: string;
  count?: number;
} {
  const set = el?.getChild('set', RSM);
  if (!set) return {};
  const count = set.getChildText('count');
  return {
    first: set.getChildText('first') ?? undefined,
    index: set.getChild('first')?.attrs.index,
    last: set.getChildText('last') ?? undefined,
    count: count === null || count === undefined ? undefined : Number(count),
  };
}

/** XEP-0136 0.9 §3.2 "Client Requests Archiving Preferences". */
export const PREF_GET = `<iq type='get' id='pref1'><pref xmlns='${ARCHIVE}'/></iq>`;

/** The attributes (but `xmlns`) of each `name` child of a `<pref/>`. */
export function attrsOf(pref: Element | undefined, name: string): Record<string, string>[] {
  return (pref?.getChildren(name) ?? []).map((el) => {
    const { xmlns: _xmlns, ...attrs } = el.attrs as Record<string, string>;
    return attrs;
  });
}
