"""Client conformance: a scripted key server on loopback TLS 1.3 that a client under test
connects to, and the scenarios it plays (valid, adversarial and truncated answers).

The scripted server is keymgmt's own key server (the core's ``ServerConnection`` and the
``KeyServer`` application on a scratch SQLite file, with a development CA made for the
run), with one change per scenario to what it sends: a record sealed at the wrong sequence
number, a bit flipped, an answer for a request never made, a frame header no client may
accept, a connection cut halfway through a frame, and so on. It knows each session's keys
(it records the OPAQUE session key as its own login step computes it), so it can seal a
forged record exactly as a server that got something wrong would.

The client is any program: a command line with placeholders for where the server is and
who to log in as (see :func:`run_client_conformance`). What is checked is what a program
shows from outside: its exit status, that it ends within a timeout (it does not hang), and,
on the wire, that it does not go on using a session after a record that must not open.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import socket
import ssl
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from keymgmt_proto import (
    HEADER_SIZE,
    NEED_DATA,
    Channel,
    ClientConnection,
    ClientLoginResult,
    ClientStep,
    CreateKeyIdRequest,
    ErrorCode,
    Event,
    FrameType,
    KeyIdResponse,
    Op,
    OpaqueSuite,
    RealOpaque,
    RegistrationSucceeded,
    RemoteProtocolError,
    RequestReceived,
    RetrieveRequest,
    SecretResponse,
    ServerConfig,
    ServerConnection,
    ServerLoginStep,
    ServerSetup,
    SessionRegistry,
    Status,
    StorageKeyResponse,
    decode_request,
    decode_response,
    encode_response,
)
from keymgmt_proto.strategies import seal_at
from keymgmt_proto.wire import Abort, GoAway, Record, Response, encode_frame

from ..server.app import KeyServer, ThrottlePolicy
from ..storage.sqlite import SQLiteStorage
from ..testing.memory import InMemoryPair
from ..tls import generate_dev_pki, server_context
from .link import describe_frame, split_frames

__all__ = [
    "DEFAULT_SCENARIOS",
    "ClientReport",
    "ClientScenarioResult",
    "Kit",
    "Scenario",
    "ScriptedServer",
    "default_scenarios",
    "run_client_conformance",
]

#: What a scenario expects of the client: to succeed (exit 0), to refuse (exit non-zero),
#: or only to end within the timeout, whichever way.
Expectation = Literal["success", "refusal", "ends"]


class _Recorder:
    """An OPAQUE suite that keeps the session key each server login step computes."""

    def __init__(self, inner: OpaqueSuite) -> None:
        self.inner = inner
        self.keys: list[bytes] = []

    def client_registration_start(self, password: bytes) -> ClientStep:
        return self.inner.client_registration_start(password)

    def client_registration_finish(
        self, password: bytes, state: bytes, registration_response: bytes
    ) -> ClientStep:
        return self.inner.client_registration_finish(password, state, registration_response)

    def client_login_start(self, password: bytes) -> ClientStep:
        return self.inner.client_login_start(password)

    def client_login_finish(
        self, password: bytes, state: bytes, credential_response: bytes
    ) -> ClientLoginResult:
        return self.inner.client_login_finish(password, state, credential_response)

    def server_registration_start(self, setup: ServerSetup, request: bytes, account_name: bytes) -> bytes:
        return self.inner.server_registration_start(setup, request, account_name)

    def server_registration_finish(self, upload: bytes) -> bytes:
        return self.inner.server_registration_finish(upload)

    def server_login_start(
        self, setup: ServerSetup, registration_record: bytes, request: bytes, account_name: bytes
    ) -> ServerLoginStep:
        return self.inner.server_login_start(setup, registration_record, request, account_name)

    def server_login_finish(self, state: bytes, finalization: bytes) -> bytes:
        key = self.inner.server_login_finish(state, finalization)
        self.keys.append(key)
        return key


@dataclass
class Kit:
    """What a scenario's tamper function may use on one connection."""

    server: ScriptedServer
    connection: _Served
    #: Set by a tamper function: close the connection after sending this batch.
    close_after: bool = False

    def once(self, tag: str) -> bool:
        """True the first time ``tag`` is asked for in this scenario (across connections)."""
        if tag in self.server.fired:
            return False
        self.server.fired.add(tag)
        return True

    def fired(self, tag: str) -> None:
        """Record that the scenario's change happened (a scenario whose change never happens
        was not exercised by the client's command)."""
        self.server.fired.add(tag)

    def opened(self, frame: bytes) -> tuple[bytes, int, bytes] | None:
        """``(session key, seq, plaintext)`` of a sealed server frame of epoch 0, if one of
        this server's session keys opens it."""
        frame_type = FrameType(frame[1])
        record = Record.decode(frame[HEADER_SIZE:])
        for key in reversed(self.server.recorder.keys):
            try:
                channel = Channel(key, is_client=True)
                channel.recv_seq = record.seq
                return key, record.seq, channel.open(frame_type, record)
            except RemoteProtocolError:
                continue
        return None

    def reseal(
        self, frame: bytes, plaintext: bytes | None = None, seq: int | None = None, from_client: bool = False
    ) -> bytes:
        """``frame`` sealed again (same session, type and key), with another plaintext
        and/or sequence number; unchanged if no session key opens it."""
        found = self.opened(frame)
        if found is None:
            return frame
        key, old_seq, old_plaintext = found
        frame_type = FrameType(frame[1])
        record = seal_at(
            key,
            frame_type,
            old_plaintext if plaintext is None else plaintext,
            old_seq if seq is None else seq,
            from_client=from_client,
        )
        return frame[:2] + frame[2:6] + struct.pack(">I", len(record.encode())) + record.encode()


