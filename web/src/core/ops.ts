/** Operation bodies carried in REQUEST/RESPONSE (docs/protocol.md section 12): request and
 * response codecs, key ids (KEY-1, KEY-2), sealed secrets and labels, the portable format,
 * audit entries and the audit chain, and the AUD-2 JSON export. */

import { DecodeError, Reader, ascii, concat, ctEqual, fromUtf8, toHex, u16, u32, u64, u8, utf8 } from "./bytes.js";
import {
  AUDIT_CHAIN_DOMAIN,
  AUDIT_HASH_SIZE,
  Action,
  AuditType,
  Context,
  ENCRYPTED_STORAGE_KEY_SIZE,
  GENERATED_SECRET_SIZE,
  IMPORTED_KEY_AD_SUFFIX,
  KEY_ID_CONTRIBUTION_DOMAIN,
  KEY_ID_DOMAIN,
  KEY_ID_NONCE_SIZE,
  KEY_ID_SIZE,
  LABEL_AD_DOMAIN,
  LABEL_PAD_SIZE,
  MAX_AUDIT_KEY_IDS,
  MAX_AUDIT_PAGE,
  MAX_LABEL_SIZE,
  MAX_LIST_PAGE,
  MAX_SEALED_LABEL_SIZE,
  MAX_SEALED_SIZE,
  MAX_SECRET_SIZE,
  MAX_SHORT_PORTABLE_SIZE,
  MAX_TIME,
  NONCE_SIZE,
  NO_CONTEXT,
  Op,
  Outcome,
  PORTABLE_LONG_HEADER_SIZE,
  PORTABLE_LONG_MARKER,
  PORTABLE_LONG_VERSION,
  REGISTRATION_REQUEST_SIZE,
  REGISTRATION_RESPONSE_SIZE,
  REGISTRATION_UPLOAD_SIZE,
  SEALED_OVERHEAD,
  SecretKind,
  Status,
  USER_ID_SIZE,
  isEnumValue,
} from "./constants.js";
import { aeadOpen, aeadSeal, sha3 } from "./crypto.js";

// ---------------------------------------------------------------- requests

export type OpRequest =
  | { op: Op.RETRIEVE_STORAGE_KEY; userId: Uint8Array }
  | { op: Op.CREATE_KEY_ID; userId: Uint8Array; kind: SecretKind; clientNonce: Uint8Array }
  | {
      op: Op.STORE_SECRET;
      userId: Uint8Array;
      keyId: Uint8Array;
      kind: SecretKind;
      sealed: Uint8Array;
      /** Ask for the next key id of this kind with this client nonce (null: do not ask). */
      next: { kind: SecretKind; clientNonce: Uint8Array } | null;
    }
  | { op: Op.RETRIEVE; userId: Uint8Array; keyId: Uint8Array; context: Context }
  | {
      op: Op.AUDIT;
      userId: Uint8Array;
      auditType: AuditType;
      keyIds: Uint8Array[];
      after: bigint | null;
      before: bigint | null;
      cursor: bigint;
      limit: number;
    }
  | { op: Op.LIST_KEYS; userId: Uint8Array; cursor: number; limit: number }
  | { op: Op.DELETE_KEY; userId: Uint8Array; keyId: Uint8Array }
  | { op: Op.CHANGE_PASSWORD_START; userId: Uint8Array; registrationRequest: Uint8Array }
  | { op: Op.CHANGE_PASSWORD_FINISH; userId: Uint8Array; registrationUpload: Uint8Array; encryptedStorageKey: Uint8Array }
  | { op: Op.DELETE_ACCOUNT; userId: Uint8Array }
  | { op: Op.RENAME_KEY; userId: Uint8Array; keyId: Uint8Array; sealedLabel: Uint8Array };

function fixed(bytes: Uint8Array, size: number, what: string): Uint8Array {
  if (bytes.length !== size) throw new RangeError(`${what} must be ${size} bytes`);
  return bytes;
}

function enumByte(enumObject: object, value: number, what: string): Uint8Array {
  if (!isEnumValue(enumObject, value)) throw new RangeError(`unknown ${what}`);
  return u8(value);
}

/** The size rule of a sealed secret of ``kind`` (section 12.4). */
export function sealedSizeOk(kind: SecretKind, length: number): boolean {
  if (kind === SecretKind.GENERATED) return length === GENERATED_SECRET_SIZE + SEALED_OVERHEAD;
  return length >= 1 + SEALED_OVERHEAD && length <= MAX_SEALED_SIZE;
}

