"""GroupCommit: the shared batches every connection's storage work runs in."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import anyio
import pytest

from keymgmt.adapters.server.commit import CommitFailed, GroupCommit
from keymgmt.adapters.storage.base import StorageError

pytestmark = pytest.mark.anyio


class Recorder:
    """A batch factory that records what ran in each batch; its commit can be held."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.current: list[str] | None = None
        self.hold = threading.Event()
        self.hold.set()
        self.holding = threading.Event()
        self.fail_next: BaseException | None = None

    @contextmanager
    def batch(self):
        self.current = []
        yield
        self.holding.set()
        self.hold.wait(10)
        self.holding.clear()
        batch, self.current = self.current, None
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        self.batches.append(batch)

    def work(self, name: str):
        def run() -> str:
            assert self.current is not None, "work ran outside a batch"
            self.current.append(name)
            return name.upper()

        return run


async def _wait_holding(recorder: Recorder) -> None:
    with anyio.fail_after(10):
        while not recorder.holding.is_set():
            await anyio.sleep(0.001)


async def test_work_that_arrives_during_a_commit_shares_the_next_batch():
    recorder = Recorder()
    commit = GroupCommit(recorder.batch)
    results: dict[str, str] = {}

    async def run(name: str) -> None:
        results[name] = await commit.run(recorder.work(name))

    recorder.hold.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a")
        await _wait_holding(recorder)
        for name in "bcd":
            tg.start_soon(run, name)
        await anyio.sleep(0.05)
        assert results == {}  # nothing returns before its commit
        recorder.hold.set()
    assert [sorted(b) for b in recorder.batches] == [["a"], ["b", "c", "d"]]
    assert results == {"a": "A", "b": "B", "c": "C", "d": "D"}
    assert commit.batches == 2 and commit.failed_batches == 0


async def test_a_failed_commit_fails_every_work_of_its_batch_only():
    recorder = Recorder()
    commit = GroupCommit(recorder.batch)
    outcomes: dict[str, object] = {}

    async def run(name: str) -> None:
        try:
            outcomes[name] = await commit.run(recorder.work(name))
        except CommitFailed as exc:
            outcomes[name] = exc

    recorder.hold.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a")
        await _wait_holding(recorder)
        tg.start_soon(run, "b")
        tg.start_soon(run, "c")
        await anyio.sleep(0.01)
        recorder.fail_next = StorageError("disk full")
        recorder.hold.set()
    assert isinstance(outcomes["a"], CommitFailed) and "disk full" in str(outcomes["a"])
    assert outcomes["a"].__cause__ is None  # a storage failure, not a bug
    assert outcomes["b"] == "B" and outcomes["c"] == "C"
    assert commit.failed_batches == 1


async def test_a_commit_that_raises_a_bug_names_its_cause():
    recorder = Recorder()
    recorder.fail_next = RuntimeError("bug in the storage")
    commit = GroupCommit(recorder.batch)
    with pytest.raises(CommitFailed) as raised:
        await commit.run(recorder.work("a"))
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert await commit.run(recorder.work("b")) == "B"  # the next batch is unaffected


async def test_a_batch_that_cannot_begin_runs_no_work():
    ran = []

    @contextmanager
    def refusing():
        raise StorageError("database is locked")
        yield

    commit = GroupCommit(refusing)
    with pytest.raises(CommitFailed, match="locked"):
        await commit.run(lambda: ran.append(1))
    assert ran == []


async def test_a_work_that_raises_fails_alone_and_its_batch_commits():
    recorder = Recorder()
    commit = GroupCommit(recorder.batch)

    def broken() -> None:
        recorder.work("broken")()
        raise ValueError("bug in one connection")

    outcomes: dict[str, object] = {}

    async def run(name: str, work) -> None:
        try:
            outcomes[name] = await commit.run(work)
        except ValueError as exc:
            outcomes[name] = exc

    recorder.hold.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "first", recorder.work("first"))
        await _wait_holding(recorder)
        tg.start_soon(run, "broken", broken)
        tg.start_soon(run, "fine", recorder.work("fine"))
        await anyio.sleep(0.01)
        recorder.hold.set()
    assert isinstance(outcomes["broken"], ValueError)
    assert outcomes["fine"] == "FINE"
    assert [sorted(b) for b in recorder.batches] == [["first"], ["broken", "fine"]]


async def test_a_caller_cancelled_while_waiting_does_not_strand_the_others():
    recorder = Recorder()
    commit = GroupCommit(recorder.batch)
    results: dict[str, str] = {}

    async def run(name: str) -> None:
        results[name] = await commit.run(recorder.work(name))

    recorder.hold.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a")
        await _wait_holding(recorder)
        with anyio.CancelScope() as doomed:
            doomed.cancel()
            await run("cancelled")  # waits behind "a", cancelled before its batch
        tg.start_soon(run, "b")
        await anyio.sleep(0.01)
        recorder.hold.set()
    assert "cancelled" not in results
    assert recorder.batches == [["a"], ["b"]]
    with anyio.fail_after(5):  # and the lead is free for the next caller
        assert await commit.run(recorder.work("c")) == "C"


