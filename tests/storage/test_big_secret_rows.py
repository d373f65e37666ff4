"""Listing and renaming keys of 64 KiB secrets costs SQLite what it does for small ones.

Until schema 10 SQLite kept a key's sealed label in the secrets row after its ciphertext (the
label column came with a later migration, so it was the row's last). A 64 KiB ciphertext
lives in overflow pages, and SQLite walks that chain to reach any column after it: LIST_KEYS,
which protocol.md says reads no ciphertext, read every listed key's ciphertext (and every
skipped one's: the page of offset 9,500 among 10,000 such keys took 0.67 s on the event loop,
measured, for a 23-byte request), and RENAME_KEY rewrote the whole 64 KiB row. An
authenticated user storing 64 KiB secrets (within its quota) made each of these requests cost
the server a thousand times what it costs for a generated key. Labels now have a table of
their own (tests/storage/test_key_labels_table.py).

Measured in bytes SQLite reads through the file (``rchar`` of /proc/self/io, from a fresh
connection: deterministic, no wall clock) and bytes it appends to the WAL, against the same
work for keys with small secrets. PostgreSQL stores large values out of line (TOAST) and
is not concerned."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from keymgmt.adapters.storage.base import Account
from keymgmt.adapters.storage.sqlite import SQLiteStorage

BIG, SMALL = b"B" * 16, b"S" * 16
KEYS = 200
RENAMES = 50


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _database(path: Path) -> dict[bytes, list[bytes]]:
    storage = SQLiteStorage(path)
    with storage.transaction() as tx:
        tx.insert_account(Account(b"big@example.org", BIG, bytes(192), bytes(60)))
        tx.insert_account(Account(b"small@example.org", SMALL, bytes(192), bytes(60)))
    storage.close()
    db = sqlite3.connect(path)
    keys: dict[bytes, list[bytes]] = {BIG: [], SMALL: []}
    for user, sealed_size in ((BIG, 65_536 + 28), (SMALL, 60)):
        for created in range(KEYS):
            key_id = os.urandom(16)
            keys[user].append(key_id)
            db.execute(
                "INSERT INTO secrets (key_id, user_id, kind, ciphertext, associated_data, created_us) "
                "VALUES (?, ?, 2, ?, ?, ?)",
                (key_id, user, os.urandom(sealed_size), b"a" * 44, created),
            )
            db.execute("INSERT INTO key_labels (key_id, label) VALUES (?, ?)", (key_id, b"l" * 60))
    db.commit()
    db.close()
    return keys


def _costs(path: Path, user: bytes, keys: list[bytes]) -> tuple[int, int]:
    """Bytes read by one LIST_KEYS page of the user's keys, and WAL bytes written by renaming
    RENAMES of them, from a fresh connection."""
    storage = SQLiteStorage(path)
    try:
        before = _read_bytes()
        with storage.transaction() as tx:
            listed, _ = tx.list_keys(user, 0, 512)
        read = _read_bytes() - before
        assert [k.key_id for k in listed] == keys
        assert {k.sealed_label for k in listed} == {b"l" * 60}
        wal = Path(f"{path}-wal")
        size = wal.stat().st_size if wal.exists() else 0
        with storage.transaction() as tx:
            for key_id in keys[:RENAMES]:
                assert tx.set_label(user, key_id, os.urandom(60))
        written = wal.stat().st_size - size
    finally:
        storage.close()
    return read, written


def test_listing_and_renaming_keys_of_big_secrets_costs_what_it_does_for_small_ones(tmp_path):
    keys = _database(tmp_path / "ks.db")
    big_read, big_written = _costs(tmp_path / "ks.db", BIG, keys[BIG])
    small_read, small_written = _costs(tmp_path / "ks.db", SMALL, keys[SMALL])
    assert big_read <= 4 * small_read + 65_536, (big_read, small_read)
    assert big_written <= 4 * small_written + 65_536, (big_written, small_written)


def _listing_cost(path: Path, sealed_size: int, offset: int) -> int:
    """Bytes read, from a fresh connection, by one LIST_KEYS page at ``offset`` of a user whose
    KEYS secrets are each sealed_size bytes long."""
    storage = SQLiteStorage(path)
    with storage.transaction() as tx:
        tx.insert_account(Account(b"lister@example.org", BIG, bytes(192), bytes(60)))
    storage.close()
    db = sqlite3.connect(path)
    db.executemany(
        "INSERT INTO secrets (key_id, user_id, kind, ciphertext, associated_data, created_us) "
        "VALUES (?, ?, 2, ?, ?, ?)",
        ((os.urandom(16), BIG, os.urandom(sealed_size), b"a" * 44, created) for created in range(KEYS)),
    )
    db.commit()
    db.close()
    storage = SQLiteStorage(path)
    try:
        before = _read_bytes()
        with storage.transaction() as tx:
            listed, _ = tx.list_keys(BIG, offset, 5)
        read = _read_bytes() - before
        assert len(listed) == 5
    finally:
        storage.close()
    return read


@pytest.mark.parametrize("sealed_size", [1_000, 3_000, 65_536 + 28])
def test_a_listing_page_far_into_the_keys_of_mid_sized_secrets_reads_no_secret_rows(tmp_path, sealed_size):
    """A secret of a few KiB is no overflow chain, but its row fills a table page of its own:
    a LIST_KEYS page at an offset read the row (for key id and kind) of every key it skipped,
    so its cost grew with the secrets' sizes (4 MB read for the last page of 1,000 keys of
    3,000 bytes, against 0.2 MB for small ones). The listing now reads an index alone."""
    small = _listing_cost(tmp_path / "small.db", 60, KEYS - 5)
    sized = _listing_cost(tmp_path / "sized.db", sealed_size, KEYS - 5)
    assert sized <= 2 * small + 16_384, (sized, small)
