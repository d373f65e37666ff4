"""`keymgmt` as a subprocess against a real key-server process (loopback TLS 1.3): --json
on every command, -o FILE, the throttling message, what the local cache means for the audit
log, and the prompts at a terminal (a pty): register's re-asking and weak-password warning,
delete's confirmation, passwords never echoed."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import time

from tests.support.cli import CLIENT, ServerProcess, client_env, run_client

PASSWORD = "hunter2 but longer"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _json(server, tmp_path, *args: str) -> object:
    result = run_client(server, tmp_path, *args, "--json")
    assert result.returncode == 0, (args, result.stderr)
    return json.loads(result.stdout)


def test_every_command_speaks_json_with_iso_utc_times(server, tmp_path):
    registered = _json(server, tmp_path, "register")
    assert registered["account"] == "alice@example.org" and len(registered["user_id"]) == 32
    key_id = _json(server, tmp_path, "generate")["key_id"]
    secret_file = tmp_path / "secret.bin"
    secret_file.write_bytes(b"hello")
    imported = _json(server, tmp_path, "import", "--file", str(secret_file))["key_id"]
    assert _json(server, tmp_path, "retrieve", imported) == {
        "key_id": imported,
        "context": "local-only",
        "secret_hex": "68656c6c6f",
    }
    assert _json(server, tmp_path, "retrieve", imported, "--context", "null") == {
        "key_id": imported,
        "context": "null",
        "retrievable": True,
    }
    assert _json(server, tmp_path, "export", imported) == {
        "key_id": imported,
        "context": "export",
        "portable_hex": "0568656c6c6f",
    }
    listed = _json(server, tmp_path, "list")
    assert {k["key_id"] for k in listed} == {key_id, imported}
    assert all(ISO_UTC.match(k["created"]) for k in listed), listed
    assert _json(server, tmp_path, "delete", "--yes", key_id) == {"key_id": key_id, "deleted": True}
    audit = _json(server, tmp_path, "audit")
    assert audit["format"] == "keymgmt-audit-v3" and audit["entries"]
    assert _json(server, tmp_path, "logout") == {"account": "alice@example.org", "logged_out": True}
    # The table's times are the same format.
    table = run_client(server, tmp_path, "audit").stdout.splitlines()[1:]
    assert table and all(ISO_UTC.match(row.split()[1]) for row in table), table


def test_retrieve_and_export_write_raw_bytes_to_an_owner_only_file(server, tmp_path):
    assert run_client(server, tmp_path, "register").returncode == 0
    secret = bytes(range(256)) + b"\x00tail"
    source = tmp_path / "secret.bin"
    source.write_bytes(secret)
    key_id = run_client(server, tmp_path, "import", "--file", str(source)).stdout.strip()
    out = tmp_path / "out.bin"
    written = run_client(server, tmp_path, "retrieve", key_id, "-o", str(out))
    assert written.returncode == 0 and written.stdout == "", written.stderr
    assert out.read_bytes() == secret
    assert out.stat().st_mode & 0o777 == 0o600
    again = run_client(server, tmp_path, "retrieve", key_id, "-o", str(out))
    assert again.returncode == 2 and "the file exists" in again.stderr
    out.write_bytes(b"old")
    out.chmod(0o644)
    forced = run_client(server, tmp_path, "export", key_id, "-o", str(out), "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout) == {
        "key_id": key_id,
        "context": "export",
        "output": str(out),
        "bytes": len(secret) + 6,
    }
    assert out.read_bytes() == b"\x00\x01" + len(secret).to_bytes(4, "big") + secret
    assert out.stat().st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.bin.")]  # no temporary left
    env = client_env(server.port, server.directory / "ca.pem", tmp_path)
    raw = subprocess.run(
        [*CLIENT, "retrieve", key_id, "-o", "-"], input=f"{PASSWORD}\n".encode(), capture_output=True, env=env
    )
    assert raw.returncode == 0 and raw.stdout == secret


def test_a_throttled_login_says_when_to_try_again(server_dir, tmp_path):
    server = ServerProcess(
        server_dir, env={"KEYMGMT_THROTTLE_THRESHOLD": "1", "KEYMGMT_THROTTLE_BASE_DELAY": "600"}
    )
    try:
        assert run_client(server, tmp_path, "register").returncode == 0
        results = [run_client(server, tmp_path, "list", password="wrong password") for _ in range(4)]
        throttled = [r for r in results if "too many failed logins" in r.stderr]
        assert throttled, [r.stderr for r in results]
        for result in throttled:
            assert result.returncode == 3
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
            # the key server's own wait: locked for 600 s (base delay) from the threshold on
            wait = re.search(r"try again in (\d+) s$", result.stderr.strip())
            assert wait is not None and 590 <= int(wait.group(1)) <= 600, result.stderr
    finally:
        assert server.stop() == 0


def _audited_retrieves(server, tmp_path, key_id: str) -> int:
    document = json.loads(run_client(server, tmp_path, "audit", "--json", "--key", key_id).stdout)
    return sum(1 for e in document["entries"] if e["action"] == "retrieve")


def test_a_cached_read_leaves_no_audit_entry_unless_the_cache_is_skipped(server, tmp_path):
    assert run_client(server, tmp_path, "register").returncode == 0
    key_id = run_client(server, tmp_path, "generate").stdout.strip()
    assert run_client(server, tmp_path, "retrieve", key_id).returncode == 0  # from the local store
    assert _audited_retrieves(server, tmp_path, key_id) == 0
    fetched = run_client(server, tmp_path, "retrieve", key_id, "--no-local-store")
    assert fetched.returncode == 0 and len(bytes.fromhex(fetched.stdout.strip())) == 32
    assert _audited_retrieves(server, tmp_path, key_id) == 1


def test_a_key_deleted_elsewhere_stays_cached_until_a_fetch_finds_it_gone(server, tmp_path):
    """Issue 15 review, finding 12: a delete through another cache (another device) leaves
    this cache's copy readable; a --no-local-store fetch that gets "no such key" removes it,
    and a --no-local-store delete removes the key from the cache it bypasses."""
    assert run_client(server, tmp_path, "register").returncode == 0
    key_id = run_client(server, tmp_path, "generate").stdout.strip()
    other_device = run_client(server, tmp_path, "--local-store", ":memory:", "delete", key_id, "--yes")
    assert other_device.returncode == 0, other_device.stderr
    assert run_client(server, tmp_path, "retrieve", key_id).returncode == 0  # as documented
    fetched = run_client(server, tmp_path, "--no-local-store", "retrieve", key_id)
    assert fetched.returncode == 4 and "no such key" in fetched.stderr
    assert run_client(server, tmp_path, "retrieve", key_id).returncode == 4  # the copy is gone
    second = run_client(server, tmp_path, "generate").stdout.strip()
    assert run_client(server, tmp_path, "--no-local-store", "delete", second, "--yes").returncode == 0
    assert run_client(server, tmp_path, "retrieve", second).returncode == 4


def test_a_name_mismatch_points_to_server_name_and_an_unwritable_output_is_named(server, tmp_path):
    """Issue 15 review, findings 22 and 25."""
    assert run_client(server, tmp_path, "register").returncode == 0
    result = run_client(server, tmp_path, "--server-name", "evil.example", "list")
    assert result.returncode == 6
    assert result.stderr == (
        "keymgmt: error: the key server's certificate is not trusted: Hostname mismatch, certificate "
        "is not valid for 'evil.example'; --server-name (default: the host of --server) must be a "
        "name the certificate holds\n"
    )
    key_id = run_client(server, tmp_path, "generate").stdout.strip()
    written = run_client(server, tmp_path, "retrieve", key_id, "-o", "/proc/version", "--force")
    # root may create files anywhere, so /proc fails only at the write itself (exit 1)
    assert written.returncode == (1 if os.geteuid() == 0 else 2), written.stderr
    assert written.stderr.startswith("keymgmt: error: ") and "-o /proc/version" in written.stderr


def test_the_default_local_store_is_in_the_user_data_directory(server, tmp_path):
    home = tmp_path / "home"
    env = client_env(server.port, server.directory / "ca.pem", tmp_path, HOME=str(home))
    del env["KEYMGMT_LOCAL_STORE"]
    env.pop("XDG_DATA_HOME", None)
    for args in (["register"], ["generate"]):
        result = subprocess.run(
            [*CLIENT, *args], input=f"{PASSWORD}\n", capture_output=True, text=True, env=env
        )
        assert result.returncode == 0, result.stderr
    store = home / ".local" / "share" / "keymgmt" / "local.db"
    assert store.stat().st_mode & 0o777 == 0o600
    assert not (home / ".keymgmt").exists()


class Terminal:
    """`keymgmt` on a pseudo-terminal of its own (a new session, so getpass uses it, never
    the terminal the tests run in): wait for a prompt, type an answer."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [*CLIENT, *args], stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.output = b""
        self.cursor = 0

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.output += chunk
        return bool(chunk)

    def expect(self, prompt: str, timeout: float = 60) -> None:
        """Wait for ``prompt`` after what the previous expect matched (it may have arrived in
        the same read as that)."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(prompt.encode(), self.cursor)) < 0:
            assert time.monotonic() < deadline and self._read(0.2), (prompt, self.output.decode())
        self.cursor = found + len(prompt.encode())

    def type(self, answer: str) -> None:
        os.write(self.master, answer.encode() + b"\n")

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while self._read(0.2):
            assert time.monotonic() < deadline, self.output.decode()
        code = self.proc.wait(timeout=timeout)
        os.close(self.master)
        return code, self.output.decode()


def _tty_env(server, tmp_path) -> dict[str, str]:
    return client_env(server.port, server.directory / "ca.pem", tmp_path)


def test_register_at_a_terminal_warns_on_a_weak_password_and_asks_again_on_a_mismatch(server, tmp_path):
    term = Terminal(["register"], _tty_env(server, tmp_path))
    term.expect("new password: ")
    term.type("alice2026")  # the account name and a year: weak
    term.expect("use it anyway? [y/N] ")
    term.type("n")
    term.expect("new password: ")
    term.type(PASSWORD)
    term.expect("new password again: ")
    term.type("something else")
    term.expect("the passwords do not match; try again")
    term.expect("new password: ")
    term.type(PASSWORD)
    term.expect("new password again: ")
    term.type(PASSWORD)
    code, output = term.finish()
    assert code == 0, output
    assert "keymgmt: warning: this password is weak (strength" in output
    assert "registered alice@example.org" in output
    assert PASSWORD not in output and "alice2026" not in output and "something else" not in output  # no echo
    assert run_client(server, tmp_path, "logout").returncode == 0  # the strong one was registered


def test_register_at_a_terminal_gives_up_after_three_tries(server, tmp_path):
    term = Terminal(["register"], _tty_env(server, tmp_path))
    for attempt in range(3):
        term.expect("new password: ")
        term.type(PASSWORD)
        term.expect("new password again: ")
        term.type(f"mismatch {attempt}")
    code, output = term.finish()
    assert code == 2, output
    assert output.rstrip().splitlines()[-1] == "keymgmt: error: no password chosen after 3 tries"
    assert run_client(server, tmp_path, "logout").returncode == 3  # nothing was registered


def test_a_weak_password_from_stdin_is_warned_about(server, tmp_path):
    result = run_client(server, tmp_path, "register", password="password1")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("keymgmt: warning: this password is weak (strength ")
    assert result.stderr.count("\n") == 1 and "password1" not in result.stderr


def test_delete_asks_first_at_a_terminal(server, tmp_path):
    assert run_client(server, tmp_path, "register").returncode == 0
    key_id = run_client(server, tmp_path, "generate").stdout.strip()
    term = Terminal(["delete", key_id], _tty_env(server, tmp_path))
    term.expect(f"delete key {key_id} of alice@example.org? This cannot be undone. [y/N] ")
    term.type("")  # the default is no
    code, output = term.finish()
    assert code == 1 and "keymgmt: error: not confirmed; nothing deleted" in output, output
    assert "password:" not in output  # asked before the password, and nothing else happened
    assert key_id in run_client(server, tmp_path, "list").stdout
    term = Terminal(["delete", key_id], _tty_env(server, tmp_path))
    term.expect("[y/N] ")
    term.type("y")
    term.expect("password: ")
    term.type(PASSWORD)
    code, output = term.finish()
    assert code == 0 and f"deleted {key_id}" in output, output
    assert PASSWORD not in output
    assert key_id not in run_client(server, tmp_path, "list").stdout
