/** What the browser client says and does about accounts and named keys, as the Python client
 * does since the review of issue 16 (gaps 2 to 7), against the in-memory key server of
 * fakeserver.ts with real OPAQUE. The texts are the Python client's
 * (adapters/client/async_client.py, adapters/cli/client.py). */

import { before, test } from "node:test";
import assert from "node:assert/strict";
import { ready } from "@serenity-kit/opaque";
import { toHex, utf8 } from "../src/core/bytes.js";
import { Action, Context, ErrorCode, Op, Status } from "../src/core/constants.js";
import { masterKey, unwrapStorageKey } from "../src/core/crypto.js";
import { sealLabel } from "../src/core/ops.js";
import type { OpaqueClient } from "../src/core/opaque.js";
import {
  KeymgmtClient,
  KeymgmtError,
  NOT_RECENT_LOGIN,
  NO_ACCOUNT,
  NotFoundError,
  RequestRefusedError,
  SESSION_REVOKED,
  SessionEndedError,
  labelText,
  tamperedLabelsWarning,
} from "../src/client.js";
import { serenityOpaque } from "../src/opaque.js";
import { MemoryStore } from "../src/store.js";
import { FakeKeyServer } from "./fakeserver.js";

before(async () => {
  await ready;
});

const PASSWORD = "correct horse battery staple";
const NEW_PASSWORD = "a new password, 2026";
const tick = () => new Promise((resolve) => setTimeout(resolve, 20));

async function setUp(name: string, options: { opaque?: OpaqueClient } = {}) {
  const server = new FakeKeyServer();
  const client = new KeymgmtClient(server.connect, { localStore: new MemoryStore(), ...options });
  const userId = await client.register(name, PASSWORD);
  return { server, client, userId, name };
}

function another(server: FakeKeyServer): KeymgmtClient {
  return new KeymgmtClient(server.connect, { localStore: new MemoryStore() });
}

function logins(server: FakeKeyServer, userId: Uint8Array): number {
  return (server.audit.get(toHex(userId)) ?? []).filter((e) => e.action === Action.LOGIN).length;
}

const revoked = (e: unknown) => e instanceof SessionEndedError && e.code === ErrorCode.NOT_AUTHORIZED && e.message === SESSION_REVOKED;

test("gap 2: a session ended by a password change or a deletion elsewhere raises SessionEndedError: log in again", async () => {
  assert.equal(SESSION_REVOKED, "session ended: the account's password was changed after this session logged in, or the account was deleted; log in again");
  const { server, client, name } = await setUp("gap2@example.org");
  // a session on another device, attached when the password changes: CLOSE(NOT_AUTHORIZED) at once
  const device = another(server);
  const attached = await device.login(name, PASSWORD);
  const keyId = await attached.generate();
  await client.changePassword(name, PASSWORD, NEW_PASSWORD);
  await tick();
  await assert.rejects(attached.listKeys(), revoked);
  await assert.rejects(attached.delete(keyId), revoked);
  // a session the change reaches at its next request (made on another instance): that request
  // gets no answer but the CLOSE, and the call in flight says the same
  const stale = await device.login(name, NEW_PASSWORD);
  server.changedElsewhere(name);
  await assert.rejects(stale.listKeys(), revoked);
  // a fresh login goes on; a deletion ends every other session of the account the same way
  const fresh = await device.login(name, NEW_PASSWORD);
  assert.equal((await fresh.listKeys()).length, 1);
  const owner = await client.login(name, NEW_PASSWORD);
  await owner.deleteAccount();
  await tick();
  await assert.rejects(fresh.listKeys(), revoked);
  await client.close();
  await device.close();
});

