"""Property-based tests of the wire format, the decoders, the AEAD channel, REG-3 and framing.

Run with ``HYPOTHESIS_PROFILE=ci`` (or ``long``) for more examples; profiles live in conftest.py.
"""

from __future__ import annotations

import dataclasses
import hmac as std_hmac
import os
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from hypothesis import example, given
from hypothesis import strategies as st

from keymgmt_proto import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    MAX_SESSION_ID,
    NEED_DATA,
    PROTOCOL_VERSION,
    Channel,
    ClientConnection,
    ConnectionFailed,
    ErrorCode,
    Event,
    FrameType,
    OpaqueStepRequired,
    RealOpaque,
    RemoteProtocolError,
    ServerConnection,
    ServerSetup,
    decrypt_storage_key,
    derive_master_key,
    encrypt_storage_key,
)
from keymgmt_proto import strategies as S
from keymgmt_proto.wire import (
    ENCRYPTED_STORAGE_KEY_SIZE,
    MESSAGE_TYPES,
    REGISTRATION_REQUEST_SIZE,
    RESUME_NONCE_SIZE,
    SESSION_HANDLE_SIZE,
    TAG_SIZE,
    USER_ID_SIZE,
    Abort,
    Close,
    GoAway,
    HmacSha3,
    Record,
    Request,
    Response,
    ResumedEnvelope,
    ResumeEnvelope,
    decode_header,
    encode_frame,
    hkdf_expand_sha3,
)

# ----------------------------------------------------------------- strategies
# The public strategies (keymgmt_proto.strategies, the `testing` extra) are what this file
# draws from; a harness testing another implementation draws from the same ones.

fixed = S.fixed_bytes
error_codes = S.error_codes()
bodies = st.binary(max_size=512)

STRATEGIES: dict[type, st.SearchStrategy[object]] = {cls: S.messages(cls) for cls in S.MESSAGE_CLASSES}

#: Every payload class under test: MESSAGE_TYPES' values plus the envelope classes.
ALL_CLASSES = [*dict.fromkeys([*MESSAGE_TYPES.values(), Record, ResumeEnvelope, ResumedEnvelope])]
assert list(S.MESSAGE_CLASSES) == ALL_CLASSES

#: Classes whose last field is a ``rest`` run to the end of the payload (no length prefix):
#: name of that field and the number of bytes that precede it.
REST_FIELD: dict[type, tuple[str, int]] = {
    Request: ("body", 4),
    Response: ("body", 4),
    Record: ("ciphertext", 8),
}
#: Minimum length of a decodable payload for the rest-field classes.
REST_MIN_SIZE = {
    Request: 4,
    Response: 4,
    Record: 8 + TAG_SIZE,
    ResumeEnvelope: SESSION_HANDLE_SIZE + 8 + TAG_SIZE,
    ResumedEnvelope: RESUME_NONCE_SIZE + 8 + TAG_SIZE,
}

parametrize_classes = pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)


def decode(cls: type, payload: bytes) -> object:
    return cls.decode(payload)  # type: ignore[attr-defined]


def with_appended(value: object, extra: bytes) -> object:
    """What a rest-field value decodes to after ``extra`` is appended to its encoding."""
    if isinstance(value, ResumeEnvelope | ResumedEnvelope):
        return dataclasses.replace(value, record=with_appended(value.record, extra))
    name, _ = REST_FIELD[type(value)]
    return dataclasses.replace(value, **{name: getattr(value, name) + extra})


# ------------------------------------------------------- 1. payload round trip


def test_every_message_type_has_a_strategy() -> None:
    """A new frame type (or payload class) without a strategy here fails this test."""
    assert set(MESSAGE_TYPES) == set(FrameType), "every frame type needs a payload class"
    for frame_type, cls in MESSAGE_TYPES.items():
        assert cls in STRATEGIES, f"no strategy for {frame_type.name} ({cls.__name__})"
        assert cls.FRAME_TYPE is frame_type
    assert set(STRATEGIES) == set(ALL_CLASSES)


@parametrize_classes
@given(data=st.data())
def test_round_trip(cls: type, data: st.DataObject) -> None:
    value = data.draw(STRATEGIES[cls])
    encoded = value.encode()  # type: ignore[attr-defined]
    assert isinstance(encoded, bytes)
    decoded = decode(cls, encoded)
    assert decoded == value
    assert type(decoded) is cls
    assert decoded.encode() == encoded  # type: ignore[attr-defined]