function sealedLabelOk(length: number): boolean {
  return length === 0 || (length >= 1 + SEALED_OVERHEAD && length <= MAX_SEALED_LABEL_SIZE);
}

function timeOk(value: bigint | null): boolean {
  return value === null || (value >= 0n && value <= MAX_TIME);
}

function optU64(value: bigint | null): Uint8Array {
  return value === null ? u8(0) : concat(u8(1), u64(value));
}

export function encodeRequest(request: OpRequest): Uint8Array {
  const head = concat(u8(request.op), fixed(request.userId, USER_ID_SIZE, "user_id"));
  switch (request.op) {
    case Op.RETRIEVE_STORAGE_KEY:
    case Op.DELETE_ACCOUNT:
      return head;
    case Op.CREATE_KEY_ID:
      return concat(head, enumByte(SecretKind, request.kind, "kind"), fixed(request.clientNonce, KEY_ID_NONCE_SIZE, "client_nonce"));
    case Op.STORE_SECRET: {
      if (!sealedSizeOk(request.kind, request.sealed.length)) throw new RangeError("sealed secret of the wrong size for its kind");
      const next =
        request.next === null
          ? u8(0)
          : concat(u8(1), enumByte(SecretKind, request.next.kind, "kind"), fixed(request.next.clientNonce, KEY_ID_NONCE_SIZE, "next_client_nonce"));
      return concat(head, fixed(request.keyId, KEY_ID_SIZE, "key_id"), enumByte(SecretKind, request.kind, "kind"), u32(request.sealed.length), request.sealed, next);
    }
    case Op.RETRIEVE:
      return concat(head, fixed(request.keyId, KEY_ID_SIZE, "key_id"), enumByte(Context, request.context, "context"));
    case Op.AUDIT: {
      checkAuditFilter(request.auditType, request.keyIds, request.after, request.before);
      if (request.cursor < 0n || request.cursor > MAX_TIME) throw new RangeError("audit cursor below 2^63");
      if (!Number.isInteger(request.limit) || request.limit < 1 || request.limit > MAX_AUDIT_PAGE) throw new RangeError("audit limit is 1..256");
      return concat(
        head,
        u8(request.auditType),
        u16(request.keyIds.length),
        ...request.keyIds,
        optU64(request.after),
        optU64(request.before),
        u64(request.cursor),
        u16(request.limit),
      );
    }
    case Op.LIST_KEYS:
      if (!Number.isInteger(request.limit) || request.limit < 1 || request.limit > MAX_LIST_PAGE) throw new RangeError("list limit is 1..512");
      return concat(head, u32(request.cursor), u16(request.limit));
    case Op.DELETE_KEY:
      return concat(head, fixed(request.keyId, KEY_ID_SIZE, "key_id"));
    case Op.CHANGE_PASSWORD_START:
      return concat(head, fixed(request.registrationRequest, REGISTRATION_REQUEST_SIZE, "registration_request"));
    case Op.CHANGE_PASSWORD_FINISH:
      return concat(
        head,
        fixed(request.registrationUpload, REGISTRATION_UPLOAD_SIZE, "registration_upload"),
        fixed(request.encryptedStorageKey, ENCRYPTED_STORAGE_KEY_SIZE, "encrypted_storage_key"),
      );
    case Op.RENAME_KEY:
      if (!sealedLabelOk(request.sealedLabel.length)) throw new RangeError("sealed label of the wrong size");
      return concat(head, fixed(request.keyId, KEY_ID_SIZE, "key_id"), u8(request.sealedLabel.length), request.sealedLabel);
  }
}

/** The argument checks of an AUDIT filter (refused before anything is sent). */
export function checkAuditFilter(auditType: AuditType, keyIds: Uint8Array[], after: bigint | null, before: bigint | null): void {
  if (!isEnumValue(AuditType, auditType)) throw new RangeError("unknown audit type");
  if (keyIds.length > MAX_AUDIT_KEY_IDS) throw new RangeError("an audit request names at most 1024 key ids");
  if (auditType === AuditType.SYSTEM_ONLY && keyIds.length > 0) throw new RangeError("key ids select key actions: not with SYSTEM_ONLY");
  for (const keyId of keyIds) if (keyId.length !== KEY_ID_SIZE) throw new RangeError("a key id is 16 bytes");
  if (!timeOk(after) || !timeOk(before)) throw new RangeError("times are microseconds below 2^63");
}

