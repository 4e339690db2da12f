# -*- test-case-name: tpproxy.test.test_control -*-
"""
The signalling connection's event loop, the same at both ends.

After the C{listen} hello and its ServerHello, an exposer and TP exchange
event frames (L{tpproxy.wire.encodeEvent}) on the signalling connection.
Each end sends C{ping} every C{keepalive} seconds and answers a C{ping}
with a C{pong}; any valid frame is a sign of life, and after 3 x
C{keepalive} seconds without one the end gives the connection up.  The
two ends may run different keepalives (each answers the other's pings).

L{ControlLoop} is that loop with no transport: bytes go in through
L{ControlLoop.feed}; bytes out, events, silence and malformed frames go to
an L{IControlEnd}; time comes from an injected L{IReactorTime}.  TP's
C{listen} session (L{tpproxy.protocols.sessions.ListenSession}) and
C{tp expose} (L{tpproxy.reverse.expose.ControlProtocol}) are its two ends.
"""

from __future__ import annotations

import enum
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import Interface

from tpproxy.machine import Machine
from tpproxy.wire import FrameDecoder, WireError, encodeEvent, parseEvent

#: A silent peer is given up after this many keepalive periods.
DEADLINE_PERIODS = 3


class IControlEnd(Interface):
    """
    What a L{ControlLoop} drives: one end of a signalling connection.
    """

    def writeControl(data: bytes) -> None:
        """
        Send C{data} (a whole event frame) to the peer.
        """

    def controlEvent(event: str, fields: dict[str, Any]) -> None:
        """
        The peer sent a valid event other than C{ping} and C{pong} (which
        the loop answers and counts itself); unknown events are passed on
        too, for the end to ignore.
        """

    def controlSilent(seconds: float) -> None:
        """
        Nothing was heard from the peer for C{seconds}: give it up.  The
        loop has stopped.
        """

    def controlMalformed(error: WireError) -> None:
        """
        The peer sent a frame that is not a valid event: give it up.  The
        loop has stopped.
        """


class LoopState(enum.Enum):
    IDLE = "idle"  # before the ServerHello
    RUNNING = "running"
    STOPPED = "stopped"  # stopped, silent peer, or malformed frame


class ControlLoop(Machine[LoopState]):
    """
    Keepalive and events of one signalling connection.

    @param clock: schedules the pings and the deadline.
    @param keepalive: seconds between this end's pings; the peer is given
        up after L{DEADLINE_PERIODS} times that without a frame.
    """

    TRANSITIONS = {
        (LoopState.IDLE, "start"): (LoopState.RUNNING, "_arm"),
        (LoopState.IDLE, "stop"): (LoopState.STOPPED, None),
        (LoopState.RUNNING, "feed"): (LoopState.RUNNING, "_read"),
        (LoopState.RUNNING, "pingDue"): (LoopState.RUNNING, "_ping"),
        (LoopState.RUNNING, "deadline"): (LoopState.STOPPED, "_silent"),
        (LoopState.RUNNING, "malformed"): (LoopState.STOPPED, "_malformed"),
        (LoopState.RUNNING, "stop"): (LoopState.STOPPED, "_cancel"),
        # Bytes read while the end closes the connection are dropped.
        (LoopState.STOPPED, "feed"): (LoopState.STOPPED, None),
        (LoopState.STOPPED, "stop"): (LoopState.STOPPED, None),
    }

    _pinger: IDelayedCall | None = None
    _deadline: IDelayedCall | None = None

    def __init__(self, clock: IReactorTime, keepalive: float, end: IControlEnd) -> None:
        self.clock = clock
        self.keepalive = keepalive
        self.end = end
        self.state = LoopState.IDLE
        self._decoder = FrameDecoder()

    @property
    def limit(self) -> float:
        """
        Seconds of silence after which the peer is given up.
        """
        return DEADLINE_PERIODS * self.keepalive

    # --- inputs ---------------------------------------------------------------

    def start(self) -> None:
        """
        The exposure is registered: start pinging and watching the peer.
        """
        self._input("start")

    def feed(self, data: bytes) -> None:
        """
        Bytes read from the signalling connection after the ServerHello.
        """
        self._input("feed", data)

    def stop(self) -> None:
        """
        The connection is gone (or going): cancel the timers.
        """
        self._input("stop")

    # --- outputs --------------------------------------------------------------

    def _arm(self) -> None:
        self._pinger = self.clock.callLater(self.keepalive, self._input, "pingDue")
        self._deadline = self.clock.callLater(self.limit, self._input, "deadline")

    def _ping(self) -> None:
        self.end.writeControl(encodeEvent("ping"))
        self._pinger = self.clock.callLater(self.keepalive, self._input, "pingDue")

    def _read(self, data: bytes) -> None:
        self._decoder.feed(data)
        while self.state is LoopState.RUNNING:
            try:
                frame = self._decoder.nextFrame()
                if frame is None:
                    return
                event, fields = parseEvent(frame)
            except WireError as e:
                self._input("malformed", e)
                return
            assert self._deadline is not None
            self._deadline.reset(self.limit)
            if event == "ping":
                self.end.writeControl(encodeEvent("pong"))
            elif event != "pong":
                self.end.controlEvent(event, fields)

    def _cancel(self) -> None:
        for call in (self._pinger, self._deadline):
            if call is not None and call.active():
                call.cancel()

    def _silent(self) -> None:
        self._cancel()
        self.end.controlSilent(self.limit)

    def _malformed(self, error: WireError) -> None:
        self._cancel()
        self.end.controlMalformed(error)
