"""The high-level client: one method per operation, for asyncio and trio (via anyio).

::

    async with KeymgmtClient(stream, local_store=LocalStore("keys.db")) as client:
        await client.register(b"alice@example.org", password)
        session = await client.login(b"alice@example.org", password)
        key_id = await session.generate()
        secret = await session.retrieve(key_id, Context.LOCAL_ONLY)
        await session.logout()

``stream`` is any anyio byte stream (TLS in production, in-memory in tests).
The client keeps ``export_key`` and ``storage_key`` in memory only; secrets are
returned as ``bytes`` and never appear in a repr. Errors are subclasses of
:class:`KeymgmtError` with one clear line of text.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import json
import os
import random as _random
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import TypeVar

import anyio
from anyio.abc import ByteStream, TaskGroup

from keymgmt_proto import (
    KEY_ID_SIZE,
    NEED_DATA,
    AuditEntry,
    AuditHead,
    AuditType,
    ClientConnection,
    ConnectionFailed,
    Context,
    DetachedSession,
    ErrorCode,
    Event,
    IntegrityFailure,
    LabeledKey,
    LabelError,
    LocalProtocolError,
    Op,
    OpaqueStepRequired,
    OperationRefused,
    OpRequest,
    OpResponse,
    PasswordCheck,
    Plan,
    RandomSource,
    RegistrationSucceeded,
    ResponseReceived,
    ResumeDeferred,
    SealedCopy,
    SecretOps,
    SessionClosed,
    SessionEstablished,
    SessionFailed,
    SessionHandle,
    SessionResumed,
    State,
    Status,
    VerifiedAudit,
)

from .localstore import LocalStore

__all__ = [
    "CLIENT_METHODS",
    "DEFAULT_RECONNECT_BUDGET",
    "MAX_PASSWORD_SIZE",
    "NOT_RECENT_LOGIN",
    "NO_ACCOUNT",
    "SESSION_REVOKED",
    "AuthenticationError",
    "ClientClosedError",
    "ConnectionLostError",
    "Connector",
    "IntegrityError",
    "KeySession",
    "KeymgmtClient",
    "KeymgmtError",
    "LabelConflictError",
    "NotFoundError",
    "RateLimitedError",
    "RegistrationError",
    "RequestRefusedError",
    "SessionEndedError",
    "ThrottledError",
    "UserRateLimitedError",
    "audit_to_json",
    "reconnect_delays",
]

_T = TypeVar("_T")
_R = TypeVar("_R")
#: The whole answer to a request the key server refused for its user's rate.
_RATE_LIMITED = bytes([Status.RATE_LIMITED])
#: Seconds before sending such a request again the first time, and at most.
_FIRST_RATE_DELAY = 0.05
_LAST_RATE_DELAY = 1.0


class KeymgmtError(Exception):
    """Base of every error the high-level client raises."""


class AuthenticationError(KeymgmtError):
    """Wrong password or unknown account (deliberately indistinguishable, NET-9)."""


class ThrottledError(KeymgmtError):
    """Too many login attempts for this account (failed, or started and not yet finished):
    the server refuses logins for a while (NET-10). ``retry_after`` is the wait in seconds the
    key server named, None when it named none (too many logins at once)."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitedError(ThrottledError):
    """Too many registration, login or resumption attempts from this client's address:
    the server refuses new ones for a moment (NET-13); or an operation the key server kept
    refusing because the account's requests went faster than its per-user rate (the client
    sends it again for ``KeymgmtClient.rate_limit_wait`` seconds first): then the subclass
    :class:`UserRateLimitedError`."""


class UserRateLimitedError(RateLimitedError):
    """An operation the key server kept answering RATE_LIMITED for ``rate_limit_wait``
    seconds: the account's requests, from all its sessions, went faster than the server's
    per-user rate (not this address's logins)."""


class _CodedError(KeymgmtError):
    """An error that carries the protocol's ``ErrorCode``."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


class RegistrationError(_CodedError):
    """Registration refused (name taken or not allowed); ``code`` says which."""


class SessionEndedError(_CodedError):
    """The session is over (logout, idle timeout, lifetime, request limit); log in again."""


class ConnectionLostError(KeymgmtError):
    """The connection to the key server failed."""


class ClientClosedError(ConnectionLostError):
    """The client is closed for good: it could not reconnect within its reconnect budget,
    lost a connection it cannot reopen (built on a bare stream), or its ``async with``
    block is over. Every later call raises it; open a new client."""


class NotFoundError(KeymgmtError):
    """No such key for this user."""


class RequestRefusedError(KeymgmtError):
    """The server refused the request; ``status`` says why."""

    def __init__(self, message: str, status: Status) -> None:
        super().__init__(message)
        self.status = status


class IntegrityError(KeymgmtError):
    """Data from the server failed verification (tampered or swapped ciphertext, wrong AD,
    an audit log that does not extend the one verified before)."""


class LabelConflictError(KeymgmtError):
    """Named keys: a label names several keys, or is already another key's (nothing sent)."""


