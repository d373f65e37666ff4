"""Generate the seed corpora in fuzz/corpus/<harness>/ from real transcripts.

    python -m fuzz.make_corpus

Runs a real key server (KeyServer over SQLite in a temporary directory) and
real clients over InMemoryPair connections and records every byte both ways:

- conn1: register, log in, one request of every operation (plus a malformed
  one and one naming another user), log out;
- conn2 + conn3: log in, send a request the server never sees, lose the
  connection, resume on a new connection (the request is re-sent), log out;
- conn4: a wrong password, a taken account name, an unknown account;
- conn5: log in, stay idle past the timeout (server CLOSE), then the server
  closes the connection (GOAWAY).

From those: whole byte streams and single frames (server/, client/,
frame_header/), payloads and sealed plaintexts behind their decoder's selector
byte (messages/), and scripts over the session harness's genuine frames
(session/). File names are deterministic (the content is not: OPAQUE draws
its own randomness). Each directory is emptied and rewritten.
"""

from __future__ import annotations

import itertools
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

from keymgmt_proto import (
    AuditRequest,
    AuditType,
    ClientConnection,
    Context,
    CreateKeyIdRequest,
    DeleteKeyRequest,
    ErrorCode,
    Event,
    FrameType,
    KeyIdResponse,
    ListKeysRequest,
    Op,
    RegistrationSucceeded,
    ResponseReceived,
    RetrieveRequest,
    RetrieveStorageKeyRequest,
    SecretKind,
    ServerConfig,
    ServerConnection,
    ServerSetup,
    SessionEstablished,
    SessionRegistry,
    Status,
    StorageKeyResponse,
    StoreSecretRequest,
    decode_response,
    decrypt_storage_key,
    derive_master_key,
    encode_portable,
    seal_secret,
    secret_ad,
)
from keymgmt_proto.wire import Close, CompleteRegistration, Request, Response, Resume, Resumed, Welcome

from . import fuzz_messages, fuzz_session
from ._adapters import InMemoryPair, KeyServer, SQLiteStorage
from ._common import DetRandom
from .run import HARNESSES

CORPUS = Path(__file__).resolve().parent / "corpus"
ALICE = b"alice@example.org"
BOB = b"bob@example.org"
PASSWORD = b"correct horse battery staple"
CONFIG = ServerConfig(idle_timeout=60.0)


class RecordingPair(InMemoryPair):
    """An InMemoryPair that keeps every chunk it moves."""

    def __init__(
        self, client: ClientConnection, server: ServerConnection, app: KeyServer, *, now: float
    ) -> None:
        super().__init__(client, server, app, now=now)
        self.c2s: list[bytes] = []
        self.s2c: list[bytes] = []

    def to_server(self, data: bytes) -> None:
        self.c2s.append(data)
        super().to_server(data)

    def to_client(self, data: bytes) -> list[Event]:
        self.s2c.append(data)
        events: list[Event] = super().to_client(data)
        return events


def split_frames(data: bytes) -> list[bytes]:
    return fuzz_session.split_frames(data)


def one(events: Iterable[Event], kind: type[Event]) -> Event:
    found = [e for e in events if isinstance(e, kind)]
    if len(found) != 1:
        raise RuntimeError(f"expected one {kind.__name__}, got {found!r}")
    return found[0]


