"""
L{tpproxy.connector.Connector}'s choice of transport, against TP's real
QUIC listener on the memory network (L{tpproxy.test.quicmemory}): which
QUIC failures C{auto} remembers, and what a certificate failure says.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tpproxy import connector
from tpproxy.cli import Settings
from tpproxy.protocols.client import ServerAddress, TunnelError
from tpproxy.test.quicmemory import SERVER, QuicWorld
from tpproxy.testing import TestPKI


class ChooseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = QuicWorld(self.mktemp())
        self.patch(os, "environ", {**os.environ, "XDG_CACHE_HOME": str(Path(self.mktemp()).absolute())})
        self.server = f"{SERVER[0]}:{SERVER[1]}"

    def settings(self, transport: str = "auto", name: str = "alice", pki: TestPKI | None = None, ca: str | None = None) -> Settings:
        d = (pki or self.world.pki).directory
        return Settings(
            ServerAddress(*SERVER), str(d / f"{name}.pem"), str(d / f"{name}.key"), ca or self.world.pki.caPath, 15.0, transport
        )

    def choose(self, settings: Settings) -> Any:
        """
        Run L{connector.Connector.choose} on the memory network; its result
        or failure.
        """
        chooser = connector.Connector(self.world.reactor, settings)
        self.addCleanup(chooser.close)
        results: list[Any] = []
        chooser.choose().addBoth(results.append)
        self.world.network.run(until=lambda: results)
        return results[0]

    def test_quicWorks(self) -> None:
        self.world.listen()
        self.assertEqual(self.choose(self.settings()), "quic")
        self.assertIsNone(connector.remembered(self.server))

    def test_unreachableIsRemembered(self) -> None:
        """
        No QUIC listener (ICMP port unreachable): C{auto} takes TLS at once
        and remembers it.
        """
        started = self.world.reactor.seconds()
        self.assertEqual(self.choose(self.settings()), "tls")
        self.assertLess(self.world.reactor.seconds() - started, 0.1)
        self.assertEqual(connector.remembered(self.server), "tls")

    def test_unreachableQuicOnly(self) -> None:
        """
        With C{--transport quic}, an unreachable UDP port is an error at
        once, not after the connect timeout.
        """
        started = self.world.reactor.seconds()
        failure = self.choose(self.settings("quic"))
        self.assertIsInstance(failure, Failure)
        self.assertIn("UDP port unreachable", failure.getErrorMessage())
        self.assertLess(self.world.reactor.seconds() - started, 0.1)

    def test_noAnswerIsRemembered(self) -> None:
        """
        A UDP port that swallows every packet: TLS after the probe bound,
        remembered.
        """
        self.world.listen()
        self.world.network.filter = lambda source, destination, data: destination != SERVER
        self.assertEqual(self.choose(self.settings()), "tls")
        self.assertEqual(connector.remembered(self.server), "tls")

    def test_serverCertificateFailureNotRemembered(self) -> None:
        """
        TP's certificate failing verification (the client trusts another
        CA) does not pin the server to TLS: QUIC got through.
        """
        self.world.listen()
        other = TestPKI.create(self.mktemp())
        self.assertEqual(self.choose(self.settings(ca=other.caPath)), "tls")
        self.assertIsNone(connector.remembered(self.server))

    def test_serverCertificateFailureMessage(self) -> None:
        """
        With C{--transport quic} the failure says the handshake failed and
        why, and does not blame the client certificate (it was never sent).
        """
        self.world.listen()
        other = TestPKI.create(self.mktemp())
        failure = self.choose(self.settings("quic", ca=other.caPath))
        self.assertIsInstance(failure, Failure)
        failure.trap(TunnelError)
        message = failure.getErrorMessage()
        self.assertIn("QUIC handshake with TP failed", message)
        self.assertNotIn("refused", message)
        self.assertNotIn("client certificate", message)

    def test_refusedCertificate(self) -> None:
        """
        TP refusing the client certificate is still read as TP's refusal
        naming the client certificate (the client had finished its side of
        the handshake), and it does not pin the server to TLS.
        """
        self.world.listen()
        other = TestPKI.create(self.mktemp())
        other.client("mallory")
        chooser = connector.Connector(self.world.reactor, self.settings("quic", name="mallory", pki=other))
        self.addCleanup(chooser.close)
        results: list[Any] = []
        chooser.quicSession(15.0).addBoth(results.append)
        # TLS 1.3: the handshake completes on the client before TP's
        # verdict, which then closes the connection.
        self.world.network.run(until=lambda: results and results[0].closed)
        refused = connector.quicRefusal(results[0])
        assert refused is not None
        self.assertIn("TP refused the QUIC connection: the client certificate is not from a CA that TP trusts", str(refused))
        self.assertEqual(self.choose(self.settings(name="mallory", pki=other)), "quic")
        self.assertIsNone(connector.remembered(self.server))
