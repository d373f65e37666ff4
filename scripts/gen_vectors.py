"""Regenerate or check the test vectors in ``tests/vectors/`` (issue #6).

The vectors are for people porting the protocol: every input and every expected
output is in the JSON files, so a port needs nothing from this repository but
the files and docs/protocol.md. Every value is computed here by ``keymgmt_proto``
itself; ``tests/core/test_vectors.py`` recomputes each one and compares, so a change
to the wire format breaks the suite.

Inputs that would be random (keys, nonces, user ids, ``r``, OPAQUE messages)
come from a counter-based deterministic generator: block ``i`` is
``SHA3-256(seed || u64(i))`` and the output is the blocks concatenated; each file
has its own seed (``SEED`` || file stem), so files do not shift each other.
A port takes these inputs as given and never needs the generator.

Usage::

    python scripts/gen_vectors.py --check   # exit 1 if a file differs from what the code computes
    python scripts/gen_vectors.py --write   # rewrite the files
    python scripts/gen_vectors.py           # list the files and their vector counts
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import json
import struct
import sys
import types
import typing
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path
from typing import cast

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from keymgmt_proto import (
    AUDIT_CHAIN_DOMAIN,
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    KEY_ID_CONTRIBUTION_DOMAIN,
    KEY_ID_DOMAIN,
    LABEL_AD_DOMAIN,
    LABEL_PAD_SIZE,
    MAX_SEALED_SIZE,
    MAX_SECRET_SIZE,
    MAX_SESSION_ID,
    PROTOCOL_VERSION,
    Action,
    AuditEntry,
    AuditRequest,
    AuditResponse,
    AuditType,
    ChangePasswordFinishRequest,
    ChangePasswordStartRequest,
    Channel,
    ChannelState,
    Context,
    CreateKeyIdRequest,
    DeleteAccountRequest,
    DeleteKeyRequest,
    Direction,
    Empty,
    ErrorCode,
    FrameType,
    KeyIdResponse,
    KeyInfo,
    KeyListResponse,
    ListKeysRequest,
    Op,
    OpRequest,
    OpResponse,
    Outcome,
    PasswordRegistrationResponse,
    RemoteProtocolError,
    RenameKeyRequest,
    RetrieveRequest,
    RetrieveStorageKeyRequest,
    SecretKind,
    SecretResponse,
    Status,
    StorageKeyResponse,
    StoredResponse,
    StoreSecretRequest,
    audit_chain_hash,
    audit_genesis_hash,
    decode_portable,
    decode_request,
    derive_key_id,
    derive_master_key,
    encode_portable,
    encode_response,
    encrypt_storage_key,
    hkdf_sha3,
    joint_key_id,
    label_ad,
    seal_label,
    seal_secret,
    secret_ad,
)
from keymgmt_proto.wire import (
    CHANNEL_SALT,
    LABEL_C2S_IV,
    LABEL_C2S_KEY,
    LABEL_EPOCH,
    LABEL_HANDLE,
    LABEL_RESUME_IV,
    LABEL_RESUME_KEY,
    LABEL_S2C_IV,
    LABEL_S2C_KEY,
    MASTER_KEY_INFO,
    SESSION_STATE_AD_PREFIX,
    SESSION_STATE_KEY_INFO,
    STORAGE_KEY_AD_SUFFIX,
    Abort,
    Close,
    CompleteRegistration,
    GoAway,
    LoginFinish,
    LoginResponse,
    LoginStart,
    Record,
    RegResponse,
    RegStart,
    RegUpload,
    Request,
    Response,
    Resume,
    Resumed,
    ResumedEnvelope,
    ResumeEnvelope,
    SessionState,
    Welcome,
    decode_header,
    encode_frame,
    seal_session_state,
    unseal_session_state,
)

ROOT = Path(__file__).resolve().parent.parent
VECTOR_DIR = ROOT / "tests" / "vectors"
SEED = b"keymgmt test vectors v1/"

JSON = dict[str, object]

CONVENTIONS = (
    "Byte strings are lower-case hex. Enum values are given by name (their numbers are in "
    "docs/protocol.md and show in the hex). Integers are JSON numbers: read them as 64-bit "
    "integers. Random-looking inputs come from a deterministic generator (scripts/gen_vectors.py); "
    "a port takes them as given. Regenerate with `python scripts/gen_vectors.py --write`; "
    "tests/test_vectors.py checks every value against keymgmt_proto."
)


# --------------------------------------------------------------------------- helpers


class Drbg:
    """Deterministic bytes: block i = SHA3-256(seed || u64(i)), concatenated."""

    def __init__(self, label: str) -> None:
        self._seed = SEED + label.encode("ascii")
        self._counter = 0
        self._buffer = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += hashlib.sha3_256(self._seed + struct.pack(">Q", self._counter)).digest()
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


def fixed_random(value: bytes) -> Callable[[int], bytes]:
    """An injected RandomSource that returns exactly ``value`` (of the requested length)."""

    def random(n: int) -> bytes:
        if n != len(value):
            raise ValueError(f"asked for {n} random bytes, have {len(value)}")
        return value

    return random


def to_json(value: object) -> object:
    """bytes -> hex, IntEnum -> name, dataclass -> object of its fields, tuple -> list."""
    if isinstance(value, IntEnum):
        return value.name
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, bool):
        raise TypeError("no booleans in message fields")
    if value is None or isinstance(value, int | str):
        return value
    if isinstance(value, tuple | list):
        return [to_json(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    raise TypeError(f"cannot put {type(value).__name__} in a vector")


def from_json(tp: object, data: object) -> object:
    """The inverse of :func:`to_json`, guided by the type annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin is types.UnionType or origin is typing.Union:
        if data is None:
            return None
        (inner,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return from_json(inner, data)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return tuple(from_json(inner, item) for item in cast(list[object], data))
    if isinstance(tp, type):
        if issubclass(tp, IntEnum):
            return tp[cast(str, data)]
        if tp is bytes:
            return bytes.fromhex(cast(str, data))
        if tp is int or tp is str:
            if not isinstance(data, tp):
                raise TypeError(f"expected {tp.__name__}, got {data!r}")
            return data
        if dataclasses.is_dataclass(tp):
            return build(tp, cast(JSON, data))
    raise TypeError(f"unsupported field type {tp!r}")


def build(cls: type, fields: JSON) -> object:
    """Construct ``cls`` from the JSON form of its fields (every field must be given)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if set(fields) != set(names):
        raise ValueError(f"{cls.__name__}: fields {sorted(fields)} != {sorted(names)}")
    return cls(**{name: from_json(hints[name], fields[name]) for name in names})


def describe(what: str, fields: dict[str, str]) -> JSON:
    return {"what": what, "conventions": CONVENTIONS, "fields": fields}


def message_vector(name: str, message: object) -> JSON:
    frame_type = getattr(message, "FRAME_TYPE", None)
    encode = cast(Callable[[], bytes], getattr(message, "encode"))  # noqa: B009 - every class has it
    return {
        "name": name,
        "class": type(message).__name__,
        "frame_type": frame_type.name if isinstance(frame_type, FrameType) else None,
        "sealed": bool(frame_type.sealed) if isinstance(frame_type, FrameType) else None,
        "fields": to_json(message),
        "encoding": encode().hex(),
    }


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA3_256(), length=length, info=info).derive(prk)


def _nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, bytes(4) + struct.pack(">Q", seq), strict=True))


def epoch_keys(epoch_secret: bytes) -> dict[str, bytes]:
    """The four directional keys and IVs of one key epoch."""
    return {
        "c2s_key": _expand(epoch_secret, LABEL_C2S_KEY, 32),
        "c2s_iv": _expand(epoch_secret, LABEL_C2S_IV, 12),
        "s2c_key": _expand(epoch_secret, LABEL_S2C_KEY, 32),
        "s2c_iv": _expand(epoch_secret, LABEL_S2C_IV, 12),
    }


def key_schedule(session_key: bytes) -> dict[str, bytes]:
    """The channel key schedule computed from the documented labels (not through Channel);
    the directional keys are those of epoch 0, whose secret is prk itself."""
    prk = hmac.digest(CHANNEL_SALT, session_key, "sha3_256")
    return {
        "prk": prk,
        "session_handle": _expand(prk, LABEL_HANDLE, 16),
        **epoch_keys(prk),
        "resume_key": _expand(prk, LABEL_RESUME_KEY, 32),
        "resume_iv": _expand(prk, LABEL_RESUME_IV, 12),
    }


def channel_at(session_key: bytes, *, is_client: bool, send_seq: int = 0, recv_seq: int = 0) -> Channel:
    channel = Channel(session_key, is_client=is_client)
    channel.send_seq = send_seq
    channel.recv_seq = recv_seq
    return channel


def ad_of(handle: bytes, direction: Direction, frame_type: FrameType, seq: int) -> bytes:
    return handle + struct.pack(">BBQ", direction, frame_type, seq)


# --------------------------------------------------------------------------- framing


def framing() -> JSON:
    rng = Drbg("framing")
    payloads: dict[FrameType, tuple[int, bytes]] = {
        FrameType.GOAWAY: (0, GoAway(ErrorCode.FRAME_TOO_LARGE, "").encode()),
        FrameType.REG_START: (1, RegStart(b"alice@example.org", rng(32)).encode()),
        FrameType.REG_RESPONSE: (1, RegResponse(rng(64)).encode()),
        FrameType.REG_UPLOAD: (1, RegUpload(rng(192)).encode()),
        FrameType.LOGIN_START: (2, LoginStart(b"alice@example.org", rng(96)).encode()),
        FrameType.LOGIN_RESPONSE: (2, LoginResponse(rng(320)).encode()),
        FrameType.LOGIN_FINISH: (2, LoginFinish(rng(64)).encode()),
        FrameType.ABORT: (MAX_SESSION_ID, Abort(ErrorCode.THROTTLED, "try later").encode()),
    }
    frames = []
    for frame_type in FrameType:
        if frame_type in payloads:
            session_id, payload = payloads[frame_type]
        else:  # sealed: the payload is a record (here with arbitrary ciphertext bytes)
            session_id = 3 + int(frame_type) - 0x20
            payload = Record(int(frame_type) - 0x20, rng(16 + int(frame_type) - 0x20)).encode()
            if frame_type is FrameType.RESUME:
                payload = ResumeEnvelope(rng(16), Record(5, rng(16 + 40))).encode()
            elif frame_type is FrameType.RESUMED:
                payload = ResumedEnvelope(rng(32), Record(0, rng(16))).encode()
        frames.append(
            {
                "frame_type": frame_type.name,
                "type_byte": int(frame_type),
                "sealed": frame_type.sealed,
                "session_id": session_id,
                "payload": payload.hex(),
                "frame": encode_frame(frame_type, session_id, payload).hex(),
            }
        )

    def header(version: int, type_byte: int, session_id: int, length: int) -> bytes:
        return struct.pack(">BBII", version, type_byte, session_id, length)

    cases = [
        ("largest payload the default limit accepts", header(1, 0x22, 7, DEFAULT_MAX_PAYLOAD)),
        ("highest session id", header(1, 0x04, MAX_SESSION_ID, 114)),
        ("empty payload", header(1, 0x26, 1, 0)),
        ("version 0", header(0, 0x04, 1, 114)),
        ("version 2", header(2, 0x04, 1, 114)),
        ("unknown type 0x07", header(1, 0x07, 1, 0)),
        ("unknown type 0x27", header(1, 0x27, 1, 24)),
        ("session id with the top bit set", header(1, 0x22, MAX_SESSION_ID + 1, 24)),
        ("length one over the limit", header(1, 0x22, 1, DEFAULT_MAX_PAYLOAD + 1)),
        ("truncated header (9 bytes)", header(1, 0x22, 1, 24)[:9]),
    ]
    headers = []
    for name, raw in cases:
        entry: JSON = {"name": name, "header": raw.hex(), "max_payload": DEFAULT_MAX_PAYLOAD}
        try:
            frame_type, session_id, length = decode_header(raw, DEFAULT_MAX_PAYLOAD)
        except RemoteProtocolError as exc:
            entry["error"] = exc.code.name
        else:
            entry["accepted"] = {"frame_type": frame_type.name, "session_id": session_id, "length": length}
        headers.append(entry)
    return {
        "description": describe(
            "Frame header and framing of every FrameType (docs/protocol.md section 3). A frame is "
            f"version u8 ({PROTOCOL_VERSION}) || type u8 || session_id u32 || length u32 || payload; "
            f"the header is {HEADER_SIZE} bytes, big-endian. For sealed types the payload here is a "
            "record with arbitrary ciphertext bytes: framing does not look inside.",
            {
                "frames[].frame_type / type_byte": "the FrameType name and its byte",
                "frames[].sealed": "true for types 0x20 and up (payload is an AEAD record)",
                "frames[].session_id": "u32 session id in the header (0 = the connection)",
                "frames[].payload": "payload bytes",
                "frames[].frame": "the whole frame: header || payload",
                "headers[].header": "a 10-byte header (or a truncated one) checked with max_payload",
                "headers[].accepted": "the decoded header, when it is valid",
                "headers[].error": "the ErrorCode the receiver reports (a connection error)",
            },
        ),
        "frames": frames,
        "headers": headers,
    }


# --------------------------------------------------------------------------- messages


def messages() -> JSON:
    rng = Drbg("messages")
    user_id = rng(16)
    samples: list[tuple[str, object]] = [
        ("goaway empty reason", GoAway(ErrorCode.FRAME_TOO_LARGE, "")),
        ("goaway with reason", GoAway(ErrorCode.UNSUPPORTED_VERSION, "unsupported protocol version 2")),
        # what the key server sends a connection whose unproductive input ran out (section 10)
        ("goaway unproductive input", GoAway(ErrorCode.LIMIT_EXCEEDED, "too much input that does nothing")),
        ("reg_start", RegStart(b"alice@example.org", rng(32))),
        ("reg_start one-byte name", RegStart(b"a", rng(32))),
        ("reg_response", RegResponse(rng(64))),
        ("reg_upload", RegUpload(rng(192))),
        ("login_start", LoginStart(b"alice@example.org", rng(96))),
        ("login_start 255-byte name", LoginStart(b"n" * 255, rng(96))),
        ("login_response", LoginResponse(rng(320))),
        ("login_finish", LoginFinish(rng(64))),
        ("abort with reason", Abort(ErrorCode.THROTTLED, "try later")),
        ("abort empty reason", Abort(ErrorCode.UNKNOWN_SESSION, "")),
        ("record seq 0", Record(0, rng(16))),
        ("record large seq", Record(2**32 + 7, rng(21))),
        ("resume envelope", ResumeEnvelope(rng(16), Record(5, rng(16 + 40)))),
        ("resumed envelope", ResumedEnvelope(rng(32), Record(0, rng(16)))),
        ("welcome", Welcome(user_id)),
        ("complete_registration", CompleteRegistration(user_id, rng(60))),
        ("request empty body", Request(1, b"")),
        ("request", Request(7, b"hello")),
        ("response highest request id", Response(2**32 - 1, rng(10))),
        ("close ok", Close(ErrorCode.OK)),
        ("close logout", Close(ErrorCode.CLIENT_CLOSED)),
        ("resume body", Resume(rng(32), 7)),
        ("resumed body", Resumed()),
    ]
    rejected = [
        ("RegStart", b"\x00" + rng(32), "account_name_len 0"),
        ("RegStart", b"\x01a" + rng(31), "registration_request one byte short"),
        ("LoginStart", b"\x01a" + rng(96) + b"\x00", "trailing byte"),
        ("RegResponse", rng(65), "wrong fixed size"),
        ("Abort", b"\x00\x63\x00", "unknown error code 99"),
        ("Abort", b"\x00\x07\x02\x00\x01", "reason not printable ASCII"),
        ("Abort", b"\x00\x07\x05abc", "reason shorter than its length byte"),
        ("Close", b"\x00", "truncated code"),
        ("Request", b"\x00\x00\x00\x00body", "request_id 0"),
        ("Request", b"\x00\x00\x01", "shorter than a request_id"),
        ("Record", bytes(8) + rng(15), "ciphertext shorter than the tag"),
        ("Welcome", rng(17), "trailing byte after user_id"),
        ("Resume", rng(32) + bytes(7), "received_total one byte short"),
        ("Resumed", b"\x00", "RESUMED body must be empty"),
        ("ResumeEnvelope", rng(16 + 8 + 15), "record ciphertext shorter than the tag"),
        ("ResumedEnvelope", rng(31), "shorter than the server nonce"),
    ]
    return {
        "description": describe(
            "Every payload class of keymgmt_proto._messages (docs/protocol.md section 4). For "
            "clear frame types the encoding is the frame payload; for sealed types it is the "
            "plaintext inside the record; Record, ResumeEnvelope and ResumedEnvelope are the "
            "sealed payload layouts themselves. OPAQUE messages are arbitrary bytes of the right size (the "
            "encoding does not parse them).",
            {
                "vectors[].class": "the keymgmt_proto._messages class",
                "vectors[].frame_type": "the frame type it travels in (null for the envelopes and Record)",
                "vectors[].sealed": "whether that frame type is sealed (null for the envelopes)",
                "vectors[].fields": "the field values, by the class's field names",
                "vectors[].encoding": "the one valid encoding of those fields",
                "rejected[].encoding": "bytes the decoder of `class` must reject (MALFORMED)",
                "rejected[].why": "what is wrong with them",
            },
        ),
        "vectors": [message_vector(name, message) for name, message in samples],
        "rejected": [{"class": cls, "encoding": raw.hex(), "why": why} for cls, raw, why in rejected],
    }


# --------------------------------------------------------------------------- operations


def ops() -> JSON:
    rng = Drbg("ops")
    user_id = rng(16)
    client_nonce, server_nonce = rng(32), rng(32)
    key_a, key_b = joint_key_id(user_id, client_nonce, server_nonce), derive_key_id(user_id, rng(32))
    generated_sealed, imported_sealed = rng(12 + 32 + 16), rng(12 + 5 + 16)
    large_sealed = rng(12 + 256 + 16)
    next_client_nonce, next_server_nonce = rng(32), rng(32)
    next_key = joint_key_id(user_id, next_client_nonce, next_server_nonce)
    t0 = 1_700_000_000_123_456
    accounts_rng = Drbg("ops accounts")
    more = Drbg("ops: labels and the audit chain")  # (rng's draws, and so the older vectors, stay)
    storage_key = more(32)
    label_sealed = seal_label(storage_key, user_id, key_a, "backup key", fixed_random(more(12)))
    entry_6_hash = more(32)
    requests: list[tuple[str, OpRequest]] = [
        ("retrieve storage key", RetrieveStorageKeyRequest(user_id)),
        ("create key id generated", CreateKeyIdRequest(user_id, SecretKind.GENERATED, client_nonce)),
        ("create key id imported", CreateKeyIdRequest(user_id, SecretKind.IMPORTED, rng(32))),
        ("store generated", StoreSecretRequest(user_id, key_a, SecretKind.GENERATED, generated_sealed)),
        ("store imported", StoreSecretRequest(user_id, key_b, SecretKind.IMPORTED, imported_sealed)),
        ("store imported 256 bytes", StoreSecretRequest(user_id, key_b, SecretKind.IMPORTED, large_sealed)),
        (
            "store generated asking for the next key id",
            StoreSecretRequest(
                user_id,
                key_a,
                SecretKind.GENERATED,
                generated_sealed,
                SecretKind.GENERATED,
                next_client_nonce,
            ),
        ),
        *[(f"retrieve {c.name.lower()}", RetrieveRequest(user_id, key_a, c)) for c in Context],
        ("audit all, defaults", AuditRequest(user_id, AuditType.ALL)),
        (
            "audit key only, two keys, both bounds, cursor",
            AuditRequest(user_id, AuditType.KEY_ONLY, (key_a, key_b), t0, t0 + 10**6, 42, 10),
        ),
        ("audit system only, before only", AuditRequest(user_id, AuditType.SYSTEM_ONLY, before=t0)),
        ("list keys first page", ListKeysRequest(user_id)),
        ("list keys later page", ListKeysRequest(user_id, 1024, 5)),
        ("delete key", DeleteKeyRequest(user_id, key_a)),
        # Issue 16 (their own random source, so the vectors above keep their values)
        ("change password start", ChangePasswordStartRequest(user_id, accounts_rng(32))),
        ("change password finish", ChangePasswordFinishRequest(user_id, accounts_rng(192), accounts_rng(60))),
        ("delete account", DeleteAccountRequest(user_id)),
        ("rename key", RenameKeyRequest(user_id, key_a, label_sealed)),
        ("rename key, removing its label", RenameKeyRequest(user_id, key_a, b"")),
    ]
    unchained = (
        AuditEntry(7, Action.RETRIEVE, t0, Outcome.SUCCESS, key_a, Context.EXPORT),
        AuditEntry(8, Action.AUDIT, t0 + 76_544, Outcome.SUCCESS),
        AuditEntry(9, Action.RETRIEVE, t0 + 100_000, Outcome.FAILURE, key_b, Context.NULL),
        AuditEntry(10, Action.LOGIN, t0 + 200_000, Outcome.FAILURE),
    )
    chained, previous = [], entry_6_hash
    for entry in unchained:  # each entry's hash continues from the one before (section 12.9)
        previous = audit_chain_hash(user_id, previous, entry)
        chained.append(dataclasses.replace(entry, chain_hash=previous))
    entries = tuple(chained)
    ok: list[tuple[str, Op, OpResponse]] = [
        ("storage key", Op.RETRIEVE_STORAGE_KEY, StorageKeyResponse(rng(60))),
        ("key id", Op.CREATE_KEY_ID, KeyIdResponse(key_a, server_nonce)),
        ("stored", Op.STORE_SECRET, StoredResponse()),
        ("stored with the next key id", Op.STORE_SECRET, StoredResponse(next_key, next_server_nonce)),
        (
            "secret generated",
            Op.RETRIEVE,
            SecretResponse(
                SecretKind.GENERATED, generated_sealed, secret_ad(user_id, key_a, SecretKind.GENERATED)
            ),
        ),
        (
            "secret imported",
            Op.RETRIEVE,
            SecretResponse(
                SecretKind.IMPORTED, imported_sealed, secret_ad(user_id, key_b, SecretKind.IMPORTED)
            ),
        ),
        (
            "secret imported 256 bytes",
            Op.RETRIEVE,
            SecretResponse(SecretKind.IMPORTED, large_sealed, secret_ad(user_id, key_b, SecretKind.IMPORTED)),
        ),
        ("audit page with more", Op.AUDIT, AuditResponse(entries[:2], 8)),
        ("audit last page", Op.AUDIT, AuditResponse(entries[2:], 0)),
        ("audit empty", Op.AUDIT, AuditResponse((), 0)),
        (
            "key list",
            Op.LIST_KEYS,
            KeyListResponse(
                (KeyInfo(key_a, SecretKind.GENERATED, t0), KeyInfo(key_b, SecretKind.IMPORTED, t0 + 1)), 0
            ),
        ),
        (
            "key list with a label",
            Op.LIST_KEYS,
            KeyListResponse(
                (
                    KeyInfo(key_a, SecretKind.GENERATED, t0, label_sealed),
                    KeyInfo(key_b, SecretKind.IMPORTED, t0 + 1),
                ),
                0,
            ),
        ),
        (
            "key list page with more",
            Op.LIST_KEYS,
            KeyListResponse((KeyInfo(key_a, SecretKind.GENERATED, t0),), 1),
        ),
        ("key list empty", Op.LIST_KEYS, KeyListResponse((), 0)),
        ("deleted", Op.DELETE_KEY, Empty()),
        (
            "password registration response",
            Op.CHANGE_PASSWORD_START,
            PasswordRegistrationResponse(accounts_rng(64)),
        ),
        ("password changed", Op.CHANGE_PASSWORD_FINISH, Empty()),
        ("account deleted", Op.DELETE_ACCOUNT, Empty()),
        ("renamed", Op.RENAME_KEY, Empty()),
    ]
    responses: list[JSON] = [
        {
            "name": name,
            "op": op.name,
            "status": Status.OK.name,
            "class": type(response).__name__,
            "fields": to_json(response),
            "encoding": encode_response(Status.OK, response).hex(),
        }
        for name, op, response in ok
    ]
    for status in Status:
        if status is not Status.OK:
            responses.append(
                {
                    "name": f"error {status.name.lower()}",
                    "op": Op.RETRIEVE.name,
                    "status": status.name,
                    "class": None,
                    "fields": None,
                    "encoding": encode_response(status).hex(),
                }
            )
    retrieve = RetrieveRequest(user_id, key_a, Context.NULL).encode()
    store = StoreSecretRequest(user_id, key_a, SecretKind.GENERATED, generated_sealed).encode()
    rejected_requests = [
        (b"", "empty body"),
        (b"\xee" + user_id, "unknown op"),
        (retrieve[:-1] + b"\x09", "unknown retrieve context"),
        (retrieve + b"\x00", "trailing byte"),
        (retrieve[:-1], "truncated"),
        (
            store[:34] + b"\x00\x00\x00\x3d" + generated_sealed + b"\x00",
            "generated secret sealed to 61 bytes",
        ),
        (store[:34] + b"\x00\x3c" + generated_sealed, "sealed length as u16 (it is u32)"),
        (store[:-1], "store without its next-key-id flag"),
        (store[:-1] + b"\x02", "next-key-id flag 2"),
        (store[:-1] + b"\x01\x03" + next_client_nonce, "next key id of an unknown kind"),
        (store[:-1] + b"\x01\x01" + next_client_nonce[:31], "next key id with a 31-byte nonce"),
        (
            store[:33] + bytes([SecretKind.IMPORTED]) + struct.pack(">I", MAX_SEALED_SIZE + 1),
            "sealed length 65565 (a 65537-byte secret): over the limit, refused before the bytes",
        ),
        (
            store[:33] + bytes([SecretKind.IMPORTED]) + struct.pack(">I", 28),
            "imported secret sealed to 28 bytes (an empty secret)",
        ),
        (
            bytes([Op.AUDIT]) + user_id + b"\x01\x00\x01" + key_a + b"\x00\x00" + bytes(8) + b"\x01\x00",
            "key ids with audit type SYSTEM_ONLY",
        ),
        (bytes([Op.AUDIT]) + user_id + b"\x03\x00\x00\x02" + bytes(8 + 8 + 2), "optional flag 2"),
        (bytes([Op.LIST_KEYS]) + user_id + bytes(4) + b"\x00\x00", "list limit 0"),
        (bytes([Op.RENAME_KEY]) + user_id + key_a + b"\x1c" + bytes(28), "sealed label of 28 bytes (empty)"),
        (bytes([Op.RENAME_KEY]) + user_id + key_a + b"\x5d" + bytes(93), "sealed label of 93 bytes (65)"),
        (bytes([Op.RENAME_KEY]) + user_id + key_a, "rename without its label length"),
    ]
    for body, why in rejected_requests:  # keep the file honest: each must really be rejected
        try:
            decode_request(body)
        except RemoteProtocolError:
            continue
        raise AssertionError(f"rejected request vector {why!r} decodes")
    return {
        "description": describe(
            "Every operation request and response body of keymgmt_proto._ops (docs/protocol.md "
            "section 12): the bodies carried in REQUEST and RESPONSE. A request is op u8 || "
            "user_id[16] || fields; a response is status u8, then the op's fields when OK. A "
            "response is decoded according to the op of its request. Ciphertexts are arbitrary "
            "bytes of valid sizes.",
            {
                "requests[].class / op": "the request class and its Op",
                "requests[].fields": "field values by name (key_ids is a list; after/before may be null)",
                "requests[].encoding": "the request body",
                "responses[].op": "the op of the request being answered",
                "responses[].status": "the Status; non-OK responses are exactly one byte",
                "responses[].class / fields": "the OK response class and its fields (null for errors)",
                "responses[].encoding": "the response body",
                "rejected_requests[].encoding": "request bodies the server must refuse as INVALID",
            },
        ),
        "requests": [
            {
                "name": name,
                "op": request.op.name,
                "class": type(request).__name__,
                "fields": to_json(request),
                "encoding": request.encode().hex(),
            }
            for name, request in requests
        ],
        "responses": responses,
        "rejected_requests": [{"encoding": body.hex(), "why": why} for body, why in rejected_requests],
    }


# --------------------------------------------------------------------------- key schedule, channel


LABELS = {
    "CHANNEL_SALT": CHANNEL_SALT,
    "LABEL_HANDLE": LABEL_HANDLE,
    "LABEL_C2S_KEY": LABEL_C2S_KEY,
    "LABEL_C2S_IV": LABEL_C2S_IV,
    "LABEL_S2C_KEY": LABEL_S2C_KEY,
    "LABEL_S2C_IV": LABEL_S2C_IV,
    "LABEL_RESUME_KEY": LABEL_RESUME_KEY,
    "LABEL_RESUME_IV": LABEL_RESUME_IV,
    "LABEL_EPOCH": LABEL_EPOCH,
}


def key_schedule_file() -> JSON:
    rng = Drbg("key_schedule")
    session_keys = [bytes(range(64)), rng(64), rng(64), bytes(64)]
    return {
        "description": describe(
            "The channel key schedule (NET-7, CRY-3; docs/protocol.md section 5.1) for given "
            "OPAQUE session keys: prk = HKDF-Extract(salt = CHANNEL_SALT, IKM = session_key) = "
            "HMAC-SHA3-256(CHANNEL_SALT, session_key); each output = HKDF-Expand-SHA3-256(prk, "
            "label, length). The directional keys are those of key epoch 0 (whose secret is prk); "
            "resumption.json shows a later epoch. The first session key (00 01 .. 3f) is the "
            "worked example of docs/protocol.md section 11.",
            {
                "labels": "the salt and info labels, as ASCII",
                "vectors[].session_key": "the 64-byte OPAQUE session_key (input)",
                "vectors[].prk": "HKDF-Extract output (32 bytes)",
                "vectors[].session_handle": "Expand(prk, LABEL_HANDLE, 16)",
                "vectors[].c2s_key / c2s_iv": "Expand(prk, LABEL_C2S_KEY, 32), Expand(prk, LABEL_C2S_IV, 12)",
                "vectors[].s2c_key / s2c_iv": "Expand(prk, LABEL_S2C_KEY, 32), Expand(prk, LABEL_S2C_IV, 12)",
                "vectors[].resume_key / resume_iv": (
                    "Expand(prk, LABEL_RESUME_KEY, 32), Expand(prk, LABEL_RESUME_IV, 12): they seal "
                    "RESUME records"
                ),
            },
        ),
        "labels": {name: value.decode("ascii") for name, value in LABELS.items()},
        "vectors": [
            {"session_key": key.hex(), **{name: value.hex() for name, value in key_schedule(key).items()}}
            for key in session_keys
        ],
    }


def sealed_record(session_key: bytes, sender: str, frame_type: FrameType, seq: int, plaintext: bytes) -> JSON:
    channel = channel_at(session_key, is_client=sender == "client", send_seq=seq)
    record = channel.seal(frame_type, plaintext)
    schedule = key_schedule(session_key)
    direction = Direction.CLIENT_TO_SERVER if sender == "client" else Direction.SERVER_TO_CLIENT
    iv = schedule["c2s_iv" if sender == "client" else "s2c_iv"]
    return {
        "sender": sender,
        "direction": direction.name,
        "frame_type": frame_type.name,
        "seq": seq,
        "plaintext": plaintext.hex(),
        "nonce": _nonce(iv, seq).hex(),
        "ad": ad_of(channel.session_handle, direction, frame_type, seq).hex(),
        "record": record.encode().hex(),
    }


def channel_file() -> JSON:
    rng = Drbg("channel")
    session_key, other_key = rng(64), rng(64)
    cases = [
        ("server", FrameType.WELCOME, 0, Welcome(rng(16)).encode()),
        ("client", FrameType.REQUEST, 0, Request(1, b"hi").encode()),
        ("client", FrameType.REQUEST, 1, Request(2, rng(40)).encode()),
        ("server", FrameType.RESPONSE, 3, Response(2, rng(33)).encode()),
        ("server", FrameType.RESUMED, 0, Resumed().encode()),
        ("server", FrameType.RESPONSE, 2**32 + 1, Response(9, b"").encode()),
        ("client", FrameType.CLOSE, 7, Close(ErrorCode.CLIENT_CLOSED).encode()),
        ("server", FrameType.CLOSE, 9, Close(ErrorCode.IDLE_TIMEOUT).encode()),
    ]
    records = [sealed_record(session_key, *case) for case in cases]
    request0 = bytes.fromhex(cast(str, records[1]["record"]))
    request1 = bytes.fromhex(cast(str, records[2]["record"]))
    foreign = (
        channel_at(other_key, is_client=True).seal(FrameType.REQUEST, Request(1, b"hi").encode()).encode()
    )
    tampered = request0[:-1] + bytes([request0[-1] ^ 0x01])
    rejections: list[tuple[str, str, int, FrameType, bytes]] = [
        ("replay: seq below the expected one", "server", 1, FrameType.REQUEST, request0),
        ("gap: seq above the expected one", "server", 0, FrameType.REQUEST, request1),
        ("opened as another frame type", "server", 0, FrameType.CLOSE, request0),
        ("reflected: the sender's own direction", "client", 0, FrameType.REQUEST, request0),
        ("tag altered", "server", 0, FrameType.REQUEST, tampered),
        ("truncated by one byte", "server", 0, FrameType.REQUEST, request0[:-1]),
        ("sealed under another session's keys", "server", 0, FrameType.REQUEST, foreign),
    ]
    for _why, receiver, expected, frame_type, raw in rejections:  # must really fail
        channel = channel_at(session_key, is_client=receiver == "client", recv_seq=expected)
        try:
            channel.open(frame_type, Record.decode(raw))
        except RemoteProtocolError:
            continue
        raise AssertionError(f"channel rejection vector {_why!r} opens")
    return {
        "description": describe(
            "Channel records (NET-7, CRY-2; docs/protocol.md sections 4.2 and 5.2-5.3) for one "
            "session key at given sequence numbers. nonce = iv XOR (0^4 || u64(seq)); AD = "
            "session_handle || u8(direction) || u8(frame_type) || u64(seq); record = u64(seq) || "
            "ChaCha20-Poly1305(key, nonce, plaintext, AD) (ciphertext || tag). The client seals "
            "with c2s_key/c2s_iv, the server with s2c_key/s2c_iv (see key_schedule.json; they are "
            "repeated here).",
            {
                "session_key": "the OPAQUE session_key both sides hold (input)",
                "schedule": "its key schedule (as in key_schedule.json)",
                "records[].sender": "client or server (who seals)",
                "records[].direction": "Direction bound into the AD",
                "records[].frame_type": "the frame type bound into the AD",
                "records[].seq": "the sender's sequence number for this record",
                "records[].plaintext / nonce / ad": "AEAD inputs",
                "records[].record": "the sealed frame's payload: u64(seq) || ciphertext || tag",
                "rejections[]": (
                    "records the receiver must refuse (BAD_RECORD): receiver = who opens, "
                    "expected_seq = its next expected seq, frame_type = the type it opens as"
                ),
            },
        ),
        "session_key": session_key.hex(),
        "schedule": {name: value.hex() for name, value in key_schedule(session_key).items()},
        "records": records,
        "rejections": [
            {
                "why": why,
                "receiver": receiver,
                "expected_seq": expected,
                "frame_type": frame_type.name,
                "record": raw.hex(),
            }
            for why, receiver, expected, frame_type, raw in rejections
        ],
    }


def _aead_seal(key: bytes, iv: bytes, seq: int, plaintext: bytes, ad: bytes) -> bytes:
    """``u64(seq) || ChaCha20-Poly1305(key, iv XOR seq, plaintext, ad)``, from the documentation."""
    return struct.pack(">Q", seq) + ChaCha20Poly1305(key).encrypt(_nonce(iv, seq), plaintext, ad)


def resumption_file() -> JSON:
    rng = Drbg("resumption")
    session_key = rng(64)
    schedule = key_schedule(session_key)
    handle, prk = schedule["session_handle"], schedule["prk"]
    resume_seq, received_total, server_sent_total, new_session_id = 1, 4, 5, 9
    client_nonce, server_nonce = rng(32), rng(32)
    resume_plaintext = client_nonce + struct.pack(">Q", received_total)
    resume_ad = ad_of(handle, Direction.CLIENT_TO_SERVER, FrameType.RESUME, resume_seq)
    resume_record = _aead_seal(
        schedule["resume_key"], schedule["resume_iv"], resume_seq, resume_plaintext, resume_ad
    )
    envelope = handle + resume_record
    epoch_secret = _expand(prk, LABEL_EPOCH + client_nonce + server_nonce, 32)
    epoch = epoch_keys(epoch_secret)
    resumed_ad = ad_of(handle, Direction.SERVER_TO_CLIENT, FrameType.RESUMED, 0)
    resumed_record = _aead_seal(epoch["s2c_key"], epoch["s2c_iv"], 0, b"", resumed_ad)
    resumed_payload = server_nonce + resumed_record
    request = Request(3, b"again").encode()
    request_ad = ad_of(handle, Direction.CLIENT_TO_SERVER, FrameType.REQUEST, 0)
    request_record = _aead_seal(epoch["c2s_key"], epoch["c2s_iv"], 0, request, request_ad)
    rollback_plaintext = client_nonce + struct.pack(">Q", server_sent_total + 1)
    rollback_record = _aead_seal(
        schedule["resume_key"],
        schedule["resume_iv"],
        resume_seq + 1,
        rollback_plaintext,
        ad_of(handle, Direction.CLIENT_TO_SERVER, FrameType.RESUME, resume_seq + 1),
    )

    # The implementation must agree with the construction above, step by step.
    client = Channel(session_key, is_client=True)
    client.resume_seq, client.received_total = resume_seq, received_total
    assert client.seal_resume(Resume(client_nonce, received_total).encode()).encode() == resume_record
    server = Channel(session_key, is_client=False)
    server.sent_total = server_sent_total
    assert Resume.decode(server.open_resume(Record.decode(resume_record))).client_nonce == client_nonce
    try:
        server.open_resume(Record.decode(resume_record))
        raise AssertionError("a replayed RESUME opens")
    except RemoteProtocolError:
        pass
    server_epoch = server.next_epoch(client_nonce, server_nonce)
    assert server_epoch.seal(FrameType.RESUMED, b"").encode() == resumed_record
    client_epoch = client.next_epoch(client_nonce, server_nonce)
    assert client_epoch.open(FrameType.RESUMED, Record.decode(resumed_record)) == b""
    assert client_epoch.seal(FrameType.REQUEST, request).encode() == request_record
    return {
        "description": describe(
            "Resumption and key epochs (NET-2, NET-14; docs/protocol.md sections 4.2, 5.4 and 8.3). "
            "On a new connection the client opens a new session id with RESUME: payload = "
            "session_handle[16] || resume record. The resume record is sealed under resume_key / "
            "resume_iv (key_schedule.json) at the client's resume sequence number, AD = handle || "
            "u8(1) || u8(0x25) || u64(seq); its plaintext is client_nonce[32] || u64(the number of "
            "records the client has received from the server over the session's life). The "
            "server accepts a resume seq at or above the next it expects (RESUMEs may be lost), "
            "never below, and refuses a received count above the records it has sealed (its "
            "state was rolled back). It answers RESUMED: server_nonce[32] || a record sealed at "
            "seq 0 of the new key epoch: epoch secret = HKDF-Expand(prk, LABEL_EPOCH || "
            "client_nonce || server_nonce, 32), and the epoch's keys and IVs are expanded from it "
            "with the usual labels. Both directions restart at seq 0 in the new epoch; the "
            "client then re-sends its unanswered requests there.",
            {
                "session_key": "the session's OPAQUE session_key",
                "session_handle": "from the key schedule",
                "resume_key / resume_iv": "from the key schedule",
                "resume_seq": "the client's next resume sequence number (an earlier RESUME was lost)",
                "received_total": "records the client has received from the server (all epochs)",
                "server_sent_total": "records the server's state says it has sealed (all epochs)",
                "client_nonce / server_nonce": "each side's 32 random bytes for the new epoch",
                "resume_plaintext": "client_nonce || u64(received_total)",
                "resume_record": "u64(resume_seq) || ciphertext || tag",
                "resume_payload / resume_frame": "handle || resume_record, and the whole frame",
                "epoch_secret": "HKDF-Expand(prk, LABEL_EPOCH || client_nonce || server_nonce, 32)",
                "epoch": "the new epoch's c2s/s2c keys and IVs",
                "resumed_payload / resumed_frame": "server_nonce || record (seq 0, empty plaintext)",
                "request_after / request_after_frame": (
                    "the first REQUEST of the new epoch (request id 3, body 'again', c2s seq 0)"
                ),
                "replay_rejected": "the same RESUME a second time must fail (UNKNOWN_SESSION)",
                "rollback_record": (
                    "a genuine RESUME (resume seq 2) whose received count exceeds server_sent_total: "
                    "the server must refuse it (UNKNOWN_SESSION)"
                ),
            },
        ),
        "session_key": session_key.hex(),
        "session_handle": handle.hex(),
        "resume_key": schedule["resume_key"].hex(),
        "resume_iv": schedule["resume_iv"].hex(),
        "resume_seq": resume_seq,
        "received_total": received_total,
        "server_sent_total": server_sent_total,
        "new_session_id": new_session_id,
        "client_nonce": client_nonce.hex(),
        "server_nonce": server_nonce.hex(),
        "resume_plaintext": resume_plaintext.hex(),
        "resume_record": resume_record.hex(),
        "resume_payload": envelope.hex(),
        "resume_frame": encode_frame(FrameType.RESUME, new_session_id, envelope).hex(),
        "epoch_secret": epoch_secret.hex(),
        "epoch": {name: value.hex() for name, value in epoch.items()},
        "resumed_payload": resumed_payload.hex(),
        "resumed_frame": encode_frame(FrameType.RESUMED, new_session_id, resumed_payload).hex(),
        "request_after": request_record.hex(),
        "request_after_frame": encode_frame(FrameType.REQUEST, new_session_id, request_record).hex(),
        "replay_rejected": True,
        "rollback_record": rollback_record.hex(),
    }


# --------------------------------------------------------------------------- KEY-1, REG-3, secrets


def key_id_file() -> JSON:
    rng = Drbg("key_id")
    inputs = [(b"\x22" * 16, b"\x44" * 32), (bytes(16), bytes(32)), (rng(16), rng(32)), (rng(16), rng(32))]
    joint = []
    for user_id, client_nonce, server_nonce in [
        (b"\x22" * 16, b"\x55" * 32, b"\x66" * 32),
        (rng(16), rng(32), rng(32)),
    ]:
        contribution = (
            struct.pack(">H", len(KEY_ID_CONTRIBUTION_DOMAIN))
            + KEY_ID_CONTRIBUTION_DOMAIN
            + struct.pack(">H", 32)
            + client_nonce
            + struct.pack(">H", 32)
            + server_nonce
        )
        r = hashlib.sha3_256(contribution).digest()
        assert joint_key_id(user_id, client_nonce, server_nonce) == derive_key_id(user_id, r)
        joint.append(
            {
                "user_id": user_id.hex(),
                "client_nonce": client_nonce.hex(),
                "server_nonce": server_nonce.hex(),
                "r_preimage": contribution.hex(),
                "r": r.hex(),
                "key_id": derive_key_id(user_id, r).hex(),
            }
        )
    vectors = []
    for user_id, r in inputs:
        preimage = (
            struct.pack(">H", len(KEY_ID_DOMAIN))
            + KEY_ID_DOMAIN
            + struct.pack(">H", len(user_id))
            + user_id
            + struct.pack(">H", len(r))
            + r
        )
        digest = hashlib.sha3_256(preimage).digest()
        key_id = derive_key_id(user_id, r)
        assert key_id == digest[:16]
        vectors.append(
            {
                "user_id": user_id.hex(),
                "r": r.hex(),
                "preimage": preimage.hex(),
                "sha3_256": digest.hex(),
                "key_id": key_id.hex(),
            }
        )
    return {
        "description": describe(
            "KEY-1 key identifiers (docs/protocol.md section 12.5): key_id = SHA3-256(u16(len(d)) || "
            "d || u16(16) || user_id || u16(32) || r)[:16] with d = KEY_ID_DOMAIN. The first "
            "vector is the worked example of docs/protocol.md section 12.12. KEY-2: the r of a "
            "new key id is SHA3-256(u16(len(d2)) || d2 || u16(32) || client_nonce || u16(32) || "
            "server_nonce) with d2 = KEY_ID_CONTRIBUTION_DOMAIN (the 'joint' vectors).",
            {
                "domain": "d, as ASCII",
                "vectors[].user_id": "16 bytes",
                "vectors[].r": "32 bytes the server drew from its CSPRNG",
                "vectors[].preimage": "the 71 hashed bytes",
                "vectors[].sha3_256": "the full digest",
                "vectors[].key_id": "its first 16 bytes",
                "contribution_domain": "d2, as ASCII",
                "joint[].client_nonce / server_nonce": "each side's 32 random bytes (CREATE_KEY_ID)",
                "joint[].r_preimage / r": "the hashed bytes and r = their SHA3-256",
                "joint[].key_id": "KEY-1 of user_id and that r",
            },
        ),
        "domain": KEY_ID_DOMAIN.decode("ascii"),
        "vectors": vectors,
        "contribution_domain": KEY_ID_CONTRIBUTION_DOMAIN.decode("ascii"),
        "joint": joint,
    }


def storage_key_file() -> JSON:
    rng = Drbg("storage_key")
    inputs = [(bytes(64), b"\x11" * 32, b"\x22" * 16, b"\x33" * 12)]
    inputs += [(rng(64), rng(32), rng(16), rng(12)) for _ in range(3)]
    vectors = []
    for export_key, storage_key, user_id, nonce in inputs:
        master_key = derive_master_key(export_key)
        vectors.append(
            {
                "export_key": export_key.hex(),
                "master_key": master_key.hex(),
                "storage_key": storage_key.hex(),
                "user_id": user_id.hex(),
                "nonce": nonce.hex(),
                "associated_data": (user_id + STORAGE_KEY_AD_SUFFIX).hex(),
                "encrypted_storage_key": encrypt_storage_key(
                    master_key, storage_key, user_id, fixed_random(nonce)
                ).hex(),
            }
        )
    return {
        "description": describe(
            "REG-3 master key and storage-key wrap (docs/protocol.md sections 4.3 and 8.1): "
            "master_key = HKDF-SHA3-256(salt = none, IKM = export_key, info = MASTER_KEY_INFO, "
            "L = 32); encrypted_storage_key = nonce[12] || ChaCha20-Poly1305(master_key, nonce, "
            "storage_key, AD = user_id || STORAGE_KEY_AD_SUFFIX). The first vector is the worked "
            "example of docs/protocol.md section 11.",
            {
                "master_key_info": "the HKDF info label, as ASCII",
                "storage_key_ad_suffix": "appended to user_id to form the AD, as ASCII",
                "vectors[].export_key": "the 64-byte OPAQUE export_key (input)",
                "vectors[].master_key": "derived (32 bytes)",
                "vectors[].storage_key / user_id / nonce": "inputs (32, 16, 12 bytes)",
                "vectors[].associated_data": "user_id || 'storage key'",
                "vectors[].encrypted_storage_key": "60 bytes: nonce || ciphertext || tag",
            },
        ),
        "master_key_info": MASTER_KEY_INFO.decode("ascii"),
        "storage_key_ad_suffix": STORAGE_KEY_AD_SUFFIX.decode("ascii"),
        "vectors": vectors,
    }


def secrets_file() -> JSON:
    rng = Drbg("secrets")
    doc_user, doc_key = b"\x22" * 16, derive_key_id(b"\x22" * 16, b"\x44" * 32)
    inputs = [
        (SecretKind.GENERATED, b"\x11" * 32, doc_user, doc_key, b"\x55" * 32, b"\x66" * 12),
        (SecretKind.GENERATED, rng(32), rng(16), rng(16), rng(32), rng(12)),
        (SecretKind.IMPORTED, rng(32), rng(16), rng(16), b"\x07", rng(12)),
        (SecretKind.IMPORTED, rng(32), rng(16), rng(16), rng(255), rng(12)),
        (SecretKind.IMPORTED, rng(32), rng(16), rng(16), b"hello world", rng(12)),
        (SecretKind.IMPORTED, rng(32), rng(16), rng(16), rng(256), rng(12)),
        (SecretKind.IMPORTED, rng(32), rng(16), rng(16), rng(4096), rng(12)),
    ]
    vectors = []
    for kind, storage_key, user_id, key_id, secret, nonce in inputs:
        ad = secret_ad(user_id, key_id, kind)
        vectors.append(
            {
                "kind": kind.name,
                "storage_key": storage_key.hex(),
                "user_id": user_id.hex(),
                "key_id": key_id.hex(),
                "secret": secret.hex(),
                "nonce": nonce.hex(),
                "associated_data": ad.hex(),
                "sealed": seal_secret(storage_key, secret, ad, fixed_random(nonce)).hex(),
            }
        )
    return {
        "description": describe(
            "Secrets sealed under storage_key (OPS-2, OPS-3; docs/protocol.md section 12.6): AD = "
            "user_id || key_id for GENERATED, user_id || key_id || 'imported key' for IMPORTED; "
            "sealed = nonce[12] || ChaCha20-Poly1305(storage_key, nonce, secret, AD). The first "
            "vector is the worked example of docs/protocol.md section 12.12.",
            {
                "vectors[].kind": "SecretKind",
                "vectors[].storage_key / user_id / key_id / secret / nonce": "inputs",
                "vectors[].associated_data": "the AD (32 or 44 bytes)",
                "vectors[].sealed": "nonce || ciphertext || tag (secret length + 28 bytes)",
            },
        ),
        "vectors": vectors,
    }


def labels_file() -> JSON:
    rng = Drbg("labels")
    doc_user, doc_key = b"\x22" * 16, derive_key_id(b"\x22" * 16, b"\x44" * 32)
    inputs = [
        (b"\x11" * 32, doc_user, doc_key, "backup key", b"\x77" * 12),
        (rng(32), rng(16), rng(16), "a", rng(12)),
        (rng(32), rng(16), rng(16), "Schlüssel für das Archiv", rng(12)),
        (rng(32), rng(16), rng(16), "x" * 64, rng(12)),
        (rng(32), rng(16), rng(16), "é" * 16 + "!", rng(12)),  # 33 bytes: the second bucket
    ]
    vectors = []
    for storage_key, user_id, key_id, label, nonce in inputs:
        encoded, ad = label.encode("utf-8"), label_ad(user_id, key_id)
        padded = encoded + bytes(-len(encoded) % LABEL_PAD_SIZE)
        vectors.append(
            {
                "storage_key": storage_key.hex(),
                "user_id": user_id.hex(),
                "key_id": key_id.hex(),
                "label_utf8": encoded.hex(),
                "nonce": nonce.hex(),
                "associated_data": ad.hex(),
                "padded": padded.hex(),
                "sealed": seal_label(storage_key, user_id, key_id, label, fixed_random(nonce)).hex(),
                "sealed_unpadded": (nonce + ChaCha20Poly1305(storage_key).encrypt(nonce, encoded, ad)).hex(),
            }
        )
    return {
        "description": describe(
            "Named keys (issue 16; docs/protocol.md section 12.6): a key's label sealed on the "
            "client under storage_key, AD = 'keymgmt v1 key label' || user_id || key_id (52 "
            "bytes), sealed = nonce[12] || ChaCha20-Poly1305(storage_key, nonce, padded label, AD), "
            "the padded label being the label's UTF-8 bytes and zero bytes up to the next multiple "
            "of label_pad_size (32 or 64 bytes: a sealed label is 60 or 92 bytes). A label is "
            "1..64 bytes with no zero byte; a reader strips the zero bytes at the end, so a label "
            "sealed unpadded (by the release before padding) opens to the same label. The first "
            "vector is the worked example of section 12.12.",
            {
                "vectors[].storage_key / user_id / key_id / nonce": "inputs",
                "vectors[].label_utf8": "the label's UTF-8 bytes",
                "vectors[].associated_data": "the AD",
                "vectors[].padded": "the plaintext sealed: the label, then zero bytes to 32 or 64",
                "vectors[].sealed": "nonce || ciphertext || tag (60 or 92 bytes), as seal_label makes it",
                "vectors[].sealed_unpadded": (
                    "the same label sealed without padding (label length + 28 bytes): it must open too"
                ),
            },
        ),
        "label_ad_domain": LABEL_AD_DOMAIN.decode("ascii"),
        "label_pad_size": LABEL_PAD_SIZE,
        "vectors": vectors,
    }


def audit_chain_file() -> JSON:
    user_id = b"\x11" * 16
    key_id = derive_key_id(b"\x22" * 16, b"\x44" * 32)
    t0 = 1_700_000_000_000_000
    entries = [
        AuditEntry(1, Action.REGISTER, t0, Outcome.SUCCESS),
        AuditEntry(2, Action.LOGIN, t0 + 1_000, Outcome.SUCCESS),
        AuditEntry(3, Action.GENERATE, t0 + 2_000, Outcome.SUCCESS, key_id),
        AuditEntry(4, Action.RETRIEVE, t0 + 3_000, Outcome.SUCCESS, key_id, Context.EXPORT),
        AuditEntry(5, Action.LOGIN, t0 + 4_000, Outcome.FAILURE, count=3),
        AuditEntry(6, Action.RENAME_KEY, t0 + 5_000, Outcome.SUCCESS, key_id),
    ]
    chain = []
    previous = audit_genesis_hash()
    for entry in entries:
        digest = audit_chain_hash(user_id, previous, entry)
        preimage = (
            struct.pack(">H", len(AUDIT_CHAIN_DOMAIN))
            + AUDIT_CHAIN_DOMAIN
            + user_id
            + previous
            + entry.encode()
        )
        assert hashlib.sha3_256(preimage).digest() == digest
        chain.append(
            {
                "entry_id": entry.entry_id,
                "encoding": entry.encode().hex(),
                "previous": previous.hex(),
                "preimage": preimage.hex(),
                "hash": digest.hex(),
            }
        )
        previous = digest
    other = AuditEntry(3, Action.DELETE_KEY, t0 + 2_000, Outcome.SUCCESS, key_id)
    return {
        "description": describe(
            "The audit chain (issue 16; docs/protocol.md section 12.9): hash(entry n) = SHA3-256("
            "u16(22) || 'keymgmt v1 audit chain' || user_id[16] || hash(entry n-1)[32] || the "
            "entry's 24- or 40-byte encoding), hash(entry 0) = 32 zero bytes. A client walking the "
            "log from entry 1 recomputes every hash; 'tampered' lists logs it must refuse.",
            {
                "chain[].encoding": "the entry as in an AUDIT answer, without its hash",
                "chain[].previous": "the hash it continues from",
                "chain[].preimage": "what SHA3-256 hashes",
                "chain[].hash": "its hash (sent after the entry in an AUDIT answer)",
                "tampered[]": "entry ids and hashes as a server might send them; all fail",
            },
        ),
        "user_id": user_id.hex(),
        "genesis": audit_genesis_hash().hex(),
        "chain": chain,
        "tampered": [
            {
                "why": "entry 3 removed",
                "entries": [[c["entry_id"], c["encoding"], c["hash"]] for c in chain if c["entry_id"] != 3],
            },
            {
                "why": "entry 3 changed (its hash kept)",
                "entries": [
                    [c["entry_id"], other.encode().hex() if c["entry_id"] == 3 else c["encoding"], c["hash"]]
                    for c in chain
                ],
            },
            {
                "why": "entries 3 and 4 swapped",
                "entries": [
                    [c["entry_id"], c["encoding"], c["hash"]]
                    for c in (*chain[:2], chain[3], chain[2], *chain[4:])
                ],
            },
            {
                "why": "history forked after entry 2 (rehashed from there)",
                "entries": _forked(user_id, chain, other),
            },
        ],
    }


def _forked(user_id: bytes, chain: list[JSON], replacement: AuditEntry) -> list[list[object]]:
    """The chain with entry 3 replaced and every hash from there recomputed: valid on its
    own, so only a client that verified the original entry 3 (its head) can tell."""
    rows: list[list[object]] = []
    previous = bytes.fromhex(cast(str, chain[1]["hash"]))
    for c in chain:
        if cast(int, c["entry_id"]) < 3:
            rows.append([c["entry_id"], c["encoding"], c["hash"]])
            continue
        encoding = replacement.encode() if c["entry_id"] == 3 else bytes.fromhex(cast(str, c["encoding"]))
        previous = hashlib.sha3_256(
            struct.pack(">H", len(AUDIT_CHAIN_DOMAIN)) + AUDIT_CHAIN_DOMAIN + user_id + previous + encoding
        ).digest()
        rows.append([c["entry_id"], encoding.hex(), previous.hex()])
    return rows


def portable_file() -> JSON:
    rng = Drbg("portable")
    secrets = [b"\x07", bytes.fromhex("aabbcc"), rng(32), rng(255), rng(256), rng(1000), rng(MAX_SECRET_SIZE)]

    def long_form(length: int, body: bytes, version: int = 1) -> bytes:
        return bytes([0, version]) + struct.pack(">I", length) + body

    rejected = [
        (b"", "empty: no length byte"),
        (b"\x00", "length 0 and no secret"),
        (b"\x01", "length 1 but nothing follows"),
        (b"\x05abc", "length byte says 5 but 3 bytes follow"),
        (b"\x03abcd", "length byte says 3 but 4 bytes follow"),
        (b"\xff" + rng(254), "length byte says 255 but 254 bytes follow"),
        (b"\x00" + rng(1), "length byte 0 with a byte after it"),
        (long_form(256, rng(256))[:5], "long form cut short in its length"),
        (long_form(256, rng(256), version=2), "long form of an unknown version (2)"),
        (long_form(256, rng(256), version=0), "long form of version 0"),
        (long_form(255, rng(255)), "long form for 255 bytes (the short form holds it)"),
        (long_form(3, b"abc"), "long form for 3 bytes (the short form holds it)"),
        (long_form(0, b""), "long form of length 0"),
        (long_form(256, rng(255)), "long form says 256 but 255 bytes follow"),
        (long_form(256, rng(257)), "long form says 256 but 257 bytes follow"),
        (long_form(MAX_SECRET_SIZE + 1, b""), "long form says 65537 (over the limit)"),
        (long_form(2**32 - 1, b""), "long form says 2^32 - 1"),
    ]
    for raw, why in rejected:  # must really be rejected
        try:
            decode_portable(raw)
        except ValueError:
            continue
        raise AssertionError(f"portable rejection vector {why!r} decodes")
    return {
        "description": describe(
            "The portable secret format of import (OPS-3) and export (OPS-5, OPS-12), "
            "docs/protocol.md section 12.7: len u8 || secret[len] for len = 1..255; "
            "0x00 || 0x01 (version) || len u32 || secret[len] for len = 256..65536. Exactly one "
            "encoding per secret: the long form for a secret of 255 bytes or fewer is refused.",
            {
                "valid[].secret": "the secret",
                "valid[].portable": "its portable encoding",
                "rejected[].portable": "inputs an importer must refuse",
                "unencodable_secret_lengths": "secret lengths an exporter must refuse",
            },
        ),
        "valid": [{"secret": s.hex(), "portable": encode_portable(s).hex()} for s in secrets],
        "rejected": [{"portable": raw.hex(), "why": why} for raw, why in rejected],
        "unencodable_secret_lengths": [0, MAX_SECRET_SIZE + 1],
    }


# --------------------------------------------------------------------------- transcript


def _transcript_frame(
    session_key: bytes, session_id: int, sender: str, seq: int, message: object, body: object | None = None
) -> JSON:
    frame_type = cast(FrameType, getattr(message, "FRAME_TYPE"))  # noqa: B009
    plaintext = cast(Callable[[], bytes], getattr(message, "encode"))()  # noqa: B009
    record = channel_at(session_key, is_client=sender == "client", send_seq=seq).seal(frame_type, plaintext)
    entry: JSON = {
        "direction": "C->S" if sender == "client" else "S->C",
        "frame_type": frame_type.name,
        "seq": seq,
        "message": {"class": type(message).__name__, "fields": to_json(message)},
        "plaintext": plaintext.hex(),
        "frame": encode_frame(frame_type, session_id, record.encode()).hex(),
    }
    if body is not None:
        entry["body"] = {"class": type(body).__name__, "fields": to_json(body)}
    return entry


def transcript_file() -> JSON:
    rng = Drbg("transcript")
    session_key, user_id = rng(64), rng(16)
    session_id = 1
    esk = rng(60)
    key_id = derive_key_id(user_id, rng(32))
    t0 = 1_700_000_000_000_000

    retrieve = RetrieveStorageKeyRequest(user_id)
    stored = StorageKeyResponse(esk)
    listing = ListKeysRequest(user_id)
    keys = KeyListResponse((KeyInfo(key_id, SecretKind.GENERATED, t0),), 0)

    def frames(*entries: tuple[str, int, object, object | None]) -> list[JSON]:
        return [_transcript_frame(session_key, session_id, *entry) for entry in entries]

    welcome = ("server", 0, Welcome(user_id), None)
    return {
        "description": describe(
            "A full request session on the channel, frame by frame (docs/protocol.md section 8.2). "
            "The OPAQUE login that precedes it (LOGIN_START, LOGIN_RESPONSE, LOGIN_FINISH) uses "
            "OPAQUE's internal randomness and cannot be fixed; session_key below is a STAND-IN for "
            "the session_key OPAQUE gives both sides: a port injects it in place of its OPAQUE "
            "output (the test does so through the real ClientConnection/ServerConnection) and "
            "must then produce and accept exactly these frames. Two endings: the client logs out "
            "(CLOSE C->S), or the server closes the session (CLOSE S->C, REQUEST_LIMIT: a server "
            "configured with max_requests_per_session = 1, the spec's strict mode).",
            {
                "session_key": "stand-in for OPAQUE's 64-byte session_key (input)",
                "session_handle": "from the key schedule",
                "user_id": "the account's user_id (sent in WELCOME)",
                "session_id": "the session id in every frame header",
                "transcripts[].name": "which ending",
                "transcripts[].server_config": "the ServerConfig fields that matter for it",
                "transcripts[].frames[]": (
                    "in order: direction, frame_type, the sender's seq, the message (class and "
                    "fields), for REQUEST/RESPONSE the operation body decoded (class and fields), "
                    "the plaintext, and the exact frame bytes"
                ),
            },
        ),
        "session_key": session_key.hex(),
        "session_handle": key_schedule(session_key)["session_handle"].hex(),
        "user_id": user_id.hex(),
        "session_id": session_id,
        "transcripts": [
            {
                "name": "client_logout",
                "server_config": {"max_requests_per_session": 1000},
                "frames": frames(
                    welcome,
                    ("client", 0, Request(1, retrieve.encode()), retrieve),
                    ("server", 1, Response(1, encode_response(Status.OK, stored)), stored),
                    ("client", 1, Close(ErrorCode.CLIENT_CLOSED), None),
                ),
            },
            {
                "name": "server_close",
                "server_config": {"max_requests_per_session": 1},
                "frames": frames(
                    welcome,
                    ("client", 0, Request(1, listing.encode()), listing),
                    ("server", 1, Response(1, encode_response(Status.OK, keys)), keys),
                    ("server", 2, Close(ErrorCode.REQUEST_LIMIT), None),
                ),
            },
        ],
    }


# --------------------------------------------------------------------------- sealed session state

#: (op, answer size) of each request the reply-cache scenario answers, in order (request ids
#: 1, 2, ...): reads of every size around the budget, writes between them, and more requests
#: than the cache remembers.
REPLY_CACHE_SCENARIO: list[tuple[Op, int]] = [
    (Op.RETRIEVE_STORAGE_KEY, 61),
    (Op.LIST_KEYS, 1000),
    (Op.STORE_SECRET, 50),
    (Op.RETRIEVE, 65615),
    (Op.AUDIT, 2900),
    (Op.RETRIEVE, 99),
    (Op.DELETE_KEY, 1),
    (Op.RETRIEVE_STORAGE_KEY, 61),
    (Op.CREATE_KEY_ID, 49),
    (Op.RENAME_KEY, 1),
    (Op.CHANGE_PASSWORD_START, 65),
    (Op.RETRIEVE, 80),
    (Op.AUDIT, 18443),
    (Op.LIST_KEYS, 60423),
    (Op.RETRIEVE, 99),
    (Op.STORE_SECRET, 2),
    (Op.RETRIEVE, 99),
    (Op.LIST_KEYS, 900),
    (Op.CHANGE_PASSWORD_FINISH, 1),
    (Op.RETRIEVE, 99),
]


def reply_cache_model(
    answers: list[tuple[Op, int]], budget: int, window: int
) -> tuple[list[tuple[int, bool]], int]:
    """protocol.md section 9, written out again from the text: the last ``window`` answered
    requests, each kept or (a read that would pass ``budget``) not. Returns the cache,
    oldest first, as (request id, kept), and the bytes it keeps."""
    cache: list[tuple[int, int | None]] = []
    for request_id, (op, size) in enumerate(answers, start=1):
        while len(cache) >= window:
            cache.pop(0)
        kept = sum(n for _, n in cache if n is not None)
        read = op in (Op.RETRIEVE_STORAGE_KEY, Op.RETRIEVE, Op.AUDIT, Op.LIST_KEYS, Op.CHANGE_PASSWORD_START)
        cache.append((request_id, None if read and kept + size > budget else size))
    return [(i, n is not None) for i, n in cache], sum(n for _, n in cache if n is not None)


def session_state_file() -> JSON:
    rng = Drbg("session_state")
    setup_stand_in, handle, user_id = rng(64), rng(16), rng(16)
    sealing_key = hkdf_sha3(setup_stand_in, SESSION_STATE_KEY_INFO, 32)
    channel = ChannelState(rng(32), rng(32), 7, 9, 2, 31, 29)
    answered: dict[int, bytes | None] = {12: None, 13: b"\x00", 14: None, 15: b"\x00" + rng(60)}
    # The key server's app state: two key ids the session reserved (key_id 16 || kind u8 each).
    app_state = rng(16) + bytes([SecretKind.GENERATED]) + rng(16) + bytes([SecretKind.IMPORTED])
    state = SessionState(
        user_id, b"alice", 1_700_000_000.25, 1_700_000_600.5, channel, 15, 15, answered, 7, app_state
    )
    nonce = rng(12)
    sealed = seal_session_state(state, handle, sealing_key, fixed_random(nonce))
    ad = SESSION_STATE_AD_PREFIX + handle
    plaintext = ChaCha20Poly1305(sealing_key).decrypt(sealed[:12], sealed[12:], ad)

    def reseal(body: bytes) -> str:
        return (nonce + ChaCha20Poly1305(sealing_key).encrypt(nonce, body, ad)).hex()

    # The same session as the release before sealed it (version 4: no app state), the one
    # before that (version 3: no kept byte either, every answer follows; so only the kept
    # answers), and the one before that (version 2: no credentials version either).
    head_end = 1 + 16 + 1 + len(state.account_name) + 16  # version, user, name, times
    app_at = len(plaintext) - 2 - len(app_state)
    cache_at = app_at - sum(5 + (0 if a is None else 4 + len(a)) for a in answered.values()) - 2
    kept = {i: a for i, a in answered.items() if a is not None}
    v4 = b"\x04" + plaintext[1:app_at]
    v3_cache = struct.pack(">H", len(kept)) + b"".join(
        struct.pack(">II", i, len(a)) + a for i, a in kept.items()
    )
    v3 = b"\x03" + plaintext[1:cache_at] + v3_cache
    v2 = b"\x02" + v3[1:head_end] + v3[head_end + 8 :]
    olders = ((v4, 4, answered), (v3, 3, kept), (v2, 2, kept))
    for older, version, reads_as in olders:
        read = unseal_session_state(bytes.fromhex(reseal(older)), handle, sealing_key)
        assert read is not None and read.answered == reads_as and read.app_state == b"", version
        assert read.credentials_version == (0 if version == 2 else 7)
    bad_kept = plaintext[:cache_at] + struct.pack(">HIB", 1, 12, 2) + struct.pack(">H", 0)
    long_app = plaintext[:app_at] + struct.pack(">H", len(app_state) + 1) + app_state
    assert unseal_session_state(bytes.fromhex(reseal(bad_kept)), handle, sealing_key) is None

    budget, window = 4096, 16
    cache, kept_bytes = reply_cache_model(REPLY_CACHE_SCENARIO, budget, window)
    return {
        "description": describe(
            "Server-internal, not the wire (docs/protocol.md sections 9 and 13), but every server "
            "instance sharing a session store must agree on it: the sealed state of a detached "
            "request session, version 5, and the reply cache it carries. sealing key = "
            "HKDF-SHA3-256(ikm = the serialized OPAQUE server setup, info = "
            "SESSION_STATE_KEY_INFO, 32); sealed = nonce 12 || ChaCha20-Poly1305(sealing key, "
            "plaintext, AD = SESSION_STATE_AD_PREFIX || session_handle). Plaintext, big-endian: "
            "version u8 (5) || user_id 16 || account_name (u8 length) || created f64 || "
            "last_activity f64 || credentials_version u64 || prk 32 || epoch_secret 32 || "
            "send_seq u64 || recv_seq u64 || resume_seq u64 || sent_total u64 || "
            "received_total u64 || highest_request_id u32 || request_count u32 || count u16 || "
            "count x (request_id u32 || kept u8 || answer (u32 length) if kept = 1) || "
            "app_state (u16 length), the key server's: its key-id reservations, key_id 16 || "
            "kind u8 each, oldest first. Then the "
            "reply cache rule of section 9, on a run of answers.",
            {
                "server_setup": "stands in for the serialized OPAQUE server setup (input)",
                "sealing_key": "derived",
                "session_handle": "the session's handle (input; in the AD)",
                "state": (
                    "the fields sealed; answered, oldest first: [request_id, the answer, or "
                    "null for a read whose answer was not kept]"
                ),
                "nonce / plaintext / sealed": "the version-5 blob",
                "older[]": (
                    "blobs of the releases before, still read: version 4 (no app_state, read "
                    "as empty), version 3 (also no kept byte, every answer follows) and version "
                    "2 (also no credentials_version, read as 0); reads_as: the reply cache "
                    "they give"
                ),
                "refused[]": "blobs that verify but must be treated as no session",
                "reply_cache.reply_cache_bytes / max_requests_in_flight": "the server's config",
                "reply_cache.answers[]": "requests 1, 2, ... answered in this order: op and answer size",
                "reply_cache.cache": (
                    "afterwards, oldest first: [request_id, kept]; not kept: a read, run again if re-sent"
                ),
                "reply_cache.kept_bytes": "the bytes of the answers kept",
            },
        ),
        "server_setup": setup_stand_in.hex(),
        "sealing_key": sealing_key.hex(),
        "session_handle": handle.hex(),
        "state": {
            "user_id": user_id.hex(),
            "account_name": state.account_name.hex(),
            "created": state.created,
            "last_activity": state.last_activity,
            "credentials_version": state.credentials_version,
            "prk": channel.prk.hex(),
            "epoch_secret": channel.epoch_secret.hex(),
            "send_seq": channel.send_seq,
            "recv_seq": channel.recv_seq,
            "resume_seq": channel.resume_seq,
            "sent_total": channel.sent_total,
            "received_total": channel.received_total,
            "highest_request_id": state.highest_request_id,
            "request_count": state.request_count,
            "answered": [[i, None if a is None else a.hex()] for i, a in answered.items()],
            "app_state": app_state.hex(),
        },
        "nonce": nonce.hex(),
        "plaintext": plaintext.hex(),
        "sealed": sealed.hex(),
        "older": [
            {
                "version": version,
                "sealed": reseal(older),
                "credentials_version": 0 if version == 2 else 7,
                "reads_as": [[i, None if a is None else a.hex()] for i, a in reads_as.items()],
            }
            for older, version, reads_as in olders
        ],
        "refused": [
            {"name": "a kept byte other than 0 or 1", "sealed": reseal(bad_kept)},
            {"name": "an app state longer than what follows", "sealed": reseal(long_app)},
            {"name": "an unknown version (6)", "sealed": reseal(b"\x06" + plaintext[1:])},
        ],
        "reply_cache": {
            "reply_cache_bytes": budget,
            "max_requests_in_flight": window,
            "answers": [[op.name, size] for op, size in REPLY_CACHE_SCENARIO],
            "cache": [[i, kept_flag] for i, kept_flag in cache],
            "kept_bytes": kept_bytes,
        },
    }


# --------------------------------------------------------------------------- files, main

BUILDERS: dict[str, Callable[[], JSON]] = {
    "framing.json": framing,
    "messages.json": messages,
    "ops.json": ops,
    "key_schedule.json": key_schedule_file,
    "channel.json": channel_file,
    "resumption.json": resumption_file,
    "key_id.json": key_id_file,
    "storage_key.json": storage_key_file,
    "secrets.json": secrets_file,
    "labels.json": labels_file,
    "audit_chain.json": audit_chain_file,
    "portable.json": portable_file,
    "transcript.json": transcript_file,
    "session_state.json": session_state_file,
}


def render(document: JSON) -> str:
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


def build_all() -> dict[str, str]:
    """File name -> its exact text."""
    return {name: render(builder()) for name, builder in BUILDERS.items()}


def stale_files(directory: Path) -> list[str]:
    """Problems found comparing ``directory`` with what the code computes (empty if current)."""
    problems = []
    for name, text in build_all().items():
        path = directory / name
        if not path.exists():
            problems.append(f"{name}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{name}: differs from what keymgmt_proto computes")
    known = set(BUILDERS)
    if directory.is_dir():
        problems += [
            f"{p.name}: not produced by the generator"
            for p in directory.glob("*.json")
            if p.name not in known
        ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the vector files")
    mode.add_argument("--check", action="store_true", help="exit 1 if a vector file is stale")
    parser.add_argument("--dir", type=Path, default=VECTOR_DIR, help="vector directory")
    args = parser.parse_args(argv)
    directory: Path = args.dir

    if args.check:
        problems = stale_files(directory)
        for problem in problems:
            print(f"{directory}/{problem}", file=sys.stderr)
        if problems:
            print("run: python scripts/gen_vectors.py --write", file=sys.stderr)
            return 1
        return 0
    if args.write:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in build_all().items():
            path = directory / name
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                path.write_text(text, encoding="utf-8")
                print(f"wrote {path}")
        return 0
    for name in BUILDERS:
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
