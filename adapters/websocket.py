"""The WebSocket binding (docs/protocol.md, *WebSocket binding*): keymgmt's byte stream
carried in binary WebSocket messages over TLS 1.3, for clients that cannot open a raw
TLS connection (a browser).

:class:`WebSocketStream` turns an open WebSocket (wsproto's sans-I/O ``Connection``)
over any anyio byte stream back into a byte stream, so the connection driver, the
client and every limit above them are the ones of the TCP listener. Message boundaries
carry no meaning: the payloads of the binary messages, concatenated, are the stream of
frames. A text message, a message over the size limit or broken WebSocket framing ends
the connection with a close code (``violation`` says why). Pings are answered. Shared by
the key server (adapters/server/websocket.py does its HTTP upgrade) and the client
(:func:`client_handshake`). On the key server, ``on_small_input`` is told of every piece
that carries fewer than ``SMALL_PIECE_SIZE`` bytes (a TLS record, a WebSocket frame, a
ping, a pong): the connection's budget for unproductive input pays for them
(docs/protocol.md, section 10).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Mapping
from enum import IntEnum
from typing import Any

import anyio
import h11
from anyio.abc import ByteStream
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from keymgmt_proto import DEFAULT_MAX_PAYLOAD, HEADER_SIZE, SMALL_PIECE_SIZE

from .tls import TLSRecordCounter

__all__ = [
    "MESSAGE_SLACK",
    "SEND_CHUNK",
    "WS_PATH",
    "WS_SUBPROTOCOL",
    "CloseCode",
    "WebSocketRefusedError",
    "WebSocketStream",
    "accept_token",
    "client_handshake",
    "max_message_size",
]

#: The request path of the key server's WebSocket endpoint.
WS_PATH = "/keymgmt"
#: The WebSocket subprotocol a client must offer and the server selects.
WS_SUBPROTOCOL = "keymgmt.v1"
#: The largest message this package sends: longer output is split (at any byte).
SEND_CHUNK = 65536
#: What a receiver accepts beyond a whole frame of its largest payload in one message.
MESSAGE_SLACK = 1024
#: The largest HTTP response head a client reads during the upgrade.
MAX_RESPONSE_HEAD = 16384

#: Small pieces counted before ``on_small_input`` is told (and may stop the parsing).
_REPORT_EVERY = 32

#: The code wsproto reports (as a close, RFC 6455's 1007) for text that is not UTF-8.
_NOT_UTF8 = 1007

#: RFC 6455's GUID for Sec-WebSocket-Accept.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class CloseCode(IntEnum):
    """The WebSocket close codes this binding uses (RFC 6455, section 7.4.1)."""

    NORMAL = 1000  # the keymgmt connection ended (after GOAWAY, or the client is done)
    PROTOCOL_ERROR = 1002  # broken WebSocket framing (an unmasked client frame, a bad opcode)
    UNSUPPORTED_DATA = 1003  # a text message: binary messages only
    MESSAGE_TOO_BIG = 1009  # a message over the receiver's limit (max_message_size)
    INTERNAL_ERROR = 1011


def max_message_size(max_payload: int = DEFAULT_MAX_PAYLOAD) -> int:
    """The largest message a receiver with this ``max_payload`` accepts: a whole frame of the
    largest payload, or a ``SEND_CHUNK`` piece of the stream, whichever is larger, plus
    ``MESSAGE_SLACK``."""
    return max(SEND_CHUNK, HEADER_SIZE + max_payload) + MESSAGE_SLACK


def accept_token(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455, section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())  # noqa: S324 - RFC 6455's, not a secret


class WebSocketRefusedError(Exception):
    """The server did not upgrade the connection (``status`` is its HTTP status, 0 if it
    answered no HTTP at all or selected no subprotocol)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class WebSocketStream(ByteStream):
    """An open WebSocket over ``transport`` as an anyio byte stream (see the module docstring).

    ``max_message``: the largest binary message accepted (``max_message_size``).
    ``control_timeout``: seconds a pong or close frame may take to go out; a peer that
    does not take them in that time has stopped reading and the connection is ended."""

    def __init__(
        self,
        transport: ByteStream,
        connection: Connection,
        *,
        max_message: int | None = None,
        receive_size: int = 65536,
        control_timeout: float = 30.0,
    ) -> None:
        self.transport = transport
        self._ws = connection
        self.max_message = max_message if max_message is not None else max_message_size()
        self.receive_size = receive_size
        self.control_timeout = control_timeout
        self._buffer = bytearray()
        self._message = 0  # bytes of the binary message being received so far
        self._eof = False
        #: wsproto may hold bytes not yet parsed: those that came right behind the upgrade
        #: (``trailing_data``). They are handled before the transport is read: the peer may
        #: be waiting for their answer and send nothing more.
        self._unparsed = True
        self._send_lock = anyio.Lock()
        #: Why this end closed the WebSocket (a text message, a message too big, broken
        #: framing, a peer that took no control frame); None while all is well.
        self.violation: str | None = None
        #: The close code this end sends when it closes (CloseCode.NORMAL unless a violation).
        self.close_code = CloseCode.NORMAL
        #: The close code the peer sent, once it closed the WebSocket.
        self.peer_close_code: int | None = None
        #: Pings answered.
        self.pings = 0
        #: Told how many small pieces arrived (see the module docstring); True from it means
        #: the connection is ending: nothing more is read. None: nobody asks.
        self.on_small_input: Callable[[int], bool] | None = None
        #: Set when the transport's TLS records are counted below it (the key server's
        #: runtime): each transport read (a record) then tells it its size and is not
        #: counted here as a small piece.
        self.tls_records: TLSRecordCounter | None = None
        self._halted = False
        self._frame = 0  # bytes of the WebSocket frame being received so far
        self._small = 0  # small pieces of the read being handled

    def __repr__(self) -> str:
        return f"<WebSocketStream {self._ws.state.name}>"

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.transport.extra_attributes

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._halted:  # its budget for unproductive input ran out: the caller ends the connection
            await anyio.sleep_forever()
        while not self._buffer:
            if self.violation is not None:
                raise anyio.BrokenResourceError(self.violation)
            if self._eof:
                raise anyio.EndOfStream
            if self._unparsed:
                self._unparsed = False
                await self._handle_events()
                continue
            try:
                data = await self.transport.receive(self.receive_size)
            except anyio.EndOfStream:
                # The transport ended without a close frame (1006): the stream ends.
                self._eof = True
                raise
            if self._ws.state is ConnectionState.CLOSED:
                continue  # after the close handshake: nothing more is read
            self._ws.receive_data(data)
            if self.tls_records is not None:
                self.tls_records.piece(len(data))
                await self._handle_events()
            else:
                await self._handle_events(1 if len(data) < SMALL_PIECE_SIZE else 0)
            if self._halted:
                await anyio.sleep_forever()
        chunk = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        return chunk

    async def _handle_events(self, small: int = 0) -> None:
        """Act on what wsproto parsed; ``small``: small pieces counted so far in this read."""
        self._small = small
        try:
            await self._take_events()
        finally:
            self._report_small()

    def _report_small(self) -> None:
        if self._small and self.on_small_input is not None and self.on_small_input(self._small):
            self._halted = True
        self._small = 0

    async def _take_events(self) -> None:
        last_ping: Ping | None = None
        for event in self._ws.events():
            if self._small >= _REPORT_EVERY:  # (wsproto parses as it is asked for events)
                self._report_small()
                if self._halted:
                    return
            if isinstance(event, BytesMessage):
                self._message += len(event.data)
                if self._message > self.max_message:
                    await self._fail(CloseCode.MESSAGE_TOO_BIG, f"a message over {self.max_message} bytes")
                    return
                self._buffer += event.data
                self._frame += len(event.data)
                if event.frame_finished:
                    if self._frame < SMALL_PIECE_SIZE:
                        self._small += 1
                    self._frame = 0
                if event.message_finished:
                    self._message = 0
            elif isinstance(event, TextMessage):
                await self._fail(CloseCode.UNSUPPORTED_DATA, "a text message (binary messages only)")
                return
            elif isinstance(event, Ping):
                self.pings += 1
                self._small += 1
                last_ping = event  # answered below: one pong per read, not one per ping
            elif isinstance(event, Pong):
                self._small += 1  # (nothing else to do)
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.REMOTE_CLOSING:  # the peer closes: answer
                    self.peer_close_code = event.code
                    self._eof = True
                    await self._send_control(self._ws.send(event.response()))
                elif self._ws.state is ConnectionState.CLOSED:  # the answer to our close
                    self.peer_close_code = event.code
                    self._eof = True
                elif event.code == _NOT_UTF8:  # still OPEN: text that is not UTF-8 is text too
                    await self._fail(
                        CloseCode.UNSUPPORTED_DATA, "text that is not UTF-8 (binary messages only)"
                    )
                else:  # still OPEN: wsproto found broken framing and reports it as a close
                    await self._fail(CloseCode.PROTOCOL_ERROR, f"broken WebSocket framing ({event.reason})")
                return
        if last_ping is not None and self._ws.state is ConnectionState.OPEN:
            # RFC 6455 5.5.3: a pong for the most recent ping only, so a flood of pings
            # costs one write per read.
            await self._send_control(self._ws.send(last_ping.response()))

    async def _fail(self, code: CloseCode, why: str) -> None:
        """A violation: send the close frame (best effort), drop what was buffered."""
        self.violation = why
        self.close_code = code
        self._buffer.clear()
        if self._ws.state is ConnectionState.OPEN:
            reason = why[:120]
            await self._send_control(self._ws.send(CloseConnection(code=code, reason=reason)))

    async def _send_control(self, data: bytes) -> None:
        """A pong or close frame, bounded in time: the peer may not be reading."""
        with anyio.move_on_after(self.control_timeout) as scope:
            try:
                async with self._send_lock:
                    await self.transport.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
                self._eof = True
        if scope.cancelled_caught:
            self.violation = self.violation or "the peer took no control frame (it stopped reading)"

    async def send(self, item: bytes) -> None:
        if self._ws.state is not ConnectionState.OPEN:
            raise anyio.ClosedResourceError
        view = memoryview(item)
        data = b"".join(
            self._ws.send(BytesMessage(data=bytes(view[i : i + SEND_CHUNK])))
            for i in range(0, len(view), SEND_CHUNK)
        )
        async with self._send_lock:
            await self.transport.send(data)

    async def send_eof(self) -> None:
        """WebSocket has no half-close: this closes the WebSocket (close frame, normal)."""
        await self._close_frame()

    async def _close_frame(self) -> None:
        if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            data = self._ws.send(CloseConnection(code=self.close_code))
            async with self._send_lock:
                await self.transport.send(data)

    async def aclose(self) -> None:
        """Send the close frame (best effort, bounded) and close the transport."""
        try:
            with anyio.move_on_after(self.control_timeout):
                await self._close_frame()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
            pass  # the peer has gone (anyio's TLS stream may say so with EndOfStream)
        finally:
            await self.transport.aclose()


