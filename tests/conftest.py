"""Shared fixtures for every test folder: a server setup made once per run, a pairing helper
(``harness``), a fake-OPAQUE world (``world``), both anyio backends, Hypothesis profiles.

The helpers themselves live in tests/support/."""

from __future__ import annotations

import os

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
