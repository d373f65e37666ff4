"""NET-13: unauthenticated peers cannot grow memory, storage or another account's audit log
without bound. One attacker connection floods a real key-server process with login
attempts (a victim's name while it is locked, fresh names, malformed OPAQUE messages) and
the test checks the server's RSS, the victim's audit rows and the throttling table against
stated bounds. The per-address rate limit is lifted so that the flood reaches the
application: this is what the bounds have to hold without it.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import anyio
import opaque_ke_py
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient, ThrottledError
from keymgmt.adapters.client.connect import tls_connector
from keymgmt_proto import Action, AuditType, ErrorCode, FrameType
from keymgmt_proto.wire import Abort, LoginStart

from ..support.frames import forge, frame_session, frame_type, split_frames
from ..support.net_world import tls_from
from ..support.server_proc import ServerProcess, init_server_dir

PW = b"the victim's long password"
VICTIM = b"victim@example.org"
ROUND = 200
FLOOD = 2_000  # attempts of each kind
MAX_RECORDS = 500
RSS_BOUND_KIB = 16 * 1024  # stated bound on growth during the flood


async def _flood(port: int, ca_cert, names: list[bytes], ke1: bytes | None) -> dict[int, int]:
    """Send LOGIN_STARTs for ``names`` (with ``ke1``, or random bytes where it is None) in
    rounds, abandoning every login the server goes on with. Returns ABORT codes counted."""
    codes: dict[int, int] = {}
    stream = await tls_from(port, ca_cert, "127.0.0.3")
    next_id = 1
    try:
        for start in range(0, len(names), ROUND):
            batch = names[start : start + ROUND]
            out = b"".join(
                forge(FrameType.LOGIN_START, next_id + i, LoginStart(name, ke1 or os.urandom(96)).encode())
                for i, name in enumerate(batch)
            )
            next_id += len(batch)
            await stream.send(out)
            answered, buffer, aborts = 0, b"", []
            while answered < len(batch):
                buffer += await stream.receive()
                frames = split_frames(buffer[: _whole(buffer)])
                buffer = buffer[_whole(buffer) :]
                for frame in frames:
                    answered += 1
                    if frame_type(frame) is FrameType.ABORT:
                        code = int.from_bytes(frame[10:12], "big")
                        codes[code] = codes.get(code, 0) + 1
                    else:  # LOGIN_RESPONSE: walk away from the login
                        reason = Abort(ErrorCode.CLIENT_CLOSED, "").encode()
                        aborts.append(forge(FrameType.ABORT, frame_session(frame), reason))
            if aborts:
                await stream.send(b"".join(aborts))
    finally:
        await anyio.aclose_forcefully(stream)
    return codes


def _whole(buffer: bytes) -> int:
    """Length of the longest prefix of ``buffer`` made of whole frames."""
    end = 0
    while len(buffer) - end >= 10:
        size = 10 + int.from_bytes(buffer[end + 6 : end + 10], "big")
        if len(buffer) - end < size:
            break
        end += size
    return end


def _rows(db, query: str, *args: object) -> int:
    return int(db.execute(query, args).fetchone()[0])


def test_a_login_flood_leaves_memory_storage_and_the_victims_log_bounded(tmp_path):
    directory = init_server_dir(tmp_path / "srv")
    env = {
        "KEYMGMT_ADMISSION_RATE": "1000000",
        "KEYMGMT_ADMISSION_BURST": "1000000",
        "KEYMGMT_THROTTLE_THRESHOLD": "3",
        "KEYMGMT_THROTTLE_BASE_DELAY": "0.5",
        "KEYMGMT_THROTTLE_MAX_DELAY": "1",
        "KEYMGMT_THROTTLE_MAX_RECORDS": str(MAX_RECORDS),
        "KEYMGMT_THROTTLE_SWEEP_INTERVAL": "0.5",
    }
    server = ServerProcess(directory, env=env)
    ca = directory / "ca.pem"
    try:
        register = subprocess.run(
            [sys.executable, "-m", "keymgmt.adapters.cli.client", "register"],
            input=PW.decode() + "\n",
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "KEYMGMT_SERVER": f"127.0.0.1:{server.port}",
                "KEYMGMT_CA": str(ca),
                "KEYMGMT_ACCOUNT": VICTIM.decode(),
                "KEYMGMT_LOCAL_STORE": str(tmp_path / "local.db"),
            },
        )
        assert register.returncode == 0, register.stderr
        ke1 = opaque_ke_py.client_login_start(b"a guess").get_message()
        warm = [b"warm%d@example.org" % n for n in range(400)]
        anyio.run(_flood, server.port, ca, warm, ke1)
        rss_before = server.rss_kib()

        throttled = anyio.run(_flood, server.port, ca, [VICTIM] * FLOOD, ke1)
        fresh = anyio.run(_flood, server.port, ca, [os.urandom(12).hex().encode() for _ in range(FLOOD)], ke1)
        garbage = anyio.run(
            _flood, server.port, ca, [os.urandom(12).hex().encode() for _ in range(FLOOD)], None
        )
        assert throttled.get(ErrorCode.THROTTLED, 0) >= FLOOD // 2
        assert fresh.get(ErrorCode.THROTTLED, 0) == 0
        assert garbage.get(ErrorCode.MALFORMED, 0) >= FLOOD * 0.95  # (random bytes are rarely valid)

        rss_growth = server.rss_kib() - rss_before
        assert rss_growth <= RSS_BOUND_KIB, f"RSS grew by {rss_growth} KiB during the flood"
        db = sqlite3.connect(f"file:{directory / 'keyserver.db'}?mode=ro", uri=True)
        try:
            for _ in range(100):  # the sweep runs every 0.5 s
                if _rows(db, "SELECT count(*) FROM login_throttle") <= MAX_RECORDS:
                    break
                time.sleep(0.1)
            assert _rows(db, "SELECT count(*) FROM login_throttle") <= MAX_RECORDS
            # The victim's log holds registration and, at most, one entry per kind of attempt
            # (written when the sweep evicted its record), not one row per attempt.
            assert _rows(db, "SELECT count(*) FROM audit") <= 3
        finally:
            db.close()

        async def owner_logs_in() -> list:
            connect = tls_connector("127.0.0.1", server.port, cafile=ca)
            async with KeymgmtClient(connect) as client:
                with anyio.fail_after(20):
                    while True:
                        try:
                            session = await client.login(VICTIM, PW)
                            break
                        except ThrottledError:
                            await anyio.sleep(0.3)
                return await session.audit(AuditType.SYSTEM_ONLY)

        entries = anyio.run(owner_logs_in)
        # The whole flood is in the owner's log as a few entries with counts.
        throttled_entries = [e for e in entries if e.action is Action.LOGIN_THROTTLED]
        assert len(entries) <= 8, entries
        assert sum(e.count for e in throttled_entries) >= FLOOD // 2
    finally:
        server.stop()


@pytest.mark.parametrize("valid_ke1", [True, False], ids=["unknown names", "malformed OPAQUE messages"])
def test_failed_logins_leave_no_bookkeeping_behind(tmp_path, valid_ke1):
    """The decoy logins are the core's business: failed logins on one connection leave no
    per-session state behind in the application or the connection (the application once
    kept a set that grew by one entry per malformed credential request)."""
    import gc
    import tracemalloc

    from keymgmt.adapters.server.app import KeyServer
    from keymgmt.adapters.storage.sqlite import SQLiteStorage
    from keymgmt_proto import NEED_DATA, ServerConnection, SessionRegistry

    from ..support.keyserver_world import SETUP

    keyserver = KeyServer(SQLiteStorage(tmp_path / "flood.db"))
    server = ServerConnection(SETUP, os.urandom, registry=SessionRegistry(), now=0.0)
    ke1 = opaque_ke_py.client_login_start(b"a guess").get_message()

    def attempts(first: int, count: int) -> None:
        for sid in range(first, first + count):
            name = b"probe%d" % sid
            request = ke1 if valid_ke1 else os.urandom(96)
            server.receive_data(forge(FrameType.LOGIN_START, sid, LoginStart(name, request).encode()), 0.0)
            server.receive_data(forge(FrameType.ABORT, sid, Abort(ErrorCode.CLIENT_CLOSED, "").encode()), 0.0)
            with keyserver.batch():
                while (event := server.next_event()) is not NEED_DATA:
                    keyserver(server, event)
            server.data_to_send()

    attempts(1, 500)  # warm up
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    attempts(501, 5_000)
    gc.collect()
    growth = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert growth < 64 * 1024, f"{growth} bytes retained after 5,000 failed logins"


BIG_SECRET = b"\x00\x01" + (65536).to_bytes(4, "big") + os.urandom(65536)  # the long portable form
PIPELINED = 1000  # RETRIEVEs per session: max_requests_per_session
SESSIONS = 3
OUTPUT_RSS_BOUND_KIB = 100 * 1024


async def _pipelined_retrieves(server: ServerProcess, ca) -> tuple[int, int]:
    """An authenticated user pipelines RETRIEVEs of its 64 KiB secret on one connection: a
    few first, left unread so that the rest gathers into one batch, then the rest (about
    200 KB of requests for about 200 MB of answers), then reads everything while the
    server's RSS is watched. Returns (answers received, peak RSS growth in KiB)."""
    from keymgmt_proto import (
        NEED_DATA,
        Context,
        OpaqueStepRequired,
        ResponseReceived,
        RetrieveRequest,
        SessionClosed,
        SessionEstablished,
    )

    from ..support.net_world import raw_login

    account, password = b"pipeline@example.org", b"the pipeliner's long password"
    connect = tls_connector("127.0.0.1", server.port, cafile=ca)
    async with KeymgmtClient(connect) as client:
        user_id = await client.register(account, password)
        session = await client.login(account, password)
        key_id = await session.import_secret(BIG_SECRET)
        await session.logout()
    stream = await tls_from(server.port, ca)
    try:
        conn, first = await raw_login(stream, account, password)
        sids = [first]
        while len(sids) < SESSIONS:
            sids.append(conn.open_request_session(account, password))
            while not isinstance(event := conn.next_event(), SessionEstablished):
                if event is NEED_DATA:
                    await stream.send(conn.data_to_send())
                    conn.receive_data(await stream.receive())
                elif isinstance(event, OpaqueStepRequired):
                    conn.complete_opaque_step(event.run(conn.opaque))
        conn.max_requests_in_flight = PIPELINED
        body = RetrieveRequest(user_id, key_id, Context.LOCAL_ONLY).encode()
        for sid in sids:
            for _ in range(PIPELINED):
                conn.send_request(sid, body)
        requests = conn.data_to_send()
        rss_before = server.rss_kib()
        await stream.send(requests[: 72 * 50])
        await anyio.sleep(1.0)  # (unread: the server's send waits, and the rest gathers)
        with anyio.fail_after(20):
            await stream.send(requests[72 * 50 :])
        await anyio.sleep(1.0)
        answered, peak = 0, 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, server.rss_kib() - rss_before)
                await anyio.sleep(0.02)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            with anyio.fail_after(120):
                while answered < SESSIONS * PIPELINED:
                    conn.receive_data(await stream.receive())
                    while (event := conn.next_event()) is not NEED_DATA:
                        if isinstance(event, ResponseReceived):
                            answered += 1
                        else:  # each session ends after its last answer (at the request limit)
                            assert isinstance(event, SessionClosed), event
                            assert event.code is ErrorCode.REQUEST_LIMIT
            tg.cancel_scope.cancel()
        return answered, peak
    finally:
        await anyio.aclose_forcefully(stream)


def test_pipelined_retrieves_of_a_big_secret_leave_memory_bounded(tmp_path):
    """One authenticated user, one connection: a 72-byte RETRIEVE of a 64 KiB secret draws a
    65 KB answer, and the server answers a batch's requests at once. Without a bound on a
    batch's output, this run's 200 KB of requests queued about 200 MB of answers at once
    (RSS grew by 1.2 GB with 345 KB of requests), and a few such connections would end the
    process. The driver now sends at most about 1 MiB per batch (tests/server/
    test_answer_amplification.py); every answer still arrives."""
    directory = init_server_dir(tmp_path / "srv")
    server = ServerProcess(directory)
    try:
        answered, growth = anyio.run(_pipelined_retrieves, server, directory / "ca.pem")
        assert answered == SESSIONS * PIPELINED
        assert growth <= OUTPUT_RSS_BOUND_KIB, f"RSS grew by {growth} KiB"
        assert server.proc.poll() is None
    finally:
        server.stop()
