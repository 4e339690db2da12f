"""
Unauthenticated TCP floods (issue 10, section 4): connections still in
their TLS handshake are capped over all and per source prefix at accept,
their places come back exactly once, listeners get a real backlog, and the
open-files limit is raised at start.
"""

from __future__ import annotations

import os
import resource
import socket
import ssl as stdlib_ssl
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy.limits import HalfOpenCounter, HalfOpenGate, raiseFileLimit
from tpproxy.service import makeService, withBacklog
from tpproxy.test.support import deferLater, freePort
from tpproxy.testing import TestPKI


class Built(protocol.Protocol):
    lost = 0

    def connectionLost(self, reason: Any) -> None:
        self.lost += 1


class GateTests(SynchronousTestCase):
    def gate(self, total: int = 10, perSource: int = 2) -> HalfOpenGate:
        return HalfOpenGate(protocol.Factory.forProtocol(Built), HalfOpenCounter(total, perSource), task.Clock(), Logger())

    def test_perSourceAndTotal(self) -> None:
        """
        The gate builds no protocol for a prefix at its cap, or when the
        total is reached, and counts what it turned away.
        """
        gate = self.gate(total=3, perSource=2)
        built = [gate.buildProtocol(IPv4Address("TCP", "192.0.2.1", p)) for p in (1, 2, 3)]
        self.assertIsNotNone(built[0])
        self.assertIsNotNone(built[1])
        self.assertIsNone(built[2])
        self.assertIsNotNone(gate.buildProtocol(IPv4Address("TCP", "192.0.2.2", 1)))
        self.assertIsNone(gate.buildProtocol(IPv4Address("TCP", "192.0.2.3", 1)))
        self.assertEqual((gate.counter.count, gate.refused), (3, 2))

    def test_releasedOnceOnEveryPath(self) -> None:
        """
        A place comes back when the connection ends, or earlier when the
        handshake completes, and never twice.
        """
        gate = self.gate()
        a = gate.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
        b = gate.buildProtocol(IPv4Address("TCP", "192.0.2.1", 2))
        self.assertEqual(gate.counter.count, 2)
        a.connectionLost(Failure(Exception("gone")))
        self.assertEqual((gate.counter.count, a.lost), (1, 1))
        b.tpHalfOpen.release()  # the handshake completed
        self.assertEqual(gate.counter.count, 0)
        b.connectionLost(Failure(Exception("gone")))
        b.tpHalfOpen.release()
        self.assertEqual((gate.counter.count, b.lost), (0, 1))

    def test_heldUnreadThenClosed(self) -> None:
        """
        Over a cap, while fewer than C{maxHeld} are held, a connection is
        held: not read, no protocol of TP's, closed at C{holdFor}.  Past
        C{maxHeld} the next is closed at accept.  (The hold is spread over
        up to half as long again, so that a flood is not let go at once.)
        """
        from twisted.internet.testing import StringTransport

        from tpproxy.limits import Held

        clock = task.Clock()
        gate = HalfOpenGate(protocol.Factory.forProtocol(Built), HalfOpenCounter(1, 1), clock, Logger(), holdFor=5, maxHeld=1)
        self.assertIsInstance(gate.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)), Built)
        held = gate.buildProtocol(IPv4Address("TCP", "192.0.2.1", 2))
        self.assertIsInstance(held, Held)
        transport = StringTransport()
        held.makeConnection(transport)
        self.assertEqual(transport.producerState, "paused")
        self.assertIsNone(gate.buildProtocol(IPv4Address("TCP", "192.0.2.1", 3)))
        self.assertEqual((gate.held, gate.refused), (1, 2))
        clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(2.6)  # held 5 s, spread by up to half as long again
        self.assertTrue(transport.disconnecting)
        held.connectionLost(Failure(Exception("aborted")))
        self.assertEqual((gate.held, clock.getDelayedCalls()), (0, []))
        self.assertEqual(gate.counter.count, 1)

    def test_noProtocolNoPlace(self) -> None:
        """
        If the wrapped factory builds nothing, no place is kept.
        """
        gate = HalfOpenGate(protocol.Factory(), HalfOpenCounter(1, 1), task.Clock(), Logger())
        gate.wrappedFactory.buildProtocol = lambda addr: None  # type: ignore[method-assign]
        self.assertIsNone(gate.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)))
        self.assertEqual(gate.counter.count, 0)


