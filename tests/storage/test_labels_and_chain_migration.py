"""Issue 16, storage: the migration that adds key labels and the audit chain upgrades a
database made by the previous schema in place (SQLite and PostgreSQL), chaining the entries
written before it exactly as if the chain had always been there; labels are stored as
given; appends continue the chain inside their transaction (a rolled-back entry leaves no
trace in it)."""

from __future__ import annotations

import threading
import time

import pytest

from keymgmt.adapters.storage import postgres as pg_backend
from keymgmt.adapters.storage import sqlite as sqlite_backend
from keymgmt.adapters.storage.base import AuditQuery, AuditRecord
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    Action,
    AuditEntry,
    AuditHead,
    AuditResponse,
    AuditType,
    Context,
    IntegrityFailure,
    Outcome,
    SecretOps,
    audit_chain_hash,
    audit_genesis_hash,
)

from ..support.migrations import postgres_at, sqlite_at
from ..support.pg import schema_fixture

ALICE, BOB = b"A" * 16, b"B" * 16
KEY = b"K" * 16
#: Entries as the previous schema stored them: (user, seq, action, time, outcome, key id, context, count).
OLD_ENTRIES = [
    (ALICE, 1, Action.REGISTER, 1_000, Outcome.SUCCESS, None, None, 1),
    (ALICE, 2, Action.LOGIN, 2_000, Outcome.FAILURE, None, None, 3),
    (ALICE, 3, Action.RETRIEVE, 3_000, Outcome.SUCCESS, KEY, Context.EXPORT, 1),
    (BOB, 1, Action.REGISTER, 1_500, Outcome.SUCCESS, None, None, 1),
]


def _before_the_chain(migrations: list[str]) -> list[str]:
    """The migrations of the previous schema: those before the one that adds the chain."""
    (index,) = [n for n, migration in enumerate(migrations) if "ADD COLUMN chain_hash" in migration]
    return migrations[:index]


def _expected_chain(user: bytes) -> list[AuditEntry]:
    entries, previous = [], audit_genesis_hash()
    for u, seq, action, ts, outcome, key_id, context, count in OLD_ENTRIES:
        if u != user:
            continue
        entry = AuditEntry(seq, action, ts, outcome, key_id, context, count)
        previous = audit_chain_hash(user, previous, entry)
        entries.append(AuditEntry(seq, action, ts, outcome, key_id, context, count, previous))
    return entries


def _fill_previous_schema(execute, mark: str) -> None:
    """Accounts, a secret and audit entries written with the previous schema's columns."""
    for user, name in ((ALICE, b"alice"), (BOB, b"bob")):
        execute(
            "INSERT INTO accounts (user_id, account_name, registration_record, encrypted_storage_key, "
            f"created_us) VALUES ({mark}, {mark}, {mark}, {mark}, 1)",
            (user, name, b"r" * 192, b"e" * 60),
        )
    execute(
        "INSERT INTO secrets (key_id, user_id, kind, ciphertext, associated_data, created_us) "
        f"VALUES ({mark}, {mark}, 1, {mark}, {mark}, 5)",
        (KEY, ALICE, b"c" * 60, ALICE + KEY),
    )
    for user, seq, action, ts, outcome, key_id, context, count in OLD_ENTRIES:
        execute(
            "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, key_id, context, event_count) "
            f"VALUES ({', '.join([mark] * 8)})",
            (
                user,
                seq,
                int(action),
                ts,
                int(outcome),
                key_id,
                None if context is None else int(context),
                count,
            ),
        )


