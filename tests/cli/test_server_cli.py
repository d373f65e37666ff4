"""``keymgmt-server`` as a subprocess: one-line errors, --version, JSON and UTC logs, SIGHUP,
``init --renew-cert``, ``backup`` during a live server, health listeners with workers."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.client.connect import tls_connector

from ..support.server_proc import SERVER, ServerProcess, init_server_dir

PW = b"correct horse battery staple"
CONFIG = "keymgmt-server.toml"


def run(*args: str, env: dict[str, str] | None = None, python: list[str] | None = None):
    return subprocess.run(
        [*(python or SERVER), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def one_line_error(result, code: int, *words: str) -> None:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("keymgmt-server: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def server_dir(tmp_path: Path) -> Path:
    return init_server_dir(tmp_path / "srv")


def register(port: int, ca: Path, name: bytes) -> None:
    async def go() -> None:
        async with KeymgmtClient(tls_connector("127.0.0.1", port, cafile=ca)) as client:
            await client.register(name, PW)
            session = await client.login(name, PW)
            await session.generate()
            await session.logout()

    anyio.run(go)


def server_certificate(port: int, ca: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------ errors and --version


def test_version_and_usage_errors_are_one_line():
    version = run("--version")
    assert version.returncode == 0 and re.fullmatch(r"keymgmt-server \S+\n", version.stdout)
    for args in (
        (),
        ("serve", "--log-format", "xml"),
        ("init", "--port", "99999"),
        ("frobnicate",),
        ("backup",),
    ):
        result = run(*args)
        assert result.returncode == 2, (args, result)
        assert "Traceback" not in result.stderr and "usage:" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("keymgmt-server: error: ")
        assert re.search(r"\(see keymgmt-server( \w+)? --help\)$", line)


def test_backend_errors_are_one_line(server_dir):
    config = str(server_dir / CONFIG)
    one_line_error(
        run("serve", "--config", config, env={"KEYMGMT_BACKEND": "bogus"}), 1, "bogus", "asyncio or trio"
    )
    one_line_error(run("serve", "--config", config, "--backend", "nope"), 1, "nope")
    # trio missing: the module import blocked in the child.
    blocked = [
        sys.executable,
        "-c",
        "import sys; sys.modules['trio'] = None; from keymgmt.adapters.cli.server "
        "import main; sys.exit(main())",
    ]
    one_line_error(
        run("serve", "--config", config, "--backend", "trio", python=blocked), 1, "'keymgmt[trio]'"
    )


def test_database_url_without_psycopg_is_one_line_with_the_extra(server_dir):
    blocked = [
        sys.executable,
        "-c",
        "import sys; sys.modules['psycopg'] = None; from keymgmt.adapters.cli.server "
        "import main; sys.exit(main())",
    ]
    result = run(
        "serve",
        "--config",
        str(server_dir / CONFIG),
        env={"KEYMGMT_DATABASE_URL": "postgresql://127.0.0.1:5432/test"},
        python=blocked,
    )
    one_line_error(result, 1, "pip install 'keymgmt[postgres]'")


def test_a_bad_health_listen_is_one_line_before_anything_listens(server_dir):
    for bad in ("70000", "host:", "a:b:c", ":"):
        result = run("serve", "--config", str(server_dir / CONFIG), "--health-listen", bad)
        one_line_error(result, 1, "--health-listen")
    result = run("serve", "--config", str(server_dir / CONFIG), env={"KEYMGMT_HEALTH_LISTEN": "x"})
    one_line_error(result, 1, "server.health_listen")


def test_a_health_port_in_use_is_one_line_naming_it(server_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(
            "serve",
            "--config",
            str(server_dir / CONFIG),
            "--health-listen",
            str(port),
            "--log-level",
            "ERROR",
        )
    one_line_error(result, 1, f"health listener 127.0.0.1:{port}")


# ------------------------------------------------------------------ logs


def test_json_logs_one_object_per_line_in_utc(server_dir):
    server = ServerProcess(server_dir, args=("--log-format", "json"))
    try:
        register(server.port, server_dir / "ca.pem", b"json@example.org")
        probe = socket.create_connection(("127.0.0.1", server.port))
        probe.send(b"not tls at all\r\n\r\n")
        wait_for(lambda: "TLS handshake" in server.log_text(), "the failed handshake's line")
        probe.close()
    finally:
        assert server.stop() == 0
    lines = [json.loads(line) for line in server.log_text().splitlines()]
    assert lines, "no log lines"
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line
        assert {"level", "logger", "message"} <= set(line)
    (connection,) = [
        x for x in lines if x["message"].startswith("connection from") and "TLS 1.3" in x["message"]
    ]
    assert connection["peer"] in connection["message"]
    assert any(x["level"] == "WARNING" and "TLS handshake" in x["message"] for x in lines)


def test_text_logs_carry_utc_timestamps_with_the_zone(server_dir):
    # In a zone 5:30 from UTC: a local-time stamp would be hours off.
    server = ServerProcess(server_dir, env={"TZ": "Asia/Kolkata"})
    assert server.stop() == 0
    lines = server.log_text().splitlines()
    assert lines
    now = datetime.datetime.now(datetime.UTC)
    for line in lines:
        stamp = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (DEBUG|INFO|WARNING|ERROR) ", line)
        assert stamp, line
        logged = datetime.datetime.fromisoformat(stamp[1]).replace(tzinfo=datetime.UTC)
        assert abs(logged - now) < datetime.timedelta(minutes=30), line


# ------------------------------------------------------------------ certificates and SIGHUP


def test_renew_cert_keeps_the_ca_and_setup_and_sighup_serves_it(server_dir):
    kept = {
        name: (server_dir / name).read_bytes() for name in ("ca.pem", "ca.key", "server_setup.bin", CONFIG)
    }
    old_key = (server_dir / "server.key").read_bytes()
    server = ServerProcess(server_dir)
    try:
        before = server_certificate(server.port, server_dir / "ca.pem")
        renewed = run("init", "--renew-cert", "--dir", str(server_dir))
        assert renewed.returncode == 0, renewed.stderr
        assert "valid until" in renewed.stdout
        assert {name: (server_dir / name).read_bytes() for name in kept} == kept
        assert (server_dir / "server.key").read_bytes() != old_key
        assert oct(os.stat(server_dir / "server.key").st_mode & 0o777) == "0o600"
        # Until SIGHUP, new connections still get the old certificate.
        assert server_certificate(server.port, server_dir / "ca.pem") == before
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded the TLS certificate" in server.log_text(), "the reload line")
        after = server_certificate(server.port, server_dir / "ca.pem")  # verified against the same CA
        assert after != before
        # A SIGHUP with a broken certificate: one error line, the server goes on with the old one.
        (server_dir / "server.pem").write_text("broken")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "not reloaded" in server.log_text(), "the refused reload line")
        assert server.proc.poll() is None
        assert server_certificate(server.port, server_dir / "ca.pem") == after
    finally:
        assert server.stop() == 0


def test_renew_cert_without_the_dev_ca_key_is_one_line(server_dir):
    (server_dir / "ca.key").unlink()
    one_line_error(run("init", "--renew-cert", "--dir", str(server_dir)), 1, "ca.key", "not found")


def test_renew_cert_takes_new_host_names(server_dir):
    result = run("init", "--renew-cert", "--dir", str(server_dir), "--hostname", "keys.example.org")
    assert result.returncode == 0, result.stderr
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((server_dir / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["keys.example.org"]


# ------------------------------------------------------------------ backup


def test_backup_during_a_live_server_holds_the_data_and_restores(server_dir, tmp_path):
    server = ServerProcess(server_dir)
    backup = tmp_path / "backup.db"
    try:
        register(server.port, server_dir / "ca.pem", b"backed-up@example.org")
        result = run("backup", "--config", str(server_dir / CONFIG), "--to", str(backup))
        assert result.returncode == 0, result.stderr
        assert "server_setup.bin" in result.stdout
        assert oct(os.stat(backup).st_mode & 0o777) == "0o600"
        assert not Path(f"{backup}-wal").exists()  # one self-contained file
        with sqlite3.connect(backup) as db:
            names = [row[0] for row in db.execute("SELECT account_name FROM accounts")]
            secrets = db.execute("SELECT count(*) FROM secrets").fetchone()[0]
        assert names == [b"backed-up@example.org"] and secrets == 1
        again = run("backup", "--config", str(server_dir / CONFIG), "--to", str(backup))
        one_line_error(again, 1, "refusing to overwrite")
    finally:
        assert server.stop() == 0
    # Restore: the backup and the same setup file make a server the account logs in to.
    restored = tmp_path / "restored"
    shutil.copytree(server_dir, restored)
    for name in ("keyserver.db", "keyserver.db-wal", "keyserver.db-shm"):
        (restored / name).unlink(missing_ok=True)
    shutil.copy2(backup, restored / "keyserver.db")
    again = ServerProcess(restored)
    try:

        async def login() -> int:
            connect = tls_connector("127.0.0.1", again.port, cafile=restored / "ca.pem")
            async with KeymgmtClient(connect) as client:
                session = await client.login(b"backed-up@example.org", PW)
                count = len(await session.list_keys())
                await session.logout()
                return count

        assert anyio.run(login) == 1
    finally:
        assert again.stop() == 0


def test_backup_refuses_postgres_and_a_missing_database(server_dir, tmp_path):
    result = run(
        "backup",
        "--config",
        str(server_dir / CONFIG),
        "--to",
        str(tmp_path / "x.db"),
        env={"KEYMGMT_DATABASE_URL": "postgresql://127.0.0.1:5432/test"},
    )
    one_line_error(result, 1, "pg_dump")
    result = run("backup", "--config", str(server_dir / CONFIG), "--to", str(tmp_path / "y.db"))
    one_line_error(result, 1, "does not exist")  # init made no database yet
    assert not (tmp_path / "y.db").exists()


# ------------------------------------------------------------------ health with workers


def test_each_worker_serves_its_own_health_listener(server_dir):
    server = ServerProcess(server_dir, args=("--workers", "2", "--health-listen", "0"))
    try:
        pattern = re.compile(r"\[(\d+)\]: health and metrics on http://127\.0\.0\.1:(\d+)")
        wait_for(lambda: len(pattern.findall(server.log_text())) == 2, "two health listeners")
        found = dict(pattern.findall(server.log_text()))
        assert len(found) == 2  # two processes, each its own port
        for port in found.values():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as answer:
                assert answer.status == 200 and answer.read() == b"ok\n"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
                assert b"keymgmt_logins_total" in answer.read()
    finally:
        assert server.stop() == 0


def test_sigterm_with_a_shutdown_delay_drains_then_a_second_sigterm_stops(server_dir):
    server = ServerProcess(server_dir, args=("--health-listen", "0"), env={"KEYMGMT_SHUTDOWN_DELAY": "600"})
    try:
        pattern = re.compile(r"health and metrics on http://127\.0\.0\.1:(\d+)")
        wait_for(lambda: pattern.search(server.log_text()) is not None, "the health listener")
        match = pattern.search(server.log_text())
        assert match is not None
        health = f"http://127.0.0.1:{match[1]}/healthz"
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "still serving for 600 s" in server.log_text(), "the draining line")
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(health, timeout=30)
        assert answer.value.code == 503
        register(server.port, server_dir / "ca.pem", b"late@example.org")  # still served
        assert server.proc.poll() is None
    finally:
        try:
            assert server.stop() == 0  # the second SIGTERM ends the delay
        finally:
            server.kill()  # (a no-op once it exited; else it would serve out its 600 s)
    assert "stopped" in server.log_text()


# ------------------------------------------------------------------ ports and start-up failures


def busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_health_port_that_is_the_tls_port_is_one_line_before_anything_starts(server_dir):
    config = str(server_dir / CONFIG)
    # worker 1's health port (7942 + 1) would be the TLS port: caught before any worker starts
    result = run(
        "serve", "--config", config, "--workers", "2", "--health-listen", "7942", env={"KEYMGMT_PORT": "7943"}
    )
    one_line_error(result, 1, "7942..7943", "TLS port 7943")
    result = run("serve", "--config", config, "--health-listen", "7943", env={"KEYMGMT_PORT": "7943"})
    one_line_error(result, 1, "port 7943", "TLS port 7943")


def busy_port_after_a_free_one() -> socket.socket:
    """A listening socket whose port number minus one was free a moment ago (so worker 0 can bind it)."""
    for _ in range(50):
        taken = busy_port()
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", taken.getsockname()[1] - 1))
        except OSError:
            taken.close()
            continue
        finally:
            probe.close()
        return taken
    raise AssertionError("no free port below a busy one in 50 tries")


def test_a_worker_that_cannot_start_has_its_cause_and_exit_code_in_the_parents_log(server_dir):
    # worker 0's health port must be free, or worker 0 fails first (seen in CI: a port below an
    # ephemeral one was in use by another test's connection)
    with busy_port_after_a_free_one() as taken:
        health = taken.getsockname()[1] - 1  # worker 1's health port is the taken one
        result = run(
            "serve", "--config", str(server_dir / CONFIG), "--workers", "2", "--health-listen", str(health)
        )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    failed = [line for line in result.stderr.splitlines() if "failed to start" in line]
    assert len(failed) == 1, result.stderr
    assert re.search(
        rf"worker 1 \(pid \d+\) failed to start \(exit code 1\): health listener 127\.0\.0\.1:{health + 1}: ",
        failed[0],
    ), failed[0]


def test_busy_ports_are_one_line_naming_the_listener_and_nothing_claims_to_listen(server_dir):
    config = str(server_dir / CONFIG)
    with busy_port() as taken:
        port = str(taken.getsockname()[1])
        # INFO logs: one line means no "listening on" / "stopped" before the error
        one_line_error(
            run("serve", "--config", config, "--health-listen", port), 1, f"health listener 127.0.0.1:{port}"
        )
        one_line_error(
            run("serve", "--config", config, env={"KEYMGMT_PORT": port}), 1, f"TLS listener 127.0.0.1:{port}"
        )
        result = run("serve", "--config", config, "--workers", "2", env={"KEYMGMT_PORT": port})
        one_line_error(result, 1, f"TLS listener 127.0.0.1:{port}")


def test_with_json_logs_a_fatal_error_is_a_json_line(server_dir):
    result = run(
        "serve", "--config", str(server_dir / CONFIG), "--log-format", "json", env={"KEYMGMT_PORT": "x"}
    )
    assert result.returncode == 1, result
    (line,) = result.stderr.splitlines()
    error = json.loads(line)
    assert error["level"] == "ERROR" and "server.port" in error["message"], error


def test_backup_of_a_killed_servers_database_leaves_its_wal_alone(server_dir, tmp_path):
    """The source is opened read-only: backing up the database of a server that died with a
    WAL (SIGKILL) copies the WAL's data without checkpointing it into the database."""
    server = ServerProcess(server_dir)
    register(server.port, server_dir / "ca.pem", b"in-the-wal@example.org")
    server.kill()
    wal = server_dir / "keyserver.db-wal"
    assert wal.stat().st_size > 0
    files = [server_dir / "keyserver.db", wal]  # (the -shm index may be rebuilt: it is a cache)
    before = [p.read_bytes() for p in files]
    backup = tmp_path / "backup.db"
    result = run("backup", "--config", str(server_dir / CONFIG), "--to", str(backup))
    assert result.returncode == 0, result.stderr
    assert [p.read_bytes() for p in files] == before
    with sqlite3.connect(backup) as db:
        names = [row[0] for row in db.execute("SELECT account_name FROM accounts")]
    assert names == [b"in-the-wal@example.org"]
    assert oct(os.stat(backup).st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.db", "srv"]  # no leftovers


def test_backup_never_writes_through_a_name_swapped_meanwhile(server_dir, tmp_path, monkeypatch, capsys):
    """Someone who can write to the backup's folder replaces the target with a symlink to a
    path of their choosing while the backup runs: the backup refuses, nothing is written
    through the link, and no temporary file is left."""
    from keymgmt.adapters.cli.server import main

    server = ServerProcess(server_dir)
    try:
        register(server.port, server_dir / "ca.pem", b"swap@example.org")
    finally:
        assert server.stop() == 0
    shared = tmp_path / "shared"
    shared.mkdir()
    target, victim = shared / "backup.db", tmp_path / "victim"
    real_connect = sqlite3.connect
    calls = []

    def connect(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:  # between creating the backup file and writing it: swap the name
            if os.path.lexists(target):
                os.unlink(target)
            os.symlink(victim, target)
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    code = main(["backup", "--config", str(server_dir / CONFIG), "--to", str(target)])
    err = capsys.readouterr().err
    assert not victim.exists()  # nothing written through the link
    assert code == 1 and "already exists; refusing to overwrite it" in err, err
    assert [p.name for p in shared.iterdir()] == ["backup.db"]  # the planted link only


# ------------------------------------------------------------------ help and invite


def test_init_serve_and_invite_help_show_examples():
    for command in ("init", "serve", "invite", "backup", "wait"):
        result = run(command, "--help")
        assert result.returncode == 0, result.stderr
        assert f"keymgmt-server {command} --" in result.stdout.split("example", 1)[1], command


def test_invite_for_a_name_that_can_never_register_is_a_usage_error(server_dir):
    config = str(server_dir / CONFIG)
    for bad in ("a\nb", " alice", "a" * 256, ""):
        result = run("invite", "--config", config, "--account", bad)
        one_line_error(result, 2, "--account", "can never be registered")
        assert result.stdout == ""
    result = run("invite", "--config", config, "--account", "alice@example.org")
    assert result.returncode == 0 and result.stdout.startswith("kmi1."), result


def test_with_workers_a_second_sigterm_to_the_parent_ends_the_shutdown_delay(server_dir):
    server = ServerProcess(server_dir, args=("--workers", "2"), env={"KEYMGMT_SHUTDOWN_DELAY": "600"})
    try:
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: server.log_text().count("still serving for 600 s") == 2, "both workers draining")
        assert server.proc.poll() is None
    finally:
        try:
            assert server.stop() == 0  # the second SIGTERM, passed on to the workers
        finally:
            server.kill()  # (no-ops once they exited; else they would serve out their 600 s)
            for pid in re.findall(r"started worker \d+ \(pid (\d+)\)", server.log_text()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    assert "all workers stopped" in server.log_text()
