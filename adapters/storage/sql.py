"""The SQL both key-server backends run: statements, the audit-query builder, the
parameters of each statement and the records made from its rows.

SQLite and PostgreSQL hold the same tables with the same columns, so most statements are
the same text except for how the driver marks a parameter: sqlite3 takes ``?`` and
``:name``, psycopg ``%s`` and ``%(name)s``. :class:`Statements` writes each statement once,
as sqlite3 takes it, and spells it for one driver. The login-throttling statements are
written to run on both: column references in ``ON CONFLICT DO UPDATE`` are qualified with
the table (PostgreSQL finds a bare one ambiguous), ``TRUE`` for the boolean (1 in SQLite)
and a ``CASE`` where SQLite would say ``max(x, 0)`` and PostgreSQL ``GREATEST(x, 0)``.

What differs stays in each backend: connections, transactions and locks (and which
connection a throttling statement runs on), the migrations (BLOB against BYTEA, and their
own history), how a taken account name or key id is told apart from another error, how
audit entries are numbered, and when old detached sessions are dropped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

from keymgmt_proto import (
    MAX_AUDIT_SCAN,
    MAX_SEALED_LABEL_SIZE,
    SEALED_OVERHEAD,
    Action,
    AuditEntry,
    AuditType,
    Context,
    KeyInfo,
    Outcome,
    SecretKind,
    audit_chain_hash,
    audit_chain_hash_of,
    audit_genesis_hash,
)

from .base import Account, AuditQuery, AuditRecord, LoginRecord, SecretRecord, StorageError

__all__ = [
    "AUDIT_CHAIN_MARK",
    "UNOPENABLE_LABEL",
    "Row",
    "Statements",
    "account_values",
    "audit_page",
    "audit_values",
    "chain_hash_of",
    "check_schema_version",
    "credentials_params",
    "eviction_params",
    "fill_audit_chain",
    "key_page",
    "listed_label",
    "lock_end",
    "migration_statements",
    "read_audit",
    "rows_to_fetch",
    "secret_values",
    "start_login_params",
    "sweep_params",
    "to_account",
    "to_login_record",
    "to_secret",
]

log = logging.getLogger("keymgmt.server")

#: A row as either driver returns it.
Row = Sequence[Any]

ACCOUNT_COLUMNS = (
    "account_name, user_id, registration_record, encrypted_storage_key, created_us, credentials_changed_us"
)
#: A secret's columns besides the user id and key id it is looked up by.
SECRET_COLUMNS = "kind, ciphertext, associated_data, created_us"  # noqa: S105
AUDIT_COLUMNS = "seq, action, timestamp_us, outcome, key_id, context, event_count, chain_hash"
#: In a migration's text: after its statements, compute the audit chain of the entries
#: written before it (:func:`fill_audit_chain`), in the migration's transaction.
AUDIT_CHAIN_MARK = "-- then: fill the audit chain"
LOGIN_COLUMNS = (
    "account_name, failures, unlogged, throttled, last_failure_us, last_throttled_us, locked_until_us"
)
#: The actions an OPS-6 KEY_ONLY selection keeps (SYSTEM_ONLY keeps the others).
KEY_ACTIONS = tuple(int(a) for a in Action if a.is_key_action)

# NET-10: a login counts as in flight from its admission until it finishes, for at most
# ``in_flight_for`` us (:recent is now - in_flight_for); a name admits a login unless it is
# locked, or unless failures and logins in flight reach the threshold while one is in flight.
_IN_FLIGHT = "(CASE WHEN login_throttle.last_start_us > :recent THEN login_throttle.pending ELSE 0 END)"
_ADMIT = (
    f"(login_throttle.locked_until_us <= :now AND (login_throttle.failures + {_IN_FLIGHT} < :threshold "
    f"OR {_IN_FLIGHT} = 0))"
)
#: One login fewer in flight, never below 0.
_ONE_FEWER_PENDING = "CASE WHEN login_throttle.pending > 0 THEN login_throttle.pending - 1 ELSE 0 END"
#: Which records an eviction takes, tier after tier, oldest last failure first: the harmless
#: (below the threshold, not locked, no login in flight), then the unlocked, then any.
_EVICTION_TIERS = (
    "failures < :threshold AND locked_until_us < :now AND (pending = 0 OR last_start_us < :recent)",
    "locked_until_us < :now",
    "TRUE",
)
_NAMED_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


def _pyformat(statement: str) -> str:
    """The statement as psycopg takes it: ``?`` becomes ``%s``, ``:name`` ``%(name)s``."""
    assert "%" not in statement, statement  # psycopg would read it as a placeholder
    return _NAMED_PARAMETER.sub(r"%(\1)s", statement.replace("?", "%s"))


def _as_written(statement: str) -> str:
    return statement


class Statements:
    """The statements both backends run, spelled for one driver: ``qmark`` for sqlite3,
    ``pyformat`` for psycopg. ``lock_rows`` ends the subqueries that pick login records
    to delete, and the pick of a log to purge (PostgreSQL's ``FOR UPDATE SKIP LOCKED``);
    ``lock_shared`` the one that reads an account's credentials version for a session being
    stored (PostgreSQL's ``FOR SHARE``: it waits for a password change under way and reads
    the version it commits)."""

    def __init__(
        self, paramstyle: Literal["qmark", "pyformat"] = "qmark", lock_rows: str = "", lock_shared: str = ""
    ) -> None:
        spell: Callable[[str], str] = _pyformat if paramstyle == "pyformat" else _as_written
        #: How a positional parameter is marked, for statements built per call.
        self.mark = spell("?")

        # Accounts
        #: NET-9: a registered name and an unknown one cost the same lookup. A hit searches the
        #: name's index and then reads the row; a miss would stop after the index, about a
        #: microsecond sooner, which a timing probe over loopback learned to see (60-70% right
        #: on 40 names, now and then over the test's 75%). So a miss goes on to read another
        #: account's row (the table's first), and the caller keeps the row only if its name is
        #: the one asked for (see :func:`account_if_named`). Parameters: the name.
        self.account_by_name = spell(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_name = ? UNION ALL "
            f"SELECT * FROM (SELECT {ACCOUNT_COLUMNS} FROM accounts LIMIT 1) AS stand_in "
            "LIMIT 1"
        )
        self.account_by_user_id = spell(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE user_id = ?")
        #: A user id that an account has, or whose log still waits to be purged (a new account
        #: must not continue the log of a deleted one). Parameters: ``{"user": user id}``.
        self.user_id_exists = spell(
            "SELECT 1 FROM accounts WHERE user_id = :user UNION ALL "
            "SELECT 1 FROM audit_purges WHERE user_id = :user LIMIT 1"
        )
        #: Values: :func:`account_values`. Nothing is inserted for a user id whose log still
        #: waits to be purged (the new account would continue the deleted one's log).
        self.insert_account = spell(
            "INSERT INTO accounts (user_id, account_name, registration_record, encrypted_storage_key, "
            "created_us) SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM audit_purges WHERE user_id = ?)"
        )

        # Secrets
        self.key_id_exists = spell("SELECT 1 FROM secrets WHERE key_id = ?")
        #: The user's stored keys, kept in the account row by insert_secret and delete_secret (a
        #: count(*) over the user's secrets took about 60 us per 1,000 keys, on every store).
        self.count_keys = spell("SELECT key_count FROM accounts WHERE user_id = ?")
        #: Parameters: +1 or -1, the user id; in the transaction that inserts or deletes the key.
        self.add_to_key_count = spell("UPDATE accounts SET key_count = key_count + ? WHERE user_id = ?")
        #: One key more, only below the limit: the store's limit check and its count's update in
        #: one statement, under the account row's lock (PostgreSQL: concurrent stores of several
        #: instances cannot pass the limit). No row: the limit is reached, or there is no
        #: account. Parameters: user id, the limit.
        self.add_key_below = spell(
            "UPDATE accounts SET key_count = key_count + 1 WHERE user_id = ? AND key_count < ? "
            "RETURNING key_count"
        )
        #: Values: :func:`secret_values`.
        self.insert_secret = spell(
            "INSERT INTO secrets (key_id, user_id, kind, ciphertext, associated_data, created_us) "
            "VALUES (?, ?, ?, ?, ?, ?)"
        )
        #: Parameters: user id, key id; rows: :func:`to_secret`.
        self.secret = spell(f"SELECT {SECRET_COLUMNS} FROM secrets WHERE user_id = ? AND key_id = ?")
        #: Parameters: user id, :func:`rows_to_fetch`, offset; rows: :func:`key_page`.
        self.list_keys = spell(
            "SELECT key_id, kind, created_us, label FROM secrets WHERE user_id = ? "
            "ORDER BY created_us, key_id LIMIT ? OFFSET ?"
        )
        self.delete_secret = spell("DELETE FROM secrets WHERE user_id = ? AND key_id = ?")
        #: Parameters: the sealed label (NULL for none), user id, key id.
        self.set_label = spell("UPDATE secrets SET label = ? WHERE user_id = ? AND key_id = ?")

        # Audit chain
        #: The hash of the user's entry ``seq``; parameters: user id, seq.
        self.audit_hash = spell("SELECT chain_hash FROM audit WHERE user_id = ? AND seq = ?")
        #: Users with entries not yet in the chain (the migration that adds it).
        self.unchained_users = spell("SELECT DISTINCT user_id FROM audit WHERE chain_hash IS NULL")
        self.user_audit = spell(f"SELECT {AUDIT_COLUMNS} FROM audit WHERE user_id = ? ORDER BY seq")
        #: Parameters: hash, user id, seq.
        self.set_audit_hash = spell("UPDATE audit SET chain_hash = ? WHERE user_id = ? AND seq = ?")
        #: Where one AUDIT request stops reading (protocol.md 12.9): the entry ids of the
        #: MAX_AUDIT_SCAN-th entry after the cursor and of the one after it, when there are
        #: such. Parameters: user id, cursor, MAX_AUDIT_SCAN - 1. Reads entry ids only.
        self.audit_scan_end = spell(
            "SELECT seq FROM audit WHERE user_id = ? AND seq > ? ORDER BY seq LIMIT 2 OFFSET ?"
        )

        # Login throttling (NET-10); rows: :func:`to_login_record`
        #: Admit a login or count it throttled, in one statement; parameters:
        #: :func:`start_login_params`.
        self.start_login = spell(
            "INSERT INTO login_throttle (account_name, failures, locked_until_us, last_failure_us, "
            "pending, last_start_us, admitted, unlogged, throttled) "
            "VALUES (:name, 0, 0, 0, 1, :now, TRUE, 0, 0) "
            f"ON CONFLICT (account_name) DO UPDATE SET admitted = {_ADMIT}, "
            f"pending = CASE WHEN {_ADMIT} THEN {_IN_FLIGHT} + 1 ELSE login_throttle.pending END, "
            f"throttled = CASE WHEN {_ADMIT} THEN login_throttle.throttled "
            "ELSE login_throttle.throttled + 1 END, "
            f"last_throttled_us = CASE WHEN {_ADMIT} THEN login_throttle.last_throttled_us ELSE :now END, "
            f"last_start_us = CASE WHEN {_ADMIT} THEN :now ELSE login_throttle.last_start_us END "
            "RETURNING admitted"
        )
        #: start_login without RETURNING, for SQLite (where a RETURNING clause fills an
        #: ephemeral table on every run: an UPDATE ... RETURNING of one row cost about 40,000
        #: instructions against 14,000 without it): the upsert writes only when it admits,
        #: so its row count (1) says admitted; 0 leaves the refusal to :attr:`count_throttled`
        #: in the same transaction (SQLite has one writer: nothing comes between). The
        #: decision is still one statement. Parameters: :func:`start_login_params`.
        self.admit_login = spell(
            "INSERT INTO login_throttle (account_name, failures, locked_until_us, last_failure_us, "
            "pending, last_start_us, admitted, unlogged, throttled) "
            "VALUES (:name, 0, 0, 0, 1, :now, TRUE, 0, 0) "
            f"ON CONFLICT (account_name) DO UPDATE SET admitted = TRUE, pending = {_IN_FLIGHT} + 1, "
            f"last_start_us = :now WHERE {_ADMIT}"
        )
        #: The refusal admit_login left undone (what start_login writes for one); parameters:
        #: :func:`start_login_params`.
        self.count_throttled = spell(
            "UPDATE login_throttle SET admitted = FALSE, throttled = login_throttle.throttled + 1, "
            "last_throttled_us = :now WHERE account_name = :name"
        )
        #: login_succeeded in two statements without RETURNING, for SQLite (see admit_login):
        #: :attr:`login_record` read first, then one of these. Parameters: the name.
        self.login_done = spell(
            f"UPDATE login_throttle SET pending = {_ONE_FEWER_PENDING} WHERE account_name = ?"
        )
        #: The same, with the counts the success hands over to the owner's log cleared.
        self.login_done_logged = spell(
            f"UPDATE login_throttle SET pending = {_ONE_FEWER_PENDING}, unlogged = 0, throttled = 0 "
            "WHERE account_name = ?"
        )
        #: A login succeeded: no longer in flight; the record is returned (with the counts
        #: waiting for the owner's log) from the same statement, so the common success (no
        #: counts waiting) costs one statement. Parameters: the name.
        self.login_succeeded = spell(
            f"UPDATE login_throttle SET pending = {_ONE_FEWER_PENDING} WHERE account_name = ? "
            f"RETURNING {LOGIN_COLUMNS}"
        )
        #: After a success whose record held counts for the owner's log (its row was just
        #: written, so it is locked): they are being logged. Parameters: the name.
        self.login_counts_logged = spell(
            "UPDATE login_throttle SET unlogged = 0, throttled = 0 WHERE account_name = ?"
        )
        #: A login failed: an upsert, so that a failure counts even if the record went while
        #: the login ran. Parameters: the name, now.
        self.login_failed = spell(
            "INSERT INTO login_throttle (account_name, failures, locked_until_us, last_failure_us, "
            "unlogged) VALUES (?, 1, 0, ?, 1) ON CONFLICT (account_name) DO UPDATE SET "
            f"pending = {_ONE_FEWER_PENDING}, failures = login_throttle.failures + 1, "
            "unlogged = login_throttle.unlogged + 1, last_failure_us = excluded.last_failure_us "
            f"RETURNING {LOGIN_COLUMNS}"
        )
        #: Parameters: the end of the lock (:func:`lock_end`), the name.
        self.lock_login = spell("UPDATE login_throttle SET locked_until_us = ? WHERE account_name = ?")
        self.login_record = spell(f"SELECT {LOGIN_COLUMNS} FROM login_throttle WHERE account_name = ?")
        #: Parameters: :func:`sweep_params`.
        self.sweep_login_records = spell(
            "DELETE FROM login_throttle WHERE account_name IN (SELECT account_name FROM login_throttle "
            "WHERE last_failure_us < ? AND locked_until_us < ? AND (pending = 0 OR last_start_us < ?) "
            f"LIMIT ?{lock_rows}) RETURNING {LOGIN_COLUMNS}"
        )
        #: One statement per tier, run in this order until enough are gone; parameters:
        #: :func:`eviction_params`. By last failure, not last use: a success moves that, and
        #: the order would tell a prober, NET-9.
        self.evict_login_records = tuple(
            spell(
                "DELETE FROM login_throttle WHERE account_name IN (SELECT account_name FROM login_throttle "
                f"WHERE {where} ORDER BY last_failure_us LIMIT :limit{lock_rows}) RETURNING {LOGIN_COLUMNS}"
            )
            for where in _EVICTION_TIERS
        )
        self.count_login_records = spell("SELECT count(*) FROM login_throttle")

        # Detached sessions
        self.save_session = spell(
            "INSERT INTO detached_sessions (handle, sealed_state, expires_at, user_id) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (handle) DO UPDATE SET sealed_state = excluded.sealed_state, "
            "expires_at = excluded.expires_at, user_id = excluded.user_id"
        )
        #: Every stored session of an account (its password changed, or it was deleted).
        #: save_session, only while the account's credentials version is the session's
        #: (parameters: save_session's, then the user id and the version): a session of a
        #: password changed meanwhile, or of a deleted account, is not stored.
        self.save_current_session = spell(
            "INSERT INTO detached_sessions (handle, sealed_state, expires_at, user_id) SELECT ?, ?, ?, ? "
            "WHERE EXISTS (SELECT 1 FROM accounts WHERE user_id = ? AND credentials_changed_us = ?"
            + lock_shared
            + ") ON CONFLICT (handle) DO UPDATE SET sealed_state = excluded.sealed_state, "
            "expires_at = excluded.expires_at, user_id = excluded.user_id"
        )
        self.drop_user_sessions = spell("DELETE FROM detached_sessions WHERE user_id = ?")

        # Password change, account deletion, reserved names
        #: Parameters: :func:`credentials_params`; the new credentials_changed_us is now, or
        #: one more than before when that is not less (it changes with every change).
        self.replace_credentials = spell(
            "UPDATE accounts SET registration_record = :record, encrypted_storage_key = :key, "
            "credentials_changed_us = CASE WHEN :now > credentials_changed_us THEN :now "
            "ELSE credentials_changed_us + 1 END WHERE user_id = :user RETURNING credentials_changed_us"
        )
        #: The same, only while the credentials are still those a session logged in with.
        self.replace_current_credentials = spell(
            "UPDATE accounts SET registration_record = :record, encrypted_storage_key = :key, "
            "credentials_changed_us = CASE WHEN :now > credentials_changed_us THEN :now "
            "ELSE credentials_changed_us + 1 END "
            "WHERE user_id = :user AND credentials_changed_us = :expected RETURNING credentials_changed_us"
        )
        self.credentials_changed = spell("SELECT credentials_changed_us FROM accounts WHERE user_id = ?")
        self.delete_user_secrets = spell("DELETE FROM secrets WHERE user_id = ?")
        # A deleted account's audit log is purged later, a chunk per transaction (the deletion
        # only queues it: one DELETE of a log of a million entries held SQLite's write lock
        # for seconds, and every other user's request waited).
        self.queue_audit_purge = spell(
            "INSERT INTO audit_purges (user_id) VALUES (?) ON CONFLICT (user_id) DO NOTHING"
        )
        #: A user whose log is queued for purging (PostgreSQL: one no other instance is purging).
        self.next_audit_purge = spell(f"SELECT user_id FROM audit_purges LIMIT 1{lock_rows}")
        #: The user's first entries, at most the limit. Parameters: user id, user id, limit.
        self.purge_audit_chunk = spell(
            "DELETE FROM audit WHERE user_id = ? AND seq IN "
            "(SELECT seq FROM audit WHERE user_id = ? ORDER BY seq LIMIT ?)"
        )
        self.audit_left = spell("SELECT 1 FROM audit WHERE user_id = ? LIMIT 1")
        self.audit_purged = spell("DELETE FROM audit_purges WHERE user_id = ?")
        self.delete_login_record = spell("DELETE FROM login_throttle WHERE account_name = ?")
        self.delete_account = spell("DELETE FROM accounts WHERE user_id = ?")
        self.reserve_name = spell(
            "INSERT INTO reserved_names (account_name, reserved_until_us) VALUES (?, ?) "
            "ON CONFLICT (account_name) DO UPDATE SET reserved_until_us = excluded.reserved_until_us"
        )
        self.name_reserved = spell(
            "SELECT 1 FROM reserved_names WHERE account_name = ? AND reserved_until_us > ?"
        )
        self.forget_reserved_names = spell("DELETE FROM reserved_names WHERE reserved_until_us <= ?")
        #: Exactly once: two claims of one handle cannot both get the row.
        self.claim_session = spell("DELETE FROM detached_sessions WHERE handle = ? RETURNING sealed_state")

        # Schema version
        self.create_schema_version = spell(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
        )
        self.schema_version = spell("SELECT max(version) FROM schema_version")
        self.record_schema_version = spell("INSERT INTO schema_version (version) VALUES (?)")

    def audit_query(self, user_id: bytes, query: AuditQuery, last: int | None) -> tuple[str, list[object]]:
        """The SELECT of the user's entries that ``query`` selects, from its cursor on up to
        entry ``last`` (None: to the log's end), one more than its limit (:func:`audit_page`
        cuts the page), and its parameters."""
        mark = self.mark
        clauses = [f"user_id = {mark}", f"seq > {mark}"]
        params: list[object] = [user_id, query.cursor]
        if last is not None:
            clauses.append(f"seq <= {mark}")
            params.append(last)
        key_actions = ", ".join([mark] * len(KEY_ACTIONS))
        if query.audit_type is AuditType.KEY_ONLY:
            clauses.append(f"action IN ({key_actions})")
            params += KEY_ACTIONS
        elif query.audit_type is AuditType.SYSTEM_ONLY:
            clauses.append(f"action NOT IN ({key_actions})")
            params += KEY_ACTIONS
        if query.key_ids:
            clauses.append(f"key_id IN ({', '.join([mark] * len(query.key_ids))})")
            params += query.key_ids
        if query.after is not None:
            clauses.append(f"timestamp_us >= {mark}")
            params.append(query.after)
        if query.before is not None:
            clauses.append(f"timestamp_us < {mark}")
            params.append(query.before)
        params.append(rows_to_fetch(query.limit))
        where = " AND ".join(clauses)
        return f"SELECT {AUDIT_COLUMNS} FROM audit WHERE {where} ORDER BY seq LIMIT {mark}", params


# --- parameters ----------------------------------------------------------------------------


def account_values(account: Account) -> tuple[object, ...]:
    """The values of :attr:`Statements.insert_account`."""
    return (
        account.user_id,
        account.account_name,
        account.registration_record,
        account.encrypted_storage_key,
        account.created,
        account.user_id,
    )


def credentials_params(
    user_id: bytes, registration_record: bytes, encrypted_storage_key: bytes, now: int, expected: int | None
) -> dict[str, object]:
    """The parameters of :attr:`Statements.replace_credentials` (``expected`` None) or of
    :attr:`Statements.replace_current_credentials`."""
    params: dict[str, object] = {
        "record": registration_record,
        "key": encrypted_storage_key,
        "now": now,
        "user": user_id,
    }
    if expected is not None:
        params["expected"] = expected
    return params


def secret_values(secret: SecretRecord, blob: Callable[[bytes], object] = bytes) -> tuple[object, ...]:
    """The values of :attr:`Statements.insert_secret`, each BLOB as ``blob`` makes it (SQLite
    binds ``bytearray``: see sqlite._blob)."""
    return (
        blob(secret.key_id),
        blob(secret.user_id),
        int(secret.kind),
        blob(secret.ciphertext),
        blob(secret.associated_data),
        secret.created,
    )


def audit_values(record: AuditRecord, chain_hash: bytes) -> tuple[object, ...]:
    """An audit entry's columns after ``user_id`` and ``seq`` (each backend numbers entries
    its own way): action, timestamp_us, outcome, key_id, context, event_count, chain_hash."""
    return (
        int(record.action),
        record.timestamp,
        int(record.outcome),
        record.key_id,
        None if record.context is None else int(record.context),
        record.count,
        chain_hash,
    )


def chain_hash_of(record: AuditRecord, seq: int, previous: bytes | None) -> bytes:
    """The audit-chain hash of ``record`` written as the user's entry ``seq``, after the entry
    whose hash is ``previous`` (None for entry 1: the genesis hash)."""
    return audit_chain_hash_of(
        record.user_id,
        _GENESIS if previous is None else previous,
        seq,
        record.action,
        record.timestamp,
        record.outcome,
        record.key_id,
        record.context,
        record.count,
    )


_GENESIS = audit_genesis_hash()


def fill_audit_chain(run: Callable[[str, Sequence[object]], list[Row]], statements: Statements) -> None:
    """The migration that adds the audit chain: compute the hash of every entry written
    before it, user by user in entry order from the genesis hash, as if the chain had always
    been there. ``run`` executes a statement in the migration's transaction and returns its
    rows."""
    for (user_id,) in run(statements.unchained_users, ()):
        previous = audit_genesis_hash()
        for row in run(statements.user_audit, (user_id,)):
            entry = _entry(row)
            previous = audit_chain_hash(bytes(user_id), previous, entry)
            run(statements.set_audit_hash, (previous, user_id, entry.entry_id))


def rows_to_fetch(limit: int) -> int:
    """Rows to read for a page of ``limit``: one more tells whether a next page exists."""
    return limit + 1


def start_login_params(
    account_name: bytes | bytearray, now: int, threshold: int, in_flight_for: int
) -> dict[str, object]:
    """The parameters of :attr:`Statements.start_login`."""
    return {"name": account_name, "now": now, "threshold": threshold, "recent": now - in_flight_for}


def sweep_params(now: int, stale_before: int, in_flight_for: int, limit: int) -> tuple[object, ...]:
    """The parameters of :attr:`Statements.sweep_login_records`."""
    return (stale_before, now, now - in_flight_for, limit)


def eviction_params(now: int, threshold: int, in_flight_for: int, limit: int) -> dict[str, object]:
    """The parameters of each of :attr:`Statements.evict_login_records`."""
    return {"threshold": threshold, "now": now, "recent": now - in_flight_for, "limit": limit}


def lock_end(record: LoginRecord, now: int, lock_for: Callable[[int], int] | None) -> int | None:
    """When a name whose login just failed is locked until, if that is later than its lock
    (a lock never shortens); None when its lock stays as it is."""
    wait = lock_for(record.failures) if lock_for is not None else 0
    return now + wait if wait > 0 and now + wait > record.locked_until else None


# --- records from rows -----------------------------------------------------------------------


def to_account(row: Row) -> Account:
    """An :data:`ACCOUNT_COLUMNS` row."""
    return Account(*row)


def account_if_named(row: Row | None, account_name: bytes) -> Account | None:
    """The account of a :attr:`Statements.account_by_name` row, None when the row is the
    stand-in another account's row gives an unknown name (built either way: same work)."""
    if row is None:
        return None
    account = Account(*row)
    return account if row[0] == account_name else None


