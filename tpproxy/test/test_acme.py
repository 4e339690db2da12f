"""
ACME: the client, store, responders and issuing service in memory, and TP
getting, serving and renewing certificates from a real Pebble on loopback
(validation is real: Pebble connects to TP's own responders).
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl as stdlib_ssl
import stat
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer, reactor, task, threads
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from tpproxy.acme.client import (
    ID_PE_ACME_IDENTIFIER,
    AcmeError,
    IChallengeResponder,
    keyAuthorization,
    retryAfter,
    tlsALPNCertificate,
)
from tpproxy.acme.responders import HTTP01Responder, TLSALPN01Responder
from tpproxy.acme.service import IssuingService
from tpproxy.acme.store import CertificateStore, renewalTime
from tpproxy.acme.testing import ChallengeTargets, FakeAcmeClient
from tpproxy.certsource import CertificateUnavailable
from tpproxy.config import ConfigError
from tpproxy.pki import loadCertificates, loadKey, newKey
from tpproxy.protocols.client import ServerAddress, TLSClientEndpoint, openTunnel
from tpproxy.protocols.relay import RelayEnd, splice
from tpproxy.protocols.server import TPServerFactory
from tpproxy.service import makeService
from tpproxy.test.pebble import Pebble
from tpproxy.test.support import Echo, freePort, listenLocal
from tpproxy.test.test_reverse import ControlClient
from tpproxy.testing import LOOPBACK_RULES, TestPKI, handshakeInMemory
from tpproxy.transports.servertls import ACME_TLS_ALPN, ServerTLS
from tpproxy.transports.tls import clientTLS
from tpproxy.verify import ClientCertChecker
from tpproxy.wire import ClientHello

# -- in memory ------------------------------------------------------------------


class ChallengeTests(SynchronousTestCase):
    def test_keyAuthorization(self) -> None:
        """
        RFC 8555 8.1: token, a dot, and the base64url SHA-256 JWK thumbprint
        of the account key (RFC 7638: the canonical JSON of crv, kty, x, y).
        """
        import base64
        import json

        key = newKey()
        numbers = key.public_key().public_numbers()

        def b64(n: int) -> str:
            return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

        canonical = json.dumps({"crv": "P-256", "kty": "EC", "x": b64(numbers.x), "y": b64(numbers.y)}, separators=(",", ":"), sort_keys=True)
        thumbprint = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
        self.assertEqual(keyAuthorization("tok-en_1", key), f"tok-en_1.{thumbprint}")

    def test_tlsALPNCertificate(self) -> None:
        """
        RFC 8737 3: the name as the only SAN, and the critical
        acmeIdentifier extension holding the DER OCTET STRING of
        SHA-256(key authorization).
        """
        cert, key = tlsALPNCertificate("svc.example", "abc.def")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["svc.example"])
        ext = cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
        self.assertTrue(ext.critical)
        self.assertEqual(ext.value.value, b"\x04\x20" + hashlib.sha256(b"abc.def").digest())

    def test_retryAfter(self) -> None:
        now = 1_700_000_000.0
        self.assertEqual(retryAfter(Headers({}), 1.5, now), 1.5)
        self.assertEqual(retryAfter(Headers({b"Retry-After": [b"7"]}), 1, now), 7)
        self.assertEqual(retryAfter(Headers({b"Retry-After": [b"100000"]}), 1, now, limit=30), 30)
        date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 12))
        self.assertAlmostEqual(retryAfter(Headers({b"Retry-After": [date.encode()]}), 1, now), 12, delta=1)
        self.assertEqual(retryAfter(Headers({b"Retry-After": [b"soon"]}), 2, now), 2)


class StoreTests(SynchronousTestCase):
    def test_roundTripPrivateKey(self) -> None:
        pki = TestPKI.create(self.mktemp())
        issued = pki.ca.issue("svc.example", dns=("svc.example",), server=True)
        store = CertificateStore(Path(self.mktemp()) / "store")
        self.assertIsNone(store.load("svc.example"))
        store.save("svc.example", [issued.cert, pki.ca.cert], issued.key)
        chain, key = store.load("svc.example")  # type: ignore[misc]
        self.assertEqual(chain, [issued.cert, pki.ca.cert])
        self.assertEqual(key.private_numbers(), issued.key.private_numbers())
        mode = stat.S_IMODE(os.stat(store.path / "svc.example.pem").st_mode)
        self.assertEqual(mode, 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(store.path).st_mode), 0o700)

    def test_namesOnly(self) -> None:
        """
        A name is a file name only when it is a DNS name: no path tricks.
        """
        store = CertificateStore(Path(self.mktemp()))
        for bad in ("../etc/passwd", "a/b", "", "x..y", "-a.b", "account", "a.example\n"):
            self.assertRaises(ValueError, store.load, bad)

    def test_mismatchedOrBrokenIgnored(self) -> None:
        """
        A stored file whose key is not its certificate's, or that does not
        parse, is ignored as if absent (TP then orders a new one) rather
        than stopping TP at start.
        """
        pki = TestPKI.create(self.mktemp())
        issued = pki.ca.issue("svc.example", dns=("svc.example",), server=True)
        store = CertificateStore(Path(self.mktemp()))
        store.save("svc.example", [issued.cert], newKey())
        self.assertIsNone(store.load("svc.example"))
        (store.path / "svc.example.pem").write_bytes(b"garbage")
        self.assertIsNone(store.load("svc.example"))
        self.flushLoggedErrors()

    def test_renewalTime(self) -> None:
        pki = TestPKI.create(self.mktemp())
        leaf = pki.ca.issue("a.example", dns=("a.example",), server=True, hours=30).cert
        start = leaf.not_valid_before_utc.timestamp()
        self.assertAlmostEqual(renewalTime(leaf, 2 / 3), start + 2 / 3 * (leaf.not_valid_after_utc.timestamp() - start))


class HTTP01ResponderTests(SynchronousTestCase):
    def render(self, responder: HTTP01Responder, path: bytes) -> tuple[int, bytes]:
        request = DummyRequest(path.lstrip(b"/").split(b"/"))
        request.path = path
        body = responder.render_GET(request)
        return request.responseCode or 200, body

    def test_servesPendingTokenOnly(self) -> None:
        responder = HTTP01Responder()
        self.assertEqual(self.render(responder, b"/.well-known/acme-challenge/tok")[0], 404)
        responder.start("a.example", "tok", "tok.thumb")
        self.assertEqual(self.render(responder, b"/.well-known/acme-challenge/tok"), (200, b"tok.thumb"))
        self.assertEqual(self.render(responder, b"/.well-known/acme-challenge/other")[0], 404)
        self.assertEqual(self.render(responder, b"/tok")[0], 404)
        responder.stop("a.example", "tok")
        self.assertEqual(self.render(responder, b"/.well-known/acme-challenge/tok")[0], 404)


class TLSALPNListenerTests(SynchronousTestCase):
    """
    tls-alpn-01 on TP's own TLS listener, in memory.
    """

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        d = self.pki.directory
        self.serverTLS = ServerTLS(loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key")), [self.pki.ca.cert], ClientCertChecker(frozenset(), frozenset(), ()))
        self.responder = TLSALPN01Responder(self.serverTLS)

    def connect(self, sni: bytes, alpn: list[bytes]) -> tuple[list[Exception], SSL.Connection, Any]:
        app = type("App", (), {})()
        server = self.serverTLS.serverConnectionForTLS(app)
        server.set_accept_state()
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_alpn_protos(alpn)
        client = SSL.Connection(ctx, None)
        client.set_tlsext_host_name(sni)
        client.set_connect_state()
        return handshakeInMemory(server, client), client, app

    def test_respondersProvideInterface(self) -> None:
        """
        Both responders provide L{IChallengeResponder}.
        """
        self.assertTrue(verifyObject(IChallengeResponder, self.responder))
        self.assertTrue(verifyObject(IChallengeResponder, HTTP01Responder()))

    def test_challengeCertificateWhilePending(self) -> None:
        """
        A client offering acme-tls/1 alone, with the SNI of a pending
        challenge, gets the challenge certificate and no client certificate
        is asked of it; the protocol is marked so that TP serves nothing.
        """
        self.responder.start("svc.example", "tok", "tok.thumb")
        errors, client, app = self.connect(b"svc.example", [ACME_TLS_ALPN])
        self.assertEqual(errors, [])
        self.assertEqual(client.get_alpn_proto_negotiated(), ACME_TLS_ALPN)
        leaf = client.get_peer_certificate().to_cryptography()  # type: ignore[union-attr]
        self.assertEqual(leaf, self.serverTLS.challengeCertificates["svc.example"][0])
        self.assertEqual(app.tpACMEChallenge, "svc.example")
        self.responder.stop("svc.example", "tok")
        self.assertEqual(self.serverTLS.challengeCertificates, {})

    def test_noChallengeNoCertificate(self) -> None:
        """
        Without a pending challenge for the SNI, acme-tls/1 is not
        negotiated and a client without a certificate fails the handshake.
        """
        self.responder.start("svc.example", "tok", "tok.thumb")
        errors, client, app = self.connect(b"other.example", [ACME_TLS_ALPN])
        self.assertFalse(hasattr(app, "tpACMEChallenge"))
        self.assertNotEqual(client.get_alpn_proto_negotiated(), ACME_TLS_ALPN)
        self.assertIn("peer did not return a certificate", str(errors))

    def test_mixedALPNGetsNoChallenge(self) -> None:
        """
        acme-tls/1 offered beside other protocols is not a validator (RFC
        8737 says it offers acme-tls/1 alone): the normal certificate.
        """
        self.responder.start("svc.example", "tok", "tok.thumb")
        errors, client, app = self.connect(b"svc.example", [ACME_TLS_ALPN, b"tp/1"])
        self.assertIn("peer did not return a certificate", str(errors))
        self.assertFalse(hasattr(app, "tpACMEChallenge"))
        self.assertEqual(client.get_peer_certificate().to_cryptography().subject, loadCertificates(str(self.pki.directory / "server.pem"))[0].subject)  # type: ignore[union-attr]

    def test_e2eNameContextAnswersToo(self) -> None:
        """
        An E2E name already served (renewal) has its own context, chosen
        by SNI before ALPN: it answers the challenge as well.
        """
        issued = self.pki.ca.issue("svc.example", dns=("svc.example",), server=True)
        self.serverTLS.addName("svc.example", [issued.cert], issued.key, lambda identity: None)
        self.responder.start("svc.example", "tok", "tok.thumb")
        errors, client, app = self.connect(b"svc.example", [ACME_TLS_ALPN])
        self.assertEqual(errors, [])
        self.assertEqual(client.get_alpn_proto_negotiated(), ACME_TLS_ALPN)
        self.assertEqual(client.get_peer_certificate().to_cryptography(), self.serverTLS.challengeCertificates["svc.example"][0])  # type: ignore[union-attr]

    def test_serverProtocolServesNothing(self) -> None:
        """
        The TP protocol closes a validator's connection after the handshake
        without a ServerHello and audits it as acme_challenge.
        """
        pki = self.pki
        config = pki.serverConfig()
        factory = TPServerFactory(config, task.Clock(), serverTLS=self.serverTLS)
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        transport.negotiatedProtocol = ACME_TLS_ALPN  # type: ignore[attr-defined]
        transport.tpACMEChallenge = "svc.example"  # type: ignore[attr-defined]
        proto.makeConnection(transport)
        proto.handshakeCompleted()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(proto.result, "acme_challenge")


class IssuingScheduleTests(SynchronousTestCase):
    """
    When the issuing service renews and how it backs off, on a fake clock.
    """

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.http01 = HTTP01Responder()
        # The fake CA validates http-01 against the service's responder.
        self.ca = FakeAcmeClient(self.clock, ChallengeTargets(http01=self.http01), lifetime=30 * 3600)
        self.announced: list[tuple[str, int]] = []
        self.service = IssuingService(
            self.ca,
            CertificateStore(Path(self.mktemp())),
            [self.http01],
            self.clock,
            ownNames=("tp.example", "alt.example"),
            onCertificate=lambda name, chain, key: self.announced.append((name, chain[0].serial_number)),
            checkInterval=3600,
        )
        self.errors: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") == LogLevel.warn and "renew" in event.get("log_format", ""):
                self.errors.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def test_issuesAtStartThenRenewsAtTwoThirds(self) -> None:
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.assertEqual(self.ca.orders, [["tp.example", "alt.example"]])
        self.assertEqual([name for name, _ in self.announced], ["tp.example"])
        # 30 h lifetime (from 5 minutes back): due after 20 h.
        self.clock.advance(18 * 3600)
        self.assertEqual(len(self.ca.orders), 1)
        self.clock.advance(3 * 3600)
        self.assertEqual(len(self.ca.orders), 2)
        self.assertNotEqual(self.announced[0][1], self.announced[1][1])

    def test_storedFreshCertificateNotReordered(self) -> None:
        self.service.startService()
        self.service.stopService()
        again = IssuingService(self.ca, self.service.store, [self.http01], self.clock, ownNames=("tp.example", "alt.example"))
        again.startService()
        again.stopService()
        self.assertEqual(len(self.ca.orders), 1)

    def test_namesChangedReordered(self) -> None:
        """
        A stored certificate for other names than C{acme.names} now says is
        replaced at once, not at its renewal time.
        """
        self.service.startService()
        self.service.stopService()
        again = IssuingService(self.ca, self.service.store, [self.http01], self.clock, ownNames=("tp.example", "new.example"))
        again.startService()
        again.stopService()
        self.assertEqual(self.ca.orders[-1], ["tp.example", "new.example"])

    def test_directoryChangedReordered(self) -> None:
        """
        A certificate from another ACME directory (staging, before the
        switch to production) is replaced at once.
        """
        self.service.startService()
        self.service.stopService()
        self.assertEqual(self.service.store.directoryOf("tp.example"), FakeAcmeClient.directoryURL)
        production = FakeAcmeClient(self.clock, ChallengeTargets(http01=self.http01), lifetime=30 * 3600)
        production.directoryURL = "https://production.invalid/dir"
        again = IssuingService(production, self.service.store, [self.http01], self.clock, ownNames=("tp.example", "alt.example"))
        again.startService()
        again.stopService()
        self.assertEqual(len(production.orders), 1)
        self.assertEqual(self.service.store.directoryOf("tp.example"), "https://production.invalid/dir")

    def test_extraNamesFromCANotReordered(self) -> None:
        """
        A CA that adds a name (www.) gives a certificate that stays fresh:
        no new order at every check.
        """
        issue = self.ca.issue
        self.ca.issue = lambda names, key, responders: issue(names + ["www.tp.example"], key, responders)  # type: ignore[method-assign]
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.clock.advance(10 * 3600)
        self.assertEqual(len(self.ca.orders), 1)

    def test_dueAtIssueBacksOff(self) -> None:
        """
        A certificate already due for renewal when it arrives (clock skew)
        is kept, and the next order waits for the backoff, not the next
        minute.
        """
        self.ca.lifetime = 0.01 * 3600
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.assertEqual(len(self.ca.orders), 1)
        for _ in range(59):
            self.clock.advance(60)
        # Orders at 0, 1, 3, 8, 18 and 48 minutes (the backoff), not 59.
        self.assertEqual(len(self.ca.orders), 6)
        self.flushLoggedErrors()

    def test_e2eCertificateBringsCheckForward(self) -> None:
        """
        An E2E certificate obtained after the daily check was scheduled,
        due sooner than that, is renewed in time.
        """
        served = {"svc.example"}
        self.service.inUse = lambda name: name in served
        self.service.ownNames = ()
        self.service.checkInterval = 86400
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.ca.lifetime = 6 * 3600
        self.successResultOf(self.service.certificateFor("svc.example"))
        self.clock.advance(4 * 3600 + 120)
        self.assertEqual(len(self.ca.orders), 2)

    def test_failureCountedOncePerOrder(self) -> None:
        """
        Several callers waiting on one failed order count one failure.
        """
        self.ca.down = True
        waiting: list[Any] = []
        release = defer.Deferred()
        fail = self.ca.issue
        self.ca.issue = lambda names, key, responders: release.addCallback(lambda _: fail(names, key, responders))  # type: ignore[method-assign]
        for _ in range(4):
            waiting.append(self.service.certificateFor("svc.example"))
        release.callback(None)
        for d in waiting:
            self.failureResultOf(d, CertificateUnavailable)
        self.assertEqual(self.service._failures["svc.example"], 1)
        self.assertEqual(self.service._notBefore["svc.example"] - self.clock.seconds(), 60)

    def test_shortLivedCertificateCheckedInTime(self) -> None:
        """
        With a daily check and a 6-hour certificate, the check comes when
        the certificate falls due, not a day later.
        """
        self.ca.lifetime = 6 * 3600
        self.service.checkInterval = 86400
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.clock.advance(4 * 3600 + 120)
        self.assertEqual(len(self.ca.orders), 2)

    def test_checkSurvivesStoreErrors(self) -> None:
        """
        A store that cannot be read is logged, and checks go on.
        """
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.service.store.load = lambda name: 1 / 0  # type: ignore[assignment,method-assign]
        self.clock.advance(3600)
        self.assertGreaterEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertTrue(self.service._nextCheck.active())

    def test_e2eStoredServedWhileCADown(self) -> None:
        """
        An E2E certificate due for renewal but valid for hours more is
        still served while the CA fails; an order refused waits out its
        backoff before the next.
        """
        self.successResultOf(self.service.certificateFor("svc.example"))
        self.clock.advance(21 * 3600)
        self.ca.down = True
        chain, key = self.successResultOf(self.service.certificateFor("svc.example"))
        self.assertIn("svc.example", {n.value for n in chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value})
        orders = len(self.ca.orders)
        self.successResultOf(self.service.certificateFor("svc.example"))
        self.assertEqual(len(self.ca.orders), orders)

    def test_onDemandBudget(self) -> None:
        """
        Exposers cannot place more than C{onDemandPerHour} orders an hour.
        """
        self.service.onDemandPerHour = 3
        for i in range(3):
            self.successResultOf(self.service.certificateFor(f"n{i}.example"))
        failure = self.failureResultOf(self.service.certificateFor("n3.example"), CertificateUnavailable)
        self.assertIn("on-demand ACME orders in the last hour", str(failure.value))
        self.assertEqual(len(self.ca.orders), 3)
        self.clock.advance(3601)
        self.successResultOf(self.service.certificateFor("n3.example"))

    def test_backoffWhileCADown(self) -> None:
        """
        Failures are logged and retried after 1, 2, 5 ... minutes, never
        more than hourly; the first success ends the retries.
        """
        self.ca.down = True
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.assertEqual(len(self.ca.orders), 1)
        self.assertEqual(len(self.errors), 1)
        for delay in (60, 120, 300, 600, 1800, 3600, 3600):
            self.clock.advance(delay - 1)
            count = len(self.ca.orders)
            self.clock.advance(1)
            self.assertEqual(len(self.ca.orders), count + 1, delay)
        self.ca.down = False
        self.clock.advance(3600)
        self.assertEqual(len(self.announced), 1)
        orders = len(self.ca.orders)
        self.clock.advance(3 * 3600)
        self.assertEqual(len(self.ca.orders), orders)

    def test_e2eOnDemandFailsClearly(self) -> None:
        self.ca.down = True
        failure = self.failureResultOf(self.service.certificateFor("svc.example"), CertificateUnavailable)
        self.assertIn("did not certify svc.example", str(failure.value))
        self.failureResultOf(self.service.certificateFor("../x"), CertificateUnavailable)

    def test_e2eRenewedOnlyWhileServed(self) -> None:
        served = {"svc.example"}
        self.service.inUse = lambda name: name in served
        self.service.ownNames = ()
        self.successResultOf(self.service.certificateFor("svc.example"))
        self.successResultOf(self.service.certificateFor("svc.example"))
        self.assertEqual(len(self.ca.orders), 1)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.clock.advance(21 * 3600)
        self.assertEqual(len(self.ca.orders), 2)
        served.clear()
        self.clock.advance(21 * 3600)
        self.assertEqual(len(self.ca.orders), 2)


class AcmeConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())

    def config(self, **acme: Any) -> Any:
        table = {"directory": "https://ca.example/dir", "names": ["tp.example"]}
        table.update(acme)
        return self.pki.serverConfig(certificate=None, key=None, acme=table)

    def test_defaults(self) -> None:
        config = self.config()
        self.assertIsNone(config.certificate)
        self.assertEqual(config.acme.challenges, ("tls-alpn-01",))
        self.assertEqual(config.acme.store, str(self.pki.directory / "acme"))
        self.assertEqual(config.acme.accountKey, str(self.pki.directory / "acme" / "account.key"))
        self.assertAlmostEqual(config.acme.renewFraction, 2 / 3)
        self.assertEqual(self.config(http01_listen="tcp:80").acme.challenges, ("tls-alpn-01", "http-01"))

    def test_errorsNameTheirKey(self) -> None:
        for acme, key in [
            ({"directory": "ftp://x"}, "acme.directory"),
            ({"directory": "http://ca.example/dir"}, "must be https://"),
            ({"names": ["*.example.org"]}, "wildcards need the dns-01 challenge"),
            ({"names": ["not a name"]}, "acme.names"),
            ({"challenges": ["dns-01"]}, "acme.challenges"),
            ({"challenges": ["http-01"]}, "acme.challenges"),
            ({"renew_at": 1.5}, "acme.renew_at"),
            ({"email": "nobody"}, "acme.email"),
            ({"e2e": "yes"}, "acme.e2e"),
            ({"colour": "blue"}, "acme"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                self.config(**acme)
            self.assertIn(key, str(caught.exception))

    def test_loopbackHTTPAndDuplicates(self) -> None:
        config = self.config(directory="http://127.0.0.1:14000/dir", names=["tp.example", "TP.example."])
        self.assertEqual(config.acme.names, ("tp.example",))

    def test_certificateRequiredWithoutACMENames(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.pki.serverConfig(certificate=None, key=None)
        self.assertIn("server.certificate", str(caught.exception))


# -- against Pebble ---------------------------------------------------------------


class Sink(RelayEnd):
    """
    The local end of a tunnel in a test: collects what comes through.
    """

    def __init__(self) -> None:
        self.transport = StringTransport()


def peerCertificate(end: Any) -> x509.Certificate:
    transport = end.transport
    return transport.getPeerCertificate().to_cryptography()


class PebbleTestCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        self.tlsPort = freePort()
        self.httpPort = freePort()
        self.issued: defer.DeferredQueue[tuple[str, list[x509.Certificate]]] = defer.DeferredQueue()
        self.warnings: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") in (LogLevel.warn, LogLevel.error) and event.get("log_namespace", "").startswith("tpproxy"):
                from twisted.logger import formatEvent

                self.warnings.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    @defer.inlineCallbacks
    def startTP(self, challenges: list[str], clock: Any = None, names: list[str] = ["tp.test"]) -> Any:
        self.pebble = yield Pebble.start(self, self.httpPort, self.tlsPort)
        acme: dict[str, Any] = {
            "directory": self.pebble.directory,
            "ca_bundle": self.pebble.caBundle,
            "email": "admin@tp.test",
            "names": names,
            "challenges": challenges,
            "store": str(Path(self.mktemp()).absolute()),
        }
        if "http-01" in challenges:
            acme["http01_listen"] = f"tcp:{self.httpPort}:interface=127.0.0.1"
        self.config = self.pki.serverConfig(
            LOOPBACK_RULES,
            listen=f"tcp:{self.tlsPort}:interface=127.0.0.1",
            certificate=None,
            key=None,
            quic=False,
            acme=acme,
            exposures=[{"identities": ["alice"], "names": "*.test", "dialers": ["alice"]}],
        )
        self.service = makeService(self.config, reactor, clock)
        self.issuing = self.service.getServiceNamed("acme")
        announce = self.issuing.onCertificate

        def issued(name: str, chain: list[x509.Certificate], key: Any) -> None:
            announce(name, chain, key)
            self.issued.put((name, chain))

        self.issuing.onCertificate = issued
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.factory = self.service.getServiceNamed(f"tls:tcp:{self.tlsPort}:interface=127.0.0.1").factory

    def tlsOptions(self, roots: list[x509.Certificate], serverName: str = "tp.test") -> Any:
        d = self.pki.directory
        return clientTLS(serverName, roots, loadCertificates(str(d / "alice.pem")), loadKey(str(d / "alice.key")))

    @defer.inlineCallbacks
    def tunnel(self, roots: list[x509.Certificate], echoPort: int) -> Any:
        """
        A TP tunnel to the echo server, TP's certificate verified against
        C{roots} for tp.test; returns (tunnel end, sink).
        """
        end = yield openTunnel(reactor, ServerAddress("127.0.0.1", self.tlsPort), self.tlsOptions(roots), ClientHello("connect", host="127.0.0.1", port=echoPort))
        sink = Sink()
        splice(end, sink, fromA=end.rest)
        end.transport.resumeProducing()
        self.addCleanup(lambda: end.transport.abortConnection())
        return end, sink

    @defer.inlineCallbacks
    def roundTrip(self, end: Any, sink: Sink, data: bytes) -> Any:
        before = len(sink.transport.value())
        end.transport.write(data)
        for _ in range(200):
            if len(sink.transport.value()) >= before + len(data):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(sink.transport.value()[before:], data)

    @defer.inlineCallbacks
    def assertServedAndVerifies(self, chain: list[x509.Certificate], name: str = "tp.test") -> Any:
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        path = yield self.pebble.verifyChain(pem, name)
        self.assertEqual(path[0], chain[0])


class PebbleIssuanceTests(PebbleTestCase):
    @defer.inlineCallbacks
    def issueOwnName(self, challenge: str) -> Any:
        yield self.startTP([challenge])
        name, chain = yield self.issued.get()
        self.assertEqual(name, "tp.test")
        yield self.assertServedAndVerifies(chain)
        # A tunnel through TP verifies TP against Pebble's root only.
        roots = yield self.pebble.roots()
        echoPort, _ = listenLocal(self, Echo)
        end, sink = yield self.tunnel(roots, echoPort)
        self.assertEqual(peerCertificate(end), chain[0])
        yield self.roundTrip(end, sink, b"hello through an ACME certificate")
        keyFile = Path(self.config.acme.store) / "tp.test.pem"
        self.assertEqual(stat.S_IMODE(os.stat(keyFile).st_mode), 0o600)
        return chain

    def test_tlsALPN01(self) -> Any:
        """
        TP gets its certificate with tls-alpn-01 answered on its own TLS
        listener (Pebble validates on that port) and serves it.
        """
        return self.issueOwnName("tls-alpn-01")

    def test_http01(self) -> Any:
        """
        TP gets its certificate with http-01 from its port-80 responder.
        """
        return self.issueOwnName("http-01")

    @defer.inlineCallbacks
    def test_storedCertificateReloadedAtStart(self) -> Any:
        """
        A restarted TP serves the stored certificate at once and orders
        nothing.
        """
        chain = yield self.issueOwnName("tls-alpn-01")
        yield self.service.stopService()
        again = makeService(self.config, reactor)
        issuing = again.getServiceNamed("acme")
        orders: list[Any] = []
        issuing.obtain = lambda names: orders.append(names)  # type: ignore[method-assign]
        again.startService()
        self.addCleanup(again.stopService)
        self.assertEqual(orders, [])
        self.assertEqual(issuing.store.load("tp.test")[0], chain)
        self.assertEqual(again.getServiceNamed(f"tls:tcp:{self.tlsPort}:interface=127.0.0.1").factory.wrappedFactory.wrappedFactory.serverTLS.chain, chain)

    @defer.inlineCallbacks
    def test_e2eNameOnDemand(self) -> Any:
        """
        An E2E exposure name gets a certificate from the CA when it is
        exposed, and TP serves it by SNI: a dialer that trusts only
        Pebble's root and checks the name completes the handshake.
        """
        yield self.startTP(["tls-alpn-01"])
        yield self.issued.get()
        roots = yield self.pebble.roots()
        factory = __import__("twisted.internet.protocol", fromlist=["Factory"]).Factory.forProtocol(
            lambda: ControlClient(ClientHello("listen", mode="e2e", name="svc.test"))
        )
        control = yield TLSClientEndpoint(reactor, ServerAddress("127.0.0.1", self.tlsPort), self.tlsOptions(roots)).connect(factory)
        self.addCleanup(lambda: control.lost.called or control.transport.abortConnection())
        answer = yield control.answer
        self.assertTrue(answer.ok, answer)
        name, chain = yield self.issued.get()
        self.assertEqual(name, "svc.test")
        yield self.assertServedAndVerifies(chain, "svc.test")
        rootsFile = Path(self.mktemp())
        rootsFile.write_bytes(b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots))
        d = self.pki.directory

        def dial() -> bytes:
            context = stdlib_ssl.create_default_context(cafile=str(rootsFile))
            context.load_cert_chain(str(d / "alice.pem"), str(d / "alice.key"))
            with socket.create_connection(("127.0.0.1", self.tlsPort), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="svc.test") as tls:
                    return tls.getpeercert(binary_form=True)

        served = yield threads.deferToThread(dial)
        self.assertEqual(x509.load_der_x509_certificate(served), chain[0])

    @defer.inlineCallbacks
    def test_e2eRefusedWhenCADown(self) -> Any:
        """
        A name that cannot get a certificate is refused to the exposer
        with no_certificate, and TP goes on serving.
        """
        yield self.startTP(["tls-alpn-01"])
        yield self.issued.get()
        roots = yield self.pebble.roots()
        yield self.pebble.stop()
        factory = __import__("twisted.internet.protocol", fromlist=["Factory"]).Factory.forProtocol(
            lambda: ControlClient(ClientHello("listen", mode="e2e", name="down.test"))
        )
        control = yield TLSClientEndpoint(reactor, ServerAddress("127.0.0.1", self.tlsPort), self.tlsOptions(roots)).connect(factory)
        self.addCleanup(lambda: control.lost.called or control.transport.abortConnection())
        answer = yield control.answer
        self.assertFalse(answer.ok)
        self.assertEqual(answer.code, "no_certificate")
        self.assertIn("down.test", answer.message)
        echoPort, _ = listenLocal(self, Echo)
        end, sink = yield self.tunnel(roots, echoPort)
        yield self.roundTrip(end, sink, b"still serving")


class PebbleRenewalTests(PebbleTestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_renewalSwapsForNewConnectionsOnly(self) -> Any:
        """
        Past 2/3 of its lifetime (on a clock the test moves), TP's
        certificate is renewed: a connection made before keeps working,
        new connections see the new certificate.
        """
        clock = task.Clock()
        clock.advance(time.time())
        yield self.startTP(["tls-alpn-01"], clock)
        _, first = yield self.issued.get()
        roots = yield self.pebble.roots()
        echoPort, _ = listenLocal(self, Echo)
        old, oldSink = yield self.tunnel(roots, echoPort)
        yield self.roundTrip(old, oldSink, b"before")
        clock.advance(renewalTime(first[0], 2 / 3) - clock.seconds() + 1)
        # The daily check fires on the clock.
        clock.advance(self.config.acme.checkInterval)
        _, second = yield self.issued.get()
        self.assertNotEqual(second[0].serial_number, first[0].serial_number)
        yield self.assertServedAndVerifies(second)
        new, newSink = yield self.tunnel(roots, echoPort)
        self.assertEqual(peerCertificate(new), second[0])
        self.assertEqual(peerCertificate(old), first[0])
        yield self.roundTrip(old, oldSink, b"after, on the old connection")
        yield self.roundTrip(new, newSink, b"after, on a new one")

    @defer.inlineCallbacks
    def test_caDownDuringRenewal(self) -> Any:
        """
        With Pebble stopped when renewal is due, TP logs, keeps serving the
        certificate it has, and renews once Pebble is back (the retry
        comes on the backoff schedule).
        """
        clock = task.Clock()
        clock.advance(time.time())
        yield self.startTP(["http-01"], clock)
        _, first = yield self.issued.get()
        roots = yield self.pebble.roots()
        yield self.pebble.stop()
        clock.advance(renewalTime(first[0], 2 / 3) - clock.seconds() + self.config.acme.checkInterval)
        for _ in range(500):
            if any("Could not renew" in w for w in self.warnings):
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(any("Could not renew the certificate of tp.test" in w for w in self.warnings), self.warnings)
        echoPort, _ = listenLocal(self, Echo)
        end, sink = yield self.tunnel(roots, echoPort)
        self.assertEqual(peerCertificate(end), first[0])
        yield self.roundTrip(end, sink, b"served while the CA is down")
        yield self.pebble.restart()
        clock.advance(60)
        _, second = yield self.issued.get()
        self.assertNotEqual(second[0].serial_number, first[0].serial_number)
        yield self.assertServedAndVerifies(second)


class QuicCertificateSwapTests(SynchronousTestCase):
    def test_newConnectionsOnly(self) -> None:
        """
        The QUIC listener's new configuration carries the new certificate;
        the one live connections were made with is left as it was.
        """
        from tpproxy.transports.quic import ClientVerifier, QuicListener, serverConfiguration

        pki = TestPKI.create(self.mktemp())
        d = pki.directory
        chain, key = loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key"))
        verifier = ClientVerifier([pki.ca.cert], ClientCertChecker(frozenset(), frozenset(), ()), task.Clock())
        listener = QuicListener(task.Clock(), serverConfiguration(chain, key), verifier, None)
        old = listener.configuration
        renewed = pki.ca.issue("localhost", dns=("localhost",), server=True)
        listener.setCertificate([renewed.cert, pki.ca.cert], renewed.key)
        self.assertEqual(listener.configuration.certificate, renewed.cert)
        self.assertEqual(listener.configuration.certificate_chain, [pki.ca.cert])
        self.assertIs(listener.configuration.private_key, renewed.key)
        self.assertEqual(old.certificate, chain[0])
        self.assertIs(old.private_key, key)
        self.assertEqual(listener.configuration.alpn_protocols, old.alpn_protocols)


class PebbleMidOrderTests(PebbleTestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_caStopsMidOrder(self) -> Any:
        """
        Pebble dies while a renewal order is in flight (as its validator
        is about to fetch the challenge): the order fails, TP keeps serving
        the certificate it has, and the retry after pebble's restart (a new
        pebble that forgot TP's account) renews.
        """
        clock = task.Clock()
        clock.advance(time.time())
        yield self.startTP(["http-01"], clock)
        _, first = yield self.issued.get()
        roots = yield self.pebble.roots()
        responder = self.issuing.http01
        original = responder.start
        stopping: list[Any] = []

        def startThenDie(name: str, token: str, keyAuthz: str) -> None:
            original(name, token, keyAuthz)
            if not stopping:
                stopping.append(self.pebble.stop())

        responder.start = startThenDie
        clock.advance(renewalTime(first[0], 2 / 3) - clock.seconds() + 1)
        # Bounded by a minute of wall time: on a loaded machine the order,
        # the challenge and pebble's death take seconds.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any("Could not renew the certificate of tp.test" in w for w in self.warnings):
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(len(stopping), 1)
        self.assertTrue(any("Could not renew the certificate of tp.test" in w for w in self.warnings), self.warnings)
        self.assertEqual(responder.tokens, {})
        echoPort, _ = listenLocal(self, Echo)
        end, sink = yield self.tunnel(roots, echoPort)
        self.assertEqual(peerCertificate(end), first[0])
        yield self.roundTrip(end, sink, b"served while the CA died mid-order")
        yield stopping[0]
        yield self.pebble.restart()
        clock.advance(60)
        _, second = yield self.issued.get()
        self.assertNotEqual(second[0].serial_number, first[0].serial_number)
        yield self.assertServedAndVerifies(second)


class TwistWithACMETests(PebbleTestCase):
    @defer.inlineCallbacks
    def test_twistProcess(self) -> Any:
        """
        C{twist tp --config FILE} with an C{[acme]} table and no server
        certificate: the real process gets its certificate from Pebble by
        tls-alpn-01, stores it, and serves it.
        """
        from tpproxy.test.support import Background, twistCommand, waitForPort

        self.pebble = yield Pebble.start(self, self.httpPort, self.tlsPort)
        store = Path(self.mktemp()).absolute()
        path = self.pki.directory / "acme.toml"
        path.write_text(
            f"""
