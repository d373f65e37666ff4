"""Every legal session transition, for both roles, in one table.

A session is in one :class:`State`. What happens to it is a *trigger*: a frame
received from the peer (a :class:`~keymgmt_proto._wire.FrameType`) or a local
:class:`Command`. ``TRANSITIONS[(role, kind, state, trigger)]`` is the next
state; a missing key is illegal: a frame is a peer fault (the session ends with
UNEXPECTED_FRAME), a command is a :class:`LocalProtocolError`.

Two client states wait for the local adapter, not the peer: ``AWAIT_REG_STEP`` and
``AWAIT_LOGIN_STEP`` hold a session while the adapter runs the OPAQUE step an
``OpaqueStepRequired`` event asked for; nothing crosses the wire until it hands
the result back (``complete_opaque_step``).

``docs/architecture.md`` carries a diagram generated from this table by
``scripts/gen_state_diagram.py``.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

from ._errors import LocalProtocolError
from ._wire import FrameType

__all__ = [
    "LIVE_STATES",
    "TRANSITIONS",
    "Command",
    "Role",
    "SessionKind",
    "State",
    "Trigger",
    "next_state",
    "transition",
]


class _FastHashEnum(Enum):
    """Members are singletons compared by identity, so hash them by identity too: the
    transition table is looked up several times per frame and Enum's own ``__hash__``
    runs Python code."""

    __hash__ = object.__hash__


class Role(_FastHashEnum):
    CLIENT = "client"
    SERVER = "server"


class SessionKind(_FastHashEnum):
    REGISTRATION = "registration"
    REQUEST = "request"


class State(_FastHashEnum):
    """Session states. Client-only, server-only and shared states share one namespace."""

    IDLE = "IDLE"
    # client
    AWAIT_REG_RESPONSE = "AWAIT_REG_RESPONSE"
    #: An ``OpaqueStepRequired`` (registration finish) is out: the adapter runs it.
    AWAIT_REG_STEP = "AWAIT_REG_STEP"
    AWAIT_LOGIN_RESPONSE = "AWAIT_LOGIN_RESPONSE"
    #: An ``OpaqueStepRequired`` (login finish) is out: the adapter runs it.
    AWAIT_LOGIN_STEP = "AWAIT_LOGIN_STEP"
    AWAIT_WELCOME = "AWAIT_WELCOME"
    AWAIT_REG_CLOSE = "AWAIT_REG_CLOSE"
    AWAIT_RESUMED = "AWAIT_RESUMED"
    #: Logout asked while a resumption was under way: CLOSE goes out once RESUMED arrives.
    CLOSE_AFTER_RESUMED = "CLOSE_AFTER_RESUMED"
    # server
    AWAIT_REG_DECISION = "AWAIT_REG_DECISION"
    AWAIT_REG_UPLOAD = "AWAIT_REG_UPLOAD"
    AWAIT_LOGIN_START = "AWAIT_LOGIN_START"
    AWAIT_LOGIN_DECISION = "AWAIT_LOGIN_DECISION"
    AWAIT_LOGIN_FINISH = "AWAIT_LOGIN_FINISH"
    AWAIT_COMPLETION = "AWAIT_COMPLETION"
    AWAIT_STORE = "AWAIT_STORE"
    # both
    ESTABLISHED = "ESTABLISHED"
    DETACHED = "DETACHED"
    CLOSED = "CLOSED"


class Command(_FastHashEnum):
    """Local actions on a session (API calls, timers, connection loss)."""

    OPEN = "open"
    ACCEPT_REGISTRATION = "accept_registration"
    ACCEPT_LOGIN = "accept_login"
    CONFIRM_REGISTRATION = "confirm_registration"
    #: The client hands back the result of an OPAQUE registration-finish step.
    COMPLETE_REG_STEP = "complete_reg_step"
    #: The client hands back the result of an OPAQUE login-finish step.
    COMPLETE_LOGIN_STEP = "complete_login_step"
    SEND_REQUEST = "send_request"
    SEND_RESPONSE = "send_response"
    RESUME = "resume"
    CLOSE = "close"
    #: Application refusal, timer expiry or local fault: the session ends.
    ABORT = "abort"
    #: The connection went away under an established session.
    DETACH = "detach"
    #: The server refused a RESUME unseen (ABORT ``RATE_LIMITED``): resume again later.
    DEFER = "defer"


Trigger = FrameType | Command

C, S = Role.CLIENT, Role.SERVER
REG, REQ = SessionKind.REGISTRATION, SessionKind.REQUEST
St, F, K = State, FrameType, Command

_ROWS: list[tuple[Role, SessionKind, State, Trigger, State]] = [
    # ---- client, registration session (NET-5)
    (C, REG, St.IDLE, K.OPEN, St.AWAIT_REG_RESPONSE),  # send REG_START
    (C, REG, St.AWAIT_REG_RESPONSE, F.REG_RESPONSE, St.AWAIT_REG_STEP),  # event OpaqueStepRequired
    (C, REG, St.AWAIT_REG_STEP, K.COMPLETE_REG_STEP, St.AWAIT_LOGIN_RESPONSE),  # send REG_UPLOAD, LOGIN_START
    (C, REG, St.AWAIT_LOGIN_RESPONSE, F.LOGIN_RESPONSE, St.AWAIT_LOGIN_STEP),  # event OpaqueStepRequired
    (C, REG, St.AWAIT_LOGIN_STEP, K.COMPLETE_LOGIN_STEP, St.AWAIT_WELCOME),  # send LOGIN_FINISH
    (C, REG, St.AWAIT_WELCOME, F.WELCOME, St.AWAIT_REG_CLOSE),  # send COMPLETE_REGISTRATION
    (C, REG, St.AWAIT_REG_CLOSE, F.CLOSE, St.CLOSED),
    # ---- client, request session (NET-6)
    (C, REQ, St.IDLE, K.OPEN, St.AWAIT_LOGIN_RESPONSE),  # send LOGIN_START
    (C, REQ, St.AWAIT_LOGIN_RESPONSE, F.LOGIN_RESPONSE, St.AWAIT_LOGIN_STEP),  # event OpaqueStepRequired
    (C, REQ, St.AWAIT_LOGIN_STEP, K.COMPLETE_LOGIN_STEP, St.AWAIT_WELCOME),  # send LOGIN_FINISH
    (C, REQ, St.AWAIT_WELCOME, F.WELCOME, St.ESTABLISHED),
    (C, REQ, St.ESTABLISHED, K.SEND_REQUEST, St.ESTABLISHED),
    (C, REQ, St.ESTABLISHED, F.RESPONSE, St.ESTABLISHED),
    (C, REQ, St.ESTABLISHED, F.CLOSE, St.CLOSED),
    (C, REQ, St.ESTABLISHED, K.CLOSE, St.CLOSED),  # send CLOSE (logout)
    (C, REQ, St.ESTABLISHED, K.DETACH, St.DETACHED),
    # ---- client, resumption (NET-2)
    (C, REQ, St.DETACHED, K.RESUME, St.AWAIT_RESUMED),  # send RESUME
    (C, REQ, St.AWAIT_RESUMED, F.RESUMED, St.ESTABLISHED),  # new key epoch; re-send unanswered requests
    (C, REQ, St.AWAIT_RESUMED, K.SEND_REQUEST, St.AWAIT_RESUMED),  # queued until RESUMED
    (C, REQ, St.AWAIT_RESUMED, F.CLOSE, St.CLOSED),
    (C, REQ, St.AWAIT_RESUMED, K.CLOSE, St.CLOSE_AFTER_RESUMED),
    (C, REQ, St.AWAIT_RESUMED, K.DETACH, St.DETACHED),
    (C, REQ, St.AWAIT_RESUMED, K.DEFER, St.DETACHED),  # ABORT(RATE_LIMITED): event ResumeDeferred
    (C, REQ, St.CLOSE_AFTER_RESUMED, F.RESUMED, St.CLOSED),  # send CLOSE in the new epoch
    (C, REQ, St.CLOSE_AFTER_RESUMED, F.CLOSE, St.CLOSED),
    # ---- server, registration session (NET-5, REG-1..REG-4)
    (S, REG, St.IDLE, F.REG_START, St.AWAIT_REG_DECISION),  # event RegistrationRequested
    (S, REG, St.AWAIT_REG_DECISION, K.ACCEPT_REGISTRATION, St.AWAIT_REG_UPLOAD),  # send REG_RESPONSE
    (S, REG, St.AWAIT_REG_UPLOAD, F.REG_UPLOAD, St.AWAIT_LOGIN_START),
    (S, REG, St.AWAIT_LOGIN_START, F.LOGIN_START, St.AWAIT_LOGIN_FINISH),  # send LOGIN_RESPONSE
    (S, REG, St.AWAIT_LOGIN_FINISH, F.LOGIN_FINISH, St.AWAIT_COMPLETION),  # send WELCOME
    (S, REG, St.AWAIT_COMPLETION, F.COMPLETE_REGISTRATION, St.AWAIT_STORE),  # event RegistrationCompleted
    (S, REG, St.AWAIT_STORE, K.CONFIRM_REGISTRATION, St.CLOSED),  # send CLOSE(OK)
    # ---- server, request session (NET-6)
    (S, REQ, St.IDLE, F.LOGIN_START, St.AWAIT_LOGIN_DECISION),  # event LoginRequested
    (S, REQ, St.AWAIT_LOGIN_DECISION, K.ACCEPT_LOGIN, St.AWAIT_LOGIN_FINISH),  # send LOGIN_RESPONSE
    (S, REQ, St.AWAIT_LOGIN_FINISH, F.LOGIN_FINISH, St.ESTABLISHED),  # send WELCOME
    (S, REQ, St.ESTABLISHED, F.REQUEST, St.ESTABLISHED),  # event RequestReceived
    (S, REQ, St.ESTABLISHED, K.SEND_RESPONSE, St.ESTABLISHED),
    (S, REQ, St.ESTABLISHED, F.CLOSE, St.CLOSED),  # client logout
    (S, REQ, St.ESTABLISHED, K.CLOSE, St.CLOSED),  # expiry or request limit: send CLOSE
    (S, REQ, St.ESTABLISHED, K.DETACH, St.DETACHED),
    (S, REQ, St.DETACHED, K.SEND_RESPONSE, St.DETACHED),  # kept for the resumed connection
    (S, REQ, St.DETACHED, K.CLOSE, St.CLOSED),  # expired while detached
    # RESUME arrives on a fresh session id and re-attaches the named session, whether it
    # is detached or still attached to another connection the client has given up on.
    (S, REQ, St.IDLE, F.RESUME, St.ESTABLISHED),  # the new session id
    (S, REQ, St.DETACHED, K.RESUME, St.ESTABLISHED),  # send RESUMED
    (S, REQ, St.ESTABLISHED, K.RESUME, St.ESTABLISHED),  # send RESUMED
]

#: States in which a session is alive and attached to a connection.
LIVE_STATES: frozenset[State] = frozenset(
    state for (_, _, state, _, _) in _ROWS if state not in (St.IDLE, St.DETACHED, St.CLOSED)
)

# Either peer may ABORT a live session; the local side may abort it too. A session
# whose connection dies before it is established ends (only established request
# sessions survive, as DETACHED).
for _role, _kind, _state in sorted(
    {(r, k, s) for (r, k, s, _, _) in _ROWS if s in LIVE_STATES},
    key=lambda t: (t[0].value, t[1].value, t[2].value),
):
    _ROWS.append((_role, _kind, _state, F.ABORT, St.CLOSED))
    _ROWS.append((_role, _kind, _state, K.ABORT, St.CLOSED))
    if _state is not St.ESTABLISHED and _state is not St.AWAIT_RESUMED:
        _ROWS.append((_role, _kind, _state, K.DETACH, St.CLOSED))

TRANSITIONS: dict[tuple[Role, SessionKind, State, Trigger], State] = {}
for _row in _ROWS:
    _key = _row[:4]
    assert _key not in TRANSITIONS, f"duplicate transition {_key}"
    TRANSITIONS[_key] = _row[4]


def next_state(role: Role, kind: SessionKind, state: State, trigger: Trigger) -> State | None:
    """The state after ``trigger``, or None if the table has no such transition."""
    return TRANSITIONS.get((role, kind, state, trigger))


class _Session(Protocol):
    kind: SessionKind
    state: State


def transition(role: Role, session: _Session, trigger: Trigger) -> None:
    """Move ``session`` to the state the table gives for ``trigger``: the one
    place a session's state changes. Callers check legality first (``next_state``), so a
    missing row here is a bug, reported as LocalProtocolError."""
    target = TRANSITIONS.get((role, session.kind, session.state, trigger))
    if target is None:
        name = trigger.name if isinstance(trigger, FrameType) else trigger.value
        raise LocalProtocolError(f"no {name} transition from {session.state.name}")
    session.state = target
