"""Tests for requirement clauses no other test proved, found while writing SPEC_MAPPING.md.

REG-1 (nothing stored for a refused name, through the key server), REG-2 (user_id
redrawn on collision), REG-3 (the server refuses a COMPLETE_REGISTRATION naming
another user_id), KEY-1 (key id redrawn when it exists), NET-11 (the documented
defaults are the code's) and AUD-2 (the documented JSON export is what the code
writes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from keymgmt.adapters import InMemoryPair
from keymgmt.adapters.client.async_client import audit_to_json
from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.storage.base import Account, AuditQuery, SecretRecord
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    Action,
    AuditEntry,
    AuditType,
    ClientConnection,
    Context,
    CreateKeyIdRequest,
    ErrorCode,
    FrameType,
    KeyIdResponse,
    Op,
    Outcome,
    RegistrationCompleted,
    SecretKind,
    ServerConfig,
    ServerConnection,
    SessionFailed,
    SessionHandle,
    Status,
    audit_chain_hash,
    decode_response,
    joint_key_id,
)
from keymgmt_proto.wire import CompleteRegistration, encode_frame

from ..support.frames import frame_type, split_frames
from ..support.helpers import PASSWORD, only, register

ROOT = Path(__file__).resolve().parents[2]


class Scripted:
    """A RandomSource that hands out queued values first, then OS randomness."""

    def __init__(self, *values: bytes) -> None:
        self.queue = list(values)

    def __call__(self, n: int) -> bytes:
        if self.queue:
            value = self.queue.pop(0)
            assert len(value) == n
            return value
        return os.urandom(n)


@pytest.fixture
def storage(tmp_path) -> Iterator[SQLiteStorage]:
    store = SQLiteStorage(tmp_path / "ks.db")
    yield store
    store.close()


def _pair(server_setup, app) -> InMemoryPair:
    return InMemoryPair(
        ClientConnection(os.urandom), ServerConnection(server_setup, os.urandom, now=0.0), app, now=0.0
    )


def test_user_id_is_redrawn_on_collision(server_setup, storage):
    taken, fresh = b"\xaa" * 16, b"\xbb" * 16
    random = Scripted(taken)
    keyserver = KeyServer(storage, random=random)
    assert register(_pair(server_setup, keyserver), b"alice").user_id == taken
    random.queue = [taken, fresh]  # REG-2: the first draw collides with alice's id
    assert register(_pair(server_setup, keyserver), b"bob").user_id == fresh
    with storage.transaction() as tx:
        assert tx.get_account(b"bob").user_id == fresh
        assert tx.get_account(b"alice").user_id == taken


def test_the_user_id_of_a_deleted_account_is_redrawn_until_its_log_is_purged(server_setup, storage):
    """A deleted account's log goes after the deletion (tests/storage/test_audit_purge.py):
    until it is gone its user id counts as taken, so a new account never continues its log
    (numbers, chain) nor reads it."""
    taken, fresh = b"\xaa" * 16, b"\xbb" * 16
    random = Scripted(taken)
    keyserver = KeyServer(storage, random=random)
    assert register(_pair(server_setup, keyserver), b"alice").user_id == taken
    with storage.transaction() as tx:
        assert tx.delete_account(taken, reserved_until=0)
    random.queue = [taken, fresh]  # the deleted account's id, its log still queued
    assert register(_pair(server_setup, keyserver), b"bob").user_id == fresh
    while keyserver.purge_audit_logs() is not None:
        pass
    random.queue = [taken]  # free once the log is gone (and 2**-128 likely anyway)
    assert register(_pair(server_setup, keyserver), b"carol").user_id == taken
    with storage.transaction() as tx:
        entries, _ = tx.query_audit(taken, AuditQuery(AuditType.ALL))
    assert [(e.entry_id, e.action) for e in entries] == [(1, Action.REGISTER)]  # carol's own


def test_key_id_is_redrawn_when_it_exists(server_setup, storage):
    user_id, r1, r2, r3 = bytes(range(16)), b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    client_nonce = b"\x0c" * 32
    with storage.transaction() as tx:
        tx.insert_account(Account(b"alice", user_id, bytes(192), bytes(60), 0))
        existing = joint_key_id(user_id, client_nonce, r1)
        tx.insert_secret(SecretRecord(user_id, existing, SecretKind.GENERATED, bytes(60), b"", 0))
    random = Scripted(r1, r2)
    keyserver = KeyServer(storage, random=random)
    session = SessionHandle()
    body = CreateKeyIdRequest(user_id, SecretKind.GENERATED, client_nonce).encode()

    def create() -> KeyIdResponse:
        status, reply = decode_response(Op.CREATE_KEY_ID, keyserver.answer(session, user_id, body))
        assert status is Status.OK and isinstance(reply, KeyIdResponse)
        return reply

    # r1's key id is stored: KEY-1 redraws the server's contribution.
    assert create() == KeyIdResponse(joint_key_id(user_id, client_nonce, r2), r2)
    random.queue = [r2, r3]
    assert create().key_id == joint_key_id(user_id, client_nonce, r3)  # r2's is reserved: redrawn too


def test_complete_registration_naming_another_user_id_is_refused(server_setup, storage):
    keyserver = KeyServer(storage)
    pair = _pair(server_setup, keyserver)
    sid = pair.client.open_registration(b"mallory", PASSWORD)
    for step in range(3):  # REG_START, REG_UPLOAD + LOGIN_START, LOGIN_FINISH
        pair.to_server(pair.client.data_to_send())
        if step < 2:  # REG_RESPONSE, LOGIN_RESPONSE
            pair.to_client(pair.server.data_to_send())
    (welcome,) = split_frames(pair.server.data_to_send())  # the client never sees it
    assert frame_type(welcome) is FrameType.WELCOME
    channel = pair.client._sessions[sid].channel
    forged = CompleteRegistration(b"\x99" * 16, bytes(60)).encode()
    record = channel.seal(FrameType.COMPLETE_REGISTRATION, forged)
    pair.to_server(encode_frame(FrameType.COMPLETE_REGISTRATION, sid, record.encode()))
    failed = only(pair.server_events, SessionFailed)
    assert failed.code is ErrorCode.INVALID_REQUEST
    assert not any(isinstance(e, RegistrationCompleted) for e in pair.server_events)
    (abort,) = split_frames(pair.server.data_to_send())
    assert frame_type(abort) is FrameType.ABORT
    with storage.transaction() as tx:
        assert tx.get_account(b"mallory") is None


def test_refused_account_names_store_nothing(server_setup, storage):
    keyserver = KeyServer(storage)
    pair = _pair(server_setup, keyserver)
    alice = register(pair, b"alice@example.org")
    for name, code in [
        (b" padded ", ErrorCode.INVALID_ACCOUNT_NAME),
        (b"\xff\xfe", ErrorCode.INVALID_ACCOUNT_NAME),
        (b"alice@example.org", ErrorCode.ACCOUNT_EXISTS),
    ]:
        pair.client.open_registration(name, b"another password")
        assert only(pair.pump(), SessionFailed).code is code
        with storage.transaction() as tx:
            account = tx.get_account(name)
            assert account is None or account.user_id == alice.user_id
    with storage.transaction() as tx:
        entries, _ = tx.query_audit(alice.user_id, AuditQuery(AuditType.ALL))
        assert [e.action for e in entries] == [Action.REGISTER]


def _section(text: str, start: str, end: str | None = None) -> str:
    begin = text.index(start)
    return text[begin : text.index(end, begin) if end else len(text)]


def test_server_policy_defaults_are_documented():
    section = _section((ROOT / "docs" / "protocol.md").read_text(), "## 10.", "## 11.")
    documented = dict(re.findall(r"^\| `(\w+)` \| ([\d.]+) \|", section, re.MULTILINE))
    defaults = ServerConfig()
    assert set(documented) == set(ServerConfig.__dataclass_fields__)
    for name, value in documented.items():
        assert float(value) == getattr(defaults, name), name
    readme = (ROOT / "README.md").read_text()
    assert "| `max_requests_per_session` | 1000 |" in readme


def test_audit_export_matches_the_documented_json():
    section = _section((ROOT / "docs" / "protocol.md").read_text(), "### 12.12")
    documented = json.loads(re.findall(r"```json\n(.*?)```", section, re.DOTALL)[-1])
    key_id = bytes.fromhex("b384814defc6f1621eb98517fda2ccd8")
    actor = bytes.fromhex("11" * 16)
    entries = [
        AuditEntry(7, Action.RETRIEVE, 1700000000123456, Outcome.SUCCESS, key_id, Context.EXPORT),
        AuditEntry(8, Action.AUDIT, 1700000000200000, Outcome.SUCCESS),
    ]
    previous = b"\x33" * 32  # entry 6's hash, as the section says
    for n, entry in enumerate(entries):
        previous = audit_chain_hash(actor, previous, entry)
        entries[n] = dataclasses.replace(entry, chain_hash=previous)
    assert json.loads(audit_to_json(entries, actor)) == documented
