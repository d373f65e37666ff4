"""The project's own cryptographic constructions (CRY-2, CRY-3, CRY-6, NET-7, REG-3).

Channel key schedule (HKDF with SHA3-256)::

    prk            = HKDF-Extract(salt=CHANNEL_SALT, ikm=session_key)
    session_handle = HKDF-Expand(prk, LABEL_HANDLE, 16)
    c2s_key, c2s_iv = HKDF-Expand(prk, LABEL_C2S_KEY, 32), HKDF-Expand(prk, LABEL_C2S_IV, 12)
    s2c_key, s2c_iv = HKDF-Expand(prk, LABEL_S2C_KEY, 32), HKDF-Expand(prk, LABEL_S2C_IV, 12)

A record with sequence number ``seq`` uses ``nonce = iv XOR (0^4 || seq as u64)`` and
``AD = session_handle || direction || frame_type || seq`` (1, 1 and 8 bytes), so a
record moved to another session, direction, frame type or position fails to open.
Nothing here draws randomness or reads a clock: callers pass them in.
"""

from __future__ import annotations

import hmac
import struct
from collections import OrderedDict
from collections.abc import Callable
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from ._errors import ErrorCode, RemoteProtocolError
from ._messages import ENCRYPTED_STORAGE_KEY_SIZE, SESSION_HANDLE_SIZE, Record
from ._wire import FrameType

__all__ = [
    "CHANNEL_SALT",
    "LABEL_C2S_IV",
    "LABEL_C2S_KEY",
    "LABEL_HANDLE",
    "LABEL_S2C_IV",
    "LABEL_S2C_KEY",
    "MASTER_KEY_INFO",
    "STORAGE_KEY_AD_SUFFIX",
    "Channel",
    "Direction",
    "HotChannels",
    "RandomSource",
    "decrypt_storage_key",
    "derive_master_key",
    "encrypt_storage_key",
    "hkdf_sha3",
]

#: Injected randomness: returns ``n`` bytes from a CSPRNG (``os.urandom`` in adapters).
RandomSource = Callable[[int], bytes]

CHANNEL_SALT = b"keymgmt v1 channel"
LABEL_HANDLE = b"keymgmt v1 session handle"
LABEL_C2S_KEY = b"keymgmt v1 client-to-server key"
LABEL_C2S_IV = b"keymgmt v1 client-to-server iv"
LABEL_S2C_KEY = b"keymgmt v1 server-to-client key"
LABEL_S2C_IV = b"keymgmt v1 server-to-client iv"
#: REG-3, verbatim from the spec.
MASTER_KEY_INFO = b"OPAQUE-derived Lock Keeper master key"
STORAGE_KEY_AD_SUFFIX = b"storage key"

KEY_SIZE = 32
NONCE_SIZE = 12
MAX_SEQ = 2**64 - 1
_SHA3 = hashes.SHA3_256()


class Direction(IntEnum):
    """Which way a record travels; bound into its AD."""

    CLIENT_TO_SERVER = 1
    SERVER_TO_CLIENT = 2


def hkdf_sha3(ikm: bytes, info: bytes, length: int, salt: bytes | None = None) -> bytes:
    """HKDF (RFC 5869) with SHA3-256."""
    return HKDF(algorithm=_SHA3, length=length, salt=salt, info=info).derive(ikm)


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(algorithm=_SHA3, length=length, info=info).derive(prk)


def _nonce(iv: bytes, seq: int) -> bytes:
    """``iv XOR (0^4 || seq as u64)``, computed as one integer XOR (seq < 2**64 touches only
    the last 8 bytes); tests/test_crypto_nonce.py checks it against the byte-wise definition."""
    return (int.from_bytes(iv, "big") ^ seq).to_bytes(NONCE_SIZE, "big")


