"""NET-13: admission control before authentication, each protection attacked on loopback.

Before a peer has proved anything it may cost the server only bounded memory, bounded
CPU and no storage writes: idle connections are closed, a frame that trickles in is cut
off, one address holds a bounded number of connections and starts a bounded number of
registrations, logins and resumptions per second, refused cheaply.
"""

from __future__ import annotations

import logging
import os

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient, RateLimitedError
from keymgmt.adapters.client.connect import tls_connector
from keymgmt.adapters.server.admission import AddressLimits, address_key
from keymgmt_proto import ClientConnection, ErrorCode, FrameType, LoginRequested, ServerConfig, TokenBucket
from keymgmt_proto.wire import Abort, GoAway

from ..support.net_world import raw_login, running_server, tls_from

PW = b"correct horse battery staple"


# ------------------------------------------------------------------ the pieces


def test_a_token_bucket_starts_full_refills_at_its_rate_and_caps_at_its_burst():
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.4) is False  # 0.8 tokens
    assert bucket.take(100.5) is True  # 1.0 token
    assert bucket.tokens(1000.0) == 3  # never more than the burst
    assert bucket.take(999.0) is True  # a clock that steps back adds nothing...
    assert bucket.tokens(999.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)


def test_a_refund_returns_one_token_and_keeps_the_refill_honest():
    """A successful RESUME's token comes back: exactly one, never above the burst, and the
    refill it includes is not counted twice (nor a clock stepping back counted at all)."""
    bucket = TokenBucket(rate=1.0, burst=10)
    assert all(bucket.take(0.0) for _ in range(10))
    bucket.refund(FrameType.RESUME, 5.0)  # 5 refilled, and the one given back
    assert bucket.tokens(5.0) == pytest.approx(6.0)
    assert bucket.tokens(6.0) == pytest.approx(7.0)
    bucket.refund(FrameType.RESUME, 3.0)  # a clock that steps back: the stamp stays at 5
    assert bucket.tokens(6.0) == pytest.approx(8.0)
    for _ in range(5):
        bucket.give_back(6.0)
    assert bucket.tokens(6.0) == 10  # never above the burst


def test_addresses_are_grouped_as_one_client_owns_them():
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("not an address") == "not an address"


def test_address_limits_count_connections_and_stay_bounded():
    clock = [0.0]
    limits = AddressLimits(
        max_connections_per_address=2, rate=1, burst=1, max_addresses=100, clock=lambda: clock[0]
    )
    first, second = limits.open("a"), limits.open("a")
    assert first is not None and second is not None
    assert first.admit(FrameType.LOGIN_START, 0.0)
    assert not second.admit(FrameType.LOGIN_START, 0.0)  # one bucket per address, shared
    assert limits.open("a") is None  # the third is refused
    limits.close("a")
    assert limits.open("a") is not None
    # A flood of fresh addresses (each spends its token) cannot grow the table past the cap,
    # and never forgets an address that holds connections.
    clock[0] = 1.0
    for n in range(10_000):
        admission = limits.open(f"flood{n}")
        assert admission is not None and admission.admit(FrameType.LOGIN_START, 0.0)
        limits.close(f"flood{n}")
    assert len(limits) <= 100
    assert limits.connections("a") == 2


def test_refills_follow_a_monotonic_clock_not_the_wall_clock():
    """The core passes its wall-clock time; a wall clock stepped back an hour (NTP) must not
    stop an address's refills for an hour: the buckets run on their own monotonic clock."""
    clock = [100.0]
    limits = AddressLimits(rate=1, burst=1, clock=lambda: clock[0])
    admission = limits.open("a")
    assert admission is not None
    assert admission.admit(FrameType.LOGIN_START, 5_000.0)
    assert not admission.admit(FrameType.LOGIN_START, 5_000.0)
    clock[0] += 2.0
    assert admission.admit(FrameType.LOGIN_START, 1_400.0)  # the wall clock went back


# ------------------------------------------------------------------ attacks on a real server

