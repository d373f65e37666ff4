"""Multiplexing, resumption and lifetimes (NET-2, NET-3, NET-8, NET-11)."""

from __future__ import annotations

import os

import pytest

from keymgmt.adapters import Delivery, InMemoryPair
from keymgmt_proto import (
    NEED_DATA,
    ClientConnection,
    ConnectionFailed,
    ErrorCode,
    FrameType,
    LocalProtocolError,
    LoginRequested,
    LoginSucceeded,
    RequestReceived,
    ResponseReceived,
    ServerConfig,
    ServerConnection,
    SessionClosed,
    SessionEstablished,
    SessionFailed,
    SessionResumed,
    State,
)

from ..support.frames import forge, frame_type, retarget, split_frames
from ..support.helpers import PASSWORD, Harness, login, only, register


def _lose(pair: InMemoryPair):
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    return pair.client.take_detached_sessions()


def test_hundred_sessions_over_one_connection_one_fed_garbage(harness):
    pair = harness.pair(Delivery.RANDOM_SPLITS, seed=11)
    register(pair, b"multi")
    sids = [pair.client.open_request_session(b"multi", PASSWORD) for _ in range(100)]
    established = [e for e in pair.pump() if isinstance(e, SessionEstablished)]
    assert sorted(e.session_id for e in established) == sids
    victim = sids[42]
    bodies = {sid: f"request for {sid}".encode() for sid in sids}
    for sid in sids:
        pair.client.send_request(sid, bodies[sid])
    frames = split_frames(pair.client.data_to_send())
    stream = b""
    for frame in frames:
        if frame[2:6] == victim.to_bytes(4, "big"):
            frame = frame[:-1] + bytes([frame[-1] ^ 0x01])  # tamper with the tag
        stream += frame
    pair.to_server(stream)
    events = pair.pump()
    answered = {e.session_id: e.body for e in events if isinstance(e, ResponseReceived)}
    assert answered == {sid: bodies[sid] for sid in sids if sid != victim}
    failed = only(events, SessionFailed)
    assert (failed.session_id, failed.code) == (victim, ErrorCode.BAD_RECORD)
    assert pair.client.failed is None and pair.server.failed is None


def test_session_ids_only_increase(harness):
    pair = harness.pair()
    register(pair, b"ids")
    first = login(pair, b"ids").session_id
    pair.client.close_session(first)
    pair.pump()
    # A frame that re-opens an old id is refused: the id is spent.
    pair.to_server(forge(FrameType.LOGIN_START, first, bytes([3]) + b"ids" + bytes(96)))
    (abort,) = split_frames(pair.server.data_to_send())
    assert frame_type(abort) is FrameType.ABORT and abort[10:12] == ErrorCode.BAD_SESSION_ID.to_bytes(
        2, "big"
    )
    assert login(pair, b"ids").session_id == first + 1


def test_resume_continues_sequence_and_answers_in_flight_request_once(harness):
    pair = harness.pair()
    register(pair, b"resume")
    sid = login(pair, b"resume").session_id
    pair.client.send_request(sid, b"one")
    pair.pump()
    in_flight = pair.client.send_request(sid, b"in flight")
    pair.to_server(pair.client.data_to_send())  # the server gets it and answers...
    assert pair.server_events[-1].request_id == in_flight
    pair.server.data_to_send()  # ...but the answer is lost with the connection
    (detached,) = _lose(pair)
    assert detached.unanswered_requests == (in_flight,)

    requests_seen = sum(isinstance(e, RequestReceived) for e in pair.server_events)
    pair2 = harness.pair()
    new_sid = pair2.client.resume_session(detached)
    events = pair2.pump()
    assert only(events, SessionResumed).session_id == new_sid
    response = only(events, ResponseReceived)
    assert (response.request_id, response.body) == (in_flight, b"in flight")
    # The server application saw the request once only.
    assert (
        sum(isinstance(e, RequestReceived) for e in pair.server_events + pair2.server_events) == requests_seen
    )
    # The sequence continues and request ids keep increasing.
    next_id = pair2.client.send_request(new_sid, b"after")
    assert next_id == in_flight + 1
    assert only(pair2.pump(), ResponseReceived).body == b"after"