def _check_upgraded(storage) -> None:
    """What every upgraded database must show."""
    with storage.transaction() as tx:
        for user in (ALICE, BOB):
            entries, _ = tx.query_audit(user, AuditQuery(AuditType.ALL))
            assert entries == _expected_chain(user)  # chained from the genesis hash, in order
        keys, _ = tx.list_keys(ALICE, 0, 10)
        assert [(k.key_id, k.sealed_label) for k in keys] == [(KEY, b"")]  # no label yet
        assert tx.get_secret(ALICE, KEY).ciphertext == b"c" * 60  # the secret is untouched
        assert tx.set_label(ALICE, KEY, b"s" * 40)
        assert not tx.set_label(BOB, KEY, b"s" * 40)  # another user's key: nothing written
        tx.append_audit(AuditRecord(ALICE, Action.RENAME_KEY, 4_000, Outcome.SUCCESS, KEY))
    with pytest.raises(RuntimeError), storage.transaction() as tx:  # rolled back: not in the chain
        tx.append_audit(AuditRecord(ALICE, Action.AUDIT, 4_500, Outcome.SUCCESS))
        raise RuntimeError("roll back")
    with storage.transaction() as tx:
        tx.append_audit(AuditRecord(ALICE, Action.LOGOUT, 5_000, Outcome.SUCCESS))
        keys, _ = tx.list_keys(ALICE, 0, 10)
        assert keys[0].sealed_label == b"s" * 40
        entries, _ = tx.query_audit(ALICE, AuditQuery(AuditType.ALL))
    # The whole log verifies as a client checks it, against the head of before the upgrade.
    old_head = _expected_chain(ALICE)[-1]
    assert old_head.chain_hash is not None
    plan = SecretOps(ALICE, bytes(64), lambda n: bytes(n)).verify_audit(AuditHead(3, old_head.chain_hash))
    next(plan)
    with pytest.raises(StopIteration) as done:
        plan.send(AuditResponse(tuple(entries)))
    verified = done.value.value
    assert [e.action for e in verified.entries][3:] == [Action.RENAME_KEY, Action.LOGOUT]
    assert verified.head.position == 5


def test_sqlite_upgrades_a_database_of_the_previous_schema(tmp_path, monkeypatch):
    path = tmp_path / "ks.db"
    with sqlite_at(path, _before_the_chain(sqlite_backend._MIGRATIONS), monkeypatch) as execute:
        _fill_previous_schema(execute, "?")

    storage = SQLiteStorage(path)
    try:
        assert storage.schema_version == len(sqlite_backend._MIGRATIONS)
        _check_upgraded(storage)
    finally:
        storage.close()
    # The in-memory numbering of a new storage reads the chain back from the file.
    storage = SQLiteStorage(path)
    try:
        with storage.transaction() as tx:
            tx.append_audit(AuditRecord(ALICE, Action.LOGIN, 6_000, Outcome.SUCCESS))
            entries, _ = tx.query_audit(ALICE, AuditQuery(AuditType.ALL))
        assert [e.entry_id for e in entries] == [1, 2, 3, 4, 5, 6]
        last = entries[-1]
        assert last.chain_hash == audit_chain_hash(ALICE, entries[-2].chain_hash, last)
    finally:
        storage.close()


def test_sqlite_append_after_another_process_appended_reads_the_chain_again(tmp_path):
    """Two storages on one file (two processes): the remembered number is taken, so the
    entry is numbered and chained from what the other one wrote."""
    first, second = SQLiteStorage(tmp_path / "ks.db"), SQLiteStorage(tmp_path / "ks.db")
    try:
        with first.transaction() as tx:
            tx.insert_account(_account())
            tx.append_audit(AuditRecord(ALICE, Action.REGISTER, 1, Outcome.SUCCESS))
        with second.transaction() as tx:
            tx.append_audit(AuditRecord(ALICE, Action.LOGIN, 2, Outcome.SUCCESS))
        with first.transaction() as tx:  # remembers entry 1; entry 2 is the other's
            tx.append_audit(AuditRecord(ALICE, Action.LOGOUT, 3, Outcome.SUCCESS))
            entries, _ = tx.query_audit(ALICE, AuditQuery(AuditType.ALL))
        previous = audit_genesis_hash()
        for entry in entries:
            previous = audit_chain_hash(ALICE, previous, entry)
            assert entry.chain_hash == previous
        assert [e.entry_id for e in entries] == [1, 2, 3]
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("entries", [1, 2])
def test_sqlite_refuses_to_chain_after_an_entry_without_a_hash(tmp_path, entries):
    """An entry with no chain hash (only a release before the chain could write one) ends
    the chain: appending after it is a StorageError, as on PostgreSQL, not an internal
    error (it was a TypeError) nor a chain silently started again from the genesis hash."""
    import sqlite3

    from keymgmt.adapters.storage.base import StorageError

    storage = SQLiteStorage(tmp_path / "ks.db")
    try:
        with storage.transaction() as tx:
            tx.insert_account(_account())
            tx.append_audit(AuditRecord(ALICE, Action.REGISTER, 1, Outcome.SUCCESS))
    finally:
        storage.close()
    raw = sqlite3.connect(tmp_path / "ks.db")
    raw.execute("UPDATE audit SET chain_hash = NULL WHERE user_id = ?", (ALICE,))
    raw.commit()
    raw.close()
    storage = SQLiteStorage(tmp_path / "ks.db")  # (a new storage remembers no number)
    try:
        records = [AuditRecord(ALICE, Action.LOGIN, 2 + n, Outcome.SUCCESS) for n in range(entries)]
        with pytest.raises(StorageError, match="not chained"), storage.transaction() as tx:
            tx.append_audits(records)
    finally:
        storage.close()


