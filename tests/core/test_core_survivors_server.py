"""Server behaviours pinned where the mutation run found them untested: the clocks a server
connection keeps (handshake, idle connection, slow frames, session deadlines), what ending,
abandoning or detaching a session leaves in the registry and the hot-channel set, the limits
on sessions and requests, sequence exhaustion, and the flags and codes the server reports."""

from __future__ import annotations

import os

import pytest

from keymgmt.adapters import InMemoryPair
from keymgmt_proto import (
    MAX_SESSION_ID,
    NEED_DATA,
    ConnectionFailed,
    ErrorCode,
    FrameType,
    LocalProtocolError,
    LoginFailed,
    LoginRequested,
    LoginSucceeded,
    RemoteProtocolError,
    ResponseReceived,
    ServerConfig,
    ServerConnection,
    ServerLoginStep,
    ServerSetup,
    SessionClosed,
    SessionFailed,
    SessionRegistry,
    SessionResumed,
    State,
)
from keymgmt_proto.testing import FakeOpaque
from keymgmt_proto.wire import (
    CREDENTIAL_REQUEST_SIZE,
    MAX_SEQ,
    REGISTRATION_UPLOAD_SIZE,
    Abort,
    GoAway,
    LoginFinish,
    LoginStart,
    Resume,
    ResumeEnvelope,
)

from ..support.fake_pairs import PASSWORD, FakeWorld, HoldingApp, lose
from ..support.frames import forge, parsed
from ..support.helpers import login, only, register

ACCOUNT = b"alice@example.org"
USER_ID = bytes(range(16))


def _aborts(data: bytes) -> list[tuple[int, Abort]]:
    return [(sid, Abort.decode(payload)) for kind, sid, payload in parsed(data) if kind is FrameType.ABORT]


def _drain(conn) -> list:
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def _server(setup: ServerSetup, **kwargs) -> ServerConnection:
    return ServerConnection(setup, os.urandom, opaque=FakeOpaque(os.urandom), **kwargs)


def _login_start(session_id: int, account: bytes = ACCOUNT) -> bytes:
    return forge(
        FrameType.LOGIN_START, session_id, LoginStart(account, bytes(CREDENTIAL_REQUEST_SIZE)).encode()
    )


def _established(world: FakeWorld, now: float = 0.0) -> tuple[InMemoryPair, int]:
    pair = world.pair(now=now)
    register(pair, ACCOUNT)
    return pair, login(pair, ACCOUNT).session_id


def _hot_server_channels(registry: SessionRegistry) -> int:
    return sum(1 for s in registry._sessions.values() if s.channel is not None and s.channel.is_hot)


# ------------------------------------------------------------------------ config


def test_timeouts_below_one_second_are_valid_and_zero_is_not():
    """Any positive duration is a valid timeout (sub-second ones included)."""
    config = ServerConfig(handshake_timeout=0.5, idle_timeout=0.5, frame_timeout=0.25)
    assert config.frame_timeout == 0.25
    with pytest.raises(ValueError, match="idle_timeout must be positive"):
        ServerConfig(idle_timeout=0)


# ------------------------------------------------------------------------ clocks


def test_the_time_bytes_arrive_at_drives_the_connection_clocks(server_setup):
    """LOGIN_START received at t=5 starts a 30 s handshake clock at 5; the whole frame leaves no
    slow-frame deadline, and the connection, now carrying a session, has no idle deadline."""
    server = _server(server_setup, now=0.0)
    server.receive_data(_login_start(1), now=5.0)
    only(_drain(server), LoginRequested)
    assert server.get_timer() == 35.0
    server.handle_timer(34.9)
    assert server.failed is None and server.session_state(1) is State.AWAIT_LOGIN_DECISION


def test_a_frame_trickled_in_must_be_whole_within_the_frame_timeout(server_setup):
    """Slowloris: the frame clock starts at the frame's first byte; later bytes do not restart it."""
    server = _server(server_setup, config=ServerConfig(frame_timeout=5.0), now=0.0)
    frame = _login_start(1)
    server.receive_data(frame[:4], now=0.0)
    assert server.next_event() is NEED_DATA
    server.receive_data(frame[4:12], now=4.0)
    assert server.next_event() is NEED_DATA
    assert server.get_timer() == 5.0
    server.handle_timer(5.0)
    assert _drain(server) == [
        ConnectionFailed(ErrorCode.IDLE_TIMEOUT, "a frame took too long to arrive", False)
    ]
    ((kind, _, payload),) = parsed(server.data_to_send())
    assert kind is FrameType.GOAWAY and GoAway.decode(payload).code is ErrorCode.IDLE_TIMEOUT


