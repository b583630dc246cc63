/**
 * XEP-0160 (Best Practices for Handling Offline Messages) with XEP-0334 hints and XEP-0203
 * delay stamps: what is stored for a user with no available resource, and the flood of
 * stored messages when a session sends initial presence with a non-negative priority.
 */
import { Element, parse } from 'ltx';
import { StanzaError } from '../errors.ts';
import { fullJid } from '../jid.ts';
import type { Router } from '../router.ts';
import type { Server } from '../server.ts';
import { type OfflineMessage, OfflineQuotaExceededError } from '../store/offline.ts';
import type { OfflineTransfer, ResourceRecord } from '../store/sessions.ts';
import type { Stream } from '../stream.ts';
import { NS } from '../xml/namespaces.ts';
import { deliveredCopy } from './offline.ts';
import { requestAckIfUnacknowledged } from './stream-management.ts';

export function register(router: Router): void {
  router.feature('msgoffline');
}

/**
 * XEP-0160 §3: messages of type normal and chat are stored; headline, groupchat and error are
 * not; chat-state-only messages are not worth storing. XEP-0334: `<no-store/>` refuses
 * storage, `<store/>` asks for it.
 */
/** Payloads that do not make a chat message worth storing on their own. */
const EPHEMERAL = new Set<string>([NS.chatStates, NS.hints]);

export function shouldStore(stanza: Element): boolean {
  const type = stanza.attrs.type ?? 'normal';
  if (type === 'error' || type === 'groupchat') return false;
  if (stanza.getChild('store', NS.hints)) return true;
  if (stanza.getChild('no-store', NS.hints) || stanza.getChild('no-permanent-store', NS.hints)) return false;
  if (type === 'headline') return false;
  // "Messages that contain only chat state notifications SHOULD NOT be stored": a chat
  // message with any other payload (a body, a receipt, a marker) is stored.
  if (type === 'chat') {
    return stanza
      .getChildElements()
      .some((child) => child.name !== 'thread' && !EPHEMERAL.has(child.attrs.xmlns ?? ''));
  }
  return true;
}

/** Stores the message for later, or drops it when it is not worth keeping. */
/**
 * `acceptedAt` marks a message the server accepted earlier (re-routed from an ended stream
 * session): it keeps that time as its stamp and is stored even past the quota, since
 * refusing it now would lose it.
 */
export async function storeIfWanted(
  server: Server,
  user: string,
  stanza: Element,
  acceptedAt?: number,
): Promise<void> {
  if (!shouldStore(stanza)) return;
  // Only our own delay stamp may appear on delivery: drop any that claims to be ours.
  for (const delay of stanza.getChildren('delay', NS.delay)) {
    if (delay.attrs.from === server.config.domain) stanza.remove(delay);
  }
  try {
    await server.offline.store(
      user,
      { from: stanza.attrs.from, storedAt: acceptedAt ?? Date.now(), stanza: stanza.toString() },
      { ignoreQuota: acceptedAt !== undefined },
    );
  } catch (error) {
    if (error instanceof OfflineQuotaExceededError) {
      throw new StanzaError('wait', 'resource-constraint', 'The recipient’s offline storage is full');
    }
    throw error;
  }
}

/** The stored stanza as it is delivered: with exactly one XEP-0203 delay of its arrival. */
export function stampedStanza(server: Server, message: OfflineMessage): Element {
  const stanza = parse(message.stanza);
  stanza.cnode(
    new Element('delay', {
      xmlns: NS.delay,
      from: server.config.domain,
      stamp: new Date(message.storedAt).toISOString(),
    }),
  );
  return stanza;
}

/**
 * Sends every stored message to the stream, oldest first, removing each only once delivery
 * is confirmed: a successful post, or with stream management the client's ack (the SM queue
 * remembers which offline message each stanza came from). XEP-0013 §2.1: no flood while a
 * session of the user asked for flexible offline retrieval.
 */
export async function floodOffline(stream: Stream, resources: ResourceRecord[]): Promise<void> {
  const { server } = stream;
  if (stream.state.flexibleOffline || resources.some((r) => r.flexibleOffline)) return;
  stream.update({ flooded: true });
  if (stream.state.sm) return startTransfer(stream, { kind: 'flood' });
  const user = stream.state.user as string;
  let after: string | undefined;
  for (;;) {
    const page = await server.offline.list(user, { limit: 50, after });
    const delivered: string[] = [];
    for (const message of page.messages) {
      if ((await stream.send(stampedStanza(server, message))) !== 'sent') break;
      delivered.push(message.id);
    }
    if (delivered.length > 0) await server.offline.remove(user, delivered);
    if (delivered.length < page.messages.length || !page.next) return;
    after = page.next;
  }
}

// ---------------------------------------------------------------------------------------------
// Transfers paced by stream-management acks
//
// A frame is handled to its end before the next frame of the same connection, so the
// client's <a/> cannot be read while one frame sends a whole inbox: the unacknowledged queue
// would overflow (SM_QUEUE_MAX, DynamoDB's 400 KB item) and end the stream every time. With
// stream management on, a flood or a XEP-0013 fetch therefore sends one window, asks for an
// ack, and sends the next window from the frame that carries the client's <a/>.

/** Largest batch before asking for an ack: by count and by bytes. */
const WINDOW_BYTES = 96 * 1024;

function windowSize(server: Server): number {
  return Math.max(1, Math.min(50, Math.floor(server.config.smQueueMax / 2)));
}

export async function startTransfer(stream: Stream, transfer: OfflineTransfer): Promise<void> {
  stream.update({ transfer });
  await transferStep(stream);
}

/** After an ack: the next window, once the client has caught up with half of the last one. */
export async function continueTransfer(stream: Stream, unacknowledged: number): Promise<void> {
  if (!stream.state.transfer || unacknowledged > windowSize(stream.server) / 2) return;
  await transferStep(stream);
}

async function transferStep(stream: Stream): Promise<void> {
  const { server } = stream;
  const transfer = stream.state.transfer as OfflineTransfer;
  const user = stream.state.user as string;
  const page = await server.offline.list(user, { limit: windowSize(server), after: transfer.after });
  let after = transfer.after;
  let bytes = 0;
  let sent = 0;
  for (const message of page.messages) {
    const result =
      transfer.kind === 'flood'
        ? await stream.send(stampedStanza(server, message), { offlineId: message.id })
        : await stream.send(deliveredCopy(server, message), { offlineCopy: true });
    if (result !== 'sent') return void stream.update({ transfer: undefined });
    after = message.id;
    sent += 1;
    bytes += Buffer.byteLength(message.stanza);
    if (bytes >= WINDOW_BYTES) break;
  }
  if (sent === page.messages.length && !page.next) {
    stream.update({ transfer: undefined });
    if (transfer.kind === 'fetch' && transfer.iqId !== undefined) {
      // XEP-0013 §2.5: the messages first, then the result.
      const result = new Element('iq', { type: 'result', id: transfer.iqId, to: fullJid(stream.jid) });
      if (transfer.iqFrom) result.attrs.from = transfer.iqFrom;
      await stream.send(result);
    }
  } else {
    stream.update({ transfer: { ...transfer, after } });
  }
  if (sent > 0) await requestAckIfUnacknowledged(stream);
}
