"""A few bytes of requests can ask for megabytes of answers: a RETRIEVE of a 64 KiB secret is a
72-byte frame and its answer about 65,700 bytes. The server answers every request of a batch
at once, so without a bound one batch of pipelined RETRIEVEs (a few hundred KiB of input,
across a few sessions) queued hundreds of megabytes of output for one connection; a peer
that then read slowly kept them in the server's memory, and a few such connections ended the
process (1.2 GB of RSS from one connection and 345 KB of requests, measured). The driver now
stops taking frames once ``max_output`` bytes wait to be sent, sends them, and goes on with
the rest without waiting for more input; what it leaves in the core counts against
``max_unprocessed``, so the reader takes in no more meanwhile. A turn also handles at most
``max_events`` events, so that one connection cannot hold up the rest of the batch.

The real process, over TLS (the batched path), is attacked in
tests/system/test_flood.py::test_pipelined_retrieves_of_a_big_secret_leave_memory_bounded."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager

import anyio
import pytest

from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.server.driver import ConnectionDriver
from keymgmt.adapters.testing.streams import MemoryByteStream, memory_stream_pair
from keymgmt_proto import (
    NEED_DATA,
    REPLY_CACHE_BYTES,
    Action,
    AuditType,
    ClientConnection,
    ConnectionFailed,
    Context,
    DeleteKeyRequest,
    ErrorCode,
    OpaqueStepRequired,
    Outcome,
    RequestReceived,
    ResponseReceived,
    RetrieveRequest,
    ServerConfig,
    SessionEstablished,
)

from ..support.helpers import PASSWORD
from ..support.keyserver_world import SETUP, key_server
from ..support.net_world import raw_login

ACCOUNT = b"pipeline@example.org"
#: The long portable form of a 64 KiB secret (protocol.md section 12.7).
BIG = b"\x00\x01" + (65536).to_bytes(4, "big") + os.urandom(65536)
COUNT = 300  # about 21 KB of requests for about 20 MB of answers


class _Recording(MemoryByteStream):
    """The server's end of the pipe, noting the largest single send."""

    def __init__(self, end: MemoryByteStream) -> None:
        super().__init__(end._send, end._receive)
        self.largest = 0

    async def send(self, item: bytes) -> None:
        self.largest = max(self.largest, len(item))
        await super().send(item)


@pytest.mark.anyio
async def test_pipelined_big_answers_go_out_a_bounded_amount_at_a_time(tmp_path):
    max_output, max_unprocessed, receive_size = 200_000, 4096, 1024
    async with key_server(tmp_path) as world:
        async with world.client() as client:
            user_id = await client.register(ACCOUNT, PASSWORD)
            session = await client.login(ACCOUNT, PASSWORD)
            key_id = await session.import_secret(BIG)
            await session.logout()
        client_end, server_end = memory_stream_pair(buffer=2)
        recording = _Recording(server_end)
        driver = ConnectionDriver(
            recording,
            SETUP,
            world.keyserver,
            world.registry,
            max_output=max_output,
            max_unprocessed=max_unprocessed,
            receive_size=receive_size,
        )
        world.task_group.start_soon(driver.run)
        conn, sid = await raw_login(client_end, ACCOUNT, PASSWORD)
        conn.max_requests_in_flight = COUNT
        body = RetrieveRequest(user_id, key_id, Context.LOCAL_ONLY).encode()
        for _ in range(COUNT):
            conn.send_request(sid, body)
        requests = conn.data_to_send()
        assert len(requests) == 72 * COUNT
        await client_end.send(requests)  # and nothing more: the server goes on by itself
        answered, held = 0, 0
        with anyio.fail_after(60):
            while answered < COUNT:
                conn.receive_data(await client_end.receive())
                held = max(held, driver.conn.pending_input)
                while (event := conn.next_event()) is not NEED_DATA:
                    assert isinstance(event, ResponseReceived), event
                    assert event.body[:2] == b"\x00\x02"  # OK, an imported secret
                    answered += 1
        # One send holds at most max_output bytes and the answer that passed it.
        assert recording.largest <= max_output + 66_000, recording.largest
        # Frames left for later count against max_unprocessed: the reader waited for room.
        assert held <= max_unprocessed + receive_size, held
        await client_end.aclose()


