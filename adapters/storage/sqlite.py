"""SQLite key-server storage: the embedded default (STO-1).

Durability: WAL journal with ``synchronous=NORMAL``, and the WAL synced by this
module (``fdatasync``) after every commit that wrote acknowledged state (an account,
a secret, an operation's audit entry): exactly what ``FULL`` does for those commits.
In WAL mode ``NORMAL`` already survives a crash of the server *process* (committed
pages are in the WAL file, which the OS keeps), but may lose the last transactions on
power loss; an acknowledged store must survive both. Commits that wrote only login
bookkeeping (throttling rows, login and logout entries, detached sessions) skip the
sync: they become durable with the next commit that syncs (base.SOFT_AUDIT_ACTIONS).
Foreign keys are on. The file is created with owner-only permissions.

Commits on the event loop (:meth:`SQLiteStorage.commit_on_loop`, asked by the key server's
group commit): a batch that wrote nothing to sync may commit on the event loop instead of
in a worker thread, but only a commit that cannot reach an fsync: automatic checkpoints
are off for it, and it never is the first write after a checkpoint (SQLite syncs the WAL
header when it starts the WAL over). Checkpoints run in the worker thread: every commit
there has them on, and after ``LOOP_COMMITS_PER_CHECKPOINT`` commits on the loop the next
one goes to the thread.

Schema changes are numbered migrations recorded in ``schema_version``. The
statements it shares with the PostgreSQL backend are in :mod:`.sql`.
"""

from __future__ import annotations

import functools
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import replace
from pathlib import Path

from keymgmt_proto import (
    Action,
    AuditEntry,
    Context,
    KeyInfo,
    Outcome,
    audit_chain_hash_of,
    audit_genesis_hash,
)

