"""Review of issue 16, storage: each account's credentials version (``credentials_changed_us``),
which every key-server instance checks on every request of a session. It changes with every
password change, guards the writes made for a session (the request's audit entry, a password
change, a deletion), and the migration that adds it upgrades a database of the previous schema
in place on SQLite and PostgreSQL, reading the changes made before from the audit log."""

from __future__ import annotations

import pytest

from keymgmt.adapters.storage import postgres as pg_backend
from keymgmt.adapters.storage import sqlite as sqlite_backend
from keymgmt.adapters.storage.base import Account, AuditQuery, AuditRecord, CredentialsChanged
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import Action, AuditType, Outcome

from ..support.migrations import postgres_at, sqlite_at
from ..support.pg import schema_fixture
from ..support.sqltrace import trace_statements
from .test_storage_backends import make_storage, storage  # noqa: F401 (fixtures)

ALICE = Account(b"alice", b"A" * 16, b"r" * 192, b"k" * 60, 1)
BOB = Account(b"bob", b"B" * 16, b"s" * 192, b"l" * 60, 2)
CAROL = Account(b"carol", b"C" * 16, b"t" * 192, b"m" * 60, 3)


#: The password change of the release before the credentials version (its
#: ``Statements.replace_credentials``), as an instance of it still running during a rolling
#: upgrade writes it: the record and the wrapped key, and nothing else.
PREVIOUS_RELEASE_CHANGE = (
    "UPDATE accounts SET registration_record = ?, encrypted_storage_key = ? WHERE user_id = ?"
)


def previous_release_change(db, user_id: bytes, record: bytes, key: bytes = b"w" * 60) -> None:
    """Write a password change into the storage ``db``'s database as the release before does."""
    with db.transaction() as tx:
        if isinstance(db, pg_backend.PostgresStorage):
            tx._conn.execute(PREVIOUS_RELEASE_CHANGE.replace("?", "%s"), (record, key, user_id))
        else:
            tx._db.execute(PREVIOUS_RELEASE_CHANGE, (record, key, user_id))


def test_a_record_replaced_without_its_version_moves_the_version_on(storage):  # noqa: F811
    """Review of issue 16 (rolling upgrades): an instance of the release before replaces the
    record without the version; the database moves it on (one more each time), and only then:
    the version a change of this release writes stays as written."""
    with storage.transaction() as tx:
        assert tx.insert_account(ALICE)
        assert tx.insert_account(BOB)
    previous_release_change(storage, ALICE.user_id, b"n" * 192)
    previous_release_change(storage, ALICE.user_id, b"p" * 192)
    with storage.transaction() as tx:
        alice = tx.get_account(b"alice")
        assert (alice.registration_record, alice.credentials_changed) == (b"p" * 192, 2)
        assert tx.get_account(b"bob").credentials_changed == 0  # only the row changed
        assert tx.replace_credentials(ALICE.user_id, b"q" * 192, b"r" * 60, 5_000, credentials=2) == 5_000
        assert tx.get_account(b"alice").credentials_changed == 5_000
        tx.append_audit(AuditRecord(ALICE.user_id, Action.RETRIEVE, 6_000, Outcome.SUCCESS), 5_000)
    with storage.transaction() as tx:  # the rest of the row's writes leave it alone
        assert tx.get_account(b"alice").credentials_changed == 5_000


def _entries(db, user_id: bytes) -> list:
    with db.transaction() as tx:
        return tx.query_audit(user_id, AuditQuery(AuditType.ALL))[0]


