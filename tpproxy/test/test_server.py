"""
Tests for L{tpproxy.protocols.server}: the TP server protocol over real TLS,
in memory.

The client and server are joined with L{twisted.test.iosim}; the TLS is real
(L{tpproxy.transports.servertls.ServerTLS} on one side, L{tpproxy.transports.tls.clientTLS} on the
other) with certificates made at test time by L{tpproxy.testing.TestPKI}.
The reactor is a L{MemoryReactorClock}: dialled destinations show up in
C{reactor.tcpClients}, and time only moves when a test advances it.
"""

from __future__ import annotations

import datetime
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import crypto
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IHostnameResolver,
    IHostResolution,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tpproxy.pki import CertificateAuthority, serialHex
from tpproxy.protocols.server import LINGER, Outbound, TPServerProtocol
from tpproxy.service import makeServerFactory
from tpproxy.testing import TestPKI
from tpproxy.transports.tls import TLSFactory, clientTLS
from tpproxy.wire import ALPN, HEADER, MAX_FRAME, ClientHello, FrameDecoder, ServerHello, encodeFrame

CLIENT_ADDRESS = IPv4Address("TCP", "198.51.100.7", 40000)
SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 443)

#: The policy the tests run under.
RULES: list[dict[str, Any]] = [
    {"action": "deny", "identities": "*", "hosts": ["blocked.example.org"], "ports": "*"},
    {"identities": ["alice"], "hosts": ["192.0.2.0/24", "2001:db8::/32"], "ports": [80, 443]},
    {"identities": "*", "hosts": ["*.example.org"], "ports": "*"},
]

#: What the fake resolver answers.
HOSTS: dict[str, list[str]] = {
    "www.example.org": ["192.0.2.7"],
    "meta.example.org": ["169.254.169.254"],
    "loop.example.org": ["127.0.0.1"],
    "mixed.example.org": ["169.254.169.254", "192.0.2.8"],
    "nowhere.example.org": [],
}


# --- fakes --------------------------------------------------------------------


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class FakeResolver:
    """
    Resolves names synchronously from a table and records every query.
    Names in C{hang} never finish resolving.
    """

    def __init__(self, hosts: dict[str, list[str]], hang: frozenset[str] = frozenset()) -> None:
        self.hosts = hosts
        self.hang = hang
        self.queries: list[str] = []

    def resolveHostName(
        self, resolutionReceiver: Any, hostName: str, portNumber: int = 0, addressTypes: Any = None, transportSemantics: str = "TCP"
    ) -> IHostResolution:
        self.queries.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        if hostName in self.hang:
            return resolution
        for address in self.hosts.get(hostName, []):
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class FakeTCPTransport(StringTransport):
    """
    The outbound (destination) side of a splice: a L{StringTransport} that
    knows half-close, and that ends a connection the way a real TCP
    transport does (L{FileDescriptor.connectionLost}): stop its producer,
    then tell the protocol.
    """

    writeClosed = False
    protocol: Any = None

    def __init__(self, peer: Any) -> None:
        super().__init__(peerAddress=peer, lenient=True)

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def unregisterProducer(self) -> None:
        # Like FileDescriptor.unregisterProducer, and unlike
        # StringTransport's: unregistering twice is harmless.
        self.producer = None
        self.streaming = None

    def reportClosed(self, reason: Failure | None = None) -> None:
        """
        The reactor noticed that the connection is gone.
        """
        if not self.connected:
            return
        self.connected = False
        self.disconnecting = True
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(reason or Failure(error.ConnectionDone()))


class PausableFakeTransport(FakeTransport):
    """
    An iosim transport that holds incoming bytes while paused, as a real
    transport stops reading.
    """

    paused = False
    honourPause = True

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.held: list[bytes] = []
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        held, self.held = self.held, []
        for data in held:
            self.protocol.dataReceived(data)

    def bufferReceived(self, buf: Any) -> None:
        if self.paused and self.honourPause and isinstance(buf, bytes):
            self.held.append(buf)
            return
        super().bufferReceived(buf)

    def reportDisconnect(self) -> None:
        self.resumeProducing()
        super().reportDisconnect()


@implementer(IHandshakeListener)
class Client(Protocol):
    """
    A client application over TLS that writes C{greeting} once connected and
    records what it gets.
    """

    handshakeDone = False
    lostReason: Failure | None = None
    eof = False

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received = b""

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.lostReason = reason

    def serverHello(self) -> tuple[ServerHello | None, bytes]:
        """
        The ServerHello received so far (if complete) and the bytes after it.
        """
        decoder = FrameDecoder()
        decoder.feed(self.received)
        frame = decoder.nextFrame()
        if frame is None:
            return None, b""
        return ServerHello.fromObject(frame), decoder.takeRest()


@implementer(IHalfCloseableProtocol)
class HalfCloseClient(Client):
    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass


def hello(host: str, port: int, **kw: Any) -> bytes:
    return ClientHello("connect", host, port, **kw).toFrame()


def serialWithColons(serial: int) -> str:
    """
    A serial as people paste it from C{openssl x509 -text}: upper case,
    colon-separated bytes, with a leading zero.
    """
    digits = format(serial, "X")
    digits = "0" * (len(digits) % 2) + "00" + digits
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


