"""``keymgmt-server serve --workers 2`` as a real process tree, on SQLite and PostgreSQL.

Each worker's log lines carry its pid, and the "connection from 127.0.0.1:PORT" line
names the client's port: the tests learn which worker accepted a connection from the
log. To make the other worker take the next connection they stop the first one with
SIGSTOP (it stays alive but accepts nothing) and let it continue afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute

from keymgmt.adapters.cli.server import main
from keymgmt.adapters.client.async_client import SESSION_REVOKED, KeymgmtClient, SessionEndedError
from keymgmt.adapters.client.connect import tls_connector
from keymgmt_proto import Action, AuditType, Context, ErrorCode

from ..support.pg import schema_fixture
from ..support.server_proc import SERVER, ServerProcess, init_server_dir

pytestmark = pytest.mark.anyio
PW = b"correct horse battery staple"
WORKERS = ("--workers", "2")


@pytest.fixture
def anyio_backend() -> str:
    """The servers are processes of their own: the client's event loop does not matter here."""
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path):
    """Environment for the server: nothing for SQLite (the config's file), else a fresh
    PostgreSQL schema; and a function counting the detached sessions in the database."""
    if request.param == "sqlite":
        path = tmp_path / "srv" / "keyserver.db"

        def count_sqlite() -> int:
            with sqlite3.connect(path) as db:
                return int(db.execute("SELECT count(*) FROM detached_sessions").fetchone()[0])

        yield {}, count_sqlite
        return
    fixture = schema_fixture()
    conninfo, schema = next(fixture)

    def count_postgres() -> int:
        import psycopg
        from psycopg import sql

        with psycopg.connect(conninfo) as conn:
            query = sql.SQL("SELECT count(*) FROM {}.detached_sessions").format(sql.Identifier(schema))
            row = conn.execute(query).fetchone()
            assert row is not None
            return int(row[0])

    yield {"KEYMGMT_DATABASE_URL": conninfo, "KEYMGMT_DATABASE_SCHEMA": schema}, count_postgres
    next(fixture, None)  # drops the schema


@pytest.fixture
def pool(tmp_path, database):
    env, count_detached = database
    directory = init_server_dir(tmp_path / "srv")
    server = ServerProcess(directory, env=env, args=WORKERS)
    yield server, count_detached
    if server.proc.poll() is None:
        for pid in worker_pids(server):  # (a test may have left one stopped)
            with _suppress_gone():
                os.kill(pid, signal.SIGCONT)
        server.stop()


class _suppress_gone:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        return kind is ProcessLookupError


def started(server: ServerProcess) -> list[int]:
    """Every worker pid the parent has started, in order."""
    return [int(pid) for pid in re.findall(r"started worker \d+ \(pid (\d+)\)", server.log_text())]


def worker_pids(server: ServerProcess) -> list[int]:
    """The workers running now: started and not yet reported as exited."""
    gone = {int(pid) for pid in re.findall(r"\(pid (\d+)\) exited unexpectedly", server.log_text())}
    return [pid for pid in started(server) if pid not in gone]


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def served_by(server: ServerProcess, local_port: int) -> int:
    """The pid of the worker that accepted the client connection from ``local_port``."""
    pattern = re.compile(rf"keymgmt\.server\[(\d+)\]: connection from 127\.0\.0\.1:{local_port} ")
    match = wait_for(lambda: pattern.search(server.log_text()), f"the worker serving :{local_port}")
    return int(match.group(1))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class GatedConnector:
    """A TLS connector that records each connection's local port and waits for ``allowed``."""

    def __init__(self, server: ServerProcess) -> None:
        self.connect = tls_connector(
            "127.0.0.1", server.port, cafile=server.directory / "ca.pem", server_hostname="localhost"
        )
        self.allowed = anyio.Event()
        self.allowed.set()
        self.streams: list[ByteStream] = []
        self.ports: list[int] = []

    async def __call__(self) -> ByteStream:
        await self.allowed.wait()
        stream = await self.connect()
        self.streams.append(stream)
        self.ports.append(stream.extra(SocketAttribute.local_port))
        return stream

    def cut(self, n: int) -> None:
        self.streams[n].extra(SocketAttribute.raw_socket).shutdown(socket.SHUT_RDWR)


