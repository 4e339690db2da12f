"""
The HTTP/3 responder of TP's QUIC listener, on loopback with real UDP
sockets: browsers (here aioquic's HTTP/3 client) get the configured answer
without a client certificate, while tp/1 clients stay as strict as ever and
an h3 connection never reaches TP's protocols.
"""

from __future__ import annotations

from typing import Any

from aioquic.h3.connection import ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy.transports import h3
from tpproxy.transports.h3 import H3Response
from tpproxy.protocols.client import TPClientProtocol, TunnelError
from tpproxy.transports.quic import (
    ClientSession,
    ClientSocket,
    ClientVerifier,
    QuicListener,
    TPQuicConnection,
    clientConfiguration,
    connectQuic,
    serverConfiguration,
)
from tpproxy.service import makeServerFactory
from tpproxy.testing import TestPKI
from tpproxy.pki import loadCertificates, loadKey
from tpproxy.wire import ALPN, ClientHello

from tpproxy.test.support import HashSink, auditObserver, audits, deferLater, listenLocal, waitForAudits
from tpproxy.test.test_quic import waitUntil

REDIRECT = H3Response.redirect("https://www.example.org/")
PAGE = H3Response.page("<h1>Nothing to see</h1>\n", status=200)


class H3ResponseTests(SynchronousTestCase):
    """
    L{H3Response}: the fields it sends, and what it refuses to send.
    """

    def test_redirect(self) -> None:
        self.assertEqual(
            REDIRECT.fields(),
            [(b":status", b"308"), (b"location", b"https://www.example.org/"), (b"content-length", b"0")],
        )
        self.assertEqual(H3Response.redirect("/x", status=302).status, 302)

    def test_page(self) -> None:
        page = H3Response.page("caf\u00e9", contentType="text/plain; charset=utf-8", status=404)
        self.assertEqual(page.body, "caf\u00e9".encode())
        self.assertEqual(
            page.fields(),
            [(b":status", b"404"), (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"5")],
        )

    def test_namesLowercased(self) -> None:
        response = H3Response(200, (("Cache-Control", "no-store"),), b"x")
        self.assertEqual(response.headers, (("cache-control", "no-store"),))

    def test_refused(self) -> None:
        for make in [
            lambda: H3Response(103),
            lambda: H3Response(600),
            lambda: H3Response(204, body=b"x"),
            lambda: H3Response(200, ((":status", "200"),)),
            lambda: H3Response(200, (("connection", "close"),)),
            lambda: H3Response(200, (("content-length", "3"),)),
            lambda: H3Response(200, (("x-a", "b\r\nset-cookie: c"),)),
            lambda: H3Response(200, (("x-a", "caf\u00e9"),)),
            lambda: H3Response(200, (("bad name", "v"),)),
            lambda: H3Response(200, body=b"x" * (h3.MAX_BODY + 1)),
            lambda: H3Response.redirect("https://www.example.org/", status=200),
            lambda: H3Response.redirect(""),
            lambda: H3Response.redirect(None),  # type: ignore[arg-type]
            lambda: H3Response(True),  # type: ignore[arg-type]
            lambda: H3Response(200, (("x-a", 1),)),  # type: ignore[arg-type]
            lambda: H3Response(200, body="text"),  # type: ignore[arg-type]
        ]:
            self.assertRaises(ValueError, make)


