"""keymgmt: password-authenticated key management.

The names most programs need, in one short import::

    from keymgmt import Client, tls_connector

The protocol core is :mod:`keymgmt_proto` (sans-I/O); everything that touches the
world is :mod:`keymgmt.adapters` (server, storage, client, command lines, test
doubles). This module only re-exports.
"""

from keymgmt.adapters.client import (
    AuthenticationError,
    ClientClosedError,
    ConnectionLostError,
    IntegrityError,
    KeymgmtError,
    LocalStore,
    NotFoundError,
    RateLimitedError,
    RegistrationError,
    RequestRefusedError,
    SessionEndedError,
    ThrottledError,
    TLSConnectError,
    UserRateLimitedError,
    WebSocketConnectError,
    tls_connector,
    ws_connector,
)
from keymgmt.adapters.client import KeymgmtClient as Client
from keymgmt.adapters.client import KeySession as Session
from keymgmt.adapters.client import SyncKeymgmtClient as SyncClient
from keymgmt.adapters.client import SyncKeySession as SyncSession
from keymgmt.adapters.server import KeyServer, KeyServerRuntime, ServerSettings

__all__ = [
    "AuthenticationError",
    "Client",
    "ClientClosedError",
    "ConnectionLostError",
    "IntegrityError",
    "KeyServer",
    "KeyServerRuntime",
    "KeymgmtError",
    "LocalStore",
    "NotFoundError",
    "RateLimitedError",
    "RegistrationError",
    "RequestRefusedError",
    "ServerSettings",
    "Session",
    "SessionEndedError",
    "SyncClient",
    "SyncSession",
    "TLSConnectError",
    "ThrottledError",
    "UserRateLimitedError",
    "WebSocketConnectError",
    "tls_connector",
    "ws_connector",
]
