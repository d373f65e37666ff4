"""P8: the same load against ``keymgmt-server serve --workers 1`` and ``--workers 2``.

Both servers are the real command (SQLite, WAL, synchronous=FULL), started once and
measured in interleaved windows (1, 2, 1, 2, ...), so drift on the machine hits both
alike. The load generator is this process, pinned to CPU 1 by ``python -m bench``;
the servers may run on every CPU. Server CPU is the sum over the server's processes
(the parent and its workers, or the single process) of utime + stime from
``/proc/PID/stat``, read before and after each window; the load generator's own CPU
(``time.process_time``) is reported next to it and never counted as the server's.
Every loop is bounded by a count or a deadline and only 127.0.0.1 is used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.client.connect import tls_connector
from keymgmt.adapters.server.config import render_config
from keymgmt.adapters.server.setupfile import create_server_setup_file
from keymgmt.adapters.tls import generate_dev_pki
from keymgmt_proto import Context, RetrieveRequest, SessionHandle, Status

from .common import PASSWORD

__all__ = ["WorkersServer", "measure", "summarize", "workers_server"]

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14 and 15 of the whole line


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@dataclass
class WorkersServer:
    process: subprocess.Popen[str]
    port: int
    ca: Path
    workers: int

    def pids(self) -> list[int]:
        """The server's processes: the parent and its workers (or the single process)."""
        return [self.process.pid, *_children(self.process.pid)]

    def cpu(self) -> dict[int, float]:
        return {pid: _stat_cpu_seconds(pid) for pid in self.pids()}


@contextlib.contextmanager
def workers_server(directory: Path, workers: int) -> Iterator[WorkersServer]:
    """``keymgmt-server serve --workers N`` with a fresh database, setup and dev PKI,
    allowed on every CPU, with the limits that would measure themselves lifted."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = generate_dev_pki(directory)
    create_server_setup_file(directory / "server_setup.bin")
    config = directory / "keymgmt-server.toml"
    config.write_text(
        render_config(
            {
                "server.port": 0,
                "server.max_connections": 5000,
                # Every load client runs on 127.0.0.1 (NET-13 would measure itself).
                "server.max_connections_per_address": 5000,
                "admission.rate": 1e9,
                "admission.burst": 1e9,
                "requests.per_user_rate": 1e9,  # (and so would the per-user rate)
                "requests.per_user_burst": 1e9,
                "sessions.max_requests": 2**31,
            }
        )
    )
    every_cpu = set(range(os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "keymgmt.adapters.cli.server", "serve", "--config", str(config)]
    process = subprocess.Popen(  # noqa: S603 - this package's own command line
        [*cmd, "--workers", str(workers), "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, every_cpu),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the benchmark server did not start: {line!r}")
        yield WorkersServer(process, int(line.rsplit(":", 1)[1]), pki.ca_cert, workers)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def measure(
    server: WorkersServer, connections: int, sessions: int, duration: float, warmup: float
) -> dict[str, float]:
    """Durable retrieves from ``connections`` TLS connections with ``sessions`` sessions each
    (one account per connection: NET-10 limits concurrent logins of one name)."""
    ca = server.ca
    clients = [
        KeymgmtClient(await tls_connector("127.0.0.1", server.port, cafile=ca)()) for _ in range(connections)
    ]
    state = {"measuring": False, "stop": False, "done": 0, "failed": 0}
    async with contextlib.AsyncExitStack() as stack:
        work = []
        for n, client in enumerate(clients):
            await stack.enter_async_context(client)
            account = b"p8-%s-%d@example.org" % (os.urandom(6).hex().encode(), n)
            await client.register(account, PASSWORD)
            first = await client.login(account, PASSWORD)
            key_id = await first.generate()
            body = RetrieveRequest(first.user_id, key_id, Context.NULL).encode()
            logged_in = [first] + [await client.login(account, PASSWORD) for _ in range(sessions - 1)]
            work += [(client, s.session_id, body) for s in logged_in]

        async def loop(client: KeymgmtClient, handle: SessionHandle, body: bytes) -> None:
            while not state["stop"]:
                answer = await client.request(handle, body)
                if state["measuring"]:
                    state["done"] += 1
                    state["failed"] += answer[0] != Status.OK

        async with anyio.create_task_group() as tg:
            for item in work:
                tg.start_soon(loop, *item)
            await anyio.sleep(warmup)
            cpu0, client0, t0 = server.cpu(), time.process_time(), time.perf_counter()
            state["measuring"] = True
            await anyio.sleep(duration)
            state["measuring"] = False
            cpu1, client1, t1 = server.cpu(), time.process_time(), time.perf_counter()
            state["stop"] = True
    if state["failed"]:
        raise RuntimeError(f"{state['failed']} retrieves failed")
    elapsed = t1 - t0
    per_process = sorted((cpu1[pid] - cpu0.get(pid, 0.0) for pid in cpu1), reverse=True)
    server_cpu = sum(per_process)
    return {
        "per_second": state["done"] / elapsed,
        "requests": state["done"],
        "seconds": elapsed,
        "server_cpu_per_request_us": server_cpu / max(1, state["done"]) * 1e6,
        "server_cores": server_cpu / elapsed,
        "busiest_process_cores": per_process[0] / elapsed,
        "client_cores": (client1 - client0) / elapsed,
    }


def summarize(runs: list[dict[str, float]], key: str) -> tuple[float, float, float]:
    """Median, lowest and highest of ``key`` over the runs."""
    values = [run[key] for run in runs]
    return statistics.median(values), min(values), max(values)
