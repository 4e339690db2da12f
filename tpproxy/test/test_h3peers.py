"""
The HTTP/3 test peers of L{tpproxy.test.h3peers}: the server
L{tpproxy.test.h3server} in memory against aioquic's HTTP/3 client, then
headless Chromium fetching a page from it over h3 on loopback, directly
(no TP between them), with a trusted and with an untrusted CA.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy.pki import CertificateAuthority
from tpproxy.test.h3peers import ChromiumError, fetchWithChromium, makeProfile, requireChromium, startH3Server
from tpproxy.test.h3server import MAX_BIG, H3Server, bigBody, configuration
from tpproxy.testing import TestPKI

SERVER = ("127.0.0.1", 4433)
CLIENT = ("127.0.0.1", 50000)


class _Wire:
    """
    The server's UDP transport: keeps what it sends.
    """

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


class _Pair:
    """
    An L{H3Server} and an aioquic HTTP/3 client on a L{Clock}, moving
    datagrams between them in memory.
    """

    def __init__(self, pki: TestPKI, marker: str = "M<1>") -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.log: list[dict[str, object]] = []
        self.server = H3Server(configuration(str(pki.directory / "server.pem"), str(pki.directory / "server.key")), self.clock, marker, self.log.append)
        self.wire = _Wire()
        self.server.makeConnection(self.wire)  # type: ignore[arg-type]
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
        config.load_verify_locations(pki.caPath)
        self.quic = QuicConnection(configuration=config)
        self.h3 = H3Connection(self.quic)
        self.responses: dict[int, tuple[dict[bytes, bytes], bytearray, bool]] = {}
        self.silent = False
        self.quic.connect(SERVER, now=self.clock.seconds())

    def exchange(self) -> None:
        """
        Move datagrams both ways until neither side has any to send (a
        silent client neither sends nor receives).
        """
        for _ in range(10000):
            now = self.clock.seconds()
            outbound = [] if self.silent else self.quic.datagrams_to_send(now=now)
            for data, _ in outbound:
                self.server.datagramReceived(data, CLIENT)
            inbound, self.wire.sent = self.wire.sent, []
            for data, addr in inbound:
                assert addr == CLIENT, addr
                if not self.silent:
                    self.quic.receive_datagram(data, SERVER, now=now)
            self._events()
            if not outbound and not inbound:
                return
        raise AssertionError("the exchange never settled")

    def _events(self) -> None:
        event = self.quic.next_event()
        while event is not None:
            for h3event in self.h3.handle_event(event):
                if isinstance(h3event, HeadersReceived):
                    self.responses[h3event.stream_id] = (dict(h3event.headers), bytearray(), h3event.stream_ended)
                elif isinstance(h3event, DataReceived):
                    fields, body, _ = self.responses[h3event.stream_id]
                    body += h3event.data
                    self.responses[h3event.stream_id] = (fields, body, h3event.stream_ended)
            event = self.quic.next_event()

    def run(self, until: Callable[[], bool], seconds: float) -> None:
        """
        Move datagrams and run both sides' timers, in fake time, until
        C{until()} holds or C{seconds} have passed with nothing left to do.
        """
        end = self.clock.seconds() + seconds
        while True:
            self.exchange()
            if until():
                return
            times = [call.getTime() for call in self.clock.getDelayedCalls()]
            timer = None if self.silent else self.quic.get_timer()
            if timer is not None:
                times.append(timer)
            if not times or min(times) > end:
                break
            self.clock.advance(max(0.0, min(times) - self.clock.seconds()))
            if timer is not None and timer <= self.clock.seconds():
                self.quic.handle_timer(now=self.clock.seconds())
        self.clock.advance(max(0.0, end - self.clock.seconds()))

    def request(self, path: str, method: str = "GET") -> tuple[dict[bytes, bytes], bytes]:
        streamId = self.quic.get_next_available_stream_id()
        self.h3.send_headers(
            streamId,
            [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", path.encode())],
            end_stream=True,
        )
        self.run(lambda: self.responses.get(streamId, ({}, b"", False))[2], 30)
        assert streamId in self.responses, f"no response to {path}"
        fields, body, ended = self.responses[streamId]
        assert ended, f"response to {path} did not end"
        return fields, bytes(body)


class H3ServerTests(SynchronousTestCase):
    """
    L{H3Server} in memory, against aioquic's HTTP/3 client.
    """

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())

    def test_page(self) -> None:
        """
        C{GET /} is a small HTML page holding the marker (escaped), and the
        server logs the request with its method, path, ALPN and peer.
        """
        pair = _Pair(self.pki)
        fields, body = pair.request("/")
        self.assertEqual(fields[b":status"], b"200")
        self.assertEqual(fields[b"content-type"], b"text/html; charset=utf-8")
        self.assertEqual(fields[b"content-length"], str(len(body)).encode())
        self.assertIn(b"<p id=\"marker\">M&lt;1&gt;</p>", body)
        self.assertEqual(pair.log, [{"method": "GET", "path": "/", "authority": "localhost", "alpn": "h3", "peer": "127.0.0.1:50000"}])

    def test_big(self) -> None:
        """
        C{GET /big?n=N} is N bytes, byte I being C{I % 251}; N outside 0 to
        L{MAX_BIG} is refused.
        """
        pair = _Pair(self.pki)
        fields, body = pair.request("/big?n=300000")
        self.assertEqual(fields[b":status"], b"200")
        self.assertEqual(len(body), 300000)
        self.assertEqual(body, bytes(i % 251 for i in range(300000)))
        self.assertEqual(body, bigBody(300000))
        self.assertEqual(pair.request("/big?n=0")[1], b"")
        for bad in ("-1", str(MAX_BIG + 1), "x"):
            self.assertEqual(pair.request(f"/big?n={bad}")[0][b":status"], b"400")

    def test_otherRequests(self) -> None:
        """
        C{HEAD} gets the fields without a body; an unknown path is 404 and
        another method 405.
        """
        pair = _Pair(self.pki)
        fields, body = pair.request("/", method="HEAD")
        self.assertEqual((fields[b":status"], fields[b"content-type"], body), (b"200", b"text/html; charset=utf-8", b""))
        self.assertEqual(pair.request("/nothing")[0][b":status"], b"404")
        self.assertEqual(pair.request("/", method="DELETE")[0][b":status"], b"405")
        self.assertEqual([(r["method"], r["path"]) for r in pair.log], [("HEAD", "/"), ("GET", "/nothing"), ("DELETE", "/")])

    def test_issuedConnectionIds(self) -> None:
        """
        A client that moves to another of the connection ids the server
        issued is still served: the server routes every id it issued.
        """
        pair = _Pair(self.pki)
        pair.request("/")
        connections = set(pair.server.connections.values())
        self.assertEqual(len(connections), 1)
        self.assertGreater(len(pair.server.connections), 2)
        before = set(pair.server.connections)
        pair.quic.change_connection_id()
        self.assertEqual(pair.request("/")[0][b":status"], b"200")
        self.assertEqual(set(pair.server.connections.values()), connections)
        self.assertNotEqual(set(pair.server.connections), before)

    def test_closeForgets(self) -> None:
        """
        Once a connection has ended, none of its ids routes and its timer is
        gone.
        """
        pair = _Pair(self.pki)
        pair.request("/")
        pair.quic.close()
        pair.run(lambda: not pair.server.connections, 60)
        self.assertEqual(pair.server.connections, {})
        self.assertEqual(pair.clock.getDelayedCalls(), [])

    def test_idleTimeout(self) -> None:
        """
        A connection the client abandons ends on the server's idle timer.
        """
        pair = _Pair(self.pki)
        pair.request("/")
        pair.silent = True
        pair.run(lambda: not pair.server.connections, 120)
        self.assertEqual(pair.server.connections, {})
        self.assertEqual(pair.clock.getDelayedCalls(), [])

    def test_versionNegotiation(self) -> None:
        """
        An Initial of an unknown version gets a Version Negotiation packet
        listing version 1; a datagram that is no Initial for an unknown
        connection, or an Initial under 1200 bytes, is dropped.
        """
        pair = _Pair(self.pki)
        dcid, scid = b"\x11" * 8, b"\x22" * 8
        unknown = b"\xc0" + b"\x1a\x2a\x3a\x4a" + b"\x08" + dcid + b"\x08" + scid
        pair.server.datagramReceived(unknown + b"\x00" * (1200 - len(unknown)), CLIENT)
        [(packet, addr)] = pair.wire.sent
        self.assertEqual(addr, CLIENT)
        self.assertEqual(packet[1:5], b"\x00\x00\x00\x00")
        self.assertEqual(packet[5:6] + packet[6:14], b"\x08" + scid)
        self.assertIn(b"\x00\x00\x00\x01", packet[23:])
        pair.wire.sent.clear()
        shortHeader = b"\x40" + b"\x33" * 8 + os.urandom(40)
        pair.server.datagramReceived(shortHeader, CLIENT)
        initial = pair.quic.datagrams_to_send(now=pair.clock.seconds())[0][0]
        pair.server.datagramReceived(initial[:1000], CLIENT)
        pair.server.datagramReceived(b"", CLIENT)
        self.assertEqual((pair.wire.sent, pair.server.connections), ([], {}))


class ChromiumTests(TestCase):
    """
    Headless Chromium fetches a page from L{tpproxy.test.h3server} over
    HTTP/3, directly.  Skipped without C{chromium} and C{certutil} (Debian
    C{chromium} and C{libnss3-tools}), an error under C{CI=true}.
    """

    timeout = 120

    def setUp(self) -> None:
        requireChromium()
        self.pki = TestPKI.create(self.mktemp())
        self.marker = "tp-h3-" + os.urandom(8).hex()

    @defer.inlineCallbacks
    def test_fetchOverH3(self) -> Any:
        """
        With the test CA in its NSS database, Chromium loads the page over
        QUIC: the DOM holds the marker (the server speaks nothing else) and
        the server logged the request with ALPN h3.
        """
        port, server = yield startH3Server(self, str(self.pki.directory / "server.pem"), str(self.pki.directory / "server.key"), marker=self.marker)
        home = yield makeProfile(self.mktemp(), self.pki.ca.certPEM)
        dom = yield fetchWithChromium(f"https://127.0.0.1:{port}/", f"127.0.0.1:{port}", home)
        self.assertIn(f'<p id="marker">{self.marker}</p>', dom)
        request = yield server.waitForRequest("/")
        self.assertEqual((request["method"], request["alpn"]), ("GET", "h3"))
        self.assertTrue(request["peer"].startswith("127.0.0.1:"), request)

    @defer.inlineCallbacks
    def test_fetchByNameOverIPv6(self) -> Any:
        """
        A page fetched by a name that the fetch maps to ::1 (QUIC cannot be
        forced for an IPv6 literal): the request carries the name.
        """
        self.pki.ca.issue("www.h3.test", dns=("www.h3.test",), server=True).write(self.pki.directory / "named.pem", self.pki.directory / "named.key")
        port, server = yield startH3Server(self, str(self.pki.directory / "named.pem"), str(self.pki.directory / "named.key"), marker=self.marker, host="::1")
        home = yield makeProfile(self.mktemp(), self.pki.ca.certPEM)
        dom = yield fetchWithChromium(f"https://www.h3.test:{port}/", f"www.h3.test:{port}", home, resolve={"www.h3.test": "::1"})
        self.assertIn(self.marker, dom)
        request = yield server.waitForRequest("/")
        self.assertEqual((request["authority"], request["alpn"]), (f"www.h3.test:{port}", "h3"))
        self.assertTrue(request["peer"].startswith("[::1]:"), request)

    @defer.inlineCallbacks
    def test_untrustedCA(self) -> Any:
        """
        With another CA in its NSS database, Chromium refuses the server's
        certificate in the QUIC handshake and loads nothing: the trust step
        is what makes the fetch work.
        """
        port, server = yield startH3Server(self, str(self.pki.directory / "server.pem"), str(self.pki.directory / "server.key"), marker=self.marker)
        home = yield makeProfile(self.mktemp(), CertificateAuthority.create("Another CA").certPEM)
        error = yield self.assertFailure(fetchWithChromium(f"https://127.0.0.1:{port}/", f"127.0.0.1:{port}", home), ChromiumError)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", error.stderr)
        self.assertIn("ERR_QUIC_PROTOCOL_ERROR", error.stderr)
        self.assertNotIn(self.marker, error.dom)
        self.assertEqual(server.requests, [])
