"""Events that ``next_event()`` returns. Frozen dataclasses; secrets are kept out of ``repr``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from ._errors import ErrorCode, RemoteProtocolError

if TYPE_CHECKING:
    from ._opaque import OpaqueSuite, PasswordCheck

__all__ = [
    "NEED_DATA",
    "ConnectionFailed",
    "Event",
    "LoginFailed",
    "LoginRequested",
    "LoginSucceeded",
    "NeedData",
    "OpaqueStep",
    "OpaqueStepRequired",
    "OpaqueStepResult",
    "RegistrationCompleted",
    "RegistrationRequested",
    "RegistrationSucceeded",
    "RequestReceived",
    "ResponseReceived",
    "ResumeDeferred",
    "SessionClosed",
    "SessionEstablished",
    "SessionFailed",
    "SessionHandle",
    "SessionResumed",
]


class NeedData(Enum):
    """Sentinel: no complete event is buffered; feed more bytes."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


class Event:
    """Base class of every event."""

    __slots__ = ()


class SessionHandle:
    """Names one session for its whole life in this process: the same object on every
    event of the session, across resumptions on other connections (session ids are per
    connection and change). Compare it with ``is`` or use it as a dict key. A session a
    server instance claims from a shared store gets a new handle there."""

    __slots__ = ("__weakref__",)

    def __repr__(self) -> str:
        return f"<SessionHandle {id(self):#x}>"


# ------------------------------------------------------------- server side


@dataclass(frozen=True, slots=True)
class RegistrationRequested(Event):
    """A client wants to register ``account_name``.

    Answer with ``accept_registration(session_id, user_id)`` if the name is free
    and well-formed (and the token authorizes it, where the server asks for one), else
    ``reject_session(session_id, ErrorCode.ACCOUNT_EXISTS, INVALID_ACCOUNT_NAME or
    NOT_AUTHORIZED)``. No OPAQUE work has been done yet.
    """

    session_id: int
    account_name: bytes
    #: What the client sent to be allowed to register (REG-5): empty, or e.g. an invitation.
    token: bytes = field(default=b"", repr=False)
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class RegistrationCompleted(Event):
    """Registration finished on the wire; store it atomically (REG-4), then
    ``confirm_registration(session_id)`` or ``reject_session(...)``."""

    session_id: int
    account_name: bytes
    user_id: bytes
    registration_record: bytes = field(repr=False)
    encrypted_storage_key: bytes = field(repr=False)
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class LoginRequested(Event):
    """A client wants to log in as ``account_name``: look up its record and call
    ``accept_login(session_id, user_id, registration_record)``."""

    session_id: int
    account_name: bytes
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class LoginSucceeded(Event):
    """OPAQUE login verified; the session is established (audit it)."""

    session_id: int
    account_name: bytes
    user_id: bytes
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class LoginFailed(Event):
    """OPAQUE login failed for ``account_name`` (audit and throttle it)."""

    session_id: int
    account_name: bytes
    user_id: bytes | None
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class RequestReceived(Event):
    """An application request on an established session; answer with ``send_response``."""

    session_id: int
    user_id: bytes
    request_id: int
    body: bytes = field(repr=False)
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class SessionResumed(Event):
    """An established session moved to this connection under a new ``session_id``."""

    session_id: int
    user_id: bytes

    # ------------------------------------------------------------- client side
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)


class OpaqueStep(Enum):
    """Which expensive OPAQUE client step an :class:`OpaqueStepRequired` asks for."""

    #: ``client_registration_finish``: the upload for REG_UPLOAD and the export key.
    REGISTRATION_FINISH = "registration_finish"
    #: ``client_login_finish``: the finalization for LOGIN_FINISH, session and export keys.
    LOGIN_FINISH = "login_finish"


