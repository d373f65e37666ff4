"""Client behaviours pinned where the mutation run found them untested: the caller's limits
(requests in flight, sequence numbers, frame size), what ending, losing or deferring a session
leaves behind, the session ids the client hands out, and the flags on the events it reports;
plus the framing both roles share (end of stream, header faults, reasons cleaned for the wire)."""

from __future__ import annotations

import pytest

from keymgmt.adapters import InMemoryPair, MemoryServerApp
from keymgmt_proto import (
    ConnectionFailed,
    ErrorCode,
    Event,
    FrameType,
    LocalProtocolError,
    RegistrationCompleted,
    ResponseReceived,
    ResumeDeferred,
    ServerConnection,
    SessionClosed,
    SessionFailed,
    SessionResumed,
    State,
)
from keymgmt_proto.wire import MAX_SEQ, Abort, GoAway, LoginResponse, encode_frame

from ..support.fake_pairs import PASSWORD, FakeWorld, HoldingApp, fake_client, lose
from ..support.frames import forge, frame_type, split_frames
from ..support.helpers import login, only, register

ACCOUNT = b"alice@example.org"


def _events(conn) -> list[Event]:
    events = []
    while isinstance(event := conn.next_event(), Event):
        events.append(event)
    return events


def _established(world: FakeWorld) -> tuple[InMemoryPair, int]:
    pair = world.pair()
    register(pair, ACCOUNT)
    return pair, login(pair, ACCOUNT).session_id


def _only_frame(data: bytes, kind: FrameType) -> bytes:
    (frame,) = split_frames(data)
    assert frame_type(frame) is kind
    return frame[10:]


# ------------------------------------------------------------------ caller's limits


def test_the_client_caps_its_own_requests_in_flight(server_setup):
    world = FakeWorld(server_setup, app=HoldingApp())
    pair, sid = _established(world)
    pair.client.max_requests_in_flight = 2
    pair.client.send_request(sid, b"one")
    pair.client.send_request(sid, b"two")
    with pytest.raises(LocalProtocolError, match="2 requests already in flight") as info:
        pair.client.send_request(sid, b"three")
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    assert len(split_frames(pair.client.data_to_send())) == 2


def test_the_clients_last_sequence_number_is_kept_for_close(world):
    """With two sequence numbers left one request still goes out; with one left the caller is
    told to open a new session and the session stays usable for a logout."""
    pair, sid = _established(world)
    pair.client._sessions[sid].channel.send_seq = MAX_SEQ - 2
    pair.server._sessions[sid].channel.recv_seq = MAX_SEQ - 2
    first = pair.client.send_request(sid, b"one")
    assert pair.pump() == [ResponseReceived(sid, first, b"one")]
    with pytest.raises(LocalProtocolError, match="sequence numbers exhausted") as info:
        pair.client.send_request(sid, b"two")
    assert info.value.code is ErrorCode.SEQUENCE_EXHAUSTED
    assert pair.client.data_to_send() == b""
    pair.client.close_session(sid)  # the kept sequence number carries the CLOSE
    pair.pump()
    assert only(pair.server_events, SessionClosed).code is ErrorCode.CLIENT_CLOSED


def test_a_request_must_fit_the_clients_frame_limit_exactly(world):
    """seq (8) + request id (4) + body + tag (16) <= max_payload: 996 bytes of body fit in 1024."""
    pair = world.pair(client_max_payload=1024)
    register(pair, ACCOUNT)
    sid = login(pair, ACCOUNT).session_id
    with pytest.raises(LocalProtocolError, match="larger than the frame limit"):
        pair.client.send_request(sid, bytes(997))
    assert pair.client.data_to_send() == b""
    request_id = pair.client.send_request(sid, bytes(996))
    assert len(_only_frame(pair.client.data_to_send(), FrameType.REQUEST)) == 1024
    assert request_id == 1


# ------------------------------------------------------------------ ending sessions


def test_abort_session_tells_the_server_why(world):
    pair, sid = _established(world)
    pair.client.abort_session(sid, "user cancelled")
    abort = Abort.decode(_only_frame(pair.client.data_to_send(), FrameType.ABORT))
    assert abort == Abort(ErrorCode.CLIENT_CLOSED, "user cancelled")
    assert pair.client.session_state(sid) is State.CLOSED


