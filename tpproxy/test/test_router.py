"""
Tests for L{tpproxy.router}: routing connections by their ClientHello, in
memory and on loopback with a real web server, curl and TLS clients.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from OpenSSL import crypto
from twisted.internet import defer, reactor, ssl, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from tpproxy.clienthello import ALERT_DECODE_ERROR, ALERT_HANDSHAKE_FAILURE, ClientHelloInfo
from tpproxy.pki import CertificateAuthority, Issued
from tpproxy.proxyproto import PROXY, SIGNATURE, ProxyInfo, parseProxyV2
from tpproxy.router import (
    BackendRelay,
    DefaultRoute,
    Refuse,
    RouterFactory,
    RouterProtocol,
    ToFactory,
    alertRecord,
    defaultRoute,
    terminateTLS,
    toBackend,
)
from tpproxy.service import makeServerFactory, makeServerTLS
from tpproxy.test.support import Echo, HashSink, freePort, requireTool, run, sha256
from tpproxy.test.test_clienthello import frame, handshakeBytes, realClientHello
from tpproxy.testing import TestPKI
from tpproxy.transports.tls import TLSFactory, clientTLS

PEER = IPv4Address("TCP", "192.0.2.7", 40001)
HOST = IPv4Address("TCP", "198.51.100.1", 443)


def routerLog(observer: EventLoggingObserver) -> list[str]:
    """
    The router's log messages, above debug level.
    """
    return [
        formatEvent(e)
        for e in observer
        if e.get("log_namespace") == "tpproxy.router" and e.get("log_level") != LogLevel.debug
    ]


class HalfCloseStringTransport(StringTransport):
    """
    A L{StringTransport} that records a half-close.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


