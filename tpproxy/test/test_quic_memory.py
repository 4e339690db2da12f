"""
TP's QUIC transport in memory (L{tpproxy.test.quicmemory}): client
certificates, streams and half-close, resets, flow control and
backpressure, connection migration, DATAGRAM frames, on a fake network
and clock.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IListeningPort, IPushProducer, IReactorUDP, ITransport, IUDPTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tpproxy.test.quicmemory import SERVER, MemoryUDPPort, QuicWorld, Recorder
from tpproxy.test.support import auditObserver, audits
from tpproxy.testing import TestPKI
from tpproxy.transports import quic
from tpproxy.transports.quic import STREAM_ABORTED, QuicStreamTransport


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
