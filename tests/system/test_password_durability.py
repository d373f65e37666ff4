"""A password change survives SIGKILL as the old password or the new one, never neither
(issue 16 item 1).

Each round: fresh accounts, each with a secret stored under its storage key; one client per
account changes its password back and forth (P0 -> P1 -> P0 ...) as fast as it can over
real TLS, until the real server process gets SIGKILL at a random moment. After a restart on
the same files, every account must open with exactly one of the passwords it could have:
the last one acknowledged, or the one a change was under way to. And the login must unlock
the storage key (the record and the re-wrapped key changed together): the secret stored in
the first round is read back from the server and matches.

Rounds: ``KEYMGMT_DURABILITY_ROUNDS`` (default 3); the kill moments come from a seeded RNG
(``KEYMGMT_DURABILITY_SEED`` replays one).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import anyio
import pytest

from keymgmt.adapters.client.async_client import AuthenticationError, KeymgmtClient, KeymgmtError
from keymgmt.adapters.client.connect import tls_connector
from keymgmt.adapters.client.localstore import LocalStore
from keymgmt_proto import Context

from ..support.server_proc import ServerProcess, init_server_dir

pytestmark = pytest.mark.anyio

ROUNDS = int(os.environ.get("KEYMGMT_DURABILITY_ROUNDS", "3"))
CLIENTS = int(os.environ.get("KEYMGMT_DURABILITY_CLIENTS", "4"))
#: The kill comes this long (uniformly drawn, seconds) after the round's first acknowledged change.
KILL_WINDOW = (0.0, 1.5)
PASSWORDS = (b"durability password number zero", b"durability password number one")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@dataclass
class _Account:
    name: bytes
    key_id: bytes
    secret: bytes
    #: The index in PASSWORDS of the last password whose change was acknowledged.
    acked: int = 0
    #: The index a change is under way to (None when none is).
    changing_to: int | None = None
    changes: int = 0


def _client(server: ServerProcess) -> KeymgmtClient:
    connect = tls_connector("127.0.0.1", server.port, cafile=server.directory / "ca.pem", timeout=5)
    # An empty local store: every read goes to the server. One reconnection attempt: after
    # the kill the port is dead, so the client fails fast.
    return KeymgmtClient(connect, local_store=LocalStore(":memory:"), reconnect_attempts=1)


async def _churn(server: ServerProcess, accounts: list[_Account], rng: random.Random, note: str) -> float:
    """Change passwords until the server is SIGKILLed; returns the kill delay."""
    killed, first_ack = anyio.Event(), anyio.Event()
    unexpected: list[str] = []
    finished = [0]

    async def worker(account: _Account) -> None:
        try:
            async with _client(server) as client:
                while True:
                    target = 1 - account.acked
                    account.changing_to = target
                    await client.change_password(account.name, PASSWORDS[account.acked], PASSWORDS[target])
                    account.acked, account.changing_to = target, None
                    account.changes += 1
                    first_ack.set()
        except KeymgmtError as exc:
            if not killed.is_set():
                unexpected.append(f"{account.name.decode()}: {type(exc).__name__}: {exc}")
        finally:
            finished[0] += 1

    delay = rng.uniform(*KILL_WINDOW)
    async with anyio.create_task_group() as tg:
        for account in accounts:
            tg.start_soon(worker, account)
        with anyio.fail_after(60):
            await first_ack.wait()
        await anyio.sleep(delay)
        killed.set()
        server.kill()
        with anyio.move_on_after(20) as scope:
            while finished[0] < len(accounts):
                await anyio.sleep(0.05)
        if scope.cancelled_caught:
            unexpected.append("clients did not notice the dead server within 20 s")
            tg.cancel_scope.cancel()
    assert not unexpected, f"{note}: {unexpected}"
    return delay


async def _verify(server: ServerProcess, accounts: list[_Account], note: str) -> int:
    """Each account opens with exactly one password it may have, and that login unlocks its
    storage key. Returns how many accounts were caught with a change under way."""
    in_flight = 0
    async with _client(server) as client:
        for account in accounts:
            candidates = [account.acked]
            if account.changing_to is not None:
                candidates.append(account.changing_to)
                in_flight += 1
            working = []
            for index in candidates:
                try:
                    session = await client.login(account.name, PASSWORDS[index])
                except AuthenticationError:
                    continue
                working.append(index)
                # The storage key opens under this password's export key: the secret matches.
                assert await session.retrieve(account.key_id, Context.LOCAL_ONLY) == account.secret, note
                await session.logout()
            assert len(working) == 1, f"{note}: {account.name.decode()} opens with {working} of {candidates}"
            account.acked, account.changing_to = working[0], None
    return in_flight


async def test_a_password_change_survives_sigkill_as_the_old_or_the_new_password(tmp_path):
    seed = int(os.environ.get("KEYMGMT_DURABILITY_SEED", random.SystemRandom().getrandbits(32)))
    print(f"password durability: seed={seed} rounds={ROUNDS} clients={CLIENTS}")
    rng = random.Random(seed)
    directory = init_server_dir(tmp_path / "srv")
    server = ServerProcess(directory)
    accounts: list[_Account] = []
    try:
        for round_no in range(ROUNDS):
            note = f"seed={seed} round={round_no}"
            fresh = []
            async with _client(server) as client:
                for i in range(CLIENTS):
                    name = f"passwd-{round_no}-{i}@example.org".encode()
                    await client.register(name, PASSWORDS[0])
                    session = await client.login(name, PASSWORDS[0])
                    key_id = await session.generate()
                    secret = await session.retrieve(key_id, Context.LOCAL_ONLY)
                    assert secret is not None
                    await session.logout()
                    fresh.append(_Account(name, key_id, secret))
            accounts += fresh
            delay = await _churn(server, fresh, rng, note)
            assert server.proc.returncode == -9, note
            server = ServerProcess(directory)  # same files, new port
            in_flight = await _verify(server, accounts, note)
            changes = sum(a.changes for a in fresh)
            print(
                f"round {round_no}: {changes} changes acknowledged, killed {delay:.2f} s after the first; "
                f"{in_flight} accounts had a change under way"
            )
            assert changes >= 1, note
    finally:
        if server.proc.poll() is None:
            assert server.stop() == 0
        print("".join(line for line in server.log if "ERROR" in line or "Traceback" in line))
