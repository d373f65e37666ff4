/** The client's checks around each operation (docs/protocol.md section 12.10), as plans: a
 * plan is a generator that yields the requests to send and receives each OK answer's fields
 * (a refused request is thrown into it as OperationRefused). No I/O: the adapter runs it. */

import { ctEqual, toHex } from "./bytes.js";
import {
  AuditType,
  Context,
  KEY_ID_NONCE_SIZE,
  KEY_ID_SIZE,
  MAX_AUDIT_PAGE,
  MAX_LIST_PAGE,
  MAX_NEXT_KEY_IDS,
  NONCE_SIZE,
  Op,
  STORE_RETRIES,
  SecretKind,
  Status,
} from "./constants.js";
import { masterKey, unwrapStorageKey, wrapStorageKey, type RandomSource } from "./crypto.js";
import { IntegrityFailure, LabelError, OperationRefused } from "./errors.js";
import type { OpaqueClient } from "./opaque.js";
import { PasswordCheck } from "./passwordcheck.js";
import {
  checkAuditFilter,
  checkLabel,
  decodePortable,
  encodePortable,
  jointKeyId,
  openLabel,
  openSecret,
  sealLabel,
  sealSecret,
  secretAd,
  verifyAuditChain,
  type AuditHead,
  type ChainedAuditEntry,
  type OkFields,
  type OpRequest,
} from "./ops.js";

export type Plan<R> = Generator<OpRequest, R, unknown>;

/** What the local store keeps of a secret: its sealed form and AD, exactly as the server has them. */
export interface SealedCopy {
  kind: SecretKind;
  ciphertext: Uint8Array;
  associatedData: Uint8Array;
}

export interface LabeledKey {
  keyId: Uint8Array;
  kind: SecretKind;
  /** µs since the Unix epoch, the server's clock. */
  created: bigint;
  /** The opened label; null when the key has none or its label failed verification. */
  label: string | null;
  /** The sealed label did not open: shown as tampered, never used to name a key. */
  labelTampered: boolean;
}

export interface VerifiedAudit {
  entries: ChainedAuditEntry[];
  head: AuditHead | null;
}

interface NextKeyId {
  keyId: Uint8Array;
  clientNonce: Uint8Array;
  serverNonce: Uint8Array;
}

function* ask<O extends Op>(request: OpRequest & { op: O }): Generator<OpRequest, OkFields[O], unknown> {
  return (yield request) as OkFields[O];
}

/** An AUDIT page asked for from ``cursor`` (section 12.9): entries after the cursor in
 * increasing order, and a next_cursor of 0, or past the cursor and not before the last
 * entry. So a walk moves forward and ends, and takes no entry twice. */
function checkAuditPage(cursor: bigint, entries: readonly ChainedAuditEntry[], nextCursor: bigint, unfiltered: boolean): void {
  let last = cursor;
  for (const entry of entries) {
    if (entry.entryId <= last) throw new IntegrityFailure(`audit log: entry ${entry.entryId} does not come after entry ${last} in its page (entries repeated or out of order)`);
    last = entry.entryId;
  }
  if (nextCursor !== 0n && (nextCursor <= cursor || nextCursor < last)) {
    throw new IntegrityFailure(`audit log: next cursor ${nextCursor} does not move past cursor ${cursor}, or lies before entry ${last} of its page (the walk would repeat entries or never end)`);
  }
  // Unfiltered (type ALL, no key ids, no time bounds), every entry read matches: a page that is
  // not the last holds entries and ends at its next_cursor. Else empty pages that move the
  // cursor by one could keep the walk (and the chain walk) going up to 2**64 requests.
  if (unfiltered && nextCursor !== 0n && (entries.length === 0 || nextCursor !== last)) {
    throw new IntegrityFailure(`audit log: next cursor ${nextCursor} of an unfiltered page is not its last entry (${last}): every entry read matches, so a page that is not the last ends there`);
  }
}

function keyIdArg(keyId: Uint8Array): Uint8Array {
  if (keyId.length !== KEY_ID_SIZE) throw new RangeError("a key id is 16 bytes");
  return keyId;
}

/** What a retrieve hands the application for each context (OPS-4, OPS-5). */
export function presentSecret(secret: Uint8Array, context: Context): Uint8Array | null {
  if (context === Context.NULL) return null;
  if (context === Context.LOCAL_ONLY) return secret;
  return encodePortable(secret);
}

