/** Frames: the 10-byte header and a receive buffer that checks it before any payload (section 3). */

import { concat, u32, u8 } from "./bytes.js";
import { ErrorCode, FrameType, HEADER_SIZE, MAX_SESSION_ID, PROTOCOL_VERSION, isEnumValue } from "./constants.js";
import { ProtocolError } from "./errors.js";

export interface FrameHeader {
  type: FrameType;
  sessionId: number;
  length: number;
}

export interface Frame {
  type: FrameType;
  sessionId: number;
  payload: Uint8Array;
}

export function encodeFrame(type: FrameType, sessionId: number, payload: Uint8Array): Uint8Array {
  if (sessionId < 0 || sessionId > MAX_SESSION_ID) throw new RangeError("session id out of range");
  return concat(u8(PROTOCOL_VERSION), u8(type), u32(sessionId), u32(payload.length), payload);
}

/** Check a header in the order of section 3.1; any failure is a connection error. */
export function decodeHeader(header: Uint8Array, maxPayload: number): FrameHeader {
  if (header.length !== HEADER_SIZE) throw new ProtocolError(ErrorCode.MALFORMED, "truncated frame header");
  if (header[0] !== PROTOCOL_VERSION) throw new ProtocolError(ErrorCode.UNSUPPORTED_VERSION, "unsupported protocol version");
  const type = header[1]!;
  if (!isEnumValue(FrameType, type)) throw new ProtocolError(ErrorCode.MALFORMED, "unknown frame type");
  const view = new DataView(header.buffer, header.byteOffset, HEADER_SIZE);
  const sessionId = view.getUint32(2);
  if (sessionId > MAX_SESSION_ID) throw new ProtocolError(ErrorCode.BAD_SESSION_ID, "session id over the cap");
  const length = view.getUint32(6);
  if (length > maxPayload) throw new ProtocolError(ErrorCode.FRAME_TOO_LARGE, "frame payload over the limit");
  return { type: type as FrameType, sessionId, length };
}

/** Reassembles frames from a byte stream. After an error it stays failed and yields nothing. */
export class FrameBuffer {
  private chunks: Uint8Array[] = [];
  private buffered = 0;
  private header: FrameHeader | null = null;

  constructor(readonly maxPayload: number) {}

  /** Add bytes; return the complete frames they finish. Throws ProtocolError on a bad header. */
  feed(data: Uint8Array): Frame[] {
    if (data.length > 0) {
      this.chunks.push(data);
      this.buffered += data.length;
    }
    const frames: Frame[] = [];
    for (;;) {
      if (this.header === null) {
        if (this.buffered < HEADER_SIZE) break;
        this.header = decodeHeader(this.take(HEADER_SIZE), this.maxPayload);
      }
      if (this.buffered < this.header.length) break;
      const payload = this.take(this.header.length);
      frames.push({ type: this.header.type, sessionId: this.header.sessionId, payload });
      this.header = null;
    }
    return frames;
  }

  /** Bytes of an unfinished frame are waiting. */
  get pending(): boolean {
    return this.buffered > 0 || this.header !== null;
  }

  private take(n: number): Uint8Array {
    const all = this.chunks.length === 1 ? this.chunks[0]! : concat(...this.chunks);
    const out = all.slice(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.buffered = rest.length;
    return out;
  }
}
