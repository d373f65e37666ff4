"""What client and server connections share: framing in, framing out, the event queue.

Theory of operation: ``receive_data`` only buffers. ``next_event`` returns a
queued event if there is one; otherwise it parses one whole frame from the
buffer (checking the header, and so the length limit, before waiting for the
payload), hands it to the role's ``_handle_frame`` and looks again. When the
buffer holds no whole frame it returns ``NEED_DATA``. ``data_to_send`` drains
what the handlers queued. Broken framing ends the connection (a GOAWAY is
queued and a ``ConnectionFailed`` event reported); faults inside one session
end that session only.
"""

from __future__ import annotations

from collections import deque

from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ._events import NEED_DATA, ConnectionFailed, Event, NeedData
from ._messages import Abort, GoAway, printable_reason
from ._wire import DEFAULT_MAX_PAYLOAD, HEADER_SIZE, Frame, FrameType, decode_header_from, encode_header

__all__ = ["ConnectionBase"]

#: (read once: an attribute of an Enum class costs a slow hook on Python 3.11, see _server)
_GOAWAY = FrameType.GOAWAY


class ConnectionBase:
    """Framing, output buffer and event queue. Subclasses implement ``_handle_frame``."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        if max_payload < 1024:
            raise ValueError("max_payload must be at least 1024 bytes")
        self.max_payload = max_payload
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._events: deque[Event] = deque()
        self._eof = False
        #: Set once the connection is unusable; further input is ignored.
        self.failed: ConnectionFailed | None = None

    # ------------------------------------------------------------ public API

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the transport; ``b""`` means the peer closed it."""
        if self._eof:
            raise LocalProtocolError("receive_data after end of stream")
        if not data:
            self._eof = True
            return
        if self.failed is None:
            self._inbox += data

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA when no whole frame is buffered."""
        while not self._events:
            if self.failed is not None:
                return NEED_DATA
            frame = self._next_frame()
            if frame is None:
                if self._eof and self.failed is None:
                    self.connection_lost()
                if self._events:
                    break
                return NEED_DATA
            self._dispatch(frame)
        return self._events.popleft()

    def data_to_send(self) -> bytes:
        """Everything queued for the transport (empty if nothing)."""
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    @property
    def pending_output(self) -> int:
        """Bytes waiting in ``data_to_send`` (for backpressure)."""
        return len(self._outbox)

    @property
    def pending_input(self) -> int:
        """Bytes received and not yet handled: whole frames a caller left for later (it
        stopped calling ``next_event``), and the start of the next frame (for backpressure)."""
        return len(self._inbox)

    def _whole_frame_buffered(self) -> bool:
        """Whether the buffered input starts with a whole frame (by its header's length)."""
        inbox = self._inbox
        return len(inbox) >= HEADER_SIZE and len(inbox) >= HEADER_SIZE + int.from_bytes(inbox[6:10], "big")

    def connection_lost(self) -> None:
        """The transport is gone. Established sessions detach; the others end."""
        raise NotImplementedError

    def close(self, reason: str = "closing") -> None:
        """End the connection on purpose: queue GOAWAY(OK) for the peer, then behave as
        on connection loss (established request sessions stay resumable elsewhere)."""
        if self.failed is None:
            self._fail_connection(ErrorCode.OK, reason, remote=False)

    # ------------------------------------------------------------- internals

    def _next_frame(self) -> Frame | None:
        inbox = self._inbox
        if len(inbox) < HEADER_SIZE:
            return None
        try:
            frame_type, session_id, length = decode_header_from(inbox, self.max_payload)
        except RemoteProtocolError as exc:
            self._fail_connection(exc.code, str(exc), remote=True)
            return None
        end = HEADER_SIZE + length
        if len(inbox) < end:
            return None
        view = memoryview(inbox)  # one copy of the payload, not two
        try:
            payload = bytes(view[HEADER_SIZE:end])
        finally:
            view.release()  # (before the del below, which a live view would refuse)
        del inbox[:end]
        return Frame(frame_type, session_id, payload)

    def _dispatch(self, frame: Frame) -> None:
        if frame.type is _GOAWAY:
            try:
                if frame.session_id != 0:
                    raise RemoteProtocolError("GOAWAY on a session id")
                goaway = GoAway.decode(frame.payload)
            except RemoteProtocolError as exc:
                self._fail_connection(exc.code, str(exc), remote=True)
                return
            self._fail_connection(
                goaway.code, f"peer sent GOAWAY: {goaway.reason}", remote=True, send_goaway=False
            )
            return
        if frame.session_id == 0:
            self._fail_connection(ErrorCode.BAD_SESSION_ID, f"{frame.type.name} on session id 0", remote=True)
            return
        self._handle_frame(frame)

    def _handle_frame(self, frame: Frame) -> None:
        raise NotImplementedError

    def _on_connection_failed(self) -> None:
        """Role hook: detach or end the sessions when the connection fails."""
        raise NotImplementedError

    def _send(self, frame_type: FrameType, session_id: int, payload: bytes) -> None:
        outbox = self._outbox
        outbox += encode_header(frame_type, session_id, len(payload))
        outbox += payload

    def _send_abort(self, session_id: int, code: ErrorCode, reason: str) -> None:
        self._send(FrameType.ABORT, session_id, Abort(code, printable_reason(reason)).encode())

    def _fail_connection(
        self, code: ErrorCode, reason: str, *, remote: bool, send_goaway: bool = True
    ) -> None:
        if self.failed is not None:
            return
        if send_goaway:
            self._send(FrameType.GOAWAY, 0, GoAway(code, printable_reason(reason)).encode())
        self.failed = ConnectionFailed(code, reason, remote)
        self._inbox.clear()
        self._events.append(self.failed)
        self._on_connection_failed()
