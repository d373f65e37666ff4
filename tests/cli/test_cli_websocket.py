"""``keymgmt --server wss://HOST:PORT``: the command line through the key server's
WebSocket listener (the server as a subprocess, real TLS 1.3 on loopback)."""

from __future__ import annotations

import os
import socket
import subprocess

from tests.support.cli import CLIENT, ServerProcess, run_client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_cli_stores_and_reads_over_wss_and_a_refused_origin_is_exit_6(server_dir, tmp_path):
    port = _free_port()
    env = {
        "KEYMGMT_WEBSOCKET_LISTEN": f"127.0.0.1:{port}",
        # The CLI's Origin is the key server's own (https://HOST:PORT).
        "KEYMGMT_WEBSOCKET_ALLOWED_ORIGINS": f"https://127.0.0.1:{port}",
    }
    server = ServerProcess(server_dir, env=env)
    try:
        wss = {"KEYMGMT_SERVER": f"wss://127.0.0.1:{port}"}

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            result = run_client(server, tmp_path, *args)
            assert result.returncode == 0, result.stderr
            return result

        assert run_client(server, tmp_path, "register").returncode == 0  # over TCP
        via_wss = subprocess.run(
            [*CLIENT, "import", "--hex", "68656c6c6f"],
            input="hunter2 but longer\n",
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                **wss,
                "KEYMGMT_CA": str(server_dir / "ca.pem"),
                "KEYMGMT_ACCOUNT": "alice@example.org",
                "KEYMGMT_LOCAL_STORE": str(tmp_path / "wss-client" / "local.db"),
            },
        )
        assert via_wss.returncode == 0, via_wss.stderr
        key_id = via_wss.stdout.strip()
        assert run("export", key_id).stdout.strip() == "0568656c6c6f"  # read back over TCP
        assert any("connection from 127.0.0.1" in line and "WebSocket" in line for line in server.log)
    finally:
        assert server.stop() == 0
    # A key server that does not allow the CLI's origin: no upgrade, exit 6 with the status.
    env["KEYMGMT_WEBSOCKET_ALLOWED_ORIGINS"] = "https://app.example.org"
    server = ServerProcess(server_dir, env=env)
    try:
        refused = subprocess.run(
            [*CLIENT, "list"],
            input="hunter2 but longer\n",
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                **wss,
                "KEYMGMT_CA": str(server_dir / "ca.pem"),
                "KEYMGMT_ACCOUNT": "alice@example.org",
                "KEYMGMT_LOCAL_STORE": str(tmp_path / "wss-client" / "local.db"),
            },
        )
        assert refused.returncode == 6, refused.stderr
        assert "403 Forbidden" in refused.stderr, refused.stderr
    finally:
        assert server.stop() == 0


def test_a_malformed_wss_address_is_a_usage_error(tmp_path):
    result = subprocess.run(
        [*CLIENT, "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KEYMGMT_SERVER": "wss://nohost", "KEYMGMT_ACCOUNT": "a"},
    )
    assert result.returncode == 2
    assert "must be HOST:PORT or wss://HOST:PORT" in result.stderr
