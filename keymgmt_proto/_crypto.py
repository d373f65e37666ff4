"""The project's own cryptographic constructions (CRY-2, CRY-3, CRY-6, NET-7, NET-14, REG-3).

Channel key schedule (HKDF with SHA3-256)::

    prk            = HKDF-Extract(salt=CHANNEL_SALT, ikm=session_key)
    session_handle = HKDF-Expand(prk, LABEL_HANDLE, 16)
    resume_key     = HKDF-Expand(prk, LABEL_RESUME_KEY, 32)
    resume_iv      = HKDF-Expand(prk, LABEL_RESUME_IV, 12)
    epoch          = prk at login; after each resumption
                     HKDF-Expand(prk, LABEL_EPOCH || client_nonce || server_nonce, 32)
    c2s_key, c2s_iv = HKDF-Expand(epoch, LABEL_C2S_KEY, 32), HKDF-Expand(epoch, LABEL_C2S_IV, 12)
    s2c_key, s2c_iv = HKDF-Expand(epoch, LABEL_S2C_KEY, 32), HKDF-Expand(epoch, LABEL_S2C_IV, 12)

A record with sequence number ``seq`` uses ``nonce = iv XOR (0^4 || seq as u64)`` and
``AD = session_handle || direction || frame_type || seq`` (1, 1 and 8 bytes), so a
record moved to another session, direction, frame type or position fails to open.
Each key epoch starts its sequence numbers at 0; the nonces that both sides
contribute to a resumption make every epoch's keys fresh, so no (key, nonce) pair
is ever used twice, even by a server whose stored session state was rolled back.
Nothing here draws randomness or reads a clock: callers pass them in.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from hashlib import sha3_256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ._errors import ErrorCode, ProtocolError, RemoteProtocolError
from ._messages import ENCRYPTED_STORAGE_KEY_SIZE, RESUME_NONCE_SIZE, SESSION_HANDLE_SIZE, TAG_SIZE, Record
from ._wire import FrameType

__all__ = [
    "CHANNEL_SALT",
    "LABEL_C2S_IV",
    "LABEL_C2S_KEY",
    "LABEL_EPOCH",
    "LABEL_HANDLE",
    "LABEL_RESUME_IV",
    "LABEL_RESUME_KEY",
    "LABEL_S2C_IV",
    "LABEL_S2C_KEY",
    "MASTER_KEY_INFO",
    "MAX_SEQ",
    "STORAGE_KEY_AD_SUFFIX",
    "Channel",
    "ChannelState",
    "Direction",
    "HmacSha3",
    "HotChannels",
    "RandomSource",
    "decrypt_storage_key",
    "derive_master_key",
    "encrypt_storage_key",
    "hkdf_expand_sha3",
    "hkdf_sha3",
    "record_nonce",
]

#: Injected randomness: returns ``n`` bytes from a CSPRNG (``os.urandom`` in adapters).
RandomSource = Callable[[int], bytes]

CHANNEL_SALT = b"keymgmt v1 channel"
LABEL_HANDLE = b"keymgmt v1 session handle"
LABEL_C2S_KEY = b"keymgmt v1 client-to-server key"
LABEL_C2S_IV = b"keymgmt v1 client-to-server iv"
LABEL_S2C_KEY = b"keymgmt v1 server-to-client key"
LABEL_S2C_IV = b"keymgmt v1 server-to-client iv"
LABEL_RESUME_KEY = b"keymgmt v1 resume key"
LABEL_RESUME_IV = b"keymgmt v1 resume iv"
LABEL_EPOCH = b"keymgmt v1 key epoch"
#: REG-3, verbatim from the spec.
MASTER_KEY_INFO = b"OPAQUE-derived Lock Keeper master key"
STORAGE_KEY_AD_SUFFIX = b"storage key"

KEY_SIZE = 32
NONCE_SIZE = 12
_SEQ_SIZE = 8
_U64 = struct.Struct(">Q")
#: A record's AD: session handle, direction, frame type, sequence number.
_AD = struct.Struct(f">{SESSION_HANDLE_SIZE}sBBQ")
#: Sequence numbers are below this (2**64 - 1); the last one a sender may use is MAX_SEQ - 1.
MAX_SEQ = 2**64 - 1


class Direction(IntEnum):
    """Which way a record travels; bound into its AD."""

    CLIENT_TO_SERVER = 1
    SERVER_TO_CLIENT = 2


#: The directions as the plain ints an AD packs (read once: see _server on Enum attributes).
_C2S, _S2C = int(Direction.CLIENT_TO_SERVER), int(Direction.SERVER_TO_CLIENT)

#: SHA3-256's rate in bytes: HMAC's block size for it (FIPS 202, RFC 2104).
_SHA3_256_BLOCK = 136
_IPAD = bytes(byte ^ 0x36 for byte in range(256))
_OPAD = bytes(byte ^ 0x5C for byte in range(256))


class HmacSha3:
    """HMAC-SHA3-256 (RFC 2104) under one key, which is hashed into the inner and outer
    states once: each MAC then costs two Keccak permutations (its message under 136 bytes)
    instead of four, and no OpenSSL MAC set-up (``hmac.digest`` with SHA3-256 costs about
    four times as much). Used for HKDF, whose expansions all run under one key. Its repr
    shows nothing; the tests check it against ``hmac.digest``."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _SHA3_256_BLOCK:
            key = sha3_256(key).digest()
        key = key.ljust(_SHA3_256_BLOCK, b"\0")
        self._inner = sha3_256(key.translate(_IPAD))
        self._outer = sha3_256(key.translate(_OPAD))

    def __repr__(self) -> str:
        return "HmacSha3(<secret>)"

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def expand(self, info: bytes, length: int) -> bytes:
        """HKDF-Expand (RFC 5869) with this key as the PRK, up to 255 blocks."""
        if not 0 < length <= 255 * 32:
            raise ValueError("HKDF-Expand length must be 1..8160 bytes")
        if length <= 32:  # (every expansion of the protocol but the decoy's)
            return self.digest(info + b"\x01")[:length]
        blocks: list[bytes] = []
        previous = b""
        for counter in range(1, -(-length // 32) + 1):
            previous = self.digest(previous + info + bytes([counter]))
            blocks.append(previous)
        return b"".join(blocks)[:length]


#: HKDF-Extract's key for the channel's PRK: one constant salt, hashed once.
_CHANNEL_EXTRACT = HmacSha3(CHANNEL_SALT)


def hkdf_sha3(ikm: bytes, info: bytes, length: int, salt: bytes | None = None) -> bytes:
    """HKDF (RFC 5869) with SHA3-256: Extract (no salt = 32 zero bytes), then Expand."""
    prk = HmacSha3(salt if salt is not None else bytes(32)).digest(ikm)
    return HmacSha3(prk).expand(info, length)


def hkdf_expand_sha3(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand (RFC 5869) with HMAC-SHA3-256, up to 255 blocks (see :class:`HmacSha3`;
    the vectors check it against the library's)."""
    return HmacSha3(prk).expand(info, length)


_expand = hkdf_expand_sha3


def record_nonce(iv: bytes, seq: int) -> bytes:
    """The AEAD nonce of the record with sequence number ``seq`` under ``iv`` (protocol.md
    section 5.2): ``iv XOR (0^4 || seq as u64)``, computed as one integer XOR (seq < 2**64
    touches only the last 8 bytes); tests/core/test_crypto_nonce.py checks it against the
    byte-wise definition."""
    return (int.from_bytes(iv, "big") ^ seq).to_bytes(NONCE_SIZE, "big")


@dataclass(frozen=True, slots=True, repr=False)
class ChannelState:
    """Everything :meth:`Channel.restore` needs (secret: it holds key material).

    ``prk`` is the session's base key, ``epoch_secret`` the current key epoch's;
    ``send_seq``/``recv_seq`` count records in this epoch, ``resume_seq`` RESUME records
    (the next to send or accept), ``sent_total``/``received_total`` every record over
    the session's life (they never restart)."""

    prk: bytes = field(repr=False)
    epoch_secret: bytes = field(repr=False)
    send_seq: int = 0
    recv_seq: int = 0
    resume_seq: int = 0
    sent_total: int = 0
    received_total: int = 0

    def __repr__(self) -> str:
        return "ChannelState(<secret>)"


class Channel:
    """Per-session AEAD channel state: keys, IVs and one sequence counter per direction.

    ``seal`` and ``open`` either succeed and advance their counter, or raise and
    change nothing. Records must arrive with exactly the next sequence number.
    A resumption (NET-14) moves the session to a new key epoch (:meth:`next_epoch`)
    whose counters start at 0; the RESUME record itself is sealed under a separate
    resume key with its own counter (:meth:`seal_resume`, :meth:`open_resume`).

    The AEAD objects (each holds an OpenSSL context of about 2.4 KB) are built on first
    use; :meth:`release` drops them and keeps the 32-byte keys, which is how a server
    keeps idle sessions small (see :class:`HotChannels`).
    """

    __slots__ = (
        "_epoch_secret",
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
        "received_total",
        "recv_seq",
        "resume_seq",
        "send_seq",
        "sent_total",
        "session_handle",
    )

    def __init__(self, session_key: bytes, *, is_client: bool) -> None:
        prk = _CHANNEL_EXTRACT.digest(session_key)
        # (no ChannelState at login: a frozen dataclass of 7 fields costs ~12,000 instructions)
        self._setup(prk, prk, 0, 0, 0, 0, 0, is_client)

    @classmethod
    def restore(cls, state: ChannelState, *, is_client: bool) -> Channel:
        """Rebuild a channel from :meth:`export` output (sealed session state)."""
        counters = (state.send_seq, state.recv_seq, state.resume_seq, state.sent_total, state.received_total)
        if (
            len(state.prk) != 32
            or len(state.epoch_secret) != 32
            or not all(0 <= c <= MAX_SEQ for c in counters)
        ):
            raise ValueError("invalid channel state")
        channel = cls.__new__(cls)
        channel._setup(
            state.prk,
            state.epoch_secret,
            state.send_seq,
            state.recv_seq,
            state.resume_seq,
            state.sent_total,
            state.received_total,
            is_client,
        )
        return channel

    def export(self) -> ChannelState:
        """Everything :meth:`restore` needs. Secret."""
        return ChannelState(
            self._prk,
            self._epoch_secret,
            self.send_seq,
            self.recv_seq,
            self.resume_seq,
            self.sent_total,
            self.received_total,
        )

    def _setup(
        self,
        prk: bytes,
        epoch_secret: bytes,
        send_seq: int,
        recv_seq: int,
        resume_seq: int,
        sent_total: int,
        received_total: int,
        is_client: bool,
    ) -> None:
        """The channel of a :class:`ChannelState` with these fields."""
        self._prk = prk
        self._is_client = is_client
        prk_mac = HmacSha3(prk)
        self.session_handle = prk_mac.expand(LABEL_HANDLE, SESSION_HANDLE_SIZE)
        self.resume_seq = resume_seq
        self.sent_total = sent_total
        self.received_total = received_total
        # At login the epoch secret is the PRK itself: its key states are hashed once.
        self._set_epoch(epoch_secret, prk_mac if epoch_secret is prk else None)
        self.send_seq = send_seq
        self.recv_seq = recv_seq

    def _set_epoch(self, epoch_secret: bytes, epoch_mac: HmacSha3 | None = None) -> None:
        self._epoch_secret = epoch_secret
        expand = (epoch_mac or HmacSha3(epoch_secret)).expand
        c2s = expand(LABEL_C2S_KEY, KEY_SIZE), expand(LABEL_C2S_IV, NONCE_SIZE)
        s2c = expand(LABEL_S2C_KEY, KEY_SIZE), expand(LABEL_S2C_IV, NONCE_SIZE)
        if self._is_client:
            (self._send_key, send_iv), (self._recv_key, recv_iv) = c2s, s2c
            self._send_dir, self._recv_dir = _C2S, _S2C
        else:
            (self._send_key, send_iv), (self._recv_key, recv_iv) = s2c, c2s
            self._send_dir, self._recv_dir = _S2C, _C2S
        # The IVs as integers (a record's nonce is one XOR away) and the directions as plain
        # ints (packed into every AD): the per-record path does no conversions.
        self._send_iv = int.from_bytes(send_iv, "big")
        self._recv_iv = int.from_bytes(recv_iv, "big")
        self._send_aead: ChaCha20Poly1305 | None = None
        self._recv_aead: ChaCha20Poly1305 | None = None
        self.send_seq = 0
        self.recv_seq = 0

    def next_epoch(self, client_nonce: bytes, server_nonce: bytes) -> Channel:
        """A copy of this channel in the key epoch a resumption with these nonces starts
        (NET-14): fresh keys, both sequence counters at 0; this channel is unchanged."""
        if len(client_nonce) != RESUME_NONCE_SIZE or len(server_nonce) != RESUME_NONCE_SIZE:
            raise ValueError(f"resumption nonces are {RESUME_NONCE_SIZE} bytes")
        epoch_secret = _expand(self._prk, LABEL_EPOCH + client_nonce + server_nonce, KEY_SIZE)
        return Channel.restore(
            ChannelState(
                self._prk, epoch_secret, 0, 0, self.resume_seq, self.sent_total, self.received_total
            ),
            is_client=self._is_client,
        )

    def release(self) -> None:
        """Drop the AEAD objects (rebuilt from the kept keys on next use)."""
        self._send_aead = self._recv_aead = None

    @property
    def is_hot(self) -> bool:
        """Whether an AEAD object is currently built."""
        return self._send_aead is not None or self._recv_aead is not None

    @property
    def sends_left(self) -> int:
        """Records this side may still seal in the current epoch (the last one is kept for CLOSE)."""
        return MAX_SEQ - self.send_seq

    def __repr__(self) -> str:
        return f"Channel(send_seq={self.send_seq}, recv_seq={self.recv_seq})"

    def _ad(self, direction: int, frame_type: FrameType, seq: int) -> bytes:
        return _AD.pack(self.session_handle, direction, frame_type, seq)

    def seal(self, frame_type: FrameType, plaintext: bytes) -> Record:
        """Encrypt the next outgoing record (ProtocolError if the epoch has no sequence number left)."""
        seq = self.send_seq
        return Record(seq, self.seal_payload(frame_type, plaintext)[_SEQ_SIZE:])

    def seal_payload(self, frame_type: FrameType, plaintext: bytes) -> bytes:
        """:meth:`seal`, returning the encoded record (the sealed frame's payload): the
        per-request path, which builds no :class:`Record`."""
        seq = self.send_seq
        if seq >= MAX_SEQ:
            raise ProtocolError("sequence numbers exhausted", ErrorCode.SEQUENCE_EXHAUSTED)
        aead = self._send_aead
        if aead is None:
            aead = self._send_aead = ChaCha20Poly1305(self._send_key)
        ciphertext = aead.encrypt(
            (self._send_iv ^ seq).to_bytes(NONCE_SIZE, "big"),
            plaintext,
            _AD.pack(self.session_handle, self._send_dir, frame_type, seq),
        )
        self.send_seq = seq + 1
        if self.sent_total < MAX_SEQ:
            self.sent_total += 1
        return _U64.pack(seq) + ciphertext

    def open(self, frame_type: FrameType, record: Record) -> bytes:
        """Verify and decrypt an incoming record; raise RemoteProtocolError(BAD_RECORD) if it fails."""
        return self.open_payload(frame_type, record.encode())

    def open_payload(self, frame_type: FrameType, payload: bytes) -> bytes:
        """:meth:`open` of an encoded record (a sealed frame's payload), decoded in place:
        the per-request path, which builds no :class:`Record`. A payload
        :meth:`Record.decode` refuses is refused with the same error."""
        if len(payload) < _SEQ_SIZE + TAG_SIZE:
            Record.decode(payload)  # raises the decoder's error for a truncated record
        (seq,) = _U64.unpack_from(payload)
        recv_seq = self.recv_seq
        if seq != recv_seq:
            if seq < recv_seq:
                raise RemoteProtocolError("replayed or reordered record", ErrorCode.BAD_RECORD)
            raise RemoteProtocolError("record out of sequence", ErrorCode.BAD_RECORD)
        if seq >= MAX_SEQ:
            raise RemoteProtocolError("sequence number out of range", ErrorCode.BAD_RECORD)
        aead = self._recv_aead
        if aead is None:
            aead = self._recv_aead = ChaCha20Poly1305(self._recv_key)
        try:
            plaintext = aead.decrypt(
                (self._recv_iv ^ seq).to_bytes(NONCE_SIZE, "big"),
                payload[_SEQ_SIZE:],
                _AD.pack(self.session_handle, self._recv_dir, frame_type, seq),
            )
        except InvalidTag:
            raise RemoteProtocolError("record failed authentication", ErrorCode.BAD_RECORD) from None
        self.recv_seq = seq + 1
        if self.received_total < MAX_SEQ:
            self.received_total += 1
        return plaintext

    def _resume_ad(self, seq: int) -> bytes:
        return self._ad(Direction.CLIENT_TO_SERVER, FrameType.RESUME, seq)

    def _resume_aead(self) -> tuple[ChaCha20Poly1305, bytes]:
        """The resume key's AEAD object and IV, derived when a RESUME is sealed or opened (once
        per resumption): an idle session does not keep them (P4)."""
        key = _expand(self._prk, LABEL_RESUME_KEY, KEY_SIZE)
        return ChaCha20Poly1305(key), _expand(self._prk, LABEL_RESUME_IV, NONCE_SIZE)

    def seal_resume(self, plaintext: bytes) -> Record:
        """Client: seal a RESUME record under the resume key at the next resume sequence number."""
        seq = self.resume_seq
        if seq >= MAX_SEQ:
            raise ProtocolError("resume sequence numbers exhausted", ErrorCode.SEQUENCE_EXHAUSTED)
        aead, iv = self._resume_aead()
        ciphertext = aead.encrypt(record_nonce(iv, seq), plaintext, self._resume_ad(seq))
        self.resume_seq = seq + 1
        return Record(seq, ciphertext)

    def open_resume(self, record: Record) -> bytes:
        """Server: open a RESUME record. Its sequence number may skip ahead (RESUMEs that never
        arrived), never back, so a replayed RESUME fails; on success later ones must be higher."""
        seq = record.seq
        if seq < self.resume_seq:
            raise RemoteProtocolError("replayed RESUME", ErrorCode.BAD_RECORD)
        if seq >= MAX_SEQ:
            raise RemoteProtocolError("sequence number out of range", ErrorCode.BAD_RECORD)
        aead, iv = self._resume_aead()
        try:
            plaintext = aead.decrypt(record_nonce(iv, seq), record.ciphertext, self._resume_ad(seq))
        except InvalidTag:
            raise RemoteProtocolError("RESUME failed authentication", ErrorCode.BAD_RECORD) from None
        self.resume_seq = seq + 1
        return plaintext


class HotChannels:
    """The channels allowed to keep their AEAD objects built: at most ``capacity``.
    Touching a channel that is not in the set when it is full releases one already in it,
    so memory for idle sessions stays at their keys (P4) while busy ones mostly pay nothing
    (a released channel rebuilds its AEAD objects on next use, about 3.5 µs for a request
    and its answer).

    The one released is picked pseudo-randomly, not the least recently used: when more
    sessions than ``capacity`` take turns (100 sessions each sending its next request once
    answered), least-recently-used would release each channel just before its next use and
    no request would find its channel built; a random pick keeps about 40% of them built.
    The pick is a fixed-seed generator (no secret, no injected randomness needed): which
    session stays hot only moves a few microseconds."""

    __slots__ = ("_capacity", "_index", "_last", "_pick", "_slots")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        #: The channels in the set, in no order; ``_index`` maps id(channel) to its slot.
        self._slots: list[Channel] = []
        self._index: dict[int, int] = {}
        #: The most recently touched channel (touched again, nothing to do): a request and its
        #: answer touch the same channel twice in a row.
        self._last: Channel | None = None
        self._pick = 0x9E3779B97F4A7C15

    def __len__(self) -> int:
        return len(self._slots)

    def touch(self, channel: Channel) -> None:
        """Mark ``channel`` as just used (the set holds it, so its id stays unique)."""
        if channel is self._last:
            return
        self._last = channel
        index = self._index
        key = id(channel)
        if key in index:
            return
        slots = self._slots
        if len(slots) < self._capacity:
            index[key] = len(slots)
            slots.append(channel)
            return
        # Full: a 64-bit LCG (Knuth's MMIX constants) picks the slot to hand over.
        self._pick = pick = (self._pick * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        slot = (pick >> 32) % len(slots)
        victim = slots[slot]
        del index[id(victim)]
        victim.release()
        slots[slot] = channel
        index[key] = slot

    def discard(self, channel: Channel) -> None:
        """Forget ``channel`` (its session ended) and drop its AEAD objects."""
        if channel is self._last:
            self._last = None
        slot = self._index.pop(id(channel), None)
        if slot is not None:
            slots = self._slots
            moved = slots.pop()
            if moved is not channel:
                slots[slot] = moved
                self._index[id(moved)] = slot
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
