"""Review: deleting an account deleted its whole audit log in the deletion's transaction. On
SQLite, one writer: a log of a million entries held the write lock for about 4 s, and every
other user's request (each writes an audit entry) waited; logs are cheap to grow. Now the
deletion queues the log (the table ``audit_purges``, in the deletion's transaction) and
``purge_audit`` deletes it at most a chunk per transaction: other users' writes commit
between the chunks, a crash before the log is gone resumes the purge, nothing is appended to
a queued log, and its user id stays taken until it is gone. The migration that brings the
queue (SQLite 12, PostgreSQL 8) upgrades a database of the schema before in place."""

from __future__ import annotations

import pytest

from keymgmt.adapters.server.app import AUDIT_PURGE_CHUNK, KeyServer
from keymgmt.adapters.storage import postgres as pg_backend
from keymgmt.adapters.storage import sqlite as sqlite_backend
from keymgmt.adapters.storage.base import Account, AuditQuery, AuditRecord, StorageError
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import Action, AuditEntry, AuditType, Outcome, audit_chain_hash, audit_genesis_hash

from ..support.migrations import Execute, postgres_at, sqlite_at
from ..support.pg import schema_fixture
from .test_storage_backends import make_storage  # noqa: F401 (fixture)

ALICE = Account(b"alice", b"A" * 16, b"r" * 192, b"k" * 60, 1)
BOB = Account(b"bob", b"B" * 16, b"s" * 192, b"l" * 60, 2)
BIG = 200_000


def _run(tx, statement: str, params: tuple = ()) -> list:
    """One statement in ``tx`` of either backend (written with ``?``); its rows."""
    if hasattr(tx, "_conn"):  # PostgreSQL
        cursor = tx._conn.execute(statement.replace("?", "%s"), params)
        return list(cursor.fetchall()) if cursor.description is not None else []
    return tx._db.execute(statement, params).fetchall()


def _entries(db, user_id: bytes) -> int:
    with db.transaction() as tx:
        return int(_run(tx, "SELECT count(*) FROM audit WHERE user_id = ?", (user_id,))[0][0])


def _queued(db) -> list[bytes]:
    with db.transaction() as tx:
        return sorted(bytes(row[0]) for row in _run(tx, "SELECT user_id FROM audit_purges"))


def _fill_log(db, user_id: bytes, count: int) -> None:
    """``count`` more entries in the user's log, written straight into the tables (fast)."""
    with db.transaction() as tx:
        first = int(
            _run(tx, "SELECT coalesce(max(seq), 0) + 1 FROM audit WHERE user_id = ?", (user_id,))[0][0]
        )
        if hasattr(tx, "_conn"):
            _run(
                tx,
                "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, event_count, chain_hash) "
                "SELECT ?, i, 6, i, 0, 1, decode(repeat('00', 32), 'hex') "
                "FROM generate_series(?::bigint, ?::bigint) AS i",
                (user_id, first, first + count - 1),
            )
            _run(tx, "UPDATE accounts SET audit_seq = ? WHERE user_id = ?", (first + count - 1, user_id))
        else:
            _run(
                tx,
                "WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, event_count, chain_hash) "
                "SELECT ?, i, 6, i, 0, 1, zeroblob(32) FROM n",
                (first, first + count - 1, user_id),
            )
    if isinstance(db, SQLiteStorage):
        db.forget_audit_numbers()


def _two_accounts(db) -> None:
    with db.transaction() as tx:
        assert tx.insert_account(ALICE) and tx.insert_account(BOB)
        tx.append_audit(AuditRecord(ALICE.user_id, Action.REGISTER, 1, Outcome.SUCCESS))
        tx.append_audit(AuditRecord(BOB.user_id, Action.REGISTER, 2, Outcome.SUCCESS))