def to_secret(user_id: bytes, key_id: bytes, row: Row) -> SecretRecord:
    """The secret of a :data:`SECRET_COLUMNS` row, looked up by ``user_id`` and ``key_id`` (not
    read back: two fewer BLOBs copied out of the row)."""
    kind = _SECRET_KINDS.get(row[0])  # (a dict lookup: SecretKind(value) runs Enum's Python code)
    if kind is None:
        kind = SecretKind(row[0])  # raises ValueError for a kind no version wrote
    return SecretRecord(user_id, key_id, kind, row[1], row[2], row[3])


_SECRET_KINDS: dict[int, SecretKind] = {int(kind): kind for kind in SecretKind}


def key_page(rows: Sequence[Row], offset: int, limit: int) -> tuple[list[KeyInfo], int]:
    """The keys of a :attr:`Statements.list_keys` page, and the offset of the next page
    (0 when there is none)."""
    keys = [KeyInfo(row[0], SecretKind(row[1]), row[2], listed_label(row[3])) for row in rows[:limit]]
    return keys, offset + limit if len(rows) > limit else 0


#: What LIST_KEYS carries for a stored label that no sealed label can be: a well-formed one
#: (the shortest) that never opens, so the client lists the key with its label as tampered.
UNOPENABLE_LABEL = bytes(SEALED_OVERHEAD + 1)


