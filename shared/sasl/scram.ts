/**
 * SASL mechanisms on the server side: SCRAM-SHA-1 (RFC 5802), SCRAM-SHA-256 (RFC 7677), both
 * without channel binding, and PLAIN (RFC 4616). Pure functions: no I/O, no XML. The SASL
 * module (shared/modules/rfc6120-sasl.ts) decodes `<auth/>`/`<response/>`, calls these, and
 * encodes `<challenge/>`, `<success/>` or `<failure/>` from what they return or throw.
 *
 * The server keeps only StoredKey and ServerKey (RFC 5802 §3); login never runs PBKDF2 for
 * SCRAM. PLAIN has to (the client sends the password), against the same stored keys.
 */
import { createHash, createHmac, pbkdf2, randomBytes, timingSafeEqual } from 'node:crypto';
import { promisify } from 'node:util';
import { saslprep } from '@mongodb-js/saslprep';

const pbkdf2Async = promisify(pbkdf2);

export type ScramHash = 'sha1' | 'sha256';

export const SCRAM_HASHES: readonly ScramHash[] = ['sha1', 'sha256'];

/** The SCRAM mechanisms offered, strongest first (the order they are advertised in). */
export const MECHANISM_HASH: Readonly<Record<string, ScramHash>> = {
  'SCRAM-SHA-256': 'sha256',
  'SCRAM-SHA-1': 'sha1',
};

// RFC 7677 §4: "The hash iteration-count announced by a server SHOULD be at least 4096".
export const MIN_ITERATIONS = 4096;

const HASH_BYTES: Record<ScramHash, number> = { sha1: 20, sha256: 32 };

/** What the server stores per hash function (RFC 5802 §3, never the password). All binary values base64. */
export interface ScramCredentials {
  salt: string;
  iterations: number;
  storedKey: string;
  serverKey: string;
}

/** RFC 6120 §6.5: the defined `<failure/>` conditions. */
export const SASL_CONDITIONS = [
  'aborted',
  'account-disabled',
  'credentials-expired',
  'encryption-required',
  'incorrect-encoding',
  'invalid-authzid',
  'invalid-mechanism',
  'malformed-request',
  'mechanism-too-weak',
  'not-authorized',
  'temporary-auth-failure',
] as const;

export type SaslCondition = (typeof SASL_CONDITIONS)[number];

/** RFC 5802 §7 `server-error-value`s we can report, for logs (XMPP carries only the condition). */
export type ScramServerError =
  | 'invalid-encoding'
  | 'extensions-not-supported'
  | 'channel-binding-not-supported'
  | 'channel-bindings-dont-match'
  | 'other-error';

/**
 * A SASL negotiation failure. `condition` is what goes into `<failure/>`; `text` is a short
 * human-readable reason safe to send (it never names the user or hints at whether one exists).
 */
export class SaslError extends Error {
  override readonly name = 'SaslError';
  constructor(
    readonly condition: SaslCondition,
    readonly text?: string,
    readonly scramError?: ScramServerError,
  ) {
    super(text ? `${condition}: ${text}` : condition);
  }
}

function malformed(text: string, scramError?: ScramServerError): SaslError {
  return new SaslError('malformed-request', text, scramError);
}

/**
 * The text of `<auth/>` or `<response/>`: base64 (RFC 6120 §6.4.2), where a lone "=" is a
 * present but empty response. Anything that is not base64 per RFC 4648 §4 (alphabet, padding,
 * no line breaks) is `incorrect-encoding` (RFC 6120 §6.5.2). Node's own decoder silently skips
 * bad characters, hence the explicit check.
 */
export function decodeSaslPayload(text: string): string {
  const trimmed = text.trim();
  if (trimmed === '' || trimmed === '=') return '';
  if (!/^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/.test(trimmed)) {
    throw new SaslError('incorrect-encoding', 'payload is not base64');
  }
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(Buffer.from(trimmed, 'base64'));
  } catch {
    throw new SaslError('incorrect-encoding', 'payload is not UTF-8');
  }
}

