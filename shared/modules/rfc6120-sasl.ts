/**
 * RFC 6120 §6 SASL negotiation: SCRAM-SHA-256, SCRAM-SHA-1 (RFC 5802, RFC 7677) and PLAIN
 * (RFC 4616), advertised in that order. The mechanism's state between `<challenge/>` and
 * `<response/>` lives in the connection's row, since the next frame may run in another Lambda.
 *
 * Failures look the same for a wrong password and an unknown user (decoy credentials with the
 * deployment's iteration count, same reads). Failures are counted per connection, per account
 * name and per source address (API Gateway's `identity.sourceIp`); past the limits, attempts
 * are refused before the password is checked (see `takeAttempt`), answered at once with
 * `temporary-auth-failure`: nothing sleeps inside the stream function. An attempt is counted
 * in the same write that admits it to the check, and given back if it succeeds, so attempts
 * arriving together cannot all pass the limits; it is counted with its frame's id, so that a
 * redelivered frame does not count it twice.
 */
import { createHmac } from 'node:crypto';
import { Element } from 'ltx';
import { frameDerived, frameRedelivered } from '../core/frame.ts';
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
import type { AuthAttempt, LoginRecord } from '../store/users.ts';
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

/**
 * The iteration counts decoys use: every count the deployment's keys were made with (accounts
 * keep theirs until their password changes), re-read every 5 minutes.
 */
const decoyIterations = new WeakMap<Server, { value: Promise<number[]>; readAt: number }>();

function iterationsForDecoys(server: Server): Promise<number[]> {
  const cached = decoyIterations.get(server);
  if (cached && cached.readAt > Date.now() - 300_000) return cached.value;
  const value = server.users
    .scramIterations()
    .then((stored) => (stored.length > 0 ? stored : [server.config.scramIterations]));
  value.catch(() => decoyIterations.delete(server));
  decoyIterations.set(server, { value, readAt: Date.now() });
  return value;
}

/**
 * An unknown name's keys: a salt and an iteration count stable for the name (its HMAC under the
 * deployment's secret picks one of the counts in use), so that after SCRAM_ITERATIONS changed
 * the new count does not single out unknown names (older accounts announce the old one).
 */
async function decoy(stream: Stream, account: string | undefined, username: string, hash: ScramHash) {
  const { server } = stream;
  const [secret, counts] = await Promise.all([server.decoySecret(), iterationsForDecoys(server)]);
  const name = account ?? username;
  const pick = createHmac('sha256', secret)
    .update(`scram-decoy-iterations\0${name}`)
    .digest()
    .readUInt32BE(0);
  return decoyCredentials(name, hash, secret, counts[pick % counts.length] as number);
}

/** What the limits know of an attempt before the password is looked at. */
interface Gate {
  record: LoginRecord;
}

/** An attempt admitted to the password check: counted already on the address and the account. */
interface Admitted extends Gate {
  /** Counted on the source address (given back on success). */
  address?: AuthAttempt;
  /** Counted on the account, for an address it never logged in from (cleared on success). */
  account?: AuthAttempt;
}

const NO_RECORD: LoginRecord = { authFailures: 0, knownAddresses: {} };

/** The account's keys, failure count and known addresses: what the limits and the check need. */
async function admit(stream: Stream, account: string | undefined): Promise<Gate> {
  return { record: account ? await stream.server.users.loginRecord(account) : NO_RECORD };
}

/**
 * Decides whether an attempt may go on to the password check (Prosody's mod_limit_auth and
 * ejabberd's mod_fail2ban refuse a throttled address before checking anything), counting it in
 * the same write that checks the limit (`takeAuthAttempt`):
 * - past `authFailuresPerAddress` failures in the window, everything from that address is refused
 *   unchecked, the right password too, until the window passes;
 * - past `authFailuresPerAccount` failures, attempts on the account from addresses it never logged
 *   in from are let through one per `authAccountSlowdownSeconds`: slowed, never locked, and the
 *   owner from a known address is never held up.
 * SCRAM is judged at its client-final, on the counts as they are then: exchanges begun while the
 * limits let them (many staged on as many connections, their finals sent once the guesses of the
 * first ones failed, or all at once) are not checked past them. Existing and unknown accounts go
 * through the same reads and writes and get the same answers. Refused, nothing stays counted; no
 * sleeping: refused attempts are answered at once.
 */
