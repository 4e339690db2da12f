"""
Tests for L{tpproxy.control}: the signalling connection's keepalive and
events, on a L{Clock}, with no transport.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tpproxy.control import ControlLoop, IControlEnd, LoopState
from tpproxy.machine import IllegalTransition
from tpproxy.wire import HEADER, FrameDecoder, WireError, encodeEvent, encodeFrame


@implementer(IControlEnd)
class RecordingEnd:
    """
    An end that records what the loop asks of it; C{stopOnEvent} stops the
    loop from inside an event, as an end closing its connection does.
    """

    loop: ControlLoop | None = None
    stopOnEvent = False

    def __init__(self) -> None:
        self.written = b""
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.silent: list[float] = []
        self.malformed: list[WireError] = []

    def writeControl(self, data: bytes) -> None:
        self.written += data

    def controlEvent(self, event: str, fields: dict[str, Any]) -> None:
        self.events.append((event, fields))
        if self.stopOnEvent and self.loop is not None:
            self.loop.stop()

    def controlSilent(self, seconds: float) -> None:
        self.silent.append(seconds)

    def controlMalformed(self, error: WireError) -> None:
        self.malformed.append(error)

    def sent(self) -> list[str]:
        decoder = FrameDecoder()
        decoder.feed(self.written)
        names = []
        while (frame := decoder.nextFrame()) is not None:
            names.append(frame["event"])
        return names


class ControlLoopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.end = RecordingEnd()
        self.loop = ControlLoop(self.clock, 10, self.end)
        self.end.loop = self.loop

    def test_interface(self) -> None:
        """
        The test end provides L{IControlEnd}.
        """
        self.assertTrue(verifyObject(IControlEnd, self.end))

    def test_idleDoesNothing(self) -> None:
        """
        Before L{ControlLoop.start}, no timer runs.
        """
        self.assertIs(self.loop.state, LoopState.IDLE)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pingsEveryKeepalive(self) -> None:
        """
        A running loop sends C{ping} every keepalive period.
        """
        self.loop.start()
        self.clock.advance(10)
        self.assertEqual(self.end.sent(), ["ping"])
        self.loop.feed(encodeEvent("pong"))
        self.clock.advance(10)
        self.assertEqual(self.end.sent(), ["ping", "ping"])

    def test_pingAnswered(self) -> None:
        """
        A C{ping} from the peer is answered with a C{pong} at once, and is
        not passed on as an event.
        """
        self.loop.start()
        self.loop.feed(encodeEvent("ping"))
        self.assertEqual(self.end.sent(), ["pong"])
        self.assertEqual(self.end.events, [])

    def test_silentPeer(self) -> None:
        """
        Three keepalive periods without a frame: the end is told, the loop
        stops, and no timer is left.
        """
        self.loop.start()
        self.clock.advance(29.9)
        self.assertEqual(self.end.silent, [])
        self.clock.advance(0.1)
        self.assertEqual(self.end.silent, [30])
        self.assertIs(self.loop.state, LoopState.STOPPED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_anyFrameIsLife(self) -> None:
        """
        Each valid frame (a C{pong} here) moves the deadline to three
        periods after it.
        """
        self.loop.start()
        self.clock.advance(25)
        self.loop.feed(encodeEvent("pong"))
        self.clock.advance(29)
        self.assertEqual(self.end.silent, [])
        self.clock.advance(1)
        self.assertEqual(self.end.silent, [30])

    def test_eventsPassedOn(self) -> None:
        """
        Other events, known or not, go to the end with their fields, in
        order, also when several arrive in one read or split across reads.
        """
        self.loop.start()
        data = encodeEvent("incoming", session="s" * 16, identity=None, peer="p") + encodeEvent("later")
        self.loop.feed(data[:7])
        self.assertEqual(self.end.events, [])
        self.loop.feed(data[7:])
        self.assertEqual([e for e, _ in self.end.events], ["incoming", "later"])
        self.assertEqual(self.end.events[0][1]["session"], "s" * 16)

    def test_malformed(self) -> None:
        """
        A frame that is not a valid event stops the loop and tells the end;
        later bytes are dropped.
        """
        self.loop.start()
        self.loop.feed(encodeFrame({"event": "incoming"}))
        self.assertEqual(len(self.end.malformed), 1)
        self.assertIn("session", self.end.malformed[0].message)
        self.assertIs(self.loop.state, LoopState.STOPPED)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.loop.feed(encodeEvent("ping"))
        self.assertEqual(self.end.written, b"")

    def test_badFrame(self) -> None:
        """
        An empty frame is malformed too.
        """
        self.loop.start()
        self.loop.feed(HEADER.pack(0))
        self.assertEqual(len(self.end.malformed), 1)

    def test_stop(self) -> None:
        """
        L{ControlLoop.stop} cancels both timers; stopping again, or feeding
        a stopped loop, does nothing.
        """
        self.loop.start()
        self.loop.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.loop.stop()
        self.loop.feed(encodeEvent("ping"))
        self.assertEqual(self.end.written, b"")

    def test_stopBeforeStart(self) -> None:
        """
        A connection lost before the ServerHello stops an idle loop.
        """
        self.loop.stop()
        self.assertIs(self.loop.state, LoopState.STOPPED)

    def test_stoppedInsideEvent(self) -> None:
        """
        An end that stops the loop while handling an event gets no more
        events from the same read.
        """
        self.end.stopOnEvent = True
        self.loop.start()
        self.loop.feed(encodeEvent("a") + encodeEvent("b"))
        self.assertEqual([e for e, _ in self.end.events], ["a"])

    def test_illegal(self) -> None:
        """
        Inputs with no row raise L{IllegalTransition}: feeding an idle loop
        (bytes before the ServerHello belong to the first-frame reader),
        starting twice, starting a stopped loop.
        """
        self.assertRaises(IllegalTransition, self.loop.feed, b"")
        self.loop.start()
        self.assertRaises(IllegalTransition, self.loop.start)
        self.loop.stop()
        self.assertRaises(IllegalTransition, self.loop.start)

    def test_table(self) -> None:
        """
        Every (state, input) pair not in the table is illegal, and every
        state but IDLE is reachable.
        """
        for state in LoopState:
            for name in ControlLoop.inputs():
                loop = ControlLoop(self.clock, 10, RecordingEnd())
                loop.state = state
                if (state, name) in ControlLoop.TRANSITIONS:
                    continue
                self.assertRaises(IllegalTransition, loop._input, name)
        targets = {to for to, _ in ControlLoop.TRANSITIONS.values()}
        self.assertEqual(targets, {LoopState.RUNNING, LoopState.STOPPED})
