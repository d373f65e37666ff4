/** The client's local store (STO-2): what the Python client's localstore keeps, in IndexedDB:
 * each secret's sealed form and associated data exactly as the key server stores them (opened
 * only with the storage key, which lives in memory for a session and is never stored), and per
 * user the newest verified audit-chain head. Never a plaintext secret, a key or a password. */

import { toHex } from "./core/bytes.js";
import type { SecretKind } from "./core/constants.js";
import type { AuditHead } from "./core/ops.js";

export interface SecretRecord {
  userId: Uint8Array;
  keyId: Uint8Array;
  kind: SecretKind;
  /** nonce || ciphertext || tag, under the storage key */
  ciphertext: Uint8Array;
  associatedData: Uint8Array;
  /** µs since the Unix epoch (local clock) */
  created: number;
}

export interface LocalStore {
  get(userId: Uint8Array, keyId: Uint8Array): Promise<SecretRecord | null>;
  put(record: SecretRecord): Promise<void>;
  delete(userId: Uint8Array, keyId: Uint8Array): Promise<void>;
  /** Drop every copy and the audit head of a deleted account; how many copies. */
  deleteUser(userId: Uint8Array): Promise<number>;
  keyIds(userId: Uint8Array): Promise<Uint8Array[]>;
  auditHead(userId: Uint8Array): Promise<AuditHead | null>;
  /** Keep a newer verified head; an older position never replaces a newer one. */
  putAuditHead(userId: Uint8Array, head: AuditHead): Promise<void>;
  close(): void;
}

const copy = (record: SecretRecord): SecretRecord => ({
  ...record,
  userId: record.userId.slice(),
  keyId: record.keyId.slice(),
  ciphertext: record.ciphertext.slice(),
  associatedData: record.associatedData.slice(),
});

/** A throwaway store in memory (the default when none is given). */
export class MemoryStore implements LocalStore {
  private readonly secrets = new Map<string, SecretRecord>();
  private readonly heads = new Map<string, AuditHead>();

  async get(userId: Uint8Array, keyId: Uint8Array): Promise<SecretRecord | null> {
    const record = this.secrets.get(toHex(userId) + toHex(keyId));
    return record ? copy(record) : null;
  }
  async put(record: SecretRecord): Promise<void> {
    this.secrets.set(toHex(record.userId) + toHex(record.keyId), copy(record));
  }
  async delete(userId: Uint8Array, keyId: Uint8Array): Promise<void> {
    this.secrets.delete(toHex(userId) + toHex(keyId));
  }
  async deleteUser(userId: Uint8Array): Promise<number> {
    const prefix = toHex(userId);
    this.heads.delete(prefix);
    let count = 0;
    for (const key of [...this.secrets.keys()]) {
      if (key.startsWith(prefix)) {
        this.secrets.delete(key);
        count += 1;
      }
    }
    return count;
  }
  async keyIds(userId: Uint8Array): Promise<Uint8Array[]> {
    const prefix = toHex(userId);
    return [...this.secrets.entries()]
      .filter(([key]) => key.startsWith(prefix))
      .sort((a, b) => a[1].created - b[1].created)
      .map(([, r]) => r.keyId.slice());
  }
  async auditHead(userId: Uint8Array): Promise<AuditHead | null> {
    const head = this.heads.get(toHex(userId));
    return head ? { position: head.position, hash: head.hash.slice() } : null;
  }
  async putAuditHead(userId: Uint8Array, head: AuditHead): Promise<void> {
    const current = this.heads.get(toHex(userId));
    if (current === undefined || head.position > current.position) this.heads.set(toHex(userId), { position: head.position, hash: head.hash.slice() });
  }
  close(): void {}
}

const SECRETS = "local_secrets";
const HEADS = "audit_heads";
const BY_USER = "by_user";

interface StoredSecret {
  user: string;
  key: string;
  userId: Uint8Array;
  keyId: Uint8Array;
  kind: number;
  ciphertext: Uint8Array;
  associatedData: Uint8Array;
  created: number;
}

interface StoredHead {
  user: string;
  /** decimal string: a bigint position survives structured cloning as text everywhere */
  position: string;
  hash: Uint8Array;
}

function request<T>(req: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error ?? new Error("IndexedDB request failed"));
  });
}