def test_a_connection_that_never_carries_a_session_is_closed_by_this_side(server_setup):
    server = _server(server_setup, now=0.0)
    server.handle_timer(10.0)
    assert _drain(server) == [
        ConnectionFailed(ErrorCode.IDLE_TIMEOUT, "no session on this connection", False)
    ]


def test_the_idle_connection_clock_restarts_when_the_last_session_ends(world):
    """NET-13: after its last session ends (t=5) the connection is closed 10 s later."""
    pair, sid = _established(world)
    pair.now = 5.0
    pair.client.close_session(sid)
    pair.pump()
    assert pair.server.session_state(sid) is State.CLOSED
    assert pair.server.get_timer() == 15.0


def test_a_session_whose_lifetime_and_idle_deadlines_coincide_ends_for_its_lifetime(server_setup):
    world = FakeWorld(server_setup, ServerConfig(idle_timeout=100.0, session_lifetime=100.0))
    pair, sid = _established(world)
    events = pair.advance(100.0)
    assert only(events, SessionClosed) == SessionClosed(sid, ErrorCode.LIFETIME_EXPIRED)
    assert only(pair.server_events, SessionClosed).code is ErrorCode.LIFETIME_EXPIRED


def test_a_handshake_that_times_out_is_a_local_failure_and_no_failed_login(server_setup):
    """A login still awaiting the application's decision never tested a password: no LoginFailed."""
    server = _server(server_setup, now=0.0)
    server.receive_data(_login_start(1), now=0.0)
    only(_drain(server), LoginRequested)
    server.handle_timer(30.0)
    assert _drain(server) == [SessionFailed(1, ErrorCode.HANDSHAKE_TIMEOUT, "handshake took too long", False)]
    ((sid, abort),) = _aborts(server.data_to_send())
    assert (sid, abort.code) == (1, ErrorCode.HANDSHAKE_TIMEOUT)


# ------------------------------------------------------------- hot-channel bookkeeping


def test_ended_sessions_leave_the_hot_channel_set(world):
    """P4: the hot set holds only live sessions' channels (registration and request alike)."""
    pair = world.pair()
    register(pair, ACCOUNT)
    assert world.registry.hot_channels == 0  # the registration session's channel was let go
    sid = login(pair, ACCOUNT).session_id
    channel = pair.server._sessions[sid].channel
    assert world.registry.hot_channels == 1 and channel.is_hot
    pair.client.close_session(sid)
    pair.pump()
    assert world.registry.hot_channels == 0 and not channel.is_hot


def test_server_channels_holding_aead_objects_never_exceed_max_hot_channels(server_setup):
    """P4: however sessions are used (sealing a WELCOME, opening a REQUEST), at most
    max_hot_channels server channels keep their AEAD objects built."""
    world = FakeWorld(server_setup, ServerConfig(max_hot_channels=1), app=HoldingApp())
    pair = world.pair()
    register(pair, ACCOUNT)
    first = login(pair, ACCOUNT).session_id
    assert _hot_server_channels(world.registry) == 1
    login(pair, ACCOUNT)
    assert _hot_server_channels(world.registry) == 1
    pair.client.send_request(first, b"held")  # opened by the server, not answered yet
    pair.pump()
    assert _hot_server_channels(world.registry) == 1
    assert pair.server._sessions[first].channel.is_hot  # the channel just used is the hot one


def test_an_expired_detached_session_releases_its_channel(world):
    pair, _ = _established(world)
    lose(pair)
    assert world.registry.hot_channels == 1
    world.registry.handle_timer(300.0)
    assert len(world.registry) == 0 and world.registry.hot_channels == 0


def test_a_resumed_session_keeps_only_its_new_epoch_channel_hot(world):
    pair, sid = _established(world)
    old_channel = pair.server._sessions[sid].channel
    (detached,) = lose(pair)
    fresh = world.pair()
    new_sid = fresh.client.resume_session(detached)
    only(fresh.pump(), SessionResumed)
    new_channel = fresh.server._sessions[new_sid].channel
    assert world.registry.hot_channels == 1 and new_channel.is_hot
    assert not old_channel.is_hot