async function takeAttempt(
  stream: Stream,
  account: string | undefined,
  gate: Gate,
): Promise<Admitted | SaslError> {
  const { config, users } = stream.server;
  const address = stream.state.sourceIp;
  const window = config.authFailureWindowSeconds;
  // Counted with the frame's id: a redelivered frame (its first delivery died before its answer
  // was saved) finds its attempt counted already, and does not count it twice.
  const frame = stream.frameId || undefined;
  const onAddress = address
    ? await users.takeAuthAttempt({ address }, window, { below: config.authFailuresPerAddress }, frame)
    : null;
  if (onAddress === undefined) return addressThrottled();
  const known = address !== undefined && address in gate.record.knownAddresses;
  const onAccount =
    account && !known
      ? await users.takeAuthAttempt(
          { account },
          window,
          {
            below: config.authFailuresPerAccount,
            orLastAtMost: Date.now() - config.authAccountSlowdownSeconds * 1000,
          },
          frame,
        )
      : null;
  if (onAccount === undefined) {
    if (onAddress) await users.giveBackAuthAttempt(onAddress);
    return accountSlowed();
  }
  return {
    record: onAccount ? { ...gate.record, authFailures: onAccount.failures } : gate.record,
    ...(onAddress ? { address: onAddress } : {}),
    ...(onAccount ? { account: onAccount } : {}),
  };
}

const addressThrottled = () =>
  new SaslError('temporary-auth-failure', 'Too many failed attempts from your address; try again later');
const accountSlowed = () =>
  new SaslError('temporary-auth-failure', 'Too many failed attempts on this account; try again later');

/** Tells observers (metrics) how an attempt ended; `condition` is the `<failure/>` sent. */
async function report(stream: Stream, mechanism: string | undefined, condition?: string): Promise<void> {
  // Only offered names become a metric dimension: a client cannot invent values.
  const offered = (MECHANISMS as readonly string[]).includes(mechanism ?? '')
    ? (mechanism as string)
    : 'other';
  if (condition !== undefined)
    stream.server.log.info('SASL failure', {
      connectionId: stream.connectionId,
      mechanism: offered,
      condition,
    });
  await stream.server.host.fire('auth-result', {
    stream,
    mechanism: offered,
    success: condition === undefined,
    ...(condition === undefined ? {} : { condition }),
  });
}

/** An attempt refused by the limits: answered at once, counted against the connection only. */
async function refuse(stream: Stream, mechanism: string, error: SaslError): Promise<void> {
  stream.update({ sasl: undefined, authFailures: stream.state.authFailures + 1 });
  await stream.answerOnce(failureElement(error));
  await report(stream, mechanism, error.condition);
  endIfTooManyOnConnection(stream);
}

function endIfTooManyOnConnection(stream: Stream): void {
  if (stream.state.authFailures >= stream.server.config.authFailuresPerConnection) {
    // RFC 6120 §6.4.5: "...the receiving entity ... MAY terminate the TCP connection" after
    // a configurable number of retries; here the stream ends with a stream error.
    throw new StreamError('policy-violation', 'Too many failed authentication attempts');
  }
}

async function succeed(
  stream: Stream,
  mechanism: string,
  account: string,
  gate: Admitted,
  additionalData?: string,
): Promise<void> {
  const { server } = stream;
  const address = stream.state.sourceIp;
  await Promise.all([
    // Not a failure: uncounted on the address; the account's failures end with a success.
    gate.address ? server.users.giveBackAuthAttempt(gate.address) : undefined,
    gate.account || gate.record.authFailures > 0 ? server.users.clearAuthFailures(account) : undefined,
    address ? server.users.rememberAddress(account, address, gate.record.knownAddresses) : undefined,
  ]);
  // RFC 6120 §6.4.6: on success the stream restarts; nothing from the old stream carries over.
  // (Which account it is, by its creation time, is kept for a bind that comes late.)
  const createdAt = gate.record.user?.createdAt ?? stream.state.sasl?.createdAt;
  stream.update({
    user: account,
    sasl: undefined,
    streamOpen: false,
    authFailures: 0,
    authenticatedAt: Date.now(),
    ...(createdAt === undefined ? {} : { accountCreatedAt: createdAt }),
  });
  // Saved with the answer before it goes out (answerOnce): a redelivery sends the same
  // <success/> again instead of checking the limits anew, which could now refuse a client that
  // was told it succeeded.
  await stream.answerOnce(
    saslElement('success', additionalData === undefined ? undefined : encodeSaslPayload(additionalData)),
  );
  await report(stream, mechanism);
}

/**
 * A failed attempt: counted on the address and (from an address it never logged in from) on the
 * account when it was admitted; from a known address, on the account now. Answers.
 */
