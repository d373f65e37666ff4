"""The browser client's figures (issue 17, item 6): a login and a retrieve in headless Chromium
over wss, next to the Python client's over TLS, against one real key server.

The key server is ``keymgmt-server serve`` (SQLite, durable) with its WebSocket listener,
pinned to CPU 0 (scripts/web_demo.py starts it); Chromium (Debian's, driven by playwright)
and the Python client run in this process's CPU set. The page is the demo page's origin; the
measured code is the client bundle (web/build/keymgmt.js, imported by the page), timed in the
page with ``performance.now()`` so no driver round trip counts. Each run, in turn: the
browser, the Python client over TLS, the Python client over wss (a note: the same transport
as the browser, the other language). A run logs in once untimed (the connection opens), then
times one login (OPAQUE with Argon2id: WebAssembly in the page, opaque-ke-py's native code in
Python) and, after one untimed retrieve (it fetches the storage key), ``requests`` retrieves
one at a time (``LOCAL_ONLY``; the local store keeps no copy, so each is a round trip to the
key server, which reads SQLite and writes the audit entry).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from anyio.abc import ByteStream

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.client.connect import tls_connector, ws_connector
from keymgmt.adapters.client.localstore import LocalStore
from keymgmt.adapters.storage.base import SecretRecord
from keymgmt_proto import Context
from scripts.web_demo import (
    DemoPageServer,
    WebUnavailableError,
    build_web,
    chromium_args,
    find_chromium,
    key_server,
)

from .common import ACCOUNT, PASSWORD, spread

__all__ = ["BROWSER_RUN", "WebUnavailableError", "chromium_version", "measure", "summary"]

SERVER_CPU = 0

#: One run in the page: the bundle as a Service Provider serves it (/keymgmt.js), a client with
#: a local store that keeps nothing, an untimed login, a timed login, timed retrieves.
BROWSER_RUN = """async ({ url, account, password, keyId, requests }) => {
  const m = await import("/keymgmt.js");
  await m.opaqueReady;
  const keepsNothing = {
    get: async () => null, put: async () => {}, delete: async () => {}, deleteUser: async () => 0,
    keyIds: async () => [], auditHead: async () => null, putAuditHead: async () => {}, close() {},
  };
  const client = new m.KeymgmtClient(m.webSocketConnector(url), { localStore: keepsNothing });
  try {
    await (await client.login(account, password)).logout();
    let start = performance.now();
    const session = await client.login(account, password);
    const login = performance.now() - start;
    const id = m.fromHex(keyId);
    await session.retrieve(id, m.Context.LOCAL_ONLY); // untimed: fetches the storage key once
    start = performance.now();
    for (let i = 0; i < requests; i++) {
      if ((await session.retrieve(id, m.Context.LOCAL_ONLY)) === null) throw new Error("no secret");
    }
    const retrieve = (performance.now() - start) / requests;
    await session.logout();
    return { login_ms: login, retrieve_ms: retrieve };
  } finally {
    await client.close();
  }
}"""


class _KeepsNothing(LocalStore):
    """A local store that keeps no copy: every retrieve asks the key server."""

    def __init__(self) -> None:
        super().__init__(":memory:")

    def put(self, record: SecretRecord) -> None:
        pass


async def _python_run(stream: ByteStream, key_id: bytes, requests: int) -> dict[str, float]:
    async with KeymgmtClient(stream, local_store=_KeepsNothing()) as client:
        await (await client.login(ACCOUNT, PASSWORD)).logout()
        start = time.perf_counter()
        session = await client.login(ACCOUNT, PASSWORD)
        login = time.perf_counter() - start
        await session.retrieve(key_id, Context.LOCAL_ONLY)  # untimed: fetches the storage key once
        start = time.perf_counter()
        for _ in range(requests):
            assert await session.retrieve(key_id, Context.LOCAL_ONLY) is not None
        retrieve = (time.perf_counter() - start) / requests
        # Every retrieve was a round trip: no copy was kept by any path.
        assert client.local_store.get(session.user_id, key_id) is None
        await session.logout()
    return {"login_ms": login * 1e3, "retrieve_ms": retrieve * 1e3}


async def measure(directory: Path, runs: int, requests: int) -> dict[str, list[dict[str, float]]]:
    """``runs`` interleaved runs of the browser, the Python client over TLS and over wss.
    WebUnavailableError when node or Chromium is missing (playwright: ImportError)."""
    from playwright.async_api import async_playwright

    chromium = find_chromium()
    build_web()
    results: dict[str, list[dict[str, float]]] = {"browser": [], "python_tls": [], "python_wss": []}
    directory.mkdir(parents=True, exist_ok=True)
    with (
        DemoPageServer() as pages,
        key_server(directory / "server", [pages.origin], cpu=SERVER_CPU) as server,
    ):
        pages.wss_url = server.wss_url
        ca = str(server.ca)
        tls = tls_connector("127.0.0.1", server.port, cafile=ca, server_hostname="localhost")
        wss = ws_connector(
            "127.0.0.1", server.wss_port, origin=pages.origin, cafile=ca, server_hostname="localhost"
        )

        async with KeymgmtClient(await tls()) as client:
            await client.register(ACCOUNT, PASSWORD)
            session = await client.login(ACCOUNT, PASSWORD)
            key_id = await session.generate()
            await session.logout()
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(directory / "chromium-profile"),
                executable_path=chromium,
                headless=True,
                args=chromium_args(server.cert),
            )
            try:
                page = await context.new_page()
                await page.goto(pages.url)
                await page.wait_for_selector("body[data-state=ready]", timeout=60_000)
                arguments = {
                    "url": server.wss_url,
                    "account": ACCOUNT.decode(),
                    "password": PASSWORD.decode(),
                    "keyId": key_id.hex(),
                    "requests": requests,
                }
                for _ in range(runs):
                    results["browser"].append(await page.evaluate(BROWSER_RUN, arguments))
                    results["python_tls"].append(await _python_run(await tls(), key_id, requests))
                    results["python_wss"].append(await _python_run(await wss(), key_id, requests))
            finally:
                await context.close()
    return results


def summary(results: dict[str, list[dict[str, float]]], key: str) -> dict[str, tuple[float, float, float]]:
    """(median, lowest, highest) of ``key`` for each client."""
    return {client: spread([run[key] for run in runs]) for client, runs in results.items()}


def chromium_version() -> str:
    """Chromium's version line, for the notes."""
    done = subprocess.run(  # noqa: S603 - the local Chromium, a fixed flag
        [find_chromium(), "--version"], capture_output=True, text=True, timeout=30
    )
    return done.stdout.strip() or "Chromium (no version given)"
