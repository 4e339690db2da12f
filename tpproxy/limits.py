# -*- test-case-name: tpproxy.test.test_limits -*-
"""
Bounds on what unauthenticated peers can make TP hold (docs/hardening.md):
source prefixes and counters of half-open connections, shared by the TLS
and QUIC listeners.  Sans-IO: no reactor, no sockets.
"""

from __future__ import annotations

import ipaddress


def sourcePrefix(host: str) -> str:
    """
    The source prefix a peer address counts against: the address itself for
    IPv4 (/32), its /64 for IPv6, an IPv4-mapped IPv6 address as the IPv4
    address it maps.  A string that is not an IP address (a UNIX socket
    path, say) is its own prefix.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class HalfOpenCounter:
    """
    Counts half-open connections, in all and per source prefix, against two
    caps.  L{admit} takes a place or says why there is none; L{release}
    gives it back.  O(1) per call; prefixes with no connection are not kept.
    """

    def __init__(self, total: int, perSource: int) -> None:
        self.total = total
        self.perSource = perSource
        self.count = 0
        self.bySource: dict[str, int] = {}

    def refusal(self, prefix: str) -> str | None:
        """
        Why a new half-open connection from C{prefix} would be refused now,
        or C{None}.
        """
        if self.count >= self.total:
            return f"too many unfinished handshakes ({self.total})"
        if self.bySource.get(prefix, 0) >= self.perSource:
            return f"too many unfinished handshakes from {prefix} ({self.perSource})"
        return None

    def admit(self, prefix: str) -> str | None:
        """
        Take a place for a half-open connection from C{prefix}: C{None} if
        taken, else the reason (and nothing is counted).
        """
        reason = self.refusal(prefix)
        if reason is None:
            self.count += 1
            self.bySource[prefix] = self.bySource.get(prefix, 0) + 1
        return reason

    def release(self, prefix: str) -> None:
        """
        Give back a place taken by L{admit} (call once per place).
        """
        left = self.bySource.get(prefix, 0) - 1
        if left < 0:
            raise ValueError(f"release of {prefix} without a matching admit")
        if left:
            self.bySource[prefix] = left
        else:
            del self.bySource[prefix]
        self.count -= 1


class TokenBucket:
    """
    At most C{rate} events a second on average, C{burst} at once: for
    answers TP sends to packets it cannot authenticate (QUIC stateless
    resets), so that TP is no reflector.  The caller passes the time.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last: float | None = None

    def take(self, now: float) -> bool:
        """
        Spend one token if there is one.
        """
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class RateLimitedLog:
    """
    One log line per C{interval} for a kind of event that a flood makes
    by the thousand: the first at once, then a count of the rest.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.suppressed = 0
        self.last: float | None = None

    def due(self, now: float) -> int | None:
        """
        Record one event: return how many events to report now (this one
        and those suppressed since the last report), or C{None} to stay
        quiet.
        """
        if self.last is not None and now - self.last < self.interval:
            self.suppressed += 1
            return None
        count, self.suppressed, self.last = self.suppressed + 1, 0, now
        return count
