"""SQLite commits on the event loop (SQLiteStorage.commit_on_loop with GroupCommit): only
commits that reach no fsync run there; every sync and every checkpoint runs in the thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from keymgmt.adapters.server import commit as commit_module
from keymgmt.adapters.server.commit import CommitFailed, GroupCommit
from keymgmt.adapters.server.runtime import KeyServerRuntime, ServerSettings
from keymgmt.adapters.server.setupfile import create_server_setup_file
from keymgmt.adapters.storage import sqlite as sqlite_module
from keymgmt.adapters.storage.base import Account, AuditRecord, StorageError
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt.adapters.tls import generate_dev_pki
from keymgmt_proto import Action, Context, Outcome

pytestmark = pytest.mark.anyio

NAME = b"loop@example.org"


class Files:
    """What only a checkpoint changes (the database file: in WAL mode only checkpoints write
    it) and what only a WAL start-over changes (the WAL header's checkpoint number and salts,
    written with the fsync SQLite runs then)."""

    def __init__(self, path: Path) -> None:
        self.db = path
        self.wal = path.with_name(path.name + "-wal")

    def state(self) -> tuple[tuple[int, int], bytes]:
        info = self.db.stat()
        with self.wal.open("rb") as f:
            header = f.read(32)
        return (info.st_mtime_ns, info.st_size), header[12:24]


@pytest.fixture
def often(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint at every page and send every fourth commit to the thread: checkpoints and
    WAL start-overs happen every few commits instead of every few hundred."""
    monkeypatch.setattr(sqlite_module, "WAL_AUTOCHECKPOINT_PAGES", 1)
    monkeypatch.setattr(sqlite_module, "LOOP_COMMITS_PER_CHECKPOINT", 3)


def _storage(tmp_path: Path) -> tuple[SQLiteStorage, bytes]:
    storage = SQLiteStorage(tmp_path / "ks.db")
    user = os.urandom(16)
    with storage.transaction() as tx:
        tx.insert_account(Account(NAME, user, b"r", bytes(60)))
    return storage, user


def _login(storage: SQLiteStorage, user: bytes, when: int) -> None:
    """A login's storage work: throttling rows and its audit entry (no sync needed)."""
    with storage.transaction() as tx:
        tx.start_login(NAME, when, 5, 10**6)
    with storage.transaction() as tx:
        tx.finish_login(NAME, when, succeeded=True)
        tx.append_audit(AuditRecord(user, Action.LOGIN, when, Outcome.SUCCESS))


def _retrieve(storage: SQLiteStorage, user: bytes, when: int) -> None:
    """An operation's audit entry: acknowledged state, synced before the answer."""
    with storage.transaction() as tx:
        entry = AuditRecord(user, Action.RETRIEVE, when, Outcome.SUCCESS, os.urandom(16), Context.NULL)
        tx.append_audit(entry)


