"""
The client protocol against a scripted server, in memory.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.protocols.client import Refused, TPClientProtocol, TunnelError
from tpproxy.wire import ClientHello, ErrorCode, FrameDecoder, ServerHello, encodeFrame


class ClientProtocolTests(SynchronousTestCase):
    def connect(self, host: str = "db.example.org") -> tuple[TPClientProtocol, StringTransport, defer.Deferred]:
        ready: defer.Deferred = defer.Deferred()
        proto = TPClientProtocol(ClientHello.connect(host, 5432), ready, innerTLS=lambda name: None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport, ready

    def test_sendsHello(self) -> None:
        proto, transport, ready = self.connect()
        decoder = FrameDecoder()
        decoder.feed(transport.value())
        self.assertEqual(ClientHello.fromObject(decoder.nextFrame()), ClientHello.connect("db.example.org", 5432))

    def test_okThenBytes(self) -> None:
        """
        Bytes after the ServerHello in the same read are kept for the splice.
        """
        proto, transport, ready = self.connect()
        proto.dataReceived(ServerHello.success(address="192.0.2.1").toFrame() + b"early")
        self.assertIs(self.successResultOf(ready), proto)
        self.assertEqual(proto.rest, b"early")

    def test_refused(self) -> None:
        proto, transport, ready = self.connect()
        proto.dataReceived(ServerHello.failure(ErrorCode.FORBIDDEN, "no").toFrame())
        error = self.failureResultOf(ready, Refused).value
        self.assertEqual((error.code, error.message), ("forbidden", "no"))
        self.assertTrue(transport.disconnecting)

    def test_malformedAnswer(self) -> None:
        proto, transport, ready = self.connect()
        proto.dataReceived(encodeFrame({"v": 1}))
        self.assertIn("malformed ServerHello", str(self.failureResultOf(ready, TunnelError).value))

    def test_e2eNameMustMatch(self) -> None:
        """
        A server that answers with another E2E name than the one asked for
        is not followed into an inner handshake for that name.
        """
        proto, transport, ready = self.connect("ssh.alice.localhost")
        proto.dataReceived(ServerHello.success(e2e="evil.localhost").toFrame())
        self.assertIn("evil.localhost", str(self.failureResultOf(ready, TunnelError).value))
        self.assertIsNone(proto.inner)
        self.assertTrue(transport.disconnecting)


class EndpointTests(SynchronousTestCase):
    """
    L{tcpEndpoint}: an IP address is connected to at once, a name is
    resolved.
    """

    def test_addressConnectsAtOnce(self) -> None:
        """
        A tunnel to TP at an IP address starts its TCP connection in the
        same call: no name resolution (a thread per tunnel).
        """
        from twisted.internet.testing import MemoryReactorClock

        from tpproxy.protocols.client import ServerAddress, openTunnel

        from twisted.internet.ssl import optionsForClientTLS

        for host, family in (("127.0.0.1", "127.0.0.1"), ("::1", "::1")):
            reactor = MemoryReactorClock()
            ready = openTunnel(reactor, ServerAddress(host, 8443), optionsForClientTLS("tp.example"), ClientHello("connect", "example", 22))  # type: ignore[arg-type]
            ready.addErrback(lambda f: None)
            [(connected, port, _, _, _)] = reactor.tcpClients
            self.assertEqual((connected, port), (family, 8443))

    def test_kinds(self) -> None:
        from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
        from twisted.internet.testing import MemoryReactorClock

        from tpproxy.protocols.client import tcpEndpoint

        reactor = MemoryReactorClock()
        self.assertIsInstance(tcpEndpoint(reactor, "10.0.0.1", 1, 5), TCP4ClientEndpoint)  # type: ignore[arg-type]
        self.assertIsInstance(tcpEndpoint(reactor, "2001:db8::1", 1, 5), TCP6ClientEndpoint)  # type: ignore[arg-type]
        self.assertIsInstance(tcpEndpoint(reactor, "tp.example.com", 1, 5), HostnameEndpoint)  # type: ignore[arg-type]
