"""Operations on secrets (OPS-1..OPS-8, KEY-1, AUD-1): the bodies of REQUEST and RESPONSE.

A request body is ``op (u8) || user_id (16) || fields``; every request names
the user, and the server checks it against the session. A response body is
``status (u8)`` followed, when the status is OK, by the fields of the op's
response. Fixed binary layout as in :mod:`keymgmt_proto._wire`; see
docs/protocol.md.

Also here: KEY-1 key identifiers, sealing of secrets under ``storage_key``
with the AD the spec prescribes, and the portable format of a secret (``len || secret``
for 1..255 bytes, a versioned long form for larger ones, OPS-12).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from types import MappingProxyType
from typing import ClassVar, Self, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ._crypto import RandomSource
from ._errors import ErrorCode, RemoteProtocolError
from ._messages import (
    ENCRYPTED_STORAGE_KEY_SIZE,
    REGISTRATION_REQUEST_SIZE,
    REGISTRATION_RESPONSE_SIZE,
    REGISTRATION_UPLOAD_SIZE,
    USER_ID_SIZE,
    _Decodable,
)
from ._wire import Reader, Writer

__all__ = [
    "AUDIT_CHAIN_DOMAIN",
    "AUDIT_HASH_SIZE",
    "GENERATED_SECRET_SIZE",
    "IMPORTED_KEY_AD_SUFFIX",
    "KEY_ID_CONTRIBUTION_DOMAIN",
    "KEY_ID_DOMAIN",
    "KEY_ID_NONCE_SIZE",
    "KEY_ID_SIZE",
    "LABEL_AD_DOMAIN",
    "LABEL_PAD_SIZE",
    "MAX_AUDIT_PAGE",
    "MAX_AUDIT_SCAN",
    "MAX_LABEL_SIZE",
    "MAX_LIST_PAGE",
    "MAX_SEALED_LABEL_SIZE",
    "MAX_SEALED_SIZE",
    "MAX_SECRET_SIZE",
    "MAX_SHORT_PORTABLE_SIZE",
    "OPERATIONS",
    "PORTABLE_LONG_HEADER_SIZE",
    "PORTABLE_LONG_MARKER",
    "PORTABLE_LONG_VERSION",
    "READ_OPS",
    "SEALED_OVERHEAD",
    "Action",
    "AuditEntry",
    "AuditRequest",
    "AuditResponse",
    "AuditType",
    "ChangePasswordFinishRequest",
    "ChangePasswordStartRequest",
    "Context",
    "CreateKeyIdRequest",
    "DeleteAccountRequest",
    "DeleteKeyRequest",
    "Empty",
    "KeyIdResponse",
    "KeyInfo",
    "KeyListResponse",
    "ListKeysRequest",
    "Op",
    "OpRequest",
    "OpResponse",
    "Operation",
    "Outcome",
    "PasswordRegistrationResponse",
    "RenameKeyRequest",
    "RetrieveRequest",
    "RetrieveStorageKeyRequest",
    "SecretKind",
    "SecretResponse",
    "Status",
    "StorageKeyResponse",
    "StoreSecretRequest",
    "StoredResponse",
    "ad_matches",
    "audit_chain_hash",
    "audit_chain_hash_of",
    "audit_genesis_hash",
    "check_label",
    "decode_portable",
    "decode_request",
    "decode_response",
    "derive_key_id",
    "encode_portable",
    "encode_response",
    "joint_key_id",
    "label_ad",
    "open_label",
    "open_secret",
    "retrieve_fields",
    "seal_label",
    "seal_secret",
    "secret_ad",
    "secret_answer",
]

KEY_ID_SIZE = 16
#: KEY-1 domain-separation string ``d``.
KEY_ID_DOMAIN = b"keymgmt v1 key id"
#: KEY-2: domain separation for combining the two sides' randomness into KEY-1's ``r``.
KEY_ID_CONTRIBUTION_DOMAIN = b"keymgmt v1 key id contributions"
#: KEY-2: each side's random contribution to a key id.
KEY_ID_NONCE_SIZE = 32
#: OPS-3: the AD suffix of imported secrets.
IMPORTED_KEY_AD_SUFFIX = b"imported key"
#: OPS-2: generated secrets are 32 uniformly random bytes.
GENERATED_SECRET_SIZE = 32
#: OPS-12: secrets are 1..MAX_SECRET_SIZE bytes (64 KiB).
MAX_SECRET_SIZE = 64 * 1024
#: OPS-3/OPS-5: secrets of 1..255 bytes keep the spec's portable form ``len u8 || secret``.
MAX_SHORT_PORTABLE_SIZE = 255
#: OPS-12: first byte of the long portable form (never a valid short length byte).
PORTABLE_LONG_MARKER = 0x00
#: OPS-12: second byte of the long portable form: its version.
PORTABLE_LONG_VERSION = 0x01
#: Marker, version and the u32 length before a secret in the long portable form.
PORTABLE_LONG_HEADER_SIZE = 6
#: A sealed secret is the secret plus a 12-byte nonce and a 16-byte tag.
SEALED_OVERHEAD = 28
#: The largest sealed secret (a 64 KiB secret plus nonce and tag).
MAX_SEALED_SIZE = MAX_SECRET_SIZE + SEALED_OVERHEAD
#: Most audit entries one response carries; ask again with ``cursor`` for more.
MAX_AUDIT_PAGE = 256
#: Most of the user's entries one AUDIT request reads (16 pages): a filter that matches little
#: gets a short or empty page with a ``next_cursor`` past the entries read, not a scan of the
#: whole log (protocol.md 12.9).
MAX_AUDIT_SCAN = 16 * MAX_AUDIT_PAGE
#: Most keys one LIST_KEYS response carries (26..118 bytes each with its sealed label: a full
#: page of the longest labels, 60 423 bytes, stays inside a frame).
MAX_LIST_PAGE = 512
#: Named keys: the largest label, in UTF-8 bytes.
MAX_LABEL_SIZE = 64
#: A sealed label is the label plus a 12-byte nonce and a 16-byte tag.
MAX_SEALED_LABEL_SIZE = MAX_LABEL_SIZE + 28
#: Named keys: a label is padded with zero bytes to a multiple of this many bytes before it
#: is sealed, so a sealed label's length tells only whether the label has up to 32 bytes or
#: more (sealed: 60 or 92 bytes), not its length.
LABEL_PAD_SIZE = 32
#: Named keys: the first part of a sealed label's AD (distinct from a secret's AD, which
#: is 32 or 44 bytes; a label's is 52).
LABEL_AD_DOMAIN = b"keymgmt v1 key label"
#: The audit chain: domain separation of each entry's hash.
AUDIT_CHAIN_DOMAIN = b"keymgmt v1 audit chain"
#: The audit chain: SHA3-256 output size.
AUDIT_HASH_SIZE = 32
_NONCE = 12
_TAG = 16
_E = TypeVar("_E", bound=IntEnum)
_U8 = struct.Struct(">B")
#: A SecretResponse's kind and ciphertext length.
_KIND_AND_SIZE = struct.Struct(">BI")
#: An audit entry's canonical encoding (section 12.9) in one pack: entry id u64, action u8,
#: timestamp u64, outcome u8, count u32, key-id flag u8 (+ key id), context u8 (0xFF: none).
_ENTRY_WITH_KEY = struct.Struct(f">QBQBIB{KEY_ID_SIZE}sB")
_ENTRY_WITHOUT_KEY = struct.Struct(">QBQBIBB")
#: What every audit-chain hash input starts with: u16 length of the domain, the domain.
_AUDIT_CHAIN_PREFIX = struct.pack(">H", len(AUDIT_CHAIN_DOMAIN)) + AUDIT_CHAIN_DOMAIN


class Op(IntEnum):
    RETRIEVE_STORAGE_KEY = 1
    CREATE_KEY_ID = 2
    STORE_SECRET = 3
    RETRIEVE = 4
    AUDIT = 5
    LIST_KEYS = 6
    DELETE_KEY = 7
    #: Password change, first step: the OPAQUE registration response for the new password.
    CHANGE_PASSWORD_START = 8
    #: Password change, second step: the new record and the re-wrapped storage key.
    CHANGE_PASSWORD_FINISH = 9
    #: Delete the account: record, secrets and throttling state; the name stays reserved.
    DELETE_ACCOUNT = 10
    #: Named keys: set, change or remove a key's sealed label (issue 16).
    RENAME_KEY = 12


#: The reads: operations that change nothing but the audit log (protocol.md section 9).
#: A server may drop the answer to one of them from its reply cache and run the request
#: again if the client re-sends it; every other request's answer is kept.
READ_OPS: frozenset[Op] = frozenset(
    {Op.RETRIEVE_STORAGE_KEY, Op.RETRIEVE, Op.AUDIT, Op.LIST_KEYS, Op.CHANGE_PASSWORD_START}
)


class Status(IntEnum):
    """Outcome of a request, first byte of every response body."""

    OK = 0
    #: No such key for this user (OPS-7: also the answer for another user's key).
    NOT_FOUND = 1
    #: The request's user_id is not the session's.
    WRONG_USER = 2
    #: A field parses but is not acceptable (context, size, unknown key id reservation...).
    INVALID = 3
    #: The server failed (storage error); nothing was changed.
    INTERNAL_ERROR = 4
    #: A per-user limit of the server was reached (e.g. the number of stored keys).
    LIMIT_REACHED = 5
    #: The user's requests came faster than the server's per-user rate: nothing was done
    #: (nothing audited); send the request again after a moment.
    RATE_LIMITED = 6


class SecretKind(IntEnum):
    GENERATED = 1
    IMPORTED = 2


class Context(IntEnum):
    """OPS-4 retrieve contexts."""

    NULL = 0
    LOCAL_ONLY = 1
    EXPORT = 2


class AuditType(IntEnum):
    """OPS-6 audit selections."""

    SYSTEM_ONLY = 1
    KEY_ONLY = 2
    ALL = 3


class Action(IntEnum):
    """What an audit entry records (AUD-1)."""

    REGISTER = 1
    LOGIN = 2
    LOGOUT = 3
    RETRIEVE_STORAGE_KEY = 4
    CREATE_KEY_ID = 5
    GENERATE = 6
    IMPORT = 7
    RETRIEVE = 8
    LIST_KEYS = 9
    DELETE_KEY = 10
    AUDIT = 11
    #: Ended by idle timeout, lifetime or request limit (NET-8, NET-11).
    SESSION_EXPIRED = 12
    #: A request body that names no valid operation (audited all the same).
    MALFORMED_REQUEST = 13
    #: A login refused because of earlier failed logins (NET-10).
    LOGIN_THROTTLED = 14
    #: The password was changed (CHANGE_PASSWORD_FINISH).
    CHANGE_PASSWORD = 15
    #: The account was deleted (only a refusal stays in the log: a deletion takes the log along).
    DELETE_ACCOUNT = 16
    #: A password change started (CHANGE_PASSWORD_START).
    CHANGE_PASSWORD_START = 17
    #: A key's sealed label set, changed or removed (RENAME_KEY).
    RENAME_KEY = 20

    @property
    def is_key_action(self) -> bool:
        """True for operations on keys (OPS-6 "key only"); the rest are "system only"."""
        return self in _KEY_ACTIONS


_KEY_ACTIONS = frozenset(
    {
        Action.CREATE_KEY_ID,
        Action.GENERATE,
        Action.IMPORT,
        Action.RETRIEVE,
        Action.LIST_KEYS,
        Action.DELETE_KEY,
        Action.RENAME_KEY,
    }
)


class Outcome(IntEnum):
    SUCCESS = 0
    FAILURE = 1


def _enum(cls: type[_E], value: int, what: str) -> _E:
    # The members by value, looked up directly: ``cls(value)`` runs Enum's Python-level
    # __call__ and __new__ (about half a microsecond per field on the request path).
    member = cls._value2member_map_.get(value)
    if member is None:
        raise RemoteProtocolError(f"unknown {what} {value}")
    return member  # type: ignore[return-value]


def _check_user_id(user_id: bytes) -> None:
    if len(user_id) != USER_ID_SIZE:
        raise ValueError("user_id must be 16 bytes")


def _check_key_id(key_id: bytes) -> None:
    if len(key_id) != KEY_ID_SIZE:
        raise ValueError("key_id must be 16 bytes")


def _check_sealed_secret(kind: SecretKind, ciphertext: bytes) -> None:
    size = len(ciphertext) - SEALED_OVERHEAD
    if kind is SecretKind.GENERATED and size != GENERATED_SECRET_SIZE:
        raise ValueError("a generated secret's ciphertext must hold 32 bytes")
    if not 1 <= size <= MAX_SECRET_SIZE:
        raise ValueError(f"a secret must be 1..{MAX_SECRET_SIZE} bytes")


# ------------------------------------------------------------------ requests


class OpRequest(_Decodable):
    """Base of every request body."""

    __slots__ = ()
    OP: ClassVar[Op]
    user_id: bytes

    @property
    def op(self) -> Op:
        return self.OP

    @property
    def audit_action(self) -> Action:
        """What the key server's audit log records for this request (AUD-1)."""
        return OPERATIONS[self.OP].action

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def read_fields(cls, user_id: bytes, r: Reader) -> Self:
        """Decode the fields after the op byte and the user id."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class RetrieveStorageKeyRequest(OpRequest):
    """OPS-1."""

    OP: ClassVar[Op] = Op.RETRIEVE_STORAGE_KEY
    user_id: bytes

    def __post_init__(self) -> None:
        _check_user_id(self.user_id)

    def encode(self) -> bytes:
        return Writer().u8(self.OP).fixed(self.user_id, USER_ID_SIZE).getvalue()

    @classmethod
    def read_fields(cls, user_id: bytes, r: Reader) -> Self:
        return cls._build("request", user_id)


@dataclass(frozen=True, slots=True)
class CreateKeyIdRequest(OpRequest):
    """OPS-2/OPS-3, first step: the server reserves a fresh key id, derived from the client's
    nonce and its own randomness (KEY-2, :func:`joint_key_id`)."""

    OP: ClassVar[Op] = Op.CREATE_KEY_ID
    user_id: bytes
    kind: SecretKind
    client_nonce: bytes

    def __post_init__(self) -> None:
        _check_user_id(self.user_id)
        if len(self.client_nonce) != KEY_ID_NONCE_SIZE:
            raise ValueError(f"client_nonce must be {KEY_ID_NONCE_SIZE} bytes")

    def encode(self) -> bytes:
        w = Writer().u8(self.OP).fixed(self.user_id, USER_ID_SIZE).u8(self.kind)
        return w.fixed(self.client_nonce, KEY_ID_NONCE_SIZE).getvalue()

    @classmethod
    def read_fields(cls, user_id: bytes, r: Reader) -> Self:
        kind = _enum(SecretKind, r.u8(), "secret kind")
        return cls._build("request", user_id, kind, r.fixed(KEY_ID_NONCE_SIZE))


@dataclass(frozen=True, slots=True)
class StoreSecretRequest(OpRequest):
    """OPS-2/OPS-3, second step: the sealed secret under a key id this session reserved.

    With ``next_kind`` and ``next_client_nonce`` it also asks for the next key id, reserved
    as CREATE_KEY_ID would reserve it and sent back in the OK answer (:class:`StoredResponse`),
    so that the following store is a single request."""

    OP: ClassVar[Op] = Op.STORE_SECRET
    user_id: bytes
    key_id: bytes
    kind: SecretKind
    ciphertext: bytes = field(repr=False)
    next_kind: SecretKind | None = None
    next_client_nonce: bytes | None = None

    def __post_init__(self) -> None:
        _check_user_id(self.user_id)
        _check_key_id(self.key_id)
        _check_sealed_secret(self.kind, self.ciphertext)
        if (self.next_kind is None) != (self.next_client_nonce is None):
            raise ValueError("a next key id needs both its kind and the client's nonce")
        if self.next_client_nonce is not None and len(self.next_client_nonce) != KEY_ID_NONCE_SIZE:
            raise ValueError(f"next_client_nonce must be {KEY_ID_NONCE_SIZE} bytes")

    def encode(self) -> bytes:
        next_kind, next_nonce = self.next_kind, self.next_client_nonce
        if len(self.ciphertext) == _STORE_NEXT_SEALED and next_kind is not None and next_nonce is not None:
            # The one-request store of a generated secret (section 12.10): one pack, the bytes
            # the general path below writes (every size was checked by __post_init__).
            return _STORE_NEXT.pack(
                self.OP,
                self.user_id,
                self.key_id,
                self.kind,
                _STORE_NEXT_SEALED,
                self.ciphertext,
                1,
                next_kind,
                next_nonce,
            )
        w = (
            Writer()
            .u8(self.OP)
            .fixed(self.user_id, USER_ID_SIZE)
            .fixed(self.key_id, KEY_ID_SIZE)
            .u8(self.kind)
            .bytes32(self.ciphertext)
        )
        if self.next_kind is None or self.next_client_nonce is None:
            return w.u8(0).getvalue()
        return w.u8(1).u8(self.next_kind).fixed(self.next_client_nonce, KEY_ID_NONCE_SIZE).getvalue()

    @classmethod
    def read_fields(cls, user_id: bytes, r: Reader) -> Self:
        key_id = r.fixed(KEY_ID_SIZE)
        kind = _enum(SecretKind, r.u8(), "secret kind")
        ciphertext = r.bytes32(MAX_SEALED_SIZE)
        if not _flag(r):
            return cls._build("request", user_id, key_id, kind, ciphertext)
        next_kind = _enum(SecretKind, r.u8(), "secret kind")
        return cls._build("request", user_id, key_id, kind, ciphertext, next_kind, r.fixed(KEY_ID_NONCE_SIZE))

    @property
    def audit_action(self) -> Action:
        return Action.IMPORT if self.kind is SecretKind.IMPORTED else Action.GENERATE


@dataclass(frozen=True, slots=True)
class RetrieveRequest(OpRequest):
    """OPS-4 (and OPS-5: export is a retrieve in the EXPORT context)."""

    OP: ClassVar[Op] = Op.RETRIEVE
    user_id: bytes
    key_id: bytes
    context: Context

    def __post_init__(self) -> None:
        _check_user_id(self.user_id)
        _check_key_id(self.key_id)

    def encode(self) -> bytes:
        return (
            Writer()
            .u8(self.OP)
            .fixed(self.user_id, USER_ID_SIZE)
            .fixed(self.key_id, KEY_ID_SIZE)
            .u8(self.context)
            .getvalue()
        )

    @classmethod
    def read_fields(cls, user_id: bytes, r: Reader) -> Self:
        key_id = r.fixed(KEY_ID_SIZE)
        return cls._build("request", user_id, key_id, _enum(Context, r.u8(), "retrieve context"))


@dataclass(frozen=True, slots=True)
class AuditRequest(OpRequest):
    """OPS-6. Times are microseconds since the Unix epoch; ``after``/``before`` are
    inclusive/exclusive bounds. ``cursor`` is 0 or a previous response's ``next_cursor``."""

    OP: ClassVar[Op] = Op.AUDIT
    user_id: bytes
    audit_type: AuditType
    key_ids: tuple[bytes, ...] = ()
    after: int | None = None
    before: int | None = None
    cursor: int = 0
    limit: int = MAX_AUDIT_PAGE

    def __post_init__(self) -> None:
        _check_user_id(self.user_id)
        for key_id in self.key_ids:
            _check_key_id(key_id)
        if len(self.key_ids) > 1024:
            raise ValueError("at most 1024 key ids per audit request")
        if self.key_ids and self.audit_type is AuditType.SYSTEM_ONLY:
            raise ValueError("key ids only select key operations")
        for bound in (self.after, self.before):
            if bound is not None and not 0 <= bound < 2**63:
                raise ValueError("time bound out of range")
        if not 0 <= self.cursor < 2**63:
            raise ValueError("cursor out of range")
        if not 1 <= self.limit <= MAX_AUDIT_PAGE:
            raise ValueError(f"limit must be 1..{MAX_AUDIT_PAGE}")

    def encode(self) -> bytes:
        w = Writer().u8(self.OP).fixed(self.user_id, USER_ID_SIZE).u8(self.audit_type)
        w.u16(len(self.key_ids))
        for key_id in self.key_ids:
            w.fixed(key_id, KEY_ID_SIZE)
        for bound in (self.after, self.before):
            w.u8(0) if bound is None else w.u8(1).u64(bound)
        return w.u64(self.cursor).u16(self.limit).getvalue()

    @classmethod
    def read_fields(cls, user_id: bytes, r: Reader) -> Self:
        audit_type = _enum(AuditType, r.u8(), "audit type")
        key_ids = tuple(r.fixed(KEY_ID_SIZE) for _ in range(r.u16()))
        after = _optional_u64(r)
        before = _optional_u64(r)
        return cls._build("request", user_id, audit_type, key_ids, after, before, r.u64(), r.u16())


