"""The narrow storage interface the key server talks to, and its record types.

All work happens inside ``with storage.transaction() as tx:``; leaving the
block normally commits, an exception rolls everything back. An operation and
its audit entry are written in the same transaction (AUD-1, REG-4).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from keymgmt_proto._ops import Action, AuditEntry, AuditType, Context, KeyInfo, Outcome, SecretKind
from keymgmt_proto._sessionstate import DetachedSessionStore

__all__ = [
    "Account",
    "AuditQuery",
    "AuditRecord",
    "LoginRecord",
    "SecretRecord",
    "Storage",
    "StorageError",
    "Transaction",
]


class StorageError(Exception):
    """The backend failed; the transaction was rolled back. Never carries secret data."""


@dataclass(frozen=True, slots=True)
class Account:
    account_name: bytes
    user_id: bytes
    registration_record: bytes = field(repr=False)
    encrypted_storage_key: bytes = field(repr=False)
    created: int = 0


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

    ``failures`` counts logins started since the last success (each counts from its start,
    as a failure until it succeeds), ``throttled`` the logins refused while locked; both
    go into the owner's audit log later, as one entry each (see KeyServer)."""

    account_name: bytes
    failures: int
    throttled: int
    last_attempt: int


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

    def get_login_failures(self, account_name: bytes) -> tuple[int, int]:
        """NET-10: (consecutive failed logins, locked until [us since the epoch]) for a name,
        registered or not; (0, 0) when there is no record."""
        ...

    def record_login_failure(self, account_name: bytes, now: int) -> int:
        """Count one more consecutive failure for a name, atomically (several instances may
        count at once), and return the new count."""
        ...

    def record_throttled(self, account_name: bytes, now: int) -> None:
        """Count a login refused while the name is locked (the name has a record then)."""
        ...

    def lock_login(self, account_name: bytes, locked_until: int) -> None:
        """Refuse logins for the name until ``locked_until`` (us since the epoch)."""
        ...

    def take_login_record(self, account_name: bytes) -> LoginRecord | None:
        """A successful login: remove the name's record (failures, lock) and return it."""
        ...

    def sweep_login_records(
        self, now: int, stale_before: int, max_records: int, limit: int
    ) -> list[LoginRecord]:
        """Remove and return at most ``limit`` records: those last used before
        ``stale_before`` whose lock has ended, then, while more than ``max_records`` remain,
        the oldest others (unlocked first) down to 90% of it. Each record is returned by
        one sweep only, whichever instance runs it."""
        ...

    def insert_secret(self, secret: SecretRecord) -> bool:
        """False if the key id is taken."""
        ...

    def get_secret(self, user_id: bytes, key_id: bytes) -> SecretRecord | None:
        """The user's secret; None for a missing key *and* for another user's key (OPS-7)."""
        ...

    def list_keys(self, user_id: bytes, offset: int, limit: int) -> tuple[list[KeyInfo], int]:
        """The user's keys in creation order from ``offset``, at most ``limit``, and the
        offset of the next page (0 when there is none)."""
        ...

    def delete_secret(self, user_id: bytes, key_id: bytes) -> bool: ...

    def append_audit(self, record: AuditRecord) -> None:
        """Append an entry; entries are numbered 1, 2, ... per user (OPS-7: a user's
        numbering reveals nothing about other users)."""
        ...

    def query_audit(self, user_id: bytes, query: AuditQuery) -> tuple[list[AuditEntry], int]:
        """Matching entries in entry order, at most ``query.limit``, and the cursor for the
        next page (0 when there is none)."""
        ...


class Storage(Protocol):
    def transaction(self) -> AbstractContextManager[Transaction]: ...

    @property
    def session_store(self) -> DetachedSessionStore:
        """Where detached sessions wait to be resumed (on this or another instance)."""
        ...

    def close(self) -> None: ...
