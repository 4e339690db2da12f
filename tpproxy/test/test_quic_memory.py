"""
TP's QUIC transport in memory (L{tpproxy.test.quicmemory}): client
certificates, streams and half-close, resets, flow control and
backpressure, connection migration, DATAGRAM frames, on a fake network
and clock.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IListeningPort, IPushProducer, IReactorUDP, ITransport, IUDPTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tpproxy.test.quicmemory import SERVER, MemoryUDPPort, QuicWorld, Recorder
from tpproxy.test.support import auditObserver, audits
from tpproxy.testing import TestPKI
from tpproxy.transports import quic
from tpproxy.transports.quic import QuicStreamTransport


class MemoryTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = QuicWorld(self.mktemp())
        self.network = self.world.network
        self.reactor = self.world.reactor
        self.observer = auditObserver(self)

    def serverSession(self, listener: quic.QuicListener) -> quic.ServerSession:
        [server] = set(listener.sessions.values())
        return server

    def openStream(self, session: quic.ClientSession, echo: bool = False) -> tuple[QuicStreamTransport, Recorder, Recorder]:
        """
        A stream from the client, with its first bytes sent so the server
        has its end: (client's transport, client's protocol, server's).
        """
        client = Recorder(echo=False)
        stream = session.openStream(client)
        stream.write(b"hello")
        self.network.run(until=lambda: self.world.factory.built and self.world.factory.built[-1].received)
        return stream, client, self.world.factory.built[-1]


class HarnessTests(MemoryTestCase):
    def test_fakesProvideTheirInterfaces(self) -> None:
        """
        The memory network's reactor and ports provide what they declare,
        as the real ones do.
        """
        verifyObject(IReactorUDP, self.reactor)
        listener = self.world.listen()
        port = self.network.ports[SERVER]
        self.assertIsInstance(port, MemoryUDPPort)
        verifyObject(IUDPTransport, port)
        verifyObject(IListeningPort, port)
        self.assertIs(listener.transport, port)

    def test_streamTransportInterfaces(self) -> None:
        """
        A QUIC stream's transport provides the interfaces it declares:
        ITransport, IConsumer and IPushProducer.
        """
        listener = self.world.listen()
        session = self.world.connected()
        stream, _, _ = self.openStream(session)
        [serverStream] = self.serverSession(listener).streams.values()
        for transport in (stream, serverStream):
            for interface in (ITransport, IConsumer, IPushProducer):
                self.assertTrue(verifyObject(interface, transport))


class HandshakeTests(MemoryTestCase):
    def test_handshake(self) -> None:
        """
        A client with a good certificate completes its handshake; the server
        session has its identity and is no longer half-open.
        """
        listener = self.world.listen()
        session = self.world.connected("alice")
        server = self.serverSession(listener)
        self.assertEqual(server.identity, "alice")
        self.assertEqual(listener.halfOpen.count, 0)
        self.assertIsNone(server.deadline)
        self.assertEqual(session.conn.tls.alpn_negotiated, "tp/1")
        self.assertEqual(audits(self.observer), [])

    def test_noTicketsNoResumption(self) -> None:
        """
        TP's QUIC server issues no session ticket, so no later connection
        can resume or send 0-RTT data without presenting its certificate.
        """
        listener = self.world.listen()
        tickets: list[Any] = []
        config = self.world.clientConfiguration("alice")
        original = quic.TPQuicConnection.__init__

        def withHandler(conn: Any, *a: Any, **kw: Any) -> None:
            if kw["configuration"].is_client:
                kw.setdefault("session_ticket_handler", tickets.append)
            original(conn, *a, **kw)

        self.patch(quic.TPQuicConnection, "__init__", withHandler)
        session = self.world.connected(configuration=config)
        self.openStream(session)
        self.network.run()
        self.assertEqual(tickets, [])
        self.assertFalse(session.conn.tls.session_resumed)
        self.assertIsNone(self.serverSession(listener).conn.tls.new_session_ticket_cb)


class VerdictTests(MemoryTestCase):
    """
    QUIC client certificates get the verdict of TP's TLS listener, inside
    the handshake: a refused client never has a stream served.
    """

    def refused(self, configuration: Any, reason: str, **checks: Any) -> quic.ClientSession:
        listener = self.world.listen(verifier=self.world.verifier(**checks))
        session = self.world.connect(configuration=configuration)
        session.ready.addErrback(lambda f: None)
        # In TLS 1.3 the client may finish before the server has checked
        # its certificate: a stream opened then is never served.
        session.ready.addCallback(lambda s: s.openStream(Recorder()).write(b"let me in"))
        self.network.run(until=lambda: session.done.called)
        self.network.run()
        self.assertEqual(self.world.factory.built, [])
        [event] = audits(self.observer)
        self.assertEqual((event["result"], event["event"]), ("handshake_failed", "quic"))
        self.assertIn(reason, event["detail"])
        self.assertEqual((listener.sessions, listener.halfOpen.count), ({}, 0))
        return session

    def test_noCertificate(self) -> None:
        """
        A client that sends no certificate is refused with
        certificate_required.
        """
        session = self.refused(self.world.clientConfiguration(None), "no client certificate")
        self.assertEqual(session.conn._close_event.error_code, 0x100 + 116)

    def test_otherCA(self) -> None:
        other = TestPKI.create(self.mktemp())
        other.client("alice")
        session = self.refused(self.world.clientConfiguration("alice", pki=other), "certificate not accepted")
        self.assertEqual(session.conn._close_event.error_code, 0x100 + 48)  # unknown_ca

    def test_expired(self) -> None:
        self.world.pki.expiredClient("carol")
        self.refused(self.world.clientConfiguration("carol-expired"), "certificate not accepted")

    def test_deniedIdentity(self) -> None:
        self.world.pki.client("mallory")
        session = self.refused(self.world.clientConfiguration("mallory"), "deny list", deniedIdentities=frozenset({"mallory"}))
        self.assertEqual(session.conn._close_event.error_code, 0x100 + 44)  # certificate_revoked

    def test_revoked(self) -> None:
        """
        A certificate on a CRL of the client CA is refused as revoked.
        """
        self.world.pki.client("eve")
        from tpproxy.pki import loadCertificates

        eve = loadCertificates(str(self.world.pki.directory / "eve.pem"))[0]
        crl = self.world.pki.ca.crl([eve.serial_number])
        self.refused(self.world.clientConfiguration("eve"), "revoked", crls=(crl,))


class StreamTests(MemoryTestCase):
    """
    Each bidirectional stream is a Twisted transport with half-close.
    """

    def test_roundTripAndHalfClose(self) -> None:
        """
        Bytes go both ways; the client's FIN is C{readConnectionLost} at the
        server, which can still answer; both ends see C{ConnectionDone} once
        both directions have ended.
        """
        listener = self.world.listen()
        session = self.world.connected()
        stream, client, server = self.openStream(session)
        self.assertEqual(server.handshakes, 1)
        self.assertEqual(server.transport.getPeerCertificate().to_cryptography(), session.conn.configuration.certificate)  # type: ignore[union-attr]
        stream.write(b" world")
        stream.loseWriteConnection()
        self.network.run(until=lambda: server.readClosed)
        self.assertEqual(server.data, b"hello world")
        self.assertFalse(server.lost)
        server.transport.write(b"answer")  # type: ignore[union-attr]
        server.transport.loseWriteConnection()  # type: ignore[union-attr]
        self.network.run(until=lambda: client.lost and server.lost)
        self.assertEqual((client.data, client.readClosed), (b"answer", True))
        client.lostReason.trap(ConnectionDone)  # type: ignore[union-attr]
        server.lostReason.trap(ConnectionDone)  # type: ignore[union-attr]
        self.assertEqual((session.streams, self.serverSession(listener).streams), ({}, {}))

    def test_manyStreams(self) -> None:
        """
        Streams of one connection are independent: 20 echoes each get
        their own bytes back.
        """
        self.world.listen(factory=None)
        self.world.factory.echo = True
        session = self.world.connected()
        clients = []
        for i in range(20):
            client = Recorder()
            stream = session.openStream(client)
            stream.write(b"%d " % i * 1000)
            stream.loseWriteConnection()
            clients.append(client)
        self.network.run(until=lambda: all(c.lost for c in clients))
        for i, client in enumerate(clients):
            self.assertEqual(client.data, b"%d " % i * 1000)
        self.assertEqual(len(self.world.factory.built), 20)

    def test_abortResetsBothWays(self) -> None:
        """
        C{abortConnection} resets the stream and stops the peer's sending:
        the other end loses it at once with C{ConnectionLost}, the
        connection goes on.
        """
        listener = self.world.listen()
        session = self.world.connected()
        stream, client, server = self.openStream(session)
        stream.abortConnection()
        self.network.run(until=lambda: server.lost)
        server.lostReason.trap(ConnectionLost)  # type: ignore[union-attr]
        client.lostReason.trap(ConnectionLost)  # type: ignore[union-attr]
        self.assertIn("reset", server.lostReason.getErrorMessage())  # type: ignore[union-attr]
        self.assertEqual(self.serverSession(listener).streams, {})
        _, _, again = self.openStream(session)
        self.assertEqual(again.data, b"hello")

    def test_loseConnectionStopsPeer(self) -> None:
        """
        The server's C{loseConnection} before the client's FIN sends FIN
        and STOP_SENDING: the client reads EOF, and its later writes are
        dropped without error.
        """
        self.world.listen()
        session = self.world.connected()
        stream, client, server = self.openStream(session)
        server.transport.loseConnection()  # type: ignore[union-attr]
        self.network.run(until=lambda: client.readClosed)
        self.network.run()
        stream.write(b"more")
        self.network.run()
        self.assertEqual(server.data, b"hello")
        server.lostReason.trap(ConnectionDone)  # type: ignore[union-attr]

    def test_connectionCloseLosesStreams(self) -> None:
        """
        When the connection closes, every stream on both ends is lost.
        """
        listener = self.world.listen()
        session = self.world.connected()
        streams = [self.openStream(session) for _ in range(3)]
        session.close(0, "bye")
        self.network.run(until=lambda: all(s.lost for _, _, s in streams))
        for _, client, server in streams:
            self.assertTrue(client.lost)
            self.assertIn("bye", server.lostReason.getErrorMessage())  # type: ignore[union-attr]
        self.network.run(until=lambda: not listener.sessions)

    def test_onlyClientBidirectionalStreams(self) -> None:
        """
        The server serves only bidirectional streams the client opens: a
        unidirectional one is stopped and no protocol is built for it.
        """
        self.world.listen()
        session = self.world.connected()
        streamId = session.conn.get_next_available_stream_id(is_unidirectional=True)
        session.conn.send_stream_data(streamId, b"not a tunnel", end_stream=True)
        session.transmit()
        self.network.run()
        self.assertEqual(self.world.factory.built, [])

    def test_serverStreamNeedsHandler(self) -> None:
        """
        A stream the server opens reaches the client only if it has an
        incoming handler (a reverse tunnel's exposer); else it is stopped.
        """
        listener = self.world.listen()
        session = self.world.connected()
        self.openStream(session)
        server = self.serverSession(listener)
        pushed = Recorder()
        server.openStream(pushed).write(b"incoming")
        self.network.run()
        self.assertEqual(session.streams.keys() - {0}, set())
        received = Recorder()
        session.incomingHandler = lambda: received
        server.openStream(Recorder()).write(b"incoming")
        self.network.run(until=lambda: received.received)
        self.assertEqual(received.data, b"incoming")


class FlowControlTests(MemoryTestCase):
    """
    What TP holds for a stream is bounded by what it has handed on, and a
    stream's producer is paused while its data is unacknowledged.
    """

    def test_pausedReaderBoundsReceiver(self) -> None:
        """
        A server protocol that pauses its stream (a stalled destination)
        stops TP's credit to the client: the client's data waits on the
        client, and what TP received stays within its window, however much
        the client writes.  Resuming delivers it all, in order.
        """
        self.patch(quic, "STREAM_WINDOW", 64 * 1024)
        listener = self.world.listen()
        session = self.world.connected()
        stream, _, server = self.openStream(session)
        server.transport.pauseProducing()  # type: ignore[union-attr]
        data = os.urandom(1536 * 1024)
        stream.write(data)
        stream.loseWriteConnection()
        self.network.run()
        serverConn = self.serverSession(listener).conn
        [serverStream] = self.serverSession(listener).streams.values()
        received = serverConn._streams[serverStream.streamId].receiver.highest_offset
        initial = listener.configuration.max_stream_data
        self.assertLessEqual(received, max(initial, len(b"hello") + quic.STREAM_WINDOW))
        self.assertGreater(session.conn.sendBuffered(stream.streamId), len(data) - received)
        self.assertEqual(server.data, b"hello")
        server.transport.resumeProducing()  # type: ignore[union-attr]
        self.network.run(until=lambda: server.readClosed, timeout=120)
        self.assertEqual(server.data, b"hello" + data)

    def test_pauseKeepsOrderAndEOF(self) -> None:
        """
        Data and FIN that arrive while paused are held, then delivered in
        order, the FIN last; a protocol that pauses again on delivery
        keeps the rest held.
        """
        self.world.listen()
        session = self.world.connected()
        stream, _, server = self.openStream(session)
        server.transport.pauseProducing()  # type: ignore[union-attr]
        for chunk in (b"a", b"b", b"c"):
            stream.write(chunk)
            self.network.run()
        stream.loseWriteConnection()
        self.network.run()
        self.assertEqual((server.data, server.readClosed), (b"hello", False))
        transport = server.transport
        original = server.dataReceived

        def pauseAfterOne(data: bytes) -> None:
            original(data)
            transport.pauseProducing()  # type: ignore[union-attr]

        server.dataReceived = pauseAfterOne  # type: ignore[method-assign]
        transport.resumeProducing()  # type: ignore[union-attr]
        self.assertFalse(server.readClosed)
        server.dataReceived = original  # type: ignore[method-assign]
        transport.resumeProducing()  # type: ignore[union-attr]
        self.assertEqual((server.data, server.readClosed), (b"helloabc", True))

    def test_producerPausedAboveHighWater(self) -> None:
        """
        A producer registered on a stream is paused once more than
        SEND_HIGH_WATER bytes are unacknowledged, and resumed when the
        peer's acknowledgements bring it under SEND_LOW_WATER.
        """
        self.patch(quic, "SEND_HIGH_WATER", 256 * 1024)
        self.patch(quic, "SEND_LOW_WATER", 64 * 1024)
        self.world.listen()
        session = self.world.connected()
        stream, _, server = self.openStream(session)
        calls: list[str] = []

        class Producer:
            def pauseProducing(self) -> None:
                calls.append("pause")

            def resumeProducing(self) -> None:
                calls.append("resume")

            def stopProducing(self) -> None:
                calls.append("stop")

        stream.registerProducer(Producer(), True)
        stream.write(os.urandom(quic.SEND_HIGH_WATER // 2))
        self.assertEqual(calls, [])
        stream.write(os.urandom(quic.SEND_HIGH_WATER // 2 + 1))
        self.assertEqual(calls, ["pause"])
        self.network.run(until=lambda: calls == ["pause", "resume"], timeout=60)
        self.assertLess(session.conn.sendBuffered(stream.streamId), quic.SEND_LOW_WATER)
        stream.unregisterProducer()
        self.assertEqual(session.blocked, set())


class MigrationTests(MemoryTestCase):
    def test_rebindMidTransfer(self) -> None:
        """
        The client moves to a new UDP port in the middle of a transfer; the
        server validates the new path, sends there, and the stream
        completes intact.
        """
        listener = self.world.listen()
        session = self.world.connected()
        stream, client, server = self.openStream(session)
        server.echo = True
        first, second = os.urandom(300 * 1024), os.urandom(300 * 1024)
        oldPort = session.socket.transport.getHost().port  # type: ignore[union-attr]
        stream.write(first)
        self.network.run(until=lambda: len(server.data) > 100 * 1024)
        session.rebind()
        newPort = session.socket.transport.getHost().port  # type: ignore[union-attr]
        self.assertNotEqual(oldPort, newPort)
        self.assertNotIn(("127.0.0.1", oldPort), self.network.ports)
        stream.write(second)
        stream.loseWriteConnection()
        self.network.run(until=lambda: client.lost, timeout=120)
        self.assertEqual(server.data, b"hello" + first + second)
        self.assertEqual(client.data, first + second)
        self.assertEqual(self.serverSession(listener).peer, ("127.0.0.1", newPort))


class DatagramTests(MemoryTestCase):
    """
    UDP flows ride DATAGRAM frames (tpproxy.transports.udp): the quarter
    stream ID picks the flow.
    """

    def test_flowDatagrams(self) -> None:
        listener = self.world.listen()
        session = self.world.connected()
        stream, _, _ = self.openStream(session)
        server = self.serverSession(listener)
        got: list[bytes] = []
        back: list[bytes] = []

        class Flow:
            def __init__(self, into: list[bytes]) -> None:
                self.fromPeer = into.append

        server.flows[stream.streamId // 4] = Flow(got)
        session.flows[stream.streamId // 4] = Flow(back)
        session.sendFlowDatagram(stream.streamId // 4, b"query")
        session.sendFlowDatagram(stream.streamId // 4 + 1, b"no such flow")
        self.network.run(until=lambda: got)
        server.sendFlowDatagram(stream.streamId // 4, b"answer")
        self.network.run(until=lambda: back)
        self.assertEqual((got, back), ([b"query"], [b"answer"]))

    def test_closedSessionSendsNothing(self) -> None:
        self.world.listen()
        session = self.world.connected()
        session.close(0, "bye")
        self.network.run()
        before = self.network.delivered
        session.sendFlowDatagram(0, b"late")
        self.network.run()
        self.assertEqual(self.network.delivered, before)
