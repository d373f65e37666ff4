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
import contextlib
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

from keymgmt.adapters.client.async_client import KeymgmtClient

from . import browser, memory, micro, netload, workers
from .common import CLIENT_CPU_SET, Line, machine_description, pinned, spread
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
    "login_network": 200,
    "login_network_runs": 5,
    "throughput_sessions": 100,
    "throughput_connections": [10, 50],
    "throughput_runs": 5,
    "throughput_seconds": 4.0,
    "throughput_warmup": 1.0,
    "multiplex_sessions": 1000,
    "lag_logins": 20,
    "lag_runs": 5,
    # P8: connections x sessions each, interleaved windows per worker count
    "workers_connections": 8,
    "workers_sessions": 4,
    "workers_runs": 5,
    "workers_seconds": 3.0,
    "workers_warmup": 1.0,
    # the browser client (headless Chromium over wss) next to the Python client
    "browser_runs": 5,
    "browser_requests": 200,
}
SMOKE: Config = {
    "pyperf": {group: ["--debug-single-value", "--loops", "2"] for group in micro.GROUPS},
    # Enough that the RSS grows by more than what freed memory can absorb (200 once gave 0).
    "memory_sessions": 2_000,
    "memory_validate": 4,
    "memory_server": [(32, 1)],
    "memory_server_warmup": 4,
    "login_network": 3,
    "login_network_runs": 1,
    "throughput_sessions": 4,
    "throughput_connections": [2],
    "throughput_runs": 1,
    "throughput_seconds": 0.2,
    "throughput_warmup": 0.1,
    "multiplex_sessions": 3,
    "lag_logins": 3,
    "lag_runs": 1,
    "workers_connections": 2,
    "workers_sessions": 2,
    "workers_runs": 1,
    "workers_seconds": 0.2,
    "workers_warmup": 0.1,
    "browser_runs": 1,
    "browser_requests": 3,
}
#: Benchmarks that could not run here, with the reason (written to the JSON).
SKIPPED: dict[str, str] = {}


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
            5.0,
        )
    ]


#: Logins in flight at once in the second over-TLS P2 line (as P5 opens its sessions).
LOGINS_AT_ONCE = 8


