"""The server side of a connection, and the registry that lets sessions outlive it.

Decisions that need storage are events the application answers with a
command: ``RegistrationRequested`` -> ``accept_registration`` /
``reject_session``; ``RegistrationCompleted`` -> ``confirm_registration``;
``LoginRequested`` -> ``accept_login``; ``RequestReceived`` ->
``send_response``. Time enters as ``now`` (seconds, any monotonic origin);
``get_timer()`` gives the next deadline and ``handle_timer(now)`` acts on it.

Established request sessions live in a :class:`SessionRegistry` shared by all
connections of one server; when a connection dies they stay there, DETACHED,
until resumed on another connection or expired. The registry is plain
in-memory data: all connections sharing it must be driven from one thread.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NamedTuple
from weakref import WeakSet

from ._admission import Admission
from ._connection import ConnectionBase
from ._crypto import MAX_SEQ, Channel, HotChannels, RandomSource
from ._errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    LoginFailed,
    LoginRequested,
    LoginSucceeded,
    RegistrationCompleted,
    RegistrationRequested,
    RequestReceived,
    SessionClosed,
    SessionFailed,
    SessionHandle,
    SessionResumed,
)
from ._messages import (
    REASON_MAX,
    REGISTRATION_UPLOAD_SIZE,
    RESUME_NONCE_SIZE,
    USER_ID_SIZE,
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
    is_printable_reason,
)
from ._opaque import REAL_OPAQUE, OpaqueSuite, ServerSetup
from ._ops import READ_OPS
from ._sessionstate import (
    DetachedSessionStore,
    SessionAppState,
    SessionState,
    seal_session_state,
    unseal_session_state,
)
from ._state import TRANSITIONS, Command, Role, SessionKind, State, Trigger, next_state, transition
from ._wire import DEFAULT_MAX_PAYLOAD, Frame, FrameType

__all__ = [
    "REPLY_CACHE_BYTES",
    "SMALL_PIECE_SIZE",
    "UNPRODUCTIVE_BLOCK_SIZE",
    "ExpiredSession",
    "ServerConfig",
    "ServerConnection",
    "SessionRegistry",
]

#: A frame the server does nothing with costs one unit of its connection's budget for
#: unproductive input, plus one per this many bytes of its payload (protocol.md section 10).
UNPRODUCTIVE_BLOCK_SIZE = 4096
#: A transport piece (a TLS record, a WebSocket frame, ping or pong) carrying fewer bytes
#: than this costs one unit (:meth:`ServerConnection.note_small_input`).
SMALL_PIECE_SIZE = 1024
#: Bytes of answers to reads (``READ_OPS``) a session keeps for re-sends, beside the answers
#: of its other requests (protocol.md section 9): ``ServerConfig.reply_cache_bytes``.
REPLY_CACHE_BYTES = 4096

# Enum members the per-frame and login paths name, read once here: on Python 3.11 every
# attribute read on an Enum class goes through EnumType's __getattr__ hook, a call into
# type.__getattribute__ of about 900 instructions (36 of them per login before this).
_SERVER = Role.SERVER
_REQUEST_SESSION = SessionKind.REQUEST
_REGISTRATION_SESSION = SessionKind.REGISTRATION
_LIVE = (State.ESTABLISHED, State.DETACHED)  # (tuples: `in` compares by identity first)
_ACCEPT_LOGIN = Command.ACCEPT_LOGIN
_IDLE_TIMEOUT = ErrorCode.IDLE_TIMEOUT
_LIFETIME_EXPIRED = ErrorCode.LIFETIME_EXPIRED
_HANDSHAKE_TIMEOUT = ErrorCode.HANDSHAKE_TIMEOUT
_F_ABORT = FrameType.ABORT
_F_REQUEST = FrameType.REQUEST
_F_REG_START = FrameType.REG_START
_F_REG_UPLOAD = FrameType.REG_UPLOAD
_F_LOGIN_START = FrameType.LOGIN_START
_F_LOGIN_RESPONSE = FrameType.LOGIN_RESPONSE
_F_LOGIN_FINISH = FrameType.LOGIN_FINISH
_F_RESUME = FrameType.RESUME
_F_WELCOME = FrameType.WELCOME
_F_RESPONSE = FrameType.RESPONSE
_CLOSED, _ESTABLISHED = State.CLOSED, State.ESTABLISHED
_SEND_RESPONSE = Command.SEND_RESPONSE
_OPENING = (FrameType.REG_START, FrameType.LOGIN_START, FrameType.RESUME)
#: First bytes (the op) of the request bodies that are reads: their answers may be dropped.
_READS = frozenset(bytes((op,)) for op in READ_OPS)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Server policy (NET-8, NET-11). Times are in seconds."""

    #: A registration or login must finish within this time.
    handshake_timeout: float = 30.0
    #: An established session with no traffic for this long ends (NET-8).
    idle_timeout: float = 300.0
    #: An established session ends this long after its login started (NET-8).
    session_lifetime: float = 3600.0
    #: Requests one request session may carry (NET-11); 1 is the spec's strict mode.
    max_requests_per_session: int = 1000
    #: Requests awaiting an answer in one session; also how many answered requests a
    #: session remembers for re-sends (the reply cache).
    max_requests_in_flight: int = 16
    #: Bytes of answers a session keeps for re-sends: the answer of a read (``READ_OPS``)
    #: that would pass this is not kept, and the read runs again if re-sent (protocol.md
    #: section 9). Other answers are always kept (at most 50 bytes each with the key
    #: server's operations).
    reply_cache_bytes: int = REPLY_CACHE_BYTES
    #: Live sessions one connection may carry.
    max_sessions_per_connection: int = 256
    #: Largest frame payload accepted.
    max_payload: int = DEFAULT_MAX_PAYLOAD
    #: Sessions (across the registry) whose AEAD objects stay built (recently used ones:
    #: :class:`HotChannels`). The others keep only their keys and rebuild them on use (a
    #: request and its answer cost about 3.5 µs more); this bounds the memory of idle sessions
    #: (P4): a built channel holds about 4.2 KB of OpenSSL contexts, a whole idle session less
    #: than 2 KB.
    max_hot_channels: int = 64
    #: A connection that carries no session for this long (from its start, or since its
    #: last session ended) is closed with GOAWAY(IDLE_TIMEOUT) (NET-13).
    connection_idle_timeout: float = 10.0
    #: A frame must arrive whole within this many seconds of its first byte (slowloris).
    frame_timeout: float = 10.0
    #: Units of input that does nothing (frames ignored or refused without a session, small
    #: transport pieces, WebSocket pings) a connection may send at once; past them it gets
    #: GOAWAY(LIMIT_EXCEEDED) (protocol.md section 10).
    unproductive_burst: int = 1024
    #: Units of that budget regained per second, up to ``unproductive_burst``.
    unproductive_rate: float = 64.0

    def __post_init__(self) -> None:
        for name in (
            "handshake_timeout",
            "idle_timeout",
            "session_lifetime",
            "connection_idle_timeout",
            "frame_timeout",
            "unproductive_rate",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in (
            "max_requests_per_session",
            "max_requests_in_flight",
            "max_sessions_per_connection",
            "max_hot_channels",
            "unproductive_burst",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.reply_cache_bytes < 0:
            raise ValueError("reply_cache_bytes must not be negative")


@dataclass(slots=True, repr=False, eq=False)
class _ServerSession:
    kind: SessionKind
    session_id: int
    account_name: bytes
    created: float
    last_activity: float
    state: State = State.IDLE
    owner: ServerConnection | None = None
    user_id: bytes | None = None
    #: The OPAQUE message waiting for the application's decision (RegistrationRequest or
    #: CredentialRequest), then the OPAQUE server login state.
    opaque_value: bytes | None = None
    registration_record: bytes | None = None
    channel: Channel | None = None
    #: The login runs against a decoy record: the account name is not registered (NET-9).
    decoy: bool = False
    highest_request_id: int = 0
    request_count: int = 0
    #: Requests awaiting an answer, each with whether it is a read (its answer may be
    #: dropped). An idle session keeps it empty, and an empty dict is a quarter of an empty
    #: set's or OrderedDict's size (P4).
    pending: dict[int, bool] = field(default_factory=dict)
    #: The latest answered requests (reply cache, oldest first), for re-sends after a
    #: resumption: the answer, or None for a read whose answer was not kept (run again).
    answered: dict[int, bytes | None] = field(default_factory=dict)
    #: Bytes of the answers ``answered`` keeps.
    answered_bytes: int = 0
    #: What every event of the session carries: the same object across resumptions.
    handle: SessionHandle = field(default_factory=SessionHandle)
    #: The application's name for the credentials the session logged in with
    #: (``accept_login``'s ``credentials_version``; ``renew_credentials`` moves it on).
    credentials_version: int = 0

    def __repr__(self) -> str:
        return f"<server session {self.session_id} {self.kind.value} {self.state.name}>"

    def deadline(self, config: ServerConfig) -> tuple[float, ErrorCode]:
        if self.state in _LIVE:
            idle = self.last_activity + config.idle_timeout
            lifetime = self.created + config.session_lifetime
            if lifetime <= idle:
                return lifetime, _LIFETIME_EXPIRED
            return idle, _IDLE_TIMEOUT
        return self.created + config.handshake_timeout, _HANDSHAKE_TIMEOUT


class ExpiredSession(NamedTuple):
    """A detached session the registry ended at its deadline (for the audit log)."""

    user_id: bytes
    code: ErrorCode
    handle: SessionHandle


class SessionRegistry:
    """Established request sessions by handle, attached to a connection or DETACHED.

    One per server process; pass it to every ServerConnection. ``handle_timer``
    expires detached sessions (attached ones are expired by their connection).

    The registry is the one owner of what crosses connections: a session resuming on
    another connection, an answer for a session that moved, a session found expired by
    another connection. Connections ask it through the methods below and never touch
    each other. When such a move queues output on (or changes the deadlines of) a
    connection other than the one being driven, that connection is listed by
    :meth:`take_woken`: its driver should send its output and recompute its timer.

    With a ``store`` (shared by several server instances), a session that loses its
    connection is sealed under ``sealing_key`` and saved there instead of kept in
    memory, and a RESUME for a handle this instance does not hold claims it from the
    store: a session opened on one instance resumes on another (or after a restart).
    A session with requests still being answered stays in memory until it is resumed.
    ``app_state`` (the application) gives what it keeps of a session to be sealed with it,
    and takes it back on the instance that claims the session.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        store: DetachedSessionStore | None = None,
        sealing_key: bytes | None = None,
        random: RandomSource | None = None,
        app_state: SessionAppState | None = None,
    ) -> None:
        if store is not None and (sealing_key is None or len(sealing_key) != 32 or random is None):
            raise ValueError("a session store needs a 32-byte sealing_key and a random source")
        self.config = config or ServerConfig()
        self._sessions: dict[bytes, _ServerSession] = {}
        self._store = store
        self._sealing_key = sealing_key
        self._random = random
        self._app_state = app_state
        self._hot = HotChannels(self.config.max_hot_channels)
        #: At or before every detached session's deadline (math.inf: none is detached). A
        #: detached session's deadline does not move, so the bound is lowered when one
        #: detaches and made exact again by handle_timer: get_timer, which every idle
        #: connection asks, then costs no walk over every session of the registry.
        self._detached_bound = math.inf
        #: Weak: a connection nobody drives any more is not kept alive by being listed.
        self._woken: WeakSet[ServerConnection] = WeakSet()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, handle: object) -> bool:
        return handle in self._sessions

    def detached_count(self) -> int:
        return sum(1 for s in self._sessions.values() if s.owner is None)

    @property
    def hot_channels(self) -> int:
        """How many sessions keep their AEAD objects built (at most
        ``config.max_hot_channels``, recently used ones); the others keep only their
        keys (P4). With ``len(registry)``, what an operator watches for memory."""
        return len(self._hot)

    def take_woken(self) -> list[ServerConnection]:
        """Connections whose output or deadlines another connection's work changed since
        the last call (a session moved away, expired, or got an answer there)."""
        if not self._woken:  # (every driver asks after every batch; this is the usual answer)
            return []
        woken = list(self._woken)
        self._woken.clear()
        return woken

    def get_timer(self) -> float | None:
        """A time at or before the earliest deadline among detached sessions (None: none is
        detached), in constant time. It may be early (that session resumed or ended since):
        :meth:`handle_timer` then ends nothing, and the timer after it is exact."""
        bound = self._detached_bound
        return None if bound == math.inf else bound

    def _lower_detached_bound(self, session: _ServerSession) -> None:
        deadline = session.deadline(self.config)[0]
        if deadline < self._detached_bound:
            self._detached_bound = deadline

    def handle_timer(self, now: float) -> list[ExpiredSession]:
        """End detached sessions whose deadline passed; returns them for auditing."""
        expired: list[ExpiredSession] = []
        bound = math.inf
        for key, session in list(self._sessions.items()):
            if session.owner is not None:
                continue
            deadline, code = session.deadline(self.config)
            if deadline > now:
                bound = min(bound, deadline)
            else:
                del self._sessions[key]
                transition(Role.SERVER, session, Command.CLOSE)  # expired while detached
                if session.channel is not None:
                    self._hot.discard(session.channel)
                assert session.user_id is not None
                expired.append(ExpiredSession(session.user_id, code, session.handle))
        self._detached_bound = bound
        return expired

    def end_user_sessions(self, user_id: bytes, code: ErrorCode, keep: SessionHandle | None = None) -> int:
        """End every session of ``user_id`` this registry holds except ``keep`` (a password
        change or an account deletion): an attached one with a sealed CLOSE(``code``) on its
        connection (listed by :meth:`take_woken`; its ``SessionClosed`` carries no user id,
        so nothing is audited per session), a detached one silently (a RESUME then finds no
        session). Sessions sealed into a shared store are the store's to drop. Returns how
        many ended."""
        ended = 0
        for session in list(self._sessions.values()):
            if session.handle is keep or session.user_id is None:
                continue
            if not hmac.compare_digest(session.user_id, user_id):
                continue
            self._end_one(session, code)
            ended += 1
        return ended

    def credentials_held(self) -> list[tuple[SessionHandle, bytes, int]]:
        """``(handle, user_id, credentials_version)`` of every logged-in session this
        registry holds (attached or detached in memory): what the application compares with
        its accounts' current credentials, to end sessions whose password changed, or whose
        account was deleted, elsewhere without waiting for their next request."""
        held = self._sessions.values()
        return [(s.handle, s.user_id, s.credentials_version) for s in held if s.user_id is not None]

    def end_session(self, handle: SessionHandle, code: ErrorCode) -> bool:
        """End one session, by its handle, as :meth:`end_user_sessions` ends each (the
        application found its credentials out of date: changed or deleted through another
        instance). Requests it has in flight get no answer. False if no such session is held."""
        return bool(self.end_sessions((handle,), code))

    def end_sessions(self, handles: Collection[SessionHandle], code: ErrorCode) -> list[SessionHandle]:
        """:meth:`end_session` of each of ``handles``, in one pass over the registry (ending
        them one by one walks it once per session: the periodic credentials check ending
        thousands of sessions of one account stalled the server for seconds). Returns the
        handles of the sessions it ended (those still held)."""
        wanted = handles if isinstance(handles, set | frozenset) else set(handles)
        if not wanted:
            return []
        ended: list[SessionHandle] = []
        for session in [s for s in self._sessions.values() if s.handle in wanted]:
            self._end_one(session, code)
            ended.append(session.handle)
        return ended

    def _end_one(self, session: _ServerSession, code: ErrorCode) -> None:
        owner = session.owner
        if owner is not None:
            owner._revoke(session, code)
            self._woken.add(owner)
        else:
            self.remove(session)
            if session.state is not State.CLOSED:
                transition(Role.SERVER, session, Command.CLOSE)

    # --------------------------------------------- used by ServerConnection

    def add(self, session: _ServerSession) -> bool:
        """Register a session that just logged in; False if its handle is taken."""
        assert session.channel is not None
        key = session.channel.session_handle
        if key in self._sessions:
            return False
        self._sessions[key] = session
        return True

    def remove(self, session: _ServerSession) -> None:
        """Forget an ended session (never another session under the same handle)."""
        if session.channel is not None:
            key = session.channel.session_handle
            if self._sessions.get(key) is session:
                del self._sessions[key]
            self._hot.discard(session.channel)

    def lookup(self, key: bytes) -> _ServerSession | None:
        """The session a RESUME names, from memory or claimed from the shared store."""
        session = self._sessions.get(key)
        if session is None and self._store is not None:
            session = self._claim(key)
        return session

    def warm(self, channel: Channel) -> None:
        """The channel is in use: keep its AEAD objects built (in the hot set)."""
        self._hot.touch(channel)

    def cool(self, channel: Channel) -> None:
        """The channel's session ended: drop it from the built ones."""
        self._hot.discard(channel)

    def move(self, session: _ServerSession, to: ServerConnection, session_id: int, channel: Channel) -> None:
        """A RESUME on ``to`` proved the session: it leaves its old connection (if any)
        and continues on ``to`` as ``session_id`` in the key epoch of ``channel``."""
        old = session.owner
        if old is not None and old is not to:
            old.release(session.session_id)
            self._woken.add(old)
        if session.channel is not None:
            self._hot.discard(session.channel)
        session.channel = channel
        self._hot.touch(channel)
        session.owner = to
        session.session_id = session_id

    def expire(self, session: _ServerSession, now: float) -> None:
        """A RESUME found the session past its deadline: end it where it is."""
        owner = session.owner
        if owner is not None:
            owner.handle_timer(now)  # its owner ends it (CLOSE on that connection, an event there)
            self._woken.add(owner)
        else:
            self.remove(session)
            transition(Role.SERVER, session, Command.CLOSE)

    def deliver(self, session: _ServerSession, request_id: int, body: bytes) -> bool:
        """An answer computed on a connection the session has left: the connection the
        session is on now sends it (and is listed by take_woken)."""
        owner = session.owner
        assert owner is not None  # the caller answers a detached session itself
        self._woken.add(owner)
        return owner.send_response(session.session_id, request_id, body)

    def detach(self, session: _ServerSession) -> None:
        """The session's connection is gone: keep it for resumption (in the store if any)."""
        if session.state is not State.DETACHED:  # (a claimed session put back is DETACHED already)
            transition(Role.SERVER, session, Command.DETACH)
        session.owner = None
        self._lower_detached_bound(session)
        if self._store is None or session.pending or session.channel is None:
            return
        assert self._sealing_key is not None and self._random is not None and session.user_id is not None
        state = SessionState(
            session.user_id,
            session.account_name,
            session.created,
            session.last_activity,
            session.channel.export(),
            session.highest_request_id,
            session.request_count,
            session.answered,
            session.credentials_version,
            b"" if self._app_state is None else self._app_state.export_session(session.handle),
        )
        key = session.channel.session_handle
        sealed = seal_session_state(state, key, self._sealing_key, self._random)
        try:
            self._store.save(
                key,
                sealed,
                session.deadline(self.config)[0],
                session.user_id,
                credentials_version=session.credentials_version,
            )
        except Exception:  # an injected store may fail: keep the session here instead
            return
        self._sessions.pop(key, None)
        self._hot.discard(session.channel)
        transition(Role.SERVER, session, Command.CLOSE)  # this copy is done; the store holds it now

    def _claim(self, key: bytes) -> _ServerSession | None:
        assert self._store is not None and self._sealing_key is not None
        try:
            sealed = self._store.claim(key)
        except Exception:  # an injected store may fail: treat it as "no such session"
            return None
        if sealed is None:
            return None
        state = unseal_session_state(sealed, key, self._sealing_key)
        if state is None:
            return None
        session = _ServerSession(
            SessionKind.REQUEST,
            0,
            state.account_name,
            state.created,
            state.last_activity,
            state=State.DETACHED,
            user_id=state.user_id,
            channel=Channel.restore(state.channel, is_client=False),
            highest_request_id=state.highest_request_id,
            request_count=state.request_count,
            answered=state.answered,
            answered_bytes=sum(len(answer) for answer in state.answered.values() if answer is not None),
            credentials_version=state.credentials_version,
        )
        self._sessions[key] = session
        self._lower_detached_bound(session)
        if state.app_state and self._app_state is not None:
            self._app_state.import_session(session.handle, state.app_state)
        return session


class ServerConnection(ConnectionBase):
    """Server state machine for one transport connection carrying many sessions."""

    role = Role.SERVER

    def __init__(
        self,
        server_setup: ServerSetup,
        random: RandomSource,
        *,
        config: ServerConfig | None = None,
        registry: SessionRegistry | None = None,
        now: float,
        admission: Admission | None = None,
        opaque: OpaqueSuite = REAL_OPAQUE,
    ) -> None:
        if registry is not None and config is not None and config != registry.config:
            raise ValueError("config differs from the registry's: pass one or make them equal")
        config = config or (registry.config if registry is not None else ServerConfig())
        super().__init__(config.max_payload)
        self.config = config
        self._setup = server_setup
        self._random = random
        self._opaque = opaque
        self.registry = registry if registry is not None else SessionRegistry(config)
        #: The registry's hot-channel set, touched on every record (SessionRegistry.warm, direct).
        self._warm = self.registry._hot.touch
        self._sessions: dict[int, _ServerSession] = {}
        #: Sessions that left this connection (moved or detached) while requests were pending.
        self._departed: dict[int, _ServerSession] = {}
        #: Sessions this connection detached when it failed (see abandon()).
        self._detached_here: list[_ServerSession] = []
        self._highest_session_id = 0
        self._now = now
        #: Asked before any work for a frame that opens a session (NET-13); None admits all.
        self._admission = admission
        #: Since when the connection has carried no session (None while it carries one).
        self._idle_since: float | None = now
        #: When the first byte of a frame not yet whole arrived (None when none is pending).
        self._partial_since: float | None = None
        #: At or before every session's deadline (see timer_hint); None: to be computed.
        self._deadline_bound: float | None = math.inf
        #: The budget for unproductive input (protocol.md section 10): units left, counted at
        #: ``_budget_at``. Frames and small pieces that do nothing spend it; frames acted on
        #: and time give it back (up to the burst); a session the server ends, or one that
        #: resumes here, adds what an honest client may still send for it (late frames,
        #: re-sent requests), up to ``_budget_cap``.
        self._budget = float(config.unproductive_burst)
        self._budget_at = now
        #: The most one such frame may cost: its payload, the TLS record and the WebSocket
        #: frame it came in.
        self._late_frame_cost = 3 + config.max_payload // UNPRODUCTIVE_BLOCK_SIZE
        self._budget_cap = float(
            config.unproductive_burst
            + config.max_sessions_per_connection * (config.max_requests_in_flight + 1) * self._late_frame_cost
        )
        #: Set once the budget ran out: the connection fails at the next frame it reads.
        self._exhausted = False

    def __repr__(self) -> str:
        return f"<ServerConnection {len(self._sessions)} sessions>"

    # ------------------------------------------------------------ input, time

    def receive_data(self, data: bytes, now: float) -> None:  # type: ignore[override]
        """Buffer bytes received at time ``now``. The time is required: every input moves
        the connection's clock, so no deadline is measured from a stale time."""
        if now > self._now:  # (_advance, inline: every input passes here)
            self._now = now
        super().receive_data(data)
        if self._inbox and self._partial_since is None:
            self._partial_since = self._now

    def note_small_input(self, pieces: int, now: float) -> bool:
        """The transport received ``pieces`` pieces carrying fewer than ``SMALL_PIECE_SIZE``
        bytes each (TLS records, WebSocket frames, pings, pongs): one unit each of the
        budget for unproductive input (protocol.md section 10). True once the budget has
        run out: the connection then fails (GOAWAY(LIMIT_EXCEEDED)) at the next
        ``next_event``, which the caller should call soon (pieces that carry no frame
        bytes give a driver no other reason to), and need read nothing more."""
        if pieces < 0:
            raise LocalProtocolError("pieces must not be negative")
        self._advance(now)
        self._refill()
        self._budget -= pieces
        if self._budget < 0:
            self._exhausted = True
        return self._exhausted

    @property
    def unproductive_budget(self) -> float:
        """Units of the budget for unproductive input left at the connection's latest time
        (negative once it ran out)."""
        self._refill()
        return self._budget

    def get_timer(self) -> float | None:
        """The earliest deadline of this connection (its sessions', an idle connection's,
        an incomplete frame's), or None."""
        deadlines = [s.deadline(self.config)[0] for s in self._sessions.values()]
        if self.failed is None:
            if self._idle_since is not None:
                deadlines.append(self._idle_since + self.config.connection_idle_timeout)
            if self._partial_since is not None:
                deadlines.append(self._partial_since + self.config.frame_timeout)
        return min(deadlines, default=None)

    def timer_hint(self) -> float | None:
        """A time at or before :meth:`get_timer`, in constant time between two
        :meth:`handle_timer` calls: what a driver waits for before it calls ``handle_timer``.

        ``get_timer`` looks at every session, and a driver asks after each batch; with
        hundreds of sessions on a connection that was a large part of a login's cost. A
        session's deadline only moves later as it is used, so the earliest deadline once
        computed stays a lower bound; a session that arrives, or becomes ESTABLISHED (whose
        idle deadline may be the earlier one), lowers it. It may be early (a session that
        was due to end has been used or has ended): ``handle_timer`` then ends nothing,
        and the hint after it is exact again."""
        bound = self._deadline_bound
        if bound is None:
            config = self.config
            bound = self._deadline_bound = min(
                (s.deadline(config)[0] for s in self._sessions.values()), default=math.inf
            )
        deadlines = [bound] if bound != math.inf else []
        if self.failed is None:
            if self._idle_since is not None:
                deadlines.append(self._idle_since + self.config.connection_idle_timeout)
            if self._partial_since is not None:
                deadlines.append(self._partial_since + self.config.frame_timeout)
        return min(deadlines, default=None)

    def _lower_deadline_bound(self, session: _ServerSession) -> None:
        """``session`` arrived or its deadline may have moved earlier: keep the bound below it."""
        bound = self._deadline_bound
        if bound is not None:
            deadline = session.deadline(self.config)[0]
            if deadline < bound:
                self._deadline_bound = deadline

    def handle_timer(self, now: float) -> None:
        """End every session whose deadline is at or before ``now``; close the connection if
        it has carried no session, or has waited for the rest of a frame, for too long."""
        self._advance(now)
        self._deadline_bound = None  # computed again from the sessions left
        for session in list(self._sessions.values()):
            deadline, code = session.deadline(self.config)
            if deadline <= now:
                self._expire(session, code)
        if self.failed is not None:
            return
        if self._partial_since is not None and self._partial_since + self.config.frame_timeout <= now:
            if self._whole_frame_buffered():
                # Not late: whole frames wait for the caller, which stopped taking them (its
                # output waited for the peer); taking the next one starts the clock again.
                self._partial_since = None
            else:
                self._fail_connection(ErrorCode.IDLE_TIMEOUT, "a frame took too long to arrive", remote=False)
        elif self._idle_since is not None and self._idle_since + self.config.connection_idle_timeout <= now:
            self._fail_connection(ErrorCode.IDLE_TIMEOUT, "no session on this connection", remote=False)

    def abandon(self, reason: str = "server storage failure") -> None:
        """Storage could not commit what this connection's latest events did: drop every byte
        not yet sent and end every session (none stays resumable, so no answer that was
        never committed can reach the client later). The connection fails. A login that was
        waiting for its LOGIN_FINISH ends with LoginFailed, as when the client goes away (the
        client may have tested a password guess, NET-10)."""
        self._outbox.clear()
        for session in list(self._sessions.values()):
            login_pending = session.state is State.AWAIT_LOGIN_FINISH
            self._end(session)
            if login_pending and session.kind is SessionKind.REQUEST:
                self._login_failed(session)
        # Sessions this connection detached (in the batch that failed): their reply caches
        # may hold answers that were never committed, so none may be resumed.
        for session in [*self._departed.values(), *self._detached_here]:
            if session.owner is not None and session.owner is not self:
                continue  # resumed on another connection since: that connection holds it now
            self.registry.remove(session)
            session.pending.clear()
            if session.state is not State.CLOSED:
                transition(Role.SERVER, session, Command.CLOSE)
        self._departed.clear()
        self._detached_here.clear()
        if self.failed is None:
            self._fail_connection(ErrorCode.INTERNAL_ERROR, reason, remote=False, send_goaway=False)

    def connection_lost(self) -> None:
        """The transport is gone: established sessions detach, the others end."""
        if self.failed is None:
            self._fail_connection(
                ErrorCode.CONNECTION_LOST, "connection lost", remote=False, send_goaway=False
            )

    # ------------------------------------------------------------ commands

    def accept_registration(self, session_id: int, user_id: bytes) -> None:
        """The account name is free and valid; ``user_id`` (16 fresh random bytes,
        unique: REG-2) will be the account's id."""
        session = self._live(session_id)
        self._check(session, Command.ACCEPT_REGISTRATION)
        if len(user_id) != USER_ID_SIZE:
            raise LocalProtocolError("user_id must be 16 bytes")
        assert session.opaque_value is not None
        try:
            response = RegResponse(
                self._opaque.server_registration_start(
                    self._setup, session.opaque_value, session.account_name
                )
            )
        except RemoteProtocolError as exc:  # a malformed registration request: the session ends
            self._fail(session, exc, remote=True)
            return
        session.user_id = user_id
        session.opaque_value = None
        transition(Role.SERVER, session, Command.ACCEPT_REGISTRATION)
        self._send(FrameType.REG_RESPONSE, session_id, response.encode())

    def accept_login(
        self, session_id: int, user_id: bytes, registration_record: bytes, credentials_version: int = 0
    ) -> None:
        """Continue the login with the account's stored record. ``credentials_version`` is the
        application's name for that record (0..2**64-1, e.g. when the password last changed):
        the session keeps it (sealed with it when it moves) and :meth:`credentials_version`
        returns it, so the application can tell a session of credentials since replaced."""
        session = self._live(session_id)
        self._check(session, _ACCEPT_LOGIN)
        if len(user_id) != USER_ID_SIZE:
            raise LocalProtocolError("user_id must be 16 bytes")
        if len(registration_record) != REGISTRATION_UPLOAD_SIZE:
            raise LocalProtocolError("registration_record has the wrong size")
        _check_credentials_version(credentials_version)
        session.credentials_version = credentials_version
        # The work accept_unknown_login does, done and dropped: a login costs the same
        # whether or not the name is registered (NET-9; a timing probe sees no difference).
        self._setup.decoy_record(session.account_name, self._random)
        self._start_login(session, user_id, registration_record)

    def accept_unknown_login(self, session_id: int) -> None:
        """The account name is not registered: go on against a decoy record (NET-9), so the
        client sees the same messages, sizes and failure as for a wrong password. The login
        then fails; its ``LoginFailed`` carries no user id."""
        session = self._live(session_id)
        self._check(session, Command.ACCEPT_LOGIN)
        user_id, record = self._setup.decoy_record(session.account_name, self._random)
        session.decoy = True
        self._start_login(session, user_id, record)

    def _start_login(self, session: _ServerSession, user_id: bytes, record: bytes) -> None:
        assert session.opaque_value is not None
        try:
            step = self._opaque.server_login_start(
                self._setup, record, session.opaque_value, session.account_name
            )
        except RemoteProtocolError as exc:  # a malformed credential request: the session ends
            self._fail(session, exc, remote=True)
            return
        session.user_id = user_id
        session.opaque_value = step.state
        transition(_SERVER, session, _ACCEPT_LOGIN)
        self._send(_F_LOGIN_RESPONSE, session.session_id, LoginResponse(step.message).encode())

    def confirm_registration(self, session_id: int) -> None:
        """The registration is stored (REG-4): tell the client and close the session."""
        session = self._live(session_id)
        self._check(session, Command.CONFIRM_REGISTRATION)
        self._send_sealed(session, FrameType.CLOSE, Close(ErrorCode.OK).encode())
        self._end(session, Command.CONFIRM_REGISTRATION)

    def reject_session(self, session_id: int, code: ErrorCode, reason: str = "") -> None:
        """End a session by application decision (account exists, unknown account, ...)."""
        session = self._live(session_id)
        self._check(session, Command.ABORT)
        if code is ErrorCode.OK:
            raise LocalProtocolError("reject_session needs an error code")
        if not is_printable_reason(reason):
            raise LocalProtocolError(f"reason must be printable ASCII of at most {REASON_MAX} characters")
        self._close_with(session, code, reason)

    def close_session(self, session_id: int, code: ErrorCode = ErrorCode.OK) -> None:
        """End an established session by server decision (sealed CLOSE)."""
        session = self._live(session_id)
        self._check(session, Command.CLOSE)
        self._send_sealed(session, FrameType.CLOSE, Close(code).encode())
        self._end(session, Command.CLOSE)

    def send_response(self, session_id: int, request_id: int, body: bytes) -> bool:
        """Answer ``request_id``. Returns False if the session ended meanwhile (the
        answer is dropped); if it moved to another connection or is detached, the
        answer goes there or waits for the resumption."""
        session = self._sessions.get(session_id)
        if session is None:
            session = self._departed.get(session_id)
            if session is None:
                if 0 < session_id <= self._highest_session_id:
                    return False
                raise LocalProtocolError(f"no session {session_id}")
        if session.state is _CLOSED:
            self._departed.pop(session_id, None)
            return False
        read = session.pending.get(request_id)
        if read is None:
            raise LocalProtocolError(f"request {request_id} is not awaiting an answer")
        if session.owner is not None and session.owner is not self:
            # The session resumed elsewhere: the connection it is on now sends the answer.
            delivered = self.registry.deliver(session, request_id, body)
            if not session.pending:
                self._departed.pop(session_id, None)
            return delivered
        self._check(session, _SEND_RESPONSE)
        plaintext = Response.encode_fields(request_id, body)
        config = self.config
        if 8 + len(plaintext) + 16 > config.max_payload:
            raise LocalProtocolError("response larger than the frame limit", ErrorCode.FRAME_TOO_LARGE)
        pending = session.pending
        del pending[request_id]
        if not pending:
            pending.clear()  # frees the table a removal leaves: an idle session keeps none
        # The reply cache (protocol.md section 9): the oldest answered requests past
        # max_requests_in_flight leave it; a read's answer stays only if it fits in
        # reply_cache_bytes beside the answers kept, else only its id stays (None).
        # (Inline: this runs for every answer.)
        answered = session.answered
        kept = session.answered_bytes
        while len(answered) >= config.max_requests_in_flight:
            old = answered.pop(next(iter(answered)))
            if old is not None:
                kept -= len(old)
        size = len(body)
        if read and kept + size > config.reply_cache_bytes:
            answered[request_id] = None
            session.answered_bytes = kept
        else:
            answered[request_id] = body
            session.answered_bytes = kept + size
        if session_id in self._departed and not session.pending:
            del self._departed[session_id]
        if session.owner is self and session.state is _ESTABLISHED:
            self._send_sealed(session, _F_RESPONSE, plaintext)
            self._maybe_close_at_limit(session)
        return True

    def login_age(self, session_id: int) -> float | None:
        """Seconds since the live session's login started (None for no such session): the
        key server asks for a recent login before a password change or a deletion."""
        session = self._sessions.get(session_id)
        return None if session is None else self._now - session.created

    def credentials_version(self, session_id: int) -> int | None:
        """The credentials the live session logged in with, as the application named them
        (``accept_login``, ``renew_credentials``); None for no such session."""
        session = self._sessions.get(session_id)
        return None if session is None else session.credentials_version

    def renew_credentials(self, session_id: int, credentials_version: int) -> None:
        """The live session changed its account's credentials itself (a password change):
        it holds the new ones, named ``credentials_version``, from now on."""
        _check_credentials_version(credentials_version)
        self._live(session_id).credentials_version = credentials_version

    def password_registration_response(self, account_name: bytes, registration_request: bytes) -> bytes:
        """Password change (CHANGE_PASSWORD_START): the OPAQUE RegistrationResponse for a
        new password of ``account_name``, under this connection's server setup.
        RemoteProtocolError for a malformed request."""
        return self._opaque.server_registration_start(self._setup, registration_request, account_name)

    def password_registration_record(self, registration_upload: bytes) -> bytes:
        """Password change (CHANGE_PASSWORD_FINISH): the registration record an upload
        gives. RemoteProtocolError for a malformed upload."""
        return self._opaque.server_registration_finish(registration_upload)

    def release(self, session_id: int) -> None:
        """The session resumed on another connection (the registry calls this): it leaves
        this one quietly; answers to its requests still pending here follow it there."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        self._sessions_changed()
        if session.pending:
            self._departed[session_id] = session

    def session_state(self, session_id: int) -> State:
        session = self._sessions.get(session_id)
        return session.state if session is not None else State.CLOSED

    @property
    def authenticated_sessions(self) -> int:
        """Request sessions established (logged in) on this connection now."""
        return sum(1 for s in self._sessions.values() if s.state is State.ESTABLISHED)

    # ------------------------------------------------------------ internals

    def _advance(self, now: float) -> None:
        if now > self._now:  # a clock that steps back (NTP) never undoes time
            self._now = now

    def _live(self, session_id: int) -> _ServerSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise LocalProtocolError(f"no live session {session_id}")
        return session

    def _check(self, session: _ServerSession, trigger: Trigger) -> None:
        """Refuse ``trigger`` unless the table has a row for it (before any work is done; the
        state itself changes later, through transition())."""
        target = next_state(_SERVER, session.kind, session.state, trigger)
        if target is None:
            if isinstance(trigger, Command):
                raise LocalProtocolError(
                    f"cannot {trigger.value} a {session.kind.value} session in state {session.state.name}"
                )
            raise RemoteProtocolError(
                f"unexpected {trigger.name} in state {session.state.name}", ErrorCode.UNEXPECTED_FRAME
            )

    def _send_sealed(self, session: _ServerSession, frame_type: FrameType, plaintext: bytes) -> None:
        """Seal and queue a record. The epoch's last sequence number is kept for CLOSE: a
        session that reaches it ends with CLOSE(SEQUENCE_EXHAUSTED) instead."""
        channel = session.channel
        assert channel is not None
        self._warm(channel)
        if channel.send_seq >= MAX_SEQ - 1 and frame_type is not FrameType.CLOSE:  # (sends_left <= 1)
            self._send(
                FrameType.CLOSE,
                session.session_id,
                channel.seal_payload(FrameType.CLOSE, Close(ErrorCode.SEQUENCE_EXHAUSTED).encode()),
            )
            self._end(session, Command.CLOSE)
            self._events.append(
                SessionClosed(
                    session.session_id, ErrorCode.SEQUENCE_EXHAUSTED, session.user_id, handle=session.handle
                )
            )
            return
        self._send(frame_type, session.session_id, channel.seal_payload(frame_type, plaintext))

    def _sessions_changed(self) -> None:
        """Keep the idle-connection clock: it runs while the connection carries no session."""
        if self._sessions:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = self._now

    def _refill(self) -> None:
        burst = self.config.unproductive_burst
        if self._budget < burst:
            budget = self._budget + (self._now - self._budget_at) * self.config.unproductive_rate
            self._budget = budget if budget < burst else float(burst)
        self._budget_at = self._now

    def _spend(self, units: int) -> None:
        """Charge unproductive input; out of budget, the connection fails (GOAWAY)."""
        self._refill()
        self._budget -= units
        if self._budget < 0:
            self._exhausted = True
            self._out_of_budget()

    def _out_of_budget(self) -> None:
        if self.failed is None:
            self._fail_connection(ErrorCode.LIMIT_EXCEEDED, "too much input that does nothing", remote=True)

    def _earn(self, units: float, cap: float) -> None:
        if self._budget < cap:
            budget = self._budget + units
            self._budget = budget if budget < cap else cap

    def _next_frame(self) -> Frame | None:
        if self._exhausted:  # (by small pieces, noted outside next_event)
            self._out_of_budget()
            return None
        frame = super()._next_frame()
        if frame is not None:  # what is left, if anything, is the start of the next frame
            self._partial_since = self._now if self._inbox else None
        return frame

    def _end(self, session: _ServerSession, trigger: Trigger = Command.ABORT, *, credit: bool = True) -> None:
        """End a live session (by ``trigger``: ABORT unless the caller checked another).
        ``credit``: the server ends it, so the client may still send frames for it (the
        requests it pipelined, its own ABORT or CLOSE): the budget for unproductive input
        takes them (protocol.md section 10)."""
        if credit:
            established = session.kind is SessionKind.REQUEST and session.channel is not None
            late = self.config.max_requests_in_flight + 1 if established else 2
            self._earn(late * self._late_frame_cost, self._budget_cap)
        if session.state is not State.CLOSED:
            transition(Role.SERVER, session, trigger)
        session.pending.clear()
        session.opaque_value = None
        session.registration_record = None
        if self._sessions.pop(session.session_id, None) is not None:
            self._sessions_changed()
        if session.kind is SessionKind.REQUEST:
            self.registry.remove(session)
        elif session.channel is not None:
            self.registry.cool(session.channel)

    def _revoke(self, session: _ServerSession, code: ErrorCode) -> None:
        """End a session the registry revokes (its account's password changed or the account
        was deleted): sealed CLOSE where the table allows it, else a silent end."""
        if self._sessions.get(session.session_id) is not session:
            self.registry.remove(session)
            return
        if next_state(Role.SERVER, session.kind, session.state, Command.CLOSE) is not None:
            self._send_sealed(session, FrameType.CLOSE, Close(code).encode())
            if session.state is not State.CLOSED:
                self._end(session, Command.CLOSE)
        else:
            self._end(session)
        self._events.append(SessionClosed(session.session_id, code, None, handle=session.handle))

    def _close_with(self, session: _ServerSession, code: ErrorCode, reason: str) -> None:
        """End a session, telling the peer: sealed CLOSE if the channel exists, else ABORT."""
        if session.channel is not None:
            self._send_sealed(session, FrameType.CLOSE, Close(code).encode())
        else:
            self._send_abort(session.session_id, code, reason)
        login_pending = session.state is State.AWAIT_LOGIN_FINISH
        self._end(session)
        if login_pending and session.kind is SessionKind.REQUEST:
            self._login_failed(session)

    def _login_failed(self, session: _ServerSession) -> None:
        user_id = None if session.decoy else session.user_id
        self._events.append(
            LoginFailed(session.session_id, session.account_name, user_id, handle=session.handle)
        )

    def _fail(
        self, session: _ServerSession, error: ProtocolError, *, remote: bool, notify: bool = True
    ) -> None:
        """End a session after a fault (clear ABORT: the channel may be out of step)."""
        login_pending = session.state is State.AWAIT_LOGIN_FINISH
        if notify:
            self._send_abort(session.session_id, error.code, str(error))
        self._end(session, credit=notify)
        if login_pending and session.kind is SessionKind.REQUEST:
            self._login_failed(session)
        self._events.append(
            SessionFailed(session.session_id, error.code, str(error), remote, handle=session.handle)
        )

    def _expire(self, session: _ServerSession, code: ErrorCode) -> None:
        if session.state is State.ESTABLISHED:
            self._send_sealed(session, FrameType.CLOSE, Close(code).encode())
            self._end(session, Command.CLOSE)
            self._events.append(
                SessionClosed(session.session_id, code, session.user_id, handle=session.handle)
            )
        else:
            self._fail(session, RemoteProtocolError("handshake took too long", code), remote=False)

    def _maybe_close_at_limit(self, session: _ServerSession) -> None:
        if (
            session.request_count >= self.config.max_requests_per_session
            and not session.pending
            and session.state is State.ESTABLISHED
        ):
            self._send_sealed(session, FrameType.CLOSE, Close(ErrorCode.REQUEST_LIMIT).encode())
            self._end(session, Command.CLOSE)
            self._events.append(
                SessionClosed(
                    session.session_id, ErrorCode.REQUEST_LIMIT, session.user_id, handle=session.handle
                )
            )

    def _on_connection_failed(self) -> None:
        for session in list(self._sessions.values()):
            target = next_state(Role.SERVER, session.kind, session.state, Command.DETACH)
            if target is State.DETACHED:
                del self._sessions[session.session_id]
                if session.pending:
                    self._departed[session.session_id] = session
                self._detached_here.append(session)
                self.registry.detach(session)
            else:
                self._fail(
                    session,
                    RemoteProtocolError("connection lost", ErrorCode.CONNECTION_LOST),
                    remote=False,
                    notify=False,
                )

    # ------------------------------------------------------------ frames in

    def _handle_frame(self, frame: Frame) -> None:
        session = self._sessions.get(frame.session_id)
        acted = True
        if session is None:
            acted = self._handle_new(frame)
        elif frame.type is _F_ABORT:
            self._on_abort(session, frame)
        else:
            try:
                if TRANSITIONS.get((_SERVER, session.kind, session.state, frame.type)) is None:
                    self._check(session, frame.type)  # raises the error
                acted = self._apply(session, frame)
            except ProtocolError as exc:
                self._fail(session, exc, remote=exc.code is not ErrorCode.AUTHENTICATION_FAILED)
        # The budget for unproductive input (protocol.md section 10): a frame acted on gives
        # back the units of the TLS record and the WebSocket frame it may have come in.
        if acted:
            budget = self._budget
            if budget < self.config.unproductive_burst:
                self._budget = min(budget + 2, self.config.unproductive_burst)
        else:
            self._spend(1 + len(frame.payload) // UNPRODUCTIVE_BLOCK_SIZE)

    def _on_abort(self, session: _ServerSession, frame: Frame) -> None:
        try:
            abort = Abort.decode(frame.payload)
        except RemoteProtocolError as exc:
            self._fail(session, exc, remote=True, notify=False)
            return
        self._fail(
            session,
            RemoteProtocolError(abort.reason or abort.code.name, abort.code),
            remote=True,
            notify=False,
        )

    def _handle_new(self, frame: Frame) -> bool:
        """A frame for a session id this connection has no live session under. False if it
        opened nothing: ignored, or refused before admission (unproductive input)."""
        session_id = frame.session_id
        opening = frame.type in _OPENING
        if session_id <= self._highest_session_id:
            if opening:  # ids must increase; this one is spent
                self._send_abort(session_id, ErrorCode.BAD_SESSION_ID, "session id already used")
            return False  # else a late frame for a session that ended here; ignore it
        if not opening:
            if frame.type is not FrameType.ABORT:
                self._send_abort(
                    session_id, ErrorCode.UNEXPECTED_FRAME, f"{frame.type.name} does not open a session"
                )
            return False
        self._highest_session_id = session_id
        if len(self._sessions) >= self.config.max_sessions_per_connection:
            self._send_abort(session_id, ErrorCode.LIMIT_EXCEEDED, "too many sessions on this connection")
            return False
        if self._admission is not None and not self._admission.admit(frame.type, self._now):
            # Refused before any OPAQUE work, storage access or session lookup (NET-13).
            reason = "too many attempts from this address; retry later"
            self._send_abort(session_id, ErrorCode.RATE_LIMITED, reason)
            self._events.append(SessionFailed(session_id, ErrorCode.RATE_LIMITED, reason, True))
            return False
        kind = _REGISTRATION_SESSION if frame.type is _F_REG_START else _REQUEST_SESSION
        try:
            if frame.type is _F_RESUME:
                self._on_resume(session_id, frame)
                if self._admission is not None:  # a real resumption costs nothing (NET-13)
                    self._admission.refund(frame.type, self._now)
                return True
            session = _ServerSession(kind, session_id, b"", self._now, self._now, owner=self)
            if frame.type is _F_REG_START:
                # The OPAQUE step waits for accept_registration: a registration the server
                # refuses (name taken, not authorized) costs no OPAQUE work.
                reg_start = RegStart.decode(frame.payload)
                session.account_name = reg_start.account_name
                session.opaque_value = reg_start.registration_request
                event: RegistrationRequested | LoginRequested = RegistrationRequested(
                    session_id, reg_start.account_name, reg_start.token, handle=session.handle
                )
            else:
                login_start = LoginStart.decode(frame.payload)
                session.account_name = login_start.account_name
                session.opaque_value = login_start.credential_request
                event = LoginRequested(session_id, login_start.account_name, handle=session.handle)
        except ProtocolError as exc:
            self._send_abort(session_id, exc.code, str(exc))
            self._events.append(SessionFailed(session_id, exc.code, str(exc), True))
            return True  # (admitted: it paid for its attempt)
        transition(_SERVER, session, frame.type)
        self._sessions[session_id] = session
        self._lower_deadline_bound(session)
        self._sessions_changed()
        self._events.append(event)
        return True

    def _on_resume(self, session_id: int, frame: Frame) -> None:
        envelope = ResumeEnvelope.decode(frame.payload)
        unknown = RemoteProtocolError("no resumable session", ErrorCode.UNKNOWN_SESSION)
        session = self.registry.lookup(envelope.session_handle)
        if session is None or session.channel is None:
            raise unknown
        if session.owner is self:  # a client resumes only away from a connection it gave up on
            raise RemoteProtocolError("the session is attached to this connection", ErrorCode.UNKNOWN_SESSION)
        if session.deadline(self.config)[0] <= self._now:
            self.registry.expire(session, self._now)
            raise unknown
        target = next_state(Role.SERVER, session.kind, session.state, Command.RESUME)
        if target is None:
            raise unknown
        try:
            resume = Resume.decode(session.channel.open_resume(envelope.record))
        except RemoteProtocolError:
            if session.owner is None:
                self.registry.detach(session)  # not its owner: leave it where it was
            raise unknown from None
        if resume.received_total > session.channel.sent_total:
            # The client holds records this state never sent: the state was rolled back (a
            # restored store entry). It is stale for good; the client logs in again.
            if session.owner is None:
                self.registry.remove(session)
                transition(Role.SERVER, session, Command.CLOSE)
            raise RemoteProtocolError(
                "the session's stored state is older than the client's", code=ErrorCode.UNKNOWN_SESSION
            )
        # Records sealed for the client that it has not received: each may be an answer whose
        # request it re-sends (with those still pending), paid for below.
        lost = session.channel.sent_total - resume.received_total
        server_nonce = self._random(RESUME_NONCE_SIZE)
        channel = session.channel.next_epoch(resume.client_nonce, server_nonce)
        self.registry.move(session, self, session_id, channel)
        transition(Role.SERVER, session, Command.RESUME)
        session.last_activity = self._now
        self._sessions[session_id] = session
        self._lower_deadline_bound(session)
        self._sessions_changed()
        # The client re-sends each request it has unanswered (section 9): not unproductive. Only
        # those it can have (pending here, or answered in records it did not receive): a session
        # resumed back and forth between two connections must not buy input that does nothing.
        resent = min(self.config.max_requests_in_flight, len(session.pending) + lost)
        if resent:
            self._earn(resent * self._late_frame_cost, self._budget_cap)
        record = channel.seal(FrameType.RESUMED, Resumed().encode())
        self._send(FrameType.RESUMED, session_id, ResumedEnvelope(server_nonce, record).encode())
        assert session.user_id is not None
        self._events.append(SessionResumed(session_id, session.user_id, handle=session.handle))

    def _open_sealed(self, session: _ServerSession, frame: Frame) -> bytes:
        assert session.channel is not None
        self._warm(session.channel)
        plaintext = session.channel.open_payload(frame.type, frame.payload)
        session.last_activity = self._now
        return plaintext

    def _apply(self, session: _ServerSession, frame: Frame) -> bool:
        """Act on a frame for a live session; False if it changed nothing (a re-sent request)."""
        t = frame.type
        if t is _F_REQUEST:  # the common case first
            return self._on_request(session, *Request.decode_fields(self._open_sealed(session, frame)))
        if t is _F_REG_UPLOAD:
            upload = RegUpload.decode(frame.payload)
            session.registration_record = self._opaque.server_registration_finish(upload.registration_upload)
        elif t is _F_LOGIN_START:  # inside a registration session
            login_start = LoginStart.decode(frame.payload)
            if not hmac.compare_digest(login_start.account_name, session.account_name):
                raise RemoteProtocolError("login names another account", ErrorCode.INVALID_REQUEST)
            assert session.registration_record is not None
            step = self._opaque.server_login_start(
                self._setup,
                session.registration_record,
                login_start.credential_request,
                session.account_name,
            )
            session.opaque_value = step.state
            self._send(_F_LOGIN_RESPONSE, session.session_id, LoginResponse(step.message).encode())
        elif t is _F_LOGIN_FINISH:
            self._on_login_finish(session, LoginFinish.decode(frame.payload))
            return True
        elif t is FrameType.COMPLETE_REGISTRATION:
            message = CompleteRegistration.decode(self._open_sealed(session, frame))
            assert session.user_id is not None and session.registration_record is not None
            if not hmac.compare_digest(message.user_id, session.user_id):
                raise RemoteProtocolError("user_id does not match the session", ErrorCode.INVALID_REQUEST)
            self._events.append(
                RegistrationCompleted(
                    session.session_id,
                    session.account_name,
                    session.user_id,
                    session.registration_record,
                    message.encrypted_storage_key,
                    handle=session.handle,
                )
            )
        elif t is FrameType.CLOSE:
            close = Close.decode(self._open_sealed(session, frame))
            self._end(session, FrameType.CLOSE, credit=False)
            self._events.append(
                SessionClosed(session.session_id, close.code, session.user_id, handle=session.handle)
            )
            return True
        else:  # pragma: no cover - the table admits no other frame types for the server
            raise RemoteProtocolError(f"unexpected {t.name}", ErrorCode.UNEXPECTED_FRAME)
        transition(Role.SERVER, session, t)
        return True

    def _on_login_finish(self, session: _ServerSession, finish: LoginFinish) -> None:
        assert session.opaque_value is not None and session.user_id is not None
        session_key = self._opaque.server_login_finish(session.opaque_value, finish.credential_finalization)
        channel = Channel(session_key, is_client=False)
        session.channel = channel
        session.opaque_value = None
        if session.kind is _REQUEST_SESSION and not self.registry.add(session):
            raise RemoteProtocolError("session handle collision", ErrorCode.INTERNAL_ERROR)
        transition(_SERVER, session, _F_LOGIN_FINISH)
        session.last_activity = self._now
        self._lower_deadline_bound(session)  # ESTABLISHED: its idle deadline may come sooner
        self._send_sealed(session, _F_WELCOME, Welcome(session.user_id).encode())
        if session.kind is _REQUEST_SESSION:
            self._events.append(
                LoginSucceeded(
                    session.session_id, session.account_name, session.user_id, handle=session.handle
                )
            )

    def _on_request(self, session: _ServerSession, request_id: int, body: bytes) -> bool:
        """False for a re-sent request (unproductive beyond what a resumption allows)."""
        if request_id in session.pending:
            return False  # a re-send after resumption; the answer is on its way
        if request_id in session.answered:
            return self._on_answered_again(session, request_id, body)
        if request_id <= session.highest_request_id:
            raise RemoteProtocolError("request id reused", ErrorCode.INVALID_REQUEST)
        if self._refuse_request(session):
            return True
        session.highest_request_id = request_id
        session.request_count += 1
        session.pending[request_id] = body[:1] in _READS
        assert session.user_id is not None
        self._events.append(
            RequestReceived(session.session_id, session.user_id, request_id, body, handle=session.handle)
        )
        return True

    def _refuse_request(self, session: _ServerSession) -> bool:
        """The session's request limits, for a new request and for a read run again: raise
        for too many in flight, True (the session closed) if it carried
        ``max_requests_per_session`` already."""
        if len(session.pending) >= self.config.max_requests_in_flight:
            raise RemoteProtocolError("too many requests in flight", ErrorCode.LIMIT_EXCEEDED)
        if session.request_count >= self.config.max_requests_per_session:
            self.close_session(session.session_id, ErrorCode.REQUEST_LIMIT)
            self._events.append(
                SessionClosed(
                    session.session_id, ErrorCode.REQUEST_LIMIT, session.user_id, handle=session.handle
                )
            )
            return True
        return False

    def _on_answered_again(self, session: _ServerSession, request_id: int, body: bytes) -> bool:
        """A re-send of a request in the reply cache (protocol.md section 9): its kept answer
        is sent again; a read whose answer was not kept runs again under the same id, as a
        new request of the session; anything else re-sent there is INVALID_REQUEST. False
        unless the session closed at its request limit: a re-send is unproductive input
        (section 10), paid for by the resumption."""
        answer = session.answered[request_id]
        if answer is not None:
            self._send_sealed(session, FrameType.RESPONSE, Response.encode_fields(request_id, answer))
            return False
        if body[:1] not in _READS:
            raise RemoteProtocolError("a re-sent request that is not a read", ErrorCode.INVALID_REQUEST)
        if self._refuse_request(session):
            return True
        del session.answered[request_id]
        session.request_count += 1
        session.pending[request_id] = True
        assert session.user_id is not None
        self._events.append(
            RequestReceived(session.session_id, session.user_id, request_id, body, handle=session.handle)
        )
        return False


def _check_credentials_version(credentials_version: int) -> None:
    if not 0 <= credentials_version < 2**64:
        raise LocalProtocolError("credentials_version must fit in 64 bits (0..2**64-1)")
