"""Edge cases of the server state machine and the session registry: the application's
commands used wrongly, clients that break the rules mid-session, broken session stores,
and resumptions of sessions that expired or were never in the state the client claims."""

from __future__ import annotations

import os

import pytest

from keymgmt.adapters import InMemoryPair
from keymgmt_proto import (
    NEED_DATA,
    ClientConnection,
    ConnectionFailed,
    ErrorCode,
    FrameType,
    LocalProtocolError,
    LoginFailed,
    LoginRequested,
    LoginSucceeded,
    OpaqueStepRequired,
    RealOpaque,
    RegistrationCompleted,
    RegistrationRequested,
    RequestReceived,
    ResponseReceived,
    ServerConfig,
    ServerConnection,
    SessionClosed,
    SessionEstablished,
    SessionFailed,
    SessionRegistry,
    SessionResumed,
    State,
)
from keymgmt_proto.testing import FakeOpaque
from keymgmt_proto.wire import (
    Abort,
    CompleteRegistration,
    LoginStart,
    RegStart,
    Request,
    Resume,
    ResumeEnvelope,
)

from ..support.fake_pairs import PASSWORD, FakeWorld, HoldingApp, lose
from ..support.frames import forge, frame_type, parsed, split_frames
from ..support.helpers import login, only, register

ACCOUNT = b"alice@example.org"
USER_ID = bytes(range(16))


def _abort_code(data: bytes) -> ErrorCode:
    (frame,) = split_frames(data)
    assert frame_type(frame) is FrameType.ABORT
    return Abort.decode(frame[10:]).code


def _drain(conn) -> list:
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def _manual_server(setup, **kwargs) -> ServerConnection:
    return ServerConnection(setup, os.urandom, opaque=FakeOpaque(os.urandom), **kwargs)


def _fake_client() -> ClientConnection:
    return ClientConnection(os.urandom, opaque=FakeOpaque(os.urandom))


# ------------------------------------------------------------ registry and config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sealing_key": None, "random": os.urandom},
        {"sealing_key": bytes(16), "random": os.urandom},
        {"sealing_key": bytes(32), "random": None},
    ],
    ids=["no-key", "short-key", "no-random"],
)
def test_a_session_store_needs_a_sealing_key_and_randomness(kwargs):
    with pytest.raises(ValueError, match="32-byte sealing_key and a random source"):
        SessionRegistry(store=_DictStore(), **kwargs)


def test_a_connection_and_its_registry_must_agree_on_the_config(server_setup):
    registry = SessionRegistry(ServerConfig(idle_timeout=60.0))
    with pytest.raises(ValueError, match="config differs"):
        ServerConnection(server_setup, os.urandom, config=ServerConfig(), registry=registry, now=0.0)
    # The same policy, passed twice, is fine.
    same = ServerConnection(
        server_setup, os.urandom, config=ServerConfig(idle_timeout=60.0), registry=registry, now=0.0
    )
    assert same.config.idle_timeout == 60.0 and same.registry is registry


def test_the_registry_holds_a_session_by_handle_until_it_ends(world):
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = login(pair, ACCOUNT).session_id
    handle = pair.client._sessions[sid].channel.session_handle
    assert handle in world.registry and len(world.registry) == 1
    pair.client.close_session(sid)
    pair.pump()
    assert handle not in world.registry and len(world.registry) == 0


def test_detached_sessions_expire_only_once_their_deadline_passes(server_setup):
    world = FakeWorld(server_setup, ServerConfig(idle_timeout=50.0))
    pair = world.pair(now=0.0)
    register(pair, ACCOUNT)
    user_id = login(pair, ACCOUNT).user_id
    (succeeded,) = [e for e in pair.server_events if isinstance(e, LoginSucceeded)]
    lose(pair)
    assert world.registry.detached_count() == 1
    assert world.registry.get_timer() == 50.0
    assert world.registry.handle_timer(49.0) == []
    assert world.registry.detached_count() == 1
    (expired,) = world.registry.handle_timer(50.0)
    assert expired == (user_id, ErrorCode.IDLE_TIMEOUT, succeeded.handle)
    assert expired.handle is succeeded.handle is not None
    assert len(world.registry) == 0 and world.registry.get_timer() is None


