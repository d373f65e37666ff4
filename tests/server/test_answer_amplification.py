"""A few bytes of requests can ask for megabytes of answers: a RETRIEVE of a 64 KiB secret is a
72-byte frame and its answer about 65,700 bytes. The server answers every request of a batch
at once, so without a bound one batch of pipelined RETRIEVEs (a few hundred KiB of input,
across a few sessions) queued hundreds of megabytes of output for one connection; a peer
that then read slowly kept them in the server's memory, and a few such connections ended the
process (1.2 GB of RSS from one connection and 345 KB of requests, measured). The driver now
stops taking frames once ``max_output`` bytes wait to be sent, sends them, and goes on with
the rest without waiting for more input; what it leaves in the core counts against
``max_unprocessed``, so the reader takes in no more meanwhile.

The real process, over TLS (the batched path), is attacked in
tests/system/test_flood.py::test_pipelined_retrieves_of_a_big_secret_leave_memory_bounded."""

from __future__ import annotations

import os

import anyio
import pytest

from keymgmt.adapters.server.driver import ConnectionDriver
from keymgmt.adapters.testing.streams import MemoryByteStream, memory_stream_pair
from keymgmt_proto import NEED_DATA, Context, ResponseReceived, RetrieveRequest

from ..support.helpers import PASSWORD
from ..support.keyserver_world import SETUP, key_server
from ..support.net_world import raw_login

ACCOUNT = b"pipeline@example.org"
#: The long portable form of a 64 KiB secret (protocol.md section 12.7).
BIG = b"\x00\x01" + (65536).to_bytes(4, "big") + os.urandom(65536)
COUNT = 300  # about 21 KB of requests for about 20 MB of answers


class _Recording(MemoryByteStream):
    """The server's end of the pipe, noting the largest single send."""

    def __init__(self, end: MemoryByteStream) -> None:
        super().__init__(end._send, end._receive)
        self.largest = 0

    async def send(self, item: bytes) -> None:
        self.largest = max(self.largest, len(item))
        await super().send(item)


@pytest.mark.anyio
async def test_pipelined_big_answers_go_out_a_bounded_amount_at_a_time(tmp_path):
    max_output, max_unprocessed, receive_size = 200_000, 4096, 1024
    async with key_server(tmp_path) as world:
        async with world.client() as client:
            user_id = await client.register(ACCOUNT, PASSWORD)
            session = await client.login(ACCOUNT, PASSWORD)
            key_id = await session.import_secret(BIG)
            await session.logout()
        client_end, server_end = memory_stream_pair(buffer=2)
        recording = _Recording(server_end)
        driver = ConnectionDriver(
            recording,
            SETUP,
            world.keyserver,
            world.registry,
            max_output=max_output,
            max_unprocessed=max_unprocessed,
            receive_size=receive_size,
        )
        world.task_group.start_soon(driver.run)
        conn, sid = await raw_login(client_end, ACCOUNT, PASSWORD)
        conn.max_requests_in_flight = COUNT
        body = RetrieveRequest(user_id, key_id, Context.LOCAL_ONLY).encode()
        for _ in range(COUNT):
            conn.send_request(sid, body)
        requests = conn.data_to_send()
        assert len(requests) == 72 * COUNT
        await client_end.send(requests)  # and nothing more: the server goes on by itself
        answered, held = 0, 0
        with anyio.fail_after(60):
            while answered < COUNT:
                conn.receive_data(await client_end.receive())
                held = max(held, driver.conn.pending_input)
                while (event := conn.next_event()) is not NEED_DATA:
                    assert isinstance(event, ResponseReceived), event
                    assert event.body[:2] == b"\x00\x02"  # OK, an imported secret
                    answered += 1
        # One send holds at most max_output bytes and the answer that passed it.
        assert recording.largest <= max_output + 66_000, recording.largest
        # Frames left for later count against max_unprocessed: the reader waited for room.
        assert held <= max_unprocessed + receive_size, held
        await client_end.aclose()
