"""The storage contract, run against SQLite and against the real PostgreSQL server."""

from __future__ import annotations

import os
import threading

import pytest

from keymgmt.adapters.storage.base import (
    Account,
    AuditQuery,
    AuditRecord,
    CredentialsChanged,
    LoginRecord,
    SecretRecord,
    StorageError,
)
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    MAX_AUDIT_PAGE,
    MAX_AUDIT_SCAN,
    MAX_SEALED_SIZE,
    Action,
    AuditType,
    Context,
    Outcome,
    SecretKind,
    audit_chain_hash,
    audit_genesis_hash,
)

from ..support.pg import schema_fixture


@pytest.fixture(params=["sqlite", "postgres"])
def make_storage(request, tmp_path):
    """A factory: each call opens the same database again (as another process would)."""
    opened = []
    if request.param == "sqlite":

        def make():
            opened.append(SQLiteStorage(tmp_path / "ks.db"))
            return opened[-1]

        yield make
    else:
        from keymgmt.adapters.storage.postgres import PostgresStorage

        fixture = schema_fixture()
        conninfo, schema = next(fixture)

        def make():
            opened.append(PostgresStorage(conninfo, schema=schema))
            return opened[-1]

        yield make
        for storage in opened:
            storage.close()
        opened.clear()
        next(fixture, None)
    for storage in opened:
        storage.close()


@pytest.fixture
def storage(make_storage):
    return make_storage()


ALICE = Account(b"alice", b"A" * 16, bytes(192), bytes(60), 1)
BOB = Account(b"bob", b"B" * 16, bytes(192), bytes(60), 2)


def _secret(user_id, n, created=0):
    return SecretRecord(
        user_id, n.to_bytes(16, "big"), SecretKind.GENERATED, bytes(60), b"ad" + n.to_bytes(4, "big"), created
    )


def test_accounts_are_unique_by_name_and_user_id(storage):
    with storage.transaction() as tx:
        assert tx.insert_account(ALICE)
        assert not tx.insert_account(ALICE)
        assert not tx.insert_account(Account(b"alice", b"C" * 16, bytes(192), bytes(60)))
        assert not tx.insert_account(Account(b"carol", ALICE.user_id, bytes(192), bytes(60)))
        assert tx.get_account(b"alice").user_id == ALICE.user_id
        assert tx.get_account_by_user_id(ALICE.user_id).account_name == b"alice"
        assert tx.user_id_exists(ALICE.user_id) and not tx.user_id_exists(b"Z" * 16)
        assert tx.get_account(b"nobody") is None


def test_secrets_belong_to_their_user_only(storage):
    with storage.transaction() as tx:
        tx.insert_account(ALICE)
        tx.insert_account(BOB)
        assert tx.insert_secret(_secret(ALICE.user_id, 1))
        assert not tx.insert_secret(_secret(BOB.user_id, 1))  # key ids are unique across users
        assert tx.key_id_exists((1).to_bytes(16, "big"))
        assert tx.get_secret(BOB.user_id, (1).to_bytes(16, "big")) is None  # OPS-7
        assert tx.get_secret(ALICE.user_id, (1).to_bytes(16, "big")).associated_data == b"ad\x00\x00\x00\x01"
        assert not tx.delete_secret(BOB.user_id, (1).to_bytes(16, "big"))
        assert tx.count_keys(ALICE.user_id) == 1
        # The count is kept in the account row: refused inserts and deletes leave it alone.
        assert (tx.count_keys(BOB.user_id), tx.count_keys(b"Z" * 16)) == (0, 0)
        assert tx.insert_secret(_secret(ALICE.user_id, 2))
        assert not tx.insert_secret(_secret(ALICE.user_id, 2))
        assert tx.count_keys(ALICE.user_id) == 2
        assert tx.delete_secret(ALICE.user_id, (1).to_bytes(16, "big"))
        assert not tx.delete_secret(ALICE.user_id, (1).to_bytes(16, "big"))
        assert tx.count_keys(ALICE.user_id) == 1
        assert tx.delete_secret(ALICE.user_id, (2).to_bytes(16, "big"))
        assert tx.count_keys(ALICE.user_id) == 0
    with pytest.raises(StorageError), storage.transaction() as tx:
        tx.insert_secret(_secret(b"Z" * 16, 9))  # no such account


