"""The pytest side of ``make mutation``.

Two modes, chosen by the ``--mutation-record`` / ``--mutation-run`` options:

* record: the ordinary test run (under coverage with per-test contexts); this plugin
  writes how long each test took, so the runner can try the fastest tests first.
* run: after collection, instead of running the suite, fork one child per mutant (at
  most ``--mutation-workers`` at a time). The child plants the mutant
  (:func:`mutation.mutants.apply`), runs the tests that cover the mutated line, fastest
  first, and stops at the first failure. Exit status 1 means killed, 0 survived; a child
  still running past its deadline is killed and counted as killed (a timeout); one
  whose mutant cannot be planted reports an error.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _pytest.runner import runtestprotocol

from .mutants import Mutant, apply, find_by_key

KILLED, SURVIVED, ERROR = 1, 0, 3


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mutation")
    group.addoption("--mutation-record", help="write test durations (JSON) to this file")
    group.addoption("--mutation-run", help="run the mutants listed in this JSON plan")
    group.addoption("--mutation-results", help="write results (JSON) here")
    group.addoption("--mutation-workers", type=int, default=2)
    group.addoption("--mutation-apply", help="plant this mutant (its key) before the tests run")


class _Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.durations: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self) -> None:
        self.path.write_text(json.dumps(self.durations, indent=0, sort_keys=True))


def pytest_configure(config: pytest.Config) -> None:
    record = config.getoption("--mutation-record")
    if record:
        config.pluginmanager.register(_Recorder(Path(record)), "mutation-recorder")
    key = config.getoption("--mutation-apply")
    if key:
        apply(find_by_key(key))


class _TestTimeout(Exception):
    """A test ran far longer than it does without the mutant (an endless loop, say)."""


def _alarm(signum: int, frame: object) -> None:
    raise _TestTimeout


def _child(mutant: Mutant, items: list[pytest.Item], limits: list[float], report: int) -> int:
    """In the forked child: plant, run each test under its own time limit, report by exit
    status (and the killing test's id on the ``report`` pipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        apply(mutant)
    except Exception:
        return ERROR
    signal.signal(signal.SIGALRM, _alarm)
    for item, limit in zip(items, limits, strict=True):
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            reports = runtestprotocol(item, nextitem=None, log=False)
        except _TestTimeout:
            reports = []
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if not reports or any(r.failed for r in reports):
            os.write(report, item.nodeid.encode()[:4000])
            return KILLED
    return SURVIVED


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> Any:
    plan_path = session.config.getoption("--mutation-run")
    if not plan_path:
        return None
    plan = json.loads(Path(plan_path).read_text())
    by_id = {item.nodeid: item for item in session.items}
    workers = max(1, int(session.config.getoption("--mutation-workers")))
    results: list[dict[str, Any]] = []
    running: dict[int, tuple[dict[str, Any], float, int]] = {}
    queue = list(plan)
    total, started_at = len(queue), time.monotonic()

    def reap() -> None:
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            entry, deadline, pipe = running.pop(pid)
            killer = os.read(pipe, 4096).decode(errors="replace")
            os.close(pipe)
            code = os.waitstatus_to_exitcode(status)
            verdict = {KILLED: "killed", SURVIVED: "survived", ERROR: "error"}.get(code, "killed")
            if entry.get("_timed_out"):
                verdict = "timeout"
            elapsed = time.monotonic() - (deadline - float(entry["timeout"]))
            results.append(
                {
                    "mutant": entry["mutant"],
                    "verdict": verdict,
                    "seconds": round(elapsed, 2),
                    "killer": killer,
                }
            )
            if len(results) % 100 == 0 or len(results) == total:
                elapsed = time.monotonic() - started_at
                print(f"  {len(results)}/{total} mutants, {elapsed:.0f} s", file=sys.stderr, flush=True)

    while queue or running:
        now = time.monotonic()
        for pid, (entry, deadline, _pipe) in list(running.items()):
            if now > deadline and not entry.get("_timed_out"):
                entry["_timed_out"] = True
                os.kill(pid, signal.SIGKILL)
        if queue and len(running) < workers:
            entry = queue.pop(0)
            chosen = [
                (by_id[t], limit)
                for t, limit in zip(entry["tests"], entry["limits"], strict=True)
                if t in by_id
            ]
            items, limits = [item for item, _ in chosen], [limit for _, limit in chosen]
            mutant = Mutant.from_json(entry["mutant"])
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child never returns into pytest
                code = ERROR
                try:
                    os.close(read_end)
                    code = _child(mutant, items, limits, write_end)
                finally:
                    os._exit(code)
            os.close(write_end)
            running[pid] = (entry, now + float(entry["timeout"]), read_end)
            continue
        reap()
        time.sleep(0.005)
    out = session.config.getoption("--mutation-results")
    if out:
        Path(out).write_text(json.dumps(results, indent=1))
    return True
