"""The key server's side of password change and account deletion (issue 16), driven frame by
frame through the real KeyServer over SQLite (and PostgreSQL where the storage matters):
which sessions end and how, the stored sessions, the reauthentication window, malformed
uploads, and NET-9 for deleted names."""

from __future__ import annotations

import os
import time

import pytest

from keymgmt.adapters import InMemoryPair
from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    Action,
    AuditType,
    ChangePasswordFinishRequest,
    ClientConnection,
    ErrorCode,
    OperationRefused,
    ResponseReceived,
    SecretOps,
    ServerConnection,
    SessionClosed,
    SessionEstablished,
    SessionFailed,
    SessionRegistry,
    Status,
    session_sealing_key,
)
from keymgmt_proto._secrets import Plan

from ..support.helpers import PASSWORD, login, register
from ..support.keyserver_world import SETUP
from .test_enumeration import _Traced
from .test_group_commit import backend_storage  # noqa: F401 (fixture)

NEW = b"a new and long password"
ALICE, BOB = b"alice@example.org", b"bob@example.org"


class _World:
    def __init__(self, storage, *, shared_store: bool = False, **kwargs: object) -> None:
        self.storage = storage
        self.keyserver = KeyServer(storage, **kwargs)  # type: ignore[arg-type]
        store = {}
        if shared_store:
            store = {
                "store": storage.session_store,
                "sealing_key": session_sealing_key(SETUP.to_bytes()),
                "random": os.urandom,
            }
        self.registry = SessionRegistry(**store)

    def pair(self) -> InMemoryPair:
        # Wall-clock times: a store deletes sessions whose deadline is long past.
        now = time.time()
        server = ServerConnection(SETUP, os.urandom, registry=self.registry, now=now)
        return InMemoryPair(ClientConnection(os.urandom), server, self.keyserver, now=now)


def _run(pair: InMemoryPair, session: SessionEstablished, plan: Plan[object]) -> tuple[object, list]:
    """Drive a SecretOps plan over the pair; returns its result and every client event seen."""
    seen: list = []
    try:
        request = next(plan)
        while True:
            request_id = pair.client.send_request(session.session_id, request.encode())
            events = pair.pump()
            seen += events
            (answer,) = [e for e in events if isinstance(e, ResponseReceived) and e.request_id == request_id]
            try:
                decoded = SecretOps.answer(request, answer.body)
            except OperationRefused as refused:
                request = plan.throw(refused)
            else:
                request = plan.send(decoded)
    except StopIteration as done:
        return done.value, seen


def _change_password(pair: InMemoryPair, session: SessionEstablished, new: bytes = NEW) -> list:
    ops = SecretOps(session.user_id, session.export_key, os.urandom)
    step, seen = _run(pair, session, ops.change_password_start(new, pair.client.opaque))
    result = step.run(pair.client.opaque)
    _, more = _run(pair, session, ops.change_password_finish(result))
    return seen + more


def _lose(pair: InMemoryPair):
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    return pair.client.take_detached_sessions()


def _resume(world: _World, detached) -> list:
    other = world.pair()
    other.client.resume_session(detached)
    return other.pump()


@pytest.fixture
def sqlite_storage(tmp_path):
    storage = SQLiteStorage(tmp_path / "ks.db")
    yield storage
    storage.close()