class _ListStore:
    def __init__(self) -> None:
        self.saved: dict[bytes, tuple[bytes, float]] = {}

    def save(
        self,
        handle: bytes,
        sealed_state: bytes,
        expires_at: float,
        user_id: bytes | None = None,
        credentials_version: int | None = None,
    ) -> None:
        self.saved[handle] = (sealed_state, expires_at)

    def claim(self, handle: bytes) -> bytes | None:
        entry = self.saved.pop(handle, None)
        return None if entry is None else entry[0]


def test_a_session_handed_to_the_store_carries_its_deadline_and_leaves_memory(server_setup):
    """The store is told when the detached session expires (idle deadline: 300 s after its
    last activity), and this instance keeps neither the session nor a hot channel for it."""
    store = _ListStore()
    registry = SessionRegistry(store=store, sealing_key=bytes(32), random=os.urandom)
    world = FakeWorld(server_setup, registry=registry)
    pair, _ = _established(world)
    lose(pair)
    ((_, expires_at),) = store.saved.values()
    assert expires_at == 300.0
    assert len(registry) == 0 and registry.hot_channels == 0


# ------------------------------------------------------------------------ abandon


def test_abandon_drops_unsent_bytes_and_fails_the_connection_quietly(server_setup):
    """A storage failure: the uncommitted answer is never sent, no GOAWAY either, and an
    established session ends without a LoginFailed (its login succeeded long ago)."""
    world = FakeWorld(server_setup, app=HoldingApp())
    pair, sid = _established(world)
    pair.client.send_request(sid, b"q")
    pair.pump()
    (held,) = world.app.held
    pair.server.send_response(sid, held.request_id, b"uncommitted")
    pair.server.abandon()
    assert pair.server.data_to_send() == b""
    assert _drain(pair.server) == [
        ConnectionFailed(ErrorCode.INTERNAL_ERROR, "server storage failure", False)
    ]
    assert pair.server.session_state(sid) is State.CLOSED
    assert len(world.registry) == 0


def test_abandon_after_the_connection_was_lost_leaves_nothing_resumable(world):
    pair, _ = _established(world)
    (detached,) = lose(pair)
    pair.server.abandon()
    assert len(world.registry) == 0
    assert pair.server._detached_here == []  # the connection keeps no reference to it either
    fresh = world.pair()
    new_sid = fresh.client.resume_session(detached)
    failed = only(fresh.pump(), SessionFailed)
    assert (failed.session_id, failed.code) == (new_sid, ErrorCode.UNKNOWN_SESSION)


def test_abandon_discards_answers_pending_for_a_session_that_left(server_setup):
    """A detached session with a request in progress: after abandon its answer has nowhere to
    go, nothing waits for it, and the session cannot be resumed."""
    world = FakeWorld(server_setup, app=HoldingApp())
    pair, sid = _established(world)
    session = pair.server._sessions[sid]
    pair.client.send_request(sid, b"q")
    pair.pump()
    (held,) = world.app.held
    (detached,) = lose(pair)
    pair.server.abandon()
    assert session.state is State.CLOSED and not session.pending
    assert pair.server._departed == {} and pair.server._detached_here == []
    assert len(world.registry) == 0
    assert pair.server.send_response(sid, held.request_id, b"late") is False
    fresh = world.pair()
    fresh.client.resume_session(detached)
    assert only(fresh.pump(), SessionFailed).code is ErrorCode.UNKNOWN_SESSION


def test_a_connection_lost_during_a_handshake_fails_the_session_locally_without_sending(server_setup):
    server = _server(server_setup, now=0.0)
    server.receive_data(_login_start(1), 0.0)
    only(_drain(server), LoginRequested)
    server.connection_lost()
    assert _drain(server) == [
        ConnectionFailed(ErrorCode.CONNECTION_LOST, "connection lost", False),
        SessionFailed(1, ErrorCode.CONNECTION_LOST, "connection lost", False),
    ]
    assert server.data_to_send() == b""


# ------------------------------------------------------------------ application commands


class _CountingSetup(ServerSetup):
    """A setup that counts decoy derivations (and skips their work)."""

    def __init__(self, setup: ServerSetup) -> None:
        super().__init__(setup._setup)
        self.decoys: list[bytes] = []

    def decoy_record(self, account_name, random):
        self.decoys.append(account_name)
        return bytes(16), bytes(REGISTRATION_UPLOAD_SIZE)


