"""``keymgmt-server serve --workers N``: N server processes sharing one listening socket.

The parent binds the listening socket(s) once and starts N worker processes, each a
plain ``keymgmt-server serve`` that inherits the socket (``--listen-fd``) instead of
binding its own; the kernel hands each new connection to whichever worker accepts
it first, so an idle worker takes it and a busy or stuck one takes fewer. The
workers share nothing but the socket and the database: detached sessions are in the
database's session store, so a session detached on one worker resumes on another.

Why an inherited socket rather than SO_REUSEPORT: the port is known before any worker
starts (port 0 works), connections wait in one accept queue (with SO_REUSEPORT the
kernel hashes each connection to one socket, and a worker that dies loses the
connections queued on its socket), and it needs no platform-specific option.

The parent only supervises: SIGTERM or SIGINT is passed on to every worker (each
finishes its connections, sends GOAWAY and exits), a worker that exits on its own is
restarted after a back-off that doubles, and when workers keep dying the parent stops
the others and exits 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

__all__ = ["RestartPolicy", "WorkerPool", "bind_listeners"]

log = logging.getLogger("keymgmt.workers")

#: Builds a worker's command line from the listening sockets' file descriptors.
WorkerCommand = Callable[[Sequence[int]], list[str]]


def bind_listeners(host: str, port: int, backlog: int = 4096) -> list[socket.socket]:
    """Listening TCP sockets for ``host`` (every address it resolves to) on ``port``; with
    port 0 the first socket picks a free port and the others take the same one."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@dataclass
class RestartPolicy:
    """When to restart a worker that exited on its own, and when to give up.

    Each unexpected exit within ``window`` seconds of the previous ones doubles the wait
    before the restart (``first_delay``, at most ``max_delay``); more than
    ``max_failures`` of them within ``window`` means the workers keep dying."""

    first_delay: float = 0.1
    max_delay: float = 5.0
    window: float = 60.0
    max_failures: int = 5
    _failures: list[float] = field(default_factory=list)

    def failed(self, now: float) -> float | None:
        """A worker died at ``now``: seconds to wait before restarting it, or None to give up."""
        self._failures = [t for t in self._failures if now - t < self.window] + [now]
        if len(self._failures) > self.max_failures:
            return None
        delay: float = self.first_delay * 2.0 ** (len(self._failures) - 1)
        return min(self.max_delay, delay)


@dataclass(eq=False)
class _Worker:
    """One worker slot: the running process, or the time it is to be started again."""

    number: int
    process: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None


