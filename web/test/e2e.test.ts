/** End to end against a real keymgmt-server (the Python key server, a subprocess on loopback):
 * the TypeScript client over TLS 1.3 (node's tls: the same byte stream a browser's wss carries)
 * (src/tls.ts, the transport of the client conformance shim) and, when the installed key server
 * has the WebSocket listener, over wss too (the ``ws`` package). Interop both ways with the Python CLI: what ``keymgmt`` stored is read here, and
 * what this client stores is read by ``keymgmt retrieve``; a dropped connection resumes.
 *
 * The key server comes from $KEYMGMT_BIN_DIR (a folder with keymgmt-server and keymgmt), else
 * the repository's .venv/bin. Without one the tests are skipped with that reason, or fail when
 * KEYMGMT_REQUIRE_WEB=1. */

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { ready } from "@serenity-kit/opaque";
import { fromHex, toHex } from "../src/core/bytes.js";
import { Action, Context, ErrorCode, Status } from "../src/core/constants.js";
import {
  KeymgmtClient,
  KeymgmtError,
  NOT_RECENT_LOGIN,
  RequestRefusedError,
  SESSION_REVOKED,
  SessionEndedError,
  labelText,
  tamperedLabelsWarning,
  type KeySession,
} from "../src/client.js";
import { MemoryStore } from "../src/store.js";
import { tlsConnector } from "../src/tls.js";
import type { Connector, Transport } from "../src/transport.js";
import { webSocketConnector, type WebSocketConstructor } from "../src/ws.js";

const REPO = fileURLToPath(new URL("../../../", import.meta.url));
const BIN = process.env.KEYMGMT_BIN_DIR ?? join(REPO, ".venv", "bin");
const SERVER_BIN = join(BIN, "keymgmt-server");
const CLI_BIN = join(BIN, "keymgmt");
const ORIGIN = "https://keymgmt-web.test";
const REQUIRED = process.env.KEYMGMT_REQUIRE_WEB === "1";
const MISSING = existsSync(SERVER_BIN) && existsSync(CLI_BIN) ? null : `no keymgmt-server/keymgmt in ${BIN} (set KEYMGMT_BIN_DIR)`;
const ENV = { ...process.env, PYTHONDONTWRITEBYTECODE: "1" };

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => (typeof address === "object" && address ? resolve(address.port) : reject(new Error("no port"))));
    });
  });
}

interface Running {
  dir: string;
  port: number;
  wsPort: number | null;
  process: ChildProcess;
}

let running: Running | null = null;

function tlsTo(port: number, ca: Buffer): Connector {
  return tlsConnector("127.0.0.1", port, { ca, serverName: "localhost" });
}

function wssConnector(port: number, ca: Buffer): Connector {
  // the ws package takes TLS and Origin options a browser sets itself
  const Impl = class extends WebSocket {
    constructor(url: string, protocols?: string | string[]) {
      super(url, protocols, { ca, origin: ORIGIN, perMessageDeflate: false });
    }
  } as unknown as WebSocketConstructor;
  return webSocketConnector(`wss://localhost:${port}/keymgmt`, { WebSocket: Impl });
}

function cli(args: string[], password: string): string {
  const r = running!;
  const result = spawnSync(
    CLI_BIN,
    ["--server", `127.0.0.1:${r.port}`, "--ca", join(r.dir, "ca.pem"), "--server-name", "localhost", "--local-store", join(r.dir, "cli.db"), "--password-stdin", ...args],
    { input: `${password}\n`, encoding: "utf-8", env: ENV, timeout: 60_000 },
  );
  assert.equal(result.status, 0, `keymgmt ${args.join(" ")}: ${result.stderr}`);
  return result.stdout.trim();
}

/** ``keymgmt-server init`` in a fresh folder, then ``serve`` (with the WebSocket listener when
 * this key server has one), with ``env`` added to its environment; resolves once it answers. */
