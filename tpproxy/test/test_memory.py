"""
Memory per tunnel (issue 10, section 5): OpenSSL's record buffers are
released on idle connections, and free memory is returned to the system
after a wave of connections closes, not on every close.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.memory import MIN_WAVE, MemoryTrimmer, glibcTrim
from tpproxy.pki import loadCertificates, loadKey
from tpproxy.testing import TestPKI
from tpproxy.transports.servertls import ServerTLS
from tpproxy.verify import ClientCertChecker


class ReleaseBuffersTests(SynchronousTestCase):
    def test_serverContexts(self) -> None:
        """
        The listener's context and an E2E name's contexts (SNI and inner)
        release their record buffers when idle.
        """
        pki = TestPKI.create(self.mktemp())
        d = pki.directory
        tls = ServerTLS(loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key")), [pki.ca.cert], ClientCertChecker())
        named = pki.ca.issue("e2e.localhost", dns=("e2e.localhost",), server=True)
        tls.addName("e2e.localhost", [named.cert, pki.ca.cert], named.key, lambda identity: None)
        for ctx in (tls.context, tls.names["e2e.localhost"], tls.innerNames["e2e.localhost"]):
            # SSL_CTX_set_mode ORs its argument in and returns the mode.
            self.assertTrue(ctx.set_mode(0) & SSL.MODE_RELEASE_BUFFERS)


class TrimmerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.live = 0
        self.calls = 0

        def trim() -> int:
            self.calls += 1
            return 1

        self.trimmer = MemoryTrimmer(self.clock, lambda: self.live, trim, interval=10)
        self.trimmer.startService()
        self.addCleanup(self.trimmer.stopService)

    def test_trimAfterWave(self) -> None:
        """
        A wave of closes (a quarter of the peak, and at least MIN_WAVE) is
        followed by one trim at the next check; steady traffic is not.
        """
        self.live = 4 * MIN_WAVE
        self.clock.advance(10)
        self.live -= 10
        self.clock.advance(10)
        self.assertEqual(self.calls, 0)
        self.live = 2 * MIN_WAVE
        self.clock.advance(10)
        self.assertEqual(self.calls, 1)
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(self.calls, 1)
        self.live = 0
        self.clock.advance(10)
        self.assertEqual(self.calls, 2)

    def test_smallWaveNoTrim(self) -> None:
        """
        Fewer than MIN_WAVE closes never trim, whatever the share.
        """
        self.live = MIN_WAVE - 1
        self.clock.advance(10)
        self.live = 0
        self.clock.advance(10)
        self.assertEqual(self.calls, 0)

    def test_glibc(self) -> None:
        """
        On this (glibc) machine the real trim function is found and runs.
        """
        trim = glibcTrim()
        self.assertIsNotNone(trim)
        self.assertIn(trim(), (0, 1))  # type: ignore[misc]
