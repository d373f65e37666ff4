"""SecretOps, the client's checks around each operation (docs/protocol.md section 12.10), driven
without any I/O: each test plays the key server by hand, honest or lying."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TypeVar

import pytest

from keymgmt_proto import (
    Action,
    AuditEntry,
    AuditHead,
    AuditRequest,
    AuditResponse,
    AuditType,
    Context,
    CreateKeyIdRequest,
    DeleteKeyRequest,
    Empty,
    IntegrityFailure,
    KeyIdResponse,
    KeyInfo,
    KeyListResponse,
    ListKeysRequest,
    Op,
    OperationRefused,
    OpRequest,
    OpResponse,
    Outcome,
    Plan,
    RetrieveRequest,
    RetrieveStorageKeyRequest,
    SealedCopy,
    SecretKind,
    SecretOps,
    SecretResponse,
    Status,
    StorageKeyResponse,
    StoredResponse,
    StoreSecretRequest,
    audit_chain_hash,
    audit_genesis_hash,
    derive_master_key,
    encode_response,
    encrypt_storage_key,
    joint_key_id,
    open_secret,
)

T = TypeVar("T")
USER = bytes(range(16))
EXPORT_KEY = bytes(range(32, 96))
STORAGE_KEY = bytes(range(100, 132))
NEVER: frozenset[bytes] = frozenset()


def _ops() -> SecretOps:
    return SecretOps(USER, EXPORT_KEY, os.urandom)


def _storage_key_answer(storage_key: bytes = STORAGE_KEY) -> StorageKeyResponse:
    wrapped = encrypt_storage_key(derive_master_key(EXPORT_KEY), storage_key, USER, os.urandom)
    return StorageKeyResponse(wrapped)


def _run(
    plan: Plan[T], answer: dict[type[OpRequest], OpResponse | list[OpResponse]]
) -> tuple[T, list[OpRequest]]:
    """Drive ``plan`` to its end, answering each request type from ``answer``."""
    sent: list[OpRequest] = []
    try:
        request = next(plan)
        while True:
            sent.append(request)
            reply = answer[type(request)]
            response = reply.pop(0) if isinstance(reply, list) else reply
            request = plan.send(response)
    except StopIteration as done:
        return done.value, sent


class HonestKeyIds:
    """Answers CREATE_KEY_ID as an honest server: the id both nonces give."""

    def __init__(self) -> None:
        self.server_nonce = bytes(range(7, 39))

    def answer(self, request: CreateKeyIdRequest) -> KeyIdResponse:
        key_id = joint_key_id(USER, request.client_nonce, self.server_nonce)
        return KeyIdResponse(key_id, self.server_nonce)


def _store(
    ops: SecretOps,
    secret: bytes,
    holds: frozenset[bytes] = NEVER,
    forge: bool = False,
    storage_key: bytes = STORAGE_KEY,
):
    plan = ops.store(secret, SecretKind.IMPORTED, holds.__contains__)
    create = next(plan)
    if isinstance(create, RetrieveStorageKeyRequest):  # the first plan of the session
        create = plan.send(_storage_key_answer(storage_key))
    assert isinstance(create, CreateKeyIdRequest) and create.kind is SecretKind.IMPORTED
    reply = HonestKeyIds().answer(create)
    if forge:
        reply = KeyIdResponse(joint_key_id(USER, bytes(32), reply.server_nonce), reply.server_nonce)
    store = plan.send(reply)
    assert isinstance(store, StoreSecretRequest)
    with pytest.raises(StopIteration) as done:
        plan.send(StoredResponse())  # no next key id: every store starts with CREATE_KEY_ID
    return done.value.value, store


def test_a_store_seals_under_the_key_id_both_nonces_give_and_fetches_the_storage_key_once():
    ops = _ops()
    (key_id, copy), store = _store(ops, b"hello")
    assert store.key_id == key_id and copy.ciphertext == store.ciphertext and copy.kind is SecretKind.IMPORTED
    assert copy.associated_data == USER + key_id + b"imported key"
    # The storage key is kept: the next plan starts with CREATE_KEY_ID.
    plan = ops.generate(NEVER.__contains__)
    assert isinstance(next(plan), CreateKeyIdRequest)
    # ... and forget() drops it (logout, or the session ended), with the export key that
    # unwraps it: a plan needing it afterwards sends nothing (review of issue 16).
    ops.forget()
    assert not ops._export_key
    with pytest.raises(ValueError, match="keys were dropped"):
        next(ops.generate(NEVER.__contains__))
    assert isinstance(next(_ops().generate(NEVER.__contains__)), RetrieveStorageKeyRequest)


def test_the_storage_keys_cipher_is_kept_with_it_and_forgotten_with_it():
    """Stores seal with the storage key's cipher built once: each ciphertext opens under the
    storage key with its AD; forget() drops the cipher with the key, and the next session's
    storage key (another one here) is the one its stores seal under."""
    ops = _ops()
    for secret in (b"one", b"two"):
        (_, copy), _ = _store(ops, secret)
        assert open_secret(STORAGE_KEY, copy.ciphertext, copy.associated_data) == secret
    assert ops._sealer is not None
    ops.forget()
    assert ops._sealer is None and ops._storage_key is None
    other = bytes(32)
    (_, copy), _ = _store(_ops(), b"three", storage_key=other)  # the next session's: this one seals
    assert open_secret(other, copy.ciphertext, copy.associated_data) == b"three"


def test_a_key_id_not_from_the_clients_nonce_or_already_held_is_an_integrity_failure():
    with pytest.raises(IntegrityFailure, match="not derived from this client's nonce"):
        _store(_ops(), b"x", forge=True)
    ops = _ops()
    (key_id, _copy), _ = _store(ops, b"x")
    plan = ops.store(b"y", SecretKind.GENERATED, {key_id}.__contains__)
    create = next(plan)
    assert isinstance(create, CreateKeyIdRequest)
    # A broken client RNG repeats the nonce; the server repeats its own: the same id again.
    forged = KeyIdResponse(key_id, HonestKeyIds().server_nonce)
    with pytest.raises(IntegrityFailure):
        plan.send(forged)


def test_a_storage_key_that_does_not_verify_is_an_integrity_failure():
    plan = _ops().storage_key()
    next(plan)
    wrapped = bytearray(_storage_key_answer().encrypted_storage_key)
    wrapped[-1] ^= 1
    with pytest.raises(IntegrityFailure, match="storage key failed verification"):
        plan.send(StorageKeyResponse(bytes(wrapped)))


def _retrieve(
    ops: SecretOps, key_id: bytes, context: Context, local: SealedCopy | None, server: SecretResponse
):
    return _run(
        ops.retrieve(key_id, context, local),
        {RetrieveStorageKeyRequest: _storage_key_answer(), RetrieveRequest: server},
    )


def test_retrieve_uses_a_verified_local_copy_and_replaces_a_damaged_one():
    ops = _ops()
    (key_id, copy), _ = _store(ops, b"secret")
    server = SecretResponse(copy.kind, copy.ciphertext, copy.associated_data)
    (secret, keep), sent = _retrieve(ops, key_id, Context.LOCAL_ONLY, copy, server)
    assert (secret, keep) == (b"secret", None) and sent == []  # the server is not asked
    damaged = SealedCopy(
        copy.kind, copy.ciphertext[:-1] + bytes([copy.ciphertext[-1] ^ 1]), copy.associated_data
    )
    (secret, keep), sent = _retrieve(ops, key_id, Context.EXPORT, damaged, server)
    assert secret == b"\x06secret" and keep == copy and [type(r) for r in sent] == [RetrieveRequest]
    (secret, keep), _ = _retrieve(ops, key_id, Context.NULL, None, server)
    assert secret is None and keep == copy


@pytest.mark.parametrize("lie", ["another key's AD", "another kind", "a flipped bit"])
def test_a_secret_the_server_altered_or_swapped_is_an_integrity_failure(lie):
    ops = _ops()
    (key_id, copy), _ = _store(ops, bytes(32))  # the size of a generated secret
    (_other_id, other), _ = _store(ops, b"other")
    if lie == "another key's AD":
        server = SecretResponse(other.kind, other.ciphertext, other.associated_data)
    elif lie == "another kind":
        server = SecretResponse(SecretKind.GENERATED, copy.ciphertext, USER + key_id)
    else:
        server = SecretResponse(
            copy.kind, copy.ciphertext[:-1] + bytes([copy.ciphertext[-1] ^ 1]), copy.associated_data
        )
    with pytest.raises(IntegrityFailure):
        _retrieve(ops, key_id, Context.LOCAL_ONLY, None, server)


def test_answers_decode_for_the_op_sent_and_refusals_carry_their_status():
    request = DeleteKeyRequest(USER, bytes(16))
    assert SecretOps.answer(request, encode_response(Status.OK, Empty())) == Empty()
    with pytest.raises(OperationRefused) as refused:
        SecretOps.answer(request, encode_response(Status.NOT_FOUND))
    assert refused.value.status is Status.NOT_FOUND and str(refused.value) == "request refused: not found"
    with pytest.raises(IntegrityFailure, match="malformed response"):
        SecretOps.answer(request, b"")
    key_list = encode_response(Status.OK, KeyListResponse(()))
    with pytest.raises(IntegrityFailure):  # an answer of another op's shape
        SecretOps.answer(CreateKeyIdRequest(USER, SecretKind.GENERATED, bytes(32)), key_list)
    assert Op.DELETE_KEY is request.op


def test_list_and_audit_follow_the_cursor_to_the_last_page():
    first = KeyInfo(bytes(16), SecretKind.GENERATED, 1)
    second = KeyInfo(bytes([1]) * 16, SecretKind.IMPORTED, 2)
    pages = [KeyListResponse((first,), next_cursor=9), KeyListResponse((second,))]
    keys, sent = _run(_ops().list_keys(), {ListKeysRequest: pages})
    assert [(k.key_id, k.kind, k.created, k.label) for k in keys] == [
        (first.key_id, first.kind, first.created, None),
        (second.key_id, second.kind, second.created, None),
    ]
    assert [r.cursor for r in sent if isinstance(r, ListKeysRequest)] == [0, 9]
    audits = [AuditResponse((), next_cursor=3), AuditResponse(())]  # filtered: may be empty, not the end
    entries, sent = _run(_ops().audit(AuditType.KEY_ONLY), {AuditRequest: audits})
    assert entries == [] and [r.cursor for r in sent if isinstance(r, AuditRequest)] == [0, 3]


def _chained(*ids_and_actions: tuple[int, Action]) -> list[AuditEntry]:
    """Entries 1, 2, 3, ... of USER's log with their true chain hashes."""
    entries, previous = [], audit_genesis_hash()
    for entry_id, action in ids_and_actions:
        entry = AuditEntry(entry_id, action, 1_700_000_000_000_000 + entry_id, Outcome.SUCCESS)
        previous = audit_chain_hash(USER, previous, entry)
        entries.append(replace(entry, chain_hash=previous))
    return entries


