"""Instruction counts of one store, one retrieve or one login, server and client halves, in process.

The machine is shared and noisy, so the cost of a request's path is judged by the
instructions it executes (deterministic) rather than by its time::

    valgrind --tool=callgrind --toggle-collect=functools_reduce --callgrind-out-file=OUT \\
        .venv/bin/python -m bench.instructions store server 200

counts only what the named side runs, for 200 operations after a warm-up (divide the
total that ``callgrind_annotate OUT`` prints by 200). ``store`` is the client's whole
``KeySession.generate()`` (the plan of ``SecretOps``, the KEY-2 checks, sealing, the local
copy in an in-memory ``LocalStore``; one STORE_SECRET with a next key id per store, as in
P10); ``retrieve`` is P3's raw RETRIEVE (context NULL, a pre-encoded body); ``login`` is
P2's login (LOGIN_START and LOGIN_FINISH, one batch each; the logout is not counted). The server is
the real ``KeyServer`` over a durable SQLite file, each request a batch of its own (its
BEGIN and COMMIT included, as the real driver's are shared by a whole batch). The
client's asyncio plumbing (``KeymgmtClient.request``) is not included: it is the same for
both operations. The measured side's calls run inside ``functools.reduce``, the function
callgrind is told to toggle collection on; nothing else here calls it.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
import types
from collections.abc import Callable
from typing import Any, TypeVar

from keymgmt.adapters.client.async_client import KeySession
from keymgmt.adapters.client.localstore import LocalStore
from keymgmt_proto import (
    Context,
    OpRequest,
    Plan,
    ResponseReceived,
    RetrieveRequest,
    SealedCopy,
    SecretOps,
    ServerSetup,
    SessionEstablished,
)

from .common import ACCOUNT, PASSWORD, drain_client, drain_server, new_pair, sqlite_keyserver

T = TypeVar("T")
#: Stores and retrieves before the measured ones (the storage key fetched, a next key id
#: held, SQLite's statement cache and the allocator warm).
WARM_UP = 20


class _World:
    def __init__(self) -> None:
        self.measured = "none"
        self.app = sqlite_keyserver()
        self.pair = new_pair(ServerSetup.generate(), self.app)
        self.pair.register()
        established = self.pair.login()
        self.sid = established.session_id
        self.user_id = established.user_id
        self.ops = SecretOps(self.user_id, established.export_key, os.urandom)
        # A KeySession over a stand-in client: its _holds and _keep, as generate() runs them.
        self.session = KeySession.__new__(KeySession)
        self.session._client = types.SimpleNamespace(  # type: ignore[assignment]
            local_store=LocalStore(":memory:"), _clock=time.time, _random=os.urandom
        )
        self.session.user_id = self.user_id
        self.session._ops = self.ops

    def side(self, which: str, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)``; inside functools.reduce (counted) when ``which`` is measured."""
        if which != self.measured:
            return function(*args)
        # (two items, no initial value: reduce calls the function once)
        return functools.reduce(lambda _a, _b: function(*args), (0, 0))  # type: ignore[arg-type, return-value]

    def round_trip(self, body: bytes) -> bytes:
        client, server = self.pair.client, self.pair.server
        self.side("client", client.send_request, self.sid, body)
        up = self.side("client", client.data_to_send)

        def serve() -> bytes:
            server.receive_data(up, self.pair.now)
            drain_server(server, self.app)
            return server.data_to_send()

        down = self.side("server", serve)

        def receive() -> bytes:
            client.receive_data(down)
            (response,) = [e for e in drain_client(client) if isinstance(e, ResponseReceived)]
            return response.body

        return self.side("client", receive)

    def run(self, plan: Plan[T]) -> T:
        """What KeySession._run does, without its asyncio plumbing."""
        try:
            request: OpRequest = self.side("client", next, plan)
            while True:
                body = self.round_trip(self.side("client", request.encode))
                answer = self.side("client", self.ops.answer, request, body)
                request = self.side("client", plan.send, answer)
        except StopIteration as done:
            result: T = done.value
            return result

    def login(self) -> None:
        """One whole login (LOGIN_START and LOGIN_FINISH, one batch each, as P2's server
        steps), then its logout, uncounted. The server's two steps are ``serve``; the client's
        are its OPAQUE calls (Argon2) and framing."""
        client, server = self.pair.client, self.pair.server

        def serve(up: bytes) -> bytes:
            server.receive_data(up, self.pair.now)
            drain_server(server, self.app)
            return server.data_to_send()

        sid = self.side("client", client.open_request_session, ACCOUNT, PASSWORD)
        down = self.side("server", serve, self.side("client", client.data_to_send))
        self.side("client", client.receive_data, down)
        self.side("client", drain_client, client)
        down = self.side("server", serve, self.side("client", client.data_to_send))
        self.side("client", client.receive_data, down)
        assert any(isinstance(e, SessionEstablished) for e in self.side("client", drain_client, client))
        client.close_session(sid)
        self.pair.to_server()  # the logout and its audit entry: not part of a login
        server.data_to_send()

    def generate(self) -> bytes:
        plan: Plan[tuple[bytes, SealedCopy]] = self.side("client", self.ops.generate, self.session._holds)
        key_id, copy = self.run(plan)
        self.side("client", self.session._keep, key_id, copy)
        return key_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("operation", choices=["store", "retrieve", "login"])
    parser.add_argument("side", choices=["server", "client", "none"], help="whose instructions to count")
    parser.add_argument("count", type=int)
    args = parser.parse_args(argv)
    world = _World()
    key_id = world.generate()
    body = RetrieveRequest(world.user_id, key_id, Context.NULL).encode()
    operation: Callable[[], Any] = {
        "store": world.generate,
        "retrieve": lambda: world.round_trip(body),
        "login": world.login,
    }[args.operation]
    for _ in range(WARM_UP):
        operation()
    world.measured = args.side
    for _ in range(args.count):
        operation()


if __name__ == "__main__":
    main()
