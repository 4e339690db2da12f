"""
UDP flows through TP on loopback: a real DNS query through C{tp up -u}
over QUIC datagrams and over the TLS fallback, and packets too large for a
datagram frame.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.names import client, dns
from twisted.trial.unittest import TestCase

from tpproxy.test.support import Background, deferLater, tpCommand, waitForAudits
from tpproxy.test.test_quic import QuicTestCase, waitUntil
from tpproxy.transports.udp import StreamFramer, decodeFlowDatagram, encodeFlowDatagram


class FixedAnswerDNS(protocol.DatagramProtocol):
    """
    A DNS server that answers every A query with 192.0.2.53.
    """

    def __init__(self) -> None:
        self.queries: list[str] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        message = dns.Message()
        message.fromStr(data)
        query = message.queries[0]
        self.queries.append(query.name.name.decode())
        answer = dns.RRHeader(name=query.name.name, type=dns.A, payload=dns.Record_A("192.0.2.53", ttl=60))
        reply = dns.Message(id=message.id, answer=1, auth=1)
        reply.queries = message.queries
        reply.answers = [answer]
        self.transport.write(reply.toStr(), addr)  # type: ignore[union-attr]


class UDPEcho(protocol.DatagramProtocol):
    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.transport.write(data, addr)  # type: ignore[union-attr]


class CodecTests(TestCase):
    def test_flowDatagram(self) -> None:
        """
        A DATAGRAM payload is the quarter stream ID as a QUIC varint, then
        the packet.
        """
        for qid in (0, 63, 64, 16383, 16384, 2**30):
            self.assertEqual(decodeFlowDatagram(encodeFlowDatagram(qid, b"pkt")), (qid, b"pkt"))
        self.assertEqual(encodeFlowDatagram(1, b"x"), b"\x01x")
        self.assertIsNone(decodeFlowDatagram(b""))

    def test_streamFraming(self) -> None:
        """
        Framed packets survive any split of the byte stream.
        """
        got: list[bytes] = []
        framer = StreamFramer(got.append)
        packets = [b"", b"a", os.urandom(1500), os.urandom(65000)]
        stream = b"".join(StreamFramer.frame(p) for p in packets)
        for i in range(0, len(stream), 7):
            framer.feed(stream[i : i + 7])
        self.assertEqual(got, packets)


class DNSThroughTPTests(QuicTestCase):
    @defer.inlineCallbacks
    def forward(self, transport: str, target: int) -> Any:
        up = Background(
            self, tpCommand() + ["--config", self.clientConfig(), "--transport", transport, "up", "-u", f"127.0.0.1:{target}", "0"]
        )
        line = yield up.waitForStderr(b"; Ctrl-C stops")
        self.assertIn(f"(v1, {transport})".encode(), line)
        return int(re.search(rb"Forwarding UDP 127\.0\.0\.1:(\d+) to", line).group(1))  # type: ignore[union-attr]

    @defer.inlineCallbacks
    def query(self, transport: str) -> Any:
        server = FixedAnswerDNS()
        port = reactor.listenUDP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.startTP(quic=True)
        local = yield self.forward(transport, port.getHost().port)
        resolver = client.Resolver(servers=[("127.0.0.1", local)])
        answers, _, _ = yield resolver.lookupAddress("through-tp.example", timeout=[2, 4])
        self.assertEqual([a.payload.dottedQuad() for a in answers], ["192.0.2.53"])
        self.assertEqual(server.queries, ["through-tp.example"])

    def test_dnsOverQuic(self) -> Any:
        """
        A real DNS query through C{tp up -u} over QUIC (DATAGRAM frames)
        gets its answer.
        """
        return self.query("quic")

    def test_dnsOverTLS(self) -> Any:
        """
        The same query over the TLS fallback (length-framed on the stream).
        """
        return self.query("tls")

    @defer.inlineCallbacks
    def test_largePackets(self) -> Any:
        """
        Packets too big for a DATAGRAM frame go framed on the stream and
        arrive whole, both ways, on one flow.
        """
        echo = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1", maxPacketSize=65536)
        self.addCleanup(echo.stopListening)
        self.startTP(quic=True)
        local = yield self.forward("quic", echo.getHost().port)
        received: defer.DeferredQueue[bytes] = defer.DeferredQueue()

        class Sender(protocol.DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                received.put(data)

        sender = Sender()
        sport = reactor.listenUDP(0, sender, interface="127.0.0.1", maxPacketSize=65536)
        self.addCleanup(sport.stopListening)
        for size in (100, 3000, 20000):
            packet = os.urandom(size)
            sender.transport.write(packet, ("127.0.0.1", local))  # type: ignore[union-attr]
            got = yield received.get().addTimeout(10, reactor)
            self.assertEqual(got, packet)
        session = next(iter(self.listener.sessions.values()))
        self.assertEqual(len(session.flows), 1)

    @defer.inlineCallbacks
    def test_forbiddenUDP(self) -> Any:
        """
        A UDP destination no rule allows: the flow is refused (forbidden,
        reported by tp up) and nothing is sent to it.
        """
        server = FixedAnswerDNS()
        port = reactor.listenUDP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        rules = [{"identities": "*", "hosts": "127.0.0.0/8", "ports": "*", "transports": ["tcp"]}]
        self.config = self.pki.serverConfig(rules)
        from tpproxy.service import makeQuicListener, makeServerFactory
        from tpproxy.test.test_integration import writeClientConfig

        factory = makeServerFactory(self.config, reactor)
        tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(tcp.stopListening)
        self.port = tcp.getHost().port
        self.listener = makeQuicListener(self.config, reactor, factory.wrappedFactory)
        udp = reactor.listenUDP(self.port, self.listener, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        writeClientConfig(self.pki, self.port, cert=str(self.pki.directory / "alice.pem"), key=str(self.pki.directory / "alice.key"), name="alice.toml")
        up = Background(self, tpCommand() + ["--config", self.clientConfig(), "--transport", "quic", "up", "-u", f"127.0.0.1:{port.getHost().port}", "0"])
        line = yield up.waitForStderr(b"; Ctrl-C stops")
        local = int(re.search(rb"Forwarding UDP 127\.0\.0\.1:(\d+) to", line).group(1))  # type: ignore[union-attr]
        probe = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(probe.stopListening)
        probe.write(b"\x00" * 20, ("127.0.0.1", local))
        yield up.waitForStderr(b"forbidden")
        self.assertEqual(server.queries, [])
        events = yield waitForAudits(self.observer, 1)
        self.assertEqual(events[-1]["result"], "forbidden")
        self.assertEqual(events[-1]["transport"], "udp")


class BigAnswer(protocol.DatagramProtocol):
    """
    A UDP server that answers C{big} with a packet of L{size} bytes, then
    C{after}.
    """

    size = 65527  # the largest UDP payload over IPv6

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if data == b"big":
            self.transport.write(b"y" * self.size, addr)  # type: ignore[union-attr]
            self.transport.write(b"after", addr)  # type: ignore[union-attr]


class OversizePacketTests(QuicTestCase):
    """
    A packet too large for the UDP socket it must leave by is dropped and
    the flow goes on, with a note in the audit event (server) or one line
    (C{tp up -u}); never an unhandled error.
    """

    @defer.inlineCallbacks
    def flowTo(self, transport: str, host: str, port: int) -> Any:
        """
        An in-process C{tp up -u} (L{UDPForwarder}) to C{host}:C{port} over
        C{transport}, and a local UDP socket to send from.

        @return: the forwarder's port, the sender's port, a queue of what
            the sender receives, and the lines the forwarder said.
        """
        from tpproxy.cli import buildParser, resolveSettings
        from tpproxy.connector import Connector
        from tpproxy.transports.udp import UDPForwarder
        from tpproxy.wire import ClientHello

        self.startTP(quic=True)
        args = buildParser().parse_args(["--config", self.clientConfig(), "--transport", transport, "up", "-u", f"{host}:{port}", "0"])
        connector = Connector(reactor, resolveSettings(args))
        said: list[str] = []
        forwarder = UDPForwarder(reactor, connector, ClientHello("udp", host=host, port=port, transport="udp"), said.append)
        listening = reactor.listenUDP(0, forwarder, interface="127.0.0.1", maxPacketSize=65536)
        self.addCleanup(listening.stopListening)
        self.addCleanup(connector.close)
        self.addCleanup(lambda: [flow.close() for flow in list(forwarder.flows.values())])
        received: defer.DeferredQueue[bytes] = defer.DeferredQueue()

        class Sender(protocol.DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                received.put(data)

        sender = reactor.listenUDP(0, Sender(), interface="127.0.0.1", maxPacketSize=65536)
        self.addCleanup(sender.stopListening)
        yield connector.choose()
        return forwarder, listening, sender, received, said

    def assertNoCritical(self) -> None:
        from twisted.logger import LogLevel

        critical = [e for e in self.observer if e["log_level"] >= LogLevel.error]
        self.assertEqual(critical, [])

    @defer.inlineCallbacks
    def tooLargeForDestination(self, transport: str) -> Any:
        echo = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1", maxPacketSize=65536)
        self.addCleanup(echo.stopListening)
        forwarder, listening, sender, received, said = yield self.flowTo(transport, "127.0.0.1", echo.getHost().port)
        source = ("127.0.0.1", sender.getHost().port)
        # A local socket cannot hand over more than 65,507 bytes: another
        # client could, so the packet goes in where the socket's would.
        forwarder.datagramReceived(b"x" * 65535, source)
        sender.write(b"after", ("127.0.0.1", listening.getHost().port))
        got = yield received.get().addTimeout(10, reactor)
        self.assertEqual(got, b"after")
        self.assertEqual(list(forwarder.flows), [source])
        if transport == "quic":
            # The small packet went as a DATAGRAM frame, the big one framed
            # on the stream: it may be dropped after the echo came back.
            sessions = self.listener.sessions.values()
            yield waitUntil(lambda: any(f.socket.dropped for s in sessions for f in s.flows.values()), "the drop")
        forwarder.flows[source].close()
        [event] = yield waitForAudits(self.observer, 1)
        self.assertEqual((event["result"], event["transport"], event["via"]), ("ok", "udp", transport))
        self.assertEqual(event["detail"], "1 UDP packet from the client dropped as too large for the destination (largest 65535 bytes)")
        self.assertEqual(event["bytes_up"], len(b"after"))
        self.assertNoCritical()

    def test_tooLargeForDestinationOverTLS(self) -> Any:
        """
        A 65,535-byte packet from the client over the TLS fallback (the
        largest the stream framing carries; IPv4 allows 65,507) is dropped
        by the server, the next packet of the flow still goes through, and
        the flow's audit event says what was dropped.

        Regression (was a bug in tpproxy/udp.py, DestinationSocket.send):
        Twisted raised L{MessageLengthError}, logged at level critical, and
        the tunnel died without a clean close.
        """
        return self.tooLargeForDestination("tls")

    def test_tooLargeForDestinationOverQuic(self) -> Any:
        """
        The same over QUIC, where a packet that large goes framed on the
        flow's stream.  (A QUIC DATAGRAM frame cannot carry more than an
        IPv4 packet holds: the frame itself travels in one UDP packet.)
        """
        return self.tooLargeForDestination("quic")

    @defer.inlineCallbacks
    def tooLargeForClient(self, transport: str) -> Any:
        destination = reactor.listenUDP(0, BigAnswer(), interface="::1", maxPacketSize=65536)
        self.addCleanup(destination.stopListening)
        forwarder, listening, sender, received, said = yield self.flowTo(transport, "::1", destination.getHost().port)
        sender.write(b"big", ("127.0.0.1", listening.getHost().port))
        got = yield received.get().addTimeout(10, reactor)
        self.assertEqual(got, b"after")
        # Over QUIC the small packet is a DATAGRAM frame and may overtake
        # the big one, framed on the stream: wait for the drop.
        deadline = reactor.seconds() + 10
        while not said and reactor.seconds() < deadline:
            yield deferLater(0.02)
        self.assertEqual(len(said), 1)
        self.assertIn(f"a packet of {BigAnswer.size} bytes from the destination was dropped, too large to deliver here", said[0])
        self.assertEqual(len(forwarder.flows), 1)
        self.assertNoCritical()

    def test_tooLargeForClientOverTLS(self) -> Any:
        """
        A 65,527-byte packet from an IPv6 destination cannot be delivered
        to an IPv4 source: C{tp up -u} drops it, says so once, and the next
        packet arrives.

        Regression (was a bug in tpproxy/udp.py, ClientFlow.fromPeer, and
        ServerFlow's receive size of 65,508 bytes, which cut the packet
        short): L{MessageLengthError} escaped from the tunnel's data
        handler and the tunnel died.
        """
        return self.tooLargeForClient("tls")

    def test_tooLargeForClientOverQuic(self) -> Any:
        """
        The same over QUIC, where a packet that large goes framed on the
        flow's stream.
        """
        return self.tooLargeForClient("quic")
