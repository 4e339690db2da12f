# -*- test-case-name: tpproxy.test.test_reverse -*-
"""
Where the certificates of E2E exposure names come from.

L{ICertificateSource} is asynchronous so that an ACME source (which must
talk to a CA) drops in beside the file and dev-CA sources.
"""

from __future__ import annotations

import datetime
from typing import Any

from cryptography import x509
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from tpproxy.pki import CertificateAuthority, loadCertificates, loadKey


class CertificateUnavailable(Exception):
    """
    No certificate can be had for a name.
    """


class ICertificateSource(Interface):
    def certificateFor(name: str) -> defer.Deferred[tuple[list[x509.Certificate], Any]]:
        """
        Get a certificate chain (leaf first) and private key for C{name}.

        @return: a Deferred firing with C{(chain, key)}, or failing with
            L{CertificateUnavailable}.
        """


@implementer(ICertificateSource)
class FileCertificates:
    """
    Certificates configured as files, per name (C{[e2e.certificates]}).
    """

    def __init__(self, files: dict[str, tuple[str, str]]) -> None:
        self.files = dict(files)

    def certificateFor(self, name: str) -> defer.Deferred[tuple[list[x509.Certificate], Any]]:
        if name not in self.files:
            return defer.fail(CertificateUnavailable(f"no certificate file is configured for {name}"))
        cert, key = self.files[name]
        try:
            return defer.succeed((loadCertificates(cert), loadKey(key)))
        except (OSError, ValueError) as e:
            return defer.fail(CertificateUnavailable(f"cannot load the certificate of {name}: {e}"))


@implementer(ICertificateSource)
class DevCACertificates:
    """
    Issues certificates on demand from a local CA (C{tp init-dev}'s), valid
    a day and renewed when less than an hour is left.
    """

    def __init__(self, ca: CertificateAuthority, clock: IReactorTime, hours: float = 24) -> None:
        self.ca = ca
        self.clock = clock
        self.hours = hours
        self._cache: dict[str, tuple[list[x509.Certificate], Any]] = {}

    def certificateFor(self, name: str) -> defer.Deferred[tuple[list[x509.Certificate], Any]]:
        cached = self._cache.get(name)
        now = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)
        if cached is None or cached[0][0].not_valid_after_utc - now < datetime.timedelta(hours=1):
            issued = self.ca.issue(name, dns=(name,), server=True, hours=self.hours)
            cached = ([issued.cert, self.ca.cert], issued.key)
            self._cache[name] = cached
        return defer.succeed(cached)


@implementer(ICertificateSource)
class FirstAvailable:
    """
    Ask each source in turn.
    """

    def __init__(self, *sources: ICertificateSource) -> None:
        self.sources = sources

    @defer.inlineCallbacks
    def certificateFor(self, name: str) -> Any:
        reasons = []
        for source in self.sources:
            try:
                return (yield source.certificateFor(name))
            except CertificateUnavailable as e:
                reasons.append(str(e))
        raise CertificateUnavailable("; ".join(reasons) or f"no certificate source is configured for {name}")
