"""The key server purges deleted accounts' audit logs (queued by each deletion: see
tests/storage/test_audit_purge.py) by itself, a chunk per batch of its group commit, so
other users' requests commit between the chunks: at startup (a log queued before a crash or
a restart) and right after a deletion, not only every ``throttle.sweep_interval``."""

from __future__ import annotations

import sqlite3
import time

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.client.connect import tls_connector
from keymgmt.adapters.server.runtime import KeyServerRuntime
from keymgmt.adapters.storage.base import Account, AuditRecord
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import Action, Outcome

from ..support.helpers import PASSWORD
from ..support.net_world import make_settings, running_server

pytestmark = pytest.mark.anyio

ALICE = Account(b"alice", b"A" * 16, b"r" * 192, b"k" * 60, 1)
BOB = Account(b"bob", b"B" * 16, b"s" * 192, b"l" * 60, 2)
BIG = 100_000
_ALICES = "SELECT count(*) FROM audit WHERE user_id = ?"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _count(path, statement: str, params: tuple = ()) -> int:
    """One count read from the database file by a connection of our own."""
    db = sqlite3.connect(path)
    try:
        return int(db.execute(statement, params).fetchone()[0])
    finally:
        db.close()


def _queue_a_big_log(path) -> None:
    """Alice, with a log of BIG + 1 entries, deleted (her log queued); Bob, with one entry."""
    storage = SQLiteStorage(path)
    try:
        with storage.transaction() as tx:
            assert tx.insert_account(ALICE) and tx.insert_account(BOB)
            tx.append_audit(AuditRecord(ALICE.user_id, Action.REGISTER, 1, Outcome.SUCCESS))
            tx.append_audit(AuditRecord(BOB.user_id, Action.REGISTER, 1, Outcome.SUCCESS))
            tx._db.execute(  # type: ignore[attr-defined]
                "WITH RECURSIVE n(i) AS (SELECT 2 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, event_count, chain_hash) "
                "SELECT ?, i, 8, i, 0, 1, zeroblob(32) FROM n",
                (BIG + 1, ALICE.user_id),
            )
        with storage.transaction() as tx:
            assert tx.delete_account(ALICE.user_id, reserved_until=1_000)
    finally:
        storage.close()  # (the server stopped before it purged anything)


async def test_a_log_queued_before_the_start_goes_in_chunks_between_other_requests(tmp_path):
    settings, _ = make_settings(tmp_path, maintenance_interval=3600.0)
    path = settings.storage_path
    _queue_a_big_log(path)
    assert _count(path, _ALICES, (ALICE.user_id,)) == BIG + 1
    runtime = KeyServerRuntime(settings)
    storage = runtime.storage
    assert isinstance(storage, SQLiteStorage)
    statements: list[str] = []
    storage._db.set_trace_callback(statements.append)
    left: list[int] = []  # Alice's entries left, as each of Bob's requests saw them

    def bobs_request() -> None:
        with storage.transaction() as tx:
            tx.append_audit(AuditRecord(BOB.user_id, Action.RETRIEVE, 5, Outcome.SUCCESS))
            left.append(int(tx._db.execute(_ALICES, (ALICE.user_id,)).fetchone()[0]))  # type: ignore[attr-defined]

    async with anyio.create_task_group() as tg:
        await tg.start(runtime.run)
        try:
            deadline = time.monotonic() + 20
            while not left or left[-1]:
                assert time.monotonic() < deadline, "the log was not purged"
                await runtime.committer.run(bobs_request)
        finally:
            storage._db.set_trace_callback(None)
            runtime.shutdown()
    # Bob's requests committed while the log was part gone: between the chunks.
    assert sum(0 < n < BIG + 1 for n in left) >= 5, left
    # Never two chunks in one commit.
    chunks = [between.count("DELETE FROM audit WHERE") for between in " ".join(statements).split("COMMIT")]
    assert max(chunks) == 1 and sum(chunks) >= (BIG + 1) // 2_000
    assert _count(path, _ALICES, (ALICE.user_id,)) == 0
    assert _count(path, "SELECT count(*) FROM audit_purges") == 0
    assert _count(path, _ALICES, (BOB.user_id,)) == 1 + len(left)


async def test_a_deletion_starts_the_purge_at_once(tmp_path):
    """No sweep comes for an hour: the deletion itself starts the purge."""
    async with running_server(tmp_path, maintenance_interval=3600.0) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            user_id = await client.register(b"gone@example.org", PASSWORD)
            session = await client.login(b"gone@example.org", PASSWORD)
            await session.generate()
            await anyio.sleep(0.2)  # (the purge at the start has run: nothing was queued)
            await client.delete_account(b"gone@example.org", PASSWORD)
        path = tmp_path / "keyserver.db"
        deadline = time.monotonic() + 10
        while _count(path, _ALICES, (user_id,)) or _count(path, "SELECT count(*) FROM audit_purges"):
            assert time.monotonic() < deadline, "the log was not purged after the deletion"
            await anyio.sleep(0.05)
        assert _count(path, "SELECT count(*) FROM accounts") == 0
