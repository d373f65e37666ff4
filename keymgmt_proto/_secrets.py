"""What the client checks around each operation on secrets (docs/protocol.md section 12.10).

:class:`SecretOps` holds one session's keys and turns each operation into a
*plan*: a generator that yields the requests to send and is sent each decoded
answer (:meth:`SecretOps.answer` turns a response body into one, or raises).
The plan returns the operation's result. Every check the protocol asks of the
client lives here, so an adapter only carries requests and answers::

    plan = ops.retrieve(key_id, Context.LOCAL_ONLY, local=None)
    try:
        request = next(plan)
        while True:
            body = send_and_wait(request.encode())      # the adapter's I/O
            try:
                answer = ops.answer(request, body)
            except OperationRefused as refused:
                request = plan.throw(refused)           # a plan may recover from a refusal
            else:
                request = plan.send(answer)
    except StopIteration as done:
        secret, to_keep = done.value

No I/O: the local store is the adapter's; a plan is told what it holds
(``local`` copies, a ``holds(key_id)`` predicate) and says what to keep.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ._crypto import RandomSource, decrypt_storage_key, derive_master_key, encrypt_storage_key
from ._errors import RemoteProtocolError
from ._events import OpaqueStep, OpaqueStepRequired, OpaqueStepResult
from ._opaque import OpaqueSuite, PasswordCheck
from ._ops import (
    GENERATED_SECRET_SIZE,
    KEY_ID_NONCE_SIZE,
    AuditEntry,
    AuditRequest,
    AuditResponse,
    AuditType,
    ChangePasswordFinishRequest,
    ChangePasswordStartRequest,
    Context,
    CreateKeyIdRequest,
    DeleteAccountRequest,
    DeleteKeyRequest,
    KeyIdResponse,
    KeyInfo,
    KeyListResponse,
    ListKeysRequest,
    OpRequest,
    OpResponse,
    PasswordRegistrationResponse,
    RenameKeyRequest,
    RetrieveRequest,
    RetrieveStorageKeyRequest,
    SecretKind,
    SecretResponse,
    Status,
    StorageKeyResponse,
    StoredResponse,
    StoreSecretRequest,
    ad_matches,
    audit_chain_hash,
    audit_genesis_hash,
    check_label,
    decode_portable,
    decode_response,
    encode_portable,
    joint_key_id,
    open_label,
    open_secret,
    same_label,
    seal_label,
    seal_secret_with,
    secret_ad,
)

__all__ = [
    "MAX_NEXT_KEY_IDS",
    "STORE_RETRIES",
    "AuditHead",
    "IntegrityFailure",
    "LabelError",
    "LabeledKey",
    "OperationRefused",
    "Plan",
    "SealedCopy",
    "SecretOps",
    "VerifiedAudit",
]

_T = TypeVar("_T")

#: A plan: yields requests, is sent their decoded answers, returns the result.
Plan = Generator[OpRequest, OpResponse, _T]


class IntegrityFailure(Exception):
    """The key server's answer failed a check the client makes (a tampered, swapped or
    malformed answer); nothing it carried is used."""


class LabelError(Exception):
    """A label names no key, or more than one (``ambiguous``), or is already another
    key's; nothing was sent for it."""

    def __init__(self, message: str, *, not_found: bool = False) -> None:
        super().__init__(message)
        self.not_found = not_found


@dataclass(frozen=True, slots=True)
class LabeledKey:
    """A key as :meth:`SecretOps.list_keys` returns it: LIST_KEYS' fields and the label
    opened on the client. ``label`` is None when the key has none, or when its sealed label
    did not verify (then ``label_tampered`` is True: the server's copy was altered or moved
    from another key)."""

    key_id: bytes
    kind: SecretKind
    created: int
    label: str | None = None
    label_tampered: bool = False


@dataclass(frozen=True, slots=True)
class AuditHead:
    """The newest verified entry of a user's audit chain: its position (entry id) and hash."""

    position: int
    hash: bytes

    def __str__(self) -> str:
        return f"{self.position} {self.hash.hex()}"


@dataclass(frozen=True, slots=True)
class VerifiedAudit:
    """The result of :meth:`SecretOps.verify_audit`: every entry of the log, each checked
    against the one before, and the new head."""

    entries: list[AuditEntry]
    head: AuditHead | None


