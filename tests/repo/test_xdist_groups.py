"""`make unit` runs the suite under pytest-xdist (``-n N --dist loadgroup``, a worker per core
up to 4). The test files that build web/ in place (``npm test``, ``build_web()``, the bench
smoke's browser line) write the same bundles, so tests/conftest.py puts them in one xdist group,
which runs on one worker: check that the list there names every such file and that the group is applied."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import WEB_BUILDERS

ROOT = Path(__file__).resolve().parents[2]
#: What a test file that builds web/ in place contains.
BUILDS_WEB = re.compile(r"build_web\(|cwd=WEB\b|\"-m\", \"bench\"")


def test_every_test_file_that_builds_web_is_in_the_group() -> None:
    found = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tests").rglob("test_*.py")
        if path != Path(__file__).resolve() and BUILDS_WEB.search(path.read_text(encoding="utf-8"))
    }
    assert found == set(WEB_BUILDERS), "update WEB_BUILDERS in tests/conftest.py"


def test_the_group_marks_those_files_only() -> None:
    other = "tests/repo/test_xdist_groups.py"
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    collected = subprocess.run(
        [*command, "-m", "xdist_group", *sorted(WEB_BUILDERS), other],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    files = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert files == set(WEB_BUILDERS)


def test_timing_probes_run_alone_after_the_parallel_run() -> None:
    """A test that times the server (``time.perf_counter`` around a request) is marked
    ``serial``, and ``make unit`` runs those in a second pytest without xdist: next to another
    worker's load, a small timing difference would drown in noise."""
    probes = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tests").rglob("test_*.py")
        if path != Path(__file__).resolve() and "_held_out_accuracy" in path.read_text(encoding="utf-8")
    }
    assert probes == {"tests/server/test_enumeration.py"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--collect-only",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "serial",
    ]
    collected = subprocess.run(
        [*command, *sorted(probes)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert "test_a_timing_probe_cannot_tell_registered_names_apart" in collected.stdout
    unit = (ROOT / "Makefile").read_text(encoding="utf-8").split("\nunit:", 1)[1].split("\n\n", 1)[0]
    assert '-m "not serial"' in unit and "-p no:xdist -m serial" in unit
