/** The TypeScript core against EVERY entry of EVERY file in tests/vectors/ (docs/protocol.md).
 * A file with no checker here fails the first test, so a new vector file is never skipped; a
 * top-level section of a file its checker never reads fails that file's test. */

import { test } from "node:test";
import assert from "node:assert/strict";
import { chacha20poly1305 } from "@noble/ciphers/chacha.js";
import { hkdf } from "@noble/hashes/hkdf.js";
import { sha3_256 } from "@noble/hashes/sha3.js";
import { Reader, ascii, concat, fromUtf8, toHex, u16, u32, u64, u8, utf8 } from "../src/core/bytes.js";
import * as C from "../src/core/constants.js";
import { Action, AuditType, Context, Direction, ErrorCode, FrameType, Op, Outcome, SecretKind, Status } from "../src/core/constants.js";
import {
  Channel,
  epochKeys,
  epochSecret,
  keySchedule,
  masterKey,
  openRecord,
  recordAd,
  recordNonce,
  sealRecord,
  unwrapStorageKey,
  wrapStorageKey,
} from "../src/core/crypto.js";
import { ProtocolError } from "../src/core/errors.js";
import { FrameBuffer, decodeHeader, encodeFrame } from "../src/core/framing.js";
import * as M from "../src/core/messages.js";
import {
  PortableError,
  auditChainHash,
  auditChainPreimage,
  decodeAuditEntry,
  decodePortable,
  decodeRequest,
  decodeResponse,
  deriveKeyId,
  encodeAuditEntry,
  encodePortable,
  encodeRequest,
  encodeResponse,
  jointPreimage,
  jointR,
  keyIdPreimage,
  labelAd,
  openLabel,
  openSecret,
  sealLabel,
  sealSecret,
  secretAd,
  verifyAuditChain,
  type ChainedAuditEntry,
  type OpRequest,
  type OpResponse,
} from "../src/core/ops.js";
import { ClientConnection, type ClientEvent } from "../src/core/connection.js";
import { READ_OPS, ReplyCache } from "./fakeserver.js";
import { fakeOpaque, h, loadVector as loadVectorFile, vectorFiles } from "./support.js";

/* eslint-disable @typescript-eslint/no-explicit-any */
type J = any;

const hexOrNull = (b: Uint8Array | null): string | null => (b === null ? null : toHex(b));
const enumValue = (e: object, name: string): number => {
  const value = (e as Record<string, unknown>)[name];
  assert.equal(typeof value, "number", `unknown enum name ${name}`);
  return value as number;
};
const enumName = (e: Record<number, string>, value: number): string => e[value]!;

function expectCode(fn: () => unknown, code: ErrorCode, why: string): void {
  assert.throws(fn, (error: unknown) => error instanceof ProtocolError && error.code === code, why);
}

const checkers: Record<string, () => void> = {};

/** The top-level sections each checker read, by file: a section no checker reads fails the
 * file's test, so a section added to a vector file is not silently left out either. */
const sectionsRead = new Map<string, Set<string>>();

/** A vector file, its top-level sections recorded as the checker reads them. */
function loadVector(name: string): J {
  const data: J = loadVectorFile(name);
  const read = sectionsRead.get(name) ?? new Set<string>();
  sectionsRead.set(name, read);
  return new Proxy(data, {
    get(target, key, receiver) {
      if (typeof key === "string") read.add(key);
      return Reflect.get(target, key, receiver);
    },
  });
}

// ------------------------------------------------------------------ framing.json
checkers["framing.json"] = () => {
  const data = loadVector("framing.json");
  const seenTypes = new Set<number>();
  for (const v of data.frames as J[]) {
    const type = enumValue(FrameType, v.frame_type);
    assert.equal(type, v.type_byte, v.frame_type);
    assert.equal(C.isSealed(type), v.sealed, v.frame_type);
    const frame = encodeFrame(type, v.session_id, h(v.payload));
    assert.equal(toHex(frame), v.frame, v.frame_type);
    const parsed = new FrameBuffer(C.DEFAULT_MAX_PAYLOAD).feed(frame);
    assert.equal(parsed.length, 1);
    assert.deepEqual([parsed[0]!.type, parsed[0]!.sessionId, toHex(parsed[0]!.payload)], [type, v.session_id, v.payload]);
    seenTypes.add(type);
  }
  // every FrameType has its framing vector
  for (const value of Object.values(FrameType).filter((x) => typeof x === "number")) assert.ok(seenTypes.has(value as number), `no frame of type ${value}`);
  for (const v of data.headers as J[]) {
    const raw = h(v.header);
    if (v.accepted) {
      assert.deepEqual(decodeHeader(raw, v.max_payload), { type: enumValue(FrameType, v.accepted.frame_type), sessionId: v.accepted.session_id, length: v.accepted.length }, v.name);
    } else {
      expectCode(() => decodeHeader(raw, v.max_payload), enumValue(ErrorCode, v.error), v.name);
      // the receive buffer reports the same as soon as the 10 header bytes are there
      if (raw.length === C.HEADER_SIZE) expectCode(() => new FrameBuffer(v.max_payload).feed(raw), enumValue(ErrorCode, v.error), v.name);
    }
  }
};

