"""
The direct QUIC connection of a P2P session (issue 16, tpproxy.p2p.direct):
two aioquic engines pumped in memory, each side pinned to the certificate TP
vouched for.  The attacks of the issue: a peer certificate TP did not vouch
for (another identity of the same CA), a vouched certificate replayed in
another session, an exposer that is not the one introduced, and a second
connection for one session.
"""

from __future__ import annotations

from typing import Any

from aioquic.quic import events
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.p2p.direct import P2P_ALPN, Introduction, dialerConnection, exposerConnection, newSessionId, serverRefusal
from tpproxy.pki import loadCertificates, loadKey
from tpproxy.testing import TestPKI
from tpproxy.transports.quic import ClientVerifier
from tpproxy.verify import ClientCertChecker

DIALER = ("10.1.0.2", 40000)
EXPOSER = ("10.2.0.2", 50000)


class Pair:
    """
    A dialer and an exposer connection, and the datagrams between them.
    """

    def __init__(self, case: P2PDirectTests, dialer: str, exposer: str, dialerIntro: Introduction, exposerIntro: Introduction) -> None:
        self.case = case
        self.clock = case.clock
        self.dialerIntro, self.exposerIntro = dialerIntro, exposerIntro
        self.dialer = dialerConnection(*case.identity(dialer))
        self.dialer.connect(EXPOSER, now=self.clock.seconds())
        self.exposerName = exposer
        self.exposer: Any = None
        self.events: dict[str, list[Any]] = {"dialer": [], "exposer": []}

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = 0
            now = self.clock.seconds()
            for data, _ in self.dialer.datagrams_to_send(now=now):
                if self.exposer is None:
                    self.exposer = exposerConnection(self.exposerIntro, data, *self.case.identity(self.exposerName), self.case.base)
                self.exposer.receive_datagram(data, DIALER, now=now)
                moved += 1
            if self.exposer is not None:
                for data, _ in self.exposer.datagrams_to_send(now=now):
                    self.dialer.receive_datagram(data, EXPOSER, now=now)
                    moved += 1
            for side, conn in (("dialer", self.dialer), ("exposer", self.exposer)):
                while conn is not None and (event := conn.next_event()) is not None:
                    self.events[side].append(event)
            if not moved:
                self.clock.advance(0.05)
                for conn in (self.dialer, self.exposer):
                    if conn is not None and conn.get_timer() is not None and conn.get_timer() <= self.clock.seconds():
                        conn.handle_timer(now=self.clock.seconds())

    def completed(self, side: str) -> bool:
        return any(isinstance(e, events.HandshakeCompleted) for e in self.events[side])

    def terminated(self, side: str) -> Any:
        return next((e for e in self.events[side] if isinstance(e, events.ConnectionTerminated)), None)

    def received(self, side: str) -> bytes:
        return b"".join(e.data for e in self.events[side] if isinstance(e, events.StreamDataReceived))


