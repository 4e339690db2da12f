"""
Tests for L{tpproxy.transports.webtransport}: browsers' WebTransport
sessions on TP's QUIC listener, driven by a WebTransport client written
here (aioquic's QUIC and HTTP/3 client side, as a browser would speak
them) over real UDP on 127.0.0.1, against TP run in-process with
C{[webtransport]}.

The attacks each have a test: a CONNECT without a valid token is answered
403 and nothing of the session is served (no TP server protocol is built,
no tunnel audited, a stream sent on it is reset unread).
"""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import quote

from aioquic.buffer import Buffer, encode_uint_var
from aioquic.h3.connection import H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from tpproxy.pki import loadCertificates, loadKey, newKey
from tpproxy.protocols.client import TPClientProtocol
from tpproxy.service import makeQuicListener, makeServerFactory
from tpproxy.test.support import Echo, auditObserver, audits, listenLocal
from tpproxy.testing import TestPKI
from tpproxy.transports.h3 import H3Response
from tpproxy.transports.quic import clientConfiguration, connectQuic
from tpproxy.transports.webtransport import MAX_REFUSALS, MAX_SESSIONS
from tpproxy.verify import ClientCertChecker
from tpproxy.wire import ClientHello, FrameDecoder, ServerHello
from tpproxy.webtoken import mint, tokenKey

ORIGIN = "https://localhost:4433"
#: H3_REQUEST_REJECTED: what TP resets a refused session's streams with.
REQUEST_REJECTED = 0x10C
#: H3_EXCESSIVE_LOAD: what TP closes a connection of too many refusals with.
EXCESSIVE_LOAD = 0x107


class IUDPClock(IReactorUDP, IReactorTime):
    """
    UDP sockets and timers: what the client needs of a reactor.
    """


