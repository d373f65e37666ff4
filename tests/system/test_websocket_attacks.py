"""Attacks on the key server's WebSocket listener beyond those of test_websocket.py (a
security review of issue 17), over real TLS 1.3 on loopback: frames sent right behind the
upgrade request, broken framing and refused compression, Origin tricks, a handshake held
across the start of a shutdown, a connection that never pauses its input to escape the
idle timeout (these two on both listeners), a peer that takes no control frame. Each
asserts the defended outcome."""

from __future__ import annotations

import os
import struct
import time

import anyio
import pytest
from anyio.abc import ByteStream
from anyio.streams.tls import TLSStream
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection

from keymgmt.adapters.client import KeymgmtClient, tls_connector
from keymgmt.adapters.client.async_client import RateLimitedError
from keymgmt.adapters.server.runtime import KeyServerRuntime
from keymgmt.adapters.tls import client_context
from keymgmt.adapters.websocket import CloseCode, WebSocketStream, client_handshake
from keymgmt_proto import (
    NEED_DATA,
    ClientConnection,
    ConnectionFailed,
    ErrorCode,
    Event,
    FrameType,
    LoginRequested,
    OpaqueStepRequired,
    ServerConfig,
    SessionEstablished,
)

from ..support.net_world import make_settings, tls_from
from ..support.ws_client import ORIGIN, open_websocket, read_response_head, tls_to, upgrade_request
from .test_websocket import PW, logins_ok, registered, still_serves, wss, wss_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client_frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, length: int | None = None
) -> bytes:
    """One masked client frame written by hand (so a test can get any bit of it wrong)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 65536:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_head_and_rest(stream: ByteStream) -> tuple[int, bytes]:
    """The status of an HTTP response and whatever came right behind its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive()
    head, rest = data.split(b"\r\n\r\n", 1)
    return int(head[9:12]), rest


