"""Storage behaviours that no other test pinned down (found by the mutation run): exact
records, page boundaries, throttling arithmetic, session cleanup, and what happens when
the database itself fails (always StorageError, nothing half-written, store still usable).
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import uuid
from dataclasses import replace

import pytest

from keymgmt.adapters.files import BUSY_TIMEOUT_MS
from keymgmt.adapters.storage.base import Account, AuditQuery, AuditRecord, SecretRecord, StorageError
from keymgmt.adapters.storage.sql import Statements
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    Action,
    AuditEntry,
    AuditType,
    Context,
    KeyInfo,
    Outcome,
    SecretKind,
    audit_chain_hash,
    audit_genesis_hash,
)

from ..support.pg import drop_schema, fresh_schema, postgres_or_skip, schema_fixture

ALICE = Account(b"alice", b"A" * 16, b"r" * 192, b"e" * 60, 7)
BOB = Account(b"bob", b"B" * 16, b"s" * 192, b"f" * 60, 8)
DAY = 86_400


def _secret(n: int, user: Account = ALICE, created: int = 0) -> SecretRecord:
    return SecretRecord(
        user.user_id,
        n.to_bytes(16, "big"),
        SecretKind.IMPORTED,
        b"ct" + bytes([n]),
        b"ad" + bytes([n]),
        created,
    )


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def pg():
    """(conninfo, schema) of a fresh schema on the test server, dropped afterwards."""
    fixture = schema_fixture()
    yield next(fixture)
    next(fixture, None)


@pytest.fixture
def open_pg(pg):
    """A factory for PostgresStorage on the fresh schema; every one is closed afterwards."""
    from keymgmt.adapters.storage.postgres import PostgresStorage

    opened = []

    def make(conninfo: str | None = None, **kwargs):
        opened.append(PostgresStorage(conninfo or pg[0], schema=pg[1], **kwargs))
        return opened[-1]

    yield make
    for storage in opened:
        storage.close()


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        store = SQLiteStorage(tmp_path / "ks.db")
        yield store
        store.close()
    else:
        yield request.getfixturevalue("open_pg")()


def _pg_raw(conninfo: str, schema: str):
    """A separate autocommit connection to the schema (another instance, or the operator)."""
    import psycopg
    from psycopg import sql

    conn = psycopg.connect(conninfo, autocommit=True)
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    return conn


# --- records and paging, both backends ----------------------------------------------------


def test_get_secret_returns_the_stored_record_field_for_field(storage):
    """A stored secret comes back exactly: user, key id, kind, ciphertext, associated data, time."""
    record = _secret(3, created=1234)
    with storage.transaction() as tx:
        tx.insert_account(ALICE)
        tx.insert_secret(record)
        assert tx.get_secret(ALICE.user_id, record.key_id) == record


def test_taken_names_and_key_ids_are_reported_as_false(storage):
    """insert_account / insert_secret answer a real bool: False (not None) when taken."""
    with storage.transaction() as tx:
        assert tx.insert_account(ALICE) is True
        assert tx.insert_account(ALICE) is False
        assert tx.insert_secret(_secret(1)) is True
        assert tx.insert_secret(_secret(1)) is False


def test_list_keys_a_full_last_page_has_no_next_cursor(storage):
    """A page that ends exactly at the last key says there is no next page."""
    with storage.transaction() as tx:
        tx.insert_account(ALICE)
        for n in range(3):
            tx.insert_secret(_secret(n, created=10 + n))
        everything = [KeyInfo(n.to_bytes(16, "big"), SecretKind.IMPORTED, 10 + n) for n in range(3)]
        assert tx.list_keys(ALICE.user_id, 0, 3) == (everything, 0)
        assert tx.list_keys(ALICE.user_id, 0, 2) == (everything[:2], 2)
        assert tx.list_keys(ALICE.user_id, 2, 1) == (everything[2:], 0)


def test_query_audit_returns_entries_field_for_field_and_stops_at_a_full_last_page(storage):
    """Audit entries come back exactly as written, and a page ending at the last one has no cursor."""
    with storage.transaction() as tx:
        tx.insert_account(ALICE)
        tx.append_audit(AuditRecord(ALICE.user_id, Action.GENERATE, 1_000, Outcome.SUCCESS, b"k" * 16))
        tx.append_audit(
            AuditRecord(ALICE.user_id, Action.LOGIN, 2_000, Outcome.FAILURE, None, Context.EXPORT, 4)
        )
        tx.append_audit(
            AuditRecord(ALICE.user_id, Action.RETRIEVE, 3_000, Outcome.SUCCESS, b"j" * 16, Context.LOCAL_ONLY)
        )
        expected = [
            AuditEntry(1, Action.GENERATE, 1_000, Outcome.SUCCESS, b"k" * 16, None, 1),
            AuditEntry(2, Action.LOGIN, 2_000, Outcome.FAILURE, None, Context.EXPORT, 4),
            AuditEntry(3, Action.RETRIEVE, 3_000, Outcome.SUCCESS, b"j" * 16, Context.LOCAL_ONLY, 1),
        ]
        # ... each with its audit-chain hash, computed by the backend from the one before
        previous = audit_genesis_hash()
        for n, entry in enumerate(expected):
            previous = audit_chain_hash(ALICE.user_id, previous, entry)
            expected[n] = replace(entry, chain_hash=previous)
        assert tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL, limit=3)) == (expected, 0)
        assert tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL, limit=2)) == (expected[:2], 2)
        assert tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL, cursor=2, limit=1)) == (
            expected[2:],
            0,
        )


def test_an_audit_entry_for_a_user_without_account_is_refused(storage):
    """Appending audit for an unknown user id raises StorageError and writes nothing."""
    with pytest.raises(StorageError), storage.transaction() as tx:
        tx.append_audit(AuditRecord(b"Z" * 16, Action.LOGIN, 1, Outcome.SUCCESS))


# --- login throttling arithmetic, both backends -------------------------------------------


def test_a_lock_of_one_microsecond_is_applied(storage):
    """finish_login locks the name for exactly what lock_for says, however short."""
    with storage.transaction() as tx:
        record = tx.finish_login(b"mallory", 5_000, False, lambda failures: 1)
        assert record.locked_until == 5_001
        assert tx.get_login_record(b"mallory").locked_until == 5_001


def test_evict_removes_exactly_count_records_across_tiers(storage):
    """Eviction takes the harmless record, then only as many others as still needed (oldest first)."""
    with storage.transaction() as tx:
        tx.finish_login(b"harmless", 50, False)  # one failure: below the threshold
        for i, name in enumerate([b"old", b"mid", b"new"]):
            for attempt in range(3):  # at the threshold, but not locked
                tx.finish_login(name, 100 + 10 * i + attempt, False)
        evicted = tx.evict_login_records(now=1_000, threshold=3, in_flight_for=10, count=2)
        assert [r.account_name for r in evicted] == [b"harmless", b"old"]
        assert tx.count_login_records() == 2
        assert tx.get_login_record(b"mid") is not None and tx.get_login_record(b"new") is not None


# --- detached-session cleanup ------------------------------------------------------------


def test_sqlite_session_store_forgets_sessions_expired_over_an_hour_ago_once_a_minute(tmp_path):
    """A save sweeps the rows of sessions whose deadline passed over an hour ago (as on
    PostgreSQL; they were kept until a week after the newest deadline, so the rows of a day of
    logins that ended with their connections piled up, and the sweep, which reads every row,
    ran on every save), at most once a minute; rows of live or recently expired sessions stay."""
    from keymgmt.adapters.storage import sqlite as sqlite_backend

    store = SQLiteStorage(tmp_path / "ks.db")
    now = [1_000_000.0]
    sessions = sqlite_backend._SQLiteSessionStore(store, clock=lambda: now[0])
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    sweeps = lambda: sum(1 for s in statements if s.startswith("DELETE FROM detached_sessions"))  # noqa: E731
    sessions.save(b"stale", b"state-1", now[0] - 3601)
    sessions.save(b"recent", b"state-2", now[0] - 3599)
    sessions.save(b"live", b"state-3", now[0] + 300)
    assert sweeps() == 1  # the first save swept; the next ones within the minute did not
    assert [row[0] for row in store._db.execute("SELECT handle FROM detached_sessions ORDER BY handle")] == [
        b"live",
        b"recent",
    ]  # (stale was saved before the sweep of its own save: gone)
    now[0] += 59
    sessions.save(b"old", b"state-4", now[0] - 7200)
    assert sweeps() == 1
    now[0] += 1
    sessions.save(b"next", b"state-5", now[0] + 300)
    assert sweeps() == 2
    assert sessions.claim(b"old") is None  # swept a minute after the previous sweep
    assert sessions.claim(b"recent") is None  # (now over an hour past its deadline too)
    assert sessions.claim(b"live") == b"state-3"
    assert sessions.claim(b"next") == b"state-5"
    store._db.set_trace_callback(None)
    store.close()


def test_postgres_session_store_forgets_long_expired_sessions(open_pg):
    """Saving a session removes those that expired over an hour ago; fresh ones stay claimable."""
    sessions = open_pg().session_store
    sessions.save(b"stale", b"state-1", time.time() - 2 * 3600)
    sessions.save(b"fresh", b"state-2", time.time() + 600)
    assert sessions.claim(b"stale") is None
    assert sessions.claim(b"fresh") == b"state-2"


# --- the shared statements (adapters/storage/sql.py) ------------------------------------------


def _spelled(statements: Statements) -> dict[str, str]:
    """Every statement by attribute name (the eviction tiers as evict_login_records[i])."""
    spelled: dict[str, str] = {}
    for name, value in vars(statements).items():
        if isinstance(value, tuple):
            spelled |= {f"{name}[{i}]": tier for i, tier in enumerate(value)}
        else:
            spelled[name] = value
    return spelled


def test_each_shared_statement_is_spelled_for_its_driver():
    """Written once as sqlite3 takes it (?, :name), each statement reaches psycopg as %s,
    %(name)s and otherwise the same text; the row locks go only where PostgreSQL picks
    login records to delete, and a deleted account's log to purge."""
    qmark = _spelled(Statements("qmark"))
    pyformat = _spelled(Statements("pyformat", lock_rows=" FOR UPDATE SKIP LOCKED"))
    assert qmark.keys() == pyformat.keys() and len(qmark) > 20
    assert (qmark["mark"], pyformat["mark"]) == ("?", "%s")
    assert qmark["login_record"].endswith("FROM login_throttle WHERE account_name = ?")
    for name, text in qmark.items():
        assert "%" not in text and "FOR UPDATE" not in text, name
        as_psycopg = re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", text.replace("?", "%s"))
        if name.startswith(("sweep_login_records", "evict_login_records")):
            as_psycopg = as_psycopg.replace(") RETURNING", " FOR UPDATE SKIP LOCKED) RETURNING")
        if name == "next_audit_purge":
            as_psycopg += " FOR UPDATE SKIP LOCKED"
        assert pyformat[name] == as_psycopg, name
        assert "?" not in pyformat[name] and not re.search(r"(?<![:\w]):\w", pyformat[name]), name
    assert ":now" in qmark["start_login"] and "%(now)s" in pyformat["start_login"]


