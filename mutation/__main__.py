"""``python -m mutation``: the mutation run behind ``make mutation``.

1. Record: run the test selection once under coverage with per-test contexts, so each
   line knows the tests that execute it (and each test its duration).
2. Plan: list every mutant of :data:`mutation.mutants.TARGETS`, each with the tests that
   cover its statement, fastest first.
3. Run: one pytest session collects once and forks a child per mutant (two at a time);
   the child plants the mutant and stops at the first failing test.
4. Report: the kill rate per module (equivalent mutants, listed with their reason in
   ``mutation/equivalent.txt``, are left out of it) and every other survivor.

Exit status 1 if a target is missed: 90% of ``keymgmt_proto`` and 85% of the key-server
application and storage must be killed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

from .mutants import ROOT, TARGETS, Mutant, find_mutants

WORK = ROOT / ".mutation"
EQUIVALENT = ROOT / "mutation" / "equivalent.txt"
#: The test that last killed each mutant (kept in the repository, so a fresh clone's run
#: tries it first): a mutant covered by hundreds of tests may otherwise be checked only
#: against others, within the per-mutant budget.
KILLERS = ROOT / "mutation" / "killers.json"
#: Tests that cannot kill an in-process mutant (they run the code in a subprocess) or
#: that take long for what they add here; the rest of the suite is the selection.
DESELECTED = (
    "tests/cli/test_cli.py",
    "tests/cli/test_demo.py",
    "tests/system/test_durability.py",
    "tests/repo/test_fuzz_smoke.py",
    "tests/system/test_load.py",
    "tests/repo/test_bench_smoke.py",
    "tests/repo/test_docs.py",
    "tests/core/test_purity.py",
    "tests/server/test_spec_gaps.py",
    "tests/repo/test_spec_mapping.py",
    "tests/repo/test_mutation_tool.py",
    # the conformance harness: servers and clients in other processes, seconds per test
    "tests/conformance/test_server_machine.py",
    "tests/conformance/test_client_mode.py",
    # a key server, Chromium and node in other processes; seconds of start-up per run
    "tests/system/test_browser.py",
    "tests/system/test_web_demo.py",
    "tests/repo/test_web.py",
)
TARGET_RATES = {"keymgmt_proto": 0.90, "keymgmt.adapters": 0.85}


def _pytest(*args: str, env: dict[str, str] | None = None) -> int:
    command = [sys.executable, "-m", "pytest", "-p", "mutation.plugin", "-p", "no:cacheprovider", *args]
    for path in DESELECTED:
        if (ROOT / path).exists():
            command += ["--ignore", path]
    return subprocess.call(command, cwd=ROOT, env={**os.environ, **(env or {})})  # noqa: S603 - our own argv


def record() -> None:
    """Step 1: coverage with per-test contexts, and durations."""
    WORK.mkdir(exist_ok=True)
    (WORK / "coverage").unlink(missing_ok=True)
    code = _pytest(
        "-q",
        "--cov=keymgmt_proto",
        "--cov=adapters",
        "--cov-context=test",
        "--cov-report=",
        "--cov-branch",
        f"--mutation-record={WORK / 'durations.json'}",
        "tests",
        env={"COVERAGE_FILE": str(WORK / "coverage"), "HYPOTHESIS_PROFILE": "mutation"},
    )
    if code != 0:
        raise SystemExit(f"the test run under coverage failed ({code}); fix the suite first")


def plan(
    only: str | None, budget: float, max_tests: int, keys: set[str] | None = None
) -> list[dict[str, object]]:
    """Step 2: every mutant (of ``keys`` if given) with the tests that cover it, as many as
    fit in ``budget`` seconds (of their usual run time) and ``max_tests``: first the test
    that last killed it, then those that killed most mutants of the module in earlier runs,
    then the fastest."""
    import coverage

    data = coverage.CoverageData(basename=str(WORK / "coverage"))
    data.read()
    durations: dict[str, float] = json.loads((WORK / "durations.json").read_text())
    kills = _kill_history()
    killers = _killers()
    entries = []
    for module, relative in TARGETS.items():
        path = ROOT / relative
        by_line = data.contexts_by_lineno(str(path))
        history = kills.get(module, {})
        for mutant in find_mutants(path, module):
            if (only and only not in mutant.key) or (keys is not None and mutant.key not in keys):
                continue
            tests: set[str] = set()
            first, last = mutant.lines
            for line in range(first, last + 1):
                tests.update(context.split("|")[0] for context in by_line.get(line, ()) if context)
            killer = killers.get(mutant.key)
            ordered = sorted(tests, key=lambda t: (t != killer, -history.get(t, 0), durations.get(t, 1.0), t))
            chosen: list[str] = []
            spent = 0.0
            for test in ordered:  # the fastest first, within the budget
                if chosen and (spent + durations.get(test, 1.0) > budget or len(chosen) >= max_tests):
                    break
                chosen.append(test)
                spent += durations.get(test, 1.0)
            entries.append(
                {
                    "mutant": mutant.to_json(),
                    "tests": chosen,
                    "limits": [max(2.0, 5 * durations.get(t, 1.0)) for t in chosen],
                    "timeout": 20.0 + 5 * spent,
                    "truncated": len(chosen) < len(ordered),
                }
            )
    return entries


def _kill_history() -> dict[str, dict[str, int]]:
    path = WORK / "kills.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _killers() -> dict[str, str]:
    return json.loads(KILLERS.read_text()) if KILLERS.exists() else {}


def _remember_kills(results: list[dict[str, object]]) -> None:
    """Which test killed which mutant, and how many of each module's: the next runs try
    those tests first."""
    history = _kill_history()
    killers = _killers()
    before = dict(killers)
    for result in results:
        killer = str(result.get("killer") or "")
        if killer:
            mutant = Mutant.from_json(result["mutant"])  # type: ignore[arg-type]
            counts = history.setdefault(mutant.module, {})
            counts[killer] = counts.get(killer, 0) + 1
            killers[mutant.key] = killer
    (WORK / "kills.json").write_text(json.dumps(history, sort_keys=True))
    if killers != before:
        KILLERS.write_text(json.dumps(killers, sort_keys=True, indent=0) + "\n")


def load_equivalents() -> dict[str, str]:
    """``mutation/equivalent.txt``: ``key  # reason`` per line."""
    equivalents = {}
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, reason = line.partition("  # ")
                equivalents[key.strip()] = reason.strip()
    return equivalents