from ..files import BUSY_TIMEOUT_MS, enable_wal, ensure_private_file
from .base import (
    SOFT_AUDIT_ACTIONS,
    Account,
    AuditQuery,
    AuditRecord,
    CredentialsChanged,
    LoginRecord,
    SecretRecord,
    StorageError,
    Transaction,
)
from .sql import (
    AUDIT_CHAIN_MARK,
    Row,
    Statements,
    account_if_named,
    account_values,
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

__all__ = ["LOOP_COMMITS_PER_CHECKPOINT", "SQLiteStorage"]

#: Commits in a row that may run on the event loop (see :meth:`SQLiteStorage.commit_on_loop`);
#: the next one commits in the worker thread, where SQLite may checkpoint the WAL, so the
#: WAL is checkpointed even when nothing but login bookkeeping is written.
LOOP_COMMITS_PER_CHECKPOINT = 64
#: WAL pages at which a commit in the worker thread checkpoints (SQLite's default).
WAL_AUTOCHECKPOINT_PAGES = 1000

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
    # 5: each account's number of stored keys (the per-user key limit reads it; issue 14)
    """
    ALTER TABLE accounts ADD COLUMN key_count INTEGER NOT NULL DEFAULT 0;
    UPDATE accounts SET key_count = (SELECT count(*) FROM secrets WHERE secrets.user_id = accounts.user_id);
    """,
    # 6: password change and account deletion: a deleted account's name stays reserved for a
    # while; detached sessions name their user, so a password change can drop them
    """
    CREATE TABLE reserved_names (
        account_name BLOB PRIMARY KEY,
        reserved_until_us INTEGER NOT NULL
    );
    ALTER TABLE detached_sessions ADD COLUMN user_id BLOB;
    CREATE INDEX detached_sessions_by_user ON detached_sessions(user_id);
    """,
    # 7: named keys (a sealed label the server cannot read), and the audit chain: each entry
    # stores its hash; the entries written before are chained by fill_audit_chain
    f"""
    ALTER TABLE secrets ADD COLUMN label BLOB;
    {AUDIT_CHAIN_MARK}
    ALTER TABLE audit ADD COLUMN chain_hash BLOB CHECK (chain_hash IS NULL OR length(chain_hash) = 32);
    """,
    # 8: when each account's password last changed (us; 0: never), read with the record by
    # every login: each instance ends a session that logged in before it. The changes made
    # before are read from the log (action 15 CHANGE_PASSWORD, outcome 0 SUCCESS).
    """
    ALTER TABLE accounts ADD COLUMN credentials_changed_us INTEGER NOT NULL DEFAULT 0;
    UPDATE accounts SET credentials_changed_us = coalesce((SELECT max(timestamp_us) FROM audit
        WHERE audit.user_id = accounts.user_id AND audit.action = 15 AND audit.outcome = 0), 0);
    """,
    # 9: a registration record replaced without its credentials version (by an instance of the
    # release of schema 7, still running during a rolling upgrade) moves the version on all the
    # same, so the sessions of the old password end on every upgraded instance. (The trigger's
    # body keeps its ';' inside the line: see migration_statements.)
    """
    CREATE TRIGGER accounts_credentials_moved AFTER UPDATE OF registration_record ON accounts
        FOR EACH ROW WHEN NEW.credentials_changed_us = OLD.credentials_changed_us
        BEGIN UPDATE accounts SET credentials_changed_us = OLD.credentials_changed_us + 1
            WHERE user_id = OLD.user_id; END;
    """,
    # 10: labels in a table of their own. In the secrets row the label came after the
    # ciphertext, whose overflow pages SQLite walks to reach it: listing the keys of 64 KiB
    # secrets read every ciphertext, and a rename rewrote the whole row. (A release of schema
    # 9, still running during an upgrade, writes secrets.label: the trigger copies it here.)
    """
    CREATE TABLE key_labels (
        key_id BLOB PRIMARY KEY REFERENCES secrets(key_id) ON DELETE CASCADE,
        label BLOB NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO key_labels (key_id, label) SELECT key_id, label FROM secrets WHERE label IS NOT NULL;
    UPDATE secrets SET label = NULL WHERE label IS NOT NULL;
    CREATE TRIGGER secrets_label_written AFTER UPDATE OF label ON secrets FOR EACH ROW
        BEGIN DELETE FROM key_labels WHERE key_id = NEW.key_id; -- then the new label, if any
        INSERT INTO key_labels SELECT NEW.key_id, NEW.label WHERE NEW.label IS NOT NULL; END;
    """,
    # 11: LIST_KEYS from an index alone. A secret of a few KiB fills a table page of its own
    # (no overflow chain), and the listing read the row of every key it skipped for its key
    # id and kind: an index holding both (in listing order) keeps it off the secrets rows.
    """
    CREATE INDEX secrets_listing ON secrets(user_id, created_us, key_id, kind);
    DROP INDEX secrets_by_user;
    """,
    # 12: a deleted account's audit log goes after the deletion, a chunk per transaction
    # (audit_purges queues it: _SQLiteTransaction.purge_audit), not in it: one DELETE of a
    # large log held the write lock for seconds. The audit table loses its foreign key, whose
    # ON DELETE CASCADE deleted the log with the account (SQLite cannot drop one in place:
    # the table is copied). Every entry is still written only while its user has an account:
    # the INSERT checks (see append_audit_fields). Entries no account owns (none, with the
    # key on) are queued too.
    """
    CREATE TABLE audit_purges (
        user_id BLOB PRIMARY KEY CHECK (length(user_id) = 16)
    ) WITHOUT ROWID;
    CREATE TABLE audit_unkeyed (
        user_id BLOB NOT NULL,
        seq INTEGER NOT NULL,
        action INTEGER NOT NULL,
        timestamp_us INTEGER NOT NULL,
        outcome INTEGER NOT NULL,
        key_id BLOB,
        context INTEGER,
        event_count INTEGER NOT NULL DEFAULT 1,
        chain_hash BLOB CHECK (chain_hash IS NULL OR length(chain_hash) = 32),
        PRIMARY KEY (user_id, seq)
    ) WITHOUT ROWID;
    INSERT INTO audit_unkeyed (user_id, seq, action, timestamp_us, outcome, key_id, context,
        event_count, chain_hash) SELECT user_id, seq, action, timestamp_us, outcome, key_id,
        context, event_count, chain_hash FROM audit;
    DROP TABLE audit;
    ALTER TABLE audit_unkeyed RENAME TO audit;
    INSERT INTO audit_purges (user_id) SELECT DISTINCT user_id FROM audit
        WHERE user_id NOT IN (SELECT user_id FROM accounts);
    """,
    # 13: the foreign key's refusal back, for every writer. This release's INSERTs check the
    # account themselves, but an instance of the release before 12, still running on the file
    # during a rolling restart, relied on the key: its entry for a deleted account (a logout,
    # a session's expiry) would have started a new log after the purge, owned by nobody and
    # never queued. The trigger refuses it as the key did (an IntegrityError). Such an entry
    # written while the file was at 12 (the two migrations commit apart: a waiting instance
    # may write in between; or the release of 12 ran) is queued, as migration 12 queued its.
    """
    CREATE TRIGGER audit_owned BEFORE INSERT ON audit FOR EACH ROW
        WHEN NOT EXISTS (SELECT 1 FROM accounts WHERE user_id = NEW.user_id)
        BEGIN SELECT RAISE(ABORT, 'FOREIGN KEY constraint failed'); END;
    INSERT INTO audit_purges (user_id) SELECT DISTINCT user_id FROM audit
        WHERE user_id NOT IN (SELECT user_id FROM accounts) ON CONFLICT (user_id) DO NOTHING;
    """,
]
#: LIST_KEYS on SQLite: the label from key_labels, no column after the ciphertext read.
#: Parameters: user id, rows_to_fetch, offset.
_LIST_KEYS = (
    "SELECT s.key_id, s.kind, s.created_us, l.label FROM secrets AS s "
    "LEFT JOIN key_labels AS l ON l.key_id = s.key_id WHERE s.user_id = ? "
    "ORDER BY s.created_us, s.key_id LIMIT ? OFFSET ?"
)
#: RENAME_KEY with a label: parameters: user id, key id, the sealed label.
_SET_LABEL = (
    "INSERT INTO key_labels (key_id, label) SELECT key_id, ?3 FROM secrets "
    "WHERE user_id = ?1 AND key_id = ?2 ON CONFLICT (key_id) DO UPDATE SET label = excluded.label"
)
#: RENAME_KEY to no label: the key's existence, then the delete. Parameters: user id, key id.
_KEY_EXISTS = "SELECT 1 FROM secrets WHERE user_id = ? AND key_id = ?"
_CLEAR_LABEL = "DELETE FROM key_labels WHERE key_id = ?"

_SQL = Statements("qmark")
_WAIT_FOR_WRITERS = f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}"
#: User ids per statement of credentials_versions (SQLite allows 32766 parameters).
_CHECK_CHUNK = 500


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused for a lock another connection holds (SQLITE_BUSY)."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY


_INSERT_AUDIT = (
    "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, key_id, context, event_count, "
    "chain_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: The same, only while the user has an account: an entry written without a session's
#: credentials (a registration's, a login's, a logout's). The audit table has no foreign key
#: (migration 12: a deleted account's log waits for purge_audit), so the INSERT checks.
_INSERT_OWNED_AUDIT = (
    "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, key_id, context, event_count, "
    "chain_hash) SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9 "
    "WHERE EXISTS (SELECT 1 FROM accounts WHERE user_id = ?1)"
)
#: The same, only while the account's credentials are the session's (see append_audit).
_INSERT_CURRENT_AUDIT = (
    "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, key_id, context, event_count, "
    "chain_hash) SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9 "
    "WHERE EXISTS (SELECT 1 FROM accounts WHERE user_id = ?1 AND credentials_changed_us = ?10)"
)
#: One key more for a user whose count the storage remembers (SQLiteStorage.key_counts):
#: applies only while the row still holds that count. Parameters: user id, the count.
_ADD_KEY_AT = "UPDATE accounts SET key_count = key_count + 1 WHERE user_id = ? AND key_count = ?"
#: The chain hash before a user's first entry.
_GENESIS = audit_genesis_hash()
_NO_ACCOUNT = "audit entry for a user who has no account"
_ANY_AUDIT_PURGE = "SELECT 1 FROM audit_purges LIMIT 1"
_LAST_AUDIT_ENTRY = "SELECT seq, chain_hash FROM audit WHERE user_id = ? ORDER BY seq DESC LIMIT 1"
#: Users whose last audit number (or key count) the storage remembers (then it starts again).
_AUDIT_NUMBERS_KEPT = 100_000
_AUDIT_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"


#: The condition of a multi-row audit INSERT: the user has an account (entries written
#: outside a session), or still has the session's credentials (see append_audit).
_OWNED = "user_id = ?"
_CURRENT = "user_id = ? AND credentials_changed_us = ?"


@functools.cache
def _guarded_audits_insert(count: int, condition: str) -> str:
    """_INSERT_AUDIT of ``count`` entries, all of them or none: only while an account row
    matches ``condition`` (_OWNED or _CURRENT)."""
    assert condition in (_OWNED, _CURRENT)  # (the text of one of these two constants, no input)
    return (  # (placeholders only: no value is ever spliced into the text)
        _INSERT_AUDIT.removesuffix("VALUES " + _AUDIT_ROW)  # noqa: S608
        + "SELECT * FROM (VALUES "
        + ", ".join([_AUDIT_ROW] * count)
        + f") WHERE EXISTS (SELECT 1 FROM accounts WHERE {condition})"  # noqa: S608
    )


#: A bytes parameter as sqlite3 binds it without asking its adapters first: sqlite3 looks
#: every parameter that is not exactly an int, float, str or bytearray up in its adapter
#: registry and then asks the object and the protocol for an adapter, raising and clearing
#: an AttributeError on each (about 3,000 instructions per bytes parameter, against about
#: 1,000 for this copy of 16 or 32 bytes). The value stored is the same BLOB.
_blob = bytearray


def _audit_row(record: AuditRecord, seq: int, chain_hash: bytes) -> tuple[object, ...]:
    """An audit entry's columns in table order, BLOBs bound as bytearray (see _blob)."""
    key_id, context = record.key_id, record.context
    return (
        _blob(record.user_id),
        seq,
        int(record.action),
        record.timestamp,
        int(record.outcome),
        None if key_id is None else _blob(key_id),
        None if context is None else int(context),
        record.count,
        _blob(chain_hash),
    )


class _SQLiteTransaction:
    def __init__(self, db: sqlite3.Connection, storage: SQLiteStorage) -> None:
        #: Every statement through one cursor: Connection.execute makes a cursor per call
        #: (about 1,000 instructions a statement); each result is read before the next runs.
        self._db = db.cursor()
        self._storage = storage

    def get_account(self, account_name: bytes) -> Account | None:
        return account_if_named(
            self._db.execute(_SQL.account_by_name, (_blob(account_name),)).fetchone(), account_name
        )

    def get_account_by_user_id(self, user_id: bytes) -> Account | None:
        row = self._db.execute(_SQL.account_by_user_id, (user_id,)).fetchone()
        return None if row is None else to_account(row)

    def user_id_exists(self, user_id: bytes) -> bool:
        return self._db.execute(_SQL.user_id_exists, {"user": user_id}).fetchone() is not None

    def insert_account(self, account: Account) -> bool:
        self._storage.sync_needed = True
        try:
            inserted: int = self._db.execute(_SQL.insert_account, account_values(account)).rowcount
        except sqlite3.IntegrityError:
            return False
        return inserted == 1

    def count_keys(self, user_id: bytes) -> int:
        row = self._db.execute(_SQL.count_keys, (_blob(user_id),)).fetchone()
        return 0 if row is None else int(row[0])

    def start_login(self, account_name: bytes, now: int, threshold: int, in_flight_for: int) -> bool:
        # The decision is one statement (concurrent starts of other processes serialize on
        # the write lock); a refusal is counted by a second one (see Statements.admit_login).
        params = start_login_params(_blob(account_name), now, threshold, in_flight_for)
        if self._db.execute(_SQL.admit_login, params).rowcount == 1:
            return True
        self._db.execute(_SQL.count_throttled, params)
        return False

    def finish_login(
        self, account_name: bytes, now: int, succeeded: bool, lock_for: Callable[[int], int] | None = None
    ) -> LoginRecord | None:
        # In the caller's transaction: SQLite has one writer at a time, so no lock cycle.
        name = _blob(account_name)
        if succeeded:
            # Read, then written (no RETURNING: see Statements.admit_login); under the write
            # lock nothing comes between.
            row = self._db.execute(_SQL.login_record, (name,)).fetchone()
            if row is None:
                return None
            record = to_login_record(row)
            if record.unlogged or record.throttled:  # handed over: cleared in the same statement
                self._db.execute(_SQL.login_done_logged, (name,))
            else:
                self._db.execute(_SQL.login_done, (name,))
            return record
        record = to_login_record(self._db.execute(_SQL.login_failed, (name, now)).fetchone())
        locked_until = lock_end(record, now, lock_for)
        if locked_until is not None:
            self._db.execute(_SQL.lock_login, (locked_until, name))
            record = replace(record, locked_until=locked_until)
        return record

    def get_login_record(self, account_name: bytes) -> LoginRecord | None:
        row = self._db.execute(_SQL.login_record, (_blob(account_name),)).fetchone()
        return None if row is None else to_login_record(row)

    def sweep_login_records(
        self, now: int, stale_before: int, in_flight_for: int, limit: int
    ) -> list[LoginRecord]:
        params = sweep_params(now, stale_before, in_flight_for, limit)
        rows = self._db.execute(_SQL.sweep_login_records, params).fetchall()
        return [to_login_record(row) for row in rows]

    def evict_login_records(
        self, now: int, threshold: int, in_flight_for: int, count: int
    ) -> list[LoginRecord]:
        # Tier after tier (the harmless, the unlocked, any), until enough are gone.
        rows: list[Row] = []
        for statement in _SQL.evict_login_records:
            if len(rows) == count:
                break
            params = eviction_params(now, threshold, in_flight_for, count - len(rows))
            rows += self._db.execute(statement, params).fetchall()
        return [to_login_record(row) for row in rows]

    def count_login_records(self) -> int:
        count: int = self._db.execute(_SQL.count_login_records).fetchone()[0]
        return count

    def key_id_exists(self, key_id: bytes) -> bool:
        return self._db.execute(_SQL.key_id_exists, (_blob(key_id),)).fetchone() is not None

    def insert_secret(self, secret: SecretRecord) -> bool:
        self._storage.sync_needed = True
        try:
            self._db.execute(_SQL.insert_secret, secret_values(secret, _blob))
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc):
                return False
            raise StorageError("the secret's user has no account") from None
        self._db.execute(_SQL.add_to_key_count, (1, _blob(secret.user_id)))
        self._storage.key_counts.pop(secret.user_id, None)
        return True

    def insert_secret_below(self, secret: SecretRecord, max_keys: int) -> int | None:
        # The count's update first, from the count the storage remembers (see key_counts):
        # one statement that applies only while the row still holds that count, so the limit
        # is checked against the count the update moves. Without a remembered count, or when
        # another process moved it, read it (SQLite has one writer: it holds until the insert).
        storage = self._storage
        storage.sync_needed = True
        user_id = secret.user_id
        counts = storage.key_counts
        count = counts.get(user_id, max_keys)
        if count >= max_keys or self._db.execute(_ADD_KEY_AT, (_blob(user_id), count)).rowcount != 1:
            row = self._db.execute(_SQL.count_keys, (_blob(user_id),)).fetchone()
            if row is None:
                raise StorageError("the secret's user has no account")
            count = int(row[0])
            if count >= max_keys:
                return 0
            self._db.execute(_SQL.add_to_key_count, (1, _blob(user_id)))
        try:
            self._db.execute(_SQL.insert_secret, secret_values(secret, _blob))
        except sqlite3.IntegrityError as exc:
            counts.pop(user_id, None)
            self._db.execute(_SQL.add_to_key_count, (-1, _blob(user_id)))  # nothing written
            if "UNIQUE" in str(exc):
                return None
            raise StorageError("the secret's user has no account") from None
        if len(counts) >= _AUDIT_NUMBERS_KEPT:
            counts.clear()
        counts[user_id] = count + 1
        return count + 1

    def get_secret(self, user_id: bytes, key_id: bytes) -> SecretRecord | None:
        row = self._db.execute(_SQL.secret, (_blob(user_id), _blob(key_id))).fetchone()
        return None if row is None else to_secret(user_id, key_id, row)

    def secret_fields(self, user_id: bytes, key_id: bytes) -> tuple[int, bytes, bytes] | None:
        row = self._db.execute(_SQL.secret, (_blob(user_id), _blob(key_id))).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def list_keys(self, user_id: bytes, offset: int, limit: int) -> tuple[list[KeyInfo], int]:
        rows = self._db.execute(_LIST_KEYS, (user_id, rows_to_fetch(limit), offset)).fetchall()
        return key_page(rows, offset, limit)

    def delete_secret(self, user_id: bytes, key_id: bytes) -> bool:
        self._storage.sync_needed = True
        cursor = self._db.execute(_SQL.delete_secret, (user_id, key_id))
        if cursor.rowcount != 1:
            return False
        self._db.execute(_SQL.add_to_key_count, (-1, user_id))
        self._storage.key_counts.pop(user_id, None)
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
        self._storage.checked_credentials.clear()
        statement = _SQL.replace_credentials if credentials is None else _SQL.replace_current_credentials
        params = credentials_params(user_id, registration_record, encrypted_storage_key, now, credentials)
        row = self._db.execute(statement, params).fetchone()
        return None if row is None else int(row[0])

    def delete_account(self, user_id: bytes, reserved_until: int, credentials: int | None = None) -> bool:
        account = self.get_account_by_user_id(user_id)
        if account is None:
            return False
        if credentials is not None and account.credentials_changed != credentials:
            raise CredentialsChanged(gone=False)
        self._storage.sync_needed = True
        self._storage.checked_credentials.clear()
        self._db.execute(_SQL.delete_user_secrets, (user_id,))
        self._db.execute(_SQL.queue_audit_purge, (user_id,))  # the log: purge_audit, later
        self._db.execute(_SQL.delete_login_record, (account.account_name,))
        self._db.execute(_SQL.delete_account, (user_id,))
        self._db.execute(_SQL.reserve_name, (account.account_name, reserved_until))
        self._storage.audit_numbers.pop(user_id, None)
        self._storage.key_counts.pop(user_id, None)
        return True

    def purge_audit(self, limit: int) -> int | None:
        # Nothing to sync: a chunk a power cut loses is deleted again, and the queue row goes
        # in the transaction that finds the log empty. Under the write lock (one writer), a
        # chunk short of the limit found the log's end; the check says so all the same.
        row = self._db.execute(_SQL.next_audit_purge).fetchone()
        if row is None:
            return None
        user_id = bytes(row[0])
        deleted: int = self._db.execute(_SQL.purge_audit_chunk, (user_id, user_id, limit)).rowcount
        if deleted < limit and self._db.execute(_SQL.audit_left, (user_id,)).fetchone() is None:
            self._db.execute(_SQL.audit_purged, (user_id,))
        self._storage.audit_numbers.pop(user_id, None)
        return deleted

    def name_reserved(self, account_name: bytes, now: int) -> bool:
        return self._db.execute(_SQL.name_reserved, (account_name, now)).fetchone() is not None

    def forget_reserved_names(self, now: int) -> int:
        return self._db.execute(_SQL.forget_reserved_names, (now,)).rowcount

    def set_label(self, user_id: bytes, key_id: bytes, sealed_label: bytes) -> bool:
        self._storage.sync_needed = True
        if sealed_label:
            return self._db.execute(_SET_LABEL, (user_id, key_id, sealed_label)).rowcount == 1
        if self._db.execute(_KEY_EXISTS, (user_id, key_id)).fetchone() is None:
            return False
        self._db.execute(_CLEAR_LABEL, (key_id,))
        return True

    def append_audit(self, record: AuditRecord, credentials: int | None = None) -> None:
        self.append_audit_fields(
            record.user_id,
            record.action,
            record.timestamp,
            record.outcome,
            record.key_id,
            record.context,
            credentials,
            record.count,
        )

    def append_audit_fields(
        self,
        user_id: bytes,
        action: Action,
        timestamp: int,
        outcome: Outcome,
        key_id: bytes | None,
        context: Context | None,
        credentials: int | None = None,
        count: int = 1,
    ) -> None:
        # Numbered, and chained, from the storage's memory of each user's last number and
        # hash: one statement. A number another process took meanwhile is refused by the
        # primary key, and the last entry is then read again (a batch holds the write lock:
        # nobody appends during it). Every rollback forgets the numbers, so none is ever
        # skipped, and no hash is ever computed from an entry that was rolled back. With
        # ``credentials`` the same statement checks the account's (INSERT ... SELECT ...
        # WHERE EXISTS): an entry of a session whose credentials changed inserts no row. Once
        # that check passed for a user and credentials in the open batch, which holds the
        # write lock (no other process writes before its commit), the user's next entries
        # for the same credentials are plain INSERTs: only this batch could change them, and
        # every change of credentials, every rollback and the batch's end forget the checks.
        storage = self._storage
        if action not in SOFT_AUDIT_ACTIONS:  # (needs_sync, inline)
            storage.sync_needed = True
        numbers, checked = storage.audit_numbers, storage.checked_credentials
        remembered = numbers.get(user_id)
        if remembered is not None:
            last, previous = remembered
        else:
            last, previous = self._last_audit_entry(user_id)
        while True:
            seq = last + 1
            chain_hash = audit_chain_hash_of(
                user_id, previous, seq, action, timestamp, outcome, key_id, context, count
            )
            values = (
                _blob(user_id),
                seq,
                int(action),
                timestamp,
                int(outcome),
                None if key_id is None else _blob(key_id),
                None if context is None else int(context),
                count,
                _blob(chain_hash),
            )
            try:
                if credentials is None:
                    if self._db.execute(_INSERT_OWNED_AUDIT, values).rowcount != 1:
                        raise StorageError(_NO_ACCOUNT)
                elif checked.get(user_id) == credentials:
                    self._db.execute(_INSERT_AUDIT, values)
                elif self._db.execute(_INSERT_CURRENT_AUDIT, (*values, credentials)).rowcount != 1:
                    # (only when the session must end:) its credentials changed, or the account is gone
                    gone = self._db.execute(_SQL.credentials_changed, (user_id,)).fetchone() is None
                    raise CredentialsChanged(gone)
                elif storage._batch_depth:
                    checked[user_id] = credentials
            except sqlite3.IntegrityError:
                if remembered is None:
                    raise
                # A number another process took meanwhile: read the last entry again.
                remembered = None
                last, previous = self._last_audit_entry(user_id)
                continue
            break
        if remembered is None and len(numbers) >= _AUDIT_NUMBERS_KEPT:
            numbers.clear()
        numbers[user_id] = (seq, chain_hash)

    def _last_audit_entry(self, user_id: bytes) -> tuple[int, bytes]:
        """The number and chain hash of the user's last audit entry ((0, the genesis hash)
        for none). An entry without a hash (written by a release before the audit chain)
        is a StorageError, as on PostgreSQL: the chain cannot go on from it."""
        row = self._db.execute(_LAST_AUDIT_ENTRY, (user_id,)).fetchone()
        if row is None:
            return 0, _GENESIS
        if row[1] is None:
            raise StorageError("the audit entry before is missing or not chained")
        return int(row[0]), row[1]

    def append_audits(self, records: Sequence[AuditRecord], credentials: int | None = None) -> None:
        # As append_audit, with every entry in one INSERT (and one credentials check).
        if len(records) == 1:
            self.append_audit(records[0], credentials)
            return
        user_id = records[0].user_id
        for record in records:
            if record.user_id != user_id:
                raise ValueError("append_audits takes the entries of one user")
            if record.action not in SOFT_AUDIT_ACTIONS:  # (needs_sync, inline)
                self._storage.sync_needed = True
        numbers = self._storage.audit_numbers
        remembered = numbers.get(user_id)
        if remembered is not None:
            try:
                numbers[user_id] = self._insert_audits(records, *remembered, credentials)
            except sqlite3.IntegrityError:
                pass  # a number another process took meanwhile: read the last entry again
            else:
                return
        written = self._insert_audits(records, *self._last_audit_entry(user_id), credentials)
        if len(numbers) >= _AUDIT_NUMBERS_KEPT:
            numbers.clear()
        numbers[user_id] = written

    def _insert_audits(
        self, records: Sequence[AuditRecord], last: int, previous: bytes | None, credentials: int | None
    ) -> tuple[int, bytes]:
        """Insert ``records`` as the user's entries after ``last`` (whose hash is
        ``previous``) in one statement; the number and hash of the last one written."""
        values: list[object] = []
        for record in records:
            last += 1
            previous = chain_hash_of(record, last, previous)
            values += _audit_row(record, last, previous)
        assert previous is not None
        user_id = records[0].user_id
        if credentials is None:
            statement = _guarded_audits_insert(len(records), _OWNED)
            if self._db.execute(statement, (*values, _blob(user_id))).rowcount != len(records):
                raise StorageError(_NO_ACCOUNT)
            return last, previous
        statement = _guarded_audits_insert(len(records), _CURRENT)
        if self._db.execute(statement, (*values, _blob(user_id), credentials)).rowcount == len(records):
            return last, previous
        gone = self._db.execute(_SQL.credentials_changed, (user_id,)).fetchone() is None
        raise CredentialsChanged(gone)

    def query_audit(self, user_id: bytes, query: AuditQuery) -> tuple[list[AuditEntry], int]:
        return read_audit(lambda sql, params: self._db.execute(sql, params).fetchall(), _SQL, user_id, query)


