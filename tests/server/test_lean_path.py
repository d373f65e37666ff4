"""The request path writes as little as it must: what `_ONE_WRITE` promises is checked here."""

from __future__ import annotations

import pytest

from keymgmt.adapters.server.app import _ONE_WRITE
from keymgmt_proto import AuditType, Context, Op

from ..support.keyserver_world import key_server

PW = b"correct horse battery staple"
WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


@pytest.mark.anyio
async def test_each_one_write_operation_writes_one_statement_without_a_savepoint(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(b"lean@example.org", PW)
        session = await client.login(b"lean@example.org", PW)
        key_id = await session.import_secret(b"\x02hi")
        client.local_store.delete(session.user_id, key_id)
        statements: list[str] = []
        world.storage._db.set_trace_callback(statements.append)
        calls = {
            Op.RETRIEVE: lambda: session.retrieve(key_id, Context.NULL),
            Op.LIST_KEYS: session.list_keys,
            Op.AUDIT: lambda: session.audit(AuditType.ALL),
        }
        for op, call in calls.items():
            statements.clear()
            await call()
            writes = [s for s in statements if s.lstrip().upper().startswith(WRITES)]
            assert len(writes) == 1 and "INSERT INTO audit" in writes[0], (op, statements)
            assert not any(s.startswith(("SAVEPOINT", "RELEASE")) for s in statements), (op, statements)
        statements.clear()
        await session.generate()  # CREATE_KEY_ID (one write), then STORE_SECRET (a savepoint)
        savepoints = [s for s in statements if s.startswith("SAVEPOINT")]
        assert len(savepoints) == 1, statements
        statements.clear()
        await client.login(b"lean@example.org", PW)  # LOGIN_START: a read and one write, no savepoint
        savepoints = [s for s in statements if s.startswith("SAVEPOINT")]
        assert len(savepoints) == 1, statements  # LOGIN_FINISH's (the throttle record and the audit entry)
        covered = set(calls) | {Op.CREATE_KEY_ID}
        assert covered >= _ONE_WRITE - {Op.RETRIEVE_STORAGE_KEY}  # (fetched once, at login)