// ------------------------------------------------------------------ messages.json
interface Codec {
  encode(f: J): Uint8Array;
  decode(b: Uint8Array): J;
}
const record = (f: J): M.SealedRecord => ({ seq: BigInt(f.seq), ciphertext: h(f.ciphertext) });
const recordJson = (r: M.SealedRecord): J => ({ seq: Number(r.seq), ciphertext: toHex(r.ciphertext) });
const abortCodec: Codec = {
  encode: (f) => M.encodeAbort({ code: enumValue(ErrorCode, f.code), reason: f.reason }),
  decode: (b) => {
    const m = M.decodeAbort(b);
    return { code: enumName(ErrorCode, m.code), reason: m.reason };
  },
};
const fixedCodec = (field: string, codec: { encode(v: Uint8Array): Uint8Array; decode(b: Uint8Array): Uint8Array }): Codec => ({
  encode: (f) => codec.encode(h(f[field])),
  decode: (b) => ({ [field]: toHex(codec.decode(b)) }),
});
const messageCodecs: Record<string, Codec> = {
  GoAway: abortCodec,
  Abort: abortCodec,
  RegStart: {
    encode: (f) => M.encodeRegStart({ accountName: h(f.account_name), registrationRequest: h(f.registration_request), token: h(f.token) }),
    decode: (b) => {
      const m = M.decodeRegStart(b);
      return { account_name: toHex(m.accountName), registration_request: toHex(m.registrationRequest), token: toHex(m.token) };
    },
  },
  RegResponse: fixedCodec("registration_response", M.RegResponseCodec),
  RegUpload: fixedCodec("registration_upload", M.RegUploadCodec),
  LoginStart: {
    encode: (f) => M.encodeLoginStart({ accountName: h(f.account_name), credentialRequest: h(f.credential_request) }),
    decode: (b) => {
      const m = M.decodeLoginStart(b);
      return { account_name: toHex(m.accountName), credential_request: toHex(m.credentialRequest) };
    },
  },
  LoginResponse: fixedCodec("credential_response", M.LoginResponseCodec),
  LoginFinish: fixedCodec("credential_finalization", M.LoginFinishCodec),
  Record: { encode: (f) => M.encodeRecord(record(f)), decode: (b) => recordJson(M.decodeRecord(b)) },
  ResumeEnvelope: {
    encode: (f) => M.encodeResumeEnvelope({ sessionHandle: h(f.session_handle), record: record(f.record) }),
    decode: (b) => {
      const m = M.decodeResumeEnvelope(b);
      return { session_handle: toHex(m.sessionHandle), record: recordJson(m.record) };
    },
  },
  ResumedEnvelope: {
    encode: (f) => M.encodeResumedEnvelope({ serverNonce: h(f.server_nonce), record: record(f.record) }),
    decode: (b) => {
      const m = M.decodeResumedEnvelope(b);
      return { server_nonce: toHex(m.serverNonce), record: recordJson(m.record) };
    },
  },
  Welcome: fixedCodec("user_id", M.WelcomeCodec),
  CompleteRegistration: {
    encode: (f) => M.encodeCompleteRegistration({ userId: h(f.user_id), encryptedStorageKey: h(f.encrypted_storage_key) }),
    decode: (b) => {
      const m = M.decodeCompleteRegistration(b);
      return { user_id: toHex(m.userId), encrypted_storage_key: toHex(m.encryptedStorageKey) };
    },
  },
  Request: {
    encode: (f) => M.encodeRequestMessage({ requestId: f.request_id, body: h(f.body) }),
    decode: (b) => {
      const m = M.decodeRequestMessage(b);
      return { request_id: m.requestId, body: toHex(m.body) };
    },
  },
  Close: { encode: (f) => M.encodeClose(enumValue(ErrorCode, f.code)), decode: (b) => ({ code: enumName(ErrorCode, M.decodeClose(b)) }) },
  Resume: {
    encode: (f) => M.encodeResume({ clientNonce: h(f.client_nonce), receivedTotal: BigInt(f.received_total) }),
    decode: (b) => {
      const m = M.decodeResume(b);
      return { client_nonce: toHex(m.clientNonce), received_total: Number(m.receivedTotal) };
    },
  },
  Resumed: {
    encode: () => M.encodeResumed(),
    decode: (b) => {
      M.decodeResumed(b);
      return {};
    },
  },
};
messageCodecs.Response = messageCodecs.Request!;

checkers["messages.json"] = () => {
  const data = loadVector("messages.json");
  for (const v of data.vectors as J[]) {
    const codec = messageCodecs[v.class];
    assert.ok(codec, `no codec for message class ${v.class}`);
    assert.equal(toHex(codec.encode(v.fields)), v.encoding, v.name);
    assert.deepEqual(codec.decode(h(v.encoding)), v.fields, v.name);
    if (v.frame_type !== null) assert.equal(C.isSealed(enumValue(FrameType, v.frame_type)), v.sealed, v.name);
  }
  for (const v of data.rejected as J[]) {
    const codec = messageCodecs[v.class];
    assert.ok(codec, `no codec for message class ${v.class}`);
    expectCode(() => codec.decode(h(v.encoding)), ErrorCode.MALFORMED, `${v.class}: ${v.why}`);
  }
};

// ------------------------------------------------------------------ key_schedule.json
const LABEL_CONSTANTS: Record<string, string> = {
  CHANNEL_SALT: C.CHANNEL_SALT,
  LABEL_HANDLE: C.LABEL_HANDLE,
  LABEL_C2S_KEY: C.LABEL_C2S_KEY,
  LABEL_C2S_IV: C.LABEL_C2S_IV,
  LABEL_S2C_KEY: C.LABEL_S2C_KEY,
  LABEL_S2C_IV: C.LABEL_S2C_IV,
  LABEL_RESUME_KEY: C.LABEL_RESUME_KEY,
  LABEL_RESUME_IV: C.LABEL_RESUME_IV,
  LABEL_EPOCH: C.LABEL_EPOCH,
};

