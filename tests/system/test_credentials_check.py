"""Sessions held by one key-server instance end within ``sessions.credentials_check`` seconds
after the account's password changed, or the account was deleted, through another instance,
even when they send nothing (review of issue 16, gap 1: they ended only at their next request,
and a client answering from its local store never makes one).

Two real ``keymgmt-server serve`` processes on one database: the SQLite file, or one
PostgreSQL schema.
"""

from __future__ import annotations

import time

import anyio
import pytest

from keymgmt.adapters.client.async_client import SESSION_REVOKED, KeymgmtClient, SessionEndedError
from keymgmt.adapters.client.connect import tls_connector
from keymgmt_proto import Context, ErrorCode

from ..support.pg import schema_fixture
from ..support.server_proc import ServerProcess, init_server_dir

pytestmark = pytest.mark.anyio
PW, NEW_PW = b"correct horse battery staple", b"a new horse battery staple"


@pytest.fixture
def anyio_backend() -> str:
    """The servers are processes of their own: the client's event loop does not matter here."""
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgres"])
def two_instances(request, tmp_path):
    """Instance A (no periodic check: only its own sessions end at once) and instance B
    (checks every 0.3 s), on one database."""
    env: dict[str, str] = {}
    fixture = None
    if request.param == "postgres":
        fixture = schema_fixture()
        conninfo, schema = next(fixture)
        env = {"KEYMGMT_DATABASE_URL": conninfo, "KEYMGMT_DATABASE_SCHEMA": schema}
    directory = init_server_dir(tmp_path / "srv")
    first = ServerProcess(directory, env={**env, "KEYMGMT_CREDENTIALS_CHECK": "0"})
    second = ServerProcess(directory, env={**env, "KEYMGMT_CREDENTIALS_CHECK": "0.3"})
    yield first, second, directory
    for process in (first, second):
        if process.proc.poll() is None:
            process.stop()
    if fixture is not None:
        next(fixture, None)


def _client(directory, port: int) -> KeymgmtClient:
    connect = tls_connector("127.0.0.1", port, cafile=directory / "ca.pem", server_hostname="localhost")
    return KeymgmtClient(connect, reconnect_attempts=1)


async def _ended_without_a_request(client: KeymgmtClient, session) -> None:
    """Until the key server's CLOSE has reached the client (the session sent nothing)."""
    with anyio.fail_after(15):
        while session.session_id not in client._ended:
            await anyio.sleep(0.05)


def _wait_for_line(server: ServerProcess, line: str) -> None:
    deadline = time.monotonic() + 10
    while line not in server.log_text():
        assert time.monotonic() < deadline, f"{line!r} not in the log:\n{server.log_text()}"
        time.sleep(0.05)


async def test_an_idle_session_on_another_instance_ends_after_a_password_change_or_deletion(two_instances):
    first, second, directory = two_instances
    name = b"idle@example.org"
    async with _client(directory, first.port) as on_a, _client(directory, second.port) as on_b:
        await on_a.register(name, PW)
        idle = await on_b.login(name, PW)
        key_id = await idle.generate()  # kept in on_b's local store: reads need no request
        assert await idle.retrieve(key_id, Context.LOCAL_ONLY)

        await on_a.change_password(name, PW, NEW_PW)
        await _ended_without_a_request(on_b, idle)
        _wait_for_line(second, "ended a session whose account changed its password elsewhere")
        with pytest.raises(SessionEndedError) as ended:
            await idle.retrieve(key_id, Context.LOCAL_ONLY)  # not even from the local store
        assert str(ended.value) == SESSION_REVOKED and ended.value.code is ErrorCode.NOT_AUTHORIZED

        # A session with the new password is not touched by the check; the deletion ends it.
        fresh = await on_b.login(name, NEW_PW)
        await anyio.sleep(1.0)  # a few checks
        assert await fresh.retrieve(key_id, Context.LOCAL_ONLY)
        await on_a.delete_account(name, NEW_PW)
        await _ended_without_a_request(on_b, fresh)
        _wait_for_line(second, "ended a session whose account was deleted elsewhere")
        with pytest.raises(SessionEndedError) as ended:
            await fresh.retrieve(key_id, Context.LOCAL_ONLY)
        assert str(ended.value) == SESSION_REVOKED


async def test_the_session_that_changed_the_password_goes_on_on_an_instance_that_checks(two_instances):
    """The check ends only sessions holding an older version: the changing session moved on."""
    _, second, directory = two_instances
    name = b"changer@example.org"
    async with _client(directory, second.port) as on_b:
        await on_b.register(name, PW)
        session = await on_b.login(name, PW)
        await session.change_password(NEW_PW)
        await anyio.sleep(1.0)  # a few checks
        assert session.session_id not in on_b._ended
        assert await session.list_keys() == []
    assert "ended a session whose account" not in second.log_text()


async def test_an_in_memory_database_ends_no_session_at_the_check(tmp_path) -> None:
    """A storage that only this process can use (SQLite ``:memory:``) has no other instance
    to change credentials behind its back: the check must not read its missing rows as
    deleted accounts and end every session."""
    from pathlib import Path

    from ..support.net_world import running_server

    async with running_server(tmp_path, storage_path=Path(":memory:"), credentials_check=0.05) as (
        runtime,
        pki,
    ):
        assert runtime.port is not None
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert, server_hostname="localhost")
        async with KeymgmtClient(connect, reconnect_attempts=1) as client:
            await client.register(b"mem@example.org", PW)
            session = await client.login(b"mem@example.org", PW)
            key_id = await session.generate()
            await anyio.sleep(0.4)  # eight checks
            assert await session.retrieve(key_id, Context.NULL) is None
