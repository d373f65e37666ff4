"""Helpers for testing code built on the core. NOT for production: nothing here is secure.

:class:`FakeOpaque` has the interface and the message sizes of the real OPAQUE suite
(:class:`keymgmt_proto.OpaqueSuite`) and keeps its observable behaviour (a wrong password
fails on both sides, the export key is the same at registration and at every login, both
sides agree on a fresh session key per login) without Argon2 or any elliptic-curve
work: a login costs microseconds instead of tens of milliseconds, and with a seeded
``random`` every run is the same. Pass it as ``opaque=`` to ``ClientConnection`` and
``ServerConnection`` (both sides must use it). It protects nothing: the "verifier" it
stores and sends reveals the password to anyone who tries.
"""

from __future__ import annotations

import hashlib
import hmac

from ._crypto import RandomSource
from ._errors import ErrorCode, RemoteProtocolError
from ._messages import (
    CREDENTIAL_FINALIZATION_SIZE,
    CREDENTIAL_REQUEST_SIZE,
    CREDENTIAL_RESPONSE_SIZE,
    REGISTRATION_REQUEST_SIZE,
    REGISTRATION_RESPONSE_SIZE,
    REGISTRATION_UPLOAD_SIZE,
)
from ._opaque import ClientLoginResult, ClientStep, ServerLoginStep, ServerSetup

__all__ = ["FakeOpaque"]


def _h(size: int, *parts: bytes) -> bytes:
    """A length-prefixed hash of ``parts``, ``size`` bytes long (SHAKE-256)."""
    shake = hashlib.shake_256()
    for part in parts:
        shake.update(len(part).to_bytes(4, "big") + part)
    return shake.digest(size)


def _pad(data: bytes, size: int) -> bytes:
    return data + bytes(size - len(data))


class FakeOpaque:
    """A deterministic, insecure stand-in for OPAQUE, for tests (see the module docstring).

    Layouts: the registration response is ``H(setup, name)`` (64); the record is
    ``verifier (32) || response (64) || zeros``; KE1 is a nonce (32) from ``random``; KE2
    is ``verifier || response || server nonce || zeros``; the finalization is a hash of the
    session key, which hashes the verifier and both nonces."""

    __slots__ = ("_random",)

    def __init__(self, random: RandomSource) -> None:
        self._random = random

    def __repr__(self) -> str:
        return "FakeOpaque()"

    # ---------------------------------------------------------------- client

    def client_registration_start(self, password: bytes) -> ClientStep:
        return ClientStep(_h(REGISTRATION_REQUEST_SIZE, b"request", password), password)

    def client_registration_finish(
        self, password: bytes, state: bytes, registration_response: bytes
    ) -> ClientStep:
        if len(registration_response) != REGISTRATION_RESPONSE_SIZE:
            raise RemoteProtocolError("OPAQUE registration response failed", ErrorCode.MALFORMED)
        verifier = _h(32, b"verifier", password, registration_response)
        upload = _pad(verifier + registration_response, REGISTRATION_UPLOAD_SIZE)
        return ClientStep(upload, _h(64, b"export", password, registration_response))

    def client_login_start(self, password: bytes) -> ClientStep:
        nonce = self._random(32)
        return ClientStep(_pad(nonce, CREDENTIAL_REQUEST_SIZE), password + nonce)

    def client_login_finish(
        self, password: bytes, state: bytes, credential_response: bytes
    ) -> ClientLoginResult:
        if len(credential_response) != CREDENTIAL_RESPONSE_SIZE:
            raise RemoteProtocolError("OPAQUE login failed", ErrorCode.AUTHENTICATION_FAILED)
        verifier, response = credential_response[:32], credential_response[32:96]
        server_nonce = credential_response[96:128]
        if not hmac.compare_digest(_h(32, b"verifier", password, response), verifier):  # wrong password
            raise RemoteProtocolError("OPAQUE login failed", ErrorCode.AUTHENTICATION_FAILED)
        client_nonce = state[-32:]
        session_key = _h(64, b"session key", verifier, client_nonce, server_nonce)
        finalization = _h(CREDENTIAL_FINALIZATION_SIZE, b"finish", session_key)
        return ClientLoginResult(finalization, session_key, _h(64, b"export", password, response))

    # ---------------------------------------------------------------- server

    def server_registration_start(self, setup: ServerSetup, request: bytes, account_name: bytes) -> bytes:
        if len(request) != REGISTRATION_REQUEST_SIZE:
            raise RemoteProtocolError("OPAQUE registration request failed", ErrorCode.MALFORMED)
        return _h(REGISTRATION_RESPONSE_SIZE, b"response", setup.to_bytes(), account_name)

    def server_registration_finish(self, upload: bytes) -> bytes:
        if len(upload) != REGISTRATION_UPLOAD_SIZE:
            raise RemoteProtocolError("OPAQUE registration upload failed", ErrorCode.MALFORMED)
        return upload

    def server_login_start(
        self, setup: ServerSetup, registration_record: bytes, request: bytes, account_name: bytes
    ) -> ServerLoginStep:
        if len(request) != CREDENTIAL_REQUEST_SIZE or len(registration_record) != REGISTRATION_UPLOAD_SIZE:
            raise RemoteProtocolError("OPAQUE credential request failed", ErrorCode.MALFORMED)
        verifier, response = registration_record[:32], registration_record[32:96]
        server_nonce = self._random(32)
        message = _pad(verifier + response + server_nonce, CREDENTIAL_RESPONSE_SIZE)
        return ServerLoginStep(message, verifier + request[:32] + server_nonce)

    def server_login_finish(self, state: bytes, finalization: bytes) -> bytes:
        verifier, client_nonce, server_nonce = state[:32], state[32:64], state[64:96]
        session_key = _h(64, b"session key", verifier, client_nonce, server_nonce)
        if not hmac.compare_digest(finalization, _h(CREDENTIAL_FINALIZATION_SIZE, b"finish", session_key)):
            raise RemoteProtocolError("OPAQUE login failed", ErrorCode.AUTHENTICATION_FAILED)
        return session_key