function scheduleJson(sessionKey: Uint8Array): J {
  const s = keySchedule(sessionKey);
  return {
    prk: toHex(s.prk),
    session_handle: toHex(s.sessionHandle),
    c2s_key: toHex(s.epoch.c2sKey),
    c2s_iv: toHex(s.epoch.c2sIv),
    s2c_key: toHex(s.epoch.s2cKey),
    s2c_iv: toHex(s.epoch.s2cIv),
    resume_key: toHex(s.resumeKey),
    resume_iv: toHex(s.resumeIv),
  };
}

checkers["key_schedule.json"] = () => {
  const data = loadVector("key_schedule.json");
  assert.deepEqual(data.labels, LABEL_CONSTANTS);
  assert.ok(data.vectors.length > 0);
  for (const v of data.vectors as J[]) {
    const { session_key, ...expected } = v;
    assert.deepEqual(scheduleJson(h(session_key)), expected);
  }
};

// ------------------------------------------------------------------ channel.json
checkers["channel.json"] = () => {
  const data = loadVector("channel.json");
  const schedule = scheduleJson(h(data.session_key));
  assert.deepEqual(schedule, data.schedule);
  const handle = h(schedule.session_handle);
  const keysOf = (direction: Direction) =>
    direction === Direction.CLIENT_TO_SERVER ? [h(schedule.c2s_key), h(schedule.c2s_iv)] : [h(schedule.s2c_key), h(schedule.s2c_iv)];
  for (const v of data.records as J[]) {
    const direction = enumValue(Direction, v.direction) as Direction;
    assert.equal(direction, v.sender === "client" ? Direction.CLIENT_TO_SERVER : Direction.SERVER_TO_CLIENT);
    const type = enumValue(FrameType, v.frame_type) as FrameType;
    const seq = BigInt(v.seq);
    const [key, iv] = keysOf(direction) as [Uint8Array, Uint8Array];
    assert.equal(toHex(recordNonce(iv, seq)), v.nonce);
    assert.equal(toHex(recordAd(handle, direction, type, seq)), v.ad);
    assert.equal(toHex(sealRecord(key, iv, handle, direction, type, seq, h(v.plaintext))), v.record);
    assert.equal(toHex(openRecord(key, iv, handle, direction, type, h(v.record), seq).plaintext), v.plaintext);
  }
  for (const v of data.rejections as J[]) {
    // the receiver opens what the other side sends
    const direction = v.receiver === "server" ? Direction.CLIENT_TO_SERVER : Direction.SERVER_TO_CLIENT;
    const [key, iv] = keysOf(direction) as [Uint8Array, Uint8Array];
    expectCode(() => openRecord(key, iv, handle, direction, enumValue(FrameType, v.frame_type), h(v.record), BigInt(v.expected_seq)), ErrorCode.BAD_RECORD, v.why);
  }
};

// ------------------------------------------------------------------ storage_key.json
checkers["storage_key.json"] = () => {
  const data = loadVector("storage_key.json");
  assert.equal(data.master_key_info, C.MASTER_KEY_INFO);
  assert.equal(data.storage_key_ad_suffix, C.STORAGE_KEY_AD_SUFFIX);
  for (const v of data.vectors as J[]) {
    const master = masterKey(h(v.export_key));
    assert.equal(toHex(master), v.master_key);
    assert.equal(v.associated_data, v.user_id + toHex(ascii(C.STORAGE_KEY_AD_SUFFIX)));
    assert.equal(toHex(wrapStorageKey(master, h(v.user_id), h(v.storage_key), h(v.nonce))), v.encrypted_storage_key);
    assert.equal(toHex(unwrapStorageKey(master, h(v.user_id), h(v.encrypted_storage_key))), v.storage_key);
  }
};

// ------------------------------------------------------------------ key_id.json
checkers["key_id.json"] = () => {
  const data = loadVector("key_id.json");
  assert.equal(data.domain, C.KEY_ID_DOMAIN);
  assert.equal(data.contribution_domain, C.KEY_ID_CONTRIBUTION_DOMAIN);
  for (const v of data.vectors as J[]) {
    assert.equal(toHex(keyIdPreimage(h(v.user_id), h(v.r))), v.preimage);
    assert.equal(toHex(deriveKeyId(h(v.user_id), h(v.r))), v.key_id);
    assert.ok(v.sha3_256.startsWith(v.key_id));
  }
  for (const v of data.joint as J[]) {
    assert.equal(toHex(jointPreimage(h(v.client_nonce), h(v.server_nonce))), v.r_preimage);
    assert.equal(toHex(jointR(h(v.client_nonce), h(v.server_nonce))), v.r);
    assert.equal(toHex(deriveKeyId(h(v.user_id), h(v.r))), v.key_id);
  }
};

// ------------------------------------------------------------------ secrets.json
checkers["secrets.json"] = () => {
  const data = loadVector("secrets.json");
  for (const v of data.vectors as J[]) {
    const kind = enumValue(SecretKind, v.kind) as SecretKind;
    const ad = secretAd(h(v.user_id), h(v.key_id), kind);
    assert.equal(toHex(ad), v.associated_data);
    assert.equal(toHex(sealSecret(h(v.storage_key), h(v.user_id), h(v.key_id), kind, h(v.secret), h(v.nonce))), v.sealed);
    assert.equal(toHex(openSecret(h(v.storage_key), ad, h(v.sealed))!), v.secret);
  }
};

