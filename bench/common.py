"""Shared fixtures for the benchmarks: in-process client/server pairs, CPU clocks, results."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    NEED_DATA,
    ClientConnection,
    Event,
    OpaqueStepRequired,
    RegistrationSucceeded,
    ServerConfig,
    ServerConnection,
    ServerSetup,
    SessionEstablished,
    SessionRegistry,
)

__all__ = [
    "ACCOUNT",
    "PASSWORD",
    "Line",
    "Pair",
    "ServerApp",
    "machine_description",
    "new_pair",
    "pinned",
    "process_cpu_seconds",
    "spread",
    "sqlite_keyserver",
]

ACCOUNT = b"bench@example.org"
PASSWORD = b"correct horse battery staple"
#: The benchmarks send more requests per session than the default policy allows (1000).
BENCH_CONFIG = ServerConfig(max_requests_per_session=2**31, max_sessions_per_connection=20_000)

ServerApp = Callable[[ServerConnection, Event], None]


def drain_server(server: ServerConnection, app: ServerApp) -> None:
    """What ConnectionDriver._process does: hand every server event to the application,
    inside the application's group commit when it has one (as the real driver does)."""
    batch = getattr(app, "batch", None)
    with batch() if batch is not None else nullcontext():
        while (event := server.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            app(server, event)


def drain_client(client: ClientConnection) -> list[Event]:
    """The client's events until NEED_DATA; its OPAQUE steps (Argon2) run inline."""
    events: list[Event] = []
    while (event := client.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        if isinstance(event, OpaqueStepRequired):
            client.complete_opaque_step(event.run(client.opaque))
        else:
            events.append(event)
    return events


@dataclass
class Pair:
    """A client and a server connection joined by hand (no sockets), with a swappable app."""

    client: ClientConnection
    server: ServerConnection
    app: ServerApp
    #: The server's virtual time: the benchmarks never let it pass, so no deadline fires.
    now: float

    def to_server(self) -> None:
        data = self.client.data_to_send()
        if data:
            self.server.receive_data(data, self.now)
        drain_server(self.server, self.app)

    def to_client(self) -> list[Event]:
        data = self.server.data_to_send()
        if data:
            self.client.receive_data(data)
        return drain_client(self.client)

    def pump(self) -> list[Event]:
        events: list[Event] = []
        while True:
            self.to_server()
            if not self.server.pending_output:
                return events
            events += self.to_client()
            if not self.client.pending_output:
                return events

    def register(self, account: bytes = ACCOUNT, password: bytes = PASSWORD) -> bytes:
        self.client.open_registration(account, password)
        (done,) = [e for e in self.pump() if isinstance(e, RegistrationSucceeded)]
        return done.user_id

    def login(self, account: bytes = ACCOUNT, password: bytes = PASSWORD) -> SessionEstablished:
        self.client.open_request_session(account, password)
        (established,) = [e for e in self.pump() if isinstance(e, SessionEstablished)]
        return established


def new_pair(setup: ServerSetup, app: ServerApp, config: ServerConfig = BENCH_CONFIG) -> Pair:
    registry = SessionRegistry(config)
    return Pair(
        ClientConnection(os.urandom, max_requests_in_flight=1024),
        ServerConnection(setup, os.urandom, registry=registry, now=0.0),
        app,
        now=0.0,
    )


def sqlite_keyserver(directory: str | None = None) -> KeyServer:
    """A KeyServer over a fresh SQLite file (the product setting)."""
    path = Path(directory or tempfile.mkdtemp(prefix="keymgmt-bench-")) / "keyserver.db"
    return KeyServer(SQLiteStorage(path), request_rates=None)  # (the per-user rate would measure itself)


def process_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` (nanosecond resolution from schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1e9


@contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """Run the block with this process pinned to ``cpus`` (restored afterwards)."""
    before = os.sched_getaffinity(0)
    usable = cpus & before or before
    os.sched_setaffinity(0, usable)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def machine_description() -> dict[str, str | int]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count() or 0,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "executable": sys.executable,
    }


@dataclass
class Line:
    """One table line: a value measured side by side with its baseline."""

    key: str
    title: str
    unit: str
    value: float
    baseline: float
    baseline_label: str
    #: "max_ratio" (value/baseline <= target), "min_ratio" (value/baseline >= target),
    #: "min_value" (value >= target), "max_value" (value <= target) or "" (reported).
    target_kind: str = ""
    target: float | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("inf")

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.target_kind == "max_ratio":
            return self.ratio <= self.target
        if self.target_kind == "min_ratio":
            return self.ratio >= self.target
        if self.target_kind == "min_value":
            return self.value >= self.target
        if self.target_kind == "max_value":
            return self.value <= self.target
        raise ValueError(self.target_kind)

    def target_text(self) -> str:
        if self.target is None:
            return "(report)"
        if self.target_kind == "max_ratio":
            return f"<= {self.target:g}x"
        if self.target_kind == "min_ratio":
            return f">= {self.target:g}x"
        if self.target_kind == "min_value":
            return f">= {self.target:,.0f} {self.unit}"
        return f"<= {self.target:,.0f} {self.unit}"

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["met"] = self.met
        return data


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median, lowest and highest of several runs."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return median, ordered[0], ordered[-1]


#: The load drivers' client side runs here; the server subprocess is pinned to CPU 0.
CLIENT_CPU_SET = {1}
