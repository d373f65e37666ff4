"""A flood of input that does nothing, sent to a key server from a process of its own (so
it does not share the server's interpreter): tests/system/test_input_flood.py.

    python tests/support/flooder.py --port PORT --ca CA.pem --listener tcp|wss
        --kind KIND [--kind KIND ...] [--source 127.0.0.3] [--bound 5] [--max-seconds 60]

Each ``--kind`` is one loop that opens a connection, floods it as fast as it can, and opens
the next one once the server has cut it, until stdin closes (or ``--max-seconds`` pass):

- ``abort`` (tcp): ABORT frames for a session id never opened (10 bytes each, ignored);
- ``records`` (tcp): ignored ABORT frames of 60,000 bytes, one byte per TLS record (so
  that it is the records, not the frames, that must be paid for);
- ``empty`` (wss): empty binary WebSocket messages (6 bytes each);
- ``ping`` (wss): WebSocket pings.

It prints ``flooding`` once every loop has sent its first bytes, then, when it has stopped,
one JSON line: for each connection, whether the server cut it (its end of the connection
closed), after how many seconds of flooding, the GOAWAY code it sent first (None if none),
the WebSocket close code, and the bytes sent. A connection not cut within ``--bound``
seconds is given up (``cut`` false).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream
from anyio.streams.tls import TLSStream
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request

from keymgmt.adapters.tls import client_context

ORIGIN = "https://app.example.org"
ABORT_TYPE = 0x0F
GOAWAY_TYPE = 0x00
#: An ABORT for session 1 with no payload: a session id never opened, so the server ignores it.
IGNORED = struct.pack(">BBII", 1, ABORT_TYPE, 1, 0)
IGNORED_LARGE = struct.pack(">BBII", 1, ABORT_TYPE, 1, 60000) + bytes(60000)
_MASK = os.urandom(4)
#: An empty binary WebSocket message (masked, as a client's must be) and a ping of one byte.
EMPTY = b"\x82\x80" + _MASK
PING = b"\x89\x81" + _MASK + bytes([ord("x") ^ _MASK[0]])
BLOBS = {"abort": IGNORED * 6000, "empty": EMPTY * 10000, "ping": PING * 8000}


async def _tls(port: int, ca: Path, source: str) -> TLSStream:
    tcp = await anyio.connect_tcp("127.0.0.1", port, local_host=source)
    return await TLSStream.wrap(
        tcp, hostname="localhost", ssl_context=client_context(ca), standard_compatible=False
    )


async def _open(listener: str, port: int, ca: Path, source: str) -> tuple[ByteStream, WSConnection | None]:
    stream = await _tls(port, ca, source)
    if listener == "tcp":
        return stream, None
    ws = WSConnection(ConnectionType.CLIENT)
    request = Request(
        host="localhost",
        target="/keymgmt",
        subprotocols=["keymgmt.v1"],
        extra_headers=[(b"origin", ORIGIN.encode())],
    )
    await stream.send(ws.send(request))
    with anyio.fail_after(10):
        while True:
            ws.receive_data(await stream.receive())
            if any(isinstance(event, AcceptConnection) for event in ws.events()):
                return stream, ws


def _goaway(data: bytes) -> int | None:
    """The code of the first GOAWAY among the whole frames of ``data``."""
    while len(data) >= 10:
        kind, session, length = data[1], struct.unpack(">I", data[2:6])[0], struct.unpack(">I", data[6:10])[0]
        if len(data) < 10 + length:
            return None
        if kind == GOAWAY_TYPE and session == 0 and length >= 2:
            return int(struct.unpack(">H", data[10:12])[0])
        data = data[10 + length :]
    return None


async def _watch(stream: ByteStream, ws: WSConnection | None, record: dict[str, Any]) -> None:
    """Read until the server ends the connection, noting its GOAWAY and close code."""
    received = b""
    while True:
        try:
            data: bytes | None = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return
        if ws is None:
            received += data
        else:
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, BytesMessage):
                    received += event.data
                elif isinstance(event, CloseConnection) and record["close"] is None:
                    record["close"] = event.code
        if record["goaway"] is None:
            record["goaway"] = _goaway(received)


async def _flood(stream: ByteStream, kind: str, record: dict[str, Any], started: anyio.Event) -> None:
    try:
        if kind == "records":
            while True:
                for byte in IGNORED_LARGE:
                    await stream.send(bytes([byte]))
                    record["sent"] += 1
                started.set()
        blob = BLOBS[kind]
        while True:
            await stream.send(blob)
            record["sent"] += len(blob)
            started.set()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
        # The server ended it (a reset, or an orderly close that TLS reports as EndOfStream
        # on a write): the watcher notes when.
        await anyio.sleep_forever()


async def _connection(args: argparse.Namespace, kind: str, started: anyio.Event) -> dict[str, Any]:
    stream, ws = await _open(args.listener, args.port, args.ca, args.source)
    record: dict[str, Any] = {"kind": kind, "cut": False, "seconds": None, "goaway": None, "close": None}
    record["sent"] = 0
    began = time.monotonic()
    with anyio.move_on_after(args.bound):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_flood, stream, kind, record, started)
            await _watch(stream, ws, record)
            record["cut"], record["seconds"] = True, round(time.monotonic() - began, 3)
            tasks.cancel_scope.cancel()
    await anyio.aclose_forcefully(stream)
    return record


async def main(args: argparse.Namespace) -> None:
    stop = anyio.Event()
    records: list[dict[str, Any]] = []
    firsts = [anyio.Event() for _ in args.kind]

    async def loop(kind: str, first: anyio.Event) -> None:
        while not stop.is_set():
            records.append(await _connection(args, kind, first))
            first.set()  # (even if it was cut before a whole blob went out)

    async def stdin_closed() -> None:
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        stop.set()

    async with anyio.create_task_group() as tasks:
        for kind, first in zip(args.kind, firsts, strict=True):
            tasks.start_soon(loop, kind, first)
        for first in firsts:
            await first.wait()
        print("flooding", flush=True)
        watcher = anyio.CancelScope()

        async def until_stop() -> None:
            with watcher:
                await stdin_closed()

        tasks.start_soon(until_stop)
        with anyio.move_on_after(args.max_seconds):
            await stop.wait()
        stop.set()
        watcher.cancel()
    print(json.dumps({"connections": records}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--listener", choices=["tcp", "wss"], required=True)
    kinds = ["abort", "records", "empty", "ping"]
    parser.add_argument("--kind", action="append", choices=kinds, required=True)
    parser.add_argument("--source", default="127.0.0.3")
    parser.add_argument("--bound", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    anyio.run(main, parser.parse_args())