/** The base64 text of a `<challenge/>` or `<success/>` (RFC 6120 §6.4.2: empty data is "="). */
export function encodeSaslPayload(message: string): string {
  return message === '' ? '=' : Buffer.from(message, 'utf8').toString('base64');
}

// ---------------------------------------------------------------------------------------------
// Primitives (RFC 5802 §2.2)

function hmac(hash: ScramHash, key: Buffer, message: string | Buffer): Buffer {
  return createHmac(hash, key).update(message).digest();
}

function digest(hash: ScramHash, message: Buffer): Buffer {
  return createHash(hash).update(message).digest();
}

function xor(a: Buffer, b: Buffer): Buffer {
  const out = Buffer.alloc(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i] ^ b[i];
  return out;
}

/**
 * RFC 5802 §2.2: "Normalize(str): Apply the SASLprep profile [RFC4013] to the argument string".
 * RFC 4013 §2.5 and RFC 3454 §7: stored strings must not contain unassigned code points, queries
 * (a password typed at login) may.
 */
function normalizePassword(password: string, purpose: 'store' | 'query'): string {
  const options = { allowUnassigned: purpose === 'query' };
  try {
    return saslprep(password, options);
  } catch (error) {
    // @mongodb-js/saslprep 1.6 throws a TypeError instead of returning '' when every
    // character maps to nothing (e.g. a lone U+00AD); tell that case apart exactly.
    if (error instanceof TypeError && saslprep(`${password}a`, options) === 'a') return '';
    throw error;
  }
}

function keysFromSaltedPassword(
  hash: ScramHash,
  saltedPassword: Buffer,
): { storedKey: Buffer; serverKey: Buffer } {
  // RFC 5802 §3: ClientKey := HMAC(SaltedPassword, "Client Key"); StoredKey := H(ClientKey);
  // ServerKey := HMAC(SaltedPassword, "Server Key").
  const clientKey = hmac(hash, saltedPassword, 'Client Key');
  return { storedKey: digest(hash, clientKey), serverKey: hmac(hash, saltedPassword, 'Server Key') };
}

async function saltedPassword(
  normalized: string,
  hash: ScramHash,
  salt: Buffer,
  iterations: number,
): Promise<Buffer> {
  // RFC 5802 §2.2: Hi(str, salt, i) is PBKDF2 with HMAC as the PRF and dkLen the hash length.
  return pbkdf2Async(Buffer.from(normalized, 'utf8'), salt, iterations, HASH_BYTES[hash], hash);
}

/**
 * The keys to store for a password (user creation and password change only; never on login).
 * Throws `RangeError` for a password SASLprep refuses, an empty one, or too few iterations.
 */
export async function deriveScramCredentials(
  password: string,
  hash: ScramHash,
  iterations: number,
  salt: string = randomBytes(16).toString('base64'),
): Promise<ScramCredentials> {
  if (!Number.isInteger(iterations) || iterations < MIN_ITERATIONS) {
    throw new RangeError(`SCRAM iteration count must be an integer ≥ ${MIN_ITERATIONS}, got ${iterations}`);
  }
  let normalized: string;
  try {
    normalized = normalizePassword(password, 'store');
  } catch (error) {
    throw new RangeError(`password refused by SASLprep (RFC 4013): ${(error as Error).message}`);
  }
  if (normalized === '') throw new RangeError('password is empty after SASLprep');
  const salted = await saltedPassword(normalized, hash, Buffer.from(salt, 'base64'), iterations);
  const { storedKey, serverKey } = keysFromSaltedPassword(hash, salted);
  return {
    salt,
    iterations,
    storedKey: storedKey.toString('base64'),
    serverKey: serverKey.toString('base64'),
  };
}

/** Keys for every SCRAM hash from one password: what an account stores. */
export async function deriveCredentialSet(
  password: string,
  iterations: number,
): Promise<Record<ScramHash, ScramCredentials>> {
  const [sha1, sha256] = await Promise.all([
    deriveScramCredentials(password, 'sha1', iterations),
    deriveScramCredentials(password, 'sha256', iterations),
  ]);
  return { sha1, sha256 };
}

