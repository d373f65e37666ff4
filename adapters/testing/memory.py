"""In-memory adapter: a client and a server connection joined without sockets.

:class:`InMemoryPair` moves bytes between a :class:`ClientConnection` and a
:class:`ServerConnection`, handing every server event to an application
callback, running the client's OPAQUE steps inline and collecting the client's
other events. Bytes are delivered whole, one
byte at a time, or in random splits, so tests exercise the parsers' buffering.
Time is virtual: ``advance(seconds)`` moves the clock and fires the server's
deadlines. Plaintext is allowed here only (NET-1): there is no transport.

:class:`MemoryServerApp` is a small reference server application keeping
accounts in a dict; it answers requests with a handler (echo by default).
"""

from __future__ import annotations

import os
import random as _random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from keymgmt_proto import (
    NEED_DATA,
    ClientConnection,
    ErrorCode,
    Event,
    LoginRequested,
    OpaqueStepRequired,
    RandomSource,
    RegistrationCompleted,
    RegistrationRequested,
    RequestReceived,
    ServerConnection,
)

__all__ = ["Delivery", "InMemoryPair", "MemoryServerApp", "ServerApp"]

#: A server application: called with the connection and each server event.
ServerApp = Callable[[ServerConnection, Event], None]


class Delivery(Enum):
    """How bytes cross the in-memory link."""

    WHOLE = "whole"
    BYTEWISE = "bytewise"
    RANDOM_SPLITS = "random-splits"


@dataclass(slots=True)
class _Account:
    user_id: bytes
    registration_record: bytes = field(repr=False)
    encrypted_storage_key: bytes = field(repr=False)


class MemoryServerApp:
    """Reference server application over a dict. Not durable: for tests and demos.

    ``handler(user_id, body) -> bytes`` answers requests (echo by default).
    Every server event is appended to ``events`` for inspection.
    """

    def __init__(
        self,
        random: RandomSource = os.urandom,
        handler: Callable[[bytes, bytes], bytes] | None = None,
    ) -> None:
        self._random = random
        self.handler = handler or (lambda user_id, body: body)
        self.accounts: dict[bytes, _Account] = {}
        self.events: list[Event] = []

    def __call__(self, conn: ServerConnection, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, RegistrationRequested):
            if event.account_name in self.accounts:
                conn.reject_session(event.session_id, ErrorCode.ACCOUNT_EXISTS, "account exists")
                return
            conn.accept_registration(event.session_id, self._fresh_user_id())
        elif isinstance(event, RegistrationCompleted):
            if event.account_name in self.accounts:  # lost a race with another registration
                conn.reject_session(event.session_id, ErrorCode.ACCOUNT_EXISTS, "account exists")
                return
            self.accounts[event.account_name] = _Account(
                event.user_id, event.registration_record, event.encrypted_storage_key
            )
            conn.confirm_registration(event.session_id)
        elif isinstance(event, LoginRequested):
            account = self.accounts.get(event.account_name)
            if account is None:  # NET-9: a decoy login, indistinguishable from a wrong password
                conn.accept_unknown_login(event.session_id)
                return
            conn.accept_login(event.session_id, account.user_id, account.registration_record)
        elif isinstance(event, RequestReceived):
            conn.send_response(event.session_id, event.request_id, self.handler(event.user_id, event.body))

    def _fresh_user_id(self) -> bytes:
        taken = {account.user_id for account in self.accounts.values()}
        while True:  # REG-2: redraw on collision
            user_id = self._random(16)
            if user_id not in taken:
                return user_id


class InMemoryPair:
    """A client connection and a server connection linked in memory.

    ``pump()`` moves bytes both ways until neither side has anything to say,
    runs the server application on each server event, and returns the client's
    events in order. Each ``OpaqueStepRequired`` is run inline, with the client's
    suite, as soon as it comes out, and is not returned; with ``run_opaque_steps``
    False it is returned like any other event and the caller hands its result back
    (``client.complete_opaque_step``). ``rng`` drives random splits (seed it for
    reproducibility). ``now`` starts the virtual clock: pass the ``now`` the server
    connection was made at.
    """

    def __init__(
        self,
        client: ClientConnection,
        server: ServerConnection,
        app: ServerApp,
        *,
        delivery: Delivery = Delivery.WHOLE,
        rng: _random.Random | None = None,
        now: float,
        run_opaque_steps: bool = True,
    ) -> None:
        self.client = client
        self.server = server
        self.app = app
        self.delivery = delivery
        self.rng = rng or _random.Random(0)  # noqa: S311 - split points, not secrets
        self.now = now
        self.run_opaque_steps = run_opaque_steps
        self.server_events: list[Event] = []

    def _chunks(self, data: bytes) -> list[bytes]:
        if not data:
            return []  # nothing to deliver (b"" would mean end of stream to the receiver)
        if self.delivery is Delivery.WHOLE or len(data) <= 1:
            return [data]
        if self.delivery is Delivery.BYTEWISE:
            return [data[i : i + 1] for i in range(len(data))]
        cuts = sorted(self.rng.sample(range(1, len(data)), k=min(len(data) - 1, self.rng.randint(1, 8))))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]

    def to_server(self, data: bytes) -> None:
        """Deliver raw bytes to the server (tests use this to inject)."""
        for chunk in self._chunks(data):
            self.server.receive_data(chunk, self.now)
            self._drain_server()

    def to_client(self, data: bytes) -> list[Event]:
        """Deliver raw bytes to the client; returns the client events they caused."""
        events: list[Event] = []
        for chunk in self._chunks(data):
            self.client.receive_data(chunk)
            events.extend(self._drain_client())
        return events

    def _drain_server(self) -> None:
        while (event := self.server.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            self.server_events.append(event)
            self.app(self.server, event)

    def _drain_client(self) -> list[Event]:
        events: list[Event] = []
        while (event := self.client.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            if isinstance(event, OpaqueStepRequired) and self.run_opaque_steps:
                self.client.complete_opaque_step(event.run(self.client.opaque))
            else:
                events.append(event)
        return events

    def pump(self) -> list[Event]:
        """Exchange bytes until both sides are quiet; return the client's events."""
        events = self._drain_client()
        self._drain_server()
        while True:
            upstream = self.client.data_to_send()
            if upstream:
                self.to_server(upstream)
            downstream = self.server.data_to_send()
            if downstream:
                events.extend(self.to_client(downstream))
            if not upstream and not downstream:
                return events

    def advance(self, seconds: float) -> list[Event]:
        """Move the virtual clock, fire due deadlines, and pump."""
        self.now += seconds
        self.server.handle_timer(self.now)
        expired = self.server.registry.handle_timer(self.now)
        on_expired = getattr(self.app, "sessions_expired", None)
        if expired and on_expired is not None:
            on_expired(expired)
        self._drain_server()
        return self.pump()
