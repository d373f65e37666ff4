"""Fast linked pairs for edge-case tests: FakeOpaque on both sides, a shared registry and app."""

from __future__ import annotations

import os

from keymgmt.adapters import InMemoryPair, MemoryServerApp
from keymgmt_proto import (
    ClientConnection,
    ClientLoginResult,
    ClientStep,
    DetachedSession,
    Event,
    RandomSource,
    RequestReceived,
    ServerConfig,
    ServerConnection,
    ServerSetup,
    SessionRegistry,
)
from keymgmt_proto.testing import FakeOpaque

from .helpers import PASSWORD

__all__ = ["PASSWORD", "FakeWorld", "HoldingApp", "SpyOpaque", "fake_client", "lose", "spied_pair"]


class HoldingApp(MemoryServerApp):
    """The reference app, except that requests wait in ``held`` until the test answers them."""

    def __init__(self, random: RandomSource = os.urandom) -> None:
        super().__init__(random)
        self.held: list[RequestReceived] = []

    def __call__(self, conn: ServerConnection, event: Event) -> None:
        if isinstance(event, RequestReceived):
            self.events.append(event)
            self.held.append(event)
            return
        super().__call__(conn, event)


class FakeWorld:
    """One server (setup, registry, app) and as many client connections to it as a test wants."""

    def __init__(
        self,
        setup: ServerSetup,
        config: ServerConfig | None = None,
        *,
        registry: SessionRegistry | None = None,
        app: MemoryServerApp | None = None,
        random: RandomSource = os.urandom,
    ) -> None:
        self.setup = setup
        self.registry = registry if registry is not None else SessionRegistry(config or ServerConfig())
        self.config = self.registry.config
        self.app = app if app is not None else MemoryServerApp(random)
        self.random = random

    def pair(self, now: float = 0.0, *, client_max_payload: int | None = None) -> InMemoryPair:
        extra = {} if client_max_payload is None else {"max_payload": client_max_payload}
        client = ClientConnection(self.random, opaque=FakeOpaque(self.random), **extra)
        server = ServerConnection(
            self.setup, self.random, registry=self.registry, now=now, opaque=FakeOpaque(self.random)
        )
        return InMemoryPair(client, server, self.app, now=now)


def lose(pair: InMemoryPair) -> list[DetachedSession]:
    """Both ends see the transport go; returns the client's resumable sessions."""
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    return pair.client.take_detached_sessions()


def fake_client() -> ClientConnection:
    """A client connection with the fake OPAQUE, for tests that drive the server by hand."""
    return ClientConnection(os.urandom, opaque=FakeOpaque(os.urandom))


class SpyOpaque(FakeOpaque):
    """The fake suite, recording the name of every client call."""

    __slots__ = ("calls",)

    def __init__(self, random: RandomSource) -> None:
        super().__init__(random)
        self.calls: list[str] = []

    def client_registration_start(self, password: bytes) -> ClientStep:
        self.calls.append("client_registration_start")
        return super().client_registration_start(password)

    def client_registration_finish(
        self, password: bytes, state: bytes, registration_response: bytes
    ) -> ClientStep:
        self.calls.append("client_registration_finish")
        return super().client_registration_finish(password, state, registration_response)

    def client_login_start(self, password: bytes) -> ClientStep:
        self.calls.append("client_login_start")
        return super().client_login_start(password)

    def client_login_finish(
        self, password: bytes, state: bytes, credential_response: bytes
    ) -> ClientLoginResult:
        self.calls.append("client_login_finish")
        return super().client_login_finish(password, state, credential_response)


def spied_pair(world: FakeWorld) -> tuple[InMemoryPair, SpyOpaque]:
    """A pair whose client uses SpyOpaque and whose steps are left to the test."""
    pair = world.pair()
    spy = SpyOpaque(os.urandom)
    pair.client = ClientConnection(os.urandom, opaque=spy)
    pair.run_opaque_steps = False
    return pair, spy
