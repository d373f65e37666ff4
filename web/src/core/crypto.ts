/** The channel's key schedule and records, key epochs, and the REG-3 storage-key wrap
 * (docs/protocol.md sections 4.3, 5 and 8.1). HKDF with HMAC-SHA3-256, ChaCha20-Poly1305. */

import { chacha20poly1305 } from "@noble/ciphers/chacha.js";
import { expand, hkdf } from "@noble/hashes/hkdf.js";
import { hmac } from "@noble/hashes/hmac.js";
import { sha3_256 } from "@noble/hashes/sha3.js";
import { ascii, concat, u64, u8 } from "./bytes.js";
import {
  CHANNEL_SALT,
  Direction,
  ENCRYPTED_STORAGE_KEY_SIZE,
  ErrorCode,
  FrameType,
  KEY_SIZE,
  LABEL_C2S_IV,
  LABEL_C2S_KEY,
  LABEL_EPOCH,
  LABEL_HANDLE,
  LABEL_RESUME_IV,
  LABEL_RESUME_KEY,
  LABEL_S2C_IV,
  LABEL_S2C_KEY,
  MASTER_KEY_INFO,
  MAX_SEQ,
  NONCE_SIZE,
  RESUME_NONCE_SIZE,
  SESSION_HANDLE_SIZE,
  STORAGE_KEY_AD_SUFFIX,
  TAG_SIZE,
  USER_ID_SIZE,
} from "./constants.js";
import { IntegrityFailure, LocalProtocolError, ProtocolError } from "./errors.js";
import { decodeRecord, encodeRecord } from "./messages.js";

/** Returns ``n`` cryptographically random bytes; injected everywhere randomness is needed. */
export type RandomSource = (n: number) => Uint8Array;

export function hkdfExtract(salt: Uint8Array, ikm: Uint8Array): Uint8Array {
  return hmac(sha3_256, salt, ikm);
}

export function hkdfExpand(prk: Uint8Array, info: Uint8Array, length: number): Uint8Array {
  return expand(sha3_256, prk, info, length);
}

export function sha3(data: Uint8Array): Uint8Array {
  return sha3_256(data);
}

/** ChaCha20-Poly1305 seal: ciphertext || tag. */
export function aeadSeal(key: Uint8Array, nonce: Uint8Array, plaintext: Uint8Array, ad: Uint8Array): Uint8Array {
  return chacha20poly1305(key, nonce, ad).encrypt(plaintext);
}

/** ChaCha20-Poly1305 open; null when the tag does not verify. */
export function aeadOpen(key: Uint8Array, nonce: Uint8Array, sealed: Uint8Array, ad: Uint8Array): Uint8Array | null {
  if (sealed.length < TAG_SIZE) return null;
  try {
    return chacha20poly1305(key, nonce, ad).decrypt(sealed);
  } catch {
    return null;
  }
}

export interface EpochKeys {
  c2sKey: Uint8Array;
  c2sIv: Uint8Array;
  s2cKey: Uint8Array;
  s2cIv: Uint8Array;
}

export interface KeySchedule {
  prk: Uint8Array;
  sessionHandle: Uint8Array;
  resumeKey: Uint8Array;
  resumeIv: Uint8Array;
  /** Key epoch 0, whose secret is ``prk``. */
  epoch: EpochKeys;
}

/** The four directional values of an epoch whose secret is ``secret`` (section 5.1). */
export function epochKeys(secret: Uint8Array): EpochKeys {
  return {
    c2sKey: hkdfExpand(secret, ascii(LABEL_C2S_KEY), KEY_SIZE),
    c2sIv: hkdfExpand(secret, ascii(LABEL_C2S_IV), NONCE_SIZE),
    s2cKey: hkdfExpand(secret, ascii(LABEL_S2C_KEY), KEY_SIZE),
    s2cIv: hkdfExpand(secret, ascii(LABEL_S2C_IV), NONCE_SIZE),
  };
}

export function keySchedule(sessionKey: Uint8Array): KeySchedule {
  const prk = hkdfExtract(ascii(CHANNEL_SALT), sessionKey);
  return {
    prk,
    sessionHandle: hkdfExpand(prk, ascii(LABEL_HANDLE), SESSION_HANDLE_SIZE),
    resumeKey: hkdfExpand(prk, ascii(LABEL_RESUME_KEY), KEY_SIZE),
    resumeIv: hkdfExpand(prk, ascii(LABEL_RESUME_IV), NONCE_SIZE),
    epoch: epochKeys(prk),
  };
}

