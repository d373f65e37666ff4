"""TLS 1.3 KeyUpdate messages from a hostile client, against the real server on loopback.

A KeyUpdate with ``update_requested`` makes OpenSSL answer with a KeyUpdate of its own: 27
bytes out for 27 bytes in, written by the TLS layer while it reads, not by the driver. A
client that sends them without end and reads nothing must not make the server buffer those
answers without bound (the driver's own sends wait under ``send_timeout``; these did not:
the key server's FastTLSStream handed them to the transport whatever it already held).

Python's ssl module cannot send a KeyUpdate; the test calls OpenSSL's ``SSL_key_update``
through ctypes on the ``SSL*`` of a client ``SSLObject`` (found in CPython's ``_ssl``
object, and checked with ``SSL_version`` before use: the test skips if it is not there).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import random
import socket
import ssl
import sys
import threading
from pathlib import Path

import anyio
import pytest

from keymgmt.adapters.server.tlsfast import FastTLSStream
from keymgmt.adapters.tls import TLSRecordCounter
from keymgmt_proto import ServerConfig

from ..support.net_world import running_server
from ..support.rawtls import handshake
from ..support.ws_client import ORIGIN, upgrade_request

pytestmark = pytest.mark.anyio

#: KeyUpdates the client sends at most: 2.7 MB of records (about a second of Python).
UPDATES = 100_000
#: What the server may hold unsent for a peer that reads nothing: its high-water mark and
#: the answers to what one read takes in, far below what the flood would make it hold.
BOUNDED = 1 << 20


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Both event loops: on asyncio the TLS port's stream is a FastTLSStream, on trio (and on
    the wss listener of both) anyio's TLS stream, whose records the runtime counts below it."""
    return str(request.param)


def _openssl() -> ctypes.CDLL:
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # (linked to libssl)
    lib.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_do_handshake.argtypes = [ctypes.c_void_p]
    lib.SSL_version.argtypes = [ctypes.c_void_p]
    return lib


def _ssl_pointer(tls: ssl.SSLObject, lib: ctypes.CDLL) -> int:
    """The ``SSL*`` of ``tls`` (CPython's PySSLSocket: the object head, a weak reference to
    the socket, then ``SSL *ssl``); skips the test if it does not look like one."""
    if sys.implementation.name != "cpython":
        pytest.skip("needs CPython's _ssl object layout")
    address = id(tls._sslobj) + 3 * ctypes.sizeof(ctypes.c_void_p)  # type: ignore[attr-defined]
    pointer = ctypes.c_void_p.from_address(address).value
    if not pointer or lib.SSL_version(pointer) != 0x0304:
        pytest.skip("cannot reach the SSL* of an SSLObject here")
    return int(pointer)


def _flood(port: int, ca: Path, updates: int) -> tuple[socket.socket, int]:
    """Handshake, then send KeyUpdate(update_requested) records and read nothing; returns
    the socket (kept open) and the bytes sent (stops early once the server stops reading)."""
    lib = _openssl()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (a small window fills fast)
    sock.connect(("127.0.0.1", port))
    tls, _incoming, outgoing = handshake(sock, ca)
    pointer = _ssl_pointer(tls, lib)
    sock.settimeout(3.0)
    sent = 0
    for _ in range(updates):
        assert lib.SSL_key_update(pointer, 1) == 1  # SSL_KEY_UPDATE_REQUESTED
        lib.SSL_do_handshake(pointer)  # (sends it)
        data = outgoing.read()
        try:
            sock.sendall(data)
        except (TimeoutError, OSError):  # the server stopped reading: what the fix does
            break
        sent += len(data)
    return sock, sent


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # FastTLSStream is the asyncio server's stream
async def test_key_updates_from_a_peer_that_reads_nothing_leave_bounded_output(tmp_path, anyio_backend):
    # (on trio, anyio's TLS stream waits on its sends: what it writes while reading is bounded)
    # The budget for unproductive input, which now also ends such a flood, is lifted here:
    # this test is about the output, which must stay bounded whatever ends the connection.
    unbudgeted = ServerConfig(unproductive_burst=1 << 30)
    async with running_server(tmp_path, protocol=unbudgeted) as (runtime, pki):
        # The server's kernel send buffer kept small (as over a slow link), so the test
        # needs megabytes, not tens of them, to see what the server itself buffers.

        async def shrink_send_buffers() -> None:
            while True:
                for driver in list(runtime._drivers):
                    stream = driver.stream
                    if isinstance(stream, FastTLSStream):
                        raw = stream._transport.get_extra_info("socket")
                        if raw is not None and raw.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) > 16384:
                            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(shrink_send_buffers)
            with anyio.fail_after(60):
                client, sent = await anyio.to_thread.run_sync(_flood, runtime.port, pki.ca_cert, UPDATES)
            tg.cancel_scope.cancel()
        try:
            await anyio.sleep(0.3)  # (what the server still had to take in)
            held = [
                driver.stream._transport.get_write_buffer_size()
                for driver in runtime._drivers
                if isinstance(driver.stream, FastTLSStream)
            ]
            assert held, "the flooding connection was closed before it could be measured"
            assert max(held) < BOUNDED, f"{sent} bytes of KeyUpdates left {max(held)} bytes unsent"
        finally:
            client.close()


