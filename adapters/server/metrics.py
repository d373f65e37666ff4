"""Prometheus metrics of one key server, and its health and metrics HTTP listener.

:class:`ServerMetrics` keeps its own ``CollectorRegistry`` (never prometheus_client's
global one), so several runtimes in one process (tests) do not clash. The counters are
moved by the key server (logins, requests), the group commit (batch sizes, failed
batches) and the connection drivers (attacks, rate limiting); the gauges (connections,
sessions) are read from the runtime when scraped.

:func:`serve_ops` answers ``GET /healthz`` (200 while serving, 503 while draining) and
``GET /metrics`` (Prometheus text format) on a plain HTTP/1.1 port of its own. Plain
HTTP: it is meant for loopback or an operations network (see docs/operations.md). A
request must arrive whole within ``READ_TIMEOUT`` seconds and fit ``MAX_REQUEST`` bytes
(a larger one is answered 431), and every answer closes the connection. At most
``MAX_PER_ADDRESS`` connections from one client address and ``MAX_CLIENTS`` in all are
open at once; a connection beyond either closes the oldest one still sending its request
(of that address, or of all), never the newcomer: a client holding half-sent requests
(a slowloris) cannot keep a load balancer's health checks out.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import anyio
from anyio.abc import Listener, SocketAttribute, SocketListener, SocketStream, TaskGroup
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .admission import address_key

__all__ = [
    "MAX_CLIENTS",
    "MAX_PER_ADDRESS",
    "MAX_REQUEST",
    "READ_TIMEOUT",
    "ServerMetrics",
    "answer",
    "parse_listen",
    "serve_ops",
]

log = logging.getLogger("keymgmt.server")

#: Largest request (request line and headers) the listener reads.
MAX_REQUEST = 4096
#: Seconds a client has to send its request (a health check sends it at once).
READ_TIMEOUT = 2.0
#: Connections open at once; one more closes the oldest one still sending its request.
MAX_CLIENTS = 64
#: Connections open at once from one client address (an IPv6 /64); one more closes that
#: address's oldest one still sending its request.
MAX_PER_ADDRESS = 8

#: Request latency buckets, seconds (the handler's work, without the group commit).
_LATENCY = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: Works per group commit.
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: Commit (and fsync) seconds of one batch.
_COMMIT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class _Gauges(Collector):
    """The gauges read from the runtime at scrape time: (name, help, labels -> value)."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, dict[str, float]]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        for name, text, values in self._read():
            labelled = [k for k in values if k]
            family = GaugeMetricFamily(name, text, labels=["state"] if labelled else None)
            for label, value in values.items():
                if label:
                    family.add_metric([label], value)
                else:
                    family.add_metric([], value)
            yield family


#: The help texts of the two request metrics.
_REQUESTS_HELP = "Requests answered, by operation and status"
_REQUEST_SECONDS_HELP = (
    "Time the key server took to answer a request (storage work, without the group commit)"
)
#: The ``le`` labels of the latency buckets, as prometheus_client writes them (for these
#: bounds, their repr; a test compares with its text).
_LATENCY_LE = (*(repr(float(bound)) for bound in _LATENCY), "+Inf")


class _RequestTally(Collector):
    """The requests answered (``keymgmt_requests_total``, by op and status) and the time each
    took (``keymgmt_request_duration_seconds``, by op), counted in plain lists on every
    request's path and made into metric families only when scraped. prometheus_client's
    Counter.inc and Histogram.observe take a lock each and cost about as much as the rest of
    a retrieve's Python code; the families are the ones those two would give (samples, labels,
    ``_created``)."""

    def __init__(self) -> None:
        #: (op, status) -> [count, created]
        self._counts: dict[tuple[str, str], list[float]] = {}
        #: op -> [count of each bucket alone (the last: above every bound), sum, created]
        self._times: dict[str, list[float]] = {}

    def count(self, op: str, status: str) -> None:
        """A request answered without being served (no time observed)."""
        count = self._counts.get((op, status))
        if count is None:
            count = self._counts[(op, status)] = [0.0, time.time()]
        count[0] += 1

    def record(self, op: str, status: str, seconds: float) -> None:
        count = self._counts.get((op, status))
        if count is None:
            count = self._counts[(op, status)] = [0.0, time.time()]
        count[0] += 1
        times = self._times.get(op)
        if times is None:
            times = self._times[op] = [0.0] * (len(_LATENCY_LE) + 1) + [time.time()]
        times[bisect_left(_LATENCY, seconds)] += 1  # (bucket i: seconds <= _LATENCY[i])
        times[-2] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = Metric("keymgmt_requests", _REQUESTS_HELP, "counter")
        for (op, status), (count, created) in list(self._counts.items()):
            labels = {"op": op, "status": status}
            requests.add_sample("keymgmt_requests_total", labels, count)
            requests.add_sample("keymgmt_requests_created", labels, created)
        yield requests
        name = "keymgmt_request_duration_seconds"
        latency = Metric(name, _REQUEST_SECONDS_HELP, "histogram")
        for op, times in list(self._times.items()):
            times = list(times)  # (as it is now, whatever is counted while this runs)
            cumulative = 0.0
            for le, alone in zip(_LATENCY_LE, times, strict=False):
                cumulative += alone
                latency.add_sample(f"{name}_bucket", {"le": le, "op": op}, cumulative)
            latency.add_sample(f"{name}_count", {"op": op}, cumulative)
            latency.add_sample(f"{name}_sum", {"op": op}, times[-2])
            latency.add_sample(f"{name}_created", {"op": op}, times[-1])
        yield latency