def test_a_deletion_leaves_a_big_log_to_chunks_each_committed_on_its_own(make_storage):  # noqa: F811
    """The attack, bounded: an account with a log of 200,000 entries is deleted. Its own
    transaction deletes no more than a chunk of the log (none); the purge then deletes at most
    a chunk per transaction (SQLite: a COMMIT between any two chunks), another user's writes
    commit between the chunks, and the log is gone at the end."""
    db, other = make_storage(), make_storage()  # other: another user's writer (another process)
    _two_accounts(db)
    _fill_log(db, ALICE.user_id, BIG)
    assert _entries(db, ALICE.user_id) == BIG + 1
    statements: list[str] = []
    sqlite = isinstance(db, SQLiteStorage)
    if sqlite:
        db._db.set_trace_callback(statements.append)
    with db.transaction() as tx:
        assert tx.delete_account(ALICE.user_id, reserved_until=1_000)
    assert _entries(db, ALICE.user_id) >= BIG + 1 - AUDIT_PURGE_CHUNK  # (it deleted none)
    assert _queued(db) == [ALICE.user_id]
    with db.transaction() as tx:
        assert tx.get_account(b"alice") is None and tx.count_keys(ALICE.user_id) == 0

    keyserver = KeyServer(db)
    chunks: list[int] = []
    while (deleted := keyserver.purge_audit_logs()) is not None:
        chunks.append(deleted)
        assert _entries(db, ALICE.user_id) == BIG + 1 - sum(chunks)  # committed, seen from outside
        with other.transaction() as tx:  # another user's write, between two chunks
            tx.append_audit(AuditRecord(BOB.user_id, Action.RETRIEVE, 10 + len(chunks), Outcome.SUCCESS))
        assert len(chunks) <= BIG // AUDIT_PURGE_CHUNK + 2
    assert max(chunks) <= AUDIT_PURGE_CHUNK and sum(chunks) == BIG + 1
    assert len(chunks) >= (BIG + 1) // AUDIT_PURGE_CHUNK
    if sqlite:
        db._db.set_trace_callback(None)
        # Every chunk's DELETE is committed before the next one runs.
        for between in " ".join(statements).split("COMMIT"):
            assert between.count("DELETE FROM audit WHERE") <= 1
    assert _entries(db, ALICE.user_id) == 0 and _queued(db) == []
    with db.transaction() as tx:
        assert not tx.user_id_exists(ALICE.user_id)
        assert tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))[0] == []
        bob = tx.query_audit(BOB.user_id, AuditQuery(AuditType.ALL, limit=1_000))[0]
    assert [e.entry_id for e in bob] == list(range(1, len(chunks) + 2))  # Bob's log whole


def test_a_queued_log_survives_a_restart_and_stays_closed_until_purged(make_storage):  # noqa: F811
    """Crash safety: the storage closes after the deletion and before any purge; opened again,
    the queue still holds the log, and the purge finishes it. Meanwhile nothing is appended to
    it, and its user id is not free for a new account."""
    db = make_storage()
    _two_accounts(db)
    with db.transaction() as tx:
        tx.append_audits(
            [AuditRecord(ALICE.user_id, Action.RETRIEVE, n, Outcome.SUCCESS) for n in (3, 4, 5, 6)]
        )
        assert tx.delete_account(ALICE.user_id, reserved_until=1_000)
    db.close()

    db = make_storage()
    assert _queued(db) == [ALICE.user_id] and _entries(db, ALICE.user_id) == 5
    late = AuditRecord(ALICE.user_id, Action.LOGOUT, 7, Outcome.SUCCESS)  # a session ending elsewhere
    with pytest.raises(StorageError), db.transaction() as tx:  # refused: no account
        tx.append_audit(late)
    with pytest.raises(StorageError), db.transaction() as tx:
        tx.append_audits([late, late])
    left = _entries(db, ALICE.user_id)
    with db.transaction() as tx:
        assert tx.user_id_exists(ALICE.user_id)  # a registration draws another id
        assert not tx.insert_account(Account(b"carol", ALICE.user_id, b"t" * 192, b"m" * 60, 3))
    chunks = []
    while True:
        with db.transaction() as tx:
            deleted = tx.purge_audit(2)
        if deleted is None:
            break
        chunks.append(deleted)
    assert chunks == [2, 2, 1] and left == 5
    assert _queued(db) == [] and _entries(db, ALICE.user_id) == 0 and _entries(db, BOB.user_id) == 1
    with db.transaction() as tx:
        assert not tx.user_id_exists(ALICE.user_id)
    with pytest.raises(StorageError), db.transaction() as tx:  # the log is gone: refused
        tx.append_audit(late)


def test_a_rolled_back_deletion_queues_nothing(make_storage):  # noqa: F811
    db = make_storage()
    _two_accounts(db)
    with pytest.raises(RuntimeError), db.transaction() as tx:
        assert tx.delete_account(ALICE.user_id, reserved_until=1_000)
        raise RuntimeError("crash before the commit")
    assert _queued(db) == [] and _entries(db, ALICE.user_id) == 1
    with db.transaction() as tx:
        assert tx.purge_audit(AUDIT_PURGE_CHUNK) is None


# ------------------------------------------------------------------ migration


