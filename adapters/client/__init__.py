"""The client: :class:`KeymgmtClient` (async, asyncio or trio), its blocking facade
:class:`SyncKeymgmtClient`, the local ciphertext cache :class:`LocalStore`, and
:func:`tls_connector`, the way to a key server over TLS 1.3 (:func:`ws_connector`: the
same in a WebSocket)."""

from .async_client import (
    DEFAULT_RECONNECT_BUDGET,
    AuthenticationError,
    ClientClosedError,
    ConnectionLostError,
    Connector,
    IntegrityError,
    KeymgmtClient,
    KeymgmtError,
    KeySession,
    LabelConflictError,
    NotFoundError,
    RateLimitedError,
    RegistrationError,
    RequestRefusedError,
    SessionEndedError,
    ThrottledError,
    UserRateLimitedError,
    audit_to_json,
    reconnect_delays,
)
from .connect import TLSConnectError, WebSocketConnectError, tls_connector, ws_connector
from .localstore import LocalStore, LocalStoreError
from .sync_client import SyncKeymgmtClient, SyncKeySession

__all__ = [
    "DEFAULT_RECONNECT_BUDGET",
    "AuthenticationError",
    "ClientClosedError",
    "ConnectionLostError",
    "Connector",
    "IntegrityError",
    "KeySession",
    "KeymgmtClient",
    "KeymgmtError",
    "LabelConflictError",
    "LocalStore",
    "LocalStoreError",
    "NotFoundError",
    "RateLimitedError",
    "RegistrationError",
    "RequestRefusedError",
    "SessionEndedError",
    "SyncKeySession",
    "SyncKeymgmtClient",
    "TLSConnectError",
    "ThrottledError",
    "UserRateLimitedError",
    "WebSocketConnectError",
    "audit_to_json",
    "reconnect_delays",
    "tls_connector",
    "ws_connector",
]
