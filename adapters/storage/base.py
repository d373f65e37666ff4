"""The narrow storage interface the key server talks to, and its record types.

All work happens inside ``with storage.transaction() as tx:``; leaving the
block normally commits, an exception rolls everything back. An operation and
its audit entry are written in the same transaction (AUD-1, REG-4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from keymgmt_proto import (
    Action,
    AuditEntry,
    AuditType,
    Context,
    DetachedSessionStore,
    KeyInfo,
    Outcome,
    SecretKind,
)

__all__ = [
    "Account",
    "AuditQuery",
    "AuditRecord",
    "CredentialsChanged",
    "LoginRecord",
    "SecretRecord",
    "Storage",
    "StorageError",
    "Transaction",
    "needs_sync",
]


class StorageError(Exception):
    """The backend failed; the transaction was rolled back. Never carries secret data."""


class CredentialsChanged(Exception):
    """A write made for a session was refused, and nothing written: the account's credentials
    are no longer those the session logged in with (its password changed since, through any
    instance), or the account is gone (``gone``). The session must end."""

    def __init__(self, gone: bool) -> None:
        super().__init__("the account was deleted" if gone else "the account's password changed")
        self.gone = gone


#: Audit entries that need not reach the disk before the answer goes out (STO-1 covers
#: acknowledged state: accounts, secrets, the log of operations on them). They become
#: durable with the next commit that syncs, and every request of a session syncs; so
#: only a power loss before the session did anything can lose them, and a crash of the
#: server process never does (the backends still commit them before answering).
SOFT_AUDIT_ACTIONS = frozenset({Action.LOGIN, Action.LOGIN_THROTTLED, Action.LOGOUT, Action.SESSION_EXPIRED})


def needs_sync(record: AuditRecord) -> bool:
    """Whether the commit writing this audit entry must reach the disk before answering."""
    return record.action not in SOFT_AUDIT_ACTIONS


@dataclass(frozen=True, slots=True)
class Account:
    account_name: bytes
    user_id: bytes
    registration_record: bytes = field(repr=False)
    encrypted_storage_key: bytes = field(repr=False)
    created: int = 0
    #: When the password last changed (us; 0: never), and the version of the credentials a
    #: login reads with the record: it changes with every change (see replace_credentials).
    credentials_changed: int = 0


@dataclass(frozen=True, slots=True)
class SecretRecord:
    user_id: bytes
    key_id: bytes
    kind: SecretKind
    ciphertext: bytes = field(repr=False)
    associated_data: bytes = field(repr=False)
    created: int = 0


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """An audit entry to write; the backend assigns ``entry_id``."""

    user_id: bytes
    action: Action
    timestamp: int
    outcome: Outcome
    key_id: bytes | None = None
    context: Context | None = None
    #: How many events of this kind the entry stands for (aggregated login attempts).
    count: int = 1


@dataclass(frozen=True, slots=True)
class LoginRecord:
    """The login-throttling state of one account name (NET-10), registered or not.

    ``failures`` counts the logins that failed or were abandoned (a success does not clear
    it: that would tell a prober the name belongs to an active account, NET-9; the record
    is forgotten a while after its last failure instead). ``unlogged`` and ``throttled``
    count the failures and the refused attempts not yet written to the owner's audit log.
    Times are microseconds since the epoch."""

    account_name: bytes
    failures: int
    unlogged: int
    throttled: int
    last_failure: int
    last_throttled: int
    locked_until: int


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """OPS-6 selection: type, optional key ids, ``after <= timestamp < before``, paging."""

    audit_type: AuditType
    key_ids: Sequence[bytes] = ()
    after: int | None = None
    before: int | None = None
    cursor: int = 0
    limit: int = 256


class Transaction(Protocol):
    def get_account(self, account_name: bytes) -> Account | None: ...

    def get_account_by_user_id(self, user_id: bytes) -> Account | None: ...

    def user_id_exists(self, user_id: bytes) -> bool: ...

    def insert_account(self, account: Account) -> bool:
        """False (and nothing written) if the name or the user id is taken."""
        ...

    def key_id_exists(self, key_id: bytes) -> bool: ...

    def count_keys(self, user_id: bytes) -> int: ...

    def start_login(self, account_name: bytes, now: int, threshold: int, in_flight_for: int) -> bool:
        """NET-10, in one atomic step (several instances may start logins of a name at once):
        admit a login of the name unless it is locked, or unless ``threshold`` failures and
        logins in flight are reached while another login is in flight (a login is in flight
        from its admission until :meth:`finish_login`, at most ``in_flight_for`` us). An
        admitted login is counted in flight; a refused one is counted as throttled. The same
        work for every name, registered or not (NET-9). True if admitted."""
        ...

    def finish_login(
        self, account_name: bytes, now: int, succeeded: bool, lock_for: Callable[[int], int] | None = None
    ) -> LoginRecord | None:
        """An admitted login ended: it is no longer in flight. A failure counts (``failures``
        and ``unlogged`` go up, ``last_failure`` is now; the record is made again if it went
        meanwhile), and in the same atomic step the name is locked until ``now +
        lock_for(failures)`` us when that is later than its lock (a lock never shortens);
        the record is returned. After a success the returned record holds the ``unlogged``
        and ``throttled`` counts that were waiting for the owner's log, and the stored record
        has them cleared; None if the name has no record.

        The throttling statements may commit on their own, outside the caller's transaction
        and batch (PostgreSQL does: a row lock held for a whole batch that an attacker
        composes would let two instances deadlock)."""
        ...

    def get_login_record(self, account_name: bytes) -> LoginRecord | None:
        """The name's throttling record, if it has one."""
        ...

    def sweep_login_records(
        self, now: int, stale_before: int, in_flight_for: int, limit: int
    ) -> list[LoginRecord]:
        """Remove and return at most ``limit`` records whose last failure is before
        ``stale_before``, whose lock has ended and that have no login in flight. Each record is
        returned by one sweep only, whichever instance runs it."""
        ...

    def evict_login_records(
        self, now: int, threshold: int, in_flight_for: int, count: int
    ) -> list[LoginRecord]:
        """Remove and return ``count`` records to keep the table under its cap: first the
        least recently used of the harmless ones (below ``threshold`` failures, not locked, no
        login in flight), then the least recently used others."""
        ...

    def count_login_records(self) -> int: ...

    def insert_secret(self, secret: SecretRecord) -> bool:
        """False if the key id is taken."""
        ...

    def insert_secret_below(self, secret: SecretRecord, max_keys: int) -> int | None:
        """:meth:`insert_secret` only while the user has fewer than ``max_keys`` keys, the
        check and the count's update in one step (a store's key limit, issue 14: one
        statement fewer than :meth:`count_keys` and :meth:`insert_secret`). Returns the
        user's number of keys after the insert; 0 (nothing written) if the user already has
        ``max_keys``; None (nothing written) if the key id is taken. StorageError if the
        user has no account."""
        ...

    def get_secret(self, user_id: bytes, key_id: bytes) -> SecretRecord | None:
        """The user's secret; None for a missing key *and* for another user's key (OPS-7)."""
        ...

    def secret_fields(self, user_id: bytes, key_id: bytes) -> tuple[int, bytes, bytes] | None:
        """:meth:`get_secret`'s kind (the stored number), ciphertext and associated data,
        without a SecretRecord (RETRIEVE's path)."""
        ...

    def list_keys(self, user_id: bytes, offset: int, limit: int) -> tuple[list[KeyInfo], int]:
        """The user's keys in creation order from ``offset``, at most ``limit``, and the
        offset of the next page (0 when there is none)."""
        ...

    def delete_secret(self, user_id: bytes, key_id: bytes) -> bool: ...

    def replace_credentials(
        self,
        user_id: bytes,
        registration_record: bytes,
        encrypted_storage_key: bytes,
        now: int = 0,
        credentials: int | None = None,
    ) -> int | None:
        """Password change: the account's new registration record and re-wrapped storage key,
        both in this transaction (never one without the other), and its new
        ``credentials_changed``: ``now`` (us), or one more than before when that is not less
        (so it changes with every change, whatever the clocks). Returns that; None if there
        is no account, or, given ``credentials``, if its credentials are no longer those
        (nothing written)."""
        ...

    def delete_account(self, user_id: bytes, reserved_until: int, credentials: int | None = None) -> bool:
        """Delete the account with every secret and its name's throttling state, reserve the
        name until ``reserved_until`` (microseconds), and queue its audit log for
        :meth:`purge_audit`; all in this transaction (the log itself, which can be large, is
        deleted later, a chunk at a time). False if there is no account. Given
        ``credentials``, CredentialsChanged (nothing deleted) if the account's
        ``credentials_changed`` is not that."""
        ...

    def purge_audit(self, limit: int) -> int | None:
        """One step of deleting the audit logs that :meth:`delete_account` queued: at most
        ``limit`` entries of one queued log; a log found empty leaves the queue. How many
        entries it deleted; None when no log is queued (PostgreSQL: none that another
        instance is not purging at this moment)."""
        ...

    def name_reserved(self, account_name: bytes, now: int) -> bool:
        """Whether a deleted account's name is still reserved at ``now`` (microseconds)."""
        ...

    def forget_reserved_names(self, now: int) -> int:
        """Release the names whose reservation ended by ``now``; how many."""
        ...

    def set_label(self, user_id: bytes, key_id: bytes, sealed_label: bytes) -> bool:
        """Named keys: store the key's sealed label as it is (empty: none); False if the user
        has no such key."""
        ...

    def append_audit(self, record: AuditRecord, credentials: int | None = None) -> None:
        """Append an entry; entries are numbered 1, 2, ... per user (OPS-7: a user's
        numbering reveals nothing about other users), and each stores its audit-chain hash
        (``keymgmt_proto.audit_chain_hash`` of the user's entry before), in this transaction.

        Given ``credentials`` (a request's entry, for the session's credentials), the entry is
        written only if the account's ``credentials_changed`` is still that: else
        CredentialsChanged and nothing written. The check rides on the append (every request
        writes one), so it costs no statement of its own."""
        ...

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
        """``append_audit(AuditRecord(user_id, action, timestamp, outcome, key_id, context),
        credentials)`` without building the record (RETRIEVE's path)."""
        ...

    def append_audits(self, records: Sequence[AuditRecord], credentials: int | None = None) -> None:
        """:meth:`append_audit` of each record in order (one user's, numbered and chained one
        after the other), written in one statement where the backend can (a store's entry
        and its next key id's); ``credentials`` is checked once, for all of them, and
        CredentialsChanged writes none."""
        ...

    def query_audit(self, user_id: bytes, query: AuditQuery) -> tuple[list[AuditEntry], int]:
        """Matching entries in entry order, with their chain hashes, at most ``query.limit``,
        and the cursor for the next page (0 when there is none)."""
        ...


class SessionStore(DetachedSessionStore, Protocol):
    """A detached-session store that can drop every session of an account."""

    def drop_user(self, user_id: bytes) -> int:
        """Drop every stored session of ``user_id`` (password changed, account deleted)."""
        ...


class Storage(Protocol):
    def transaction(self, *, atomic: bool = True) -> AbstractContextManager[Transaction]:
        """A transaction (inside a batch, a part of it that rolls back alone). With
        ``atomic=False`` the caller promises to write at most one statement, and a backend
        may then skip the savepoint inside a batch."""
        ...

    @property
    def session_store(self) -> SessionStore:
        """Where detached sessions wait to be resumed (on this or another instance)."""
        ...

    def close(self) -> None: ...