test("gap 3: a listed key whose sealed label does not open shows <tampered>; the others list and name keys as usual", async () => {
  let exportKey: Uint8Array | null = null;
  const recording: OpaqueClient = {
    ...serenityOpaque,
    loginFinish(password, state, response) {
      const result = serenityOpaque.loginFinish(password, state, response);
      if (result) exportKey = result.exportKey.slice();
      return result;
    },
  };
  const { server, client, userId, name } = await setUp("gap3@example.org", { opaque: recording });
  const session = await client.login(name, PASSWORD);
  const good = await session.generate("good");
  const damaged = await session.generate("damaged");
  const invalid = await session.generate("invalid");
  const hexLike = await session.generate("hex like");
  const empty = await session.generate("empty");
  const plain = await session.generate();
  const stored = server.secrets.get(toHex(userId))!;
  // what the key server sends for a stored label that is no sealed label (29 zero bytes, protocol.md LIST_KEYS)
  stored.get(toHex(damaged))!.sealedLabel = new Uint8Array(29);
  // sealed labels that open under the storage key but hold no label the client accepts
  const account = [...server.accounts.values()][0]!;
  const storageKey = unwrapStorageKey(masterKey(exportKey!), userId, account.encryptedStorageKey);
  const nonce = new Uint8Array(12).fill(5);
  stored.get(toHex(invalid))!.sealedLabel = sealLabel(storageKey, userId, invalid, utf8("bell\u0007"), nonce);
  stored.get(toHex(hexLike))!.sealedLabel = sealLabel(storageKey, userId, hexLike, utf8(toHex(good)), nonce);
  stored.get(toHex(empty))!.sealedLabel = sealLabel(storageKey, userId, empty, new Uint8Array(7), nonce);

  const keys = await session.listKeys();
  const shown = Object.fromEntries(keys.map((k) => [toHex(k.keyId), labelText(k)]));
  assert.deepEqual(shown, {
    [toHex(good)]: "good",
    [toHex(damaged)]: "<tampered>",
    [toHex(invalid)]: "<tampered>",
    [toHex(hexLike)]: "<tampered>",
    [toHex(empty)]: "<tampered>",
    [toHex(plain)]: "",
  });
  for (const key of keys.filter((k) => labelText(k) === "<tampered>")) assert.equal(key.label, null);
  assert.equal(tamperedLabelsWarning(keys), "4 label(s) failed verification (altered on the key server, or moved from another key); those keys are listed by id only");
  assert.equal(tamperedLabelsWarning(keys.filter((k) => !k.labelTampered)), null);
  assert.deepEqual(await session.resolve("good"), good); // naming keys still works
  await assert.rejects(session.resolve("damaged"), NotFoundError);
  assert.equal(await session.rename(damaged, "repaired"), true); // it had a (tampered) label
  assert.deepEqual(await session.resolve("repaired"), damaged);
  await client.close();
});

test("gap 4: INVALID to a password change or an account deletion says it needs a recent login", async () => {
  assert.equal(NOT_RECENT_LOGIN, "request refused: a password change or an account deletion needs a recent login (within the key server's sessions.reauth_window, 5 minutes by default), and this session's login is older; log in again");
  const { server, client, name } = await setUp("gap4@example.org");
  const session = await client.login(name, PASSWORD);
  const keyId = await session.generate();
  server.clock += 400_000_000n; // 400 s later: the login is older than the 300 s window
  const notRecent = (e: unknown) => e instanceof RequestRefusedError && e.status === Status.INVALID && e.message === NOT_RECENT_LOGIN;
  await assert.rejects(session.changePassword(NEW_PASSWORD), notRecent);
  await assert.rejects(session.deleteAccount(), notRecent);
  assert.equal(server.requests.filter((op) => op === Op.CHANGE_PASSWORD_START || op === Op.DELETE_ACCOUNT).length, 2);
  // nothing changed: the session goes on, the old password still logs in, the key is there
  assert.equal((await session.listKeys()).length, 1);
  const again = await client.login(name, PASSWORD);
  assert.deepEqual((await again.listKeys()).map((k) => toHex(k.keyId)), [toHex(keyId)]);
  await client.close();
});

test("gap 5: a new password equal to the current one is refused before anything is sent", async () => {
  const { server, client, userId, name } = await setUp("gap5@example.org");
  const requests = server.requests.length;
  const loginsBefore = logins(server, userId);
  await assert.rejects(client.changePassword(name, PASSWORD, PASSWORD), (e: unknown) => e instanceof KeymgmtError && e.message === "invalid argument: the new password is the current one");
  await assert.rejects(client.changePassword(name, PASSWORD, ""), /the new password must not be empty/);
  assert.equal(logins(server, userId), loginsBefore, "no login");
  assert.equal(server.requests.length, requests, "no request");
  // a different one goes through
  await client.changePassword(name, PASSWORD, NEW_PASSWORD);
  await (await client.login(name, NEW_PASSWORD)).logout();
  await client.close();
});

