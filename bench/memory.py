"""P4: server memory per idle established session.

Building 10,000 sessions with real OPAQUE would cost 10,000 client Argon2 runs
(about 25 ms each). Instead, the whole login still goes through the real
``ServerConnection`` and ``SessionRegistry`` (frames, state table, Channel key
schedule, registry entry, WELCOME), and only the two OPAQUE server calls are
replaced by stand-ins that return messages of the real sizes and a random
64-byte session key. After a login the server keeps no OPAQUE state
(``opaque_value`` is cleared), so what stays in memory is the same; the
``validate`` step checks that by measuring the same per-session Python heap
with real OPAQUE logins at a small N.

The client is not a ClientConnection: its frames are encoded by hand and kept
nowhere, so everything measured is held by the server. Two numbers: the RSS
delta (includes OpenSSL's cipher contexts inside the AEAD objects, which
tracemalloc cannot see) and the tracemalloc delta (Python heap only). Each
runs in a fresh subprocess (``python -m bench.memory --sessions N``).
The baseline is the same number of bare ``Channel`` objects: the key state no
design can avoid.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import sys
import tracemalloc
from collections.abc import Callable

import opaque_ke_py as ok

from keymgmt_proto import (
    HEADER_SIZE,
    Channel,
    ClientConnection,
    Event,
    FrameType,
    LoginRequested,
    OpaqueSuite,
    RealOpaque,
    ServerConnection,
    ServerLoginStep,
    ServerSetup,
    SessionRegistry,
)
from keymgmt_proto.wire import (
    CREDENTIAL_FINALIZATION_SIZE,
    CREDENTIAL_REQUEST_SIZE,
    CREDENTIAL_RESPONSE_SIZE,
    REGISTRATION_UPLOAD_SIZE,
    LoginFinish,
    LoginResponse,
    LoginStart,
    decode_header,
    encode_frame,
)

from .common import ACCOUNT, BENCH_CONFIG, PASSWORD, Pair, drain_server

USER_ID = bytes(range(16))
RECORD = os.urandom(REGISTRATION_UPLOAD_SIZE)
#: The server's virtual time: the measurement lets none pass, so no session expires.
NOW = 0.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class _StandInServerLogin(RealOpaque):
    """The real suite, except that the server's login steps skip OPAQUE (stand-in logins)."""

    __slots__ = ()

    def server_login_start(
        self, setup: ServerSetup, registration_record: bytes, request: bytes, account_name: bytes
    ) -> ServerLoginStep:
        del setup, registration_record, request, account_name
        return ServerLoginStep(os.urandom(CREDENTIAL_RESPONSE_SIZE), os.urandom(32))

    def server_login_finish(self, state: bytes, finalization: bytes) -> bytes:
        del finalization
        return hashlib.sha512(state).digest()


class _AcceptAll:
    """Accepts every login for one account (no per-event state kept)."""

    def __init__(self, user_id: bytes, record: bytes) -> None:
        self.user_id = user_id
        self.record = record

    def __call__(self, conn: ServerConnection, event: Event) -> None:
        if isinstance(event, LoginRequested):
            conn.accept_login(event.session_id, self.user_id, self.record)


def _standin_login() -> tuple[bytes, Callable[[bytes], bytes]]:
    start = LoginStart(ACCOUNT, os.urandom(CREDENTIAL_REQUEST_SIZE)).encode()
    finish = LoginFinish(os.urandom(CREDENTIAL_FINALIZATION_SIZE)).encode()
    return start, lambda response: finish


def _real_login() -> tuple[bytes, Callable[[bytes], bytes]]:
    """A real OPAQUE client, held only in this closure (gone once the login is done)."""
    step = ok.client_login_start(PASSWORD)

    def finish(payload: bytes) -> bytes:
        _, _, _, length = decode_header_loose(payload)
        response = LoginResponse.decode(payload[HEADER_SIZE : HEADER_SIZE + length])
        result = ok.client_login_finish(PASSWORD, step.get_state(), response.credential_response)
        return LoginFinish(result.get_message()).encode()

    return LoginStart(ACCOUNT, step.get_message()).encode(), finish


def decode_header_loose(data: bytes) -> tuple[FrameType, int, int, int]:
    frame_type, session_id, length = decode_header(data[:HEADER_SIZE], 2**20)
    return frame_type, session_id, HEADER_SIZE, length


def build_sessions(
    server: ServerConnection,
    app: Callable[[ServerConnection, Event], None],
    n: int,
    client: Callable[[], tuple[bytes, Callable[[bytes], bytes]]] = _standin_login,
) -> None:
    """Log in ``n`` sessions through the real server core with hand-encoded client frames."""
    first = server._highest_session_id + 1
    for sid in range(first, first + n):
        start, finish = client()
        server.receive_data(encode_frame(FrameType.LOGIN_START, sid, start), NOW)
        drain_server(server, app)
        response = server.data_to_send()
        server.receive_data(encode_frame(FrameType.LOGIN_FINISH, sid, finish(response)), NOW)
        drain_server(server, app)
        server.data_to_send()


def _real_account(setup: ServerSetup) -> tuple[bytes, bytes]:
    from keymgmt.adapters.testing.memory import MemoryServerApp

    app = MemoryServerApp()
    Pair(ClientConnection(os.urandom), ServerConnection(setup, os.urandom, now=NOW), app, now=NOW).register()
    account = app.accounts[ACCOUNT]
    return account.user_id, account.registration_record


def measure(n: int, mode: str, meter: str) -> dict[str, float]:
    """Bytes per session for ``mode`` (sessions | real | channels), by ``meter`` (rss | tracemalloc)."""
    setup = ServerSetup.generate()
    client = _standin_login
    opaque: OpaqueSuite = RealOpaque()
    if mode == "real":
        user_id, record = _real_account(setup)
        client = _real_login
    else:
        user_id, record = USER_ID, RECORD
        opaque = _StandInServerLogin()
    registry = SessionRegistry(BENCH_CONFIG)
    server = ServerConnection(setup, os.urandom, registry=registry, now=NOW, opaque=opaque)
    app = _AcceptAll(user_id, record)
    keep: list[Channel] = []

    def build(count: int) -> None:
        if mode == "channels":
            keep.extend(Channel(os.urandom(64), is_client=False) for _ in range(count))
        else:
            build_sessions(server, app, count, client)

    build(min(16, n))  # warm every code path and cache before the baseline
    if meter == "tracemalloc":
        tracemalloc.start()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0] if meter == "tracemalloc" else _rss_bytes()
    build(n)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if meter == "tracemalloc" else _rss_bytes()
    result = {"bytes_per_session": (after - before) / n, "sessions": n}
    if mode != "channels":
        result["live_sessions"] = len(registry)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--mode", choices=("sessions", "real", "channels"), default="sessions")
    parser.add_argument("--meter", choices=("rss", "tracemalloc"), default="rss")
    args = parser.parse_args()
    json.dump(measure(args.sessions, args.mode, args.meter), sys.stdout)


if __name__ == "__main__":
    main()