class OperationRefused(Exception):
    """The key server answered with a status other than OK."""

    def __init__(self, status: Status) -> None:
        super().__init__(f"request refused: {status.name.lower().replace('_', ' ')}")
        self.status = status


#: Fresh key ids (CREATE_KEY_ID) a store may ask for again after its store was refused
#: ``INVALID`` because the server lost the reservation (each reconnection can lose one).
STORE_RETRIES = 2

#: Most next key ids (OPS-2/OPS-3 answers to STORE_SECRET) a session keeps per kind; the
#: key server keeps 16 reservations a session (docs/protocol.md section 12.8).
MAX_NEXT_KEY_IDS = 4


@dataclass(frozen=True, slots=True)
class _NextKeyId:
    """A key id the server reserved for this session's next store, with both contributions
    (checked, as any new key id, when it is used: KEY-2)."""

    key_id: bytes
    client_nonce: bytes = field(repr=False)
    server_nonce: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class SealedCopy:
    """A sealed secret as the local store keeps it (ciphertext and AD only, STO-2)."""

    kind: SecretKind
    ciphertext: bytes = field(repr=False)
    associated_data: bytes = field(repr=False)


class SecretOps:
    """The client side of the operations of one authenticated session of ``user_id``.

    ``export_key`` is the OPAQUE export key of the login; the storage key it unlocks
    (OPS-1) is fetched by the first plan that needs it and kept until :meth:`forget`.
    """

    __slots__ = (
        "_export_key",
        "_next",
        "_password_check",
        "_random",
        "_registration_response",
        "_sealer",
        "_storage_key",
        "user_id",
    )

    def __init__(
        self,
        user_id: bytes,
        export_key: bytes,
        random: RandomSource,
        *,
        password_check: PasswordCheck | None = None,
    ) -> None:
        self.user_id = user_id
        self._export_key = export_key
        self._random = random
        #: The login's (``SessionEstablished.password_check``): a password change to the
        #: password the session logged in with is refused before it is sent.
        self._password_check = password_check
        #: The key server's answer to the password change under way (its public key).
        self._registration_response: bytes | None = None
        self._storage_key: bytes | None = None
        #: The storage key's cipher, built with it and dropped with it (every store seals
        #: under it; building one costs about as much as sealing 32 bytes).
        self._sealer: ChaCha20Poly1305 | None = None
        #: Key ids the server reserved ahead, by kind, oldest first (one-request stores).
        self._next: dict[SecretKind, list[_NextKeyId]] = {kind: [] for kind in SecretKind}

    def __repr__(self) -> str:
        return f"<SecretOps user_id={self.user_id.hex()}>"

    def forget(self) -> None:
        """Drop the storage key, the export key that unwraps it, and the key ids reserved
        ahead (logout, or the session ended). A plan that needs the storage key afterwards
        raises ValueError instead of fetching it again."""
        self._storage_key = None
        self._sealer = None
        self._export_key = b""  # (bytes cannot be wiped: the reference at least goes)
        self._registration_response = None
        for pending in self._next.values():
            pending.clear()

    @staticmethod
    def answer(request: OpRequest, body: bytes) -> OpResponse:
        """Decode the answer to ``request``: a body that does not decode for its op is an
        IntegrityFailure, a status other than OK an OperationRefused."""
        try:
            status, response = decode_response(request.op, body)
        except RemoteProtocolError as exc:
            raise IntegrityFailure(f"malformed response from the key server: {exc}") from None
        if status is not Status.OK:
            raise OperationRefused(status)
        assert response is not None
        return response

    # ------------------------------------------------------------ plans

    def storage_key(self) -> Plan[bytes]:
        """OPS-1: the session's storage key, fetched and opened once."""
        if self._storage_key is None:
            if not self._export_key:
                raise ValueError("the session's keys were dropped (it ended or logged out)")
            response = yield RetrieveStorageKeyRequest(self.user_id)
            assert isinstance(response, StorageKeyResponse)
            master_key = derive_master_key(self._export_key)
            try:
                storage_key = decrypt_storage_key(master_key, response.encrypted_storage_key, self.user_id)
            except RemoteProtocolError:
                raise IntegrityFailure("the stored storage key failed verification") from None
            self._storage_key, self._sealer = storage_key, ChaCha20Poly1305(storage_key)
        return self._storage_key

    def store(
        self, secret: bytes, kind: SecretKind, holds: Callable[[bytes], bool]
    ) -> Plan[tuple[bytes, SealedCopy]]:
        """OPS-2/OPS-3: store ``secret``; returns its key id and the copy to keep locally.
        ``holds(key_id)`` says whether the local store already has a key id.

        One request when an earlier store of this kind brought a next key id; else
        CREATE_KEY_ID first. Every STORE_SECRET asks for the next key id. A store refused
        ``INVALID`` has lost its reservation (a server may lose it: this release's key server
        seals it with a detached session, but an instance that crashed between the
        reservation and the store had it in memory only); the client asks CREATE_KEY_ID and
        tries again, sealing afresh, at most
        ``STORE_RETRIES`` times; any other refusal, or the last ``INVALID``, is reported."""
        if self._sealer is None:  # (once per session: no generator for the kept key)
            yield from self.storage_key()
        pending = self._next[kind]
        if pending:
            ahead = pending.pop(0)  # used once, whatever the answer: never a stale id
            key_id = self._checked_key_id(ahead.key_id, ahead.client_nonce, ahead.server_nonce, holds)
            try:
                return (yield from self._seal_and_store(secret, kind, key_id))
            except OperationRefused as refused:
                if refused.status is not Status.INVALID:
                    raise
        for retries_left in range(STORE_RETRIES, -1, -1):
            client_nonce = self._random(KEY_ID_NONCE_SIZE)
            reply = yield CreateKeyIdRequest(self.user_id, kind, client_nonce)
            assert isinstance(reply, KeyIdResponse)
            key_id = self._checked_key_id(reply.key_id, client_nonce, reply.server_nonce, holds)
            try:
                return (yield from self._seal_and_store(secret, kind, key_id))
            except OperationRefused as refused:
                if refused.status is not Status.INVALID or retries_left == 0:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def generate(
        self, holds: Callable[[bytes], bool], label: str | None = None
    ) -> Plan[tuple[bytes, SealedCopy]]:
        """OPS-2: store a fresh random secret (with ``label``: then name it, :meth:`rename`)."""
        secret = self._random(GENERATED_SECRET_SIZE)
        if label is None:  # (the plain store itself, without _store_named's generator around it)
            return self.store(secret, SecretKind.GENERATED, holds)
        return self._store_named(secret, SecretKind.GENERATED, holds, label)

    def import_portable(
        self, portable: bytes, holds: Callable[[bytes], bool], label: str | None = None
    ) -> Plan[tuple[bytes, SealedCopy]]:
        """OPS-3: store a secret given as ``len || secret`` (ValueError if it is not)."""
        return self._store_named(decode_portable(portable), SecretKind.IMPORTED, holds, label)

    def _store_named(
        self, secret: bytes, kind: SecretKind, holds: Callable[[bytes], bool], label: str | None
    ) -> Plan[tuple[bytes, SealedCopy]]:
        """Store, then give the key its label. A label is checked before anything is sent
        (ValueError), and its uniqueness before the store (LabelError); if RENAME_KEY then
        fails, the key stays stored without a label and the error is raised."""
        if label is not None:
            check_label(label)
        if label is not None:
            keys = yield from self.list_keys()
            self._check_unique(keys, label, None)
        key_id, copy = yield from self.store(secret, kind, holds)
        if label is not None:
            yield from self._send_label(key_id, label)
        return key_id, copy

    def retrieve(
        self, key_id: bytes, context: Context, local: SealedCopy | None
    ) -> Plan[tuple[bytes | None, SealedCopy | None]]:
        """OPS-4/OPS-5: the secret as ``context`` asks (None, the secret, or ``len || secret``),
        from ``local`` if it verifies, else from the server; returns it with the verified
        copy the local store should keep (None when ``local`` served)."""
        request = RetrieveRequest(self.user_id, key_id, context)  # invalid arguments: before any I/O
        storage_key = yield from self.storage_key()
        secret, to_keep = None, None
        if local is not None:
            try:
                secret = self._open(storage_key, key_id, local)
            except IntegrityFailure:
                secret = None  # a damaged local copy: fetch the server's and replace it
        if secret is None:
            response = yield request
            assert isinstance(response, SecretResponse)
            to_keep = SealedCopy(response.kind, response.ciphertext, response.associated_data)
            secret = self._open(storage_key, key_id, to_keep)
        if context is Context.NULL:
            return None, to_keep
        if context is Context.EXPORT:
            return encode_portable(secret), to_keep
        return secret, to_keep

    def list_keys(self) -> Plan[list[LabeledKey]]:
        """OPS-8: every key of the user, all pages, with its label opened (a label that does
        not verify is reported as tampered, not raised: the keys stay usable by id)."""
        infos: list[KeyInfo] = []
        cursor = 0
        while True:
            response = yield ListKeysRequest(self.user_id, cursor)
            assert isinstance(response, KeyListResponse)
            infos += response.keys
            if response.next_cursor == 0:
                break
            cursor = response.next_cursor
        if any(info.sealed_label for info in infos):
            storage_key = yield from self.storage_key()
        keys = []
        for info in infos:
            label, tampered = None, False
            if info.sealed_label:
                try:
                    label = open_label(storage_key, self.user_id, info.key_id, info.sealed_label)
                except RemoteProtocolError:
                    tampered = True
            keys.append(LabeledKey(info.key_id, info.kind, info.created, label, tampered))
        return keys

    def resolve(self, label: str) -> Plan[bytes]:
        """Named keys: the key id of the one key whose (verified) label is ``label``;
        LabelError if none or several have it."""
        check_label(label)
        keys = yield from self.list_keys()
        found = [key.key_id for key in keys if key.label is not None and same_label(key.label, label)]
        if not found:
            raise LabelError(f"no key is labelled {label!r}", not_found=True)
        if len(found) > 1:
            raise LabelError(f"the label {label!r} names {len(found)} keys; use a key id")
        return found[0]

    def rename(self, key_id: bytes, label: str | None) -> Plan[bool]:
        """Named keys: give ``key_id`` the label ``label`` (None removes its label). The label
        must not be another key's (LabelError); ValueError for an invalid one. Returns whether
        the key had a label before (one that does not verify counts). Removing the label of a
        key listed without one sends nothing and returns False; a key not listed at all is
        left to the server (NOT_FOUND)."""
        RenameKeyRequest(self.user_id, key_id, b"")  # invalid arguments: before any I/O
        if label is not None:
            check_label(label)
        keys = yield from self.list_keys()
        if label is not None:
            self._check_unique(keys, label, key_id)
        listed = [key for key in keys if key.key_id == key_id]
        had_label = any(key.label is not None or key.label_tampered for key in listed)
        if label is None and listed and not had_label:
            return False
        yield from self._send_label(key_id, label)
        return had_label

    def _send_label(self, key_id: bytes, label: str | None) -> Plan[None]:
        sealed = b""
        if label is not None:
            storage_key = yield from self.storage_key()
            sealed = seal_label(storage_key, self.user_id, key_id, label, self._random)
        yield RenameKeyRequest(self.user_id, key_id, sealed)

    @staticmethod
    def _check_unique(keys: Sequence[LabeledKey], label: str, key_id: bytes | None) -> None:
        if any(
            key.label is not None and same_label(key.label, label) and key.key_id != key_id for key in keys
        ):
            raise LabelError(f"another key is already labelled {label!r}")

    def audit(
        self,
        audit_type: AuditType = AuditType.ALL,
        key_ids: Sequence[bytes] = (),
        after: int | None = None,
        before: int | None = None,
    ) -> Plan[list[AuditEntry]]:
        """OPS-6: the matching audit entries, all pages. A page may hold fewer entries than
        asked for, or none, before the log's end (the server reads a bounded part of the log
        per request): the walk goes on until ``next_cursor`` is 0."""
        entries: list[AuditEntry] = []
        cursor = 0
        unfiltered = audit_type is AuditType.ALL and not key_ids and after is None and before is None
        while True:
            response = yield AuditRequest(self.user_id, audit_type, tuple(key_ids), after, before, cursor)
            assert isinstance(response, AuditResponse)
            _check_audit_page(cursor, response, unfiltered=unfiltered)
            entries += response.entries
            if response.next_cursor == 0:
                return entries
            cursor = response.next_cursor

    def verify_audit(self, head: AuditHead | None) -> Plan[VerifiedAudit]:
        """The audit chain: walk the whole log (unfiltered, from entry 1), check that entry
        ids run 1, 2, 3, ... and that each entry's hash is the hash of its content and the
        hash before it (section 12.9), and that the entry at ``head`` (the newest this client
        verified before) still has the hash it had. IntegrityFailure when not: an entry was
        removed, changed or reordered, or the server shows a history that forks from the one
        verified before. Returns the entries and the new head (None for an empty log)."""
        entries: list[AuditEntry] = []
        position, previous = 0, audit_genesis_hash()
        cursor = 0
        while True:
            response = yield AuditRequest(self.user_id, AuditType.ALL, (), None, None, cursor)
            assert isinstance(response, AuditResponse)
            _check_audit_page(cursor, response, unfiltered=True)
            for entry in response.entries:
                if entry.entry_id != position + 1:
                    raise IntegrityFailure(
                        f"audit log: entry {entry.entry_id} follows entry {position} "
                        "(entries removed or reordered)"
                    )
                expected = audit_chain_hash(self.user_id, previous, entry)
                if entry.chain_hash is None or not hmac.compare_digest(expected, entry.chain_hash):
                    raise IntegrityFailure(
                        f"audit log: entry {entry.entry_id} does not match its hash chain "
                        "(changed, reordered or rewritten)"
                    )
                position, previous = entry.entry_id, expected
                if (
                    head is not None
                    and position == head.position
                    and not hmac.compare_digest(previous, head.hash)
                ):
                    raise IntegrityFailure(
                        f"audit log: entry {position} differs from the one this client verified "
                        "before (the history was rewritten or forked)"
                    )
                entries.append(entry)
            if response.next_cursor == 0:
                break
            cursor = response.next_cursor
        if head is not None and position < head.position:
            raise IntegrityFailure(
                f"audit log: it ends at entry {position}, before entry {head.position} that this "
                "client verified before (entries removed)"
            )
        return VerifiedAudit(entries, AuditHead(position, previous) if position else None)

    def delete(self, key_id: bytes) -> Plan[None]:
        """OPS-8: delete a key on the server (the adapter drops its local copy either way)."""
        yield DeleteKeyRequest(self.user_id, key_id)

    def change_password_start(self, new_password: bytes, opaque: OpaqueSuite) -> Plan[OpaqueStepRequired]:
        """Password change, step 1: fetch (and verify) the storage key, then send the OPAQUE
        registration request for ``new_password``. Returns the expensive OPAQUE step (Argon2)
        for the adapter to run, as for a login (``step.run(opaque)``); hand its result to
        :meth:`change_password_finish`. The step holds the new password: drop it once run."""
        if not new_password:
            raise ValueError("the new password must not be empty")
        yield from self.storage_key()
        start = opaque.client_registration_start(new_password)
        response = yield ChangePasswordStartRequest(self.user_id, start.message)
        assert isinstance(response, PasswordRegistrationResponse)
        self._registration_response = response.registration_response
        return OpaqueStepRequired(
            0, OpaqueStep.REGISTRATION_FINISH, new_password, start.state, response.registration_response
        )

    def change_password_finish(self, result: OpaqueStepResult) -> Plan[None]:
        """Password change, step 2: upload the new record with the storage key re-wrapped
        under the new export key (REG-3: the storage key itself never changes, so every
        stored secret stays readable). The session goes on with the new export key.

        A new password that is the one the session logged in with (or last changed to) is
        refused here, before anything is sent (ValueError): the session's ``password_check``
        tells it from the new registration, and step 1 changed nothing on the server."""
        if result.step is not OpaqueStep.REGISTRATION_FINISH:
            raise ValueError("not the result of a registration step")
        if result.error is not None:
            raise IntegrityFailure("the key server's registration response is invalid")
        if len(result.export_key) != 64:
            raise ValueError("not an OPAQUE registration result")
        answered, check = self._registration_response, self._password_check
        if answered is not None and check is not None and check.same_password(answered, result.message):
            raise ValueError("the new password is the current one")
        storage_key = yield from self.storage_key()
        master_key = derive_master_key(result.export_key)
        encrypted = encrypt_storage_key(master_key, storage_key, self.user_id, self._random)
        yield ChangePasswordFinishRequest(self.user_id, result.message, encrypted)
        self._export_key = result.export_key
        if answered is not None:  # what a login with the new password would give
            self._password_check = PasswordCheck.from_registration(answered, result.message, self._random(32))
        self._registration_response = None

    def delete_account(self) -> Plan[None]:
        """Delete the account on the server (the adapter wipes its local store for the user)."""
        yield DeleteAccountRequest(self.user_id)

    # ------------------------------------------------------------ internals

    def _checked_key_id(
        self, key_id: bytes, client_nonce: bytes, server_nonce: bytes, holds: Callable[[bytes], bool]
    ) -> bytes:
        """KEY-2: the id must come from our fresh nonce, so a server cannot hand one id to two
        stores (and later serve either ciphertext); and it must be new to us."""
        expected = joint_key_id(self.user_id, client_nonce, server_nonce)
        if not hmac.compare_digest(expected, key_id):
            raise IntegrityFailure("the key id from the key server is not derived from this client's nonce")
        if holds(key_id):
            raise IntegrityFailure("the key server handed out a key id this client already holds")
        return key_id

    def _seal_and_store(
        self, secret: bytes, kind: SecretKind, key_id: bytes
    ) -> Plan[tuple[bytes, SealedCopy]]:
        """Seal under ``key_id`` (with the storage key's cipher: :meth:`storage_key` ran),
        STORE_SECRET asking for the next key id of ``kind``, keep it."""
        assert self._sealer is not None
        ad = secret_ad(self.user_id, key_id, kind)
        ciphertext = seal_secret_with(self._sealer, secret, ad, self._random)
        next_nonce = self._random(KEY_ID_NONCE_SIZE)
        reply = yield StoreSecretRequest(self.user_id, key_id, kind, ciphertext, kind, next_nonce)
        assert isinstance(reply, StoredResponse)
        if reply.next_key_id is not None and reply.next_server_nonce is not None:
            pending = self._next[kind]
            pending.append(_NextKeyId(reply.next_key_id, next_nonce, reply.next_server_nonce))
            del pending[:-MAX_NEXT_KEY_IDS]
        return key_id, SealedCopy(kind, ciphertext, ad)

    def _open(self, storage_key: bytes, key_id: bytes, sealed: SealedCopy) -> bytes:
        expected = secret_ad(self.user_id, key_id, sealed.kind)
        if not ad_matches(expected, sealed.associated_data):
            raise IntegrityFailure("the ciphertext's associated data names another user or key")
        try:
            return open_secret(storage_key, sealed.ciphertext, sealed.associated_data)
        except RemoteProtocolError:
            raise IntegrityFailure("the ciphertext failed verification (tampered or swapped)") from None


