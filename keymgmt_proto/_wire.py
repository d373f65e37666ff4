"""Wire format: frame header, frame types, and the fixed binary layout of every payload.

A frame is::

    version   u8    PROTOCOL_VERSION
    type      u8    FrameType
    session   u32   big-endian; 0 = the connection itself
    length    u32   big-endian payload length, checked against the limit
                    before any payload byte is buffered
    payload   length bytes

Payloads use a fixed binary layout (see docs/protocol.md): integers are
big-endian, variable-length byte strings carry an explicit fixed-size length
prefix, fixed-size values (OPAQUE messages, ids) carry none. A decoder consumes
the whole payload or raises :class:`RemoteProtocolError`; trailing bytes are an
error. There is exactly one encoding for every value.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from ._errors import ErrorCode, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "HEADER_SIZE",
    "MAX_SESSION_ID",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameType",
    "Reader",
    "Writer",
    "decode_header",
    "decode_header_from",
    "encode_frame",
    "encode_header",
]

PROTOCOL_VERSION = 1
HEADER_SIZE = 10
#: Default cap on a frame's payload length (the receiver's limit; configurable): 65 KiB, so
#: the largest operation (a 64 KiB secret, sealed, in a STORE_SECRET or a RETRIEVE answer:
#: about 65.7 KB with its record) fits with room to spare (OPS-12).
DEFAULT_MAX_PAYLOAD = 65 * 1024
#: Session ids are 1..MAX_SESSION_ID; 0 names the connection.
MAX_SESSION_ID = 2**31 - 1

_HEADER = struct.Struct(">BBII")
_U8, _U16, _U32, _U64 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")


class FrameType(IntEnum):
    """Every frame type. Values below 0x20 travel in clear (inside TLS); 0x20 and up are sealed."""

    # Connection level (session id 0)
    GOAWAY = 0x00
    # OPAQUE registration (clear)
    REG_START = 0x01
    REG_RESPONSE = 0x02
    REG_UPLOAD = 0x03
    # OPAQUE login (clear)
    LOGIN_START = 0x04
    LOGIN_RESPONSE = 0x05
    LOGIN_FINISH = 0x06
    # Ends one session, either direction, before or after the channel exists
    ABORT = 0x0F
    # Sealed under the session's channel keys
    WELCOME = 0x20
    COMPLETE_REGISTRATION = 0x21
    REQUEST = 0x22
    RESPONSE = 0x23
    CLOSE = 0x24
    RESUME = 0x25
    RESUMED = 0x26

    @property
    def sealed(self) -> bool:
        """True for frames whose payload is an AEAD record."""
        return self >= 0x20


class Frame:
    """One decoded frame: header fields and the raw payload (read-only by convention).

    A plain slotted class rather than a frozen dataclass: one is built for every frame
    received, and a frozen dataclass's ``__init__`` costs several times as much (P1)."""

    __slots__ = ("payload", "session_id", "type")

    type: FrameType
    session_id: int
    payload: bytes

    def __init__(self, type: FrameType, session_id: int, payload: bytes) -> None:
        if not 0 <= session_id <= MAX_SESSION_ID:
            raise ValueError("session_id out of range")
        self.type = type
        self.session_id = session_id
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.type, self.session_id, self.payload) == (other.type, other.session_id, other.payload)

    def __hash__(self) -> int:
        return hash((self.type, self.session_id, self.payload))

    def __repr__(self) -> str:
        return f"Frame({self.type.name}, session_id={self.session_id}, {len(self.payload)} bytes)"


#: Byte -> FrameType: a dict lookup, where ``FrameType(byte)`` runs Enum's Python-level lookup.
_FRAME_TYPES: dict[int, FrameType] = {t.value: t for t in FrameType}


def encode_frame(frame_type: FrameType, session_id: int, payload: bytes) -> bytes:
    """Serialise one frame."""
    return _HEADER.pack(PROTOCOL_VERSION, frame_type, session_id, len(payload)) + payload