class Transcripts:
    def __init__(self, workdir: Path) -> None:
        self.random = DetRandom(b"make_corpus")
        self.setup = ServerSetup.generate()
        self.storage = SQLiteStorage(workdir / "keyserver.db")
        self.clock = itertools.count(1_700_000_000)
        self.app = KeyServer(self.storage, random=self.random, clock=lambda: float(next(self.clock)))
        self.registry = SessionRegistry(CONFIG)
        self.pairs: dict[str, RecordingPair] = {}
        #: (op, request body, response body) for every answered request
        self.exchanges: list[tuple[Op, bytes, bytes]] = []
        self.plaintexts: list[tuple[FrameType, bytes]] = []

    def pair(self, name: str) -> RecordingPair:
        client = ClientConnection(self.random)
        # Virtual time: every connection starts at t=0 (only conn5 lets time pass, last).
        server = ServerConnection(self.setup, self.random, config=CONFIG, registry=self.registry, now=0.0)
        pair = RecordingPair(client, server, self.app, now=0.0)
        self.pairs[name] = pair
        return pair

    def request(self, pair: RecordingPair, session_id: int, body: bytes) -> bytes:
        request_id = pair.client.send_request(session_id, body)
        response = one(pair.pump(), ResponseReceived)
        assert isinstance(response, ResponseReceived)
        op = Op(body[0]) if body and body[0] in {o.value for o in Op} else Op.RETRIEVE_STORAGE_KEY
        self.exchanges.append((op, body, response.body))
        self.plaintexts.append((FrameType.REQUEST, Request(request_id, body).encode()))
        self.plaintexts.append((FrameType.RESPONSE, Response(request_id, response.body).encode()))
        return response.body

    def run(self) -> None:
        # conn1: register, log in, every operation, log out.
        p = self.pair("conn1")
        p.client.open_registration(ALICE, PASSWORD)
        registered = one(p.pump(), RegistrationSucceeded)
        assert isinstance(registered, RegistrationSucceeded)
        sid = p.client.open_request_session(ALICE, PASSWORD)
        established = one(p.pump(), SessionEstablished)
        assert isinstance(established, SessionEstablished)
        uid = established.user_id
        self.plaintexts.append((FrameType.WELCOME, Welcome(uid).encode()))
        with self.storage.transaction() as tx:
            account = tx.get_account(ALICE)
        assert account is not None
        esk = account.encrypted_storage_key
        self.plaintexts.append((FrameType.COMPLETE_REGISTRATION, CompleteRegistration(uid, esk).encode()))

        body = self.request(p, sid, RetrieveStorageKeyRequest(uid).encode())
        status, got = decode_response(Op.RETRIEVE_STORAGE_KEY, body)
        assert status is Status.OK and isinstance(got, StorageKeyResponse)
        storage_key = decrypt_storage_key(derive_master_key(established.export_key), esk, uid)
        key_ids = []
        for kind, secret in ((SecretKind.GENERATED, self.random(32)), (SecretKind.IMPORTED, b"imported!")):
            status, got = decode_response(
                Op.CREATE_KEY_ID,
                self.request(p, sid, CreateKeyIdRequest(uid, kind, self.random(32)).encode()),
            )
            assert status is Status.OK and isinstance(got, KeyIdResponse)
            key_ids.append(got.key_id)
            plain = secret if kind is SecretKind.GENERATED else encode_portable(secret)[1:]
            sealed = seal_secret(storage_key, plain, secret_ad(uid, got.key_id, kind), self.random)
            self.request(p, sid, StoreSecretRequest(uid, got.key_id, kind, sealed).encode())
        for key_id, context in zip(key_ids, (Context.LOCAL_ONLY, Context.EXPORT), strict=True):
            self.request(p, sid, RetrieveRequest(uid, key_id, context).encode())
        self.request(p, sid, ListKeysRequest(uid).encode())
        self.request(p, sid, AuditRequest(uid, AuditType.ALL).encode())
        audit_keys = AuditRequest(uid, AuditType.KEY_ONLY, (key_ids[0],), after=1, before=2**40)
        self.request(p, sid, audit_keys.encode())
        self.request(p, sid, DeleteKeyRequest(uid, key_ids[1]).encode())
        self.request(p, sid, RetrieveRequest(uid, key_ids[1], Context.NULL).encode())  # NOT_FOUND
        self.request(p, sid, RetrieveStorageKeyRequest(bytes(16)).encode())  # WRONG_USER
        self.request(p, sid, b"\x63 not an operation")  # INVALID
        p.client.close_session(sid)
        p.pump()
        self.plaintexts.append((FrameType.CLOSE, Close(ErrorCode.CLIENT_CLOSED).encode()))
        self.plaintexts.append((FrameType.CLOSE, Close(ErrorCode.OK).encode()))

        # conn2 + conn3: lose the connection with a request in flight, resume elsewhere.
        p = self.pair("conn2")
        sid = p.client.open_request_session(ALICE, PASSWORD)
        one(p.pump(), SessionEstablished)
        self.request(p, sid, ListKeysRequest(uid, limit=1).encode())
        p.client.send_request(sid, RetrieveStorageKeyRequest(uid).encode())
        p.client.data_to_send()  # never arrives
        p.client.receive_data(b"")
        p.client.next_event()
        (detached,) = p.client.take_detached_sessions()
        p.server.connection_lost()
        p.pump()
        q = self.pair("conn3")
        resumed_id = q.client.resume_session(detached)
        q.pump()
        q.client.close_session(resumed_id)
        q.pump()
        self.plaintexts.append((FrameType.RESUME, Resume(bytes(32), 3).encode()))
        self.plaintexts.append((FrameType.RESUMED, Resumed().encode()))

        # conn4: refusals.
        p = self.pair("conn4")
        p.client.open_request_session(ALICE, b"wrong password")
        p.pump()
        p.client.open_registration(ALICE, PASSWORD)
        p.pump()
        p.client.open_request_session(BOB, PASSWORD)
        p.pump()

        # conn5: idle timeout, then GOAWAY.
        p = self.pair("conn5")
        sid = p.client.open_request_session(ALICE, PASSWORD)
        one(p.pump(), SessionEstablished)
        p.advance(CONFIG.idle_timeout + 1)
        self.plaintexts.append((FrameType.CLOSE, Close(ErrorCode.IDLE_TIMEOUT).encode()))
        p.server.close()
        p.pump()


def _name(*parts: object) -> str:
    return "-".join(str(p) for p in parts)


def _frame_label(frame: bytes) -> str:
    return FrameType(frame[1]).name.lower()


