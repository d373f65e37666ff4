"""The key-server application: answers the core's server events from a Storage.

It lives in adapters/ because it does I/O (storage, wall clock) while the core
stays pure; its decisions are plain code over the :class:`Storage` interface,
so any backend (SQLite, PostgreSQL) gets the same behaviour. Every request,
including refused and malformed ones, is audited from what the server did,
in the same transaction as the operation (AUD-1).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Protocol
from weakref import WeakKeyDictionary

from keymgmt_proto import (
    KEY_ID_NONCE_SIZE,
    KEY_ID_SIZE,
    OPERATIONS,
    Action,
    AuditRequest,
    AuditResponse,
    ChangePasswordFinishRequest,
    ChangePasswordStartRequest,
    Context,
    CreateKeyIdRequest,
    DeleteAccountRequest,
    DeleteKeyRequest,
    Empty,
    ErrorCode,
    Event,
    ExpiredSession,
    KeyIdResponse,
    KeyListResponse,
    ListKeysRequest,
    LoginFailed,
    LoginRequested,
    LoginSucceeded,
    Op,
    OpRequest,
    OpResponse,
    Outcome,
    PasswordRegistrationResponse,
    ProtocolError,
    RandomSource,
    RegistrationCompleted,
    RegistrationRequested,
    RemoteProtocolError,
    RenameKeyRequest,
    RequestReceived,
    RetrieveRequest,
    RetrieveStorageKeyRequest,
    SecretKind,
    SecretResponse,
    ServerConnection,
    SessionClosed,
    SessionFailed,
    SessionHandle,
    SessionRegistry,
    Status,
    StorageKeyResponse,
    StoredResponse,
    StoreSecretRequest,
    decode_request,
    encode_response,
    joint_key_id,
    retrieve_fields,
    secret_ad,
    secret_answer,
)

from ..storage.base import (
    Account,
    AuditQuery,
    AuditRecord,
    CredentialsChanged,
    LoginRecord,
    SecretRecord,
    Storage,
    StorageError,
    Transaction,
)
from .driver import peer_of, warn_peer
from .invitations import RegistrationAuthorizer
from .metrics import ServerMetrics
from .userrate import UserRequestRates

__all__ = [
    "AUDIT_PURGE_CHUNK",
    "DEFAULT_NAME_RESERVATION",
    "DEFAULT_REAUTH_WINDOW",
    "KeyServer",
    "PasswordRegistrar",
    "ThrottlePolicy",
    "default_account_name_policy",
]

log = logging.getLogger("keymgmt.server")

#: Key ids one session may have drawn but not yet stored.
MAX_RESERVED_KEY_IDS = 16
#: Seconds a deleted account's name stays reserved (nobody may register it meanwhile).
DEFAULT_NAME_RESERVATION = 30 * 86_400.0
#: A password change or an account deletion needs a session whose login started at most
#: this many seconds before (the owner proves the current password afresh).
DEFAULT_REAUTH_WINDOW = 300.0
#: Audit entries of a deleted account that one transaction deletes at most (see
#: purge_audit_logs): a few milliseconds of SQLite's write lock.
AUDIT_PURGE_CHUNK = 2_000
#: KeyServer's default ``request_rates``: a UserRequestRates of its own (not one shared).
_DEFAULT_RATES: Any = object()


class PasswordRegistrar(Protocol):
    """The OPAQUE server steps of a password change (a ``ServerConnection`` is one)."""

    def password_registration_response(self, account_name: bytes, registration_request: bytes) -> bytes:
        """The RegistrationResponse for a new password; RemoteProtocolError if malformed."""
        ...

    def password_registration_record(self, registration_upload: bytes) -> bytes:
        """The registration record an upload gives; RemoteProtocolError if malformed."""
        ...


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """NET-10: after ``threshold`` failed logins for a name, each further failure locks the
    name for ``base_delay * growth ** (failures - threshold)`` seconds, at most
    ``max_delay``; while locked, logins are refused. Logins in flight count as well: up to
    ``threshold`` may run at once, and once that many have failed only one at a time, so
    logins started in parallel cannot pass the threshold. A login is in flight from its
    start until it ends, at most ``in_flight_for`` seconds.

    A success does not clear the count (that would tell a prober the name is registered and
    in use, NET-9): the name's record is forgotten ``forget_after`` seconds after its last
    failure (once no lock holds). :meth:`KeyServer.maintain` does that, and keeps at most
    ``max_records`` names, forgetting the oldest harmless ones (below the threshold, not
    locked) first (NET-13)."""

    threshold: int = 5
    base_delay: float = 1.0
    growth: float = 2.0
    max_delay: float = 900.0
    forget_after: float = 86_400.0
    max_records: int = 100_000
    in_flight_for: float = 60.0

    def __post_init__(self) -> None:
        if self.threshold < 1 or self.base_delay < 0 or self.growth < 1 or self.max_delay < 0:
            raise ValueError("threshold >= 1, base_delay >= 0, growth >= 1, max_delay >= 0")
        if self.forget_after <= 0 or self.max_records < 10 or self.in_flight_for <= 0:
            raise ValueError("forget_after > 0, max_records >= 10, in_flight_for > 0")

    def locked_for(self, failures: int) -> float:
        """Seconds a name stays locked after its ``failures``-th failure."""
        if failures < self.threshold:
            return 0.0
        exponent = min(failures - self.threshold, 64)
        return float(min(self.max_delay, self.base_delay * self.growth**exponent))


def default_account_name_policy(account_name: bytes) -> bool:
    """REG-1: printable UTF-8 without surrounding whitespace, 1..255 bytes."""
    try:
        text = account_name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return 0 < len(account_name) <= 255 and text.isprintable() and text == text.strip()


class _Refused(Exception):
    """A request that is answered with an error status (and audited as a failure)."""

    def __init__(self, status: Status, action: Action, key_id: bytes | None = None) -> None:
        self.status = status
        self.action = action
        self.key_id = key_id


def throttle_reason(record: LoginRecord | None, now_us: int) -> str:
    """The ABORT reason of a throttled login: how long the name stays locked, in whole seconds
    rounded up (docs/protocol.md, section 7.1); else (too many of its logins in flight, a failed
    one among them not yet counted) a moment."""
    if record is not None and record.locked_until > now_us:
        return f"too many failed logins; retry in {-(-(record.locked_until - now_us) // 1_000_000)} s"
    return "too many login attempts; retry in a moment"


class KeyServer:
    """Server application: call it with each event of every ServerConnection."""

    def __init__(
        self,
        storage: Storage,
        *,
        random: RandomSource = os.urandom,
        clock: Callable[[], float] = time.time,
        account_name_policy: Callable[[bytes], bool] = default_account_name_policy,
        throttle: ThrottlePolicy | None = None,
        max_keys_per_user: int = 10_000,
        registration_authorizer: RegistrationAuthorizer | None = None,
        metrics: ServerMetrics | None = None,
        name_reservation: float = DEFAULT_NAME_RESERVATION,
        reauth_window: float = DEFAULT_REAUTH_WINDOW,
        request_rates: UserRequestRates | None = _DEFAULT_RATES,
    ) -> None:
        if name_reservation < 0 or reauth_window <= 0:
            raise ValueError("name_reservation must be >= 0 seconds and reauth_window > 0")
        #: Seconds after its login a session may still change the password or delete the account.
        self.reauth_window = reauth_window
        self.storage = storage
        #: Seconds a deleted account's name stays reserved (see DELETE_ACCOUNT).
        self.name_reservation = name_reservation
        #: Counts logins, requests and storage failures when set (the runtime's).
        self.metrics = metrics
        self.throttle = throttle or ThrottlePolicy()
        #: REG-5: asked first for every registration; None lets anyone register.
        self.registration_authorizer = registration_authorizer
        self.max_keys_per_user = max_keys_per_user
        #: The per-user request rate (a request past it is answered RATE_LIMITED, nothing
        #: done); None: no such limit (benchmarks, tools). The default is a fresh
        #: UserRequestRates() with the default rate.
        self.request_rates = UserRequestRates() if request_rates is _DEFAULT_RATES else request_rates
        self._random = random
        self._clock = clock
        self._name_ok = account_name_policy
        #: Key ids drawn by CREATE_KEY_ID and not yet stored, per session (by its handle, so
        #: they survive a resumption; a session sealed into the session store carries them,
        #: export_session, when this key server is its registry's app_state; after a restart
        #: of a session kept in memory, the client asks for a fresh key id). Weak keys: a
        #: session gone for good takes its entry with it. Only a session holding a
        #: reservation has an entry (an idle session costs nothing here, P4).
        self._reserved: WeakKeyDictionary[SessionHandle, OrderedDict[bytes, SecretKind]] = WeakKeyDictionary()
        #: A session's new credentials version after its own password change, until the
        #: dispatcher hands it to the core (see take_renewed).
        self._renewed: WeakKeyDictionary[SessionHandle, int] = WeakKeyDictionary()
        #: Admitted logins not yet ended: session handle -> account name. An entry lives as
        #: long as its session (every end pops it, whatever the name).
        self._in_flight: dict[SessionHandle, bytes] = {}
        #: Failed logins (name, time) to count once the batch they ended in is over (see
        #: _record_failures); kept until storage takes them.
        self._failures: list[tuple[bytes, int]] = []
        self._batch_depth = 0
        #: Called (on the event loop, inside the batch) when a request deleted an account:
        #: the runtime then runs purge_audit_logs soon after that batch.
        self.on_account_deleted: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"KeyServer({self.storage!r})"

    def batch(self) -> AbstractContextManager[None]:
        """Group commit for a run of events (the storage's ``batch()`` if it has one): the
        driver answers nothing from inside until this exits normally (STO-1). The failed
        logins waiting to be counted are written as the batch ends, in the same commit, and
        stay queued until one has committed them (see :meth:`_record_failures`)."""
        return _Batch(self)

    def begin_batch(self, wait: bool) -> bool:
        """Begin the storage transaction of the next :meth:`batch` ahead of it, if the storage
        can (see GroupCommit): False if it would have to wait for another process's write
        lock and ``wait`` is False."""
        begin = getattr(self.storage, "begin_batch", None)
        if begin is None or self._batch_depth:
            return True
        return bool(begin(wait=wait))

    def now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    def __call__(self, conn: ServerConnection, event: Event) -> None:
        try:
            self._dispatch(conn, event)
        except StorageError as exc:
            if self.metrics is not None:
                self.metrics.storage_errors.inc()
            log.error("storage failure while handling %s: %s", type(event).__name__, exc)
            self._refuse(conn, event, Status.INTERNAL_ERROR)
        except Exception:
            # A bug must cost one answer, not the connection and every session on it.
            log.exception("error while handling %s", type(event).__name__)
            self._refuse(conn, event, Status.INTERNAL_ERROR)

    def _refuse(self, conn: ServerConnection, event: Event, status: Status) -> None:
        try:
            if isinstance(event, RequestReceived):
                conn.send_response(event.session_id, event.request_id, encode_response(status))
            elif isinstance(event, RegistrationRequested | RegistrationCompleted | LoginRequested):
                conn.reject_session(event.session_id, ErrorCode.INTERNAL_ERROR, "server error")
        except ProtocolError:
            log.exception("could not refuse %s", type(event).__name__)

    def end_outdated_sessions(
        self,
        registry: SessionRegistry,
        held: Sequence[tuple[SessionHandle, bytes, int]],
        current: Mapping[bytes, int],
    ) -> int:
        """End the sessions whose account's password changed, or that was deleted, through
        another instance or worker, without waiting for their next request (the runtime's
        periodic check). ``held`` is ``registry.credentials_held()`` taken before
        ``current`` (each user's credentials version as committed, a deleted account
        missing) was read. A session ends if it was held then and still holds an older
        version now (versions only grow: one that moved on since, the session that made a
        change, stays), or its account is gone. Each gets a sealed CLOSE(NOT_AUTHORIZED)
        (``registry.take_woken`` lists the connections to wake). Returns how many ended."""
        checked = {handle for handle, _, _ in held}
        deleted: set[SessionHandle] = set()
        outdated: set[SessionHandle] = set()
        for handle, user_id, version in registry.credentials_held():
            if handle not in checked:
                continue  # logged in after the read: its version is at least what was read
            now = current.get(user_id)
            if now is None:
                deleted.add(handle)
            elif version < now:
                outdated.add(handle)
        # One pass over the registry for all of them (not one per session: thousands of
        # sessions of one account would make the check quadratic, the event loop stalled).
        ended = registry.end_sessions(deleted | outdated, ErrorCode.NOT_AUTHORIZED)
        gone = 0
        for handle in ended:
            self._reserved.pop(handle, None)
            gone += handle in deleted
        for count, what in ((gone, "was deleted"), (len(ended) - gone, "changed its password")):
            if count == 1:
                log.info("ended a session whose account %s elsewhere", what)
            elif count:
                log.info("ended %d sessions whose account %s elsewhere", count, what)
        return len(ended)

    def sessions_expired(self, expired: Sequence[ExpiredSession]) -> None:
        """Audit sessions the registry expired while detached (``SessionRegistry.handle_timer``)."""
        for session in expired:
            self._reserved.pop(session.handle, None)
            self._audit(session.user_id, Action.SESSION_EXPIRED, Outcome.SUCCESS)

    # ------------------------------------------------------------ sessions

    def _dispatch(self, conn: ServerConnection, event: Event) -> None:
        if isinstance(event, RequestReceived):
            assert event.handle is not None
            rates = self.request_rates
            if rates is not None and not rates.take(event.user_id):
                self._refuse_rate(conn, event)
                return
            op_byte = event.body[:1]
            registrar = None
            if op_byte in _NEED_RECENT_LOGIN:  # (only these use the registrar)
                age = conn.login_age(event.session_id)
                if age is not None and age <= self.reauth_window:
                    registrar = conn
            try:
                body = self._answer_counted(
                    event.handle,
                    event.user_id,
                    event.body,
                    registrar=registrar,
                    credentials=conn.credentials_version(event.session_id),
                )
            except CredentialsChanged as changed:
                # The session logged in with credentials since replaced, or its account was
                # deleted, through another instance or worker (this one ends its own sessions
                # as it makes the change): it ends here, its request unanswered.
                self._reserved.pop(event.handle, None)
                conn.registry.end_session(event.handle, ErrorCode.NOT_AUTHORIZED)
                log.info(
                    "ended a session whose account %s elsewhere",
                    "was deleted" if changed.gone else "changed its password",
                )
                return
            conn.send_response(event.session_id, event.request_id, body)
            # (only a CHANGE_PASSWORD_FINISH answer leaves a renewed version to take)
            renewed = self.take_renewed(event.handle) if op_byte == _CHANGE_PASSWORD_FINISH else None
            if renewed is not None:  # this session changed the password: it goes on with the new one
                conn.renew_credentials(event.session_id, renewed)
            if body[:1] == _OK and op_byte in _ENDING_SESSIONS:
                # The password changed (every other session of the account ends) or the
                # account is gone (every session ends, this one after its answer).
                keep = event.handle if event.body[0] == Op.CHANGE_PASSWORD_FINISH else None
                ended = conn.registry.end_user_sessions(event.user_id, ErrorCode.NOT_AUTHORIZED, keep)
                self._drop_stored_sessions(event.user_id)
                if keep is None and self.on_account_deleted is not None:
                    self.on_account_deleted()  # its log waits to be purged
                log.info(
                    "ended %d session(s) of an account whose credentials changed or that was deleted", ended
                )
        elif isinstance(event, RegistrationRequested):
            self._on_registration_requested(conn, event)
        elif isinstance(event, RegistrationCompleted):
            self._on_registration_completed(conn, event)
        elif isinstance(event, LoginRequested):
            self._on_login_requested(conn, event)
        elif isinstance(event, LoginSucceeded):
            self._login_ended(event.handle, event.user_id)
            if self.metrics is not None:
                self.metrics.login("ok")
        elif isinstance(event, LoginFailed):
            self._login_ended(event.handle, None)
            if self.metrics is not None:
                self.metrics.login("failed")
            warn_peer(
                conn,
                "failed logins",
                "failed login from %s (wrong password or unknown account)",
                event="login_failed",
            )
        elif isinstance(event, SessionClosed | SessionFailed):
            self._login_ended(event.handle, None)  # a login abandoned on the way
            if event.handle is not None:
                self._reserved.pop(event.handle, None)
            if isinstance(event, SessionClosed) and event.user_id is not None:
                closed_by_client = event.code is ErrorCode.CLIENT_CLOSED
                action = Action.LOGOUT if closed_by_client else Action.SESSION_EXPIRED
                self._audit(event.user_id, action, Outcome.SUCCESS)

    def _on_login_requested(self, conn: ServerConnection, event: LoginRequested) -> None:
        """NET-9, NET-10: the storage work is the same for registered and unknown names (one
        lookup each, then one write to the name's throttling record, and when refused a read
        of that record for the wait), so neither the answer nor its timing says whether the
        name exists."""
        now = self.now_us()
        policy = self.throttle
        # One write (start_login is one statement): no savepoint of its own inside a batch.
        with self.storage.transaction(atomic=False) as tx:
            account = tx.get_account(event.account_name)
            admitted = tx.start_login(
                event.account_name, now, policy.threshold, int(policy.in_flight_for * 1_000_000)
            )
            # refused: the record says how long the name stays locked (every name has one by now)
            record = None if admitted else tx.get_login_record(event.account_name)
        if not admitted:
            conn.reject_session(event.session_id, ErrorCode.THROTTLED, throttle_reason(record, now))
            if self.metrics is not None:
                self.metrics.login("throttled")
            warn_peer(
                conn,
                "throttled logins",
                "throttled a login from %s (too many failed logins of the name)",
                event="login_throttled",
            )
            return
        assert event.handle is not None
        self._in_flight[event.handle] = event.account_name
        if account is not None:
            # The record and its credentials version come from one row: a session knows exactly
            # which credentials it logged in with (a change committed after this read ends it).
            conn.accept_login(
                event.session_id, account.user_id, account.registration_record, account.credentials_changed
            )
        else:
            conn.accept_unknown_login(event.session_id)

    def _login_ended(self, handle: SessionHandle | None, user_id: bytes | None) -> None:
        """An admitted login ended: succeeded (``user_id``, authenticated) or not (a wrong
        password, an unknown name, abandoned, timed out: the same write for every name)."""
        name = self._in_flight.pop(handle, None) if handle is not None else None
        if name is None:
            return
        now = self.now_us()
        if user_id is None:
            self._failures.append((name, now))
            if self._batch_depth == 0:
                self._record_failures()
            return
        with self.storage.transaction() as tx:
            record = tx.finish_login(name, now, succeeded=True)
            # Authenticated from here on: the attempts counted for the name since they were
            # last logged go into the owner's log, then the success itself. (If the batch
            # fails to commit, the login fails with it, and so does that log entry; with
            # PostgreSQL the counts it took are then lost from the owner's log.)
            if record is not None:
                self._log_attempts(tx, user_id, record)
            tx.append_audit(AuditRecord(user_id, _LOGIN, now, _SUCCESS))

    def _record_failures(self) -> None:
        """Count the failed logins waiting to be counted, outside any batch, each in a
        transaction of its own. What storage refuses stays queued for the next batch or
        :meth:`maintain`, so a storage failure cannot make a tested guess go uncounted
        (NET-10; a crash loses the queue: such a login then stops counting as in flight
        after ``in_flight_for``)."""
        del self._failures[: self._write_failures()]  # (each one written is committed)

    def _write_failures(self) -> int:
        """Write the queued failed logins in order, each in a transaction of its own (inside
        a batch, a savepoint), until storage refuses one; how many were written. Inside a
        batch they leave the queue only once the batch commits."""
        lock_for = self._lock_for_us
        written = 0
        for name, when in self._failures:
            try:
                with self.storage.transaction() as tx:
                    tx.finish_login(name, when, succeeded=False, lock_for=lock_for)
            except StorageError as exc:
                log.error("could not count %d failed logins yet: %s", len(self._failures) - written, exc)
                break
            written += 1
        return written

    def _lock_for_us(self, failures: int) -> int:
        return int(self.throttle.locked_for(failures) * 1_000_000)

    @staticmethod
    def _log_attempts(tx: Transaction, user_id: bytes, record: LoginRecord) -> None:
        """Write a name's counted attempts into its owner's log, one entry per kind with its
        count and the time of the last one (NET-6, AUD-1; aggregated: NET-13)."""
        if record.unlogged > 0:
            tx.append_audit(
                AuditRecord(
                    user_id, Action.LOGIN, record.last_failure, Outcome.FAILURE, count=record.unlogged
                )
            )
        if record.throttled > 0:
            tx.append_audit(
                AuditRecord(
                    user_id,
                    Action.LOGIN_THROTTLED,
                    record.last_throttled,
                    Outcome.FAILURE,
                    count=record.throttled,
                )
            )

    def maintain(self, batch: int = 1000) -> int:
        """Forget stale login-throttling records and keep their number under
        ``throttle.max_records`` (NET-13), writing what they counted into the owners' logs
        (off the answer path of any login). Removes at most ``batch`` records; call again
        while it returns ``batch``. Returns how many it removed."""
        self._record_failures()
        now = self.now_us()
        policy = self.throttle
        stale_before = now - int(policy.forget_after * 1_000_000)
        with self.storage.transaction() as tx:
            in_flight_for = int(policy.in_flight_for * 1_000_000)
            records = tx.sweep_login_records(now, stale_before, in_flight_for, batch)
            if len(records) < batch:
                excess = tx.count_login_records() - policy.max_records
                if excess > 0:  # down to 90% of the cap, harmless records first
                    count = min(batch - len(records), excess + policy.max_records // 10)
                    records += tx.evict_login_records(now, policy.threshold, in_flight_for, count)
            for record in records:
                account = tx.get_account(record.account_name)
                if account is not None:
                    self._log_attempts(tx, account.user_id, record)
            tx.forget_reserved_names(now)  # names of deleted accounts whose reservation ended
        return len(records)

    def purge_audit_logs(self, chunk: int = AUDIT_PURGE_CHUNK) -> int | None:
        """Delete at most ``chunk`` entries of the audit log of a deleted account (the
        deletion queued it), in a transaction of its own: call again, one batch at a time,
        until it returns None (no log left to purge). How many entries it deleted."""
        with self.storage.transaction() as tx:
            return tx.purge_audit(chunk)

    def _on_registration_requested(self, conn: ServerConnection, event: RegistrationRequested) -> None:
        if not self._name_ok(event.account_name):
            conn.reject_session(event.session_id, ErrorCode.INVALID_ACCOUNT_NAME, "account name not allowed")
            return
        authorizer = self.registration_authorizer
        if authorizer is not None and not authorizer.authorize(
            event.account_name, event.token, self._clock()
        ):  # before the name is looked up: an unauthorized peer learns nothing about it
            reason = "registration needs an invitation"
            conn.reject_session(event.session_id, ErrorCode.NOT_AUTHORIZED, reason)
            return
        with self.storage.transaction() as tx:
            # A deleted account's name stays reserved for a while: answered as a taken name.
            taken = tx.get_account(event.account_name) is not None or tx.name_reserved(
                event.account_name, self.now_us()
            )
            user_id = self._random(16)
            while tx.user_id_exists(user_id):  # REG-2: redraw on collision
                user_id = self._random(16)
        if taken:
            conn.reject_session(event.session_id, ErrorCode.ACCOUNT_EXISTS, "account name taken")
            return
        conn.accept_registration(event.session_id, user_id)

    def _on_registration_completed(self, conn: ServerConnection, event: RegistrationCompleted) -> None:
        now = self.now_us()
        account = Account(
            event.account_name, event.user_id, event.registration_record, event.encrypted_storage_key, now
        )
        with self.storage.transaction() as tx:  # REG-4: the account and its audit entry, or nothing
            stored = not tx.name_reserved(event.account_name, now) and tx.insert_account(account)
            if stored:
                tx.append_audit(AuditRecord(event.user_id, Action.REGISTER, now, Outcome.SUCCESS))
        if not stored:
            conn.reject_session(event.session_id, ErrorCode.ACCOUNT_EXISTS, "account name taken")
            return
        conn.confirm_registration(event.session_id)
        peer = peer_of(conn) or "a connection without a driver"
        log.info(
            "registered a new account from %s (session %d)",
            peer,
            event.session_id,
            extra={"peer": peer, "event": "registered"},
        )

    def _audit(self, user_id: bytes, action: Action, outcome: Outcome) -> None:
        try:
            # One write (a session's end: every login's): no savepoint of its own in a batch.
            with self.storage.transaction(atomic=False) as tx:
                tx.append_audit(AuditRecord(user_id, action, self.now_us(), outcome))
        except StorageError:
            if not self._account_gone(user_id):
                raise
            # A session of a deleted account ended (on an instance that could not end it
            # when the account went): its log goes with the account.
            log.debug("no audit entry for a session of a deleted account")

    # ------------------------------------------------------------ requests

    def _refuse_rate(self, conn: ServerConnection, event: RequestReceived) -> None:
        """A request past its user's rate: answered RATE_LIMITED before anything is read,
        written or audited (the point is that a flood costs nothing more)."""
        conn.send_response(event.session_id, event.request_id, _RATE_LIMITED)
        if self.metrics is not None:
            op = _OP_LABELS.get(event.body[0], "MALFORMED") if event.body else "MALFORMED"
            self.metrics.refused(op, "RATE_LIMITED")
        warn_peer(
            conn,
            "requests past the per-user rate",
            "%s: requests past their user's rate (requests.per_user_rate) answered RATE_LIMITED",
            event="user_rate_limited",
        )

    def _answer_counted(
        self,
        session: SessionHandle,
        user_id: bytes,
        body: bytes,
        *,
        registrar: PasswordRegistrar | None = None,
        credentials: int | None = None,
    ) -> bytes:
        """:meth:`answer`, counted in the metrics (operation, status, time) when there are any
        (a request whose session ends for its changed credentials counts as ``ENDED``)."""
        if self.metrics is None:
            return self._answer_or_gone(session, user_id, body, registrar, credentials)
        started = time.perf_counter()
        op = _OP_LABELS.get(body[0], "MALFORMED") if body else "MALFORMED"
        try:
            response = self._answer_or_gone(session, user_id, body, registrar, credentials)
        except CredentialsChanged:
            self.metrics.request(op, "ENDED", time.perf_counter() - started)
            raise
        status = _STATUS_LABELS.get(response[0], "?") if response else "?"
        self.metrics.request(op, status, time.perf_counter() - started)
        return response

    def _answer_or_gone(
        self,
        session: SessionHandle,
        user_id: bytes,
        body: bytes,
        registrar: PasswordRegistrar | None,
        credentials: int | None,
    ) -> bytes:
        """:meth:`answer`; a request whose account was deleted meanwhile, found by a storage
        error (e.g. a store under a user with no account), is CredentialsChanged for a session
        (``credentials`` given), else answered ``NOT_FOUND``; neither writes an audit entry
        (there is no log to write to)."""
        try:
            return self.answer(session, user_id, body, registrar=registrar, credentials=credentials)
        except StorageError:
            if self._account_gone(user_id):
                if credentials is not None:
                    raise CredentialsChanged(gone=True) from None
                return encode_response(Status.NOT_FOUND)
            raise

    def _account_gone(self, user_id: bytes) -> bool:
        """Whether ``user_id`` has no account (deleted); False when storage cannot say."""
        try:
            with self.storage.transaction() as tx:
                return tx.get_account_by_user_id(user_id) is None
        except StorageError:
            return False

    def answer(
        self,
        session: SessionHandle,
        user_id: bytes,
        body: bytes,
        *,
        registrar: PasswordRegistrar | None = None,
        credentials: int | None = None,
    ) -> bytes:
        """Answer one request body from ``session`` (its handle) of ``user_id``. A password
        change or an account deletion needs ``registrar`` (the session's connection, given
        only while the session's login is recent: ``reauth_window``); without one it is
        refused ``INVALID``.

        ``credentials`` is the version of the credentials the session logged in with
        (``ServerConnection.credentials_version``): if the account's are no longer those (its
        password changed, or it was deleted, through another instance), nothing is done and
        CredentialsChanged is raised: the session must end. After the session's own password
        change, :meth:`take_renewed` has its new version. None skips the check (tests and
        tools calling this directly)."""
        fields = retrieve_fields(body)
        if fields is not None:
            answered = self._retrieve_found(user_id, fields, credentials)
            if answered is not None:
                return answered
        now = self.now_us()
        try:
            request = decode_request(body)
        except RemoteProtocolError:
            # Checked like any request: a session of replaced credentials gets no INVALID
            # either (it would go on, writing entries into the owner's log): it ends.
            if credentials is None:
                self._audit(user_id, _action_of_malformed(body), Outcome.FAILURE)
            else:
                self._audit_failure(
                    AuditRecord(user_id, _action_of_malformed(body), now, Outcome.FAILURE), credentials
                )
            return encode_response(Status.INVALID)
        action = request.audit_action
        context = request.context if isinstance(request, RetrieveRequest) else None
        kind = request.OP
        reserving = kind in _RESERVING
        held = self._reserved.get(session) if reserving else None
        reservations = (held or OrderedDict()) if reserving else _NONE
        try:
            if not hmac.compare_digest(request.user_id, user_id):
                raise _Refused(Status.WRONG_USER, action)
            with self.storage.transaction(atomic=kind not in _ONE_WRITE) as tx:
                op = _Op(tx, user_id, now, reservations, [], registrar, credentials)
                response, key_id = self._perform(op, request)
                if kind is not Op.DELETE_ACCOUNT:  # a deletion writes none: its log goes
                    record = AuditRecord(user_id, action, now, Outcome.SUCCESS, key_id, context)
                    if op.later:  # e.g. the next key id a store reserved: one statement for both
                        tx.append_audits([record, *op.later], op.credentials)
                    else:
                        tx.append_audit(record, op.credentials)  # (op.credentials: renewed by a change)
            if isinstance(request, StoreSecretRequest):  # only once the store committed
                reservations.pop(request.key_id, None)
            if kind is Op.CHANGE_PASSWORD_FINISH and op.credentials is not None:
                self._renewed[session] = op.credentials
        except _Refused as refused:
            self._audit_failure(
                AuditRecord(user_id, action, now, Outcome.FAILURE, refused.key_id, context), credentials
            )
            return encode_response(refused.status)
        except CredentialsChanged as changed:
            key_id = getattr(request, "key_id", None)
            self._log_ended(AuditRecord(user_id, action, now, Outcome.FAILURE, key_id, context), changed)
            raise
        finally:
            if not reserving:
                pass
            elif reservations:
                if reservations is not held:  # (a held entry is already there: no new weak ref)
                    self._reserved[session] = reservations
            elif held is not None:  # only a session holding a reservation keeps an entry (P4)
                self._reserved.pop(session, None)
        return _OK + response.encode_fields()  # (encode_response's, without its checks)

    def _retrieve_found(
        self, user_id: bytes, fields: tuple[bytes, bytes, Context], credentials: int | None
    ) -> bytes | None:
        """RETRIEVE of the fixed layout (``retrieve_fields``) of a secret that is there: what
        :meth:`answer` does, without its request, record and response objects (the server's
        commonest request). None, with nothing read or written yet but the secret, when the
        request is not answered OK (another user's id, no such secret, a stored secret that
        SecretResponse refuses): :meth:`answer` then refuses it, with its audit entry."""
        request_user, key_id, context = fields
        if not hmac.compare_digest(request_user, user_id):
            return None
        now = self.now_us()
        try:
            with self.storage.transaction(atomic=False) as tx:
                row = tx.secret_fields(user_id, key_id)
                if row is None:
                    return None
                kind = _SECRET_KINDS.get(row[0])
                answered = None if kind is None else secret_answer(kind, row[1], row[2])
                if answered is None:
                    return None
                tx.append_audit_fields(user_id, _RETRIEVE, now, _SUCCESS, key_id, context, credentials)
        except CredentialsChanged as changed:
            self._log_ended(AuditRecord(user_id, _RETRIEVE, now, Outcome.FAILURE, key_id, context), changed)
            raise
        return answered

    def export_session(self, handle: SessionHandle) -> bytes:
        """The key ids the session ``handle`` reserved, oldest first, as ``key_id 16 ||
        kind u8`` each, for its sealed state (SessionAppState; protocol.md section 13): a
        store after the session resumed from the session store, here or on another
        instance, still finds its key id."""
        held = self._reserved.get(handle)
        if not held:
            return b""
        return b"".join(key_id + bytes([kind]) for key_id, kind in held.items())

    def import_session(self, handle: SessionHandle, state: bytes) -> None:
        """The reservations :meth:`export_session` sealed, for the claimed session ``handle``
        (what does not parse is dropped: the store is then refused INVALID, as without them)."""
        reservations: OrderedDict[bytes, SecretKind] = OrderedDict()
        size = KEY_ID_SIZE + 1
        for at in range(0, len(state) - size + 1, size):
            kind = _SECRET_KINDS.get(state[at + KEY_ID_SIZE])
            if kind is not None:
                reservations[state[at : at + KEY_ID_SIZE]] = kind
        while len(reservations) > MAX_RESERVED_KEY_IDS:
            reservations.popitem(last=False)
        if reservations:
            self._reserved[handle] = reservations

    def take_renewed(self, session: SessionHandle) -> int | None:
        """The new credentials version of a session that just changed its password itself
        (:meth:`answer`), once; None if it did not."""
        return self._renewed.pop(session, None)

    def _audit_failure(self, record: AuditRecord, credentials: int | None) -> None:
        """The failure entry of a refused request, written only while the session's credentials
        are the account's (``credentials``; None: not checked); else CredentialsChanged (after
        the entry, unchecked, for a password change): the session must end."""
        try:
            with self.storage.transaction(atomic=False) as tx:  # (one write)
                tx.append_audit(record, credentials)
        except CredentialsChanged as changed:
            self._log_ended(record, changed)
            raise

    def _log_ended(self, record: AuditRecord, changed: CredentialsChanged) -> None:
        """A request whose session ends for its changed credentials did nothing: the owner's
        log shows the attempt as a failure (a deleted account has no log left)."""
        if not changed.gone:
            with self.storage.transaction(atomic=False) as tx:  # (one write)
                tx.append_audit(record)

    def _perform(self, op: _Op, request: OpRequest) -> tuple[OpResponse, bytes | None]:
        handler = HANDLERS.get(request.op)
        if handler is None:  # declared in the core's OPERATIONS but not served here
            raise _Refused(Status.INVALID, request.audit_action)
        return handler(self, op, request)

    def _retrieve_storage_key(self, op: _Op, request: RetrieveStorageKeyRequest) -> _Answer:
        account = op.tx.get_account_by_user_id(op.user_id)
        if account is None:  # the account was removed under a live session
            raise _Refused(Status.NOT_FOUND, Action.RETRIEVE_STORAGE_KEY)
        return StorageKeyResponse(account.encrypted_storage_key), None

    def _create_key_id(self, op: _Op, request: CreateKeyIdRequest) -> _Answer:
        if op.tx.count_keys(op.user_id) >= self.max_keys_per_user:
            raise _Refused(Status.LIMIT_REACHED, Action.CREATE_KEY_ID)
        key_id, server_nonce = self._reserve_key_id(op, request.kind, request.client_nonce)
        return KeyIdResponse(key_id, server_nonce), key_id

    def _reserve_key_id(self, op: _Op, kind: SecretKind, client_nonce: bytes) -> tuple[bytes, bytes]:
        """KEY-1/KEY-2: a key id from the client's nonce and ours (redrawn while the id is
        taken), reserved for this session and ``kind``; returns it with our nonce."""
        reservations = op.reservations
        server_nonce = self._random(KEY_ID_NONCE_SIZE)
        key_id = joint_key_id(op.user_id, client_nonce, server_nonce)
        while key_id in reservations or op.tx.key_id_exists(key_id):
            server_nonce = self._random(KEY_ID_NONCE_SIZE)
            key_id = joint_key_id(op.user_id, client_nonce, server_nonce)
        reservations[key_id] = kind
        while len(reservations) > MAX_RESERVED_KEY_IDS:
            reservations.popitem(last=False)
        return key_id, server_nonce

    def _store_secret(self, op: _Op, request: StoreSecretRequest) -> _Answer:
        action = request.audit_action
        if op.reservations.get(request.key_id) is not request.kind:
            raise _Refused(Status.INVALID, action, request.key_id)
        ad = secret_ad(op.user_id, request.key_id, request.kind)
        record = SecretRecord(op.user_id, request.key_id, request.kind, request.ciphertext, ad, op.now)
        # The key limit holds at the store too: ids reserved ahead (CREATE_KEY_ID or a next key
        # id) were drawn below it, and their stores must not pass it. Checked, and the count
        # moved, in the insert's own step.
        stored = op.tx.insert_secret_below(record, self.max_keys_per_user)
        if stored is None:
            raise _Refused(Status.INVALID, action, request.key_id)
        if stored == 0:
            raise _Refused(Status.LIMIT_REACHED, action, request.key_id)
        # The next key id, when asked for: reserved and audited exactly as CREATE_KEY_ID would
        # (after the store's own entry, in the same statement), unless the user is at the key
        # limit (the client then asks CREATE_KEY_ID, which says LIMIT_REACHED).
        next_kind, next_nonce = request.next_kind, request.next_client_nonce
        if next_kind is None or next_nonce is None or stored >= self.max_keys_per_user:
            return StoredResponse(), request.key_id
        next_id, server_nonce = self._reserve_key_id(op, next_kind, next_nonce)
        op.later.append(AuditRecord(op.user_id, Action.CREATE_KEY_ID, op.now, Outcome.SUCCESS, next_id))
        return StoredResponse(next_id, server_nonce), request.key_id

    def _retrieve(self, op: _Op, request: RetrieveRequest) -> _Answer:
        secret = op.tx.get_secret(op.user_id, request.key_id)
        if secret is None:  # OPS-7: another user's key answers exactly like a missing one
            raise _Refused(Status.NOT_FOUND, Action.RETRIEVE, request.key_id)
        return SecretResponse(secret.kind, secret.ciphertext, secret.associated_data), request.key_id

    def _audit_query(self, op: _Op, request: AuditRequest) -> _Answer:
        query = AuditQuery(
            request.audit_type, request.key_ids, request.after, request.before, request.cursor, request.limit
        )
        entries, next_cursor = op.tx.query_audit(op.user_id, query)
        return AuditResponse(tuple(entries), next_cursor), None

    def _list_keys(self, op: _Op, request: ListKeysRequest) -> _Answer:
        keys, next_cursor = op.tx.list_keys(op.user_id, request.cursor, request.limit)
        return KeyListResponse(tuple(keys), next_cursor), None

    def _delete_key(self, op: _Op, request: DeleteKeyRequest) -> _Answer:
        if not op.tx.delete_secret(op.user_id, request.key_id):
            raise _Refused(Status.NOT_FOUND, Action.DELETE_KEY, request.key_id)
        return Empty(), request.key_id

    def _rename_key(self, op: _Op, request: RenameKeyRequest) -> _Answer:
        # Named keys: the sealed label is stored as it came; the server cannot open it.
        if not op.tx.set_label(op.user_id, request.key_id, request.sealed_label):
            raise _Refused(Status.NOT_FOUND, Action.RENAME_KEY, request.key_id)
        return Empty(), request.key_id

    def _change_password_start(self, op: _Op, request: ChangePasswordStartRequest) -> _Answer:
        action = Action.CHANGE_PASSWORD_START
        account = op.tx.get_account_by_user_id(op.user_id)
        if account is None:
            raise _Refused(Status.NOT_FOUND, action)
        if op.registrar is None:
            raise _Refused(Status.INVALID, action)
        try:
            response = op.registrar.password_registration_response(
                account.account_name, request.registration_request
            )
        except RemoteProtocolError:
            raise _Refused(Status.INVALID, action) from None
        return PasswordRegistrationResponse(response), None

    def _change_password_finish(self, op: _Op, request: ChangePasswordFinishRequest) -> _Answer:
        """The new record and the re-wrapped storage key replace the old ones in this one
        transaction (with its audit entry): a crash leaves the old password or the new one."""
        action = Action.CHANGE_PASSWORD
        if op.registrar is None:
            raise _Refused(Status.INVALID, action)
        try:
            record = op.registrar.password_registration_record(request.registration_upload)
        except RemoteProtocolError:
            raise _Refused(Status.INVALID, action) from None
        # Only while the credentials are still the session's (a session of the old password
        # on another instance cannot take the account over); the refusal's entry then finds
        # them changed, and the session ends.
        renewed = op.tx.replace_credentials(
            op.user_id, record, request.encrypted_storage_key, op.now, op.credentials
        )
        if renewed is None:
            raise _Refused(Status.NOT_FOUND, action)
        if op.credentials is not None:
            op.credentials = renewed  # this session's own entry, and the session, go on with them
        return Empty(), None

    def _delete_account(self, op: _Op, request: DeleteAccountRequest) -> _Answer:
        """The record, every secret and the name's throttling state go in this one
        transaction, and the audit log is queued for purge_audit_logs (it goes a chunk per
        transaction, right after); the name stays reserved for ``name_reservation`` seconds."""
        if op.registrar is None:  # not a recent login
            raise _Refused(Status.INVALID, Action.DELETE_ACCOUNT)
        reserved_until = op.now + int(self.name_reservation * 1_000_000)
        if not op.tx.delete_account(op.user_id, reserved_until, op.credentials):
            raise _Refused(Status.NOT_FOUND, Action.DELETE_ACCOUNT)
        return Empty(), None

    def _drop_stored_sessions(self, user_id: bytes) -> None:
        """Drop the account's sessions sealed into the shared session store (other
        instances, restarts) when the storage can."""
        self.storage.session_store.drop_user(user_id)


#: First byte of an OK answer.
_OK = bytes([Status.OK])
_RATE_LIMITED = bytes([Status.RATE_LIMITED])
#: Read once (on Python 3.11 an attribute of an Enum class costs a slow hook: see _server).
_LOGIN, _SUCCESS, _RETRIEVE = Action.LOGIN, Outcome.SUCCESS, Action.RETRIEVE
#: Secret kinds by their stored number (a dict lookup: SecretKind(value) runs Enum's code).
_SECRET_KINDS: dict[int, SecretKind] = {int(kind): kind for kind in SecretKind}
#: Op bytes of the requests that end sessions of the account when they succeed.
_ENDING_SESSIONS = frozenset({bytes([Op.CHANGE_PASSWORD_FINISH]), bytes([Op.DELETE_ACCOUNT])})
_CHANGE_PASSWORD_FINISH = bytes([Op.CHANGE_PASSWORD_FINISH])
#: Op bytes of the requests that need a recent login (their handlers use ``_Op.registrar``;
#: every other request is answered without asking the connection for the login's age).
_NEED_RECENT_LOGIN = frozenset(
    {bytes([Op.CHANGE_PASSWORD_START]), bytes([Op.CHANGE_PASSWORD_FINISH]), bytes([Op.DELETE_ACCOUNT])}
)
#: Metric labels by op and status byte (an Enum lookup and ``.name`` run Python code per request).
_OP_LABELS = {int(op): op.name for op in Op}
_STATUS_LABELS = {int(status): status.name for status in Status}

#: Operations that use the session's key-id reservations.
_RESERVING = frozenset({Op.CREATE_KEY_ID, Op.STORE_SECRET})
#: The reservations of a request that uses none (never written to).
_NONE: OrderedDict[bytes, SecretKind] = OrderedDict()
#: Operations whose only write is their audit entry: they need no savepoint of their own
#: inside a batch (a failed statement leaves nothing behind). A test checks that each
#: writes one statement at most.
_ONE_WRITE = frozenset(
    {
        Op.RETRIEVE,
        Op.AUDIT,
        Op.LIST_KEYS,
        Op.RETRIEVE_STORAGE_KEY,
        Op.CREATE_KEY_ID,
        Op.CHANGE_PASSWORD_START,
    }
)


class _Batch:
    """:meth:`KeyServer.batch` (a class, not a generator: about 9,000 instructions less per
    batch). Outermost, over a storage with ``batch()``: the storage's batch, with the queued
    failed logins written at its end, inside it, and dropped from the queue once it has
    committed. Otherwise a depth count: the queue is written, each in a transaction of its
    own, when the outermost ends."""

    __slots__ = ("_inner", "_server")

    def __init__(self, server: KeyServer) -> None:
        self._server = server
        self._inner: AbstractContextManager[object] | None = None

    @property
    def storage(self) -> Storage:
        """The storage this batch runs over: the driver keys group commits by it, so a wrapper
        forwarding ``batch()`` shares the key server's (see driver.group_commit_key)."""
        return self._server.storage

    def __enter__(self) -> None:
        server = self._server
        storage_batch = getattr(server.storage, "batch", None)
        if storage_batch is None or server._batch_depth:
            server._batch_depth += 1
            return
        server._batch_depth = 1
        inner: AbstractContextManager[object] = storage_batch()
        try:
            inner.__enter__()
        except BaseException:
            server._batch_depth = 0
            raise
        self._inner = inner

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        server = self._server
        inner = self._inner
        if inner is None:
            server._batch_depth -= 1
            if server._batch_depth == 0:
                server._record_failures()
            return False
        written = 0
        suppressed = False
        try:
            if kind is None:
                try:
                    written = server._write_failures()
                except BaseException as error:
                    if not inner.__exit__(type(error), error, error.__traceback__):
                        raise
                else:
                    inner.__exit__(None, None, None)  # the commit (raises if it failed)
            else:
                suppressed = bool(inner.__exit__(kind, exc, tb))
        finally:
            server._batch_depth = 0
        del server._failures[:written]  # committed (a failed commit raised: they stay queued)
        return suppressed


