"""One connection's flood of input that does nothing must not starve the others (a security
review: four full-rate floods on either listener took an honest login and 20 requests
from 0.16 s to 10-12 s). Frames the server ignores or refuses without opening a session,
small TLS records, empty WebSocket messages and pings spend the connection's budget for
unproductive input (docs/protocol.md, section 10); once it is spent the connection gets
GOAWAY(LIMIT_EXCEEDED) and is closed.

The flood runs in a process of its own (tests/support/flooder.py: it does not share the
server's interpreter), four loops at full rate from another loopback address, each opening
its next connection as soon as the server has cut the last, while an honest client logs in
and makes 20 requests on the same listener. The test asserts that the honest work finishes
and that every flooding connection was cut, for that reason, within a bound well below
anything else that would end it (the server's connection_idle_timeout is raised to 60 s
here); it does not compare timings, which a busy 2-core machine makes unsteady.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from keymgmt.adapters.client import KeymgmtClient
from keymgmt_proto import ErrorCode, ServerConfig

from .test_websocket import PW, registered, tcp, wss, wss_server

pytestmark = pytest.mark.anyio

FLOODER = Path(__file__).resolve().parents[1] / "support" / "flooder.py"
#: Seconds a flooding connection may live; the flooder gives up on one after this.
BOUND = 5.0
KINDS = {"tcp": ["abort", "abort", "records", "records"], "wss": ["empty", "empty", "ping", "ping"]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("listener", ["tcp", "wss"])
async def test_flooding_connections_are_cut_while_an_honest_client_finishes(tmp_path, listener):
    config = ServerConfig(connection_idle_timeout=60.0)  # only the budget may end a flooder in time
    async with wss_server(tmp_path, protocol=config) as (runtime, pki):
        await registered(runtime, pki)
        port = runtime.port if listener == "tcp" else runtime.websocket_port
        assert port is not None
        kinds = [arg for kind in KINDS[listener] for arg in ("--kind", kind)]
        command = [sys.executable, str(FLOODER), "--port", str(port), "--ca", str(pki.ca_cert)]
        proc = subprocess.Popen(
            [*command, "--listener", listener, *kinds, "--bound", str(BOUND), "--max-seconds", "60"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with anyio.fail_after(30):
                line = await anyio.to_thread.run_sync(proc.stdout.readline)  # type: ignore[union-attr]
            assert line.strip() == "flooding", line
            started = time.monotonic()
            connect = tcp(runtime, pki) if listener == "tcp" else wss(runtime, pki)
            with anyio.fail_after(60):  # completion, not speed: generous on a busy machine
                async with KeymgmtClient(connect) as client:
                    session = await client.login(b"alice", PW)
                    key_id = await session.generate(label="under a flood")
                    for _ in range(19):
                        assert await session.export(key_id)
                    await session.logout()
            honest = time.monotonic() - started
            # (communicate closes the flooder's stdin: it stops opening connections)
            out, err = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=BOUND + 30))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        connections = json.loads(out.strip().splitlines()[-1])["connections"]
        summary = f"honest work {honest:.2f} s; flooders: {connections}"
        assert len(connections) >= len(KINDS[listener]), summary
        assert {c["kind"] for c in connections} == set(KINDS[listener]), summary
        uncut = [c for c in connections if not c["cut"]]
        assert not uncut, f"not cut within {BOUND} s: {uncut}; {summary}"
        # The server sends GOAWAY(LIMIT_EXCEEDED) and closes; closing on input it has not read
        # resets the connection, which may drop the GOAWAY before the flooder reads it.
        assert {c["goaway"] for c in connections} <= {ErrorCode.LIMIT_EXCEEDED, None}, summary
        assert any(c["goaway"] == ErrorCode.LIMIT_EXCEEDED for c in connections), summary
        if listener == "wss":  # the keymgmt connection ended: the WebSocket closes normally
            assert {c["close"] for c in connections} <= {1000, None}, summary
        with anyio.fail_after(10):  # each ended by its budget, counted once as the server ended it
            while runtime.metrics.attacks.labels("LIMIT_EXCEEDED")._value.get() < len(connections):
                await anyio.sleep(0.01)
        assert runtime.metrics.attacks.labels("LIMIT_EXCEEDED")._value.get() == len(connections)
        assert runtime.connection_faults == 0
        print(summary)
