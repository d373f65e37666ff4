"""Every code block in README.md runs as written (issue 15).

The README is followed top to bottom as a new user would, in a scratch folder
that stands for the clone: the quick start's shell block runs in a real
terminal (a pseudo-terminal; the passwords and confirmations are typed at the
prompts), leaving its key server running in the background; the Python
examples then run against that server (the client, the sync client, the core
over plain `ssl` sockets), and the server-embedding example runs as its own
process, serves a real login and stops on SIGTERM. Configuration blocks are
loaded by the code that reads them. A block this file does not know fails the
test, so a new example cannot be added without being run (or listed below with
the reason it is not).

The only changes to the text: the ports 7443 and 7444 become free ports (the
server also gets ``KEYMGMT_PORT``), and ``.venv`` in the scratch folder is a
link to the virtual environment running the tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keymgmt import SyncClient, tls_connector

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Quick-start passphrase 2026, not a real one!"
RUN_TIMEOUT = 240.0


@dataclass(frozen=True)
class Block:
    line: int
    info: str
    text: str


def readme_blocks() -> list[Block]:
    """The fenced code blocks of README.md with their first line number and info string."""
    blocks: list[Block] = []
    lines = (ROOT / "README.md").read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(```+)(.*)$", lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        blocks.append(Block(i + 1, fence.group(2).strip(), "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return blocks


# How each block is proved, by a text only it contains. RUN_* blocks run here; the others say why not.
RUN_QUICK_START = "keymgmt-server init --dir srv                  # OPAQUE setup"
RUN_CLIENT = "async with Client(connect"
RUN_SYNC_CLIENT = "with SyncClient(tls_connector"
RUN_CORE = "conn = ClientConnection(random=os.urandom)"
RUN_EMBEDDED_SERVER = "runtime = KeyServerRuntime(settings)"
LOAD_TOML = "# keymgmt-server.toml, the same on every instance"
RUN_CONFORMANCE = "--password-file {password_file} --no-local-store generate'"
#: The worked example's server-machine line (its block runs from a wheel in test_packaging).
CONFORMANCE_SERVER = "python -m keymgmt.adapters.conformance server --target"
NOT_RUN = {
    "make demo    #": "make demo runs in tests/cli/test_demo.py; make test is what runs this test",
    "pip install 'keymgmt[postgres]'": "downloads from PyPI; the dev extra installs the same packages, "
    "which the PostgreSQL tests use",
    "pip install 'keymgmt-0.1.0.tar.gz[dev]'": "tests/repo/test_packaging.py builds the sdist, installs it "
    "and runs its tests this way",
    "frontend keymgmt": "HAProxy's configuration (not installed here)",
    "cd web && npm ci && npm test": "tests/repo/test_web.py runs npm ci and npm test in web/",
    "make demo-web    #": "serves until Ctrl-C: tests/system/test_web_demo.py runs it on free ports and "
    "checks the page, the key server and the stop; the page runs in Chromium in tests/system/test_browser.py",
    'from "./keymgmt.js"': "JavaScript for a browser page: tests/system/test_browser.py runs it as "
    "written in headless Chromium (its import made dynamic, its key server URL the test's)",
    "stream {": "nginx's configuration (not installed here)",
    "bundle.mjs --only conformance-client": "tests/conformance/test_web_client_mode.py bundles the shim and "
    "runs the client mode against it the same way",
    "pip install 'keymgmt-0.1.0-py3-none-any.whl[testing]'": "a wheel in a fresh environment: "
    "tests/repo/test_packaging.py::test_the_installed_package_runs_the_conformance_harness performs these "
    "steps; its server-machine line also runs below, against the quick start's server",
    "The server violated docs/protocol.md. Hypothesis's shrunk run:": "what the broken-server run above "
    "prints, not a command: test_packaging checks that run's exit status and transcript",
    "conformance broken-server unknown-account": "tests/repo/test_packaging.py::"
    "test_the_installed_package_runs_the_conformance_harness serves this variant from the wheel and checks "
    "the shrunk transcript and exit 1",
}
RUN = (
    RUN_QUICK_START,
    RUN_CLIENT,
    RUN_SYNC_CLIENT,
    RUN_CORE,
    RUN_EMBEDDED_SERVER,
    LOAD_TOML,
    RUN_CONFORMANCE,
)


def _block(marker: str) -> Block:
    found = [b for b in readme_blocks() if marker in b.text]
    assert len(found) == 1, f"README: {len(found)} blocks contain {marker!r}"
    return found[0]


def test_every_readme_block_is_run_or_says_why_not() -> None:
    markers = (*RUN, *NOT_RUN)
    for block in readme_blocks():
        matches = [m for m in markers if m in block.text]
        assert len(matches) == 1, (
            f"README.md line {block.line}: a code block this test does not run ({matches or 'unknown'}); "
            "run it in tests/system/test_readme.py or list it in NOT_RUN with the reason"
        )
    for marker in markers:
        _block(marker)


# ------------------------------------------------------------------ a terminal


def _take_terminal() -> None:  # pragma: no cover - runs in the child
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _answer(tail: str) -> bytes | None:
    """What a user types at the prompt the output ends with, if it ends with one."""
    if re.search(r"(?i)password[^\n]*:\s*$", tail):
        return PASSWORD.encode() + b"\n"
    if re.search(r"(?i)(\[y/n\]|\(y/n\)|yes/no)[^\n]*$", tail):
        return b"y\n"
    return None


@dataclass
class Terminal:
    """A program run on a pseudo-terminal of its own (its controlling terminal)."""

    returncode: int
    transcript: str
    session: int
    master: int


def run_in_terminal(argv: list[str], cwd: Path, env: dict[str, str]) -> Terminal:
    master, slave = os.openpty()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=_take_terminal,  # the child owns the terminal: getpass opens /dev/tty
    )
    os.close(slave)
    out = bytearray()
    answered = 0
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no end within the hang guard:\n" + out.decode(errors="replace"))
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: nothing holds the terminal any more
                chunk = b""
            if chunk:
                out += chunk
                reply = _answer(out[answered:].decode(errors="replace"))
                if reply is not None:
                    os.write(master, reply)
                    answered = len(out)
                continue
        if proc.poll() is not None:
            break  # read up to here (a background child may keep the terminal open)
    return Terminal(proc.wait(), out.decode(errors="replace").replace("\r\n", "\n"), proc.pid, master)


def _session_processes(session: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == session:
                    pids.append(int(entry.name))
    return pids


def _end_session(session: int) -> None:
    """Stop what the terminal session left running (the quick start's background server)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _session_processes(session)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for _ in range(100):
            if not _session_processes(session):
                return
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ the README, top to bottom


@dataclass
class Scratch:
    folder: Path
    env: dict[str, str]
    port: int
    quick_start: Terminal


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scratch]:
    if sys.prefix == sys.base_prefix:
        pytest.fail("the README starts with `. .venv/bin/activate`: run the tests from the venv (make test)")
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".venv").symlink_to(sys.prefix)
    home = folder / "home"
    home.mkdir()
    port = _free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KEYMGMT_", "XDG_", "VIRTUAL_ENV", "PYTHON"))
    }
    env.update(HOME=str(home), KEYMGMT_PORT=str(port), TERM="dumb")
    script = folder / "quick_start.sh"
    # `set -m`: as in an interactive shell, `&` starts the server in a process group of its own
    script.write_text("set -e -m -o pipefail\n" + _block(RUN_QUICK_START).text.replace("7443", str(port)))
    terminal = run_in_terminal(["bash", "--noprofile", "--norc", str(script)], folder, env)
    try:
        yield Scratch(folder, env, port, terminal)
    finally:
        _end_session(terminal.session)
        os.close(terminal.master)


