import { describe, expect, test } from 'vitest';
import { watchFrameSizes } from '../../infra/local/frame-limit.ts';

/** A masked client frame (RFC 6455 §5.2) with `length` payload bytes. */
function clientFrame(opcode: number, length: number, fin = true): Buffer {
  const extended = length > 0xffff ? 8 : length > 125 ? 2 : 0;
  const header = Buffer.alloc(2 + extended + 4);
  header[0] = (fin ? 0x80 : 0) | opcode;
  header[1] = 0x80 | (extended === 8 ? 127 : extended === 2 ? 126 : length);
  if (extended === 2) header.writeUInt16BE(length, 2);
  if (extended === 8) header.writeBigUInt64BE(BigInt(length), 2);
  header.writeUInt32BE(0x01020304, 2 + extended);
  return Buffer.concat([header, Buffer.alloc(length, 0x61)]);
}

function feed(stream: Buffer, chunkSize: number): number {
  let trips = 0;
  const watch = watchFrameSizes(32 * 1024, () => {
    trips += 1;
  });
  for (let start = 0; start < stream.length; start += chunkSize)
    watch(stream.subarray(start, start + chunkSize));
  return trips;
}

describe('the 32 KB client frame limit', () => {
  const withinLimits = Buffer.concat([
    clientFrame(0x1, 10),
    clientFrame(0x1, 32 * 1024),
    clientFrame(0x9, 4),
    clientFrame(0x1, 32 * 1024, false),
    clientFrame(0x0, 32 * 1024, false),
    clientFrame(0x0, 200),
  ]);
  const oversized = Buffer.concat([
    clientFrame(0x1, 300),
    clientFrame(0x1, 32 * 1024 + 1),
    clientFrame(0x1, 5),
  ]);
  const oversizedContinuation = Buffer.concat([clientFrame(0x1, 100, false), clientFrame(0x0, 70_000)]);

  for (const chunkSize of [1, 3, 13, 1024, 1 << 20]) {
    test(`headers are followed across chunks of ${chunkSize} bytes`, () => {
      expect(feed(withinLimits, chunkSize)).toBe(0);
      expect(feed(oversized, chunkSize)).toBe(1);
      expect(feed(oversizedContinuation, chunkSize)).toBe(1);
    });
  }
});