pytestmark = pytest.mark.anyio


async def _hold(port: int, ca_cert, local_host: str, count: int, held: list) -> int:
    """Open ``count`` connections from ``local_host`` and keep those the server lets in (a
    handshake gets 30 s: a refusal is immediate, and a loaded CI machine must not turn a slow
    admitted handshake into a refusal)."""
    refused = 0
    for _ in range(count):
        try:
            with anyio.fail_after(30):
                held.append(await tls_from(port, ca_cert, local_host))
        except Exception:
            refused += 1
    return refused


async def test_a_thousand_idle_connections_from_one_address_do_not_lock_others_out(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="keymgmt")
    async with running_server(tmp_path, max_connections=200, max_connections_per_address=16) as (
        runtime,
        pki,
    ):
        held: list = []
        try:
            refused = await _hold(runtime.port, pki.ca_cert, "127.0.0.2", 1000, held)
            assert len(held) == 16 and refused == 984
            connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
            with anyio.fail_after(60):  # locked out would hang; a loaded machine is just slow
                async with KeymgmtClient(connect) as client:
                    await client.register(b"legit@example.org", PW)
                    session = await client.login(b"legit@example.org", PW)
                    await session.list_keys()
        finally:
            for stream in held:
                await anyio.aclose_forcefully(stream)
    refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert 1 <= len(refusals) <= 3  # 984 refusals, a few log lines


async def test_idle_connections_are_closed_so_a_full_server_frees_up(tmp_path):
    """Many addresses fill every connection slot with TLS connections that never send a
    frame: each is closed connection_idle_timeout later and a legitimate client gets in."""
    config = ServerConfig(connection_idle_timeout=1.0)
    async with running_server(tmp_path, protocol=config, max_connections=40) as (runtime, pki):
        held: list = []
        try:
            for n in range(2, 6):
                await _hold(runtime.port, pki.ca_cert, f"127.0.0.{n}", 10, held)
            assert len(held) == 40
            # Full: a newcomer from another address still gets in at once (one of the held
            # connections makes room, see the next test)...
            connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert, timeout=2)
            async with KeymgmtClient(connect) as client:
                await client.register(b"patient@example.org", PW)
            assert runtime.connections_preempted == 1
            # ...and the server closes every idle one: GOAWAY, then EOF.
            endings = []
            with anyio.fail_after(5):
                for stream in held:
                    try:
                        data = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        data = b""
                    endings.append(GoAway.decode(data[10:]).code if data else None)
            assert endings.count(ErrorCode.IDLE_TIMEOUT) == 39 and endings.count(None) == 1
        finally:
            for stream in held:
                await anyio.aclose_forcefully(stream)


async def test_a_frame_that_trickles_in_ends_the_connection(tmp_path):
    """Slowloris with a session open: the header of a frame arrives, the rest never does."""
    config = ServerConfig(frame_timeout=0.5)
    async with running_server(tmp_path, protocol=config) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"slow@example.org", PW)
        stream = await connect()
        try:
            await raw_login(stream, b"slow@example.org", PW)
            await stream.send(b"\x01\x22\x00\x00\x00\x01\x00\x00\x01\x00")  # 256 bytes announced
            with anyio.fail_after(5):
                data = await stream.receive()
            goaway = GoAway.decode(data[10:])
            assert data[1] == FrameType.GOAWAY
            assert (goaway.code, goaway.reason) == (ErrorCode.IDLE_TIMEOUT, "a frame took too long to arrive")
        finally:
            await anyio.aclose_forcefully(stream)


