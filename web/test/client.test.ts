/** The high-level client (src/client.ts) against the in-memory key server of fakeserver.ts,
 * with the real OPAQUE of @serenity-kit/opaque on both sides. */

import { before, test } from "node:test";
import assert from "node:assert/strict";
import { ready } from "@serenity-kit/opaque";
import { toHex, utf8 } from "../src/core/bytes.js";
import { Action, AuditType, Context, ErrorCode, Op, Outcome, Status } from "../src/core/constants.js";
import { decodeResponse, encodeResponse, type OkFields } from "../src/core/ops.js";
import {
  AuthenticationError,
  ClientClosedError,
  IntegrityError,
  KeymgmtClient,
  LabelConflictError,
  NotFoundError,
  RateLimitedError,
  RegistrationError,
  SessionEndedError,
} from "../src/client.js";
import { MemoryStore } from "../src/store.js";
import { serenityOpaque } from "../src/opaque.js";
import { masterKey, unwrapStorageKey } from "../src/core/crypto.js";
import type { OpaqueClient } from "../src/core/opaque.js";
import { FakeKeyServer } from "./fakeserver.js";

before(async () => {
  await ready;
});

const PASSWORD = "correct horse battery staple";

async function setUp(name = "alice@example.org") {
  const server = new FakeKeyServer();
  const store = new MemoryStore();
  const client = new KeymgmtClient(server.connect, { localStore: store, reconnectDelayMs: 5, reconnectMaxDelayMs: 20 });
  const userId = await client.register(name, PASSWORD);
  return { server, store, client, userId, name };
}

function logins(server: FakeKeyServer, userId: Uint8Array): number {
  return (server.audit.get(toHex(userId)) ?? []).filter((e) => e.action === Action.LOGIN).length;
}

test("register, log in, generate, retrieve in each context, list, audit, delete, log out", async () => {
  const { server, client, userId, name } = await setUp();
  assert.equal(userId.length, 16);
  const session = await client.login(name, PASSWORD);
  assert.deepEqual(session.userId, userId);
  const keyId = await session.generate();
  const secret = (await session.retrieve(keyId, Context.LOCAL_ONLY))!;
  assert.equal(secret.length, 32);
  assert.equal(server.requests.filter((op) => op === Op.RETRIEVE).length, 0, "the verified local copy answered");
  assert.equal(await session.retrieve(keyId, Context.NULL), null);
  assert.deepEqual(await session.export(keyId), Uint8Array.of(32, ...secret));
  // a second device (empty local store) reads it from the server, checked
  const other = new KeymgmtClient(server.connect, { localStore: new MemoryStore() });
  const otherSession = await other.login(name, PASSWORD);
  assert.deepEqual(await otherSession.retrieve(keyId, Context.LOCAL_ONLY), secret);
  assert.equal(server.requests.filter((op) => op === Op.RETRIEVE).length, 1);
  // import, short and long portable forms
  const short = await session.importSecret(Uint8Array.of(3, 0xaa, 0xbb, 0xcc));
  assert.deepEqual(await otherSession.retrieve(short, Context.LOCAL_ONLY), Uint8Array.of(0xaa, 0xbb, 0xcc));
  const big = new Uint8Array(300).fill(9);
  const long = await session.importSecret(Uint8Array.of(0, 1, 0, 0, 1, 44, ...big));
  assert.deepEqual(await otherSession.retrieve(long, Context.LOCAL_ONLY), big);
  await assert.rejects(session.importSecret(Uint8Array.of(4, 1, 2)), /cannot import/);
  // list and audit
  const keys = await session.listKeys();
  assert.deepEqual(keys.map((k) => toHex(k.keyId)).sort(), [keyId, short, long].map(toHex).sort());
  const keyEntries = await session.audit(AuditType.KEY_ONLY, [keyId]);
  assert.ok(keyEntries.length >= 2 && keyEntries.every((e) => e.keyId !== null && toHex(e.keyId) === toHex(keyId)));
  const systemEntries = await session.audit(AuditType.SYSTEM_ONLY);
  assert.ok(systemEntries.some((e) => e.action === Action.REGISTER));
  await assert.rejects(session.audit(AuditType.SYSTEM_ONLY, [keyId]), /invalid argument/);
  const verified = await session.verifyAudit();
  assert.equal(verified.head?.position, BigInt(verified.entries.length));
  assert.deepEqual(await session.auditHead(), verified.head);
  // delete: gone on the server and locally, on every device
  await session.delete(keyId);
  await assert.rejects(session.retrieve(keyId, Context.LOCAL_ONLY), NotFoundError);
  assert.equal(await client.localStore.get(session.userId, keyId), null);
  assert.ok(!(await otherSession.listKeys()).some((k) => toHex(k.keyId) === toHex(keyId)));
  await session.logout();
  await assert.rejects(session.listKeys(), SessionEndedError);
  await otherSession.logout();
  await client.close();
  await other.close();
  await assert.rejects(client.login(name, PASSWORD), ClientClosedError);
});