def _flood_reading(port: int, ca: Path, updates: int, websocket: bool = False) -> tuple[socket.socket, int]:
    """As _flood, but with a thread that reads (and drops) what the server sends: the
    server's answers never wait, only the budget for unproductive input may stop it.
    ``websocket``: upgrade to the WebSocket first (the wss listener)."""
    lib = _openssl()
    sock = socket.create_connection(("127.0.0.1", port))
    tls, incoming, outgoing = handshake(sock, ca)
    if websocket:
        tls.write(upgrade_request())
        sock.sendall(outgoing.read())
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                head += tls.read(65536)
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(65536))
        assert head.startswith(b"HTTP/1.1 101 "), head
    pointer = _ssl_pointer(tls, lib)

    def drain() -> None:
        with contextlib.suppress(OSError):
            while sock.recv(1 << 16):
                pass

    threading.Thread(target=drain, daemon=True).start()
    sent = 0
    for _ in range(updates // 100):
        records = []
        for _ in range(100):
            lib.SSL_key_update(pointer, 1)
            lib.SSL_do_handshake(pointer)
            records.append(outgoing.read())
        try:
            sock.sendall(b"".join(records))
        except OSError:  # the server ended the connection
            break
        sent += 100
    return sock, sent


async def test_key_update_records_spend_the_budget_for_unproductive_input(tmp_path):
    """protocol.md section 10: every TLS record carrying fewer than SMALL_PIECE_SIZE bytes
    costs one unit (it is decrypted for a byte or none). A KeyUpdate carries none, and costs
    the server more than an empty record (two key derivations and a record of its own);
    thousands of them, far past ``unproductive_burst``, must end the connection with
    GOAWAY(LIMIT_EXCEEDED) well before its idle timeout (10 s without a session)."""
    burst = ServerConfig().unproductive_burst
    async with running_server(tmp_path) as (runtime, pki):
        with anyio.fail_after(60):
            client, sent = await anyio.to_thread.run_sync(
                _flood_reading, runtime.port, pki.ca_cert, 5 * burst
            )
        try:
            assert sent > burst  # (past the burst: how far depends on the kernel's buffers)
            with anyio.move_on_after(3):  # (well before the connection's idle timeout)
                while runtime._drivers:
                    await anyio.sleep(0.05)
            assert not runtime._drivers, f"{sent} KeyUpdate records did not end the connection"
        finally:
            client.close()


@pytest.mark.parametrize("seed", range(20))
def test_records_are_counted_however_the_ciphertext_is_cut(seed):
    """FastTLSStream counts records by their headers as the ciphertext arrives, in pieces
    cut anywhere (inside a header too)."""
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 17, 22, 1040, 16401, rng.randrange(0, 16640)]) for _ in range(50)]
    stream = b"".join(bytes([23, 3, 3]) + n.to_bytes(2, "big") + bytes(n) for n in lengths)
    counter = TLSRecordCounter(1024)
    at = 0
    while at < len(stream):
        step = rng.choice([1, 2, 3, 4, 5, 6, 100, 5000, 70000])
        counter.note(stream[at : at + step])
        at += step
    assert counter.records == len(lengths)
    assert counter._skip == 0 and counter._head == b""
    for n in lengths:
        counter.piece(n)
    assert counter.owed() == sum(n < 1024 for n in lengths)
    assert counter.owed() == 0


async def test_key_update_records_spend_the_budget_over_the_websocket_listener_too(tmp_path):
    """The same flood on the wss listener, after an accepted upgrade."""
    burst = ServerConfig().unproductive_burst
    ws = {"websocket_listen": ("127.0.0.1", 0), "websocket_origins": frozenset({ORIGIN})}
    async with running_server(tmp_path, **ws) as (runtime, pki):
        assert runtime.websocket_port is not None
        with anyio.fail_after(60):
            client, sent = await anyio.to_thread.run_sync(
                _flood_reading, runtime.websocket_port, pki.ca_cert, 5 * burst, True
            )
        try:
            assert sent > burst  # (past the burst: how far depends on the kernel's buffers)
            with anyio.move_on_after(3):
                while runtime._drivers:
                    await anyio.sleep(0.05)
            assert not runtime._drivers, f"{sent} KeyUpdate records did not end the connection"
        finally:
            client.close()