async def test_login_starts_beyond_the_rate_are_refused_before_any_work(tmp_path, monkeypatch):
    """A burst of LOGIN_STARTs from one address: the first `burst` reach the application
    (each costs a storage write: the throttle count), the rest are ABORT(RATE_LIMITED)
    without reaching it. Another address is not affected."""
    async with running_server(tmp_path, admission_rate=1.0, admission_burst=20) as (runtime, pki):
        seen: list[bytes] = []
        app = runtime.keyserver
        original = type(app).__call__

        def counting(self, conn, event):
            if isinstance(event, LoginRequested):
                seen.append(event.account_name)
            return original(self, conn, event)

        monkeypatch.setattr(type(app), "__call__", counting)
        stream = await tls_from(runtime.port, pki.ca_cert, "127.0.0.2")
        try:
            conn = ClientConnection(os.urandom)
            for n in range(300):
                conn.open_request_session(b"victim%d@example.org" % n, b"guess")
            await stream.send(conn.data_to_send())
            aborts = []
            buffer = b""
            with anyio.fail_after(20):
                while len(aborts) < 280:
                    buffer += await stream.receive()
                    while len(buffer) >= 10 and len(buffer) >= 10 + int.from_bytes(buffer[6:10], "big"):
                        end = 10 + int.from_bytes(buffer[6:10], "big")
                        frame, buffer = buffer[:end], buffer[end:]
                        if frame[1] == FrameType.ABORT:
                            aborts.append(int.from_bytes(frame[10:12], "big"))
        finally:
            await anyio.aclose_forcefully(stream)
        assert aborts.count(ErrorCode.RATE_LIMITED) >= 275
        assert 20 <= len(seen) <= 25  # the burst, plus what the rate refilled meanwhile
        # The client library says what happened; another address logs in at once.
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"other@example.org", PW)
            await client.login(b"other@example.org", PW)
        async with KeymgmtClient(await tls_from(runtime.port, pki.ca_cert, "127.0.0.2")) as client:
            with pytest.raises(RateLimitedError, match="too many attempts from this address"):
                await client.login(b"other@example.org", PW)


async def test_a_client_whose_idle_connection_was_closed_reconnects_when_used(tmp_path):
    """The server closes a connection that carries no session; the client opens a new one
    only when it is used again (no reconnection churn while idle)."""
    config = ServerConfig(connection_idle_timeout=0.3)
    async with running_server(tmp_path, protocol=config) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"dozy@example.org", PW)
            await anyio.sleep(1.2)  # closed after 0.3 s; no reconnection while idle
            assert client.connection_count == 1
            session = await client.login(b"dozy@example.org", PW)
            assert client.connection_count == 2
            await session.list_keys()
        assert runtime.connections_served == 2


def test_the_sync_client_reconnects_too(tmp_path):
    """SyncKeymgmtClient hands the async client its connector, so it survives the same."""
    from anyio.from_thread import start_blocking_portal

    from keymgmt.adapters.client.sync_client import SyncKeymgmtClient
    from keymgmt.adapters.server.runtime import KeyServerRuntime

    from ..support.net_world import make_settings

    settings, pki = make_settings(tmp_path, protocol=ServerConfig(connection_idle_timeout=0.3))
    with start_blocking_portal("asyncio") as portal:
        runtime = KeyServerRuntime(settings)
        future, port = portal.start_task(runtime.run)
        try:
            connect = tls_connector("127.0.0.1", port, cafile=pki.ca_cert)
            with SyncKeymgmtClient(connect, portal=portal) as client:
                client.register(b"sleepy@example.org", PW)
                portal.call(anyio.sleep, 1.0)
                session = client.login(b"sleepy@example.org", PW)
                assert session.list_keys() == []
            assert runtime.connections_served == 2
        finally:
            portal.call(runtime.shutdown)
            future.result(timeout=20)


def _resume_world(bucket: TokenBucket, sessions: int):
    """``sessions`` established sessions of one account, detached by a dropped connection,
    and a new connection whose server side admits through ``bucket``."""
    import random

    from keymgmt.adapters import InMemoryPair, MemoryServerApp
    from keymgmt_proto import ServerConnection, ServerSetup, SessionEstablished, SessionRegistry

    setup, registry, app = ServerSetup.generate(), SessionRegistry(ServerConfig()), MemoryServerApp()

    def pair(admission, client=None):
        server = ServerConnection(setup, os.urandom, registry=registry, admission=admission, now=0.0)
        return InMemoryPair(
            client or ClientConnection(os.urandom), server, app, rng=random.Random(0), now=0.0
        )

    first = pair(None)
    first.client.open_registration(b"sp@example.org", PW)
    first.pump()
    for _ in range(sessions):
        first.client.open_request_session(b"sp@example.org", PW)
    assert sum(isinstance(e, SessionEstablished) for e in first.pump()) == sessions
    first.client.connection_lost()
    first.server.connection_lost()
    first.pump()
    return first.client.take_detached_sessions(), pair(bucket), registry