def test_other_sessions_end_with_a_sealed_close_and_the_changing_one_goes_on(sqlite_storage):
    world = _World(sqlite_storage)
    pair, other = world.pair(), world.pair()
    register(pair, ALICE)
    register(pair, BOB)
    changing = login(pair, ALICE)
    same_connection = login(pair, ALICE)
    elsewhere = login(other, ALICE)
    bob = login(other, BOB)
    detached_pair = world.pair()
    (detached,) = (login(detached_pair, ALICE), _lose(detached_pair))[1]

    events = _change_password(pair, changing)

    closed = [e for e in events if isinstance(e, SessionClosed)]
    assert [(e.session_id, e.code) for e in closed] == [
        (same_connection.session_id, ErrorCode.NOT_AUTHORIZED)
    ]
    other_events = other.pump()  # the other connection's CLOSE was queued there
    assert [(e.session_id, e.code) for e in other_events if isinstance(e, SessionClosed)] == [
        (elsewhere.session_id, ErrorCode.NOT_AUTHORIZED)
    ]
    resumed = _resume(world, detached)  # the detached one is gone too
    assert [e.code for e in resumed if isinstance(e, SessionFailed)] == [ErrorCode.UNKNOWN_SESSION]
    # The changing session and the other account's session go on.
    for p, s in ((pair, changing), (other, bob)):
        ops = SecretOps(s.user_id, s.export_key, os.urandom)
        assert _run(p, s, ops.list_keys())[0] == []
    # Nothing per ended session in the log: the change's entry says it.
    ops = SecretOps(changing.user_id, changing.export_key, os.urandom)
    entries, _ = _run(pair, changing, ops.audit(AuditType.SYSTEM_ONLY))
    assert [e.action for e in entries if e.action is Action.SESSION_EXPIRED] == []
    assert [e.action for e in entries][-2:] == [Action.CHANGE_PASSWORD_START, Action.CHANGE_PASSWORD]
    # New password in, old password out.
    login(world.pair(), ALICE, NEW)
    failed = world.pair()
    failed.client.open_request_session(ALICE, PASSWORD)
    assert [e.code for e in failed.pump() if isinstance(e, SessionFailed)] == [
        ErrorCode.AUTHENTICATION_FAILED
    ]


def test_sessions_in_the_shared_store_are_dropped(backend_storage):  # noqa: F811
    world = _World(backend_storage, shared_store=True)
    pair = world.pair()
    register(pair, ALICE)
    register(pair, BOB)
    stored = world.pair()
    login(stored, ALICE)
    login(stored, BOB)
    alice_detached, bob_detached = _lose(stored)  # both sealed into the database
    _change_password(pair, login(pair, ALICE))
    failed = _resume(world, alice_detached)
    assert [e.code for e in failed if isinstance(e, SessionFailed)] == [ErrorCode.UNKNOWN_SESSION]
    assert not [e for e in _resume(world, bob_detached) if isinstance(e, SessionFailed)]


def test_deletion_answers_then_closes_its_own_session(sqlite_storage):
    world = _World(sqlite_storage)
    pair, other = world.pair(), world.pair()
    register(pair, ALICE)
    session = login(pair, ALICE)
    elsewhere = login(other, ALICE)
    ops = SecretOps(session.user_id, session.export_key, os.urandom)
    request_id = pair.client.send_request(session.session_id, next(ops.delete_account()).encode())
    events = pair.pump()
    kinds = [(type(e).__name__, getattr(e, "code", None)) for e in events]
    assert kinds == [("ResponseReceived", None), ("SessionClosed", ErrorCode.NOT_AUTHORIZED)]
    assert events[0].request_id == request_id and events[0].body == bytes([Status.OK])
    assert [e.code for e in other.pump() if isinstance(e, SessionClosed)] == [ErrorCode.NOT_AUTHORIZED]
    assert elsewhere.session_id not in (e.session_id for e in events)


def test_an_old_session_is_refused_until_it_logs_in_again(sqlite_storage):
    world = _World(sqlite_storage, reauth_window=100.0)
    pair = world.pair()
    register(pair, ALICE)
    session = login(pair, ALICE)
    ops = SecretOps(session.user_id, session.export_key, os.urandom)
    for _ in range(2):  # 120 s after the login, in use (the idle timeout is 300 s)
        pair.advance(60.0)
        _run(pair, session, ops.list_keys())
    with pytest.raises(OperationRefused) as refused:
        _run(pair, session, ops.change_password_start(NEW, pair.client.opaque))
    assert refused.value.status is Status.INVALID
    with pytest.raises(OperationRefused):
        _run(pair, session, ops.delete_account())
    fresh = login(pair, ALICE)  # a fresh login may
    _change_password(pair, fresh)
    entries, _ = _run(pair, fresh, SecretOps(fresh.user_id, fresh.export_key, os.urandom).audit())
    failures = [(e.action, e.outcome.name) for e in entries if e.outcome.name == "FAILURE"]
    assert (Action.CHANGE_PASSWORD_START, "FAILURE") in failures
    assert (Action.DELETE_ACCOUNT, "FAILURE") in failures


