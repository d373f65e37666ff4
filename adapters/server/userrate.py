"""The per-user request rate: how fast one account's requests are served.

Every other limit bounds a session or a connection; a user who logs in many sessions over
many connections (and addresses) would still have the server answer, and write an audit
entry for, as many requests a second as it can take: one account could take the CPU and
the disk from everyone else. :class:`UserRequestRates` gives each user a token bucket
(``rate`` requests a second, bursts of ``burst``) shared by all its sessions on this server
process. A request that finds the bucket empty is answered ``RATE_LIMITED`` at once:
nothing is done, nothing is read or written, nothing audited; the client sends it again
after a moment (docs/protocol.md, section 10).

The count is per process: with ``serve --workers N`` or several instances a user gets up to
N times the rate. Buckets refill on a monotonic clock. The table is bounded: past
``max_users`` it forgets the users whose bucket has refilled (they are as good as new),
then, if it must, the oldest entries.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["DEFAULT_USER_BURST", "DEFAULT_USER_RATE", "UserRequestRates"]

#: Requests a second one user's sessions may make on one server process, by default.
DEFAULT_USER_RATE = 500.0
#: How many requests one user may make at once, by default (a bucket starts full).
DEFAULT_USER_BURST = 2000.0


class UserRequestRates:
    """A token bucket per user id; :meth:`take` is asked once per request."""

    __slots__ = ("_buckets", "burst", "clock", "max_users", "rate")

    def __init__(
        self,
        rate: float = DEFAULT_USER_RATE,
        burst: float = DEFAULT_USER_BURST,
        *,
        max_users: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate > 0 or not burst >= 1 or max_users < 1:
            raise ValueError("the per-user rate must be positive, its burst at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_users = max_users
        self.clock = clock
        #: user id -> [tokens, time they were counted]; oldest first.
        self._buckets: OrderedDict[bytes, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __repr__(self) -> str:
        return f"<UserRequestRates {self.rate:g}/s, bursts of {self.burst:g}, {len(self._buckets)} users>"

    def take(self, user_id: bytes) -> bool:
        """One request of ``user_id`` now: True if its bucket had a token (taken), False if
        the request must be refused."""
        now = self.clock()
        bucket = self._buckets.get(user_id)
        if bucket is None:
            self._prune(now)
            self._buckets[user_id] = [self.burst - 1, now]
            return True
        tokens, stamp = bucket
        if now > stamp:  # (a clock that steps back adds nothing)
            tokens += (now - stamp) * self.rate
            if tokens > self.burst:
                tokens = self.burst
            bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True

    def _prune(self, now: float) -> None:
        """At the cap, forget down to 90% of it in one pass (amortised O(1) per user): first
        the users whose bucket has refilled, then the oldest entries (not kept in order of use:
        that would cost every request a move; a user forgotten gets a full bucket back, so
        only a table of 100,000 users busy at once makes one lose its place)."""
        buckets = self._buckets
        if len(buckets) < self.max_users:
            return
        target = int(self.max_users * 0.9)
        for user_id, (tokens, stamp) in list(buckets.items()):
            if len(buckets) <= target:
                return
            if tokens + (now - stamp) * self.rate >= self.burst:
                del buckets[user_id]
        while len(buckets) > target:
            buckets.popitem(last=False)
