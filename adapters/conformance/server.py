"""The server conformance machine: a Hypothesis state machine that drives a key server over
TLS and checks every answer against a model of docs/protocol.md.

It registers throwaway accounts, logs in (right and wrong passwords, unknown names), runs
every operation, keeps several sessions on one connection and several connections, cuts
connections and resumes their sessions (with requests in flight), and misbehaves on the
wire: replayed, bit-flipped and moved records, frames on ids never opened or already used,
oversized lengths, bad versions and types, opening frames on reused ids and replayed
RESUMEs. A violation raises :class:`ConformanceFailure` carrying a readable transcript of
the run (what was sent, what came back, what the model expected); Hypothesis shrinks the
run first, so the transcript is a short one.

What the model allows besides the exact answer: a server's policy may refuse a session
opening with ABORT(RATE_LIMITED) (then nothing was done), a login of a name with failed
logins behind it with ABORT(THROTTLED), and end an established session with a CLOSE of
REQUEST_LIMIT, IDLE_TIMEOUT or LIFETIME_EXPIRED. Those are counted, not failed. The model
assumes it is the only client of its accounts and that the target is one server instance
(key id reservations are per instance, protocol.md 12.8).
"""

from __future__ import annotations

import functools
import hmac
import inspect
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine as _engine
from hypothesis.reporting import with_reporter
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from keymgmt_proto import (
    AUDIT_HASH_SIZE,
    MAX_AUDIT_PAGE,
    MAX_AUDIT_SCAN,
    MAX_LIST_PAGE,
    Action,
    AuditEntry,
    AuditRequest,
    AuditResponse,
    AuditType,
    ChangePasswordFinishRequest,
    ChangePasswordStartRequest,
    ConnectionFailed,
    Context,
    CreateKeyIdRequest,
    DeleteAccountRequest,
    DeleteKeyRequest,
    DetachedSession,
    Empty,
    ErrorCode,
    Event,
    FrameType,
    KeyIdResponse,
    KeyListResponse,
    ListKeysRequest,
    LocalProtocolError,
    Op,
    OpRequest,
    OpResponse,
    Outcome,
    PasswordRegistrationResponse,
    RealOpaque,
    RegistrationSucceeded,
    RemoteProtocolError,
    RenameKeyRequest,
    ResponseReceived,
    ResumeDeferred,
    RetrieveRequest,
    RetrieveStorageKeyRequest,
    SecretKind,
    SecretResponse,
    SessionClosed,
    SessionEstablished,
    SessionFailed,
    SessionHandle,
    SessionResumed,
    Status,
    StorageKeyResponse,
    StoredResponse,
    StoreSecretRequest,
    audit_chain_hash,
    audit_genesis_hash,
    decode_response,
    decrypt_storage_key,
    derive_master_key,
    encrypt_storage_key,
    joint_key_id,
    open_secret,
    seal_label,
    seal_secret,
    secret_ad,
)
from keymgmt_proto import strategies as kst
from keymgmt_proto.wire import Abort, LoginStart, encode_frame

from .link import Link, Target, Transcript

__all__ = ["ConformanceFailure", "ServerReport", "ServerRunSettings", "run_server_conformance"]

#: Accounts one run of the machine registers at most (each costs an OPAQUE registration).
MAX_ACCOUNTS = 3
#: Connections open at once.
MAX_LINKS = 3
#: Established sessions at once.
MAX_SESSIONS = 6
#: Failed logins the machine makes per name (a server locks a name after a few; keymgmt's after 5).
MAX_FAILURES = 3
#: Key ids the key server keeps reserved per session (protocol.md 12.8).
MAX_RESERVED = 16
#: Actions written for requests, in request order: what the model compares with AUDIT.
REQUEST_ACTIONS = frozenset(
    {
        Action.RETRIEVE_STORAGE_KEY,
        Action.CREATE_KEY_ID,
        Action.GENERATE,
        Action.IMPORT,
        Action.RETRIEVE,
        Action.LIST_KEYS,
        Action.DELETE_KEY,
        Action.AUDIT,
        Action.MALFORMED_REQUEST,
        Action.CHANGE_PASSWORD,
        Action.DELETE_ACCOUNT,
        Action.CHANGE_PASSWORD_START,
        Action.RENAME_KEY,
    }
)
#: CLOSE codes a server's policy may end an established session with.
POLICY_CLOSES = frozenset({ErrorCode.REQUEST_LIMIT, ErrorCode.IDLE_TIMEOUT, ErrorCode.LIFETIME_EXPIRED})


class ConformanceFailure(AssertionError):
    """The server did something docs/protocol.md does not allow. ``transcript`` is the run
    that showed it; ``violation`` the one-line summary."""

    def __init__(self, violation: str, transcript: str) -> None:
        super().__init__(
            f"{violation}\n\ntranscript of the failing run:\n{transcript}\n\nVIOLATION: {violation}"
        )
        self.violation = violation
        self.transcript = transcript
        #: Hypothesis's own report (the shrunk steps as rule calls), set by the runner.
        self.hypothesis_report = ""


class _Policy(Exception):
    """The server refused by policy (RATE_LIMITED, THROTTLED): the step did nothing."""


_Rule = Callable[..., None]
_T = TypeVar("_T")

#: What ServerMachine.revive makes, by the name a rule gives it.
_NEEDS = {
    "session": "a live session",
    "records": "a session that has sent records",
    "pair": "two sessions on one connection",
}

#: How often the first step of a run tries an opening the server refuses by policy.
POLICY_RETRIES = 20


def _when(
    condition: Callable[[Any], object], *, after: tuple[str, ...] = (), revive: str | None = None
) -> Callable[[_Rule], _Rule]:
    """A rule's precondition, checked when the rule runs instead of when Hypothesis picks
    rules: what it reads (the accounts and sessions that exist, the links still open)
    depends on the server's refusals by policy and on timing, which vary from one replay of
    the same steps to the next, and Hypothesis stops a run whose choice of rules varied as
    flaky. A rule whose condition does not hold does nothing (counted in the report's ``skipped``).

    ``after``: Hypothesis picks the rule only once one of these rules was picked (what
    makes the condition possible, e.g. a dropped connection before a resume): that depends
    on the picks alone, the same in every replay, and keeps rare rules from being picked
    (and skipped) in vain.

    ``revive``: when the condition does not hold, first make what the rule needs (see
    ServerMachine.revive: a live session, one that has sent records, two on one
    connection), so that a rule picked after every session was cut still tests something."""

    def wrap(function: _Rule) -> _Rule:
        @functools.wraps(function)
        def checked(self: Any, *args: Any, **kwargs: Any) -> None:
            self.picked.add(function.__name__)
            if revive is not None and not condition(self):
                self.revive(revive)
            if condition(self):
                function(self, *args, **kwargs)
            else:
                skipped = self.run.report.skipped
                skipped[function.__name__] = skipped.get(function.__name__, 0) + 1

        if after:
            return precondition(lambda self: not self.picked.isdisjoint(after))(checked)
        return checked

    return wrap


AuditItem = tuple[Action, Outcome, bytes | None, Context | None]


@dataclass(eq=False)
class Account:
    """The model of one registered account."""

    label: str
    name: bytes
    password: bytes = field(repr=False)
    user_id: bytes = b""
    export_key: bytes = field(default=b"", repr=False)
    storage_key: bytes | None = field(default=None, repr=False)
    keys: dict[bytes, Key] = field(default_factory=dict)
    #: Request-made audit entries, in groups: within a group the order is the server's
    #: (pipelined requests, requests re-sent after a resumption).
    audit: list[list[AuditItem]] = field(default_factory=list)
    failures: int = 0
    #: Requests of this account may or may not have run (a session that never resumed with
    #: requests in flight): the model no longer checks it.
    tainted: bool = False
    deleted: bool = False

    def log(
        self,
        action: Action,
        outcome: Outcome = Outcome.SUCCESS,
        key_id: bytes | None = None,
        context: Context | None = None,
    ) -> None:
        self.audit.append([(action, outcome, key_id, context)])


@dataclass(eq=False)
class Key:
    """The model of one stored key: what the server must give back for it."""

    label: str
    kind: SecretKind
    sealed: bytes = field(repr=False)
    secret: bytes = field(repr=False)
    sealed_label: bytes = field(default=b"", repr=False)


@dataclass(eq=False)
class Session:
    """The model of one request session (it keeps its identity across resumptions)."""

    label: str
    account: Account
    link: Link | None
    sid: int
    handle: SessionHandle
    login_at: float
    detached: DetachedSession | None = None
    #: Key ids reserved for this session, oldest first, with their kind.
    reserved: dict[bytes, SecretKind] = field(default_factory=dict)
    #: Key ids reserved before the session last detached: the server still holds them if it
    #: kept the session in memory (a request of it in flight), not if it put it in its
    #: session store (nothing in flight): a STORE under one may be OK or INVALID.
    kept: dict[bytes, SecretKind] = field(default_factory=dict)
    #: Requests sent and not answered yet: request id -> (request, check).
    pending: dict[int, Pending] = field(default_factory=dict)
    #: RESUME frames this session sent (for replays).
    resume_frames: list[bytes] = field(default_factory=list)
    #: Sealed frames sent in the current key epoch on the current link (for replays).
    sealed_frames: list[bytes] = field(default_factory=list)

    def reserve(self, key_id: bytes, kind: SecretKind) -> None:
        self.reserved[key_id] = kind
        while len(self.reserved) > MAX_RESERVED:
            del self.reserved[next(iter(self.reserved))]


Check = Callable[[Status, OpResponse | None, bytes], None]
#: The whole answer to a request refused for the account's rate (protocol.md 10).
_RATE_LIMITED_ANSWER = bytes([Status.RATE_LIMITED])
#: Times one request is sent again while it is answered RATE_LIMITED (about 30 s of pauses).
MAX_RATE_LIMITED_RESENDS = 35


@dataclass(eq=False)
class Pending:
    """A request in flight and the check its answer must pass."""

    request: OpRequest
    check: Check
    what: str
    #: Times it was sent again after a RATE_LIMITED answer.
    resent: int = 0


@dataclass
class ServerRunSettings:
    """How long the machine runs."""

    #: Runs (examples) Hypothesis generates at most.
    max_examples: int = 40
    #: Steps (rules) per run at most.
    steps: int = 12
    #: Seconds after which no new batch of runs starts; not with ``derandomize``.
    time_limit: float = 120.0
    #: Runs per Hypothesis run (a batch): the time limit is checked between batches.
    batch: int = 20
    #: Seconds Hypothesis may spend shrinking a failure.
    shrink_time_limit: float = 60.0
    #: The same runs every time (no random seed).
    derandomize: bool = False
    #: Print each step's transcript as it runs (very long).
    verbose: bool = False


@dataclass
class ServerReport:
    """What a passing run of the machine did."""

    #: Runs of the machine (Hypothesis examples), steps (rules) in all.
    examples: int = 0
    steps: int = 0
    #: Openings the server refused by policy (RATE_LIMITED, THROTTLED), and policy CLOSEs.
    policy_refusals: int = 0
    #: Rules picked when what they need did not exist (no live session, say), by name: they
    #: did nothing.
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: How often each rule ran, and the seconds it took in all.
    rules: dict[str, int] = field(default_factory=dict)
    rule_seconds: dict[str, float] = field(default_factory=dict)


class _Run:
    """State shared by every example of one run of the machine."""

    def __init__(self, target: Target, run_settings: ServerRunSettings) -> None:
        self.target = target
        self.settings = run_settings
        self.prefix = f"cf-{os.urandom(4).hex()}"
        self.names = 0
        self.started = time.monotonic()
        self.report = ServerReport()

    def new_name(self, what: str) -> bytes:
        self.names += 1
        return f"{self.prefix}-{what}{self.names}@example.org".encode()


def _short(key_id: bytes | None) -> str:
    return "-" if key_id is None else key_id.hex()[:8]