# --- the harness --------------------------------------------------------------


class ServerTestMixin:
    """
    A TP server on a L{MemoryReactorClock}, with clients joined to it by
    L{IOPump}s over real TLS.
    """

    handshakeTimeout = 2
    helloTimeout = 3
    connectTimeout = 10

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())  # type: ignore[attr-defined]
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver(HOSTS, hang=frozenset({"slow.example.org"}))
        self.reactor.installNameResolver(self.resolver)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.issued: dict[str, Any] = {}
        self.aliceOptions = self.clientOptions("alice")

    def makeServer(self, rules: list[dict[str, Any]] | None = None, **server: Any) -> None:
        server.setdefault("handshake_timeout", self.handshakeTimeout)
        server.setdefault("hello_timeout", self.helloTimeout)
        server.setdefault("connect_timeout", self.connectTimeout)
        self.config = self.pki.serverConfig(RULES if rules is None else rules, **server)
        self.serverFactory = makeServerFactory(self.config, self.reactor)

    def clientOptions(self, name: str, ca: CertificateAuthority | None = None, **kw: Any) -> Any:
        issued = (ca or self.pki.ca).issue(name, client=True, **kw)
        self.issued[name] = issued
        return clientTLS("localhost", [self.pki.ca.cert], [issued.cert], issued.key)

    def optionsWithoutCertificate(self) -> Any:
        trust = trustRootFromCertificates([Certificate(crypto.X509.from_cryptography(self.pki.ca.cert))])
        return optionsForClientTLS(
            "localhost",
            trustRoot=trust,
            acceptableProtocols=[ALPN],
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3},
        )

    def optionsWithALPN(self, name: str, protocols: list[bytes] | None) -> Any:
        """
        Client options with a valid certificate for C{name} but ALPN
        C{protocols} (L{None}: no ALPN extension at all).
        """
        issued = self.pki.ca.issue(name, client=True)
        trust = trustRootFromCertificates([Certificate(crypto.X509.from_cryptography(self.pki.ca.cert))])
        return optionsForClientTLS(
            "localhost",
            trustRoot=trust,
            clientCertificate=PrivateCertificate.loadPEM(issued.certPEM + issued.keyPEM),
            acceptableProtocols=protocols,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3},
        )

    def connectClient(self, client: Protocol, options: Any = None, greet: bool = True) -> tuple[TPServerProtocol, IOPump]:
        """
        Join C{client}, over TLS with C{options} (alice's by default), to a
        new server connection.
        """
        if not hasattr(self, "serverFactory"):
            self.makeServer()
        clientFactory = TLSFactory(options or self.aliceOptions, True, Factory.forProtocol(lambda: client), clock=self.reactor)
        serverTLS = self.serverFactory.buildProtocol(CLIENT_ADDRESS)
        clientTLSProtocol = clientFactory.buildProtocol(SERVER_ADDRESS)
        self.serverIO = PausableFakeTransport(serverTLS, True, hostAddress=SERVER_ADDRESS, peerAddress=CLIENT_ADDRESS)
        self.clientIO = FakeTransport(clientTLSProtocol, False, hostAddress=CLIENT_ADDRESS, peerAddress=SERVER_ADDRESS)
        pump = connect(serverTLS, self.serverIO, clientTLSProtocol, self.clientIO, greet=False, clock=self.reactor)
        server = serverTLS.wrappedProtocol
        self.assertIsInstance(server, TPServerProtocol)  # type: ignore[attr-defined]
        if greet:
            pump.flush()
        return server, pump

    def acceptDial(self, index: int = 0) -> tuple[Outbound, FakeTCPTransport]:
        """
        Let the connection attempt number C{index} succeed.
        """
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[index]
        kind = IPv6Address if ":" in host else IPv4Address
        transport = FakeTCPTransport(kind("TCP", host, port))
        protocol = factory.buildProtocol(transport.getPeer())
        transport.protocol = protocol
        protocol.makeConnection(transport)
        outbound = protocol._wrappedProtocol
        self.assertIsInstance(outbound, Outbound)  # type: ignore[attr-defined]
        return outbound, transport

    def auditEvents(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "tpproxy.audit"]

    def onlyAuditEvent(self) -> dict[str, Any]:
        events = self.auditEvents()
        self.assertEqual(len(events), 1, events)  # type: ignore[attr-defined]
        return events[0]

    def assertRefused(self, client: Client, server: TPServerProtocol, code: str, fragment: str = "") -> ServerHello:
        """
        C{client} got one failed ServerHello with C{code} and then the
        connection closed on both sides; the audit event agrees.
        """
        answer, rest = client.serverHello()
        assert answer is not None, f"no ServerHello; client got {client.received!r}"
        self.assertFalse(answer.ok)  # type: ignore[attr-defined]
        self.assertEqual(answer.code, code)  # type: ignore[attr-defined]
        self.assertIn(fragment, answer.message)  # type: ignore[attr-defined]
        self.assertEqual(rest, b"")  # type: ignore[attr-defined]
        self.assertIsNotNone(client.lostReason)  # type: ignore[attr-defined]
        self.assertEqual(server.phase, "closed")  # type: ignore[attr-defined]
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # type: ignore[attr-defined]
        event = self.onlyAuditEvent()
        self.assertEqual(event["result"], code)  # type: ignore[attr-defined]
        self.assertEqual(event["detail"], answer.message)  # type: ignore[attr-defined]
        return answer


