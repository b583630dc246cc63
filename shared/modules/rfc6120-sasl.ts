/**
 * RFC 6120 §6 SASL negotiation: SCRAM-SHA-256, SCRAM-SHA-1 (RFC 5802, RFC 7677) and PLAIN
 * (RFC 4616), advertised in that order. The mechanism's state between `<challenge/>` and
 * `<response/>` lives in the connection's row, since the next frame may run in another Lambda.
 *
 * Failures look the same for a wrong password and an unknown user (decoy credentials, same
 * work). Failures are counted per connection and per account name; past the limits they are
 * slowed and answered `temporary-auth-failure`, but a correct password is always accepted, so
 * a flood of wrong guesses never locks the real user out.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { Element } from 'ltx';
import type { Server, Stream } from '../core/host.ts';
import { StreamError } from '../errors.ts';
import { bareJid, parseJid } from '../jid.ts';
import {
  decodeSaslPayload,
  decoyCredentials,
  encodeSaslPayload,
  MECHANISM_HASH,
  parseClientFirst,
  parsePlain,
  SaslError,
  type ScramCredentials,
  type ScramHash,
  type ScramState,
  serverFirst,
  verifyClientFinal,
  verifyPlain,
} from '../sasl/scram.ts';
import { NS } from '../xml/namespaces.ts';

export const MECHANISMS = ['SCRAM-SHA-256', 'SCRAM-SHA-1', 'PLAIN'] as const;

export function register(server: Server): void {
  server.host.nonza(NS.sasl, handle);
  server.host.hook('stream-features', ({ stream, features }) => {
    if (stream.user) return undefined;
    const mechanisms = features.c('mechanisms', { xmlns: NS.sasl });
    for (const name of MECHANISMS) mechanisms.c('mechanism').t(name);
    return undefined;
  });
}

function saslElement(name: string, payload?: string): Element {
  const el = new Element(name, { xmlns: NS.sasl });
  if (payload !== undefined) el.t(payload);
  return el;
}

function failureElement(error: SaslError): Element {
  const failure = saslElement('failure');
  failure.c(error.condition);
  if (error.text) failure.c('text', { 'xml:lang': 'en' }).t(error.text);
  return failure;
}

/** The account an authentication identity names: `alice` or `alice@<our domain>`. */
function accountOf(stream: Stream, username: string): string | undefined {
  const { domain } = stream.server.config;
  try {
    const jid = parseJid(username.includes('@') ? username : `${username}@${domain}`);
    if (jid.domain !== domain || !jid.local || jid.resource) return undefined;
    return bareJid(jid);
  } catch {
    return undefined;
  }
}

async function decoy(stream: Stream, account: string | undefined, username: string, hash: ScramHash) {
  const { server } = stream;
  return decoyCredentials(
    account ?? username,
    hash,
    await server.decoySecret(),
    server.config.scramIterations,
  );
}

async function credentialsFor(
  stream: Stream,
  account: string | undefined,
  username: string,
  hash: ScramHash,
) {
  const stored = account ? await stream.server.users.get(account) : undefined;
  const credentials: ScramCredentials | undefined = stored?.scram[hash];
  return credentials ?? decoy(stream, account, username, hash);
}

async function succeed(stream: Stream, account: string, additionalData?: string): Promise<void> {
  const { server } = stream;
  await server.users.clearAuthFailures(account);
  // RFC 6120 §6.4.6: on success the stream restarts; nothing from the old stream carries over.
  stream.update({ user: account, sasl: undefined, streamOpen: false, authFailures: 0 });
  await stream.send(
    saslElement('success', additionalData === undefined ? undefined : encodeSaslPayload(additionalData)),
  );
}

/** Counts the failure, slows repeated ones, and answers. */
async function fail(stream: Stream, account: string | undefined, condition: 'not-authorized'): Promise<void> {
  const { server } = stream;
  const { config } = server;
  const connectionFailures = stream.state.authFailures + 1;
  const accountFailures = account
    ? await server.users.recordAuthFailure(account, config.authFailureWindowSeconds)
    : 0;
  stream.update({ sasl: undefined, authFailures: connectionFailures });
  const overAccountLimit = accountFailures > config.authFailuresPerAccount;
  if (overAccountLimit) {
    // Slowed: each failure beyond the limit waits longer, up to AUTH_FAILURE_MAX_DELAY_MS.
    const over = Math.min(10, accountFailures - config.authFailuresPerAccount);
    await sleep(Math.min(config.authFailureMaxDelayMs, 100 * 2 ** over));
  }
  if (connectionFailures >= config.authFailuresPerConnection) {
    // RFC 6120 §6.4.5: "...the receiving entity ... MAY terminate the TCP connection" after
    // a configurable number of retries; here the stream ends with a stream error.
    await stream.send(failureElement(new SaslError('temporary-auth-failure', 'Too many failed attempts')));
    throw new StreamError('policy-violation', 'Too many failed authentication attempts');
  }
  const answer = overAccountLimit
    ? new SaslError('temporary-auth-failure', 'Try again later')
    : new SaslError(condition);
  await stream.send(failureElement(answer));
}