def _check_audit_page(cursor: int, response: AuditResponse, *, unfiltered: bool) -> None:
    """An AUDIT page asked for with ``cursor`` (section 12.9): its entries come after the
    cursor in increasing entry order, and a ``next_cursor`` other than 0 is past the cursor
    and not before the last entry returned. So every walk moves forward; a page with fewer
    entries than asked for, or none, is not the end unless ``next_cursor`` is 0. An
    ``unfiltered`` page (type ALL, no key ids, no time bounds) matches every entry read: one
    that is not the last holds entries and ends at its ``next_cursor``, so a lying server
    cannot keep the chain walk going on empty pages (up to 2**64 of them)."""
    last = cursor
    for entry in response.entries:
        if entry.entry_id <= last:
            raise IntegrityFailure(
                f"audit log: entry {entry.entry_id} does not come after entry {last} in its page "
                "(entries repeated or out of order)"
            )
        last = entry.entry_id
    if response.next_cursor != 0 and (response.next_cursor <= cursor or response.next_cursor < last):
        raise IntegrityFailure(
            f"audit log: next cursor {response.next_cursor} does not move past cursor {cursor}, "
            f"or lies before entry {last} of its page (the walk would repeat entries or never end)"
        )
    if unfiltered and response.next_cursor != 0 and (not response.entries or response.next_cursor != last):
        raise IntegrityFailure(
            f"audit log: next cursor {response.next_cursor} of an unfiltered page is not its last "
            f"entry ({last}): every entry read matches, so a page that is not the last ends there"
        )
