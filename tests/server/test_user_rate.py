"""The per-user request rate: one account, however many sessions, connections and
addresses it uses, is served at most ``requests.per_user_rate`` requests a second (after a
burst); the rest are answered RATE_LIMITED with nothing done, and other accounts are not
slowed (docs/protocol.md, section 10)."""

from __future__ import annotations

import sqlite3
import time

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient, RateLimitedError, SessionEndedError
from keymgmt.adapters.client.connect import tls_connector
from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.server.config import load_settings
from keymgmt.adapters.server.driver import WARNINGS_PER_CONNECTION
from keymgmt.adapters.server.metrics import ServerMetrics
from keymgmt.adapters.server.userrate import UserRequestRates
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    Context,
    ErrorCode,
    ListKeysRequest,
    RequestReceived,
    RetrieveRequest,
    SessionHandle,
    Status,
)

from ..support.helpers import PASSWORD
from ..support.net_world import running_server

pytestmark = pytest.mark.anyio

_OK, _RATE_LIMITED = Status.OK, Status.RATE_LIMITED


def _audit_entries(path, user_id: bytes) -> int:
    """The user's audit entries, read from the database file by a connection of our own."""
    with sqlite3.connect(path) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM audit WHERE user_id = ?", (user_id,)).fetchone()
    return int(count)


# ------------------------------------------------------------------ the bucket


def test_a_user_gets_its_burst_then_the_rate():
    now = [100.0]
    rates = UserRequestRates(10.0, 5.0, clock=lambda: now[0])
    alice, bob = b"a" * 16, b"b" * 16
    assert [rates.take(alice) for _ in range(6)] == [True] * 5 + [False]
    assert rates.take(bob)  # another user has a bucket of its own
    now[0] += 0.25  # 2.5 tokens
    assert [rates.take(alice) for _ in range(3)] == [True, True, False]
    now[0] += 60.0  # refilled up to the burst, no further
    assert [rates.take(alice) for _ in range(6)] == [True] * 5 + [False]


def test_a_clock_that_steps_back_adds_nothing():
    now = [100.0]
    rates = UserRequestRates(10.0, 2.0, clock=lambda: now[0])
    assert rates.take(b"u") and rates.take(b"u") and not rates.take(b"u")
    now[0] = 50.0
    assert not rates.take(b"u")
    now[0] = 100.15  # 0.15 s after the last real reading: one token and a half
    assert rates.take(b"u") and not rates.take(b"u")


def test_the_table_of_users_is_bounded_and_forgets_refilled_buckets_first():
    now = [0.0]
    rates = UserRequestRates(1.0, 3.0, max_users=100, clock=lambda: now[0])
    busy = b"busy".ljust(16, b"\0")
    for n in range(99):  # users seen once at t=0: refilled by t=10
        rates.take(n.to_bytes(16, "big"))
    now[0] = 10.0
    for _ in range(3):
        assert rates.take(busy)  # busy's bucket is empty at t=10
    for n in range(1000, 1050):  # new users at t=10 (each leaves a bucket not yet refilled)
        rates.take(n.to_bytes(16, "big"))
        assert len(rates) <= 100
    # The refilled buckets went (as good as new), the busy user's empty one stayed.
    assert not rates.take(busy)
    # Once every user in the table is busy, the oldest entries go.
    for n in range(2000, 2300):
        rates.take(n.to_bytes(16, "big"))
        assert len(rates) <= 100
    assert rates.take(busy)  # (forgotten: a new, full bucket)


def test_pruning_keeps_a_bucket_still_refilling_and_stops_at_nine_tenths():
    """At the cap the table drops refilled buckets first, even newer ones, and keeps an older
    one still refilling; it goes down to exactly 90% of the cap, then takes the newcomer."""
    now = [100.0]
    rates = UserRequestRates(2.0, 3.0, max_users=100, clock=lambda: now[0])
    early = b"early".ljust(16, b"\0")
    for _ in range(3):
        assert rates.take(early)  # the oldest entry, and empty
    for n in range(99):
        rates.take(n.to_bytes(16, "big"))  # 2 tokens left each
    assert len(rates) == 100
    now[0] = 100.5  # the 99 have refilled (3 tokens), the early one holds 1
    rates.take(b"newcomer".ljust(16, b"\0"))
    assert len(rates) == 91  # down to 90, then the newcomer
    assert [rates.take(early), rates.take(early)] == [True, False]  # kept, with its 1 token


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 10.0), (-1.0, 10.0), (10.0, 0.5), (float("nan"), 10.0)])
def test_bad_rates_are_refused(rate, burst):
    with pytest.raises(ValueError, match="per-user rate"):
        UserRequestRates(rate, burst)
    with pytest.raises(ValueError, match="per-user rate"):
        UserRequestRates(10.0, 10.0, max_users=0)