@dataclass(frozen=True, slots=True)
class ListKeysRequest(OpRequest):
    """OPS-8: the user's key ids with kind and creation time, a page at a time.

    ``cursor`` is 0 or a previous response's ``next_cursor`` (keys skipped so far)."""

    OP: ClassVar[Op] = Op.LIST_KEYS
    user_id: bytes
    cursor: int = 0
    limit: int = MAX_LIST_PAGE

    def __post_init__(self) -> None:
        _check_user_id(self.user_id)
        if not 0 <= self.cursor < 2**32:
            raise ValueError("cursor out of range")
        if not 1 <= self.limit <= MAX_LIST_PAGE:
            raise ValueError(f"limit must be 1..{MAX_LIST_PAGE}")

    def encode(self) -> bytes:
        return (
            Writer().u8(self.OP).fixed(self.user_id, USER_ID_SIZE).u32(self.cursor).u16(self.limit).getvalue()
        )

    @classmethod
    def read_fields(cls, user_id: bytes, r: Reader) -> Self:
        return cls._build("request", user_id, r.u32(), r.u16())


@dataclass(frozen=True, slots=True)
class DeleteKeyRequest(OpRequest):
    """OPS-8: delete one of the user's keys."""

    OP: ClassVar[Op] = Op.DELETE_KEY
    user_id: bytes
    key_id: bytes

    def __post_init__(self) -> None:
        _check_user_id(self.user_id)
        _check_key_id(self.key_id)

    def encode(self) -> bytes:
        return (
            Writer().u8(self.OP).fixed(self.user_id, USER_ID_SIZE).fixed(self.key_id, KEY_ID_SIZE).getvalue()
        )

    @classmethod
    def read_fields(cls, user_id: bytes, r: Reader) -> Self:
        return cls._build("request", user_id, r.fixed(KEY_ID_SIZE))