def _flood_then_upgrade(port: int, ca: Path, updates: int) -> tuple[socket.socket, bytes]:
    """Handshake, KeyUpdate(update_requested) records (a thread drops what the server
    sends back), and only then the WebSocket upgrade request; returns the socket and the
    start of the server's answer to the upgrade (b"" if the connection ended first)."""
    lib = _openssl()
    sock = socket.create_connection(("127.0.0.1", port))
    tls, incoming, outgoing = handshake(sock, ca)
    pointer = _ssl_pointer(tls, lib)
    # (what the server answers to the KeyUpdates is read here, under the TLS layer: the
    # client's own SSL object must see it to read the upgrade's answer)
    received = bytearray()
    done = threading.Event()

    def drain() -> None:
        with contextlib.suppress(OSError):
            while not done.is_set():
                data = sock.recv(1 << 16)
                if not data:
                    break
                received.extend(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with contextlib.suppress(OSError):
        for _ in range(updates // 100):
            records = []
            for _ in range(100):
                lib.SSL_key_update(pointer, 1)
                lib.SSL_do_handshake(pointer)
                records.append(outgoing.read())
            sock.sendall(b"".join(records))
        tls.write(upgrade_request())
        sock.sendall(outgoing.read())
    sock.settimeout(3.0)
    reader.join(3.0)
    done.set()
    incoming.write(bytes(received))
    head = b""
    with contextlib.suppress(ssl.SSLError):
        while True:
            piece = tls.read(65536)
            if not piece:
                break
            head += piece
    return sock, head


async def test_key_updates_sent_before_the_websocket_upgrade_spend_the_budget_too(tmp_path, caplog):
    """The records a client sends between the TLS handshake and the end of its upgrade
    request are TLS records like any other: thousands of KeyUpdates there (read by anyio's
    TLS stream while the upgrade request is awaited, for up to ``websocket.upgrade_timeout``)
    must not be forgiven once the upgrade is accepted."""
    burst = ServerConfig().unproductive_burst
    ws = {"websocket_listen": ("127.0.0.1", 0), "websocket_origins": frozenset({ORIGIN})}
    caplog.set_level(logging.INFO, logger="keymgmt")
    async with running_server(tmp_path, **ws) as (runtime, pki):
        assert runtime.websocket_port is not None
        with anyio.fail_after(60):
            client, head = await anyio.to_thread.run_sync(
                _flood_then_upgrade, runtime.websocket_port, pki.ca_cert, 5 * burst
            )
        try:
            with anyio.move_on_after(3):
                while runtime._drivers:
                    await anyio.sleep(0.05)
            free = f"{5 * burst} KeyUpdates before the upgrade were free"
            assert not runtime._drivers, f"{free} ({head[:20]!r})"
            # The log says why the connection ended, not that the peer left.
            lines = [r.getMessage() for r in caplog.records if r.name.startswith("keymgmt")]
            assert any("than its budget allows before its upgrade request" in line for line in lines), lines
            assert not any("closed before its upgrade request was complete" in line for line in lines), lines
        finally:
            client.close()


async def test_nothing_more_is_read_below_anyios_tls_stream_once_the_budget_ran_out(tmp_path, monkeypatch):
    """As a WebSocket's or a FastTLSStream's: once the runtime's counting stream is told
    the budget ran out, it reads nothing more. Else anyio's TLS stream, looping over records
    that return nothing, goes on taking KeyUpdates in until the driver closes the connection
    (about 4,900 of them on asyncio, 8,600 on trio, for a burst of 1,024)."""
    from keymgmt.adapters.server import runtime as runtime_module
    from keymgmt.adapters.server.driver import ConnectionDriver

    streams: list[runtime_module._CountingStream] = []
    spent_at: list[int] = []
    counting_init = runtime_module._CountingStream.__init__
    small_input = ConnectionDriver._small_input

    def init(self: runtime_module._CountingStream, inner: object) -> None:
        counting_init(self, inner)  # type: ignore[arg-type]
        streams.append(self)

    def spy(self: ConnectionDriver, pieces: int) -> bool:
        spent = small_input(self, pieces)
        if spent and not spent_at:
            spent_at.append(streams[0].received)
        return spent

    monkeypatch.setattr(runtime_module._CountingStream, "__init__", init)
    monkeypatch.setattr(ConnectionDriver, "_small_input", spy)
    burst = ServerConfig().unproductive_burst
    ws = {"websocket_listen": ("127.0.0.1", 0), "websocket_origins": frozenset({ORIGIN})}
    async with running_server(tmp_path, **ws) as (runtime, pki):
        assert runtime.websocket_port is not None
        with anyio.fail_after(60):
            client, _ = await anyio.to_thread.run_sync(
                _flood_reading, runtime.websocket_port, pki.ca_cert, 20 * burst, True
            )
        try:
            with anyio.move_on_after(3):
                while runtime._drivers:
                    await anyio.sleep(0.05)
            assert len(streams) == 1 and spent_at, "the budget did not run out"
            assert streams[0].received == spent_at[0], "bytes read after the budget ran out"
        finally:
            client.close()
