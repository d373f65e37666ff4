"""NET-10 under attack: what a password guesser tries against the login throttle.

Each test performs one attack from a review: reading a name's throttling state back to
learn that its owner logged in (NET-9), flooding fresh names so that the cap evicts a
victim's record, holding logins open or cutting them short so that tested guesses are never
counted, and the cost of the sweep that keeps the records bounded.
"""

from __future__ import annotations

import os
import time

import anyio
import pytest

from keymgmt.adapters.client.async_client import AuthenticationError, ThrottledError
from keymgmt.adapters.server.app import KeyServer, ThrottlePolicy
from keymgmt.adapters.server.driver import group_commit_for
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    NEED_DATA,
    ClientConnection,
    Event,
    FrameType,
    LoginFailed,
    ServerConnection,
    SessionRegistry,
)

from ..support.helpers import PASSWORD
from ..support.keyserver_world import SETUP, key_server

pytestmark = pytest.mark.anyio


async def _outcome(client, name: bytes, password: bytes) -> str:
    try:
        await client.login(name, password)
    except AuthenticationError:
        return "wrong password"
    except ThrottledError:
        return "throttled"
    return "logged in"


async def _failures(world, name: bytes) -> int:
    def read() -> int:
        with world.storage.transaction() as tx:
            record = tx.get_login_record(name)
        return 0 if record is None else record.failures

    # Through the server's group commit: while a server runs, the storage is used only there.
    return await group_commit_for(world.keyserver).run(read)


async def _guess(world, client, name: bytes) -> str:
    """A wrong guess, and the server's count of it: the client knows its guess was wrong
    before the server does (it tests it alone and then aborts), so wait for the count."""
    before = await _failures(world, name)
    outcome = await _outcome(client, name, b"a guess")
    if outcome == "wrong password":
        with anyio.fail_after(5):
            while await _failures(world, name) == before:
                await anyio.sleep(0.001)
    return outcome


async def test_an_owners_login_does_not_tell_a_prober_the_name_is_in_use(tmp_path):
    """The prober spends a few guesses on a registered name and on an unknown one; later the
    owner logs in. If that success cleared the name's count, the prober's next guesses would
    be throttled later for the registered name than for the unknown one (NET-9)."""
    policy = ThrottlePolicy(threshold=5, base_delay=60.0)
    async with key_server(tmp_path, throttle=policy) as world, world.client() as client:
        await client.register(b"alice@example.org", PASSWORD)
        names = (b"alice@example.org", b"nobody@example.org")
        for name in names:
            for _ in range(4):
                assert await _guess(world, client, name) == "wrong password"
        assert await _outcome(client, b"alice@example.org", PASSWORD) == "logged in"  # the owner
        seen = {name: [await _guess(world, client, name) for _ in range(2)] for name in names}
        assert seen[names[0]] == seen[names[1]] == ["wrong password", "throttled"]


async def test_flooding_fresh_names_does_not_evict_a_victims_record(tmp_path):
    """A guesser pushes a victim's name past the threshold (its next failure would lock it
    for long), waits for the lock to run out, then logs in with many fresh names so that the
    cap on records forces an eviction. The victim's record must survive it."""
    clock = [1_000.0]
    policy = ThrottlePolicy(threshold=3, base_delay=10.0, growth=2.0, max_delay=900.0, max_records=10)
    async with (
        key_server(tmp_path, clock=lambda: clock[0], throttle=policy) as world,
        world.client() as client,
    ):
        victim = b"victim@example.org"
        await client.register(victim, PASSWORD)
        for _ in range(6):
            assert await _guess(world, client, victim) == "wrong password"
            clock[0] += 1_000.0  # every lock runs out
        for n in range(20):
            assert await _guess(world, client, b"fresh%02d@example.org" % n) == "wrong password"
        commit = group_commit_for(world.keyserver)
        assert await commit.run(world.keyserver.maintain) > 0  # the cap did evict

        def read():
            with world.storage.transaction() as tx:
                return tx.count_login_records(), tx.get_login_record(victim)

        count, record = await commit.run(read)
        assert count <= 10
        assert record is not None and record.failures == 6
        # The next failure locks the victim for 10 * 2**4 s, not for the threshold's 10 s.
        assert await _guess(world, client, victim) == "wrong password"
        clock[0] += 100.0
        assert await _outcome(client, victim, PASSWORD) == "throttled"


def _pump(client: ClientConnection, server: ServerConnection, keyserver: KeyServer) -> list[Event]:
    """Move bytes both ways until quiet; the server's events go to the key server."""
    seen = []
    while True:
        up = client.data_to_send()
        if up:
            server.receive_data(up, time.time())
        seen += _serve(server, keyserver)
        down = server.data_to_send()
        if down:
            client.receive_data(down)
        if not up and not down:
            return seen