// ------------------------------------------------------------------ labels.json
checkers["labels.json"] = () => {
  const data = loadVector("labels.json");
  assert.equal(data.label_ad_domain, C.LABEL_AD_DOMAIN);
  assert.equal(data.label_pad_size, C.LABEL_PAD_SIZE);
  for (const v of data.vectors as J[]) {
    assert.equal(toHex(labelAd(h(v.user_id), h(v.key_id))), v.associated_data);
    assert.equal(toHex(sealLabel(h(v.storage_key), h(v.user_id), h(v.key_id), h(v.label_utf8), h(v.nonce))), v.sealed);
    assert.equal(openLabel(h(v.storage_key), h(v.user_id), h(v.key_id), h(v.sealed)), fromUtf8(h(v.label_utf8)));
    // the plaintext sealed is the padded label, and a label sealed unpadded (older clients) opens too
    assert.equal(toHex(openSecret(h(v.storage_key), labelAd(h(v.user_id), h(v.key_id)), h(v.sealed))!), v.padded);
    assert.equal(openLabel(h(v.storage_key), h(v.user_id), h(v.key_id), h(v.sealed_unpadded)), fromUtf8(h(v.label_utf8)));
  }
};

// ------------------------------------------------------------------ portable.json
checkers["portable.json"] = () => {
  const data = loadVector("portable.json");
  for (const v of data.valid as J[]) {
    assert.equal(toHex(encodePortable(h(v.secret))), v.portable);
    assert.equal(toHex(decodePortable(h(v.portable))), v.secret);
  }
  for (const v of data.rejected as J[]) assert.throws(() => decodePortable(h(v.portable)), PortableError, v.why);
  for (const n of data.unencodable_secret_lengths as number[]) assert.throws(() => encodePortable(new Uint8Array(n)), PortableError, `length ${n}`);
};

// ------------------------------------------------------------------ audit_chain.json
function chained(rows: [number, string, string][]): ChainedAuditEntry[] {
  return rows.map(([id, encoding, hash]) => {
    const entry = decodeAuditEntry(h(encoding));
    assert.equal(entry.entryId, BigInt(id));
    assert.equal(toHex(encodeAuditEntry(entry)), encoding);
    return { ...entry, chainHash: h(hash) };
  });
}

checkers["audit_chain.json"] = () => {
  const data = loadVector("audit_chain.json");
  const userId = h(data.user_id);
  let previous = data.genesis as string;
  assert.equal(previous, "00".repeat(32));
  const rows: [number, string, string][] = [];
  for (const v of data.chain as J[]) {
    assert.equal(v.previous, previous);
    assert.equal(toHex(auditChainPreimage(userId, h(v.previous), h(v.encoding))), v.preimage);
    assert.equal(toHex(auditChainHash(userId, h(v.previous), h(v.encoding))), v.hash);
    previous = v.hash;
    rows.push([v.entry_id, v.encoding, v.hash]);
  }
  const fail = (reason: string) => new Error(reason);
  const head = verifyAuditChain(userId, chained(rows), null, fail);
  assert.deepEqual(head, { position: BigInt(rows.length), hash: h(previous) });
  assert.ok(data.tampered.length > 0);
  for (const v of data.tampered as J[]) {
    const entries = chained(v.entries);
    if ((v.why as string).startsWith("history forked")) {
      // consistent on its own: only the head verified before (the genuine last entry) tells
      assert.equal(verifyAuditChain(userId, entries, null, fail)?.position, BigInt(entries.length), v.why);
      assert.throws(() => verifyAuditChain(userId, entries, head, fail), /forked/, v.why);
    } else {
      assert.throws(() => verifyAuditChain(userId, entries, null, fail), Error, v.why);
    }
  }
};

// ------------------------------------------------------------------ ops.json
const REQUEST_CLASSES: Record<string, Op> = {
  RetrieveStorageKeyRequest: Op.RETRIEVE_STORAGE_KEY,
  CreateKeyIdRequest: Op.CREATE_KEY_ID,
  StoreSecretRequest: Op.STORE_SECRET,
  RetrieveRequest: Op.RETRIEVE,
  AuditRequest: Op.AUDIT,
  ListKeysRequest: Op.LIST_KEYS,
  DeleteKeyRequest: Op.DELETE_KEY,
  ChangePasswordStartRequest: Op.CHANGE_PASSWORD_START,
  ChangePasswordFinishRequest: Op.CHANGE_PASSWORD_FINISH,
  DeleteAccountRequest: Op.DELETE_ACCOUNT,
  RenameKeyRequest: Op.RENAME_KEY,
};
const RESPONSE_CLASSES: Record<string, Op[]> = {
  StorageKeyResponse: [Op.RETRIEVE_STORAGE_KEY],
  KeyIdResponse: [Op.CREATE_KEY_ID],
  StoredResponse: [Op.STORE_SECRET],
  SecretResponse: [Op.RETRIEVE],
  AuditResponse: [Op.AUDIT],
  KeyListResponse: [Op.LIST_KEYS],
  PasswordRegistrationResponse: [Op.CHANGE_PASSWORD_START],
  Empty: [Op.DELETE_KEY, Op.CHANGE_PASSWORD_FINISH, Op.DELETE_ACCOUNT, Op.RENAME_KEY],
};

