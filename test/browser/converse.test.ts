/**
 * A real browser against the local stack (issue 10, "Real browser test"): the npm `converse.js`
 * package's dist/ as it is, in Debian's headless Chromium driven by playwright-core, logs in as
 * alice; bob is a stock xmpp.js client. Login, a mutual subscription shown in the roster,
 * messages both ways, and a XEP-0198 resume after the page's connection is cut, with the message
 * sent during the outage shown exactly once.
 *
 * Run with `npm run test:browser`. Steps run in order and build on each other; a failing step
 * leaves a screenshot and the page's console errors behind (printed with the failure).
 */
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { xml } from '@xmpp/client';
import type { Element } from 'ltx';
import type { Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eventually } from '../support/eventually.ts';
import { startTestStack, type TestStack } from '../support/stack.ts';
import { type StartedClient, startClient } from '../support/xmpp-client.ts';
import { type LaunchedChromium, launchChromium } from './chromium.ts';
import { type ConverseSite, startConverseSite } from './converse-site.ts';
import { type SeverableLink, startSeverableLink } from './severable-link.ts';

const ALICE = 'alice@localhost';
const ALICE_RESOURCE = 'browser';
const BOB = 'bob@localhost';
const RESUMED = /^<resumed\b[^>]*urn:xmpp:sm:3/;

let stack: TestStack;
let link: SeverableLink;
let site: ConverseSite;
let chromium: LaunchedChromium;
let page: Page;
let bob: StartedClient;
let artifacts: string;

/** What the page printed as errors, and what it tried to fetch from outside. */
const consoleErrors: string[] = [];
const blockedRequests: string[] = [];
const failedResponses: string[] = [];
interface SocketRecord {
  url: string;
  frames: Array<{ direction: 'sent' | 'received'; payload: string }>;
  closed: boolean;
}
/** Every WebSocket the page opened, with its frames in order. */
const sockets: SocketRecord[] = [];
/**
 * Everything in one timeline: each frame both ways, every console line (Converse's debug log and
 * the probe's events included) and step boundaries; written to trace.log next to the screenshots.
 */
const trace: string[] = [];
const started = Date.now();
function traceLine(line: string): void {
  trace.push(`${String(Date.now() - started).padStart(7)}ms ${line}`);
}

function hasFrame(
  socket: SocketRecord | undefined,
  direction: 'sent' | 'received',
  pattern: RegExp,
): boolean {
  return !!socket?.frames.some((frame) => frame.direction === direction && pattern.test(frame.payload));
}

/**
 * Why Converse 14 cannot open or show a chat with `jid`, or undefined when it can. Converse
 * creates every one-to-one chat (opened by the user, or by an incoming message) through
 * `setModelContact` (src/headless/shared/model-with-contact.js): for a JID that is not in the
 * roster it awaits `api.blocklist.get()`, i.e. the `blocklistInitialized` promise, and the
 * blocklist plugin (src/headless/plugins/blocklist/plugin.js) creates the blocklist, which
 * resolves that promise, only when the server advertises XEP-0191 `urn:xmpp:blocking`.
 * Without it `api.chats.open` never returns (the "Start a new chat" dialog stays open) and an
 * incoming message is dropped without a trace. So a chat with a non-contact needs XEP-0191 on
 * the server; a chat with a contact (step 2) does not.
 */
