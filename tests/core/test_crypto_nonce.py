"""The record nonce is ``iv XOR (0^4 || seq as u64)`` (docs/protocol.md), however it is computed."""

from __future__ import annotations

import struct

from hypothesis import given

from keymgmt_proto import strategies as S
from keymgmt_proto.wire import MAX_SEQ, NONCE_SIZE, record_nonce


def reference_nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, b"\x00\x00\x00\x00" + struct.pack(">Q", seq), strict=True))


@given(S.fixed_bytes(NONCE_SIZE), S.sequence_numbers())
def test_nonce_matches_the_bytewise_definition(iv: bytes, seq: int) -> None:
    assert record_nonce(iv, seq) == reference_nonce(iv, seq)


def test_nonce_edges() -> None:
    for iv in (bytes(12), b"\xff" * 12, bytes(range(12))):
        for seq in (0, 1, 255, 2**32 - 1, 2**32, MAX_SEQ - 1, MAX_SEQ):
            nonce = record_nonce(iv, seq)
            assert len(nonce) == NONCE_SIZE
            assert nonce == reference_nonce(iv, seq)
            assert nonce[:4] == iv[:4]  # the sequence number never reaches the first four bytes