def test_a_store_checks_the_key_limit_and_counts_in_its_own_step(storage):
    """insert_secret_below (a store: issue 14): the user's count after the insert; 0 at the
    limit and None for a taken key id, both with nothing written; no account: StorageError."""
    with storage.transaction() as tx:
        tx.insert_account(ALICE)
        tx.insert_account(BOB)
        assert tx.insert_secret_below(_secret(ALICE.user_id, 1), 2) == 1
        assert tx.insert_secret_below(_secret(ALICE.user_id, 2), 2) == 2
        assert tx.insert_secret_below(_secret(ALICE.user_id, 3), 2) == 0  # at the limit
        assert tx.get_secret(ALICE.user_id, (3).to_bytes(16, "big")) is None
        assert tx.count_keys(ALICE.user_id) == 2
        assert tx.insert_secret_below(_secret(BOB.user_id, 1), 5) is None  # taken (by Alice)
        assert tx.count_keys(BOB.user_id) == 0 and tx.get_secret(BOB.user_id, (1).to_bytes(16, "big")) is None
        assert tx.delete_secret(ALICE.user_id, (1).to_bytes(16, "big"))
        assert tx.insert_secret_below(_secret(ALICE.user_id, 3), 2) == 2  # below the limit again
        assert [k.key_id[-1] for k in tx.list_keys(ALICE.user_id, 0, 10)[0]] == [2, 3]
    with pytest.raises(StorageError), storage.transaction() as tx:
        tx.insert_secret_below(_secret(b"Z" * 16, 9), 5)  # no such account


def test_a_store_counts_the_keys_another_opening_or_a_rollback_changed(make_storage):
    """insert_secret_below after another opening (process) stored or deleted the user's keys,
    and after a store that was rolled back: the count and the limit are the table's (SQLite
    remembers each user's count and updates it only while the row still holds it)."""
    one, other = make_storage(), make_storage()
    with one.transaction() as tx:
        tx.insert_account(ALICE)
        assert tx.insert_secret_below(_secret(ALICE.user_id, 1), 3) == 1
    with other.transaction() as tx:
        assert tx.insert_secret_below(_secret(ALICE.user_id, 2), 3) == 2
    with one.transaction() as tx:  # (one last saw 1 key)
        assert tx.insert_secret_below(_secret(ALICE.user_id, 3), 3) == 3
    with other.transaction() as tx:  # (other last saw 2: the table has 3, the limit)
        assert tx.insert_secret_below(_secret(ALICE.user_id, 4), 3) == 0
        assert tx.delete_secret(ALICE.user_id, (1).to_bytes(16, "big"))
    with one.transaction() as tx:  # (one last saw 3: the table has 2)
        assert tx.insert_secret_below(_secret(ALICE.user_id, 4), 3) == 3
        assert tx.insert_secret_below(_secret(ALICE.user_id, 5), 3) == 0
    with other.transaction() as tx:
        assert tx.delete_secret(ALICE.user_id, (4).to_bytes(16, "big"))
        assert tx.delete_secret(ALICE.user_id, (3).to_bytes(16, "big"))
    with pytest.raises(RuntimeError), one.transaction() as tx:
        assert tx.insert_secret_below(_secret(ALICE.user_id, 6), 3) == 2
        raise RuntimeError("rolled back")
    with one.transaction() as tx:
        assert tx.insert_secret_below(_secret(ALICE.user_id, 7), 3) == 2
        assert tx.insert_secret_below(_secret(ALICE.user_id, 8), 3) == 3
        assert tx.insert_secret_below(_secret(ALICE.user_id, 9), 3) == 0
        assert tx.count_keys(ALICE.user_id) == 3
        assert [k.key_id[-1] for k in tx.list_keys(ALICE.user_id, 0, 10)[0]] == [2, 7, 8]


def test_several_audit_entries_in_one_step_are_numbered_and_chained_as_one_by_one(make_storage):
    """append_audits (a store's entry and its next key id's): numbered and chained as if
    appended one at a time, after entries of either kind, also from a second opening; with
    the session's credentials checked once: changed or gone, none is written."""
    from keymgmt.adapters.storage.base import CredentialsChanged
    from keymgmt_proto import audit_chain_hash, audit_genesis_hash

    def records(base):
        return [
            AuditRecord(ALICE.user_id, Action.GENERATE, base, Outcome.SUCCESS, b"k" * 16),
            AuditRecord(ALICE.user_id, Action.CREATE_KEY_ID, base, Outcome.SUCCESS, b"n" * 16),
        ]

    def log(storage):
        with storage.transaction() as tx:
            return tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))[0]

    one, other = make_storage(), make_storage()
    with one.transaction() as tx:
        tx.insert_account(ALICE)
        tx.append_audit(AuditRecord(ALICE.user_id, Action.LOGIN, 1, Outcome.SUCCESS))
        tx.append_audits(records(2), credentials=0)
        tx.append_audits(records(3))
        tx.append_audit(AuditRecord(ALICE.user_id, Action.RETRIEVE, 4, Outcome.SUCCESS, b"k" * 16))
    with pytest.raises(CredentialsChanged) as changed, one.transaction() as tx:
        tx.append_audits(records(5), credentials=7)
    assert not changed.value.gone
    with other.transaction() as tx:  # another opening (process) goes on from the committed entries
        tx.append_audits(records(6), credentials=0)
    with one.transaction() as tx:  # and this one after it
        tx.append_audits(records(7), credentials=0)
    entries = log(one)
    assert [(e.entry_id, e.timestamp) for e in entries] == [
        (1, 1),
        (2, 2),
        (3, 2),
        (4, 3),
        (5, 3),
        (6, 4),
        (7, 6),
        (8, 6),
        (9, 7),
        (10, 7),
    ]
    assert [e.action for e in entries[1:3]] == [Action.GENERATE, Action.CREATE_KEY_ID]
    previous = audit_genesis_hash()
    for entry in entries:
        assert entry.chain_hash == audit_chain_hash(ALICE.user_id, previous, entry)
        previous = entry.chain_hash
    with pytest.raises(CredentialsChanged) as gone, other.transaction() as tx:
        tx.append_audits([AuditRecord(b"Z" * 16, Action.GENERATE, 1, Outcome.SUCCESS)] * 2, credentials=0)
    assert gone.value.gone
    assert log(other) == entries


