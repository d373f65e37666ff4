"""Edge cases of the core's pure building blocks: framing, payloads, operation bodies, the
channel's counters, sealed session state and the OPAQUE suites' input checks."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from keymgmt_proto import (
    MAX_AUDIT_PAGE,
    MAX_LIST_PAGE,
    Action,
    AuditEntry,
    AuditRequest,
    AuditResponse,
    AuditType,
    Channel,
    ChannelState,
    CreateKeyIdRequest,
    ErrorCode,
    Frame,
    FrameType,
    KeyIdResponse,
    KeyInfo,
    KeyListResponse,
    ListKeysRequest,
    Op,
    OpRequest,
    OpResponse,
    Outcome,
    ProtocolError,
    RealOpaque,
    RemoteProtocolError,
    RetrieveStorageKeyRequest,
    SecretKind,
    SecretResponse,
    ServerSetup,
    Status,
    StorageKeyResponse,
    decode_request,
    decode_response,
    derive_key_id,
    encode_response,
    encrypt_storage_key,
    joint_key_id,
    open_secret,
    seal_secret,
    session_sealing_key,
)
from keymgmt_proto.testing import FakeOpaque
from keymgmt_proto.wire import (
    MAX_SEQ,
    REGISTRATION_TOKEN_MAX,
    SESSION_STATE_AD_PREFIX,
    Abort,
    GoAway,
    LoginFinish,
    LoginResponse,
    Record,
    RegResponse,
    RegStart,
    RegUpload,
    Request,
    Response,
    Resume,
    SessionState,
    Welcome,
    Writer,
    hkdf_expand_sha3,
    seal_session_state,
    unseal_session_state,
)

USER = bytes(range(16))
KEY_ID = bytes(range(16, 32))
ENTRY = AuditEntry(1, Action.REGISTER, 0, Outcome.SUCCESS)
KEY_INFO = KeyInfo(KEY_ID, SecretKind.GENERATED, 0)

# --------------------------------------------------------------------------- framing


def test_frame_rejects_a_session_id_beyond_the_cap():
    with pytest.raises(ValueError, match="session_id out of range"):
        Frame(FrameType.REQUEST, 2**31, b"")


def test_frame_repr_names_the_type_and_size_but_not_the_payload():
    frame = Frame(FrameType.ABORT, 7, b"secret-ish")
    assert repr(frame) == "Frame(ABORT, session_id=7, 10 bytes)"
    assert "secret" not in repr(frame)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda w: w.fixed(b"abc", 4), "expected 4 bytes, got 3"),
        (lambda w: w.bytes8(bytes(256)), "longer than 255"),
        (lambda w: w.bytes16(bytes(65536)), "longer than 65535"),
    ],
    ids=["fixed-size-mismatch", "bytes8-overflow", "bytes16-overflow"],
)
def test_writer_refuses_values_its_length_prefix_cannot_describe(write, message):
    """An encoder never emits a field whose declared size disagrees with its bytes."""
    with pytest.raises(ValueError, match=message):
        write(Writer())


# ------------------------------------------------------------------------ payloads


def test_fixed_size_payload_fields_are_checked_on_construction():
    with pytest.raises(ValueError, match="user_id must be 16 bytes, got 15"):
        Welcome(bytes(15))


#: Payload classes that share their codec with others of the same shape.
SHARED_CODECS = [
    RegResponse,
    RegUpload,
    LoginResponse,
    LoginFinish,
    Welcome,
    Abort,
    GoAway,
    Request,
    Response,
]


@pytest.mark.parametrize("cls", SHARED_CODECS, ids=lambda cls: cls.__name__)
def test_a_shared_codec_names_its_own_frame_when_decoding_fails(cls):
    with pytest.raises(RemoteProtocolError, match=f"^truncated {cls.FRAME_TYPE.name}$") as info:
        cls.decode(b"\x00")
    assert info.value.code is ErrorCode.MALFORMED


def test_messages_of_one_shape_stay_distinct_and_keep_their_secrets_out_of_repr():
    assert Request(1, b"body") != Response(1, b"body")
    assert Abort(ErrorCode.MALFORMED) != GoAway(ErrorCode.MALFORMED)
    assert repr(Response(7, b"secret body")) == "Response(request_id=7)"
    assert repr(LoginFinish(bytes(64))) == "LoginFinish()"
    assert repr(Welcome(bytes(16))) == f"Welcome(user_id={bytes(16)!r})"


def test_reg_start_with_an_oversized_token_does_not_decode():
    """The two-byte token prefix could carry 64 KiB; the protocol allows far less (REG-5)."""
    payload = (
        Writer().bytes8(b"alice").fixed(bytes(32), 32).bytes16(bytes(REGISTRATION_TOKEN_MAX + 1)).getvalue()
    )
    with pytest.raises(RemoteProtocolError, match="token longer than") as info:
        RegStart.decode(payload)
    assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize("seq", [-1, 2**64])
def test_record_sequence_number_must_fit_in_64_bits(seq):
    with pytest.raises(ValueError, match="seq out of range"):
        Record(seq, bytes(16))


@pytest.mark.parametrize("total", [-1, 2**64])
def test_resume_received_total_must_fit_in_64_bits(total):
    with pytest.raises(ValueError, match="received_total out of range"):
        Resume(bytes(32), total)


# ---------------------------------------------------------------- operation bodies


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RetrieveStorageKeyRequest(bytes(15)), "user_id must be 16 bytes"),
        (lambda: CreateKeyIdRequest(USER, SecretKind.GENERATED, bytes(31)), "client_nonce must be 32"),
        (lambda: AuditRequest(USER, AuditType.ALL, (KEY_ID,) * 1025), "at most 1024 key ids"),
        (lambda: AuditRequest(USER, AuditType.ALL, cursor=2**63), "cursor out of range"),
        (lambda: AuditRequest(USER, AuditType.ALL, limit=0), "limit must be 1..256"),
        (lambda: AuditRequest(USER, AuditType.ALL, limit=MAX_AUDIT_PAGE + 1), "limit must be 1..256"),
        (lambda: ListKeysRequest(USER, cursor=2**32), "cursor out of range"),
    ],
    ids=[
        "short-user-id",
        "short-client-nonce",
        "too-many-audit-key-ids",
        "audit-cursor",
        "audit-limit-zero",
        "audit-limit-over-page",
        "list-cursor",
    ],
)
def test_request_bodies_reject_out_of_range_fields(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def _request_head(op: Op) -> Writer:
    return Writer().u8(op).fixed(USER, 16)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            _request_head(Op.AUDIT).u8(AuditType.ALL).u16(0).u8(0).u8(0).u64(2**63).u16(1).getvalue(),
            "cursor out of range",
        ),
        (
            _request_head(Op.AUDIT).u8(AuditType.ALL).u16(0).u8(0).u8(0).u64(0).u16(0).getvalue(),
            "limit must be",
        ),
        (_request_head(Op.LIST_KEYS).u32(0).u16(MAX_LIST_PAGE + 1).getvalue(), "limit must be"),
        (
            _request_head(Op.CREATE_KEY_ID).u8(SecretKind.GENERATED).fixed(bytes(32), 32).u8(0).getvalue(),
            "trailing bytes",
        ),
    ],
    ids=["audit-cursor", "audit-limit", "list-limit", "trailing-byte"],
)
def test_decode_request_turns_bad_fields_into_remote_errors(body, message):
    """A peer's out-of-range field is a RemoteProtocolError(MALFORMED), never a bare ValueError."""
    with pytest.raises(RemoteProtocolError, match=message) as info:
        decode_request(body)
    assert info.value.code is ErrorCode.MALFORMED