def listed_label(stored: object) -> bytes:
    """A key's stored label as LIST_KEYS carries it: as it is when it can be a sealed label
    (empty, or 29..MAX_SEALED_LABEL_SIZE bytes), else (a wrong length, not bytes at all: the
    database was altered or damaged) :data:`UNOPENABLE_LABEL`, with a warning. So one bad
    row cannot make the whole list an internal error."""
    if stored is None:
        return b""
    if isinstance(stored, bytes | bytearray | memoryview):
        label = bytes(stored)
        if not label or len(UNOPENABLE_LABEL) <= len(label) <= MAX_SEALED_LABEL_SIZE:
            return label
        what = f"{len(label)} bytes"
    else:
        what = f"a {type(stored).__name__}, not bytes"
    log.warning(
        "a key's stored label is not a sealed label (%s): listed as one that does not open "
        "(the database was altered or damaged)",
        what,
    )
    return UNOPENABLE_LABEL


def read_audit(
    run: Callable[[str, Sequence[object]], Sequence[Row]],
    statements: Statements,
    user_id: bytes,
    query: AuditQuery,
) -> tuple[list[AuditEntry], int]:
    """One AUDIT page (protocol.md 12.9): read at most MAX_AUDIT_SCAN of the user's entries
    after the cursor, return the first ``query.limit`` that match, and the cursor where the
    next request goes on: the last entry returned if more of those read match, else 0 if they
    reach the log's end, else the last entry read. ``run`` runs one statement (both in one
    transaction). An unfiltered query matches every entry it reads: its page is full unless
    the log ends first, so it reads no further than the page (no scan bound needed)."""
    if (
        query.audit_type is AuditType.ALL
        and not query.key_ids
        and query.after is None
        and query.before is None
    ):
        return audit_page(run(*statements.audit_query(user_id, query, None)), query.limit, 0)
    ends: list[int] = [
        row[0] for row in run(statements.audit_scan_end, (user_id, query.cursor, MAX_AUDIT_SCAN - 1))
    ]
    rows = run(*statements.audit_query(user_id, query, ends[0] if ends else None))
    return audit_page(rows, query.limit, ends[0] if len(ends) > 1 else 0)