@pytest.mark.anyio
async def test_reply_caches_of_big_answers_stay_bounded(tmp_path):
    """An authenticated user opens sessions on one connection and has each retrieve its 64 KiB
    secret 16 times, reading every answer: what the server keeps afterwards for re-sends
    does not grow by a 64 KiB answer per request (before the fix, measured on a real
    process: 64 sessions kept 65 MiB of RSS, and 67 MB in the detached_sessions table after
    the connection closed). The sealed state stays as small: tests/core/test_reply_cache.py."""
    sessions, per_session = 4, 16
    async with key_server(tmp_path) as world:
        async with world.client() as client:
            user_id = await client.register(ACCOUNT, PASSWORD)
            session = await client.login(ACCOUNT, PASSWORD)
            key_id = await session.import_secret(BIG)
            await session.logout()
        client_end, server_end = memory_stream_pair()
        world.task_group.start_soon(ConnectionDriver(server_end, SETUP, world.keyserver, world.registry).run)
        conn, first = await raw_login(client_end, ACCOUNT, PASSWORD)
        sids = [first]
        while len(sids) < sessions:
            sids.append(conn.open_request_session(ACCOUNT, PASSWORD))
            while not isinstance(event := conn.next_event(), SessionEstablished):
                if event is NEED_DATA:
                    await client_end.send(conn.data_to_send())
                    conn.receive_data(await client_end.receive())
                elif isinstance(event, OpaqueStepRequired):
                    conn.complete_opaque_step(event.run(conn.opaque))
        body = RetrieveRequest(user_id, key_id, Context.LOCAL_ONLY).encode()
        for sid in sids:
            for _ in range(per_session):
                conn.send_request(sid, body)
        await client_end.send(conn.data_to_send())
        answered = 0
        with anyio.fail_after(60):
            while answered < sessions * per_session:
                conn.receive_data(await client_end.receive())
                while (event := conn.next_event()) is not NEED_DATA:
                    assert isinstance(event, ResponseReceived), event
                    answered += 1
        kept = [s for s in world.registry._sessions.values() if s.answered]
        assert len(kept) == sessions  # each remembers its answered requests...
        cached = sum(len(answer) for s in kept for answer in s.answered.values() if answer is not None)
        # ... but not their 64 KiB answers: each is a read, run again if re-sent (protocol.md 9).
        assert cached <= sessions * REPLY_CACHE_BYTES, f"{cached} bytes kept by {sessions} sessions"
        assert all(s.answered_bytes <= REPLY_CACHE_BYTES for s in kept)
        await client_end.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("budget", [REPLY_CACHE_BYTES, 0])
async def test_a_re_sent_retrieve_runs_again_and_a_re_sent_delete_does_not(tmp_path, budget):
    """protocol.md section 9 on the key server: a RETRIEVE of a 64 KiB secret and a DELETE_KEY
    are answered, and both answers are lost with the connection. After the resumption the
    client re-sends both: the RETRIEVE, whose answer was not kept, runs again (the owner's log
    shows two RETRIEVE entries for one call), and the DELETE_KEY gets its kept answer (OK, not
    the NOT_FOUND a second run would give; one DELETE_KEY entry), also when no read's answer
    is kept at all (``reply_cache_bytes`` 0)."""
    async with key_server(tmp_path, ServerConfig(reply_cache_bytes=budget)) as world:
        async with world.client() as client:
            user_id = await client.register(ACCOUNT, PASSWORD)
            session = await client.login(ACCOUNT, PASSWORD)
            key_id = await session.import_secret(BIG)
            doomed = await session.import_secret(b"\x03abc")
            await session.logout()
        client_end, server_end = memory_stream_pair()
        world.task_group.start_soon(ConnectionDriver(server_end, SETUP, world.keyserver, world.registry).run)
        conn, sid = await raw_login(client_end, ACCOUNT, PASSWORD)
        retrieve = conn.send_request(sid, RetrieveRequest(user_id, key_id, Context.LOCAL_ONLY).encode())
        delete = conn.send_request(sid, DeleteKeyRequest(user_id, doomed).encode())
        await client_end.send(conn.data_to_send())
        lost = b""
        with anyio.fail_after(30):
            while len(lost) < 65_600 + 40:  # both answers arrive, and are never read
                lost += await client_end.receive()
        await client_end.aclose()
        conn.connection_lost()
        (detached,) = conn.take_detached_sessions()

        client_end, server_end = memory_stream_pair()
        world.task_group.start_soon(ConnectionDriver(server_end, SETUP, world.keyserver, world.registry).run)
        conn = ClientConnection(os.urandom)
        conn.resume_session(detached)
        answers: dict[int, bytes] = {}
        with anyio.fail_after(30):
            while len(answers) < 2:
                await client_end.send(conn.data_to_send())
                conn.receive_data(await client_end.receive())
                while (event := conn.next_event()) is not NEED_DATA:
                    if isinstance(event, ResponseReceived):
                        assert event.request_id not in answers  # each answered once
                        answers[event.request_id] = event.body
        assert answers[retrieve][:1] == b"\x00" and answers[delete] == b"\x00"
        await client_end.aclose()

        async with world.client() as client:
            session = await client.login(ACCOUNT, PASSWORD)
            entries = await session.audit(AuditType.ALL)
        retrieves = [e for e in entries if e.action is Action.RETRIEVE]
        assert [(e.key_id, e.context, e.outcome) for e in retrieves] == [
            (key_id, Context.LOCAL_ONLY, Outcome.SUCCESS)
        ] * 2
        assert [e.key_id for e in entries if e.action is Action.DELETE_KEY] == [doomed]


