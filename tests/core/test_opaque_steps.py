"""The client's expensive OPAQUE steps leave next_event() (issue 13, item 3).

``next_event()`` answers REG_RESPONSE and LOGIN_RESPONSE with an ``OpaqueStepRequired``
and runs no finish step itself; the adapter runs it and hands the result to
``complete_opaque_step``, which finishes the transition. Every misuse of that command is
refused or ignored as documented. How ``KeymgmtClient`` runs the steps is in
tests/client/test_opaque_steps.py.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from keymgmt.adapters import InMemoryPair
from keymgmt_proto import (
    ErrorCode,
    Event,
    FrameType,
    LocalProtocolError,
    OpaqueStep,
    OpaqueStepRequired,
    OpaqueStepResult,
    RegistrationSucceeded,
    SessionEstablished,
    SessionFailed,
    State,
)
from keymgmt_proto.wire import Abort

from ..support.fake_pairs import FakeWorld, lose, spied_pair
from ..support.frames import forge, parsed
from ..support.helpers import PASSWORD, only, register

ACCOUNT = b"alice@example.org"


def _step(events: list[Event]) -> OpaqueStepRequired:
    return only(events, OpaqueStepRequired)


def _login_step(world: FakeWorld, password: bytes = PASSWORD) -> tuple[InMemoryPair, int, OpaqueStepRequired]:
    """A registered account and a login whose LOGIN_RESPONSE has been handled: its step is out."""
    register(world.pair(), ACCOUNT)
    pair, _ = spied_pair(world)
    sid = pair.client.open_request_session(ACCOUNT, password)
    return pair, sid, _step(pair.pump())


# ------------------------------------------------------------------ the event replaces the step


def test_a_login_response_gives_the_step_event_and_runs_no_finish(world):
    register(world.pair(), ACCOUNT)
    pair, spy = spied_pair(world)
    sid = pair.client.open_request_session(ACCOUNT, PASSWORD)
    events = pair.pump()
    step = _step(events)
    assert events == [step]
    assert (step.session_id, step.step, step.password) == (sid, OpaqueStep.LOGIN_FINISH, PASSWORD)
    assert spy.calls == ["client_login_start"]  # the start ran at open time, the finish did not
    assert pair.client.session_state(sid) is State.AWAIT_LOGIN_STEP
    assert pair.client.data_to_send() == b""  # LOGIN_FINISH waits for the result
    assert pair.client._sessions[sid].password is None  # the step was the last to need it

    result = step.run(pair.client.opaque)
    assert spy.calls == ["client_login_start", "client_login_finish"]
    assert pair.client.complete_opaque_step(result) is True
    assert pair.client.session_state(sid) is State.AWAIT_WELCOME
    sent = pair.client.data_to_send()
    assert [kind for kind, _, _ in parsed(sent)] == [FrameType.LOGIN_FINISH]
    pair.to_server(sent)
    established = only(pair.pump(), SessionEstablished)
    assert established.session_id == sid and established.export_key == result.export_key
    assert pair.client.session_state(sid) is State.ESTABLISHED


def test_a_registration_takes_two_steps_and_the_login_start_waits_for_the_first(world):
    pair, spy = spied_pair(world)
    sid = pair.client.open_registration(ACCOUNT, PASSWORD)
    first = _step(pair.pump())
    assert (first.session_id, first.step) == (sid, OpaqueStep.REGISTRATION_FINISH)
    assert spy.calls == ["client_registration_start"]
    assert pair.client.session_state(sid) is State.AWAIT_REG_STEP
    assert pair.client.data_to_send() == b""
    session = pair.client._sessions[sid]
    assert session.password == PASSWORD and session.opaque_state is None  # kept for the login start

    registration = first.run(pair.client.opaque)
    assert pair.client.complete_opaque_step(registration)
    assert spy.calls == ["client_registration_start", "client_registration_finish", "client_login_start"]
    assert pair.client.session_state(sid) is State.AWAIT_LOGIN_RESPONSE
    sent = pair.client.data_to_send()
    assert [kind for kind, _, _ in parsed(sent)] == [FrameType.REG_UPLOAD, FrameType.LOGIN_START]
    assert parsed(sent)[0][2] == registration.message

    pair.to_server(sent)
    second = _step(pair.pump())
    assert (second.session_id, second.step) == (sid, OpaqueStep.LOGIN_FINISH)
    assert spy.calls[-1] == "client_login_start"
    assert session.password is None and session.opaque_state is None
    login = second.run(pair.client.opaque)
    assert pair.client.complete_opaque_step(login)
    done = only(pair.pump(), RegistrationSucceeded)
    assert done.session_id == sid and done.export_key == registration.export_key == login.export_key


def test_the_step_is_plain_data_and_keeps_its_secrets_out_of_repr(world):
    pair, sid, step = _login_step(world)
    result = step.run(pair.client.opaque)
    for secret in (step.password, step.state, step.server_message):
        assert secret and secret.hex() not in repr(step) and repr(secret) not in repr(step)
    for secret in (result.message, result.export_key, result.session_key):
        assert secret and secret.hex() not in repr(result) and repr(secret) not in repr(result)
    assert repr(step) == f"OpaqueStepRequired(session_id={sid}, step={OpaqueStep.LOGIN_FINISH!r})"
    # It can cross to a process pool and back.
    assert pickle.loads(pickle.dumps(step)) == step
    assert pickle.loads(pickle.dumps(result)) == result
    assert pickle.loads(pickle.dumps(step)).run(pair.client.opaque).export_key == result.export_key
    assert pair.client.complete_opaque_step(pickle.loads(pickle.dumps(result)))
    assert only(pair.pump(), SessionEstablished).session_id == sid


def test_the_wire_is_what_it_was_only_the_order_of_work_changed(world):
    """Running each step the moment it comes out gives the same frames as before: the
    InMemoryPair does exactly that, and a login and a registration still complete."""
    pair = world.pair()
    assert pair.run_opaque_steps is True
    sid = pair.client.open_registration(ACCOUNT, PASSWORD)
    events = pair.pump()
    assert not any(isinstance(e, OpaqueStepRequired) for e in events)
    assert only(events, RegistrationSucceeded).session_id == sid


# ------------------------------------------------------------------ a failed step


def test_a_wrong_password_ends_the_session_as_before(world):
    pair, sid, step = _login_step(world, b"not the password")
    result = step.run(pair.client.opaque)
    assert (result.error, result.reason) == (ErrorCode.AUTHENTICATION_FAILED, "OPAQUE login failed")
    assert result.message == result.export_key == result.session_key == b""
    assert pair.client.complete_opaque_step(result) is True
    failed = only(pair.client._events, SessionFailed)
    assert failed == SessionFailed(sid, ErrorCode.AUTHENTICATION_FAILED, "OPAQUE login failed", False)
    ((kind, abort_sid, payload),) = parsed(pair.client.data_to_send())
    assert (kind, abort_sid) == (FrameType.ABORT, sid)
    assert Abort.decode(payload) == Abort(ErrorCode.AUTHENTICATION_FAILED, "OPAQUE login failed")
    assert pair.client.session_state(sid) is State.CLOSED


def test_a_failed_registration_step_is_the_servers_fault(world):
    pair, _ = spied_pair(world)
    sid = pair.client.open_registration(ACCOUNT, PASSWORD)
    step = _step(pair.pump())
    bad = dataclasses.replace(step, server_message=b"short")
    result = bad.run(pair.client.opaque)
    assert result.error is ErrorCode.MALFORMED
    assert pair.client.complete_opaque_step(result)
    failed = only(pair.client._events, SessionFailed)
    assert (failed.session_id, failed.code, failed.reason, failed.remote) == (
        sid,
        ErrorCode.MALFORMED,
        "OPAQUE registration response failed",
        True,
    )


def test_a_login_whose_export_key_is_not_registrations_ends_the_registration(world):
    pair, _ = spied_pair(world)
    sid = pair.client.open_registration(ACCOUNT, PASSWORD)
    assert pair.client.complete_opaque_step(_step(pair.pump()).run(pair.client.opaque))
    login = _step(pair.pump()).run(pair.client.opaque)
    other = dataclasses.replace(login, export_key=bytes(64))
    assert pair.client.complete_opaque_step(other) is True
    failed = only(pair.client._events, SessionFailed)
    assert (failed.session_id, failed.code, failed.remote) == (sid, ErrorCode.AUTHENTICATION_FAILED, False)
    assert [kind for kind, _, _ in parsed(pair.client.data_to_send())] == [FrameType.ABORT]
    assert pair.client.session_state(sid) is State.CLOSED


# ------------------------------------------------------------------ misuse


def _unchanged(pair: InMemoryPair, sid: int, state: State) -> None:
    assert pair.client.session_state(sid) is state
    assert pair.client.data_to_send() == b""
    assert list(pair.client._events) == []


def test_a_result_for_a_session_never_opened_is_refused(world):
    pair, sid, step = _login_step(world)
    result = step.run(pair.client.opaque)
    for other in (sid + 1, 0):
        with pytest.raises(LocalProtocolError, match=f"no session {other}"):
            pair.client.complete_opaque_step(dataclasses.replace(result, session_id=other))
    _unchanged(pair, sid, State.AWAIT_LOGIN_STEP)


def test_a_result_handed_back_twice_is_refused_the_second_time(world):
    pair, sid, step = _login_step(world)
    result = step.run(pair.client.opaque)
    assert pair.client.complete_opaque_step(result)
    pair.client.data_to_send()
    with pytest.raises(LocalProtocolError, match="complete_login_step"):
        pair.client.complete_opaque_step(result)
    _unchanged(pair, sid, State.AWAIT_WELCOME)


def test_a_result_for_the_other_step_is_refused(world):
    pair, sid, step = _login_step(world)
    result = step.run(pair.client.opaque)
    wrong = dataclasses.replace(result, step=OpaqueStep.REGISTRATION_FINISH, message=bytes(192))
    with pytest.raises(LocalProtocolError, match="complete_reg_step"):
        pair.client.complete_opaque_step(wrong)
    _unchanged(pair, sid, State.AWAIT_LOGIN_STEP)
    assert pair.client.complete_opaque_step(result)  # the right one still works


def test_a_result_for_a_session_that_waits_for_the_server_is_refused(world):
    pair, _ = spied_pair(world)
    sid = pair.client.open_request_session(ACCOUNT, PASSWORD)
    pair.client.data_to_send()
    result = OpaqueStepResult(sid, OpaqueStep.LOGIN_FINISH, bytes(64), bytes(64), bytes(64))
    with pytest.raises(LocalProtocolError, match="AWAIT_LOGIN_RESPONSE"):
        pair.client.complete_opaque_step(result)
    _unchanged(pair, sid, State.AWAIT_LOGIN_RESPONSE)


@pytest.mark.parametrize(
    "change",
    [
        {"message": bytes(63)},
        {"message": bytes(65)},
        {"export_key": bytes(63)},
        {"export_key": bytes(65)},
        {"session_key": bytes(63)},
        {"session_key": b""},
    ],
    ids=lambda c: f"{next(iter(c))}-{len(next(iter(c.values())))}",
)
def test_a_login_result_of_the_wrong_sizes_is_refused(world, change):
    pair, sid, step = _login_step(world)
    result = step.run(pair.client.opaque)
    with pytest.raises(LocalProtocolError, match="not an OPAQUE step result"):
        pair.client.complete_opaque_step(dataclasses.replace(result, **change))
    _unchanged(pair, sid, State.AWAIT_LOGIN_STEP)
    assert pair.client.complete_opaque_step(result)


@pytest.mark.parametrize(
    "change", [{"message": bytes(191)}, {"export_key": bytes(32)}], ids=["message", "key"]
)
def test_a_registration_result_of_the_wrong_sizes_is_refused(world, change):
    pair, _ = spied_pair(world)
    sid = pair.client.open_registration(ACCOUNT, PASSWORD)
    result = _step(pair.pump()).run(pair.client.opaque)
    assert result.session_key == b""  # a registration step has none, and needs none
    with pytest.raises(LocalProtocolError, match="not an OPAQUE step result"):
        pair.client.complete_opaque_step(dataclasses.replace(result, **change))
    _unchanged(pair, sid, State.AWAIT_REG_STEP)
    assert pair.client.complete_opaque_step(result)


def test_a_result_for_a_session_aborted_meanwhile_is_dropped(world):
    pair, sid, step = _login_step(world)
    pair.client.abort_session(sid, "took too long")
    pair.pump()
    assert pair.client.complete_opaque_step(step.run(pair.client.opaque)) is False
    _unchanged(pair, sid, State.CLOSED)


def test_a_result_for_a_session_the_server_aborted_meanwhile_is_dropped(world):
    pair, sid, step = _login_step(world)
    events = pair.to_client(forge(FrameType.ABORT, sid, Abort(ErrorCode.HANDSHAKE_TIMEOUT, "slow").encode()))
    assert only(events, SessionFailed).code is ErrorCode.HANDSHAKE_TIMEOUT
    assert pair.client.complete_opaque_step(step.run(pair.client.opaque)) is False
    _unchanged(pair, sid, State.CLOSED)


def test_a_result_after_the_connection_failed_is_dropped(world):
    pair, _, step = _login_step(world)
    assert lose(pair) == []  # a handshake does not survive its connection
    assert pair.client.complete_opaque_step(step.run(pair.client.opaque)) is False
    assert pair.client.data_to_send() == b""


def test_any_other_frame_while_the_step_is_out_ends_the_session(world):
    pair, sid, step = _login_step(world)
    events = pair.to_client(forge(FrameType.LOGIN_RESPONSE, sid, step.server_message))
    failed = only(events, SessionFailed)
    assert (failed.session_id, failed.code) == (sid, ErrorCode.UNEXPECTED_FRAME)
    assert pair.client.complete_opaque_step(step.run(pair.client.opaque)) is False