# --- SQLite: opening, pragmas, failures -----------------------------------------------------


def test_sqlite_connection_waits_for_locks_and_syncs_where_it_must(tmp_path):
    """The store's connection waits BUSY_TIMEOUT_MS for a lock and runs synchronous=NORMAL:
    the storage syncs the WAL itself after the commits that need it (test_storage.py)."""
    store = SQLiteStorage(tmp_path / "ks.db")
    assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    store.close()


def test_sqlite_waits_for_another_writer_instead_of_failing(tmp_path):
    """A transaction started while another process briefly holds the write lock waits for it."""
    path = tmp_path / "ks.db"
    SQLiteStorage(path).close()
    store = SQLiteStorage(path)
    other = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(0.2, other.execute, ("COMMIT",))
    timer.start()
    try:
        with store.transaction() as tx:
            assert tx.insert_account(ALICE)
    finally:
        timer.join()
        other.close()
    with store.transaction() as tx:
        assert tx.get_account(b"alice") == ALICE
    store.close()


def test_sqlite_file_that_is_not_a_database_is_refused(tmp_path):
    """Opening a file that is not an SQLite database raises StorageError naming the file."""
    path = tmp_path / "ks.db"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 100)
    path.chmod(0o600)
    with pytest.raises(StorageError, match="cannot open key-server database"):
        SQLiteStorage(path)


