"""Every frame type fed to a session in every reachable state (h2-style).

A frame the transition table does not allow ends that session with
UNEXPECTED_FRAME; a frame it allows but with a junk payload ends it with a
defined error. Either way a second, established session on the same
connection is unaffected, and no exception escapes.
"""

from __future__ import annotations

import os

import pytest

from keymgmt.adapters import InMemoryPair, MemoryServerApp
from keymgmt_proto import (
    ClientConnection,
    ErrorCode,
    Event,
    FrameType,
    OpaqueStepRequired,
    ResponseReceived,
    Role,
    ServerConnection,
    ServerSetup,
    SessionFailed,
    SessionKind,
    SessionRegistry,
    State,
)
from keymgmt_proto.testing import FakeOpaque
from keymgmt_proto.wire import TRANSITIONS

from ..support.frames import forge, split_frames
from ..support.helpers import PASSWORD, login, only, register

SETUP = ServerSetup.generate()
ACCOUNT = b"bystander@example.org"
NEW_ACCOUNT = b"newcomer@example.org"

CLIENT_STATES = [
    (SessionKind.REGISTRATION, State.AWAIT_REG_RESPONSE),
    (SessionKind.REGISTRATION, State.AWAIT_REG_STEP),
    (SessionKind.REGISTRATION, State.AWAIT_LOGIN_RESPONSE),
    (SessionKind.REGISTRATION, State.AWAIT_LOGIN_STEP),
    (SessionKind.REGISTRATION, State.AWAIT_WELCOME),
    (SessionKind.REGISTRATION, State.AWAIT_REG_CLOSE),
    (SessionKind.REQUEST, State.AWAIT_LOGIN_RESPONSE),
    (SessionKind.REQUEST, State.AWAIT_LOGIN_STEP),
    (SessionKind.REQUEST, State.AWAIT_WELCOME),
    (SessionKind.REQUEST, State.ESTABLISHED),
]
SERVER_STATES = [
    (SessionKind.REGISTRATION, State.AWAIT_REG_DECISION),
    (SessionKind.REGISTRATION, State.AWAIT_REG_UPLOAD),
    (SessionKind.REGISTRATION, State.AWAIT_LOGIN_START),
    (SessionKind.REGISTRATION, State.AWAIT_LOGIN_FINISH),
    (SessionKind.REGISTRATION, State.AWAIT_COMPLETION),
    (SessionKind.REGISTRATION, State.AWAIT_STORE),
    (SessionKind.REQUEST, State.AWAIT_LOGIN_DECISION),
    (SessionKind.REQUEST, State.AWAIT_LOGIN_FINISH),
    (SessionKind.REQUEST, State.ESTABLISHED),
]
SESSION_FRAMES = [t for t in FrameType if t is not FrameType.GOAWAY]


def _connections(registry: SessionRegistry) -> tuple[ClientConnection, ServerConnection]:
    """A linked client and server with the fake OPAQUE (the table is under test, not OPAQUE)."""
    return (
        ClientConnection(os.urandom, opaque=FakeOpaque(os.urandom)),
        ServerConnection(SETUP, os.urandom, registry=registry, now=0.0, opaque=FakeOpaque(os.urandom)),
    )


class HoldingApp:
    """The reference app, except that it leaves a decision unanswered when the
    target session sits in the target state (so the test can stop there)."""

    def __init__(self, inner: MemoryServerApp) -> None:
        self.inner = inner
        self.hold: tuple[int, State] | None = None

    def __call__(self, conn: ServerConnection, event: Event) -> None:
        sid = getattr(event, "session_id", None)
        if self.hold is not None and sid == self.hold[0] and conn.session_state(sid) is self.hold[1]:
            return
        self.inner(conn, event)


@pytest.fixture(scope="module")
def world():
    app = MemoryServerApp()
    registry = SessionRegistry()
    pair = InMemoryPair(*_connections(registry), app, now=0.0)
    register(pair, ACCOUNT)
    return app, registry


def _drive(pair: InMemoryPair, app: HoldingApp, role: Role, sid: int, target: State) -> None:
    """Deliver frames one at a time until session ``sid`` on ``role``'s side is in ``target``,
    running the client's OPAQUE steps unless the target is the state that waits for one."""
    side = pair.client if role is Role.CLIENT else pair.server
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    for _ in range(50):
        to_server += split_frames(pair.client.data_to_send())
        to_client += split_frames(pair.server.data_to_send())
        if side.session_state(sid) is target:
            return
        if to_server:
            pair.to_server(to_server.pop(0))
        elif to_client:
            for event in pair.to_client(to_client.pop(0)):
                if isinstance(event, OpaqueStepRequired) and side.session_state(sid) is not target:
                    pair.client.complete_opaque_step(event.run(pair.client.opaque))
        else:
            break
    raise AssertionError(f"could not reach {target} (stuck in {side.session_state(sid)})")


def _setup(world, role: Role, kind: SessionKind, target: State):
    inner, registry = world
    app = HoldingApp(inner)
    pair = InMemoryPair(*_connections(registry), app, now=0.0)
    bystander = login(pair, ACCOUNT).session_id
    sid = bystander + 1
    app.hold = (sid, target)
    pair.run_opaque_steps = False  # _drive runs them, up to the target state
    inner.accounts.pop(NEW_ACCOUNT, None)
    if kind is SessionKind.REGISTRATION:
        pair.client.open_registration(NEW_ACCOUNT, PASSWORD)
    else:
        pair.client.open_request_session(ACCOUNT, PASSWORD)
    _drive(pair, app, role, sid, target)
    # Discard whatever the other side still has queued: the test speaks for it now.
    pair.client.data_to_send()
    pair.server.data_to_send()
    return pair, bystander, sid


