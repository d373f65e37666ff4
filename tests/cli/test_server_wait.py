"""`keymgmt-server wait`: a script can wait for a server it started in the background."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

SERVER = [sys.executable, "-m", "keymgmt.adapters.cli.server"]


def _init(tmp_path: Path, port: int) -> Path:
    subprocess.run(
        [*SERVER, "init", "--dir", str(tmp_path), "--port", str(port)], check=True, capture_output=True
    )
    return tmp_path / "keymgmt-server.toml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_wait_returns_once_the_port_accepts(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        config = _init(tmp_path, listener.getsockname()[1])
        result = subprocess.run([*SERVER, "wait", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_wait_gives_up_after_its_timeout_with_one_line(tmp_path: Path) -> None:
    config = _init(tmp_path, _free_port())
    result = subprocess.run(
        [*SERVER, "wait", "--config", str(config), "--timeout", "0.3"], capture_output=True, text=True
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("keymgmt-server: error: no key server accepted"), lines


def test_wait_refuses_a_bad_timeout_before_waiting(tmp_path: Path) -> None:
    config = _init(tmp_path, _free_port())
    for bad in ("soon", "0", "-1", "nan"):
        result = subprocess.run(
            [*SERVER, "wait", "--config", str(config), "--timeout", bad], capture_output=True, text=True
        )
        assert result.returncode == 1
        assert result.stderr.startswith("keymgmt-server: error: --timeout"), result.stderr
        assert "Traceback" not in result.stderr


def test_without_config_the_commands_read_the_file_init_writes_by_default(tmp_path: Path) -> None:
    port = _free_port()
    # `init` without --dir writes keymgmt-server/; `wait` (like serve, invite, backup) then finds it
    subprocess.run([*SERVER, "init", "--port", str(port)], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "keymgmt-server" / "keymgmt-server.toml").is_file()
    result = subprocess.run(
        [*SERVER, "wait", "--timeout", "0.2"], cwd=tmp_path, capture_output=True, text=True
    )
    assert f"127.0.0.1:{port} within" in result.stderr, result.stderr
    # KEYMGMT_CONFIG names another one
    other = _init(tmp_path / "other", _free_port())
    result = subprocess.run(
        [*SERVER, "wait", "--timeout", "0.2"],
        cwd=tmp_path,
        env={**os.environ, "KEYMGMT_CONFIG": str(other)},
        capture_output=True,
        text=True,
    )
    assert f"127.0.0.1:{port} within" not in result.stderr and "no key server accepted" in result.stderr
