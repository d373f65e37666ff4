"""OPS-12 end to end over real loopback TLS 1.3: secrets up to 64 KiB, and what is refused."""

from __future__ import annotations

import os

import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient, KeymgmtError, SessionEndedError
from keymgmt.adapters.client.connect import tls_connector
from keymgmt_proto import Action, AuditType, Context, ErrorCode, ServerConfig, encode_portable

from ..support.net_world import running_server

pytestmark = pytest.mark.anyio

PW = b"correct horse battery staple"


async def test_secrets_of_every_boundary_size_round_trip_through_the_server(tmp_path):
    async with running_server(tmp_path) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            user_id = await client.register(b"big@example.org", PW)
            session = await client.login(b"big@example.org", PW)
            for size in (1, 255, 256, 65535, 65536):
                secret = os.urandom(size)
                key_id = await session.import_secret(encode_portable(secret))
                client.local_store.delete(user_id, key_id)  # make the server answer
                assert await session.retrieve(key_id, Context.LOCAL_ONLY) == secret
                client.local_store.delete(user_id, key_id)
                assert await session.export(key_id) == encode_portable(secret)
            with pytest.raises(KeymgmtError, match="at most 65536"):
                await session.import_secret(b"\x00\x01" + (65537).to_bytes(4, "big") + bytes(65537))
            assert len(await session.list_keys()) == 5
            await session.logout()


async def test_a_server_with_a_smaller_frame_limit_refuses_a_big_store_before_any_storage_work(tmp_path):
    """The frame limit is checked from the header, before the payload is buffered: the
    connection ends with FRAME_TOO_LARGE, nothing is stored and nothing is audited. The
    client does not send the request again on a resumed session (it would be refused
    again, forever): that session ends; an idle session of the same connection resumes."""
    async with running_server(tmp_path, protocol=ServerConfig(max_payload=4096)) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"small@example.org", PW)
            session = await client.login(b"small@example.org", PW)
            idle = await client.login(b"small@example.org", PW)
            small = await session.import_secret(encode_portable(os.urandom(3000)))
            with pytest.raises(SessionEndedError, match="FRAME_TOO_LARGE") as refused:
                await session.import_secret(encode_portable(os.urandom(65536)))
            assert refused.value.code is ErrorCode.FRAME_TOO_LARGE
            assert [k.key_id for k in await idle.list_keys()] == [small]
            assert client.connection_count == 2
        async with KeymgmtClient(connect) as client:
            session = await client.login(b"small@example.org", PW)
            assert [k.key_id for k in await session.list_keys()] == [small]
            entries = await session.audit(AuditType.KEY_ONLY)
            assert [e.action for e in entries if e.action is Action.IMPORT] == [Action.IMPORT]
