"""Drive one ServerConnection over any anyio byte stream (asyncio or trio).

Reads only when the core needs data, writes what ``data_to_send()`` returns,
and wakes for the core's next deadline with one timer. ``stop()`` ends the
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
from weakref import WeakKeyDictionary

import anyio
from anyio.abc import ByteStream

from keymgmt_proto import (
    NEED_DATA,
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

from ..storage.base import StorageError

__all__ = ["ConnectionDriver", "serve_stream"]

log = logging.getLogger("keymgmt.server")

ServerApp = Callable[[ServerConnection, Event], None]
ExpiryHook = Callable[[Sequence[ExpiredSession]], None]

#: The driver of each live server connection, so that a driver whose work changed another
#: connection (SessionRegistry.take_woken) can wake that connection's driver.
_DRIVERS: WeakKeyDictionary[ServerConnection, ConnectionDriver] = WeakKeyDictionary()


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
        self._receive_scope: anyio.CancelScope | None = None
        #: Set when another connection's work queued output here or changed its deadlines.
        self._woken = False
        _DRIVERS[self.conn] = self

    def wake(self) -> None:
        """Another connection changed this one (a session moved away, or an answer for a
        session now here was queued): send its output and recompute its timer now."""
        self._woken = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    def _wake_others(self) -> None:
        for conn in self.registry.take_woken():
            driver = _DRIVERS.get(conn)
            if driver is not None and driver is not self:
                driver.wake()

    def stop(self) -> None:
        """Finish what was received, say GOAWAY and close (graceful shutdown)."""
        self._stopping = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    def _run_app(self, event: Event) -> None:
        try:
            self.app(self.conn, event)
        except Exception:  # one bad event must not take the other sessions down
            log.exception("server application failed on %s", type(event).__name__)

    def _process(self) -> None:
        """Handle every event ready now, as one group commit when the app offers batch():
        the output they produce is sent only after the commit; if it fails, the connection is
        abandoned (nothing sent, its sessions ended) so no uncommitted answer is ever seen."""
        batch = getattr(self.app, "batch", None)
        try:
            if batch is None:
                self._process_events()
                return
            try:
                with batch():
                    self._process_events()
            except StorageError as exc:
                log.error("group commit failed; abandoning the connection from %s: %s", self.peer, exc)
                self.conn.abandon()
                self._process_events()
        finally:
            self._wake_others()

    def _process_events(self) -> None:
        while (event := self.conn.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            if isinstance(event, ConnectionFailed):
                if event.remote:
                    log.info("connection from %s ended: %s", self.peer, event.reason)
                elif event.code is ErrorCode.IDLE_TIMEOUT:
                    log.info("connection from %s closed: %s", self.peer, event.reason)
                continue
            if isinstance(event, SessionFailed) and event.code is ErrorCode.RATE_LIMITED:
                self.rate_limited += 1
                if self.rate_limited == 1:  # one line per connection, not one per attempt
                    log.warning("connection from %s is rate limited: %s", self.peer, event.reason)
            self._run_app(event)

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
            try:
                self.conn.abandon("internal error")
                self._process_events()  # logins cut short still count as failed (NET-10)
            except Exception:  # the core is in a state nobody planned for; the stream still closes
                log.error("could not end the sessions of the connection from %s", self.peer)
        finally:
            await self._close_stream()

    async def _serve(self) -> None:
        try:
            await self._loop()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.info("connection from %s broke: %s", self.peer, type(exc).__name__)
        except Exception:
            raise  # a fault: run() abandons the connection, no graceful detach
        except BaseException:  # cancelled (shutdown grace over): detach what can be resumed
            self._end_quietly()
            raise
        self._end_quietly()

    def _end_quietly(self) -> None:
        """The transport is gone: established sessions detach, the rest end (and are audited)."""
        if self.conn.failed is None:
            self.conn.connection_lost()
        self._process()

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

    async def _loop(self) -> None:
        conn = self.conn
        while True:
            self._process()
            if self._stopping and conn.failed is None:
                conn.close("server shutting down")
                self._process()
            output = conn.data_to_send()
            if output:
                try:
                    with anyio.fail_after(self.send_timeout):
                        await self.stream.send(output)
                except TimeoutError:
                    log.info("connection from %s dropped: it stopped reading", self.peer)
                    self._stuck = True
                    return
            if conn.failed is not None:
                return
            if self._woken:  # output or deadlines changed while this driver was busy
                self._woken = False
                continue
            deadlines = [t for t in (conn.get_timer(), self.registry.get_timer()) if t is not None]
            wait = max(0.0, min(deadlines) - self.clock()) if deadlines else math.inf
            data: bytes | None = None
            with anyio.CancelScope(deadline=anyio.current_time() + wait) as scope:
                self._receive_scope = scope
                try:
                    data = await self.stream.receive(self.receive_size)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    data = b""
            self._receive_scope = None
            now = self.clock()
            if data is not None:
                conn.receive_data(data, now)
            elif not self._stopping:
                conn.handle_timer(now)
                self._expire_detached(now)


async def serve_stream(
    stream: ByteStream,
    setup: ServerSetup,
    app: ServerApp,
    registry: SessionRegistry,
    *,
    random: RandomSource = os.urandom,
    receive_size: int = 65536,
    on_expired: ExpiryHook | None = None,
) -> None:
    """Serve one connection until the peer closes it or it fails; then close the stream.

    ``on_expired`` receives the (user_id, reason) of detached sessions the registry
    expired; by default the app's ``sessions_expired`` method, if it has one.
    """
    driver = ConnectionDriver(
        stream, setup, app, registry, random=random, receive_size=receive_size, on_expired=on_expired
    )
    await driver.run()