def encode_header(frame_type: FrameType, session_id: int, length: int) -> bytes:
    """The 10-byte header of a frame whose payload is ``length`` bytes long."""
    return _HEADER.pack(PROTOCOL_VERSION, frame_type, session_id, length)


def decode_header(header: bytes, max_payload: int) -> tuple[FrameType, int, int]:
    """Parse and check a 10-byte header; return (type, session_id, payload length).

    Raises RemoteProtocolError for an unknown version or type, a session id over
    the cap, or a length over ``max_payload`` (before anything is allocated).
    """
    if len(header) != HEADER_SIZE:
        raise RemoteProtocolError("truncated frame header", ErrorCode.MALFORMED)
    return decode_header_from(header, max_payload)


def decode_header_from(buffer: bytes | bytearray, max_payload: int) -> tuple[FrameType, int, int]:
    """:func:`decode_header` on the first 10 bytes of ``buffer`` (at least that long), read
    in place: the connection parses its input buffer without copying the header out."""
    version, type_byte, session_id, length = _HEADER.unpack_from(buffer)
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version}", ErrorCode.UNSUPPORTED_VERSION)
    frame_type = _FRAME_TYPES.get(type_byte)
    if frame_type is None:
        raise RemoteProtocolError(f"unknown frame type 0x{type_byte:02x}")
    if session_id > MAX_SESSION_ID:
        raise RemoteProtocolError("session id over the cap", ErrorCode.BAD_SESSION_ID)
    if length > max_payload:
        raise RemoteProtocolError(
            f"frame payload of {length} bytes exceeds the limit of {max_payload}",
            ErrorCode.FRAME_TOO_LARGE,
        )
    return frame_type, session_id, length


class Writer:
    """Builds a payload field by field."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        self._parts.append(_U8.pack(value))
        return self

    def u16(self, value: int) -> Writer:
        self._parts.append(_U16.pack(value))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(_U32.pack(value))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(_U64.pack(value))
        return self

    def fixed(self, value: bytes, size: int) -> Writer:
        if len(value) != size:
            raise ValueError(f"expected {size} bytes, got {len(value)}")
        self._parts.append(value)
        return self

    def bytes8(self, value: bytes) -> Writer:
        """Byte string with a one-byte length prefix (at most 255 bytes)."""
        if len(value) > 0xFF:
            raise ValueError("value longer than 255 bytes")
        self._parts.append(_U8.pack(len(value)) + value)
        return self

    def bytes16(self, value: bytes) -> Writer:
        """Byte string with a two-byte length prefix."""
        if len(value) > 0xFFFF:
            raise ValueError("value longer than 65535 bytes")
        self._parts.append(_U16.pack(len(value)) + value)
        return self

    def bytes32(self, value: bytes) -> Writer:
        """Byte string with a four-byte length prefix."""
        if len(value) > 0xFFFFFFFF:
            raise ValueError("value longer than 2**32 - 1 bytes")
        self._parts.append(_U32.pack(len(value)) + value)
        return self

    def rest(self, value: bytes) -> Writer:
        """Trailing bytes that run to the end of the payload (no prefix)."""
        self._parts.append(value)
        return self

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Consumes a payload field by field; any shortfall or leftover is a RemoteProtocolError."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _take(self, size: int) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise RemoteProtocolError(f"truncated {self._what}")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        value: int = _U16.unpack(self._take(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack(self._take(4))[0]
        return value

    def u64(self) -> int:
        value: int = _U64.unpack(self._take(8))[0]
        return value

    def fixed(self, size: int) -> bytes:
        return self._take(size)

    def bytes8(self) -> bytes:
        return self._take(self.u8())

    def bytes16(self) -> bytes:
        return self._take(self.u16())

    def bytes32(self, max_size: int) -> bytes:
        """A u32-prefixed byte string of at most ``max_size`` bytes (checked before reading it)."""
        size = self.u32()
        if size > max_size:
            raise RemoteProtocolError(
                f"{self._what}: a field of {size} bytes is over its limit of {max_size}"
            )
        return self._take(size)

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def done(self) -> None:
        if self._pos != len(self._data):
            raise RemoteProtocolError(f"trailing bytes after {self._what}")
