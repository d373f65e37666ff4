"""``keymgmt-server`` with one protection broken on purpose: the targets the conformance
machine must catch (tests/conformance/test_server_machine.py).

Run as ``python tests/support/broken_server.py VARIANT serve --config FILE ...``: the
variant's patch is applied in this process only (the server's), then the real
``keymgmt-server`` main runs. Each patch is the smallest change that breaks one rule of
docs/protocol.md; :data:`VARIANTS` says which.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from keymgmt_proto import Action, Channel, ErrorCode, FrameType, Op, RemoteProtocolError, Status


def skip_the_replay_check() -> None:
    """A record whose sequence number is below the next expected one opens (it is a replay:
    protocol.md 5.3 says BAD_RECORD)."""
    original = Channel.open_payload

    def open_payload(self: Channel, frame_type: FrameType, payload: bytes) -> bytes:
        (seq,) = struct.unpack_from(">Q", payload)
        if seq < self.recv_seq:
            expected = self.recv_seq
            self.recv_seq = seq
            try:
                return original(self, frame_type, payload)
            finally:
                self.recv_seq = expected
        return original(self, frame_type, payload)

    Channel.open_payload = open_payload  # type: ignore[method-assign]


def accept_a_bit_flipped_record() -> None:
    """A record that fails authentication is decrypted anyway (ChaCha20 without the Poly1305
    check) instead of ending the session with BAD_RECORD (protocol.md 5.2)."""
    original = Channel.open_payload

    def open_payload(self: Channel, frame_type: FrameType, payload: bytes) -> bytes:
        try:
            return original(self, frame_type, payload)
        except RemoteProtocolError as exc:
            if "authentication" not in str(exc):
                raise
        (seq,) = struct.unpack_from(">Q", payload)
        nonce = (self._recv_iv ^ seq).to_bytes(12, "big")  # type: ignore[attr-defined]
        stream = Cipher(algorithms.ChaCha20(self._recv_key, (1).to_bytes(4, "little") + nonce), None)  # type: ignore[attr-defined]
        self.recv_seq = seq + 1
        return stream.decryptor().update(payload[8:-16])

    Channel.open_payload = open_payload  # type: ignore[method-assign]


def reuse_a_sequence_number() -> None:
    """Every RESPONSE is sealed at the sequence number of the record before it (a nonce
    used twice; protocol.md 5.3: a sender's counter never repeats)."""
    original = Channel.seal_payload

    def seal_payload(self: Channel, frame_type: FrameType, plaintext: bytes) -> bytes:
        if frame_type is FrameType.RESPONSE and self.send_seq > 0:
            self.send_seq -= 1
        return original(self, frame_type, plaintext)

    Channel.seal_payload = seal_payload  # type: ignore[method-assign]


def answer_an_unknown_account_differently() -> None:
    """A login to a name nobody registered is refused at once, before LOGIN_RESPONSE, where
    a wrong password gets LOGIN_RESPONSE and fails later (NET-9: they must look the same)."""
    from keymgmt.adapters.server import app

    original = app.KeyServer._on_login_requested

    def on_login_requested(self: app.KeyServer, conn: Any, event: Any) -> None:
        with self.storage.transaction() as tx:
            known = tx.get_account(event.account_name) is not None
        if not known:
            conn.reject_session(event.session_id, ErrorCode.AUTHENTICATION_FAILED, "no such account")
            return
        original(self, conn, event)

    app.KeyServer._on_login_requested = on_login_requested  # type: ignore[method-assign]


def tell_that_another_users_key_exists() -> None:
    """RETRIEVE of a key id another user stores answers WRONG_USER instead of the NOT_FOUND a
    missing key gets (OPS-7: exactly the same one byte)."""
    from keymgmt.adapters.server import app

    original = app.HANDLERS[Op.RETRIEVE]

    def retrieve(self: app.KeyServer, op: Any, request: Any) -> Any:
        if op.tx.get_secret(op.user_id, request.key_id) is None and op.tx.key_id_exists(request.key_id):
            raise app._Refused(Status.WRONG_USER, Action.RETRIEVE, request.key_id)
        return original(self, op, request)

    app.HANDLERS = MappingProxyType({**app.HANDLERS, Op.RETRIEVE: retrieve})  # type: ignore[misc]


def refuse_logins_at_random(share: float = 1 / 3) -> None:
    """Not broken: about one login or registration in three (``share``) is refused with
    ABORT(RATE_LIMITED), at random. A server may refuse by policy (protocol.md 7.1), and how
    often depends on its load and clock, so a run of the machine must not depend on which
    ones were refused."""
    import random

    from keymgmt.adapters.server import admission

    original = admission._BucketAdmission.admit

    def admit(self: admission._BucketAdmission, frame_type: FrameType, now: float) -> bool:
        if frame_type is not FrameType.RESUME and random.random() < share:
            return False
        return original(self, frame_type, now)

    admission._BucketAdmission.admit = admit  # type: ignore[method-assign]


def refuse_every_login() -> None:
    """Every login and registration refused with ABORT(RATE_LIMITED): allowed, but the
    machine cannot start a run, and says so."""
    refuse_logins_at_random(share=1.0)


#: Variant name -> the patch that makes it.
VARIANTS: dict[str, Callable[[], None]] = {
    "replay": skip_the_replay_check,
    "bit-flip": accept_a_bit_flipped_record,
    "sequence-reuse": reuse_a_sequence_number,
    "unknown-account": answer_an_unknown_account_differently,
    "other-users-key": tell_that_another_users_key_exists,
    "random-refusals": refuse_logins_at_random,  # not broken: policy the machine must allow
    "all-refusals": refuse_every_login,
}


def main(argv: list[str]) -> int:
    VARIANTS[argv[0]]()
    from keymgmt.adapters.cli.server import main as server_main

    return server_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
