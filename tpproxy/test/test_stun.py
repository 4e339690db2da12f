"""
TP's STUN binding responder (issue 16): the sans-IO codec, checked against
aioice's STUN implementation both ways, and the demultiplexing on TP's QUIC
port, over real UDP and with a clock for the rate limit.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy import stun
from tpproxy.pki import loadCertificates, loadKey
from tpproxy.testing import TestPKI
from tpproxy.transports.quic import STUN_BURST, QuicListener, serverConfiguration
from tpproxy.verify import ClientCertChecker


def aioiceRequest(fingerprint: bool = True) -> Any:
    from aioice import stun as reference

    message = reference.Message(message_method=reference.Method.BINDING, message_class=reference.Class.REQUEST)
    if fingerprint:
        message.add_fingerprint()
    return message


class CodecTests(SynchronousTestCase):
    def test_aioiceReadsTheAnswer(self) -> None:
        """
        A binding request made by aioice is answered with a success response
        that aioice parses (FINGERPRINT checked), for the same transaction,
        with the client's address and port in XOR-MAPPED-ADDRESS: IPv4,
        IPv6, and an IPv4-mapped IPv6 address as IPv4.
        """
        from aioice import stun as reference

        for host, port, expected in (
            ("198.51.100.7", 40000, ("198.51.100.7", 40000)),
            ("2001:db8::5", 1, ("2001:db8::5", 1)),
            ("::ffff:192.0.2.9", 65535, ("192.0.2.9", 65535)),
        ):
            request = aioiceRequest()
            response = reference.parse_message(stun.answer(bytes(request), host, port))
            self.assertEqual((response.message_method, response.message_class), (reference.Method.BINDING, reference.Class.RESPONSE))
            self.assertEqual(response.transaction_id, request.transaction_id)
            self.assertEqual(response.attributes["XOR-MAPPED-ADDRESS"], expected)
            self.assertIn("FINGERPRINT", response.attributes)

    def test_withoutFingerprint(self) -> None:
        request = aioiceRequest(fingerprint=False)
        self.assertEqual(stun.parseBindingRequest(bytes(request)), request.transaction_id)

    def test_smallAnswer(self) -> None:
        """
        A response is at most 52 bytes (IPv6): with requests of 20 bytes or
        more, TP never amplifies more than 2.6 times, and the rate limit
        bounds the rest.
        """
        self.assertEqual(len(stun.answer(bytes(aioiceRequest()), "2001:db8::1", 9)), 52)
        self.assertEqual(len(stun.answer(bytes(aioiceRequest()), "192.0.2.1", 9)), 40)

    def refused(self, data: bytes, why: str) -> None:
        with self.assertRaises(stun.NotStun) as caught:
            stun.parseBindingRequest(data)
        self.assertIn(why, str(caught.exception))

    def test_malformed(self) -> None:
        """
        Anything but a well-formed binding request is refused, with the
        reason: short, no cookie, wrong length, an indication or a response
        or another method, an attribute cut short or overrunning, a wrong or
        misplaced FINGERPRINT, oversize.
        """
        good = bytes(aioiceRequest())
        self.refused(good[:19], "shorter")
        self.refused(good[:4] + b"\0\0\0\0" + good[8:], "cookie")
        self.refused(good + b"\0\0\0\0", "length")
        self.refused(struct.pack("!H", 0x0011) + good[2:], "not a binding request")
        self.refused(struct.pack("!H", 0x0101) + good[2:], "not a binding request")
        self.refused(struct.pack("!H", 0x0003) + good[2:], "not a binding request")
        self.refused(good[:-1] + bytes([good[-1] ^ 1]), "FINGERPRINT does not match")
        header = struct.pack("!HHI12s", 1, 4, stun.MAGIC_COOKIE, os.urandom(12))
        self.refused(header + struct.pack("!HH", 0x8022, 8), "longer than the message")
        self.refused(struct.pack("!HHI12s", 1, 12, stun.MAGIC_COOKIE, os.urandom(12)) + struct.pack("!HHI", stun.FINGERPRINT, 4, 0) + b"\0" * 4, "last attribute")
        self.refused(struct.pack("!HHI12s", 1, 1000, stun.MAGIC_COOKIE, os.urandom(12)) + b"\0" * 1000, "larger")

    def test_demultiplexing(self) -> None:
        """
        RFC 7983: STUN starts with 0-3; QUIC never does (the fixed bit).
        """
        self.assertTrue(stun.isStun(bytes(aioiceRequest())))
        for first in (0x40, 0x7F, 0xC0, 0xFF):
            self.assertFalse(stun.isStun(bytes([first]) + b"\0" * 30))
        self.assertFalse(stun.isStun(b""))


class _Port:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def getHost(self) -> Any:
        return None


class ListenerMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        pki = TestPKI.create(self.mktemp())
        d = pki.directory
        chain, key = loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key"))
        from tpproxy.transports.quic import ClientVerifier

        self.clock = task.Clock()
        self.listener = QuicListener(self.clock, serverConfiguration(chain, key), ClientVerifier([pki.ca.cert], ClientCertChecker(), self.clock), None)
        self.port = _Port()
        self.listener.transport = self.port  # type: ignore[assignment]

    def test_rateLimited(self) -> None:
        """
        A flood of binding requests (spoofed sources, say) gets at most the
        burst answered at once, then the rate: the rest are counted, not
        answered; QUIC is untouched.
        """
        request = bytes(aioiceRequest())
        for i in range(int(STUN_BURST) + 500):
            self.listener.datagramReceived(request, ("192.0.2.1", 1000 + i % 50000))
        self.assertEqual(len(self.port.sent), STUN_BURST)
        self.assertEqual(self.listener.stun, {"answered": STUN_BURST, "rate_limited": 500})
        self.clock.advance(1)
        self.listener.datagramReceived(request, ("192.0.2.1", 9))
        self.assertEqual(self.listener.stun["answered"], STUN_BURST + 1)
        self.assertEqual(self.listener.sessions, {})

    def test_garbageInTheStunRange(self) -> None:
        """
        Datagrams starting with 0-3 that are not binding requests get no
        answer and create nothing.
        """
        for data in (b"\0", b"\x01\x01" + os.urandom(40), b"\x03" * 100, bytes(aioiceRequest())[:-1]):
            self.listener.datagramReceived(data, ("192.0.2.1", 9))
        self.assertEqual(self.port.sent, [])
        self.assertEqual(self.listener.stun, {"malformed": 4})
        self.assertEqual(self.listener.sessions, {})


class _Client(protocol.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: defer.DeferredQueue[bytes] = defer.DeferredQueue()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.answers.put(data)


class ListenerTests(TestCase):
    @defer.inlineCallbacks
    def test_reflexiveAddressOnTPsPort(self) -> Any:
        """
        Over real UDP: a binding request to TP's QUIC port is answered with
        the address and port the request came from, on IPv4 and IPv6
        loopback.
        """
        from aioice import stun as reference

        from tpproxy.service import makeQuicListener, makeServerFactory

        pki = TestPKI.create(self.mktemp())
        config = pki.serverConfig()
        factory = makeServerFactory(config, reactor)
        for interface in ("127.0.0.1", "::1"):
            listener = makeQuicListener(config, reactor, factory.wrappedFactory)
            port = reactor.listenUDP(0, listener, interface=interface)
            self.addCleanup(port.stopListening)
            client = _Client()
            clientPort = reactor.listenUDP(0, client, interface=interface)
            self.addCleanup(clientPort.stopListening)
            request = aioiceRequest()
            clientPort.write(bytes(request), (interface, port.getHost().port))
            data = yield client.answers.get().addTimeout(10, reactor)
            response = reference.parse_message(data)
            self.assertEqual(response.transaction_id, request.transaction_id)
            self.assertEqual(response.attributes["XOR-MAPPED-ADDRESS"], (interface, clientPort.getHost().port))
            self.assertEqual(listener.stun, {"answered": 1})
