import { describe, expect, it } from 'vitest';
import {
  type ClientFirst,
  decodeSaslPayload,
  decoyCredentials,
  deriveScramCredentials,
  encodeSaslPayload,
  parseClientFirst,
  parsePlain,
  SaslError,
  type ScramHash,
  type ScramState,
  serverFirst,
  verifyClientFinal,
  verifyPlain,
} from '../../shared/sasl/scram.ts';
import { scramClientFinal, scramClientFirst } from '../support/scram-client.ts';

function saslError(run: () => unknown): SaslError {
  try {
    run();
  } catch (error) {
    if (error instanceof SaslError) return error;
    throw error;
  }
  throw new Error('expected a SaslError');
}

/** A whole exchange between the test client and the server functions. */
async function exchange(hash: ScramHash, storedPassword: string, typedPassword: string, gs2Header = 'n,,') {
  const credentials = await deriveScramCredentials(storedPassword, hash, 4096);
  const clientFirstText = scramClientFirst('juliet', 'clientnonce123', gs2Header);
  const first = serverFirst(parseClientFirst(clientFirstText), hash, credentials);
  const final = scramClientFinal({
    hash,
    password: typedPassword,
    clientFirst: clientFirstText,
    serverFirst: first.message,
    gs2Header,
  });
  return { state: first.state, final, result: verifyClientFinal(first.state, final.message) };
}

describe('RFC 5802 §5 SCRAM-SHA-1 example', () => {
  //    This is a simple example of a SCRAM-SHA-1 authentication exchange
  //    when the client doesn't support channel bindings (username 'user' and
  //    password 'pencil' are used):
  //
  //    C: n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL
  //    S: r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,
  //       i=4096
  //    C: c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,
  //       p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=
  //    S: v=rmF9pqV8S7suAoZWja4dJRkFsKQ=
  const clientFirst = 'n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL';
  const expectedServerFirst = 'r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096';
  const clientFinal = 'c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=';

  it('reproduces the server side of the exchange from stored keys only', async () => {
    const credentials = await deriveScramCredentials('pencil', 'sha1', 4096, 'QSXCR+Q6sek8bf92');
    const parsed = parseClientFirst(clientFirst);
    expect(parsed).toEqual({
      gs2Header: 'n,,',
      username: 'user',
      clientNonce: 'fyko+d2lbbFgONRv9qkxdawL',
      clientFirstBare: 'n=user,r=fyko+d2lbbFgONRv9qkxdawL',
    });
    const first = serverFirst(parsed, 'sha1', credentials, '3rfcNHYJY1ZVvWVs7j');
    expect(first.message).toBe(expectedServerFirst);
    expect(verifyClientFinal(first.state, clientFinal)).toEqual({
      ok: true,
      serverFinal: 'v=rmF9pqV8S7suAoZWja4dJRkFsKQ=',
    });
  });

  it('the independent test client computes the RFC proof too', () => {
    const final = scramClientFinal({
      hash: 'sha1',
      password: 'pencil',
      clientFirst,
      serverFirst: expectedServerFirst,
    });
    expect(final).toEqual({ message: clientFinal, expectedServerFinal: 'v=rmF9pqV8S7suAoZWja4dJRkFsKQ=' });
  });

  it('the state survives a JSON round trip (it is stored in DynamoDB between frames)', async () => {
    const credentials = await deriveScramCredentials('pencil', 'sha1', 4096, 'QSXCR+Q6sek8bf92');
    const { state } = serverFirst(parseClientFirst(clientFirst), 'sha1', credentials, '3rfcNHYJY1ZVvWVs7j');
    const restored = JSON.parse(JSON.stringify(state)) as ScramState;
    expect(verifyClientFinal(restored, clientFinal).ok).toBe(true);
  });
});