def test_abstract_request_and_response_bases_have_no_encoding():
    """Only the concrete op classes define a wire layout."""
    with pytest.raises(NotImplementedError):
        OpRequest().encode()
    with pytest.raises(NotImplementedError):
        OpResponse().encode_fields()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: StorageKeyResponse(bytes(59)), "must be 60 bytes"),
        (lambda: KeyIdResponse(KEY_ID, bytes(31)), "server_nonce must be 32"),
        (lambda: SecretResponse(SecretKind.IMPORTED, bytes(12 + 16 + 5), bytes(256)), "associated data"),
        (lambda: AuditEntry(1, Action.REGISTER, 0, Outcome.SUCCESS, count=0), "count must be"),
        (lambda: AuditEntry(1, Action.REGISTER, 0, Outcome.SUCCESS, count=2**32), "count must be"),
        (lambda: AuditResponse((ENTRY,) * (MAX_AUDIT_PAGE + 1)), "too many"),
        (lambda: KeyListResponse((KEY_INFO,) * (MAX_LIST_PAGE + 1)), "too many"),
    ],
    ids=[
        "storage-key-size",
        "key-id-server-nonce",
        "long-ad",
        "audit-count-zero",
        "audit-count-overflow",
        "audit-page",
        "key-page",
    ],
)
def test_response_bodies_reject_out_of_range_fields(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def _audit_response_body(*, flag: int = 0, count: int = 1) -> bytes:
    w = Writer().u8(Status.OK).u16(1)
    w.u64(1).u8(1).u64(0).u8(Outcome.SUCCESS).u32(count).u8(flag)
    if flag == 1:
        w.fixed(KEY_ID, 16)
    return w.u8(0xFF).fixed(b"h" * 32, 32).u64(0).getvalue()


def test_audit_entry_decodes_when_well_formed():
    status, response = decode_response(Op.AUDIT, _audit_response_body(flag=1))
    assert status is Status.OK
    assert isinstance(response, AuditResponse)
    assert response.entries[0].key_id == KEY_ID and response.entries[0].count == 1
    assert response.entries[0].chain_hash == b"h" * 32  # each entry is followed by its hash


def test_an_audit_entry_without_its_hash_is_truncated():
    body = _audit_response_body(flag=1)
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decode_response(Op.AUDIT, body[: -8 - 32] + body[-8:])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_audit_response_body(flag=2), "optional field flag must be 0 or 1"),
        (_audit_response_body(count=0), "invalid audit entry: count must be"),
    ],
    ids=["bad-key-id-flag", "zero-count"],
)
def test_audit_entries_from_the_server_are_validated(body, message):
    with pytest.raises(RemoteProtocolError, match=message) as info:
        decode_response(Op.AUDIT, body)
    assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize(
    ("status", "response"),
    [(Status.OK, None), (Status.NOT_FOUND, StorageKeyResponse(bytes(60)))],
    ids=["ok-without-fields", "error-with-fields"],
)
def test_encode_response_pairs_ok_with_fields_and_errors_with_none(status, response):
    with pytest.raises(ValueError, match="an OK status needs a response"):
        encode_response(status, response)


