"""NET-9 (unknown account = wrong password), NET-10 (throttling), per-user limits."""

from __future__ import annotations

import os

import pytest

from keymgmt.adapters import InMemoryPair
from keymgmt.adapters.client.async_client import (
    AuthenticationError,
    KeymgmtClient,
    RequestRefusedError,
    ThrottledError,
)
from keymgmt.adapters.server.app import KeyServer, ThrottlePolicy
from keymgmt.adapters.storage.base import AuditQuery
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    Action,
    AuditType,
    ClientConnection,
    ErrorCode,
    LoginFailed,
    Outcome,
    ServerConfig,
    ServerConnection,
    ServerSetup,
    SessionFailed,
    SessionRegistry,
    Status,
)
from keymgmt_proto.wire import encode_frame

from ..support.frames import frame_type, split_frames
from ..support.helpers import PASSWORD, register
from ..support.keyserver_world import SETUP, key_server


def _transcript(pair: InMemoryPair, account: bytes, password: bytes):
    """Every frame of one login attempt, both directions, as (direction, type, length)."""
    frames, events = [], []
    pair.client.open_request_session(account, password)
    while True:
        up = pair.client.data_to_send()
        for frame in split_frames(up):
            frames.append(("c2s", frame_type(frame), len(frame)))
        if up:
            pair.to_server(up)
        down = pair.server.data_to_send()
        for frame in split_frames(down):
            frames.append(("s2c", frame_type(frame), len(frame)))
        events += pair.to_client(down) if down else []
        if not up and not down:
            return frames, events


def _pair(storage: SQLiteStorage, keyserver: KeyServer) -> InMemoryPair:
    return InMemoryPair(
        ClientConnection(os.urandom),
        ServerConnection(SETUP, os.urandom, registry=SessionRegistry(), now=0.0),
        keyserver,
        now=0.0,
    )


def test_unknown_account_and_wrong_password_look_the_same(tmp_path):
    storage = SQLiteStorage(tmp_path / "ks.db")
    keyserver = KeyServer(storage, throttle=ThrottlePolicy(threshold=100))
    pair = _pair(storage, keyserver)
    register(pair, b"alice@example.org")
    wrong, wrong_events = _transcript(pair, b"alice@example.org", b"not the password")
    unknown, unknown_events = _transcript(pair, b"alfie@example.org", b"not the password")  # same length
    assert wrong == unknown  # same frames, same sizes, same order
    assert [f[1].name for f in wrong] == ["LOGIN_START", "LOGIN_RESPONSE", "ABORT"]
    (wrong_failure,) = [e for e in wrong_events if isinstance(e, SessionFailed)]
    (unknown_failure,) = [e for e in unknown_events if isinstance(e, SessionFailed)]
    assert (wrong_failure.code, wrong_failure.reason, wrong_failure.remote) == (
        unknown_failure.code,
        unknown_failure.reason,
        unknown_failure.remote,
    )
    assert wrong_failure.code is ErrorCode.AUTHENTICATION_FAILED
    # The server saw a failed login in both cases, without a user id for the unknown name;
    # neither wrote anything on failing (the attempt was counted when it started).
    failed = [e for e in pair.server_events if isinstance(e, LoginFailed)]
    assert [e.user_id is None for e in failed] == [False, True]
    with storage.transaction() as tx:
        account = tx.get_account(b"alice@example.org")
        entries, _ = tx.query_audit(account.user_id, AuditQuery(AuditType.SYSTEM_ONLY))
    assert [e.action for e in entries] == [Action.REGISTER]
    # The owner's next login puts the failed attempt in the log, then the success.
    _transcript(pair, b"alice@example.org", PASSWORD)
    with storage.transaction() as tx:
        entries, _ = tx.query_audit(account.user_id, AuditQuery(AuditType.SYSTEM_ONLY))
    assert [(e.action, e.outcome, e.count) for e in entries[1:]] == [
        (Action.LOGIN, Outcome.FAILURE, 1),
        (Action.LOGIN, Outcome.SUCCESS, 1),
    ]


