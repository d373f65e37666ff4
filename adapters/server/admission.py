"""Per-client-address limits before authentication (NET-13).

Before a peer has proved anything it may cost the server only bounded memory, bounded
CPU and no storage writes beyond counting its login attempts (NET-10).
:class:`AddressLimits` keeps, per client address, the number of open connections
(capped: a connection over the cap is closed before its TLS handshake) and one
:class:`~keymgmt_proto.TokenBucket` that every connection from that address shares: the
core asks it before each REG_START, LOGIN_START and RESUME, and
refuses with ABORT(RATE_LIMITED) when it is empty.

Addresses are grouped the way one client usually owns them: an IPv4 address alone, an
IPv6 address by its /64 prefix (one host or home network), an IPv4-mapped IPv6 address as
its IPv4 address. The table is bounded: past ``max_addresses`` it forgets the addresses
that have no open connection and whose bucket has refilled (they are as good as new),
then, if it must, the least recently seen ones.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from keymgmt_proto import Admission, FrameType, TokenBucket

__all__ = ["AddressLimits", "address_key"]


def address_key(host: str) -> str:
    """The key connections from ``host`` are counted under (see the module docstring)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host  # not an IP address (a Unix socket, a test stream): count it as given
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


class _BucketAdmission:
    """An address's bucket as a connection's Admission, refilled on the limits' clock."""

    __slots__ = ("_bucket", "_clock")

    def __init__(self, bucket: TokenBucket, clock: Callable[[], float]) -> None:
        self._bucket = bucket
        self._clock = clock

    def admit(self, frame_type: FrameType, now: float) -> bool:
        return self._bucket.admit(frame_type, self._clock())

    def refund(self, frame_type: FrameType, now: float) -> None:
        self._bucket.refund(frame_type, self._clock())


@dataclass(slots=True)
class _Entry:
    connections: int
    bucket: TokenBucket


class AddressLimits:
    """Connection counts and handshake rate per client address, bounded in memory."""

    def __init__(
        self,
        *,
        max_connections_per_address: int = 64,
        rate: float = 20.0,
        burst: float = 100.0,
        max_addresses: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_connections_per_address < 1 or max_addresses < 1:
            raise ValueError("max_connections_per_address and max_addresses must be at least 1")
        TokenBucket(rate, burst)  # validates both
        self.max_connections_per_address = max_connections_per_address
        self.rate = rate
        self.burst = burst
        self.max_addresses = max_addresses
        #: Buckets refill on this clock, not on the wall clock the sessions use: a wall clock
        #: stepped back (NTP) would stop every refill for as long.
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<AddressLimits {len(self._entries)} addresses>"

    def _entry(self, key: str, now: float) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            # Make room first: pruning after the insert could forget this very entry (it
            # is as good as new), and the connection about to be counted on it with it.
            self._prune(now)
            entry = self._entries[key] = _Entry(0, TokenBucket(self.rate, self.burst))
        else:
            self._entries.move_to_end(key)
        return entry

    def _prune(self, now: float) -> None:
        """At the cap, forget down to 90% of it in one pass (amortised O(1) per address):
        first the addresses as good as new, then the least recently seen without a
        connection. Addresses with open connections stay (there are at most as many as the
        server's connection limit, far below the cap)."""
        if len(self._entries) < self.max_addresses:
            return
        target = int(self.max_addresses * 0.9)
        for key, entry in list(self._entries.items()):
            if len(self._entries) <= target:
                return
            if entry.connections == 0 and entry.bucket.tokens(now) >= entry.bucket.burst:
                del self._entries[key]
        for key, entry in list(self._entries.items()):
            if len(self._entries) <= target:
                return
            if entry.connections == 0:
                del self._entries[key]

    def open(self, key: str) -> Admission | None:
        """A connection from ``key`` arrives: the admission its connection's core asks (the
        address's bucket, on this object's clock), or None if the address already has
        ``max_connections_per_address`` open (refuse the connection)."""
        entry = self._entry(key, self.clock())
        if entry.connections >= self.max_connections_per_address:
            return None
        entry.connections += 1
        return _BucketAdmission(entry.bucket, self.clock)

    def close(self, key: str) -> None:
        """A connection from ``key`` that :meth:`open` admitted has ended."""
        entry = self._entries.get(key)
        if entry is not None and entry.connections > 0:
            entry.connections -= 1

    def connections(self, key: str) -> int:
        """Open connections counted for ``key``."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry.connections
