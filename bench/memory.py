"""P4: server memory per idle established session.

Building 10,000 sessions with real OPAQUE would cost 10,000 client Argon2 runs
(about 25 ms each). Instead, the whole login still goes through the real
``ServerConnection`` and ``SessionRegistry`` (frames, state table, Channel key
schedule, registry entry, WELCOME), and only the two OPAQUE server calls are
replaced by stand-ins that return messages of the real sizes and a random
64-byte session key. After a login the server keeps no OPAQUE state
(``opaque_value`` is cleared), so what stays in memory is the same; the
``validate`` step checks that by measuring the same per-session Python heap
with real OPAQUE logins at a small N.

The client is not a ClientConnection: its frames are encoded by hand and kept
nowhere, so everything measured is held by the server. Two numbers: the RSS
delta (includes OpenSSL's cipher contexts inside the AEAD objects, which
tracemalloc cannot see) and the tracemalloc delta (Python heap only). Each
runs in a fresh subprocess (``python -m bench.memory --sessions N``).
The baseline is the same number of bare ``Channel`` objects: the key state no
design can avoid.

``server_per_session`` measures the same on the deployed server, nothing stood in: a
real key server subprocess (``bench.netload``'s: the runtime, SQLite, TLS 1.3), one
account registered with real OPAQUE, then client subprocesses that log in for real
(Argon2 and all) over a few TLS connections and keep their sessions open, idle. The
figure is the growth of the server's VmRSS (``/proc/PID/status``) while the N sessions
opened, divided by N; the server had already carried a warm-up round of logins, which
stays open too. ``python -m bench.memory server --sessions N --runs R`` runs it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import IO

import anyio
import opaque_ke_py as ok

from keymgmt.adapters.client.async_client import KeymgmtClient, KeySession
from keymgmt.adapters.client.connect import tls_connector
from keymgmt_proto import (
    HEADER_SIZE,
    Channel,
    ClientConnection,
    Event,
    FrameType,
    LoginRequested,
    OpaqueSuite,
    RealOpaque,
    ServerConnection,
    ServerLoginStep,
    ServerSetup,
    SessionRegistry,
)
from keymgmt_proto.wire import (
    CREDENTIAL_FINALIZATION_SIZE,
    CREDENTIAL_REQUEST_SIZE,
    CREDENTIAL_RESPONSE_SIZE,
    REGISTRATION_UPLOAD_SIZE,
    LoginFinish,
    LoginResponse,
    LoginStart,
    decode_header,
    encode_frame,
)

from . import netload
from .common import ACCOUNT, BENCH_CONFIG, PASSWORD, Pair, drain_server

USER_ID = bytes(range(16))
RECORD = os.urandom(REGISTRATION_UPLOAD_SIZE)
#: The server's virtual time: the measurement lets none pass, so no session expires.
NOW = 0.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class _StandInServerLogin(RealOpaque):
    """The real suite, except that the server's login steps skip OPAQUE (stand-in logins)."""

    __slots__ = ()

    def server_login_start(
        self, setup: ServerSetup, registration_record: bytes, request: bytes, account_name: bytes
    ) -> ServerLoginStep:
        del setup, registration_record, request, account_name
        return ServerLoginStep(os.urandom(CREDENTIAL_RESPONSE_SIZE), os.urandom(32))

    def server_login_finish(self, state: bytes, finalization: bytes) -> bytes:
        del finalization
        return hashlib.sha512(state).digest()


class _AcceptAll:
    """Accepts every login for one account (no per-event state kept)."""

    def __init__(self, user_id: bytes, record: bytes) -> None:
        self.user_id = user_id
        self.record = record

    def __call__(self, conn: ServerConnection, event: Event) -> None:
        if isinstance(event, LoginRequested):
            conn.accept_login(event.session_id, self.user_id, self.record)


def _standin_login() -> tuple[bytes, Callable[[bytes], bytes]]:
    start = LoginStart(ACCOUNT, os.urandom(CREDENTIAL_REQUEST_SIZE)).encode()
    finish = LoginFinish(os.urandom(CREDENTIAL_FINALIZATION_SIZE)).encode()
    return start, lambda response: finish


def _real_login() -> tuple[bytes, Callable[[bytes], bytes]]:
    """A real OPAQUE client, held only in this closure (gone once the login is done)."""
    step = ok.client_login_start(PASSWORD)

    def finish(payload: bytes) -> bytes:
        _, _, _, length = decode_header_loose(payload)
        response = LoginResponse.decode(payload[HEADER_SIZE : HEADER_SIZE + length])
        result = ok.client_login_finish(PASSWORD, step.get_state(), response.credential_response)
        return LoginFinish(result.get_message()).encode()

    return LoginStart(ACCOUNT, step.get_message()).encode(), finish


