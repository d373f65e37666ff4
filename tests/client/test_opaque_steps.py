"""How ``KeymgmtClient`` runs the client's OPAQUE steps (issue 13, item 3): one per
event-loop turn, and none for a session that ended while its step waited. The core's side
(``OpaqueStepRequired`` and ``complete_opaque_step``) is in tests/core/test_opaque_steps.py.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteStream

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.server.driver import serve_stream
from keymgmt.adapters.testing.streams import memory_stream_pair
from keymgmt_proto import ClientConnection, FrameType, OpaqueStepRequired, RealOpaque, State

from ..support.fake_pairs import spied_pair
from ..support.frames import frame_type, split_frames
from ..support.helpers import PASSWORD, register
from ..support.keyserver_world import SETUP, key_server

ACCOUNT = b"alice@example.org"


@pytest.mark.anyio
async def test_the_client_skips_the_steps_of_sessions_that_ended_meanwhile(world):
    """A step queued for a session that was abandoned (or whose connection failed)
    before its turn costs no Argon2 run; a live one runs and completes."""
    register(world.pair(), ACCOUNT)
    pair, spy = spied_pair(world)
    abandoned = pair.client.open_request_session(ACCOUNT, PASSWORD)
    live = pair.client.open_request_session(ACCOUNT, PASSWORD)
    steps = [e for e in pair.pump() if isinstance(e, OpaqueStepRequired)]
    assert [s.session_id for s in steps] == [abandoned, live]
    pair.client.abort_session(abandoned)
    client = KeymgmtClient(memory_stream_pair()[0])
    client._conn = pair.client
    client._steps.extend((pair.client, step) for step in steps)
    await client._run_opaque_steps()
    assert spy.calls.count("client_login_finish") == 1
    assert not client._steps
    assert pair.client.session_state(live) is State.AWAIT_WELCOME
    lost, _ = spied_pair(world)
    lost.client = ClientConnection(os.urandom, opaque=spy)
    lost.client.open_request_session(ACCOUNT, PASSWORD)
    (step,) = [e for e in lost.pump() if isinstance(e, OpaqueStepRequired)]
    lost.client.connection_lost()
    client._steps.append((lost.client, step))
    await client._run_opaque_steps()
    assert spy.calls.count("client_login_finish") == 1


class BurstStream(ByteStream):
    """The client's end of an in-memory link that holds back what the server sends until
    ``count`` LOGIN_RESPONSE frames have come, then hands them over in one receive()."""

    def __init__(self, inner: ByteStream, count: int) -> None:
        self.inner = inner
        self.count = count
        self.held = b""
        self.released = False
        #: LOGIN_FINISH frames in each write the client made once the burst was released.
        self.finish_writes: list[int] = []

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self.released:
            return await self.inner.receive(max_bytes)
        responses = 0
        while responses < self.count:
            self.held += await self.inner.receive()
            responses = sum(frame_type(f) is FrameType.LOGIN_RESPONSE for f in split_frames(self.held))
        self.released = True
        return self.held

    async def send(self, item: bytes) -> None:
        finishes = sum(frame_type(f) is FrameType.LOGIN_FINISH for f in split_frames(item))
        if self.released and finishes:
            self.finish_writes.append(finishes)
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.anyio
async def test_the_client_runs_one_opaque_step_per_event_loop_turn(tmp_path: Path, monkeypatch):
    """20 LOGIN_RESPONSEs arrive in one chunk: the client still lets the event loop run
    between any two of its Argon2 steps (a task counting loop turns moves in between)."""
    logins = 20
    accounts = [b"burst-%d@example.org" % i for i in range(logins)]
    turns = 0
    turns_at_step: list[int] = []
    real_finish = RealOpaque.client_login_finish

    def counting_finish(self, password, state, response):  # type: ignore[no-untyped-def]
        turns_at_step.append(turns)
        return real_finish(self, password, state, response)

    async with key_server(tmp_path) as world:
        async with world.client() as setup_client:
            for account in accounts:
                await setup_client.register(account, PASSWORD)
        monkeypatch.setattr(RealOpaque, "client_login_finish", counting_finish)
        client_end, server_end = memory_stream_pair()
        world.task_group.start_soon(serve_stream, server_end, SETUP, world.keyserver, world.registry)
        burst = BurstStream(client_end, logins)
        async with KeymgmtClient(burst) as client:
            done = anyio.Event()

            async def count_turns() -> None:
                nonlocal turns
                while not done.is_set():
                    await anyio.sleep(0)
                    turns += 1

            async with anyio.create_task_group() as tg:
                tg.start_soon(count_turns)
                async with anyio.create_task_group() as logins_tg:
                    for account in accounts:
                        logins_tg.start_soon(client.login, account, PASSWORD)
                done.set()
            assert len(client._sid_of) == logins  # every login succeeded
    assert burst.released and len(turns_at_step) == logins
    gaps = [b - a for a, b in itertools.pairwise(turns_at_step)]
    assert min(gaps) >= 1, turns_at_step
    # ... and sends the 20 LOGIN_FINISHes in one write once its steps are done, so that the
    # server verifies them in one read and commits them in one transaction (one fsync per
    # login made P5 cost 3x the server CPU: bench P5).
    assert burst.finish_writes == [logins]