function done(tx: IDBTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error ?? new Error("IndexedDB transaction failed"));
    tx.onabort = () => reject(tx.error ?? new Error("IndexedDB transaction aborted"));
  });
}

/** The browser's local store: an IndexedDB database (default name ``keymgmt``) of the origin. */
export class IndexedDbStore implements LocalStore {
  private constructor(private readonly db: IDBDatabase) {}

  static open(name = "keymgmt", factory: IDBFactory = globalThis.indexedDB): Promise<IndexedDbStore> {
    if (!factory) return Promise.reject(new Error("IndexedDB is not available here"));
    return new Promise((resolve, reject) => {
      const req = factory.open(name, 1);
      req.onupgradeneeded = () => {
        const db = req.result;
        const secrets = db.createObjectStore(SECRETS, { keyPath: ["user", "key"] });
        secrets.createIndex(BY_USER, "user");
        db.createObjectStore(HEADS, { keyPath: "user" });
      };
      req.onsuccess = () => resolve(new IndexedDbStore(req.result));
      req.onerror = () => reject(req.error ?? new Error(`cannot open the local store ${name}`));
    });
  }

  toString(): string {
    return `IndexedDbStore(${this.db.name})`;
  }

  async get(userId: Uint8Array, keyId: Uint8Array): Promise<SecretRecord | null> {
    const tx = this.db.transaction(SECRETS, "readonly");
    const row = (await request(tx.objectStore(SECRETS).get([toHex(userId), toHex(keyId)]))) as StoredSecret | undefined;
    return row ? fromRow(row) : null;
  }

  async put(record: SecretRecord): Promise<void> {
    const tx = this.db.transaction(SECRETS, "readwrite");
    const row: StoredSecret = {
      user: toHex(record.userId),
      key: toHex(record.keyId),
      userId: record.userId.slice(),
      keyId: record.keyId.slice(),
      kind: record.kind,
      ciphertext: record.ciphertext.slice(),
      associatedData: record.associatedData.slice(),
      created: record.created,
    };
    tx.objectStore(SECRETS).put(row);
    await done(tx);
  }

  async delete(userId: Uint8Array, keyId: Uint8Array): Promise<void> {
    const tx = this.db.transaction(SECRETS, "readwrite");
    tx.objectStore(SECRETS).delete([toHex(userId), toHex(keyId)]);
    await done(tx);
  }

  async deleteUser(userId: Uint8Array): Promise<number> {
    const tx = this.db.transaction([SECRETS, HEADS], "readwrite");
    const user = toHex(userId);
    const keys = await request(tx.objectStore(SECRETS).index(BY_USER).getAllKeys(user));
    for (const key of keys) tx.objectStore(SECRETS).delete(key);
    tx.objectStore(HEADS).delete(user);
    await done(tx);
    return keys.length;
  }

  async keyIds(userId: Uint8Array): Promise<Uint8Array[]> {
    const tx = this.db.transaction(SECRETS, "readonly");
    const rows = (await request(tx.objectStore(SECRETS).index(BY_USER).getAll(toHex(userId)))) as StoredSecret[];
    return rows.sort((a, b) => a.created - b.created).map((row) => new Uint8Array(row.keyId));
  }

  async auditHead(userId: Uint8Array): Promise<AuditHead | null> {
    const tx = this.db.transaction(HEADS, "readonly");
    const row = (await request(tx.objectStore(HEADS).get(toHex(userId)))) as StoredHead | undefined;
    return row ? { position: BigInt(row.position), hash: new Uint8Array(row.hash) } : null;
  }

  async putAuditHead(userId: Uint8Array, head: AuditHead): Promise<void> {
    const tx = this.db.transaction(HEADS, "readwrite");
    const heads = tx.objectStore(HEADS);
    const user = toHex(userId);
    const current = (await request(heads.get(user))) as StoredHead | undefined;
    if (current === undefined || head.position > BigInt(current.position)) {
      heads.put({ user, position: head.position.toString(), hash: head.hash.slice() } satisfies StoredHead);
    }
    await done(tx);
  }

  close(): void {
    this.db.close();
  }
}

function fromRow(row: StoredSecret): SecretRecord {
  return {
    userId: new Uint8Array(row.userId),
    keyId: new Uint8Array(row.keyId),
    kind: row.kind as SecretKind,
    ciphertext: new Uint8Array(row.ciphertext),
    associatedData: new Uint8Array(row.associatedData),
    created: row.created,
  };
}