def test_the_largest_sealed_secret_is_stored_whole(make_storage):
    """OPS-12: a 64 KiB secret sealed (65,564 bytes) fits the ciphertext column of both
    backends (BLOB, BYTEA: no size CHECK), byte for byte, and reads back from a second opening."""
    sealed = os.urandom(MAX_SEALED_SIZE)
    record = SecretRecord(ALICE.user_id, b"K" * 16, SecretKind.IMPORTED, sealed, b"ad" * 22, 5)
    with make_storage().transaction() as tx:
        tx.insert_account(ALICE)
        assert tx.insert_secret(record)
    with make_storage().transaction() as tx:
        assert tx.get_secret(ALICE.user_id, b"K" * 16) == record


def test_list_keys_pages_in_creation_order(storage):
    with storage.transaction() as tx:
        tx.insert_account(ALICE)
        for n in range(7):
            tx.insert_secret(_secret(ALICE.user_id, n, created=100 - n))
        first, cursor = tx.list_keys(ALICE.user_id, 0, 3)
        second, cursor2 = tx.list_keys(ALICE.user_id, cursor, 3)
        third, cursor3 = tx.list_keys(ALICE.user_id, cursor2, 3)
    ordered = [k.key_id for k in first + second + third]
    assert ordered == [n.to_bytes(16, "big") for n in range(6, -1, -1)]
    assert (cursor, cursor2, cursor3) == (3, 6, 0)


def test_audit_is_numbered_per_user_and_filters(storage):
    with storage.transaction() as tx:
        tx.insert_account(ALICE)
        tx.insert_account(BOB)
        tx.append_audit(AuditRecord(ALICE.user_id, Action.LOGIN, 10, Outcome.SUCCESS))
        tx.append_audit(AuditRecord(BOB.user_id, Action.LOGIN, 11, Outcome.SUCCESS))
        tx.append_audit(
            AuditRecord(ALICE.user_id, Action.RETRIEVE, 20, Outcome.FAILURE, b"k" * 16, Context.EXPORT)
        )
        tx.append_audit(AuditRecord(ALICE.user_id, Action.GENERATE, 30, Outcome.SUCCESS, b"j" * 16))
        entries, cursor = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))
        assert [e.entry_id for e in entries] == [1, 2, 3] and cursor == 0
        assert entries[1].context is Context.EXPORT and entries[1].key_id == b"k" * 16
        keys, _ = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.KEY_ONLY))
        assert [e.action for e in keys] == [Action.RETRIEVE, Action.GENERATE]
        system, _ = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.SYSTEM_ONLY))
        assert [e.action for e in system] == [Action.LOGIN]
        one_key, _ = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.KEY_ONLY, key_ids=[b"j" * 16]))
        assert [e.entry_id for e in one_key] == [3]
        window, _ = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL, after=20, before=30))
        assert [e.entry_id for e in window] == [2]
        page, cursor = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL, limit=2))
        rest, end = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL, cursor=cursor, limit=2))
        assert [e.entry_id for e in page + rest] == [1, 2, 3] and end == 0
        assert [e.entry_id for e in tx.query_audit(BOB.user_id, AuditQuery(AuditType.ALL))[0]] == [1]


def test_an_operation_and_its_audit_entry_commit_together(storage):
    with storage.transaction() as tx:
        tx.insert_account(ALICE)
    with pytest.raises(RuntimeError), storage.transaction() as tx:
        tx.insert_secret(_secret(ALICE.user_id, 5))
        tx.append_audit(
            AuditRecord(ALICE.user_id, Action.GENERATE, 1, Outcome.SUCCESS, (5).to_bytes(16, "big"))
        )
        raise RuntimeError("crash between the write and the commit")
    with storage.transaction() as tx:
        assert tx.get_secret(ALICE.user_id, (5).to_bytes(16, "big")) is None
        assert tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL)) == ([], 0)


