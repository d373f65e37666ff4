"""The conformance harness's side of the wire: a blocking TLS 1.3 connection carrying a
:class:`~keymgmt_proto.ClientConnection`, with every frame in both directions written to a
:class:`Transcript`, and raw frames for misbehaviour.

A :class:`Link` splits what the server sends into frames itself: frames for session ids the
harness *claimed* (hand-made frames on ids the client connection never opened) come back
to the harness; every other frame goes to the client connection, whose events the
harness then takes with :meth:`Link.take`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keymgmt_proto import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    NEED_DATA,
    ClientConnection,
    ConnectionFailed,
    ErrorCode,
    Event,
    FrameType,
    OpaqueStepRequired,
    RegistrationSucceeded,
    RemoteProtocolError,
    ResponseReceived,
    ResumeDeferred,
    SessionClosed,
    SessionEstablished,
    SessionFailed,
    SessionResumed,
)
from keymgmt_proto.wire import MESSAGE_TYPES, Abort, GoAway, LoginStart, Record, RegStart

from ..tls import client_context

__all__ = ["Link", "Target", "Transcript", "describe_frame", "parse_target", "split_frames"]

_HEADER = struct.Struct(">BBII")
_FRAME_TYPES = {t.value for t in FrameType}


@dataclass
class Target:
    """Where the server under test listens and how to reach it."""

    host: str
    port: int
    #: The CA that signs the server's certificate (None: the system store).
    ca: Path | None = None
    #: The name to verify in the server's certificate (default: ``host``).
    server_name: str | None = None
    #: Seconds to wait for each answer the protocol says must come.
    timeout: float = 5.0
    #: A registration token (e.g. an invitation from ``keymgmt-server invite``) for servers
    #: that require one; empty for servers that do not.
    token: bytes = field(default=b"", repr=False)
    _context: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """``HOST:PORT``."""
        return f"{self.host}:{self.port}"

    def context(self) -> ssl.SSLContext:
        """The TLS 1.3 client context (certificate and host name verified)."""
        if self._context is None:
            self._context = client_context(self.ca)
        return self._context

    def connect(self) -> ssl.SSLSocket:
        """A new TLS connection to the target."""
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            return self.context().wrap_socket(sock, server_hostname=self.server_name or self.host)
        except BaseException:
            sock.close()
            raise


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for an IPv6 address) as ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def split_frames(data: bytes) -> list[bytes]:
    """Cut bytes made of whole frames (what a client connection sends) into frames."""
    frames = []
    while len(data) >= HEADER_SIZE:
        (length,) = struct.unpack_from(">I", data, 6)
        end = HEADER_SIZE + length
        frames.append(data[:end])
        data = data[end:]
    if data:
        frames.append(data)  # a partial frame (only hand-made bytes end like this)
    return frames


def _text(value: bytes) -> str:
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError:
        return value.hex()
    return repr(decoded) if decoded.isprintable() else value.hex()


def describe_frame(data: bytes) -> str:
    """One line for a frame: type, session id, size, and its clear fields (never secrets)."""
    if len(data) < HEADER_SIZE:
        return f"{len(data)} bytes (less than a frame header)"
    version, type_byte, session_id, length = _HEADER.unpack_from(data)
    payload = data[HEADER_SIZE:]
    try:
        frame_type = FrameType(type_byte)
    except ValueError:
        return f"type 0x{type_byte:02x} (unknown) #{session_id} length {length}"
    head = f"{frame_type.name} #{session_id}"
    if version != 1:
        head += f" version {version}"
    if length != len(payload):
        return f"{head} length field {length}, {len(payload)} bytes follow"
    try:
        if frame_type in (FrameType.ABORT, FrameType.GOAWAY):
            message = MESSAGE_TYPES[frame_type].decode(payload)
            assert isinstance(message, Abort | GoAway)
            return f"{head} {message.code.name}" + (f" {message.reason!r}" if message.reason else "")
        if frame_type is FrameType.LOGIN_START:
            return f"{head} account {_text(LoginStart.decode(payload).account_name)}"
        if frame_type is FrameType.REG_START:
            start = RegStart.decode(payload)
            token = f", token of {len(start.token)} bytes" if start.token else ""
            return f"{head} account {_text(start.account_name)}{token}"
        if frame_type.sealed and frame_type not in (FrameType.RESUME, FrameType.RESUMED):
            return f"{head} seq {Record.decode(payload).seq} ({len(payload)} bytes)"
    except (RemoteProtocolError, ValueError):
        return f"{head} ({len(payload)} bytes, does not decode)"
    return f"{head} ({len(payload)} bytes)"


def describe_event(event: Event) -> str:
    """One line for a client event (no keys, no bodies)."""
    if isinstance(event, SessionEstablished):
        return f"session #{event.session_id} established, user {event.user_id.hex()[:8]}"
    if isinstance(event, RegistrationSucceeded):
        return f"registration on #{event.session_id} done, user {event.user_id.hex()[:8]}"
    if isinstance(event, ResponseReceived):
        return f"#{event.session_id}: answer to request {event.request_id} ({len(event.body)} bytes)"
    if isinstance(event, SessionResumed):
        return f"session resumed on #{event.session_id}"
    if isinstance(event, SessionClosed):
        return f"session #{event.session_id} closed: {event.code.name}"
    if isinstance(event, SessionFailed):
        side = "by the server" if event.remote else "by the client"
        return f"session #{event.session_id} failed ({side}): {event.code.name} {event.reason!r}"
    if isinstance(event, ResumeDeferred):
        return f"resumption on #{event.session_id} deferred: {event.reason!r}"
    if isinstance(event, ConnectionFailed):
        side = "by the server" if event.remote else "by the client"
        return f"connection failed ({side}): {event.code.name} {event.reason!r}"
    return type(event).__name__


class Transcript:
    """What happened in one run of the machine, step by step, for a human."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.steps = 0

    def step(self, text: str) -> None:
        """A new step (one rule of the state machine)."""
        self.steps += 1
        self.lines.append(f"step {self.steps}: {text}")

    def sent(self, link: str, data: bytes, note: str = "") -> None:
        """Bytes the harness wrote on ``link``."""
        self.lines.append(f"    {link} -> {describe_frame(data)}{note}")

    def received(self, link: str, data: bytes) -> None:
        """A frame the server sent on ``link``."""
        self.lines.append(f"    {link} <- {describe_frame(data)}")

    def event(self, link: str, event: Event) -> None:
        """What the client connection made of it."""
        self.lines.append(f"    {link}    = {describe_event(event)}")

    def note(self, text: str) -> None:
        """A line of the model's (what it sent, what it expects, what it saw)."""
        self.lines.append(f"    {text}")

    def render(self) -> str:
        return "\n".join(self.lines)