def test_request_pending_in_the_app_when_the_connection_dies_is_answered_on_the_new_one(harness):
    pair = harness.pair()
    register(pair, b"slowapp")
    sid = login(pair, b"slowapp").session_id
    held: list[RequestReceived] = []
    app = pair.app
    pair.app = lambda conn, event: (
        held.append(event) if isinstance(event, RequestReceived) else app(conn, event)
    )
    request_id = pair.client.send_request(sid, b"slow")
    pair.pump()
    (request,) = held
    (detached,) = _lose(pair)
    pair2 = harness.pair()
    pair2.app = pair.app
    new_sid = pair2.client.resume_session(detached)
    events = pair2.pump()  # the re-sent request is recognised as pending: not delivered again
    assert not any(isinstance(e, ResponseReceived) for e in events)
    assert len(held) == 1
    # The application answers on the old connection object; the answer reaches the new one.
    assert pair.server.send_response(request.session_id, request.request_id, b"done")
    response = only(pair2.pump(), ResponseReceived)
    assert (response.session_id, response.request_id, response.body) == (new_sid, request_id, b"done")


def test_resume_while_the_old_connection_is_still_open_moves_the_session(harness):
    pair = harness.pair()
    register(pair, b"halfopen")
    sid = login(pair, b"halfopen").session_id
    pair.client.connection_lost()  # only the client noticed
    pair.pump()
    (detached,) = pair.client.take_detached_sessions()
    pair2 = harness.pair()
    new_sid = pair2.client.resume_session(detached)
    only(pair2.pump(), SessionResumed)
    assert pair.server.session_state(sid) is State.CLOSED
    pair2.client.send_request(new_sid, b"here now")
    assert only(pair2.pump(), ResponseReceived).body == b"here now"


def test_a_replayed_resume_is_refused(harness):
    pair = harness.pair()
    register(pair, b"replay")
    login(pair, b"replay")
    (detached,) = _lose(pair)
    pair2 = harness.pair()
    new_sid = pair2.client.resume_session(detached)
    resume_frame = pair2.client.data_to_send()
    pair2.to_server(resume_frame)
    assert only(pair2.pump(), SessionResumed).session_id == new_sid
    attacker = harness.pair()
    attacker.to_server(retarget(resume_frame, 1))
    (abort,) = split_frames(attacker.server.data_to_send())
    assert frame_type(abort) is FrameType.ABORT
    assert isinstance(attacker.server_events[-1], SessionFailed)
    assert attacker.server_events[-1].code is ErrorCode.UNKNOWN_SESSION
    # The real session is untouched.
    pair2.client.send_request(new_sid, b"still mine")
    assert only(pair2.pump(), ResponseReceived).body == b"still mine"


def test_a_bare_session_handle_is_not_enough(harness):
    pair = harness.pair()
    register(pair, b"handle")
    login(pair, b"handle")
    (detached,) = _lose(pair)
    handle = detached._session.channel.session_handle
    forged = forge(FrameType.RESUME, 1, handle + (5).to_bytes(8, "big") + bytes(16))
    attacker = harness.pair()
    attacker.to_server(forged)
    assert attacker.server_events[-1].code is ErrorCode.UNKNOWN_SESSION
    # and the owner can still resume
    pair2 = harness.pair()
    pair2.client.resume_session(detached)
    only(pair2.pump(), SessionResumed)


def test_ended_and_expired_sessions_cannot_be_resumed(server_setup):
    harness = Harness(server_setup, ServerConfig(idle_timeout=30, session_lifetime=100))
    pair = harness.pair()
    register(pair, b"ended")
    sid = login(pair, b"ended").session_id
    pair.client.close_session(sid)
    pair.pump()
    with pytest.raises(LocalProtocolError):
        pair.client.send_request(sid, b"x")

    # Expired while detached.
    login(pair, b"ended")
    (detached,) = _lose(pair)
    pair2 = harness.pair(now=pair.now)
    pair2.now = pair.now + 31
    pair2.client.resume_session(detached)
    failed = only(pair2.pump(), SessionFailed)
    assert failed.code is ErrorCode.UNKNOWN_SESSION
    assert len(harness.registry) == 0