def test_sqlite_schema_newer_than_the_code_is_refused_without_keeping_the_file_locked(tmp_path):
    """A newer schema is refused with StorageError, and the refusal leaves no write lock behind."""
    path = tmp_path / "ks.db"
    SQLiteStorage(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(StorageError, match="newer than this code") as refused:
        SQLiteStorage(path)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # "database is locked" if the refused open kept its transaction
    other.execute("ROLLBACK")
    other.close()
    del refused


def test_sqlite_closed_store_refuses_work_with_storage_error(tmp_path):
    """After close() a transaction or batch raises StorageError (the connection is really gone)."""
    store = SQLiteStorage(tmp_path / "ks.db")
    store.close()
    with pytest.raises(StorageError, match="cannot start a transaction"), store.transaction() as tx:
        tx.get_account(b"alice")
    with pytest.raises(StorageError, match="cannot start a transaction"), store.batch():
        pass


def _drop_table(path, table: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute(f"DROP TABLE {table}")


def test_sqlite_database_error_mid_transaction_rolls_it_back(tmp_path):
    """A database error inside a transaction is StorageError; earlier writes are undone, store usable."""
    path = tmp_path / "ks.db"
    store = SQLiteStorage(path)
    _drop_table(path, "audit")  # another process breaks the schema under the store
    with pytest.raises(StorageError, match="storage operation failed"), store.transaction() as tx:
        tx.insert_account(ALICE)
        tx.append_audit(AuditRecord(ALICE.user_id, Action.REGISTER, 1, Outcome.SUCCESS))
    with store.transaction() as tx:
        assert tx.get_account(b"alice") is None
    store.close()


def _defer_foreign_keys(store: SQLiteStorage) -> None:
    # Foreign keys checked at COMMIT: the way to make SQLite refuse a commit on demand.
    store._db.execute("PRAGMA defer_foreign_keys = ON")


def test_sqlite_refused_commit_is_storage_error_and_writes_nothing(tmp_path):
    """A COMMIT the database refuses raises StorageError, keeps nothing, and the store stays usable."""
    store = SQLiteStorage(tmp_path / "ks.db")
    with pytest.raises(StorageError, match="commit failed"), store.transaction() as tx:
        _defer_foreign_keys(store)
        tx.insert_account(BOB)
        tx.insert_secret(_secret(1, user=ALICE))  # Alice has no account: refused at COMMIT
    with store.transaction() as tx:
        assert tx.get_account(b"bob") is None
        assert tx.insert_account(ALICE)
    store.close()


def test_sqlite_refused_batch_commit_writes_nothing_and_store_stays_usable(tmp_path):
    """A batch whose COMMIT is refused raises StorageError, keeps none of its work, store usable."""
    store = SQLiteStorage(tmp_path / "ks.db")
    with pytest.raises(StorageError, match="commit failed"), store.batch():
        with store.transaction() as tx:
            _defer_foreign_keys(store)
            tx.insert_account(BOB)
        with store.transaction() as tx:
            tx.insert_secret(_secret(1, user=ALICE))
    with store.transaction() as tx:
        assert tx.get_account(b"bob") is None
        assert tx.insert_account(ALICE)
    store.close()


def test_sqlite_batch_begun_ahead_refuses_at_once_while_another_process_writes(tmp_path):
    """begin_batch(wait=False) answers False at once, with nothing begun and the store free,
    while another connection (another worker process) holds the write lock; once it is
    released, begin_batch(wait=True) begins and the next batch() takes that transaction over."""
    store = SQLiteStorage(tmp_path / "ks.db")
    other = sqlite3.connect(tmp_path / "ks.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    assert store.begin_batch(wait=False) is False
    assert time.monotonic() - started < BUSY_TIMEOUT_MS / 1000 / 2  # not the busy timeout
    assert not store._db.in_transaction
    other.execute("ROLLBACK")
    assert store.begin_batch(wait=True) is True
    assert store._db.in_transaction
    with store.batch(), store.transaction() as tx:
        tx.insert_account(ALICE)
    assert not store._db.in_transaction
    other.execute("BEGIN IMMEDIATE")  # the batch released the lock: the other can write again
    assert other.execute("SELECT count(*) FROM accounts").fetchone() == (1,)
    other.execute("ROLLBACK")
    with store.transaction() as tx:  # and this store is free for more
        assert tx.get_account(b"alice") is not None
    other.close()
    store.close()


def test_sqlite_batches_begun_on_the_loop_run_no_pragma_and_waiting_begins_still_wait(tmp_path):
    """The busy timeout is set only when a BEGIN needs the other setting than the last one:
    a run of batches begun ahead (begin_batch(wait=False)) runs no PRAGMA per batch, and a
    transaction outside a batch, or a waiting begin, after them still waits for another
    process's write lock instead of failing at once."""
    path = tmp_path / "ks.db"
    store = SQLiteStorage(path)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    for _ in range(3):
        assert store.begin_batch(wait=False) is True
        with store.batch(), store.transaction(atomic=False) as tx:
            tx.get_account(b"alice")
    assert [s for s in statements if s.startswith("PRAGMA")] == ["PRAGMA busy_timeout = 0"]
    other = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    for begin in ("transaction", "batch"):
        other.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(0.2, other.execute, ("COMMIT",))
        timer.start()
        try:
            if begin == "transaction":
                with store.transaction() as tx:
                    assert tx.insert_account(ALICE)
            else:
                assert store.begin_batch(wait=True) is True
                with store.batch(), store.transaction() as tx:
                    assert tx.insert_account(BOB)
        finally:
            timer.join()
        assert store.begin_batch(wait=False) is True  # (the timeout is off again)
        with store.batch():
            pass
    other.close()
    with store.transaction() as tx:
        assert tx.get_account(b"alice") == ALICE and tx.get_account(b"bob") == BOB
    store.close()


def test_sqlite_batch_failed_outer_transaction_undoes_its_completed_inner_one(tmp_path):
    """In a batch, a failing transaction rolls back all its work, nested transactions included."""
    store = SQLiteStorage(tmp_path / "ks.db")
    with store.batch(), pytest.raises(RuntimeError), store.transaction() as outer:
        outer.insert_account(ALICE)
        with store.transaction() as inner:
            inner.insert_account(BOB)
        raise RuntimeError("the operation fails after its nested write")
    with store.transaction() as tx:
        assert tx.get_account(b"alice") is None and tx.get_account(b"bob") is None
    store.close()


def test_sqlite_batch_failed_outer_transaction_after_a_failed_inner_one_undoes_everything(tmp_path):
    """In a batch, a nested failure caught by its caller does not shield the caller's own rollback."""
    store = SQLiteStorage(tmp_path / "ks.db")
    with store.batch():
        with pytest.raises(RuntimeError, match="outer"), store.transaction() as outer:
            outer.insert_account(ALICE)
            with pytest.raises(RuntimeError, match="inner"), store.transaction() as inner:
                inner.insert_account(BOB)
                raise RuntimeError("inner")
            outer.insert_secret(_secret(1))
            raise RuntimeError("outer")
        with store.transaction() as tx:
            tx.insert_account(Account(b"carol", b"C" * 16, bytes(192), bytes(60)))
    with store.transaction() as tx:
        assert tx.get_account(b"alice") is None and tx.get_account(b"bob") is None
        assert tx.get_secret(ALICE.user_id, (1).to_bytes(16, "big")) is None
        assert tx.get_account(b"carol") is not None
    store.close()


# --- PostgreSQL: opening, configuration, failures -----------------------------------------


def _postgres_storage_class():
    try:
        from keymgmt.adapters.storage.postgres import PostgresStorage
    except ImportError:  # psycopg missing: skip, or fail under KEYMGMT_REQUIRE_POSTGRES=1
        postgres_or_skip()
        raise
    return PostgresStorage


def test_postgres_bad_schema_name_is_refused_before_connecting():
    """A schema name that is not a plain lower-case identifier is refused outright."""
    postgres_storage = _postgres_storage_class()
    # Nothing listens on port 1: getting the schema error proves no connection was tried.
    with pytest.raises(StorageError, match="plain lower-case identifier"):
        postgres_storage("host=127.0.0.1 port=1 dbname=test connect_timeout=2", schema="Key-Mgmt")


@pytest.mark.parametrize(
    "passwords",
    [
        # libpq unescapes the value: the password it quotes is not the text as written
        {"user": "it's-hunter2", "password": "it's-hunter2"},
        # one password is part of another: the longer one is masked whole
        {"user": "hunter2-extra", "password": "hunter2-extra", "sslpassword": "hunter2"},
    ],
    ids=["escaped-quote", "nested-passwords"],
)
def test_postgres_error_messages_never_quote_the_password(passwords):
    """When libpq's error quotes a password (here as the user name), the message masks all of it."""
    from psycopg.conninfo import make_conninfo

    postgres_storage = _postgres_storage_class()
    conninfo = make_conninfo(postgres_or_skip(), **passwords)
    with pytest.raises(StorageError) as refused:
        postgres_storage(conninfo, schema=fresh_schema())
    reason = str(refused.value).split("): ", 1)[1]  # libpq's words, after the redacted conninfo
    assert reason.endswith('role "***" does not exist')
    assert "hunter2" not in reason and "extra" not in reason and "it's" not in reason


def test_postgres_connections_fail_lock_waits_after_five_seconds(open_pg):
    """Every pooled connection has lock_timeout=5s, so a lock wait fails instead of stalling."""
    storage = open_pg(min_size=2, max_size=2)
    storage._pool.wait(timeout=5)
    with storage._pool.connection() as first, storage._pool.connection() as second:
        assert first.execute("SHOW lock_timeout").fetchone()[0] == "5s"
        assert second.execute("SHOW lock_timeout").fetchone()[0] == "5s"


def test_postgres_tables_live_in_the_configured_schema(open_pg, pg):
    """Migration creates the tables in the configured schema, not on the default search path."""
    open_pg()
    with _pg_raw(*pg) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (pg[1],)
            )
        }
        public = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' "
            "AND table_name = 'schema_version'"
        ).fetchone()[0]
    assert {"accounts", "secrets", "audit", "login_throttle", "detached_sessions", "schema_version"} <= tables
    assert public == 0