def decode_header_loose(data: bytes) -> tuple[FrameType, int, int, int]:
    frame_type, session_id, length = decode_header(data[:HEADER_SIZE], 2**20)
    return frame_type, session_id, HEADER_SIZE, length


def build_sessions(
    server: ServerConnection,
    app: Callable[[ServerConnection, Event], None],
    n: int,
    client: Callable[[], tuple[bytes, Callable[[bytes], bytes]]] = _standin_login,
) -> None:
    """Log in ``n`` sessions through the real server core with hand-encoded client frames."""
    first = server._highest_session_id + 1
    for sid in range(first, first + n):
        start, finish = client()
        server.receive_data(encode_frame(FrameType.LOGIN_START, sid, start), NOW)
        drain_server(server, app)
        response = server.data_to_send()
        server.receive_data(encode_frame(FrameType.LOGIN_FINISH, sid, finish(response)), NOW)
        drain_server(server, app)
        server.data_to_send()


def _real_account(setup: ServerSetup) -> tuple[bytes, bytes]:
    from keymgmt.adapters.testing.memory import MemoryServerApp

    app = MemoryServerApp()
    Pair(ClientConnection(os.urandom), ServerConnection(setup, os.urandom, now=NOW), app, now=NOW).register()
    account = app.accounts[ACCOUNT]
    return account.user_id, account.registration_record


def measure(n: int, mode: str, meter: str) -> dict[str, float]:
    """Bytes per session for ``mode`` (sessions | real | channels), by ``meter`` (rss | tracemalloc)."""
    setup = ServerSetup.generate()
    client = _standin_login
    opaque: OpaqueSuite = RealOpaque()
    if mode == "real":
        user_id, record = _real_account(setup)
        client = _real_login
    else:
        user_id, record = USER_ID, RECORD
        opaque = _StandInServerLogin()
    registry = SessionRegistry(BENCH_CONFIG)
    server = ServerConnection(setup, os.urandom, registry=registry, now=NOW, opaque=opaque)
    app = _AcceptAll(user_id, record)
    keep: list[Channel] = []

    def build(count: int) -> None:
        if mode == "channels":
            keep.extend(Channel(os.urandom(64), is_client=False) for _ in range(count))
        else:
            build_sessions(server, app, count, client)

    build(min(16, n))  # warm every code path and cache before the baseline
    if meter == "tracemalloc":
        tracemalloc.start()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0] if meter == "tracemalloc" else _rss_bytes()
    build(n)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if meter == "tracemalloc" else _rss_bytes()
    result = {"bytes_per_session": (after - before) / n, "sessions": n}
    if mode != "channels":
        result["live_sessions"] = len(registry)
    return result


# ------------------------------------------------------------------ the real server

#: Client processes and TLS connections per process. Logins of one account take turns on
#: a client (NET-10), so each connection runs one at a time: 2 x 2 = 4 in flight, under
#: the throttle's 5 for one name.
CLIENT_PROCESSES = 2
CONNECTIONS_PER_PROCESS = 2
#: Logins (spread over the connections) the server carries before the "before" reading.
WARMUP_SESSIONS = 64
#: Sessions must outlive the time it takes to open them all (10,000 real logins: minutes).
SERVER_IDLE_TIMEOUT = 3600.0
#: How long the server is left to settle before each RSS reading.
SETTLE_SECONDS = 1.0
#: P4 (issue 14): at most 2 KiB of server memory per idle session.
TARGET_BYTES_PER_IDLE_SESSION = 2048.0