def test_the_smallest_settings_are_allowed():
    rates = UserRequestRates(0.001, 1.0, max_users=1, clock=lambda: 0.0)
    assert rates.take(b"a") and not rates.take(b"a")
    assert rates.take(b"b") and len(rates) == 1  # (a forgotten: the cap is one user)


def test_the_settings_reach_the_server():
    settings = load_settings(
        None, env={"KEYMGMT_REQUESTS_PER_USER_RATE": "12.5", "KEYMGMT_REQUESTS_PER_USER_BURST": "40"}
    )
    assert (settings.user_request_rate, settings.user_request_burst) == (12.5, 40.0)
    defaults = load_settings(None, env={})
    assert (defaults.user_request_rate, defaults.user_request_burst) == (500.0, 2000.0)


def test_refusals_are_counted_but_kept_out_of_the_request_times(tmp_path):
    """A refused request costs no time to speak of: counted as RATE_LIMITED, but not put in
    keymgmt_request_duration_seconds, or a flood of refusals would drag the times the
    operators watch towards 0 while the requests served slow down."""
    metrics = ServerMetrics()
    rates = UserRequestRates(1.0, 2.0, clock=lambda: 100.0)  # (frozen: two requests, no more)
    storage = SQLiteStorage(tmp_path / "db")
    keyserver = KeyServer(storage, metrics=metrics, request_rates=rates)
    answers: list[bytes] = []

    class Conn:  # what the key server asks of a connection for a LIST_KEYS
        def send_response(self, session_id: int, request_id: int, body: bytes) -> None:
            answers.append(body)

        def credentials_version(self, session_id: int) -> None:
            return None

    user_id, handle = b"u" * 16, SessionHandle()
    body = ListKeysRequest(user_id).encode()
    for request_id in range(1, 11):
        keyserver(Conn(), RequestReceived(1, user_id, request_id, body, handle=handle))  # type: ignore[arg-type]
    storage.close()
    assert [a == bytes([_RATE_LIMITED]) for a in answers] == [False] * 2 + [True] * 8

    def sample(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    assert sample("keymgmt_requests_total", op="LIST_KEYS", status="RATE_LIMITED") == 8
    assert sample("keymgmt_request_duration_seconds_count", op="LIST_KEYS") == 2


# ------------------------------------------------------------------ the attack


async def test_one_user_flooding_from_many_sessions_gets_its_rate_and_no_more(tmp_path, caplog):
    """Mallory floods RETRIEVEs from 12 sessions over 3 TLS connections for about a second
    and a half. The server answers at most the burst plus the rate for the time taken;
    every other request is RATE_LIMITED, and those wrote no audit entry. Alice, meanwhile,
    is served every request."""
    rate, burst = 100.0, 200.0
    async with running_server(tmp_path, user_request_rate=rate, user_request_burst=burst) as (runtime, pki):
        assert runtime.keyserver.request_rates is not None
        assert (runtime.keyserver.request_rates.rate, runtime.keyserver.request_rates.burst) == (rate, burst)
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        db = runtime.settings.storage_path
        async with (
            KeymgmtClient(connect) as c1,
            KeymgmtClient(connect) as c2,
            KeymgmtClient(connect) as c3,
            KeymgmtClient(connect) as alice_client,
        ):
            started = time.monotonic()  # (before any request of Mallory's: a generous bound)
            await c1.register(b"mallory@example.org", PASSWORD)
            await alice_client.register(b"alice@example.org", PASSWORD)
            first = await c1.login(b"mallory@example.org", PASSWORD)
            key_id = await first.generate()
            sessions = [first]  # 12 sessions over the 3 connections
            for client in (c1, c2, c3):
                while sum(s._client is client for s in sessions) < 4:
                    sessions.append(await client.login(b"mallory@example.org", PASSWORD))
            alice = await alice_client.login(b"alice@example.org", PASSWORD)
            alice_key = await alice.generate()
            mallory_id = first.user_id
            body = RetrieveRequest(mallory_id, key_id, Context.NULL).encode()
            alice_body = RetrieveRequest(alice.user_id, alice_key, Context.NULL).encode()
            before = _audit_entries(db, mallory_id)
            answers: dict[int, int] = {}
            alice_answers: list[int] = []
            closed: set[object] = set()

            async def flood(session, until: float) -> None:
                while time.monotonic() < until:
                    try:
                        answer = await session._client.request(session.session_id, body)
                    except SessionEndedError as ended:  # its 1000 requests (sessions.max_requests)
                        assert ended.code is ErrorCode.REQUEST_LIMIT
                        closed.add(session)
                        return
                    answers[answer[0]] = answers.get(answer[0], 0) + 1

            async def alice_works(until: float) -> None:
                while time.monotonic() < until:
                    answer = await alice_client.request(alice.session_id, alice_body)
                    alice_answers.append(answer[0])
                    await anyio.sleep(0.02)

            until = time.monotonic() + 1.5
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for session in sessions:
                        for _ in range(4):  # 4 in flight per session, 48 in all
                            tg.start_soon(flood, session, until)
                    tg.start_soon(alice_works, until)
            elapsed = time.monotonic() - started
            served = answers.get(_OK, 0)
            refused = answers.get(_RATE_LIMITED, 0)
            assert set(answers) <= {_OK, _RATE_LIMITED}, answers
            assert refused > served, answers  # the flood was mostly refused...
            assert served <= burst + rate * elapsed, (answers, elapsed)  # ...and its rate held
            # Refused requests did nothing: one audit entry per served retrieve, none for the
            # rest (and one for each session the request limit ended).
            assert _audit_entries(db, mallory_id) - before == served + len(closed)
            assert b'status="RATE_LIMITED"' in runtime.metrics.exposition()  # counted
            # Alice was served throughout, never refused.
            assert len(alice_answers) >= 10 and set(alice_answers) == {_OK}, alice_answers
            # Refusals ended no session (the sessions went on to their request limit, or to
            # the end of the flood); once the bucket refills, Mallory is served again.
            await anyio.sleep(0.05)
            again = await c2.login(b"mallory@example.org", PASSWORD)
            assert [key.key_id for key in await again.list_keys()] == [key_id]
    warnings = [r for r in caplog.records if getattr(r, "event", None) == "user_rate_limited"]
    # Logged, boundedly: at most WARNINGS_PER_CONNECTION lines per connection of Mallory's.
    assert warnings and len(warnings) <= 3 * WARNINGS_PER_CONNECTION, len(warnings)
    assert "RATE_LIMITED" in warnings[0].getMessage()


async def test_the_client_waits_out_a_refusal_and_gives_up_after_its_budget(tmp_path):
    """KeySession operations send a RATE_LIMITED request again after a pause, within
    ``rate_limit_wait``; past it, RateLimitedError. Nothing is done for the refused sends."""
    now = [1000.0]
    async with running_server(tmp_path, user_request_rate=10.0, user_request_burst=4.0) as (runtime, pki):
        rates = runtime.keyserver.request_rates
        assert rates is not None
        rates.clock = lambda: now[0]  # frozen: the bucket refills only when the test says
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        db = runtime.settings.storage_path
        async with KeymgmtClient(connect) as client:
            await client.register(b"bob@example.org", PASSWORD)
            session = await client.login(b"bob@example.org", PASSWORD)
            key_id = await session.generate()  # (the storage key, a key id, the store)
            while rates.take(session.user_id):
                pass  # the bucket is empty now
            entries = _audit_entries(db, session.user_id)
            client.rate_limit_wait = 0.3
            sent = [0]
            request = client.request

            async def counting(handle, body):
                sent[0] += 1
                return await request(handle, body)

            client.request = counting  # type: ignore[method-assign]
            with anyio.fail_after(10), pytest.raises(RateLimitedError, match="per-user rate"):
                await session.list_keys()
            assert sent[0] >= 3  # sent again, more than once, before giving up
            assert _audit_entries(db, session.user_id) == entries  # and nothing was done

            client.rate_limit_wait = 30.0

            async def refill() -> None:
                await anyio.sleep(0.2)
                now[0] += 1.0  # ten tokens

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(refill)
                    assert [key.key_id for key in await session.list_keys()] == [key_id]
            assert _audit_entries(db, session.user_id) == entries + 1
