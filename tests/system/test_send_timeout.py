"""A peer that stops reading is dropped after ``server.send_timeout`` on the real server,
over TCP and over the WebSocket: a driver stuck sending runs no timers, so without the
limit one connection would hold its sessions, its slot and its unsent answers for as long
as it likes. The attacker fills the pipe with frames that each draw an ABORT and never
reads. The default limit is 30 s: a drop within 15 s shows the setting took effect."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest

from keymgmt.adapters.tls import client_context
from keymgmt_proto import FrameType
from keymgmt_proto.wire import REGISTRATION_REQUEST_SIZE, RegStart

from ..support.frames import forge
from ..support.server_proc import ServerProcess, init_server_dir
from ..support.ws_client import ORIGIN, upgrade_request
from .test_websocket_attacks import client_frame

#: Refused frames spend the budget for unproductive input, which would end the connection
#: first (GOAWAY LIMIT_EXCEEDED); the admission bucket would refuse the openings instead.
ENV = {
    "KEYMGMT_SEND_TIMEOUT": "1",
    "KEYMGMT_UNPRODUCTIVE_BURST": "100000000",
    "KEYMGMT_ADMISSION_RATE": "1000000",
    "KEYMGMT_ADMISSION_BURST": "1000000",
}
DROPPED = ("dropped: it stopped reading", "took no control frame")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _connect(port: int, ca: Path, websocket: bool) -> ssl.SSLSocket:
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (a small window fills fast)
    raw.connect(("127.0.0.1", port))
    tls = client_context(ca).wrap_socket(raw, server_hostname="localhost")
    if websocket:
        tls.sendall(upgrade_request())
        assert tls.recv(4096).startswith(b"HTTP/1.1 101 ")
    tls.settimeout(0.2)
    return tls


@pytest.mark.parametrize("listener", ["tcp", "wss"])
def test_a_peer_that_stops_reading_is_dropped_after_send_timeout(tmp_path: Path, listener: str) -> None:
    directory = init_server_dir(tmp_path / "srv")
    env = dict(ENV)
    if listener == "wss":
        ws_port = _free_port()
        env.update(KEYMGMT_WEBSOCKET_LISTEN=f"127.0.0.1:{ws_port}", KEYMGMT_WEBSOCKET_ALLOWED_ORIGINS=ORIGIN)
    server = ServerProcess(directory, env=env)
    dropped = False
    try:
        port = ws_port if listener == "wss" else server.port
        tls = _connect(port, directory / "ca.pem", websocket=listener == "wss")
        refused = RegStart(b" not a valid name ", bytes(REGISTRATION_REQUEST_SIZE)).encode()
        session_id, deadline = 1, time.monotonic() + 15
        while time.monotonic() < deadline and not dropped:
            burst = b"".join(forge(FrameType.REG_START, session_id + 2 * i, refused) for i in range(64))
            session_id += 128
            try:
                tls.sendall(client_frame(0x2, burst) if listener == "wss" else burst)
            except (TimeoutError, ssl.SSLWantWriteError, OSError):
                time.sleep(0.1)  # the server reads no more (its send is stuck), or dropped us
            dropped = any(line in server.log_text() for line in DROPPED)
        tls.close()
    finally:
        assert server.stop() == 0
    assert dropped, server.log_text()[-2000:]


@pytest.mark.anyio
async def test_the_websocket_control_frames_take_the_same_limit(tmp_path: Path) -> None:
    """A WebSocket's pongs and close frames are bounded by ``send_timeout`` too (the
    attack itself: tests/system/test_websocket_attacks.py, on the stream)."""
    import anyio

    from ..support.ws_client import open_websocket
    from .test_websocket import wss_server

    async with wss_server(tmp_path, send_timeout=0.7) as (runtime, pki):
        assert runtime.websocket_port is not None
        ws = await open_websocket(runtime.websocket_port, pki.ca_cert)
        with anyio.fail_after(5):
            while not runtime._drivers:
                await anyio.sleep(0.01)
        (driver,) = runtime._drivers
        assert driver.send_timeout == 0.7
        assert driver.stream.control_timeout == 0.7  # type: ignore[attr-defined]
        await anyio.aclose_forcefully(ws.stream)
