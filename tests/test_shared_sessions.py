"""Sessions that resume on another server instance through a shared store (NET-2 across instances)."""

from __future__ import annotations

import os
import random

from keymgmt.adapters import InMemoryPair, MemoryServerApp
from keymgmt_proto import (
    ClientConnection,
    ErrorCode,
    ResponseReceived,
    ServerConfig,
    ServerConnection,
    ServerSetup,
    SessionFailed,
    SessionRegistry,
    SessionResumed,
)
from keymgmt_proto._sessionstate import session_sealing_key

from .helpers import login, only, register

SETUP = ServerSetup.generate()


class DictStore:
    """A DetachedSessionStore in a dict (what a database table does for real)."""

    def __init__(self) -> None:
        self.rows: dict[bytes, tuple[bytes, float]] = {}

    def save(self, handle: bytes, sealed_state: bytes, expires_at: float) -> None:
        self.rows[handle] = (sealed_state, expires_at)

    def claim(self, handle: bytes) -> bytes | None:
        row = self.rows.pop(handle, None)
        return None if row is None else row[0]


def _instance(store: DictStore, config: ServerConfig | None = None) -> SessionRegistry:
    return SessionRegistry(
        config, store=store, sealing_key=session_sealing_key(SETUP.to_bytes()), random=os.urandom
    )


def _pair(registry: SessionRegistry, app: MemoryServerApp, now: float = 0.0) -> InMemoryPair:
    server = ServerConnection(SETUP, os.urandom, registry=registry, now=now)
    return InMemoryPair(ClientConnection(os.urandom), server, app, rng=random.Random(1), now=now)


def test_a_session_opened_on_one_instance_resumes_on_another():
    store, app = DictStore(), MemoryServerApp()
    instance_a, instance_b = _instance(store), _instance(store)
    pair = _pair(instance_a, app)
    register(pair, b"traveller")
    sid = login(pair, b"traveller").session_id
    pair.client.send_request(sid, b"first")
    pair.pump()
    in_flight = pair.client.send_request(sid, b"in flight")
    pair.to_server(pair.client.data_to_send())
    pair.server.data_to_send()  # answered on A, but the answer is lost
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    (detached,) = pair.client.take_detached_sessions()
    assert len(store.rows) == 1 and len(instance_a) == 0  # sealed into the store, not kept on A
    ((sealed, _expires),) = store.rows.values()
    assert detached.user_id not in sealed  # sealed, not stored in clear

    other = _pair(instance_b, app)
    new_sid = other.client.resume_session(detached)
    events = other.pump()
    assert only(events, SessionResumed).session_id == new_sid
    assert only(events, ResponseReceived).request_id == in_flight  # from the migrated reply cache
    assert store.rows == {}
    other.client.send_request(new_sid, b"on B")
    assert only(other.pump(), ResponseReceived).body == b"on B"


def test_a_claimed_session_cannot_be_resumed_twice_or_after_it_expired():
    store, app = DictStore(), MemoryServerApp()
    config = ServerConfig(idle_timeout=30)
    instance_a = _instance(store, config)
    pair = _pair(instance_a, app)
    register(pair, b"once")
    login(pair, b"once")
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    (detached,) = pair.client.take_detached_sessions()
    first = _pair(_instance(store, config), app)
    resume_frames = None
    first.client.resume_session(detached)
    resume_frames = first.client.data_to_send()
    first.to_server(resume_frames)
    assert isinstance(first.server_events[-1], SessionResumed)
    # Replaying the same RESUME to a third instance finds nothing to claim.
    third = _pair(_instance(store, config), app)
    third.to_server(resume_frames)
    assert third.server_events[-1].code is ErrorCode.UNKNOWN_SESSION

    # Expiry: detach again, then resume after the idle timeout.
    first.client.connection_lost()
    first.server.connection_lost()
    first.pump()
    (detached,) = first.client.take_detached_sessions()
    late = _pair(_instance(store, config), app, now=31.0)
    late.client.resume_session(detached)
    failed = only(late.pump(), SessionFailed)
    assert failed.code is ErrorCode.UNKNOWN_SESSION


def test_a_forged_resume_does_not_consume_the_stored_session():
    store, app = DictStore(), MemoryServerApp()
    pair = _pair(_instance(store), app)
    register(pair, b"kept")
    login(pair, b"kept")
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    (detached,) = pair.client.take_detached_sessions()
    handle = detached._session.channel.session_handle
    from keymgmt_proto import FrameType

    from .frames import forge

    attacker = _pair(_instance(store), app)
    attacker.to_server(forge(FrameType.RESUME, 1, handle + (3).to_bytes(8, "big") + bytes(16)))
    assert attacker.server_events[-1].code is ErrorCode.UNKNOWN_SESSION
    assert handle in store.rows  # put back
    owner = _pair(_instance(store), app)
    owner.client.resume_session(detached)
    only(owner.pump(), SessionResumed)


def test_a_tampered_store_entry_is_no_session():
    store, app = DictStore(), MemoryServerApp()
    pair = _pair(_instance(store), app)
    register(pair, b"tamper")
    login(pair, b"tamper")
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    (detached,) = pair.client.take_detached_sessions()
    ((handle, (sealed, expires)),) = store.rows.items()
    store.rows[handle] = (sealed[:-1] + bytes([sealed[-1] ^ 1]), expires)
    other = _pair(_instance(store), app)
    other.client.resume_session(detached)
    assert only(other.pump(), SessionFailed).code is ErrorCode.UNKNOWN_SESSION


def test_a_rolled_back_store_entry_never_makes_the_server_reuse_a_sequence_number():
    """An attacker with write access to the store restores an older sealed state: the server
    resumes it, but its sends start at a fresh random offset, so no nonce is used twice."""
    from keymgmt_proto import FrameType
    from keymgmt_proto._messages import Record

    from .frames import frame_type, split_frames

    store, app = DictStore(), MemoryServerApp()
    pair = _pair(_instance(store), app)
    register(pair, b"rollback")
    login(pair, b"rollback")
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    (detached,) = pair.client.take_detached_sessions()
    old_blob = dict(store.rows)

    def resumed_seq(p: InMemoryPair) -> int:
        p.to_server(p.client.data_to_send())
        for frame in split_frames(p.server.data_to_send()):
            if frame_type(frame) is FrameType.RESUMED:
                return Record.decode(frame[10:]).seq
        raise AssertionError("no RESUMED")

    first = _pair(_instance(store), app)
    first.client.resume_session(detached)
    seq_one = resumed_seq(first)
    first.client.connection_lost()
    first.pump()
    (detached,) = first.client.take_detached_sessions()
    store.rows.update(old_blob)  # roll the store back to the older state
    second = _pair(_instance(store), app)
    second.client.resume_session(detached)
    seq_two = resumed_seq(second)
    assert seq_one != seq_two
    assert min(seq_one, seq_two) > 0
