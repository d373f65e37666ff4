"""A Hypothesis state machine over the real key-server application (issue #12).

It drives ``KeyServer`` over real storage (an SQLite file, or SQLite in memory) through
``ClientConnection``/``ServerConnection`` pairs, the way the network driver does: each
run of server events is one group commit, and a commit that fails abandons the
connection. OPAQUE is the injected :class:`~keymgmt_proto.testing.FakeOpaque`, so a login
costs well under a millisecond and thousands of them fit in a run.

Rules: register (new and taken names), log in (right password, wrong password, unknown
name, while throttled), generate, import, retrieve (own keys, missing keys, another
user's keys), delete, list, audit, log out, let time pass (idle expiry, throttling
waits), fail the next storage commit, drop the connection and resume elsewhere.

Invariants, checked against a model after every step and in the database itself: every
acknowledged store is there and opens to what was stored; nothing unacknowledged is;
list answers match the model; every user's audit log matches the model entry by entry;
no secret of one user is ever handed to another.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from keymgmt.adapters.server.app import KeyServer, ThrottlePolicy
from keymgmt.adapters.storage.base import AuditQuery, StorageError
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    NEED_DATA,
    Action,
    AuditRequest,
    AuditResponse,
    AuditType,
    ClientConnection,
    ConnectionFailed,
    Context,
    CreateKeyIdRequest,
    DeleteKeyRequest,
    ErrorCode,
    Event,
    KeyIdResponse,
    KeyListResponse,
    ListKeysRequest,
    Outcome,
    RegistrationSucceeded,
    ResponseReceived,
    RetrieveRequest,
    RetrieveStorageKeyRequest,
    SecretKind,
    SecretResponse,
    ServerConfig,
    ServerConnection,
    ServerSetup,
    SessionClosed,
    SessionEstablished,
    SessionFailed,
    SessionRegistry,
    SessionResumed,
    Status,
    StorageKeyResponse,
    StoreSecretRequest,
    decode_response,
    decrypt_storage_key,
    derive_master_key,
    joint_key_id,
    open_secret,
    seal_secret,
    secret_ad,
    session_sealing_key,
)
from keymgmt_proto import strategies as S
from keymgmt_proto.testing import FakeOpaque

from ..support.helpers import drain

SETUP = ServerSetup.generate()
POLICY = ThrottlePolicy(threshold=3, base_delay=10.0, growth=2.0, max_delay=40.0, forget_after=150.0)
CONFIG = ServerConfig(idle_timeout=100, session_lifetime=1000, connection_idle_timeout=10**6)
NAMES = [b"alice@example.org", b"bob@example.org", b"carol@example.org"]
PASSWORDS = {name: b"password of " + name for name in NAMES}
UNKNOWN = b"nobody@example.org"
START = 1_700_000_000.0


class FlakyStorage(SQLiteStorage):
    """SQLite storage whose next group commit can be made to fail (rolled back whole)."""

    fail_next = False

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with super().batch():
            yield
            if self.fail_next:
                self.fail_next = False
                raise StorageError("injected commit failure")


@dataclass
class Model:
    """What the server must hold for one user."""

    user_id: bytes
    secrets: dict[bytes, bytes] = field(default_factory=dict)  # key id -> plaintext
    #: (action, outcome, key id, context, count), in order
    audit: list[tuple[Action, Outcome, bytes | None, Context | None, int]] = field(default_factory=list)

    def log(
        self,
        action: Action,
        outcome: Outcome = Outcome.SUCCESS,
        key_id: bytes | None = None,
        context: Context | None = None,
        count: int = 1,
    ) -> None:
        self.audit.append((action, outcome, key_id, context, count))


@dataclass
class Throttle:
    """The model of one name's throttling record (NET-10)."""

    failures: int = 0
    unlogged: int = 0  # failures not yet in the owner's log
    throttled: int = 0  # refused logins not yet in the owner's log
    locked_until: float = 0.0
    last_failure: float = 0.0

    def failed(self, now: float) -> None:
        self.failures += 1
        self.unlogged += 1
        self.last_failure = now
        wait = POLICY.locked_for(self.failures)
        if wait:
            self.locked_until = max(self.locked_until, now + wait)

    def log_into(self, model: Model) -> None:
        """The counts waiting for the owner's log go there."""
        if self.unlogged:
            model.log(Action.LOGIN, Outcome.FAILURE, count=self.unlogged)
        if self.throttled:
            model.log(Action.LOGIN_THROTTLED, Outcome.FAILURE, count=self.throttled)
        self.unlogged = self.throttled = 0