class WebTransportClient(DatagramProtocol):
    """
    A browser's side of WebTransport: aioquic's QUIC client with ALPN
    C{h3} and no client certificate, HTTP/3 with WebTransport, on a UDP
    socket of 127.0.0.1.

    The bidirectional streams it opens for WebTransport are read raw (TP's
    bytes, not HTTP/3), as a browser hands them to a page.

    @ivar headers: the response headers, by request stream.
    @ivar ended: request streams the server ended.
    @ivar wt: the bytes received on each WebTransport stream.
    @ivar wtEnded: WebTransport streams the server ended (FIN).
    @ivar resets: stream ids the server reset, to the error code.
    @ivar stops: stream ids the server sent STOP_SENDING for, to the code.
    @ivar datagrams: (session id, payload) of the HTTP/3 datagrams received.
    """

    def __init__(self, clock: IUDPClock, server: tuple[str, int], cadata: bytes | None, alpn: str = "h3") -> None:
        config = QuicConfiguration(is_client=True, alpn_protocols=[alpn], server_name="localhost", max_datagram_frame_size=65536)
        config.cadata = cadata
        self.clock = clock
        self.server = server
        self.quic = QuicConnection(configuration=config)
        self.http = H3Connection(self.quic, enable_webtransport=True)
        self.handshook = False
        self.terminated: events.ConnectionTerminated | None = None
        self.headers: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.wt: dict[int, bytearray] = {}
        self.wtEnded: set[int] = set()
        self.resets: dict[int, int] = {}
        self.stops: dict[int, int] = {}
        self.datagrams: list[tuple[int, bytes]] = []
        self.timer: IDelayedCall | None = None
        self.port = clock.listenUDP(0, self, interface="127.0.0.1")
        self.quic.connect(server, now=clock.seconds())
        self.transmit()

    def close(self) -> Any:
        if self.terminated is None:
            self.quic.close()
            self.transmit()
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        return self.port.stopListening()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.quic.receive_datagram(data, addr, now=self.clock.seconds())
        self.transmit()

    def _timeout(self) -> None:
        self.timer = None
        self.quic.handle_timer(now=self.clock.seconds())
        self.transmit()

    def transmit(self) -> None:
        event = self.quic.next_event()
        while event is not None:
            self._handle(event)
            event = self.quic.next_event()
        if self.transport is None:
            return
        for data, addr in self.quic.datagrams_to_send(now=self.clock.seconds()):
            self.transport.write(data, addr)  # type: ignore[union-attr]
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        when = self.quic.get_timer()
        if when is not None and self.terminated is None:
            self.timer = self.clock.callLater(max(0.0, when - self.clock.seconds()), self._timeout)

    def _handle(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.handshook = True
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = event
        elif isinstance(event, events.StreamReset):
            self.resets[event.stream_id] = event.error_code
        elif isinstance(event, events.StopSendingReceived):
            self.stops[event.stream_id] = event.error_code
        elif isinstance(event, events.StreamDataReceived) and event.stream_id in self.wt:
            self.wt[event.stream_id] += event.data
            if event.end_stream:
                self.wtEnded.add(event.stream_id)
            return
        elif isinstance(event, events.DatagramFrameReceived):
            buf = Buffer(data=event.data)
            quarter = buf.pull_uint_var()
            self.datagrams.append((quarter * 4, event.data[buf.tell() :]))
            return
        for h3event in self.http.handle_event(event):
            if isinstance(h3event, HeadersReceived):
                self.headers[h3event.stream_id] = dict(h3event.headers)
            elif isinstance(h3event, DataReceived):
                self.bodies[h3event.stream_id] = self.bodies.get(h3event.stream_id, b"") + h3event.data
            if getattr(h3event, "stream_ended", False):
                self.ended.add(h3event.stream_id)  # type: ignore[attr-defined]

    # --- what a page does -----------------------------------------------------

    def connect(self, token: str | None, origin: str | None = ORIGIN, path: str = "/tp") -> int:
        """
        Send an extended CONNECT for a WebTransport session (a token in the
        query, if any); return the session id (its stream id).
        """
        streamId = self.quic.get_next_available_stream_id()
        target = path if token is None else f"{path}?token={quote(token)}"
        headers = [
            (b":method", b"CONNECT"),
            (b":protocol", b"webtransport"),
            (b":scheme", b"https"),
            (b":authority", f"127.0.0.1:{self.server[1]}".encode()),
            (b":path", target.encode()),
        ]
        if origin is not None:
            headers.append((b"origin", origin.encode()))
        headers.append((b"sec-webtransport-http3-draft02", b"1"))
        self.http.send_headers(streamId, headers, end_stream=False)
        self.transmit()
        return streamId

    def get(self, path: str = "/") -> int:
        streamId = self.quic.get_next_available_stream_id()
        self.http.send_headers(
            streamId, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", path.encode())], end_stream=True
        )
        self.transmit()
        return streamId

    def stream(self, sessionId: int, data: bytes = b"", end: bool = False) -> int:
        """
        Open a WebTransport bidirectional stream of C{sessionId} and send
        C{data} on it.
        """
        streamId = self.http.create_webtransport_stream(sessionId)
        self.wt[streamId] = bytearray()
        if data or end:
            self.quic.send_stream_data(streamId, data, end_stream=end)
        self.transmit()
        return streamId

    def send(self, streamId: int, data: bytes, end: bool = False) -> None:
        self.quic.send_stream_data(streamId, data, end_stream=end)
        self.transmit()

    def datagram(self, sessionId: int, payload: bytes) -> None:
        self.http.send_datagram(sessionId, payload)
        self.transmit()

    def status(self, streamId: int) -> bytes | None:
        return self.headers.get(streamId, {}).get(b":status")

    def serverHello(self, streamId: int) -> tuple[ServerHello, bytes] | None:
        """
        The ServerHello at the start of C{streamId}, and what followed.
        """
        decoder = FrameDecoder()
        decoder.feed(bytes(self.wt[streamId]))
        frame = decoder.nextFrame()
        return None if frame is None else (ServerHello.fromObject(frame), decoder.takeRest())


def until(condition: Callable[[], object], timeout: float = 15.0, what: str = "") -> defer.Deferred[None]:
    """
    Fire once C{condition()} holds (checked as the reactor runs), or fail
    after C{timeout} seconds.
    """
    done: defer.Deferred[None] = defer.Deferred()
    start = reactor.seconds()  # type: ignore[attr-defined]

    def check() -> None:
        if condition():
            loop.stop()
            done.callback(None)
        elif reactor.seconds() - start > timeout:  # type: ignore[attr-defined]
            loop.stop()
            done.errback(AssertionError(f"still false after {timeout:g} s: {what or condition}"))

    loop = task.LoopingCall(check)
    loop.clock = reactor  # type: ignore[assignment]
    loop.start(0.005, now=True)
    return done


def closeSession(session: Any) -> None:
    if not session.closed:
        session.close(0, "test done")
    session.socket.stop()
    session.abandon()


class UDPEcho(DatagramProtocol):
    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.packets.append(data)
        self.transport.write(b"echo:" + data, addr)  # type: ignore[union-attr]


class WebTransportTestCase(TestCase):
    timeout = 60
    #: The [webtransport] table of the config.
    webtransport: dict[str, Any] = {}
    #: TP's own HTTP/3 answer (C{[router.h3]}), if any.
    h3: Any = None

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        self.alice = loadCertificates(str(self.pki.directory / "alice.pem"))[0]
        config = self.pki.serverConfig(quic=["127.0.0.1:4433"], webtransport=dict(self.webtransport))
        factory = makeServerFactory(config, reactor)  # type: ignore[arg-type]
        self.tp = factory.wrappedFactory
        self.gate = self.tp.gate
        self.listener = makeQuicListener(config, reactor, self.tp)  # type: ignore[arg-type]
        # [router.h3] needs a [router] with a backend or terminate table;
        # what it gives the listener is this answer.
        self.listener.h3 = self.h3
        udp = reactor.listenUDP(0, self.listener, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.address = ("127.0.0.1", udp.getHost().port)
        self.addCleanup(udp.stopListening)
        # Every TP server protocol built, for the attacks: none may be.
        self.built: list[Any] = []
        build = self.tp.buildProtocol

        def counted(addr: Any) -> Any:
            protocol = build(addr)
            self.built.append(protocol)
            return protocol

        self.tp.buildProtocol = counted
        self.addCleanup(self.abortTunnels)
        self.audits = auditObserver(self)
        self.echoPort, self.echo = listenLocal(self, Echo)
        hashed = self.gate.certificate
        cert = hashed.current()[0][0] if hashed is not None else self.pki.ca.cert
        self.cadata = cert.public_bytes(Encoding.PEM)

    def abortTunnels(self) -> None:
        """
        End what a test left open (a failed test's tunnels).
        """
        for protocol in self.built:
            if protocol.transport is not None:
                protocol.transport.abortConnection()

    def token(self, origin: str = ORIGIN, now: float | None = None, lifetime: float = 30, key: bytes | None = None) -> str:
        """
        A token as TP's token endpoint mints it for alice's browser.
        """
        if now is None and key is None and lifetime == 30:
            return self.gate.mint(self.alice, origin, reactor.seconds())  # type: ignore[attr-defined]
        return mint(key or self.gate.keys()[0], self.alice, origin, reactor.seconds() if now is None else now, lifetime)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def client(self, alpn: str = "h3") -> Any:
        client = WebTransportClient(reactor, self.address, self.cadata, alpn)  # type: ignore[arg-type]
        self.addCleanup(client.close)
        yield until(lambda: client.handshook or client.terminated, what="the QUIC handshake")
        self.assertTrue(client.handshook, client.terminated)
        return client

    @defer.inlineCallbacks
    def session(self, client: WebTransportClient | None = None, **kw: Any) -> Any:
        """
        A client with an accepted session: (client, session id).
        """
        if client is None:
            client = yield self.client()
        sessionId = client.connect(self.token(**kw))
        yield until(lambda: client.status(sessionId), what="the CONNECT's answer")
        self.assertEqual(client.status(sessionId), b"200", client.bodies.get(sessionId))
        return client, sessionId

    @defer.inlineCallbacks
    def hello(self, client: WebTransportClient, streamId: int) -> Any:
        yield until(lambda: client.serverHello(streamId) or streamId in client.resets, what="a ServerHello")
        self.assertNotIn(streamId, client.resets)
        return client.serverHello(streamId)

    def tunnels(self) -> list[dict[str, Any]]:
        return [e for e in audits(self.audits) if e.get("via") == "webtransport"]


class SessionTests(WebTransportTestCase):
    """
    Sessions with a valid token: tunnels, UDP flows, their end.
    """

    @defer.inlineCallbacks
    def test_echo(self) -> Any:
        """
        A session opened with a token of TP's gate: a WebTransport stream
        carrying a ClientHello gets a successful ServerHello, then the
        bytes go to the echo server and back (256 KiB, more than the
        initial flow-control windows); the tunnel is audited as alice's,
        via webtransport.
        """
        client, sessionId = yield self.session()
        self.assertEqual(self.listener.webtransportSessions, {"accepted": 1})
        payload = bytes(range(256)) * 1024
        streamId = client.stream(sessionId, ClientHello.connect("127.0.0.1", self.echoPort).toFrame())
        hello, rest = yield self.hello(client, streamId)
        self.assertTrue(hello.ok, hello)
        self.assertEqual(hello.info.get("address"), "127.0.0.1")
        client.send(streamId, payload, end=True)
        yield until(lambda: streamId in client.wtEnded or streamId in client.resets, what="the echo")
        self.assertEqual(client.serverHello(streamId)[1], payload)
        yield until(self.tunnels, what="the tunnel's audit event")
        [event] = self.tunnels()
        self.assertEqual((event["identity"], event["result"], event["event"]), ("alice", "ok", "connect"))
        self.assertEqual((event["bytes_up"], event["bytes_down"]), (len(payload), len(payload)))
        self.assertEqual(self.echo.accepted, 1)

    @defer.inlineCallbacks
    def test_severalStreams(self) -> Any:
        """
        Each bidirectional stream of a session is a tunnel of its own.
        """
        client, sessionId = yield self.session()
        streams = [client.stream(sessionId, ClientHello.connect("127.0.0.1", self.echoPort).toFrame() + f"s{i}".encode(), end=True) for i in range(3)]
        yield until(lambda: all(s in client.wtEnded for s in streams), what="three echoes")
        self.assertEqual([client.serverHello(s)[1] for s in streams], [b"s0", b"s1", b"s2"])
        self.assertEqual(self.echo.accepted, 3)

    @defer.inlineCallbacks
    def test_listenRefused(self) -> Any:
        """
        A browser exposes nothing: a C{listen} over WebTransport is refused
        with C{bad_request}.
        """
        client, sessionId = yield self.session()
        streamId = client.stream(sessionId, ClientHello("listen", mode="public", port=0).toFrame())
        hello, _ = yield self.hello(client, streamId)
        self.assertEqual((hello.ok, hello.code), (False, "bad_request"), hello)
        self.assertIn("webtransport", hello.message)
        yield until(self.tunnels)
        self.assertEqual([(e["identity"], e["result"]) for e in self.tunnels()], [("alice", "bad_request")])

    @defer.inlineCallbacks
    def test_udpFlow(self) -> Any:
        """
        A UDP flow: a C{udp} ClientHello on a stream, then HTTP/3
        datagrams of the session whose payload is the flow's quarter
        stream id and the packet; the echo's answer comes back the same way.
        """
        echo = UDPEcho()
        port = reactor.listenUDP(0, echo, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client, sessionId = yield self.session()
        streamId = client.stream(sessionId, ClientHello("udp", host="127.0.0.1", port=port.getHost().port, transport="udp").toFrame())
        hello, _ = yield self.hello(client, streamId)
        self.assertTrue(hello.ok, hello)
        flow = encode_uint_var(streamId // 4)
        client.datagram(sessionId, flow + b"ping")
        yield until(lambda: client.datagrams, what="the echoed datagram")
        self.assertEqual(echo.packets, [b"ping"])
        self.assertEqual(client.datagrams, [(sessionId, flow + b"echo:ping")])

    @defer.inlineCallbacks
    def test_datagramOfAnotherFlowDropped(self) -> Any:
        """
        A datagram naming no flow of the session (another stream, another
        session) goes nowhere.
        """
        echo = UDPEcho()
        port = reactor.listenUDP(0, echo, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client, sessionId = yield self.session()
        streamId = client.stream(sessionId, ClientHello("udp", host="127.0.0.1", port=port.getHost().port, transport="udp").toFrame())
        yield self.hello(client, streamId)
        client.datagram(sessionId, encode_uint_var(streamId // 4 + 1) + b"stray")
        client.http.send_datagram(sessionId + 4, encode_uint_var(streamId // 4) + b"other session")
        client.datagram(sessionId, encode_uint_var(streamId // 4) + b"mine")
        yield until(lambda: client.datagrams, what="the echoed datagram")
        self.assertEqual(echo.packets, [b"mine"])

    @defer.inlineCallbacks
    def test_sessionEndEndsTunnels(self) -> Any:
        """
        When the browser ends the CONNECT stream, the session is over, and
        so are its tunnels (the echo server's connection closes); a stream
        opened on it afterwards is reset unread.
        """
        client, sessionId = yield self.session()
        streamId = client.stream(sessionId, ClientHello.connect("127.0.0.1", self.echoPort).toFrame())
        hello, _ = yield self.hello(client, streamId)
        self.assertTrue(hello.ok)
        client.send(sessionId, b"", end=True)
        yield until(self.tunnels, what="the tunnel's end")
        [event] = self.tunnels()
        self.assertEqual(event["identity"], "alice")
        yield until(lambda: streamId in client.resets or streamId in client.wtEnded, what="the tunnel's stream closed")
        late = client.stream(sessionId, ClientHello.connect("127.0.0.1", self.echoPort).toFrame())
        yield until(lambda: late in client.resets or late in client.stops, what="the late stream reset")
        self.assertEqual(len(self.built), 1)
        self.assertEqual(self.echo.accepted, 1)

    @defer.inlineCallbacks
    def test_signalSplit(self) -> Any:
        """
        A WebTransport stream whose first STREAM frame holds only the first
        byte of its signal (QUIC may cut a stream anywhere) is still a
        tunnel, not an HTTP request: more than an HTTP/3 request's limit
        (32 KiB) goes through it.
        """
        client, sessionId = yield self.session()
        streamId = client.quic.get_next_available_stream_id()
        client.wt[streamId] = bytearray()
        client.send(streamId, b"\x40")
        client.send(streamId, b"\x41" + encode_uint_var(sessionId) + ClientHello.connect("127.0.0.1", self.echoPort).toFrame())
        hello, _ = yield self.hello(client, streamId)
        self.assertTrue(hello.ok, hello)
        payload = b"x" * (100 * 1024)
        client.send(streamId, payload, end=True)
        yield until(lambda: streamId in client.wtEnded or streamId in client.resets, what="the echo")
        self.assertNotIn(streamId, client.resets)
        self.assertEqual(len(client.serverHello(streamId)[1]), len(payload))

    @defer.inlineCallbacks
    def test_tpClientsUnaffected(self) -> Any:
        """
        A tp/1 QUIC client (with its client certificate) on the same
        listener, while a browser holds a session, gets its tunnel as ever,
        audited via quic.
        """
        yield self.session()
        d = self.pki.directory
        config = clientConfiguration("localhost", [self.pki.ca.cert], loadCertificates(str(d / "alice.pem")), loadKey(str(d / "alice.key")))
        session = connectQuic(reactor, self.address, config)  # type: ignore[arg-type]
        self.addCleanup(closeSession, session)
        yield session.ready.addTimeout(10, reactor)  # type: ignore[arg-type]
        ready: defer.Deferred[Any] = defer.Deferred()
        session.openStream(TPClientProtocol(ClientHello.connect("127.0.0.1", self.echoPort), ready))
        tunnel = yield ready.addTimeout(10, reactor)  # type: ignore[arg-type]
        self.assertTrue(tunnel.serverHello.ok)
        tunnel.transport.loseConnection()
        yield until(lambda: [e for e in audits(self.audits) if e.get("via") == "quic"], what="the tp/1 tunnel's audit event")

    @defer.inlineCallbacks
    def test_tooManySessions(self) -> Any:
        """
        A connection holds at most L{MAX_SESSIONS} sessions: one more is
        answered 429; once one ends, a new one is accepted.
        """
        client = yield self.client()
        sessions = []
        for _ in range(MAX_SESSIONS):
            _, sessionId = yield self.session(client)
            sessions.append(sessionId)
        extra = client.connect(self.token())
        yield until(lambda: client.status(extra))
        self.assertEqual(client.status(extra), b"429")
        self.assertEqual(self.listener.webtransportSessions, {"accepted": MAX_SESSIONS, "too_many_sessions": 1})
        client.send(sessions[0], b"", end=True)
        again = client.connect(self.token())
        yield until(lambda: client.status(again))
        self.assertEqual(client.status(again), b"200")


class AttackTests(WebTransportTestCase):
    """
    CONNECTs that must not open a session: 403, nothing built, nothing
    audited, their streams reset unread.
    """

    @defer.inlineCallbacks
    def refused(self, token: str | None, origin: str | None = ORIGIN, reason: str | None = None, status: bytes = b"403", client: Any = None) -> Any:
        """
        Send a CONNECT with C{token} and, at once (before its answer, as a
        page may), a stream with a ClientHello to the echo server: the
        CONNECT is answered C{status}, the stream is reset with
        H3_REQUEST_REJECTED and never read: no TP server protocol, no
        connection to the echo server, no audit event.
        """
        if client is None:
            client = yield self.client()
        accepted = self.listener.webtransportSessions.get("accepted")
        sessionId = client.connect(token, origin)
        streamId = client.stream(sessionId, ClientHello.connect("127.0.0.1", self.echoPort).toFrame() + b"secret")
        yield until(lambda: client.status(sessionId) and (streamId in client.resets or streamId in client.stops), what="the refusal and the reset")
        self.assertEqual(client.status(sessionId), status)
        body = client.bodies.get(sessionId, b"").decode()
        if reason is not None:
            self.assertTrue(body.startswith(reason + ":"), body)
            self.assertEqual(self.listener.webtransportSessions.get(reason), 1, self.listener.webtransportSessions)
        self.assertIn(REQUEST_REJECTED, (client.resets.get(streamId), client.stops.get(streamId)))
        self.assertEqual(client.wt[streamId], b"")
        self.assertEqual(self.built, [])
        self.assertEqual(self.tp.live, set())
        self.assertEqual(self.echo.accepted, 0)
        self.assertEqual(audits(self.audits), [])
        self.assertEqual(self.listener.webtransportSessions.get("accepted"), accepted)
        return client

    def test_noToken(self) -> Any:
        return self.refused(None, reason="no_token")

    def test_emptyToken(self) -> Any:
        return self.refused("", reason="no_token")

    def test_expired(self) -> Any:
        return self.refused(self.token(now=reactor.seconds() - 31), reason="expired")  # type: ignore[attr-defined]

    def test_wrongOrigin(self) -> Any:
        """
        A token for one allowed origin, on a CONNECT from another allowed
        origin (another page of TP's names).
        """
        return self.refused(self.token(origin="https://127.0.0.1:4433"), reason="wrong_audience")

    def test_originNotAllowed(self) -> Any:
        """
        A CONNECT from an origin not allowed, even with a token for it
        (minted by TP's key outside the gate), and one with no origin.
        """
        return self.refused(self.token(origin="https://evil.example", lifetime=20), origin="https://evil.example", reason="origin_not_allowed")

    def test_noOrigin(self) -> Any:
        return self.refused(self.token(), origin=None, reason="origin_not_allowed")

    def test_badMAC(self) -> Any:
        return self.refused(self.token(key=tokenKey(newKey())), reason="bad_signature")

    def test_tampered(self) -> Any:
        token = self.token()
        middle = len(token) // 2
        tampered = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
        return self.refused(tampered, reason="bad_signature")

    def test_garbage(self) -> Any:
        return self.refused("not-a-token", reason="malformed")

    def test_wrongPath(self) -> Any:
        """
        A CONNECT on another path than C{webtransport.path}: 404.
        """
        from twisted.internet import defer as d

        @d.inlineCallbacks
        def run() -> Any:
            client = yield self.client()
            sessionId = client.connect(self.token(), path="/other")
            streamId = client.stream(sessionId, ClientHello.connect("127.0.0.1", self.echoPort).toFrame())
            yield until(lambda: client.status(sessionId) and (streamId in client.resets or streamId in client.stops))
            self.assertEqual(client.status(sessionId), b"404")
            self.assertEqual((self.built, self.echo.accepted), ([], 0))

        return run()

    @defer.inlineCallbacks
    def test_replayed(self) -> Any:
        """
        A token that opened a session opens no second one, on another
        connection or the same.
        """
        token = self.token()
        first = yield self.client()
        sessionId = first.connect(token)
        yield until(lambda: first.status(sessionId))
        self.assertEqual(first.status(sessionId), b"200")
        yield self.refused(token, reason="replayed")
        second = first.connect(token)
        yield until(lambda: first.status(second))
        self.assertEqual(first.status(second), b"403")

    @defer.inlineCallbacks
    def test_deniedSinceMinted(self) -> Any:
        """
        A token of alice, whose certificate is on the deny list by the time
        the token is redeemed (a reload in between): refused, reason
        C{certificate}.
        """
        token = self.token()
        serverTLS = self.tp.serverTLS
        serverTLS.reconfigure(serverTLS.clientCAs, ClientCertChecker(deniedIdentities=frozenset({"alice"})))
        yield self.refused(token, reason="certificate")

    @defer.inlineCallbacks
    def test_revokedSinceMinted(self) -> Any:
        """
        Likewise with alice's certificate revoked by a CRL.
        """
        token = self.token()
        serverTLS = self.tp.serverTLS
        serverTLS.reconfigure(serverTLS.clientCAs, ClientCertChecker(crls=(self.pki.ca.crl([self.alice.serial_number]),)))
        yield self.refused(token, reason="certificate")

    @defer.inlineCallbacks
    def test_deniedDuringSession(self) -> Any:
        """
        Alice's session is open when a reload puts her on the deny list:
        a stream she opens on it afterwards serves no tunnel.
        """
        client, sessionId = yield self.session()
        serverTLS = self.tp.serverTLS
        serverTLS.reconfigure(serverTLS.clientCAs, ClientCertChecker(deniedIdentities=frozenset({"alice"})))
        streamId = client.stream(sessionId, ClientHello.connect("127.0.0.1", self.echoPort).toFrame())
        yield until(
            lambda: client.serverHello(streamId) or streamId in client.resets or client.terminated or sessionId in client.ended,
            what="an answer to the stream",
        )
        answer = client.serverHello(streamId)
        self.assertFalse(answer is not None and answer[0].ok, answer)
        self.assertEqual(self.echo.accepted, 0)

    @defer.inlineCallbacks
    def test_streamOfUnknownSession(self) -> Any:
        """
        A stream naming a session that was never asked for (no CONNECT on
        that stream id, or a stream id that is a GET's) is reset unread.
        """
        client = yield self.client()
        getId = client.get("/")
        for session in (0 + 400, getId):
            streamId = client.stream(session, ClientHello.connect("127.0.0.1", self.echoPort).toFrame())
            yield until(lambda: streamId in client.resets or streamId in client.stops)
        self.assertEqual((self.built, self.echo.accepted), ([], 0))

    @defer.inlineCallbacks
    def test_tooManyRefusals(self) -> Any:
        """
        After L{MAX_REFUSALS} refused CONNECTs, TP closes the connection
        (H3_EXCESSIVE_LOAD).
        """
        client = yield self.client()
        for _ in range(MAX_REFUSALS - 1):
            sessionId = client.connect(None)
            yield until(lambda: client.status(sessionId))
            self.assertEqual(client.status(sessionId), b"403")
        self.assertIsNone(client.terminated)
        client.connect(None)
        yield until(lambda: client.terminated)
        self.assertEqual(client.terminated.error_code, EXCESSIVE_LOAD)  # type: ignore[union-attr]
        self.assertEqual(self.listener.webtransportSessions, {"no_token": MAX_REFUSALS})

    @defer.inlineCallbacks
    def test_plainGet(self) -> Any:
        """
        A plain HTTP/3 GET (a page load on TP's QUIC) is answered 404.
        """
        client = yield self.client()
        streamId = client.get("/tp")
        yield until(lambda: client.status(streamId))
        self.assertEqual(client.status(streamId), b"404")
        self.assertEqual(self.built, [])


class RouterAnswerTests(WebTransportTestCase):
    """
    With C{[router.h3]} configured as well, plain requests get its answer
    and WebTransport still works.
    """

    h3 = H3Response.redirect("https://example.org/", status=308)

    @defer.inlineCallbacks
    def test_plainGet(self) -> Any:
        client = yield self.client()
        streamId = client.get("/")
        yield until(lambda: client.status(streamId))
        self.assertEqual(client.status(streamId), b"308")
        self.assertEqual(client.headers[streamId].get(b"location"), b"https://example.org/")
        yield self.session(client)


class AnonymousStreamFloodTests(WebTransportTestCase):
    @defer.inlineCallbacks
    def test_signalledStreamsWithoutSessionAreBounded(self) -> Any:
        """
        A peer with no session (no token at all) opens stream after stream
        that starts with the WebTransport signal: each is refused, the
        HTTP/3 layer forgets it, and past the bound the connection is
        closed; the listener holds nothing of it after (found by review:
        such streams used to escape every count).
        """
        from aioquic.buffer import encode_uint_var

        from tpproxy.transports.webtransport import MAX_REFUSED_STREAMS

        client = yield self.client()
        [server] = {id(s): s for s in self.listener.sessions.values()}.values()
        responder = server.responder
        sent = 0
        while not client.terminated and not responder.closed and sent < 10 * MAX_REFUSED_STREAMS:
            for _ in range(20):
                streamId = client.quic.get_next_available_stream_id()
                client.quic.send_stream_data(streamId, b"\x40\x41" + encode_uint_var(0) + b"x", end_stream=True)
                sent += 1
            client.transmit()
            yield until(lambda: len(responder.refused) >= sent or client.terminated or responder.closed, what="the refusals")
        yield until(lambda: client.terminated, what="the connection closed")
        self.assertTrue(responder.closed)
        self.assertLessEqual(sent, MAX_REFUSED_STREAMS + 40)
        self.assertLessEqual(len(responder.http._stream), MAX_REFUSED_STREAMS + 8)
        self.assertEqual(self.built, [])
