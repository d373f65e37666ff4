"""Errors and the error codes that travel on the wire.

Theory of operation: the core raises one internal type, :class:`ProtocolError`,
with an :class:`ErrorCode`. At the API boundary it is either a
:class:`LocalProtocolError` (the caller misused the API: nothing changed) or a
:class:`RemoteProtocolError` (the peer sent something wrong). Peer faults seen
while driving a connection are never raised from ``next_event()``: they are
reported as ``SessionFailed`` or ``ConnectionFailed`` events (one channel).
The decoding functions raise :class:`RemoteProtocolError` directly.

Messages never contain secret material: they name what was wrong, not the bytes.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ErrorCode(IntEnum):
    """Why a session or a connection ended. Sent as a 16-bit code in ABORT/GOAWAY/CLOSE."""

    #: Normal end: logout acknowledged or registration stored.
    OK = 0
    #: Bytes that do not parse: bad header, length, field or frame type.
    MALFORMED = 1
    #: A frame that is not legal in the session's current state.
    UNEXPECTED_FRAME = 2
    #: Unknown protocol version in a frame header.
    UNSUPPORTED_VERSION = 3
    #: A frame larger than the receiver's limit.
    FRAME_TOO_LARGE = 4
    #: A sealed frame failed authentication, was replayed or reordered.
    BAD_RECORD = 5
    #: OPAQUE failed: wrong password or unknown account (deliberately the same).
    AUTHENTICATION_FAILED = 6
    #: Too many failed logins for this account; try again later.
    THROTTLED = 7
    #: Account name already registered.
    ACCOUNT_EXISTS = 8
    #: Account name of the wrong format or length.
    INVALID_ACCOUNT_NAME = 9
    #: A field that parses but is semantically wrong (e.g. user_id mismatch).
    INVALID_REQUEST = 10
    #: Session idle for longer than the server's idle timeout.
    IDLE_TIMEOUT = 11
    #: Session older than the server's absolute lifetime.
    LIFETIME_EXPIRED = 12
    #: The session carried as many requests as the server allows.
    REQUEST_LIMIT = 13
    #: A resumption named a session that is unknown, ended or expired.
    UNKNOWN_SESSION = 14
    #: Too many sessions on this connection, or too many requests in flight.
    LIMIT_EXCEEDED = 15
    #: Session ids must increase and stay below the cap.
    BAD_SESSION_ID = 16
    #: The server could not complete the operation (storage failure etc.).
    INTERNAL_ERROR = 17
    #: The client closed the session (logout).
    CLIENT_CLOSED = 18
    #: The connection went away before the session finished.
    CONNECTION_LOST = 19
    #: The handshake (registration/login) took longer than the server allows.
    HANDSHAKE_TIMEOUT = 20
    #: The session's key epoch has no sequence number left (NET-14): log in again.
    SEQUENCE_EXHAUSTED = 21
    #: Too many registration, login or resumption starts from this client address (NET-13).
    RATE_LIMITED = 22
    #: Registration needs an authorization the client did not give (REG-5: an invitation);
    #: also a session ended because its account's password changed or the account was deleted.
    NOT_AUTHORIZED = 23


class ProtocolError(Exception):
    """Base class: a protocol rule was broken. ``code`` says which."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.MALFORMED) -> None:
        super().__init__(message)
        self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, code={self.code.name})"


class LocalProtocolError(ProtocolError):
    """The caller used the API wrongly (e.g. a request on a closed session). Nothing changed."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> None:
        super().__init__(message, code)


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks the protocol."""