def test_a_closed_session_is_gone_from_the_connection(world):
    """After logout the id is unknown, and losing the connection reports nothing about it."""
    pair, sid = _established(world)
    pair.client.close_session(sid)
    pair.pump()
    with pytest.raises(LocalProtocolError, match=f"no live session {sid}"):
        pair.client.send_request(sid, b"x")
    pair.client.connection_lost()
    assert _events(pair.client) == [ConnectionFailed(ErrorCode.CONNECTION_LOST, "connection lost", False)]
    assert pair.client.take_detached_sessions() == []


def test_connection_lost_is_local_and_sends_nothing():
    client = fake_client()
    client.connection_lost()
    assert client.next_event() == ConnectionFailed(ErrorCode.CONNECTION_LOST, "connection lost", False)
    assert client.data_to_send() == b""


def test_detached_sessions_are_handed_out_once(world):
    pair, sid = _established(world)
    pair.client.connection_lost()
    (detached,) = pair.client.take_detached_sessions()
    assert detached.session_id == sid
    assert pair.client.take_detached_sessions() == []
    assert pair.client.session_state(sid) is State.CLOSED  # no longer carried by this connection


def test_a_login_cut_off_by_connection_loss_fails_locally(world):
    pair = world.pair()
    register(pair, ACCOUNT)
    sid = pair.client.open_request_session(ACCOUNT, PASSWORD)
    pair.client.connection_lost()
    assert _events(pair.client) == [
        ConnectionFailed(ErrorCode.CONNECTION_LOST, "connection lost", False),
        SessionFailed(
            sid, ErrorCode.CONNECTION_LOST, "connection ended before the session was established", False
        ),
    ]


def test_a_resumption_takes_the_next_session_id(world):
    pair, _ = _established(world)
    (detached,) = lose(pair)
    client = fake_client()
    assert client.open_request_session(ACCOUNT, PASSWORD) == 1
    assert client.resume_session(detached) == 2
    assert client.open_registration(b"bob@example.org", PASSWORD) == 3


# ------------------------------------------------------------- frames from the server


def test_a_late_frame_for_the_last_session_that_ended_is_ignored():
    client = fake_client()
    sid = client.open_request_session(ACCOUNT, PASSWORD)
    client.abort_session(sid)
    client.data_to_send()
    client.receive_data(forge(FrameType.LOGIN_RESPONSE, sid, LoginResponse(bytes(320)).encode()))
    assert _events(client) == []
    assert client.failed is None


def test_a_frame_for_a_session_never_opened_is_the_servers_fault():
    client = fake_client()
    sid = client.open_request_session(ACCOUNT, PASSWORD)
    client.data_to_send()
    client.receive_data(forge(FrameType.ABORT, 7, Abort(ErrorCode.OK).encode()))
    assert _events(client) == [
        ConnectionFailed(ErrorCode.BAD_SESSION_ID, "frame for session 7 never opened", True),
        SessionFailed(
            sid, ErrorCode.CONNECTION_LOST, "connection ended before the session was established", False
        ),
    ]


def test_a_frame_the_session_state_does_not_allow_is_the_servers_fault():
    client = fake_client()
    sid = client.open_request_session(ACCOUNT, PASSWORD)
    client.data_to_send()
    client.receive_data(forge(FrameType.RESPONSE, sid, bytes(30)))
    failed = only(_events(client), SessionFailed)
    assert (failed.code, failed.remote) == (ErrorCode.UNEXPECTED_FRAME, True)


def test_an_abort_from_the_server_ends_the_session_there_and_here(world):
    pair, sid = _established(world)
    pair.server.data_to_send()
    events = pair.to_client(forge(FrameType.ABORT, sid, Abort(ErrorCode.INTERNAL_ERROR, "oops").encode()))
    assert events == [SessionFailed(sid, ErrorCode.INTERNAL_ERROR, "oops", True)]
    assert pair.client.session_state(sid) is State.CLOSED
    pair.client.connection_lost()
    assert pair.client.take_detached_sessions() == []  # not resumable: the server ended it


def test_an_abort_that_does_not_parse_ends_the_session_without_a_reply(world):
    pair, sid = _established(world)
    events = pair.to_client(forge(FrameType.ABORT, sid, b"\x00"))
    failed = only(events, SessionFailed)
    assert (failed.session_id, failed.code, failed.remote) == (sid, ErrorCode.MALFORMED, True)
    assert pair.client.data_to_send() == b""