def test_a_client_resumes_more_sessions_than_the_burst_after_a_drop():
    """After a dropped connection a client resumes all its sessions at once: a RESUME that
    resumes gets its token back, so their number is not limited by the address's burst
    (NET-2 under NET-13)."""
    from keymgmt_proto import SessionFailed, SessionResumed

    detached, second, _ = _resume_world(TokenBucket(rate=1.0, burst=20), 60)
    for session in detached:
        second.client.resume_session(session)
    events = second.pump()
    assert sum(isinstance(e, SessionResumed) for e in events) == 60
    assert not [e for e in events if isinstance(e, SessionFailed)]


def test_failed_resumes_pay_and_a_refused_one_leaves_the_session_resumable():
    """RESUMEs that resume nothing (guessed handles) drain the bucket like logins. A real
    RESUME refused while it is empty is not lost: the client core says ResumeDeferred, keeps
    the session detached, and a RESUME once the bucket has refilled works."""
    from keymgmt_proto import ResponseReceived, ResumeDeferred, SessionFailed, SessionResumed
    from keymgmt_proto.wire import Record, ResumeEnvelope

    from ..support.frames import forge

    bucket = TokenBucket(rate=1.0, burst=10)
    detached, second, registry = _resume_world(bucket, 1)
    for n in range(1, 13):  # a prober guessing session handles, on the same address
        bogus = ResumeEnvelope(os.urandom(16), Record(0, os.urandom(40))).encode()
        second.to_server(forge(FrameType.RESUME, 1000 + n, bogus))
    refusals = [e.code for e in second.server_events if isinstance(e, SessionFailed)]
    assert refusals.count(ErrorCode.UNKNOWN_SESSION) == 10 and refusals.count(ErrorCode.RATE_LIMITED) == 2
    second.server.data_to_send()  # the prober's ABORTs are not the owner's business
    second.client._last_session_id = 2000  # its ids above the prober's
    # The owner's RESUME now finds the bucket empty.
    sid = second.client.resume_session(detached[0])
    events = second.pump()
    assert [type(e) for e in events] == [ResumeDeferred] and events[0].session_id == sid
    assert registry.detached_count() == 1  # the server still holds it, untouched
    (again,) = second.client.take_detached_sessions()
    second.now += 1.5  # a token refilled
    sid = second.client.resume_session(again)
    assert any(isinstance(e, SessionResumed) for e in second.pump())
    second.client.send_request(sid, b"still here")
    assert [e.body for e in second.pump() if isinstance(e, ResponseReceived)] == [b"still here"]


class _Breakable:
    """A stream the test can cut, as a network failure would."""

    def __init__(self, inner) -> None:
        self.inner, self.broken = inner, anyio.Event()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        async with anyio.create_task_group() as tg:
            result: list[bytes] = []

            async def read() -> None:
                result.append(await self.inner.receive(max_bytes))
                tg.cancel_scope.cancel()

            async def cut() -> None:
                await self.broken.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(read)
            tg.start_soon(cut)
        if not result:
            raise anyio.BrokenResourceError
        return result[0]

    async def send(self, data: bytes) -> None:
        if self.broken.is_set():
            raise anyio.BrokenResourceError
        await self.inner.send(data)

    async def aclose(self) -> None:
        await anyio.aclose_forcefully(self.inner)


