"""The key-server application's smaller promises, each pinned by a test that fails without it.

How sessions end in the audit log (a logout is LOGOUT, an expiry SESSION_EXPIRED, a login
that never finished nothing), audit times in microseconds of the server's clock, the default
account-name policy's bounds, the throttle's delay curve, how a malformed request is
audited, and that an internal error costs one answer, not the session.
"""

from __future__ import annotations

import logging
import os

import anyio
import pytest

from keymgmt.adapters.client.async_client import (
    AuthenticationError,
    KeymgmtError,
    KeySession,
    RequestRefusedError,
)
from keymgmt.adapters.server.app import (
    MAX_RESERVED_KEY_IDS,
    ThrottlePolicy,
    _action_of_malformed,
    default_account_name_policy,
)
from keymgmt.adapters.storage.base import SecretRecord
from keymgmt_proto import (
    Action,
    CreateKeyIdRequest,
    KeyIdResponse,
    Op,
    Outcome,
    SecretKind,
    Status,
    StoreSecretRequest,
)

from ..support.fake_pairs import FakeWorld
from ..support.keyserver_world import key_server

ALICE = b"alice"
BOB = b"bob"
PW = b"correct horse battery staple"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_a_logout_is_audited_as_logout_and_at_the_servers_time(tmp_path):
    clock = Clock(1_700_000_000.123456)
    async with key_server(tmp_path, clock=clock) as world, world.client() as client:
        await client.register(ALICE, PW)
        first = await client.login(ALICE, PW)
        clock.now += 10
        await first.logout()
        second = await client.login(ALICE, PW)
        entries = await second.audit()

    actions = [(e.action, e.outcome) for e in entries]
    assert actions.count((Action.LOGOUT, Outcome.SUCCESS)) == 1
    assert (Action.SESSION_EXPIRED, Outcome.SUCCESS) not in actions
    (logout,) = [e for e in entries if e.action is Action.LOGOUT]
    assert logout.timestamp == int((1_700_000_000.123456 + 10) * 1_000_000)
    (register,) = [e for e in entries if e.action is Action.REGISTER]
    assert register.timestamp == int(1_700_000_000.123456 * 1_000_000)


@pytest.mark.anyio
async def test_a_session_the_server_ends_is_audited_as_expired(tmp_path):
    from keymgmt_proto import ServerConfig

    async with (
        key_server(tmp_path, ServerConfig(max_requests_per_session=3)) as world,
        world.client() as client,
    ):
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        await session.list_keys()
        await session.list_keys()
        await session.list_keys()  # the third request: the server closes the session after it
        with pytest.raises(KeymgmtError):
            await session.list_keys()
        other = await client.login(ALICE, PW)
        entries = await other.audit()

    actions = [e.action for e in entries]
    assert Action.SESSION_EXPIRED in actions
    assert Action.LOGOUT not in actions


def test_the_default_account_name_policy_bounds():
    assert default_account_name_policy(b"a") is True
    assert default_account_name_policy(b"a" * 255) is True
    assert default_account_name_policy("é".encode() * 127 + b"a") is True  # 255 bytes
    assert default_account_name_policy(b"a" * 256) is False
    assert default_account_name_policy(b"") is False
    assert default_account_name_policy(b"\xff") is False  # not UTF-8
    assert default_account_name_policy(b" alice") is False
    assert default_account_name_policy(b"al\nice") is False


def test_the_throttle_delay_grows_from_the_threshold_and_stops_growing_after_64_steps():
    policy = ThrottlePolicy(threshold=3, base_delay=1e-30, growth=2.0, max_delay=1e30)
    assert policy.locked_for(2) == 0.0
    assert policy.locked_for(3) == 1e-30
    assert policy.locked_for(4) == 2e-30
    assert policy.locked_for(3 + 64) == 1e-30 * 2.0**64
    assert policy.locked_for(3 + 65) == 1e-30 * 2.0**64  # the exponent is capped, not the delay
    assert ThrottlePolicy(max_delay=5.0).locked_for(1_000) == 5.0