def test_login_throttling_state(storage):
    """NET-10 in storage: logins in flight count towards the threshold; once it is reached
    only one login at a time; a lock refuses all; a success does not clear the failures."""
    x = b"x"
    with storage.transaction() as tx:
        assert tx.get_login_record(x) is None
        assert [tx.start_login(x, now, 3, 50) for now in (100, 101, 102, 103)] == [True, True, True, False]
        assert tx.finish_login(x, 110, succeeded=False) == LoginRecord(x, 1, 1, 1, 110, 103, 0)
        assert tx.finish_login(x, 111, succeeded=False) == LoginRecord(x, 2, 2, 1, 111, 103, 0)
        assert not tx.start_login(x, 112, 3, 50)  # 2 failures + 1 in flight
        assert tx.finish_login(x, 113, succeeded=False) == LoginRecord(x, 3, 3, 2, 113, 112, 0)
        assert tx.start_login(x, 114, 3, 50)  # at the threshold: one at a time
        assert not tx.start_login(x, 115, 3, 50)
        # A login that never ends stops counting as in flight after ``in_flight_for``.
        assert tx.start_login(x, 200, 3, 50)
        # A failure locks the name in the same step, for what lock_for says of its count.
        seen = []
        locked = tx.finish_login(x, 210, succeeded=False, lock_for=lambda n: seen.append(n) or 290)
        assert seen == [4] and locked == LoginRecord(x, 4, 4, 3, 210, 115, 500)
        tx.finish_login(x, 220, succeeded=False, lock_for=lambda n: 100)  # a lock never shortens
        assert not tx.start_login(x, 300, 3, 50)
        assert tx.get_login_record(x) == LoginRecord(x, 5, 5, 4, 220, 300, 500)
        # A success hands over what waits for the owner's log and keeps the failures.
        assert tx.finish_login(x, 310, succeeded=True) == LoginRecord(x, 5, 5, 4, 220, 300, 500)
        assert tx.get_login_record(x) == LoginRecord(x, 5, 0, 0, 220, 300, 500)
        assert tx.finish_login(b"nobody", 310, succeeded=True) is None
        # A failure counts even when the record went while the login ran.
        assert tx.finish_login(b"gone", 320, succeeded=False) == LoginRecord(b"gone", 1, 1, 0, 320, 0, 0)


def test_a_success_ends_its_login_in_flight_in_one_step(storage):
    """A success ends its login in flight and hands over the counts waiting for the owner's
    log; with none waiting (the common case) its one statement still ends the login."""
    y = b"y"
    with storage.transaction() as tx:
        assert [tx.start_login(y, now, 2, 1000) for now in (1, 2, 3)] == [True, True, False]
        assert tx.finish_login(y, 4, succeeded=True) == LoginRecord(y, 0, 0, 1, 0, 3, 0)
        assert tx.get_login_record(y) == LoginRecord(y, 0, 0, 0, 0, 3, 0)
        assert tx.start_login(y, 5, 2, 1000)  # one in flight again: the success ended its own
        assert tx.finish_login(y, 6, succeeded=True) == LoginRecord(y, 0, 0, 0, 0, 3, 0)
        assert tx.finish_login(y, 7, succeeded=True) == LoginRecord(y, 0, 0, 0, 0, 3, 0)
        assert [tx.start_login(y, now, 2, 1000) for now in (8, 9, 10)] == [True, True, False]


def _fail(tx, name: bytes, now: int, locked_until: int = 0) -> None:
    assert tx.start_login(name, now, 5, 50)
    tx.finish_login(name, now, succeeded=False, lock_for=lambda n: max(0, locked_until - now))


def test_login_records_are_swept_when_stale_and_evicted_harmless_first(storage):
    with storage.transaction() as tx:
        _fail(tx, b"stale", 100)
        _fail(tx, b"stale but locked", 100, locked_until=10_000)
        assert tx.start_login(b"succeeded", 200, 5, 50)
        tx.finish_login(b"succeeded", 200, succeeded=True)  # never failed: nothing to keep
        assert tx.start_login(b"in flight", 4_990, 5, 50)
        for n in range(30):  # fresh00: the oldest, but locked
            _fail(tx, b"fresh%02d" % n, 1_000 + n, locked_until=10_000 if n == 0 else 0)
        for _ in range(4):
            _fail(tx, b"fresh01", 1_001)  # the next oldest, but at the threshold
        swept = tx.sweep_login_records(now=5_000, stale_before=500, in_flight_for=50, limit=1000)
        assert sorted(r.account_name for r in swept) == [b"stale", b"succeeded"]
        assert tx.count_login_records() == 32
        # Over the cap: the harmless records with the oldest failures go first.
        evicted = tx.evict_login_records(now=5_000, threshold=5, in_flight_for=50, count=10)
        assert sorted(r.account_name for r in evicted) == [b"fresh%02d" % n for n in range(2, 12)]
        assert tx.get_login_record(b"in flight") is not None
        # With no harmless record left, the others go, unlocked before locked (a login in
        # flight too: if it fails, its failure makes the record again).
        evicted = tx.evict_login_records(now=5_000, threshold=0, in_flight_for=50, count=3)
        assert sorted(r.account_name for r in evicted) == [b"fresh01", b"fresh12", b"in flight"]
        assert tx.get_login_record(b"fresh00") is not None
        # A limit bounds one sweep; the rest waits for the next.
        assert len(tx.sweep_login_records(now=20_000, stale_before=20_000, in_flight_for=50, limit=5)) == 5