function readEnum<T extends number>(r: Reader, enumObject: object, what: string): T {
  const value = r.u8();
  if (!isEnumValue(enumObject, value)) throw new DecodeError(`unknown ${what}`);
  return value as T;
}

function readSealed(r: Reader, kind: SecretKind): Uint8Array {
  const length = r.u32();
  if (length > MAX_SEALED_SIZE) throw new DecodeError("sealed length over the limit");
  const sealed = r.bytes(length);
  if (!sealedSizeOk(kind, length)) throw new DecodeError("sealed secret of the wrong size for its kind");
  return sealed;
}

function readOptU64(r: Reader): bigint | null {
  const flag = r.u8();
  if (flag === 0) return null;
  if (flag !== 1) throw new DecodeError("optional flag not 0 or 1");
  const value = r.u64();
  if (value > MAX_TIME) throw new DecodeError("time not below 2^63");
  return value;
}

function readSealedLabel(r: Reader): Uint8Array {
  const label = r.bytes(r.u8());
  if (!sealedLabelOk(label.length)) throw new DecodeError("sealed label of the wrong size");
  return label;
}

function decodeWith<T>(body: Uint8Array, read: (r: Reader) => T): T {
  const reader = new Reader(body);
  const value = read(reader);
  reader.end();
  return value;
}

/** The server's view: decode a request body; DecodeError when it does not (status INVALID). */
export function decodeRequest(body: Uint8Array): OpRequest {
  return decodeWith(body, (r) => {
    const op = readEnum<Op>(r, Op, "op");
    const userId = r.bytes(USER_ID_SIZE);
    switch (op) {
      case Op.RETRIEVE_STORAGE_KEY:
      case Op.DELETE_ACCOUNT:
        return { op, userId };
      case Op.CREATE_KEY_ID:
        return { op, userId, kind: readEnum<SecretKind>(r, SecretKind, "kind"), clientNonce: r.bytes(KEY_ID_NONCE_SIZE) };
      case Op.STORE_SECRET: {
        const keyId = r.bytes(KEY_ID_SIZE);
        const kind = readEnum<SecretKind>(r, SecretKind, "kind");
        const sealed = readSealed(r, kind);
        const flag = r.u8();
        let next = null;
        if (flag === 1) next = { kind: readEnum<SecretKind>(r, SecretKind, "kind"), clientNonce: r.bytes(KEY_ID_NONCE_SIZE) };
        else if (flag !== 0) throw new DecodeError("next-key-id flag not 0 or 1");
        return { op, userId, keyId, kind, sealed, next };
      }
      case Op.RETRIEVE:
        return { op, userId, keyId: r.bytes(KEY_ID_SIZE), context: readEnum<Context>(r, Context, "context") };
      case Op.AUDIT: {
        const auditType = readEnum<AuditType>(r, AuditType, "audit type");
        const count = r.u16();
        if (count > MAX_AUDIT_KEY_IDS) throw new DecodeError("too many key ids");
        if (auditType === AuditType.SYSTEM_ONLY && count > 0) throw new DecodeError("key ids with SYSTEM_ONLY");
        const keyIds: Uint8Array[] = [];
        for (let i = 0; i < count; i++) keyIds.push(r.bytes(KEY_ID_SIZE));
        const after = readOptU64(r);
        const before = readOptU64(r);
        const cursor = r.u64();
        if (cursor > MAX_TIME) throw new DecodeError("cursor not below 2^63");
        const limit = r.u16();
        if (limit < 1 || limit > MAX_AUDIT_PAGE) throw new DecodeError("audit limit out of range");
        return { op, userId, auditType, keyIds, after, before, cursor, limit };
      }
      case Op.LIST_KEYS: {
        const cursor = r.u32();
        const limit = r.u16();
        if (limit < 1 || limit > MAX_LIST_PAGE) throw new DecodeError("list limit out of range");
        return { op, userId, cursor, limit };
      }
      case Op.DELETE_KEY:
        return { op, userId, keyId: r.bytes(KEY_ID_SIZE) };
      case Op.CHANGE_PASSWORD_START:
        return { op, userId, registrationRequest: r.bytes(REGISTRATION_REQUEST_SIZE) };
      case Op.CHANGE_PASSWORD_FINISH:
        return { op, userId, registrationUpload: r.bytes(REGISTRATION_UPLOAD_SIZE), encryptedStorageKey: r.bytes(ENCRYPTED_STORAGE_KEY_SIZE) };
      case Op.RENAME_KEY:
        return { op, userId, keyId: r.bytes(KEY_ID_SIZE), sealedLabel: readSealedLabel(r) };
    }
  });
}