def test_a_malformed_request_is_audited_under_its_op_where_the_op_byte_says():
    user, key = bytes(16), bytes(16)
    assert _action_of_malformed(b"") is Action.MALFORMED_REQUEST
    assert _action_of_malformed(b"\xee") is Action.MALFORMED_REQUEST
    assert _action_of_malformed(bytes([Op.RETRIEVE])) is Action.RETRIEVE
    store = bytes([Op.STORE_SECRET]) + user + key
    assert _action_of_malformed(store) is Action.GENERATE  # too short to say: a generate
    assert _action_of_malformed(store + bytes([SecretKind.IMPORTED])) is Action.IMPORT
    assert _action_of_malformed(store + bytes([SecretKind.GENERATED])) is Action.GENERATE
    # The kind byte is the one right after the key id, no other.
    assert _action_of_malformed(
        bytes([Op.STORE_SECRET]) + user + key[:-1] + bytes([SecretKind.IMPORTED])
    ) is (Action.GENERATE)


@pytest.mark.anyio
async def test_a_failed_login_and_an_ended_session_leave_nothing_behind_and_log_no_error(tmp_path, caplog):
    """A session's key-id reservations go when it ends (they would pile up per connection),
    a session holding none has no entry (P4: an idle session costs nothing there), and a
    session that fails (a wrong password) is an ordinary event, not an error."""
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        with pytest.raises(AuthenticationError):
            await client.login(ALICE, b"wrong")
        session = await client.login(ALICE, PW)
        await session.generate()
        reserved = list(world.keyserver._reserved.values())
        # The stored key's reservation is spent; the next key id the store asked for is held.
        (next_id,) = session._ops._next[SecretKind.GENERATED]
        assert reserved == [{next_id.key_id: SecretKind.GENERATED}]
        await session.logout()
        await client.login(ALICE, PW)  # the server has handled the CLOSE before this login
        assert len(world.keyserver._reserved) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _reserve(session: KeySession, kind: SecretKind = SecretKind.GENERATED) -> bytes:
    reply = await session._call(CreateKeyIdRequest(session.user_id, kind, os.urandom(32)))
    assert isinstance(reply, KeyIdResponse)
    return reply.key_id


@pytest.mark.anyio
async def test_a_session_keeps_its_last_sixteen_key_id_reservations(tmp_path):
    """MAX_RESERVED_KEY_IDS: the oldest reservation goes only when a seventeenth is made."""
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        await session._get_storage_key()
        ids = [await _reserve(session) for _ in range(MAX_RESERVED_KEY_IDS)]
        sealed = bytes(12 + 32 + 16)  # never opened by the server
        await session._call(StoreSecretRequest(session.user_id, ids[0], SecretKind.GENERATED, sealed))
        ids += [await _reserve(session) for _ in range(MAX_RESERVED_KEY_IDS + 1)]
        with pytest.raises(RequestRefusedError) as refused:  # ids[1] was the oldest: gone
            await session._call(StoreSecretRequest(session.user_id, ids[1], SecretKind.GENERATED, sealed))
        assert refused.value.status is Status.INVALID
        with pytest.raises(RequestRefusedError):  # stored once: its reservation is spent
            await session._call(StoreSecretRequest(session.user_id, ids[0], SecretKind.GENERATED, sealed))
        await session._call(StoreSecretRequest(session.user_id, ids[-1], SecretKind.GENERATED, sealed))


@pytest.mark.anyio
async def test_a_store_onto_a_key_id_taken_behind_the_servers_back_is_refused(tmp_path):
    """If the row appeared after the reservation (out of band), the store must say INVALID,
    not OK: the client would drop a secret it believes is stored."""
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        key_id = await _reserve(session)
        sealed = bytes(12 + 32 + 16)

        def insert() -> bool:
            with world.storage.transaction() as tx:
                record = SecretRecord(session.user_id, key_id, SecretKind.GENERATED, sealed, b"ad", 1)
                return tx.insert_secret(record)

        assert await world.storage_do(insert)
        with pytest.raises(RequestRefusedError) as refused:
            await session._call(StoreSecretRequest(session.user_id, key_id, SecretKind.GENERATED, sealed))
        assert refused.value.status is Status.INVALID


@pytest.mark.anyio
async def test_key_ids_are_redrawn_while_they_collide_with_a_stored_or_reserved_one(tmp_path):
    """KEY-1/KEY-2: a server nonce that gives a taken id is drawn again (a weak random source
    must not make two keys share an id)."""
    nonces = iter([b"\x01" * 32, b"\x01" * 32, b"\x02" * 32, b"\x02" * 32, b"\x03" * 32])
    drawing = [False]

    def random(n: int) -> bytes:
        return next(nonces) if drawing[0] and n == 32 else os.urandom(n)

    async with key_server(tmp_path, random=random) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        nonce = b"\x09" * 32
        drawing[0] = True
        ids = []
        for _ in range(3):
            reply = await session._call(CreateKeyIdRequest(session.user_id, SecretKind.GENERATED, nonce))
            assert isinstance(reply, KeyIdResponse)
            ids.append(reply.key_id)
        assert len(set(ids)) == 3  # 1, then 2 (1 is reserved), then 3 (2 is reserved)
        drawing[0] = False


