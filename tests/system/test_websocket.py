"""The key server's WebSocket listener (issue 17, item 1), over real TLS 1.3 on loopback:
honest clients (the Python client through ``ws_connector``, real OPAQUE), sessions that
move between the TCP and the WebSocket listener, and the attacks the upgrade and the
WebSocket layer must stop (docs/protocol.md, *WebSocket binding*). After each attack the
server still serves an honest client."""

from __future__ import annotations

import logging
import ssl
import struct
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteStream

from keymgmt.adapters.client import (
    KeymgmtClient,
    TLSConnectError,
    WebSocketConnectError,
    tls_connector,
    ws_connector,
)
from keymgmt.adapters.server.runtime import KeyServerRuntime
from keymgmt.adapters.server.websocket import MAX_UPGRADE_REQUEST
from keymgmt.adapters.tls import DevPKI, client_context, renew_server_certificate
from keymgmt.adapters.websocket import SEND_CHUNK, CloseCode, WebSocketStream, max_message_size
from keymgmt_proto import (
    HEADER_SIZE,
    NEED_DATA,
    ClientConnection,
    Context,
    FrameType,
    OpaqueStepRequired,
    ServerConfig,
    SessionEstablished,
)

from ..support.net_world import raw_login, running_server, tls_from
from ..support.ws_client import (
    ORIGIN,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
    open_websocket,
    read_response_head,
    tls_to,
    upgrade_request,
)

pytestmark = pytest.mark.anyio
PW = b"correct horse battery staple"
LOGGER = "keymgmt.server"


@pytest.fixture
def anyio_backend() -> str:
    """asyncio for most: the byte stream is anyio's on both loops; the honest round trip
    below runs on trio too."""
    return "asyncio"


def wss_server(tmp_path: Path, **overrides: object):
    values: dict[str, object] = dict(
        websocket_listen=("127.0.0.1", 0),
        websocket_origins=frozenset({ORIGIN}),
        websocket_upgrade_timeout=2.0,
    )
    values.update(overrides)
    return running_server(tmp_path, **values)


def wss(runtime: KeyServerRuntime, pki: DevPKI, origin: str = ORIGIN):
    assert runtime.websocket_port is not None
    return ws_connector(
        "127.0.0.1", runtime.websocket_port, cafile=pki.ca_cert, server_hostname="localhost", origin=origin
    )


def tcp(runtime: KeyServerRuntime, pki: DevPKI):
    assert runtime.port is not None
    return tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert, server_hostname="localhost")


async def still_serves(runtime: KeyServerRuntime, pki: DevPKI) -> None:
    """An honest client logs in over the WebSocket and reads a key's audit."""
    async with KeymgmtClient(wss(runtime, pki)) as client:
        session = await client.login(b"alice", PW)
        assert await session.list_keys() is not None
        await session.logout()


async def registered(runtime: KeyServerRuntime, pki: DevPKI) -> None:
    async with KeymgmtClient(tcp(runtime, pki)) as client:
        await client.register(b"alice", PW)


def logins_ok(runtime: KeyServerRuntime) -> float:
    return runtime.metrics.logins.labels("ok")._value.get()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_register_login_store_and_retrieve_over_wss(tmp_path):
    async with wss_server(tmp_path) as (runtime, pki):
        async with KeymgmtClient(wss(runtime, pki)) as client:
            await client.register(b"alice", PW)
            session = await client.login(b"alice", PW)
            key_id = await session.generate(label="wss")
            exported = await session.export(key_id)
            assert await session.retrieve(key_id, Context.EXPORT) is not None
            assert [k.key_id for k in await session.list_keys()] == [key_id]
            await session.logout()
        # The same account and key over TCP: one key server, one storage.
        async with KeymgmtClient(tcp(runtime, pki)) as client:
            session = await client.login(b"alice", PW)
            assert await session.export(key_id) == exported
            await session.logout()
        assert runtime.connection_faults == 0
        assert runtime.metrics.websocket_upgrades.labels("accepted")._value.get() == 1