Tamper = Callable[[list[bytes], Kit], list[bytes]]
Answer = Callable[[bytes, bytes, Kit], bytes]


@dataclass(frozen=True)
class Scenario:
    """One way the scripted server answers. ``tamper`` rewrites each batch of frames it
    sends; ``answer`` rewrites the body of each RESPONSE (given the request's body);
    ``tag`` names the change (recorded once it happens)."""

    name: str
    description: str
    expect: Expectation
    tamper: Tamper | None = None
    answer: Answer | None = None
    #: The change ends sessions: after it the client must not send a sealed CLOSE or REQUEST
    #: on the session it hit (it must have refused the record).
    ends_session: bool = False


def _type(frame: bytes) -> FrameType | None:
    try:
        return FrameType(frame[1]) if len(frame) >= HEADER_SIZE else None
    except ValueError:
        return None


def _sid(frame: bytes) -> int:
    return int(struct.unpack_from(">I", frame, 2)[0])


def _each(frame_type: FrameType, change: Callable[[bytes, Kit], bytes], tag: str) -> Tamper:
    def tamper(frames: list[bytes], kit: Kit) -> list[bytes]:
        out = []
        for frame in frames:
            if _type(frame) is frame_type:
                changed = change(frame, kit)
                if changed != frame:
                    kit.fired(tag)
                    kit.connection.hit.add(_sid(frame))
                frame = changed
            out.append(frame)
        return out

    return tamper


def _flip(frame: bytes, kit: Kit) -> bytes:
    data = bytearray(frame)
    data[-1] ^= 0x01  # a bit of the tag: the plaintext would still read as valid
    return bytes(data)


def _replace_first(
    frame_type: FrameType, make: Callable[[bytes], bytes], tag: str, close: bool = False
) -> Tamper:
    def tamper(frames: list[bytes], kit: Kit) -> list[bytes]:
        out = []
        for frame in frames:
            if _type(frame) is frame_type and not kit.close_after:
                kit.fired(tag)
                kit.connection.hit.add(_sid(frame))
                out.append(make(frame))
                if close:
                    kit.close_after = True
                    break
                continue
            out.append(frame)
        return out

    return tamper


def _header(
    frame: bytes,
    *,
    version: int = 1,
    type_byte: int | None = None,
    sid: int | None = None,
    length: int | None = None,
) -> bytes:
    t = frame[1] if type_byte is None else type_byte
    s = _sid(frame) if sid is None else sid
    n = len(frame) - HEADER_SIZE if length is None else length
    return struct.pack(">BBII", version, t, s, n) + (frame[HEADER_SIZE:] if length is None else b"")


