"""Load drivers over loopback TLS 1.3: P3 throughput, P5 multiplexing, P7 client event-loop lag.

The key server is a real ``KeyServerRuntime`` (SQLite, WAL, acknowledged commits synced)
in a subprocess pinned to CPU 0 (``python -m bench.netload serve ...``); the
client is the calling process, pinned to the other CPU. Server CPU is read
from ``/proc/PID/task/*/schedstat`` (nanoseconds of CPU actually used by the
server process), so the client's own work never counts. Every loop is bounded
by a count or a deadline and only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from keymgmt.adapters.client.async_client import KeymgmtClient, KeySession
from keymgmt.adapters.client.connect import tls_connector
from keymgmt.adapters.server.app import PasswordRegistrar
from keymgmt.adapters.server.runtime import KeyServerRuntime, ServerSettings
from keymgmt.adapters.server.setupfile import create_server_setup_file
from keymgmt.adapters.tls import generate_dev_pki
from keymgmt_proto import (
    ClientConnection,
    Context,
    Op,
    OpaqueStepRequired,
    RetrieveRequest,
    SecretKind,
    SecretResponse,
    SessionHandle,
    Status,
    encode_response,
)

from .common import ACCOUNT, BENCH_CONFIG, PASSWORD, process_cpu_seconds

SERVER_CPU = 0
CLIENT_CPU = 1


# ------------------------------------------------------------------ the server process


#: What the channel-only server answers every request with: an OK retrieve answer of the
#: real size (a generated secret: 60 bytes sealed, 32 bytes of AD).
CANNED_RETRIEVE = encode_response(Status.OK, SecretResponse(SecretKind.GENERATED, bytes(60), bytes(32)))


async def _serve(directory: Path, channel_only: bool, idle_timeout: float | None = None) -> None:
    protocol = BENCH_CONFIG
    if idle_timeout is not None:
        protocol = dataclasses.replace(protocol, idle_timeout=idle_timeout)
    settings = ServerSettings(
        storage_path=directory / "keyserver.db",
        setup_path=directory / "server_setup.bin",
        cert_path=directory / "pki" / "server.pem",
        key_path=directory / "pki" / "server.key",
        port=0,
        max_connections=5000,
        protocol=protocol,
        # Every load client runs on 127.0.0.1: per-address limits (NET-13) would measure
        # themselves, not the server.
        max_connections_per_address=5000,
        admission_rate=1e9,
        admission_burst=1e9,
        # One account runs every session of the load: the per-user rate would measure itself.
        user_request_rate=1e9,
        user_request_burst=1e9,
    )
    runtime = KeyServerRuntime(settings)
    runtime.keyserver.max_keys_per_user = 2**31  # P9 stores more keys than the default limit
    if channel_only:
        # BASELINE ONLY: logins and stores are real, retrieves are answered without storage (no
        # read, no audit entry, nothing to commit): TLS, framing, channel, driver, group commit.
        real = runtime.keyserver.answer

        def answer(
            session: SessionHandle,
            user_id: bytes,
            body: bytes,
            *,
            registrar: PasswordRegistrar | None = None,
            credentials: int | None = None,
        ) -> bytes:
            if body[:1] == bytes([Op.RETRIEVE]):
                return CANNED_RETRIEVE
            return real(session, user_id, body, registrar=registrar, credentials=credentials)

        runtime.keyserver.answer = answer  # type: ignore[method-assign]
    profile = os.environ.get("KEYMGMT_BENCH_PROFILE")
    if profile:  # bench.serverprof: SIGUSR1 starts a cProfile of the event loop, SIGUSR2 saves it
        import cProfile

        profiler = cProfile.Profile()
        loop = asyncio.get_running_loop()

        def save() -> None:
            profiler.disable()
            profiler.dump_stats(profile)

        loop.add_signal_handler(signal.SIGUSR1, profiler.enable)
        loop.add_signal_handler(signal.SIGUSR2, save)
    async with anyio.create_task_group() as tg:
        port = await tg.start(runtime.run)
        print(f"PORT {port}", flush=True)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                if os.environ.get("KEYMGMT_BENCH_STATS"):  # bench.serverprof: batches committed
                    storage = runtime.keyserver.storage
                    print(
                        f"batches {runtime.committer.batches} syncs {getattr(storage, 'syncs', '?')}",
                        file=sys.stderr,
                    )
                runtime.shutdown()
                break


def serve_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.netload serve")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--cpu", type=int, default=SERVER_CPU)
    parser.add_argument("--channel-only", action="store_true")
    parser.add_argument("--idle-timeout", type=float, help="sessions' idle timeout (default: the policy's)")
    args = parser.parse_args(argv)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {args.cpu})
    anyio.run(_serve, args.dir, args.channel_only, args.idle_timeout, backend=args.backend)


@dataclass
class Server:
    process: subprocess.Popen[str]
    port: int
    ca: Path

    @property
    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)


@contextlib.contextmanager
def server_process(
    directory: Path,
    backend: str = "asyncio",
    *,
    channel_only: bool = False,
    idle_timeout: float | None = None,
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """A key server in a pinned subprocess, with a fresh database, setup and dev PKI
    (``idle_timeout``: the sessions' idle timeout, when the load takes longer to build;
    ``prefix``: a command that runs it, e.g. valgrind; ``env``: added to its environment)."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = generate_dev_pki(directory / "pki")
    create_server_setup_file(directory / "server_setup.bin")
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "bench.netload",
        "serve",
        "--dir",
        str(directory),
        "--backend",
        backend,
    ]
    if channel_only:
        cmd.append("--channel-only")
    if idle_timeout is not None:
        cmd += ["--idle-timeout", str(idle_timeout)]
    environment = None if env is None else {**os.environ, **env}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=environment)  # noqa: S603 - our own module
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the benchmark server did not start: {line!r}")
        yield Server(process, int(line.split()[1]), pki.ca_cert)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _client(server: Server, cls: type[KeymgmtClient] = KeymgmtClient) -> KeymgmtClient:
    """A client over one new verified TLS 1.3 connection.

    The client gets the stream, not the connector: given a connector, KeymgmtClient
    starts a reconnection when its own exit closes the stream (observed here: one
    extra TCP connection and an aborted TLS handshake per client), which would
    add server work to every measurement."""
    stream = await tls_connector("127.0.0.1", server.port, cafile=server.ca)()
    return cls(stream)


