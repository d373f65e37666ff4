"""What every harness shares: the rule, deterministic randomness, state cloning,
invariant checks on connections, and the atheris entry point.

Nothing here imports atheris at module level: the corpus replay test
(tests/repo/test_fuzz_smoke.py) runs every harness's ``test_one_input`` without it.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import sys
import types
from collections.abc import Callable, Iterable
from typing import TypeVar

from keymgmt_proto import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    NEED_DATA,
    Channel,
    ClientConnection,
    Event,
    FrameType,
    OpaqueStepRequired,
    RemoteProtocolError,
    ServerConnection,
)
from keymgmt_proto.wire import MESSAGE_TYPES, ResumedEnvelope, ResumeEnvelope, decode_header
from keymgmt_proto.wire import Record as SealedRecord

__all__ = [
    "InvariantViolation",
    "Reader",
    "check_bounded",
    "check_output",
    "clone",
    "det_random",
    "drain",
    "main",
]

T = TypeVar("T")
#: Either role's connection (what the cloning helpers walk).
Connection = ClientConnection | ServerConnection


class InvariantViolation(AssertionError):
    """A harness check failed (a real finding, like an unexpected exception)."""


def violated(message: str) -> InvariantViolation:
    return InvariantViolation(message)


class DetRandom:
    """Deterministic ``random(n)`` for the connections (SHA-256 in counter mode).

    OPAQUE draws its own randomness inside opaque-ke, so runs are not fully
    reproducible byte for byte; everything the core draws through ``random``
    is. ``reset()`` at the start of each input keeps inputs independent.
    """

    def __init__(self, seed: bytes = b"keymgmt fuzz") -> None:
        self._seed = seed
        self._counter = 0

    def reset(self) -> None:
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            self._counter += 1
            out += hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
        return bytes(out[:n])


det_random = DetRandom()


# ------------------------------------------------------------------ cloning


def _channels(conn: Connection) -> Iterable[Channel]:
    sessions: list[object] = list(getattr(conn, "_sessions", {}).values())
    sessions += list(getattr(conn, "_departed", {}).values())
    sessions += list(getattr(conn, "_detached", []))
    registry = getattr(conn, "registry", None)
    if registry is not None:
        sessions += list(registry._sessions.values())
    for session in sessions:
        channel = getattr(session, "channel", None)
        if channel is not None:
            yield channel


def _share_keys(channel: Channel, memo: dict[int, object]) -> None:
    for name in type(channel).__slots__:
        value = getattr(channel, name, None)
        if type(value).__module__.startswith("cryptography"):
            memo[id(value)] = value


def clone(obj: T, *conns: Connection, extra: Iterable[object] = ()) -> T:
    """Deep-copy ``obj`` (a connection, a channel, or a tuple of them).

    The only objects not copied are native ones that hold no mutable state:
    the ChaCha20Poly1305 key objects inside every Channel (``encrypt`` and
    ``decrypt`` take the nonce as an argument) and the OPAQUE ServerSetup (the
    server's long-term secret, read-only). They are shared through the
    deepcopy memo; everything the protocol mutates (sequence numbers, session
    tables, buffers, the registry) is copied.
    """
    memo: dict[int, object] = {}
    for conn in conns:
        for channel in _channels(conn):
            _share_keys(channel, memo)
        setup = getattr(conn, "_setup", None)
        if setup is not None:
            memo[id(setup)] = setup
    for item in extra:
        if isinstance(item, Channel):
            _share_keys(item, memo)
        else:
            memo[id(item)] = item
    return copy.deepcopy(obj, memo)


# ------------------------------------------------------------------ driving


def drain(
    conn: ClientConnection | ServerConnection,
    app: Callable[[ServerConnection, Event], None] | None,
    budget: int,
) -> list[Event]:
    """Take every event (answering server events with ``app``) until NEED_DATA.

    A client's OPAQUE steps run at once, inline, with its suite; the result of a step
    just asked for is always taken (anything else is a finding).
    ``budget`` bounds the number of events: more than that for the input at
    hand is an event storm (a loop in the state machine), reported as a finding.
    """
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        if not isinstance(event, Event):
            raise violated(f"next_event returned {event!r}")
        events.append(event)
        if len(events) > budget:
            raise violated(f"more than {budget} events for this input")
        if (
            isinstance(event, OpaqueStepRequired)
            and isinstance(conn, ClientConnection)
            and not conn.complete_opaque_step(event.run(conn.opaque))
        ):
            raise violated(f"the result of {event!r} was dropped")
        if app is not None and isinstance(conn, ServerConnection):
            app(conn, event)


def check_bounded(conn: ClientConnection | ServerConnection) -> None:
    """Memory guard, checked after ``drain``: nothing a peer controls grows without bound.

    White-box: reads the connection's private buffers and tables.
    """
    inbox = len(conn._inbox)
    if inbox >= HEADER_SIZE + conn.max_payload:
        raise violated(f"inbox holds {inbox} bytes after draining (limit {HEADER_SIZE + conn.max_payload})")
    if conn.failed is not None and inbox:
        raise violated("a failed connection kept input buffered")
    if conn._events:
        raise violated("events left queued after NEED_DATA")
    if isinstance(conn, ServerConnection):
        config = conn.config
        if len(conn._sessions) > config.max_sessions_per_connection:
            raise violated(f"{len(conn._sessions)} live sessions on one connection")
        for session in (
            *conn._sessions.values(),
            *conn._departed.values(),
            *conn.registry._sessions.values(),
        ):
            if len(session.pending) > config.max_requests_in_flight:
                raise violated(f"{len(session.pending)} requests pending in one session")
            if len(session.answered) > config.max_requests_in_flight:
                raise violated(f"reply cache holds {len(session.answered)} answers")
            if session.answered_bytes != sum(len(a) for a in session.answered.values() if a is not None):
                raise violated("the reply cache's byte count is not the bytes it keeps")
            if session.request_count > config.max_requests_per_session:
                raise violated("session carried more requests than allowed")
    else:
        for client_session in (*conn._sessions.values(), *conn._detached):
            if len(client_session.unanswered) > conn.max_requests_in_flight:
                raise violated("client holds more unanswered requests than it may send")


def check_output(data: bytes, *, budget: int) -> None:
    """What a connection sends must be whole, well-formed frames a default peer accepts,
    and bounded by the input that caused it (``budget`` bytes)."""
    if len(data) > budget:
        raise violated(f"{len(data)} bytes of output exceed the budget of {budget}")
    pos = 0
    while pos < len(data):
        header = data[pos : pos + HEADER_SIZE]
        try:
            frame_type, _session_id, length = decode_header(header, DEFAULT_MAX_PAYLOAD)
        except RemoteProtocolError as exc:
            raise violated(f"connection sent a bad frame header: {exc}") from None
        payload = data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]
        if len(payload) != length:
            raise violated("connection sent a truncated frame")
        try:
            if frame_type is FrameType.RESUME:
                ResumeEnvelope.decode(payload)
            elif frame_type is FrameType.RESUMED:
                ResumedEnvelope.decode(payload)
            elif frame_type.sealed:
                SealedRecord.decode(payload)
            else:
                MESSAGE_TYPES[frame_type].decode(payload)
        except RemoteProtocolError as exc:
            raise violated(f"connection sent a malformed {frame_type.name} payload: {exc}") from None
        pos += HEADER_SIZE + length


class Reader:
    """Consumes a harness input field by field; short reads give zeros (never raise)."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    def u8(self) -> int:
        return int.from_bytes(self.take(1).ljust(1, b"\0"), "big")

    def u16(self) -> int:
        return int.from_bytes(self.take(2).ljust(2, b"\0"), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4).ljust(4, b"\0"), "big")


# ------------------------------------------------------------------ atheris


def _instrument() -> None:
    """Instrument the code under test (already imported) for coverage feedback."""
    import atheris

    prefixes = ("keymgmt_proto", "keymgmt.adapters", "fuzz")
    for obj in gc.get_objects():
        if (
            isinstance(obj, types.FunctionType)
            and isinstance(getattr(obj, "__module__", None), str)
            and obj.__module__.startswith(prefixes)
        ):
            atheris.instrument_func(obj)


def main(test_one_input: Callable[[bytes], None]) -> None:
    """libFuzzer entry point: ``python -m fuzz.fuzz_<name> [libFuzzer flags] [corpus dirs]``."""
    import atheris

    _instrument()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