def test_decoys_are_stable_per_name_and_across_instances():
    """Two instances sharing a setup (the same file, loaded twice) give one name the same
    decoy user id, masking key and envelope, so probes of a name look like one account."""
    first, second = ServerSetup.from_bytes(SETUP.to_bytes()), ServerSetup.from_bytes(SETUP.to_bytes())
    user_a, record_a = first.decoy_record(b"nobody@example.org", os.urandom)
    assert first.decoy_record(b"nobody@example.org", os.urandom) == (user_a, record_a)
    other_user, other_record = second.decoy_record(b"nobody@example.org", os.urandom)
    assert other_user == user_a and other_record[32:] == record_a[32:]  # masking key and envelope
    assert first.decoy_record(b"someone@example.org", os.urandom)[0] != user_a
    assert len(record_a) == 192
    assert repr(first) == "ServerSetup(<secret>)"


def test_throttle_policy_grows_and_caps():
    policy = ThrottlePolicy(threshold=3, base_delay=2.0, growth=3.0, max_delay=50.0)
    assert [policy.locked_for(n) for n in range(1, 8)] == [0.0, 0.0, 2.0, 6.0, 18.0, 50.0, 50.0]
    assert policy.locked_for(10_000) == 50.0
    with pytest.raises(ValueError):
        ThrottlePolicy(threshold=0)


async def _throttled_login(client, name: bytes, password: bytes, refusals: list[int]) -> None:
    """Log in until the refusal names the wait, counting the refusals in ``refusals``: right
    after a failed login the name may first be refused as having too many logins in flight
    (the failure is counted at its batch's end), with no wait named."""
    for _ in range(3):
        try:
            await client.login(name, password)
        except ThrottledError as refused:
            refusals[0] += 1
            if refused.retry_after is not None:
                raise
            assert str(refused) == "too many login attempts for this account; try again in a moment"
    raise AssertionError("never refused with a wait")


@pytest.mark.anyio
async def test_failed_logins_are_throttled_audited_and_survive_a_restart(tmp_path):
    clock = [1_000.0]
    policy = ThrottlePolicy(threshold=3, base_delay=10.0, growth=2.0, max_delay=60.0, forget_after=3_600.0)
    async with (
        key_server(tmp_path, clock=lambda: clock[0], throttle=policy) as world,
        world.client() as client,
    ):
        user_id = await client.register(b"carol@example.org", PASSWORD)
        for _ in range(3):
            with pytest.raises(AuthenticationError):
                await client.login(b"carol@example.org", b"guess")
        # Locked for 10 s now: even the right password is refused, with a distinct error.
        refusals = [0]
        with pytest.raises(ThrottledError, match="try again in 10 s") as known:
            await _throttled_login(client, b"carol@example.org", PASSWORD, refusals)
        assert known.value.retry_after == 10  # the key server's own wait, on its clock
        # Unknown names are throttled exactly the same way (NET-9 holds under NET-10 too).
        for _ in range(3):
            with pytest.raises(AuthenticationError):
                await client.login(b"ghost@example.org", b"guess")
        with pytest.raises(ThrottledError) as unknown:
            await _throttled_login(client, b"ghost@example.org", b"guess", [0])
        assert str(unknown.value) == str(known.value) and unknown.value.retry_after == 10
    # A new server on the same database remembers the lock.
    async with (
        key_server(tmp_path, clock=lambda: clock[0], throttle=policy) as world,
        world.client() as client,
    ):
        with pytest.raises(ThrottledError):
            await client.login(b"carol@example.org", PASSWORD)
        clock[0] += 10.0
        session = await client.login(b"carol@example.org", PASSWORD)  # the wait is over
        entries = await session.audit(AuditType.SYSTEM_ONLY)
        # One entry per kind of attempt since they were last logged, with its count (NET-13).
        assert [(e.action, e.outcome, e.count) for e in entries[-3:]] == [
            (Action.LOGIN, Outcome.FAILURE, 3),
            (Action.LOGIN_THROTTLED, Outcome.FAILURE, refusals[0] + 1),
            (Action.LOGIN, Outcome.SUCCESS, 1),
        ]
        assert session.user_id == user_id
        # The success did not clear the count (a prober would learn that the name is in use,
        # NET-9): the next failure locks the name again, for twice as long.
        with pytest.raises(AuthenticationError):
            await client.login(b"carol@example.org", b"guess")
        with pytest.raises(ThrottledError):
            await client.login(b"carol@example.org", PASSWORD)
        clock[0] += 20.0
        session = await client.login(b"carol@example.org", PASSWORD)
        entries = await session.audit(AuditType.SYSTEM_ONLY)
        assert [(e.action, e.outcome, e.count) for e in entries[-3:]] == [
            (Action.LOGIN, Outcome.FAILURE, 1),
            (Action.LOGIN_THROTTLED, Outcome.FAILURE, 1),
            (Action.LOGIN, Outcome.SUCCESS, 1),
        ]
        # An hour after the last failure the name's record is forgotten: three failures
        # again before a lock, for the owner and the unknown name alike.
        clock[0] += 3_600.0
        assert world.keyserver.maintain() == 2
        for name in (b"carol@example.org", b"ghost@example.org"):
            for _ in range(2):
                with pytest.raises(AuthenticationError):
                    await client.login(name, b"guess")
        assert (await client.login(b"carol@example.org", PASSWORD)).user_id == user_id


