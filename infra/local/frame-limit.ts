/**
 * API Gateway's frame limit, which `ws` cannot enforce: `maxPayload` bounds a whole message
 * (128 KB on AWS), while API Gateway also refuses any single frame from a client above 32 KB
 * and closes the socket with 1009. A browser sends each message as one frame, so for browsers
 * 32 KB is the real message limit; a client that fragments may still send 128 KB.
 *
 * The watcher reads the raw bytes the client sends, before `ws` does, and follows the frame
 * headers (RFC 6455 §5.2) without copying payloads.
 */

/** Opcodes from 0x8 up are control frames, whose payload RFC 6455 caps at 125 bytes anyway. */
const FIRST_CONTROL_OPCODE = 0x8;
const EMPTY = Buffer.alloc(0);

interface FrameHeader {
  opcode: number;
  headerLength: number;
  payloadLength: number;
}

/** The header at `offset`, or undefined while its bytes have not all arrived. */
function readHeader(data: Buffer, offset: number): FrameHeader | undefined {
  if (data.length - offset < 2) return undefined;
  const opcode = data[offset] & 0x0f;
  const masked = (data[offset + 1] & 0x80) !== 0;
  const length7 = data[offset + 1] & 0x7f;
  const extended = length7 === 126 ? 2 : length7 === 127 ? 8 : 0;
  const headerLength = 2 + extended + (masked ? 4 : 0);
  if (data.length - offset < headerLength) return undefined;
  let payloadLength = length7;
  if (extended === 2) payloadLength = data.readUInt16BE(offset + 2);
  else if (extended === 8) payloadLength = Number(data.readBigUInt64BE(offset + 2));
  return { opcode, headerLength, payloadLength };
}

/**
 * Returns a `data` listener for the client's socket that calls `onOversized` once, on the
 * header of the first data frame whose payload exceeds `maxFrameBytes` (before its payload
 * has arrived, so the frame never reaches the queue), and ignores the rest of the stream.
 */
export function watchFrameSizes(maxFrameBytes: number, onOversized: () => void): (chunk: Buffer) => void {
  let pending = EMPTY;
  let payloadToSkip = 0;
  let tripped = false;
  return (chunk) => {
    if (tripped) return;
    const data = pending.length > 0 ? Buffer.concat([pending, chunk]) : chunk;
    pending = EMPTY;
    let offset = 0;
    while (offset < data.length) {
      if (payloadToSkip > 0) {
        const skipped = Math.min(payloadToSkip, data.length - offset);
        payloadToSkip -= skipped;
        offset += skipped;
        continue;
      }
      const header = readHeader(data, offset);
      if (header === undefined) {
        // At most 13 bytes of an incomplete header are kept.
        pending = Buffer.from(data.subarray(offset));
        return;
      }
      if (header.opcode < FIRST_CONTROL_OPCODE && header.payloadLength > maxFrameBytes) {
        tripped = true;
        onOversized();
        return;
      }
      offset += header.headerLength;
      payloadToSkip = header.payloadLength;
    }
  };
}