def test_postgres_startup_fails_when_the_pool_cannot_fill(pg):
    """If the pool cannot open min_size connections within open_timeout, startup fails."""
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    from keymgmt.adapters.storage.postgres import PostgresStorage

    role_name = f"kmtest_role_{uuid.uuid4().hex[:10]}"
    role = sql.Identifier(role_name)
    with _pg_raw(*pg) as admin:
        database = sql.Identifier(admin.execute("SELECT current_database()").fetchone()[0])
        # The role may open one connection: enough for the startup check, not for the pool.
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 1").format(role))
        admin.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(database, role))
    storage = None
    try:
        with pytest.raises(StorageError, match="cannot use PostgreSQL"):
            storage = PostgresStorage(
                make_conninfo(pg[0], user=role_name), schema=pg[1], min_size=2, max_size=2, open_timeout=0.5
            )
    finally:
        if storage is not None:
            storage.close()
        drop_schema(pg[1])
        with _pg_raw(*pg) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(role))
            admin.execute(sql.SQL("DROP ROLE {}").format(role))


def test_postgres_schema_newer_than_the_code_is_refused(open_pg, pg):
    """An instance whose code is older than the database schema refuses to start."""
    open_pg().close()
    with _pg_raw(*pg) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(StorageError, match="newer than this code"):
        open_pg()