def test_a_login_for_a_registered_name_derives_a_decoy_record_too(server_setup):
    """NET-9: accept_login does the decoy work accept_unknown_login does, so both cost the same."""
    setup = _CountingSetup(server_setup)
    server = ServerConnection(setup, os.urandom, opaque=FakeOpaque(os.urandom), now=0.0)
    server.receive_data(_login_start(1), 0.0)
    only(_drain(server), LoginRequested)
    server.accept_login(1, USER_ID, bytes(REGISTRATION_UPLOAD_SIZE))
    assert setup.decoys == [ACCOUNT]
    assert [kind for kind, _, _ in parsed(server.data_to_send())] == [FrameType.LOGIN_RESPONSE]


class _RefusingCredentialOpaque(FakeOpaque):
    def server_login_start(self, setup, registration_record, request, account_name) -> ServerLoginStep:
        raise RemoteProtocolError("OPAQUE credential request failed", ErrorCode.MALFORMED)


def test_a_credential_request_the_server_cannot_use_is_the_clients_fault(server_setup):
    server = ServerConnection(
        _CountingSetup(server_setup), os.urandom, opaque=_RefusingCredentialOpaque(os.urandom), now=0.0
    )
    server.receive_data(_login_start(1), 0.0)
    only(_drain(server), LoginRequested)
    server.accept_login(1, USER_ID, bytes(REGISTRATION_UPLOAD_SIZE))
    assert _drain(server) == [SessionFailed(1, ErrorCode.MALFORMED, "OPAQUE credential request failed", True)]
    ((_, abort),) = _aborts(server.data_to_send())
    assert abort.code is ErrorCode.MALFORMED


def test_reject_session_takes_a_reason_of_exactly_255_characters(world):
    pair = world.pair()
    sid = pair.client.open_request_session(ACCOUNT, PASSWORD)
    pair.server.receive_data(pair.client.data_to_send(), pair.now)
    only(_drain(pair.server), LoginRequested)
    reason = "r" * 255
    pair.server.reject_session(sid, ErrorCode.THROTTLED, reason)
    failed = only(pair.to_client(pair.server.data_to_send()), SessionFailed)
    assert (failed.code, failed.reason) == (ErrorCode.THROTTLED, reason)


def test_rejecting_a_login_before_it_started_is_no_failed_login(world):
    """Refused at the decision step (e.g. throttled): no password was tried, no LoginFailed."""
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = pair.client.open_request_session(ACCOUNT, PASSWORD)
    pair.server.receive_data(pair.client.data_to_send(), pair.now)
    only(_drain(pair.server), LoginRequested)
    pair.server.reject_session(sid, ErrorCode.THROTTLED, "slow down")
    assert _drain(pair.server) == []
    assert pair.server.session_state(sid) is State.CLOSED


def test_close_session_is_only_for_established_sessions(server_setup):
    server = _server(server_setup, now=0.0)
    server.receive_data(_login_start(1), 0.0)
    only(_drain(server), LoginRequested)
    with pytest.raises(
        LocalProtocolError, match="cannot close a request session in state AWAIT_LOGIN_DECISION"
    ):
        server.close_session(1)
    assert server.session_state(1) is State.AWAIT_LOGIN_DECISION
    assert server.data_to_send() == b""


def test_send_response_for_session_id_zero_or_one_never_opened_is_a_local_error(world):
    pair, sid = _established(world)
    with pytest.raises(LocalProtocolError, match="no session 0"):
        pair.server.send_response(0, 1, b"a")
    with pytest.raises(LocalProtocolError, match=f"no session {sid + 1}"):
        pair.server.send_response(sid + 1, 1, b"a")
    pair.client.close_session(sid)
    pair.pump()
    assert pair.server.send_response(sid, 1, b"a") is False  # an id that existed: dropped quietly


def test_authenticated_sessions_counts_established_request_sessions(world):
    pair = world.pair()
    register(pair, ACCOUNT)
    assert pair.server.authenticated_sessions == 0
    login(pair, ACCOUNT)
    assert pair.server.authenticated_sessions == 1


# ----------------------------------------------------------- answers and request limits


