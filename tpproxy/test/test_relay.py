"""
Tests for L{tpproxy.protocols.relay}: L{RelayEnd} and L{splice}, over
L{StringTransport}s.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tpproxy.protocols.relay import RelayEnd, splice


class RecordingTransport(StringTransport):
    """
    A L{StringTransport} with half-close that logs writes, EOFs and closes
    in order.
    """

    writeClosed = False

    def __init__(self) -> None:
        super().__init__(lenient=True)
        self.log: list[tuple[Any, ...]] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        self.log.append(("write", data))

    def loseWriteConnection(self) -> None:
        self.writeClosed = True
        self.log.append(("eof",))

    def loseConnection(self) -> None:
        super().loseConnection()
        self.log.append(("close",))

    def unregisterProducer(self) -> None:
        # Like FileDescriptor.unregisterProducer (and TLS's), unlike
        # StringTransport's: unregistering when none is registered is
        # harmless.
        self.producer = None
        self.streaming = None


class Greeter(RelayEnd):
    """
    A L{RelayEnd} that keeps what it reads before the splice, the way
    TP's server protocol keeps the bytes after a hello.
    """

    def __init__(self) -> None:
        self.early = b""
        self.earlyEOFs = 0

    def preSpliceData(self, data: bytes) -> None:
        self.early += data

    def preSpliceEOF(self) -> None:
        self.earlyEOFs += 1


def connected(end: RelayEnd) -> RecordingTransport:
    transport = RecordingTransport()
    end.makeConnection(transport)
    return transport


class RelayTestsMixin:
    def setUp(self) -> None:
        self.a = Greeter()
        self.b = Greeter()
        self.ta = connected(self.a)
        self.tb = connected(self.b)

    def splice(self, fromA: bytes = b"", fromB: bytes = b"") -> None:
        splice(self.a, self.b, fromA=fromA, fromB=fromB)


class SpliceTests(RelayTestsMixin, SynchronousTestCase):
    def test_interface(self) -> None:
        """
        A L{RelayEnd} can be told about half-close.
        """
        self.assertTrue(verifyObject(IHalfCloseableProtocol, RelayEnd()))

    def test_peers(self) -> None:
        self.splice()
        self.assertIs(self.a.peer, self.b)
        self.assertIs(self.b.peer, self.a)

    def test_producers(self) -> None:
        """
        Each transport is registered as the streaming producer of the other,
        so a slow reader on one side pauses the other.
        """
        self.splice()
        self.assertIs(self.ta.producer, self.tb)
        self.assertIs(self.tb.producer, self.ta)
        self.assertTrue(self.ta.streaming)
        self.assertTrue(self.tb.streaming)

    def test_forwardAToB(self) -> None:
        self.splice()
        self.a.dataReceived(b"hello ")
        self.a.dataReceived(b"world")
        self.assertEqual(self.tb.value(), b"hello world")
        self.assertEqual(self.ta.value(), b"")
        self.assertEqual((self.a.bytesIn, self.b.bytesIn), (11, 0))

    def test_forwardBToA(self) -> None:
        self.splice()
        self.b.dataReceived(b"x" * 1000)
        self.assertEqual(self.ta.value(), b"x" * 1000)
        self.assertEqual(self.tb.value(), b"")
        self.assertEqual((self.a.bytesIn, self.b.bytesIn), (0, 1000))

    def test_afterSpliceNotPreSplice(self) -> None:
        """
        Once spliced, bytes go to the peer and not to L{preSpliceData}.
        """
        self.splice()
        self.a.dataReceived(b"abc")
        self.assertEqual(self.a.early, b"")

    def test_noDataBeforeSplice(self) -> None:
        """
        By default a L{RelayEnd} accepts no bytes before it is spliced.
        """
        end = RelayEnd()
        connected(end)
        self.assertRaises(NotImplementedError, end.dataReceived, b"x")

    def test_eofBeforeSpliceDefault(self) -> None:
        """
        By default an EOF before the splice is kept, not an error.
        """
        end = RelayEnd()
        transport = connected(end)
        end.readConnectionLost()
        self.assertTrue(end.readClosed)
        self.assertEqual(transport.log, [])


class HalfCloseTests(RelayTestsMixin, SynchronousTestCase):
    def test_eofHalfClosesPeer(self) -> None:
        """
        EOF read from one side becomes a C{loseWriteConnection} on the other;
        the other direction stays open.
        """
        self.splice()
        self.a.readConnectionLost()
        self.assertEqual(self.tb.log, [("eof",)])
        self.assertEqual(self.ta.log, [])
        self.assertFalse(self.tb.disconnecting)
        self.assertFalse(self.ta.disconnecting)
        self.b.dataReceived(b"reply")
        self.assertEqual(self.ta.value(), b"reply")

    def test_eofUnregistersProducer(self) -> None:
        """
        After EOF from C{a}, C{a} produces nothing more for C{b}: its
        transport is no longer C{b}'s producer (a registered producer would
        hold back a TLS transport's close).  C{b} still produces for C{a}.
        """
        self.splice()
        self.a.readConnectionLost()
        self.assertIsNone(self.tb.producer)
        self.assertIs(self.ta.producer, self.tb)
        self.b.readConnectionLost()
        self.assertIsNone(self.ta.producer)

    def test_eofOtherWay(self) -> None:
        self.splice()
        self.b.readConnectionLost()
        self.assertEqual(self.ta.log, [("eof",)])
        self.assertEqual(self.tb.log, [])

    def test_bothEOFsClose(self) -> None:
        """
        When both sides have read EOF, both connections are closed.
        """
        self.splice()
        self.a.readConnectionLost()
        self.b.readConnectionLost()
        self.assertTrue(self.ta.disconnecting)
        self.assertTrue(self.tb.disconnecting)
        self.assertEqual(self.tb.log, [("eof",), ("close",)])
        self.assertEqual(self.ta.log, [("close",)])

    def test_bothEOFsOtherOrder(self) -> None:
        self.splice()
        self.b.readConnectionLost()
        self.a.readConnectionLost()
        self.assertTrue(self.ta.disconnecting)
        self.assertTrue(self.tb.disconnecting)

    def test_writeConnectionLost(self) -> None:
        """
        Our write side going away is not a reason to close anything.
        """
        self.splice()
        self.a.writeConnectionLost()
        self.assertEqual((self.ta.log, self.tb.log), ([], []))


class ConnectionLostTests(RelayTestsMixin, SynchronousTestCase):
    def test_closesPeer(self) -> None:
        """
        When one side's connection is lost, the other is closed.
        """
        self.splice()
        self.a.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(self.a.closed)
        self.assertTrue(self.tb.disconnecting)
        self.assertIsNone(self.tb.producer)
        self.assertFalse(self.ta.disconnecting)

    def test_lostAfterEOFs(self) -> None:
        """
        The ends of a splice closed by two EOFs then see their connections
        lost, and call C{onClose} once each.
        """
        closed: list[RelayEnd] = []
        self.a.onClose = self.b.onClose = lambda end, reason: closed.append(end)
        self.splice()
        self.a.readConnectionLost()
        self.b.readConnectionLost()
        self.a.connectionLost(Failure(error.ConnectionDone()))
        self.b.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.a.closed and self.b.closed)
        self.assertEqual(closed, [self.a, self.b])

    def test_closesPeerOtherWay(self) -> None:
        self.splice()
        self.b.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.ta.disconnecting)

    def test_peerAlreadyClosed(self) -> None:
        """
        A peer whose connection is already gone is not closed again.
        """
        self.splice()
        self.b.connectionLost(Failure(error.ConnectionDone()))
        self.a.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.tb.log, [])

    def test_onClose(self) -> None:
        """
        C{onClose} is called with the end and the reason.
        """
        calls: list[tuple[RelayEnd, Failure]] = []
        self.a.onClose = lambda end, reason: calls.append((end, reason))
        self.splice()
        reason = Failure(error.ConnectionLost())
        self.a.connectionLost(reason)
        self.assertEqual(calls, [(self.a, reason)])

    def test_lostBeforeSplice(self) -> None:
        """
        Connection lost before the splice: nothing to close but ourselves.
        """
        self.a.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.a.closed)
        self.assertEqual(self.tb.log, [])


class CarryOverTests(RelayTestsMixin, SynchronousTestCase):
    """
    What a side read before the splice is passed on by L{splice}.
    """

    def test_bytesFromA(self) -> None:
        """
        Bytes read from C{a} before the splice go to C{b} first, and count.
        """
        self.a.dataReceived(b"early")
        self.assertEqual(self.a.early, b"early")
        self.assertEqual(self.tb.value(), b"")
        self.splice(fromA=self.a.early)
        self.a.dataReceived(b"+late")
        self.assertEqual(self.tb.log, [("write", b"early"), ("write", b"+late")])
        self.assertEqual(self.a.bytesIn, 10)

    def test_bytesFromB(self) -> None:
        self.splice(fromB=b"banner")
        self.assertEqual(self.ta.value(), b"banner")
        self.assertEqual(self.tb.value(), b"")
        self.assertEqual(self.b.bytesIn, 6)

    def test_bytesBothWays(self) -> None:
        self.splice(fromA=b"up", fromB=b"down")
        self.assertEqual((self.tb.value(), self.ta.value()), (b"up", b"down"))
        self.assertEqual((self.a.bytesIn, self.b.bytesIn), (2, 4))

    def test_eofFromA(self) -> None:
        """
        An EOF read from C{a} before the splice becomes C{b}'s
        C{loseWriteConnection} after the bytes that preceded it.
        """
        self.a.dataReceived(b"tail")
        self.a.readConnectionLost()
        self.assertEqual(self.a.earlyEOFs, 1)
        self.assertEqual(self.tb.log, [])
        self.splice(fromA=self.a.early)
        self.assertEqual(self.tb.log, [("write", b"tail"), ("eof",)])
        self.assertEqual(self.ta.log, [])
        self.assertTrue(self.a.readClosed)
        self.assertFalse(self.tb.disconnecting)

    def test_eofFromB(self) -> None:
        self.b.readConnectionLost()
        self.splice(fromB=b"bye")
        self.assertEqual(self.ta.log, [("write", b"bye"), ("eof",)])
        self.assertEqual(self.tb.log, [])

    def test_eofFromAThenB(self) -> None:
        """
        EOF from C{a} before the splice and from C{b} after: both close.
        """
        self.a.readConnectionLost()
        self.splice()
        self.assertEqual(self.tb.log, [("eof",)])
        self.b.readConnectionLost()
        self.assertTrue(self.ta.disconnecting)
        self.assertTrue(self.tb.disconnecting)

    def test_bothEOFs(self) -> None:
        """
        Both sides read EOF before the splice: their bytes are passed on,
        then both connections close.
        """
        self.a.readConnectionLost()
        self.b.readConnectionLost()
        self.splice(fromA=b"x", fromB=b"y")
        self.assertEqual(self.tb.log[0], ("write", b"x"))
        self.assertEqual(self.ta.log[0], ("write", b"y"))
        self.assertIn(("close",), self.ta.log)
        self.assertIn(("close",), self.tb.log)
        self.assertTrue(self.a.readClosed)
        self.assertTrue(self.b.readClosed)