def test_audit_goes_on_across_short_and_empty_pages_to_the_logs_end():
    """Protocol.md 12.9: a page may hold fewer entries than asked for, or none, with a
    next_cursor past the entries the server read; only next_cursor 0 ends the walk. The
    filtered walk and the chain walk (verify_audit) both go on, and verify the chain
    across the pages."""
    found = [
        AuditEntry(
            entry_id, Action.RETRIEVE, 1_700_000_000_000_000, Outcome.SUCCESS, bytes(16), None, 1, bytes(32)
        )
        for entry_id in (1, 9000, 13000, 13001)
    ]
    pages = [
        AuditResponse(tuple(found[:1]), next_cursor=4096),  # short: the server read 4096 entries
        AuditResponse((), next_cursor=8192),  # empty, not done
        AuditResponse(tuple(found[1:2]), next_cursor=12288),
        AuditResponse(tuple(found[2:3]), next_cursor=13000),  # full: the last one returned
        AuditResponse(tuple(found[3:])),  # the log's end
    ]
    entries, sent = _run(_ops().audit(AuditType.KEY_ONLY, [bytes(16)]), {AuditRequest: pages})
    assert entries == found
    assert [r.cursor for r in sent if isinstance(r, AuditRequest)] == [0, 4096, 8192, 12288, 13000]
    # The chain walk: short pages, and an empty last one.
    one, two, three = _chained((1, Action.REGISTER), (2, Action.LOGIN), (3, Action.AUDIT))
    pages = [
        AuditResponse((one,), next_cursor=1),
        AuditResponse((two,), next_cursor=2),
        AuditResponse((three,), next_cursor=3),
        AuditResponse(()),
    ]
    verified, sent = _run(_ops().verify_audit(None), {AuditRequest: pages})
    assert verified.entries == [one, two, three] and verified.head == AuditHead(3, three.chain_hash)
    assert [r.cursor for r in sent if isinstance(r, AuditRequest)] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "pages",
    [
        [AuditResponse((), next_cursor=5), AuditResponse((), next_cursor=5)],  # stays put: forever
        [AuditResponse((), next_cursor=5), AuditResponse((), next_cursor=4)],  # goes back
        "entry at the cursor",
        "next before the last entry",
        "out of order",
    ],
    ids=["cursor-stays", "cursor-goes-back", "entry-at-cursor", "next-before-last-entry", "out-of-order"],
)
@pytest.mark.parametrize("walk", ["audit", "verify_audit"])
def test_an_audit_walk_that_would_repeat_entries_or_never_end_is_refused(pages, walk):
    """A lying server cannot keep the client walking forever (a next_cursor that does not
    move forward) nor make it take entries twice (entries at or before the cursor, out of
    order, or a next_cursor before the last entry it returned): IntegrityFailure."""
    one, two, three = _chained((1, Action.REGISTER), (2, Action.LOGIN), (3, Action.AUDIT))
    if pages == "entry at the cursor":
        pages = [AuditResponse((one, two), next_cursor=2), AuditResponse((two, three))]
    elif pages == "next before the last entry":
        pages = [AuditResponse((one, two), next_cursor=1), AuditResponse((two, three))]
    elif pages == "out of order":
        pages = [AuditResponse((two, one))]
    plan = _ops().audit() if walk == "audit" else _ops().verify_audit(None)
    answers = list(pages) + [AuditResponse((), next_cursor=9)] * 10  # never 0
    with pytest.raises(
        IntegrityFailure, match=r"audit log: .*(does not come after|does not move past|is not its last)"
    ):
        _run(plan, {AuditRequest: answers})


