"""``make demo-web``: the browser client's demo page against a local key server over wss.

    python -m scripts.web_demo [--dir .demo-web] [--page-port 8080] [--port 7443] [--wss-port 7444]

Builds web/ (``npm ci`` first when web/node_modules is missing), creates a key server in
``--dir`` with ``keymgmt-server init`` the first time (later runs reuse it, so a browser that
trusts its development CA keeps trusting it), starts ``keymgmt-server serve`` with the
WebSocket listener and the page's origin in ``websocket.allowed_origins``, serves web/demo/
on http://127.0.0.1:PAGE_PORT/ and prints the URL and how to make a browser trust the CA.
Ctrl-C (or SIGTERM) stops both.

The pieces are shared with the headless-Chromium test (tests/system/test_browser.py) and
the browser benchmark (bench/browser.py): building web/, the page server (which writes the
key server's wss origin into the page's Content-Security-Policy), the key server with its
WebSocket listener, and Chromium's command line that trusts exactly one server certificate.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "CHROMIUM_ARGS",
    "FRAME_POLICY",
    "DemoPageServer",
    "KeyServer",
    "WebUnavailableError",
    "build_web",
    "chromium_args",
    "find_chromium",
    "find_node",
    "key_server",
    "main",
    "spki_pin",
]

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"
SERVER_CLI = (sys.executable, "-m", "keymgmt.adapters.cli.server")
#: Debian's Chromium; KEYMGMT_CHROMIUM names another binary.
DEFAULT_CHROMIUM = "/usr/bin/chromium"
#: Headless Chromium as the tests and benchmarks run it: no sandbox (containers and CI run as
#: root), no GPU, and nothing that reaches the network by itself (background updates,
#: component downloads, sync) or asks a question on first start.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
#: The page's header policy, on top of the strict one its <meta> sets (index.html).
FRAME_POLICY = "frame-ancestors 'none'"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".map": "application/json",
}


class WebUnavailableError(Exception):
    """What the browser tools need is not here (node, npm, Chromium, or web/ itself)."""


# ------------------------------------------------------------------ tools


def find_node() -> tuple[str, str]:
    """(node, npm), node 20 or newer, else WebUnavailableError with the reason."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise WebUnavailableError("node and npm are not installed (web/ needs node 20 or newer)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        raise WebUnavailableError(f"node {version} is too old for web/ (20 or newer)")
    return node, npm


