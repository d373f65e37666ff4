"""Micro-benchmarks under pyperf: P1 (channel), P2 (login), per-operation server CPU.

Run by ``python -m bench`` as ``python -m bench.micro --group GROUP -o FILE
[pyperf options]``. pyperf spawns worker processes (each builds its own
fixture lazily, outside the timed region), calibrates or takes a fixed loop
count, discards warm-ups and stores every value, so each number is a median
over several processes. Every benchmark here uses ``bench_time_func``: the
function returns only the time spent inside the measured region, so a real
client's work (its Argon2 for logins) is excluded.

Clocks: P1 uses ``time.perf_counter`` (pure CPU work in one thread, wall =
CPU, better resolution); P2 and the per-operation lines use
``time.process_time`` around the server-side calls only, so they count the
server's CPU and not the time SQLite waits for ``fsync``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import opaque_ke_py as ok
import pyperf
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.testing.memory import MemoryServerApp
from keymgmt_proto import (
    NEED_DATA,
    Context,
    CreateKeyIdRequest,
    Empty,
    Event,
    KeyIdResponse,
    OpaqueStepRequired,
    RequestReceived,
    ResponseReceived,
    RetrieveRequest,
    SecretKind,
    SecretResponse,
    ServerConnection,
    ServerSetup,
    SessionEstablished,
    Status,
    StoreSecretRequest,
    decode_response,
    encode_response,
    open_secret,
    seal_secret,
    secret_ad,
)

from .common import ACCOUNT, PASSWORD, Pair, new_pair, sqlite_keyserver

GROUPS = ("channel", "login", "ops")
REQUEST_SIZE = 1024
#: Names of the benchmarks (the orchestrator reads them back from pyperf's JSON).
P1_CORE = "p1_core_channel_1KiB"
P1_RAW = "p1_raw_chacha20poly1305_1KiB"
P2_CORE = "p2_server_login_cpu"
P2_RAW = "p2_raw_opaque_server_calls_cpu"
P2_CORE_WARM = "p2_server_login_cpu_client_steps_first"
P7_CLIENT = "p7_client_opaque_login_cpu"
OP_RETRIEVE = "op_retrieve_server_cpu"
OP_RETRIEVE_CHANNEL = "op_retrieve_channel_only_cpu"
OP_STORE = "op_store_server_cpu"
OP_STORE_CHANNEL = "op_store_channel_only_cpu"
P8_RETRIEVE_60K = "p8_retrieve_60KiB_round_trip_cpu"
P8_RETRIEVE_32 = "p8_retrieve_32B_round_trip_cpu"
#: P8: the large secret's size (the issue's "60 KiB retrieve") and the small one's.
BIG_SECRET_SIZE = 60 * 1024
SMALL_SECRET_SIZE = 32
#: P2's second reading: logins in groups of this many (under the throttle's 5 in flight).
P2_GROUP = 4

_cache: dict[str, Any] = {}


def _once(name: str, build: Callable[[], Any]) -> Any:
    if name not in _cache:
        _cache[name] = build()
    return _cache[name]


def _established_pair(app: Callable[[ServerConnection, Event], None]) -> tuple[Pair, SessionEstablished]:
    pair = new_pair(ServerSetup.generate(), app)
    pair.register()
    return pair, pair.login()


def _answer_empty(conn: ServerConnection, event: Event) -> None:
    if isinstance(event, RequestReceived):
        conn.send_response(event.session_id, event.request_id, b"")


# ------------------------------------------------------------------ P1: channel


def time_p1_core(loops: int) -> float:
    """Client send_request -> bytes -> server receive_data + next_event, for a 1 KiB body.

    The answer (an empty response) goes back outside the timed region so the
    session stays within its in-flight limit."""
    pair, established = _once("p1", lambda: _established_pair(MemoryServerApp()))
    client, server = pair.client, pair.server
    sid = established.session_id
    body = os.urandom(REQUEST_SIZE)
    clock = time.perf_counter
    total = 0.0
    for _ in range(loops):
        t0 = clock()
        client.send_request(sid, body)
        server.receive_data(client.data_to_send(), pair.now)
        event = server.next_event()
        total += clock() - t0
        assert isinstance(event, RequestReceived)
        _answer_empty(server, event)
        pair.to_client()
    return total


def time_p1_raw(loops: int) -> float:
    """ChaCha20-Poly1305 seal + open of the same 1 KiB with an AD of the channel's size."""
    aead = ChaCha20Poly1305(ChaCha20Poly1305.generate_key())
    nonce, ad, body = os.urandom(12), os.urandom(26), os.urandom(REQUEST_SIZE)
    clock = time.perf_counter
    total = 0.0
    for _ in range(loops):
        t0 = clock()
        aead.decrypt(nonce, aead.encrypt(nonce, body, ad), ad)
        total += clock() - t0
    return total


