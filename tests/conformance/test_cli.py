"""``python -m keymgmt.adapters.conformance``'s options, against what the README says of them
(no server needed)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from keymgmt.adapters.conformance.__main__ import _parser, main
from keymgmt.adapters.conformance.broken import HONEST_VARIANTS, VARIANTS
from keymgmt.adapters.conformance.link import Target
from keymgmt.adapters.conformance.server import ServerRunSettings
from keymgmt_proto import Channel

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


def test_broken_server_lists_its_variants(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["broken-server", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(VARIANTS)
    assert all(
        line.split()[1] == ("policy" if line.split()[0] in HONEST_VARIANTS else "broken") for line in lines
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["broken-server"], "broken-server needs a VARIANT"),
        (["broken-server", "nope", "--config", "x.toml"], "no variant 'nope'"),
        # workers are separate processes started unpatched: they would serve an honest server
        (["broken-server", "replay", "--workers", "2", "--config", "x.toml"], "runs one process"),
        (["broken-server", "replay", "--workers=2", "--config", "x.toml"], "runs one process"),
    ],
)
def test_broken_server_refuses_in_one_line_before_patching_anything(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    open_payload = Channel.open_payload
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert Channel.open_payload is open_payload


def test_broken_server_serves_in_one_process_whatever_the_settings_say(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """server.workers (or KEYMGMT_WORKERS) above 1 would start unpatched worker processes:
    broken-server sets KEYMGMT_WORKERS=1, which overrides the file, then runs `serve`."""
    from keymgmt.adapters.cli import server

    config = tmp_path / "x.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\nworkers = 4\n')
    seen: list[tuple[list[str], str | None]] = []
    monkeypatch.setenv("KEYMGMT_WORKERS", "4")
    monkeypatch.setitem(VARIANTS, "replay", lambda: None)  # nothing patched in this process
    monkeypatch.setattr(
        server, "main", lambda argv: seen.append((argv, os.environ.get("KEYMGMT_WORKERS"))) or 0
    )
    assert main(["broken-server", "replay", "--config", str(config), "--log-level", "DEBUG"]) == 0
    assert seen == [(["serve", "--config", str(config), "--log-level", "DEBUG"], "1")]
    assert "BROKEN on purpose (replay): opens a replayed record" in capsys.readouterr().err


def _readme_commands() -> list[list[str]]:
    """Every ``python -m keymgmt.adapters.conformance`` command of the README's shell
    blocks, continuation lines joined, without redirections and ``&``."""
    readme = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0])
            if words[:3] == ["python", "-m", "keymgmt.adapters.conformance"]:
                commands.append([w for w in words[3:] if w != "&" and not re.match(r"\d?>", w)])
    return commands


def test_the_readme_commands_parse_and_name_real_variants() -> None:
    """The worked example and the other commands the README gives use options and variants
    the command line has (the packaging test runs the same steps from a wheel)."""
    commands = _readme_commands()
    assert {argv[0] for argv in commands} == {"server", "client", "broken-server"}, commands
    for argv in commands:
        args = _parser().parse_args(argv)
        if args.command == "broken-server":
            assert args.variant in VARIANTS and args.serve_args[:1] == ["--config"], argv


@pytest.mark.parametrize(
    ("toml", "env", "extra", "message"),
    [
        ('[server]\nhost = "0.0.0.0"\n', {}, [], "server.host is '0.0.0.0'"),
        ("", {"KEYMGMT_HOST": "192.0.2.7"}, [], "server.host is '192.0.2.7'"),
        ("", {"KEYMGMT_HOST": "keys.example.org"}, [], "server.host is 'keys.example.org'"),
        (
            '[server]\nhost = "::1"\n[websocket]\nlisten = "0.0.0.0:8443"\n'
            'allowed_origins = ["https://app.example.org"]\n',
            {},
            [],
            "websocket.listen is '0.0.0.0'",
        ),
        ('[server]\nhost = "127.0.0.1"\n', {}, ["--listen-fd", "3"], "no --listen-fd"),
    ],
)
def test_broken_server_listens_on_loopback_only(
    toml: str,
    env: dict[str, str],
    extra: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """A server broken on purpose that other machines could reach would serve them a broken
    protocol: refused in one line, before anything is patched or served."""
    from keymgmt.adapters.cli import server

    config = tmp_path / "srv.toml"
    config.write_text(toml)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    served: list[list[str]] = []
    monkeypatch.setattr(server, "main", lambda argv: served.append(argv) or 0)
    open_payload = Channel.open_payload
    assert main(["broken-server", "replay", "--config", str(config), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert served == [] and Channel.open_payload is open_payload


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_broken_server_serves_on_a_loopback_host(
    host: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from keymgmt.adapters.cli import server

    config = tmp_path / "srv.toml"
    config.write_text(f'[server]\nhost = "{host}"\n')
    # broken-server sets KEYMGMT_WORKERS in its process: monkeypatch then undoes it after the test
    # (left set, it made later tests' key servers start one worker whatever their config said)
    monkeypatch.setenv("KEYMGMT_WORKERS", "1")
    served: list[list[str]] = []
    monkeypatch.setitem(VARIANTS, "replay", lambda: None)
    monkeypatch.setattr(server, "main", lambda argv: served.append(argv) or 0)
    assert main(["broken-server", "replay", "--config", str(config)]) == 0
    assert served == [["serve", "--config", str(config)]]
