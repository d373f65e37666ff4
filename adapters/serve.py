"""Drive one ServerConnection over any anyio byte stream (asyncio or trio).

Reads only when the core needs data, writes what ``data_to_send()`` returns,
and wakes for the core's next deadline with one timer. The network runtime
(TLS listener, limits, shutdown) builds on this.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import anyio
from anyio.abc import ByteStream

from keymgmt_proto import (
    NEED_DATA,
    ConnectionFailed,
    ErrorCode,
    Event,
    ServerConnection,
    ServerSetup,
    SessionRegistry,
)
from keymgmt_proto._crypto import RandomSource

__all__ = ["serve_stream"]

log = logging.getLogger("keymgmt.server")

ServerApp = Callable[[ServerConnection, Event], None]


async def serve_stream(
    stream: ByteStream,
    setup: ServerSetup,
    app: ServerApp,
    registry: SessionRegistry,
    *,
    random: RandomSource = os.urandom,
    receive_size: int = 65536,
    on_expired: Callable[[list[tuple[bytes, ErrorCode]]], None] | None = None,
) -> None:
    """Serve one connection until the peer closes it or it fails; then close the stream.

    ``on_expired`` receives the (user_id, reason) of detached sessions the registry
    expired; by default the app's ``sessions_expired`` method, if it has one.
    """
    if on_expired is None:
        on_expired = getattr(app, "sessions_expired", None)
    conn = ServerConnection(setup, random, registry=registry, now=anyio.current_time())

    def run_app(event: Event) -> None:
        try:
            app(conn, event)
        except Exception:  # one bad event must not take the other sessions down
            log.exception("server application failed on %s", type(event).__name__)

    try:
        while True:
            while (event := conn.next_event()) is not NEED_DATA:
                assert isinstance(event, Event)
                run_app(event)
            output = conn.data_to_send()
            if output:
                await stream.send(output)
            if conn.failed is not None:
                if conn.failed.remote:
                    log.info("connection ended: %s", conn.failed.reason)
                return
            deadlines = [t for t in (conn.get_timer(), registry.get_timer()) if t is not None]
            wait = max(0.0, min(deadlines) - anyio.current_time()) if deadlines else math.inf
            data = None
            with anyio.move_on_after(wait):
                try:
                    data = await stream.receive(receive_size)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    data = b""
            now = anyio.current_time()
            if data is None:
                conn.handle_timer(now)
                expired = registry.handle_timer(now)
                if expired and on_expired is not None:
                    on_expired(expired)
            else:
                conn.receive_data(data, now)
    finally:
        if conn.failed is None:
            conn.connection_lost()
        while (event := conn.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            if not isinstance(event, ConnectionFailed):
                run_app(event)
        with anyio.CancelScope(shield=True):
            await stream.aclose()