def _account():
    from keymgmt.adapters.storage.base import Account

    return Account(b"alice", ALICE, b"r" * 192, b"e" * 60, 1)


@pytest.fixture
def pg():
    fixture = schema_fixture()
    yield next(fixture)
    next(fixture, None)


def test_postgres_upgrades_a_database_of_the_previous_schema(pg, monkeypatch):
    conninfo, schema = pg
    with postgres_at(conninfo, schema, _before_the_chain(pg_backend._MIGRATIONS), monkeypatch) as execute:
        _fill_previous_schema(execute, "%s")
        # the previous schema numbers entries from the account's counter
        execute("UPDATE accounts SET audit_seq = 3 WHERE user_id = %s", (ALICE,))
        execute("UPDATE accounts SET audit_seq = 1 WHERE user_id = %s", (BOB,))
    storage = pg_backend.PostgresStorage(conninfo, schema=schema)
    try:
        assert storage.schema_version == len(pg_backend._MIGRATIONS)
        _check_upgraded(storage)
    finally:
        storage.close()


def test_a_client_refuses_a_log_the_server_changed_in_storage(tmp_path):
    """An entry altered in the database after it was written no longer matches its hash."""
    storage = SQLiteStorage(tmp_path / "ks.db")
    try:
        with storage.transaction() as tx:
            tx.insert_account(_account())
            for n, action in enumerate((Action.REGISTER, Action.LOGIN, Action.GENERATE)):
                tx.append_audit(AuditRecord(ALICE, action, n, Outcome.SUCCESS))
        storage._db.execute("UPDATE audit SET action = ? WHERE seq = 2", (int(Action.LOGOUT),))
        with storage.transaction() as tx:
            entries, _ = tx.query_audit(ALICE, AuditQuery(AuditType.ALL))
    finally:
        storage.close()
    plan = SecretOps(ALICE, bytes(64), lambda n: bytes(n)).verify_audit(None)
    next(plan)
    with pytest.raises(IntegrityFailure, match="entry 2 does not match"):
        plan.send(AuditResponse(tuple(entries)))


def _append_concurrently(first, second, per_instance: int) -> list[AuditEntry]:
    """Two instances append entries for one user at the same time; the log they leave."""
    with first.transaction() as tx:
        tx.insert_account(_account())
    errors: list[BaseException] = []

    def append(storage, base: int) -> None:
        try:
            for n in range(per_instance):
                with storage.transaction() as tx:
                    tx.append_audit(AuditRecord(ALICE, Action.RETRIEVE, base + n, Outcome.SUCCESS, KEY))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(s, b)) for s, b in ((first, 0), (second, 10_000))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    with first.transaction() as tx:
        entries, _ = tx.query_audit(ALICE, AuditQuery(AuditType.ALL))
    return entries


