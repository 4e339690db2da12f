"""
Tests for L{tpproxy.verify}: TP's TLS and QUIC listeners give every client
certificate the same verdict, with the same TLS alert, and C{tp} turns each
refusal into one readable line.

The corpus is made at test time; each certificate is tried in a real TLS
handshake against L{tpproxy.transports.servertls.ServerTLS} and in a real aioquic handshake
against TP's QUIC listener, both on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tpproxy.pki import certPEM, loadCertificates, serialHex
from tpproxy.protocols.client import ServerAddress, TLSClientEndpoint, TunnelError, openTunnel
from tpproxy.service import makeQuicListener, makeServerFactory
from tpproxy.test.support import HashSink, auditObserver, closeAtEnd, deferLater, listenLocal
from tpproxy.test.test_reverse import ControlClient, ReverseTestCase
from tpproxy.testing import TestPKI
from tpproxy.transports.quic import clientConfiguration, connectQuic
from tpproxy.transports.tls import clientTLS
from tpproxy.verify import HUMAN_REASONS, quictls
from tpproxy.wire import ClientHello

A = quictls.AlertDescription
NOW = datetime.datetime.now(datetime.timezone.utc)


def _cert(
    subject: str,
    issuer: x509.Name,
    issuerKey: Any,
    key: Any,
    *,
    ca: bool = False,
    pathlen: int | None = None,
    eku: tuple[Any, ...] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    aki: bool = True,
    notBefore: datetime.datetime | None = None,
    notAfter: datetime.datetime | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore or NOW - datetime.timedelta(minutes=5))
        .not_valid_after(notAfter or NOW + datetime.timedelta(hours=12))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=pathlen if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if aki:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuerKey.public_key()), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder.sign(issuerKey, hashes.SHA256())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


#: Each case: its expected verdict (None: accepted; else the alert).
EXPECTED: dict[str, Any] = {
    "valid": None,
    "noAKI": None,
    "intermediateAllowed": None,
    "caLeaf": A.bad_certificate,
    "serverAuthOnly": A.unsupported_certificate,
    "expired": A.certificate_expired,
    "notYetValid": A.bad_certificate,
    "selfSigned": A.unknown_ca,
    "sameNameOtherKey": A.unknown_ca,
    "revoked": A.certificate_revoked,
    "deniedSerial": A.certificate_revoked,
    "deniedIdentity": A.certificate_revoked,
    "pathlenForbidden": A.unknown_ca,
    "weakKey": A.bad_certificate,
}


def makeCorpus(pki: TestPKI) -> tuple[dict[str, tuple[list[x509.Certificate], Any]], list[x509.Certificate], dict[str, Any]]:
    """
    The certificates of L{EXPECTED} (chain, key), the extra client CA
    they need, and the server tables (CRL, deny list) that refuse some.
    """
    root, rootKey = pki.ca.cert, pki.ca.key  # pathlen 0: no intermediates
    corpus: dict[str, tuple[list[x509.Certificate], Any]] = {}

    def leaf(name: str, **kw: Any) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        corpus[name] = ([_cert(name, root.subject, rootKey, key, **kw)], key)

    leaf("valid")
    leaf("noAKI", aki=False)
    leaf("caLeaf", ca=True, pathlen=0)
    leaf("serverAuthOnly", eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    leaf("expired", notBefore=NOW - datetime.timedelta(days=2), notAfter=NOW - datetime.timedelta(days=1))
    leaf("notYetValid", notBefore=NOW + datetime.timedelta(days=1), notAfter=NOW + datetime.timedelta(days=2))
    leaf("revoked")
    leaf("deniedSerial")
    leaf("deniedIdentity")
    weak = rsa.generate_private_key(65537, 1024)
    corpus["weakKey"] = ([_cert("weakKey", root.subject, rootKey, weak)], weak)
    key = ec.generate_private_key(ec.SECP256R1())
    corpus["selfSigned"] = ([_cert("selfSigned", _name("selfSigned"), key, key)], key)
    impostorKey = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    corpus["sameNameOtherKey"] = ([_cert("sameNameOtherKey", root.subject, impostorKey, key)], key)
    # An intermediate under the pathlen-0 root: refused.
    interKey = ec.generate_private_key(ec.SECP256R1())
    inter = _cert("TP forbidden intermediate", root.subject, rootKey, interKey, ca=True, pathlen=0, eku=None)
    key = ec.generate_private_key(ec.SECP256R1())
    corpus["pathlenForbidden"] = ([_cert("pathlenForbidden", inter.subject, interKey, key), inter], key)
    # A device CA as they come: a root that allows one intermediate.
    openKey = ec.generate_private_key(ec.SECP256R1())
    openRoot = _cert("TP device root", _name("TP device root"), openKey, openKey, ca=True, pathlen=1, eku=None)
    issuingKey = ec.generate_private_key(ec.SECP256R1())
    issuing = _cert("TP device issuing CA", openRoot.subject, openKey, issuingKey, ca=True, pathlen=0, eku=None)
    key = ec.generate_private_key(ec.SECP256R1())
    corpus["intermediateAllowed"] = ([_cert("intermediateAllowed", issuing.subject, issuingKey, key), issuing], key)

    crl = pki.ca.crl([corpus["revoked"][0][0].serial_number])
    (pki.directory / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    tables = {
        "crl": "crl.pem",
        "deny": {"serials": [serialHex(corpus["deniedSerial"][0][0].serial_number)], "identities": ["deniedIdentity"]},
    }
    return corpus, [openRoot], tables


@implementer(IOpenSSLClientConnectionCreator)
class WeakKeyClientTLS:
    """
    TLS 1.3 client connections (ALPN C{tp/1}, TP's certificate verified)
    at OpenSSL security level 0, so that the client may present a key its
    own OpenSSL would otherwise refuse to use: the server must judge it.
    """

    def __init__(self, cas: list[x509.Certificate], chain: list[x509.Certificate], key: Any) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        ctx.use_certificate(crypto.X509.from_cryptography(chain[0]))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
        for ca in cas:
            ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(ca))
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errnum, depth, ok: bool(ok))
        ctx.set_alpn_protos([b"tp/1"])
        self.context = ctx

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(tlsProtocol)
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        return conn


class CorpusTestCase(TestCase):
    """
    TP on TLS and QUIC (same port number of 127.0.0.1) with the client CAs,
    CRL and deny list of the corpus (L{makeCorpus}).
    """

    timeout = 120

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.corpus, extraCAs, tables = makeCorpus(self.pki)
        cas = self.pki.directory / "client-cas.pem"
        cas.write_bytes(self.pki.ca.certPEM + b"".join(certPEM(c) for c in extraCAs))
        self.config = self.pki.serverConfig(client_ca=str(cas), **tables)
        factory = makeServerFactory(self.config, reactor)
        tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(tcp.stopListening)
        self.port = tcp.getHost().port
        listener = makeQuicListener(self.config, reactor, factory.wrappedFactory)
        udp = reactor.listenUDP(self.port, listener, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        self.serverCAs = loadCertificates(self.pki.caPath)
        self.sinkPort, self.sink = listenLocal(self, HashSink)
        self.observer = auditObserver(self)


class VerdictTests(CorpusTestCase):
    """
    The same verdict over TLS and QUIC for each certificate of the corpus.
    """

    def details(self, quic: bool) -> list[str]:
        """
        The reasons of the refused handshakes TP logged, on QUIC or TLS.
        """
        return sorted(
            e.get("detail", "")
            for e in self.observer
            if e.get("log_namespace") == "tpproxy.audit" and e.get("result") == "handshake_failed" and (e.get("event") == "quic") == quic
        )

    @defer.inlineCallbacks
    def tlsVerdict(self, name: str, chain: list[x509.Certificate], key: Any) -> Any:
        """
        Open a tunnel over TLS; return None if it opened, else the alert TP
        refused the certificate with (or the error's text).
        """
        options = clientTLS("localhost", self.serverCAs, chain, key) if name != "weakKey" else WeakKeyClientTLS(self.serverCAs, chain, key)
        try:
            end = yield openTunnel(reactor, ServerAddress("127.0.0.1", self.port), options, ClientHello.connect("127.0.0.1", self.sinkPort), 10)
        except TunnelError as e:
            return e.alert if e.alert is not None else str(e)
        end.transport.abortConnection()
        return None

    @defer.inlineCallbacks
    def quicVerdict(self, chain: list[x509.Certificate], key: Any) -> Any:
        """
        Open a tunnel over QUIC; return None if it opened, else the alert
        TP closed the connection with (or the error's text).
        """
        from tpproxy.connector import quicRefusal
        from tpproxy.protocols.client import TPClientProtocol

        session = connectQuic(reactor, ("127.0.0.1", self.port), clientConfiguration("localhost", self.serverCAs, chain, key))

        closeAtEnd(self, session)
        try:
            yield session.ready.addTimeout(10, reactor)
            ready: defer.Deferred[Any] = defer.Deferred()
            session.openStream(TPClientProtocol(ClientHello.connect("127.0.0.1", self.sinkPort), ready))
            end = yield ready.addTimeout(10, reactor)
        except (TunnelError, ConnectionError, Exception) as e:
            yield session.done.addTimeout(10, reactor)
            refused = quicRefusal(session)
            return refused.alert if refused is not None else str(e)
        end.transport.abortConnection()
        return None

    @defer.inlineCallbacks
    def test_sameVerdict(self) -> Any:
        """
        For each certificate of the corpus, TLS and QUIC accept both or
        refuse both with the same alert and the same logged reason, and
        that verdict is the expected one.
        """
        self.assertEqual(set(self.corpus), set(EXPECTED))
        seen: dict[str, tuple[Any, Any]] = {}
        for name, (chain, key) in sorted(self.corpus.items()):
            tls = yield self.tlsVerdict(name, chain, key)
            quic = yield self.quicVerdict(chain, key)
            seen[name] = (tls, quic)
        differ = {n: v for n, v in seen.items() if v[0] != v[1]}
        self.assertEqual(differ, {}, f"TLS and QUIC disagree (tls, quic): {differ}")
        self.assertEqual({n: v[0] for n, v in seen.items()}, EXPECTED)
        # The logged reasons are the same too (one verifier).
        # QUIC's server logs a refusal when its closing period ends: wait
        # for all of them (bounded).
        refusals = len([e for e in EXPECTED.values() if e is not None])
        deadline = reactor.seconds() + 15
        while len(self.details(True)) < refusals and reactor.seconds() < deadline:
            yield deferLater(0.05)
        tlsReasons, quicReasons = self.details(False), self.details(True)
        self.assertEqual(len(tlsReasons), len([e for e in EXPECTED.values() if e is not None]))
        self.assertEqual(tlsReasons, quicReasons, f"{tlsReasons}\n{quicReasons}")

    @defer.inlineCallbacks
    def test_noCertificate(self) -> Any:
        """
        No client certificate: C{certificate_required} on both.
        """
        from twisted.internet import ssl

        from tpproxy.connector import quicRefusal
        from tpproxy.transports.quic import QuicConfiguration

        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(certPEM(c)) for c in self.serverCAs])
        options = ssl.optionsForClientTLS("localhost", trustRoot=trust, acceptableProtocols=[b"tp/1"])
        try:
            yield openTunnel(reactor, ServerAddress("127.0.0.1", self.port), options, ClientHello.connect("127.0.0.1", self.sinkPort), 10)
        except TunnelError as e:
            tls = e.alert
        else:
            self.fail("TLS accepted no certificate")
        config = QuicConfiguration(is_client=True, alpn_protocols=["tp/1"], server_name="localhost")
        config.cadata = b"".join(certPEM(c) for c in self.serverCAs)
        session = connectQuic(reactor, ("127.0.0.1", self.port), config)
        self.addCleanup(lambda: (session.socket.stop(), session.abandon()))
        yield session.done.addTimeout(10, reactor)
        refused = quicRefusal(session)
        self.assertEqual((tls, refused.alert if refused else None), (A.certificate_required, A.certificate_required))


class HumanReasonTests(SynchronousTestCase):
    """
    The lines C{tp} prints for a refused certificate.
    """

    def test_openSSLAlerts(self) -> None:
        """
        OpenSSL's error for a received alert becomes the alert's line, with
        no OpenSSL text in it.
        """
        from tpproxy.protocols.client import certificateRefusal
        from tpproxy.transports.tls import receivedAlert

        for text, alert in [
            ("tls alert certificate revoked", A.certificate_revoked),
            ("tls alert certificate expired", A.certificate_expired),
            ("tlsv1 alert unknown ca", A.unknown_ca),
            ("tls alert bad certificate", A.bad_certificate),
            ("tlsv13 alert certificate required", A.certificate_required),
            ("tlsv1 alert access denied", A.access_denied),
        ]:
            error = certificateRefusal(receivedAlert(SSL.Error([("SSL routines", "", text)])))
            assert error is not None, text
            self.assertEqual((error.alert, str(error)), (alert, "TP refused the TLS connection: " + HUMAN_REASONS[alert]))
            self.assertNotIn("alert", str(error))
            self.assertNotIn("\n", str(error))
        self.assertIsNone(receivedAlert(SSL.Error([("SSL routines", "", "certificate verify failed")])))
        self.assertIsNone(certificateRefusal(int(A.close_notify)))


class ClientMessageTests(CorpusTestCase):
    """
    C{tp connect} prints one line a person can act on for each refusal, on
    TLS and on QUIC, with no OpenSSL, cryptography or aioquic text.
    """

    @defer.inlineCallbacks
    def test_printedReasons(self) -> Any:
        """
        A real C{tp connect} (its own process) with a deny-listed, revoked,
        expired, pathlen-forbidden or CA:TRUE certificate ends with the
        line of its alert, over C{--transport tls} and C{quic} alike.
        """
        from tpproxy.test.support import run, tpCommand
        from tpproxy.test.test_integration import writeClientConfig

        expected = {
            "deniedIdentity": "the client certificate is revoked or on TP's deny list",
            "revoked": "the client certificate is revoked or on TP's deny list",
            "expired": "the client certificate has expired",
            "pathlenForbidden": "the client certificate is not from a CA that TP trusts, or its chain is incomplete or not allowed",
            "caLeaf": "the client certificate is not valid yet, is a CA certificate, or names no identity",
        }
        printed: dict[tuple[str, str], str] = {}
        for name in expected:
            chain, key = self.corpus[name]
            certPath, keyPath = self.pki.directory / f"{name}.pem", self.pki.directory / f"{name}.key"
            certPath.write_bytes(b"".join(certPEM(c) for c in chain))
            keyPath.write_bytes(
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            )
            config = writeClientConfig(self.pki, self.port, str(certPath), str(keyPath), name=f"{name}.toml")
            for transport in ("tls", "quic"):
                result = yield run(
                    tpCommand() + ["--config", config, "--transport", transport, "connect", f"127.0.0.1:{self.sinkPort}"], stdin=b"x"
                )
                self.assertEqual(result.status, 1, result)
                lines = result.err.decode().splitlines()
                for banned in ("alert", "OpenSSL", "SSL routines", "Error:", "validation failed", "Traceback"):
                    self.assertNotIn(banned, result.err.decode(), (name, transport, lines))
                printed[(name, transport)] = lines[-1]
        self.assertEqual(
            printed,
            {
                (name, transport): f"tp: TP refused the {transport.upper()} connection: {why}"
                for name, why in expected.items()
                for transport in ("tls", "quic")
            },
        )
        self.assertEqual(self.sink.accepted, 0)


class ExposeMessageTests(CorpusTestCase):
    """
    C{tp expose} prints the same one line as C{tp connect} when TP refuses
    its certificate, on TLS and QUIC.
    """

    @defer.inlineCallbacks
    def test_refusedExposer(self) -> Any:
        from tpproxy.test.support import run, tpCommand
        from tpproxy.test.test_integration import writeClientConfig

        chain, key = self.corpus["revoked"]
        certPath, keyPath = self.pki.directory / "revoked.pem", self.pki.directory / "revoked.key"
        certPath.write_bytes(b"".join(certPEM(c) for c in chain))
        keyPath.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        config = writeClientConfig(self.pki, self.port, str(certPath), str(keyPath), name="revoked-expose.toml")
        for transport in ("tls", "quic"):
            result = yield run(tpCommand() + ["--config", config, "--transport", transport, "expose", "127.0.0.1:9", "--e2e", "x.localhost"], stdin=b"")
            self.assertNotEqual(result.status, 0, result)
            err = result.err.decode()
            for banned in ("alert", "OpenSSL", "SSL routines", "Error:", "Traceback"):
                self.assertNotIn(banned, err, (transport, err))
            self.assertEqual(
                err.splitlines()[-1],
                f"tp: TP refused the {transport.upper()} connection: the client certificate is revoked or on TP's deny list",
            )


class AlertTableTests(SynchronousTestCase):
    """
    QUIC sends the alert OpenSSL sends on TLS for the same refusal code.
    """

    def test_alertForMatchesOpenSSL(self) -> None:
        """
        For every C{X509_V_ERR_*} code from 1 to 99, L{alertFor} names the
        alert a real (in-memory) TLS handshake refused with that code ends
        with at the client.
        """
        from tpproxy.verify import alertFor, refusedHandshake

        differ = {}
        for code in range(1, 100):
            received = refusedHandshake(code)
            match = re.search(r"alert ([a-z ]+)'", received)
            alert = A.__members__.get(match.group(1).replace(" ", "_")) if match else None
            if alert != alertFor(code):
                differ[code] = (received, alertFor(code))
        self.assertEqual(differ, {})


class FailClosedTests(SynchronousTestCase):
    """
    TP refuses to serve if its private-binding hooks would not work.
    """

    def test_missingBinding(self) -> None:
        """
        A binding TP needs that this pyOpenSSL lacks stops the import check.
        """
        from tpproxy import verify

        self.patch(verify, "_REQUIRED_LIB", verify._REQUIRED_LIB + ("X509_no_such_function",))
        e = self.assertRaises(ImportError, verify._checkBindings)
        self.assertIn("X509_no_such_function", str(e))

    def test_selfCheckObservesTheAlert(self) -> None:
        """
        The self-check fails when the refusal does not reach the client as
        C{certificate_revoked} (here: the code of another alert), and
        L{ServerTLS} then cannot be made.
        """
        from tpproxy import verify
        from tpproxy.transports.servertls import ServerTLS

        self.patch(verify, "_selfChecked", False)
        self.patch(verify, "X509_V_ERR_CERT_REVOKED", verify.X509_V_ERR_CERT_REJECTED)
        e = self.assertRaises(RuntimeError, verify.selfCheck)
        self.assertIn("bad certificate", str(e))
        pki = TestPKI.create(self.mktemp())
        self.assertRaises(RuntimeError, ServerTLS, [pki.ca.cert], pki.ca.key, [pki.ca.cert], verify.ClientCertChecker())
        self.patch(verify, "X509_V_ERR_CERT_REVOKED", 23)
        verify.selfCheck()
        self.assertTrue(verify._selfChecked)


class DialRefusalTests(ReverseTestCase):
    """
    An identity that may not dial an E2E name is refused in the inner
    handshake with C{handshake_failure}, and C{tp} says so in one line.
    """

    def setUp(self) -> None:
        super().setUp()
        self.startWithExposures([{"identities": ["alice"], "names": "secret.localhost", "dialers": ["alice"]}])

    def opts(self, who: str, sni: str) -> Any:
        return self.tlsOptions(who, sni)

    @defer.inlineCallbacks
    def test_notADialer(self) -> Any:
        """
        mallory's tunnel to alice's C{secret.localhost} fails with the line
        of C{handshake_failure} (was: OpenSSL's C{internal error} text), and
        TP logs the dialer refusal.
        """
        factory = protocol.Factory.forProtocol(lambda: ControlClient(ClientHello("listen", mode="e2e", name="secret.localhost")))
        endpoint = TLSClientEndpoint(reactor, ServerAddress("localhost", self.port), self.opts("alice", "localhost"))
        control = yield endpoint.connect(factory)
        self.addCleanup(lambda: control.lost.called or control.transport.abortConnection())
        self.assertTrue((yield control.answer).ok)
        tunnel = openTunnel(
            reactor,
            ServerAddress("localhost", self.port),
            self.opts("mallory", "localhost"),
            ClientHello.connect("secret.localhost", 443),
            innerTLS=lambda name: self.opts("mallory", name),
            timeout=5,
        )
        error = yield self.assertFailure(tunnel, TunnelError)
        self.assertEqual(
            (error.alert, str(error)), (A.handshake_failure, "TP refused the E2E TLS connection to secret.localhost: " + HUMAN_REASONS[A.handshake_failure])
        )
        deadline = reactor.seconds() + 10
        while not any("not allowed to dial secret.localhost" in (e.get("detail") or "") for e in self.observer):
            self.assertLess(reactor.seconds(), deadline, "no audit event of the dialer refusal")
            yield deferLater(0.05)


class ClockTests(SynchronousTestCase):
    """
    The QUIC verifier judges validity at its clock's time (tests and fake
    reactors drive it), as TLS does at the real time.
    """

    def test_clock(self) -> None:
        """
        A certificate valid for 12 hours is accepted at issue time and
        refused as expired, with OpenSSL's code, two days later on the
        same verifier.
        """
        from twisted.internet.task import Clock

        from tpproxy.verify import ClientCertChecker, ClientVerifier

        pki = TestPKI.create(self.mktemp())
        issued = pki.ca.issue("alice", client=True)
        clock = Clock()
        clock.advance(datetime.datetime.now(datetime.timezone.utc).timestamp())
        verifier = ClientVerifier([pki.ca.cert], ClientCertChecker(), clock)
        self.assertIsNone(verifier.check(issued.cert, []))
        clock.advance(2 * 86400)
        refused = verifier.check(issued.cert, [])
        assert refused is not None
        self.assertEqual((refused.code, refused.alert), (10, A.certificate_expired))
        clock.advance(-2 * 86400 - 3600)
        refused = verifier.check(issued.cert, [])
        assert refused is not None
        self.assertEqual((refused.code, refused.alert), (9, A.bad_certificate))
