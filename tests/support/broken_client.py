"""The ``keymgmt`` client with one check taken out on purpose: what the client conformance
mode must catch (tests/conformance/test_client_mode.py).

Run as ``python tests/support/broken_client.py VARIANT [keymgmt arguments]``: the variant's
patch applies in this process only, then the real ``keymgmt`` main runs.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from keymgmt_proto import Channel, FrameType, RemoteProtocolError


def skip_the_tag_check() -> None:
    """A record whose tag does not verify is decrypted anyway (NET-7 broken)."""
    original = Channel.open_payload

    def open_payload(self: Channel, frame_type: FrameType, payload: bytes) -> bytes:
        try:
            return original(self, frame_type, payload)
        except RemoteProtocolError as exc:
            if "authentication" not in str(exc):
                raise
        (seq,) = struct.unpack_from(">Q", payload)
        nonce = (self._recv_iv ^ seq).to_bytes(12, "big")  # type: ignore[attr-defined]
        key = self._recv_key  # type: ignore[attr-defined]
        stream = Cipher(algorithms.ChaCha20(key, (1).to_bytes(4, "little") + nonce), None)
        self.recv_seq = seq + 1
        return stream.decryptor().update(payload[8:-16])

    Channel.open_payload = open_payload  # type: ignore[method-assign]


def skip_the_sequence_check() -> None:
    """A record opens at whatever sequence number it carries (replays and gaps pass: 5.3 broken)."""
    original = Channel.open_payload

    def open_payload(self: Channel, frame_type: FrameType, payload: bytes) -> bytes:
        (seq,) = struct.unpack_from(">Q", payload)
        self.recv_seq = seq
        return original(self, frame_type, payload)

    Channel.open_payload = open_payload  # type: ignore[method-assign]


VARIANTS: dict[str, Callable[[], None]] = {
    "no-tag-check": skip_the_tag_check,
    "no-sequence-check": skip_the_sequence_check,
}


def main(argv: list[str]) -> int:
    VARIANTS[argv[0]]()
    from keymgmt.adapters.cli.client import main as client_main

    return client_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
