"""`make demo`: the whole flow on embedded defaults, printing each step.

A key server over a fresh SQLite file in a temporary directory, and a client
talking to it over an in-memory byte stream (the network issue replaces the
stream with TLS 1.3 on loopback). Exits 0 only if every step checks out.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anyio

from keymgmt_proto import AuditType, Context, ServerSetup, SessionRegistry

from .client import AuthenticationError, KeymgmtClient, audit_to_json
from .keyserver import KeyServer
from .localstore import LocalStore
from .serve import serve_stream
from .setupfile import create_server_setup_file, load_server_setup_file
from .sqlite_store import SQLiteStorage
from .streams import memory_stream_pair

__all__ = ["main"]

ACCOUNT = b"alice@example.org"
PASSWORD = b"correct horse battery staple"


async def _run(workdir: Path) -> bool:
    say = print
    create_server_setup_file(workdir / "server_setup.bin")
    setup: ServerSetup = load_server_setup_file(workdir / "server_setup.bin")
    storage = SQLiteStorage(workdir / "keyserver.db")
    say(f"key server: OPAQUE setup and SQLite database in {workdir}")
    ok = True
    async with anyio.create_task_group() as tg:
        client_end, server_end = memory_stream_pair()
        tg.start_soon(serve_stream, server_end, setup, KeyServer(storage), SessionRegistry())
        local = LocalStore(workdir / "client.db")
        async with KeymgmtClient(client_end, local_store=local) as client:
            user_id = await client.register(ACCOUNT, PASSWORD)
            say(f"1. registered {ACCOUNT.decode()}: user_id {user_id.hex()}")
            try:
                await client.login(ACCOUNT, b"wrong password")
                ok = False
            except AuthenticationError as exc:
                say(f"2. wrong password refused: {exc}")
            session = await client.login(ACCOUNT, PASSWORD)
            say(f"3. logged in (OPAQUE), user_id matches: {session.user_id == user_id}")
            ok &= session.user_id == user_id
            generated = await session.generate()
            say(f"4. generated a 32-byte secret: key id {generated.hex()}")
            imported = await session.import_secret(bytes([12]) + b"my seed word")
            say(f"5. imported a 12-byte secret: key id {imported.hex()}")
            local.delete(user_id, generated)  # so the next retrieve goes to the server
            null = await session.retrieve(generated, Context.NULL)
            secret = await session.retrieve(generated, Context.LOCAL_ONLY)
            exported = await session.retrieve(imported, Context.EXPORT)
            say(
                f"6. retrieve: NULL -> {null!r}; LOCAL_ONLY -> {len(secret or b'')} bytes; "
                f"EXPORT -> {exported!r}"
            )
            ok &= null is None and secret is not None and len(secret) == 32
            ok &= exported == bytes([12]) + b"my seed word"
            listed = await session.list_keys()
            say(f"7. list: {', '.join(f'{k.key_id.hex()[:8]}... ({k.kind.name.lower()})' for k in listed)}")
            await session.delete(generated)
            say(f"8. deleted {generated.hex()[:8]}...; {len(await session.list_keys())} key left")
            entries = await session.audit(AuditType.ALL)
            say(f"9. audit log ({len(entries)} entries):")
            for entry in entries:
                key = entry.key_id.hex()[:8] + "..." if entry.key_id else ""
                context = entry.context.name.lower() if entry.context is not None else ""
                say(
                    f"   {entry.entry_id:3d} {entry.action.name.lower():22s} {entry.outcome.name.lower():8s} "
                    f"{key:11s} {context}"
                )
            (workdir / "audit.json").write_text(audit_to_json(entries))
            say(f"   exported as JSON to {workdir / 'audit.json'}")
            await session.logout()
            say("10. logged out")
        tg.cancel_scope.cancel()
    storage.close()
    return ok


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="keymgmt-demo-") as workdir:
        ok = anyio.run(_run, Path(workdir))
    print("demo finished: OK" if ok else "demo finished: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