def test_the_registry_timer_is_a_bound_kept_without_looking_at_every_session(server_setup, monkeypatch):
    """Every idle connection asks the registry for its timer: that must not walk every
    session (at 50 connections of 2 sessions each it was paid every 2 requests). The timer
    may be early once a detached session resumed; handling it makes it exact again."""
    world = FakeWorld(server_setup, ServerConfig(idle_timeout=50.0))
    pair = world.pair(now=0.0)
    register(pair, ACCOUNT)
    for _ in range(20):
        login(pair, ACCOUNT)
    assert world.registry.get_timer() is None  # attached sessions are their connection's
    (detached, *others) = lose(pair)
    assert world.registry.get_timer() == 50.0
    looked = []
    deadline = type(next(iter(world.registry._sessions.values()))).deadline
    monkeypatch.setattr(
        type(next(iter(world.registry._sessions.values()))),
        "deadline",
        lambda self, config: looked.append(self) or deadline(self, config),
    )
    assert [world.registry.get_timer() for _ in range(10)] == [50.0] * 10 and looked == []
    monkeypatch.undo()
    again = world.pair(now=20.0)
    for session in (detached, *others):  # every one resumes: the bound is now early
        again.client.resume_session(session)
    assert len([e for e in again.pump() if isinstance(e, SessionResumed)]) == 20
    assert world.registry.get_timer() == 50.0
    assert world.registry.handle_timer(50.0) == [] and world.registry.get_timer() is None
    assert len(lose(again)) == 20  # detached again at 20: their deadline is now 70
    assert world.registry.get_timer() == 70.0


class _DictStore:
    def __init__(self) -> None:
        self.saved: dict[bytes, bytes] = {}

    def save(
        self,
        handle: bytes,
        sealed_state: bytes,
        expires_at: float,
        user_id: bytes | None = None,
        credentials_version: int | None = None,
    ) -> None:
        self.saved[handle] = sealed_state

    def claim(self, handle: bytes) -> bytes | None:
        return self.saved.pop(handle, None)


class _UnreachableStore(_DictStore):
    """Saves fine, then the database goes away before anyone claims."""

    def claim(self, handle: bytes) -> bytes | None:
        raise ConnectionError("database unreachable")


def test_a_store_that_fails_to_claim_means_no_resumable_session(server_setup):
    store = _UnreachableStore()
    registry = SessionRegistry(store=store, sealing_key=bytes(32), random=os.urandom)
    world = FakeWorld(server_setup, registry=registry)
    pair = world.pair()
    register(pair, ACCOUNT)
    login(pair, ACCOUNT)
    (detached,) = lose(pair)
    assert len(store.saved) == 1 and len(registry) == 0  # handed to the store
    fresh = world.pair()
    sid = fresh.client.resume_session(detached)
    failed = only(fresh.pump(), SessionFailed)
    assert (failed.session_id, failed.code) == (sid, ErrorCode.UNKNOWN_SESSION)
    assert only(fresh.server_events, SessionFailed).code is ErrorCode.UNKNOWN_SESSION
    assert fresh.server.failed is None  # one session refused, the connection carries on


# ------------------------------------------------------------- connection lifetime


def test_a_failed_connection_has_no_deadlines_and_ignores_the_timer(server_setup):
    server = _manual_server(server_setup, now=0.0)
    assert server.get_timer() == 10.0  # an idle connection is closed after 10 s
    server.close("shutting down")
    assert parsed(server.data_to_send())[0][0] is FrameType.GOAWAY
    assert server.get_timer() is None
    server.handle_timer(100.0)
    assert server.data_to_send() == b""
    assert _drain(server) == [ConnectionFailed(ErrorCode.OK, "shutting down", False)]


def test_losing_the_connection_twice_reports_it_once(server_setup):
    server = _manual_server(server_setup, now=0.0)
    server.connection_lost()
    server.connection_lost()
    assert _drain(server) == [ConnectionFailed(ErrorCode.CONNECTION_LOST, "connection lost", False)]
    assert server.data_to_send() == b""


# ------------------------------------------------------ the application's commands


