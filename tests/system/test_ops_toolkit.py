"""The operator's toolkit on a real server (loopback TLS 1.3, SQLite file), asyncio and trio:
/healthz and /metrics on their own plain-HTTP port, counters that move with real logins and
requests, a WARNING line with the peer for every session-level attack or throttled login,
a bare TCP check logged at DEBUG, and a certificate reloaded for new connections."""

from __future__ import annotations

import logging
import os

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keymgmt.adapters.client.async_client import AuthenticationError, KeymgmtClient, ThrottledError
from keymgmt.adapters.client.connect import tls_connector
from keymgmt.adapters.server.app import ThrottlePolicy
from keymgmt.adapters.server.driver import UNKNOWN_SESSIONS_AT_INFO
from keymgmt.adapters.tls import renew_server_certificate
from keymgmt_proto import Context, FrameType
from keymgmt_proto.wire import Record, ResumeEnvelope

from ..support.frames import forge, split_frames
from ..support.net_world import raw_login, running_server, tls_from

pytestmark = pytest.mark.anyio

PW = b"correct horse battery staple"
LOGGER = "keymgmt.server"


async def http_get(port: int, path: str, request: bytes | None = None) -> tuple[int, bytes]:
    """One plain HTTP/1.1 request to the health listener: (status, body)."""
    with anyio.fail_after(30):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            await stream.send(request or f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            try:
                while True:
                    data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = await http_get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def warnings_about(caplog, text: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and text in r.getMessage()
    ]


async def test_metrics_move_with_real_logins_and_requests(tmp_path):
    async with running_server(tmp_path, health_listen=("127.0.0.1", 0)) as (runtime, pki):
        assert runtime.health_port is not None
        assert await http_get(runtime.health_port, "/healthz") == (200, b"ok\n")
        before = await scrape(runtime.health_port)
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"metrics@example.org", PW)
            with pytest.raises(AuthenticationError):
                await client.login(b"metrics@example.org", b"not the password")
            session = await client.login(b"metrics@example.org", PW)
            key_id = await session.generate()
            client.local_store.delete(session.user_id, key_id)
            assert len(await session.retrieve(key_id, Context.LOCAL_ONLY)) == 32
            assert len(await session.list_keys()) == 1
            during = await scrape(runtime.health_port)
            await session.logout()
        after = await scrape(runtime.health_port)

    assert (
        value(after, "keymgmt_logins_total", outcome="ok")
        == value(before, "keymgmt_logins_total", outcome="ok") + 1
    )
    assert value(after, "keymgmt_logins_total", outcome="failed") == 1
    assert value(after, "keymgmt_requests_total", op="RETRIEVE", status="OK") == 1
    assert value(after, "keymgmt_requests_total", op="LIST_KEYS", status="OK") == 1
    assert value(after, "keymgmt_requests_total", op="STORE_SECRET", status="OK") >= 1
    assert value(after, "keymgmt_request_duration_seconds_count", op="RETRIEVE") == 1
    assert value(after, "keymgmt_group_commit_batch_size_count") > value(
        before, "keymgmt_group_commit_batch_size_count"
    )
    assert value(after, "keymgmt_connections_total", result="served") == 1
    assert value(during, "keymgmt_open_connections") == 1
    assert value(during, "keymgmt_sessions", state="live") == 1
    assert value(after, "keymgmt_storage_errors_total") == 0


