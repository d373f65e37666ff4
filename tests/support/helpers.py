"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import random
from typing import TypeVar

from keymgmt.adapters import Delivery, InMemoryPair, MemoryServerApp
from keymgmt_proto import (
    NEED_DATA,
    ClientConnection,
    Event,
    OpaqueStepRequired,
    RegistrationSucceeded,
    ServerConfig,
    ServerConnection,
    ServerSetup,
    SessionEstablished,
    SessionRegistry,
)

E = TypeVar("E", bound=Event)

PASSWORD = b"correct horse battery staple"


def only(events: list[Event], kind: type[E]) -> E:
    """The single event of type ``kind`` in ``events`` (fails otherwise)."""
    found = [e for e in events if isinstance(e, kind)]
    assert len(found) == 1, f"expected one {kind.__name__} in {events!r}"
    return found[0]


def drain(conn: ClientConnection | ServerConnection) -> list[Event]:
    """Every event until NEED_DATA. A client's OPAQUE steps run inline with its suite (as
    InMemoryPair runs them) and are not returned."""
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        if isinstance(event, OpaqueStepRequired):
            assert isinstance(conn, ClientConnection)
            conn.complete_opaque_step(event.run(conn.opaque))
        else:
            events.append(event)
    return events


def register(pair: InMemoryPair, account: bytes, password: bytes = PASSWORD) -> RegistrationSucceeded:
    pair.client.open_registration(account, password)
    return only(pair.pump(), RegistrationSucceeded)


def login(pair: InMemoryPair, account: bytes, password: bytes = PASSWORD) -> SessionEstablished:
    pair.client.open_request_session(account, password)
    return only(pair.pump(), SessionEstablished)


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
