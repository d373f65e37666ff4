"""A real key server on loopback TLS 1.3, and a TCP proxy that can cut connections."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import ByteStream, SocketStream, TaskGroup
from anyio.streams.tls import TLSStream

from keymgmt.adapters.server.runtime import KeyServerRuntime, ServerSettings
from keymgmt.adapters.server.setupfile import create_server_setup_file
from keymgmt.adapters.tls import DevPKI, client_context, generate_dev_pki
from keymgmt_proto import (
    NEED_DATA,
    ClientConnection,
    OpaqueStepRequired,
    ServerConfig,
    SessionEstablished,
    SessionFailed,
)


def make_settings(tmp_path: Path, **overrides: object) -> tuple[ServerSettings, DevPKI]:
    pki = generate_dev_pki(tmp_path / "pki")
    create_server_setup_file(tmp_path / "server_setup.bin")
    values: dict[str, object] = dict(
        storage_path=tmp_path / "keyserver.db",
        setup_path=tmp_path / "server_setup.bin",
        cert_path=pki.server_cert,
        key_path=pki.server_key,
        host="127.0.0.1",
        port=0,
        protocol=ServerConfig(),
    )
    values.update(overrides)
    return ServerSettings(**values), pki  # type: ignore[arg-type]


@asynccontextmanager
async def running_server(
    tmp_path: Path, **overrides: object
) -> AsyncIterator[tuple[KeyServerRuntime, DevPKI]]:
    settings, pki = make_settings(tmp_path, **overrides)
    runtime = KeyServerRuntime(settings)
    async with anyio.create_task_group() as tg:
        await tg.start(runtime.run)
        try:
            yield runtime, pki
        finally:
            runtime.shutdown()


@dataclass
class Proxy:
    """Forwards TCP between a client and the server; can drop a connection on demand."""

    target_port: int
    port: int = 0
    cut_next_response: bool = False
    connections: int = 0
    #: Seconds to wait before connecting upstream (lets a server notice a dropped link first).
    connect_delay: float = 0.0

    async def _pipe(self, source: SocketStream, sink: SocketStream, upstream: bool, tg: TaskGroup) -> None:
        try:
            while True:
                data = await source.receive()
                if not upstream and self.cut_next_response:
                    self.cut_next_response = False
                    tg.cancel_scope.cancel()  # drop this data and the connection with it
                    return
                await sink.send(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            tg.cancel_scope.cancel()

    async def _handle(self, client: SocketStream) -> None:
        self.connections += 1
        if self.connect_delay and self.connections > 1:
            await anyio.sleep(self.connect_delay)
        server = await anyio.connect_tcp("127.0.0.1", self.target_port)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pipe, client, server, True, tg)
                tg.start_soon(self._pipe, server, client, False, tg)
        finally:
            await anyio.aclose_forcefully(client)
            await anyio.aclose_forcefully(server)

    async def run(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started(self.port)
            await listener.serve(self._handle)


async def raw_login(stream: ByteStream, account: bytes, password: bytes) -> tuple[ClientConnection, int]:
    """Log in with the bare core over ``stream``: a test that attacks drives its own frames."""
    conn = ClientConnection(os.urandom)
    sid = conn.open_request_session(account, password)
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            await stream.send(conn.data_to_send())
            conn.receive_data(await stream.receive())
            continue
        if isinstance(event, OpaqueStepRequired):
            conn.complete_opaque_step(event.run(conn.opaque))
            continue
        if isinstance(event, SessionEstablished):
            return conn, sid
        assert not isinstance(event, SessionFailed), event


async def tls_from(port: int, ca_cert: Path, local_host: str = "127.0.0.1") -> ByteStream:
    """A verified TLS 1.3 client stream from a chosen loopback source address."""
    tcp = await anyio.connect_tcp("127.0.0.1", port, local_host=local_host)
    context = client_context(ca_cert)
    return await TLSStream.wrap(tcp, hostname="localhost", ssl_context=context, standard_compatible=False)