class _Order:
    """The key server, noting which connection each request came on, in the order handled."""

    def __init__(self, app: KeyServer) -> None:
        self.app = app
        self.order: list[object] = []

    def __call__(self, conn: object, event: object) -> None:
        if isinstance(event, RequestReceived):
            self.order.append(conn)
        self.app(conn, event)  # type: ignore[arg-type]

    def batch(self) -> AbstractContextManager[None]:
        return self.app.batch()

    def begin_batch(self, wait: bool) -> bool:
        return self.app.begin_batch(wait)


@pytest.mark.anyio
async def test_a_connection_full_of_requests_does_not_hold_up_another(tmp_path):
    """One connection's turn in a batch handles at most ``max_events`` events: 900 requests
    pipelined on one connection leave room for a request another connection sends just after
    them. The server handled all of them in one turn, before any other connection's: measured
    on a real server (interleaved runs), 3,000 CHANGE_PASSWORD_STARTs pipelined on one
    connection (about 130 us of OPAQUE work each) kept another connection's LIST_KEYS waiting
    about 700 ms, and about 200 ms with the bound."""
    cap, flood = 32, 900
    async with key_server(tmp_path) as world:
        async with world.client() as client:
            user_id = await client.register(ACCOUNT, PASSWORD)
        app = _Order(world.keyserver)
        ends = []
        for _ in range(2):
            client_end, server_end = memory_stream_pair()
            # (the wrapper forwards batch(): it shares the key server's group commit)
            driver = ConnectionDriver(server_end, SETUP, app, world.registry, max_events=cap)  # type: ignore[arg-type]
            world.task_group.start_soon(driver.run)
            ends.append((client_end, driver))
        (flooder_end, _), (honest_end, honest) = ends
        flooder_conn, flooder_sid = await raw_login(flooder_end, ACCOUNT, PASSWORD)
        honest_conn, honest_sid = await raw_login(honest_end, ACCOUNT, PASSWORD)
        body = RetrieveRequest(user_id, bytes(16), Context.NULL).encode()  # (no such key)
        flooder_conn.max_requests_in_flight = flood
        for _ in range(flood):
            flooder_conn.send_request(flooder_sid, body)
        honest_conn.send_request(honest_sid, body)
        app.order.clear()
        await flooder_end.send(flooder_conn.data_to_send())
        await honest_end.send(honest_conn.data_to_send())
        with anyio.fail_after(30):
            honest_conn.receive_data(await honest_end.receive())
            assert isinstance(honest_conn.next_event(), ResponseReceived)
            answered = 0
            while answered < flood:
                flooder_conn.receive_data(await flooder_end.receive())
                while (event := flooder_conn.next_event()) is not NEED_DATA:
                    assert isinstance(event, ResponseReceived), event
                    answered += 1
        before = app.order.index(honest.conn)
        assert before <= 2 * cap, f"{before} of the other connection's requests were handled first"
        for end, _driver in ends:
            await end.aclose()


@pytest.mark.anyio
async def test_a_graceful_stop_answers_what_was_read_a_bounded_amount_at_a_time(tmp_path):
    """``stop()`` (server shutdown) answers every request already read before its GOAWAY, in
    turns bounded as usual: the shutdown turn once handled all of them at once, so a
    connection holding 256 KiB of pipelined RETRIEVEs of a 64 KiB secret queued hundreds of
    megabytes as the server drained. Nothing more is taken in once stopping."""
    max_output = 200_000
    async with key_server(tmp_path) as world:
        async with world.client() as client:
            user_id = await client.register(ACCOUNT, PASSWORD)
            session = await client.login(ACCOUNT, PASSWORD)
            key_id = await session.import_secret(BIG)
            await session.logout()
        client_end, server_end = memory_stream_pair(buffer=2)
        recording = _Recording(server_end)
        driver = ConnectionDriver(recording, SETUP, world.keyserver, world.registry, max_output=max_output)
        world.task_group.start_soon(driver.run)
        conn, sid = await raw_login(client_end, ACCOUNT, PASSWORD)
        conn.max_requests_in_flight = COUNT
        body = RetrieveRequest(user_id, key_id, Context.LOCAL_ONLY).encode()
        for _ in range(COUNT):
            conn.send_request(sid, body)
        await client_end.send(conn.data_to_send())  # one piece: the server reads it at once
        answered, stopped, goaway = 0, False, None
        with anyio.fail_after(60):
            while goaway is None:
                conn.receive_data(await client_end.receive())
                while (event := conn.next_event()) is not NEED_DATA:
                    if isinstance(event, ResponseReceived):
                        answered += 1
                    elif isinstance(event, ConnectionFailed):
                        goaway = event
                if answered and not stopped:  # (the server has read every request by now)
                    driver.stop()
                    stopped = True
        assert goaway.code is ErrorCode.OK and answered == COUNT
        assert recording.largest <= max_output + 66_000, recording.largest