# --- success ------------------------------------------------------------------


class ConnectTests(ServerTestMixin, SynchronousTestCase):
    """
    An authorized client reaches its destination and bytes flow.
    """

    def test_dialsAndSplices(self) -> None:
        """
        A ClientHello for an allowed address makes the server dial it; the
        client gets ServerHello ok with the address, the bytes pipelined
        after the hello in the same write reach the destination, and bytes
        flow both ways after.
        """
        client = Client(hello("192.0.2.10", 80) + b"pipelined")
        server, pump = self.connectClient(client, greet=False)
        chunks: list[bytes] = []
        receive = server.dataReceived

        def dataReceived(data: bytes) -> None:
            chunks.append(data)
            receive(data)

        server.dataReceived = dataReceived  # type: ignore[method-assign]
        pump.flush()
        # The hello and the bytes after it arrived in one read.
        self.assertEqual(chunks, [hello("192.0.2.10", 80) + b"pipelined"])
        self.assertTrue(client.handshakeDone)
        self.assertEqual(server.phase, "dialling")
        self.assertEqual(server.identity.name, "alice")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("192.0.2.10", 80, self.connectTimeout))
        # Nothing is answered before the destination is reached.
        self.assertEqual(client.received, b"")

        outbound, dest = self.acceptDial()
        pump.flush()
        answer, rest = client.serverHello()
        self.assertEqual(answer, ServerHello.success(address="192.0.2.10"))
        self.assertEqual(rest, b"")
        self.assertEqual(server.phase, "spliced")
        self.assertEqual(dest.value(), b"pipelined")

        client.transport.write(b"up")
        pump.flush()
        self.assertEqual(dest.value(), b"pipelinedup")

        outbound.transport.protocol.dataReceived(b"down")
        pump.flush()
        self.assertEqual(client.serverHello()[1], b"down")
        self.assertEqual(self.auditEvents(), [])

    def test_splicedProducers(self) -> None:
        """
        Once spliced, each side is registered as the other's streaming
        producer, so that a slow side pauses the other.
        """
        client = Client(hello("192.0.2.10", 443))
        server, pump = self.connectClient(client)
        outbound, dest = self.acceptDial()
        pump.flush()
        self.assertIs(dest.producer, server.transport)
        self.assertTrue(dest.streaming)
        self.assertIs(server.transport._producer._producer, dest)
        self.assertIs(self.serverIO.producer, server.transport._producer)

    def test_pausedWhileDialling(self) -> None:
        """
        The client connection is paused while dialling and resumed after the
        splice; bytes the client sent meanwhile reach the destination after
        the ServerHello, in order.
        """
        client = Client(hello("192.0.2.10", 80) + b"one,")
        server, pump = self.connectClient(client)
        self.assertTrue(self.serverIO.paused)
        client.transport.write(b"two,")
        pump.flush()
        client.transport.write(b"three")
        pump.flush()
        self.assertEqual(server.phase, "dialling")
        outbound, dest = self.acceptDial()
        pump.flush()
        self.assertFalse(self.serverIO.paused)
        self.assertEqual(dest.value(), b"one,two,three")
        self.assertTrue(client.serverHello()[0].ok)
        self.assertEqual(server.bytesIn, len(b"one,two,three"))

    def test_readWhileDialling(self) -> None:
        """
        Bytes read while dialling (a transport that goes on delivering
        after C{pauseProducing}) are kept for the destination.
        """
        client = Client(hello("192.0.2.10", 80) + b"one,")
        server, pump = self.connectClient(client)
        self.serverIO.honourPause = False
        client.transport.write(b"two")
        pump.flush()
        self.assertEqual(server.session.pending, b"one,two")
        outbound, dest = self.acceptDial()
        pump.flush()
        self.assertEqual(dest.value(), b"one,two")
        self.assertEqual(server.session.pending, b"")

    def test_resolvedName(self) -> None:
        """
        A name is resolved with the reactor's resolver and the address it
        resolved to is dialled and reported.
        """
        client = Client(hello("www.example.org", 8080))
        server, pump = self.connectClient(client)
        self.assertEqual(self.resolver.queries, ["www.example.org"])
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.7", 8080))
        self.acceptDial()
        pump.flush()
        self.assertEqual(client.serverHello()[0], ServerHello.success(address="192.0.2.7"))

    def test_forbiddenAddressesSkipped(self) -> None:
        """
        Of the addresses a name resolves to, only the allowed ones are
        dialled.
        """
        client = Client(hello("mixed.example.org", 80))
        server, pump = self.connectClient(client)
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("192.0.2.8", 80)])

    def test_ipv6(self) -> None:
        """
        An IPv6 literal is dialled over IPv6.
        """
        client = Client(hello("2001:db8::5", 443))
        server, pump = self.connectClient(client)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("2001:db8::5", 443))
        self.acceptDial()
        pump.flush()
        self.assertEqual(client.serverHello()[0], ServerHello.success(address="2001:db8::5"))

    def test_auditEvent(self) -> None:
        """
        Exactly one audit event is logged per connection, when it closes,
        with who, where, the outcome, the byte counts and the duration.
        """
        client = Client(hello("192.0.2.10", 80) + b"12345")
        server, pump = self.connectClient(client)
        outbound, dest = self.acceptDial()
        pump.flush()
        client.transport.write(b"678")
        outbound.transport.protocol.dataReceived(b"abcdefghij")
        pump.flush()
        self.reactor.advance(7)
        self.assertEqual(self.auditEvents(), [])
        # The client goes away without a TLS close.
        self.clientIO.loseConnection()
        pump.flush()
        self.assertTrue(dest.disconnecting)
        dest.reportClosed()
        pump.flush()
        event = self.onlyAuditEvent()
        identity = server.identity
        self.assertEqual(
            {k: event[k] for k in ("event", "peer", "identity", "serial", "destination", "transport", "address", "result", "bytes_up", "bytes_down", "duration")},
            {
                "event": "connect",
                "peer": "198.51.100.7:40000",
                "identity": "alice",
                "serial": identity.serial,
                "destination": "192.0.2.10:80",
                "transport": "tcp",
                "address": "192.0.2.10",
                "result": "ok",
                "bytes_up": 8,
                "bytes_down": 10,
                "duration": 7.0,
            },
        )
        self.assertEqual(identity.serial, serialHex(self.issued["alice"].cert.serial_number))

    def test_auditEventPerConnection(self) -> None:
        """
        Two connections, two audit events, each with its own identity.
        """
        alice = Client(hello("192.0.2.10", 80))
        _, alicePump = self.connectClient(alice)
        bob = Client(hello("192.0.2.10", 80))
        _, bobPump = self.connectClient(bob, self.clientOptions("bob"))
        self.assertEqual([(e["identity"], e["result"]) for e in self.auditEvents()], [("bob", "forbidden")])
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.acceptDial()
        alicePump.flush()
        self.assertTrue(alice.serverHello()[0].ok)
        alicePump.clientIO.loseConnection()
        alicePump.flush()
        bobPump.flush()
        self.assertEqual([(e["identity"], e["result"]) for e in self.auditEvents()], [("bob", "forbidden"), ("alice", "ok")])