def audit_page(rows: Sequence[Row], limit: int, read_up_to: int) -> tuple[list[AuditEntry], int]:
    """The entries of a :meth:`Statements.audit_query` page, and the cursor of the next
    page: the last entry's id when more rows than ``limit`` came, else ``read_up_to`` (the
    last entry read when entries follow it, 0 at the log's end)."""
    entries = [_entry(row) for row in rows[:limit]]
    return entries, entries[-1].entry_id if len(rows) > limit else read_up_to


def _entry(row: Row) -> AuditEntry:
    """An :data:`AUDIT_COLUMNS` row."""
    return AuditEntry(
        row[0],
        Action(row[1]),
        row[2],
        Outcome(row[3]),
        None if row[4] is None else bytes(row[4]),
        None if row[5] is None else Context(row[5]),
        row[6],
        None if row[7] is None else bytes(row[7]),
    )


def to_login_record(row: Row) -> LoginRecord:
    """A :data:`LOGIN_COLUMNS` row."""
    return LoginRecord(*row)


# --- schema ----------------------------------------------------------------------------------


def check_schema_version(current: int, migrations: Sequence[str]) -> None:
    """Refuse a database whose schema is newer than this code knows."""
    if current > len(migrations):
        raise StorageError(f"database schema {current} is newer than this code ({len(migrations)})")


def migration_statements(migration: str) -> list[str]:
    """A migration's statements, one by one (drivers run one statement per call): each ends
    with ';' at the end of its line (or the migration's end), so a trigger's body keeps the
    ';' it has inside a line."""
    return [statement for statement in _STATEMENT_END.split(migration) if statement.strip()]


_STATEMENT_END = re.compile(r";[ \t]*(?:\n|$)")
