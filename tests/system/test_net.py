"""End to end over real loopback TLS 1.3, on asyncio and on trio (NET-1, NET-2, NET-3)."""

from __future__ import annotations

import logging
import os
import ssl

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient, SessionEndedError
from keymgmt.adapters.client.connect import TLSConnectError, tls_connector
from keymgmt.adapters.tls import client_context, generate_dev_pki
from keymgmt_proto import (
    NEED_DATA,
    Action,
    AuditType,
    ClientConnection,
    ConnectionFailed,
    Context,
    ErrorCode,
    ServerConfig,
    SessionResumed,
)

from ..support.net_world import Proxy, raw_login, running_server, tls_from

pytestmark = pytest.mark.anyio

PW = b"correct horse battery staple"


async def test_full_flow_over_tls(tmp_path):
    async with running_server(tmp_path) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            user_id = await client.register(b"alice@example.org", PW)
            session = await client.login(b"alice@example.org", PW)
            assert session.user_id == user_id
            key_id = await session.generate()
            client.local_store.delete(user_id, key_id)
            assert len(await session.retrieve(key_id, Context.LOCAL_ONLY)) == 32
            imported = await session.import_secret(b"\x03abc")
            assert await session.export(imported) == b"\x03abc"
            assert len(await session.list_keys()) == 2
            await session.logout()
        assert runtime.connections_served == 1


async def test_many_users_share_one_connection(tmp_path):
    async with running_server(tmp_path) as (runtime, pki):
        connect = tls_connector("localhost", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            names = [f"user{i}@example.org".encode() for i in range(4)]
            for name in names:
                await client.register(name, PW)
            sessions = [await client.login(name, PW) for name in names for _ in range(2)]
            results: dict[int, bytes] = {}

            async def work(index, session):
                key_id = await session.import_secret(bytes([1, index]))
                results[index] = await session.retrieve(key_id, Context.LOCAL_ONLY)

            async with anyio.create_task_group() as tg:
                for index, session in enumerate(sessions):
                    tg.start_soon(work, index, session)
            assert results == {i: bytes([i]) for i in range(len(sessions))}
            assert len({s.user_id for s in sessions}) == 4
        assert runtime.connections_served == 1


async def test_killed_connection_resumes_and_answers_the_in_flight_request_once(tmp_path):
    async with running_server(tmp_path) as (runtime, pki), anyio.create_task_group() as tg:
        proxy = Proxy(runtime.port)
        await tg.start(proxy.run)
        connect = tls_connector("127.0.0.1", proxy.port, cafile=pki.ca_cert, server_hostname="localhost")
        async with KeymgmtClient(connect) as client:
            await client.register(b"resume@example.org", PW)
            session = await client.login(b"resume@example.org", PW)
            await session.list_keys()
            proxy.cut_next_response = True  # the server gets the request; its answer dies
            with anyio.fail_after(10):
                assert await session.list_keys() == []
            assert client.connection_count == 2
            assert proxy.connections == 2
            entries = await session.audit(AuditType.ALL)
            assert [e.action for e in entries].count(Action.LOGIN) == 1  # no second OPAQUE login
            assert [e.action for e in entries].count(Action.LIST_KEYS) == 2  # answered once each
        tg.cancel_scope.cancel()


async def test_refused_tls_versions_and_untrusted_servers(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="keymgmt.server")
    async with running_server(tmp_path) as (runtime, pki):
        # A TLS 1.2 client.
        old = client_context(pki.ca_cert)
        old.minimum_version = ssl.TLSVersion.TLSv1_2
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(TLSConnectError, match="handshake"):
            await tls_connector("127.0.0.1", runtime.port, context=old)()
        # A client that trusts another CA.
        other = generate_dev_pki(tmp_path / "other")
        with pytest.raises(TLSConnectError, match="not trusted"):
            await tls_connector("127.0.0.1", runtime.port, cafile=other.ca_cert)()
        # A wrong host name.
        with pytest.raises(TLSConnectError, match="not trusted"):
            await tls_connector(
                "127.0.0.1", runtime.port, cafile=pki.ca_cert, server_hostname="evil.example"
            )()
        # Plain TCP speaking the keymgmt protocol without TLS.
        plain = await anyio.connect_tcp("127.0.0.1", runtime.port)
        await plain.send(b"\x01\x04\x00\x00\x00\x01\x00\x00\x00\x00")
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)), anyio.fail_after(5):
            while True:
                await plain.receive()
        await plain.aclose()
        await anyio.sleep(0.1)
    failures = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    # One line per kind of failure within 10 s (a flood of refusals is not a flood of lines):
    # the two certificate refusals both look like a closed connection to the server.
    assert any("UNSUPPORTED_PROTOCOL" in f for f in failures), failures
    assert any("WRONG_VERSION_NUMBER" in f for f in failures), failures
    assert sum("connection closed" in f for f in failures) == 1, failures
    assert runtime.connections_served == 0


