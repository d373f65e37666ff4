"""PasswordCheck: a session tells, from a new OPAQUE registration, whether its password is
the one the session logged in with (review of issue 16, gap 5, in a session).

The check reads only public messages: the login's credential response (its masking nonce
and masked server key) and the new registration's response (the server's public key) and
upload (the masking key). These tests run the real OPAQUE suite, so a layout that moved in
opaque-ke-py fails here rather than silently turning the check off."""

from __future__ import annotations

import os

import pytest

from keymgmt_proto import PasswordCheck, RealOpaque, ServerSetup

REAL_OPAQUE = RealOpaque()
SETUP = ServerSetup.generate()
NAME = b"alice@example.org"


def _register(password: bytes, name: bytes = NAME, setup: ServerSetup = SETUP) -> tuple[bytes, bytes, bytes]:
    """(registration response, upload, record) of a registration of ``password``."""
    start = REAL_OPAQUE.client_registration_start(password)
    response = REAL_OPAQUE.server_registration_start(setup, start.message, name)
    finish = REAL_OPAQUE.client_registration_finish(password, start.state, response)
    return response, finish.message, REAL_OPAQUE.server_registration_finish(finish.message)


def _login_check(password: bytes, record: bytes) -> PasswordCheck:
    """The check a client builds from a login of ``password`` against ``record``."""
    start = REAL_OPAQUE.client_login_start(password)
    step = REAL_OPAQUE.server_login_start(SETUP, record, start.message, NAME)
    REAL_OPAQUE.client_login_finish(password, start.state, step.message)  # a real login
    check = PasswordCheck.from_login(step.message)
    assert check is not None
    return check


def test_a_login_tells_its_own_password_from_another():
    _, _, record = _register(b"the old password")
    check = _login_check(b"the old password", record)
    assert check.same_password(*_register(b"the old password")[:2])
    assert not check.same_password(*_register(b"a new password")[:2])
    assert not check.same_password(*_register(b"the old password", name=b"bob@example.org")[:2])
    assert not check.same_password(*_register(b"the old password", setup=ServerSetup.generate())[:2])


def test_after_a_change_the_new_password_is_the_current_one():
    response, upload, _ = _register(b"the new password")
    check = PasswordCheck.from_registration(response, upload, os.urandom(32))
    assert check is not None
    assert check.same_password(*_register(b"the new password")[:2])
    assert not check.same_password(*_register(b"the old password")[:2])
    # as a login with that password would have built it
    _, _, record = _register(b"the new password")
    assert _login_check(b"the new password", record).same_password(response, upload)


def test_messages_of_another_layout_tell_nothing():
    """A suite whose messages are not OPAQUE's (test doubles) gets no check, and a check
    never says "the same" for messages it cannot read."""
    response, upload, record = _register(b"the old password")
    check = _login_check(b"the old password", record)
    assert PasswordCheck.from_login(b"\x00" * 95) is None
    assert PasswordCheck.from_registration(response[:-1], upload, os.urandom(32)) is None
    assert PasswordCheck.from_registration(response, upload[:95], os.urandom(32)) is None
    assert PasswordCheck.from_registration(response, upload, b"short") is None
    assert not check.same_password(response + b"\x00", upload)
    assert not check.same_password(response, upload[:95])
    assert check.same_password(response, upload)


def test_the_check_shows_nothing_in_its_repr():
    response, upload, _ = _register(b"the old password")
    check = PasswordCheck.from_registration(response, upload, bytes(32))
    assert check is not None
    assert check.masked_server_key.hex() not in repr(check) and "nonce" not in repr(check)


@pytest.mark.parametrize("flip", [0, 31])
def test_a_changed_masked_key_is_another_password(flip):
    response, upload, record = _register(b"the old password")
    check = _login_check(b"the old password", record)
    masked = bytearray(check.masked_server_key)
    masked[flip] ^= 1
    assert not PasswordCheck(check.nonce, bytes(masked)).same_password(response, upload)