@pytest.mark.anyio
async def test_per_user_key_limit(tmp_path):
    async with key_server(tmp_path, max_keys_per_user=2) as world, world.client() as client:
        await client.register(b"dave@example.org", PASSWORD)
        session = await client.login(b"dave@example.org", PASSWORD)
        await session.generate()
        await session.import_secret(b"\x01x")
        with pytest.raises(RequestRefusedError) as refused:
            await session.generate()
        assert refused.value.status is Status.LIMIT_REACHED
        assert len(await session.list_keys()) == 2


@pytest.mark.anyio
async def test_key_id_reservations_per_session_are_bounded(tmp_path):
    from keymgmt.adapters.server.app import MAX_RESERVED_KEY_IDS
    from keymgmt_proto import (
        CreateKeyIdRequest,
        KeyIdResponse,
        SecretKind,
        StoreSecretRequest,
        seal_secret,
        secret_ad,
    )

    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(b"erin@example.org", PASSWORD)
        session = await client.login(b"erin@example.org", PASSWORD)
        storage_key = await session._get_storage_key()
        key_ids = []
        for _ in range(MAX_RESERVED_KEY_IDS + 1):
            reply = await session._call(
                CreateKeyIdRequest(session.user_id, SecretKind.GENERATED, os.urandom(32))
            )
            assert isinstance(reply, KeyIdResponse)
            key_ids.append(reply.key_id)

        def store(key_id):
            ad = secret_ad(session.user_id, key_id, SecretKind.GENERATED)
            sealed = seal_secret(storage_key, bytes(32), ad, os.urandom)
            return session._call(StoreSecretRequest(session.user_id, key_id, SecretKind.GENERATED, sealed))

        with pytest.raises(RequestRefusedError) as refused:  # the oldest reservation was dropped
            await store(key_ids[0])
        assert refused.value.status is Status.INVALID
        await store(key_ids[-1])
        assert [k.key_id for k in await session.list_keys()] == [key_ids[-1]]


@pytest.mark.anyio
async def test_logins_started_in_parallel_cannot_pass_the_threshold(tmp_path):
    from contextlib import AsyncExitStack

    import anyio

    policy = ThrottlePolicy(threshold=5, base_delay=60.0)
    async with key_server(tmp_path, throttle=policy) as world, AsyncExitStack() as stack:
        # One client per guess: a KeymgmtClient takes turns for logins of one account, an
        # attacker's own code does not.
        clients = [await stack.enter_async_context(world.client()) for _ in range(30)]
        await clients[0].register(b"frank@example.org", PASSWORD)
        outcomes: list[str] = []

        async def guess(client: KeymgmtClient) -> None:
            try:
                await client.login(b"frank@example.org", b"guess")
            except AuthenticationError:
                outcomes.append("wrong password")
            except ThrottledError:
                outcomes.append("throttled")

        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(guess, client)
        assert outcomes.count("wrong password") <= 5  # at most the threshold got to try
        assert outcomes.count("throttled") >= 25


