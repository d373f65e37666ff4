"""A TLS 1.3 client over a plain socket and memory BIOs, for tests that write records by hand."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from keymgmt.adapters.tls import client_context


def handshake(sock: socket.socket, ca: Path) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """Complete a TLS handshake with the server on ``sock`` (connected): the client's
    SSLObject and its incoming and outgoing BIOs (the caller moves bytes between them and
    the socket from here on)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(ca).wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    sock.sendall(outgoing.read())
    return tls, incoming, outgoing
