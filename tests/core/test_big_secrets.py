"""OPS-12: secrets of 1..65536 bytes, the two portable forms, and the bounds that carry them."""

from __future__ import annotations

import os
import struct

import pytest

from keymgmt_proto import (
    DEFAULT_MAX_PAYLOAD,
    KEY_ID_NONCE_SIZE,
    MAX_SEALED_SIZE,
    MAX_SECRET_SIZE,
    MAX_SHORT_PORTABLE_SIZE,
    Context,
    Op,
    RemoteProtocolError,
    SecretKind,
    SecretOps,
    SecretResponse,
    Status,
    StoreSecretRequest,
    decode_portable,
    decode_request,
    decode_response,
    encode_portable,
    encode_response,
    open_secret,
    seal_secret,
    secret_ad,
)
from keymgmt_proto.wire import Request, Response

USER = b"\x11" * 16
KEY = b"\x22" * 16
STORAGE_KEY = b"\x33" * 32


def test_the_limits_are_64_kib_and_the_short_form_stays_for_255_bytes():
    assert MAX_SECRET_SIZE == 65536
    assert MAX_SHORT_PORTABLE_SIZE == 255
    assert MAX_SEALED_SIZE == 65536 + 12 + 16


@pytest.mark.parametrize(
    ("size", "head"),
    [
        (1, "01"),
        (255, "ff"),
        (256, "0001" + "00000100"),
        (65535, "0001" + "0000ffff"),
        (65536, "0001" + "00010000"),
    ],
)
def test_portable_boundaries(size, head):
    secret = os.urandom(size)
    portable = encode_portable(secret)
    assert portable.hex().startswith(head)
    assert portable == bytes.fromhex(head) + secret
    assert decode_portable(portable) == secret


@pytest.mark.parametrize("size", [0, 65537, 2**20])
def test_secrets_outside_1_to_65536_bytes_have_no_portable_form(size):
    with pytest.raises(ValueError, match=r"1\.\.65536 bytes"):
        encode_portable(bytes(size))


def _long(length: int, body: bytes, version: int = 1) -> bytes:
    return bytes([0x00, version]) + struct.pack(">I", length) + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_long(255, bytes(255)), "must use the one-byte-length form"),
        (_long(1, b"x"), "must use the one-byte-length form"),
        (_long(0, b""), "must use the one-byte-length form"),
        (_long(65537, bytes(65537)), "at most 65536"),
        (_long(2**32 - 1, b""), "at most 65536"),
        (_long(256, bytes(255)), "says 256 bytes but 255"),
        (_long(256, bytes(257)), "says 256 bytes but 257"),
        (_long(65536, bytes(65535)), "says 65536 bytes but 65535"),
        (_long(256, bytes(256), version=2), "unknown portable format version 2"),
        (_long(256, bytes(256), version=0), "unknown portable format version 0"),
        (_long(256, b"")[:5], "cut short"),
        (b"\x00\x01", "cut short"),
        (b"\x00", "a length byte and 1..255 bytes, or the long form"),
        (bytes([255]) + bytes(256), "length byte says 255 but 256"),
    ],
)
def test_malformed_portable_input_is_refused_with_one_clear_error(data, message):
    with pytest.raises(ValueError, match=message):
        decode_portable(data)


def test_a_64_kib_secret_seals_and_travels_in_store_and_retrieve_bodies():
    secret = os.urandom(MAX_SECRET_SIZE)
    ad = secret_ad(USER, KEY, SecretKind.IMPORTED)
    sealed = seal_secret(STORAGE_KEY, secret, ad, os.urandom)
    assert len(sealed) == MAX_SEALED_SIZE
    store = StoreSecretRequest(USER, KEY, SecretKind.IMPORTED, sealed)
    body = store.encode()
    assert body[34:38] == struct.pack(">I", MAX_SEALED_SIZE)  # the sealed length is a u32
    assert body[-1:] == b"\x00"  # no next key id asked for
    assert decode_request(body) == store
    answer = encode_response(Status.OK, SecretResponse(SecretKind.IMPORTED, sealed, ad))
    _, response = decode_response(Op.RETRIEVE, answer)
    assert isinstance(response, SecretResponse)
    assert open_secret(STORAGE_KEY, response.ciphertext, ad) == secret