class Recorder(Protocol):
    """
    Records what the router hands it.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def connectionMade(self) -> None:
        self.events.append(("made", self.transport))

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connectionLost(self, reason: Failure) -> None:
        self.events.append(("lost", reason.type))

    @property
    def data(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "data")


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    def readConnectionLost(self) -> None:
        self.events.append(("eof",))

    def writeConnectionLost(self) -> None:
        self.events.append(("writeLost",))


class RecorderFactory(Factory):
    def __init__(self, protocolClass: type[Recorder] = Recorder) -> None:
        self.built: list[Recorder] = []
        self.addresses: list[Any] = []
        self.protocolClass = protocolClass

    def buildProtocol(self, addr: Any) -> Recorder:
        self.addresses.append(addr)
        p = self.protocolClass()
        self.built.append(p)
        return p


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    An endpoint whose connection attempts the test completes or fails.
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, defer.Deferred[Any]]] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.attempts.append((factory, d))
        return d

    def succeed(self) -> tuple[Protocol, StringTransport]:
        factory, d = self.attempts[-1]
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8443))
        transport = HalfCloseStringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        return proto, transport


class RoutingTests(SynchronousTestCase):
    """
    The router in memory: what it reads, where it hands the connection.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.tp = RecorderFactory(HalfCloseRecorder)
        self.web = RecorderFactory()
        self.routes: list[ClientHelloInfo] = []
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        def route(info: ClientHelloInfo) -> Any:
            self.routes.append(info)
            if info.serverName == "refused.test":
                return Refuse("refused by the rule")
            if info.serverName == "broken.test":
                raise RuntimeError("rule bug")
            if "tp/1" in info.alpn:
                return ToFactory(self.tp, "tp")
            return ToFactory(self.web, "web")

        self.factory = RouterFactory(route, reactor=self.clock)

    def connect(self, factory: RouterFactory | None = None) -> tuple[RouterProtocol, StringTransport]:
        proto = (factory or self.factory).buildProtocol(PEER)
        transport = StringTransport(hostAddress=HOST, peerAddress=PEER)
        proto.makeConnection(transport)
        return proto, transport  # type: ignore[return-value]

    def test_oneByteWrites(self) -> None:
        """
        Fed one byte at a time, the router waits for the whole ClientHello,
        then hands the chosen protocol the router's transport and every
        byte, exactly once and in order; later bytes follow as they come.
        """
        hello = realClientHello(b"site.test", [b"tp/1"])
        proto, transport = self.connect()
        for i in range(len(hello) - 1):
            proto.dataReceived(hello[i : i + 1])
        self.assertEqual(self.tp.built, [])
        proto.dataReceived(hello[-1:] + b"\x14")
        for b in b"\x03\x03more":
            proto.dataReceived(bytes([b]))
        [inner] = self.tp.built
        self.assertEqual(inner.events[0], ("made", transport))
        self.assertEqual(inner.events[1], ("data", hello + b"\x14"))
        self.assertEqual(inner.data, hello + b"\x14\x03\x03more")
        self.assertEqual(self.tp.addresses, [PEER])
        self.assertEqual(self.web.built, [])
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(proto.info, self.routes[0])
        self.assertEqual((proto.info.serverName, proto.info.alpn), ("site.test", ("tp/1",)))  # type: ignore[union-attr]

    def test_reframedHello(self) -> None:
        """
        A ClientHello over many tiny records is routed too, and the records
        are passed on as they came.
        """
        hello = frame(handshakeBytes(realClientHello(b"www.test", [b"h2"])), [1, 3])
        proto, transport = self.connect()
        proto.dataReceived(hello)
        [inner] = self.web.built
        self.assertEqual(inner.data, hello)

    def test_decision(self) -> None:
        for hello, expected in (
            (realClientHello(None, [b"h2", b"tp/1"]), "tp"),
            (realClientHello(b"site.test", [b"h2", b"http/1.1"]), "web"),
            (realClientHello(None, None), "web"),
        ):
            proto, _ = self.connect()
            proto.dataReceived(hello)
            self.assertEqual(proto.route.name, expected)  # type: ignore[union-attr]

    def test_lostAndHalfClose(self) -> None:
        """
        EOF and close go to the inner protocol once it is there.
        """
        proto, transport = self.connect()
        proto.dataReceived(realClientHello(None, [b"tp/1"]))
        [inner] = self.tp.built
        proto.readConnectionLost()
        proto.writeConnectionLost()
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([e[0] for e in inner.events], ["made", "data", "eof", "writeLost", "lost"])
        self.assertFalse(transport.disconnecting)

    def test_eofWithoutHalfClose(self) -> None:
        """
        An inner protocol that does not do half-close has its connection
        closed on EOF, as the reactor would.
        """
        proto, transport = self.connect()
        proto.dataReceived(realClientHello(None, None))
        proto.readConnectionLost()
        self.assertTrue(transport.disconnecting)

    def test_plaintext(self) -> None:
        """
        HTTP on the TLS port is refused from its first byte, without an
        alert, and logged with the peer.
        """
        proto, transport = self.connect()
        proto.dataReceived(b"G")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(b"ET / HTTP/1.1\r\n")
        self.assertEqual(self.routes, [])
        [message] = routerLog(self.observer)
        self.assertIn("192.0.2.7:40001", message)
        self.assertIn("not a TLS handshake", message)

    def test_malformed(self) -> None:
        """
        A malformed ClientHello is answered with a C{decode_error} alert.
        """
        hello = bytearray(realClientHello(b"site.test", None))
        hello[5 + 4 + 2 + 32] = 33  # legacy_session_id length
        proto, transport = self.connect()
        proto.dataReceived(bytes(hello))
        self.assertEqual(transport.value(), alertRecord(ALERT_DECODE_ERROR))
        self.assertEqual(transport.value(), b"\x15\x03\x03\x00\x02\x02\x32")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.web.built, [])
        self.assertIn("legacy_session_id", routerLog(self.observer)[0])

    def test_noAlerts(self) -> None:
        proto, transport = self.connect(RouterFactory(lambda info: None, reactor=self.clock, sendAlerts=False))  # type: ignore[arg-type,return-value]
        proto.dataReceived(b"\x16\x03\x01\x00\x00")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_oversize(self) -> None:
        """
        A ClientHello over the limit is refused as soon as its handshake
        header says so.
        """
        factory = RouterFactory(self.factory.route, reactor=self.clock, limit=1000)
        proto, transport = self.connect(factory)
        proto.dataReceived(b"\x16\x03\x01\x40\x00\x01\x00\x03\xe9")
        self.assertEqual(transport.value(), alertRecord(ALERT_HANDSHAKE_FAILURE))
        self.assertTrue(transport.disconnecting)
        self.assertIn("too big", routerLog(self.observer)[0])

    def test_timeout(self) -> None:
        """
        A client that does not finish its ClientHello in time is closed.
        """
        hello = realClientHello(b"site.test", None)
        proto, transport = self.connect()
        proto.dataReceived(hello[:20])
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(hello[20:])
        self.assertEqual(self.web.built, [])
        self.assertIn("no complete ClientHello within 10 s (20 bytes)", routerLog(self.observer)[0])

    def test_timeoutConfigurable(self) -> None:
        proto, transport = self.connect(RouterFactory(self.factory.route, reactor=self.clock, timeout=2))
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_closedEarly(self) -> None:
        """
        A client that leaves before its ClientHello is complete is logged,
        and the timer is cancelled.
        """
        proto, transport = self.connect()
        proto.dataReceived(b"\x16\x03")
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIn("closed after 2 bytes", routerLog(self.observer)[0])

    def test_eofEarly(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"\x16\x03")
        proto.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertIn("EOF after 2 bytes", routerLog(self.observer)[0])

    def test_offTheDataPath(self) -> None:
        """
        After the handover, a reactor transport delivers to the chosen
        protocol directly: the router is no longer between them.
        """
        proto, transport = self.connect()
        transport.protocol = proto  # type: ignore[attr-defined]  # as a reactor's transport has
        proto.dataReceived(realClientHello(b"site.test", [b"tp/1"]))
        [inner] = self.tp.built
        self.assertIs(transport.protocol, inner)  # type: ignore[attr-defined]

    def test_emptyConnectionSilent(self) -> None:
        """
        A connection that closes without sending anything (a health check,
        a port probe) is closed without a log line above debug.
        """
        proto, transport = self.connect()
        proto.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(routerLog(self.observer), [])
        self.assertEqual(transport.value(), b"")

    def test_refuseRoute(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(realClientHello(b"refused.test", None))
        self.assertEqual(transport.value(), alertRecord(ALERT_HANDSHAKE_FAILURE))
        self.assertTrue(transport.disconnecting)
        self.assertIn("refused by the rule", routerLog(self.observer)[0])

    def test_routeRaises(self) -> None:
        """
        A route callable that fails closes this connection only.
        """
        proto, transport = self.connect()
        proto.dataReceived(realClientHello(b"broken.test", None))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_factoryRefuses(self) -> None:
        none = Factory()
        none.buildProtocol = lambda addr: None  # type: ignore[method-assign]
        factory = RouterFactory(lambda info: ToFactory(none, "none"), reactor=self.clock)
        proto, transport = self.connect(factory)
        proto.dataReceived(realClientHello(None, None))
        self.assertTrue(transport.disconnecting)
        self.assertIn("route none turned the connection away", routerLog(self.observer)[0])


class DefaultRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tpFactory = Factory()
        self.backend = toBackend(FakeEndpoint())

    def info(self, name: str | None, *alpn: str) -> ClientHelloInfo:
        return ClientHelloInfo(serverName=name, alpn=alpn)

    def test_rule(self) -> None:
        rule = defaultRoute({"TP.example.", "tp2.example"}, self.tpFactory, self.backend)
        self.assertIsInstance(rule, DefaultRoute)
        self.assertIs(rule(self.info(None, "tp/1")).factory, self.tpFactory)  # type: ignore[attr-defined]
        self.assertIs(rule(self.info("www.example", "h2", "tp/1")).factory, self.tpFactory)  # type: ignore[attr-defined]
        self.assertIs(rule(self.info("tp.example")).factory, self.tpFactory)  # type: ignore[attr-defined]
        self.assertIs(rule(self.info("tp2.example", "h2")).factory, self.tpFactory)  # type: ignore[attr-defined]
        self.assertIs(rule(self.info("www.example", "h2")), self.backend)
        self.assertIs(rule(self.info(None)), self.backend)
        self.assertIs(rule(self.info(None, "tp/2")), self.backend)
        self.assertEqual(rule.factories, [self.tpFactory, self.backend.factory])

    def test_predicate(self) -> None:
        rule = defaultRoute(lambda name: name.endswith(".tp.example"), self.tpFactory, self.backend)
        self.assertIs(rule(self.info("a.tp.example")).factory, self.tpFactory)  # type: ignore[attr-defined]
        self.assertIs(rule(self.info("tp.example")), self.backend)

    def test_noBackend(self) -> None:
        rule = defaultRoute(set(), self.tpFactory)
        self.assertIs(rule(self.info("www.example", "h2")).factory, self.tpFactory)  # type: ignore[attr-defined]

    def test_factoriesStarted(self) -> None:
        """
        The router starts and stops the factories it hands connections to.
        """
        started: list[str] = []

        class Tracking(Factory):
            def startFactory(self) -> None:
                started.append("start")

            def stopFactory(self) -> None:
                started.append("stop")

        router = RouterFactory(defaultRoute(set(), Tracking()), reactor=Clock())
        router.doStart()
        router.doStop()
        self.assertEqual(started, ["start", "stop"])


class BackendTests(SynchronousTestCase):
    """
    Passthrough to a backend, in memory.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = FakeEndpoint()
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def start(self, proxyHeader: bool = False) -> tuple[RouterProtocol, StringTransport, bytes]:
        factory = RouterFactory(lambda info: toBackend(self.endpoint, proxyHeader, "web"), reactor=self.clock)
        proto = factory.buildProtocol(PEER)
        transport = StringTransport(hostAddress=HOST, peerAddress=PEER)
        proto.makeConnection(transport)
        hello = realClientHello(b"site.test", [b"h2"])
        for i in range(0, len(hello), 7):
            proto.dataReceived(hello[i : i + 7])
        return proto, transport, hello  # type: ignore[return-value]

    def test_passthrough(self) -> None:
        """
        The client is paused while the backend connects; then the backend
        gets the buffered bytes untouched, then what came meanwhile and
        after; the backend's bytes go to the client; both transports are
        each other's producer.
        """
        proto, transport, hello = self.start()
        self.assertIsInstance(proto.inner, BackendRelay)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(len(self.endpoint.attempts), 1)
        proto.dataReceived(b"early")
        backend, backendTransport = self.endpoint.succeed()
        self.assertEqual(transport.producerState, "producing")
        proto.dataReceived(b"late")
        self.assertEqual(backendTransport.value(), hello + b"earlylate")
        backend.dataReceived(b"\x16\x03\x03server")
        self.assertEqual(transport.value(), b"\x16\x03\x03server")
        self.assertIs(transport.producer, backendTransport)
        self.assertIs(backendTransport.producer, transport)

    def test_proxyHeader(self) -> None:
        """
        The PROXY v2 header, with the client's address and the address it
        reached, goes before anything else.
        """
        proto, transport, hello = self.start(proxyHeader=True)
        proto.dataReceived(b"early")
        _, backendTransport = self.endpoint.succeed()
        sent = backendTransport.value()
        self.assertTrue(sent.startswith(SIGNATURE))
        info, rest = parseProxyV2(sent)
        self.assertEqual(info, ProxyInfo(PROXY, PEER, HOST))
        self.assertEqual(rest, hello + b"early")

    def test_halfClose(self) -> None:
        """
        The client's EOF, even while the backend connects, becomes a
        half-close towards the backend after the bytes; the backend's EOF
        then closes both.
        """
        proto, transport, hello = self.start()
        proto.readConnectionLost()
        backend, backendTransport = self.endpoint.succeed()
        self.assertEqual(backendTransport.value(), hello)
        self.assertTrue(backendTransport.writeClosed)  # type: ignore[attr-defined]
        # The client's EOF has been read: reading it again would be wrong.
        self.assertEqual(transport.producerState, "paused")
        self.assertFalse(backendTransport.disconnecting)
        self.assertFalse(transport.disconnecting)
        backend.dataReceived(b"answer")
        self.assertEqual(transport.value(), b"answer")
        backend.readConnectionLost()  # type: ignore[attr-defined]
        self.assertTrue(transport.disconnecting)
        self.assertTrue(backendTransport.disconnecting)

    def test_backendUnreachable(self) -> None:
        proto, transport, hello = self.start()
        factory, d = self.endpoint.attempts[0]
        d.errback(Failure(ConnectionRefusedError("refused")))
        self.assertTrue(transport.disconnecting)
        [message] = routerLog(self.observer)
        self.assertIn("Cannot reach backend web for 192.0.2.7:40001", message)

    def test_clientGoneWhileConnecting(self) -> None:
        """
        A client that leaves while the backend connects cancels the
        attempt, quietly.
        """
        proto, transport, hello = self.start()
        _, d = self.endpoint.attempts[0]
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(d.called)
        self.assertEqual(routerLog(self.observer), [])


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class TLSApp(HalfCloseRecorder):
    handshakeDone = False

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True


class TPHandOverTests(SynchronousTestCase):
    """
    The router in front of TP's own TLS layer, in memory (iosim), with TP's
    certificates: the handshake starts from the buffered ClientHello, and
    TLS half-close still works.
    """

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.clock = Clock()
        issued = self.pki.ca.issue("alice", client=True)
        self.clientOptions = clientTLS("localhost", [self.pki.ca.cert], [issued.cert], issued.key)

    def connect(self, tpFactory: Any, client: Protocol) -> Any:
        router = RouterFactory(defaultRoute({"localhost"}, tpFactory), reactor=self.clock).buildProtocol(PEER)
        clientTLSProtocol = TLSFactory(self.clientOptions, True, Factory.forProtocol(lambda: client), clock=self.clock).buildProtocol(None)
        self.routerIO = FakeTransport(router, True, hostAddress=HOST, peerAddress=PEER)
        self.clientIO = FakeTransport(clientTLSProtocol, False)
        self.router = router
        return connect(router, self.routerIO, clientTLSProtocol, self.clientIO, clock=self.clock)

    def test_halfClose(self) -> None:
        server, client = TLSApp(), TLSApp()
        tpFactory = TLSFactory(makeServerTLS(self.pki.serverConfig()), False, Factory.forProtocol(lambda: server), clock=self.clock)
        pump = self.connect(tpFactory, client)
        self.assertTrue(server.handshakeDone)
        self.assertTrue(client.handshakeDone)
        self.assertEqual(self.router.route.name, "tp")  # type: ignore[union-attr]
        self.assertEqual(server.transport.negotiatedProtocol, b"tp/1")  # type: ignore[union-attr]
        client.transport.write(b"request")  # type: ignore[union-attr]
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        pump.flush()
        self.assertEqual(server.events[1:], [("data", b"request"), ("eof",)])
        server.transport.write(b"response")  # type: ignore[union-attr]
        server.transport.loseWriteConnection()  # type: ignore[union-attr]
        pump.flush()
        self.assertEqual(client.data, b"response")
        self.assertEqual(server.events[-1], ("lost", ConnectionDone))
        self.assertEqual(client.events[-1], ("lost", ConnectionDone))
        self.assertTrue(self.routerIO.disconnected)

    def test_realTPServer(self) -> None:
        """
        TP's listening factory, as L{tpproxy.service} makes it, completes
        its mutual TLS handshake with a client through the router.
        """
        client = TLSApp()
        tpFactory = makeServerFactory(self.pki.serverConfig(), self.clock)
        self.connect(tpFactory, client)
        self.assertTrue(client.handshakeDone)
        self.assertEqual(client.transport.negotiatedProtocol, b"tp/1")  # type: ignore[union-attr]
        [tls] = tpFactory.protocols
        self.assertEqual(tls.wrappedProtocol.state, "hello")
        self.assertEqual(tls.wrappedProtocol.peerAddress, "192.0.2.7:40001")


# --- on loopback --------------------------------------------------------------


class PathResource(Resource):
    """
    Answers C{site <path>}.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"site " + request.path


def serverOptions(issued: Issued, alpn: list[bytes]) -> ssl.CertificateOptions:
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(issued.key),
        certificate=crypto.X509.from_cryptography(issued.cert),
        acceptableProtocols=alpn,
    )