async def login(stream: ByteStream, conn: ClientConnection | None = None) -> Event | None:
    """Log alice in with the bare core over ``stream`` (or go on with ``conn``'s login):
    SessionEstablished, the event that ended it (a GOAWAY is ConnectionFailed), or None
    if the connection ended first."""
    if conn is None:
        conn = ClientConnection(os.urandom)
        conn.open_request_session(b"alice", PW)
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            try:
                if out := conn.data_to_send():
                    await stream.send(out)
                conn.receive_data(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return None
            continue
        if isinstance(event, OpaqueStepRequired):
            conn.complete_opaque_step(event.run(conn.opaque))
            continue
        return event


async def test_frames_sent_right_behind_the_upgrade_request_are_served_at_once(tmp_path):
    """A client that sends its first frames in the same write as the upgrade request (no
    wait for the 101): the server kept them behind the request's head, and answers them
    at once instead of waiting for more bytes (which never come: the client waits for the
    answer) until the idle timeout ends the connection."""
    config = ServerConfig(connection_idle_timeout=5.0)
    async with wss_server(tmp_path, protocol=config) as (runtime, pki):
        await registered(runtime, pki)
        assert runtime.websocket_port is not None
        stream = await tls_to(runtime.websocket_port, pki.ca_cert)
        conn = ClientConnection(os.urandom)
        conn.open_request_session(b"alice", PW)
        assert conn.next_event() is NEED_DATA
        ws = Connection(ConnectionType.CLIENT)
        first = ws.send(BytesMessage(data=conn.data_to_send()))
        await stream.send(upgrade_request() + first + client_frame(0x9, b"behind"))
        with anyio.fail_after(3):  # well inside connection_idle_timeout
            status, rest = await read_head_and_rest(stream)
            assert status == 101
            client = WebSocketStream(stream, Connection(ConnectionType.CLIENT, trailing_data=rest))
            event = await login(client, conn)
        assert isinstance(event, SessionEstablished), event
        assert logins_ok(runtime) == 1
        await client.aclose()
        await still_serves(runtime, pki)


async def first_close(stream: ByteStream, what: str) -> CloseConnection:
    """The first close frame the server sends on ``stream`` (within 5 s), as wsproto reads it."""
    ws = Connection(ConnectionType.CLIENT)
    with anyio.fail_after(5):
        while True:
            try:
                ws.receive_data(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                raise AssertionError(f"{what}: no close frame") from None
            closes = [e for e in ws.events() if isinstance(e, CloseConnection)]
            if closes:
                return closes[0]


async def test_broken_framing_and_compressed_frames_close_with_1002(tmp_path):
    """Each a connection of its own; the server answers close code 1002 and goes on."""
    cases = {
        "a ping over 125 bytes": client_frame(0x9, b"x" * 126),
        "a fragmented ping": client_frame(0x9, b"x", fin=False),
        "a reserved opcode": client_frame(0x3, b"x"),
        "a continuation without a start": client_frame(0x0, b"x"),
        "a 64-bit length with its top bit set": client_frame(0x2, length=1 << 63),
        "an unmasked frame": b"\x82\x01x",
        # permessage-deflate was offered but not selected: a frame with RSV1 set is broken
        "a compressed frame (RSV1)": client_frame(0x2, b"\xf2\x48\xcd\xc9\xc9\x07\x00", rsv=0x40),
    }
    async with wss_server(tmp_path) as (runtime, pki):
        await registered(runtime, pki)
        assert runtime.websocket_port is not None
        for what, raw in cases.items():
            stream = await tls_to(runtime.websocket_port, pki.ca_cert)
            offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            await stream.send(upgrade_request(extra=offer))
            status, rest = await read_head_and_rest(stream)
            assert status == 101 and rest == b"", what
            await stream.send(raw)
            closes = [await first_close(stream, what)]
            assert closes[0].code == CloseCode.PROTOCOL_ERROR, (what, closes[0])
            await anyio.aclose_forcefully(stream)
        with anyio.fail_after(5):  # (counted when the server's side of the last one has ended)
            while runtime.metrics.websocket_closed.labels("protocol_error")._value.get() < len(cases):
                await anyio.sleep(0.01)
        await still_serves(runtime, pki)


async def test_text_frames_that_are_not_utf8_close_as_any_text_message_does(tmp_path):
    """A text message is refused with 1003 whatever it holds: bytes that are not UTF-8 (which
    wsproto reports as a broken frame) are a text message too, not broken framing (1002)."""
    cases = {
        "a text frame that is not UTF-8": client_frame(0x1, b"\xff\xfe"),
        "a fragmented text message cut in a code point": client_frame(0x1, b"\xc3", fin=False)
        + client_frame(0x0, b"x"),
    }
    async with wss_server(tmp_path) as (runtime, pki):
        await registered(runtime, pki)
        assert runtime.websocket_port is not None
        for what, raw in cases.items():
            stream = await tls_to(runtime.websocket_port, pki.ca_cert)
            await stream.send(upgrade_request())
            status, rest = await read_head_and_rest(stream)
            assert status == 101 and rest == b"", what
            await stream.send(raw)
            closes = [await first_close(stream, what)]
            assert closes[0].code == CloseCode.UNSUPPORTED_DATA, (what, closes[0])
            await anyio.aclose_forcefully(stream)
        with anyio.fail_after(5):
            while runtime.metrics.websocket_closed.labels("unsupported_data")._value.get() < len(cases):
                await anyio.sleep(0.01)
        await still_serves(runtime, pki)


async def test_no_extension_is_ever_selected(tmp_path):
    async with wss_server(tmp_path) as (runtime, pki):
        assert runtime.websocket_port is not None
        stream = await tls_to(runtime.websocket_port, pki.ca_cert)
        offers = (
            "Sec-WebSocket-Extensions: permessage-deflate\r\n"
            "Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n"
        )
        await stream.send(upgrade_request(extra=offers))
        status, head = await read_response_head(stream)
        assert status == 101
        assert b"sec-websocket-extensions" not in head.lower()
        await stream.aclose()


async def test_origin_tricks(tmp_path):
    """The allowed origin is https://app.example.org. Only what a browser of that page sends
    (also upper case, or with the default port) gets in; anything else is 403."""
    refused = [
        upgrade_request(origin="https://app.example.org."),  # a trailing dot: another name to TLS
        upgrade_request(origin="https://app.example.org:8443"),
        upgrade_request(origin="http://app.example.org"),
        upgrade_request(origin="https://app.example.org/"),
        upgrade_request(origin="https://evil@app.example.org"),
        upgrade_request(origin="https://app.example.org, https://evil.example"),
        upgrade_request(origin="https://app.example.org\r\n https://evil.example"),  # obs-fold
        upgrade_request(origin="https://evil.example", extra=f"Origin: {ORIGIN}\r\n"),  # two
        upgrade_request(extra="Origin: https://evil.example\r\n"),  # two, the allowed one first
        upgrade_request(origin="https://app.example.org\x00"),
    ]
    accepted = [
        upgrade_request(origin="HTTPS://APP.EXAMPLE.ORG"),
        upgrade_request(origin="https://app.example.org:443"),
    ]
    async with wss_server(tmp_path) as (runtime, pki):
        assert runtime.websocket_port is not None
        for request, expected in [(r, 403) for r in refused] + [(r, 101) for r in accepted]:
            stream = await tls_to(runtime.websocket_port, pki.ca_cert)
            await stream.send(request)
            status, head = await read_response_head(stream)
            assert status in ((400, 403) if b"\x00" in request else (expected,)), (request, head)
            await anyio.aclose_forcefully(stream)
        assert runtime.connections_served == len(accepted)


class _HeldSend(ByteStream):
    """A byte stream whose send number ``hold`` waits for ``gate``: the TLS client's second
    flight (its Finished) or the upgrade request's last line, sent when the test says."""

    def __init__(self, inner: ByteStream, hold: int, gate: anyio.Event, keep: int = 0) -> None:
        self.inner, self.hold, self.gate, self.keep, self.sends = inner, hold, gate, keep, 0

    async def send(self, item: bytes) -> None:
        self.sends += 1
        if self.sends == self.hold:
            await self.inner.send(item[: self.keep])
            await self.gate.wait()
            item = item[self.keep :]
        await self.inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self):  # type: ignore[no-untyped-def]
        return self.inner.extra_attributes


@pytest.mark.parametrize("finishes", [True, False], ids=["finishes", "never-finishes"])
@pytest.mark.parametrize("listener", ["tcp", "wss"])
async def test_a_handshake_held_across_the_start_of_shutdown_does_not_hold_the_server(
    tmp_path, listener, finishes
):
    """A client holds its TLS handshake (TCP) or its upgrade request (wss) unfinished and
    the server begins to shut down. Then the client either finishes it and logs in, to hold
    a session open, or never finishes it (both timeouts here are 30 s). Either way the
    server stops within shutdown_grace: a late connection gets GOAWAY (or is closed), not
    service, and an unfinished one is cut when the grace period ends."""
    settings, pki = make_settings(
        tmp_path,
        websocket_listen=("127.0.0.1", 0),
        websocket_origins=frozenset({ORIGIN}),
        websocket_upgrade_timeout=30.0,
        tls_handshake_timeout=30.0,
        shutdown_grace=1.0,
    )
    runtime = KeyServerRuntime(settings)
    stopped = anyio.Event()

    async def run(*, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await runtime.run(task_status=task_status)
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:
        await tg.start(run)
        assert runtime.port is not None and runtime.websocket_port is not None
        async with KeymgmtClient(tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)) as client:
            await client.register(b"alice", PW)
        gate = anyio.Event()
        port = runtime.port if listener == "tcp" else runtime.websocket_port
        tcp = await anyio.connect_tcp("127.0.0.1", port)
        context = client_context(pki.ca_cert)

        async def finish() -> ByteStream:
            if listener == "tcp":  # send 1: ClientHello; send 2: the client's Finished
                return await TLSStream.wrap(
                    _HeldSend(tcp, 2, gate),
                    hostname="localhost",
                    ssl_context=context,
                    standard_compatible=False,
                )
            stream = await TLSStream.wrap(
                tcp, hostname="localhost", ssl_context=context, standard_compatible=False
            )
            request = upgrade_request()
            held = _HeldSend(stream, 1, gate, keep=len(request) - 2)
            await held.send(request)
            status, rest = await read_head_and_rest(stream)
            assert status == 101
            return WebSocketStream(stream, Connection(ConnectionType.CLIENT, trailing_data=rest))

        outcome: list[Event | None] = []

        async def attacker() -> None:
            stream = await finish()
            outcome.append(await login(stream))
            if isinstance(outcome[0], SessionEstablished):
                await anyio.sleep(60)  # holds its session (and so the server) open
            await anyio.aclose_forcefully(stream)

        tg.start_soon(attacker)
        with anyio.fail_after(5):
            while runtime._open_connections < 1:
                await anyio.sleep(0.01)
        await anyio.sleep(0.2)  # the held part is not sent: the server waits in the handshake
        logins = logins_ok(runtime)
        started = time.monotonic()
        runtime.shutdown()
        await anyio.sleep(0.3)  # the shutdown has begun (accepting stopped, drivers told)
        if finishes:
            gate.set()
        with anyio.fail_after(settings.shutdown_grace + 4):
            await stopped.wait()
        assert time.monotonic() - started < settings.shutdown_grace + 2
        assert not (outcome and isinstance(outcome[0], SessionEstablished)), outcome
        assert logins_ok(runtime) == logins
        if outcome and outcome[0] is not None:  # it got as far as the keymgmt protocol: a GOAWAY
            assert isinstance(outcome[0], ConnectionFailed), outcome
        tg.cancel_scope.cancel()


class _NeverReads(ByteStream):
    """A peer that sends ``data`` once and then takes nothing: every send blocks."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self.data:
            data, self.data = self.data, b""
            return data
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(self, item: bytes) -> None:
        await anyio.sleep_forever()

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


async def test_a_peer_that_takes_no_pong_or_close_frame_is_given_up_after_control_timeout():
    """Slow read: the peer pings but never reads. The pong may not block the reader for
    longer than control_timeout (a violation ends the stream), and closing does not wait
    for the peer either."""
    transport = _NeverReads(client_frame(0x9, b"are you reading?"))
    ws = WebSocketStream(transport, Connection(ConnectionType.SERVER), control_timeout=0.2)
    started = time.monotonic()
    with anyio.fail_after(3):
        with pytest.raises(anyio.BrokenResourceError):
            await ws.receive()
        assert ws.violation is not None and "took no control frame" in ws.violation
        await ws.aclose()
    assert time.monotonic() - started < 1.5
    assert transport.closed and ws.pings == 1


class _Gone(ByteStream):
    """A transport whose peer has gone: receive and send raise EndOfStream, as anyio's TLS
    stream may when the peer closed while the server was still sending."""

    def __init__(self) -> None:
        self.closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        raise anyio.EndOfStream

    async def send(self, item: bytes) -> None:
        raise anyio.EndOfStream

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


async def test_closing_a_websocket_whose_peer_has_gone_is_not_a_fault():
    """The close frame cannot go out: aclose still closes the transport and raises nothing (a
    flooding peer that the server cut used to leave a 'connection handler failed' traceback,
    counted as a fault, when the close frame met EndOfStream)."""
    transport = _Gone()
    ws = WebSocketStream(transport, Connection(ConnectionType.SERVER), control_timeout=0.2)
    with anyio.fail_after(3):
        await ws.aclose()
    assert transport.closed


@pytest.mark.parametrize("listener", ["tcp", "wss"])
async def test_a_connection_that_never_stops_sending_is_still_closed_when_idle(tmp_path, listener):
    """A connection that opens no session but sends without a pause (ABORT frames for a
    session it never opened, which the server ignores; over the WebSocket one byte a
    message) must still be closed after connection_idle_timeout: input that never stops
    may not keep the connection's deadlines from being checked."""
    config = ServerConfig(connection_idle_timeout=1.0)
    async with wss_server(tmp_path, protocol=config) as (runtime, pki):
        assert runtime.port is not None and runtime.websocket_port is not None
        ignored = struct.pack(">BBII", 1, FrameType.ABORT, 1, 0)
        stream: ByteStream
        if listener == "tcp":
            stream = await tls_from(runtime.port, pki.ca_cert)
            blob = ignored * 2000
        else:
            stream = (await open_websocket(runtime.websocket_port, pki.ca_cert)).stream
            blob = b"".join(client_frame(0x2, bytes([b])) for b in ignored) * 200
        started = time.monotonic()
        with anyio.fail_after(8):
            with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream, OSError)):
                while True:
                    await stream.send(blob)
        assert time.monotonic() - started < 5
        await anyio.aclose_forcefully(stream)
        assert runtime.connections_served == 1