test("a wrong password and a taken name are refused", async () => {
  const { client, name } = await setUp("bob@example.org");
  await assert.rejects(client.login(name, "wrong"), AuthenticationError);
  await assert.rejects(client.login("nobody@example.org", PASSWORD), AuthenticationError);
  await assert.rejects(client.register(name, PASSWORD), (e: unknown) => e instanceof RegistrationError && e.code === ErrorCode.ACCOUNT_EXISTS);
  await client.close();
});

test("named keys: labels sealed, resolved, conflicts refused before sending", async () => {
  const { server, client, name } = await setUp("carol@example.org");
  const session = await client.login(name, PASSWORD);
  const keyId = await session.generate("backup key");
  assert.deepEqual(await session.resolve("backup key"), keyId);
  const stored = [...server.secrets.values()][0]!.get(toHex(keyId))!;
  assert.ok(!toHex(stored.sealedLabel).includes(toHex(utf8("backup key"))), "the server holds the label sealed");
  const stores = server.requests.filter((op) => op === Op.STORE_SECRET).length;
  await assert.rejects(session.generate("backup key"), LabelConflictError);
  assert.equal(server.requests.filter((op) => op === Op.STORE_SECRET).length, stores, "nothing stored");
  await session.rename(keyId, "main key");
  assert.equal((await session.listKeys())[0]!.label, "main key");
  await assert.rejects(session.resolve("backup key"), NotFoundError);
  await assert.rejects(session.rename(keyId, "0123456789abcdef0123456789abcdef"), /invalid argument/);
  // a label the server swapped in from nowhere is shown as tampered, never used
  stored.sealedLabel = stored.sealedLabel.map((b, i) => (i === 20 ? b ^ 1 : b));
  const [listed] = await session.listKeys();
  assert.deepEqual([listed!.label, listed!.labelTampered], [null, true]);
  await client.close();
});

test("named keys: a label is one label however its accents were typed (compared in NFC)", async () => {
  const { server, client, name } = await setUp("carol-nfc@example.org");
  const session = await client.login(name, PASSWORD);
  const composed = "caf\u00e9 key";
  const decomposed = "cafe\u0301 key";
  assert.notEqual(composed, decomposed);
  const first = await session.generate(composed);
  const stores = server.requests.filter((op) => op === Op.STORE_SECRET).length;
  await assert.rejects(session.generate(decomposed), LabelConflictError);
  assert.equal(server.requests.filter((op) => op === Op.STORE_SECRET).length, stores, "nothing stored");
  const second = await session.generate();
  await assert.rejects(session.rename(second, decomposed), LabelConflictError);
  assert.deepEqual(await session.resolve(decomposed), first);
  await session.rename(first, decomposed); // the key's own label: no conflict
  assert.deepEqual(await session.resolve(composed), first);
  await client.close();
});

test("a dropped connection resumes every session without a new login; requests are answered once", async () => {
  const { server, client, userId, name } = await setUp("dave@example.org");
  const session = await client.login(name, PASSWORD);
  const keyId = await session.generate();
  server.dropAll();
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal((await session.listKeys()).length, 1);
  assert.equal(client.connectionCount, 2);
  assert.equal(logins(server, userId), 1, "resumed, not logged in again");
  // the server stores, then the connection drops before the answer: the client re-sends the
  // request after resuming and gets the cached answer: one key stored, not two
  server.dropBeforeAnswer = (request) => request.op === Op.STORE_SECRET;
  const second = await session.generate();
  assert.notDeepEqual(second, keyId);
  assert.equal((await session.listKeys()).length, 2);
  assert.equal(server.requests.filter((op) => op === Op.STORE_SECRET).length, 2);
  assert.equal(client.connectionCount, 3);
  // RESUME refused unseen (RATE_LIMITED): the session is resumed again a moment later
  server.refuseResumes = 1;
  server.dropAll();
  assert.deepEqual(await session.retrieve(keyId, Context.LOCAL_ONLY), await session.retrieve(keyId, Context.LOCAL_ONLY));
  assert.equal((await session.listKeys()).length, 2);
  assert.equal(logins(server, userId), 1);
  await client.close();
});

