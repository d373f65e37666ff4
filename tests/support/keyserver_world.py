"""A key server over SQLite and in-memory byte streams, for the high-level API tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
from anyio.abc import TaskGroup

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.client.localstore import LocalStore
from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.server.driver import group_commit_for, serve_stream
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt.adapters.testing.streams import memory_stream_pair
from keymgmt_proto import ServerConfig, ServerSetup, SessionRegistry

SETUP = ServerSetup.generate()
T = TypeVar("T")


@dataclass
class World:
    path: Path
    storage: SQLiteStorage
    keyserver: KeyServer
    registry: SessionRegistry
    task_group: TaskGroup

    async def storage_do(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the storage in the server's group commit: while the server runs,
        its storage is used only there (a batch may be committing in a worker thread)."""
        return await group_commit_for(self.keyserver).run(work)

    @asynccontextmanager
    async def client(self, local_store: LocalStore | None = None) -> AsyncIterator[KeymgmtClient]:
        client_end, server_end = memory_stream_pair()
        self.task_group.start_soon(serve_stream, server_end, SETUP, self.keyserver, self.registry)
        async with KeymgmtClient(client_end, local_store=local_store) as client:
            yield client


@asynccontextmanager
async def key_server(
    tmp_path: Path, config: ServerConfig | None = None, **kwargs: object
) -> AsyncIterator[World]:
    storage = SQLiteStorage(tmp_path / "keyserver.db")
    keyserver = KeyServer(storage, **kwargs)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        yield World(tmp_path, storage, keyserver, SessionRegistry(config or ServerConfig()), tg)
        tg.cancel_scope.cancel()
    storage.close()