async function startPlain(stream: Stream, payload: string): Promise<void> {
  const message = parsePlain(decodeSaslPayload(payload));
  const account = accountOf(stream, message.authcid);
  const stored = account ? await stream.server.users.get(account) : undefined;
  const credentials = stored?.scram.sha256 ?? (await decoy(stream, account, message.authcid, 'sha256'));
  const valid = await verifyPlain(message.password, 'sha256', credentials);
  if (!valid || !account || !stored) return fail(stream, account, 'not-authorized');
  if (message.authzid !== undefined && accountOf(stream, message.authzid) !== account) {
    throw new SaslError('invalid-authzid', 'You may only act as yourself');
  }
  await succeed(stream, account);
}

async function scramFirst(stream: Stream, mechanism: string, payload: string): Promise<void> {
  const hash = MECHANISM_HASH[mechanism] as ScramHash;
  const clientFirst = parseClientFirst(payload);
  const account = accountOf(stream, clientFirst.username);
  if (clientFirst.authzid !== undefined && accountOf(stream, clientFirst.authzid) !== account) {
    throw new SaslError('invalid-authzid', 'You may only act as yourself');
  }
  const credentials = await credentialsFor(stream, account, clientFirst.username, hash);
  const { message, state } = serverFirst(clientFirst, hash, credentials);
  stream.update({ sasl: { mechanism, state: state as unknown as Record<string, unknown>, jid: account } });
  await stream.send(saslElement('challenge', encodeSaslPayload(message)));
}

async function scramFinal(stream: Stream, payload: string): Promise<void> {
  const progress = stream.state.sasl;
  if (!progress) throw new SaslError('malformed-request', 'No authentication in progress');
  const state = progress.state as unknown as ScramState;
  const result = verifyClientFinal(state, payload);
  const account = progress.jid;
  // Unknown users ran against decoy keys that no proof can match.
  if (!result.ok || !account) {
    return fail(stream, account, 'not-authorized');
  }
  await succeed(stream, account, result.serverFinal);
}

async function auth(stream: Stream, element: Element): Promise<void> {
  const mechanism = element.attrs.mechanism as string | undefined;
  if (!mechanism || !(MECHANISMS as readonly string[]).includes(mechanism)) {
    throw new SaslError('invalid-mechanism', 'Offered: SCRAM-SHA-256, SCRAM-SHA-1, PLAIN');
  }
  const payload = element.getText();
  if (mechanism === 'PLAIN') {
    if (payload.trim() === '') {
      // RFC 6120 §6.4.2: no initial response means an empty challenge first.
      stream.update({ sasl: { mechanism, state: {} } });
      await stream.send(saslElement('challenge', '='));
      return;
    }
    return startPlain(stream, payload);
  }
  const decoded = decodeSaslPayload(payload);
  if (decoded === '') {
    stream.update({ sasl: { mechanism, state: {} } });
    await stream.send(saslElement('challenge', '='));
    return;
  }
  return scramFirst(stream, mechanism, decoded);
}

async function response(stream: Stream, element: Element): Promise<void> {
  const progress = stream.state.sasl;
  if (!progress) throw new SaslError('malformed-request', 'No authentication in progress');
  const payload = element.getText();
  if (progress.mechanism === 'PLAIN') return startPlain(stream, payload);
  if (!('nonce' in progress.state)) return scramFirst(stream, progress.mechanism, decodeSaslPayload(payload));
  return scramFinal(stream, decodeSaslPayload(payload));
}

async function handle(stream: Stream, element: Element): Promise<void> {
  if (stream.state.user) throw new StreamError('policy-violation', 'Already authenticated');
  try {
    if (element.name === 'auth') return await auth(stream, element);
    if (element.name === 'response') return await response(stream, element);
    if (element.name === 'abort') {
      stream.update({ sasl: undefined });
      await stream.send(failureElement(new SaslError('aborted')));
      return;
    }
    throw new StreamError('unsupported-stanza-type', `Unexpected SASL element <${element.name}>`);
  } catch (error) {
    if (!(error instanceof SaslError)) throw error;
    stream.update({ sasl: undefined });
    await stream.send(failureElement(error));
  }
}
