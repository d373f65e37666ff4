"""The local store binds its BLOBs as bytearray (issue 14, P10): what it keeps and gives back
is the same as with bytes: BLOB columns, bytes out, found by the same key."""

from __future__ import annotations

import os

from keymgmt.adapters.client.localstore import LocalStore
from keymgmt.adapters.storage.base import SecretRecord
from keymgmt_proto import SecretKind


def test_a_copy_is_stored_as_blobs_and_read_back_as_the_bytes_put() -> None:
    store = LocalStore(":memory:")
    user_id, key_id = os.urandom(16), os.urandom(16)
    record = SecretRecord(user_id, key_id, SecretKind.GENERATED, os.urandom(60), user_id + key_id, 42)
    store.put(record)
    types = store._db.execute(
        "SELECT typeof(user_id), typeof(key_id), typeof(ciphertext), typeof(associated_data) "
        "FROM local_secrets"
    ).fetchone()
    assert types == ("blob", "blob", "blob", "blob")
    got = store.get(user_id, key_id)
    assert got == record
    assert got is not None and all(type(v) is bytes for v in (got.user_id, got.key_id, got.ciphertext))
    # a copy put again replaces the first, and an id stored as bytes before is found the same way
    store.put(record)
    assert store.key_ids(user_id) == [key_id]
    store._db.execute(
        "INSERT INTO local_secrets VALUES (?, ?, 1, ?, ?, 1)", (user_id, b"k" * 16, b"c" * 60, b"a" * 32)
    )
    assert store.get(user_id, b"k" * 16) is not None
    assert store.get(user_id, os.urandom(16)) is None


def test_holds_answers_as_get_does() -> None:
    """KEY-2's "new to us" check asks ``holds`` (no record built): the same answer as ``get``
    for a copy put here, one stored with bytes keys, another user's id and an unknown id."""
    store = LocalStore(":memory:")
    user_id, other_user, key_id = os.urandom(16), os.urandom(16), os.urandom(16)
    store.put(SecretRecord(user_id, key_id, SecretKind.GENERATED, os.urandom(60), user_id + key_id, 1))
    store._db.execute(
        "INSERT INTO local_secrets VALUES (?, ?, 1, ?, ?, 1)", (user_id, b"k" * 16, b"c" * 60, b"a" * 32)
    )
    asked = [(user_id, key_id), (user_id, b"k" * 16), (other_user, key_id), (user_id, os.urandom(16))]
    for user, key in asked:
        assert store.holds(user, key) is (store.get(user, key) is not None)
    assert store.holds(user_id, key_id) and not store.holds(other_user, key_id)
    store.delete(user_id, key_id)
    assert not store.holds(user_id, key_id)


def test_keep_stores_what_put_of_the_same_record_stores() -> None:
    """A store's copy is kept with ``keep`` (its fields, no record built): read back as the
    record ``put`` would have kept, replacing an earlier copy as ``put`` does."""
    store = LocalStore(":memory:")
    user_id, key_id = os.urandom(16), os.urandom(16)
    record = SecretRecord(user_id, key_id, SecretKind.IMPORTED, os.urandom(61), user_id + key_id + b"x", 7)
    store.keep(user_id, key_id, SecretKind.GENERATED, os.urandom(60), user_id + key_id, 6)
    store.keep(user_id, key_id, record.kind, record.ciphertext, record.associated_data, record.created)
    assert store.get(user_id, key_id) == record
    assert store.key_ids(user_id) == [key_id]


def test_a_subclass_that_overrides_put_gets_every_copy_through_it() -> None:
    """``put`` stays the one place a subclass hooks copies (a store that keeps nothing, or
    mirrors them): the client's ``keep`` goes through an overriding ``put``."""

    class Counting(LocalStore):
        def __init__(self) -> None:
            super().__init__(":memory:")
            self.records: list[SecretRecord] = []

        def put(self, record: SecretRecord) -> None:
            self.records.append(record)

    store = Counting()
    user_id, key_id = os.urandom(16), os.urandom(16)
    store.keep(user_id, key_id, SecretKind.GENERATED, b"c" * 60, user_id + key_id, 5)
    assert store.records == [
        SecretRecord(user_id, key_id, SecretKind.GENERATED, b"c" * 60, user_id + key_id, 5)
    ]
    assert store.get(user_id, key_id) is None  # kept nothing itself