class H3Client(ClientSession):
    """
    aioquic's HTTP/3 client side over TP's client plumbing (L{ClientSocket},
    the reactor's clock): what a browser does, in the test process.
    """

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.http: H3Connection | None = None
        self.responses: dict[int, dict[str, Any]] = {}
        self.resets: dict[int, int] = {}
        self.stops: dict[int, int] = {}
        self.closeEvent: events.ConnectionTerminated | None = None

    def handleEvent(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ProtocolNegotiated) and event.alpn_protocol == "h3":
            self.http = H3Connection(self.conn)
        if self.http is not None and isinstance(event, (events.StreamDataReceived, events.StreamReset, events.StopSendingReceived)):
            if isinstance(event, events.StreamReset):
                self.resets[event.stream_id] = event.error_code
                self._finish(event.stream_id)
            elif isinstance(event, events.StopSendingReceived):
                self.stops[event.stream_id] = event.error_code
            for h3event in self.http.handle_event(event):
                response = self.responses.get(h3event.stream_id)  # type: ignore[attr-defined]
                if response is None:
                    continue
                if isinstance(h3event, HeadersReceived):
                    response["headers"] = dict(h3event.headers)
                elif isinstance(h3event, DataReceived):
                    response["body"] += h3event.data
                if h3event.stream_ended:  # type: ignore[attr-defined]
                    self._finish(h3event.stream_id)  # type: ignore[attr-defined]
            return
        super().handleEvent(event)

    def _finish(self, streamId: int) -> None:
        response = self.responses.get(streamId)
        if response is not None and not response["done"].called:
            response["done"].callback(response)

    def terminated(self, event: events.ConnectionTerminated) -> None:
        self.closeEvent = event
        for streamId in list(self.responses):
            self._finish(streamId)
        super().terminated(event)

    def request(self, path: bytes = b"/", method: bytes = b"GET", body: bytes | None = None) -> defer.Deferred[dict[str, Any]]:
        """
        Send a request; the result has C{headers} (a dict, missing when the
        stream was reset), C{body}, and the stream ID.
        """
        assert self.http is not None
        streamId = self.conn.get_next_available_stream_id()
        done: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.responses[streamId] = {"stream": streamId, "body": b"", "done": done}
        headers = [(b":method", method), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", path), (b"user-agent", b"tp-test")]
        self.http.send_headers(streamId, headers, end_stream=body is None)
        if body is not None:
            self.http.send_data(streamId, body, end_stream=True)
        self.transmit()
        return done.addTimeout(5, reactor)

    def rawStream(self, data: bytes, end: bool = True) -> tuple[int, defer.Deferred[dict[str, Any]]]:
        """
        Bytes of our own on a new bidirectional stream, not HTTP/3.
        """
        streamId = self.conn.get_next_available_stream_id()
        done: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.responses[streamId] = {"stream": streamId, "body": b"", "done": done}
        self.conn.send_stream_data(streamId, data, end_stream=end)
        self.transmit()
        return streamId, done


def connectH3(address: tuple[str, int], configuration: QuicConfiguration) -> H3Client:
    socket = ClientSocket(reactor, None, "ipv4", address)
    session = H3Client(reactor, TPQuicConnection(configuration=configuration), socket, address)
    socket.session = session
    session.conn.connect(address, now=reactor.seconds())  # type: ignore[attr-defined]
    session.transmit()
    return session


class H3ListenerTests(TestCase):
    """
    A QuicListener with an H3 response, on 127.0.0.1.
    """

    timeout = 30

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        self.observer = auditObserver(self)
        self.built: list[Any] = []

    def startTP(self, response: H3Response | None = REDIRECT) -> int:
        """
        TP's QUIC listener as C{makeQuicListener} makes it, plus C{response};
        every TP server protocol it builds is recorded in C{self.built}.
        """
        self.config = self.pki.serverConfig()
        tpFactory = makeServerFactory(self.config, reactor).wrappedFactory
        build = tpFactory.buildProtocol

        def recordingBuild(addr: Any) -> Any:
            protocol = build(addr)
            self.built.append(protocol)
            return protocol

        self.patch(tpFactory, "buildProtocol", recordingBuild)
        tlsContext = tpFactory.serverTLS
        verifier = ClientVerifier(tlsContext.clientCAs, tlsContext.checker, reactor)
        self.listener = QuicListener(reactor, serverConfiguration(tlsContext.chain, tlsContext.key), verifier, tpFactory, h3=response)
        udp = reactor.listenUDP(0, self.listener, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        self.port = udp.getHost().port
        return self.port

    def caPEM(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in loadCertificates(self.pki.caPath))

    def h3Config(self, alpn: tuple[str, ...] = ("h3",), certificate: str | None = None) -> QuicConfiguration:
        """
        A browser's configuration: ALPN h3, TP's CA trusted, and no client
        certificate unless C{certificate} names one of the test PKI's.
        """
        config = QuicConfiguration(is_client=True, alpn_protocols=list(alpn), server_name="localhost")
        config.cadata = self.caPEM()
        if certificate is not None:
            d = self.pki.directory
            config.certificate = loadCertificates(str(d / f"{certificate}.pem"))[0]
            config.private_key = loadKey(str(d / f"{certificate}.key"))
        return config

    def tpConfig(self, name: str | None = "alice", pki: TestPKI | None = None) -> QuicConfiguration:
        if name is None:
            config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN.decode()], server_name="localhost")
            config.cadata = self.caPEM()
            return config
        d = (pki or self.pki).directory
        return clientConfiguration("localhost", loadCertificates(self.pki.caPath), loadCertificates(str(d / f"{name}.pem")), loadKey(str(d / f"{name}.key")))

    def close(self, session: Any) -> None:
        if not session.closed:
            session.close(0, "test done")
        session.socket.stop()
        session.abandon()

    @defer.inlineCallbacks
    def browser(self, **kw: Any) -> Any:
        session = connectH3(("127.0.0.1", self.port), self.h3Config(**kw))
        self.addCleanup(self.close, session)
        yield session.ready.addTimeout(5, reactor)
        return session

    def serverSession(self) -> Any:
        [server] = set(self.listener.sessions.values())
        return server


