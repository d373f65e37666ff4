"""One request per store (issue 14, item 4): a STORE_SECRET asks for the next key id and the
client's next store of that kind uses it, with every KEY-2 check; a reservation the server lost
costs a CREATE_KEY_ID and another try (at most STORE_RETRIES). SecretOps driven by hand, no I/O."""

from __future__ import annotations

import os

import pytest

from keymgmt_proto import (
    MAX_NEXT_KEY_IDS,
    STORE_RETRIES,
    CreateKeyIdRequest,
    IntegrityFailure,
    KeyIdResponse,
    OperationRefused,
    OpRequest,
    OpResponse,
    RetrieveStorageKeyRequest,
    SecretKind,
    SecretOps,
    Status,
    StorageKeyResponse,
    StoredResponse,
    StoreSecretRequest,
    derive_master_key,
    encrypt_storage_key,
    joint_key_id,
    open_secret,
)

USER = bytes(range(16))
EXPORT_KEY = bytes(range(32, 96))
STORAGE_KEY = bytes(range(100, 132))


class Server:
    """An honest key server's answers (nonces it draws, ids both nonces give), with hooks
    to refuse a store or lie about the next key id."""

    def __init__(self) -> None:
        self.refuse: list[Status] = []  # statuses for the coming STORE_SECRETs, then OK
        self.forge_next = False
        self.give_next = True
        self.sent: list[OpRequest] = []

    def answer(self, request: OpRequest) -> OpResponse | OperationRefused:
        self.sent.append(request)
        if isinstance(request, RetrieveStorageKeyRequest):
            wrapped = encrypt_storage_key(derive_master_key(EXPORT_KEY), STORAGE_KEY, USER, os.urandom)
            return StorageKeyResponse(wrapped)
        if isinstance(request, CreateKeyIdRequest):
            nonce = os.urandom(32)
            return KeyIdResponse(joint_key_id(USER, request.client_nonce, nonce), nonce)
        assert isinstance(request, StoreSecretRequest)
        if self.refuse:
            return OperationRefused(self.refuse.pop(0))
        if not self.give_next or request.next_client_nonce is None:
            return StoredResponse()
        nonce = os.urandom(32)
        client_nonce = bytes(32) if self.forge_next else request.next_client_nonce
        return StoredResponse(joint_key_id(USER, client_nonce, nonce), nonce)


def store(ops: SecretOps, server: Server, secret: bytes, kind=SecretKind.IMPORTED, holds=frozenset()):
    """Run one store plan against ``server`` the way an adapter does (refusals thrown in);
    returns its result and the requests it sent."""
    before = len(server.sent)
    plan = ops.store(secret, kind, holds.__contains__)
    try:
        request = next(plan)
        while True:
            answer = server.answer(request)
            request = plan.throw(answer) if isinstance(answer, OperationRefused) else plan.send(answer)
    except StopIteration as done:
        return done.value, server.sent[before:]


def kinds(sent: list[OpRequest]) -> list[str]:
    return [type(r).__name__ for r in sent]


def test_after_the_first_store_every_store_of_that_kind_is_one_request():
    ops, server = SecretOps(USER, EXPORT_KEY, os.urandom), Server()
    (first, _), sent = store(ops, server, b"one")
    assert kinds(sent) == ["RetrieveStorageKeyRequest", "CreateKeyIdRequest", "StoreSecretRequest"]
    assert sent[-1].next_kind is SecretKind.IMPORTED and sent[-1].next_client_nonce is not None
    for secret in (b"two", b"three", b"four"):
        (key_id, copy), sent = store(ops, server, secret)
        assert kinds(sent) == ["StoreSecretRequest"]
        assert key_id not in (first,) and sent[0].key_id == key_id
        assert open_secret(STORAGE_KEY, copy.ciphertext, copy.associated_data) == secret
    # The other kind has no next key id yet: CREATE_KEY_ID first, then one request too.
    _, sent = store(ops, server, bytes(32), SecretKind.GENERATED)
    assert kinds(sent) == ["CreateKeyIdRequest", "StoreSecretRequest"]
    _, sent = store(ops, server, bytes(32), SecretKind.GENERATED)
    assert kinds(sent) == ["StoreSecretRequest"]


def test_a_next_key_id_not_from_the_clients_nonce_or_already_held_is_refused_before_sending():
    """KEY-2 holds for a next key id exactly as for a CREATE_KEY_ID answer; the refused id is
    gone (the following store asks CREATE_KEY_ID)."""
    ops, server = SecretOps(USER, EXPORT_KEY, os.urandom), Server()
    server.forge_next = True
    store(ops, server, b"one")
    with pytest.raises(IntegrityFailure, match="not derived from this client's nonce"):
        store(ops, server, b"two")
    assert kinds(server.sent[-1:]) == ["StoreSecretRequest"]  # the first store; nothing since
    server.forge_next = False
    (second, _), sent = store(ops, server, b"two")
    assert kinds(sent) == ["CreateKeyIdRequest", "StoreSecretRequest"]
    held = ops._next[SecretKind.IMPORTED][0].key_id
    with pytest.raises(IntegrityFailure, match="already holds"):
        store(ops, server, b"three", holds={held})
    assert ops._next[SecretKind.IMPORTED] == []
    assert second != held