test("a re-sent RETRIEVE whose big answer the server did not keep runs again; a re-sent STORE does not", async () => {
  const { server, client, userId, name, store } = await setUp("rita@example.org");
  const session = await client.login(name, PASSWORD);
  const secret = Uint8Array.from({ length: 8000 }, (_, i) => i % 251);
  const portable = Uint8Array.of(0, 1, 0, 0, 8000 >> 8, 8000 & 0xff, ...secret);
  server.dropBeforeAnswer = (request) => request.op === Op.STORE_SECRET;
  const keyId = await session.importSecret(portable);
  assert.equal(server.requests.filter((op) => op === Op.STORE_SECRET).length, 1, "the store's kept answer was sent again");
  await store.delete(session.userId, keyId); // so that the server is asked
  // the answer (about 8 KB) is more than the 4 KiB a session keeps: after the drop, the
  // client's re-send runs the RETRIEVE again, and the owner's log shows it twice
  server.dropBeforeAnswer = (request) => request.op === Op.RETRIEVE;
  assert.deepEqual(await session.retrieve(keyId, Context.LOCAL_ONLY), secret);
  assert.equal(server.requests.filter((op) => op === Op.RETRIEVE).length, 2);
  const retrieves = (server.audit.get(toHex(userId)) ?? []).filter((e) => e.action === Action.RETRIEVE);
  assert.equal(retrieves.length, 2);
  assert.equal(logins(server, userId), 1, "resumed, not logged in again");
  await client.close();
});

test("a session the server forgot ends with a clear error (log in again)", async () => {
  const { server, client, name } = await setUp("erin@example.org");
  const session = await client.login(name, PASSWORD);
  server.registry.clear();
  server.dropAll();
  await assert.rejects(session.listKeys(), (e: unknown) => e instanceof SessionEndedError && e.code === ErrorCode.UNKNOWN_SESSION);
  const again = await client.login(name, PASSWORD);
  assert.deepEqual(await again.listKeys(), []);
  await client.close();
});

test("a request answered RATE_LIMITED is sent again after a pause; past rateLimitWaitMs it is an error", async () => {
  const server = new FakeKeyServer();
  const client = new KeymgmtClient(server.connect, { localStore: new MemoryStore(), rateLimitWaitMs: 2000 });
  await client.register("rita@example.org", PASSWORD);
  const session = await client.login("rita@example.org", PASSWORD);
  const keyId = await session.generate();
  const before = (server.audit.get(toHex(session.userId)) ?? []).length;
  let refusals = 3;
  server.rateLimited = () => refusals-- > 0;
  const started = Date.now();
  assert.deepEqual((await session.listKeys()).map((k) => toHex(k.keyId)), [toHex(keyId)]);
  assert.equal(refusals, -1, "refused three times, then served");
  assert.ok(Date.now() - started >= 25 + 50 + 100 - 5, "with pauses between the sends");
  assert.equal((server.audit.get(toHex(session.userId)) ?? []).length, before + 1, "one LIST audited, no refusal");
  const slow = new KeymgmtClient(server.connect, { localStore: new MemoryStore(), rateLimitWaitMs: 200 });
  const other = await slow.login("rita@example.org", PASSWORD);
  server.rateLimited = (request) => request.op === Op.LIST_KEYS;
  await assert.rejects(other.listKeys(), (error: unknown) => error instanceof RateLimitedError && /per-user rate/.test((error as Error).message));
  server.rateLimited = null;
  await client.close();
  await slow.close();
});