def _registration_requested(server_setup) -> tuple[ServerConnection, int]:
    server = _manual_server(server_setup, now=0.0)
    client = _fake_client()
    sid = client.open_registration(ACCOUNT, PASSWORD)
    server.receive_data(client.data_to_send(), 0.0)
    only(_drain(server), RegistrationRequested)
    return server, sid


def _login_requested(world: FakeWorld) -> tuple[InMemoryPair, int, LoginRequested]:
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = pair.client.open_request_session(ACCOUNT, PASSWORD)
    pair.server.receive_data(pair.client.data_to_send(), pair.now)
    return pair, sid, only(_drain(pair.server), LoginRequested)


def test_accept_registration_needs_a_16_byte_user_id(server_setup):
    server, sid = _registration_requested(server_setup)
    with pytest.raises(LocalProtocolError, match="user_id must be 16 bytes"):
        server.accept_registration(sid, bytes(15))
    assert server.session_state(sid) is State.AWAIT_REG_DECISION
    assert server.data_to_send() == b""
    server.accept_registration(sid, USER_ID)
    assert [t for t, _, _ in parsed(server.data_to_send())] == [FrameType.REG_RESPONSE]


def test_a_decision_the_session_state_does_not_allow_is_a_local_error(server_setup):
    server, sid = _registration_requested(server_setup)
    server.accept_registration(sid, USER_ID)
    server.data_to_send()
    with pytest.raises(LocalProtocolError, match="cannot accept_registration a registration session"):
        server.accept_registration(sid, USER_ID)
    with pytest.raises(LocalProtocolError, match="cannot confirm_registration"):
        server.confirm_registration(sid)
    assert server.session_state(sid) is State.AWAIT_REG_UPLOAD
    assert server.data_to_send() == b""


@pytest.mark.parametrize(
    ("user_id", "record", "message"),
    [(bytes(15), bytes(192), "user_id must be 16 bytes"), (USER_ID, bytes(191), "wrong size")],
    ids=["short-user-id", "short-record"],
)
def test_accept_login_checks_what_the_application_passes(world, user_id, record, message):
    pair, sid, _ = _login_requested(world)
    with pytest.raises(LocalProtocolError, match=message):
        pair.server.accept_login(sid, user_id, record)
    assert pair.server.session_state(sid) is State.AWAIT_LOGIN_DECISION
    assert pair.server.data_to_send() == b""


@pytest.mark.parametrize(
    ("code", "reason", "message"),
    [
        (ErrorCode.OK, "", "needs an error code"),
        (ErrorCode.ACCOUNT_EXISTS, "caf\u00e9", "printable ASCII"),
        (ErrorCode.ACCOUNT_EXISTS, "a" * 256, "printable ASCII"),
        (ErrorCode.ACCOUNT_EXISTS, "two\nlines", "printable ASCII"),
    ],
    ids=["ok-code", "non-ascii", "too-long", "control-character"],
)
def test_reject_session_needs_an_error_code_and_a_printable_reason(server_setup, code, reason, message):
    server, sid = _registration_requested(server_setup)
    with pytest.raises(LocalProtocolError, match=message):
        server.reject_session(sid, code, reason)
    assert server.session_state(sid) is State.AWAIT_REG_DECISION
    assert server.data_to_send() == b""


def test_rejecting_a_login_after_its_response_went_out_counts_as_a_failed_login(world):
    """The client may already have tested a password guess (NET-10), so the app hears LoginFailed."""
    pair, sid, requested = _login_requested(world)
    world.app(pair.server, requested)  # accept_login: LOGIN_RESPONSE queued
    assert pair.server.session_state(sid) is State.AWAIT_LOGIN_FINISH
    pair.server.reject_session(sid, ErrorCode.INTERNAL_ERROR, "storage unavailable")
    user_id = world.app.accounts[ACCOUNT].user_id
    assert _drain(pair.server) == [LoginFailed(sid, ACCOUNT, user_id)]
    events = pair.to_client(pair.server.data_to_send())
    failed = only(events, SessionFailed)
    assert (failed.code, failed.reason) == (ErrorCode.INTERNAL_ERROR, "storage unavailable")
    assert pair.server.session_state(sid) is State.CLOSED