@pytest.mark.parametrize("first", ["empty", "past its last entry"])
@pytest.mark.parametrize("walk", ["audit", "verify_audit"])
def test_an_unfiltered_walk_on_pages_that_return_no_entry_is_refused_at_once(first, walk):
    """Review of the auscan merge: a lying server answered the chain walk with empty pages whose
    next_cursor moves by one (each is "past the cursor"), or first a page whose next_cursor
    jumps past its last entry (no later entry can then follow it in the chain): verify_audit
    went on asking, up to 2**64 times, holding nothing new (so did an unfiltered audit()). An
    unfiltered page matches every
    entry the server read, so an honest one that is not the last is full and its next_cursor is
    its last entry (protocol.md 12.9): anything else is refused on the page that shows it."""
    (one,) = _chained((1, Action.REGISTER))
    plan = _ops().audit() if walk == "audit" else _ops().verify_audit(None)
    request = next(plan)
    asked = 1
    with pytest.raises(IntegrityFailure, match=r"audit log: .*unfiltered page"):
        if first == "past its last entry":
            request = plan.send(AuditResponse((one,), next_cursor=1_000))
            asked += 1
        while asked < 10_000:
            assert isinstance(request, AuditRequest)
            request = plan.send(AuditResponse((), next_cursor=request.cursor + 1))
            asked += 1
    assert asked == 1


