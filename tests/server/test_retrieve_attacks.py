"""Review of the lean RETRIEVE path and the per-batch credentials check (rq14): attacks on both.

The lean path must answer, refuse and audit exactly as the general one; a session whose
credentials changed (in the same batch, or through another storage on the same file: another
worker process) must get no answer and no entry after the change; a batch's errors must
leave neither a credentials check nor an audit number behind that is not true."""

from __future__ import annotations

import os
import threading
import time

import pytest

from keymgmt.adapters.server import app as app_module
from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.storage.base import Account, CredentialsChanged, StorageError
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import (
    MAX_SECRET_SIZE,
    Action,
    AuditEntry,
    Context,
    ErrorCode,
    Outcome,
    ResponseReceived,
    RetrieveRequest,
    SecretOps,
    SessionClosed,
    SessionEstablished,
    SessionHandle,
    audit_chain_hash_of,
    audit_genesis_hash,
)

USER, OTHER = bytes(range(16)), bytes(range(16, 32))
KEY, OTHERS_KEY, MISSING = b"K" * 16, b"O" * 16, b"M" * 16
#: Stored rows (kind, ciphertext, associated data) under USER, by key id: the last ones are
#: rows SecretResponse refuses (unknown kind, a generated secret of the wrong size, an empty
#: one, one too large, associated data too long), which the lean path must hand on.
STORED = {
    KEY: (1, bytes(60), b"ad"),
    b"I" * 16: (2, bytes(28 + MAX_SECRET_SIZE), b"x" * 255),
    b"1" * 16: (3, bytes(60), b""),
    b"2" * 16: (1, bytes(61), b""),
    b"3" * 16: (2, bytes(28), b""),
    b"4" * 16: (2, bytes(29 + MAX_SECRET_SIZE), b""),
    b"5" * 16: (2, bytes(40), b"y" * 256),
}


def _storage(path) -> SQLiteStorage:
    storage = SQLiteStorage(path)
    with storage.transaction() as tx:
        tx.insert_account(Account(b"user@example.org", USER, bytes(192), bytes(60)))
        tx.insert_account(Account(b"other@example.org", OTHER, bytes(192), bytes(60)))
    insert = "INSERT INTO secrets (key_id, user_id, kind, ciphertext, associated_data, created_us) VALUES "
    with storage.transaction():
        for key_id, (kind, ciphertext, ad) in STORED.items():
            storage._db.execute(insert + "(?, ?, ?, ?, ?, 1)", (key_id, USER, kind, ciphertext, ad))
        storage._db.execute(insert + "(?, ?, 1, ?, x'', 1)", (OTHERS_KEY, OTHER, bytes(60)))
    return storage


def _log(storage: SQLiteStorage, user_id: bytes = USER) -> list[tuple[object, ...]]:
    return storage._db.execute(
        "SELECT seq, action, timestamp_us, outcome, key_id, context, event_count, chain_hash FROM audit "
        "WHERE user_id = ? ORDER BY seq",
        (user_id,),
    ).fetchall()


def _check_chain(storage: SQLiteStorage, user_id: bytes = USER) -> None:
    previous = audit_genesis_hash()
    for seq, action, timestamp, outcome, key_id, context, count, chain_hash in _log(storage, user_id):
        context = None if context is None else Context(context)
        previous = audit_chain_hash_of(
            user_id, previous, seq, Action(action), timestamp, Outcome(outcome), key_id, context, count
        )
        assert chain_hash == previous, f"entry {seq} is off the chain"


def _bodies() -> list[bytes]:
    bodies = [RetrieveRequest(USER, key_id, context).encode() for key_id in STORED for context in Context]
    bodies += [RetrieveRequest(USER, key_id, Context.NULL).encode() for key_id in (MISSING, OTHERS_KEY)]
    # WRONG_USER: another user's id, with their key or with one of the session's own
    bodies += [RetrieveRequest(OTHER, key_id, Context.NULL).encode() for key_id in (OTHERS_KEY, KEY)]
    valid = RetrieveRequest(USER, KEY, Context.NULL).encode()
    bodies += [valid[:-1] + bytes([3]), valid[:-1] + bytes([0xFF]), valid + b"\0", valid[:-1]]
    return bodies


def _outcome(server: KeyServer, body: bytes, credentials: int | None) -> object:
    try:
        return server._answer_or_gone(SessionHandle(), USER, body, None, credentials)
    except Exception as exc:  # (a refused stored secret: the same error either way)
        return type(exc).__name__