def test_postgres_database_errors_become_storage_errors(open_pg, pg):
    """A failing statement (a table dropped under the store) raises StorageError, for both paths."""
    storage = open_pg()
    with _pg_raw(*pg) as conn:
        conn.execute("DROP TABLE audit")
        conn.execute("DROP TABLE detached_sessions")
    with pytest.raises(StorageError, match="storage operation failed"), storage.transaction() as tx:
        tx.insert_account(ALICE)
        tx.append_audit(AuditRecord(ALICE.user_id, Action.REGISTER, 1, Outcome.SUCCESS))
    with pytest.raises(StorageError, match="storage operation failed"):
        storage.session_store.save(b"handle", b"state", time.time() + 60)
    with storage.transaction() as tx:
        assert tx.get_account(b"alice") is None


def test_postgres_refused_batch_commit_is_storage_error_and_writes_nothing(open_pg, pg):
    """A batch whose COMMIT the database refuses raises StorageError and keeps none of its work."""
    storage = open_pg()
    with _pg_raw(*pg) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$"
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON accounts "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    with pytest.raises(StorageError, match="commit failed"), storage.batch(), storage.transaction() as tx:
        tx.insert_account(ALICE)
    with storage.transaction() as tx:
        assert tx.get_account(b"alice") is None


