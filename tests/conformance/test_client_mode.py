"""The client conformance mode against real client processes: our own ``keymgmt`` passes every
scenario its command reaches; the same client with a check taken out (tests/support/
broken_client.py) fails the scenarios that need that check; a client that never ends is
reported as a hang, not waited for."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from keymgmt.adapters.conformance import default_scenarios, run_client_conformance

BROKEN_CLIENT = Path(__file__).resolve().parents[1] / "support" / "broken_client.py"
ARGS = "--server {address} --ca {ca} --account {account} --password-file {password_file} --no-local-store"
KEYMGMT = f"{shlex.quote(sys.executable)} -m keymgmt.adapters.cli.client {ARGS}"


def test_our_client_passes_every_scenario_it_reaches() -> None:
    report = run_client_conformance(f"{KEYMGMT} generate", timeout=30)
    verdicts = {r.scenario: r.verdict for r in report.results}
    assert report.passed, [
        (r.scenario, r.reason, r.output[-500:]) for r in report.results if r.verdict == "fail"
    ]
    # `generate` never retrieves a secret: that scenario is the only one it does not reach
    assert [name for name, verdict in verdicts.items() if verdict == "not exercised"] == ["secret-tampered"]
    assert set(verdicts) == {s.name for s in default_scenarios()}
    by_name = {r.scenario: r for r in report.results}
    assert by_name["honest"].exit_code == 0 and by_name["cut-and-resume"].exit_code == 0
    assert all(
        r.exit_code not in (0, None) for r in report.results if r.expect == "refusal" and r.verdict == "pass"
    )


#: variant -> the scenarios it must fail (and only those, among the ones run here)
BROKEN = {
    "no-tag-check": {"welcome-bit-flip", "response-bit-flip"},
    "no-sequence-check": {"response-replayed-seq", "response-seq-gap"},
}
SCENARIOS = ["honest", "welcome-bit-flip", "response-bit-flip", "response-replayed-seq", "response-seq-gap"]


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_a_client_without_a_check_fails_the_scenarios_that_need_it(variant: str) -> None:
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(BROKEN_CLIENT))} {variant} {ARGS} generate"
    report = run_client_conformance(command, scenarios=SCENARIOS, timeout=30)
    failed = {r.scenario for r in report.results if r.verdict == "fail"}
    assert failed == BROKEN[variant], [(r.scenario, r.verdict, r.reason) for r in report.results]
    for result in report.results:
        if result.scenario in failed:
            assert result.exit_code == 0 and "accepted what it must refuse" in result.reason
            assert any(" -> " in line for line in result.log)  # what the scripted server sent


def test_a_client_that_never_ends_is_a_hang() -> None:
    command = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)' {{address}}"
    report = run_client_conformance(command, scenarios=["honest"], timeout=1.5)
    (result,) = report.results
    assert result.verdict == "fail" and result.exit_code is None
    assert "did not end within 1.5 s" in result.reason and result.seconds < 10


def test_unknown_scenarios_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown scenarios: nope"):
        run_client_conformance("true", scenarios=["nope"])


def test_a_command_that_cannot_run_fails_every_scenario_it_was_given() -> None:
    report = run_client_conformance("/nonexistent/client {address}", scenarios=["honest", "bad-version"])
    assert [r.verdict for r in report.results] == ["fail", "fail"]
    assert all(r.reason.startswith("cannot run the command") for r in report.results)
