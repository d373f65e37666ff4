"""Edge cases of the client state machine and the framing both roles share: limits on the
caller's input, exhausted counters, a server that misbehaves, and logout during a resumption."""

from __future__ import annotations

import os

import pytest

from keymgmt.adapters import InMemoryPair
from keymgmt_proto import (
    MAX_SESSION_ID,
    ClientConnection,
    ConnectionFailed,
    ErrorCode,
    FrameType,
    LocalProtocolError,
    RegistrationCompleted,
    ResponseReceived,
    ServerConfig,
    ServerConnection,
    SessionClosed,
    SessionFailed,
    SessionResumed,
    State,
)
from keymgmt_proto.testing import FakeOpaque
from keymgmt_proto.wire import (
    MAX_SEQ,
    REGISTRATION_RESPONSE_SIZE,
    REGISTRATION_TOKEN_MAX,
    Abort,
    GoAway,
    Response,
)

from ..support.fake_pairs import PASSWORD, FakeWorld, HoldingApp, fake_client, lose
from ..support.frames import forge, frame_type, split_frames
from ..support.helpers import login, only, register

ACCOUNT = b"alice@example.org"


def _types(data: bytes) -> list[FrameType]:
    return [frame_type(f) for f in split_frames(data)]


# ------------------------------------------------------------------ caller's input


def test_an_oversized_registration_token_is_refused_before_anything_is_sent():
    client = fake_client()
    with pytest.raises(LocalProtocolError, match=f"at most {REGISTRATION_TOKEN_MAX} bytes"):
        client.open_registration(ACCOUNT, PASSWORD, token=bytes(REGISTRATION_TOKEN_MAX + 1))
    assert client.data_to_send() == b""
    # The refused call spent no session id.
    assert client.open_registration(ACCOUNT, PASSWORD, token=bytes(REGISTRATION_TOKEN_MAX)) == 1


def test_a_request_too_large_for_the_frame_limit_is_refused_and_the_largest_that_fits_is_sent(world):
    """Frame payload = seq (8) + request id (4) + body + tag (16) must fit the client's limit."""
    pair = world.pair(client_max_payload=1024)
    register(pair, ACCOUNT)
    sid = login(pair, ACCOUNT).session_id
    with pytest.raises(LocalProtocolError, match="larger than the frame limit") as info:
        pair.client.send_request(sid, bytes(1024 - 28 + 1))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert pair.client.data_to_send() == b""
    request_id = pair.client.send_request(sid, bytes(1024 - 28))
    assert request_id == 1  # the refused request used no id
    response = only(pair.pump(), ResponseReceived)
    assert (response.request_id, len(response.body)) == (1, 996)


def test_request_ids_run_out_at_the_top_of_the_u32_range(world):
    """Id 2**32-1 is the last one a session can use; after it the caller must open a new session."""
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = login(pair, ACCOUNT).session_id
    pair.client._sessions[sid].next_request_id = 2**32 - 1  # as after four billion requests
    assert pair.client.send_request(sid, b"last") == 2**32 - 1
    assert only(pair.pump(), ResponseReceived).request_id == 2**32 - 1
    with pytest.raises(LocalProtocolError, match="request ids exhausted"):
        pair.client.send_request(sid, b"one too many")
    assert pair.client.data_to_send() == b""
    assert pair.client.session_state(sid) is State.ESTABLISHED


def test_session_ids_run_out_for_new_logins_and_for_resumptions(world):
    pair = world.pair()
    register(pair, ACCOUNT)
    login(pair, ACCOUNT)
    (detached,) = lose(pair)
    client = fake_client()
    client._last_session_id = MAX_SESSION_ID  # as after 2**31-1 sessions on one connection
    with pytest.raises(LocalProtocolError, match="session ids exhausted") as opening:
        client.open_request_session(ACCOUNT, PASSWORD)
    with pytest.raises(LocalProtocolError, match="session ids exhausted") as resuming:
        client.resume_session(detached)
    assert opening.value.code is resuming.value.code is ErrorCode.BAD_SESSION_ID
    assert client.data_to_send() == b""
    # The detached session was not used up: it still resumes on a connection with ids left.
    fresh = world.pair()
    sid = fresh.client.resume_session(detached)
    assert only(fresh.pump(), SessionResumed).session_id == sid


def test_a_session_that_has_used_every_resumption_must_log_in_again(world):
    pair = world.pair()
    register(pair, ACCOUNT)
    login(pair, ACCOUNT)
    (detached,) = lose(pair)
    detached._session.channel.resume_seq = MAX_SEQ  # as after 2**64-1 resumptions
    client = fake_client()
    with pytest.raises(LocalProtocolError, match="resumptions exhausted") as info:
        client.resume_session(detached)
    assert info.value.code is ErrorCode.SEQUENCE_EXHAUSTED
    assert client.data_to_send() == b""
    assert client.session_state(1) is State.CLOSED


