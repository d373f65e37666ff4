"""The key server's side of the WebSocket binding: the HTTP upgrade (docs/protocol.md,
*WebSocket binding*).

:func:`accept_upgrade` reads one HTTP/1.1 request with h11 (the head bounded to
``MAX_UPGRADE_REQUEST`` bytes; the caller bounds the time), and answers 101 only to
``GET /keymgmt`` with an allowed ``Origin`` (cross-site WebSocket hijacking: a page of
another site must not reach the key server through its visitors' browsers), a valid
WebSocket key and version, and the ``keymgmt.v1`` subprotocol. Anything else gets an
HTTP error status and no upgrade (:class:`UpgradeRefusedError`). No WebSocket extension is
ever accepted (no compression: what is compressed before it is encrypted leaks through
its length). The open WebSocket is a :class:`~keymgmt.adapters.websocket.WebSocketStream`
that the runtime hands to the same connection driver as a TCP connection.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re

import anyio
import h11
from anyio.abc import ByteStream
from wsproto.connection import Connection, ConnectionType

from ..websocket import WS_PATH, WS_SUBPROTOCOL, WebSocketStream, accept_token

__all__ = [
    "MAX_UPGRADE_REQUEST",
    "InputBudgetSpent",
    "UpgradeRefusedError",
    "accept_upgrade",
    "normalize_origin",
]

#: The largest upgrade request head (request line and headers) the server reads.
MAX_UPGRADE_REQUEST = 8192

_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
}

_ORIGIN = re.compile(r"(https?)://([a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(:([0-9]{1,5}))?")
_DEFAULT_PORTS = {"https": 443, "http": 80}


def normalize_origin(text: str) -> str:
    """An origin as browsers send it (``scheme://host[:port]``, lower case, without the
    scheme's default port); ValueError with one line if ``text`` is not one (a path, a
    wildcard, ``null``, another scheme)."""
    origin = text.strip().lower()
    match = _ORIGIN.fullmatch(origin)
    if match is None:
        raise ValueError(f"{text!r} is not an origin like https://app.example.org or http://localhost:8080")
    scheme, host, port = match.group(1), match.group(2), match.group(5)
    if port is not None and (int(port) > 65535 or int(port) == 0):
        raise ValueError(f"{text!r}: port {port} is not in 1..65535")
    if port is None or int(port) == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{int(port)}"


class UpgradeRefusedError(Exception):
    """The upgrade was refused: ``status`` was answered (0: the peer left first, nothing
    was answered); the message says why, for the log (peer text quoted)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class InputBudgetSpent(anyio.BrokenResourceError):
    """Raised by a stream whose peer sent more input that does nothing (TLS records that
    carry little or none, protocol.md section 10) than the budget allows before the
    upgrade was answered: the connection ends, and the log says why."""


async def _refuse(stream: ByteStream, status: int, why: str, headers: bytes = b"") -> UpgradeRefusedError:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n".encode()
        + b"Content-Length: 0\r\nConnection: close\r\n"
        + headers
        + b"\r\n"
    )
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await stream.send(head)
    return UpgradeRefusedError(status, why)


def _tokens(value: bytes, *, lower: bool = True) -> list[str]:
    tokens = [t.strip() for t in value.decode("latin-1").split(",") if t.strip()]
    return [t.lower() for t in tokens] if lower else tokens


async def accept_upgrade(
    stream: ByteStream,
    *,
    allowed_origins: frozenset[str],
    max_message: int,
    max_request: int = MAX_UPGRADE_REQUEST,
    control_timeout: float = 30.0,
) -> WebSocketStream:
    """Read the upgrade request on ``stream`` (TLS, just handshaken) and answer it: the open
    WebSocket, or UpgradeRefusedError after the refusal was sent. ``allowed_origins`` are
    normalized (:func:`normalize_origin`). Not bounded in time: the caller is."""
    http = h11.Connection(h11.SERVER, max_incomplete_event_size=max_request)
    request: h11.Request | None = None
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in _REASONS else 400
            what = f"an upgrade request over {max_request} bytes" if status == 431 else "not HTTP/1.1"
            raise await _refuse(stream, status, what) from None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(4096)
            except InputBudgetSpent:
                raise UpgradeRefusedError(
                    0, "sent more input that does nothing than its budget allows before its upgrade request"
                ) from None
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                raise UpgradeRefusedError(0, "closed before its upgrade request was complete") from None
            http.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
            continue
        if isinstance(event, h11.Data):
            raise await _refuse(stream, 400, "an upgrade request with a body")
        if isinstance(event, h11.EndOfMessage):
            break
        raise UpgradeRefusedError(0, "closed before its upgrade request was complete")
    assert request is not None
    if request.method != b"GET":
        method = request.method.decode("ascii", "replace")[:16]
        raise await _refuse(stream, 405, f"method {method!r}, not GET", b"Allow: GET\r\n")
    path = request.target.split(b"?", 1)[0]
    if path != WS_PATH.encode():
        raise await _refuse(stream, 404, f"path {path.decode('ascii', 'replace')[:64]!r}, not {WS_PATH}")
    headers: dict[bytes, list[bytes]] = {}
    for name, value in request.headers:
        headers.setdefault(name.lower(), []).append(value)
    origins = headers.get(b"origin", [])
    if not origins:
        raise await _refuse(stream, 403, "no Origin header")
    origin_text = origins[0].decode("latin-1")
    try:
        origin = normalize_origin(origin_text)
    except ValueError:
        origin = None
    if len(origins) != 1 or origin is None or origin not in allowed_origins:
        raise await _refuse(stream, 403, f"origin {origin_text[:100]!r} is not allowed")
    connection = [t for v in headers.get(b"connection", []) for t in _tokens(v)]
    upgrade = [t for v in headers.get(b"upgrade", []) for t in _tokens(v)]
    if request.http_version != b"1.1" or "upgrade" not in connection or "websocket" not in upgrade:
        raise await _refuse(
            stream, 426, "not a WebSocket upgrade", b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        )
    if headers.get(b"sec-websocket-version") != [b"13"]:
        raise await _refuse(stream, 426, "not WebSocket version 13", b"Sec-WebSocket-Version: 13\r\n")
    keys = headers.get(b"sec-websocket-key", [])
    try:
        valid_key = len(keys) == 1 and len(base64.b64decode(keys[0], validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        raise await _refuse(stream, 400, "no valid Sec-WebSocket-Key")
    offered = [t for v in headers.get(b"sec-websocket-protocol", []) for t in _tokens(v, lower=False)]
    if WS_SUBPROTOCOL not in offered:
        raise await _refuse(stream, 400, f"the subprotocol {WS_SUBPROTOCOL} not offered")
    await stream.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_token(keys[0]) + b"\r\n"
        b"Sec-WebSocket-Protocol: " + WS_SUBPROTOCOL.encode() + b"\r\n\r\n"
    )
    trailing, _closed = http.trailing_data  # a client may send its first frames right behind
    return WebSocketStream(
        stream,
        Connection(ConnectionType.SERVER, trailing_data=bytes(trailing)),
        max_message=max_message,
        control_timeout=control_timeout,
    )
