"""The only module that calls opaque-ke-py (CRY-1: OPAQUE-3DH, ristretto255, SHA-512, Argon2).

Every failure of the binding surfaces as ``ValueError``; here it becomes a
:class:`RemoteProtocolError` with a fixed message, so nothing the binding says
(which may quote sizes of secret structures) leaks into logs. Never call
``ServerSetupData.get_public_key()``: in opaque-ke-py it returns the whole
secret setup.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Protocol

import opaque_ke_py as _ok

from ._crypto import HmacSha3, RandomSource, hkdf_sha3
from ._errors import ErrorCode, RemoteProtocolError

__all__ = [
    "REAL_OPAQUE",
    "ClientLoginResult",
    "ClientStep",
    "OpaqueSuite",
    "PasswordCheck",
    "RealOpaque",
    "ServerLoginStep",
    "ServerSetup",
    "client_login_finish",
    "client_login_start",
    "client_registration_finish",
    "client_registration_start",
    "server_login_finish",
    "server_login_start",
    "server_registration_finish",
    "server_registration_start",
]


_DECOY_LABEL = b"keymgmt v1 decoy records"


class ServerSetup:
    """The long-term OPAQUE server secret (CRY-5). Its repr shows nothing."""

    __slots__ = ("_decoy_mac", "_decoy_public_key", "_setup")

    def __init__(self, setup: _ok.ServerSetupData) -> None:
        self._setup = setup
        #: HMAC under the decoy secret (its key states hashed once), and the decoy public key.
        self._decoy_mac: HmacSha3 | None = None
        self._decoy_public_key: bytes | None = None

    @classmethod
    def generate(cls) -> ServerSetup:
        """Create a new setup (OPAQUE's own OS randomness). Do this once, explicitly."""
        return cls(_ok.server_setup())

    @classmethod
    def from_bytes(cls, data: bytes) -> ServerSetup:
        """Load a serialized setup; ValueError (without details) if it is corrupt."""
        try:
            return cls(_ok.ServerSetupData.from_bytes(data))
        except ValueError:
            raise ValueError("OPAQUE server setup is corrupt") from None

    def to_bytes(self) -> bytes:
        """Serialize (secret! store with owner-only permissions)."""
        return self._setup.to_bytes()

    def __repr__(self) -> str:
        return "ServerSetup(<secret>)"

    def decoy_record(self, account_name: bytes, random: RandomSource) -> tuple[bytes, bytes]:
        """NET-9: the ``(user_id, registration_record)`` an unknown account name logs in
        against, so the client sees exactly what a wrong password gives.

        A record is ``client public key (32) || masking key (64) || envelope (96)``. The
        masking key, the envelope and the user id come from a secret derived from this
        setup and the name, so every instance sharing the setup answers repeated probes of
        one name like probes of one real account. The public key must be a valid
        ristretto255 point: the first time, the public key of a throwaway server setup (a
        uniformly random point, as a client's is), read from a RegistrationResponse
        (evaluated element (32) || server public key (32); ``random`` draws the request's
        password). No client step runs, so no Argon2: the first login costs what the others
        do. No password opens the envelope."""
        if self._decoy_mac is None or self._decoy_public_key is None:
            start = _ok.client_registration_start(random(32))
            response = _ok.server_registration_start(_ok.server_setup(), start.get_message(), b"decoy")
            self._decoy_public_key = response.get_message()[32:64]
            self._decoy_mac = HmacSha3(hkdf_sha3(self.to_bytes(), _DECOY_LABEL, 32))
        # user id (16) || masking key (64) || envelope (96), in one expansion (HKDF-Expand
        # under the decoy secret): a few microseconds, and the same work whether or not the
        # name exists (see accept_login).
        material = self._decoy_mac.expand(b"decoy record" + account_name, 176)
        return material[:16], self._decoy_public_key + material[16:]


@dataclass(frozen=True, slots=True)
class ClientStep:
    """What a client step of an :class:`OpaqueSuite` returns: the message to send and the
    private state the client keeps for the next step (for ``client_registration_finish``,
    the export key)."""

    message: bytes = field(repr=False)
    state: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ClientLoginResult:
    """What ``OpaqueSuite.client_login_finish`` returns: the finalization to send, the
    session key both sides now share, and the export key (the same at every login)."""

    message: bytes = field(repr=False)
    session_key: bytes = field(repr=False)
    export_key: bytes = field(repr=False)


#: OPAQUE's sizes (RFC 9807, ristretto255 and SHA-512): an element or public key, a nonce,
#: a masking key, and where a credential response's masking nonce and masked server key sit.
_NPK, _NN, _NH = 32, 32, 64
_PAD_INFO = b"CredentialResponsePad"


@dataclass(frozen=True, slots=True)
class PasswordCheck:
    """Tells whether a new registration's password is the one a session logged in with,
    from public data only: the login's masking nonce and the server's public key as the
    credential response masked it (OPAQUE masks it with a pad from the masking key, and the
    masking key depends only on the password and the server's OPRF key for the name).

    A new registration's upload carries its masking key and its response the server's
    public key: the new password is the old one exactly when that masking key unmasks the
    login's server key. Built by the client core from the login (``SessionEstablished``),
    and after a password change from the change itself."""

    nonce: bytes = field(repr=False)
    masked_server_key: bytes = field(repr=False)

    @classmethod
    def from_login(cls, credential_response: bytes) -> PasswordCheck | None:
        """From a login's credential response (KE2); None when it is not OPAQUE's layout."""
        if len(credential_response) < _NPK + _NN + _NPK:
            return None
        start = _NPK + _NN
        return cls(credential_response[_NPK:start], credential_response[start : start + _NPK])

    @classmethod
    def from_registration(
        cls, registration_response: bytes, upload: bytes, nonce: bytes
    ) -> PasswordCheck | None:
        """As a login with the registration's password would give (``nonce``: 32 fresh
        bytes); None when the messages are not OPAQUE's layout."""
        parts = _registration_parts(registration_response, upload)
        if parts is None or len(nonce) != _NN:
            return None
        server_key, masking_key = parts
        return cls(nonce, _xor(server_key, _pad(masking_key, nonce)))

    def same_password(self, registration_response: bytes, upload: bytes) -> bool:
        """True if the registration (its response and upload) is for the password of the
        login this check came from (False when the messages are not OPAQUE's layout)."""
        parts = _registration_parts(registration_response, upload)
        if parts is None:
            return False
        server_key, masking_key = parts
        unmasked = _xor(self.masked_server_key, _pad(masking_key, self.nonce))
        return hmac.compare_digest(unmasked, server_key)


def _registration_parts(registration_response: bytes, upload: bytes) -> tuple[bytes, bytes] | None:
    """The server's public key (after the evaluated element) and the masking key (after the
    client's public key) of a RegistrationResponse and RegistrationUpload."""
    if len(registration_response) != 2 * _NPK or len(upload) < _NPK + _NH:
        return None
    return registration_response[_NPK:], upload[_NPK : _NPK + _NH]


def _pad(masking_key: bytes, nonce: bytes) -> bytes:
    """The first 32 bytes of HKDF-Expand-SHA512(masking_key, nonce || "CredentialResponsePad"):
    the pad over the server's public key (one HMAC block; Expand's output is a prefix of any
    longer one)."""
    return hmac.new(masking_key, nonce + _PAD_INFO + b"\x01", hashlib.sha512).digest()[:_NPK]


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


@dataclass(frozen=True, slots=True)
class ServerLoginStep:
    """What ``OpaqueSuite.server_login_start`` returns: the credential response to send and
    the state the server keeps for ``server_login_finish``."""

    message: bytes = field(repr=False)
    state: bytes = field(repr=False)


def _fail(what: str, code: ErrorCode = ErrorCode.MALFORMED) -> RemoteProtocolError:
    return RemoteProtocolError(f"OPAQUE {what} failed", code)


def client_registration_start(password: bytes) -> ClientStep:
    result = _ok.client_registration_start(password)
    return ClientStep(result.get_message(), result.get_state())


def client_registration_finish(password: bytes, state: bytes, registration_response: bytes) -> ClientStep:
    """Returns (upload message, export_key as ``state``)."""
    try:
        result = _ok.client_registration_finish(password, state, registration_response)
    except ValueError:
        raise _fail("registration response") from None
    return ClientStep(result.get_message(), result.get_export_key())


def client_login_start(password: bytes) -> ClientStep:
    result = _ok.client_login_start(password)
    return ClientStep(result.get_message(), result.get_state())


def client_login_finish(password: bytes, state: bytes, credential_response: bytes) -> ClientLoginResult:
    """AUTHENTICATION_FAILED for a wrong password, unknown account or a forged response."""
    try:
        result = _ok.client_login_finish(password, state, credential_response)
    except ValueError:
        raise _fail("login", ErrorCode.AUTHENTICATION_FAILED) from None
    return ClientLoginResult(result.get_message(), result.get_session_key(), result.get_export_key())


def server_registration_start(setup: ServerSetup, request: bytes, account_name: bytes) -> bytes:
    try:
        return _ok.server_registration_start(setup._setup, request, account_name).get_message()
    except ValueError:
        raise _fail("registration request") from None


def server_registration_finish(upload: bytes) -> bytes:
    """Returns the registration record (the "password file")."""
    try:
        return _ok.server_registration_finish(upload).get_password_file()
    except ValueError:
        raise _fail("registration upload") from None


def server_login_start(
    setup: ServerSetup, registration_record: bytes, request: bytes, account_name: bytes
) -> ServerLoginStep:
    try:
        result = _ok.server_login_start(setup._setup, registration_record, request, account_name)
    except ValueError:
        raise _fail("credential request") from None
    return ServerLoginStep(result.get_message(), result.get_state())


def server_login_finish(state: bytes, finalization: bytes) -> bytes:
    """Returns the session key; AUTHENTICATION_FAILED if the client's proof does not verify."""
    try:
        return _ok.server_login_finish(state, finalization).get_session_key()
    except ValueError:
        raise _fail("login", ErrorCode.AUTHENTICATION_FAILED) from None


class OpaqueSuite(Protocol):
    """The OPAQUE operations the connections run, injectable so that tests can use a fast,
    deterministic stand-in (``keymgmt_proto.testing.FakeOpaque``). Every failure is a
    :class:`RemoteProtocolError` (``AUTHENTICATION_FAILED`` for a login that does not verify)."""

    def client_registration_start(self, password: bytes) -> ClientStep: ...

    def client_registration_finish(
        self, password: bytes, state: bytes, registration_response: bytes
    ) -> ClientStep:
        """Returns (upload message, export_key as ``state``)."""
        ...

    def client_login_start(self, password: bytes) -> ClientStep: ...

    def client_login_finish(
        self, password: bytes, state: bytes, credential_response: bytes
    ) -> ClientLoginResult: ...

    def server_registration_start(self, setup: ServerSetup, request: bytes, account_name: bytes) -> bytes: ...

    def server_registration_finish(self, upload: bytes) -> bytes: ...

    def server_login_start(
        self, setup: ServerSetup, registration_record: bytes, request: bytes, account_name: bytes
    ) -> ServerLoginStep: ...

    def server_login_finish(self, state: bytes, finalization: bytes) -> bytes: ...


class RealOpaque:
    """OPAQUE-3DH through opaque-ke-py (CRY-1): the suite every connection uses by default.
    Each method calls this module's function of the same name."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "RealOpaque()"

    def client_registration_start(self, password: bytes) -> ClientStep:
        return client_registration_start(password)

    def client_registration_finish(
        self, password: bytes, state: bytes, registration_response: bytes
    ) -> ClientStep:
        return client_registration_finish(password, state, registration_response)

    def client_login_start(self, password: bytes) -> ClientStep:
        return client_login_start(password)

    def client_login_finish(
        self, password: bytes, state: bytes, credential_response: bytes
    ) -> ClientLoginResult:
        return client_login_finish(password, state, credential_response)

    def server_registration_start(self, setup: ServerSetup, request: bytes, account_name: bytes) -> bytes:
        return server_registration_start(setup, request, account_name)

    def server_registration_finish(self, upload: bytes) -> bytes:
        return server_registration_finish(upload)

    def server_login_start(
        self, setup: ServerSetup, registration_record: bytes, request: bytes, account_name: bytes
    ) -> ServerLoginStep:
        return server_login_start(setup, registration_record, request, account_name)

    def server_login_finish(self, state: bytes, finalization: bytes) -> bytes:
        return server_login_finish(state, finalization)


REAL_OPAQUE: OpaqueSuite = RealOpaque()
