"""Fixtures for the CLI tests: a fresh server directory (`keymgmt-server init`) and a running
key server on it."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.cli import SERVER, ServerProcess


@pytest.fixture
def server_dir(tmp_path):
    result = subprocess.run(
        [*SERVER, "init", "--dir", str(tmp_path / "srv"), "--port", "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "created" in result.stdout
    return tmp_path / "srv"


@pytest.fixture
def server(server_dir):
    process = ServerProcess(server_dir)
    yield process
    if process.proc.poll() is None:
        assert process.stop() == 0
