"""A small synchronous facade over :class:`KeymgmtClient` for scripts.

::

    with SyncKeymgmtClient(connect) as client:          # connect: async () -> ByteStream
        session = client.login(b"alice@example.org", password)
        key_id = session.generate()

It runs an event loop in a helper thread (anyio's blocking portal).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from types import TracebackType
from typing import Any

from anyio.abc import ByteStream
from anyio.from_thread import BlockingPortal, start_blocking_portal

from keymgmt_proto import AuditEntry, AuditHead, AuditType, Context, LabeledKey, VerifiedAudit

from .async_client import DEFAULT_RECONNECT_BUDGET, KeymgmtClient, KeySession
from .localstore import LocalStore

__all__ = ["SyncKeySession", "SyncKeymgmtClient"]


class SyncKeySession:
    """Blocking twin of :class:`KeySession`."""

    def __init__(self, portal: BlockingPortal, session: KeySession) -> None:
        self._portal = portal
        self._session = session
        self.user_id = session.user_id

    def __repr__(self) -> str:
        return f"<SyncKeySession user_id={self.user_id.hex()}>"

    def generate(self, label: str | None = None) -> bytes:
        return self._portal.call(self._session.generate, label)

    def import_secret(self, portable: bytes, label: str | None = None) -> bytes:
        return self._portal.call(self._session.import_secret, portable, label)

    def rename(self, key_id: bytes, label: str | None) -> bool:
        return self._portal.call(self._session.rename, key_id, label)

    def resolve(self, label: str) -> bytes:
        return self._portal.call(self._session.resolve, label)

    def verify_audit(self) -> VerifiedAudit:
        return self._portal.call(self._session.verify_audit)

    def audit_head(self) -> AuditHead | None:
        return self._session.audit_head()

    def retrieve(self, key_id: bytes, context: Context = Context.NULL) -> bytes | None:
        return self._portal.call(self._session.retrieve, key_id, context)

    def export(self, key_id: bytes) -> bytes:
        return self._portal.call(self._session.export, key_id)

    def list_keys(self) -> list[LabeledKey]:
        return self._portal.call(self._session.list_keys)

    def delete(self, key_id: bytes) -> None:
        self._portal.call(self._session.delete, key_id)

    def audit(
        self,
        audit_type: AuditType = AuditType.ALL,
        key_ids: Sequence[bytes] = (),
        after: int | None = None,
        before: int | None = None,
    ) -> list[AuditEntry]:
        return self._portal.call(self._session.audit, audit_type, key_ids, after, before)

    def change_password(self, new_password: bytes) -> None:
        self._portal.call(self._session.change_password, new_password)

    def delete_account(self) -> None:
        self._portal.call(self._session.delete_account)

    def logout(self) -> None:
        self._portal.call(self._session.logout)


class SyncKeymgmtClient:
    """Blocking client: ``connect`` is a connector (an async callable returning a fresh
    byte stream, e.g. :func:`tls_connector`), called inside the helper loop for the first
    connection and again to reconnect, so the sessions resume after a restart or failover
    as with :class:`KeymgmtClient`, which takes the ``reconnect_*`` options and
    ``jitter`` as they are given here.

    Pass ``portal`` to share an event loop you already run (anyio blocking portal);
    otherwise one is started on ``backend``.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[ByteStream]],
        *,
        local_store: LocalStore | None = None,
        backend: str = "asyncio",
        portal: BlockingPortal | None = None,
        reconnect_budget: float = DEFAULT_RECONNECT_BUDGET,
        reconnect_delay: float = 0.1,
        reconnect_max_delay: float = 5.0,
        reconnect_attempts: int | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._connect = connect
        self._options: dict[str, Any] = dict(
            reconnect_budget=reconnect_budget,
            reconnect_delay=reconnect_delay,
            reconnect_max_delay=reconnect_max_delay,
            reconnect_attempts=reconnect_attempts,
            jitter=jitter,
        )
        self._local_store = local_store
        self._backend = backend
        self._stack = ExitStack()
        self._portal: BlockingPortal | None = portal
        self._own_portal = portal is None
        self._client: KeymgmtClient | None = None

    def __enter__(self) -> SyncKeymgmtClient:
        if self._own_portal:
            portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal(self._backend)
            self._portal = self._stack.enter_context(portal_cm)
        assert self._portal is not None
        try:
            # The connector, not a stream: the client reconnects (and resumes) by itself.
            client = self._portal.call(self._make_client)
            self._client = self._stack.enter_context(self._portal.wrap_async_context_manager(client))
        except BaseException:
            self._stack.close()
            raise
        return self

    async def _make_client(self) -> KeymgmtClient:
        return KeymgmtClient(self._connect, local_store=self._local_store, **self._options)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()

    def _require(self) -> tuple[BlockingPortal, KeymgmtClient]:
        if self._portal is None or self._client is None:
            raise RuntimeError("use SyncKeymgmtClient in a `with` block")
        return self._portal, self._client

    def register(self, account_name: bytes, password: bytes, *, invitation: bytes = b"") -> bytes:
        portal, client = self._require()
        return portal.call(functools.partial(client.register, invitation=invitation), account_name, password)

    def login(self, account_name: bytes, password: bytes) -> SyncKeySession:
        portal, client = self._require()
        return SyncKeySession(portal, portal.call(client.login, account_name, password))

    def change_password(self, account_name: bytes, current_password: bytes, new_password: bytes) -> None:
        """See :meth:`KeymgmtClient.change_password` (a new password equal to the current one
        is refused before anything is sent)."""
        portal, client = self._require()
        portal.call(client.change_password, account_name, current_password, new_password)

    def delete_account(self, account_name: bytes, password: bytes) -> None:
        """See :meth:`KeymgmtClient.delete_account`."""
        portal, client = self._require()
        portal.call(client.delete_account, account_name, password)