class _InBatch:
    """``transaction(atomic=False)`` inside a batch: no savepoint of its own (see there)."""

    __slots__ = ("_storage", "_tx")

    def __init__(self, storage: SQLiteStorage) -> None:
        self._storage = storage
        self._tx = _SQLiteTransaction(storage._db, storage)

    def __enter__(self) -> Transaction:
        if not self._storage._db.in_transaction:
            # Some errors (disk full, I/O error, a trigger's RAISE(ROLLBACK)) roll back the
            # whole batch, not just a savepoint. Without this check the next statement would
            # start (and a savepoint's RELEASE commit) a transaction of its own: writes whose
            # answers abandon() drops would be durable all the same.
            raise StorageError("the batch's transaction was rolled back")
        return self._tx

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, sqlite3.Error):
            self._storage.forget_audit_numbers()
            raise StorageError(f"storage operation failed: {type(exc).__name__}") from None


class _Batch:
    """:meth:`SQLiteStorage.batch` (a class, not a generator: about 3,000 instructions less
    per batch). Outermost: takes over the transaction begin_batch began (or begins it), and
    on leaving commits it, or rolls it back when the block raised; the writer lock is held
    until the commit has ended, in whichever thread ``__exit__`` runs. Nested: nothing."""

    __slots__ = ("_outer", "_storage")

    def __init__(self, storage: SQLiteStorage) -> None:
        self._storage = storage
        self._outer = False

    def __enter__(self) -> None:
        storage = self._storage
        if storage._batch_depth:
            return
        if not storage._batch_begun:
            storage.begin_batch(wait=True)
        storage._batch_begun = False
        storage._batch_depth = 1
        storage.checked_credentials.clear()
        self._outer = True

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if not self._outer:
            return
        storage = self._storage
        try:
            try:
                if kind is not None:
                    storage._rollback()
                    return  # (what the block raised goes on)
            finally:
                storage._batch_depth = 0
                storage.checked_credentials.clear()
            storage._commit()
        finally:
            storage._writer.release()