# ------------------------------------------------------------------ P2: login


def _registered_pair(name: str) -> Pair:
    """A client/server pair over a fresh SQLite key server, with ACCOUNT registered (once)."""
    pair: Pair = _once(name, lambda: new_pair(ServerSetup.generate(), sqlite_keyserver()))
    if f"{name}_registered" not in _cache:
        pair.register()
        _cache[f"{name}_registered"] = True
    return pair


def _server_step(pair: Pair, up: bytes) -> tuple[bytes, float]:
    """The server takes ``up`` (one frame, one batch): what it sends back, and its CPU seconds."""
    server = pair.server
    t0 = time.process_time()
    server.receive_data(up, pair.now)
    _drain(server, pair.app)
    down = server.data_to_send()
    return down, time.process_time() - t0


def time_p2_core(loops: int) -> float:
    """Server CPU of whole logins: framing, OPAQUE, the SQLite account lookup and the audit write.

    A real ClientConnection does the client's half (Argon2) outside the timed
    region; the session is closed (untimed) so the connection stays under its limits."""
    pair = _registered_pair("p2")
    client, server = pair.client, pair.server
    total = 0.0
    for _ in range(loops):
        sid = client.open_request_session(ACCOUNT, PASSWORD)
        down, seconds = _server_step(pair, client.data_to_send())
        total += seconds
        client.receive_data(down)
        _drain_client(client)  # client_login_finish: Argon2, not timed
        down, seconds = _server_step(pair, client.data_to_send())
        total += seconds
        client.receive_data(down)
        assert any(isinstance(e, SessionEstablished) for e in _drain_client(client))
        client.close_session(sid)
        pair.to_server()  # the logout and its audit entry: not part of a login
        server.data_to_send()
    return total