@dataclass(frozen=True, slots=True)
class ChangePasswordStartRequest(OpRequest):
    """Password change, step 1: an OPAQUE RegistrationRequest for the new password (the
    blinded password; the server answers with its RegistrationResponse for the account's
    name, :class:`PasswordRegistrationResponse`). Changes nothing on the server."""

    OP: ClassVar[Op] = Op.CHANGE_PASSWORD_START
    user_id: bytes
    registration_request: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_user_id(self.user_id)
        if len(self.registration_request) != REGISTRATION_REQUEST_SIZE:
            raise ValueError(f"registration_request must be {REGISTRATION_REQUEST_SIZE} bytes")

    def encode(self) -> bytes:
        w = Writer().u8(self.OP).fixed(self.user_id, USER_ID_SIZE)
        return w.fixed(self.registration_request, REGISTRATION_REQUEST_SIZE).getvalue()

    @classmethod
    def read_fields(cls, user_id: bytes, r: Reader) -> Self:
        return cls._build("request", user_id, r.fixed(REGISTRATION_REQUEST_SIZE))


@dataclass(frozen=True, slots=True)
class ChangePasswordFinishRequest(OpRequest):
    """Password change, step 2: the OPAQUE RegistrationUpload (the new record) and the
    account's storage key encrypted under the new export key's master key. The server
    replaces both in one transaction and ends the account's other sessions."""

    OP: ClassVar[Op] = Op.CHANGE_PASSWORD_FINISH
    user_id: bytes
    registration_upload: bytes = field(repr=False)
    encrypted_storage_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_user_id(self.user_id)
        if len(self.registration_upload) != REGISTRATION_UPLOAD_SIZE:
            raise ValueError(f"registration_upload must be {REGISTRATION_UPLOAD_SIZE} bytes")
        if len(self.encrypted_storage_key) != ENCRYPTED_STORAGE_KEY_SIZE:
            raise ValueError(f"encrypted_storage_key must be {ENCRYPTED_STORAGE_KEY_SIZE} bytes")

    def encode(self) -> bytes:
        w = Writer().u8(self.OP).fixed(self.user_id, USER_ID_SIZE)
        w.fixed(self.registration_upload, REGISTRATION_UPLOAD_SIZE)
        return w.fixed(self.encrypted_storage_key, ENCRYPTED_STORAGE_KEY_SIZE).getvalue()

    @classmethod
    def read_fields(cls, user_id: bytes, r: Reader) -> Self:
        upload = r.fixed(REGISTRATION_UPLOAD_SIZE)
        return cls._build("request", user_id, upload, r.fixed(ENCRYPTED_STORAGE_KEY_SIZE))