def _records(world) -> int:  # type: ignore[no-untyped-def]
    with world.storage.transaction() as tx:
        count: int = tx.count_login_records()
    return count


@pytest.mark.anyio
async def test_one_failed_login_reaches_the_owners_log_at_the_next_success(tmp_path):
    """NET-6: even a single failure is written into the owner's log, with its count."""
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        with pytest.raises(AuthenticationError):
            await client.login(ALICE, b"wrong")
        session = await client.login(ALICE, PW)
        entries = await session.audit()
    failures = [e for e in entries if e.action is Action.LOGIN and e.outcome is Outcome.FAILURE]
    assert [e.count for e in failures] == [1]


@pytest.mark.anyio
async def test_a_login_logs_its_counted_failures_then_its_success_and_nothing_else(tmp_path):
    """AUD-1, NET-6: the owner's log of logins is each counted kind once (no entry for a kind
    with nothing counted) followed by the login's own success."""
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        with pytest.raises(AuthenticationError):
            await client.login(ALICE, b"wrong")
        first = await client.login(ALICE, PW)
        await client.login(ALICE, PW)
        entries = await first.audit()
    kinds = (Action.LOGIN, Action.LOGIN_THROTTLED)
    logins = [(e.action, e.outcome, e.count) for e in entries if e.action in kinds]
    assert logins == [
        (Action.LOGIN, Outcome.FAILURE, 1),
        (Action.LOGIN, Outcome.SUCCESS, 1),
        (Action.LOGIN, Outcome.SUCCESS, 1),
    ]


@pytest.mark.anyio
async def test_maintain_forgets_stale_records_into_the_owners_log_and_keeps_the_table_under_its_cap(tmp_path):
    """NET-13: over ``max_records`` the table shrinks to 90% of it, oldest failure first; a
    record is forgotten ``forget_after`` seconds after its last failure. What a forgotten
    record counted goes into its owner's log."""
    clock = Clock(1_000_000.0)
    policy = ThrottlePolicy(forget_after=100.0, max_records=10)
    async with key_server(tmp_path, clock=clock, throttle=policy) as world, world.client() as client:
        await client.register(ALICE, PW)
        await client.register(BOB, PW)
        alice = await client.login(ALICE, PW)  # a record with no failure
        with pytest.raises(AuthenticationError):
            await client.login(BOB, b"wrong")
        clock.now += 50.0
        for n in range(13):  # 15 names in all
            with pytest.raises(AuthenticationError):
                await client.login(b"nobody%d" % n, PW)
        await alice.list_keys()  # the server has seen every login end
        assert _records(world) == 15
        # 5 over the cap: down to 9, in batches of at most 4: alice's, bob's, 4 others.
        assert world.keyserver.maintain(batch=4) == 4
        assert world.keyserver.maintain(batch=4) == 2
        assert world.keyserver.maintain(batch=4) == 0
        assert _records(world) == 9
        clock.now += 100.0  # the last failures are exactly 100 s old: not stale yet
        assert world.keyserver.maintain() == 0
        clock.now += 0.00002  # 20 us later they are
        assert world.keyserver.maintain(batch=5) == 5  # a full batch of stale records...
        assert world.keyserver.maintain(batch=5) == 4  # ...then the rest
        assert _records(world) == 0
        bob = await client.login(BOB, PW)
        entries = await bob.audit()
    failures = [e for e in entries if e.action is Action.LOGIN and e.outcome is Outcome.FAILURE]
    assert [e.count for e in failures] == [1]  # written when bob's record was evicted


@pytest.mark.anyio
async def test_a_table_exactly_at_its_cap_is_left_alone(tmp_path):
    policy = ThrottlePolicy(max_records=10)
    async with key_server(tmp_path, throttle=policy) as world, world.client() as client:
        await client.register(ALICE, PW)
        alice = await client.login(ALICE, PW)
        for n in range(9):
            with pytest.raises(AuthenticationError):
                await client.login(b"nobody%d" % n, PW)
        await alice.list_keys()
        assert _records(world) == 10
        assert world.keyserver.maintain() == 1  # alice's record counts no failure: forgotten
        for name in (b"one more", b"two more"):
            with pytest.raises(AuthenticationError):
                await client.login(name, PW)
            await alice.list_keys()
        assert _records(world) == 11
        assert world.keyserver.maintain() == 2  # 11 -> 9
        with pytest.raises(AuthenticationError):
            await client.login(b"three more", PW)
        await alice.list_keys()
        assert _records(world) == 10
        assert world.keyserver.maintain() == 0  # at the cap, not over it


