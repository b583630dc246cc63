/**
 * XEP-0160 (Best Practices for Handling Offline Messages) with XEP-0334 hints and XEP-0203
 * delay stamps: what is stored for a user with no available resource, and the flood of
 * stored messages when a session sends initial presence with a non-negative priority.
 */
import { Element, parse } from 'ltx';
import { StanzaError } from '../errors.ts';
import type { Router } from '../router.ts';
import type { Server } from '../server.ts';
import { type OfflineMessage, OfflineQuotaExceededError } from '../store/offline.ts';
import type { ResourceRecord } from '../store/sessions.ts';
import type { Stream } from '../stream.ts';
import { NS } from '../xml/namespaces.ts';
import { requestAckIfUnacknowledged } from './stream-management.ts';

export function register(router: Router): void {
  router.feature('msgoffline');
}

/**
 * XEP-0160 §3: messages of type normal and chat are stored; headline, groupchat and error are
 * not; chat-state-only messages are not worth storing. XEP-0334: `<no-store/>` refuses
 * storage, `<store/>` asks for it.
 */
export function shouldStore(stanza: Element): boolean {
  const type = stanza.attrs.type ?? 'normal';
  if (type === 'error' || type === 'groupchat') return false;
  if (stanza.getChild('store', NS.hints)) return true;
  if (stanza.getChild('no-store', NS.hints) || stanza.getChild('no-permanent-store', NS.hints)) return false;
  if (type === 'headline') return false;
  if (type === 'chat') return stanza.getChild('body') !== undefined;
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
  const user = stream.state.user as string;
  let after: string | undefined;
  for (;;) {
    const page = await server.offline.list(user, { limit: 50, after });
    const delivered: string[] = [];
    for (const message of page.messages) {
      if ((await stream.send(stampedStanza(server, message), { offlineId: message.id })) !== 'sent') return;
      if (!stream.state.sm) delivered.push(message.id);
    }
    if (delivered.length > 0) await server.offline.remove(user, delivered);
    if (!page.next) {
      // With SM these stay stored until acknowledged: ask now rather than at the next batch.
      if (stream.state.sm && page.messages.length > 0) await requestAckIfUnacknowledged(stream);
      return;
    }
    after = page.next;
  }
}