def _reseal_seq(delta: int | None, absolute: int | None = None) -> Callable[[bytes, Kit], bytes]:
    def change(frame: bytes, kit: Kit) -> bytes:
        record = Record.decode(frame[HEADER_SIZE:])
        seq = absolute if absolute is not None else record.seq + (delta or 0)
        return kit.reseal(frame, seq=seq)

    return change


def _response_body(change: Callable[[int, bytes], tuple[int, bytes]]) -> Callable[[bytes, Kit], bytes]:
    def rewrite(frame: bytes, kit: Kit) -> bytes:
        found = kit.opened(frame)
        if found is None:
            return frame
        request_id, body = Response.decode_fields(found[2])
        new_id, new_body = change(request_id, body)
        return kit.reseal(frame, plaintext=Response.encode_fields(new_id, new_body))

    return rewrite


def _storage_key_flipped(request: bytes, body: bytes, kit: Kit) -> bytes:
    if request[:1] != bytes([Op.RETRIEVE_STORAGE_KEY]) or body[:1] != b"\x00":
        return body
    kit.fired("storage key tampered")
    _status, response = decode_response(Op.RETRIEVE_STORAGE_KEY, body)
    assert isinstance(response, StorageKeyResponse)
    esk = bytearray(response.encrypted_storage_key)
    esk[20] ^= 0x01
    return encode_response(Status.OK, StorageKeyResponse(bytes(esk)))


def _key_id_not_derived(request: bytes, body: bytes, kit: Kit) -> bytes:
    if request[:1] != bytes([Op.CREATE_KEY_ID]) or body[:1] != b"\x00":
        return body
    decoded = decode_request(request)
    assert isinstance(decoded, CreateKeyIdRequest)
    kit.fired("key id not derived")
    _status, response = decode_response(Op.CREATE_KEY_ID, body)
    assert isinstance(response, KeyIdResponse)
    return encode_response(Status.OK, KeyIdResponse(os.urandom(16), response.server_nonce))


def _secret_flipped(request: bytes, body: bytes, kit: Kit) -> bytes:
    if request[:1] != bytes([Op.RETRIEVE]) or body[:1] != b"\x00":
        return body
    decoded = decode_request(request)
    assert isinstance(decoded, RetrieveRequest)
    kit.fired("secret tampered")
    _status, response = decode_response(Op.RETRIEVE, body)
    assert isinstance(response, SecretResponse)
    sealed = bytearray(response.ciphertext)
    sealed[-1] ^= 0x01
    return encode_response(Status.OK, SecretResponse(response.kind, bytes(sealed), response.associated_data))


def _error_answer(request: bytes, body: bytes, kit: Kit) -> bytes:
    kit.fired("every request refused")
    return encode_response(Status.INTERNAL_ERROR)


def _cut_after_first_request(frames: list[bytes], kit: Kit) -> list[bytes]:
    if any(_type(f) is FrameType.RESPONSE for f in frames) and kit.once("cut after a request"):
        kit.close_after = True
        return []
    return frames


def _goaway_after_first_request(frames: list[bytes], kit: Kit) -> list[bytes]:
    if any(_type(f) is FrameType.RESPONSE for f in frames) and kit.once("goaway after a request"):
        kit.close_after = True
        return [encode_frame(FrameType.GOAWAY, 0, GoAway(ErrorCode.OK, "server shutting down").encode())]
    return frames


def _close_at_once(frames: list[bytes], kit: Kit) -> list[bytes]:
    kit.fired("closed")
    kit.close_after = True
    return []


