# -*- test-case-name: tpproxy.test.test_acme -*-
"""
TP's ACME certificate store: one directory per name (C{fullchain.pem},
C{privkey.pem}), the account key, when a certificate is due for renewal,
and the temporary self-signed certificate served until the first one
arrives.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.logger import Logger

from tpproxy.config import DNS_NAME
from tpproxy.pki import certPEM, keyPEM, newKey, replacePrivate, selfSignedBuilder, writePrivate

log = Logger()

Chain = list[x509.Certificate]


def loadOrCreateKey(path: Path) -> Any:
    """
    The ACME account key at C{path}, made (EC P-256, mode 0600) if absent.
    """
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) and not hasattr(key, "sign"):
            raise ValueError(f"{path}: not a private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    writePrivate(path, keyPEM(key))
    log.info("Made a new ACME account key at {path}", path=str(path))
    return key


class CertificateStore:
    """
    Certificates by name in a directory (mode 0700): C{NAME.pem} holds the
    private key and the chain (leaf first), mode 0600.  One file, written
    to a temporary name, synced and renamed into place: a crash leaves the
    old pair or the new one, never a key beside another key's certificate.
    A file that does not load, or whose key is not the leaf's, is ignored
    (logged) as if absent, so TP starts and gets a new one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)

    def _file(self, name: str) -> Path:
        if not DNS_NAME.fullmatch(name):
            raise ValueError(f"not a DNS name: {name!r}")
        return self.path / f"{name.replace('*', '_')}.pem"

    def load(self, name: str) -> tuple[Chain, Any] | None:
        path = self._file(name)
        try:
            data = path.read_bytes()
            chain = x509.load_pem_x509_certificates(data)
            key = serialization.load_pem_private_key(data, None)
            if _spki(chain[0].public_key()) != _spki(key.public_key()):  # type: ignore[union-attr]
                raise ValueError("the key is not the certificate's")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as e:
            log.warn("Ignoring the stored certificate of {name} ({path}): {error}", name=name, path=str(path), error=str(e))
            return None
        return chain, key

    def directoryOf(self, name: str) -> str | None:
        """
        The ACME directory C{name}'s certificate came from, if recorded.
        """
        try:
            return json.loads(self._file(name).with_suffix(".json").read_text()).get("directory")
        except (OSError, ValueError, AttributeError):
            return None

    def save(self, name: str, chain: Chain, key: Any, directory: str | None = None) -> None:
        """
        Store C{chain} and C{key} for C{name}, and which ACME C{directory}
        issued them (a sidecar C{NAME.json}, written after the pair; after
        a crash in between the sidecar still names the previous directory,
        which only matters if that differs).
        """
        path = self._file(name)
        replacePrivate(path, keyPEM(key) + b"".join(certPEM(c) for c in chain))
        if directory is not None:
            meta = path.with_suffix(".json")
            temporary = meta.with_name(meta.name + ".new")
            with open(temporary, "w") as f:
                f.write(json.dumps({"directory": directory}))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, meta)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _spki(publicKey: Any) -> bytes:
    return publicKey.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def dnsNames(leaf: x509.Certificate) -> set[str]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {n.lower() for n in san.get_values_for_type(x509.DNSName)}


def renewalTime(leaf: x509.Certificate, fraction: float) -> float:
    """
    When to renew C{leaf}: after C{fraction} of its lifetime.
    """
    start = leaf.not_valid_before_utc.timestamp()
    end = leaf.not_valid_after_utc.timestamp()
    return start + fraction * (end - start)


def temporaryCertificate(names: tuple[str, ...]) -> tuple[Chain, Any]:
    """
    A self-signed certificate for C{names}, served until the CA issues the
    real one (no client will trust it: it only lets the listener start,
    and tls-alpn-01 does not need it).
    """
    key = newKey()
    cert = (
        selfSignedBuilder(names[0], key, datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return [cert], key