def test_the_quick_start_runs_in_a_terminal(scratch: Scratch) -> None:
    result = scratch.quick_start
    assert result.returncode == 0, result.transcript
    assert "Traceback" not in result.transcript and "error:" not in result.transcript, result.transcript
    # retrieve printed the generated secret (32 bytes in hex), export the portable form of one
    assert re.search(r"^[0-9a-f]{64}$", result.transcript, re.MULTILINE), result.transcript
    log = (scratch.folder / "srv" / "server.log").read_text()
    assert "Traceback" not in log
    assert _session_processes(result.session), "the quick start's server is no longer running"


def _run_python(scratch: Scratch, marker: str) -> Terminal:
    block = _block(marker)
    path = scratch.folder / f"readme_line_{block.line}.py"
    path.write_text(block.text.replace("7443", str(scratch.port)))
    return run_in_terminal([sys.executable, str(path)], scratch.folder, scratch.env)


def test_the_client_example_runs(scratch: Scratch) -> None:
    result = _run_python(scratch, RUN_CLIENT)
    assert result.returncode == 0, result.transcript
    assert re.search(r"32-byte secret, \d+ keys, \d+ audit entries, b'\\x05hello'", result.transcript)


def test_the_sync_client_example_runs(scratch: Scratch) -> None:
    result = _run_python(scratch, RUN_SYNC_CLIENT)
    assert result.returncode == 0, result.transcript
    assert "b'hello'" in result.transcript


