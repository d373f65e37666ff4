"""Group commit: a run of events is one transaction; nothing is answered before it commits.

The storage side (savepoints inside one batch) is in tests/storage/test_storage_backends.py.
"""

from __future__ import annotations

from contextlib import contextmanager

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient, KeymgmtError
from keymgmt.adapters.server.driver import serve_stream
from keymgmt.adapters.storage.base import StorageError
from keymgmt.adapters.testing.streams import memory_stream_pair
from keymgmt_proto import Action, AuditType, Op

from ..support.keyserver_world import SETUP, key_server

PW = b"correct horse battery staple"


@pytest.mark.anyio
async def test_nothing_is_acknowledged_when_the_group_commit_fails(tmp_path):
    """The commit of the batch holding a STORE fails. The client must not get the store
    acknowledged, not even after it reconnects and resumes (a resumed session must not
    replay an answer that was never committed)."""
    async with key_server(tmp_path) as world:
        storage, keyserver = world.storage, world.keyserver
        real_batch, real_answer = storage.batch, keyserver.answer
        fail = {"store": False}

        def answer(session, user_id, body, *, registrar=None, credentials=None):
            if body[:1] == bytes([Op.STORE_SECRET]):
                fail["store"] = True
            return real_answer(session, user_id, body, registrar=registrar, credentials=credentials)

        @contextmanager
        def failing_batch():
            with real_batch():
                yield
                if fail["store"]:
                    fail["store"] = False
                    raise StorageError("disk full at commit")

        storage.batch, keyserver.answer = failing_batch, answer

        async def connect():
            client_end, server_end = memory_stream_pair()
            world.task_group.start_soon(serve_stream, server_end, SETUP, keyserver, world.registry)
            return client_end

        async with KeymgmtClient(connect) as client:
            await client.register(b"fragile@example.org", PW)
            session = await client.login(b"fragile@example.org", PW)
            with pytest.raises(KeymgmtError), anyio.fail_after(10):
                await session.generate()
            assert client.connection_count == 2  # it did reconnect and try to resume
            fresh = await client.login(b"fragile@example.org", PW)
            assert await fresh.list_keys() == []
            generated = [e for e in await fresh.audit(AuditType.KEY_ONLY) if e.action is Action.GENERATE]
            assert generated == []


@pytest.fixture(params=["sqlite", "postgres"])
def backend_storage(request, tmp_path):
    if request.param == "sqlite":
        from keymgmt.adapters.storage.sqlite import SQLiteStorage

        storage = SQLiteStorage(tmp_path / "ks.db")
        yield storage
        storage.close()
        return
    from keymgmt.adapters.storage.postgres import PostgresStorage

    from ..support.pg import schema_fixture

    fixture = schema_fixture()
    conninfo, schema = next(fixture)
    storage = PostgresStorage(conninfo, schema=schema)
    yield storage
    storage.close()
    next(fixture, None)


def test_a_failed_batch_after_the_connection_failed_sends_nothing_and_resumes_nothing(backend_storage):
    """One read holds a request and then GOAWAY: the connection fails (detaching the session)
    inside the same batch whose commit then fails. Nothing may be sent, and the session,
    whose reply cache holds the uncommitted answer, must not be resumable anywhere."""
    import os

    from keymgmt.adapters import InMemoryPair
    from keymgmt.adapters.server.app import KeyServer
    from keymgmt_proto import (
        NEED_DATA,
        ClientConnection,
        CreateKeyIdRequest,
        ErrorCode,
        SecretKind,
        ServerConnection,
        SessionFailed,
        SessionRegistry,
        session_sealing_key,
    )

    from ..support.helpers import login, register

    storage = backend_storage
    keyserver = KeyServer(storage)

    def registry():
        return SessionRegistry(
            store=storage.session_store, sealing_key=session_sealing_key(SETUP.to_bytes()), random=os.urandom
        )

    pair = InMemoryPair(
        ClientConnection(os.urandom),
        ServerConnection(SETUP, os.urandom, registry=registry(), now=0.0),
        keyserver,
        now=0.0,
    )
    register(pair, b"abandon@example.org")
    established = login(pair, b"abandon@example.org")
    pair.client.send_request(
        established.session_id,
        CreateKeyIdRequest(established.user_id, SecretKind.GENERATED, bytes(32)).encode(),
    )
    pair.client.close()  # GOAWAY right behind the request, in the same read
    server = pair.server
    server.receive_data(pair.client.data_to_send(), 1.0)
    with pytest.raises(StorageError), storage.batch():
        while (event := server.next_event()) is not NEED_DATA:
            keyserver(server, event)
        raise StorageError("the commit fails")
    server.abandon()
    assert server.data_to_send() == b""  # not even the answer produced before the failure
    (detached,) = pair.client.take_detached_sessions()
    other = InMemoryPair(
        ClientConnection(os.urandom),
        ServerConnection(SETUP, os.urandom, registry=registry(), now=0.0),
        keyserver,
        now=0.0,
    )
    other.client.resume_session(detached)
    failed = [e for e in other.pump() if isinstance(e, SessionFailed)]
    assert [f.code for f in failed] == [ErrorCode.UNKNOWN_SESSION]


