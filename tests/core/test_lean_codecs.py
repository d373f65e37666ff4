"""The per-request fast paths (issue 14, P1) agree with the codec objects they bypass:
same bytes out, the same errors in, and the hot-channel set's shortcut keeps its bound."""

from __future__ import annotations

import hashlib
import os

import pytest

from keymgmt_proto import (
    AUDIT_CHAIN_DOMAIN,
    SEALED_OVERHEAD,
    Action,
    AuditEntry,
    Channel,
    Context,
    FrameType,
    Op,
    Outcome,
    RemoteProtocolError,
    RetrieveRequest,
    SecretKind,
    SecretResponse,
    ServerConfig,
    SessionRegistry,
    Status,
    StoredResponse,
    StoreSecretRequest,
    audit_chain_hash,
    audit_chain_hash_of,
    decode_request,
    decode_response,
    encode_response,
    joint_key_id,
    retrieve_fields,
    secret_answer,
)
from keymgmt_proto.wire import (
    HEADER_SIZE,
    Frame,
    Record,
    Request,
    Response,
    decode_header,
    decode_header_from,
    encode_frame,
)


@pytest.mark.parametrize("cls", [Request, Response])
@pytest.mark.parametrize("request_id", [1, 7, 2**16, 2**32 - 1])
@pytest.mark.parametrize("body", [b"", b"x", os.urandom(1024)])
def test_request_fields_match_the_objects(cls: type[Request], request_id: int, body: bytes) -> None:
    encoded = cls.encode_fields(request_id, body)
    assert encoded == cls(request_id, body).encode()
    decoded = cls.decode(encoded)
    assert cls.decode_fields(encoded) == (decoded.request_id, decoded.body)


