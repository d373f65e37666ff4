/** Payload codecs of every frame type (docs/protocol.md section 4). Decoders consume the whole
 * payload and throw ProtocolError(MALFORMED) on anything else. */

import { DecodeError, Reader, concat, u16, u32, u64, u8, ascii } from "./bytes.js";
import {
  ACCOUNT_NAME_MAX,
  CREDENTIAL_FINALIZATION_SIZE,
  CREDENTIAL_REQUEST_SIZE,
  CREDENTIAL_RESPONSE_SIZE,
  ENCRYPTED_STORAGE_KEY_SIZE,
  ErrorCode,
  REASON_MAX,
  REGISTRATION_REQUEST_SIZE,
  REGISTRATION_RESPONSE_SIZE,
  REGISTRATION_TOKEN_MAX,
  REGISTRATION_UPLOAD_SIZE,
  RESUME_NONCE_SIZE,
  SESSION_HANDLE_SIZE,
  TAG_SIZE,
  USER_ID_SIZE,
  isEnumValue,
} from "./constants.js";
import { ProtocolError } from "./errors.js";

function decoding<T>(what: string, payload: Uint8Array, read: (r: Reader) => T): T {
  const reader = new Reader(payload);
  try {
    const value = read(reader);
    reader.end();
    return value;
  } catch (error) {
    if (error instanceof DecodeError) throw new ProtocolError(ErrorCode.MALFORMED, `${what}: ${error.message}`);
    throw error;
  }
}

function fixed(bytes: Uint8Array, size: number, what: string): Uint8Array {
  if (bytes.length !== size) throw new RangeError(`${what} must be ${size} bytes`);
  return bytes;
}

function readName(r: Reader): Uint8Array {
  const length = r.u8();
  if (length === 0) throw new DecodeError("account_name_len 0");
  return r.bytes(length);
}

function checkName(name: Uint8Array): void {
  if (name.length < 1 || name.length > ACCOUNT_NAME_MAX) throw new RangeError("an account name is 1..255 bytes");
}

// ---- ABORT and GOAWAY

export interface Abort {
  code: ErrorCode;
  reason: string;
}

function printableAscii(text: string): boolean {
  return /^[\x20-\x7e]*$/.test(text);
}

/** Make any text a valid reason: printable ASCII, at most 255 characters. */
export function cleanReason(text: string): string {
  return text.replace(/[^\x20-\x7e]/g, "?").slice(0, REASON_MAX);
}

export function encodeAbort(message: Abort): Uint8Array {
  if (!printableAscii(message.reason) || message.reason.length > REASON_MAX) throw new RangeError("reason: printable ASCII, at most 255");
  return concat(u16(message.code), u8(message.reason.length), ascii(message.reason));
}

export function decodeAbort(payload: Uint8Array): Abort {
  return decoding("ABORT/GOAWAY", payload, (r) => {
    const code = r.u16();
    if (!isEnumValue(ErrorCode, code)) throw new DecodeError("unknown error code");
    const reasonBytes = r.bytes(r.u8());
    const reason = String.fromCharCode(...reasonBytes);
    if (!printableAscii(reason)) throw new DecodeError("reason not printable ASCII");
    return { code: code as ErrorCode, reason };
  });
}

export const encodeGoAway = encodeAbort;
export const decodeGoAway = decodeAbort;

// ---- registration and login (clear)

export interface RegStart {
  accountName: Uint8Array;
  registrationRequest: Uint8Array;
  token: Uint8Array;
}

export function encodeRegStart(m: RegStart): Uint8Array {
  checkName(m.accountName);
  if (m.token.length > REGISTRATION_TOKEN_MAX) throw new RangeError("a registration token is at most 1024 bytes");
  return concat(
    u8(m.accountName.length),
    m.accountName,
    fixed(m.registrationRequest, REGISTRATION_REQUEST_SIZE, "registration_request"),
    u16(m.token.length),
    m.token,
  );
}

export function decodeRegStart(payload: Uint8Array): RegStart {
  return decoding("REG_START", payload, (r) => {
    const accountName = readName(r);
    const registrationRequest = r.bytes(REGISTRATION_REQUEST_SIZE);
    const tokenLength = r.u16();
    if (tokenLength > REGISTRATION_TOKEN_MAX) throw new DecodeError("token too long");
    return { accountName, registrationRequest, token: r.bytes(tokenLength) };
  });
}

function fixedCodec(what: string, size: number) {
  return {
    encode: (value: Uint8Array): Uint8Array => fixed(value, size, what).slice(),
    decode: (payload: Uint8Array): Uint8Array => decoding(what, payload, (r) => r.bytes(size)),
  };
}

export const RegResponseCodec = fixedCodec("REG_RESPONSE", REGISTRATION_RESPONSE_SIZE);
export const RegUploadCodec = fixedCodec("REG_UPLOAD", REGISTRATION_UPLOAD_SIZE);
export const LoginResponseCodec = fixedCodec("LOGIN_RESPONSE", CREDENTIAL_RESPONSE_SIZE);
export const LoginFinishCodec = fixedCodec("LOGIN_FINISH", CREDENTIAL_FINALIZATION_SIZE);