async function chatBlocker(jid: string): Promise<string | undefined> {
  const state = await page.evaluate(
    async ({ jid, domain }) => {
      type Api = {
        contacts: { get(jid: string): Promise<unknown> };
        disco: { supports(feature: string, jid: string): Promise<boolean> };
      };
      const probe = (window as unknown as { nimbusProbe?: { api: Api } }).nimbusProbe;
      if (!probe) return undefined;
      const { api } = probe;
      // Both wait for Converse (the roster fetched, the server's disco#info): unknown after 5 s.
      const answer = Promise.all([api.contacts.get(jid), api.disco.supports('urn:xmpp:blocking', domain)]);
      const late = new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), 5000));
      const result = await Promise.race([answer, late]);
      return result && { contact: !!result[0], blocking: result[1] };
    },
    { jid, domain: jid.split('@')[1] ?? '' },
  );
  if (!state || state.contact || state.blocking) return undefined;
  return (
    `${jid} is not in the roster and the server does not advertise XEP-0191 (urn:xmpp:blocking): ` +
    `Converse 14 waits for its blocklist (blocklistInitialized) before it creates a chat with a ` +
    `non-contact, so it would never open the chat nor show a message from ${jid}. Step 2 (the ` +
    `roster) or XEP-0191 on the server is needed first.`
  );
}

/** The names of Converse's promises (`rosterContactsFetched`, …) not resolved yet, from the probe plugin. */
async function pendingConversePromises(): Promise<string[]> {
  const states = await page
    ?.evaluate(() =>
      (window as unknown as { nimbusProbe?: { promises(): Record<string, string> } }).nimbusProbe?.promises(),
    )
    .catch(() => undefined);
  return Object.entries(states ?? {})
    .filter(([, state]) => state !== 'resolved')
    .map(([name, state]) => (state === 'pending' ? name : `${name} (${state})`));
}

/** A scenario step: on failure, a screenshot and the page's console errors come with the error. */
function step(name: string, body: () => Promise<void>, timeoutMs?: number): void {
  it(
    name,
    async () => {
      traceLine(`=== step ${name}`);
      try {
        await body();
      } catch (error) {
        const file = join(artifacts, `${name.replace(/[^a-z0-9]+/gi, '-').slice(0, 60)}.png`);
        await page?.screenshot({ path: file, fullPage: true }).catch(() => {});
        const pending = await pendingConversePromises();
        const details = [
          `screenshot: ${file}`,
          `Converse promises still pending: ${pending.join(', ') || '(none)'}`,
          `console errors (${consoleErrors.length}):`,
          ...consoleErrors.slice(-20).map((line) => `  ${line}`),
          ...(blockedRequests.length ? ['blocked outside requests:', ...blockedRequests] : []),
          ...(failedResponses.length ? ['failed local requests:', ...failedResponses] : []),
          `websockets: ${sockets.length}; frames of the last one:`,
          ...(sockets.at(-1)?.frames.slice(-15) ?? []).map(
            (frame) => `  ${frame.direction === 'sent' ? '>' : '<'} ${frame.payload.slice(0, 300)}`,
          ),
        ];
        traceLine(`=== step failed: ${name}: ${String(error).split('\n')[0]}`);
        process.stdout.write(`\n[browser] step failed: ${name}\n${details.join('\n')}\n`);
        if (error instanceof Error) error.message += `\n${details.join('\n')}`;
        throw error;
      }
    },
    timeoutMs,
  );
}

function isChatFrom(from: string, body: string) {
  return (stanza: Element) =>
    stanza.is('message') && stanza.attrs.from?.startsWith(from) && stanza.getChildText('body') === body;
}

async function sendChat(to: string, body: string): Promise<void> {
  await bob.xmpp.send(xml('message', { to, type: 'chat', id: `m${Date.now()}` }, xml('body', {}, body)));
}

/** The chat message elements whose text is exactly `text`. */
function shownMessages(text: string) {
  return page.locator('converse-chat-message .chat-msg__text', { hasText: text });
}

async function aliceSmId(): Promise<string> {
  const resource = await stack.server.sessions.getResource(ALICE, ALICE_RESOURCE);
  if (!resource?.smId) throw new Error(`${ALICE}/${ALICE_RESOURCE} has no stream-management session`);
  return resource.smId;
}

