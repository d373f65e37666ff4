"""The fuzz harnesses (fuzz/): their seed corpora always replay cleanly, and a short
atheris run of each finds nothing.

The replay needs no atheris: it calls each harness's ``test_one_input`` on every
file of ``fuzz/corpus/<harness>/``. The smoke runs ``python -m fuzz.run`` per
harness for a few seconds (what ``make fuzz-smoke`` does) and fails if libFuzzer
reports a crash, a hang or running out of memory; the input is then in
fuzz/crashes/. Without atheris (no wheel for this platform) the smoke is skipped
with the reason printed in the summary (``-ra``).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import run as fuzz_run

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"
SMOKE_SECONDS = 3


def corpus_files(harness: str) -> list[Path]:
    return sorted((CORPUS / harness).iterdir())


@pytest.mark.parametrize("harness", fuzz_run.HARNESSES)
def test_corpus_replays_cleanly(harness: str) -> None:
    files = corpus_files(harness)
    assert 5 <= len(files) <= 200, f"{harness}: {len(files)} seed files (regenerate with make fuzz-corpus)"
    module = importlib.import_module(f"fuzz.fuzz_{harness}")
    for path in files:
        try:
            module.test_one_input(path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{harness}: seed {path.name} fails the harness: {exc!r}") from exc


def test_every_harness_has_a_corpus_and_no_other() -> None:
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(fuzz_run.HARNESSES)


def test_harness_rule_rejects_foreign_exceptions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness lets anything but RemoteProtocolError through (so libFuzzer sees it)."""
    from fuzz import fuzz_messages

    def broken(payload: bytes) -> bytes:
        raise ValueError("not a protocol error")

    monkeypatch.setattr(fuzz_messages, "TARGETS", [("broken", broken)])
    with pytest.raises(ValueError, match="not a protocol error"):
        fuzz_messages.test_one_input(b"\x00payload")


def _atheris_or_skip() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError as exc:
        pytest.skip(
            f"atheris is not importable ({exc}); it has wheels only for Linux x86_64 and "
            "CPython 3.11-3.13. The corpus replay tests still ran."
        )


@pytest.mark.parametrize("harness", fuzz_run.HARNESSES)
def test_fuzz_smoke(harness: str, tmp_path: Path) -> None:
    _atheris_or_skip()
    crashes = ROOT / "fuzz" / "crashes"
    before = set(crashes.glob(f"{harness}-*"))
    result = subprocess.run(
        [sys.executable, "-m", "fuzz.run", "--seconds", str(SMOKE_SECONDS), "--work", str(tmp_path), harness],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    new = sorted(set(crashes.glob(f"{harness}-*")) - before)
    assert result.returncode == 0, (
        f"fuzz harness {harness} failed (exit {result.returncode}); saved inputs: {[p.name for p in new]}\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    )
    assert "DONE" in result.stderr, f"libFuzzer did not finish a run:\n{result.stderr[-4000:]}"


def test_a_crash_fails_and_saves_its_input(tmp_path: Path) -> None:
    """The mechanism the smoke relies on: an exception in a target makes libFuzzer exit
    non-zero and write the input under the artifact prefix."""
    _atheris_or_skip()
    target = tmp_path / "crashing_target.py"
    target.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from fuzz._common import main\n"
        "def test_one_input(data):\n"
        "    if data.startswith(b'boom'):\n"
        "        raise ValueError('boom')\n"
        "main(test_one_input)\n"
    )
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "boom").write_bytes(b"boom!")
    result = subprocess.run(
        [sys.executable, str(target), "-runs=10", f"-artifact_prefix={tmp_path}/t-", str(seeds)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    (saved,) = tmp_path.glob("t-crash-*")
    assert saved.read_bytes() == b"boom!"
