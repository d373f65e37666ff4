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
Uses psycopg 3 with a connection pool (psycopg_pool).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from keymgmt_proto import Action, AuditEntry, AuditType, Context, KeyInfo, Outcome, SecretKind

from ..redaction import database_url_secrets, redact_database_url
from .base import Account, AuditQuery, AuditRecord, LoginRecord, SecretRecord, StorageError, Transaction

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
]

_KEY_ACTIONS = [int(a) for a in Action if a.is_key_action]
_LOGIN_COLUMNS = (
    "account_name, failures, unlogged, throttled, last_failure_us, last_throttled_us, locked_until_us"
)
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class _PgTransaction:
    def __init__(
        self, conn: psycopg.Connection[TupleRow], pool: ConnectionPool[psycopg.Connection[TupleRow]]
    ) -> None:
        self._conn = conn
        self._pool = pool

    @contextmanager
    def _own(self) -> Iterator[psycopg.Connection[TupleRow]]:
        """A short transaction of its own, committed at once: for the login-throttling rows.
        Inside the caller's transaction (a batch an attacker composes frame by frame) their
        row locks would be held to its end, and two instances could wait on each other's
        (a deadlock, which loses a write and stalls both event loops)."""
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    def _one(self, query: str, params: tuple[object, ...]) -> TupleRow | None:
        return self._conn.execute(query, params).fetchone()

    def get_account(self, account_name: bytes) -> Account | None:
        row = self._one(
            "SELECT account_name, user_id, registration_record, encrypted_storage_key, created_us "
            "FROM accounts WHERE account_name = %s",
            (account_name,),
        )
        return Account(*row) if row else None

    def get_account_by_user_id(self, user_id: bytes) -> Account | None:
        row = self._one(
            "SELECT account_name, user_id, registration_record, encrypted_storage_key, created_us "
            "FROM accounts WHERE user_id = %s",
            (user_id,),
        )
        return Account(*row) if row else None

    def user_id_exists(self, user_id: bytes) -> bool:
        return self._one("SELECT 1 FROM accounts WHERE user_id = %s", (user_id,)) is not None

    def insert_account(self, account: Account) -> bool:
        cursor = self._conn.execute(
            "INSERT INTO accounts (user_id, account_name, registration_record, encrypted_storage_key, "
            "created_us) VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (
                account.user_id,
                account.account_name,
                account.registration_record,
                account.encrypted_storage_key,
                account.created,
            ),
        )
        return cursor.rowcount == 1

    def key_id_exists(self, key_id: bytes) -> bool:
        return self._one("SELECT 1 FROM secrets WHERE key_id = %s", (key_id,)) is not None

    def count_keys(self, user_id: bytes) -> int:
        row = self._one("SELECT count(*) FROM secrets WHERE user_id = %s", (user_id,))
        assert row is not None
        return int(row[0])

    def insert_secret(self, secret: SecretRecord) -> bool:
        try:
            cursor = self._conn.execute(
                "INSERT INTO secrets (key_id, user_id, kind, ciphertext, associated_data, created_us) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (key_id) DO NOTHING",
                (
                    secret.key_id,
                    secret.user_id,
                    int(secret.kind),
                    secret.ciphertext,
                    secret.associated_data,
                    secret.created,
                ),
            )
        except psycopg.errors.ForeignKeyViolation:
            raise StorageError("the secret's user has no account") from None
        return cursor.rowcount == 1

    def get_secret(self, user_id: bytes, key_id: bytes) -> SecretRecord | None:
        row = self._one(
            "SELECT user_id, key_id, kind, ciphertext, associated_data, created_us FROM secrets "
            "WHERE user_id = %s AND key_id = %s",
            (user_id, key_id),
        )
        if row is None:
            return None
        return SecretRecord(row[0], row[1], SecretKind(row[2]), row[3], row[4], row[5])

    def list_keys(self, user_id: bytes, offset: int, limit: int) -> tuple[list[KeyInfo], int]:
        rows = self._conn.execute(
            "SELECT key_id, kind, created_us FROM secrets WHERE user_id = %s "
            "ORDER BY created_us, key_id LIMIT %s OFFSET %s",
            (user_id, limit + 1, offset),
        ).fetchall()
        keys = [KeyInfo(bytes(r[0]), SecretKind(r[1]), r[2]) for r in rows[:limit]]
        return keys, offset + limit if len(rows) > limit else 0

    def delete_secret(self, user_id: bytes, key_id: bytes) -> bool:
        cursor = self._conn.execute(
            "DELETE FROM secrets WHERE user_id = %s AND key_id = %s", (user_id, key_id)
        )
        return cursor.rowcount == 1

    def append_audit(self, record: AuditRecord) -> None:
        # The row lock taken by this UPDATE orders concurrent appends for one user (any instance).
        row = self._one(
            "UPDATE accounts SET audit_seq = audit_seq + 1 WHERE user_id = %s RETURNING audit_seq",
            (record.user_id,),
        )
        if row is None:
            raise StorageError("audit entry for a user that has no account")
        self._conn.execute(
            "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, key_id, context, event_count) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                record.user_id,
                row[0],
                int(record.action),
                record.timestamp,
                int(record.outcome),
                record.key_id,
                None if record.context is None else int(record.context),
                record.count,
            ),
        )

    def query_audit(self, user_id: bytes, query: AuditQuery) -> tuple[list[AuditEntry], int]:
        clauses = ["user_id = %s", "seq > %s"]
        params: list[object] = [user_id, query.cursor]
        if query.audit_type is AuditType.KEY_ONLY:
            clauses.append("action = ANY(%s)")
            params.append(_KEY_ACTIONS)
        elif query.audit_type is AuditType.SYSTEM_ONLY:
            clauses.append("NOT (action = ANY(%s))")
            params.append(_KEY_ACTIONS)
        if query.key_ids:
            clauses.append("key_id = ANY(%s)")
            params.append(list(query.key_ids))
        if query.after is not None:
            clauses.append("timestamp_us >= %s")
            params.append(query.after)
        if query.before is not None:
            clauses.append("timestamp_us < %s")
            params.append(query.before)
        params.append(query.limit + 1)
        rows = self._conn.execute(
            "SELECT seq, action, timestamp_us, outcome, key_id, context, event_count FROM audit WHERE "  # noqa: S608
            + " AND ".join(clauses)
            + " ORDER BY seq LIMIT %s",
            params,
        ).fetchall()
        entries = [
            AuditEntry(
                r[0],
                Action(r[1]),
                r[2],
                Outcome(r[3]),
                None if r[4] is None else bytes(r[4]),
                None if r[5] is None else Context(r[5]),
                r[6],
            )
            for r in rows[: query.limit]
        ]
        return entries, entries[-1].entry_id if len(rows) > query.limit else 0

    def start_login(self, account_name: bytes, now: int, threshold: int, in_flight_for: int) -> bool:
        # One statement: concurrent starts on several instances serialize on the row's lock.
        t = "login_throttle"
        in_flight = f"(CASE WHEN {t}.last_start_us > %(recent)s THEN {t}.pending ELSE 0 END)"
        admit = (
            f"({t}.locked_until_us <= %(now)s AND ({t}.failures + {in_flight} < %(threshold)s "
            f"OR {in_flight} = 0))"
        )
        with self._own() as conn:
            row = conn.execute(
                "INSERT INTO login_throttle (account_name, failures, locked_until_us, last_failure_us, "  # noqa: S608 - constant column lists, values bound
                "pending, last_start_us, admitted, unlogged, throttled) "
                "VALUES (%(name)s, 0, 0, 0, 1, %(now)s, TRUE, 0, 0) "
                f"ON CONFLICT (account_name) DO UPDATE SET admitted = {admit}, "
                f"pending = CASE WHEN {admit} THEN {in_flight} + 1 ELSE {t}.pending END, "
                f"throttled = CASE WHEN {admit} THEN {t}.throttled ELSE {t}.throttled + 1 END, "
                f"last_throttled_us = CASE WHEN {admit} THEN {t}.last_throttled_us ELSE %(now)s END, "
                f"last_start_us = CASE WHEN {admit} THEN %(now)s ELSE {t}.last_start_us END "
                "RETURNING admitted",
                {"name": account_name, "now": now, "threshold": threshold, "recent": now - in_flight_for},
            ).fetchone()
        assert row is not None
        return bool(row[0])

    def finish_login(
        self, account_name: bytes, now: int, succeeded: bool, lock_for: Callable[[int], int] | None = None
    ) -> LoginRecord | None:
        with self._own() as conn:
            if succeeded:
                row = conn.execute(
                    f"SELECT {_LOGIN_COLUMNS} FROM login_throttle WHERE account_name = %s FOR UPDATE",  # noqa: S608
                    (account_name,),
                ).fetchone()
                if row is not None:
                    conn.execute(
                        "UPDATE login_throttle SET pending = GREATEST(pending - 1, 0), unlogged = 0, "
                        "throttled = 0 WHERE account_name = %s",
                        (account_name,),
                    )
                return None if row is None else _login_record(row)
            # An upsert: a failure counts even if the record went while the login ran.
            row = conn.execute(
                "INSERT INTO login_throttle (account_name, failures, locked_until_us, last_failure_us, "  # noqa: S608 - constant column lists, values bound
                "unlogged) VALUES (%s, 1, 0, %s, 1) ON CONFLICT (account_name) DO UPDATE SET "
                "pending = GREATEST(login_throttle.pending - 1, 0), "
                "failures = login_throttle.failures + 1, unlogged = login_throttle.unlogged + 1, "
                f"last_failure_us = EXCLUDED.last_failure_us RETURNING {_LOGIN_COLUMNS}",
                (account_name, now),
            ).fetchone()
            assert row is not None
            record = _login_record(row)
            wait = lock_for(record.failures) if lock_for is not None else 0
            if wait > 0 and now + wait > record.locked_until:
                conn.execute(
                    "UPDATE login_throttle SET locked_until_us = %s WHERE account_name = %s",
                    (now + wait, account_name),
                )
                record = replace(record, locked_until=now + wait)
            return record

    def get_login_record(self, account_name: bytes) -> LoginRecord | None:
        with self._own() as conn:
            row = conn.execute(
                f"SELECT {_LOGIN_COLUMNS} FROM login_throttle WHERE account_name = %s",  # noqa: S608
                (account_name,),
            ).fetchone()
        return None if row is None else _login_record(row)

    def sweep_login_records(
        self, now: int, stale_before: int, in_flight_for: int, limit: int
    ) -> list[LoginRecord]:
        # SKIP LOCKED: instances sweeping at once take disjoint rows, and never wait on a login.
        with self._own() as conn:
            rows = conn.execute(
                "DELETE FROM login_throttle WHERE account_name IN (SELECT account_name FROM login_throttle "  # noqa: S608 - constant column lists, values bound
                "WHERE last_failure_us < %s AND locked_until_us < %s "
                "AND (pending = 0 OR last_start_us < %s) LIMIT %s "
                f"FOR UPDATE SKIP LOCKED) RETURNING {_LOGIN_COLUMNS}",
                (stale_before, now, now - in_flight_for, limit),
            ).fetchall()
        return [_login_record(row) for row in rows]

    def evict_login_records(
        self, now: int, threshold: int, in_flight_for: int, count: int
    ) -> list[LoginRecord]:
        # Oldest last failure first, from an index: the harmless, then the unlocked, then any.
        tiers = (
            "failures < %(threshold)s AND locked_until_us < %(now)s "
            "AND (pending = 0 OR last_start_us < %(recent)s)",
            "locked_until_us < %(now)s",
            "TRUE",
        )
        rows: list[TupleRow] = []
        with self._own() as conn:
            for where in tiers:
                if len(rows) == count:
                    break
                rows += conn.execute(
                    "DELETE FROM login_throttle WHERE account_name IN "  # noqa: S608 - constant column lists and conditions, values bound
                    f"(SELECT account_name FROM login_throttle WHERE {where} "
                    "ORDER BY last_failure_us LIMIT %(limit)s "
                    f"FOR UPDATE SKIP LOCKED) RETURNING {_LOGIN_COLUMNS}",
                    {
                        "threshold": threshold,
                        "now": now,
                        "recent": now - in_flight_for,
                        "limit": count - len(rows),
                    },
                ).fetchall()
        return [_login_record(row) for row in rows]

    def count_login_records(self) -> int:
        with self._own() as conn:
            row = conn.execute("SELECT count(*) FROM login_throttle").fetchone()
        assert row is not None
        return int(row[0])