def test_invalid_arguments_are_refused_before_any_request():
    with pytest.raises(ValueError):
        next(_ops().retrieve(b"short", Context.NULL, None))
    with pytest.raises(ValueError):
        next(_ops().delete(b"short"))
    with pytest.raises(ValueError):
        _ops().import_portable(b"\x05abc", NEVER.__contains__)


def test_removing_a_label_says_whether_the_key_had_one_and_sends_nothing_when_it_had_none():
    """Review of issue 16, gap 6: `rename --remove` on a key without a label said "removed".
    The plan lists the keys first: a key listed without a label gets no RENAME_KEY (False);
    one with a label, or one that does not verify, gets the empty label (True); a key not
    listed is left to the server."""
    from keymgmt_proto import RenameKeyRequest, seal_label

    bare, named, tampered, unknown = (bytes([n]) * 16 for n in (1, 2, 3, 4))
    sealed = seal_label(STORAGE_KEY, USER, named, "named", os.urandom)
    listing = KeyListResponse(
        (
            KeyInfo(bare, SecretKind.GENERATED, 1),
            KeyInfo(named, SecretKind.GENERATED, 2, sealed),
            KeyInfo(tampered, SecretKind.GENERATED, 3, sealed),  # named's label: it does not open here
        )
    )
    answers = {ListKeysRequest: listing, RetrieveStorageKeyRequest: _storage_key_answer()}
    for key_id, had_label, sends in (
        (bare, False, False),
        (named, True, True),
        (tampered, True, True),
        (unknown, False, True),
    ):
        result, sent = _run(_ops().rename(key_id, None), {**answers, RenameKeyRequest: Empty()})
        renames = [r for r in sent if isinstance(r, RenameKeyRequest)]
        assert (result, bool(renames)) == (had_label, sends), key_id
        assert all(r.key_id == key_id and r.sealed_label == b"" for r in renames)
    # Setting a label says the same of the label before, and always sends it.
    result, sent = _run(_ops().rename(bare, "fresh"), {**answers, RenameKeyRequest: Empty()})
    assert result is False and isinstance(sent[-1], RenameKeyRequest) and sent[-1].sealed_label
    result, _ = _run(_ops().rename(named, "fresh"), {**answers, RenameKeyRequest: Empty()})
    assert result is True
