"""Typed payloads: one frozen dataclass per frame type, validated on construction.

``encode()`` gives the payload bytes; ``decode(payload)`` parses them or raises
:class:`RemoteProtocolError`. Clear payloads are the frame payload itself; a
sealed frame's payload is a :class:`Record` whose plaintext is the message.
Fields that hold secrets or key material are excluded from ``repr``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import ClassVar, Protocol, Self

from ._errors import ErrorCode, RemoteProtocolError
from ._wire import FrameType, Reader, Writer

__all__ = [
    "ACCOUNT_NAME_MAX",
    "CREDENTIAL_FINALIZATION_SIZE",
    "CREDENTIAL_REQUEST_SIZE",
    "CREDENTIAL_RESPONSE_SIZE",
    "ENCRYPTED_STORAGE_KEY_SIZE",
    "MESSAGE_TYPES",
    "REASON_MAX",
    "REGISTRATION_REQUEST_SIZE",
    "REGISTRATION_RESPONSE_SIZE",
    "REGISTRATION_TOKEN_MAX",
    "REGISTRATION_UPLOAD_SIZE",
    "RESUME_NONCE_SIZE",
    "SESSION_HANDLE_SIZE",
    "TAG_SIZE",
    "USER_ID_SIZE",
    "Abort",
    "Close",
    "CompleteRegistration",
    "GoAway",
    "LoginFinish",
    "LoginResponse",
    "LoginStart",
    "Message",
    "Record",
    "RegResponse",
    "RegStart",
    "RegUpload",
    "Request",
    "Response",
    "Resume",
    "ResumeEnvelope",
    "Resumed",
    "ResumedEnvelope",
    "Welcome",
    "decode_message",
    "is_printable_reason",
    "printable_reason",
]

# OPAQUE-3DH (ristretto255, SHA-512, Argon2) message sizes, as produced by opaque-ke.
REGISTRATION_REQUEST_SIZE = 32
REGISTRATION_RESPONSE_SIZE = 64
REGISTRATION_UPLOAD_SIZE = 192
CREDENTIAL_REQUEST_SIZE = 96
CREDENTIAL_RESPONSE_SIZE = 320
CREDENTIAL_FINALIZATION_SIZE = 64

USER_ID_SIZE = 16
SESSION_HANDLE_SIZE = 16
#: Each side's contribution to a resumption's new key epoch (NET-14).
RESUME_NONCE_SIZE = 32
TAG_SIZE = 16
#: nonce (12) || ChaCha20-Poly1305(storage_key (32)) || tag (16)
ENCRYPTED_STORAGE_KEY_SIZE = 12 + 32 + TAG_SIZE
#: Account names are 1..255 bytes (one-byte length prefix on the wire).
ACCOUNT_NAME_MAX = 255
#: ABORT/GOAWAY reasons are short ASCII text.
REASON_MAX = 255


def printable_reason(reason: str) -> str:
    """``reason`` made fit for ABORT and GOAWAY: non-printable or non-ASCII characters become
    ``?`` and it is cut to REASON_MAX characters."""
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in reason)[:REASON_MAX]


def is_printable_reason(reason: str) -> bool:
    """Whether ``reason`` may go in ABORT or GOAWAY as it is."""
    return len(reason) <= REASON_MAX and reason.isascii() and reason.isprintable()


#: A registration token (an invitation, REG-5) is at most this many bytes.
REGISTRATION_TOKEN_MAX = 1024


class Message(Protocol):
    """What every payload class in :data:`MESSAGE_TYPES` offers."""

    FRAME_TYPE: ClassVar[FrameType]

    def encode(self) -> bytes: ...

    @classmethod
    def decode(cls, payload: bytes) -> Self: ...


_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def _check_size(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")


def _check_account_name(account_name: bytes) -> None:
    if not 1 <= len(account_name) <= ACCOUNT_NAME_MAX:
        raise ValueError(f"account_name must be 1..{ACCOUNT_NAME_MAX} bytes")


def _read_code(r: Reader) -> ErrorCode:
    raw = r.u16()
    try:
        return ErrorCode(raw)
    except ValueError:
        raise RemoteProtocolError(f"unknown error code {raw}") from None


class _Decodable:
    """Turns constructor ValueErrors into RemoteProtocolError during decode."""

    __slots__ = ()

    @classmethod
    def _build(cls, what: str, *args: object) -> Self:
        try:
            return cls(*args)
        except ValueError as exc:
            raise RemoteProtocolError(f"invalid {what}: {exc}") from None


# ----------------------------------------------------------- shared layouts
# Payloads of the same shape share one codec; each frame's class declares its FRAME_TYPE
# (whose name labels decode errors) and, where the shape has one, its field and SIZE.


#: Each frame type's name, for decode errors (an Enum's ``.name`` runs Python code on every
#: decode; a dict lookup does not).
_TYPE_NAMES: dict[FrameType, str] = {t: t.name for t in FrameType}


#: The one field's name of each _FixedSize class.
_FIELD_NAMES: dict[type, str] = {}


@dataclass(frozen=True, slots=True)
class _FixedSize(_Decodable):
    """A payload that is exactly one fixed-size value (an OPAQUE message, a user id). A subclass
    declares that one field and its SIZE."""

    FRAME_TYPE: ClassVar[FrameType]
    SIZE: ClassVar[int]

    def _field(self) -> tuple[str, bytes]:
        name = _FIELD_NAMES.get(type(self))
        if name is None:  # (once per class: dataclasses.fields costs more than the rest)
            (only,) = fields(self)
            name = _FIELD_NAMES[type(self)] = only.name
        value: bytes = getattr(self, name)
        return name, value

    def __post_init__(self) -> None:
        _check_size(*self._field(), self.SIZE)

    def encode(self) -> bytes:
        return self._field()[1]

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        what = _TYPE_NAMES[cls.FRAME_TYPE]
        r = Reader(payload, what)
        value = r.fixed(cls.SIZE)
        r.done()
        return cls._build(what, value)


@dataclass(frozen=True, slots=True)
class _AbortOrGoAway(_Decodable):
    """ABORT and GOAWAY: an error code and a short printable ASCII reason."""

    FRAME_TYPE: ClassVar[FrameType]
    code: ErrorCode
    reason: str = ""

    def __post_init__(self) -> None:
        if not is_printable_reason(self.reason):
            raise ValueError(f"reason must be printable ASCII of at most {REASON_MAX} characters")

    def encode(self) -> bytes:
        return Writer().u16(self.code).bytes8(self.reason.encode("ascii")).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        what = _TYPE_NAMES[cls.FRAME_TYPE]
        r = Reader(payload, what)
        code = _read_code(r)
        reason = r.bytes8().decode("latin-1")  # any byte decodes; the constructor wants ASCII
        r.done()
        return cls._build(what, code, reason)


@dataclass(frozen=True, slots=True)
class _RequestOrResponse(_Decodable):
    """REQUEST and RESPONSE: a per-session request id, then a body that runs to the end."""

    FRAME_TYPE: ClassVar[FrameType]
    request_id: int
    body: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.request_id < 2**32:
            raise ValueError("request_id must be 1..2**32-1")

    def encode(self) -> bytes:
        return _U32.pack(self.request_id) + self.body

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        # Fixed layout, read in place: this is every request's and answer's path.
        what = _TYPE_NAMES[cls.FRAME_TYPE]
        if len(payload) < 4:
            raise RemoteProtocolError(f"truncated {what}")
        return cls._build(what, _U32.unpack_from(payload)[0], payload[4:])

    @classmethod
    def decode_fields(cls, payload: bytes) -> tuple[int, bytes]:
        """:meth:`decode` without building the object: ``(request_id, body)``, or the same
        RemoteProtocolError (the connections' per-request path)."""
        if len(payload) >= 4:
            (request_id,) = _U32.unpack_from(payload)
            if request_id:
                return request_id, payload[4:]
        cls.decode(payload)  # raises the decoder's own error
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def encode_fields(request_id: int, body: bytes) -> bytes:
        """:meth:`encode` without building the object (ValueError for a request id out of range)."""
        if not 0 < request_id < 2**32:
            raise ValueError("request_id must be 1..2**32-1")
        return _U32.pack(request_id) + body


# ---------------------------------------------------------------- clear frames


@dataclass(frozen=True, slots=True)
class RegStart(_Decodable):
    """Client opens a registration session: account name, OPAQUE RegistrationRequest and an
    opaque authorization token (empty unless the server requires one, REG-5)."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.REG_START
    account_name: bytes
    registration_request: bytes = field(repr=False)
    token: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        _check_account_name(self.account_name)
        _check_size("registration_request", self.registration_request, REGISTRATION_REQUEST_SIZE)
        if len(self.token) > REGISTRATION_TOKEN_MAX:
            raise ValueError(f"token longer than {REGISTRATION_TOKEN_MAX} bytes")

    def encode(self) -> bytes:
        w = Writer().bytes8(self.account_name).fixed(self.registration_request, REGISTRATION_REQUEST_SIZE)
        return w.bytes16(self.token).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> RegStart:
        r = Reader(payload, "REG_START")
        account_name = r.bytes8()
        request = r.fixed(REGISTRATION_REQUEST_SIZE)
        token = r.bytes16()
        r.done()
        return cls._build("REG_START", account_name, request, token)


@dataclass(frozen=True, slots=True)
class RegResponse(_FixedSize):
    """Server's OPAQUE RegistrationResponse."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.REG_RESPONSE
    SIZE: ClassVar[int] = REGISTRATION_RESPONSE_SIZE
    registration_response: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class RegUpload(_FixedSize):
    """Client's OPAQUE RegistrationUpload (becomes the server's registration record)."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.REG_UPLOAD
    SIZE: ClassVar[int] = REGISTRATION_UPLOAD_SIZE
    registration_upload: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class LoginStart(_Decodable):
    """Client starts OPAQUE login: account name and CredentialRequest."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.LOGIN_START
    account_name: bytes
    credential_request: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_account_name(self.account_name)
        _check_size("credential_request", self.credential_request, CREDENTIAL_REQUEST_SIZE)

    def encode(self) -> bytes:
        w = Writer().bytes8(self.account_name)
        return w.fixed(self.credential_request, CREDENTIAL_REQUEST_SIZE).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> LoginStart:
        r = Reader(payload, "LOGIN_START")
        account_name = r.bytes8()
        request = r.fixed(CREDENTIAL_REQUEST_SIZE)
        r.done()
        return cls._build("LOGIN_START", account_name, request)


@dataclass(frozen=True, slots=True)
class LoginResponse(_FixedSize):
    """Server's OPAQUE CredentialResponse."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.LOGIN_RESPONSE
    SIZE: ClassVar[int] = CREDENTIAL_RESPONSE_SIZE
    credential_response: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class LoginFinish(_FixedSize):
    """Client's OPAQUE CredentialFinalization."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.LOGIN_FINISH
    SIZE: ClassVar[int] = CREDENTIAL_FINALIZATION_SIZE
    credential_finalization: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Abort(_AbortOrGoAway):
    """Ends one session with a code and a short reason (clear: may precede the channel)."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.ABORT


@dataclass(frozen=True, slots=True)
class GoAway(_AbortOrGoAway):
    """Ends the whole connection (session id 0); same layout as ABORT."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.GOAWAY


# ------------------------------------------------------------- sealed records


@dataclass(frozen=True, slots=True)
class Record(_Decodable):
    """A sealed frame's payload: explicit sequence number and AEAD ciphertext (with tag)."""

    seq: int
    ciphertext: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.seq < 2**64:
            raise ValueError("seq out of range")
        if len(self.ciphertext) < TAG_SIZE:
            raise ValueError("ciphertext shorter than the tag")

    def encode(self) -> bytes:
        return _U64.pack(self.seq) + self.ciphertext

    @classmethod
    def decode(cls, payload: bytes) -> Record:
        if len(payload) < 8:  # (fixed layout, read in place: every sealed frame's path)
            raise RemoteProtocolError("truncated sealed record")
        return cls._build("sealed record", _U64.unpack_from(payload)[0], payload[8:])


@dataclass(frozen=True, slots=True)
class ResumeEnvelope(_Decodable):
    """RESUME frame payload: which session, then a record sealed with that session's resume key."""

    session_handle: bytes
    record: Record

    def __post_init__(self) -> None:
        _check_size("session_handle", self.session_handle, SESSION_HANDLE_SIZE)

    def encode(self) -> bytes:
        return Writer().fixed(self.session_handle, SESSION_HANDLE_SIZE).rest(self.record.encode()).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> ResumeEnvelope:
        r = Reader(payload, "RESUME")
        handle = r.fixed(SESSION_HANDLE_SIZE)
        record = Record.decode(r.rest())
        return cls._build("RESUME", handle, record)


@dataclass(frozen=True, slots=True)
class ResumedEnvelope(_Decodable):
    """RESUMED frame payload: the server's nonce for the new key epoch, then a record sealed
    in that epoch (sequence number 0), which proves the server derived the same keys."""

    server_nonce: bytes = field(repr=False)
    record: Record

    def __post_init__(self) -> None:
        _check_size("server_nonce", self.server_nonce, RESUME_NONCE_SIZE)

    def encode(self) -> bytes:
        return Writer().fixed(self.server_nonce, RESUME_NONCE_SIZE).rest(self.record.encode()).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> ResumedEnvelope:
        r = Reader(payload, "RESUMED")
        nonce = r.fixed(RESUME_NONCE_SIZE)
        record = Record.decode(r.rest())
        return cls._build("RESUMED", nonce, record)


# ------------------------------------------------- sealed plaintext messages


@dataclass(frozen=True, slots=True)
class Welcome(_FixedSize):
    """First sealed server message: OPAQUE succeeded on the server; here is the user_id."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.WELCOME
    SIZE: ClassVar[int] = USER_ID_SIZE
    user_id: bytes


@dataclass(frozen=True, slots=True)
class CompleteRegistration(_Decodable):
    """REG-3: the client's user_id and encrypted_storage_key."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.COMPLETE_REGISTRATION
    user_id: bytes
    encrypted_storage_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_size("user_id", self.user_id, USER_ID_SIZE)
        _check_size("encrypted_storage_key", self.encrypted_storage_key, ENCRYPTED_STORAGE_KEY_SIZE)

    def encode(self) -> bytes:
        return self.user_id + self.encrypted_storage_key

    @classmethod
    def decode(cls, payload: bytes) -> CompleteRegistration:
        r = Reader(payload, "COMPLETE_REGISTRATION")
        user_id = r.fixed(USER_ID_SIZE)
        esk = r.fixed(ENCRYPTED_STORAGE_KEY_SIZE)
        r.done()
        return cls(user_id, esk)


@dataclass(frozen=True, slots=True)
class Request(_RequestOrResponse):
    """An application request: a per-session request id and an opaque body."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.REQUEST


@dataclass(frozen=True, slots=True)
class Response(_RequestOrResponse):
    """The answer to the request with the same request id."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.RESPONSE


@dataclass(frozen=True, slots=True)
class Close(_Decodable):
    """Authenticated end of an established session (logout, expiry, limit, registration done)."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.CLOSE
    code: ErrorCode

    def encode(self) -> bytes:
        return Writer().u16(self.code).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> Close:
        r = Reader(payload, "CLOSE")
        code = _read_code(r)
        r.done()
        return cls(code)


@dataclass(frozen=True, slots=True)
class Resume(_Decodable):
    """Sealed body of a RESUME (under the session's resume key): the client's nonce for the new
    key epoch and how many records it has received from the server over the session's life
    (a server whose state says it sent fewer has been rolled back and refuses)."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.RESUME
    client_nonce: bytes = field(repr=False)
    received_total: int

    def __post_init__(self) -> None:
        _check_size("client_nonce", self.client_nonce, RESUME_NONCE_SIZE)
        if not 0 <= self.received_total < 2**64:
            raise ValueError("received_total out of range")

    def encode(self) -> bytes:
        return Writer().fixed(self.client_nonce, RESUME_NONCE_SIZE).u64(self.received_total).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> Resume:
        r = Reader(payload, "RESUME body")
        nonce = r.fixed(RESUME_NONCE_SIZE)
        received = r.u64()
        r.done()
        return cls(nonce, received)


@dataclass(frozen=True, slots=True)
class Resumed(_Decodable):
    """Sealed server acknowledgement of a RESUME: empty, the first record of the new key epoch."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.RESUMED

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: bytes) -> Resumed:
        Reader(payload, "RESUMED body").done()
        return cls()


_PAYLOAD_CLASSES: tuple[type[Message], ...] = (
    GoAway,
    RegStart,
    RegResponse,
    RegUpload,
    LoginStart,
    LoginResponse,
    LoginFinish,
    Abort,
    Welcome,
    CompleteRegistration,
    Request,
    Response,
    Close,
    Resume,
    Resumed,
)
#: Frame type -> payload class (for sealed types: the class of the plaintext), as each class's
#: FRAME_TYPE says.
MESSAGE_TYPES: dict[FrameType, type[Message]] = {cls.FRAME_TYPE: cls for cls in _PAYLOAD_CLASSES}


def decode_message(frame_type: FrameType, payload: bytes) -> Message:
    """Decode a clear payload, or a sealed plaintext, of the given frame type."""
    return MESSAGE_TYPES[frame_type].decode(payload)