def _serve(server: ServerConnection, keyserver: KeyServer) -> list[Event]:
    seen = []
    with keyserver.batch():
        while (event := server.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            seen.append(event)
            keyserver(server, event)
    return seen


@pytest.mark.parametrize("cut", ["connection lost", "connection abandoned", "handshake timeout"])
def test_a_login_cut_short_after_its_response_counts_as_failed(tmp_path, cut):
    """LOGIN_RESPONSE lets the client test a password guess alone (OPAQUE), so a login that
    never sends its LOGIN_FINISH must count as a failed one, however it ends: the client
    going away, the server abandoning the connection (a storage failure or a fault), or the
    handshake timing out. Otherwise guesses would be free."""
    storage = SQLiteStorage(tmp_path / "ks.db")
    keyserver = KeyServer(storage, throttle=ThrottlePolicy(threshold=3, base_delay=60.0))
    registry = SessionRegistry()
    for attempt in range(1, 4):
        client = ClientConnection(os.urandom)
        server = ServerConnection(SETUP, os.urandom, registry=registry, now=time.time())
        client.open_request_session(b"nobody@example.org", b"a guess")
        client_bytes = client.data_to_send()
        server.receive_data(client_bytes, time.time())
        _serve(server, keyserver)
        assert server.data_to_send()[1] == FrameType.LOGIN_RESPONSE  # the guess can be tested now
        if cut == "connection lost":
            server.connection_lost()
        elif cut == "connection abandoned":
            server.abandon()
        else:
            server.handle_timer(time.time() + 3_600)
        ended = _serve(server, keyserver)
        assert any(isinstance(e, LoginFailed) for e in ended), ended
        with storage.transaction() as tx:
            record = tx.get_login_record(b"nobody@example.org")
        assert record is not None and record.failures == attempt
    # Three guesses tested: the name is locked.
    client = ClientConnection(os.urandom)
    server = ServerConnection(SETUP, os.urandom, registry=registry, now=time.time())
    client.open_request_session(b"nobody@example.org", b"a guess")
    server.receive_data(client.data_to_send(), time.time())
    _serve(server, keyserver)
    reply = server.data_to_send()
    assert reply[1] == FrameType.ABORT
    storage.close()


def test_logins_held_open_are_admitted_up_to_the_threshold_only(tmp_path):
    """A guesser opens many logins of one name at once and keeps them all waiting after their
    LOGIN_RESPONSE (each lets it test a guess): no more than the threshold are admitted, and
    once they end, each has counted."""
    storage = SQLiteStorage(tmp_path / "ks.db")
    keyserver = KeyServer(storage, throttle=ThrottlePolicy(threshold=4, base_delay=60.0))
    server = ServerConnection(SETUP, os.urandom, registry=SessionRegistry(), now=time.time())
    client = ClientConnection(os.urandom)
    for _ in range(12):
        client.open_request_session(b"victim@example.org", b"a guess")
    server.receive_data(client.data_to_send(), time.time())
    _serve(server, keyserver)
    with storage.transaction() as tx:
        record = tx.get_login_record(b"victim@example.org")
    assert record is not None and record.throttled == 8  # 4 admitted, 8 refused
    # The client never answers (it tests its guesses alone); then it goes away.
    server.connection_lost()
    _serve(server, keyserver)
    with storage.transaction() as tx:
        record = tx.get_login_record(b"victim@example.org")
    assert record is not None and record.failures == 4
    storage.close()


def test_the_sweep_stays_cheap_at_three_times_the_cap(tmp_path):
    """Past the cap the sweep evicts a batch at a time from an index, so each call's work
    does not grow with the table: counted in SQLite's virtual machine steps (not in seconds),
    a call at 3x the cap costs about what one at 1.5x does."""
    storage = SQLiteStorage(tmp_path / "ks.db")
    keyserver = KeyServer(storage, throttle=ThrottlePolicy(max_records=2_000))
    now = int(time.time() * 1e6) - 3_600_000_000

    def fill(count: int) -> None:
        with storage.transaction() as tx:
            tx._db.executemany(  # type: ignore[attr-defined]
                "INSERT INTO login_throttle (account_name, failures, locked_until_us, last_failure_us, "
                "last_start_us, unlogged) VALUES (?, 1, 0, ?, ?, 1)",
                ((os.urandom(16), now + i, now + i) for i in range(count)),
            )

    def steps_of_one_call() -> int:
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        storage._db.set_progress_handler(count, 100)  # type: ignore[attr-defined]
        try:
            assert keyserver.maintain(batch=100) == 100
        finally:
            storage._db.set_progress_handler(None, 0)  # type: ignore[attr-defined]
        return steps[0]

    fill(3_000)
    small = steps_of_one_call()
    fill(3_000)
    large = steps_of_one_call()
    assert large < small * 1.5, (small, large)
    storage.close()


async def test_the_client_takes_turns_so_its_own_burst_stays_under_the_threshold(tmp_path):
    """The other side of counting logins in flight: one client opening many sessions of
    one account at once is not throttled, because it runs them one after another."""
    policy = ThrottlePolicy(threshold=2, base_delay=60.0)
    async with key_server(tmp_path, throttle=policy) as world, world.client() as client:
        await client.register(b"grace@example.org", PASSWORD)
        sessions = []

        async def login() -> None:
            sessions.append(await client.login(b"grace@example.org", PASSWORD))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(login)
        assert len(sessions) == 8


class _Flaky(SQLiteStorage):
    """SQLite storage whose next batch fails to commit, or whose transactions all fail."""

    fail_commit = False
    down = False

    def batch(self):
        from contextlib import contextmanager

        from keymgmt.adapters.storage.base import StorageError

        @contextmanager
        def failing():
            with SQLiteStorage.batch(self):
                yield
                if self.fail_commit:
                    self.fail_commit = False
                    raise StorageError("injected commit failure")

        return failing()

    def transaction(self, **options):
        from keymgmt.adapters.storage.base import StorageError

        if self.down:
            raise StorageError("injected: storage unreachable")
        return SQLiteStorage.transaction(self, **options)


def _login_then_cut(keyserver: KeyServer, registry: SessionRegistry, *, commit_fails: bool = False) -> None:
    """A login of nobody@example.org admitted, its LOGIN_RESPONSE out; then the client goes
    away, in a batch that fails to commit if ``commit_fails``."""
    from keymgmt.adapters.storage.base import StorageError

    client = ClientConnection(os.urandom)
    server = ServerConnection(SETUP, os.urandom, registry=registry, now=time.time())
    client.open_request_session(b"nobody@example.org", b"a guess")
    server.receive_data(client.data_to_send(), time.time())
    _serve(server, keyserver)
    assert server.data_to_send()[1] == FrameType.LOGIN_RESPONSE
    keyserver.storage.fail_commit = commit_fails  # type: ignore[attr-defined]
    server.connection_lost()
    try:
        _serve(server, keyserver)
    except StorageError:
        assert commit_fails


def test_a_failed_login_counts_even_when_its_batch_fails_to_commit(tmp_path):
    """The batch in which a tested guess ended fails to commit: its failure stays queued and
    the next batch counts it, once."""
    storage = _Flaky(tmp_path / "ks.db")
    keyserver = KeyServer(storage, throttle=ThrottlePolicy(threshold=3, base_delay=60.0))
    _login_then_cut(keyserver, SessionRegistry(), commit_fails=True)
    with storage.transaction() as tx:
        assert tx.get_login_record(b"nobody@example.org").failures == 0  # rolled back with the batch
    with keyserver.batch():
        pass
    with keyserver.batch():
        pass
    with storage.transaction() as tx:
        assert tx.get_login_record(b"nobody@example.org").failures == 1
    storage.close()


def test_a_failed_login_storage_refused_is_counted_once_storage_is_back(tmp_path):
    """The end of a tested guess meets a storage outage: the failure waits in memory and is
    counted by the next batch or maintenance run, not dropped."""
    storage = _Flaky(tmp_path / "ks.db")
    keyserver = KeyServer(storage, throttle=ThrottlePolicy(threshold=3, base_delay=60.0))
    registry = SessionRegistry()
    client = ClientConnection(os.urandom)
    server = ServerConnection(SETUP, os.urandom, registry=registry, now=time.time())
    client.open_request_session(b"nobody@example.org", b"a guess")
    server.receive_data(client.data_to_send(), time.time())
    _serve(server, keyserver)
    storage.down = True
    server.connection_lost()
    for event in iter(server.next_event, NEED_DATA):
        keyserver(server, event)  # outside a batch: the count is tried at once, and refused
    storage.down = False
    with storage.transaction() as tx:
        assert tx.get_login_record(b"nobody@example.org").failures == 0  # not yet
    keyserver.maintain()
    with storage.transaction() as tx:
        assert tx.get_login_record(b"nobody@example.org").failures == 1
    storage.close()


def test_a_throttled_login_is_told_the_wait_in_whole_seconds_rounded_up():
    from keymgmt.adapters.server.app import throttle_reason
    from keymgmt.adapters.storage.base import LoginRecord

    now = 1_000_000_000
    fields = dict.fromkeys(LoginRecord.__dataclass_fields__, 0)
    locked = LoginRecord(**{**fields, "locked_until": now + 1_500_000})
    assert throttle_reason(locked, now) == "too many failed logins; retry in 2 s"
    over = LoginRecord(**{**fields, "locked_until": now})
    assert throttle_reason(over, now) == "too many logins at once; retry in a moment"
    assert throttle_reason(None, now) == "too many logins at once; retry in a moment"


def test_the_client_reads_the_wait_from_the_reason_and_nothing_else():
    from keymgmt.adapters.client.async_client import ThrottledError, _session_error
    from keymgmt_proto import ErrorCode, SessionFailed

    reason = "too many failed logins; retry in 42 s"
    error = _session_error(SessionFailed(1, ErrorCode.THROTTLED, reason, True))
    assert isinstance(error, ThrottledError) and error.retry_after == 42
    assert str(error) == "too many failed logins for this account; try again in 42 s"
    for reason in ("too many logins at once; retry in a moment", "retry in 42 s and more", "retry in -1 s"):
        error = _session_error(SessionFailed(1, ErrorCode.THROTTLED, reason, True))
        assert isinstance(error, ThrottledError) and error.retry_after is None, reason
