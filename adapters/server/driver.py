"""Drive one ServerConnection over any anyio byte stream (asyncio or trio).

One task reads and buffers whatever arrives (also while a commit runs); the main
task hands everything buffered to the server's group commit (adapters/server/commit.py),
sends what the core queued once it has committed, and arms the core's next deadline
for a third task, the connection's one timer, which wakes it when that deadline is due
(a deadline that passes while input never pauses is handled at the next batch). Over a
FastTLSStream, while the main task has nothing else to do, what arrives goes to the core
as the stream decrypts it and the connection's turn straight to the group commit, whose
batch's end sends the output (the batched path: see ``_consume`` and ``_turn_ended``);
the main task is woken only for the rest. ``stop()`` ends the
connection gracefully: requests already received have been answered (the
application answers while the driver processes events), a GOAWAY goes out,
and established sessions stay resumable on another connection.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import partial
from weakref import ReferenceType, WeakKeyDictionary, ref

import anyio
from anyio.abc import ByteStream

from keymgmt_proto import (
    NEED_DATA,
    SMALL_PIECE_SIZE,
    Admission,
    ConnectionFailed,
    ErrorCode,
    Event,
    ExpiredSession,
    RandomSource,
    ServerConnection,
    ServerSetup,
    SessionFailed,
    SessionRegistry,
)

from ..tls import TLSRecordCounter
from ..websocket import WebSocketStream
from .commit import CommitFailed, GroupCommit, Work
from .metrics import ServerMetrics
from .tlsfast import FastTLSStream

__all__ = [
    "ATTACK_CODES",
    "UNKNOWN_SESSIONS_AT_INFO",
    "ConnectionDriver",
    "group_commit_for",
    "group_commit_key",
    "peer_of",
    "serve_stream",
    "use_group_commit",
    "warn_peer",
]

log = logging.getLogger("keymgmt.server")

ServerApp = Callable[[ServerConnection, Event], None]
ExpiryHook = Callable[[Sequence[ExpiredSession]], None]

#: The driver of each live server connection, so that a driver whose work changed another
#: connection (SessionRegistry.take_woken) can wake that connection's driver.
_DRIVERS: WeakKeyDictionary[ServerConnection, ConnectionDriver] = WeakKeyDictionary()


def wake_woken(registry: SessionRegistry) -> None:
    """Wake the driver of every connection the registry changed from outside a driver (a
    session ended by the runtime's credentials check): it sends what was queued."""
    for conn in registry.take_woken():
        driver = _DRIVERS.get(conn)
        if driver is not None:
            driver.wake()


#: Errors a peer causes only by sending what no honest client sends: a forged, replayed or
#: reordered record (BAD_RECORD), a RESUME of a session it does not hold (UNKNOWN_SESSION),
#: frames that do not parse or do not belong where they came, more requests in flight than
#: allowed or a flood of input that does nothing (LIMIT_EXCEEDED). Each is logged at
#: WARNING with the peer's address (see :meth:`ConnectionDriver.warn`).
ATTACK_CODES = frozenset(
    {
        ErrorCode.BAD_RECORD,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.UNKNOWN_SESSION,
        ErrorCode.MALFORMED,
        ErrorCode.UNEXPECTED_FRAME,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.BAD_SESSION_ID,
        ErrorCode.INVALID_REQUEST,
    }
)

#: RESUMEs of an unknown session on one connection logged at INFO before the next ones are
#: WARNINGs: after a server crash (SIGKILL) or a session's expiry an honest client resumes
#: the sessions it had, gets UNKNOWN_SESSION and logs in again; many on one connection look
#: like guessed or stolen handles.
UNKNOWN_SESSIONS_AT_INFO = 4

#: The prefix the core puts before the reason text of a GOAWAY the peer sent.
_PEER_GOAWAY = "peer sent GOAWAY: "

#: Bytes of output one batch of a connection may queue before the rest of its input waits for
#: the next batch (:attr:`ConnectionDriver.max_output`): 16 answers of a 64 KiB secret.
MAX_OUTPUT = 1 << 20
#: Events one batch handles for a connection before the rest of its input waits for the next
#: batch (:attr:`ConnectionDriver.max_events`): sixteen sessions' worth of pipelined requests.
MAX_EVENTS = 256

#: WARNING lines of one kind a connection may cause; further ones are counted, and the
#: count is logged when the connection ends (an attacker must not flood the log).
WARNINGS_PER_CONNECTION = 5


def warn_peer(
    conn: ServerConnection, kind: str, message: str, *args: object, event: str | None = None
) -> None:
    """Log a WARNING about the peer of ``conn`` (through its driver, which bounds the lines
    per connection and adds the peer's address); ``message`` starts with ``%s``, the peer;
    ``event`` is the line's structured ``event`` field (default ``kind``). A connection no
    driver runs (a test driving the core by hand) has no peer and no bound: its line is DEBUG."""
    driver = _DRIVERS.get(conn)
    if driver is not None:
        driver.warn(kind, message, *args, event=event)
    else:
        log.debug(message, "a connection without a driver", *args)


def peer_of(conn: ServerConnection) -> str | None:
    """The peer address (``HOST:PORT``) of the driver running ``conn``, if one does."""
    driver = _DRIVERS.get(conn)
    return None if driver is None else driver.peer


#: The group commit of each storage (see group_commit_key) for drivers given none (tests,
#: serve_stream), made on first use and kept: connections that come one after another
#: share one, and its commit thread.
_COMMITS: WeakKeyDictionary[object, GroupCommit] = WeakKeyDictionary()
#: The group commit a runtime made for its storage (use_group_commit), held by the runtime:
#: held weakly here, so that a runtime gone takes its storage and key server with it.
_GIVEN: WeakKeyDictionary[object, ReferenceType[GroupCommit]] = WeakKeyDictionary()


def group_commit_for(app: ServerApp) -> GroupCommit:
    """The group commit that the connections of ``app`` share with every app over the same
    storage (made on first use, from the app's ``batch()`` when it has one, begun ahead by
    its ``begin_batch()``); keyed by :func:`group_commit_key`."""
    key = group_commit_key(app)
    try:
        given = _GIVEN.get(key)
        committer = None if given is None else given()
        if committer is None:
            _GIVEN.pop(key, None)  # (none, or its runtime is gone)
            committer = _COMMITS.get(key)
    except TypeError:  # a key that cannot be weakly referenced gets a group commit of its own
        return _group_commit(app)
    if committer is None:
        committer = _COMMITS[key] = _group_commit(app)
    return committer


def group_commit_key(app: ServerApp) -> object:
    """What the group commit of ``app`` is keyed by: the storage its batches run over, so
    that everything sharing one storage shares one group commit (two would interleave their
    batches). The storage is the ``storage`` of the object ``app.batch()`` returns (made,
    not entered: that begins nothing): a KeyServer's batch has one, so a wrapper that
    forwards ``batch()`` to a key server is keyed as it is, however it forwards. Else the
    app's own ``storage`` (a wrapper making batches of its own says so there), else the
    app itself, as for an app without ``batch()``."""
    batch = getattr(app, "batch", None)
    if batch is None:
        return app
    storage = getattr(batch(), "storage", None)
    if storage is None:
        storage = getattr(app, "storage", None)
    return app if storage is None else storage


def use_group_commit(app: ServerApp, committer: GroupCommit) -> None:
    """Make ``committer`` the group commit of ``app`` and of every app over the same storage
    while it lives (the runtime's, made with its metrics): :func:`group_commit_for` gives it."""
    key = group_commit_key(app)
    with suppress(TypeError):  # (a key that cannot be weakly referenced: nothing to share)
        _GIVEN[key] = ref(committer)
        _COMMITS.pop(key, None)


def _group_commit(app: ServerApp) -> GroupCommit:
    return GroupCommit(getattr(app, "batch", None), begin=getattr(app, "begin_batch", None))


class ConnectionDriver:
    """Runs one server connection; ``run()`` returns when it has ended and the stream is closed."""

    def __init__(
        self,
        stream: ByteStream,
        setup: ServerSetup,
        app: ServerApp,
        registry: SessionRegistry,
        *,
        random: RandomSource = os.urandom,
        receive_size: int = 65536,
        on_expired: ExpiryHook | None = None,
        peer: str = "peer",
        clock: Callable[[], float] = time.time,
        send_timeout: float = 30.0,
        admission: Admission | None = None,
        committer: GroupCommit | None = None,
        max_unprocessed: int = 4 * 65536,
        max_output: int = MAX_OUTPUT,
        max_events: int = MAX_EVENTS,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.clock = clock  # wall clock: session deadlines must agree across instances
        self.stream = stream
        self.app = app
        self.registry = registry
        self.receive_size = receive_size
        self.on_expired = on_expired if on_expired is not None else getattr(app, "sessions_expired", None)
        self.peer = peer
        #: A peer that takes longer than this to take our bytes has stopped reading: the
        #: connection is dropped, since a driver stuck in send() runs no session timers.
        self.send_timeout = send_timeout
        self.conn = ServerConnection(setup, random, registry=registry, now=self.clock(), admission=admission)
        #: Session starts refused because the peer's address ran out of tokens (NET-13).
        self.rate_limited = 0
        self._stopping = False
        self._stuck = False
        #: Set when an internal error ended the connection (see run()).
        self.faulted = False
        #: Where this connection's storage work runs: shared by every connection of the server.
        #: Without ``committer``, the one of the app's storage (group_commit_for): an app
        #: wrapping a key server gets the key server's.
        self.committer = committer if committer is not None else group_commit_for(app)
        #: Stop reading while this many received bytes wait for a batch.
        self.max_unprocessed = max_unprocessed
        #: Stop handling frames in a batch once this many bytes of output wait to be sent:
        #: the rest of the input stays in the core for the batch after the send.
        self.max_output = max_output
        #: The same for the events handled in one batch: a connection's turn cannot make every
        #: other connection of the batch wait for all it has sent (256 KiB of requests is
        #: thousands of them), however many of its sessions it spreads them over.
        self.max_events = max_events
        #: Set by a turn that stopped at one of those bounds (frames may be left in the core).
        self._held_back = False
        self._unprocessed = 0
        self._room = anyio.Event()
        #: Set by input, a wake or a stop: the main loop runs another batch.
        self._input = anyio.Event()
        self._reader_failure: Exception | None = None
        #: The timer task's state (see _timers): the deadline the main loop armed, the one
        #: the timer task sleeps for, its wake-up for an earlier one, and whether it fired.
        self._deadline = math.inf
        self._armed = math.inf
        self._rearm = anyio.Event()
        self._timer_fired = False
        #: WARNING lines logged and left out, per kind (see warn()).
        self._warned: dict[str, int] = {}
        #: RESUMEs of sessions the server does not hold (see UNKNOWN_SESSIONS_AT_INFO).
        self._unknown_sessions = 0
        self.metrics = metrics
        #: Each read under SMALL_PIECE_SIZE bytes (a small TLS record) is a unit of the
        #: connection's budget for unproductive input (protocol.md section 10). A WebSocket
        #: counts its own pieces instead (its TLS records and WebSocket frames), and so does
        #: a FastTLSStream (its TLS records: one of its reads may carry many).
        self._count_reads = True
        #: The transport's TLS records, counted below the TLS stream (count_tls_records).
        self._tls_records: TLSRecordCounter | None = None
        if isinstance(stream, WebSocketStream | FastTLSStream):
            stream.on_small_input = self._small_input
            self._count_reads = False
        #: The batched path, over a FastTLSStream (asyncio): while the main loop waits with
        #: nothing to do (``_parked``), the reader hands each arrival's turn straight to the
        #: group commit (GroupCommit.submit) and the output goes out when that batch has
        #: committed, from the batch's end: no wake-up of the main loop, no cancel scope and
        #: no event of its own per batch. Anything else (a wake, a stop, a timer, EOF, a
        #: failure, a send that must wait) wakes the main loop, which takes over as before.
        #: The stream hands records to _consume as they arrive, while the reader waits (None:
        #: not a FastTLSStream, no batched path).
        self._consumer: FastTLSStream | None = None
        if isinstance(stream, FastTLSStream):
            self._consumer = stream
            stream.consumer_size = receive_size
            stream.consumer = self._consume
        self._parked = False
        #: A submitted turn has not ended yet / has not run yet / input came after it ran.
        self._in_flight = False
        self._queued = False
        self._again = False
        #: Set when the submitted turn in flight ends (the main loop waits for it).
        self._settled: anyio.Event | None = None
        #: What the main loop must deal with from a submitted turn: the batch's failure or
        #: an exception (the work's, or the stream's on send); a send that must wait to drain.
        self._fast_failure: Exception | None = None
        self._drain_owed = False
        _DRIVERS[self.conn] = self

    def warn(
        self,
        kind: str,
        message: str,
        *args: object,
        event: str | None = None,
        code: str | None = None,
        level: int = logging.WARNING,
    ) -> None:
        """A WARNING line about this connection's peer (``message`` starts with ``%s``, the
        peer's address, also given as the structured field ``peer``; ``event``, default
        ``kind``, and ``code`` as fields too); at most WARNINGS_PER_CONNECTION of one
        ``kind``, the rest counted and reported at the end."""
        seen = self._warned.get(kind, 0)
        self._warned[kind] = seen + 1
        if seen < WARNINGS_PER_CONNECTION:
            extra = {"peer": self.peer, "event": event or kind}
            if code is not None:
                extra["code"] = code
            log.log(level, message, self.peer, *args, extra=extra)

    def _report_warnings(self) -> None:
        for kind, seen in self._warned.items():
            if seen > WARNINGS_PER_CONNECTION:
                log.warning(
                    "connection from %s: %d more %s not logged",
                    self.peer,
                    seen - WARNINGS_PER_CONNECTION,
                    kind,
                    extra={"peer": self.peer, "event": "not_logged"},
                )

    def _small_input(self, pieces: int) -> bool:
        """The stream received ``pieces`` small pieces (a WebSocket's pings, pongs, frames and
        TLS records; a FastTLSStream's TLS records); True once the connection's budget has run
        out (it need read nothing more)."""
        if self.conn.note_small_input(pieces, self.clock()):
            self._signal()  # the next batch ends the connection
            return True
        return False

    def count_tls_records(self, records: TLSRecordCounter) -> Callable[[int], bool]:
        """The TLS records of this connection are counted as they arrive, below its TLS
        stream (anyio's: the runtime's counting stream), where a record that carries nothing
        (a KeyUpdate) is seen too: each TLS read now tells ``records`` its size instead of
        counting as a small piece. Returns what the counter's owner tells the units to."""
        self._tls_records = records
        self._count_reads = False
        if isinstance(self.stream, WebSocketStream):
            self.stream.tls_records = records
        return self._small_input

    def wake(self) -> None:
        """Another connection changed this one (a session moved away, or an answer for a
        session now here was queued): send its output and recompute its timer now."""
        self._signal()

    def stop(self) -> None:
        """Finish what was received, say GOAWAY and close (graceful shutdown). Nothing more is
        taken in: what was received is answered in turns bounded as usual, then the GOAWAY."""
        self._stopping = True
        if self._consumer is not None:
            self._consumer.consumer = None
        self._signal()

    def _signal(self) -> None:
        """Wake the main loop for another batch (and end the batched path until it parks)."""
        self._parked = False
        self._input.set()

    def _run_app(self, event: Event) -> None:
        try:
            self.app(self.conn, event)
        except Exception:  # one bad event must not take the other sessions down
            log.exception("server application failed on %s", type(event).__name__)

    async def _commit(self, work: Callable[[], bytes]) -> bytes | None:
        """Run ``work`` in the server's next group commit; the bytes it took from the core
        once they are committed, or None if the batch failed (the connection is then
        abandoned: nothing of it is sent, its sessions end, so no answer that was never
        committed is ever seen; a commit that raised something else is raised here, a fault).
        Shielded: begun, it runs to the end even at shutdown."""
        with anyio.CancelScope(shield=True):
            try:
                return await self.committer.run(work)
            except CommitFailed as exc:
                await self._committed_nothing(exc)
                return None
        return None  # (a shielded scope is never cancelled)

    async def _committed_nothing(self, exc: CommitFailed) -> None:
        """A batch holding this connection's work failed (the caller shields this): a bug is
        raised as a fault, a storage failure abandons the connection."""
        if exc.__cause__ is not None:  # not a storage failure but a bug: a fault
            raise exc.__cause__ from None
        log.error("group commit failed; abandoning the connection from %s: %s", self.peer, exc)
        try:
            await self.committer.run(self._abandon)
        except CommitFailed:
            log.error("could not end the sessions of the connection from %s", self.peer)

    def _abandon(self, reason: str = "server storage failure") -> bytes:
        self.conn.abandon(reason)
        return self._process_events()

    def _process_events(self, max_output: float = math.inf, max_events: float = math.inf) -> bytes:
        """Handle every event ready now, or those until ``max_output`` bytes are queued or
        ``max_events`` were handled; return the bytes they queued. Runs inside a batch
        (:meth:`_commit`): output is taken from the core only here, so what a driver sends
        always belongs to a batch that has committed; output another connection's work queues
        here meanwhile waits for this connection's next batch."""
        conn = self.conn
        handled = 0
        while (
            conn.pending_output < max_output
            and handled < max_events
            and (event := conn.next_event()) is not NEED_DATA
        ):
            handled += 1
            assert isinstance(event, Event)
            if isinstance(event, ConnectionFailed):
                if event.remote and event.reason.startswith(_PEER_GOAWAY):
                    # The peer's own words, quoted: they may claim anything (even look like
                    # a log line), and a GOAWAY(MALFORMED) is its claim, not our finding.
                    log.info(
                        "connection from %s ended: the peer sent GOAWAY %s, its reason: %r",
                        self.peer,
                        event.code.name,
                        event.reason.removeprefix(_PEER_GOAWAY),
                        extra={"peer": self.peer, "event": "peer_goaway", "code": event.code.name},
                    )
                elif event.remote and event.code in ATTACK_CODES:
                    self._attack(event.code, event.reason)
                elif event.remote:
                    log.info("connection from %s ended: %r", self.peer, event.reason)
                elif event.code is ErrorCode.IDLE_TIMEOUT:
                    log.info("connection from %s closed: %s", self.peer, event.reason)
                continue
            if isinstance(event, SessionFailed) and event.code is ErrorCode.RATE_LIMITED:
                self.rate_limited += 1
                if self.metrics is not None:
                    self.metrics.throttled.labels("rate").inc()
                if self.rate_limited == 1:  # one line per connection, not one per attempt
                    log.warning(
                        "connection from %s is rate limited: %s",
                        self.peer,
                        event.reason,
                        extra={"peer": self.peer, "event": "rate_limited"},
                    )
            elif isinstance(event, SessionFailed) and event.remote and event.code in ATTACK_CODES:
                self._attack(event.code, event.reason)
            self._run_app(event)
        self._held_back = (conn.pending_output >= max_output or handled >= max_events) and conn.failed is None
        if self._held_back:
            self._signal()  # frames may be left: another turn once this output has gone
        for other in self.registry.take_woken():  # their drivers collect it in a later batch
            driver = _DRIVERS.get(other)
            if driver is not None and driver is not self:
                driver.wake()
        return conn.data_to_send()

    def _attack(self, code: ErrorCode, reason: str) -> None:
        """A session or connection ended for an attack code. The reason is quoted (%r): for
        an ABORT the peer sent, it is the peer's text."""
        if self.metrics is not None:
            self.metrics.attacks.labels(code.name).inc()
        if code is ErrorCode.UNKNOWN_SESSION:
            self._unknown_sessions += 1
            if self._unknown_sessions <= UNKNOWN_SESSIONS_AT_INFO:
                log.info(
                    "resumption from %s of a session this server does not hold (%r): normal after "
                    "a server crash or the session's expiry; the client logs in again",
                    self.peer,
                    reason,
                    extra={"peer": self.peer, "event": "unknown_session", "code": code.name},
                )
                return
        self.warn(code.name, "refused from %s: %s (%r)", code.name, reason, event="attack", code=code.name)

    def _turn(self, timer_due: bool) -> bytes:
        """One batch's work for this connection: the input buffered so far, the timers that
        are due, a graceful close when stopping."""
        conn = self.conn
        if timer_due:
            now = self.clock()
            conn.handle_timer(now)
            self._expire_detached(now)
        # A few bytes of requests can ask for megabytes of answers (a RETRIEVE of a 64 KiB secret
        # is 72 bytes): past max_output (or max_events) the rest waits in the core, and another
        # turn follows once this output has been sent (the peer has taken it in).
        output = self._process_events(self.max_output, self.max_events)
        if self._stopping and not self._held_back and conn.failed is None:
            conn.close("server shutting down")  # every request read has been answered
            output += self._process_events()
        # What the core still holds counts against max_unprocessed: the reader takes in no
        # more while the frames left for later fill it (nor anything once stopping).
        self._unprocessed = left = conn.pending_input
        if left < self.max_unprocessed and not self._stopping:
            self._room.set()  # (only a reader waiting for room looks at it)
            if self._consumer is not None and self._reader_failure is None:
                self._consumer.consumer = self._consume
        return output

    async def run(self) -> None:
        """Serve until the connection ends. A fault while serving it (a bug in the core or the
        application, a storage error the application did not handle) ends this connection
        only (NET-12): it is logged once with its traceback, ``faulted`` is set, every session
        of the connection ends unresumable (its state may be half-changed), and the stream is
        closed. It never reaches the caller, so one connection cannot end the server."""
        try:
            await self._serve()
        except Exception:
            self.faulted = True
            log.error("connection from %s ended by an internal error", self.peer, exc_info=True)
            try:  # logins cut short still count as failed (NET-10)
                await self._commit(lambda: self._abandon("internal error"))
            except Exception:  # the core is in a state nobody planned for; the stream still closes
                log.error("could not end the sessions of the connection from %s", self.peer)
        finally:
            try:
                self._report_warnings()
                await self._close_stream()
            finally:
                # The map's value holds the connection, its key: left there, every connection
                # ever served (its sessions, their handles, what the key server keys by
                # them, such as key-id reservations) would stay in memory for good (P4).
                _DRIVERS.pop(self.conn, None)

    async def _serve(self) -> None:
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._read)
                tasks.start_soon(self._timers)
                try:
                    await self._loop()
                except Exception as exc:  # re-raised below, not wrapped in an exception group
                    failure = exc
                tasks.cancel_scope.cancel()
        except BaseException:  # cancelled (shutdown grace over): detach what can be resumed
            await self._end_quietly()
            raise
        if isinstance(
            failure, anyio.BrokenResourceError | anyio.ClosedResourceError | anyio.EndOfStream | OSError
        ):
            log.info("connection from %s broke: %s", self.peer, type(failure).__name__)
        elif failure is not None:
            raise failure  # a fault: run() abandons the connection, no graceful detach
        await self._end_quietly()

    async def _end_quietly(self) -> None:
        """The transport is gone: established sessions detach, the rest end (and are audited)."""

        def work() -> bytes:
            # A submitted turn's batch that failed while the main loop could not deal with it
            # (cancelled while parked or settling): it ran before this work, and its
            # connection is abandoned, not detached (its reply caches hold uncommitted answers).
            if isinstance(self._fast_failure, CommitFailed) and self.conn.failed is None:
                log.error(
                    "group commit failed; abandoning the connection from %s: %s",
                    self.peer,
                    self._fast_failure,
                )
                self._fast_failure = None
                self.conn.abandon()
            if self.conn.failed is None:
                self.conn.connection_lost()
            return self._process_events()

        await self._commit(work)

    async def _close_stream(self) -> None:
        with anyio.CancelScope(shield=True):
            graceful = None
            if not self._stuck and not self.faulted:  # else a graceful close could wait on a full buffer
                with anyio.move_on_after(self.send_timeout) as graceful:
                    await self.stream.aclose()
            if graceful is None or graceful.cancelled_caught:
                await anyio.aclose_forcefully(self.stream)

    def _expire_detached(self, now: float) -> None:
        """Expire the registry's detached sessions and audit them. A failure here concerns no
        session of this connection: it is logged and the connection goes on."""
        try:
            expired = self.registry.handle_timer(now)
            if expired and self.on_expired is not None:
                self.on_expired(expired)
        except Exception:
            log.error("expiring detached sessions failed", exc_info=True)

    async def _read(self) -> None:
        """Receive until the peer closes, buffering everything in the core at once, also while
        a batch commits: the next batch takes all of it. Stops reading while more than
        ``max_unprocessed`` bytes wait for a batch (backpressure)."""
        conn = self.conn
        while True:
            while self._unprocessed >= self.max_unprocessed or self._stopping:
                self._room = anyio.Event()  # (stopping: nothing more is taken in)
                await self._room.wait()
            try:
                data = await self.stream.receive(self.receive_size)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                data = b""
            except Exception as exc:  # raised by the main loop as a fault
                self._reader_failed(exc)
                return
            try:
                now = self.clock()
                small = self._count_reads and 0 < len(data) < SMALL_PIECE_SIZE
                if data and self._tls_records is not None and not isinstance(self.stream, WebSocketStream):
                    self._tls_records.piece(len(data))  # (one TLS read: one record)
                spent = small and conn.note_small_input(1, now)
                conn.receive_data(data, now)
            except Exception as exc:
                self._reader_failed(exc)
                return
            self._unprocessed += len(data)
            if data and self._parked:
                self._arrived()
            else:
                self._signal()
            if not data:
                return
            if spent:  # the budget for unproductive input ran out: the next batch ends it
                await anyio.sleep_forever()

    async def _send(self, output: bytes) -> bool:
        """Send ``output``; False if the peer took longer than ``send_timeout`` to take it
        (the connection is then dropped). A FastTLSStream that takes it at once needs no
        timeout (no cancel scope, no timer)."""
        stream = self.stream
        if isinstance(stream, FastTLSStream):
            return stream.send_nowait(output) or await self._drain()
        try:
            with anyio.fail_after(self.send_timeout):
                await stream.send(output)
        except TimeoutError:
            return self._dropped()
        return True

    async def _drain(self) -> bool:
        """Wait for the FastTLSStream to drain; False if that took longer than ``send_timeout``."""
        assert isinstance(self.stream, FastTLSStream)
        try:
            with anyio.fail_after(self.send_timeout):
                await self.stream.drain()
        except TimeoutError:
            return self._dropped()
        return True

    def _dropped(self) -> bool:
        log.info("connection from %s dropped: it stopped reading", self.peer)
        self._stuck = True
        return False

    # ---------------------------------------------------------------- the batched path

    def _consume(self, data: bytes) -> None:
        """Records the FastTLSStream decrypted as they arrived, while the reader waits: what
        the reader does with what it receives, without its wake-up. Past ``max_unprocessed``
        the stream is told to stop (the reader takes over and waits for room); a batch's
        turn tells it to go on."""
        stream = self._consumer
        assert stream is not None
        try:
            self.conn.receive_data(data, self.clock())
        except Exception as exc:
            self._reader_failed(exc)
            return
        self._unprocessed += len(data)
        if self._unprocessed >= self.max_unprocessed:
            stream.consumer = None
        if self._parked:
            self._arrived()
        else:
            self._signal()

    def _reader_failed(self, exc: Exception) -> None:
        """Receiving failed (raised by the main loop as a fault): nothing more is taken in."""
        if self._consumer is not None:
            self._consumer.consumer = None
        self._reader_failure = exc
        self._signal()

    def _arrived(self) -> None:
        """Input arrived while the main loop is parked: a turn for it in the next batch."""
        if not self._in_flight:
            self._submit()
        elif not self._queued:  # the turn in flight ran before this input: another follows
            self._again = True

    def _submit(self) -> None:
        self._in_flight = self._queued = True
        self._again = False
        self.committer.submit(self._submitted_turn, self._turn_ended)

    def _submitted_turn(self) -> bytes:
        self._queued = False
        return self._turn(False)

    def _turn_ended(self, work: Work[bytes]) -> None:
        """A submitted turn's batch has ended (called on the loop, at the batch's end): send
        its output if it committed, then arm the timer and submit the next turn if input came
        meanwhile, or wake the main loop for anything else."""
        self._in_flight = False
        again, self._again = self._again, False
        try:
            self._send_submitted(work)
            if self._parked:  # (else the main loop was woken, or just now: it takes over)
                self._follow_up(again)
        except Exception as exc:  # a bug: raised by the main loop as a fault (not lost here)
            if self._fast_failure is None:
                self._fast_failure = exc
            self._signal()
        finally:
            settled, self._settled = self._settled, None
            if settled is not None:
                settled.set()

    def _follow_up(self, again: bool) -> None:
        """After a submitted turn, while parked: wake the main loop for a failed connection
        or a due deadline, else arm the timer and submit the next turn if input came."""
        conn = self.conn
        if conn.failed is not None:
            self._signal()
            return
        hint = conn.timer_hint()
        registry = self.registry.get_timer()
        deadline = math.inf if hint is None else hint
        if registry is not None and registry < deadline:
            deadline = registry
        if deadline <= self.clock():
            self._timer_fired = True
            self._signal()
            return
        self._arm(deadline)
        if again:
            self._submit()

    def _send_submitted(self, work: Work[bytes]) -> None:
        failure = work.failure if work.failure is not None else work.error
        if failure is not None:  # nothing of it is sent; the main loop deals with it
            self._fast_failure = failure if isinstance(failure, Exception) else RuntimeError(failure)
            self._signal()
            return
        output = work.result
        if not output:
            return
        assert isinstance(self.stream, FastTLSStream)
        try:
            sent = self.stream.send_nowait(output)
        except Exception as exc:  # the stream is broken or closed: raised by the main loop
            self._fast_failure = exc
            self._signal()
            return
        if not sent:  # the transport holds too much: the main loop waits for it to drain
            self._drain_owed = True
            self._signal()

    async def _settle(self) -> bool:
        """The main loop woke while parked: wait for a submitted turn still in flight and
        deal with what it left (a failed batch, a fault, a send that must drain); False if
        the connection ends."""
        if self._in_flight:
            settled = self._settled = anyio.Event()
            await settled.wait()
        failure, self._fast_failure = self._fast_failure, None
        if isinstance(failure, CommitFailed):
            with anyio.CancelScope(shield=True):
                await self._committed_nothing(failure)
        elif failure is not None:
            raise failure
        if self._drain_owed:
            self._drain_owed = False
            if not await self._drain():
                return False
        if self.conn.failed is not None:
            return False
        if self._reader_failure is not None:
            raise self._reader_failure
        return True

    async def _loop(self) -> None:
        conn = self.conn
        timer_due = False
        while True:
            self._input = anyio.Event()
            output = await self._commit(partial(self._turn, timer_due))
            timer_due = False
            if output and not await self._send(output):
                return
            if conn.failed is not None:
                return
            if self._reader_failure is not None:
                raise self._reader_failure
            # (the connection's hint: at or before its next deadline, without a look at every session)
            hint = conn.timer_hint()
            if self._input.is_set():  # input, a wake or a stop arrived meanwhile
                # A peer that never pauses must not keep this connection's deadlines from
                # being checked (no session for too long, a slow frame, a session's end).
                timer_due = hint is not None and hint <= self.clock() and not self._stopping
                self._timer_fired = False  # (a deadline it fired for is in the hint, or due below)
                continue
            deadlines = [t for t in (hint, self.registry.get_timer()) if t is not None]
            deadline = min(deadlines) if deadlines else math.inf
            if deadline <= self.clock():
                await anyio.lowlevel.checkpoint()
                timer_due = not self._stopping
                continue
            self._arm(deadline)
            batched = self._consumer is not None
            self._parked = batched
            try:
                await self._input.wait()
            finally:  # (also when cancelled: a turn in flight then submits no other)
                self._parked = False
            if batched and not await self._settle():
                return
            timer_due = self._timer_fired and not self._stopping
            self._timer_fired = False

    def _arm(self, deadline: float) -> None:
        """Have the timer task wake this connection at ``deadline`` (on self.clock). A later
        deadline than the one it sleeps for costs nothing now: it sleeps on when it wakes."""
        self._deadline = deadline
        if deadline < self._armed:
            self._rearm.set()

    async def _timers(self) -> None:
        """The connection's one timer: sleeps until the deadline the main loop armed last and
        wakes the loop if it is due then. The loop arms a deadline after each batch without
        a cancel scope or a timer of its own; under load the deadline stays the same or
        moves later (a session's deadline only moves later as it is used), so this task
        wakes about once per deadline, not once per batch."""
        while True:
            self._rearm = anyio.Event()
            deadline = self._armed = self._deadline
            if deadline == math.inf:
                await self._rearm.wait()
                continue
            with anyio.move_on_after(max(0.0, deadline - self.clock())):
                await self._rearm.wait()
                continue  # an earlier deadline was armed
            if self._deadline <= self.clock():  # (not moved later meanwhile)
                self._deadline = math.inf  # until the loop arms the next one
                self._timer_fired = True
                self._signal()


async def serve_stream(
    stream: ByteStream,
    setup: ServerSetup,
    app: ServerApp,
    registry: SessionRegistry,
    *,
    random: RandomSource = os.urandom,
    receive_size: int = 65536,
    on_expired: ExpiryHook | None = None,
    send_timeout: float = 30.0,
) -> None:
    """Serve one connection until the peer closes it or it fails; then close the stream.

    ``on_expired`` receives the (user_id, reason) of detached sessions the registry
    expired; by default the app's ``sessions_expired`` method, if it has one.
    ``send_timeout``: seconds the peer may leave what is sent unread before the
    connection is dropped (the key server's ``server.send_timeout``).
    """
    driver = ConnectionDriver(
        stream,
        setup,
        app,
        registry,
        random=random,
        receive_size=receive_size,
        on_expired=on_expired,
        send_timeout=send_timeout,
    )
    await driver.run()
