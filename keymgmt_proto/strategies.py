"""Hypothesis strategies for every value keymgmt puts on the wire (needs ``keymgmt[testing]``).

For property-based tests of an implementation of docs/protocol.md, ours or another one.
The values are built with this package's own codecs, so a value drawn from a *valid*
strategy is exactly what a conforming peer may send, and one drawn from a *malformed* or
*corrupted* strategy is one a conforming peer must refuse. Nothing here does I/O:
:mod:`keymgmt.adapters.conformance` drives a server or a client over TLS with these.

Importing this module imports Hypothesis; importing :mod:`keymgmt_proto` does not.

- Scalars: :func:`fixed_bytes`, :func:`account_names`, :func:`invalid_account_names`,
  :func:`policy_account_names`, :func:`passwords`, :func:`error_codes`, :func:`reasons`,
  :func:`session_ids`, :func:`request_ids`, :func:`sequence_numbers`.
- Frame payloads and frames: :func:`messages` (each class of :data:`MESSAGE_CLASSES`),
  :func:`records`, :func:`sealed_records` and :func:`seal_at` (records sealed under a session
  key at a chosen sequence number), :func:`frames` (well-formed), :func:`corrupted_frames`
  (mostly well-formed, sometimes a bad header field or payload), :func:`mutations`
  (near-valid variants of given bytes), :func:`wire_bytes` (byte streams).
- Operations (protocol.md section 12): :func:`op_requests`, :func:`request_bodies`,
  :func:`malformed_request_bodies`, :func:`op_responses`, :func:`response_bodies`,
  :func:`sealed_secret_blobs`, :func:`audit_entries`, :func:`key_infos`.
- Secrets and labels: :func:`secrets`, :func:`portable_secrets`,
  :func:`invalid_portable_secrets`, :func:`labels`.
- Whole sessions: :func:`scripted_sessions` draws a :class:`SessionScript`, the client side
  of one request session as a list of :class:`ScriptStep`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from hypothesis import strategies as st

from ._crypto import MAX_SEQ, Channel
from ._errors import ErrorCode, RemoteProtocolError
from ._messages import (
    CREDENTIAL_FINALIZATION_SIZE,
    CREDENTIAL_REQUEST_SIZE,
    CREDENTIAL_RESPONSE_SIZE,
    ENCRYPTED_STORAGE_KEY_SIZE,
    MESSAGE_TYPES,
    REASON_MAX,
    REGISTRATION_REQUEST_SIZE,
    REGISTRATION_RESPONSE_SIZE,
    REGISTRATION_UPLOAD_SIZE,
    RESUME_NONCE_SIZE,
    SESSION_HANDLE_SIZE,
    TAG_SIZE,
    USER_ID_SIZE,
    Abort,
    Close,
    CompleteRegistration,
    GoAway,
    LoginFinish,
    LoginResponse,
    LoginStart,
    Record,
    RegResponse,
    RegStart,
    RegUpload,
    Request,
    Response,
    Resume,
    Resumed,
    ResumedEnvelope,
    ResumeEnvelope,
    Welcome,
)
from ._ops import (
    AUDIT_HASH_SIZE,
    GENERATED_SECRET_SIZE,
    KEY_ID_NONCE_SIZE,
    KEY_ID_SIZE,
    MAX_AUDIT_PAGE,
    MAX_LABEL_SIZE,
    MAX_LIST_PAGE,
    MAX_SEALED_LABEL_SIZE,
    MAX_SECRET_SIZE,
    OPERATIONS,
    SEALED_OVERHEAD,
    Action,
    AuditEntry,
    AuditRequest,
    AuditResponse,
    AuditType,
    ChangePasswordFinishRequest,
    ChangePasswordStartRequest,
    Context,
    CreateKeyIdRequest,
    DeleteAccountRequest,
    DeleteKeyRequest,
    Empty,
    KeyIdResponse,
    KeyInfo,
    KeyListResponse,
    ListKeysRequest,
    Op,
    OpRequest,
    OpResponse,
    Outcome,
    PasswordRegistrationResponse,
    RenameKeyRequest,
    RetrieveRequest,
    RetrieveStorageKeyRequest,
    SecretKind,
    SecretResponse,
    Status,
    StorageKeyResponse,
    StoredResponse,
    StoreSecretRequest,
    check_label,
    decode_request,
    encode_portable,
    encode_response,
)
from ._wire import MAX_SESSION_ID, PROTOCOL_VERSION, FrameType, encode_frame

__all__ = [
    "MESSAGE_CLASSES",
    "SCRIPT_OPS",
    "ScriptOp",
    "ScriptStep",
    "SessionScript",
    "account_names",
    "audit_entries",
    "corrupted_frames",
    "error_codes",
    "fixed_bytes",
    "frames",
    "invalid_account_names",
    "invalid_portable_secrets",
    "key_infos",
    "labels",
    "malformed_request_bodies",
    "messages",
    "mutations",
    "op_requests",
    "op_responses",
    "passwords",
    "policy_account_names",
    "portable_secrets",
    "reasons",
    "records",
    "request_bodies",
    "request_ids",
    "response_bodies",
    "scripted_sessions",
    "seal_at",
    "sealed_records",
    "sealed_secret_blobs",
    "secrets",
    "sequence_numbers",
    "session_ids",
    "wire_bytes",
]

T = TypeVar("T")
_HEADER = struct.Struct(">BBII")

# ----------------------------------------------------------------- scalars


def fixed_bytes(size: int) -> st.SearchStrategy[bytes]:
    """Byte strings of exactly ``size`` bytes."""
    return st.binary(min_size=size, max_size=size)


def account_names(max_size: int = 255) -> st.SearchStrategy[bytes]:
    """Account names the wire format accepts: any 1..255 bytes (protocol.md 4.1). A server's
    own policy may refuse some of them (``INVALID_ACCOUNT_NAME``); see :func:`policy_account_names`."""
    return st.binary(min_size=1, max_size=min(max_size, 255))


def policy_account_names(max_size: int = 64) -> st.SearchStrategy[bytes]:
    """Account names keymgmt's key server registers (REG-1): printable UTF-8 without
    surrounding whitespace, 1..255 bytes once encoded."""
    text = st.text(
        alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Zl", "Zp")),
        min_size=1,
        max_size=max_size,
    )
    return text.filter(lambda s: s.isprintable() and s == s.strip() and 0 < len(s.encode()) <= 255).map(
        str.encode
    )


def invalid_account_names() -> st.SearchStrategy[bytes]:
    """Account names no frame may carry: empty, or longer than 255 bytes (the length prefix
    is one byte, so such a name can only be written by hand; see :func:`corrupted_frames`)."""
    return st.one_of(st.just(b""), st.binary(min_size=256, max_size=300))


def passwords(max_size: int = 64) -> st.SearchStrategy[bytes]:
    """Non-empty passwords (the client refuses an empty one before sending anything)."""
    return st.binary(min_size=1, max_size=max_size)


def error_codes() -> st.SearchStrategy[ErrorCode]:
    """Every :class:`ErrorCode`."""
    return st.sampled_from(ErrorCode)


def reasons() -> st.SearchStrategy[str]:
    """ABORT and GOAWAY reasons: printable ASCII, at most 255 characters."""
    return st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=REASON_MAX)


def session_ids(max_value: int = MAX_SESSION_ID) -> st.SearchStrategy[int]:
    """Session ids a frame of a session may carry: 1..2^31-1 (0 is the connection)."""
    return st.integers(min_value=1, max_value=max_value)


def request_ids() -> st.SearchStrategy[int]:
    """Request ids: 1..2^32-1."""
    return st.integers(min_value=1, max_value=2**32 - 1)


def sequence_numbers() -> st.SearchStrategy[int]:
    """Record sequence numbers a record may carry on the wire: 0..2^64-1 (a receiver accepts
    only the next one it expects, and never ``MAX_SEQ`` itself)."""
    return st.integers(min_value=0, max_value=MAX_SEQ)


# ------------------------------------------------------- frame payloads


def records(max_ciphertext: int = 256) -> st.SearchStrategy[Record]:
    """Well-formed records (any sequence number, a ciphertext at least as long as the tag)
    that no channel opens: what a sealed frame looks like to anyone without the keys."""
    return st.builds(Record, sequence_numbers(), st.binary(min_size=TAG_SIZE, max_size=max_ciphertext))


def _message_strategies(
    names: st.SearchStrategy[bytes], registration_requests: st.SearchStrategy[bytes]
) -> dict[type, st.SearchStrategy[object]]:
    bodies = st.binary(max_size=512)
    return {
        GoAway: st.builds(GoAway, error_codes(), reasons()),
        RegStart: st.builds(RegStart, names, registration_requests, st.binary(max_size=64) | st.just(b"")),
        RegResponse: st.builds(RegResponse, fixed_bytes(REGISTRATION_RESPONSE_SIZE)),
        RegUpload: st.builds(RegUpload, fixed_bytes(REGISTRATION_UPLOAD_SIZE)),
        LoginStart: st.builds(LoginStart, names, fixed_bytes(CREDENTIAL_REQUEST_SIZE)),
        LoginResponse: st.builds(LoginResponse, fixed_bytes(CREDENTIAL_RESPONSE_SIZE)),
        LoginFinish: st.builds(LoginFinish, fixed_bytes(CREDENTIAL_FINALIZATION_SIZE)),
        Abort: st.builds(Abort, error_codes(), reasons()),
        Welcome: st.builds(Welcome, fixed_bytes(USER_ID_SIZE)),
        CompleteRegistration: st.builds(
            CompleteRegistration, fixed_bytes(USER_ID_SIZE), fixed_bytes(ENCRYPTED_STORAGE_KEY_SIZE)
        ),
        Request: st.builds(Request, request_ids(), bodies),
        Response: st.builds(Response, request_ids(), bodies),
        Close: st.builds(Close, error_codes()),
        Resume: st.builds(Resume, fixed_bytes(RESUME_NONCE_SIZE), st.integers(0, MAX_SEQ)),
        Resumed: st.just(Resumed()),
        Record: records(),
        ResumeEnvelope: st.builds(ResumeEnvelope, fixed_bytes(SESSION_HANDLE_SIZE), records()),
        ResumedEnvelope: st.builds(ResumedEnvelope, fixed_bytes(RESUME_NONCE_SIZE), records()),
    }


#: Every frame payload class: the message class of each frame type (``wire.MESSAGE_TYPES``;
#: for sealed types, the plaintext's class) plus :class:`~keymgmt_proto.wire.Record` and the
#: RESUME/RESUMED envelopes, which are what sealed frames carry on the wire.
MESSAGE_CLASSES: tuple[type, ...] = tuple(
    dict.fromkeys([*MESSAGE_TYPES.values(), Record, ResumeEnvelope, ResumedEnvelope])
)


def messages(
    cls: type[T] | None = None,
    *,
    names: st.SearchStrategy[bytes] | None = None,
    registration_requests: st.SearchStrategy[bytes] | None = None,
) -> st.SearchStrategy[T]:
    """Valid values of the payload class ``cls`` (any class of :data:`MESSAGE_CLASSES` when
    None): each encodes to a payload its decoder accepts. ``names`` replaces the account
    names of REG_START and LOGIN_START, ``registration_requests`` REG_START's OPAQUE
    RegistrationRequest (e.g. a real one, so that a server's OPAQUE step accepts it)."""
    requests = registration_requests
    table = _message_strategies(
        names if names is not None else account_names(),
        requests if requests is not None else fixed_bytes(REGISTRATION_REQUEST_SIZE),
    )
    if cls is None:
        return st.one_of(*table.values())
    if cls not in table:
        raise ValueError(f"no strategy for {cls.__name__}: not a frame payload class")
    return table[cls]  # type: ignore[return-value]


def seal_at(
    session_key: bytes,
    frame_type: FrameType,
    plaintext: bytes,
    seq: int,
    *,
    from_client: bool = True,
    epoch: tuple[bytes, bytes] | None = None,
) -> Record:
    """The record a peer holding ``session_key`` (the 64-byte OPAQUE session key) seals for
    ``frame_type`` at sequence number ``seq`` (protocol.md 5.2): sent by the client when
    ``from_client``, else by the server; in key epoch 0, or in the epoch of the RESUME's
    ``(client_nonce, server_nonce)``. Replays, gaps and records moved to another type or
    direction are built by passing the "wrong" value on purpose."""
    channel = Channel(session_key, is_client=from_client)
    if epoch is not None:
        channel = channel.next_epoch(*epoch)
    channel.send_seq = seq
    return channel.seal(frame_type, plaintext)


def sealed_records(
    session_key: bytes,
    *,
    frame_types: st.SearchStrategy[FrameType] | None = None,
    plaintexts: st.SearchStrategy[bytes] | None = None,
    seqs: st.SearchStrategy[int] | None = None,
    from_client: bool = True,
) -> st.SearchStrategy[tuple[FrameType, Record]]:
    """``(frame type, record)`` pairs sealed under ``session_key`` (see :func:`seal_at`) at
    drawn sequence numbers (default 0..1000): genuine records, which a receiver must still
    refuse unless the sequence number is the one it expects next."""
    types = frame_types if frame_types is not None else st.sampled_from([t for t in FrameType if t.sealed])
    texts = plaintexts if plaintexts is not None else st.binary(max_size=200)
    numbers = seqs if seqs is not None else st.integers(0, 1000)
    return st.tuples(types, texts, numbers).map(
        lambda t: (t[0], seal_at(session_key, t[0], t[1], t[2], from_client=from_client))
    )


def _payload_for(frame_type: FrameType) -> st.SearchStrategy[bytes]:
    if frame_type is FrameType.RESUME:
        cls: type = ResumeEnvelope
    elif frame_type is FrameType.RESUMED:
        cls = ResumedEnvelope
    elif frame_type.sealed:
        cls = Record
    else:
        cls = MESSAGE_TYPES[frame_type]
    return messages(cls).map(lambda m: m.encode())


@st.composite
def frames(
    draw: st.DrawFn,
    frame_types: st.SearchStrategy[FrameType] | None = None,
    ids: st.SearchStrategy[int] | None = None,
) -> bytes:
    """One encoded, well-formed frame (header and a payload its type's decoder accepts; a
    sealed frame's record does not open). GOAWAY travels on session 0, every other type on
    a session id from ``ids`` (default 1..4)."""
    frame_type = draw(frame_types if frame_types is not None else st.sampled_from(FrameType))
    session_id = 0 if frame_type is FrameType.GOAWAY else draw(ids if ids is not None else st.integers(1, 4))
    return encode_frame(frame_type, session_id, draw(_payload_for(frame_type)))


def _rarely(draw: st.DrawFn, one_in: int) -> bool:
    return draw(st.integers(0, one_in - 1)) == 0


@st.composite
def corrupted_frames(
    draw: st.DrawFn,
    registration_requests: st.SearchStrategy[bytes] | None = None,
    ids: st.SearchStrategy[int] | None = None,
) -> bytes:
    """One frame, mostly well-formed (so that receivers' state machines are reached),
    sometimes with a bad version, type byte, session id or length field, or a random
    payload. ``registration_requests`` as in :func:`messages`; ``ids`` as in :func:`frames`."""
    frame_type = draw(st.sampled_from(FrameType))
    version = draw(st.integers(0, 255)) if _rarely(draw, 20) else PROTOCOL_VERSION
    type_byte = draw(st.integers(0, 255)) if _rarely(draw, 10) else int(frame_type)
    if _rarely(draw, 10):
        session_id = draw(st.integers(0, 2**32 - 1))
    else:
        session_id = draw(ids if ids is not None else st.integers(1, 4))
    if _rarely(draw, 4):
        payload = draw(st.binary(max_size=400))
    else:
        cls = Record if frame_type.sealed else MESSAGE_TYPES[frame_type]
        strategy = messages(cls, registration_requests=registration_requests)
        payload = draw(strategy).encode()  # type: ignore[attr-defined]
    length = draw(st.integers(0, 2**32 - 1)) if _rarely(draw, 10) else len(payload)
    return _HEADER.pack(version, type_byte, session_id, length) + payload


@st.composite
def mutations(draw: st.DrawFn, data: bytes, max_writes: int = 3) -> bytes:
    """A near-valid variant of ``data``: up to ``max_writes`` bytes overwritten, then maybe
    cut short, then up to 4 random bytes appended. It may equal ``data``."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, max_writes), label="writes")):
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1), label="at")
        buf[i] = draw(st.integers(0, 255), label="byte")
    cut = draw(st.integers(0, len(buf)), label="cut")
    return bytes(buf[:cut]) + draw(st.binary(max_size=4), label="tail")


def wire_bytes(
    max_frames: int = 8, registration_requests: st.SearchStrategy[bytes] | None = None
) -> st.SearchStrategy[bytes]:
    """What a receiver may be fed: random bytes, or a run of up to ``max_frames``
    :func:`corrupted_frames`."""
    return st.one_of(
        st.binary(max_size=4096),
        st.lists(corrupted_frames(registration_requests), max_size=max_frames).map(b"".join),
    )


# ----------------------------------------------------------- operations


def sealed_secret_blobs(kind: SecretKind, max_secret: int = 256) -> st.SearchStrategy[bytes]:
    """Byte strings of a size a sealed secret of ``kind`` may have (60 bytes for a generated
    one, 29..65564 for an imported one; at most ``max_secret`` + 28 here): what a server can
    check (protocol.md 12.6), not a real seal."""
    if kind is SecretKind.GENERATED:
        return fixed_bytes(GENERATED_SECRET_SIZE + SEALED_OVERHEAD)
    upper = min(max_secret, MAX_SECRET_SIZE)
    return st.binary(min_size=1 + SEALED_OVERHEAD, max_size=upper + SEALED_OVERHEAD)


def _sealed_labels() -> st.SearchStrategy[bytes]:
    return st.just(b"") | st.binary(min_size=1 + SEALED_OVERHEAD, max_size=MAX_SEALED_LABEL_SIZE)


def _times() -> st.SearchStrategy[int]:
    return st.integers(0, 2**63 - 1)


@st.composite
def _store_requests(draw: st.DrawFn, user_ids: st.SearchStrategy[bytes]) -> StoreSecretRequest:
    kind = draw(st.sampled_from(SecretKind))
    nxt = draw(st.none() | st.tuples(st.sampled_from(SecretKind), fixed_bytes(KEY_ID_NONCE_SIZE)))
    return StoreSecretRequest(
        draw(user_ids),
        draw(fixed_bytes(KEY_ID_SIZE)),
        kind,
        draw(sealed_secret_blobs(kind)),
        None if nxt is None else nxt[0],
        None if nxt is None else nxt[1],
    )


@st.composite
def _audit_requests(draw: st.DrawFn, user_ids: st.SearchStrategy[bytes]) -> AuditRequest:
    audit_type = draw(st.sampled_from(AuditType))
    key_ids: tuple[bytes, ...] = ()
    if audit_type is not AuditType.SYSTEM_ONLY:
        key_ids = tuple(draw(st.lists(fixed_bytes(KEY_ID_SIZE), max_size=4)))
    return AuditRequest(
        draw(user_ids),
        audit_type,
        key_ids,
        draw(st.none() | _times()),
        draw(st.none() | _times()),
        draw(_times()),
        draw(st.integers(1, MAX_AUDIT_PAGE)),
    )


def _request_strategies(user_ids: st.SearchStrategy[bytes]) -> dict[Op, st.SearchStrategy[OpRequest]]:
    key_id = fixed_bytes(KEY_ID_SIZE)
    table: dict[Op, st.SearchStrategy[OpRequest]] = {
        Op.RETRIEVE_STORAGE_KEY: st.builds(RetrieveStorageKeyRequest, user_ids),
        Op.CREATE_KEY_ID: st.builds(
            CreateKeyIdRequest, user_ids, st.sampled_from(SecretKind), fixed_bytes(KEY_ID_NONCE_SIZE)
        ),
        Op.STORE_SECRET: _store_requests(user_ids),
        Op.RETRIEVE: st.builds(RetrieveRequest, user_ids, key_id, st.sampled_from(Context)),
        Op.AUDIT: _audit_requests(user_ids),
        Op.LIST_KEYS: st.builds(
            ListKeysRequest, user_ids, st.integers(0, 2**32 - 1), st.integers(1, MAX_LIST_PAGE)
        ),
        Op.DELETE_KEY: st.builds(DeleteKeyRequest, user_ids, key_id),
        Op.CHANGE_PASSWORD_START: st.builds(
            ChangePasswordStartRequest, user_ids, fixed_bytes(REGISTRATION_REQUEST_SIZE)
        ),
        Op.CHANGE_PASSWORD_FINISH: st.builds(
            ChangePasswordFinishRequest,
            user_ids,
            fixed_bytes(REGISTRATION_UPLOAD_SIZE),
            fixed_bytes(ENCRYPTED_STORAGE_KEY_SIZE),
        ),
        Op.DELETE_ACCOUNT: st.builds(DeleteAccountRequest, user_ids),
        Op.RENAME_KEY: st.builds(RenameKeyRequest, user_ids, key_id, _sealed_labels()),
    }
    missing = set(OPERATIONS) - set(table)
    assert not missing, f"no request strategy for {sorted(op.name for op in missing)}"
    return table


def op_requests(
    op: Op | None = None, *, user_ids: st.SearchStrategy[bytes] | None = None
) -> st.SearchStrategy[OpRequest]:
    """Valid request bodies (as objects) of ``op``, or of any operation: each encodes to a
    body :func:`~keymgmt_proto.decode_request` accepts. ``user_ids`` defaults to any 16 bytes."""
    table = _request_strategies(user_ids if user_ids is not None else fixed_bytes(USER_ID_SIZE))
    return table[op] if op is not None else st.one_of(*table.values())


def request_bodies(
    op: Op | None = None, *, user_ids: st.SearchStrategy[bytes] | None = None
) -> st.SearchStrategy[bytes]:
    """:func:`op_requests`, encoded: REQUEST bodies a key server must decode."""
    return op_requests(op, user_ids=user_ids).map(lambda request: request.encode())


def _does_not_decode(body: bytes) -> bool:
    try:
        decode_request(body)
    except RemoteProtocolError:
        return True
    return False


def malformed_request_bodies(user_ids: st.SearchStrategy[bytes] | None = None) -> st.SearchStrategy[bytes]:
    """REQUEST bodies that do not decode (protocol.md 12.2: answered with the one-byte status
    ``INVALID``, the session goes on): empty, an unknown op, a valid body cut short or with
    trailing bytes, or a near-valid mutation of one."""
    valid = request_bodies(user_ids=user_ids)
    known = {int(op) for op in Op}
    unknown_op = st.integers(0, 255).filter(lambda b: b not in known)
    candidates = st.one_of(
        st.just(b""),
        st.tuples(unknown_op, st.binary(max_size=40)).map(lambda t: bytes([t[0]]) + t[1]),
        valid.flatmap(lambda b: st.integers(0, len(b) - 1).map(lambda n: b[:n])),
        st.tuples(valid, st.binary(min_size=1, max_size=8)).map(lambda t: t[0] + t[1]),
        valid.flatmap(lambda b: mutations(b)),
    )
    return candidates.filter(_does_not_decode)


def audit_entries(with_hash: bool = True) -> st.SearchStrategy[AuditEntry]:
    """Audit entries (protocol.md 12.9), with a 32-byte chain hash unless ``with_hash`` is False."""
    return st.builds(
        AuditEntry,
        st.integers(1, 2**63 - 1),
        st.sampled_from(Action),
        _times(),
        st.sampled_from(Outcome),
        st.none() | fixed_bytes(KEY_ID_SIZE),
        st.none() | st.sampled_from(Context),
        st.integers(1, 2**32 - 1),
        fixed_bytes(AUDIT_HASH_SIZE) if with_hash else st.none(),
    )


def key_infos() -> st.SearchStrategy[KeyInfo]:
    """LIST_KEYS entries: key id, kind, creation time and a sealed label (or none)."""
    kinds = st.sampled_from(SecretKind)
    return st.builds(KeyInfo, fixed_bytes(KEY_ID_SIZE), kinds, _times(), _sealed_labels())


def _ok_responses() -> dict[Op, st.SearchStrategy[OpResponse]]:
    kind = st.sampled_from(SecretKind)
    return {
        Op.RETRIEVE_STORAGE_KEY: st.builds(StorageKeyResponse, fixed_bytes(ENCRYPTED_STORAGE_KEY_SIZE)),
        Op.CREATE_KEY_ID: st.builds(KeyIdResponse, fixed_bytes(KEY_ID_SIZE), fixed_bytes(KEY_ID_NONCE_SIZE)),
        Op.STORE_SECRET: st.just(StoredResponse())
        | st.builds(StoredResponse, fixed_bytes(KEY_ID_SIZE), fixed_bytes(KEY_ID_NONCE_SIZE)),
        Op.RETRIEVE: kind.flatmap(
            lambda k: st.builds(SecretResponse, st.just(k), sealed_secret_blobs(k), st.binary(max_size=255))
        ),
        Op.AUDIT: st.builds(
            AuditResponse, st.lists(audit_entries(), max_size=8).map(tuple), st.integers(0, 2**64 - 1)
        ),
        Op.LIST_KEYS: st.builds(
            KeyListResponse, st.lists(key_infos(), max_size=8).map(tuple), st.integers(0, 2**32 - 1)
        ),
        Op.DELETE_KEY: st.just(Empty()),
        Op.CHANGE_PASSWORD_START: st.builds(
            PasswordRegistrationResponse, fixed_bytes(REGISTRATION_RESPONSE_SIZE)
        ),
        Op.CHANGE_PASSWORD_FINISH: st.just(Empty()),
        Op.DELETE_ACCOUNT: st.just(Empty()),
        Op.RENAME_KEY: st.just(Empty()),
    }


def op_responses(op: Op) -> st.SearchStrategy[tuple[Status, OpResponse | None]]:
    """Answers to a request of ``op`` that decode (:func:`~keymgmt_proto.decode_response`):
    ``(Status.OK, fields)`` or ``(an error status, None)``."""
    ok = _ok_responses()[op].map(lambda r: (Status.OK, r))
    errors = st.sampled_from([s for s in Status if s is not Status.OK]).map(lambda s: (s, None))
    return st.one_of(ok, errors)


def response_bodies(op: Op) -> st.SearchStrategy[bytes]:
    """:func:`op_responses`, encoded: RESPONSE bodies a client must decode for ``op``."""
    return op_responses(op).map(lambda pair: encode_response(*pair))


# ----------------------------------------------------------- secrets


def secrets(max_size: int = 1024) -> st.SearchStrategy[bytes]:
    """Secrets a client may import: 1..``max_size`` bytes (at most 65536, OPS-12)."""
    return st.binary(min_size=1, max_size=min(max_size, MAX_SECRET_SIZE))


def portable_secrets(max_size: int = 1024) -> st.SearchStrategy[bytes]:
    """Secrets in the portable format (protocol.md 12.7): the short form up to 255 bytes,
    the long form above."""
    return secrets(max_size).map(encode_portable)


def invalid_portable_secrets() -> st.SearchStrategy[bytes]:
    """Byte strings no reader of the portable format may accept: too short, a length byte
    that does not match, a long form with another version, cut short, non-canonical (255
    bytes or fewer), over 64 KiB or with a length that does not match."""

    def long_form(version: int, size: int, body: bytes) -> bytes:
        return bytes([0, version]) + struct.pack(">I", size) + body

    return st.one_of(
        st.binary(max_size=1),
        st.binary(min_size=1, max_size=40).flatmap(
            lambda body: st.integers(1, 255).filter(lambda n: n != len(body)).map(lambda n: bytes([n]) + body)
        ),
        st.tuples(st.integers(0, 255).filter(lambda v: v != 1), st.binary(max_size=8)).map(
            lambda t: bytes([0, t[0]]) + t[1]
        ),
        st.binary(max_size=3).map(lambda b: bytes([0, 1]) + b),
        st.integers(0, 255).map(lambda n: long_form(1, n, bytes(n))),
        st.just(long_form(1, MAX_SECRET_SIZE + 1, b"")),
        st.integers(256, 300).flatmap(
            lambda n: st.integers(0, 300).filter(lambda m: m != n).map(lambda m: long_form(1, n, bytes(m)))
        ),
    )


def labels() -> st.SearchStrategy[str]:
    """Key labels a client accepts (:func:`~keymgmt_proto.check_label`): 1..64 bytes of
    UTF-8, no control characters, no space at either end, not 32 hex digits."""

    def valid(label: str) -> bool:
        try:
            check_label(label)
        except ValueError:
            return False
        return True

    text = st.text(
        alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Cs")),
        min_size=1,
        max_size=MAX_LABEL_SIZE,
    )
    return text.filter(valid)


# ----------------------------------------------------------- whole sessions

#: What a scripted session's request may ask; the runner fills in the user id, key ids and
#: sealed values from the session's own state.
ScriptOp = Literal[
    "storage_key",
    "generate",
    "import",
    "retrieve",
    "retrieve_missing",
    "list",
    "delete",
    "rename",
    "audit",
    "malformed",
    "wrong_user",
]
#: Every request a :class:`ScriptStep` may name.
SCRIPT_OPS: tuple[ScriptOp, ...] = (
    "storage_key",
    "generate",
    "import",
    "retrieve",
    "retrieve_missing",
    "list",
    "delete",
    "rename",
    "audit",
    "malformed",
    "wrong_user",
)


@dataclass(frozen=True, slots=True)
class ScriptStep:
    """One client action in a :class:`SessionScript`.

    ``action`` is ``"request"`` (send the request ``op``; with ``wait``, then wait for the
    answers to every request in flight, else leave it in flight, pipelined with what
    follows), ``"drop"`` (cut the connection without a word and resume the session on a new
    one: requests in flight are re-sent and each must be answered once), ``"goaway"``
    (close the connection gracefully with GOAWAY(OK), then resume likewise) or ``"logout"``
    (a sealed CLOSE; the script ends)."""

    action: Literal["request", "drop", "goaway", "logout"]
    op: ScriptOp | None = None
    wait: bool = True
    #: For ``import``: the secret's size; for ``retrieve``: the context.
    size: int = 1
    context: Context = Context.LOCAL_ONLY


@dataclass(frozen=True, slots=True)
class SessionScript:
    """The client side of one request session: log in, then ``steps`` in order. A script
    from :func:`scripted_sessions` keeps at most 16 requests in flight."""

    steps: tuple[ScriptStep, ...]

    def describe(self) -> str:
        """One short line per step, for transcripts."""
        parts = []
        for step in self.steps:
            if step.action == "request":
                parts.append(f"{step.op}{'' if step.wait else ' (pipelined)'}")
            else:
                parts.append(step.action)
        return ", ".join(parts) or "(login only)"


def _requests(ops: Sequence[ScriptOp]) -> st.SearchStrategy[ScriptStep]:
    return st.builds(
        ScriptStep,
        st.just("request"),
        st.sampled_from(ops),
        st.booleans(),
        st.integers(1, 300),
        st.sampled_from(Context),
    )


@st.composite
def scripted_sessions(
    draw: st.DrawFn, max_steps: int = 8, ops: Sequence[ScriptOp] = SCRIPT_OPS
) -> SessionScript:
    """Scripts of up to ``max_steps`` steps: requests of ``ops`` (waited for or pipelined),
    dropped and gracefully closed connections (each followed by a resumption), and maybe a
    logout at the end. At most 16 requests are in flight at any point."""
    steps: list[ScriptStep] = []
    in_flight = 0
    for _ in range(draw(st.integers(0, max_steps))):
        choice = draw(st.sampled_from(["request", "request", "request", "drop", "goaway"]))
        if choice == "request":
            step = draw(_requests(ops))
            if not step.wait:
                if in_flight >= 15:
                    step = ScriptStep("request", step.op, True, step.size, step.context)
                else:
                    in_flight += 1
            else:
                in_flight = 0  # waiting for an answer: everything before it is answered too
        else:
            step = ScriptStep(choice)  # type: ignore[arg-type]
        steps.append(step)
    if draw(st.booleans()):
        steps.append(ScriptStep("logout"))
    return SessionScript(tuple(steps))