def test_the_version_changes_with_every_change_and_guards_a_sessions_writes(storage):  # noqa: F811
    with storage.transaction() as tx:
        assert tx.insert_account(ALICE)
        tx.append_audit(AuditRecord(ALICE.user_id, Action.REGISTER, 5, Outcome.SUCCESS))
        assert tx.get_account(b"alice").credentials_changed == 0  # never changed
        assert tx.replace_credentials(ALICE.user_id, b"n" * 192, b"o" * 60, 1_000) == 1_000
        # A clock behind the last change (another instance's) still moves it on.
        assert tx.replace_credentials(ALICE.user_id, b"p" * 192, b"q" * 60, 500) == 1_001
        # Only while the credentials are still those a session logged in with:
        assert tx.replace_credentials(ALICE.user_id, b"x" * 192, b"y" * 60, 2_000, credentials=1_000) is None
        assert tx.get_account(b"alice").registration_record == b"p" * 192  # nothing written
        assert tx.replace_credentials(ALICE.user_id, b"u" * 192, b"v" * 60, 2_000, credentials=1_001) == 2_000
        assert tx.get_account_by_user_id(ALICE.user_id).credentials_changed == 2_000
        assert tx.replace_credentials(b"Z" * 16, b"n" * 192, b"o" * 60, 3_000) is None  # no account

    # A request's entry for a session of older credentials: refused, nothing written.
    with pytest.raises(CredentialsChanged) as refused, storage.transaction() as tx:
        tx.append_audit(AuditRecord(ALICE.user_id, Action.RETRIEVE, 3_000, Outcome.SUCCESS), 1_001)
    assert not refused.value.gone
    assert [e.action for e in _entries(storage, ALICE.user_id)] == [Action.REGISTER]
    with storage.transaction() as tx:  # the current credentials: written, and chained on
        tx.append_audit(AuditRecord(ALICE.user_id, Action.RETRIEVE, 3_000, Outcome.SUCCESS), 2_000)
        tx.append_audit(AuditRecord(ALICE.user_id, Action.LOGOUT, 3_001, Outcome.SUCCESS))
    assert [e.entry_id for e in _entries(storage, ALICE.user_id)] == [1, 2, 3]

    with pytest.raises(CredentialsChanged), storage.transaction() as tx:
        tx.delete_account(ALICE.user_id, reserved_until=10_000, credentials=1_001)
    with storage.transaction() as tx:
        assert tx.get_account(b"alice") is not None  # not deleted
        assert tx.delete_account(ALICE.user_id, reserved_until=10_000, credentials=2_000)
    with pytest.raises(CredentialsChanged) as refused, storage.transaction() as tx:
        tx.append_audit(AuditRecord(ALICE.user_id, Action.LIST_KEYS, 4_000, Outcome.SUCCESS), 2_000)
    assert refused.value.gone


# ------------------------------------------------------------ upgrade from the previous schema

#: (user, seq, action, time, outcome): Alice changed her password twice (the second change
#: is the newer), then failed a third change; Bob failed one; Carol never tried.
_OLD_ENTRIES = [
    (ALICE, 1, Action.REGISTER, 100, Outcome.SUCCESS),
    (ALICE, 2, Action.CHANGE_PASSWORD, 200, Outcome.SUCCESS),
    (ALICE, 3, Action.CHANGE_PASSWORD, 300, Outcome.SUCCESS),
    (ALICE, 4, Action.CHANGE_PASSWORD, 400, Outcome.FAILURE),
    (BOB, 1, Action.CHANGE_PASSWORD, 150, Outcome.FAILURE),
]


def _fill_previous_schema(execute, mark: str) -> None:
    for account in (ALICE, BOB, CAROL):
        execute(
            "INSERT INTO accounts (user_id, account_name, registration_record, encrypted_storage_key, "
            f"created_us) VALUES ({mark}, {mark}, {mark}, {mark}, {mark})",
            (
                account.user_id,
                account.account_name,
                account.registration_record,
                account.encrypted_storage_key,
                account.created,
            ),
        )
    for account, seq, action, ts, outcome in _OLD_ENTRIES:
        execute(
            "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, chain_hash) "
            f"VALUES ({mark}, {mark}, {mark}, {mark}, {mark}, {mark})",
            (account.user_id, seq, int(action), ts, int(outcome), bytes(32)),
        )


def _check_upgraded(upgraded) -> None:
    with upgraded.transaction() as tx:
        # The last successful change of each account, read from its log; 0 for none.
        assert tx.get_account(b"alice").credentials_changed == 300
        assert tx.get_account(b"bob").credentials_changed == 0
        assert tx.get_account_by_user_id(CAROL.user_id).credentials_changed == 0
        assert tx.get_account(b"carol") == CAROL  # the rest of the row as it was
        # and the new statements run on it
        assert tx.replace_credentials(ALICE.user_id, b"n" * 192, b"o" * 60, 250, credentials=300) == 301
        assert tx.replace_credentials(BOB.user_id, b"n" * 192, b"o" * 60, 1_000, credentials=300) is None
    # A change written as the release before writes it (record and key, no version) moves the
    # version on: the upgraded database has the trigger.
    previous_release_change(upgraded, BOB.user_id, b"p" * 192)
    with upgraded.transaction() as tx:
        assert tx.get_account(b"bob").credentials_changed == 1


def _previous(migrations: list[str]) -> list[str]:
    """The migrations of the previous schema: those before the one that adds the column (the
    upgrade runs it and the one after it, the trigger)."""
    (index,) = [n for n, m in enumerate(migrations) if "ADD COLUMN credentials_changed_us" in m]
    assert "accounts_credentials_moved" in migrations[index + 1]
    return migrations[:index]


