"""SQLite key-server storage: the embedded default (STO-1).

Durability: WAL journal with ``synchronous=FULL``. In WAL mode ``NORMAL``
already survives a crash of the server *process* (committed pages are in the
WAL file, which the OS keeps), but may lose the last transactions on power
loss; an acknowledged store must survive both, so every commit syncs the WAL.
Foreign keys are on. The file is created with owner-only permissions.

Schema changes are numbered migrations recorded in ``schema_version``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

from keymgmt_proto import Action, AuditEntry, AuditType, Context, KeyInfo, Outcome, SecretKind

from ..files import BUSY_TIMEOUT_MS, enable_wal, ensure_private_file
from .base import Account, AuditQuery, AuditRecord, LoginRecord, SecretRecord, StorageError, Transaction

__all__ = ["SQLiteStorage"]

_MIGRATIONS: list[str] = [
    # 1: accounts, secrets, audit
    """
    CREATE TABLE accounts (
        user_id BLOB PRIMARY KEY CHECK (length(user_id) = 16),
        account_name BLOB NOT NULL UNIQUE,
        registration_record BLOB NOT NULL,
        encrypted_storage_key BLOB NOT NULL CHECK (length(encrypted_storage_key) = 60),
        created_us INTEGER NOT NULL
    );
    CREATE TABLE secrets (
        key_id BLOB PRIMARY KEY CHECK (length(key_id) = 16),
        user_id BLOB NOT NULL REFERENCES accounts(user_id) ON DELETE CASCADE,
        kind INTEGER NOT NULL,
        ciphertext BLOB NOT NULL,
        associated_data BLOB NOT NULL,
        created_us INTEGER NOT NULL
    );
    CREATE INDEX secrets_by_user ON secrets(user_id, created_us);
    CREATE TABLE audit (
        user_id BLOB NOT NULL REFERENCES accounts(user_id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        action INTEGER NOT NULL,
        timestamp_us INTEGER NOT NULL,
        outcome INTEGER NOT NULL,
        key_id BLOB,
        context INTEGER,
        PRIMARY KEY (user_id, seq)
    ) WITHOUT ROWID;
    """,
    # 2: login throttling state (NET-10), for registered and unknown names alike
    """
    CREATE TABLE login_throttle (
        account_name BLOB PRIMARY KEY,
        failures INTEGER NOT NULL,
        locked_until_us INTEGER NOT NULL,
        last_failure_us INTEGER NOT NULL
    );
    CREATE INDEX login_throttle_by_age ON login_throttle(last_failure_us);
    """,
    # 3: detached sessions, so a restarted server can still resume them
    """
    CREATE TABLE detached_sessions (
        handle BLOB PRIMARY KEY,
        sealed_state BLOB NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    # 4: logins in flight, and attempts counted for the owner's log (NET-9, NET-10, NET-13);
    # an audit entry can stand for several events
    """
    ALTER TABLE login_throttle ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE login_throttle ADD COLUMN last_start_us INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE login_throttle ADD COLUMN admitted INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE login_throttle ADD COLUMN unlogged INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE login_throttle ADD COLUMN throttled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE login_throttle ADD COLUMN last_throttled_us INTEGER NOT NULL DEFAULT 0;
    UPDATE login_throttle SET unlogged = failures;
    CREATE INDEX login_throttle_by_failure ON login_throttle(last_failure_us);
    ALTER TABLE audit ADD COLUMN event_count INTEGER NOT NULL DEFAULT 1;
    """,
]

_KEY_ACTIONS = tuple(int(a) for a in Action if a.is_key_action)
_LOGIN_COLUMNS = (
    "account_name, failures, unlogged, throttled, last_failure_us, last_throttled_us, locked_until_us"
)


class _SQLiteTransaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get_account(self, account_name: bytes) -> Account | None:
        row = self._db.execute(
            "SELECT account_name, user_id, registration_record, encrypted_storage_key, created_us "
            "FROM accounts WHERE account_name = ?",
            (account_name,),
        ).fetchone()
        return Account(*row) if row else None

    def get_account_by_user_id(self, user_id: bytes) -> Account | None:
        row = self._db.execute(
            "SELECT account_name, user_id, registration_record, encrypted_storage_key, created_us "
            "FROM accounts WHERE user_id = ?",
            (user_id,),
        ).fetchone()
        return Account(*row) if row else None

    def user_id_exists(self, user_id: bytes) -> bool:
        return self._db.execute("SELECT 1 FROM accounts WHERE user_id = ?", (user_id,)).fetchone() is not None

    def insert_account(self, account: Account) -> bool:
        try:
            self._db.execute(
                "INSERT INTO accounts (user_id, account_name, registration_record, encrypted_storage_key, "
                "created_us) VALUES (?, ?, ?, ?, ?)",
                (
                    account.user_id,
                    account.account_name,
                    account.registration_record,
                    account.encrypted_storage_key,
                    account.created,
                ),
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def count_keys(self, user_id: bytes) -> int:
        count: int = self._db.execute(
            "SELECT count(*) FROM secrets WHERE user_id = ?", (user_id,)
        ).fetchone()[0]
        return count

    def start_login(self, account_name: bytes, now: int, threshold: int, in_flight_for: int) -> bool:
        # One statement, so that concurrent starts (other processes) serialize on the row.
        in_flight = "(CASE WHEN last_start_us > :recent THEN pending ELSE 0 END)"
        admit = f"(locked_until_us <= :now AND (failures + {in_flight} < :threshold OR {in_flight} = 0))"
        row = self._db.execute(
            "INSERT INTO login_throttle (account_name, failures, locked_until_us, last_failure_us, pending, "  # noqa: S608 - constant column lists, values bound
            "last_start_us, admitted, unlogged, throttled) VALUES (:name, 0, 0, 0, 1, :now, 1, 0, 0) "
            f"ON CONFLICT (account_name) DO UPDATE SET admitted = {admit}, "
            f"pending = CASE WHEN {admit} THEN {in_flight} + 1 ELSE pending END, "
            f"throttled = CASE WHEN {admit} THEN throttled ELSE throttled + 1 END, "
            f"last_throttled_us = CASE WHEN {admit} THEN last_throttled_us ELSE :now END, "
            f"last_start_us = CASE WHEN {admit} THEN :now ELSE last_start_us END RETURNING admitted",
            {"name": account_name, "now": now, "threshold": threshold, "recent": now - in_flight_for},
        ).fetchone()
        return bool(row[0])

    def finish_login(
        self, account_name: bytes, now: int, succeeded: bool, lock_for: Callable[[int], int] | None = None
    ) -> LoginRecord | None:
        # In the caller's transaction: SQLite has one writer at a time, so no lock cycle.
        if succeeded:
            record = self.get_login_record(account_name)
            if record is not None:
                self._db.execute(
                    "UPDATE login_throttle SET pending = max(pending - 1, 0), unlogged = 0, throttled = 0 "
                    "WHERE account_name = ?",
                    (account_name,),
                )
            return record
        # An upsert: a failure counts even if the record went while the login ran.
        row = self._db.execute(
            "INSERT INTO login_throttle (account_name, failures, locked_until_us, last_failure_us, "  # noqa: S608 - constant column lists, values bound
            "unlogged) VALUES (?, 1, 0, ?, 1) ON CONFLICT (account_name) DO UPDATE SET "
            "pending = max(pending - 1, 0), failures = failures + 1, unlogged = unlogged + 1, "
            f"last_failure_us = excluded.last_failure_us RETURNING {_LOGIN_COLUMNS}",
            (account_name, now),
        ).fetchone()
        record = LoginRecord(*row)
        wait = lock_for(record.failures) if lock_for is not None else 0
        if wait > 0 and now + wait > record.locked_until:
            self._db.execute(
                "UPDATE login_throttle SET locked_until_us = ? WHERE account_name = ?",
                (now + wait, account_name),
            )
            record = replace(record, locked_until=now + wait)
        return record

    def get_login_record(self, account_name: bytes) -> LoginRecord | None:
        row = self._db.execute(
            f"SELECT {_LOGIN_COLUMNS} FROM login_throttle WHERE account_name = ?",  # noqa: S608
            (account_name,),
        ).fetchone()
        return None if row is None else LoginRecord(*row)

    def sweep_login_records(
        self, now: int, stale_before: int, in_flight_for: int, limit: int
    ) -> list[LoginRecord]:
        rows = self._db.execute(
            "DELETE FROM login_throttle WHERE account_name IN (SELECT account_name FROM login_throttle "  # noqa: S608 - constant column lists, values bound
            "WHERE last_failure_us < ? AND locked_until_us < ? "
            "AND (pending = 0 OR last_start_us < ?) LIMIT ?) "
            f"RETURNING {_LOGIN_COLUMNS}",
            (stale_before, now, now - in_flight_for, limit),
        ).fetchall()
        return [LoginRecord(*row) for row in rows]

    def evict_login_records(
        self, now: int, threshold: int, in_flight_for: int, count: int
    ) -> list[LoginRecord]:
        # Oldest last failure first, from an index: the harmless, then the unlocked, then any.
        # (Not by last use: a success moves that, and the order would tell a prober, NET-9.)
        tiers = (
            ("failures < :threshold AND locked_until_us < :now AND (pending = 0 OR last_start_us < :recent)"),
            "locked_until_us < :now",
            "1",
        )
        rows: list[tuple[bytes, int, int, int, int, int, int]] = []
        for where in tiers:
            if len(rows) == count:
                break
            rows += self._db.execute(
                "DELETE FROM login_throttle WHERE account_name IN (SELECT account_name FROM login_throttle "  # noqa: S608 - constant column lists and conditions, values bound
                f"WHERE {where} ORDER BY last_failure_us LIMIT :limit) "
                f"RETURNING {_LOGIN_COLUMNS}",
                {
                    "threshold": threshold,
                    "now": now,
                    "recent": now - in_flight_for,
                    "limit": count - len(rows),
                },
            ).fetchall()
        return [LoginRecord(*row) for row in rows]

    def count_login_records(self) -> int:
        count: int = self._db.execute("SELECT count(*) FROM login_throttle").fetchone()[0]
        return count

    def key_id_exists(self, key_id: bytes) -> bool:
        return self._db.execute("SELECT 1 FROM secrets WHERE key_id = ?", (key_id,)).fetchone() is not None

    def insert_secret(self, secret: SecretRecord) -> bool:
        try:
            self._db.execute(
                "INSERT INTO secrets (key_id, user_id, kind, ciphertext, associated_data, created_us) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    secret.key_id,
                    secret.user_id,
                    int(secret.kind),
                    secret.ciphertext,
                    secret.associated_data,
                    secret.created,
                ),
            )
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc):
                return False
            raise StorageError("the secret's user has no account") from None
        return True

    def get_secret(self, user_id: bytes, key_id: bytes) -> SecretRecord | None:
        row = self._db.execute(
            "SELECT user_id, key_id, kind, ciphertext, associated_data, created_us FROM secrets "
            "WHERE user_id = ? AND key_id = ?",
            (user_id, key_id),
        ).fetchone()
        if row is None:
            return None
        return SecretRecord(row[0], row[1], SecretKind(row[2]), row[3], row[4], row[5])

    def list_keys(self, user_id: bytes, offset: int, limit: int) -> tuple[list[KeyInfo], int]:
        rows = self._db.execute(
            "SELECT key_id, kind, created_us FROM secrets WHERE user_id = ? "
            "ORDER BY created_us, key_id LIMIT ? OFFSET ?",
            (user_id, limit + 1, offset),
        ).fetchall()
        keys = [KeyInfo(r[0], SecretKind(r[1]), r[2]) for r in rows[:limit]]
        return keys, offset + limit if len(rows) > limit else 0

    def delete_secret(self, user_id: bytes, key_id: bytes) -> bool:
        cursor = self._db.execute("DELETE FROM secrets WHERE user_id = ? AND key_id = ?", (user_id, key_id))
        return cursor.rowcount == 1

    def append_audit(self, record: AuditRecord) -> None:
        self._db.execute(
            "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, key_id, context, event_count) "
            "VALUES (?, (SELECT coalesce(max(seq), 0) + 1 FROM audit WHERE user_id = ?), ?, ?, ?, ?, ?, ?)",
            (
                record.user_id,
                record.user_id,
                int(record.action),
                record.timestamp,
                int(record.outcome),
                record.key_id,
                None if record.context is None else int(record.context),
                record.count,
            ),
        )

    def query_audit(self, user_id: bytes, query: AuditQuery) -> tuple[list[AuditEntry], int]:
        sql = [
            "SELECT seq, action, timestamp_us, outcome, key_id, context, event_count FROM audit "
            "WHERE user_id = ? AND seq > ?"
        ]
        params: list[object] = [user_id, query.cursor]
        marks = ", ".join("?" * len(_KEY_ACTIONS))
        if query.audit_type is AuditType.KEY_ONLY:
            sql.append(f"AND action IN ({marks})")
            params += _KEY_ACTIONS
        elif query.audit_type is AuditType.SYSTEM_ONLY:
            sql.append(f"AND action NOT IN ({marks})")
            params += _KEY_ACTIONS
        if query.key_ids:
            sql.append(f"AND key_id IN ({', '.join('?' * len(query.key_ids))})")
            params += list(query.key_ids)
        if query.after is not None:
            sql.append("AND timestamp_us >= ?")
            params.append(query.after)
        if query.before is not None:
            sql.append("AND timestamp_us < ?")
            params.append(query.before)
        sql.append("ORDER BY seq LIMIT ?")
        params.append(query.limit + 1)
        rows = self._db.execute(" ".join(sql), params).fetchall()
        entries = [
            AuditEntry(
                r[0], Action(r[1]), r[2], Outcome(r[3]), r[4], None if r[5] is None else Context(r[5]), r[6]
            )
            for r in rows[: query.limit]
        ]
        next_cursor = entries[-1].entry_id if len(rows) > query.limit else 0
        return entries, next_cursor


