"""Frame-level helpers for tests that hold back, reorder or forge frames."""

from __future__ import annotations

import struct

from keymgmt_proto import HEADER_SIZE, FrameType
from keymgmt_proto.wire import encode_frame


def split_frames(data: bytes) -> list[bytes]:
    """Cut a byte stream of whole frames into frames."""
    frames = []
    while data:
        (length,) = struct.unpack(">I", data[6:10])
        end = HEADER_SIZE + length
        frames.append(data[:end])
        data = data[end:]
    return frames


def frame_type(frame: bytes) -> FrameType:
    return FrameType(frame[1])


def frame_session(frame: bytes) -> int:
    (session_id,) = struct.unpack(">I", frame[2:6])
    return session_id


def retarget(frame: bytes, session_id: int) -> bytes:
    return frame[:2] + struct.pack(">I", session_id) + frame[6:]


def forge(kind: FrameType, session_id: int, payload: bytes) -> bytes:
    return encode_frame(kind, session_id, payload)


def parsed(data: bytes) -> list[tuple[FrameType, int, bytes]]:
    """Each whole frame of ``data`` as (type, session id, payload)."""
    return [(frame_type(f), frame_session(f), f[HEADER_SIZE:]) for f in split_frames(data)]