@pytest.mark.parametrize("in_batch", [False, True])
@pytest.mark.parametrize("credentials", [None, 0, 7])
def test_the_lean_path_answers_refuses_and_audits_as_the_general_one(
    tmp_path, monkeypatch, in_batch, credentials
):
    """Every RETRIEVE body (found, each context; a big secret; every stored row SecretResponse
    refuses; missing; another user's key, OPS-7; another user's id; a context or a length it
    must refuse), in and out of a batch, with the session's credentials, none, and changed:
    the same answers (or errors), and the same log, byte for byte, chain hashes included."""
    seen = []
    for lean in (False, True):
        storage = _storage(tmp_path / f"{lean}.db")
        server = KeyServer(storage, clock=iter(range(1_000_000, 2_000_000)).__next__)
        if not lean:
            monkeypatch.setattr(app_module, "retrieve_fields", lambda body: None)
        if in_batch:
            with storage.batch():
                answers = [_outcome(server, body, credentials) for body in _bodies()]
        else:
            answers = [_outcome(server, body, credentials) for body in _bodies()]
        monkeypatch.undo()
        # (timestamps: the lean path reads the clock once more before it hands a request on)
        seen.append((answers, [row[:2] + row[3:7] for row in _log(storage)], len(_log(storage, OTHER))))
        _check_chain(storage)
        storage.close()
    assert seen[0] == seen[1]
    answers = seen[1][0]
    refused_rows = 5 * len(Context)  # (a stored row SecretResponse refuses: ValueError, as before)
    assert answers.count("ValueError") == refused_rows
    changed = len(_bodies()) - refused_rows if credentials == 7 else 0
    assert answers.count("CredentialsChanged") == changed


def test_a_password_change_mid_batch_ends_the_old_sessions_at_once(tmp_path):
    """One batch: the old session retrieves (checked), another session of the account changes
    the password, the old session retrieves again (ended, nothing answered: its failure entry
    only), the new session retrieves; then the account is deleted in the same batch: both end
    (gone: nothing written)."""
    storage = _storage(tmp_path / "ks.db")
    server = KeyServer(storage)
    body = RetrieveRequest(USER, KEY, Context.LOCAL_ONLY).encode()
    old, new = SessionHandle(), SessionHandle()
    with storage.batch():
        assert server.answer(old, USER, body, credentials=0)[0] == 0
        assert server.answer(old, USER, body, credentials=0)[0] == 0
        with storage.transaction() as tx:  # (what CHANGE_PASSWORD_FINISH does to the account)
            version = tx.replace_credentials(USER, b"n" * 192, b"w" * 60, 5, credentials=0)
        assert version == 5
        with pytest.raises(CredentialsChanged) as ended:
            server.answer(old, USER, body, credentials=0)
        assert not ended.value.gone
        assert server.answer(new, USER, body, credentials=5)[0] == 0
        with pytest.raises(CredentialsChanged):
            server.answer(old, USER, body, credentials=0)
        assert server.answer(new, USER, body, credentials=5)[0] == 0
    assert [(row[1], row[3]) for row in _log(storage)] == [
        (Action.RETRIEVE, Outcome.SUCCESS),
        (Action.RETRIEVE, Outcome.SUCCESS),
        (Action.RETRIEVE, Outcome.FAILURE),
        (Action.RETRIEVE, Outcome.SUCCESS),
        (Action.RETRIEVE, Outcome.FAILURE),
        (Action.RETRIEVE, Outcome.SUCCESS),
    ]
    _check_chain(storage)
    with storage.batch():
        assert server.answer(new, USER, body, credentials=5)[0] == 0
        with storage.transaction() as tx:
            assert tx.delete_account(USER, 0, credentials=5)
        for session, version in ((new, 5), (old, 0)):
            with pytest.raises(CredentialsChanged) as ended:
                server.answer(session, USER, body, credentials=version)
            assert ended.value.gone
    assert len(_log(storage)) == 7  # queued for the purge, which then takes it all
    while server.purge_audit_logs() is not None:
        pass
    assert _log(storage) == []
    storage.close()