def test_sqlite_upgrades_a_database_of_the_previous_schema(tmp_path, monkeypatch):
    path = tmp_path / "ks.db"
    with sqlite_at(path, _previous(sqlite_backend._MIGRATIONS), monkeypatch) as execute:
        _fill_previous_schema(execute, "?")
    upgraded = SQLiteStorage(path)
    try:
        assert upgraded.schema_version == len(sqlite_backend._MIGRATIONS)
        _check_upgraded(upgraded)
    finally:
        upgraded.close()


@pytest.fixture
def pg():
    fixture = schema_fixture()
    yield next(fixture)
    next(fixture, None)


def test_postgres_upgrades_a_database_of_the_previous_schema(pg, monkeypatch):
    conninfo, schema = pg
    with postgres_at(conninfo, schema, _previous(pg_backend._MIGRATIONS), monkeypatch) as execute:
        _fill_previous_schema(execute, "%s")
    upgraded = pg_backend.PostgresStorage(conninfo, schema=schema)
    try:
        assert upgraded.schema_version == len(pg_backend._MIGRATIONS)
        _check_upgraded(upgraded)
    finally:
        upgraded.close()


def _append(tx, n: int, credentials: int) -> None:
    tx.append_audit_fields(ALICE.user_id, Action.RETRIEVE, n, Outcome.SUCCESS, b"K" * 16, None, credentials)


def test_sqlite_checks_a_users_credentials_once_per_batch_and_never_past_a_change(tmp_path):
    """In a batch (it holds the write lock: no other process writes before its commit) the
    credentials check of a user's entries runs once; the next entries for the same version
    are plain INSERTs. A change of credentials or a deletion in the batch, a rollback, and
    the batch's end forget the check: another process's change between batches, or this
    batch's own, is still found."""
    db = SQLiteStorage(tmp_path / "ks.db")
    other = SQLiteStorage(tmp_path / "ks.db")  # another process, as far as SQLite can tell
    with db.transaction() as tx:
        assert tx.insert_account(ALICE)
    statements = trace_statements(db._db)
    with db.batch(), db.transaction(atomic=False) as tx:
        for n in (1, 2, 3):
            _append(tx, n, 0)
    checks = [s for s in statements if "credentials_changed_us" in s and s.startswith("INSERT")]
    assert len(checks) == 1 and len([s for s in statements if s.startswith("INSERT")]) == 3
    # Another process changes the password between two batches: the next batch checks again.
    with other.transaction() as tx:
        assert tx.replace_credentials(ALICE.user_id, b"n" * 192, b"w" * 60, 5_000) == 5_000
    with pytest.raises(CredentialsChanged), db.batch(), db.transaction(atomic=False) as tx:
        _append(tx, 4, 0)
    # This batch's own change: the check made before it does not hold after it.
    with pytest.raises(CredentialsChanged), db.batch(), db.transaction() as tx:
        _append(tx, 5, 5_000)
        assert tx.replace_credentials(ALICE.user_id, b"o" * 192, b"w" * 60, 6_000) == 6_000
        _append(tx, 6, 5_000)
    # (rolled back: the version is 5,000 again) A check made in a savepoint that is rolled back
    # (here against the version it wrote) is forgotten with it.
    with pytest.raises(CredentialsChanged), db.batch():
        with pytest.raises(RuntimeError), db.transaction() as tx:
            assert tx.replace_credentials(ALICE.user_id, b"o" * 192, b"w" * 60, 6_000) == 6_000
            _append(tx, 5, 6_000)
            raise RuntimeError("rolled back")
        assert db.checked_credentials == {}
        with db.transaction(atomic=False) as tx:
            _append(tx, 5, 6_000)
    with db.batch():
        with db.transaction(atomic=False) as tx:
            _append(tx, 5, 5_000)
            _append(tx, 6, 5_000)
        assert db.checked_credentials == {ALICE.user_id: 5_000}
    assert db.checked_credentials == {}
    with db.transaction() as tx:
        entries, _ = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))
    assert [e.timestamp for e in entries] == [1, 2, 3, 5, 6]
    # A deletion in the batch: the account is gone, as the check says.
    with pytest.raises(CredentialsChanged) as ended, db.batch(), db.transaction() as tx:
        _append(tx, 7, 5_000)
        assert tx.delete_account(ALICE.user_id, 0)
        _append(tx, 8, 5_000)
    assert ended.value.gone
    other.close()
    db.close()