test("answers that fail the client's checks are integrity errors", async () => {
  const { server, client, name, store } = await setUp("frank@example.org");
  const session = await client.login(name, PASSWORD);
  const keyId = await session.generate();
  // a swapped ciphertext from the server (local copy gone): refused, not returned
  await store.delete(session.userId, keyId);
  server.tamper = (request, body) => {
    if (request.op !== Op.RETRIEVE) return body;
    const answer = decodeResponse(Op.RETRIEVE, body) as { status: Status.OK; fields: OkFields[Op.RETRIEVE] };
    answer.fields.sealed[20]! ^= 1;
    return encodeResponse(Op.RETRIEVE, answer);
  };
  await assert.rejects(session.retrieve(keyId, Context.LOCAL_ONLY), IntegrityError);
  assert.equal(await store.get(session.userId, keyId), null, "an unverified copy is not kept");
  // an AD that is not this user's and key's, next to a ciphertext that opens: refused too
  server.tamper = (request, body) => {
    if (request.op !== Op.RETRIEVE) return body;
    const answer = decodeResponse(Op.RETRIEVE, body) as { status: Status.OK; fields: OkFields[Op.RETRIEVE] };
    answer.fields.associatedData = Uint8Array.of(...answer.fields.associatedData, 0);
    return encodeResponse(Op.RETRIEVE, answer);
  };
  await assert.rejects(session.retrieve(keyId, Context.LOCAL_ONLY), IntegrityError);
  // a key id the two nonces do not give (KEY-2): nothing stored
  server.tamper = (request, body) => {
    if (request.op !== Op.CREATE_KEY_ID && request.op !== Op.STORE_SECRET) return body;
    const copy = body.slice();
    copy[5]! ^= 1;
    return copy;
  };
  await session.generate(); // uses the good next key id; the one it brings back is altered
  const stores = server.requests.filter((op) => op === Op.STORE_SECRET).length;
  await assert.rejects(session.generate(), IntegrityError);
  const fresh = await client.login(name, PASSWORD); // no next key id yet: CREATE_KEY_ID altered
  await assert.rejects(fresh.generate(), IntegrityError);
  assert.equal(server.requests.filter((op) => op === Op.STORE_SECRET).length, stores, "nothing stored under a bad key id");
  server.tamper = null;
  // a damaged local copy is replaced by the server's verified one
  const record = (await store.get(session.userId, keyId)) ?? null;
  assert.equal(record, null);
  const secret = await session.retrieve(keyId, Context.LOCAL_ONLY);
  const local = (await store.get(session.userId, keyId))!;
  local.ciphertext[15]! ^= 1;
  await store.put(local);
  assert.deepEqual(await session.retrieve(keyId, Context.LOCAL_ONLY), secret);
  assert.notDeepEqual((await store.get(session.userId, keyId))!.ciphertext, local.ciphertext);
  // an audit log changed after it was verified
  await session.verifyAudit();
  const log = [...server.audit.values()][0]!;
  log[1]!.timestamp += 1n;
  await assert.rejects(session.verifyAudit(), IntegrityError);
  await client.close();
});

test("password change keeps the secrets; account deletion drops everything", async () => {
  const { client, name, store, userId } = await setUp("grace@example.org");
  let session = await client.login(name, PASSWORD);
  const keyId = await session.generate();
  const secret = await session.retrieve(keyId, Context.LOCAL_ONLY);
  await session.logout();
  await client.changePassword(name, PASSWORD, "a new password");
  await assert.rejects(client.login(name, PASSWORD), AuthenticationError);
  session = await client.login(name, "a new password");
  await store.delete(userId, keyId);
  assert.deepEqual(await session.retrieve(keyId, Context.LOCAL_ONLY), secret);
  await session.logout();
  await client.deleteAccount(name, "a new password");
  assert.deepEqual(await store.keyIds(userId), []);
  await assert.rejects(client.login(name, "a new password"), AuthenticationError);
  await client.close();
});

/** Every byte string and string reachable from ``root`` through enumerable properties, arrays,
 * maps and sets: what a log line, an inspection or a serialization of it could show. */
function reachable(root: unknown): { bytes: Uint8Array[]; strings: string[] } {
  const seen = new Set<unknown>();
  const bytes: Uint8Array[] = [];
  const strings: string[] = [];
  const walk = (value: unknown): void => {
    if (typeof value === "string") strings.push(value);
    if (value === null || typeof value !== "object" || seen.has(value)) return;
    seen.add(value);
    if (value instanceof Uint8Array) return void bytes.push(value);
    if (value instanceof Map) for (const [k, v] of value) (walk(k), walk(v));
    else if (value instanceof Set || Array.isArray(value)) for (const v of value) walk(v);
    else for (const key of Object.keys(value)) walk((value as Record<string, unknown>)[key]);
  };
  walk(root);
  return { bytes, strings };
}

test("no password, export key, session key, storage key or secret is reachable from the client's objects", async () => {
  const seen: { exportKey?: Uint8Array; sessionKey?: Uint8Array } = {};
  const recording: OpaqueClient = {
    ...serenityOpaque,
    loginFinish(password, state, response) {
      const result = serenityOpaque.loginFinish(password, state, response);
      if (result) Object.assign(seen, { exportKey: result.exportKey.slice(), sessionKey: result.sessionKey.slice() });
      return result;
    },
  };
  const server = new FakeKeyServer();
  const client = new KeymgmtClient(server.connect, { opaque: recording });
  await client.register("ivan@example.org", PASSWORD);
  const session = await client.login("ivan@example.org", PASSWORD);
  const keyId = await session.generate();
  const secret = (await session.retrieve(keyId, Context.LOCAL_ONLY))!;
  const account = [...server.accounts.values()][0]!;
  const storageKey = unwrapStorageKey(masterKey(seen.exportKey!), session.userId, account.encryptedStorageKey);
  const { bytes, strings } = reachable({ client, session });
  assert.ok(bytes.length >= 4, "the walk reached the client's byte strings (user id, sealed copy, AD, handle)");
  for (const [what, needle] of Object.entries({ exportKey: seen.exportKey!, sessionKey: seen.sessionKey!, storageKey, secret })) {
    const hex = toHex(needle);
    assert.ok(!bytes.some((b) => toHex(b).includes(hex)), `${what} is reachable`);
  }
  assert.ok(!strings.some((s) => s.includes(PASSWORD)), "the password is reachable");
  assert.ok(!String(session).includes(toHex(secret)) && !String(client).includes(PASSWORD));
  await session.logout();
  await client.close();
});

