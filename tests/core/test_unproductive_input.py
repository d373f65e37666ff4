"""The budget for unproductive input (docs/protocol.md, section 10): frames the server ignores
or refuses without opening a session, and small transport pieces, spend a connection's
budget; past it the connection gets GOAWAY(LIMIT_EXCEEDED). Frames acted on and time give
units back, and what an honest client may still send for a session the server ended (late
frames) or resumed (re-sent requests) is paid for in advance: the honest paths below
(pipelined requests on many sessions, sessions ended under pipelined requests, resumption)
never reach it, each frame also charged as the TLS record and WebSocket frame a browser
would send it in."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from keymgmt_proto import (
    NEED_DATA,
    UNPRODUCTIVE_BLOCK_SIZE,
    ClientConnection,
    ConnectionFailed,
    ErrorCode,
    FrameType,
    LocalProtocolError,
    ResponseReceived,
    ServerConfig,
    ServerConnection,
    SessionEstablished,
    SessionRegistry,
    SessionResumed,
    TokenBucket,
)
from keymgmt_proto.testing import FakeOpaque

from ..support.fake_pairs import FakeWorld, HoldingApp, lose
from ..support.frames import forge, frame_type, parsed, split_frames
from ..support.helpers import PASSWORD, drain, only, register

BURST = ServerConfig().unproductive_burst
IGNORED = struct.pack(">BBII", 1, FrameType.ABORT, 1, 0)  # an ABORT for an id never opened


def _server(config: ServerConfig | None = None, **kwargs: object) -> ServerConnection:
    registry = SessionRegistry(config or ServerConfig())
    return ServerConnection(
        None,  # type: ignore[arg-type] - no login reaches the OPAQUE setup here
        os.urandom,
        registry=registry,
        now=0.0,
        opaque=FakeOpaque(os.urandom),
        **kwargs,  # type: ignore[arg-type]
    )


def _feed(server: ServerConnection, data: bytes, now: float = 0.0) -> list[object]:
    server.receive_data(data, now)
    return drain(server)


def _goaway(server: ServerConnection) -> ErrorCode | None:
    for kind, session_id, payload in parsed(server.data_to_send()):
        if kind is FrameType.GOAWAY and session_id == 0:
            return ErrorCode(int.from_bytes(payload[:2], "big"))
    return None


def _vector(name: str) -> bytes:
    vectors = json.loads((Path(__file__).parents[1] / "vectors" / "messages.json").read_text())
    (found,) = [v for v in vectors["vectors"] if v["name"] == name]
    return bytes.fromhex(found["encoding"])


def test_ignored_frames_past_the_burst_end_the_connection_with_goaway_limit_exceeded():
    server = _server()
    assert _feed(server, IGNORED * BURST) == []
    assert server.failed is None and server.unproductive_budget == 0
    (failed,) = _feed(server, IGNORED)
    assert isinstance(failed, ConnectionFailed)
    assert (failed.code, failed.remote) == (ErrorCode.LIMIT_EXCEEDED, True)
    (goaway,) = parsed(server.data_to_send())
    assert goaway == (FrameType.GOAWAY, 0, _vector("goaway unproductive input"))
    assert _feed(server, IGNORED * 10) == []  # nothing more is read


@pytest.mark.parametrize(
    "kind",
    [
        "late frame",
        "abort on a new id",
        "unexpected on a new id",
        "used id",
        "too many sessions",
        "rate limited",
    ],
)
def test_each_frame_that_opens_nothing_costs_one_unit(kind):
    login_start = bytes([1]) + b"a" + bytes(96)
    config = ServerConfig(max_sessions_per_connection=1)
    server = _server(config, admission=TokenBucket(1, 1) if kind == "rate limited" else None)
    if kind in ("late frame", "used id", "too many sessions", "rate limited"):
        _feed(server, forge(FrameType.LOGIN_START, 5, login_start))  # session 5 opens (a decoy login)
        server.data_to_send()
    before = server.unproductive_budget
    frame = {
        "late frame": forge(FrameType.ABORT, 3, b""),  # an id below the highest seen, no session
        "abort on a new id": forge(FrameType.ABORT, 9, b""),
        "unexpected on a new id": forge(FrameType.LOGIN_FINISH, 9, bytes(64)),
        "used id": forge(FrameType.LOGIN_START, 4, login_start),
        "too many sessions": forge(FrameType.LOGIN_START, 9, login_start),
        "rate limited": forge(FrameType.LOGIN_START, 9, login_start),
    }[kind]
    _feed(server, frame)
    assert server.unproductive_budget == before - 1
    assert server.failed is None


def test_a_frame_that_does_nothing_costs_one_more_unit_per_block_of_its_payload():
    server = _server()
    for size, cost in [(0, 1), (UNPRODUCTIVE_BLOCK_SIZE - 1, 1), (UNPRODUCTIVE_BLOCK_SIZE, 2), (65536, 17)]:
        before = server.unproductive_budget
        _feed(server, forge(FrameType.ABORT, 1, bytes(size)))
        assert before - server.unproductive_budget == cost, size


def test_the_budget_refills_at_its_rate_up_to_the_burst():
    config = ServerConfig(unproductive_burst=100, unproductive_rate=10.0, connection_idle_timeout=1e6)
    server = _server(config)
    _feed(server, IGNORED * 100, now=0.0)
    assert server.unproductive_budget == 0
    server.handle_timer(2.5)
    assert server.unproductive_budget == 25
    server.handle_timer(1000.0)
    assert server.unproductive_budget == 100
    # A flood slower than the rate goes on for ever (9 a second for 100 seconds)...
    for second in range(1000, 1100):
        assert _feed(server, IGNORED * 9, now=float(second)) == []
    # ...one faster does not.
    events = [e for second in range(1100, 1200) for e in _feed(server, IGNORED * 12, now=float(second))]
    assert isinstance(only(events, ConnectionFailed), ConnectionFailed)
    assert server.failed is not None and server.failed.code is ErrorCode.LIMIT_EXCEEDED


def test_small_pieces_are_charged_and_end_the_connection_at_the_next_event():
    server = _server()
    assert server.note_small_input(BURST, 0.0) is False
    assert server.note_small_input(1, 0.0) is True
    assert server.failed is None  # nothing changes outside next_event...
    assert server.data_to_send() == b""
    (failed,) = drain(server)  # ...where it fails, though no frame came
    assert isinstance(failed, ConnectionFailed) and failed.code is ErrorCode.LIMIT_EXCEEDED
    assert _goaway(server) is ErrorCode.LIMIT_EXCEEDED
    with pytest.raises(LocalProtocolError):
        server.note_small_input(-1, 0.0)


def test_frames_acted_on_give_back_the_pieces_they_came_in(server_setup):
    """A browser sends each frame in a WebSocket message of its own, in a TLS record of its
    own: two small pieces, which the frame, acted on, gives back. Logins and logouts, one
    after another, three times the burst."""
    world = FakeWorld(server_setup)
    pair = world.pair()
    register(pair, b"browser")
    for _ in range(3 * BURST // 4):  # (four frames each: LOGIN_START, LOGIN_FINISH, REQUEST, CLOSE)
        sid = pair.client.open_request_session(b"browser", PASSWORD)
        _browse(pair)
        pair.client.send_request(sid, b"one request")
        _browse(pair)
        pair.client.close_session(sid)
        _browse(pair)
    assert pair.server.failed is None
    assert pair.server.unproductive_budget == BURST


def test_each_frame_of_a_registration_and_a_login_gives_units_back(server_setup):
    """Every frame of a registration (REG_START, REG_UPLOAD, the LOGIN_START and LOGIN_FINISH
    inside it, COMPLETE_REGISTRATION) and of a login reaches a session: acted on, it gives
    back 2 units (protocol.md section 10), never costs one, so a client that registers and
    logs in with the budget low does not lower it further."""
    world = FakeWorld(server_setup)
    pair = world.pair()
    pair.to_server(IGNORED * 100)  # well below the burst: every unit given back shows
    pair.client.open_registration(b"newcomer", PASSWORD)
    changes = _frame_by_frame(pair)
    pair.client.open_request_session(b"newcomer", PASSWORD)
    changes += _frame_by_frame(pair)
    assert [kind for kind, _ in changes] == [
        FrameType.REG_START,
        FrameType.REG_UPLOAD,
        FrameType.LOGIN_START,
        FrameType.LOGIN_FINISH,
        FrameType.COMPLETE_REGISTRATION,
        FrameType.LOGIN_START,
        FrameType.LOGIN_FINISH,
    ]
    assert all(change >= 2 for _, change in changes), changes


def _frame_by_frame(pair) -> list[tuple[FrameType, float]]:
    """Exchange frames until both are quiet, the server taking the client's one at a time:
    each one's type and what it did to the budget."""
    changes = []
    while out := pair.client.data_to_send():
        for frame in split_frames(out):
            before = pair.server.unproductive_budget
            pair.to_server(frame)
            changes.append((frame_type(frame), pair.server.unproductive_budget - before))
        pair.to_client(pair.server.data_to_send())
    return changes