// ---------------------------------------------------------------- responses

export interface AuditEntry {
  entryId: bigint;
  action: Action;
  timestamp: bigint;
  outcome: Outcome;
  count: number;
  keyId: Uint8Array | null;
  context: Context | null;
}

/** An entry as an AUDIT answer carries it: with its audit-chain hash. */
export interface ChainedAuditEntry extends AuditEntry {
  chainHash: Uint8Array;
}

export interface KeyListItem {
  keyId: Uint8Array;
  kind: SecretKind;
  created: bigint;
  sealedLabel: Uint8Array;
}

/** OK answers by op (``Empty`` ops have no fields). */
export interface OkFields {
  [Op.RETRIEVE_STORAGE_KEY]: { encryptedStorageKey: Uint8Array };
  [Op.CREATE_KEY_ID]: { keyId: Uint8Array; serverNonce: Uint8Array };
  [Op.STORE_SECRET]: { next: { keyId: Uint8Array; serverNonce: Uint8Array } | null };
  [Op.RETRIEVE]: { kind: SecretKind; sealed: Uint8Array; associatedData: Uint8Array };
  [Op.AUDIT]: { entries: ChainedAuditEntry[]; nextCursor: bigint };
  [Op.LIST_KEYS]: { keys: KeyListItem[]; nextCursor: number };
  [Op.DELETE_KEY]: Record<string, never>;
  [Op.CHANGE_PASSWORD_START]: { registrationResponse: Uint8Array };
  [Op.CHANGE_PASSWORD_FINISH]: Record<string, never>;
  [Op.DELETE_ACCOUNT]: Record<string, never>;
  [Op.RENAME_KEY]: Record<string, never>;
}

export type OpResponse<O extends Op = Op> = { status: Status.OK; fields: OkFields[O] } | { status: Exclude<Status, Status.OK> };

export function encodeAuditEntry(entry: AuditEntry): Uint8Array {
  if (!Number.isInteger(entry.count) || entry.count < 1) throw new RangeError("an entry's count is at least 1");
  return concat(
    u64(entry.entryId),
    enumByte(Action, entry.action, "action"),
    u64(entry.timestamp),
    enumByte(Outcome, entry.outcome, "outcome"),
    u32(entry.count),
    entry.keyId === null ? u8(0) : concat(u8(1), fixed(entry.keyId, KEY_ID_SIZE, "key_id")),
    entry.context === null ? u8(NO_CONTEXT) : enumByte(Context, entry.context, "context"),
  );
}

function readAuditEntry(r: Reader): AuditEntry {
  const entryId = r.u64();
  const action = readEnum<Action>(r, Action, "action");
  const timestamp = r.u64();
  if (timestamp > MAX_TIME) throw new DecodeError("time not below 2^63");
  const outcome = readEnum<Outcome>(r, Outcome, "outcome");
  const count = r.u32();
  if (count === 0) throw new DecodeError("entry count 0");
  const hasKeyId = r.u8();
  if (hasKeyId > 1) throw new DecodeError("has_key_id not 0 or 1");
  const keyId = hasKeyId === 1 ? r.bytes(KEY_ID_SIZE) : null;
  const contextByte = r.u8();
  let context: Context | null = null;
  if (contextByte !== NO_CONTEXT) {
    if (!isEnumValue(Context, contextByte)) throw new DecodeError("unknown context");
    context = contextByte as Context;
  }
  return { entryId, action, timestamp, outcome, count, keyId, context };
}

export function decodeAuditEntry(bytes: Uint8Array): AuditEntry {
  return decodeWith(bytes, readAuditEntry);
}