# ------------------------------------------------------------------ P3: throughput


async def throughput(
    server: Server,
    sessions: int,
    duration: float,
    warmup: float,
    connections: int = 1,
    operation: str = "retrieve",
    account: bytes = ACCOUNT,
) -> dict[str, float]:
    """Durable operations per second from ``sessions`` sessions spread over ``connections``
    TLS connections, each session starting its next operation as soon as it has an answer:
    ``retrieve`` (RETRIEVE, context NULL, as raw requests) or ``store`` (``generate()``, the
    client's whole store: seal, KEY-2 checks, local copy; one request per store once a
    session has its first next key id)."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(await _client(server)) for _ in range(connections)]
        await clients[0].register(account, PASSWORD)
        first = await clients[0].login(account, PASSWORD)
        key_id = await first.generate()
        logged_in = [(clients[0], first)]
        for n in range(1, sessions):
            client = clients[n % connections]
            logged_in.append((client, await client.login(account, PASSWORD)))
        body = RetrieveRequest(first.user_id, key_id, Context.NULL).encode()
        state = {"measuring": False, "stop": False, "done": 0, "failed": 0}

        async def worker(client: KeymgmtClient, session: KeySession) -> None:
            while not state["stop"]:
                if operation == "store":
                    await session.generate()
                    ok = True
                else:
                    ok = (await client.request(session.session_id, body))[0] == Status.OK
                if state["measuring"]:
                    state["done"] += 1
                    state["failed"] += not ok

        async with anyio.create_task_group() as tg:
            for client, session in logged_in:
                tg.start_soon(worker, client, session)
            await anyio.sleep(warmup)
            cpu0, client0, t0 = server.cpu_seconds, time.process_time(), time.perf_counter()
            state["measuring"] = True
            await anyio.sleep(duration)
            state["measuring"] = False
            cpu1, client1, t1 = server.cpu_seconds, time.process_time(), time.perf_counter()
            state["stop"] = True
    elapsed = t1 - t0
    if state["failed"]:
        raise RuntimeError(f"{state['failed']} {operation}s failed")
    return {
        "per_second": state["done"] / elapsed,
        "requests": state["done"],
        "seconds": elapsed,
        "server_cpu_share": (cpu1 - cpu0) / elapsed,
        "server_cpu_per_request_us": (cpu1 - cpu0) / max(1, state["done"]) * 1e6,
        "client_cpu_share": (client1 - client0) / elapsed,
    }


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """Another process keeping one core busy (a spinning loop, placed by the OS)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