class Link:
    """One TLS connection to the target (see the module docstring)."""

    def __init__(self, target: Target, name: str, transcript: Transcript) -> None:
        self.name = name
        self.target = target
        self.transcript = transcript
        self.conn = ClientConnection(os.urandom)
        self.tls: ssl.SSLSocket | None = target.connect()
        self.events: list[Event] = []
        self._inbox = bytearray()
        #: Session ids whose frames come back to the harness (hand-made sessions).
        self.claimed: set[int] = set()
        #: Frames received on claimed ids, in order: (type, session id, payload).
        self.raw: list[tuple[FrameType, int, bytes]] = []
        #: Every frame received, in order: (type, session id, payload).
        self.received: list[tuple[FrameType, int, bytes]] = []
        #: Every frame written, in order (as written; raw bytes included).
        self.sent: list[bytes] = []
        #: The highest session id written on this connection.
        self.highest_id = 0
        #: The server closed the connection (or it broke).
        self.eof = False
        #: A GOAWAY the server sent.
        self.goaway: GoAway | None = None
        transcript.note(f"{name}: new TLS 1.3 connection to {target.address}")

    @property
    def alive(self) -> bool:
        """Still usable for sessions: open, not failed on either side."""
        return self.tls is not None and not self.eof and self.conn.failed is None

    # ------------------------------------------------------------ writing

    def flush(
        self, transform: Callable[[list[bytes]], list[bytes]] | None = None, note: str = ""
    ) -> list[bytes]:
        """Write what the client connection has queued (after ``transform``, which may
        change, drop, add or reorder frames); returns the frames written."""
        frames = split_frames(self.conn.data_to_send())
        if transform is not None and frames:
            frames = transform(frames)
        for frame in frames:
            self._write(frame, note)
        return frames

    def write_raw(self, data: bytes, note: str = "") -> None:
        """Write hand-made bytes (one frame, a partial one, or anything)."""
        self._write(data, note)

    def _write(self, data: bytes, note: str) -> None:
        self.transcript.sent(self.name, data, note)
        self.sent.append(data)
        if len(data) >= HEADER_SIZE:
            self.highest_id = max(self.highest_id, _HEADER.unpack_from(data)[2] & 0x7FFFFFFF)
        if self.tls is None or self.eof:
            self.transcript.note(f"{self.name}: (not written: the connection is closed)")
            return
        try:
            self.tls.sendall(data)
        except OSError as exc:
            self.transcript.note(f"{self.name}: write failed: {type(exc).__name__}")
            self._closed()

    # ------------------------------------------------------------ reading

    def pump(self, until: Callable[[], bool], timeout: float | None = None) -> bool:
        """Read and dispatch frames until ``until()`` holds (True), the connection ends or
        ``timeout`` (default the target's) passes (``until()`` then)."""
        deadline = time.monotonic() + (self.target.timeout if timeout is None else timeout)
        while not until():
            if self.tls is None or self.eof:
                return until()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.tls.settimeout(remaining)
            try:
                data = self.tls.recv(65536)
            except TimeoutError:
                return until()
            except (ssl.SSLError, OSError):
                data = b""
            if not data:
                self.transcript.note(f"{self.name}: the server closed the connection")
                self._closed()
                continue
            self._feed(data)
        return True

    def settle(self, seconds: float = 0.05) -> None:
        """Read whatever arrives within ``seconds``."""
        self.pump(lambda: False, seconds)

    def _closed(self) -> None:
        self.eof = True
        if self.conn.failed is None:
            self.conn.connection_lost()
        self._drain()

    def _feed(self, data: bytes) -> None:
        self._inbox += data
        while len(self._inbox) >= HEADER_SIZE:
            version, type_byte, session_id, length = _HEADER.unpack_from(self._inbox)
            if version != 1 or type_byte not in _FRAME_TYPES or length > DEFAULT_MAX_PAYLOAD:
                # Not a frame this client can split: the client connection fails it.
                self.transcript.note(
                    f"{self.name} <- {len(self._inbox)} bytes that are not a valid frame header"
                )
                self.conn.receive_data(bytes(self._inbox))
                self._inbox.clear()
                self._drain()
                return
            if len(self._inbox) < HEADER_SIZE + length:
                return
            frame = bytes(self._inbox[: HEADER_SIZE + length])
            del self._inbox[: HEADER_SIZE + length]
            frame_type = FrameType(type_byte)
            payload = frame[HEADER_SIZE:]
            self.transcript.received(self.name, frame)
            self.received.append((frame_type, session_id, payload))
            if frame_type is FrameType.GOAWAY and session_id == 0:
                try:
                    self.goaway = GoAway.decode(payload)
                except RemoteProtocolError:
                    self.goaway = GoAway(ErrorCode.MALFORMED, "")
            if session_id in self.claimed:
                self.raw.append((frame_type, session_id, payload))
                continue
            self.conn.receive_data(frame)
            self._drain()

    def _drain(self) -> None:
        while (event := self.conn.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            if isinstance(event, OpaqueStepRequired):
                self.conn.complete_opaque_step(event.run(self.conn.opaque))
                continue
            self.transcript.event(self.name, event)
            self.events.append(event)
        if self.tls is not None and not self.eof:
            self.flush()

    # ------------------------------------------------------------ events

    def take(self, match: Callable[[Event], bool]) -> Event | None:
        """Remove and return the first pending event ``match`` accepts."""
        for i, event in enumerate(self.events):
            if match(event):
                return self.events.pop(i)
        return None

    def wait_for(self, match: Callable[[Event], bool], timeout: float | None = None) -> Event | None:
        """:meth:`take` after pumping until such an event is there (None on timeout)."""
        self.pump(lambda: any(match(e) for e in self.events), timeout)
        return self.take(match)

    def last_frame(self, session_id: int) -> tuple[FrameType, bytes] | None:
        """The last frame received on ``session_id``."""
        for frame_type, sid, payload in reversed(self.received):
            if sid == session_id:
                return frame_type, payload
        return None

    def frames_on(self, session_id: int) -> list[FrameType]:
        """The types of the frames received on ``session_id``, in order."""
        return [t for t, sid, _ in self.received if sid == session_id]

    def wait_raw(self, session_id: int, timeout: float | None = None) -> tuple[FrameType, bytes] | None:
        """The next frame received on the claimed ``session_id`` (None on timeout)."""

        def there() -> bool:
            return any(sid == session_id for _, sid, _ in self.raw)

        self.pump(there, timeout)
        for i, (frame_type, sid, payload) in enumerate(self.raw):
            if sid == session_id:
                del self.raw[i]
                return frame_type, payload
        return None

    # ------------------------------------------------------------ ending

    def close(self) -> None:
        """End the connection on purpose: GOAWAY(OK) if it still works, then close."""
        if self.tls is None:
            return
        if self.alive:
            self.conn.close("conformance run done")
            self.flush()
        self._shut()

    def drop(self) -> None:
        """Cut the connection without a word (no GOAWAY, no TLS close_notify)."""
        if self.tls is None:
            return
        self.transcript.note(f"{self.name}: connection cut")
        self._shut()
        if self.conn.failed is None:
            self.conn.connection_lost()
        self._drain()

    def _shut(self) -> None:
        assert self.tls is not None
        with contextlib.suppress(OSError):
            self.tls.shutdown(socket.SHUT_RDWR)
        self.tls.close()
        self.tls = None
        self.eof = True
