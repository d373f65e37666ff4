"""Small helpers shared by the tests."""

from __future__ import annotations

from typing import TypeVar

from keymgmt.adapters import InMemoryPair
from keymgmt_proto import Event, RegistrationSucceeded, SessionEstablished

E = TypeVar("E", bound=Event)

PASSWORD = b"correct horse battery staple"


def only(events: list[Event], kind: type[E]) -> E:
    """The single event of type ``kind`` in ``events`` (fails otherwise)."""
    found = [e for e in events if isinstance(e, kind)]
    assert len(found) == 1, f"expected one {kind.__name__} in {events!r}"
    return found[0]


def register(pair: InMemoryPair, account: bytes, password: bytes = PASSWORD) -> RegistrationSucceeded:
    pair.client.open_registration(account, password)
    return only(pair.pump(), RegistrationSucceeded)


def login(pair: InMemoryPair, account: bytes, password: bytes = PASSWORD) -> SessionEstablished:
    pair.client.open_request_session(account, password)
    return only(pair.pump(), SessionEstablished)