def test_every_answer_given_while_detached_reaches_the_resumed_session(server_setup):
    world = FakeWorld(server_setup, app=HoldingApp())
    pair, sid = _established(world)
    first = pair.client.send_request(sid, b"one")
    second = pair.client.send_request(sid, b"two")
    pair.pump()
    (detached,) = lose(pair)
    assert pair.server.send_response(sid, first, b"answer one") is True
    assert pair.server.send_response(sid, second, b"answer two") is True
    assert pair.server._departed == {}  # nothing is pending any more
    fresh = world.pair()
    new_sid = fresh.client.resume_session(detached)
    events = fresh.pump()
    assert [e for e in events if isinstance(e, ResponseReceived)] == [
        ResponseReceived(new_sid, first, b"answer one"),
        ResponseReceived(new_sid, second, b"answer two"),
    ]


def test_a_connection_forgets_a_departed_session_once_it_has_expired(server_setup):
    world = FakeWorld(server_setup, app=HoldingApp())
    pair, sid = _established(world)
    pair.client.send_request(sid, b"q")
    pair.pump()
    (held,) = world.app.held
    lose(pair)
    assert sid in pair.server._departed
    world.registry.handle_timer(300.0)  # expires while detached
    assert pair.server.send_response(sid, held.request_id, b"too late") is False
    assert pair.server._departed == {}


def test_answering_the_last_allowed_request_closes_the_session(server_setup):
    """NET-11: with max_requests_per_session=1 the answer goes out, then CLOSE(REQUEST_LIMIT)."""
    world = FakeWorld(server_setup, ServerConfig(max_requests_per_session=1), app=HoldingApp())
    pair, sid = _established(world)
    user_id = world.app.accounts[ACCOUNT].user_id
    request_id = pair.client.send_request(sid, b"q")
    pair.pump()
    assert pair.server.send_response(sid, request_id, b"a") is True
    assert [kind for kind, _, _ in parsed(pair.server.data_to_send())] == [
        FrameType.RESPONSE,
        FrameType.CLOSE,
    ]
    assert pair.server.session_state(sid) is State.CLOSED
    assert _drain(pair.server) == [SessionClosed(sid, ErrorCode.REQUEST_LIMIT, user_id)]


def test_the_answer_and_the_request_limit_close_reach_the_client_in_order(server_setup):
    world = FakeWorld(server_setup, ServerConfig(max_requests_per_session=1), app=HoldingApp())
    pair, sid = _established(world)
    request_id = pair.client.send_request(sid, b"q")
    pair.pump()
    pair.server.send_response(sid, request_id, b"a")
    assert pair.pump() == [
        ResponseReceived(sid, request_id, b"a"),
        SessionClosed(sid, ErrorCode.REQUEST_LIMIT),
    ]
    assert len(world.registry) == 0


def test_each_request_counts_once_towards_the_session_limit(server_setup):
    world = FakeWorld(server_setup, ServerConfig(max_requests_per_session=2))
    pair, sid = _established(world)
    pair.client.send_request(sid, b"one")
    assert [type(e) for e in pair.pump()] == [ResponseReceived]
    assert pair.server.session_state(sid) is State.ESTABLISHED
    pair.client.send_request(sid, b"two")
    assert [type(e) for e in pair.pump()] == [ResponseReceived, SessionClosed]


def test_more_requests_in_flight_than_the_server_allows_end_the_session(server_setup):
    world = FakeWorld(server_setup, ServerConfig(max_requests_in_flight=1), app=HoldingApp())
    pair, sid = _established(world)
    pair.client.send_request(sid, b"one")
    pair.client.send_request(sid, b"two")
    events = pair.pump()
    assert len(world.app.held) == 1
    failed = only(pair.server_events, SessionFailed)
    assert (failed.code, failed.reason, failed.remote) == (
        ErrorCode.LIMIT_EXCEEDED,
        "too many requests in flight",
        True,
    )
    assert only(events, SessionFailed).code is ErrorCode.LIMIT_EXCEEDED


def test_the_servers_last_sequence_number_is_kept_for_close(world):
    """With two sequence numbers left the answer goes out; with one left the session ends with
    CLOSE(SEQUENCE_EXHAUSTED) instead of the answer."""
    pair, sid = _established(world)
    pair.server._sessions[sid].channel.send_seq = MAX_SEQ - 2
    pair.client._sessions[sid].channel.recv_seq = MAX_SEQ - 2
    first = pair.client.send_request(sid, b"one")
    assert pair.pump() == [ResponseReceived(sid, first, b"one")]
    pair.client.send_request(sid, b"two")
    assert pair.pump() == [SessionClosed(sid, ErrorCode.SEQUENCE_EXHAUSTED)]
    closed = only(pair.server_events, SessionClosed)
    assert (closed.session_id, closed.code) == (sid, ErrorCode.SEQUENCE_EXHAUSTED)


