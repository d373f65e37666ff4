"""The audit purge (SQLite migration 12) took the audit table's foreign key to ``accounts``,
and this release's INSERTs check the account themselves. An instance of the release before,
still running on the same file while the instances are restarted one at a time (schema
upgrades: docs/operations.md), writes a credential-less entry (a LOGOUT, a SESSION_EXPIRED,
a login's) with a plain INSERT and relied on the key to refuse it: migration 13's trigger
refuses it instead."""

from __future__ import annotations

import sqlite3

import pytest

from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.storage import sqlite as sqlite_backend
from keymgmt.adapters.storage.base import Account, AuditRecord
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import Action, AuditEntry, Outcome, audit_chain_hash, audit_genesis_hash

from ..support.migrations import sqlite_at

ALICE = Account(b"alice", b"A" * 16, b"r" * 192, b"k" * 60, 1)
#: What the release before (d503c67, adapters/storage/sqlite.py) runs for an entry written
#: without a session's credentials, on a connection with ``PRAGMA foreign_keys = ON``.
_PREVIOUS_RELEASE_INSERT = (
    "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, key_id, context, event_count, "
    "chain_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def test_an_instance_of_the_release_before_writes_no_entry_for_a_purged_account(tmp_path):
    path = tmp_path / "ks.db"
    storage = SQLiteStorage(path)  # this release: migrates to 13
    previous = sqlite3.connect(path, isolation_level=None)  # the release before's connection
    previous.execute("PRAGMA foreign_keys = ON")
    try:
        with storage.transaction() as tx:
            assert tx.insert_account(ALICE)
            tx.append_audit(AuditRecord(ALICE.user_id, Action.REGISTER, 1, Outcome.SUCCESS))
        with storage.transaction() as tx:
            assert tx.delete_account(ALICE.user_id, reserved_until=1_000)
        keyserver = KeyServer(storage)
        while keyserver.purge_audit_logs() is not None:
            pass
        # Alice's session on the old instance logs out: its LOGOUT entry, numbered after
        # the last one it finds (none now), as the release before writes it.
        entry = AuditEntry(1, Action.LOGOUT, 2, Outcome.SUCCESS)
        chained = audit_chain_hash(ALICE.user_id, audit_genesis_hash(), entry)
        values = (ALICE.user_id, 1, int(Action.LOGOUT), 2, int(Outcome.SUCCESS), None, None, 1, chained)
        with pytest.raises(sqlite3.IntegrityError):  # as the foreign key refused it
            previous.execute(_PREVIOUS_RELEASE_INSERT, values)
    finally:
        storage.close()
        previous.close()


def test_an_entry_written_while_the_file_was_at_schema_12_is_queued_by_the_upgrade(tmp_path, monkeypatch):
    """Review of migration 13: the trigger refuses the release before's entries from the
    upgrade on, but a file stays at schema 12 between the two migrations' transactions (each
    commits on its own: an instance of the release before waiting for the write lock may take
    it in between), or for longer where the release of schema 12 ran. An entry it let through
    for a purged account then belongs to nobody; the upgrade queues it, as migration 12 did."""
    path = tmp_path / "ks.db"
    with sqlite_at(path, sqlite_backend._MIGRATIONS[:12], monkeypatch) as execute:
        # The account, then its deletion and purge (schema 12: the log was queued and went)...
        execute(
            "INSERT INTO accounts (user_id, account_name, registration_record, encrypted_storage_key, "
            "created_us) VALUES (?, ?, ?, ?, 1)",
            (ALICE.user_id, ALICE.account_name, ALICE.registration_record, ALICE.encrypted_storage_key),
        )
        execute("DELETE FROM accounts WHERE user_id = ?", (ALICE.user_id,))
        # ... then the old instance's LOGOUT for it: nothing at schema 12 refuses it.
        entry = AuditEntry(1, Action.LOGOUT, 2, Outcome.SUCCESS)
        chained = audit_chain_hash(ALICE.user_id, audit_genesis_hash(), entry)
        values = (ALICE.user_id, 1, int(Action.LOGOUT), 2, int(Outcome.SUCCESS), None, None, 1, chained)
        execute(_PREVIOUS_RELEASE_INSERT, values)
    storage = SQLiteStorage(path)
    try:
        assert storage.schema_version == len(sqlite_backend._MIGRATIONS)
        assert storage.audit_purges_queued  # the runtime purges at once
        keyserver = KeyServer(storage)
        while keyserver.purge_audit_logs() is not None:
            pass
        left = storage._db.execute("SELECT count(*) FROM audit WHERE user_id = ?", (ALICE.user_id,))
        assert left.fetchone()[0] == 0
    finally:
        storage.close()
