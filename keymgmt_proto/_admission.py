"""Admission control before authentication (NET-13): a token bucket, time injected.

The key server gives each connection an :class:`Admission` (in practice the token
bucket of the connection's client address, shared by all its connections). The
core asks it before any work a frame that opens a session would cost (OPAQUE,
storage, a session lookup): REG_START, LOGIN_START and RESUME. A refusal is an
ABORT(``RATE_LIMITED``) and nothing else. A RESUME that succeeds is handed back
(:meth:`Admission.refund`): a client resuming its own sessions after a dropped
connection pays nothing, however many it has, while guessed or replayed RESUMEs
pay like any other opening frame.
"""

from __future__ import annotations

from typing import Protocol

from ._wire import FrameType

__all__ = ["Admission", "TokenBucket"]


class Admission(Protocol):
    """Decides whether a session-opening frame may cost the server anything."""

    def admit(self, frame_type: FrameType, now: float) -> bool:
        """True to go on with the frame received at ``now``; False to refuse it cheaply."""
        ...

    def refund(self, frame_type: FrameType, now: float) -> None:
        """An admitted frame turned out legitimate (a RESUME that resumed): give back what
        :meth:`admit` took for it."""
        ...


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; each admitted frame takes one.

    Starts full. ``now`` is any monotonic-enough clock in seconds; a clock that steps back
    adds nothing."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp: float | None = None

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate}, burst={self.burst}, tokens={self._tokens:.1f})"

    def tokens(self, now: float) -> float:
        """Tokens available at ``now``."""
        if self._stamp is None or now <= self._stamp:
            return self._tokens
        return min(self.burst, self._tokens + (now - self._stamp) * self.rate)

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        tokens = self.tokens(now)
        if self._stamp is None or now > self._stamp:
            self._stamp = now
        if tokens < 1:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1
        return True

    def give_back(self, now: float) -> None:
        """Return one token (never above ``burst``)."""
        self._tokens = min(self.burst, self.tokens(now) + 1)
        if self._stamp is None or now > self._stamp:
            self._stamp = now

    def admit(self, frame_type: FrameType, now: float) -> bool:
        """:class:`Admission` for every opening frame alike: one token each."""
        return self.take(now)

    def refund(self, frame_type: FrameType, now: float) -> None:
        """:class:`Admission`: a successful RESUME costs nothing."""
        self.give_back(now)