def find_chromium() -> str:
    """The Chromium binary ($KEYMGMT_CHROMIUM, else /usr/bin/chromium, else ``chromium`` on the
    PATH), else WebUnavailableError. Never downloads one."""
    named = os.environ.get("KEYMGMT_CHROMIUM")
    for candidate in (named, DEFAULT_CHROMIUM, shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
        if named:
            raise WebUnavailableError(f"KEYMGMT_CHROMIUM={named} is not an executable")
    raise WebUnavailableError(
        f"Chromium is not installed ({DEFAULT_CHROMIUM}; Debian: apt-get install chromium; "
        "or set KEYMGMT_CHROMIUM)"
    )


def build_web(*, typecheck: bool = False) -> None:
    """``npm ci`` in web/ when node_modules is missing, then the esbuild bundles
    (web/build/keymgmt.js, web/demo/dist/demo.js and, for node, the conformance shim
    web/build/conformance-client.mjs); ``typecheck``: ``npm run build`` (tsc
    first). WebUnavailableError when node, web/ or the packages are missing."""
    if not (WEB / "package.json").is_file():
        raise WebUnavailableError("web/ is not in this tree (an sdist carries the Python package only)")
    node, npm = find_node()
    if not (WEB / "node_modules").is_dir():
        ci = subprocess.run(
            [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund"],
            cwd=WEB,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if ci.returncode != 0:
            raise WebUnavailableError(f"npm ci failed in web/ (registry unreachable?): {ci.stderr[-500:]}")
    command = [npm, "run", "build"] if typecheck else [node, "scripts/bundle.mjs"]
    done = subprocess.run(command, cwd=WEB, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"building web/ failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def spki_pin(cert_pem: bytes) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a PEM certificate: what Chromium's
    ``--ignore-certificate-errors-spki-list`` takes to accept that one certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def chromium_args(server_cert: Path) -> list[str]:
    """Chromium's flags for a key server with a development certificate: CHROMIUM_ARGS and
    the pin of ``server_cert``'s public key. The pin makes this browser accept exactly that
    certificate (its CA stays untrusted, and every other certificate error still fails);
    Chromium honours it only with a user data directory of its own."""
    return [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_pin(server_cert.read_bytes())}"]


# ------------------------------------------------------------------ the page


class DemoPageServer:
    """web/demo/ (and the client bundle as /keymgmt.js, as a Service Provider serves it) on
    http://HOST:PORT/, in a thread. index.html gets ``wss_url`` as its key server and that URL's
    origin as its CSP ``connect-src`` (set ``wss_url`` before a browser loads the page). Only
    those files are served; the page's own CSP is left as written otherwise."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, wss_url: str = "") -> None:
        self.wss_url = wss_url
        self.requests: list[str] = []
        page = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                page.requests.append(self.path)
                body = page.file(self.path.split("?", 1)[0])
                if body is None:
                    self.send_error(404)
                    return
                data, content_type = body
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Cache-Control", "no-store")
                # What a <meta> CSP cannot say: no other site may frame the page (clickjacking
                # its password field and buttons).
                self.send_header("Content-Security-Policy", FRAME_POLICY)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def url(self) -> str:
        return self.origin + "/"

    def file(self, path: str) -> tuple[bytes, str] | None:
        """The body and Content-Type of ``path``, or None (not ours)."""
        name = path.lstrip("/") or "index.html"
        if name in ("keymgmt.js", "keymgmt.js.map"):
            target = WEB / "build" / name
        else:
            demo = (WEB / "demo").resolve()
            target = (demo / name).resolve()
            if not target.is_relative_to(demo):
                return None
        if target.suffix not in _TYPES or not target.is_file():
            return None
        data = target.read_bytes()
        if name == "index.html":
            data = self.page(data.decode()).encode()
        return data, _TYPES[target.suffix]

    def page(self, html: str) -> str:
        """index.html for ``wss_url``: its CSP connect-src and the key server meta."""
        match = re.fullmatch(r"(wss://[^/]+)(/.*)?", self.wss_url)
        if match is None:
            raise ValueError(f"the page server needs a wss:// URL, not {self.wss_url!r}")
        html = re.sub(r"connect-src [^;\"]+", f"connect-src {match.group(1)}", html, count=1)
        return re.sub(
            r'(<meta name="keymgmt-server" content=")[^"]*"', rf'\g<1>{self.wss_url}"', html, count=1
        )

    def __enter__(self) -> DemoPageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


# ------------------------------------------------------------------ the key server


@dataclass
class KeyServer:
    """A running ``keymgmt-server serve`` with its WebSocket listener."""

    directory: Path
    process: subprocess.Popen[str]
    port: int
    wss_port: int
    log: list[str] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.directory / "keymgmt-server.toml"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def wss_url(self) -> str:
        return f"wss://127.0.0.1:{self.wss_port}/keymgmt"

    def log_text(self) -> str:
        return "".join(self.log)


def configure(config: Path, *, port: int, wss_port: int, origins: list[str]) -> None:
    """Edit ``keymgmt-server.toml`` as an operator would: the TCP port, the [websocket]
    listener and its allowed origins."""
    text = config.read_text()
    quoted = ", ".join(f'"{origin}"' for origin in origins)
    edits = [
        (r"^port = \d+", f"port = {port}"),
        (r'^listen = "[^"]*"', f'listen = "127.0.0.1:{wss_port}"'),
        (r"^allowed_origins = \[[^\]]*\]", f"allowed_origins = [{quoted}]"),
    ]
    for pattern, replacement in edits:
        text, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
        if count != 1:
            raise RuntimeError(f"{config}: no line matches {pattern!r}")
    config.write_text(text)


@contextlib.contextmanager
def key_server(
    directory: Path,
    origins: list[str],
    *,
    port: int = 0,
    wss_port: int = 0,
    cpu: int | None = None,
) -> Iterator[KeyServer]:
    """``keymgmt-server init`` in ``directory`` unless it holds a key server already, then
    ``serve`` with the WebSocket listener on 127.0.0.1:``wss_port`` (0: a free port) for pages
    of ``origins``; stopped with SIGTERM on exit. ``cpu``: pin the server to that CPU."""
    config = directory / "keymgmt-server.toml"
    if not config.exists():
        subprocess.run(
            [*SERVER_CLI, "init", "--dir", str(directory), "--port", str(port)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
    configure(config, port=port, wss_port=wss_port, origins=origins)
    process = subprocess.Popen(
        [*SERVER_CLI, "serve", "--config", str(config), "--log-level", "INFO"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    found: dict[str, int] = {}
    ready = threading.Event()

    def read_log() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            match = re.search(r"WebSocket listener on wss://[^ ]+:(\d+)/", line)
            if match:
                found["wss"] = int(match.group(1))
                ready.set()
        ready.set()  # the process ended

    def read_stdout() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("listening on "):
                found["port"] = int(line.rsplit(":", 1)[1])

    threads = [
        threading.Thread(target=read_log, daemon=True),
        threading.Thread(target=read_stdout, daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while not ("wss" in found and "port" in found) and process.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the key server did not start within 30 s:\n" + "".join(log))
            ready.wait(0.05)
        if process.poll() is not None:
            raise RuntimeError(f"the key server exited with {process.returncode}:\n" + "".join(log))
        if cpu is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(process.pid, {cpu})
        yield KeyServer(directory, process, found["port"], found["wss"], log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for thread in threads:
            thread.join(timeout=5)


# ------------------------------------------------------------------ make demo-web


def _instructions(page: DemoPageServer, server: KeyServer) -> str:
    directory = server.directory
    return f"""
keymgmt demo page: {page.url}
  key server: {server.wss_url} (WebSocket; TLS clients: 127.0.0.1:{server.port})
  allowed origin: {page.origin}

The key server's certificate comes from the development CA {server.ca}.
Make the browser trust it before you open the page, in one of these ways:
  - Chromium/Chrome: Settings > Privacy and security > Security > Manage certificates >
    Authorities (Linux: chrome://certificate-manager) > Import {server.ca}, trust it for websites.
  - Firefox: Settings > Privacy & Security > Certificates > View Certificates > Authorities >
    Import {server.ca}, trust it to identify websites.
  - A throwaway Chromium that accepts this one certificate and nothing else untrusted:
      chromium --user-data-dir="$(mktemp -d)" \\
        --ignore-certificate-errors-spki-list={spki_pin(server.cert.read_bytes())} {page.url}
Remove the CA from your browser when you are done: it signs for localhost and 127.0.0.1.

The Python CLI reaches the same accounts:
  .venv/bin/keymgmt --server 127.0.0.1:{server.port} --ca {directory / "ca.pem"} --account NAME list

Ctrl-C stops the key server and the page.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo-web", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / ".demo-web", help="the key server's folder")
    parser.add_argument("--page-port", type=int, default=8080, help="the demo page's port (0: a free one)")
    parser.add_argument("--port", type=int, default=7443, help="the key server's TLS port (0: a free one)")
    parser.add_argument("--wss-port", type=int, default=7444, help="its WebSocket port (0: a free one)")
    parser.add_argument("--no-build", action="store_true", help="serve web/ as built")
    args = parser.parse_args(argv)
    try:
        if not args.no_build:
            print("building web/ (npm ci when needed, then npm run build) ...", flush=True)
            build_web(typecheck=True)
        elif not (WEB / "demo" / "dist" / "demo.js").is_file():
            raise WebUnavailableError("web/demo/dist/demo.js is missing: run without --no-build")
    except WebUnavailableError as exc:
        print(f"make demo-web: {exc}", file=sys.stderr)
        return 1
    args.dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        page = DemoPageServer(port=args.page_port)
    except OSError as exc:
        print(f"make demo-web: port {args.page_port} for the page: {exc}", file=sys.stderr)
        return 1
    with page, key_server(args.dir, [page.origin], port=args.port, wss_port=args.wss_port) as server:
        page.wss_url = server.wss_url
        print(_instructions(page, server), flush=True)
        while not stop.is_set() and server.process.poll() is None:
            stop.wait(0.5)
        if not stop.is_set():  # (Ctrl-C in a terminal reaches the key server too)
            print(f"the key server stopped:\n{server.log_text()[-2000:]}", file=sys.stderr)
            return 1
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
