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
    UNPRODUCTIVE_BLOCK_SIZE,
    Context,
    CreateKeyIdRequest,
    DeleteKeyRequest,
    ErrorCode,
    Event,
    FrameType,
    RequestReceived,
    ResponseReceived,
    RetrieveRequest,
    SecretKind,
    ServerConfig,
    ServerConnection,
    ServerSetup,
    SessionClosed,
    SessionFailed,
    SessionResumed,
    session_sealing_key,
)
from keymgmt_proto.wire import Request, unseal_session_state

from ..support.frames import forge
from ..support.helpers import Harness, login, only, register
from .test_shared_sessions import SETUP, DictStore, _instance, _pair

KEY = bytes(range(16))
BIG = 10_000  # a read's answer: more than the whole budget (a 64 KiB secret's is 65,615)
IGNORED = forge(FrameType.ABORT, 1, b"")  # for the registration session, ended: one unit


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


def _re_send(pair: InMemoryPair, session_id: int, request_id: int, body: bytes) -> None:
    """The client sends a REQUEST again under an id it used before, on the same connection
    (an honest client does so after a resumption; a hostile one whenever it likes). What the
    server sends back is not delivered."""
    client = pair.client
    client._send_sealed(client._sessions[session_id], FrameType.REQUEST, Request(request_id, body).encode())
    pair.to_server(client.data_to_send())
    pair.server.data_to_send()


def test_a_read_whose_answer_just_fits_is_kept(server_setup: ServerSetup):
    """A read's answer is kept if it fits (protocol.md section 9): one that fills what is left
    of ``reply_cache_bytes`` exactly is kept and sent again; one byte more and the read runs
    again."""
    harness = Harness(server_setup, ServerConfig(reply_cache_bytes=100))
    pair, sid, read, _ = _setup(harness)
    sizes = iter([60, 40, 1])  # 60 + 40 = 100: both kept; then nothing is left for 1 byte
    harness.app.handler = lambda user_id, body: bytes(next(sizes))
    ids = [pair.client.send_request(sid, read) for _ in range(3)]
    _answered_and_lost(pair)
    session = next(iter(harness.registry._sessions.values()))
    assert session.answered_bytes == 100
    assert [a is not None for a in session.answered.values()] == [True, True, False]
    harness.app.handler = lambda user_id, body: b"again"
    other = _resume(harness, pair)
    responses = {e.request_id: e.body for e in other.pump() if isinstance(e, ResponseReceived)}
    assert responses == {ids[0]: bytes(60), ids[1]: bytes(40), ids[2]: b"again"}
    assert [_runs(harness, i) for i in ids] == [1, 1, 2]


def test_a_write_re_sent_under_the_highest_id_after_its_answer_left_the_cache_is_refused(
    server_setup: ServerSetup,
):
    """Reads run again are answered without a new id: a hostile client that re-sends a read
    the server answered (its answer not kept) can push the answer of its newest request, a
    CREATE_KEY_ID, out of the reply cache. Re-sent then, that id is at the highest seen and
    no longer remembered: it is refused (INVALID_REQUEST), and no second key id is
    reserved."""
    harness = Harness(server_setup, ServerConfig(max_requests_in_flight=2))
    harness.app = _Deferring()  # leaves DELETE_KEY awaiting its answer
    pair, sid, read, write = _setup(harness)
    reserve = CreateKeyIdRequest(write[1:17], SecretKind.GENERATED, bytes(32)).encode()
    read_id = pair.client.send_request(sid, read)  # answered (big): only its id is kept
    held_id = pair.client.send_request(sid, write)  # awaits its answer
    reserve_id = pair.client.send_request(sid, reserve)  # answered, kept; the highest id
    pair.to_server(pair.client.data_to_send())
    pair.server.data_to_send()
    session = next(iter(harness.registry._sessions.values()))
    assert session.answered == {read_id: None, reserve_id: b"\x00"}
    _re_send(pair, sid, read_id, read)  # runs again; its answer comes after reserve_id's
    assert _runs(harness, read_id) == 2
    pair.server.send_response(sid, held_id, b"\x00")  # the held answer pushes reserve_id out
    assert list(session.answered) == [read_id, held_id] and session.highest_request_id == reserve_id
    _re_send(pair, sid, reserve_id, reserve)
    failed = [e for e in harness.app.events if isinstance(e, SessionFailed)]
    assert [e.code for e in failed] == [ErrorCode.INVALID_REQUEST]
    assert _runs(harness, reserve_id) == 1


@pytest.mark.parametrize("kind", ["awaiting its answer", "answer kept", "read run again"])
def test_re_sent_requests_are_paid_for_until_the_connection_fails(server_setup: ServerSetup, kind: str):
    """A re-sent REQUEST is unproductive input (protocol.md section 10), one unit each,
    whatever the server does with it: ignores it (its answer is on its way), sends the kept
    answer again, or runs the read again. A client re-sending one request in a loop to make
    the server send or read the same answer again and again runs out of budget:
    GOAWAY(LIMIT_EXCEEDED)."""
    harness = Harness(server_setup, ServerConfig(unproductive_burst=16))
    harness.app = _Deferring()
    pair, sid, read, write = _setup(harness)
    reserve = CreateKeyIdRequest(write[1:17], SecretKind.GENERATED, bytes(32)).encode()
    body = {"awaiting its answer": write, "answer kept": reserve, "read run again": read}[kind]
    request_id = pair.client.send_request(sid, body)
    pair.to_server(pair.client.data_to_send())
    pair.server.data_to_send()
    before = pair.server.unproductive_budget
    _re_send(pair, sid, request_id, body)
    assert pair.server.unproductive_budget == before - 1
    for _ in range(1000):
        if pair.server.failed is not None:
            break
        _re_send(pair, sid, request_id, body)
    assert pair.server.failed is not None and pair.server.failed.code is ErrorCode.LIMIT_EXCEEDED
    # Run once, or once and then once per unit of the budget (the re-send that overdrew it
    # included), not without end.
    runs = _runs(harness, request_id)
    assert runs == (before + 2 if kind == "read run again" else 1)


@pytest.mark.parametrize("how", ["new request", "read run again"])
def test_the_request_that_finds_the_session_at_its_limit_is_not_charged(server_setup: ServerSetup, how: str):
    """The REQUEST that finds the session at ``max_requests_per_session`` reaches a live
    session, which the server then ends with CLOSE(REQUEST_LIMIT): it costs nothing, and the
    end pays in advance for what the client pipelined, (max_requests_in_flight + 1) x W
    units (protocol.md section 10), not one unit less."""
    config = ServerConfig(max_requests_per_session=2, max_requests_in_flight=4)
    harness = Harness(server_setup, config)
    harness.app = _Deferring()
    pair, sid, read, write = _setup(harness)
    read_id = pair.client.send_request(sid, read)  # answered, not kept (big)
    pair.client.send_request(sid, write)  # awaits its answer: the session stays open at 2
    pair.to_server(pair.client.data_to_send())
    pair.server.data_to_send()
    pair.to_server(IGNORED * 50)  # below the burst
    before = pair.server.unproductive_budget
    if how == "new request":
        pair.client.send_request(sid, read)
        pair.to_server(pair.client.data_to_send())
    else:
        _re_send(pair, sid, read_id, read)
    closed = [e for e in harness.app.events if isinstance(e, SessionClosed)]
    assert [e.code for e in closed] == [ErrorCode.REQUEST_LIMIT]
    w = 3 + config.max_payload // UNPRODUCTIVE_BLOCK_SIZE
    assert pair.server.unproductive_budget == before + (config.max_requests_in_flight + 1) * w