def test_another_process_cannot_change_the_password_inside_a_batch(tmp_path):
    """Another SQLiteStorage on the file (a second worker process) changes the password while a
    batch is open: its write waits for the batch's commit, so the entries the batch wrote after
    its check precede the change; the next batch checks again and ends the old session."""
    storage = _storage(tmp_path / "ks.db")
    other = SQLiteStorage(tmp_path / "ks.db")
    server = KeyServer(storage)
    body = RetrieveRequest(USER, KEY, Context.NULL).encode()
    changed = threading.Event()

    def change() -> None:
        with other.transaction() as tx:
            assert tx.replace_credentials(USER, b"n" * 192, b"w" * 60, 5, credentials=0) == 5
        changed.set()

    with storage.batch():
        assert server.answer(SessionHandle(), USER, body, credentials=0)[0] == 0
        thread = threading.Thread(target=change)
        thread.start()
        time.sleep(0.3)
        assert not changed.is_set()  # waiting for the batch's write lock
        assert server.answer(SessionHandle(), USER, body, credentials=0)[0] == 0
        assert storage.checked_credentials == {USER: 0}
    thread.join(10)
    assert changed.is_set()
    for _ in range(2):
        with storage.batch(), pytest.raises(CredentialsChanged):
            server.answer(SessionHandle(), USER, body, credentials=0)
    with storage.batch():
        assert server.answer(SessionHandle(), USER, body, credentials=5)[0] == 0
    assert [row[3] for row in _log(storage)] == [Outcome.SUCCESS] * 2 + [Outcome.FAILURE] * 2 + [
        Outcome.SUCCESS
    ]
    _check_chain(storage)
    other.close()
    storage.close()


def test_an_audit_number_taken_by_another_process_leaves_nothing_wrong(tmp_path):
    """Between two batches another process appends to the user's log (the number this storage
    remembers is taken) and then changes the password: the next batch's retrieve meets the
    taken number (IntegrityError, read again) and must still check the credentials: ended,
    its failure entry numbered and chained after the other process's entry. With the
    credentials unchanged, the retry's entry is checked once and the next ones follow it."""
    storage = _storage(tmp_path / "ks.db")
    other = SQLiteStorage(tmp_path / "ks.db")
    server, there = KeyServer(storage), KeyServer(other)
    body = RetrieveRequest(USER, KEY, Context.NULL).encode()
    with storage.batch():
        assert server.answer(SessionHandle(), USER, body, credentials=0)[0] == 0
    assert there.answer(SessionHandle(), USER, body, credentials=0)[0] == 0  # takes number 2
    with storage.batch():
        for _ in range(3):
            assert server.answer(SessionHandle(), USER, body, credentials=0)[0] == 0
        assert storage.checked_credentials == {USER: 0}
    assert [row[0] for row in _log(storage)] == [1, 2, 3, 4, 5]
    _check_chain(storage)
    assert there.answer(SessionHandle(), USER, body, credentials=0)[0] == 0  # takes number 6
    with other.transaction() as tx:
        assert tx.replace_credentials(USER, b"n" * 192, b"w" * 60, 5, credentials=0) == 5
    with storage.batch():
        with pytest.raises(CredentialsChanged):
            server.answer(SessionHandle(), USER, body, credentials=0)
        assert storage.checked_credentials == {}
        assert server.answer(SessionHandle(), USER, body, credentials=5)[0] == 0
        assert storage.audit_numbers[USER][0] == 8
    assert [(row[0], row[3]) for row in _log(storage)][-3:] == [
        (6, Outcome.SUCCESS),
        (7, Outcome.FAILURE),
        (8, Outcome.SUCCESS),
    ]
    _check_chain(storage)
    other.close()
    storage.close()


def test_a_failed_batch_forgets_its_checks_and_numbers(tmp_path):
    """A batch that checked the credentials and then fails (its commit refused, or the block
    raised) is rolled back: its checks and numbers must go with it, or the next batch would
    write plain entries for credentials another process changed meanwhile, numbered after
    entries that are not there."""
    storage = _storage(tmp_path / "ks.db")
    other = SQLiteStorage(tmp_path / "ks.db")
    server = KeyServer(storage)
    body = RetrieveRequest(USER, KEY, Context.NULL).encode()
    with pytest.raises(RuntimeError), storage.batch():
        assert server.answer(SessionHandle(), USER, body, credentials=0)[0] == 0
        assert storage.checked_credentials == {USER: 0}
        raise RuntimeError("the batch fails")
    assert storage.checked_credentials == {} and storage.audit_numbers == {}
    with other.transaction() as tx:
        assert tx.replace_credentials(USER, b"n" * 192, b"w" * 60, 5, credentials=0) == 5
    with storage.batch(), pytest.raises(CredentialsChanged):
        server.answer(SessionHandle(), USER, body, credentials=0)
    # A statement that fails inside the batch (the storage error a request meets) forgets too.
    with storage.batch():
        assert server.answer(SessionHandle(), USER, body, credentials=5)[0] == 0
        assert storage.checked_credentials == {USER: 5}
        with pytest.raises(StorageError), storage.transaction(atomic=False):
            storage._db.execute("INSERT INTO accounts (user_id) VALUES (x'00')")
        assert storage.checked_credentials == {}
        assert server.answer(SessionHandle(), USER, body, credentials=5)[0] == 0
    assert [row[0] for row in _log(storage)] == [1, 2, 3]
    _check_chain(storage)
    other.close()
    storage.close()


