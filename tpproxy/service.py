# -*- test-case-name: tpproxy.test.test_tap -*-
"""
Composing a running TP server from a L{ServerConfig}.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service, strports
from twisted.logger import Logger

from .certsource import DevCACertificates, FileCertificates, FirstAvailable, ICertificateSource
from .config import ServerConfig, loadCRL
from .pki import CertificateAuthority
from .reverse import Registry
from .protocols.server import TPServerFactory
from .tls import ClientCertChecker, ServerTLS, TLSFactory, loadCertificates, loadKey

log = Logger()


def makeServerTLS(config: ServerConfig) -> ServerTLS:
    cas = [ca for path in config.clientCAs for ca in loadCertificates(path)]
    crls = (loadCRL(config.crl, cas),) if config.crl else ()
    checker = ClientCertChecker(config.deniedIdentities, config.deniedSerials, crls)
    return ServerTLS(loadCertificates(config.certificate), loadKey(config.key), cas, checker)


def certificateSource(config: ServerConfig, reactor: Any) -> ICertificateSource:
    """
    Certificates for E2E names: configured files first, then the dev CA if
    one is configured.
    """
    sources: list[ICertificateSource] = [FileCertificates(config.e2eFiles)]
    if config.e2eCA is not None:
        from pathlib import Path

        sources.append(DevCACertificates(CertificateAuthority.load(Path(config.e2eCA[0]), Path(config.e2eCA[1])), reactor))
    return FirstAvailable(*sources)


def makeServerFactory(config: ServerConfig, reactor: Any) -> TLSFactory:
    """
    The listening factory: TLS with client certificates around the TP
    protocol, with the registry of reverse tunnels.
    """
    serverTLS = makeServerTLS(config)
    registry = Registry(
        reactor, config.policy, serverTLS, certificateSource(config, reactor), config.publicInterface, config.acceptTimeout
    )
    factory = TPServerFactory(config, reactor, serverTLS=serverTLS, registry=registry)
    return TLSFactory(serverTLS, False, factory, clock=reactor)


def makeService(config: ServerConfig, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    top = service.MultiService()
    factory = makeServerFactory(config, reactor)
    for description in config.listen:
        listener = strports.service(description, factory, reactor=reactor)
        listener.setName(f"tls:{description}")
        listener.setServiceParent(top)
    log.info(
        "TP serving TLS (ALPN tp/1) on {listen} with {rules} policy rule(s), config {path}",
        listen=", ".join(config.listen),
        rules=len(config.policy.rules),
        path=config.path,
    )
    return top
