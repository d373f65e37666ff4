"""The client side of a connection: opens registration and request sessions.

Typical use (an adapter does the I/O)::

    conn = ClientConnection(random=os.urandom)
    sid = conn.open_request_session(b"alice@example.org", password)
    transport.write(conn.data_to_send())
    ... conn.receive_data(transport.read()); event = conn.next_event() ...
    ... if isinstance(event, OpaqueStepRequired):
            conn.complete_opaque_step(event.run(conn.opaque)) ...

The cheap OPAQUE start steps run inside ``open_*`` (and, for a registration, when its
first step's result comes back). The two expensive finish steps (Argon2) never run inside
``next_event``: it returns an ``OpaqueStepRequired`` event with their inputs, the adapter
runs them where it likes, and ``complete_opaque_step`` takes the result back.

Passwords are held only between the OPAQUE steps that need them.
``export_key`` reaches the application in the ``SessionEstablished`` or
``RegistrationSucceeded`` event; ``master_key`` and ``storage_key`` never leave
this module (REG-3).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from ._connection import ConnectionBase
from ._crypto import MAX_SEQ, Channel, RandomSource, derive_master_key, encrypt_storage_key
from ._errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    OpaqueStep,
    OpaqueStepRequired,
    OpaqueStepResult,
    RegistrationSucceeded,
    ResponseReceived,
    ResumeDeferred,
    SessionClosed,
    SessionEstablished,
    SessionFailed,
    SessionHandle,
    SessionResumed,
)
from ._messages import (
    REGISTRATION_TOKEN_MAX,
    RESUME_NONCE_SIZE,
    Abort,
    Close,
    CompleteRegistration,
    LoginFinish,
    LoginResponse,
    LoginStart,
    RegResponse,
    RegStart,
    RegUpload,
    Request,
    Response,
    Resume,
    Resumed,
    ResumedEnvelope,
    ResumeEnvelope,
    Welcome,
    _check_account_name,
)
from ._opaque import REAL_OPAQUE, OpaqueSuite, PasswordCheck
from ._state import Command, Role, SessionKind, State, Trigger, next_state, transition
from ._wire import DEFAULT_MAX_PAYLOAD, MAX_SESSION_ID, Frame, FrameType

__all__ = ["ClientConnection", "DetachedSession"]

#: Default cap on requests awaiting an answer in one session (the server enforces its own).
DEFAULT_MAX_IN_FLIGHT = 16
#: Size of OPAQUE's export key and session key (OPAQUE-3DH with SHA-512).
_OPAQUE_KEY_SIZE = 64
#: The command that hands back each step's result (the transition table decides where it is legal).
_STEP_COMMANDS = {
    OpaqueStep.REGISTRATION_FINISH: Command.COMPLETE_REG_STEP,
    OpaqueStep.LOGIN_FINISH: Command.COMPLETE_LOGIN_STEP,
}


@dataclass(slots=True, repr=False, eq=False)
class _ClientSession:
    kind: SessionKind
    session_id: int
    account_name: bytes
    state: State = State.IDLE
    password: bytes | None = None
    opaque_state: bytes | None = None
    registration_export_key: bytes | None = None
    export_key: bytes | None = None
    #: From the login's credential response: tells a new password from this one (public).
    password_check: PasswordCheck | None = None
    user_id: bytes | None = None
    channel: Channel | None = None
    next_request_id: int = 1
    #: request_id -> body, for requests not yet answered (re-sent on resumption)
    unanswered: dict[int, bytes] = field(default_factory=dict)
    #: This side's contribution to the key epoch a RESUME under way starts (NET-14).
    resume_nonce: bytes | None = None
    #: What every event of the session carries: the same object across resumptions.
    handle: SessionHandle = field(default_factory=SessionHandle)

    def __repr__(self) -> str:
        return f"<client session {self.session_id} {self.kind.value} {self.state.name}>"


class DetachedSession:
    """An established request session whose connection is gone; pass it to
    :meth:`ClientConnection.resume_session` on a new connection. Holds keys: no repr details."""

    __slots__ = ("_session",)

    def __init__(self, session: _ClientSession) -> None:
        self._session = session

    @property
    def user_id(self) -> bytes:
        assert self._session.user_id is not None
        return self._session.user_id

    @property
    def handle(self) -> SessionHandle:
        """The session's handle: the same on its events before and after the resumption."""
        return self._session.handle

    @property
    def session_id(self) -> int:
        """The id the session had on the connection it was detached from."""
        return self._session.session_id

    @property
    def unanswered_requests(self) -> tuple[int, ...]:
        """Request ids that will be re-sent on resumption (each is answered once)."""
        return tuple(self._session.unanswered)

    def __repr__(self) -> str:
        return f"<DetachedSession {len(self._session.unanswered)} unanswered>"


