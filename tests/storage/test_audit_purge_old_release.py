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
from keymgmt.adapters.storage.base import Account, AuditRecord
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import Action, AuditEntry, Outcome, audit_chain_hash, audit_genesis_hash

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