class _HistogramTally(Collector):
    """One histogram without labels, counted in a plain list (``observe``) and made into its
    metric family only when scraped: the family a prometheus_client Histogram with these
    buckets would give (samples, ``le`` labels, ``_created``), at a third of its cost per
    observation (no lock, no loop over the bounds). The group commit observes two per batch."""

    def __init__(self, name: str, text: str, bounds: Sequence[float]) -> None:
        self._name = name
        self._text = text
        self._bounds = tuple(float(bound) for bound in bounds)
        self._le = (*(repr(bound) for bound in self._bounds), "+Inf")  # (as _LATENCY_LE)
        #: the count of each bucket alone (the last: above every bound), then the sum
        self._counts = [0.0] * (len(self._bounds) + 2)
        self._created = time.time()

    def observe(self, value: float) -> None:
        counts = self._counts
        counts[bisect_left(self._bounds, value)] += 1  # (bucket i: value <= bound i)
        counts[-1] += value

    def collect(self) -> Iterator[Metric]:
        name = self._name
        family = Metric(name, self._text, "histogram")
        counts = list(self._counts)  # (as it is now, whatever is counted while this runs)
        cumulative = 0.0
        for le, alone in zip(self._le, counts, strict=False):
            cumulative += alone
            family.add_sample(f"{name}_bucket", {"le": le}, cumulative)
        family.add_sample(f"{name}_count", {}, cumulative)
        family.add_sample(f"{name}_sum", {}, counts[-1])
        family.add_sample(f"{name}_created", {}, self._created)
        yield family


#: The help texts of the group commit's two histograms.
_BATCH_HELP = "Works committed together in one group commit"
_COMMIT_HELP = "Time one group commit took to commit (and sync)"