def time_p2_core_client_steps_first(loops: int) -> float:
    """The same server calls as :func:`time_p2_core`, with the client's Argon2 moved off the
    server's path: logins run in groups of :data:`P2_GROUP`, every LOGIN_START of a group is
    answered first (one frame and one batch each), then the client finishes all of them,
    then the server takes each LOGIN_FINISH (one frame and one batch each). Only a group's
    first LOGIN_FINISH comes straight after an Argon2.

    Why: an Argon2 sweeps megabytes of memory through this core's caches, and the server's
    half that follows pays to bring its code and data back (in :func:`time_p2_core` the
    LOGIN_FINISH half costs about 3x what it does a moment later). A server never runs the
    client's Argon2; this reading shows the server's own cost next to the one above."""
    pair = _registered_pair("p2first")
    client, server = pair.client, pair.server
    total = 0.0
    groups = -(-loops // P2_GROUP)
    for _ in range(groups):
        sids = []
        downs = []
        for _ in range(P2_GROUP):
            sids.append(client.open_request_session(ACCOUNT, PASSWORD))
            down, seconds = _server_step(pair, client.data_to_send())
            total += seconds
            downs.append(down)
        finishes = []
        for down in downs:  # the client's Argon2s, not timed
            client.receive_data(down)
            while (event := client.next_event()) is not NEED_DATA:
                assert isinstance(event, OpaqueStepRequired)
                client.complete_opaque_step(event.run(client.opaque))
                finishes.append(client.data_to_send())
        assert len(finishes) == P2_GROUP
        for up in finishes:
            down, seconds = _server_step(pair, up)
            total += seconds
            client.receive_data(down)
            assert any(isinstance(e, SessionEstablished) for e in _drain_client(client))
        for sid in sids:
            client.close_session(sid)
        pair.to_server()  # the logouts and their audit entries: not part of a login
        server.data_to_send()
    return total * loops / (groups * P2_GROUP)


def _raw_record() -> tuple[ok.ServerSetupData, bytes]:
    setup = ok.server_setup()
    start = ok.client_registration_start(PASSWORD)
    response = ok.server_registration_start(setup, start.get_message(), ACCOUNT).get_message()
    upload = ok.client_registration_finish(PASSWORD, start.get_state(), response).get_message()
    return setup, ok.server_registration_finish(upload).get_password_file()


def time_p2_raw(loops: int) -> float:
    """opaque-ke-py's server_login_start + server_login_finish alone (the client's calls untimed)."""
    setup, record = _once("p2raw", _raw_record)
    clock = time.process_time
    total = 0.0
    for _ in range(loops):
        start = ok.client_login_start(PASSWORD)
        t0 = clock()
        step = ok.server_login_start(setup, record, start.get_message(), ACCOUNT)
        total += clock() - t0
        finish = ok.client_login_finish(PASSWORD, start.get_state(), step.get_message())
        t0 = clock()
        ok.server_login_finish(step.get_state(), finish.get_message())
        total += clock() - t0
    return total


def time_p7_client(loops: int) -> float:
    """The client's OPAQUE calls per login (client_login_start + client_login_finish)."""
    setup, record = _once("p2raw", _raw_record)
    clock = time.process_time
    total = 0.0
    for _ in range(loops):
        t0 = clock()
        start = ok.client_login_start(PASSWORD)
        total += clock() - t0
        step = ok.server_login_start(setup, record, start.get_message(), ACCOUNT)
        t0 = clock()
        ok.client_login_finish(PASSWORD, start.get_state(), step.get_message())
        total += clock() - t0
    return total


# ------------------------------------------------------------------ per operation


class _Swappable:
    """The server application: the real KeyServer, or a channel-only stand-in that
    answers every request with a fixed body of the real answer's size."""

    def __init__(self, keyserver: KeyServer) -> None:
        self.keyserver = keyserver
        self.fixed: bytes | None = None
        self.batch = keyserver.batch  # each request is a batch of its own, as the driver runs it

    def __call__(self, conn: ServerConnection, event: Event) -> None:
        if self.fixed is not None and isinstance(event, RequestReceived):
            conn.send_response(event.session_id, event.request_id, self.fixed)
        else:
            self.keyserver(conn, event)


class _OpsWorld:
    def __init__(self) -> None:
        self.app = _Swappable(sqlite_keyserver())
        self.pair, established = _established_pair(self.app)
        self.sid = established.session_id
        self.user_id = established.user_id
        self.storage_key = os.urandom(32)
        self.key_id = self.store(self.new_key_id())
        self.retrieve_body = RetrieveRequest(self.user_id, self.key_id, Context.LOCAL_ONLY).encode()
        self.retrieve_answer = self.call(self.retrieve_body)

    def call(self, body: bytes) -> bytes:
        self.pair.client.send_request(self.sid, body)
        self.pair.to_server()
        (response,) = [e for e in self.pair.to_client() if isinstance(e, ResponseReceived)]
        return response.body

    def new_key_id(self) -> bytes:
        body = self.call(CreateKeyIdRequest(self.user_id, SecretKind.GENERATED, bytes(32)).encode())
        status, reply = decode_response(CreateKeyIdRequest.OP, body)
        assert status is Status.OK and isinstance(reply, KeyIdResponse)
        return reply.key_id

    def store_body(self, key_id: bytes) -> bytes:
        ad = secret_ad(self.user_id, key_id, SecretKind.GENERATED)
        ciphertext = seal_secret(self.storage_key, os.urandom(32), ad, os.urandom)
        return StoreSecretRequest(self.user_id, key_id, SecretKind.GENERATED, ciphertext).encode()

    def store(self, key_id: bytes) -> bytes:
        status, _ = decode_response(StoreSecretRequest.OP, self.call(self.store_body(key_id)))
        assert status is Status.OK
        return key_id

    def store_imported(self, secret: bytes) -> bytes:
        """Store ``secret`` as an imported key (untimed set-up); returns its key id."""
        body = self.call(CreateKeyIdRequest(self.user_id, SecretKind.IMPORTED, os.urandom(32)).encode())
        status, reply = decode_response(CreateKeyIdRequest.OP, body)
        assert status is Status.OK and isinstance(reply, KeyIdResponse)
        ad = secret_ad(self.user_id, reply.key_id, SecretKind.IMPORTED)
        sealed = seal_secret(self.storage_key, secret, ad, os.urandom)
        request = StoreSecretRequest(self.user_id, reply.key_id, SecretKind.IMPORTED, sealed)
        status, _ = decode_response(StoreSecretRequest.OP, self.call(request.encode()))
        assert status is Status.OK
        return reply.key_id

    def timed_round_trip(self, key_id: bytes, size: int) -> float:
        """P8: CPU of one whole retrieve, both sides in this process: the client builds and
        seals the request, the server opens it, reads SQLite, audits, seals the answer; the
        client opens the record and the secret (what ``SecretOps.retrieve`` does)."""
        client, server = self.pair.client, self.pair.server
        body = RetrieveRequest(self.user_id, key_id, Context.LOCAL_ONLY).encode()
        t0 = time.process_time()
        client.send_request(self.sid, body)
        server.receive_data(client.data_to_send(), self.pair.now)
        _drain(server, self.app)
        client.receive_data(server.data_to_send())
        (response,) = [e for e in _drain_client(client) if isinstance(e, ResponseReceived)]
        status, answer = decode_response(RetrieveRequest.OP, response.body)
        assert status is Status.OK and isinstance(answer, SecretResponse)
        secret = open_secret(self.storage_key, answer.ciphertext, answer.associated_data)
        elapsed = time.process_time() - t0
        assert len(secret) == size
        return elapsed

    def timed(self, body: bytes) -> float:
        """Server CPU for one request frame: parse, open, answer, seal, frame."""
        client, server = self.pair.client, self.pair.server
        client.send_request(self.sid, body)
        up = client.data_to_send()
        t0 = time.process_time()
        server.receive_data(up, self.pair.now)
        _drain(server, self.app)
        down = server.data_to_send()
        elapsed = time.process_time() - t0
        client.receive_data(down)
        (response,) = [e for e in _drain_client(client) if isinstance(e, ResponseReceived)]
        assert response.body[0] == Status.OK, response.body[:1]
        return elapsed


def _ops() -> _OpsWorld:
    world: _OpsWorld = _once("ops", _OpsWorld)
    return world


def time_retrieve(loops: int) -> float:
    world = _ops()
    world.app.fixed = None
    return sum(world.timed(world.retrieve_body) for _ in range(loops))


def time_retrieve_channel(loops: int) -> float:
    world = _ops()
    world.app.fixed = world.retrieve_answer
    return sum(world.timed(world.retrieve_body) for _ in range(loops))


def time_store(loops: int) -> float:
    world = _ops()
    world.app.fixed = None
    total = 0.0
    for _ in range(loops):
        body = world.store_body(world.new_key_id())  # CREATE_KEY_ID first: untimed
        total += world.timed(body)
    return total


def _sized(size: int) -> tuple[_OpsWorld, bytes]:
    world = _ops()
    key_id: bytes = _once(f"sized-{size}", lambda: world.store_imported(os.urandom(size)))
    return world, key_id


def time_retrieve_big(loops: int) -> float:
    world, key_id = _sized(BIG_SECRET_SIZE)
    world.app.fixed = None
    return sum(world.timed_round_trip(key_id, BIG_SECRET_SIZE) for _ in range(loops))


def time_retrieve_small(loops: int) -> float:
    world, key_id = _sized(SMALL_SECRET_SIZE)
    world.app.fixed = None
    return sum(world.timed_round_trip(key_id, SMALL_SECRET_SIZE) for _ in range(loops))


def time_store_channel(loops: int) -> float:
    world = _ops()
    world.app.fixed = encode_response(Status.OK, Empty())
    body = world.store_body(os.urandom(16))
    return sum(world.timed(body) for _ in range(loops))


# ------------------------------------------------------------------ plumbing


def _drain(server: ServerConnection, app: Callable[[ServerConnection, Event], None]) -> None:
    from .common import drain_server

    drain_server(server, app)


def _drain_client(client: Any) -> list[Event]:
    from .common import drain_client

    events: list[Event] = drain_client(client)
    return events


BENCHMARKS: dict[str, list[tuple[str, Callable[[int], float]]]] = {
    "channel": [(P1_CORE, time_p1_core), (P1_RAW, time_p1_raw)],
    "login": [
        (P2_CORE, time_p2_core),
        (P2_CORE_WARM, time_p2_core_client_steps_first),
        (P2_RAW, time_p2_raw),
        (P7_CLIENT, time_p7_client),
    ],
    "ops": [
        (OP_RETRIEVE, time_retrieve),
        (OP_RETRIEVE_CHANNEL, time_retrieve_channel),
        (OP_STORE, time_store),
        (OP_STORE_CHANNEL, time_store_channel),
        (P8_RETRIEVE_60K, time_retrieve_big),
        (P8_RETRIEVE_32, time_retrieve_small),
    ],
}


def _add_cmdline_args(cmd: list[str], args: argparse.Namespace) -> None:
    cmd.extend(("--group", args.group))


def main() -> None:
    runner = pyperf.Runner(program_args=("-m", "bench.micro"), add_cmdline_args=_add_cmdline_args)
    runner.argparser.add_argument("--group", choices=GROUPS, required=True)
    args = runner.parse_args()
    for name, func in BENCHMARKS[args.group]:
        runner.bench_time_func(name, func)


if __name__ == "__main__":
    main()
