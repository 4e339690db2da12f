# -*- test-case-name: tpproxy.test.test_limits -*-
"""
Bounds on what unauthenticated peers can make TP hold (docs/hardening.md):
source prefixes and counters of half-open connections, shared by the TLS
and QUIC listeners.  Sans-IO: no reactor, no sockets.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Any

from twisted.internet.interfaces import IReactorTime


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


class HalfOpenPlace:
    """
    One connection's place in a L{HalfOpenCounter}: given back once, by
    whichever comes first of its handshake completing and its end.
    """

    __slots__ = ("counter", "prefix", "held")

    def __init__(self, counter: HalfOpenCounter, prefix: str) -> None:
        self.counter = counter
        self.prefix = prefix
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.counter.release(self.prefix)


def holdPlace(protocol: Any, place: HalfOpenPlace) -> None:
    """
    Tie C{place} to C{protocol}, the protocol a TCP transport delivers to:
    it is released when the connection ends (and, for TP's TLS protocol,
    when its handshake completes: L{tpproxy.transports.tls.HalfCloseTLSProtocol}).
    """
    protocol.tpHalfOpen = place
    lost = protocol.connectionLost

    def connectionLost(reason: Any) -> None:
        place.release()
        lost(reason)

    protocol.connectionLost = connectionLost


class Held:
    """
    The protocol of a connection over a half-open cap: TP reads nothing from
    it, makes no TLS state for it, and closes it after C{holdFor} seconds,
    (up to half as long again), as it would close an unfinished handshake.  Holding, rather than closing
    at once, keeps a flooder that re-opens whatever TP closes from turning
    the cap into a connect/close storm that fills the listen queue ahead of
    real clients.
    """

    def __init__(self, gate: HalfOpenGate) -> None:
        self.gate = gate
        self.transport: Any = None
        self.timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        transport.pauseProducing()
        # Spread over half the hold time again: a flood held together
        # would otherwise be let go together, and come back together.
        self.timer = self.gate.clock.callLater(self.gate.holdFor * (1 + 0.5 * random.random()), transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        self.gate.held -= 1
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class HalfOpenGate:
    """
    Wraps a listening factory: a connection from a source prefix (or over
    all) that has as many connections still in their handshake as the caps
    allow gets no TLS state.  It is held, unread, for C{holdFor} seconds
    (L{Held}) while fewer than C{maxHeld} are held, else closed at accept.

    @param wrappedFactory: the factory of the port (TP's TLS factory, or
        its router when the port is shared).
    """

    def __init__(
        self, wrappedFactory: Any, counter: HalfOpenCounter, clock: IReactorTime, logger: Any, holdFor: float = 10.0, maxHeld: int = 0
    ) -> None:
        self.wrappedFactory = wrappedFactory
        self.counter = counter
        self.clock = clock
        self.log = logger
        self.holdFor = holdFor
        self.maxHeld = maxHeld
        self.held = 0
        self.refused = 0
        self._refusals = RateLimitedLog()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrappedFactory, name)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def startFactory(self) -> None:
        self.wrappedFactory.startFactory()

    def stopFactory(self) -> None:
        self.wrappedFactory.stopFactory()

    def buildProtocol(self, addr: Any) -> Any:
        prefix = sourcePrefix(getattr(addr, "host", str(addr)))
        reason = self.counter.admit(prefix)
        if reason is not None:
            self.refused += 1
            hold = self.held < self.maxHeld
            count = self._refusals.due(self.clock.seconds())
            if count is not None:
                self.log.warn(
                    "{count} new connection(s) got no TLS: {reason}; {what}",
                    count=count,
                    reason=reason,
                    what=f"held unread for {self.holdFor:g} s ({self.held + 1} held)" if hold else "closed at accept (too many held)",
                )
            if not hold:
                return None
            self.held += 1
            return Held(self)
        place = HalfOpenPlace(self.counter, prefix)
        try:
            protocol = self.wrappedFactory.buildProtocol(addr)
        except BaseException:
            place.release()
            raise
        if protocol is None:
            place.release()
            return None
        holdPlace(protocol, place)
        return protocol


def raiseFileLimit() -> tuple[int, int, int]:
    """
    Raise the soft limit of open files to the hard limit (a TLS tunnel
    takes two descriptors, a flood of unfinished handshakes one each).

    @return: the soft limit before, after, and the hard limit.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    else:
        target = soft
    return soft, target, hard