def _junk_payload(kind: FrameType) -> bytes:
    return bytes(40) if kind.sealed else b"\x01" + bytes(8)


def _bystander_still_works(pair: InMemoryPair, bystander: int) -> None:
    request_id = pair.client.send_request(bystander, b"still here?")
    response = only(pair.pump(), ResponseReceived)
    assert (response.session_id, response.request_id, response.body) == (
        bystander,
        request_id,
        b"still here?",
    )


@pytest.mark.parametrize("frame", SESSION_FRAMES, ids=lambda t: t.name)
@pytest.mark.parametrize(
    ("kind", "state"), CLIENT_STATES, ids=lambda v: v.name if isinstance(v, State) else v.value
)
def test_client_gets_every_frame_in_every_state(world, kind, state, frame):
    pair, bystander, sid = _setup(world, Role.CLIENT, kind, state)
    events = pair.to_client(forge(frame, sid, _junk_payload(frame)))
    failed = only(events, SessionFailed)
    assert failed.session_id == sid
    if (Role.CLIENT, kind, state, frame) not in TRANSITIONS and frame is not FrameType.ABORT:
        assert failed.code is ErrorCode.UNEXPECTED_FRAME
    else:
        assert failed.code in {ErrorCode.MALFORMED, ErrorCode.BAD_RECORD, ErrorCode.AUTHENTICATION_FAILED}
    assert pair.client.session_state(sid) is State.CLOSED
    pair.pump()
    _bystander_still_works(pair, bystander)


@pytest.mark.parametrize("frame", SESSION_FRAMES, ids=lambda t: t.name)
@pytest.mark.parametrize(
    ("kind", "state"), SERVER_STATES, ids=lambda v: v.name if isinstance(v, State) else v.value
)
def test_server_gets_every_frame_in_every_state(world, kind, state, frame):
    pair, bystander, sid = _setup(world, Role.SERVER, kind, state)
    before = len(pair.server_events)
    pair.to_server(forge(frame, sid, _junk_payload(frame)))
    events = pair.server_events[before:]
    failed = only(events, SessionFailed)
    assert failed.session_id == sid
    if (Role.SERVER, kind, state, frame) not in TRANSITIONS and frame is not FrameType.ABORT:
        assert failed.code is ErrorCode.UNEXPECTED_FRAME
    else:
        assert failed.code in {ErrorCode.MALFORMED, ErrorCode.BAD_RECORD, ErrorCode.AUTHENTICATION_FAILED}
    assert pair.server.session_state(sid) is State.CLOSED
    # The client hears about it (ABORT) unless it was the client's own ABORT.
    client_events = pair.pump()
    if frame is not FrameType.ABORT:
        assert only(client_events, SessionFailed).session_id == sid
    _bystander_still_works(pair, bystander)


RESUMING_STATES = [State.AWAIT_RESUMED, State.CLOSE_AFTER_RESUMED]


def _resuming(world, target: State):
    """A session resuming on a second connection (its RESUME never delivered), in ``target``."""
    inner, registry = world
    first = InMemoryPair(*_connections(registry), inner, now=0.0)
    login(first, ACCOUNT)
    first.client.connection_lost()
    first.server.connection_lost()
    first.pump()
    [detached] = first.client.take_detached_sessions()
    pair = InMemoryPair(*_connections(registry), inner, now=0.0)
    bystander = login(pair, ACCOUNT).session_id
    sid = pair.client.resume_session(detached)
    if target is State.CLOSE_AFTER_RESUMED:
        pair.client.close_session(sid)
    pair.client.data_to_send()  # the test speaks for the server
    assert pair.client.session_state(sid) is target
    return pair, bystander, sid


@pytest.mark.parametrize("frame", SESSION_FRAMES, ids=lambda t: t.name)
@pytest.mark.parametrize("state", RESUMING_STATES, ids=lambda s: s.name)
def test_client_gets_every_frame_while_resuming(world, state, frame):
    pair, bystander, sid = _resuming(world, state)
    events = pair.to_client(forge(frame, sid, _junk_payload(frame)))
    failed = only(events, SessionFailed)
    assert failed.session_id == sid
    if (Role.CLIENT, SessionKind.REQUEST, state, frame) not in TRANSITIONS and frame is not FrameType.ABORT:
        assert failed.code is ErrorCode.UNEXPECTED_FRAME
    else:
        assert failed.code in {ErrorCode.MALFORMED, ErrorCode.BAD_RECORD}
    assert pair.client.session_state(sid) is State.CLOSED
    pair.pump()
    _bystander_still_works(pair, bystander)


def test_every_table_state_is_exercised():
    exercised = (
        {(Role.CLIENT, k, s) for k, s in CLIENT_STATES}
        | {(Role.SERVER, k, s) for k, s in SERVER_STATES}
        | {(Role.CLIENT, SessionKind.REQUEST, s) for s in RESUMING_STATES}
    )
    in_table = {key[:3] for key in TRANSITIONS if key[2] not in (State.IDLE, State.DETACHED)}
    assert in_table == exercised