def bench_login(cfg: Config, workdir: Path) -> list[Line]:
    r = run_pyperf("login", cfg["pyperf"]["login"], workdir)
    n = cfg["login_network"]
    # One login at a time (the server idles through each client's Argon2 and wakes cold), and
    # LOGINS_AT_ONCE at a time (a server with logins to do: the load shape that sizes it).
    per_login: list[float] = []
    per_login_busy: list[float] = []
    for run in range(cfg["login_network_runs"]):
        for at_once, results in ((1, per_login), (LOGINS_AT_ONCE, per_login_busy)):
            with netload.server_process(workdir / f"p2-network-{at_once}-{run}") as server:
                result = anyio.run(partial(netload.open_sessions, server, n, at_once, shared=True))
            results.append(result["server_cpu_per_session"])
    network, low, high = spread(per_login)
    busy, busy_low, busy_high = spread(per_login_busy)
    return [
        Line(
            "p2_login_network",
            f"P2 login over TLS: server process CPU per login, {n} logins on 1 connection",
            "ms",
            network * 1e3,
            r[micro.P2_RAW] * 1e3,
            "opaque-ke-py server calls alone",
            "max_ratio",
            3.0,
            notes=f"median of {len(per_login)} runs, range {low * 1e3:.2f}-{high * 1e3:.2f} ms "
            "(TLS, driver, group commit, OPAQUE, storage, logging)",
            extra={"runs": per_login},
        ),
        Line(
            "p2_login_network_busy",
            f"P2 login over TLS: server process CPU per login, {n} logins on 1 connection, "
            f"{LOGINS_AT_ONCE} at a time",
            "ms",
            busy * 1e3,
            r[micro.P2_RAW] * 1e3,
            "opaque-ke-py server calls alone",
            "max_ratio",
            3.0,
            notes=f"median of {len(per_login_busy)} runs, "
            f"range {busy_low * 1e3:.2f}-{busy_high * 1e3:.2f} ms",
            extra={"runs": per_login_busy},
        ),
        Line(
            "p2_login",
            "P2 login: server CPU (framing, OPAQUE, SQLite lookup, audit)",
            "ms",
            r[micro.P2_CORE] * 1e3,
            r[micro.P2_RAW] * 1e3,
            "opaque-ke-py server calls alone",
            "max_ratio",
            2.0,
            notes=f"{r[micro.P2_CORE_WARM] * 1e3:.2f} ms "
            f"({r[micro.P2_CORE_WARM] / r[micro.P2_RAW]:.2f}x) with the client's Argon2 off the "
            "server's path (client steps first, in groups of 4)",
            extra={"client_steps_first_ms": r[micro.P2_CORE_WARM] * 1e3},
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
        Line(
            "p9_big_retrieve",
            "P9 retrieve of a 60 KiB secret, client + server CPU, in process",
            "us",
            r[micro.P8_RETRIEVE_60K] * 1e6,
            r[micro.P8_RETRIEVE_32] * 1e6,
            "the same retrieve of a 32-byte secret",
            "max_ratio",
            2.0,
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
    """P3: durable retrieves per second, each setting in ``throughput_runs`` interleaved runs,
    each run against a fresh server; medians with their range."""
    n, conns = cfg["throughput_sessions"], cfg["throughput_connections"]
    settings: dict[str, dict[str, Any]] = {
        "one": {"connections": 1},
        "channel": {"connections": 1, "channel_only": True},
        "busy": {"connections": 1, "busy": True},
        "trio": {"connections": 1, "backend": "trio"},
    }
    settings.update({f"conns{c}": {"connections": c} for c in conns})
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    for run in range(cfg["throughput_runs"]):
        for name, setting in settings.items():
            directory = workdir / f"p3-{name}-{run}"
            backend = setting.get("backend", "asyncio")
            with (
                netload.server_process(
                    directory, backend, channel_only=setting.get("channel_only", False)
                ) as server,
                netload.busy_core() if setting.get("busy") else contextlib.nullcontext(),
            ):
                runs[name].append(
                    anyio.run(
                        partial(
                            netload.throughput,
                            server,
                            n,
                            cfg["throughput_seconds"],
                            cfg["throughput_warmup"],
                            setting["connections"],
                        )
                    )
                )

    def rate(name: str) -> tuple[float, float, float]:
        return spread([r["per_second"] for r in runs[name]])

    def cpu(name: str) -> float:
        return spread([r["server_cpu_per_request_us"] for r in runs[name]])[0]

    def shown(name: str) -> str:
        median, low, high = rate(name)
        return f"{median:,.0f}/s ({low:,.0f}-{high:,.0f})"

    k = len(runs["one"])
    one, low, _ = rate("one")
    lines = [
        Line(
            "p3_throughput",
            f"P3 durable retrieves/s, {n} sessions, 1 TLS conn (median of {k})",
            "/s",
            one,
            rate("channel")[0],
            "same load, channel-only server (no storage)",
            "min_value",
            12_000.0,
            notes=f"range {shown('one')}; server CPU {cpu('one'):.0f} us/request (channel-only "
            f"{cpu('channel'):.0f} us); trio {shown('trio')}",
            extra={name: values for name, values in runs.items()},
        ),
        Line(
            "p3_slowest",
            f"P3 slowest of the {k} runs, {n} sessions, 1 TLS conn",
            "/s",
            low,
            one,
            "their median",
            "min_value",
            9_000.0,
        ),
        Line(
            "p3_busy",
            f"P3 with another process keeping a core busy (median of {k})",
            "/s",
            rate("busy")[0],
            one,
            "quiet machine",
            "min_value",
            12_000.0,
            notes=f"range {shown('busy')}; slowest >= 9,000/s: "
            + ("met" if rate("busy")[1] >= 9_000 else "MISSED"),
        ),
        Line(
            "p3_server_cpu",
            f"P3 server CPU per durable retrieve, {n} sessions, 1 TLS conn",
            "us",
            cpu("one"),
            cpu("channel"),
            "channel-only server",
            "max_value",
            40.0,
        ),
    ]
    for c in conns:
        lines.append(
            Line(
                f"p3_connections_{c}",
                f"P3 the same {n} sessions over {c} TLS connections (median of {k})",
                "/s",
                rate(f"conns{c}")[0],
                one,
                "1 connection",
                "min_ratio",
                0.75,
                notes=f"range {shown(f'conns{c}')}; server CPU {cpu(f'conns{c}'):.0f} us/request",
            )
        )
    return lines


def bench_stores(cfg: Config, workdir: Path) -> list[Line]:
    """P10: durable stores against durable retrieves, interleaved runs on fresh servers, at
    P3's load (``throughput_sessions`` sessions: CPU-bound, so the ratio is the ratio of
    the two operations' work on both sides) and at one session (bound by round trips and
    the commit's fsync: what "one round trip per store" changes)."""
    n, seconds, warmup = cfg["throughput_sessions"], cfg["throughput_seconds"], cfg["throughput_warmup"]
    loads = {"": n, "one-": 1}
    runs: dict[str, list[dict[str, float]]] = {
        f"{load}{op}": [] for load in loads for op in ("store", "retrieve")
    }
    for run in range(cfg["throughput_runs"]):
        for load, sessions in loads.items():
            for operation in ("store", "retrieve"):
                with netload.server_process(workdir / f"p10-{load}{operation}-{run}") as server:
                    measure = partial(
                        netload.throughput, server, sessions, seconds, warmup, operation=operation
                    )
                    runs[f"{load}{operation}"].append(anyio.run(measure))

    def line(load: str, sessions: int) -> Line:
        stores, low, high = spread([r["per_second"] for r in runs[f"{load}store"]])
        retrieves, rlow, rhigh = spread([r["per_second"] for r in runs[f"{load}retrieve"]])
        cpu = {
            op: spread([r["server_cpu_per_request_us"] for r in runs[f"{load}{op}"]])[0]
            for op in ("store", "retrieve")
        }
        what = f"{sessions} sessions" if sessions > 1 else "1 session (round trips)"
        return Line(
            f"p10_store_throughput{'_one_session' if load else ''}",
            f"P10 durable stores/s (generate), {what}, 1 TLS conn (median of {len(runs[f'{load}store'])})",
            "/s",
            stores,
            retrieves,
            "durable retrieves/s, same load",
            "min_ratio",
            0.7,
            notes=f"range {low:,.0f}-{high:,.0f}/s (retrieves {rlow:,.0f}-{rhigh:,.0f}/s); server CPU "
            f"{cpu['store']:.0f} us per store, {cpu['retrieve']:.0f} us per retrieve",
            extra={"store": runs[f"{load}store"], "retrieve": runs[f"{load}retrieve"]},
        )

    return [line(load, sessions) for load, sessions in loads.items()]


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
    """P7: the largest event-loop lag of one run of ``lag_logins`` concurrent logins, for each
    client, in ``lag_runs`` interleaved runs on fresh servers: medians of the runs' maxima (a
    maximum over one run is one sample, which a single hiccup of the machine sets)."""
    n = cfg["lag_logins"]
    clients = {
        "stock": netload.AllStepsAtOnceClient,
        "thread": netload.ThreadStepClient,
        "prototype": KeymgmtClient,
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in clients}
    for run in range(cfg["lag_runs"]):
        with netload.server_process(workdir / f"p7-{run}") as server:
            for name, cls in clients.items():
                runs[name].append(anyio.run(partial(netload.loop_lag, server, n, cls)))

    def med(name: str, key: str) -> float:
        return spread([r[key] for r in runs[name]])[0]

    def shown(name: str, key: str) -> str:
        median, low, high = spread([r[key] for r in runs[name]])
        return f"{median:.1f} ms ({low:.1f}-{high:.1f})"

    return [
        Line(
            "p7_loop_lag",
            f"P7 max event-loop lag, {n} concurrent logins (KeymgmtClient, one OPAQUE step per turn; "
            f"median of {cfg['lag_runs']})",
            "ms",
            med("prototype", "max_lag_ms"),
            med("stock", "max_lag_ms"),
            "all steps in one turn (the reader before)",
            "max_value",
            50.0,
            notes=f"max lag {shown('prototype', 'max_lag_ms')} vs {shown('stock', 'max_lag_ms')}; "
            f"p99 lag {shown('prototype', 'p99_lag_ms')} vs {shown('stock', 'p99_lag_ms')}; "
            f"{n} logins took {med('prototype', 'logins_seconds'):.2f} s vs "
            f"{med('stock', 'logins_seconds'):.2f} s; steps in worker threads instead: max lag "
            f"{shown('thread', 'max_lag_ms')}, p99 {shown('thread', 'p99_lag_ms')}",
            extra={f"{name}_runs": runs[name] for name in runs},
        )
    ]


def bench_workers(cfg: Config, workdir: Path) -> list[Line]:
    """P8: cost per request and throughput with 1 and 2 workers (bench/workers.py)."""
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with (
        workers.workers_server(workdir / "p8-1", 1) as one,
        workers.workers_server(workdir / "p8-2", 2) as two,
    ):
        for _ in range(cfg["workers_runs"]):
            for server in (one, two):
                runs[server.workers].append(
                    anyio.run(
                        workers.measure,
                        server,
                        cfg["workers_connections"],
                        cfg["workers_sessions"],
                        cfg["workers_seconds"],
                        cfg["workers_warmup"],
                    )
                )

    def fmt(key: str, n: int, unit: str, scale: float = 1.0) -> str:
        median, low, high = workers.summarize(runs[n], key)
        return f"{median * scale:,.2f}{unit} ({low * scale:,.2f}-{high * scale:,.2f})"

    cost = {n: workers.summarize(runs[n], "server_cpu_per_request_us")[0] for n in runs}
    rate = {n: workers.summarize(runs[n], "per_second")[0] for n in runs}
    cores = {n: workers.summarize(runs[n], "server_cores")[0] for n in runs}
    load = f"{cfg['workers_connections']} TLS conns x {cfg['workers_sessions']} sessions"
    return [
        Line(
            "p8_workers",
            f"P8 server CPU per durable retrieve, 2 workers, SQLite, {load}",
            "us",
            cost[2],
            cost[1],
            "1 worker, same load",
            "max_ratio",
            1.15,
            notes=f"medians (range) of {cfg['workers_runs']} interleaved runs; retrieves/s "
            f"{fmt('per_second', 1, '')} vs {fmt('per_second', 2, '')} (x{rate[2] / rate[1]:.2f}); "
            f"server cores {fmt('server_cores', 1, '')} vs {fmt('server_cores', 2, '')} "
            f"(x{cores[2] / cores[1]:.2f}); throughput per server core "
            f"{rate[1] / cores[1]:,.0f} vs {rate[2] / cores[2]:,.0f}; load generator (pinned to CPU 1, "
            f"not counted) {fmt('client_cores', 1, '')} vs {fmt('client_cores', 2, '')} cores",
            extra={f"workers{n}_runs": runs[n] for n in runs},
        )
    ]


def bench_browser(cfg: Config, workdir: Path) -> list[Line]:
    """The browser client: login and per-request time in headless Chromium over wss, next to
    the Python client's over TLS (bench/browser.py); skipped, with the reason, without Chromium,
    node or playwright."""
    runs, requests = cfg["browser_runs"], cfg["browser_requests"]
    try:
        results = anyio.run(browser.measure, workdir / "web", runs, requests)
    except (browser.WebUnavailableError, ImportError) as exc:
        SKIPPED["browser"] = str(exc)
        _log(f"browser skipped: {exc}")
        return []
    login, retrieve = browser.summary(results, "login_ms"), browser.summary(results, "retrieve_ms")

    def shown(values: tuple[float, float, float], scale: float = 1.0, unit: str = "ms") -> str:
        median, low, high = (v * scale for v in values)
        return f"{median:,.1f} {unit} ({low:,.1f}-{high:,.1f})"

    version = browser.chromium_version()
    return [
        Line(
            "web_login",
            "Browser login (headless Chromium; OPAQUE, Argon2id in WebAssembly) over wss",
            "ms",
            login["browser"][0],
            login["python_tls"][0],
            "Python client login over TLS",
            notes=f"medians (range) of {runs} interleaved runs: browser {shown(login['browser'])}, "
            f"Python over TLS {shown(login['python_tls'])}, Python over wss {shown(login['python_wss'])}; "
            f"{version}",
            extra=results,
        ),
        Line(
            "web_retrieve",
            f"Browser retrieve over wss, one at a time ({requests} per run), per request",
            "us",
            retrieve["browser"][0] * 1e3,
            retrieve["python_tls"][0] * 1e3,
            "Python client over TLS",
            notes=f"medians (range) of {runs} interleaved runs: browser "
            f"{shown(retrieve['browser'], 1e3, 'us')}, Python over TLS "
            f"{shown(retrieve['python_tls'], 1e3, 'us')}, Python over wss "
            f"{shown(retrieve['python_wss'], 1e3, 'us')} (LOCAL_ONLY, no local copy: each a round "
            "trip, a SQLite read and an audit entry)",
        ),
    ]


BENCHES: dict[str, Callable[[Config, Path], list[Line]]] = {
    "channel": bench_channel,
    "login": bench_login,
    "ops": bench_ops,
    "throughput": bench_throughput,
    "stores": bench_stores,
    "memory": bench_memory,
    "multiplex": bench_multiplex,
    "lag": bench_lag,
    "workers": bench_workers,
    "browser": bench_browser,
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


def _sizes(text: str) -> list[tuple[int, int]]:
    """``--memory-server`` as (sessions, runs) pairs; argparse turns the error into one line."""
    try:
        pairs = [tuple(int(n) for n in pair.split(":")) for pair in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected SESSIONS:RUNS[,SESSIONS:RUNS...], got {text!r}")
    return [(p[0], p[1]) for p in pairs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: exercise every path in seconds")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results.json", help="where to write JSON"
    )
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these")
    parser.add_argument(
        "--memory-server",
        metavar="SESSIONS:RUNS,...",
        type=_sizes,
        help="real-server P4 sizes instead of the mode's (10,000 real logins take about 20 minutes)",
    )
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.memory_server:
        cfg["memory_server"] = args.memory_server
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
        "skipped": SKIPPED,
        "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    _log(f"wrote {args.json} ({document['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
