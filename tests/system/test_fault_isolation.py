"""NET-12: one connection can never end the process or harm another connection.

Each test performs the attack against a real key server on loopback TLS 1.3 (asyncio and
trio) and checks the defended outcome: the faulty connection ends alone, the fault is
logged once with its traceback and counted, other clients keep working and new ones get in.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient, KeymgmtError
from keymgmt.adapters.client.connect import tls_connector
from keymgmt.adapters.storage.base import Transaction
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import NEED_DATA, Context, ErrorCode, FrameType, ServerConnection
from keymgmt_proto.wire import Resume, ResumeEnvelope, encode_frame

from ..support.net_world import raw_login, running_server, tls_from
from ..support.server_proc import ServerProcess, init_server_dir

pytestmark = pytest.mark.anyio

PW = b"correct horse battery staple"
POISON = b"poison@example.org"


class PoisonedStorage(SQLiteStorage):
    """SQLite storage whose group commit raises an unexpected exception (not a StorageError)
    in any batch that looked up the account POISON: a bug in a storage backend."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._poisoned = False

    @contextmanager
    def transaction(self, **options: bool) -> Iterator[Transaction]:  # type: ignore[override]
        with super().transaction(**options) as tx:
            lookup = tx.get_account

            def get_account(name: bytes):
                if name == POISON:
                    self._poisoned = True
                return lookup(name)

            tx.get_account = get_account  # type: ignore[method-assign]
            yield tx

    @contextmanager
    def batch(self) -> Iterator[None]:
        with super().batch():
            yield
            if self._poisoned:
                self._poisoned = False
                raise RuntimeError("injected storage bug")


async def _alice(connect) -> tuple[KeymgmtClient, object, bytes]:
    client = KeymgmtClient(connect)
    await client.__aenter__()
    await client.register(b"alice@example.org", PW)
    session = await client.login(b"alice@example.org", PW)
    key_id = await session.import_secret(b"\x05hello")
    return client, session, key_id


def _fault_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and "internal error" in r.getMessage()]


async def test_a_raising_storage_call_ends_only_its_connection(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="keymgmt")
    storage = PoisonedStorage(tmp_path / "poisoned.db")
    async with running_server(tmp_path, storage_path=tmp_path / "unused.db") as (runtime, pki):
        runtime.storage.close()
        runtime.storage = runtime.keyserver.storage = storage
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        alice, session, key_id = await _alice(connect)
        try:
            async with KeymgmtClient(connect, reconnect_attempts=1) as attacker:
                with pytest.raises(KeymgmtError), anyio.fail_after(10):
                    await attacker.login(POISON, b"whatever password")
            # The process is up, the other connection untouched, and newcomers get in.
            alice.local_store.delete(session.user_id, key_id)
            assert await session.retrieve(key_id, Context.LOCAL_ONLY) == b"hello"
            async with KeymgmtClient(connect) as newcomer:
                later = await newcomer.login(b"alice@example.org", PW)
                assert await later.export(key_id) == b"\x05hello"
        finally:
            await alice.__aexit__(None, None, None)
        assert runtime.connection_faults == 1
        (record,) = _fault_records(caplog)
        assert record.exc_info is not None and "injected storage bug" in str(record.exc_info[1])


async def test_a_raising_core_step_ends_only_its_connection(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="keymgmt")
    original = ServerConnection._on_request

    def on_request(self, session, request_id, body):
        if body == b"boom":
            raise ValueError("injected core bug")
        return original(self, session, request_id, body)

    monkeypatch.setattr(ServerConnection, "_on_request", on_request)
    async with running_server(tmp_path) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        alice, session, key_id = await _alice(connect)
        try:
            async with KeymgmtClient(connect, reconnect_attempts=1) as attacker:
                await attacker.register(b"mallory@example.org", PW)
                mallory = await attacker.login(b"mallory@example.org", PW)
                with pytest.raises(KeymgmtError), anyio.fail_after(10):
                    await attacker.request(mallory.session_id, b"boom")
            alice.local_store.delete(session.user_id, key_id)
            assert await session.retrieve(key_id, Context.LOCAL_ONLY) == b"hello"
        finally:
            await alice.__aexit__(None, None, None)
        assert runtime.connection_faults == 1
        (record,) = _fault_records(caplog)
        assert "injected core bug" in str(record.exc_info[1])


