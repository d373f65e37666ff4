"""The synchronous facade, driven from plain (non-async) code."""

from __future__ import annotations

import pytest
from anyio.from_thread import start_blocking_portal

from keymgmt.adapters.client.async_client import AuthenticationError, NotFoundError
from keymgmt.adapters.client.sync_client import SyncKeymgmtClient
from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.server.driver import serve_stream
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt.adapters.testing.streams import memory_stream_pair
from keymgmt_proto import Action, AuditType, Context, ServerSetup, SessionRegistry


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sync_client_round_trip(tmp_path, backend):
    storage = SQLiteStorage(tmp_path / "ks.db")
    keyserver, setup, registry = KeyServer(storage), ServerSetup.generate(), SessionRegistry()
    with start_blocking_portal(backend) as portal:
        client_end, server_end = memory_stream_pair()
        portal.start_task_soon(serve_stream, server_end, setup, keyserver, registry)

        async def connect():
            return client_end

        with SyncKeymgmtClient(connect, portal=portal) as client:
            user_id = client.register(b"scripted@example.org", b"pw")
            with pytest.raises(AuthenticationError):
                client.login(b"scripted@example.org", b"not it")
            session = client.login(b"scripted@example.org", b"pw")
            assert session.user_id == user_id
            key_id = session.import_secret(b"\x02hi")
            assert session.retrieve(key_id, Context.LOCAL_ONLY) == b"hi"
            assert session.export(key_id) == b"\x02hi"
            assert [k.key_id for k in session.list_keys()] == [key_id]
            session.delete(key_id)
            with pytest.raises(NotFoundError):
                session.delete(key_id)
            assert Action.DELETE_KEY in {e.action for e in session.audit(AuditType.KEY_ONLY)}
            session.logout()
    storage.close()


def test_sync_client_outside_with_block_is_a_clear_error():
    async def connect():
        raise AssertionError("not called")

    client = SyncKeymgmtClient(connect)
    with pytest.raises(RuntimeError, match="with"):
        client.register(b"a", b"b")