# --------------------------------------------------------- clients that break the rules


def test_a_replayed_request_ends_the_session_as_the_clients_fault(world):
    pair, sid = _established(world)
    pair.client.send_request(sid, b"q")
    request = pair.client.data_to_send()
    pair.to_server(request)
    pair.to_client(pair.server.data_to_send())
    pair.to_server(request)
    failed = only(pair.server_events, SessionFailed)
    assert (failed.code, failed.reason, failed.remote) == (
        ErrorCode.BAD_RECORD,
        "replayed or reordered record",
        True,
    )
    assert not any(isinstance(e, LoginFailed) for e in pair.server_events)


def test_a_login_finish_that_does_not_verify_is_a_failed_login_not_a_protocol_fault(world):
    """A wrong proof is an authentication failure (remote=False: no peer misbehaviour claimed)."""
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = pair.client.open_request_session(ACCOUNT, PASSWORD)
    pair.to_server(pair.client.data_to_send())
    pair.server.data_to_send()  # LOGIN_RESPONSE, never delivered
    pair.to_server(forge(FrameType.LOGIN_FINISH, sid, LoginFinish(bytes(64)).encode()))
    failed = only(pair.server_events, SessionFailed)
    assert (failed.code, failed.remote) == (ErrorCode.AUTHENTICATION_FAILED, False)
    assert only(pair.server_events, LoginFailed).account_name == ACCOUNT


def test_the_server_reports_successful_logins_only(world):
    pair = world.pair()
    register(pair, ACCOUNT)
    assert not any(isinstance(e, LoginSucceeded) for e in pair.server_events)  # a registration
    sid = login(pair, ACCOUNT).session_id
    user_id = world.app.accounts[ACCOUNT].user_id
    assert only(pair.server_events, LoginSucceeded) == LoginSucceeded(sid, ACCOUNT, user_id)


def test_an_abort_from_the_client_ends_the_session_with_its_reason_and_no_reply(world):
    pair, sid = _established(world)
    pair.to_server(forge(FrameType.ABORT, sid, Abort(ErrorCode.CLIENT_CLOSED, "bye").encode()))
    assert only(pair.server_events, SessionFailed) == SessionFailed(sid, ErrorCode.CLIENT_CLOSED, "bye", True)
    assert pair.server.data_to_send() == b""


def test_an_abort_without_a_reason_is_reported_with_its_code_name(world):
    pair, sid = _established(world)
    pair.to_server(forge(FrameType.ABORT, sid, Abort(ErrorCode.INTERNAL_ERROR, "").encode()))
    failed = only(pair.server_events, SessionFailed)
    assert (failed.reason, failed.remote) == ("INTERNAL_ERROR", True)


def test_an_abort_that_does_not_parse_still_ends_the_session_without_a_reply(world):
    pair, sid = _established(world)
    pair.to_server(forge(FrameType.ABORT, sid, b"\x00"))
    failed = only(pair.server_events, SessionFailed)
    assert (failed.session_id, failed.code, failed.remote) == (sid, ErrorCode.MALFORMED, True)
    assert pair.server.data_to_send() == b""
    assert pair.server.session_state(sid) is State.CLOSED


# --------------------------------------------------------------- opening sessions


def test_an_opening_frame_on_the_last_used_session_id_is_refused(server_setup):
    server = _server(server_setup, now=0.0)
    server.receive_data(_login_start(1), 0.0)
    only(_drain(server), LoginRequested)
    server.reject_session(1, ErrorCode.THROTTLED, "later")
    server.data_to_send()
    server.receive_data(_login_start(1), 0.0)
    assert _drain(server) == []
    ((sid, abort),) = _aborts(server.data_to_send())
    assert (sid, abort.code) == (1, ErrorCode.BAD_SESSION_ID)


