"""Group commit: a run of events is one transaction; nothing is answered before it commits.

The storage side (savepoints inside one batch) is in tests/test_storage_backends.py.
"""

from __future__ import annotations

from contextlib import contextmanager

import anyio
import pytest

from keymgmt.adapters.client import KeymgmtClient, KeymgmtError
from keymgmt.adapters.serve import serve_stream
from keymgmt.adapters.storage import StorageError
from keymgmt.adapters.streams import memory_stream_pair
from keymgmt_proto import Action, AuditType, Op

from .keyserver_world import SETUP, key_server

PW = b"correct horse battery staple"


@pytest.mark.anyio
async def test_nothing_is_acknowledged_when_the_group_commit_fails(tmp_path):
    """The commit of the batch holding a STORE fails. The client must not get the store
    acknowledged, not even after it reconnects and resumes (a resumed session must not
    replay an answer that was never committed)."""
    async with key_server(tmp_path) as world:
        storage, keyserver = world.storage, world.keyserver
        real_batch, real_answer = storage.batch, keyserver.answer
        fail = {"store": False}

        def answer(conn, session_id, user_id, body):
            if body[:1] == bytes([Op.STORE_SECRET]):
                fail["store"] = True
            return real_answer(conn, session_id, user_id, body)

        @contextmanager
        def failing_batch():
            with real_batch():
                yield
                if fail["store"]:
                    fail["store"] = False
                    raise StorageError("disk full at commit")

        storage.batch, keyserver.answer = failing_batch, answer

        async def connect():
            client_end, server_end = memory_stream_pair()
            world.task_group.start_soon(serve_stream, server_end, SETUP, keyserver, world.registry)
            return client_end

        async with KeymgmtClient(connect) as client:
            await client.register(b"fragile@example.org", PW)
            session = await client.login(b"fragile@example.org", PW)
            with pytest.raises(KeymgmtError), anyio.fail_after(10):
                await session.generate()
            assert client.connection_count == 2  # it did reconnect and try to resume
            fresh = await client.login(b"fragile@example.org", PW)
            assert await fresh.list_keys() == []
            generated = [e for e in await fresh.audit(AuditType.KEY_ONLY) if e.action is Action.GENERATE]
            assert generated == []
