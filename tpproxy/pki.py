# -*- test-case-name: tpproxy.test.test_pki -*-
"""
Certificates: identities taken from client certificates, and a small dev CA
that makes the certificates of C{tp init-dev} and of the tests.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto


@dataclass(frozen=True)
class PeerIdentity:
    """
    Who a client certificate says the peer is.

    @ivar name: the identity policy rules match against (see L{identityOf}).
    @ivar serial: the certificate serial number, as lowercase hex.
    @ivar names: every name the certificate carries, for the audit log.
    """

    name: str
    serial: str
    names: tuple[str, ...]


def serialHex(serial: int) -> str:
    return format(serial, "x")


_HEX = re.compile(r"[0-9a-fA-F]+")


def normalizeSerial(text: str) -> str:
    """
    Normalize a serial number written in hex (C{:} separators allowed, case
    and leading zeros ignored) to the form of L{serialHex}.

    @raise ValueError: for anything else (C{0x} prefixes, spaces, ...).
    """
    digits = text.replace(":", "")
    if not _HEX.fullmatch(digits):
        raise ValueError(f"{text!r} is not a hexadecimal serial number")
    return serialHex(int(digits, 16))


class Recent(OrderedDict):  # type: ignore[type-arg]
    """
    A small least-recently-used map: at most C{size} entries.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def recall(self, key: Any) -> Any:
        """
        The value for C{key} (now the most recently used), or L{None}.
        """
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def remember(self, key: Any, value: Any) -> Any:
        """
        Keep C{value} for C{key}, forgetting the least recently used entry
        beyond C{size}; C{value}.
        """
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)
        return value


#: How many client certificates TP keeps parsed.  A device presents the
#: same certificate on every tunnel it opens for hours, and parsing it and
#: taking its identity through cryptography's objects again each time was
#: about a tenth of C{twist tp}'s CPU per connection (issue 17, measured).
PARSED_CERTIFICATES = 512
_parsed = Recent(PARSED_CERTIFICATES)
_identities = Recent(PARSED_CERTIFICATES)


def certificateFromDER(der: bytes) -> x509.Certificate:
    """
    The certificate of C{der}, parsed once while it is in use: the same
    (immutable) object for every connection that presents it, so that what
    cryptography parses lazily (extensions, names) is parsed once too.
    """
    cert = _parsed.recall(der)
    if cert is None:
        cert = _parsed.remember(der, x509.load_der_x509_certificate(der))
    return cert  # type: ignore[no-any-return]


def certificateOf(peer: Any) -> x509.Certificate:
    """
    L{certificateFromDER} for a pyOpenSSL C{X509} (what OpenSSL's verify
    callback and a TLS connection give); any other peer certificate (a
    QUIC stream's) by its C{to_cryptography()}.
    """
    if isinstance(peer, crypto.X509):
        return certificateFromDER(crypto.dump_certificate(crypto.FILETYPE_ASN1, peer))
    return peer.to_cryptography()  # type: ignore[no-any-return]


def identityOf(cert: x509.Certificate) -> PeerIdentity:
    """
    Take the identity from a client certificate (remembered for the
    certificates seen lately: L{PARSED_CERTIFICATES}).

    @raise ValueError: if the certificate carries no name to take.
    """
    known = _identities.recall(cert)
    if known is None:
        try:
            known = _identities.remember(cert, _identityOf(cert))
        except ValueError as e:
            known = _identities.remember(cert, e)
    if isinstance(known, ValueError):
        raise ValueError(*known.args)
    return known  # type: ignore[no-any-return]


def _identityOf(cert: x509.Certificate) -> PeerIdentity:
    """
    Take the identity from a client certificate.

    The identity is the first SAN URI if there is one (for instance a
    C{spiffe://} ID), else the first SAN e-mail address, else the first SAN
    DNS name, else the subject's common name.  The order goes from the most
    specific kind of name to the least; docs/identity.md states it too.

    @raise ValueError: if the certificate carries none of these.
    """
    names: list[str] = []
    chosen: str | None = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for kind in (x509.UniformResourceIdentifier, x509.RFC822Name, x509.DNSName):
            values = san.get_values_for_type(kind)
            names.extend(values)
            if chosen is None and values:
                chosen = values[0]
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    names.extend(str(cn) for cn in cns)
    if chosen is None and cns:
        chosen = str(cns[0])
    if not chosen:
        raise ValueError("certificate carries no SAN URI, e-mail, DNS name or common name")
    return PeerIdentity(name=chosen, serial=serialHex(cert.serial_number), names=tuple(names))


# --- making certificates -------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def newKey() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def keyPEM(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certPEM(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def certPEM(self) -> bytes:
        return certPEM(self.cert)

    @property
    def keyPEM(self) -> bytes:
        return keyPEM(self.key)

    def write(self, certPath: Path, keyPath: Path) -> None:
        certPath.write_bytes(self.certPEM)
        writePrivate(keyPath, self.keyPEM)


def writePrivate(path: Path, data: bytes) -> None:
    """
    Write C{data} to a new file readable by its owner only.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def replacePrivate(path: Path, data: bytes) -> None:
    """
    Replace C{path} with C{data}, readable by its owner only, durably: a
    crash leaves the old file or the new one, never a part of either.
    """
    temporary = path.with_name(path.name + ".new")
    writePrivate(temporary, data)
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def selfSignedBuilder(commonName: str, key: ec.EllipticCurvePrivateKey, lifetime: datetime.timedelta) -> x509.CertificateBuilder:
    """
    A certificate builder for a self-signed certificate of C{key}, valid
    from 5 minutes ago (clock skew) for C{lifetime}; the caller adds
    extensions and signs with C{key}.
    """
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
    )


class CertificateAuthority:
    """
    A minimal CA for development and tests.
    """

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, name: str = "TP dev CA", days: int = 3650) -> CertificateAuthority:
        key = newKey()
        cert = (
            selfSignedBuilder(name, key, datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, certPath: Path, keyPath: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(certPath.read_bytes())
        key = serialization.load_pem_private_key(keyPath.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(cert, key)

    @property
    def certPEM(self) -> bytes:
        return certPEM(self.cert)

    def issue(
        self,
        commonName: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        emails: tuple[str, ...] = (),
        server: bool = False,
        client: bool = False,
        notBefore: datetime.datetime | None = None,
        notAfter: datetime.datetime | None = None,
        hours: float = 12,
    ) -> Issued:
        """
        Issue a leaf certificate.  Client certificates are short-lived by
        default (12 hours), as TP intends them to be.
        """
        key = newKey()
        now = _now()
        start = notBefore or (now - datetime.timedelta(minutes=5))
        end = notAfter or (now + datetime.timedelta(hours=hours))
        sans: list[x509.GeneralName] = []
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.RFC822Name(e) for e in emails]
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        return Issued(builder.sign(self.key, hashes.SHA256()), key)

    def crl(self, revokedSerials: list[int], days: int = 7) -> x509.CertificateRevocationList:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + datetime.timedelta(days=days))
        )
        for serial in revokedSerials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        return builder.sign(self.key, hashes.SHA256())


def loadCertificates(path: str) -> list[x509.Certificate]:
    with open(path, "rb") as f:
        data = f.read()
    certs = x509.load_pem_x509_certificates(data)
    if not certs:
        raise ValueError(f"{path}: no PEM certificate found")
    return certs


def loadKey(path: str):  # type: ignore[no-untyped-def]
    with open(path, "rb") as f:
        return serialization.load_pem_private_key(f.read(), None)