const optBig = (x: number | null): bigint | null => (x === null ? null : BigInt(x));
const optNum = (x: bigint | null): number | null => (x === null ? null : Number(x));

export function requestFromJson(cls: string, f: J): OpRequest {
  const op = REQUEST_CLASSES[cls];
  assert.ok(op !== undefined, `no request class ${cls}`);
  const userId = h(f.user_id);
  switch (op) {
    case Op.RETRIEVE_STORAGE_KEY:
    case Op.DELETE_ACCOUNT:
      return { op, userId };
    case Op.CREATE_KEY_ID:
      return { op, userId, kind: enumValue(SecretKind, f.kind), clientNonce: h(f.client_nonce) };
    case Op.STORE_SECRET:
      return {
        op,
        userId,
        keyId: h(f.key_id),
        kind: enumValue(SecretKind, f.kind),
        sealed: h(f.ciphertext),
        next: f.next_kind === null ? null : { kind: enumValue(SecretKind, f.next_kind), clientNonce: h(f.next_client_nonce) },
      };
    case Op.RETRIEVE:
      return { op, userId, keyId: h(f.key_id), context: enumValue(Context, f.context) };
    case Op.AUDIT:
      return {
        op,
        userId,
        auditType: enumValue(AuditType, f.audit_type),
        keyIds: (f.key_ids as string[]).map(h),
        after: optBig(f.after),
        before: optBig(f.before),
        cursor: BigInt(f.cursor),
        limit: f.limit,
      };
    case Op.LIST_KEYS:
      return { op, userId, cursor: f.cursor, limit: f.limit };
    case Op.DELETE_KEY:
      return { op, userId, keyId: h(f.key_id) };
    case Op.CHANGE_PASSWORD_START:
      return { op, userId, registrationRequest: h(f.registration_request) };
    case Op.CHANGE_PASSWORD_FINISH:
      return { op, userId, registrationUpload: h(f.registration_upload), encryptedStorageKey: h(f.encrypted_storage_key) };
    case Op.RENAME_KEY:
      return { op, userId, keyId: h(f.key_id), sealedLabel: h(f.sealed_label) };
  }
  throw new Error("unreachable");
}

export function requestToJson(r: OpRequest): J {
  const base = { user_id: toHex(r.userId) };
  switch (r.op) {
    case Op.RETRIEVE_STORAGE_KEY:
    case Op.DELETE_ACCOUNT:
      return base;
    case Op.CREATE_KEY_ID:
      return { ...base, kind: enumName(SecretKind, r.kind), client_nonce: toHex(r.clientNonce) };
    case Op.STORE_SECRET:
      return {
        ...base,
        key_id: toHex(r.keyId),
        kind: enumName(SecretKind, r.kind),
        ciphertext: toHex(r.sealed),
        next_kind: r.next === null ? null : enumName(SecretKind, r.next.kind),
        next_client_nonce: r.next === null ? null : toHex(r.next.clientNonce),
      };
    case Op.RETRIEVE:
      return { ...base, key_id: toHex(r.keyId), context: enumName(Context, r.context) };
    case Op.AUDIT:
      return {
        ...base,
        audit_type: enumName(AuditType, r.auditType),
        key_ids: r.keyIds.map(toHex),
        after: optNum(r.after),
        before: optNum(r.before),
        cursor: Number(r.cursor),
        limit: r.limit,
      };
    case Op.LIST_KEYS:
      return { ...base, cursor: r.cursor, limit: r.limit };
    case Op.DELETE_KEY:
      return { ...base, key_id: toHex(r.keyId) };
    case Op.CHANGE_PASSWORD_START:
      return { ...base, registration_request: toHex(r.registrationRequest) };
    case Op.CHANGE_PASSWORD_FINISH:
      return { ...base, registration_upload: toHex(r.registrationUpload), encrypted_storage_key: toHex(r.encryptedStorageKey) };
    case Op.RENAME_KEY:
      return { ...base, key_id: toHex(r.keyId), sealed_label: toHex(r.sealedLabel) };
  }
}

function entryFromJson(e: J): ChainedAuditEntry {
  return {
    entryId: BigInt(e.entry_id),
    action: enumValue(Action, e.action),
    timestamp: BigInt(e.timestamp),
    outcome: enumValue(Outcome, e.outcome),
    count: e.count,
    keyId: e.key_id === null ? null : h(e.key_id),
    context: e.context === null ? null : enumValue(Context, e.context),
    chainHash: h(e.chain_hash),
  };
}

function entryToJson(e: ChainedAuditEntry): J {
  return {
    entry_id: Number(e.entryId),
    action: enumName(Action, e.action),
    timestamp: Number(e.timestamp),
    outcome: enumName(Outcome, e.outcome),
    key_id: hexOrNull(e.keyId),
    context: e.context === null ? null : enumName(Context, e.context),
    count: e.count,
    chain_hash: toHex(e.chainHash),
  };
}