test("an audit walk goes on across short and empty pages to the log's end (section 12.9)", async () => {
  const { server, client, userId, name } = await setUp("ivan@example.org");
  const session = await client.login(name, PASSWORD);
  const keyId = await session.generate();
  const other = await session.generate();
  // A long log where the key's entries are few and far apart, and a server that reads only
  // 4 entries a request: most pages of the filtered walk are short or empty, not the end.
  server.auditScan = 4;
  for (let round = 0; round < 6; round++) {
    for (let i = 0; i < 5 + round; i++) server.writeAudit(userId, Action.LIST_KEYS, Outcome.SUCCESS);
    server.writeAudit(userId, Action.RETRIEVE, Outcome.SUCCESS, round % 2 ? keyId : other, Context.EXPORT);
  }
  server.writeAudit(userId, Action.RETRIEVE, Outcome.SUCCESS, keyId, Context.EXPORT); // the log's last entry
  const log = server.audit.get(toHex(userId))!;
  const expected = log.filter((e) => e.keyId !== null && toHex(e.keyId) === toHex(keyId)).map((e) => e.entryId);
  server.auditPages.length = 0;
  const entries = await session.audit(AuditType.KEY_ONLY, [keyId]);
  assert.deepEqual(entries.map((e) => e.entryId), expected, "exactly the matching entries, in order, none twice");
  const emptyNotDone = server.auditPages.filter((p) => p.count === 0 && p.nextCursor !== 0n);
  assert.ok(emptyNotDone.length >= 3, `empty pages that are not the end: ${emptyNotDone.length}`);
  assert.equal(server.auditPages.at(-1)!.nextCursor, 0n);
  // The chain walk reads short pages too, and verifies across them.
  const verified = await session.verifyAudit();
  assert.equal(verified.head?.position, BigInt(verified.entries.length));
  await client.close();
});

test("an audit page whose next_cursor does not move forward is an integrity error, not an endless walk", async () => {
  const { server, client, name } = await setUp("judy@example.org");
  const session = await client.login(name, PASSWORD);
  for (const lie of ["stays", "goes back", "before the last entry", "one ahead, empty", "past the last entry"] as const) {
    let answered = 0;
    server.tamper = (request, body) => {
      if (request.op !== Op.AUDIT) return body;
      answered += 1;
      const answer = decodeResponse(Op.AUDIT, body) as { status: Status.OK; fields: OkFields[Op.AUDIT] };
      const cursor = (request as { cursor: bigint }).cursor;
      const entries = answer.fields.entries;
      if (answered > 20) answer.fields = { entries: [], nextCursor: 0n }; // a client that does not check ends here
      else if (lie === "stays") answer.fields = { entries: [], nextCursor: cursor === 0n ? 1n : cursor };
      else if (lie === "goes back") answer.fields = { entries: [], nextCursor: cursor === 0n ? 5n : cursor - 1n };
      else if (lie === "one ahead, empty") answer.fields = { entries: [], nextCursor: cursor + 1n };
      else if (lie === "past the last entry") answer.fields = { entries: entries.slice(0, 1), nextCursor: cursor + 1000n };
      else answer.fields = { entries, nextCursor: entries[0]!.entryId };
      return encodeResponse(Op.AUDIT, answer);
    };
    const moves = lie === "one ahead, empty" || lie === "past the last entry";
    const refusal = moves ? /of an unfiltered page is not its last entry/ : /does not move past|of an unfiltered page/;
    await assert.rejects(session.audit(), (error: Error) => error instanceof IntegrityError && refusal.test(error.message), lie);
    await assert.rejects(session.verifyAudit(), IntegrityError, lie);
    assert.ok(answered <= 4, `${lie}: ${answered} pages before the refusal`);
  }
  server.tamper = null;
  await client.close();
});