async def test_commits_run_off_the_event_loop_in_one_thread_that_ends_when_idle(anyio_backend):
    """On asyncio every commit runs in the group commit's own thread (no worker pool, no
    thread per commit), which ends once idle and starts again with the next commit; on
    trio in anyio's worker threads. Never on the event loop's thread."""
    committed_in: list[threading.Thread] = []

    @contextmanager
    def batch():
        yield
        committed_in.append(threading.current_thread())

    commit = GroupCommit(batch)
    commit._thread.idle = 0.05
    for n in range(3):
        assert await commit.run(lambda n=n: n) == n
    assert threading.current_thread() not in committed_in
    if anyio_backend == "asyncio":
        first = committed_in[0]
        assert first.name == "keymgmt-commit" and committed_in == [first] * 3
        with anyio.fail_after(10):
            while first.is_alive():
                await anyio.sleep(0.01)
        assert await commit.run(lambda: "again") == "again"
        assert committed_in[-1] is not first and committed_in[-1].is_alive()
    else:
        assert all(thread.name != "keymgmt-commit" for thread in committed_in)


async def test_a_native_cancel_during_a_commit_waits_for_it_and_ends_the_batch(anyio_backend):
    """asyncio's own cancellation (task.cancel(), which a shielded scope does not hold back)
    of the task that leads a batch while its commit runs: the caller waits for the commit
    to end, every work of the batch gets its result, the work queued behind runs in the next
    batch, and the cancellation reaches the caller afterwards."""
    if anyio_backend != "asyncio":
        assert anyio_backend == "trio"  # trio has no cancellation outside its cancel scopes
        return
    import asyncio

    recorder = Recorder()
    commit = GroupCommit(recorder.batch)
    recorder.hold.clear()
    leader = asyncio.ensure_future(commit.run(recorder.work("a")))
    await _wait_holding(recorder)
    follower = asyncio.ensure_future(commit.run(recorder.work("b")))
    await asyncio.sleep(0.01)
    released = threading.Timer(0.1, recorder.hold.set)  # from a thread: the loop waits for it
    released.start()
    leader.cancel()
    with anyio.fail_after(10):
        with pytest.raises(asyncio.CancelledError):
            await leader
        assert await follower == "B"
    released.join()
    assert recorder.batches == [["a"], ["b"]]
    assert commit.batches == 2 and commit.failed_batches == 0


async def test_a_batch_that_waits_for_another_process_s_write_lock_waits_off_the_loop(tmp_path):
    """With a begin (the key server's): while another process holds the database's write
    lock, the batch waits for it in the commit thread, not on the event loop, which runs on
    meanwhile; the works that arrive during the wait join the batch."""
    import sqlite3

    from keymgmt.adapters.storage.base import Account
    from keymgmt.adapters.storage.sqlite import SQLiteStorage

    storage = SQLiteStorage(tmp_path / "ks.db")
    commit = GroupCommit(storage.batch, begin=lambda wait: storage.begin_batch(wait=wait))
    other = sqlite3.connect(tmp_path / "ks.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another worker's batch
    results: dict[str, bool] = {}

    def insert(name: bytes):
        def work() -> bool:
            with storage.transaction() as tx:
                return tx.insert_account(Account(name, name.ljust(16, b"-"), b"r" * 32, b"e" * 60))

        return work

    async def run(name: bytes) -> None:
        results[name.decode()] = await commit.run(insert(name))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, b"first")
        started = time.monotonic()
        await anyio.sleep(0.05)  # the loop runs on while the batch waits
        assert time.monotonic() - started < 1.0
        tg.start_soon(run, b"second")
        tg.start_soon(run, b"third")
        await anyio.sleep(0.05)
        assert results == {}
        other.execute("ROLLBACK")
    assert results == {"first": True, "second": True, "third": True}
    assert commit.batches == 1 and storage.syncs == 1
    other.close()
    storage.close()