def _aborts(received: bytes) -> list[int]:
    """The error codes of the ABORT frames in a run of whole frames (the rest ignored)."""
    codes = []
    while len(received) >= 10 and len(received) >= 10 + int.from_bytes(received[6:10], "big"):
        end = 10 + int.from_bytes(received[6:10], "big")
        frame, received = received[:end], received[end:]
        if frame[1] == FrameType.ABORT:
            codes.append(int.from_bytes(frame[10:12], "big"))
    return codes


async def test_login_starts_over_wss_draw_on_the_address_bucket_the_tls_port_uses(tmp_path, monkeypatch):
    """The admission control of the TLS port (a token bucket per client address for
    registration, login and resumption starts, NET-13) applies over wss, and it is the same
    bucket: a burst of LOGIN_STARTs in WebSocket messages from one address has the first
    ``admission_burst`` reach the application and the rest answered ABORT(RATE_LIMITED)
    without it; then a login from that address is refused on the TLS port and on the wss
    port alike, while another address logs in over wss at once."""
    async with wss_server(tmp_path, admission_rate=1.0, admission_burst=20) as (runtime, pki):
        assert runtime.websocket_port is not None and runtime.port is not None
        async with KeymgmtClient(wss(runtime, pki)) as client:
            await client.register(b"other@example.org", PW)
        seen: list[bytes] = []
        original = type(runtime.keyserver).__call__

        def counting(self, conn, event):
            if isinstance(event, LoginRequested):
                seen.append(event.account_name)
            return original(self, conn, event)

        monkeypatch.setattr(type(runtime.keyserver), "__call__", counting)
        flood = await open_websocket(runtime.websocket_port, pki.ca_cert, local_host="127.0.0.2")
        try:
            conn = ClientConnection(os.urandom)
            for n in range(300):
                conn.open_request_session(b"victim%d@example.org" % n, b"guess")
            data = conn.data_to_send()
            for start in range(0, len(data), 4096):  # frames may span messages
                await flood.send_bytes(data[start : start + 4096])
            with anyio.fail_after(20):
                while len(_aborts(bytes(flood.received))) < 280:
                    await flood.next_events()
        finally:
            await anyio.aclose_forcefully(flood.stream)
        aborts = _aborts(bytes(flood.received))
        assert aborts.count(ErrorCode.RATE_LIMITED) >= 275
        assert 20 <= len(seen) <= 25  # the burst, plus what the rate refilled meanwhile
        # The same address's bucket is empty on the TLS port too, and on a new WebSocket.
        async with KeymgmtClient(await tls_from(runtime.port, pki.ca_cert, "127.0.0.2")) as client:
            with pytest.raises(RateLimitedError, match="too many attempts from this address"):
                await client.login(b"other@example.org", PW)
        ws_stream = await client_handshake(
            await tls_to(runtime.websocket_port, pki.ca_cert, "127.0.0.2"), host="localhost", origin=ORIGIN
        )
        async with KeymgmtClient(ws_stream) as client:
            with pytest.raises(RateLimitedError, match="too many attempts from this address"):
                await client.login(b"other@example.org", PW)
        # Another address is not affected.
        async with KeymgmtClient(wss(runtime, pki)) as client:
            await (await client.login(b"other@example.org", PW)).logout()
