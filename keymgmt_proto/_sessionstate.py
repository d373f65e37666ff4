"""Sealed state of a detached request session, so another server instance can resume it.

A server that loses a connection (or shuts down) seals each established request
session and hands it to a :class:`DetachedSessionStore` shared by all instances
(a database table); the instance that receives the RESUME claims it atomically.
The state holds the channel's key material, so it is sealed with
ChaCha20-Poly1305 under a key every instance derives from the OPAQUE server
setup they already share (``session_sealing_key``), with the session handle as
AD. Layout of the plaintext (big-endian)::

    version u8 (5) || user_id 16 || account_name (u8 length) || created f64 ||
    last_activity f64 || credentials_version u64 || prk 32 || epoch_secret 32 ||
    send_seq u64 || recv_seq u64 || resume_seq u64 || sent_total u64 || received_total u64 ||
    highest_request_id u32 || request_count u32 ||
    answered count u16 || count x (request_id u32 || kept u8 || body (u32 length) if kept) ||
    app_state (u16 length)

``kept`` is 1 when the answer follows, 0 for a read whose answer was not kept (the read
runs again if re-sent, protocol.md section 9). ``app_state`` is what the application keeps
of the session beside the core (:class:`SessionAppState`; the key server: its key-id
reservations). Version 4 (the release before) has no ``app_state``: read as empty. Version
3 (the one before) also has no ``kept`` byte: every answer follows, and it is read so.
Version 2 (the one before that) also has no ``credentials_version``; it is read as 0.

Sealed: ``nonce 12 || ciphertext || tag 16``. This is a server-internal format
shared by instances running the same version; it never reaches a client.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ._crypto import ChannelState, RandomSource, hkdf_sha3
from ._errors import RemoteProtocolError
from ._events import SessionHandle
from ._messages import USER_ID_SIZE
from ._wire import Reader, Writer

__all__ = [
    "SESSION_STATE_AD_PREFIX",
    "SESSION_STATE_KEY_INFO",
    "DetachedSessionStore",
    "SessionAppState",
    "SessionState",
    "seal_session_state",
    "session_sealing_key",
    "unseal_session_state",
]

SESSION_STATE_KEY_INFO = b"keymgmt v1 session state key"
SESSION_STATE_AD_PREFIX = b"keymgmt v1 session state"
_VERSION = 5
#: The release before: no app_state.
_VERSION_4 = 4
#: The versions before, still read: every answer kept, and (version 2) no credentials
#: version (its sessions count as logged in with credentials version 0).
_VERSION_3 = 3
_VERSION_2 = 2


class DetachedSessionStore(Protocol):
    """Where detached sessions wait to be resumed (shared by all server instances)."""

    def save(
        self,
        handle: bytes,
        sealed_state: bytes,
        expires_at: float,
        user_id: bytes | None = None,
        credentials_version: int | None = None,
    ) -> None:
        """Store (or replace) a sealed session of ``user_id``; it may be dropped after
        ``expires_at``. A store that keeps ``user_id`` can drop every session of an account
        whose password changed or that was deleted. ``credentials_version`` is the one the
        session logged in with: a store that knows the accounts' versions stores nothing
        when the account's is no longer that one, or the account is gone (the session then
        ends: its RESUME finds nothing)."""
        ...

    def claim(self, handle: bytes) -> bytes | None:
        """Atomically remove and return the sealed session, or None if there is none."""
        ...


class SessionAppState(Protocol):
    """What an application keeps of a request session beside the core, carried in its sealed
    state when it detaches to the store and given back to the instance that claims it (the
    key server: the key ids the session reserved, so a store after a resumption finds them)."""

    def export_session(self, handle: SessionHandle) -> bytes:
        """The application's state of the session ``handle`` (b"" for none), up to 65535
        bytes; called as the session is sealed."""
        ...

    def import_session(self, handle: SessionHandle, state: bytes) -> None:
        """A claimed session's state as :meth:`export_session` gave it (never b""), under
        its new ``handle``."""
        ...


@dataclass(slots=True, repr=False)
class SessionState:
    """What :func:`seal_session_state` seals of a detached request session (the plaintext
    layout in the module docstring); secret: the channel state holds key material."""

    user_id: bytes
    account_name: bytes
    created: float
    last_activity: float
    channel: ChannelState
    highest_request_id: int
    request_count: int
    #: The reply cache: each answered request's answer, or None for a read whose answer
    #: was not kept.
    answered: dict[int, bytes | None] = field(default_factory=dict)
    #: The application's name for the credentials the session logged in with.
    credentials_version: int = 0
    #: What the application keeps of the session (:class:`SessionAppState`), up to 65535 bytes.
    app_state: bytes = b""

    def __repr__(self) -> str:
        return "SessionState(<secret>)"


def session_sealing_key(server_setup_bytes: bytes) -> bytes:
    """The key that seals session state, derived from the (shared, secret) OPAQUE setup."""
    return hkdf_sha3(server_setup_bytes, SESSION_STATE_KEY_INFO, 32)


def seal_session_state(state: SessionState, handle: bytes, key: bytes, random: RandomSource) -> bytes:
    """``nonce 12 || ChaCha20-Poly1305(key, plaintext, AD = SESSION_STATE_AD_PREFIX || handle)``."""
    w = Writer().u8(_VERSION).fixed(state.user_id, USER_ID_SIZE).bytes8(state.account_name)
    channel = state.channel
    w.rest(struct.pack(">dd", state.created, state.last_activity)).u64(state.credentials_version)
    w.fixed(channel.prk, 32).fixed(channel.epoch_secret, 32).u64(channel.send_seq).u64(channel.recv_seq)
    w.u64(channel.resume_seq).u64(channel.sent_total).u64(channel.received_total)
    w.u32(state.highest_request_id).u32(state.request_count)
    w.u16(len(state.answered))
    for request_id, body in state.answered.items():
        if body is None:
            w.u32(request_id).u8(0)
        else:
            w.u32(request_id).u8(1).u32(len(body)).rest(body)
    w.bytes16(state.app_state)
    nonce = random(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, w.getvalue(), SESSION_STATE_AD_PREFIX + handle)


def unseal_session_state(sealed: bytes, handle: bytes, key: bytes) -> SessionState | None:
    """The state, or None if it does not verify or parse (never trust a store blindly)."""
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], SESSION_STATE_AD_PREFIX + handle)
    except (InvalidTag, ValueError):
        return None
    try:
        r = Reader(plaintext, "session state")
        version = r.u8()
        if version not in (_VERSION, _VERSION_4, _VERSION_3, _VERSION_2):
            return None
        user_id = r.fixed(USER_ID_SIZE)
        account_name = r.bytes8()
        created, last_activity = struct.unpack(">dd", r.fixed(16))
        credentials_version = 0 if version == _VERSION_2 else r.u64()
        prk, epoch_secret = r.fixed(32), r.fixed(32)
        channel = ChannelState(prk, epoch_secret, r.u64(), r.u64(), r.u64(), r.u64(), r.u64())
        highest, count = r.u32(), r.u32()
        answered: dict[int, bytes | None] = {}
        for _ in range(r.u16()):
            request_id = r.u32()
            kept = r.u8() if version >= _VERSION_4 else 1
            if kept == 1:
                answered[request_id] = r.fixed(r.u32())
            elif kept == 0:
                answered[request_id] = None
            else:
                return None
        app_state = r.bytes16() if version == _VERSION else b""
        r.done()
    except (RemoteProtocolError, struct.error):  # verifies but does not parse: another version
        return None
    return SessionState(
        user_id,
        account_name,
        created,
        last_activity,
        channel,
        highest,
        count,
        answered,
        credentials_version,
        app_state,
    )