class ServerMachine(RuleBasedStateMachine):
    """The machine (see the module docstring). Built by :func:`run_server_conformance`."""

    run: _Run  # set on a subclass per run

    def __init__(self) -> None:
        super().__init__()
        run = self.run
        self.target = run.target
        self.transcript = Transcript()
        self.links: list[Link] = []
        self.accounts: list[Account] = []
        self.sessions: list[Session] = []
        self.detached: list[Session] = []
        self.link_count = 0
        self.key_count = 0
        self.session_count = 0
        #: Detached sessions whose password changed or account went meanwhile: cannot resume.
        self.revoked: list[Session] = []
        #: The rules picked so far in this run (whatever they did): see _when.
        self.picked: set[str] = set()
        self.opaque = RealOpaque()
        run.report.examples += 1

    # ------------------------------------------------------------ plumbing

    def fail(self, violation: str) -> NoReturn:
        self.transcript.note(f"VIOLATION: {violation}")
        raise ConformanceFailure(violation, self.transcript.render())

    def expect(self, condition: bool, violation: str) -> None:
        if not condition:
            self.fail(violation)

    def note(self, text: str) -> None:
        self.transcript.note(text)

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        self.run.report.steps += 1
        frame = inspect.currentframe()  # this generator's; its caller's caller is the rule
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        name = caller.f_code.co_name if caller is not None else "?"
        self.run.report.rules[name] = self.run.report.rules.get(name, 0) + 1
        self.transcript.step(text)
        began = time.monotonic()
        try:
            yield
        except _Policy as exc:
            self.run.report.policy_refusals += 1
            self.note(f"model: refused by the server's policy ({exc}); allowed, nothing was done")
        except (OSError, TimeoutError) as exc:
            self.fail(f"the connection failed unexpectedly: {type(exc).__name__}: {exc}")
        except LocalProtocolError as exc:
            self.fail(f"the client connection refused the step ({exc}): a session ended without a word")
        self.run.report.rule_seconds[name] = (
            self.run.report.rule_seconds.get(name, 0.0) + time.monotonic() - began
        )
        if self.run.settings.verbose:
            print(self.transcript.render())
            self.transcript.lines.clear()

    def new_link(self) -> Link:
        self.link_count += 1
        try:
            link = Link(self.target, f"c{self.link_count}", self.transcript)
        except (OSError, TimeoutError) as exc:
            self.fail(f"cannot connect to {self.target.address}: {type(exc).__name__}: {exc}")
        self.links.append(link)
        return link

    def pick_link(self, index: int) -> Link:
        # A link that carried hand-made sessions is not reused: the client connection does
        # not know the ids they used (a refusal by policy leaves such a link open).
        live = [link for link in self.links if link.alive and not link.claimed]
        if not live or (index >= len(live) and len(self.links) < MAX_LINKS):
            return self.new_link()
        return live[index % len(live)]

    def pick(self, items: list[Any], index: int) -> Any:
        return items[index % len(items)]

    def new_key_label(self) -> str:
        self.key_count += 1
        return f"K{self.key_count}"

    def key_name(self, key_id: bytes) -> str:
        for account in self.accounts:
            if key_id in account.keys:
                return f"{account.keys[key_id].label}({_short(key_id)})"
        return _short(key_id)

    def teardown(self) -> None:
        for session in list(self.sessions):
            link = session.link
            if link is not None and link.alive:
                with suppress(LocalProtocolError):  # a best-effort logout
                    link.conn.close_session(session.sid)
        for link in self.links:
            with suppress(OSError):
                link.close()

    # ------------------------------------------------------------ events

    def wait_event(self, link: Link, match: Callable[[Event], bool], what: str) -> Event:
        event = link.wait_for(match)
        if event is None:
            self.fail(f"{what}: nothing within {self.target.timeout:g} s")
        return event

    def session_end(self, link: Link, sid: int) -> Event | None:
        def ended(e: Event) -> bool:
            return isinstance(e, SessionFailed | SessionClosed) and e.session_id == sid

        return link.wait_for(ended)

    def server_abort(self, link: Link, sid: int) -> Abort | None:
        """The ABORT the server sent on ``sid``, if its last frame there was one."""
        last = link.last_frame(sid)
        if last is None or last[0] is not FrameType.ABORT:
            return None
        try:
            return Abort.decode(last[1])
        except RemoteProtocolError:
            return None

    def opened(self, link: Link, sid: int, *, login: bool, account: Account | None) -> Event:
        """Wait for a login or registration to end one way or another; policy refusals raise _Policy."""
        event = self.wait_event(
            link,
            lambda e: (
                getattr(e, "session_id", None) == sid
                and isinstance(e, SessionEstablished | RegistrationSucceeded | SessionFailed | SessionClosed)
            ),
            f"{'login' if login else 'registration'} on #{sid} did not end",
        )
        if isinstance(event, SessionFailed):
            abort = self.server_abort(link, sid)
            if abort is not None and abort.code is ErrorCode.RATE_LIMITED:
                self.expect(
                    link.frames_on(sid) == [FrameType.ABORT],
                    "ABORT(RATE_LIMITED) after the server had answered the opening (protocol.md 7.1)",
                )
                raise _Policy("RATE_LIMITED")
            if abort is not None and abort.code is ErrorCode.THROTTLED and login:
                self.expect(
                    link.frames_on(sid) == [FrameType.ABORT],
                    "ABORT(THROTTLED) after LOGIN_RESPONSE (a throttled login is refused before OPAQUE)",
                )
                self.expect(
                    account is None or account.failures > 0 or self.concurrent_logins > 1,
                    "a login of a name with no failed login and none in flight was THROTTLED "
                    "(protocol.md 7.1: THROTTLED is for too many failed or concurrent logins)",
                )
                raise _Policy("THROTTLED")
        return event

    concurrent_logins = 1

    # ------------------------------------------------------------ accounts

    def register_account(self, link: Link) -> Account:
        return self.finish_registration(link, *self.start_registration(link))

    def start_registration(self, link: Link) -> tuple[Account, int]:
        name = self.run.new_name("a")
        account = Account(f"A{len(self.accounts) + 1}", name, os.urandom(12).hex().encode())
        sid = link.conn.open_registration(name, account.password, self.target.token)
        self.note(
            f"model: registering {account.label} = {name.decode()}; expect REG_RESPONSE, then the "
            "login of the same session, WELCOME, and CLOSE(OK) (protocol.md 8.1)"
        )
        link.flush()
        self.accounts.append(account)
        return account, sid

    def finish_registration(self, link: Link, account: Account, sid: int) -> Account:
        try:
            event = self.opened(link, sid, login=False, account=None)
        except _Policy:
            self.accounts.remove(account)
            raise
        if not isinstance(event, RegistrationSucceeded):
            abort = self.server_abort(link, sid)
            if abort is not None and abort.code is ErrorCode.NOT_AUTHORIZED and not self.target.token:
                self.fail(
                    "registration of a fresh name failed: ABORT(NOT_AUTHORIZED); this server requires an "
                    "authorization to register (REG-5): give the machine an invitation (--invitation-file)"
                )
            self.fail(f"registration of a fresh name failed: {event}")
        self.expect(
            link.frames_on(sid)
            == [FrameType.REG_RESPONSE, FrameType.LOGIN_RESPONSE, FrameType.WELCOME, FrameType.CLOSE],
            f"registration frames were {[t.name for t in link.frames_on(sid)]}, not REG_RESPONSE, "
            "LOGIN_RESPONSE, WELCOME, CLOSE(OK) (protocol.md 8.1)",
        )
        self.expect(len(event.user_id) == 16, "user_id is not 16 bytes")
        self.expect(
            all(a.user_id != event.user_id for a in self.accounts), "two accounts got one user_id (REG-2)"
        )
        account.user_id = event.user_id
        account.export_key = event.export_key
        self.note(f"model: {account.label} registered, user {event.user_id.hex()[:8]}")
        return account

    def do_login(self, link: Link, account: Account | None, name: bytes, password: bytes) -> Session | None:
        return self.finish_login(link, account, password, self.start_login(link, account, name, password))

    def start_login(self, link: Link, account: Account | None, name: bytes, password: bytes) -> int:
        sid = link.conn.open_request_session(name, password)
        right = (
            account is not None and not account.deleted and hmac.compare_digest(password, account.password)
        )
        if right:
            self.note(
                "model: right password; expect LOGIN_RESPONSE, then WELCOME with the account's "
                "user_id and the registration's export key (protocol.md 8.2)"
            )
        else:
            self.note(
                "model: wrong password or no such account; expect LOGIN_RESPONSE (320 bytes) and a "
                "login that fails on the client, the same for both (NET-9, protocol.md 8.2)"
            )
        link.flush()
        return sid

    def finish_login(self, link: Link, account: Account | None, password: bytes, sid: int) -> Session | None:
        right = (
            account is not None and not account.deleted and hmac.compare_digest(password, account.password)
        )
        event = self.opened(link, sid, login=True, account=account)
        if not right:
            self.expect(
                isinstance(event, SessionFailed) and event.code is ErrorCode.AUTHENTICATION_FAILED,
                f"a login with a wrong password or an unknown name ended with {event}, not "
                "AUTHENTICATION_FAILED",
            )
            self.expect(
                link.frames_on(sid)[:1] == [FrameType.LOGIN_RESPONSE],
                f"a wrong password or an unknown name got {[t.name for t in link.frames_on(sid)]} instead of "
                "LOGIN_RESPONSE: an unknown name and a wrong password must look the same "
                "(NET-9, protocol.md 8.2)",
            )
            if account is not None:
                account.failures += 1
            return None
        assert account is not None
        if not isinstance(event, SessionEstablished):
            self.fail(f"a login with the right password failed: {event}")
        self.expect(
            hmac.compare_digest(event.user_id, account.user_id),
            f"WELCOME carried user {event.user_id.hex()[:8]}, "
            f"not {account.label}'s {account.user_id.hex()[:8]}",
        )
        self.expect(
            hmac.compare_digest(event.export_key, account.export_key),
            "the login's export key differs from the registration's (CRY-1)",
        )
        assert event.handle is not None
        self.session_count += 1
        session = Session(f"S{self.session_count}", account, link, sid, event.handle, time.monotonic())
        self.sessions.append(session)
        self.note(f"model: {session.label} = {account.label} on {link.name} #{sid}")
        return session

    # ------------------------------------------------------------ requests

    def send(
        self,
        session: Session,
        request: OpRequest,
        check: Check,
        what: str,
        transform: Callable[[list[bytes]], list[bytes]] | None = None,
    ) -> int:
        link = session.link
        assert link is not None
        request_id = link.conn.send_request(session.sid, request.encode())
        session.pending[request_id] = Pending(request, check, what)
        self.note(f"{session.label} request {request_id}: {what}")
        frames = link.flush(transform)
        # Only this session's own records: a transform may add a copy on another session's id,
        # and replaying that copy would test the other session, not this one.
        session.sealed_frames.extend(
            f for f in frames if len(f) >= 6 and f[1] >= 0x20 and int.from_bytes(f[2:6], "big") == session.sid
        )
        return request_id

    def answers(self, session: Session, count: int | None = None) -> None:
        """Wait for the answers to every pending request (or ``count`` of them) and check each."""
        link = session.link
        assert link is not None
        wanted = len(session.pending) if count is None else count
        got = 0
        while got < wanted:
            event = link.wait_for(
                lambda e: (
                    isinstance(e, ResponseReceived | SessionFailed | SessionClosed)
                    and e.session_id == session.sid
                )
            )
            if event is None:
                waiting = ", ".join(str(r) for r in session.pending)
                self.fail(
                    f"{session.label}: no answer to request(s) {waiting} within {self.target.timeout:g} s"
                )
            if isinstance(event, SessionClosed | SessionFailed):
                self.session_ended(session, event)
                return
            assert isinstance(event, ResponseReceived)
            pending = session.pending.pop(event.request_id, None)
            self.expect(
                pending is not None,
                f"{session.label}: an answer to request {event.request_id}, which is not in flight",
            )
            assert pending is not None
            if event.body == _RATE_LIMITED_ANSWER:
                self.send_again(session, pending)  # (its answer is still to come)
                continue
            self.check_answer(session, pending, event.body)
            got += 1

    def send_again(self, session: Session, pending: Pending) -> None:
        """A request answered RATE_LIMITED (the account's requests passed the server's per-user
        rate; nothing was done, protocol.md 10): sent again after a pause, as the clients do,
        a bounded number of times."""
        self.rate_limited(session, pending.what, pending.resent)
        request_id = self.send(session, pending.request, pending.check, pending.what)
        session.pending[request_id].resent = pending.resent + 1

    def rate_limited(self, session: Session, what: str, resent: int) -> None:
        """``what`` was answered RATE_LIMITED after ``resent`` sends again: counted as policy,
        failed past MAX_RATE_LIMITED_RESENDS, else a pause before it is sent again."""
        self.run.report.policy_refusals += 1
        self.expect(
            resent < MAX_RATE_LIMITED_RESENDS,
            f"{what}: answered RATE_LIMITED {resent + 1} times in a row",
        )
        self.note(f"model: {session.label} {what} answered RATE_LIMITED (per-user rate); sent again")
        time.sleep(min(0.05 * 2**resent, 1.0))

    def check_answer(self, session: Session, pending: Pending, body: bytes) -> None:
        op = pending.request.op
        try:
            status, response = decode_response(op, body)
        except RemoteProtocolError as exc:
            self.fail(f"the answer to {op.name} does not decode: {exc} (protocol.md 12.4)")
        self.note(f"{session.label} answer: {status.name}" + (f" {_summary(response)}" if response else ""))
        self.expect(status is not Status.INTERNAL_ERROR, f"{op.name} answered INTERNAL_ERROR")
        if status is not Status.OK:
            self.expect(len(body) == 1, f"an error status with {len(body) - 1} more bytes (protocol.md 12.2)")
        pending.check(status, response, body)

    def call(self, session: Session, request: OpRequest, check: Check, what: str) -> None:
        self.send(session, request, check, what)
        self.answers(session)

    def session_ended(self, session: Session, event: Event) -> None:
        """An event ended an established session without the model asking: only policy CLOSEs may."""
        if isinstance(event, SessionClosed) and event.code in POLICY_CLOSES:
            self.run.report.policy_refusals += 1
            self.note(f"model: {session.label} ended by the server's policy ({event.code.name}); allowed")
            self.forget(session)
            raise _Policy(event.code.name)
        link = session.link
        if (
            isinstance(event, SessionFailed)
            and link is not None
            and self.server_abort(link, session.sid) is None
        ):
            last = link.last_frame(session.sid)
            what = last[0].name if last else "a frame"
            self.fail(
                f"the client had to refuse the server's {what} on {session.label}: {event.code.name} "
                f"({event.reason}); a conforming server's records open in order (protocol.md 5.2, 5.3, 9)"
            )
        self.fail(f"{session.label} ended unexpectedly: {event}")

    def forget(self, session: Session) -> None:
        for pool in (self.sessions, self.detached):
            if session in pool:
                pool.remove(session)
        session.pending.clear()
        session.reserved.clear()
        session.kept.clear()

    # ---- checks per operation

    def check_storage_key(self, session: Session) -> Check:
        account = session.account

        def check(status: Status, response: OpResponse | None, body: bytes) -> None:
            self.expect(
                status is Status.OK and isinstance(response, StorageKeyResponse),
                f"RETRIEVE_STORAGE_KEY answered {status.name} (OPS-1)",
            )
            assert isinstance(response, StorageKeyResponse)
            try:
                key = decrypt_storage_key(
                    derive_master_key(account.export_key), response.encrypted_storage_key, account.user_id
                )
            except RemoteProtocolError:
                self.fail(
                    "the encrypted storage key does not open under the account's master key with AD "
                    "user_id || 'storage key' (OPS-1, REG-3)"
                )
            if account.storage_key is not None:
                self.expect(hmac.compare_digest(key, account.storage_key), "the storage key changed")
            account.storage_key = key
            account.log(Action.RETRIEVE_STORAGE_KEY)

        return check

    def storage_key(self, session: Session) -> bytes:
        account = session.account
        if account.storage_key is None:
            self.call(
                session,
                RetrieveStorageKeyRequest(account.user_id),
                self.check_storage_key(session),
                "RETRIEVE_STORAGE_KEY",
            )
        assert account.storage_key is not None
        return account.storage_key

    def check_create(self, session: Session, kind: SecretKind, nonce: bytes) -> Check:
        account = session.account

        def check(status: Status, response: OpResponse | None, body: bytes) -> None:
            self.expect(
                status is Status.OK and isinstance(response, KeyIdResponse),
                f"CREATE_KEY_ID answered {status.name}",
            )
            assert isinstance(response, KeyIdResponse)
            expected = joint_key_id(account.user_id, nonce, response.server_nonce)
            self.expect(
                hmac.compare_digest(expected, response.key_id),
                "the key id is not KEY-1 of the client's and the server's nonces (protocol.md 12.5)",
            )
            self.expect(
                all(response.key_id not in a.keys for a in self.accounts),
                "CREATE_KEY_ID handed out a key id that is stored (protocol.md 12.5)",
            )
            self.expect(
                response.key_id not in session.reserved,
                "CREATE_KEY_ID handed out a key id already reserved for this session",
            )
            session.reserve(response.key_id, kind)
            account.log(Action.CREATE_KEY_ID, key_id=response.key_id)
            self.note(f"model: {_short(response.key_id)} reserved for {session.label} ({kind.name})")

        return check

    def check_store(self, session: Session, request: StoreSecretRequest, secret: bytes) -> Check:
        account = session.account
        action = Action.IMPORT if request.kind is SecretKind.IMPORTED else Action.GENERATE
        reserved = session.reserved.get(request.key_id) is request.kind

        def check(status: Status, response: OpResponse | None, body: bytes) -> None:
            key_id = request.key_id
            if session.kept.get(key_id) is request.kind and key_id not in session.reserved:
                del session.kept[key_id]  # reserved before a detach: the server may have lost it
                if status is Status.INVALID:
                    self.note(
                        f"model: {_short(key_id)} was reserved before {session.label} detached; the "
                        "server kept it only if it kept the session in memory: INVALID allowed "
                        "(protocol.md 12.8)"
                    )
                    account.log(action, Outcome.FAILURE, key_id)
                    return
                session.reserved[key_id] = request.kind  # it was kept: the store must succeed
            elif not reserved:
                self.expect(
                    status is Status.INVALID,
                    f"STORE_SECRET under a key id not reserved for this session with this kind answered "
                    f"{status.name}, not INVALID (protocol.md 12.8)",
                )
                account.log(action, Outcome.FAILURE, request.key_id)
                return
            self.expect(
                status is Status.OK and isinstance(response, StoredResponse),
                f"STORE_SECRET under a reserved key id answered {status.name}",
            )
            assert isinstance(response, StoredResponse)
            del session.reserved[request.key_id]
            label = self.new_key_label()
            account.keys[request.key_id] = Key(label, request.kind, request.ciphertext, secret)
            account.log(action, key_id=request.key_id)
            self.note(f"model: {label} = {_short(request.key_id)} stored")
            if request.next_kind is None:
                self.expect(response.next_key_id is None, "STORE_SECRET sent a next key id nobody asked for")
                return
            self.expect(
                response.next_key_id is not None and response.next_server_nonce is not None,
                "STORE_SECRET asked for the next key id and got none (protocol.md 12.4)",
            )
            assert response.next_key_id is not None and response.next_server_nonce is not None
            assert request.next_client_nonce is not None
            expected = joint_key_id(account.user_id, request.next_client_nonce, response.next_server_nonce)
            self.expect(
                hmac.compare_digest(expected, response.next_key_id),
                "the next key id is not KEY-1 of the two nonces (protocol.md 12.5)",
            )
            session.reserve(response.next_key_id, request.next_kind)
            account.log(Action.CREATE_KEY_ID, key_id=response.next_key_id)

        return check

    def check_retrieve(self, session: Session, key_id: bytes, context: Context) -> Check:
        account = session.account
        key = account.keys.get(key_id)

        def check(status: Status, response: OpResponse | None, body: bytes) -> None:
            if key is None:
                self.expect(
                    body == b"\x01",
                    f"RETRIEVE of a key this user does not have answered "
                    f"{body[:1].hex()} (OPS-7: exactly the one byte 01, NOT_FOUND)",
                )
                account.log(Action.RETRIEVE, Outcome.FAILURE, key_id, context)
                return
            self.expect(
                status is Status.OK and isinstance(response, SecretResponse),
                f"RETRIEVE of a stored key answered {status.name}",
            )
            assert isinstance(response, SecretResponse)
            self.expect(response.kind is key.kind, "RETRIEVE returned another kind")
            self.expect(
                hmac.compare_digest(response.ciphertext, key.sealed),
                "RETRIEVE returned another sealed secret",
            )
            self.expect(
                hmac.compare_digest(response.associated_data, secret_ad(account.user_id, key_id, key.kind)),
                "RETRIEVE returned an AD other than user_id || key_id (|| 'imported key') (protocol.md 12.6)",
            )
            if account.storage_key is not None:
                opened = open_secret(account.storage_key, response.ciphertext, response.associated_data)
                self.expect(
                    hmac.compare_digest(opened, key.secret), "the retrieved secret is not the stored one"
                )
            account.log(Action.RETRIEVE, key_id=key_id, context=context)

        return check

    def check_list(self, session: Session, cursor: int, limit: int, seen: list[bytes]) -> Check:
        account = session.account

        def check(status: Status, response: OpResponse | None, body: bytes) -> None:
            self.expect(
                status is Status.OK and isinstance(response, KeyListResponse),
                f"LIST_KEYS answered {status.name}",
            )
            assert isinstance(response, KeyListResponse)
            self.expect(
                len(response.keys) <= limit, f"LIST_KEYS returned {len(response.keys)} keys for limit {limit}"
            )
            total = len(account.keys)
            more = cursor + limit < total
            self.expect(
                len(response.keys) == min(limit, max(total - cursor, 0)),
                f"LIST_KEYS returned {len(response.keys)} keys from {cursor} with limit {limit}; the "
                f"user has {total} (protocol.md 12.4)",
            )
            self.expect(
                response.next_cursor == (cursor + limit if more else 0),
                f"LIST_KEYS next_cursor {response.next_cursor}, not {cursor + limit if more else 0}",
            )
            order = [(k.created, k.key_id) for k in response.keys]
            self.expect(order == sorted(order), "LIST_KEYS not in order of creation time, then key id")
            for info in response.keys:
                key = account.keys.get(info.key_id)
                self.expect(
                    key is not None, f"LIST_KEYS lists {_short(info.key_id)}, which this user does not have"
                )
                assert key is not None
                self.expect(info.kind is key.kind, f"LIST_KEYS gives {key.label} another kind")
                self.expect(
                    info.sealed_label == key.sealed_label, f"LIST_KEYS gives {key.label} another label"
                )
                seen.append(info.key_id)
            account.log(Action.LIST_KEYS)

        return check

    def check_delete(self, session: Session, key_id: bytes) -> Check:
        account = session.account
        present = key_id in account.keys

        def check(status: Status, response: OpResponse | None, body: bytes) -> None:
            if not present:
                self.expect(
                    body == b"\x01",
                    f"DELETE_KEY of a key this user does not have answered "
                    f"{body[:1].hex()}, not 01 (NOT_FOUND, OPS-7)",
                )
                account.log(Action.DELETE_KEY, Outcome.FAILURE, key_id)
                return
            self.expect(
                status is Status.OK and isinstance(response, Empty), f"DELETE_KEY answered {status.name}"
            )
            del account.keys[key_id]
            account.log(Action.DELETE_KEY, key_id=key_id)

        return check

    def check_rename(self, session: Session, key_id: bytes, sealed_label: bytes) -> Check:
        account = session.account
        present = key_id in account.keys

        def check(status: Status, response: OpResponse | None, body: bytes) -> None:
            if not present:
                self.expect(
                    status is Status.NOT_FOUND,
                    f"RENAME_KEY of a key this user does not have answered {status.name}, not NOT_FOUND",
                )
                account.log(Action.RENAME_KEY, Outcome.FAILURE, key_id)
                return
            self.expect(status is Status.OK, f"RENAME_KEY answered {status.name}")
            account.keys[key_id].sealed_label = sealed_label
            account.log(Action.RENAME_KEY, key_id=key_id)

        return check

    def check_audit_page(self, session: Session, request: AuditRequest, pages: list[AuditResponse]) -> Check:
        """An OK page that follows protocol.md 12.9's paging, whatever the filter: at most
        ``limit`` entries after the cursor, in increasing order, and a ``next_cursor`` that is
        0, the last entry returned (a full page), or the last entry read, the
        MAX_AUDIT_SCAN-th after the cursor (entry ids are dense and every cursor the machine
        sends is 0 or an entry id, so that is ``cursor + MAX_AUDIT_SCAN``)."""

        def check(status: Status, response: OpResponse | None, body: bytes) -> None:
            self.expect(
                status is Status.OK and isinstance(response, AuditResponse), f"AUDIT answered {status.name}"
            )
            assert isinstance(response, AuditResponse)
            ids = [entry.entry_id for entry in response.entries]
            self.expect(
                len(ids) <= request.limit, f"AUDIT returned {len(ids)} entries for limit {request.limit}"
            )
            self.expect(
                all(a < b for a, b in zip([request.cursor, *ids], ids, strict=False)),
                f"AUDIT from cursor {request.cursor} returned entries {ids[:20]}: not after the cursor "
                "in increasing order (protocol.md 12.9)",
            )
            scan_end = request.cursor + MAX_AUDIT_SCAN
            allowed = {scan_end} | ({ids[-1]} if len(ids) == request.limit else set())
            self.expect(
                response.next_cursor == 0 or response.next_cursor in allowed,
                f"AUDIT from cursor {request.cursor} (limit {request.limit}, {len(ids)} entries) gave "
                f"next_cursor {response.next_cursor}: not 0, the last entry of a full page, nor the "
                f"last entry read ({scan_end}) (protocol.md 12.9)",
            )
            pages.append(response)

        return check

    def audit_walk(self, session: Session, limit: int) -> None:
        """Read the whole log unfiltered, ``limit`` entries a page, and check it: ids 1, 2, 3...,
        the hash chain from the genesis hash, REGISTER first, and the request-made entries in the
        model's order (protocol.md 12.9). Each page's own AUDIT entry is written after its query
        (protocol.md 12.8), so the log grows as it is read: the walk ends at the first entry it
        wrote itself, the AUDIT entry one past the log's AUDIT entries the model knows of."""
        account = session.account
        model = [list(group) for group in account.audit]
        known_audits = sum(item[0] is Action.AUDIT for group in model for item in group)
        pages: list[AuditResponse] = []
        entries: list[AuditEntry] = []
        cursor = 0
        own = None
        for _ in range(10_000):
            request = AuditRequest(account.user_id, AuditType.ALL, cursor=cursor, limit=limit)
            self.call(
                session,
                request,
                self.check_audit_page(session, request, pages),
                f"AUDIT ALL cursor {cursor} limit {limit}",
            )
            page = pages[-1]
            entries.extend(page.entries)
            audits = [e for e in entries if e.action is Action.AUDIT]
            if len(audits) > known_audits:
                own = audits[known_audits].entry_id
            if not page.next_cursor or own is not None:
                break
            # Unfiltered, every entry read matches: a page that is not the last is full
            # (limit <= MAX_AUDIT_PAGE < MAX_AUDIT_SCAN) and goes on from its last entry.
            self.expect(
                len(page.entries) == limit and page.next_cursor == page.entries[-1].entry_id,
                "AUDIT ALL: a page that is not the last is not full, or its next_cursor is not its "
                "last entry's id (protocol.md 12.9)",
            )
            cursor = page.next_cursor
        self.expect(
            [e.entry_id for e in entries] == list(range(1, len(entries) + 1)),
            f"audit entry ids {[e.entry_id for e in entries][:20]} are not 1, 2, 3, ... (protocol.md 12.9)",
        )
        previous = audit_genesis_hash()
        for entry in entries:
            expected = audit_chain_hash(account.user_id, previous, entry)
            self.expect(
                entry.chain_hash is not None
                and len(entry.chain_hash) == AUDIT_HASH_SIZE
                and hmac.compare_digest(entry.chain_hash, expected),
                f"audit entry {entry.entry_id}'s hash does not chain from the one before (protocol.md 12.9)",
            )
            previous = expected
        self.expect(
            bool(entries) and entries[0].action is Action.REGISTER and entries[0].outcome is Outcome.SUCCESS,
            "the first audit entry is not REGISTER (protocol.md 12.3)",
        )
        before_walk = [e for e in entries if own is None or e.entry_id < own]
        made = [
            (e.action, e.outcome, e.key_id, e.context) for e in before_walk if e.action in REQUEST_ACTIONS
        ]
        for entry in before_walk:
            if entry.action in REQUEST_ACTIONS:
                self.expect(
                    entry.count == 1, f"audit entry {entry.entry_id} of a request has count {entry.count}"
                )
        self.expect(
            _matches(made, model),
            "the audit log's request entries differ from the requests made:\n"
            f"      log:   {_items(made)}\n      model: {_groups(model)}",
        )
        for _ in pages:
            account.log(Action.AUDIT)

    # ------------------------------------------------------------ rules: accounts and logins

    @initialize()
    def two_accounts(self) -> None:
        """Every run starts with two accounts, each logged in once on one connection, and
        a key of A2's: what the checks across users (OPS-7, WRONG_USER) need."""
        with self.step("register A1 and A2, log in both, store a key of A2's"):
            link = self.new_link()
            first, second = (self.patiently(lambda: self.register_account(link)) for _ in range(2))
            self.patiently(lambda: self.do_login(link, first, first.name, first.password))
            session = self.patiently(lambda: self.do_login(link, second, second.name, second.password))
            assert session is not None
            self.store_(session, SecretKind.GENERATED, 32, ask_next=False, reuse=False)

    def patiently(self, attempt: Callable[[], _T]) -> _T:
        """``attempt()`` again while the server refuses it by policy (a busy server's
        RATE_LIMITED): the runs need their first accounts, one opening at a time."""
        for tries in range(1, POLICY_RETRIES + 1):
            try:
                return attempt()
            except _Policy as exc:
                self.run.report.policy_refusals += 1
                self.note(f"model: refused by the server's policy ({exc}); allowed, trying again")
                time.sleep(0.01 * tries)
        self.fail(f"the server refused {POLICY_RETRIES} openings in a row by policy: cannot start a run")

    @rule(link=st.integers(0, MAX_LINKS))
    @_when(lambda self: len(self.accounts) < MAX_ACCOUNTS)
    def register(self, link: int) -> None:
        with self.step("register a new account"):
            self.register_account(self.pick_link(link))

    @rule(account=st.integers(0, MAX_ACCOUNTS - 1), link=st.integers(0, MAX_LINKS))
    @_when(lambda self: self.accounts)
    def register_taken_name(self, account: int, link: int) -> None:
        chosen: Account = self.pick(self.accounts, account)
        with self.step(f"register {chosen.label}'s name again"):
            conn = self.pick_link(link)
            sid = conn.conn.open_registration(chosen.name, b"another password", self.target.token)
            self.note(
                "model: a taken (or deleted, still reserved) name; expect ABORT(ACCOUNT_EXISTS) before "
                "REG_RESPONSE (protocol.md 8.1, 12.13)"
            )
            conn.flush()
            event = self.opened(conn, sid, login=False, account=None)
            abort = self.server_abort(conn, sid)
            self.expect(
                isinstance(event, SessionFailed)
                and abort is not None
                and abort.code is ErrorCode.ACCOUNT_EXISTS
                and conn.frames_on(sid) == [FrameType.ABORT],
                f"registering a taken name gave {[t.name for t in conn.frames_on(sid)]} "
                f"({event}), not ABORT(ACCOUNT_EXISTS)",
            )

    @precondition(lambda self: self.target.token)  # the same in every replay
    @rule(link=st.integers(0, MAX_LINKS), token=st.binary(max_size=40))
    def register_with_a_forged_token(self, link: int, token: bytes) -> None:
        with self.step("register with a token that is not an invitation"):
            conn = self.pick_link(link)
            sid = conn.conn.open_registration(self.run.new_name("t"), b"a password", token)
            self.note(
                "model: a server that requires an authorization refuses a bad token: ABORT(NOT_AUTHORIZED) "
                "(REG-5, protocol.md 7.1)"
            )
            conn.flush()
            self.opened(conn, sid, login=False, account=None)
            abort = self.server_abort(conn, sid)
            self.expect(
                abort is not None and abort.code is ErrorCode.NOT_AUTHORIZED,
                f"a forged registration token gave {[t.name for t in conn.frames_on(sid)]}, not "
                "ABORT(NOT_AUTHORIZED)",
            )

    @rule(account=st.integers(0, MAX_ACCOUNTS - 1), link=st.integers(0, MAX_LINKS))
    @_when(lambda self: any(not a.deleted for a in self.accounts) and len(self.sessions) < MAX_SESSIONS)
    def login(self, account: int, link: int) -> None:
        chosen: Account = self.pick([a for a in self.accounts if not a.deleted], account)
        with self.step(f"log in as {chosen.label}"):
            self.do_login(self.pick_link(link), chosen, chosen.name, chosen.password)

    @rule(account=st.integers(0, MAX_ACCOUNTS - 1), link=st.integers(0, MAX_LINKS))
    @_when(lambda self: any(a.failures < MAX_FAILURES for a in self.accounts))
    def login_with_a_wrong_password(self, account: int, link: int) -> None:
        chosen: Account = self.pick([a for a in self.accounts if a.failures < MAX_FAILURES], account)
        with self.step(f"log in as {chosen.label} with a wrong password"):
            self.do_login(self.pick_link(link), chosen, chosen.name, chosen.password + b"!")

    @rule(link=st.integers(0, MAX_LINKS))
    def login_to_an_unknown_name(self, link: int) -> None:
        with self.step("log in to a name nobody registered"):
            self.do_login(self.pick_link(link), None, self.run.new_name("u"), b"any password")

    @rule(
        accounts=st.lists(st.integers(0, MAX_ACCOUNTS - 1), min_size=2, max_size=3),
        link=st.integers(0, MAX_LINKS),
    )
    @_when(lambda self: any(not a.deleted for a in self.accounts) and len(self.sessions) < MAX_SESSIONS - 2)
    def log_in_several_at_once(self, accounts: list[int], link: int) -> None:
        live = [a for a in self.accounts if not a.deleted]
        chosen: list[Account] = [self.pick(live, i) for i in accounts]
        with self.step(f"log in {', '.join(a.label for a in chosen)} at once on one connection"):
            conn = self.pick_link(link)
            sids = [conn.conn.open_request_session(a.name, a.password) for a in chosen]
            self.note("model: several logins in flight on one connection; each is established (NET-3)")
            conn.flush()
            self.concurrent_logins = len(chosen)
            try:
                for account, sid in zip(chosen, sids, strict=True):
                    try:
                        event = self.opened(conn, sid, login=True, account=account)
                    except _Policy as exc:
                        self.run.report.policy_refusals += 1
                        self.note(f"model: login on #{sid} refused by policy ({exc}); allowed")
                        continue
                    if not isinstance(event, SessionEstablished):
                        self.fail(f"a login among several on one connection failed: {event}")
                    assert event.handle is not None
                    self.session_count += 1
                    session = Session(
                        f"S{self.session_count}", account, conn, sid, event.handle, time.monotonic()
                    )
                    self.sessions.append(session)
                    self.expect(
                        hmac.compare_digest(event.user_id, account.user_id), "WELCOME names another user"
                    )
            finally:
                self.concurrent_logins = 1

    # ------------------------------------------------------------ rules: operations

    def revive(self, need: str) -> None:
        """Make what a picked rule needs when the run has none of it: a live session
        (``session``: resume a detached one, else log in), one that has sent records
        (``records``: a RETRIEVE_STORAGE_KEY on it) or two on one connection (``pair``: one
        more login there). Refused by policy: the rule is then skipped."""
        with self.step(f"(the next step needs {_NEEDS[need]}: make it)"):
            live = self.live_sessions()
            if not live and self.detached:
                self.resume_(self.detached[0], self.pick_link(0))
                live = self.live_sessions()
            accounts = [a for a in self.accounts if not a.deleted and not a.tainted]
            if not live or need == "pair":
                if not accounts or len(self.sessions) >= MAX_SESSIONS:
                    return
                link = live[0].link if live and live[0].link is not None else self.pick_link(0)
                self.do_login(link, accounts[0], accounts[0].name, accounts[0].password)
                live = self.live_sessions()
            if need == "records" and live:
                chosen = live[0]
                request = RetrieveStorageKeyRequest(chosen.account.user_id)
                self.call(chosen, request, self.check_storage_key(chosen), "RETRIEVE_STORAGE_KEY")

    def live_sessions(self) -> list[Session]:
        return [s for s in self.sessions if s.link is not None and s.link.alive and not s.account.tainted]

    @rule(session=st.integers(0, MAX_SESSIONS - 1))
    @_when(lambda self: self.live_sessions(), revive="session")
    def retrieve_storage_key(self, session: int) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        with self.step(f"{chosen.label}: RETRIEVE_STORAGE_KEY"):
            self.call(
                chosen,
                RetrieveStorageKeyRequest(chosen.account.user_id),
                self.check_storage_key(chosen),
                "RETRIEVE_STORAGE_KEY",
            )

    @rule(session=st.integers(0, MAX_SESSIONS - 1), kind=st.sampled_from(SecretKind))
    @_when(lambda self: self.live_sessions(), revive="session")
    def create_key_id(self, session: int, kind: SecretKind) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        with self.step(f"{chosen.label}: CREATE_KEY_ID {kind.name}"):
            nonce = os.urandom(32)
            self.call(
                chosen,
                CreateKeyIdRequest(chosen.account.user_id, kind, nonce),
                self.check_create(chosen, kind, nonce),
                f"CREATE_KEY_ID {kind.name}",
            )

    @rule(
        session=st.integers(0, MAX_SESSIONS - 1),
        kind=st.sampled_from(SecretKind),
        ask_next=st.booleans(),
        size=st.integers(1, 300),
        reuse=st.booleans(),
    )
    @_when(lambda self: self.live_sessions(), revive="session")
    def store_secret(self, session: int, kind: SecretKind, ask_next: bool, size: int, reuse: bool) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        with self.step(f"{chosen.label}: store a {kind.name} secret"):
            self.store_(chosen, kind, size, ask_next=ask_next, reuse=reuse)

    def store_(self, chosen: Session, kind: SecretKind, size: int, *, ask_next: bool, reuse: bool) -> None:
        """CREATE_KEY_ID (unless ``reuse`` takes a key id already reserved), then STORE_SECRET."""
        account = chosen.account
        storage_key = self.storage_key(chosen)
        key_id = next((k for k, v in chosen.reserved.items() if v is kind), None) if reuse else None
        if key_id is None:
            nonce = os.urandom(32)
            self.call(
                chosen,
                CreateKeyIdRequest(account.user_id, kind, nonce),
                self.check_create(chosen, kind, nonce),
                f"CREATE_KEY_ID {kind.name}",
            )
            key_id = next(reversed(chosen.reserved))
        secret = os.urandom(32 if kind is SecretKind.GENERATED else size)
        sealed = seal_secret(storage_key, secret, secret_ad(account.user_id, key_id, kind), os.urandom)
        request = StoreSecretRequest(
            account.user_id,
            key_id,
            kind,
            sealed,
            kind if ask_next else None,
            os.urandom(32) if ask_next else None,
        )
        self.call(
            chosen,
            request,
            self.check_store(chosen, request, secret),
            f"STORE_SECRET {_short(key_id)} {kind.name} ({len(secret)} bytes)"
            + (" asking for the next key id" if ask_next else ""),
        )

    @rule(
        session=st.integers(0, MAX_SESSIONS - 1),
        kind=st.sampled_from(SecretKind),
        whose=st.sampled_from(["random", "stored", "other session", "other kind"]),
    )
    @_when(lambda self: self.live_sessions(), revive="session")
    def store_under_a_key_id_not_reserved(self, session: int, kind: SecretKind, whose: str) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        with self.step(f"{chosen.label}: STORE_SECRET under a key id not reserved for it ({whose})"):
            account = chosen.account
            candidates: list[bytes] = []
            if whose == "stored":
                candidates = [k for a in self.accounts for k in a.keys]
            elif whose == "other session":
                candidates = [k for s in self.sessions if s is not chosen for k in s.reserved]
            elif whose == "other kind":
                candidates = [k for k, v in chosen.reserved.items() if v is not kind]
            key_id = candidates[0] if candidates else os.urandom(16)
            if key_id in chosen.reserved and chosen.reserved[key_id] is kind:
                key_id = os.urandom(16)
            size = 32 if kind is SecretKind.GENERATED else 20
            request = StoreSecretRequest(account.user_id, key_id, kind, os.urandom(size + 28))
            self.call(
                chosen,
                request,
                self.check_store(chosen, request, b""),
                f"STORE_SECRET {self.key_name(key_id)} {kind.name}: expect INVALID",
            )

    def any_key_id(self, session: Session, which: str) -> bytes:
        """A key id of the session's user (``"own"``), else one this user does not have:
        another user's stored key where there is one (OPS-7: the same answer as for a key
        that exists nowhere), else a random one."""
        own = list(session.account.keys)
        others = [k for a in self.accounts if a is not session.account for k in a.keys]
        if which == "own" and own:
            return own[0]
        if which != "own" and others:
            return others[0]
        return os.urandom(16)

    @rule(
        session=st.integers(0, MAX_SESSIONS - 1),
        which=st.sampled_from(["own", "not its own"]),
        context=st.sampled_from(Context),
    )
    @_when(lambda self: self.live_sessions(), revive="session")
    def retrieve(self, session: int, which: str, context: Context) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        key_id = self.any_key_id(chosen, which)
        with self.step(f"{chosen.label}: RETRIEVE {which} key {self.key_name(key_id)} ({context.name})"):
            if key_id in chosen.account.keys:
                self.storage_key(chosen)
            self.call(
                chosen,
                RetrieveRequest(chosen.account.user_id, key_id, context),
                self.check_retrieve(chosen, key_id, context),
                f"RETRIEVE {self.key_name(key_id)} {context.name}",
            )

    @rule(session=st.integers(0, MAX_SESSIONS - 1), limit=st.sampled_from([MAX_LIST_PAGE, 1, 2, 3]))
    @_when(lambda self: self.live_sessions(), revive="session")
    def list_keys(self, session: int, limit: int) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        with self.step(f"{chosen.label}: LIST_KEYS, pages of {limit}"):
            seen: list[bytes] = []
            cursor = 0
            for _ in range(100):
                self.call(
                    chosen,
                    ListKeysRequest(chosen.account.user_id, cursor, limit),
                    self.check_list(chosen, cursor, limit, seen),
                    f"LIST_KEYS cursor {cursor} limit {limit}",
                )
                cursor += limit
                if cursor >= len(chosen.account.keys):
                    break
            self.expect(
                sorted(seen) == sorted(chosen.account.keys),
                "the pages of LIST_KEYS do not list exactly the user's keys",
            )

    @rule(session=st.integers(0, MAX_SESSIONS - 1), which=st.sampled_from(["own", "not its own"]))
    @_when(lambda self: self.live_sessions(), revive="session")
    def delete_key(self, session: int, which: str) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        key_id = self.any_key_id(chosen, which)
        with self.step(f"{chosen.label}: DELETE_KEY {which} key {self.key_name(key_id)}"):
            self.call(
                chosen,
                DeleteKeyRequest(chosen.account.user_id, key_id),
                self.check_delete(chosen, key_id),
                f"DELETE_KEY {self.key_name(key_id)}",
            )

    @rule(
        session=st.integers(0, MAX_SESSIONS - 1),
        which=st.sampled_from(["own", "not its own"]),
        label=st.none() | st.sampled_from(["backup", "ključ", "work key 2"]),
    )
    @_when(lambda self: self.live_sessions(), revive="session")
    def rename_key(self, session: int, which: str, label: str | None) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        key_id = self.any_key_id(chosen, which)
        with self.step(f"{chosen.label}: RENAME_KEY {which} key {self.key_name(key_id)} to {label!r}"):
            sealed = b""
            if label is not None:
                sealed = seal_label(
                    self.storage_key(chosen), chosen.account.user_id, key_id, label, os.urandom
                )
            self.call(
                chosen,
                RenameKeyRequest(chosen.account.user_id, key_id, sealed),
                self.check_rename(chosen, key_id, sealed),
                f"RENAME_KEY {self.key_name(key_id)}",
            )

    @rule(session=st.integers(0, MAX_SESSIONS - 1), limit=st.sampled_from([MAX_AUDIT_PAGE, 1, 3]))
    @_when(lambda self: self.live_sessions(), revive="session")
    def audit(self, session: int, limit: int) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        with self.step(f"{chosen.label}: read the whole audit log, pages of {limit}"):
            self.audit_walk(chosen, limit)

    @rule(
        session=st.integers(0, MAX_SESSIONS - 1),
        audit_type=st.sampled_from([AuditType.KEY_ONLY, AuditType.SYSTEM_ONLY]),
        by_key=st.booleans(),
    )
    @_when(lambda self: self.live_sessions(), revive="session")
    def audit_filtered(self, session: int, audit_type: AuditType, by_key: bool) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        account = chosen.account
        key_ids = tuple(list(account.keys)[:1]) if by_key and audit_type is AuditType.KEY_ONLY else ()
        with self.step(f"{chosen.label}: AUDIT {audit_type.name}" + (" of one key" if key_ids else "")):
            pages: list[AuditResponse] = []
            request = AuditRequest(account.user_id, audit_type, key_ids, limit=MAX_AUDIT_PAGE)
            self.call(
                chosen, request, self.check_audit_page(chosen, request, pages), f"AUDIT {audit_type.name}"
            )
            entries = pages[0].entries

            def selected(item: AuditItem) -> bool:
                if key_ids and item[2] not in key_ids:
                    return False
                return item[0].is_key_action == (audit_type is AuditType.KEY_ONLY)

            for entry in entries:
                self.expect(
                    selected((entry.action, entry.outcome, entry.key_id, entry.context)),
                    f"AUDIT {audit_type.name} returned a {entry.action.name} entry (protocol.md 12.9)",
                )
            made = [
                (e.action, e.outcome, e.key_id, e.context) for e in entries if e.action in REQUEST_ACTIONS
            ]
            model = [[i for i in group if selected(i)] for group in account.audit]
            model = [g for g in model if g]
            if not pages[0].next_cursor:
                self.expect(
                    _matches(made, model),
                    f"AUDIT {audit_type.name} differs from the requests made:\n"
                    f"      log:   {_items(made)}\n      model: {_groups(model)}",
                )
            account.log(Action.AUDIT)

    @rule(session=st.integers(0, MAX_SESSIONS - 1), body=kst.malformed_request_bodies())
    @_when(lambda self: self.live_sessions(), revive="session")
    def malformed_request(self, session: int, body: bytes) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        with self.step(f"{chosen.label}: a request body that does not decode ({len(body)} bytes)"):
            self.send_malformed(chosen, body)

    def send_malformed(self, chosen: Session, body: bytes) -> None:
        link = chosen.link
        assert link is not None
        resent = 0
        while True:
            request_id = link.conn.send_request(chosen.sid, body)
            self.note(
                f"{chosen.label} request {request_id}: {body[:40].hex()}; expect the one byte 03 "
                "(INVALID), the session goes on (protocol.md 12.2)"
            )
            link.flush()
            event = self.wait_event(
                link,
                lambda e: (
                    isinstance(e, ResponseReceived | SessionFailed | SessionClosed)
                    and e.session_id == chosen.sid
                ),
                "no answer to a malformed request",
            )
            if not isinstance(event, ResponseReceived):
                self.session_ended(chosen, event)
            assert isinstance(event, ResponseReceived)
            if event.body != _RATE_LIMITED_ANSWER:
                break
            self.rate_limited(chosen, "a malformed request", resent)  # (nothing was done)
            resent += 1
        self.expect(
            event.body == b"\x03",
            f"a malformed request body was answered {event.body[:8].hex()}, not 03 (INVALID)",
        )
        known = {int(op) for op in Op}
        if body and body[0] in known:
            action = _ACTIONS[Op(body[0])]
            if body[0] == Op.STORE_SECRET:
                action = (
                    Action.IMPORT if len(body) > 33 and body[33] == SecretKind.IMPORTED else Action.GENERATE
                )
        else:
            action = Action.MALFORMED_REQUEST
        chosen.account.log(action, Outcome.FAILURE)

    @rule(
        session=st.integers(0, MAX_SESSIONS - 1),
        op=st.sampled_from([Op.RETRIEVE_STORAGE_KEY, Op.LIST_KEYS, Op.RETRIEVE, Op.DELETE_KEY]),
        other=st.booleans(),
    )
    @_when(lambda self: self.live_sessions(), revive="session")
    def request_naming_another_user(self, session: int, op: Op, other: bool) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        others = [a.user_id for a in self.accounts if a is not chosen.account]
        user_id = others[0] if other and others else os.urandom(16)
        with self.step(f"{chosen.label}: {op.name} naming another user id"):
            key_id = self.any_key_id(chosen, "own")
            request: OpRequest
            context: Context | None = None
            if op is Op.RETRIEVE_STORAGE_KEY:
                request = RetrieveStorageKeyRequest(user_id)
            elif op is Op.LIST_KEYS:
                request = ListKeysRequest(user_id)
            elif op is Op.RETRIEVE:
                context = Context.LOCAL_ONLY
                request = RetrieveRequest(user_id, key_id, context)
            else:
                request = DeleteKeyRequest(user_id, key_id)
            account = chosen.account

            def check(status: Status, response: OpResponse | None, body: bytes) -> None:
                self.expect(
                    status is Status.WRONG_USER,
                    f"a request naming another user id answered "
                    f"{status.name}, not WRONG_USER (protocol.md 12.8)",
                )
                account.log(request.audit_action, Outcome.FAILURE, None, context)

            self.call(chosen, request, check, f"{op.name} for user {user_id.hex()[:8]}: expect WRONG_USER")

    @rule(session=st.integers(0, MAX_SESSIONS - 1), count=st.integers(2, 6))
    @_when(lambda self: self.live_sessions(), revive="session")
    def pipeline(self, session: int, count: int) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        with self.step(f"{chosen.label}: {count} requests in flight at once"):
            account = chosen.account
            group: list[AuditItem] = []
            before = len(account.audit)
            for i in range(count):
                if i % 3 == 0:
                    self.send(
                        chosen,
                        ListKeysRequest(account.user_id),
                        self.check_list(chosen, 0, MAX_LIST_PAGE, []),
                        "LIST_KEYS",
                    )
                elif i % 3 == 1:
                    self.send(
                        chosen,
                        RetrieveStorageKeyRequest(account.user_id),
                        self.check_storage_key(chosen),
                        "RETRIEVE_STORAGE_KEY",
                    )
                else:
                    nonce = os.urandom(32)
                    kind = SecretKind.GENERATED
                    self.send(
                        chosen,
                        CreateKeyIdRequest(account.user_id, kind, nonce),
                        self.check_create(chosen, kind, nonce),
                        "CREATE_KEY_ID",
                    )
            self.note("model: every request is answered exactly once, in any order (protocol.md 8.2, 9)")
            self.answers(chosen)
            for items in account.audit[before:]:
                group.extend(items)
            del account.audit[before:]
            account.audit.append(group)

    @rule(session=st.integers(0, MAX_SESSIONS - 1))
    @_when(lambda self: self.live_sessions(), revive="session")
    def logout(self, session: int) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        with self.step(f"{chosen.label}: log out"):
            link = chosen.link
            assert link is not None
            link.conn.close_session(chosen.sid)
            link.flush()
            self.forget(chosen)
            self.note("model: the session is over; a later frame on its id is ignored (protocol.md 7.2, 9)")

    # ------------------------------------------------------------ rules: accounts

    def recent(self, session: Session) -> bool:
        return time.monotonic() - session.login_at < 240

    @rule(session=st.integers(0, MAX_SESSIONS - 1))
    @_when(lambda self: any(self.recent(s) for s in self.live_sessions()), revive="session")
    def change_password(self, session: int) -> None:
        chosen: Session = self.pick([s for s in self.live_sessions() if self.recent(s)], session)
        account = chosen.account
        with self.step(f"{chosen.label}: change {account.label}'s password"):
            storage_key = self.storage_key(chosen)
            new_password = os.urandom(12).hex().encode()
            start = self.opaque.client_registration_start(new_password)
            responses: list[bytes] = []

            def check_start(status: Status, response: OpResponse | None, body: bytes) -> None:
                self.expect(
                    status is Status.OK and isinstance(response, PasswordRegistrationResponse),
                    f"CHANGE_PASSWORD_START answered {status.name}",
                )
                assert isinstance(response, PasswordRegistrationResponse)
                responses.append(response.registration_response)
                account.log(Action.CHANGE_PASSWORD_START)

            self.call(
                chosen,
                ChangePasswordStartRequest(account.user_id, start.message),
                check_start,
                "CHANGE_PASSWORD_START",
            )
            finish = self.opaque.client_registration_finish(new_password, start.state, responses[0])
            export_key = finish.state
            wrapped = encrypt_storage_key(
                derive_master_key(export_key), storage_key, account.user_id, os.urandom
            )

            def check_finish(status: Status, response: OpResponse | None, body: bytes) -> None:
                self.expect(status is Status.OK, f"CHANGE_PASSWORD_FINISH answered {status.name}")
                account.password = new_password
                account.export_key = export_key
                account.log(Action.CHANGE_PASSWORD)

            self.call(
                chosen,
                ChangePasswordFinishRequest(account.user_id, finish.message, wrapped),
                check_finish,
                "CHANGE_PASSWORD_FINISH",
            )
            self.note(
                f"model: every other session of {account.label} ends: attached ones with "
                "CLOSE(NOT_AUTHORIZED), detached ones cannot resume; this one goes on, and may "
                "change the password again (protocol.md 12.13)"
            )
            self.revoke(account, keep=chosen)

    def revoke(self, account: Account, keep: Session | None) -> None:
        for other in [s for s in self.sessions if s.account is account and s is not keep]:
            link = other.link
            assert link is not None
            if link.alive:
                event = self.session_end(link, other.sid)
                self.expect(
                    isinstance(event, SessionClosed) and event.code is ErrorCode.NOT_AUTHORIZED,
                    f"{other.label} of {account.label} got {event}, not CLOSE(NOT_AUTHORIZED) "
                    "(protocol.md 12.13)",
                )
            self.forget(other)
        for other in [s for s in self.detached if s.account is account and s is not keep]:
            self.detached.remove(other)
            self.revoked.append(other)
            if other.pending:
                account.tainted = True  # whether those requests ran is unknown

    @rule(session=st.integers(0, MAX_SESSIONS - 1))
    @_when(lambda self: any(self.recent(s) for s in self.live_sessions()), revive="session")
    def delete_account(self, session: int) -> None:
        chosen: Session = self.pick([s for s in self.live_sessions() if self.recent(s)], session)
        account = chosen.account
        with self.step(f"{chosen.label}: delete {account.label}"):

            def check(status: Status, response: OpResponse | None, body: bytes) -> None:
                self.expect(status is Status.OK, f"DELETE_ACCOUNT answered {status.name}")
                account.deleted = True
                account.keys.clear()

            self.send(chosen, DeleteAccountRequest(account.user_id), check, "DELETE_ACCOUNT")
            link = chosen.link
            assert link is not None

            def answered(e: Event) -> bool:
                return isinstance(e, ResponseReceived) and e.session_id == chosen.sid

            while True:
                event = link.wait_for(answered)
                self.expect(event is not None, "no answer to DELETE_ACCOUNT")
                assert isinstance(event, ResponseReceived)
                pending = chosen.pending.pop(event.request_id)
                if event.body != _RATE_LIMITED_ANSWER:
                    break
                self.send_again(chosen, pending)  # (nothing was done: the account is still there)
            self.check_answer(chosen, pending, event.body)
            self.note(
                "model: the session ends right after the answer with CLOSE(NOT_AUTHORIZED), and so does "
                "every other session of the account (protocol.md 12.13)"
            )
            ended = self.session_end(link, chosen.sid)
            self.expect(
                isinstance(ended, SessionClosed) and ended.code is ErrorCode.NOT_AUTHORIZED,
                f"after DELETE_ACCOUNT the session got {ended}, not CLOSE(NOT_AUTHORIZED)",
            )
            self.forget(chosen)
            self.revoke(account, keep=None)

    # ------------------------------------------------------------ rules: connections and resumption

    @rule(link=st.integers(0, MAX_LINKS), graceful=st.booleans(), in_flight=st.booleans())
    @_when(lambda self: self.live_sessions(), revive="session")
    def cut_connection(self, link: int, graceful: bool, in_flight: bool) -> None:
        links = sorted(
            {id(s.link): s.link for s in self.live_sessions() if s.link}.values(), key=lambda k: k.name
        )
        chosen: Link = self.pick(links, link)
        how = "GOAWAY(OK)" if graceful else "cut"
        with self.step(
            f"{chosen.name}: close the connection ({how})"
            + (" with a request in flight" if in_flight else "")
        ):
            on_it = [s for s in self.sessions if s.link is chosen]
            if in_flight:
                victim = on_it[0]
                key_id = self.any_key_id(victim, "own")
                if key_id in victim.account.keys:
                    self.send(
                        victim,
                        DeleteKeyRequest(victim.account.user_id, key_id),
                        self.check_delete(victim, key_id),
                        f"DELETE_KEY {self.key_name(key_id)} (left in flight)",
                    )
                else:
                    nonce = os.urandom(32)
                    self.send(
                        victim,
                        CreateKeyIdRequest(victim.account.user_id, SecretKind.IMPORTED, nonce),
                        self.check_create(victim, SecretKind.IMPORTED, nonce),
                        "CREATE_KEY_ID (left in flight)",
                    )
            if graceful:
                chosen.close()
            else:
                chosen.drop()
            self.detach_all(chosen)
            if in_flight:
                self.note(f"model: {victim.label} resumes at once, so that its request is answered")
                self.resume_soon(victim)

    def resume_soon(self, session: Session) -> None:
        """Resume ``session`` now, on a new connection if needed, trying again a few times if
        the server's rate policy defers it. If it never resumes, what its requests in flight
        did is unknown: the model stops checking its account (``tainted``)."""
        for attempt in range(5):
            try:
                self.resume_(session, self.pick_link(0))
                return
            except _Policy:
                self.run.report.policy_refusals += 1
                time.sleep(0.2 * (attempt + 1))
        self.note(f"model: {session.label} could not resume (rate policy); its account is no longer checked")
        session.account.tainted = True

    def detach_all(self, link: Link) -> None:
        detached = {d.handle: d for d in link.conn.take_detached_sessions()}
        for session in [s for s in self.sessions if s.link is link]:
            d = detached.get(session.handle)
            if d is None:
                self.fail(
                    f"{session.label} was not kept for resumption when its connection ended (protocol.md 7.2)"
                )
            session.detached = d
            session.link = None
            session.sealed_frames.clear()
            session.kept.update(session.reserved)  # (the server may keep them, or not)
            session.reserved.clear()
            self.sessions.remove(session)
            self.detached.append(session)
            self.note(
                f"model: {session.label} detached, resumable; requests in flight: "
                f"{sorted(session.pending) or 'none'}"
            )

    @rule(session=st.integers(0, MAX_SESSIONS - 1), link=st.integers(0, MAX_LINKS))
    @_when(lambda self: self.detached, after=("cut_connection", "connection_error", "scripted_session"))
    def resume(self, session: int, link: int) -> None:
        chosen: Session = self.pick(self.detached, session)
        with self.step(f"resume {chosen.label}"):
            self.resume_(chosen, self.pick_link(link))

    @rule(session=st.integers(0, MAX_SESSIONS - 1), link=st.integers(0, MAX_LINKS))
    @_when(lambda self: self.revoked, after=("change_password", "delete_account"))
    def resume_a_revoked_session(self, session: int, link: int) -> None:
        chosen: Session = self.pick(self.revoked, session)
        with self.step(
            f"resume {chosen.label}, whose password changed or account went while it was detached"
        ):
            conn = self.pick_link(link)
            assert chosen.detached is not None
            sid = conn.conn.resume_session(chosen.detached)
            self.note("model: expect ABORT(UNKNOWN_SESSION) (protocol.md 8.3, 12.13)")
            conn.flush()
            self.revoked.remove(chosen)
            event = self.wait_event(
                conn,
                lambda e: (
                    getattr(e, "session_id", None) == sid
                    and isinstance(e, SessionResumed | SessionFailed | ResumeDeferred)
                ),
                f"no answer to the RESUME of {chosen.label}",
            )
            if isinstance(event, ResumeDeferred):
                raise _Policy("RATE_LIMITED")
            self.expect(
                isinstance(event, SessionFailed) and event.code is ErrorCode.UNKNOWN_SESSION,
                f"a revoked session's RESUME got {event}, not ABORT(UNKNOWN_SESSION)",
            )

    # ------------------------------------------------------------ rules: misbehaviour on the wire

    def expect_bad_record(self, session: Session, why: str, since: int) -> None:
        """The server must end ``session`` with ABORT(BAD_RECORD) and send nothing else on it
        for the bad record (``since``: how many frames the link had received before it)."""
        link = session.link
        assert link is not None
        event = link.wait_for(
            lambda e: (
                isinstance(e, SessionFailed | SessionClosed | ResponseReceived)
                and e.session_id == session.sid
            )
        )
        after = [t for t, sid, _ in link.received[since:] if sid == session.sid]
        abort = self.server_abort(link, session.sid)
        if FrameType.RESPONSE in after or isinstance(event, ResponseReceived):
            self.fail(
                f"{why}: the server answered it (a RESPONSE) instead of ending {session.label} with "
                "ABORT(BAD_RECORD): it accepted a record that must not open (protocol.md 5.2, 5.3)"
            )
        if event is None:
            self.fail(f"{why}: no ABORT(BAD_RECORD) on {session.label} within {self.target.timeout:g} s")
        self.expect(
            isinstance(event, SessionFailed) and abort is not None and abort.code is ErrorCode.BAD_RECORD,
            f"{why}: expected ABORT(BAD_RECORD) ending {session.label} (protocol.md 5.2, 5.3), got "
            f"{[t.name for t in after]} ({event})",
        )
        self.forget(session)

    @rule(session=st.integers(0, MAX_SESSIONS - 1), which=st.integers(0, 10))
    @_when(lambda self: any(s.sealed_frames for s in self.live_sessions()), revive="records")
    def replay_a_record(self, session: int, which: int) -> None:
        chosen: Session = self.pick([s for s in self.live_sessions() if s.sealed_frames], session)
        frame = self.pick(chosen.sealed_frames, which)
        with self.step(f"{chosen.label}: replay one of its records"):
            link = chosen.link
            assert link is not None
            self.answers(chosen)
            since = len(link.received)
            link.write_raw(frame, "  (a copy of a record already sent)")
            self.note("model: a replayed record must not open; expect ABORT(BAD_RECORD), nothing executed")
            self.expect_bad_record(chosen, "a replayed record", since)

    @rule(
        session=st.integers(0, MAX_SESSIONS - 1),
        position=st.integers(0, 10_000),
        bit=st.integers(0, 7),
        store=st.booleans(),
    )
    @_when(lambda self: self.live_sessions(), revive="session")
    def flip_a_bit(self, session: int, position: int, bit: int, store: bool) -> None:
        chosen: Session = self.pick(self.live_sessions(), session)
        with self.step(f"{chosen.label}: send a request with one bit flipped in its record"):
            account = chosen.account

            def flip(frames: list[bytes]) -> list[bytes]:
                frame = bytearray(frames[-1])
                # Past the record's sequence number (its first 8 bytes): a changed number is
                # refused before the record is authenticated, so a flip there would not show
                # a server that skips the authentication (Hypothesis often draws one
                # position again and again: every flip of a run could land there).
                at = 18 + position % (len(frame) - 18)
                frame[at] ^= 1 << bit
                self.note(f"(payload byte {at - 10} of {len(frame) - 10}, bit {bit}, flipped)")
                return [*frames[:-1], bytes(frame)]

            if store and account.storage_key is not None:
                nonce = os.urandom(32)
                self.call(
                    chosen,
                    CreateKeyIdRequest(account.user_id, SecretKind.GENERATED, nonce),
                    self.check_create(chosen, SecretKind.GENERATED, nonce),
                    "CREATE_KEY_ID",
                )
                key_id = next(reversed(chosen.reserved))
                secret = os.urandom(32)
                sealed = seal_secret(
                    account.storage_key,
                    secret,
                    secret_ad(account.user_id, key_id, SecretKind.GENERATED),
                    os.urandom,
                )
                request: OpRequest = StoreSecretRequest(account.user_id, key_id, SecretKind.GENERATED, sealed)
            else:
                request = ListKeysRequest(account.user_id)
            link = chosen.link
            assert link is not None
            request_id = link.conn.send_request(chosen.sid, request.encode())
            self.note(
                f"{chosen.label} request {request_id}: {request.op.name} (tampered); "
                "expect ABORT(BAD_RECORD), "
                "the request not executed (NET-7)"
            )
            since = len(link.received)
            link.flush(flip)
            self.expect_bad_record(chosen, "a record with a flipped bit", since)

    @rule(pair=st.integers(0, 20))
    @_when(
        lambda self: any(
            len([s for s in self.live_sessions() if s.link is link]) >= 2 for link in self.links
        ),
        revive="pair",
    )
    def move_a_record_to_another_session(self, pair: int) -> None:
        groups = [[s for s in self.live_sessions() if s.link is link] for link in self.links]
        group: list[Session] = self.pick([g for g in groups if len(g) >= 2], pair)
        source, target = group[0], group[1]
        with self.step(f"send a copy of {source.label}'s next record on {target.label}'s session id"):
            moved: list[bytes] = []

            def copy(frames: list[bytes]) -> list[bytes]:
                frame = frames[-1]
                moved.append(frame[:2] + target.sid.to_bytes(4, "big") + frame[6:])
                return [*frames, moved[0]]

            self.note(
                f"model: {source.label}'s request is answered; the copy must not open on {target.label}: "
                "ABORT(BAD_RECORD) there (NET-7)"
            )
            assert source.link is not None
            since = len(source.link.received)
            self.send(
                source,
                ListKeysRequest(source.account.user_id),
                self.check_list(source, 0, MAX_LIST_PAGE, []),
                "LIST_KEYS",
                transform=copy,
            )
            self.answers(source)
            self.expect_bad_record(target, "a record moved from another session", since)

    def raw_link(self) -> Link:
        link = self.new_link()
        return link

    def raw_login_start(self, link: Link, sid: int) -> None:
        link.claimed.add(sid)
        step = self.opaque.client_login_start(b"any password")
        link.write_raw(
            encode_frame(
                FrameType.LOGIN_START, sid, LoginStart(self.run.new_name("r"), step.message).encode()
            )
        )

    def raw_answer(self, link: Link, sid: int, what: str) -> tuple[FrameType, bytes]:
        answer = link.wait_raw(sid)
        if answer is None:
            self.fail(f"{what}: no answer on #{sid} within {self.target.timeout:g} s")
        assert answer is not None
        return answer

    def expect_abort(self, answer: tuple[FrameType, bytes], code: ErrorCode, what: str) -> None:
        frame_type, payload = answer
        if frame_type is FrameType.ABORT:
            abort = Abort.decode(payload)
            if abort.code is ErrorCode.RATE_LIMITED:
                raise _Policy("RATE_LIMITED")
            self.expect(abort.code is code, f"{what}: ABORT({abort.code.name}), not ABORT({code.name})")
            return
        self.fail(f"{what}: {frame_type.name}, not ABORT({code.name})")

    @rule(
        data=st.data(),
        kind=st.sampled_from(
            ["used id", "id never opened", "late frames", "opening frame that does not decode"]
        ),
    )
    def misbehave_on_a_new_connection(self, data: st.DataObject, kind: str) -> None:
        if kind == "used id":
            self.opening_frame_on_a_used_id(data.draw(st.booleans(), label="reuse_highest"))
        elif kind == "id never opened":
            types = [
                FrameType.REQUEST,
                FrameType.LOGIN_FINISH,
                FrameType.CLOSE,
                FrameType.COMPLETE_REGISTRATION,
            ]
            self.frame_on_an_id_never_opened(data.draw(st.sampled_from(types), label="type"))
        elif kind == "late frames":
            self.late_frame_for_an_ended_session(data.draw(st.integers(1, 3), label="frames_after"))
        else:
            self.opening_frame_that_does_not_decode(
                data.draw(kst.invalid_account_names(), label="name"),
                data.draw(st.booleans(), label="registration"),
            )

    def opening_frame_on_a_used_id(self, reuse_highest: bool) -> None:
        with self.step("LOGIN_START on a session id already used on the connection"):
            link = self.raw_link()
            self.raw_login_start(link, 2)
            self.raw_answer(link, 2, "LOGIN_START on a new id")
            link.write_raw(encode_frame(FrameType.ABORT, 2, Abort(ErrorCode.CLIENT_CLOSED, "bye").encode()))
            reused = 2 if reuse_highest else 1
            self.note(
                f"model: ids are never reused: LOGIN_START on #{reused} gets ABORT(BAD_SESSION_ID) "
                "(protocol.md 9)"
            )
            self.raw_login_start(link, reused)
            self.expect_abort(
                self.raw_answer(link, reused, "a reused id"),
                ErrorCode.BAD_SESSION_ID,
                "LOGIN_START on a used id",
            )
            link.close()

    def frame_on_an_id_never_opened(self, type_byte: FrameType) -> None:
        with self.step(f"{type_byte.name} on a session id never opened"):
            link = self.raw_link()
            link.claimed.add(5)
            payload = bytes(8) + os.urandom(40) if type_byte.sealed else os.urandom(64)
            link.write_raw(encode_frame(type_byte, 5, payload))
            self.note("model: ABORT(UNEXPECTED_FRAME) on that id, which stays unused (protocol.md 9)")
            self.expect_abort(
                self.raw_answer(link, 5, "a frame on an id never opened"),
                ErrorCode.UNEXPECTED_FRAME,
                f"{type_byte.name} on a new id",
            )
            self.note("model: so a LOGIN_START on that same id opens a session: LOGIN_RESPONSE")
            self.raw_login_start(link, 5)
            answer = self.raw_answer(link, 5, "LOGIN_START on the id a stray frame did not use")
            if answer[0] is FrameType.ABORT:
                self.expect_abort(answer, ErrorCode.OK, "LOGIN_START on the id a stray frame did not use")
            self.expect(answer[0] is FrameType.LOGIN_RESPONSE, f"LOGIN_START got {answer[0].name}")
            link.close()

    def late_frame_for_an_ended_session(self, frames_after: int) -> None:
        with self.step("frames for a session that ended are ignored"):
            link = self.raw_link()
            self.raw_login_start(link, 1)
            self.raw_answer(link, 1, "LOGIN_START")
            link.write_raw(encode_frame(FrameType.ABORT, 1, Abort(ErrorCode.CLIENT_CLOSED, "bye").encode()))
            for _ in range(frames_after):
                link.write_raw(encode_frame(FrameType.REQUEST, 1, bytes(8) + os.urandom(30)))
            self.note(
                "model: nothing comes back for #1; the next session opens normally (protocol.md 7.2, 9)"
            )
            self.raw_login_start(link, 2)
            answer = self.raw_answer(link, 2, "LOGIN_START after late frames")
            self.expect(
                answer[0] is FrameType.LOGIN_RESPONSE
                or (answer[0] is FrameType.ABORT and Abort.decode(answer[1]).code is ErrorCode.RATE_LIMITED),
                f"LOGIN_START after late frames got {answer[0].name}",
            )
            stray = [t.name for t, sid, _ in link.received if sid == 1][1:]
            self.expect(not stray, f"the server answered frames for an ended session: {stray}")
            link.close()

    def opening_frame_that_does_not_decode(self, name: bytes, registration: bool) -> None:
        kind = FrameType.REG_START if registration else FrameType.LOGIN_START
        with self.step(f"{kind.name} with an account name of {len(name)} bytes"):
            link = self.raw_link()
            link.claimed.add(1)
            size = 32 if registration else 96
            payload = (
                bytes([len(name) % 256]) + name + os.urandom(size) + (b"\x00\x00" if registration else b"")
            )
            link.write_raw(encode_frame(kind, 1, payload))
            self.note(
                "model: a payload that does not decode ends the session: ABORT(MALFORMED) (protocol.md 4.1)"
            )
            self.expect_abort(
                self.raw_answer(link, 1, "a malformed opening frame"),
                ErrorCode.MALFORMED,
                "a malformed opening frame",
            )
            link.close()

    @rule(
        kind=st.sampled_from(
            ["oversized length", "bad version", "unknown type", "id over the cap", "frame on id 0"]
        ),
        link=st.integers(0, MAX_LINKS),
    )
    @_when(lambda self: self.live_sessions(), revive="session")
    def connection_error(self, kind: str, link: int) -> None:
        links = sorted(
            {id(s.link): s.link for s in self.live_sessions() if s.link}.values(), key=lambda k: k.name
        )
        chosen: Link = self.pick(links, link)
        sid = next(s.sid for s in self.sessions if s.link is chosen)
        header = {
            "oversized length": (1, FrameType.REQUEST, sid, 0xFFFFFFFF, ErrorCode.FRAME_TOO_LARGE),
            "bad version": (2, FrameType.REQUEST, sid, 0, ErrorCode.UNSUPPORTED_VERSION),
            "unknown type": (1, 0x7F, sid, 0, ErrorCode.MALFORMED),
            "id over the cap": (1, FrameType.REQUEST, 0x80000000 | sid, 0, ErrorCode.BAD_SESSION_ID),
            "frame on id 0": (1, FrameType.LOGIN_START, 0, 0, ErrorCode.BAD_SESSION_ID),
        }[kind]
        code = header[4]
        with self.step(f"{chosen.name}: a frame header with {kind}"):
            for s in [s for s in self.sessions if s.link is chosen]:
                self.answers(s)
            raw = (
                bytes([header[0], int(header[1])])
                + header[2].to_bytes(4, "big")
                + header[3].to_bytes(4, "big")
            )
            chosen.write_raw(raw)
            self.note(
                f"model: a connection error: GOAWAY({code.name}) on #0, the connection ends, established "
                "sessions stay resumable (protocol.md 3.1, 7.2)"
            )
            chosen.pump(lambda: chosen.goaway is not None or chosen.eof)
            self.expect(
                chosen.goaway is not None and chosen.goaway.code is code,
                f"a header with {kind} got {chosen.goaway or 'no GOAWAY'}, not GOAWAY({code.name})",
            )
            chosen.pump(lambda: chosen.eof, 2.0)
            chosen.take(lambda e: isinstance(e, ConnectionFailed))
            chosen.drop()
            self.detach_all(chosen)

    @rule(session=st.integers(0, MAX_SESSIONS - 1))
    @_when(
        lambda self: any(s.resume_frames for s in self.sessions + self.detached),
        after=("resume", "cut_connection", "connection_error", "scripted_session"),
    )
    def replay_a_resume(self, session: int) -> None:
        chosen: Session = self.pick([s for s in self.sessions + self.detached if s.resume_frames], session)
        with self.step(f"replay {chosen.label}'s last RESUME on a new connection"):
            link = self.raw_link()
            link.claimed.add(1)
            frame = chosen.resume_frames[-1]
            link.write_raw(
                frame[:2] + (1).to_bytes(4, "big") + frame[6:], "  (a copy of a RESUME already used)"
            )
            self.note("model: a replayed RESUME must fail: ABORT(UNKNOWN_SESSION) (protocol.md 5.4, 8.3)")
            self.expect_abort(
                self.raw_answer(link, 1, "a replayed RESUME"), ErrorCode.UNKNOWN_SESSION, "a replayed RESUME"
            )
            link.close()

    # ------------------------------------------------------------ rules: scripted sessions

    @rule(account=st.integers(0, MAX_ACCOUNTS - 1), script=kst.scripted_sessions(max_steps=6))
    @_when(lambda self: any(not a.deleted for a in self.accounts) and len(self.sessions) < MAX_SESSIONS)
    def scripted_session(self, account: int, script: kst.SessionScript) -> None:
        chosen: Account = self.pick([a for a in self.accounts if not a.deleted], account)
        with self.step(f"a scripted session of {chosen.label}: {script.describe()}"):
            session = self.do_login(self.pick_link(0), chosen, chosen.name, chosen.password)
            assert session is not None
            for step_ in script.steps:
                if step_.action == "logout":
                    self.logout_(session)
                    return
                if step_.action in ("drop", "goaway"):
                    link = session.link
                    assert link is not None
                    others = [s for s in self.sessions if s.link is link and s is not session]
                    for other in others:
                        self.answers(other)
                    link.close() if step_.action == "goaway" else link.drop()
                    self.detach_all(link)
                    self.resume_soon(session)
                    continue
                self.script_request(session, step_)
                if step_.wait:
                    self.answers(session)
            self.answers(session)

    def logout_(self, session: Session) -> None:
        self.answers(session)
        link = session.link
        assert link is not None
        link.conn.close_session(session.sid)
        link.flush()
        self.forget(session)

    def resume_(self, session: Session, link: Link) -> None:
        """Resume a detached session on ``link``: RESUMED, then each request in flight
        answered exactly once. A RATE_LIMITED refusal raises _Policy (still detached)."""
        assert session.detached is not None
        sid = link.conn.resume_session(session.detached)
        self.note(
            f"model: RESUME of {session.label} on #{sid}; expect RESUMED, then each request in flight "
            "answered exactly once (protocol.md 8.3)"
        )
        frames = link.flush()
        session.resume_frames.extend(f for f in frames if f[1] == FrameType.RESUME)
        event = self.wait_event(
            link,
            lambda e: (
                getattr(e, "session_id", None) == sid
                and isinstance(e, SessionResumed | SessionFailed | ResumeDeferred)
            ),
            f"no answer to the RESUME of {session.label}",
        )
        if isinstance(event, ResumeDeferred):
            session.detached = next(
                d for d in link.conn.take_detached_sessions() if d.handle is session.handle
            )
            raise _Policy("RATE_LIMITED")
        if not isinstance(event, SessionResumed):
            self.fail(f"resuming {session.label} failed: {event}")
        assert isinstance(event, SessionResumed)
        self.expect(hmac.compare_digest(event.user_id, session.account.user_id), "RESUMED for another user")
        self.detached.remove(session)
        session.detached = None
        session.link = link
        session.sid = sid
        self.sessions.append(session)
        if session.pending:
            before = len(session.account.audit)
            self.answers(session)
            group = [i for g in session.account.audit[before:] for i in g]
            del session.account.audit[before:]
            session.account.audit.append(group)

    def script_request(self, session: Session, step_: kst.ScriptStep) -> None:
        account = session.account
        op = step_.op
        if op in ("generate", "import", "retrieve", "rename") and not session.pending:
            self.storage_key(session)
        if op in ("generate", "import", "retrieve", "rename") and account.storage_key is None:
            op = "storage_key"
        if op == "storage_key":
            self.send(
                session,
                RetrieveStorageKeyRequest(account.user_id),
                self.check_storage_key(session),
                "RETRIEVE_STORAGE_KEY",
            )
        elif op in ("generate", "import"):
            self.answers(session)  # a store depends on its CREATE_KEY_ID's answer
            kind = SecretKind.GENERATED if op == "generate" else SecretKind.IMPORTED
            nonce = os.urandom(32)
            self.call(
                session,
                CreateKeyIdRequest(account.user_id, kind, nonce),
                self.check_create(session, kind, nonce),
                f"CREATE_KEY_ID {kind.name}",
            )
            key_id = next(reversed(session.reserved))
            secret = os.urandom(32 if kind is SecretKind.GENERATED else step_.size)
            assert account.storage_key is not None
            sealed = seal_secret(
                account.storage_key, secret, secret_ad(account.user_id, key_id, kind), os.urandom
            )
            request = StoreSecretRequest(account.user_id, key_id, kind, sealed)
            self.send(
                session, request, self.check_store(session, request, secret), f"STORE_SECRET {_short(key_id)}"
            )
        elif op == "retrieve":
            self.answers(session)
            key_id = self.any_key_id(session, "own")
            self.send(
                session,
                RetrieveRequest(account.user_id, key_id, step_.context),
                self.check_retrieve(session, key_id, step_.context),
                f"RETRIEVE {self.key_name(key_id)}",
            )
        elif op == "retrieve_missing":
            key_id = os.urandom(16)
            self.send(
                session,
                RetrieveRequest(account.user_id, key_id, step_.context),
                self.check_retrieve(session, key_id, step_.context),
                "RETRIEVE of a missing key",
            )
        elif op == "list":
            self.answers(session)
            self.send(
                session,
                ListKeysRequest(account.user_id),
                self.check_list(session, 0, MAX_LIST_PAGE, []),
                "LIST_KEYS",
            )
        elif op in ("delete", "rename"):
            self.answers(session)
            key_id = self.any_key_id(session, "own")
            if op == "delete":
                self.send(
                    session,
                    DeleteKeyRequest(account.user_id, key_id),
                    self.check_delete(session, key_id),
                    f"DELETE_KEY {self.key_name(key_id)}",
                )
            else:
                assert account.storage_key is not None
                sealed_label = seal_label(
                    account.storage_key, account.user_id, key_id, "scripted", os.urandom
                )
                self.send(
                    session,
                    RenameKeyRequest(account.user_id, key_id, sealed_label),
                    self.check_rename(session, key_id, sealed_label),
                    f"RENAME_KEY {self.key_name(key_id)}",
                )
        elif op == "audit":
            self.answers(session)
            self.audit_walk(session, MAX_AUDIT_PAGE)
        elif op == "malformed":
            self.answers(session)
            self.send_malformed(session, b"")
        else:  # wrong_user
            self.answers(session)

            def check(status: Status, response: OpResponse | None, body: bytes) -> None:
                self.expect(
                    status is Status.WRONG_USER, f"a request naming another user answered {status.name}"
                )
                account.log(Action.LIST_KEYS, Outcome.FAILURE)

            self.send(session, ListKeysRequest(os.urandom(16)), check, "LIST_KEYS for another user id")

    # ------------------------------------------------------------ invariants

    @invariant()
    def nothing_unexpected_arrived(self) -> None:
        for link in self.links:
            for event in list(link.events):
                if isinstance(event, ConnectionFailed) and not link.alive:
                    link.events.remove(event)
                    if event.code is ErrorCode.IDLE_TIMEOUT and not any(
                        s.link is link for s in self.sessions
                    ):
                        continue
                    if event.remote or link.goaway is not None:
                        self.fail(f"{link.name}: unexpected {event}")
                    continue
                if isinstance(event, SessionClosed) and event.code in POLICY_CLOSES:
                    link.events.remove(event)
                    for s in [s for s in self.sessions if s.link is link and s.sid == event.session_id]:
                        self.forget(s)
                    continue
                if isinstance(event, SessionFailed | SessionClosed) and not any(
                    s.link is link and s.sid == event.session_id for s in self.sessions
                ):
                    link.events.remove(event)  # a session the model already let go of
                    continue
                self.fail(f"{link.name}: an event nobody asked for: {event}")