/** The secret of a new key epoch (section 5.4). */
export function epochSecret(prk: Uint8Array, clientNonce: Uint8Array, serverNonce: Uint8Array): Uint8Array {
  if (clientNonce.length !== RESUME_NONCE_SIZE || serverNonce.length !== RESUME_NONCE_SIZE) throw new RangeError("epoch nonces are 32 bytes");
  return hkdfExpand(prk, concat(ascii(LABEL_EPOCH), clientNonce, serverNonce), KEY_SIZE);
}

/** nonce = iv XOR (0^4 || u64(seq)) */
export function recordNonce(iv: Uint8Array, seq: bigint): Uint8Array {
  const nonce = iv.slice();
  const counter = u64(seq);
  for (let i = 0; i < 8; i++) nonce[4 + i]! ^= counter[i]!;
  return nonce;
}

/** AD = session_handle || u8(dir) || u8(type) || u64(seq) */
export function recordAd(handle: Uint8Array, direction: Direction, type: FrameType, seq: bigint): Uint8Array {
  return concat(handle, u8(direction), u8(type), u64(seq));
}

/** A record's payload: u64(seq) || ChaCha20-Poly1305(key, nonce, plaintext, AD). */
export function sealRecord(
  key: Uint8Array,
  iv: Uint8Array,
  handle: Uint8Array,
  direction: Direction,
  type: FrameType,
  seq: bigint,
  plaintext: Uint8Array,
): Uint8Array {
  const ciphertext = aeadSeal(key, recordNonce(iv, seq), plaintext, recordAd(handle, direction, type, seq));
  return encodeRecord({ seq, ciphertext });
}

/** Open a record whose seq must be ``expected`` (or, with ``atLeast``, at or above it).
 * Returns the plaintext and the seq; any failure is ProtocolError(BAD_RECORD). */
export function openRecord(
  key: Uint8Array,
  iv: Uint8Array,
  handle: Uint8Array,
  direction: Direction,
  type: FrameType,
  payload: Uint8Array,
  expected: bigint,
  atLeast = false,
): { plaintext: Uint8Array; seq: bigint } {
  let record;
  try {
    record = decodeRecord(payload);
  } catch {
    throw new ProtocolError(ErrorCode.BAD_RECORD, "record too short");
  }
  const { seq, ciphertext } = record;
  if (seq >= MAX_SEQ) throw new ProtocolError(ErrorCode.BAD_RECORD, "record sequence number out of range");
  if (atLeast ? seq < expected : seq !== expected) throw new ProtocolError(ErrorCode.BAD_RECORD, "record out of sequence");
  const plaintext = aeadOpen(key, recordNonce(iv, seq), ciphertext, recordAd(handle, direction, type, seq));
  if (plaintext === null) throw new ProtocolError(ErrorCode.BAD_RECORD, "record failed authentication");
  return { plaintext, seq };
}

export type Role = "client" | "server";

/** One session's channel for one side: the current key epoch's counters, the resume key,
 * and the lifetime record counts that resumption compares (section 5.4). */
export class Channel {
  readonly sessionHandle: Uint8Array;
  // key material in private fields: not enumerable, not in util.inspect or JSON
  readonly #resumeKey: Uint8Array;
  readonly #resumeIv: Uint8Array;
  readonly #prk: Uint8Array;
  #keys: EpochKeys;
  sendSeq = 0n;
  recvSeq = 0n;
  /** Records sealed / opened over the session's life, all epochs. */
  sealedTotal = 0n;
  openedTotal = 0n;
  /** The client's next resume sequence number (the server's next expected one). */
  resumeSeq = 0n;

  constructor(
    sessionKey: Uint8Array,
    readonly role: Role,
  ) {
    const schedule = keySchedule(sessionKey);
    this.#prk = schedule.prk;
    this.sessionHandle = schedule.sessionHandle;
    this.#resumeKey = schedule.resumeKey;
    this.#resumeIv = schedule.resumeIv;
    this.#keys = schedule.epoch;
  }

  private get sendDirection(): Direction {
    return this.role === "client" ? Direction.CLIENT_TO_SERVER : Direction.SERVER_TO_CLIENT;
  }