export function encodeOkFields<O extends Op>(op: O, fields: OkFields[O]): Uint8Array {
  const f = fields as OkFields[Op];
  const ok = u8(Status.OK);
  switch (op) {
    case Op.RETRIEVE_STORAGE_KEY:
      return concat(ok, fixed((f as OkFields[Op.RETRIEVE_STORAGE_KEY]).encryptedStorageKey, ENCRYPTED_STORAGE_KEY_SIZE, "encrypted_storage_key"));
    case Op.CREATE_KEY_ID: {
      const g = f as OkFields[Op.CREATE_KEY_ID];
      return concat(ok, fixed(g.keyId, KEY_ID_SIZE, "key_id"), fixed(g.serverNonce, KEY_ID_NONCE_SIZE, "server_nonce"));
    }
    case Op.STORE_SECRET: {
      const g = f as OkFields[Op.STORE_SECRET];
      return g.next === null ? concat(ok, u8(0)) : concat(ok, u8(1), fixed(g.next.keyId, KEY_ID_SIZE, "key_id"), fixed(g.next.serverNonce, KEY_ID_NONCE_SIZE, "server_nonce"));
    }
    case Op.RETRIEVE: {
      const g = f as OkFields[Op.RETRIEVE];
      if (!sealedSizeOk(g.kind, g.sealed.length) || g.associatedData.length > 255) throw new RangeError("sealed secret or AD of the wrong size");
      return concat(ok, enumByte(SecretKind, g.kind, "kind"), u32(g.sealed.length), g.sealed, u8(g.associatedData.length), g.associatedData);
    }
    case Op.AUDIT: {
      const g = f as OkFields[Op.AUDIT];
      if (g.entries.length > MAX_AUDIT_PAGE) throw new RangeError("at most 256 entries a page");
      const parts = g.entries.map((e) => concat(encodeAuditEntry(e), fixed(e.chainHash, AUDIT_HASH_SIZE, "hash")));
      return concat(ok, u16(g.entries.length), ...parts, u64(g.nextCursor));
    }
    case Op.LIST_KEYS: {
      const g = f as OkFields[Op.LIST_KEYS];
      if (g.keys.length > MAX_LIST_PAGE) throw new RangeError("at most 512 keys a page");
      const parts = g.keys.map((k) => {
        if (!sealedLabelOk(k.sealedLabel.length)) throw new RangeError("sealed label of the wrong size");
        return concat(fixed(k.keyId, KEY_ID_SIZE, "key_id"), enumByte(SecretKind, k.kind, "kind"), u64(k.created), u8(k.sealedLabel.length), k.sealedLabel);
      });
      return concat(ok, u16(g.keys.length), ...parts, u32(g.nextCursor));
    }
    case Op.CHANGE_PASSWORD_START:
      return concat(ok, fixed((f as OkFields[Op.CHANGE_PASSWORD_START]).registrationResponse, REGISTRATION_RESPONSE_SIZE, "registration_response"));
    case Op.DELETE_KEY:
    case Op.CHANGE_PASSWORD_FINISH:
    case Op.DELETE_ACCOUNT:
    case Op.RENAME_KEY:
      return ok;
  }
  throw new RangeError("unknown op");
}

export function encodeResponse<O extends Op>(op: O, response: OpResponse<O>): Uint8Array {
  return response.status === Status.OK ? encodeOkFields(op, response.fields) : u8(response.status);
}

