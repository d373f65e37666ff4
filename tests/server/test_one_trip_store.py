"""The key server's side of one-request stores (issue 14, item 4): a STORE_SECRET that asks for
the next key id gets it reserved and audited exactly as CREATE_KEY_ID would, and only when
the store itself succeeded."""

from __future__ import annotations

import os

import pytest

from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.storage.base import Account, AuditQuery
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    Action,
    AuditType,
    CreateKeyIdRequest,
    KeyIdResponse,
    Op,
    Outcome,
    SecretKind,
    SessionHandle,
    Status,
    StoredResponse,
    StoreSecretRequest,
    decode_response,
    joint_key_id,
)

USER = bytes(range(16))


@pytest.fixture
def world(tmp_path):
    storage = SQLiteStorage(tmp_path / "ks.db")
    with storage.transaction() as tx:
        tx.insert_account(Account(b"alice", USER, bytes(192), bytes(60), 0))
    yield storage
    storage.close()


def _create(keyserver: KeyServer, session: SessionHandle, kind: SecretKind) -> bytes:
    body = CreateKeyIdRequest(USER, kind, os.urandom(32)).encode()
    status, reply = decode_response(Op.CREATE_KEY_ID, keyserver.answer(session, USER, body))
    assert status is Status.OK and isinstance(reply, KeyIdResponse)
    return reply.key_id


def _store(keyserver, session, key_id, kind=SecretKind.GENERATED, next_nonce=None):
    request = StoreSecretRequest(
        USER, key_id, kind, os.urandom(60), None if next_nonce is None else kind, next_nonce
    )
    return decode_response(Op.STORE_SECRET, keyserver.answer(session, USER, request.encode()))


def _log(storage):
    with storage.transaction() as tx:
        entries, _ = tx.query_audit(USER, AuditQuery(AuditType.ALL))
    return [(e.action, e.outcome, e.key_id) for e in entries]


def test_a_store_asking_for_the_next_key_id_gets_one_reserved_and_audited(world):
    keyserver, session = KeyServer(world), SessionHandle()
    first = _create(keyserver, session, SecretKind.GENERATED)
    nonce = os.urandom(32)
    status, reply = _store(keyserver, session, first, next_nonce=nonce)
    assert status is Status.OK and isinstance(reply, StoredResponse)
    assert reply.next_key_id == joint_key_id(USER, nonce, reply.next_server_nonce)  # KEY-2
    # Reserved for this session and kind: the next store is one request.
    status, again = _store(keyserver, session, reply.next_key_id)
    assert status is Status.OK and again == StoredResponse()  # not asked: none given
    assert _log(world) == [
        (Action.CREATE_KEY_ID, Outcome.SUCCESS, first),
        (Action.GENERATE, Outcome.SUCCESS, first),
        (Action.CREATE_KEY_ID, Outcome.SUCCESS, reply.next_key_id),  # after the store's entry
        (Action.GENERATE, Outcome.SUCCESS, reply.next_key_id),
    ]


def test_the_next_key_id_is_reserved_for_its_session_and_kind_only(world):
    keyserver, session = KeyServer(world), SessionHandle()
    first = _create(keyserver, session, SecretKind.GENERATED)
    _, reply = _store(keyserver, session, first, next_nonce=os.urandom(32))
    assert isinstance(reply, StoredResponse) and reply.next_key_id is not None
    assert _store(keyserver, SessionHandle(), reply.next_key_id) == (Status.INVALID, None)
    assert _store(keyserver, session, reply.next_key_id, SecretKind.IMPORTED) == (Status.INVALID, None)


def test_a_refused_store_reserves_no_next_key_id(world):
    keyserver, session = KeyServer(world), SessionHandle()
    nonce = os.urandom(32)
    assert _store(keyserver, session, os.urandom(16), next_nonce=nonce) == (Status.INVALID, None)
    assert not keyserver._reserved.get(session)  # nothing reserved (and no entry kept, P4)
    assert [a for a, _, _ in _log(world)] == [Action.GENERATE]


def test_no_next_key_id_at_the_key_limit(world):
    keyserver, session = KeyServer(world, max_keys_per_user=2), SessionHandle()
    first = _create(keyserver, session, SecretKind.GENERATED)
    _, reply = _store(keyserver, session, first, next_nonce=os.urandom(32))
    assert isinstance(reply, StoredResponse) and reply.next_key_id is not None
    _, last = _store(keyserver, session, reply.next_key_id, next_nonce=os.urandom(32))
    assert last == StoredResponse()  # two keys stored: the limit
    body = CreateKeyIdRequest(USER, SecretKind.GENERATED, os.urandom(32)).encode()
    assert keyserver.answer(session, USER, body) == bytes([Status.LIMIT_REACHED])


def test_a_lost_reservation_is_refused_invalid(world):
    """Reservations are memory: a restart (a new KeyServer) or another instance forgets them."""
    keyserver, session = KeyServer(world), SessionHandle()
    first = _create(keyserver, session, SecretKind.GENERATED)
    _, reply = _store(keyserver, session, first, next_nonce=os.urandom(32))
    assert isinstance(reply, StoredResponse) and reply.next_key_id is not None
    restarted = KeyServer(world)
    assert _store(restarted, session, reply.next_key_id) == (Status.INVALID, None)


def test_key_ids_reserved_ahead_cannot_pass_the_key_limit(world):
    """The limit is checked at the store as well as at the reservation: three ids reserved
    while under a limit of two give two stored keys and one LIMIT_REACHED."""
    keyserver, session = KeyServer(world, max_keys_per_user=2), SessionHandle()
    ids = [_create(keyserver, session, SecretKind.GENERATED) for _ in range(3)]
    assert [_store(keyserver, session, key_id)[0] for key_id in ids] == [
        Status.OK,
        Status.OK,
        Status.LIMIT_REACHED,
    ]
    assert _log(world)[-1] == (Action.GENERATE, Outcome.FAILURE, ids[2])