def test_a_malformed_upload_changes_nothing_and_is_audited(sqlite_storage):
    world = _World(sqlite_storage)
    pair = world.pair()
    register(pair, ALICE)
    session = login(pair, ALICE)
    ops = SecretOps(session.user_id, session.export_key, os.urandom)
    bogus = ChangePasswordFinishRequest(session.user_id, bytes(192), bytes(60))  # not a valid upload
    request_id = pair.client.send_request(session.session_id, bogus.encode())
    (answer,) = [e for e in pair.pump() if isinstance(e, ResponseReceived) and e.request_id == request_id]
    assert answer.body == bytes([Status.INVALID])
    login(world.pair(), ALICE)  # the old password still works
    entries, _ = _run(pair, session, ops.audit())
    assert [(e.action, e.outcome.name) for e in entries if e.action is Action.CHANGE_PASSWORD] == [
        (Action.CHANGE_PASSWORD, "FAILURE")
    ]


def test_a_deleted_name_costs_the_same_storage_work_as_an_unknown_one(tmp_path):
    """NET-9: a login to a deleted (reserved) name runs exactly the statements a login to a
    name never registered runs."""
    traced = _Traced(tmp_path)
    with traced.storage.transaction() as tx:
        from keymgmt.adapters.storage.base import Account

        record = SETUP.decoy_record(b"seed", os.urandom)[1]
        user_id = os.urandom(16)
        tx.insert_account(Account(ALICE, user_id, record, bytes(60), 1))
        tx.start_login(ALICE, 1, 5, 10)  # a throttling row of its own, as logins leave
        assert tx.delete_account(user_id, reserved_until=2**62)
    deleted = traced.probe(ALICE)
    unknown = traced.probe(b"alfie@example.org")
    assert deleted == unknown


def test_a_session_on_another_instance_finds_nothing_once_the_account_is_deleted(backend_storage, caplog):  # noqa: F811
    """Another instance (its own registry, the same database) cannot be told to end its
    sessions: their requests are answered NOT_FOUND, and their end is not an error."""
    import logging

    caplog.set_level(logging.DEBUG, logger="keymgmt.server")
    here, there = _World(backend_storage), _World(backend_storage)
    pair, remote = here.pair(), there.pair()
    register(pair, ALICE)
    session = login(pair, ALICE)
    elsewhere = login(remote, ALICE)
    _run(pair, session, SecretOps(session.user_id, session.export_key, os.urandom).delete_account())
    ops = SecretOps(elsewhere.user_id, elsewhere.export_key, os.urandom)
    with pytest.raises(OperationRefused) as refused:
        _run(remote, elsewhere, ops.list_keys())
    assert refused.value.status is Status.NOT_FOUND
    remote.client.close_session(elsewhere.session_id)
    remote.pump()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_session_elsewhere_cannot_take_the_account_after_a_password_change(backend_storage):  # noqa: F811
    """The takeover a review found: an attacker logged in with the old password on another
    instance (a session this instance cannot end) must not change the new password, nor
    delete the account, once the owner changed it; the owner's new password keeps working."""
    here, there = _World(backend_storage), _World(backend_storage)
    owner_pair, attacker_pair = here.pair(), there.pair()
    register(owner_pair, ALICE)
    attacker = login(attacker_pair, ALICE)  # with the old password, before the change
    ops = SecretOps(attacker.user_id, attacker.export_key, os.urandom)
    _run(attacker_pair, attacker, ops.generate(lambda _key_id: False))  # it now holds the storage key
    time.sleep(0.002)  # the change's audit time is after the attacker's login (microseconds)
    owner = login(owner_pair, ALICE)
    _change_password(owner_pair, owner, NEW)
    with pytest.raises(OperationRefused) as refused:
        _run(
            attacker_pair,
            attacker,
            ops.change_password_start(b"the attacker's own", attacker_pair.client.opaque),
        )
    assert refused.value.status is Status.INVALID
    with pytest.raises(OperationRefused) as refused:
        _run(attacker_pair, attacker, ops.delete_account())
    assert refused.value.status is Status.INVALID
    # The owner's new password still opens the account; a fresh login elsewhere may change it.
    fresh_pair = there.pair()
    fresh = login(fresh_pair, ALICE, NEW)
    _change_password(fresh_pair, fresh, b"and yet another long password")
