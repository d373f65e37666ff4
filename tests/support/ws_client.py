"""A small WebSocket client for tests, written on wsproto's own client (its handshake, not
the package's): honest connections and the attacks on the key server's wss listener."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import ByteStream
from anyio.streams.tls import TLSStream
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from keymgmt.adapters.tls import client_context

ORIGIN = "https://app.example.org"
SUBPROTOCOL = "keymgmt.v1"


async def tls_to(port: int, ca_cert: Path, local_host: str = "127.0.0.1") -> TLSStream:
    """A verified TLS 1.3 stream to the loopback key server from a chosen source address."""
    tcp = await anyio.connect_tcp("127.0.0.1", port, local_host=local_host)
    context = client_context(ca_cert)
    return await TLSStream.wrap(tcp, hostname="localhost", ssl_context=context, standard_compatible=False)


async def read_response_head(stream: ByteStream, limit: int = 65536) -> tuple[int, bytes]:
    """The status and the raw head of an HTTP response (0 if the server closed first)."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            break
    if not data.startswith(b"HTTP/1.1 "):
        return 0, data
    return int(data[9:12]), data.split(b"\r\n\r\n", 1)[0]


def upgrade_request(
    *,
    method: str = "GET",
    path: str = "/keymgmt",
    origin: str | None = ORIGIN,
    subprotocol: str | None = SUBPROTOCOL,
    extra: str = "",
) -> bytes:
    """An upgrade request written by hand (so a test can get any part of it wrong)."""
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: localhost",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


@dataclass
class RawWebSocket:
    """An open client WebSocket: send messages of any kind, read what comes back."""

    stream: ByteStream
    ws: WSConnection
    received: bytearray = field(default_factory=bytearray)
    events: list[Event] = field(default_factory=list)

    async def send(self, event: Event) -> None:
        await self.stream.send(self.ws.send(event))

    async def send_bytes(self, data: bytes) -> None:
        await self.send(BytesMessage(data=data))

    async def next_events(self) -> list[Event]:
        """Read once; the events it gave (binary payloads also land in ``received``).
        The transport's end is a CloseConnection of code 1006, as wsproto reports it."""
        try:
            data: bytes | None = await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            data = None
        self.ws.receive_data(data)
        events = list(self.ws.events())
        for event in events:
            if isinstance(event, BytesMessage):
                self.received += event.data
        self.events += events
        return events

    async def until(self, kind: type[Event], timeout: float = 10.0) -> Event:
        """Read until an event of ``kind`` arrives (AssertionError if the connection ends first)."""
        with anyio.fail_after(timeout):
            while True:
                for event in await self.next_events():
                    if isinstance(event, kind):
                        return event
                    if isinstance(event, CloseConnection):
                        raise AssertionError(f"closed ({event.code}) while waiting for {kind.__name__}")

    async def closed(self, timeout: float = 10.0) -> CloseConnection:
        """Read until the server's close frame (or the transport's end) arrives."""
        with anyio.fail_after(timeout):
            while True:
                for event in await self.next_events():
                    if isinstance(event, CloseConnection):
                        return event

    async def transport_ended(self, timeout: float = 10.0) -> None:
        """Read until the server closes the TCP/TLS connection."""
        with anyio.fail_after(timeout):
            while True:
                try:
                    await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return


async def open_websocket(
    port: int,
    ca_cert: Path,
    *,
    origin: str = ORIGIN,
    local_host: str = "127.0.0.1",
) -> RawWebSocket:
    """A WebSocket to the key server's wss listener, upgraded by wsproto's client."""
    stream = await tls_to(port, ca_cert, local_host)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send(
        ws.send(
            Request(
                host="localhost",
                target="/keymgmt",
                subprotocols=[SUBPROTOCOL],
                extra_headers=[(b"origin", origin.encode())],
            )
        )
    )
    client = RawWebSocket(stream, ws)
    with anyio.fail_after(10):
        while True:
            for event in await client.next_events():
                if isinstance(event, AcceptConnection):
                    assert event.subprotocol == SUBPROTOCOL
                    return client
                if isinstance(event, RejectConnection | RejectData | CloseConnection):
                    raise AssertionError(f"upgrade refused: {event}")


__all__ = [
    "ORIGIN",
    "SUBPROTOCOL",
    "BytesMessage",
    "CloseConnection",
    "Message",
    "Ping",
    "Pong",
    "RawWebSocket",
    "TextMessage",
    "open_websocket",
    "read_response_head",
    "tls_to",
    "upgrade_request",
]
