"""A thinner TLS stream for the key server on asyncio, taken over after the handshake.

anyio's ``TLSStream`` over its asyncio ``SocketStream`` returns one TLS record per
``receive()``; each receive first raises ``SSLWantReadError``, resumes and pauses the
transport's reading (an epoll change each time) and waits on an event, and each send
waits until the socket took every byte, then yields once more. At many connections of a
few sessions each, that is paid for every few requests (issue 14). :class:`FastTLSStream`
keeps the ``SSLObject`` and the asyncio transport that anyio's handshake produced and
talks to them directly: the transport keeps reading into the ``SSLObject``'s incoming
memory BIO (paused only while too much waits), a ``receive()`` returns every record
decrypted so far at once, and a ``send()`` hands the records to the transport and
waits only while its buffer is above a high-water mark.

What the TLS layer writes by itself while it reads (OpenSSL's answer to each KeyUpdate
that asks for one: a record out per record in) goes to the transport too, but a peer that
reads nothing must not make it pile up there: once the transport holds more than its
high-water mark after such a write, the stream stops reading (and decrypting) until the
peer has taken enough of it (``resume_writing``). An honest peer reads what it is sent.

A record that decrypts to fewer than ``SMALL_PIECE_SIZE`` bytes is still one unit of
the connection's budget for unproductive input: like a WebSocket, this stream counts its
records and tells ``on_small_input`` (the driver), since one receive may carry many. That
includes the records that decrypt to nothing at all (a KeyUpdate, an empty record, which
OpenSSL handles inside a read): the stream counts every record as its header arrives, and
each that decrypted to ``SMALL_PIECE_SIZE`` bytes or more is given back.

This reads private attributes of anyio (``TLSStream._ssl_object``, ``_read_bio``,
``_write_bio``; the asyncio ``SocketStream._transport`` and ``_protocol``).
:func:`take_over` returns None whenever they are not what it expects (trio, another
anyio version): the caller then keeps anyio's stream, which is always correct.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from anyio.abc import ByteStream
from anyio.streams.tls import TLSStream

from keymgmt_proto import SMALL_PIECE_SIZE

from ..tls import TLSRecordCounter

__all__ = ["FastTLSStream", "take_over"]

#: Largest plaintext of one TLS record: each ``SSLObject.read`` asks for a whole record.
_RECORD = 16384
#: Received ciphertext waiting to be decrypted above which the transport stops reading.
_READ_LIMIT = 4 * 65536
#: Bytes the transport may hold unsent before ``send()`` waits for the peer to take them.
_WRITE_HIGH = 65536
#: Records not decrypted yet that a receive may charge ahead without looking which they are
#: (a few units of the budget, given back as they decrypt).
_CHARGE_AHEAD = 64


class FastTLSStream(ByteStream, asyncio.Protocol):
    """TLS over an asyncio transport whose handshake anyio did (see the module docstring);
    the transport's protocol once made (:func:`take_over`)."""

    def __init__(self, tls: TLSStream, transport: asyncio.Transport) -> None:
        self._tls = tls  # for its extra attributes only
        self._ssl: ssl.SSLObject = tls._ssl_object
        self._incoming: ssl.MemoryBIO = tls._read_bio
        self._outgoing: ssl.MemoryBIO = tls._write_bio
        self._transport = transport
        self._leftover = b""
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        #: The TLS layer's own output (KeyUpdate answers) found the transport above its
        #: high-water mark: nothing more is read or decrypted until it drains.
        self._held_for_output = False
        #: The records received, for the budget for unproductive input.
        self.records = TLSRecordCounter(SMALL_PIECE_SIZE)
        self._eof = False  # no more ciphertext will come
        self._connection_lost = False
        self._failure: BaseException | None = None  # the transport's
        self._bad_record: ssl.SSLError | None = None  # the TLS layer's: nothing more is read
        self._closed = False
        self._halted = False
        #: What the consumer raised from data_received (receive() raises it).
        self._consumer_failure: Exception | None = None
        #: Told how many small records arrived in one receive (see the module docstring);
        #: True from it means the connection is ending: nothing more is read.
        self.on_small_input: Callable[[int], bool] | None = None
        #: While a ``receive()`` waits, the records that arrive are decrypted at once (up to
        #: ``consumer_size`` bytes) and handed to this instead of waking the receiver (the
        #: driver's batched path: no task wake-up per arrival). Whatever else happens (the
        #: end, a broken record, more than it took) still wakes the receiver.
        self.consumer: Callable[[bytes], None] | None = None
        self.consumer_size = 65536

    # ------------------------------------------------------------------ asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        self.records.note(data)
        if self._incoming.pending > _READ_LIMIT and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        consumer, waiter = self.consumer, self._waiter
        if consumer is not None and waiter is not None and not waiter.done() and not self._halted:
            try:
                records = self._decrypt(self.consumer_size)
                if records:
                    consumer(records)
            except Exception as exc:
                # The driver's (or the core's) bug, raised in asyncio's callback: asyncio
                # would close the transport and the driver see only a broken stream. Nothing
                # more is handed over; receive() raises it, a fault like any other.
                self.consumer = None
                self._consumer_failure = exc
                self._wake()
                return
            # A decrypt that stopped at consumer_size may leave whole records in the BIO with
            # no more data to come (the peer waits for an answer): the receiver takes them.
            if len(records) < self.consumer_size and not (
                self._leftover or self._bad_record or self._eof or self._failure or self._halted
            ):
                return  # (all taken, or a record not yet whole: the receiver sleeps on)
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._incoming.write_eof()
        self._wake()
        return True  # (as anyio's protocol: the transport stays open for our last words)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection_lost = True
        self._held_for_output = False  # (nothing more goes out: what came in may be decrypted)
        if not self._eof:
            self._eof = True
            self._incoming.write_eof()
        if exc is not None and self._failure is None:
            self._failure = exc
        self._wake()
        for future in (self._drained, self._lost):
            if future is not None and not future.done():
                future.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._held_for_output:
            self._held_for_output = False
            self._resume_reading()
            self._wake()  # (the receiver decrypts what waits)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ------------------------------------------------------------------ ByteStream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be a positive integer")
        while True:
            if self._halted:  # its budget for unproductive input ran out: the caller ends it
                await anyio.sleep_forever()
            if self._closed:
                raise anyio.ClosedResourceError
            if self._consumer_failure is not None:
                raise self._consumer_failure
            data = self._decrypt(max_bytes)
            if data:
                return data
            if self._bad_record is not None:
                raise anyio.BrokenResourceError from self._bad_record
            if self._failure is not None:
                raise anyio.BrokenResourceError from self._failure
            if self._eof and not self._incoming.pending:
                raise anyio.EndOfStream
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _decrypt(self, max_bytes: int) -> bytes:
        """Every whole record decrypted so far (up to ``max_bytes``; the rest is kept)."""
        pieces = [self._leftover] if self._leftover else []
        size = len(self._leftover)
        incoming, tls, records = self._incoming, self._ssl, self.records
        whole = False  # a record was just read whole here: what the BIO holds starts a record
        while size < max_bytes and self._bad_record is None and not self._held_for_output:
            whole = False
            if not incoming.pending and not incoming.eof and not tls.pending():
                break  # (what read() would say by raising SSLWantReadError, for less)
            try:
                piece = tls.read(_RECORD)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or EOF: the end
                self._eof = True
                break
            except ssl.SSLError as exc:  # a forged or broken record: the stream is broken
                self._bad_record = exc
                break
            if not piece:
                self._eof = True
                break
            pieces.append(piece)
            size += len(piece)
            records.piece(len(piece))
            whole = True
        if self._outgoing.pending and not self._transport.is_closing():
            self._transport.write(self._outgoing.read())  # e.g. a KeyUpdate's answer
            if self._writing_paused:  # the peer does not take what its own records make us write
                self._held_for_output = True
                if not self._reading_paused and not self._connection_lost:
                    self._reading_paused = True
                    self._transport.pause_reading()
        self._resume_reading()
        waiting = 0
        if (
            whole
            and incoming.pending
            and not self._eof
            and records.records - records.big - records.charged > _CHARGE_AHEAD
        ):
            # Whole records this receive left to the next (OpenSSL reads one at a time, so
            # they start on a boundary): charged once decrypted, not ahead, or an honest
            # client's pipelined small records (up to _READ_LIMIT of them) would pay for
            # far more than max_bytes before its frames give anything back. (Only when
            # that many may wait: big records, a 64 KiB secret's, are not copied for it.)
            tail = incoming.read()
            incoming.write(tail)
            waiting = TLSRecordCounter.count(tail)
        small = records.owed(waiting)  # (the records that carried little or nothing)
        if small and self.on_small_input is not None and self.on_small_input(small):
            self._halted = True  # nothing more is read (the connection ends)
            if not self._reading_paused and not self._connection_lost:
                self._reading_paused = True
                self._transport.pause_reading()
        data = b"".join(pieces)
        self._leftover = data[max_bytes:]
        return data[:max_bytes]

    def _resume_reading(self) -> None:
        """Read from the transport again if it was paused and nothing holds it any more."""
        if (
            self._reading_paused
            and self._incoming.pending <= _READ_LIMIT
            and not self._connection_lost
            and not self._halted
            and not self._held_for_output
        ):
            self._reading_paused = False
            self._transport.resume_reading()

    async def send(self, item: bytes) -> None:
        if not self.send_nowait(item):
            await self.drain()

    def send_nowait(self, item: bytes) -> bool:
        """Hand ``item`` to the transport; False if it now holds more than its high-water
        mark: the caller then waits for :meth:`drain` (under its own timeout)."""
        if self._closed:
            raise anyio.ClosedResourceError
        if self._connection_lost or self._transport.is_closing():
            raise anyio.BrokenResourceError
        try:
            self._ssl.write(item)
        except ssl.SSLError as exc:
            raise anyio.BrokenResourceError from exc
        self._transport.write(self._outgoing.read())
        return not self._writing_paused

    async def drain(self) -> None:
        """Wait until the transport holds less than its low-water mark."""
        while self._writing_paused and not self._connection_lost:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None
        if self._connection_lost:
            raise anyio.BrokenResourceError

    async def send_eof(self) -> None:
        raise NotImplementedError("send_eof() is not implemented for TLS streams")

    async def aclose(self) -> None:
        """Close: what the transport still holds is sent first (bounded by the caller's
        cancel scope; :func:`anyio.aclose_forcefully` drops it at once)."""
        self._closed = True
        self._wake()
        transport = self._transport
        if self._connection_lost:
            return
        if not transport.get_write_buffer_size():
            transport.abort()
            return
        self._lost = asyncio.get_running_loop().create_future()
        transport.close()  # sends what it holds, then closes
        try:
            await self._lost
        finally:
            if not self._connection_lost:
                transport.abort()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._tls.extra_attributes