_ACTIONS = {
    Op.RETRIEVE_STORAGE_KEY: Action.RETRIEVE_STORAGE_KEY,
    Op.CREATE_KEY_ID: Action.CREATE_KEY_ID,
    Op.STORE_SECRET: Action.GENERATE,
    Op.RETRIEVE: Action.RETRIEVE,
    Op.AUDIT: Action.AUDIT,
    Op.LIST_KEYS: Action.LIST_KEYS,
    Op.DELETE_KEY: Action.DELETE_KEY,
    Op.CHANGE_PASSWORD_START: Action.CHANGE_PASSWORD_START,
    Op.CHANGE_PASSWORD_FINISH: Action.CHANGE_PASSWORD,
    Op.DELETE_ACCOUNT: Action.DELETE_ACCOUNT,
    Op.RENAME_KEY: Action.RENAME_KEY,
}


def _summary(response: OpResponse) -> str:
    if isinstance(response, KeyListResponse):
        return f"{len(response.keys)} keys, next_cursor {response.next_cursor}"
    if isinstance(response, AuditResponse):
        return f"{len(response.entries)} entries, next_cursor {response.next_cursor}"
    if isinstance(response, KeyIdResponse):
        return f"key id {_short(response.key_id)}"
    if isinstance(response, StoredResponse):
        return "stored" + (f", next key id {_short(response.next_key_id)}" if response.next_key_id else "")
    if isinstance(response, SecretResponse):
        return f"{response.kind.name}, {len(response.ciphertext)} sealed bytes"
    return type(response).__name__