def test_a_failing_session_store_keeps_the_session_in_memory():
    import os

    from keymgmt.adapters import InMemoryPair, MemoryServerApp
    from keymgmt_proto import ClientConnection, ServerConnection, SessionRegistry, SessionResumed

    from ..support.helpers import login, register

    class BrokenStore:
        def save(self, handle, sealed_state, expires_at, user_id=None, credentials_version=None):
            raise StorageError("database is locked")

        def claim(self, handle):
            raise StorageError("database is locked")

    registry = SessionRegistry(store=BrokenStore(), sealing_key=bytes(32), random=os.urandom)
    app = MemoryServerApp()
    pair = InMemoryPair(
        ClientConnection(os.urandom),
        ServerConnection(SETUP, os.urandom, registry=registry, now=0.0),
        app,
        now=0.0,
    )
    register(pair, b"kept")
    login(pair, b"kept")
    pair.client.connection_lost()
    pair.server.connection_lost()  # the save fails: no exception, the session stays here
    pair.pump()
    (detached,) = pair.client.take_detached_sessions()
    again = InMemoryPair(
        ClientConnection(os.urandom),
        ServerConnection(SETUP, os.urandom, registry=registry, now=0.0),
        app,
        now=0.0,
    )
    again.client.resume_session(detached)
    assert any(isinstance(e, SessionResumed) for e in again.pump())


def test_abandon_leaves_alone_a_session_that_has_moved_to_another_connection():
    """A session left connection A with a request pending (an application that answers
    later) and was resumed on B; a failed commit on A then abandons A. The session belongs
    to B now: it must go on there."""
    import os
    import random

    from keymgmt.adapters import InMemoryPair, MemoryServerApp
    from keymgmt_proto import (
        ClientConnection,
        RequestReceived,
        ResponseReceived,
        ServerConnection,
        SessionRegistry,
        SessionResumed,
    )

    from ..support.helpers import only

    registry, base, held = SessionRegistry(), MemoryServerApp(), []

    def app(conn, event):
        if isinstance(event, RequestReceived) and event.body == b"slow":
            held.append(event)  # answered later
            return
        base(conn, event)

    def pair():
        server = ServerConnection(SETUP, os.urandom, registry=registry, now=0.0)
        return InMemoryPair(ClientConnection(os.urandom), server, app, rng=random.Random(0), now=0.0)

    first = pair()
    first.client.open_registration(b"mover", b"pw")
    first.pump()
    sid = first.client.open_request_session(b"mover", b"pw")
    first.pump()
    first.client.send_request(sid, b"slow")
    first.pump()
    first.client.connection_lost()  # the client gives up on A; A's side is still up
    first.pump()
    (detached,) = first.client.take_detached_sessions()
    second = pair()
    new_sid = second.client.resume_session(detached)
    only(second.pump(), SessionResumed)
    first.server.abandon()
    second.client.send_request(new_sid, b"ping")
    assert only(second.pump(), ResponseReceived).body == b"ping"


@pytest.mark.anyio
async def test_other_connections_are_read_while_a_commit_is_slow(tmp_path):
    """A commit that takes long (a slow fsync) runs in a worker thread: meanwhile the event
    loop goes on reading the other connections' frames, and the commit's own answer is
    held until it has committed. With the commit on the event loop, nothing would be read
    until it finished."""
    import threading

    from keymgmt.adapters.testing.streams import MemoryByteStream

    async with key_server(tmp_path) as world:
        storage = world.storage
        real_batch = storage.batch
        state = {"slow": False, "committing": False, "read_meanwhile": 0}
        blocked, release = threading.Event(), threading.Event()

        @contextmanager
        def slow_batch():
            with real_batch():
                yield
                if state["slow"]:
                    state["slow"], state["committing"] = False, True
                    blocked.set()
                    release.wait(10)  # bounded: a broken server fails the test, never hangs it
                    state["committing"] = False

        storage.batch = slow_batch

        class Counting(MemoryByteStream):
            async def receive(self, max_bytes: int = 65536) -> bytes:
                data = await super().receive(max_bytes)
                if state["committing"]:
                    state["read_meanwhile"] += len(data)
                return data

        async def connect():
            client_end, server_end = memory_stream_pair()
            counted = Counting(server_end._send, server_end._receive)
            world.task_group.start_soon(serve_stream, counted, SETUP, world.keyserver, world.registry)
            return client_end

        async with KeymgmtClient(connect) as first, KeymgmtClient(connect) as second:
            await first.register(b"slow@example.org", PW)
            one = await first.login(b"slow@example.org", PW)
            two = await second.login(b"slow@example.org", PW)
            key_id = await one.import_secret(b"\x03abc")
            answers: dict[str, object] = {}

            async def ask(name: str, session) -> None:
                answers[name] = await session.list_keys()

            async with anyio.create_task_group() as tg:
                state["slow"] = True
                tg.start_soon(ask, "first", one)
                with anyio.fail_after(10):
                    while not blocked.is_set():
                        await anyio.sleep(0.005)
                tg.start_soon(ask, "second", two)
                with anyio.fail_after(10):
                    while state["read_meanwhile"] == 0:
                        await anyio.sleep(0.005)
                assert state["committing"]  # still committing: the second request was read meanwhile
                assert answers == {}  # and the first answer waits for its commit
                release.set()
            assert [k.key_id for k in answers["first"]] == [key_id]
            assert [k.key_id for k in answers["second"]] == [key_id]