def _verified_position(entries: list[AuditEntry]) -> int:
    """The head position a client reaches walking ``entries`` (IntegrityFailure if the chain breaks)."""
    plan = SecretOps(ALICE, bytes(64), lambda n: bytes(n)).verify_audit(None)
    next(plan)
    with pytest.raises(StopIteration) as done:
        plan.send(AuditResponse(tuple(entries)))
    position: int = done.value.value.head.position
    return position


def test_sqlite_two_processes_appending_at_once_keep_one_chain(tmp_path):
    first, second = SQLiteStorage(tmp_path / "ks.db"), SQLiteStorage(tmp_path / "ks.db")
    try:
        entries = _append_concurrently(first, second, 60)
        assert _verified_position(entries) == len(entries) == 120
    finally:
        first.close()
        second.close()


def test_postgres_two_instances_appending_at_once_keep_one_chain(pg):
    conninfo, schema = pg
    first = pg_backend.PostgresStorage(conninfo, schema=schema)
    second = pg_backend.PostgresStorage(conninfo, schema=schema)
    try:
        entries = _append_concurrently(first, second, 60)
        assert _verified_position(entries) == len(entries) == 120
    finally:
        first.close()
        second.close()


def test_sqlite_two_workers_batching_ahead_never_fail_for_each_other_and_keep_one_chain(tmp_path):
    """Two connections on one file, as two server workers: batches begun on the loop
    (begin_batch(wait=False), then wait=True when refused), one-write audit entries without
    a savepoint (atomic=False: a logout, a refused request's entry), savepoints rolled back
    in a batch, transactions outside a batch and detached sessions saved, all at once. The
    busy timeout is left off after a batch begun ahead, so whatever must wait for the other's
    write lock must turn it back on: nothing fails with "database is locked" (a stress check:
    test_storage_survivors.py checks each waiting begin deterministically), and every entry
    written is in the one chain, numbered without a gap, none from a rolled-back savepoint."""

    class Refused(Exception):
        pass

    first, second = SQLiteStorage(tmp_path / "ks.db"), SQLiteStorage(tmp_path / "ks.db")
    with first.transaction() as tx:
        tx.insert_account(_account())
    errors: list[BaseException] = []
    written = [0, 0]
    together = threading.Barrier(2)

    def work(storage: SQLiteStorage, me: int) -> None:
        try:
            together.wait(timeout=60)
            for n in range(1, 61):
                if n % 3 == 0:  # outside a batch: waits for the other's lock
                    with storage.transaction() as tx:
                        tx.append_audit(AuditRecord(ALICE, Action.RETRIEVE, n, Outcome.SUCCESS, KEY))
                    written[me] += 1
                    continue
                if not storage.begin_batch(wait=False):
                    assert storage.begin_batch(wait=True)
                with storage.batch():
                    with storage.transaction(atomic=False) as tx:
                        tx.append_audit(AuditRecord(ALICE, Action.LOGOUT, n, Outcome.SUCCESS))
                    with pytest.raises(Refused), storage.transaction() as tx:
                        tx.append_audit(AuditRecord(ALICE, Action.GENERATE, n, Outcome.SUCCESS, KEY))
                        raise Refused  # rolled back: no entry, no number taken
                    with storage.transaction(atomic=False) as tx:
                        tx.append_audit(AuditRecord(ALICE, Action.RETRIEVE, n, Outcome.FAILURE, KEY))
                    storage.session_store.save(bytes([me, n]) * 8, b"s" * 64, 1e10)
                    time.sleep(0.005)  # (holding the write lock: the other must wait)
                written[me] += 2
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s, m)) for m, s in enumerate((first, second))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors and not any(t.is_alive() for t in threads), errors
        with first.transaction() as tx:
            entries, _ = tx.query_audit(ALICE, AuditQuery(AuditType.ALL))
    finally:
        first.close()
        second.close()
    assert sorted(e.entry_id for e in entries) == list(range(1, sum(written) + 1)) and sum(written) == 200
    assert _verified_position(entries) == 200