async function startKeyServer(env: Record<string, string> = {}): Promise<Running> {
  const dir = mkdtempSync(join(tmpdir(), "keymgmt-web-e2e-"));
  const port = await freePort();
  const init = spawnSync(SERVER_BIN, ["init", "--dir", dir, "--port", String(port)], { encoding: "utf-8", env: ENV });
  assert.equal(init.status, 0, init.stderr);
  const configPath = join(dir, "keymgmt-server.toml");
  let config = readFileSync(configPath, "utf-8");
  let wsPort: number | null = null;
  if (/^\[websocket\]/m.test(config)) {
    wsPort = await freePort();
    config = config.replace(/^listen = ""/m, `listen = "${wsPort}"`).replace(/^allowed_origins = \[\]/m, `allowed_origins = ["${ORIGIN}"]`);
  }
  // quick logins for the test: Argon2 is the same, only the limits change
  config = config.replace(/^rate = .*$/m, "rate = 1000.0").replace(/^burst = .*$/m, "burst = 1000.0");
  writeFileSync(configPath, config);
  const server = spawn(SERVER_BIN, ["serve", "--config", configPath], { env: { ...ENV, ...env }, stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  server.stderr!.on("data", (d: Buffer) => (log += d.toString()));
  const started: Running = { dir, port, wsPort, process: server };
  try {
    const wait = spawnSync(SERVER_BIN, ["wait", "--config", configPath, "--timeout", "30"], { encoding: "utf-8", env: ENV });
    assert.equal(wait.status, 0, `${wait.stdout}${wait.stderr}\n${log}`);
  } catch (error) {
    await stopKeyServer(started);
    throw error;
  }
  if (wsPort !== null) {
    for (let i = 0; i < 100; i++) {
      const open = await new Promise<boolean>((resolve) => {
        const s = createServer();
        s.once("error", () => resolve(true)); // in use: the listener is up
        s.listen(wsPort!, "127.0.0.1", () => s.close(() => resolve(false)));
      });
      if (open) break;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return started;
}

async function stopKeyServer(server: Running): Promise<void> {
  if (server.process.exitCode === null && server.process.signalCode === null) {
    const exited = new Promise((resolve) => server.process.once("exit", resolve));
    server.process.kill("SIGTERM");
    await exited;
  }
  rmSync(server.dir, { recursive: true, force: true });
}

describe("end to end against a real keymgmt-server", { skip: MISSING !== null && !REQUIRED ? MISSING! : false }, () => {
  before(async () => {
    if (MISSING !== null) throw new Error(`KEYMGMT_REQUIRE_WEB=1 but ${MISSING}`);
    await ready;
    running = await startKeyServer();
  });

  after(async () => {
    if (running !== null) await stopKeyServer(running);
  });

  const transports: [string, () => Connector][] = [
    ["tls", () => tlsTo(running!.port, readFileSync(join(running!.dir, "ca.pem")))],
    ["wss", () => wssConnector(running!.wsPort!, readFileSync(join(running!.dir, "ca.pem")))],
  ];

  for (const [kind, connector] of transports) {
    describe(`over ${kind}`, () => {
      const skipWss = () => kind === "wss" && running?.wsPort === null;

      test("a secret stored with the Python CLI is read here, and the reverse", async (t) => {
        if (skipWss()) return t.skip("this keymgmt-server has no WebSocket listener");
        const name = `py-${kind}@example.org`;
        cli(["--account", name, "register"], "py password 1");
        const pyKey = cli(["--account", name, "--no-local-store", "generate"], "py password 1").split(/\s+/).pop()!;
        const pySecret = cli(["--account", name, "--no-local-store", "retrieve", pyKey], "py password 1");
        const client = new KeymgmtClient(connector(), { localStore: new MemoryStore() });
        const session = await client.login(name, "py password 1");
        assert.equal(toHex((await session.retrieve(fromHex(pyKey), Context.LOCAL_ONLY))!), pySecret);
        // stored here, with a label, read by the CLI
        const secret = Uint8Array.of(0xc0, 0xff, 0xee);
        const tsKey = await session.importSecret(Uint8Array.of(3, ...secret), "from typescript");
        assert.equal(cli(["--account", name, "--no-local-store", "retrieve", toHex(tsKey)], "py password 1"), "c0ffee");
        assert.match(cli(["--account", name, "list"], "py password 1"), /from typescript/);
        await session.logout();
        // an account registered here logs in with the Python CLI (same OPAQUE, same Argon2id)
        const own = `ts-${kind}@example.org`;
        await client.register(own, "ts password 2");
        const s2 = await client.login(own, "ts password 2");
        const k2 = await s2.generate();
        const exported = (await s2.export(k2))!;
        assert.equal(cli(["--account", own, "--no-local-store", "export", toHex(k2)], "ts password 2"), toHex(exported));
        await client.close();
      });

      test("a dropped connection resumes without a new login; the audit chain verifies", async (t) => {
        if (skipWss()) return t.skip("this keymgmt-server has no WebSocket listener");
        const name = `resume-${kind}@example.org`;
        const transports: Transport[] = [];
        const base = connector();
        const tracking: Connector = async () => {
          const transport = await base();
          transports.push(transport);
          return transport;
        };
        const client = new KeymgmtClient(tracking, { localStore: new MemoryStore(), reconnectDelayMs: 20 });
        await client.register(name, "pw resume");
        const session: KeySession = await client.login(name, "pw resume");
        const keyId = await session.generate();
        transports[transports.length - 1]!.close(); // the transport drops under the client
        await new Promise((r) => setTimeout(r, 50));
        assert.deepEqual((await session.listKeys()).map((k) => toHex(k.keyId)), [toHex(keyId)]);
        assert.ok(client.connectionCount >= 2);
        const verified = await session.verifyAudit();
        const logins = verified.entries.filter((e) => e.action === Action.LOGIN);
        assert.equal(logins.length, 1, "one login: the session was resumed, not opened again");
        assert.equal(verified.head?.position, BigInt(verified.entries.length));
        await session.logout();
        await client.close();
      });
    });
  }

  test("the TLS transport checks the key server's certificate: another name or another CA is refused", async () => {
    const ca = readFileSync(join(running!.dir, "ca.pem"));
    await tlsTo(running!.port, ca)().then((transport) => transport.close());
    await assert.rejects(tlsConnector("127.0.0.1", running!.port, { ca, serverName: "keys.example.org" })(), /keys\.example\.org/);
    // node's own list of CAs does not hold the key server's development CA
    await assert.rejects(tlsConnector("127.0.0.1", running!.port, { serverName: "localhost" })(), /self[- ]signed|unable to (get|verify)/i);
    const client = new KeymgmtClient(tlsConnector("127.0.0.1", running!.port, { ca, serverName: "keys.example.org" }), { localStore: new MemoryStore() });
    await assert.rejects(client.login("nobody@example.org", "irrelevant"), (error: Error) => error.name === "ConnectionLostError" && /cannot connect/.test(error.message));
    await client.close();
  });

  test("a session opened over TLS resumes over wss (one session registry)", async (t) => {
    if (running?.wsPort === null) return t.skip("this keymgmt-server has no WebSocket listener");
    const ca = readFileSync(join(running!.dir, "ca.pem"));
    const connectors = [tlsTo(running!.port, ca), wssConnector(running!.wsPort!, ca)];
    const opened: Transport[] = [];
    let calls = 0;
    const switching: Connector = async () => {
      const transport = await connectors[Math.min(calls++, 1)]!();
      opened.push(transport);
      return transport;
    };
    const client = new KeymgmtClient(switching, { localStore: new MemoryStore(), reconnectDelayMs: 20 });
    await client.register("switch@example.org", "pw switch");
    const session = await client.login("switch@example.org", "pw switch");
    const keyId = await session.generate();
    assert.equal(calls, 1);
    opened[0]!.close();
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual((await session.listKeys()).map((k) => toHex(k.keyId)), [toHex(keyId)]);
    assert.equal(calls, 2, "reconnected over wss");
    const logins = (await session.verifyAudit()).entries.filter((e) => e.action === Action.LOGIN);
    assert.equal(logins.length, 1);
    await session.logout();
    await client.close();
  });

  describe("accounts and named keys as the Python client says them (review of issue 16)", () => {
    const tls = () => tlsTo(running!.port, readFileSync(join(running!.dir, "ca.pem")));
    const revoked = (e: unknown) => e instanceof SessionEndedError && e.code === ErrorCode.NOT_AUTHORIZED && e.message === SESSION_REVOKED;

    test("gap 2: a session ended by a password change or a deletion elsewhere raises SessionEndedError: log in again", async () => {
      const name = "gap2-e2e@example.org";
      const owner = new KeymgmtClient(tls(), { localStore: new MemoryStore() });
      const device = new KeymgmtClient(tls(), { localStore: new MemoryStore() });
      await owner.register(name, "pw gap2 one");
      const other = await device.login(name, "pw gap2 one");
      const keyId = await other.generate();
      await owner.changePassword(name, "pw gap2 one", "pw gap2 two");
      await assert.rejects(other.listKeys(), revoked);
      await assert.rejects(other.delete(keyId), revoked);
      const fresh = await device.login(name, "pw gap2 two");
      assert.equal((await fresh.listKeys()).length, 1);
      await owner.deleteAccount(name, "pw gap2 two");
      await assert.rejects(fresh.listKeys(), revoked);
      await owner.close();
      await device.close();
    });

    test("gap 3: a stored label that is no sealed label is listed as <tampered>; the other keys as usual", async () => {
      const name = "gap3-e2e@example.org";
      const client = new KeymgmtClient(tls(), { localStore: new MemoryStore() });
      await client.register(name, "pw gap3");
      const session = await client.login(name, "pw gap3");
      const fine = await session.generate("fine");
      const cut = await session.generate("to be cut");
      // the key server's database altered: a label of a length no sealed label has
      const python = join(BIN, "python");
      const damage = spawnSync(
        python,
        ["-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); db.execute('UPDATE secrets SET label = ? WHERE key_id = ?', (b'cut', bytes.fromhex(sys.argv[2]))); db.commit()", join(running!.dir, "keyserver.db"), toHex(cut)],
        { encoding: "utf-8", env: ENV },
      );
      assert.equal(damage.status, 0, damage.stderr);
      const keys = await session.listKeys();
      assert.deepEqual(Object.fromEntries(keys.map((k) => [toHex(k.keyId), labelText(k)])), { [toHex(fine)]: "fine", [toHex(cut)]: "<tampered>" });
      assert.match(tamperedLabelsWarning(keys) ?? "", /^1 label\(s\) failed verification/);
      assert.deepEqual(await session.resolve("fine"), fine);
      await client.close();
    });

    test("gaps 5 and 6: the same password again, or removing a label a key lacks, sends nothing", async () => {
      const name = "gap56-e2e@example.org";
      const client = new KeymgmtClient(tls(), { localStore: new MemoryStore() });
      await client.register(name, "pw gap5");
      await assert.rejects(client.changePassword(name, "pw gap5", "pw gap5"), (e: unknown) => e instanceof KeymgmtError && e.message === "invalid argument: the new password is the current one");
      const session = await client.login(name, "pw gap5");
      const unnamed = await session.generate();
      const named = await session.generate("named");
      assert.equal(await session.rename(unnamed, null), false);
      assert.equal(await session.rename(named, null), true);
      const actions = (await session.verifyAudit()).entries.map((e) => e.action);
      assert.equal(actions.filter((a) => a === Action.LOGIN).length, 1, "the refused change did not log in");
      assert.equal(actions.filter((a) => a === Action.RENAME_KEY).length, 2, "the label of 'named' set and removed; nothing for the key without one");
      await client.close();
    });

    test("gap 4: a key server whose reauth window is shorter than a login: the change and the deletion say why", async () => {
      const strict = await startKeyServer({ KEYMGMT_REAUTH_WINDOW: "0.001" });
      try {
        const client = new KeymgmtClient(tlsTo(strict.port, readFileSync(join(strict.dir, "ca.pem"))), { localStore: new MemoryStore() });
        const name = "gap4-e2e@example.org";
        await client.register(name, "pw gap4");
        const notRecent = (e: unknown) => e instanceof RequestRefusedError && e.status === Status.INVALID && e.message === NOT_RECENT_LOGIN;
        await assert.rejects(client.changePassword(name, "pw gap4", "pw gap4 new"), notRecent);
        await assert.rejects(client.deleteAccount(name, "pw gap4"), notRecent);
        await (await client.login(name, "pw gap4")).logout(); // nothing changed
        await client.close();
      } finally {
        await stopKeyServer(strict);
      }
    });
  });
});
