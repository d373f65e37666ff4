"""Password change and account deletion through the blocking client (issue 16)."""

from __future__ import annotations

import pytest
from anyio.from_thread import start_blocking_portal

from keymgmt.adapters.client.async_client import AuthenticationError, KeymgmtError, SessionEndedError
from keymgmt.adapters.client.localstore import LocalStore
from keymgmt.adapters.client.sync_client import SyncKeymgmtClient
from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.server.driver import serve_stream
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt.adapters.testing.streams import memory_stream_pair
from keymgmt_proto import Action, Context, SessionRegistry

from ..support.keyserver_world import SETUP

NAME, OLD, NEW = b"scripted@example.org", b"old password here", b"new password here"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_sync_client_changes_the_password_and_deletes_the_account(tmp_path, backend):
    storage = SQLiteStorage(tmp_path / "ks.db")
    keyserver, registry = KeyServer(storage), SessionRegistry()
    local = LocalStore(tmp_path / "local.db")
    with start_blocking_portal(backend) as portal:
        client_end, server_end = memory_stream_pair()
        portal.start_task_soon(serve_stream, server_end, SETUP, keyserver, registry)

        async def connect():
            return client_end

        with SyncKeymgmtClient(connect, portal=portal, local_store=local) as client:
            user_id = client.register(NAME, OLD)
            other = client.login(NAME, OLD)
            key_id = other.import_secret(b"\x02hi")
            with pytest.raises(AuthenticationError):
                client.change_password(NAME, b"not it", NEW)
            # review of issue 16, gap 5: the current password again is refused before any request
            same = r"^invalid argument: the new password is the current one$"
            with pytest.raises(KeymgmtError, match=same):
                client.change_password(NAME, OLD, OLD)
            assert [e.action for e in other.audit()].count(Action.LOGIN) == 1  # no login: nothing sent
            client.change_password(NAME, OLD, NEW)
            with pytest.raises(SessionEndedError):
                other.list_keys()
            with pytest.raises(AuthenticationError):
                client.login(NAME, OLD)
            session = client.login(NAME, NEW)
            assert session.retrieve(key_id, Context.LOCAL_ONLY) == b"hi"
            with pytest.raises(KeymgmtError, match=same):  # in a session, too: the login's password
                session.change_password(NEW)
            session.change_password(OLD)  # in a session, too
            assert local.key_ids(user_id) == [key_id]
            client.delete_account(NAME, OLD)
            assert local.key_ids(user_id) == []
            with pytest.raises(AuthenticationError):
                client.login(NAME, OLD)
    local.close()
    storage.close()
