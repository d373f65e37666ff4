"""Storage for password change and account deletion (issue 16), on SQLite and PostgreSQL:
credentials replaced together, deletion of everything of an account in one transaction,
reserved names, stored sessions dropped by user, and the upgrade of a database made by the
previous schema."""

from __future__ import annotations

import sqlite3

import pytest

from keymgmt.adapters.storage.base import Account, AuditQuery, AuditRecord, SecretRecord
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import Action, AuditType, Outcome, SecretKind

from ..support.pg import schema_fixture
from .test_storage_backends import make_storage, storage  # noqa: F401 (fixtures)

ALICE = Account(b"alice", b"A" * 16, b"r" * 192, b"k" * 60, 1)
BOB = Account(b"bob", b"B" * 16, b"s" * 192, b"l" * 60, 2)


def _secret(user_id: bytes, n: int) -> SecretRecord:
    return SecretRecord(user_id, bytes([n]) * 16, SecretKind.GENERATED, bytes(60), b"ad", 0)


def _populate(db) -> None:
    with db.transaction() as tx:
        for account, n in ((ALICE, 1), (BOB, 2)):
            assert tx.insert_account(account)
            assert tx.insert_secret(_secret(account.user_id, n))
            tx.append_audit(AuditRecord(account.user_id, Action.REGISTER, 5, Outcome.SUCCESS))
            tx.start_login(account.account_name, 10, 5, 1000)
            tx.finish_login(account.account_name, 11, succeeded=False)


def test_credentials_are_replaced_together(storage):  # noqa: F811
    _populate(storage)
    with storage.transaction() as tx:
        assert tx.replace_credentials(ALICE.user_id, b"n" * 192, b"m" * 60)
        assert not tx.replace_credentials(b"C" * 16, b"n" * 192, b"m" * 60)
    with storage.transaction() as tx:
        alice = tx.get_account(b"alice")
        assert (alice.registration_record, alice.encrypted_storage_key) == (b"n" * 192, b"m" * 60)
        assert alice.user_id == ALICE.user_id
        assert tx.get_account(b"bob") == BOB
        # The log and the throttling record carry over.
        assert len(tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))[0]) == 1
        assert tx.get_login_record(b"alice") is not None


def test_a_failed_transaction_keeps_the_old_credentials(storage):  # noqa: F811
    _populate(storage)
    with pytest.raises(RuntimeError), storage.transaction() as tx:
        tx.replace_credentials(ALICE.user_id, b"n" * 192, b"m" * 60)
        raise RuntimeError("crash before the commit")
    with storage.transaction() as tx:
        assert tx.get_account(b"alice") == ALICE


def test_deletion_removes_everything_of_the_account_and_reserves_the_name(storage):  # noqa: F811
    _populate(storage)
    with storage.transaction() as tx:
        assert tx.delete_account(ALICE.user_id, reserved_until=1_000)
        assert not tx.delete_account(ALICE.user_id, reserved_until=1_000)
    with storage.transaction() as tx:
        assert tx.get_account(b"alice") is None
        assert tx.get_secret(ALICE.user_id, bytes([1]) * 16) is None and tx.count_keys(ALICE.user_id) == 0
        assert tx.get_login_record(b"alice") is None
        # The log waits for purge_audit (tests/storage/test_audit_purge.py); till then the
        # user id is not free for a new account.
        assert tx.user_id_exists(ALICE.user_id)
        assert tx.purge_audit(1_000) == 1 and tx.purge_audit(1_000) is None
        assert tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))[0] == []
        assert not tx.user_id_exists(ALICE.user_id)
        assert tx.name_reserved(b"alice", 999) and not tx.name_reserved(b"alice", 1_000)
        assert not tx.name_reserved(b"bob", 0)
        # Bob is untouched.
        assert tx.get_account(b"bob") == BOB and tx.count_keys(BOB.user_id) == 1
        assert tx.get_login_record(b"bob") is not None
        assert len(tx.query_audit(BOB.user_id, AuditQuery(AuditType.ALL))[0]) == 1
        assert tx.forget_reserved_names(1_000) == 1
        assert not tx.name_reserved(b"alice", 0)


def test_a_failed_deletion_leaves_everything(storage):  # noqa: F811
    _populate(storage)
    with pytest.raises(RuntimeError), storage.transaction() as tx:
        tx.delete_account(ALICE.user_id, reserved_until=1_000)
        raise RuntimeError("crash before the commit")
    with storage.transaction() as tx:
        assert tx.get_account(b"alice") == ALICE and tx.count_keys(ALICE.user_id) == 1
        assert tx.get_login_record(b"alice") is not None and not tx.name_reserved(b"alice", 0)
        assert len(tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))[0]) == 1