def test_a_frame_that_opens_nothing_on_a_new_id_is_refused_unless_it_is_an_abort(server_setup):
    server = _server(server_setup, now=0.0)
    server.receive_data(forge(FrameType.REQUEST, 5, b"\x00" * 30), 0.0)
    assert _drain(server) == []
    ((sid, abort),) = _aborts(server.data_to_send())
    assert (sid, abort.code, abort.reason) == (
        5,
        ErrorCode.UNEXPECTED_FRAME,
        "REQUEST does not open a session",
    )
    server.receive_data(forge(FrameType.ABORT, 6, Abort(ErrorCode.CLIENT_CLOSED).encode()), 0.0)
    assert _drain(server) == []
    assert server.data_to_send() == b""  # an ABORT is never answered with an ABORT


def test_a_connection_carries_at_most_max_sessions_per_connection(server_setup):
    server = _server(server_setup, config=ServerConfig(max_sessions_per_connection=1), now=0.0)
    server.receive_data(_login_start(1) + _login_start(2), 0.0)
    assert [e.session_id for e in _drain(server)] == [1]
    ((sid, abort),) = _aborts(server.data_to_send())
    assert (sid, abort.code) == (2, ErrorCode.LIMIT_EXCEEDED)


class _Gate:
    def __init__(self, admit: bool) -> None:
        self.open = admit
        self.refunds: list[FrameType] = []

    def admit(self, frame_type: FrameType, now: float) -> bool:
        return self.open

    def refund(self, frame_type: FrameType, now: float) -> None:
        self.refunds.append(frame_type)


def test_admission_decides_whether_an_opening_frame_is_looked_at(server_setup):
    """NET-13: a refused frame gets ABORT(RATE_LIMITED) and a remote SessionFailed; an admitted one
    goes on normally."""
    refusing = _server(server_setup, admission=_Gate(False), now=0.0)
    refusing.receive_data(_login_start(1), 0.0)
    reason = "too many attempts from this address; retry later"
    assert _drain(refusing) == [SessionFailed(1, ErrorCode.RATE_LIMITED, reason, True)]
    ((_, abort),) = _aborts(refusing.data_to_send())
    assert abort.code is ErrorCode.RATE_LIMITED
    admitting = _server(server_setup, admission=_Gate(True), now=0.0)
    admitting.receive_data(_login_start(1), 0.0)
    assert only(_drain(admitting), LoginRequested).session_id == 1


def test_an_opening_frame_that_does_not_parse_is_the_clients_fault(server_setup):
    server = _server(server_setup, now=0.0)
    server.receive_data(forge(FrameType.LOGIN_START, 1, b"\x05"), 0.0)
    (failed,) = _drain(server)
    assert isinstance(failed, SessionFailed)
    assert (failed.session_id, failed.code, failed.remote) == (1, ErrorCode.MALFORMED, True)
    ((_, abort),) = _aborts(server.data_to_send())
    assert abort.code is ErrorCode.MALFORMED


def test_a_session_may_open_on_the_highest_session_id(server_setup):
    server = _server(server_setup, now=0.0)
    server.receive_data(_login_start(MAX_SESSION_ID), 0.0)
    assert only(_drain(server), LoginRequested).session_id == MAX_SESSION_ID


# ------------------------------------------------------------------------ resumption


def test_a_resume_at_the_exact_idle_deadline_is_too_late(server_setup):
    world = FakeWorld(server_setup, ServerConfig(idle_timeout=50.0))
    pair, _ = _established(world)
    (detached,) = lose(pair)
    fresh = world.pair(now=50.0)
    sid = fresh.client.resume_session(detached)
    failed = only(fresh.pump(), SessionFailed)
    assert (failed.session_id, failed.code) == (sid, ErrorCode.UNKNOWN_SESSION)
    assert len(world.registry) == 0


def test_a_resume_claiming_records_never_sent_ends_the_detached_session_for_good(world):
    """The stored state is older than the client's: it can never be resumed, so it is dropped."""
    pair, _ = _established(world)
    (detached,) = lose(pair)
    channel = detached._session.channel
    record = channel.seal_resume(Resume(os.urandom(32), channel.received_total + 1).encode())
    fresh = world.pair()
    fresh.to_server(forge(FrameType.RESUME, 1, ResumeEnvelope(channel.session_handle, record).encode()))
    assert only(fresh.server_events, SessionFailed).code is ErrorCode.UNKNOWN_SESSION
    assert channel.session_handle not in world.registry
    assert world.registry.detached_count() == 0


