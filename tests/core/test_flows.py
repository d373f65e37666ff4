"""Registration, login and requests end to end over the in-memory adapter."""

from __future__ import annotations

import pytest

from keymgmt.adapters import Delivery
from keymgmt_proto import (
    ErrorCode,
    LocalProtocolError,
    LoginFailed,
    LoginSucceeded,
    RegistrationCompleted,
    ResponseReceived,
    SessionClosed,
    SessionFailed,
    State,
)

from ..support.helpers import PASSWORD, login, only, register


@pytest.mark.parametrize("delivery", list(Delivery))
def test_register_then_login_gives_same_user_id_and_export_key(harness, delivery):
    pair = harness.pair(delivery, seed=7)
    registered = register(pair, b"alice@example.org")
    completed = only(pair.server_events, RegistrationCompleted)
    assert completed.user_id == registered.user_id
    assert len(completed.encrypted_storage_key) == 60

    established = login(pair, b"alice@example.org")
    assert established.user_id == registered.user_id
    assert established.export_key == registered.export_key
    assert len(established.export_key) == 64
    assert isinstance(pair.server_events[-1], LoginSucceeded)

    # A second, independent login yields the same export key again.
    again = login(harness.pair(delivery, seed=8), b"alice@example.org")
    assert again.export_key == registered.export_key


@pytest.mark.parametrize("delivery", list(Delivery))
def test_requests_are_answered_in_order(harness, delivery):
    pair = harness.pair(delivery, seed=3)
    register(pair, b"bob")
    sid = login(pair, b"bob").session_id
    ids = [pair.client.send_request(sid, f"req {i}".encode()) for i in range(5)]
    responses = [e for e in pair.pump() if isinstance(e, ResponseReceived)]
    assert [r.request_id for r in responses] == ids
    assert [r.body for r in responses] == [f"req {i}".encode() for i in range(5)]


def test_wrong_password_is_an_authentication_error_and_a_failed_login(harness):
    pair = harness.pair()
    register(pair, b"carol")
    pair.client.open_request_session(b"carol", b"not the password")
    failed = only(pair.pump(), SessionFailed)
    assert failed.code is ErrorCode.AUTHENTICATION_FAILED
    server_failed = only(pair.server_events, LoginFailed)
    assert server_failed.account_name == b"carol"
    # The connection is still fine: the right password works on it afterwards.
    assert login(pair, b"carol").user_id == server_failed.user_id


def test_unknown_account_is_refused_with_the_same_code(harness):
    pair = harness.pair()
    pair.client.open_request_session(b"nobody", PASSWORD)
    failed = only(pair.pump(), SessionFailed)
    assert failed.code is ErrorCode.AUTHENTICATION_FAILED


def test_registering_a_taken_name_fails_and_stores_nothing(harness):
    pair = harness.pair()
    first = register(pair, b"dave")
    pair.client.open_registration(b"dave", b"another password")
    failed = only(pair.pump(), SessionFailed)
    assert failed.code is ErrorCode.ACCOUNT_EXISTS
    assert harness.app.accounts[b"dave"].user_id == first.user_id
    assert login(pair, b"dave").user_id == first.user_id


def test_store_failure_at_completion_reaches_the_client(harness):
    pair = harness.pair()

    def refuse_completion(conn, event):
        if isinstance(event, RegistrationCompleted):
            conn.reject_session(event.session_id, ErrorCode.INTERNAL_ERROR, "disk full")
        else:
            harness.app(conn, event)

    pair.app = refuse_completion
    pair.client.open_registration(b"erin", PASSWORD)
    failed = only(pair.pump(), SessionFailed)
    assert failed.code is ErrorCode.INTERNAL_ERROR
    assert b"erin" not in harness.app.accounts


def test_logout_ends_the_session_on_both_sides(harness):
    pair = harness.pair()
    register(pair, b"frank")
    sid = login(pair, b"frank").session_id
    pair.client.close_session(sid)
    pair.pump()
    closed = only(pair.server_events, SessionClosed)
    assert closed.code is ErrorCode.CLIENT_CLOSED
    assert pair.client.session_state(sid) is State.CLOSED
    with pytest.raises(LocalProtocolError):
        pair.client.send_request(sid, b"after logout")
    assert len(harness.registry) == 0


def test_commands_in_the_wrong_state_raise_and_change_nothing(harness):
    pair = harness.pair()
    sid = pair.client.open_request_session(b"gina", PASSWORD)
    with pytest.raises(LocalProtocolError):
        pair.client.send_request(sid, b"too early")
    with pytest.raises(LocalProtocolError):
        pair.client.close_session(sid)
    assert pair.client.session_state(sid) is State.AWAIT_LOGIN_RESPONSE
    with pytest.raises(LocalProtocolError):
        pair.client.open_request_session(b"", PASSWORD)
    with pytest.raises(LocalProtocolError):
        pair.client.open_request_session(b"x" * 256, PASSWORD)
    with pytest.raises(LocalProtocolError):
        pair.client.open_request_session(b"gina", b"")
    with pytest.raises(LocalProtocolError):
        pair.server.send_response(99, 1, b"no such session")