def test_deadlines_are_exact_with_a_virtual_clock(server_setup):
    config = ServerConfig(
        handshake_timeout=10, idle_timeout=30, session_lifetime=100, connection_idle_timeout=10_000
    )
    harness = Harness(server_setup, config)
    pair = harness.pair(now=1000.0)
    register(pair, b"clock")
    assert pair.server.get_timer() == 1000.0 + 10_000  # only the idle-connection deadline
    sid = login(pair, b"clock").session_id
    assert pair.server.get_timer() == 1000.0 + 30  # idle deadline from the login
    pair.now = 1020.0
    pair.client.send_request(sid, b"keepalive")
    pair.pump()
    assert pair.server.get_timer() == 1020.0 + 30
    assert pair.advance(29.999) == []  # 1049.999: not yet
    closed = only(pair.advance(0.001), SessionClosed)  # 1050.0: idle timeout, exactly
    assert closed.code is ErrorCode.IDLE_TIMEOUT
    assert pair.server.get_timer() == 1050.0 + 10_000  # idle connection from now on

    # Absolute lifetime wins over activity.
    sid = login(pair, b"clock").session_id
    start = pair.now
    for _ in range(4):
        pair.now += 25
        pair.client.send_request(sid, b"busy")
        pair.pump()
    assert pair.server.get_timer() == start + 100
    closed = only(pair.advance(start + 100 - pair.now), SessionClosed)
    assert closed.code is ErrorCode.LIFETIME_EXPIRED

    # A handshake that stalls ends after handshake_timeout.
    pair.client.open_request_session(b"clock", PASSWORD)
    pair.to_server(pair.client.data_to_send())
    pair.server.data_to_send()  # LOGIN_RESPONSE never reaches the client
    assert pair.server.get_timer() == pair.now + 10
    pair.advance(10)
    assert pair.server_events[-1].code is ErrorCode.HANDSHAKE_TIMEOUT


def test_a_connection_without_a_session_is_closed_at_its_deadline(server_setup):
    """NET-13: a connection that never opens a session, or whose sessions have all ended, is
    closed connection_idle_timeout later with GOAWAY(IDLE_TIMEOUT); a session in between
    stops the clock."""
    config = ServerConfig(connection_idle_timeout=10, handshake_timeout=30)
    harness = Harness(server_setup, config)
    silent = harness.pair(now=500.0)
    assert silent.server.get_timer() == 510.0
    assert silent.advance(9.999) == []
    failed = only(silent.advance(0.001), ConnectionFailed)
    assert (failed.code, failed.reason) == (
        ErrorCode.IDLE_TIMEOUT,
        "peer sent GOAWAY: no session on this connection",
    )

    pair = harness.pair(now=0.0)
    pair.now = 9.0
    register(pair, b"idle")  # a registration session: the clock stops, then starts again
    assert pair.server.get_timer() == 9.0 + 10
    sid = login(pair, b"idle").session_id
    assert pair.server.get_timer() == 9.0 + ServerConfig().idle_timeout  # the session's deadline
    pair.now = 100.0
    pair.client.close_session(sid)
    pair.pump()
    assert pair.server.get_timer() == 110.0
    only(pair.advance(10), ConnectionFailed)


def test_a_frame_that_trickles_in_is_cut_off_at_its_deadline(server_setup):
    """NET-13 (slowloris): a frame must arrive whole within frame_timeout of its first byte,
    even on a connection that carries an established session."""
    config = ServerConfig(frame_timeout=5, connection_idle_timeout=1000)
    harness = Harness(server_setup, config)
    pair = harness.pair(now=0.0)
    register(pair, b"slow")
    sid = login(pair, b"slow").session_id
    pair.client.send_request(sid, b"x" * 100)
    frame = pair.client.data_to_send()
    for i in range(4):  # one byte a second: never whole in time
        pair.server.receive_data(frame[i : i + 1], 10.0 + i)
        assert pair.server.next_event() is NEED_DATA
    assert pair.server.get_timer() == 15.0
    pair.server.handle_timer(14.999)
    assert pair.server.failed is None
    pair.server.handle_timer(15.0)
    assert pair.server.failed is not None and pair.server.failed.code is ErrorCode.IDLE_TIMEOUT
    assert pair.server.failed.reason == "a frame took too long to arrive"
    # Whole frames, however many, reset the clock: only a frame left incomplete counts.
    other = harness.pair(now=0.0)
    sid = login(other, b"slow").session_id
    for second in range(20):
        other.now = float(second)
        other.client.send_request(sid, b"quick")
        other.pump()
    assert other.server.failed is None


