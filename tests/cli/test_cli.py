"""The CLIs as subprocesses against a real key-server process over loopback TLS 1.3."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

from tests.support.cli import CLIENT, SERVER, client_env, run_client


def test_init_refuses_to_overwrite(server_dir):
    again = subprocess.run([*SERVER, "init", "--dir", str(server_dir)], capture_output=True, text=True)
    assert again.returncode == 1
    assert again.stderr.startswith("keymgmt-server: error:") and "refusing to overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert oct(os.stat(server_dir / "server_setup.bin").st_mode & 0o777) == "0o600"


def test_help_explains_the_options():
    out = subprocess.run([*SERVER, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("server.port", "KEYMGMT_PORT", "sessions.idle_timeout", "KEYMGMT_IDLE_TIMEOUT"):
        assert option in out
    client_help = subprocess.run([*CLIENT, "--help"], capture_output=True, text=True, check=True).stdout
    for word in (
        "register",
        "generate",
        "import",
        "retrieve",
        "export",
        "list",
        "delete",
        "audit",
        "logout",
        "exit codes",
    ):
        assert word in client_help


def test_cli_end_to_end(server, tmp_path):
    registered = run_client(server, tmp_path, "register")
    assert registered.returncode == 0, registered.stderr
    assert "registered alice@example.org" in registered.stdout
    generated = run_client(server, tmp_path, "generate")
    key_id = generated.stdout.strip()
    assert generated.returncode == 0 and len(key_id) == 32
    imported = run_client(server, tmp_path, "import", "--hex", "68656c6c6f")
    imported_id = imported.stdout.strip()
    assert run_client(server, tmp_path, "export", imported_id).stdout.strip() == "0568656c6c6f"
    assert run_client(
        server, tmp_path, "retrieve", imported_id, "--context", "local-only"
    ).stdout.strip() == ("68656c6c6f")
    # Without --context, retrieve prints the secret (local-only); null only checks.
    assert len(bytes.fromhex(run_client(server, tmp_path, "retrieve", key_id).stdout.strip())) == 32
    assert (
        run_client(server, tmp_path, "retrieve", key_id, "--context", "null").stdout.strip() == "retrievable"
    )
    listed = json.loads(run_client(server, tmp_path, "list", "--json").stdout)
    assert {k["key_id"] for k in listed} == {key_id, imported_id}
    assert run_client(server, tmp_path, "delete", "--yes", key_id).returncode == 0
    table = run_client(server, tmp_path, "audit", "--type", "key").stdout
    assert "generate" in table and "import" in table and "delete_key" in table and "register" not in table
    document = json.loads(run_client(server, tmp_path, "audit", "--json", "--key", imported_id).stdout)
    assert {e["key_id"] for e in document["entries"]} == {imported_id}
    assert run_client(server, tmp_path, "logout").stdout.strip() == "logged out"
    # The password never appears on a command line or in the server's log.
    assert not any("hunter2" in line for line in server.log)


def test_cli_errors_are_one_line_with_documented_exit_codes(server, tmp_path):
    assert run_client(server, tmp_path, "register").returncode == 0
    big_file = tmp_path / "big.bin"
    big_file.write_bytes(bytes(65537))
    cases = [
        (run_client(server, tmp_path, "list", password="wrong"), 3, "login failed"),
        (run_client(server, tmp_path, "list", account="nobody@example.org"), 3, "login failed"),
        (run_client(server, tmp_path, "retrieve", "00" * 16), 4, "no such key"),
        (run_client(server, tmp_path, "register"), 5, "already registered"),
        (run_client(server, tmp_path, "retrieve", "xyz"), 4, "no key is labelled 'xyz'"),  # not a key id
        (run_client(server, tmp_path, "retrieve", "x\ty"), 2, "control characters"),
        (run_client(server, tmp_path, "import", "--file", str(big_file)), 2, "1..65536"),
        (run_client(server, tmp_path, "list", ca=tmp_path / "nope.pem"), 2, "CA bundle"),
        (run_client(server, tmp_path, "list", password=""), 2, "password is empty"),
    ]
    for result, code, text in cases:
        assert result.returncode == code, (result.args, result.stderr)
        assert text in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    other = subprocess.run(
        [*SERVER, "init", "--dir", str(tmp_path / "other")], capture_output=True, check=True
    )
    assert other.returncode == 0
    untrusted = run_client(server, tmp_path, "list", ca=tmp_path / "other" / "ca.pem")
    assert untrusted.returncode == 6 and "not trusted" in untrusted.stderr
    assert "--ca FILE or KEYMGMT_CA" in untrusted.stderr and untrusted.stderr.count("\n") == 1
    deadline = time.monotonic() + 10  # the server logs the refused handshake on its own time
    while not any("TLS handshake" in line for line in server.log) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("TLS handshake" in line for line in server.log)


def test_cli_reports_an_unreachable_server(tmp_path, server_dir):
    env = {
        **os.environ,
        "KEYMGMT_SERVER": "127.0.0.1:1",
        "KEYMGMT_CA": str(server_dir / "ca.pem"),
        "KEYMGMT_ACCOUNT": "a@example.org",
        "KEYMGMT_LOCAL_STORE": str(tmp_path / "l.db"),
    }
    # The password is read before connecting (a slow prompt must hold no connection open).
    result = subprocess.run(
        [*CLIENT, "list"], input="a password\n", capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 6 and "cannot connect" in result.stderr


def test_sigterm_during_requests_is_graceful_and_loses_nothing(server, tmp_path):
    """Clients store in a loop; SIGTERM arrives mid-stream. Every acknowledged store is in the
    database afterwards, the server exits 0, and the database is intact."""
    assert run_client(server, tmp_path, "register").returncode == 0
    acknowledged: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def store_loop() -> None:
        while not stop.is_set():
            result = run_client(server, tmp_path, "generate")
            if result.returncode == 0:
                acknowledged.append(result.stdout.strip())
            else:
                errors.append(result.stderr)
                return

    thread = threading.Thread(target=store_loop)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stop(signal.SIGTERM) == 0
    stop.set()
    thread.join(timeout=60)
    assert len(acknowledged) >= 3
    assert any("received SIGTERM" in line for line in server.log)
    assert any("stopped" in line for line in server.log)
    db = sqlite3.connect(server.directory / "keyserver.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {row[0].hex() for row in db.execute("SELECT key_id FROM secrets")}
    assert set(acknowledged) <= stored
    for error in errors:  # a request cut by the shutdown fails with a clean, one-line error
        assert error.startswith("keymgmt: error:") and "Traceback" not in error


def test_secrets_to_import_never_need_the_command_line(server, tmp_path):
    """A secret on a command line is visible to every local user (ps, /proc) and kept in shell
    history: `import` reads it from stdin, a file or a no-echo prompt; --hex still works but
    warns."""
    assert run_client(server, tmp_path, "register").returncode == 0
    password_file = tmp_path / "password"
    password_file.write_text("hunter2 but longer\n")
    password_file.chmod(0o600)
    env = client_env(server.port, server.directory / "ca.pem", tmp_path)
    secret = b"\x00ZQX-4417\nsecret bytes\xff"
    proc = subprocess.Popen(
        [*CLIENT, "--password-file", str(password_file), "import"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 10
    command_line = b""
    while b"cli.client" not in command_line and time.monotonic() < deadline:  # (once exec is done)
        command_line = Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # what `ps` shows everyone
    assert b"cli.client" in command_line
    out, err = proc.communicate(secret, timeout=60)
    assert proc.returncode == 0, err
    assert b"ZQX-4417" not in command_line, command_line
    key_id = out.decode().strip()
    shown = run_client(server, tmp_path, "retrieve", key_id, "--context", "local-only")
    assert shown.stdout.strip() == secret.hex()
    from_file = tmp_path / "secret.bin"
    from_file.write_bytes(b"from a file")
    stored = run_client(server, tmp_path, "import", "--file", str(from_file))
    assert stored.returncode == 0 and "warning" not in stored.stderr, stored.stderr
    warned = run_client(server, tmp_path, "import", "--hex", "6869")
    assert warned.returncode == 0
    assert "warning: --hex puts the secret in the process list" in warned.stderr


def test_a_64_kib_secret_goes_in_from_a_file_and_comes_out_in_the_long_portable_form(server, tmp_path):
    """OPS-12 through the CLI: raw bytes from --file, the long portable form from --portable;
    export prints the long form (hex), retrieve the secret itself."""
    assert run_client(server, tmp_path, "register").returncode == 0
    secret = os.urandom(65536)
    raw_file = tmp_path / "big.bin"
    raw_file.write_bytes(secret)
    stored = run_client(server, tmp_path, "import", "--file", str(raw_file))
    assert stored.returncode == 0, stored.stderr
    exported = run_client(server, tmp_path, "export", stored.stdout.strip())
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.strip() == ("0001" + "00010000" + secret.hex())
    portable_file = tmp_path / "big.portable"
    portable_file.write_bytes(bytes.fromhex(exported.stdout.strip()))
    again = run_client(server, tmp_path, "import", "--portable", "--file", str(portable_file))
    assert again.returncode == 0, again.stderr
    shown = run_client(server, tmp_path, "retrieve", again.stdout.strip(), "--context", "local-only")
    assert shown.stdout.strip() == secret.hex()


def test_bad_import_input_is_refused_before_connecting(tmp_path):
    """Checked locally first: one line, exit 2, and no connection attempt (the server address
    here is closed, which would be exit 6)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    env = client_env(closed_port, tmp_path / "ca.pem", tmp_path)
    cases = [
        (["import", "--hex", "zz"], b"", "not hexadecimal"),
        (["import", "--file", str(tmp_path / "missing")], b"", "cannot read"),
        (["--password-stdin", "import", "--file", "-"], b"hello", "give the password with --password-file"),
        (["--password-stdin", "import"], b"hello", "give the password with --password-file"),
        (["import", "--portable"], b"\x05abc", "not in the portable form"),
        (["import"], b"", "1..65536 bytes"),
        (["import"], bytes(65537), "1..65536 bytes"),
        (["import", "--portable"], b"\x00\x01\x00\x00\x00\x10" + bytes(16), "one-byte-length form"),
    ]
    for args, stdin, message in cases:
        result = subprocess.run([*CLIENT, *args], input=stdin, capture_output=True, env=env, timeout=60)
        stderr = result.stderr.decode()
        assert result.returncode == 2, (args, stderr)
        assert message in stderr and "Traceback" not in stderr, (args, stderr)