function readOkFields(op: Op, r: Reader): OkFields[Op] {
  switch (op) {
    case Op.RETRIEVE_STORAGE_KEY:
      return { encryptedStorageKey: r.bytes(ENCRYPTED_STORAGE_KEY_SIZE) };
    case Op.CREATE_KEY_ID:
      return { keyId: r.bytes(KEY_ID_SIZE), serverNonce: r.bytes(KEY_ID_NONCE_SIZE) };
    case Op.STORE_SECRET: {
      const flag = r.u8();
      if (flag === 0) return { next: null };
      if (flag !== 1) throw new DecodeError("next-key-id flag not 0 or 1");
      return { next: { keyId: r.bytes(KEY_ID_SIZE), serverNonce: r.bytes(KEY_ID_NONCE_SIZE) } };
    }
    case Op.RETRIEVE: {
      const kind = readEnum<SecretKind>(r, SecretKind, "kind");
      const sealed = readSealed(r, kind);
      return { kind, sealed, associatedData: r.bytes(r.u8()) };
    }
    case Op.AUDIT: {
      const count = r.u16();
      if (count > MAX_AUDIT_PAGE) throw new DecodeError("more than 256 audit entries");
      const entries: ChainedAuditEntry[] = [];
      for (let i = 0; i < count; i++) entries.push({ ...readAuditEntry(r), chainHash: r.bytes(AUDIT_HASH_SIZE) });
      const nextCursor = r.u64();
      if (nextCursor > MAX_TIME) throw new DecodeError("cursor not below 2^63");
      return { entries, nextCursor };
    }
    case Op.LIST_KEYS: {
      const count = r.u16();
      if (count > MAX_LIST_PAGE) throw new DecodeError("more than 512 keys");
      const keys: KeyListItem[] = [];
      for (let i = 0; i < count; i++) {
        const keyId = r.bytes(KEY_ID_SIZE);
        const kind = readEnum<SecretKind>(r, SecretKind, "kind");
        const created = r.u64();
        keys.push({ keyId, kind, created, sealedLabel: readSealedLabel(r) });
      }
      return { keys, nextCursor: r.u32() };
    }
    case Op.CHANGE_PASSWORD_START:
      return { registrationResponse: r.bytes(REGISTRATION_RESPONSE_SIZE) };
    case Op.DELETE_KEY:
    case Op.CHANGE_PASSWORD_FINISH:
    case Op.DELETE_ACCOUNT:
    case Op.RENAME_KEY:
      return {};
  }
}

/** The client's view: decode the answer to a request of ``op``; DecodeError when it does not. */
export function decodeResponse<O extends Op>(op: O, body: Uint8Array): OpResponse<O> {
  return decodeWith(body, (r) => {
    const status = readEnum<Status>(r, Status, "status");
    if (status !== Status.OK) return { status } as OpResponse<O>;
    return { status: Status.OK, fields: readOkFields(op, r) as OkFields[O] };
  });
}

// ---------------------------------------------------------------- KEY-1, KEY-2

function lengthPrefixed(...fields: Uint8Array[]): Uint8Array {
  return concat(...fields.flatMap((field) => [u16(field.length), field]));
}

export function keyIdPreimage(userId: Uint8Array, r: Uint8Array): Uint8Array {
  return lengthPrefixed(ascii(KEY_ID_DOMAIN), fixed(userId, USER_ID_SIZE, "user_id"), fixed(r, 32, "r"));
}

export function deriveKeyId(userId: Uint8Array, r: Uint8Array): Uint8Array {
  return sha3(keyIdPreimage(userId, r)).slice(0, KEY_ID_SIZE);
}

export function jointPreimage(clientNonce: Uint8Array, serverNonce: Uint8Array): Uint8Array {
  return lengthPrefixed(ascii(KEY_ID_CONTRIBUTION_DOMAIN), fixed(clientNonce, KEY_ID_NONCE_SIZE, "client_nonce"), fixed(serverNonce, KEY_ID_NONCE_SIZE, "server_nonce"));
}

export function jointR(clientNonce: Uint8Array, serverNonce: Uint8Array): Uint8Array {
  return sha3(jointPreimage(clientNonce, serverNonce));
}

export function jointKeyId(userId: Uint8Array, clientNonce: Uint8Array, serverNonce: Uint8Array): Uint8Array {
  return deriveKeyId(userId, jointR(clientNonce, serverNonce));
}

// ---------------------------------------------------------------- sealed secrets and labels

export function secretAd(userId: Uint8Array, keyId: Uint8Array, kind: SecretKind): Uint8Array {
  const base = concat(fixed(userId, USER_ID_SIZE, "user_id"), fixed(keyId, KEY_ID_SIZE, "key_id"));
  return kind === SecretKind.IMPORTED ? concat(base, ascii(IMPORTED_KEY_AD_SUFFIX)) : base;
}

function checkSecret(kind: SecretKind, secret: Uint8Array): void {
  if (kind === SecretKind.GENERATED ? secret.length !== GENERATED_SECRET_SIZE : secret.length < 1 || secret.length > MAX_SECRET_SIZE) {
    throw new RangeError(kind === SecretKind.GENERATED ? "a generated secret is 32 bytes" : "a secret is 1..65536 bytes");
  }
}

export function sealSecret(storageKey: Uint8Array, userId: Uint8Array, keyId: Uint8Array, kind: SecretKind, secret: Uint8Array, nonce: Uint8Array): Uint8Array {
  checkSecret(kind, secret);
  fixed(nonce, NONCE_SIZE, "nonce");
  return concat(nonce, aeadSeal(storageKey, nonce, secret, secretAd(userId, keyId, kind)));
}