def test_whole_frames_left_for_later_are_not_late(server_setup):
    """A driver may stop taking frames while its answers wait for the peer (the key server's
    driver does past ``max_output``): whole frames still buffered then are not a frame that
    trickles in, however long the wait. The deadline runs again from the moment the next
    one is taken, for what is left after it, and a frame left incomplete is still cut off."""
    config = ServerConfig(frame_timeout=5, connection_idle_timeout=1000)
    harness = Harness(server_setup, config)
    pair = harness.pair(now=0.0)
    register(pair, b"patient")
    sid = login(pair, b"patient").session_id
    for _ in range(3):
        pair.client.send_request(sid, b"x" * 100)
    frames = pair.client.data_to_send()
    pair.server.receive_data(frames, 10.0)
    assert isinstance(pair.server.next_event(), RequestReceived)  # one taken, two left whole
    pair.server.handle_timer(60.0)  # the caller came back late
    assert pair.server.failed is None
    assert isinstance(pair.server.next_event(), RequestReceived)
    assert isinstance(pair.server.next_event(), RequestReceived)
    # What is left now is the start of a frame: its clock runs from when it was buffered.
    pair.client.send_request(sid, b"y" * 100)
    pair.server.receive_data(pair.client.data_to_send()[:7], 61.0)
    assert pair.server.next_event() is NEED_DATA
    pair.server.handle_timer(65.999)
    assert pair.server.failed is None
    pair.server.handle_timer(66.0)
    assert pair.server.failed is not None and pair.server.failed.reason == "a frame took too long to arrive"


def test_the_server_clock_is_the_now_each_input_comes_with(server_setup):
    """Issue 13: time is a required argument of the server's receive_data (and of its
    constructor), so an adapter cannot forget it and leave the connection on a stale clock.
    Each deadline runs from the ``now`` its input came with: the slow-frame deadline from the
    partial frame's first bytes, the handshake's from the frame that made it whole."""
    config = ServerConfig(frame_timeout=5.0, connection_idle_timeout=60.0)
    client = ClientConnection(os.urandom)
    client.open_request_session(b"clock", PASSWORD)
    frame = client.data_to_send()
    with pytest.raises(TypeError):
        ServerConnection(server_setup, os.urandom, config=config)
    server = ServerConnection(server_setup, os.urandom, config=config, now=100.0)
    with pytest.raises(TypeError):
        server.receive_data(frame[:3])
    with pytest.raises(TypeError):
        InMemoryPair(client, server, lambda conn, event: None)
    assert server.get_timer() == 160.0  # the refused call buffered nothing: only the idle deadline
    server.receive_data(frame[:3], 130.0)
    assert server.next_event() is NEED_DATA
    assert server.get_timer() == 135.0  # from the first bytes (t=130), not from t=100
    server.handle_timer(134.9)
    server.receive_data(frame[3:6], 120.0)  # a clock stepping back moves no deadline
    assert server.get_timer() == 135.0
    server.receive_data(frame[6:], 134.9)
    assert isinstance(server.next_event(), LoginRequested)
    assert server.failed is None and server.get_timer() == 134.9 + config.handshake_timeout

    slow = ServerConnection(server_setup, os.urandom, config=config, now=100.0)
    slow.receive_data(frame[:3], 130.0)
    slow.handle_timer(134.999)
    assert slow.failed is None
    slow.handle_timer(135.0)
    assert slow.failed is not None and slow.failed.reason == "a frame took too long to arrive"


def test_request_limit_closes_after_the_last_answer(server_setup):
    harness = Harness(server_setup, ServerConfig(max_requests_per_session=1))
    pair = harness.pair()
    register(pair, b"strict")
    sid = login(pair, b"strict").session_id
    pair.client.send_request(sid, b"only one")
    events = pair.pump()
    assert only(events, ResponseReceived).body == b"only one"
    assert only(events, SessionClosed).code is ErrorCode.REQUEST_LIMIT
    assert pair.client.session_state(sid) is State.CLOSED


def test_requests_in_flight_are_bounded(server_setup):
    harness = Harness(server_setup, ServerConfig(max_requests_in_flight=2))
    pair = harness.pair()
    register(pair, b"flight")
    sid = login(pair, b"flight").session_id
    pair.app = lambda conn, event: None  # never answers
    pair.client.max_requests_in_flight = 10  # a client that ignores the server's limit
    for i in range(3):
        pair.client.send_request(sid, bytes([i]))
    failed = only(pair.pump(), SessionFailed)
    assert failed.code is ErrorCode.LIMIT_EXCEEDED


