"""Review of issue 16: which credentials a session logged in with. The application names
them at ``accept_login`` (the key server: when the account's password last changed); the
session keeps the name, also when it is sealed into a shared store and resumed on another
instance, and the session that changes the password itself moves on to the new one. One
session can be ended alone (``SessionRegistry.end_session``, or many in one walk:
``end_sessions``), as another instance finds its
credentials out of date."""

from __future__ import annotations

import os
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from keymgmt.adapters import InMemoryPair, MemoryServerApp
from keymgmt_proto import (
    ClientConnection,
    ErrorCode,
    LocalProtocolError,
    LoginRequested,
    LoginSucceeded,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
    ServerSetup,
    SessionClosed,
    SessionFailed,
    SessionRegistry,
    SessionResumed,
    session_sealing_key,
)
from keymgmt_proto.wire import SESSION_STATE_AD_PREFIX, unseal_session_state

from ..support.helpers import login, only, register
from .test_shared_sessions import DictStore

SETUP = ServerSetup.generate()
KEY = session_sealing_key(SETUP.to_bytes())


class _VersionedApp(MemoryServerApp):
    """The in-memory application, naming each login's credentials ``version``."""

    version = 7
    answering = True

    def __call__(self, conn: ServerConnection, event: object) -> None:
        if isinstance(event, RequestReceived) and not self.answering:
            self.events.append(event)
            return
        if isinstance(event, LoginRequested) and event.account_name in self.accounts:
            self.events.append(event)
            account = self.accounts[event.account_name]
            conn.accept_login(event.session_id, account.user_id, account.registration_record, self.version)
            return
        super().__call__(conn, event)  # type: ignore[arg-type]


def _instance(store: DictStore) -> SessionRegistry:
    return SessionRegistry(store=store, sealing_key=KEY, random=os.urandom)


def _pair(registry: SessionRegistry, app: MemoryServerApp) -> InMemoryPair:
    server = ServerConnection(SETUP, os.urandom, registry=registry, now=0.0)
    return InMemoryPair(ClientConnection(os.urandom), server, app, rng=random.Random(1), now=0.0)


def _move(pair: InMemoryPair, to: SessionRegistry, app: MemoryServerApp) -> tuple[InMemoryPair, int]:
    """Lose the connection; resume its one session on an instance of registry ``to``."""
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    (detached,) = pair.client.take_detached_sessions()
    other = _pair(to, app)
    session_id = other.client.resume_session(detached)
    only(other.pump(), SessionResumed)
    return other, session_id


def test_a_session_keeps_its_credentials_version_across_instances_and_a_renewal():
    store, app = DictStore(), _VersionedApp()
    first = _pair(_instance(store), app)
    register(first, b"versioned")
    session_id = login(first, b"versioned").session_id
    assert first.server.credentials_version(session_id) == 7
    assert first.server.credentials_version(session_id + 1) is None  # no such session
    moved, moved_id = _move(first, _instance(store), app)
    assert moved.server.credentials_version(moved_id) == 7  # sealed with the session
    moved.server.renew_credentials(moved_id, 2**64 - 1)  # it changed the password itself
    assert moved.server.credentials_version(moved_id) == 2**64 - 1
    again, again_id = _move(moved, _instance(store), app)
    assert again.server.credentials_version(again_id) == 2**64 - 1


def test_the_version_must_fit_in_64_bits_and_a_refusal_changes_nothing():
    store, app = DictStore(), _VersionedApp()
    pair = _pair(_instance(store), app)
    register(pair, b"bounded")
    session_id = login(pair, b"bounded").session_id
    for bad in (-1, 2**64):
        with pytest.raises(LocalProtocolError, match="64 bits"):
            pair.server.renew_credentials(session_id, bad)
    assert pair.server.credentials_version(session_id) == 7
    with pytest.raises(LocalProtocolError, match="no live session"):
        pair.server.renew_credentials(session_id + 1, 1)
    app.version = 2**64
    pair.client.open_request_session(b"bounded", b"correct horse battery staple")
    with pytest.raises(LocalProtocolError, match="64 bits"):
        pair.pump()