async def test_a_session_moves_between_tcp_and_wss_without_a_new_login(tmp_path):
    """Sessions detach when a connection goes and resume on the next one, whichever
    listener it reaches: one registry for both."""
    async with wss_server(tmp_path) as (runtime, pki):
        await registered(runtime, pki)
        used: list[str] = []
        order = ["tcp", "wss", "tcp"]

        async def alternating() -> ByteStream:
            kind = order[min(len(used), len(order) - 1)]
            used.append(kind)
            return await (tcp(runtime, pki) if kind == "tcp" else wss(runtime, pki))()

        async with KeymgmtClient(alternating, reconnect_delay=0.01) as client:
            session = await client.login(b"alice", PW)
            key_id = await session.generate()
            logins = logins_ok(runtime)
            for expected in (["tcp", "wss"], ["tcp", "wss", "tcp"]):
                for driver in list(runtime._drivers):
                    driver.stop()  # GOAWAY: the session detaches; the client resumes it
                with anyio.fail_after(20):
                    while len(used) < len(expected):  # the client reconnects on its own
                        await anyio.sleep(0.01)
                    assert [k.key_id for k in await session.list_keys()] == [key_id]
                assert used == expected
            assert logins_ok(runtime) == logins  # no new login, only resumptions
            await session.logout()