def test_a_sealed_secret_one_byte_too_long_is_refused_both_ways():
    with pytest.raises(ValueError, match=r"1\.\.65536 bytes"):
        seal_secret(STORAGE_KEY, bytes(MAX_SECRET_SIZE + 1), b"ad", os.urandom)
    with pytest.raises(ValueError, match=r"1\.\.65536 bytes"):
        StoreSecretRequest(USER, KEY, SecretKind.IMPORTED, bytes(MAX_SEALED_SIZE + 1))
    head = bytes([Op.STORE_SECRET]) + USER + KEY + bytes([SecretKind.IMPORTED])
    # The length prefix alone refuses it, whether or not the bytes follow.
    for tail in (bytes(MAX_SEALED_SIZE + 1), b""):
        with pytest.raises(RemoteProtocolError, match="a field of 65565 bytes is over its limit of 65564"):
            decode_request(head + struct.pack(">I", MAX_SEALED_SIZE + 1) + tail)
    # Too short for an imported secret (28 bytes: an empty one): the size rule.
    with pytest.raises(RemoteProtocolError, match=r"1\.\.65536 bytes"):
        decode_request(head + struct.pack(">I", 28) + bytes(28) + b"\x00")
    with pytest.raises(RemoteProtocolError, match="over its limit"):
        decode_response(Op.RETRIEVE, b"\x00\x02" + struct.pack(">I", 2**32 - 1))


def test_the_largest_store_and_retrieve_fit_the_default_frame_limit():
    """Every frame that carries a 64 KiB secret fits DEFAULT_MAX_PAYLOAD: a REQUEST or
    RESPONSE record is seq (8) || request id (4) || body || tag (16). The largest is a
    STORE_SECRET that also asks for the next key id."""
    sealed = bytes(MAX_SEALED_SIZE)
    nonce = bytes(KEY_ID_NONCE_SIZE)
    store = StoreSecretRequest(USER, KEY, SecretKind.IMPORTED, sealed, SecretKind.IMPORTED, nonce).encode()
    store_frame = 8 + len(Request(1, store).encode()) + 16
    assert store_frame == 65664  # docs/protocol.md section 10, max_payload
    ad = secret_ad(USER, KEY, SecretKind.IMPORTED)
    answer = encode_response(Status.OK, SecretResponse(SecretKind.IMPORTED, sealed, ad))
    answer_frame = 8 + len(Response(1, answer).encode()) + 16
    assert max(store_frame, answer_frame) <= DEFAULT_MAX_PAYLOAD
    assert DEFAULT_MAX_PAYLOAD - max(store_frame, answer_frame) < 1024  # and not much more


def test_export_of_a_large_secret_is_in_the_long_form():
    """SecretOps hands back the long form for EXPORT and the secret itself for LOCAL_ONLY."""
    from keymgmt_proto import SealedCopy

    secret = os.urandom(300)
    ops = SecretOps(USER, bytes(64), os.urandom)
    ops._storage_key = STORAGE_KEY  # as if OPS-1 ran
    ad = secret_ad(USER, KEY, SecretKind.IMPORTED)
    local = SealedCopy(SecretKind.IMPORTED, seal_secret(STORAGE_KEY, secret, ad, os.urandom), ad)
    for context, expected in ((Context.EXPORT, encode_portable(secret)), (Context.LOCAL_ONLY, secret)):
        plan = ops.retrieve(KEY, context, local)
        with pytest.raises(StopIteration) as done:
            next(plan)
        assert done.value.value == (expected, None)
    assert encode_portable(secret)[:2] == b"\x00\x01"