class WorkerPool:
    """Starts ``count`` workers on ``sockets`` and supervises them until a signal (see the
    module's docstring). ``run()`` returns the exit code for ``keymgmt-server``."""

    def __init__(
        self,
        count: int,
        command: WorkerCommand,
        sockets: Sequence[socket.socket],
        *,
        policy: RestartPolicy | None = None,
        ready_timeout: float = 60.0,
        stop_timeout: float = 30.0,
        poll_interval: float = 0.1,
    ) -> None:
        self.count = count
        self.command = command
        self.sockets = tuple(sockets)
        self.policy = policy if policy is not None else RestartPolicy()
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.poll_interval = poll_interval
        self.workers = [_Worker(n) for n in range(count)]
        #: Workers started after an unexpected exit.
        self.restarts = 0
        self._signal: int | None = None

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.process is not None]

    def _start(self, worker: _Worker) -> None:
        fds = [s.fileno() for s in self.sockets]
        # Their own process group: a terminal's Ctrl-C reaches the parent alone, which
        # passes one SIGTERM on to each worker.
        worker.process = subprocess.Popen(  # noqa: S603 - this package's own command line
            self.command(fds),
            pass_fds=fds,
            stdout=subprocess.PIPE,
            process_group=0,
            # its number: worker K serves its health listener on the configured port + K
            env={**os.environ, "KEYMGMT_WORKER_NUMBER": str(worker.number)},
        )
        worker.restart_at = None
        log.info("started worker %d (pid %d)", worker.number, worker.process.pid)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._signal is None:
            self._signal = signum
            return
        # A further one is passed on at once: it ends the workers' server.shutdown_delay.
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _on_hangup(self, signum: int, _frame: FrameType | None) -> None:
        """SIGHUP: each worker reloads its TLS certificate."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def run(self, announce: Callable[[], None] = lambda: None) -> int:
        """Start the workers, call ``announce`` once every one listens, supervise until
        SIGTERM or SIGINT, stop them; 0 if all stopped cleanly."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        try:
            for worker in self.workers:
                self._start(worker)
            if not self._wait_ready():
                self._stop_all()
                return 1
            announce()
            code = self._supervise()
            return self._stop_all() if code == 0 else code
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for sock in self.sockets:
                sock.close()

    def _wait_ready(self) -> bool:
        """Every worker's first line on stdout ("listening on ...") within ready_timeout."""
        waiting = {w.process.stdout: w for w in self.workers if w.process is not None and w.process.stdout}
        deadline = time.monotonic() + self.ready_timeout
        with selectors.DefaultSelector() as selector:
            for pipe in waiting:
                selector.register(pipe, selectors.EVENT_READ)
            while waiting and self._signal is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("%d worker(s) did not start within %.0f s", len(waiting), self.ready_timeout)
                    return False
                for key, _ in selector.select(min(left, self.poll_interval)):
                    worker = waiting.pop(key.fileobj)  # type: ignore[call-overload]
                    selector.unregister(key.fileobj)
                    assert worker.process is not None
                    assert worker.process.stdout is not None
                    line = worker.process.stdout.readline()
                    if not line.startswith(b"listening on "):
                        worker.process.wait()
                        # A worker that cannot start writes "error: CAUSE" where "listening
                        # on" would be (keymgmt-server's main).
                        cause = line.decode("utf-8", "replace").strip().removeprefix("error: ")
                        log.error(
                            "worker %d (pid %d) failed to start (%s): %s",
                            worker.number,
                            worker.process.pid,
                            _describe(worker.process.returncode),
                            cause or "no reason given (see its log lines)",
                        )
                        return False
        return self._signal is None

    def _supervise(self) -> int:
        """Restart workers that exit until a signal arrives (0), or give up (1)."""
        while self._signal is None:
            time.sleep(self.poll_interval)
            now = time.monotonic()
            for worker in self.workers:
                if worker.process is not None and worker.process.poll() is not None:
                    if self._signal is not None:
                        break  # it exited because of the signal (a group-wide one): not a failure
                    delay = self.policy.failed(now)
                    log.warning(
                        "worker %d (pid %d) exited unexpectedly (%s)%s",
                        worker.number,
                        worker.process.pid,
                        _describe(worker.process.returncode),
                        "" if delay is None else f"; restarting it in {delay:.1f} s",
                    )
                    self._close(worker)
                    if delay is None:
                        log.error(
                            "workers keep dying (%d exits within %.0f s): stopping",
                            self.policy.max_failures + 1,
                            self.policy.window,
                        )
                        self._stop_all()
                        return 1
                    worker.restart_at = now + delay
                if worker.process is None and worker.restart_at is not None and worker.restart_at <= now:
                    self._start(worker)
                    self.restarts += 1
        log.info("received %s: stopping %d workers", signal.Signals(self._signal).name, len(self.pids()))
        return 0

    def _stop_all(self) -> int:
        """SIGTERM to every worker, wait (bounded), SIGKILL what is left; 0 if all exited 0."""
        running = [w for w in self.workers if w.process is not None]
        for worker in running:
            assert worker.process is not None
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        clean = True
        for worker in running:
            assert worker.process is not None
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(
                    "worker %d (pid %d) did not stop in time: killing it", worker.number, worker.process.pid
                )
                worker.process.kill()
                worker.process.wait()
            if worker.process.returncode != 0:
                clean = False
                log.error(
                    "worker %d (pid %d) stopped with %s",
                    worker.number,
                    worker.process.pid,
                    _describe(worker.process.returncode),
                )
            self._close(worker)
        if running:
            log.info("all workers stopped")
        return 0 if clean else 1

    @staticmethod
    def _close(worker: _Worker) -> None:
        if worker.process is not None and worker.process.stdout is not None:
            worker.process.stdout.close()
        worker.process = None


def _describe(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"
