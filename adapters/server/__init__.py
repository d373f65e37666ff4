"""The key server: the application (:class:`KeyServer`), the per-connection driver
(:class:`ConnectionDriver`), the network runtime (:class:`KeyServerRuntime`), its
settings and configuration file, per-address admission, the per-user request rate and
invitations."""

from .app import KeyServer, ThrottlePolicy, default_account_name_policy
from .driver import ConnectionDriver, serve_stream
from .runtime import KeyServerRuntime, ServerSettings, open_storage
from .setupfile import SetupFileError, create_server_setup_file, load_server_setup_file
from .userrate import UserRequestRates

__all__ = [
    "ConnectionDriver",
    "KeyServer",
    "KeyServerRuntime",
    "ServerSettings",
    "SetupFileError",
    "ThrottlePolicy",
    "UserRequestRates",
    "create_server_setup_file",
    "default_account_name_policy",
    "load_server_setup_file",
    "open_storage",
    "serve_stream",
]
