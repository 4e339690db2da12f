"""
The HTTP/3 responder of TP's QUIC listener: browsers (here aioquic's HTTP/3
client) get the configured answer without a client certificate, while tp/1
clients stay as strict as ever and an h3 connection never reaches TP's
protocols.  In memory (L{tpproxy.test.quicmemory}), with one end-to-end
test on loopback UDP.
"""

from __future__ import annotations

from typing import Any

from aioquic.h3.connection import ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy.reactors import IUDPReactor
from tpproxy.test.quicmemory import SERVER, QuicWorld, Recorder
from tpproxy.test.support import auditObserver, audits, closeAtEnd
from tpproxy.testing import TestPKI
from tpproxy.transports import h3
from tpproxy.transports.h3 import H3Response
from tpproxy.transports.quic import ClientSession, ClientSocket, QuicListener, TPQuicConnection, serverConfiguration
from tpproxy.wire import ClientHello

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
        return done

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


def connectH3(reactor: IUDPReactor, address: tuple[str, int], configuration: QuicConfiguration) -> H3Client:
    socket = ClientSocket(reactor, None, "ipv4", address)
    session = H3Client(reactor, TPQuicConnection(configuration=configuration), socket, address)
    socket.session = session
    session.conn.connect(address, now=reactor.seconds())  # type: ignore[attr-defined]
    session.transmit()
    return session


class H3ListenerTests(SynchronousTestCase):
    """
    A QuicListener with an H3 response, on a memory network; every stream
    protocol it builds is recorded in C{self.built}.
    """

    def setUp(self) -> None:
        self.world = QuicWorld(self.mktemp())
        self.network = self.world.network
        self.observer = auditObserver(self)

    def startTP(self, response: H3Response | None = REDIRECT) -> QuicListener:
        self.listener = self.world.listen(h3=response)
        self.built = self.world.factory.built
        return self.listener

    def h3Config(self, alpn: tuple[str, ...] = ("h3",), certificate: str | None = None) -> QuicConfiguration:
        """
        A browser's configuration: ALPN h3, TP's CA trusted, and no client
        certificate unless C{certificate} names one of the test PKI's.
        """
        config = self.world.clientConfiguration(certificate)
        config.alpn_protocols = list(alpn)
        return config

    def result(self, d: defer.Deferred[Any]) -> Any:
        """
        Run the network until C{d} fires; its result (a failure is raised).
        """
        self.network.run(until=lambda: d.called)
        out: list[Any] = []
        d.addBoth(out.append)
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    def connect(self, **kw: Any) -> H3Client:
        return connectH3(self.world.reactor, SERVER, self.h3Config(**kw))

    def browser(self, **kw: Any) -> H3Client:
        session = self.connect(**kw)
        self.result(session.ready)
        return session

    def serverSession(self) -> Any:
        [server] = set(self.listener.sessions.values())
        return server


