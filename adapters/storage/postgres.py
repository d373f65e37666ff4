"""PostgreSQL key-server storage, for several key-server instances sharing one database.

Same contract as the SQLite backend: every ``transaction()`` is one PostgreSQL
transaction (an operation and its audit entry commit together); key ids and
account names are unique by constraint; audit entries are numbered per user
through a counter on the account row, whose row lock orders concurrent
appends from any instance. It also stores detached sessions
(:class:`~keymgmt_proto.DetachedSessionStore`) so a session can
resume on another instance, and the login-throttling state shared by all of
them (NET-10).

Everything lives in one schema (``keymgmt`` by default), created and migrated
on startup under an advisory lock so that instances starting together agree.
Uses psycopg 3 with a connection pool (psycopg_pool). The statements it shares
with the SQLite backend are in :mod:`.sql`.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from keymgmt_proto import Action, AuditEntry, Context, KeyInfo, Outcome

from ..redaction import database_url_secrets, redact_database_url
from .base import (
    Account,
    AuditQuery,
    AuditRecord,
    CredentialsChanged,
    LoginRecord,
    SecretRecord,
    StorageError,
    Transaction,
    needs_sync,
)
from .sql import (
    AUDIT_CHAIN_MARK,
    Row,
    Statements,
    account_if_named,
    account_values,
    audit_values,
    chain_hash_of,
    check_schema_version,
    credentials_params,
    eviction_params,
    fill_audit_chain,
    key_page,
    lock_end,
    migration_statements,
    read_audit,
    rows_to_fetch,
    secret_values,
    start_login_params,
    sweep_params,
    to_account,
    to_login_record,
    to_secret,
)

__all__ = ["PostgresStorage"]

_MIGRATIONS: list[str] = [
    # 1: accounts, secrets, audit (numbered per user), login throttling, detached sessions
    """
    CREATE TABLE accounts (
        user_id BYTEA PRIMARY KEY CHECK (length(user_id) = 16),
        account_name BYTEA NOT NULL UNIQUE,
        registration_record BYTEA NOT NULL,
        encrypted_storage_key BYTEA NOT NULL CHECK (length(encrypted_storage_key) = 60),
        created_us BIGINT NOT NULL,
        audit_seq BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE secrets (
        key_id BYTEA PRIMARY KEY CHECK (length(key_id) = 16),
        user_id BYTEA NOT NULL REFERENCES accounts(user_id) ON DELETE CASCADE,
        kind SMALLINT NOT NULL,
        ciphertext BYTEA NOT NULL,
        associated_data BYTEA NOT NULL,
        created_us BIGINT NOT NULL
    );
    CREATE INDEX secrets_by_user ON secrets(user_id, created_us, key_id);
    CREATE TABLE audit (
        user_id BYTEA NOT NULL REFERENCES accounts(user_id) ON DELETE CASCADE,
        seq BIGINT NOT NULL,
        action SMALLINT NOT NULL,
        timestamp_us BIGINT NOT NULL,
        outcome SMALLINT NOT NULL,
        key_id BYTEA,
        context SMALLINT,
        PRIMARY KEY (user_id, seq)
    );
    CREATE TABLE login_throttle (
        account_name BYTEA PRIMARY KEY,
        failures INTEGER NOT NULL,
        locked_until_us BIGINT NOT NULL,
        last_failure_us BIGINT NOT NULL
    );
    CREATE INDEX login_throttle_by_age ON login_throttle(last_failure_us);
    CREATE TABLE detached_sessions (
        handle BYTEA PRIMARY KEY,
        sealed_state BYTEA NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX detached_sessions_by_expiry ON detached_sessions(expires_at)
    """,
    # 2: logins in flight, and attempts counted for the owner's log (NET-9, NET-10, NET-13);
    # an audit entry can stand for several events
    """
    ALTER TABLE login_throttle ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE login_throttle ADD COLUMN last_start_us BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE login_throttle ADD COLUMN admitted BOOLEAN NOT NULL DEFAULT FALSE;
    ALTER TABLE login_throttle ADD COLUMN unlogged INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE login_throttle ADD COLUMN throttled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE login_throttle ADD COLUMN last_throttled_us BIGINT NOT NULL DEFAULT 0;
    UPDATE login_throttle SET unlogged = failures;
    CREATE INDEX login_throttle_by_failure ON login_throttle(last_failure_us);
    ALTER TABLE audit ADD COLUMN event_count INTEGER NOT NULL DEFAULT 1
    """,
    # 3: each account's number of stored keys (the per-user key limit reads it; issue 14)
    """
    ALTER TABLE accounts ADD COLUMN key_count BIGINT NOT NULL DEFAULT 0;
    UPDATE accounts SET key_count = (SELECT count(*) FROM secrets WHERE secrets.user_id = accounts.user_id)
    """,
    # 4: password change and account deletion: a deleted account's name stays reserved for a
    # while; detached sessions name their user, so a password change can drop them
    """
    CREATE TABLE reserved_names (
        account_name BYTEA PRIMARY KEY,
        reserved_until_us BIGINT NOT NULL
    );
    ALTER TABLE detached_sessions ADD COLUMN user_id BYTEA;
    CREATE INDEX detached_sessions_by_user ON detached_sessions(user_id)
    """,
    # 5: named keys (a sealed label the server cannot read), and the audit chain: each entry
    # stores its hash; the entries written before are chained by fill_audit_chain
    f"""
    ALTER TABLE secrets ADD COLUMN label BYTEA;
    {AUDIT_CHAIN_MARK}
    ALTER TABLE audit ADD COLUMN chain_hash BYTEA CHECK (chain_hash IS NULL OR length(chain_hash) = 32)
    """,
    # 6: when each account's password last changed (us; 0: never), read with the record by
    # every login: each instance ends a session that logged in before it. The changes made
    # before are read from the log (action 15 CHANGE_PASSWORD, outcome 0 SUCCESS).
    """
    ALTER TABLE accounts ADD COLUMN credentials_changed_us BIGINT NOT NULL DEFAULT 0;
    UPDATE accounts SET credentials_changed_us = coalesce((SELECT max(timestamp_us) FROM audit
        WHERE audit.user_id = accounts.user_id AND audit.action = 15 AND audit.outcome = 0), 0)
    """,
    # 7: a registration record replaced without its credentials version (by an instance of the
    # release of schema 5, still running during a rolling upgrade) moves the version on all the
    # same, so the sessions of the old password end on every upgraded instance. (The function's
    # body keeps its ';' inside the line: see migration_statements.)
    """
    CREATE FUNCTION credentials_moved() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN NEW.credentials_changed_us := OLD.credentials_changed_us + 1; RETURN NEW; END $$;
    CREATE TRIGGER accounts_credentials_moved BEFORE UPDATE OF registration_record ON accounts
        FOR EACH ROW WHEN (NEW.credentials_changed_us = OLD.credentials_changed_us)
        EXECUTE FUNCTION credentials_moved()
    """,
    # 8: a deleted account's audit log goes after the deletion, a chunk per transaction
    # (audit_purges queues it: _PgTransaction.purge_audit), not in it: the audit table's
    # foreign key, whose ON DELETE CASCADE deleted the log with the account, goes. An entry
    # for a user who has no account is still refused (append_audits numbers it from the
    # account's row). Entries no account owns (none, with the key on) are queued too.
    """
    CREATE TABLE audit_purges (
        user_id BYTEA PRIMARY KEY CHECK (length(user_id) = 16)
    );
    ALTER TABLE audit DROP CONSTRAINT IF EXISTS audit_user_id_fkey;
    INSERT INTO audit_purges (user_id) SELECT DISTINCT user_id FROM audit
        WHERE NOT EXISTS (SELECT 1 FROM accounts WHERE accounts.user_id = audit.user_id)
    """,
]

_SQL = Statements("pyformat", lock_rows=" FOR UPDATE SKIP LOCKED", lock_shared=" FOR SHARE")
# A name or key id that is taken inserts nothing (rowcount 0) instead of failing the transaction.
_INSERT_ACCOUNT = _SQL.insert_account + " ON CONFLICT DO NOTHING"
_INSERT_SECRET = _SQL.insert_secret + " ON CONFLICT (key_id) DO NOTHING"
#: Takes a user's next audit numbers (returning the last); parameters: how many, the user id.
_TAKE_AUDIT_SEQS = (
    "UPDATE accounts SET audit_seq = audit_seq + %s WHERE user_id = %s "
    "RETURNING audit_seq, credentials_changed_us"
)


@functools.cache
def _insert_audits(count: int) -> str:
    """One INSERT of ``count`` audit entries (placeholders only: no value is spliced in)."""
    rows = ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s)"] * count)
    return (
        "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, key_id, context, event_count, "  # noqa: S608
        f"chain_hash) VALUES {rows}"
    )


_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _run(conn: psycopg.Connection[TupleRow], statement: str, params: Sequence[object]) -> list[Row]:
    """Run one statement on ``conn``; its rows (none for a statement that returns none)."""
    cursor = conn.execute(statement, params)
    return list(cursor.fetchall()) if cursor.description is not None else []


#: For one transaction: commit without waiting for the WAL flush.
_NO_SYNC = "SET LOCAL synchronous_commit TO OFF"


class _PgTransaction:
    def __init__(
        self,
        conn: psycopg.Connection[TupleRow],
        pool: ConnectionPool[psycopg.Connection[TupleRow]],
        storage: PostgresStorage,
    ) -> None:
        self._conn = conn
        self._pool = pool
        self._storage = storage

    @contextmanager
    def _own(self) -> Iterator[psycopg.Connection[TupleRow]]:
        """A short transaction of its own, committed at once: for the login-throttling rows.
        Inside the caller's transaction (a batch an attacker composes frame by frame) their
        row locks would be held to its end, and two instances could wait on each other's
        (a deadlock, which loses a write and stalls both event loops)."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(_NO_SYNC)  # login bookkeeping (see base.SOFT_AUDIT_ACTIONS)
            yield conn

    def _one(self, query: str, params: tuple[object, ...]) -> TupleRow | None:
        return self._conn.execute(query, params).fetchone()

    def get_account(self, account_name: bytes) -> Account | None:
        return account_if_named(self._one(_SQL.account_by_name, (account_name,)), account_name)

    def get_account_by_user_id(self, user_id: bytes) -> Account | None:
        row = self._one(_SQL.account_by_user_id, (user_id,))
        return None if row is None else to_account(row)

    def user_id_exists(self, user_id: bytes) -> bool:
        return self._conn.execute(_SQL.user_id_exists, {"user": user_id}).fetchone() is not None

    def insert_account(self, account: Account) -> bool:
        self._storage.sync_needed = True
        cursor = self._conn.execute(_INSERT_ACCOUNT, account_values(account))
        return cursor.rowcount == 1

    def key_id_exists(self, key_id: bytes) -> bool:
        return self._one(_SQL.key_id_exists, (key_id,)) is not None

    def count_keys(self, user_id: bytes) -> int:
        row = self._one(_SQL.count_keys, (user_id,))
        return 0 if row is None else int(row[0])

    def insert_secret(self, secret: SecretRecord) -> bool:
        self._storage.sync_needed = True
        try:
            cursor = self._conn.execute(_INSERT_SECRET, secret_values(secret))
        except psycopg.errors.ForeignKeyViolation:
            raise StorageError("the secret's user has no account") from None
        if cursor.rowcount != 1:
            return False
        self._conn.execute(_SQL.add_to_key_count, (1, secret.user_id))
        return True

    def insert_secret_below(self, secret: SecretRecord, max_keys: int) -> int | None:
        self._storage.sync_needed = True
        # The UPDATE locks the account's row: concurrent stores of the user (any instance)
        # count one after the other, so none passes the limit.
        row = self._one(_SQL.add_key_below, (secret.user_id, max_keys))
        if row is None:  # at the limit, or no account
            if self._one(_SQL.count_keys, (secret.user_id,)) is None:
                raise StorageError("the secret's user has no account")
            return 0
        if self._conn.execute(_INSERT_SECRET, secret_values(secret)).rowcount != 1:
            self._conn.execute(_SQL.add_to_key_count, (-1, secret.user_id))  # nothing written
            return None
        return int(row[0])

    def get_secret(self, user_id: bytes, key_id: bytes) -> SecretRecord | None:
        row = self._one(_SQL.secret, (user_id, key_id))
        return None if row is None else to_secret(user_id, key_id, row)

    def secret_fields(self, user_id: bytes, key_id: bytes) -> tuple[int, bytes, bytes] | None:
        row = self._one(_SQL.secret, (user_id, key_id))
        return None if row is None else (row[0], row[1], row[2])

    def list_keys(self, user_id: bytes, offset: int, limit: int) -> tuple[list[KeyInfo], int]:
        rows = self._conn.execute(_SQL.list_keys, (user_id, rows_to_fetch(limit), offset)).fetchall()
        return key_page(rows, offset, limit)

    def delete_secret(self, user_id: bytes, key_id: bytes) -> bool:
        self._storage.sync_needed = True
        cursor = self._conn.execute(_SQL.delete_secret, (user_id, key_id))
        if cursor.rowcount != 1:
            return False
        self._conn.execute(_SQL.add_to_key_count, (-1, user_id))
        return True

    def replace_credentials(
        self,
        user_id: bytes,
        registration_record: bytes,
        encrypted_storage_key: bytes,
        now: int = 0,
        credentials: int | None = None,
    ) -> int | None:
        self._storage.sync_needed = True
        statement = _SQL.replace_credentials if credentials is None else _SQL.replace_current_credentials
        params = credentials_params(user_id, registration_record, encrypted_storage_key, now, credentials)
        row = self._conn.execute(statement, params).fetchone()
        return None if row is None else int(row[0])

    def delete_account(self, user_id: bytes, reserved_until: int, credentials: int | None = None) -> bool:
        # The account's row first, locked: appends for the user (any instance) wait for it.
        row = self._one(_SQL.account_by_user_id + " FOR UPDATE", (user_id,))
        if row is None:
            return False
        account = to_account(row)
        if credentials is not None and account.credentials_changed != credentials:
            raise CredentialsChanged(gone=False)
        self._storage.sync_needed = True
        self._conn.execute(_SQL.delete_user_secrets, (user_id,))
        self._conn.execute(_SQL.queue_audit_purge, (user_id,))  # the log: purge_audit, later
        # In this transaction (not _own): the deletion is all or nothing. Its row lock is held
        # to the commit; a login of the name on another instance waits for it (lock_timeout).
        self._conn.execute(_SQL.delete_login_record, (account.account_name,))
        self._conn.execute(_SQL.delete_account, (user_id,))
        self._conn.execute(_SQL.reserve_name, (account.account_name, reserved_until))
        return True

    def purge_audit(self, limit: int) -> int | None:
        # The queue row stays locked to the commit (SKIP LOCKED: instances purge different
        # logs). A chunk short of the limit may only have met rows another transaction is
        # deleting: the queue row goes only once no entry is left.
        row = self._one(_SQL.next_audit_purge, ())
        if row is None:
            return None
        user_id = bytes(row[0])
        deleted = self._conn.execute(_SQL.purge_audit_chunk, (user_id, user_id, limit)).rowcount
        if deleted < limit and self._one(_SQL.audit_left, (user_id,)) is None:
            self._conn.execute(_SQL.audit_purged, (user_id,))
        return deleted

    def name_reserved(self, account_name: bytes, now: int) -> bool:
        return self._one(_SQL.name_reserved, (account_name, now)) is not None

    def forget_reserved_names(self, now: int) -> int:
        return self._conn.execute(_SQL.forget_reserved_names, (now,)).rowcount

    def set_label(self, user_id: bytes, key_id: bytes, sealed_label: bytes) -> bool:
        self._storage.sync_needed = True
        cursor = self._conn.execute(_SQL.set_label, (sealed_label or None, user_id, key_id))
        return cursor.rowcount == 1

    def append_audit(self, record: AuditRecord, credentials: int | None = None) -> None:
        self.append_audits((record,), credentials)

    def append_audit_fields(
        self,
        user_id: bytes,
        action: Action,
        timestamp: int,
        outcome: Outcome,
        key_id: bytes | None,
        context: Context | None,
        credentials: int | None = None,
    ) -> None:
        self.append_audits((AuditRecord(user_id, action, timestamp, outcome, key_id, context),), credentials)

    def append_audits(self, records: Sequence[AuditRecord], credentials: int | None = None) -> None:
        # One UPDATE takes all the numbers; its row lock orders concurrent appends for one
        # user (any instance), and it reads the account's credentials for the check (no extra
        # round trip: a mismatch raises, and the transaction or savepoint rolls the UPDATE
        # back). One INSERT writes every entry.
        user_id = records[0].user_id
        if any(record.user_id != user_id for record in records):
            raise ValueError("append_audits takes the entries of one user")
        if any(needs_sync(record) for record in records):
            self._storage.sync_needed = True
        row = self._one(_TAKE_AUDIT_SEQS, (len(records), user_id))
        if row is None:
            if credentials is not None:
                raise CredentialsChanged(gone=True)
            raise StorageError("audit entry for a user that has no account")
        if credentials is not None and row[1] != credentials:
            raise CredentialsChanged(gone=False)
        seq = row[0] - len(records) + 1  # the first of the numbers taken
        # Under that lock the entry before is committed (or this transaction's own), so its
        # hash is the one the chain continues from.
        before = self._one(_SQL.audit_hash, (user_id, seq - 1)) if seq > 1 else None
        if seq > 1 and (before is None or before[0] is None):
            raise StorageError("the audit entry before is missing or not chained")
        previous = None if before is None else bytes(before[0])
        values: list[object] = []
        for number, record in enumerate(records, seq):
            previous = chain_hash_of(record, number, previous)
            values += (user_id, number, *audit_values(record, previous))
        self._conn.execute(_insert_audits(len(records)), values)

    def query_audit(self, user_id: bytes, query: AuditQuery) -> tuple[list[AuditEntry], int]:
        return read_audit(
            lambda sql, params: self._conn.execute(sql, params).fetchall(), _SQL, user_id, query
        )

    def start_login(self, account_name: bytes, now: int, threshold: int, in_flight_for: int) -> bool:
        # One statement: concurrent starts on several instances serialize on the row's lock.
        with self._own() as conn:
            row = conn.execute(
                _SQL.start_login, start_login_params(account_name, now, threshold, in_flight_for)
            ).fetchone()
        assert row is not None
        return bool(row[0])

    def finish_login(
        self, account_name: bytes, now: int, succeeded: bool, lock_for: Callable[[int], int] | None = None
    ) -> LoginRecord | None:
        with self._own() as conn:
            if succeeded:
                # The UPDATE locks the row until this transaction ends: nothing counts between
                # reading the waiting counts and clearing them.
                row = conn.execute(_SQL.login_succeeded, (account_name,)).fetchone()
                if row is None:
                    return None
                record = to_login_record(row)
                if record.unlogged or record.throttled:
                    conn.execute(_SQL.login_counts_logged, (account_name,))
                return record
            row = conn.execute(_SQL.login_failed, (account_name, now)).fetchone()
            assert row is not None
            record = to_login_record(row)
            locked_until = lock_end(record, now, lock_for)
            if locked_until is not None:
                conn.execute(_SQL.lock_login, (locked_until, account_name))
                record = replace(record, locked_until=locked_until)
            return record

    def get_login_record(self, account_name: bytes) -> LoginRecord | None:
        with self._own() as conn:
            row = conn.execute(_SQL.login_record, (account_name,)).fetchone()
        return None if row is None else to_login_record(row)

    def sweep_login_records(
        self, now: int, stale_before: int, in_flight_for: int, limit: int
    ) -> list[LoginRecord]:
        # SKIP LOCKED: instances sweeping at once take disjoint rows, and never wait on a login.
        with self._own() as conn:
            rows = conn.execute(
                _SQL.sweep_login_records, sweep_params(now, stale_before, in_flight_for, limit)
            ).fetchall()
        return [to_login_record(row) for row in rows]

    def evict_login_records(
        self, now: int, threshold: int, in_flight_for: int, count: int
    ) -> list[LoginRecord]:
        # Tier after tier (the harmless, the unlocked, any), until enough are gone.
        rows: list[TupleRow] = []
        with self._own() as conn:
            for statement in _SQL.evict_login_records:
                if len(rows) == count:
                    break
                params = eviction_params(now, threshold, in_flight_for, count - len(rows))
                rows += conn.execute(statement, params).fetchall()
        return [to_login_record(row) for row in rows]

    def count_login_records(self) -> int:
        with self._own() as conn:
            row = conn.execute(_SQL.count_login_records).fetchone()
        assert row is not None
        return int(row[0])


class _PgSessionStore:
    """Detached sessions in the shared database: claimed atomically with DELETE ... RETURNING."""

    def __init__(self, storage: PostgresStorage) -> None:
        self._storage = storage

    def save(
        self,
        handle: bytes,
        sealed_state: bytes,
        expires_at: float,
        user_id: bytes | None = None,
        credentials_version: int | None = None,
    ) -> None:
        with self._storage._connection() as conn:
            if credentials_version is None or user_id is None:
                conn.execute(_SQL.save_session, (handle, sealed_state, expires_at, user_id))
            else:  # not stored if the password changed meanwhile, or the account is gone
                params = (handle, sealed_state, expires_at, user_id, user_id, credentials_version)
                conn.execute(_SQL.save_current_session, params)
            conn.execute("DELETE FROM detached_sessions WHERE expires_at < extract(epoch FROM now()) - 3600")

    def claim(self, handle: bytes) -> bytes | None:
        self._storage.sync_needed = True  # a claim lost to a crash would let it resume twice
        with self._storage._connection() as conn:
            row = conn.execute(_SQL.claim_session, (handle,)).fetchone()
        return None if row is None else bytes(row[0])

    def drop_user(self, user_id: bytes) -> int:
        self._storage.sync_needed = True  # a dropped session must not come back
        with self._storage._connection() as conn:
            return conn.execute(_SQL.drop_user_sessions, (user_id,)).rowcount


class PostgresStorage:
    """Key-server storage in a PostgreSQL schema, shared by several instances."""

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = "keymgmt",
        min_size: int = 1,
        max_size: int = 8,
        open_timeout: float = 10.0,
    ) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise StorageError(f"schema name {schema!r} must be a plain lower-case identifier")
        self.schema = schema
        self._conninfo_display = redact_database_url(conninfo)
        self._batch_conn: psycopg.Connection[TupleRow] | None = None
        #: Set by a write whose commit must reach the disk before anything is answered.
        self.sync_needed = False
        self._writer = threading.Lock()
        secrets = database_url_secrets(conninfo)
        with suppress(psycopg.Error):  # (a string libpq cannot parse has no password to add)
            secrets.append(str(psycopg.conninfo.conninfo_to_dict(conninfo).get("password") or ""))

        def configure(conn: psycopg.Connection[TupleRow]) -> None:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            # A lock wait is a bug or an attack: fail the statement rather than stall the loop.
            conn.execute("SET lock_timeout = '5s'")
            conn.commit()

        try:
            # One direct connection first: an unreachable or misconfigured database is then one
            # clear error with libpq's reason, not a pool retrying until its timeout.
            with psycopg.connect(conninfo, connect_timeout=max(1, int(open_timeout))):
                pass
            self._pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
                conninfo, min_size=min_size, max_size=max_size, configure=configure, open=False
            )
            self._pool.open(wait=True, timeout=open_timeout)
            self._migrate()
        except (psycopg.Error, TimeoutError) as exc:
            # libpq's message may quote the connection string, or a piece of it: redact it too.
            reason = " ".join(str(exc).split())  # one line
            for secret in sorted(filter(None, secrets), key=len, reverse=True):
                reason = reason.replace(secret, "***")
            reason = redact_database_url(reason)
            raise StorageError(f"cannot use PostgreSQL ({self._conninfo_display}): {reason}") from None
        self.session_store = _PgSessionStore(self)

    def __repr__(self) -> str:
        return f"PostgresStorage({self._conninfo_display!r}, schema={self.schema!r})"

    def _migrate(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('keymgmt schema migration'))")
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(self.schema)))
            conn.execute(_SQL.create_schema_version)
            row = conn.execute(_SQL.schema_version).fetchone()
            current = (row[0] if row else None) or 0
            check_schema_version(current, _MIGRATIONS)
            for version in range(current + 1, len(_MIGRATIONS) + 1):
                for statement in migration_statements(_MIGRATIONS[version - 1]):
                    conn.execute(statement)
                if AUDIT_CHAIN_MARK in _MIGRATIONS[version - 1]:
                    fill_audit_chain(functools.partial(_run, conn), _SQL)
                conn.execute(_SQL.record_schema_version, (version,))

    @property
    def schema_version(self) -> int:
        with self._connection() as conn:
            row = conn.execute(_SQL.schema_version).fetchone()
        assert row is not None
        return int(row[0])

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[TupleRow]]:
        """A connection for a short statement: inside batch(), the batch's own (a savepoint),
        so that e.g. a session saved while a batch fails is rolled back with it."""
        try:
            if self._batch_conn is not None:
                with self._batch_conn.transaction():
                    yield self._batch_conn
                return
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise StorageError(f"storage operation failed: {type(exc).__name__}") from None

    @contextmanager
    def transaction(self, *, atomic: bool = True) -> Iterator[Transaction]:
        # Always a savepoint inside a batch, atomic or not: in PostgreSQL a failed statement
        # aborts the whole transaction, so every part needs one to fail alone.
        try:
            if self._batch_conn is not None:  # inside batch(): a savepoint
                with self._batch_conn.transaction():
                    yield _PgTransaction(self._batch_conn, self._pool, self)
                return
            with self._writer, self._pool.connection() as conn, conn.transaction():
                self.sync_needed = False
                yield _PgTransaction(conn, self._pool, self)
                self._before_commit(conn)
        except psycopg.Error as exc:
            raise StorageError(f"storage operation failed: {type(exc).__name__}") from None

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group commit (as SQLiteStorage.batch): one database transaction for everything
        inside, each ``transaction()`` a savepoint; acknowledge nothing before it exits."""
        if self._batch_conn is not None:
            yield
            return
        try:
            # _writer: held until the commit has ended, in whichever thread it runs (the
            # sync_needed flag belongs to one transaction at a time).
            with self._writer, self._pool.connection() as conn, conn.transaction():
                self._batch_conn = conn
                self.sync_needed = False
                try:
                    yield
                finally:
                    self._batch_conn = None
                self._before_commit(conn)
        except psycopg.Error as exc:
            raise StorageError(f"commit failed: {type(exc).__name__}") from None

    def _before_commit(self, conn: psycopg.Connection[TupleRow]) -> None:
        """A transaction that wrote only login bookkeeping commits without waiting for the
        database's WAL flush (``synchronous_commit`` off for it alone): it becomes durable
        with the next flush, and a crash of this process never loses it."""
        if not self.sync_needed:
            conn.execute(_NO_SYNC)
        self.sync_needed = False

    def credentials_versions(self, user_ids: Sequence[bytes]) -> dict[bytes, int]:
        """The credentials version of each of ``user_ids`` that has an account (a deleted one
        is missing), as committed: one read on a pool connection of its own, outside every
        batch (it waits for no writer). For the key server's periodic check of the sessions
        it holds."""
        if not user_ids:
            return {}
        try:
            with self._pool.connection() as conn:
                rows = conn.execute(
                    "SELECT user_id, credentials_changed_us FROM accounts WHERE user_id = ANY(%s)",
                    (list(user_ids),),
                ).fetchall()
        except psycopg.Error as exc:
            raise StorageError(f"storage operation failed: {type(exc).__name__}") from None
        return {bytes(user_id): int(version) for user_id, version in rows}

    def close(self) -> None:
        self._pool.close()
