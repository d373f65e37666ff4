"""Review of issue 16's credentials version (protocol.md 12.13, *Sessions on other instances*),
attacked with two real ``keymgmt-server serve`` processes on one database (one SQLite file;
one PostgreSQL schema) over real TLS 1.3 on loopback: sessions logged in on instance B with
the old password drive their own frames after the owner changed the password (or deleted the
account) through instance A. Whatever they send, they get no answer and their session ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteStream

from keymgmt.adapters.client.async_client import KeymgmtClient
from keymgmt.adapters.client.connect import tls_connector
from keymgmt_proto import (
    NEED_DATA,
    Action,
    AuditType,
    ClientConnection,
    ErrorCode,
    Event,
    Op,
    Outcome,
    ResponseReceived,
    SessionClosed,
    SessionFailed,
)

from ..support.net_world import raw_login, tls_from
from ..support.pg import schema_fixture
from ..support.server_proc import ServerProcess, init_server_dir

# The event loop is not what is attacked here (the servers are processes of their own).
pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

OLD, NEW = b"correct horse battery staple", b"a new and long password"


@pytest.fixture(params=["sqlite", "postgres"])
def instances(request, tmp_path) -> Iterator[tuple[ServerProcess, ServerProcess, Path]]:
    """Instances A and B (one server directory: the same OPAQUE setup, certificate and, for
    SQLite, database file; or one PostgreSQL schema) and the CA to trust."""
    directory = init_server_dir(tmp_path / "srv")
    env: dict[str, str] = {}
    fixture = None
    if request.param == "postgres":
        fixture = schema_fixture()
        conninfo, schema = next(fixture)
        env = {"KEYMGMT_DATABASE_URL": conninfo, "KEYMGMT_DATABASE_SCHEMA": schema}
    first = ServerProcess(directory, env=env)
    second = ServerProcess(directory, env=env)
    try:
        yield first, second, directory / "ca.pem"
    finally:
        for process in (first, second):
            process.stop()
        if fixture is not None:
            next(fixture, None)


async def _exchange(stream: ByteStream, conn: ClientConnection, session_id: int, body: bytes) -> list[Event]:
    """Send one request body as the bare core would; the events until its answer or the
    session's end (at most 5 s)."""
    conn.send_request(session_id, body)
    await stream.send(conn.data_to_send())
    events: list[Event] = []
    with anyio.move_on_after(5):
        while not any(isinstance(e, ResponseReceived | SessionClosed | SessionFailed) for e in events):
            conn.receive_data(await stream.receive())
            while (event := conn.next_event()) is not NEED_DATA:
                assert isinstance(event, Event)
                events.append(event)
    return events


def _ended_unanswered(events: list[Event], session_id: int) -> None:
    assert not [e for e in events if isinstance(e, ResponseReceived)], events
    assert [(e.session_id, e.code) for e in events if isinstance(e, SessionClosed)] == [
        (session_id, ErrorCode.NOT_AUTHORIZED)
    ], events


#: Bodies that do not parse: a truncated LIST_KEYS, a RETRIEVE without its key id, an unknown op.
_MALFORMED = [bytes([Op.LIST_KEYS]) + b"\x01", bytes([Op.RETRIEVE]) + b"\x02" * 16, b"\xee"]


async def test_a_malformed_request_of_a_stale_session_ends_it(instances):
    """A body that does not parse was answered INVALID without the check: a session of the old
    password went on (each such request kept it alive) and wrote failure entries into the
    owner's log, one per request; after a deletion it was answered too. Now it ends like any
    other request of such a session: no answer, CLOSE(NOT_AUTHORIZED), one failure entry."""
    first, second, ca = instances
    connect = tls_connector("127.0.0.1", first.port, cafile=ca, server_hostname="localhost")
    async with KeymgmtClient(connect) as owners:
        streams = []
        for name in (b"alice@example.org", b"bob@example.org"):
            await owners.register(name, OLD)
            stale = []  # on B, with the old password, before the change (deletion) on A
            for _ in _MALFORMED:
                stream = await tls_from(second.port, ca)
                streams.append(stream)
                stale.append((stream, *await raw_login(stream, name, OLD)))
            owner = await owners.login(name, OLD)
            if name.startswith(b"alice"):
                await owner.change_password(NEW)
            else:
                await owner.delete_account()
            for (stream, conn, session_id), body in zip(stale, _MALFORMED, strict=True):
                _ended_unanswered(await _exchange(stream, conn, session_id, body), session_id)
            if name.startswith(b"alice"):
                entries = await owner.audit(AuditType.ALL)
                after = entries[[e.action for e in entries].index(Action.CHANGE_PASSWORD) + 1 :]
                assert [e.outcome for e in after] == [Outcome.FAILURE] * len(_MALFORMED)
        for stream in streams:
            await stream.aclose()