async def test_the_client_refuses_a_server_that_offers_only_tls_1_2(tmp_path):
    """NET-1 from the client's side: a server (an impostor, a misconfigured proxy) that
    cannot speak TLS 1.3 gets no handshake from the client, even with a trusted
    certificate."""
    from anyio.streams.tls import TLSListener

    pki = generate_dev_pki(tmp_path / "pki")
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_cert_chain(pki.server_cert, pki.server_key)
    listener = TLSListener(await anyio.create_tcp_listener(local_host="127.0.0.1"), old)
    port = listener.listener.extra(anyio.abc.SocketAttribute.local_port)
    handshakes: list[str] = []

    async def serve(stream) -> None:
        handshakes.append(stream.extra(anyio.streams.tls.TLSAttribute.tls_version))
        await stream.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        with pytest.raises(TLSConnectError, match="handshake"):
            await tls_connector("127.0.0.1", port, cafile=pki.ca_cert)()
        tg.cancel_scope.cancel()
    assert handshakes == []


async def test_sessions_expire_on_the_servers_clock(tmp_path):
    config = ServerConfig(idle_timeout=0.3)
    async with running_server(tmp_path, protocol=config) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"idle@example.org", PW)
            session = await client.login(b"idle@example.org", PW)
            await anyio.sleep(0.8)
            with pytest.raises(SessionEndedError, match="idle timeout"):
                await session.list_keys()


async def test_connection_limit(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="keymgmt.server")
    async with running_server(tmp_path, max_connections=1) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect, reconnect_attempts=1) as first:
            await first.register(b"first@example.org", PW)
            with pytest.raises(TLSConnectError):
                await connect()
    assert any("connection limit" in r.getMessage() for r in caplog.records)


async def test_graceful_shutdown_lets_sessions_go_and_closes_storage(tmp_path):
    async with (
        running_server(tmp_path) as (runtime, pki),
        KeymgmtClient(
            tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert), reconnect_attempts=1
        ) as client,
    ):
        await client.register(b"bye@example.org", PW)
        session = await client.login(b"bye@example.org", PW)
        await session.list_keys()
        runtime.shutdown()
        with anyio.fail_after(5):
            while runtime._drivers:
                await anyio.sleep(0.01)
        with pytest.raises(Exception) as failure:
            await session.list_keys()
        assert "reconnect" in str(failure.value) or "lost" in str(failure.value)


async def test_a_connection_whose_session_resumed_elsewhere_is_closed_when_idle_not_at_the_session_deadline(
    tmp_path,
):
    """A session resumes on a second connection while the first stays open (only the client
    gave up on it). The first connection's driver sleeps until the session's deadline (here
    300 s); the move wakes it (SessionRegistry.take_woken), so the now empty connection is
    closed after connection_idle_timeout instead of holding a connection slot for minutes."""
    config = ServerConfig(connection_idle_timeout=1.0, idle_timeout=300.0)
    async with running_server(tmp_path, protocol=config) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"mover", PW)
        first = await tls_from(runtime.port, pki.ca_cert)
        conn, _sid = await raw_login(first, b"mover", PW)
        conn.connection_lost()  # the client alone gives up on the first connection
        (detached,) = conn.take_detached_sessions()
        second = await tls_from(runtime.port, pki.ca_cert)
        conn2 = ClientConnection(os.urandom)
        conn2.resume_session(detached)
        await second.send(conn2.data_to_send())
        with anyio.fail_after(10):
            while not isinstance(event := conn2.next_event(), SessionResumed):
                assert event is NEED_DATA, event
                conn2.receive_data(await second.receive())
        # The first connection now carries no session: GOAWAY(IDLE_TIMEOUT) within about 1 s.
        watcher = ClientConnection(os.urandom)
        with anyio.fail_after(8):
            while not isinstance(event := watcher.next_event(), ConnectionFailed):
                assert event is NEED_DATA, event
                watcher.receive_data(await first.receive())
        assert event.code is ErrorCode.IDLE_TIMEOUT and event.remote
        await anyio.aclose_forcefully(first)
        await anyio.aclose_forcefully(second)


async def test_an_idle_server_takes_no_write_lock(tmp_path):
    """With nothing to expire, the background expiry runs no batch: a batch takes the
    database's write lock (BEGIN IMMEDIATE), which every other worker or instance sharing
    the file would wait on, and a stopped process holding it would block them all."""
    async with running_server(tmp_path) as (runtime, pki):
        await anyio.sleep(2.5)  # the expiry task wakes once a second
        assert runtime.committer.batches == 0
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"idle@example.org", b"correct horse battery staple")
        assert runtime.committer.batches > 0  # (the count does count)
