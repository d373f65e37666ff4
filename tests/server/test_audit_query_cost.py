"""The cost of one AUDIT request must not grow with the requester's whole log when its filter
matches little. Before the fix the query walked every entry of the user after the cursor to
find ``limit`` matching ones. A user's log grows by one entry per request (about 20,000 a
second from one address: 20 logins a second of 1,000 requests each), and the storage work
runs on the server's event loop: measured on SQLite with a log of 1,000,000 entries, an AUDIT
whose key-id filter matched nothing took 0.36 s (1,024 key ids: 0.98 s), during which no other
connection was served; an unfiltered page took 7 ms. Pipelined (16 in flight, 256 sessions a
connection), one user held the server for as long as it liked.

Now one request reads at most MAX_AUDIT_SCAN entries and answers a short (here: empty) page
whose ``next_cursor`` is the last entry read (protocol.md 12.9).

Counted in SQLite virtual-machine steps (deterministic; no wall clock), relative to an
unfiltered page of the same size (which reads only its own entries)."""

from __future__ import annotations

import os
import sqlite3

import pytest

from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.storage.base import Account
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    MAX_AUDIT_SCAN,
    AuditRequest,
    AuditResponse,
    AuditType,
    Op,
    SessionHandle,
    Status,
    decode_response,
)

USER = bytes(range(16))
ENTRIES = 100_000


def _storage_with_a_big_log(path, entries: int = ENTRIES) -> SQLiteStorage:
    storage = SQLiteStorage(path)
    with storage.transaction() as tx:
        tx.insert_account(Account(b"chatty@example.org", USER, bytes(192), bytes(60)))
    storage.close()
    db = sqlite3.connect(path)
    key_id = os.urandom(16)
    db.executemany(
        "INSERT INTO audit (user_id, seq, action, timestamp_us, outcome, key_id, context, event_count, "
        "chain_hash) VALUES (?, ?, 8, ?, 0, ?, 1, 1, ?)",
        ((USER, seq, 1_700_000_000_000_000 + seq, key_id, bytes(32)) for seq in range(1, entries + 1)),
    )
    db.commit()
    db.close()
    return SQLiteStorage(path)


def _steps(storage: SQLiteStorage, keyserver: KeyServer, request: AuditRequest) -> tuple[int, AuditResponse]:
    """Thousands of SQLite VM steps the request's answer took, and the answer."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    connection = storage._db
    connection.set_progress_handler(count, 1000)
    try:
        answer = keyserver.answer(SessionHandle(), USER, request.encode())
    finally:
        connection.set_progress_handler(None, 0)
    status, response = decode_response(Op.AUDIT, answer)
    assert status is Status.OK and isinstance(response, AuditResponse)
    return steps, response


@pytest.mark.parametrize(
    "request_",
    [
        AuditRequest(USER, AuditType.ALL, key_ids=(os.urandom(16),)),
        AuditRequest(USER, AuditType.ALL, key_ids=tuple(os.urandom(16) for _ in range(1024))),
        AuditRequest(USER, AuditType.SYSTEM_ONLY),
        AuditRequest(USER, AuditType.ALL, before=1_000),
        AuditRequest(USER, AuditType.KEY_ONLY, after=2_000_000_000_000_000, cursor=5_000),
    ],
    ids=["one key id", "1024 key ids", "system only", "before", "after, from a cursor"],
)
def test_a_filtered_audit_query_costs_about_what_a_page_does(tmp_path, request_):
    storage = _storage_with_a_big_log(tmp_path / "big.db")
    keyserver = KeyServer(storage)
    try:
        page, full = _steps(storage, keyserver, AuditRequest(USER, AuditType.ALL))
        assert len(full.entries) == 256 and full.next_cursor == 256
        nothing, empty = _steps(storage, keyserver, request_)
        # It reads MAX_AUDIT_SCAN entries, 16 pages' worth; the whole log is 390 pages.
        assert nothing <= 40 * max(page, 1), (page, nothing)
        # Nothing read matched, and the log goes on: an empty page, not the end.
        assert empty.entries == ()
        assert empty.next_cursor == request_.cursor + MAX_AUDIT_SCAN
    finally:
        storage.close()


def test_an_unfiltered_page_reads_no_more_than_it_returns(tmp_path):
    """An unfiltered page (the chain walk's) matches every entry it reads, so it needs no
    scan bound: reading MAX_AUDIT_SCAN entry ids ahead first to find one made each page of a
    long log cost five times the page itself (and a walk read every entry 17 times)."""
    short = _storage_with_a_big_log(tmp_path / "short.db", entries=300)
    long = _storage_with_a_big_log(tmp_path / "long.db")
    try:
        request = AuditRequest(USER, AuditType.ALL, cursor=1)
        steps, page = _steps(long, KeyServer(long), request)
        assert [e.entry_id for e in page.entries] == list(range(2, 258)) and page.next_cursor == 257
        short_page, _ = _steps(short, KeyServer(short), request)
        assert steps <= short_page + 1, (steps, short_page)
    finally:
        short.close()
        long.close()
