"""SQLite storage, the setup file (CRY-5) and atomic registration (REG-4)."""

from __future__ import annotations

import os
import sqlite3
import stat

import anyio
import pytest

from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.server.setupfile import SetupFileError, create_server_setup_file, load_server_setup_file
from keymgmt.adapters.storage.base import Account, AuditQuery, AuditRecord, SecretRecord, StorageError
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    Action,
    AuditType,
    Context,
    ErrorCode,
    Outcome,
    RegistrationCompleted,
    SecretKind,
    SessionFailed,
)

from ..support.helpers import PASSWORD, Harness, only


def test_setup_file_is_created_once_owner_only(tmp_path):
    path = tmp_path / "server_setup.bin"
    setup = create_server_setup_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_server_setup_file(path).to_bytes() == setup.to_bytes()
    with pytest.raises(SetupFileError, match="refusing to overwrite"):
        create_server_setup_file(path)
    assert load_server_setup_file(path).to_bytes() == setup.to_bytes()
    assert "secret" in repr(setup) and setup.to_bytes().hex() not in repr(setup)


def test_missing_corrupt_or_open_setup_files_are_clear_errors(tmp_path):
    with pytest.raises(SetupFileError, match="does not exist"):
        load_server_setup_file(tmp_path / "nope.bin")
    path = tmp_path / "setup.bin"
    create_server_setup_file(path)
    data = path.read_bytes()
    path.write_bytes(data[:20])
    with pytest.raises(SetupFileError, match="corrupt"):
        load_server_setup_file(path)
    path.write_bytes(b"not a setup file at all")
    with pytest.raises(SetupFileError, match="not a keymgmt server setup"):
        load_server_setup_file(path)
    path.write_bytes(data)
    os.chmod(path, 0o644)
    with pytest.raises(SetupFileError, match="accessible to other users"):
        load_server_setup_file(path)
    assert not (tmp_path / "nope.bin").exists()  # nothing was silently regenerated