def test_concurrent_failures_all_count(make_storage):
    """Failed logins for one name on several instances at once: none is lost (NET-10)."""
    threads_count, each = 4, 10

    def fail_many() -> None:
        storage = make_storage()
        for _ in range(each):
            with storage.transaction() as tx:
                tx.finish_login(b"target", 1, succeeded=False)

    threads = [threading.Thread(target=fail_many) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with make_storage().transaction() as tx:
        record = tx.get_login_record(b"target")
        assert record is not None and record.failures == threads_count * each


def test_concurrent_starts_admit_at_most_the_threshold(make_storage):
    """Logins of one name started on several instances at once: no more than the
    threshold are admitted (NET-10; each start is one atomic statement)."""
    threads_count, each, admitted = 4, 10, []

    def start_many() -> None:
        storage = make_storage()
        for _ in range(each):
            with storage.transaction() as tx:
                admitted.append(tx.start_login(b"target", 1, 5, 10**9))

    threads = [threading.Thread(target=start_many) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert admitted.count(True) == 5
    with make_storage().transaction() as tx:
        record = tx.get_login_record(b"target")
        assert record is not None and record.throttled == threads_count * each - 5


def test_state_is_visible_to_a_second_opening(make_storage):
    first = make_storage()
    with first.transaction() as tx:
        tx.insert_account(ALICE)
        tx.insert_secret(_secret(ALICE.user_id, 1))
    second = make_storage()
    with second.transaction() as tx:
        assert tx.get_secret(ALICE.user_id, (1).to_bytes(16, "big")) is not None
    assert second.schema_version == first.schema_version >= 1


def test_detached_sessions_are_claimed_once(make_storage):
    first, second = make_storage(), make_storage()
    first.session_store.save(b"h" * 16, b"sealed one", 1e12)
    first.session_store.save(b"h" * 16, b"sealed two", 1e12)  # replaces
    assert second.session_store.claim(b"h" * 16) == b"sealed two"
    assert first.session_store.claim(b"h" * 16) is None
    assert second.session_store.claim(b"missing" * 2) is None


def test_concurrent_writers_lose_nothing(make_storage):
    """Several connections (as several instances would) store and audit for one user at once."""
    with make_storage().transaction() as tx:
        tx.insert_account(ALICE)
    writers, per_writer = 4, 25
    errors: list[BaseException] = []

    def work(index: int) -> None:
        storage = make_storage()
        try:
            for n in range(per_writer):
                key = index * 1000 + n
                with storage.transaction() as tx:
                    assert tx.insert_secret(_secret(ALICE.user_id, key))
                    tx.append_audit(
                        AuditRecord(
                            ALICE.user_id, Action.GENERATE, key, Outcome.SUCCESS, key.to_bytes(16, "big")
                        )
                    )
        except BaseException as exc:  # collected and reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with make_storage().transaction() as tx:
        assert tx.count_keys(ALICE.user_id) == writers * per_writer
        entries = []
        cursor = 0
        while True:
            page, cursor = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL, cursor=cursor))
            entries += page
            if cursor == 0:
                break
    assert [e.entry_id for e in entries] == list(range(1, writers * per_writer + 1))


def test_a_batch_commits_once_and_a_failed_operation_rolls_back_alone(storage):
    with storage.transaction() as tx:
        tx.insert_account(ALICE)
    with storage.batch():
        with storage.transaction() as tx:
            tx.insert_secret(_secret(ALICE.user_id, 1))
        with pytest.raises(RuntimeError), storage.transaction() as tx:
            tx.insert_secret(_secret(ALICE.user_id, 2))
            raise RuntimeError("this operation fails")
        with storage.transaction() as tx:
            tx.append_audit(AuditRecord(ALICE.user_id, Action.GENERATE, 1, Outcome.SUCCESS))
    with storage.transaction() as tx:
        assert tx.key_id_exists((1).to_bytes(16, "big"))
        assert not tx.key_id_exists((2).to_bytes(16, "big"))
        assert len(tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))[0]) == 1


def test_a_failed_batch_leaves_nothing(storage):
    with storage.transaction() as tx:
        tx.insert_account(ALICE)
    with pytest.raises(RuntimeError), storage.batch():
        with storage.transaction() as tx:
            tx.insert_secret(_secret(ALICE.user_id, 3))
        raise RuntimeError("the batch fails before its commit")
    with storage.transaction() as tx:
        assert not tx.key_id_exists((3).to_bytes(16, "big"))
        assert tx.get_account(ALICE.account_name) is not None


