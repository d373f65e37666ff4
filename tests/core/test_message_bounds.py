"""Every message and operation refuses to be built with a field the wire format cannot carry.

The decoders read fixed sizes, so a wrong size never comes off the wire; these checks guard
what a caller builds. Each case pairs the largest (or smallest) legal value, which must be
accepted, with one step past it, which must raise ``ValueError``; dropping a check or moving
a bound by one fails here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from keymgmt_proto import (
    MAX_AUDIT_PAGE,
    MAX_LIST_PAGE,
    Action,
    AuditEntry,
    AuditRequest,
    AuditType,
    Context,
    CreateKeyIdRequest,
    DeleteKeyRequest,
    ErrorCode,
    KeyIdResponse,
    KeyInfo,
    ListKeysRequest,
    Outcome,
    RemoteProtocolError,
    RetrieveRequest,
    SecretKind,
    SecretResponse,
    StoreSecretRequest,
    derive_key_id,
    secret_ad,
)
from keymgmt_proto.wire import (
    Abort,
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
    ResumedEnvelope,
    ResumeEnvelope,
    Writer,
)

UID = bytes(16)
KID = bytes(16)
RECORD = Record(0, bytes(16))
SEALED = bytes(12 + 32 + 16)  # a generated secret: nonce, 32 bytes, tag

Build = Callable[[], object]

# (name, the last legal value, one step past it)
CASES: list[tuple[str, Build, Build]] = [
    ("RegStart name", lambda: RegStart(b"a" * 255, bytes(32)), lambda: RegStart(b"a" * 256, bytes(32))),
    ("RegStart empty name", lambda: RegStart(b"a", bytes(32)), lambda: RegStart(b"", bytes(32))),
    ("RegStart request", lambda: RegStart(b"a", bytes(32)), lambda: RegStart(b"a", bytes(33))),
    (
        "RegStart token",
        lambda: RegStart(b"a", bytes(32), bytes(1024)),
        lambda: RegStart(b"a", bytes(32), bytes(1025)),
    ),
    ("RegResponse", lambda: RegResponse(bytes(64)), lambda: RegResponse(bytes(63))),
    ("RegUpload", lambda: RegUpload(bytes(192)), lambda: RegUpload(bytes(191))),
    ("LoginStart name", lambda: LoginStart(b"a" * 255, bytes(96)), lambda: LoginStart(b"a" * 256, bytes(96))),
    ("LoginStart request", lambda: LoginStart(b"a", bytes(96)), lambda: LoginStart(b"a", bytes(97))),
    ("LoginResponse", lambda: LoginResponse(bytes(320)), lambda: LoginResponse(bytes(321))),
    ("LoginFinish", lambda: LoginFinish(bytes(64)), lambda: LoginFinish(bytes(65))),
    (
        "Abort reason",
        lambda: Abort(ErrorCode.MALFORMED, "r" * 255),
        lambda: Abort(ErrorCode.MALFORMED, "r" * 256),
    ),
    (
        "GoAway reason",
        lambda: GoAway(ErrorCode.MALFORMED, "r" * 255),
        lambda: GoAway(ErrorCode.MALFORMED, "r" * 256),
    ),
    (
        "ResumeEnvelope handle",
        lambda: ResumeEnvelope(bytes(16), RECORD),
        lambda: ResumeEnvelope(bytes(17), RECORD),
    ),
    (
        "ResumedEnvelope nonce",
        lambda: ResumedEnvelope(bytes(32), RECORD),
        lambda: ResumedEnvelope(bytes(31), RECORD),
    ),
    ("Resume nonce", lambda: Resume(bytes(32), 0), lambda: Resume(bytes(33), 0)),
    (
        "CompleteRegistration user id",
        lambda: CompleteRegistration(UID, bytes(60)),
        lambda: CompleteRegistration(bytes(15), bytes(60)),
    ),
    (
        "CompleteRegistration storage key",
        lambda: CompleteRegistration(UID, bytes(60)),
        lambda: CompleteRegistration(UID, bytes(61)),
    ),
    ("Request id high", lambda: Request(2**32 - 1, b""), lambda: Request(2**32, b"")),
    ("Request id low", lambda: Request(1, b""), lambda: Request(0, b"")),
    ("Response id high", lambda: Response(2**32 - 1, b""), lambda: Response(2**32, b"")),
    ("Response id low", lambda: Response(1, b""), lambda: Response(0, b"")),
    (
        "CreateKeyId user id",
        lambda: CreateKeyIdRequest(UID, SecretKind.GENERATED, bytes(32)),
        lambda: CreateKeyIdRequest(bytes(17), SecretKind.GENERATED, bytes(32)),
    ),
    (
        "Store user id",
        lambda: StoreSecretRequest(UID, KID, SecretKind.GENERATED, SEALED),
        lambda: StoreSecretRequest(bytes(15), KID, SecretKind.GENERATED, SEALED),
    ),
    (
        "Store key id",
        lambda: StoreSecretRequest(UID, KID, SecretKind.GENERATED, SEALED),
        lambda: StoreSecretRequest(UID, bytes(17), SecretKind.GENERATED, SEALED),
    ),
    (
        "Store sealed size",
        lambda: StoreSecretRequest(UID, KID, SecretKind.GENERATED, SEALED),
        lambda: StoreSecretRequest(UID, KID, SecretKind.GENERATED, SEALED + b"x"),
    ),
    (
        "Retrieve user id",
        lambda: RetrieveRequest(UID, KID, Context.NULL),
        lambda: RetrieveRequest(bytes(15), KID, Context.NULL),
    ),
    (
        "Retrieve key id",
        lambda: RetrieveRequest(UID, KID, Context.NULL),
        lambda: RetrieveRequest(UID, bytes(15), Context.NULL),
    ),
    ("Delete user id", lambda: DeleteKeyRequest(UID, KID), lambda: DeleteKeyRequest(bytes(15), KID)),
    ("Delete key id", lambda: DeleteKeyRequest(UID, KID), lambda: DeleteKeyRequest(UID, bytes(15))),
    ("List user id", lambda: ListKeysRequest(UID), lambda: ListKeysRequest(bytes(15))),
    (
        "List limit high",
        lambda: ListKeysRequest(UID, 0, MAX_LIST_PAGE),
        lambda: ListKeysRequest(UID, 0, MAX_LIST_PAGE + 1),
    ),
    ("List limit low", lambda: ListKeysRequest(UID, 0, 1), lambda: ListKeysRequest(UID, 0, 0)),
    ("List cursor", lambda: ListKeysRequest(UID, 2**32 - 1), lambda: ListKeysRequest(UID, 2**32)),
    (
        "Audit user id",
        lambda: AuditRequest(UID, AuditType.ALL),
        lambda: AuditRequest(bytes(15), AuditType.ALL),
    ),
    (
        "Audit key ids",
        lambda: AuditRequest(UID, AuditType.ALL, (KID,) * 1024),
        lambda: AuditRequest(UID, AuditType.ALL, (KID,) * 1025),
    ),
    (
        "Audit key id size",
        lambda: AuditRequest(UID, AuditType.ALL, (KID,)),
        lambda: AuditRequest(UID, AuditType.ALL, (bytes(15),)),
    ),
    (
        "Audit after high",
        lambda: AuditRequest(UID, AuditType.ALL, after=2**63 - 1),
        lambda: AuditRequest(UID, AuditType.ALL, after=2**63),
    ),
    (
        "Audit after low",
        lambda: AuditRequest(UID, AuditType.ALL, after=0),
        lambda: AuditRequest(UID, AuditType.ALL, after=-1),
    ),
    (
        "Audit before high",
        lambda: AuditRequest(UID, AuditType.ALL, before=2**63 - 1),
        lambda: AuditRequest(UID, AuditType.ALL, before=2**63),
    ),
    (
        "Audit cursor high",
        lambda: AuditRequest(UID, AuditType.ALL, cursor=2**63 - 1),
        lambda: AuditRequest(UID, AuditType.ALL, cursor=2**63),
    ),
    (
        "Audit limit high",
        lambda: AuditRequest(UID, AuditType.ALL, limit=MAX_AUDIT_PAGE),
        lambda: AuditRequest(UID, AuditType.ALL, limit=MAX_AUDIT_PAGE + 1),
    ),
    (
        "Audit limit low",
        lambda: AuditRequest(UID, AuditType.ALL, limit=1),
        lambda: AuditRequest(UID, AuditType.ALL, limit=0),
    ),
    (
        "KeyIdResponse key id",
        lambda: KeyIdResponse(KID, bytes(32)),
        lambda: KeyIdResponse(bytes(17), bytes(32)),
    ),
    (
        "SecretResponse AD",
        lambda: SecretResponse(SecretKind.GENERATED, SEALED, bytes(255)),
        lambda: SecretResponse(SecretKind.GENERATED, SEALED, bytes(256)),
    ),
    (
        "SecretResponse sealed size",
        lambda: SecretResponse(SecretKind.GENERATED, SEALED, b""),
        lambda: SecretResponse(SecretKind.GENERATED, SEALED[:-1], b""),
    ),
    (
        "KeyInfo key id",
        lambda: KeyInfo(KID, SecretKind.GENERATED, 0),
        lambda: KeyInfo(bytes(15), SecretKind.GENERATED, 0),
    ),
    (
        "AuditEntry count high",
        lambda: AuditEntry(1, Action.RETRIEVE, 0, Outcome.SUCCESS, count=2**32 - 1),
        lambda: AuditEntry(1, Action.RETRIEVE, 0, Outcome.SUCCESS, count=2**32),
    ),
    (
        "AuditEntry key id",
        lambda: AuditEntry(1, Action.RETRIEVE, 0, Outcome.SUCCESS, KID),
        lambda: AuditEntry(1, Action.RETRIEVE, 0, Outcome.SUCCESS, bytes(15)),
    ),
    (
        "derive_key_id user id",
        lambda: derive_key_id(UID, bytes(32)),
        lambda: derive_key_id(bytes(15), bytes(32)),
    ),
    (
        "secret_ad user id",
        lambda: secret_ad(UID, KID, SecretKind.GENERATED),
        lambda: secret_ad(bytes(15), KID, SecretKind.GENERATED),
    ),
    (
        "secret_ad key id",
        lambda: secret_ad(UID, KID, SecretKind.GENERATED),
        lambda: secret_ad(UID, bytes(15), SecretKind.GENERATED),
    ),
]


@pytest.mark.parametrize(("name", "legal", "illegal"), CASES, ids=[case[0] for case in CASES])
def test_the_last_legal_value_is_accepted_and_one_past_it_refused(
    name: str, legal: Build, illegal: Build
) -> None:
    assert legal() is not None
    with pytest.raises(ValueError):
        illegal()


def test_a_writer_takes_the_longest_field_its_length_prefix_can_say():
    assert Writer().bytes8(bytes(255)).getvalue()[0] == 255
    assert Writer().bytes16(bytes(0xFFFF)).getvalue()[:2] == b"\xff\xff"
    with pytest.raises(ValueError):
        Writer().bytes8(bytes(256))
    with pytest.raises(ValueError):
        Writer().bytes16(bytes(0x10000))


@pytest.mark.parametrize(
    "message",
    [RegStart(b"alice", bytes(32), b"token"), Abort(ErrorCode.MALFORMED, "reason")],
    ids=["RegStart", "Abort"],
)
def test_a_payload_with_a_trailing_byte_is_refused(message):
    payload = message.encode()
    assert type(message).decode(payload) == message
    with pytest.raises(RemoteProtocolError):
        type(message).decode(payload + b"\x00")