async function fail(
  stream: Stream,
  mechanism: string,
  account: string | undefined,
  gate: Admitted,
): Promise<void> {
  const { server } = stream;
  const { config } = server;
  const accountFailures =
    gate.account?.failures ??
    (account
      ? await server.users.recordAuthFailure(
          account,
          config.authFailureWindowSeconds,
          stream.frameId || undefined,
        )
      : 0);
  const addressFailures = gate.address?.failures ?? 0;
  stream.update({ sasl: undefined, authFailures: stream.state.authFailures + 1 });
  const overLimit =
    accountFailures >= config.authFailuresPerAccount ||
    addressFailures >= config.authFailuresPerAddress ||
    stream.state.authFailures >= config.authFailuresPerConnection;
  // RFC 6120 §6.5.10 <not-authorized/> ("the initiating entity did not provide proper
  // credentials") even for the attempt that reaches a limit: the credentials were checked and
  // wrong, and a client told <temporary-auth-failure/> (§6.5.12, "a temporary error condition
  // within the receiving entity") would retry the same ones later. The attempts the limit then
  // refuses unchecked are the temporary failures (`refuse`).
  const answer = new SaslError(
    'not-authorized',
    overLimit ? 'Too many failed attempts; try again later' : undefined,
  );
  // The same answer on a redelivery, and the failure is not counted twice.
  await stream.answerOnce(failureElement(answer));
  await report(stream, mechanism, answer.condition);
  endIfTooManyOnConnection(stream);
}

async function startPlain(stream: Stream, payload: string): Promise<void> {
  const message = parsePlain(decodeSaslPayload(payload));
  const account = accountOf(stream, message.authcid);
  // As SCRAM's client-first: before anything is read or counted, whatever the password.
  if (message.authzid !== undefined && accountOf(stream, message.authzid) !== account) {
    throw new SaslError('invalid-authzid', 'You may only act as yourself');
  }
  const gate = await takeAttempt(stream, account, await admit(stream, account));
  if (gate instanceof SaslError) return refuse(stream, 'PLAIN', gate);
  const stored = gate.record.user;
  const credentials = stored?.scram.sha256 ?? (await decoy(stream, account, message.authcid, 'sha256'));
  const valid = await verifyPlain(message.password, 'sha256', credentials);
  if (!valid || !account || !stored) return fail(stream, 'PLAIN', account, gate);
  await succeed(stream, 'PLAIN', account, gate);
}

async function scramFirst(stream: Stream, mechanism: string, payload: string): Promise<void> {
  const { server } = stream;
  const hash = MECHANISM_HASH[mechanism] as ScramHash;
  const clientFirst = parseClientFirst(payload);
  const account = accountOf(stream, clientFirst.username);
  if (clientFirst.authzid !== undefined && accountOf(stream, clientFirst.authzid) !== account) {
    throw new SaslError('invalid-authzid', 'You may only act as yourself');
  }
  const gate = await admit(stream, account);
  const credentials: ScramCredentials =
    gate.record.user?.scram[hash] ?? (await decoy(stream, account, clientFirst.username, hash));
  // The server nonce is the frame's own: a redelivered <auth/> (its challenge went out, the
  // state's save did not) sends the same challenge again, so the client's answer to the first
  // still matches the state saved by the second.
  const nonce = frameDerived(await server.decoySecret(), `scram-nonce\n${stream.connectionId}`);
  const { message, state } = serverFirst(clientFirst, hash, credentials, nonce);
  stream.update({
    sasl: {
      mechanism,
      state: state as unknown as Record<string, unknown>,
      jid: account,
      // Carried to the final step: whether a success must clear failures, and the known addresses.
      gate: { authFailures: gate.record.authFailures, knownAddresses: gate.record.knownAddresses },
      ...(gate.record.user ? { createdAt: gate.record.user.createdAt } : {}),
      ...(frameRedelivered() ? { repeated: true } : {}),
    },
  });
  await stream.send(saslElement('challenge', encodeSaslPayload(message)));
}

const NO_EXCHANGE = 'No authentication in progress';

async function scramFinal(stream: Stream, payload: string): Promise<void> {
  const progress = stream.state.sasl;
  if (!progress) throw new SaslError('malformed-request', NO_EXCHANGE);
  const state = progress.state as unknown as ScramState;
  const account = progress.jid;
  // Parsed before the attempt is counted: a malformed client-final (RFC 5802 §7) guesses no
  // password, so it is charged to the connection (below, in `handle`), never to the address or
  // the account, whose limits a buggy client behind a shared address would use up for everyone.
  // Its outcome is told only after the count, as before.
  const result = verifyClientFinal(state, payload);
  const gate = await takeAttempt(stream, account, { record: { ...NO_RECORD, ...progress.gate } });
  if (gate instanceof SaslError) return refuse(stream, progress.mechanism, gate);
  // Unknown users ran against decoy keys that no proof can match.
  if (!result.ok || !account) return fail(stream, progress.mechanism, account, gate);
  await succeed(stream, progress.mechanism, account, gate, result.serverFinal);
}