class _SQLiteSessionStore:
    """Detached sessions in the database file (they survive a restart of this server)."""

    def __init__(self, storage: SQLiteStorage) -> None:
        self._storage = storage

    def save(self, handle: bytes, sealed_state: bytes, expires_at: float) -> None:
        with self._storage._locked() as db:
            db.execute(
                "INSERT OR REPLACE INTO detached_sessions (handle, sealed_state, expires_at) "
                "VALUES (?, ?, ?)",
                (handle, sealed_state, expires_at),
            )
            db.execute("DELETE FROM detached_sessions WHERE expires_at < ?", (expires_at - 86_400 * 7,))

    def claim(self, handle: bytes) -> bytes | None:
        with self._storage._locked() as db:
            row = db.execute(
                "DELETE FROM detached_sessions WHERE handle = ? RETURNING sealed_state", (handle,)
            ).fetchone()
        return None if row is None else bytes(row[0])


class SQLiteStorage:
    """Key-server storage in one SQLite file (created 0600 if missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        ensure_private_file(self.path, StorageError)
        self._batch_depth = 0
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA foreign_keys = ON")
            enable_wal(self._db, self.path, StorageError)
            self._db.execute("PRAGMA synchronous = FULL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot open key-server database {self.path}: {exc}") from None
        self.session_store = _SQLiteSessionStore(self)

    def __repr__(self) -> str:
        return f"SQLiteStorage({str(self.path)!r})"

    def _migrate(self) -> None:
        self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        while True:
            self._db.execute("BEGIN IMMEDIATE")  # read the version under the write lock
            try:
                current = self._db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
                if current > len(_MIGRATIONS):
                    raise StorageError(
                        f"database schema {current} is newer than this code ({len(_MIGRATIONS)})"
                    )
                if current == len(_MIGRATIONS):
                    self._db.execute("COMMIT")
                    return
                for statement in _MIGRATIONS[current].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute("INSERT INTO schema_version (version) VALUES (?)", (current + 1,))
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    @property
    def schema_version(self) -> int:
        value: int = self._db.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        return value

    def _rollback(self) -> None:
        """Roll back if a transaction is still open (SQLite may already have done it)."""
        if self._db.in_transaction:
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction outside the Transaction interface."""
        with self.transaction():
            yield self._db

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group commit: every ``transaction()`` inside becomes a savepoint of one SQLite
        transaction, committed (and synced) once at the end. The caller must not
        acknowledge anything done inside before this block has exited normally: if the
        commit fails, StorageError is raised and all of it is rolled back."""
        if self._batch_depth:
            yield
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot start a transaction: {type(exc).__name__}") from None
        self._batch_depth = 1
        try:
            yield
        except BaseException:
            self._rollback()
            raise
        finally:
            self._batch_depth = 0
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise StorageError(f"commit failed: {type(exc).__name__}") from None

    @contextmanager
    def _savepoint(self) -> Iterator[Transaction]:
        """A transaction() inside batch(): a savepoint that rolls back on its own. Nested
        ones share the name (SQLite pairs ROLLBACK TO and RELEASE with the innermost), so
        the three statements stay in sqlite3's prepared-statement cache."""
        if not self._db.in_transaction:
            # Some errors (disk full, I/O error, a trigger's RAISE(ROLLBACK)) roll back the
            # whole batch, not just their savepoint. Without this check the next SAVEPOINT
            # would start, and its RELEASE commit, a transaction of its own: writes whose
            # answers abandon() drops would be durable all the same.
            raise StorageError("the batch's transaction was rolled back")
        self._db.execute("SAVEPOINT op")
        try:
            yield _SQLiteTransaction(self._db)
        except BaseException as exc:
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK TO op")
                self._db.execute("RELEASE op")
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"storage operation failed: {type(exc).__name__}") from None
            raise
        self._db.execute("RELEASE op")

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        if self._batch_depth:
            with self._savepoint() as tx:
                yield tx
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot start a transaction: {type(exc).__name__}") from None
        try:
            yield _SQLiteTransaction(self._db)
        except sqlite3.Error as exc:
            self._rollback()
            raise StorageError(f"storage operation failed: {type(exc).__name__}") from None
        except BaseException:
            self._rollback()
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise StorageError(f"commit failed: {type(exc).__name__}") from None

    def close(self) -> None:
        self._db.close()