describe('RFC 7677 §3 SCRAM-SHA-256 example', () => {
  //    This is a simple example of a SCRAM-SHA-256 authentication exchange
  //    when the client doesn't support channel bindings.  The username 'user'
  //    and password 'pencil' are being used.
  //
  //    C: n,,n=user,r=rOprNGfwEbeRWgbNEkqO
  //    S: r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,
  //       s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096
  //    C: c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,
  //       p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=
  //    S: v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=
  it('reproduces the server side of the exchange from stored keys only', async () => {
    const credentials = await deriveScramCredentials('pencil', 'sha256', 4096, 'W22ZaJ0SNY7soEsUEjb6gQ==');
    const first = serverFirst(
      parseClientFirst('n,,n=user,r=rOprNGfwEbeRWgbNEkqO'),
      'sha256',
      credentials,
      '%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0',
    );
    expect(first.message).toBe(
      'r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096',
    );
    const result = verifyClientFinal(
      first.state,
      'c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=',
    );
    expect(result).toEqual({ ok: true, serverFinal: 'v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=' });
  });
});

describe('SCRAM exchanges', () => {
  for (const hash of ['sha1', 'sha256'] as const) {
    it(`${hash}: the right password succeeds and the server proves itself`, async () => {
      const { result, final } = await exchange(hash, 'correct horse', 'correct horse');
      expect(result).toEqual({ ok: true, serverFinal: final.expectedServerFinal });
    });

    it(`${hash}: a wrong password is refused`, async () => {
      const { result } = await exchange(hash, 'correct horse', 'battery staple');
      expect(result).toEqual({ ok: false, reason: 'invalid-proof' });
    });
  }

  it("accepts gs2 flag 'y' (client supports binding, thinks we do not) and binds c= to it", async () => {
    const { result } = await exchange('sha256', 'pw', 'pw', 'y,,');
    expect(result.ok).toBe(true);
  });

  it('refuses a client-final whose c= does not echo the gs2 header (downgrade)', async () => {
    const { state, final } = await exchange('sha256', 'pw', 'pw', 'y,,');
    const tampered = final.message.replace('c=eSws', 'c=biws');
    expect(verifyClientFinal(state, tampered)).toEqual({ ok: false, reason: 'channel-bindings-dont-match' });
  });

  it('refuses a nonce that is not the combined one', async () => {
    const { state, final } = await exchange('sha1', 'pw', 'pw');
    const tampered = final.message.replace(`r=${state.nonce}`, 'r=clientnonce123');
    expect(verifyClientFinal(state, tampered)).toEqual({ ok: false, reason: 'nonce-mismatch' });
  });

  it('refuses a proof with one bit flipped, and one of the wrong length', async () => {
    const { state, final } = await exchange('sha256', 'pw', 'pw');
    const proof = Buffer.from(final.message.split(',p=')[1], 'base64');
    proof[0] ^= 1;
    const flipped = `${final.message.split(',p=')[0]},p=${proof.toString('base64')}`;
    expect(verifyClientFinal(state, flipped)).toEqual({ ok: false, reason: 'invalid-proof' });
    const short = `${final.message.split(',p=')[0]},p=${proof.subarray(0, 20).toString('base64')}`;
    expect(verifyClientFinal(state, short)).toEqual({ ok: false, reason: 'invalid-proof' });
  });

  it('SASLprep: a non-ASCII password matches its normalised form (RFC 4013)', async () => {
    // U+00AA FEMININE ORDINAL INDICATOR maps to "a" under NFKC; U+00A0 NO-BREAK SPACE maps to
    // U+0020 (RFC 4013 §2.1); U+00AD SOFT HYPHEN maps to nothing (RFC 3454 B.1).
    const stored = 'p\u00aass\u00a0w\u00adord';
    expect((await exchange('sha256', stored, 'pass word')).result.ok).toBe(true);
    expect((await exchange('sha1', 'pass word', stored)).result.ok).toBe(true);
    // Composed and decomposed forms of "é" are one password after NFKC.
    expect((await exchange('sha256', 'caf\u00e9', 'cafe\u0301')).result.ok).toBe(true);
    expect((await exchange('sha256', 'café', 'cafe')).result.ok).toBe(false);
  });

  it('SASLprep: a password with prohibited characters cannot be stored', async () => {
    // RFC 4013 §2.3: control characters are prohibited output.
    await expect(deriveScramCredentials('bad\u0007pw', 'sha256', 4096)).rejects.toThrow(RangeError);
    await expect(deriveScramCredentials('\u00ad', 'sha256', 4096)).rejects.toThrow(/empty/);
  });

  it('refuses fewer than 4096 iterations', async () => {
    await expect(deriveScramCredentials('pw', 'sha1', 4095)).rejects.toThrow(RangeError);
  });

  it('derives a fresh random salt for each call', async () => {
    const a = await deriveScramCredentials('pw', 'sha256', 4096);
    const b = await deriveScramCredentials('pw', 'sha256', 4096);
    expect(Buffer.from(a.salt, 'base64')).toHaveLength(16);
    expect(a.salt).not.toBe(b.salt);
    expect(a.storedKey).not.toBe(b.storedKey);
  });
});

