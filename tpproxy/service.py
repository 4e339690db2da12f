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
from .quic import ClientVerifier, QuicListener, serverConfiguration
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
    protocol, with the registry of reverse tunnels.  Its C{wrappedFactory}
    is the L{TPServerFactory} the QUIC listener shares.
    """
    serverTLS = makeServerTLS(config)
    registry = Registry(
        reactor, config.policy, serverTLS, certificateSource(config, reactor), config.publicInterface, config.acceptTimeout
    )
    factory = TPServerFactory(config, reactor, serverTLS=serverTLS, registry=registry)
    return TLSFactory(serverTLS, False, factory, clock=reactor)


def makeQuicListener(config: ServerConfig, reactor: Any, factory: TPServerFactory) -> QuicListener:
    """
    A QUIC listener serving streams with C{factory}, verifying client
    certificates with the same CAs, CRL and deny list as the TLS listener.
    """
    tlsContext = factory.serverTLS
    verifier = ClientVerifier(tlsContext.clientCAs, tlsContext.checker, reactor)
    configuration = serverConfiguration(loadCertificates(config.certificate), loadKey(config.key))
    return QuicListener(reactor, configuration, verifier, factory)


class UDPListenerService(service.Service):
    """
    Listens for UDP on one address while running; a failed bind stops
    startup, as C{strports.service} does for TCP.
    """

    def __init__(self, reactor: Any, address: tuple[str, int], protocol: Any) -> None:
        self.reactor = reactor
        self.address = address
        self.protocol = protocol
        self.port: Any = None

    def privilegedStartService(self) -> None:
        self._bind()
        super().privilegedStartService()

    def startService(self) -> None:
        # twist calls only startService; twistd calls both.
        self._bind()
        super().startService()

    def _bind(self) -> None:
        if self.port is None:
            self.port = self.reactor.listenUDP(self.address[1], self.protocol, interface=self.address[0])

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


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
    for address in config.quic:
        # One listener per socket: a DatagramProtocol has one transport.
        udp = UDPListenerService(reactor, address, makeQuicListener(config, reactor, factory.wrappedFactory))
        udp.setName(f"quic:{address[0]}:{address[1]}")
        udp.setServiceParent(top)
    log.info(
        "TP serving TLS (ALPN tp/1) on {listen} and QUIC on {quic}, with {rules} policy rule(s), config {path}",
        listen=", ".join(config.listen),
        quic=", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in config.quic) or "nothing",
        rules=len(config.policy.rules),
        path=config.path,
    )
    return top