export function okFieldsFromJson(op: Op, f: J): J {
  switch (op) {
    case Op.RETRIEVE_STORAGE_KEY:
      return { encryptedStorageKey: h(f.encrypted_storage_key) };
    case Op.CREATE_KEY_ID:
      return { keyId: h(f.key_id), serverNonce: h(f.server_nonce) };
    case Op.STORE_SECRET:
      return { next: f.next_key_id === null ? null : { keyId: h(f.next_key_id), serverNonce: h(f.next_server_nonce) } };
    case Op.RETRIEVE:
      return { kind: enumValue(SecretKind, f.kind), sealed: h(f.ciphertext), associatedData: h(f.associated_data) };
    case Op.AUDIT:
      return { entries: (f.entries as J[]).map(entryFromJson), nextCursor: BigInt(f.next_cursor) };
    case Op.LIST_KEYS:
      return {
        keys: (f.keys as J[]).map((k) => ({ keyId: h(k.key_id), kind: enumValue(SecretKind, k.kind), created: BigInt(k.created), sealedLabel: h(k.sealed_label) })),
        nextCursor: f.next_cursor,
      };
    case Op.CHANGE_PASSWORD_START:
      return { registrationResponse: h(f.registration_response) };
    default:
      return {};
  }
}

export function okFieldsToJson(op: Op, f: J): J {
  switch (op) {
    case Op.RETRIEVE_STORAGE_KEY:
      return { encrypted_storage_key: toHex(f.encryptedStorageKey) };
    case Op.CREATE_KEY_ID:
      return { key_id: toHex(f.keyId), server_nonce: toHex(f.serverNonce) };
    case Op.STORE_SECRET:
      return { next_key_id: f.next === null ? null : toHex(f.next.keyId), next_server_nonce: f.next === null ? null : toHex(f.next.serverNonce) };
    case Op.RETRIEVE:
      return { kind: enumName(SecretKind, f.kind), ciphertext: toHex(f.sealed), associated_data: toHex(f.associatedData) };
    case Op.AUDIT:
      return { entries: (f.entries as ChainedAuditEntry[]).map(entryToJson), next_cursor: Number(f.nextCursor) };
    case Op.LIST_KEYS:
      return {
        keys: (f.keys as J[]).map((k) => ({ key_id: toHex(k.keyId), kind: enumName(SecretKind, k.kind), created: Number(k.created), sealed_label: toHex(k.sealedLabel) })),
        next_cursor: f.nextCursor,
      };
    case Op.CHANGE_PASSWORD_START:
      return { registration_response: toHex(f.registrationResponse) };
    default:
      return {};
  }
}

checkers["ops.json"] = () => {
  const data = loadVector("ops.json");
  const opsSeen = new Set<Op>();
  for (const v of data.requests as J[]) {
    const request = requestFromJson(v.class, v.fields);
    assert.equal(request.op, enumValue(Op, v.op), v.name);
    assert.equal(toHex(encodeRequest(request)), v.encoding, v.name);
    assert.deepEqual(requestToJson(decodeRequest(h(v.encoding))), v.fields, v.name);
    opsSeen.add(request.op);
  }
  for (const value of Object.values(Op).filter((x) => typeof x === "number")) assert.ok(opsSeen.has(value as Op), `no request vector for op ${value}`);
  for (const v of data.responses as J[]) {
    const op = enumValue(Op, v.op) as Op;
    const status = enumValue(Status, v.status) as Status;
    const decoded = decodeResponse(op, h(v.encoding));
    assert.equal(decoded.status, status, v.name);
    if (status === Status.OK) {
      assert.ok(RESPONSE_CLASSES[v.class]?.includes(op), `${v.name}: class ${v.class} for ${v.op}`);
      assert.deepEqual(okFieldsToJson(op, (decoded as { fields: J }).fields), v.fields, v.name);
      const response = { status: Status.OK, fields: okFieldsFromJson(op, v.fields) } as OpResponse;
      assert.equal(toHex(encodeResponse(op, response)), v.encoding, v.name);
    } else {
      assert.equal(v.class, null);
      assert.equal(v.encoding.length, 2, "a refusal is one byte");
      assert.equal(toHex(encodeResponse(op, { status } as OpResponse)), v.encoding, v.name);
    }
  }
  for (const v of data.rejected_requests as J[]) assert.throws(() => decodeRequest(h(v.encoding)), Error, v.why);
};

