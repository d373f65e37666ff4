"""Logins of one account take turns on a key-server instance (NET-10 without false alarms).

The server counts every login as a failed attempt from its start (the client checks a
guess alone once it has LOGIN_RESPONSE), so more than ``threshold`` logins of one
account running at once would trip the throttle even when every one of them is the
owner's. :class:`LoginGate` lets at most ``limit`` (``threshold - 1``) logins of one
account name run at once on this instance; the others wait, unanswered, in
AWAIT_LOGIN_DECISION (their handshake timeout still runs) and go ahead, in order, as
running ones succeed or fail. Unknown names go through it the same way (NET-9).

A login that may go ahead may sit on another connection: the gate then calls the
*waker* that connection's driver registered, and the driver admits it in its own next
batch (:meth:`KeyServer.poll`), so its storage writes commit before its answer leaves.
State is in memory, per instance; what counts for throttling stays in storage.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary, ref

from keymgmt_proto import LoginRequested, ServerConnection, State

__all__ = ["LoginGate"]

_Ref = ref[ServerConnection]


@dataclass(slots=True)
class _Line:
    running: list[tuple[_Ref, int]] = field(default_factory=list)
    waiting: deque[tuple[_Ref, LoginRequested]] = field(default_factory=deque)


class LoginGate:
    """At most ``limit`` unresolved logins per account name; the rest wait their turn."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._lines: dict[bytes, _Line] = {}
        self._wakers: WeakKeyDictionary[ServerConnection, Callable[[], None]] = WeakKeyDictionary()
        self._queued_on: WeakKeyDictionary[ServerConnection, set[bytes]] = WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"LoginGate(limit={self.limit}, names={len(self._lines)})"

    def attach(self, conn: ServerConnection, wake: Callable[[], None]) -> None:
        """``wake()`` makes ``conn``'s driver run a batch soon (it then calls ready)."""
        self._wakers[conn] = wake

    def may_start(self, conn: ServerConnection, event: LoginRequested) -> bool:
        """True if this login may run now; otherwise it is queued (leave it unanswered)."""
        line = self._lines.setdefault(event.account_name, _Line())
        self._prune_waiting(line)
        if not line.waiting and self._running(line) < self.limit:
            return True
        line.waiting.append((ref(conn), event))
        self._queued_on.setdefault(conn, set()).add(event.account_name)
        self._kick(line)
        return False

    def started(self, conn: ServerConnection, event: LoginRequested) -> None:
        """The login was accepted (it now runs until it succeeds or fails)."""
        line = self._lines.setdefault(event.account_name, _Line())
        line.running.append((ref(conn), event.session_id))

    def ready(self, conn: ServerConnection) -> list[LoginRequested]:
        """Take ``conn``'s queued logins that may run now (oldest first), to start them."""
        names = self._queued_on.get(conn)
        if not names:
            return []
        admitted: list[LoginRequested] = []
        for name in list(names):
            line = self._lines.get(name)
            if line is None:
                names.discard(name)
                continue
            self._prune_waiting(line)
            room = self.limit - self._running(line)
            kept: deque[tuple[_Ref, LoginRequested]] = deque()
            mine_left = False
            for conn_ref, event in line.waiting:
                owner = conn_ref()
                if owner is conn and room > 0:
                    admitted.append(event)
                    room -= 1
                    continue
                kept.append((conn_ref, event))
                mine_left = mine_left or owner is conn
            line.waiting = kept
            if not mine_left:
                names.discard(name)
            self._drop_if_idle(name, line)
        return admitted

    def resolved(self, account_name: bytes) -> None:
        """A login of ``account_name`` succeeded or failed: wake the connections whose
        queued logins of it may now run."""
        line = self._lines.get(account_name)
        if line is None:
            return
        self._prune_waiting(line)
        self._kick(line)
        self._drop_if_idle(account_name, line)

    def _kick(self, line: _Line) -> None:
        """Wake the owners of the queued logins there is room for (they call ready)."""
        room = self.limit - self._running(line)
        woken: list[ServerConnection] = []
        for conn_ref, _event in line.waiting:
            if room <= 0:
                break
            owner = conn_ref()
            room -= 1
            if owner is None or any(owner is w for w in woken):
                continue
            woken.append(owner)
            wake = self._wakers.get(owner)
            if wake is not None:
                wake()

    @staticmethod
    def _prune_waiting(line: _Line) -> None:
        """Forget queued logins whose connection or session has gone (e.g. timed out)."""
        line.waiting = deque(
            (conn_ref, event)
            for conn_ref, event in line.waiting
            if (owner := conn_ref()) is not None
            and owner.session_state(event.session_id) is State.AWAIT_LOGIN_DECISION
        )

    def _running(self, line: _Line) -> int:
        """Logins still waiting for LOGIN_FINISH (pruning those that ended)."""
        line.running = [
            (conn_ref, session_id)
            for conn_ref, session_id in line.running
            if (owner := conn_ref()) is not None
            and owner.session_state(session_id) is State.AWAIT_LOGIN_FINISH
        ]
        return len(line.running)

    def _drop_if_idle(self, name: bytes, line: _Line) -> None:
        if not line.running and not line.waiting:
            self._lines.pop(name, None)
