"""The short CI variant of the load test (tests/system/load.py; ``make load`` runs the long one).

4 clients x 40 operations per backend against a server process on that backend:
zero errors, every answer checked against the client's model, nothing logged at
ERROR, server RSS flat after warm-up (20% + 5 MiB; see ``load.MemoryCheck``).
"""

from __future__ import annotations

import os

import pytest

from .load import run_load

#: Loaded into the server process only (PYTHONPATH): every read of the server's TLS stream
#: (anyio's, or on asyncio the server's own FastTLSStream, whose records mostly reach the
#: driver as they arrive, not through receive()) is kept forever, padded to 256 KiB, so
#: memory grows with the traffic: a leak.
_LEAK = """
from anyio.streams.tls import TLSStream
from keymgmt.adapters.server.tlsfast import FastTLSStream

_kept = []


def keep(data):
    _kept.append((bytes(data) or b"x") * max(1, 262144 // max(1, len(data))))


original_receive = TLSStream.receive


async def receive(self, max_bytes=65536):
    data = await original_receive(self, max_bytes)
    keep(data)
    return data


original_decrypt = FastTLSStream._decrypt


def decrypt(self, max_bytes):
    data = original_decrypt(self, max_bytes)
    if data:
        keep(data)
    return data


TLSStream.receive = receive
FastTLSStream._decrypt = decrypt
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_load_short(backend, tmp_path):
    report = run_load(backend, clients=4, requests=40, session_ops=15, time_limit=60, workdir=tmp_path)
    print(report.summary())
    assert not report.errors, report.errors[:10]
    assert report.operations == 4 * 40
    assert report.memory_flat, report.summary()
    assert report.passed


def test_the_memory_check_catches_a_leaking_server(tmp_path):
    """Mutation check of the harness: a server that keeps 256 KiB per received TLS record fails."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_LEAK)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    report = run_load(
        "asyncio", clients=4, requests=40, session_ops=15, time_limit=60, server_env=env, workdir=tmp_path
    )
    print(report.summary())
    assert not report.errors, report.errors[:10]  # it still answers correctly...
    assert not report.memory_flat, report.summary()  # ...but its memory grows
