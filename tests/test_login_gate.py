"""Logins of one account take turns on a key server (adapters/logingate.py): the owner's
bursts do not trip NET-10, and an attacker's parallel guesses still cannot pass it."""

from __future__ import annotations

from contextlib import AsyncExitStack

import anyio
import pytest

from keymgmt.adapters.client import AuthenticationError, ThrottledError
from keymgmt.adapters.keyserver import ThrottlePolicy
from keymgmt.adapters.logingate import LoginGate
from keymgmt_proto import LoginRequested, State

from .helpers import PASSWORD
from .keyserver_world import key_server


class _Conn:
    """Stands in for a ServerConnection: the gate only asks for session states."""

    def __init__(self) -> None:
        self.states: dict[int, State] = {}
        self.wakes = 0

    def session_state(self, session_id: int) -> State:
        return self.states.get(session_id, State.CLOSED)

    def wake(self) -> None:
        self.wakes += 1


def _login(conn: _Conn, gate: LoginGate, session_id: int, name: bytes = b"a") -> bool:
    conn.states[session_id] = State.AWAIT_LOGIN_DECISION
    event = LoginRequested(session_id, name)
    if not gate.may_start(conn, event):  # type: ignore[arg-type]
        return False
    conn.states[session_id] = State.AWAIT_LOGIN_FINISH
    gate.started(conn, event)  # type: ignore[arg-type]
    return True


def test_gate_queues_past_the_limit_and_wakes_in_order() -> None:
    gate = LoginGate(2)
    one, two = _Conn(), _Conn()
    gate.attach(one, one.wake)  # type: ignore[arg-type]
    gate.attach(two, two.wake)  # type: ignore[arg-type]
    assert _login(one, gate, 1) and _login(one, gate, 3)
    assert not _login(two, gate, 1)  # third of "a": waits
    assert _login(two, gate, 3, name=b"b")  # other names are not held up
    assert gate.ready(two) == []  # no room yet
    one.states[1] = State.ESTABLISHED  # the first login succeeded
    gate.resolved(b"a")
    assert (one.wakes, two.wakes) == (0, 1)
    (admitted,) = gate.ready(two)
    assert (admitted.session_id, admitted.account_name) == (1, b"a")


def test_gate_forgets_queued_logins_whose_session_ended() -> None:
    gate = LoginGate(1)
    one, two = _Conn(), _Conn()
    assert _login(one, gate, 1)
    assert not _login(two, gate, 1)
    two.states[1] = State.CLOSED  # timed out while waiting
    one.states[1] = State.CLOSED  # the running one failed
    gate.resolved(b"a")
    assert gate.ready(two) == []
    assert _login(two, gate, 3)  # nothing stale holds the line
    with pytest.raises(ValueError):
        LoginGate(0)


@pytest.mark.anyio
async def test_many_clients_log_in_one_account_at_once(tmp_path) -> None:
    """Each login counts as a failed attempt until it succeeds, so 12 owners' logins at
    once (threshold 3) would be throttled without the gate; with it they all succeed."""
    policy = ThrottlePolicy(threshold=3, base_delay=60.0)
    async with key_server(tmp_path, throttle=policy) as world, AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(world.client()) for _ in range(12)]
        await clients[0].register(b"judy@example.org", PASSWORD)
        user_ids = []

        async def login(client) -> None:
            session = await client.login(b"judy@example.org", PASSWORD)
            user_ids.append(session.user_id)

        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(login, client)
        assert len(user_ids) == 12 and len(set(user_ids)) == 1
        with world.storage.transaction() as tx:
            assert tx.get_login_failures(b"judy@example.org")[0] == 0


@pytest.mark.anyio
async def test_queued_guesses_still_meet_the_lock(tmp_path) -> None:
    """Guesses from many clients wait their turn, and those after the threshold are
    throttled: the gate adds no attempts."""
    policy = ThrottlePolicy(threshold=3, base_delay=60.0)
    async with key_server(tmp_path, throttle=policy) as world, AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(world.client()) for _ in range(10)]
        await clients[0].register(b"mallory-target@example.org", PASSWORD)
        outcomes: list[str] = []

        async def guess(client) -> None:
            try:
                await client.login(b"mallory-target@example.org", b"wrong")
            except AuthenticationError:
                outcomes.append("wrong password")
            except ThrottledError:
                outcomes.append("throttled")

        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(guess, client)
        assert sorted(outcomes) == ["throttled"] * 7 + ["wrong password"] * 3
