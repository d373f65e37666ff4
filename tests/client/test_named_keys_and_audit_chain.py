"""Issue 16 items 3 and 4 through the Python clients (async and blocking) against a real key
server over SQLite: named keys whose labels the server cannot read, and an audit log the
client verifies (every kind of tampering refused)."""

from __future__ import annotations

import os

import pytest
from anyio.from_thread import start_blocking_portal

from keymgmt.adapters.client.async_client import (
    IntegrityError,
    KeymgmtError,
    LabelConflictError,
    NotFoundError,
)
from keymgmt.adapters.client.localstore import LocalStore
from keymgmt.adapters.client.sync_client import SyncKeymgmtClient
from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.server.driver import serve_stream
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt.adapters.testing.streams import memory_stream_pair
from keymgmt_proto import (
    Action,
    AuditEntry,
    AuditType,
    Context,
    Op,
    Outcome,
    RenameKeyRequest,
    ServerSetup,
    SessionRegistry,
    audit_chain_hash,
    seal_label,
)

from ..support.keyserver_world import key_server

pytestmark = pytest.mark.anyio

ALICE = b"alice@example.org"
PW = b"correct horse battery staple"


def _labels(db: SQLiteStorage) -> dict[bytes, bytes | None]:
    # (SQLite keeps labels in a table of their own: key_labels, schema 10)
    return dict(
        db._db.execute(
            "SELECT key_id, key_labels.label FROM secrets LEFT JOIN key_labels USING (key_id)"
        ).fetchall()
    )