def test_postgres_close_releases_the_connections(pg):
    """close() closes the pool: its server connections go away and later work is refused."""
    from keymgmt.adapters.storage.postgres import PostgresStorage

    name = f"kmtest_{uuid.uuid4().hex[:10]}"
    from psycopg.conninfo import make_conninfo

    conninfo = make_conninfo(pg[0], application_name=name)
    storage = PostgresStorage(conninfo, schema=pg[1], min_size=2, max_size=2)
    storage._pool.wait(timeout=5)

    def connections() -> int:
        with _pg_raw(*pg) as conn:
            return conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
            ).fetchone()[0]

    assert connections() == 2
    storage.close()
    deadline = time.monotonic() + 2
    while connections() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert connections() == 0
    with pytest.raises(StorageError), storage.transaction() as tx:
        tx.get_account(b"alice")


def test_sqlite_batch_refused_ahead_keeps_the_remembered_audit_numbers(tmp_path):
    """A begin refused for another process's write lock began nothing, so it keeps what the
    storage remembers of each user's last audit entry (forgetting it would cost every
    contended batch a read of the last entry per user)."""
    store = SQLiteStorage(tmp_path / "ks.db")
    with store.transaction() as tx:
        tx.insert_account(ALICE)
        tx.append_audit(AuditRecord(ALICE.user_id, Action.RETRIEVE, 1, Outcome.SUCCESS))
    remembered = dict(store.audit_numbers)
    assert remembered
    other = sqlite3.connect(tmp_path / "ks.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    assert store.begin_batch(wait=False) is False
    other.execute("ROLLBACK")
    assert store.audit_numbers == remembered
    other.close()
    store.close()


def test_sqlite_remembered_counts_and_audit_numbers_stay_bounded(tmp_path, monkeypatch):
    """What SQLiteStorage remembers per user (its key count, its last audit entry) is
    forgotten wholesale once it holds _AUDIT_NUMBERS_KEPT users, for stores, single entries
    and runs of entries alike; a run of one entry is written as one."""
    from keymgmt.adapters.storage import sqlite as module

    monkeypatch.setattr(module, "_AUDIT_NUMBERS_KEPT", 2)
    store = SQLiteStorage(tmp_path / "ks.db")
    users = [Account(bytes([65 + i]) * 5, bytes([65 + i]) * 16, b"r" * 192, b"e" * 60, 7) for i in range(3)]
    for n, user in enumerate(users):
        with store.transaction() as tx:
            tx.insert_account(user)
            assert tx.insert_secret_below(_secret(n, user), 10) == 1
            tx.append_audit(AuditRecord(user.user_id, Action.RETRIEVE, 1, Outcome.SUCCESS))
        assert 1 <= len(store.key_counts) <= 2
        assert 1 <= len(store.audit_numbers) <= 2
    store.forget_audit_numbers()
    for user in users:
        with store.transaction() as tx:
            tx.append_audits([AuditRecord(user.user_id, Action.RETRIEVE, 2, Outcome.SUCCESS)] * 2)
        assert 1 <= len(store.audit_numbers) <= 2
    with store.transaction() as tx:
        tx.append_audits([AuditRecord(users[0].user_id, Action.RETRIEVE, 3, Outcome.SUCCESS)])
    db = sqlite3.connect(tmp_path / "ks.db")
    rows = db.execute("SELECT count(*) FROM audit WHERE user_id = ?", (users[0].user_id,)).fetchone()
    assert rows == (4,)
    db.close()
    with pytest.raises(ValueError, match="one user"), store.transaction() as tx:
        tx.append_audits([AuditRecord(u.user_id, Action.RETRIEVE, 4, Outcome.SUCCESS) for u in users[:2]])
    store.close()


_DURABLE_WRITES = {
    "insert_secret": lambda tx: tx.insert_secret(_secret(2)),
    "insert_secret_below": lambda tx: tx.insert_secret_below(_secret(2), 10),
    "delete_secret": lambda tx: tx.delete_secret(ALICE.user_id, _secret(1).key_id),
    "replace_credentials": lambda tx: tx.replace_credentials(ALICE.user_id, b"n" * 192, b"m" * 60, 5),
    "delete_account": lambda tx: tx.delete_account(ALICE.user_id, 10),
    "set_label": lambda tx: tx.set_label(ALICE.user_id, _secret(1).key_id, b"L" * 40),
    "append_audits": lambda tx: tx.append_audits(
        [AuditRecord(ALICE.user_id, Action.RETRIEVE, 1, Outcome.SUCCESS)] * 2
    ),
}


@pytest.mark.parametrize("write", sorted(_DURABLE_WRITES))
def test_sqlite_each_durable_write_syncs_its_commit(tmp_path, write):
    """Durability: a transaction that only changes an account, a secret, a label or writes
    a hard audit entry syncs the WAL when it commits (nothing is answered before that);
    soft entries alone (logins, logouts) do not."""
    store = SQLiteStorage(tmp_path / "ks.db")
    with store.transaction() as tx:
        tx.insert_account(ALICE)
        assert tx.insert_secret(_secret(1))
    syncs: list[int] = []
    store._sync = lambda: syncs.append(1)  # type: ignore[method-assign]
    with store.transaction() as tx:
        tx.append_audits([AuditRecord(ALICE.user_id, Action.LOGIN, 1, Outcome.SUCCESS)] * 2)
    assert syncs == []
    with store.transaction() as tx:
        _DURABLE_WRITES[write](tx)
    assert syncs == [1]
    store.close()


@pytest.mark.parametrize("write", sorted(_DURABLE_WRITES))
def test_postgres_each_durable_write_commits_synchronously(open_pg, write):
    """As for SQLite: such a transaction commits with synchronous_commit on (its commit waits
    for the WAL flush); soft entries alone, before or after it, commit without waiting."""
    store = open_pg()
    with store.transaction() as tx:
        tx.insert_account(ALICE)
        tx.insert_account(BOB)
        assert tx.insert_secret(_secret(1))
    synchronous: list[bool] = []
    real = store._before_commit

    def before_commit(conn):  # type: ignore[no-untyped-def]
        real(conn)
        synchronous.append(conn.execute("SHOW synchronous_commit").fetchone()[0] != "off")

    store._before_commit = before_commit  # type: ignore[method-assign]
    with store.transaction() as tx:
        tx.append_audits([AuditRecord(ALICE.user_id, Action.LOGIN, 1, Outcome.SUCCESS)] * 2)
    with store.transaction() as tx:
        _DURABLE_WRITES[write](tx)
    with store.transaction() as tx:
        tx.append_audits([AuditRecord(BOB.user_id, Action.LOGOUT, 2, Outcome.SUCCESS)] * 2)
    assert synchronous == [False, True, False]


def test_sqlite_claiming_or_dropping_stored_sessions_syncs(tmp_path):
    """A claimed session (lost to a power cut, it could be resumed twice) and a user's
    dropped sessions (they must not come back) are synced when committed; a save is not."""
    store = SQLiteStorage(tmp_path / "ks.db")
    syncs: list[int] = []
    store._sync = lambda: syncs.append(1)  # type: ignore[method-assign]
    sessions = store.session_store
    sessions.save(b"h" * 16, b"sealed", time.time() + 60, ALICE.user_id)
    sessions.save(b"i" * 16, b"sealed", time.time() + 60, ALICE.user_id)
    assert syncs == []
    assert sessions.claim(b"h" * 16) == b"sealed"
    assert syncs == [1]
    assert sessions.drop_user(ALICE.user_id) == 1
    assert syncs == [1, 1]
    store.close()


def test_postgres_claiming_or_dropping_stored_sessions_commits_synchronously(open_pg):
    """As for SQLite, inside a batch: its commit waits for the WAL flush."""
    store = open_pg()
    synchronous: list[bool] = []
    real = store._before_commit

    def before_commit(conn):  # type: ignore[no-untyped-def]
        real(conn)
        synchronous.append(conn.execute("SHOW synchronous_commit").fetchone()[0] != "off")

    store._before_commit = before_commit  # type: ignore[method-assign]
    sessions = store.session_store
    with store.batch():
        sessions.save(b"h" * 16, b"sealed", time.time() + 60, ALICE.user_id)
        sessions.save(b"i" * 16, b"sealed", time.time() + 60, ALICE.user_id)
    with store.batch():
        assert sessions.claim(b"h" * 16) == b"sealed"
    with store.batch():
        assert sessions.drop_user(ALICE.user_id) == 1
    assert synchronous == [False, True, True]


@pytest.mark.parametrize("damage", ["unchained", "missing"])
def test_postgres_audit_entries_continue_only_a_chained_entry(open_pg, damage):
    """The audit chain: entries are appended only after a committed entry with its chain
    hash; one whose predecessor is gone or has no hash is refused (StorageError), and a run
    of several users' entries is refused outright."""
    store = open_pg()
    entry = AuditRecord(ALICE.user_id, Action.RETRIEVE, 1, Outcome.SUCCESS)
    with store.transaction() as tx:
        tx.insert_account(ALICE)
        tx.insert_account(BOB)
        tx.append_audits([entry])
    with pytest.raises(ValueError, match="one user"), store.transaction() as tx:
        tx.append_audits([entry, AuditRecord(BOB.user_id, Action.RETRIEVE, 1, Outcome.SUCCESS)])
    statement = "UPDATE audit SET chain_hash = NULL" if damage == "unchained" else "DELETE FROM audit"
    with store._pool.connection() as conn:
        conn.execute(statement + " WHERE user_id = %s AND seq = 1", (ALICE.user_id,))
    with pytest.raises(StorageError, match="missing or not chained"), store.transaction() as tx:
        tx.append_audits([entry, entry])