def test_key_id_derivations_insist_on_32_byte_randomness():
    with pytest.raises(ValueError, match="r must be 32 random bytes"):
        derive_key_id(USER, bytes(31))
    with pytest.raises(ValueError, match="contributions are 32 bytes"):
        joint_key_id(USER, bytes(32), bytes(33))


@pytest.mark.parametrize("secret", [b"", bytes(65537)], ids=["empty", "too-long"])
def test_seal_secret_refuses_secrets_the_portable_format_cannot_hold(secret):
    with pytest.raises(ValueError, match=r"a secret must be 1\.\.65536 bytes"):
        seal_secret(bytes(32), secret, b"ad", os.urandom)


def test_open_secret_reports_a_truncated_ciphertext_as_malformed():
    """Shorter than nonce + tag + one byte: not even worth an AEAD attempt."""
    with pytest.raises(RemoteProtocolError, match="too short") as info:
        open_secret(bytes(32), bytes(12 + 16), b"ad")
    assert info.value.code is ErrorCode.MALFORMED


# ------------------------------------------------------------------ channel, HKDF


@pytest.mark.parametrize("length", [0, 255 * 32 + 1])
def test_hkdf_expand_bounds_the_output_length(length):
    with pytest.raises(ValueError, match=r"1\.\.8160"):
        hkdf_expand_sha3(bytes(32), b"info", length)


