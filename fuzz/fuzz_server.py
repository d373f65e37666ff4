"""Fuzz a ServerConnection fed arbitrary bytes.

Input: the byte stream a client sends. A fresh ServerConnection (small limits,
so they are reachable) receives it in one piece; a MemoryServerApp answers its
events, and logins for unknown accounts run against a decoy record (a real one
made at start), so LOGIN_START reaches the OPAQUE code instead of a refusal.
Then every deadline passes (``handle_timer``) and the stream ends (in an
order the input's length picks).

The rule: the connection never raises (peer faults are events), whatever it
sends back is well-formed and bounded by the input, and its buffers and
tables stay within their limits after each step.
"""

from __future__ import annotations

import functools

from keymgmt_proto import (
    HEADER_SIZE,
    ClientConnection,
    Event,
    LoginRequested,
    RegistrationSucceeded,
    ServerConfig,
    ServerConnection,
    ServerSetup,
    SessionRegistry,
)

from ._adapters import InMemoryPair, MemoryServerApp
from ._common import check_bounded, check_output, det_random, drain, main

ACCOUNT = b"alice@example.org"
PASSWORD = b"correct horse battery staple"
CONFIG = ServerConfig(
    max_payload=4096,
    max_sessions_per_connection=8,
    max_requests_in_flight=4,
    max_requests_per_session=8,
)


class FuzzServerApp(MemoryServerApp):
    """MemoryServerApp, except that unknown accounts log in against a decoy record."""

    def __init__(self, decoy: tuple[bytes, bytes] | None = None) -> None:
        super().__init__(random=det_random)
        self.decoy = decoy

    def __call__(self, conn: ServerConnection, event: Event) -> None:
        if isinstance(event, LoginRequested) and event.account_name not in self.accounts and self.decoy:
            self.events.append(event)
            conn.accept_login(event.session_id, *self.decoy)
            return
        super().__call__(conn, event)


@functools.cache
def world() -> tuple[ServerSetup, FuzzServerApp]:
    """A server setup and an application holding one real registration (made once)."""
    setup = ServerSetup.generate()
    app = FuzzServerApp()
    pair = InMemoryPair(
        ClientConnection(det_random),
        ServerConnection(setup, det_random, config=CONFIG, now=0.0),
        app,
        now=0.0,
    )
    pair.client.open_registration(ACCOUNT, PASSWORD)
    if not any(isinstance(e, RegistrationSucceeded) for e in pair.pump()):
        raise RuntimeError("fuzz setup: registration failed")
    account = app.accounts[ACCOUNT]
    app.decoy = (bytes(16), account.registration_record)
    return setup, app


def new_server() -> tuple[ServerConnection, FuzzServerApp]:
    setup, template = world()
    app = FuzzServerApp(template.decoy)
    app.accounts = dict(template.accounts)
    det_random.reset()
    server = ServerConnection(setup, det_random, config=CONFIG, registry=SessionRegistry(CONFIG), now=0.0)
    return server, app


def test_one_input(data: bytes) -> None:
    server, app = new_server()
    frames = len(data) // HEADER_SIZE + 1
    events = 3 * frames + 2 * CONFIG.max_sessions_per_connection + 8
    output = 32 * len(data) + 1024  # an ABORT with a full reason answers a bare 10-byte header

    if data:
        server.receive_data(data, 0.0)
    drain(server, app, events)
    check_bounded(server)
    check_output(server.data_to_send(), budget=output)

    # Then, at one late instant, every deadline passes and the stream ends, in an order the
    # input picks.
    steps = [_expire_all, _end_of_stream]
    if len(data) % 2:
        steps.reverse()
    for step in steps:
        step(server)
        drain(server, app, events)
        check_bounded(server)
        check_output(server.data_to_send(), budget=output)


#: Past every deadline (the input arrives at 0.0).
LATER = 1e9


def _expire_all(server: ServerConnection) -> None:
    server.handle_timer(LATER)
    server.registry.handle_timer(LATER)


def _end_of_stream(server: ServerConnection) -> None:
    server.receive_data(b"", LATER)


if __name__ == "__main__":
    main(test_one_input)
