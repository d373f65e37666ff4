"""`make demo` runs the scripted flow as a new user would see it."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_the_whole_flow_and_exits_zero():
    result = subprocess.run(
        [sys.executable, "-m", "keymgmt.adapters.cli.demo"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for step in (
        "1. registered",
        "2. wrong password refused",
        "6. retrieve: NULL -> None",
        "9. audit log",
        "10. logged out",
    ):
        assert step in out
    assert out.rstrip().endswith("demo finished: OK")
    assert "Traceback" not in result.stderr
