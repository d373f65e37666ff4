"""SQLite keeps key labels in a table of their own (schema 10), so listing and renaming keys
never reach a ciphertext (tests/storage/test_big_secret_rows.py measures that). Here: the
upgrade of a database of schema 9 moves its labels; a release of schema 9 still running
during an upgrade (it writes ``secrets.label``) is still read right; a label goes with its
key and its account; RENAME_KEY's answers are as before."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from keymgmt.adapters.storage import sqlite as sqlite_backend
from keymgmt.adapters.storage.base import Account
from keymgmt.adapters.storage.sqlite import SQLiteStorage

from ..support.migrations import sqlite_at

ALICE, BOB = b"A" * 16, b"B" * 16
LABELLED, PLAIN, GONE = b"L" * 16, b"P" * 16, b"G" * 16


def _schema_9() -> list[str]:
    (index,) = [n for n, migration in enumerate(sqlite_backend._MIGRATIONS) if "key_labels" in migration]
    assert index == 9, "the labels table is migration 10"
    return sqlite_backend._MIGRATIONS[:index]


def _labels(path: Path) -> tuple[dict[bytes, bytes], int]:
    """key_labels as a dict, and how many secrets rows still hold a label."""
    db = sqlite3.connect(path)
    try:
        labels = {bytes(k): bytes(v) for k, v in db.execute("SELECT key_id, label FROM key_labels")}
        in_rows = db.execute("SELECT count(*) FROM secrets WHERE label IS NOT NULL").fetchone()[0]
    finally:
        db.close()
    return labels, in_rows


def _listed(storage: SQLiteStorage, user: bytes) -> dict[bytes, bytes]:
    with storage.transaction() as tx:
        keys, _ = tx.list_keys(user, 0, 100)
    return {k.key_id: k.sealed_label for k in keys}


def test_the_upgrade_moves_labels_out_of_the_secrets_rows(tmp_path, monkeypatch):
    path = tmp_path / "ks.db"
    with sqlite_at(path, _schema_9(), monkeypatch) as execute:
        execute(
            "INSERT INTO accounts (user_id, account_name, registration_record, encrypted_storage_key, "
            "created_us) VALUES (?, ?, ?, ?, 1)",
            (ALICE, b"alice", b"r" * 192, b"e" * 60),
        )
        for created, (key_id, label) in enumerate(((LABELLED, b"s" * 40), (PLAIN, None))):
            execute(
                "INSERT INTO secrets (key_id, user_id, kind, ciphertext, associated_data, created_us, label) "
                "VALUES (?, ?, 1, ?, ?, ?, ?)",
                (key_id, ALICE, b"c" * 60, ALICE + key_id, created, label),
            )
    storage = SQLiteStorage(path)
    try:
        assert storage.schema_version == len(sqlite_backend._MIGRATIONS)
        assert _listed(storage, ALICE) == {LABELLED: b"s" * 40, PLAIN: b""}
        assert _labels(path) == ({LABELLED: b"s" * 40}, 0)
        with storage.transaction() as tx:
            assert tx.get_secret(ALICE, LABELLED).ciphertext == b"c" * 60
    finally:
        storage.close()


def _two_keys(path: Path) -> SQLiteStorage:
    storage = SQLiteStorage(path)
    db = sqlite3.connect(path)
    with storage.transaction() as tx:
        tx.insert_account(Account(b"alice", ALICE, b"r" * 192, b"e" * 60))
        tx.insert_account(Account(b"bob", BOB, b"r" * 192, b"e" * 60))
    for created, key_id in enumerate((LABELLED, PLAIN)):
        db.execute(
            "INSERT INTO secrets (key_id, user_id, kind, ciphertext, associated_data, created_us) "
            "VALUES (?, ?, 1, ?, ?, ?)",
            (key_id, ALICE, b"c" * 60, ALICE + key_id, created),
        )
    db.commit()
    db.close()
    return storage


def test_renaming_sets_replaces_and_clears_a_label_of_the_users_own_key_only(tmp_path):
    storage = _two_keys(tmp_path / "ks.db")
    try:
        with storage.transaction() as tx:
            assert tx.set_label(ALICE, LABELLED, b"1" * 40)
            assert tx.set_label(ALICE, LABELLED, b"2" * 44)  # replaced
            assert not tx.set_label(BOB, LABELLED, b"3" * 40)  # another user's key
            assert not tx.set_label(ALICE, GONE, b"3" * 40)  # no such key
            assert not tx.set_label(BOB, PLAIN, b"")  # clearing another user's key
            assert not tx.set_label(ALICE, GONE, b"")
            assert tx.set_label(ALICE, PLAIN, b"")  # clearing a key with no label: found
        assert _listed(storage, ALICE) == {LABELLED: b"2" * 44, PLAIN: b""}
        with storage.transaction() as tx:
            assert tx.set_label(ALICE, LABELLED, b"")
        assert _listed(storage, ALICE) == {LABELLED: b"", PLAIN: b""}
        assert _labels(tmp_path / "ks.db") == ({}, 0)
    finally:
        storage.close()


def test_a_label_goes_with_its_key_and_with_its_account(tmp_path):
    storage = _two_keys(tmp_path / "ks.db")
    try:
        with storage.transaction() as tx:
            assert tx.set_label(ALICE, LABELLED, b"1" * 40)
            assert tx.set_label(ALICE, PLAIN, b"2" * 40)
            assert tx.delete_secret(ALICE, LABELLED)
        assert _labels(tmp_path / "ks.db")[0] == {PLAIN: b"2" * 40}
        with storage.transaction() as tx:
            assert tx.delete_account(ALICE, 0)
        assert _labels(tmp_path / "ks.db")[0] == {}
    finally:
        storage.close()


@pytest.mark.parametrize("label", [b"o" * 40, None])
def test_a_label_written_by_the_release_before_is_listed(tmp_path, label):
    """A schema-9 process (during an upgrade) renames with UPDATE secrets SET label: the
    trigger copies it, so the key lists with it (or with none, when it cleared the label)."""
    storage = _two_keys(tmp_path / "ks.db")
    try:
        with storage.transaction() as tx:
            assert tx.set_label(ALICE, LABELLED, b"n" * 40)
        old = sqlite3.connect(tmp_path / "ks.db")
        old.execute("UPDATE secrets SET label = ? WHERE user_id = ? AND key_id = ?", (label, ALICE, LABELLED))
        old.commit()
        old.close()
        assert _listed(storage, ALICE)[LABELLED] == (label or b"")
    finally:
        storage.close()