@pytest.mark.parametrize("cls", [Request, Response])
@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x01", b"\x00\x00\x00\x00", b"\x00\x00\x00\x00body"])
def test_request_fields_refuse_what_decode_refuses_with_its_error(cls: type[Request], payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as expected:
        cls.decode(payload)
    with pytest.raises(RemoteProtocolError) as got:
        cls.decode_fields(payload)
    assert (str(got.value), got.value.code) == (str(expected.value), expected.value.code)


@pytest.mark.parametrize("request_id", [0, -1, 2**32])
def test_encode_fields_refuses_request_ids_out_of_range(request_id: int) -> None:
    with pytest.raises(ValueError):
        Request.encode_fields(request_id, b"")


def test_sealed_payloads_match_records_both_ways() -> None:
    key = os.urandom(64)
    by_record, by_payload = Channel(key, is_client=True), Channel(key, is_client=True)
    server_a, server_b = Channel(key, is_client=False), Channel(key, is_client=False)
    for i in range(5):
        body = os.urandom(i * 300)
        record = by_record.seal(FrameType.REQUEST, body)
        payload = by_payload.seal_payload(FrameType.REQUEST, body)
        assert payload == record.encode()
        assert Record.decode(payload) == record
        assert server_a.open(FrameType.REQUEST, record) == body
        assert server_b.open_payload(FrameType.REQUEST, payload) == body
    counters = (by_payload.send_seq, by_payload.sent_total, server_b.recv_seq, server_b.received_total)
    assert counters == (5, 5, 5, 5)


@pytest.mark.parametrize("size", [0, 7, 8, 23])
def test_open_payload_refuses_a_truncated_record_as_the_decoder_does(size: int) -> None:
    channel = Channel(os.urandom(64), is_client=False)
    payload = bytes(size)
    with pytest.raises(RemoteProtocolError) as expected:
        Record.decode(payload)
    with pytest.raises(RemoteProtocolError) as got:
        channel.open_payload(FrameType.REQUEST, payload)
    assert (str(got.value), got.value.code) == (str(expected.value), expected.value.code)
    assert channel.recv_seq == 0


def test_open_payload_refuses_replays_reordering_and_tampering_and_changes_nothing() -> None:
    key = os.urandom(64)
    client, server = Channel(key, is_client=True), Channel(key, is_client=False)
    first = client.seal_payload(FrameType.REQUEST, b"one")
    second = client.seal_payload(FrameType.REQUEST, b"two")
    with pytest.raises(RemoteProtocolError, match="out of sequence"):
        server.open_payload(FrameType.REQUEST, second)
    tampered = first[:-1] + bytes([first[-1] ^ 1])
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        server.open_payload(FrameType.REQUEST, tampered)
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        server.open_payload(FrameType.RESPONSE, first)  # the frame type is in the AD
    assert server.recv_seq == 0
    assert server.open_payload(FrameType.REQUEST, first) == b"one"
    with pytest.raises(RemoteProtocolError, match="replayed"):
        server.open_payload(FrameType.REQUEST, first)
    assert server.open_payload(FrameType.REQUEST, second) == b"two"


def test_header_read_in_place_matches_the_copied_header() -> None:
    frame = encode_frame(FrameType.REQUEST, 42, b"payload") + b"next frame's bytes"
    buffer = bytearray(frame)
    assert decode_header_from(buffer, 1024) == decode_header(frame[:HEADER_SIZE], 1024)
    unknown = bytearray(frame)
    unknown[1] = 0x30
    with pytest.raises(RemoteProtocolError, match="unknown frame type 0x30"):
        decode_header_from(unknown, 1024)


def test_frames_compare_by_value() -> None:
    assert Frame(FrameType.REQUEST, 1, b"x") == Frame(FrameType.REQUEST, 1, b"x")
    assert Frame(FrameType.REQUEST, 1, b"x") != Frame(FrameType.RESPONSE, 1, b"x")
    assert len({Frame(FrameType.REQUEST, 1, b"x"), Frame(FrameType.REQUEST, 1, b"x")}) == 1


def test_a_channel_touched_again_after_it_left_the_hot_set_is_tracked_again() -> None:
    """The hot set skips a touch of the channel it touched last; a channel whose session
    ended (``cool``) must not be skipped when touched again, or it would keep its AEAD
    objects outside the bound (P4)."""
    registry = SessionRegistry(ServerConfig(max_hot_channels=1))
    a, b = Channel(os.urandom(64), is_client=False), Channel(os.urandom(64), is_client=False)
    a.seal_payload(FrameType.RESPONSE, b"x")
    registry.warm(a)
    registry.warm(a)  # the shortcut
    assert registry.hot_channels == 1
    registry.cool(a)
    assert not a.is_hot and registry.hot_channels == 0
    a.seal_payload(FrameType.RESPONSE, b"x")  # used again: built again
    registry.warm(a)
    assert registry.hot_channels == 1
    b.seal_payload(FrameType.RESPONSE, b"x")
    registry.warm(b)
    assert (a.is_hot, b.is_hot, registry.hot_channels) == (False, True, 1)


def _retrieve_body_by_fields(user_id: bytes, key_id: bytes, context: int) -> bytes:
    return bytes([Op.RETRIEVE]) + user_id + key_id + bytes([context])


@pytest.mark.parametrize("context", list(Context))
def test_a_retrieve_decodes_on_its_fast_path_as_any_request(context: Context) -> None:
    user_id, key_id = os.urandom(16), os.urandom(16)
    body = _retrieve_body_by_fields(user_id, key_id, context)
    assert body == RetrieveRequest(user_id, key_id, context).encode()
    decoded = decode_request(body)
    assert decoded == RetrieveRequest(user_id, key_id, context)
    assert type(decoded.context) is Context  # the member, not a bare int


@pytest.mark.parametrize(
    "body",
    [
        _retrieve_body_by_fields(bytes(16), bytes(16), 0x77),  # unknown context
        _retrieve_body_by_fields(bytes(16), bytes(16), 0)[:-1],  # one byte short
        _retrieve_body_by_fields(bytes(16), bytes(16), 0) + b"\x00",  # one byte over
        bytes([0xEE]) + bytes(33),  # unknown op, a retrieve's size
    ],
)
def test_malformed_retrieves_are_refused(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_request(body)


def _store_body_by_fields(
    user_id: bytes, key_id: bytes, kind: int, ciphertext: bytes, flag: int, next_kind: int, nonce: bytes
) -> bytes:
    """Section 12.4's STORE_SECRET body, written out field by field."""
    head = bytes([Op.STORE_SECRET]) + user_id + key_id + bytes([kind])
    return head + len(ciphertext).to_bytes(4, "big") + ciphertext + bytes([flag, next_kind]) + nonce


@pytest.mark.parametrize("kind", list(SecretKind))
@pytest.mark.parametrize("next_kind", list(SecretKind))
def test_a_one_request_store_encodes_and_decodes_on_its_fast_path_as_field_by_field(
    kind: SecretKind, next_kind: SecretKind
) -> None:
    user_id, key_id, nonce = os.urandom(16), os.urandom(16), os.urandom(32)
    ciphertext = os.urandom(32 + SEALED_OVERHEAD)
    request = StoreSecretRequest(user_id, key_id, kind, ciphertext, next_kind, nonce)
    body = _store_body_by_fields(user_id, key_id, kind, ciphertext, 1, next_kind, nonce)
    assert request.encode() == body
    decoded = decode_request(body)
    assert decoded == request
    assert type(decoded.kind) is SecretKind and type(decoded.next_kind) is SecretKind  # members


@pytest.mark.parametrize(
    "body",
    [
        _store_body_by_fields(bytes(16), bytes(16), 0x77, bytes(60), 1, 1, bytes(32)),  # unknown kind
        _store_body_by_fields(bytes(16), bytes(16), 1, bytes(60), 1, 0x77, bytes(32)),  # unknown next kind
        _store_body_by_fields(bytes(16), bytes(16), 1, bytes(60), 2, 1, bytes(32)),  # flag neither 0 nor 1
        # the layout's size, but the length field says 59: the general reader finds the rest malformed
        _store_body_by_fields(bytes(16), bytes(16), 1, bytes(60), 1, 1, bytes(32)).replace(
            (60).to_bytes(4, "big"), (59).to_bytes(4, "big"), 1
        ),
        _store_body_by_fields(bytes(16), bytes(16), 1, bytes(60), 1, 1, bytes(32))[:-1],  # one byte short
        _store_body_by_fields(bytes(16), bytes(16), 1, bytes(60), 1, 1, bytes(32)) + b"\x00",  # one byte over
    ],
)
def test_malformed_one_request_stores_are_refused(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_request(body)


def test_a_store_with_the_fast_layout_but_flag_0_reads_as_the_general_path_reads_it() -> None:
    # flag 0 ends the body after the ciphertext: 33 more bytes are malformed, never a store
    body = _store_body_by_fields(bytes(16), bytes(16), 1, bytes(60), 0, 1, bytes(32))
    with pytest.raises(RemoteProtocolError):
        decode_request(body)


def test_a_stored_answer_with_the_next_key_id_decodes_on_its_fast_path_as_field_by_field() -> None:
    key_id, nonce = os.urandom(16), os.urandom(32)
    body = encode_response(Status.OK, StoredResponse(key_id, nonce))
    assert body == b"\x00\x01" + key_id + nonce
    assert decode_response(Op.STORE_SECRET, body) == (Status.OK, StoredResponse(key_id, nonce))
    assert decode_response(Op.STORE_SECRET, b"\x00\x00") == (Status.OK, StoredResponse())
    with pytest.raises(RemoteProtocolError):  # flag 2, at the fast layout's size
        decode_response(Op.STORE_SECRET, b"\x00\x02" + key_id + nonce)
    # another status at that size is not an OK answer (a refusal carries nothing more)
    with pytest.raises(RemoteProtocolError):
        decode_response(Op.STORE_SECRET, b"\x01\x01" + key_id + nonce)


def test_the_joint_key_id_is_key_1_of_key_2_written_out() -> None:
    user_id, client_nonce, server_nonce = os.urandom(16), os.urandom(32), os.urandom(32)
    d2, d = b"keymgmt v1 key id contributions", b"keymgmt v1 key id"
    r = hashlib.sha3_256(b"\x00\x1f" + d2 + b"\x00\x20" + client_nonce + b"\x00\x20" + server_nonce).digest()
    expected = hashlib.sha3_256(b"\x00\x11" + d + b"\x00\x10" + user_id + b"\x00\x20" + r).digest()[:16]
    assert joint_key_id(user_id, client_nonce, server_nonce) == expected
    for bad in ((user_id[:15], client_nonce, server_nonce), (user_id, client_nonce[:31], server_nonce)):
        with pytest.raises(ValueError):
            joint_key_id(*bad)
    with pytest.raises(ValueError):
        joint_key_id(user_id, client_nonce, server_nonce + b"\x00")


@pytest.mark.parametrize(
    ("kind", "size"), [(SecretKind.GENERATED, 32), (SecretKind.IMPORTED, 1), (SecretKind.IMPORTED, 60 * 1024)]
)
def test_a_secret_response_encodes_field_by_field_as_before(kind: SecretKind, size: int) -> None:
    ciphertext, ad = os.urandom(size + SEALED_OVERHEAD), os.urandom(40)
    response = SecretResponse(kind, ciphertext, ad)
    expected = bytes([kind]) + len(ciphertext).to_bytes(4, "big") + ciphertext + bytes([len(ad)]) + ad
    assert response.encode_fields() == expected
    assert decode_response(Op.RETRIEVE, encode_response(Status.OK, response)) == (Status.OK, response)


def _entry_by_fields(entry: AuditEntry) -> bytes:
    """Section 12.9's encoding, written out field by field."""
    key = b"\x00" if entry.key_id is None else b"\x01" + entry.key_id
    return (
        entry.entry_id.to_bytes(8, "big")
        + bytes([entry.action])
        + entry.timestamp.to_bytes(8, "big")
        + bytes([entry.outcome])
        + entry.count.to_bytes(4, "big")
        + key
        + bytes([0xFF if entry.context is None else entry.context])
    )


@pytest.mark.parametrize(
    "entry",
    [
        AuditEntry(1, Action.RETRIEVE, 1_700_000_000_000_000, Outcome.SUCCESS, os.urandom(16), Context.NULL),
        AuditEntry(2**64 - 1, Action.LOGIN, 2**63 - 1, Outcome.FAILURE, None, None, 2**32 - 1),
        AuditEntry(7, Action.GENERATE, 0, Outcome.SUCCESS, os.urandom(16)),
        AuditEntry(3, Action.RETRIEVE, 5, Outcome.FAILURE, None, Context.LOCAL_ONLY, 1),
    ],
)
def test_an_audit_entry_encodes_and_chains_in_one_pack_as_field_by_field(entry: AuditEntry) -> None:
    user_id, previous = os.urandom(16), os.urandom(32)
    encoded = _entry_by_fields(entry)
    assert entry.encode() == encoded
    assert len(encoded) in (24, 40)
    expected = hashlib.sha3_256(
        len(AUDIT_CHAIN_DOMAIN).to_bytes(2, "big") + AUDIT_CHAIN_DOMAIN + user_id + previous + encoded
    ).digest()
    assert audit_chain_hash(user_id, previous, entry) == expected
    fields = (entry.entry_id, entry.action, entry.timestamp, entry.outcome, entry.key_id, entry.context)
    assert audit_chain_hash_of(user_id, previous, *fields, entry.count) == expected


@pytest.mark.parametrize(
    ("user_id", "previous", "key_id", "count"),
    [
        (bytes(15), bytes(32), None, 1),
        (bytes(16), bytes(31), None, 1),
        (bytes(16), bytes(32), bytes(15), 1),  # a "16s" field would pad it
        (bytes(16), bytes(32), bytes(17), 1),  # or cut it
        (bytes(16), bytes(32), None, 0),
        (bytes(16), bytes(32), None, 2**32),
    ],
    ids=["short user id", "short previous hash", "short key id", "long key id", "count 0", "count 2**32"],
)
def test_the_chain_hash_of_fields_refuses_what_an_entry_refuses(
    user_id: bytes, previous: bytes, key_id: bytes | None, count: int
) -> None:
    with pytest.raises(ValueError):
        audit_chain_hash_of(user_id, previous, 1, Action.RETRIEVE, 0, Outcome.SUCCESS, key_id, None, count)


@pytest.mark.parametrize("context", list(Context))
def test_retrieve_fields_read_what_decode_request_reads(context: Context) -> None:
    user_id, key_id = os.urandom(16), os.urandom(16)
    body = RetrieveRequest(user_id, key_id, context).encode()
    request = decode_request(body)
    assert isinstance(request, RetrieveRequest)
    assert (
        retrieve_fields(body)
        == (request.user_id, request.key_id, request.context)
        == (user_id, key_id, context)
    )


def test_retrieve_fields_leave_every_other_body_to_decode_request() -> None:
    body = RetrieveRequest(os.urandom(16), os.urandom(16), Context.NULL).encode()
    unknown_context = body[:-1] + bytes([max(Context) + 1])
    with pytest.raises(RemoteProtocolError):
        decode_request(unknown_context)
    others = [b"", body[:-1], body + b"\x00", bytes([Op.LIST_KEYS]) + body[1:], unknown_context]
    assert [retrieve_fields(other) for other in others] == [None] * len(others)


@pytest.mark.parametrize("kind", list(SecretKind))
@pytest.mark.parametrize("size", [0, 1, 31, 32, 33, 2000])
@pytest.mark.parametrize("ad_size", [0, 32, 255, 256])
def test_secret_answer_is_the_encoded_secret_response(kind: SecretKind, size: int, ad_size: int) -> None:
    ciphertext, ad = os.urandom(size + SEALED_OVERHEAD), os.urandom(ad_size)
    try:
        expected: bytes | None = encode_response(Status.OK, SecretResponse(kind, ciphertext, ad))
    except ValueError:
        expected = None  # refused by SecretResponse: the caller takes the general path
    assert secret_answer(kind, ciphertext, ad) == expected
