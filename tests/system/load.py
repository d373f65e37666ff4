"""Bounded load test on loopback: N clients x M operations against a key-server process.

::

    python -m tests.system.load                           # 20 clients x 200 operations, asyncio and trio
    python -m tests.system.load --clients 50 --requests 1000 --backend trio --time-limit 900

For each backend the server runs as a child process on that backend (asyncio:
the real ``keymgmt-server serve``; trio: tests/support/serve_backend.py), so its memory
can be read from /proc. The clients run in this process on the same backend,
each with its own TLS 1.3 connection to 127.0.0.1 and its own account, and
cycle through every operation (import, generate, retrieve in all three
contexts with the local copy removed so the server answers, list, audit,
delete, retrieve of a deleted key, logout and a fresh login every
``SESSION_OPS`` operations). Every answer is checked against a model of what
the client stored. Passing means: zero errors, every answer correct, nothing
logged at ERROR by the server, all within the time limit, and the server's
memory flat after warm-up (see ``MemoryCheck``).

Exit code 0 when every backend passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from keymgmt.adapters.client.async_client import KeymgmtClient, KeymgmtError, KeySession, NotFoundError
from keymgmt.adapters.client.connect import tls_connector
from keymgmt.adapters.client.localstore import LocalStore
from keymgmt_proto import Action, AuditType, Context, Outcome, SecretKind, encode_portable, open_secret

from ..support.server_proc import ServerProcess, init_server_dir

PASSWORD = b"load test password, not a real one"
#: Operations per login session; then the client logs out and logs in again.
SESSION_OPS = 50
#: Keys a client keeps at most (older ones are deleted), so the database stays small.
MAX_KEYS = 8
#: The share of each client's operations that is warm-up (memory is measured after it).
WARMUP_SHARE = 0.25


@dataclass(frozen=True)
class MemoryCheck:
    """Server RSS after warm-up and at the end may differ by at most 20% + 5 MiB.

    Why so generous: after warm-up every per-connection and per-session structure
    exists and the bounded ones (16-entry reply caches, reservations) are full, but
    RSS still moves without any leak: SQLite's page cache (2 MiB per connection by
    default) fills as the database grows, pymalloc keeps arenas that are only
    partly used, glibc does not return freed heap pages at once, and TLS buffers
    come and go with the traffic. Those are bounded and a few MiB at most; a real
    leak grows with the request count, so the long run (``make load``: thousands of
    requests after warm-up) pushes any leak of a few KiB per request past it.
    """

    relative: float = 0.20
    absolute_kib: int = 5 * 1024

    def limit_kib(self, warm_kib: int) -> int:
        return int(warm_kib * self.relative) + self.absolute_kib


@dataclass
class LoadReport:
    backend: str
    clients: int
    requests: int
    session_ops: int = SESSION_OPS
    operations: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    rss_start_kib: int = 0
    rss_warm_kib: int = 0
    rss_end_kib: int = 0
    memory: MemoryCheck = field(default_factory=MemoryCheck)

    @property
    def growth_kib(self) -> int:
        return self.rss_end_kib - self.rss_warm_kib

    @property
    def memory_flat(self) -> bool:
        return self.growth_kib <= self.memory.limit_kib(self.rss_warm_kib)

    @property
    def passed(self) -> bool:
        return not self.errors and self.operations == self.clients * self.requests and self.memory_flat

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict} {self.backend}: {self.clients} clients x {self.requests} operations = "
            f"{self.operations} in {self.elapsed:.1f} s ({self.operations / max(self.elapsed, 1e-9):.0f}/s); "
            f"{len(self.errors)} errors; server RSS {self.rss_start_kib} KiB at start, "
            f"{self.rss_warm_kib} KiB after warm-up, {self.rss_end_kib} KiB at the end "
            f"(growth {self.growth_kib:+d} KiB, limit {self.memory.limit_kib(self.rss_warm_kib)} KiB)"
        )


class WrongAnswer(Exception):
    """An answer that differs from the client's model."""


