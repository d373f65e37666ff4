"""The browser client in a real headless Chromium, end to end (issue 17, item 4).

The demo page (web/demo/, the esbuild bundle) is served from 127.0.0.1 by this test
(scripts/web_demo.py's page server); a real ``keymgmt-server`` subprocess (``init``, then
``serve`` with the [websocket] listener and the page's origin in
``websocket.allowed_origins``) answers it over wss; Debian's Chromium (never a downloaded
one) is driven headless through the ``playwright`` package. The page talks to the key
server through a TCP relay of this test, so the test can cut the WebSocket under it.

Trust: the key server's certificate comes from ``keymgmt-server init``'s development CA,
which no browser trusts. Chromium gets ``--ignore-certificate-errors-spki-list`` with the
SHA-256 of that one certificate's public key, in a fresh user data directory: this browser
accepts exactly that certificate for this run, and still refuses every other certificate
error. A blanket "ignore HTTPS errors" would also accept a wrong certificate, and adding
the CA to a trust store would outlive the test.

Without Chromium, node or playwright the tests are skipped with the reason;
KEYMGMT_REQUIRE_WEB=1 (CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keymgmt import SyncClient, tls_connector
from keymgmt_proto import Action
from scripts.web_demo import (
    DemoPageServer,
    KeyServer,
    WebUnavailableError,
    build_web,
    chromium_args,
    find_chromium,
    key_server,
)

from .test_readme import readme_blocks

REQUIRED = os.environ.get("KEYMGMT_REQUIRE_WEB") == "1"
CLIENT_CLI = [sys.executable, "-m", "keymgmt.adapters.cli.client"]
CLI_ACCOUNT, CLI_PASSWORD = "cli-user@example.org", "the CLI's password, long enough"
WEB_ACCOUNT, WEB_PASSWORD = "browser-user@example.org", "typed into the page, 2026"
#: The fields of a local_secrets row (web/src/store.ts): ids, kind, time, the sealed copy.
SECRET_ROW = {"user", "key", "userId", "keyId", "kind", "ciphertext", "associatedData", "created"}
#: How long one button may take (a login runs Argon2id in WebAssembly).
ACTION_TIMEOUT_MS = 30_000


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (KEYMGMT_REQUIRE_WEB=1 makes this a failure)")
    pytest.skip(reason)


# ------------------------------------------------------------------ a relay the test can cut


class Relay:
    """A TCP relay from 127.0.0.1:``port`` to the key server's wss port: TLS and the
    WebSocket run end to end through it; ``drop()`` cuts every connection at once, as a
    network does (no WebSocket close, no TLS close_notify: the peers see the TCP stream end)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self.accepted += 1
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def drop(self) -> int:
        """Cut every open connection; how many sockets were cut."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        return len(sockets)

    def close(self) -> None:
        self.listener.close()
        self.drop()


# ------------------------------------------------------------------ the page


class DemoPage:
    """The demo page's buttons: each action fills inputs, clicks, waits for
    body[data-state=ready] and returns (#status, #result)."""

    def __init__(self, page: Any) -> None:
        self.page = page

    def act(self, button: str, fields: dict[str, str] | None = None, select: dict[str, str] | None = None):
        for name, value in (fields or {}).items():
            self.page.fill(f"#{name}", value)
        for name, value in (select or {}).items():
            self.page.select_option(f"#{name}", value)
        self.page.click(f"#{button}")  # the handler marks the page busy before it returns
        self.page.wait_for_selector("body[data-state=ready]", timeout=ACTION_TIMEOUT_MS)
        return self.page.text_content("#status"), self.page.text_content("#result")

    def ok(
        self, button: str, fields: dict[str, str] | None = None, select: dict[str, str] | None = None
    ) -> str:
        status, result = self.act(button, fields, select)
        assert status.startswith("ok: "), f"{button}: {status}"
        return result


#: Every row of every object store of every IndexedDB database of the page's origin, byte
#: strings as {"hex": ...}.
DUMP_INDEXEDDB = """async () => {
  const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  const plain = (v) => {
    if (v instanceof ArrayBuffer) return { hex: hex(new Uint8Array(v)) };
    if (ArrayBuffer.isView(v)) return { hex: hex(new Uint8Array(v.buffer, v.byteOffset, v.byteLength)) };
    if (Array.isArray(v)) return v.map(plain);
    if (typeof v === "bigint") return v.toString();
    if (v !== null && typeof v === "object") {
      return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
    }
    return v;
  };
  const done = (request) => new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  const out = [];
  for (const { name } of await indexedDB.databases()) {
    const db = await done(indexedDB.open(name));
    for (const store of db.objectStoreNames) {
      const rows = await done(db.transaction(store, "readonly").objectStore(store).getAll());
      out.push({ database: name, store, rows: rows.map(plain) });
    }
    db.close();
  }
  return out;
}"""

#: An inline script and an inline event handler added to the page: its CSP must refuse both.
INJECT_INLINE = """() => {
  window.__cspViolations = [];
  document.addEventListener("securitypolicyviolation", (e) =>
    window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI));
  const script = document.createElement("script");
  script.textContent = "window.__inlineRan = true;";
  document.head.appendChild(script);
  const img = document.createElement("img");
  img.setAttribute("onerror", "window.__handlerRan = true;");
  img.src = "data:,x";
  document.body.appendChild(img);
}"""


@dataclass
class World:
    server: KeyServer
    pages: DemoPageServer
    relay: Relay
    context: Any
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    try:
        chromium = find_chromium()
        build_web()
    except WebUnavailableError as exc:
        _unavailable(f"{exc}: the headless-Chromium test did not run")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[dev]')")
    tmp = tmp_path_factory.mktemp("browser")
    with DemoPageServer() as pages, key_server(tmp / "server", [pages.origin]) as server:
        relay = Relay(server.wss_port)
        pages.wss_url = f"wss://127.0.0.1:{relay.port}/keymgmt"
        try:
            with sync_playwright() as playwright:
                context = playwright.chromium.launch_persistent_context(
                    str(tmp / "chromium-profile"),  # fresh: the SPKI pin needs a profile of its own
                    executable_path=chromium,
                    headless=True,
                    args=chromium_args(server.cert),
                )
                try:
                    yield World(server, pages, relay, context, tmp)
                finally:
                    context.close()
        finally:
            relay.close()


def cli(world: World, account: str, password: str, *args: str) -> str:
    """``keymgmt`` as a subprocess over TLS (its own listener), no local cache: every read
    reaches the key server. The password comes from a file, never from argv."""
    password_file = world.tmp / f"{account}.password"
    if not password_file.exists():
        os.close(os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        password_file.write_text(password + "\n")
    done = subprocess.run(
        [
            *CLIENT_CLI,
            "--server",
            f"127.0.0.1:{world.server.port}",
            "--ca",
            str(world.server.ca),
            "--server-name",
            "localhost",
            "--account",
            account,
            "--password-file",
            str(password_file),
            "--no-local-store",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"keymgmt {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def server_rows(server: KeyServer, sql: str, *params: object) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{server.directory / 'keyserver.db'}?mode=ro", uri=True)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def open_page(world: World) -> DemoPage:
    page = world.context.new_page()
    page.goto(world.pages.url)
    page.wait_for_selector("body[data-state=ready]", timeout=ACTION_TIMEOUT_MS)
    return DemoPage(page)


def test_the_demo_page_in_chromium_against_a_real_key_server(world: World) -> None:
    """Register, log in, generate, import, retrieve, list, audit, delete, log out in the
    page; interop both ways with the keymgmt CLI; a dropped WebSocket resumes without a new
    login; IndexedDB holds the key server's ciphertexts and audit head and nothing else."""
    # An account and a secret made with the Python CLI ...
    cli_secret = os.urandom(40)
    secret_file = world.tmp / "cli-secret.bin"
    secret_file.write_bytes(cli_secret)
    cli(world, CLI_ACCOUNT, CLI_PASSWORD, "register")
    imported_by_cli = cli(
        world, CLI_ACCOUNT, CLI_PASSWORD, "import", "--file", str(secret_file), "--label", "from the CLI"
    )
    cli_key = imported_by_cli.split()[-1]

    demo = open_page(world)
    # ... are read in the browser, label included.
    demo.ok("login", {"account": CLI_ACCOUNT, "password": CLI_PASSWORD})
    assert demo.ok("retrieve", {"key-id": cli_key}, {"context": "LOCAL_ONLY"}) == cli_secret.hex()
    assert demo.ok("list") == f"{cli_key} imported from the CLI"
    demo.ok("logout")

    # The browser's own account: every button.
    user_id = demo.ok("register", {"account": WEB_ACCOUNT, "password": WEB_PASSWORD})
    assert re.fullmatch(r"[0-9a-f]{32}", user_id)
    assert demo.ok("login", {"account": WEB_ACCOUNT, "password": WEB_PASSWORD}) == user_id
    assert demo.page.input_value("#password") == ""  # the page forgets the password at once
    generated = demo.ok("generate", {"label": "made in the browser"})
    generated_secret = demo.ok("retrieve", {"key-id": generated}, {"context": "LOCAL_ONLY"})
    assert re.fullmatch(r"[0-9a-f]{64}", generated_secret)
    imported_secret = os.urandom(24)
    imported = demo.ok("import", {"label": "imported in the browser", "import-secret": imported_secret.hex()})
    assert demo.ok("retrieve", {"key-id": imported}, {"context": "LOCAL_ONLY"}) == imported_secret.hex()
    assert demo.ok("retrieve", {"key-id": imported}, {"context": "EXPORT"}) == "18" + imported_secret.hex()
    assert sorted(demo.ok("list").splitlines()) == sorted(
        [f"{generated} generated made in the browser", f"{imported} imported imported in the browser"]
    )

    # The WebSocket drops under the page (cut at the relay): the next request reconnects and
    # the session resumes without a login (the page no longer holds the password).
    connections = world.relay.accepted
    assert world.relay.drop() >= 2
    assert len(demo.ok("list").splitlines()) == 2
    assert world.relay.accepted > connections, "the client opened a new WebSocket"
    audit = json.loads(demo.ok("audit", select={"audit-type": "ALL"}))
    actions = [entry["action"] for entry in audit["entries"]]
    assert actions.count("login") == 1, f"a second login in the key server's audit: {actions}"
    key_audit = json.loads(demo.ok("audit", {"audit-key": imported}, {"audit-type": "KEY_ONLY"}))
    assert {entry["key_id"] for entry in key_audit["entries"]} == {imported}
    assert demo.ok("verify-audit").startswith("head ")

    # A secret stored in the browser is read by `keymgmt retrieve`.
    assert cli(world, WEB_ACCOUNT, WEB_PASSWORD, "retrieve", imported) == imported_secret.hex()
    assert cli(world, WEB_ACCOUNT, WEB_PASSWORD, "retrieve", generated) == generated_secret

    demo.ok("delete", {"key-id": generated})
    assert demo.ok("list") == f"{imported} imported imported in the browser"
    assert demo.ok("verify-audit").startswith("head ")

    # IndexedDB: the key server's own ciphertexts and the verified audit head, nothing else.
    dump = demo.page.evaluate(DUMP_INDEXEDDB)
    with SyncClient(tls_connector("127.0.0.1", world.server.port, cafile=str(world.server.ca))) as client:
        session = client.login(WEB_ACCOUNT.encode(), WEB_PASSWORD.encode())
        # test-only: the keys this account's browser session held in memory
        export_key: bytes = session._session._ops._export_key
        storage_key: bytes = session._portal.call(session._session._get_storage_key)
        session.logout()
    forbidden = {
        "password": WEB_PASSWORD.encode(),
        "the CLI's password": CLI_PASSWORD.encode(),
        "generated secret": bytes.fromhex(generated_secret),
        "imported secret": imported_secret,
        "the CLI's secret": cli_secret,
        "export_key": export_key,
        "storage_key": storage_key,
    }
    text = json.dumps(dump)
    for name, value in forbidden.items():
        assert value.hex() not in text and value.decode("latin-1") not in text, f"{name} in IndexedDB"
    stores = {(d["database"], d["store"]): d["rows"] for d in dump}
    assert set(stores) == {("keymgmt-demo", "local_secrets"), ("keymgmt-demo", "audit_heads")}
    secrets = stores[("keymgmt-demo", "local_secrets")]
    assert {row["key"] for row in secrets} == {cli_key, imported}  # the deleted key's copy is gone
    for row in secrets:
        assert set(row) == SECRET_ROW
        on_server = server_rows(
            world.server,
            "SELECT ciphertext, associated_data FROM secrets WHERE key_id = ?",
            bytes.fromhex(row["key"]),
        )
        assert [(row["ciphertext"]["hex"], row["associatedData"]["hex"])] == [
            (c.hex(), ad.hex()) for c, ad in on_server
        ]
    for head in stores[("keymgmt-demo", "audit_heads")]:
        assert set(head) == {"user", "position", "hash"}
        assert server_rows(
            world.server,
            "SELECT chain_hash FROM audit WHERE user_id = ? AND seq = ?",
            bytes.fromhex(head["user"]),
            int(head["position"]),
        ) == [(bytes.fromhex(head["hash"]["hex"]),)]

    demo.ok("logout")
    status, _ = demo.act("list")
    assert status == "error: Error: log in first"
    demo.page.close()


#: The browser client's texts (web/src/client.ts), the Python client's words (review of issue 16).
SESSION_REVOKED = (
    "session ended: the account's password was changed after this session logged in, "
    "or the account was deleted; log in again"
)


def test_the_demo_page_says_what_the_python_client_says_about_accounts_and_labels(world: World) -> None:
    """Review of issue 16 in the page (gaps 2, 3, 5, 6): removing a label a key lacks says so;
    a label altered in the key server's database lists as <tampered> with the warning; the same
    password again is refused; a password change, then a deletion, end the page's session with
    the SessionEndedError text. Each message is what #status shows."""
    account, password, new_password = "issue16@example.org", "page password, 2026", "page password, 2027"
    demo = open_page(world)
    user_id = demo.ok("register", {"account": account, "password": password})
    demo.ok("login", {"account": account, "password": password})
    unnamed = demo.ok("generate", {"label": ""})
    named = demo.ok("generate", {"label": "named in the page"})

    # gap 6: removing the label of a key that has none sends nothing and says so
    def renames() -> list[tuple[Any, ...]]:
        sql = "SELECT count(*) FROM audit WHERE user_id = ? AND action = ?"
        return server_rows(world.server, sql, bytes.fromhex(user_id), int(Action.RENAME_KEY))

    before = renames()
    status, _ = demo.act("rename", {"key-id": unnamed, "label": ""})
    assert status == f"ok: {unnamed} has no label; nothing removed"
    assert renames() == before
    assert demo.act("rename", {"key-id": named, "label": ""})[0] == f"ok: removed the label of {named}"
    assert demo.act("rename", {"key-id": named, "label": "again"})[0] == f"ok: labelled {named} 'again'"

    # gap 3: a label column altered on the key server lists as <tampered>, the other key as usual
    db = sqlite3.connect(world.server.directory / "keyserver.db")
    try:
        with db:
            db.execute("UPDATE secrets SET label = ? WHERE key_id = ?", (b"cut", bytes.fromhex(named)))
    finally:
        db.close()
    status, result = demo.act("list")
    assert status == (
        "ok: 2 keys; warning: 1 label(s) failed verification (altered on the key server, or moved "
        "from another key); those keys are listed by id only"
    )
    assert sorted(result.splitlines()) == sorted([f"{unnamed} generated", f"{named} generated <tampered>"])

    # gap 5: the same password again is refused before anything is sent
    same = {"account": account, "password": password, "new-password": password}
    status, _ = demo.act("change-password", same)
    assert status == "error: KeymgmtError: invalid argument: the new password is the current one"

    # gap 2: a change (a fresh login of its own) ends the page's session; so does a deletion
    change = {"account": account, "password": password, "new-password": new_password}
    status, _ = demo.act("change-password", change)
    assert status == f"ok: changed the password of {account}; its other sessions ended"
    assert demo.act("list")[0] == f"error: SessionEndedError: {SESSION_REVOKED}"
    demo.ok("login", {"account": account, "password": new_password})
    assert demo.act("delete-account", {"account": account, "password": new_password})[0] == (
        "error: Error: tick the box to confirm the deletion first"
    )
    demo.page.check("#confirm-delete")
    status, _ = demo.act("delete-account", {"account": account, "password": new_password})
    assert status == f"ok: deleted the account {account} and every secret in it"
    assert demo.act("list")[0] == f"error: SessionEndedError: {SESSION_REVOKED}"
    left = server_rows(world.server, "SELECT count(*) FROM secrets WHERE user_id = ?", bytes.fromhex(user_id))
    assert left == [(0,)]
    demo.page.close()


def test_the_page_csp_refuses_injected_inline_script(world: World) -> None:
    """The page's Content-Security-Policy is in force: an inline script and an inline event
    handler injected into the DOM do not run, and Chromium reports both violations."""
    demo = open_page(world)
    console: list[str] = []
    demo.page.on("console", lambda message: console.append(message.text))
    demo.page.evaluate(INJECT_INLINE)
    demo.page.wait_for_timeout(300)
    assert demo.page.evaluate("() => [window.__inlineRan, window.__handlerRan]") == [None, None]
    violations = demo.page.evaluate("() => window.__cspViolations")
    assert sum(v.startswith("script-src") for v in violations) == 2, violations
    assert any("Content Security Policy" in line for line in console), console
    # the page's own script (from its origin) runs: it answers a button
    assert demo.act("list")[0] == "error: Error: log in first"
    demo.page.close()


def test_a_page_of_an_origin_not_allowed_cannot_reach_the_key_server(world: World) -> None:
    """The same page loaded from another origin (http://localhost:PORT instead of
    http://127.0.0.1:PORT) is refused by the key server's Origin check: the cross-site
    WebSocket hijacking case, in a real browser."""
    page = world.context.new_page()
    page.goto(world.pages.url.replace("127.0.0.1", "localhost"))
    page.wait_for_selector("body[data-state=ready]", timeout=ACTION_TIMEOUT_MS)
    demo = DemoPage(page)
    refused_before = world.server.log_text().count("is not allowed")
    status, _ = demo.act("login", {"account": CLI_ACCOUNT, "password": CLI_PASSWORD})
    assert status.startswith("error: "), status
    assert world.server.log_text().count("is not allowed") > refused_before
    page.close()


#: The README's example of a Service Provider's page (*Browser client*, "Embedding it").
README_EMBEDDING = 'from "./keymgmt.js"'


def test_the_readme_embedding_example_runs_as_written_in_a_page(world: World) -> None:
    """The README's JavaScript for a Service Provider's page, run in Chromium in a page of
    an allowed origin whose CSP is the one the README asks for: the bundle served as
    /keymgmt.js beside the page, the example's own lines (its static import made the
    dynamic import a page script may do, its key server URL this test's). It logs in to its
    account, which the CLI registered, generates, retrieves and logs out; `keymgmt retrieve` reads
    the same secret, and the example's IndexedDB store holds its ciphertext only."""
    (block,) = [b for b in readme_blocks() if README_EMBEDDING in b.text]
    example = block.text
    names = re.fullmatch(r'import \{ ([\w, ]+) \} from "\./keymgmt\.js";', example.splitlines()[0])
    assert names, f"README.md line {block.line}: the example no longer starts with its import"
    readme_url = re.search(r'webSocketConnector\("(wss://[^"]+)"\)', example)
    assert readme_url, f"README.md line {block.line}: no webSocketConnector(URL) in the example"
    body = "\n".join(
        [
            f'const {{ {names.group(1)} }} = await import("/keymgmt.js");',
            *example.replace(readme_url.group(1), world.pages.wss_url).splitlines()[1:],
            "return [toHex(keyId), toHex(secret)];",
        ]
    )
    login = re.search(r'client\.login\("([^"]+)", password\)', example)
    assert login, f"README.md line {block.line}: no client.login(NAME, password) in the example"
    account, password = login.group(1), "the embedding example's password"
    cli(world, account, password, "register")
    page = world.context.new_page()
    page.goto(world.pages.url)
    page.wait_for_selector("body[data-state=ready]", timeout=ACTION_TIMEOUT_MS)
    csp = page.get_attribute('meta[http-equiv="Content-Security-Policy"]', "content")
    assert "script-src 'self' 'wasm-unsafe-eval'" in csp and "'unsafe-eval'" not in csp.replace("'wasm-", "")
    try:
        key_id, secret = page.evaluate(
            "async (password) => {\n"
            "  const toHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');\n"
            f"{body}\n}}",
            password,
        )
        assert re.fullmatch(r"[0-9a-f]{64}", secret), secret
        assert cli(world, account, password, "retrieve", key_id) == secret
        databases = {d["database"]: d for d in page.evaluate(DUMP_INDEXEDDB) if d["store"] == "local_secrets"}
        (row,) = databases["keymgmt"]["rows"]
        assert row["key"] == key_id and secret not in json.dumps(row)
    finally:
        page.evaluate(
            "() => new Promise((done) => { indexedDB.deleteDatabase('keymgmt').onsuccess = done; })"
        )
        page.close()


def test_no_page_of_another_site_can_frame_the_demo_page(world: World) -> None:
    """Clickjacking: the page's header CSP says frame-ancestors 'none' (a <meta> CSP cannot),
    so Chromium refuses to show it in another page's frame; the same URL loads on its own."""
    page = world.context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.set_content(f'<iframe id="victim" src="{world.pages.url}"></iframe>')
    page.wait_for_load_state("load")
    frames = [f for f in page.frames if f is not page.main_frame]
    assert len(frames) == 1
    # Chromium shows its error page in the frame instead (chrome-error://chromewebdata/)
    assert frames[0].url != world.pages.url and frames[0].query_selector("body[data-state]") is None
    assert any("frame-ancestors" in line for line in console), console
    page.close()
    on_its_own = open_page(world)
    assert on_its_own.page.get_attribute("body", "data-state") == "ready"
    on_its_own.page.close()