class _Savepoint(_InBatch):
    """``transaction()`` inside a batch: a savepoint that rolls back on its own. Nested ones
    share the name (SQLite pairs ROLLBACK TO and RELEASE with the innermost), so the three
    statements stay in sqlite3's prepared-statement cache. One object per storage, entered by
    every atomic request of a batch (a @contextmanager cost a generator and a transaction
    object per request)."""

    __slots__ = ()

    def __enter__(self) -> Transaction:
        tx = super().__enter__()
        self._tx._db.execute("SAVEPOINT op")
        return tx

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        db = self._tx._db
        if exc is None:
            db.execute("RELEASE op")
            return
        self._storage.forget_audit_numbers()
        with suppress(sqlite3.Error):
            db.execute("ROLLBACK TO op")
            db.execute("RELEASE op")
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"storage operation failed: {type(exc).__name__}") from None


class _WalFile:
    """The database's WAL file, synced after the commits that must be durable (the same
    ``fdatasync`` that ``synchronous=FULL`` would run at every commit)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: an in-memory database, nothing to sync
        self._fd: int | None = None
        self._inode = 0

    def sync(self) -> None:
        if self.path is None:
            return
        inode = os.stat(self.path).st_ino  # (a WAL file replaced meanwhile is opened again)
        if self._fd is None or inode != self._inode:
            self.close()
            self._fd = os.open(self.path, os.O_RDONLY)
            self._inode = os.fstat(self._fd).st_ino
            directory = os.open(self.path.parent, os.O_RDONLY)  # the file's name, too
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


#: Seconds past its deadline a detached session's row may stay before a save sweeps it (as on
#: PostgreSQL): an expired session is never resumed, whatever its row says.
EXPIRED_SESSION_GRACE = 3600.0
#: Seconds between two sweeps of expired rows by saves: the sweep reads every row (the table
#: has no index on expires_at), so it must not run on every save.
SESSION_SWEEP_INTERVAL = 60.0
_SWEEP_SESSIONS = "DELETE FROM detached_sessions WHERE expires_at < ?"


class _SQLiteSessionStore:
    """Detached sessions in the database file (they survive a restart of this server)."""

    def __init__(self, storage: SQLiteStorage, clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self._clock = clock
        self._swept_at = -math.inf

    def save(
        self,
        handle: bytes,
        sealed_state: bytes,
        expires_at: float,
        user_id: bytes | None = None,
        credentials_version: int | None = None,
    ) -> None:
        now = self._clock()
        sweep = now - self._swept_at >= SESSION_SWEEP_INTERVAL
        with self._storage._locked() as db:
            if credentials_version is None or user_id is None:
                db.execute(_SQL.save_session, (handle, sealed_state, expires_at, user_id))
            else:  # not stored if the password changed meanwhile, or the account is gone
                params = (handle, sealed_state, expires_at, user_id, user_id, credentials_version)
                db.execute(_SQL.save_current_session, params)
            if sweep:
                # Every login that ends with its connection leaves a row: kept until a week after
                # its deadline, the rows of a day of logins made every save read them all.
                db.execute(_SWEEP_SESSIONS, (now - EXPIRED_SESSION_GRACE,))
        if sweep:
            self._swept_at = now

    def claim(self, handle: bytes) -> bytes | None:
        # Durable: a claim lost to a power cut would let the session be resumed twice.
        with self._storage._locked() as db:
            self._storage.sync_needed = True
            row = db.execute(_SQL.claim_session, (handle,)).fetchone()
        return None if row is None else bytes(row[0])

    def drop_user(self, user_id: bytes) -> int:
        with self._storage._locked() as db:
            self._storage.sync_needed = True  # a dropped session must not come back
            dropped: int = db.execute(_SQL.drop_user_sessions, (user_id,)).rowcount
        return dropped


class SQLiteStorage:
    """Key-server storage in one SQLite file (created 0600 if missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        ensure_private_file(self.path, StorageError)
        self._batch_depth = 0
        #: Set by begin_batch: the next batch() takes over the transaction it began.
        self._batch_begun = False
        #: Set by a write whose commit must reach the disk before anything is answered.
        self.sync_needed = False
        #: Held by a batch from its BEGIN to the end of its commit (which may run in a worker
        #: thread), and by a transaction outside a batch: whoever uses the storage outside
        #: the group commit waits for it instead of interleaving with its COMMIT.
        self._writer = threading.Lock()
        self._wal = _WalFile(None if str(path) == ":memory:" else Path(f"{self.path}-wal"))
        #: Commits that synced the WAL (for tests and metrics).
        self.syncs = 0
        #: Commits run on the event loop, and their state (see commit_on_loop).
        self.loop_commits = 0
        self._loop_run = 0  # commits on the loop since the last one in the thread
        self._on_loop = False  # the open batch commits on the loop: it syncs nothing itself
        #: The WAL may start over at the next write (a commit with checkpoints on ran since
        #: the last one that wrote with them off): that write syncs the WAL header.
        self._restart_possible = True
        self._checkpoints = True  # PRAGMA wal_autocheckpoint is on (WAL_AUTOCHECKPOINT_PAGES)
        self._changes = 0  # total_changes when the open transaction began
        #: Owed by a commit on the loop that was asked for a sync after it was placed there:
        #: run by settle() in the worker thread before anything is answered.
        self.sync_owed = False
        #: The last audit entry number and chain hash of each user as committed or written in
        #: the open transaction (see append_audit); forgotten on every rollback.
        self.audit_numbers: dict[bytes, tuple[int, bytes]] = {}
        #: Each user's number of keys as committed or written in the open transaction, kept by
        #: insert_secret_below (a store then updates the count without reading it first: the
        #: update applies only while the row still holds it); forgotten on every rollback.
        self.key_counts: dict[bytes, int] = {}
        #: The credentials version each user's audit entries were checked against in the open
        #: batch (see append_audit_fields); forgotten with the audit numbers, by a change of
        #: credentials, and when the batch begins and ends.
        self.checked_credentials: dict[bytes, int] = {}
        #: The connection of credentials_versions (opened on first use).
        self._reader: sqlite3.Connection | None = None
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute(_WAIT_FOR_WRITERS)
            #: Whether the busy timeout is on (see _wait_for_writers).
            self._waits = True
            self._db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            self._db.execute("PRAGMA foreign_keys = ON")
            enable_wal(self._db, self.path, StorageError)
            self._db.execute("PRAGMA synchronous = FULL")
            self._migrate()
            # From here on this module syncs the WAL itself, after the commits that need it.
            self._db.execute("PRAGMA synchronous = NORMAL")
            #: Whether a deleted account's log waited in audit_purges when the file was opened:
            #: the runtime then purges at once; else its first purge waits for a deletion or
            #: its interval (an idle server takes no write lock).
            self.audit_purges_queued = self._any_audit_purge()
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot open key-server database {self.path}: {exc}") from None
        self.session_store = _SQLiteSessionStore(self)
        self._in_batch = _InBatch(self)
        self._savepoints = _Savepoint(self)

    def __repr__(self) -> str:
        return f"SQLiteStorage({str(self.path)!r})"

    def _any_audit_purge(self) -> bool:
        try:
            return self._db.execute(_ANY_AUDIT_PURGE).fetchone() is not None
        except sqlite3.OperationalError:  # no queue yet (a file kept at an older schema)
            return False

    def _migrate(self) -> None:
        self._db.execute(_SQL.create_schema_version)
        while True:
            self._db.execute("BEGIN IMMEDIATE")  # read the version under the write lock
            try:
                current = self._db.execute(_SQL.schema_version).fetchone()[0] or 0
                check_schema_version(current, _MIGRATIONS)
                if current == len(_MIGRATIONS):
                    self._db.execute("COMMIT")
                    return
                for statement in migration_statements(_MIGRATIONS[current]):
                    self._db.execute(statement)
                if AUDIT_CHAIN_MARK in _MIGRATIONS[current]:
                    fill_audit_chain(self._run, _SQL)
                self._db.execute(_SQL.record_schema_version, (current + 1,))
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _run(self, statement: str, params: Sequence[object]) -> list[Row]:
        return self._db.execute(statement, params).fetchall()

    @property
    def schema_version(self) -> int:
        value: int = self._db.execute(_SQL.schema_version).fetchone()[0]
        return value

    def forget_audit_numbers(self) -> None:
        """Something was rolled back: the remembered audit numbers and key counts may be
        ahead of the tables (and the credentials checked in the batch are checked again)."""
        self.audit_numbers.clear()
        self.key_counts.clear()
        self.checked_credentials.clear()

    def _rollback(self) -> None:
        """Roll back if a transaction is still open (SQLite may already have done it)."""
        self._on_loop = False
        self.forget_audit_numbers()
        if self._db.in_transaction:
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction outside the Transaction interface."""
        with self.transaction():
            yield self._db

    def batch(self) -> AbstractContextManager[None]:
        """Group commit: every ``transaction()`` inside becomes a savepoint of one SQLite
        transaction, committed (and synced) once at the end. The caller must not
        acknowledge anything done inside before this block has exited normally: if the
        commit fails, StorageError is raised and all of it is rolled back."""
        return _Batch(self)

    def begin_batch(self, *, wait: bool) -> bool:
        """Begin the write transaction of the next :meth:`batch`, which takes it over (the
        group commit begins it first on the event loop and, when another process holds the
        write lock, waits for it in its commit thread). True once begun; False, with nothing
        begun, when ``wait`` is False and the lock is another connection's. With ``wait``
        the busy timeout applies, as in batch(); StorageError if it runs out."""
        if self._batch_begun:
            return True
        self._writer.acquire()
        try:
            self._wait_for_writers(wait)
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._undo_begin()
            if not wait and isinstance(exc, sqlite3.OperationalError) and _busy(exc):
                return False
            raise StorageError(f"cannot start a transaction: {type(exc).__name__}") from None
        except BaseException:
            self._undo_begin()
            raise
        self._changes = self._db.total_changes
        self._batch_begun = True
        return True

    def _wait_for_writers(self, wait: bool) -> None:
        """Have the connection's next BEGIN wait for another process's write lock (the busy
        timeout) or not (refused at once). Only a BEGIN IMMEDIATE ever waits for a lock here
        (every other statement runs inside the transaction it began, holding the write lock;
        WAL readers wait for no writer), so the timeout is left as the last BEGIN needed it
        and set only when the next one needs the other: batches begun on the event loop,
        one after another, run no PRAGMA each (two cost about 6 us per batch)."""
        if wait != self._waits:
            self._db.execute(_WAIT_FOR_WRITERS if wait else "PRAGMA busy_timeout = 0")
            self._waits = wait

    def _undo_begin(self) -> None:
        """A begin_batch that failed: roll back if it had begun after all (a refused BEGIN
        leaves no transaction, and the remembered audit numbers stay), and free the writer
        lock."""
        try:
            with suppress(sqlite3.Error):  # (a closed connection cannot even say)
                if self._db.in_transaction:
                    self._rollback()
        finally:
            self._writer.release()

    def commit_on_loop(self) -> bool:
        """Whether the open batch may commit on the event loop: asked by the group commit, on
        the loop, after the batch's work and before its commit. True only for a commit that
        runs no fsync: it wrote nothing that must be synced, automatic checkpoints are off
        for it, and it cannot start the WAL over (the first write after a checkpoint, which
        SQLite syncs). Otherwise False, and the commit runs in the worker thread as always,
        with automatic checkpoints on, unless it syncs nothing and may start the WAL over
        (then off: the commit after it can then go to the loop). Every
        ``LOOP_COMMITS_PER_CHECKPOINT`` commits one goes to the thread, where SQLite
        checkpoints once the WAL holds ``WAL_AUTOCHECKPOINT_PAGES``."""
        if not self._batch_depth or not self._db.in_transaction:
            return False
        if self.sync_needed or self._restart_possible or self._loop_run >= LOOP_COMMITS_PER_CHECKPOINT:
            # (a commit that syncs keeps checkpoints on: a run of them toggles nothing)
            self._set_checkpoints(self.sync_needed or not self._restart_possible)
            self._loop_run = 0
            return False
        self._set_checkpoints(False)
        self._loop_run += 1
        self._on_loop = True
        return True

    def _set_checkpoints(self, on: bool) -> None:
        if on != self._checkpoints:
            self._db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES if on else 0}")
            self._checkpoints = on

    def settle(self) -> None:
        """Run the WAL sync that a commit on the event loop owes (``sync_owed``): in the
        worker thread, before anything that commit wrote is answered."""
        if self.sync_owed:
            self.sync_owed = False
            self._sync()

    def _commit(self) -> None:
        """COMMIT, then sync the WAL if what was committed must be durable. A failed sync is
        a failed commit: the caller acknowledges nothing (the data may or may not be on
        disk, as after any failed commit). A commit on the event loop never syncs: what it
        should have synced is owed (``sync_owed``) to :meth:`settle`."""
        on_loop, self._on_loop = self._on_loop, False
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self.sync_needed = False
            raise StorageError(f"commit failed: {type(exc).__name__}") from None
        if on_loop:
            self.loop_commits += 1
        elif self._checkpoints:  # it may have checkpointed: the next write may start the WAL over
            self._restart_possible = True
        elif self._db.total_changes != self._changes:  # it wrote (and so started the WAL over if due)
            self._restart_possible = False
        if self.sync_needed:
            self.sync_needed = False
            if on_loop:
                self.sync_owed = True
            else:
                self._sync()

    def _sync(self) -> None:
        try:
            self._wal.sync()
        except OSError as exc:
            raise StorageError(f"commit failed: cannot sync the WAL ({exc.strerror or exc})") from None
        self.syncs += 1

    def transaction(self, *, atomic: bool = True) -> AbstractContextManager[Transaction]:
        """A transaction; inside :meth:`batch` a savepoint (:class:`_Savepoint`), or, when
        ``atomic`` is False (the caller writes at most one statement, so a failure leaves
        nothing half-done: SQLite undoes a failed statement itself), the batch's
        transaction as it is."""
        if self._batch_depth:
            return self._savepoints if atomic else self._in_batch
        return self._transaction()

    @contextmanager
    def _transaction(self) -> Iterator[Transaction]:
        # (waits for a batch committing in another thread)
        if self._batch_begun:
            # A batch's transaction was begun ahead (begin_batch) and its batch() has not taken
            # it over: the writer lock is that batch's, which needs this thread (the event
            # loop) to go on. Waiting here would hang for good; refused instead.
            raise StorageError(
                "a transaction outside the batch begun ahead of it (two group commits over one storage?)"
            )
        with self._writer, self._unlocked_transaction() as tx:
            yield tx

    @contextmanager
    def _unlocked_transaction(self) -> Iterator[Transaction]:
        try:
            self._wait_for_writers(True)
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot start a transaction: {type(exc).__name__}") from None
        self._changes = self._db.total_changes
        try:
            yield _SQLiteTransaction(self._db, self)
        except sqlite3.Error as exc:
            self._rollback()
            raise StorageError(f"storage operation failed: {type(exc).__name__}") from None
        except BaseException:
            self._rollback()
            raise
        self._commit()

    def credentials_versions(self, user_ids: Sequence[bytes]) -> dict[bytes, int] | None:
        """The credentials version of each of ``user_ids`` that has an account (a deleted one
        is missing), as committed. A read on a connection of its own, outside every batch and
        transaction: it takes no lock a writer waits for (WAL: readers never block writers
        nor wait for them), so a writer stopped mid-batch in another process stalls nothing.
        For the key server's periodic check of the sessions it holds; call it from one
        thread at a time. None for an in-memory database: no other process can change its
        accounts (and a connection of its own would see an empty database, every account
        missing, as if deleted)."""
        if str(self.path) == ":memory:":
            return None
        found: dict[bytes, int] = {}
        if not user_ids:
            return found
        try:
            if self._reader is None:
                self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            for start in range(0, len(user_ids), _CHECK_CHUNK):
                chunk = user_ids[start : start + _CHECK_CHUNK]
                marks = ", ".join("?" * len(chunk))
                rows = self._reader.execute(
                    f"SELECT user_id, credentials_changed_us FROM accounts WHERE user_id IN ({marks})",  # noqa: S608
                    chunk,
                )
                found.update((bytes(user_id), int(version)) for user_id, version in rows)
        except sqlite3.Error as exc:
            raise StorageError(f"storage operation failed: {type(exc).__name__}") from None
        return found

    def close(self) -> None:
        self._wal.close()
        if self._reader is not None:
            self._reader.close()
        self._db.close()