def _previous_schema_sqlite(tmp_path):
    """An SQLite database as the release before login-attempt counts (schema 3) left it."""
    import sqlite3

    from keymgmt.adapters.storage.sqlite import _MIGRATIONS

    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for migration in _MIGRATIONS[:3]:
        db.executescript(migration)
    db.execute("INSERT INTO schema_version (version) VALUES (3)")
    db.execute(
        "INSERT INTO accounts VALUES (?, ?, ?, ?, ?)", (ALICE.user_id, b"alice", bytes(192), bytes(60), 1)
    )
    db.execute("INSERT INTO audit VALUES (?, 1, ?, 5, 0, NULL, NULL)", (ALICE.user_id, int(Action.REGISTER)))
    db.execute("INSERT INTO login_throttle VALUES (?, 2, 0, 777)", (b"alice",))
    for n in (1, 2):  # keys stored before the key count existed (schema 5 counts them)
        db.execute(
            "INSERT INTO secrets VALUES (?, ?, 1, ?, ?, ?)",
            (bytes([n]) * 16, ALICE.user_id, bytes(60), b"ad", n),
        )
    db.close()
    path.chmod(0o600)
    return lambda: SQLiteStorage(path)


def _previous_schema_postgres():
    """A PostgreSQL schema as the release before login-attempt counts (schema 1) left it."""
    import psycopg
    from psycopg import sql

    from keymgmt.adapters.storage.postgres import _MIGRATIONS, PostgresStorage

    fixture = schema_fixture()
    conninfo, schema = next(fixture)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in _MIGRATIONS[0].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        conn.execute(
            "INSERT INTO accounts VALUES (%s, %s, %s, %s, 1, 1)",
            (ALICE.user_id, b"alice", bytes(192), bytes(60)),
        )
        conn.execute(
            "INSERT INTO audit VALUES (%s, 1, %s, 5, 0, NULL, NULL)", (ALICE.user_id, int(Action.REGISTER))
        )
        conn.execute("INSERT INTO login_throttle VALUES (%s, 2, 0, 777)", (b"alice",))
        for n in (1, 2):  # keys stored before the key count existed (schema 3 counts them)
            conn.execute(
                "INSERT INTO secrets VALUES (%s, %s, 1, %s, %s, %s)",
                (bytes([n]) * 16, ALICE.user_id, bytes(60), b"ad", n),
            )
    return (lambda: PostgresStorage(conninfo, schema=schema)), fixture


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_database_of_the_previous_schema_is_upgraded_in_place(tmp_path, backend):
    fixture = None
    if backend == "sqlite":
        open_storage = _previous_schema_sqlite(tmp_path)
    else:
        open_storage, fixture = _previous_schema_postgres()
    storage = open_storage()
    try:
        with storage.transaction() as tx:
            entries, _ = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))
            assert [(e.entry_id, e.action, e.count) for e in entries] == [(1, Action.REGISTER, 1)]
            # The failures of the old schema had not been logged yet: they wait for the owner.
            assert tx.get_login_record(b"alice") == LoginRecord(b"alice", 2, 2, 0, 777, 0, 0)
            assert tx.start_login(b"alice", 900, 5, 50)
            assert tx.finish_login(b"alice", 901, succeeded=True) == LoginRecord(b"alice", 2, 2, 0, 777, 0, 0)
            tx.append_audit(AuditRecord(ALICE.user_id, Action.LOGIN, 950, Outcome.FAILURE, count=7))
            entries, _ = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))
            assert entries[-1].count == 7
            assert tx.count_keys(ALICE.user_id) == 2  # counted by the migration
            assert tx.delete_secret(ALICE.user_id, bytes([1]) * 16)
            assert tx.count_keys(ALICE.user_id) == 1
    finally:
        storage.close()
    reopened = open_storage()  # already current: opens without migrating again
    reopened.close()
    if fixture is not None:
        next(fixture, None)


def test_a_batch_holds_no_lock_on_the_throttling_rows(make_storage):
    """Two instances: while one is in the middle of a batch that has started and ended
    logins of a name, the other can start and end logins of that name at once. With the
    rows locked until the batch commits, two batches an attacker composes could each wait
    for the other (a deadlock that loses a failure count and stalls both, NET-10)."""
    import time

    first, second = make_storage(), make_storage()
    with first.batch():
        with first.transaction() as tx:
            assert tx.start_login(b"victim", 100, 5, 10**9)
            tx.finish_login(b"victim", 101, succeeded=False)
        if isinstance(first, SQLiteStorage):
            return  # one writer at a time: the other process waits for the batch, no cycle
        started = time.monotonic()
        with second.transaction() as tx:
            assert tx.start_login(b"victim", 102, 5, 10**9)
            assert tx.finish_login(b"victim", 103, succeeded=False).failures == 2
        assert time.monotonic() - started < 1.0  # no wait for the batch's commit


