"""keymgmt_proto: the sans-I/O protocol core of keymgmt.

Bytes in, events out, bytes to send. No sockets, files, databases, clocks or
OS randomness: time enters as ``now`` and randomness as an injected
``random(n) -> bytes`` callable. See docs/architecture.md and docs/protocol.md.
"""

from ._admission import Admission, TokenBucket
from ._client import ClientConnection, DetachedSession
from ._crypto import Channel, Direction, RandomSource, derive_master_key, hkdf_sha3
from ._errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    ConnectionFailed,
    Event,
    LoginFailed,
    LoginRequested,
    LoginSucceeded,
    NeedData,
    RegistrationCompleted,
    RegistrationRequested,
    RegistrationSucceeded,
    RequestReceived,
    ResponseReceived,
    ResumeDeferred,
    SessionClosed,
    SessionEstablished,
    SessionFailed,
    SessionResumed,
)
from ._opaque import OpaqueSuite, RealOpaque, ServerSetup
from ._ops import (
    OPERATIONS,
    Action,
    AuditEntry,
    AuditType,
    Context,
    KeyInfo,
    Op,
    Operation,
    OpRequest,
    OpResponse,
    Outcome,
    SecretKind,
    Status,
    decode_portable,
    decode_request,
    decode_response,
    derive_key_id,
    encode_portable,
    encode_response,
)
from ._server import ServerConfig, ServerConnection, SessionRegistry
from ._state import Command, Role, SessionKind, State
from ._wire import DEFAULT_MAX_PAYLOAD, MAX_SESSION_ID, PROTOCOL_VERSION, Frame, FrameType

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "MAX_SESSION_ID",
    "NEED_DATA",
    "OPERATIONS",
    "PROTOCOL_VERSION",
    "Action",
    "Admission",
    "AuditEntry",
    "AuditType",
    "Channel",
    "ClientConnection",
    "Command",
    "ConnectionFailed",
    "Context",
    "DetachedSession",
    "Direction",
    "ErrorCode",
    "Event",
    "Frame",
    "FrameType",
    "KeyInfo",
    "LocalProtocolError",
    "LoginFailed",
    "LoginRequested",
    "LoginSucceeded",
    "NeedData",
    "Op",
    "OpRequest",
    "OpResponse",
    "OpaqueSuite",
    "Operation",
    "Outcome",
    "ProtocolError",
    "RandomSource",
    "RealOpaque",
    "RegistrationCompleted",
    "RegistrationRequested",
    "RegistrationSucceeded",
    "RemoteProtocolError",
    "RequestReceived",
    "ResponseReceived",
    "ResumeDeferred",
    "Role",
    "SecretKind",
    "ServerConfig",
    "ServerConnection",
    "ServerSetup",
    "SessionClosed",
    "SessionEstablished",
    "SessionFailed",
    "SessionKind",
    "SessionRegistry",
    "SessionResumed",
    "State",
    "Status",
    "TokenBucket",
    "decode_portable",
    "decode_request",
    "decode_response",
    "derive_key_id",
    "derive_master_key",
    "encode_portable",
    "encode_response",
    "hkdf_sha3",
]
