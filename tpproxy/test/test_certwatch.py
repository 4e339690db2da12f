"""
Tests for L{tpproxy.certwatch}: a client's certificate files watched on a
L{Clock} set to the real time (the certificates are real, in a temporary
directory).
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tpproxy import certwatch
from tpproxy.certwatch import CertificateWatcher, LoadedSettings, Materials, loadMaterials, watchCertificate
from tpproxy.cli import Settings
from tpproxy.pki import CertificateAuthority, keyPEM, writePrivate
from tpproxy.protocols.client import ServerAddress


class Files:
    """
    A CA and a client certificate for C{alice} written under C{directory}.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.ca = CertificateAuthority.create("watch CA")
        (directory / "ca.pem").write_bytes(self.ca.certPEM)
        self.cert = directory / "alice.pem"
        self.key = directory / "alice.key"
        self.settings = Settings(ServerAddress("localhost", 8443), str(self.cert), str(self.key), str(directory / "ca.pem"), 15.0)

    def issue(self, start: float, seconds: float, write: str = "both") -> Any:
        issued = self.ca.issue(
            "alice",
            client=True,
            notBefore=datetime.datetime.fromtimestamp(start, datetime.timezone.utc),
            notAfter=datetime.datetime.fromtimestamp(start + seconds, datetime.timezone.utc),
        )
        if write in ("both", "cert"):
            self.cert.write_bytes(issued.certPEM)
        if write in ("both", "key"):
            writePrivate(self.key, keyPEM(issued.key))
        return issued


class WatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.files = Files(Path(self.mktemp()))
        self.clock = Clock()
        self.now = float(int(time.time()))
        self.clock.advance(self.now)
        self.said: list[str] = []
        self.renewals: list[Materials] = []

    def watch(self, lifetime: float = 3600.0, **kw: Any) -> CertificateWatcher:
        self.first = self.files.issue(self.now - 60, lifetime)
        current = loadMaterials(self.files.settings)
        watcher = CertificateWatcher(
            self.clock,
            [str(self.files.cert), str(self.files.key), self.files.settings.ca],
            lambda: loadMaterials(self.files.settings),
            current,
            self.renewals.append,
            self.said.append,
            name=str(self.files.cert),
            **kw,
        )
        watcher.start()
        self.addCleanup(watcher.stop)
        return watcher

    def test_renewalTaken(self) -> None:
        """
        A renewed pair written to the files is taken at the next look (30
        s), once.
        """
        self.watch()
        renewed = self.files.issue(self.now, 7200)
        self.clock.advance(29)
        self.assertEqual(self.renewals, [])
        self.clock.advance(1)
        [loaded] = self.renewals
        self.assertEqual(loaded.leaf, renewed.cert)
        self.clock.advance(120)
        self.assertEqual(len(self.renewals), 1)
        self.assertEqual(self.said, [])

    def test_touchIsNoRenewal(self) -> None:
        """
        Files rewritten with the same certificate and key are no renewal.
        """
        self.watch()
        data = self.files.cert.read_bytes()
        self.files.cert.write_bytes(data)
        os.utime(self.files.cert, (self.now + 5, self.now + 5))
        self.clock.advance(60)
        self.assertEqual(self.renewals, [])

    def test_halfWrittenPair(self) -> None:
        """
        A new certificate whose key is not there yet is not taken; the
        watcher looks again a second later, says once that the files are
        unusable if they still are, and takes the pair once the key comes.
        """
        self.watch()
        renewed = self.files.issue(self.now, 7200, write="cert")
        self.clock.advance(30)
        self.assertEqual((self.renewals, self.said), ([], []))
        self.clock.advance(1)
        self.assertEqual(self.renewals, [])
        [line] = self.said
        self.assertIn("Cannot use the changed certificate files", line)
        self.assertIn("is not the key of the certificate", line)
        self.clock.advance(30)
        self.assertEqual(len(self.said), 1)
        writePrivate(self.files.key, keyPEM(renewed.key))
        self.clock.advance(30)
        [loaded] = self.renewals
        self.assertEqual(loaded.leaf, renewed.cert)

    def test_warnOnceBeforeExpiry(self) -> None:
        """
        No renewal: one warning WARN_BEFORE (10 min) before notAfter, one
        line when it has passed, and nothing more.
        """
        self.watch(lifetime=3600)
        notAfter = self.now - 60 + 3600
        self.clock.advance(notAfter - 601 - self.now)
        self.assertEqual(self.said, [])
        self.clock.advance(1)
        [warning] = self.said
        self.assertIn("expires at", warning)
        self.assertIn("in 10 min", warning)
        self.assertIn("no renewed one has appeared", warning)
        self.clock.advance(599)
        self.assertEqual(len(self.said), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.said), 2)
        self.assertIn("expired at", self.said[1])
        self.clock.advance(3600)
        self.assertEqual(len(self.said), 2)

    def test_shortLifetimeWarning(self) -> None:
        """
        A certificate of 6 minutes is warned of a sixth of its lifetime (60
        s) before it expires, not 10 minutes (before it was even issued).
        """
        self.watch(lifetime=360)
        self.assertEqual(self.said, [])
        self.clock.advance(360 - 60 - 60 - 1)
        self.assertEqual(self.said, [])
        self.clock.advance(1)
        self.assertEqual(len(self.said), 1)
        self.assertIn("in 60 s", self.said[0])

    def test_alreadyDue(self) -> None:
        """
        Started within the warning window, it warns at once.
        """
        self.files.issue(self.now - 3000, 3300)
        current = loadMaterials(self.files.settings)
        watchCertificate(self.clock, self.files.settings, current, self.renewals.append, self.said.append).stop()
        self.assertEqual(len(self.said), 1)
        self.assertIn("in 5 min", self.said[0])

    def test_renewalResetsWarnings(self) -> None:
        """
        After a renewal the warning is about the new certificate, and the
        old one's expiry says nothing.
        """
        self.watch(lifetime=3600)
        self.clock.advance(3000)
        self.assertEqual(len(self.said), 1)
        self.files.issue(self.now + 3000, 3600)
        self.clock.advance(30)
        self.assertEqual(len(self.renewals), 1)
        self.clock.advance(1200)
        self.assertEqual(len(self.said), 1)

    def test_contentReadLate(self) -> None:
        """
        From two thirds of the lifetime on, the files are read even if
        their time, size and inode look unchanged (a tool that keeps them),
        and at that mark even with a long poll interval.
        """
        self.patch(certwatch, "_stamp", lambda path: (1, 1, 1))
        self.watch(lifetime=3600, interval=100000)
        renewed = self.files.issue(self.now, 7200)
        lateAt = self.now - 60 + 2400
        self.clock.advance(lateAt - self.now - 1)
        self.assertEqual(self.renewals, [])
        self.clock.advance(1)
        [loaded] = self.renewals
        self.assertEqual(loaded.leaf, renewed.cert)

    def test_expiredRenewalRefused(self) -> None:
        """
        New files holding an expired certificate are not taken, and that
        is said once.
        """
        self.watch()
        self.files.issue(self.now - 7200, 3600)
        self.clock.advance(30)
        self.assertEqual(self.renewals, [])
        [line] = self.said
        self.assertIn("Not using the new certificate", line)
        self.assertIn("expired", line)
        self.clock.advance(60)
        self.assertEqual(len(self.said), 1)


class LoadedSettingsTests(SynchronousTestCase):
    def test_pinned(self) -> None:
        """
        L{LoadedSettings} answers with the loaded pair even after the files
        changed, and everything else from the settings it wraps.
        """
        files = Files(Path(self.mktemp()))
        now = time.time()
        first = files.issue(now - 60, 3600)
        loaded = LoadedSettings(files.settings, loadMaterials(files.settings))
        files.issue(now, 3600)
        self.assertEqual(loaded.materials()[1], [first.cert])
        self.assertEqual(loaded.server, files.settings.server)
        self.assertEqual(loaded.connectTimeout, 15.0)
        self.assertIsNotNone(loaded.tlsOptions())
        again = LoadedSettings(loaded, loadMaterials(files.settings))
        self.assertIs(again.base, files.settings)