describe('parseClientFirst', () => {
  it('decodes =2C and =3D in the username and reads an authzid', () => {
    expect(parseClientFirst('n,a=ju=2Cliet@example.com,n=a=3Db=2Cc,r=abc,x=ext')).toEqual({
      gs2Header: 'n,a=ju=2Cliet@example.com,',
      authzid: 'ju,liet@example.com',
      username: 'a=b,c',
      clientNonce: 'abc',
      clientFirstBare: 'n=a=3Db=2Cc,r=abc,x=ext',
    });
  });

  it("refuses channel binding 'p=' with its own reason, as no -PLUS is offered", () => {
    const error = saslError(() => parseClientFirst('p=tls-exporter,,n=user,r=abc'));
    expect(error.condition).toBe('malformed-request');
    expect(error.scramError).toBe('channel-binding-not-supported');
  });

  const malformedCases: [string, string][] = [
    ['empty', ''],
    ['no gs2 header', 'n=user,r=abc'],
    ['one comma only', 'n,n=user,r=abc'],
    ['unknown cbind flag', 'x,,n=user,r=abc'],
    ['authzid without a=', 'n,user,n=user,r=abc'],
    ['no username', 'n,,r=abc'],
    ['empty username', 'n,,n=,r=abc'],
    ['bad escape in username', 'n,,n=us=2Ber,r=abc'],
    ['lone = in username', 'n,,n=user=,r=abc'],
    ['no nonce', 'n,,n=user'],
    ['empty nonce', 'n,,n=user,r='],
    ['nonce with a non-printable character', 'n,,n=user,r=ab c'],
    ['reserved m= extension', 'n,,m=x,n=user,r=abc'],
    ['attributes out of order', 'n,,r=abc,n=user'],
    ['garbage after the nonce', 'n,,n=user,r=abc,garbage'],
  ];
  for (const [name, payload] of malformedCases) {
    it(`malformed-request: ${name}`, () => {
      expect(saslError(() => parseClientFirst(payload)).condition).toBe('malformed-request');
    });
  }
});

describe('verifyClientFinal on malformed messages', () => {
  const clientFirst: ClientFirst = parseClientFirst('n,,n=user,r=abc');
  const { state } = serverFirst(
    clientFirst,
    'sha256',
    { salt: 'c2FsdA==', iterations: 4096, storedKey: 'A'.repeat(44), serverKey: 'B'.repeat(44) },
    'def',
  );
  const cases: [string, string][] = [
    ['empty', ''],
    ['no proof', 'c=biws,r=abcdef'],
    ['proof not base64', 'c=biws,r=abcdef,p=!!!'],
    ['empty proof', 'c=biws,r=abcdef,p='],
    ['no channel binding', 'r=abcdef,p=AAAA'],
    ['channel binding not base64', 'c=b i,r=abcdef,p=AAAA'],
    ['no nonce', 'c=biws,p=AAAA'],
    ['bad extension', 'c=biws,r=abcdef,junk,p=AAAA'],
  ];
  for (const [name, payload] of cases) {
    it(`malformed-request: ${name}`, () => {
      expect(saslError(() => verifyClientFinal(state, payload)).condition).toBe('malformed-request');
    });
  }
});

