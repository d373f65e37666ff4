"""`keymgmt` as a subprocess, without a key server: bad input of every kind is one line on
stderr with its documented exit code, never a traceback, and is found before any connection
(a listener that counts connections proves none was made); --version, per-command help,
completion scripts and the local store's default place."""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from keymgmt.adapters.cli import client as cli
from tests.support.cli import CLIENT, SERVER

PASSWORD = "hunter2 but longer\n"


class CountingListener:
    """A TCP listener on loopback that accepts and closes connections, counting them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def listener():
    counting = CountingListener()
    yield counting
    counting.close()


def _env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYMGMT_")}
    ca = tmp_path / "ca.pem"
    if not ca.exists():  # any readable PEM certificate will do: nothing gets to use it
        subprocess.run(
            [*SERVER, "init", "--dir", str(tmp_path / "srv")],
            capture_output=True,
            check=True,
            timeout=60,
        )
        ca.write_bytes((tmp_path / "srv" / "ca.pem").read_bytes())
    return {
        **env,
        "HOME": str(tmp_path / "home"),
        "KEYMGMT_SERVER": f"127.0.0.1:{port}",
        "KEYMGMT_CA": str(ca),
        "KEYMGMT_ACCOUNT": "alice@example.org",
        "KEYMGMT_LOCAL_STORE": str(tmp_path / "local.db"),
        **extra,
    }


def _run(args: list[str], env: dict[str, str], stdin: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLIENT, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60)


def _assert_one_line(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    where = (result.args, result.stderr)
    assert result.returncode == code, where
    assert result.stderr.startswith("keymgmt: error: "), where
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), where
    assert "Traceback" not in result.stderr, where
    assert text in result.stderr, where


def test_every_bad_input_is_one_line_before_any_connection(tmp_path, listener):
    existing = tmp_path / "existing.bin"
    existing.write_bytes(b"keep me")
    a_directory = tmp_path / "a-directory"
    a_directory.mkdir()
    key = "00" * 16
    long_password = tmp_path / "long-password"
    long_password.write_text("p" * 70_000 + "\n")
    open_store = tmp_path / "shared" / "store.db"
    open_store.parent.mkdir()
    open_store.write_bytes(b"")
    open_store.chmod(0o644)
    open_link = tmp_path / "link.db"
    open_link.symlink_to(open_store)
    others_store = tmp_path / "others.db"
    others_store.write_bytes(b"")
    others_store.chmod(0o600)
    cases: list[tuple[list[str], dict[str, str], int, str]] = [
        (["import", "--hex", "zz"], {}, 2, "--hex is not hexadecimal"),
        (
            ["import", "--hex", "00", "--ca", str(tmp_path / "x.pem")],
            {},
            2,
            "--ca (or KEYMGMT_CA): cannot load",
        ),
        (["register", "--token", "t", "--ca", str(tmp_path / "x.pem")], {}, 2, "cannot load the CA bundle"),
        (["--server", "127.0.0.1:99999", "list"], {}, 2, "port 99999 is not in 1..65535"),
        (["--server", "127.0.0.1:0", "list"], {}, 2, "not in 1..65535"),
        (["--server", "127.0.0.1", "list"], {}, 2, "must be HOST:PORT"),
        (["--server", "garbage", "list"], {}, 2, "must be HOST:PORT"),
        (["--server", ":7443", "list"], {}, 2, "must be HOST:PORT"),
        (["--server", "host:12ab", "list"], {}, 2, "must be HOST:PORT"),
        (["list"], {"KEYMGMT_SERVER": "no port here"}, 2, "KEYMGMT_SERVER"),
        (["list", "--server", "127.0.0.1:65536"], {}, 2, "not in 1..65535"),
        (["--backend", "bogus", "list"], {}, 2, "must be asyncio or trio, not 'bogus'"),
        (["list"], {"KEYMGMT_BACKEND": "bogus"}, 2, "KEYMGMT_BACKEND"),
        # a KEY is a key id (32 hex digits) or a label: an invalid label is refused here
        (["retrieve", "a\tb"], {}, 2, "a label has no control characters"),
        (["retrieve", " padded"], {}, 2, "does not start or end with a space"),
        (["export", "x" * 65], {}, 2, "a label is 1..64 bytes"),
        (["delete", "--yes", ""], {}, 2, "a label is 1..64 bytes"),
        (["audit", "--key", "a\nb"], {}, 2, "a label has no control characters"),
        (["rename", "00" * 16, "0123456789abcdef" * 2], {}, 2, "would read as a key id"),
        (["rename", "00" * 16], {}, 2, "a new LABEL, or --remove"),
        (["rename", "00" * 16, "x", "--remove"], {}, 2, "a new LABEL, or --remove"),
        (["generate", "--label", "x" * 65], {}, 2, "a label is 1..64 bytes"),
        (["audit", "--after", "last tuesday"], {}, 2, "is not an ISO date"),
        (["list"], {"KEYMGMT_ACCOUNT": ""}, 2, "--account (or KEYMGMT_ACCOUNT) is required"),
        (["--ca", str(tmp_path / "missing.pem"), "list"], {}, 2, "cannot load the CA bundle"),
        (["--ca", str(a_directory), "list"], {}, 2, "cannot load the CA bundle"),
        (
            ["--account", "a" * 300, "list"],
            {},
            2,
            "--account (or KEYMGMT_ACCOUNT) is at most 255 bytes, not 300",
        ),
        (["list"], {"KEYMGMT_ACCOUNT": "é" * 128}, 2, "is at most 255 bytes, not 256"),
        (
            ["--password-file", str(long_password), "register"],
            {},
            2,
            "the password is 70000 bytes; at most 65535",
        ),
        (["--local-store", str(a_directory), "list"], {}, 2, "is a directory; give a file"),
        (
            ["--local-store", str(open_link), "list"],
            {},
            2,
            f"(a link to {open_store}) is accessible to other users; run `chmod 600 {open_store}`",
        ),
        (["--password-file", str(tmp_path / "missing"), "list"], {}, 2, "cannot read the password file"),
        (["--password-file", str(a_directory), "list"], {}, 2, "Is a directory"),
        (["list"], {"KEYMGMT_PASSWORD_FILE": str(tmp_path / "missing")}, 2, "cannot read the password file"),
        (["import", "--file", str(tmp_path / "missing")], {}, 2, "cannot read"),
        (["import", "--file", str(a_directory)], {}, 2, "Is a directory"),
        (["register", "--token-file", str(tmp_path / "missing")], {}, 2, "cannot read the invitation file"),
        (["retrieve", key, "-o", str(existing)], {}, 2, "the file exists (--force replaces it)"),
        (["export", key, "-o", str(tmp_path / "no" / "such" / "x")], {}, 2, "no such directory"),
        (["retrieve", key, "-o", str(a_directory)], {}, 2, "is a directory"),
        (["retrieve", key, "--context", "null", "-o", str(tmp_path / "x")], {}, 2, "not null"),
        (["retrieve", key, "--json", "-o", "-"], {}, 2, "both write to stdout"),
        (["delete", key], {}, 2, "give --yes when stdin is not a terminal"),
        # argparse's own errors: the same single line, naming the command's help
        (["retrieve"], {}, 2, "the following arguments are required: KEY (see keymgmt retrieve --help)"),
        ([], {}, 2, "the following arguments are required: COMMAND"),
        (["--bogus", "list"], {}, 2, "unrecognized arguments: --bogus"),
        (["frobnicate"], {}, 2, "invalid choice: 'frobnicate'"),
        (["retrieve", key, "--context", "sideways"], {}, 2, "invalid choice: 'sideways'"),
        (["audit", "--type", "everything"], {}, 2, "invalid choice"),
    ]
    if os.geteuid() == 0:
        os.chown(others_store, 65534, 65534)
        cases.append((["--local-store", str(others_store), "list"], {}, 2, "belongs to another user"))
    else:
        print("not root: cannot give a file to another user; the other user's local store is not tried")
    for args, extra, code, text in cases:
        _assert_one_line(_run(args, _env(tmp_path, listener.port, **extra)), code, text)
    # A password too long for OPAQUE from stdin: the same, read before connecting.
    _assert_one_line(_run(["list"], _env(tmp_path, listener.port), "p" * 70_000 + "\n"), 2, "at most 65535")
    assert existing.read_bytes() == b"keep me"
    assert listener.accepted == 0
    # The listener does see a client that gets past the checks (it fails at TLS: exit 6).
    reached = _run(["list"], _env(tmp_path, listener.port))
    _assert_one_line(reached, 6, "TLS 1.3 handshake")
    assert listener.accepted == 1


def test_a_secret_from_stdin_without_a_terminal_needs_a_password_file(tmp_path, listener):
    """getpass would fall back to the used-up stdin (and warn that it may echo): refused
    first, in one line."""
    result = subprocess.run(
        [*CLIENT, "import"],
        input="hello",
        capture_output=True,
        text=True,
        env=_env(tmp_path, listener.port),
        start_new_session=True,  # no controlling terminal, as under cron or CI
        timeout=60,
    )
    _assert_one_line(result, 2, "no terminal to ask the password on; give it with --password-file")
    assert listener.accepted == 0


def test_the_trio_backend_without_trio_is_a_usage_error(tmp_path, listener):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['trio'] = None  # as if not installed\n")
    env = _env(tmp_path, listener.port, PYTHONPATH=str(shim))
    hidden = subprocess.run(
        [*CLIENT[:1], "-c", "import trio"], capture_output=True, text=True, env=env, timeout=60
    )
    assert "ModuleNotFoundError" in hidden.stderr  # the shim works
    _assert_one_line(_run(["--backend", "trio", "list"], env), 2, "the trio backend needs the trio package")
    _assert_one_line(
        _run(["list"], {**env, "KEYMGMT_BACKEND": "trio"}), 2, "the trio backend needs the trio package"
    )
    assert listener.accepted == 0


def test_an_unexpected_error_is_one_line_and_its_traceback_only_on_request(tmp_path, listener):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import anyio\n\n\ndef _broken(*args, **kwargs):\n    raise RuntimeError('planted failure')\n\n\n"
        "anyio.run = _broken\n"
    )
    env = _env(tmp_path, listener.port, PYTHONPATH=str(shim))
    result = _run(["list"], env)
    _assert_one_line(
        result, 1, "unexpected RuntimeError: planted failure (KEYMGMT_DEBUG=1 shows the traceback)"
    )
    debug = _run(["list"], {**env, "KEYMGMT_DEBUG": "1"})
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "_broken" in debug.stderr
    assert debug.stderr.splitlines()[-1] == "keymgmt: error: unexpected RuntimeError: planted failure"


def test_version():
    result = subprocess.run([*CLIENT, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"keymgmt {importlib.metadata.version('keymgmt')}"


@pytest.mark.parametrize(
    "command", ["register", "generate", "import", "retrieve", "export", "list", "delete", "audit", "logout"]
)
def test_each_command_help_has_a_description_an_example_and_its_environment(command):
    result = subprocess.run([*CLIENT, command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    head = out.split("\n\n")[1]  # the description follows the usage block
    assert len(head) > 40 and not head.startswith("options:"), out
    example = out.split("example:\n", 1)[1].split("\n\n", 1)[0]
    assert example.strip().startswith(("keymgmt ", "KEY_ID=$(keymgmt")), out
    for name in cli.ENVIRONMENT:
        assert name in out.split("environment:", 1)[1], (command, name)
    for option in ("--server", "--ca", "--account", "--json", "--password-file"):
        assert option in out  # accepted after the command, too
    if command == "register":
        assert "KEYMGMT_INVITATION" in out
    if command in ("retrieve", "export"):
        assert "-o FILE, --output FILE" in out and "--force" in out
    if command == "delete":
        assert "--yes" in out


def test_options_work_before_and_after_the_command(tmp_path, listener):
    env = _env(tmp_path, listener.port)
    before = _run(["--server", "127.0.0.1:99999", "list"], env)
    after = _run(["list", "--server", "127.0.0.1:99999"], env)
    assert before.stderr == after.stderr and before.returncode == after.returncode == 2
    assert listener.accepted == 0


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts(shell):
    result = subprocess.run(
        [*CLIENT, "--print-completion", shell], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for word in ("keymgmt", "retrieve", "--context", "local-only", "--password-file"):
        assert word in result.stdout, word


def test_the_local_store_follows_the_platform_and_keeps_an_old_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert cli.default_local_store() == tmp_path / ".local" / "share" / "keymgmt" / "local.db"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert cli.default_local_store() == tmp_path / "data" / "keymgmt" / "local.db"
    legacy = tmp_path / ".keymgmt" / "local.db"
    legacy.parent.mkdir()
    legacy.write_bytes(b"")
    assert cli.default_local_store() == legacy
    shown = subprocess.run(
        [*CLIENT, "list", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
        timeout=60,
    )
    assert str(legacy) in " ".join(shown.stdout.split()).replace(" ", "")


def test_output_never_replaces_a_file_that_appears_after_the_check(tmp_path):
    """-o FILE is checked before connecting; a file created meanwhile is still not replaced
    without --force (the write links a finished temporary file, which fails if one exists)."""
    target = tmp_path / "late.bin"
    target.write_bytes(b"arrived meanwhile")
    with pytest.raises(cli.UsageError, match="the file exists"):
        cli._write_output(str(target), b"secret", force=False)
    assert target.read_bytes() == b"arrived meanwhile"
    cli._write_output(str(target), b"secret", force=True)
    assert target.read_bytes() == b"secret" and target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.bin"]


@pytest.mark.parametrize("command", ["list", "register"])
def test_the_password_is_asked_before_connecting(tmp_path, listener, command):
    """A prompt answered slowly must not hold a connection the key server closes as idle
    (issue 15 review, finding 1): nothing connects until the password is in."""
    from tests.cli.test_cli_interactive import Terminal

    term = Terminal([command], _env(tmp_path, listener.port))
    term.expect("password: ")
    assert listener.accepted == 0
    password = "correct horse battery staple 9Q"
    term.type(password)
    if command == "register":
        term.expect("new password again: ")
        term.type(password)
    code, output = term.finish()
    assert code == 6 and "TLS 1.3 handshake" in output, output  # then it connects
    assert listener.accepted == 1


def test_an_audit_range_that_cannot_match_is_warned_about(tmp_path, listener):
    result = _run(["audit", "--after", "2027-01-01", "--before", "2026-01-01"], _env(tmp_path, listener.port))
    warning, error = result.stderr.splitlines()
    assert warning == (
        "keymgmt: warning: --after 2027-01-01 is not before --before 2026-01-01: no entry can match"
    )
    assert error.startswith("keymgmt: error: ") and result.returncode == 6


def test_a_throttled_login_without_a_named_wait_says_it_once_then_the_policy():
    from keymgmt.adapters.cli.client import _message
    from keymgmt.adapters.client.async_client import ThrottledError

    line = _message(ThrottledError("too many login attempts for this account; try again in a moment"))
    assert line.count("too many login attempts") == 1, line
    assert line.startswith("too many login attempts for this account; try again in a moment (by default")


def test_an_operation_refused_for_the_per_user_rate_is_not_blamed_on_this_addresss_logins():
    """A KeySession operation that the key server kept answering RATE_LIMITED (the account's
    per-user request rate) is reported as such by the CLI, not as the per-address login
    limit's "too many logins from this address"."""
    import anyio

    from keymgmt.adapters.cli.client import _message
    from keymgmt.adapters.client.async_client import KeymgmtClient, RateLimitedError
    from keymgmt_proto import SessionHandle, Status

    client = KeymgmtClient(lambda: None)  # type: ignore[arg-type,return-value]  # (never connects)
    client.rate_limit_wait = 0.1

    async def refused(handle: SessionHandle, body: bytes) -> bytes:
        return bytes([Status.RATE_LIMITED])

    client.request = refused  # type: ignore[method-assign]
    with pytest.raises(RateLimitedError) as caught:
        anyio.run(client._request_paced, SessionHandle(), b"\x07")
    line = _message(caught.value)
    assert "per-user rate" in line and "logins from this address" not in line, line
    assert cli._exit_code(caught.value) == 3  # (a throttle, as before)
