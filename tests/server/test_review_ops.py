"""Regression tests from the review of the operations layer."""

from __future__ import annotations

import os

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.server.driver import serve_stream
from keymgmt.adapters.storage.base import Account, AuditQuery, AuditRecord, SecretRecord, StorageError
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt.adapters.testing.streams import memory_stream_pair
from keymgmt_proto import (
    Action,
    AuditType,
    CreateKeyIdRequest,
    FrameType,
    KeyIdResponse,
    Op,
    Outcome,
    SecretKind,
    ServerConnection,
    SessionHandle,
    Status,
    StoreSecretRequest,
    seal_secret,
    secret_ad,
)

from ..support.frames import frame_type, split_frames
from ..support.keyserver_world import SETUP, key_server

ALICE, BOB = b"alice@example.org", b"bob@example.org"
PW = b"correct horse battery staple"


@pytest.mark.anyio
async def test_logout_of_one_session_does_not_cancel_another_sessions_key_reservation(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        first = await client.login(ALICE, PW)
        second = await client.login(ALICE, PW)
        storage_key = await second._get_storage_key()
        reply = await second._call(CreateKeyIdRequest(second.user_id, SecretKind.GENERATED, bytes(32)))
        assert isinstance(reply, KeyIdResponse)
        await first.logout()  # NET-3: must not disturb `second`
        ad = secret_ad(second.user_id, reply.key_id, SecretKind.GENERATED)
        sealed = seal_secret(storage_key, bytes(32), ad, os.urandom)
        await second._call(StoreSecretRequest(second.user_id, reply.key_id, SecretKind.GENERATED, sealed))


def _server_with_account(tmp_path):
    storage = SQLiteStorage(tmp_path / "ks.db")
    server = KeyServer(storage)
    user_id = bytes(range(16))
    with storage.transaction() as tx:
        tx.insert_account(Account(ALICE, user_id, bytes(192), bytes(60), 0))
    return storage, server, user_id


def test_malformed_store_requests_are_audited(tmp_path):
    storage, server, user_id = _server_with_account(tmp_path)
    body = bytes([Op.STORE_SECRET]) + user_id + b"junk"
    assert server.answer(SessionHandle(), user_id, body) == bytes([Status.INVALID])
    with storage.transaction() as tx:
        entries, _ = tx.query_audit(user_id, AuditQuery(AuditType.ALL))
    assert [(e.action, e.outcome) for e in entries] in (
        [(Action.GENERATE, Outcome.FAILURE)],
        [(Action.IMPORT, Outcome.FAILURE)],
    )


def _login_reply_frames(tmp_path, account_name):
    from keymgmt_proto import NEED_DATA, ClientConnection, SessionRegistry

    storage = SQLiteStorage(tmp_path / "ks9.db")
    server_app = KeyServer(storage)
    client = ClientConnection(os.urandom)
    server = ServerConnection(SETUP, os.urandom, registry=SessionRegistry(), now=0.0)
    client.open_request_session(account_name, PW)
    server.receive_data(client.data_to_send(), 0.0)
    while (event := server.next_event()) is not NEED_DATA:
        server_app(server, event)
    return [frame_type(f) for f in split_frames(server.data_to_send())]


def test_unknown_account_gets_the_same_reply_shape_as_a_known_one(tmp_path):
    # NET-9: an unknown account must run OPAQUE against a decoy record, so the
    # first reply is a LOGIN_RESPONSE exactly as for a registered account.
    assert _login_reply_frames(tmp_path, b"nobody@example.org") == [FrameType.LOGIN_RESPONSE]


@pytest.mark.anyio
async def test_repeated_failed_logins_are_throttled(tmp_path):
    from keymgmt.adapters.client.async_client import AuthenticationError, ThrottledError

    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        outcomes = []
        for _ in range(30):
            try:
                await client.login(ALICE, b"wrong")
            except AuthenticationError:
                outcomes.append("auth")
            except ThrottledError:
                outcomes.append("throttled")
        assert outcomes[:5] == ["auth"] * 5  # the default threshold
        assert "throttled" in outcomes  # NET-10


@pytest.mark.anyio
async def test_list_keys_of_a_user_with_many_keys_is_a_clear_answer(tmp_path):
    from keymgmt.adapters.client.async_client import KeymgmtError

    async with key_server(tmp_path) as world, world.client() as client:
        user_id = await client.register(ALICE, PW)

        def insert() -> None:
            with world.storage.transaction() as tx:
                for i in range(3000):
                    key_id = i.to_bytes(16, "big")
                    tx.insert_secret(SecretRecord(user_id, key_id, SecretKind.GENERATED, bytes(60), b"", i))

        await world.storage_do(insert)
        session = await client.login(ALICE, PW)
        other = await client.login(ALICE, PW)
        try:
            keys = await session.list_keys()
            assert len(keys) == 3000
        except KeymgmtError:
            pass  # a clear error would also do
        # Either way the connection (and the other session on it) survives.
        assert await other.list_keys() is not None


def test_transaction_rolled_back_by_sqlite_still_raises_storage_error(tmp_path):
    storage = SQLiteStorage(tmp_path / "ks.db")
    fired = []

    def interrupt_once():
        if not fired:
            fired.append(1)
            return 1
        return 0

    with pytest.raises(StorageError), storage.transaction() as tx:
        tx.insert_account(Account(ALICE, bytes(16), bytes(192), bytes(60), 0))
        storage._db.set_progress_handler(interrupt_once, 1)
        tx.append_audit(AuditRecord(bytes(16), Action.REGISTER, 0, Outcome.SUCCESS))
    storage._db.set_progress_handler(None, 1)
    with storage.transaction() as tx:  # and the store is usable afterwards
        assert tx.get_account(ALICE) is None


@pytest.mark.anyio
async def test_audit_entry_ids_do_not_reveal_other_users_activity(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        await client.register(BOB, PW)
        alice = await client.login(ALICE, PW)
        await alice.audit()  # audited at id n
        bob = await client.login(BOB, PW)
        for _ in range(20):
            await bob.list_keys()
        await alice.audit()  # audited at id n + 1 if ids were per user
        audits = [e.entry_id for e in await alice.audit() if e.action is Action.AUDIT]
        gap = audits[1] - audits[0]
        assert gap == 1, f"alice's entry ids jumped by {gap}: bob's activity shows through"


@pytest.mark.anyio
async def test_errors_raised_inside_the_client_block_are_not_wrapped(tmp_path):
    from keymgmt.adapters.client.async_client import NotFoundError

    async with key_server(tmp_path) as world:
        client_end, server_end = memory_stream_pair()
        world.task_group.start_soon(serve_stream, server_end, SETUP, world.keyserver, world.registry)
        with pytest.raises(NotFoundError):
            async with KeymgmtClient(client_end) as client:
                await client.register(ALICE, PW)
                session = await client.login(ALICE, PW)
                await session.retrieve(bytes(16))


class _SlowOnce:
    """Wraps a byte stream; one chosen send blocks for a long time."""

    def __init__(self, inner):
        self.inner = inner
        self.stall = False

    async def send(self, data):
        if self.stall:
            self.stall = False
            await anyio.sleep(0.5)  # cancelled by the caller's deadline
        await self.inner.send(data)

    async def receive(self, max_bytes=65536):
        return await self.inner.receive(max_bytes)

    async def aclose(self):
        await self.inner.aclose()


@pytest.mark.anyio
async def test_a_cancelled_request_does_not_break_the_session(tmp_path):
    async with key_server(tmp_path) as world:
        client_end, server_end = memory_stream_pair()
        world.task_group.start_soon(serve_stream, server_end, SETUP, world.keyserver, world.registry)
        stream = _SlowOnce(client_end)
        async with KeymgmtClient(stream) as client:
            await client.register(ALICE, PW)
            session = await client.login(ALICE, PW)
            await session.list_keys()
            await anyio.sleep(0.05)  # let the reader go idle: the caller's own flush sends
            stream.stall = True
            with anyio.move_on_after(0.05):
                await session.list_keys()  # the caller gives up while the frame is being sent
            with anyio.fail_after(5):
                assert await session.list_keys() == []


def test_a_bit_flipped_or_extended_setup_file_is_a_clear_error(tmp_path):
    from keymgmt.adapters.server.setupfile import (
        SetupFileError,
        create_server_setup_file,
        load_server_setup_file,
    )

    path = tmp_path / "setup.bin"
    create_server_setup_file(path)
    data = path.read_bytes()
    accepted = []
    for i in range(8, len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 1
        path.write_bytes(bytes(flipped))
        try:
            load_server_setup_file(path)
            accepted.append(i)
        except SetupFileError:
            pass
    path.write_bytes(data + b"x")
    with pytest.raises(SetupFileError):
        load_server_setup_file(path)
    assert accepted == []  # CRY-5: corruption must never silently yield another server identity


@pytest.mark.anyio
async def test_expiry_of_a_detached_session_is_audited(tmp_path):
    from keymgmt_proto import ServerConfig

    async with key_server(tmp_path, ServerConfig(idle_timeout=1.5)) as world:
        async with world.client() as client:
            await client.register(ALICE, PW)
            session = await client.login(ALICE, PW)
            await session.list_keys()
            await anyio.aclose_forcefully(client._stream)  # the connection drops (no logout)
            await anyio.sleep(0.05)
        # The connection is gone; the session is detached and expires on the server.
        async with world.client() as client:
            await anyio.sleep(2.5)
            session = await client.login(ALICE, PW)
            actions = [e.action for e in await session.audit()]
        assert Action.SESSION_EXPIRED in actions


@pytest.mark.anyio
async def test_bad_arguments_raise_keymgmt_errors_not_value_errors(tmp_path):
    from keymgmt.adapters.client.async_client import KeymgmtError

    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        with pytest.raises(KeymgmtError):
            await session.delete(b"short")
        with pytest.raises(KeymgmtError):
            await session.audit(key_ids=[b"short"])
        with pytest.raises(KeymgmtError):
            await session.audit(AuditType.SYSTEM_ONLY, key_ids=[bytes(16)])
        with pytest.raises(KeymgmtError):
            await session.audit(after=-1)
