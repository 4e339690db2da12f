# -*- test-case-name: tpproxy.test.test_memory -*-
"""
Giving memory back after a wave of connections: CPython and OpenSSL free
per-connection memory into glibc's heap, which keeps it (RSS stays at the
peak).  C{malloc_trim(0)} returns the free pages to the system; it costs a
few milliseconds per hundred MB, so TP calls it only after a wave has
closed (docs/hardening.md), never on every close.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable

from twisted.application import service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

#: How often the number of live connections is looked at, in seconds.
CHECK_INTERVAL = 10.0
#: A wave: at least this many connections, and a quarter of the peak since
#: the last trim, have closed.
MIN_WAVE = 256


def glibcTrim() -> Callable[[], int] | None:
    """
    glibc's C{malloc_trim(0)} as a function, or C{None} where there is no
    such function (musl, macOS).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: int(function(0))


class MemoryTrimmer(service.Service):
    """
    Every C{interval} seconds, look at how many connections are live; when
    a wave has closed since the last trim, trim.

    @param live: how many connections are live now.
    @param trim: returns memory to the system (default: L{glibcTrim});
        with none, the service does nothing.
    """

    def __init__(
        self,
        clock: IReactorTime,
        live: Callable[[], int],
        trim: Callable[[], int] | None = None,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self.clock = clock
        self.live = live
        self.trim = trim if trim is not None else glibcTrim()
        self.interval = interval
        self.peak = 0
        self.trims = 0
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self.trim is None:
            log.info("No malloc_trim here: memory freed after a wave of connections stays with TP")
            return
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self) -> None:
        now = self.live()
        self.peak = max(self.peak, now)
        closed = self.peak - now
        if closed >= max(MIN_WAVE, self.peak // 4):
            self.trim()  # type: ignore[misc]  (the loop runs only with one)
            self.trims += 1
            log.debug("{closed} connections closed since the peak of {peak}: returned free memory to the system", closed=closed, peak=self.peak)
            self.peak = now