export interface LoginStart {
  accountName: Uint8Array;
  credentialRequest: Uint8Array;
}

export function encodeLoginStart(m: LoginStart): Uint8Array {
  checkName(m.accountName);
  return concat(u8(m.accountName.length), m.accountName, fixed(m.credentialRequest, CREDENTIAL_REQUEST_SIZE, "credential_request"));
}

export function decodeLoginStart(payload: Uint8Array): LoginStart {
  return decoding("LOGIN_START", payload, (r) => ({ accountName: readName(r), credentialRequest: r.bytes(CREDENTIAL_REQUEST_SIZE) }));
}

// ---- sealed payload layouts (section 4.2)

export interface SealedRecord {
  seq: bigint;
  /** ciphertext || tag */
  ciphertext: Uint8Array;
}

export function encodeRecord(m: SealedRecord): Uint8Array {
  if (m.ciphertext.length < TAG_SIZE) throw new RangeError("a record's ciphertext is at least the tag");
  return concat(u64(m.seq), m.ciphertext);
}

function readRecord(r: Reader): SealedRecord {
  const seq = r.u64();
  const ciphertext = r.rest();
  if (ciphertext.length < TAG_SIZE) throw new DecodeError("ciphertext shorter than the tag");
  return { seq, ciphertext };
}

export function decodeRecord(payload: Uint8Array): SealedRecord {
  return decoding("record", payload, readRecord);
}

export interface ResumeEnvelope {
  sessionHandle: Uint8Array;
  record: SealedRecord;
}

export function encodeResumeEnvelope(m: ResumeEnvelope): Uint8Array {
  return concat(fixed(m.sessionHandle, SESSION_HANDLE_SIZE, "session_handle"), encodeRecord(m.record));
}

export function decodeResumeEnvelope(payload: Uint8Array): ResumeEnvelope {
  return decoding("RESUME", payload, (r) => ({ sessionHandle: r.bytes(SESSION_HANDLE_SIZE), record: readRecord(r) }));
}

export interface ResumedEnvelope {
  serverNonce: Uint8Array;
  record: SealedRecord;
}

export function encodeResumedEnvelope(m: ResumedEnvelope): Uint8Array {
  return concat(fixed(m.serverNonce, RESUME_NONCE_SIZE, "server_nonce"), encodeRecord(m.record));
}

export function decodeResumedEnvelope(payload: Uint8Array): ResumedEnvelope {
  return decoding("RESUMED", payload, (r) => ({ serverNonce: r.bytes(RESUME_NONCE_SIZE), record: readRecord(r) }));
}

// ---- sealed plaintexts (section 4.3)

export const WelcomeCodec = fixedCodec("WELCOME", USER_ID_SIZE);

export interface CompleteRegistration {
  userId: Uint8Array;
  encryptedStorageKey: Uint8Array;
}

export function encodeCompleteRegistration(m: CompleteRegistration): Uint8Array {
  return concat(fixed(m.userId, USER_ID_SIZE, "user_id"), fixed(m.encryptedStorageKey, ENCRYPTED_STORAGE_KEY_SIZE, "encrypted_storage_key"));
}

export function decodeCompleteRegistration(payload: Uint8Array): CompleteRegistration {
  return decoding("COMPLETE_REGISTRATION", payload, (r) => ({
    userId: r.bytes(USER_ID_SIZE),
    encryptedStorageKey: r.bytes(ENCRYPTED_STORAGE_KEY_SIZE),
  }));
}

/** REQUEST and RESPONSE plaintexts. */
export interface RequestMessage {
  requestId: number;
  body: Uint8Array;
}

export function encodeRequestMessage(m: RequestMessage): Uint8Array {
  if (!Number.isInteger(m.requestId) || m.requestId < 1 || m.requestId > 0xffffffff) throw new RangeError("request id is 1..2^32-1");
  return concat(u32(m.requestId), m.body);
}

export function decodeRequestMessage(payload: Uint8Array): RequestMessage {
  return decoding("REQUEST/RESPONSE", payload, (r) => {
    const requestId = r.u32();
    if (requestId === 0) throw new DecodeError("request_id 0");
    return { requestId, body: r.rest() };
  });
}

export function encodeClose(code: ErrorCode): Uint8Array {
  return u16(code);
}

export function decodeClose(payload: Uint8Array): ErrorCode {
  return decoding("CLOSE", payload, (r) => {
    const code = r.u16();
    if (!isEnumValue(ErrorCode, code)) throw new DecodeError("unknown error code");
    return code as ErrorCode;
  });
}

export interface Resume {
  clientNonce: Uint8Array;
  receivedTotal: bigint;
}

export function encodeResume(m: Resume): Uint8Array {
  return concat(fixed(m.clientNonce, RESUME_NONCE_SIZE, "client_nonce"), u64(m.receivedTotal));
}

export function decodeResume(payload: Uint8Array): Resume {
  return decoding("RESUME plaintext", payload, (r) => ({ clientNonce: r.bytes(RESUME_NONCE_SIZE), receivedTotal: r.u64() }));
}

export function encodeResumed(): Uint8Array {
  return new Uint8Array(0);
}

export function decodeResumed(payload: Uint8Array): void {
  decoding("RESUMED plaintext", payload, () => undefined);
}
