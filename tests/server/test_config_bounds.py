"""Each policy and limit accepts its smallest legal value and refuses one step below it.

An operator's configuration is checked when the object is built, so a typo fails at
start-up with a clear ``ValueError`` rather than as a server that never locks, never
times out or never admits anyone. One legal and one illegal value per bound: a check
dropped, or a bound moved, fails here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from keymgmt.adapters.server.admission import AddressLimits
from keymgmt.adapters.server.app import ThrottlePolicy
from keymgmt.adapters.server.invitations import InvitationAuthorizer
from keymgmt_proto import MAX_SESSION_ID, Frame, FrameType, ServerConfig, SessionRegistry

Build = Callable[[], object]

KEY = bytes(range(32))

CASES: list[tuple[str, Build, Build]] = [
    ("throttle threshold", lambda: ThrottlePolicy(threshold=1), lambda: ThrottlePolicy(threshold=0)),
    ("throttle base delay", lambda: ThrottlePolicy(base_delay=0.0), lambda: ThrottlePolicy(base_delay=-0.5)),
    ("throttle growth", lambda: ThrottlePolicy(growth=1.0), lambda: ThrottlePolicy(growth=0.5)),
    ("throttle max delay", lambda: ThrottlePolicy(max_delay=0.0), lambda: ThrottlePolicy(max_delay=-0.5)),
    (
        "throttle forget after",
        lambda: ThrottlePolicy(forget_after=0.5),
        lambda: ThrottlePolicy(forget_after=0.0),
    ),
    ("throttle max records", lambda: ThrottlePolicy(max_records=10), lambda: ThrottlePolicy(max_records=9)),
    (
        "throttle in flight",
        lambda: ThrottlePolicy(in_flight_for=0.5),
        lambda: ThrottlePolicy(in_flight_for=0.0),
    ),
    *[
        (
            f"server {name}",
            lambda name=name: ServerConfig(**{name: 0.5}),
            lambda name=name: ServerConfig(**{name: 0}),
        )
        for name in (
            "handshake_timeout",
            "idle_timeout",
            "session_lifetime",
            "connection_idle_timeout",
            "frame_timeout",
            "unproductive_rate",
        )
    ],
    *[
        (
            f"server {name}",
            lambda name=name: ServerConfig(**{name: 1}),
            lambda name=name: ServerConfig(**{name: 0}),
        )
        for name in (
            "max_requests_per_session",
            "max_requests_in_flight",
            "max_sessions_per_connection",
            "max_hot_channels",
            "unproductive_burst",
        )
    ],
    (
        "frame session id",
        lambda: Frame(FrameType.REQUEST, MAX_SESSION_ID, b""),
        lambda: Frame(FrameType.REQUEST, MAX_SESSION_ID + 1, b""),
    ),
    (
        "hot channels",
        lambda: SessionRegistry(ServerConfig(max_hot_channels=1)),
        lambda: SessionRegistry(ServerConfig(max_hot_channels=0)),
    ),
    (
        "address connections",
        lambda: AddressLimits(max_connections_per_address=1),
        lambda: AddressLimits(max_connections_per_address=0),
    ),
    ("address table", lambda: AddressLimits(max_addresses=1), lambda: AddressLimits(max_addresses=0)),
    ("address rate", lambda: AddressLimits(rate=0.5), lambda: AddressLimits(rate=0.0)),
    ("address burst", lambda: AddressLimits(burst=1), lambda: AddressLimits(burst=0.5)),
    ("invitation key", lambda: InvitationAuthorizer(KEY), lambda: InvitationAuthorizer(KEY[:31])),
    (
        "invitation lifetime",
        lambda: InvitationAuthorizer(KEY).mint(None, 0.5, 0.0, os.urandom),
        lambda: InvitationAuthorizer(KEY).mint(None, 0.0, 0.0, os.urandom),
    ),
]


@pytest.mark.parametrize(("name", "legal", "illegal"), CASES, ids=[case[0] for case in CASES])
def test_the_smallest_legal_value_is_accepted_and_one_step_below_it_refused(
    name: str, legal: Build, illegal: Build
) -> None:
    assert legal() is not None
    with pytest.raises(ValueError):
        illegal()


def test_invitation_checks_answer_false_not_just_something_falsy():
    authorizer = InvitationAuthorizer(KEY)
    token = authorizer.mint(b"alice", 60.0, 0.0, os.urandom).encode()
    middle = len(token) // 2  # (not the last character: its two low bits are padding)
    forged = token[:middle] + (b"A" if token[middle : middle + 1] != b"A" else b"B") + token[middle + 1 :]
    for name, candidate in [
        (b"alice", "kmi1.é".encode()),  # not ASCII
        (b"alice", b"kmi2." + token[5:]),  # another prefix
        (b"alice", b"kmi1.!!!"),  # no base64 characters
        (b"alice", b"kmi1.A"),  # not base64 (one character short of a byte)
        (b"alice", token[:-4]),  # too short
        (b"alice", forged),  # bad tag
        (b"alice", token),  # expired (below)
        (b"mallory", token),  # another name
    ]:
        now = 120.0 if candidate is token and name == b"alice" else 1.0
        assert authorizer.authorize(name, candidate, now) is False, candidate
    assert authorizer.authorize(b"alice", token, 1.0) is True


def _limits(max_addresses: int, clock: list[float]) -> AddressLimits:
    return AddressLimits(
        max_connections_per_address=4, rate=1, burst=2, max_addresses=max_addresses, clock=lambda: clock[0]
    )


def test_a_full_address_table_forgets_idle_addresses_first_then_the_least_recently_seen():
    """At the cap the table shrinks to 90% of it in one pass before a new address goes in:
    first addresses as good as new (no connection, a full bucket), then the least recently
    seen without a connection; an address with an open connection is never forgotten."""
    clock = [0.0]
    limits = _limits(10, clock)
    spent = [f"spent{n}" for n in range(5)]
    for key in spent:  # oldest: each spends a token and closes
        admission = limits.open(key)
        assert admission is not None and admission.admit(FrameType.LOGIN_START, 0.0)
        limits.close(key)
    held = limits.open("held")  # keeps its connection
    assert held is not None
    fresh = [f"fresh{n}" for n in range(3)]
    for key in fresh:  # opened and closed without spending anything
        assert limits.open(key) is not None
        limits.close(key)
    assert limits.open("spent0") is not None  # seen again: now the most recent
    limits.close("spent0")
    assert limits.open("recent") is not None  # the 10th: at the cap, nothing forgotten yet
    limits.close("recent")
    assert len(limits) == 10
    assert limits.open("new") is not None  # the 11th: down to 9 first, then in
    assert len(limits) == 10
    remaining = {key for key in [*spent, *fresh, "held", "recent", "new"] if key in limits._entries}
    # One address had to go: the oldest good-as-new one.
    assert remaining == {*spent, "held", "fresh1", "fresh2", "recent", "new"}
    assert limits.connections("held") == 1 and limits.connections("new") == 1


def test_a_table_of_busy_addresses_forgets_the_least_recently_seen():
    clock = [0.0]
    limits = _limits(10, clock)
    for n in range(10):
        admission = limits.open(f"a{n}")
        assert admission is not None and admission.admit(FrameType.LOGIN_START, 0.0)
        limits.close(f"a{n}")
    assert limits.open("a0") is not None  # seen again: the most recent
    limits.close("a0")
    assert limits.open("b") is not None
    # Nobody is as good as new: the least recently seen goes.
    assert sorted(limits._entries) == sorted(["a0", *[f"a{n}" for n in range(2, 10)], "b"])


def test_a_new_address_at_a_full_table_is_counted_and_limited_like_any_other():
    """Attack: fill the table with addresses that each spent a token, then connect from a
    new one. Its entry must not be the one pruned (it was, while it was still unused), or
    each connection would get a fresh bucket and escape the per-address limit."""
    clock = [0.0]
    limits = _limits(50, clock)
    for n in range(50):
        admission = limits.open(f"busy{n}")
        assert admission is not None and admission.admit(FrameType.LOGIN_START, 0.0)
        limits.close(f"busy{n}")
    admissions = [limits.open("attacker") for _ in range(10)]
    assert sum(a is not None for a in admissions) == 4  # max_connections_per_address
    assert limits.connections("attacker") == 4
    granted = sum(a.admit(FrameType.LOGIN_START, 0.0) for a in admissions if a is not None)
    assert granted == 2  # one shared bucket, burst 2


def test_closing_counts_down_to_zero_and_no_further():
    limits = _limits(10, [0.0])
    assert limits.connections("never seen") == 0
    assert limits.open("a") is not None
    limits.close("a")
    assert limits.connections("a") == 0
    limits.close("a")  # a stray close (an adapter bug) cannot go below zero
    assert limits.connections("a") == 0


def test_a_refund_through_the_address_gives_the_token_back():
    limits = _limits(10, [0.0])
    admission = limits.open("a")
    assert admission is not None
    assert admission.admit(FrameType.RESUME, 0.0) and admission.admit(FrameType.RESUME, 0.0)
    assert not admission.admit(FrameType.RESUME, 0.0)
    admission.refund(FrameType.RESUME, 0.0)
    assert admission.admit(FrameType.RESUME, 0.0)
