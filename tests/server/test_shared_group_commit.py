"""One group commit per storage: an application wrapping the key server (logging, metrics,
policy) shares the key server's group commit, however it forwards to it.

Two group commits over one storage interleave their batches: a batch begun ahead by one
waits for nothing, and a transaction of the other then waits for the writer lock that
batch holds (a hang, refused since as a StorageError by the storage).
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.server.driver import ConnectionDriver, group_commit_for, serve_stream
from keymgmt.adapters.server.runtime import KeyServerRuntime
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt.adapters.testing.streams import memory_stream_pair
from keymgmt_proto import ExpiredSession, ServerConnection

from ..storage.test_loop_commits import _settings
from ..support.keyserver_world import SETUP, key_server

PW = b"correct horse battery staple"


class _Logged:
    """What an embedder writes: an application over the key server that notes every event
    and forwards each method by hand (so ``batch.__self__`` is the wrapper, and it has no
    ``storage``)."""

    def __init__(self, inner: KeyServer) -> None:
        self.inner = inner
        self.events = 0

    def __call__(self, conn: ServerConnection, event: Any) -> None:
        self.events += 1
        self.inner(conn, event)

    def batch(self) -> AbstractContextManager[None]:
        return self.inner.batch()

    def begin_batch(self, wait: bool) -> bool:
        return self.inner.begin_batch(wait)

    def answer(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.answer(*args, **kwargs)

    def sessions_expired(self, expired: Sequence[ExpiredSession]) -> None:
        self.inner.sessions_expired(expired)


class _Delegating:
    """A wrapper that forwards whatever it does not define (``__getattr__``)."""

    def __init__(self, inner: KeyServer) -> None:
        self.inner = inner

    def __call__(self, conn: ServerConnection, event: Any) -> None:
        self.inner(conn, event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Bound:
    """A wrapper given the key server's bound methods as attributes."""

    def __init__(self, inner: KeyServer) -> None:
        self.inner = inner
        self.batch = inner.batch
        self.begin_batch = inner.begin_batch

    def __call__(self, conn: ServerConnection, event: Any) -> None:
        self.inner(conn, event)


class _Timed(_Logged):
    """A wrapper that wraps each batch in one of its own (a metrics timer) and says which
    storage it runs over."""

    @property
    def storage(self) -> SQLiteStorage:
        storage = self.inner.storage
        assert isinstance(storage, SQLiteStorage)
        return storage

    @contextmanager
    def _timed(self) -> Iterator[None]:
        with self.inner.batch():
            yield

    def batch(self) -> AbstractContextManager[None]:
        return self._timed()


class _Subclass(KeyServer):
    pass


def test_every_app_over_one_storage_gets_one_group_commit(tmp_path: Path) -> None:
    """Wrappers of every kind, and a second key server over the same storage, get the key
    server's group commit; another storage gets another one."""
    storage = SQLiteStorage(tmp_path / "ks.db")
    other = SQLiteStorage(tmp_path / "other.db")
    try:
        keyserver = KeyServer(storage)
        shared = group_commit_for(_Logged(keyserver))  # (a wrapper first: it makes it)
        wrappers = (_Logged(keyserver), _Delegating(keyserver), _Bound(keyserver), _Timed(keyserver))
        for app in (keyserver, *wrappers):
            assert group_commit_for(app) is shared, type(app).__name__
        assert group_commit_for(_Logged(_Subclass(storage))) is shared
        assert group_commit_for(KeyServer(other)) is not shared
    finally:
        storage.close()
        other.close()


def test_apps_without_batches_keep_a_group_commit_each() -> None:
    """An application without ``batch()`` (a test double, a plain function) is its own key,
    as before: one group commit for all of its connections, another for another app; one
    that cannot be weakly referenced gets a new one each time."""

    def app(conn: ServerConnection, event: Any) -> None:
        pass

    def other(conn: ServerConnection, event: Any) -> None:
        pass

    assert group_commit_for(app) is group_commit_for(app)
    assert group_commit_for(other) is not group_commit_for(app)
    unreferenceable = _Slotted()
    assert group_commit_for(unreferenceable) is not group_commit_for(unreferenceable)


class _Slotted:
    """An application that cannot be weakly referenced."""

    __slots__ = ()

    def __call__(self, conn: ServerConnection, event: Any) -> None:
        pass


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_runtime_group_commit_is_the_one_of_its_storage(tmp_path: Path) -> None:
    """A connection served next to a running server (serve_stream, an app wrapping the
    runtime's key server) joins the runtime's group commit, not one of its own."""
    runtime = KeyServerRuntime(_settings(tmp_path))
    try:
        assert group_commit_for(runtime.keyserver) is runtime.committer
        assert group_commit_for(_Logged(runtime.keyserver)) is runtime.committer
        _client_end, server_end = memory_stream_pair()
        driver = ConnectionDriver(server_end, SETUP, _Logged(runtime.keyserver), runtime.registry)
        assert driver.committer is runtime.committer
    finally:
        runtime.storage.close()


@pytest.mark.anyio
async def test_a_wrapper_and_the_key_server_serve_one_storage_at_once(tmp_path: Path) -> None:
    """Connections to a wrapper and to the bare key server over one SQLite storage, many
    requests on each at once: every one is answered, and everything stored is there.
    With a group commit per app this hung (a transaction waiting for the writer lock a
    batch begun ahead held), then failed with StorageError."""
    users, rounds = 3, 12
    async with key_server(tmp_path) as world:
        wrapper = _Logged(world.keyserver)

        def serve(app: Callable[..., None]) -> Callable[[], Any]:
            async def connect() -> Any:
                client_end, server_end = memory_stream_pair()
                world.task_group.start_soon(serve_stream, server_end, SETUP, app, world.registry)
                return client_end

            return connect

        apps = {"bare": world.keyserver, "wrapped": wrapper}
        stored: dict[bytes, list[bytes]] = {}

        async def user(name: bytes, app: Callable[..., None]) -> None:
            async with KeymgmtClient(serve(app)) as client:
                await client.register(name, PW)
                session = await client.login(name, PW)
                ids = stored[name] = []

                async def writer() -> None:
                    for _ in range(rounds):
                        secret = os.urandom(32)
                        key_id = await session.import_secret(bytes([32]) + secret)
                        ids.append(key_id)
                        assert len(await session.list_keys()) >= 1

                async with anyio.create_task_group() as tg:
                    for _ in range(4):
                        tg.start_soon(writer)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for label, app in apps.items():
                    for n in range(users):
                        tg.start_soon(user, f"{label}{n}@example.org".encode(), app)
        assert wrapper.events > 0
        async with world.client() as client:  # (a fresh look, through the bare key server)
            for name, ids in stored.items():
                assert len(ids) == 4 * rounds
                session = await client.login(name, PW)
                assert sorted(k.key_id for k in await session.list_keys()) == sorted(ids)

        def check() -> str:
            return str(world.storage._db.execute("PRAGMA integrity_check").fetchone()[0])

        assert await world.storage_do(check) == "ok"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_runtime_gone_leaves_its_storage_free(tmp_path: Path) -> None:
    """The registry of group commits holds a runtime's weakly: once the runtime is gone its
    key server can go too, and its storage gets one group commit of its own."""
    runtime = KeyServerRuntime(_settings(tmp_path))
    storage, keyserver = runtime.storage, weakref.ref(runtime.keyserver)
    runtime.storage.close()
    del runtime
    gc.collect()
    assert keyserver() is None
    committer = group_commit_for(_Logged(KeyServer(storage)))
    assert group_commit_for(KeyServer(storage)) is committer