class _Waiter:
    """One pending answer: an event and its outcome."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.value: Event | None = None
        self.error: KeymgmtError | None = None

    def resolve(self, value: Event) -> None:
        if not self.done.is_set():
            self.value = value
            self.done.set()

    def fail(self, error: KeymgmtError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    async def wait(self) -> Event:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


_RETRY_IN = re.compile(r"retry in ([0-9]{1,9}) s$")
#: Why a session ended with CLOSE(NOT_AUTHORIZED) (docs/protocol.md, section 12.13): the key
#: server cannot say which of the two, and either way a fresh login is the way on.
SESSION_REVOKED = (
    "session ended: the account's password was changed after this session logged in, "
    "or the account was deleted; log in again"
)


def _session_error(event: SessionFailed | SessionClosed) -> KeymgmtError:
    if isinstance(event, SessionClosed) and event.code is ErrorCode.NOT_AUTHORIZED:
        return SessionEndedError(SESSION_REVOKED, event.code)
    if isinstance(event, SessionClosed):
        return SessionEndedError(f"session ended: {event.code.name.lower().replace('_', ' ')}", event.code)
    if event.code is ErrorCode.AUTHENTICATION_FAILED:
        return AuthenticationError("login failed: wrong password or unknown account")
    if event.code is ErrorCode.THROTTLED:
        # the key server's reason ends in "retry in N s" while the name is locked (protocol.md 7.1)
        wait = _RETRY_IN.search(event.reason)
        if wait is not None:
            seconds = int(wait.group(1))
            return ThrottledError(
                f"too many failed logins for this account; try again in {seconds} s", seconds
            )
        return ThrottledError("too many login attempts for this account; try again in a moment")
    if event.code is ErrorCode.RATE_LIMITED:
        return RateLimitedError("too many attempts from this address; try again in a few seconds")
    refusals = {
        ErrorCode.ACCOUNT_EXISTS: "account name already registered",
        ErrorCode.INVALID_ACCOUNT_NAME: "account name not allowed",
        ErrorCode.NOT_AUTHORIZED: "the key server asks for a valid invitation",
    }
    if event.code in refusals:
        return RegistrationError(f"registration refused: {refusals[event.code]}", event.code)
    return SessionEndedError(f"session failed: {event.code.name.lower().replace('_', ' ')}", event.code)


#: The longest password OPAQUE takes (its OPRF input carries a 2-byte length): a longer one
#: would fail at the registration's or login's last step, after a round trip.
MAX_PASSWORD_SIZE = 65535


def _check_password(password: bytes) -> None:
    if len(password) > MAX_PASSWORD_SIZE:
        raise KeymgmtError(f"a password is at most {MAX_PASSWORD_SIZE} bytes, not {len(password)}")


#: Opens a new byte stream to the key server (used again to reconnect).
Connector = Callable[[], Awaitable[ByteStream]]

#: Seconds a client keeps trying to reconnect before it closes (longer than a restart).
DEFAULT_RECONNECT_BUDGET = 30.0


def reconnect_delays(first: float, cap: float, jitter: Callable[[], float]) -> Iterator[float]:
    """The pauses between reconnection attempts: capped exponential backoff with jitter.

    The n-th base pause is ``min(cap, first * 2**n)``; each pause is that base times a
    factor between 0.5 and 1 drawn from ``jitter()`` (a float in [0, 1)), so clients cut
    off together do not come back in lockstep, and no pause is ever zero."""
    base = first
    while True:
        yield min(cap, base) * (0.5 + 0.5 * jitter())
        base = min(cap, base * 2)


class KeymgmtClient:
    """One connection to a key server, carrying any number of sessions.

    Give it a ``Connector`` (an async callable returning a fresh byte stream, e.g.
    :func:`keymgmt.adapters.net.tls_connector`) and it reconnects when the
    connection drops, resuming every established session without a new login
    (NET-2); requests in flight are answered exactly once. Given a bare stream
    it cannot reconnect.

    Reconnection keeps calling the connector for ``reconnect_budget`` seconds
    (default 30, longer than a server restart), pausing between attempts as
    :func:`reconnect_delays` says (``reconnect_delay`` doubling up to
    ``reconnect_max_delay``, times a jitter factor from ``jitter``);
    ``reconnect_attempts`` optionally caps the attempts too (and the rounds of
    deferred resumptions, default 5). When the budget is spent the client closes:
    pending and later calls raise :class:`ClientClosedError`, and a new client is
    needed.
    """

    def __init__(
        self,
        transport: ByteStream | Connector,
        *,
        local_store: LocalStore | None = None,
        random: RandomSource = os.urandom,
        clock: Callable[[], float] = time.time,
        reconnect_budget: float = DEFAULT_RECONNECT_BUDGET,
        reconnect_delay: float = 0.1,
        reconnect_max_delay: float = 5.0,
        reconnect_attempts: int | None = None,
        jitter: Callable[[], float] = _random.random,
    ) -> None:
        if reconnect_budget < 0 or reconnect_delay <= 0 or reconnect_max_delay < reconnect_delay:
            raise ValueError(
                "reconnect_budget must be >= 0, reconnect_delay > 0 and "
                "reconnect_max_delay >= reconnect_delay"
            )
        if reconnect_attempts is not None and reconnect_attempts < 1:
            raise ValueError("reconnect_attempts must be at least 1 (or None)")
        # A stream is anything with receive/send (duck-typed, as anyio does); else a connector.
        if hasattr(transport, "receive") and hasattr(transport, "send"):
            self._stream: ByteStream | None = transport  # type: ignore[assignment]
            self._connector: Connector | None = None
        else:
            self._stream = None
            self._connector = transport
        self._random = random
        self._clock = clock
        self._conn = ClientConnection(random)
        self.local_store = local_store if local_store is not None else LocalStore(":memory:")
        #: Seconds of reconnection attempts before the client closes (see the class docstring).
        self.reconnect_budget = reconnect_budget
        #: The optional cap on connector calls per reconnection (None: as the budget allows).
        self.reconnect_attempts = reconnect_attempts
        #: A send that takes longer (the server stopped reading) counts as a lost connection.
        self.send_timeout = 30.0
        #: Seconds an operation keeps sending a request again while the key server answers it
        #: RATE_LIMITED (the user's requests passed its per-user rate; nothing was done), after
        #: waits doubling from 50 ms to 1 s; then RateLimitedError.
        self.rate_limit_wait = 30.0
        self.reconnect_delay = reconnect_delay
        self.reconnect_max_delay = reconnect_max_delay
        self._jitter = jitter
        #: Bumped on every (re)connection; tells you how often the link was replaced.
        self.connection_count = 0
        self._send_lock = anyio.Lock()
        self._flush_scheduled = False
        # account name -> (lock, logins holding or waiting for it); see _login_turn
        self._login_turns: dict[bytes, tuple[anyio.Lock, int]] = {}
        self._connected = anyio.Event()
        #: Set when a call needs a connection while there is none (see _supervise).
        self._wanted = anyio.Event()
        # Sessions are known by the core's handle, which survives resumption; commands
        # take the session's id on the current connection.
        self._sid_of: dict[SessionHandle, int] = {}
        self._session_waiters: dict[SessionHandle, _Waiter] = {}
        #: Sessions being opened -> whether the server has answered yet (see _open_retrying).
        self._answered: dict[SessionHandle, bool] = {}
        self._request_waiters: dict[tuple[SessionHandle, int], _Waiter] = {}
        #: Why recent sessions ended, so later calls on them say so (bounded).
        self._ended: dict[SessionHandle, KeymgmtError] = {}
        #: The KeySession of each live session, told when it ends (it drops its storage key
        #: and answers nothing more, not even from the local store).
        self._key_sessions: weakref.WeakValueDictionary[SessionHandle, KeySession] = (
            weakref.WeakValueDictionary()
        )
        self._detached: list[DetachedSession] = []
        #: Sessions whose RESUME the server deferred (RATE_LIMITED): handle -> set when it is
        #: resumed again or has failed. Calls on them wait for it.
        self._deferred: dict[SessionHandle, anyio.Event] = {}
        self._deferred_rounds = 0
        #: OPAQUE steps the core asked for, not yet run (see _run_opaque_steps).
        self._steps: collections.deque[tuple[ClientConnection, OpaqueStepRequired]] = collections.deque()
        self._task_group: TaskGroup | None = None
        self._closed: KeymgmtError | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"<KeymgmtClient {len(self._sid_of)} sessions>"

    async def __aenter__(self) -> KeymgmtClient:
        if self._stream is None:
            assert self._connector is not None
            self._stream = await self._connector()
        self.connection_count = 1
        self._connected.set()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._supervise)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task_group is not None
        self._closing = True  # from here on, a dropped connection is not reconnected
        self._task_group.cancel_scope.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await self._say_goodbye()
        if self._closed is None:
            self._close(ClientClosedError("client closed: its `async with` block is over; open a new client"))
        try:
            # The block's own exception is not the reader's business: let it propagate
            # unwrapped instead of inside an ExceptionGroup.
            await self._task_group.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                if self._stream is not None:
                    await self._stream.aclose()

    async def _say_goodbye(self) -> None:
        """Log out of every open session and close the connection with GOAWAY (best effort)."""
        if self._closed is not None or self._conn.failed is not None or self._stream is None:
            return
        for session_id in list(self._sid_of.values()):
            try:
                self._conn.close_session(session_id)
            except LocalProtocolError:
                continue  # still in its handshake: it ends with the connection
        self._conn.close("client closing")
        async with self._send_lock:  # never interleave with a send still in progress
            data = self._conn.data_to_send()
            if data:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    await self._stream.send(data)

    # ------------------------------------------------------------ public API

    async def register(self, account_name: bytes, password: bytes, *, invitation: bytes = b"") -> bytes:
        """Register a new account (NET-5, REG-3); returns its ``user_id``. ``invitation`` is
        the token a key server that authorizes registrations asks for (REG-5). Retried once
        on a new connection if the first was lost before the server answered (see
        :meth:`_open_retrying`)."""
        _check_password(password)
        _, event = await self._open_retrying(
            lambda: self._conn.open_registration(account_name, password, invitation)
        )
        assert isinstance(event, RegistrationSucceeded)
        return event.user_id

    async def login(self, account_name: bytes, password: bytes) -> KeySession:
        """Open a request session (NET-6). Logins of one account on this client take
        turns (logins of different accounts run in parallel): the key server counts every
        login as a failed attempt until it succeeds (NET-10), so a burst of parallel
        logins of one account would trip its throttle."""
        _check_password(password)
        async with self._login_turn(account_name):
            handle, event = await self._open_retrying(
                lambda: self._conn.open_request_session(account_name, password)
            )
        assert isinstance(event, SessionEstablished)
        check = event.password_check
        session = KeySession(self, handle, event.user_id, event.export_key, password_check=check)
        if handle in self._ended:  # ended before this call saw it established
            session._end(self._ended[handle])
        else:
            self._key_sessions[handle] = session
        return session

    async def change_password(
        self, account_name: bytes, current_password: bytes, new_password: bytes
    ) -> None:
        """Change the account's password. The current password is proved afresh by a login
        (a wrong one raises :class:`AuthenticationError` and changes nothing); the change
        runs in that session, which is then logged out. Every other session of the account
        ends; stored secrets, the local store, the audit log and the throttling state carry
        over (the storage key is re-wrapped, not replaced). A new password equal to the current
        one, or an empty one, is refused before anything is sent."""
        if not new_password:
            raise KeymgmtError("invalid argument: the new password must not be empty")
        if hmac.compare_digest(new_password, current_password):  # before anything is sent
            raise KeymgmtError("invalid argument: the new password is the current one")
        session = await self.login(account_name, current_password)
        try:
            await session.change_password(new_password)
        finally:
            with contextlib.suppress(KeymgmtError):
                await session.logout()

    async def delete_account(self, account_name: bytes, password: bytes) -> None:
        """Delete the account: its record, every secret, its audit log and its throttling
        state, on the server in one transaction; every session of the account ends, and this
        client's local store drops the account's copies. The password is proved afresh by a
        login (a wrong one raises :class:`AuthenticationError` and deletes nothing). The
        server keeps the name reserved for a while (docs/operations.md)."""
        session = await self.login(account_name, password)
        await session.delete_account()

    @contextlib.asynccontextmanager
    async def _login_turn(self, account_name: bytes) -> AsyncIterator[None]:
        lock, users = self._login_turns.get(account_name, (None, 0))
        if lock is None:
            lock = anyio.Lock()
        self._login_turns[account_name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._login_turns[account_name]
            if users == 1:
                del self._login_turns[account_name]
            else:
                self._login_turns[account_name] = (lock, users - 1)

    async def request(self, handle: SessionHandle, body: bytes) -> bytes:
        """Send a request body on a session and wait for its answer."""
        session_id = await self._current_id(handle)
        request_id = self._command(lambda: self._conn.send_request(session_id, body))
        waiter = _Waiter()
        self._request_waiters[(handle, request_id)] = waiter
        await self._flush()
        event = await waiter.wait()
        assert isinstance(event, ResponseReceived)
        return event.body

    async def _request_paced(self, handle: SessionHandle, body: bytes) -> bytes:
        """:meth:`request`, sent again while the key server answers RATE_LIMITED (its per-user
        rate: nothing was done) for up to ``rate_limit_wait`` seconds; then RateLimitedError."""
        answer = await self.request(handle, body)
        if answer != _RATE_LIMITED:
            return answer
        deadline = anyio.current_time() + self.rate_limit_wait
        delay = _FIRST_RATE_DELAY
        while True:
            wait = delay * (0.5 + 0.5 * self._jitter())
            if anyio.current_time() + wait > deadline:
                raise UserRateLimitedError(
                    "the key server refused this account's requests for going faster than its "
                    f"per-user rate, for {self.rate_limit_wait:g} s; try again later"
                )
            await anyio.sleep(wait)
            answer = await self.request(handle, body)
            if answer != _RATE_LIMITED:
                return answer
            delay = min(delay * 2, _LAST_RATE_DELAY)

    async def close_session(self, handle: SessionHandle) -> None:
        """Log out of a session."""
        session_id = await self._current_id(handle)
        self._command(lambda: self._conn.close_session(session_id))
        self._fail_session(handle, SessionEndedError("logged out", ErrorCode.CLIENT_CLOSED))
        await self._flush()

    # ------------------------------------------------------------ internals

    def _check_open(self) -> None:
        """Raise the client's closing error (a fresh instance each time) once it is closed."""
        if self._closed is not None:
            raise ClientClosedError(str(self._closed))

    async def _ready(self) -> None:
        """Wait while a reconnection is under way (asking for one if the connection was
        closed while idle); raise if the client is closed.

        Returns only with a live connection and without yielding after checking it: a
        connection may fail while a caller waits (its event was set, then replaced), so
        the check is repeated after every wait, and the caller's next step (a command on
        the core) runs before any other task."""
        while True:
            self._check_open()
            connected = self._connected
            if connected.is_set() and self._conn.failed is None:
                return
            if not connected.is_set():
                self._wanted.set()
                await connected.wait()
            else:  # failed, its ConnectionFailed not yet dispatched: let the reader run
                await anyio.sleep(0.001)

    async def _open_retrying(self, action: Callable[[], int]) -> tuple[SessionHandle, Event]:
        """Open a session (login or registration) and wait for its outcome; if the connection
        is lost before the server answered its first frame, open it once more on a new
        connection. That happens when the server closed an idle connection (its GOAWAY
        waiting unread while the event loop was blocked, e.g. by a password prompt). Once
        the server has answered, a lost connection is the caller's error: a registration
        may have been stored, and sending it again could not tell."""
        for attempt in (1, 2):
            await self._ready()
            handle = self._open(action)
            self._answered[handle] = False
            try:
                return handle, await self._await_session(handle)
            except ConnectionLostError as exc:
                answered = self._answered.get(handle, False)
                if attempt == 2 or answered or isinstance(exc, ClientClosedError) or self._connector is None:
                    raise
            finally:
                self._answered.pop(handle, None)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _current_id(self, handle: SessionHandle) -> int:
        """The session's id on the current connection, once it is usable (connected, not
        waiting for a deferred resumption); the reason it ended if it has."""
        await self._ready()
        await self._resumed(handle)
        if handle in self._ended:
            raise self._ended[handle]
        session_id = self._sid_of.get(handle)
        if session_id is None:
            raise KeymgmtError("no such session")
        return session_id

    async def _resumed(self, handle: SessionHandle) -> None:
        """Wait while the session's resumption is deferred (see _resume_deferred)."""
        while (event := self._deferred.get(handle)) is not None:
            await event.wait()
            await self._ready()

    def _command(self, action: Callable[[], _T]) -> _T:
        self._check_open()
        try:
            return action()
        except LocalProtocolError as exc:
            raise KeymgmtError(str(exc)) from None

    def _open(self, action: Callable[[], int]) -> SessionHandle:
        session_id = self._command(action)
        handle = self._conn.session_handle(session_id)
        self._sid_of[handle] = session_id
        self._session_waiters[handle] = _Waiter()
        return handle

    async def _await_session(self, handle: SessionHandle) -> Event:
        waiter = self._session_waiters[handle]
        try:
            await self._flush()
            return await waiter.wait()
        except BaseException:
            # Cancelled (a caller's timeout) or failed while the handshake runs: abort it
            # before the caller goes on, so no session is left that nobody holds, and the
            # next login of this account starts only after the server has heard of it.
            with anyio.CancelScope(shield=True):
                await self._abort_handshake(handle)
            raise

    async def _abort_handshake(self, handle: SessionHandle) -> None:
        session_id = self._sid_of.get(handle)
        if session_id is None:  # it has ended already (that is what raised)
            return
        with contextlib.suppress(LocalProtocolError):
            self._conn.abort_session(session_id, "abandoned by the client")
        self._fail_session(handle, KeymgmtError("abandoned while opening"))
        await self._flush()

    async def _flush(self) -> None:
        """Send what the core has queued, once per event-loop turn: the first caller waits
        one turn before it sends, so the requests other tasks make in that turn leave in
        the same write (and reach the server's same batch); they need not flush again.
        Shielded, so a cancelled caller cannot leave the others' requests unsent."""
        if self._flush_scheduled:
            return
        self._flush_scheduled = True
        with anyio.CancelScope(shield=True):
            try:
                await anyio.lowlevel.checkpoint()
            finally:
                self._flush_scheduled = False
            async with self._send_lock:
                await self._send_pending()

    async def _send_pending(self) -> None:
        """Send what the core has queued (the caller holds ``_send_lock``)."""
        data = self._conn.data_to_send()
        if data and self._stream is not None:
            try:
                # Shielded: once taken from the core, these bytes must reach the stream
                # whole, or later records would be out of sequence (and a half-written
                # TLS record would break the connection).
                with anyio.CancelScope(shield=True), anyio.fail_after(self.send_timeout):
                    await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, TimeoutError):
                self._conn.connection_lost()
                self._dispatch_all()

    def _fail_session(self, handle: SessionHandle, error: KeymgmtError) -> None:
        self._ended[handle] = error
        key_session = self._key_sessions.pop(handle, None)
        if key_session is not None:
            key_session._end(error)
        while len(self._ended) > 1024:
            del self._ended[next(iter(self._ended))]
        self._sid_of.pop(handle, None)
        waiter = self._session_waiters.pop(handle, None)
        if waiter is not None:
            waiter.fail(error)
        for key in [k for k in self._request_waiters if k[0] is handle]:
            self._request_waiters.pop(key).fail(error)

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, ConnectionFailed):
            self._on_connection_failed(event)
            return
        handle = getattr(event, "handle", None)
        if handle is None or handle not in self._sid_of:
            return  # not one of this client's live sessions
        if isinstance(event, ResponseReceived):
            waiter = self._request_waiters.pop((handle, event.request_id), None)
            if waiter is not None:
                waiter.resolve(event)
        elif isinstance(event, SessionEstablished):
            waiter = self._session_waiters.pop(handle, None)
            if waiter is not None:
                waiter.resolve(event)
        elif isinstance(event, RegistrationSucceeded):
            waiter = self._session_waiters.pop(handle, None)
            self._sid_of.pop(handle, None)
            if waiter is not None:
                waiter.resolve(event)
        elif isinstance(event, ResumeDeferred):
            if not self._deferred:
                assert self._task_group is not None
                self._task_group.start_soon(self._resume_deferred, self._conn)
            self._deferred.setdefault(handle, anyio.Event())
        elif isinstance(event, SessionResumed):
            self._deferred_rounds = 0
        elif isinstance(event, SessionFailed | SessionClosed):
            if isinstance(event, SessionFailed) and event.code is ErrorCode.UNKNOWN_SESSION:
                error: KeymgmtError = SessionEndedError(
                    "the session could not be resumed (ended or expired); log in again",
                    ErrorCode.UNKNOWN_SESSION,
                )
            else:
                error = _session_error(event)
            self._fail_session(handle, error)

    def _on_connection_failed(self, event: ConnectionFailed) -> None:
        self._connected = anyio.Event()  # callers wait for the reconnection
        self._wanted = anyio.Event()
        lost = (
            ConnectionLostError(f"connection to the key server lost: {event.reason}")
            if self._connector is not None
            else ClientClosedError(
                f"client closed: connection to the key server lost ({event.reason}) and the "
                "client has no connector to reopen it; open a new client"
            )
        )
        self._detached = self._conn.take_detached_sessions()
        if event.code is ErrorCode.FRAME_TOO_LARGE:
            # A request (or its answer) over a frame limit: a resumption would send it again
            # and meet the same refusal, forever. The sessions awaiting answers end here; the
            # others resume as after any lost connection (OPS-12).
            too_large = SessionEndedError(
                "a request or its answer was larger than the frame limit (FRAME_TOO_LARGE); "
                "the session ended and its requests were not sent again",
                ErrorCode.FRAME_TOO_LARGE,
            )
            for session in [d for d in self._detached if d.unanswered_requests]:
                self._detached.remove(session)
                self._fail_session(session.handle, too_large)
        detached = {d.handle for d in self._detached}
        for handle in list(self._sid_of):
            if handle not in detached or self._connector is None:
                self._fail_session(handle, lost)
        if self._connector is None:
            self._close(lost)

    async def _resume_deferred(self, conn: ClientConnection) -> None:
        """The server refused some RESUMEs unseen (too many session-opening frames from this
        address, NET-13): the sessions are intact. Resume them again on the same connection
        after a backoff that doubles each round; after ``reconnect_attempts`` rounds in a
        row, give up on them (RateLimitedError)."""
        await anyio.sleep(min(5.0, self.reconnect_delay * 2**self._deferred_rounds))
        deferred, self._deferred = self._deferred, {}
        try:
            if conn is not self._conn or conn.failed is not None:
                return  # the reconnection took them (they were detached with the rest)
            self._deferred_rounds += 1
            give_up = self._deferred_rounds > (self.reconnect_attempts or 5)
            for session in conn.take_detached_sessions():
                handle = session.handle
                if handle not in self._sid_of:
                    continue
                if give_up:
                    self._fail_session(
                        handle,
                        RateLimitedError(
                            "the key server kept deferring the session's resumption (too many "
                            "attempts from this address); log in again"
                        ),
                    )
                    continue
                self._sid_of[handle] = conn.resume_session(session)
            if give_up:
                self._deferred_rounds = 0
        finally:
            for event in deferred.values():
                event.set()
        await self._flush()

    def _close(self, error: KeymgmtError) -> None:
        self._closed = error
        for handle in list(self._sid_of):
            self._fail_session(handle, error)
        for waiter in self._request_waiters.values():
            waiter.fail(error)
        self._request_waiters.clear()
        self._connected.set()  # wake waiters so they see the error

    def _dispatch_all(self) -> None:
        while (event := self._conn.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            if isinstance(event, OpaqueStepRequired):
                # A step follows the server's first answer (REG_RESPONSE, LOGIN_RESPONSE).
                for handle in self._answered:
                    if self._sid_of.get(handle) == event.session_id:
                        self._answered[handle] = True
                self._steps.append((self._conn, event))
            else:
                self._dispatch(event)

    async def _read(self) -> None:
        """Feed the connection until it fails; run the OPAQUE steps it asks for in between."""
        assert self._stream is not None
        while self._conn.failed is None:
            try:
                data = await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                data = b""
            self._conn.receive_data(data)
            self._dispatch_all()
            await self._run_opaque_steps()
            await self._flush()
            if not data:
                return

    async def _run_opaque_steps(self) -> None:
        """Run the OPAQUE steps the core asked for, one per event-loop turn.

        Each is an Argon2 run (15-25 ms) that holds the GIL all along: a worker thread
        would not free the event loop (it waits for the GIL just the same), and twenty
        of them would contend with it for the GIL. So the steps run here, inline, and
        the reader sleeps briefly after each, letting timers and other tasks in (a zero
        sleep would requeue this task ahead of timers that fell due meanwhile), then
        yields once more, so that every task ready when it wakes runs before the next step. The
        result goes to the connection that asked; one that failed meanwhile drops it.

        What the steps queue (LOGIN_FINISH, REG_UPLOAD) leaves in one write once the
        queue is empty: the send lock is held meanwhile, so no other task's flush sends
        the results one by one. The server then takes the logins of a burst in one read
        and one group commit, instead of one commit and fsync per login (bench P5);
        other sessions' requests wait for the burst, as they did when it ran in one go."""
        if not self._steps:
            return
        async with self._send_lock:
            while self._steps:
                conn, step = self._steps.popleft()
                if conn.session_state(step.session_id) is State.CLOSED:
                    continue  # abandoned, or its connection failed, meanwhile: spare the Argon2 run
                result = step.run(conn.opaque)
                del step  # it holds the password
                conn.complete_opaque_step(result)
                if conn is self._conn:
                    self._dispatch_all()
                await anyio.sleep(0.0005)
                # Then to the back of the queue once more: woken in the same batch as other
                # ready tasks, this one may run first (trio picks the order at random), and
                # the next Argon2 would then start before they ran at all.
                await anyio.lowlevel.checkpoint()
            await self._send_pending()

    async def _supervise(self) -> None:
        while True:
            await self._read()
            if self._closed is not None or self._connector is None or self._closing:
                return
            if not self._detached:
                # Nothing to resume (the server closes connections that carry no session,
                # NET-13): reconnect when a call needs the connection, not before.
                await self._wanted.wait()
            if not await self._reconnect():
                return

    async def _reconnect(self) -> bool:
        """Open a new connection and resume every detached session on it; close the client
        when the reconnect budget is spent."""
        assert self._connector is not None
        detached, self._detached = self._detached, []
        old_stream, self._stream = self._stream, None
        if old_stream is not None:
            with anyio.CancelScope(shield=True):
                await old_stream.aclose()
        deadline = anyio.current_time() + self.reconnect_budget
        delays = reconnect_delays(self.reconnect_delay, self.reconnect_max_delay, self._jitter)
        attempts = 0
        while True:
            attempts += 1
            try:
                self._stream = await self._connector()
                break
            except KeymgmtError as exc:
                last_error: KeymgmtError = exc
            remaining = deadline - anyio.current_time()
            if remaining <= 0 or (
                self.reconnect_attempts is not None and attempts >= self.reconnect_attempts
            ):
                spent = f"within {self.reconnect_budget:g} s" if remaining <= 0 else f"in {attempts} attempts"
                self._close(
                    ClientClosedError(
                        f"client closed: could not reconnect to the key server {spent} "
                        f"(last error: {last_error}); open a new client"
                    )
                )
                return False
            await anyio.sleep(min(next(delays), remaining))
        self._conn = ClientConnection(self._random)
        self.connection_count += 1
        for session in detached:
            if session.handle in self._sid_of:  # not ended meanwhile
                self._sid_of[session.handle] = self._conn.resume_session(session)
        self._connected.set()
        await self._flush()
        return True


class KeySession:
    """An authenticated request session: the operations on secrets (OPS-1..OPS-8).

    The checks the protocol asks of the client (docs/protocol.md section 12.10) are the
    core's :class:`~keymgmt_proto.SecretOps`; this class carries its requests and answers
    and keeps the local store."""

    def __init__(
        self,
        client: KeymgmtClient,
        session_id: SessionHandle,
        user_id: bytes,
        export_key: bytes,
        *,
        password_check: PasswordCheck | None = None,
    ) -> None:
        self._client = client
        #: This session's handle in the client (the core's, stable across reconnections):
        #: what :meth:`KeymgmtClient.request` and :meth:`KeymgmtClient.close_session` take.
        self.session_id = session_id
        self.user_id = user_id
        self._ops = SecretOps(user_id, export_key, client._random, password_check=password_check)
        #: Why the session ended (the client tells it): every later call raises it.
        self._ended: KeymgmtError | None = None

    def __repr__(self) -> str:
        return f"<KeySession user_id={self.user_id.hex()}>"

    def _end(self, error: KeymgmtError) -> None:
        """The session ended (logout, expiry, a password change or deletion, a lost
        resumption): drop the storage key now, and refuse every later call with ``error``,
        also one the local store could answer without the server."""
        self._ended = error
        self._ops.forget()

    async def _run(self, plan: Plan[_R]) -> _R:
        """Send the plan's requests one by one and hand it the answers; its result."""
        if self._ended is not None:
            plan.close()
            raise self._ended
        try:
            request = next(plan)
            while True:
                body = await self._client._request_paced(self.session_id, request.encode())
                try:
                    answer = self._ops.answer(request, body)
                except OperationRefused as refused:
                    request = plan.throw(refused)  # the plan may recover (a lost key-id reservation)
                else:
                    request = plan.send(answer)
        except StopIteration as done:
            result: _R = done.value
            return result
        except OperationRefused as refused:
            if refused.status is Status.NOT_FOUND:
                raise NotFoundError("no such key" if request.op in _ABOUT_A_KEY else NO_ACCOUNT) from None
            raise RequestRefusedError(_refusal(request.op, refused), refused.status) from None
        except IntegrityFailure as exc:
            raise IntegrityError(str(exc)) from None
        except LabelError as exc:
            if exc.not_found:
                raise NotFoundError(str(exc)) from None
            raise LabelConflictError(str(exc)) from None
        except ValueError as exc:  # an argument the core refused before sending anything
            raise KeymgmtError(f"invalid argument: {exc}") from None

    async def _call(self, request: OpRequest) -> OpResponse:
        """Send one request as it is and return its decoded answer (tests and harnesses)."""
        return await self._run(_one(request))

    def _keep(self, key_id: bytes, copy: SealedCopy) -> None:
        created = int(self._client._clock() * 1_000_000)
        self._client.local_store.keep(
            self.user_id, key_id, copy.kind, copy.ciphertext, copy.associated_data, created
        )

    def _holds(self, key_id: bytes) -> bool:
        return self._client.local_store.holds(self.user_id, key_id)

    async def _get_storage_key(self) -> bytes:
        """OPS-1: fetch and decrypt ``storage_key`` once per session; kept in memory only."""
        return await self._run(self._ops.storage_key())

    async def generate(self, label: str | None = None) -> bytes:
        """OPS-2: generate a random 32-byte secret, store it encrypted; returns its key id.
        With ``label`` the key is named too (:meth:`rename`; LabelConflictError before
        anything is stored if another key has that label)."""
        key_id, copy = await self._run(self._ops.generate(self._holds, label))
        self._keep(key_id, copy)
        return key_id

    async def import_secret(self, portable: bytes, label: str | None = None) -> bytes:
        """OPS-3/OPS-12: store a secret in the portable form (``len || secret`` up to 255 bytes,
        the long form above); returns the key id. ``label`` as for :meth:`generate`."""
        try:
            plan = self._ops.import_portable(portable, self._holds, label)
        except ValueError as exc:
            raise KeymgmtError(f"cannot import: {exc}") from None
        key_id, copy = await self._run(plan)
        self._keep(key_id, copy)
        return key_id

    async def rename(self, key_id: bytes, label: str | None) -> bool:
        """Named keys: set or change the key's label (None removes it). The label is sealed
        here under the storage key; the server stores only ciphertext. LabelConflictError if
        another key has it, NotFoundError if the key does not exist. Returns whether the key
        had a label before (removing the label of a key that has none sends nothing)."""
        return await self._run(self._ops.rename(key_id, label))

    async def resolve(self, label: str) -> bytes:
        """Named keys: the key id of the one key labelled ``label`` (NotFoundError if none,
        LabelConflictError if several)."""
        return await self._run(self._ops.resolve(label))

    async def verify_audit(self) -> VerifiedAudit:
        """The audit chain: read the whole log and check it (docs/protocol.md section 12.10),
        also against the newest entry this client verified before (kept in the local store);
        IntegrityError if it does not extend it. Returns the verified entries and the new
        head, which the local store then keeps."""
        stored = self._client.local_store.audit_head(self.user_id)
        head = None if stored is None else AuditHead(*stored)
        verified = await self._run(self._ops.verify_audit(head))
        if verified.head is not None:
            self._client.local_store.put_audit_head(self.user_id, verified.head.position, verified.head.hash)
        return verified

    def audit_head(self) -> AuditHead | None:
        """The newest audit entry this client verified (position and hash), from the local
        store; compare it with another device's to check both see the same history."""
        stored = self._client.local_store.audit_head(self.user_id)
        return None if stored is None else AuditHead(*stored)

    async def retrieve(self, key_id: bytes, context: Context = Context.NULL) -> bytes | None:
        """OPS-4. NULL: None on success; LOCAL_ONLY: the secret; EXPORT: the portable form.

        A copy in the local store that verifies is used without asking the server; a key
        the server answers "no such key" for is removed from the local store."""
        local = self._client.local_store.get(self.user_id, key_id) if len(key_id) == KEY_ID_SIZE else None
        copy = None if local is None else SealedCopy(local.kind, local.ciphertext, local.associated_data)
        try:
            secret, to_keep = await self._run(self._ops.retrieve(key_id, context, copy))
        except NotFoundError:
            if local is not None:  # deleted on the server (e.g. from another device): drop the copy
                self._client.local_store.delete(self.user_id, key_id)
            raise
        if to_keep is not None:
            self._keep(key_id, to_keep)
        return secret

    async def export(self, key_id: bytes) -> bytes:
        """OPS-5: the secret in the portable format (``len || secret``, or the long form above
        255 bytes)."""
        result = await self.retrieve(key_id, Context.EXPORT)
        assert result is not None
        return result

    async def list_keys(self) -> list[LabeledKey]:
        """OPS-8: this user's key ids with kind, creation time (microseconds) and label (opened
        here; ``label_tampered`` marks one that failed verification), all pages."""
        return await self._run(self._ops.list_keys())

    async def delete(self, key_id: bytes) -> None:
        """OPS-8: delete a key on the server and locally (the local copy goes either way)."""
        try:
            await self._run(self._ops.delete(key_id))
        finally:
            if len(key_id) == KEY_ID_SIZE:
                self._client.local_store.delete(self.user_id, key_id)

    async def audit(
        self,
        audit_type: AuditType = AuditType.ALL,
        key_ids: Sequence[bytes] = (),
        after: int | None = None,
        before: int | None = None,
    ) -> list[AuditEntry]:
        """OPS-6: matching audit entries (all pages). Times in microseconds since the epoch."""
        return await self._run(self._ops.audit(audit_type, key_ids, after, before))

    async def change_password(self, new_password: bytes) -> None:
        """Change the account's password inside this session: a fresh OPAQUE registration
        (its Argon2 step runs here, as a login's does) and the storage key re-wrapped under
        the new export key, committed by the server in one transaction. This session goes
        on; every other session of the account ends. The key server accepts it only in a
        session that logged in recently (``reauth_window``); :meth:`KeymgmtClient.change_password`
        logs in afresh first."""
        try:
            start = self._ops.change_password_start(new_password, self._client._conn.opaque)
        except ValueError as exc:
            raise KeymgmtError(f"invalid argument: {exc}") from None
        step = await self._run(start)
        result = step.run(self._client._conn.opaque)
        del step  # it holds the new password
        await self._run(self._ops.change_password_finish(result))

    async def delete_account(self) -> None:
        """Delete the account on the server (record, every secret, audit log, throttling
        state) and this client's local copies of its secrets; the session ends with it."""
        await self._run(self._ops.delete_account())
        self._client.local_store.delete_user(self.user_id)
        self._ops.forget()
        self._client._fail_session(
            self.session_id, SessionEndedError("the account was deleted", ErrorCode.NOT_AUTHORIZED)
        )

    async def logout(self) -> None:
        """Close the session on the server (OPS-8)."""
        try:
            await self._client.close_session(self.session_id)
        finally:
            self._ops.forget()


#: The operations on one existing key: their NOT_FOUND means no such key. Any other
#: operation finds nothing only when the session's account is gone (a key server of the
#: release before; this one ends such a session instead: docs/protocol.md, section 12.13).
_ABOUT_A_KEY = frozenset({Op.RETRIEVE, Op.DELETE_KEY, Op.RENAME_KEY})
#: NOT_FOUND to any other operation.
NO_ACCOUNT = "the account does not exist (it was deleted)"
#: The operations the key server accepts only in a session with a recent login.
_NEEDING_A_RECENT_LOGIN = frozenset({Op.CHANGE_PASSWORD_START, Op.CHANGE_PASSWORD_FINISH, Op.DELETE_ACCOUNT})
#: Why the key server refuses them INVALID (docs/protocol.md, section 12.13).
NOT_RECENT_LOGIN = (
    "request refused: a password change or an account deletion needs a recent login (within the "
    "key server's sessions.reauth_window, 5 minutes by default), and this session's login is older; "
    "log in again"
)


def _refusal(op: Op, refused: OperationRefused) -> str:
    """The text of a refusal: what it means for ``op`` where the protocol says so."""
    if refused.status is Status.INVALID and op in _NEEDING_A_RECENT_LOGIN:
        return NOT_RECENT_LOGIN
    return str(refused)


def _one(request: OpRequest) -> Plan[OpResponse]:
    response = yield request
    return response


#: The KeySession method that sends each operation (``keymgmt_proto.OPERATIONS`` declares
#: them). The storage key (OPS-1) is fetched by every public method, through
#: ``_get_storage_key``.
CLIENT_METHODS: Mapping[Op, str] = MappingProxyType(
    {
        Op.RETRIEVE_STORAGE_KEY: "_get_storage_key",
        Op.CREATE_KEY_ID: "generate",
        Op.STORE_SECRET: "generate",
        Op.RETRIEVE: "retrieve",
        Op.AUDIT: "audit",
        Op.LIST_KEYS: "list_keys",
        Op.DELETE_KEY: "delete",
        Op.CHANGE_PASSWORD_START: "change_password",
        Op.CHANGE_PASSWORD_FINISH: "change_password",
        Op.DELETE_ACCOUNT: "delete_account",
        Op.RENAME_KEY: "rename",
    }
)


def audit_to_json(entries: Sequence[AuditEntry], actor: bytes) -> str:
    """AUD-2: audit entries of user ``actor`` as a JSON document (see docs/protocol.md)."""
    if len(actor) != 16:
        raise ValueError("actor is a 16-byte user_id")
    documents = [{**e.to_json(), "actor": actor.hex()} for e in entries]
    return json.dumps({"format": "keymgmt-audit-v3", "entries": documents}, indent=2)