def report(results: list[dict[str, object]], uncovered: list[Mutant], *, partial: bool = False) -> bool:
    """Step 4: print the rates and the survivors; True if every target is met. A partial run
    (``--only``, ``--survivors``) does not list equivalents that match no mutant."""
    equivalents = load_equivalents()
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    survivors: list[Mutant] = []
    seen_equivalent = set()
    for result in results:
        mutant = Mutant.from_json(result["mutant"])  # type: ignore[arg-type]
        verdict = str(result["verdict"])
        if mutant.key in equivalents:
            seen_equivalent.add(mutant.key)
            verdict = "equivalent"
        counts[mutant.module][verdict] += 1
        if verdict == "survived":
            survivors.append(mutant)
    for mutant in uncovered:
        if mutant.key in equivalents:
            seen_equivalent.add(mutant.key)
            counts[mutant.module]["equivalent"] += 1
        else:
            counts[mutant.module]["uncovered"] += 1
            survivors.append(mutant)
    ok = True
    print(f"\n{'module':36} {'mutants':>7} {'killed':>7} {'equiv.':>7} {'survived':>8} {'rate':>7}")
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for module in sorted(counts):
        c = counts[module]
        killed = c["killed"] + c["timeout"]
        live = killed + c["survived"] + c["uncovered"]
        total = live + c["equivalent"] + c["error"]
        rate = killed / live if live else 1.0
        survived = c["survived"] + c["uncovered"]
        print(f"{module:36} {total:7} {killed:7} {c['equivalent']:7} {survived:8} {rate:7.1%}")
        group = next(g for g in TARGET_RATES if module.startswith(g))
        groups[group][0] += killed
        groups[group][1] += live
        if c["error"]:
            print(f"  {c['error']} mutants of {module} could not be planted")
    for group, (killed, live) in groups.items():
        rate = killed / live if live else 1.0
        met = rate >= TARGET_RATES[group]
        ok = ok and met
        target = f"target {TARGET_RATES[group]:.0%}"
        print(f"{group + ' (all)':36} {'':7} {killed:7} {'':7} {live - killed:8} {rate:7.1%}  {target}")
    if survivors:
        print(f"\n{len(survivors)} surviving mutants (kill them, or list them in mutation/equivalent.txt):")
        for mutant in sorted(survivors, key=lambda m: (m.path, m.line)):
            change = f"`{mutant.original}` -> {mutant.replacement}"
            print(f"  {mutant.path}:{mutant.line}  {mutant.operator}  {change}")
            print(f"      {mutant.key}")
    stale = [] if partial else sorted(set(equivalents) - seen_equivalent)
    if stale:
        print(f"\n{len(stale)} entries of mutation/equivalent.txt match no mutant any more:")
        for key in stale:
            print(f"  {key}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="mutants whose key contains this text")
    parser.add_argument("--reuse", action="store_true", help="reuse the last recorded coverage")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds of covering tests per mutant at most (default 6; with --survivors, 60)",
    )
    parser.add_argument(
        "--max-tests", type=int, help="covering tests per mutant at most (default 40; with --survivors, 400)"
    )
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="run only the last run's survivors again, each against many more of the tests that cover it",
    )
    args = parser.parse_args()
    started = time.monotonic()
    if not args.reuse or not (WORK / "coverage").exists():
        print("recording coverage per test ...", flush=True)
        record()
    keys = None
    if args.survivors:
        last = json.loads((WORK / "results.json").read_text())
        survived = {Mutant.from_json(r["mutant"]).key for r in last if r["verdict"] == "survived"}
        keys = survived - set(load_equivalents())
    budget = args.budget or (60.0 if args.survivors else 6.0)
    max_tests = args.max_tests or (400 if args.survivors else 40)
    entries = plan(args.only, budget, max_tests, keys)
    runnable = [e for e in entries if e["tests"]]
    uncovered = [Mutant.from_json(e["mutant"]) for e in entries if not e["tests"]]  # type: ignore[arg-type]
    print(f"{len(entries)} mutants, {len(uncovered)} covered by no test; running the others ...", flush=True)
    (WORK / "plan.json").write_text(json.dumps(runnable))
    results_path = WORK / "results.json"
    results_path.unlink(missing_ok=True)
    _pytest(
        "-q",
        f"--mutation-run={WORK / 'plan.json'}",
        f"--mutation-results={results_path}",
        f"--mutation-workers={args.workers}",
        "tests",
        env={"HYPOTHESIS_PROFILE": "mutation"},
    )
    results = json.loads(results_path.read_text())
    _remember_kills(results)
    ok = report(results, uncovered, partial=bool(args.only or args.survivors))
    print(f"\n{time.monotonic() - started:.0f} s")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