@pytest.mark.anyio
async def test_one_client_logs_in_one_account_many_times_at_once(tmp_path):
    """Logins in flight count towards the threshold (NET-10), so the client takes turns
    for logins of one account: a burst of them must not trip the throttle."""
    import anyio

    policy = ThrottlePolicy(threshold=3, base_delay=60.0)
    async with key_server(tmp_path, throttle=policy) as world, world.client() as client:
        await client.register(b"grace@example.org", PASSWORD)
        await client.register(b"heidi@example.org", PASSWORD)
        sessions = []

        async def login(name: bytes) -> None:
            sessions.append(await client.login(name, PASSWORD))

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(login, b"grace@example.org" if i % 2 else b"heidi@example.org")
        assert len(sessions) == 12
        assert client._login_turns == {}  # nothing left behind per account
        with world.storage.transaction() as tx:
            record = tx.get_login_record(b"grace@example.org")
            assert record is not None and record.failures == 0


class _SlowAnswers:
    """The client's end of a link whose answers arrive ``delay`` seconds late."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay

    async def receive(self, max_bytes: int = 65536) -> bytes:
        import anyio

        await anyio.sleep(self.delay)
        return await self.inner.receive(max_bytes)

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.anyio
async def test_a_cancelled_login_is_aborted_before_the_next_one(tmp_path):
    """A login cancelled by the caller (its timeout) is aborted at once: no session is
    left that nobody holds, on either side, and the next login of the account follows it."""
    import anyio

    from keymgmt.adapters.server.driver import serve_stream
    from keymgmt.adapters.testing.streams import memory_stream_pair

    policy = ThrottlePolicy(threshold=5, base_delay=60.0)
    async with key_server(tmp_path, throttle=policy) as world:
        async with world.client() as setup_client:
            await setup_client.register(b"ivan@example.org", PASSWORD)
        client_end, server_end = memory_stream_pair()
        world.task_group.start_soon(serve_stream, server_end, SETUP, world.keyserver, world.registry)
        async with KeymgmtClient(_SlowAnswers(client_end, 0.1)) as client:
            for _ in range(2):
                with anyio.move_on_after(0.02):
                    await client.login(b"ivan@example.org", PASSWORD)
            session = await client.login(b"ivan@example.org", PASSWORD)
            await session.list_keys()
            assert len(client._sid_of) == 1  # only the session the caller holds
            assert client._login_turns == {}
            assert len(world.registry) == 1  # the server kept no session for the cancelled ones


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["driver", "serve_stream"])
async def test_a_peer_that_stops_reading_is_dropped(tmp_path, caplog, how):
    """A driver stuck in send() would run no timers (its sessions would never expire):
    a peer that leaves the server's answers unread past send_timeout is dropped, also
    when served with serve_stream (the library's one-call form takes the limit too)."""
    import logging

    import anyio

    from keymgmt.adapters.server.driver import ConnectionDriver, serve_stream
    from keymgmt.adapters.testing.streams import memory_stream_pair
    from keymgmt_proto import FrameType
    from keymgmt_proto.wire import REGISTRATION_REQUEST_SIZE, RegStart

    caplog.set_level(logging.INFO, logger="keymgmt.server")
    storage = SQLiteStorage(tmp_path / "ks.db")
    client_end, server_end = memory_stream_pair(buffer=4)
    # (refused frames also spend the budget for unproductive input: under load the server
    # could read 1,024 of them before its send blocked and end the connection for that)
    config = ServerConfig(unproductive_burst=10_000_000)
    app, registry = KeyServer(storage), SessionRegistry(config)
    if how == "driver":
        serve = ConnectionDriver(server_end, SETUP, app, registry, send_timeout=0.3).run
    else:

        async def serve() -> None:
            await serve_stream(server_end, SETUP, app, registry, send_timeout=0.3)

    refused = RegStart(b" not a valid name ", bytes(REGISTRATION_REQUEST_SIZE)).encode()

    async def flood() -> None:  # each frame draws an ABORT; none is ever read
        # Until the server drops us: it batches what arrives together, so how many frames
        # it takes to fill the pipe depends on scheduling.
        for session_id in range(1, 2_000_000, 2):
            try:
                await client_end.send(encode_frame(FrameType.REG_START, session_id, refused))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            await anyio.sleep(0)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            await serve()
            tg.cancel_scope.cancel()
    assert any("stopped reading" in r.getMessage() for r in caplog.records)
    storage.close()