/** Open a sealed secret with the AD it must have; null when it does not open. */
export function openSecret(storageKey: Uint8Array, ad: Uint8Array, sealed: Uint8Array): Uint8Array | null {
  if (sealed.length < SEALED_OVERHEAD) return null;
  return aeadOpen(storageKey, sealed.subarray(0, NONCE_SIZE), sealed.subarray(NONCE_SIZE), ad);
}

export function labelAd(userId: Uint8Array, keyId: Uint8Array): Uint8Array {
  return concat(ascii(LABEL_AD_DOMAIN), fixed(userId, USER_ID_SIZE, "user_id"), fixed(keyId, KEY_ID_SIZE, "key_id"));
}

/** The client's label rules (section 12.6); throws RangeError saying which is broken. */
export function checkLabel(label: string): Uint8Array {
  if (/[\p{Cc}\p{Cf}\p{Cs}]/u.test(label)) throw new RangeError("a label has no control characters");
  const bytes = utf8(label);
  if (bytes.length < 1 || bytes.length > MAX_LABEL_SIZE) throw new RangeError("a label is 1..64 bytes of UTF-8");
  if (label !== label.trim()) throw new RangeError("a label does not start or end with a space");
  if (/^[0-9a-fA-F]{32}$/.test(label)) throw new RangeError("a label of 32 hex digits would read as a key id");
  return bytes;
}

/** Seal a label, padded with zero bytes to the next multiple of LABEL_PAD_SIZE (32 or 64 bytes in
 * all), so the sealed length does not give the label's length away (section 12.6). */
export function sealLabel(storageKey: Uint8Array, userId: Uint8Array, keyId: Uint8Array, label: Uint8Array, nonce: Uint8Array): Uint8Array {
  if (label.length < 1 || label.length > MAX_LABEL_SIZE) throw new RangeError("a label is 1..64 bytes");
  fixed(nonce, NONCE_SIZE, "nonce");
  const padded = new Uint8Array(Math.ceil(label.length / LABEL_PAD_SIZE) * LABEL_PAD_SIZE);
  padded.set(label);
  return concat(nonce, aeadSeal(storageKey, nonce, padded, labelAd(userId, keyId)));
}

/** The label text, or null when it does not open, is not UTF-8 or is no label the client accepts
 * (checkLabel: empty, control characters, 32 hex digits, ...), as the Python client's
 * open_label. The zero bytes at the end are padding (a label has none), so a label sealed
 * unpadded by an older client opens the same. */