def test_a_failed_connection_cannot_carry_a_resumption(world):
    pair = world.pair()
    register(pair, ACCOUNT)
    login(pair, ACCOUNT)
    (detached,) = lose(pair)
    client = fake_client()
    client.receive_data(forge(FrameType.GOAWAY, 0, GoAway(ErrorCode.OK, "bye").encode()))
    assert isinstance(client.next_event(), ConnectionFailed)
    with pytest.raises(LocalProtocolError, match="connection has failed"):
        client.resume_session(detached)
    assert client.data_to_send() == b""


# ------------------------------------------------------------- a misbehaving server


def test_a_response_to_a_request_never_sent_ends_the_session(world):
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = login(pair, ACCOUNT).session_id
    server_session = pair.server._sessions[sid]
    pair.server._send_sealed(server_session, FrameType.RESPONSE, Response(99, b"unasked").encode())
    events = pair.to_client(pair.server.data_to_send())
    failed = only(events, SessionFailed)
    assert (failed.session_id, failed.code, failed.remote) == (sid, ErrorCode.INVALID_REQUEST, True)
    assert not any(isinstance(e, ResponseReceived) for e in events)
    assert pair.client.session_state(sid) is State.CLOSED
    (abort_frame,) = split_frames(pair.client.data_to_send())
    assert frame_type(abort_frame) is FrameType.ABORT
    assert Abort.decode(abort_frame[10:]).code is ErrorCode.INVALID_REQUEST


class _RecordSwappingOpaque(FakeOpaque):
    """A server that keeps a different record than the one the client uploaded (it knows the
    password here, so the login itself still verifies): only the export key can tell."""

    def server_registration_finish(self, upload: bytes) -> bytes:
        # The record the password would give against another registration response.
        other_response = bytes(REGISTRATION_RESPONSE_SIZE)
        return self.client_registration_finish(PASSWORD, b"", other_response).message


def test_registration_fails_when_the_login_export_key_differs_from_the_registration(server_setup):
    """REG-3 binds the storage key to the export key: a swapped record must not get that far."""
    world = FakeWorld(server_setup)
    client = fake_client()
    server = ServerConnection(server_setup, os.urandom, opaque=_RecordSwappingOpaque(os.urandom), now=0.0)
    pair = InMemoryPair(client, server, world.app, now=0.0)
    sid = client.open_registration(ACCOUNT, PASSWORD)
    events = pair.pump()
    failed = only(events, SessionFailed)
    assert (failed.session_id, failed.code, failed.remote) == (sid, ErrorCode.AUTHENTICATION_FAILED, False)
    assert "export key" in failed.reason
    assert client.session_state(sid) is State.CLOSED
    # The client never finished the login, so the server never saw a completed registration.
    assert not any(isinstance(e, RegistrationCompleted) for e in pair.server_events)
    assert only(pair.server_events, SessionFailed).code is ErrorCode.AUTHENTICATION_FAILED
    assert world.app.accounts == {}


# ------------------------------------------------------------ during a resumption


def test_logout_during_a_resumption_goes_out_sealed_in_the_new_epoch(world):
    pair = world.pair()
    register(pair, ACCOUNT)
    login(pair, ACCOUNT)
    (detached,) = lose(pair)
    handle = detached._session.channel.session_handle
    fresh = world.pair()
    sid = fresh.client.resume_session(detached)
    fresh.client.close_session(sid)
    assert fresh.client.session_state(sid) is State.CLOSE_AFTER_RESUMED
    pending = fresh.client.data_to_send()
    assert _types(pending) == [FrameType.RESUME]  # the CLOSE waits for RESUMED
    fresh.to_server(pending)
    client_events = fresh.to_client(fresh.server.data_to_send())
    assert client_events == []  # no SessionResumed for a session the caller already closed
    assert fresh.client.session_state(sid) is State.CLOSED
    closing = fresh.client.data_to_send()
    assert _types(closing) == [FrameType.CLOSE]
    fresh.to_server(closing)
    server_closed = only(fresh.server_events, SessionClosed)
    assert (server_closed.session_id, server_closed.code) == (sid, ErrorCode.CLIENT_CLOSED)
    assert handle not in world.registry


def test_requests_made_during_a_resumption_wait_for_resumed(world):
    pair = world.pair()
    register(pair, ACCOUNT)
    user_id = login(pair, ACCOUNT).user_id
    (detached,) = lose(pair)
    fresh = world.pair()
    sid = fresh.client.resume_session(detached)
    request_id = fresh.client.send_request(sid, b"queued")
    resume = fresh.client.data_to_send()
    assert _types(resume) == [FrameType.RESUME]  # not sealed yet: the new epoch's keys are unknown
    fresh.to_server(resume)
    assert fresh.to_client(fresh.server.data_to_send()) == [SessionResumed(sid, user_id)]
    request = fresh.client.data_to_send()
    assert _types(request) == [FrameType.REQUEST]
    fresh.to_server(request)
    assert fresh.to_client(fresh.server.data_to_send()) == [ResponseReceived(sid, request_id, b"queued")]