# ------------------------------------------------------------------ P5: multiplexing


async def open_sessions(server: Server, count: int, concurrency: int, *, shared: bool) -> dict[str, float]:
    """Server CPU to open ``count`` request sessions over one connection (``shared``) or
    over one new TLS connection each, ``concurrency`` logins at a time. Login ``i`` uses
    account ``i % concurrency``: a client takes turns for logins of one account (NET-10
    counts each as a failed attempt until it succeeds), so one account per concurrent
    login keeps both cases equally parallel. Registration happens before the measurement."""
    accounts = [ACCOUNT + b"-p5-%d" % i for i in range(concurrency)]
    async with await _client(server) as client:
        for account in accounts:
            await client.register(account, PASSWORD)
    limiter = anyio.CapacityLimiter(concurrency)
    await anyio.sleep(0.2)
    cpu0, t0 = server.cpu_seconds, time.perf_counter()
    if shared:
        async with await _client(server) as client:

            async def one_shared(account: bytes) -> None:
                async with limiter:
                    await client.login(account, PASSWORD)

            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(one_shared, accounts[i % concurrency])
            await anyio.sleep(0.2)
    else:

        async def one_connection(account: bytes) -> None:
            async with limiter, await _client(server) as own:
                await own.login(account, PASSWORD)

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one_connection, accounts[i % concurrency])
        await anyio.sleep(0.2)  # let the server finish closing the last connections
    cpu1, t1 = server.cpu_seconds, time.perf_counter()
    return {"server_cpu_per_session": (cpu1 - cpu0) / count, "seconds": t1 - t0, "sessions": count}


# ------------------------------------------------------------------ P7: client event loop


class AllStepsAtOnceClient(KeymgmtClient):
    """Baseline for P7: the client as it was before it paced its OPAQUE steps, running
    every step that a burst of LOGIN_RESPONSE frames asks for in one event-loop turn."""

    async def _run_opaque_steps(self) -> None:
        while self._steps:
            conn, step = self._steps.popleft()
            conn.complete_opaque_step(step.run(conn.opaque))
        self._dispatch_all()


class ThreadStepClient(KeymgmtClient):
    """Comparison for P7: every OPAQUE step in a worker thread (``anyio.to_thread``), all
    at once. The binding holds the GIL through Argon2, so this frees the loop no better."""

    async def _run_opaque_steps(self) -> None:
        async def one(conn: ClientConnection, step: OpaqueStepRequired) -> None:
            result = await anyio.to_thread.run_sync(step.run, conn.opaque)
            conn.complete_opaque_step(result)
            if conn is self._conn:
                self._dispatch_all()
                await self._flush()

        steps = list(self._steps)
        self._steps.clear()
        async with anyio.create_task_group() as tg:
            for conn, step in steps:
                tg.start_soon(one, conn, step)


async def loop_lag(server: Server, logins: int, cls: type[KeymgmtClient] = KeymgmtClient) -> dict[str, float]:
    """Worst event-loop lag seen by a 2 ms ticker while ``logins`` logins run concurrently
    on one ``cls`` client."""
    # One account per login: a client takes turns for logins of one account (NET-10).
    accounts = [ACCOUNT + b"-%d" % i for i in range(logins)]
    async with await _client(server) as setup_client:
        for account in accounts:
            with contextlib.suppress(Exception):  # already there from the previous run
                await setup_client.register(account, PASSWORD)
    lags: list[float] = []
    async with await _client(server, cls) as client:
        done = anyio.Event()

        async def ticker() -> None:
            while not done.is_set():
                start = anyio.current_time()
                await anyio.sleep(0.002)
                lags.append(anyio.current_time() - start - 0.002)

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            async with anyio.create_task_group() as logins_tg:
                for account in accounts:
                    logins_tg.start_soon(client.login, account, PASSWORD)
            done.set()
        elapsed = time.perf_counter() - t0
    lags.sort()
    return {
        "max_lag_ms": lags[-1] * 1e3,
        "p99_lag_ms": lags[int(0.99 * (len(lags) - 1))] * 1e3,
        "logins_seconds": elapsed,
        "logins": logins,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve_main(sys.argv[2:])
        return
    raise SystemExit(
        "usage: python -m bench.netload serve --dir DIR [--backend asyncio|trio] [--channel-only]"
    )


if __name__ == "__main__":
    main()
