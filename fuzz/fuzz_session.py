"""Fuzz an established request session with mutated and spliced channel frames.

How an established state is had for every input, honestly:

OPAQUE cannot be replayed (opaque-ke draws its own randomness, so a recorded
LOGIN_FINISH never verifies against a fresh server), and logging in for real
per input costs an Argon2 run. So the harness logs in for real *once*, at
start, over an InMemoryPair (registration, login, one request answered), and
keeps the resulting ServerConnection and ClientConnection as snapshots. Each
input works on a deep copy of one of them (``_common.clone``). The copy is
exact: every Python-level field is copied (session tables, the registry,
sequence numbers, reply cache, buffers); the only objects shared are the
native ChaCha20Poly1305 key objects inside each Channel, which hold no mutable
state, and the read-only OPAQUE ServerSetup. No private state is forged: the
session was established by the real handshake. At start the harness checks
that a copy accepts a genuine frame, so a broken snapshot fails loudly.

Also captured at start, never delivered to the snapshots: the client's genuine
next frames (three REQUESTs, a logout CLOSE, and, from a copy that lost its
connection, a RESUME on session 3 with the three requests re-sent) and the
server's genuine answers to them (RESPONSEs, a server CLOSE, a GOAWAY, a
RESUMED and the re-sent RESPONSEs).

Input: byte 0 picks the side (even: the server receives client frames; odd:
the client receives server frames), then a script of operations on the copy
(at most ``MAX_OPS``); each starts with an op byte (``op % 8``):

====  ==========================================================
0     GENUINE i          deliver genuine frame i
1     FLIP i pos x       genuine frame i with byte ``pos`` XOR ``x``
2     RETARGET i sid     genuine frame i under session id ``sid`` (u32)
3     SPLICE i j cut     frame i's first ``cut`` bytes, then frame j's rest
4     SEAL t d s n ...   seal ``n`` plaintext bytes as sealed type ``t``
                         with the peer's real channel keys, at the sequence
                         number the receiver expects (``d`` < 0x80) or off
                         by ``(d & 7) - 3``, on session 2 (``s`` < 0x80) or
                         ``s - 0x7f``; a RESUME is wrapped in its envelope
5     RAW n ...          ``n`` (u16) arbitrary bytes
6     TICK/ACT b         server: advance the clock ``b`` seconds and fire
                         deadlines (b < 0xf0), else close the session,
                         close() or connection_lost(); client: send a
                         request, log out, abort, or resume detached sessions
7     EOF                end of stream (the script stops)
====  ==========================================================

SEAL is what makes the channel's *content* reachable: random bytes never pass
the AEAD, sealed plaintexts always do. The rule, after every operation: no
exception (a LocalProtocolError from a local command in TICK/ACT is the API
refusing a command and is allowed), output well-formed and bounded, buffers
and per-session tables within their limits.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

from keymgmt_proto import (
    Channel,
    ClientConnection,
    ErrorCode,
    FrameType,
    LocalProtocolError,
    RegistrationSucceeded,
    RequestReceived,
    ResponseReceived,
    ServerConfig,
    ServerConnection,
    ServerSetup,
    SessionEstablished,
    SessionRegistry,
)
from keymgmt_proto.wire import ResumedEnvelope, ResumeEnvelope, encode_frame

from ._adapters import InMemoryPair, MemoryServerApp
from ._common import Reader, check_bounded, check_output, clone, det_random, drain, main

ACCOUNT = b"alice@example.org"
PASSWORD = b"correct horse battery staple"
SESSION_ID = 2  # the login session (the registration was session 1)
RESUMED_ID = 3
MAX_OPS = 64
CONFIG = ServerConfig(
    idle_timeout=60.0,
    session_lifetime=600.0,
    max_payload=4096,
    max_requests_in_flight=4,
    max_requests_per_session=8,
)
SEALED_TYPES = [t for t in FrameType if t.sealed]


class Op:
    GENUINE, FLIP, RETARGET, SPLICE, SEAL, RAW, TICK, EOF = range(8)


@dataclass(frozen=True)
class World:
    app: MemoryServerApp
    server: ServerConnection
    client: ClientConnection
    to_server: tuple[bytes, ...]
    to_client: tuple[bytes, ...]
    client_channel: Channel
    server_channel: Channel


def split_frames(data: bytes) -> list[bytes]:
    frames = []
    while data:
        (length,) = struct.unpack(">I", data[6:10])
        frames.append(data[: 10 + length])
        data = data[10 + length :]
    return frames


def request_bodies(user_id: bytes) -> list[bytes]:
    from keymgmt_proto import ListKeysRequest, RetrieveStorageKeyRequest

    return [
        RetrieveStorageKeyRequest(user_id).encode(),
        ListKeysRequest(user_id).encode(),
        b"\xff not a request",
    ]


def _server_channel(server: ServerConnection) -> Channel:
    (session,) = server.registry._sessions.values()
    assert session.channel is not None
    return session.channel


def _client_channel(client: ClientConnection) -> Channel:
    channel = client._sessions[SESSION_ID].channel
    assert channel is not None
    return channel


@functools.cache
def world() -> World:
    setup = ServerSetup.generate()
    app = MemoryServerApp(random=det_random)
    server = ServerConnection(setup, det_random, config=CONFIG, registry=SessionRegistry(CONFIG), now=0.0)
    client = ClientConnection(det_random, max_payload=CONFIG.max_payload, max_requests_in_flight=4)
    pair = InMemoryPair(client, server, app, now=0.0)
    client.open_registration(ACCOUNT, PASSWORD)
    if not any(isinstance(e, RegistrationSucceeded) for e in pair.pump()):
        raise RuntimeError("fuzz setup: registration failed")
    if client.open_request_session(ACCOUNT, PASSWORD) != SESSION_ID:
        raise RuntimeError("fuzz setup: unexpected session id")
    established = [e for e in pair.pump() if isinstance(e, SessionEstablished)]
    if not established:
        raise RuntimeError("fuzz setup: login failed")
    bodies = request_bodies(established[0].user_id)
    client.send_request(SESSION_ID, bodies[0])
    if not any(isinstance(e, ResponseReceived) for e in pair.pump()):
        raise RuntimeError("fuzz setup: request failed")

    # The snapshots: session 2 established on both sides, request 1 answered.
    server_snap = clone(server, server)
    for body in bodies:
        client.send_request(SESSION_ID, body)
    to_server = split_frames(client.data_to_send())  # requests 2..4, unanswered
    client_snap = clone(client, client)

    logout = clone(client_snap, client_snap)
    logout.close_session(SESSION_ID)
    to_server += split_frames(logout.data_to_send())
    lost = clone(client_snap, client_snap)
    lost.connection_lost()
    (detached,) = lost.take_detached_sessions()
    resumer = ClientConnection(det_random, max_payload=CONFIG.max_payload, max_requests_in_flight=4)
    resumer._last_session_id = SESSION_ID  # the same connection's next id: the server accepts that too
    if resumer.resume_session(detached) != RESUMED_ID:
        raise RuntimeError("fuzz setup: unexpected resumed session id")
    to_server += split_frames(resumer.data_to_send())

    answering = clone(server_snap, server_snap)
    answering.receive_data(b"".join(to_server[:3]), 0.0)
    if sum(isinstance(e, RequestReceived) for e in drain(answering, app, 16)) != 3:
        raise RuntimeError("fuzz setup: a copy of the server did not accept genuine requests")
    to_client = split_frames(answering.data_to_send())
    closing = clone(server_snap, server_snap)
    closing.close_session(SESSION_ID, ErrorCode.IDLE_TIMEOUT)
    to_client += split_frames(closing.data_to_send())
    going = clone(server_snap, server_snap)
    going.close()
    to_client += split_frames(going.data_to_send())
    resuming = clone(server_snap, server_snap)
    resuming.receive_data(b"".join(to_server[4:]), 0.0)
    drain(resuming, app, 16)
    to_client += split_frames(resuming.data_to_send())

    check = clone(client_snap, client_snap)
    check.receive_data(to_client[0])
    if not any(isinstance(e, ResponseReceived) for e in drain(check, None, 16)):
        raise RuntimeError("fuzz setup: a copy of the client did not accept a genuine response")
    return World(
        app,
        server_snap,
        client_snap,
        tuple(to_server),
        tuple(to_client),
        clone(_client_channel(client_snap), client_snap),
        clone(_server_channel(server_snap), server_snap),
    )


def _expected_seq(target: ServerConnection | ClientConnection, handle: bytes) -> int | None:
    if isinstance(target, ServerConnection):
        session = target.registry.lookup(handle)
        return session.channel.recv_seq if session is not None and session.channel is not None else None
    for client_session in (*target._sessions.values(), *target._detached):
        channel = client_session.channel
        if channel is not None and channel.session_handle == handle:
            return channel.recv_seq
    return None


def _act(target: ServerConnection | ClientConnection, choice: int, now: float) -> float:
    """TICK/ACT: time passes, or the local side does something. Returns the new time."""
    try:
        if isinstance(target, ServerConnection):
            if choice < 0xF0:
                now += choice
                target.handle_timer(now)
                target.registry.handle_timer(now)
            elif choice % 4 == 0:
                target.close_session(SESSION_ID, ErrorCode.IDLE_TIMEOUT)
            elif choice % 4 == 1:
                target.close_session(RESUMED_ID, ErrorCode.REQUEST_LIMIT)
            elif choice % 4 == 2:
                target.close()
            else:
                target.connection_lost()
        elif choice % 4 == 0:
            target.send_request(SESSION_ID, b"\x01" + bytes(16))
        elif choice % 4 == 1:
            target.close_session(SESSION_ID)
        elif choice % 4 == 2:
            target.abort_session(SESSION_ID)
        else:
            for detached in target.take_detached_sessions():
                target.resume_session(detached)
    except LocalProtocolError:
        pass  # the API refusing a command the state does not allow
    return now


def _receive(target: ServerConnection | ClientConnection, data: bytes, now: float) -> None:
    """Bytes (b"" = end of stream) reach the target at ``now`` (only the server keeps time)."""
    if isinstance(target, ServerConnection):
        target.receive_data(data, now)
    else:
        target.receive_data(data)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    w = world()
    reader = Reader(data)
    to_server = reader.u8() % 2 == 0
    target: ServerConnection | ClientConnection
    if to_server:
        target = clone(w.server, w.server)
        frames, sealer = w.to_server, clone(w.client_channel, extra=[w.client_channel])
    else:
        target = clone(w.client, w.client)
        frames, sealer = w.to_client, clone(w.server_channel, extra=[w.server_channel])
    app = w.app if to_server else None
    now = 0.0

    for _ in range(MAX_OPS):
        if not reader.remaining:
            break
        op = reader.u8() % 8
        delivered = b""
        if op == Op.GENUINE:
            delivered = frames[reader.u8() % len(frames)]
        elif op == Op.FLIP:
            flipped = bytearray(frames[reader.u8() % len(frames)])
            pos, xor = reader.u16() % len(flipped), reader.u8() or 1
            flipped[pos] ^= xor
            delivered = bytes(flipped)
        elif op == Op.RETARGET:
            frame = frames[reader.u8() % len(frames)]
            delivered = frame[:2] + struct.pack(">I", reader.u32()) + frame[6:]
        elif op == Op.SPLICE:
            first, second = frames[reader.u8() % len(frames)], frames[reader.u8() % len(frames)]
            cut = reader.u16() % (max(len(first), len(second)) + 1)
            delivered = first[:cut] + second[cut:]
        elif op == Op.SEAL:
            frame_type = SEALED_TYPES[reader.u8() % len(SEALED_TYPES)]
            drift, selector = reader.u8(), reader.u8()
            plaintext = reader.take(reader.u16())
            expected = _expected_seq(target, sealer.session_handle)
            seq = sealer.send_seq if expected is None else expected
            if drift >= 0x80:
                seq += (drift & 7) - 3
            sealer.send_seq = max(seq, 0)
            if frame_type is FrameType.RESUME:  # sealed under the resume key, its own counter
                sealer.resume_seq = max(sealer.resume_seq + (drift & 7) - 3, 0)
                record = sealer.seal_resume(plaintext)
                payload = ResumeEnvelope(sealer.session_handle, record).encode()
            else:
                record = sealer.seal(frame_type, plaintext)
                payload = record.encode()
                if frame_type is FrameType.RESUMED:
                    payload = ResumedEnvelope(plaintext[:32].ljust(32, b"\0"), record).encode()
            session_id = SESSION_ID if selector < 0x80 else selector - 0x7F
            delivered = encode_frame(frame_type, session_id, payload)
        elif op == Op.RAW:
            delivered = reader.take(reader.u16())
        elif op == Op.TICK:
            now = _act(target, reader.u8(), now)
        else:
            _receive(target, b"", now)
        if delivered:
            _receive(target, delivered, now)
        drain(target, app, 3 * (len(delivered) // 10 + 1) + 16)
        check_bounded(target)
        check_output(target.data_to_send(), budget=32 * len(delivered) + 4096)
        if op == Op.EOF:
            break


if __name__ == "__main__":
    main(test_one_input)
