"""``make demo-web`` (scripts/web_demo.py): it starts a key server with the WebSocket listener,
serves the demo page with that server's wss origin in its Content-Security-Policy, prints the
URL and how to trust the development CA, and stops both on SIGTERM. The page itself runs in a
real Chromium in tests/system/test_browser.py (the same page server and key server code).

Without node (which builds web/) the test is skipped with the reason; KEYMGMT_REQUIRE_WEB=1
makes that a failure."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest

from keymgmt import Client, ws_connector
from keymgmt.adapters.client import WebSocketConnectError
from scripts.web_demo import ROOT, WebUnavailableError, build_web

REQUIRED = os.environ.get("KEYMGMT_REQUIRE_WEB") == "1"


def _built() -> None:
    """web/ bundled, else a skip with the reason (a failure with KEYMGMT_REQUIRE_WEB=1)."""
    try:
        build_web()
    except WebUnavailableError as exc:
        if REQUIRED:
            pytest.fail(f"{exc} (KEYMGMT_REQUIRE_WEB=1 makes this a failure)")
        pytest.skip(f"{exc}: make demo-web was not tried")


def test_make_demo_web_runs_the_module() -> None:
    venv = Path(sys.prefix)
    dry = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-n",
            "-o",
            str(venv / ".installed-stamp"),
            "demo-web",
            f"VENV={venv}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        # under `make test` the parent make's MAKEFLAGS would add "Entering directory" lines
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},
    )
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == f"{venv}/bin/python -m scripts.web_demo"


def test_demo_web_serves_the_page_and_a_key_server_for_it(tmp_path: Path) -> None:
    _built()
    args = [
        "--dir",
        str(tmp_path / "demo"),
        "--page-port",
        "0",
        "--port",
        "0",
        "--wss-port",
        "0",
        "--no-build",
    ]
    demo = subprocess.Popen(
        [sys.executable, "-m", "scripts.web_demo", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    banner = threading.Event()

    def read() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                banner.set()
        banner.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert banner.wait(60), "".join(lines)
        out = "".join(lines)
        page = re.search(r"keymgmt demo page: (http://127\.0\.0\.1:\d+)/", out)
        wss = re.search(r"key server: wss://127\.0\.0\.1:(\d+)/keymgmt", out)
        assert page and wss, out
        origin, wss_port = page.group(1), int(wss.group(1))
        ca = tmp_path / "demo" / "ca.pem"
        assert f"Import {ca}" in out and "--ignore-certificate-errors-spki-list=" in out

        # The page names this key server, in its CSP and as its default.
        with urllib.request.urlopen(origin + "/", timeout=10) as response:
            html = response.read().decode()
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
        assert csp and f"connect-src wss://127.0.0.1:{wss_port};" in csp.group(1), html[:800]
        assert "script-src 'self' 'wasm-unsafe-eval'" in csp.group(1)
        assert f'<meta name="keymgmt-server" content="wss://127.0.0.1:{wss_port}/keymgmt">' in html
        with urllib.request.urlopen(origin + "/dist/demo.js", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/javascript")
        for outside in ("/../node_modules/ws/index.js", "/../../pyproject.toml", "/demo.ts"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(origin + outside, timeout=10)
            assert refused.value.code == 404

        # The key server takes a WebSocket from the page's origin (and only from it).
        async def login_over_wss(from_origin: str) -> bytes:
            connect = ws_connector(
                "127.0.0.1", wss_port, origin=from_origin, cafile=ca, server_hostname="localhost"
            )
            async with Client(connect) as client:
                await client.register(b"demo@example.org", b"demo password, long enough")
                session = await client.login(b"demo@example.org", b"demo password, long enough")
                key_id = await session.generate()
                await session.logout()
                return key_id

        assert len(anyio.run(login_over_wss, origin)) == 16
        with pytest.raises(WebSocketConnectError) as refused_origin:
            anyio.run(login_over_wss, "http://127.0.0.1:1")
        assert refused_origin.value.status == 403
    finally:
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(timeout=30)
        reader.join(timeout=5)
    assert code == 0, "".join(lines) + (demo.stderr.read() if demo.stderr else "")
    assert "stopped" in "".join(lines)