def _items(items: list[AuditItem]) -> str:
    return "[" + ", ".join(_item(i) for i in items) + "]"


def _groups(groups: list[list[AuditItem]]) -> str:
    return (
        "["
        + ", ".join(
            _item(g[0]) if len(g) == 1 else "{" + ", ".join(_item(i) for i in g) + "}" for g in groups
        )
        + "]"
    )


def _item(item: AuditItem) -> str:
    action, outcome, key_id, context = item
    text = action.name + ("" if outcome is Outcome.SUCCESS else " FAILURE")
    if key_id is not None:
        text += f" {_short(key_id)}"
    if context is not None:
        text += f" {context.name}"
    return text


def _matches(items: list[AuditItem], groups: list[list[AuditItem]]) -> bool:
    """``items`` is ``groups`` flattened, each group in any order."""
    position = 0
    for group in groups:
        chunk = items[position : position + len(group)]
        if sorted(chunk, key=repr) != sorted(group, key=repr):
            return False
        position += len(group)
    return position == len(items)


def run_server_conformance(target: Target, run_settings: ServerRunSettings | None = None) -> ServerReport:
    """Run the server conformance machine against ``target``; returns what it did, or raises
    :class:`ConformanceFailure` (after shrinking) with the transcript of the failing run in
    ``transcript`` and Hypothesis's own account of the shrunk steps in ``hypothesis_report``."""
    run_settings = run_settings or ServerRunSettings()
    run = _Run(target, run_settings)
    machine = type("ServerConformance", (ServerMachine,), {"run": run})
    reports: list[str] = []

    def reporter(value: object) -> None:
        text = str(value)
        if "spent more than five minutes" in text:  # the limit below, not five minutes
            text = f"(shrinking stopped at the shrink time limit, {run_settings.shrink_time_limit:g} s)"
        elif text.startswith("PLEASE REPORT THIS"):
            return
        reports.append(text)

    # The time limit is checked between batches of runs: a Hypothesis run cannot be stopped
    # half-way without confusing it. With derandomize, one batch of every run (the same runs
    # each time), the time limit then does not apply.
    left = run_settings.max_examples
    saved = _engine.MAX_SHRINKING_SECONDS
    # Hypothesis documents this constant as one users may monkeypatch (its engine module).
    _engine.MAX_SHRINKING_SECONDS = max(1, int(run_settings.shrink_time_limit))
    try:
        while left > 0 and (
            run.report.examples == 0 or time.monotonic() - run.started < run_settings.time_limit
        ):
            batch = left if run_settings.derandomize else min(left, max(1, run_settings.batch))
            left -= batch
            hypothesis_settings = settings(
                max_examples=batch,
                stateful_step_count=run_settings.steps,
                deadline=None,
                derandomize=run_settings.derandomize,
                database=None,
                report_multiple_bugs=False,
                phases=[Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
            )
            with with_reporter(reporter):
                run_state_machine_as_test(machine, settings=hypothesis_settings)
    except ConformanceFailure as failure:
        notes = [n for n in getattr(failure, "__notes__", []) if "nothing_unexpected_arrived" not in n]
        failure.hypothesis_report = "\n".join([*reports, *notes])
        raise
    except BaseExceptionGroup as group:  # e.g. a failure that did not happen again on replay
        found = group.subgroup(ConformanceFailure)
        if found is None:
            raise
        first = _first(found)
        first.hypothesis_report = "\n".join(
            [*reports, "(the failure did not happen again when replayed: the server's behaviour varies)"]
        )
        raise first from group
    finally:
        _engine.MAX_SHRINKING_SECONDS = saved
    run.report.seconds = time.monotonic() - run.started
    return run.report


def _first(group: BaseExceptionGroup[ConformanceFailure]) -> ConformanceFailure:
    for item in group.exceptions:
        if isinstance(item, ConformanceFailure):
            return item
        if isinstance(item, BaseExceptionGroup):
            return _first(item)
    raise AssertionError("no ConformanceFailure in the group")