class BrowserTests(H3ListenerTests):
    def test_redirect(self) -> None:
        """
        An h3 client without a certificate gets the redirect: no
        CertificateRequest, no identity, no TP protocol, no audit event.
        """
        self.startTP(REDIRECT)
        self.assertEqual(self.listener.configuration.alpn_protocols, ["tp/1", "h3"])
        session = self.browser()
        response = self.result(session.request(b"/some/path?q=1"))
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
        self.network.run(until=lambda: not self.listener.sessions)
        self.assertEqual(self.built, [])
        self.assertEqual(audits(self.observer), [])

    def test_pageAndHead(self) -> None:
        """
        The static page: GET gets the body, HEAD the same headers without
        it, on one connection.
        """
        self.startTP(PAGE)
        session = self.browser()
        get = self.result(session.request(b"/"))
        head = self.result(session.request(b"/", method=b"HEAD"))
        for response in (get, head):
            self.assertEqual(response["headers"][b":status"], b"200")
            self.assertEqual(response["headers"][b"content-type"], b"text/html; charset=utf-8")
        self.assertEqual(get["headers"][b"content-length"], str(len(PAGE.body)).encode())
        self.assertEqual(get["body"], PAGE.body)
        self.assertEqual(head["body"], b"")
        self.assertIsNone(session.closeEvent)

    def test_browserCertificateNotAsked(self) -> None:
        """
        An h3 client that has a client certificate is not asked for it, so
        it sends none (a browser would otherwise prompt).
        """
        self.startTP()
        session = self.browser(certificate="alice")
        response = self.result(session.request())
        self.assertEqual(response["headers"][b":status"], b"308")
        self.assertIsNone(session.conn.tls._certificate_request)
        self.assertIsNone(self.serverSession().conn.tls._peer_certificate)

    def test_postBodyNotRead(self) -> None:
        """
        A request body is not read: the response comes, and the client is
        asked to stop sending with H3_NO_ERROR.
        """
        self.startTP()
        session = self.browser()
        streamId = session.conn.get_next_available_stream_id()
        done: defer.Deferred[Any] = defer.Deferred()
        session.responses[streamId] = {"stream": streamId, "body": b"", "done": done}
        assert session.http is not None
        session.http.send_headers(streamId, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", b"/")])
        session.http.send_data(streamId, b"x" * 1000, end_stream=False)
        session.transmit()
        response = self.result(done)
        self.assertEqual(response["headers"][b":status"], b"308")
        self.network.run(until=lambda: streamId in session.stops)
        self.assertEqual(session.stops.get(streamId), ErrorCode.H3_NO_ERROR)

    def test_noH3ByDefault(self) -> None:
        """
        Without an H3 response the listener offers tp/1 only: an h3 client
        fails its handshake, audited as before.
        """
        self.startTP(None)
        self.assertEqual(self.listener.configuration.alpn_protocols, ["tp/1"])
        session = self.connect()
        self.assertRaises(Exception, self.result, session.ready)
        self.network.run()
        [event] = audits(self.observer)
        self.assertEqual(event["result"], "handshake_failed")

    def test_h3OfferedWithoutResponse(self) -> None:
        """
        A configuration that offers h3 needs a response to answer with.
        """
        from tpproxy.pki import loadCertificates, loadKey

        d = self.world.pki.directory
        configuration = serverConfiguration(loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key")))
        configuration.alpn_protocols = ["tp/1", "h3"]
        self.assertRaises(ValueError, QuicListener, self.world.reactor, configuration, None, None)


class IsolationTests(H3ListenerTests):
    """
    An h3 connection never reaches TP; tp/1 connections are as strict as
    without the responder.
    """

    def test_tpHelloOnH3Stream(self) -> None:
        """
        A TP ClientHello sent on a stream of an h3 connection goes to the H3
        layer (which closes the connection: it is no HTTP/3), never to a TP
        protocol: nothing is proxied, nothing audited.
        """
        self.startTP()
        session = self.browser()
        server = self.serverSession()
        streamId, done = session.rawStream(ClientHello.connect("127.0.0.1", 9).toFrame() + b"payload")
        self.network.run(until=lambda: session.done.called)
        self.assertGreater(server.responder.received[streamId], 0)
        self.assertEqual(server.streams, {})
        self.assertIsNotNone(session.closeEvent)
        # An HTTP/3 error (H3_FRAME_UNEXPECTED: the length prefix of a TP
        # frame reads as a DATA frame before HEADERS).
        self.assertIn(session.closeEvent.error_code, list(ErrorCode))  # type: ignore[union-attr]
        self.network.run()
        self.assertEqual((self.built, audits(self.observer)), ([], []))

    def test_tpWithCertificate(self) -> None:
        """
        A tp/1 client with a good certificate is asked for it, and its
        streams reach TP's stream protocol as before.
        """
        self.startTP()
        session = self.world.connected("alice")
        self.assertIsNotNone(session.conn.tls._certificate_request)
        session.openStream(Recorder()).write(b"hello")
        self.network.run(until=lambda: self.built)
        server = self.serverSession()
        self.assertIsNone(server.responder)
        self.assertEqual(server.identity, "alice")
        self.assertEqual(len(self.built), 1)
        self.assertFalse(server.conn.tpAnonymous)

    def refused(self, config: QuicConfiguration, reason: str) -> None:
        """
        The client is refused in the handshake; the audit event says why.
        """
        self.startTP()
        session = self.world.connect(configuration=config)
        session.ready.addErrback(lambda f: None)
        self.network.run(until=lambda: session.done.called)
        self.network.run()
        self.assertIsNotNone(session.conn.tls._certificate_request)
        [event] = audits(self.observer)
        self.assertEqual((event["result"], event["event"]), ("handshake_failed", "quic"))
        self.assertIn(reason, event["detail"])
        self.assertEqual((self.built, self.listener.sessions), ([], {}))

    def test_tpWithoutCertificate(self) -> None:
        self.refused(self.world.clientConfiguration(None), "no client certificate")

    def test_tpOtherCA(self) -> None:
        other = TestPKI.create(self.mktemp())
        other.client("alice")
        self.refused(self.world.clientConfiguration("alice", pki=other), "certificate not accepted")

    def test_bothOfferedWithoutCertificate(self) -> None:
        """
        A client offering h3 and tp/1 gets tp/1 (the server's preference),
        with its certificate requirement.
        """
        config = self.world.clientConfiguration(None)
        config.alpn_protocols = ["h3", "tp/1"]
        self.refused(config, "no client certificate")


class LimitTests(H3ListenerTests):
    """
    What an anonymous client can make TP hold.
    """

    def test_oversizedRequest(self) -> None:
        """
        A request whose headers do not end within REQUEST_LIMIT bytes is
        reset both ways with H3_EXCESSIVE_LOAD; the connection goes on.
        """
        self.startTP()
        session = self.browser()
        # A HEADERS frame (type 1) announcing 1 MiB, then more than the limit.
        streamId, done = session.rawStream(b"\x01\x80\x10\x00\x00" + b"\0" * (h3.REQUEST_LIMIT + 1000), end=False)
        self.result(done)
        self.assertEqual(session.resets[streamId], ErrorCode.H3_EXCESSIVE_LOAD)
        server = self.serverSession()
        # The H3 layer dropped what it had buffered for the stream.
        self.assertEqual(getattr(server.responder.http._stream.get(streamId), "buffer", b""), b"")
        response = self.result(session.request())
        self.assertEqual(response["headers"][b":status"], b"308")

    def test_receiveBudgetFixed(self) -> None:
        """
        An h3 connection's MAX_DATA is never raised (aioquic doubles it when
        half is used): its stream data in all is bounded by max_data.
        """
        self.startTP()
        session = self.browser()
        initial = self.listener.configuration.max_data
        dones = [session.rawStream(b"\x01\x80\x10\x00\x00" + b"\0" * (h3.REQUEST_LIMIT + 100), end=False)[1] for _ in range(20)]
        self.result(defer.gatherResults(dones))
        server = self.serverSession()
        self.assertGreater(server.conn._local_max_data.used * 2, initial)
        # Once all the client sent is acknowledged, TP has sent packets
        # since it got the data, and the client has read them: a MAX_DATA
        # would have come with them.
        self.network.run(until=lambda: session.conn._loss.bytes_in_flight == 0)
        self.assertEqual(server.conn._local_max_data.value, initial)
        self.assertEqual(session.conn._remote_max_data, initial)

    def test_pendingResponses(self) -> None:
        """
        At most MAX_PENDING responses wait for their acknowledgement; requests
        beyond are rejected with H3_REQUEST_REJECTED (a client may retry).
        """
        self.startTP()
        session = self.browser()
        responses = self.result(defer.gatherResults([session.request() for _ in range(h3.MAX_PENDING + 4)]))
        answered = [r for r in responses if "headers" in r]
        self.assertEqual(len(answered), h3.MAX_PENDING)
        rejected = [session.resets[r["stream"]] for r in responses if "headers" not in r]
        self.assertEqual(rejected, [ErrorCode.H3_REQUEST_REJECTED] * 4)
        # Once the client has acknowledged the responses, requests are
        # answered again.
        server = self.serverSession()
        self.network.run(until=lambda: not any(server.conn.sendBuffered(s) for s in server.responder.pending))
        response = self.result(session.request())
        self.assertEqual(response["headers"][b":status"], b"308")

    def test_requestLimit(self) -> None:
        """
        A connection serves MAX_REQUESTS requests, then is closed.
        """
        self.patch(h3, "MAX_REQUESTS", 3)
        self.startTP()
        session = self.browser()
        for _ in range(3):
            response = self.result(session.request())
            self.assertEqual(response["headers"][b":status"], b"308")
        session.request()
        self.network.run(until=lambda: session.done.called)
        self.assertEqual(session.closeEvent.error_code, ErrorCode.H3_EXCESSIVE_LOAD)  # type: ignore[union-attr]
        self.assertEqual(audits(self.observer), [])

    def test_uniLimit(self) -> None:
        """
        The client's control and QPACK streams have a budget too.
        """
        self.patch(h3, "UNI_LIMIT", 4)
        self.startTP()
        session = self.connect()
        session.ready.addErrback(lambda f: None)
        self.network.run(until=lambda: session.done.called)
        self.assertEqual(session.closeEvent.error_code, ErrorCode.H3_EXCESSIVE_LOAD)  # type: ignore[union-attr]


class LoopbackTests(TestCase):
    """
    End to end on real UDP sockets: TP's listener as C{twist tp} makes it,
    and a browser.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_redirectOverUDP(self) -> Any:
        from twisted.internet import reactor

        from tpproxy.service import makeServerFactory
        from tpproxy.transports.quic import ClientVerifier

        pki = TestPKI.create(self.mktemp())
        tpFactory = makeServerFactory(pki.serverConfig(), reactor).wrappedFactory
        tlsContext = tpFactory.serverTLS
        verifier = ClientVerifier(tlsContext.clientCAs, tlsContext.checker, reactor)
        listener = QuicListener(reactor, serverConfiguration(tlsContext.chain, tlsContext.key), verifier, tpFactory, h3=REDIRECT)
        udp = reactor.listenUDP(0, listener, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        config = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name="localhost")
        config.cadata = pki.ca.certPEM
        session = connectH3(reactor, ("127.0.0.1", udp.getHost().port), config)

        closeAtEnd(self, session)
        yield session.ready.addTimeout(5, reactor)
        response = yield session.request(b"/").addTimeout(5, reactor)
        self.assertEqual(response["headers"][b":status"], b"308")
