"""Run every benchmark of issue #7, print the table and write JSON.

    python -m bench [--smoke] [--json PATH] [--only NAME ...]

Harness: pyperf for the micro-benchmarks (P1, P2, per-operation, client
OPAQUE): it runs each benchmark in several fresh worker processes, discards
warm-ups, stores every value and lets a benchmark return only the time of its
measured region (``bench_time_func``), which is what "server CPU with the
client's Argon2 excluded" needs. pytest-benchmark would tie the numbers to a
pytest run and to one process; these are standalone ratio measurements, so
pyperf fits better. The load drivers (P3, P5, P7) and the memory probe (P4)
are plain scripts around a real TLS server subprocess (see netload.py and
memory.py), because what they measure is not a function call.

Every line is measured next to its baseline in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pyperf

from . import memory, micro, netload
from .common import CLIENT_CPU_SET, Line, machine_description, pinned
from .memory import TARGET_BYTES_PER_IDLE_SESSION

ROOT = Path(__file__).resolve().parent.parent
#: Sizes and pyperf options of one mode.
Config = dict[str, Any]

FULL: Config = {
    "pyperf": {
        "channel": ["--processes", "6", "--values", "3", "--warmups", "1"],
        "login": ["--processes", "3", "--values", "3", "--warmups", "1", "--loops", "8"],
        "ops": ["--processes", "3", "--values", "3", "--warmups", "1", "--loops", "100"],
    },
    "memory_sessions": 10_000,
    "memory_validate": 32,
    #: (sessions, runs) on the real server; 10,000 real logins take several minutes.
    "memory_server": [(1000, 3), (10_000, 1)],
    "memory_server_warmup": memory.WARMUP_SESSIONS,
    "throughput_sessions": 100,
    "throughput_seconds": 5.0,
    "throughput_warmup": 1.0,
    "multiplex_sessions": 1000,
    "lag_logins": 20,
}
SMOKE: Config = {
    "pyperf": {group: ["--debug-single-value", "--loops", "2"] for group in micro.GROUPS},
    "memory_sessions": 200,
    "memory_validate": 4,
    "memory_server": [(32, 1)],
    "memory_server_warmup": 4,
    "throughput_sessions": 3,
    "throughput_seconds": 0.2,
    "throughput_warmup": 0.1,
    "multiplex_sessions": 3,
    "lag_logins": 3,
}


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_pyperf(group: str, options: list[str], workdir: Path) -> dict[str, float]:
    """Median seconds per benchmark of one pyperf group."""
    output = workdir / f"pyperf-{group}.json"
    cmd = [sys.executable, "-m", "bench.micro", "--group", group, "--quiet", "-o", str(output), *options]
    subprocess.run(cmd, check=True, cwd=ROOT)  # noqa: S603 - our own module
    suite = pyperf.BenchmarkSuite.load(str(output))
    return {bench.get_name(): bench.median() for bench in suite.get_benchmarks()}


def memory_probe(mode: str, meter: str, sessions: int) -> float:
    cmd = [
        sys.executable,
        "-m",
        "bench.memory",
        "--mode",
        mode,
        "--meter",
        meter,
        "--sessions",
        str(sessions),
    ]
    out = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout  # noqa: S603
    value: float = json.loads(out)["bytes_per_session"]
    return value


def bench_channel(cfg: Config, workdir: Path) -> list[Line]:
    r = run_pyperf("channel", cfg["pyperf"]["channel"], workdir)
    return [
        Line(
            "p1_channel",
            "P1 channel: 1 KiB request framed, sealed, parsed, opened",
            "us",
            r[micro.P1_CORE] * 1e6,
            r[micro.P1_RAW] * 1e6,
            "raw ChaCha20-Poly1305 seal+open",
            "max_ratio",
            8.0,
        )
    ]


def bench_login(cfg: Config, workdir: Path) -> list[Line]:
    r = run_pyperf("login", cfg["pyperf"]["login"], workdir)
    return [
        Line(
            "p2_login",
            "P2 login: server CPU (framing, OPAQUE, SQLite lookup, audit)",
            "ms",
            r[micro.P2_CORE] * 1e3,
            r[micro.P2_RAW] * 1e3,
            "opaque-ke-py server calls alone",
            "max_ratio",
            2.0,
        ),
        Line(
            "p7_client_opaque",
            "P7 client OPAQUE CPU per login (Argon2, holds the GIL)",
            "ms",
            r[micro.P7_CLIENT] * 1e3,
            r[micro.P2_RAW] * 1e3,
            "server OPAQUE calls per login",
        ),
    ]


def bench_ops(cfg: Config, workdir: Path) -> list[Line]:
    r = run_pyperf("ops", cfg["pyperf"]["ops"], workdir)
    return [
        Line(
            "op_retrieve",
            "Per op: retrieve, server CPU (SQLite read + audit write)",
            "us",
            r[micro.OP_RETRIEVE] * 1e6,
            r[micro.OP_RETRIEVE_CHANNEL] * 1e6,
            "channel-only processing",
        ),
        Line(
            "op_store",
            "Per op: store, server CPU (SQLite insert + audit write)",
            "us",
            r[micro.OP_STORE] * 1e6,
            r[micro.OP_STORE_CHANNEL] * 1e6,
            "channel-only processing",
        ),
    ]


def bench_memory(cfg: Config, workdir: Path) -> list[Line]:
    n = cfg["memory_sessions"]
    rss = memory_probe("sessions", "rss", n)
    rss_channels = memory_probe("channels", "rss", n)
    heap = memory_probe("sessions", "tracemalloc", n)
    heap_channels = memory_probe("channels", "tracemalloc", n)
    small = cfg["memory_validate"]
    real = memory_probe("real", "tracemalloc", small)
    standin = memory_probe("sessions", "tracemalloc", small)
    return [
        Line(
            "p4_memory",
            f"P4 memory per idle session at {n:,} sessions (RSS)",
            "B",
            rss,
            rss_channels,
            "bare Channel objects (the key state alone)",
            "max_value",
            TARGET_BYTES_PER_IDLE_SESSION,
            notes="Python heap (tracemalloc) per session vs per bare Channel: "
            f"{heap:,.0f} B vs {heap_channels:,.0f} B; real OPAQUE logins vs stand-ins at N={small}: "
            f"{real:,.0f} B vs {standin:,.0f} B",
            extra={
                "tracemalloc": heap,
                "tracemalloc_channels": heap_channels,
                "validate_real": real,
                "validate_standin": standin,
            },
        )
    ] + [
        bench_memory_server(workdir, sessions, runs, cfg, rss_channels)
        for sessions, runs in cfg["memory_server"]
    ]


def bench_memory_server(workdir: Path, sessions: int, runs: int, cfg: Config, channels: float) -> Line:
    """P4 as deployed: a real key server (TLS, real logins), RSS growth per idle session."""
    result = memory.server_per_session(workdir, sessions, runs, cfg["memory_server_warmup"])
    return Line(
        f"p4_memory_server_{sessions}",
        f"P4 memory per idle session, real server, {sessions:,} real logins (RSS)",
        "B",
        result["median"],
        channels,
        "bare Channel objects (the key state alone)",
        "max_value",
        TARGET_BYTES_PER_IDLE_SESSION,
        notes=f"median of {runs} run(s), range {result['min']:,.0f}-{result['max']:,.0f} B",
        extra=result,
    )


def bench_throughput(cfg: Config, workdir: Path) -> list[Line]:
    lines = []
    for backend in ("asyncio", "trio"):
        results = {}
        for nosync in (False, True):
            label = f"{backend}-{'nosync' if nosync else 'full'}"
            with netload.server_process(workdir / f"p3-{label}", backend, nosync=nosync) as server:
                results[nosync] = anyio.run(
                    netload.throughput,
                    server,
                    cfg["throughput_sessions"],
                    cfg["throughput_seconds"],
                    cfg["throughput_warmup"],
                )
        full, base = results[False], results[True]
        lines.append(
            Line(
                f"p3_throughput_{backend}",
                f"P3 durable retrieves/s, {cfg['throughput_sessions']} sessions, 1 TLS conn, {backend}",
                "/s",
                full["per_second"],
                base["per_second"],
                "same load, synchronous=OFF (not durable)",
                "min_value",
                5000.0,
                notes=f"server CPU busy {full['server_cpu_share']:.0%} (no-sync: "
                f"{base['server_cpu_share']:.0%}); client CPU {full['client_cpu_share']:.0%}",
                extra={f"full_{k}": v for k, v in full.items()} | {f"nosync_{k}": v for k, v in base.items()},
            )
        )
    return lines


def bench_multiplex(cfg: Config, workdir: Path) -> list[Line]:
    n = cfg["multiplex_sessions"]
    results = {}
    for shared in (True, False):
        with netload.server_process(workdir / f"p5-{'shared' if shared else 'separate'}") as server:
            results[shared] = anyio.run(partial(netload.open_sessions, server, n, 8, shared=shared))
    return [
        Line(
            "p5_multiplex",
            f"P5 server CPU per session, {n:,} sessions over 1 connection",
            "ms",
            results[True]["server_cpu_per_session"] * 1e3,
            results[False]["server_cpu_per_session"] * 1e3,
            f"over {n:,} TLS connections",
            "max_ratio",
            0.5,
        )
    ]


def bench_lag(cfg: Config, workdir: Path) -> list[Line]:
    n = cfg["lag_logins"]
    with netload.server_process(workdir / "p7") as server:
        stock = anyio.run(partial(netload.loop_lag, server, n, netload.AllStepsAtOnceClient))
        thread = anyio.run(partial(netload.loop_lag, server, n, netload.ThreadStepClient))
        proto = anyio.run(partial(netload.loop_lag, server, n))
    return [
        Line(
            "p7_loop_lag",
            f"P7 max event-loop lag, {n} concurrent logins (KeymgmtClient, one OPAQUE step per turn)",
            "ms",
            proto["max_lag_ms"],
            stock["max_lag_ms"],
            "all steps in one turn (the reader before)",
            "max_value",
            50.0,
            notes=f"p99 lag {proto['p99_lag_ms']:.1f} ms vs {stock['p99_lag_ms']:.1f} ms; "
            f"{n} logins took {proto['logins_seconds']:.2f} s vs {stock['logins_seconds']:.2f} s; "
            f"steps in worker threads instead: max lag {thread['max_lag_ms']:.1f} ms, "
            f"p99 {thread['p99_lag_ms']:.1f} ms",
            extra={f"prototype_{k}": v for k, v in proto.items()}
            | {f"stock_{k}": v for k, v in stock.items()}
            | {f"thread_{k}": v for k, v in thread.items()},
        )
    ]


BENCHES: dict[str, Callable[[Config, Path], list[Line]]] = {
    "channel": bench_channel,
    "login": bench_login,
    "ops": bench_ops,
    "throughput": bench_throughput,
    "memory": bench_memory,
    "multiplex": bench_multiplex,
    "lag": bench_lag,
}


def _fmt(value: float, unit: str) -> str:
    if unit == "B":
        return f"{value:,.0f} B"
    if unit == "/s":
        return f"{value:,.0f}/s"
    return f"{value:,.2f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def render_table(lines: list[Line]) -> str:
    rows = [("line", "value", "baseline", "ratio", "target", "result")]
    for line in lines:
        met = "report" if line.met is None else ("met" if line.met else "MISSED")
        rows.append(
            (
                line.title,
                _fmt(line.value, line.unit),
                f"{_fmt(line.baseline, line.unit)} ({line.baseline_label})",
                f"{line.ratio:.2f}x",
                line.target_text(),
                met,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: exercise every path in seconds")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results.json", help="where to write JSON"
    )
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    lines: list[Line] = []
    with tempfile.TemporaryDirectory(prefix="keymgmt-bench-") as tmp, pinned(CLIENT_CPU_SET):
        for name, bench in BENCHES.items():
            if args.only and name not in args.only:
                continue
            _log(f"{name} ...")
            t0 = time.perf_counter()
            lines += bench(cfg, Path(tmp))
            _log(f"{name} done in {time.perf_counter() - t0:.1f} s")
    table = render_table(lines)
    print(table)
    machine = machine_description()
    print(f"\nmachine: {machine['cpu_model']}, {machine['cores']} cores, Python {machine['python']}")
    print(f"load average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    document = {
        "mode": "smoke" if args.smoke else "full",
        "machine": machine,
        # Other work on the machine skews every number: the 1-minute load average, before and after.
        "load_average": [load_before, os.getloadavg()[0]],
        "seconds": time.perf_counter() - started,
        "lines": [line.to_json() for line in lines],
        "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    _log(f"wrote {args.json} ({document['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