class BrowserTests(H3ListenerTests):
    @defer.inlineCallbacks
    def test_redirect(self) -> Any:
        """
        An h3 client without a certificate gets the redirect: no
        CertificateRequest, no identity, no TP protocol, no audit event.
        """
        self.startTP(REDIRECT)
        self.assertEqual(self.listener.configuration.alpn_protocols, ["tp/1", "h3"])
        session = yield self.browser()
        response = yield session.request(b"/some/path?q=1")
        self.assertEqual(response["headers"][b":status"], b"308")
        self.assertEqual(response["headers"][b"location"], b"https://www.example.org/")
        self.assertEqual(response["body"], b"")
        self.assertNotIn(b"alt-svc", response["headers"])
        self.assertIsNone(session.conn.tls._certificate_request)
        server = self.serverSession()
        self.assertEqual(server.conn.tls.alpn_negotiated, "h3")
        self.assertIsNotNone(server.responder)
        self.assertIsNone(server.identity)
        self.assertIsNone(server.conn.tls._peer_certificate)
        session.close(0, "done")
        yield deferLater(0.2)
        self.assertEqual(self.built, [])
        self.assertEqual(audits(self.observer), [])

    @defer.inlineCallbacks
    def test_pageAndHead(self) -> Any:
        """
        The static page: GET gets the body, HEAD the same headers without
        it, on one connection.
        """
        self.startTP(PAGE)
        session = yield self.browser()
        get = yield session.request(b"/")
        head = yield session.request(b"/", method=b"HEAD")
        for response in (get, head):
            self.assertEqual(response["headers"][b":status"], b"200")
            self.assertEqual(response["headers"][b"content-type"], b"text/html; charset=utf-8")
        self.assertEqual(get["headers"][b"content-length"], str(len(PAGE.body)).encode())
        self.assertEqual(get["body"], PAGE.body)
        self.assertEqual(head["body"], b"")
        self.assertIsNone(session.closeEvent)

    @defer.inlineCallbacks
    def test_browserCertificateNotAsked(self) -> Any:
        """
        An h3 client that has a client certificate is not asked for it, so
        it sends none (a browser would otherwise prompt).
        """
        self.startTP()
        session = yield self.browser(certificate="alice")
        response = yield session.request()
        self.assertEqual(response["headers"][b":status"], b"308")
        self.assertIsNone(session.conn.tls._certificate_request)
        self.assertIsNone(self.serverSession().conn.tls._peer_certificate)

    @defer.inlineCallbacks
    def test_postBodyNotRead(self) -> Any:
        """
        A request body is not read: the response comes, and the client is
        asked to stop sending with H3_NO_ERROR.
        """
        self.startTP()
        session = yield self.browser()
        streamId = session.conn.get_next_available_stream_id()
        done: defer.Deferred[Any] = defer.Deferred()
        session.responses[streamId] = {"stream": streamId, "body": b"", "done": done}
        session.http.send_headers(streamId, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", b"/")])
        session.http.send_data(streamId, b"x" * 1000, end_stream=False)
        session.transmit()
        response = yield done.addTimeout(5, reactor)
        self.assertEqual(response["headers"][b":status"], b"308")
        yield waitUntil(lambda: streamId in session.stops, "STOP_SENDING for the request stream")
        self.assertEqual(session.stops.get(streamId), ErrorCode.H3_NO_ERROR)

    @defer.inlineCallbacks
    def test_noH3ByDefault(self) -> Any:
        """
        Without an H3 response the listener offers tp/1 only: an h3 client
        fails its handshake, audited as before.
        """
        self.startTP(None)
        self.assertEqual(self.listener.configuration.alpn_protocols, ["tp/1"])
        session = connectH3(("127.0.0.1", self.port), self.h3Config())
        self.addCleanup(self.close, session)
        yield self.assertFailure(session.ready.addTimeout(5, reactor), Exception)
        [event] = yield waitForAudits(self.observer, 1)
        self.assertEqual(event["result"], "handshake_failed")

    def test_h3OfferedWithoutResponse(self) -> None:
        """
        A configuration that offers h3 needs a response to answer with.
        """
        self.config = self.pki.serverConfig()
        tpFactory = makeServerFactory(self.config, reactor).wrappedFactory
        configuration = serverConfiguration(tpFactory.serverTLS.chain, tpFactory.serverTLS.key)
        configuration.alpn_protocols = ["tp/1", "h3"]
        self.assertRaises(ValueError, QuicListener, reactor, configuration, None, tpFactory)


class IsolationTests(H3ListenerTests):
    """
    An h3 connection never reaches TP; tp/1 connections are as strict as
    without the responder.
    """

    @defer.inlineCallbacks
    def test_tpHelloOnH3Stream(self) -> Any:
        """
        A TP ClientHello sent on a stream of an h3 connection goes to the H3
        layer (which closes the connection: it is no HTTP/3), never to a TP
        protocol: nothing is proxied, nothing audited.
        """
        sinkPort, sink = listenLocal(self, HashSink)
        self.startTP()
        session = yield self.browser()
        server = self.serverSession()
        streamId, done = session.rawStream(ClientHello.connect("127.0.0.1", sinkPort).toFrame() + b"payload")
        yield session.done.addTimeout(5, reactor)
        self.assertGreater(server.responder.received[streamId], 0)
        self.assertEqual(server.streams, {})
        self.assertIsNotNone(session.closeEvent)
        # An HTTP/3 error (H3_FRAME_UNEXPECTED: the length prefix of a TP
        # frame reads as a DATA frame before HEADERS).
        self.assertIn(session.closeEvent.error_code, list(ErrorCode))
        yield deferLater(0.2)
        self.assertEqual((self.built, sink.accepted, audits(self.observer)), ([], 0, []))

    @defer.inlineCallbacks
    def test_tpWithCertificate(self) -> Any:
        """
        A tp/1 client with a good certificate is asked for it, and reaches
        TP's server protocol as before.
        """
        sinkPort, sink = listenLocal(self, HashSink)
        self.startTP()
        session = connectQuic(reactor, ("127.0.0.1", self.port), self.tpConfig("alice"))
        self.addCleanup(self.close, session)
        yield session.ready.addTimeout(5, reactor)
        self.assertIsNotNone(session.conn.tls._certificate_request)
        ready: defer.Deferred[Any] = defer.Deferred()
        session.openStream(TPClientProtocol(ClientHello.connect("127.0.0.1", sinkPort), ready))
        yield ready.addTimeout(5, reactor)
        server = self.serverSession()
        self.assertIsNone(server.responder)
        self.assertEqual(server.identity, "alice")
        self.assertEqual(len(self.built), 1)
        self.assertFalse(server.conn.tpAnonymous)

    @defer.inlineCallbacks
    def refused(self, config: QuicConfiguration, reason: str) -> Any:
        """
        The client is refused in the handshake; the audit event says why.
        """
        self.startTP()
        session = connectQuic(reactor, ("127.0.0.1", self.port), config)
        self.addCleanup(self.close, session)
        try:
            yield session.ready
        except TunnelError:
            pass  # the refusal came before the client's handshake ended
        yield session.done.addTimeout(10, reactor)
        self.assertIsNotNone(session.conn.tls._certificate_request)
        [event] = yield waitForAudits(self.observer, 1)
        self.assertEqual((event["result"], event["event"]), ("handshake_failed", "quic"))
        self.assertIn(reason, event["detail"])
        self.assertEqual((self.built, self.listener.sessions), ([], {}))

    def test_tpWithoutCertificate(self) -> Any:
        return self.refused(self.tpConfig(None), "no client certificate")

    def test_tpOtherCA(self) -> Any:
        other = TestPKI.create(self.mktemp())
        other.client("alice")
        return self.refused(self.tpConfig("alice", pki=other), "certificate not accepted")

    def test_bothOfferedWithoutCertificate(self) -> Any:
        """
        A client offering h3 and tp/1 gets tp/1 (the server's preference),
        with its certificate requirement.
        """
        config = self.tpConfig(None)
        config.alpn_protocols = ["h3", "tp/1"]
        return self.refused(config, "no client certificate")


class LimitTests(H3ListenerTests):
    """
    What an anonymous client can make TP hold.
    """

    @defer.inlineCallbacks
    def test_oversizedRequest(self) -> Any:
        """
        A request whose headers do not end within REQUEST_LIMIT bytes is
        reset both ways with H3_EXCESSIVE_LOAD; the connection goes on.
        """
        self.startTP()
        session = yield self.browser()
        # A HEADERS frame (type 1) announcing 1 MiB, then more than the limit.
        streamId, done = session.rawStream(b"\x01\x80\x10\x00\x00" + b"\0" * (h3.REQUEST_LIMIT + 1000), end=False)
        yield done.addTimeout(5, reactor)
        self.assertEqual(session.resets[streamId], ErrorCode.H3_EXCESSIVE_LOAD)
        server = self.serverSession()
        # The H3 layer dropped what it had buffered for the stream.
        self.assertEqual(getattr(server.responder.http._stream.get(streamId), "buffer", b""), b"")
        response = yield session.request()
        self.assertEqual(response["headers"][b":status"], b"308")

    @defer.inlineCallbacks
    def test_receiveBudgetFixed(self) -> Any:
        """
        An h3 connection's MAX_DATA is never raised (aioquic doubles it when
        half is used): its stream data in all is bounded by max_data.
        """
        self.startTP()
        session = yield self.browser()
        initial = self.listener.configuration.max_data
        dones = [session.rawStream(b"\x01\x80\x10\x00\x00" + b"\0" * (h3.REQUEST_LIMIT + 100), end=False)[1] for _ in range(20)]
        yield defer.gatherResults([d.addTimeout(5, reactor) for d in dones])
        server = self.serverSession()
        self.assertGreater(server.conn._local_max_data.used * 2, initial)
        # Once all the client sent is acknowledged, TP has sent packets
        # since it got the data, and the client has read them: a MAX_DATA
        # would have come with them.
        yield waitUntil(lambda: session.conn._loss.bytes_in_flight == 0, "the client's data acknowledged")
        self.assertEqual(server.conn._local_max_data.value, initial)
        self.assertEqual(session.conn._remote_max_data, initial)

    @defer.inlineCallbacks
    def test_pendingResponses(self) -> Any:
        """
        At most MAX_PENDING responses wait for their acknowledgement; requests
        beyond are rejected with H3_REQUEST_REJECTED (a client may retry).
        """
        self.startTP()
        session = yield self.browser()
        responses = yield defer.gatherResults([session.request() for _ in range(h3.MAX_PENDING + 4)])
        answered = [r for r in responses if "headers" in r]
        self.assertEqual(len(answered), h3.MAX_PENDING)
        rejected = [session.resets[r["stream"]] for r in responses if "headers" not in r]
        self.assertEqual(rejected, [ErrorCode.H3_REQUEST_REJECTED] * 4)
        # Once the client has acknowledged the responses, requests are
        # answered again.
        server = self.serverSession()
        yield waitUntil(
            lambda: not any(server.conn.sendBuffered(s) for s in server.responder.pending), "the responses acknowledged"
        )
        response = yield session.request()
        self.assertEqual(response["headers"][b":status"], b"308")

    @defer.inlineCallbacks
    def test_requestLimit(self) -> Any:
        """
        A connection serves MAX_REQUESTS requests, then is closed.
        """
        self.patch(h3, "MAX_REQUESTS", 3)
        self.startTP()
        session = yield self.browser()
        for _ in range(3):
            response = yield session.request()
            self.assertEqual(response["headers"][b":status"], b"308")
        session.request()
        yield session.done.addTimeout(5, reactor)
        self.assertEqual(session.closeEvent.error_code, ErrorCode.H3_EXCESSIVE_LOAD)
        self.assertEqual(audits(self.observer), [])

    @defer.inlineCallbacks
    def test_uniLimit(self) -> Any:
        """
        The client's control and QPACK streams have a budget too.
        """
        self.patch(h3, "UNI_LIMIT", 4)
        self.startTP()
        session = connectH3(("127.0.0.1", self.port), self.h3Config())
        self.addCleanup(self.close, session)
        session.ready.addErrback(lambda f: None)
        yield session.done.addTimeout(5, reactor)
        self.assertEqual(session.closeEvent.error_code, ErrorCode.H3_EXCESSIVE_LOAD)
