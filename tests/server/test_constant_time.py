"""CRY-6 at run time: each comparison of secret data goes through ``hmac.compare_digest``.

``tests/system/test_secret_hygiene.py`` lints the source for ``==`` on secret-looking names; these
tests watch the running code instead. ``hmac.compare_digest`` is replaced by a recorder,
a flow that reaches each comparison runs, and the test asserts that the comparison was
made by ``compare_digest``, from the function that owns it, on the values it guards. A
``==`` planted in its place (as ``make mutation`` does) leaves no record and fails here.
"""

from __future__ import annotations

import hmac
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from keymgmt.adapters.server.invitations import InvitationAuthorizer
from keymgmt_proto import Context, ServerSetup

from ..support.fake_pairs import FakeWorld
from ..support.helpers import register
from ..support.keyserver_world import key_server

ALICE = b"alice"
PW = b"correct horse battery staple"


@dataclass(frozen=True)
class Call:
    caller: str
    a: bytes
    b: bytes


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Call]]:
    """Every ``hmac.compare_digest`` call while the test runs, with the function that made it."""
    calls: list[Call] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append(Call(sys._getframe(1).f_code.co_qualname, bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    yield calls


def by(calls: list[Call], caller: str) -> list[Call]:
    return [call for call in calls if call.caller == caller]


def test_registration_compares_names_user_ids_and_export_keys_in_constant_time(compared):
    world = FakeWorld(ServerSetup.generate())
    pair = world.pair()
    done = register(pair, ALICE)

    server = by(compared, "ServerConnection._apply")
    # LOGIN_START inside the registration session names the account being registered...
    assert Call("ServerConnection._apply", ALICE, ALICE) in server
    # ...and COMPLETE_REGISTRATION carries the user id the server assigned.
    assert Call("ServerConnection._apply", done.user_id, done.user_id) in server
    # The client checks that login gave the export key registration gave.
    client = by(compared, "ClientConnection._after_login_step")
    assert len(client) == 1
    assert client[0].a == client[0].b and len(client[0].a) == 64


@pytest.mark.anyio
async def test_requests_compare_user_ids_and_associated_data_in_constant_time(tmp_path, compared):
    async with key_server(tmp_path) as world, world.client() as client:
        user_id = await client.register(ALICE, PW)
        session = await client.login(ALICE, PW)
        key_id = await session.generate()
        secret = await session.retrieve(key_id, Context.LOCAL_ONLY)
        assert secret is not None and len(secret) == 32

    # The key server checks the user id each request names against the session's.
    assert Call("KeyServer.answer", user_id, user_id) in compared
    # The client checks that the key id the server drew is the one both nonces give (KEY-2).
    assert Call("SecretOps._checked_key_id", key_id, key_id) in compared
    # The client checks the associated data of the sealed secret it got back.
    ad = by(compared, "ad_matches")
    assert ad and all(call.a == call.b and len(call.a) == 32 for call in ad)


def test_invitations_compare_tags_and_name_hashes_in_constant_time(compared):
    authorizer = InvitationAuthorizer(bytes(range(32)))
    token = authorizer.mint(ALICE, 60.0, 1_000.0, os.urandom).encode()
    assert authorizer.authorize(ALICE, token, 1_001.0) is True

    calls = by(compared, "InvitationAuthorizer.authorize")
    assert len(calls) == 2
    tag, name = calls
    assert tag.a == tag.b and len(tag.a) == 32  # the HMAC tag
    assert name.a == name.b and len(name.a) == 32  # SHA3-256 of the bound name


@pytest.mark.anyio
async def test_ending_a_users_sessions_compares_user_ids_in_constant_time(tmp_path, compared):
    """A password change ends the user's other sessions: the registry picks them by user id
    through compare_digest (which user ids a registry holds is not timing-visible)."""
    async with key_server(tmp_path) as world, world.client() as client:
        user_id = await client.register(ALICE, PW)
        await client.login(ALICE, PW)
        changing = await client.login(ALICE, PW)
        await changing.change_password(b"another long enough password")

    assert Call("SessionRegistry.end_user_sessions", user_id, user_id) in compared
