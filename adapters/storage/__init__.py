"""Storage of the key server: the interface (:class:`Storage`, :class:`Transaction`),
SQLite (the embedded default) and PostgreSQL (``keymgmt.adapters.storage.postgres``,
imported on demand: it needs the ``postgres`` extra)."""

from .base import (
    Account,
    AuditQuery,
    AuditRecord,
    CredentialsChanged,
    LoginRecord,
    SecretRecord,
    Storage,
    StorageError,
    Transaction,
)
from .sqlite import SQLiteStorage

__all__ = [
    "Account",
    "AuditQuery",
    "AuditRecord",
    "CredentialsChanged",
    "LoginRecord",
    "SQLiteStorage",
    "SecretRecord",
    "Storage",
    "StorageError",
    "Transaction",
]