async def test_submitted_works_end_after_their_commit_in_batches_their_own_task_leads(anyio_backend):
    """GroupCommit.submit (asyncio): no task waits for the work; ``finished`` is called once
    its batch has committed (not before), with its result. The works submitted while a
    commit runs share the next batch with the callers of ``run`` waiting meanwhile, and a
    caller of ``run`` finds the lead free afterwards."""
    if anyio_backend != "asyncio":
        return  # (the batched path is asyncio's only)
    recorder = Recorder()
    commit = GroupCommit(recorder.batch)
    ended: list[tuple[str, object, object]] = []

    def finished(work) -> None:
        assert recorder.current is None, "finished before its batch committed"
        ended.append((work.result, work.failure, work.error))

    recorder.hold.clear()
    commit.submit(recorder.work("a"), finished)
    await _wait_holding(recorder)
    assert ended == []  # its commit is held
    commit.submit(recorder.work("b"), finished)
    results: dict[str, str] = {}

    async def run(name: str) -> None:
        results[name] = await commit.run(recorder.work(name))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "c")
        await anyio.sleep(0.01)
        commit.submit(recorder.work("d"), finished)
        recorder.hold.set()
    with anyio.fail_after(10):
        while len(ended) < 3:
            await anyio.sleep(0.001)
    assert ended == [("A", None, None), ("B", None, None), ("D", None, None)]
    assert results == {"c": "C"}
    assert [sorted(b) for b in recorder.batches] == [["a"], ["b", "c", "d"]]
    with anyio.fail_after(5):
        assert await commit.run(recorder.work("e")) == "E"


async def test_a_batch_whose_begin_raises_a_bug_ends_every_work_in_it(anyio_backend):
    """A begin that raises something other than StorageError (a bug) fails the batch for
    every work in it, naming its cause (their drivers treat it as a fault), submitted works
    included: none is left waiting, and no leader retries them forever."""
    calls = {"begin": 0}

    def begin(wait: bool) -> bool:
        calls["begin"] += 1
        if calls["begin"] == 1:
            raise RuntimeError("bug in begin")
        return True

    recorder = Recorder()
    commit = GroupCommit(recorder.batch, begin=begin)
    with pytest.raises(CommitFailed) as raised:
        await commit.run(recorder.work("a"))
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert recorder.batches == []  # the work did not run
    assert await commit.run(recorder.work("b")) == "B"
    if anyio_backend == "asyncio":
        calls["begin"] = 0
        ended: list[object] = []
        commit.submit(recorder.work("c"), lambda work: ended.append(work.failure))
        with anyio.fail_after(10):
            while not ended:
                await anyio.sleep(0.001)
        (failure,) = ended
        assert isinstance(failure, CommitFailed) and isinstance(failure.__cause__, RuntimeError)
        assert calls["begin"] == 1


class _Fatal(BaseException):
    """Not an Exception (as KeyboardInterrupt or SystemExit, which asyncio would raise out
    of the test's own event loop)."""


async def _ended(ended: list, count: int) -> None:
    with anyio.fail_after(10):
        while len(ended) < count:
            await anyio.sleep(0.001)


async def test_a_leader_that_dies_in_a_batch_still_ends_every_work_in_it(anyio_backend):
    """The task leading a batch of submitted works dies of something that is not an
    Exception (here in the commit): every work of the batch still ends, failed (nothing of
    it committed), before the leader's death is raised; the group commit goes on."""
    if anyio_backend != "asyncio":
        return  # (the batched path is asyncio's only)
    recorder = Recorder()
    commit = GroupCommit(recorder.batch)
    ended: list[tuple[object, object]] = []
    recorder.hold.clear()
    recorder.fail_next = _Fatal()
    commit.submit(recorder.work("a"), lambda work: ended.append((work.failure, work.error)))
    leader = commit._leader
    assert leader is not None
    await _wait_holding(recorder)
    commit.submit(recorder.work("b"), lambda work: ended.append((work.failure, work.error)))
    recorder.hold.set()
    await _ended(ended, 1)
    ((failure, error),) = ended[:1]
    assert isinstance(failure, CommitFailed) and error is None
    with pytest.raises(_Fatal), anyio.fail_after(10):
        await leader
    await _ended(ended, 2)  # the next batch is led by another task
    assert ended[1] == (None, None)
    assert await commit.run(recorder.work("c")) == "C"
    assert commit.failed_batches == 1


async def test_a_submitted_work_that_raises_a_base_exception_ends_and_it_is_raised(anyio_backend):
    """A submitted work raises something that is not an Exception (KeyboardInterrupt): it
    has no caller to raise it, so once every work of its batch has its outcome the leader
    raises it, instead of it ending as one work's error and nothing more."""
    if anyio_backend != "asyncio":
        return
    recorder = Recorder()
    commit = GroupCommit(recorder.batch)
    ended: list[tuple[object, object, object]] = []

    def interrupted() -> str:
        raise _Fatal

    def finished(work) -> None:
        ended.append((work.result, work.failure, type(work.error)))

    recorder.hold.clear()
    commit.submit(recorder.work("a"), finished)
    leader = commit._leader  # (it leads the batches of the submitted works that follow)
    assert leader is not None
    await _wait_holding(recorder)
    commit.submit(interrupted, finished)
    commit.submit(recorder.work("b"), finished)
    recorder.hold.set()
    with pytest.raises(_Fatal), anyio.fail_after(10):
        await leader
    assert ended == [("A", None, type(None)), (None, None, _Fatal), ("B", None, type(None))]
    assert await commit.run(recorder.work("c")) == "C"