@dataclass(frozen=True, slots=True)
class DeleteAccountRequest(OpRequest):
    """Delete the session's account: its record, every secret and the name's throttling
    state, in one transaction; every session of the account ends, this one after the answer."""

    OP: ClassVar[Op] = Op.DELETE_ACCOUNT
    user_id: bytes

    def __post_init__(self) -> None:
        _check_user_id(self.user_id)

    def encode(self) -> bytes:
        return Writer().u8(self.OP).fixed(self.user_id, USER_ID_SIZE).getvalue()

    @classmethod
    def read_fields(cls, user_id: bytes, r: Reader) -> Self:
        return cls._build("request", user_id)


@dataclass(frozen=True, slots=True)
class RenameKeyRequest(OpRequest):
    """Named keys: set or change the sealed label of one of the user's keys (an empty
    ``sealed_label`` removes it). The server stores it as it is and cannot read it."""

    OP: ClassVar[Op] = Op.RENAME_KEY
    user_id: bytes
    key_id: bytes
    sealed_label: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_user_id(self.user_id)
        _check_key_id(self.key_id)
        _check_sealed_label(self.sealed_label)

    def encode(self) -> bytes:
        w = Writer().u8(self.OP).fixed(self.user_id, USER_ID_SIZE).fixed(self.key_id, KEY_ID_SIZE)
        return w.bytes8(self.sealed_label).getvalue()

    @classmethod
    def read_fields(cls, user_id: bytes, r: Reader) -> Self:
        return cls._build("request", user_id, r.fixed(KEY_ID_SIZE), r.bytes8())


def _check_sealed_label(sealed_label: bytes) -> None:
    if sealed_label and not _NONCE + _TAG + 1 <= len(sealed_label) <= MAX_SEALED_LABEL_SIZE:
        raise ValueError(f"a sealed label is empty or {_NONCE + _TAG + 1}..{MAX_SEALED_LABEL_SIZE} bytes")


#: A RETRIEVE request body: op, user id, key id, context.
_RETRIEVE = struct.Struct(f">B{USER_ID_SIZE}s{KEY_ID_SIZE}sB")
_CONTEXTS: dict[int, Context] = {int(context): context for context in Context}
_new_object = object.__new__
_set_field = object.__setattr__


def _flag(r: Reader) -> bool:
    """An optional field's flag: 0 = absent, 1 = present, anything else an error."""
    flag = r.u8()
    if flag not in (0, 1):
        raise RemoteProtocolError("optional field flag must be 0 or 1")
    return flag == 1


def _optional_u64(r: Reader) -> int | None:
    return r.u64() if _flag(r) else None


#: A STORE_SECRET body of a generated secret (32 bytes sealed: 60) that asks for the next key
#: id: op, user id, key id, kind, u32 length and sealed secret, flag 1, next kind, client nonce.
_STORE_NEXT_SEALED = GENERATED_SECRET_SIZE + SEALED_OVERHEAD
_STORE_NEXT = struct.Struct(f">B{USER_ID_SIZE}s{KEY_ID_SIZE}sBI{_STORE_NEXT_SEALED}sBB{KEY_ID_NONCE_SIZE}s")
_KINDS: dict[int, SecretKind] = {int(kind): kind for kind in SecretKind}


def _decode_store_next(body: bytes) -> StoreSecretRequest | None:
    """A body of the _STORE_NEXT layout as read_fields reads it, with the same checks (the
    layout fixes every size); None for another layout (the general path reads it)."""
    _, user_id, key_id, raw_kind, size, ciphertext, flag, raw_next, nonce = _STORE_NEXT.unpack(body)
    if size != _STORE_NEXT_SEALED or flag != 1:
        return None
    kind, next_kind = _KINDS.get(raw_kind), _KINDS.get(raw_next)
    if kind is None or next_kind is None:
        return None  # (the general path raises the error)
    store = _new_object(StoreSecretRequest)
    _set_field(store, "user_id", user_id)
    _set_field(store, "key_id", key_id)
    _set_field(store, "kind", kind)
    _set_field(store, "ciphertext", ciphertext)
    _set_field(store, "next_kind", next_kind)
    _set_field(store, "next_client_nonce", nonce)
    return store