class P2PDirectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        for name in ("alice", "bob", "carol"):
            self.pki.client(name)
        self.clock = task.Clock()
        import time

        self.clock.advance(time.time())
        self.base = ClientVerifier([self.pki.ca.cert], ClientCertChecker(), self.clock)

    def identity(self, name: str) -> tuple[list[Any], Any]:
        d = self.pki.directory
        return loadCertificates(str(d / f"{name}.pem")), loadKey(str(d / f"{name}.key"))

    def certificate(self, name: str) -> Any:
        return self.identity(name)[0][0]

    def introduce(self, dialer: str, exposer: str, session: str | None = None) -> tuple[Introduction, Introduction]:
        """
        What TP tells each side: the other's identity and certificate.
        """
        session = session or newSessionId()
        return Introduction(session, exposer, self.certificate(exposer)), Introduction(session, dialer, self.certificate(dialer))

    def test_vouchedPeersConnect(self) -> None:
        """
        Alice (dialer) and bob (exposer), each pinned to the other's
        certificate: the handshake completes with ALPN tp-p2p/1, alice's
        check of bob passes, and a stream carries bytes both ways.
        """
        forAlice, forBob = self.introduce("alice", "bob")
        pair = Pair(self, "alice", "bob", forAlice, forBob)
        pair.pump()
        self.assertTrue(pair.completed("dialer") and pair.completed("exposer"), pair.events)
        self.assertEqual(pair.dialer.tls.alpn_negotiated, P2P_ALPN)
        self.assertIsNone(serverRefusal(pair.dialer, forAlice, self.base))
        self.assertTrue(forBob.use())
        stream = pair.dialer.get_next_available_stream_id()
        pair.dialer.send_stream_data(stream, b"hello bob", end_stream=True)
        pair.pump()
        self.assertEqual(pair.received("exposer"), b"hello bob")
        pair.exposer.send_stream_data(stream, b"hello alice", end_stream=True)
        pair.pump()
        self.assertEqual(pair.received("dialer"), b"hello alice")

    def test_unvouchedDialerRefused(self) -> None:
        """
        TP introduced alice to bob; carol (same CA, valid certificate)
        dials bob's direct endpoint: refused in the handshake, nothing of a
        stream reaches bob.
        """
        forAlice, forBob = self.introduce("alice", "bob")
        pair = Pair(self, "carol", "bob", forAlice, forBob)
        pair.pump()
        self.assertFalse(pair.completed("exposer"))
        terminated = pair.terminated("exposer") or pair.terminated("dialer")
        self.assertIsNotNone(terminated, pair.events)
        self.assertEqual(pair.received("exposer"), b"")
        self.assertIn("not the certificate TP vouched for", pair.exposer.tpRefusal)

    def test_replayedInAnotherSession(self) -> None:
        """
        Alice was vouched for in an earlier session with bob; in a new
        session TP introduced carol to bob.  Alice, with her (valid,
        once-vouched) certificate, is refused in the new one.
        """
        self.introduce("alice", "bob")
        forCarol, forBob = self.introduce("carol", "bob")
        pair = Pair(self, "alice", "bob", forCarol, forBob)
        pair.pump()
        self.assertFalse(pair.completed("exposer"))
        self.assertIn(f"P2P session {forBob.session}", pair.exposer.tpRefusal)

    def test_wrongExposerRefusedByDialer(self) -> None:
        """
        Alice was introduced to bob, but carol answers the direct
        connection (she took bob's path): the handshake completes (the
        dialer checks after it), and alice's check refuses carol before
        alice sends anything.
        """
        forAlice, _ = self.introduce("alice", "bob")
        _, forCarol = self.introduce("alice", "carol")
        pair = Pair(self, "alice", "carol", forAlice, forCarol)
        pair.pump()
        self.assertTrue(pair.completed("dialer"))
        refused = serverRefusal(pair.dialer, forAlice, self.base)
        self.assertIsNotNone(refused)
        self.assertIn("bob", refused)

    def test_revokedSinceIntroduction(self) -> None:
        """
        The pinned certificate must still pass TP's checks: alice was
        vouched for, then her certificate was revoked (a CRL the exposer
        has): refused.
        """
        forAlice, forBob = self.introduce("alice", "bob")
        self.base = ClientVerifier([self.pki.ca.cert], ClientCertChecker(crls=(self.pki.ca.crl([self.certificate("alice").serial_number]),)), self.clock)
        pair = Pair(self, "alice", "bob", forAlice, forBob)
        pair.pump()
        self.assertFalse(pair.completed("exposer"))
        self.assertIn("revoked", pair.exposer.tpRefusal)

    def test_oneConnectionPerSession(self) -> None:
        """
        An introduction admits one direct connection: a second, even with
        the vouched certificate, finds it used.
        """
        _, forBob = self.introduce("alice", "bob")
        self.assertTrue(forBob.use())
        self.assertFalse(forBob.use())
