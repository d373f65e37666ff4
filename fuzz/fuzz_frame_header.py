"""Fuzz the frame header decoder: ``decode_header`` and ``Frame``.

Input: a frame as it arrives (10-byte header, then payload bytes). The rule:
``decode_header`` returns or raises RemoteProtocolError, nothing else; what it
returns is within the limits it promises; a Frame built from it re-encodes to
the same bytes (one encoding per value).
"""

from __future__ import annotations

from keymgmt_proto import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    MAX_SESSION_ID,
    Frame,
    FrameType,
    RemoteProtocolError,
)
from keymgmt_proto.wire import decode_header, encode_frame

from ._common import main, violated

#: The smallest limit a connection accepts and the default one.
LIMITS = (1024, DEFAULT_MAX_PAYLOAD)


def test_one_input(data: bytes) -> None:
    # A header of the wrong length is refused, never misread.
    wrong = data[: HEADER_SIZE + 1]
    if len(wrong) != HEADER_SIZE:
        try:
            decode_header(wrong, DEFAULT_MAX_PAYLOAD)
        except RemoteProtocolError:
            pass
        else:
            raise violated(f"decode_header accepted {len(wrong)} bytes as a header")
    header = data[:HEADER_SIZE]
    for limit in LIMITS:
        try:
            frame_type, session_id, length = decode_header(header, limit)
        except RemoteProtocolError:
            continue
        if not isinstance(frame_type, FrameType):
            raise violated("frame type is not a FrameType")
        if not 0 <= session_id <= MAX_SESSION_ID:
            raise violated(f"session id {session_id} out of range")
        if not 0 <= length <= limit:
            raise violated(f"length {length} over the limit {limit}")
        payload = data[HEADER_SIZE : HEADER_SIZE + length]
        frame = Frame(frame_type, session_id, payload)
        repr(frame)
        encoded = encode_frame(frame.type, frame.session_id, frame.payload)
        if len(payload) == length and encoded != data[: HEADER_SIZE + length]:
            raise violated("frame does not re-encode to the bytes it came from")


if __name__ == "__main__":
    main(test_one_input)
