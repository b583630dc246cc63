/**
 * The client half of SCRAM (RFC 5802 §3), written apart from `shared/sasl/scram.ts` so tests
 * check the server against an independent implementation rather than against itself.
 */
import { createHash, createHmac, pbkdf2Sync } from 'node:crypto';
import { saslprep } from '@mongodb-js/saslprep';

export type ClientHash = 'sha1' | 'sha256';

export function scramClientFirst(username: string, clientNonce: string, gs2Header = 'n,,'): string {
  const saslname = username.replace(/=/g, '=3D').replace(/,/g, '=2C');
  return `${gs2Header}n=${saslname},r=${clientNonce}`;
}

export interface ClientFinal {
  message: string;
  /** The `v=` the server must answer with. */
  expectedServerFinal: string;
}

export function scramClientFinal(options: {
  hash: ClientHash;
  password: string;
  clientFirst: string;
  serverFirst: string;
  gs2Header?: string;
}): ClientFinal {
  const gs2Header = options.gs2Header ?? 'n,,';
  const clientFirstBare = options.clientFirst.slice(gs2Header.length);
  const attributes = new Map(options.serverFirst.split(',').map((part) => [part[0], part.slice(2)]));
  const nonce = attributes.get('r') ?? '';
  const salt = Buffer.from(attributes.get('s') ?? '', 'base64');
  const iterations = Number(attributes.get('i'));
  const keyLength = options.hash === 'sha1' ? 20 : 32;

  const salted = pbkdf2Sync(saslprep(options.password), salt, iterations, keyLength, options.hash);
  const clientKey = createHmac(options.hash, salted).update('Client Key').digest();
  const storedKey = createHash(options.hash).update(clientKey).digest();
  const serverKey = createHmac(options.hash, salted).update('Server Key').digest();
  const withoutProof = `c=${Buffer.from(gs2Header).toString('base64')},r=${nonce}`;
  const authMessage = `${clientFirstBare},${options.serverFirst},${withoutProof}`;
  const clientSignature = createHmac(options.hash, storedKey).update(authMessage).digest();
  const proof = Buffer.from(clientKey.map((byte, i) => byte ^ clientSignature[i]));
  const serverSignature = createHmac(options.hash, serverKey).update(authMessage).digest();
  return {
    message: `${withoutProof},p=${proof.toString('base64')}`,
    expectedServerFinal: `v=${serverSignature.toString('base64')}`,
  };
}