async def test_named_keys_round_trip_and_the_server_stores_only_ciphertext(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        backup = await session.generate(label="backup key")
        document = await session.import_secret(b"\x05hello", label="Schlüssel für das Archiv")
        plain = await session.generate()
        listed = {k.key_id: (k.label, k.label_tampered) for k in await session.list_keys()}
        assert listed == {
            backup: ("backup key", False),
            document: ("Schlüssel für das Archiv", False),
            plain: (None, False),
        }
        assert await session.resolve("backup key") == backup
        assert await session.export(await session.resolve("Schlüssel für das Archiv")) == b"\x05hello"

        # Blind server: only ciphertext, nothing readable, and not even the label's length: both
        # labels (10 and 26 bytes) are padded to 32 before sealing (review of issue 16, gap 8).
        stored = await world.storage_do(lambda: _labels(world.storage))
        assert stored[plain] is None
        assert len(stored[backup]) == len(stored[document]) == 32 + 28
        assert b"backup" not in stored[backup] and b"Archiv" not in stored[document]

        await session.rename(backup, "main key")
        assert await session.resolve("main key") == backup
        with pytest.raises(NotFoundError, match="no key is labelled 'backup key'"):
            await session.resolve("backup key")
        with pytest.raises(LabelConflictError, match="already labelled 'main key'"):
            await session.rename(plain, "main key")
        with pytest.raises(LabelConflictError):  # refused before anything is stored
            await session.generate(label="main key")
        assert len(await session.list_keys()) == 3
        assert await session.rename(backup, "main key") is True  # its own label again: fine
        assert await session.rename(backup, None) is True  # it had one
        assert {k.key_id: k.label for k in await session.list_keys()}[backup] is None
        assert await session.rename(backup, None) is False  # none left: nothing sent (gap 6)
        with pytest.raises(NotFoundError):
            await session.rename(os.urandom(16), "nothing")
        for bad in ("", "x" * 65, "two\nlines", " padded", "00112233445566778899aabbccddeeff"):
            with pytest.raises(KeymgmtError, match="invalid argument"):
                await session.rename(plain, bad)
        actions = [(e.action, e.outcome) for e in await session.audit(AuditType.KEY_ONLY)]
        assert actions.count((Action.RENAME_KEY, Outcome.SUCCESS)) == 5  # 2 at store, 3 renames
        assert (Action.RENAME_KEY, Outcome.FAILURE) in actions  # the unknown key


async def test_a_tampered_or_moved_label_is_shown_as_tampered_and_names_nothing(tmp_path):
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        first = await session.generate(label="first")
        second = await session.generate(label="second")
        third = await session.generate(label="third")

        def tamper() -> None:
            db = world.storage._db
            sealed = db.execute("SELECT label FROM key_labels WHERE key_id = ?", (first,)).fetchone()[0]
            flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
            db.execute("UPDATE key_labels SET label = ? WHERE key_id = ?", (flipped, first))
            # moved: the second key's sealed label put on the third (its AD names the second)
            moved = db.execute("SELECT label FROM key_labels WHERE key_id = ?", (second,)).fetchone()[0]
            db.execute("UPDATE key_labels SET label = ? WHERE key_id = ?", (moved, third))

        await world.storage_do(tamper)
        keys = {k.key_id: k for k in await session.list_keys()}
        assert keys[first].label_tampered and keys[first].label is None
        assert keys[third].label_tampered and keys[third].label is None
        assert keys[second].label == "second" and not keys[second].label_tampered
        assert await session.resolve("second") == second  # the moved copy names nothing
        with pytest.raises(NotFoundError):
            await session.resolve("first")
        assert await session.retrieve(first, Context.NULL) is None  # still usable by id
        await session.rename(first, "first again")  # and a new label repairs it
        assert await session.resolve("first again") == first


async def test_a_stored_label_that_is_no_sealed_label_is_listed_as_tampered(tmp_path, caplog):
    """Review of issue 16, gap 3: a label column holding something no sealed label can be (a
    wrong length, too long for the wire, text or a number: an altered or damaged database)
    made LIST_KEYS an internal error, so no key could be listed or named. The key server now
    lists such a key with a sealed label that never opens: the client shows it tampered and
    every other key as usual."""
    import logging

    caplog.set_level(logging.WARNING, logger="keymgmt")
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        good = await session.generate(label="good")
        broken = {value: await session.generate(label=f"broken {n}") for n, value in enumerate(
            (b"short", bytes(93), bytes(300), "text", 7)
        )}  # fmt: skip

        def damage() -> None:
            for value, key_id in broken.items():
                world.storage._db.execute("UPDATE secrets SET label = ? WHERE key_id = ?", (value, key_id))

        await world.storage_do(damage)
        keys = {k.key_id: k for k in await session.list_keys()}
        assert set(keys) == {good, *broken.values()}
        assert keys[good].label == "good" and not keys[good].label_tampered
        for key_id in broken.values():
            assert keys[key_id].label_tampered and keys[key_id].label is None
        assert await session.resolve("good") == good  # naming keys still works
        with pytest.raises(NotFoundError):
            await session.resolve("broken 0")
        await session.rename(broken[b"short"], "repaired")  # and a new label repairs one
        assert await session.resolve("repaired") == broken[b"short"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, caplog.text
    warned = [r.getMessage() for r in caplog.records if "not a sealed label" in r.getMessage()]
    assert warned  # the operator hears of it


async def test_labels_are_padded_and_old_unpadded_ones_still_open(tmp_path):
    """Review of issue 16, gap 8: a sealed label's length gave away the label's length. Labels
    are now padded with zero bytes to 32 or 64 before sealing, so the key server sees 60 or 92
    bytes; a label sealed unpadded by a client of the release before opens as it did, and a
    rename seals it afresh, padded."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from keymgmt_proto import label_ad

    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        lengths = {}
        for label in ("a", "x" * 32, "y" * 33, "z" * 64):
            key_id = await session.generate(label=label)
            lengths[label] = len((await world.storage_do(lambda: _labels(world.storage)))[key_id])
        assert lengths == {"a": 60, "x" * 32: 60, "y" * 33: 92, "z" * 64: 92}

        old = await session.generate()
        storage_key = await session._get_storage_key()
        nonce = os.urandom(12)
        unpadded = nonce + ChaCha20Poly1305(storage_key).encrypt(
            nonce, b"old style", label_ad(session.user_id, old)
        )
        await session._call(RenameKeyRequest(session.user_id, old, unpadded))  # as the older client did
        assert len((await world.storage_do(lambda: _labels(world.storage)))[old]) == len(b"old style") + 28
        listed = {k.key_id: (k.label, k.label_tampered) for k in await session.list_keys()}
        assert listed[old] == ("old style", False)
        assert await session.resolve("old style") == old
        await session.rename(old, "old style")  # the same label again: now padded
        assert len((await world.storage_do(lambda: _labels(world.storage)))[old]) == 60
        assert await session.resolve("old style") == old


async def test_a_label_two_keys_share_is_ambiguous(tmp_path):
    """Two devices naming keys at once can both pass the uniqueness check: the label then
    names nothing until one is renamed."""
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        first = await session.generate(label="shared")
        second = await session.generate()
        storage_key = await session._get_storage_key()
        sealed = seal_label(storage_key, session.user_id, second, "shared", os.urandom)
        await session._call(RenameKeyRequest(session.user_id, second, sealed))  # (as another device)
        with pytest.raises(LabelConflictError, match="names 2 keys"):
            await session.resolve("shared")
        await session.rename(second, "other")
        assert await session.resolve("shared") == first


async def test_a_label_is_one_label_however_its_accents_were_typed(tmp_path):
    """Review of issue 16: labels were compared code point by code point, so 'café' typed as
    one code point (NFC, most keyboards) and as 'e' and a combining accent (NFD, as some
    systems enter it) were two labels: a second key could take the label the first one
    shows, and naming it found whichever matched the bytes typed, another device's choice.
    They are compared in NFC now (each is still sealed as given)."""
    composed, decomposed = "caf\u00e9 key", "cafe\u0301 key"
    assert composed != decomposed
    async with key_server(tmp_path) as world, world.client() as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        first = await session.generate(label=composed)
        with pytest.raises(LabelConflictError, match="already labelled"):
            await session.generate(label=decomposed)
        assert len(await session.list_keys()) == 1  # refused before anything was stored
        second = await session.generate()
        with pytest.raises(LabelConflictError, match="already labelled"):
            await session.rename(second, decomposed)
        assert await session.resolve(decomposed) == first
        assert await session.rename(first, decomposed)  # the key's own label: no conflict
        assert [k.label for k in await session.list_keys() if k.key_id == first] == [decomposed]
        assert await session.resolve(composed) == first
        # Two such labels on two keys (two devices at once) are ambiguous, as equal ones are.
        storage_key = await session._get_storage_key()
        sealed = seal_label(storage_key, session.user_id, second, composed, os.urandom)
        await session._call(RenameKeyRequest(session.user_id, second, sealed))
        with pytest.raises(LabelConflictError, match="names 2 keys"):
            await session.resolve(composed)


# --- the audit chain -------------------------------------------------------------------------


def _remove(storage: SQLiteStorage) -> None:
    storage._db.execute("DELETE FROM audit WHERE seq = 3")


def _change(storage: SQLiteStorage) -> None:
    storage._db.execute("UPDATE audit SET timestamp_us = timestamp_us + 1 WHERE seq = 3")


def _reorder(storage: SQLiteStorage) -> None:
    """Entries 3 and 4 swap places, each with its own hash."""
    db = storage._db
    db.execute("UPDATE audit SET seq = -1 WHERE seq = 3")
    db.execute("UPDATE audit SET seq = 3 WHERE seq = 4")
    db.execute("UPDATE audit SET seq = 4 WHERE seq = -1")


def _fork(storage: SQLiteStorage) -> None:
    """Entry 3 rewritten and every hash from there recomputed: a history that is valid on its
    own, which only the head a client verified before can tell from the real one."""
    db = storage._db
    columns = "seq, action, timestamp_us, outcome, key_id, context, event_count, chain_hash, user_id"
    rows = db.execute(f"SELECT {columns} FROM audit ORDER BY seq").fetchall()
    previous = rows[1][7]
    for seq, action, ts, outcome, key_id, context, count, _, user_id in rows[2:]:
        if seq == 3:
            ts += 1
        entry = AuditEntry(seq, Action(action), ts, Outcome(outcome), key_id, context, count)
        previous = audit_chain_hash(user_id, previous, entry)
        db.execute("UPDATE audit SET timestamp_us = ?, chain_hash = ? WHERE seq = ?", (ts, previous, seq))
    storage.forget_audit_numbers()  # the server goes on from the forked chain


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_remove, "entry 4 follows entry 2"),
        (_change, "entry 3 does not match its hash chain"),
        (_reorder, "entry 3 does not match its hash chain"),
        (_fork, "differs from the one this client verified before"),
    ],
    ids=["entry-removed", "entry-changed", "entries-reordered", "history-forked"],
)
async def test_every_kind_of_audit_tampering_is_an_integrity_error(tmp_path, tamper, message):
    local = LocalStore(tmp_path / "local.db")
    async with key_server(tmp_path) as world, world.client(local_store=local) as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        for _ in range(3):
            await session.generate()
        first = await session.verify_audit()
        assert first.head is not None and first.head.position == len(first.entries) >= 6
        assert session.audit_head() == first.head  # kept in the local store
        again = await session.verify_audit()  # the log grew (the AUDIT entries): it extends
        assert again.head.position > first.head.position
        assert again.entries[: first.head.position] == first.entries
        await world.storage_do(lambda: tamper(world.storage))
        with pytest.raises(IntegrityError, match=message):
            await session.verify_audit()
        assert session.audit_head() == again.head  # a failed walk never moves the head
    local.close()


async def test_a_log_shorter_than_the_verified_head_is_refused(tmp_path):
    local = LocalStore(tmp_path / "local.db")
    async with key_server(tmp_path) as world, world.client(local_store=local) as client:
        await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        await session.generate()
        head = (await session.verify_audit()).head

        def truncate() -> None:
            world.storage._db.execute("DELETE FROM audit WHERE seq >= ?", (head.position - 1,))
            world.storage.forget_audit_numbers()

        await world.storage_do(truncate)
        with pytest.raises(IntegrityError, match=f"differs|before entry {head.position}"):
            await session.verify_audit()
    local.close()


async def test_the_head_survives_the_client_and_a_new_client_checks_against_it(tmp_path):
    """A later run (another client on the same local store) refuses a history forked from
    what the earlier run verified."""
    local_path = tmp_path / "local.db"
    async with key_server(tmp_path) as world:
        local = LocalStore(local_path)
        async with world.client(local_store=local) as client:
            await client.register(ALICE, PW)
            session = await client.login(ALICE, PW)
            for _ in range(2):
                await session.generate()
            head = (await session.verify_audit()).head
            await session.logout()
        local.close()
        await world.storage_do(lambda: _fork(world.storage))
        local = LocalStore(local_path)
        assert local.audit_head(session.user_id) == (head.position, head.hash)
        async with world.client(local_store=local) as client:
            session = await client.login(ALICE, PW)
            with pytest.raises(IntegrityError, match="differs"):
                await session.verify_audit()
        local.close()


def test_sync_client_names_keys_and_verifies_the_audit_log(tmp_path):
    storage = SQLiteStorage(tmp_path / "ks.db")
    keyserver, setup, registry = KeyServer(storage), ServerSetup.generate(), SessionRegistry()
    with start_blocking_portal("asyncio") as portal:
        client_end, server_end = memory_stream_pair()
        portal.start_task_soon(serve_stream, server_end, setup, keyserver, registry)

        async def connect():
            return client_end

        with SyncKeymgmtClient(connect, portal=portal) as client:
            client.register(ALICE, PW)
            session = client.login(ALICE, PW)
            key_id = session.import_secret(b"\x02hi", label="greeting")
            other = session.generate(label="other")
            assert session.resolve("greeting") == key_id
            session.rename(key_id, "hello")
            assert {k.key_id: k.label for k in session.list_keys()} == {key_id: "hello", other: "other"}
            with pytest.raises(LabelConflictError):
                session.rename(other, "hello")
            verified = session.verify_audit()
            assert verified.head is not None and session.audit_head() == verified.head
            assert Action.RENAME_KEY in {e.action for e in verified.entries}
            session.logout()
    storage.close()


def test_rename_is_in_the_operation_table():
    from keymgmt.adapters.cli.client import CLI_COMMANDS
    from keymgmt.adapters.client.async_client import CLIENT_METHODS
    from keymgmt.adapters.server.app import HANDLERS
    from keymgmt_proto import OPERATIONS

    assert OPERATIONS[Op.RENAME_KEY].action is Action.RENAME_KEY and Action.RENAME_KEY.is_key_action
    assert Op.RENAME_KEY in HANDLERS and CLIENT_METHODS[Op.RENAME_KEY] == "rename"
    assert CLI_COMMANDS[Op.RENAME_KEY] == "rename"