@pytest.mark.anyio
async def test_a_single_throttled_attempt_reaches_the_owners_log(tmp_path):
    clock = Clock(1_000_000.0)
    policy = ThrottlePolicy(threshold=1, base_delay=10.0)
    async with key_server(tmp_path, clock=clock, throttle=policy) as world, world.client() as client:
        await client.register(ALICE, PW)
        with pytest.raises(AuthenticationError):
            await client.login(ALICE, b"wrong")  # locked for 10 s
        with pytest.raises(KeymgmtError):
            await client.login(ALICE, PW)  # refused: throttled
        clock.now += 11.0
        session = await client.login(ALICE, PW)
        entries = await session.audit()
    throttled = [e for e in entries if e.action is Action.LOGIN_THROTTLED]
    assert [(e.outcome, e.count) for e in throttled] == [(Outcome.FAILURE, 1)]


def test_a_login_in_flight_keeps_its_record_for_in_flight_for_and_no_longer(server_setup):
    """NET-10/NET-13: a record whose login has started and not ended is not forgotten while
    the login may still end (``in_flight_for``), however old its last failure."""
    from keymgmt.adapters.server.app import KeyServer
    from keymgmt.adapters.storage.sqlite import SQLiteStorage

    clock = Clock(1_000_000.0)
    storage = SQLiteStorage(":memory:")
    keyserver = KeyServer(
        storage, clock=clock, throttle=ThrottlePolicy(forget_after=100.0, in_flight_for=10.0)
    )
    pair = FakeWorld(server_setup, app=keyserver).pair()
    pair.client.open_request_session(ALICE, PW)  # unknown name: a decoy login, failed
    pair.pump()
    clock.now += 200.0  # that failure is stale now
    pair.client.open_request_session(ALICE, PW)
    pair.to_server(pair.client.data_to_send())  # LOGIN_START arrives; the answer is held
    with storage.transaction() as tx:
        assert tx.count_login_records() == 1
    clock.now += 9.0
    assert keyserver.maintain() == 0  # in flight for 9 s of 10
    clock.now += 1.000005
    assert keyserver.maintain() == 1  # 5 us past: no longer counted as in flight
    storage.close()


def test_a_login_stuck_in_flight_stops_counting_after_in_flight_for(server_setup):
    """NET-10: with threshold 1 a second login for a name waits while one is in flight, but
    a login that never ends stops holding the name after ``in_flight_for``."""
    from keymgmt.adapters.server.app import KeyServer
    from keymgmt.adapters.storage.sqlite import SQLiteStorage
    from keymgmt_proto import (
        ErrorCode,
        SessionFailed,
    )

    clock = Clock(1_000_000.0)
    storage = SQLiteStorage(":memory:")
    keyserver = KeyServer(storage, clock=clock, throttle=ThrottlePolicy(threshold=1, in_flight_for=10.0))
    pair = FakeWorld(server_setup, app=keyserver).pair()
    pair.client.open_request_session(ALICE, PW)
    pair.to_server(pair.client.data_to_send())  # in flight; its answer is held
    pair.server.data_to_send()
    clock.now += 9.99999
    pair.client.open_request_session(ALICE, PW)
    (refused,) = [e for e in pair.pump() if isinstance(e, SessionFailed)]
    assert refused.code is ErrorCode.THROTTLED
    clock.now += 0.000015  # 10 s and 5 us after the first started
    pair.client.open_request_session(ALICE, PW)
    events = pair.pump()
    assert not [e for e in events if isinstance(e, SessionFailed) and e.code is ErrorCode.THROTTLED]
    storage.close()