def vm_rss(pid: int) -> int:
    """A process's resident set size in bytes (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


async def _client_process(port: int, ca: Path, warmup: int, sessions: int, connections: int) -> None:
    """Log in ``warmup`` sessions, say WARM, wait for a line; log in ``sessions`` more, say
    READY, wait for a line; then log every session out and leave. Sessions stay idle."""
    connect = tls_connector("127.0.0.1", port, cafile=ca)
    kept: list[KeySession] = []

    async def logins(client: KeymgmtClient, count: int) -> None:
        for _ in range(count):
            kept.append(await client.login(ACCOUNT, PASSWORD))

    async def phase(total: int, word: str) -> None:
        async with anyio.create_task_group() as tg:
            for client, count in zip(clients, _shares(total, connections), strict=True):
                tg.start_soon(logins, client, count)
        print(f"{word} {len(kept)}", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(KeymgmtClient(await connect())) for _ in range(connections)
        ]
        await phase(warmup, "WARM")
        await phase(sessions, "READY")


def client_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory client")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--connections", type=int, default=CONNECTIONS_PER_PROCESS)
    args = parser.parse_args(argv)
    # What is measured is the server's memory, not anybody's CPU time: the clients' Argon2
    # may use every CPU (the server stays pinned to its own).
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    anyio.run(_client_process, args.port, args.ca, args.warmup, args.sessions, args.connections)


def _expect(stream: IO[str] | None, word: str) -> int:
    assert stream is not None
    line = stream.readline()
    if not line.startswith(word + " "):
        raise RuntimeError(f"a benchmark client failed (expected {word}, got {line!r})")
    return int(line.split()[1])


def _say(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("\n")
    process.stdin.flush()


async def _register(server: netload.Server) -> None:
    async with await netload._client(server) as client:
        await client.register(ACCOUNT, PASSWORD)


def server_run(
    workdir: Path, sessions: int, warmup: int = WARMUP_SESSIONS, processes: int = CLIENT_PROCESSES
) -> dict[str, float]:
    """One real server: bytes of its RSS per idle session for ``sessions`` real logins."""
    with netload.server_process(workdir, idle_timeout=SERVER_IDLE_TIMEOUT) as server:
        anyio.run(_register, server)
        pid = server.process.pid
        cmd = [
            sys.executable,
            "-m",
            "bench.memory",
            "client",
            "--port",
            str(server.port),
            "--ca",
            str(server.ca),
        ]
        clients = [
            subprocess.Popen(  # noqa: S603 - our own module
                [*cmd, "--warmup", str(warm), "--sessions", str(count)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for warm, count in zip(_shares(warmup, processes), _shares(sessions, processes), strict=True)
        ]
        try:
            warm = sum(_expect(c.stdout, "WARM") for c in clients)
            time.sleep(SETTLE_SECONDS)
            before = vm_rss(pid)
            t0 = time.perf_counter()
            for client in clients:
                _say(client)
            total = sum(_expect(c.stdout, "READY") for c in clients)
            seconds = time.perf_counter() - t0
            time.sleep(SETTLE_SECONDS)
            after = vm_rss(pid)
            if total != warm + sessions:
                raise RuntimeError(f"{total - warm} sessions opened, {sessions} asked for")
            for client in clients:
                _say(client)
            for client in clients:
                client.wait(timeout=120)
        finally:
            for client in clients:
                if client.poll() is None:
                    client.kill()
                    client.wait()
    return {
        "bytes_per_session": (after - before) / sessions,
        "sessions": sessions,
        "rss_before": before,
        "rss_after": after,
        "logins_seconds": seconds,
    }


def server_per_session(
    workdir: Path, sessions: int, runs: int, warmup: int = WARMUP_SESSIONS
) -> dict[str, float]:
    """``runs`` fresh real servers with ``sessions`` idle sessions each: median and range
    of the RSS growth per session."""
    values = [
        server_run(workdir / f"p4-server-{sessions}-{i}", sessions, warmup)["bytes_per_session"]
        for i in range(runs)
    ]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": runs,
        "sessions": sessions,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "server":
        parser = argparse.ArgumentParser(prog="python -m bench.memory server")
        parser.add_argument("--sessions", type=int, default=1000)
        parser.add_argument("--runs", type=int, default=3)
        args = parser.parse_args(sys.argv[2:])
        with tempfile.TemporaryDirectory(prefix="keymgmt-bench-") as tmp:
            result = server_per_session(Path(tmp), args.sessions, args.runs)
        json.dump(result, sys.stdout)
        verdict = "met" if result["median"] <= TARGET_BYTES_PER_IDLE_SESSION else "MISSED"
        print(
            f"\nP4 real server, {args.sessions:,} idle sessions: median {result['median']:,.0f} B per "
            f"session over {args.runs} run(s) (range {result['min']:,.0f}-{result['max']:,.0f} B); "
            f"target <= {TARGET_BYTES_PER_IDLE_SESSION:,.0f} B: {verdict}"
        )
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--mode", choices=("sessions", "real", "channels"), default="sessions")
    parser.add_argument("--meter", choices=("rss", "tracemalloc"), default="rss")
    args = parser.parse_args()
    json.dump(measure(args.sessions, args.mode, args.meter), sys.stdout)


if __name__ == "__main__":
    main()
