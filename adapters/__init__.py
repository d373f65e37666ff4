"""keymgmt.adapters: everything that touches the world around the sans-I/O core, by layer.

- :mod:`.server`: the key-server application :class:`KeyServer`, the connection
  driver, the network runtime and its configuration;
- :mod:`.storage`: the storage interface, SQLite (the embedded default) and PostgreSQL;
- :mod:`.client`: the async client :class:`KeymgmtClient`, the blocking
  :class:`SyncKeymgmtClient`, the local store and the TLS connector;
- :mod:`.cli`: the ``keymgmt`` and ``keymgmt-server`` command lines and the demo;
- :mod:`.testing`: in-memory pairs and streams for tests and harnesses;
- shared helpers: :mod:`.tls`, :mod:`.files`, :mod:`.redaction`.
"""

from .client.async_client import (
    AuthenticationError,
    ConnectionLostError,
    IntegrityError,
    KeymgmtClient,
    KeymgmtError,
    KeySession,
    NotFoundError,
    RateLimitedError,
    RegistrationError,
    RequestRefusedError,
    SessionEndedError,
    ThrottledError,
    UserRateLimitedError,
    audit_to_json,
)
from .client.localstore import LocalStore
from .client.sync_client import SyncKeymgmtClient, SyncKeySession
from .server.app import KeyServer, default_account_name_policy
from .server.driver import serve_stream
from .server.setupfile import SetupFileError, create_server_setup_file, load_server_setup_file
from .storage.base import Account, AuditQuery, AuditRecord, SecretRecord, Storage, StorageError, Transaction
from .storage.sqlite import SQLiteStorage
from .testing.memory import Delivery, InMemoryPair, MemoryServerApp
from .testing.streams import MemoryByteStream, memory_stream_pair

__all__ = [
    "Account",
    "AuditQuery",
    "AuditRecord",
    "AuthenticationError",
    "ConnectionLostError",
    "Delivery",
    "InMemoryPair",
    "IntegrityError",
    "KeyServer",
    "KeySession",
    "KeymgmtClient",
    "KeymgmtError",
    "LocalStore",
    "MemoryByteStream",
    "MemoryServerApp",
    "NotFoundError",
    "RateLimitedError",
    "RegistrationError",
    "RequestRefusedError",
    "SQLiteStorage",
    "SecretRecord",
    "SessionEndedError",
    "SetupFileError",
    "Storage",
    "StorageError",
    "SyncKeySession",
    "SyncKeymgmtClient",
    "ThrottledError",
    "Transaction",
    "UserRateLimitedError",
    "audit_to_json",
    "create_server_setup_file",
    "default_account_name_policy",
    "load_server_setup_file",
    "memory_stream_pair",
    "serve_stream",
]