@pytest.mark.anyio
async def test_a_bug_in_one_operation_costs_one_answer_not_the_session(tmp_path, monkeypatch, caplog):
    """An unexpected exception while answering is logged and answered INTERNAL_ERROR; the
    session goes on. An operation without a handler is answered INVALID."""
    from keymgmt.adapters.server import app as keyserver_module

    def broken(server, op, request):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    handlers = dict(keyserver_module.HANDLERS)
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        monkeypatch.setattr(keyserver_module, "HANDLERS", {**handlers, Op.LIST_KEYS: broken})
        with pytest.raises(RequestRefusedError) as failed, anyio.fail_after(10):  # never a hang
            await session.list_keys()
        assert failed.value.status is Status.INTERNAL_ERROR
        monkeypatch.setattr(
            keyserver_module, "HANDLERS", {k: v for k, v in handlers.items() if k is not Op.LIST_KEYS}
        )
        with pytest.raises(RequestRefusedError) as refused:
            await session.list_keys()
        assert refused.value.status is Status.INVALID
        monkeypatch.setattr(keyserver_module, "HANDLERS", handlers)
        assert await session.list_keys() == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "error while handling RequestReceived"
    ]


@pytest.mark.anyio
async def test_a_user_id_already_taken_is_drawn_again(tmp_path):
    """REG-2: a new account never gets an existing account's user id."""
    queue: list[bytes] = []

    def random(n: int) -> bytes:
        return queue.pop(0) if queue and n == 16 else os.urandom(n)

    async with key_server(tmp_path, random=random) as world, world.client() as client:
        alice = await client.register(ALICE, PW)
        queue.append(alice)  # the first draw for bob collides with alice's id
        bob = await client.register(BOB, PW)
    assert len(bob) == 16 and bob != alice and not queue


def test_of_two_registrations_racing_for_one_name_only_the_first_completes(server_setup):
    """Both pass the name check at REG_START; the second's COMPLETE_REGISTRATION finds the name
    taken and is refused (ACCOUNT_EXISTS), never confirmed."""
    from keymgmt.adapters.server.app import KeyServer
    from keymgmt.adapters.storage.sqlite import SQLiteStorage
    from keymgmt_proto import (
        ErrorCode,
        RegistrationSucceeded,
        SessionFailed,
    )

    storage = SQLiteStorage(":memory:")
    pair = FakeWorld(server_setup, app=KeyServer(storage)).pair()
    pair.client.open_registration(ALICE, PW)
    pair.client.open_registration(ALICE, PW)
    events = pair.pump()
    assert len([e for e in events if isinstance(e, RegistrationSucceeded)]) == 1
    (refused,) = [e for e in events if isinstance(e, SessionFailed)]
    assert refused.code is ErrorCode.ACCOUNT_EXISTS
    storage.close()


def test_a_key_id_reserved_before_a_resumption_can_be_stored_after_it(server_setup):
    """Reservations follow the session's handle, not its connection: a CREATE_KEY_ID answered
    on one connection is honoured by STORE_SECRET on the connection the session resumed on."""
    from keymgmt.adapters.server.app import KeyServer
    from keymgmt.adapters.storage.sqlite import SQLiteStorage
    from keymgmt_proto import KeyIdResponse, ResponseReceived, decode_response

    from ..support.fake_pairs import lose
    from ..support.helpers import login, only, register

    storage = SQLiteStorage(":memory:")
    world = FakeWorld(server_setup, app=KeyServer(storage))
    pair = world.pair()
    register(pair, ALICE, PW)
    established = login(pair, ALICE, PW)
    user_id = established.user_id
    body = CreateKeyIdRequest(user_id, SecretKind.GENERATED, bytes(32)).encode()
    pair.client.send_request(established.session_id, body)
    status, reply = decode_response(Op.CREATE_KEY_ID, only(pair.pump(), ResponseReceived).body)
    assert status is Status.OK and isinstance(reply, KeyIdResponse)
    (detached,) = lose(pair)
    pair2 = world.pair()
    sid = pair2.client.resume_session(detached)
    pair2.pump()
    store = StoreSecretRequest(user_id, reply.key_id, SecretKind.GENERATED, bytes(60)).encode()
    pair2.client.send_request(sid, store)
    status, _ = decode_response(Op.STORE_SECRET, only(pair2.pump(), ResponseReceived).body)
    assert status is Status.OK
    storage.close()


def test_a_session_refused_before_it_existed_is_handled_without_error(server_setup, caplog):
    """A session start refused before the core made a session (rate limited, malformed) is a
    SessionFailed with no handle: the key server has nothing to forget and logs no error."""
    import logging

    from keymgmt.adapters.server.app import KeyServer
    from keymgmt.adapters.storage.sqlite import SQLiteStorage
    from keymgmt_proto import ErrorCode, SessionFailed

    storage = SQLiteStorage(":memory:")
    keyserver = KeyServer(storage)
    pair = FakeWorld(server_setup, app=keyserver).pair()
    with caplog.at_level(logging.DEBUG, logger="keymgmt"):
        keyserver(pair.server, SessionFailed(1, ErrorCode.RATE_LIMITED, "slow down", True))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    storage.close()