def take_over(tls: TLSStream) -> FastTLSStream | None:
    """A :class:`FastTLSStream` in place of ``tls`` (whose handshake is done, and which must
    not be used any more), or None if ``tls`` does not run over an asyncio transport as
    this anyio version builds it: then keep using ``tls``."""
    try:
        socket_stream: Any = tls.transport_stream
        socket_stream = getattr(socket_stream, "inner", socket_stream)  # runtime's _CountingStream
        transport = socket_stream._transport
        old = socket_stream._protocol
        queue = old.read_queue
        at_eof = bool(old.is_at_eof)
        failure = old.exception
        if not (
            isinstance(transport, asyncio.Transport)
            and isinstance(tls._ssl_object, ssl.SSLObject)
            and isinstance(tls._read_bio, ssl.MemoryBIO)
            and isinstance(tls._write_bio, ssl.MemoryBIO)
            and not tls._broken
            and not transport.is_closing()
            and isinstance(transport.get_protocol(), type(old))
        ):
            return None
    except AttributeError:
        return None
    stream = FastTLSStream(tls, transport)
    transport.set_protocol(stream)
    # Records that came right behind the handshake: in the BIO (OpenSSL reads a record at a
    # time, so they start on a record boundary), and received but not yet taken by anyio.
    early = stream._incoming.read()
    stream._incoming.write(early)
    stream.records.note(early)
    while queue:
        piece = queue.popleft()
        stream._incoming.write(piece)
        stream.records.note(piece)
    if failure is not None:
        stream._failure = failure
    if at_eof:
        stream._eof = True
        stream._incoming.write_eof()
    transport.set_write_buffer_limits(high=_WRITE_HIGH)
    transport.resume_reading()  # (anyio pauses it between its receives)
    return stream