def _login_record(row: TupleRow) -> LoginRecord:
    return LoginRecord(bytes(row[0]), row[1], row[2], row[3], row[4], row[5], row[6])


class _PgSessionStore:
    """Detached sessions in the shared database: claimed atomically with DELETE ... RETURNING."""

    def __init__(self, storage: PostgresStorage) -> None:
        self._storage = storage

    def save(self, handle: bytes, sealed_state: bytes, expires_at: float) -> None:
        with self._storage._connection() as conn:
            conn.execute(
                "INSERT INTO detached_sessions (handle, sealed_state, expires_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (handle) DO UPDATE SET sealed_state = EXCLUDED.sealed_state, "
                "expires_at = EXCLUDED.expires_at",
                (handle, sealed_state, expires_at),
            )
            conn.execute("DELETE FROM detached_sessions WHERE expires_at < extract(epoch FROM now()) - 3600")

    def claim(self, handle: bytes) -> bytes | None:
        with self._storage._connection() as conn:
            row = conn.execute(
                "DELETE FROM detached_sessions WHERE handle = %s RETURNING sealed_state", (handle,)
            ).fetchone()
        return None if row is None else bytes(row[0])


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
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            current = (row[0] if row else None) or 0
            if current > len(_MIGRATIONS):
                raise StorageError(f"database schema {current} is newer than this code ({len(_MIGRATIONS)})")
            for version in range(current + 1, len(_MIGRATIONS) + 1):
                for statement in _MIGRATIONS[version - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))

    @property
    def schema_version(self) -> int:
        with self._connection() as conn:
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
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
    def transaction(self) -> Iterator[Transaction]:
        try:
            if self._batch_conn is not None:  # inside batch(): a savepoint
                with self._batch_conn.transaction():
                    yield _PgTransaction(self._batch_conn, self._pool)
                return
            with self._pool.connection() as conn, conn.transaction():
                yield _PgTransaction(conn, self._pool)
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
            with self._pool.connection() as conn, conn.transaction():
                self._batch_conn = conn
                try:
                    yield
                finally:
                    self._batch_conn = None
        except psycopg.Error as exc:
            raise StorageError(f"commit failed: {type(exc).__name__}") from None

    def close(self) -> None:
        self._pool.close()
