"""Review of issue 16's credentials version during a rolling upgrade: instances restarted one at
a time (operations.md, *Restarts and upgrades*) share the database with instances of the
release before for a while. That release replaces the registration record without knowing
``credentials_changed_us``; the database itself moves the version on (a trigger), so sessions
of the old password on the upgraded instances end all the same."""

from __future__ import annotations

import os

from keymgmt.adapters.storage.postgres import PostgresStorage
from keymgmt_proto import ListKeysRequest, ResponseReceived, SecretOps, SessionEstablished, Status

from ..storage.test_credentials_version import PREVIOUS_RELEASE_CHANGE
from ..support.helpers import login, register
from .test_accounts_server import (  # noqa: F401 (two_storages: fixture)
    ALICE,
    NEW,
    _change_password,
    _ended_unanswered,
    _World,
    two_storages,
)


class _PreviousReleaseTransaction:
    """A transaction as an instance of the release before writes a password change: the record
    and the wrapped key replaced, the credentials version not written (it knew no such column)."""

    def __init__(self, tx: object, postgres: bool) -> None:
        self._tx = tx
        self._postgres = postgres

    def __getattr__(self, name: str) -> object:
        return getattr(self._tx, name)

    def replace_credentials(
        self, user_id, registration_record, encrypted_storage_key, now=0, credentials=None
    ):
        if self._postgres:
            self._tx._conn.execute(
                PREVIOUS_RELEASE_CHANGE.replace("?", "%s"),
                (registration_record, encrypted_storage_key, user_id),
            )
        else:
            self._tx._db.execute(
                PREVIOUS_RELEASE_CHANGE, (registration_record, encrypted_storage_key, user_id)
            )
        account = self._tx.get_account_by_user_id(user_id)
        return None if account is None else account.credentials_changed


class _PreviousReleaseStorage:
    """The database as an instance of the release before uses it (see the transaction above)."""

    def __init__(self, storage: object) -> None:
        self._storage = storage
        self._postgres = isinstance(storage, PostgresStorage)

    def __getattr__(self, name: str) -> object:
        return getattr(self._storage, name)

    def transaction(self, *, atomic: bool = True):
        storage, postgres = self._storage, self._postgres

        class _Wrapped:
            def __enter__(self):
                self._inner = storage.transaction(atomic=atomic)
                return _PreviousReleaseTransaction(self._inner.__enter__(), postgres)

            def __exit__(self, *exc):
                return self._inner.__exit__(*exc)

        return _Wrapped()


def test_a_password_change_by_the_release_before_ends_the_old_sessions_on_upgraded_instances(two_storages):  # noqa: F811
    """The owner changes the password through an instance not yet upgraded: the sessions of
    the old password on an upgraded instance end at their next request (reading the keys, or
    taking the account over with a password change of their own); a fresh login with the new
    password works there."""
    old_release = _World(_PreviousReleaseStorage(two_storages[0]))
    upgraded = _World(two_storages[1])
    owner_pair = old_release.pair()
    register(owner_pair, ALICE)
    stale: list[tuple[object, SessionEstablished]] = []
    for _ in range(2):  # with the old password, on the upgraded instance, before the change
        pair = upgraded.pair()
        stale.append((pair, login(pair, ALICE)))
    _change_password(owner_pair, login(owner_pair, ALICE), NEW)

    (reader_pair, reader), (taker_pair, taker) = stale
    _ended_unanswered(
        reader_pair, reader, SecretOps(reader.user_id, reader.export_key, os.urandom).list_keys()
    )
    taker_ops = SecretOps(taker.user_id, taker.export_key, os.urandom)
    _ended_unanswered(
        taker_pair, taker, taker_ops.change_password_start(b"the attacker's own", taker_pair.client.opaque)
    )
    fresh_pair = upgraded.pair()
    fresh = login(fresh_pair, ALICE, NEW)
    request_id = fresh_pair.client.send_request(fresh.session_id, ListKeysRequest(fresh.user_id).encode())
    (answer,) = [
        e for e in fresh_pair.pump() if isinstance(e, ResponseReceived) and e.request_id == request_id
    ]
    assert answer.body[:1] == bytes([Status.OK])
