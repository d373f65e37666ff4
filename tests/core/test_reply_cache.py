"""The reply cache stays small (protocol.md section 9): a session keeps the answers of its
requests that change state, and of reads only while they fit in ``reply_cache_bytes``; a
re-sent read whose answer was not kept runs again, once per re-send, and a re-sent write
gets its kept answer, nothing being done twice.

Before, a session kept its last 16 answers whole: 16 RETRIEVEs of a 64 KiB secret left
about 1 MiB per session in memory, and in the sealed state when it detached. The real key
server is attacked in
tests/server/test_answer_amplification.py::test_reply_caches_of_big_answers_stay_bounded."""

from __future__ import annotations

import pytest

from keymgmt.adapters import InMemoryPair, MemoryServerApp
from keymgmt_proto import (
    REPLY_CACHE_BYTES,
    Context,
    DeleteKeyRequest,
    ErrorCode,
    Event,
    RequestReceived,
    ResponseReceived,
    RetrieveRequest,
    ServerConfig,
    ServerConnection,
    ServerSetup,
    SessionClosed,
    SessionFailed,
    SessionResumed,
    session_sealing_key,
)
from keymgmt_proto.wire import unseal_session_state

from ..support.helpers import Harness, login, only, register
from .test_shared_sessions import SETUP, DictStore, _instance, _pair

KEY = bytes(range(16))
BIG = 10_000  # a read's answer: more than the whole budget (a 64 KiB secret's is 65,615)


def _answer(user_id: bytes, body: bytes) -> bytes:
    """What the application answers: a big OK for a read (RETRIEVE), one byte for a write."""
    return b"\x00" + bytes(BIG) if body[0] == 4 else b"\x00"


def _setup(harness: Harness) -> tuple[InMemoryPair, int, bytes, bytes]:
    harness.app.handler = _answer
    pair = harness.pair()
    register(pair, b"alice")
    established = login(pair, b"alice")
    read = RetrieveRequest(established.user_id, KEY, Context.NULL).encode()
    write = DeleteKeyRequest(established.user_id, KEY).encode()
    return pair, established.session_id, read, write


def _answered_and_lost(pair: InMemoryPair) -> None:
    """The server takes what the client sent and answers it; the answers never arrive: the
    connection drops, and the session detaches."""
    pair.to_server(pair.client.data_to_send())
    pair.server.data_to_send()  # lost
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()


def _resume(harness: Harness, pair: InMemoryPair, *, lose_answers: bool = False) -> InMemoryPair:
    """Resume the detached session on a new connection; the client re-sends what it has
    unanswered. With ``lose_answers`` the answers to the re-sends are lost in turn."""
    (detached,) = pair.client.take_detached_sessions()
    other = harness.pair()
    other.client.resume_session(detached)
    other.to_server(other.client.data_to_send())  # RESUME
    assert only(other.to_client(other.server.data_to_send()), SessionResumed)
    if lose_answers:
        _answered_and_lost(other)
    return other


def _runs(harness: Harness, request_id: int) -> int:
    return sum(1 for e in harness.app.events if isinstance(e, RequestReceived) and e.request_id == request_id)


def test_a_re_sent_read_whose_answer_was_not_kept_runs_again_once_per_re_send(server_setup: ServerSetup):
    harness = Harness(server_setup)
    pair, sid, read, _ = _setup(harness)
    read_id = pair.client.send_request(sid, read)
    _answered_and_lost(pair)
    session = next(iter(harness.registry._sessions.values()))
    assert session.answered == {read_id: None} and session.answered_bytes == 0  # only its id
    assert _runs(harness, read_id) == 1

    second = _resume(harness, pair, lose_answers=True)  # run again; that answer is lost too
    assert _runs(harness, read_id) == 2
    third = _resume(harness, second)
    responses = [e for e in third.pump() if isinstance(e, ResponseReceived)]
    assert [(r.request_id, len(r.body)) for r in responses] == [(read_id, 1 + BIG)]  # answered once
    assert _runs(harness, read_id) == 3  # the first run and one per re-send: each one audited
    # Each run is a request of the session (max_requests_per_session), under the same id.
    assert session.request_count == 3 and session.highest_request_id == read_id
    third.pump()
    assert _runs(harness, read_id) == 3  # nothing more once answered