class ReadAll(Protocol):
    """
    Sends C{data} (then EOF if C{halfClose}), collects what comes back until
    the close.
    """

    def __init__(self, data: bytes, halfClose: bool = True, expect: int | None = None) -> None:
        self.data = data
        self.halfClose = halfClose
        self.expect = expect
        self.received: list[bytes] = []
        self.negotiated: bytes | None = None
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)  # type: ignore[union-attr]
        if self.halfClose:
            self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if self.expect is not None and sum(map(len, self.received)) >= self.expect:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure) -> None:
        self.done.callback(b"".join(self.received))


@implementer(IHalfCloseableProtocol)
class ProxyEcho(Protocol):
    """
    A backend that reads a PROXY v2 header, records it, and echoes the rest.
    """

    def connectionMade(self) -> None:
        self.buffer = b""
        self.info: ProxyInfo | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.info is None:
            self.buffer += data
            info, data = parseProxyV2(self.buffer)
            if info is None:
                return
            self.info = info
            self.factory.infos.append(info)  # type: ignore[attr-defined]
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


@defer.inlineCallbacks
def waitForNoConnections(timeout: float = 10) -> Any:
    """
    Wait until the reactor has no TCP connection left (the far ends of the
    connections a test made close a moment after its clients are done).
    """
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while True:
        left = [s for s in set(reactor.getReaders()) | set(reactor.getWriters()) if isinstance(s, tcp.Connection)]  # type: ignore[attr-defined]
        if not left:
            return
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"connections still open: {left}")
        d: defer.Deferred[None] = defer.Deferred()
        reactor.callLater(0.02, d.callback, None)  # type: ignore[attr-defined]
        yield d