def retrieve_fields(body: bytes) -> tuple[bytes, bytes, Context] | None:
    """The user id, key id and context of a RETRIEVE body of the fixed layout, as
    :func:`decode_request` reads them, without a RetrieveRequest (the server's commonest
    request); None for any other body, or a context it would refuse (it reads those)."""
    if len(body) != _RETRIEVE.size or body[0] != _RETRIEVE_OP:
        return None
    _, user_id, key_id, raw_context = _RETRIEVE.unpack(body)
    context = _CONTEXTS.get(raw_context)
    return None if context is None else (user_id, key_id, context)


_RETRIEVE_OP = int(Op.RETRIEVE)


def decode_request(body: bytes) -> OpRequest:
    """Parse a request body; RemoteProtocolError if it is malformed or names no operation."""
    if len(body) == _STORE_NEXT.size and body[0] == Op.STORE_SECRET:
        store = _decode_store_next(body)
        if store is not None:
            return store
    if len(body) == _RETRIEVE.size and body[0] == Op.RETRIEVE:
        # The commonest request, fixed layout: one unpack (the same checks as below). The
        # layout fixed the ids' sizes, which RetrieveRequest's __post_init__ would check
        # again (three Python calls): its fields are set as its frozen __init__ sets them.
        _, user_id, key_id, raw_context = _RETRIEVE.unpack(body)
        context = _CONTEXTS.get(raw_context)
        if context is None:
            raise RemoteProtocolError(f"unknown retrieve context {raw_context}")
        retrieve = _new_object(RetrieveRequest)
        _set_field(retrieve, "user_id", user_id)
        _set_field(retrieve, "key_id", key_id)
        _set_field(retrieve, "context", context)
        return retrieve
    r = Reader(body, "request")
    op = _enum(Op, r.u8(), "op")
    user_id = r.fixed(USER_ID_SIZE)
    operation = OPERATIONS.get(op)
    if operation is None:  # an Op not declared in OPERATIONS: refused, never guessed
        raise RemoteProtocolError(f"op {op.name} is not supported")
    request = operation.request.read_fields(user_id, r)
    r.done()
    return request


# ----------------------------------------------------------------- responses