def _fill_previous(execute: Execute, mark: str) -> None:
    """Alice (three entries), Bob (one), as the schema before the queue holds them (written
    straight into the tables: this release's statements name the queue)."""
    for account in (ALICE, BOB):
        execute(
            "INSERT INTO accounts (user_id, account_name, registration_record, encrypted_storage_key, "
            "created_us) VALUES (?, ?, ?, ?, ?)".replace("?", mark),
            (
                account.user_id,
                account.account_name,
                account.registration_record,
                account.encrypted_storage_key,
                1,
            ),
        )
    previous = audit_genesis_hash()
    for user, seq, ts in (
        (ALICE.user_id, 1, 1),
        (ALICE.user_id, 2, 2),
        (ALICE.user_id, 3, 3),
        (BOB.user_id, 1, 4),
    ):
        if seq == 1:
            previous = audit_genesis_hash()
        entry = AuditEntry(seq, Action.RETRIEVE, ts, Outcome.SUCCESS)
        previous = audit_chain_hash(user, previous, entry)
        execute(
            "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, event_count, chain_hash) "
            "VALUES (?, ?, ?, ?, ?, 1, ?)".replace("?", mark),
            (user, seq, int(Action.RETRIEVE), ts, int(Outcome.SUCCESS), previous),
        )
    if mark == "%s":  # PostgreSQL numbers entries from the account row
        execute("UPDATE accounts SET audit_seq = 3 WHERE user_id = %s", (ALICE.user_id,))
        execute("UPDATE accounts SET audit_seq = 1 WHERE user_id = %s", (BOB.user_id,))


def _check_upgraded(db) -> None:
    """The entries are all there, chained as before; a deletion now leaves the log to the
    purge, and an entry for a user who has no account is still refused."""
    with db.transaction() as tx:
        before = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))[0]
    assert [e.timestamp for e in before] == [1, 2, 3] and all(e.chain_hash for e in before)
    with db.transaction() as tx:
        tx.append_audit(AuditRecord(ALICE.user_id, Action.RETRIEVE, 5, Outcome.SUCCESS))
        assert tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))[0][:3] == before
        assert tx.delete_account(ALICE.user_id, reserved_until=1_000)
    assert _entries(db, ALICE.user_id) == 4 and ALICE.user_id in _queued(db)
    keyserver = KeyServer(db)
    while keyserver.purge_audit_logs() is not None:
        pass
    assert _entries(db, ALICE.user_id) == 0 and _entries(db, BOB.user_id) == 1 and _queued(db) == []
    with pytest.raises(StorageError), db.transaction() as tx:
        tx.append_audit(AuditRecord(ALICE.user_id, Action.LOGOUT, 6, Outcome.SUCCESS))


def test_sqlite_upgrades_a_database_of_schema_11(tmp_path, monkeypatch):
    path = tmp_path / "ks.db"
    with sqlite_at(path, sqlite_backend._MIGRATIONS[:11], monkeypatch) as execute:
        _fill_previous(execute, "?")
        # Entries no account owns (written with the foreign key off): queued by the migration.
        execute(
            "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome) VALUES (?, 1, 1, 1, 0)",
            (b"O" * 16,),
        )
    upgraded = SQLiteStorage(path)
    try:
        assert upgraded.schema_version == len(sqlite_backend._MIGRATIONS) == 13
        assert _queued(upgraded) == [b"O" * 16]
        assert upgraded._db.execute("PRAGMA foreign_key_list(audit)").fetchall() == []  # no cascade
        _check_upgraded(upgraded)
        assert _entries(upgraded, b"O" * 16) == 0
    finally:
        upgraded.close()


@pytest.fixture
def pg():
    fixture = schema_fixture()
    yield next(fixture)
    next(fixture, None)


def test_postgres_upgrades_a_database_of_schema_7(pg, monkeypatch):
    conninfo, schema = pg
    with postgres_at(conninfo, schema, pg_backend._MIGRATIONS[:7], monkeypatch) as execute:
        _fill_previous(execute, "%s")
    upgraded = pg_backend.PostgresStorage(conninfo, schema=schema)
    try:
        assert upgraded.schema_version == len(pg_backend._MIGRATIONS) == 8
        assert _queued(upgraded) == []
        with upgraded.transaction() as tx:
            keys = _run(
                tx, "SELECT count(*) FROM pg_constraint WHERE conrelid = 'audit'::regclass AND contype = 'f'"
            )
        assert keys == [(0,)]
        _check_upgraded(upgraded)
    finally:
        upgraded.close()
