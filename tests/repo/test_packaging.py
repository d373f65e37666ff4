"""The source distribution: its metadata, and that its own tests run from it.

A distribution packager unpacks the sdist, installs it and runs its tests; this
does the same on loopback without a network: build the sdist from this tree,
build and install a wheel from the sdist alone into a scratch folder, and run a
part of the suite from the unpacked sdist against that installation
(`pytest --import-mode=append`, as the README says).
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAME = "keymgmt-0.1.0"

# Run from the sdist: the vectors, the docs checks, and `make demo`'s scripted
# flow over real TLS with a real server process (all from the installed wheel).
SUITE = ["tests/core/test_vectors.py", "tests/repo/test_docs.py", "tests/cli/test_demo.py"]

PIP_INSTALL = (sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation")
# -P: the unpacked folder is not put first on sys.path by `python -m`
PYTEST = (sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=append")
LOCAL_STATE = (
    ".git",
    ".venv",
    "*.egg-info",
    "__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".mutation",
    "mutants",
    "build",
    "dist",
    "work",
    "srv",
    ".coverage*",
)

WHERE = """
import os
import keymgmt.adapters
import keymgmt_proto


def test_the_suite_imports_the_installed_package():
    site = os.environ["KEYMGMT_SDIST_SITE"]
    assert keymgmt_proto.__file__.startswith(site), keymgmt_proto.__file__
    assert keymgmt.adapters.__file__.startswith(site), keymgmt.adapters.__file__
"""


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    # Build from a copy without the checkout's local state: setuptools also packs whatever an
    # earlier build listed in keymgmt.egg-info/SOURCES.txt, which would hide a MANIFEST.in gap.
    tree = out / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*LOCAL_STATE))
    subprocess.run(
        [sys.executable, "-c", f"from setuptools.build_meta import build_sdist; build_sdist({str(out)!r})"],
        cwd=tree,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out / f"{NAME}.tar.gz"


def _members(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as tar:
        return {m.name.removeprefix(f"{NAME}/") for m in tar.getmembers() if m.isfile()}


def test_the_sdist_carries_the_license_and_every_test_file(sdist: Path) -> None:
    members = _members(sdist)
    assert "LICENSE" in members
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    tests = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    }
    missing = sorted(tests - members)
    assert not missing, f"test files missing from the sdist: {missing[:10]}"
    for needed in ("docs/protocol.md", "SPEC_MAPPING.md", "keymgmt_proto/py.typed", "adapters/py.typed"):
        assert needed in members


def test_the_metadata_bounds_opaque_and_offers_the_extras(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(f"{NAME}/PKG-INFO")
        assert member is not None
        meta = email.parser.Parser().parsestr(member.read().decode())
    requires = meta.get_all("Requires-Dist") or []
    opaque = [r for r in requires if r.startswith("opaque-ke-py")]
    # the 0.1 series (0.1.0 on 3.11, 0.1.2 on 3.12+) is the protocol's wire format
    assert opaque and "<0.2" in opaque[0] and ">=0.1.0" in opaque[0], opaque
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"postgres", "trio", "dev", "testing"} <= extras
    assert any(r.startswith("trio") and 'extra == "trio"' in r for r in requires)
    # the harness (issue 18): Hypothesis only with the testing extra, never for the core
    assert any(r.startswith("hypothesis") and 'extra == "testing"' in r for r in requires)
    assert not any(r.startswith("hypothesis") and "extra ==" not in r for r in requires)
    assert meta["License-Expression"] == "MIT"
    classifiers = meta.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Typing :: Typed" in classifiers
    assert any(u.startswith("Specification, https://") for u in meta.get_all("Project-URL") or [])


def test_the_sdist_tests_run_against_the_installed_wheel(sdist: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [*PIP_INSTALL, "--target", str(site), str(sdist)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    tree = tmp_path / NAME
    (tree / "tests" / "test_where.py").write_text(WHERE)
    env = {**os.environ, "PYTHONPATH": str(site), "KEYMGMT_SDIST_SITE": str(site)}
    result = subprocess.run(
        [*PYTEST, "tests/test_where.py", *SUITE],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


#: Run with ``python -P -S`` and the installation's folders alone on PYTHONPATH: imports what
#: the harness imports (the server and client modes, the broken variants, both command lines,
#: the strategies) and prints every module loaded from neither folder nor the standard library.
HARNESS_IMPORTS = """
import os, sys, sysconfig
import keymgmt, keymgmt_proto.strategies, keymgmt.adapters.cli.client, keymgmt.adapters.cli.server
import keymgmt.adapters.conformance, keymgmt.adapters.conformance.__main__
import keymgmt.adapters.conformance.broken
allowed = (*os.environ["PYTHONPATH"].split(os.pathsep), sysconfig.get_paths()["stdlib"])
print(sorted(
    n for n, m in list(sys.modules.items())
    if (getattr(m, "__file__", None) or "").startswith("/") and not m.__file__.startswith(allowed)
))
"""


def _requirement_names(requires: list[str] | None, extra: str = "") -> list[str]:
    """The distributions that Requires-Dist lines ``requires`` name for this interpreter,
    with ``extra`` asked for (pytest brings ``packaging``, pip's parser of them)."""
    from packaging.requirements import Requirement

    names = []
    for line in requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
            names.append(requirement.name)
    return names


def _testing_extra_dependencies(site: Path, into: Path) -> list[str]:
    """What ``pip install 'keymgmt[testing]'`` brings besides keymgmt, as links in ``into``
    to this environment's copies: the installed wheel's requirements and its testing extra,
    and what those require in turn (no extras). Anything else a module of the harness
    imports is missing there, as in a user's fresh environment."""
    (dist_info,) = site.glob("keymgmt-*.dist-info")
    todo = _requirement_names(importlib.metadata.Distribution.at(dist_info).requires, "testing")
    into.mkdir()
    done: list[str] = []
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        name = dist.metadata["Name"]
        if name in done:
            continue
        done.append(name)
        todo.extend(_requirement_names(dist.requires))
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (into / top).exists():
                (into / top).symlink_to(source)
    return sorted(done)


def _installed(tmp_path: Path, sdist: Path) -> tuple[Path, dict[str, str]]:
    """The package from the sdist installed alone into a scratch folder, and an environment
    that imports it from there (never from this checkout) and its dependencies with the
    testing extra from a folder of their own: run ``python -P -S`` with it. -S keeps this
    environment's site-packages away, and with it the editable install's import hook, which
    would find a package the wheel lacks in this checkout."""
    site = tmp_path / "site"
    subprocess.run(
        [*PIP_INSTALL, "--target", str(site), str(sdist)], check=True, capture_output=True, timeout=300
    )
    deps = tmp_path / "deps"
    assert "hypothesis" in _testing_extra_dependencies(site, deps)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYMGMT_", "PYTHON"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(site), str(deps)]),
        KEYMGMT_ADMISSION_RATE="1000",
        KEYMGMT_ADMISSION_BURST="1000",
    )
    return site, env