export function openLabel(storageKey: Uint8Array, userId: Uint8Array, keyId: Uint8Array, sealed: Uint8Array): string | null {
  const bytes = openSecret(storageKey, labelAd(userId, keyId), sealed);
  if (bytes === null) return null;
  let end = bytes.length;
  while (end > 0 && bytes[end - 1] === 0) end -= 1;
  try {
    // a byte order mark stays in (ignoreBOM), so checkLabel refuses it as Python's does
    const label = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(bytes.subarray(0, end));
    checkLabel(label);
    return label;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------- portable format (section 12.7)

export class PortableError extends Error {
  override name = "PortableError";
}

export function encodePortable(secret: Uint8Array): Uint8Array {
  if (secret.length < 1) throw new PortableError("an empty secret has no portable form");
  if (secret.length > MAX_SECRET_SIZE) throw new PortableError("a secret is at most 65536 bytes");
  if (secret.length <= MAX_SHORT_PORTABLE_SIZE) return concat(u8(secret.length), secret);
  return concat(u8(PORTABLE_LONG_MARKER), u8(PORTABLE_LONG_VERSION), u32(secret.length), secret);
}

export function decodePortable(portable: Uint8Array): Uint8Array {
  if (portable.length < 2) throw new PortableError("too short: a length byte and at least one secret byte");
  const first = portable[0]!;
  if (first !== PORTABLE_LONG_MARKER) {
    if (first !== portable.length - 1) throw new PortableError(`length byte says ${first}, ${portable.length - 1} bytes follow`);
    return portable.slice(1);
  }
  if (portable[1] !== PORTABLE_LONG_VERSION) throw new PortableError("unknown long-form version");
  if (portable.length < PORTABLE_LONG_HEADER_SIZE) throw new PortableError("long form cut short before the end of its length");
  const length = new DataView(portable.buffer, portable.byteOffset + 2, 4).getUint32(0);
  if (length <= MAX_SHORT_PORTABLE_SIZE) throw new PortableError("long form for a secret the short form holds");
  if (length > MAX_SECRET_SIZE) throw new PortableError("a secret is at most 65536 bytes");
  if (length !== portable.length - PORTABLE_LONG_HEADER_SIZE) throw new PortableError(`length says ${length}, ${portable.length - PORTABLE_LONG_HEADER_SIZE} bytes follow`);
  return portable.slice(PORTABLE_LONG_HEADER_SIZE);
}

// ---------------------------------------------------------------- the audit chain (section 12.9)

export const AUDIT_GENESIS_HASH = new Uint8Array(AUDIT_HASH_SIZE);

export function auditChainPreimage(userId: Uint8Array, previous: Uint8Array, encodedEntry: Uint8Array): Uint8Array {
  const domain = ascii(AUDIT_CHAIN_DOMAIN);
  return concat(u16(domain.length), domain, fixed(userId, USER_ID_SIZE, "user_id"), fixed(previous, AUDIT_HASH_SIZE, "previous hash"), encodedEntry);
}

export function auditChainHash(userId: Uint8Array, previous: Uint8Array, encodedEntry: Uint8Array): Uint8Array {
  return sha3(auditChainPreimage(userId, previous, encodedEntry));
}

/** The newest verified audit entry: its position (entry id) and hash. */
export interface AuditHead {
  position: bigint;
  hash: Uint8Array;
}

/** Check a whole log, read unfiltered from cursor 0: ids 1, 2, 3, ... and every hash, and that
 * it passes through ``head`` (when given) and reaches at least its position. Returns the new
 * head (null for an empty log with no head); a failure throws ``fail(reason)``. */
export function verifyAuditChain(userId: Uint8Array, entries: ChainedAuditEntry[], head: AuditHead | null, fail: (reason: string) => Error): AuditHead | null {
  let previous: Uint8Array = AUDIT_GENESIS_HASH;
  let headSeen = head === null;
  for (let i = 0; i < entries.length; i++) {
    const entry = entries[i]!;
    if (entry.entryId !== BigInt(i + 1)) throw fail(`audit log: entry ${i + 1} missing (got entry ${entry.entryId})`);
    const expected = auditChainHash(userId, previous, encodeAuditEntry(entry));
    if (!ctEqual(expected, entry.chainHash)) throw fail(`audit log: entry ${entry.entryId} does not match its hash`);
    previous = expected;
    if (head !== null && entry.entryId === head.position) {
      if (!ctEqual(previous, head.hash)) throw fail(`audit log: entry ${head.position} differs from the one verified before (history forked)`);
      headSeen = true;
    }
  }
  if (!headSeen) throw fail(`audit log: shorter than the ${head!.position} entries verified before`);
  return entries.length === 0 ? null : { position: BigInt(entries.length), hash: previous };
}

// ---------------------------------------------------------------- AUD-2 export

function lowerName(enumObject: Record<number, string>, value: number): string {
  return (enumObject[value] ?? String(value)).toLowerCase();
}

/** AUD-2: entries of user ``actor`` as the keymgmt-audit-v3 JSON document (section 12.11). */
export function auditToJson(entries: (AuditEntry & { chainHash?: Uint8Array | null })[], actor: Uint8Array): string {
  fixed(actor, USER_ID_SIZE, "actor");
  const documents = entries.map((e) => ({
    entry_id: e.entryId,
    actor: toHex(actor),
    action: lowerName(Action, e.action),
    timestamp_us: e.timestamp,
    outcome: lowerName(Outcome, e.outcome),
    key_id: e.keyId === null ? null : toHex(e.keyId),
    context: e.context === null ? null : lowerName(Context, e.context),
    count: e.count,
    hash: e.chainHash ? toHex(e.chainHash) : null,
  }));
  // bigints as JSON integers (exact: they are below 2^63)
  return JSON.stringify({ format: "keymgmt-audit-v3", entries: documents }, (_k, v: unknown) => (typeof v === "bigint" ? `__int${v}` : v), 2).replace(
    /"__int(\d+)"/g,
    "$1",
  );
}
