"""Several key-server processes sharing one PostgreSQL database (issue #8).

Both instances are real ``keymgmt-server serve`` processes with the same OPAQUE
setup and certificates, on their own ports, and ``KEYMGMT_DATABASE_URL`` set.
"""

from __future__ import annotations

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.client.connect import tls_connector
from keymgmt_proto import Action, AuditType, Context

from ..support.net_world import Proxy
from ..support.pg import schema_fixture
from ..support.server_proc import ServerProcess, init_server_dir

pytestmark = pytest.mark.anyio
PW = b"correct horse battery staple"


@pytest.fixture
def shared_database():
    yield from schema_fixture()


@pytest.fixture
def two_instances(tmp_path, shared_database):
    conninfo, schema = shared_database
    directory = init_server_dir(tmp_path / "srv")
    env = {"KEYMGMT_DATABASE_URL": conninfo, "KEYMGMT_DATABASE_SCHEMA": schema}
    first = ServerProcess(directory, env=env)
    second = ServerProcess(directory, env=env)
    yield first, second, directory
    for process in (first, second):
        if process.proc.poll() is None:
            process.stop()


async def test_a_session_resumes_on_the_other_instance(two_instances):
    first, second, directory = two_instances
    async with anyio.create_task_group() as tg:
        proxy = Proxy(first.port)
        await tg.start(proxy.run)
        connect = tls_connector(
            "127.0.0.1", proxy.port, cafile=directory / "ca.pem", server_hostname="localhost"
        )
        async with KeymgmtClient(connect, reconnect_attempts=10) as client:
            await client.register(b"nomad@example.org", PW)
            session = await client.login(b"nomad@example.org", PW)
            key_id = await session.import_secret(b"\x04abcd")
            # Instance one shuts down: its sessions go to the database, the client is told
            # GOAWAY and reconnects; the proxy now leads to instance two.
            proxy.target_port = second.port
            assert first.stop() == 0
            client.local_store.delete(session.user_id, key_id)
            with anyio.fail_after(20):
                assert await session.retrieve(key_id, Context.LOCAL_ONLY) == b"abcd"
            assert client.connection_count == 2
            entries = await session.audit(AuditType.ALL)
            assert [e.action for e in entries].count(Action.LOGIN) == 1  # no second OPAQUE login
        tg.cancel_scope.cancel()
    assert "connection from" in second.log_text()


async def test_a_cut_connection_resumes_on_the_other_instance_and_answers_once(two_instances):
    first, second, directory = two_instances
    async with anyio.create_task_group() as tg:
        proxy = Proxy(first.port, connect_delay=0.5)  # the first instance needs a moment to notice
        await tg.start(proxy.run)
        connect = tls_connector(
            "127.0.0.1", proxy.port, cafile=directory / "ca.pem", server_hostname="localhost"
        )
        async with KeymgmtClient(connect, reconnect_attempts=10) as client:
            await client.register(b"cut@example.org", PW)
            session = await client.login(b"cut@example.org", PW)
            await session.list_keys()
            proxy.target_port = second.port
            proxy.cut_next_response = True  # instance one answers; the answer dies with the link
            with anyio.fail_after(20):
                assert await session.list_keys() == []
            entries = await session.audit(AuditType.ALL)
            actions = [e.action for e in entries]
            assert actions.count(Action.LOGIN) == 1
            assert actions.count(Action.LIST_KEYS) == 2  # each request answered (and run) once
        tg.cancel_scope.cancel()


async def test_two_instances_store_for_the_same_user_at_once(two_instances):
    first, second, directory = two_instances
    ca = directory / "ca.pem"
    per_client = 15

    async with (
        KeymgmtClient(tls_connector("127.0.0.1", first.port, cafile=ca, server_hostname="localhost")) as one,
        KeymgmtClient(tls_connector("127.0.0.1", second.port, cafile=ca, server_hostname="localhost")) as two,
    ):
        await one.register(b"busy@example.org", PW)
        sessions = [await one.login(b"busy@example.org", PW), await two.login(b"busy@example.org", PW)]
        stored: list[bytes] = []

        async def store(session) -> None:
            for n in range(per_client):
                stored.append(await session.import_secret(bytes([1, n])))

        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(store, session)
        listed = {info.key_id for info in await sessions[1].list_keys()}
        assert len(stored) == len(set(stored)) == 2 * per_client
        assert listed == set(stored)
        entries = await sessions[0].audit(AuditType.KEY_ONLY)
        imports = [e for e in entries if e.action is Action.IMPORT]
        assert {e.key_id for e in imports} == set(stored)
        everything = await sessions[0].audit(AuditType.ALL)
        assert [e.entry_id for e in everything] == list(range(1, len(everything) + 1))