def test_a_key_server_batch_commits_when_it_ends_and_rolls_back_when_it_raises(tmp_path):
    """KeyServer.batch (a class since the login path was trimmed): what the block wrote is
    committed when it ends normally, rolled back when it raises (the exception goes on), a
    nested batch is part of the outer one, and a failed login queued inside is written in
    the outer batch's commit and leaves the queue only then."""
    from keymgmt.adapters.server.app import KeyServer
    from keymgmt.adapters.storage.base import Account
    from keymgmt.adapters.storage.sqlite import SQLiteStorage

    storage = SQLiteStorage(tmp_path / "k.db")
    keyserver = KeyServer(storage)

    def account(name: bytes) -> Account:
        return Account(name, os.urandom(16), bytes(192), bytes(60), 1, 0)

    with keyserver.batch():
        with keyserver.batch(), storage.transaction() as tx:  # nested: the same transaction
            assert tx.insert_account(account(b"kept"))
        keyserver._failures.append((b"kept", 5))  # a failed login to count in this commit
    assert keyserver._failures == []
    with pytest.raises(RuntimeError, match="boom"), keyserver.batch():
        with storage.transaction() as tx:
            assert tx.insert_account(account(b"dropped"))
        keyserver._failures.append((b"kept", 6))
        raise RuntimeError("boom")
    assert keyserver._failures == [(b"kept", 6)]  # not committed: still queued
    with storage.transaction() as tx:
        assert tx.get_account(b"kept") is not None
        assert tx.get_account(b"dropped") is None
        record = tx.get_login_record(b"kept")
    assert record is not None and record.failures == 1  # the first queued failure only
    with keyserver.batch():
        pass
    assert keyserver._failures == []
    with storage.transaction() as tx:
        record = tx.get_login_record(b"kept")
    assert record is not None and record.failures == 2
    storage.close()


def test_a_sessions_reservations_go_through_its_sealed_state_and_nothing_else_does(tmp_path):
    """KeyServer.export_session / import_session (SessionAppState, protocol.md section 13):
    the reservations come back under the claimed session's new handle, in order, at most
    16; bytes that do not parse as ``key_id 16 || kind u8`` give no reservation."""
    from collections import OrderedDict

    from keymgmt.adapters.server.app import MAX_RESERVED_KEY_IDS, KeyServer
    from keymgmt.adapters.storage.sqlite import SQLiteStorage
    from keymgmt_proto import SessionHandle

    storage = SQLiteStorage(tmp_path / "ks.db")
    keyserver = KeyServer(storage)
    old, new = SessionHandle(), SessionHandle()
    assert keyserver.export_session(old) == b""  # nothing reserved: nothing sealed
    held = OrderedDict(
        (bytes([i]) * 16, SecretKind.GENERATED if i % 2 else SecretKind.IMPORTED) for i in range(1, 4)
    )
    keyserver._reserved[old] = held
    sealed = keyserver.export_session(old)
    assert sealed == b"".join(key_id + bytes([kind]) for key_id, kind in held.items())
    keyserver.import_session(new, sealed)
    assert list(keyserver._reserved[new].items()) == list(held.items())
    # An unknown kind drops that entry; a cut-off tail is left out; nothing parses: no entry.
    other = SessionHandle()
    keyserver.import_session(
        other, b"\x07" * 16 + b"\x09" + b"\x08" * 16 + bytes([SecretKind.IMPORTED]) + b"\x01"
    )
    assert list(keyserver._reserved[other].items()) == [(b"\x08" * 16, SecretKind.IMPORTED)]
    nothing = SessionHandle()
    keyserver.import_session(nothing, b"\x00" * 16)
    assert nothing not in keyserver._reserved
    # More than a session may hold (a blob from a server with a larger limit): the newest 16.
    many = b"".join(bytes([i]) * 16 + bytes([SecretKind.GENERATED]) for i in range(20))
    bounded = SessionHandle()
    keyserver.import_session(bounded, many)
    assert list(keyserver._reserved[bounded]) == [bytes([i]) * 16 for i in range(4, 20)]
    assert len(keyserver._reserved[bounded]) == MAX_RESERVED_KEY_IDS
    storage.close()