def test_a_reservation_the_server_lost_costs_one_create_key_id_and_one_more_try():
    """The session resumed on another instance, or the server restarted: the next key id is
    refused INVALID; the client asks CREATE_KEY_ID and seals afresh under the new id."""
    ops, server = SecretOps(USER, EXPORT_KEY, os.urandom), Server()
    store(ops, server, b"one")
    server.refuse = [Status.INVALID]
    (key_id, copy), sent = store(ops, server, b"two")
    assert kinds(sent) == ["StoreSecretRequest", "CreateKeyIdRequest", "StoreSecretRequest"]
    assert sent[0].key_id != key_id and sent[2].key_id == key_id
    assert copy.associated_data == USER + key_id + b"imported key"
    assert open_secret(STORAGE_KEY, copy.ciphertext, copy.associated_data) == b"two"
    # Bounded: after STORE_RETRIES fresh key ids refused too, the INVALID is the caller's error.
    server.refuse = [Status.INVALID] * (STORE_RETRIES + 2)
    with pytest.raises(OperationRefused) as refused:
        store(ops, server, b"three")
    assert refused.value.status is Status.INVALID
    tries = 2 * STORE_RETRIES + 3
    assert kinds(server.sent[-tries:]) == ["StoreSecretRequest"] + [
        "CreateKeyIdRequest",
        "StoreSecretRequest",
    ] * (STORE_RETRIES + 1)


def test_a_fresh_reservation_lost_before_its_store_is_asked_for_again():
    """Issue 15, defect (a): the reservation made by the store's own CREATE_KEY_ID is lost
    too when a reconnection falls between the two requests (another instance, a restarted
    server). The client asks for a fresh key id (never reusing the refused one) and seals
    afresh; each further reconnection may cost one more, up to STORE_RETRIES."""
    assert STORE_RETRIES >= 2
    ops, server = SecretOps(USER, EXPORT_KEY, os.urandom), Server()
    server.refuse = [Status.INVALID] * STORE_RETRIES
    (key_id, copy), sent = store(ops, server, b"one")
    expected = ["CreateKeyIdRequest", "StoreSecretRequest"] * (STORE_RETRIES + 1)
    assert kinds(sent) == ["RetrieveStorageKeyRequest", *expected]
    stored_ids = [r.key_id for r in sent if isinstance(r, StoreSecretRequest)]
    assert len(set(stored_ids)) == len(stored_ids) and stored_ids[-1] == key_id
    assert open_secret(STORAGE_KEY, copy.ciphertext, copy.associated_data) == b"one"


@pytest.mark.parametrize("status", [Status.INTERNAL_ERROR, Status.LIMIT_REACHED, Status.WRONG_USER])
def test_a_refused_store_leaves_no_next_key_id(status):
    ops, server = SecretOps(USER, EXPORT_KEY, os.urandom), Server()
    store(ops, server, b"one")
    server.refuse = [status]
    with pytest.raises(OperationRefused):
        store(ops, server, b"two")
    assert ops._next[SecretKind.IMPORTED] == []  # the used id is gone, no new one came
    _, sent = store(ops, server, b"two")
    assert kinds(sent) == ["CreateKeyIdRequest", "StoreSecretRequest"]


def test_no_next_key_id_from_the_server_means_create_key_id_next_time():
    ops, server = SecretOps(USER, EXPORT_KEY, os.urandom), Server()
    server.give_next = False  # e.g. the user is at the key limit
    store(ops, server, b"one")
    _, sent = store(ops, server, b"two")
    assert kinds(sent) == ["CreateKeyIdRequest", "StoreSecretRequest"]


def test_next_key_ids_are_bounded_per_kind_and_dropped_at_logout():
    ops, server = SecretOps(USER, EXPORT_KEY, os.urandom), Server()
    store(ops, server, b"one")
    # Stores that run side by side each bring back a next key id: they pile up, bounded.
    plans = [
        ops.store(b"x", SecretKind.IMPORTED, frozenset().__contains__) for _ in range(MAX_NEXT_KEY_IDS + 3)
    ]
    requests = [next(plan) for plan in plans]  # all sent before any answer
    assert kinds(requests) == ["StoreSecretRequest"] + ["CreateKeyIdRequest"] * (MAX_NEXT_KEY_IDS + 2)
    for plan, request in zip(plans, requests, strict=True):
        with pytest.raises(StopIteration):
            while True:
                request = plan.send(server.answer(request))
    assert len(ops._next[SecretKind.IMPORTED]) == MAX_NEXT_KEY_IDS
    ops.forget()
    assert ops._next == {SecretKind.GENERATED: [], SecretKind.IMPORTED: []}