beforeAll(async () => {
  artifacts = await mkdtemp(join(tmpdir(), 'nimbus-browser-'));
  stack = await startTestStack({ SM_MAX_SECONDS: '300' });
  await stack.addUser(ALICE, 'alice-secret');
  await stack.addUser(BOB, 'bob-secret');
  link = await startSeverableLink(stack.url);
  site = await startConverseSite({
    websocket_url: link.url,
    jid: `${ALICE}/${ALICE_RESOURCE}`,
    password: 'alice-secret',
    auto_login: true,
    auto_reconnect: true,
    view_mode: 'fullscreen',
    discover_connection_methods: false,
    enable_smacks: true,
    // Messages from a JID that is not a contact are shown (Converse's default is to drop them).
    // This alone does not make steps 3–5 independent of step 2: see chatBlocker().
    allow_non_roster_messaging: true,
    // Nothing from outside: no twemoji CDN, no locale downloads, no sounds or notifications.
    use_system_emojis: true,
    i18n: 'en',
    play_sounds: false,
    show_desktop_notifications: false,
    // NIMBUS_CONVERSE_LOGLEVEL=debug puts Converse's own log (every stanza, every step) in trace.log.
    loglevel: process.env.NIMBUS_CONVERSE_LOGLEVEL ?? 'info',
  });

  // bob, the second client, grants any subscription request and asks back (a mutual subscription).
  bob = await startClient(stack.url, 'bob', 'bob-secret', { resource: 'xmppjs' });
  bob.xmpp.on('stanza', (stanza: Element) => {
    if (stanza.is('presence') && stanza.attrs.type === 'subscribe') {
      const requester = stanza.attrs.from;
      // One stanza per send(): xmpp.js's send takes a single element (a second argument is ignored).
      void (async () => {
        await bob.xmpp.send(xml('presence', { to: requester, type: 'subscribed' }));
        await bob.xmpp.send(xml('presence', { to: requester, type: 'subscribe' }));
      })();
    }
  });
  await bob.xmpp.send(xml('presence'));

  chromium = await launchChromium();
  page = await chromium.context.newPage();
  // Every UI action waits at most this long, so that a failing step fails within its own timeout.
  page.setDefaultTimeout(15_000);
  page.on('console', (message) => {
    traceLine(`console.${message.type()} ${message.text()}`);
    if (message.type() === 'error') consoleErrors.push(message.text());
  });
  // Message only: a browser stack's "at http://…" lines would be taken for Node's by the reporter.
  page.on('pageerror', (error) => consoleErrors.push(`uncaught ${error.name}: ${error.message}`));
  page.on('response', (response) => {
    if (response.status() >= 400) failedResponses.push(`${response.status()} ${response.url()}`);
  });
  page.on('websocket', (socket) => {
    const record: SocketRecord = { url: socket.url(), frames: [], closed: false };
    sockets.push(record);
    const n = sockets.length;
    traceLine(`socket ${n} opened ${record.url}`);
    socket.on('framesent', (frame) => {
      record.frames.push({ direction: 'sent', payload: String(frame.payload) });
      traceLine(`socket ${n} > ${String(frame.payload)}`);
    });
    socket.on('framereceived', (frame) => {
      record.frames.push({ direction: 'received', payload: String(frame.payload) });
      traceLine(`socket ${n} < ${String(frame.payload)}`);
    });
    socket.on('close', () => {
      record.closed = true;
      traceLine(`socket ${n} closed`);
    });
  });
  // The machine has no outside network, and the test must not depend on one: anything not served
  // here is refused at once (and listed on failure) instead of hanging.
  await chromium.context.route(
    (url) => url.hostname !== '127.0.0.1',
    (route) => {
      blockedRequests.push(route.request().url());
      return route.abort('blockedbyclient');
    },
  );
});

