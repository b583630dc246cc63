import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as real from '@smithy/core/checksum';
import { describe, expect, it } from 'vitest';
import * as stand from '../../functions/checksum.ts';

// functions/checksum.ts stands in for @smithy/core/checksum in the bundles (BUNDLE_ALIASES):
// every name the bundled clients import from it must be there, and hash and sign as the real one
// does (SigV4 signs every request with it: a difference would fail every call on AWS).
const MODULES = join(import.meta.dirname, '../../node_modules');
const BUNDLED = [
  '@aws-sdk/client-dynamodb',
  '@aws-sdk/client-apigatewaymanagementapi',
  '@aws-sdk/lib-dynamodb',
  '@aws-sdk/core',
  '@aws-sdk/util-dynamodb',
  '@smithy/core',
  '@smithy/signature-v4',
];

function importedNames(): Set<string> {
  const names = new Set<string>();
  for (const pkg of BUNDLED) {
    const dir = join(MODULES, pkg, 'dist-es');
    for (const entry of readdirSync(dir, { recursive: true, withFileTypes: true })) {
      if (!entry.isFile() || !entry.name.endsWith('.js')) continue;
      // The event-stream codec is not bundled (functions/event-streams.ts).
      if (entry.parentPath.includes('event-streams')) continue;
      const text = readFileSync(join(entry.parentPath, entry.name), 'utf8');
      for (const match of text.matchAll(/import\s*\{([^}]*)\}\s*from\s*"@smithy\/core\/checksum"/g)) {
        for (const name of (match[1] ?? '').split(',')) if (name.trim()) names.add(name.trim());
      }
    }
  }
  return names;
}

/** The real Sha256, typed as SigV4 uses it (its types say Uint8Array; it is given strings too). */
type Hasher = { update(d: unknown): void; digest(): Promise<Uint8Array>; reset(): void };
const realSha = (secret?: unknown) => new real.Sha256(secret as never) as unknown as Hasher;

async function hex(hash: { update(d: unknown): void; digest(): Promise<Uint8Array> }, ...parts: unknown[]) {
  for (const part of parts) hash.update(part);
  return Buffer.from(await hash.digest()).toString('hex');
}

describe('the checksum stand-in of the function bundles', () => {
  it('exports every name the bundled SDK packages import from the real one', () => {
    const names = importedNames();
    expect([...names].sort()).toEqual(['Sha256']);
    for (const name of names) expect(stand).toHaveProperty(name);
  });

  it('hashes as the real Sha256: strings, typed arrays, views into a larger buffer, several updates', async () => {
    const big = randomBytes(4096);
    const view = new Uint8Array(big.buffer, big.byteOffset + 7, 1000);
    const inputs: unknown[][] = [
      [''],
      ['GET\n/\n\nhost:dynamodb'],
      [randomBytes(100)],
      [view],
      ['a', randomBytes(3), 'b'],
    ];
    for (const parts of inputs) {
      expect(await hex(new stand.Sha256(), ...parts)).toBe(await hex(realSha(), ...parts));
    }
    // FIPS 180-2 "abc": ba7816bf 8f01cfea 414140de 5dae2223 b00361a3 96177a9c b410ff61 f20015ad
    expect(await hex(new stand.Sha256(), 'abc')).toBe(
      'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad',
    );
  });

  it('signs as the real Sha256 (HMAC) with string and binary secrets, as SigV4 chains them', async () => {
    // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
    expect(await hex(new stand.Sha256('Jefe'), 'what do ya want for nothing?')).toBe(
      '5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843',
    );
    let realKey: Uint8Array = Buffer.from('AWS4secret');
    let standKey: Uint8Array = Buffer.from('AWS4secret');
    for (const part of ['20261201', 'us-east-1', 'dynamodb', 'aws4_request']) {
      const r = realSha(realKey);
      r.update(part);
      realKey = await r.digest();
      const s = new stand.Sha256(standKey);
      s.update(part);
      standKey = await s.digest();
      expect(Buffer.from(standKey).toString('hex')).toBe(Buffer.from(realKey).toString('hex'));
    }
  });

  it('digests a plain hash more than once and resets as the real one; a finished HMAC refuses updates', async () => {
    const s = new stand.Sha256();
    const r = realSha();
    s.update('part one');
    r.update('part one');
    expect(Buffer.from(await s.digest())).toEqual(Buffer.from(await r.digest()));
    s.update(' and two');
    r.update(' and two');
    expect(Buffer.from(await s.digest())).toEqual(Buffer.from(await r.digest()));
    s.reset();
    r.reset();
    expect(await hex(s, 'x')).toBe(await hex(r, 'x'));
    const mac = new stand.Sha256('key');
    await mac.digest();
    expect(() => mac.update('more')).toThrow('already finished');
    mac.reset();
    expect(await hex(mac, 'y')).toBe(await hex(realSha('key'), 'y'));
  });
});
