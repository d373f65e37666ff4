"""`make bench-smoke` as a test: every benchmark's code path runs with tiny sizes.

It asserts structure only (every line present, numbers finite and positive, the
JSON written), never a timing: speed is reported by `make bench`, not tested.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

EXPECTED = {
    "p1_channel",
    "p2_login",
    "p2_login_network",
    "p7_client_opaque",
    "op_retrieve",
    "op_store",
    "p3_throughput",
    "p3_slowest",
    "p3_busy",
    "p3_server_cpu",
    "p3_connections_2",
    "p9_big_retrieve",
    "p10_store_throughput",
    "p4_memory",
    "p4_memory_server_32",
    "p5_multiplex",
    "p7_loop_lag",
    "p8_workers",
}


def test_bench_smoke(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    document = json.loads(output.read_text())
    assert document["mode"] == "smoke"
    assert document["machine"]["cores"] >= 1
    lines = {line["key"]: line for line in document["lines"]}
    assert set(lines) == EXPECTED
    for line in lines.values():
        for field in ("value", "baseline", "ratio"):
            assert math.isfinite(line[field]) and line[field] > 0, (line["key"], field, line[field])
        assert line["met"] in (True, False, None)
    for key in EXPECTED:
        assert lines[key]["title"] in done.stdout  # the printed table names every line


def test_a_bad_memory_server_size_is_one_clear_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--memory-server", "10x3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "expected SESSIONS:RUNS" in done.stderr and "Traceback" not in done.stderr
