"""`make demo`: a real registration, login and requests over the in-memory adapter.

Prints each step as it happens. The network adapters will turn this into a
real server run; until then the bytes cross an in-memory link.
"""

from __future__ import annotations

import os
import sys
from typing import TypeVar

from keymgmt_proto import (
    ClientConnection,
    ErrorCode,
    Event,
    RegistrationSucceeded,
    ResponseReceived,
    ServerConnection,
    ServerSetup,
    SessionEstablished,
    SessionFailed,
    SessionRegistry,
)

from .memory import InMemoryPair, MemoryServerApp

__all__ = ["main"]


E = TypeVar("E", bound=Event)


def _expect(events: list[Event], kind: type[E]) -> E:
    for event in events:
        if isinstance(event, kind):
            return event
    raise SystemExit(f"demo failed: expected {kind.__name__}, got {events!r}")


def main() -> int:
    say = print
    setup = ServerSetup.generate()
    registry = SessionRegistry()
    app = MemoryServerApp(handler=lambda user_id, body: b"echo: " + body)

    def connect() -> InMemoryPair:
        return InMemoryPair(
            ClientConnection(os.urandom), ServerConnection(setup, os.urandom, registry=registry), app
        )

    pair = connect()
    account, password = b"alice@example.org", b"correct horse battery staple"
    say(f"1. register {account.decode()} (OPAQUE registration + login in one session)")
    pair.client.open_registration(account, password)
    registered = _expect(pair.pump(), RegistrationSucceeded)
    say(f"   registered: user_id={registered.user_id.hex()}")

    say("2. log in (request session)")
    sid = pair.client.open_request_session(account, password)
    established = _expect(pair.pump(), SessionEstablished)
    same_key = established.export_key == registered.export_key
    say(f"   logged in: user_id={established.user_id.hex()}, export_key matches registration: {same_key}")

    say("3. two requests over the encrypted channel")
    for body in (b"first request", b"second request"):
        pair.client.send_request(sid, body)
        response = _expect(pair.pump(), ResponseReceived)
        say(f"   request {response.request_id}: {body!r} -> {response.body!r}")

    say("4. the connection drops with a request in flight; resume on a new connection")
    pair.client.send_request(sid, b"in flight")
    pair.to_server(pair.client.data_to_send())
    pair.server.data_to_send()  # the answer is lost with the connection
    pair.client.connection_lost()
    pair.server.connection_lost()
    pair.pump()
    (detached,) = pair.client.take_detached_sessions()
    pair = connect()
    new_sid = pair.client.resume_session(detached)
    events = pair.pump()
    response = _expect(events, ResponseReceived)
    say(
        f"   resumed without a new login; in-flight request {response.request_id} answered once: "
        f"{response.body!r}"
    )

    say("5. a wrong password")
    pair.client.open_request_session(account, b"wrong password")
    failed = _expect(pair.pump(), SessionFailed)
    say(f"   refused: {failed.code.name}")
    assert failed.code is ErrorCode.AUTHENTICATION_FAILED

    say("6. log out")
    pair.client.close_session(new_sid)
    pair.pump()
    say(f"   server saw: {type(pair.server_events[-1]).__name__}")
    ok = same_key and registered.user_id == established.user_id
    say("demo finished: OK" if ok else "demo finished: MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