async def test_bad_or_missing_origin_is_refused_with_403_and_no_session(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    async with wss_server(tmp_path) as (runtime, pki):
        await registered(runtime, pki)
        assert runtime.websocket_port is not None
        for origin in ("https://evil.example", "null", "https://app.example.org.evil.example", None):
            stream = await tls_to(runtime.websocket_port, pki.ca_cert)
            await stream.send(upgrade_request(origin=origin))
            status, head = await read_response_head(stream)
            assert status == 403, (origin, head)
            assert b"sec-websocket-accept" not in head.lower()
            await stream.aclose()
        # Through the client: a refused upgrade is an error naming the status, before any login.
        with pytest.raises(WebSocketConnectError) as refused:
            async with KeymgmtClient(wss(runtime, pki, origin="https://evil.example")) as client:
                await client.login(b"alice", PW)
        assert refused.value.status == 403
        assert len(runtime.registry) == 0 and runtime.connections_served == 1  # (the registration)
        assert runtime.metrics.websocket_upgrades.labels("403")._value.get() == 5
        assert any("origin 'https://evil.example' is not allowed" in r.getMessage() for r in caplog.records)
        await still_serves(runtime, pki)


async def test_wrong_method_path_or_missing_subprotocol_gets_no_upgrade(tmp_path):
    async with wss_server(tmp_path) as (runtime, pki):
        await registered(runtime, pki)
        assert runtime.websocket_port is not None
        cases = [
            (upgrade_request(method="POST"), 405),
            (upgrade_request(path="/"), 404),
            (upgrade_request(path="/keymgmt/../admin"), 404),
            (upgrade_request(subprotocol=None), 400),
            (upgrade_request(subprotocol="chat, superchat"), 400),
            (b"GET /keymgmt HTTP/1.1\r\nHost: localhost\r\nOrigin: " + ORIGIN.encode() + b"\r\n\r\n", 426),
            (b"\x16\x03\x01 not http at all\r\n\r\n", 400),
        ]
        for request, expected in cases:
            stream = await tls_to(runtime.websocket_port, pki.ca_cert)
            await stream.send(request)
            status, head = await read_response_head(stream)
            assert status == expected, (request, head)
            await stream.aclose()
        assert runtime.connections_served == 1
        await still_serves(runtime, pki)


async def test_an_oversized_upgrade_request_is_refused_before_it_is_read_whole(tmp_path):
    async with wss_server(tmp_path) as (runtime, pki):
        await registered(runtime, pki)
        assert runtime.websocket_port is not None
        stream = await tls_to(runtime.websocket_port, pki.ca_cert)
        head = upgrade_request()
        # A header of 12 KiB: over the 8 KiB limit, under h11's own default of 16 KiB.
        padding = b"X-Padding: " + b"a" * (12 * 1024) + b"\r\n"
        assert MAX_UPGRADE_REQUEST < len(head) + len(padding) < 16 * 1024
        await stream.send(head[:-2] + padding)  # (no blank line: the head never ends)
        with anyio.fail_after(5):
            status, _ = await read_response_head(stream)
        assert status == 431
        await stream.aclose()
        await still_serves(runtime, pki)


async def test_a_slow_upgrade_is_dropped_after_the_upgrade_timeout(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    async with wss_server(tmp_path, websocket_upgrade_timeout=0.5) as (runtime, pki):
        await registered(runtime, pki)
        assert runtime.websocket_port is not None
        stream = await tls_to(runtime.websocket_port, pki.ca_cert)
        request = upgrade_request()
        started = anyio.current_time()
        with anyio.fail_after(5):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                for byte in request[:-2]:  # slowloris: a byte at a time, never the end
                    await stream.send(bytes([byte]))
                    await anyio.sleep(0.05)
                await stream.receive()
        assert anyio.current_time() - started < 3
        assert runtime.metrics.websocket_upgrades.labels("timeout")._value.get() == 1
        assert any("upgrade request took too long" in r.getMessage() for r in caplog.records)
        await anyio.aclose_forcefully(stream)
        await still_serves(runtime, pki)


async def test_a_silent_connection_to_the_wss_port_is_dropped_after_the_tls_handshake_timeout(tmp_path):
    async with wss_server(tmp_path, tls_handshake_timeout=0.3) as (runtime, _pki):
        assert runtime.websocket_port is not None
        silent = await anyio.connect_tcp("127.0.0.1", runtime.websocket_port)
        await silent.send(b"\x16")  # the first byte of a TLS record, then nothing
        with anyio.fail_after(5):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await silent.receive()
        await silent.aclose()
        assert runtime.connections_served == 0


async def test_a_text_message_closes_the_connection(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    async with wss_server(tmp_path) as (runtime, pki):
        await registered(runtime, pki)
        assert runtime.websocket_port is not None
        client = await open_websocket(runtime.websocket_port, pki.ca_cert)
        await client.send(TextMessage(data="\x01\x01\x00\x00\x00\x01"))
        close = await client.closed()
        assert close.code == CloseCode.UNSUPPORTED_DATA
        await client.transport_ended()
        assert any("a text message" in r.getMessage() for r in caplog.records)
        assert runtime.metrics.websocket_closed.labels("unsupported_data")._value.get() == 1
        await still_serves(runtime, pki)


async def test_an_oversized_message_closes_the_connection(tmp_path):
    async with wss_server(tmp_path) as (runtime, pki):
        await registered(runtime, pki)
        assert runtime.websocket_port is not None
        limit = max_message_size(ServerConfig().max_payload)
        client = await open_websocket(runtime.websocket_port, pki.ca_cert)
        # A valid frame header announcing a payload the limit allows, then far more bytes in
        # the same message: the message, not the frame, goes over the limit first.
        header = struct.pack(">BBII", 1, FrameType.REG_START, 1, 65000)
        await client.send_bytes(header + b"\x00" * (limit + 1 - len(header)))
        close = await client.closed()
        assert close.code == CloseCode.MESSAGE_TOO_BIG
        await client.transport_ended()
        assert runtime.metrics.websocket_closed.labels("message_too_big")._value.get() == 1
        # A message at the limit is taken (a whole largest frame fits in one).
        assert limit >= HEADER_SIZE + ServerConfig().max_payload
        await still_serves(runtime, pki)


async def test_frames_may_span_messages_and_messages_may_hold_frames(tmp_path):
    """Message boundaries carry no meaning: a login sent 7 bytes a message, the answers
    read back as one byte stream; then a ping is answered and a close is echoed."""
    async with wss_server(tmp_path) as (runtime, pki):
        await registered(runtime, pki)
        assert runtime.websocket_port is not None
        client = await open_websocket(runtime.websocket_port, pki.ca_cert)
        conn = ClientConnection(__import__("os").urandom)
        conn.open_request_session(b"alice", PW)
        with anyio.fail_after(20):
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    out = conn.data_to_send()
                    for i in range(0, len(out), 7):
                        await client.send_bytes(out[i : i + 7])
                    before = len(client.received)
                    while len(client.received) == before:
                        await client.next_events()
                    conn.receive_data(bytes(client.received[before:]))
                    continue
                if isinstance(event, OpaqueStepRequired):
                    conn.complete_opaque_step(event.run(conn.opaque))
                    continue
                assert isinstance(event, SessionEstablished), event
                break
        await client.send(Ping(payload=b"are you there"))
        pong = await client.until(Pong)
        assert isinstance(pong, Pong) and pong.payload == b"are you there"
        await client.send(CloseConnection(code=1000, reason="done"))
        close = await client.closed()
        assert close.code == 1000
        await client.transport_ended()
        with anyio.fail_after(10):
            while runtime._drivers:  # the server ended the connection (its session detached)
                await anyio.sleep(0.01)
        assert runtime.connection_faults == 0


async def test_a_ping_flood_gets_one_pong_per_read(tmp_path):
    """A thousand pings in one write: the server answers the last one of each read (RFC
    6455 allows it), not each one, and the connection goes on."""
    async with wss_server(tmp_path) as (runtime, pki):
        assert runtime.websocket_port is not None
        client = await open_websocket(runtime.websocket_port, pki.ca_cert)
        await client.stream.send(b"".join(client.ws.send(Ping(payload=b"%d" % i)) for i in range(1000)))
        with anyio.fail_after(10):
            while not any(isinstance(e, Pong) and e.payload == b"999" for e in client.events):
                await client.next_events()
        pongs = [e for e in client.events if isinstance(e, Pong)]
        assert 1 <= len(pongs) <= 20, len(pongs)
        await client.send(CloseConnection(code=1000))
        assert (await client.closed()).code == 1000


async def test_idle_wss_connections_do_not_lock_out_tcp_clients(tmp_path):
    """The WebSocket listener shares the TCP listener's admission: a full server makes room
    for an address holding fewer connections, whichever listener the others came in on,
    and idle WebSockets are closed after connection_idle_timeout like idle TCP ones."""
    config = ServerConfig(connection_idle_timeout=1.5)
    async with wss_server(tmp_path, max_connections=6, protocol=config) as (runtime, pki):
        await registered(runtime, pki)
        assert runtime.websocket_port is not None
        idle = [await open_websocket(runtime.websocket_port, pki.ca_cert) for _ in range(6)]
        # A TCP client from another address gets in (an idle WebSocket gives way) and logs in.
        stream = await tls_from(runtime.port, pki.ca_cert, local_host="127.0.0.2")
        with anyio.fail_after(20):
            _conn, _sid = await raw_login(stream, b"alice", PW)
        assert runtime.connections_preempted >= 1
        await stream.aclose()
        # The rest are closed for idleness (GOAWAY, then the close frame).
        for ws in idle:
            with anyio.fail_after(10):
                await ws.transport_ended()
        # Per-address limit: the same count for both listeners.
        assert runtime.address_limits.connections("127.0.0.1") == 0


async def test_a_wss_connection_over_the_per_address_limit_is_refused(tmp_path):
    async with wss_server(tmp_path, max_connections_per_address=2) as (runtime, pki):
        assert runtime.websocket_port is not None and runtime.port is not None
        held = [
            await tls_from(runtime.port, pki.ca_cert),
            await open_websocket(runtime.websocket_port, pki.ca_cert),
        ]
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
            with anyio.fail_after(5):
                await open_websocket(runtime.websocket_port, pki.ca_cert)
        assert runtime.connections_refused == 1
        await held[0].aclose()
        await held[1].stream.aclose()


async def test_sighup_reload_serves_the_renewed_certificate_on_wss_too(tmp_path):
    async with wss_server(tmp_path) as (runtime, pki):
        assert runtime.websocket_port is not None
        old = await tls_to(runtime.websocket_port, pki.ca_cert)
        first = old.extra(anyio.streams.tls.TLSAttribute.peer_certificate_binary)
        renew_server_certificate(pki.server_cert.parent)
        assert runtime.reload_tls()
        new = await tls_to(runtime.websocket_port, pki.ca_cert)
        assert new.extra(anyio.streams.tls.TLSAttribute.peer_certificate_binary) != first
        assert new.extra(anyio.streams.tls.TLSAttribute.tls_version) == "TLSv1.3"
        for stream in (old, new):
            await stream.aclose()


async def test_the_wss_port_refuses_tls_1_2_and_shows_the_tls_ports_certificate(tmp_path):
    """The WebSocket listener is the TLS port's TLS 1.3: a client that offers only TLS 1.2
    gets no handshake (no WebSocket, nothing served), and the certificate both ports present
    is the one certificate of ``cert_path``."""
    async with wss_server(tmp_path) as (runtime, pki):
        assert runtime.websocket_port is not None and runtime.port is not None
        old = client_context(pki.ca_cert)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(TLSConnectError, match="handshake"):
            await ws_connector("127.0.0.1", runtime.websocket_port, context=old, origin=ORIGIN)()
        assert runtime.connections_served == 0
        streams = [await tls_to(port, pki.ca_cert) for port in (runtime.port, runtime.websocket_port)]
        certificates = {s.extra(anyio.streams.tls.TLSAttribute.peer_certificate_binary) for s in streams}
        versions = {s.extra(anyio.streams.tls.TLSAttribute.tls_version) for s in streams}
        assert certificates == {ssl.PEM_cert_to_DER_cert(pki.server_cert.read_text())}
        assert versions == {"TLSv1.3"}
        for stream in streams:
            await stream.aclose()


async def test_long_output_goes_out_in_messages_of_at_most_send_chunk_bytes():
    """What this package sends fits any receiver's limit, whatever its max_payload: a
    200 KiB write arrives whole, in messages of at most SEND_CHUNK bytes."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import BytesMessage

    from keymgmt.adapters.testing.streams import memory_stream_pair

    near, far = memory_stream_pair()
    sender = WebSocketStream(near, Connection(ConnectionType.CLIENT))
    receiver = Connection(ConnectionType.SERVER)
    data = bytes(range(256)) * 800
    async with anyio.create_task_group() as tg:
        tg.start_soon(sender.send, data)
        got, sizes = bytearray(), []
        with anyio.fail_after(5):
            while len(got) < len(data):
                receiver.receive_data(await far.receive())
                for event in receiver.events():
                    assert isinstance(event, BytesMessage)
                    got += event.data
                    if event.message_finished:
                        sizes.append(len(got) - sum(sizes))
    assert bytes(got) == data
    assert sizes and max(sizes) <= SEND_CHUNK < max_message_size(1024)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_keymgmt_server_serve_with_workers_serves_wss_from_every_worker(tmp_path):
    """The real command line: the parent binds the WebSocket port and hands it to each
    worker; a client registers and logs in over it; SIGTERM stops everything."""
    from ..support.server_proc import ServerProcess, init_server_dir

    directory = init_server_dir(tmp_path / "srv")
    port = _free_port()
    env = {"KEYMGMT_WEBSOCKET_LISTEN": f"127.0.0.1:{port}", "KEYMGMT_WEBSOCKET_ALLOWED_ORIGINS": ORIGIN}
    server = await anyio.to_thread.run_sync(
        lambda: ServerProcess(directory, env=env, args=("--workers", "2"))
    )
    try:
        connect = ws_connector(
            "127.0.0.1", port, cafile=directory / "ca.pem", server_hostname="localhost", origin=ORIGIN
        )
        async with KeymgmtClient(connect) as client:
            await client.register(b"alice", PW)
            session = await client.login(b"alice", PW)
            key_id = await session.import_secret(b"\x04abcd")
            assert await session.export(key_id) == b"\x04abcd"
            await session.logout()
        with anyio.fail_after(10):
            while server.log_text().count(f"WebSocket listener on wss://127.0.0.1:{port}/keymgmt") < 2:
                await anyio.sleep(0.05)
    finally:
        assert await anyio.to_thread.run_sync(server.stop) == 0
