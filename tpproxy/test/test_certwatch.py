"""
Tests for L{tpproxy.certwatch}: a client's certificate files watched on a
L{Clock} set to the real time (the certificates are real, in a temporary
directory).
"""

from __future__ import annotations

import datetime
import io
import os
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tpproxy import certwatch
from tpproxy.certwatch import CertificateWatcher, LoadedSettings, Materials, followRenewals, loadMaterials, watchCertificate
from tpproxy.cli import Settings
from tpproxy.pki import CertificateAuthority, keyPEM, serialHex, writePrivate
from tpproxy.protocols.client import ServerAddress
from tpproxy.test.support import audits, echoRoundTrips, waitForAudits
from tpproxy.test.test_goaway import RealTPTestCase, waitUntil


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


# --- across a renewal, on loopback with a real TP ------------------------------


class Lines:
    """
    A stderr for an in-process client: C{waitFor(text)} fires once a line
    holding C{text} was written.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.waiting: list[tuple[str, Any]] = []

    def write(self, text: str) -> None:
        for line in text.splitlines():
            self.lines.append(line)
            for wanted, d in list(self.waiting):
                if wanted in line:
                    self.waiting.remove((wanted, d))
                    d.callback(line)

    def flush(self) -> None:
        pass

    def waitFor(self, text: str, timeout: float = 15) -> Any:
        from twisted.internet import defer, reactor

        d: defer.Deferred[str] = defer.Deferred()
        self.waiting.append((text, d))
        return d.addTimeout(timeout, reactor)


def writePair(directory: Path, stem: str, issued: Any) -> None:
    """
    Replace C{stem}.pem and C{stem}.key as a renewing tool does (each
    file atomically).
    """
    from tpproxy.pki import replacePrivate

    replacePrivate(directory / f"{stem}.pem", issued.certPEM)
    replacePrivate(directory / f"{stem}.key", issued.keyPEM)


class RenewalLoopbackTests(RealTPTestCase):
    """
    A client whose certificate lives 10 minutes, renewed after it started:
    its watcher runs on a L{Clock} set to the real time, so the old
    certificate's notAfter can be passed for the client while TP, on the
    real clock, still accepts it.
    """

    def setUp(self) -> None:
        super().setUp()
        self.now = float(int(time.time()))
        self.clock = Clock()
        self.clock.advance(self.now)
        self.old = self.issue(self.now - 60, 600)
        self.startTP()

    def issue(self, start: float, seconds: float) -> Any:
        issued = self.pki.ca.issue(
            "alice",
            client=True,
            notBefore=datetime.datetime.fromtimestamp(start, datetime.timezone.utc),
            notAfter=datetime.datetime.fromtimestamp(start + seconds, datetime.timezone.utc),
        )
        writePair(self.pki.directory, "alice", issued)
        return issued

    def settings(self, transport: str) -> Settings:
        d = self.pki.directory
        return Settings(ServerAddress("localhost", self.port), str(d / "alice.pem"), str(d / "alice.key"), str(d / "ca.pem"), 10.0, transport)

    @defer.inlineCallbacks
    def exposeAcrossRenewal(self, transport: str) -> Any:
        """
        An in-process exposer over C{transport}, a tunnel through it, a
        renewal: the exposure moves to a connection with the new
        certificate; the tunnel keeps echoing, also once the old
        certificate's notAfter has passed on the client's clock.
        """
        from tpproxy.reverse.expose import Exposer
        from tpproxy.wire import ClientHello

        settings = self.settings(transport)
        loaded = loadMaterials(settings)
        stderr = Lines()
        exposer = Exposer(reactor, LoadedSettings(settings, loaded), ("127.0.0.1", self.echoPort), ClientHello("listen", mode="public", port=0), 15.0, stderr)
        info = yield exposer.start()
        self.addCleanup(exposer.stop, True)
        watcher = watchCertificate(self.clock, settings, loaded, exposer.renewed, exposer.say)
        self.addCleanup(watcher.stop)
        port = info["port"]
        control = self.registry.byPort[port].control
        self.assertEqual(control.conn.certificate.serial_number, self.old.cert.serial_number)
        talker = yield self.talk(port)
        self.assertEqual((yield talker.echo(b"before the renewal")), b"before the renewal")

        new = self.issue(self.now, 3600)
        moved = stderr.waitFor("again via")
        self.clock.advance(30)
        line = yield moved
        self.assertIn(f"public port {port} again via", line)
        control = self.registry.byPort[port].control
        self.assertEqual(control.conn.certificate.serial_number, new.cert.serial_number)
        self.assertEqual((yield talker.echo(b"after the renewal")), b"after the renewal")
        yield echoRoundTrips(port, 2, 1000)

        self.clock.advance(self.old.cert.not_valid_after_utc.timestamp() - self.clock.seconds() + 60)
        self.assertEqual((yield talker.echo(b"after the old notAfter")), b"after the old notAfter")
        yield echoRoundTrips(port, 1, 1000)
        self.assertEqual([line for line in stderr.lines if "expire" in line], [])
        return exposer, talker

    @defer.inlineCallbacks
    def test_exposeTLS(self) -> Any:
        """
        Over TLS; sessions accepted after the renewal use the new
        certificate.
        """
        exposer, talker = yield self.exposeAcrossRenewal("tls")
        talker.transport.loseConnection()
        yield talker.closed

        def accepts() -> list[str]:
            return [e["serial"] for e in audits(self.observer) if e.get("event") == "accept"]

        yield waitUntil(lambda: len(accepts()) == 4, "four accept audit events")
        oldSerial, newSerial = serialHex(self.old.cert.serial_number), serialHex(exposer.uplink.settings.loaded.leaf.serial_number)
        self.assertEqual(sorted(accepts()), sorted([oldSerial] + [newSerial] * 3))

    @defer.inlineCallbacks
    def test_exposeQUIC(self) -> Any:
        """
        Over QUIC: the old QUIC connection carries the old tunnel until it
        ends, then closes.
        """
        exposer, talker = yield self.exposeAcrossRenewal("quic")
        old = exposer.uplinks[0].connector.session
        self.assertIsNot(old, exposer.uplink.connector.session)
        self.assertFalse(old.closed)
        talker.transport.loseConnection()
        yield old.done

    @defer.inlineCallbacks
    def upAcrossRenewal(self, transport: str) -> Any:
        """
        C{tp up}'s forwarder with L{followRenewals}: a tunnel opened
        before the renewal keeps echoing, one opened after uses the new
        certificate.
        """
        from tpproxy.cli import Forwarder
        from tpproxy.wire import ClientHello

        settings = self.settings(transport)
        said: list[str] = []
        forwarder = Forwarder(reactor, settings, ClientHello.connect("127.0.0.1", self.echoPort), io.StringIO())
        self.addCleanup(forwarder.connector.close)
        listening = reactor.listenTCP(0, forwarder, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        local = listening.getHost().port
        watcher = followRenewals(self.clock, settings, forwarder.connector, said.append)
        self.addCleanup(watcher.stop)
        before = yield self.talk(local)
        self.assertEqual((yield before.echo(b"old certificate")), b"old certificate")
        oldSession = forwarder.connector.session

        new = self.issue(self.now, 3600)
        self.clock.advance(30)
        self.assertIn("Loaded the renewed client certificate", said[-1])
        after = yield self.talk(local)
        self.assertEqual((yield after.echo(b"new certificate")), b"new certificate")
        self.clock.advance(600)
        self.assertEqual((yield before.echo(b"still the old one")), b"still the old one")
        for talker in (before, after):
            talker.transport.loseConnection()
            yield talker.closed
        yield waitForAudits(self.observer, 2)
        serials = [e["serial"] for e in audits(self.observer) if e.get("event") == "connect"]
        self.assertEqual(sorted(serials), sorted([serialHex(self.old.cert.serial_number), serialHex(new.cert.serial_number)]))
        return oldSession

    def test_upTLS(self) -> Any:
        """
        C{tp up} over TLS.
        """
        return self.upAcrossRenewal("tls")

    @defer.inlineCallbacks
    def test_upQUIC(self) -> Any:
        """
        C{tp up} over QUIC: the tunnel after the renewal is on a new QUIC
        connection; the old one closes when its tunnel has ended.
        """
        oldSession = yield self.upAcrossRenewal("quic")
        self.assertIsNotNone(oldSession)
        yield oldSession.done