def test_hkdf_expand_accepts_its_maximum_length():
    assert len(hkdf_expand_sha3(bytes(32), b"info", 255 * 32)) == 8160


@pytest.mark.parametrize(
    "state",
    [
        ChannelState(bytes(31), bytes(32)),
        ChannelState(bytes(32), bytes(33)),
        ChannelState(bytes(32), bytes(32), send_seq=-1),
        ChannelState(bytes(32), bytes(32), received_total=MAX_SEQ + 1),
    ],
    ids=["short-prk", "long-epoch-secret", "negative-counter", "counter-overflow"],
)
def test_channel_restore_rejects_impossible_state(state):
    with pytest.raises(ValueError, match="invalid channel state"):
        Channel.restore(state, is_client=False)


def test_next_epoch_needs_two_32_byte_nonces():
    channel = Channel(bytes(64), is_client=True)
    with pytest.raises(ValueError, match="resumption nonces are 32 bytes"):
        channel.next_epoch(bytes(32), bytes(16))


def _channel(is_client: bool, **counters: int) -> Channel:
    prk = bytes(range(32))
    return Channel.restore(ChannelState(prk, prk, **counters), is_client=is_client)


def test_sealing_past_the_last_sequence_number_fails_and_changes_nothing():
    channel = _channel(True, send_seq=MAX_SEQ)
    with pytest.raises(ProtocolError) as info:
        channel.seal(FrameType.REQUEST, b"x")
    assert info.value.code is ErrorCode.SEQUENCE_EXHAUSTED
    assert channel.send_seq == MAX_SEQ and channel.sends_left == 0


def test_a_record_at_the_reserved_sequence_number_is_refused():
    """Sequence number 2**64-1 is never sent, so a receiver at it accepts nothing more."""
    receiver = _channel(False, recv_seq=MAX_SEQ)
    with pytest.raises(RemoteProtocolError, match="out of range") as info:
        receiver.open(FrameType.REQUEST, Record(MAX_SEQ, bytes(16)))
    assert info.value.code is ErrorCode.BAD_RECORD
    assert receiver.recv_seq == MAX_SEQ


def test_resume_sequence_numbers_run_out_on_both_sides():
    client = _channel(True, resume_seq=MAX_SEQ)
    with pytest.raises(ProtocolError) as info:
        client.seal_resume(b"x")
    assert info.value.code is ErrorCode.SEQUENCE_EXHAUSTED
    server = _channel(False)
    with pytest.raises(RemoteProtocolError, match="out of range") as info2:
        server.open_resume(Record(MAX_SEQ, bytes(16)))
    assert info2.value.code is ErrorCode.BAD_RECORD
    assert server.resume_seq == 0


def test_storage_key_must_be_32_bytes():
    with pytest.raises(ValueError, match="storage_key must be 32 bytes"):
        encrypt_storage_key(bytes(32), bytes(16), USER, os.urandom)


# ------------------------------------------------------------ sealed session state

HANDLE = bytes(16)
SEAL_KEY = session_sealing_key(b"a shared server setup")


def _seal_plaintext(plaintext: bytes) -> bytes:
    nonce = bytes(12)
    return nonce + ChaCha20Poly1305(SEAL_KEY).encrypt(nonce, plaintext, SESSION_STATE_AD_PREFIX + HANDLE)