async def test_a_resume_loop_on_one_connection_cannot_end_the_server(tmp_path):
    """The attack that stopped the server: RESUME of the session already attached to the same
    connection, in a loop. Each one is refused (UNKNOWN_SESSION) and changes nothing."""
    async with running_server(tmp_path) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"loop@example.org", PW)
        stream = await connect()
        conn, sid = await raw_login(stream, b"loop@example.org", PW)
        channel = conn._sessions[sid].channel
        frames = b"".join(
            encode_frame(
                FrameType.RESUME,
                sid + 1 + n,
                ResumeEnvelope(
                    channel.session_handle, channel.seal_resume(Resume(bytes(32), 0).encode())
                ).encode(),
            )
            for n in range(500)
        )
        await stream.send(frames)
        refused, codes = 0, []
        with anyio.fail_after(20):
            buffer = b""
            while refused < 500:
                buffer += await stream.receive()
                while len(buffer) >= 10 and len(buffer) >= 10 + int.from_bytes(buffer[6:10], "big"):
                    length = int.from_bytes(buffer[6:10], "big")
                    frame, buffer = buffer[: 10 + length], buffer[10 + length :]
                    assert frame[1] == FrameType.ABORT
                    codes.append(int.from_bytes(frame[10:12], "big"))
                    refused += 1
        # Refused as attached to this connection, until the address's token bucket (NET-13)
        # refuses the rest before even looking the session up.
        assert set(codes) == {ErrorCode.UNKNOWN_SESSION, ErrorCode.RATE_LIMITED}
        assert codes.count(ErrorCode.UNKNOWN_SESSION) <= runtime.settings.admission_burst + 5
        # The session still works on the same connection, and the server serves others.
        conn._last_session_id = sid + 500
        conn.send_request(sid, b"\x06" + bytes(16) + bytes(4) + b"\x04\x00")
        await stream.send(conn.data_to_send())
        with anyio.fail_after(10):
            while (event := conn.next_event()) is NEED_DATA:
                conn.receive_data(await stream.receive())
        assert type(event).__name__ == "ResponseReceived"
        await stream.aclose()
        # (from another address: this one has spent its handshake tokens)
        async with KeymgmtClient(await tls_from(runtime.port, pki.ca_cert, "127.0.0.2")) as client:
            await client.login(b"loop@example.org", PW)
        assert runtime.connection_faults == 0


def test_running_out_of_file_descriptors_does_not_end_the_server(tmp_path):
    """Connections that exhaust the server's file descriptors make accept() fail (EMFILE):
    the server logs it, keeps running, and serves again once they are gone."""
    directory = init_server_dir(tmp_path / "srv")
    server = ServerProcess(directory, max_open_files=48)
    try:
        flood = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(120)]
        for _ in range(200):
            if "accepting connections fails" in server.log_text():
                break
            time.sleep(0.05)
        assert "accepting connections fails" in server.log_text()
        assert server.proc.poll() is None  # still running
        for sock in flood:
            sock.close()
        env = {
            **os.environ,
            "KEYMGMT_SERVER": f"127.0.0.1:{server.port}",
            "KEYMGMT_CA": str(directory / "ca.pem"),
            "KEYMGMT_ACCOUNT": "after@example.org",
            "KEYMGMT_LOCAL_STORE": str(tmp_path / "local.db"),
        }
        result = subprocess.run(
            [sys.executable, "-m", "keymgmt.adapters.cli.client", "register"],
            input="a long enough password\n",
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert server.proc.poll() is None
    finally:
        server.stop()
