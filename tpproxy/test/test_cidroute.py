"""
Connection ids that name their worker, and the messages that carry a QUIC
packet between workers (L{tpproxy.transports.cidroute},
L{tpproxy.workers.QuicForwarder}).
"""

from __future__ import annotations

import os
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
            self.assertEqual(decodeForward(encodeForward(9, 3, addr, b"packet")), (9, 3, addr, b"packet"))

    def test_garbage(self) -> None:
        for bad in (b"", b"\x00" * 10, b"\x00\x00\x05" + b"\x00" * 18):
            with self.assertRaises(ValueError):
                decodeForward(bad)


class Listener:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, Any]] = []

    def datagramReceived(self, data: bytes, addr: Any, forwarded: bool = False) -> None:
        assert forwarded
        self.got.append((data, addr))


class Sent:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


class ForwarderTests(TestCase):
    """
    L{QuicForwarder}: what one worker sends, the other takes only with the
    MAC of their shared secret.
    """

    def pair(self, secret: bytes = b"s" * 32) -> tuple[QuicForwarder, QuicForwarder, Listener]:
        stateDir = self.mktemp()
        os.makedirs(stateDir)
        listener = Listener()
        a = QuicForwarder(stateDir, b"s" * 32, 0, [Listener()])
        b = QuicForwarder(stateDir, secret, 1, [listener])
        with open(b.portFile(1), "w") as f:
            f.write("40001\n")
        a.transport = Sent()  # type: ignore[assignment]
        return a, b, listener

    def test_delivered(self) -> None:
        a, b, listener = self.pair()
        self.assertTrue(a.send(0, 1, b"quic packet", ("192.0.2.7", 5000)))
        [(message, addr)] = a.transport.sent  # type: ignore[union-attr]
        self.assertEqual(addr, ("127.0.0.1", 40001))
        b.datagramReceived(message, ("127.0.0.1", 40000))
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

    def test_forOtherWorkerRejected(self) -> None:
        """
        A message signed for worker 1 that reaches another worker (a stale
        port now someone else's) is dropped: the destination is inside
        what the MAC covers.
        """
        a, b, listener = self.pair()
        a.send(0, 1, b"quic packet", ("192.0.2.7", 5000))
        [(message, _)] = a.transport.sent  # type: ignore[union-attr]
        other = QuicForwarder(a.stateDir, b"s" * 32, 2, [Listener()])
        other.datagramReceived(message, None)
        self.assertEqual((other.listeners[0].got, other.rejected), ([], 1))

    def test_beyondPoolNotForwarded(self) -> None:
        """
        An id naming a worker number the pool does not run is not
        forwarded, even if a port file for it is there.
        """
        a, b, listener = self.pair()
        a.workers = 1
        self.assertFalse(a.send(0, 1, b"quic packet", ("192.0.2.7", 5000)))
        self.assertEqual(a.transport.sent, [])  # type: ignore[union-attr]

    def test_ownerNotRunning(self) -> None:
        """
        A packet for a worker with no port file (not running, or fewer
        workers than the id names) is not sent, and the listener is told
        so (it then answers it as a packet of an unknown connection).
        """
        a, b, listener = self.pair()
        self.assertFalse(a.send(0, 7, b"quic packet", ("192.0.2.7", 5000)))
        self.assertEqual((a.transport.sent, a.undelivered), ([], 1))  # type: ignore[union-attr]

    def test_portReadAgain(self) -> None:
        """
        A restarted worker's new port is used once the cached one is
        L{QuicForwarder.PORT_TTL} old.
        """
        from twisted.internet.task import Clock

        a, b, listener = self.pair()
        a.clock = Clock()
        self.assertEqual(a.portOf(1), 40001)
        with open(b.portFile(1), "w") as f:
            f.write("40002\n")
        self.assertEqual(a.portOf(1), 40001)
        a.clock.advance(QuicForwarder.PORT_TTL)
        self.assertEqual(a.portOf(1), 40002)


class NoLoopTests(TestCase):
    """
    A packet another worker handed over is never handed on: with a stale
    port file that names this worker's own forwarding port, one packet
    from the network used to circle forever (found in review).
    """

    def test_forwardedNotForwardedAgain(self) -> None:
        from tpproxy.transports.quic import QuicListener

        handed: list[Any] = []
        # Only what datagramReceived reads of an unknown short-header packet.
        listener = QuicListener.__new__(QuicListener)
        listener.configuration = QuicConfiguration(is_client=False)
        listener.sessions = {}
        listener.forward = lambda owner, data, addr: handed.append(owner) or True
        listener.worker = 0
        listener.forwarded = 0
        resets: list[bytes] = []
        listener._statelessReset = lambda cid, size, addr: resets.append(cid)  # type: ignore[method-assign]
        cid = bytes([tagFor(1)]) + b"\x11" * 7
        packet = bytes([0x40]) + cid + b"\x00" * 40  # a short-header packet
        listener.datagramReceived(packet, ("192.0.2.7", 5000))
        self.assertEqual((handed, listener.forwarded), ([1], 1))
        listener.datagramReceived(packet, ("192.0.2.7", 5000), forwarded=True)
        self.assertEqual((handed, resets), ([1], [cid]))
