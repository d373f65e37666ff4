"""Fuzz every payload decoder: each MESSAGE_TYPES class, Record, both resumption envelopes,
and the REQUEST/RESPONSE bodies (``decode_request``, ``decode_response`` per Op).

Input: one selector byte (which decoder, modulo ``len(TARGETS)``), then the
payload. The rule: the decoder returns or raises RemoteProtocolError, nothing
else. Whatever decodes must re-encode to exactly the input (the wire format
promises one encoding per value) and have a repr that does not raise.
"""

from __future__ import annotations

from collections.abc import Callable

from keymgmt_proto import FrameType, Op, RemoteProtocolError, decode_request, decode_response, encode_response
from keymgmt_proto.wire import MESSAGE_TYPES, Record, ResumedEnvelope, ResumeEnvelope

from ._common import main, violated


def _message(frame_type: FrameType) -> Callable[[bytes], bytes]:
    def run(payload: bytes) -> bytes:
        message = MESSAGE_TYPES[frame_type].decode(payload)
        repr(message)
        return message.encode()

    return run


def _record(payload: bytes) -> bytes:
    record = Record.decode(payload)
    repr(record)
    return record.encode()


def _envelope(payload: bytes) -> bytes:
    envelope = ResumeEnvelope.decode(payload)
    repr(envelope)
    return envelope.encode()


def _resumed_envelope(payload: bytes) -> bytes:
    envelope = ResumedEnvelope.decode(payload)
    repr(envelope)
    return envelope.encode()


def _request(payload: bytes) -> bytes:
    request = decode_request(payload)
    repr(request)
    return request.encode()


def _response(op: Op) -> Callable[[bytes], bytes]:
    def run(payload: bytes) -> bytes:
        status, response = decode_response(op, payload)
        repr(response)
        return encode_response(status, response)

    return run


#: (name, decoder returning the re-encoding) for every decoder a peer's bytes reach.
TARGETS: list[tuple[str, Callable[[bytes], bytes]]] = [
    *((f"message:{t.name}", _message(t)) for t in MESSAGE_TYPES),
    ("record", _record),
    ("resume-envelope", _envelope),
    ("request", _request),
    ("resumed-envelope", _resumed_envelope),
    *((f"response:{op.name}", _response(op)) for op in Op),
]


def target_index(name: str) -> int:
    """The selector byte for a target (used by make_corpus.py)."""
    return [n for n, _ in TARGETS].index(name)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    name, decode = TARGETS[data[0] % len(TARGETS)]
    payload = data[1:]
    try:
        encoded = decode(payload)
    except RemoteProtocolError:
        return
    if encoded != payload:
        raise violated(f"{name}: re-encodes differently ({len(encoded)} vs {len(payload)} bytes)")


if __name__ == "__main__":
    main(test_one_input)
