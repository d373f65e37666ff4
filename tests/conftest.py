"""Shared fixtures for every test folder: a server setup made once per run, a pairing helper
(``harness``), a fake-OPAQUE world (``world``), both anyio backends, Hypothesis profiles.

The helpers themselves live in tests/support/."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from keymgmt_proto import ServerSetup

from .support.fake_pairs import FakeWorld
from .support.helpers import Harness

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
#: make mutation: few examples, the same ones every run, nothing saved between runs.
settings.register_profile(
    "mutation",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

#: Test files that build web/ in place (web/build/, web/demo/dist/: ``npm test``, ``build_web()``,
#: the bench smoke's browser line): under pytest-xdist (``make unit`` runs ``-n N --dist
#: loadgroup``) they share one worker, so two of them never write the same bundle at once.
WEB_BUILDERS = frozenset(
    {
        "tests/repo/test_web.py",
        "tests/repo/test_bench_smoke.py",
        "tests/system/test_browser.py",
        "tests/system/test_web_demo.py",
        "tests/conformance/test_web_client_mode.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("xdist"):
        return  # a plain run (or an environment without the dev extra): serial anyway
    for item in items:
        if item.nodeid.split("::")[0] in WEB_BUILDERS:
            item.add_marker(pytest.mark.xdist_group("web"))


def _keymgmt_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name.startswith("KEYMGMT_")}


@pytest.fixture(autouse=True)
def _environment_left_as_found() -> Iterator[None]:
    """Fail a test that leaves a ``KEYMGMT_*`` variable changed (and put it back): a
    variable a test sets in this process reaches every later test of the same xdist worker
    (a ``KEYMGMT_WORKERS=1`` left behind once made another file's server start one worker
    whatever its config said). Set them with ``monkeypatch.setenv``, which undoes them."""
    before = _keymgmt_environment()
    yield
    after = _keymgmt_environment()
    if after != before:
        os.environ.update(before)
        for name in after.keys() - before.keys():
            del os.environ[name]
        changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        pytest.fail(f"the test left {', '.join(changed)} changed in os.environ (use monkeypatch.setenv)")


@pytest.fixture(scope="session")
def server_setup() -> ServerSetup:
    return ServerSetup.generate()


@pytest.fixture
def harness(server_setup: ServerSetup) -> Harness:
    return Harness(server_setup)


@pytest.fixture
def world(server_setup: ServerSetup) -> FakeWorld:
    """A fast server (fake OPAQUE) that tests connect as many clients to as they need."""
    return FakeWorld(server_setup)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every anyio test on both event loops."""
    return str(request.param)
