"""The CLIs as subprocesses: a key-server process over loopback TLS 1.3 and a `keymgmt`
runner (tests/cli)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

BIN = Path(sys.executable).parent
SERVER = [sys.executable, "-m", "keymgmt.adapters.cli.server"]
CLIENT = [sys.executable, "-m", "keymgmt.adapters.cli.client"]


class ServerProcess:
    def __init__(self, directory: Path, env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.proc = subprocess.Popen(
            [*SERVER, "serve", "--config", str(directory / "keymgmt-server.toml"), "--log-level", "DEBUG"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line + self.proc.stderr.read()
        self.port = int(line.rsplit(":", 1)[1])
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=20)
        self._reader.join(timeout=5)
        return code


def run_client(server, tmp_path, *args, password="hunter2 but longer", account="alice@example.org", ca=None):
    env = {
        **os.environ,
        "KEYMGMT_SERVER": f"127.0.0.1:{server.port}",
        "KEYMGMT_CA": str(ca or server.directory / "ca.pem"),
        "KEYMGMT_ACCOUNT": account,
        "KEYMGMT_LOCAL_STORE": str(tmp_path / "client" / "local.db"),
    }
    return subprocess.run(
        [*CLIENT, *args], input=f"{password}\n", capture_output=True, text=True, env=env, timeout=60
    )


def client_env(port: int, ca: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "KEYMGMT_SERVER": f"127.0.0.1:{port}",
        "KEYMGMT_CA": str(ca),
        "KEYMGMT_ACCOUNT": "alice@example.org",
        "KEYMGMT_LOCAL_STORE": str(tmp_path / "client" / "local.db"),
        **extra,
    }
