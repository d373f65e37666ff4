"""The network runtime: a TLS 1.3 key server on TCP.

Both run on asyncio and on trio: they are written once against anyio, whose
TLS stream wraps the standard ``ssl`` module on either loop.

Server: accepts connections up to a limit, completes the TLS handshake within a
timeout (a plaintext, TLS 1.2 or otherwise failed handshake is logged and
dropped), then hands the stream to a :class:`ConnectionDriver`. With
``websocket_listen`` set, a second listener takes browsers: the same TLS 1.3 (the same
certificate, reloaded with it), then an HTTP upgrade to a WebSocket
(adapters/server/websocket.py), whose byte stream goes to the same driver; both
listeners share the connection limits, the per-address admission, the metrics and the
session registry, so a session resumes across them. ``shutdown()``
makes /healthz say 503, keeps serving for ``shutdown_delay`` seconds, then
stops accepting, lets every connection finish what it has received, sends GOAWAY,
waits for them (bounded), and closes the storage.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import (
    ByteStream,
    Listener,
    SocketAttribute,
    SocketListener,
    SocketStream,
    TaskGroup,
    TaskStatus,
)
from anyio.streams.stapled import MultiListener
from anyio.streams.tls import TLSStream

from keymgmt_proto import (
    SMALL_PIECE_SIZE,
    Admission,
    ServerConfig,
    ServerSetup,
    SessionRegistry,
    session_sealing_key,
)

from ..storage.base import Storage
from ..storage.sqlite import SQLiteStorage
from ..tls import PKIError, TLSRecordCounter, server_context
from ..websocket import WebSocketStream, max_message_size
from .admission import AddressLimits, address_key
from .app import DEFAULT_NAME_RESERVATION, DEFAULT_REAUTH_WINDOW, KeyServer, ThrottlePolicy
from .commit import GroupCommit
from .driver import ConnectionDriver, use_group_commit, wake_woken
from .invitations import InvitationAuthorizer
from .metrics import ServerMetrics, serve_ops
from .setupfile import load_server_setup_file
from .tlsfast import FastTLSStream, take_over
from .userrate import DEFAULT_USER_BURST, DEFAULT_USER_RATE, UserRequestRates
from .websocket import InputBudgetSpent, UpgradeRefusedError, accept_upgrade

__all__ = ["KeyServerRuntime", "ServerSettings", "open_storage"]

log = logging.getLogger("keymgmt.server")


@dataclass(eq=False, slots=True)
class _Slot:
    """One accepted connection, as the connection limit sees it."""

    key: str
    scope: anyio.CancelScope
    opened: float
    driver: ConnectionDriver | None = None  # once the TLS handshake is done

    @property
    def live(self) -> bool:
        return not self.scope.cancel_called

    @property
    def authenticated(self) -> bool:
        """Carries a logged-in session (a peer that proved a password)."""
        return self.driver is not None and self.driver.conn.authenticated_sessions > 0


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Everything ``keymgmt-server serve`` reads from its TOML file (see the README)."""

    storage_path: Path
    setup_path: Path
    cert_path: Path
    key_path: Path
    host: str = "127.0.0.1"
    port: int = 7443
    #: Server processes sharing the listening socket (``keymgmt-server serve``; 1 = this one).
    workers: int = 1
    #: The TLS handshake must finish within this many seconds.
    tls_handshake_timeout: float = 10.0
    #: A peer that leaves the server's bytes unread this long is dropped (its sessions detach).
    send_timeout: float = 30.0
    #: Open connections beyond this are refused.
    max_connections: int = 1000
    #: Open connections from one client address (an IPv6 /64) beyond this are refused (NET-13).
    max_connections_per_address: int = 64
    #: Registration, login and resumption starts per second from one client address...
    admission_rate: float = 20.0
    #: ...with this many allowed in a burst (NET-13).
    admission_burst: float = 100.0
    #: Requests a second one user's sessions may make on this process, all together...
    user_request_rate: float = DEFAULT_USER_RATE
    #: ...with this many allowed in a burst; past it: RATE_LIMITED, nothing done.
    user_request_burst: float = DEFAULT_USER_BURST
    #: Seconds between sweeps of the login-throttling records (KeyServer.maintain).
    maintenance_interval: float = 60.0
    #: Registration needs an invitation minted with ``keymgmt-server invite`` (REG-5).
    require_invitation: bool = False
    #: Seconds a deleted account's name stays reserved (nobody may register it meanwhile).
    name_reservation: float = DEFAULT_NAME_RESERVATION
    #: Seconds after its login a session may change the password or delete the account.
    reauth_window: float = DEFAULT_REAUTH_WINDOW
    #: Seconds between checks that the sessions held here still have their account's
    #: credentials: one whose password changed, or whose account was deleted, through another
    #: instance or worker ends within this, even if it sends nothing. 0: only at its next request.
    credentials_check: float = 5.0
    #: How long shutdown waits for connections to finish before cutting them.
    shutdown_grace: float = 10.0
    #: Seconds between SIGTERM and the graceful stop: /healthz says 503 while the TLS port
    #: still serves, so a load balancer takes the instance out before the port closes.
    shutdown_delay: float = 0.0
    protocol: ServerConfig = field(default_factory=ServerConfig)
    throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    #: A PostgreSQL connection string: use PostgreSQL (several instances) instead of SQLite.
    #: It may hold a password: never in the settings' repr.
    database_url: str | None = field(default=None, repr=False)
    #: The PostgreSQL schema holding the tables (one per deployment).
    database_schema: str = "keymgmt"
    #: (host, port) of the plain-HTTP /healthz and /metrics listener; None = none (the default).
    health_listen: tuple[str, int] | None = None
    #: (host, port) of the WebSocket (wss) listener for browsers; None = none (the default).
    websocket_listen: tuple[str, int] | None = None
    #: Origins (normalized: ``scheme://host[:port]``) whose pages may open a WebSocket.
    websocket_origins: frozenset[str] = frozenset()
    #: Seconds the HTTP upgrade request may take after the TLS handshake.
    websocket_upgrade_timeout: float = 10.0