class Channel:
    """Per-session AEAD channel state: keys, IVs and one sequence counter per direction.

    ``seal`` and ``open`` either succeed and advance their counter, or raise and
    change nothing. Records must arrive with exactly the next sequence number;
    only a resumption (``allow_gap=True``) may skip ahead, never back.

    The AEAD objects (each holds an OpenSSL context of about 2.4 KB) are built on first
    use; :meth:`release` drops them and keeps the 32-byte keys, which is how a server
    keeps idle sessions small (see :class:`HotChannels`).
    """

    __slots__ = (
        "_is_client",
        "_prk",
        "_recv_aead",
        "_recv_dir",
        "_recv_iv",
        "_recv_key",
        "_send_aead",
        "_send_dir",
        "_send_iv",
        "_send_key",
        "recv_seq",
        "send_seq",
        "session_handle",
    )

    def __init__(self, session_key: bytes, *, is_client: bool) -> None:
        self._setup(hmac.digest(CHANNEL_SALT, session_key, "sha3_256"), is_client)

    @classmethod
    def restore(cls, prk: bytes, *, is_client: bool, send_seq: int, recv_seq: int) -> Channel:
        """Rebuild a channel from :meth:`export` output (sealed session state)."""
        if len(prk) != 32 or not 0 <= send_seq <= MAX_SEQ or not 0 <= recv_seq <= MAX_SEQ:
            raise ValueError("invalid channel state")
        channel = cls.__new__(cls)
        channel._setup(prk, is_client)
        channel.send_seq, channel.recv_seq = send_seq, recv_seq
        return channel

    def export(self) -> tuple[bytes, int, int]:
        """``(prk, send_seq, recv_seq)``: everything :meth:`restore` needs. Secret."""
        return self._prk, self.send_seq, self.recv_seq

    def _setup(self, prk: bytes, is_client: bool) -> None:
        self._prk = prk
        self._is_client = is_client
        self.session_handle = _expand(prk, LABEL_HANDLE, SESSION_HANDLE_SIZE)
        c2s = _expand(prk, LABEL_C2S_KEY, KEY_SIZE), _expand(prk, LABEL_C2S_IV, NONCE_SIZE)
        s2c = _expand(prk, LABEL_S2C_KEY, KEY_SIZE), _expand(prk, LABEL_S2C_IV, NONCE_SIZE)
        if is_client:
            (self._send_key, self._send_iv), (self._recv_key, self._recv_iv) = c2s, s2c
            self._send_dir, self._recv_dir = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT
        else:
            (self._send_key, self._send_iv), (self._recv_key, self._recv_iv) = s2c, c2s
            self._send_dir, self._recv_dir = Direction.SERVER_TO_CLIENT, Direction.CLIENT_TO_SERVER
        self._send_aead: ChaCha20Poly1305 | None = None
        self._recv_aead: ChaCha20Poly1305 | None = None
        self.send_seq = 0
        self.recv_seq = 0

    def release(self) -> None:
        """Drop the AEAD objects (rebuilt from the kept keys on next use)."""
        self._send_aead = self._recv_aead = None

    @property
    def is_hot(self) -> bool:
        """Whether an AEAD object is currently built."""
        return self._send_aead is not None or self._recv_aead is not None

    def __repr__(self) -> str:
        return f"Channel(send_seq={self.send_seq}, recv_seq={self.recv_seq})"

    def _ad(self, direction: Direction, frame_type: FrameType, seq: int) -> bytes:
        return self.session_handle + struct.pack(">BBQ", direction, frame_type, seq)

    def seal(self, frame_type: FrameType, plaintext: bytes) -> Record:
        """Encrypt the next outgoing record."""
        seq = self.send_seq
        if seq >= MAX_SEQ:  # pragma: no cover - 2**64 records
            raise RemoteProtocolError("sequence numbers exhausted", ErrorCode.BAD_RECORD)
        aead = self._send_aead
        if aead is None:
            aead = self._send_aead = ChaCha20Poly1305(self._send_key)
        ciphertext = aead.encrypt(
            _nonce(self._send_iv, seq), plaintext, self._ad(self._send_dir, frame_type, seq)
        )
        self.send_seq = seq + 1
        return Record(seq, ciphertext)

    def open(self, frame_type: FrameType, record: Record, *, allow_gap: bool = False) -> bytes:
        """Verify and decrypt an incoming record; raise RemoteProtocolError(BAD_RECORD) if it fails."""
        seq = record.seq
        if seq < self.recv_seq:
            raise RemoteProtocolError("replayed or reordered record", ErrorCode.BAD_RECORD)
        if seq != self.recv_seq and not allow_gap:
            raise RemoteProtocolError("record out of sequence", ErrorCode.BAD_RECORD)
        if seq >= MAX_SEQ:
            raise RemoteProtocolError("sequence number out of range", ErrorCode.BAD_RECORD)
        aead = self._recv_aead
        if aead is None:
            aead = self._recv_aead = ChaCha20Poly1305(self._recv_key)
        try:
            plaintext = aead.decrypt(
                _nonce(self._recv_iv, seq),
                record.ciphertext,
                self._ad(self._recv_dir, frame_type, seq),
            )
        except InvalidTag:
            raise RemoteProtocolError("record failed authentication", ErrorCode.BAD_RECORD) from None
        self.recv_seq = seq + 1
        return plaintext


