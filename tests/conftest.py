"""Shared fixtures: a server setup made once per run, a pairing helper, Hypothesis profiles."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, settings

from keymgmt.adapters import Delivery, InMemoryPair, MemoryServerApp
from keymgmt_proto import ClientConnection, ServerConfig, ServerConnection, ServerSetup, SessionRegistry

from .fake_pairs import FakeWorld

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


class Harness:
    """Builds linked pairs that share one server application and session registry."""

    def __init__(self, setup: ServerSetup, config: ServerConfig | None = None) -> None:
        self.setup = setup
        self.config = config or ServerConfig()
        self.registry = SessionRegistry(self.config)
        self.app = MemoryServerApp()

    def pair(self, delivery: Delivery = Delivery.WHOLE, seed: int = 0, now: float = 0.0) -> InMemoryPair:
        return InMemoryPair(
            ClientConnection(os.urandom),
            ServerConnection(self.setup, os.urandom, config=self.config, registry=self.registry, now=now),
            self.app,
            delivery=delivery,
            rng=random.Random(seed),
            now=now,
        )


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
