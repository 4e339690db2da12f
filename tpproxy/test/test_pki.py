"""
Tests for L{tpproxy.pki} (identities from certificates, the dev CA) and for
L{tpproxy.verify.ClientCertChecker} (deny lists and CRLs).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.pki import CertificateAuthority, PeerIdentity, identityOf, newKey, serialHex, writePrivate
from tpproxy.verify import ClientCertChecker

CA = CertificateAuthority.create("TP test CA")


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def bareCert(subject: x509.Name, sans: list[x509.GeneralName] | None = None, serial: int = 4242) -> x509.Certificate:
    """
    A certificate signed by L{CA} with exactly C{subject} and C{sans}, for
    shapes that L{CertificateAuthority.issue} does not make.
    """
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(CA.cert.subject)
        .public_key(newKey().public_key())
        .serial_number(serial)
        .not_valid_before(now() - datetime.timedelta(minutes=1))
        .not_valid_after(now() + datetime.timedelta(hours=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(CA.key, hashes.SHA256())


class IdentityTests(SynchronousTestCase):
    def test_uriFirst(self) -> None:
        """
        A SAN URI wins over e-mail, DNS name and common name; the first URI
        is taken.
        """
        cert = CA.issue(
            "cn-name",
            uris=("spiffe://example.org/ns/prod/sa/web", "https://example.org/other"),
            emails=("alice@example.org",),
            dns=("web.example.org",),
        ).cert
        identity = identityOf(cert)
        self.assertEqual(identity.name, "spiffe://example.org/ns/prod/sa/web")
        self.assertEqual(
            identity.names,
            (
                "spiffe://example.org/ns/prod/sa/web",
                "https://example.org/other",
                "alice@example.org",
                "web.example.org",
                "cn-name",
            ),
        )

    def test_emailSecond(self) -> None:
        """
        Without a URI, the first SAN e-mail address is the identity.
        """
        cert = CA.issue("cn-name", emails=("alice@example.org", "a@example.net"), dns=("web.example.org",)).cert
        self.assertEqual(identityOf(cert).name, "alice@example.org")

    def test_dnsThird(self) -> None:
        """
        Without a URI or e-mail, the first SAN DNS name is the identity.
        """
        cert = CA.issue("cn-name", dns=("b.example.org", "a.example.org")).cert
        self.assertEqual(identityOf(cert).name, "b.example.org")

    def test_commonNameLast(self) -> None:
        """
        Without SAN names, the subject common name is the identity; IP SANs
        do not count as names.
        """
        self.assertEqual(identityOf(CA.issue("alice").cert).name, "alice")
        cert = CA.issue("alice", ips=("192.0.2.1",)).cert
        self.assertEqual(identityOf(cert), PeerIdentity("alice", serialHex(cert.serial_number), ("alice",)))

    def test_precedenceIndependentOfOrder(self) -> None:
        """
        The kind decides, not the order of names in the extension.
        """
        sans: list[x509.GeneralName] = [
            x509.DNSName("dns.example"),
            x509.RFC822Name("mail@example.org"),
            x509.UniformResourceIdentifier("spiffe://example.org/x"),
        ]
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cn")])
        self.assertEqual(identityOf(bareCert(name, sans)).name, "spiffe://example.org/x")
        self.assertEqual(identityOf(bareCert(name, sans[:2])).name, "mail@example.org")

    def test_firstCommonName(self) -> None:
        """
        With several common names, the first is the identity.
        """
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "first"), x509.NameAttribute(NameOID.COMMON_NAME, "second")]
        )
        self.assertEqual(identityOf(bareCert(name)).name, "first")

    def test_noName(self) -> None:
        """
        A certificate with none of these names has no identity.
        """
        org = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example")])
        for cert in (
            bareCert(org),
            bareCert(x509.Name([])),
            bareCert(org, [x509.IPAddress(ipaddress.ip_address("192.0.2.1"))]),
        ):
            e = self.assertRaises(ValueError, identityOf, cert)
            self.assertEqual(str(e), "certificate carries no SAN URI, e-mail, DNS name or common name")

    def test_serial(self) -> None:
        """
        The serial is lowercase hexadecimal without leading zeros.
        """
        self.assertEqual(serialHex(255), "ff")
        self.assertEqual(serialHex(0x0A0B), "a0b")
        self.assertEqual(serialHex(0), "0")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s")])
        self.assertEqual(identityOf(bareCert(name, serial=0x00ABCDEF)).serial, "abcdef")
        cert = CA.issue("x").cert
        self.assertEqual(identityOf(cert).serial, format(cert.serial_number, "x"))


class CertificateAuthorityTests(SynchronousTestCase):
    def test_create(self) -> None:
        """
        A new CA is a self-signed CA certificate that may sign certificates
        and CRLs.
        """
        ca = CertificateAuthority.create("My CA", days=30)
        cert = ca.cert
        self.assertEqual(cert.subject, cert.issuer)
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "My CA")
        cert.verify_directly_issued_by(cert)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertTrue(bc.value.ca)
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(ku.key_cert_sign)
        self.assertTrue(ku.crl_sign)
        lifetime = cert.not_valid_after_utc - now()
        self.assertTrue(datetime.timedelta(days=29) < lifetime <= datetime.timedelta(days=30), lifetime)
        self.assertLessEqual(cert.not_valid_before_utc, now())

    def test_issueClient(self) -> None:
        """
        A client certificate is signed by the CA, is no CA, has the client
        EKU only, and lives 12 hours by default.
        """
        issued = CA.issue("alice", client=True, uris=("spiffe://example.org/alice",))
        cert = issued.cert
        cert.verify_directly_issued_by(CA.cert)
        self.assertEqual(cert.issuer, CA.cert.subject)
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.CLIENT_AUTH])
        lifetime = cert.not_valid_after_utc - now()
        self.assertTrue(datetime.timedelta(hours=11, minutes=59) < lifetime <= datetime.timedelta(hours=12), lifetime)
        self.assertLess(cert.not_valid_before_utc, now())
        self.assertEqual(issued.key.public_key().public_numbers(), cert.public_key().public_numbers())

    def test_issueServer(self) -> None:
        """
        A server certificate has the server EKU and its DNS and IP SANs.
        """
        cert = CA.issue("localhost", dns=("localhost",), ips=("127.0.0.1", "::1"), server=True).cert
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
        )

    def test_issueBothOrNeither(self) -> None:
        """
        Both EKUs can be asked for; with neither there is no EKU extension,
        and without names no SAN extension.
        """
        cert = CA.issue("both", server=True, client=True).cert
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(set(eku), {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH})
        cert = CA.issue("neither").cert
        self.assertRaises(x509.ExtensionNotFound, cert.extensions.get_extension_for_class, x509.ExtendedKeyUsage)
        self.assertRaises(x509.ExtensionNotFound, cert.extensions.get_extension_for_class, x509.SubjectAlternativeName)

    def test_validity(self) -> None:
        """
        C{hours}, C{notBefore} and C{notAfter} set the validity period.
        """
        cert = CA.issue("short", hours=1).cert
        self.assertTrue(
            datetime.timedelta(minutes=59) < cert.not_valid_after_utc - now() <= datetime.timedelta(hours=1)
        )
        start = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        end = datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc)
        cert = CA.issue("old", notBefore=start, notAfter=end).cert
        self.assertEqual((cert.not_valid_before_utc, cert.not_valid_after_utc), (start, end))

    def test_uniqueSerials(self) -> None:
        """
        Each certificate gets its own serial.
        """
        serials = {CA.issue("s").cert.serial_number for _ in range(5)}
        self.assertEqual(len(serials), 5)

    def test_writeAndLoad(self) -> None:
        """
        An issued certificate and key are written as PEM, the key readable
        by its owner only; a CA loaded from files issues certificates its
        certificate verifies.
        """
        d = Path(self.mktemp())
        d.mkdir()
        issued = CA.issue("alice", client=True)
        issued.write(d / "alice.pem", d / "alice.key")
        self.assertEqual(x509.load_pem_x509_certificate((d / "alice.pem").read_bytes()), issued.cert)
        self.assertEqual(stat.S_IMODE(os.stat(d / "alice.key").st_mode), 0o600)
        key = serialization.load_pem_private_key((d / "alice.key").read_bytes(), None)
        self.assertEqual(key.public_key().public_numbers(), issued.cert.public_key().public_numbers())  # type: ignore[union-attr]

        (d / "ca.pem").write_bytes(CA.certPEM)
        writePrivate(d / "ca.key", CA.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        loaded = CertificateAuthority.load(d / "ca.pem", d / "ca.key")
        self.assertEqual(loaded.cert, CA.cert)
        loaded.issue("bob").cert.verify_directly_issued_by(CA.cert)

    def test_writePrivateMode(self) -> None:
        """
        L{writePrivate} leaves a file of mode 0600 with the data, also when
        it replaces a file that was readable by others, and whatever the
        umask.
        """
        d = Path(self.mktemp())
        d.mkdir()
        fresh = d / "fresh.key"
        old = os.umask(0)
        try:
            writePrivate(fresh, b"secret")
        finally:
            os.umask(old)
        self.assertEqual(fresh.read_bytes(), b"secret")
        self.assertEqual(stat.S_IMODE(os.stat(fresh).st_mode), 0o600)

        existing = d / "existing.key"
        existing.write_bytes(b"a much longer old content")
        os.chmod(existing, 0o644)
        writePrivate(existing, b"new")
        self.assertEqual(existing.read_bytes(), b"new")
        self.assertEqual(stat.S_IMODE(os.stat(existing).st_mode), 0o600)

    def test_crl(self) -> None:
        """
        A CRL names the CA as issuer, is signed by it and lists the revoked
        serials.
        """
        crl = CA.crl([1, 0xABCDEF, 2**150], days=3)
        self.assertEqual(crl.issuer, CA.cert.subject)
        self.assertTrue(crl.is_signature_valid(CA.cert.public_key()))  # type: ignore[arg-type]
        self.assertFalse(crl.is_signature_valid(CertificateAuthority.create().cert.public_key()))  # type: ignore[arg-type]
        self.assertEqual({r.serial_number for r in crl}, {1, 0xABCDEF, 2**150})
        self.assertIsNotNone(crl.get_revoked_certificate_by_serial_number(0xABCDEF))
        self.assertIsNone(crl.get_revoked_certificate_by_serial_number(2))
        assert crl.next_update_utc is not None
        self.assertTrue(datetime.timedelta(days=2) < crl.next_update_utc - now() <= datetime.timedelta(days=3))
        self.assertEqual(len(CA.crl([])), 0)


class ClientCertCheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cert = CA.issue("alice", client=True, uris=("spiffe://example.org/alice",)).cert
        self.serial = serialHex(self.cert.serial_number)

    def test_acceptable(self) -> None:
        """
        A certificate on no list is acceptable.
        """
        checker = ClientCertChecker(
            frozenset({"mallory", "alice"}), frozenset({"ff", "0"}), (CA.crl([self.cert.serial_number + 1]),)
        )
        self.assertIsNone(checker.refusal(self.cert))
        self.assertIsNone(ClientCertChecker().refusal(self.cert))

    def test_revoked(self) -> None:
        """
        A certificate whose serial its issuer's CRL lists is refused.
        """
        checker = ClientCertChecker(crls=(CA.crl([5, self.cert.serial_number]),))
        self.assertEqual(checker.refusal(self.cert), f"certificate serial {self.serial} is revoked (CRL)")

    def test_revokedByOtherIssuerOnly(self) -> None:
        """
        A CRL of another issuer does not revoke a certificate with the same
        serial number.
        """
        other = CertificateAuthority.create("Other CA")
        checker = ClientCertChecker(crls=(other.crl([self.cert.serial_number]),))
        self.assertIsNone(checker.refusal(self.cert))

    def test_severalCRLs(self) -> None:
        """
        Serials of several CRLs of one issuer are all revoked.
        """
        checker = ClientCertChecker(crls=(CA.crl([1]), CA.crl([self.cert.serial_number])))
        self.assertIn("is revoked (CRL)", checker.refusal(self.cert) or "")

    def test_deniedSerial(self) -> None:
        """
        A denied serial matches case-insensitively and with leading zeros.
        """
        for spelling in (self.serial, self.serial.upper(), "000" + self.serial, "00" + self.serial.upper()):
            checker = ClientCertChecker(deniedSerials=frozenset({"1234", spelling}))
            self.assertEqual(
                checker.refusal(self.cert), f"certificate serial {self.serial} is on the deny list", spelling
            )
        checker = ClientCertChecker(deniedSerials=frozenset({self.serial + "0", self.serial[1:]}))
        self.assertIsNone(checker.refusal(self.cert))

    def test_deniedSerialWithLeadingZeroNibble(self) -> None:
        """
        A serial whose hex form starts with 0 when written in whole bytes
        (as OpenSSL shows it) is denied.
        """
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "z")])
        cert = bareCert(name, serial=0x0ABC)
        checker = ClientCertChecker(deniedSerials=frozenset({"0ABC"}))
        self.assertEqual(checker.refusal(cert), "certificate serial abc is on the deny list")

    def test_deniedIdentity(self) -> None:
        """
        A certificate whose identity is denied is refused; the identity is
        the one policy sees.
        """
        checker = ClientCertChecker(deniedIdentities=frozenset({"spiffe://example.org/alice"}))
        self.assertEqual(checker.refusal(self.cert), "identity spiffe://example.org/alice is on the deny list")
        cn = CA.issue("mallory", client=True).cert
        checker = ClientCertChecker(deniedIdentities=frozenset({"mallory"}))
        self.assertEqual(checker.refusal(cn), "identity mallory is on the deny list")
        checker = ClientCertChecker(deniedIdentities=frozenset({"Mallory", "mallory2"}))
        self.assertIsNone(checker.refusal(cn))

    def test_noIdentity(self) -> None:
        """
        A certificate without an identity is refused, saying why.
        """
        cert = bareCert(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]))
        self.assertEqual(
            ClientCertChecker().refusal(cert), "certificate carries no SAN URI, e-mail, DNS name or common name"
        )

    def test_revocationFirst(self) -> None:
        """
        A revoked certificate is reported as revoked even when it is also
        denied.
        """
        checker = ClientCertChecker(
            frozenset({"spiffe://example.org/alice"}), frozenset({self.serial}), (CA.crl([self.cert.serial_number]),)
        )
        self.assertIn("revoked (CRL)", checker.refusal(self.cert) or "")
        checker = ClientCertChecker(frozenset({"spiffe://example.org/alice"}), frozenset({self.serial}))
        self.assertIn("on the deny list", checker.refusal(self.cert) or "")
        self.assertIn("serial", checker.refusal(self.cert) or "")