class HalfCloseTests(ServerTestMixin, SynchronousTestCase):
    """
    EOF travels through the splice in each direction on its own, and the
    connection ends cleanly when both directions have.
    """

    def splicedClient(self) -> tuple[HalfCloseClient, TPServerProtocol, IOPump, Outbound, FakeTCPTransport]:
        client = HalfCloseClient(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client)
        outbound, dest = self.acceptDial()
        pump.flush()
        self.assertTrue(client.serverHello()[0].ok)
        return client, server, pump, outbound, dest

    def test_clientEOFFirst(self) -> None:
        """
        The client sends its request and half-closes: the destination reads
        the request then EOF, and its answer still reaches the client.
        When the destination ends too, the client reads a clean EOF
        (TLS close_notify) and both connections close.
        """
        client, server, pump, outbound, dest = self.splicedClient()
        client.transport.write(b"request")
        pump.flush()
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(dest.value(), b"request")
        self.assertTrue(dest.writeClosed)
        self.assertFalse(dest.disconnecting)
        self.assertIsNone(client.lostReason)

        dest.protocol.dataReceived(b"response")
        pump.flush()
        self.assertEqual(client.serverHello()[1], b"response")

        dest.protocol.readConnectionLost()
        pump.flush()
        self.assertTrue(dest.disconnecting)
        dest.reportClosed()
        pump.flush()
        # The client must see the end of the response as a TLS close, not a
        # truncated connection.
        self.assertIsNotNone(client.lostReason)
        client.lostReason.trap(error.ConnectionDone)
        event = self.onlyAuditEvent()
        self.assertEqual((event["result"], event["bytes_up"], event["bytes_down"]), ("ok", 7, 8))

    def test_destinationEOFFirst(self) -> None:
        """
        The destination ends first: the client reads EOF and can go on
        sending; when it half-closes too, both connections close.
        """
        client, server, pump, outbound, dest = self.splicedClient()
        dest.protocol.dataReceived(b"banner")
        pump.flush()
        dest.protocol.readConnectionLost()
        pump.flush()
        self.assertTrue(client.eof)
        self.assertIsNone(client.lostReason)
        self.assertEqual(client.serverHello()[1], b"banner")
        self.assertFalse(dest.disconnecting)

        client.transport.write(b"more")
        pump.flush()
        self.assertEqual(dest.value(), b"more")

        client.transport.loseWriteConnection()
        pump.flush()
        self.assertTrue(dest.disconnecting)
        self.assertIsNotNone(client.lostReason)
        client.lostReason.trap(error.ConnectionDone)
        dest.reportClosed()
        event = self.onlyAuditEvent()
        self.assertEqual((event["result"], event["bytes_up"], event["bytes_down"]), ("ok", 4, 6))

    def test_destinationDataThenEOF(self) -> None:
        """
        The last bytes a destination sends, read in the same reactor turn as
        its EOF, reach the client before the EOF.

        Regression (was a bug in tpproxy/tls.py, HalfCloseTLSProtocol.loseWriteConnection): it
        sets C{_writeEOF} before flushing the write aggregator, so the
        flushed bytes are dropped by C{_write}; the client reads EOF
        without the bytes.
        """
        client, server, pump, outbound, dest = self.splicedClient()
        dest.protocol.dataReceived(b"last words")
        dest.protocol.readConnectionLost()
        pump.flush()
        self.assertTrue(client.eof)
        self.assertEqual(client.serverHello()[1], b"last words")

    def test_destinationReset(self) -> None:
        """
        A destination connection lost without EOF (a reset) ends the
        client connection too.
        """
        client, server, pump, outbound, dest = self.splicedClient()
        dest.reportClosed(Failure(error.ConnectionLost()))
        pump.flush()
        self.assertIsNotNone(client.lostReason)
        self.assertEqual(server.phase, "closed")
        self.assertEqual(self.onlyAuditEvent()["result"], "ok")

    def test_clientReset(self) -> None:
        """
        A client connection lost without TLS close ends the destination
        connection.
        """
        client, server, pump, outbound, dest = self.splicedClient()
        self.clientIO.loseConnection()
        pump.flush()
        self.assertTrue(dest.disconnecting)
        self.assertEqual(server.phase, "closed")