def test_a_re_sent_write_gets_its_kept_answer_and_runs_once(server_setup: ServerSetup):
    """Even with no room at all for reads, the answer of a write is kept."""
    harness = Harness(server_setup, ServerConfig(reply_cache_bytes=0))
    pair, sid, read, write = _setup(harness)
    read_id = pair.client.send_request(sid, read)
    write_id = pair.client.send_request(sid, write)
    _answered_and_lost(pair)
    session = next(iter(harness.registry._sessions.values()))
    assert session.answered == {read_id: None, write_id: b"\x00"}

    second = _resume(harness, pair, lose_answers=True)
    third = _resume(harness, second)
    responses = {e.request_id: e.body for e in third.pump() if isinstance(e, ResponseReceived)}
    assert responses == {read_id: b"\x00" + bytes(BIG), write_id: b"\x00"}
    assert _runs(harness, write_id) == 1  # the DELETE_KEY was done once, its answer sent again
    assert _runs(harness, read_id) == 3


def test_small_read_answers_are_kept_and_sent_again_without_running(server_setup: ServerSetup):
    """Reads whose answers fit in the budget are answered again from the cache; one that
    would pass it is not kept, and the oldest answers leave the cache as new ones come."""
    harness = Harness(server_setup)
    pair, sid, read, _ = _setup(harness)
    sizes = iter([1000, 1000, 1000, 1000, 1097, 10])  # 4,000 kept, then 1,097 does not fit
    harness.app.handler = lambda user_id, body: bytes(next(sizes))
    ids = [pair.client.send_request(sid, read) for _ in range(6)]
    _answered_and_lost(pair)
    session = next(iter(harness.registry._sessions.values()))
    assert [len(a) if a is not None else None for a in session.answered.values()] == [
        1000,
        1000,
        1000,
        1000,
        None,
        10,
    ]
    assert session.answered_bytes == 4010
    harness.app.handler = lambda user_id, body: b"again"
    other = _resume(harness, pair)
    responses = {e.request_id: e.body for e in other.pump() if isinstance(e, ResponseReceived)}
    assert sorted(responses) == ids and responses[ids[4]] == b"again"
    assert [_runs(harness, i) for i in ids] == [1, 1, 1, 1, 2, 1]


def test_a_dropped_read_id_re_sent_with_a_write_is_refused(server_setup: ServerSetup):
    """A re-sent id whose answer was not kept runs again only as a read: under it a client
    cannot have a write done that the reply cache would then answer for."""
    harness = Harness(server_setup)
    pair, sid, read, write = _setup(harness)
    read_id = pair.client.send_request(sid, read)
    _answered_and_lost(pair)
    (detached,) = pair.client.take_detached_sessions()
    detached._session.unanswered[read_id] = write  # a hostile client re-sends another body
    other = harness.pair()
    other.client.resume_session(detached)
    failed = only(other.pump(), SessionFailed)
    assert failed.code is ErrorCode.INVALID_REQUEST
    assert _runs(harness, read_id) == 1  # the write never ran


def test_ids_past_the_window_are_still_refused(server_setup: ServerSetup):
    """Only the last max_requests_in_flight answered ids are remembered, kept or not."""
    harness = Harness(server_setup, ServerConfig(max_requests_in_flight=2))
    pair, sid, read, _ = _setup(harness)
    first = pair.client.send_request(sid, read)
    pair.pump()
    for _ in range(2):
        pair.client.send_request(sid, read)
        pair.pump()
    session = next(iter(harness.registry._sessions.values()))
    assert first not in session.answered and len(session.answered) == 2
    assert session.answered_bytes == 0


