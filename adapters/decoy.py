"""Decoy OPAQUE records for unknown accounts (NET-9).

A login for a name that is not registered runs OPAQUE against a decoy record
instead of being refused at once, so the client sees the same messages, the
same sizes and the same failure as for a wrong password. A record is
``client public key (32) || masking key (64) || envelope (96)``; the decoy's
masking key and envelope are derived from a secret (itself derived from the
OPAQUE server setup, so it is stable across restarts and instances) and the
account name, so repeated probes of one name look like probes of one real
account. The client public key must be a valid ristretto255 point: it is taken
from one throwaway registration made when the first decoy is needed. The
public key never leaves the server, and no password can open the envelope.
"""

from __future__ import annotations

import os

import opaque_ke_py

from keymgmt_proto import ServerSetup, hkdf_sha3

__all__ = ["DecoyRecords"]

_LABEL = b"keymgmt v1 decoy records"


class DecoyRecords:
    """Per-name decoy ``(user_id, registration_record)`` pairs."""

    def __init__(self, setup: ServerSetup) -> None:
        self._secret = hkdf_sha3(setup.to_bytes(), _LABEL, 32)
        self._public_key: bytes | None = None

    def __repr__(self) -> str:
        return "DecoyRecords(<secret>)"

    def _client_public_key(self) -> bytes:
        if self._public_key is None:
            password = os.urandom(32)
            start = opaque_ke_py.client_registration_start(password)
            response = opaque_ke_py.server_registration_start(
                opaque_ke_py.server_setup(), start.get_message(), b"decoy"
            )
            finish = opaque_ke_py.client_registration_finish(
                password, start.get_state(), response.get_message()
            )
            self._public_key = finish.get_message()[:32]
        return self._public_key

    def record_for(self, account_name: bytes) -> tuple[bytes, bytes]:
        """The decoy ``(user_id, registration_record)`` for ``account_name``."""
        user_id = hkdf_sha3(self._secret, b"user id" + account_name, 16)
        masking_key = hkdf_sha3(self._secret, b"masking key" + account_name, 64)
        envelope = hkdf_sha3(self._secret, b"envelope" + account_name, 96)
        return user_id, self._client_public_key() + masking_key + envelope
