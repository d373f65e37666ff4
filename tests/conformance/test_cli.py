"""``python -m keymgmt.adapters.conformance``'s options, against what the README says of them
(no server needed)."""

from __future__ import annotations

import re
from pathlib import Path

from keymgmt.adapters.conformance.__main__ import _parser
from keymgmt.adapters.conformance.link import Target
from keymgmt.adapters.conformance.server import ServerRunSettings

ROOT = Path(__file__).resolve().parents[2]


def _section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    return readme[start : readme.index("\n## ", start + 1)]


def test_the_server_options_default_to_the_run_settings_the_readme_states() -> None:
    """The README's defaults are ServerRunSettings' (and Target's timeout); the command line
    used to run 25 examples where both said 40."""
    args = _parser().parse_args(["server", "--target", "127.0.0.1:7443"])
    run = ServerRunSettings()
    defaults = {
        "max-examples": (args.max_examples, run.max_examples),
        "steps": (args.steps, run.steps),
        "time-limit": (args.time_limit, run.time_limit),
        "shrink-time-limit": (args.shrink_time_limit, run.shrink_time_limit),
        "timeout": (args.timeout, Target("127.0.0.1", 7443).timeout),
    }
    text = " ".join(_section("Testing your implementation").split())
    for option, (given, expected) in defaults.items():
        assert given == expected, (option, given, expected)
        stated = re.search(rf"`--{option}` [^`]*?default (\d+)", text)
        assert stated is not None, f"the README states no default for --{option}"
        assert float(stated.group(1)) == expected, (option, stated.group(0))