def test_postgres_waits_for_the_wal_flush_only_where_it_must():
    """STO-1 on PostgreSQL: a commit with acknowledged state waits for the database's WAL
    flush (synchronous_commit on); one with only login bookkeeping does not (set off for
    that transaction alone), and neither do the throttling rows' own transactions."""
    from keymgmt.adapters.storage.postgres import PostgresStorage

    fixture = schema_fixture()
    conninfo, schema = next(fixture)
    storage = PostgresStorage(conninfo, schema=schema)
    seen: list[str] = []
    real = storage._before_commit

    def before_commit(conn):
        real(conn)
        seen.append(conn.execute("SHOW synchronous_commit").fetchone()[0])

    storage._before_commit = before_commit
    try:
        with storage.transaction() as tx:
            tx.insert_account(ALICE)
        with storage.batch():
            with storage.transaction() as tx:
                assert tx.start_login(ALICE.account_name, 1, 5, 10**6)
            with storage.transaction() as tx:
                tx.finish_login(ALICE.account_name, 2, succeeded=True)
                tx.append_audit(AuditRecord(ALICE.user_id, Action.LOGIN, 2, Outcome.SUCCESS))
        with storage.batch():
            with storage.transaction() as tx:
                tx.append_audit(AuditRecord(ALICE.user_id, Action.LOGOUT, 3, Outcome.SUCCESS))
            with storage.transaction() as tx:
                tx.insert_secret(_secret(ALICE.user_id, 1))
        assert seen == ["on", "off", "on"]
        with storage._pool.connection() as conn, conn.transaction():  # settings stay per transaction
            assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    finally:
        storage.close()
        next(fixture, None)


def test_a_stored_label_no_sealed_label_can_be_is_listed_as_one_that_does_not_open(storage, caplog):
    """Review of issue 16, gap 3: LIST_KEYS turned a label of a wrong length into an internal
    error (KeyInfo refuses it). A label column altered to such a value now lists as the
    shortest well-formed sealed label, which never opens; the others as they are."""
    import logging

    from keymgmt.adapters.storage.sql import UNOPENABLE_LABEL

    caplog.set_level(logging.WARNING, logger="keymgmt.server")
    good, short, long = bytes([1]) * 16, bytes([2]) * 16, bytes([3]) * 16
    with storage.transaction() as tx:
        tx.insert_account(ALICE)
        for n, key_id in enumerate((good, short, long)):
            tx.insert_secret(SecretRecord(ALICE.user_id, key_id, SecretKind.GENERATED, bytes(60), b"ad", n))
        assert tx.set_label(ALICE.user_id, good, b"g" * 60)
        assert tx.set_label(ALICE.user_id, short, b"s" * 28)  # (storage takes what it is given)
        assert tx.set_label(ALICE.user_id, long, b"l" * 256)
        keys, _ = tx.list_keys(ALICE.user_id, 0, 10)
    assert [(k.key_id, k.sealed_label) for k in keys] == [
        (good, b"g" * 60),
        (short, UNOPENABLE_LABEL),
        (long, UNOPENABLE_LABEL),
    ]
    assert len(UNOPENABLE_LABEL) == 29 and not any(UNOPENABLE_LABEL)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "28 bytes" in warnings[0] and "256 bytes" in warnings[1]


def test_the_retrieve_paths_read_and_entry_are_get_secret_and_append_audits(storage):
    """secret_fields is get_secret's kind, ciphertext and AD (None alike for a missing key and
    for another user's, OPS-7); append_audit_fields writes the entry append_audit would,
    numbered and chained after the others, and checks the session's credentials."""
    with storage.transaction() as tx:
        assert tx.insert_account(ALICE)
        assert tx.insert_account(BOB)
        secret = SecretRecord(ALICE.user_id, b"k" * 16, SecretKind.GENERATED, bytes(range(60)), b"ad", 5)
        assert tx.insert_secret(secret)
    with storage.transaction() as tx:
        assert tx.secret_fields(ALICE.user_id, b"k" * 16) == (SecretKind.GENERATED, secret.ciphertext, b"ad")
        assert tx.secret_fields(BOB.user_id, b"k" * 16) is None
        assert tx.secret_fields(ALICE.user_id, b"x" * 16) is None
        tx.append_audit(AuditRecord(ALICE.user_id, Action.GENERATE, 1, Outcome.SUCCESS, b"k" * 16))
        tx.append_audit_fields(ALICE.user_id, Action.RETRIEVE, 2, Outcome.SUCCESS, b"k" * 16, Context.NULL, 0)
        tx.append_audit_fields(ALICE.user_id, Action.RETRIEVE, 3, Outcome.FAILURE, None, None)
    with pytest.raises(CredentialsChanged), storage.transaction() as tx:
        tx.append_audit_fields(ALICE.user_id, Action.RETRIEVE, 4, Outcome.SUCCESS, b"k" * 16, None, 7)
    with storage.transaction() as tx:
        entries, _ = tx.query_audit(ALICE.user_id, AuditQuery(AuditType.ALL))
    fields = [(e.entry_id, e.action, e.timestamp, e.outcome, e.key_id, e.context) for e in entries]
    assert fields == [
        (1, Action.GENERATE, 1, Outcome.SUCCESS, b"k" * 16, None),
        (2, Action.RETRIEVE, 2, Outcome.SUCCESS, b"k" * 16, Context.NULL),
        (3, Action.RETRIEVE, 3, Outcome.FAILURE, None, None),
    ]
    previous = audit_genesis_hash()
    for entry in entries:
        assert entry.chain_hash == audit_chain_hash(ALICE.user_id, previous, entry)
        previous = entry.chain_hash