async def test_both_workers_accept_a_session_moves_between_them_and_sigterm_stops_all(pool):
    server, count_detached = pool
    pids = wait_for(lambda: len(worker_pids(server)) == 2 and worker_pids(server), "two workers")
    assert server.pid not in pids
    connector = GatedConnector(server)
    async with KeymgmtClient(connector, reconnect_attempts=10) as client:
        await client.register(b"nomad@example.org", PW)
        session = await client.login(b"nomad@example.org", PW)
        key_id = await session.import_secret(b"\x04abcd")
        first = served_by(server, connector.ports[0])
        assert first in pids
        # The connection breaks: its worker detaches the session into the database.
        connector.allowed = anyio.Event()
        connector.cut(0)
        await anyio.to_thread.run_sync(wait_for, lambda: count_detached() == 1, "the detached session")
        # Only the other worker can accept now.
        os.kill(first, signal.SIGSTOP)
        try:
            connector.allowed.set()
            client.local_store.delete(session.user_id, key_id)
            with anyio.fail_after(30):
                assert await session.retrieve(key_id, Context.LOCAL_ONLY) == b"abcd"
            second = served_by(server, connector.ports[1])
        finally:
            os.kill(first, signal.SIGCONT)
        assert second in pids and second != first
        assert count_detached() == 0  # claimed from the store, not logged in again
        entries = await session.audit(AuditType.ALL)
        assert [e.action for e in entries].count(Action.LOGIN) == 1
    assert server.stop() == 0
    log = server.log_text()
    for pid in pids:
        assert gone(pid)
        assert f"keymgmt.server[{pid}]: received SIGTERM" in log
        assert f"keymgmt.server[{pid}]: stopped" in log
    assert "all workers stopped" in log


class _Steered:
    """Makes worker ``pid`` take the next connections: the other one is stopped (SIGSTOP) for
    the block, and continues afterwards."""

    def __init__(self, pids: list[int], pid: int) -> None:
        self.others = [p for p in pids if p != pid]

    def __enter__(self) -> None:
        for other in self.others:
            os.kill(other, signal.SIGSTOP)

    def __exit__(self, kind, value, tb) -> None:
        for other in self.others:
            os.kill(other, signal.SIGCONT)


async def test_a_session_on_the_other_worker_ends_when_the_password_changes_or_the_account_goes(pool):
    """Review of issue 16, gaps 1 and 2: a session held by one worker, logged in with the old
    password and without the storage key yet, got IntegrityError after the password changed
    through the other worker (the re-wrapped key does not open under the old login), and could
    read keys holding it. Now its next request ends it with the protocol's reason
    (SessionEndedError, NOT_AUTHORIZED: log in again); a fresh login with the new password
    works on that worker; after a deletion through the other worker the same."""
    server, _ = pool
    w1, w2 = wait_for(lambda: len(worker_pids(server)) == 2 and worker_pids(server), "two workers")
    name = b"shared@example.org"
    on_w1, on_w2 = GatedConnector(server), GatedConnector(server)
    async with contextlib.AsyncExitStack() as clients:
        # Each client connects (and does its steps) while the other worker is stopped.
        with _Steered([w1, w2], w1):
            b = await clients.enter_async_context(KeymgmtClient(on_w1, reconnect_attempts=1))
        with anyio.fail_after(60), _Steered([w1, w2], w1):
            await b.register(name, PW)
            setup = await b.login(name, PW)
            key_id = await setup.import_secret(b"\x04abcd")
            await setup.logout()
            stale = await b.login(name, PW)  # with the old password; no storage key yet
            b.local_store.delete(stale.user_id, key_id)  # and no local copy
            # two more, to take the account over: change the password, or delete it
            stale_changer, stale_deleter = await b.login(name, PW), await b.login(name, PW)
        with _Steered([w1, w2], w2):
            a = await clients.enter_async_context(KeymgmtClient(on_w2, reconnect_attempts=1))
        with anyio.fail_after(60), _Steered([w1, w2], w2):
            await a.change_password(name, PW, b"the new password")
        with anyio.fail_after(60):
            with pytest.raises(SessionEndedError, match="changed after this session logged in") as ended:
                await stale.retrieve(key_id, Context.LOCAL_ONLY)
            assert ended.value.code is ErrorCode.NOT_AUTHORIZED and "log in again" in str(ended.value)
            # gap 4: the takeover attempts are told why, in one line (not "request refused: invalid")
            with pytest.raises(SessionEndedError) as ended:
                await stale_changer.change_password(b"the attacker's own")
            assert str(ended.value) == SESSION_REVOKED
            with pytest.raises(SessionEndedError) as ended:
                await stale_deleter.delete_account()
            assert str(ended.value) == SESSION_REVOKED
            fresh = await b.login(name, b"the new password")
            assert await fresh.retrieve(key_id, Context.LOCAL_ONLY) == b"abcd"
        with anyio.fail_after(60), _Steered([w1, w2], w2):
            await a.delete_account(name, b"the new password")
        with (
            anyio.fail_after(60),
            pytest.raises(SessionEndedError, match="or the account was deleted") as ended,
        ):
            await fresh.list_keys()
        assert ended.value.code is ErrorCode.NOT_AUTHORIZED
    # Every connection of each client went to its worker (none was replaced on the other).
    assert {served_by(server, port) for port in on_w1.ports} == {w1}
    assert {served_by(server, port) for port in on_w2.ports} == {w2}
    # (the worker logs the line as it ends the session; it reaches the log a moment later)
    for why in ("changed its password", "was deleted"):
        line = f"ended a session whose account {why} elsewhere"
        wait_for(lambda line=line: line in server.log_text(), repr(line), timeout=10)


