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
    SessionHandle,
    SessionRegistry,
    SessionResumed,
    session_sealing_key,
)

from ..support.helpers import login, only, register

SETUP = ServerSetup.generate()


class DictStore:
    """A DetachedSessionStore in a dict (what a database table does for real)."""

    def __init__(self) -> None:
        self.rows: dict[bytes, tuple[bytes, float]] = {}

    def save(
        self,
        handle: bytes,
        sealed_state: bytes,
        expires_at: float,
        user_id: bytes | None = None,
        credentials_version: int | None = None,
    ) -> None:
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

    from ..support.frames import forge

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


class _SealLog:
    """Records the (key, iv, seq) of every record the server seals, to prove none repeats."""

    def __init__(self, monkeypatch) -> None:
        from keymgmt_proto import Channel

        self.used: list[tuple[bytes, int, int]] = []
        original = Channel.seal_payload  # every record the server seals goes through it

        def seal(channel, frame_type, plaintext):
            if not channel._is_client:
                self.used.append((channel._send_key, channel._send_iv, channel.send_seq))
            return original(channel, frame_type, plaintext)

        monkeypatch.setattr(Channel, "seal_payload", seal)


def _lost(pair: InMemoryPair):
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    return pair.client.take_detached_sessions()


def test_a_rolled_back_store_entry_is_refused_when_the_client_has_seen_more(monkeypatch):
    """NET-14: an attacker who can write the store restores an older sealed state. The
    client's RESUME says how many records it has received; the old state sent fewer, so the
    server refuses (UNKNOWN_SESSION, the client logs in again) and drops the stale state.
    No record was ever sealed twice under one key and nonce."""
    seals = _SealLog(monkeypatch)
    store, app = DictStore(), MemoryServerApp()
    pair = _pair(_instance(store), app)
    register(pair, b"rollback")
    sid = login(pair, b"rollback").session_id
    (detached,) = _lost(pair)
    old_rows = dict(store.rows)  # the state after WELCOME only
    second = _pair(_instance(store), app)
    sid = second.client.resume_session(detached)
    second.pump()
    second.client.send_request(sid, b"seen by the client")
    only(second.pump(), ResponseReceived)
    (detached,) = _lost(second)
    store.rows.update(old_rows)  # roll back
    third = _pair(_instance(store), app)
    third.client.resume_session(detached)
    assert only(third.pump(), SessionFailed).code is ErrorCode.UNKNOWN_SESSION
    assert not store.rows  # the stale state is gone, not put back
    assert len(seals.used) == len(set(seals.used)) >= 4


def test_a_rollback_the_client_cannot_see_still_never_reuses_a_nonce(monkeypatch):
    """A rolled-back state that matches what the client has received (here: a RESUMED that
    was sealed and lost) is resumed; the server's fresh nonce puts the session in a key
    epoch of its own, so the second RESUMED, sealed at seq 0 again, uses new keys."""
    seals = _SealLog(monkeypatch)
    store, app = DictStore(), MemoryServerApp()
    pair = _pair(_instance(store), app)
    register(pair, b"unseen")
    login(pair, b"unseen")
    (detached,) = _lost(pair)
    old_rows = dict(store.rows)
    second = _pair(_instance(store), app)
    second.client.resume_session(detached)
    captured_resume = second.client.data_to_send()
    second.to_server(captured_resume)
    assert second.server.data_to_send()  # RESUMED sealed (seq 0 of a new epoch), then lost
    (detached,) = _lost(second)
    # Someone who saw the RESUME inside TLS and can write the store replays both: the same
    # client nonce, but the server's own fresh nonce still gives the replay an epoch of its own.
    store.rows.update(old_rows)
    replayer = _pair(_instance(store), app)
    replayer.to_server(captured_resume)
    assert isinstance(replayer.server_events[-1], SessionResumed)
    _lost(replayer)
    store.rows.update(old_rows)
    third = _pair(_instance(store), app)
    sid = third.client.resume_session(detached)
    only(third.pump(), SessionResumed)
    third.client.send_request(sid, b"works")
    assert only(third.pump(), ResponseReceived).body == b"works"
    assert len(seals.used) == len(set(seals.used))
    assert [seq for _, _, seq in seals.used].count(0) >= 4  # WELCOME and three RESUMEDs, all at 0


def test_a_session_attached_to_a_crashed_instance_cannot_be_resumed_elsewhere():
    """Deviation 14: a session lives in the shared store only while detached. An instance that
    dies without detaching (SIGKILL) takes its attached sessions with it: another instance
    answers UNKNOWN_SESSION, and the client logs in again there."""
    store, app = DictStore(), MemoryServerApp()
    crashed = _pair(_instance(store), app)
    register(crashed, b"crash")
    login(crashed, b"crash")
    crashed.client.connection_lost()  # only the client sees the end: the instance is gone
    crashed.pump()
    (detached,) = crashed.client.take_detached_sessions()
    assert store.rows == {}  # it was never saved
    other = _pair(_instance(store), app)
    other.client.resume_session(detached)
    assert only(other.pump(), SessionFailed).code is ErrorCode.UNKNOWN_SESSION
    assert login(other, b"crash").user_id is not None


class _NotedApp:
    """A SessionAppState keeping one note per session handle."""

    def __init__(self) -> None:
        self.notes: dict[SessionHandle, bytes] = {}
        self.imported: list[tuple[SessionHandle, bytes]] = []

    def export_session(self, handle: SessionHandle) -> bytes:
        return self.notes.get(handle, b"")

    def import_session(self, handle: SessionHandle, state: bytes) -> None:
        self.imported.append((handle, state))


def test_the_applications_state_of_a_session_goes_with_it_to_another_instance():
    """SessionRegistry(app_state=...): what the application keeps of a session is sealed
    with it and given to the instance that claims it, under the session's new handle; a
    session with none gives nothing."""
    store, app = DictStore(), MemoryServerApp()
    noted_a, noted_b = _NotedApp(), _NotedApp()
    key = session_sealing_key(SETUP.to_bytes())
    instance_a = SessionRegistry(store=store, sealing_key=key, random=os.urandom, app_state=noted_a)
    instance_b = SessionRegistry(store=store, sealing_key=key, random=os.urandom, app_state=noted_b)
    pair = _pair(instance_a, app)
    register(pair, b"noted")
    login(pair, b"noted")
    login(pair, b"noted")
    noted, plain = (session.handle for session in instance_a._sessions.values())  # (server side)
    noted_a.notes[noted] = b"reserved: k1"
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    detached = pair.client.take_detached_sessions()
    assert len(store.rows) == 2
    other = _pair(instance_b, app)
    for session in detached:
        other.client.resume_session(session)
    resumed = [e for e in other.pump() if isinstance(e, SessionResumed)]
    assert len(resumed) == 2
    ((handle, state),) = noted_b.imported  # the plain session's empty state is not imported
    assert state == b"reserved: k1"
    assert handle is not noted and handle is not plain
    assert handle in {session.handle for session in instance_b._sessions.values()}