describe('decoy credentials for unknown users (no enumeration)', () => {
  const secret = 'server-secret';

  it('give a stable, plausible salt and the configured iteration count', () => {
    const a = decoyCredentials('nobody@localhost', 'sha256', secret, 4096);
    const b = decoyCredentials('nobody@localhost', 'sha256', secret, 4096);
    expect(a.salt).toBe(b.salt);
    expect(Buffer.from(a.salt, 'base64')).toHaveLength(16);
    expect(a.iterations).toBe(4096);
    expect(decoyCredentials('other@localhost', 'sha256', secret, 4096).salt).not.toBe(a.salt);
    expect(decoyCredentials('nobody@localhost', 'sha1', secret, 4096).salt).not.toBe(a.salt);
    expect(decoyCredentials('nobody@localhost', 'sha256', 'another-secret', 4096).salt).not.toBe(a.salt);
  });

  it('produce a server-first shaped like a real one, and a final that always fails', () => {
    const clientFirstText = scramClientFirst('nobody', 'nonce1');
    const decoy = decoyCredentials('nobody@localhost', 'sha256', secret, 4096);
    const first = serverFirst(parseClientFirst(clientFirstText), 'sha256', decoy);
    expect(first.message).toMatch(/^r=nonce1[A-Za-z0-9+/=]{24},s=[A-Za-z0-9+/]{22}==,i=4096$/);
    for (const password of ['', 'pencil', 'nobody']) {
      const final = scramClientFinal({
        hash: 'sha256',
        password,
        clientFirst: clientFirstText,
        serverFirst: first.message,
      });
      expect(verifyClientFinal(first.state, final.message)).toEqual({ ok: false, reason: 'invalid-proof' });
    }
  });
});

describe('PLAIN (RFC 4616)', () => {
  it('parses authzid, authcid and password', () => {
    expect(parsePlain('\0tim\0tanstaaftanstaaf')).toEqual({ authcid: 'tim', password: 'tanstaaftanstaaf' });
    expect(parsePlain('Ursel\0Kurt\0xipj3plmq')).toEqual({
      authzid: 'Ursel',
      authcid: 'Kurt',
      password: 'xipj3plmq',
    });
  });

  const malformedCases: [string, string][] = [
    ['empty', ''],
    ['no NUL', 'timpassword'],
    ['one NUL', 'tim\0password'],
    ['three NULs', '\0tim\0pass\0word'],
    ['empty authcid', 'authz\0\0password'],
    ['empty password', '\0tim\0'],
  ];
  for (const [name, payload] of malformedCases) {
    it(`malformed-request: ${name}`, () => {
      expect(saslError(() => parsePlain(payload)).condition).toBe('malformed-request');
    });
  }

  for (const hash of ['sha1', 'sha256'] as const) {
    it(`${hash}: verifies against stored SCRAM keys, SASLprep applied`, async () => {
      const credentials = await deriveScramCredentials('p\u00aass', hash, 4096);
      expect(await verifyPlain('pass', hash, credentials)).toBe(true);
      expect(await verifyPlain('p\u00aass', hash, credentials)).toBe(true);
      expect(await verifyPlain('Pass', hash, credentials)).toBe(false);
      expect(await verifyPlain('pass\u0007', hash, credentials)).toBe(false);
    });
  }

  it('a decoy never verifies', async () => {
    const decoy = decoyCredentials('nobody@localhost', 'sha256', 'secret', 4096);
    expect(await verifyPlain('', 'sha256', decoy)).toBe(false);
    expect(await verifyPlain('pencil', 'sha256', decoy)).toBe(false);
  });
});

describe('SASL payload encoding (RFC 6120 §6.4.2)', () => {
  it('round-trips text and treats "=" as empty', () => {
    expect(decodeSaslPayload(encodeSaslPayload('n,,n=user,r=é'))).toBe('n,,n=user,r=é');
    expect(encodeSaslPayload('')).toBe('=');
    expect(decodeSaslPayload('=')).toBe('');
    expect(decodeSaslPayload('')).toBe('');
  });

  it('refuses what is not strict base64 or not UTF-8 with incorrect-encoding', () => {
    for (const text of ['bi ws', 'biw', 'biws=', 'b!ws', 'Zm9v\nYmFy']) {
      expect(saslError(() => decodeSaslPayload(text)).condition).toBe('incorrect-encoding');
    }
    expect(saslError(() => decodeSaslPayload(Buffer.from([0xff, 0xfe]).toString('base64'))).condition).toBe(
      'incorrect-encoding',
    );
  });
});