def open_storage(settings: ServerSettings) -> Storage:
    """PostgreSQL when ``database_url`` is set, else the SQLite file at ``storage_path``."""
    if settings.database_url:
        from ..storage.postgres import PostgresStorage  # psycopg is needed only for PostgreSQL

        return PostgresStorage(settings.database_url, schema=settings.database_schema)
    return SQLiteStorage(settings.storage_path)


class KeyServerRuntime:
    """A key server process: storage, OPAQUE setup, TLS listener, connection drivers."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        storage: Storage | None = None,
        setup: ServerSetup | None = None,
        clock: Callable[[], float] | None = None,
        sockets: Sequence[socket.socket] = (),
        websocket_sockets: Sequence[socket.socket] = (),
    ) -> None:
        self.settings = settings
        #: Listening sockets bound by someone else (``serve --workers``): used instead of
        #: binding ``settings.host``/``settings.port``; the runtime closes them when it stops.
        self._sockets = tuple(sockets)
        #: The same for the WebSocket listener (instead of binding ``websocket_listen``).
        self._websocket_sockets = tuple(websocket_sockets)
        self.setup = setup if setup is not None else load_server_setup_file(settings.setup_path)
        self.ssl_context = server_context(settings.cert_path, settings.key_path)
        self.storage: Storage = storage if storage is not None else open_storage(settings)
        kwargs = {} if clock is None else {"clock": clock}
        authorizer = InvitationAuthorizer.from_setup(self.setup) if settings.require_invitation else None
        #: This server's Prometheus metrics (a registry of its own; served when health_listen is set).
        self.metrics = ServerMetrics()
        self.keyserver = KeyServer(
            self.storage,
            registration_authorizer=authorizer,
            throttle=settings.throttle,
            metrics=self.metrics,
            name_reservation=settings.name_reservation,
            reauth_window=settings.reauth_window,
            request_rates=UserRequestRates(settings.user_request_rate, settings.user_request_burst),
            **kwargs,  # type: ignore[arg-type]
        )
        # Detached sessions go to the storage's session store: they resume on any instance
        # sharing the database, and survive a restart of this one.
        self.registry = SessionRegistry(
            settings.protocol,
            store=self.storage.session_store,
            sealing_key=session_sealing_key(self.setup.to_bytes()),
            random=os.urandom,
            app_state=self.keyserver,  # its key-id reservations go with a session's sealed state
        )
        #: One group commit for every connection and background task of this server. Its
        #: commits that reach no fsync run on the event loop when this process alone writes
        #: the SQLite file (another writer's checkpoint could make such a commit start the
        #: WAL over, which syncs: see SQLiteStorage.commit_on_loop).
        loop_commits = self.storage if isinstance(self.storage, SQLiteStorage) else None
        if settings.workers > 1 or self._sockets:
            loop_commits = None
        self.committer = GroupCommit(
            self.keyserver.batch,
            observe=self.metrics.batch,
            begin=self.keyserver.begin_batch,
            loop_commits=loop_commits,
        )
        # Anything served beside the runtime over its storage (serve_stream, an app wrapping
        # its key server) joins this group commit.
        use_group_commit(self.keyserver, self.committer)
        #: Set when a request here deleted an account: its audit log is purged right after.
        self._purge_due = anyio.Event()
        self.keyserver.on_account_deleted = lambda: self._purge_due.set()
        self.port: int | None = None
        #: The port of the /healthz and /metrics listener once it listens.
        self.health_port: int | None = None
        #: The port of the WebSocket listener once it listens (None: no such listener).
        self.websocket_port: int | None = None
        #: WebSocket upgrades refused (origin, path, method, size, time) or closed early.
        self.upgrades_refused = 0
        self._drivers: set[ConnectionDriver] = set()
        self._open_connections = 0  # accepted, including those still in the TLS handshake
        self._stop = anyio.Event()
        self._hurry = anyio.Event()  # a second shutdown(): skip the rest of the delay
        self.connections_served = 0
        #: Connections ended by an internal error (NET-12); each is logged with its traceback.
        self.connection_faults = 0
        #: Connections and session starts per client address (NET-13).
        self.address_limits = AddressLimits(
            max_connections_per_address=settings.max_connections_per_address,
            rate=settings.admission_rate,
            burst=settings.admission_burst,
        )
        #: Connections refused before their TLS handshake (connection limits, shutdown).
        self.connections_refused = 0
        #: Connections closed to make room for an address holding fewer (see _make_room).
        self.connections_preempted = 0
        self._slots: dict[str, list[_Slot]] = {}
        self._warnings = _WarningThrottle()
        #: Accepted connections closed before they sent a byte (TCP health checks).
        self.connections_probed = 0
        self._serving = False
        #: Set when the shutdown delay is over: new connections are refused from then on.
        self._closing = False
        self.metrics.watch(self._gauges)

    def _gauges(self) -> list[tuple[str, str, dict[str, float]]]:
        live = len(self.registry) - self.registry.detached_count()
        return [
            (
                "keymgmt_open_connections",
                "Open connections (including TLS handshakes)",
                {"": self._open_connections},
            ),
            (
                "keymgmt_sessions",
                "Established sessions held by this process: live (on a connection) or detached",
                {"live": live, "detached": self.registry.detached_count()},
            ),
            (
                "keymgmt_serving",
                "1 while serving, 0 while starting, draining or stopped",
                {"": float(self.healthy)},
            ),
        ]

    @property
    def healthy(self) -> bool:
        """Serving and not shutting down (what /healthz answers)."""
        return self._serving and not self._stop.is_set()

    def reload_tls(self) -> bool:
        """Load the certificate and key again (SIGHUP): new connections use them, open ones
        keep theirs. A certificate that does not load is logged and the old one kept."""
        try:
            context = server_context(self.settings.cert_path, self.settings.key_path)
        except PKIError as exc:
            log.error("TLS certificate not reloaded, keeping the old one: %s", exc)
            return False
        self.ssl_context = context
        log.info("reloaded the TLS certificate %s", self.settings.cert_path)
        return True

    def __repr__(self) -> str:
        return f"<KeyServerRuntime {self.settings.host}:{self.port} {len(self._drivers)} connections>"

    def shutdown(self) -> None:
        """Begin a graceful shutdown (safe to call more than once; a second call while the
        shutdown delay runs ends the delay at once)."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``shutdown()``; reports the bound port through ``task_status``. A port
        that cannot be bound is an OSError naming the listener and its address, raised before
        anything is logged as listening."""
        ops: MultiListener[SocketStream] | None = None
        websocket: MultiListener[SocketStream] | None = None
        try:
            if self.settings.health_listen is not None:  # first: it is the one more likely taken
                ops_host, ops_port = self.settings.health_listen
                ops = await _bind("health listener", ops_host, ops_port)
            if self._websocket_sockets:
                websocket = MultiListener(
                    [await SocketListener.from_socket(s) for s in self._websocket_sockets]
                )
            elif self.settings.websocket_listen is not None:
                ws_host, ws_port = self.settings.websocket_listen
                websocket = await _bind("WebSocket listener", ws_host, ws_port)
            listener: MultiListener[SocketStream]
            if self._sockets:
                wrapped: list[Listener[SocketStream]] = [
                    await SocketListener.from_socket(s) for s in self._sockets
                ]
                listener = MultiListener(wrapped)
            else:
                listener = await _bind("TLS listener", self.settings.host, self.settings.port)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for other in (ops, websocket):
                    if other is not None:
                        await other.aclose()
            self.storage.close()
            raise
        self.port = port = int(listener.extra(SocketAttribute.local_port))
        log.info("listening on %s:%d (TLS 1.3)", self.settings.host, self.port)
        if websocket is not None:
            self.websocket_port = int(websocket.extra(SocketAttribute.local_port))
            listen = self.settings.websocket_listen
            ws_host = listen[0] if listen is not None else self.settings.host
            log.info(
                "WebSocket listener on wss://%s:%d%s (TLS 1.3; origins: %s)",
                ws_host,
                self.websocket_port,
                "/keymgmt",
                ", ".join(sorted(self.settings.websocket_origins)) or "none",
            )
        try:
            if ops is not None:
                self.health_port = int(ops.extra(SocketAttribute.local_port))
                log.info(
                    "health and metrics on http://%s:%d (/healthz, /metrics)", ops_host, self.health_port
                )
            async with anyio.create_task_group() as health:
                if ops is not None:
                    health.start_soon(serve_ops, ops.listeners, lambda: self.healthy, self.metrics)
                await self._serve(listener, websocket, port, task_status)
                health.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                for other in (ops, websocket):
                    if other is not None:
                        await other.aclose()
            self.storage.close()
            log.info("stopped")

    async def _serve(
        self,
        listener: MultiListener[SocketStream],
        websocket: MultiListener[SocketStream] | None,
        port: int,
        task_status: TaskStatus[int],
    ) -> None:
        async with anyio.create_task_group() as connections:
            async with anyio.create_task_group() as accepting:
                for each in listener.listeners:
                    assert isinstance(each, SocketListener)
                    accepting.start_soon(self._accept, each, connections, False)
                for each in websocket.listeners if websocket is not None else ():
                    assert isinstance(each, SocketListener)
                    accepting.start_soon(self._accept, each, connections, True)
                accepting.start_soon(self._expire_detached_sessions)
                accepting.start_soon(self._maintain)
                accepting.start_soon(self._purge_audit_logs)
                accepting.start_soon(self._check_credentials)
                task_status.started(port)
                self._serving = True
                await self._stop.wait()
                if self.settings.shutdown_delay > 0:
                    log.info(
                        "draining: /healthz says 503; still serving for %g s (server.shutdown_delay)",
                        self.settings.shutdown_delay,
                    )
                    with anyio.move_on_after(self.settings.shutdown_delay):
                        await self._hurry.wait()
                self._closing = True
                accepting.cancel_scope.cancel()
            log.info("shutting down: no new connections; finishing %d", len(self._drivers))
            for driver in list(self._drivers):
                driver.stop()
            # Also connections still in their TLS handshake or WebSocket upgrade: one that
            # finishes it from now on is stopped at once (_serve_tls), and whatever is not
            # done when the grace period ends is cut, so no peer holds the shutdown open.
            with anyio.move_on_after(self.settings.shutdown_grace) as grace:
                while self._open_connections:
                    await anyio.sleep(0.01)
            if grace.cancelled_caught:
                log.warning("shutdown grace period over; closing %d connections", self._open_connections)
                connections.cancel_scope.cancel()

    async def _accept(self, listener: SocketListener, connections: TaskGroup, websocket: bool) -> None:
        """Accept connections until cancelled. An accept that fails (out of file descriptors,
        a connection reset before it was taken) is logged and retried shortly: it never
        ends the server (NET-12)."""
        warned_at = -math.inf
        while True:
            try:
                tcp = await listener.accept()
            except OSError as exc:
                if time.monotonic() - warned_at > 10:  # one line per burst, not one per retry
                    warned_at = time.monotonic()
                    log.warning("accepting connections fails (%s); retrying", exc.strerror or exc)
                await anyio.sleep(0.05)
                continue
            connections.start_soon(self._handle, tcp, websocket)

    async def _expire_detached_sessions(self) -> None:
        """Expire (and audit) detached sessions even when no connection is open to do it."""

        def expire() -> None:
            expired = self.registry.handle_timer(time.time())
            if expired:
                self.keyserver.sessions_expired(expired)

        while True:
            deadline = self.registry.get_timer()
            await anyio.sleep(1.0 if deadline is None else min(60.0, max(0.0, deadline - time.time())))
            due = self.registry.get_timer()
            if due is None or due > time.time():
                continue  # nothing to expire: no batch (it would take the database's write lock)
            try:
                await self.committer.run(expire)
            except Exception:  # e.g. the database is briefly unreachable: try again later
                log.error("expiring detached sessions failed", exc_info=True)

    async def _maintain(self) -> None:
        """Sweep the login-throttling records now and then (NET-13), a batch at a time so the
        event loop stays responsive; a storage failure is logged and the sweep tried later."""
        while True:
            await anyio.sleep(self.settings.maintenance_interval)
            try:
                while await self.committer.run(lambda: self.keyserver.maintain(batch=1000)) == 1000:
                    await anyio.sleep(0)
            except Exception:
                log.error("sweeping login-throttling records failed", exc_info=True)

    async def _purge_audit_logs(self) -> None:
        """Delete the audit logs of deleted accounts (each deletion queues its log), at most
        ``AUDIT_PURGE_CHUNK`` entries per batch: other users' requests commit between the
        chunks, and none waits for a whole log. At startup (a log queued before a restart or
        a crash; on SQLite only if the file held one when opened), right after a deletion
        here, and every ``maintenance_interval`` (deletions through other instances or
        workers); a storage failure is logged and tried later."""
        # At startup only if the storage says a log is queued (SQLite, read as the file was
        # opened): a batch takes the write lock, and an idle server takes none.
        due = bool(getattr(self.storage, "audit_purges_queued", True))
        while True:
            self._purge_due = anyio.Event()
            if due:
                try:
                    while await self.committer.run(self.keyserver.purge_audit_logs) is not None:
                        await anyio.sleep(0)
                except Exception:
                    log.error("purging the audit logs of deleted accounts failed", exc_info=True)
            due = True
            with anyio.move_on_after(self.settings.maintenance_interval):
                await self._purge_due.wait()

    async def _check_credentials(self) -> None:
        """Now and then, end the sessions held here whose account's password changed, or that
        was deleted, elsewhere (another instance or worker; this process ends its own at once),
        so that they end within ``credentials_check`` seconds even if they send nothing: a
        request would end them anyway (docs/protocol.md section 12.13). The read runs in a
        worker thread on a connection of its own, outside the group commit: it takes no write
        lock and waits for no writer. A storage failure is logged and the check tried later; a
        storage that no other process can share (SQLite in memory) ends the check."""
        read = getattr(self.storage, "credentials_versions", None)
        if self.settings.credentials_check <= 0 or read is None:
            return
        while True:
            await anyio.sleep(self.settings.credentials_check)
            held = self.registry.credentials_held()
            if not held:
                continue
            try:
                current = await anyio.to_thread.run_sync(read, sorted({user for _, user, _ in held}))
            except Exception:
                log.error("checking the credentials of the sessions held failed", exc_info=True)
                continue
            if current is None:  # a storage no other process shares (SQLite in memory)
                return
            if self.keyserver.end_outdated_sessions(self.registry, held, current):
                wake_woken(self.registry)

    async def _handle(self, tcp: SocketStream, websocket: bool = False) -> None:
        """One connection, from accept to close. Whatever goes wrong stays here (NET-12)."""
        self._open_connections += 1
        try:
            await self._handle_connection(tcp, websocket)
        except Exception:
            self.connection_faults += 1
            log.error("connection handler failed", exc_info=True)
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(tcp)
        finally:
            self._open_connections -= 1

    async def _handle_connection(self, tcp: SocketStream, websocket: bool) -> None:
        address = tcp.extra(SocketAttribute.remote_address, None)
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        key = address_key(str(address[0]) if isinstance(address, tuple) else str(address))
        if self._closing:
            self._refuse(tcp, peer, "shutting down")
            await anyio.aclose_forcefully(tcp)
            return
        if self._open_connections > self.settings.max_connections and not self._make_room(key):
            self._refuse(tcp, peer, "connection limit")
            await anyio.aclose_forcefully(tcp)
            return
        bucket = self.address_limits.open(key)
        if bucket is None:
            self._refuse(tcp, peer, f"{self.settings.max_connections_per_address} connections from {key}")
            await anyio.aclose_forcefully(tcp)
            return
        slot = _Slot(key, anyio.CancelScope(), time.monotonic())
        self._slots.setdefault(key, []).append(slot)
        try:
            with slot.scope:
                await self._serve_tls(tcp, peer, bucket, slot, websocket)
            if slot.scope.cancelled_caught:
                with anyio.CancelScope(shield=True):
                    await anyio.aclose_forcefully(tcp)
        finally:
            slots = self._slots[key]
            slots.remove(slot)
            if not slots:
                del self._slots[key]
            self.address_limits.close(key)

    def _make_room(self, key: str) -> bool:
        """The server is full and a connection arrives from ``key``: fair shares (NET-13).

        First the connections that have proved nothing (no logged-in session): if some
        address holds more than one more of those than ``key`` does, its oldest such
        connection is closed. Otherwise, if some address holds more than one connection
        more than ``key`` does in all, the oldest connection of the heaviest one is closed
        (its sessions detach and stay resumable). Otherwise the newcomer is refused. So a
        few addresses cannot hold every slot: keeping everyone out takes as many addresses
        as there are slots, and logged-in users lose their connection only to an address
        holding fewer."""
        live = {k: [s for s in slots if s.live] for k, slots in self._slots.items()}
        unproven = {k: [s for s in slots if not s.authenticated] for k, slots in live.items()}
        victims = max(unproven.values(), key=len, default=[])
        if len(victims) <= len(unproven.get(key, ())) + 1:
            victims = max(live.values(), key=len, default=[])
            if len(victims) <= len(live.get(key, ())) + 1:
                return False
        victim = min(victims, key=lambda s: s.opened)
        victim.scope.cancel()
        self.connections_preempted += 1
        self._warnings.warn(
            "preempted", "closed a connection from %s to make room for %s (connection limit)", victim.key, key
        )
        return True

    def _refuse(self, tcp: SocketStream, peer: str, why: str) -> None:
        self.connections_refused += 1
        self.metrics.connections.labels("refused").inc()
        self._warnings.warn(why, "refused a connection from %s: %s", peer, why)

    async def _serve_tls(
        self, tcp: SocketStream, peer: str, bucket: Admission, slot: _Slot, websocket: bool
    ) -> None:
        counted = _CountingStream(tcp)
        try:
            with anyio.fail_after(self.settings.tls_handshake_timeout):
                stream = await TLSStream.wrap(
                    counted, server_side=True, ssl_context=self.ssl_context, standard_compatible=False
                )
        except TimeoutError:
            self._warnings.warn("tls timeout", "TLS handshake with %s timed out", peer)
            await anyio.aclose_forcefully(tcp)
            return
        except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, OSError) as exc:
            if not counted.received:
                # A load balancer's or monitor's TCP check: not a failed TLS handshake.
                self.connections_probed += 1
                self.metrics.connections.labels("probe").inc()
                log.debug("connection from %s closed before sending anything (a TCP check)", peer)
                await anyio.aclose_forcefully(tcp)
                return
            if not isinstance(exc, ssl.SSLError):
                self._warnings.warn(
                    "tls closed",
                    "TLS handshake with %s failed: connection closed (%s)",
                    peer,
                    type(exc).__name__,
                )
                await anyio.aclose_forcefully(tcp)
                return
            reason = exc.reason or type(exc).__name__
            self._warnings.warn(f"tls {reason}", "TLS handshake with %s failed: %s", peer, reason)
            await anyio.aclose_forcefully(tcp)
            return
        transport: ByteStream = stream
        if not websocket:
            transport = take_over(stream) or stream  # (anyio's own stream on trio)
        if not isinstance(transport, FastTLSStream):
            # anyio's TLS stream reads through `counted`, which counts the records as they
            # arrive: also those a TLS read handles without returning anything (KeyUpdate),
            # from the first behind the handshake, those before the end of an upgrade too.
            counted.handshake_done(stream, self.settings.protocol.unproductive_burst)
        if websocket:
            upgraded = await self._upgrade(stream, peer)
            if upgraded is None:
                return
            transport = upgraded
        driver = ConnectionDriver(
            transport,
            self.setup,
            self.keyserver,
            self.registry,
            peer=peer,
            admission=bucket,
            committer=self.committer,
            metrics=self.metrics,
            send_timeout=self.settings.send_timeout,
        )
        if not isinstance(transport, FastTLSStream):
            counted.charge_to(driver.count_tls_records(counted.records))
        self._drivers.add(driver)
        slot.driver = driver
        if self._closing:  # its handshake ended after the shutdown began: GOAWAY, not service
            driver.stop()
        self.connections_served += 1
        self.metrics.connections.labels("served").inc()
        log.info(
            "connection from %s (TLS 1.3%s)", peer, ", WebSocket" if websocket else "", extra={"peer": peer}
        )
        try:
            await driver.run()
        finally:
            self._drivers.discard(driver)
            if driver.faulted:
                self.connection_faults += 1
            if isinstance(transport, WebSocketStream) and transport.violation is not None:
                self.metrics.websocket_closed.labels(transport.close_code.name.lower()).inc()
                self._warnings.warn(
                    f"ws {transport.close_code.name}",
                    "closed the WebSocket from %s: %s (close code %d)",
                    peer,
                    transport.violation,
                    int(transport.close_code),
                )

    async def _upgrade(self, stream: TLSStream, peer: str) -> WebSocketStream | None:
        """The HTTP upgrade of a WebSocket connection, within ``websocket_upgrade_timeout``:
        the open WebSocket, or None once a refusal was answered (and logged) and the
        connection closed."""
        why: str
        try:
            with anyio.fail_after(self.settings.websocket_upgrade_timeout):
                upgraded = await accept_upgrade(
                    stream,
                    allowed_origins=self.settings.websocket_origins,
                    max_message=max_message_size(self.settings.protocol.max_payload),
                    control_timeout=self.settings.send_timeout,
                )
            self.metrics.websocket_upgrades.labels("accepted").inc()
            return upgraded
        except TimeoutError:
            result, why = "timeout", "upgrade request took too long"
        except UpgradeRefusedError as exc:
            result, why = (str(exc.status) if exc.status else "closed"), str(exc)
        self.upgrades_refused += 1
        self.metrics.websocket_upgrades.labels(result).inc()
        if result == "closed":  # the peer left (a TLS check): nothing refused
            log.info("WebSocket connection from %s %s", peer, why)
        else:
            self._warnings.warn(
                f"upgrade {result}", "refused a WebSocket upgrade from %s (%s): %s", peer, result, why
            )
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(1.0) as graceful:
                await stream.aclose()
            if graceful.cancelled_caught:
                await anyio.aclose_forcefully(stream)
        return None


async def _bind(what: str, host: str, port: int) -> MultiListener[SocketStream]:
    """A TCP listener on ``host``:``port``; an OSError that names ``what`` and the address."""
    try:
        return await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise OSError(exc.errno, f"{what} {host}:{port}: {exc.strerror or exc}") from None


class _CountingStream(ByteStream):
    """The TCP stream under a TLS stream, counting the bytes received (a connection that
    ends before its first byte was a TCP check, not a failed TLS handshake) and the TLS
    records: under anyio's TLS stream (not taken over by a FastTLSStream) the units they
    cost go to ``on_small_input`` (the driver's) as they arrive."""

    __slots__ = ("inner", "limit", "on_small_input", "received", "records", "unpaid")

    def __init__(self, inner: SocketStream) -> None:
        self.inner = inner
        self.received = 0
        self.records = TLSRecordCounter(SMALL_PIECE_SIZE)
        self.on_small_input: Callable[[int], bool] | None = None
        #: Units owed while nobody takes them yet (between the handshake and the driver: the
        #: records behind the handshake, those of a WebSocket upgrade); past ``limit`` the
        #: stream breaks. None: the handshake's records, not charged.
        self.limit: int | None = None
        self.unpaid = 0

    def handshake_done(self, tls: TLSStream, limit: int) -> None:
        """The TLS handshake over this stream ended: its records cost nothing, every record
        after it does, including those already read behind it (in ``tls``'s read BIO, whole
        records from a boundary: OpenSSL reads one record at a time). Until
        :meth:`charge_to`, at most ``limit`` units (the budget's burst) are owed: past them
        the stream breaks, so a peer cannot send KeyUpdates for free while its WebSocket
        upgrade request is awaited."""
        self.records = TLSRecordCounter(SMALL_PIECE_SIZE)
        bio = getattr(tls, "_read_bio", None)
        if isinstance(bio, ssl.MemoryBIO) and bio.pending:
            early = bio.read()
            bio.write(early)
            self.records.note(early)
        self.limit = limit
        self.unpaid = self.records.owed()

    def charge_to(self, on_small_input: Callable[[int], bool]) -> None:
        """From now on the units go to ``on_small_input`` (the driver's), starting with
        those owed since the handshake."""
        self.on_small_input = on_small_input
        owed = self.unpaid + self.records.owed()
        self.unpaid = 0
        if owed:
            on_small_input(owed)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self.inner.receive(max_bytes)
        self.received += len(data)
        self.records.note(data)
        if self.limit is not None:
            owed = self.records.owed()
            if not owed:
                pass
            elif self.on_small_input is not None:
                if self.on_small_input(owed):
                    # The budget ran out and the connection ends (the driver says GOAWAY):
                    # nothing more is read, as from a WebSocket or a FastTLSStream. (Returned,
                    # this would let anyio's TLS stream go on taking in records that return
                    # nothing, KeyUpdates, until the connection closed.)
                    await anyio.sleep_forever()
            else:
                self.unpaid += owed
                if self.unpaid > self.limit:
                    raise InputBudgetSpent("too much input that does nothing before the driver")
        return data

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.inner.extra_attributes


class _WarningThrottle:
    """At most one warning line per kind every ``interval`` seconds, with a count of the
    ones left out: a flood of refused connections must not become a flood of log lines."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(kind, (-math.inf, 0))
        if now - last < self.interval:
            self._last[kind] = (last, suppressed + 1)
            return
        if len(self._last) > 1000:  # kinds come from a fixed set of reasons; stay bounded anyway
            self._last.clear()
        self._last[kind] = (now, 0)
        if suppressed:
            log.warning(message + " (and %d more like it)", *args, suppressed)
        else:
            log.warning(message, *args)