class BacklogTests(SynchronousTestCase):
    def test_withBacklog(self) -> None:
        """
        Plain tcp/tcp6 descriptions get C{backlog=}; one that sets it, and
        other kinds of endpoint, are left alone.
        """
        self.assertEqual(withBacklog("tcp:443", 1024), "tcp:443:backlog=1024")
        self.assertEqual(withBacklog("tcp6:443:interface=\\:\\:1", 7), "tcp6:443:interface=\\:\\:1:backlog=7")
        self.assertEqual(withBacklog("tcp:443:backlog=5", 1024), "tcp:443:backlog=5")
        self.assertEqual(withBacklog("unix:/run/tp.sock", 1024), "unix:/run/tp.sock")


class FileLimitTests(SynchronousTestCase):
    def test_raisedToHard(self) -> None:
        """
        A soft limit below the hard one is raised to it, and the numbers
        are returned for the log.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        low = min(soft, 512)
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        before, after, reportedHard = raiseFileLimit()
        self.assertEqual((before, reportedHard), (low, hard))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], after)
        if hard != resource.RLIM_INFINITY:
            self.assertEqual(after, hard)


class ListenerTests(TestCase):
    """
    A real TP from makeService with C{handshakes_per_source = 3}.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        self.port = freePort()
        config = self.pki.serverConfig(
            listen=f"tcp:{self.port}:interface=127.0.0.1", quic=False, limits={"handshakes_per_source": 3, "backlog": 77}, handshake_timeout=2
        )
        self.service = makeService(config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        tls = self.service.getServiceNamed(f"tls:tcp:{self.port}:interface=127.0.0.1")
        self.gate = tls.factory
        # A TCP endpoint listens at once; its port is the Deferred's result
        # (left there: the service stops the port through it).
        self.listening = tls._waitingForPort.result
        yield None

    def silent(self, source: str) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), source_address=(source, 0))
        self.addCleanup(s.close)
        return s

    def handshake(self, source: str) -> Any:
        """
        A real TLS 1.3 handshake with alice's certificate, from C{source}:
        fires with the negotiated protocol version.
        """

        def run() -> str:
            ctx = stdlib_ssl.create_default_context(cafile=self.pki.caPath)
            ctx.load_cert_chain(str(self.pki.directory / "alice.pem"), str(self.pki.directory / "alice.key"))
            ctx.set_alpn_protocols(["tp/1"])
            with socket.create_connection(("127.0.0.1", self.port), source_address=(source, 0), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    return str(tls.version())

        return deferToThread(run)

    @defer.inlineCallbacks
    def waitForCount(self, count: int) -> Any:
        for _ in range(200):
            if self.gate.counter.count == count:
                return
            yield deferLater(0.02)
        self.fail(f"{self.gate.counter.count} half-open, expected {count}")

    @defer.inlineCallbacks
    def test_perSourceCap(self) -> Any:
        """
        Three silent connections from 127.0.0.2 fill its places; a fourth
        gets no TLS (held unread until the handshake timeout), while a
        client from 127.0.0.1 completes its handshake.  When the silent
        ones go, 127.0.0.2 is served again.
        """
        held = [self.silent("127.0.0.2") for _ in range(3)]
        yield self.waitForCount(3)
        fourth = self.silent("127.0.0.2")
        version = yield self.handshake("127.0.0.1")
        self.assertEqual(version, "TLSv1.3")
        self.assertEqual((self.gate.refused, self.gate.held), (1, 1))
        # Held unread, with no TLS: a ClientHello gets no answer, and the
        # connection ends at the handshake timeout (2 s here).
        fourth.sendall(bytes.fromhex("160301") + b"\x00\x05hello")
        fourth.settimeout(20)

        def ended() -> bytes:
            try:
                return fourth.recv(10)
            except ConnectionResetError:
                return b""  # aborted with our unread bytes: a reset

        data = yield deferToThread(ended)
        self.assertEqual(data, b"")
        for _ in range(100):
            if self.gate.held == 0:
                break
            yield deferLater(0.02)
        self.assertEqual(self.gate.held, 0)
        for s in held:
            s.close()
        yield self.waitForCount(0)
        version = yield self.handshake("127.0.0.2")
        self.assertEqual(version, "TLSv1.3")

    @defer.inlineCallbacks
    def test_handshakeReleasesPlace(self) -> Any:
        """
        A connection whose handshake completed holds no place, though it
        stays open.
        """

        def run() -> int:
            ctx = stdlib_ssl.create_default_context(cafile=self.pki.caPath)
            ctx.load_cert_chain(str(self.pki.directory / "alice.pem"), str(self.pki.directory / "alice.key"))
            ctx.set_alpn_protocols(["tp/1"])
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
            self.addCleanup(tls.close)
            # TLS 1.3: the server has our certificate once it answers.
            tls.sendall(b"\x00\x00\x00\x02{}")
            tls.recv(100)
            return 0

        yield deferToThread(run)
        yield self.waitForCount(0)

    def test_backlog(self) -> None:
        """
        The configured backlog reaches the listening port.
        """
        self.assertEqual(self.listening.backlog, 77)


class DescriptorExhaustionTests(TestCase):
    """
    A real C{twist tp} whose hard open-files limit is 64 (so it cannot
    raise it): connections past the limit are refused cleanly (Twisted's
    reserve descriptor: accept, close), TP does not spin, and it serves
    again once descriptors come back.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_refusedCleanly(self) -> Any:
        import shutil

        from tpproxy.test.support import Background, twistCommand, waitForPort

        prlimit = shutil.which("prlimit")
        if prlimit is None:
            self.fail("prlimit (util-linux) is needed")
        pki = TestPKI.create(self.mktemp())
        pki.client("alice")
        port = freePort()
        path = pki.directory / "server.toml"
        path.write_text(
            f'[server]\nlisten = "tcp:{port}:interface=127.0.0.1"\nquic = false\n'
            'certificate = "server.pem"\nkey = "server.key"\nclient_ca = "ca.pem"\nhandshake_timeout = 60\n'
        )
        server = Background(self, [prlimit, "--nofile=64:64", "--"] + twistCommand() + ["tp", "--config", str(path)])
        yield waitForPort(port)
        held = []
        for _ in range(80):
            s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
            self.addCleanup(s.close)
            held.append(s)

        def closedAtOnce(s: socket.socket) -> bool:
            s.settimeout(5)
            try:
                return s.recv(10) == b""
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False

        # The last ones found no descriptor: TP accepted and closed them.
        last = yield deferToThread(closedAtOnce, held[-1])
        self.assertTrue(last)
        # TP is not spinning on the listening socket meanwhile.
        pid = server.transport.pid

        def cpu() -> float:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = cpu()
        yield deferLater(2.0)
        self.assertLess(cpu() - before, 1.0)
        for s in held:
            s.close()
        # Descriptors are back: a real client is served.

        def handshake() -> str:
            ctx = stdlib_ssl.create_default_context(cafile=pki.caPath)
            ctx.load_cert_chain(str(pki.directory / "alice.pem"), str(pki.directory / "alice.key"))
            ctx.set_alpn_protocols(["tp/1"])
            for _ in range(50):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                            return str(tls.version())
                except (OSError, stdlib_ssl.SSLError):
                    import time

                    time.sleep(0.1)
            return "never"

        version = yield deferToThread(handshake)
        self.assertEqual(version, "TLSv1.3")