/**
 * Credentials to run SCRAM against when the user does not exist, so that the server-first
 * message looks like a real one: answering an unknown user at once, or with a fresh random
 * salt on every attempt, would tell an attacker which accounts exist.
 *
 * The salt is a keyed hash of the username, so it is stable across attempts as a real salt is
 * and cannot be predicted without `secret`. The keys are random, so no proof ever matches,
 * while the final message still costs the same two HMACs and one hash as a real one.
 * `username` should be the normalised bare JID the real lookup used, so case variants of one
 * name get one salt. `iterations` should be the configured count that new users get.
 */
export function decoyCredentials(
  username: string,
  hash: ScramHash,
  secret: string | Buffer,
  iterations: number,
): ScramCredentials {
  const salt = createHmac('sha256', secret)
    .update(`scram-decoy-salt\0${hash}\0${username}`)
    .digest()
    .subarray(0, 16);
  return {
    salt: salt.toString('base64'),
    iterations,
    storedKey: randomBytes(HASH_BYTES[hash]).toString('base64'),
    serverKey: randomBytes(HASH_BYTES[hash]).toString('base64'),
  };
}

// ---------------------------------------------------------------------------------------------
// SCRAM: decode

export interface ClientFirst {
  /** `n,,`, `y,,`, or either with `a=authzid`: echoed back, base64, in the client-final `c=`. */
  gs2Header: string;
  /** Decoded authzid from the gs2 header, when the client asked to act as someone. */
  authzid?: string;
  /** The decoded `n=` saslname (=2C and =3D undone), not yet a JID: the caller normalises it. */
  username: string;
  clientNonce: string;
  clientFirstBare: string;
}

// RFC 5802 §7: printable = %x21-2B / %x2D-7E ;; Printable ASCII except ",".
const PRINTABLE = /^[\x21-\x2b\x2d-\x7e]+$/;

// RFC 5802 §7: base64 with padding, as in the proof and channel-binding attributes.
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/**
 * RFC 5802 §5.1: "The characters ',' or '=' in usernames are sent as '=2C' and '=3D'
 * respectively. If the server receives a username that contains '=' not followed by either
 * '2C' or '3D', then the server MUST fail the authentication."
 */
function decodeSaslName(value: string, what: string): string {
  if (value === '') throw malformed(`empty ${what}`);
  if (/=(?!2C|3D)/.test(value)) throw malformed(`bad escape in ${what}`, 'invalid-encoding');
  return value.replace(/=2C|=3D/g, (sequence) => (sequence === '=2C' ? ',' : '='));
}

function attribute(part: string | undefined, name: string): string {
  if (part === undefined || !part.startsWith(`${name}=`)) throw malformed(`expected ${name}= attribute`);
  return part.slice(name.length + 1);
}

