# -*- test-case-name: tpproxy.test.test_pmtu -*-
"""
Datagram path MTU discovery for TP's QUIC connections (RFC 8899,
packetization-layer probing), sans-IO.

QUIC starts at 1200-byte datagrams, which every path carries.  Every
packet costs aioquic the same Python work whatever its size, so a path that
carries larger datagrams moves data faster in proportion (measured in
benchmarks/README.md).  L{PathMTUSearch} decides which sizes to probe and
which size the connection uses; L{tpproxy.transports.quic.TPQuicConnection}
sends the probes (a PING padded to the probed size, outside congestion
control) and reports what became of them:

  - an acknowledged probe raises the size the connection sends;
  - a probe lost L{MAX_PROBES} times, or refused at once by the kernel
    (C{EMSGSIZE}: larger than the route's MTU, the sockets set "don't
    fragment"), ends the search at the last size that got through;
  - a new path (a client that moved) starts again from L{BASE};
  - a black hole (L{BLACK_HOLE_LOSSES} packets above L{BASE} lost in a
    row, none acknowledged between them, or L{BLACK_HOLE_TIMEOUTS} probe
    timeouts in a row: a path that stopped carrying the size found, say,
    behind a new tunnel) drops back to L{BASE} and searches again below
    the size that stopped working;
  - a finished search tries the next size up again after
    L{RAISE_INTERVAL}, as a path may have grown.

The sizes tried are common path MTUs less the IP and UDP headers
(L{LADDER}) up to the connection's maximum, so a search takes a handful of
round trips; sizes between two rungs are not tried (a path with a
4000-byte MTU gets 1472).
"""

from __future__ import annotations

#: The size every path carries (RFC 9000 section 14).
BASE = 1200
#: Common path MTUs less IP and UDP headers: IPv6 minimum (1280), Ethernet
#: (1500, IPv6 and IPv4), jumbo frames (9000, IPv6 and IPv4), and a
#: loopback-sized rung.
LADDER = (1232, 1452, 1472, 8952, 8972, 16384)
#: The largest datagram TP sends by default: beyond it aioquic gains
#: little and a lost datagram costs more (benchmarks/README.md).
DEFAULT_MAX = 16384
#: Probes of one size lost before the search settles below it.
MAX_PROBES = 3
#: Packets above BASE lost in a row, none acknowledged between them, that
#: mean the path no longer carries the size in use.
BLACK_HOLE_LOSSES = 16
#: Probe timeouts in a row (nothing acknowledged) that mean the same.
BLACK_HOLE_TIMEOUTS = 3
#: Seconds after a finished search before the next size up is tried again.
RAISE_INTERVAL = 600.0


def _rungBelow(size: int) -> int:
    """
    The largest size of the ladder (or L{BASE}) below C{size}: where a
    search goes on after C{size} stopped getting through (never C{size - 1}:
    a search would then creep down byte by byte).
    """
    return max([BASE] + [rung for rung in LADDER if rung < size])