# --- refusals by policy -------------------------------------------------------


class ForbiddenTests(ServerTestMixin, SynchronousTestCase):
    """
    The policy decides before anything is dialled.
    """

    def test_forbiddenPort(self) -> None:
        """
        A destination no rule allows is refused with C{forbidden} and
        nothing is dialled.
        """
        client = Client(hello("192.0.2.10", 81))
        server, pump = self.connectClient(client)
        self.assertRefused(client, server, "forbidden", "no rule allows alice")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_forbiddenIdentity(self) -> None:
        """
        A rule for alice does not let bob through.
        """
        client = Client(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client, self.clientOptions("bob"))
        self.assertRefused(client, server, "forbidden")
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.onlyAuditEvent()["identity"], "bob")

    def test_deniedNameNotResolved(self) -> None:
        """
        A name denied by a name rule is refused without a DNS query.
        """
        client = Client(hello("blocked.example.org", 80))
        server, pump = self.connectClient(client)
        self.assertRefused(client, server, "forbidden", "denied by rule 1")
        self.assertEqual(self.resolver.queries, [])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_resolvesToMetadataService(self) -> None:
        """
        A name allowed by a name rule but resolving to the cloud metadata
        address is refused; nothing is dialled; the audit names the address.
        """
        client = Client(hello("meta.example.org", 80))
        server, pump = self.connectClient(client)
        self.assertRefused(client, server, "forbidden", "169.254.169.254 is a cloud metadata service")
        self.assertEqual(self.resolver.queries, ["meta.example.org"])
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.onlyAuditEvent()["address"], "169.254.169.254")

    def test_resolvesToLoopback(self) -> None:
        """
        Likewise for a name resolving to loopback.
        """
        client = Client(hello("loop.example.org", 22))
        server, pump = self.connectClient(client)
        self.assertRefused(client, server, "forbidden", "loopback")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_deterministicResolvingReactor(self) -> None:
        """
        The same through Twisted's L{deterministicResolvingReactor}: the
        server asks the reactor it was given for the name.
        """
        from twisted.internet.test.test_endpoints import deterministicResolvingReactor

        memory = self.reactor
        self.reactor = deterministicResolvingReactor(memory, hostMap={"api.example.org": ["169.254.169.254"]})
        self.makeServer()
        self.reactor = memory
        client = Client(hello("api.example.org", 443))
        server, pump = self.connectClient(client)
        self.assertRefused(client, server, "forbidden", "169.254.169.254")
        self.assertEqual(memory.tcpClients, [])

    def test_resolvesToNothing(self) -> None:
        """
        A name without addresses gives C{resolve_failed}.
        """
        client = Client(hello("nowhere.example.org", 80))
        server, pump = self.connectClient(client)
        self.assertRefused(client, server, "resolve_failed", "did not resolve")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_resolveTimeout(self) -> None:
        """
        Resolution slower than the connect timeout gives C{resolve_failed}.
        """
        client = Client(hello("slow.example.org", 80))
        server, pump = self.connectClient(client)
        self.reactor.advance(self.connectTimeout - 0.5)
        pump.flush()
        self.assertEqual(client.received, b"")
        self.reactor.advance(1)
        pump.flush()
        self.assertRefused(client, server, "resolve_failed", "took longer")
        self.assertEqual(self.reactor.tcpClients, [])


# --- refusals while connecting ------------------------------------------------