async def test_healthz_says_503_while_draining_and_refuses_what_it_does_not_serve(tmp_path):
    async with running_server(tmp_path, health_listen=("127.0.0.1", 0), tls_handshake_timeout=5.0) as (
        runtime,
        _pki,
    ):
        port = runtime.health_port
        assert port is not None
        assert (await http_get(port, "/nothing"))[0] == 404
        assert (await http_get(port, "", b"POST /healthz HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await http_get(port, "", b"garbage\r\n\r\n"))[0] == 400
        status, body = await http_get(port, "", b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, b"")
        # A request larger than the limit is cut, not buffered: answered 431 (also below).
        status, _ = await http_get(port, "", b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 10000)
        assert status == 431
        # A connection still in its TLS handshake keeps the server draining after shutdown().
        silent = await anyio.connect_tcp("127.0.0.1", runtime.port)
        await anyio.sleep(0.1)
        runtime.shutdown()
        assert await http_get(port, "/healthz") == (503, b"draining\n")
        await silent.aclose()


async def test_a_bare_tcp_check_is_a_debug_line_not_a_tls_warning(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with running_server(tmp_path) as (runtime, _pki):
        for _ in range(3):
            probe = await anyio.connect_tcp("127.0.0.1", runtime.port)
            await probe.aclose()
        with anyio.fail_after(30):
            while runtime.connections_probed < 3:
                await anyio.sleep(0.01)
        # A peer that does send something that is not TLS is still a failed handshake.
        garbage = await anyio.connect_tcp("127.0.0.1", runtime.port)
        await garbage.send(b"GET / HTTP/1.0\r\n\r\n")
        with anyio.fail_after(30):
            while not warnings_about(caplog, "TLS handshake with"):
                await anyio.sleep(0.01)
        await garbage.aclose()
    probes = [r for r in caplog.records if "closed before sending anything" in r.getMessage()]
    assert len(probes) == 3 and all(r.levelno == logging.DEBUG for r in probes)
    assert len(warnings_about(caplog, "TLS handshake with")) == 1


async def test_session_attacks_are_warning_lines_with_the_peer(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with running_server(tmp_path, health_listen=("127.0.0.1", 0)) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"victim@example.org", PW)
        stream = await tls_from(runtime.port, pki.ca_cert)
        conn, sid = await raw_login(stream, b"victim@example.org", PW)
        # A tampered record (the AEAD tag flipped), then a replayed one on a second session.
        conn.send_request(sid, b"\x05")
        (frame,) = split_frames(conn.data_to_send())
        await stream.send(frame[:-1] + bytes([frame[-1] ^ 1]))
        with anyio.fail_after(30):
            while not warnings_about(caplog, "BAD_RECORD"):
                await anyio.sleep(0.01)
        # RESUMEs of sessions nobody holds: the first few are INFO (an honest client after a
        # server crash), more on one connection are WARNINGs (guessed handles).
        for n in range(UNKNOWN_SESSIONS_AT_INFO + 1):
            bogus = ResumeEnvelope(os.urandom(16), Record(0, os.urandom(40))).encode()
            await stream.send(forge(FrameType.RESUME, sid + 10 + n, bogus))
        with anyio.fail_after(30):
            while not warnings_about(caplog, "UNKNOWN_SESSION"):
                await anyio.sleep(0.01)
        local = stream.extra(anyio.abc.SocketAttribute.local_address)
        peer = f"{local[0]}:{local[1]}"
        samples = await scrape(runtime.health_port)
        await stream.aclose()
    for code in ("BAD_RECORD", "UNKNOWN_SESSION"):
        (line,) = warnings_about(caplog, code)
        assert peer in line.getMessage() and line.peer == peer  # the structured field as well
        assert (line.event, line.code) == ("attack", code)
    assert value(samples, "keymgmt_session_attacks_total", code="BAD_RECORD") == 1
    assert value(samples, "keymgmt_session_attacks_total", code="UNKNOWN_SESSION") == 5
    resumes = [r for r in caplog.records if "of a session this server does not hold" in r.getMessage()]
    assert len(resumes) == UNKNOWN_SESSIONS_AT_INFO
    assert all(r.levelno == logging.INFO and r.peer == peer for r in resumes)
    assert all((r.event, r.code) == ("unknown_session", "UNKNOWN_SESSION") for r in resumes)


async def test_attack_lines_are_bounded_per_connection(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with running_server(tmp_path) as (runtime, pki):
        stream = await tls_from(runtime.port, pki.ca_cert)
        total = UNKNOWN_SESSIONS_AT_INFO + 7  # the first ones are INFO lines, then seven WARNINGs
        for sid in range(1, total + 1):
            bogus = ResumeEnvelope(os.urandom(16), Record(0, os.urandom(40))).encode()
            await stream.send(forge(FrameType.RESUME, sid, bogus))
        with anyio.fail_after(30):
            while runtime.metrics.attacks.labels("UNKNOWN_SESSION")._value.get() < total:
                await anyio.sleep(0.01)
        await stream.aclose()
        with anyio.fail_after(30):
            while not warnings_about(caplog, "more UNKNOWN_SESSION not logged"):
                await anyio.sleep(0.01)
    assert len(warnings_about(caplog, "UNKNOWN_SESSION (")) == 5
    (summary,) = warnings_about(caplog, "more UNKNOWN_SESSION not logged")
    assert ": 2 more" in summary.getMessage()


async def test_throttled_and_failed_logins_are_warning_lines_with_the_peer(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    policy = ThrottlePolicy(threshold=1, base_delay=600.0)
    async with running_server(tmp_path, throttle=policy, health_listen=("127.0.0.1", 0)) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"locked@example.org", PW)
            with pytest.raises(AuthenticationError):
                await client.login(b"locked@example.org", b"wrong guess")
            with pytest.raises(ThrottledError):
                await client.login(b"locked@example.org", PW)
        samples = await scrape(runtime.health_port)
    assert len(warnings_about(caplog, "failed login from 127.0.0.1:")) == 1
    (throttled,) = warnings_about(caplog, "throttled a login from 127.0.0.1:")
    assert throttled.peer.startswith("127.0.0.1:")
    assert value(samples, "keymgmt_logins_total", outcome="throttled") == 1
    assert value(samples, "keymgmt_throttled_attempts_total", kind="login") == 1


async def test_reload_tls_serves_a_renewed_certificate_to_new_connections(tmp_path, caplog):
    async with running_server(tmp_path) as (runtime, pki):
        old = await tls_from(runtime.port, pki.ca_cert)
        first = old.extra(anyio.streams.tls.TLSAttribute.peer_certificate_binary)
        renewed = renew_server_certificate(pki.server_cert.parent)
        assert runtime.reload_tls()
        new = await tls_from(runtime.port, pki.ca_cert)
        second = new.extra(anyio.streams.tls.TLSAttribute.peer_certificate_binary)
        assert first != second
        from cryptography import x509

        assert x509.load_der_x509_certificate(second).serial_number == renewed.serial_number
        # A broken certificate file is refused and the working one kept.
        pki.server_cert.write_text("not a certificate")
        assert not runtime.reload_tls()
        third = await tls_from(runtime.port, pki.ca_cert)
        assert third.extra(anyio.streams.tls.TLSAttribute.peer_certificate_binary) == second
        for stream in (old, new, third):
            await stream.aclose()


async def test_broken_framing_is_a_warning_line_with_the_peer(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with running_server(tmp_path) as (runtime, pki):
        stream = await tls_from(runtime.port, pki.ca_cert)
        local = stream.extra(anyio.abc.SocketAttribute.local_address)
        await stream.send(b"\xff" * 64)  # no frame header of any version
        with anyio.fail_after(30):
            while not warnings_about(caplog, f"refused from {local[0]}:{local[1]}"):
                await anyio.sleep(0.01)
        await stream.aclose()
    (line,) = warnings_about(caplog, "refused from")
    assert line.event == "attack" and line.code in {"UNSUPPORTED_VERSION", "MALFORMED"}


async def test_a_replayed_record_is_a_warning_line_with_the_peer(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with running_server(tmp_path) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"replayed@example.org", PW)
        stream = await tls_from(runtime.port, pki.ca_cert)
        conn, sid = await raw_login(stream, b"replayed@example.org", PW)
        conn.send_request(sid, b"\x05")
        (frame,) = split_frames(conn.data_to_send())
        await stream.send(frame + frame)  # the same sealed record twice
        with anyio.fail_after(30):
            while not warnings_about(caplog, "BAD_RECORD"):
                await anyio.sleep(0.01)
        local = stream.extra(anyio.abc.SocketAttribute.local_address)
        await stream.aclose()
    (line,) = warnings_about(caplog, "BAD_RECORD")
    assert line.peer == f"{local[0]}:{local[1]}"


async def _slowloris(port: int, count: int, local_host: str | None = None) -> list:
    """``count`` connections to the health listener, each with half a request sent."""
    streams = []
    for _ in range(count):
        stream = await anyio.connect_tcp("127.0.0.1", port, local_host=local_host)
        await stream.send(b"GET /healthz HTTP/1.1\r\n")
        streams.append(stream)
    return streams


async def test_a_slowloris_cannot_keep_health_checks_out(tmp_path, caplog):
    """Half-sent requests from one address, kept coming, and from many addresses at once:
    every /healthz check (from an address of the attack's own) is still answered."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with running_server(tmp_path, health_listen=("127.0.0.1", 0)) as (runtime, _pki):
        port = runtime.health_port
        assert port is not None
        held = await _slowloris(port, 40)
        answers = []
        for _ in range(10):
            held += await _slowloris(port, 16)
            answers.append(await http_get(port, "/healthz"))
        # Many addresses (127.0.0.2..): more half-sent requests than the listener's total.
        for n in range(2, 14):
            held += await _slowloris(port, 8, local_host=f"127.0.0.{n}")
            answers.append(await http_get(port, "/healthz"))
        for stream in held:
            await stream.aclose()
    assert answers == [(200, b"ok\n")] * len(answers)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_one_address_cannot_close_another_addresses_slow_health_check(tmp_path):
    """A check that takes its time (half its request, then the rest) while another address
    opens far more half-sent requests than the listener holds: the newcomers only close that
    address's own connections."""
    async with running_server(tmp_path, health_listen=("127.0.0.1", 0)) as (runtime, _pki):
        port = runtime.health_port
        assert port is not None
        with anyio.fail_after(30):
            check = await anyio.connect_tcp("127.0.0.1", port)
            async with check:
                await check.send(b"GET /healthz HTTP/1.1\r\n")
                held = await _slowloris(port, 200, local_host="127.0.0.2")
                await check.send(b"Host: x\r\n\r\n")
                data = b""
                try:
                    while True:
                        data += await check.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
        for stream in held:
            await stream.aclose()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_a_request_too_large_is_answered_431(tmp_path):
    async with running_server(tmp_path, health_listen=("127.0.0.1", 0)) as (runtime, _pki):
        assert runtime.health_port is not None
        request = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"
        status, _body = await http_get(runtime.health_port, "", request)
    assert status == 431


async def test_shutdown_delay_says_503_while_the_tls_port_still_serves(tmp_path):
    """server.shutdown_delay: after shutdown() /healthz says 503 while new clients still log
    in on the TLS port, for the delay; then the normal graceful stop."""
    async with running_server(tmp_path, health_listen=("127.0.0.1", 0), shutdown_delay=30.0) as (
        runtime,
        pki,
    ):
        assert runtime.health_port is not None
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"drain@example.org", PW)
        runtime.shutdown()
        assert await http_get(runtime.health_port, "/healthz") == (503, b"draining\n")
        async with KeymgmtClient(connect) as client:  # a new connection, during the delay
            session = await client.login(b"drain@example.org", PW)
            assert await session.list_keys() == []
        assert await http_get(runtime.health_port, "/healthz") == (503, b"draining\n")
        runtime.shutdown()  # a second one (SIGTERM) ends the delay: the port closes
        with anyio.fail_after(30):
            while True:
                try:
                    probe = await anyio.connect_tcp("127.0.0.1", runtime.port)
                except OSError:
                    break
                await probe.aclose()
                await anyio.sleep(0.05)


async def test_a_peers_goaway_reason_is_logged_quoted_as_its_claim(tmp_path, caplog):
    """The reason text of a GOAWAY is the peer's: quoted, labelled as the peer's, and a
    GOAWAY(MALFORMED) is not logged as the server refusing the peer."""
    from keymgmt_proto import ErrorCode
    from keymgmt_proto.wire import GoAway

    caplog.set_level(logging.INFO, logger=LOGGER)
    fake = "ok 2026-11-30T05:00:00.000Z CRITICAL keymgmt.server: database deleted by admin"
    async with running_server(tmp_path) as (runtime, pki):
        for code in (ErrorCode.OK, ErrorCode.MALFORMED):
            stream = await tls_from(runtime.port, pki.ca_cert)
            await stream.send(forge(FrameType.GOAWAY, 0, GoAway(code, fake).encode()))
            with anyio.fail_after(30):
                while not [
                    r for r in caplog.records if f"the peer sent GOAWAY {code.name}" in r.getMessage()
                ]:
                    await anyio.sleep(0.01)
            await stream.aclose()
    lines = [r for r in caplog.records if "the peer sent GOAWAY" in r.getMessage()]
    assert len(lines) == 2
    for line in lines:
        assert line.getMessage().endswith(f"its reason: {fake!r}")
        assert line.levelno == logging.INFO and line.event == "peer_goaway"
    assert not warnings_about(caplog, "refused from")
    assert runtime.metrics.attacks.labels("MALFORMED")._value.get() == 0


async def test_a_registration_line_names_the_peer(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with running_server(tmp_path) as (runtime, pki):
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        async with KeymgmtClient(connect) as client:
            await client.register(b"peer@example.org", PW)
    (line,) = [r for r in caplog.records if "registered a new account" in r.getMessage()]
    assert line.getMessage().startswith(f"registered a new account from {line.peer} (session ")
    assert line.peer.startswith("127.0.0.1:") and line.event == "registered"