def test_the_sealed_state_of_a_session_of_big_reads_stays_small():
    """Sealed into a shared store, a session that read 16 big answers holds their ids only;
    on the instance that resumes it, a re-sent read runs again."""
    setup_store, app = DictStore(), MemoryServerApp(handler=_answer)
    pair = _pair(_instance(setup_store), app)
    register(pair, b"bob")
    established = login(pair, b"bob")
    read = RetrieveRequest(established.user_id, KEY, Context.NULL).encode()
    for _ in range(16):
        pair.client.send_request(established.session_id, read)
        pair.pump()
    last = pair.client.send_request(established.session_id, read)
    pair.to_server(pair.client.data_to_send())
    pair.server.data_to_send()  # lost
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    ((handle, (sealed, _)),) = setup_store.rows.items()
    assert len(sealed) < 400  # 16 ids, not 16 answers of 10 KB
    state = unseal_session_state(sealed, handle, session_sealing_key(SETUP.to_bytes()))
    assert state is not None and set(state.answered.values()) == {None} and len(state.answered) == 16
    (detached,) = pair.client.take_detached_sessions()
    other = _pair(_instance(setup_store), app)
    other.client.resume_session(detached)
    (response,) = [e for e in other.pump() if isinstance(e, ResponseReceived)]
    assert response.request_id == last and len(response.body) == 1 + BIG
    runs = [e for e in app.events if isinstance(e, RequestReceived) and e.request_id == last]
    assert len(runs) == 2


def test_reply_cache_bytes_is_checked():
    assert ServerConfig().reply_cache_bytes == REPLY_CACHE_BYTES == 4096
    assert ServerConfig(reply_cache_bytes=0).reply_cache_bytes == 0
    with pytest.raises(ValueError, match="reply_cache_bytes"):
        ServerConfig(reply_cache_bytes=-1)


class _Deferring(MemoryServerApp):
    """Answers reads at once (big) and leaves a DELETE_KEY awaiting its answer."""

    def __init__(self) -> None:
        super().__init__(handler=_answer)

    def __call__(self, conn: ServerConnection, event: Event) -> None:
        if isinstance(event, RequestReceived) and event.body[0] == 7:
            self.events.append(event)  # left pending
            return
        super().__call__(conn, event)


def test_a_read_run_again_counts_against_the_session_request_limit(server_setup: ServerSetup):
    """A read run again is a request of the session: at ``max_requests_per_session`` the
    session closes with REQUEST_LIMIT instead (as for a new request), and nothing runs."""
    harness = Harness(server_setup, ServerConfig(max_requests_per_session=2))
    harness.app = _Deferring()
    pair, sid, read, write = _setup(harness)
    read_id = pair.client.send_request(sid, read)
    pair.client.send_request(sid, write)  # stays pending: the session is not closed at 2
    _answered_and_lost(pair)
    (detached,) = pair.client.take_detached_sessions()
    other = harness.pair()
    other.client.resume_session(detached)
    closed = only(other.pump(), SessionClosed)
    assert closed.code is ErrorCode.REQUEST_LIMIT
    assert _runs(harness, read_id) == 1


def test_the_server_app_hears_of_a_session_closed_at_its_request_limit_by_a_read_run_again(
    server_setup: ServerSetup,
):
    """The application is told, as for a new request past the limit: SessionClosed with
    REQUEST_LIMIT, so it can drop what it keeps for the session."""
    harness = Harness(server_setup, ServerConfig(max_requests_per_session=2))
    harness.app = _Deferring()
    pair, sid, read, write = _setup(harness)
    pair.client.send_request(sid, read)
    pair.client.send_request(sid, write)
    _answered_and_lost(pair)
    (detached,) = pair.client.take_detached_sessions()
    other = harness.pair()
    other.client.resume_session(detached)
    other.pump()
    closed = [e for e in harness.app.events if isinstance(e, SessionClosed)]
    assert [e.code for e in closed] == [ErrorCode.REQUEST_LIMIT]


def test_a_read_run_again_counts_against_the_requests_in_flight(server_setup: ServerSetup):
    """A read run again is a request awaiting its answer: with ``max_requests_in_flight``
    others already awaiting theirs, the session fails LIMIT_EXCEEDED (as for a new request),
    and the read does not run."""
    harness = Harness(server_setup, ServerConfig(max_requests_in_flight=2))
    harness.app = _Deferring()
    pair, sid, read, write = _setup(harness)
    read_id = pair.client.send_request(sid, read)
    pair.client.send_request(sid, write)  # both left awaiting their answers
    pair.client.send_request(sid, DeleteKeyRequest(write[1:17], bytes(16)).encode())
    _answered_and_lost(pair)
    assert _runs(harness, read_id) == 1
    (detached,) = pair.client.take_detached_sessions()
    other = harness.pair()
    other.client.resume_session(detached)
    failed = only(other.pump(), SessionFailed)
    assert failed.code is ErrorCode.LIMIT_EXCEEDED
    assert _runs(harness, read_id) == 1
