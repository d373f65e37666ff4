/** The IndexedDB local store (src/store.ts) on fake-indexeddb, and what the client puts in it:
 * sealed copies and audit heads, never a secret in clear. */

import { test } from "node:test";
import assert from "node:assert/strict";
import { IDBFactory } from "fake-indexeddb";
import { ready } from "@serenity-kit/opaque";
import { toHex } from "../src/core/bytes.js";
import { Context, SecretKind } from "../src/core/constants.js";
import { KeymgmtClient } from "../src/client.js";
import { IndexedDbStore, MemoryStore, type LocalStore } from "../src/store.js";
import { FakeKeyServer } from "./fakeserver.js";

const U1 = new Uint8Array(16).fill(1);
const U2 = new Uint8Array(16).fill(2);
const K = (n: number) => new Uint8Array(16).fill(n);

async function exercise(store: LocalStore): Promise<void> {
  const record = (user: Uint8Array, key: Uint8Array, created: number) => ({ userId: user, keyId: key, kind: SecretKind.GENERATED, ciphertext: new Uint8Array(60).fill(9), associatedData: new Uint8Array(32).fill(8), created });
  await store.put(record(U1, K(5), 20));
  await store.put(record(U1, K(6), 10));
  await store.put(record(U2, K(5), 30));
  assert.deepEqual((await store.get(U1, K(5)))?.ciphertext, new Uint8Array(60).fill(9));
  assert.equal(await store.get(U1, K(7)), null);
  assert.deepEqual((await store.keyIds(U1)).map(toHex), [K(6), K(5)].map(toHex), "in order of creation");
  await store.delete(U1, K(6));
  assert.deepEqual((await store.keyIds(U1)).map(toHex), [toHex(K(5))]);
  await store.putAuditHead(U1, { position: 5n, hash: new Uint8Array(32).fill(3) });
  await store.putAuditHead(U1, { position: 4n, hash: new Uint8Array(32).fill(4) });
  assert.deepEqual(await store.auditHead(U1), { position: 5n, hash: new Uint8Array(32).fill(3) }, "an older head never replaces a newer one");
  await store.putAuditHead(U1, { position: 9n, hash: new Uint8Array(32).fill(4) });
  assert.equal((await store.auditHead(U1))?.position, 9n);
  assert.equal(await store.deleteUser(U1), 1);
  assert.equal(await store.auditHead(U1), null);
  assert.deepEqual((await store.keyIds(U2)).length, 1, "another user's copies stay");
}

test("MemoryStore and IndexedDbStore keep the same things", async () => {
  await exercise(new MemoryStore());
  const store = await IndexedDbStore.open("test-store", new IDBFactory());
  await exercise(store);
  store.close();
});

test("the IndexedDB store holds ciphertexts only, and survives a reopen", async () => {
  await ready;
  const factory = new IDBFactory();
  const server = new FakeKeyServer();
  const store = await IndexedDbStore.open("keymgmt", factory);
  const client = new KeymgmtClient(server.connect, { localStore: store });
  await client.register("heidi@example.org", "pw");
  const session = await client.login("heidi@example.org", "pw");
  const keyId = await session.generate();
  const secret = (await session.retrieve(keyId, Context.LOCAL_ONLY))!;
  const imported = await session.importSecret(Uint8Array.of(4, 0xde, 0xad, 0xbe, 0xef));
  await session.verifyAudit();
  await session.logout();
  await client.close();
  store.close();
  // read the raw database, every row of every object store: no secret in clear
  const db = await new Promise<IDBDatabase>((resolve, reject) => {
    const req = factory.open("keymgmt");
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
  const rows: unknown[] = [];
  for (const name of Array.from(db.objectStoreNames)) {
    rows.push(...(await new Promise<unknown[]>((resolve) => {
      const req = db.transaction(name).objectStore(name).getAll();
      req.onsuccess = () => resolve(req.result);
    })));
  }
  db.close();
  assert.equal(rows.length, 3, "two sealed copies and one audit head");
  const raw = JSON.stringify(rows, (_k, v: unknown) => (v instanceof Uint8Array ? toHex(v) : v));
  assert.ok(!raw.includes(toHex(secret)) && !raw.includes("deadbeef"));
  const reopened = await IndexedDbStore.open("keymgmt", factory);
  assert.equal((await reopened.keyIds(session.userId)).length, 2);
  assert.ok((await reopened.auditHead(session.userId)) !== null);
  // a new client on the reopened store answers from its sealed copies
  const again = new KeymgmtClient(server.connect, { localStore: reopened });
  const s2 = await again.login("heidi@example.org", "pw");
  assert.deepEqual(await s2.retrieve(keyId, Context.LOCAL_ONLY), secret);
  await again.close();
  reopened.close();
});