def test_send_response_only_answers_requests_that_await_an_answer(server_setup):
    world = FakeWorld(server_setup, app=HoldingApp())
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = login(pair, ACCOUNT).session_id
    request_id = pair.client.send_request(sid, b"q")
    pair.pump()
    with pytest.raises(LocalProtocolError, match=f"request {request_id + 1} is not awaiting"):
        pair.server.send_response(sid, request_id + 1, b"a")
    assert pair.server.send_response(sid, request_id, b"a") is True
    with pytest.raises(LocalProtocolError, match="is not awaiting"):
        pair.server.send_response(sid, request_id, b"again")  # answered once only
    assert only(pair.pump(), ResponseReceived).body == b"a"


def test_a_response_too_large_for_a_frame_is_refused_and_the_request_stays_open(server_setup):
    world = FakeWorld(server_setup, ServerConfig(max_payload=1024), app=HoldingApp())
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = login(pair, ACCOUNT).session_id
    request_id = pair.client.send_request(sid, b"q")
    pair.pump()
    with pytest.raises(LocalProtocolError, match="larger than the frame limit") as info:
        pair.server.send_response(sid, request_id, bytes(1024 - 28 + 1))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert pair.server.data_to_send() == b""
    assert pair.server.send_response(sid, request_id, bytes(1024 - 28)) is True
    assert len(only(pair.pump(), ResponseReceived).body) == 996


# ------------------------------------------------------ clients that break the rules


def test_a_registration_that_logs_in_as_another_account_is_ended(world):
    pair = world.pair()
    sid = pair.client.open_registration(ACCOUNT, PASSWORD)
    pair.to_server(pair.client.data_to_send())
    pair.to_client(pair.server.data_to_send())
    upload, login_start = split_frames(pair.client.data_to_send())
    original = LoginStart.decode(login_start[10:])
    forged = forge(FrameType.LOGIN_START, sid, LoginStart(b"mallory", original.credential_request).encode())
    pair.to_server(upload + forged)
    failed = only(pair.server_events, SessionFailed)
    assert (failed.code, failed.reason) == (ErrorCode.INVALID_REQUEST, "login names another account")
    assert _abort_code(pair.server.data_to_send()) is ErrorCode.INVALID_REQUEST
    assert pair.server.session_state(sid) is State.CLOSED
    assert world.app.accounts == {}


def test_a_completed_registration_must_carry_the_session_user_id(world):
    pair = world.pair()
    sid = pair.client.open_registration(ACCOUNT, PASSWORD)
    pair.to_server(pair.client.data_to_send())  # REG_START
    pair.to_client(pair.server.data_to_send())  # REG_RESPONSE
    pair.to_server(pair.client.data_to_send())  # REG_UPLOAD, LOGIN_START
    pair.to_client(pair.server.data_to_send())  # LOGIN_RESPONSE
    channel = pair.client._sessions[sid].channel  # the keys the client just derived
    pair.to_server(pair.client.data_to_send())  # LOGIN_FINISH; the server's WELCOME is held back
    assert [t for t, _, _ in parsed(pair.server.data_to_send())] == [FrameType.WELCOME]
    other = CompleteRegistration(b"\xee" * 16, bytes(60))
    record = channel.seal(FrameType.COMPLETE_REGISTRATION, other.encode())
    pair.to_server(forge(FrameType.COMPLETE_REGISTRATION, sid, record.encode()))
    failed = only(pair.server_events, SessionFailed)
    assert (failed.code, failed.reason) == (ErrorCode.INVALID_REQUEST, "user_id does not match the session")
    assert not any(isinstance(e, RegistrationCompleted) for e in pair.server_events)
    assert _abort_code(pair.server.data_to_send()) is ErrorCode.INVALID_REQUEST
    assert world.app.accounts == {}


