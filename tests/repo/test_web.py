"""The browser client (web/): its own test suite, run with node.

``npm test`` in web/ type-checks and builds the TypeScript client, then runs it against every
file of tests/vectors/ (a vector file it has no checker for fails), its state machine and
high-level client against fakes, and end to end against a real ``keymgmt-server`` from this
environment (over TLS, and over wss when the key server has the WebSocket listener). It needs
node 20 or newer; ``npm ci`` installs the locked dependencies first when web/node_modules is
missing. Without node the test is skipped with the reason, and KEYMGMT_REQUIRE_WEB=1 makes
that skip (and the end-to-end tests' own) a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "web"
REQUIRED = os.environ.get("KEYMGMT_REQUIRE_WEB") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (KEYMGMT_REQUIRE_WEB=1 makes this a failure)")
    pytest.skip(reason)


def _node() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("node and npm are not installed: the browser client's tests (web/) did not run")
    assert node is not None and npm is not None
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        _unavailable(f"node {version} is too old for web/ (20 or newer): its tests did not run")
    return node, npm


def test_web_client_suite() -> None:
    if not (WEB / "package.json").is_file():
        _unavailable("web/ is not in this tree (an sdist carries the Python package only)")
    _, npm = _node()
    env = {**os.environ, "KEYMGMT_BIN_DIR": str(Path(sys.executable).parent), "PYTHONDONTWRITEBYTECODE": "1"}
    if not (WEB / "node_modules").is_dir():
        ci = subprocess.run(
            [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund"],
            cwd=WEB,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if ci.returncode != 0:
            _unavailable(f"npm ci failed in web/ (registry unreachable?): {ci.stderr.strip()[-500:]}")
    run = subprocess.run([npm, "test"], cwd=WEB, env=env, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"npm test failed in web/:\n{output[-6000:]}"
    counts = {
        key: int(value) for key, value in re.findall(r"^# (pass|fail|skipped) (\d+)$", output, re.MULTILINE)
    }
    assert counts.get("fail") == 0 and counts.get("pass", 0) >= 20, (
        f"unexpected summary {counts}:\n{output[-3000:]}"
    )
    _report_skips(output, required=REQUIRED)


def _report_skips(output: str, *, required: bool) -> None:
    """node's own skips (an end-to-end test without a key server to run): a failure with
    KEYMGMT_REQUIRE_WEB=1, else a warning, which pytest's summary shows (a print would be
    captured and never shown for a test that passed)."""
    skipped = sorted(set(re.findall(r"# SKIP (.*)$", output, re.MULTILINE)))
    if skipped and required:
        pytest.fail(f"web/ tests skipped with KEYMGMT_REQUIRE_WEB=1: {skipped}")
    if skipped:
        warnings.warn(f"some web/ tests were skipped: {'; '.join(skipped)}", UserWarning, stacklevel=2)


def test_node_skips_are_shown_or_fail_when_required() -> None:
    output = "ok 3 - wss # SKIP this keymgmt-server has no WebSocket listener\n# pass 40\n"
    with pytest.warns(UserWarning, match="skipped: this keymgmt-server has no WebSocket listener"):
        _report_skips(output, required=False)
    with pytest.raises(pytest.fail.Exception, match="KEYMGMT_REQUIRE_WEB=1"):
        _report_skips(output, required=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _report_skips("ok 1 - vectors: ops.json\n# pass 40\n", required=False)