  /** Whether a record other than CLOSE may still be sealed in this epoch (section 5.3). */
  get canSendNonClose(): boolean {
    return this.sendSeq < MAX_SEQ - 1n;
  }

  seal(type: FrameType, plaintext: Uint8Array): Uint8Array {
    if (this.sendSeq >= MAX_SEQ || (type !== FrameType.CLOSE && !this.canSendNonClose)) {
      throw new LocalProtocolError("the session's sequence numbers are used up; open a new session");
    }
    const [key, iv] = this.role === "client" ? [this.#keys.c2sKey, this.#keys.c2sIv] : [this.#keys.s2cKey, this.#keys.s2cIv];
    const payload = sealRecord(key, iv, this.sessionHandle, this.sendDirection, type, this.sendSeq, plaintext);
    this.sendSeq += 1n;
    this.sealedTotal += 1n;
    return payload;
  }

  /** Open the next record from the peer; counters change only on success. */
  open(type: FrameType, payload: Uint8Array): Uint8Array {
    const [key, iv, direction] =
      this.role === "client"
        ? [this.#keys.s2cKey, this.#keys.s2cIv, Direction.SERVER_TO_CLIENT]
        : [this.#keys.c2sKey, this.#keys.c2sIv, Direction.CLIENT_TO_SERVER];
    const { plaintext } = openRecord(key, iv, this.sessionHandle, direction, type, payload, this.recvSeq);
    this.recvSeq += 1n;
    this.openedTotal += 1n;
    return plaintext;
  }

  /** Client: seal a RESUME plaintext under the resume key at the next resume seq. */
  sealResume(plaintext: Uint8Array): Uint8Array {
    if (this.role !== "client") throw new LocalProtocolError("only a client seals RESUME");
    const payload = sealRecord(this.#resumeKey, this.#resumeIv, this.sessionHandle, Direction.CLIENT_TO_SERVER, FrameType.RESUME, this.resumeSeq, plaintext);
    this.resumeSeq += 1n;
    return payload;
  }

  /** Server: open a resume record whose seq is at or above the next expected one. */
  openResume(payload: Uint8Array): Uint8Array {
    const { plaintext, seq } = openRecord(this.#resumeKey, this.#resumeIv, this.sessionHandle, Direction.CLIENT_TO_SERVER, FrameType.RESUME, payload, this.resumeSeq, true);
    this.resumeSeq = seq + 1n;
    return plaintext;
  }

  toString(): string {
    return `<Channel ${this.role}>`;
  }

  /** Start the key epoch of the two nonces; both directions restart at seq 0. */
  startEpoch(clientNonce: Uint8Array, serverNonce: Uint8Array): void {
    this.#keys = epochKeys(epochSecret(this.#prk, clientNonce, serverNonce));
    this.sendSeq = 0n;
    this.recvSeq = 0n;
  }
}

// ---- REG-3: master key and the wrapped storage key

export function masterKey(exportKey: Uint8Array): Uint8Array {
  return hkdf(sha3_256, exportKey, undefined, ascii(MASTER_KEY_INFO), KEY_SIZE);
}

function storageKeyAd(userId: Uint8Array): Uint8Array {
  if (userId.length !== USER_ID_SIZE) throw new RangeError("user_id is 16 bytes");
  return concat(userId, ascii(STORAGE_KEY_AD_SUFFIX));
}

/** encrypted_storage_key = nonce || ChaCha20-Poly1305(master_key, nonce, storage_key, user_id || "storage key") */
export function wrapStorageKey(master: Uint8Array, userId: Uint8Array, storageKey: Uint8Array, nonce: Uint8Array): Uint8Array {
  if (storageKey.length !== KEY_SIZE || nonce.length !== NONCE_SIZE) throw new RangeError("storage key 32 bytes, nonce 12");
  return concat(nonce, aeadSeal(master, nonce, storageKey, storageKeyAd(userId)));
}

export function unwrapStorageKey(master: Uint8Array, userId: Uint8Array, wrapped: Uint8Array): Uint8Array {
  if (wrapped.length !== ENCRYPTED_STORAGE_KEY_SIZE) throw new IntegrityFailure("the encrypted storage key has the wrong size");
  const key = aeadOpen(master, wrapped.subarray(0, NONCE_SIZE), wrapped.subarray(NONCE_SIZE), storageKeyAd(userId));
  if (key === null) throw new IntegrityFailure("the encrypted storage key does not open under this account's master key");
  return key;
}