def test_client_side_in_flight_limit(harness):
    pair = harness.pair()
    register(pair, b"local")
    sid = login(pair, b"local").session_id
    pair.client.max_requests_in_flight = 1
    pair.client.send_request(sid, b"a")
    with pytest.raises(LocalProtocolError):
        pair.client.send_request(sid, b"b")


def test_sessions_per_connection_are_bounded(server_setup):
    harness = Harness(server_setup, ServerConfig(max_sessions_per_connection=2))
    pair = harness.pair()
    register(pair, b"cap")
    for _ in range(3):
        pair.client.open_request_session(b"cap", PASSWORD)
    events = pair.pump()
    assert sum(isinstance(e, SessionEstablished) for e in events) == 2
    assert only(events, SessionFailed).code is ErrorCode.LIMIT_EXCEEDED


def test_oversized_frame_ends_the_connection_before_buffering(server_setup):
    harness = Harness(server_setup)
    pair = harness.pair()
    header = forge(FrameType.REQUEST, 1, b"")[:6] + (10**6).to_bytes(4, "big")
    pair.to_server(header)
    failed = pair.server_events[-1]
    assert isinstance(failed, ConnectionFailed) and failed.code is ErrorCode.FRAME_TOO_LARGE
    assert len(pair.server._inbox) == 0


def test_broken_framing_ends_the_connection_but_sessions_resume(harness):
    pair = harness.pair()
    register(pair, b"framing")
    sid = login(pair, b"framing").session_id
    pair.to_server(b"\x09" + bytes(9))  # unknown version
    events = pair.pump()
    failed = only(events, ConnectionFailed)
    assert failed.remote and failed.code is ErrorCode.UNSUPPORTED_VERSION
    (detached,) = pair.client.take_detached_sessions()
    pair2 = harness.pair()
    new_sid = pair2.client.resume_session(detached)
    pair2.pump()
    pair2.client.send_request(new_sid, b"back")
    assert only(pair2.pump(), ResponseReceived).body == b"back"
    assert sid != 0


@pytest.mark.parametrize("attack", ["replay", "reorder", "cross-session", "truncate"])
def test_channel_attacks_end_only_the_attacked_session(harness, attack):
    pair = harness.pair()
    register(pair, b"attacks")
    victim = login(pair, b"attacks").session_id
    other = login(pair, b"attacks").session_id
    bystander = login(pair, b"attacks").session_id
    pair.client.send_request(victim, b"first")
    pair.client.send_request(victim, b"second")
    first, second = split_frames(pair.client.data_to_send())
    if attack == "replay":
        stream = first + first
    elif attack == "reorder":
        stream = second + first
    elif attack == "cross-session":
        stream = retarget(first, other)
    else:
        stream = first[:6] + (int.from_bytes(first[6:10], "big") - 3).to_bytes(4, "big") + first[10:-3]
    pair.to_server(stream)
    events = pair.pump()
    failed = only(events, SessionFailed)
    expected_victim = other if attack == "cross-session" else victim
    assert failed.session_id == expected_victim
    assert failed.code in {ErrorCode.BAD_RECORD, ErrorCode.MALFORMED}
    pair.client.send_request(bystander, b"fine")
    assert only(pair.pump(), ResponseReceived).body == b"fine"
    assert frame_type(first) is FrameType.REQUEST


def test_frames_for_unopened_client_sessions_end_the_connection(harness):
    pair = harness.pair()
    events = pair.to_client(forge(FrameType.RESPONSE, 7, bytes(30)))
    assert only(events, ConnectionFailed).code is ErrorCode.BAD_SESSION_ID


def test_server_close_of_unknown_session_is_a_local_error(harness):
    pair = harness.pair()
    with pytest.raises(LocalProtocolError):
        pair.server.close_session(5)
    pair.server.handle_timer(-1.0)  # a clock that steps back is ignored, not an error
    assert pair.server._now == 0.0


def test_client_connection_refuses_new_sessions_after_failure(harness):
    pair = harness.pair()
    pair.client.connection_lost()
    with pytest.raises(LocalProtocolError):
        pair.client.open_request_session(b"late", PASSWORD)
    assert isinstance(pair.client.next_event(), ConnectionFailed)
    # A fresh client connection is unaffected.
    fresh = InMemoryPair(ClientConnection(os.urandom), pair.server, pair.app, now=pair.now)
    assert fresh.client.failed is None
    assert isinstance(pair.server, ServerConnection)


