"""
Connection ids that name their worker, and the messages that carry a QUIC
packet between workers (L{tpproxy.transports.cidroute},
L{tpproxy.workers.QuicForwarder}).
"""

from __future__ import annotations

from typing import Any

from aioquic.quic import connection
from aioquic.quic.configuration import QuicConfiguration
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy.transports.cidroute import CID_LENGTH, decodeForward, encodeForward, installTaggedIds, tagFor, workerOf
from tpproxy.workers import QuicForwarder


class TagTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        for worker in (0, 1, 17, 63):
            cid = bytes([tagFor(worker)]) + b"\x99" * (CID_LENGTH - 1)
            self.assertEqual(workerOf(cid), worker)

    def test_untagged(self) -> None:
        """
        Ids of another form name no worker: another length, or a first
        byte whose top bits are not 01 (a client's random Initial id
        mostly).
        """
        for cid in (b"", b"\x40" * 7, b"\x40" * 9, b"\x00" + b"x" * 7, b"\x80" + b"x" * 7, b"\xc5" + b"x" * 7):
            self.assertIsNone(workerOf(cid), cid)

    def test_bounds(self) -> None:
        for worker in (-1, 64):
            with self.assertRaises(ValueError):
                tagFor(worker)

    def test_aioquicIssuesTaggedIds(self) -> None:
        """
        Once installed, every id a new aioquic connection issues names the
        worker, the rest random; other random draws are untouched.
        """
        self.addCleanup(setattr, connection, "os", connection.os)
        installTaggedIds(5)
        ids = set()
        for _ in range(20):
            conn = connection.QuicConnection(configuration=QuicConfiguration(is_client=True))
            self.assertEqual(workerOf(conn.host_cid), 5)
            ids.add(conn.host_cid)
        self.assertEqual(len(ids), 20)
        self.assertEqual(len(connection.os.urandom(16)), 16)


class ForwardTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        for addr in (("127.0.0.1", 4433), ("::1", 1), ("2001:db8::5", 65535), ("10.1.2.3", 0)):
            self.assertEqual(decodeForward(encodeForward(3, addr, b"packet")), (3, addr, b"packet"))

    def test_garbage(self) -> None:
        for bad in (b"", b"\x00" * 10, b"\x00\x05" + b"\x00" * 18):
            with self.assertRaises(ValueError):
                decodeForward(bad)


class Listener:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, Any]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.got.append((data, addr))


class Sent:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, str]] = []

    def write(self, data: bytes, path: str) -> None:
        self.sent.append((data, path))


class ForwarderTests(TestCase):
    """
    L{QuicForwarder}: what one worker sends, the other takes only with the
    MAC of their shared secret.
    """

    def pair(self, secret: bytes = b"s" * 32) -> tuple[QuicForwarder, QuicForwarder, Listener]:
        listener = Listener()
        a = QuicForwarder("/var/lib/tp", b"s" * 32, 0, [Listener()])
        b = QuicForwarder("/var/lib/tp", secret, 1, [listener])
        a.transport = Sent()  # type: ignore[assignment]
        return a, b, listener

    def test_delivered(self) -> None:
        a, b, listener = self.pair()
        self.assertTrue(a.send(0, 1, b"quic packet", ("192.0.2.7", 5000)))
        [(message, path)] = a.transport.sent  # type: ignore[union-attr]
        self.assertEqual(path, b.path(1))
        self.assertTrue(path.startswith("\0tp-quic-"))
        b.datagramReceived(message, None)
        self.assertEqual(listener.got, [(b"quic packet", ("192.0.2.7", 5000))])

    def test_forgedRejected(self) -> None:
        """
        A message under another secret, with a flipped byte, or too short
        is dropped and counted; nothing reaches the listener.
        """
        a, b, listener = self.pair(secret=b"t" * 32)
        a.send(0, 1, b"quic packet", ("192.0.2.7", 5000))
        [(message, _)] = a.transport.sent  # type: ignore[union-attr]
        b.datagramReceived(message, None)
        a2, b2, listener2 = self.pair()
        a2.send(0, 1, b"quic packet", ("192.0.2.7", 5000))
        [(good, _)] = a2.transport.sent  # type: ignore[union-attr]
        b2.datagramReceived(good[:-1] + bytes([good[-1] ^ 1]), None)
        b2.datagramReceived(b"short", None)
        self.assertEqual((listener.got, listener2.got, b.rejected, b2.rejected), ([], [], 1, 2))

    def test_ownerNotRunning(self) -> None:
        """
        A packet for a worker whose socket is not there is not delivered,
        and the listener is told so (it then answers it as a packet of an
        unknown connection).
        """
        from twisted.internet import reactor

        a = QuicForwarder(self.mktemp(), b"s" * 32, 0, [Listener()])
        port = reactor.listenUNIXDatagram(a.path(0), a)
        self.addCleanup(port.stopListening)
        self.assertFalse(a.send(0, 7, b"quic packet", ("192.0.2.7", 5000)))
        self.assertEqual(a.undelivered, 1)

    def test_otherStateDirOtherSpace(self) -> None:
        """
        Two TPs on one host (other state directories) use other socket
        names.
        """
        one = QuicForwarder("/var/lib/tp-a", b"s" * 32, 0, [])
        two = QuicForwarder("/var/lib/tp-b", b"s" * 32, 0, [])
        self.assertNotEqual(one.path(0), two.path(0))