/** One session's operations: holds ``storage_key`` (fetched once) and the next key ids. */
export class SecretOps {
  #storageKey: Uint8Array | null = null;
  #exportKey: Uint8Array;
  private readonly nextKeyIds = new Map<SecretKind, NextKeyId[]>([
    [SecretKind.GENERATED, []],
    [SecretKind.IMPORTED, []],
  ]);

  /** The login's (the ``established`` event's): a password change to the password the
   * session logged in with (or last changed to) is refused before it is sent. */
  #passwordCheck: PasswordCheck | null;

  constructor(
    readonly userId: Uint8Array,
    exportKey: Uint8Array,
    private readonly random: RandomSource,
    passwordCheck: PasswordCheck | null = null,
  ) {
    this.#exportKey = exportKey;
    this.#passwordCheck = passwordCheck;
  }

  toString(): string {
    return `<SecretOps user_id=${toHex(this.userId)}>`;
  }

  /** OPS-1: fetch and open the storage key once; kept in memory for the session. */
  *storageKey(): Plan<Uint8Array> {
    if (this.#storageKey !== null) return this.#storageKey;
    const fields = yield* ask({ op: Op.RETRIEVE_STORAGE_KEY, userId: this.userId });
    const master = masterKey(this.#exportKey);
    try {
      this.#storageKey = unwrapStorageKey(master, this.userId, fields.encryptedStorageKey);
    } finally {
      master.fill(0);
    }
    return this.#storageKey;
  }

  /** OPS-2: a random 32-byte secret, sealed and stored; its key id and the copy to keep. */
  *generate(holds: (keyId: Uint8Array) => boolean, label: string | null = null): Plan<{ keyId: Uint8Array; copy: SealedCopy }> {
    const secret = this.random(32);
    try {
      return yield* this.store(SecretKind.GENERATED, secret, holds, label);
    } finally {
      secret.fill(0);
    }
  }

  /** OPS-3/OPS-12: store a secret given in the portable form (throws PortableError first). */
  importPortable(portable: Uint8Array, holds: (keyId: Uint8Array) => boolean, label: string | null = null): Plan<{ keyId: Uint8Array; copy: SealedCopy }> {
    const secret = decodePortable(portable);
    return this.store(SecretKind.IMPORTED, secret, holds, label);
  }

  private *store(kind: SecretKind, secret: Uint8Array, holds: (keyId: Uint8Array) => boolean, label: string | null): Plan<{ keyId: Uint8Array; copy: SealedCopy }> {
    const labelBytes = label === null ? null : checkLabel(label);
    const storageKey = yield* this.storageKey();
    if (label !== null) yield* this.refuseTakenLabel(label, null);
    let cached = this.nextKeyIds.get(kind)!.shift() ?? null; // used once, whatever the answer
    let ownRetries = 0;
    for (;;) {
      let keyId: Uint8Array;
      if (cached !== null) {
        keyId = this.checkedKeyId(cached.keyId, cached.clientNonce, cached.serverNonce, holds);
      } else {
        const clientNonce = this.random(KEY_ID_NONCE_SIZE);
        const reply = yield* ask({ op: Op.CREATE_KEY_ID, userId: this.userId, kind, clientNonce });
        keyId = this.checkedKeyId(reply.keyId, clientNonce, reply.serverNonce, holds);
      }
      const sealed = sealSecret(storageKey, this.userId, keyId, kind, secret, this.random(NONCE_SIZE));
      const nextNonce = this.random(KEY_ID_NONCE_SIZE);
      let stored: OkFields[Op.STORE_SECRET];
      try {
        stored = yield* ask({ op: Op.STORE_SECRET, userId: this.userId, keyId, kind, sealed, next: { kind, clientNonce: nextNonce } });
      } catch (error) {
        // INVALID: the server lost the reservation (resumed elsewhere, restarted): a fresh key id
        const retry = error instanceof OperationRefused && error.status === Status.INVALID && (cached !== null || ownRetries < STORE_RETRIES);
        if (!retry) throw error;
        if (cached === null) ownRetries += 1;
        cached = null;
        continue;
      }
      if (stored.next !== null) {
        const queue = this.nextKeyIds.get(kind)!;
        queue.push({ keyId: stored.next.keyId, clientNonce: nextNonce, serverNonce: stored.next.serverNonce });
        while (queue.length > MAX_NEXT_KEY_IDS) queue.shift();
      }
      if (labelBytes !== null) {
        const sealedLabel = sealLabel(storageKey, this.userId, keyId, labelBytes, this.random(NONCE_SIZE));
        yield* ask({ op: Op.RENAME_KEY, userId: this.userId, keyId, sealedLabel });
      }
      return { keyId, copy: { kind, ciphertext: sealed, associatedData: secretAd(this.userId, keyId, kind) } };
    }
  }

  /** KEY-2: the key id must be the one the two nonces give, and new to this client. */
  private checkedKeyId(keyId: Uint8Array, clientNonce: Uint8Array, serverNonce: Uint8Array, holds: (keyId: Uint8Array) => boolean): Uint8Array {
    if (!ctEqual(jointKeyId(this.userId, clientNonce, serverNonce), keyId)) throw new IntegrityFailure("the key id the server sent is not the one both nonces give");
    if (holds(keyId)) throw new IntegrityFailure("the server handed out a key id this client already holds");
    return keyId;
  }

  /** OPS-4/OPS-5: the local copy when it verifies, else the server's (checked); the result for
   * ``context`` and the verified copy to keep (null when the local copy served). */
  *retrieve(keyId: Uint8Array, context: Context, local: SealedCopy | null): Plan<{ result: Uint8Array | null; keep: SealedCopy | null }> {
    keyIdArg(keyId);
    const storageKey = yield* this.storageKey();
    if (local !== null) {
      const expected = secretAd(this.userId, keyId, local.kind);
      const secret = ctEqual(local.associatedData, expected) ? openSecret(storageKey, expected, local.ciphertext) : null;
      if (secret !== null) return { result: presentSecret(secret, context), keep: null };
    }
    const fields = yield* ask({ op: Op.RETRIEVE, userId: this.userId, keyId, context });
    const expected = secretAd(this.userId, keyId, fields.kind);
    if (!ctEqual(fields.associatedData, expected)) throw new IntegrityFailure("the secret's associated data is not this user's and key's");
    const secret = openSecret(storageKey, expected, fields.sealed);
    if (secret === null) throw new IntegrityFailure("the secret does not open under the storage key");
    return { result: presentSecret(secret, context), keep: { kind: fields.kind, ciphertext: fields.sealed, associatedData: fields.associatedData } };
  }

  /** OPS-8: every key, labels opened (a label that does not open is flagged, not raised). */
  *listKeys(): Plan<LabeledKey[]> {
    const storageKey = yield* this.storageKey();
    const keys: LabeledKey[] = [];
    let cursor = 0;
    do {
      const page = yield* ask({ op: Op.LIST_KEYS, userId: this.userId, cursor, limit: MAX_LIST_PAGE });
      for (const item of page.keys) {
        let label: string | null = null;
        let labelTampered = false;
        if (item.sealedLabel.length > 0) {
          label = openLabel(storageKey, this.userId, item.keyId, item.sealedLabel);
          labelTampered = label === null;
        }
        keys.push({ keyId: item.keyId, kind: item.kind, created: item.created, label, labelTampered });
      }
      cursor = page.nextCursor;
    } while (cursor !== 0);
    return keys;
  }

  *delete(keyId: Uint8Array): Plan<void> {
    yield* ask({ op: Op.DELETE_KEY, userId: this.userId, keyId: keyIdArg(keyId) });
  }

  /** OPS-6: the matching entries, all pages (a filtered answer is not chain-verified). A page
   * may hold fewer entries than asked for, or none, before the log's end (the server reads at
   * most MAX_AUDIT_SCAN entries a request, section 12.9): the walk goes on until next_cursor is
   * 0, and each page must move it forward (else IntegrityFailure: a walk that never ends); an
   * unfiltered page that is not the last must end at its next_cursor. */
  *audit(auditType: AuditType = AuditType.ALL, keyIds: Uint8Array[] = [], after: bigint | null = null, before: bigint | null = null): Plan<ChainedAuditEntry[]> {
    checkAuditFilter(auditType, keyIds, after, before);
    const entries: ChainedAuditEntry[] = [];
    let cursor = 0n;
    const unfiltered = auditType === AuditType.ALL && keyIds.length === 0 && after === null && before === null;
    do {
      const page = yield* ask({ op: Op.AUDIT, userId: this.userId, auditType, keyIds, after, before, cursor, limit: MAX_AUDIT_PAGE });
      checkAuditPage(cursor, page.entries, page.nextCursor, unfiltered);
      entries.push(...page.entries);
      cursor = page.nextCursor;
    } while (cursor !== 0n);
    return entries;
  }

  /** The audit chain: the whole log, unfiltered, checked and checked against ``head``. */
  *verifyAudit(head: AuditHead | null): Plan<VerifiedAudit> {
    const entries = yield* this.audit(AuditType.ALL, [], null, null);
    const newHead = verifyAuditChain(this.userId, entries, head, (reason) => new IntegrityFailure(reason));
    return { entries, head: newHead };
  }

  /** Named keys: set, change (or with null remove) a key's label; whether the key had a label
   * before (one that does not open counts). The keys are listed first: removing the label of a
   * key listed without one sends nothing and gives false; a key not listed at all is left to
   * the server (NOT_FOUND). */
  *rename(keyId: Uint8Array, label: string | null): Plan<boolean> {
    keyIdArg(keyId);
    const labelBytes = label === null ? null : checkLabel(label);
    const keys = yield* this.listKeys();
    if (label !== null) this.refuseTaken(keys, label, keyId);
    const listed = keys.filter((k) => ctEqual(k.keyId, keyId));
    const hadLabel = listed.some((k) => k.label !== null || k.labelTampered);
    if (labelBytes === null && listed.length > 0 && !hadLabel) return false;
    let sealedLabel: Uint8Array = new Uint8Array(0);
    if (labelBytes !== null) {
      const storageKey = yield* this.storageKey();
      sealedLabel = sealLabel(storageKey, this.userId, keyId, labelBytes, this.random(NONCE_SIZE));
    }
    yield* ask({ op: Op.RENAME_KEY, userId: this.userId, keyId, sealedLabel });
    return hadLabel;
  }

  /** Named keys: the one key labelled ``label``. */
  *resolve(label: string): Plan<Uint8Array> {
    const matches = (yield* this.listKeys()).filter((k) => k.label !== null && sameLabel(k.label, label));
    if (matches.length === 0) throw new LabelError("no key has this label", true);
    if (matches.length > 1) throw new LabelError("several keys have this label; name the key by its id");
    return matches[0]!.keyId;
  }

  private *refuseTakenLabel(label: string, keyId: Uint8Array | null): Plan<void> {
    this.refuseTaken(yield* this.listKeys(), label, keyId);
  }

  private refuseTaken(keys: LabeledKey[], label: string, keyId: Uint8Array | null): void {
    for (const key of keys) {
      if (key.label !== null && sameLabel(key.label, label) && (keyId === null || !ctEqual(key.keyId, keyId))) throw new LabelError("another key already has this label");
    }
  }

  /** Password change: a fresh OPAQUE registration under the new password, and the same
   * storage key re-wrapped under the new export key (section 12.13). The password the session
   * logged in with (or last changed to) is refused (RangeError) before CHANGE_PASSWORD_FINISH
   * is sent: the check tells it from the new registration; step 1 changed nothing. */
  *changePassword(newPassword: string, opaque: OpaqueClient): Plan<void> {
    if (newPassword.length === 0) throw new RangeError("the new password must not be empty");
    const storageKey = yield* this.storageKey();
    const start = opaque.registrationStart(newPassword);
    const reply = yield* ask({ op: Op.CHANGE_PASSWORD_START, userId: this.userId, registrationRequest: start.request });
    let finish;
    try {
      finish = opaque.registrationFinish(newPassword, start.state, reply.registrationResponse);
    } catch {
      throw new IntegrityFailure("the server's registration response is not valid");
    }
    if (this.#passwordCheck !== null && this.#passwordCheck.samePassword(reply.registrationResponse, finish.upload)) {
      throw new RangeError("the new password is the current one");
    }
    const master = masterKey(finish.exportKey);
    const encryptedStorageKey = wrapStorageKey(master, this.userId, storageKey, this.random(NONCE_SIZE));
    master.fill(0);
    yield* ask({ op: Op.CHANGE_PASSWORD_FINISH, userId: this.userId, registrationUpload: finish.upload, encryptedStorageKey });
    this.#exportKey.fill(0);
    this.#exportKey = finish.exportKey;
    this.#passwordCheck = PasswordCheck.fromRegistration(reply.registrationResponse, finish.upload, this.random(32)); // as a login with it would give
  }

  *deleteAccount(): Plan<void> {
    yield* ask({ op: Op.DELETE_ACCOUNT, userId: this.userId });
  }

  /** Logout: wipe the keys and drop the next key ids. */
  forget(): void {
    this.#storageKey?.fill(0);
    this.#storageKey = null;
    this.#exportKey.fill(0);
    for (const queue of this.nextKeyIds.values()) queue.length = 0;
  }
}

/** Whether two labels name the same key: equal once both are in Unicode NFC (an accented
 * letter typed as one code point or as a letter and a combining mark is one label; each is
 * sealed as given). As the Python core's ``same_label``. */
export function sameLabel(a: string, b: string): boolean {
  return a === b || a.normalize("NFC") === b.normalize("NFC");
}