def test_a_resume_of_a_session_attached_to_the_same_connection_is_refused(harness):
    """NET-14: the RESUME loop that once burned the server's sequence space (each RESUME of an
    attached session jumped its send counter) is refused before anything changes, and the
    session goes on with its counters where they were."""
    pair = harness.pair()
    register(pair, b"loop")
    sid = login(pair, b"loop").session_id
    session = pair.server._sessions[sid]
    before = session.channel.export()
    handle = session.channel.session_handle
    client_channel = pair.client._sessions[sid].channel
    for n in range(200):
        record = client_channel.seal_resume(bytes(32) + (0).to_bytes(8, "big"))
        pair.to_server(forge(FrameType.RESUME, sid + 1 + n, handle + record.encode()))
        failed = pair.server_events[-1]
        assert isinstance(failed, SessionFailed) and failed.code is ErrorCode.UNKNOWN_SESSION
    assert session.channel.export() == before  # nothing moved, nothing burned
    assert pair.server.session_state(sid) is State.ESTABLISHED
    pair.client.data_to_send()
    pair.server.data_to_send()  # the ABORTs for the refused ids
    pair.client._last_session_id = sid + 200
    pair.client.send_request(sid, b"still fine")
    assert only(pair.pump(), ResponseReceived).body == b"still fine"


def test_every_resume_starts_a_new_key_epoch_with_counters_at_zero(harness):
    """NET-14: a session resumed many times never skips sequence space: each epoch starts
    at 0, the handle stays, and requests in flight are answered once."""
    pair = harness.pair()
    register(pair, b"epochs")
    sid = login(pair, b"epochs").session_id
    for round_ in range(20):
        pair.client.send_request(sid, b"round %d" % round_)
        pair.to_server(pair.client.data_to_send())
        pair.server.data_to_send()  # the answer is lost with the connection
        (detached,) = _lose(pair)
        pair = harness.pair()
        sid = pair.client.resume_session(detached)
        events = pair.pump()
        only(events, SessionResumed)
        assert only(events, ResponseReceived).body == b"round %d" % round_
        server_channel = pair.server._sessions[sid].channel
        # RESUMED (seq 0) and the cached answer (seq 1): nothing skipped.
        assert (server_channel.send_seq, server_channel.recv_seq) == (2, 1)


def test_sequence_exhaustion_ends_the_session_with_a_clean_close(harness):
    """NET-14: the epoch's last sequence number is kept for CLOSE: a session that reaches it
    ends with CLOSE(SEQUENCE_EXHAUSTED) on both sides; nothing raises."""
    from keymgmt_proto.wire import MAX_SEQ

    pair = harness.pair()
    register(pair, b"exhaust")
    sid = login(pair, b"exhaust").session_id
    server_channel = pair.server._sessions[sid].channel
    client_channel = pair.client._sessions[sid].channel
    server_channel.send_seq = client_channel.recv_seq = MAX_SEQ - 2  # two records left
    pair.client.send_request(sid, b"one more")
    assert only(pair.pump(), ResponseReceived).body == b"one more"  # uses MAX_SEQ - 2
    pair.client.send_request(sid, b"too many")
    events = pair.pump()  # the answer would need the last seq, which CLOSE keeps
    closed = only(events, SessionClosed)
    assert (closed.session_id, closed.code) == (sid, ErrorCode.SEQUENCE_EXHAUSTED)
    server_closed = [e for e in pair.server_events if isinstance(e, SessionClosed)]
    assert server_closed[-1].code is ErrorCode.SEQUENCE_EXHAUSTED
    assert pair.server.session_state(sid) is State.CLOSED
    # The client side refuses to seal past its own last number, and says why.
    sid2 = login(pair, b"exhaust").session_id
    pair.client._sessions[sid2].channel.send_seq = MAX_SEQ - 1
    with pytest.raises(LocalProtocolError) as info:
        pair.client.send_request(sid2, b"no")
    assert info.value.code is ErrorCode.SEQUENCE_EXHAUSTED
    pair.client.close_session(sid2)  # the last number: logout still works
    pair.pump()
    assert pair.server.session_state(sid2) is State.CLOSED


