"""An in-memory anyio byte stream pair: the high-level client and server drivers over no sockets."""

from __future__ import annotations

import anyio
from anyio.abc import ByteStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["MemoryByteStream", "memory_stream_pair"]


class MemoryByteStream(ByteStream):
    """One end of an in-memory byte pipe (bounded: ``send`` waits while the peer lags)."""

    def __init__(
        self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]
    ) -> None:
        self._send = send
        self._receive = receive
        self._buffer = b""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._buffer:
            self._buffer = await self._receive.receive()
        data, self._buffer = self._buffer[:max_bytes], self._buffer[max_bytes:]
        return data

    async def send(self, item: bytes) -> None:
        if item:
            await self._send.send(bytes(item))

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def memory_stream_pair(buffer: int = 64) -> tuple[MemoryByteStream, MemoryByteStream]:
    """Two connected byte streams (client end, server end)."""
    a_send, b_receive = anyio.create_memory_object_stream[bytes](buffer)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](buffer)
    return MemoryByteStream(a_send, a_receive), MemoryByteStream(b_send, b_receive)
