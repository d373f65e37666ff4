"""Run the fuzz harnesses one after another, each for a given time.

    python -m fuzz.run [--seconds N] [--work DIR] [HARNESS ...]

Each harness runs as ``python -m fuzz.fuzz_<name>`` under libFuzzer with
``fuzz/corpus/<name>/`` as its seed corpus (read, never written: new inputs go
to the work directory, ``fuzz/work/<name>/`` by default). A crash, a hang
(``-timeout``) or running out of memory (``-rss_limit_mb``) stops that
harness, leaves the input as ``fuzz/crashes/<name>-crash-<sha1>`` (or
``-timeout-``/``-oom-``) and makes this script exit non-zero after the others
have run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
HARNESSES = ("frame_header", "messages", "server", "client", "session")
#: Seconds one input may take before libFuzzer calls it a hang.
INPUT_TIMEOUT = 10
RSS_LIMIT_MB = 2048
#: Largest input libFuzzer builds (several frames at the harnesses' 4 KiB payload limit).
MAX_LEN = 1 << 16


def command(name: str, seconds: int, work: Path) -> list[str]:
    """The libFuzzer command line for one harness."""
    crashes = FUZZ_DIR / "crashes"
    return [
        sys.executable,
        "-m",
        f"fuzz.fuzz_{name}",
        f"-max_total_time={seconds}",
        f"-timeout={INPUT_TIMEOUT}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-max_len={MAX_LEN}",
        f"-artifact_prefix={crashes}/{name}-",
        "-print_final_stats=1",
        str(work / name),
        str(FUZZ_DIR / "corpus" / name),
    ]


def run(name: str, seconds: int, work: Path, *, capture: bool = False) -> subprocess.CompletedProcess[str]:
    (work / name).mkdir(parents=True, exist_ok=True)
    (FUZZ_DIR / "crashes").mkdir(exist_ok=True)
    return subprocess.run(  # noqa: S603 - this project's own harness, fixed arguments
        command(name, seconds, work),
        cwd=ROOT,
        check=False,
        text=True,
        capture_output=capture,
        timeout=seconds + 120,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=60, help="time per harness (default 60)")
    parser.add_argument("--work", type=Path, default=FUZZ_DIR / "work", help="where new corpus entries go")
    parser.add_argument("harness", nargs="*", help=f"any of {', '.join(HARNESSES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.harness) - set(HARNESSES))
    if unknown:
        parser.error(f"unknown harness {', '.join(unknown)}; choose from {', '.join(HARNESSES)}")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed (pip install -e '.[dev]' on Linux x86_64, Python 3.11-3.13)")
        return 2
    failed = []
    for name in args.harness or HARNESSES:
        print(f"=== fuzz {name}: {args.seconds} s", flush=True)
        started = time.monotonic()
        result = run(name, args.seconds, args.work)
        elapsed = time.monotonic() - started
        print(f"=== fuzz {name}: exit {result.returncode} after {elapsed:.1f} s", flush=True)
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print(f"FAILED: {', '.join(failed)}; inputs saved under {FUZZ_DIR / 'crashes'}")
        return 1
    print("all harnesses ran without a finding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
