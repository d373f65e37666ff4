"""P4 on the real server: a connection that ended leaves nothing behind (its driver, its
ServerConnection, and through them its sessions, their handles, and what the key server keys
by a handle, such as key-id reservations)."""

from __future__ import annotations

import gc
import weakref

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.client.connect import tls_connector

from ..support.net_world import running_server

pytestmark = pytest.mark.anyio

PW = b"correct horse battery staple"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_connection_that_ended_leaves_no_driver_and_no_session_behind(tmp_path):
    async with running_server(tmp_path) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        gone: list[weakref.ref[object]] = []
        for n in range(3):
            async with KeymgmtClient(connect) as client:
                if n == 0:
                    await client.register(b"memory@example.org", PW)
                session = await client.login(b"memory@example.org", PW)
                await session.generate()  # (the session then holds a key-id reservation)
                (driver,) = runtime._drivers
                gone += [weakref.ref(driver), weakref.ref(driver.conn)]
                del driver
        with anyio.fail_after(10):
            while runtime._drivers:
                await anyio.sleep(0.02)
        await anyio.sleep(0.1)
        gc.collect()
        assert [ref() for ref in gone if ref() is not None] == []
        assert len(runtime.keyserver._reserved) == 0