/** Decode the client-first-message (RFC 5802 §7). Throws `SaslError`. */
export function parseClientFirst(payload: string): ClientFirst {
  // gs2-header = gs2-cbind-flag "," [ authzid ] ","
  const first = payload.indexOf(',');
  const second = first < 0 ? -1 : payload.indexOf(',', first + 1);
  if (second < 0) throw malformed('missing gs2 header');
  const cbindFlag = payload.slice(0, first);
  const authzidPart = payload.slice(first + 1, second);
  const gs2Header = payload.slice(0, second + 1);
  const clientFirstBare = payload.slice(second + 1);

  if (cbindFlag.startsWith('p=')) {
    // RFC 5802 §6: a client sends "p" only when the server advertised a -PLUS mechanism; we
    // advertise none, so this is a client error, never silently downgraded.
    throw malformed(
      'channel binding is not supported (no -PLUS mechanism offered)',
      'channel-binding-not-supported',
    );
  }
  // RFC 5802 §6: "y" means the client supports channel binding but thinks the server does not.
  // "If the flag is set to "y" and the server supports channel binding, the server MUST fail";
  // this server does not, so "y" is accepted like "n".
  if (cbindFlag !== 'n' && cbindFlag !== 'y') throw malformed('bad gs2 channel-binding flag');
  const authzid = authzidPart === '' ? undefined : decodeSaslName(attribute(authzidPart, 'a'), 'authzid');

  const parts = clientFirstBare.split(',');
  // RFC 5802 §5.1: "m: ... its presence in a client or a server message MUST cause
  // authentication failure when the attribute is parsed by the other end."
  if (parts[0]?.startsWith('m='))
    throw malformed('mandatory extension not supported', 'extensions-not-supported');
  const username = decodeSaslName(attribute(parts[0], 'n'), 'username');
  const clientNonce = attribute(parts[1], 'r');
  if (!PRINTABLE.test(clientNonce)) throw malformed('bad client nonce');
  // Optional extensions after the nonce are allowed by the grammar and ignored (RFC 5802 §5.1
  // "any unrecognized attributes"), but each must still look like an attribute.
  for (const extension of parts.slice(2)) {
    if (!/^[A-Za-z]=/.test(extension)) throw malformed('bad attribute in client-first');
  }
  return { gs2Header, authzid, username, clientNonce, clientFirstBare };
}

// ---------------------------------------------------------------------------------------------
// SCRAM: decide and encode

/**
 * What the server must remember between server-first and client-final. It is written to the
 * connection's DynamoDB item (the next frame may run in another Lambda), so it is plain JSON.
 * It holds StoredKey and ServerKey: the caller must delete it once the exchange ends.
 */
export interface ScramState {
  hash: ScramHash;
  username: string;
  authzid?: string;
  gs2Header: string;
  clientFirstBare: string;
  serverFirst: string;
  /** Client nonce followed by the server's part. */
  nonce: string;
  storedKey: string;
  serverKey: string;
}

/** A fresh server nonce part: 18 random bytes as base64 (printable, never a comma). */
export function createServerNonce(): string {
  return randomBytes(18).toString('base64');
}

/** Build the server-first-message (RFC 5802 §7) for real or decoy credentials alike. */
export function serverFirst(
  clientFirst: ClientFirst,
  hash: ScramHash,
  credentials: ScramCredentials,
  serverNonceSuffix: string = createServerNonce(),
): { message: string; state: ScramState } {
  if (!PRINTABLE.test(serverNonceSuffix))
    throw new RangeError('server nonce must be printable ASCII without ","');
  const nonce = clientFirst.clientNonce + serverNonceSuffix;
  const message = `r=${nonce},s=${credentials.salt},i=${credentials.iterations}`;
  return {
    message,
    state: {
      hash,
      username: clientFirst.username,
      ...(clientFirst.authzid === undefined ? {} : { authzid: clientFirst.authzid }),
      gs2Header: clientFirst.gs2Header,
      clientFirstBare: clientFirst.clientFirstBare,
      serverFirst: message,
      nonce,
      storedKey: credentials.storedKey,
      serverKey: credentials.serverKey,
    },
  };
}

export type ClientFinalResult =
  | { ok: true; serverFinal: string }
  | { ok: false; reason: 'nonce-mismatch' | 'channel-bindings-dont-match' | 'invalid-proof' };

/**
 * Check the client-final-message (RFC 5802 §7) against the state from `serverFirst`. A
 * malformed message throws `SaslError('malformed-request')`; a wrong nonce, binding or proof
 * is `{ ok: false }` (the caller answers `not-authorized` for all of them). On success,
 * `serverFinal` (`v=...`) goes into `<success/>`.
 */
