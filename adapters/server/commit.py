"""One group commit for every connection of a key server, committed off the event loop.

Each connection driver hands its storage work (the events its core has ready, a timer,
the end of the connection) to :meth:`GroupCommit.run`. The work of every driver that
asked while the previous batch was committing runs in the next batch: one storage
transaction, whose commit (with its fsync) runs in a worker thread. Meanwhile the event
loop goes on reading every connection's frames and queueing their work for the batch
after. So the size of a batch follows the load (batch by arrival): one request alone
is committed at once, and under load every commit carries whatever arrived during the
one before it.

The storage is touched by one batch at a time, and only from inside :meth:`run`: the
work runs on the event loop, the commit in a thread, never both at once. A driver sends
the output of its work only after ``run`` has returned, that is after the commit
(STO-1: nothing is acknowledged before it is durable).

On asyncio every commit of a group commit runs in one long-lived thread of its own
(:class:`_CommitThread`), handed over through a queue and answered through the loop's
``call_soon_threadsafe``: a fraction of the CPU of ``anyio.to_thread.run_sync`` (its
capacity limiter, worker pool, context copy and cancel scope) on every batch. On trio the
commit runs through ``anyio.to_thread.run_sync``.

With ``loop_commits`` (SQLite, one server process), a batch whose commit can reach no
fsync (it wrote only login bookkeeping, and SQLite can neither checkpoint nor start the
WAL over in it: see :meth:`SQLiteStorage.commit_on_loop`) commits on the event loop: a
login is two such batches, and each trip to the thread and back costs more than the
commit. Every other commit, and every sync or checkpoint, runs in the thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import anyio

from ..storage.base import StorageError

__all__ = ["CommitFailed", "GroupCommit", "LoopCommits", "Work"]

log = logging.getLogger("keymgmt.server")

_T = TypeVar("_T")

#: Opens one batch: entering begins the storage transaction, leaving it commits.
BatchFactory = Callable[[], AbstractContextManager[Any]]


class LoopCommits(Protocol):
    """A storage whose commits may run on the event loop when they can reach no fsync
    (SQLiteStorage)."""

    #: Set by a commit on the loop that turned out to need a sync: settle() runs it.
    sync_owed: bool

    def commit_on_loop(self) -> bool:
        """Whether the open batch may commit on the event loop (asked just before its commit)."""
        ...

    def settle(self) -> None:
        """Run the sync a commit on the loop owes (in a worker thread)."""
        ...


class CommitFailed(StorageError):
    """The batch a work ran in did not commit: everything it wrote was rolled back. Its
    ``__cause__`` is set when the commit raised something other than StorageError (a bug)."""


class Work(Generic[_T]):
    """One storage work in the queue of a :class:`GroupCommit`, and how it went."""

    __slots__ = ("call", "done", "error", "failure", "finished", "result", "turn")

    def __init__(self, call: Callable[[], _T], finished: Callable[[Work[_T]], None] | None = None) -> None:
        self.call = call
        #: Set when the batch has ended, or when this work's caller is to lead the next one;
        #: None for a work handed over by :meth:`GroupCommit.submit` (no task waits for it).
        self.turn: anyio.Event | None = anyio.Event() if finished is None else None
        #: Called on the event loop when the batch has ended (a submitted work).
        self.finished = finished
        self.done = False
        self.result: _T | None = None
        self.error: BaseException | None = None
        self.failure: StorageError | None = None


class GroupCommit:
    """Runs storage work in shared batches, one at a time, each committed in a worker thread.

    ``batch`` opens a batch (the key server's ``batch()``); without one, work runs
    without a transaction of its own (each storage call commits itself). ``loop_commits``:
    the storage those batches commit, if its commits that reach no fsync may run on the
    event loop (see the module docstring)."""

    def __init__(
        self,
        batch: BatchFactory | None = None,
        observe: Callable[[int, float, bool], None] | None = None,
        begin: Callable[[bool], bool] | None = None,
        loop_commits: LoopCommits | None = None,
    ) -> None:
        self._batch = batch
        #: Begins the next batch's transaction ahead of ``batch``, which then takes it over:
        #: ``begin(False)`` on the event loop, False if it would have to wait for another
        #: process's write lock; ``begin(True)`` waits for it (here: in the commit thread).
        self._begin = begin
        self._loop_commits = loop_commits
        #: Told of every batch: its number of works, its commit's seconds, whether it failed.
        self.observe = observe
        self._queue: list[Work[Any]] = []
        self._leading = False
        self._thread = _CommitThread()
        #: The task leading batches of submitted works (see :meth:`submit`), while one does.
        self._leader: asyncio.Task[None] | None = None
        #: The batch entered and not yet committed (rolled back if its leader dies).
        self._open: AbstractContextManager[Any] | None = None
        #: Batches committed and failed so far (for tests and metrics).
        self.batches = 0
        self.failed_batches = 0

    async def run(self, work: Callable[[], _T]) -> _T:
        """Run ``work`` in the next batch; return its result once the batch has committed.

        Raises :class:`CommitFailed` if the batch did not commit (the work's writes were
        rolled back; when the batch could not begin, ``work`` did not run), or what
        ``work`` raised (its earlier writes commit with the batch)."""
        item: Work[_T] = Work(work)
        turn = item.turn
        assert turn is not None
        self._queue.append(item)
        if self._leading:
            try:
                await turn.wait()
            except BaseException:  # cancelled while waiting: never strand the lead
                if item in self._queue:
                    self._queue.remove(item)
                if turn.is_set() and not item.done:
                    self._pass_lead()
                raise
        else:
            self._leading = True
        if not item.done:  # this caller leads the batch holding its work
            try:
                with anyio.CancelScope(shield=True):  # a begun batch always ends
                    await self._run_batch()
            finally:
                self._pass_lead()
        if item.failure is not None:
            raise item.failure
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]

    def submit(self, work: Callable[[], _T], finished: Callable[[Work[_T]], None]) -> None:
        """Run ``work`` in the next batch without a task waiting for it (asyncio only): once
        the batch has ended, ``finished`` is called on the event loop with the work, whose
        ``failure`` (the batch did not commit), ``error`` (what ``work`` raised) or ``result``
        tell how it went. The batches run as for :meth:`run`; when no caller of ``run`` leads
        one, a task of the group commit's own does (one wake-up per batch, not per work)."""
        self._queue.append(Work(work, finished))
        if not self._leading:
            self._leading = True
            self._spawn_leader()

    def _spawn_leader(self) -> None:
        self._leader = asyncio.get_running_loop().create_task(self._lead())

    async def _lead(self) -> None:
        """Lead batches while the work at the head of the queue was submitted (no task of
        its own waits to lead); then hand the lead to the next waiting caller, if any."""
        try:
            while True:
                await self._run_batch()
                if not self._queue or self._queue[0].turn is not None:
                    break
        finally:
            self._leader = None
            self._pass_lead()

    def _pass_lead(self) -> None:
        if not self._queue:
            self._leading = False
            return
        turn = self._queue[0].turn
        if turn is not None:
            turn.set()
        else:
            self._spawn_leader()

    async def _run_batch(self) -> None:
        """Run one batch. Whatever the leader dies of (a cancellation, KeyboardInterrupt, a
        bug that escapes), every work taken into the batch still ends (failed, its batch
        rolled back) before that is raised; a submitted work that raised something that is
        not an Exception (KeyboardInterrupt, SystemExit) ends as the others do and that is
        then raised here, in the leader (its caller would have raised it; it has none)."""
        items: list[Work[Any]] = []
        try:
            await self._run_works(items)
        except BaseException as exc:
            self._end_interrupted(items, exc)
            raise
        for item in items:
            if item.turn is None and item.error is not None and not isinstance(item.error, Exception):
                raise item.error

    def _end_interrupted(self, items: list[Work[Any]], exc: BaseException) -> None:
        """The leader died of ``exc`` inside a batch: roll back what it began and fail every
        work in it that has not ended yet (a submitted work's ``finished`` is still called)."""
        batch, self._open = self._open, None
        if batch is not None:
            try:
                batch.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException:  # (dying already: the storage's own rollback is all there is)
                log.error("could not roll back an interrupted batch", exc_info=True)
        failure = CommitFailed(f"batch interrupted: {type(exc).__name__}")
        if isinstance(exc, Exception):  # a bug: the drivers of its works treat it as a fault
            failure.__cause__ = exc
        self.failed_batches += 1
        log.error("group commit of %d works interrupted: %s", len(items), failure)
        for item in items:
            if not item.done:
                item.failure = failure
                item.done = True
                if item.turn is not None:
                    item.turn.set()
        _call_finished(items, BaseException)

    async def _run_works(self, items: list[Work[Any]]) -> None:
        """The batch itself: takes the queue's works into ``items`` (see _run_batch)."""
        failure: StorageError | None = None
        seconds = 0.0
        begin = self._begin if self._batch is not None else None
        try:
            if begin is not None and not begin(False):
                # Another process is writing: wait for its lock off the loop, which reads on
                # meanwhile; what arrives during the wait joins this batch.
                await self._thread.run(partial(begin, True))
        except StorageError as exc:
            failure = CommitFailed(str(exc))
        except Exception as exc:  # a bug: the batch's works must still all end (a fault each)
            failure = _bug(exc)
        items.extend(self._queue)
        self._queue = []
        batch = self._batch() if self._batch is not None and failure is None else None
        try:
            if batch is not None:
                batch.__enter__()
                self._open = batch  # (until its commit: rolled back if the leader dies first)
        except StorageError as exc:
            failure = CommitFailed(str(exc))
        except Exception as exc:
            failure = _bug(exc)
        if failure is None:
            for item in items:
                try:
                    item.result = item.call()
                except BaseException as exc:  # reaches the work's own caller, not the batch
                    item.error = exc
            if batch is not None:
                self._open = None
                started = time.perf_counter()
                loop = self._loop_commits
                if loop is not None and _on_loop(loop):
                    failure = _commit(batch)
                    if failure is None and loop.sync_owed:
                        failure = await self._thread.run(partial(_pay_owed_sync, loop))
                else:
                    failure = await self._thread.run(partial(_commit, batch))
                seconds = time.perf_counter() - started
        if self.observe is not None:
            try:
                self.observe(len(items), seconds, failure is not None)
            except Exception:  # metrics must never fail a batch
                log.error("group commit observer failed", exc_info=True)
        if failure is None:
            self.batches += 1
        else:
            self.failed_batches += 1
            log.error("group commit of %d works failed: %s", len(items), failure)
        for item in items:
            item.failure = failure
            item.done = True
            if item.turn is not None:
                item.turn.set()
        _call_finished(items, Exception)


def _call_finished(items: list[Work[Any]], catch: type[BaseException]) -> None:
    """Call each submitted work's ``finished`` once (also when its batch was interrupted); what
    one raises (``catch``: anything, when the leader is dying already) is logged, and the
    other works still end."""
    for item in items:
        finished, item.finished = item.finished, None
        if finished is not None:
            try:
                finished(item)
            except catch:
                log.error("a group commit work's completion failed", exc_info=True)


def _commit(batch: AbstractContextManager[Any]) -> StorageError | None:
    """Leave the batch (its commit and fsync), in a worker thread (or on the loop, for a
    commit that reaches no fsync); what failed, or None."""
    return _failure_of(batch.__exit__, None, None, None)


def _on_loop(loop: LoopCommits) -> bool:
    """Whether the batch commits on the loop; False (the thread) if the storage cannot tell."""
    try:
        return loop.commit_on_loop()
    except Exception:
        log.error("cannot tell where the batch may commit; committing in a worker thread", exc_info=True)
        return False


def _pay_owed_sync(loop: LoopCommits) -> StorageError | None:
    """The sync a commit on the loop owes, in a worker thread; what failed, or None."""
    return _failure_of(loop.settle)


def _failure_of(call: Callable[..., object], *args: object) -> StorageError | None:
    try:
        call(*args)
    except StorageError as exc:
        return CommitFailed(str(exc))
    except Exception as exc:  # a bug in a storage: the batch's works must still all end
        return _bug(exc, "commit")
    return None


def _bug(exc: Exception, what: str = "batch") -> CommitFailed:
    """The failure of a batch that a bug (not a StorageError) ended: it names its cause, so
    the drivers of its works treat it as a fault (NET-12)."""
    failure = CommitFailed(f"{what} failed: {type(exc).__name__}")
    failure.__cause__ = exc
    return failure


class _Handover:
    """One call handed to a :class:`_CommitThread`; settled on the event loop."""

    __slots__ = ("call", "error", "finished", "future", "loop", "result")

    def __init__(self, call: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> None:
        self.call = call
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        #: Set by the thread once the call has ended, with what it returned or raised.
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _CommitThread:
    """The thread a group commit's storage calls (its commits, and the begins that must
    wait for another process's write lock) run in on asyncio, one at a time: started with
    the first call and ended after ``idle`` seconds without one (started again by the next),
    so an idle or dropped group commit leaves no thread behind for long."""

    def __init__(self, idle: float = 10.0) -> None:
        self.idle = idle
        self._handovers: queue.SimpleQueue[_Handover] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False

    async def run(self, call: Callable[[], _T]) -> _T:
        """``call()`` in the thread; what it returned, or raise what it raised. Returns only
        once the call has ended: a cancellation that arrives meanwhile (asyncio's own, which
        a shielded scope does not hold back) waits for it, and is delivered again at the
        caller's next checkpoint, so its batch still ends for every work in it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): anyio's worker threads
            return await anyio.to_thread.run_sync(call)
        handover = _Handover(call, loop)
        with self._lock:
            self._handovers.put(handover)
            if not self._running:
                self._running = True
                threading.Thread(target=self._serve, name="keymgmt-commit", daemon=True).start()
        try:
            await handover.future
        except asyncio.CancelledError:
            # The storage is the call's until it ends (bounded by the storage's own
            # timeouts): wait for that here, on the loop, on this rare path.
            while not handover.finished:
                time.sleep(0.001)
            task = asyncio.current_task()
            if task is not None:
                task.cancel()
        if handover.error is not None:
            raise handover.error
        result: _T = handover.result
        return result

    def _serve(self) -> None:
        while True:
            try:
                handover = self._handovers.get(timeout=self.idle)
            except queue.Empty:
                with self._lock:
                    if self._handovers.empty():
                        self._running = False
                        return
                continue
            try:
                handover.result = handover.call()
            except BaseException as exc:  # raised to the caller, on the loop
                handover.error = exc
            handover.finished = True
            with suppress(RuntimeError):  # (the loop has closed: nobody waits for this call)
                handover.loop.call_soon_threadsafe(_settle, handover.future)
