"""The client's local store (STO-2): ciphertexts and their AD, never plaintext or storage_key.

A SQLite file created with owner-only permissions, keyed by ``(user_id, key_id)``.
Retrieve looks here first (OPS-4); an entry that fails to decrypt is replaced
by the server's copy. It also keeps, per user, the newest audit entry the client
verified (position and hash: the audit chain's head).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from keymgmt_proto import SecretKind

from ..files import BUSY_TIMEOUT_MS, enable_wal, ensure_private_file
from ..storage.base import SecretRecord

__all__ = ["LocalStore", "LocalStoreError"]


class LocalStoreError(Exception):
    """The local store file cannot be used (permissions, ownership, not a database)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS local_secrets (
    user_id BLOB NOT NULL,
    key_id BLOB NOT NULL,
    kind INTEGER NOT NULL,
    ciphertext BLOB NOT NULL,
    associated_data BLOB NOT NULL,
    created_us INTEGER NOT NULL,
    PRIMARY KEY (user_id, key_id)
)
"""
_AUDIT_HEADS = """
CREATE TABLE IF NOT EXISTS audit_heads (
    user_id BLOB PRIMARY KEY,
    position INTEGER NOT NULL,
    hash BLOB NOT NULL
)
"""


#: BLOB parameters are bound as bytearray: sqlite3 looks every ``bytes`` parameter up in its
#: adapter registry, raising and clearing an AttributeError on the way (about 0.5 us each,
#: against a copy of a few dozen bytes); the stored BLOB is the same, and reads give bytes.
_blob = bytearray


_PUT = "INSERT OR REPLACE INTO local_secrets VALUES (?, ?, ?, ?, ?, ?)"
_HOLDS = "SELECT 1 FROM local_secrets WHERE user_id = ? AND key_id = ?"


class LocalStore:
    """Ciphertext cache on the asset owner's device; ``":memory:"`` for a throwaway one."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        ensure_private_file(Path(self.path), LocalStoreError)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            enable_wal(self._db, Path(self.path), LocalStoreError)
            self._db.execute(_SCHEMA)
            self._db.execute(_AUDIT_HEADS)
        except sqlite3.DatabaseError as exc:
            raise LocalStoreError(f"cannot open local store {self.path}: {exc}") from None

    def __repr__(self) -> str:
        return f"LocalStore({self.path!r})"

    def put(self, record: SecretRecord) -> None:
        r = record
        self.keep(r.user_id, r.key_id, r.kind, r.ciphertext, r.associated_data, r.created)

    def keep(
        self,
        user_id: bytes,
        key_id: bytes,
        kind: SecretKind,
        ciphertext: bytes,
        associated_data: bytes,
        created: int,
    ) -> None:
        """:meth:`put` of the record with these fields, without building it (a store's copy).
        A subclass that overrides only :meth:`put` still gets every copy through it."""
        if type(self).put is not LocalStore.put:
            self.put(SecretRecord(user_id, key_id, kind, ciphertext, associated_data, created))
            return
        self._db.execute(
            _PUT,
            (_blob(user_id), _blob(key_id), int(kind), _blob(ciphertext), _blob(associated_data), created),
        )

    def get(self, user_id: bytes, key_id: bytes) -> SecretRecord | None:
        row = self._db.execute(
            "SELECT user_id, key_id, kind, ciphertext, associated_data, created_us FROM local_secrets "
            "WHERE user_id = ? AND key_id = ?",
            (_blob(user_id), _blob(key_id)),
        ).fetchone()
        if row is None:
            return None
        return SecretRecord(row[0], row[1], SecretKind(row[2]), row[3], row[4], row[5])

    def holds(self, user_id: bytes, key_id: bytes) -> bool:
        """Whether a copy of ``key_id`` is kept (KEY-2's "new to us" check before every store:
        no record is built, and SQLite reads the index only)."""
        return self._db.execute(_HOLDS, (_blob(user_id), _blob(key_id))).fetchone() is not None

    def delete(self, user_id: bytes, key_id: bytes) -> None:
        self._db.execute("DELETE FROM local_secrets WHERE user_id = ? AND key_id = ?", (user_id, key_id))

    def delete_user(self, user_id: bytes) -> int:
        """Drop everything kept for ``user_id`` (the account was deleted): its copies and its
        verified audit head; how many copies."""
        self._db.execute("DELETE FROM audit_heads WHERE user_id = ?", (user_id,))
        return self._db.execute("DELETE FROM local_secrets WHERE user_id = ?", (user_id,)).rowcount

    def key_ids(self, user_id: bytes) -> list[bytes]:
        rows = self._db.execute(
            "SELECT key_id FROM local_secrets WHERE user_id = ? ORDER BY created_us", (user_id,)
        ).fetchall()
        return [row[0] for row in rows]

    def audit_head(self, user_id: bytes) -> tuple[int, bytes] | None:
        """The newest verified audit entry of ``user_id``: its position and hash."""
        row = self._db.execute(
            "SELECT position, hash FROM audit_heads WHERE user_id = ?", (user_id,)
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def put_audit_head(self, user_id: bytes, position: int, chain_hash: bytes) -> None:
        """Keep a newer verified head; an older position never replaces a newer one."""
        self._db.execute(
            "INSERT INTO audit_heads VALUES (?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET "
            "position = excluded.position, hash = excluded.hash WHERE excluded.position > position",
            (user_id, position, chain_hash),
        )

    def close(self) -> None:
        self._db.close()