class _Client:
    """One client: its connection, account, current session and model of its keys."""

    def __init__(self, index: int, port: int, cafile: Path, seed: int) -> None:
        self.index = index
        self.account = f"load-{index}@example.org".encode()
        self.connect = tls_connector("127.0.0.1", port, cafile=cafile, timeout=30)
        self.rng = random.Random(seed)
        self.keys: dict[bytes, tuple[SecretKind, bytes]] = {}  # key id -> (kind, secret)
        self.client: KeymgmtClient | None = None
        self.session: KeySession | None = None

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            raise WrongAnswer(f"client {self.index}: {what}")

    def _forget_local(self, key_id: bytes) -> None:
        assert self.client is not None and self.session is not None
        self.client.local_store.delete(self.session.user_id, key_id)

    def _pick(self) -> bytes:
        return self.rng.choice(sorted(self.keys))

    async def operation(self, number: int) -> None:
        assert self.client is not None and self.session is not None
        session = self.session
        step = number % 10
        if step in (0, 5) or not self.keys:
            secret = self.rng.randbytes(self.rng.randint(1, 255))
            key_id = await session.import_secret(encode_portable(secret))
            self.check(len(key_id) == 16 and key_id not in self.keys, "import returned a bad key id")
            self.keys[key_id] = (SecretKind.IMPORTED, secret)
        elif step == 1:
            key_id = await session.generate()
            self.check(len(key_id) == 16 and key_id not in self.keys, "generate returned a bad key id")
            local = self.client.local_store.get(session.user_id, key_id)
            assert local is not None and session._ops._storage_key is not None
            secret = open_secret(session._ops._storage_key, local.ciphertext, local.associated_data)
            self.check(len(secret) == 32, "generated secret is not 32 bytes")
            self.keys[key_id] = (SecretKind.GENERATED, secret)
        elif step in (2, 6):
            key_id = self._pick()
            self._forget_local(key_id)  # the server must answer
            secret = await session.retrieve(key_id, Context.LOCAL_ONLY)
            self.check(secret == self.keys[key_id][1], "retrieve returned another secret")
        elif step == 3:
            key_id = self._pick()
            self._forget_local(key_id)
            portable = await session.export(key_id)
            self.check(portable == encode_portable(self.keys[key_id][1]), "export returned another secret")
        elif step == 4:
            key_id = self._pick()
            self._forget_local(key_id)
            self.check(await session.retrieve(key_id, Context.NULL) is None, "NULL retrieve returned data")
        elif step == 7:
            listed = await session.list_keys()
            self.check({k.key_id: k.kind for k in listed} == {k: v[0] for k, v in self.keys.items()}, "list")
        elif step == 8:
            key_id = self._pick()
            entries = await session.audit(AuditType.KEY_ONLY, key_ids=[key_id])
            stored = Action.IMPORT if self.keys[key_id][0] is SecretKind.IMPORTED else Action.GENERATE
            self.check(
                any(e.action is stored and e.outcome is Outcome.SUCCESS for e in entries)
                and all(e.key_id == key_id for e in entries),
                "audit misses the store or names another key",
            )
        else:
            key_id = self._pick()
            await session.delete(key_id)
            del self.keys[key_id]
            try:
                await session.retrieve(key_id, Context.LOCAL_ONLY)
            except NotFoundError:
                pass
            else:
                raise WrongAnswer(f"client {self.index}: a deleted key was retrieved")
        if len(self.keys) > MAX_KEYS:
            oldest = next(iter(self.keys))
            await session.delete(oldest)
            del self.keys[oldest]

    async def relogin(self) -> None:
        assert self.client is not None
        if self.session is not None:
            await self.session.logout()
        self.session = await self.client.login(self.account, PASSWORD)


