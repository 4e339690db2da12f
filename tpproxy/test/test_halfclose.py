"""
Tests for L{tpproxy.transports.tls.HalfCloseTLSProtocol}: TLS half-close (a
C{close_notify} in one direction) over real TLS in memory.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tpproxy.service import makeServerTLS
from tpproxy.testing import TestPKI
from tpproxy.transports.tls import HalfCloseTLSProtocol, TLSFactory, clientTLS


@implementer(IHandshakeListener)
class Plain(Protocol):
    """
    An application that does not know half-close; logs what happens to it.
    """

    handshakeDone = False

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connectionLost(self, reason: Failure) -> None:
        self.events.append(("lost", reason.type))

    @property
    def data(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "data")

    @property
    def lost(self) -> Any:
        """
        The type of the reason the connection was lost, or L{None}.
        """
        reasons = [e[1] for e in self.events if e[0] == "lost"]
        assert len(reasons) <= 1, self.events
        return reasons[0] if reasons else None

    @property
    def eofs(self) -> int:
        return sum(1 for e in self.events if e[0] == "eof")


@implementer(IHalfCloseableProtocol)
class HalfCloser(Plain):
    """
    An application that knows half-close.
    """

    def readConnectionLost(self) -> None:
        self.events.append(("eof",))

    def writeConnectionLost(self) -> None:
        self.events.append(("writeLost",))


class HalfCloseTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.clock = Clock()
        self.serverTLS = makeServerTLS(self.pki.serverConfig())
        issued = self.pki.ca.issue("alice", client=True)
        self.clientOptions = clientTLS("localhost", [self.pki.ca.cert], [issued.cert], issued.key)

    def connect(self, server: Protocol, client: Protocol, greet: bool = True) -> IOPump:
        serverFactory = TLSFactory(self.serverTLS, False, Factory.forProtocol(lambda: server), clock=self.clock)
        clientFactory = TLSFactory(self.clientOptions, True, Factory.forProtocol(lambda: client), clock=self.clock)
        self.serverTLSProtocol = serverFactory.buildProtocol(None)
        self.clientTLSProtocol = clientFactory.buildProtocol(None)
        self.assertIsInstance(self.serverTLSProtocol, HalfCloseTLSProtocol)
        self.assertIsInstance(self.clientTLSProtocol, HalfCloseTLSProtocol)
        self.serverIO = FakeTransport(self.serverTLSProtocol, True)
        self.clientIO = FakeTransport(self.clientTLSProtocol, False)
        pump = connect(self.serverTLSProtocol, self.serverIO, self.clientTLSProtocol, self.clientIO, greet=greet, clock=self.clock)
        if greet:
            self.assertTrue(server.handshakeDone)
            self.assertTrue(client.handshakeDone)
        return pump

    def test_clientHalfClose(self) -> None:
        """
        The client's C{loseWriteConnection} is the server's
        C{readConnectionLost}; the server can still write, the client reads
        it; then the server's C{loseWriteConnection} closes both
        connections cleanly.
        """
        server, client = HalfCloser(), HalfCloser()
        pump = self.connect(server, client)
        client.transport.write(b"request")
        pump.flush()
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(server.events, [("data", b"request"), ("eof",)])
        self.assertIsNone(client.lost)
        self.assertFalse(self.serverIO.disconnecting)
        self.assertFalse(self.clientIO.disconnecting)

        server.transport.write(b"response")
        pump.flush()
        self.assertEqual(client.data, b"response")
        self.assertIsNone(client.lost)
        self.assertIsNone(server.lost)

        server.transport.loseWriteConnection()
        pump.flush()
        self.assertIs(server.lost, error.ConnectionDone)
        self.assertIs(client.lost, error.ConnectionDone)
        self.assertTrue(self.serverIO.disconnected)
        self.assertTrue(self.clientIO.disconnected)

    def test_serverHalfClose(self) -> None:
        """
        The same the other way round.
        """
        server, client = HalfCloser(), HalfCloser()
        pump = self.connect(server, client)
        server.transport.write(b"banner")
        pump.flush()
        server.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(client.events, [("data", b"banner"), ("eof",)])
        self.assertIsNone(server.lost)

        client.transport.write(b"still talking")
        pump.flush()
        self.assertEqual(server.data, b"still talking")

        client.transport.loseWriteConnection()
        pump.flush()
        self.assertIs(server.lost, error.ConnectionDone)
        self.assertIs(client.lost, error.ConnectionDone)
        self.assertEqual(client.eofs, 1)

    def test_bothHalfCloseAtOnce(self) -> None:
        """
        Both sides half-closing in the same turn close the connection.
        """
        server, client = HalfCloser(), HalfCloser()
        pump = self.connect(server, client)
        client.transport.loseWriteConnection()
        server.transport.loseWriteConnection()
        pump.flush()
        self.assertIs(server.lost, error.ConnectionDone)
        self.assertIs(client.lost, error.ConnectionDone)

    def test_notHalfCloseable(self) -> None:
        """
        An application that is not an L{IHalfCloseableProtocol} has its
        connection closed by the peer's C{close_notify}, as with stock
        Twisted.
        """
        server, client = Plain(), HalfCloser()
        pump = self.connect(server, client)
        client.transport.write(b"bye")
        pump.flush()
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(server.events, [("data", b"bye"), ("lost", error.ConnectionDone)])
        self.assertIs(client.lost, error.ConnectionDone)
        self.assertEqual(client.eofs, 0)

    def test_stockLoseConnection(self) -> None:
        """
        Between applications that do not know half-close, C{loseConnection}
        closes both sides, as with stock Twisted.
        """
        server, client = Plain(), Plain()
        pump = self.connect(server, client)
        client.transport.write(b"x")
        client.transport.loseConnection()
        pump.flush()
        self.assertEqual(server.events, [("data", b"x"), ("lost", error.ConnectionDone)])
        self.assertEqual(client.events, [("lost", error.ConnectionDone)])

    def test_peerLoseConnectionIsEOF(self) -> None:
        """
        On the wire a C{loseConnection} is a C{close_notify} like a
        C{loseWriteConnection}: a half-closeable peer reads EOF, and the
        connection ends when it closes too.
        """
        server, client = HalfCloser(), Plain()
        pump = self.connect(server, client)
        client.transport.write(b"x")
        client.transport.loseConnection()
        pump.flush()
        self.assertEqual(server.events, [("data", b"x"), ("eof",)])
        self.assertIsNone(client.lost)
        server.transport.loseConnection()
        pump.flush()
        self.assertIs(server.lost, error.ConnectionDone)
        self.assertIs(client.lost, error.ConnectionDone)

    def test_loseConnectionAfterPeerHalfClose(self) -> None:
        """
        After reading EOF, a full close from the application closes both
        sides.
        """
        server, client = HalfCloser(), HalfCloser()
        pump = self.connect(server, client)
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(server.eofs, 1)
        server.transport.write(b"last")
        server.transport.loseConnection()
        pump.flush()
        self.assertEqual(client.data, b"last")
        self.assertIs(server.lost, error.ConnectionDone)
        self.assertIs(client.lost, error.ConnectionDone)

    def test_writesAfterLoseWriteConnectionDropped(self) -> None:
        """
        Bytes written after C{loseWriteConnection} are dropped; the
        connection stays up and the other direction still works.
        """
        server, client = HalfCloser(), HalfCloser()
        pump = self.connect(server, client)
        client.transport.loseWriteConnection()
        pump.flush()
        client.transport.write(b"too late")
        client.transport.writeSequence([b"also ", b"late"])
        pump.flush()
        self.assertEqual(server.events, [("eof",)])
        self.assertIsNone(client.lost)
        self.assertIsNone(server.lost)
        server.transport.write(b"reply")
        pump.flush()
        self.assertEqual(client.data, b"reply")
        self.assertIsNone(client.lost)

    def test_loseWriteConnectionTwice(self) -> None:
        """
        A second C{loseWriteConnection} does nothing more.
        """
        server, client = HalfCloser(), HalfCloser()
        pump = self.connect(server, client)
        client.transport.loseWriteConnection()
        client.transport.loseWriteConnection()
        pump.flush()
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(server.events, [("eof",)])
        self.assertIsNone(client.lost)

    def test_writeThenLoseWriteConnection(self) -> None:
        """
        Bytes written in the same turn as C{loseWriteConnection} (still in
        the write aggregator) are sent before the C{close_notify}.

        Regression (was a bug in tpproxy/tls.py, HalfCloseTLSProtocol.loseWriteConnection): it
        sets C{_writeEOF} and then flushes the aggregator, whose bytes
        C{_write} then drops; the peer reads EOF and not the bytes.
        """
        server, client = HalfCloser(), HalfCloser()
        pump = self.connect(server, client)
        client.transport.write(b"request")
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(server.events, [("data", b"request"), ("eof",)])

    def test_loseWriteConnectionBeforeHandshakeWithData(self) -> None:
        """
        C{loseWriteConnection} before the handshake completes, with bytes
        already buffered for after the handshake: the bytes and then the
        C{close_notify} are sent once the handshake is done, and the
        connection stays half-open.
        """
        server, client = HalfCloser(), HalfCloser()
        pump = self.connect(server, client, greet=False)
        client.transport.write(b"early")
        self.clock.advance(0)
        self.assertFalse(self.clientTLSProtocol._handshakeDone)
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertTrue(client.handshakeDone)
        self.assertEqual(server.events, [("data", b"early"), ("eof",)])
        server.transport.write(b"answer")
        pump.flush()
        self.assertEqual(client.data, b"answer")
        self.assertIsNone(client.lost)

    def test_loseWriteConnectionBeforeHandshakeSameTurn(self) -> None:
        """
        Likewise when the bytes were written in the same turn (still in the
        write aggregator).

        Regression (was a bug in tpproxy/tls.py, HalfCloseTLSProtocol.loseWriteConnection): same
        cause as L{test_writeThenLoseWriteConnection}: the bytes are dropped.
        """
        server, client = HalfCloser(), HalfCloser()
        pump = self.connect(server, client, greet=False)
        client.transport.write(b"early")
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(server.events, [("data", b"early"), ("eof",)])

    def test_loseWriteConnectionBeforeHandshake(self) -> None:
        """
        C{loseWriteConnection} before the handshake completes, with nothing
        written: the C{close_notify} is sent after the handshake.

        Regression (was a bug in tpproxy/tls.py, HalfCloseTLSProtocol): the pending
        C{close_notify} is only sent from C{_unbufferPendingWrites}, which
        L{TLSMemoryBIOProtocol.dataReceived} calls only when application
        bytes are buffered; with none, the C{close_notify} is never sent and
        the peer never reads EOF.
        """
        server, client = HalfCloser(), HalfCloser()
        pump = self.connect(server, client, greet=False)
        self.assertFalse(self.clientTLSProtocol._handshakeDone)
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertTrue(server.handshakeDone)
        self.assertEqual(server.events, [("eof",)])
        self.assertIsNone(client.lost)