@dataclass(eq=False)
class Live:
    """A session the client holds."""

    name: bytes
    user_id: bytes
    session_id: int
    storage_key: bytes | None = None


class KeyServerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rng = random.Random(0)
        self.now = START
        self.directory = tempfile.mkdtemp(prefix="keymgmt-machine-")
        self.storage: FlakyStorage | None = None
        self.keyserver: KeyServer | None = None
        self.models: dict[bytes, Model] = {}  # account name -> model
        self.throttle: dict[bytes, Throttle] = {}
        self.sessions: list[Live] = []

    def random(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    # ------------------------------------------------------------ plumbing

    @initialize(in_memory=st.booleans(), seed=st.integers(0, 2**32))
    def start(self, in_memory: bool, seed: int) -> None:
        self.rng.seed(seed)
        path = ":memory:" if in_memory else str(Path(self.directory) / "keyserver.db")
        self.storage = FlakyStorage(path)
        self.keyserver = KeyServer(self.storage, random=self.random, clock=lambda: self.now, throttle=POLICY)
        self.registry = SessionRegistry(
            CONFIG,
            store=self.storage.session_store,
            sealing_key=session_sealing_key(SETUP.to_bytes()),
            random=self.random,
        )
        self.fake = FakeOpaque(self.random)
        self._connect()

    def _connect(self) -> None:
        self.client = ClientConnection(self.random, opaque=self.fake)
        self.server = ServerConnection(
            SETUP, self.random, registry=self.registry, now=self.now, opaque=self.fake
        )

    def _serve(self) -> None:
        """The driver's loop: every run of events one group commit; a failed one abandons."""
        assert self.keyserver is not None
        try:
            with self.keyserver.batch():
                self._drain_server()
        except StorageError:
            self.server.abandon()
            self._drain_server()
            self.server.data_to_send()
            self.client.connection_lost()  # the driver closes the stream

    def _drain_server(self) -> None:
        assert self.keyserver is not None
        while (event := self.server.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            self.keyserver(self.server, event)

    def _pump(self) -> list[Event]:
        events: list[Event] = []
        while True:
            up = self.client.data_to_send()
            if up:
                self.server.receive_data(up, self.now)
                self._serve()
            down = self.server.data_to_send()
            if down:
                self.client.receive_data(down)
            events += drain(self.client)
            if not up and not down:
                return events

    def _lost(self, events: list[Event]) -> bool:
        """Whether the connection failed (a commit failed): then reconnect and resume."""
        if any(isinstance(e, ConnectionFailed) for e in events):
            self._reconnect_after_loss()
            return True
        return False

    def _forget_ended(self, events: list[Event]) -> None:
        ended = {e.session_id for e in events if isinstance(e, SessionClosed | SessionFailed)}
        if any(isinstance(e, ConnectionFailed) for e in events):
            self._reconnect_after_loss()
            return
        self.sessions = [s for s in self.sessions if s.session_id not in ended]

    def _reconnect_after_loss(self) -> None:
        """The connection is gone: resume what can be resumed on a new one."""
        detached = self.client.take_detached_sessions()
        by_id = {s.session_id: s for s in self.sessions}
        self._connect()
        kept = []
        for d in detached:
            live = by_id.get(d.session_id)
            if live is None:
                continue
            live.session_id = self.client.resume_session(d)
            kept.append(live)
        self.sessions = kept
        events = self._pump()
        resumed = {e.session_id for e in events if isinstance(e, SessionResumed)}
        for e in events:
            if isinstance(e, SessionFailed):
                assert e.code is ErrorCode.UNKNOWN_SESSION, e
        self.sessions = [s for s in self.sessions if s.session_id in resumed]

    def _call(self, live: Live, request: object) -> tuple[Status, object] | None:
        """Send one request; its decoded answer, or None if the session or connection ended."""
        body = request.encode()  # type: ignore[attr-defined]
        self.client.send_request(live.session_id, body)
        events = self._pump()
        answers = [e for e in events if isinstance(e, ResponseReceived) and e.session_id == live.session_id]
        if not answers:
            self._forget_ended(events)
            return None
        (answer,) = answers
        return decode_response(request.op, answer.body)  # type: ignore[attr-defined]

    def _model(self, live: Live) -> Model:
        return self.models[live.name]

    # ------------------------------------------------------------ accounts

    @rule(name=st.sampled_from(NAMES))
    def register(self, name: bytes) -> None:
        self.client.open_registration(name, PASSWORDS[name])
        events = self._pump()
        if self._lost(events):  # a failed commit: nothing was stored
            return
        done = [e for e in events if isinstance(e, RegistrationSucceeded)]
        if name in self.models:
            assert not done
            assert any(isinstance(e, SessionFailed) and e.code is ErrorCode.ACCOUNT_EXISTS for e in events)
            return
        assert done, events
        model = Model(done[0].user_id)
        model.log(Action.REGISTER)
        self.models[name] = model

    @rule(name=st.sampled_from([*NAMES, UNKNOWN]), right=st.booleans())
    def login(self, name: bytes, right: bool) -> None:
        password = PASSWORDS.get(name, b"x") if right else b"a wrong password"
        session_id = self.client.open_request_session(name, password)
        events = self._pump()
        record = self.throttle.setdefault(name, Throttle())
        # One login at a time here, so none is in flight when this one starts: it is
        # admitted unless the name is locked.
        admitted = self.now >= record.locked_until
        if self._lost(events):
            # The commit of its first step failed: the start is rolled back, and the login,
            # abandoned with the connection, counts as failed (the same for every name).
            if admitted:
                record.failed(self.now)
            return
        established = [e for e in events if isinstance(e, SessionEstablished)]
        failed = [e for e in events if isinstance(e, SessionFailed) and e.session_id == session_id]
        if not admitted:
            assert failed and failed[0].code is ErrorCode.THROTTLED, events
            record.throttled += 1
            return
        if right and name in self.models:
            assert established, events
            model = self.models[name]
            assert established[0].user_id == model.user_id
            record.log_into(model)  # a success does not clear the failures (NET-9)
            model.log(Action.LOGIN)
            self.sessions.append(Live(name, model.user_id, session_id))
        else:
            assert not established
            assert failed[0].code is ErrorCode.AUTHENTICATION_FAILED, failed
            record.failed(self.now)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def logout(self, data: st.DataObject) -> None:
        live = data.draw(st.sampled_from(self.sessions), label="session")
        self.client.close_session(live.session_id)
        self.sessions.remove(live)
        if not self._lost(self._pump()):  # a failed commit rolls the LOGOUT entry back
            self._model(live).log(Action.LOGOUT)

    # ------------------------------------------------------------ secrets

    def _storage_key(self, live: Live) -> bytes | None:
        if live.storage_key is None:
            answer = self._call(live, RetrieveStorageKeyRequest(live.user_id))
            if answer is None:
                return None
            status, response = answer
            assert status is Status.OK and isinstance(response, StorageKeyResponse)
            self._model(live).log(Action.RETRIEVE_STORAGE_KEY)
            export_key = self.fake.client_registration_finish(
                PASSWORDS[live.name], b"", self._response(live)
            ).state
            live.storage_key = decrypt_storage_key(
                derive_master_key(export_key), response.encrypted_storage_key, live.user_id
            )
        return live.storage_key

    def _response(self, live: Live) -> bytes:
        return self.fake.server_registration_start(SETUP, bytes(32), live.name)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), imported=st.one_of(st.none(), S.secrets(max_size=40)))
    def store(self, data: st.DataObject, imported: bytes | None) -> None:
        live = data.draw(st.sampled_from(self.sessions), label="session")
        storage_key = self._storage_key(live)
        if storage_key is None:
            return
        kind = SecretKind.GENERATED if imported is None else SecretKind.IMPORTED
        secret = self.random(32) if imported is None else imported
        nonce = self.random(32)
        answer = self._call(live, CreateKeyIdRequest(live.user_id, kind, nonce))
        if answer is None:
            return
        status, reply = answer
        assert status is Status.OK and isinstance(reply, KeyIdResponse)
        key_id = reply.key_id
        assert hmac.compare_digest(key_id, joint_key_id(live.user_id, nonce, reply.server_nonce))
        model = self._model(live)
        model.log(Action.CREATE_KEY_ID, key_id=key_id)
        sealed = seal_secret(storage_key, secret, secret_ad(live.user_id, key_id, kind), self.random)
        answer = self._call(live, StoreSecretRequest(live.user_id, key_id, kind, sealed))
        if answer is None:  # not acknowledged: must not be there (checked by the invariant)
            return
        assert answer[0] is Status.OK
        model.secrets[key_id] = secret
        model.log(Action.IMPORT if imported is not None else Action.GENERATE, key_id=key_id)

    def _some_key(self, data: st.DataObject, live: Live) -> bytes:
        own = sorted(self._model(live).secrets)
        others = sorted(k for m in self.models.values() if m.user_id != live.user_id for k in m.secrets)
        return data.draw(st.sampled_from([*own, *others, bytes(16)]), label="key id")

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), context=st.sampled_from(Context))
    def retrieve(self, data: st.DataObject, context: Context) -> None:
        live = data.draw(st.sampled_from(self.sessions), label="session")
        key_id = self._some_key(data, live)
        storage_key = self._storage_key(live)
        if storage_key is None:
            return
        answer = self._call(live, RetrieveRequest(live.user_id, key_id, context))
        if answer is None:
            return
        status, response = answer
        model = self._model(live)
        if key_id in model.secrets:
            assert status is Status.OK and isinstance(response, SecretResponse)
            assert response.associated_data == secret_ad(live.user_id, key_id, response.kind)
            opened = open_secret(storage_key, response.ciphertext, response.associated_data)
            assert opened == model.secrets[key_id]
            model.log(Action.RETRIEVE, key_id=key_id, context=context)
        else:  # a missing key, or another user's: the same one-byte answer (OPS-7)
            assert (status, response) == (Status.NOT_FOUND, None)
            model.log(Action.RETRIEVE, Outcome.FAILURE, key_id, context)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        live = data.draw(st.sampled_from(self.sessions), label="session")
        key_id = self._some_key(data, live)
        answer = self._call(live, DeleteKeyRequest(live.user_id, key_id))
        if answer is None:
            return
        model = self._model(live)
        if key_id in model.secrets:
            assert answer == (Status.OK, answer[1])
            del model.secrets[key_id]
            model.log(Action.DELETE_KEY, key_id=key_id)
        else:
            assert answer == (Status.NOT_FOUND, None)
            model.log(Action.DELETE_KEY, Outcome.FAILURE, key_id)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def list_keys(self, data: st.DataObject) -> None:
        live = data.draw(st.sampled_from(self.sessions), label="session")
        answer = self._call(live, ListKeysRequest(live.user_id))
        if answer is None:
            return
        status, response = answer
        assert status is Status.OK and isinstance(response, KeyListResponse)
        model = self._model(live)
        assert {k.key_id for k in response.keys} == set(model.secrets)
        model.log(Action.LIST_KEYS)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def audit(self, data: st.DataObject) -> None:
        live = data.draw(st.sampled_from(self.sessions), label="session")
        answer = self._call(live, AuditRequest(live.user_id, AuditType.ALL))
        if answer is None:
            return
        status, response = answer
        assert status is Status.OK and isinstance(response, AuditResponse)
        model = self._model(live)
        seen = [(e.action, e.outcome, e.key_id, e.context, e.count) for e in response.entries]
        assert seen == model.audit[: len(seen)]  # (paged at 256: the first page)
        model.log(Action.AUDIT)

    # ------------------------------------------------------------ the world

    @rule(seconds=st.sampled_from([1.0, 15.0, 45.0, 101.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.server.handle_timer(self.now)
        self._serve()  # the expiries' audit entries: one group commit
        events = self._pump()
        if self._lost(events):  # that commit failed: the entries are rolled back
            return
        ended = set()
        for event in events:
            if isinstance(event, SessionClosed):
                live = next(s for s in self.sessions if s.session_id == event.session_id)
                assert event.code is ErrorCode.IDLE_TIMEOUT
                self._model(live).log(Action.SESSION_EXPIRED)
                ended.add(event.session_id)
        self.sessions = [s for s in self.sessions if s.session_id not in ended]
        self._maintain()

    def _maintain(self) -> None:
        """The runtime's maintenance: records forgotten ``forget_after`` after their last
        failure, their counts written into the owner's log first (NET-10, NET-13)."""
        assert self.keyserver is not None
        forgotten = []
        for name, record in self.throttle.items():
            # (No login is ever in flight here: they run one at a time.)
            if record.last_failure < self.now - POLICY.forget_after and record.locked_until < self.now:
                forgotten.append(name)
                if name in self.models:
                    record.log_into(self.models[name])
        for name in forgotten:
            del self.throttle[name]
        assert self.keyserver.maintain() == len(forgotten)

    @rule()
    def fail_next_commit(self) -> None:
        assert self.storage is not None
        self.storage.fail_next = True

    @rule()
    def reconnect(self) -> None:
        self.client.connection_lost()
        self.server.connection_lost()
        self._serve()
        self._pump()
        self._reconnect_after_loss()

    # ------------------------------------------------------------ invariants

    @invariant()
    def storage_matches_the_model(self) -> None:
        if self.storage is None or self.storage.fail_next:
            return
        with self.storage.transaction() as tx:
            for name, model in self.models.items():
                account = tx.get_account(name)
                assert account is not None and account.user_id == model.user_id
                stored = {k.key_id for k in tx.list_keys(model.user_id, 0, 10_000)[0]}
                assert stored == set(model.secrets), name
                entries, _ = tx.query_audit(model.user_id, AuditQuery(AuditType.ALL, limit=256))
                assert [(e.action, e.outcome, e.key_id, e.context, e.count) for e in entries] == model.audit[
                    :256
                ]
                for key_id in model.secrets:
                    secret = tx.get_secret(model.user_id, key_id)
                    assert secret is not None and secret.user_id == model.user_id
                    for other in self.models.values():
                        if other.user_id != model.user_id:
                            assert tx.get_secret(other.user_id, key_id) is None  # OPS-7

    def teardown(self) -> None:
        if self.storage is not None:
            self.storage.close()
        shutil.rmtree(self.directory, ignore_errors=True)


#: ``make test-long`` runs 10,000 examples (about three minutes); ``make test`` the profile's.
EXAMPLES = int(os.environ.get("KEYMGMT_MACHINE_EXAMPLES", "0")) or settings().max_examples
KeyServerMachine.TestCase.settings = settings(settings(), max_examples=EXAMPLES, stateful_step_count=40)
TestKeyServerMachine = KeyServerMachine.TestCase


def test_the_fake_opaque_keeps_the_failures_of_the_real_one():
    """The machine's OPAQUE stand-in refuses a wrong password on both sides and a decoy."""
    from keymgmt.adapters import InMemoryPair, MemoryServerApp

    rng = random.Random(3)
    fake = FakeOpaque(rng.randbytes)
    pair = InMemoryPair(
        ClientConnection(rng.randbytes, opaque=fake),
        ServerConnection(SETUP, rng.randbytes, registry=SessionRegistry(), opaque=fake, now=0.0),
        MemoryServerApp(random=rng.randbytes),
        now=0.0,
    )
    pair.client.open_registration(b"f", b"pw")
    (registered,) = pair.pump()
    assert isinstance(registered, RegistrationSucceeded)
    pair.client.open_request_session(b"f", b"pw")
    (established,) = pair.pump()
    assert isinstance(established, SessionEstablished)
    assert established.export_key == registered.export_key
    for name, password in ((b"f", b"wrong"), (b"unknown", b"pw")):
        pair.client.open_request_session(name, password)
        (failed,) = pair.pump()
        assert isinstance(failed, SessionFailed) and failed.code is ErrorCode.AUTHENTICATION_FAILED
    with pytest.raises(Exception):  # noqa: B017 - any refusal: a forged finalization
        fake.server_login_finish(bytes(96), bytes(64))
    assert os.urandom is not fake  # (the fake holds only the random source it was given)