def test_a_resumed_session_stops_the_new_connections_idle_clock(world):
    pair, _ = _established(world)
    (detached,) = lose(pair)
    fresh = world.pair(now=0.0)
    assert fresh.server.get_timer() == 10.0  # idle so far
    fresh.client.resume_session(detached)
    only(fresh.pump(), SessionResumed)
    assert fresh.server.get_timer() == 300.0  # the session's idle deadline only


def test_a_connection_whose_session_resumed_elsewhere_is_closed_when_idle(world):
    old, _ = _established(world)
    old.client.connection_lost()  # the old server connection never notices
    (detached,) = old.client.take_detached_sessions()
    fresh = world.pair()
    fresh.client.resume_session(detached)
    only(fresh.pump(), SessionResumed)
    assert old.server.get_timer() is not None
    old.server.handle_timer(20.0)
    assert only(_drain(old.server), ConnectionFailed).reason == "no session on this connection"


def test_a_session_closed_with_a_request_in_progress_awaits_no_answer(server_setup):
    """The client logs out before the answer is ready: the ended session keeps nothing pending
    and the late answer is dropped."""
    world = FakeWorld(server_setup, app=HoldingApp())
    pair, sid = _established(world)
    session = pair.server._sessions[sid]
    request_id = pair.client.send_request(sid, b"slow")
    pair.pump()
    pair.client.close_session(sid)
    pair.pump()
    assert session.state is State.CLOSED and not session.pending
    assert pair.server.send_response(sid, request_id, b"late") is False
    assert pair.server.data_to_send() == b""


# ------------------------------------------------------- issue 13 survivors


@pytest.mark.parametrize("second", ["accept_login", "accept_unknown_login"])
def test_a_second_login_decision_is_refused_and_changes_nothing(server_setup, second):
    """accept_login / accept_unknown_login twice: the second is a LocalProtocolError before any
    OPAQUE work, and the login the first one started goes on untouched."""
    server = _server(server_setup, now=0.0)
    server.receive_data(_login_start(1), 0.0)
    (requested,) = _drain(server)
    assert isinstance(requested, LoginRequested)
    server.accept_unknown_login(1)
    first = parsed(server.data_to_send())
    assert [kind for kind, _, _ in first] == [FrameType.LOGIN_RESPONSE]
    with pytest.raises(LocalProtocolError, match="cannot accept_login"):
        if second == "accept_login":
            server.accept_login(1, USER_ID, bytes(REGISTRATION_UPLOAD_SIZE))
        else:
            server.accept_unknown_login(1)
    assert server.data_to_send() == b""  # no second LOGIN_RESPONSE, no ABORT
    assert server.session_state(1) is State.AWAIT_LOGIN_FINISH


def test_an_answer_for_session_one_after_it_ended_is_dropped_not_refused(world):
    """send_response for an ended session id of this connection returns False; session 1,
    the first id a connection uses, included."""
    world.app = HoldingApp()
    pair = world.pair()
    register(pair, ACCOUNT)  # session 1
    sid = login(pair, ACCOUNT).session_id
    pair.client.send_request(sid, b"late")
    pair.pump()
    (held,) = world.app.held
    pair.client.close_session(sid)
    pair.pump()
    assert pair.server.send_response(held.session_id, held.request_id, b"too late") is False
    # Session 1 was the registration session: ended long ago, its id is spent.
    assert pair.server.send_response(1, 1, b"never asked") is False
    with pytest.raises(LocalProtocolError):
        pair.server.send_response(sid + 1, 1, b"no such session yet")


def test_an_answer_for_a_session_that_expired_while_detached_is_dropped(world):
    """A request is pending in the application when its connection dies; the session then
    expires, found stale by a RESUME. The late answer is dropped (False), not cached for a
    resumption that can never come."""
    world = FakeWorld(world.setup, ServerConfig(idle_timeout=50.0), app=HoldingApp())
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = login(pair, ACCOUNT).session_id
    pair.client.send_request(sid, b"slow")
    pair.pump()
    (held,) = world.app.held
    (detached,) = lose(pair)
    late = world.pair(now=100.0)
    late.client.resume_session(detached)
    late.pump()
    assert only(late.server_events, SessionFailed).code is ErrorCode.UNKNOWN_SESSION
    assert pair.server.send_response(held.session_id, held.request_id, b"done") is False