def test_a_request_id_reused_after_its_answer_left_the_cache_ends_the_session(server_setup):
    world = FakeWorld(server_setup, ServerConfig(max_requests_in_flight=1))
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = login(pair, ACCOUNT).session_id
    for body in (b"one", b"two"):
        pair.client.send_request(sid, body)
        only(pair.pump(), ResponseReceived)
    channel = pair.client._sessions[sid].channel
    # Request 2 is still cached: a repeat gets the same answer again, nothing new happens.
    again = channel.seal(FrameType.REQUEST, Request(2, b"two").encode())
    pair.to_server(forge(FrameType.REQUEST, sid, again.encode()))
    assert [t for t, _, _ in parsed(pair.server.data_to_send())] == [FrameType.RESPONSE]
    assert sum(isinstance(e, RequestReceived) for e in pair.server_events) == 2
    # Request 1 left the one-entry cache: reusing its id is a fault.
    reused = channel.seal(FrameType.REQUEST, Request(1, b"one again").encode())
    pair.to_server(forge(FrameType.REQUEST, sid, reused.encode()))
    failed = only(pair.server_events, SessionFailed)
    assert (failed.code, failed.reason) == (ErrorCode.INVALID_REQUEST, "request id reused")
    assert _abort_code(pair.server.data_to_send()) is ErrorCode.INVALID_REQUEST
    assert sum(isinstance(e, RequestReceived) for e in pair.server_events) == 2


def test_a_request_past_the_session_limit_closes_the_session_even_with_one_pending(server_setup):
    world = FakeWorld(server_setup, ServerConfig(max_requests_per_session=1), app=HoldingApp())
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = login(pair, ACCOUNT).session_id
    pair.client.send_request(sid, b"allowed")
    pair.client.send_request(sid, b"over the limit")
    events = pair.pump()
    (held,) = world.app.held
    assert held.body == b"allowed"
    server_closed = only(pair.server_events, SessionClosed)
    assert (server_closed.session_id, server_closed.code) == (sid, ErrorCode.REQUEST_LIMIT)
    assert only(events, SessionClosed).code is ErrorCode.REQUEST_LIMIT
    # The answer to the pending request has nowhere to go any more.
    assert pair.server.send_response(sid, held.request_id, b"too late") is False


def test_two_logins_that_derive_the_same_session_handle_do_not_share_a_session(server_setup):
    """A constant random source gives both logins one handle: the second is refused, the first lives."""

    def zeros(n: int) -> bytes:
        return bytes(n)

    world = FakeWorld(server_setup, random=zeros)
    pair = world.pair()
    register(pair, ACCOUNT)
    first = login(pair, ACCOUNT).session_id
    second = pair.client.open_request_session(ACCOUNT, PASSWORD)
    events = pair.pump()
    failed = only(events, SessionFailed)
    assert (failed.session_id, failed.code) == (second, ErrorCode.INTERNAL_ERROR)
    assert not any(isinstance(e, SessionEstablished) for e in events)
    server_failed = only(pair.server_events, SessionFailed)
    assert (server_failed.session_id, server_failed.reason) == (second, "session handle collision")
    # The first session is untouched and keeps working.
    assert pair.server.session_state(first) is State.ESTABLISHED
    pair.client.send_request(first, b"still here")
    assert only(pair.pump(), ResponseReceived).body == b"still here"
    # ...and stays resumable: ending the refused one left the first one's registry entry.
    (detached,) = lose(pair)
    again = world.pair()
    resumed_id = again.client.resume_session(detached)
    assert only(again.pump(), SessionResumed).session_id == resumed_id


# ---------------------------------------------------------------- resumption edges


def test_resuming_an_expired_session_still_attached_elsewhere_expires_it_there(server_setup):
    world = FakeWorld(server_setup, ServerConfig(idle_timeout=10.0))
    old = world.pair(now=0.0)
    register(old, ACCOUNT)
    sid = login(old, ACCOUNT).session_id
    old.client.connection_lost()  # the client gives up; the old server connection never notices
    (detached,) = old.client.take_detached_sessions()
    fresh = world.pair(now=20.0)
    new_sid = fresh.client.resume_session(detached)
    failed = only(fresh.pump(), SessionFailed)
    assert (failed.session_id, failed.code) == (new_sid, ErrorCode.UNKNOWN_SESSION)
    # The old connection ended the session with a sealed CLOSE and told its application.
    ((close_type, close_sid, _),) = parsed(old.server.data_to_send())
    assert (close_type, close_sid) == (FrameType.CLOSE, sid)
    closed = only(_drain(old.server), SessionClosed)
    assert (closed.session_id, closed.code) == (sid, ErrorCode.IDLE_TIMEOUT)
    assert old.server.session_state(sid) is State.CLOSED
    assert len(world.registry) == 0


