"""
A client closing its QUIC connection when its work is done
(L{tpproxy.transports.quic.ClientSession.closeWhenDelivered}, what C{tp
connect} does through L{tpproxy.connector.Connector.finish}): once TP has
acknowledged what was written, so that a packet lost just before the end
is sent again, and never later than a grace period.  In memory: TP's real
QUIC classes on a fake network whose path loses what the tests say.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tpproxy.test.quicmemory import SERVER, QuicWorld, Recorder, RecordingFactory
from tpproxy.test.support import sha256


class CloseWhenDeliveredTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = QuicWorld(self.mktemp())
        self.network = self.world.network
        self.factory = RecordingFactory()
        self.world.listen(factory=self.factory)
        self.session = self.world.connected()
        self.closes: list[float] = []

    def closing(self) -> bool:
        """
        Whether the client sent CONNECTION_CLOSE (aioquic's connection is
        closing or closed).
        """
        from aioquic.quic.connection import END_STATES

        return self.session.conn._state in END_STATES

    def loseNext(self, count: int) -> None:
        """
        Lose the client's next C{count} datagrams to TP.
        """
        left = [count]

        def filter(source: Any, destination: Any, data: bytes) -> bool:
            if destination == SERVER and left[0] > 0:
                left[0] -= 1
                return False
            return True

        self.network.filter = filter

    def send(self, size: int = 64 * 1024) -> bytes:
        """
        Write C{size} bytes and a FIN on a new stream, sent at once; the
        bytes.
        """
        payload = os.urandom(size)
        stream = self.session.openStream(Recorder())
        stream.write(payload)
        stream.loseWriteConnection()
        self.session.transmit()
        return payload

    def serverData(self) -> bytes:
        [server] = self.factory.built
        return server.data

    def test_waitsForAcknowledgement(self) -> None:
        """
        With the first flight of data lost, the connection closes only
        after the data was resent and acknowledged: TP has all of it and
        its FIN.
        """
        self.loseNext(10)
        payload = self.send()
        self.assertFalse(self.session.delivered())
        done = self.session.closeWhenDelivered("client done")
        self.assertFalse(self.closing())
        self.network.run(until=lambda: done.called)
        self.assertTrue(self.closing())
        self.assertEqual(sha256(self.serverData()), sha256(payload))
        [server] = self.factory.built
        self.assertTrue(server.readClosed)

    def test_closingAtOnceLosesTheTail(self) -> None:
        """
        The control: the same loss with an immediate close leaves TP
        without the data (what C{tp connect} did before).
        """
        self.loseNext(10)
        payload = self.send()
        self.session.close(0, "client done")
        self.network.run(timeout=5)
        received = b"".join(p.data for p in self.factory.built)
        self.assertLess(len(received), len(payload))

    def test_graceBound(self) -> None:
        """
        On a path that carries nothing more, the connection closes after
        the grace period all the same.
        """
        self.network.filter = lambda source, destination, data: destination != SERVER
        self.send()
        start = self.world.reactor.seconds()
        done = self.session.closeWhenDelivered("client done", grace=2.0)
        self.network.run(until=lambda: done.called, timeout=10)
        self.assertTrue(self.closing())
        self.assertAlmostEqual(self.world.reactor.seconds() - start, 2.0, delta=0.5)

    def test_nothingPending(self) -> None:
        """
        With everything acknowledged (or nothing written), the close is
        immediate; on a closed connection the Deferred fires at once, and
        every caller gets one.
        """
        payload = self.send(1000)
        self.network.run(until=self.session.delivered)
        self.assertEqual(self.serverData(), payload)
        first = self.session.closeWhenDelivered("client done")
        self.assertTrue(first.called)
        self.assertTrue(self.closing())
        self.assertTrue(self.session.closeWhenDelivered("again").called)