def test_stored_sessions_are_dropped_by_user(storage):  # noqa: F811
    store = storage.session_store
    store.save(b"h1" * 8, b"sealed 1", 2e9, ALICE.user_id)
    store.save(b"h2" * 8, b"sealed 2", 2e9, ALICE.user_id)
    store.save(b"h3" * 8, b"sealed 3", 2e9, BOB.user_id)
    store.save(b"h4" * 8, b"sealed 4", 2e9)  # (a session saved by the previous version: no user)
    assert store.drop_user(ALICE.user_id) == 2
    assert store.claim(b"h1" * 8) is None and store.claim(b"h2" * 8) is None
    assert store.claim(b"h3" * 8) == b"sealed 3" and store.claim(b"h4" * 8) == b"sealed 4"


# ------------------------------------------------------------ upgrade from the previous schema


def _previous_sqlite(tmp_path):
    """An SQLite database as the release before issues 14 and 16 (schema 4) left it."""
    from keymgmt.adapters.storage.sqlite import _MIGRATIONS

    path = tmp_path / "previous.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for migration in _MIGRATIONS[:4]:
        db.executescript(migration)
    db.execute("INSERT INTO schema_version (version) VALUES (4)")
    db.execute(
        "INSERT INTO accounts VALUES (?, ?, ?, ?, ?)", (ALICE.user_id, b"alice", bytes(192), bytes(60), 1)
    )
    db.execute(
        "INSERT INTO secrets VALUES (?, ?, 1, ?, ?, 0)", (bytes([1]) * 16, ALICE.user_id, bytes(60), b"ad")
    )
    db.execute(
        "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome) VALUES (?, 1, ?, 5, 0)",
        (ALICE.user_id, int(Action.REGISTER)),
    )
    db.execute("INSERT INTO detached_sessions VALUES (?, ?, ?)", (b"h" * 16, b"sealed", 2e9))
    db.close()
    path.chmod(0o600)
    return lambda: SQLiteStorage(path), None


def _previous_postgres():
    """A PostgreSQL schema as the release before issues 14 and 16 (schema 2) left it."""
    import psycopg
    from psycopg import sql

    from keymgmt.adapters.storage.postgres import _MIGRATIONS, PostgresStorage

    fixture = schema_fixture()
    conninfo, schema = next(fixture)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for migration in _MIGRATIONS[:2]:
            for statement in migration.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (1), (2)")
        conn.execute(
            "INSERT INTO accounts VALUES (%s, %s, %s, %s, 1, 1)",
            (ALICE.user_id, b"alice", bytes(192), bytes(60)),
        )
        conn.execute(
            "INSERT INTO secrets VALUES (%s, %s, 1, %s, %s, 0)",
            (bytes([1]) * 16, ALICE.user_id, bytes(60), b"ad"),
        )
        conn.execute(
            "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome) VALUES (%s, 1, %s, 5, 0)",
            (ALICE.user_id, int(Action.REGISTER)),
        )
        conn.execute("INSERT INTO detached_sessions VALUES (%s, %s, %s)", (b"h" * 16, b"sealed", 2e9))
    return (lambda: PostgresStorage(conninfo, schema=schema)), fixture


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_database_of_the_previous_schema_upgrades_in_place_for_accounts(tmp_path, backend):
    if backend == "sqlite":
        open_storage, fixture = _previous_sqlite(tmp_path)
    else:
        open_storage, fixture = _previous_postgres()
    db = open_storage()
    try:
        from keymgmt.adapters.storage import postgres, sqlite

        latest = len((sqlite if backend == "sqlite" else postgres)._MIGRATIONS)
        assert db.schema_version == latest
        # What the previous schema held is all there, and the new operations work on it.
        assert db.session_store.claim(b"h" * 16) == b"sealed"
        with db.transaction() as tx:
            assert tx.get_account(b"alice").user_id == ALICE.user_id
            assert not tx.name_reserved(b"alice", 0)
            assert tx.replace_credentials(ALICE.user_id, b"n" * 192, b"m" * 60)
        db.session_store.save(b"g" * 16, b"sealed", 2e9, ALICE.user_id)
        with db.transaction() as tx:
            assert tx.delete_account(ALICE.user_id, reserved_until=1_000)
            assert tx.name_reserved(b"alice", 0) and tx.count_keys(ALICE.user_id) == 0
        assert db.session_store.drop_user(ALICE.user_id) == 1
        db.close()
        db = open_storage()  # opening again migrates nothing more
        assert db.schema_version == latest
    finally:
        db.close()
        if fixture is not None:
            next(fixture, None)
