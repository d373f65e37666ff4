"""ServerConnection.timer_hint (issue 14): what a driver waits for, without looking at every
session after each batch. It is never later than get_timer (no deadline is missed) and it
is exact again after handle_timer."""

from __future__ import annotations

from keymgmt_proto import NEED_DATA, ErrorCode, ServerConfig, SessionClosed

from ..support.helpers import Harness, login, register


def _check(pair) -> float:
    hint, exact = pair.server.timer_hint(), pair.server.get_timer()
    assert hint is not None and exact is not None
    assert hint <= exact, (hint, exact)
    return hint


def test_the_hint_is_never_later_than_the_next_deadline(server_setup) -> None:
    # The idle deadline (5 s) comes before the handshake deadline (30 s): a session's
    # deadline moves *earlier* when it becomes ESTABLISHED.
    config = ServerConfig(
        handshake_timeout=30, idle_timeout=5, session_lifetime=100, connection_idle_timeout=1000
    )
    harness = Harness(server_setup, config)
    pair = harness.pair(now=100.0)
    register(pair, b"hint")
    _check(pair)  # (early: the registration session's deadline, which has ended)
    assert pair.advance(0.0) == []
    assert pair.server.timer_hint() == pair.server.get_timer() == 100.0 + 1000  # exact again

    sid = login(pair, b"hint").session_id
    assert _check(pair) == 100.0 + 5  # the established session's idle deadline, not 130
    pair.now = 103.0
    pair.client.send_request(sid, b"busy")
    pair.pump()
    assert pair.server.get_timer() == 108.0
    assert _check(pair) == 105.0  # early: the session's deadline moved later, the hint did not

    assert pair.advance(2.0) == []  # woken early (t = 105): nothing ends
    assert pair.server.timer_hint() == pair.server.get_timer() == 108.0

    login(pair, b"hint")  # established at 105: idle until 110
    assert _check(pair) == 108.0

    closed = [e for e in pair.advance(5.0) if isinstance(e, SessionClosed)]  # t = 110
    assert [e.code for e in closed] == [ErrorCode.IDLE_TIMEOUT] * 2
    _check(pair)


def test_a_resumed_session_lowers_the_hint_of_its_new_connection(server_setup) -> None:
    config = ServerConfig(idle_timeout=5, session_lifetime=100, connection_idle_timeout=1000)
    harness = Harness(server_setup, config)
    first = harness.pair(now=10.0)
    register(first, b"moved")
    login(first, b"moved")
    first.client.connection_lost()
    first.server.connection_lost()
    first.pump()
    (detached,) = first.client.take_detached_sessions()
    second = harness.pair(now=11.0)
    assert second.server.timer_hint() == 11.0 + 1000
    second.client.resume_session(detached)
    second.pump()
    assert second.server.get_timer() == 11.0 + 5
    assert _check(second) == 11.0 + 5  # not the connection's idle deadline


def test_a_new_session_lowers_the_hint(server_setup) -> None:
    """A LOGIN_START on a connection whose hint is its idle deadline: the handshake deadline
    is sooner, and a client that stalls must still be cut off at it."""
    config = ServerConfig(handshake_timeout=30, connection_idle_timeout=1000)
    harness = Harness(server_setup, config)
    pair = harness.pair(now=50.0)
    assert pair.server.timer_hint() == 50.0 + 1000
    pair.client.open_request_session(b"stalls", b"password")
    pair.server.receive_data(pair.client.data_to_send(), pair.now)
    while pair.server.next_event() is not NEED_DATA:  # the application never answers
        pass
    assert pair.server.get_timer() == 50.0 + 30
    assert _check(pair) == 50.0 + 30