def test_schema_is_versioned_and_foreign_keys_hold(tmp_path):
    storage = SQLiteStorage(tmp_path / "ks.db")
    from keymgmt.adapters.storage.sqlite import _MIGRATIONS

    # accounts etc., throttling, sessions, counts, keys, names, labels and the audit chain,
    # credentials versions, their trigger, the labels' own table, the listing index, and the
    # queue of deleted accounts' logs
    assert storage.schema_version == len(_MIGRATIONS) == 13
    with pytest.raises(StorageError), storage.transaction() as tx:  # no such account
        tx.insert_secret(SecretRecord(bytes(16), bytes(16), SecretKind.GENERATED, bytes(60), b"ad", 0))
    with pytest.raises(StorageError), storage.transaction() as tx:  # nor a log (checked by the INSERT)
        tx.append_audit(AuditRecord(bytes(16), Action.REGISTER, 1, Outcome.SUCCESS))
    storage.close()
    db = sqlite3.connect(tmp_path / "ks.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StorageError, match="newer than this code"):
        SQLiteStorage(tmp_path / "ks.db")


def test_an_operation_and_its_audit_entry_commit_together(tmp_path):
    storage = SQLiteStorage(tmp_path / "ks.db")
    account = Account(b"a", bytes(16), bytes(192), bytes(60), 1)
    with storage.transaction() as tx:
        assert tx.insert_account(account)
        assert not tx.insert_account(account)  # taken: nothing written, transaction still usable
    with pytest.raises(RuntimeError), storage.transaction() as tx:
        tx.insert_secret(SecretRecord(bytes(16), b"k" * 16, SecretKind.GENERATED, bytes(60), b"ad", 2))
        tx.append_audit(AuditRecord(bytes(16), Action.GENERATE, 2, Outcome.SUCCESS, b"k" * 16))
        raise RuntimeError("crash between the two writes")
    with storage.transaction() as tx:
        assert tx.get_secret(bytes(16), b"k" * 16) is None
        assert tx.query_audit(bytes(16), AuditQuery(AuditType.ALL)) == ([], 0)
    storage.close()


class _FailingStorage:
    """A storage whose every transaction fails at commit time."""

    def __init__(self, inner):
        self.inner = inner

    def transaction(self, **options):
        inner_cm = self.inner.transaction(**options)

        class _CM:
            def __enter__(self_cm):
                return inner_cm.__enter__()

            def __exit__(self_cm, *exc):
                inner_cm.__exit__(StorageError, StorageError("disk full"), None)
                raise StorageError("disk full")

        return _CM()

    def close(self):
        self.inner.close()


def test_registration_is_atomic_when_storage_fails(server_setup, tmp_path):
    storage = SQLiteStorage(tmp_path / "ks.db")
    harness = Harness(server_setup)
    keyserver = KeyServer(storage)
    pair = harness.pair()
    failing = _FailingStorage(storage)

    def app(conn, event):
        if isinstance(event, RegistrationCompleted):  # the disk fills up at the final write
            keyserver.storage = failing
        keyserver(conn, event)

    pair.app = app
    pair.client.open_registration(b"alice", PASSWORD)
    events = pair.pump()
    failed = only(events, SessionFailed)
    assert failed.code is ErrorCode.INTERNAL_ERROR
    with storage.transaction() as tx:
        assert tx.get_account(b"alice") is None
    keyserver.storage = storage
    pair.app = keyserver
    pair.client.open_registration(b"alice", PASSWORD)
    assert not [e for e in pair.pump() if isinstance(e, SessionFailed)]
    with storage.transaction() as tx:
        assert tx.get_account(b"alice") is not None


def test_existing_database_files_open_to_others_are_refused(tmp_path):
    from keymgmt.adapters.client.localstore import LocalStore, LocalStoreError

    SQLiteStorage(tmp_path / "ks.db").close()
    LocalStore(tmp_path / "local.db").close()
    os.chmod(tmp_path / "ks.db", 0o640)
    os.chmod(tmp_path / "local.db", 0o604)
    with pytest.raises(StorageError, match="chmod 600"):
        SQLiteStorage(tmp_path / "ks.db")
    with pytest.raises(LocalStoreError, match="chmod 600"):
        LocalStore(tmp_path / "local.db")


def _open_together(open_one, rounds: int = 80, openers: int = 8) -> list[Exception]:
    """Open a new file from several threads at once, ``rounds`` times; return what failed."""
    import threading

    failures: list[Exception] = []
    for round_no in range(rounds):
        barrier = threading.Barrier(openers)

        def opener(round_no: int = round_no, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                open_one(round_no).close()
            except Exception as exc:  # collected and asserted on below
                failures.append(exc)

        threads = [threading.Thread(target=opener) for _ in range(openers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return failures


def test_several_processes_can_open_a_new_key_server_database_together(tmp_path):
    """Switching a new file to WAL answers "database is locked" without waiting when
    another connection holds it; several instances starting at once must all open it."""
    assert _open_together(lambda n: SQLiteStorage(tmp_path / f"ks{n}.db")) == []
    storage = SQLiteStorage(tmp_path / "ks0.db")
    assert storage._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    storage.close()


def test_local_store_opens_together_and_rejects_a_non_database(tmp_path):
    from keymgmt.adapters.client.localstore import LocalStore, LocalStoreError

    assert _open_together(lambda n: LocalStore(tmp_path / f"local{n}.db")) == []
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database file, it is just text" * 100)
    garbage.chmod(0o600)
    with pytest.raises(LocalStoreError, match=r"cannot open local store .*garbage\.db"):
        LocalStore(garbage)


def test_nothing_commits_after_an_error_rolled_back_the_whole_batch(tmp_path):
    """An error that rolls back the whole transaction mid-batch (here a trigger's
    RAISE(ROLLBACK); disk full and I/O errors do the same) must not let the batch's later
    operations commit on their own: the batch fails and none of it is stored."""
    storage = SQLiteStorage(tmp_path / "ks.db")
    storage._db.execute(
        "CREATE TEMP TRIGGER boom BEFORE INSERT ON login_throttle WHEN NEW.account_name = x'626f6f6d' "
        "BEGIN SELECT RAISE(ROLLBACK, 'boom'); END"
    )
    with pytest.raises(StorageError), storage.batch():
        with storage.transaction() as tx:
            tx.start_login(b"before", 1, 5, 10)
        with pytest.raises(StorageError), storage.transaction() as tx:
            tx.start_login(b"boom", 1, 5, 10)
        with pytest.raises(StorageError, match="rolled back"), storage.transaction() as tx:
            tx.start_login(b"after", 1, 5, 10)
    with storage.transaction() as tx:
        assert tx.get_login_record(b"before") is None
        assert tx.get_login_record(b"after") is None
    with storage.transaction() as tx:  # the storage is usable again
        assert tx.start_login(b"after", 2, 5, 10)
        assert tx.get_login_record(b"after") is not None
    storage.close()


def test_enable_wal_reports_a_refusal_and_does_not_retry_other_errors(tmp_path):
    from keymgmt.adapters.files import enable_wal

    class _Refusing:  # a file system where SQLite keeps the rollback journal
        calls = 0

        def execute(self, sql):
            _Refusing.calls += 1
            return _Cursor(("delete",))

    class _Broken:
        calls = 0

        def execute(self, sql):
            _Broken.calls += 1
            raise sqlite3.OperationalError("disk I/O error")

    class _Cursor:
        def __init__(self, row):
            self.row = row

        def fetchone(self):
            return self.row

    with pytest.raises(StorageError, match=r"refused WAL mode \(journal_mode=delete\)"):
        enable_wal(_Refusing(), tmp_path / "x.db", StorageError)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        enable_wal(_Broken(), tmp_path / "x.db", StorageError)
    assert (_Refusing.calls, _Broken.calls) == (1, 1)  # only "locked" is retried


def _sync_log(storage, monkeypatch) -> list[str]:
    """What SQLite executed, with "fdatasync WAL" where the storage synced the WAL file."""
    log: list[str] = []
    storage._db.set_trace_callback(log.append)
    real = os.fdatasync
    wal = storage.path.with_name(storage.path.name + "-wal")

    def fdatasync(fd: int) -> None:
        assert os.fstat(fd).st_ino == os.stat(wal).st_ino, "synced something else than the WAL"
        log.append("fdatasync WAL")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    assert wal.exists()
    return log


def test_sqlite_storage_syncs_every_commit_of_acknowledged_state(tmp_path, monkeypatch):
    """STO-1: in WAL mode synchronous=NORMAL survives a crash of the process but not a power
    cut; a commit that wrote an account, a secret or an operation's audit entry must reach
    the disk before it is acknowledged, so the storage syncs the WAL right after it (what
    synchronous=FULL does), and only then returns."""
    storage = SQLiteStorage(tmp_path / "ks.db")
    assert storage._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    log = _sync_log(storage, monkeypatch)
    user = os.urandom(16)
    with storage.transaction() as tx:
        tx.insert_account(Account(b"sync@example.org", user, b"r", bytes(60)))
    assert log[-2:] == ["COMMIT", "fdatasync WAL"]
    with storage.batch():
        with storage.transaction() as tx:
            tx.insert_secret(SecretRecord(user, os.urandom(16), SecretKind.GENERATED, b"c", b"ad"))
        with storage.transaction() as tx:
            tx.append_audit(AuditRecord(user, Action.LOGIN, 1, Outcome.SUCCESS))
    assert log[-2:] == ["COMMIT", "fdatasync WAL"] and log.count("fdatasync WAL") == 2
    with storage.transaction() as tx:
        tx.append_audit(AuditRecord(user, Action.RETRIEVE, 2, Outcome.SUCCESS, os.urandom(16), Context.NULL))
    assert log[-2:] == ["COMMIT", "fdatasync WAL"]
    assert storage.syncs == 3
    storage.close()


def test_sqlite_storage_commits_login_bookkeeping_without_a_sync(tmp_path, monkeypatch):
    """A login's throttling rows and its audit entry do not wait for the disk (they become
    durable with the next sync); a crash of the process still keeps them (WAL)."""
    storage = SQLiteStorage(tmp_path / "ks.db")
    user = os.urandom(16)
    with storage.transaction() as tx:
        tx.insert_account(Account(b"soft@example.org", user, b"r", bytes(60)))
    log = _sync_log(storage, monkeypatch)
    syncs = storage.syncs
    with storage.batch():
        with storage.transaction() as tx:
            assert tx.start_login(b"soft@example.org", 1, 5, 10**6)
        with storage.transaction() as tx:
            tx.finish_login(b"soft@example.org", 2, succeeded=True)
            tx.append_audit(AuditRecord(user, Action.LOGIN, 2, Outcome.SUCCESS))
        storage.session_store.save(os.urandom(16), b"sealed", 1e12)
    assert "COMMIT" in log and "fdatasync WAL" not in log
    assert storage.syncs == syncs
    storage.close()


def test_a_failed_sync_is_a_failed_commit(tmp_path, monkeypatch):
    storage = SQLiteStorage(tmp_path / "ks.db")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(StorageError, match="cannot sync the WAL"), storage.transaction() as tx:
        tx.insert_account(Account(b"eio@example.org", os.urandom(16), b"r", bytes(60)))
    monkeypatch.undo()
    with storage.transaction() as tx:  # the next commit works (and syncs) again
        tx.insert_account(Account(b"fine@example.org", os.urandom(16), b"r", bytes(60)))
    assert storage.syncs == 1
    storage.close()


class _AuditFails(SQLiteStorage):
    """SQLite storage whose audit appends for the chosen actions fail (a full disk, say)."""

    fail_on: frozenset[Action] = frozenset()

    def transaction(self, **options):
        from contextlib import contextmanager

        inner = SQLiteStorage.transaction(self, **options)
        storage = self

        @contextmanager
        def with_failing_audit():
            with inner as tx:
                append = tx.append_audit

                def failing(record: AuditRecord, credentials: int | None = None) -> None:
                    if record.action in storage.fail_on:
                        raise StorageError("injected: the audit write failed")
                    append(record, credentials)

                append_all = tx.append_audits

                def failing_all(records: list[AuditRecord], credentials: int | None = None) -> None:
                    if any(record.action in storage.fail_on for record in records):
                        raise StorageError("injected: the audit write failed")
                    append_all(records, credentials)

                tx.append_audit = failing
                tx.append_audits = failing_all  # (a store with its next key id's entry)
                yield tx

        return with_failing_audit()


@pytest.mark.anyio
async def test_the_key_server_writes_each_effect_and_its_audit_entry_in_one_transaction(tmp_path):
    """AUD-1, STO-1: registration, store, import and delete write their audit entry in the
    same transaction as their effect. When the audit write fails, the effect is gone too
    (in separate transactions the account or secret would stay, unaudited)."""
    from keymgmt.adapters.client.async_client import KeymgmtClient, KeymgmtError
    from keymgmt.adapters.server.driver import serve_stream
    from keymgmt.adapters.testing.streams import memory_stream_pair
    from keymgmt_proto import SessionRegistry

    from ..support.keyserver_world import SETUP

    storage = _AuditFails(tmp_path / "ks.db")
    keyserver = KeyServer(storage)
    async with anyio.create_task_group() as tg:
        client_end, server_end = memory_stream_pair()
        tg.start_soon(serve_stream, server_end, SETUP, keyserver, SessionRegistry())
        async with KeymgmtClient(client_end) as client:
            storage.fail_on = frozenset({Action.REGISTER})
            with pytest.raises(KeymgmtError):
                await client.register(b"erin@example.org", PASSWORD)
            with storage.transaction() as tx:
                assert tx.get_account(b"erin@example.org") is None
            storage.fail_on = frozenset()
            await client.register(b"erin@example.org", PASSWORD)
            session = await client.login(b"erin@example.org", PASSWORD)
            kept = await session.generate()
            storage.fail_on = frozenset({Action.GENERATE, Action.IMPORT, Action.DELETE_KEY})
            with pytest.raises(KeymgmtError):
                await session.generate()
            with pytest.raises(KeymgmtError):
                await session.import_secret(b"\x01" * 32)
            with pytest.raises(KeymgmtError):
                await session.delete(kept)
            storage.fail_on = frozenset()
            assert [k.key_id for k in await session.list_keys()] == [kept]
        tg.cancel_scope.cancel()
    storage.close()


def _numbers(storage, user: bytes) -> list[int]:
    rows = storage._db.execute("SELECT seq FROM audit WHERE user_id = ? ORDER BY seq", (user,))
    return [row[0] for row in rows]


def test_audit_numbers_stay_dense_across_rollbacks_and_other_writers(tmp_path):
    """The storage remembers each user's last audit number (one statement per append): a
    rolled-back batch or savepoint, and another process appending meanwhile, must not make
    it skip or reuse a number."""
    storage = SQLiteStorage(tmp_path / "ks.db")
    user = os.urandom(16)
    entry = AuditRecord(user, Action.RETRIEVE, 1, Outcome.SUCCESS, os.urandom(16), Context.NULL)
    with storage.transaction() as tx:
        tx.insert_account(Account(b"dense@example.org", user, b"r", bytes(60)))
        tx.append_audit(entry)
    with pytest.raises(RuntimeError), storage.batch():  # a batch rolled back whole
        with storage.transaction() as tx:
            tx.append_audit(entry)
        raise RuntimeError("the batch fails")
    with storage.transaction() as tx:
        tx.append_audit(entry)
    assert _numbers(storage, user) == [1, 2]
    with storage.batch():
        with pytest.raises(RuntimeError), storage.transaction() as tx:  # a savepoint rolled back
            tx.append_audit(entry)
            raise RuntimeError("the operation fails")
        with storage.transaction(atomic=False) as tx:
            tx.append_audit(entry)
    other = SQLiteStorage(tmp_path / "ks.db")  # another process appends twice
    for _ in range(2):
        with other.transaction() as tx:
            tx.append_audit(entry)
    with storage.transaction() as tx:  # its remembered number is stale: refused, read again
        tx.append_audit(entry)
    with storage.transaction() as tx:
        tx.append_audit(entry)
    assert _numbers(storage, user) == [1, 2, 3, 4, 5, 6, 7]
    other.close()
    storage.close()


def test_a_one_write_request_runs_without_a_savepoint(tmp_path):
    """Inside a batch, transaction(atomic=False) is the batch itself: no SAVEPOINT/RELEASE
    pair around a retrieve's one audit write, and a failed statement still leaves nothing."""
    storage = SQLiteStorage(tmp_path / "ks.db")
    user = os.urandom(16)
    with storage.transaction() as tx:
        tx.insert_account(Account(b"lean@example.org", user, b"r", bytes(60)))
    log: list[str] = []
    storage._db.set_trace_callback(log.append)
    with storage.batch():
        with storage.transaction(atomic=False) as tx:
            tx.append_audit(AuditRecord(user, Action.LIST_KEYS, 1, Outcome.SUCCESS))
        with pytest.raises(StorageError), storage.transaction(atomic=False) as tx:
            tx.append_audit(AuditRecord(os.urandom(16), Action.LIST_KEYS, 1, Outcome.SUCCESS))  # no account
        with storage.transaction() as tx:
            tx.append_audit(AuditRecord(user, Action.LIST_KEYS, 2, Outcome.SUCCESS))
    assert not any(s.startswith(("SAVEPOINT", "RELEASE")) for s in log[: log.index("SAVEPOINT op")])
    assert _numbers(storage, user) == [1, 2]
    storage.close()


def test_a_transaction_outside_a_batch_begun_ahead_is_refused_not_a_hang(tmp_path):
    """A batch begun ahead (the group commit's begin_batch, on the event loop) holds the writer
    lock until its batch() takes it over and commits. A transaction() outside that batch, on
    the same thread, waited for the lock for good: two group commits over one storage hung the
    suite that way. It is refused at once, and the batch goes on."""
    import threading

    storage = SQLiteStorage(tmp_path / "ks.db")
    outcome: list[object] = []

    def attempt() -> None:
        assert storage.begin_batch(wait=False)
        try:
            with storage.transaction() as tx:
                tx.count_login_records()
            outcome.append("ran")
        except StorageError as exc:
            outcome.append(exc)

    try:
        worker = threading.Thread(target=attempt, daemon=True)  # (a hang must not keep pytest alive)
        worker.start()
        worker.join(timeout=10)
        assert not worker.is_alive(), "transaction() waited for the lock its own thread holds"
        (refused,) = outcome
        assert isinstance(refused, StorageError) and "begun ahead" in str(refused)
        with storage.batch(), storage.transaction() as tx:  # the begun batch is taken over and commits
            tx.insert_account(Account(b"after", bytes(16), bytes(192), bytes(60), 1))
        with storage.transaction() as tx:
            assert tx.get_account(b"after") is not None
    finally:
        storage.close()