def test_the_core_example_runs_and_does_not_hang(scratch: Scratch) -> None:
    result = _run_python(scratch, RUN_CORE)
    assert result.returncode == 0, result.transcript
    assert "OK KeyListResponse(keys=(" in result.transcript


def test_the_embedded_server_example_serves_and_stops_on_sigterm(scratch: Scratch) -> None:
    block = _block(RUN_EMBEDDED_SERVER)
    port = _free_port()
    path = scratch.folder / f"readme_line_{block.line}.py"
    path.write_text(block.text.replace("7444", str(port)))
    server = subprocess.Popen(
        [sys.executable, str(path)], cwd=scratch.folder, env=scratch.env, stderr=subprocess.PIPE, text=True
    )
    try:
        connect = tls_connector("127.0.0.1", port, cafile=scratch.folder / "srv" / "ca.pem")
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert server.poll() is None, server.communicate()[1]
            time.sleep(0.1)
        # a real registration and login on the embedded server
        with SyncClient(connect) as client:
            client.register(b"bob@example.org", PASSWORD.encode())
            session = client.login(b"bob@example.org", PASSWORD.encode())
            assert session.list_keys() == []
            session.logout()
        server.send_signal(signal.SIGTERM)
        _, log = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, log
    assert f"listening on 127.0.0.1:{port}" in log
    assert "Traceback" not in log
    # the server's own lines in UTC with their zone
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO keymgmt\.server", log, re.MULTILINE), log


def test_the_conformance_example_tests_the_quick_start_server_and_our_client(scratch: Scratch) -> None:
    """Testing your implementation (issue 18): the server machine against the quick start's
    running server, the client mode against our `keymgmt`, as written."""
    script = scratch.folder / "conformance.sh"
    (server_line,) = [
        line for line in _block("whl[testing]").text.splitlines() if line.startswith(CONFORMANCE_SERVER)
    ]
    text = (server_line + "\n" + _block(RUN_CONFORMANCE).text).replace("7443", str(scratch.port))
    script.write_text("set -e -o pipefail\n. .venv/bin/activate\n" + text)
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", str(script)],
        cwd=scratch.folder,
        env=scratch.env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = [line for line in result.stdout.splitlines() if line.startswith("passed: ")]
    assert len(passed) == 2, result.stdout
    assert "FAIL" not in result.stdout


def test_the_toml_example_loads(tmp_path: Path) -> None:
    from keymgmt.adapters.server.config import load_settings

    path = tmp_path / "keymgmt-server.toml"
    path.write_text(_block(LOAD_TOML).text)
    settings = load_settings(path)
    assert settings.host == "0.0.0.0" and settings.port == 7443
    assert settings.database_url is not None and "db.internal" in settings.database_url