export function verifyClientFinal(state: ScramState, payload: string): ClientFinalResult {
  // client-final-message = client-final-message-without-proof "," proof; proof is last.
  const proofAt = payload.lastIndexOf(',p=');
  if (proofAt < 0) throw malformed('missing proof');
  const withoutProof = payload.slice(0, proofAt);
  const proofText = payload.slice(proofAt + 3);
  if (!BASE64.test(proofText) || proofText === '') throw malformed('proof is not base64', 'invalid-encoding');

  const parts = withoutProof.split(',');
  const channelBinding = attribute(parts[0], 'c');
  const nonce = attribute(parts[1], 'r');
  if (!BASE64.test(channelBinding) || channelBinding === '') {
    throw malformed('channel binding is not base64', 'invalid-encoding');
  }
  if (!PRINTABLE.test(nonce)) throw malformed('bad nonce');
  for (const extension of parts.slice(2)) {
    if (!/^[A-Za-z]=/.test(extension)) throw malformed('bad attribute in client-final');
  }

  const authMessage = `${state.clientFirstBare},${state.serverFirst},${withoutProof}`;
  const storedKey = Buffer.from(state.storedKey, 'base64');
  // The two HMACs and the hash run whatever the outcome, so a decoy costs what a real user does.
  const clientSignature = hmac(state.hash, storedKey, authMessage);
  const serverSignature = hmac(state.hash, Buffer.from(state.serverKey, 'base64'), authMessage);
  const proof = Buffer.from(proofText, 'base64');
  const proofFits = proof.length === clientSignature.length;
  const candidateStoredKey = digest(state.hash, xor(proofFits ? proof : clientSignature, clientSignature));
  const proofMatches = timingSafeEqual(candidateStoredKey, storedKey) && proofFits;

  // RFC 5802 §5.1: "The server MUST verify that the nonce sent by the client in the final
  // message is the same as the one sent by the server in its first message."
  if (nonce !== state.nonce) return { ok: false, reason: 'nonce-mismatch' };
  // RFC 5802 §6: without channel binding, c= is the base64 of the gs2 header as sent.
  if (Buffer.from(channelBinding, 'base64').toString('utf8') !== state.gs2Header) {
    return { ok: false, reason: 'channel-bindings-dont-match' };
  }
  if (!proofMatches) return { ok: false, reason: 'invalid-proof' };
  return { ok: true, serverFinal: `v=${serverSignature.toString('base64')}` };
}

// ---------------------------------------------------------------------------------------------
// PLAIN (RFC 4616)

export interface PlainMessage {
  authzid?: string;
  authcid: string;
  password: string;
}

/** Decode `[authzid] NUL authcid NUL passwd` (RFC 4616 §2). Throws `SaslError`. */
export function parsePlain(payload: string): PlainMessage {
  const fields = payload.split('\0');
  if (fields.length !== 3) throw malformed('PLAIN needs exactly authzid NUL authcid NUL password');
  const [authzid, authcid, password] = fields;
  // RFC 4616 §2: authcid = 1*SAFE, passwd = 1*SAFE; authzid may be empty.
  if (authcid === '') throw malformed('empty authentication identity');
  if (password === '') throw malformed('empty password');
  return { ...(authzid === '' ? {} : { authzid }), authcid, password };
}

/**
 * Check a PLAIN password against stored SCRAM keys: SaltedPassword from the stored salt and
 * iterations, then compare StoredKey in constant time. Runs PBKDF2 (the price of PLAIN), so
 * for an unknown user call it with `decoyCredentials` to spend the same time.
 */
export async function verifyPlain(
  password: string,
  hash: ScramHash,
  credentials: ScramCredentials,
): Promise<boolean> {
  let normalized: string;
  let acceptable = true;
  try {
    normalized = normalizePassword(password, 'query');
  } catch {
    // No stored password can contain what SASLprep prohibits; still do the work.
    normalized = password;
    acceptable = false;
  }
  const salted = await saltedPassword(
    normalized,
    hash,
    Buffer.from(credentials.salt, 'base64'),
    credentials.iterations,
  );
  const { storedKey } = keysFromSaltedPassword(hash, salted);
  const expected = Buffer.from(credentials.storedKey, 'base64');
  return expected.length === storedKey.length && timingSafeEqual(storedKey, expected) && acceptable;
}
