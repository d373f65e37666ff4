"""Fuzz a ClientConnection fed arbitrary bytes.

Input: the byte stream a server sends. The client has two sessions open, as
after ``open_registration`` (session 1, awaiting REG_RESPONSE) and
``open_request_session`` (session 2, awaiting LOGIN_RESPONSE), so frames for
them reach the session state machine and the OPAQUE client steps (``drain`` runs
each ``OpaqueStepRequired`` inline, as an adapter would) rather than stopping at
"never opened". The opened client is built once and deep-copied
per input (its OPAQUE state is plain bytes), so every input starts from the
same state. After the bytes comes the end of the stream.

The rule: the connection never raises (peer faults are events), whatever it
sends is well-formed and bounded by the input, and its buffers stay bounded.
"""

from __future__ import annotations

import functools

from keymgmt_proto import HEADER_SIZE, ClientConnection

from ._common import check_bounded, check_output, clone, det_random, drain, main

ACCOUNT = b"alice@example.org"
PASSWORD = b"correct horse battery staple"
MAX_PAYLOAD = 4096
REGISTRATION_SESSION = 1
LOGIN_SESSION = 2


@functools.cache
def opened_client() -> ClientConnection:
    client = ClientConnection(det_random, max_payload=MAX_PAYLOAD, max_requests_in_flight=4)
    if client.open_registration(ACCOUNT, PASSWORD) != REGISTRATION_SESSION:
        raise RuntimeError("fuzz setup: unexpected registration session id")
    if client.open_request_session(ACCOUNT, PASSWORD) != LOGIN_SESSION:
        raise RuntimeError("fuzz setup: unexpected login session id")
    client.data_to_send()
    return client


def test_one_input(data: bytes) -> None:
    client = clone(opened_client())
    det_random.reset()
    events = 3 * (len(data) // HEADER_SIZE + 1) + 8
    output = 32 * len(data) + 1024

    if data:
        client.receive_data(data)
    drain(client, None, events)
    check_bounded(client)
    check_output(client.data_to_send(), budget=output)

    client.receive_data(b"")
    drain(client, None, events)
    check_bounded(client)
    check_output(client.data_to_send(), budget=output)
    client.take_detached_sessions()


if __name__ == "__main__":
    main(test_one_input)