def default_scenarios() -> list[Scenario]:
    """The scenarios :func:`run_client_conformance` plays by default, valid ones first."""
    flip = _each
    return [
        Scenario("honest", "a conforming server answers everything", "success"),
        Scenario(
            "cut-and-resume",
            "the connection is cut after the first request arrives: the client resumes on a new "
            "connection (protocol.md 8.3) and gets its answer",
            "success",
            tamper=_cut_after_first_request,
        ),
        Scenario(
            "goaway-and-resume",
            "GOAWAY(OK) instead of the first answer: the client resumes elsewhere (protocol.md 7.2)",
            "success",
            tamper=_goaway_after_first_request,
        ),
        Scenario(
            "forged-login-response",
            "LOGIN_RESPONSE replaced by 320 random bytes: the client's OPAQUE step must fail (CRY-1)",
            "refusal",
            tamper=_each(FrameType.LOGIN_RESPONSE, lambda f, k: f[:HEADER_SIZE] + os.urandom(320), "forged"),
        ),
        Scenario(
            "welcome-bit-flip",
            "WELCOME with one bit of its tag flipped: the record must not open (NET-7)",
            "refusal",
            tamper=flip(FrameType.WELCOME, _flip, "welcome flipped"),
            ends_session=True,
        ),
        Scenario(
            "response-bit-flip",
            "every RESPONSE with one bit of its tag flipped (NET-7)",
            "refusal",
            tamper=flip(FrameType.RESPONSE, _flip, "response flipped"),
            ends_session=True,
        ),
        Scenario(
            "response-replayed-seq",
            "every RESPONSE sealed at sequence number 0, which WELCOME used (a replay, protocol.md 5.3)",
            "refusal",
            tamper=_each(FrameType.RESPONSE, _reseal_seq(None, 0), "replayed seq"),
            ends_session=True,
        ),
        Scenario(
            "response-seq-gap",
            "every RESPONSE sealed one sequence number ahead (a gap, protocol.md 5.3)",
            "refusal",
            tamper=_each(FrameType.RESPONSE, _reseal_seq(1), "seq gap"),
            ends_session=True,
        ),
        Scenario(
            "response-wrong-direction",
            "every RESPONSE sealed with the client-to-server keys (protocol.md 5.2)",
            "refusal",
            tamper=_each(FrameType.RESPONSE, lambda f, k: k.reseal(f, from_client=True), "wrong direction"),
            ends_session=True,
        ),
        Scenario(
            "response-unknown-request",
            "every RESPONSE answers a request id never sent (protocol.md 9: INVALID_REQUEST)",
            "refusal",
            tamper=_each(
                FrameType.RESPONSE, _response_body(lambda rid, body: (rid + 1000, body)), "unknown request"
            ),
            ends_session=True,
        ),
        Scenario(
            "response-trailing-byte",
            "every RESPONSE body with a byte too many: it does not decode for its op (protocol.md 12.2)",
            "refusal",
            tamper=_each(
                FrameType.RESPONSE, _response_body(lambda rid, body: (rid, body + b"\x00")), "trailing byte"
            ),
        ),
        Scenario(
            "storage-key-tampered",
            "the encrypted storage key with one bit flipped: it must not open (OPS-1)",
            "refusal",
            answer=_storage_key_flipped,
        ),
        Scenario(
            "key-id-not-derived",
            "CREATE_KEY_ID answers a key id that is not KEY-1 of the two nonces (protocol.md 12.5)",
            "refusal",
            answer=_key_id_not_derived,
        ),
        Scenario(
            "secret-tampered",
            "RETRIEVE answers a sealed secret with one bit flipped (OPS-4)",
            "refusal",
            answer=_secret_flipped,
        ),
        Scenario(
            "oversized-length",
            "WELCOME's header claims 4 GiB: the client must fail the connection, not wait (protocol.md 3.1)",
            "refusal",
            tamper=_each(FrameType.WELCOME, lambda f, k: _header(f, length=0xFFFFFFFF), "oversized"),
        ),
        Scenario(
            "bad-version",
            "LOGIN_RESPONSE with protocol version 2 (protocol.md 3.1)",
            "refusal",
            tamper=_each(FrameType.LOGIN_RESPONSE, lambda f, k: _header(f, version=2), "bad version"),
        ),
        Scenario(
            "unknown-frame-type",
            "LOGIN_RESPONSE with frame type 0x7f (protocol.md 3.1)",
            "refusal",
            tamper=_each(FrameType.LOGIN_RESPONSE, lambda f, k: _header(f, type_byte=0x7F), "unknown type"),
        ),
        Scenario(
            "unopened-session",
            "LOGIN_RESPONSE on a session id the client never opened (protocol.md 7.2)",
            "refusal",
            tamper=_each(FrameType.LOGIN_RESPONSE, lambda f, k: _header(f, sid=0x7FFF0000), "unopened id"),
        ),
        Scenario(
            "truncated-and-closed",
            "half of LOGIN_RESPONSE, then the connection closes",
            "refusal",
            tamper=_replace_first(
                FrameType.LOGIN_RESPONSE, lambda f: f[: len(f) // 2], "truncated", close=True
            ),
        ),
        Scenario(
            "abort-login",
            "ABORT(AUTHENTICATION_FAILED) instead of LOGIN_RESPONSE",
            "refusal",
            tamper=_each(
                FrameType.LOGIN_RESPONSE,
                lambda f, k: encode_frame(
                    FrameType.ABORT, _sid(f), Abort(ErrorCode.AUTHENTICATION_FAILED, "no").encode()
                ),
                "aborted",
            ),
        ),
        Scenario(
            "goaway-at-login",
            "GOAWAY(INTERNAL_ERROR) instead of LOGIN_RESPONSE",
            "refusal",
            tamper=_each(
                FrameType.LOGIN_RESPONSE,
                lambda f, k: encode_frame(FrameType.GOAWAY, 0, GoAway(ErrorCode.INTERNAL_ERROR, "").encode()),
                "goaway",
            ),
        ),
        Scenario(
            "closed-at-once",
            "every connection is closed right after the TLS handshake",
            "refusal",
            tamper=_close_at_once,
        ),
        Scenario(
            "every-request-fails",
            "every request is answered INTERNAL_ERROR",
            "refusal",
            answer=_error_answer,
        ),
    ]


#: The names of :func:`default_scenarios`, in order.
DEFAULT_SCENARIOS: tuple[str, ...] = tuple(s.name for s in default_scenarios())


class _Served:
    """One client connection of the scripted server."""

    def __init__(self, tls: ssl.SSLSocket, conn: ServerConnection) -> None:
        self.tls = tls
        self.conn = conn
        self.inbox = bytearray()
        #: Session ids a scenario's change hit.
        self.hit: set[int] = set()
        #: (session id, type) of sealed frames the client sent after its session was hit.
        self.after_hit: list[tuple[int, FrameType]] = []
        self.closed = False


class _ScriptedConnection(ServerConnection):
    """A server connection whose RESPONSE bodies the scenario may rewrite."""

    server: ScriptedServer
    requests: dict[tuple[int, int], bytes]
    served: _Served | None = None

    def send_response(self, session_id: int, request_id: int, body: bytes) -> bool:
        request = self.requests.pop((session_id, request_id), b"")
        answer = self.server.scenario.answer
        if answer is not None and self.served is not None:
            body = answer(request, body, Kit(self.server, self.served))
        return super().send_response(session_id, request_id, body)


class ScriptedServer:
    """A key server on 127.0.0.1 that plays one :class:`Scenario` at a time (see the module
    docstring). Serve with :meth:`serve_until` while the client runs."""

    def __init__(self, directory: Path, account: bytes, password: bytes) -> None:
        self.directory = directory
        self.pki = generate_dev_pki(directory / "pki")
        self.context = server_context(self.pki.server_cert, self.pki.server_key)
        self.setup = ServerSetup.generate()
        self.storage = SQLiteStorage(directory / "keyserver.db")
        # No throttle: scenarios make logins fail on purpose, and the next must still reach the server.
        self.keyserver = KeyServer(self.storage, throttle=ThrottlePolicy(threshold=2**31))
        self.registry = SessionRegistry(ServerConfig())
        self.recorder = _Recorder(RealOpaque())
        self.scenario = Scenario("honest", "", "success")
        self.fired: set[str] = set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.account = account
        self.password = password
        self._register()

    def _register(self) -> None:
        now = time.time()
        server = ServerConnection(self.setup, os.urandom, registry=self.registry, now=now)
        pair = InMemoryPair(ClientConnection(os.urandom), server, self.keyserver, now=now)
        pair.client.open_registration(self.account, self.password)
        events = pair.pump()
        assert any(isinstance(e, RegistrationSucceeded) for e in events), events

    def close(self) -> None:
        self.listener.close()
        self.storage.close()

    def serve_until(self, done: Callable[[], bool], log: list[str]) -> list[_Served]:
        """Serve every connection until ``done()``; returns the connections served."""
        selector = selectors.DefaultSelector()
        self.listener.setblocking(False)
        selector.register(self.listener, selectors.EVENT_READ, None)
        served: list[_Served] = []
        try:
            while not done():
                for key, _ in selector.select(timeout=0.05):
                    if key.data is None:
                        connection = self._accept(log)
                        if connection is not None:
                            served.append(connection)
                            selector.register(connection.tls, selectors.EVENT_READ, connection)
                        continue
                    connection = key.data
                    self._read(connection, log)
                    if connection.closed:
                        selector.unregister(connection.tls)
                now = time.time()
                for connection in served:
                    if not connection.closed:
                        connection.conn.handle_timer(now)
                        self._process(connection, log)
        finally:
            for connection in served:
                if not connection.closed:
                    self._close(connection)
            selector.close()
        return served

    def _accept(self, log: list[str]) -> _Served | None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return None
        sock.settimeout(5.0)
        try:
            tls = self.context.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.append(f"  TLS handshake failed: {exc}")
            sock.close()
            return None
        tls.setblocking(False)
        conn = _ScriptedConnection(
            self.setup, os.urandom, registry=self.registry, now=time.time(), opaque=self.recorder
        )
        conn.server = self
        conn.requests = {}
        connection = _Served(tls, conn)
        conn.served = connection
        log.append("  client connected (TLS 1.3)")
        self._process(connection, log)
        return connection

    def _read(self, connection: _Served, log: list[str]) -> None:
        while True:
            try:
                data = connection.tls.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            except (OSError, ssl.SSLError):
                data = b""
            self._observe(connection, data, log)
            connection.conn.receive_data(data, time.time())
            self._process(connection, log)
            if not data:
                log.append("  client closed the connection")
                self._close(connection)
                return

    def _observe(self, connection: _Served, data: bytes, log: list[str]) -> None:
        connection.inbox += data
        while len(connection.inbox) >= HEADER_SIZE:
            (length,) = struct.unpack_from(">I", connection.inbox, 6)
            if len(connection.inbox) < HEADER_SIZE + length:
                return
            frame = bytes(connection.inbox[: HEADER_SIZE + length])
            del connection.inbox[: HEADER_SIZE + length]
            log.append(f"  <- {describe_frame(frame)}")
            frame_type = _type(frame)
            sid = _sid(frame)
            if frame_type is not None and frame_type.sealed and sid in connection.hit:
                connection.after_hit.append((sid, frame_type))

    def _process(self, connection: _Served, log: list[str]) -> None:
        if connection.closed:
            return
        conn = connection.conn
        assert isinstance(conn, _ScriptedConnection)
        while (event := conn.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            if isinstance(event, RequestReceived):
                conn.requests[(event.session_id, event.request_id)] = event.body
            self.keyserver(conn, event)
        output = conn.data_to_send()
        if not output:
            return
        frames = split_frames(output)
        kit = Kit(self, connection)
        if self.scenario.tamper is not None:
            frames = self.scenario.tamper(frames, kit)
        for frame in frames:
            log.append(f"  -> {describe_frame(frame)}")
        try:
            connection.tls.setblocking(True)
            connection.tls.sendall(b"".join(frames))
            connection.tls.setblocking(False)
        except OSError:
            self._close(connection)
            return
        if kit.close_after:
            log.append("  (the server closes the connection)")
            self._close(connection)

    def _close(self, connection: _Served) -> None:
        if connection.closed:
            return
        connection.closed = True
        if connection.conn.failed is None:
            connection.conn.connection_lost()
            while connection.conn.next_event() is not NEED_DATA:
                pass
        with contextlib.suppress(OSError):
            connection.tls.close()


@dataclass
class ClientScenarioResult:
    """How the client behaved in one scenario."""

    scenario: str
    description: str
    expect: Expectation
    #: "pass", "fail" or "not exercised" (the scenario's change never happened).
    verdict: str
    exit_code: int | None
    seconds: float
    reason: str = ""
    output: str = field(default="", repr=False)
    log: list[str] = field(default_factory=list, repr=False)


@dataclass
class ClientReport:
    """Every scenario's result."""

    results: list[ClientScenarioResult]

    @property
    def passed(self) -> bool:
        """No scenario failed (scenarios not exercised do not count)."""
        return all(r.verdict != "fail" for r in self.results)


def run_client_conformance(
    command: str,
    *,
    scenarios: list[str] | None = None,
    timeout: float = 20.0,
    workdir: Path | None = None,
    on_result: Callable[[ClientScenarioResult], None] | None = None,
) -> ClientReport:
    """Run the client ``command`` once per scenario against a scripted server.

    ``command`` is split like a shell command line (no shell runs it) and these
    placeholders are filled in each argument: ``{host}``, ``{port}``, ``{address}``
    (``HOST:PORT``), ``{ca}`` (the CA file that signs the server's certificate),
    ``{account}`` (a registered account's name), ``{password_file}`` (a file whose first
    line is its password; passwords never go on a command line) and ``{workdir}`` (a scratch
    folder, also the command's working directory). The command should log in and make at
    least one request; it passes a scenario by exiting 0 where the server was honest, and
    with any other status where it was not, within ``timeout`` seconds either way."""
    chosen = [s for s in default_scenarios() if scenarios is None or s.name in scenarios]
    unknown = set(scenarios or ()) - {s.name for s in default_scenarios()}
    if unknown:
        raise ValueError(f"unknown scenarios: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="keymgmt-client-conformance-") as scratch:
        base = Path(workdir) if workdir is not None else Path(scratch)
        account = b"conformance@example.org"
        password = os.urandom(12).hex().encode()
        password_file = base / "password"
        password_file.write_bytes(password + b"\n")
        password_file.chmod(0o600)
        server = ScriptedServer(base / "server", account, password)
        results = []
        try:
            for scenario in chosen:
                result = _play(server, scenario, command, timeout, base, password_file)
                results.append(result)
                if on_result is not None:
                    on_result(result)
        finally:
            server.close()
    return ClientReport(results)


def _play(
    server: ScriptedServer, scenario: Scenario, command: str, timeout: float, base: Path, password_file: Path
) -> ClientScenarioResult:
    server.scenario = scenario
    server.fired = set()
    work = base / scenario.name
    work.mkdir(parents=True, exist_ok=True)
    values = {
        "host": "127.0.0.1",
        "port": str(server.port),
        "address": f"127.0.0.1:{server.port}",
        "ca": str(server.pki.ca_cert),
        "account": server.account.decode(),
        "password_file": str(password_file),
        "workdir": str(work),
    }
    argv = [part.format(**values) for part in shlex.split(command)]
    log: list[str] = [f"scenario {scenario.name}: {scenario.description}"]
    started = time.monotonic()
    output_file = work / "output.txt"
    with output_file.open("wb") as output:
        try:
            proc = subprocess.Popen(  # noqa: S603 - the command under test, as the user gave it
                argv, cwd=work, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            return ClientScenarioResult(
                scenario.name,
                scenario.description,
                scenario.expect,
                "fail",
                None,
                0.0,
                reason=f"cannot run the command: {exc}",
                log=log,
            )
        served = server.serve_until(
            lambda: proc.poll() is not None or time.monotonic() - started > timeout, log
        )
        code = proc.poll()
        if code is None:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - started
    text = output_file.read_text(errors="replace")
    result = ClientScenarioResult(
        scenario.name, scenario.description, scenario.expect, "pass", code, seconds, output=text, log=log
    )
    after = [item for connection in served for item in connection.after_hit]
    changed = (scenario.tamper is None and scenario.answer is None) or bool(server.fired)
    if code is None:
        result.verdict, result.reason = "fail", f"did not end within {timeout:g} s (a hang)"
    elif not changed:
        result.verdict, result.reason = (
            "not exercised",
            "the command never reached the point this scenario changes",
        )
    elif scenario.expect == "success" and code != 0:
        result.verdict, result.reason = "fail", f"exit status {code} where the server was honest"
    elif scenario.expect == "refusal" and code == 0:
        result.verdict, result.reason = "fail", "exit status 0: the client accepted what it must refuse"
    elif scenario.ends_session and any(t is FrameType.CLOSE for _, t in after):
        result.verdict, result.reason = (
            "fail",
            ("the client went on with the session (a sealed CLOSE) after a record that must not open"),
        )
    return result