class HotChannels:
    """The channels allowed to keep their AEAD objects built: the ``capacity`` most
    recently used. Touching a channel past capacity releases the least recently used
    one, so memory for idle sessions stays at their keys (P4) while busy ones pay nothing
    (a released channel rebuilds its AEAD object on next use, about 2 µs)."""

    __slots__ = ("_capacity", "_channels")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._channels: OrderedDict[int, Channel] = OrderedDict()

    def __len__(self) -> int:
        return len(self._channels)

    def touch(self, channel: Channel) -> None:
        """Mark ``channel`` as just used (the dict holds it, so its id stays unique)."""
        channels = self._channels
        key = id(channel)
        if key in channels:
            channels.move_to_end(key)
            return
        channels[key] = channel
        if len(channels) > self._capacity:
            channels.popitem(last=False)[1].release()

    def discard(self, channel: Channel) -> None:
        """Forget ``channel`` (its session ended) and drop its AEAD objects."""
        self._channels.pop(id(channel), None)
        channel.release()


def derive_master_key(export_key: bytes) -> bytes:
    """REG-3: master_key = HKDF(export_key, info=MASTER_KEY_INFO, 32 bytes)."""
    return hkdf_sha3(export_key, MASTER_KEY_INFO, KEY_SIZE)


def encrypt_storage_key(master_key: bytes, storage_key: bytes, user_id: bytes, random: RandomSource) -> bytes:
    """REG-3: nonce || Enc(master_key, storage_key, AD = user_id || "storage key")."""
    if len(storage_key) != KEY_SIZE:
        raise ValueError("storage_key must be 32 bytes")
    nonce = random(NONCE_SIZE)
    sealed = ChaCha20Poly1305(master_key).encrypt(nonce, storage_key, user_id + STORAGE_KEY_AD_SUFFIX)
    result = nonce + sealed
    assert len(result) == ENCRYPTED_STORAGE_KEY_SIZE
    return result


def decrypt_storage_key(master_key: bytes, encrypted_storage_key: bytes, user_id: bytes) -> bytes:
    """OPS-1: open ``encrypted_storage_key``; RemoteProtocolError if it does not verify."""
    if len(encrypted_storage_key) != ENCRYPTED_STORAGE_KEY_SIZE:
        raise RemoteProtocolError("encrypted storage key has the wrong length", ErrorCode.MALFORMED)
    nonce, sealed = encrypted_storage_key[:NONCE_SIZE], encrypted_storage_key[NONCE_SIZE:]
    try:
        return ChaCha20Poly1305(master_key).decrypt(nonce, sealed, user_id + STORAGE_KEY_AD_SUFFIX)
    except InvalidTag:
        raise RemoteProtocolError(
            "encrypted storage key failed authentication", ErrorCode.BAD_RECORD
        ) from None
