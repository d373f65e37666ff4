/** A command line around the TypeScript client (src/client.ts, the browser client itself) for
 * node, so that keymgmt's client conformance mode can run it like the ``keymgmt`` CLI:
 *
 *     python -m keymgmt.adapters.conformance client --client-cmd \
 *       'node web/build/conformance-client.mjs --server {address} --ca {ca} --account {account} --password-file {password_file} generate --retrieve'
 *
 * The shim is a TCP one: node has raw TLS sockets, so the client's frames go over TLS 1.3
 * (src/tls.ts) straight to the scripted server's TLS port, the same byte stream a browser's
 * wss carries inside WebSocket messages. There is no local store (as ``keymgmt
 * --no-local-store``): every retrieve asks the key server.
 *
 * Commands: ``logout`` (log in and out), ``generate`` (a new key; prints its id), ``generate
 * --retrieve`` (then fetch it back from the key server, LOCAL_ONLY, and print its length, never
 * the secret). The password is the first line of --password-file, never an argument. Exit
 * status as the ``keymgmt`` CLI's: 0 ok, 1 error (integrity among them), 2 usage, 3 login
 * failed, 4 no such key, 5 refused, 6 cannot reach the server, 7 session ended; 70 an
 * unexpected error (a bug, not a refusal). An operation that can no longer settle (nothing left
 * to wait for) is reported and left hanging, so that the harness sees the hang it is. */

import { readFileSync } from "node:fs";
import {
  AuthenticationError,
  ConnectionLostError,
  KeymgmtClient,
  KeymgmtError,
  NotFoundError,
  RegistrationError,
  RequestRefusedError,
  SessionEndedError,
  ThrottledError,
} from "../src/client.js";
import { toHex } from "../src/core/bytes.js";
import { Context } from "../src/core/constants.js";
import type { AuditHead } from "../src/core/ops.js";
import type { LocalStore, SecretRecord } from "../src/store.js";
import { tlsConnector } from "../src/tls.js";

const PROG = "keymgmt-web";
const USAGE = `usage: ${PROG} --server HOST:PORT --ca CA.pem --account NAME --password-file FILE [--server-name NAME] (logout | generate [--retrieve])`;

class UsageError extends Error {}

/** A local store that keeps nothing: every retrieve goes to the key server. */
class NoStore implements LocalStore {
  async get(): Promise<SecretRecord | null> {
    return null;
  }
  async put(): Promise<void> {}
  async delete(): Promise<void> {}
  async deleteUser(): Promise<number> {
    return 0;
  }
  async keyIds(): Promise<Uint8Array[]> {
    return [];
  }
  async auditHead(): Promise<AuditHead | null> {
    return null;
  }
  async putAuditHead(): Promise<void> {}
  close(): void {}
}

interface Args {
  host: string;
  port: number;
  ca: string;
  serverName: string | undefined;
  account: string;
  passwordFile: string;
  command: "logout" | "generate";
  retrieve: boolean;
}

function parse(argv: string[]): Args {
  const options = new Map<string, string>();
  const positional: string[] = [];
  let retrieve = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "--retrieve") retrieve = true;
    else if (["--server", "--ca", "--account", "--password-file", "--server-name"].includes(arg)) {
      const value = argv[++i];
      if (value === undefined) throw new UsageError(`${arg} needs a value`);
      options.set(arg, value);
    } else if (arg.startsWith("-")) throw new UsageError(`unknown option ${arg}`);
    else positional.push(arg);
  }
  for (const name of ["--server", "--ca", "--account", "--password-file"]) {
    if (!options.has(name)) throw new UsageError(`${name} is required`);
  }
  const server = /^(.+):([0-9]{1,5})$/.exec(options.get("--server")!);
  if (!server) throw new UsageError("--server is HOST:PORT");
  const [command, ...rest] = positional;
  if ((command !== "logout" && command !== "generate") || rest.length > 0) throw new UsageError("the command is logout or generate");
  if (retrieve && command !== "generate") throw new UsageError("--retrieve goes with generate");
  return {
    host: server[1]!.replace(/^\[(.*)\]$/, "$1"),
    port: Number(server[2]),
    ca: options.get("--ca")!,
    serverName: options.get("--server-name"),
    account: options.get("--account")!,
    passwordFile: options.get("--password-file")!,
    command,
    retrieve,
  };
}

function readFile(path: string, what: string): string {
  try {
    return readFileSync(path, "utf-8");
  } catch (error) {
    throw new UsageError(`cannot read the ${what} ${path}: ${(error as NodeJS.ErrnoException).code ?? "error"}`);
  }
}

/** The CLI's exit status for an error. */
function exitCode(error: unknown): number {
  if (error instanceof UsageError) return 2;
  if (error instanceof AuthenticationError || error instanceof ThrottledError) return 3;
  if (error instanceof NotFoundError) return 4;
  if (error instanceof RequestRefusedError || error instanceof RegistrationError) return 5;
  if (error instanceof ConnectionLostError) return 6;
  if (error instanceof SessionEndedError) return 7;
  if (error instanceof KeymgmtError) return 1; // IntegrityError among them
  return 70;
}

async function run(args: Args): Promise<void> {
  const password = readFile(args.passwordFile, "password file").split(/\r?\n/, 1)[0]!;
  if (!password) throw new UsageError("the password file's first line is empty");
  const ca = readFile(args.ca, "CA file");
  const connector = tlsConnector(args.host, args.port, { ca, serverName: args.serverName });
  const client = new KeymgmtClient(connector, { localStore: new NoStore(), reconnectAttempts: 2 });
  try {
    const session = await client.login(args.account, password);
    if (args.command === "generate") {
      const keyId = await session.generate();
      process.stdout.write(`${toHex(keyId)}\n`);
      if (args.retrieve) {
        const secret = await session.retrieve(keyId, Context.LOCAL_ONLY);
        process.stdout.write(`retrieved ${secret?.length ?? 0} bytes from the key server\n`);
      }
    }
    await session.logout();
  } finally {
    await client.close();
  }
}

async function main(): Promise<number> {
  let args: Args;
  try {
    args = parse(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`${USAGE}\n${PROG}: error: ${(error as Error).message}\n`);
    return 2;
  }
  let settled = false;
  process.on("beforeExit", () => {
    if (settled) return;
    process.stderr.write(`${PROG}: error: the client's operation can no longer settle (nothing left to wait for): it hangs\n`);
    setInterval(() => undefined, 60_000);
  });
  try {
    await run(args);
    return 0;
  } catch (error) {
    const code = exitCode(error);
    const message = error instanceof Error ? error.message : String(error);
    const prefix = code === 70 ? `unexpected ${error instanceof Error ? error.name : typeof error}: ` : "";
    process.stderr.write(`${PROG}: error: ${prefix}${message.split(/\s+/).join(" ")}\n`);
    return code;
  } finally {
    settled = true;
  }
}

process.exit(await main());
