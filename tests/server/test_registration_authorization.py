"""REG-5: registration is not a free oracle. A Service Provider may require an invitation,
and registration starts are rate limited per address; refused attempts cost no OPAQUE work
and, without authorization, do not even say whether a name is taken."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import anyio
import pytest

from keymgmt.adapters.client.async_client import KeymgmtClient, RateLimitedError, RegistrationError
from keymgmt.adapters.client.connect import tls_connector
from keymgmt.adapters.server.invitations import InvitationAuthorizer
from keymgmt_proto import ClientConnection, ErrorCode, RealOpaque

from ..support.keyserver_world import SETUP
from ..support.net_world import running_server, tls_from

PW = b"correct horse battery staple"
SERVER_CLI = [sys.executable, "-m", "keymgmt.adapters.cli.server"]


def _flip(token: bytes, index: int) -> bytes:
    return token[:index] + (b"A" if token[index : index + 1] != b"A" else b"B") + token[index + 1 :]


def test_invitations_are_checked_for_signature_expiry_and_name():
    authorizer = InvitationAuthorizer.from_setup(SETUP)
    bound = authorizer.mint(b"alice@example.org", 3600, 1000.0, os.urandom).encode()
    anyone = authorizer.mint(None, 3600, 1000.0, os.urandom).encode()
    assert bound.startswith(b"kmi1.")
    assert authorizer.authorize(b"alice@example.org", bound, 2000.0)
    assert not authorizer.authorize(b"mallory@example.org", bound, 2000.0)  # another name
    assert not authorizer.authorize(b"alice@example.org", bound, 4600.0)  # expired
    assert authorizer.authorize(b"alice@example.org", anyone, 2000.0)
    assert authorizer.authorize(b"bob@example.org", anyone, 2000.0)
    other_server = InvitationAuthorizer(bytes(32))
    assert not other_server.authorize(b"alice@example.org", bound, 2000.0)  # another setup's key
    for forged in (
        b"",
        b"kmi1.",
        b"kmi1.!!!",
        bound[:-2],
        _flip(bound, len(bound) // 2),  # a character in the middle (every bit of it counts)
        _flip(bound, 8),
        b"kmi2." + bound[5:],
        "kmi1.é".encode(),
    ):
        assert not authorizer.authorize(b"alice@example.org", forged, 2000.0), forged
    assert "secret" in repr(authorizer)


@pytest.mark.anyio
async def test_a_server_that_requires_invitations(tmp_path, monkeypatch):
    calls = []
    real_start = RealOpaque.server_registration_start  # the server's default suite

    def counting(self, *args):
        calls.append(args)
        return real_start(self, *args)

    monkeypatch.setattr(RealOpaque, "server_registration_start", counting)
    async with running_server(tmp_path, require_invitation=True) as (runtime, pki):
        authorizer = InvitationAuthorizer.from_setup(runtime.setup)
        connect = tls_connector("127.0.0.1", runtime.port, cafile=pki.ca_cert)
        invitation = authorizer.mint(b"alice@example.org", 600, time.time(), os.urandom)
        async with KeymgmtClient(connect) as client:
            for name in (b"alice@example.org", b"taken-or-not@example.org"):
                with pytest.raises(RegistrationError) as refused:
                    await client.register(name, PW)
                assert refused.value.code is ErrorCode.NOT_AUTHORIZED
            assert calls == []  # refused before any OPAQUE work
            with pytest.raises(RegistrationError) as wrong_name:
                await client.register(b"mallory@example.org", PW, invitation=invitation.encode())
            assert wrong_name.value.code is ErrorCode.NOT_AUTHORIZED
            await client.register(b"alice@example.org", PW, invitation=invitation.encode())
            assert len(calls) == 1
            # Bound to a name, an invitation works once: the name is taken now.
            with pytest.raises(RegistrationError) as again:
                await client.register(b"alice@example.org", PW, invitation=invitation.encode())
            assert again.value.code is ErrorCode.ACCOUNT_EXISTS
            # Without an invitation, a taken name and a free one get the same answer.
            with pytest.raises(RegistrationError) as probe:
                await client.register(b"alice@example.org", PW)
            assert probe.value.code is ErrorCode.NOT_AUTHORIZED
            await (await client.login(b"alice@example.org", PW)).logout()


@pytest.mark.anyio
async def test_registration_starts_are_rate_limited_per_address(tmp_path):
    """The 'account name taken' answer of an open server can be probed only at the address's
    rate: a burst of REG_STARTs beyond it is refused before the name is looked up."""
    async with running_server(tmp_path, admission_rate=1.0, admission_burst=10) as (runtime, pki):
        stream = await tls_from(runtime.port, pki.ca_cert, "127.0.0.4")
        conn = ClientConnection(os.urandom)
        try:
            for n in range(60):
                conn.open_registration(b"probe%d@example.org" % n, b"whatever password")
            await stream.send(conn.data_to_send())
            codes: list[int] = []
            buffer = b""
            with anyio.fail_after(20):
                while len(codes) < 48:
                    buffer += await stream.receive()
                    while len(buffer) >= 10 and len(buffer) >= 10 + int.from_bytes(buffer[6:10], "big"):
                        end = 10 + int.from_bytes(buffer[6:10], "big")
                        frame, buffer = buffer[:end], buffer[end:]
                        if frame[1] == 0x0F:  # ABORT
                            codes.append(int.from_bytes(frame[10:12], "big"))
        finally:
            await anyio.aclose_forcefully(stream)
        assert codes.count(ErrorCode.RATE_LIMITED) >= 48
        async with KeymgmtClient(await tls_from(runtime.port, pki.ca_cert, "127.0.0.4")) as client:
            with pytest.raises(RateLimitedError):
                await client.register(b"one-more@example.org", PW)


def test_keymgmt_server_invite_and_keymgmt_register_with_it(tmp_path):
    """The CLIs end to end: an operator mints an invitation, a user registers with it."""
    from ..support.server_proc import ServerProcess, init_server_dir

    directory = init_server_dir(tmp_path / "srv")
    config = directory / "keymgmt-server.toml"
    server = ServerProcess(directory, env={"KEYMGMT_REQUIRE_INVITATION": "true"})
    try:
        minted = subprocess.run(
            [
                sys.executable,
                "-m",
                "keymgmt.adapters.cli.server",
                "invite",
                "--config",
                str(config),
                "--account",
                "carol@example.org",
                "--valid-for",
                "1h",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        invitation = minted.stdout.strip()
        assert invitation.startswith("kmi1.") and minted.stderr == ""
        token_file = tmp_path / "invitation"
        token_file.write_text(invitation + "\n")
        env = {
            **os.environ,
            "KEYMGMT_SERVER": f"127.0.0.1:{server.port}",
            "KEYMGMT_CA": str(directory / "ca.pem"),
            "KEYMGMT_ACCOUNT": "carol@example.org",
            "KEYMGMT_LOCAL_STORE": str(tmp_path / "local.db"),
        }
        client = [sys.executable, "-m", "keymgmt.adapters.cli.client"]
        refused = subprocess.run(
            [*client, "register"],
            input="a fine password\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert refused.returncode == 5 and "valid invitation" in refused.stderr
        assert refused.stderr.count("\n") == 1
        done = subprocess.run(
            [*client, "register", "--token-file", str(token_file)],
            input="a fine password\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        for bad_duration in ("soon", "nan", "inf", "1e30d", "-5", "0"):
            bad = subprocess.run(
                [*SERVER_CLI, "invite", "--config", str(config), "--valid-for", bad_duration],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert bad.returncode == 1, (bad_duration, bad.stderr)
            assert "not a duration" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        server.stop()
