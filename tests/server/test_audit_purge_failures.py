"""Review of the audit purge's runtime task (NET-12): a purge that fails, by a storage error
or a bug, is logged and tried again later; the server goes on serving meanwhile."""

from __future__ import annotations

import logging
import time

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.client.connect import tls_connector
from keymgmt.adapters.storage.base import StorageError

from ..support.helpers import PASSWORD
from ..support.net_world import running_server
from .test_audit_purge_runtime import _ALICES, ALICE, _count, _queue_a_big_log

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_failing_purge_is_logged_and_retried_while_the_server_serves(tmp_path, caplog):
    path = tmp_path / "keyserver.db"
    _queue_a_big_log(path)
    async with running_server(tmp_path, maintenance_interval=0.2) as (runtime, pki):
        purge = runtime.keyserver.purge_audit_logs
        failures = [StorageError("disk I/O error"), RuntimeError("a bug")]

        def failing(chunk: int = 2_000) -> int | None:
            if failures:
                raise failures.pop(0)
            return purge(chunk)

        runtime.keyserver.purge_audit_logs = failing  # type: ignore[method-assign]
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:  # served while the purge fails
            await client.register(b"carol@example.org", PASSWORD)
            session = await client.login(b"carol@example.org", PASSWORD)
            await session.generate()
        deadline = time.monotonic() + 20
        while _count(path, _ALICES, (ALICE.user_id,)):
            assert time.monotonic() < deadline, "the purge was not tried again"
            await anyio.sleep(0.05)
    assert not failures
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == ["purging the audit logs of deleted accounts failed"] * 2
