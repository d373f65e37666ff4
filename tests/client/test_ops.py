"""Operations on secrets through the high-level client over SQLite (OPS, KEY-1, AUD, STO)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import anyio
import pytest

from keymgmt.adapters.client.async_client import (
    MAX_PASSWORD_SIZE,
    AuthenticationError,
    IntegrityError,
    KeymgmtError,
    NotFoundError,
    RegistrationError,
    SessionEndedError,
    audit_to_json,
)
from keymgmt.adapters.client.localstore import LocalStore
from keymgmt.adapters.storage.base import SecretRecord
from keymgmt_proto import (
    Action,
    AuditType,
    Context,
    CreateKeyIdRequest,
    ErrorCode,
    Op,
    Outcome,
    RetrieveRequest,
    SecretKind,
    ServerConfig,
    Status,
    StoreSecretRequest,
    decode_response,
    derive_key_id,
    secret_ad,
)

from ..support.keyserver_world import key_server

pytestmark = pytest.mark.anyio

ALICE, BOB = b"alice@example.org", b"bob@example.org"
PW = b"correct horse battery staple"


async def test_a_new_user_does_everything(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        user_id = await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        assert session.user_id == user_id

        generated = await session.generate()
        imported = await session.import_secret(bytes([11]) + b"hello world")
        assert await session.retrieve(generated, Context.NULL) is None
        secret = await session.retrieve(generated, Context.LOCAL_ONLY)
        assert isinstance(secret, bytes) and len(secret) == 32
        assert await session.retrieve(generated, Context.EXPORT) == bytes([32]) + secret
        assert await session.export(imported) == bytes([11]) + b"hello world"

        listed = {info.key_id: info.kind for info in await session.list_keys()}
        assert listed == {generated: SecretKind.GENERATED, imported: SecretKind.IMPORTED}

        await session.delete(generated)
        assert [info.key_id for info in await session.list_keys()] == [imported]
        with pytest.raises(NotFoundError):
            await session.delete(generated)

        everything = await session.audit(AuditType.ALL)
        keys_only = await session.audit(AuditType.KEY_ONLY)
        one_key = await session.audit(AuditType.KEY_ONLY, key_ids=[imported])
        assert {e.action for e in keys_only} <= {a for a in Action if a.is_key_action}
        assert all(e.key_id == imported for e in one_key) and one_key
        assert len(everything) > len(keys_only) > len(one_key)
        document = json.loads(audit_to_json(everything, user_id))
        assert document["format"] == "keymgmt-audit-v3"
        assert document["entries"][0]["action"] == "register"
        assert {e["actor"] for e in document["entries"]} == {user_id.hex()}

        await session.logout()
        with pytest.raises(KeymgmtError):
            await session.list_keys()


async def test_state_survives_reopening_the_database_in_a_new_process(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        key_id = await session.generate()
    script = (
        "import sys; from keymgmt.adapters.storage.sqlite import SQLiteStorage\n"
        "from keymgmt.adapters.storage.base import AuditQuery\n"
        "from keymgmt_proto._ops import AuditType\n"
        "s = SQLiteStorage(sys.argv[1])\n"
        "with s.transaction() as tx:\n"
        "    a = tx.get_account(b'alice@example.org')\n"
        "    keys = [k.key_id.hex() for k in tx.list_keys(a.user_id, 0, 100)[0]]\n"
        "    entries, _ = tx.query_audit(a.user_id, AuditQuery(AuditType.ALL))\n"
        "print(a.user_id.hex(), ','.join(keys), ','.join(e.action.name for e in entries))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "keyserver.db")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] == session.user_id.hex()
    assert out[1] == key_id.hex()
    assert out[2].split(",")[:4] == ["REGISTER", "LOGIN", "RETRIEVE_STORAGE_KEY", "CREATE_KEY_ID"]
    # And a new server on the same file serves the same account and key.
    async with key_server(tmp_path) as world, world.client() as client:
        session = await client.login(ALICE, PW)
        assert [info.key_id for info in await session.list_keys()] == [key_id]
        assert len(await session.retrieve(key_id, Context.LOCAL_ONLY)) == 32


async def test_another_users_key_looks_exactly_like_a_missing_one(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        await client.register(BOB, PW)
        alice = await client.login(ALICE, PW)
        bob = await client.login(BOB, PW)
        alices_key = await alice.generate()
        missing = derive_key_id(bob.user_id, bytes(32))
        for context in Context:
            theirs = await client.request(
                bob.session_id, RetrieveRequest(bob.user_id, alices_key, context).encode()
            )
            absent = await client.request(
                bob.session_id, RetrieveRequest(bob.user_id, missing, context).encode()
            )
            assert theirs == absent == bytes([Status.NOT_FOUND])
        with pytest.raises(NotFoundError):
            await bob.retrieve(alices_key, Context.LOCAL_ONLY)
        with pytest.raises(NotFoundError):
            await bob.delete(alices_key)
        assert await alice.retrieve(alices_key, Context.NULL) is None


async def test_wrong_user_id_is_refused_and_audited(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        await client.register(BOB, PW)
        alice = await client.login(ALICE, PW)
        bob = await client.login(BOB, PW)
        body = CreateKeyIdRequest(bob.user_id, SecretKind.GENERATED, bytes(32)).encode()
        assert await client.request(alice.session_id, body) == bytes([Status.WRONG_USER])
        refused = [e for e in await alice.audit() if e.outcome is Outcome.FAILURE]
        assert [e.action for e in refused] == [Action.CREATE_KEY_ID]
        assert all(e.action is not Action.CREATE_KEY_ID for e in await bob.audit())


async def test_invalid_context_and_malformed_requests_are_refused(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        alice = await client.login(ALICE, PW)
        key_id = await alice.generate()
        bad_context = RetrieveRequest(alice.user_id, key_id, Context.NULL).encode()[:-1] + b"\x09"
        assert await client.request(alice.session_id, bad_context) == bytes([Status.INVALID])
        assert await client.request(alice.session_id, b"\xee" + alice.user_id) == bytes([Status.INVALID])
        assert await client.request(alice.session_id, b"") == bytes([Status.INVALID])
        failures = [e for e in await alice.audit() if e.outcome is Outcome.FAILURE]
        assert [e.action for e in failures] == [
            Action.RETRIEVE,
            Action.MALFORMED_REQUEST,
            Action.MALFORMED_REQUEST,
        ]
        # The session survives all of it.
        assert await alice.retrieve(key_id, Context.NULL) is None


async def test_oversized_and_mislabelled_secrets_are_refused(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        alice = await client.login(ALICE, PW)
        with pytest.raises(KeymgmtError, match="length byte says 5 but 3"):
            await alice.import_secret(bytes([5]) + b"abc")
        with pytest.raises(KeymgmtError, match=r"1\.\.255 bytes, or the long form"):
            await alice.import_secret(bytes([0]))
        with pytest.raises(KeymgmtError):
            await alice.import_secret(bytes([255]) + bytes(256))
        with pytest.raises(KeymgmtError, match="at most 65536"):
            await alice.import_secret(b"\x00\x01" + (65537).to_bytes(4, "big") + bytes(65537))
        # A raw store of a 65537-byte "secret" does not even parse on the server.
        key_reply = await client.request(
            alice.session_id, CreateKeyIdRequest(alice.user_id, SecretKind.IMPORTED, bytes(32)).encode()
        )
        _, reply = decode_response(Op.CREATE_KEY_ID, key_reply)
        raw = StoreSecretRequest(
            alice.user_id, reply.key_id, SecretKind.IMPORTED, bytes(12 + 255 + 16)
        ).encode()
        oversized = raw[:34] + (12 + 65537 + 16).to_bytes(4, "big") + bytes(12 + 65537 + 16)
        assert await client.request(alice.session_id, oversized) == bytes([Status.INVALID])
        # A key id the server never issued cannot be stored under.
        forged = StoreSecretRequest(alice.user_id, bytes(16), SecretKind.GENERATED, bytes(60)).encode()
        assert await client.request(alice.session_id, forged) == bytes([Status.INVALID])
        assert await alice.list_keys() == []


class _Tampering:
    """Wraps a transaction so that get_secret (and secret_fields, the retrieve's read) returns
    altered data."""

    def __init__(self, inner, mode, other_key=None):
        self._inner, self._mode, self._other = inner, mode, other_key

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def secret_fields(self, user_id, key_id):
        record = self.get_secret(user_id, key_id)
        return None if record is None else (int(record.kind), record.ciphertext, record.associated_data)

    def get_secret(self, user_id, key_id):
        record = self._inner.get_secret(user_id, key_id)
        if record is None:
            return None
        if self._mode == "flip":
            ciphertext = record.ciphertext[:-1] + bytes([record.ciphertext[-1] ^ 1])
            return SecretRecord(
                record.user_id, record.key_id, record.kind, ciphertext, record.associated_data
            )
        swapped = self._inner.get_secret(user_id, self._other)
        if self._mode == "swap":  # another key's ciphertext and AD
            return swapped
        return SecretRecord(  # another key's ciphertext under this key's AD
            record.user_id, record.key_id, record.kind, swapped.ciphertext, record.associated_data
        )


@pytest.mark.parametrize("mode", ["flip", "swap", "swap-keep-ad"])
async def test_client_detects_tampered_or_swapped_ciphertexts(tmp_path, mode):
    async with key_server(tmp_path) as world, world.client(LocalStore(":memory:")) as client:
        await client.register(ALICE, PW)
        alice = await client.login(ALICE, PW)
        target = await alice.generate()
        other = await alice.generate()
        client.local_store.delete(alice.user_id, target)  # force a server round trip
        original = world.storage.transaction

        def tampered(**options):
            context = original(**options)

            class _Wrap:
                def __enter__(self_inner):
                    return _Tampering(context.__enter__(), mode, other)

                def __exit__(self_inner, *exc):
                    return context.__exit__(*exc)

            return _Wrap()

        world.storage.transaction = tampered
        with pytest.raises(IntegrityError):
            await alice.retrieve(target, Context.LOCAL_ONLY)
        world.storage.transaction = original
        assert len(await alice.retrieve(target, Context.LOCAL_ONLY)) == 32


async def test_local_store_first_and_damaged_copies_are_replaced(tmp_path):
    local = LocalStore(tmp_path / "client.db")
    async with key_server(tmp_path) as world, world.client(local) as client:
        await client.register(ALICE, PW)
        alice = await client.login(ALICE, PW)
        key_id = await alice.generate()
        secret = await alice.retrieve(key_id, Context.LOCAL_ONLY)
        retrieves = [e for e in await alice.audit(AuditType.KEY_ONLY) if e.action is Action.RETRIEVE]
        assert retrieves == []  # served from the local store
        record = local.get(alice.user_id, key_id)
        local.put(
            SecretRecord(
                record.user_id,
                record.key_id,
                record.kind,
                bytes(len(record.ciphertext)),
                record.associated_data,
                record.created,
            )
        )
        assert await alice.retrieve(key_id, Context.LOCAL_ONLY) == secret
        assert local.get(alice.user_id, key_id).ciphertext == record.ciphertext
        retrieves = [e for e in await alice.audit(AuditType.KEY_ONLY) if e.action is Action.RETRIEVE]
        assert [(e.key_id, e.context, e.outcome) for e in retrieves] == [
            (key_id, Context.LOCAL_ONLY, Outcome.SUCCESS)
        ]
    # STO-2: the local file holds no plaintext and nothing but ciphertexts.
    raw = (tmp_path / "client.db").read_bytes() + (
        (tmp_path / "client.db-wal").read_bytes() if (tmp_path / "client.db-wal").exists() else b""
    )
    assert secret not in raw
    assert stat.S_IMODE(os.stat(tmp_path / "client.db").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "keyserver.db").st_mode) == 0o600


async def test_a_key_deleted_from_another_device_leaves_this_cache_when_the_server_says_so(tmp_path):
    """Deleting through a client drops its own cached copy; a key deleted through another
    client (another device, another cache) stays readable from this cache until a fetch
    gets "no such key", which drops the entry (issue 15 review, finding 12)."""
    phone, laptop = LocalStore(tmp_path / "phone.db"), LocalStore(tmp_path / "laptop.db")
    async with key_server(tmp_path) as world:
        async with world.client(phone) as client:
            await client.register(ALICE, PW)
            alice = await client.login(ALICE, PW)
            key_id = await alice.generate()
            secret = await alice.retrieve(key_id, Context.LOCAL_ONLY)
        async with world.client(laptop) as client:
            alice = await client.login(ALICE, PW)
            assert await alice.retrieve(key_id, Context.LOCAL_ONLY) == secret  # fetched, now cached
            await alice.delete(key_id)
            assert laptop.get(alice.user_id, key_id) is None  # its own copy went with it
        async with world.client(phone) as client:
            alice = await client.login(ALICE, PW)
            assert await alice.retrieve(key_id, Context.LOCAL_ONLY) == secret  # the cache answers
            record = phone.get(alice.user_id, key_id)
            # A copy that fails to decrypt makes the client ask the server: "no such key".
            phone.put(
                SecretRecord(
                    record.user_id,
                    record.key_id,
                    record.kind,
                    bytes(len(record.ciphertext)),
                    record.associated_data,
                    record.created,
                )
            )
            with pytest.raises(NotFoundError):
                await alice.retrieve(key_id, Context.LOCAL_ONLY)
            assert phone.get(alice.user_id, key_id) is None


async def test_a_password_longer_than_opaque_takes_is_refused_before_sending(tmp_path):
    """OPAQUE takes at most 65535 bytes of password (issue 15 review, finding 11): that
    many work; one more is a clear error before anything is sent, not a session that
    fails as "malformed" after a round trip."""
    longest = b"p" * MAX_PASSWORD_SIZE
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, longest)
        assert await (await client.login(ALICE, longest)).list_keys() == []
        for call in (
            client.register(b"bob@example.org", longest + b"p"),
            client.login(ALICE, longest + b"p"),
        ):
            with pytest.raises(KeymgmtError, match="a password is at most 65535 bytes, not 65536"):
                await call
        await client.register(b"bob@example.org", PW)  # not taken: nothing of the refused one was sent


async def test_requests_after_logout_and_after_expiry_fail_clearly(tmp_path):
    config = ServerConfig(idle_timeout=1.5)  # wide enough for a stalled machine between steps
    async with key_server(tmp_path, config) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        await session.logout()
        with pytest.raises(SessionEndedError, match="logged out") as ended:
            await session.generate()
        assert ended.value.code is ErrorCode.CLIENT_CLOSED
        session = await client.login(ALICE, PW)
        await session.list_keys()
        await anyio.sleep(2.5)
        with pytest.raises(SessionEndedError, match="idle timeout") as expired:
            await session.list_keys()
        assert expired.value.code is ErrorCode.IDLE_TIMEOUT
        expired = [
            e for e in await (await client.login(ALICE, PW)).audit() if e.action is Action.SESSION_EXPIRED
        ]
        assert len(expired) == 1


async def test_login_and_registration_errors(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        with pytest.raises(RegistrationError) as taken:
            await client.register(ALICE, b"other")
        assert taken.value.code is ErrorCode.ACCOUNT_EXISTS
        with pytest.raises(RegistrationError) as invalid:
            await client.register(b" padded ", PW)
        assert invalid.value.code is ErrorCode.INVALID_ACCOUNT_NAME
        with pytest.raises(AuthenticationError):
            await client.login(ALICE, b"wrong")
        with pytest.raises(AuthenticationError):
            await client.login(b"nobody@example.org", PW)
        session = await client.login(ALICE, PW)
        logins = [(e.action, e.outcome) for e in await session.audit(AuditType.SYSTEM_ONLY)]
        assert logins == [
            (Action.REGISTER, Outcome.SUCCESS),
            (Action.LOGIN, Outcome.FAILURE),
            (Action.LOGIN, Outcome.SUCCESS),
        ]


async def test_audit_log_records_every_action_and_filters_exactly(tmp_path):
    clock = [1_000.0]
    async with key_server(tmp_path, clock=lambda: clock[0]) as world, world.client() as client:
        user_id = await client.register(ALICE, PW)  # t=1000
        clock[0] = 2_000.0
        session = await client.login(ALICE, PW)
        first = await session.generate()  # storage key + create id + generate at t=2000
        clock[0] = 3_000.0
        second = await session.import_secret(b"\x03abc")
        client.local_store.delete(user_id, first)
        await session.retrieve(first, Context.EXPORT)
        clock[0] = 4_000.0
        with pytest.raises(NotFoundError):
            await session.retrieve(bytes(16), Context.NULL)
        await session.list_keys()
        await session.delete(second)
        clock[0] = 5_000.0
        entries = await session.audit(AuditType.ALL)
        got = [(e.action, e.outcome, e.key_id, e.context, e.timestamp // 1_000_000) for e in entries]
        S, F = Outcome.SUCCESS, Outcome.FAILURE
        # Each store also reserved the next key id of its kind (audited after it).
        next_generated, next_imported = got[5][2], got[8][2]
        assert next_generated not in (None, first, second) and next_imported not in (None, first, second)
        assert got == [
            (Action.REGISTER, S, None, None, 1000),
            (Action.LOGIN, S, None, None, 2000),
            (Action.RETRIEVE_STORAGE_KEY, S, None, None, 2000),
            (Action.CREATE_KEY_ID, S, first, None, 2000),
            (Action.GENERATE, S, first, None, 2000),
            (Action.CREATE_KEY_ID, S, next_generated, None, 2000),
            (Action.CREATE_KEY_ID, S, second, None, 3000),
            (Action.IMPORT, S, second, None, 3000),
            (Action.CREATE_KEY_ID, S, next_imported, None, 3000),
            (Action.RETRIEVE, S, first, Context.EXPORT, 3000),
            (Action.RETRIEVE, F, bytes(16), Context.NULL, 4000),
            (Action.LIST_KEYS, S, None, None, 4000),
            (Action.DELETE_KEY, S, second, None, 4000),
        ]
        # The audit request itself was audited.
        again = await session.audit(AuditType.SYSTEM_ONLY)
        assert [e.action for e in again] == [
            Action.REGISTER,
            Action.LOGIN,
            Action.RETRIEVE_STORAGE_KEY,
            Action.AUDIT,
        ]
        key_only = await session.audit(AuditType.KEY_ONLY)
        assert [e.action for e in key_only] == [a for (a, *_rest) in got if a.is_key_action]
        by_key = await session.audit(AuditType.KEY_ONLY, key_ids=[first])
        assert [e.action for e in by_key] == [Action.CREATE_KEY_ID, Action.GENERATE, Action.RETRIEVE]
        window = await session.audit(AuditType.ALL, after=2_000_000_000, before=4_000_000_000)
        assert [e.timestamp // 1_000_000 for e in window] == [2000] * 5 + [3000] * 4


async def test_audit_pages_through_long_logs(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        for _ in range(300):
            await session.list_keys()
        entries = await session.audit(AuditType.KEY_ONLY)
        assert len(entries) == 300
        assert len({e.entry_id for e in entries}) == 300


def test_key_id_matches_the_spec_construction():
    import hashlib

    user_id, r = bytes(range(16)), bytes(range(32, 64))
    d = b"keymgmt v1 key id"
    expected = hashlib.sha3_256(
        len(d).to_bytes(2, "big") + d + (16).to_bytes(2, "big") + user_id + (32).to_bytes(2, "big") + r
    ).digest()[:16]
    assert derive_key_id(user_id, r) == expected
    assert secret_ad(user_id, expected, SecretKind.IMPORTED) == user_id + expected + b"imported key"


def test_store_secret_request_rejects_wrong_sizes():
    with pytest.raises(ValueError):
        StoreSecretRequest(bytes(16), bytes(16), SecretKind.GENERATED, bytes(61))
    with pytest.raises(ValueError):
        StoreSecretRequest(bytes(16), bytes(16), SecretKind.IMPORTED, bytes(12 + 65537 + 16))


@pytest.mark.anyio
@pytest.mark.parametrize("lie", ["an id the client holds", "an id not from the client's nonce"])
async def test_a_server_cannot_make_two_stores_share_a_key_id(tmp_path, lie, monkeypatch):
    """KEY-2: a malicious server hands out a key id (the next key id in a STORE_SECRET answer,
    or a CREATE_KEY_ID answer) that is not derived from the client's nonce, or one the client
    already holds (here the client's randomness repeats, and the server replays its own
    earlier nonce so the derivation matches). The client refuses before sealing anything, and
    nothing more is stored."""
    from keymgmt.adapters.client.async_client import IntegrityError
    from keymgmt.adapters.server.app import KeyServer
    from keymgmt_proto import KeyIdResponse, StoredResponse, joint_key_id

    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(b"kim@example.org", PW)
        session = await client.login(b"kim@example.org", PW)
        if lie == "an id the client holds":
            session._ops._random = lambda n: b"\x07" * n if n == 32 else os.urandom(n)  # a broken RNG
        original = KeyServer._perform
        nonces: list[bytes] = []

        def lying(self, op, request):
            response, key_id = original(self, op, request)
            holds = lie == "an id the client holds"
            if isinstance(response, KeyIdResponse):
                nonces.append(response.server_nonce)
                if len(nonces) > 1:
                    forged = joint_key_id(op.user_id, request.client_nonce if holds else bytes(32), nonces[0])
                    response = KeyIdResponse(forged, nonces[0])
                    op.reservations[forged] = request.kind
            elif isinstance(response, StoredResponse) and response.next_key_id is not None:
                forged = joint_key_id(
                    op.user_id, request.next_client_nonce if holds else bytes(32), nonces[0]
                )
                response = StoredResponse(forged, nonces[0])
                op.reservations[forged] = request.next_kind
            return response, key_id

        monkeypatch.setattr(KeyServer, "_perform", lying)
        first = await session.import_secret(b"\x05first")
        with pytest.raises(IntegrityError, match="key id"):
            await session.import_secret(b"\x06second")
        monkeypatch.setattr(KeyServer, "_perform", original)
        assert [k.key_id for k in await session.list_keys()] == [first]
        assert await session.export(first) == b"\x05first"


async def test_after_the_first_store_each_store_is_one_request_and_a_lost_reservation_recovers(tmp_path):
    """Issue 14, item 4, through the real client and key server: the first store of a kind
    asks CREATE_KEY_ID, every later one is a single STORE_SECRET. When the server has lost
    the reservation (in memory only: a restart, or the session resumed on another instance)
    the client asks CREATE_KEY_ID and tries once more, and the secret is stored."""
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        ops: list[Op] = []
        real_request = client.request

        async def counting(session_id, body):
            ops.append(Op(body[0]))
            return await real_request(session_id, body)

        client.request = counting  # type: ignore[method-assign]
        first = await session.import_secret(b"\x03one")
        assert ops == [Op.RETRIEVE_STORAGE_KEY, Op.CREATE_KEY_ID, Op.STORE_SECRET]
        for n in range(5):
            ops.clear()
            await session.import_secret(bytes([1, n]))
            assert ops == [Op.STORE_SECRET]
        world.keyserver._reserved.clear()  # the server forgot every reservation
        ops.clear()
        recovered = await session.import_secret(b"\x05after")
        assert ops == [Op.STORE_SECRET, Op.CREATE_KEY_ID, Op.STORE_SECRET]
        ops.clear()
        await session.import_secret(b"\x04next")
        assert ops == [Op.STORE_SECRET]
        client.local_store.delete(session.user_id, recovered)
        assert await session.export(recovered) == b"\x05after"
        assert len(await session.list_keys()) == 8
        entries = await session.audit(AuditType.KEY_ONLY, key_ids=[first])
        assert [e.action for e in entries] == [Action.CREATE_KEY_ID, Action.IMPORT]