@dataclass(slots=True)  # (not frozen: built for every request, and a frozen __init__ costs twice as much)
class _Op:
    """What every operation handler works with: the request's transaction, its user, the
    time, the session's key-id reservations, and audit entries to write after the request's
    own (in the same transaction)."""

    tx: Transaction
    user_id: bytes
    now: int
    reservations: OrderedDict[bytes, SecretKind]
    later: list[AuditRecord]
    #: The OPAQUE server steps of a password change (None: password changes are refused).
    registrar: PasswordRegistrar | None = None
    #: The credentials version the session logged in with (None: not checked); a password
    #: change in this request moves it to the new one.
    credentials: int | None = None


#: An OK response and the key id its audit entry names (None for none).
_Answer = tuple[OpResponse, "bytes | None"]

#: The key server's handler of each operation of ``keymgmt_proto.OPERATIONS`` (a test
#: checks that every operation has one).
HANDLERS: Mapping[Op, Callable[[KeyServer, _Op, Any], _Answer]] = MappingProxyType(
    {
        Op.RETRIEVE_STORAGE_KEY: KeyServer._retrieve_storage_key,
        Op.CREATE_KEY_ID: KeyServer._create_key_id,
        Op.STORE_SECRET: KeyServer._store_secret,
        Op.RETRIEVE: KeyServer._retrieve,
        Op.AUDIT: KeyServer._audit_query,
        Op.LIST_KEYS: KeyServer._list_keys,
        Op.DELETE_KEY: KeyServer._delete_key,
        Op.CHANGE_PASSWORD_START: KeyServer._change_password_start,
        Op.CHANGE_PASSWORD_FINISH: KeyServer._change_password_finish,
        Op.DELETE_ACCOUNT: KeyServer._delete_account,
        Op.RENAME_KEY: KeyServer._rename_key,
    }
)


def _action_of_malformed(body: bytes) -> Action:
    """The audit action for a body that does not parse: its op's, where the op byte is valid."""
    if not body or body[0] not in Op._value2member_map_:
        return Action.MALFORMED_REQUEST
    op = Op(body[0])
    if op is Op.STORE_SECRET:
        kind_offset = 1 + 16 + 16
        imported = len(body) > kind_offset and body[kind_offset] == SecretKind.IMPORTED
        return Action.IMPORT if imported else Action.GENERATE
    return OPERATIONS[op].action if op in OPERATIONS else Action.MALFORMED_REQUEST