[server]
listen = "tcp:{self.tlsPort}:interface=127.0.0.1"
client_ca = "ca.pem"
quic = false

[[rules]]
identities = "*"
hosts = ["127.0.0.0/8"]
ports = "*"

[acme]
directory = "{self.pebble.directory}"
ca_bundle = "{self.pebble.caBundle}"
names = ["tp.test"]
store = "{store}"
"""
        )
        server = Background(self, twistCommand() + ["tp", "--config", str(path)])
        yield waitForPort(self.tlsPort)
        for _ in range(300):
            if (store / "tp.test.pem").exists():
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertTrue((store / "tp.test.pem").exists(), server.stderr.decode(errors="replace")[-3000:])
        chain = x509.load_pem_x509_certificates((store / "tp.test.pem").read_bytes())
        yield self.assertServedAndVerifies(chain)
        roots = yield self.pebble.roots()
        echoPort, _ = listenLocal(self, Echo)
        for _ in range(100):
            # The store is written just before the listener swaps contexts.
            end, sink = yield self.tunnel(roots, echoPort)
            if peerCertificate(end) == chain[0]:
                break
            end.transport.abortConnection()
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(peerCertificate(end), chain[0])
        yield self.roundTrip(end, sink, b"through twist tp with ACME")
        self.assertEqual(stat.S_IMODE(os.stat(store / "account.key").st_mode), 0o600)


class StallTests(TestCase):
    @defer.inlineCallbacks
    def test_stalledBodyCutOff(self) -> Any:
        """
        A CA that sends its headers and then stalls mid-body is cut off
        after the request timeout, with a clear error.
        """
        from twisted.internet.protocol import Factory, Protocol

        from tpproxy.acme.client import AcmeClient

        class Staller(Protocol):
            def dataReceived(self, data: bytes) -> None:
                if b"\r\n\r\n" in data:
                    self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")

        port = reactor.listenTCP(0, Factory.forProtocol(Staller), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = AcmeClient(f"http://127.0.0.1:{port.getHost().port}/dir", newKey(), reactor)
        client.timeout = 0.5
        started = time.monotonic()
        failure = yield self.assertFailure(client.register(), AcmeError)
        self.assertIn("stalled", str(failure))
        self.assertLess(time.monotonic() - started, 5)
