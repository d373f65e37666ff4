"""`make demo`: the whole flow on embedded defaults, printing each step.

In a temporary directory it runs ``keymgmt-server init`` (OPAQUE setup,
development CA and certificate, config), starts ``keymgmt-server serve`` as a
real process on a free port (SQLite storage), and drives it over TLS 1.3 with
the high-level client: register, a refused wrong password, login, generate,
import, retrieve in each context, export, list, delete, audit, logout. Then it
stops the server with SIGTERM. Exits 0 only if every step checks out.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio

from keymgmt_proto import AuditType, Context

from ..client.async_client import AuthenticationError, Connector, KeymgmtClient, audit_to_json
from ..client.connect import tls_connector
from ..client.localstore import LocalStore

__all__ = ["main"]

ACCOUNT = b"alice@example.org"
PASSWORD = b"correct horse battery staple"


async def _client_flow(connect: Connector, workdir: Path) -> bool:
    say = print
    ok = True
    local = LocalStore(workdir / "client.db")
    try:
        async with KeymgmtClient(connect, local_store=local) as client:
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
            (workdir / "audit.json").write_text(audit_to_json(entries, session.user_id))
            say(f"   exported as JSON to {workdir / 'audit.json'}")
            await session.logout()
            say("10. logged out")
    finally:
        local.close()
    return ok


def _start_server(workdir: Path) -> tuple[subprocess.Popen[str], int]:
    server_cli = [sys.executable, "-m", "keymgmt.adapters.cli.server"]
    subprocess.run(
        [*server_cli, "init", "--dir", str(workdir), "--port", "0"], check=True, stdout=subprocess.DEVNULL
    )
    print(f"key server: `keymgmt-server init` wrote the OPAQUE setup, a dev CA and a config to {workdir}")
    process = subprocess.Popen(
        [*server_cli, "serve", "--config", str(workdir / "keymgmt-server.toml"), "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise SystemExit(f"demo failed: the server did not start ({line.strip()!r})")
    port = int(line.rsplit(":", 1)[1])
    print(f"key server: `keymgmt-server serve` is listening on 127.0.0.1:{port} (TLS 1.3, SQLite)")
    return process, port


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="keymgmt-demo-") as directory:
        workdir = Path(directory)
        process, port = _start_server(workdir)
        try:
            connect = tls_connector("127.0.0.1", port, cafile=workdir / "ca.pem", server_hostname="localhost")
            ok = anyio.run(_client_flow, connect, workdir)
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=30)
        print(f"key server: stopped by SIGTERM, exit code {code}")
        ok = ok and code == 0
    print("demo finished: OK" if ok else "demo finished: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
