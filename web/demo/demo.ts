/** The demo page's script: every button drives one KeymgmtClient call; #status says "ok: ..."
 * or "error: <ErrorName>: ..." (the client's own one-line texts, as the keymgmt CLI prints them)
 * and #result holds the result; body[data-state] is "ready", "busy" or "loading" (for a test
 * driving the page). Nothing but ciphertexts is stored. */

import {
  AuditType,
  Context,
  IndexedDbStore,
  KeymgmtClient,
  auditToJson,
  encodePortable,
  fromHex,
  labelText,
  opaqueReady,
  tamperedLabelsWarning,
  toHex,
  webSocketConnector,
  type KeySession,
} from "../src/index.js";

const $ = <T extends HTMLElement>(id: string): T => {
  const element = document.getElementById(id);
  if (!element) throw new Error(`no #${id}`);
  return element as T;
};
const value = (id: string): string => $<HTMLInputElement>(id).value.trim();

let client: KeymgmtClient | null = null;
let clientUrl = "";
let session: KeySession | null = null;
let store: IndexedDbStore | null = null;

function show(ok: boolean, status: string, result = ""): void {
  const element = $("status");
  element.textContent = `${ok ? "ok" : "error"}: ${status}`;
  element.className = ok ? "ok" : "error";
  $("result").textContent = result;
}

async function getClient(): Promise<KeymgmtClient> {
  const url = value("server-url");
  if (client === null || url !== clientUrl) {
    await client?.close();
    store ??= await IndexedDbStore.open("keymgmt-demo");
    client = new KeymgmtClient(webSocketConnector(url), { localStore: store });
    clientUrl = url;
    session = null;
  }
  return client;
}

function needSession(): KeySession {
  if (session === null) throw new Error("log in first");
  return session;
}

function keyIdInput(id: string): Uint8Array {
  const text = value(id);
  if (!/^[0-9a-fA-F]{32}$/.test(text)) throw new Error("a key id is 32 hex digits");
  return fromHex(text);
}

const actions: Record<string, () => Promise<[string, string?]>> = {
  register: async () => {
    const userId = await (await getClient()).register(value("account"), $<HTMLInputElement>("password").value);
    return ["registered", toHex(userId)];
  },
  login: async () => {
    session = await (await getClient()).login(value("account"), $<HTMLInputElement>("password").value);
    $<HTMLInputElement>("password").value = "";
    return ["logged in", toHex(session.userId)];
  },
  logout: async () => {
    await needSession().logout();
    session = null;
    return ["logged out"];
  },
  generate: async () => {
    const keyId = await needSession().generate(value("label") || null);
    $<HTMLInputElement>("key-id").value = toHex(keyId);
    return ["generated", toHex(keyId)];
  },
  import: async () => {
    const keyId = await needSession().importSecret(encodePortable(fromHex(value("import-secret"))), value("label") || null);
    $<HTMLInputElement>("import-secret").value = "";
    $<HTMLInputElement>("key-id").value = toHex(keyId);
    return ["imported", toHex(keyId)];
  },
  retrieve: async () => {
    const context = Context[$<HTMLSelectElement>("context").value as keyof typeof Context];
    const result = await needSession().retrieve(keyIdInput("key-id"), context);
    return ["retrieved", result === null ? "" : toHex(result)];
  },
  delete: async () => {
    await needSession().delete(keyIdInput("key-id"));
    return ["deleted", value("key-id")];
  },
  list: async () => {
    const keys = await needSession().listKeys();
    const lines = keys.map((k) => `${toHex(k.keyId)} ${k.kind === 1 ? "generated" : "imported"} ${labelText(k)}`.trim());
    const warning = tamperedLabelsWarning(keys);
    return [`${keys.length} keys${warning === null ? "" : `; warning: ${warning}`}`, lines.join("\n")];
  },
  rename: async () => {
    const keyId = keyIdInput("key-id");
    const label = value("label") || null;
    const hadLabel = await needSession().rename(keyId, label);
    if (label !== null) return [`labelled ${toHex(keyId)} '${label}'`];
    return [hadLabel ? `removed the label of ${toHex(keyId)}` : `${toHex(keyId)} has no label; nothing removed`];
  },
  "change-password": async () => {
    const account = value("account");
    await (await getClient()).changePassword(account, $<HTMLInputElement>("password").value, $<HTMLInputElement>("new-password").value);
    $<HTMLInputElement>("password").value = "";
    $<HTMLInputElement>("new-password").value = "";
    return [`changed the password of ${account}; its other sessions ended`];
  },
  "delete-account": async () => {
    if (!$<HTMLInputElement>("confirm-delete").checked) throw new Error("tick the box to confirm the deletion first");
    const account = value("account");
    await (await getClient()).deleteAccount(account, $<HTMLInputElement>("password").value);
    $<HTMLInputElement>("password").value = "";
    $<HTMLInputElement>("confirm-delete").checked = false;
    return [`deleted the account ${account} and every secret in it`];
  },
  audit: async () => {
    const s = needSession();
    const type = AuditType[$<HTMLSelectElement>("audit-type").value as keyof typeof AuditType];
    const entries = await s.audit(type, value("audit-key") ? [keyIdInput("audit-key")] : []);
    return [`${entries.length} entries`, auditToJson(entries, s.userId)];
  },
  "verify-audit": async () => {
    const s = needSession();
    const verified = await s.verifyAudit();
    return [`audit log verified: ${verified.entries.length} entries`, verified.head ? `head ${verified.head.position} ${toHex(verified.head.hash)}` : "empty"];
  },
};

async function run(name: string): Promise<void> {
  if (document.body.dataset.state === "busy") return;
  document.body.dataset.state = "busy";
  try {
    const [status, result] = await actions[name]!();
    show(true, status, result ?? "");
  } catch (error) {
    const e = error as Error;
    show(false, `${e.name}: ${e.message}`);
  } finally {
    document.body.dataset.state = "ready";
  }
}

async function main(): Promise<void> {
  const configured = document.querySelector<HTMLMetaElement>('meta[name="keymgmt-server"]')?.content ?? "";
  $<HTMLInputElement>("server-url").value = configured;
  for (const name of Object.keys(actions)) $(name).addEventListener("click", () => void run(name));
  await opaqueReady;
  show(true, "ready");
  document.body.dataset.state = "ready";
}

void main().catch((error: Error) => show(false, `${error.name}: ${error.message}`));