class DialFailureTests(ServerTestMixin, SynchronousTestCase):
    def test_refused(self) -> None:
        """
        A refused connection attempt gives C{connect_refused}.
        """
        client = Client(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client)
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[0]
        factory.clientConnectionFailed(self.reactor.connectors[0], Failure(error.ConnectionRefusedError()))
        pump.flush()
        self.assertRefused(client, server, "connect_refused", "192.0.2.10 port 80 refused")
        self.assertEqual(self.onlyAuditEvent()["address"], "192.0.2.10")

    def test_connectorTimeout(self) -> None:
        """
        The connector's own timeout gives C{connect_timeout}.
        """
        client = Client(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client)
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(self.reactor.connectors[0], Failure(error.TimeoutError()))
        pump.flush()
        self.assertRefused(client, server, "connect_timeout")

    def test_unreachable(self) -> None:
        """
        Other connection errors give C{unreachable}.
        """
        client = Client(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client)
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(self.reactor.connectors[0], Failure(error.NoRouteError()))
        pump.flush()
        self.assertRefused(client, server, "unreachable")

    def test_clockTimeout(self) -> None:
        """
        A destination that does not answer within connect_timeout gives
        C{connect_timeout}, and the attempt is stopped.

        Regression (was a bug in tpproxy/dial.py, Dialer._connectAny): the C{addTimeout} on the
        endpoint's Deferred cancels it, and a cancelled TCP endpoint fails
        with L{error.ConnectingCancelledError} (not C{CancelledError}, so
        C{addTimeout} does not turn it into a C{TimeoutError}); nothing
        catches it, and the client gets C{internal} while the server logs
        an unexpected error.  With a real reactor this happens whenever the
        connector's own (rounded-up) timeout has not fired first.
        """
        client = Client(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client)
        self.reactor.advance(self.connectTimeout - 0.5)
        pump.flush()
        self.assertEqual(client.received, b"")
        self.reactor.advance(1)
        pump.flush()
        self.assertRefused(client, server, "connect_timeout")
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_clientGoneWhileDialling(self) -> None:
        """
        If the client goes away while the server is dialling, the attempt
        is cancelled quietly and one audit event is logged.

        Regression (was a bug in tpproxy/protocols/server.py, TPServerProtocol._dialFailed, with
        tpproxy/dial.py, Dialer._connectAny): cancelling the dial makes the
        endpoint fail with L{error.ConnectingCancelledError}, which is not
        a L{defer.CancelledError}, so it is logged as "Unexpected error
        while dialling" with a traceback.
        """
        client = Client(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client)
        self.clientIO.loseConnection()
        pump.flush()
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        event = self.onlyAuditEvent()
        self.assertEqual(event["destination"], "192.0.2.10:80")
        self.assertEqual(server.phase, "closed")
        self.assertEqual([f.value for f in self.flushLoggedErrors()], [])

    def test_clientGoneWhileDiallingAudit(self) -> None:
        """
        The audit event of a client that left while the server was dialling
        does not call it a hello timeout: the hello was read.

        Regression (was a bug in tpproxy/protocols/server.py, TPServerProtocol): C{result} is set
        to C{"hello_timeout"} at the end of the handshake and not changed
        when the hello arrives, so this audit event says C{hello_timeout}.
        """
        client = Client(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client)
        self.clientIO.loseConnection()
        pump.flush()
        self.flushLoggedErrors()
        self.assertNotIn(self.onlyAuditEvent()["result"], ("hello_timeout", "ok", "internal"))

    def test_clientGoneWhileDiallingNoTimerLeft(self) -> None:
        """
        Once the connection is closed no timer of it is left to fire.

        Regression (was a bug in tpproxy/protocols/server.py, TPServerProtocol.connectionLost):
        it cancels the dial before setting C{state} to C{"closed"}; the
        cancellation fails with L{error.ConnectingCancelledError} (see
        L{test_clientGoneWhileDialling}), C{_dialFailed} calls C{_refuse}
        on the dead connection, which sets a L{LINGER} timeout after
        C{connectionLost} cleared it.  When it fires, C{timeoutConnection}
        calls C{abortConnection} on the closed TLS transport, which raises
        C{AttributeError} (its C{_tlsConnection} is L{None}).
        """
        client = Client(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client)
        self.clientIO.loseConnection()
        pump.flush()
        self.flushLoggedErrors()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(LINGER + 1)


# --- bad hellos ---------------------------------------------------------------


