"""Boundaries of the byte-level building blocks the mutation run found untested: HKDF output
lengths, the hot-channel capacity, length-prefixed fields at their maximum, and the decoy
records an unknown account name logs in against (NET-9)."""

from __future__ import annotations

import os

import pytest

from keymgmt_proto import (
    ErrorCode,
    RealOpaque,
    RemoteProtocolError,
    ServerConfig,
    ServerSetup,
    SessionRegistry,
    hkdf_sha3,
)
from keymgmt_proto.wire import REGISTRATION_UPLOAD_SIZE, USER_ID_SIZE, Reader, Writer, hkdf_expand_sha3

NAME = b"nobody@example.org"


def test_hkdf_expand_gives_any_length_from_one_byte():
    """RFC 5869: L may be 1; a shorter output is a prefix of a longer one."""
    prk = bytes(range(32))
    one = hkdf_expand_sha3(prk, b"info", 1)
    assert len(one) == 1 and one == hkdf_expand_sha3(prk, b"info", 32)[:1]
    with pytest.raises(ValueError, match=r"1\.\.8160"):
        hkdf_expand_sha3(prk, b"info", 0)


def test_a_hot_channel_set_may_hold_a_single_channel():
    assert SessionRegistry(ServerConfig(max_hot_channels=1)).hot_channels == 0
    with pytest.raises(ValueError, match="at least 1"):
        ServerConfig(max_hot_channels=0)


def test_length_prefixed_fields_take_their_maximum_length():
    value8, value16 = b"a" * 0xFF, b"b" * 0xFFFF
    reader = Reader(Writer().bytes8(value8).bytes16(value16).getvalue(), "test")
    assert (reader.bytes8(), reader.bytes16()) == (value8, value16)
    reader.done()
    with pytest.raises(ValueError, match="longer than 255"):
        Writer().bytes8(value8 + b"a")
    with pytest.raises(ValueError, match="longer than 65535"):
        Writer().bytes16(value16 + b"b")


@pytest.fixture(scope="module")
def setup() -> ServerSetup:
    return ServerSetup.generate()


def test_a_decoy_record_has_the_shape_of_a_real_one(setup):
    """NET-9: the decoy login must look like a real one, so its record and user id have the sizes
    of a stored account's."""
    user_id, record = setup.decoy_record(NAME, os.urandom)
    assert len(user_id) == USER_ID_SIZE
    assert len(record) == REGISTRATION_UPLOAD_SIZE


def test_repeated_probes_of_one_name_meet_the_same_decoy(setup):
    """NET-9: a real account answers every probe with the same record, so a decoy must too;
    different names get different decoys."""
    first = setup.decoy_record(NAME, os.urandom)
    assert setup.decoy_record(NAME, os.urandom) == first
    other = setup.decoy_record(b"somebody@example.org", os.urandom)
    assert other[0] != first[0] and other[1][32:] != first[1][32:]
    assert other[1][:32] == first[1][:32]  # one throwaway public key per setup object


def test_the_decoy_derivation_is_fixed_by_the_setup_and_the_name(setup):
    """Instances sharing a setup (and releases of them during a rolling upgrade) must derive the
    same decoy for a name: the user id, masking key and envelope are
    HKDF-Expand(HKDF(setup, "keymgmt v1 decoy records"), "decoy record" || name, 176)."""
    secret = hkdf_sha3(setup.to_bytes(), b"keymgmt v1 decoy records", 32)
    material = hkdf_expand_sha3(secret, b"decoy record" + NAME, 176)
    user_id, record = setup.decoy_record(NAME, os.urandom)
    assert user_id == material[:16]
    assert record[32:] == material[16:]
    # Another object loaded from the same bytes agrees (its throwaway public key aside).
    twin = ServerSetup.from_bytes(setup.to_bytes())
    twin_user_id, twin_record = twin.decoy_record(NAME, os.urandom)
    assert (twin_user_id, twin_record[32:]) == (user_id, record[32:])


def test_the_first_decoy_runs_no_client_step(monkeypatch):
    """The decoy's public key comes from a throwaway server setup, not a throwaway client
    registration: the first login a server answers pays no Argon2 (a one-off ~15 ms that made
    the first login stand out and weighed on the benchmarks' per-login CPU). The record still
    holds a valid ristretto255 point: OPAQUE accepts it, and no password opens it."""
    import opaque_ke_py

    OPAQUE = RealOpaque()

    def no_argon2(*args: object) -> None:
        raise AssertionError("the decoy ran a client registration step (Argon2)")

    monkeypatch.setattr(opaque_ke_py, "client_registration_finish", no_argon2)
    fresh = ServerSetup.generate()
    _, record = fresh.decoy_record(NAME, os.urandom)
    monkeypatch.undo()
    client = OPAQUE.client_login_start(b"any password")
    step = OPAQUE.server_login_start(fresh, record, client.message, NAME)
    with pytest.raises(RemoteProtocolError) as failed:
        OPAQUE.client_login_finish(b"any password", client.state, step.message)
    assert failed.value.code is ErrorCode.AUTHENTICATION_FAILED