def test_one_batch_of_frames_from_old_sessions_around_a_password_change(tmp_path):
    """The protocol, in group-commit batches: one batch holds a retrieve of an old session,
    the owner's CHANGE_PASSWORD_FINISH, the old session's next retrieve (same connection) and
    the LOGIN_FINISH of a login that read the old record before the change. The old session
    has its first answer, then CLOSE(NOT_AUTHORIZED) and no second answer; the late login is
    established with the old credentials, and its first retrieve (next batch) ends it with
    no answer and no success entry. The owner's log verifies."""
    from ..support.helpers import PASSWORD, only, register
    from .test_accounts_server import ALICE, NEW, _run, _World

    storage = SQLiteStorage(tmp_path / "ks.db")
    world = _World(storage)
    owner_pair, pair, late = world.pair(), world.pair(), world.pair()
    register(owner_pair, ALICE)
    old = _login(pair, ALICE, PASSWORD)
    old_ops = SecretOps(old.user_id, old.export_key, os.urandom)
    (key_id, _copy), _ = _run(pair, old, old_ops.generate(lambda _key_id: False))
    late.run_opaque_steps = False
    late.client.open_request_session(ALICE, PASSWORD)
    (step,) = late.pump()  # the old record, read before the change
    owner = _login(owner_pair, ALICE, PASSWORD)
    owner_ops = SecretOps(owner.user_id, owner.export_key, os.urandom)
    registration, _ = _run(owner_pair, owner, owner_ops.change_password_start(NEW, owner_pair.client.opaque))
    finish = owner_ops.change_password_finish(registration.run(owner_pair.client.opaque))
    body = RetrieveRequest(old.user_id, key_id, Context.LOCAL_ONLY).encode()
    late.client.complete_opaque_step(step.run(late.client.opaque))
    with world.keyserver.batch():
        first = pair.client.send_request(old.session_id, body)
        pair.to_server(pair.client.data_to_send())
        changed = owner_pair.client.send_request(owner.session_id, next(finish).encode())
        owner_pair.to_server(owner_pair.client.data_to_send())
        second = pair.client.send_request(old.session_id, body)
        pair.to_server(pair.client.data_to_send())
        late.to_server(late.client.data_to_send())
    events = pair.pump()
    answers = {e.request_id: e.body for e in events if isinstance(e, ResponseReceived)}
    assert set(answers) == {first} and second != first and answers[first][0] == 0
    assert [(e.session_id, e.code) for e in events if isinstance(e, SessionClosed)] == [
        (old.session_id, ErrorCode.NOT_AUTHORIZED)
    ]
    assert [e.request_id for e in owner_pair.pump() if isinstance(e, ResponseReceived)] == [changed]
    established = only(late.pump(), SessionEstablished)
    assert late.server.credentials_version(established.session_id) == 0
    with world.keyserver.batch():
        third = late.client.send_request(established.session_id, body)
        late.to_server(late.client.data_to_send())
    events = late.pump()
    assert not [e for e in events if isinstance(e, ResponseReceived) and e.request_id == third]
    assert [(e.session_id, e.code) for e in events if isinstance(e, SessionClosed)] == [
        (established.session_id, ErrorCode.NOT_AUTHORIZED)
    ]
    entries = [(e.action, e.outcome) for e in _verified(owner_pair, owner, owner_ops)]
    after = entries[entries.index((Action.CHANGE_PASSWORD, Outcome.SUCCESS)) + 1 :]
    assert (Action.RETRIEVE, Outcome.SUCCESS) not in after
    assert (Action.RETRIEVE, Outcome.FAILURE) in after  # the late session's ended request
    storage.close()


def _login(pair, account: bytes, password: bytes) -> SessionEstablished:
    pair.client.open_request_session(account, password)
    return next(e for e in pair.pump() if isinstance(e, SessionEstablished))


def _verified(pair, session: SessionEstablished, ops: SecretOps) -> list[AuditEntry]:
    from .test_accounts_server import _run

    verified, _ = _run(pair, session, ops.verify_audit(None))
    return list(verified.entries)