def test_sealed_session_state_round_trips():
    state = SessionState(
        USER,
        b"alice",
        1.0,
        2.0,
        ChannelState(bytes(32), bytes(range(32)), 3, 4, 5, 6, 7),
        9,
        2,
        OrderedDict([(8, b"eight"), (9, b"nine")]),
    )
    back = unseal_session_state(seal_session_state(state, HANDLE, SEAL_KEY, os.urandom), HANDLE, SEAL_KEY)
    assert back is not None
    assert (back.user_id, back.account_name, back.highest_request_id) == (USER, b"alice", 9)
    assert back.channel.received_total == 7 and back.answered == state.answered


def test_session_state_of_another_format_version_is_not_trusted():
    """It verifies (same key) but this instance cannot read it: treated as no session."""
    assert unseal_session_state(_seal_plaintext(b"\x01" + bytes(200)), HANDLE, SEAL_KEY) is None


def test_session_state_that_verifies_but_does_not_parse_is_not_trusted():
    assert unseal_session_state(_seal_plaintext(b"\x02" + USER), HANDLE, SEAL_KEY) is None


# ------------------------------------------------------------------------- OPAQUE


def test_a_corrupt_server_setup_is_refused_without_details():
    with pytest.raises(ValueError) as info:
        ServerSetup.from_bytes(b"\x00" * 10)
    assert str(info.value) == "OPAQUE server setup is corrupt"


def _opaque_wrong_sizes(suite):
    reg = suite.client_registration_start(b"pw")
    login = suite.client_login_start(b"pw")
    return {
        "client_registration_finish": lambda: suite.client_registration_finish(b"pw", reg.state, bytes(10)),
        "client_login_finish": lambda: suite.client_login_finish(b"pw", login.state, bytes(10)),
        "server_registration_start": lambda: suite.server_registration_start(SETUP, bytes(10), b"alice"),
        "server_registration_finish": lambda: suite.server_registration_finish(bytes(10)),
        "server_login_start": lambda: suite.server_login_start(SETUP, bytes(10), bytes(10), b"alice"),
    }


SETUP = ServerSetup.generate()
WRONG_SIZE_CODES = {
    "client_registration_finish": ErrorCode.MALFORMED,
    "client_login_finish": ErrorCode.AUTHENTICATION_FAILED,
    "server_registration_start": ErrorCode.MALFORMED,
    "server_registration_finish": ErrorCode.MALFORMED,
    "server_login_start": ErrorCode.MALFORMED,
}


@pytest.mark.parametrize("step", sorted(WRONG_SIZE_CODES))
def test_fake_opaque_rejects_wrong_sized_messages_like_the_real_suite(step):
    """Like RealOpaque, FakeOpaque fails a wrong-sized message with the same RemoteProtocolError code."""
    for suite in (RealOpaque(), FakeOpaque(os.urandom)):
        with pytest.raises(RemoteProtocolError) as info:
            _opaque_wrong_sizes(suite)[step]()
        assert info.value.code is WRONG_SIZE_CODES[step], (suite, step)


def test_fake_opaque_says_what_it_is():
    assert repr(FakeOpaque(os.urandom)) == "FakeOpaque()"


def test_session_state_with_bytes_after_its_last_field_is_not_trusted():
    state = SessionState(
        USER, b"alice", 1.0, 2.0, ChannelState(bytes(32), bytes(32), 0, 0, 0, 0, 0), 0, 0, OrderedDict()
    )
    sealed = seal_session_state(state, HANDLE, SEAL_KEY, os.urandom)
    plaintext = ChaCha20Poly1305(SEAL_KEY).decrypt(sealed[:12], sealed[12:], SESSION_STATE_AD_PREFIX + HANDLE)
    assert unseal_session_state(_seal_plaintext(plaintext), HANDLE, SEAL_KEY) is not None
    assert unseal_session_state(_seal_plaintext(plaintext + b"\x00"), HANDLE, SEAL_KEY) is None