def _resume_claiming(channel, received_total: int) -> bytes:
    record = channel.seal_resume(Resume(os.urandom(32), received_total).encode())
    return ResumeEnvelope(channel.session_handle, record).encode()


def test_a_resume_claiming_records_never_sent_leaves_the_attached_session_alone(world):
    """A client claiming more records than were sent is refused; the named session stays put."""
    old = world.pair()
    register(old, ACCOUNT)
    sid = login(old, ACCOUNT).session_id
    channel = old.client._sessions[sid].channel
    fresh = world.pair()
    fresh.to_server(forge(FrameType.RESUME, 1, _resume_claiming(channel, channel.received_total + 1)))
    failed = only(fresh.server_events, SessionFailed)
    assert (failed.session_id, failed.code) == (1, ErrorCode.UNKNOWN_SESSION)
    assert "older than the client's" in failed.reason
    assert _abort_code(fresh.server.data_to_send()) is ErrorCode.UNKNOWN_SESSION
    assert old.server.session_state(sid) is State.ESTABLISHED
    assert channel.session_handle in world.registry
    old.client.send_request(sid, b"unaffected")
    assert only(old.pump(), ResponseReceived).body == b"unaffected"


# ------------------------------------------------------------ real OPAQUE failures


def test_a_registration_request_that_is_not_a_group_element_ends_the_session(server_setup):
    server = ServerConnection(server_setup, os.urandom, now=0.0)
    server.receive_data(forge(FrameType.REG_START, 1, RegStart(ACCOUNT, b"\xff" * 32).encode()), 0.0)
    assert isinstance(server.next_event(), RegistrationRequested)
    server.accept_registration(1, USER_ID)
    failed = only(_drain(server), SessionFailed)
    assert (failed.code, failed.reason, failed.remote) == (
        ErrorCode.MALFORMED,
        "OPAQUE registration request failed",
        True,
    )
    assert _abort_code(server.data_to_send()) is ErrorCode.MALFORMED
    assert server.session_state(1) is State.CLOSED


def test_a_registration_upload_that_does_not_parse_ends_the_session(server_setup):
    server = ServerConnection(server_setup, os.urandom, now=0.0)
    request = RealOpaque().client_registration_start(PASSWORD).message
    server.receive_data(forge(FrameType.REG_START, 1, RegStart(ACCOUNT, request).encode()), 0.0)
    assert isinstance(server.next_event(), RegistrationRequested)
    server.accept_registration(1, USER_ID)
    server.data_to_send()
    server.receive_data(forge(FrameType.REG_UPLOAD, 1, b"\xff" * 192), 0.0)
    failed = only(_drain(server), SessionFailed)
    assert (failed.code, failed.reason) == (ErrorCode.MALFORMED, "OPAQUE registration upload failed")
    assert _abort_code(server.data_to_send()) is ErrorCode.MALFORMED


def test_a_credential_request_that_does_not_parse_ends_the_login(server_setup):
    server = ServerConnection(server_setup, os.urandom, now=0.0)
    server.receive_data(forge(FrameType.LOGIN_START, 1, LoginStart(ACCOUNT, b"\xff" * 96).encode()), 0.0)
    assert isinstance(server.next_event(), LoginRequested)
    server.accept_unknown_login(1)
    failed = only(_drain(server), SessionFailed)
    assert (failed.code, failed.reason) == (ErrorCode.MALFORMED, "OPAQUE credential request failed")
    assert _abort_code(server.data_to_send()) is ErrorCode.MALFORMED
    assert not any(isinstance(e, LoginFailed) for e in _drain(server))


def test_a_registration_response_that_does_not_parse_ends_the_client_session():
    client = ClientConnection(os.urandom)
    sid = client.open_registration(ACCOUNT, PASSWORD)
    client.data_to_send()
    client.receive_data(forge(FrameType.REG_RESPONSE, sid, b"\xff" * 64))
    step = client.next_event()
    assert isinstance(step, OpaqueStepRequired)
    assert client.complete_opaque_step(step.run(client.opaque))
    failed = client.next_event()
    assert failed == SessionFailed(sid, ErrorCode.MALFORMED, "OPAQUE registration response failed", True)
    assert _abort_code(client.data_to_send()) is ErrorCode.MALFORMED
    assert client.session_state(sid) is State.CLOSED