def corpora(t: Transcripts) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {h: {} for h in HARNESSES}
    seen_frames: set[bytes] = set()
    for conn, pair in t.pairs.items():
        for direction, chunks, harness in (("c2s", pair.c2s, "server"), ("s2c", pair.s2c, "client")):
            stream = b"".join(chunks)
            if not stream:
                continue
            out[harness][_name(conn, direction, "stream")] = stream
            for i, frame in enumerate(split_frames(stream)):
                label = _name(conn, direction, f"{i:02d}", _frame_label(frame))
                out[harness][label] = frame
                if frame not in seen_frames:
                    seen_frames.add(frame)
                    out["frame_header"][label] = frame
                frame_type = FrameType(frame[1])
                payload = frame[10:]
                if frame_type is FrameType.RESUME:
                    target = "resume-envelope"
                elif frame_type.sealed:
                    target = "record"
                else:
                    target = f"message:{frame_type.name}"
                out["messages"][_name(conn, direction, f"{i:02d}", target)] = (
                    bytes([fuzz_messages.target_index(target)]) + payload
                )
    for i, (frame_type, plaintext) in enumerate(t.plaintexts):
        index = fuzz_messages.target_index(f"message:{frame_type.name}")
        out["messages"][_name("plain", f"{i:02d}", frame_type.name.lower())] = bytes([index]) + plaintext
    for i, (op, request, response) in enumerate(t.exchanges):
        out["messages"][_name("body", f"{i:02d}", "request")] = (
            bytes([fuzz_messages.target_index("request")]) + request
        )
        out["messages"][_name("body", f"{i:02d}", "response", op.name.lower())] = (
            bytes([fuzz_messages.target_index(f"response:{op.name}")]) + response
        )
    out["session"] = session_scripts(t)
    return out


def _u16(n: int) -> bytes:
    return struct.pack(">H", n)


def session_scripts(t: Transcripts) -> dict[str, bytes]:
    """Scripts for fuzz_session (see its docstring for the operations)."""
    op = fuzz_session.Op
    server, client = b"\x00", b"\x01"

    def genuine(*indexes: int) -> bytes:
        return b"".join(bytes([op.GENUINE, i]) for i in indexes)

    def seal(frame_type: FrameType, plaintext: bytes, drift: int = 0, selector: int = 0) -> bytes:
        t_index = fuzz_session.SEALED_TYPES.index(frame_type)
        return bytes([op.SEAL, t_index, drift, selector]) + _u16(len(plaintext)) + plaintext

    scripts = {
        "server-requests-logout": server + genuine(0, 1, 2, 3),
        "server-resume": server + genuine(0, 4, 5, 6, 7),
        "server-replay": server + genuine(0, 0, 1, 1),
        "server-reorder": server + genuine(2, 1, 0),
        "server-flip": server + bytes([op.FLIP, 0]) + _u16(30) + b"\x01" + genuine(0),
        "server-retarget": server + bytes([op.RETARGET, 0]) + struct.pack(">I", 9) + genuine(0),
        "server-splice": server + bytes([op.SPLICE, 0, 1]) + _u16(18) + genuine(0),
        "server-idle": server + genuine(0) + bytes([op.TICK, 61]) + genuine(1),
        "server-close-then-request": server + bytes([op.TICK, 0xF0]) + genuine(0),
        "server-lost-then-resume": server + bytes([op.TICK, 0xF3]) + genuine(4, 5),
        "server-eof": server + genuine(0) + bytes([op.EOF]),
        "server-raw": server + bytes([op.RAW]) + _u16(10) + bytes(10),
        "client-responses": client + genuine(0, 1, 2),
        "client-server-close": client + genuine(0, 3),
        "client-goaway": client + genuine(4) + bytes([op.TICK, 3]),
        "client-resumed": client + bytes([op.RETARGET, 5]) + struct.pack(">I", 2) + genuine(0),
        "client-replay": client + genuine(0, 0),
        "client-logout": client + bytes([op.TICK, 1]) + genuine(0),
        "client-flip": client + bytes([op.FLIP, 1]) + _u16(12) + b"\x80" + genuine(0),
    }
    for i, (frame_type, plaintext) in enumerate(t.plaintexts):
        side = server if frame_type in (FrameType.REQUEST, FrameType.CLOSE, FrameType.RESUME) else client
        name = f"{'server' if side == server else 'client'}-seal-{i:02d}-{frame_type.name.lower()}"
        scripts[name] = side + seal(frame_type, plaintext)
    scripts["server-seal-drift"] = server + seal(FrameType.REQUEST, Request(9, b"x").encode(), drift=0x84)
    scripts["server-seal-resume-new-id"] = server + seal(FrameType.RESUME, b"", selector=0x82)
    return scripts


def write(corpora_by_harness: dict[str, dict[str, bytes]]) -> None:
    for harness, files in corpora_by_harness.items():
        directory = CORPUS / harness
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            old.unlink()
        for name, data in sorted(files.items()):
            (directory / name).write_bytes(data)
        print(f"{harness}: {len(files)} files, {sum(map(len, files.values()))} bytes")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        transcripts = Transcripts(Path(tmp))
        transcripts.run()
        transcripts.storage.close()
    write(corpora(transcripts))


if __name__ == "__main__":
    main()
