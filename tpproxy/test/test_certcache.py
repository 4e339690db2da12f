"""
What TP remembers of certificates to spare work per connection (issue
17): parsed client certificates and their identities
(L{tpproxy.pki.certificateFromDER}, L{tpproxy.pki.identityOf}), and the
client's check of the server's name (L{tpproxy.transports.tls.ClientTLSCreator}).
Only pure functions of a certificate are remembered: every handshake is
still verified by OpenSSL, and the deny lists and CRLs are consulted anew.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL, crypto
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tpproxy import pki
from tpproxy.pki import PARSED_CERTIFICATES, certificateFromDER, certificateOf, identityOf, loadCertificates, loadKey
from tpproxy.testing import TestPKI, handshakeInMemory
from tpproxy.transports.tls import CHECKED_NAMES, clientTLS
from tpproxy.verify import ClientCertChecker, leafRefusal


def der(cert: Any) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)  # type: ignore[no-any-return]


class ParsedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())

    def cert(self, name: str, **kw: Any) -> Any:
        path, _ = self.pki.client(name, **kw)
        return loadCertificates(path)[0]

    def test_sameObject(self) -> None:
        """
        The same DER gives the same certificate object (so what
        cryptography parses lazily is parsed once); pyOpenSSL's X509 of it
        too.
        """
        alice = self.cert("alice")
        first = certificateFromDER(der(alice))
        self.assertEqual(first, alice)
        self.assertIs(certificateFromDER(der(alice)), first)
        self.assertIs(certificateOf(crypto.X509.from_cryptography(alice)), first)

    def test_bounded(self) -> None:
        """
        At most L{PARSED_CERTIFICATES} are kept, the least recently used
        going first.
        """
        self.patch(pki, "_parsed", pki.Recent(3))
        certs = [self.cert(f"user{i}") for i in range(4)]
        objects = [certificateFromDER(der(c)) for c in certs[:3]]
        certificateFromDER(der(certs[0]))  # used again: kept
        certificateFromDER(der(certs[3]))
        self.assertEqual(len(pki._parsed), 3)
        self.assertIs(certificateFromDER(der(certs[0])), objects[0])
        self.assertIsNot(certificateFromDER(der(certs[1])), objects[1])
        self.assertGreater(PARSED_CERTIFICATES, 100)

    def test_identities(self) -> None:
        """
        Each certificate keeps its own identity; one with none is refused
        every time, with the same reason.
        """
        alice, bob = certificateFromDER(der(self.cert("alice"))), certificateFromDER(der(self.cert("bob")))
        self.assertEqual((identityOf(alice).name, identityOf(bob).name, identityOf(alice).name), ("alice", "bob", "alice"))
        self.assertIs(identityOf(alice), identityOf(alice))
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        nameless = self.cert("alice")
        builder = x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no names")]))
        builder = builder.issuer_name(nameless.issuer).public_key(nameless.public_key()).serial_number(7)
        nameless = builder.not_valid_before(nameless.not_valid_before_utc).not_valid_after(nameless.not_valid_after_utc).sign(
            self.pki.ca.key, hashes.SHA256()
        )
        for _ in range(2):
            with self.assertRaises(ValueError) as e:
                identityOf(nameless)
            self.assertIn("no SAN", str(e.exception))

    def test_denyListStillConsulted(self) -> None:
        """
        A certificate parsed and accepted before is refused once its
        identity is deny-listed: only parsing is remembered.
        """
        alice = certificateFromDER(der(self.cert("alice")))
        self.assertIsNone(leafRefusal(ClientCertChecker(), alice))
        refused = leafRefusal(ClientCertChecker(deniedIdentities=frozenset({"alice"})), alice)
        self.assertIsNotNone(refused)
        self.assertIn("deny list", refused.reason)  # type: ignore[union-attr]


class FakeTLSProtocol:
    def __init__(self) -> None:
        self.failed: list[Failure] = []

    def failVerification(self, reason: Failure) -> None:
        self.failed.append(reason)


class ServerNameTests(SynchronousTestCase):
    """
    L{clientTLS}'s check of the server's name, remembered per certificate.
    """

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        d = self.pki.directory
        self.client = clientTLS("localhost", [self.pki.ca.cert], loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key")))
        self.good = (loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key")))
        issued = self.pki.ca.issue("elsewhere", dns=("elsewhere.example",), server=True)
        self.other = ([issued.cert], issued.key)

    def handshake(self, chain: Any, key: Any, client: Any = None) -> tuple[bool, FakeTLSProtocol]:
        """
        A TLS 1.3 handshake in memory between the client and a server
        presenting C{chain}; whether the client accepted it.
        """
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate(crypto.X509.from_cryptography(chain[0]))
        context.use_privatekey(crypto.PKey.from_cryptography_key(key))
        context.set_alpn_select_callback(lambda connection, offered: b"tp/1")
        server = SSL.Connection(context, None)
        server.set_accept_state()
        protocol = FakeTLSProtocol()
        self.server = server
        client = (client or self.client).clientConnectionForTLS(protocol)
        client.set_connect_state()
        if handshakeInMemory(server, client):
            return False, protocol
        # No error: the handshake must also be over (do_handshake returns).
        client.do_handshake()
        return True, protocol

    def test_remembered(self) -> None:
        """
        The server's certificate is checked once, then recognised.
        """
        self.assertEqual(len(self.client.checked), 0)
        ok, protocol = self.handshake(*self.good)
        self.assertTrue(ok)
        self.assertEqual(len(self.client.checked), 1)
        calls: list[object] = []
        check = self.client._check
        self.client._check = lambda cert: (calls.append(cert), check(cert))  # type: ignore[method-assign]
        ok, protocol = self.handshake(*self.good)
        self.assertTrue(ok)
        self.assertEqual((calls, protocol.failed), ([], []))
        self.assertGreater(CHECKED_NAMES, 1)

    def test_otherNameRefusedEveryTime(self) -> None:
        """
        A certificate of the same CA for another name is refused, before
        and after the right one was remembered, and is never remembered.
        """
        for chain, key in (self.other, self.good, self.other, self.other):
            ok, protocol = self.handshake(chain, key)
            if chain is self.good[0]:
                self.assertTrue(ok)
            else:
                self.assertFalse(ok)
                self.assertEqual(len(protocol.failed), 1)
                self.assertIn("DNSMismatch", str(protocol.failed[0].value))
        self.assertEqual(len(self.client.checked), 1)

    def test_ipAddressAsDNSNameRefused(self) -> None:
        """
        A certificate whose DNS name is an IP address (service_identity
        raises CertificateError on it) is refused for any server name;
        Twisted 26.10's own options accept it for every host.
        """
        issued = self.pki.ca.issue("odd", dns=("127.0.0.1",), server=True)
        for name in ("localhost", "127.0.0.1"):
            d = self.pki.directory
            client = clientTLS(name, [self.pki.ca.cert], loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key")))
            ok, protocol = self.handshake([issued.cert], issued.key, client)
            self.assertFalse(ok, name)
            self.assertEqual(len(client.checked), 0)

    def test_addressesAndSNI(self) -> None:
        """
        A server named by IP address is checked against the certificate's
        IP addresses and is sent no SNI; one named by DNS name gets it.
        """
        d = self.pki.directory
        for name, sni in (("127.0.0.1", None), ("::1", None), ("localhost", b"localhost")):
            client = clientTLS(name, [self.pki.ca.cert], loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key")))
            ok, protocol = self.handshake(*self.good, client=client)
            self.assertTrue(ok, name)
            self.assertEqual(self.server.get_servername(), sni)
        client = clientTLS("10.1.2.3", [self.pki.ca.cert], loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key")))
        ok, protocol = self.handshake(*self.good, client=client)
        self.assertFalse(ok)
        self.assertIn("IPAddressMismatch", str(protocol.failed[0].value))