def test_a_session_sealed_by_the_previous_version_resumes_with_version_zero():
    """Version 2 of the sealed state has no credentials version: it reads as 0 (an account
    whose password changed since has a later one, so such a session then ends)."""
    store, app = DictStore(), _VersionedApp()
    pair = _pair(_instance(store), app)
    register(pair, b"older")
    login(pair, b"older")
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    (handle,) = store.rows
    sealed, expires = store.rows[handle]
    plaintext = ChaCha20Poly1305(KEY).decrypt(sealed[:12], sealed[12:], SESSION_STATE_AD_PREFIX + handle)
    # (no answered request and no app state: versions 3 to 5 lay it out alike but for the
    # app state's length, version 5's last two bytes)
    assert plaintext[0] == 5 and plaintext[-2:] == b"\0\0"
    name_end = 1 + 16 + 1 + plaintext[17]
    times_end = name_end + 16
    assert struct.unpack(">Q", plaintext[times_end : times_end + 8]) == (7,)
    older = bytes([2]) + plaintext[1:times_end] + plaintext[times_end + 8 : -2]  # as version 2 sealed it
    nonce = os.urandom(12)
    resealed = nonce + ChaCha20Poly1305(KEY).encrypt(nonce, older, SESSION_STATE_AD_PREFIX + handle)
    state = unseal_session_state(resealed, handle, KEY)
    assert state is not None and state.credentials_version == 0
    store.rows[handle] = (resealed, expires)
    (detached,) = pair.client.take_detached_sessions()
    other = _pair(_instance(store), app)
    session_id = other.client.resume_session(detached)
    only(other.pump(), SessionResumed)
    assert other.server.credentials_version(session_id) == 0
    unknown = bytes([9]) + older[1:]  # a version this code does not know: no session
    resealed = nonce + ChaCha20Poly1305(KEY).encrypt(nonce, unknown, SESSION_STATE_AD_PREFIX + handle)
    assert unseal_session_state(resealed, handle, KEY) is None


def test_end_session_ends_that_one_session_only():
    registry, app = SessionRegistry(), _VersionedApp()
    pair, other = _pair(registry, app), _pair(registry, app)
    register(pair, b"one")
    stale = login(pair, b"one")
    same_user = login(pair, b"one")
    elsewhere = login(other, b"one")
    detached_pair = _pair(registry, app)
    login(detached_pair, b"one")
    detached_pair.client.connection_lost()
    detached_pair.server.connection_lost()
    detached_pair.pump()
    (detached,) = detached_pair.client.take_detached_sessions()

    # A request in flight on the session to end gets no answer: the session ends with a sealed
    # CLOSE(NOT_AUTHORIZED) instead.
    app.answering = False
    pair.client.send_request(stale.session_id, b"unanswered")
    pair.to_server(pair.client.data_to_send())
    app.answering = True
    (received,) = [e for e in pair.server_events if isinstance(e, RequestReceived)]
    assert registry.end_session(received.handle, ErrorCode.NOT_AUTHORIZED)
    events = pair.pump()
    assert not [e for e in events if isinstance(e, ResponseReceived)]
    assert [(e.session_id, e.code) for e in events if isinstance(e, SessionClosed)] == [
        (stale.session_id, ErrorCode.NOT_AUTHORIZED)
    ]
    assert not registry.end_session(received.handle, ErrorCode.NOT_AUTHORIZED)  # gone already
    # The account's other sessions go on, attached here or elsewhere.
    for p, session in ((pair, same_user), (other, elsewhere)):
        p.client.send_request(session.session_id, b"still here")
        assert only(p.pump(), ResponseReceived).body == b"still here"
    # A detached one is dropped silently: its RESUME then finds nothing.
    (logged_in,) = [e for e in detached_pair.server_events if isinstance(e, LoginSucceeded)]
    assert registry.end_session(logged_in.handle, ErrorCode.NOT_AUTHORIZED)
    late = _pair(registry, app)
    late.client.resume_session(detached)
    assert only(late.pump(), SessionFailed).code is ErrorCode.UNKNOWN_SESSION


class _CountedWalks(dict):  # type: ignore[type-arg]
    """The registry's session table, counting the walks over it."""

    walks = 0

    def values(self):  # type: ignore[no-untyped-def]
        type(self).walks += 1
        return super().values()


def test_end_sessions_ends_many_in_one_walk():
    """Review of issue 16: an account whose password changed elsewhere may hold thousands
    of sessions on this instance; ending each by its own walk over every session held cost
    sessions x ended steps on the event loop (seconds, for everyone on this instance)."""
    registry, app = SessionRegistry(), _VersionedApp()
    pair, other = _pair(registry, app), _pair(registry, app)
    register(pair, b"one")
    register(other, b"two")
    ending = [login(pair, b"one") for _ in range(6)]
    kept = login(other, b"two")
    handles = {e.handle for e in pair.server_events if isinstance(e, LoginSucceeded)}
    assert len(handles) == 6
    _CountedWalks.walks = 0  # (a class counter: the same count however often this test runs)
    registry._sessions = _CountedWalks(registry._sessions)  # type: ignore[attr-defined]
    ended = registry.end_sessions([*handles, object()], ErrorCode.NOT_AUTHORIZED)  # type: ignore[list-item]
    assert set(ended) == handles and len(ended) == 6
    assert _CountedWalks.walks == 1
    closed = [(e.session_id, e.code) for e in pair.pump() if isinstance(e, SessionClosed)]
    assert sorted(closed) == sorted((s.session_id, ErrorCode.NOT_AUTHORIZED) for s in ending)
    other.client.send_request(kept.session_id, b"still here")
    assert only(other.pump(), ResponseReceived).body == b"still here"
    assert registry.end_sessions(handles, ErrorCode.NOT_AUTHORIZED) == []  # gone already