afterAll(async () => {
  if (artifacts) {
    await writeFile(join(artifacts, 'trace.log'), `${trace.join('\n')}\n`);
    process.stdout.write(
      `[browser] trace of frames, console and Converse events: ${join(artifacts, 'trace.log')}\n`,
    );
  }
  if (consoleErrors.length) {
    process.stdout.write(
      `[browser] Converse console errors:\n${consoleErrors.map((l) => `  ${l}`).join('\n')}\n`,
    );
  }
  await chromium?.close();
  await bob?.stop();
  await site?.close();
  await link?.close();
  // The last frames ($disconnect, bob's </close>) are handled before the gateway goes away.
  await stack?.gateway.drained();
  await stack?.close();
});

describe('Converse.js in Chromium against the local stack', () => {
  step('1. logs in as alice: the UI shows her online, with stream management enabled', async () => {
    await page.goto(site.url);
    await expect
      .poll(() => page.locator('converse-user-profile .xmpp-status [data-value="online"]').count(), {
        timeout: 20_000,
      })
      .toBeGreaterThan(0);
    expect(await page.locator('converse-user-profile .username').textContent()).toContain('alice');
    // Server side: the browser's resource is bound, with a resumable XEP-0198 session.
    await eventually(async () => {
      const smId = await aliceSmId();
      const queue = await stack.server.smQueue.get(smId);
      expect(queue).toMatchObject({ user: ALICE, resource: ALICE_RESOURCE, version: 'sm3', resumable: true });
    });
    expect(hasFrame(sockets[0], 'received', /^<enabled\b[^>]*urn:xmpp:sm:3/)).toBe(true);
  });

  step('2. adds bob: after the mutual subscription bob is listed as a contact and online', async () => {
    // Through Converse's own "Add a contact" form, as a user does.
    await page.locator('converse-roster .dropdown-toggle').first().click();
    await page.locator('converse-roster .add-contact').click();
    const form = page.locator('form.add-xmpp-contact');
    await form.locator('input[name="jid"]').fill(BOB);
    await form.locator('input[name="name"]').fill('Bob');
    await form.locator('button[type="submit"]').click();

    // RFC 6121 §3.1.3: the request reaches bob stamped with alice's bare JID; bob grants it and
    // asks back (handler above), which Converse approves since bob is already its contact.
    await bob.waitFor(
      (s) => s.is('presence') && s.attrs.type === 'subscribe' && s.attrs.from === ALICE,
      15_000,
    );
    await bob.waitFor(
      (s) => s.is('presence') && s.attrs.type === 'subscribed' && s.attrs.from === ALICE,
      15_000,
    );

    const contact = page.locator(`converse-roster-contact:has(a[data-jid="${BOB}"])`);
    await expect.poll(() => contact.count(), { timeout: 15_000 }).toBe(1);
    await expect.poll(() => contact.locator('.contact-name--online').count(), { timeout: 15_000 }).toBe(1);
    expect((await contact.locator('.contact-name').textContent())?.trim()).toBe('Bob');
  });

  step('3. shows a message bob sends from xmpp.js', async () => {
    // Fail at once, with the reason, rather than after a timeout with the dialog still open.
    const blocker = await chatBlocker(BOB);
    if (blocker) throw new Error(blocker);
    // In fullscreen mode Converse keeps a chat that a message opened in the background, so the
    // user opens it, here with "Start a new chat" (the same api.chats.open as a click on the
    // contact).
    await page.locator('converse-roster .dropdown-toggle').first().click();
    await page.locator('converse-roster .new-chat').click();
    const form = page.locator('converse-new-chat-modal form');
    await form.locator('input[name="jid"]').fill(BOB);
    await form.locator('button[type="submit"]').click();
    await page.locator(`converse-chat[jid="${BOB}"] textarea.chat-textarea`).waitFor({ timeout: 10_000 });

    await sendChat(ALICE, 'Hello Alice, this is Bob on xmpp.js');
    await expect
      .poll(() => shownMessages('Hello Alice, this is Bob on xmpp.js').count(), { timeout: 15_000 })
      .toBe(1);
  });

  step('4. delivers a message typed into Converse to bob', async () => {
    const blocker = await chatBlocker(BOB);
    if (blocker) throw new Error(blocker);
    const textarea = page.locator(`converse-chat[jid="${BOB}"] textarea.chat-textarea`);
    await textarea.fill('Hi Bob, typed in Converse');
    await textarea.press('Enter');
    const received = await bob.waitFor(
      isChatFrom(`${ALICE}/${ALICE_RESOURCE}`, 'Hi Bob, typed in Converse'),
      15_000,
    );
    expect(received.attrs.to).toMatch(new RegExp(`^${BOB}`));
    // Converse shows its own message once, too.
    expect(await shownMessages('Hi Bob, typed in Converse').count()).toBe(1);
  });

  step(
    '5. resumes (XEP-0198) after the connection is cut: the message sent meanwhile is shown once',
    async () => {
      const smId = await aliceSmId();
      const socketsBefore = sockets.length;
      const connectionBefore = (await stack.server.smQueue.get(smId))?.connectionId;
      expect(connectionBefore).toBeDefined();
      link.cut();

      // Server side: the stream is detached (not ended) and keeps its queue for a resume.
      await eventually(async () => {
        const queue = await stack.server.smQueue.get(smId);
        expect(queue?.connectionId).toBeUndefined();
        expect(queue?.ended).toBeFalsy();
      }, 15_000);

      const outage = 'Sent by Bob while the browser was cut off';
      await sendChat(ALICE, outage);
      await eventually(async () => {
        const queue = await stack.server.smQueue.get(smId);
        expect(queue?.entries.some((entry) => (entry.s ?? '').includes(outage))).toBe(true);
      });
      expect(await shownMessages(outage).count()).toBe(0);

      link.restore();

      // Converse reconnects on a new socket and resumes the old session instead of binding anew.
      await expect
        .poll(() => sockets.slice(socketsBefore).some((s) => hasFrame(s, 'received', RESUMED)), {
          timeout: 20_000,
        })
        .toBe(true);
      const resumedOn = sockets.slice(socketsBefore).find((s) => hasFrame(s, 'received', RESUMED));
      expect(hasFrame(resumedOn, 'sent', new RegExp(`^<resume\\b[^>]*previd=["']${smId}["']`))).toBe(true);
      expect(hasFrame(resumedOn, 'sent', /urn:ietf:params:xml:ns:xmpp-bind/)).toBe(false);

      // The protocol part passed; showing the message needs the chat (see chatBlocker).
      const blocker = await chatBlocker(BOB);
      if (blocker) throw new Error(blocker);
      await expect.poll(() => shownMessages(outage).count(), { timeout: 15_000 }).toBe(1);
      // Exactly once: give a duplicate (a replay of already-handled stanzas, a second delivery)
      // time to arrive, then count again, earlier messages included.
      await page.waitForTimeout(1500);
      expect(await shownMessages(outage).count()).toBe(1);
      expect(await shownMessages('Hello Alice, this is Bob on xmpp.js').count()).toBe(1);

      // Server side: the same session, attached to the new connection (not the one cut), with
      // nothing of the replay left unacknowledged once Converse answered the <r/> that ends it
      // (what the server sent since, its answers to Converse's disco queries, waits for the next
      // batch's <r/>).
      const queue = await stack.server.smQueue.get(smId);
      expect(queue?.connectionId).toBeDefined();
      expect(queue?.connectionId).not.toBe(connectionBefore);
      expect(queue?.ended).toBeFalsy();
      await expect
        .poll(
          async () =>
            (await stack.server.smQueue.get(smId))?.entries
              .map((entry) => entry.s ?? '')
              .filter((stanza) => stanza.startsWith('<message')),
          { timeout: 15_000 },
        )
        .toEqual([]);
      expect(await page.locator('converse-user-profile .xmpp-status [data-value="online"]').count()).toBe(1);
    },
    60_000,
  );
});