async def test_the_client_resumes_again_when_a_prober_on_its_address_drained_the_bucket(
    tmp_path, monkeypatch
):
    """Behind one NAT address, a prober guesses RESUME handles until the address's bucket is
    empty; then the owner's connection drops. KeymgmtClient's RESUMEs are deferred, and it
    resumes them again after a short backoff: the owner's sessions carry on (NET-2, NET-13)."""
    deferrals = []
    original = KeymgmtClient._resume_deferred

    # The address's bucket refills on a clock the test moves: it stands still while the
    # prober drains the bucket and the owner reconnects (however slow a loaded machine makes
    # that), and moves on once the owner's RESUMEs were deferred.
    admission_now = [0.0]

    async def counting(self, conn):
        deferrals.append(len(self._deferred))
        admission_now[0] += 5.0  # time for the bucket to refill before the retry
        await original(self, conn)

    monkeypatch.setattr(KeymgmtClient, "_resume_deferred", counting)
    async with running_server(tmp_path, admission_rate=10.0, admission_burst=20) as (runtime, pki):
        runtime.address_limits.clock = lambda: admission_now[0]
        streams: list[_Breakable] = []

        async def connect():
            streams.append(_Breakable(await tls_from(runtime.port, pki.ca_cert, "127.0.0.4")))
            return streams[-1]

        async with KeymgmtClient(connect) as client:
            await client.register(b"nat@example.org", PW)
            sessions = [await client.login(b"nat@example.org", PW) for _ in range(3)]
            prober = await tls_from(runtime.port, pki.ca_cert, "127.0.0.4")
            try:
                from keymgmt_proto.wire import Record, ResumeEnvelope

                from ..support.frames import forge, parsed

                frames = b"".join(
                    forge(
                        FrameType.RESUME,
                        n,
                        ResumeEnvelope(os.urandom(16), Record(0, os.urandom(40))).encode(),
                    )
                    for n in range(1, 60)
                )
                await prober.send(frames)
                # The owner's connection drops once the prober has drained the bucket (some
                # of its RESUMEs came back RATE_LIMITED): else, on a loaded machine, the
                # owner's RESUMEs could reach the server first and take the tokens.
                received = b""
                with anyio.fail_after(10):
                    while not any(
                        kind is FrameType.ABORT and Abort.decode(payload).code is ErrorCode.RATE_LIMITED
                        for kind, _sid, payload in parsed(received[: _whole(received)])
                    ):
                        received += await prober.receive()
                streams[-1].broken.set()  # the owner's connection drops now
                with anyio.fail_after(20):
                    for session in sessions:
                        assert await session.list_keys() == []
            finally:
                await anyio.aclose_forcefully(prober)
            assert client.connection_count == 2
    assert deferrals and deferrals[0] >= 1


async def test_the_client_gives_up_on_a_resumption_deferred_round_after_round(tmp_path):
    """If the address's bucket stays empty, the deferred sessions fail after
    ``reconnect_attempts`` rounds with a RateLimitedError that says what to do."""
    from keymgmt_proto.wire import Record, ResumeEnvelope

    from ..support.frames import forge

    async with running_server(tmp_path, admission_rate=0.01, admission_burst=8) as (runtime, pki):
        streams: list[_Breakable] = []

        async def connect():
            streams.append(_Breakable(await tls_from(runtime.port, pki.ca_cert, "127.0.0.5")))
            return streams[-1]

        async with KeymgmtClient(connect, reconnect_attempts=2, reconnect_delay=0.01) as client:
            await client.register(b"unlucky@example.org", PW)
            session = await client.login(b"unlucky@example.org", PW)
            prober = await tls_from(runtime.port, pki.ca_cert, "127.0.0.5")
            try:
                envelope = ResumeEnvelope(os.urandom(16), Record(0, os.urandom(40))).encode()
                await prober.send(b"".join(forge(FrameType.RESUME, n, envelope) for n in range(1, 20)))
                await anyio.sleep(0.2)  # the prober's frames are in before the drop
                streams[-1].broken.set()
                with anyio.fail_after(10), pytest.raises(RateLimitedError, match="kept deferring"):
                    await session.list_keys()
            finally:
                await anyio.aclose_forcefully(prober)