@pytest.mark.parametrize("tail", [0, 5], ids=["log-ends-at-a-scan-bound", "log-ends-past-one"])
@pytest.mark.parametrize("limit", [MAX_AUDIT_PAGE, 2])
def test_a_client_pages_through_a_big_log_with_a_selective_filter(make_storage, tail, limit):
    """Protocol.md 12.9, the bounded scan: a user's log of four scans' worth of entries, a
    filter that matches a few of them (at the scan bounds, both sides, and at the log's end),
    and the client's pager (SecretOps.audit, as every client adapter runs it) against the key
    server: exactly the matching entries, in entry order, none twice, on both backends. Along
    the way, pages that are empty but not the end; no request reads more than
    MAX_AUDIT_SCAN entries (a short page's next_cursor is its cursor plus the bound)."""
    from keymgmt.adapters.server.app import KeyServer
    from keymgmt_proto import AuditRequest, SecretOps, SessionHandle

    storage = make_storage()
    total = 4 * MAX_AUDIT_SCAN + tail
    wanted, other = b"w" * 16, b"o" * 16
    hits = {1, 2, MAX_AUDIT_SCAN - 1, MAX_AUDIT_SCAN, MAX_AUDIT_SCAN + 1, 3 * MAX_AUDIT_SCAN + 7, total}
    with storage.transaction() as tx:
        tx.insert_account(ALICE)
        tx.insert_account(BOB)
    for start in range(1, total + 1, 1024):
        seqs = range(start, min(start + 1024, total + 1))
        with storage.transaction() as tx:
            tx.append_audits(
                [
                    AuditRecord(
                        ALICE.user_id, Action.RETRIEVE, seq, Outcome.SUCCESS, wanted if seq in hits else other
                    )
                    for seq in seqs
                ]
            )
            # Another user's entries for the same key id are never read nor returned.
            tx.append_audits(
                [AuditRecord(BOB.user_id, Action.RETRIEVE, seq, Outcome.SUCCESS, wanted) for seq in seqs]
            )
    # The bounds exactly, before the walk adds entries: a scan that reaches the log's last
    # entry ends the walk; one that stops an entry before it goes on from its last entry.
    with storage.transaction() as tx:
        query = AuditQuery(AuditType.KEY_ONLY, [wanted], cursor=total - MAX_AUDIT_SCAN, limit=limit)
        entries, next_cursor = tx.query_audit(ALICE.user_id, query)
        assert ([e.entry_id for e in entries], next_cursor) == ([3 * MAX_AUDIT_SCAN + 7, total], 0)
        query = AuditQuery(AuditType.KEY_ONLY, [wanted], cursor=total - MAX_AUDIT_SCAN - 1, limit=limit)
        entries, next_cursor = tx.query_audit(ALICE.user_id, query)
        assert ([e.entry_id for e in entries], next_cursor) == ([3 * MAX_AUDIT_SCAN + 7], total - 1)
    server = KeyServer(storage)
    ops = SecretOps(ALICE.user_id, bytes(64), os.urandom)
    plan = ops.audit(AuditType.KEY_ONLY, [wanted])
    pages: list[tuple[AuditRequest, object]] = []
    try:
        request = next(plan)
        while True:
            assert isinstance(request, AuditRequest)
            request = AuditRequest(
                request.user_id,
                request.audit_type,
                request.key_ids,
                request.after,
                request.before,
                request.cursor,
                limit,
            )
            response = SecretOps.answer(
                request, server.answer(SessionHandle(), ALICE.user_id, request.encode())
            )
            pages.append((request, response))
            request = plan.send(response)
    except StopIteration as done:
        entries = done.value
    assert [e.entry_id for e in entries] == sorted(hits)
    assert [e.timestamp for e in entries] == sorted(hits)
    assert all(e.key_id == wanted for e in entries)
    empty_not_done = [(q.cursor, r.next_cursor) for q, r in pages if not r.entries and r.next_cursor]
    assert empty_not_done, "the walk met no empty page that is not the end"
    for request, response in pages:
        if response.next_cursor and len(response.entries) < request.limit:
            assert response.next_cursor == request.cursor + MAX_AUDIT_SCAN
    # Each page's own AUDIT entry went to the end of the log as the walk went on: it ends
    # there (next_cursor 0), after at most a page per scan of the log and per full page.
    assert pages[-1][1].next_cursor == 0
    assert len(pages) <= (total + len(pages)) // MAX_AUDIT_SCAN + 1 + len(hits) // limit + 1