// ------------------------------------------------------------------ resumption.json
checkers["resumption.json"] = () => {
  const d = loadVector("resumption.json");
  const schedule = keySchedule(h(d.session_key));
  assert.equal(toHex(schedule.sessionHandle), d.session_handle);
  assert.equal(toHex(schedule.resumeKey), d.resume_key);
  assert.equal(toHex(schedule.resumeIv), d.resume_iv);
  // the client: its resume record at its resume seq, with the count of records it received
  const client = new Channel(h(d.session_key), "client");
  client.resumeSeq = BigInt(d.resume_seq);
  const plaintext = M.encodeResume({ clientNonce: h(d.client_nonce), receivedTotal: BigInt(d.received_total) });
  assert.equal(toHex(plaintext), d.resume_plaintext);
  const resumeRecord = client.sealResume(plaintext);
  assert.equal(toHex(resumeRecord), d.resume_record);
  const payload = M.encodeResumeEnvelope({ sessionHandle: client.sessionHandle, record: M.decodeRecord(resumeRecord) });
  assert.equal(toHex(payload), d.resume_payload);
  assert.equal(toHex(encodeFrame(FrameType.RESUME, d.new_session_id, payload)), d.resume_frame);
  // the epoch
  const secret = epochSecret(schedule.prk, h(d.client_nonce), h(d.server_nonce));
  assert.equal(toHex(secret), d.epoch_secret);
  const epoch = epochKeys(secret);
  assert.deepEqual(
    { c2s_key: toHex(epoch.c2sKey), c2s_iv: toHex(epoch.c2sIv), s2c_key: toHex(epoch.s2cKey), s2c_iv: toHex(epoch.s2cIv) },
    d.epoch,
  );
  // the server: accepts a resume seq at or above the next it expects (an earlier RESUME was
  // lost), refuses the same record again, and a received count above what it has sealed
  const server = new Channel(h(d.session_key), "server");
  const envelope = M.decodeResumeEnvelope(h(d.resume_payload));
  assert.equal(toHex(envelope.sessionHandle), d.session_handle);
  const opened = M.decodeResume(server.openResume(M.encodeRecord(envelope.record)));
  assert.equal(toHex(opened.clientNonce), d.client_nonce);
  assert.ok(opened.receivedTotal <= BigInt(d.server_sent_total));
  assert.equal(d.replay_rejected, true);
  expectCode(() => server.openResume(M.encodeRecord(envelope.record)), ErrorCode.BAD_RECORD, "replayed RESUME");
  const rollback = M.decodeResume(server.openResume(h(d.rollback_record)));
  assert.ok(rollback.receivedTotal > BigInt(d.server_sent_total), "the rollback record claims more than the server sealed");
  // RESUMED, sealed by the server at seq 0 of the new epoch, opened by the client
  server.startEpoch(opened.clientNonce, h(d.server_nonce));
  const resumed = M.encodeResumedEnvelope({ serverNonce: h(d.server_nonce), record: M.decodeRecord(server.seal(FrameType.RESUMED, M.encodeResumed())) });
  assert.equal(toHex(resumed), d.resumed_payload);
  assert.equal(toHex(encodeFrame(FrameType.RESUMED, d.new_session_id, resumed)), d.resumed_frame);
  client.startEpoch(h(d.client_nonce), h(d.server_nonce));
  M.decodeResumed(client.open(FrameType.RESUMED, h(d.resumed_payload).subarray(32)));
  // the first request of the new epoch: request id 3, body "again", c2s seq 0
  const request = client.seal(FrameType.REQUEST, M.encodeRequestMessage({ requestId: 3, body: utf8("again") }));
  assert.equal(toHex(request), d.request_after);
  assert.equal(toHex(encodeFrame(FrameType.REQUEST, d.new_session_id, request)), d.request_after_frame);
};

// ------------------------------------------------------------------ transcript.json
checkers["transcript.json"] = () => {
  const d = loadVector("transcript.json");
  const sessionKey = h(d.session_key);
  assert.equal(toHex(keySchedule(sessionKey).sessionHandle), d.session_handle);
  for (const t of d.transcripts as J[]) {
    // the client core, its OPAQUE output replaced by the stand-in session key
    const conn = new ClientConnection(fakeOpaque(sessionKey), () => new Uint8Array(32));
    const sid = conn.openRequestSession(utf8("alice@example.org"), "pw");
    assert.equal(sid, d.session_id);
    conn.receiveData(encodeFrame(FrameType.LOGIN_RESPONSE, sid, new Uint8Array(C.CREDENTIAL_RESPONSE_SIZE)));
    assert.equal(conn.takeEvents()[0]?.type, "opaque_step");
    conn.completeOpaqueStep(sid);
    conn.dataToSend();
    // the server's side of the same transcript
    const server = new Channel(sessionKey, "server");
    const pending = new Map<number, Op>();
    for (const f of t.frames as J[]) {
      const type = enumValue(FrameType, f.frame_type) as FrameType;
      assert.equal(toHex(messageCodecs[f.message.class]!.encode(f.message.fields)), f.plaintext, `${t.name} ${f.frame_type}`);
      if (f.direction === "S->C") {
        assert.equal(toHex(encodeFrame(type, d.session_id, server.seal(type, h(f.plaintext)))), f.frame, `${t.name}: server seals ${f.frame_type}`);
        conn.receiveData(h(f.frame));
        const events = conn.takeEvents();
        assert.equal(events.length, 1, `${t.name} ${f.frame_type}: ${JSON.stringify(events.map((e) => e.type))}`);
        const event = events[0] as ClientEvent;
        if (type === FrameType.WELCOME) {
          assert.equal(event.type, "established");
          assert.equal(toHex((event as { userId: Uint8Array }).userId), d.user_id);
        } else if (type === FrameType.RESPONSE) {
          assert.equal(event.type, "response");
          const e = event as { requestId: number; body: Uint8Array };
          assert.equal(e.requestId, f.message.fields.request_id);
          const op = pending.get(e.requestId)!;
          const decoded = decodeResponse(op, e.body) as { status: Status; fields: J };
          assert.equal(decoded.status, Status.OK);
          assert.deepEqual(okFieldsToJson(op, decoded.fields), f.body.fields);
          assert.ok(RESPONSE_CLASSES[f.body.class]?.includes(op));
        } else if (type === FrameType.CLOSE) {
          assert.deepEqual([event.type, (event as { code: ErrorCode }).code], ["closed", enumValue(ErrorCode, f.message.fields.code)]);
        } else {
          assert.fail(`unexpected server frame ${f.frame_type}`);
        }
      } else {
        if (type === FrameType.REQUEST) {
          const request = requestFromJson(f.body.class, f.body.fields);
          assert.equal(toHex(encodeRequest(request)), f.message.fields.body);
          const requestId = conn.sendRequest(sid, encodeRequest(request));
          assert.equal(requestId, f.message.fields.request_id);
          pending.set(requestId, request.op);
        } else if (type === FrameType.CLOSE) {
          conn.closeSession(sid);
        } else {
          assert.fail(`unexpected client frame ${f.frame_type}`);
        }
        const sent = conn.dataToSend();
        assert.equal(toHex(sent), f.frame, `${t.name}: client sends ${f.frame_type}`);
        assert.equal(toHex(server.open(type, sent.subarray(C.HEADER_SIZE))), f.plaintext);
      }
    }
    assert.equal(conn.session(sid), undefined, `${t.name}: the session ended`);
  }
};

