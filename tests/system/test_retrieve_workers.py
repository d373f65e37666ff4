"""Review of rq14 (lean RETRIEVE path, SQLite's credentials checked once per batch), on a real
``keymgmt-server serve --workers 2``: a session on one worker retrieves without pause, many
requests in flight (so its worker's batches carry several), while the password changes
through the other worker. Once the change has committed the old session gets no answer and
writes no entry: it ends with CLOSE(NOT_AUTHORIZED)."""

from __future__ import annotations

import contextlib

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient, SessionEndedError
from keymgmt_proto import Action, Context, ErrorCode, Outcome

from .test_workers import (  # noqa: F401 (fixtures)
    PW,
    GatedConnector,
    _Steered,
    anyio_backend,
    database,
    pool,
    served_by,
    wait_for,
    worker_pids,
)

pytestmark = pytest.mark.anyio
NEW = b"the new password, long enough"
IN_FLIGHT = 8


async def test_retrieves_racing_a_password_change_on_the_other_worker(pool):  # noqa: F811
    server, _ = pool
    w1, w2 = wait_for(lambda: len(worker_pids(server)) == 2 and worker_pids(server), "two workers")
    name = b"racer@example.org"
    on_w1, on_w2 = GatedConnector(server), GatedConnector(server)
    async with contextlib.AsyncExitStack() as clients:
        with _Steered([w1, w2], w1):
            b = await clients.enter_async_context(KeymgmtClient(on_w1, reconnect_attempts=1))
        with anyio.fail_after(60), _Steered([w1, w2], w1):
            await b.register(name, PW)
            stale = await b.login(name, PW)
            key_id = await stale.import_secret(b"\x04abcd")
        with _Steered([w1, w2], w2):
            a = await clients.enter_async_context(KeymgmtClient(on_w2, reconnect_attempts=1))
        with anyio.fail_after(60), _Steered([w1, w2], w2):
            changer = await a.login(name, PW)
        answered: list[bytes | None] = []
        ended: list[SessionEndedError] = []
        changed = anyio.Event()

        async def one() -> None:
            try:
                answered.append(await stale.retrieve(key_id, Context.LOCAL_ONLY))
            except SessionEndedError as exc:
                ended.append(exc)

        async def hammer() -> None:
            rounds = 0
            while not ended:
                b.local_store.delete(stale.user_id, key_id)  # (every retrieve asks the server)
                async with anyio.create_task_group() as group:
                    for _ in range(IN_FLIGHT):
                        group.start_soon(one)
                rounds += 1
                assert rounds < 2_000, "the stale session was never ended"

        async def change() -> None:
            while len(answered) < 5 * IN_FLIGHT:
                await anyio.sleep(0.01)
            await changer.change_password(NEW)
            changed.set()

        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                group.start_soon(hammer)
                group.start_soon(change)
        assert changed.is_set()
        assert ended and {e.code for e in ended} == {ErrorCode.NOT_AUTHORIZED}
        assert set(answered) == {b"abcd"}
        # The owner's log: every answer the stale session had is an entry before the change,
        # none after it; the chain verifies.
        verified = await changer.verify_audit()
        entries = list(verified.entries)
        change_at = [i for i, e in enumerate(entries) if e.action is Action.CHANGE_PASSWORD]
        assert len(change_at) == 1
        before, after = entries[: change_at[0]], entries[change_at[0] + 1 :]
        successes = [e for e in before if e.action is Action.RETRIEVE and e.outcome is Outcome.SUCCESS]
        assert len(successes) == len(answered)
        assert not [e for e in after if e.outcome is Outcome.SUCCESS and e.action is Action.RETRIEVE]
        assert not [e for e in before if e.action is Action.RETRIEVE and e.outcome is Outcome.FAILURE]
    assert {served_by(server, port) for port in on_w1.ports} == {w1}
    assert {served_by(server, port) for port in on_w2.ports} == {w2}
