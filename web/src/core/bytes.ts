/** Byte helpers: hex, concatenation, big-endian integers, a strict reader, constant-time compare. */

/** Bytes that do not parse (a short payload, trailing bytes, a value out of range). */
export class DecodeError extends Error {
  override name = "DecodeError";
}

export function concat(...parts: Uint8Array[]): Uint8Array {
  let total = 0;
  for (const part of parts) total += part.length;
  const out = new Uint8Array(total);
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

export function toHex(bytes: Uint8Array): string {
  let out = "";
  for (const b of bytes) out += b.toString(16).padStart(2, "0");
  return out;
}

export function fromHex(text: string): Uint8Array {
  if (text.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(text)) throw new DecodeError("not hex");
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return out;
}

const encoder = new TextEncoder();
export function ascii(text: string): Uint8Array {
  return encoder.encode(text);
}
export function utf8(text: string): Uint8Array {
  return encoder.encode(text);
}
/** Decode UTF-8 strictly (invalid bytes are an error, not U+FFFD). */
export function fromUtf8(bytes: Uint8Array): string {
  return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
}

export function u8(value: number): Uint8Array {
  if (!Number.isInteger(value) || value < 0 || value > 0xff) throw new RangeError("u8 out of range");
  return Uint8Array.of(value);
}
export function u16(value: number): Uint8Array {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff) throw new RangeError("u16 out of range");
  return Uint8Array.of(value >>> 8, value & 0xff);
}
export function u32(value: number): Uint8Array {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) throw new RangeError("u32 out of range");
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, value);
  return out;
}
export const U64_MAX = (1n << 64n) - 1n;
export function u64(value: bigint): Uint8Array {
  if (value < 0n || value > U64_MAX) throw new RangeError("u64 out of range");
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, value);
  return out;
}

/** Reads fields in order; every read past the end is a DecodeError; ``end`` refuses trailing bytes. */
export class Reader {
  private offset = 0;
  constructor(private readonly data: Uint8Array) {}

  get remaining(): number {
    return this.data.length - this.offset;
  }
  bytes(n: number): Uint8Array {
    if (n < 0 || this.offset + n > this.data.length) throw new DecodeError("payload too short");
    const out = this.data.slice(this.offset, this.offset + n);
    this.offset += n;
    return out;
  }
  u8(): number {
    return this.bytes(1)[0]!;
  }
  u16(): number {
    const b = this.bytes(2);
    return (b[0]! << 8) | b[1]!;
  }
  u32(): number {
    const b = this.bytes(4);
    return new DataView(b.buffer, b.byteOffset, 4).getUint32(0);
  }
  u64(): bigint {
    const b = this.bytes(8);
    return new DataView(b.buffer, b.byteOffset, 8).getBigUint64(0);
  }
  rest(): Uint8Array {
    return this.bytes(this.remaining);
  }
  /** The whole payload must have been consumed. */
  end(): void {
    if (this.remaining !== 0) throw new DecodeError("trailing bytes");
  }
}

/** Compare two byte strings in time that depends only on their lengths. */
export function ctEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i]! ^ b[i]!;
  return diff === 0;
}

/** Overwrite a secret buffer (best effort: copies made by libraries are out of reach). */
export function wipe(buffer: Uint8Array | null | undefined): void {
  if (buffer) buffer.fill(0);
}