async def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(pool):
    server, _ = pool
    pids = wait_for(lambda: len(worker_pids(server)) == 2 and worker_pids(server), "two workers")
    os.kill(pids[0], signal.SIGKILL)
    replacement = wait_for(
        lambda: len(started(server)) == 3 and started(server)[2], "a replacement worker", timeout=60
    )
    assert f"(pid {pids[0]}) exited unexpectedly (signal SIGKILL); restarting it in" in server.log_text()
    wait_for(lambda: f"keymgmt.server[{replacement}]: listening on" in server.log_text(), "it to listen")
    # Only the replacement can accept: it serves a whole login.
    os.kill(pids[1], signal.SIGSTOP)
    try:
        connector = GatedConnector(server)
        async with KeymgmtClient(connector) as client:
            with anyio.fail_after(30):
                await client.register(b"after@example.org", PW)
                session = await client.login(b"after@example.org", PW)
                assert await session.list_keys() == []
        assert served_by(server, connector.ports[0]) == replacement
    finally:
        os.kill(pids[1], signal.SIGCONT)
    assert server.stop() == 0
    assert gone(replacement) and gone(pids[1])


def test_workers_that_keep_dying_stop_the_server_with_exit_code_1(tmp_path):
    directory = init_server_dir(tmp_path / "srv")
    set_workers(directory / "keymgmt-server.toml", "2")  # (server.workers in the file this time)
    server = ServerProcess(directory)
    try:
        pids = wait_for(lambda: len(worker_pids(server)) == 2 and worker_pids(server), "two workers")
        # A replacement cannot start without the OPAQUE setup: every restart dies at once.
        (directory / "server_setup.bin").unlink()
        os.kill(pids[0], signal.SIGKILL)
        assert server.proc.wait(timeout=120) == 1
        server._reader.join(timeout=5)
        log = server.log_text()
        assert "workers keep dying (6 exits within 60 s): stopping" in log
        assert log.count("restarting it in") == 5
        assert gone(pids[1])
    finally:
        if server.proc.poll() is None:
            server.kill()


def test_workers_leave_when_the_parent_is_killed(tmp_path):
    directory = init_server_dir(tmp_path / "srv")
    server = ServerProcess(directory, env={"KEYMGMT_WORKERS": "2"})  # (from the environment this time)
    pids = wait_for(lambda: len(worker_pids(server)) == 2 and worker_pids(server), "two workers")
    server.kill()  # SIGKILL: the parent cannot pass anything on
    try:
        wait_for(lambda: all(gone(pid) for pid in pids), "the workers to exit", timeout=60)
    finally:
        for pid in pids:  # (if they stay, they would outlive the test)
            with _suppress_gone():
                os.kill(pid, signal.SIGKILL)
    # (their stderr is the same pipe: the reader has their last words)
    assert "the supervising process is gone: shutting down" in server.log_text()


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory):
    return init_server_dir(tmp_path_factory.mktemp("bad") / "srv")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--workers", "0"), {}, "--workers must be a whole number from 1 to 64, not '0'"),
        (("--workers", "65"), {}, "--workers must be a whole number from 1 to 64, not '65'"),
        (("--workers", "two"), {}, "--workers must be a whole number from 1 to 64, not 'two'"),
        ((), {"KEYMGMT_WORKERS": "100"}, "server.workers must be a whole number from 1 to 64, not '100'"),
        ((), {"KEYMGMT_WORKERS": "0"}, "server.workers must be a whole number from 1 to 64, not '0'"),
    ],
)
def test_a_bad_worker_count_is_one_error_line(server_dir, monkeypatch, capsys, args, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--config", str(server_dir / "keymgmt-server.toml"), *args]) == 1
    out, err = capsys.readouterr()
    assert err == f"keymgmt-server: error: {message}\n"
    assert out == ""


def set_workers(config: Path, value: str) -> None:
    text, count = re.subn(r"(?m)^workers = 1 ", f"workers = {value} ", config.read_text())
    assert count == 1
    config.write_text(text)


def test_the_worker_flag_is_not_advertised():
    out = subprocess.run([*SERVER, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--workers N" in out
    assert "--listen-fd" not in out
