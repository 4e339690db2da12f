"""
The routing of L{tpproxy.transports.h3backend} on real UDP sockets of
127.0.0.1, all in this process: TP's QUIC listener with an HTTP/3 backend
(the aioquic server of L{tpproxy.test.h3server}), aioquic HTTP/3 clients
and TP's own QUIC client.  A GET through TP's port; a client that moves
(with and without a new connection id); tp/1 and h3 at once; floods of
half ClientHellos and of garbage Initials; idle flows forgotten; and a
backend that is down.  The end-to-end test with Chromium and C{twist tp}
is L{tpproxy.test.test_h3backend}.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.internet.testing import EventLoggingObserver
from twisted.trial.unittest import TestCase

from tpproxy.protocols.client import TPClientProtocol
from tpproxy.test.h3server import H3Server, configuration
from tpproxy.test.support import Echo, listenLocal
from tpproxy.test.test_quic import QuicTestCase, waitUntil
from tpproxy.transports import h3backend
from tpproxy.transports.h3backend import H3Backend
from tpproxy.transports.quic import ClientSession, connectQuic
from tpproxy.wire import ClientHello


class _Socket(DatagramProtocol):
    """
    One UDP socket of an L{H3Client}: what it receives goes to the client.
    """

    def __init__(self, client: H3Client) -> None:
        self.client = client

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.client.datagramReceived(self, data, addr)


class H3Client:
    """
    aioquic's HTTP/3 client on the reactor, on a UDP socket of 127.0.0.1
    that L{move} can change mid-connection.
    """

    def __init__(self, server: tuple[str, int], caPath: str, alpn: list[str] | None = None) -> None:
        config = QuicConfiguration(is_client=True, alpn_protocols=alpn or H3_ALPN, server_name="localhost")
        config.load_verify_locations(caPath)
        self.server = server
        self.quic = QuicConnection(configuration=config)
        self.h3 = H3Connection(self.quic)
        self.socket = _Socket(self)
        self.port = reactor.listenUDP(0, self.socket, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.terminated: events.ConnectionTerminated | None = None
        self.responses: dict[int, tuple[dict[bytes, bytes], bytearray]] = {}
        self.waiting: dict[int, defer.Deferred[tuple[dict[bytes, bytes], bytes]]] = {}
        self.timer: IDelayedCall | None = None
        self.sent = 0
        self.quic.connect(server, now=reactor.seconds())  # type: ignore[attr-defined]
        self.transmit()

    @property
    def address(self) -> tuple[str, int]:
        host = self.port.getHost()
        return (host.host, host.port)

    def datagramReceived(self, socket: _Socket, data: bytes, addr: Any) -> None:
        if socket is not self.socket:
            return
        self.quic.receive_datagram(data, addr, now=reactor.seconds())  # type: ignore[attr-defined]
        self.transmit()

    def _timeout(self) -> None:
        self.timer = None
        self.quic.handle_timer(now=reactor.seconds())  # type: ignore[attr-defined]
        self.transmit()

    def transmit(self) -> None:
        event = self.quic.next_event()
        while event is not None:
            self._handle(event)
            event = self.quic.next_event()
        if self.terminated is not None:
            return
        for data, addr in self.quic.datagrams_to_send(now=reactor.seconds()):  # type: ignore[attr-defined]
            self.sent += 1
            self.port.write(data, addr)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        at = self.quic.get_timer()
        if at is not None:
            self.timer = reactor.callLater(max(0.0, at - reactor.seconds()), self._timeout)  # type: ignore[attr-defined]

    def _handle(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted) and not self.ready.called:
            self.ready.callback(None)
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = event
            if not self.ready.called:
                self.ready.errback(Exception(f"QUIC connection ended: {event.reason_phrase or event.error_code}"))
        for h3event in self.h3.handle_event(event):
            if isinstance(h3event, HeadersReceived):
                self.responses[h3event.stream_id] = (dict(h3event.headers), bytearray())
            elif isinstance(h3event, DataReceived):
                self.responses[h3event.stream_id][1].extend(h3event.data)
            else:
                continue
            if h3event.stream_ended and h3event.stream_id in self.waiting:
                fields, body = self.responses[h3event.stream_id]
                self.waiting.pop(h3event.stream_id).callback((fields, bytes(body)))

    def get(self, path: str) -> defer.Deferred[tuple[dict[bytes, bytes], bytes]]:
        """
        GET C{path}; fires with the response's fields and body.
        """
        streamId = self.quic.get_next_available_stream_id()
        d: defer.Deferred[tuple[dict[bytes, bytes], bytes]] = defer.Deferred()
        self.waiting[streamId] = d
        authority = f"localhost:{self.server[1]}".encode()
        self.h3.send_headers(streamId, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority), (b":path", path.encode())], end_stream=True)
        self.transmit()
        return d.addTimeout(10, reactor)  # type: ignore[arg-type]

    def move(self, newConnectionId: bool) -> None:
        """
        Go on from a new UDP socket (the old one closes), with the next
        connection id the server issued if C{newConnectionId}, else with
        the same one (a NAT rebinding).
        """
        old = self.port
        self.socket = _Socket(self)
        self.port = reactor.listenUDP(0, self.socket, interface="127.0.0.1")  # type: ignore[attr-defined]
        old.stopListening()
        if newConnectionId:
            self.quic.change_connection_id()
        self.quic.send_ping(0)
        self.transmit()

    def close(self) -> Any:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.terminated is None:
            self.quic.close()
            for data, addr in self.quic.datagrams_to_send(now=reactor.seconds()):  # type: ignore[attr-defined]
                self.port.write(data, addr)
        for d in self.waiting.values():
            d.cancel()
        self.terminated = self.terminated or events.ConnectionTerminated(error_code=0, frame_type=None, reason_phrase="closed")
        return self.port.stopListening()


def firstHalf(alpn: list[str]) -> bytes:
    """
    The first of the datagrams of a new aioquic client whose ClientHello
    (made long by C{alpn}) does not fit in one.
    """
    client = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=alpn, server_name="www.h3.test"))
    client.connect(("127.0.0.1", 443), now=0.0)
    datagrams = client.datagrams_to_send(now=0.0)
    assert len(datagrams) >= 2, "the ClientHello fits in one datagram"
    return datagrams[0][0]


#: An ALPN list that makes a ClientHello span two datagrams.
LONG_ALPN = ["h3"] + [f"x-{i:02d}-" + "a" * 200 for i in range(8)]


class RoutingTestCase(QuicTestCase):
    timeout = 60

    def setUp(self) -> None:
        super().setUp()
        self.marker = "m-" + os.urandom(6).hex()
        self.requests: list[dict[str, object]] = []
        d = self.pki.directory
        self.site = H3Server(configuration(str(d / "server.pem"), str(d / "server.key")), reactor, self.marker, self.requests.append)  # type: ignore[arg-type]
        self.sitePort = reactor.listenUDP(0, self.site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.sitePort.stopListening)
        self.errors = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def startShared(self, backend: tuple[str, int] | None = None, clock: Clock | None = None) -> H3Backend:
        """
        TP on TLS and QUIC, its QUIC port shared with the backend (the
        test's H3Server unless another address is given); the router's
        timers on C{clock} if given.
        """
        self.startTP()
        self.listener.useH3Backend(backend or ("127.0.0.1", self.sitePort.getHost().port))
        router: H3Backend = self.listener.h3backend
        if clock is not None:
            router.clock = clock
        self.addCleanup(router.stop)
        return router

    def h3Client(self, alpn: list[str] | None = None) -> H3Client:
        client = H3Client(("127.0.0.1", self.port), self.pki.caPath, alpn)
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def tpClient(self) -> Any:
        """
        A tp/1 connection of alice over QUIC through TP's port, with one
        tunnel to an echo server: answers the session once TP said yes.
        """
        echoPort, _ = listenLocal(self, Echo)
        session: ClientSession = connectQuic(reactor, ("127.0.0.1", self.port), self.quicConfig())  # type: ignore[arg-type]
        self.addCleanup(self.closeSession, session)
        yield session.ready.addTimeout(10, reactor)  # type: ignore[arg-type]
        ready: defer.Deferred[Any] = defer.Deferred()
        session.openStream(TPClientProtocol(ClientHello.connect("127.0.0.1", echoPort), ready))
        tunnel = yield ready.addTimeout(10, reactor)  # type: ignore[arg-type]
        self.assertTrue(tunnel.serverHello.ok)
        return session

    def assertNoTraceback(self) -> None:
        failures = [e for e in self.errors if "log_failure" in e]
        self.assertEqual(failures, [])

    def peers(self) -> list[object]:
        return [r["peer"] for r in self.requests]


class ForwardTests(RoutingTestCase):
    @defer.inlineCallbacks
    def test_getThroughTP(self) -> Any:
        """
        An h3 GET to TP's port reaches the backend, from the router's socket
        of that connection (the backend never sees the client's address),
        and its answer comes back to the client.
        """
        router = self.startShared()
        client = self.h3Client()
        yield client.ready
        fields, body = yield client.get("/")
        self.assertEqual(fields[b":status"], b"200")
        self.assertIn(self.marker.encode(), body)
        [flow] = router.flows.values()
        self.assertEqual(flow.client, client.address)
        self.assertEqual(self.peers(), [f"127.0.0.1:{flow.port.getHost().port}"])
        self.assertEqual(router.connections, 1)
        self.assertGreater(router.toBackend, 0)
        self.assertGreater(router.fromBackendCount, 0)
        self.assertEqual(router.dropped, {})
        # The backend's connection id was learnt from its long headers.
        self.assertTrue(flow.cids)
        self.assertEqual(self.listener.sessions, {})

    @defer.inlineCallbacks
    def test_rebindingKeepsTheFlow(self) -> Any:
        """
        A client that goes on from a new address with the same connection
        id (a NAT rebinding) is found by the backend's connection id: its
        flow follows it, and the backend sees no change of address.
        """
        router = self.startShared()
        client = self.h3Client()
        yield client.ready
        yield client.get("/")
        [flow] = router.flows.values()
        before = client.address
        client.move(newConnectionId=False)
        fields, body = yield client.get("/")
        self.assertIn(self.marker.encode(), body)
        self.assertEqual(router.flows, {client.address: flow})
        self.assertNotEqual(client.address, before)
        self.assertEqual(flow.client, client.address)
        self.assertEqual(router.connections, 1)
        self.assertEqual(len(set(self.peers())), 1)

    @defer.inlineCallbacks
    def test_migrationWithNewConnectionId(self) -> Any:
        """
        A client that moves and takes a new connection id (one the backend
        issued in encrypted frames, which TP cannot see) gets a new flow:
        the backend sees its connection move to another address of TP's,
        validates it, and answers there.
        """
        router = self.startShared()
        client = self.h3Client()
        yield client.ready
        yield client.get("/")
        [old] = router.flows.values()
        client.move(newConnectionId=True)
        fields, body = yield client.get("/")
        self.assertIn(self.marker.encode(), body)
        new = router.flows[client.address]
        self.assertIsNot(new, old)
        self.assertEqual(router.connections, 2)
        first, second = self.peers()
        self.assertEqual(first, f"127.0.0.1:{old.port.getHost().port}")
        self.assertEqual(second, f"127.0.0.1:{new.port.getHost().port}")
        # One connection of the backend's, now on the new path.
        self.assertEqual(len(set(self.site.connections.values())), 1)

    @defer.inlineCallbacks
    def test_tpAndH3AtOnce(self) -> Any:
        """
        A tp/1 connection and an h3 connection from two sockets of the same
        host, made at the same time: TP keeps the first, the backend gets
        the second, and both work.
        """
        router = self.startShared()
        client = self.h3Client()
        session, response = yield defer.gatherResults([self.tpClient(), client.get("/")])
        self.assertIn(self.marker.encode(), response[1])
        [served] = set(self.listener.sessions.values())
        self.assertEqual(served.identity, "alice")
        self.assertEqual(list(router.flows), [client.address])
        self.assertNotIn(session.localAddress.port, [a[1] for a in router.flows])
        self.assertEqual(len(self.requests), 1)
        self.assertNoTraceback()


class FloodTests(RoutingTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.clock.advance(1000)

    @defer.inlineCallbacks
    def test_halfHellos(self) -> Any:
        """
        First halves of long ClientHellos from many ports, each with its own
        destination id, beyond L{H3Backend.MAX_PENDING}: the attempts kept
        stay bounded, those beyond are counted, nothing goes to the backend,
        and a real h3 client and a real tp/1 client connect while the table
        is full; the attempts are forgotten after L{h3backend.HELLO_TIMEOUT}.
        """
        router = self.startShared(clock=self.clock)
        router.MAX_PENDING = 16
        for port in range(20000, 20040):
            self.listener.datagramReceived(firstHalf(LONG_ALPN), ("127.0.0.1", port))
        self.assertEqual(len(router.pending), 16)
        self.assertEqual(router.dropped, {"pending_full": 24})
        self.assertEqual((router.flows, router.toBackend), ({}, 0))
        self.assertEqual(self.listener.sessions, {})
        # Real clients, while the table is full: a short hello and a long one.
        client = self.h3Client()
        yield client.ready
        yield self.tpClient()
        longer = self.h3Client(LONG_ALPN)
        fields, body = yield longer.get("/")
        self.assertIn(self.marker.encode(), body)
        # The long hello took the oldest attempt's place, then completed.
        self.assertEqual((len(router.pending), router.dropped["pending_full"]), (15, 25))
        self.assertEqual(router.connections, 2)
        # The router's sweep forgets attempts older than HELLO_TIMEOUT.
        self.clock.advance(h3backend.IDLE / 4)
        self.assertEqual(router.pending, {})
        self.assertEqual(router.dropped["hello_timeout"], 15)
        self.assertNoTraceback()

    def test_oldAttemptsMakeRoom(self) -> None:
        """
        Without a sweep, the attempts older than L{h3backend.HELLO_TIMEOUT}
        are forgotten when a new one comes.
        """
        router = self.startShared(clock=self.clock)
        for port in range(20000, 20010):
            self.listener.datagramReceived(firstHalf(LONG_ALPN), ("127.0.0.1", port))
        self.clock.advance(h3backend.HELLO_TIMEOUT - 0.5)
        self.listener.datagramReceived(firstHalf(LONG_ALPN), ("127.0.0.1", 20010))
        self.assertEqual(len(router.pending), 11)
        self.clock.pump([0.5])
        self.listener.datagramReceived(firstHalf(LONG_ALPN), ("127.0.0.1", 20011))
        self.assertEqual(len(router.pending), 2)
        self.assertEqual(router.dropped, {"hello_timeout": 10})

    def test_garbageInitials(self) -> None:
        """
        Initials that are not a client's (random bytes shaped as one, a real
        one with a flipped byte) are counted C{unreadable_initial}, kept as
        no attempt and no flow, and answered by neither TP nor the backend.
        """
        router = self.startShared(clock=self.clock)
        shaped = bytes([0xC3, 0, 0, 0, 1, 8]) + os.urandom(8) + bytes([0, 0]) + bytes([0x44, 0xD0]) + os.urandom(1300)
        real = firstHalf(["h3"] * 1 + ["x" * 250] * 8)
        flipped = real[:300] + bytes([real[300] ^ 0x55]) + real[301:]
        for i, datagram in enumerate([shaped, flipped] * 5):
            self.listener.datagramReceived(datagram, ("127.0.0.1", 30000 + i))
        self.assertEqual(router.dropped, {"unreadable_initial": 10})
        self.assertEqual((router.pending, router.flows, router.connections), ({}, {}, 0))
        self.assertEqual(self.listener.sessions, {})


    @defer.inlineCallbacks
    def test_spoofedPacketsHoldNoSockets(self) -> Any:
        """
        Packets that are not Initials from addresses TP does not know
        (garbage short headers: a spoofed source costs nothing) each open a
        flow to the backend, but such unconfirmed flows are bounded apart
        (the oldest makes room, counted C{unconfirmed_replaced}) and
        forgotten after L{h3backend.HELLO_TIMEOUT} unless the client
        answers the backend; a real h3 client connects meanwhile and keeps
        its flow.
        """
        router = self.startShared(clock=self.clock)
        router.MAX_UNCONFIRMED = 8
        for i in range(50):
            self.listener.datagramReceived(bytes([0x40]) + os.urandom(60), ("127.0.0.1", 31000 + i))
        self.assertEqual(len(router.unconfirmed), 8)
        self.assertEqual(len(router.flows), 8)
        self.assertEqual(router.dropped["unconfirmed_replaced"], 42)
        client = self.h3Client()
        yield client.ready
        fields, body = yield client.get("/")
        self.assertIn(self.marker.encode(), body)
        mine = [f for f in router.flows.values() if f.confirmed]
        self.assertEqual(len(mine), 1)
        self.clock.advance(h3backend.HELLO_TIMEOUT)
        router.sweep()
        self.assertEqual(list(router.flows.values()), mine)
        self.assertEqual(router.unconfirmed, {})
        # Every spoofed flow went, by replacement or by timeout (the real
        # client's new flow also took the oldest one's place).
        self.assertEqual(router.dropped["unconfirmed_replaced"] + router.dropped["unconfirmed_timeout"], 50)


class IdleTests(RoutingTestCase):
    @defer.inlineCallbacks
    def test_idleFlowForgotten(self) -> Any:
        """
        A flow without a packet for L{h3backend.IDLE} seconds is forgotten,
        with its connection ids, and its socket is closed; the client's next
        packet makes a new flow, on which the backend sees its connection
        move, and the request gets its answer.
        """
        clock = Clock()
        clock.advance(1000)
        router = self.startShared(clock=clock)
        client = self.h3Client()
        yield client.ready
        yield client.get("/")
        [flow] = router.flows.values()
        port = flow.port
        # The router looks every IDLE / 4 seconds.
        for _ in range(3):
            clock.advance(h3backend.IDLE / 4)
        self.assertEqual(list(router.flows.values()), [flow])
        clock.advance(h3backend.IDLE / 4)
        self.assertEqual((router.flows, router.byCid), ({}, {}))
        self.assertIsNone(flow.port)
        yield waitUntil(lambda: not port.connected, "the flow's socket closed")
        fields, body = yield client.get("/")
        self.assertIn(self.marker.encode(), body)
        [newer] = router.flows.values()
        self.assertIsNot(newer, flow)
        self.assertEqual(router.connections, 2)
        self.assertEqual(len(set(self.peers())), 2)
        # The client answered the backend on the new flow: confirmed, so
        # it is kept for IDLE, not for HELLO_TIMEOUT.
        self.assertTrue(newer.confirmed)
        self.assertEqual(router.unconfirmed, {})


class BackendDownTests(RoutingTestCase):
    @defer.inlineCallbacks
    def test_backendDown(self) -> Any:
        """
        With nothing on the backend's port, an h3 client's Initials get no
        answer (the send errors are counted), TP logs no traceback, and a
        tp/1 connection works.
        """
        dead = self.sitePort.getHost().port
        yield self.sitePort.stopListening()
        router = self.startShared(backend=("127.0.0.1", dead))
        client = self.h3Client()
        yield waitUntil(lambda: router.sendErrors >= 3, "three of the client's Initials refused")
        self.assertFalse(client.ready.called)
        self.assertEqual(router.fromBackendCount, 0)
        # Each attempt's socket is closed and forgotten.
        self.assertLessEqual(len(router.flows), 1)
        yield self.tpClient()
        self.assertEqual(len(set(self.listener.sessions.values())), 1)
        self.assertNoTraceback()