@dataclass(frozen=True, slots=True)
class OpaqueStepResult:
    """What running an :class:`OpaqueStepRequired` gave; hand it to
    :meth:`ClientConnection.complete_opaque_step`. Plain data (it can come back from a
    process pool). ``error`` is set, and the keys empty, when the step failed
    (``AUTHENTICATION_FAILED`` for a wrong password or an unknown account)."""

    session_id: int
    step: OpaqueStep
    message: bytes = field(default=b"", repr=False)
    export_key: bytes = field(default=b"", repr=False)
    #: Login only; empty for a registration step.
    session_key: bytes = field(default=b"", repr=False)
    error: ErrorCode | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class OpaqueStepRequired(Event):
    """A session needs an expensive OPAQUE client step (Argon2 key stretching: tens of
    milliseconds of CPU). Run it wherever suits the adapter, with the connection's suite:
    ``conn.complete_opaque_step(event.run(conn.opaque))`` inline, or ``event.run`` in a
    thread or a process pool (the fields are plain bytes), and hand the result back. The
    session waits meanwhile (``AWAIT_REG_STEP`` or ``AWAIT_LOGIN_STEP``). The event holds
    the password: drop it once it has run."""

    session_id: int
    step: OpaqueStep
    password: bytes = field(repr=False)
    #: The client's OPAQUE state from the matching start step.
    state: bytes = field(repr=False)
    #: The server's RegistrationResponse or CredentialResponse.
    server_message: bytes = field(repr=False)

    def run(self, opaque: OpaqueSuite) -> OpaqueStepResult:
        """Run the step with ``opaque``; a failure becomes a result carrying its error."""
        try:
            if self.step is OpaqueStep.REGISTRATION_FINISH:
                upload = opaque.client_registration_finish(self.password, self.state, self.server_message)
                return OpaqueStepResult(self.session_id, self.step, upload.message, upload.state)
            login = opaque.client_login_finish(self.password, self.state, self.server_message)
        except RemoteProtocolError as exc:
            return OpaqueStepResult(self.session_id, self.step, error=exc.code, reason=str(exc))
        return OpaqueStepResult(
            self.session_id, self.step, login.message, login.export_key, login.session_key
        )


@dataclass(frozen=True, slots=True)
class RegistrationSucceeded(Event):
    """The server stored the registration. ``export_key`` is the OPAQUE export key."""

    session_id: int
    user_id: bytes
    export_key: bytes = field(repr=False)
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class SessionEstablished(Event):
    """Login succeeded on both sides; requests may be sent."""

    session_id: int
    user_id: bytes
    export_key: bytes = field(repr=False)
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)
    #: Tells a new password from the one of this login (``SecretOps(password_check=...)``);
    #: None when the OPAQUE suite's messages are not OPAQUE's layout.
    password_check: PasswordCheck | None = field(default=None, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class ResponseReceived(Event):
    """The answer to ``request_id``; each request is answered exactly once."""

    session_id: int
    request_id: int
    body: bytes = field(repr=False)

    # ------------------------------------------------------------- both sides
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class SessionClosed(Event):
    """The session ended normally or by policy (logout, expiry, request limit)."""

    session_id: int
    code: ErrorCode
    #: Server side: whose session it was (for the audit log). None on the client.
    user_id: bytes | None = None
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class ResumeDeferred(Event):
    """The server refused to look at a RESUME yet (ABORT ``RATE_LIMITED``: too many
    session-opening frames from this address). The session is detached again, unharmed:
    :meth:`ClientConnection.take_detached_sessions` returns it; resume it a little later.
    ``session_id`` is the id the refused RESUME used."""

    session_id: int
    reason: str
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class SessionFailed(Event):
    """The session ended with an error. ``remote`` is True when the peer said so or
    sent something invalid; False when this side ended it (timeout, connection lost)."""

    session_id: int
    code: ErrorCode
    reason: str
    remote: bool
    #: The session's handle, stable across resumptions (None where the session has none).
    handle: SessionHandle | None = field(default=None, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class ConnectionFailed(Event):
    """The connection is unusable (broken framing or GOAWAY). Close the transport after
    sending ``data_to_send()``; established request sessions stay resumable."""

    code: ErrorCode
    reason: str
    remote: bool
