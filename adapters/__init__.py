"""keymgmt.adapters: everything that touches the world around the sans-I/O core.

- in-memory: :class:`InMemoryPair` (synchronous, for tests and harnesses) and
  :func:`memory_stream_pair` (anyio byte streams);
- the key-server application :class:`KeyServer` over a :class:`Storage`
  (:class:`SQLiteStorage` is the embedded default), driven per connection by
  :func:`serve_stream`;
- the high-level client :class:`KeymgmtClient` / :class:`KeySession`, its
  :class:`LocalStore`, and the blocking :class:`SyncKeymgmtClient`;
- the OPAQUE server setup file helpers.
"""

from .client import (
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
    audit_to_json,
)
from .keyserver import KeyServer, default_account_name_policy
from .localstore import LocalStore
from .memory import Delivery, InMemoryPair, MemoryServerApp
from .serve import serve_stream
from .setupfile import SetupFileError, create_server_setup_file, load_server_setup_file
from .sqlite_store import SQLiteStorage
from .storage import Account, AuditQuery, AuditRecord, SecretRecord, Storage, StorageError, Transaction
from .streams import MemoryByteStream, memory_stream_pair
from .sync import SyncKeymgmtClient, SyncKeySession

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
    "audit_to_json",
    "create_server_setup_file",
    "default_account_name_policy",
    "load_server_setup_file",
    "memory_stream_pair",
    "serve_stream",
]