class Spy:
    """Records, per thread, the commits of the group commit, the fsyncs, and whether a commit
    on the event loop checkpointed or started the WAL over."""

    def __init__(self, storage: SQLiteStorage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loop = threading.get_ident()
        self.files = Files(storage.path)
        self.storage = storage
        self.loop_commits = 0
        self.thread_commits = 0
        self.thread_checkpoints = 0
        self.thread_restarts = 0
        self.syncs_on_loop: list[str] = []
        self.syncs_in_thread = 0
        real_commit = commit_module._commit
        real_fdatasync, real_fsync = os.fdatasync, os.fsync

        def commit(batch):  # type: ignore[no-untyped-def]
            before = self.files.state()
            on_loop = threading.get_ident() == self.loop
            if on_loop:
                autocheckpoint = storage._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
                assert autocheckpoint == 0, "a commit on the loop with automatic checkpoints on"
            failure = real_commit(batch)
            after = self.files.state()
            if on_loop:
                self.loop_commits += 1
                assert after[0] == before[0], "a commit on the event loop checkpointed"
                assert after[1] == before[1], "a commit on the event loop started the WAL over"
            else:
                self.thread_commits += 1
                self.thread_checkpoints += after[0] != before[0]
                self.thread_restarts += after[1] != before[1]
            return failure

        def spied(real, name):  # type: ignore[no-untyped-def]
            def sync(fd: int) -> None:
                if threading.get_ident() == self.loop:
                    self.syncs_on_loop.append(name)
                else:
                    self.syncs_in_thread += 1
                real(fd)

            return sync

        monkeypatch.setattr(commit_module, "_commit", commit)
        monkeypatch.setattr(os, "fdatasync", spied(real_fdatasync, "fdatasync"))
        monkeypatch.setattr(os, "fsync", spied(real_fsync, "fsync"))


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_only_commits_that_reach_no_fsync_run_on_the_event_loop(tmp_path, monkeypatch, often):
    """A checkpoint syncs the database file and a WAL started over syncs its header: with
    checkpoints at every page here, a commit on the loop with automatic checkpoints on, or
    the first write after a checkpoint made on the loop (also when a batch that wrote
    nothing came between), changes the files the spy watches."""
    storage, user = _storage(tmp_path)
    spy = Spy(storage, monkeypatch)
    committer = GroupCommit(storage.batch, loop_commits=storage)
    for n in range(40):
        await committer.run(lambda n=n: _login(storage, user, 10 + n))
        if n % 9 == 8:
            await committer.run(lambda n=n: _retrieve(storage, user, 10 + n))
        if n % 4 == 3:  # a batch that writes nothing does not start the WAL over
            await committer.run(lambda: None)
    assert spy.syncs_on_loop == []
    assert spy.syncs_in_thread >= 4  # the retrieves' syncs, and the checkpoints'
    assert spy.loop_commits >= 20 and storage.loop_commits == spy.loop_commits
    # Checkpoints still happen (also while only logins are written), and the WAL starts over.
    assert spy.thread_checkpoints >= 5 and spy.thread_restarts >= 5
    assert committer.batches == spy.loop_commits + spy.thread_commits
    storage.close()


async def test_without_loop_commits_every_commit_runs_in_the_thread(tmp_path, monkeypatch, often):
    storage, user = _storage(tmp_path)
    spy = Spy(storage, monkeypatch)
    committer = GroupCommit(storage.batch)
    for n in range(5):
        await committer.run(lambda n=n: _login(storage, user, 10 + n))
    assert (spy.loop_commits, spy.thread_commits, storage.loop_commits) == (0, 5, 0)
    storage.close()


async def test_a_sync_asked_for_after_the_commit_was_placed_on_the_loop_runs_in_the_thread(
    tmp_path, monkeypatch
):
    """The key server's batch writes queued failed logins as it ends, after the group commit
    asked where to commit: were such a write ever to need a sync, the commit on the loop
    leaves it owed, and the thread runs it before the batch's works get their results."""
    storage, user = _storage(tmp_path)
    for n in range(2):  # past the first commits, which go to the thread (a fresh WAL)
        await GroupCommit(storage.batch, loop_commits=storage).run(lambda n=n: _login(storage, user, n))
    spy = Spy(storage, monkeypatch)

    @contextmanager
    def batch() -> Iterator[None]:
        with storage.batch():
            yield
            _retrieve(storage, user, 99)  # written after commit_on_loop() said yes

    committer = GroupCommit(batch, loop_commits=storage)
    syncs = storage.syncs
    await committer.run(lambda: _login(storage, user, 98))
    assert spy.loop_commits == 1 and spy.syncs_on_loop == []
    assert storage.syncs == syncs + 1 and spy.syncs_in_thread == 1 and not storage.sync_owed
    storage.close()


async def test_a_failed_sync_owed_by_a_commit_on_the_loop_fails_the_batch(tmp_path, monkeypatch):
    storage, user = _storage(tmp_path)
    for n in range(2):
        await GroupCommit(storage.batch, loop_commits=storage).run(lambda n=n: _login(storage, user, n))

    @contextmanager
    def batch() -> Iterator[None]:
        with storage.batch():
            yield
            _retrieve(storage, user, 99)

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(CommitFailed, match="cannot sync the WAL"):
        await GroupCommit(batch, loop_commits=storage).run(lambda: _login(storage, user, 98))
    storage.close()


class _Undecided:
    """A storage that cannot tell where its batch may commit."""

    sync_owed = False

    def commit_on_loop(self) -> bool:
        raise StorageError("cannot set wal_autocheckpoint")

    def settle(self) -> None:
        raise AssertionError("nothing is owed")


async def test_a_storage_that_cannot_tell_commits_in_the_thread():
    threads: list[int] = []

    @contextmanager
    def batch() -> Iterator[None]:
        yield
        threads.append(threading.get_ident())

    assert await GroupCommit(batch, loop_commits=_Undecided()).run(lambda: "done") == "done"
    assert threads and threads[0] != threading.get_ident()


async def test_a_commit_on_the_loop_that_fails_fails_its_batch(tmp_path, monkeypatch):
    storage, user = _storage(tmp_path)
    for n in range(2):
        await GroupCommit(storage.batch, loop_commits=storage).run(lambda n=n: _login(storage, user, n))
    spy = Spy(storage, monkeypatch)

    def failing_commit() -> None:
        raise StorageError("commit failed: OperationalError")

    monkeypatch.setattr(storage, "_commit", failing_commit)
    with pytest.raises(CommitFailed, match="OperationalError"):
        await GroupCommit(storage.batch, loop_commits=storage).run(lambda: _login(storage, user, 5))
    assert spy.loop_commits == 1


def _settings(tmp_path: Path, **changes: object) -> ServerSettings:
    pki = generate_dev_pki(tmp_path / "pki")
    create_server_setup_file(tmp_path / "setup.bin")
    settings = ServerSettings(
        storage_path=tmp_path / "ks.db",
        setup_path=tmp_path / "setup.bin",
        cert_path=pki.server_cert,
        key_path=pki.server_key,
        port=0,
    )
    return replace(settings, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_runtime_commits_on_the_loop_only_as_the_one_process_writing_sqlite(tmp_path):
    """Another process's checkpoint could make a commit here start the WAL over (a sync):
    with workers, every commit stays in the thread. PostgreSQL commits are network round
    trips: always in the thread (the runtime's storage is then no SQLiteStorage)."""
    alone = KeyServerRuntime(_settings(tmp_path / "alone"))
    assert alone.committer._loop_commits is alone.storage
    workers = KeyServerRuntime(_settings(tmp_path / "workers", workers=2))
    assert workers.committer._loop_commits is None
    other = KeyServerRuntime(_settings(tmp_path / "other"), storage=_NotSQLite(tmp_path / "o.db"))
    assert other.committer._loop_commits is None
    for runtime in (alone, workers):
        runtime.storage.close()


class _NotSQLite:
    """Any storage that is not SQLiteStorage (PostgreSQL, a test double): it is simply used."""

    def __init__(self, path: Path) -> None:
        self._inner = SQLiteStorage(path)
        self.session_store = self._inner.session_store

    def __getattr__(self, name: str) -> object:
        if name == "commit_on_loop":
            raise AttributeError(name)
        return getattr(self._inner, name)


async def test_a_run_of_commits_that_sync_sets_no_pragma_each_time(tmp_path):
    """Acknowledged state commits in the thread with checkpoints on, whatever came before:
    a run of such batches (retrieves under load) costs no PRAGMA per batch."""
    storage, user = _storage(tmp_path)
    committer = GroupCommit(storage.batch, loop_commits=storage)
    for n in range(3):
        await committer.run(lambda n=n: _login(storage, user, n))
    statements: list[str] = []
    storage._db.set_trace_callback(statements.append)
    for n in range(10):
        await committer.run(lambda n=n: _retrieve(storage, user, 10 + n))
    assert sum("wal_autocheckpoint" in s for s in statements) <= 1
    assert storage._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    storage.close()