def test_a_moved_session_keeps_its_handle_and_the_registry_names_the_connections_it_changed(harness):
    """Issue 13: a session's handle survives resumption, and a connection whose work changes
    another connection (a session moved away from it, an answer queued there) names that
    connection in take_woken(), so its driver can be woken; no connection reaches into another."""
    pair = harness.pair()
    register(pair, b"woken")
    established = login(pair, b"woken")
    (succeeded,) = [e for e in pair.server_events if isinstance(e, LoginSucceeded)]
    held: list[RequestReceived] = []
    app = pair.app
    pair.app = lambda conn, event: (
        held.append(event) if isinstance(event, RequestReceived) else app(conn, event)
    )
    pair.client.send_request(established.session_id, b"slow")
    pair.pump()
    (request,) = held
    assert request.handle is succeeded.handle is not None
    assert harness.registry.take_woken() == []
    # The client gives up on the first connection (the server's side of it stays open).
    pair.client.connection_lost()
    (detached,) = pair.client.take_detached_sessions()
    pair2 = harness.pair()
    pair2.app = pair.app
    pair2.client.resume_session(detached)
    events = pair2.pump()
    (resumed,) = [e for e in pair2.server_events if isinstance(e, SessionResumed)]
    assert resumed.handle is succeeded.handle  # same session, same handle, new session id
    assert not any(isinstance(e, ResponseReceived) for e in events)
    assert harness.registry.take_woken() == [pair.server]  # the session left it: its timer changed
    assert harness.registry.take_woken() == []  # taken once
    assert pair.server.authenticated_sessions == 0 and pair2.server.authenticated_sessions == 1
    # The application answers on the first connection; the answer is sealed on the second,
    # and the second is named (its driver sleeps while another connection queues its output).
    assert pair2.server.pending_output == 0
    assert pair.server.send_response(request.session_id, request.request_id, b"done")
    assert pair.server.pending_output == 0 and pair2.server.pending_output > 0
    assert harness.registry.take_woken() == [pair2.server]
    assert only(pair2.pump(), ResponseReceived).body == b"done"
    # Answered: the first connection forgot the session (a second answer is dropped).
    assert not pair.server.send_response(request.session_id, request.request_id, b"again")
    assert pair2.server.pending_output == 0


def test_a_resume_of_an_expired_session_ends_it_on_the_connection_that_holds_it(harness):
    pair = harness.pair()
    register(pair, b"stale")
    login(pair, b"stale")
    (succeeded,) = [e for e in pair.server_events if isinstance(e, LoginSucceeded)]
    pair.client.connection_lost()
    (detached,) = pair.client.take_detached_sessions()
    late = harness.config.idle_timeout + 1.0
    pair2 = harness.pair(now=late)
    pair2.client.resume_session(detached)
    pair2.pump()
    assert only(pair2.server_events, SessionFailed).code is ErrorCode.UNKNOWN_SESSION
    # The first connection ended it, with its own event (for the audit log) and a CLOSE.
    assert pair.server.pending_output > 0
    assert harness.registry.take_woken() == [pair.server]
    pair.pump()
    closed = only(pair.server_events, SessionClosed)
    assert closed.code is ErrorCode.IDLE_TIMEOUT and closed.handle is succeeded.handle
    assert len(harness.registry) == 0


def test_client_events_carry_one_handle_across_resumption(harness):
    """The client's events name the session by a handle that survives resumption (session
    ids change with the connection); a DetachedSession exposes it."""
    pair = harness.pair()
    register(pair, b"clienthandle")
    established = login(pair, b"clienthandle")
    assert established.handle is not None
    pair.client.send_request(established.session_id, b"one")
    first = only(pair.pump(), ResponseReceived)
    (detached,) = _lose(pair)
    assert detached.handle is established.handle
    pair2 = harness.pair()
    new_sid = pair2.client.resume_session(detached)
    resumed = only(pair2.pump(), SessionResumed)
    pair2.client.send_request(new_sid, b"two")
    second = only(pair2.pump(), ResponseReceived)
    assert new_sid != established.session_id
    assert first.handle is resumed.handle is second.handle is established.handle
    pair2.client.close_session(new_sid)
    pair2.pump()
    other = login(pair2, b"clienthandle")
    assert other.handle is not established.handle
    assert pair2.client.session_handle(other.session_id) is other.handle
    with pytest.raises(LocalProtocolError, match="no live session"):
        pair2.client.session_handle(new_sid)  # logged out: it has no handle to give
