/**
 * `@smithy/core/checksum` as the functions' clients use it: only `Sha256`, the hash behind SigV4
 * signing (each client's `runtimeConfig.shared.js`). The package's `Sha256` is `node:crypto`
 * where it exists and otherwise a pure-JavaScript SHA-256, which a one-file bundle carries
 * whether or not it runs; on Lambda `node:crypto` always exists. The package's other checksums
 * (CRC32, MD5, blob and stream hashers) serve S3-like operations no Nimbus call makes.
 *
 * Nothing imports this file: `XmppFunction` (infra/constructs/xmpp-function.ts) aliases
 * `@smithy/core/checksum` to it when bundling a function. Tests, benches, the local runner and
 * the admin CLI run from source with the real module; test/unit/checksum.test.ts checks that
 * this one hashes and signs as the real one does.
 */
import { createHash, createHmac, type Hash, type Hmac } from 'node:crypto';

type SourceData = string | ArrayBuffer | ArrayBufferView;

function toBuffer(data: SourceData): string | Buffer {
  if (typeof data === 'string') return data;
  if (ArrayBuffer.isView(data)) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  return Buffer.from(data);
}

/** SHA-256, or HMAC-SHA-256 with a secret: the interface of the SDK's `Checksum`. */
export class Sha256 {
  readonly digestLength = 32;
  private hash: Hash | Hmac;
  private finished = false;

  constructor(private readonly secret?: SourceData) {
    this.hash = this.createHash();
  }

  update(data: SourceData): void {
    if (this.finished) throw new Error('Attempted to update an already finished hash.');
    this.hash.update(toBuffer(data));
  }

  async digest(): Promise<Uint8Array> {
    let buf: Buffer;
    if (this.secret) {
      // An HMAC cannot be copied: it is finished.
      this.finished = true;
      buf = this.hash.digest();
    } else {
      buf = (this.hash as Hash).copy().digest();
    }
    return new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
  }

  reset(): void {
    this.hash = this.createHash();
    this.finished = false;
  }

  private createHash(): Hash | Hmac {
    return this.secret ? createHmac('sha256', toBuffer(this.secret)) : createHash('sha256');
  }
}