def _browse(pair) -> None:
    """Exchange frames until both are quiet, each frame to the server as a browser sends it."""
    while out := pair.client.data_to_send():
        _deliver_as_a_browser(pair, out)
        pair.to_client(pair.server.data_to_send())


def _many_sessions(world: FakeWorld, account: bytes, count: int):
    pair = world.pair()
    register(pair, account)
    for _ in range(count):
        pair.client.open_request_session(account, PASSWORD)
    established = [e.session_id for e in pair.pump() if isinstance(e, SessionEstablished)]
    assert len(established) == count
    return pair, established


def _deliver_as_a_browser(pair, data: bytes) -> None:
    for frame in split_frames(data):
        pair.server.note_small_input(2, pair.now)  # its TLS record and WebSocket frame
        pair.to_server(frame)


def test_pipelined_requests_on_every_session_of_a_connection_never_reach_the_budget(server_setup):
    config = ServerConfig()
    world = FakeWorld(server_setup, config)
    pair, sids = _many_sessions(world, b"pipeline", config.max_sessions_per_connection)
    for _ in range(3):
        for sid in sids:
            for n in range(config.max_requests_in_flight):
                pair.client.send_request(sid, b"request %d" % n)
        _deliver_as_a_browser(pair, pair.client.data_to_send())
        events = pair.to_client(pair.server.data_to_send())
        assert (
            sum(isinstance(e, ResponseReceived) for e in events) == len(sids) * config.max_requests_in_flight
        )
    assert pair.server.failed is None