async def test_a_few_addresses_cannot_hold_every_connection_slot(tmp_path):
    """Two addresses fill the server's connection limit with connections that never log in
    (as a few hosts could with a trickle of LOGIN_STARTs). A newcomer from a third address
    still gets in: the address holding the most gives up one of its connections that has
    no logged-in session. A newcomer from a heavy address is refused instead."""
    async with running_server(
        tmp_path,
        max_connections=14,
        max_connections_per_address=8,
        protocol=ServerConfig(connection_idle_timeout=60),
    ) as (runtime, pki):
        owner_connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(owner_connect) as setup_client:
            await setup_client.register(b"owner@example.org", PW)
        held = []
        try:
            async with KeymgmtClient(await tls_from(runtime.port, pki.ca_cert, "127.0.0.2")) as owner:
                session = await owner.login(b"owner@example.org", PW)  # logged in, from .2
                for host, count in (("127.0.0.2", 7), ("127.0.0.3", 6)):
                    held += [await tls_from(runtime.port, pki.ca_cert, host) for _ in range(count)]
                with anyio.fail_after(5):
                    while runtime._open_connections < 14:
                        await anyio.sleep(0.01)
                # A heavy address asking for more is refused (the TLS handshake is cut).
                with (
                    anyio.fail_after(5),
                    pytest.raises((OSError, anyio.BrokenResourceError, anyio.EndOfStream)),
                ):
                    extra = await tls_from(runtime.port, pki.ca_cert, "127.0.0.2")
                    await extra.receive()
                assert runtime.connections_preempted == 0
                # A newcomer from elsewhere gets in and logs in.
                connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
                async with KeymgmtClient(connect) as newcomer:
                    await newcomer.login(b"owner@example.org", PW)
                assert runtime.connections_preempted == 1
                # The logged-in connection of the heaviest address was spared.
                assert await session.list_keys() == []
                assert owner.connection_count == 1
        finally:
            for stream in held:
                await anyio.aclose_forcefully(stream)


async def test_a_full_server_makes_room_from_idle_connections_before_logged_in_ones(tmp_path):
    """Four logged-in users behind one address and two idle connections from another fill
    the server. A newcomer takes the place of an idle connection, though the logged-in
    users' address holds more: the users keep their connections."""
    async with running_server(
        tmp_path,
        max_connections=6,
        max_connections_per_address=8,
        protocol=ServerConfig(connection_idle_timeout=60),
    ) as (runtime, pki):
        async with KeymgmtClient(
            tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        ) as setup_client:
            await setup_client.register(b"nat@example.org", PW)
        from contextlib import AsyncExitStack

        async with AsyncExitStack() as stack:
            users = []
            for _ in range(4):
                client = await stack.enter_async_context(
                    KeymgmtClient(await tls_from(runtime.port, pki.ca_cert, "127.0.0.2"))
                )
                users.append((client, await client.login(b"nat@example.org", PW)))
            idle = [await tls_from(runtime.port, pki.ca_cert, "127.0.0.3") for _ in range(2)]
            for stream in idle:
                stack.push_async_callback(anyio.aclose_forcefully, stream)
            with anyio.fail_after(5):
                while runtime._open_connections < 6:
                    await anyio.sleep(0.01)
            newcomer = await tls_from(runtime.port, pki.ca_cert, "127.0.0.4")
            stack.push_async_callback(anyio.aclose_forcefully, newcomer)
            with anyio.fail_after(5):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await idle[0].receive()  # the oldest idle connection made room
            assert runtime.connections_preempted == 1
            for client, session in users:
                assert await session.list_keys() == []
                assert client.connection_count == 1


def _whole(data: bytes) -> int:
    """How many leading bytes of ``data`` are whole frames."""
    end = 0
    while len(data) - end >= 10:
        length = int.from_bytes(data[end + 6 : end + 10], "big")
        if len(data) - end < 10 + length:
            break
        end += 10 + length
    return end