class PathMTUSearch:
    """
    The search for one connection's path.

    @ivar current: the datagram size the connection sends now.
    @ivar maximum: the largest size this search may reach.
    """

    def __init__(self, maximum: int = DEFAULT_MAX) -> None:
        self.configured = max(BASE, maximum)
        self.maximum = self.configured
        self.current = BASE
        self.outstanding: int | None = None
        #: When the outstanding probe counts as lost if nothing acknowledged it.
        self.deadline: float | None = None
        self.failures = 0
        self.doneAt: float | None = None
        self._ceiling: int | None = None
        self._largeLost = 0
        self.blackHoles = 0
        #: Which search a probe belongs to: a new path starts another, and
        #: the fate of the old path's probes says nothing about it.
        self.generation = 0

    def _candidates(self) -> list[int]:
        top = self.maximum if self._ceiling is None else min(self.maximum, self._ceiling - 1)
        rungs = [size for size in LADDER if self.current < size <= top]
        if self.current < self.maximum <= top and self.maximum not in rungs:
            # A maximum off the ladder is its last rung (never a size just
            # below one that failed: that would creep down byte by byte).
            rungs.append(self.maximum)
        return sorted(rungs)

    def nextProbe(self, now: float, timeout: float = 1.0) -> int | None:
        """
        The size to probe now, or L{None} (a probe is outstanding, or the
        search is over until L{RAISE_INTERVAL} has passed).  A probe not
        acknowledged within C{timeout} seconds is lost (L{expire}).
        """
        if self.outstanding is not None:
            return None
        if self.doneAt is not None:
            if now - self.doneAt < RAISE_INTERVAL:
                return None
            # Try the next size up again: the path may have grown.
            self.doneAt = None
            self._ceiling = None
            self.maximum = self.configured
        candidates = self._candidates()
        if not candidates:
            self.doneAt = now
            return None
        self.outstanding = candidates[0]
        self.deadline = now + timeout
        return self.outstanding

    def expire(self, now: float) -> None:
        """
        The outstanding probe is lost if its deadline has passed.
        """
        if self.outstanding is not None and self.deadline is not None and now >= self.deadline:
            self.lost(self.outstanding)

    def acknowledged(self, size: int) -> None:
        """
        The probe of C{size} came back acknowledged: the path carries it.
        """
        if size != self.outstanding:
            return
        self.outstanding = self.deadline = None
        self.failures = 0
        self.current = max(self.current, size)
        self._largeLost = 0

    def lost(self, size: int) -> None:
        """
        The probe of C{size} was declared lost.
        """
        if size != self.outstanding:
            return
        self.outstanding = self.deadline = None
        self.failures += 1
        if self.failures >= MAX_PROBES:
            self._settle(size)

    def tooBig(self, size: int) -> None:
        """
        The kernel refused to send a datagram of C{size} (C{EMSGSIZE}).
        """
        if self.outstanding is not None and size >= self.outstanding:
            self.outstanding = self.deadline = None
        if size > self.current:
            self._settle(size)
        else:
            # The size in use no longer fits the route: start again below it.
            self.maximum = _rungBelow(size)
            self.restart()

    def _settle(self, failedSize: int) -> None:
        # Nothing at or above failedSize is tried again in this search (the
        # next nextProbe() finds no candidate and ends it).
        self.failures = 0
        self._ceiling = failedSize if self._ceiling is None else min(self._ceiling, failedSize)

    def restart(self) -> None:
        """
        Start again from L{BASE} (a new path).
        """
        self.current = BASE
        self.outstanding = self.deadline = None
        self.failures = 0
        self.doneAt = None
        self._ceiling = None
        self._largeLost = 0
        self.generation += 1

    def newPath(self) -> None:
        """
        The connection moved to a new path: nothing found on the old one
        holds.
        """
        self.maximum = self.configured
        self.restart()

    def packetAcknowledged(self, size: int) -> None:
        """
        A packet of C{size} bytes (not a probe) was acknowledged.
        """
        if size > BASE:
            self._largeLost = 0

    def packetLost(self, size: int) -> bool:
        """
        A packet of C{size} bytes (not a probe) was declared lost.  True if
        that makes a black hole: the search has then dropped back to
        L{BASE}, below the size that stopped working.
        """
        if not BASE < size <= self.current:
            # Small, or sent at a larger size before a fall-back.
            return False
        self._largeLost += 1
        if self._largeLost < BLACK_HOLE_LOSSES:
            return False
        self.blackHole()
        return True

    def timeouts(self, count: int) -> bool:
        """
        The connection's probe timeout fired C{count} times in a row (no
        acknowledgement at all).  True if that makes a black hole: a path
        that stopped carrying the size in use loses every full packet, so
        losses may never be declared one by one before the idle timeout.
        """
        if count < BLACK_HOLE_TIMEOUTS or self.current <= BASE:
            return False
        self.blackHole()
        return True

    def blackHole(self) -> None:
        """
        Back to L{BASE}, and search again below the size that stopped
        getting through.
        """
        self.blackHoles += 1
        self.maximum = _rungBelow(self.current)
        self.restart()