def test_the_installed_package_runs_the_conformance_harness(sdist: Path, tmp_path: Path) -> None:
    """Issue 18, done when: with only the installed package (no checkout on sys.path: -P, -S
    and a scratch working folder), `keymgmt-server` runs and `python -m
    keymgmt.adapters.conformance server` passes against it; against the package's own
    broken variant (`broken-server unknown-account`) it prints a shrunk transcript and exits
    1. Every module the harness imports comes from the installation or the dependencies
    that it and its testing extra declare."""
    _site, env = _installed(tmp_path, sdist)
    work = tmp_path / "work"
    work.mkdir()
    python = [sys.executable, "-P", "-S"]
    where = subprocess.run(
        [*python, "-c", HARNESS_IMPORTS],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout == "[]\n", f"loaded from elsewhere: {where.stdout}"
    subprocess.run(
        [*python, "-m", "keymgmt.adapters.cli.server", "init", "--dir", "srv", "--port", "0"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    harness = [*python, "-m", "keymgmt.adapters.conformance"]
    for program, expect in (
        ([*python, "-m", "keymgmt.adapters.cli.server", "serve"], 0),
        ([*harness, "broken-server", "unknown-account"], 1),
    ):
        server = subprocess.Popen(
            [*program, "--config", "srv/keymgmt-server.toml"],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            assert line.startswith("listening on "), line
            port = line.rsplit(":", 1)[1].strip()
            run = subprocess.run(
                [
                    *harness,
                    "server",
                    "--target",
                    f"127.0.0.1:{port}",
                    "--ca",
                    "srv/ca.pem",
                    "--max-examples",
                    "8",
                    "--steps",
                    "10",
                    "--derandomize",
                    "--shrink-time-limit",
                    "3",
                ],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
        assert run.returncode == expect, run.stdout[-3000:] + run.stderr[-3000:]
        if expect == 0:
            assert run.stdout.splitlines()[-1].startswith("passed: "), run.stdout
        else:
            assert "step 1: " in run.stdout and "\nVIOLATION: " in run.stdout, run.stdout
            assert "an unknown name and a wrong password must look the same" in run.stdout
            assert "state." in run.stdout  # Hypothesis's shrunk steps