class ServerMetrics:
    """The metrics of one key server, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.logins = Counter(
            "keymgmt_logins", "Logins by outcome (ok, failed, throttled)", ["outcome"], registry=r
        )
        #: Each outcome's counter, looked up once (labels() costs four times an inc()).
        self._logins = {outcome: self.logins.labels(outcome) for outcome in ("ok", "failed", "throttled")}
        self.throttled = Counter(
            "keymgmt_throttled_attempts",
            "Session starts refused: login (a name's failed-login lock) or rate (an address's rate)",
            ["kind"],
            registry=r,
        )
        for kind in ("login", "rate"):
            self.throttled.labels(kind)
        #: keymgmt_requests_total and keymgmt_request_duration_seconds (see _RequestTally).
        self._requests = _RequestTally()
        r.register(self._requests)
        #: Observed once per batch (see _HistogramTally).
        self.batch_size = _HistogramTally("keymgmt_group_commit_batch_size", _BATCH_HELP, _BATCH)
        self.commit_seconds = _HistogramTally("keymgmt_group_commit_duration_seconds", _COMMIT_HELP, _COMMIT)
        r.register(self.batch_size)
        r.register(self.commit_seconds)
        self.storage_errors = Counter(
            "keymgmt_storage_errors",
            "Storage failures: failed group commits and failed storage calls",
            registry=r,
        )
        self.attacks = Counter(
            "keymgmt_session_attacks",
            "Sessions or connections ended for a forged, replayed or malformed frame, or for a flood of "
            "input that does nothing (LIMIT_EXCEEDED), by error code",
            ["code"],
            registry=r,
        )
        self.connections = Counter(
            "keymgmt_connections", "Connections accepted, by how they went", ["result"], registry=r
        )
        self.websocket_upgrades = Counter(
            "keymgmt_websocket_upgrades",
            "WebSocket upgrades: accepted, refused by HTTP status (403 origin, 404 path, 431 size...), "
            "timeout, or closed by the peer first",
            ["result"],
            registry=r,
        )
        self.websocket_closed = Counter(
            "keymgmt_websocket_violations",
            "WebSockets the server closed for the peer's fault, by close code name",
            ["code"],
            registry=r,
        )

    def watch(self, read: Callable[[], Iterable[tuple[str, str, dict[str, float]]]]) -> None:
        """Register gauges read at every scrape (see :class:`_Gauges`)."""
        self.registry.register(_Gauges(read))

    def login(self, outcome: str) -> None:
        self._logins[outcome].inc()
        if outcome == "throttled":
            self.throttled.labels("login").inc()

    def request(self, op: str, status: str, seconds: float) -> None:
        """One request answered (on every request's path; ops and statuses are small fixed sets)."""
        self._requests.record(op, status, seconds)

    def refused(self, op: str, status: str) -> None:
        """One request refused before any work (the per-user rate): counted by op and status,
        kept out of the request times (a flood of refusals would make them look fast)."""
        self._requests.count(op, status)

    def batch(self, works: int, seconds: float, failed: bool) -> None:
        """One group commit ended (GroupCommit's observer)."""
        self.batch_size.observe(works)
        self.commit_seconds.observe(seconds)
        if failed:
            self.storage_errors.inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


def parse_listen(text: str, default_host: str = "127.0.0.1") -> tuple[str, int] | None:
    """``""`` (off), ``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT`` as (host, port); ValueError
    with one line if it is none of these."""
    text = text.strip()
    if not text:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = default_host, text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port_text.isdecimal() or int(port_text) > 65535:
        raise ValueError(f"{text!r} is not PORT, HOST:PORT or [IPV6]:PORT")
    return host, int(port_text)


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _response(
    status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", head: bool = False
) -> bytes:
    header = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return header if head else header + body


#: What _read_request returns for a request larger than MAX_REQUEST.
_TOO_LARGE = b"\x00too large"


async def _read_request(stream: SocketStream) -> bytes | None:
    """The request line and headers, ``_TOO_LARGE``, or None if it is too slow or cut short."""
    data = b""
    with anyio.move_on_after(READ_TIMEOUT):
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            if len(data) > MAX_REQUEST:
                return _TOO_LARGE
            try:
                data += await stream.receive(MAX_REQUEST + 1 - len(data))
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return None
        return data
    return None


def answer(request: bytes, healthy: bool, metrics: ServerMetrics) -> bytes:
    """The HTTP response to one request (request line and headers)."""
    line = request.split(b"\n", 1)[0].strip()
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response(400, b"bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response(405, b"GET or HEAD only\n")
    head = method == b"HEAD"
    if target == b"/healthz":
        if healthy:
            return _response(200, b"ok\n", head=head)
        return _response(503, b"draining\n", head=head)
    if target == b"/metrics":
        return _response(200, metrics.exposition(), CONTENT_TYPE_LATEST, head=head)
    return _response(404, b"not found: /healthz or /metrics\n", head=head)


@dataclass(eq=False, slots=True)
class _Client:
    """One open connection to the health listener."""

    address: str  # its address key (admission.address_key)
    opened: float
    scope: anyio.CancelScope
    reading: bool = True  # still sending its request (may be closed to make room)


class _Clients:
    """The open connections by client address, and the room rules (see the module docstring)."""

    def __init__(self, per_address: int = MAX_PER_ADDRESS, total: int = MAX_CLIENTS) -> None:
        self.per_address = per_address
        self.total = total
        self.open: list[_Client] = []

    def admit(self, address: str, now: float) -> _Client | None:
        """A slot for a new connection from ``address``, closing the oldest one still reading
        when the address or the listener is full; None (refuse it) only if none is reading."""
        same = [c for c in self.open if c.address == address]
        crowd = same if len(same) >= self.per_address else self.open if len(self.open) >= self.total else []
        if crowd:
            reading = [c for c in crowd if c.reading]
            if not reading:
                return None
            victim = min(reading, key=lambda c: c.opened)
            self.drop(victim)
            victim.scope.cancel()
        client = _Client(address, now, anyio.CancelScope())
        self.open.append(client)
        return client

    def drop(self, client: _Client) -> None:
        if client in self.open:
            self.open.remove(client)


async def _linger_close(stream: SocketStream) -> None:
    """Close after an answer sent before the whole request was read: stop sending, then
    read (and drop) a little of what the client still sends, so that closing with unread
    bytes does not reset the connection before the client has read the answer."""
    with anyio.move_on_after(1.0):
        try:
            await stream.send_eof()
            taken = 0
            while taken < 1 << 20:
                taken += len(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


async def serve_ops(
    listeners: Sequence[Listener[SocketStream]],
    healthy: Callable[[], bool],
    metrics: ServerMetrics,
) -> None:
    """Serve /healthz and /metrics on ``listeners`` until cancelled."""
    table = _Clients()

    async def handle(stream: SocketStream, client: _Client) -> None:
        try:
            async with stream:
                request = None  # (closed to make room: no answer)
                with client.scope:
                    request = await _read_request(stream)
                client.reading = False
                if request is None:
                    return
                with anyio.move_on_after(READ_TIMEOUT):
                    if request is _TOO_LARGE:
                        await stream.send(_response(431, b"request too large\n"))
                        await _linger_close(stream)
                    else:
                        await stream.send(answer(request, healthy(), metrics))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug here must not end the key server
            log.error("health listener failed on a request", exc_info=True)
        finally:
            table.drop(client)

    async def accept(listener: SocketListener, tg: TaskGroup) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError:
                await anyio.sleep(0.05)
                continue
            address = stream.extra(SocketAttribute.remote_address, None)
            client = table.admit(
                address_key(str(address[0]) if isinstance(address, tuple) else str(address)), time.monotonic()
            )
            if client is None:
                await anyio.aclose_forcefully(stream)
                continue
            tg.start_soon(handle, stream, client)

    async with anyio.create_task_group() as tg:
        for listener in listeners:
            assert isinstance(listener, SocketListener)
            tg.start_soon(accept, listener, tg)