class ClientConnection(ConnectionBase):
    """Client state machine for one transport connection carrying many sessions."""

    role = Role.CLIENT

    def __init__(
        self,
        random: RandomSource,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_requests_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        opaque: OpaqueSuite = REAL_OPAQUE,
    ) -> None:
        super().__init__(max_payload)
        self._random = random
        self._opaque = opaque
        self.max_requests_in_flight = max_requests_in_flight
        self._sessions: dict[int, _ClientSession] = {}
        self._last_session_id = 0
        self._detached: list[_ClientSession] = []

    # ------------------------------------------------------------ commands

    def open_registration(self, account_name: bytes, password: bytes, token: bytes = b"") -> int:
        """Start registering ``account_name`` (NET-5), with ``token`` where the server asks for
        an authorization (REG-5, e.g. an invitation). Returns the new session id."""
        if len(token) > REGISTRATION_TOKEN_MAX:
            raise LocalProtocolError(f"a registration token is at most {REGISTRATION_TOKEN_MAX} bytes")
        session = self._new_session(SessionKind.REGISTRATION, account_name, password)
        step = self._opaque.client_registration_start(password)
        message = RegStart(account_name, step.message, token)
        self._commit_open(session, step.state)
        self._send(FrameType.REG_START, session.session_id, message.encode())
        return session.session_id

    def open_request_session(self, account_name: bytes, password: bytes) -> int:
        """Log in as ``account_name`` (NET-6). Returns the new session id."""
        session = self._new_session(SessionKind.REQUEST, account_name, password)
        step = self._opaque.client_login_start(password)
        message = LoginStart(account_name, step.message)
        self._commit_open(session, step.state)
        self._send(FrameType.LOGIN_START, session.session_id, message.encode())
        return session.session_id

    @property
    def opaque(self) -> OpaqueSuite:
        """The OPAQUE suite this connection was made with: run its steps with it."""
        return self._opaque

    def complete_opaque_step(self, result: OpaqueStepResult) -> bool:
        """Hand back what an :class:`OpaqueStepRequired` gave (``event.run(conn.opaque)``).

        After a registration step REG_UPLOAD and LOGIN_START are queued; after a login step
        LOGIN_FINISH is queued and the channel is set up; a failed step ends the session
        (``SessionFailed``, ABORT to the server). Returns False and changes nothing if the
        session ended meanwhile (aborted, failed, its connection lost). Raises
        :class:`LocalProtocolError` for a session never opened on this connection, a
        session not waiting for this step (a result handed back twice, or for the other
        step) and a result whose sizes are not OPAQUE's."""
        session = self._sessions.get(result.session_id)
        if session is None:
            if 0 < result.session_id <= self._last_session_id:
                return False
            raise LocalProtocolError(f"no session {result.session_id}")
        self._check(session, _STEP_COMMANDS[result.step])
        if result.error is not None:
            error = RemoteProtocolError(result.reason, result.error)
            self._fail(session, error, remote=result.error is not ErrorCode.AUTHENTICATION_FAILED)
            return True
        keys = [result.export_key]
        try:
            if result.step is OpaqueStep.REGISTRATION_FINISH:
                upload = RegUpload(result.message)
            else:
                finish = LoginFinish(result.message)
                keys.append(result.session_key)
        except ValueError as exc:
            raise LocalProtocolError(f"not an OPAQUE step result: {exc}") from None
        if any(len(key) != _OPAQUE_KEY_SIZE for key in keys):
            raise LocalProtocolError(f"not an OPAQUE step result: its keys are {_OPAQUE_KEY_SIZE} bytes")
        if result.step is OpaqueStep.REGISTRATION_FINISH:
            self._after_registration_step(session, upload, result.export_key)
        else:
            try:
                self._after_login_step(session, finish, result)
            except RemoteProtocolError as exc:
                self._fail(session, exc, remote=False)
                return True
        transition(Role.CLIENT, session, _STEP_COMMANDS[result.step])
        return True

    def send_request(self, session_id: int, body: bytes) -> int:
        """Send an application request; returns its request id. While a resumption is under
        way the request waits and goes out, sealed in the new key epoch, once RESUMED arrives."""
        session = self._live(session_id)
        self._check(session, Command.SEND_REQUEST)
        if len(session.unanswered) >= self.max_requests_in_flight:
            raise LocalProtocolError(
                f"{self.max_requests_in_flight} requests already in flight", ErrorCode.LIMIT_EXCEEDED
            )
        request_id = session.next_request_id
        if request_id >= 2**32:
            raise LocalProtocolError("request ids exhausted; open a new session")
        assert session.channel is not None
        if (
            session.channel.send_seq >= MAX_SEQ - 1 and session.state is State.ESTABLISHED
        ):  # the last is CLOSE's
            raise LocalProtocolError(
                "sequence numbers exhausted; open a new session", ErrorCode.SEQUENCE_EXHAUSTED
            )
        plaintext = Request.encode_fields(request_id, body)
        self._check_size(plaintext)
        session.next_request_id += 1
        session.unanswered[request_id] = body
        if session.state is State.ESTABLISHED:
            self._send_sealed(session, FrameType.REQUEST, plaintext)
        return request_id

    def close_session(self, session_id: int) -> None:
        """Log out: tell the server (sealed CLOSE) and forget the session. During a resumption
        the CLOSE goes out once RESUMED arrives (the session can no longer be used)."""
        session = self._live(session_id)
        target = self._check(session, Command.CLOSE)
        if target is State.CLOSE_AFTER_RESUMED:
            transition(Role.CLIENT, session, Command.CLOSE)
            return
        self._send_sealed(session, FrameType.CLOSE, Close(ErrorCode.CLIENT_CLOSED).encode())
        self._end(session, Command.CLOSE)

    def abort_session(self, session_id: int, reason: str = "cancelled") -> None:
        """Abandon a live session in any state (e.g. a login that takes too long)."""
        session = self._live(session_id)
        self._check(session, Command.ABORT)
        self._send_abort(session_id, ErrorCode.CLIENT_CLOSED, reason)
        self._end(session, Command.ABORT)

    def take_detached_sessions(self) -> list[DetachedSession]:
        """Established sessions whose connection failed or was lost, ready to resume."""
        detached = [DetachedSession(s) for s in self._detached]
        self._detached.clear()
        return detached

    def resume_session(self, detached: DetachedSession) -> int:
        """Resume a session from a dead connection on this one (NET-2, NET-14). Once RESUMED
        arrives the session is in a new key epoch and its unanswered requests are re-sent
        with their original ids; each is answered once."""
        session = detached._session
        self._check(session, Command.RESUME)
        channel = session.channel
        assert channel is not None
        if channel.resume_seq >= MAX_SEQ:
            raise LocalProtocolError("resumptions exhausted; log in again", ErrorCode.SEQUENCE_EXHAUSTED)
        session_id = self._allocate_session_id()
        nonce = self._random(RESUME_NONCE_SIZE)
        record = channel.seal_resume(Resume(nonce, channel.received_total).encode())
        envelope = ResumeEnvelope(channel.session_handle, record)
        session.session_id = session_id
        session.resume_nonce = nonce
        transition(Role.CLIENT, session, Command.RESUME)
        self._sessions[session_id] = session
        self._send(FrameType.RESUME, session_id, envelope.encode())
        return session_id

    def connection_lost(self) -> None:
        if self.failed is None:
            self._fail_connection(
                ErrorCode.CONNECTION_LOST, "connection lost", remote=False, send_goaway=False
            )

    def session_handle(self, session_id: int) -> SessionHandle:
        """The handle of a live session (the one its events carry, across resumptions)."""
        return self._live(session_id).handle

    def session_state(self, session_id: int) -> State:
        """The session's state (CLOSED for ended or unknown ids)."""
        session = self._sessions.get(session_id)
        return session.state if session is not None else State.CLOSED

    # ------------------------------------------------------------ internals

    def _allocate_session_id(self) -> int:
        if self.failed is not None:
            raise LocalProtocolError("connection has failed; open a new one")
        if self._last_session_id >= MAX_SESSION_ID:
            raise LocalProtocolError("session ids exhausted on this connection", ErrorCode.BAD_SESSION_ID)
        self._last_session_id += 1
        return self._last_session_id

    def _new_session(self, kind: SessionKind, account_name: bytes, password: bytes) -> _ClientSession:
        try:
            _check_account_name(account_name)
        except ValueError as exc:
            raise LocalProtocolError(str(exc), ErrorCode.INVALID_ACCOUNT_NAME) from None
        if not password:
            raise LocalProtocolError("password must not be empty")
        if self.failed is not None:
            raise LocalProtocolError("connection has failed; open a new one")
        if self._last_session_id >= MAX_SESSION_ID:
            raise LocalProtocolError("session ids exhausted on this connection", ErrorCode.BAD_SESSION_ID)
        return _ClientSession(kind, self._last_session_id + 1, account_name, password=password)

    def _commit_open(self, session: _ClientSession, opaque_state: bytes) -> None:
        transition(Role.CLIENT, session, Command.OPEN)
        session.opaque_state = opaque_state
        self._last_session_id = session.session_id
        self._sessions[session.session_id] = session

    def _live(self, session_id: int) -> _ClientSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise LocalProtocolError(f"no live session {session_id}")
        return session

    def _check(self, session: _ClientSession, trigger: Command) -> State:
        target = next_state(Role.CLIENT, session.kind, session.state, trigger)
        if target is None:
            raise LocalProtocolError(
                f"cannot {trigger.value} a {session.kind.value} session in state {session.state.name}"
            )
        return target

    def _check_size(self, plaintext: bytes) -> None:
        if 8 + len(plaintext) + 16 > self.max_payload:
            raise LocalProtocolError("request larger than the frame limit", ErrorCode.FRAME_TOO_LARGE)

    def _send_sealed(self, session: _ClientSession, frame_type: FrameType, plaintext: bytes) -> None:
        assert session.channel is not None
        self._send(frame_type, session.session_id, session.channel.seal_payload(frame_type, plaintext))

    def _end(self, session: _ClientSession, trigger: Trigger) -> None:
        """End a session by ``trigger`` (a no-op on the state if it already reached CLOSED)."""
        if session.state is not State.CLOSED:
            transition(Role.CLIENT, session, trigger)
        session.password = None
        session.opaque_state = None
        self._sessions.pop(session.session_id, None)

    def _fail(
        self, session: _ClientSession, error: ProtocolError, *, remote: bool, notify: bool = True
    ) -> None:
        if notify:
            self._send_abort(session.session_id, error.code, str(error))
        self._end(session, Command.ABORT)
        self._events.append(
            SessionFailed(session.session_id, error.code, str(error), remote, handle=session.handle)
        )

    def _on_connection_failed(self) -> None:
        for session in list(self._sessions.values()):
            target = next_state(Role.CLIENT, session.kind, session.state, Command.DETACH)
            if target is State.DETACHED:
                transition(Role.CLIENT, session, Command.DETACH)
                self._sessions.pop(session.session_id)
                self._detached.append(session)
            else:
                self._end(session, Command.DETACH)
                self._events.append(
                    SessionFailed(
                        session.session_id,
                        ErrorCode.CONNECTION_LOST,
                        "connection ended before the session was established",
                        False,
                        handle=session.handle,
                    )
                )

    # ------------------------------------------------------------ frames in

    def _handle_frame(self, frame: Frame) -> None:
        session = self._sessions.get(frame.session_id)
        if session is None:
            if frame.session_id > self._last_session_id:
                self._fail_connection(
                    ErrorCode.BAD_SESSION_ID,
                    f"frame for session {frame.session_id} never opened",
                    remote=True,
                )
            # else: a late frame for a session that already ended; ignore it.
            return
        if frame.type is FrameType.ABORT:
            self._on_abort(session, frame)
            return
        target = next_state(Role.CLIENT, session.kind, session.state, frame.type)
        if target is None:
            self._fail(
                session,
                RemoteProtocolError(
                    f"unexpected {frame.type.name} in state {session.state.name}", ErrorCode.UNEXPECTED_FRAME
                ),
                remote=True,
            )
            return
        try:
            self._apply(session, frame, target)
        except ProtocolError as exc:
            self._fail(session, exc, remote=exc.code is not ErrorCode.AUTHENTICATION_FAILED)

    def _on_abort(self, session: _ClientSession, frame: Frame) -> None:
        try:
            abort = Abort.decode(frame.payload)
        except RemoteProtocolError as exc:
            self._fail(session, exc, remote=True, notify=False)
            return
        if abort.code is ErrorCode.RATE_LIMITED:
            target = next_state(Role.CLIENT, session.kind, session.state, Command.DEFER)
            if target is State.DETACHED:
                # Refused before the server looked at it: still resumable, later (NET-13).
                transition(Role.CLIENT, session, Command.DEFER)
                self._sessions.pop(session.session_id)
                self._detached.append(session)
                self._events.append(
                    ResumeDeferred(session.session_id, abort.reason or abort.code.name, handle=session.handle)
                )
                return
        self._end(session, FrameType.ABORT)
        self._events.append(
            SessionFailed(
                session.session_id, abort.code, abort.reason or abort.code.name, True, handle=session.handle
            )
        )

    def _open_sealed(self, session: _ClientSession, frame: Frame) -> bytes:
        assert session.channel is not None
        return session.channel.open_payload(frame.type, frame.payload)

    def _apply(self, session: _ClientSession, frame: Frame, target: State) -> None:
        """Perform the transition to ``target``: compute first, then commit."""
        t = frame.type
        if t is FrameType.RESPONSE:  # the common case first
            request_id, body = Response.decode_fields(self._open_sealed(session, frame))
            if request_id not in session.unanswered:
                raise RemoteProtocolError(
                    "response to a request that is not in flight", ErrorCode.INVALID_REQUEST
                )
            del session.unanswered[request_id]
            self._events.append(ResponseReceived(session.session_id, request_id, body, handle=session.handle))
            return  # ESTABLISHED stays ESTABLISHED (the table's row)
        if t is FrameType.REG_RESPONSE:
            self._on_reg_response(session, RegResponse.decode(frame.payload))
        elif t is FrameType.LOGIN_RESPONSE:
            self._on_login_response(session, LoginResponse.decode(frame.payload))
        elif t is FrameType.WELCOME:
            welcome = Welcome.decode(self._open_sealed(session, frame))
            self._on_welcome(session, welcome)
        elif t is FrameType.CLOSE:
            close = Close.decode(self._open_sealed(session, frame))
            self._on_close(session, close)
            return
        elif t is FrameType.RESUMED:
            self._on_resumed(session, ResumedEnvelope.decode(frame.payload), target)
            return
        else:  # pragma: no cover - the table admits no other frame types for the client
            raise RemoteProtocolError(f"unexpected {t.name}", ErrorCode.UNEXPECTED_FRAME)
        transition(Role.CLIENT, session, frame.type)

    def _on_reg_response(self, session: _ClientSession, message: RegResponse) -> None:
        assert session.password is not None and session.opaque_state is not None
        step = OpaqueStepRequired(
            session.session_id,
            OpaqueStep.REGISTRATION_FINISH,
            session.password,
            session.opaque_state,
            message.registration_response,
        )
        session.opaque_state = None  # the password stays: the login start needs it
        self._events.append(step)

    def _on_login_response(self, session: _ClientSession, message: LoginResponse) -> None:
        assert session.password is not None and session.opaque_state is not None
        step = OpaqueStepRequired(
            session.session_id,
            OpaqueStep.LOGIN_FINISH,
            session.password,
            session.opaque_state,
            message.credential_response,
        )
        session.password = None  # the step is the last to need it
        session.opaque_state = None
        session.password_check = PasswordCheck.from_login(message.credential_response)
        self._events.append(step)

    def _after_registration_step(self, session: _ClientSession, upload: RegUpload, export_key: bytes) -> None:
        """Send the upload and start the login that proves it (compute first, then commit)."""
        assert session.password is not None
        login = self._opaque.client_login_start(session.password)
        login_start = LoginStart(session.account_name, login.message)
        session.registration_export_key = export_key
        session.opaque_state = login.state
        self._send(FrameType.REG_UPLOAD, session.session_id, upload.encode())
        self._send(FrameType.LOGIN_START, session.session_id, login_start.encode())

    def _after_login_step(
        self, session: _ClientSession, finish: LoginFinish, result: OpaqueStepResult
    ) -> None:
        """Check the export key against registration's, then set up the channel."""
        if session.registration_export_key is not None and not hmac.compare_digest(
            session.registration_export_key, result.export_key
        ):
            raise RemoteProtocolError(
                "export key from login differs from registration", ErrorCode.AUTHENTICATION_FAILED
            )
        session.channel = Channel(result.session_key, is_client=True)
        session.export_key = result.export_key
        session.registration_export_key = None
        self._send(FrameType.LOGIN_FINISH, session.session_id, finish.encode())

    def _on_welcome(self, session: _ClientSession, welcome: Welcome) -> None:
        session.user_id = welcome.user_id
        assert session.export_key is not None
        if session.kind is SessionKind.REQUEST:
            self._events.append(
                SessionEstablished(
                    session.session_id,
                    welcome.user_id,
                    session.export_key,
                    handle=session.handle,
                    password_check=session.password_check,
                )
            )
            return
        # REG-3: master_key and storage_key live only inside this call.
        master_key = derive_master_key(session.export_key)
        storage_key = self._random(32)
        encrypted = encrypt_storage_key(master_key, storage_key, welcome.user_id, self._random)
        message = CompleteRegistration(welcome.user_id, encrypted)
        self._send_sealed(session, FrameType.COMPLETE_REGISTRATION, message.encode())

    def _on_resumed(self, session: _ClientSession, envelope: ResumedEnvelope, target: State) -> None:
        """Move to the key epoch both nonces define; RESUMED must open there at sequence 0."""
        assert session.channel is not None and session.resume_nonce is not None
        channel = session.channel.next_epoch(session.resume_nonce, envelope.server_nonce)
        Resumed.decode(channel.open(FrameType.RESUMED, envelope.record))
        session.channel = channel
        session.resume_nonce = None
        transition(Role.CLIENT, session, FrameType.RESUMED)
        if target is State.CLOSED:  # logout asked during the resumption
            self._send_sealed(session, FrameType.CLOSE, Close(ErrorCode.CLIENT_CLOSED).encode())
            self._end(session, Command.ABORT)
            return
        assert session.user_id is not None
        self._events.append(SessionResumed(session.session_id, session.user_id, handle=session.handle))
        for request_id, body in session.unanswered.items():
            self._send_sealed(session, FrameType.REQUEST, Request(request_id, body).encode())

    def _on_close(self, session: _ClientSession, close: Close) -> None:
        self._end(session, FrameType.CLOSE)
        if session.kind is SessionKind.REGISTRATION and close.code is ErrorCode.OK:
            assert session.user_id is not None and session.export_key is not None
            self._events.append(
                RegistrationSucceeded(
                    session.session_id, session.user_id, session.export_key, handle=session.handle
                )
            )
        elif session.kind is SessionKind.REGISTRATION:
            self._events.append(
                SessionFailed(session.session_id, close.code, close.code.name, True, handle=session.handle)
            )
        else:
            self._events.append(SessionClosed(session.session_id, close.code, handle=session.handle))
