"""The request path writes as little as it must: what `_ONE_WRITE` promises is checked here."""

from __future__ import annotations

import os
import sqlite3

import anyio
import pytest

from keymgmt.adapters.server import app as app_module
from keymgmt.adapters.server.app import _ONE_WRITE, KeyServer
from keymgmt.adapters.storage.base import Account, AuditQuery, AuditRecord, CredentialsChanged, SecretRecord
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    Action,
    AuditType,
    ChangePasswordStartRequest,
    Context,
    Op,
    Outcome,
    RetrieveRequest,
    SecretKind,
    SecretResponse,
    SessionHandle,
    Status,
    audit_chain_hash,
    audit_genesis_hash,
    encode_response,
)
from keymgmt_proto._opaque import client_registration_start

from ..support.keyserver_world import key_server
from ..support.sqltrace import trace_statements

PW = b"correct horse battery staple"
WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


@pytest.mark.anyio
async def test_each_one_write_operation_writes_one_statement_without_a_savepoint(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(b"lean@example.org", PW)
        session = await client.login(b"lean@example.org", PW)
        key_id = await session.import_secret(b"\x02hi")
        client.local_store.delete(session.user_id, key_id)
        statements = trace_statements(world.storage._db)
        calls = {
            Op.RETRIEVE: lambda: session.retrieve(key_id, Context.NULL),
            Op.LIST_KEYS: session.list_keys,
            Op.AUDIT: lambda: session.audit(AuditType.ALL),
            Op.CHANGE_PASSWORD_START: lambda: session._call(
                ChangePasswordStartRequest(session.user_id, client_registration_start(b"new pw").message)
            ),
        }
        for op, call in calls.items():
            statements.clear()
            await call()
            writes = [s for s in statements if s.lstrip().upper().startswith(WRITES)]
            assert len(writes) == 1 and "INSERT INTO audit" in writes[0], (op, statements)
            assert not any(s.startswith(("SAVEPOINT", "RELEASE")) for s in statements), (op, statements)
        statements.clear()
        await session.generate()  # CREATE_KEY_ID (one write), then STORE_SECRET (a savepoint)
        savepoints = [s for s in statements if s.startswith("SAVEPOINT")]
        assert len(savepoints) == 1, statements
        statements.clear()
        await client.login(b"lean@example.org", PW)  # LOGIN_START: a read and one write, no savepoint
        savepoints = [s for s in statements if s.startswith("SAVEPOINT")]
        assert len(savepoints) == 1, statements  # LOGIN_FINISH's (the throttle record and the audit entry)
        statements.clear()
        await client.close_session(session.session_id)  # its end: the LOGOUT entry, no savepoint
        with anyio.fail_after(5):
            while not any("INSERT INTO audit" in s for s in statements):
                await anyio.sleep(0.01)
        writes = [s for s in statements if s.lstrip().upper().startswith(WRITES)]
        assert len(writes) == 1 and "INSERT INTO audit" in writes[0], statements
        assert not any(s.startswith(("SAVEPOINT", "RELEASE")) for s in statements), statements
        covered = set(calls) | {Op.CREATE_KEY_ID}
        assert covered >= _ONE_WRITE - {Op.RETRIEVE_STORAGE_KEY}  # (fetched once, at login)


@pytest.mark.anyio
async def test_a_one_request_store_moves_the_key_count_without_reading_it(tmp_path):
    """A store of a session holding its next key id, whose key count the storage remembers
    from the store before: the count's UPDATE, the secret's INSERT, the next key id's check
    and the audit INSERT (both entries), in a savepoint; no SELECT of the count (issue 14)."""
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(b"lean@example.org", PW)
        session = await client.login(b"lean@example.org", PW)
        await session.generate()  # CREATE_KEY_ID, then STORE_SECRET: the count read once
        statements = trace_statements(world.storage._db)
        await session.generate()
        batch = ("BEGIN", "COMMIT", "PRAGMA")
        kinds = [" ".join(s.split()[:3]) for s in statements if not s.startswith(batch)]
        assert kinds == [
            "SAVEPOINT op",
            "UPDATE accounts SET",
            "INSERT INTO secrets",
            "SELECT 1 FROM",
            "INSERT INTO audit",
            "RELEASE op",
        ], statements
        assert not any("key_count FROM" in s for s in statements), statements


def test_a_retrieve_binds_no_bytes_through_sqlite3s_adapters(tmp_path):
    """sqlite3 asks its adapter registry (and, failing that, the object and the protocol,
    raising and clearing an AttributeError each time) about every parameter that is not
    exactly an int, float, str or bytearray: the retrieve's read and its audit entry pass
    their BLOBs as bytearray. A spy adapter for bytes sees every bytes parameter."""
    storage = SQLiteStorage(tmp_path / "keys.db")
    user_id, key_id = os.urandom(16), os.urandom(16)
    with storage.transaction() as tx:
        tx.insert_account(Account(b"lean@example.org", user_id, b"record", bytes(60), 1))
        tx.insert_secret(SecretRecord(user_id, key_id, SecretKind.GENERATED, os.urandom(60), b"ad", 1))
        tx.append_audit(AuditRecord(user_id, Action.GENERATE, 1, Outcome.SUCCESS, key_id))
    seen: list[bytes] = []

    def spy(value: bytes) -> bytes:
        seen.append(value)
        return value

    # (Registering an adapter for a base type leaves sqlite3 asking about every parameter of
    # this process afterwards: slower, not different.)
    sqlite3.register_adapter(bytes, spy)
    try:
        with storage.batch(), storage.transaction(atomic=False) as tx:
            secret = tx.get_secret(user_id, key_id)
            record = AuditRecord(user_id, Action.RETRIEVE, 2, Outcome.SUCCESS, key_id, Context.NULL)
            tx.append_audit(record, credentials=0)
    finally:
        del sqlite3.adapters[(bytes, sqlite3.PrepareProtocol)]
    assert secret is not None and secret.key_id == key_id and type(secret.ciphertext) is bytes
    assert seen == []
    with storage.transaction() as tx:
        (last,) = tx.query_audit(user_id, AuditQuery(AuditType.ALL, cursor=1))[0]
    written = (last.entry_id, last.action, last.key_id, last.context)
    assert written == (2, Action.RETRIEVE, key_id, Context.NULL)
    storage.close()


def _with_a_secret(directory):
    directory.mkdir(exist_ok=True)
    storage = SQLiteStorage(directory / "ks.db")
    user_id, key_id = bytes(range(16)), os.urandom(16)
    with storage.transaction() as tx:
        tx.insert_account(Account(b"lean@example.org", user_id, bytes(192), bytes(60)))
        tx.insert_secret(
            SecretRecord(user_id, key_id, SecretKind.GENERATED, os.urandom(60), os.urandom(32), 1)
        )
    return storage, KeyServer(storage), user_id, key_id


def _entries(storage, user_id):
    with storage.transaction() as tx:
        entries, _ = tx.query_audit(user_id, AuditQuery(AuditType.ALL))
    return entries


def test_a_found_retrieve_is_answered_without_the_general_path(tmp_path, monkeypatch):
    """RETRIEVE of a secret that is there (the commonest request) builds no request, record or
    response object (decode_request is not called), and answers and audits exactly as the
    general path does, chain hash included."""
    answers, logs = [], []
    for lean in (False, True):
        storage, server, user_id, key_id = _with_a_secret(tmp_path / ("lean" if lean else "general"))
        if lean:
            monkeypatch.setattr(app_module, "decode_request", _not_called)
        else:
            monkeypatch.setattr(app_module, "retrieve_fields", lambda body: None)
        body = RetrieveRequest(user_id, key_id, Context.LOCAL_ONLY).encode()
        with storage.batch():
            answers.append([server.answer(SessionHandle(), user_id, body, credentials=0) for _ in range(3)])
        logs.append(
            [(e.entry_id, e.action, e.outcome, e.key_id, e.context) for e in _entries(storage, user_id)]
        )
        with storage.transaction() as tx:
            secret = tx.get_secret(user_id, key_id)
        assert secret is not None
        expected = encode_response(
            Status.OK, SecretResponse(secret.kind, secret.ciphertext, secret.associated_data)
        )
        assert answers[-1] == [expected] * 3
        assert logs[-1] == [
            (n, Action.RETRIEVE, Outcome.SUCCESS, key_id, Context.LOCAL_ONLY) for n in (1, 2, 3)
        ]
        entries = _entries(storage, user_id)
        previous = audit_genesis_hash()
        for entry in entries:
            assert entry.chain_hash == audit_chain_hash(user_id, previous, entry)
            previous = entry.chain_hash
        storage.close()
        monkeypatch.undo()


def _not_called(body: bytes) -> None:
    raise AssertionError("the general path")


def test_a_retrieve_the_lean_path_does_not_answer_is_refused_as_before(tmp_path):
    """No such secret, another user's id, or a session whose credentials changed: refused (or
    ended) by the general path, with its failure entry."""
    storage, server, user_id, key_id = _with_a_secret(tmp_path)
    missing = RetrieveRequest(user_id, os.urandom(16), Context.NULL).encode()
    assert server.answer(SessionHandle(), user_id, missing, credentials=0) == bytes([Status.NOT_FOUND])
    other = RetrieveRequest(bytes(16), key_id, Context.NULL).encode()
    assert server.answer(SessionHandle(), user_id, other, credentials=0) == bytes([Status.WRONG_USER])
    found = RetrieveRequest(user_id, key_id, Context.NULL).encode()
    with pytest.raises(CredentialsChanged):
        server.answer(SessionHandle(), user_id, found, credentials=1)
    log = [(e.action, e.outcome) for e in _entries(storage, user_id)]
    assert log == [(Action.RETRIEVE, Outcome.FAILURE)] * 3
    storage.close()