// ------------------------------------------------------------------ session_state.json
// Server-internal (a browser never sees it), checked here all the same: the sealed state of
// docs/protocol.md section 13 rebuilt from its layout, a reader of it written from the text,
// and the reply cache rule of section 9 as the fake key server keeps it.

/** The reply cache and app state a version 2 to 5 plaintext holds (null: not a session state). */
function readSessionState(
  plaintext: Uint8Array,
): { credentialsVersion: bigint; answered: [number, string | null][]; appState: string } | null {
  try {
    const r = new Reader(plaintext);
    const version = r.u8();
    if (version < 2 || version > 5) return null;
    r.bytes(16);
    r.bytes(r.u8());
    r.bytes(16); // created, last_activity
    const credentialsVersion = version === 2 ? 0n : r.u64();
    r.bytes(64 + 5 * 8 + 2 * 4);
    const answered: [number, string | null][] = [];
    for (let count = r.u16(); count > 0; count--) {
      const requestId = r.u32();
      const kept = version >= 4 ? r.u8() : 1;
      if (kept > 1) return null;
      answered.push([requestId, kept === 1 ? toHex(r.bytes(r.u32())) : null]);
    }
    const appState = version === 5 ? toHex(r.bytes(r.u16())) : "";
    r.end();
    return { credentialsVersion, answered, appState };
  } catch {
    return null;
  }
}

checkers["session_state.json"] = () => {
  const data = loadVector("session_state.json");
  const key = hkdf(sha3_256, h(data.server_setup), undefined, ascii("keymgmt v1 session state key"), 32);
  assert.equal(toHex(key), data.sealing_key);
  const ad = concat(ascii("keymgmt v1 session state"), h(data.session_handle));
  const st = data.state;
  const times = new Uint8Array(16);
  new DataView(times.buffer).setFloat64(0, st.created);
  new DataView(times.buffer).setFloat64(8, st.last_activity);
  const name = h(st.account_name);
  const appState = h(st.app_state);
  const plaintext = concat(
    u8(5),
    h(st.user_id),
    u8(name.length),
    name,
    times,
    u64(BigInt(st.credentials_version)),
    h(st.prk),
    h(st.epoch_secret),
    ...["send_seq", "recv_seq", "resume_seq", "sent_total", "received_total"].map((f) => u64(BigInt(st[f]))),
    u32(st.highest_request_id),
    u32(st.request_count),
    u16(st.answered.length),
    ...st.answered.map(([id, answer]: [number, string | null]) =>
      answer === null ? concat(u32(id), u8(0)) : concat(u32(id), u8(1), u32(h(answer).length), h(answer)),
    ),
    u16(appState.length),
    appState,
  );
  assert.equal(toHex(plaintext), data.plaintext);
  const nonce = h(data.nonce);
  assert.equal(toHex(concat(nonce, chacha20poly1305(key, nonce, ad).encrypt(plaintext))), data.sealed);
  const open = (sealed: string) => chacha20poly1305(key, h(sealed).subarray(0, 12), ad).decrypt(h(sealed).subarray(12));
  assert.deepEqual(readSessionState(open(data.sealed))?.answered, st.answered);
  assert.equal(readSessionState(open(data.sealed))?.appState, st.app_state);
  for (const older of data.older) {
    const state = readSessionState(open(older.sealed));
    assert.ok(state !== null, `version ${older.version}`);
    assert.equal(state.credentialsVersion, BigInt(older.credentials_version));
    assert.deepEqual(state.answered, older.reads_as);
    assert.equal(state.appState, "");
  }
  for (const refused of data.refused) assert.equal(readSessionState(open(refused.sealed)), null, refused.name);

  const rule = data.reply_cache;
  const cache = new ReplyCache(rule.reply_cache_bytes, rule.max_requests_in_flight);
  rule.answers.forEach(([op, size]: [string, number], i: number) => {
    cache.remember(i + 1, new Uint8Array(size), READ_OPS.has(enumValue(Op, op)));
  });
  assert.deepEqual([...cache.entries].map(([id, answer]) => [id, answer !== null]), rule.cache);
  assert.equal(cache.keptBytes, rule.kept_bytes);
};

// ------------------------------------------------------------------ the tests

test("every vector file has a checker (a new file cannot be skipped)", () => {
  const files = vectorFiles();
  assert.ok(files.length >= 13, `only ${files.length} vector files found in the vectors directory`);
  const unchecked = files.filter((name) => !(name in checkers));
  assert.deepEqual(unchecked, [], `vector files with no checker in web/test/vectors.test.ts: ${unchecked.join(", ")}`);
});

for (const name of vectorFiles()) {
  test(`vectors: ${name}`, () => {
    const checker = checkers[name];
    assert.ok(checker, `no checker for ${name}`);
    checker();
    const read = sectionsRead.get(name) ?? new Set<string>();
    const unread = Object.keys(loadVectorFile(name)).filter((section) => section !== "description" && !read.has(section));
    assert.deepEqual(unread, [], `sections of ${name} its checker in web/test/vectors.test.ts never reads: ${unread.join(", ")}`);
  });
}