async function auth(stream: Stream, element: Element): Promise<void> {
  const mechanism = element.attrs.mechanism as string | undefined;
  if (!mechanism || !(MECHANISMS as readonly string[]).includes(mechanism)) {
    throw new SaslError('invalid-mechanism', 'Offered: SCRAM-SHA-256, SCRAM-SHA-1, PLAIN');
  }
  const payload = element.getText();
  if (mechanism === 'PLAIN') {
    if (payload.trim() === '') {
      // RFC 6120 §6.4.2: no initial response means an empty challenge first: an element without
      // character data (§6.4.3: "MAY contain XML character data"; the '=' of "present but
      // empty" is the initiating entity's convention for responses, which Strophe's atob cannot
      // decode).
      stream.update({ sasl: { mechanism, state: {} } });
      await stream.send(saslElement('challenge'));
      return;
    }
    return startPlain(stream, payload);
  }
  // RFC 6120 §6.4.2: no text is no initial response (an empty challenge asks for it); a lone
  // "=" is a response "present but [that] contains no data", and a SCRAM client-first message
  // cannot be empty (RFC 5802 §7).
  if (payload.trim() === '=') throw new SaslError('malformed-request', 'The client-first message is empty');
  const decoded = decodeSaslPayload(payload);
  if (decoded === '') {
    stream.update({ sasl: { mechanism, state: {} } });
    await stream.send(saslElement('challenge'));
    return;
  }
  return scramFirst(stream, mechanism, decoded);
}

async function response(stream: Stream, element: Element): Promise<void> {
  const progress = stream.state.sasl;
  if (!progress) throw new SaslError('malformed-request', NO_EXCHANGE);
  const payload = element.getText();
  if (progress.mechanism === 'PLAIN') return startPlain(stream, payload);
  if (!('nonce' in progress.state)) return scramFirst(stream, progress.mechanism, decodeSaslPayload(payload));
  const decoded = decodeSaslPayload(payload);
  if (decoded === '' && progress.repeated) {
    // A client that got the challenge twice answers the copy as if it were the server's final
    // message (an empty response), possibly before its proof for the first: ignored, the proof
    // follows. Without a repeated challenge an empty client-final is malformed (RFC 5802 §7).
    stream.server.log.info('SASL empty response to a repeated challenge ignored', {
      connectionId: stream.connectionId,
    });
    return;
  }
  return scramFinal(stream, decoded);
}

async function handle(stream: Stream, element: Element): Promise<void> {
  if (stream.state.user && !stream.state.streamOpen && element.name === 'response') {
    // Between <success/> and the stream restart: the client's answer to a challenge it got
    // twice (its <auth/> frame was redelivered after the challenge went out), the first answer
    // having succeeded.
    stream.server.log.info('SASL response after success ignored', { connectionId: stream.connectionId });
    return;
  }
  if (stream.state.user) throw new StreamError('policy-violation', 'Already authenticated');
  const mechanism = element.name === 'auth' ? element.attrs.mechanism : stream.state.sasl?.mechanism;
  try {
    if (element.name === 'auth' && stream.state.sasl && !frameRedelivered()) {
      // A new exchange in place of one in progress abandons it: counted as a failure on the
      // connection (as an <abort/> is), or a client could begin exchanges for ever, each costing
      // the account's read, and never fail one.
      stream.update({ sasl: undefined, authFailures: stream.state.authFailures + 1 });
      endIfTooManyOnConnection(stream);
    }
    if (element.name === 'auth') return await auth(stream, element);
    if (element.name === 'response') return await response(stream, element);
    if (element.name === 'abort') throw new SaslError('aborted');
    throw new StreamError('unsupported-stanza-type', `Unexpected SASL element <${element.name}>`);
  } catch (error) {
    if (!(error instanceof SaslError)) throw error;
    // RFC 6120 §6.4.5: "a configurable but reasonable number of retries": every failure counts
    // on the connection (an unknown mechanism, a malformed or aborted exchange as much as a
    // wrong password), so no client loops through exchanges on one connection for ever, each
    // costing the account's read; AUTH_FAILURES_PER_CONNECTION (3) leaves a client its fallbacks.
    // Not counted: a <response/> with no exchange in progress (it costs nothing, and a client
    // answering both copies of a redelivered challenge sends one after its first answer failed).
    const counted = error.text !== NO_EXCHANGE;
    stream.update({
      sasl: undefined,
      ...(counted ? { authFailures: stream.state.authFailures + 1 } : {}),
    });
    await stream.send(failureElement(error));
    await report(stream, mechanism, error.condition);
    if (counted) endIfTooManyOnConnection(stream);
  }
}