class OpResponse(_Decodable):
    """Base of every OK response body (after the status byte)."""

    __slots__ = ()

    def encode_fields(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def read_fields(cls, r: Reader) -> Self:
        """Decode the fields after the status byte."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Empty(OpResponse):
    """OK with nothing more (delete)."""

    def encode_fields(self) -> bytes:
        return b""

    @classmethod
    def read_fields(cls, r: Reader) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class PasswordRegistrationResponse(OpResponse):
    """OK to CHANGE_PASSWORD_START: the OPAQUE RegistrationResponse for the new password."""

    registration_response: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.registration_response) != REGISTRATION_RESPONSE_SIZE:
            raise ValueError(f"registration_response must be {REGISTRATION_RESPONSE_SIZE} bytes")

    def encode_fields(self) -> bytes:
        return self.registration_response

    @classmethod
    def read_fields(cls, r: Reader) -> Self:
        return cls._build("response", r.fixed(REGISTRATION_RESPONSE_SIZE))


@dataclass(frozen=True, slots=True)
class StoredResponse(OpResponse):
    """OK to STORE_SECRET: the next key id and the server's contribution to it (KEY-2) when
    the request asked for one and the server reserved it, else neither."""

    next_key_id: bytes | None = None
    next_server_nonce: bytes | None = None

    def __post_init__(self) -> None:
        if (self.next_key_id is None) != (self.next_server_nonce is None):
            raise ValueError("a next key id comes with the server's nonce")
        if self.next_key_id is not None:
            _check_key_id(self.next_key_id)
        if self.next_server_nonce is not None and len(self.next_server_nonce) != KEY_ID_NONCE_SIZE:
            raise ValueError(f"next_server_nonce must be {KEY_ID_NONCE_SIZE} bytes")

    def encode_fields(self) -> bytes:
        if self.next_key_id is None or self.next_server_nonce is None:
            return b"\x00"
        return b"\x01" + self.next_key_id + self.next_server_nonce

    @classmethod
    def read_fields(cls, r: Reader) -> Self:
        if not _flag(r):
            return cls()
        return cls._build("response", r.fixed(KEY_ID_SIZE), r.fixed(KEY_ID_NONCE_SIZE))


@dataclass(frozen=True, slots=True)
class StorageKeyResponse(OpResponse):
    encrypted_storage_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.encrypted_storage_key) != _NONCE + 32 + _TAG:
            raise ValueError("encrypted_storage_key must be 60 bytes")

    def encode_fields(self) -> bytes:
        return self.encrypted_storage_key

    @classmethod
    def read_fields(cls, r: Reader) -> Self:
        return cls._build("response", r.fixed(_NONCE + 32 + _TAG))


@dataclass(frozen=True, slots=True)
class KeyIdResponse(OpResponse):
    """The reserved key id and the server's contribution to it (KEY-2): the client checks
    ``key_id == joint_key_id(user_id, its nonce, server_nonce)``."""

    key_id: bytes
    server_nonce: bytes

    def __post_init__(self) -> None:
        _check_key_id(self.key_id)
        if len(self.server_nonce) != KEY_ID_NONCE_SIZE:
            raise ValueError(f"server_nonce must be {KEY_ID_NONCE_SIZE} bytes")

    def encode_fields(self) -> bytes:
        return self.key_id + self.server_nonce

    @classmethod
    def read_fields(cls, r: Reader) -> Self:
        return cls._build("response", r.fixed(KEY_ID_SIZE), r.fixed(KEY_ID_NONCE_SIZE))


@dataclass(frozen=True, slots=True)
class SecretResponse(OpResponse):
    """The stored ciphertext and its AD (OPS-4)."""

    kind: SecretKind
    ciphertext: bytes = field(repr=False)
    associated_data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_sealed_secret(self.kind, self.ciphertext)
        if len(self.associated_data) > 255:
            raise ValueError("associated data too long")

    def encode_fields(self) -> bytes:
        # kind u8, ciphertext with a u32 length, AD with a u8 length (both checked on construction)
        ad = self.associated_data
        return _KIND_AND_SIZE.pack(self.kind, len(self.ciphertext)) + self.ciphertext + _U8.pack(len(ad)) + ad

    @classmethod
    def read_fields(cls, r: Reader) -> Self:
        kind = _enum(SecretKind, r.u8(), "secret kind")
        return cls._build("response", kind, r.bytes32(MAX_SEALED_SIZE), r.bytes8())


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit log entry (AUD-1). ``timestamp`` is microseconds since the Unix epoch;
    ``count`` is how many events the entry stands for: 1, except for login attempts, which
    are recorded as one entry per run (the failures since the last success, the attempts
    refused while throttled) with the time of the last one."""

    entry_id: int
    action: Action
    timestamp: int
    outcome: Outcome
    key_id: bytes | None = None
    context: Context | None = None
    count: int = 1
    #: The audit chain: this entry's hash as the server sent it (:func:`audit_chain_hash`);
    #: None for an entry not (yet) in a chain.
    chain_hash: bytes | None = None

    def __post_init__(self) -> None:
        if self.key_id is not None:
            _check_key_id(self.key_id)
        if not 1 <= self.count < 2**32:
            raise ValueError("count must be 1..2**32-1")
        if self.chain_hash is not None and len(self.chain_hash) != AUDIT_HASH_SIZE:
            raise ValueError(f"chain_hash must be {AUDIT_HASH_SIZE} bytes")

    def encode(self) -> bytes:
        """The entry's canonical encoding (without its hash): on the wire, and what the
        audit chain hashes."""
        return _encode_entry(
            self.entry_id, self.action, self.timestamp, self.outcome, self.key_id, self.context, self.count
        )

    @classmethod
    def read(cls, r: Reader) -> AuditEntry:
        entry_id = r.u64()
        action = _enum(Action, r.u8(), "audit action")
        timestamp = r.u64()
        outcome = _enum(Outcome, r.u8(), "audit outcome")
        count = r.u32()
        flag = r.u8()
        if flag not in (0, 1):
            raise RemoteProtocolError("optional field flag must be 0 or 1")
        key_id = r.fixed(KEY_ID_SIZE) if flag else None
        raw_context = r.u8()
        context = None if raw_context == 0xFF else _enum(Context, raw_context, "retrieve context")
        try:
            return cls(entry_id, action, timestamp, outcome, key_id, context, count)
        except ValueError as exc:
            raise RemoteProtocolError(f"invalid audit entry: {exc}") from None

    def to_json(self) -> dict[str, object]:
        """AUD-2: the documented JSON form of an entry (``hash`` null when it has none)."""
        return {
            "entry_id": self.entry_id,
            "action": self.action.name.lower(),
            "timestamp_us": self.timestamp,
            "outcome": self.outcome.name.lower(),
            "key_id": self.key_id.hex() if self.key_id is not None else None,
            "context": self.context.name.lower() if self.context is not None else None,
            "count": self.count,
            "hash": self.chain_hash.hex() if self.chain_hash is not None else None,
        }


@dataclass(frozen=True, slots=True)
class AuditResponse(OpResponse):
    entries: tuple[AuditEntry, ...]
    #: 0 when there is nothing more; else pass it as the next request's cursor.
    next_cursor: int = 0

    def __post_init__(self) -> None:
        if len(self.entries) > MAX_AUDIT_PAGE:
            raise ValueError("too many audit entries for one response")
        if any(entry.chain_hash is None for entry in self.entries):
            raise ValueError("every audit entry in a response carries its chain hash")

    def encode_fields(self) -> bytes:
        w = Writer().u16(len(self.entries))
        for entry in self.entries:
            assert entry.chain_hash is not None
            w.rest(entry.encode()).fixed(entry.chain_hash, AUDIT_HASH_SIZE)
        return w.u64(self.next_cursor).getvalue()

    @classmethod
    def read_fields(cls, r: Reader) -> Self:
        count = r.u16()
        if count > MAX_AUDIT_PAGE:
            raise RemoteProtocolError("too many audit entries")
        entries = []
        for _ in range(count):
            entry = AuditEntry.read(r)
            entries.append(replace(entry, chain_hash=r.fixed(AUDIT_HASH_SIZE)))
        return cls._build("response", tuple(entries), r.u64())


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One key in a LIST_KEYS answer; ``sealed_label`` is empty when the key has no label."""

    key_id: bytes
    kind: SecretKind
    created: int
    sealed_label: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        _check_key_id(self.key_id)
        _check_sealed_label(self.sealed_label)


@dataclass(frozen=True, slots=True)
class KeyListResponse(OpResponse):
    keys: tuple[KeyInfo, ...]
    #: 0 when there is nothing more; else pass it as the next request's cursor.
    next_cursor: int = 0

    def __post_init__(self) -> None:
        if len(self.keys) > MAX_LIST_PAGE:
            raise ValueError("too many keys for one response")

    def encode_fields(self) -> bytes:
        w = Writer().u16(len(self.keys))
        for info in self.keys:
            w.fixed(info.key_id, KEY_ID_SIZE).u8(info.kind).u64(info.created).bytes8(info.sealed_label)
        return w.u32(self.next_cursor).getvalue()

    @classmethod
    def read_fields(cls, r: Reader) -> Self:
        count = r.u16()
        if count > MAX_LIST_PAGE:
            raise RemoteProtocolError("too many keys in one response")
        keys = []
        for _ in range(count):
            key_id = r.fixed(KEY_ID_SIZE)
            kind = _enum(SecretKind, r.u8(), "secret kind")
            created = r.u64()
            sealed_label = r.bytes8()
            try:
                keys.append(KeyInfo(key_id, kind, created, sealed_label))
            except ValueError as exc:
                raise RemoteProtocolError(f"invalid key in a key list: {exc}") from None
        return cls._build("response", tuple(keys), r.u32())


def encode_response(status: Status, response: OpResponse | None = None) -> bytes:
    """Build a response body: status, then the OK fields."""
    if (status is Status.OK) != (response is not None):
        raise ValueError("an OK status needs a response and an error status none")
    head = _U8.pack(status)
    return head if response is None else head + response.encode_fields()


def secret_answer(kind: SecretKind, ciphertext: bytes, associated_data: bytes) -> bytes | None:
    """``encode_response(Status.OK, SecretResponse(kind, ciphertext, associated_data))``
    without building the response (RETRIEVE's answer); None where SecretResponse would
    refuse the fields (ValueError)."""
    size = len(ciphertext) - SEALED_OVERHEAD
    if not 1 <= size <= MAX_SECRET_SIZE or len(associated_data) > 255:
        return None
    if size != GENERATED_SECRET_SIZE and kind is _GENERATED:
        return None
    head = _OK_KIND_AND_SIZE.pack(_STATUS_OK, kind, len(ciphertext))
    return b"".join((head, ciphertext, _AD_SIZES[len(associated_data)], associated_data))


_OK_KIND_AND_SIZE = struct.Struct(">BBI")
#: Read once (on Python 3.11 an attribute of an Enum class costs about 900 instructions).
_STATUS_OK, _GENERATED = int(Status.OK), SecretKind.GENERATED
#: The one-byte length of each associated data size.
_AD_SIZES = [bytes([size]) for size in range(256)]


#: An OK answer to STORE_SECRET that brings the next key id: status, flag 1, key id, nonce.
_STORED_NEXT = struct.Struct(f">BB{KEY_ID_SIZE}s{KEY_ID_NONCE_SIZE}s")


def decode_response(op: Op, body: bytes) -> tuple[Status, OpResponse | None]:
    """Parse the response to a request of type ``op``."""
    if op == Op.STORE_SECRET and len(body) == _STORED_NEXT.size and body[0] == Status.OK and body[1] == 1:
        # The answer to every one-request store: one unpack (the layout fixes both sizes that
        # StoredResponse's __post_init__ checks); its fields set as its frozen __init__ sets them.
        _, _, next_key_id, next_server_nonce = _STORED_NEXT.unpack(body)
        stored = _new_object(StoredResponse)
        _set_field(stored, "next_key_id", next_key_id)
        _set_field(stored, "next_server_nonce", next_server_nonce)
        return Status.OK, stored
    r = Reader(body, "response")
    status = _enum(Status, r.u8(), "status")
    operation = OPERATIONS.get(op)
    if operation is None:
        raise RemoteProtocolError(f"op {op.name} is not supported")
    response = operation.response.read_fields(r) if status is Status.OK else None
    r.done()
    return status, response


# ------------------------------------------------------------------ the table


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation, declared once: its op code, the request and OK-response types (each
    with its codec) and the action its audit entries record. The key server's handler, the
    client's method and the CLI's command are keyed by ``op`` in their own modules, and a
    test checks that every operation has each."""

    op: Op
    request: type[OpRequest]
    response: type[OpResponse]
    action: Action


#: Every operation of the protocol (docs/protocol.md, section 12).
OPERATIONS: Mapping[Op, Operation] = MappingProxyType(
    {
        o.op: o
        for o in (
            Operation(
                Op.RETRIEVE_STORAGE_KEY,
                RetrieveStorageKeyRequest,
                StorageKeyResponse,
                Action.RETRIEVE_STORAGE_KEY,
            ),
            Operation(Op.CREATE_KEY_ID, CreateKeyIdRequest, KeyIdResponse, Action.CREATE_KEY_ID),
            # GENERATE or IMPORT by the secret's kind (StoreSecretRequest.audit_action)
            Operation(Op.STORE_SECRET, StoreSecretRequest, StoredResponse, Action.GENERATE),
            Operation(Op.RETRIEVE, RetrieveRequest, SecretResponse, Action.RETRIEVE),
            Operation(Op.AUDIT, AuditRequest, AuditResponse, Action.AUDIT),
            Operation(Op.LIST_KEYS, ListKeysRequest, KeyListResponse, Action.LIST_KEYS),
            Operation(Op.DELETE_KEY, DeleteKeyRequest, Empty, Action.DELETE_KEY),
            Operation(
                Op.CHANGE_PASSWORD_START,
                ChangePasswordStartRequest,
                PasswordRegistrationResponse,
                Action.CHANGE_PASSWORD_START,
            ),
            Operation(Op.CHANGE_PASSWORD_FINISH, ChangePasswordFinishRequest, Empty, Action.CHANGE_PASSWORD),
            Operation(Op.DELETE_ACCOUNT, DeleteAccountRequest, Empty, Action.DELETE_ACCOUNT),
            Operation(Op.RENAME_KEY, RenameKeyRequest, Empty, Action.RENAME_KEY),
        )
    }
)


# ------------------------------------------------------ KEY-1, sealing, export


#: KEY-1's preimage up to ``user_id``, and the prefix of ``r`` in it: fixed, so built once.
_KEY_ID_HEAD = struct.pack(">H", len(KEY_ID_DOMAIN)) + KEY_ID_DOMAIN + struct.pack(">H", USER_ID_SIZE)
_KEY_ID_R = struct.pack(">H", 32)
#: KEY-2's preimage up to ``client_nonce``, and the prefix of ``server_nonce`` in it.
_CONTRIBUTIONS_HEAD = (
    struct.pack(">H", len(KEY_ID_CONTRIBUTION_DOMAIN))
    + KEY_ID_CONTRIBUTION_DOMAIN
    + struct.pack(">H", KEY_ID_NONCE_SIZE)
)
_CONTRIBUTIONS_SERVER = struct.pack(">H", KEY_ID_NONCE_SIZE)
_sha3_256 = hashlib.sha3_256


def derive_key_id(user_id: bytes, r: bytes) -> bytes:
    """KEY-1: SHA3-256(len(d) || d || 16 || user_id || 32 || r)[:16], lengths as u16 big-endian."""
    _check_user_id(user_id)
    if len(r) != 32:
        raise ValueError("r must be 32 random bytes")
    return _sha3_256(b"".join((_KEY_ID_HEAD, user_id, _KEY_ID_R, r))).digest()[:KEY_ID_SIZE]


def joint_key_id(user_id: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """KEY-2: the key id both sides contribute to. KEY-1 with
    ``r = SHA3-256(len(d2) || d2 || 32 || client_nonce || 32 || server_nonce)`` (lengths u16):
    the client's fresh nonce means no server can make two stores share a key id (it would
    need a SHA3-256 collision), and the server's keeps it unpredictable to the client."""
    if len(client_nonce) != KEY_ID_NONCE_SIZE or len(server_nonce) != KEY_ID_NONCE_SIZE:
        raise ValueError(f"key id contributions are {KEY_ID_NONCE_SIZE} bytes")
    r = _sha3_256(b"".join((_CONTRIBUTIONS_HEAD, client_nonce, _CONTRIBUTIONS_SERVER, server_nonce))).digest()
    return derive_key_id(user_id, r)


def secret_ad(user_id: bytes, key_id: bytes, kind: SecretKind) -> bytes:
    """OPS-2/OPS-3: ``user_id || key_id`` (|| "imported key" for imported secrets)."""
    _check_user_id(user_id)
    _check_key_id(key_id)
    ad = user_id + key_id
    return ad + IMPORTED_KEY_AD_SUFFIX if kind is SecretKind.IMPORTED else ad


def seal_secret(storage_key: bytes, secret: bytes, ad: bytes, random: RandomSource) -> bytes:
    """``nonce (12) || ChaCha20-Poly1305(storage_key, secret, ad)``."""
    return seal_secret_with(ChaCha20Poly1305(storage_key), secret, ad, random)


def seal_secret_with(aead: ChaCha20Poly1305, secret: bytes, ad: bytes, random: RandomSource) -> bytes:
    """:func:`seal_secret` with the storage key's cipher built once (a session's stores reuse it:
    building it costs about as much as sealing 32 bytes)."""
    if not 1 <= len(secret) <= MAX_SECRET_SIZE:
        raise ValueError(f"a secret must be 1..{MAX_SECRET_SIZE} bytes")
    nonce = random(_NONCE)
    return nonce + aead.encrypt(nonce, secret, ad)


def open_secret(storage_key: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Open a sealed secret; RemoteProtocolError(BAD_RECORD) if it or its AD was altered."""
    if len(ciphertext) < _NONCE + _TAG + 1:
        raise RemoteProtocolError("sealed secret too short", ErrorCode.MALFORMED)
    try:
        return ChaCha20Poly1305(storage_key).decrypt(ciphertext[:_NONCE], ciphertext[_NONCE:], ad)
    except InvalidTag:
        raise RemoteProtocolError("stored secret failed authentication", ErrorCode.BAD_RECORD) from None


def ad_matches(expected: bytes, received: bytes) -> bool:
    """Constant-time AD comparison (CRY-6)."""
    return hmac.compare_digest(expected, received)


def encode_portable(secret: bytes) -> bytes:
    """OPS-3/OPS-5/OPS-12 portable format: ``len u8 || secret`` for 1..255 bytes, else
    ``0x00 || 0x01 (version) || len u32 || secret`` for 256..65536 bytes."""
    size = len(secret)
    if not 1 <= size <= MAX_SECRET_SIZE:
        raise ValueError(f"a secret must be 1..{MAX_SECRET_SIZE} bytes")
    if size <= MAX_SHORT_PORTABLE_SIZE:
        return bytes([size]) + secret
    return struct.pack(">BBI", PORTABLE_LONG_MARKER, PORTABLE_LONG_VERSION, size) + secret


def decode_portable(data: bytes) -> bytes:
    """Parse either portable form; ValueError for anything else, including a long form used
    for a secret the short form holds (one encoding per secret)."""
    if len(data) < 2:
        raise ValueError("a portable secret is a length byte and 1..255 bytes, or the long form")
    if data[0] != PORTABLE_LONG_MARKER:
        if data[0] != len(data) - 1:
            raise ValueError(f"length byte says {data[0]} but {len(data) - 1} secret bytes follow")
        return data[1:]
    if data[1] != PORTABLE_LONG_VERSION:
        raise ValueError(f"unknown portable format version {data[1]}")
    if len(data) < PORTABLE_LONG_HEADER_SIZE:
        raise ValueError("the long portable form is cut short in its length")
    (size,) = struct.unpack(">I", data[2:PORTABLE_LONG_HEADER_SIZE])
    if size <= MAX_SHORT_PORTABLE_SIZE:
        raise ValueError(f"a secret of {size} bytes must use the one-byte-length form")
    if size > MAX_SECRET_SIZE:
        raise ValueError(f"the long form says {size} bytes; a secret is at most {MAX_SECRET_SIZE}")
    if size != len(data) - PORTABLE_LONG_HEADER_SIZE:
        raise ValueError(
            f"the long form says {size} bytes but {len(data) - PORTABLE_LONG_HEADER_SIZE} secret bytes follow"
        )
    return data[PORTABLE_LONG_HEADER_SIZE:]


# ------------------------------------------------------------- named keys


def check_label(label: str) -> str:
    """A label as the client accepts it, else ValueError: 1..MAX_LABEL_SIZE bytes of UTF-8,
    no control characters, no space at either end, and not 32 hex digits (which would read
    as a key id)."""
    encoded = label.encode("utf-8", errors="strict")
    if not 1 <= len(encoded) <= MAX_LABEL_SIZE:
        raise ValueError(f"a label is 1..{MAX_LABEL_SIZE} bytes of UTF-8")
    if label != label.strip():
        raise ValueError("a label does not start or end with a space")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in label):
        raise ValueError("a label has no control characters")
    if len(label) == 2 * KEY_ID_SIZE and all(c in "0123456789abcdefABCDEF" for c in label):
        raise ValueError("a label of 32 hex digits would read as a key id")
    return label


def same_label(a: str, b: str) -> bool:
    """Whether two labels name the same key: equal once both are in Unicode NFC. A label is
    sealed as given, but an accented letter typed as one code point on one device and as a
    letter and a combining mark on another is one label (two keys cannot both have it, and
    naming it finds either)."""
    return a == b or unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b)


def label_ad(user_id: bytes, key_id: bytes) -> bytes:
    """Named keys: a sealed label's AD, ``"keymgmt v1 key label" || user_id || key_id``."""
    _check_user_id(user_id)
    _check_key_id(key_id)
    return LABEL_AD_DOMAIN + user_id + key_id


def seal_label(storage_key: bytes, user_id: bytes, key_id: bytes, label: str, random: RandomSource) -> bytes:
    """``nonce (12) || ChaCha20-Poly1305(storage_key, padded label, label_ad)``, the padded
    label being its UTF-8 bytes and then zero bytes up to the next multiple of
    ``LABEL_PAD_SIZE`` (32 or 64 bytes in all)."""
    nonce = random(_NONCE)
    encoded = check_label(label).encode("utf-8")
    plaintext = encoded + bytes(-len(encoded) % LABEL_PAD_SIZE)
    return nonce + ChaCha20Poly1305(storage_key).encrypt(nonce, plaintext, label_ad(user_id, key_id))


def open_label(storage_key: bytes, user_id: bytes, key_id: bytes, sealed_label: bytes) -> str:
    """Open a sealed label; RemoteProtocolError(BAD_RECORD) if it was altered, swapped from
    another key or user, or does not hold a valid label. The zero bytes at the end of the
    plaintext are padding (a label has none): a label sealed unpadded, as before padding
    came in, opens just the same."""
    try:
        _check_sealed_label(sealed_label)
        if not sealed_label:
            raise ValueError("empty")
        plaintext = ChaCha20Poly1305(storage_key).decrypt(
            sealed_label[:_NONCE], sealed_label[_NONCE:], label_ad(user_id, key_id)
        )
        return check_label(plaintext.rstrip(b"\x00").decode("utf-8"))
    except (InvalidTag, ValueError):
        raise RemoteProtocolError("a key's label failed authentication", ErrorCode.BAD_RECORD) from None


# ------------------------------------------------------------- the audit chain


def audit_genesis_hash() -> bytes:
    """The audit chain: what entry 1 commits to as the hash before it (32 zero bytes)."""
    return bytes(AUDIT_HASH_SIZE)


def audit_chain_hash(user_id: bytes, previous: bytes, entry: AuditEntry) -> bytes:
    """The audit chain: ``SHA3-256(u16(22) || "keymgmt v1 audit chain" || user_id[16] ||
    previous[32] || entry.encode())``, where ``previous`` is the hash of the user's entry
    before (:func:`audit_genesis_hash` for entry 1) and ``entry.encode()`` the entry's canonical
    24- or 40-byte encoding (docs/protocol.md section 12.9)."""
    return audit_chain_hash_of(
        user_id,
        previous,
        entry.entry_id,
        entry.action,
        entry.timestamp,
        entry.outcome,
        entry.key_id,
        entry.context,
        entry.count,
    )


def audit_chain_hash_of(
    user_id: bytes,
    previous: bytes,
    entry_id: int,
    action: Action,
    timestamp: int,
    outcome: Outcome,
    key_id: bytes | None = None,
    context: Context | None = None,
    count: int = 1,
) -> bytes:
    """:func:`audit_chain_hash` of the entry with these fields, without building an
    :class:`AuditEntry` (the server hashes one entry per request)."""
    if len(user_id) != USER_ID_SIZE:
        raise ValueError("user_id must be 16 bytes")
    if len(previous) != AUDIT_HASH_SIZE:
        raise ValueError(f"the previous hash is {AUDIT_HASH_SIZE} bytes")
    if key_id is not None and len(key_id) == KEY_ID_SIZE and 1 <= count < 2**32:
        # (the commonest entry, a request's: _encode_entry's checks and packing, inline)
        raw_context = 0xFF if context is None else context
        entry = _ENTRY_WITH_KEY.pack(entry_id, action, timestamp, outcome, count, 1, key_id, raw_context)
    else:
        entry = _encode_entry(entry_id, action, timestamp, outcome, key_id, context, count)
    return _sha3_256(b"".join((_AUDIT_CHAIN_PREFIX, user_id, previous, entry))).digest()


_sha3_256 = hashlib.sha3_256


def _encode_entry(
    entry_id: int,
    action: int,
    timestamp: int,
    outcome: int,
    key_id: bytes | None,
    context: int | None,
    count: int,
) -> bytes:
    """An audit entry's canonical 24- or 40-byte encoding (section 12.9)."""
    if not 1 <= count < 2**32:
        raise ValueError("count must be 1..2**32-1")
    raw_context = 0xFF if context is None else context
    if key_id is None:
        return _ENTRY_WITHOUT_KEY.pack(entry_id, action, timestamp, outcome, count, 0, raw_context)
    if len(key_id) != KEY_ID_SIZE:  # (a "16s" field would pad or cut it silently)
        raise ValueError(f"expected {KEY_ID_SIZE} bytes, got {len(key_id)}")
    return _ENTRY_WITH_KEY.pack(entry_id, action, timestamp, outcome, count, 1, key_id, raw_context)