class BadHelloTests(ServerTestMixin, SynchronousTestCase):
    """
    A ClientHello that cannot be accepted is answered with the matching
    error code, and the connection is closed.
    """

    def refusedFor(self, data: bytes, code: str, fragment: str = "") -> TPServerProtocol:
        client = Client(data)
        server, pump = self.connectClient(client)
        self.assertRefused(client, server, code, fragment)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertIsNone(server.hello)
        return server

    def test_garbage(self) -> None:
        """
        An HTTP request is not a frame: its first four bytes read as a
        length far above the limit.
        """
        self.refusedFor(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request", "exceeds the limit")

    def test_oversizeLength(self) -> None:
        """
        A length prefix above the limit is refused as soon as the prefix is
        read, without waiting for the frame.
        """
        self.refusedFor(HEADER.pack(MAX_FRAME + 1), "bad_request", f"exceeds the limit of {MAX_FRAME}")

    def test_emptyFrame(self) -> None:
        self.refusedFor(HEADER.pack(0), "bad_request", "empty frame")

    def test_invalidJSON(self) -> None:
        self.refusedFor(HEADER.pack(5) + b"{nope", "bad_request", "not valid JSON")

    def test_notAnObject(self) -> None:
        self.refusedFor(HEADER.pack(5) + b"[1,2]", "bad_request", "JSON object")

    def test_unsupportedVersion(self) -> None:
        self.refusedFor(hello("192.0.2.10", 80, version=2), "unsupported_version", "version 2")

    def test_unknownOperation(self) -> None:
        self.refusedFor(encodeFrame({"v": 1, "op": "teleport", "host": "192.0.2.10", "port": 80}), "bad_request", "unknown operation")

    def test_udpForbidden(self) -> None:
        """
        A UDP flow is checked against rules for udp: forbidden here.
        """
        client = Client(encodeFrame({"v": 1, "op": "udp", "host": "192.0.2.10", "port": 53}))
        server, pump = self.connectClient(client)
        self.assertRefused(client, server, "forbidden", "udp")

    def test_connectOverUDP(self) -> None:
        """
        A C{connect} with C{transport} C{udp} is refused with
        C{bad_request} naming the C{udp} operation, nothing is dialled, and
        the audit event says so.

        Regression (was a bug in tpproxy/wire.py, ClientHello.fromObject):
        it was answered C{ok} after a TCP rule check and relayed over TCP.
        """
        self.refusedFor(
            encodeFrame({"v": 1, "op": "connect", "host": "192.0.2.10", "port": 80, "transport": "udp"}),
            "bad_request",
            "a UDP flow is operation 'udp'",
        )

    def test_badPort(self) -> None:
        self.refusedFor(encodeFrame({"v": 1, "op": "connect", "host": "192.0.2.10", "port": 0}), "bad_request", "'port'")

    def test_badHost(self) -> None:
        self.refusedFor(encodeFrame({"v": 1, "op": "connect", "host": "-x y", "port": 80}), "bad_request", "'host'")

    def test_helloInPieces(self) -> None:
        """
        A hello split over several writes is put together.
        """
        client = Client()
        server, pump = self.connectClient(client)
        frame = hello("192.0.2.10", 80)
        for i in range(len(frame)):
            client.transport.write(frame[i : i + 1])
            pump.flush()
        self.assertEqual(server.phase, "dialling")
        self.assertEqual(len(self.reactor.tcpClients), 1)


# --- timeouts -----------------------------------------------------------------


class TimeoutTests(ServerTestMixin, SynchronousTestCase):
    def test_helloTimeout(self) -> None:
        """
        After the handshake, a client that sends no complete hello within
        hello_timeout gets C{bad_request} naming the timeout.
        """
        client = Client(hello("192.0.2.10", 80)[:6])
        server, pump = self.connectClient(client)
        self.assertEqual(server.phase, "hello")
        self.reactor.advance(self.helloTimeout - 0.1)
        pump.flush()
        self.assertEqual(client.received, b"")
        self.reactor.advance(0.2)
        pump.flush()
        self.assertRefused(client, server, "bad_request", f"no complete ClientHello within {self.helloTimeout} s")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_helloTimeoutIsNotReset(self) -> None:
        """
        Dribbling bytes does not extend the hello timeout.
        """
        client = Client()
        server, pump = self.connectClient(client)
        frame = hello("192.0.2.10", 80)
        for i in range(4):
            client.transport.write(frame[i : i + 1])
            pump.flush()
            self.reactor.advance(self.helloTimeout / 4 + 0.01)
            pump.flush()
        self.assertRefused(client, server, "bad_request", "no complete ClientHello")

    def test_handshakeTimeout(self) -> None:
        """
        A peer that sends no TLS bytes at all is cut off after
        handshake_timeout.
        """
        self.makeServer()
        serverTLS = self.serverFactory.buildProtocol(CLIENT_ADDRESS)
        silent = Protocol()
        serverIO = FakeTransport(serverTLS, True, peerAddress=CLIENT_ADDRESS)
        silentIO = FakeTransport(silent, False)
        pump = connect(serverTLS, serverIO, silent, silentIO, greet=False, clock=self.reactor)
        server = serverTLS.wrappedProtocol
        pump.flush()
        self.reactor.advance(self.handshakeTimeout - 0.1)
        pump.flush()
        self.assertFalse(serverIO.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(serverIO.disconnecting)
        self.assertTrue(serverTLS._aborted)
        pump.flush()
        self.assertEqual(server.phase, "closed")
        event = self.onlyAuditEvent()
        self.assertEqual(event["result"], "handshake_failed")
        self.assertEqual(event["detail"], f"no TLS handshake within {self.handshakeTimeout} s")
        self.assertIsNone(event["identity"])

    def test_linger(self) -> None:
        """
        A refused client that never closes its side is cut off after
        L{LINGER} seconds.
        """
        client = Client(hello("192.0.2.10", 81))
        server, pump = self.connectClient(client, greet=False)
        # Deliver the handshake and hello but never the server's answer.
        for _ in range(20):
            pump.pump()
            if server.phase == "refused":
                break
        self.assertEqual(server.phase, "refused")
        self.serverIO.stream = []
        self.reactor.advance(LINGER - 0.1)
        self.assertFalse(self.serverIO.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(self.serverIO.disconnecting)
        self.serverIO.stream = []
        pump.flush()
        self.assertEqual(self.onlyAuditEvent()["result"], "forbidden")


class ALPNTests(ServerTestMixin, SynchronousTestCase):
    def test_otherProtocolRefused(self) -> None:
        """
        A client that offers ALPN protocols other than C{tp/1} (a web
        browser, say) is told this is a TP server, after the handshake.
        """
        client = Client(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client, self.optionsWithALPN("alice", [b"h2", b"http/1.1"]))
        self.assertRefused(client, server, "bad_request", "ALPN tp/1 expected, client offered h2, http/1.1")
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.onlyAuditEvent()["identity"], "alice")

    def test_tpAmongOthers(self) -> None:
        """
        C{tp/1} among other offers is chosen.
        """
        client = Client(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client, self.optionsWithALPN("alice", [b"h2", ALPN]))
        self.assertEqual(server.transport.negotiatedProtocol, ALPN)
        self.assertEqual(server.phase, "dialling")

    def test_noALPN(self) -> None:
        """
        A client that sends no ALPN extension at all is served.
        """
        client = Client(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client, self.optionsWithALPN("alice", None))
        self.assertIsNone(server.transport.negotiatedProtocol)
        self.assertEqual(server.phase, "dialling")


# --- certificates -------------------------------------------------------------


class HandshakeFailureTests(ServerTestMixin, SynchronousTestCase):
    """
    A client certificate that is missing or refused ends the connection in
    the TLS handshake: the TP protocol never reads a hello, and the one
    audit event says why.
    """

    def assertHandshakeFailed(self, options: Any, fragment: str, **server: Any) -> dict[str, Any]:
        self.makeServer(**server)
        client = Client(hello("192.0.2.10", 80))
        server_, pump = self.connectClient(client, options)
        self.assertIsNotNone(client.lostReason)
        self.assertEqual(client.received, b"")
        self.assertEqual(server_.phase, "closed")
        self.assertIsNone(server_.hello)
        self.assertIsNone(server_.identity)
        self.assertEqual(server_.reader.buffered(), 0)
        self.assertEqual(self.reactor.tcpClients, [])
        event = self.onlyAuditEvent()
        self.assertEqual(event["result"], "handshake_failed")
        self.assertIn(fragment, event["detail"])
        self.assertIsNone(event["destination"])
        return event

    def test_noCertificate(self) -> None:
        """
        A client that sends no certificate is refused in the handshake.
        """
        self.assertHandshakeFailed(self.optionsWithoutCertificate(), "did not return a certificate")

    def test_otherCA(self) -> None:
        """
        A certificate from a CA the server does not trust is refused.
        """
        other = CertificateAuthority.create("Another CA")
        self.assertHandshakeFailed(self.clientOptions("alice", ca=other), "unknown issuer")

    def test_expired(self) -> None:
        """
        An expired certificate is refused.
        """
        now = datetime.datetime.now(datetime.timezone.utc)
        options = self.clientOptions("alice", notBefore=now - datetime.timedelta(days=2), notAfter=now - datetime.timedelta(days=1))
        self.assertHandshakeFailed(options, "expired")

    def test_revoked(self) -> None:
        """
        A certificate on the CRL is refused, and the detail names its serial.
        """
        issued = self.pki.ca.issue("alice", client=True)
        crl = self.pki.ca.crl([issued.cert.serial_number])
        (self.pki.directory / "crl.pem").write_bytes(crl.public_bytes(Encoding.PEM))
        options = clientTLS("localhost", [self.pki.ca.cert], [issued.cert], issued.key)
        event = self.assertHandshakeFailed(options, "revoked", crl="crl.pem")
        self.assertIn(serialHex(issued.cert.serial_number), event["detail"])

    def test_deniedSerial(self) -> None:
        """
        A serial on the deny list (written as people paste it) is refused.
        """
        issued = self.pki.ca.issue("alice", client=True)
        options = clientTLS("localhost", [self.pki.ca.cert], [issued.cert], issued.key)
        self.assertHandshakeFailed(options, "deny list", deny={"serials": [serialWithColons(issued.cert.serial_number)]})

    def test_deniedIdentity(self) -> None:
        """
        An identity on the deny list is refused.
        """
        self.assertHandshakeFailed(self.clientOptions("mallory"), "identity mallory is on the deny list", deny={"identities": ["mallory"]})

    def test_notDeniedAccepted(self) -> None:
        """
        The deny list and CRL do not refuse anybody else.
        """
        other = self.pki.ca.issue("other", client=True)
        crl = self.pki.ca.crl([other.cert.serial_number])
        (self.pki.directory / "crl.pem").write_bytes(crl.public_bytes(Encoding.PEM))
        self.makeServer(crl="crl.pem", deny={"identities": ["mallory"], "serials": [serialHex(other.cert.serial_number)]})
        client = Client(hello("192.0.2.10", 80))
        server, pump = self.connectClient(client)
        self.assertEqual(server.phase, "dialling")
        self.assertEqual(self.auditEvents(), [])