@pytest.mark.parametrize("how", ["closed by the application", "password changed", "session lifetime"])
def test_requests_pipelined_into_sessions_the_server_ends_are_taken(server_setup, how):
    """Every session of a full connection has its requests in flight when the server ends it:
    the requests arrive after the end, each ignored as a late frame, and the client's
    ABORTs for the sessions too. 256 x 17 frames, each also two small pieces: far past the
    burst, paid for by the sessions' ends."""
    config = ServerConfig(session_lifetime=100.0)
    world = FakeWorld(server_setup, config)
    pair, sids = _many_sessions(world, b"ended", config.max_sessions_per_connection)
    for sid in sids:
        for n in range(config.max_requests_in_flight):
            pair.client.send_request(sid, b"x" * 60000 if n == 0 else b"late %d" % n)
    late = pair.client.data_to_send()  # sent, not yet arrived
    if how == "closed by the application":
        for sid in sids:
            pair.server.close_session(sid, ErrorCode.REQUEST_LIMIT)
    elif how == "password changed":
        user_id = world.app.accounts[b"ended"].user_id
        assert world.registry.end_user_sessions(user_id, ErrorCode.NOT_AUTHORIZED) == len(sids)
    else:
        pair.now += 101.0
        pair.server.handle_timer(pair.now)
    drain(pair.server)
    _deliver_as_a_browser(pair, late)
    assert pair.server.failed is None
    for sid in sids:  # and an ABORT(CLIENT_CLOSED) for each, sent before the client heard
        _deliver_as_a_browser(pair, forge(FrameType.ABORT, sid, bytes([0, 18, 0])))
    assert pair.server.failed is None
    # What the ends paid for is bounded (the worst each could need, at most every session's
    # worth at once): late frames past it end the connection.
    most = BURST + config.max_sessions_per_connection * (config.max_requests_in_flight + 1) * (3 + 16)
    for _ in range(most // 4096 + 1):
        pair.to_server(forge(FrameType.ABORT, sids[0], b"") * 4096)
        if pair.server.failed is not None:
            break
    assert pair.server.failed is not None and pair.server.failed.code is ErrorCode.LIMIT_EXCEEDED


def test_requests_re_sent_after_a_resumption_are_taken(server_setup):
    """Every session of a full connection has its requests pending when the connection is
    lost; each resumes on a new connection and re-sends them (ignored: already pending)."""
    config = ServerConfig()
    app = HoldingApp()
    world = FakeWorld(server_setup, config, app=app)
    pair, sids = _many_sessions(world, b"resumer", config.max_sessions_per_connection)
    for sid in sids:
        for n in range(config.max_requests_in_flight):
            pair.client.send_request(sid, b"pending %d" % n)
    pair.pump()
    assert len(app.held) == len(sids) * config.max_requests_in_flight
    detached = lose(pair)
    second = world.pair()
    for session in detached:
        second.client.resume_session(session)
    _deliver_as_a_browser(second, second.client.data_to_send())
    events = second.to_client(second.server.data_to_send())
    assert sum(isinstance(e, SessionResumed) for e in events) == len(sids)
    _deliver_as_a_browser(second, second.client.data_to_send())  # the re-sent requests
    assert second.server.failed is None
    assert len(app.held) == len(sids) * config.max_requests_in_flight  # none delivered twice


def test_a_session_resumed_back_and_forth_buys_no_input_that_does_nothing(server_setup):
    """A successful RESUME costs no admission token, and the server paid
    max_requests_in_flight x W units of budget in advance for the requests it re-sends. A
    client that resumed one idle session back and forth between two connections bought that
    much every time and spent it on ignored frames, so the budget never ran out (protocol.md
    section 10): the server now pays only for the requests the client can re-send, those
    pending and those answered in records the RESUME says it did not receive."""
    world = FakeWorld(server_setup)
    home, (_sid,) = _many_sessions(world, b"pingpong", 1)
    away = world.pair()
    pairs = [home, away]
    for turn in range(40):
        source, target = pairs[turn % 2], pairs[(turn + 1) % 2]
        last = source.client._last_session_id
        source.client.connection_lost()  # (the client's end only: the server's goes on)
        (detached,) = source.client.take_detached_sessions()
        fresh = ClientConnection(os.urandom, opaque=FakeOpaque(os.urandom))
        fresh._last_session_id = last  # the connection goes on: new session ids go up
        source.client = fresh
        target.client.resume_session(detached)
        only(target.pump(), SessionResumed)
        if target is home:
            home.to_server(IGNORED * 300)  # each return home bought that many, before
            if home.server.failed is not None:
                break
    assert home.server.failed is not None and home.server.failed.code is ErrorCode.LIMIT_EXCEEDED


def test_answers_lost_with_a_connection_are_paid_for_when_their_requests_come_again(server_setup):
    """The honest case of the test above: every session of a full connection had 16 requests
    answered, and the answers were lost with the connection; each session resumes on a new
    connection and re-sends them (answered again from the reply cache), as a browser would
    send them, without running out of budget."""
    config = ServerConfig()
    world = FakeWorld(server_setup, config)
    pair, sids = _many_sessions(world, b"unlucky", config.max_sessions_per_connection)
    for sid in sids:
        for n in range(config.max_requests_in_flight):
            pair.client.send_request(sid, b"answered %d" % n)
    pair.to_server(pair.client.data_to_send())
    assert pair.server.data_to_send()  # the answers, never delivered
    detached = lose(pair)
    second = world.pair()
    for session in detached:
        second.client.resume_session(session)
    _deliver_as_a_browser(second, second.client.data_to_send())
    events = second.to_client(second.server.data_to_send())
    assert sum(isinstance(e, SessionResumed) for e in events) == len(sids)
    _deliver_as_a_browser(second, second.client.data_to_send())  # the re-sent requests
    assert second.server.failed is None
    answers = second.to_client(second.server.data_to_send())
    assert sum(isinstance(e, ResponseReceived) for e in answers) == len(sids) * config.max_requests_in_flight


def test_a_flood_on_a_connection_with_a_session_leaves_the_session_resumable(server_setup):
    world = FakeWorld(server_setup)
    pair, (sid,) = _many_sessions(world, b"victim", 1)
    pair.to_server(IGNORED * (2 * BURST))  # (the registration's end added to the burst)
    goaway = pair.server.data_to_send()
    assert frame_type(split_frames(goaway)[-1]) is FrameType.GOAWAY
    failed = only(pair.to_client(goaway), ConnectionFailed)
    assert failed.code is ErrorCode.LIMIT_EXCEEDED
    pair.server.connection_lost()
    (detached,) = pair.client.take_detached_sessions()
    second = world.pair()
    second.client.resume_session(detached)
    assert only(second.pump(), SessionResumed).session_id != sid
    assert second.server.next_event() is NEED_DATA
