"""A key server as a child process (real CLI, or tests/support/serve_backend.py for a chosen backend).

Shared by the durability and load tests: create the server's files once with
``keymgmt-server init``, start ``serve`` (port 0; the port is read from the
"listening on HOST:PORT" line), read its memory from /proc, stop it with
SIGTERM or kill it with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SERVER = [sys.executable, "-m", "keymgmt.adapters.cli.server"]
BACKEND_SCRIPT = Path(__file__).with_name("serve_backend.py")
CONFIG_NAME = "keymgmt-server.toml"


def init_server_dir(directory: Path) -> Path:
    """``keymgmt-server init --dir DIRECTORY --port 0``; returns the directory."""
    subprocess.run(
        [*SERVER, "init", "--dir", str(directory), "--port", "0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return directory


def _limit_open_files(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


class ServerProcess:
    """One running server. ``backend=None`` runs the real ``keymgmt-server serve`` (asyncio);
    ``"asyncio"``/``"trio"`` run tests/support/serve_backend.py on that backend. ``args``
    are added to the command line (e.g. ``("--workers", "2")``). ``program`` replaces the
    ``keymgmt-server serve`` command (e.g. ``python -m keymgmt.adapters.conformance
    broken-server VARIANT``); the ``serve`` arguments follow it."""

    def __init__(
        self,
        directory: Path,
        *,
        backend: str | None = None,
        log_level: str = "INFO",
        env: dict[str, str] | None = None,
        start_timeout: float = 30.0,
        max_open_files: int | None = None,
        args: tuple[str, ...] = (),
        program: list[str] | None = None,
    ) -> None:
        self.directory = directory
        config = str(directory / CONFIG_NAME)
        if program is not None:
            command = [*program, "--config", config]
        elif backend is None:
            command = [*SERVER, "serve", "--config", config]
        else:
            command = [sys.executable, str(BACKEND_SCRIPT), "--backend", backend, "--config", config]
        self.proc = subprocess.Popen(
            [*command, "--log-level", log_level, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            preexec_fn=None if max_open_files is None else lambda: _limit_open_files(max_open_files),
        )
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        line = self._first_line(start_timeout)
        if not line.startswith("listening on "):
            self.kill()
            raise RuntimeError(f"server did not start: {line!r}\n{''.join(self.log)}")
        self.port = int(line.rsplit(":", 1)[1])

    def _first_line(self, timeout: float) -> str:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return result[0] if result else "(no output within the start timeout)"

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        """The server's resident set size (VmRSS from /proc/PID/status) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def stop(self, timeout: float = 30.0) -> int:
        """Graceful stop (SIGTERM); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=5)

    def log_text(self) -> str:
        time.sleep(0)  # let the reader thread run
        return "".join(self.log)
