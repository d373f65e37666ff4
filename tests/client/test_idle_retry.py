"""A login or registration whose connection the server closed while the client's event
loop was blocked (issue 15 review, finding 1): a real key server on loopback TLS 1.3, in
its own thread, closes a connection with no session after ``connection_idle_timeout``;
the client, blocked in ``time.sleep`` past it, then logs in or registers. The call is
retried once on a new connection, since the server never answered it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.client.connect import tls_connector
from keymgmt.adapters.server.runtime import KeyServerRuntime
from keymgmt_proto import ServerConfig

from ..support.net_world import make_settings

PW = b"correct horse battery staple"
#: The server closes a connection that carries no session this long after it opened.
IDLE = 0.3


@contextmanager
def idle_closing_server(tmp_path: Path) -> Iterator[tuple[int, Path, KeyServerRuntime]]:
    """A key server on its own event loop (in a thread), so the test's blocked loop does
    not block it too; yields its port, its CA certificate and the runtime."""
    settings, pki = make_settings(tmp_path, protocol=ServerConfig(connection_idle_timeout=IDLE))
    with start_blocking_portal("asyncio") as portal:
        runtime = KeyServerRuntime(settings)
        future, port = portal.start_task(runtime.run)
        try:
            yield port, pki.ca_cert, runtime
        finally:
            portal.call(runtime.shutdown)
            future.result(timeout=30)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_login_and_register_survive_a_connection_closed_while_the_loop_was_blocked(tmp_path, backend):
    """Without the retry the register, then the login, raise ConnectionLostError (the
    server's GOAWAY "no session on this connection" arrives as the first answer)."""

    async def scenario(port: int, ca: Path) -> int:
        connect = tls_connector("127.0.0.1", port, cafile=ca)
        async with KeymgmtClient(connect) as client:
            time.sleep(IDLE * 4)  # the loop is blocked: the server's GOAWAY waits unread
            await client.register(b"sleepy@example.org", PW)
            # Idle again, with no session on the connection, then blocked again.
            await anyio.sleep(IDLE * 4)
            time.sleep(IDLE * 4)
            session = await client.login(b"sleepy@example.org", PW)
            assert await session.list_keys() == []
            await session.logout()
            return client.connection_count

    with idle_closing_server(tmp_path) as (port, ca, runtime):
        connections = anyio.run(scenario, port, ca, backend=backend)
    # One connection per call at least: each blocked call met a closed one and retried.
    assert connections >= 3
    assert runtime.connections_served >= 3