def test_a_deferred_resumption_is_detached_again_with_the_servers_reason(world):
    """NET-13: ABORT(RATE_LIMITED) on a RESUME hands the session back for a later retry."""
    pair, _ = _established(world)
    (detached,) = lose(pair)
    client = fake_client()
    sid = client.resume_session(detached)
    client.data_to_send()
    client.receive_data(forge(FrameType.ABORT, sid, Abort(ErrorCode.RATE_LIMITED, "retry later").encode()))
    assert _events(client) == [ResumeDeferred(sid, "retry later")]
    assert client.session_state(sid) is State.CLOSED
    client.connection_lost()
    assert _events(client) == [ConnectionFailed(ErrorCode.CONNECTION_LOST, "connection lost", False)]
    (again,) = client.take_detached_sessions()
    fresh = world.pair()
    new_sid = fresh.client.resume_session(again)
    assert only(fresh.pump(), SessionResumed).session_id == new_sid


def test_logout_during_a_resumption_leaves_nothing_to_report_on_connection_loss(world):
    pair, _ = _established(world)
    (detached,) = lose(pair)
    fresh = world.pair()
    sid = fresh.client.resume_session(detached)
    fresh.client.close_session(sid)
    assert fresh.pump() == []
    assert only(fresh.server_events, SessionClosed).code is ErrorCode.CLIENT_CLOSED
    fresh.client.connection_lost()
    assert _events(fresh.client) == [ConnectionFailed(ErrorCode.CONNECTION_LOST, "connection lost", False)]
    assert fresh.client.take_detached_sessions() == []


class _LateRejectingApp(MemoryServerApp):
    """Loses the race for the account name after the registration completed."""

    def __call__(self, conn: ServerConnection, event: Event) -> None:
        if isinstance(event, RegistrationCompleted):
            self.events.append(event)
            conn.reject_session(event.session_id, ErrorCode.ACCOUNT_EXISTS, "account exists")
            return
        super().__call__(conn, event)


def test_a_registration_closed_with_an_error_fails_as_the_servers_decision(server_setup):
    world = FakeWorld(server_setup, app=_LateRejectingApp())
    pair = world.pair()
    sid = pair.client.open_registration(ACCOUNT, PASSWORD)
    assert pair.pump() == [SessionFailed(sid, ErrorCode.ACCOUNT_EXISTS, "ACCOUNT_EXISTS", True)]


# ------------------------------------------------------------------ shared framing


def test_end_of_stream_is_a_lost_connection():
    client = fake_client()
    client.receive_data(b"")
    assert client.next_event() == ConnectionFailed(ErrorCode.CONNECTION_LOST, "connection lost", False)


def test_a_header_with_an_unknown_version_is_the_peers_fault():
    client = fake_client()
    client.receive_data(bytes([9]) + encode_frame(FrameType.GOAWAY, 0, b"")[1:])
    failed = client.next_event()
    assert isinstance(failed, ConnectionFailed)
    assert (failed.code, failed.remote) == (ErrorCode.UNSUPPORTED_VERSION, True)


def test_abort_reasons_are_cleaned_and_cut_for_the_wire():
    """A reason goes out as printable ASCII of at most 255 characters."""
    client = fake_client()
    first = client.open_request_session(ACCOUNT, PASSWORD)
    second = client.open_request_session(ACCOUNT, PASSWORD)
    client.data_to_send()
    client.abort_session(first, "tab\there")
    client.abort_session(second, "x" * 300)
    reasons = [Abort.decode(f[10:]).reason for f in split_frames(client.data_to_send())]
    assert reasons == ["tab?here", "x" * 255]


@pytest.mark.parametrize(
    ("reason", "sent"), [("bye\n", "bye?"), ("y" * 300, "y" * 255)], ids=["control", "long"]
)
def test_goaway_reasons_are_cleaned_and_cut_for_the_wire(reason, sent):
    client = fake_client()
    client.close(reason)
    assert GoAway.decode(_only_frame(client.data_to_send(), FrameType.GOAWAY)).reason == sent
    assert client.next_event() == ConnectionFailed(ErrorCode.OK, reason, False)