@parametrize_classes
@given(data=st.data())
def test_encoding_is_canonical(cls: type, data: st.DataObject) -> None:
    """Any payload that decodes re-encodes to exactly the same bytes; nothing but
    RemoteProtocolError escapes a decoder (arbitrary and near-valid input)."""
    if data.draw(st.booleans(), label="arbitrary"):
        payload = data.draw(st.binary(max_size=600), label="payload")
    else:
        payload = data.draw(S.mutations(data.draw(STRATEGIES[cls]).encode()))  # type: ignore[attr-defined]
    try:
        value = decode(cls, payload)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED
        return
    assert type(value) is cls
    assert value.encode() == payload  # type: ignore[attr-defined]


# ----------------------------------------------------------- 2. frame header

max_payloads = st.integers(min_value=1024, max_value=DEFAULT_MAX_PAYLOAD)


@given(
    frame_type=st.sampled_from(FrameType),
    session_id=st.integers(0, MAX_SESSION_ID),
    max_payload=max_payloads,
    data=st.data(),
)
def test_frame_header_round_trip(
    frame_type: FrameType, session_id: int, max_payload: int, data: st.DataObject
) -> None:
    length = data.draw(st.one_of(st.just(max_payload), st.integers(0, max_payload)), label="length")
    payload = bytes(length)
    frame = encode_frame(frame_type, session_id, payload)
    assert len(frame) == HEADER_SIZE + length
    assert frame[HEADER_SIZE:] == payload
    assert decode_header(frame[:HEADER_SIZE], max_payload) == (frame_type, session_id, length)


FRAME_TYPE_VALUES = {int(t) for t in FrameType}
valid_type_bytes = st.sampled_from(sorted(FRAME_TYPE_VALUES))


def header(version: int, type_byte: int, session_id: int, length: int) -> bytes:
    return struct.pack(">BBII", version, type_byte, session_id, length)


@given(
    version=st.integers(0, 255).filter(lambda v: v != PROTOCOL_VERSION),
    type_byte=st.integers(0, 255),
    session_id=st.integers(0, 2**32 - 1),
    length=st.integers(0, 2**32 - 1),
)
def test_header_unknown_version(version: int, type_byte: int, session_id: int, length: int) -> None:
    """Nothing after the version byte can be interpreted, so this wins over every other check."""
    with pytest.raises(RemoteProtocolError) as info:
        decode_header(header(version, type_byte, session_id, length), DEFAULT_MAX_PAYLOAD)
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION


@given(
    type_byte=st.integers(0, 255).filter(lambda b: b not in FRAME_TYPE_VALUES),
    session_id=st.integers(0, MAX_SESSION_ID),
    length=st.integers(0, DEFAULT_MAX_PAYLOAD),
)
def test_header_unknown_type(type_byte: int, session_id: int, length: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_header(header(PROTOCOL_VERSION, type_byte, session_id, length), DEFAULT_MAX_PAYLOAD)
    assert info.value.code is ErrorCode.MALFORMED


@given(
    type_byte=valid_type_bytes,
    session_id=st.integers(MAX_SESSION_ID + 1, 2**32 - 1),
    length=st.integers(0, DEFAULT_MAX_PAYLOAD),
)
def test_header_session_id_over_cap(type_byte: int, session_id: int, length: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_header(header(PROTOCOL_VERSION, type_byte, session_id, length), DEFAULT_MAX_PAYLOAD)
    assert info.value.code is ErrorCode.BAD_SESSION_ID


@given(
    type_byte=valid_type_bytes,
    session_id=st.integers(0, MAX_SESSION_ID),
    max_payload=max_payloads,
    data=st.data(),
)
def test_header_length_over_limit(
    type_byte: int, session_id: int, max_payload: int, data: st.DataObject
) -> None:
    length = data.draw(st.one_of(st.just(max_payload + 1), st.integers(max_payload + 1, 2**32 - 1)))
    with pytest.raises(RemoteProtocolError) as info:
        decode_header(header(PROTOCOL_VERSION, type_byte, session_id, length), max_payload)
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


@given(raw=st.binary(max_size=2 * HEADER_SIZE), max_payload=max_payloads)
def test_header_arbitrary_bytes(raw: bytes, max_payload: int) -> None:
    """Any byte string either is a valid header (and re-encodes to itself) or raises
    RemoteProtocolError; a wrong-sized header is MALFORMED."""
    try:
        frame_type, session_id, length = decode_header(raw, max_payload)
    except RemoteProtocolError as exc:
        if len(raw) != HEADER_SIZE:
            assert exc.code is ErrorCode.MALFORMED
        return
    assert len(raw) == HEADER_SIZE
    assert length <= max_payload and session_id <= MAX_SESSION_ID
    assert header(PROTOCOL_VERSION, frame_type, session_id, length) == raw


# ------------------------------------------------ 3. decoders reject bad input


@parametrize_classes
@given(payload=st.binary(max_size=700))
def test_decode_arbitrary_bytes(cls: type, payload: bytes) -> None:
    try:
        value = decode(cls, payload)
    except RemoteProtocolError:
        return
    assert type(value) is cls


@parametrize_classes
@given(data=st.data())
def test_truncations_are_rejected(cls: type, data: st.DataObject) -> None:
    """Every proper prefix of a valid encoding fails to decode, except for the classes that
    end in a ``rest`` field: there a prefix that is still long enough decodes to the value
    with that field shortened."""
    value = data.draw(STRATEGIES[cls])
    encoded = value.encode()  # type: ignore[attr-defined]
    for cut in range(len(encoded)):
        prefix = encoded[:cut]
        if cls in REST_MIN_SIZE and cut >= REST_MIN_SIZE[cls]:
            decoded = decode(cls, prefix)
            assert decoded.encode() == prefix  # type: ignore[attr-defined]
            assert with_appended(decoded, encoded[cut:]) == value
        else:
            with pytest.raises(RemoteProtocolError):
                decode(cls, prefix)


@parametrize_classes
@given(data=st.data(), extra=st.binary(min_size=1, max_size=1))
def test_extensions_are_rejected(cls: type, data: st.DataObject, extra: bytes) -> None:
    """Trailing bytes are an error, except after a ``rest`` field, which absorbs them."""
    value = data.draw(STRATEGIES[cls])
    extended = value.encode() + extra  # type: ignore[attr-defined]
    if cls in REST_MIN_SIZE:
        assert decode(cls, extended) == with_appended(value, extra)
    else:
        with pytest.raises(RemoteProtocolError) as info:
            decode(cls, extended)
        assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize("cls", [Abort, GoAway])
@given(
    code=error_codes,
    reason=st.binary(max_size=255).filter(lambda b: not (b.isascii() and b.decode().isprintable())),
)
def test_abort_reason_must_be_printable_ascii(cls: type, code: ErrorCode, reason: bytes) -> None:
    payload = struct.pack(">HB", code, len(reason)) + reason
    with pytest.raises(RemoteProtocolError):
        decode(cls, payload)


@pytest.mark.parametrize("cls", [Abort, GoAway, Close])
@given(raw_code=st.integers(0, 0xFFFF).filter(lambda c: c not in set(ErrorCode)))
def test_unknown_error_code_is_rejected(cls: type, raw_code: int) -> None:
    payload = struct.pack(">H", raw_code) + (b"\x00" if cls is not Close else b"")
    with pytest.raises(RemoteProtocolError):
        decode(cls, payload)


@pytest.mark.parametrize("cls", [Request, Response])
@given(body=bodies)
def test_request_id_zero_is_rejected(cls: type, body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(cls, b"\x00\x00\x00\x00" + body)


# ------------------------------------------------------------- 4. the channel

session_keys = fixed(64)
sealed_types = st.sampled_from([t for t in FrameType if t.sealed])
any_types = st.sampled_from(FrameType)
plaintexts = st.binary(max_size=200)


def pair(key: bytes) -> tuple[Channel, Channel]:
    return Channel(key, is_client=True), Channel(key, is_client=False)


def assert_bad_record(channel: Channel, frame_type: FrameType, record: Record) -> None:
    before = channel.export()
    with pytest.raises(RemoteProtocolError) as info:
        channel.open(frame_type, record)
    assert info.value.code is ErrorCode.BAD_RECORD
    assert channel.export() == before


def assert_bad_resume(channel: Channel, record: Record) -> None:
    before = channel.export()
    with pytest.raises(RemoteProtocolError) as info:
        channel.open_resume(record)
    assert info.value.code is ErrorCode.BAD_RECORD
    assert channel.export() == before


@given(key=session_keys, messages=st.lists(st.tuples(any_types, plaintexts), max_size=8))
def test_channel_round_trip_in_order(key: bytes, messages: list[tuple[FrameType, bytes]]) -> None:
    client, server = pair(key)
    assert client.session_handle == server.session_handle
    assert len(client.session_handle) == SESSION_HANDLE_SIZE
    for i, (frame_type, plaintext) in enumerate(messages):
        c2s = client.seal(frame_type, plaintext)
        assert c2s.seq == i and len(c2s.ciphertext) == len(plaintext) + TAG_SIZE
        assert server.open(frame_type, Record.decode(c2s.encode())) == plaintext
        s2c = server.seal(frame_type, plaintext)
        assert s2c.seq == i
        assert s2c.ciphertext != c2s.ciphertext  # different key/iv per direction
        assert client.open(frame_type, s2c) == plaintext
    assert client.send_seq == client.recv_seq == server.send_seq == server.recv_seq == len(messages)


@given(key=session_keys, frame_type=sealed_types, p0=plaintexts, p1=plaintexts)
def test_channel_rejects_replay(key: bytes, frame_type: FrameType, p0: bytes, p1: bytes) -> None:
    client, server = pair(key)
    r0, r1 = client.seal(frame_type, p0), client.seal(frame_type, p1)
    assert server.open(frame_type, r0) == p0
    assert_bad_record(server, frame_type, r0)
    assert server.open(frame_type, r1) == p1
    assert_bad_record(server, frame_type, r1)
    assert_bad_record(server, frame_type, r0)


@given(key=session_keys, frame_type=sealed_types, p0=plaintexts, p1=plaintexts)
def test_channel_rejects_reorder(key: bytes, frame_type: FrameType, p0: bytes, p1: bytes) -> None:
    client, server = pair(key)
    r0, r1 = client.seal(frame_type, p0), client.seal(frame_type, p1)
    assert_bad_record(server, frame_type, r1)
    assert server.open(frame_type, r0) == p0
    assert server.open(frame_type, r1) == p1


@given(key=session_keys, frame_type=sealed_types, plaintext=plaintexts, data=st.data())
def test_channel_rejects_bit_flip(
    key: bytes, frame_type: FrameType, plaintext: bytes, data: st.DataObject
) -> None:
    client, server = pair(key)
    record = client.seal(frame_type, plaintext)
    bit = data.draw(st.integers(0, 8 * len(record.ciphertext) - 1), label="bit")
    flipped = bytearray(record.ciphertext)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert_bad_record(server, frame_type, Record(record.seq, bytes(flipped)))
    assert server.open(frame_type, record) == plaintext


@given(key=session_keys, types=st.lists(any_types, min_size=2, max_size=2, unique=True), plaintext=plaintexts)
def test_channel_rejects_other_frame_type(key: bytes, types: list[FrameType], plaintext: bytes) -> None:
    sealed_as, opened_as = types
    client, server = pair(key)
    record = client.seal(sealed_as, plaintext)
    assert_bad_record(server, opened_as, record)
    assert server.open(sealed_as, record) == plaintext


@given(key=session_keys, frame_type=sealed_types, plaintext=plaintexts)
def test_channel_rejects_other_direction(key: bytes, frame_type: FrameType, plaintext: bytes) -> None:
    client, server = pair(key)
    s2c = server.seal(frame_type, plaintext)
    c2s = client.seal(frame_type, plaintext)
    assert_bad_record(server, frame_type, s2c)  # the server's own record reflected back
    assert_bad_record(client, frame_type, c2s)  # the client's own record reflected back
    assert server.open(frame_type, c2s) == plaintext
    assert client.open(frame_type, s2c) == plaintext


@given(
    keys=st.lists(session_keys, min_size=2, max_size=2, unique=True),
    frame_type=sealed_types,
    plaintext=plaintexts,
)
def test_channel_rejects_other_session(keys: list[bytes], frame_type: FrameType, plaintext: bytes) -> None:
    client_a, server_a = pair(keys[0])
    client_b, _server_b = pair(keys[1])
    assert client_a.session_handle != client_b.session_handle
    foreign = client_b.seal(frame_type, plaintext)
    assert_bad_record(server_a, frame_type, foreign)
    assert server_a.open(frame_type, client_a.seal(frame_type, plaintext)) == plaintext


@given(key=session_keys, frame_type=sealed_types, plaintext=plaintexts, data=st.data())
def test_channel_rejects_truncated_ciphertext(
    key: bytes, frame_type: FrameType, plaintext: bytes, data: st.DataObject
) -> None:
    client, server = pair(key)
    record = client.seal(frame_type, plaintext)
    cut = data.draw(st.integers(0, len(record.ciphertext) - 1), label="cut")
    truncated = record.encode()[: 8 + cut]
    if cut < TAG_SIZE:  # too short to be a record at all: rejected while decoding
        with pytest.raises(RemoteProtocolError) as info:
            Record.decode(truncated)
        assert info.value.code is ErrorCode.MALFORMED
    else:
        assert_bad_record(server, frame_type, Record.decode(truncated))
    assert server.open(frame_type, record) == plaintext


@given(key=session_keys, frame_type=sealed_types, plaintext=plaintexts, shift=st.integers(1, 2**64 - 2))
def test_channel_rejects_relabelled_seq(
    key: bytes, frame_type: FrameType, plaintext: bytes, shift: int
) -> None:
    """The sequence number is bound into nonce and AD: a record relabelled to another seq fails."""
    client, server = pair(key)
    record = client.seal(frame_type, plaintext)
    server.recv_seq = shift  # even where the receiver expects that seq
    assert_bad_record(server, frame_type, Record(shift, record.ciphertext))
    server.recv_seq = 0
    assert server.open(frame_type, record) == plaintext


@given(key=session_keys, n=st.integers(2, 12), data=st.data())
def test_resume_records_may_skip_ahead_but_never_back(key: bytes, n: int, data: st.DataObject) -> None:
    """RESUME records have their own key and counter: lost ones may be skipped, none replayed."""
    client, server = pair(key)
    sealed = [client.seal_resume(bytes([i])) for i in range(n)]
    assert [r.seq for r in sealed] == list(range(n))
    skip_to = data.draw(st.integers(1, n - 1), label="skip_to")
    assert server.open_resume(sealed[skip_to]) == bytes([skip_to])
    assert server.resume_seq == skip_to + 1
    for record in sealed[: skip_to + 1]:
        assert_bad_resume(server, record)
    # A RESUME record is not a channel record, and a channel record is not a RESUME record.
    assert_bad_record(server, FrameType.RESUME, Record(0, sealed[0].ciphertext))
    assert_bad_resume(server, Record(skip_to + 1, client.seal(FrameType.RESUME, b"").ciphertext))
    if skip_to + 1 < n:
        assert server.open_resume(sealed[skip_to + 1]) == bytes([skip_to + 1])


@given(
    key=session_keys,
    nonces=st.lists(fixed(RESUME_NONCE_SIZE), min_size=3, max_size=3, unique=True),
    frame_type=sealed_types,
    plaintext=plaintexts,
)
def test_each_key_epoch_has_fresh_keys_and_restarts_its_counters(
    key: bytes, nonces: list[bytes], frame_type: FrameType, plaintext: bytes
) -> None:
    """NET-14: both sides reach the same epoch from the two nonces; its counters start at 0
    and its records differ from every other epoch's at the same seq (no nonce reuse); the
    lifetime totals carry on."""
    client, server = pair(key)
    first = client.seal(frame_type, plaintext)
    assert server.open(frame_type, first) == plaintext
    client_nonce, server_nonce, other = nonces
    client2 = client.next_epoch(client_nonce, server_nonce)
    server2 = server.next_epoch(client_nonce, server_nonce)
    assert client.send_seq == 1  # next_epoch leaves the channel it came from alone
    assert (client2.send_seq, client2.recv_seq, server2.send_seq, server2.recv_seq) == (0, 0, 0, 0)
    assert client2.session_handle == client.session_handle
    assert (client2.sent_total, server2.received_total) == (1, 1)
    again = client2.seal(frame_type, plaintext)
    assert again.seq == first.seq == 0 and again.ciphertext != first.ciphertext
    assert server2.open(frame_type, again) == plaintext
    assert_bad_record(server2, frame_type, first)  # the old epoch's record at seq 0 fails
    # Either nonce changed gives other keys.
    for client_side, server_side in ((other, server_nonce), (client_nonce, other)):
        elsewhere = client.next_epoch(client_side, server_side).seal(frame_type, plaintext)
        assert elsewhere.ciphertext != again.ciphertext
        assert_bad_record(server.next_epoch(client_nonce, server_nonce), frame_type, elsewhere)


# ------------------------------------------------------- 5. known-answer test

# The channel key schedule is documented in the docstring of keymgmt_proto/_crypto.py (and
# docs/protocol.md). These literals were computed once by running the code; any change to the
# schedule, labels, nonce or AD construction breaks this test -- which is the point: it is a
# wire-format change.
KAT_SESSION_KEY = bytes(range(64))
KAT_SESSION_HANDLE = "a4d48bd97bef8f5223ec46b4f48b088a"
KAT_FIRST_C2S_RECORD = "0000000000000000" + "69daf5746bb3276e5f4961164f55c7adf4fc68c205"


def test_channel_known_answer() -> None:
    client = Channel(KAT_SESSION_KEY, is_client=True)
    assert client.session_handle.hex() == KAT_SESSION_HANDLE
    record = client.seal(FrameType.REQUEST, b"hello")
    assert record.seq == 0
    assert record.encode().hex() == KAT_FIRST_C2S_RECORD
    server = Channel(KAT_SESSION_KEY, is_client=False)
    assert server.open(FrameType.REQUEST, Record.decode(bytes.fromhex(KAT_FIRST_C2S_RECORD))) == b"hello"


def _sha3_expand(prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA3_256(), length=length, info=info).derive(prk)


@given(key=st.binary(max_size=300), message=st.binary(max_size=400))
@example(key=b"", message=b"")
@example(key=bytes(range(136)), message=b"m")
@example(key=bytes(range(137)), message=b"m")
@example(key=bytes(200), message=bytes(300))
def test_hmac_sha3_is_hmac_sha3_256(key: bytes, message: bytes) -> None:
    """The channel's and the decoy's HMAC (key states hashed once) is RFC 2104 HMAC-SHA3-256,
    for keys shorter than, as long as and longer than SHA3-256's 136-byte block; one object
    gives the same MAC every time."""
    mac = HmacSha3(key)
    expected = std_hmac.digest(key, message, "sha3_256")
    assert mac.digest(message) == expected
    assert mac.digest(message) == expected
    assert repr(mac) == "HmacSha3(<secret>)"


@given(prk=st.binary(min_size=32, max_size=64), info=st.binary(max_size=200), length=st.integers(1, 400))
@example(prk=bytes(32), info=b"i", length=32)
@example(prk=bytes(32), info=b"i", length=33)
@example(prk=bytes(32), info=b"i", length=65)
@example(prk=bytes(32), info=b"i", length=255 * 32)
def test_hkdf_expand_sha3_is_rfc5869(prk: bytes, info: bytes, length: int) -> None:
    """HKDF-Expand on HmacSha3, one block (the channel's keys) or many (the decoy's 176 bytes),
    against cryptography's HKDFExpand; the block boundaries and the longest output always."""
    assert hkdf_expand_sha3(prk, info, length) == _sha3_expand(prk, info, length)
    assert HmacSha3(prk).expand(info, length) == _sha3_expand(prk, info, length)


def test_channel_key_schedule_matches_documentation() -> None:
    """Recompute the KAT from the documented schedule with cryptography's primitives."""
    mac = hmac.HMAC(b"keymgmt v1 channel", hashes.SHA3_256())
    mac.update(KAT_SESSION_KEY)
    prk = mac.finalize()  # HKDF-Extract(salt, ikm)
    handle = _sha3_expand(prk, b"keymgmt v1 session handle", 16)
    key = _sha3_expand(prk, b"keymgmt v1 client-to-server key", 32)
    iv = _sha3_expand(prk, b"keymgmt v1 client-to-server iv", 12)
    seq = 0
    nonce = bytes(a ^ b for a, b in zip(iv, bytes(4) + seq.to_bytes(8, "big"), strict=True))
    ad = handle + bytes([1, FrameType.REQUEST]) + seq.to_bytes(8, "big")
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, b"hello", ad)
    assert handle.hex() == KAT_SESSION_HANDLE
    assert (seq.to_bytes(8, "big") + ciphertext).hex() == KAT_FIRST_C2S_RECORD


# ------------------------------------------------------------------- 6. REG-3


def fixed_random(value: bytes) -> Callable[[int], bytes]:
    def random(n: int) -> bytes:
        assert n <= len(value)
        return value[:n]

    return random


@given(master_key=fixed(32), storage_key=fixed(32), user_id=fixed(USER_ID_SIZE), nonce=fixed(12))
def test_storage_key_round_trip(master_key: bytes, storage_key: bytes, user_id: bytes, nonce: bytes) -> None:
    encrypted = encrypt_storage_key(master_key, storage_key, user_id, fixed_random(nonce))
    assert len(encrypted) == ENCRYPTED_STORAGE_KEY_SIZE
    assert encrypted[:12] == nonce
    # Deterministic given the injected randomness.
    assert encrypt_storage_key(master_key, storage_key, user_id, fixed_random(nonce)) == encrypted
    assert decrypt_storage_key(master_key, encrypted, user_id) == storage_key


@given(
    master_key=fixed(32),
    storage_key=fixed(32),
    user_ids=st.lists(fixed(USER_ID_SIZE), min_size=2, max_size=2, unique=True),
    nonce=fixed(12),
)
def test_storage_key_wrong_user_id(
    master_key: bytes, storage_key: bytes, user_ids: list[bytes], nonce: bytes
) -> None:
    encrypted = encrypt_storage_key(master_key, storage_key, user_ids[0], fixed_random(nonce))
    with pytest.raises(RemoteProtocolError) as info:
        decrypt_storage_key(master_key, encrypted, user_ids[1])
    assert info.value.code is ErrorCode.BAD_RECORD


@given(
    master_key=fixed(32),
    storage_key=fixed(32),
    user_id=fixed(USER_ID_SIZE),
    nonce=fixed(12),
    position=st.integers(0, ENCRYPTED_STORAGE_KEY_SIZE - 1),
    mask=st.integers(1, 255),
)
def test_storage_key_tampered(
    master_key: bytes, storage_key: bytes, user_id: bytes, nonce: bytes, position: int, mask: int
) -> None:
    encrypted = bytearray(encrypt_storage_key(master_key, storage_key, user_id, fixed_random(nonce)))
    encrypted[position] ^= mask
    with pytest.raises(RemoteProtocolError) as info:
        decrypt_storage_key(master_key, bytes(encrypted), user_id)
    assert info.value.code is ErrorCode.BAD_RECORD


@given(
    keys=st.lists(fixed(32), min_size=2, max_size=2, unique=True),
    storage_key=fixed(32),
    user_id=fixed(USER_ID_SIZE),
    nonce=fixed(12),
)
def test_storage_key_wrong_master_key(
    keys: list[bytes], storage_key: bytes, user_id: bytes, nonce: bytes
) -> None:
    encrypted = encrypt_storage_key(keys[0], storage_key, user_id, fixed_random(nonce))
    with pytest.raises(RemoteProtocolError):
        decrypt_storage_key(keys[1], encrypted, user_id)


@given(
    master_key=fixed(32),
    user_id=fixed(USER_ID_SIZE),
    blob=st.binary(max_size=2 * ENCRYPTED_STORAGE_KEY_SIZE).filter(
        lambda b: len(b) != ENCRYPTED_STORAGE_KEY_SIZE
    ),
)
def test_storage_key_wrong_length(master_key: bytes, user_id: bytes, blob: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decrypt_storage_key(master_key, blob, user_id)
    assert info.value.code is ErrorCode.MALFORMED


@given(export_key=st.binary(min_size=1, max_size=128))
def test_derive_master_key_is_hkdf_sha3(export_key: bytes) -> None:
    expected = HKDF(
        algorithm=hashes.SHA3_256(),
        length=32,
        salt=None,
        info=b"OPAQUE-derived Lock Keeper master key",
    ).derive(export_key)
    assert derive_master_key(export_key) == expected


# ------------------------------------------------------- 7. framing robustness

SERVER_SETUP = ServerSetup.generate()


def raw_frame(
    version: int, type_byte: int, session_id: int, payload: bytes, length: int | None = None
) -> bytes:
    return header(version, type_byte, session_id, len(payload) if length is None else length) + payload


#: A well-formed OPAQUE RegistrationRequest, so fuzzed REG_STARTs can get past OPAQUE on the server.
VALID_REGISTRATION_REQUEST = RealOpaque().client_registration_start(b"password").message
wire_bytes = S.wire_bytes(
    registration_requests=st.one_of(
        *[st.just(VALID_REGISTRATION_REQUEST)] * 3, fixed(REGISTRATION_REQUEST_SIZE)
    )
)


def new_server() -> ServerConnection:
    return ServerConnection(SERVER_SETUP, os.urandom, now=0.0)


def new_client() -> ClientConnection:
    return ClientConnection(os.urandom)


def new_client_with_sessions() -> ClientConnection:
    """A client with a request session (id 1) and a registration session (id 2) waiting for
    the server's first reply, so fuzzed frames reach the session state machine."""
    client = ClientConnection(os.urandom)
    assert client.open_request_session(b"alice", b"password") == 1
    assert client.open_registration(b"bob", b"password") == 2
    client.data_to_send()
    return client


CONNECTIONS: dict[str, Callable[[], ServerConnection | ClientConnection]] = {
    "server": new_server,
    "client": new_client,
    "client-with-sessions": new_client_with_sessions,
}
parametrize_connections = pytest.mark.parametrize("make", CONNECTIONS.values(), ids=CONNECTIONS.keys())


def receive(conn: ServerConnection | ClientConnection, data: bytes) -> None:
    """Bytes (b"" = end of stream) for either side; a server gets them at t=0, when it was made."""
    if isinstance(conn, ServerConnection):
        conn.receive_data(data, 0.0)
    else:
        conn.receive_data(data)


def drain(conn: ServerConnection | ClientConnection) -> list[Event]:
    """Every event until NEED_DATA. A client's OPAQUE steps run inline and are not listed
    (their OPAQUE state differs from connection to connection)."""
    events: list[Event] = []
    for _ in range(10_000):
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        assert isinstance(event, Event)
        assert type(event).__module__.startswith("keymgmt_proto.")
        if isinstance(event, OpaqueStepRequired):
            assert isinstance(conn, ClientConnection)
            assert conn.complete_opaque_step(event.run(conn.opaque))
        else:
            events.append(event)
    raise AssertionError("next_event() never returned NEED_DATA")


def check_output(conn: ServerConnection | ClientConnection) -> None:
    """What the connection sends in reply is itself well-formed framing with valid clear payloads."""
    out = conn.data_to_send()
    while out:
        frame_type, _session_id, length = decode_header(out[:HEADER_SIZE], DEFAULT_MAX_PAYLOAD)
        payload = out[HEADER_SIZE : HEADER_SIZE + length]
        assert len(payload) == length
        if frame_type.sealed:
            Record.decode(payload)
        else:
            MESSAGE_TYPES[frame_type].decode(payload)
        out = out[HEADER_SIZE + length :]


@parametrize_connections
@given(data=wire_bytes)
def test_connection_survives_arbitrary_bytes(make: Callable[[], ServerConnection], data: bytes) -> None:
    conn = make()
    if data:  # b"" would mean end of stream
        receive(conn, data)
    events = drain(conn)
    check_output(conn)
    assert sum(isinstance(e, ConnectionFailed) for e in events) <= 1
    assert drain(conn) == []
    # End of stream afterwards is also handled without raising.
    receive(conn, b"")
    drain(conn)
    check_output(conn)


@parametrize_connections
@given(data=wire_bytes, cuts=st.lists(st.integers(0, 4096), max_size=12))
def test_connection_split_delivery(
    make: Callable[[], ServerConnection], data: bytes, cuts: list[int]
) -> None:
    whole = make()
    if data:  # b"" would mean end of stream
        receive(whole, data)
    expected = drain(whole)

    split = make()
    points = sorted({c % (len(data) + 1) for c in cuts})
    got: list[Event] = []
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        if end > start:
            receive(split, data[start:end])
        got += drain(split)
    assert [type(e) for e in got] == [type(e) for e in expected]
    assert got == expected