test("gap 5, in a session: the password it logged in with (or last changed to) is refused before the change is sent", async () => {
  const { server, client, name } = await setUp("gap5s@example.org");
  const session = await client.login(name, PASSWORD);
  const other = await another(server).login(name, PASSWORD);
  const finishes = () => server.requests.filter((op) => op === Op.CHANGE_PASSWORD_FINISH).length;
  const same = (e: unknown) => e instanceof KeymgmtError && e.message === "invalid argument: the new password is the current one";
  await assert.rejects(session.changePassword(PASSWORD), same);
  assert.equal(finishes(), 0, "no CHANGE_PASSWORD_FINISH");
  assert.deepEqual(await other.listKeys(), [], "nothing changed: the other session goes on");
  await session.changePassword(NEW_PASSWORD);
  assert.equal(finishes(), 1);
  await assert.rejects(session.changePassword(NEW_PASSWORD), same);
  assert.equal(finishes(), 1);
  await session.changePassword(PASSWORD);
  await (await client.login(name, PASSWORD)).logout();
  await client.close();
});

test("a session the server ended answers nothing more, not even from the local store", async () => {
  const { server, client, name } = await setUp("ended@example.org");
  const session = await client.login(name, PASSWORD);
  const keyId = await session.generate(); // kept in the local store
  assert.ok(await session.retrieve(keyId, Context.LOCAL_ONLY));
  await another(server).changePassword(name, PASSWORD, NEW_PASSWORD);
  await tick();
  assert.ok(await client.localStore.get(session.userId, keyId), "a copy it could read");
  await assert.rejects(session.retrieve(keyId, Context.LOCAL_ONLY), revoked);
  await assert.rejects(session.export(keyId), revoked);
  // the session keeps its own reason beyond the client's bounded memory of ended sessions
  (client as unknown as { ended: Map<unknown, unknown> }).ended.clear();
  await assert.rejects(session.retrieve(keyId, Context.LOCAL_ONLY), revoked);
  await assert.rejects(session.listKeys(), revoked);
  await client.close();
});

test("gap 6: removing the label of a key that has none says so and sends nothing", async () => {
  const { server, client, name } = await setUp("gap6@example.org");
  const session = await client.login(name, PASSWORD);
  const unnamed = await session.generate();
  const named = await session.generate("named");
  const renames = () => server.requests.filter((op) => op === Op.RENAME_KEY).length;
  const before = renames();
  assert.equal(await session.rename(unnamed, null), false);
  assert.equal(renames(), before, "no RENAME_KEY for a key without a label");
  assert.equal(server.requests[server.requests.length - 1], Op.LIST_KEYS);
  assert.equal(await session.rename(named, null), true);
  assert.equal(renames(), before + 1);
  assert.equal((await session.listKeys()).find((k) => toHex(k.keyId) === toHex(named))!.label, null);
  assert.equal(await session.rename(named, null), false, "removed already");
  assert.equal(renames(), before + 1);
  // setting a label says the same of the label before
  assert.equal(await session.rename(unnamed, "first"), false);
  assert.equal(await session.rename(unnamed, "second"), true);
  // a key not listed at all is left to the key server, which says there is no such key
  await assert.rejects(session.rename(new Uint8Array(16).fill(1), null), (e: unknown) => e instanceof NotFoundError && e.message === "no such key");
  assert.equal(renames(), before + 4);
  await client.close();
});

test("gap 7: NOT_FOUND to an operation that names no key says the account does not exist", async () => {
  assert.equal(NO_ACCOUNT, "the account does not exist (it was deleted)");
  const { server, client, userId, name } = await setUp("gap7@example.org");
  server.releaseBefore = true; // the release before answers NOT_FOUND instead of ending the session
  const session = await client.login(name, PASSWORD);
  const keyId = await session.generate();
  await client.localStore.delete(userId, keyId);
  const idle = await client.login(name, PASSWORD); // no request yet: its first fetches the storage key
  // the account row goes under the live session (another device deleted it)
  server.accounts.delete(toHex(utf8(name)));
  server.secrets.delete(toHex(userId));
  const noAccount = (e: unknown) => e instanceof NotFoundError && e.message === NO_ACCOUNT;
  await assert.rejects(session.listKeys(), noAccount);
  await assert.rejects(session.audit(), noAccount);
  await assert.rejects(session.generate(), noAccount);
  await assert.rejects(session.verifyAudit(), noAccount);
  // the operations on one key still say there is no such key
  const noKey = (e: unknown) => e instanceof NotFoundError && e.message === "no such key";
  await assert.rejects(session.retrieve(keyId, Context.LOCAL_ONLY), noKey);
  await assert.rejects(session.delete(keyId), noKey);
  await assert.rejects(idle.retrieve(keyId, Context.LOCAL_ONLY), noAccount); // RETRIEVE_STORAGE_KEY found nothing
  assert.equal(server.requests[server.requests.length - 1], Op.RETRIEVE_STORAGE_KEY);
  await client.close();
});
