"""Idle sessions keep only their keys (P4): AEAD objects are built on use and released
when a session falls out of the registry's hot set, with no change on the wire."""

from __future__ import annotations

import os
import sys

import pytest

from keymgmt_proto import Channel, FrameType, ResponseReceived, ServerConfig, SessionRegistry

from ..support.helpers import Harness, login, register


def test_a_released_channel_seals_and_opens_exactly_as_before() -> None:
    key = os.urandom(64)
    steady_client, steady_server = Channel(key, is_client=True), Channel(key, is_client=False)
    cold_client, cold_server = Channel(key, is_client=True), Channel(key, is_client=False)
    assert not cold_client.is_hot  # nothing built until first use
    for i in range(6):
        body = bytes([i]) * (i * 100)
        expected = steady_client.seal(FrameType.REQUEST, body)
        cold_client.release()
        got = cold_client.seal(FrameType.REQUEST, body)
        assert got == expected
        cold_server.release()
        assert cold_server.open(FrameType.REQUEST, got) == steady_server.open(FrameType.REQUEST, expected)
        assert cold_server.is_hot
    assert (cold_client.send_seq, cold_server.recv_seq) == (6, 6)


def test_hot_channels_keep_at_most_their_capacity() -> None:
    """The registry's hot set, driven the way server connections drive it (``warm`` on use,
    ``cool`` when a session ends): a channel warmed into a full set pushes one out."""
    registry = SessionRegistry(ServerConfig(max_hot_channels=2))
    a, b, c = (Channel(os.urandom(64), is_client=False) for _ in range(3))
    for channel in (a, b):
        channel.seal(FrameType.RESPONSE, b"x")
        registry.warm(channel)
    registry.warm(a)
    c.seal(FrameType.RESPONSE, b"x")
    registry.warm(c)
    assert c.is_hot and [a.is_hot, b.is_hot].count(True) == 1 and registry.hot_channels == 2
    registry.cool(c)
    assert (c.is_hot, registry.hot_channels) == (False, 1)
    for channel in (a, b, c):  # cooled and pushed-out channels come back; the set stays at 2
        channel.seal(FrameType.RESPONSE, b"y")
        registry.warm(channel)
        assert channel.is_hot and registry.hot_channels <= 2
    assert [a.is_hot, b.is_hot, c.is_hot].count(True) == 2 and registry.hot_channels == 2
    for channel in (a, b, c):
        registry.cool(channel)
    assert registry.hot_channels == 0 and not any(ch.is_hot for ch in (a, b, c))


def test_more_sessions_than_the_hot_set_taking_turns_still_mostly_find_their_channel_built() -> None:
    """100 sessions, each sending its next request once answered, over a hot set of 64:
    releasing the least recently used channel would release each one just before its
    next use (no request would find its channel built); the set keeps a good share."""
    registry = SessionRegistry(ServerConfig(max_hot_channels=64))
    channels = [Channel(os.urandom(64), is_client=False) for _ in range(100)]
    built = 0
    for turn in range(20):
        for channel in channels:
            built += turn > 0 and channel.is_hot
            registry.warm(channel)
            channel.seal(FrameType.RESPONSE, b"answer")
        assert registry.hot_channels == 64
        assert sum(ch.is_hot for ch in channels) == 64  # no channel built outside the set
    assert built / (19 * 100) > 0.3
    with pytest.raises(ValueError):
        ServerConfig(max_hot_channels=0)


def test_server_keeps_at_most_max_hot_channels_and_cold_sessions_still_work(server_setup) -> None:
    harness = Harness(server_setup, ServerConfig(max_hot_channels=2))
    pair = harness.pair()
    register(pair, b"alice")
    sessions = [login(pair, b"alice").session_id for _ in range(5)]
    server_channels = [s.channel for s in pair.server._sessions.values() if s.channel is not None]
    assert len(server_channels) == 5
    assert sum(c.is_hot for c in server_channels) == 2
    assert harness.registry.hot_channels == 2
    for sid in sessions:  # every session, hot or not, answers; the set never grows past 2
        request_id = pair.client.send_request(sid, b"ping %d" % sid)
        responses = [e for e in pair.pump() if isinstance(e, ResponseReceived)]
        assert [(r.session_id, r.request_id, r.body) for r in responses] == [
            (sid, request_id, b"ping %d" % sid)
        ]
        assert sum(c.is_hot for c in server_channels) == 2
    pair.client.close_session(sessions[-1])
    pair.pump()
    assert harness.registry.hot_channels == 1  # an ended session leaves the hot set
    assert sum(c.is_hot for c in server_channels) == 1


def test_an_idle_session_beyond_the_hot_set_holds_no_cipher_and_no_table_and_works_again(
    server_setup,
) -> None:
    """What an idle session keeps (P4): past the hot set its channel has no AEAD object, its
    request tables are empty plain dicts (no table left over from the requests it made),
    and no resume key. Used again, it becomes hot, answers, and pushes out another."""
    assert ServerConfig().max_hot_channels <= 64  # the default bounds the built contexts
    harness = Harness(server_setup, ServerConfig(max_hot_channels=2))
    pair = harness.pair()
    register(pair, b"alice")
    sessions = [login(pair, b"alice").session_id for _ in range(4)]
    server = {sid: pair.server._sessions[sid] for sid in sessions}
    for sid in sessions:  # each session makes requests, then goes idle
        for i in range(3):
            pair.client.send_request(sid, b"%d" % i)
        assert len([e for e in pair.pump() if isinstance(e, ResponseReceived)]) == 3
    assert sum(session.channel.is_hot for session in server.values()) == 2
    first = next(session for session in server.values() if not session.channel.is_hot)
    empty = sys.getsizeof({})
    for session in server.values():
        assert session.pending == {} and sys.getsizeof(session.pending) == empty
        assert type(session.answered) is dict and len(session.answered) == 3
    assert not any(name.startswith("_resume") for name in Channel.__slots__)
    sid = first.session_id
    request_id = pair.client.send_request(sid, b"again")
    responses = [e for e in pair.pump() if isinstance(e, ResponseReceived)]
    assert [(r.session_id, r.request_id, r.body) for r in responses] == [(sid, request_id, b"again")]
    assert first.channel.is_hot and harness.registry.hot_channels == 2
    assert sum(session.channel.is_hot for session in server.values()) == 2  # another one went cold