async def client_handshake(
    transport: ByteStream,
    *,
    host: str,
    origin: str,
    path: str = WS_PATH,
    max_message: int | None = None,
) -> WebSocketStream:
    """Upgrade ``transport`` (a verified TLS stream to the key server) to the keymgmt
    WebSocket: GET ``path`` offering ``WS_SUBPROTOCOL`` with ``Origin: origin``.
    ``host`` is the Host header (``HOST:PORT``). WebSocketRefusedError if the server
    answers anything but 101 with that subprotocol; the caller closes the transport."""
    key = base64.b64encode(os.urandom(16))
    http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    request = h11.Request(
        method="GET",
        target=path,
        headers=[
            ("Host", host),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key.decode()),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Protocol", WS_SUBPROTOCOL),
            ("Origin", origin),
        ],
    )
    await transport.send(http.send(request) or b"")
    await transport.send(http.send(h11.EndOfMessage()) or b"")
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            raise WebSocketRefusedError(f"the server's answer to the upgrade is not HTTP: {exc}") from None
        if event is h11.NEED_DATA:
            try:
                http.receive_data(await transport.receive())
            except anyio.EndOfStream:
                http.receive_data(b"")
            continue
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            headers = {name.lower(): value for name, value in event.headers}
            if headers.get(b"sec-websocket-accept") != accept_token(key):
                raise WebSocketRefusedError("the server's Sec-WebSocket-Accept is wrong")
            if headers.get(b"sec-websocket-protocol") != WS_SUBPROTOCOL.encode():
                raise WebSocketRefusedError(f"the server did not select the subprotocol {WS_SUBPROTOCOL}")
            if headers.get(b"sec-websocket-extensions"):
                raise WebSocketRefusedError("the server chose a WebSocket extension nobody offered")
            trailing, _closed = http.trailing_data
            return WebSocketStream(
                transport,
                Connection(ConnectionType.CLIENT, trailing_data=bytes(trailing)),
                max_message=max_message,
            )
        if isinstance(event, h11.Response | h11.InformationalResponse):
            reason = event.reason.decode("ascii", "replace")
            raise WebSocketRefusedError(
                f"the server refused the WebSocket upgrade: {event.status_code} {reason}".rstrip(),
                status=event.status_code,
            )
        if isinstance(event, h11.ConnectionClosed):
            raise WebSocketRefusedError("the server closed the connection during the WebSocket upgrade")
        raise WebSocketRefusedError(f"unexpected answer to the WebSocket upgrade: {type(event).__name__}")