async def _drive(report: LoadReport, server: ServerProcess, seed: int, time_limit: float) -> None:
    rng = random.Random(seed)
    cafile = server.directory / "ca.pem"
    clients = [_Client(i, server.port, cafile, rng.getrandbits(64)) for i in range(report.clients)]
    warmup = int(report.requests * WARMUP_SHARE)
    warmed = anyio.Event()
    arrived = [0]
    resume = anyio.Event()

    def arrive() -> None:
        arrived[0] += 1
        if arrived[0] == len(clients):
            warmed.set()

    async def run_client(c: _Client) -> None:
        at_barrier = False
        try:
            async with KeymgmtClient(c.connect, local_store=LocalStore(":memory:")) as client:
                c.client = client
                await client.register(c.account, PASSWORD)
                for number in range(report.requests):
                    if number % report.session_ops == 0:
                        await c.relogin()
                    if number == warmup:  # all clients warmed up: the server's RSS is read here
                        at_barrier = True
                        arrive()
                        await resume.wait()
                    await c.operation(number)
                    report.operations += 1
                assert c.session is not None
                await c.session.logout()
        except (KeymgmtError, WrongAnswer) as exc:
            report.errors.append(f"client {c.index}: {type(exc).__name__}: {exc}")
        finally:
            if not at_barrier:  # a failed client must not hold the others at the barrier
                arrive()

    started = time.monotonic()
    with anyio.move_on_after(time_limit) as scope:
        async with anyio.create_task_group() as tg:
            for c in clients:
                tg.start_soon(run_client, c)
            await warmed.wait()
            report.rss_warm_kib = server.rss_kib()
            resume.set()
    report.elapsed = time.monotonic() - started
    if scope.cancelled_caught:
        report.errors.append(f"time limit of {time_limit:.0f} s reached after {report.operations} operations")


def run_load(
    backend: str,
    clients: int = 20,
    requests: int = 200,
    *,
    time_limit: float = 600.0,
    seed: int | None = None,
    session_ops: int = SESSION_OPS,
    server_env: dict[str, str] | None = None,
    workdir: Path | None = None,
) -> LoadReport:
    """Start a server on ``backend``, run the load, stop the server; returns the report.

    ``session_ops``: operations per login session. ``server_env``: extra environment
    for the server process."""
    if backend not in ("asyncio", "trio"):
        raise ValueError("backend is asyncio or trio")
    seed = random.SystemRandom().getrandbits(32) if seed is None else seed
    report = LoadReport(backend, clients, requests, session_ops)
    with tempfile.TemporaryDirectory(prefix="keymgmt-load-", dir=workdir) as tmp:
        directory = init_server_dir(Path(tmp) / "srv")
        # asyncio: the real CLI; trio: the same runtime on trio.
        # Every client runs on 127.0.0.1: lift the per-address limits (NET-13), which this
        # test does not measure (tests/server/test_admission.py does).
        env = {
            "KEYMGMT_MAX_CONNECTIONS_PER_ADDRESS": "100000",
            "KEYMGMT_ADMISSION_RATE": "1000000",
            "KEYMGMT_ADMISSION_BURST": "1000000",
            **(server_env or {}),
        }
        server = ServerProcess(directory, backend=None if backend == "asyncio" else backend, env=env)
        try:
            report.rss_start_kib = server.rss_kib()
            anyio.run(_drive, report, server, seed, time_limit, backend=backend)
            report.rss_end_kib = server.rss_kib()
        finally:
            code = server.stop()
        if code != 0:
            report.errors.append(f"server exited with {code} on SIGTERM")
        for line in server.log:
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
                report.errors.append(f"server log: {line.strip()}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.system.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    parser.add_argument("--requests", type=int, default=200, help="operations per client (default 200)")
    parser.add_argument(
        "--backend", action="append", choices=["asyncio", "trio"], help="repeatable; default both"
    )
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per backend (default 600)")
    parser.add_argument("--seed", type=int, help="seed for the clients' choices (default: random, printed)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        parser.error("--clients and --requests must be at least 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    print(f"load: seed={seed}", flush=True)
    ok = True
    for backend in args.backend or ["asyncio", "trio"]:
        report = run_load(backend, args.clients, args.requests, time_limit=args.time_limit, seed=seed)
        print(report.summary(), flush=True)
        for error in report.errors[:20]:
            print(f"  {error}", flush=True)
        ok &= report.passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
