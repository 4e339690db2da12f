"""
Path MTU discovery of TP's QUIC connections (L{tpproxy.transports.pmtu},
L{tpproxy.transports.quic.TPQuicConnection}): the search alone, then real
TP connections on the memory network (L{tpproxy.test.quicmemory}) whose
path drops, refuses (C{EMSGSIZE}) or stops carrying large datagrams, then
one transfer over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tpproxy.pki import loadCertificates, loadKey
from tpproxy.test.quicmemory import SERVER, Address, QuicWorld, Recorder, RecordingFactory
from tpproxy.test.support import closeAtEnd, sha256
from tpproxy.test.test_quic import waitUntil
from tpproxy.test.test_webtransport import WebTransportTestCase, until
from tpproxy.testing import TestPKI
from tpproxy.transports import pmtu, quic
from tpproxy.transports.pmtu import BASE, BLACK_HOLE_LOSSES, LADDER, MAX_PROBES, RAISE_INTERVAL, PathMTUSearch
from tpproxy.verify import ClientCertChecker
from tpproxy.wire import ClientHello


def climb(search: PathMTUSearch, now: float = 0.0) -> list[int]:
    """
    Acknowledge every probe until the search ends; the sizes probed.
    """
    probed = []
    while (size := search.nextProbe(now)) is not None:
        probed.append(size)
        search.acknowledged(size)
    return probed




def loseAll(search: PathMTUSearch, size: int, now: float = 0.0) -> None:
    """
    Lose C{MAX_PROBES} probes of C{size} (the next probes must be of it).
    """
    for _ in range(MAX_PROBES):
        assert search.nextProbe(now) == size, (search.outstanding, size)
        search.lost(size)


class SearchTests(SynchronousTestCase):
    """
    L{PathMTUSearch} alone: which size it probes next, and which it uses.
    """

    def test_climbsOnAcks(self) -> None:
        """
        Each acknowledged probe raises the size in use to it; the ladder is
        climbed in order up to the maximum, then the search ends.
        """
        search = PathMTUSearch()
        self.assertEqual(search.current, BASE)
        size = search.nextProbe(0)
        self.assertEqual(size, LADDER[0])
        # One probe at a time.
        self.assertIsNone(search.nextProbe(0))
        search.acknowledged(LADDER[0])
        self.assertEqual(search.current, LADDER[0])
        self.assertEqual([LADDER[0]] + climb(search), list(LADDER))
        self.assertEqual(search.current, pmtu.DEFAULT_MAX)
        self.assertIsNone(search.nextProbe(1))

    def test_staleAnswersIgnored(self) -> None:
        """
        An acknowledgement or loss of a size that is not the outstanding
        probe changes nothing.
        """
        search = PathMTUSearch()
        search.nextProbe(0)
        search.acknowledged(8952)
        search.lost(8952)
        self.assertEqual((search.current, search.outstanding, search.failures), (BASE, LADDER[0], 0))

    def test_lossesSettleThenRaiseLater(self) -> None:
        """
        C{MAX_PROBES} losses of one size settle the search below it: no
        probe until L{RAISE_INTERVAL} has passed, then the next size up is
        tried again, up to the configured maximum.
        """
        search = PathMTUSearch()
        for size in (1232, 1452, 1472):
            self.assertEqual(search.nextProbe(0), size)
            search.acknowledged(size)
        # Fewer losses than MAX_PROBES: the same size again.
        for _ in range(MAX_PROBES - 1):
            self.assertEqual(search.nextProbe(0), 8952)
            search.lost(8952)
        self.assertEqual(search.nextProbe(0), 8952)
        search.lost(8952)
        self.assertEqual(search.current, 1472)
        self.assertIsNone(search.nextProbe(1))
        self.assertEqual(search.doneAt, 1)
        self.assertIsNone(search.nextProbe(1 + RAISE_INTERVAL - 0.001))
        self.assertEqual(search.nextProbe(1 + RAISE_INTERVAL), 8952)
        search.acknowledged(8952)
        self.assertEqual(climb(search, 1 + RAISE_INTERVAL), [8972, 16384])
        self.assertEqual(search.current, 16384)

    def test_lossAtFirstRungStaysAtBase(self) -> None:
        """
        A path that carries nothing above 1200 keeps the connection at
        L{BASE} and ends the search.
        """
        search = PathMTUSearch()
        loseAll(search, LADDER[0])
        self.assertEqual(search.current, BASE)
        self.assertIsNone(search.nextProbe(0))

    def test_raiseRestoresLoweredMaximum(self) -> None:
        """
        A black hole lowers the maximum; the re-search after
        L{RAISE_INTERVAL} may reach the configured maximum again.
        """
        search = PathMTUSearch()
        climb(search)
        for _ in range(BLACK_HOLE_LOSSES):
            search.packetLost(16384)
        self.assertEqual(search.maximum, 8972)
        self.assertEqual(climb(search, 10), [1232, 1452, 1472, 8952, 8972])
        self.assertIsNone(search.nextProbe(10))
        self.assertIsNone(search.nextProbe(10 + RAISE_INTERVAL - 1))
        self.assertEqual(search.nextProbe(10 + RAISE_INTERVAL), 16384)
        search.acknowledged(16384)
        self.assertEqual(search.current, 16384)

    def test_tooBigAboveCurrentSettles(self) -> None:
        """
        C{EMSGSIZE} for a probe larger than the size in use settles the
        search below it at once, without waiting for losses.
        """
        search = PathMTUSearch()
        for size in (1232, 1452, 1472):
            search.nextProbe(0)
            search.acknowledged(size)
        self.assertEqual(search.nextProbe(0), 8952)
        search.tooBig(8952)
        self.assertIsNone(search.outstanding)
        self.assertEqual(search.current, 1472)
        self.assertIsNone(search.nextProbe(0))

    def test_tooBigAtCurrentRestartsBelow(self) -> None:
        """
        C{EMSGSIZE} for the size in use (a route that shrank) starts the
        search again from L{BASE}, below that size.
        """
        search = PathMTUSearch()
        climb(search)
        search.tooBig(16384)
        self.assertEqual((search.current, search.maximum), (BASE, 8972))
        self.assertEqual(climb(search), [1232, 1452, 1472, 8952, 8972])

    def test_tooBigBelowCurrentRestartsBelow(self) -> None:
        """
        C{EMSGSIZE} for a packet smaller than the size in use: the route
        carries less than that; the new search stays below it.
        """
        search = PathMTUSearch()
        climb(search)
        search.tooBig(1500)
        self.assertEqual((search.current, search.maximum), (BASE, 1472))
        self.assertEqual(climb(search), [1232, 1452, 1472])

    def test_blackHole(self) -> None:
        """
        L{BLACK_HOLE_LOSSES} packets above L{BASE} lost in a row, with no
        acknowledgement between them, drop the search to L{BASE} with the
        maximum below the size that stopped getting through.
        """
        search = PathMTUSearch()
        climb(search)
        for _ in range(BLACK_HOLE_LOSSES - 1):
            self.assertFalse(search.packetLost(16384))
        # Small packets lost say nothing about the size.
        self.assertFalse(search.packetLost(BASE))
        self.assertEqual(search.current, 16384)
        self.assertTrue(search.packetLost(16384))
        self.assertEqual((search.current, search.maximum, search.blackHoles), (BASE, 8972, 1))
        self.assertEqual(search.nextProbe(0), 1232)

    def test_noBlackHoleWhenLargeAckBetween(self) -> None:
        """
        A large packet acknowledged between the losses means the path
        carries the size: the count starts again.  A small one does not.
        """
        search = PathMTUSearch()
        climb(search)
        for _ in range(BLACK_HOLE_LOSSES - 1):
            self.assertFalse(search.packetLost(16384))
        search.packetAcknowledged(16384)
        for _ in range(BLACK_HOLE_LOSSES - 1):
            self.assertFalse(search.packetLost(16384))
        search.packetAcknowledged(BASE)
        self.assertTrue(search.packetLost(16384))

    def test_noBlackHoleAtBase(self) -> None:
        """
        Losses of a connection at L{BASE} are never a black hole.
        """
        search = PathMTUSearch()
        for _ in range(BLACK_HOLE_LOSSES * 2):
            self.assertFalse(search.packetLost(1500))
        self.assertEqual(search.blackHoles, 0)

    def test_probeDeadline(self) -> None:
        """
        A probe nobody acknowledges is lost at its deadline (a probe arms
        none of aioquic's timers); an acknowledged one clears it.
        """
        search = PathMTUSearch()
        self.assertEqual(search.nextProbe(10.0, 0.5), 1232)
        self.assertEqual(search.deadline, 10.5)
        search.expire(10.4)
        self.assertEqual((search.outstanding, search.failures), (1232, 0))
        search.expire(10.5)
        self.assertEqual((search.outstanding, search.deadline, search.failures), (None, None, 1))
        self.assertEqual(search.nextProbe(11.0, 0.5), 1232)
        search.acknowledged(1232)
        self.assertIsNone(search.deadline)
        search.expire(100.0)
        self.assertEqual((search.current, search.failures), (1232, 0))

    def test_timeoutsBlackHole(self) -> None:
        """
        L{pmtu.BLACK_HOLE_TIMEOUTS} probe timeouts in a row above L{BASE}
        are a black hole (a path that lost whole windows may never declare
        losses one by one); fewer, or any number at L{BASE}, are not.
        """
        search = PathMTUSearch()
        self.assertFalse(search.timeouts(pmtu.BLACK_HOLE_TIMEOUTS * 2))
        climb(search)
        self.assertFalse(search.timeouts(pmtu.BLACK_HOLE_TIMEOUTS - 1))
        self.assertEqual(search.current, 16384)
        self.assertTrue(search.timeouts(pmtu.BLACK_HOLE_TIMEOUTS))
        self.assertEqual((search.current, search.maximum, search.blackHoles), (BASE, 8972, 1))

    def test_lossesAboveCurrentIgnored(self) -> None:
        """
        Packets larger than the size in use (sent before a fall-back) do
        not count towards a black hole at the new size.
        """
        search = PathMTUSearch()
        for size in (1232, 1452):
            search.nextProbe(0)
            search.acknowledged(size)
        for _ in range(BLACK_HOLE_LOSSES * 2):
            self.assertFalse(search.packetLost(16384))
        self.assertEqual(search.current, 1452)

    def test_newPath(self) -> None:
        """
        A new path starts again from L{BASE}, with the configured maximum
        and nothing remembered of the old path (its losses, its ceiling).
        """
        search = PathMTUSearch()
        for size in (1232, 1452, 1472):
            search.nextProbe(0)
            search.acknowledged(size)
        loseAll(search, 8952)
        search.tooBig(1472)
        self.assertEqual(search.maximum, 1452)
        search.newPath()
        self.assertEqual((search.current, search.maximum, search.outstanding, search.doneAt), (BASE, 16384, None, None))
        self.assertEqual(climb(search), list(LADDER))

    def test_maximumOffLadderIsLastRung(self) -> None:
        """
        A maximum between two rungs is probed after the rungs below it.
        """
        search = PathMTUSearch(4000)
        self.assertEqual(climb(search), [1232, 1452, 1472, 4000])
        self.assertEqual(search.current, 4000)
        self.assertEqual(climb(PathMTUSearch(1300)), [1232, 1300])
        self.assertEqual(climb(PathMTUSearch(65527)), list(LADDER) + [65527])

    def test_maximumBaseNeverProbes(self) -> None:
        """
        A maximum of L{BASE} (or less) probes nothing.
        """
        for maximum in (BASE, 1000):
            search = PathMTUSearch(maximum)
            self.assertIsNone(search.nextProbe(0))
            self.assertIsNone(search.nextProbe(RAISE_INTERVAL * 2))
            self.assertEqual(search.current, BASE)


# --- TP's QUIC connections on the memory network ------------------------------

#: IPv4 on a 1500-byte MTU: the largest UDP payload (less 20 + 8 bytes).
IPV4_ETHERNET = 1500 - 28


class MemoryPathTests(SynchronousTestCase):
    """
    A tp/1 connection of TP's real QUIC classes moving data through an
    echoing stream, on a memory network whose path may lose, refuse or stop
    carrying large datagrams.
    """

    def setUp(self) -> None:
        self.world = QuicWorld(self.mktemp())
        self.network = self.world.network
        #: (source, destination, size) of every datagram sent.
        self.sent: list[tuple[Address, Address, int]] = []
        self.network.watch = lambda source, destination, data: self.sent.append((source, destination, len(data)))

    def start(self, **listen: Any) -> tuple[quic.ClientSession, quic.ServerSession]:
        """
        TP's listener (its streams echo) and a client whose handshake
        completed: (client, server's session).
        """
        self.listener = self.world.listen(factory=RecordingFactory(echo=True), **listen)
        session = self.world.connected()
        [server] = set(self.listener.sessions.values())
        return session, server

    def transfer(self, session: quic.ClientSession, size: int = 1024 * 1024, midway: Callable[[], None] | None = None, timeout: float = 120) -> None:
        """
        Send C{size} random bytes through an echoing stream and check, by
        SHA-256, that they arrive at the server and come back intact; call
        C{midway} once a third has come back.
        """
        payload = os.urandom(size)
        client = Recorder()
        stream = session.openStream(client)
        stream.write(payload)
        stream.loseWriteConnection()
        if midway is not None:
            self.network.run(until=lambda: sum(map(len, client.received)) > size // 3, timeout=timeout)
            midway()
        self.network.run(until=lambda: client.lost, timeout=timeout)
        client.lostReason.trap(ConnectionDone)  # type: ignore[union-attr]
        [server] = [p for p in self.world.factory.built if p.transport is not None and p.transport.streamId == stream.streamId]  # type: ignore[attr-defined]
        self.assertEqual(sha256(server.data), sha256(payload))
        self.assertEqual(sha256(client.data), sha256(payload))

    def sizes(self, source: Address | None = None, destination: Address | None = None) -> list[int]:
        """
        The sizes of the datagrams sent from C{source} and/or to
        C{destination}.
        """
        return [n for s, d, n in self.sent if (source is None or s == source) and (destination is None or d == destination)]

    def dropAbove(self, size: int, source: Address | None = None) -> None:
        """
        From now on the path silently loses datagrams above C{size} bytes
        (only those from C{source}, if given).
        """

        def carries(s: Address, d: Address, data: bytes) -> bool:
            return len(data) <= size or (source is not None and s != source)

        self.network.filter = carries

    def test_reachesMaximum(self) -> None:
        """
        On a path that carries everything, both ends of a tp/1 connection
        reach 16384-byte datagrams, and send data in them.
        """
        session, server = self.start()
        self.transfer(session)
        self.assertEqual((session.conn._max_datagram_size, server.conn._max_datagram_size), (16384, 16384))
        self.assertEqual(self.network.lost, 0)
        self.assertEqual(max(self.sizes(source=SERVER)), 16384)
        self.assertEqual(max(self.sizes(destination=SERVER)), 16384)
        # Data, not just the probes, went out at that size.
        self.assertGreater(self.sizes(source=SERVER).count(16384), 10)
        self.assertGreater(self.sizes(destination=SERVER).count(16384), 10)

    def test_blackHoleAbove1472(self) -> None:
        """
        A path that silently loses datagrams above 1472 bytes (IPv4 on
        Ethernet): both ends settle at 1472 and the data arrives intact.
        """
        self.dropAbove(IPV4_ETHERNET)
        session, server = self.start()
        self.transfer(session)
        self.assertEqual((session.conn._max_datagram_size, server.conn._max_datagram_size), (1472, 1472))
        self.assertGreater(self.sizes(source=SERVER).count(1472), 10)

    def test_blackHoleAbove1472SearchEnds(self) -> None:
        """
        On that path each end loses L{MAX_PROBES} probes of the first size
        too large, and then the search is over: no more probes until
        L{RAISE_INTERVAL}.
        """
        self.dropAbove(IPV4_ETHERNET)
        session, server = self.start()
        self.transfer(session)
        for conn in (session.conn, server.conn):
            search = conn.tpPmtu
            assert search is not None
            self.assertIsNone(search.outstanding)
            self.assertIsNotNone(search.doneAt)
        self.assertEqual(self.network.lost, 2 * MAX_PROBES)

    def test_emsgsizeAbove1472(self) -> None:
        """
        Ports whose route refuses datagrams above 1472 bytes (C{EMSGSIZE},
        as the kernel does with "don't fragment"): both ends settle at 1472,
        the data arrives intact, and no probe is lost on the path (the
        kernel refused them before they left).
        """
        self.network.routeMTU = IPV4_ETHERNET
        session, server = self.start()
        self.transfer(session)
        self.assertEqual((session.conn._max_datagram_size, server.conn._max_datagram_size), (1472, 1472))
        self.assertEqual(self.network.lost, 0)
        self.assertEqual(max(size for _, _, size in self.sent), 1472)
        self.assertGreater(self.network.refused, 0)

    def test_emsgsizeSettlesAtOnce(self) -> None:
        """
        With C{EMSGSIZE}, one refused probe per end settles the search:
        two refusals in all, and the searches are over.
        """
        self.network.routeMTU = IPV4_ETHERNET
        session, server = self.start()
        self.transfer(session)
        for conn in (session.conn, server.conn):
            self.assertIsNotNone(conn.tpPmtu.doneAt)  # type: ignore[union-attr]
        self.assertEqual(self.network.refused, 2)

    def test_pathShrinksMidTransfer(self) -> None:
        """
        A path that stops carrying large datagrams in the middle of a
        transfer (the search had reached 16384): each end detects the black
        hole, falls back, and the transfer completes intact.
        """
        session, server = self.start()
        self.network.run(until=lambda: session.conn._max_datagram_size == server.conn._max_datagram_size == 16384)

        def shrink() -> None:
            self.assertEqual((session.conn._max_datagram_size, server.conn._max_datagram_size), (16384, 16384))
            self.dropAbove(IPV4_ETHERNET)

        self.transfer(session, 2 * 1024 * 1024, midway=shrink)
        ends = (session.conn, server.conn)
        self.assertEqual([(conn.tpPmtu.blackHoles, conn._max_datagram_size) for conn in ends], [(1, 1472), (1, 1472)])  # type: ignore[union-attr]

    def test_migrationRestartsSearch(self) -> None:
        """
        The client moves to a new port: the server's search starts again at
        1200 for the new path, sends nothing larger there until the path is
        validated, then climbs again on it.
        """
        session, server = self.start()
        self.transfer(session)
        self.assertEqual(server.conn._max_datagram_size, 16384)
        beforeValidation: list[int] = []
        watch = self.network.watch

        def watchNewPath(source: Address, destination: Address, data: bytes) -> None:
            watch(source, destination, data)  # type: ignore[misc]
            if source == SERVER and destination != oldAddress:
                [path] = [p for p in server.conn._network_paths if p.addr == destination]
                if not path.is_validated:
                    beforeValidation.append(len(data))

        oldAddress = session.socket.transport.getHost()  # type: ignore[union-attr]
        oldAddress = (oldAddress.host, oldAddress.port)
        self.network.watch = watchNewPath
        session.rebind()
        # The client's own search starts again on its new socket.
        self.assertEqual(session.conn._max_datagram_size, BASE)
        newAddress = session.socket.transport.getHost()  # type: ignore[union-attr]
        self.transfer(session)
        fromNew = self.sizes(source=(newAddress.host, newAddress.port), destination=SERVER)
        # Nothing at the old path's 16384: data at 1200, and the search's
        # first probe.
        self.assertLessEqual(fromNew[0], LADDER[0])
        self.assertEqual(server.peer, (newAddress.host, newAddress.port))
        self.assertTrue(beforeValidation)
        self.assertLessEqual(max(beforeValidation), BASE, beforeValidation)
        # The search goes on after the transfer (in memory a whole transfer
        # fits in the congestion window, sent before the first ACK).
        self.network.run(until=lambda: server.conn._max_datagram_size == 16384)
        toNew = self.sizes(source=SERVER, destination=(newAddress.host, newAddress.port))
        self.assertLessEqual(toNew[0], BASE)
        self.assertIn(16384, toNew)

    def test_noProbeAfterClose(self) -> None:
        """
        A connection that closes while its search could probe sends its
        CONNECTION_CLOSE and no probe after it, and its closing period stays
        three probe timeouts (a probe used to re-arm it to the idle timeout).
        """
        self.network.filter = lambda source, destination, data: len(data) <= IPV4_ETHERNET
        session, server = self.start()
        conn = server.conn
        self.network.run(until=lambda: conn._max_datagram_size == IPV4_ETHERNET and conn.tpPmtu.doneAt is not None)
        # Ten minutes on: the search may try again at the next send.
        conn.tpPmtu.doneAt -= RAISE_INTERVAL
        conn._ack_eliciting_sent_since_receipt = False
        now = self.world.reactor.seconds()
        before = len(self.sent)
        server.close(0, "policy reload")
        fromServer = [n for s, d, n in self.sent[before:] if s == SERVER]
        self.assertEqual(len(fromServer), 1, fromServer)
        self.assertLess(fromServer[0], BASE)
        self.assertLessEqual(conn._close_at - now, 3 * conn._loss.get_probe_timeout() + 0.001)

    def test_idleProbeNoTimeout(self) -> None:
        """
        A probe on an idle connection (the re-search ten minutes on) arms
        no probe timeout: it is acknowledged and raises the size at its
        first try (it used to be declared lost at once, the timeout timed
        from an older packet).
        """
        self.network.filter = lambda source, destination, data: len(data) <= IPV4_ETHERNET
        session, server = self.start()
        conn = server.conn
        self.network.run(until=lambda: conn.tpPmtu.doneAt is not None and session.conn.tpPmtu.doneAt is not None)
        self.network.run(timeout=20)  # quiet for a while
        conn.tpPmtu.doneAt -= RAISE_INTERVAL
        self.network.filter = None  # the path grew
        timeouts: list[float] = []
        fired = conn._loss.on_loss_detection_timeout

        def counting(*args: Any, **kwargs: Any) -> Any:
            timeouts.append(self.world.reactor.seconds())
            return fired(*args, **kwargs)

        conn._loss.on_loss_detection_timeout = counting  # type: ignore[method-assign]
        server.transmit()
        self.network.run(until=lambda: conn.tpPmtu.outstanding is None, timeout=30)
        self.assertGreaterEqual(conn._max_datagram_size, 8952)
        self.assertEqual((timeouts, conn.tpPmtu.failures), ([], 0))

    def test_listenerMaximumBase(self) -> None:
        """
        A listener whose maximum is 1200 (C{server.quic_max_datagram_size =
        1200}) never probes nor sends a datagram above 1200; the client's
        own direction still climbs.
        """
        session, server = self.start()
        self.listener.maxDatagramSize = BASE
        # A second connection, made after the change.
        session = self.world.connected()
        [server] = [s for s in set(self.listener.sessions.values()) if s is not server]
        self.transfer(session)
        self.assertIsNone(server.conn.tpPmtu)
        self.assertLessEqual(max(n for s, d, n in self.sent if s == SERVER and d == server.peer), BASE)
        self.assertEqual(session.conn._max_datagram_size, 16384)

    def test_probesOutsideCongestionControl(self) -> None:
        """
        A lost probe is no congestion event: the congestion window is not
        reduced.  A lost data packet is one (so the check can fail).
        """
        # The client's probes are lost; nothing else is.
        self.network.filter = lambda s, d, data: len(data) <= BASE or d != SERVER
        session, server = self.start()
        search = session.conn.tpPmtu
        assert search is not None
        cc = session.conn._loss
        before = cc.congestion_window
        client = Recorder()
        stream = session.openStream(client)
        # Packets sent after the probe and acknowledged declare it lost
        # (not a timeout, which is no congestion event either way).
        for i in range(5):
            stream.write(b"x")
            self.network.run(until=lambda: len(client.data) > i)
        self.network.run(until=lambda: search.failures)
        self.assertEqual(search.failures, 1)
        self.assertEqual(search.current, BASE)
        self.assertIsNone(cc._cc.ssthresh)
        self.assertGreaterEqual(cc.congestion_window, before)
        # Now a data packet of the client's is lost.
        before = cc.congestion_window
        lostOne: list[int] = []

        def loseOneData(s: Address, d: Address, data: bytes) -> bool:
            if d == SERVER and len(data) > 1000 and not lostOne and len(data) <= BASE:
                lostOne.append(len(data))
                return False
            return len(data) <= BASE or d != SERVER

        self.network.filter = loseOneData
        stream.write(os.urandom(20 * 1024))
        self.network.run(until=lambda: lostOne and cc._cc.ssthresh is not None)
        self.assertLess(cc.congestion_window, before)

    def test_anonymousH3StaysAtBase(self) -> None:
        """
        An anonymous h3 connection (TP's HTTP/3 answer) searches nothing:
        neither end sends a datagram above 1200.
        """
        from tpproxy.test.test_h3 import PAGE, connectH3

        self.listener = self.world.listen(h3=PAGE)
        config = self.world.clientConfiguration(None)
        config.alpn_protocols = ["h3"]
        browser = connectH3(self.world.reactor, SERVER, config)
        self.network.run(until=lambda: browser.ready.called)
        responses = [browser.request(b"/") for _ in range(20)]
        self.network.run(until=lambda: all(d.called for d in responses))
        self.network.run(timeout=5)
        [server] = set(self.listener.sessions.values())
        self.assertEqual(server.conn.tls.alpn_negotiated, "h3")
        self.assertIsNone(server.conn.tpPmtu)
        self.assertIsNone(browser.conn.tpPmtu)
        self.assertGreater(sum(self.sizes(source=SERVER)), 20 * len(PAGE.body))
        self.assertLessEqual(max(n for _, _, n in self.sent), BASE)

    def test_oneWayBlackHoleDoesNotStall(self) -> None:
        """
        A client that drops every datagram above 1200 bytes it receives
        (acknowledges no large probe) keeps the server at 1200 towards it,
        without stalling the other direction: the client reaches 16384
        towards the server, and data goes both ways intact.
        """
        self.dropAbove(BASE, source=SERVER)
        session, server = self.start()
        self.transfer(session)
        self.assertEqual(server.conn._max_datagram_size, BASE)
        self.assertEqual(session.conn._max_datagram_size, 16384)
        self.assertGreater(self.sizes(destination=SERVER).count(16384), 10)
        self.assertEqual(server.conn.tpPmtu.blackHoles, 0)  # type: ignore[union-attr]


# --- real sockets ---------------------------------------------------------------


class LoopbackTests(TestCase):
    """
    TP's listener and client on real UDP sockets of 127.0.0.1 (an MTU of
    65536): the sockets send ("don't fragment") and read datagrams of the
    size the search reaches.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_transferAtMaximum(self) -> Any:
        """
        After a 1 MiB echo, both ends send 16384-byte datagrams, and
        datagrams larger than Twisted's default read size (8192) really
        arrived whole, both ways.
        """
        pki = TestPKI.create(self.mktemp())
        pki.client("alice")
        d = pki.directory
        factory = RecordingFactory(echo=True)
        listener = quic.QuicListener(
            reactor,  # type: ignore[arg-type]
            quic.serverConfiguration(loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key"))),
            quic.ClientVerifier([pki.ca.cert], ClientCertChecker(), reactor),  # type: ignore[arg-type]
            factory,
        )
        received: list[int] = []
        serve = listener.datagramReceived

        def recording(data: bytes, addr: Any, *a: Any, **kw: Any) -> None:
            received.append(len(data))
            serve(data, addr, *a, **kw)

        listener.datagramReceived = recording  # type: ignore[method-assign]
        # As tpproxy.service listens.
        port = reactor.listenUDP(0, listener, interface="127.0.0.1", maxPacketSize=quic.RECEIVE_SIZE)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        configuration = quic.clientConfiguration("localhost", [pki.ca.cert], loadCertificates(str(d / "alice.pem")), loadKey(str(d / "alice.key")))
        session = quic.connectQuic(reactor, ("127.0.0.1", port.getHost().port), configuration)  # type: ignore[arg-type]

        closeAtEnd(self, session)
        back: list[int] = []
        toClient = session.datagramReceived

        def clientRecording(data: bytes, addr: Any) -> None:
            back.append(len(data))
            toClient(data, addr)

        session.datagramReceived = clientRecording  # type: ignore[method-assign]
        yield session.ready
        payload = os.urandom(1024 * 1024)
        client = Recorder()
        stream = session.openStream(client)
        stream.write(payload)
        stream.loseWriteConnection()
        [server] = set(listener.sessions.values())
        yield waitUntil(lambda: client.lost and session.conn._max_datagram_size == server.conn._max_datagram_size == 16384, "the echo, at 16384 both ways")
        self.assertEqual(sha256(client.data), sha256(payload))
        self.assertEqual(sha256(factory.built[0].data), sha256(payload))
        self.assertEqual((max(received), max(back)), (16384, 16384))
        self.assertGreater(len([n for n in received if n > 8192]), 10)
        self.assertGreater(len([n for n in back if n > 8192]), 10)


class WebTransportTests(WebTransportTestCase):
    """
    A browser's WebTransport session (ALPN h3, no client certificate) on
    real sockets: TP searches nothing on it.
    """

    @defer.inlineCallbacks
    def test_staysAtBase(self) -> Any:
        """
        256 KiB each way through a WebTransport tunnel: TP sends no
        datagram above 1200 bytes on that connection.
        """
        sizes: list[int] = []
        sendOut, sendBatch = self.listener.sendOut, self.listener.sendBatch

        def recordOne(data: bytes, addr: Any) -> None:
            sizes.append(len(data))
            sendOut(data, addr)

        def recordBatch(datagrams: list[tuple[bytes, Any]]) -> int | None:
            sizes.extend(len(data) for data, _ in datagrams)
            return sendBatch(datagrams)

        # What the listener sends, one datagram or a batch at a time (the
        # sessions made from now on take these).
        self.listener.sendOut = recordOne  # type: ignore[method-assign]
        self.listener.sendBatch = recordBatch  # type: ignore[method-assign]
        client, sessionId = yield self.session()
        payload = os.urandom(256 * 1024)
        streamId = client.stream(sessionId, ClientHello.connect("127.0.0.1", self.echoPort).toFrame())
        hello, _ = yield self.hello(client, streamId)
        self.assertTrue(hello.ok, hello)
        client.send(streamId, payload, end=True)
        yield until(lambda: streamId in client.wtEnded or streamId in client.resets, what="the echo")
        self.assertEqual(sha256(client.serverHello(streamId)[1]), sha256(payload))
        [server] = set(self.listener.sessions.values())
        self.assertIsNone(server.conn.tpPmtu)
        self.assertGreater(sum(sizes), len(payload))
        self.assertLessEqual(max(sizes), BASE)


#: Linux's IP_PMTUDISC_PROBE (and IPV6_PMTUDISC_PROBE).
PROBE = 3


class SocketTests(TestCase):
    """
    TP's QUIC sockets, real ones: "don't fragment", and a datagram the
    kernel refuses as too big is reported, not raised.
    """

    timeout = 30

    def port(self, protocol: Any, interface: str = "127.0.0.1") -> Any:
        port = reactor.listenUDP(0, protocol, interface=interface, maxPacketSize=quic.RECEIVE_SIZE)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return port

    def test_dontFragment(self) -> None:
        """
        The listener's and the client's sockets (IPv4 and IPv6) set DF: a
        datagram larger than the interface's MTU fails instead of going out
        in IP fragments, and a path MTU learnt from ICMP is ignored (Linux's
        IP_MTU_DISCOVER = IP_PMTUDISC_PROBE; L{SpoofedICMPTests}).
        """
        import socket

        pki = TestPKI.create(self.mktemp())
        d = pki.directory
        listener = quic.QuicListener(
            reactor,  # type: ignore[arg-type]
            quic.serverConfiguration(loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key"))),
            quic.ClientVerifier([pki.ca.cert], ClientCertChecker(), reactor),  # type: ignore[arg-type]
            RecordingFactory(),
        )
        port = self.port(listener)
        self.assertEqual(port.getHandle().getsockopt(socket.IPPROTO_IP, 10), PROBE)
        client = quic.ClientSocket(reactor, None, "ipv4", ("127.0.0.1", port.getHost().port))  # type: ignore[arg-type]
        self.addCleanup(client.stop)
        self.assertEqual(client.transport.getHandle().getsockopt(socket.IPPROTO_IP, 10), PROBE)  # type: ignore[union-attr]
        try:
            six = quic.ClientSocket(reactor, None, "ipv6", ("::1", port.getHost().port))  # type: ignore[arg-type]
        except Exception as e:  # no IPv6 on this machine
            if os.environ.get("CI") == "true":
                raise
            raise SkipTest(f"no IPv6: {e}")
        self.addCleanup(six.stop)
        self.assertEqual(six.transport.getHandle().getsockopt(socket.IPPROTO_IPV6, 23), PROBE)  # type: ignore[union-attr]

    def test_tooBigReported(self) -> None:
        """
        L{quic.DatagramSender} sends the datagrams it can and reports the
        size of one the kernel refuses (C{EMSGSIZE}, here: larger than
        any UDP datagram), on a connected and an unconnected socket.
        """
        from twisted.internet.protocol import DatagramProtocol

        got: list[bytes] = []
        done: defer.Deferred[None] = defer.Deferred()

        class Receiver(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                got.append(data)
                if len(got) == 4:
                    done.callback(None)

        target = self.port(Receiver()).getHost()
        sender = self.port(DatagramProtocol())
        unconnected = quic.DatagramSender(sender)
        to = ("127.0.0.1", target.port)
        self.assertEqual(unconnected.send([(b"a" * 100, to), (b"b" * 70000, to), (b"c" * 9000, to)]), 70000)
        other = self.port(DatagramProtocol())
        other.connect("127.0.0.1", target.port)
        connected = quic.DatagramSender(other, connected=True)
        self.assertEqual(connected.send([(b"d" * 70000, None), (b"e" * 16384, None)]), 70000)
        self.assertIsNone(connected.send([(b"f", None)]))

        def check(_: None) -> None:
            self.assertEqual(sorted(len(d) for d in got), [1, 100, 9000, 16384])

        return done.addCallback(check)


#: Run in a network namespace (SpoofedICMPTests): a UDP socket set up as
#: TP's QUIC sockets are, or with IP_PMTUDISC_DO (the control), sends 1200
#: and 1472 bytes to the peer before and after a line on stdin (the test
#: sends a forged ICMP meanwhile); prints what each send gave.
ICMP_CHILD = """
import errno, socket, sys
sys.path.insert(0, sys.argv[3])
from tpproxy.transports.quic import _bigBuffers
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 4433))
if sys.argv[2] == "tp":
    class Port:
        def getHandle(self):
            return s
    _bigBuffers(Port())
else:
    s.setsockopt(socket.IPPROTO_IP, 10, 2)
def send(n):
    try:
        s.sendto(b"x" * n, (sys.argv[4], 5000))
        return "sent"
    except OSError as e:
        return errno.errorcode[e.errno]
print("before", send(1200), send(1472), flush=True)
sys.stdin.readline()
print("after", send(1200), send(1472), flush=True)
"""


def forgedFragmentationNeeded(source: str, destination: str, mtu: int) -> bytes:
    """
    An ICMP "fragmentation needed" (type 3, code 4) with a next-hop MTU
    of C{mtu}, quoting a UDP datagram from C{source}:4433 to
    C{destination}: what an attacker anywhere can send to C{source}.
    """
    import socket
    import struct

    def checksum(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        total = (total >> 16) + (total & 0xFFFF)
        total += total >> 16
        return ~total & 0xFFFF

    inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1228, 0, 0x4000, 64, 17, 0, socket.inet_aton(source), socket.inet_aton(destination))
    inner += struct.pack("!HHHH", 4433, 31337, 1208, 0)
    icmp = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + inner
    return icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]


class SpoofedICMPTests(TestCase):
    """
    An attacker who knows a client's address forges an ICMP "fragmentation
    needed" with a tiny MTU to TP.  With Linux's IP_PMTUDISC_DO the kernel
    would believe it for 10 minutes and refuse every datagram to that
    address, 1200 bytes included (the control shows it); TP's sockets
    ignore it (root: two network namespaces).
    """

    timeout = 60

    def test_forgedICMPIgnored(self) -> Any:
        import subprocess
        import sys
        from pathlib import Path

        from tpproxy.test.netns import Namespaces

        net = Namespaces(self)
        net.add("t")
        net.add("e")
        # Short names: veth names (prefix + both names) must fit in 15 bytes.
        net.link("t", ["10.98.0.1/24"], "e", ["10.98.0.2/24"])
        script = Path(self.mktemp())
        script.write_text(ICMP_CHILD)
        repo = str(Path(__file__).resolve().parents[2])
        results = {}
        for mode in ("do", "tp"):
            net.sh(net.ip, "-n", net.ns("t"), "route", "flush", "cache")
            child = subprocess.Popen(
                net.exec("t") + [sys.executable, str(script), "10.98.0.1", mode, repo, "10.98.0.2"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            before = child.stdout.readline().split()  # type: ignore[union-attr]
            forged = forgedFragmentationNeeded("10.98.0.1", "10.98.0.2", 552)
            sender = (
                "import socket, sys; r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); "
                f"r.sendto(bytes.fromhex('{forged.hex()}'), ('10.98.0.1', 0))"
            )
            net.sh(*net.exec("e"), sys.executable, "-c", sender)
            out, _ = child.communicate("go\n", timeout=30)
            results[mode] = (before, out.split())
        # The control: the forged ICMP works against IP_PMTUDISC_DO.
        self.assertEqual(results["do"][0], ["before", "sent", "sent"])
        self.assertEqual(results["do"][1], ["after", "EMSGSIZE", "EMSGSIZE"])
        # TP's sockets go on sending.
        self.assertEqual(results["tp"], (["before", "sent", "sent"], ["after", "sent", "sent"]))
