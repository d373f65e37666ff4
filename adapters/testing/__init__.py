"""Test doubles with no network: a synchronous in-memory client/server pair
(:class:`InMemoryPair`) and anyio byte streams in memory (:func:`memory_stream_pair`)."""

from .memory import Delivery, InMemoryPair, MemoryServerApp
from .streams import MemoryByteStream, memory_stream_pair

__all__ = ["Delivery", "InMemoryPair", "MemoryByteStream", "MemoryServerApp", "memory_stream_pair"]