def test_answers_produced_while_detached_arrive_after_resumption(server_setup):
    world = FakeWorld(server_setup, app=HoldingApp())
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = login(pair, ACCOUNT).session_id
    request_id = pair.client.send_request(sid, b"slow")
    pair.pump()
    (held,) = world.app.held
    (detached,) = lose(pair)
    assert detached.unanswered_requests == (request_id,)
    # The app finishes after the connection is gone: accepted, kept, nothing to send here.
    assert pair.server.send_response(held.session_id, held.request_id, b"late answer") is True
    assert pair.server.data_to_send() == b""
    fresh = world.pair()
    new_sid = fresh.client.resume_session(detached)
    events = fresh.pump()
    assert [type(e) for e in events] == [SessionResumed, ResponseReceived]
    assert events[1] == ResponseReceived(new_sid, request_id, b"late answer")
    assert world.app.held == [held]  # the re-sent request was answered from the cache


# ------------------------------------------------------------------ shared framing


def test_a_connection_needs_room_for_at_least_a_kilobyte_per_frame(server_setup):
    with pytest.raises(ValueError, match="at least 1024"):
        ClientConnection(os.urandom, max_payload=1023)
    with pytest.raises(ValueError, match="at least 1024"):
        ServerConnection(server_setup, os.urandom, config=ServerConfig(max_payload=1000), now=0.0)


def test_no_data_may_follow_the_end_of_the_stream():
    client = fake_client()
    client.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        client.receive_data(b"\x01")


def test_closing_twice_sends_one_goaway():
    client = fake_client()
    client.close("done")
    (goaway,) = split_frames(client.data_to_send())
    assert frame_type(goaway) is FrameType.GOAWAY
    assert GoAway.decode(goaway[10:]) == GoAway(ErrorCode.OK, "done")
    failed = client.failed
    client.close("again")
    assert client.data_to_send() == b""
    assert client.failed is failed
    assert client.next_event() == ConnectionFailed(ErrorCode.OK, "done", False)


def test_a_session_frame_on_session_id_zero_ends_the_connection(server_setup):
    server = ServerConnection(server_setup, os.urandom, now=0.0)
    server.receive_data(forge(FrameType.LOGIN_START, 0, b""), 0.0)
    event = server.next_event()
    assert event == ConnectionFailed(ErrorCode.BAD_SESSION_ID, "LOGIN_START on session id 0", True)
    (goaway,) = split_frames(server.data_to_send())
    assert GoAway.decode(goaway[10:]).code is ErrorCode.BAD_SESSION_ID


def test_a_goaway_on_a_session_id_ends_the_connection_as_malformed():
    client = fake_client()
    client.receive_data(forge(FrameType.GOAWAY, 3, GoAway(ErrorCode.OK).encode()))
    event = client.next_event()
    assert event == ConnectionFailed(ErrorCode.MALFORMED, "GOAWAY on a session id", True)
    (goaway,) = split_frames(client.data_to_send())
    assert GoAway.decode(goaway[10:]).code is ErrorCode.MALFORMED


def _shared_base() -> type:
    """The class client and server connections share (framing, output buffer, event queue),
    found from the two public classes rather than imported from its private module."""
    (base,) = (set(ClientConnection.__mro__) & set(ServerConnection.__mro__)) - {object}
    return base


def test_the_shared_base_leaves_every_role_hook_to_the_subclass():
    """The shared base is not a usable connection on its own: each role hook fails loudly."""
    base_class = _shared_base()
    base = base_class()
    with pytest.raises(NotImplementedError):
        base.connection_lost()
    base.receive_data(forge(FrameType.REQUEST, 1, b""))
    with pytest.raises(NotImplementedError):
        base.next_event()
    with pytest.raises(NotImplementedError):
        base_class().close()


def test_resuming_a_session_twice_is_refused_before_anything_is_sent_or_spent(world):
    """A DetachedSession handed to resume_session a second time (while the first RESUME is
    under way) is a LocalProtocolError that uses no session id, draws no nonce and sends
    nothing; the first resumption completes."""
    pair = world.pair()
    register(pair, ACCOUNT)
    login(pair, ACCOUNT)
    (detached,) = lose(pair)
    fresh = world.pair()
    sid = fresh.client.resume_session(detached)
    sent = fresh.client.data_to_send()
    with pytest.raises(LocalProtocolError, match="cannot resume"):
        fresh.client.resume_session(detached)
    assert fresh.client.data_to_send() == b""
    assert fresh.client.session_state(sid + 1) is State.CLOSED
    fresh.to_server(sent)
    assert only(fresh.pump(), SessionResumed).session_id == sid
    assert fresh.client.open_request_session(ACCOUNT, PASSWORD) == sid + 1  # no id was spent
