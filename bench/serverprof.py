"""Instructions (or a Python profile) of the real P3 server process, per retrieve (or store).

``bench.instructions`` counts one request's path in process; this counts the real
``bench.netload`` server subprocess (asyncio, TLS 1.3, SQLite, the driver's batched path,
the group commit and its thread) under P3's load: ``--sessions`` sessions over one TLS
connection, each looping on RETRIEVE. After the logins and a warm-up, every session
sends exactly ``--requests`` retrieves and the measured region is switched on only
while they run, so the count is exact::

    .venv/bin/python -m bench.serverprof callgrind --sessions 100 --requests 50
    .venv/bin/python -m bench.serverprof callgrind --channel-only ...   # the P3 baseline
    .venv/bin/python -m bench.serverprof cprofile --requests 200        # where it goes, by function
    .venv/bin/python -m bench.serverprof callgrind --operation store    # P10's stores instead

``callgrind`` runs the server under ``valgrind --tool=callgrind --instr-atstart=no``
and switches instrumentation on and off with ``callgrind_control``; it prints the
instructions per retrieve (every thread of the server; the kernel's work is not counted).
``cprofile`` profiles the server's event-loop thread with cProfile (switched on and off by
SIGUSR1 and SIGUSR2) and prints the top functions by own time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from keymgmt.adapters.client.async_client import KeySession
from keymgmt_proto import Context, RetrieveRequest, Status

from .common import ACCOUNT, PASSWORD
from .netload import CLIENT_CPU, Server, _client, server_process

__all__ = ["main"]


async def _load(
    server: Server,
    sessions: int,
    requests: int,
    warmup: int,
    on: object,
    off: object,
    operation: str = "retrieve",
) -> int:
    """Logins, ``warmup`` operations per session, then ``requests`` per session between
    ``on()`` and ``off()``; the number of operations measured. ``operation`` is P3's raw
    ``retrieve`` or P10's ``store`` (the client's whole ``generate()``)."""
    async with await _client(server) as client:
        await client.register(ACCOUNT, PASSWORD)
        first = await client.login(ACCOUNT, PASSWORD)
        key_id = await first.generate()
        logged_in = [first] + [await client.login(ACCOUNT, PASSWORD) for _ in range(sessions - 1)]
        body = RetrieveRequest(first.user_id, key_id, Context.NULL).encode()

        async def loop(session: KeySession, count: int) -> None:
            for _ in range(count):
                if operation == "store":
                    await session.generate()
                    continue
                status = (await client.request(session.session_id, body))[0]
                if status != Status.OK:
                    raise RuntimeError(f"a retrieve failed: {status}")

        async def all_sessions(count: int) -> None:
            async with anyio.create_task_group() as tg:
                for session in logged_in:
                    tg.start_soon(loop, session, count)

        await all_sessions(warmup)
        await anyio.to_thread.run_sync(on)  # type: ignore[arg-type]
        await all_sessions(requests)
        await anyio.to_thread.run_sync(off)  # type: ignore[arg-type]
    return sessions * requests


def _callgrind(args: argparse.Namespace, directory: Path) -> None:
    out = directory / "callgrind.out"
    prefix = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        *(["--dump-instr=no"] if not args.dump_instr else ["--dump-instr=yes"]),
    ]
    with server_process(directory / "srv", channel_only=args.channel_only, prefix=prefix) as server:
        pid = server.process.pid

        def control(*flags: str) -> None:
            subprocess.run(["callgrind_control", *flags, str(pid)], check=True, capture_output=True)  # noqa: S603,S607

        count = anyio.run(
            _load,
            server,
            args.sessions,
            args.requests,
            args.warmup,
            lambda: control("-i", "on"),
            lambda: control("-i", "off"),
            args.operation,
        )
        control("-d")  # dump what was counted
        time.sleep(0.5)
    dumps = sorted(directory.glob("callgrind.out*"))
    total = 0
    for dump in dumps:
        command = ["callgrind_annotate", "--threshold=100", str(dump)]
        text = subprocess.run(command, capture_output=True, text=True, check=False).stdout  # noqa: S603
        match = re.search(r"^\s*([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", text, re.M)
        if match:
            total += int(match.group(1).replace(",", ""))
    which = "channel-only" if args.channel_only else "real"
    print(f"{which} server: {total:,} instructions over {count} {args.operation}s")
    print(f"per {args.operation}: {total / count:,.0f} instructions")
    if args.keep:
        print("dumps:", *dumps)


def _cprofile(args: argparse.Namespace, directory: Path) -> None:
    out = directory / "server.prof"
    env = {"KEYMGMT_BENCH_PROFILE": str(out)}
    with server_process(directory / "srv", channel_only=args.channel_only, env=env) as server:
        pid = server.process.pid
        count = anyio.run(
            _load,
            server,
            args.sessions,
            args.requests,
            args.warmup,
            lambda: os.kill(pid, signal.SIGUSR1),
            lambda: os.kill(pid, signal.SIGUSR2),
            args.operation,
        )
        for _ in range(100):
            if out.exists():
                break
            time.sleep(0.1)
    import pstats

    time.sleep(0.3)
    print(f"{count} {args.operation}s")
    stats = pstats.Stats(str(out))
    stats.sort_stats(args.sort).print_stats(args.top)
    if args.keep:
        print("profile:", out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serverprof", description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=["callgrind", "cprofile"])
    parser.add_argument("--operation", choices=["retrieve", "store"], default="retrieve")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--requests", type=int, default=50, help="measured retrieves per session")
    parser.add_argument("--warmup", type=int, default=10, help="retrieves per session before")
    parser.add_argument("--channel-only", action="store_true", help="the P3 baseline server")
    parser.add_argument("--dump-instr", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep the output in this directory")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=45)
    args = parser.parse_args(argv)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {CLIENT_CPU})
    with contextlib.ExitStack() as stack:
        if args.keep:
            directory = args.keep
            directory.mkdir(parents=True, exist_ok=True)
        else:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serverprof-")))
        (_callgrind if args.tool == "callgrind" else _cprofile)(args, directory)


if __name__ == "__main__":
    main(sys.argv[1:])