class LoopbackTests(TestCase):
    """
    One router port in front of a real HTTPS site (Twisted web with its own
    certificate, HTTP/1.1 and HTTP/2) and a TLS echo standing in for TP.
    """

    def setUp(self) -> None:
        self.curl = requireTool("/usr/bin/curl", "curl")
        d = Path(self.mktemp()).absolute()
        d.mkdir()
        self.ca = CertificateAuthority.create("router test CA")
        self.caPath = d / "ca.pem"
        self.caPath.write_bytes(self.ca.certPEM)
        self.siteCert = self.ca.issue("site.test", dns=("site.test",), server=True)
        self.tpCert = self.ca.issue("tp.test", dns=("tp.test",), server=True)

        site = Site(PathResource())
        site.noisy = False
        self.sitePort = self.listen(TLSMemoryBIOFactory(serverOptions(self.siteCert, [b"h2", b"http/1.1"]), False, site))

        self.echoFactory = Factory.forProtocol(Echo)
        self.echoFactory.accepted = 0  # type: ignore[attr-defined]
        self.tpFactory = TLSFactory(serverOptions(self.tpCert, [b"tp/1", b"h2"]), False, self.echoFactory)
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.addCleanup(waitForNoConnections)

    def listen(self, factory: Any) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def startRouter(self, route: Any) -> int:
        self.routerPort = self.listen(RouterFactory(route, reactor=reactor))
        return self.routerPort

    def standardRouter(self, proxyHeader: bool = False, backendPort: int | None = None) -> int:
        backend = toBackend(TCP4ClientEndpoint(reactor, "127.0.0.1", backendPort or self.sitePort), proxyHeader, "site")
        return self.startRouter(defaultRoute({"tp.test"}, self.tpFactory, backend))

    @defer.inlineCallbacks
    def curlGet(self, port: int, path: str, http: str, name: str = "site.test") -> Any:
        result = yield run(
            [
                self.curl, "-sS", "--fail", "--max-time", "20", f"--{http}", "--cacert", str(self.caPath),
                "--resolve", f"{name}:{port}:127.0.0.1", "-w", "\n%{http_version}", f"https://{name}:{port}{path}",
            ]
        )
        self.assertEqual(result.status, 0, result)
        body, _, version = result.out.rpartition(b"\n")
        return body, version.decode()

    @defer.inlineCallbacks
    def tpEcho(self, port: int, size: int = 20000, name: str = "tp.test", alpn: list[bytes] = [b"tp/1"]) -> Any:
        data = os.urandom(size)
        options = ssl.optionsForClientTLS(name, trustRoot=ssl.Certificate.loadPEM(self.ca.certPEM), acceptableProtocols=alpn)
        client = ReadAll(data, halfClose=False, expect=size)
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        yield connectProtocol(endpoint, client)
        got = yield client.done
        self.assertEqual((len(got), sha256(got)), (size, sha256(data)))
        return client.negotiated

    @defer.inlineCallbacks
    def test_curlHTTP1(self) -> None:
        """
        curl reaches the site through the router with HTTP/1.1, verifying
        the site's own certificate: the TLS stream went through untouched.
        """
        port = self.standardRouter()
        body, version = yield self.curlGet(port, "/one", "http1.1")
        self.assertEqual((body, version), (b"site /one", "1.1"))

    @defer.inlineCallbacks
    def test_curlHTTP2(self) -> None:
        port = self.standardRouter()
        body, version = yield self.curlGet(port, "/two", "http2")
        self.assertEqual((body, version), (b"site /two", "2"))

    @defer.inlineCallbacks
    def test_tpSide(self) -> None:
        """
        A client offering ALPN tp/1 reaches the in-process TLS server on the
        same port, as does one naming TP in SNI without tp/1 (the stand-in
        for TP also takes h2; the client checks the certificate is TP's).
        """
        port = self.standardRouter()
        negotiated = yield self.tpEcho(port)
        self.assertEqual(negotiated, b"tp/1")
        negotiated = yield self.tpEcho(port, alpn=[b"h2"])
        self.assertEqual(negotiated, b"h2")
        self.assertEqual(self.echoFactory.accepted, 2)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_concurrent(self) -> None:
        """
        50 HTTPS requests (half HTTP/1.1, half HTTP/2, each its own curl)
        and 50 tp/1 echo connections at once, all intact.
        """
        port = self.standardRouter()
        requests = [self.curlGet(port, f"/r{i}", "http1.1" if i % 2 else "http2") for i in range(50)]
        echoes = [self.tpEcho(port, size=50000) for i in range(50)]
        results = yield defer.gatherResults(requests + echoes, consumeErrors=True)
        for i, (body, version) in enumerate(results[:50]):
            self.assertEqual((body, version), (f"site /r{i}".encode(), "1.1" if i % 2 else "2"))
        self.assertEqual(results[50:], [b"tp/1"] * 50)
        self.assertEqual(self.echoFactory.accepted, 50)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_proxyHeader(self) -> None:
        """
        With the PROXY header on, the backend learns the client's real
        address, and the bytes after the header are the client's, untouched;
        half-close goes through both ways.
        """
        backend = Factory.forProtocol(ProxyEcho)
        backend.infos = []  # type: ignore[attr-defined]
        port = self.standardRouter(proxyHeader=True, backendPort=self.listen(backend))
        data = realClientHello(b"www.test", [b"h2"]) + os.urandom(100000)
        client = ReadAll(data)
        proto = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        clientAddress = proto.transport.getHost()
        got = yield client.done
        self.assertEqual(sha256(got), sha256(data))
        [info] = backend.infos  # type: ignore[attr-defined]
        self.assertEqual(info.command, PROXY)
        self.assertEqual(info.source, IPv4Address("TCP", "127.0.0.1", clientAddress.port))
        self.assertEqual(info.destination, IPv4Address("TCP", "127.0.0.1", port))

    @defer.inlineCallbacks
    def test_halfClosePassthrough(self) -> None:
        """
        A backend that answers only after EOF gets the EOF and its answer
        gets back.
        """
        sinkPort, sink = listenHashSink(self)
        port = self.standardRouter(backendPort=sinkPort)
        data = realClientHello(None, None) + os.urandom(300000)
        client = ReadAll(data)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        got = yield client.done
        self.assertEqual(got, f"{len(data)} {sha256(data)}\n".encode())

    @defer.inlineCallbacks
    def test_backendDown(self) -> None:
        """
        A backend that refuses the connection closes the client's, and is
        logged; the router goes on serving.
        """
        port = self.standardRouter(backendPort=freePort())
        client = ReadAll(realClientHello(b"site.test", None), halfClose=False)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        got = yield client.done
        self.assertEqual(got, b"")
        self.assertTrue(any("Cannot reach backend site" in m for m in routerLog(self.observer)))
        negotiated = yield self.tpEcho(port)
        self.assertEqual(negotiated, b"tp/1")

    @defer.inlineCallbacks
    def test_garbage(self) -> None:
        """
        Plain HTTP on the router's port is closed at once; the router goes
        on serving.
        """
        port = self.standardRouter()
        client = ReadAll(b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n", halfClose=False)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        got = yield client.done
        self.assertEqual(got, b"")
        body, version = yield self.curlGet(port, "/after", "http1.1")
        self.assertEqual(body, b"site /after")

    @defer.inlineCallbacks
    def test_terminate(self) -> None:
        """
        The terminating route: TLS for web.test ends in the router's
        process, and plain HTTP goes on to the backend.
        """
        plain = Site(PathResource())
        plainPort = self.listen(plain)
        webCert = self.ca.issue("web.test", dns=("web.test",), server=True)
        terminate = terminateTLS(serverOptions(webCert, [b"http/1.1"]), TCP4ClientEndpoint(reactor, "127.0.0.1", plainPort))
        standard = defaultRoute({"tp.test"}, self.tpFactory, toBackend(TCP4ClientEndpoint(reactor, "127.0.0.1", self.sitePort)))
        port = self.startRouter(lambda info: terminate if info.serverName == "web.test" else standard(info))
        body, version = yield self.curlGet(port, "/plain", "http1.1", name="web.test")
        self.assertEqual((body, version), (b"site /plain", "1.1"))
        body, version = yield self.curlGet(port, "/tls", "http2")
        self.assertEqual((body, version), (b"site /tls", "2"))


def listenHashSink(testCase: TestCase) -> tuple[int, Any]:
    factory = Factory.forProtocol(HashSink)
    factory.accepted = 0  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    testCase.addCleanup(port.stopListening)
    return port.getHost().port, factory
