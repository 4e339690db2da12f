# -*- test-case-name: tpproxy.test.test_tap -*-
"""
Composing a running TP server from a L{ServerConfig}.
"""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from OpenSSL import crypto
from twisted.application import service, strports
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory

from tpproxy import router
from tpproxy.acme.store import CertificateStore, loadOrCreateKey, temporaryCertificate
from tpproxy.certsource import DevCACertificates, FileCertificates, FirstAvailable, ICertificateSource
from tpproxy.cluster.memory import MemoryRoutingStore
from tpproxy.cluster.store import IRoutingStore, LeasedStore, StoreError
from tpproxy.config import ServerConfig, loadCRL
from tpproxy.limits import HalfOpenCounter, HalfOpenGate, raiseFileLimit
from tpproxy.memory import MemoryTrimmer
from tpproxy.metrics import Metrics
from tpproxy.pki import CertificateAuthority, loadCertificates, loadKey
from tpproxy.protocols.server import HTTP11, TPServerFactory
from tpproxy.wire import ALPN
from tpproxy.reactors import IServerReactor
from tpproxy.reload import Reloader
from tpproxy.reverse.registry import Registry
from tpproxy.status import serverStatus
from tpproxy.transports.quic import RECEIVE_SIZE, ClientVerifier, QuicListener, loadResetSecret, serverConfiguration
from tpproxy.transports.servertls import ServerTLS
from tpproxy.transports.tls import TLSFactory
from tpproxy.verify import ClientCertChecker

if TYPE_CHECKING:
    # Imported where used: an instance without [acme] or [admin] does not
    # load certbot's acme, requests or twisted.web (about 12 MB of RSS).
    from tpproxy.acme.service import IssuingService

log = Logger()


def serverCertificate(config: ServerConfig) -> tuple[list[Any], Any]:
    """
    TP's own certificate at start: the configured files; else, with
    C{acme.names}, the stored ACME certificate; else a temporary
    self-signed one until the CA issues (L{IssuingService} then swaps it in).
    """
    if config.certificate is not None and config.key is not None:
        return loadCertificates(config.certificate), loadKey(config.key)
    assert config.acme is not None and config.acme.names
    stored = CertificateStore(Path(config.acme.store)).load(config.acme.names[0])
    if stored is not None:
        return stored
    log.warn(
        "No certificate for {names} yet: serving a temporary self-signed one until the ACME CA issues",
        names=", ".join(config.acme.names),
    )
    return temporaryCertificate(config.acme.names)


def makeServerTLS(config: ServerConfig) -> ServerTLS:
    cas = [ca for path in config.clientCAs for ca in loadCertificates(path)]
    crls = (loadCRL(config.crl, cas),) if config.crl else ()
    checker = ClientCertChecker(config.deniedIdentities, config.deniedSerials, crls)
    chain, key = serverCertificate(config)
    # With [webtransport], browsers fetch tokens over HTTPS on this port
    # (after the same client-certificate handshake): http/1.1 comes after
    # tp/1, so a client offering both is a TP client.
    alpn = (ALPN, HTTP11) if config.webtransport is not None else (ALPN,)
    return ServerTLS(chain, key, cas, checker, alpn=alpn)


def makeIssuing(config: ServerConfig, reactor: IServerReactor, serverTLS: ServerTLS, clock: IReactorTime | None = None) -> IssuingService:
    """
    The ACME issuing service of C{config.acme}, answering tls-alpn-01 on
    C{serverTLS}'s listener; its http-01 responder is
    C{issuing.http01}, to be served by the caller.
    """
    from tpproxy.acme.client import TLSALPN01, AcmeClient
    from tpproxy.acme.responders import HTTP01Responder, TLSALPN01Responder
    from tpproxy.acme.service import IssuingService

    acme = config.acme
    assert acme is not None
    trust = loadCertificates(acme.caBundle) if acme.caBundle else None
    client = AcmeClient(acme.directory, loadOrCreateKey(Path(acme.accountKey)), reactor, trust, acme.contact)
    http01 = HTTP01Responder()
    responders: list[Any] = []
    for challenge in acme.challenges:
        responders.append(TLSALPN01Responder(serverTLS) if challenge == TLSALPN01 else http01)
    issuing = IssuingService(
        client,
        CertificateStore(Path(acme.store)),
        responders,
        clock if clock is not None else reactor,
        ownNames=acme.names,
        inUse=lambda name: name in serverTLS.names,
        renewFraction=acme.renewFraction,
        checkInterval=acme.checkInterval,
        onDemand=acme.onDemand,
    )
    issuing.http01 = http01  # type: ignore[attr-defined]
    return issuing


def certificateSource(config: ServerConfig, reactor: IServerReactor, issuing: IssuingService | None = None) -> ICertificateSource:
    """
    Certificates for E2E names: configured files first, then ACME, then
    the dev CA if one is configured.
    """
    sources: list[ICertificateSource] = [FileCertificates(config.e2eFiles)]
    if issuing is not None and issuing.onDemand:
        sources.append(issuing)
    if config.e2eCA is not None:
        sources.append(DevCACertificates(CertificateAuthority.load(Path(config.e2eCA[0]), Path(config.e2eCA[1])), reactor))
    return FirstAvailable(*sources)


def makeRoutingStore(config: ServerConfig, reactor: IServerReactor) -> LeasedStore:
    """
    The routing store of C{config.cluster}: on etcd, shared with the other
    instances of the service; else in memory (one instance).  Not started.
    """
    cluster = config.cluster
    if not cluster.shared:
        return MemoryRoutingStore(reactor, cluster.instance, cluster.advertise, cluster.leaseTTL)
    from tpproxy.cluster.etcd import EtcdRoutingStore

    return EtcdRoutingStore(
        reactor, list(cluster.etcd), cluster.instance, cluster.advertise, cluster.leaseTTL, cluster.prefix, cluster.timeout
    )


def makeServerFactory(
    config: ServerConfig, reactor: IServerReactor, clock: IReactorTime | None = None, store: IRoutingStore | None = None
) -> TLSFactory:
    """
    The listening factory: TLS with client certificates around the TP
    protocol, with the registry of reverse tunnels (claiming its routes in
    C{store}, if given).  Its C{wrappedFactory}
    is the L{TPServerFactory} the QUIC listener shares; with C{[acme]}, its
    C{issuing} is the L{IssuingService} (else C{None}).
    """
    serverTLS = makeServerTLS(config)
    issuing = makeIssuing(config, reactor, serverTLS, clock) if config.acme is not None else None
    registry = Registry(
        reactor, config.policy, serverTLS, certificateSource(config, reactor, issuing), config.publicInterface, config.acceptTimeout,
        store=store,
    )
    factory = TPServerFactory(config, reactor, serverTLS=serverTLS, registry=registry)
    if config.webtransport is not None:
        from tpproxy.web.site import makeSite
        from tpproxy.webtoken import Gate

        wt = config.webtransport
        factory.gate = Gate(lambda: serverTLS.key, lambda: serverTLS.chain, wt.origins, wt.tokenLifetime, wt.path)  # type: ignore[attr-defined]
        if wt.certificateHashes:
            from tpproxy.transports.webtransport import HashedCertificate
            from tpproxy.webtoken import certificateHosts

            if HashedCertificate.servable(serverTLS.key):
                factory.gate.certificate = HashedCertificate(lambda: certificateHosts(serverTLS.chain[0]), reactor)  # type: ignore[attr-defined]
            else:
                log.warn("webtransport.certificate_hashes: TP's key is not ECDSA P-256, so browsers get TP's own certificate on WebTransport")
        factory.web = makeSite(factory.gate, reactor)  # type: ignore[attr-defined]
    tlsFactory = TLSFactory(serverTLS, False, factory, clock=reactor)
    tlsFactory.issuing = issuing  # type: ignore[attr-defined]
    return tlsFactory


def _h3Summary(h3: Any) -> str:
    from tpproxy.config import H3Backend

    if isinstance(h3, H3Backend):
        return f"; QUIC that is not TP's goes to the HTTP/3 server at udp:{h3.host}:{h3.port}"
    return f"; HTTP/3 clients get {h3.status}" if h3 is not None else ""


def makeQuicListener(config: ServerConfig, reactor: IServerReactor, factory: TPServerFactory, resetSecret: bytes | None = None) -> QuicListener:
    """
    A QUIC listener serving streams with C{factory}, verifying client
    certificates with the same CAs, CRL and deny list as the TLS listener,
    with the half-open limits and handshake timeout of C{config}, and the
    stateless-reset secret of its state directory (unless given).
    """
    tlsContext = factory.serverTLS
    verifier = ClientVerifier(tlsContext.clientCAs, tlsContext.checker, reactor)
    configuration = serverConfiguration(tlsContext.chain, tlsContext.key)
    from tpproxy.config import H3Backend

    h3 = config.router.h3 if config.router is not None else None
    backend = h3 if isinstance(h3, H3Backend) else None
    if resetSecret is None:
        resetSecret = loadResetSecret(config.stateDir)
    listener = QuicListener(
        reactor, configuration, verifier, factory, h3=None if backend else h3, limits=config.limits,
        handshakeTimeout=config.handshakeTimeout, resetSecret=resetSecret,
    )
    listener.maxDatagramSize = config.quicMaxDatagramSize
    if backend is not None:
        listener.useH3Backend((backend.host, backend.port))
    if config.webtransport is not None:
        listener.useWebTransport(factory.gate)  # type: ignore[attr-defined]
    return listener


class UDPListenerService(service.Service):
    """
    Listens for UDP on one address while running; a failed bind stops
    startup, as C{strports.service} does for TCP.
    """

    def __init__(self, reactor: IReactorUDP, address: tuple[str, int], protocol: DatagramProtocol) -> None:
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
            self.port = self.reactor.listenUDP(self.address[1], self.protocol, interface=self.address[0], maxPacketSize=RECEIVE_SIZE)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class DrainService(service.MultiService):
    """
    A graceful stop.  Its children are the QUIC listeners, which close
    every QUIC connection when they stop, so they stop only after the
    drain.  On stop (the TCP listeners stop at the same moment, as
    siblings): QUIC takes no new connections, every exposer is told
    C{goaway} (it registers again at once, elsewhere where there is an
    elsewhere), and live tunnels may finish for up to C{drainTimeout}
    seconds; what is left then is closed, audited as C{drained}.
    Signalling connections (C{listen}) do not hold the drain up: they
    never end on their own.
    """

    name = "drain"

    def __init__(self, factory: TPServerFactory, quicListeners: list[QuicListener], clock: IReactorTime) -> None:
        super().__init__()
        self.factory = factory
        self.quicListeners = quicListeners
        self.clock = clock

    @property
    def drainTimeout(self) -> float:
        return self.factory.config.drainTimeout  # a reload may change it

    def _busy(self) -> list[Any]:
        return [conn for conn in self.factory.live if conn.event != "listen" or conn.hello is None]

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        for quic in self.quicListeners:
            quic.draining = True
        told = self.factory.registry.goaway("TP is stopping") if hasattr(self.factory.registry, "goaway") else 0
        busy = self._busy()
        log.info(
            "Stopping: no new connections; {tunnels} connection(s) may finish within {timeout:g} s; {told} exposer(s) told to go away",
            tunnels=len(busy),
            timeout=self.drainTimeout,
            told=told,
        )
        deadline = self.clock.seconds() + self.drainTimeout
        while busy and self.clock.seconds() < deadline:
            yield task.deferLater(self.clock, min(0.1, max(0.0, deadline - self.clock.seconds())), lambda: None)
            busy = self._busy()
        left = list(self.factory.live)
        for conn in left:
            if conn in busy:
                conn.revoke("drained", f"TP stopped; the drain timeout ({self.drainTimeout:g} s) ended")
            else:
                # A signalling connection: closed after its goaway is out.
                conn.revoke("drained", "TP stopped", gently=True)
        if busy:
            log.info("Drain timeout: closed {count} connection(s) still open", count=len(busy))
        yield super().stopService()


class IdleService(service.Service):
    """
    Closes tunnels that carried no byte either way for C{limits.idle_timeout}
    seconds (off at 0, the default), audited as C{idle}.  It compares byte
    counts between looks, every half timeout, so the data path pays nothing:
    a tunnel goes between one and one and a half timeouts after its last
    byte.  Signalling connections are left to their keepalive.
    """

    name = "idle"

    def __init__(self, factory: TPServerFactory, clock: IReactorTime) -> None:
        self.factory = factory
        self.clock = clock
        self.seen: dict[Any, tuple[int, float]] = {}
        self._call: Any = None

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def _schedule(self) -> None:
        idle = self.factory.config.limits.idleTimeout
        self._call = self.clock.callLater(idle / 2 if idle else 5.0, self._look)

    def _look(self) -> None:
        idle = self.factory.config.limits.idleTimeout
        now = self.clock.seconds()
        seen: dict[Any, tuple[int, float]] = {}
        if idle:
            for conn in list(self.factory.live):
                if conn.session is None or conn.event == "listen" or conn.result != "ok":
                    continue
                moved = sum(conn.session.counts())
                before = self.seen.get(conn)
                since = before[1] if before is not None and before[0] == moved else now
                if now - since >= idle:
                    conn.revoke("idle", f"no bytes either way for {idle} s (limits.idle_timeout)")
                    continue
                seen[conn] = (moved, since)
        self.seen = seen
        self._schedule()

    def stopService(self) -> Any:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return super().stopService()


def _servesName(serverTLS: ServerTLS) -> Any:
    """
    The names a shared port routes to TP: TP's own, E2E names, and names
    with a pending tls-alpn-01 challenge.
    """

    def serves(name: str) -> bool:
        return serverTLS.servesOwnName(name) or name in serverTLS.names or name in serverTLS.challengeCertificates

    return serves


def makeRouterFactory(config: ServerConfig, reactor: IServerReactor, tpFactory: TLSFactory) -> router.RouterFactory:
    """
    The listening factory of a port TP shares with a web site (C{[router]}).
    """
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.ssl import CertificateOptions

    shared = config.router
    assert shared is not None
    backend = terminate = None
    if shared.backend is not None:
        backend = router.toBackend(clientFromString(reactor, shared.backend), shared.proxyProtocol, "web backend")
    if shared.terminateNames:
        assert shared.terminateCertificate and shared.terminateKey and shared.terminateBackend
        chain = loadCertificates(shared.terminateCertificate)
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(loadKey(shared.terminateKey)),
            certificate=crypto.X509.from_cryptography(chain[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
            acceptableProtocols=[b"http/1.1"],
        )
        terminate = router.terminateTLS(options, clientFromString(reactor, shared.terminateBackend), shared.terminateProxyProtocol, "web (TLS ended by TP)")
    route = router.defaultRoute(_servesName(tpFactory.wrappedFactory.serverTLS), tpFactory, backend, terminate, shared.terminateNames)
    return router.RouterFactory(route, reactor, timeout=shared.helloTimeout)


def withBacklog(description: str, backlog: int) -> str:
    """
    C{description} with C{backlog=} added if it is a plain TCP endpoint that
    does not set one (Twisted's default of 50 drops SYNs under a burst).
    """
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6") or re.search(r"(^|:)backlog=", description):
        return description
    return f"{description}:backlog={backlog}"


class MetricsService(service.Service):
    """
    Counts audit events into C{metrics} while running.
    """

    def __init__(self, metrics: Metrics, publisher: Any = None) -> None:
        self.metrics = metrics
        self.publisher = publisher if publisher is not None else globalLogPublisher

    def startService(self) -> None:
        super().startService()
        self.publisher.addObserver(self.metrics)

    def stopService(self) -> Any:
        self.publisher.removeObserver(self.metrics)
        return super().stopService()


def _quicSessions(listeners: list[QuicListener]) -> dict[tuple[str, ...], float]:
    sessions = halfOpen = 0
    for quic in listeners:
        # One session is registered under each of its connection ids.
        sessions += len({id(s) for s in quic.sessions.values()})
        halfOpen += quic.halfOpen.count
    return {("half_open",): halfOpen, ("established",): max(0, sessions - halfOpen)}


def _tunnels(factory: TPServerFactory) -> dict[tuple[str, ...], float]:
    counts: dict[tuple[str, ...], float] = {}
    for conn in factory.live:
        if conn.session is not None:
            key = (getattr(conn.transport, "carrier", "tls"), conn.event)
            counts[key] = counts.get(key, 0) + 1
    return counts


def makeMetrics(
    reactor: IReactorTime, factory: TLSFactory, gate: HalfOpenCounter, quicListeners: list[QuicListener]
) -> Metrics:
    """
    TP's metrics, with gauges that read the live state of C{factory} (the
    TLS listeners' factory), C{gate} (half-open TLS connections) and the
    QUIC listeners at each scrape.
    """
    metrics = Metrics()
    tp: TPServerFactory = factory.wrappedFactory
    registry, serverTLS = tp.registry, tp.serverTLS
    metrics.gauge(
        "tp_tls_connections", "Open TLS connections on TP's listeners, handshaking or carrying a tunnel", (),
        lambda: {(): len(factory.protocols)},
    )
    metrics.gauge(
        "tp_handshakes_in_progress", "Connections that have not finished their handshake, by carrier", ("via",),
        lambda: {("tls",): gate.count, ("quic",): sum(q.halfOpen.count for q in quicListeners)},
    )
    metrics.gauge("tp_quic_sessions", "QUIC connections, by state", ("state",), lambda: _quicSessions(quicListeners))
    metrics.gauge(
        "tp_quic_forwarded_datagrams", "QUIC packets handed to the worker that owns their connection (docs/workers.md)", (),
        lambda: {(): sum(q.forwarded for q in quicListeners)}, counter=True,
    )
    metrics.gauge(
        "tp_p2p_introductions", "P2P introductions (docs/p2p.md): introduced, declined by the exposer, not_accepted in time, fell_back (a relayed dial after no direct path)", ("result",),
        lambda: {(result,): n for result, n in tp.p2p.items()}, counter=True,
    )

    def byResult(counts: Callable[[QuicListener], dict[str, int]]) -> Callable[[], dict[tuple[str, ...], float]]:
        """
        The sum over the QUIC listeners of C{counts(listener)}, by result.
        """

        def read() -> dict[tuple[str, ...], float]:
            total: dict[tuple[str, ...], float] = {}
            for q in quicListeners:
                for result, n in counts(q).items():
                    total[(result,)] = total.get((result,), 0) + n
            return total

        return read

    metrics.gauge(
        "tp_stun_requests", "STUN binding requests on TP's UDP port: answered, malformed, rate_limited (docs/quic.md)", ("result",),
        byResult(lambda q: q.stun), counter=True,
    )
    metrics.gauge("tp_tunnels", "Live tunnels (ClientHello answered or being served), by carrier and operation", ("via", "op"), lambda: _tunnels(tp))
    tokens = getattr(tp, "gate", None)
    if tokens is not None:
        metrics.gauge(
            "tp_webtransport_sessions", "WebTransport CONNECTs: accepted, or refused by reason (docs/webtransport.md)", ("result",),
            byResult(lambda q: q.webtransportSessions), counter=True,
        )
        metrics.gauge(
            "tp_webtransport_tokens", "WebTransport tokens: minted, or refused by reason", ("result",),
            lambda: {("minted",): tokens.minted, **{(reason,): n for reason, n in tokens.refused.items()}}, counter=True,
        )
    metrics.gauge(
        "tp_identities_active", "Identities with at least one live tunnel", (), lambda: {(): len(tp.usage.byIdentity)}
    )
    metrics.gauge(
        "tp_exposures", "Live reverse exposures, by kind", ("kind",),
        lambda: {("public",): len(registry.byPort), ("e2e",): len(registry.byName)},
    )
    metrics.gauge(
        "tp_exposure_members", "Signalling connections serving live exposures (a pool has several), by kind", ("kind",),
        lambda: {
            ("public",): sum(len(e.members) for e in registry.byPort.values()),
            ("e2e",): sum(len(e.members) for e in registry.byName.values()),
        },
    )
    metrics.gauge("tp_dialers_waiting", "Dialers waiting for an exposer to accept", (), lambda: {(): len(registry.sessions)})
    metrics.gauge(
        "tp_certificate_expiry_seconds",
        "Seconds until a certificate TP serves expires: name \"tp\" is TP's own, others are E2E names",
        ("name",),
        lambda: {(name,): when - reactor.seconds() for name, when in serverTLS.expiry.items()},
    )
    return metrics


def makeAdmin(
    config: ServerConfig, metrics: Metrics, serverTLS: ServerTLS, reactor: IServerReactor, status: Any = None, reload: Any = None
) -> tuple[service.IService, ServerTLS | None]:
    """
    The admin listener of C{config.admin}: plain HTTP, or with
    C{identities} mutual TLS with TP's certificate, client CAs and
    certificate checks (that L{ServerTLS} is returned too, for reloads).
    """
    from tpproxy.admin import adminService, adminSite

    admin = config.admin
    assert admin is not None
    site = adminSite(metrics, admin.identities, status, reload)
    factory: Any = site
    tls = None
    if admin.identities is not None:
        tls = ServerTLS(serverTLS.chain, serverTLS.key, serverTLS.clientCAs, serverTLS.checker, alpn=(b"http/1.1",))
        factory = TLSMemoryBIOFactory(tls, False, site)
    return adminService(admin.listen, factory, reactor), tls


class ReloadService(service.Service):
    """
    Reloads the configuration on C{SIGHUP} while running (in the main
    thread only: a signal handler cannot be set elsewhere), by calling
    C{reloader.reload()}: a L{Reloader}, or a worker pool
    (L{tpproxy.workers.WorkerPool}), which tells its workers.
    """

    name = "reload"

    def __init__(self, reloader: Any, reactor: Any, held: Callable[[], bool] = lambda: False) -> None:
        """
        @param held: says, once the handler is set, whether a C{SIGHUP}
            came before it (a worker holds one while it starts,
            L{tpproxy.workers.holdHangups}): then reload at once.
        """
        self.reloader = reloader
        self.reactor = reactor
        self.held = held
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._hangup)
        if self.held():
            self.reactor.callLater(0, self.reloader.reload)

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reloader.reload)

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()


class ServerService(service.MultiService):
    """
    TP's top service: starts the routing store, then (once it has a lease)
    every listener; on stop, stops them, then the store (its lease is
    revoked, so this instance's routes vanish at once).

    The in-memory store starts at once, so a single instance starts as if
    there were no store.  An etcd that does not answer at start is tried
    again every second, and nothing listens meanwhile: an instance that
    cannot claim routes or be found by its peers serves nothing.
    """

    def __init__(self, store: LeasedStore, clock: IReactorTime) -> None:
        super().__init__()
        self.store = store
        self.clock = clock
        self._childrenStarted = False

    def privilegedStartService(self) -> None:
        if isinstance(self.store, MemoryRoutingStore):
            super().privilegedStartService()
        # Else the listeners bind in startService, once the store answers.

    def startService(self) -> None:
        if isinstance(self.store, MemoryRoutingStore):
            # Answers at once; a listener's error (port in use) reaches
            # the caller as it does without a store.
            self.store.start()
            self._childrenStarted = True
            super().startService()
            return
        service.Service.startService(self)
        self._starting = self._start()

    @defer.inlineCallbacks
    def _start(self) -> Any:
        failures = 0
        while self.running:
            try:
                yield self.store.start()
                break
            except StoreError as e:
                failures += 1
                if failures == 1:
                    log.warn("The routing store does not answer ({error}); not listening until it does, trying every second", error=str(e))
                yield task.deferLater(self.clock, 1.0, lambda: None)
        else:
            return
        if failures:
            log.info("The routing store answers: instance {instance} starts listening", instance=self.store.instance.id)
        self._childrenStarted = True
        try:
            for child in self:
                child.startService()
        except Exception:
            log.failure("Starting TP's listeners failed")
            raise

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        if self._childrenStarted:
            self._childrenStarted = False
            yield super().stopService()
        else:
            service.Service.stopService(self)
        yield self.store.stop()


def clusterMetrics(metrics: Metrics, store: Any, links: Any) -> None:
    """
    The cluster's gauges and counters: whether the routing store answers,
    the instances and remote routes this instance sees, and its peer
    links' outcomes (L{tpproxy.cluster.peer.PeerLinks.outcomes}).
    """
    metrics.gauge("tp_cluster_store_up", "1 while the routing store answers this instance's lease renewals, else 0", (),
                  lambda: {(): 0 if store.failedRenewals else 1})
    metrics.gauge("tp_cluster_store_unavailable", "Lease renewals the routing store did not answer", (),
                  lambda: {(): store.unavailableTotal}, counter=True)
    metrics.gauge("tp_cluster_instances", "Live instances of the cluster, as this instance's watch last saw them", (),
                  lambda: {(): len(links.watch.instances()) if links.watch is not None else 0})
    metrics.gauge(
        "tp_cluster_remote_routes", "Routes held only on other instances that this one forwards, by kind", ("kind",),
        lambda: {("public",): len(links.registry.remotePorts), ("e2e",): len(links.registry.remoteNames)},
    )
    metrics.gauge("tp_cluster_peer_links", "Peer links this instance opened, by kind (dial, accept) and result", ("kind", "result"),
                  lambda: dict(links.outcomes), counter=True)


def makeService(config: ServerConfig, reactor: IServerReactor | None = None, clock: IReactorTime | None = None) -> service.MultiService:
    """
    TP's services: the TLS listeners, a QUIC listener per address, and with
    C{[acme]} the issuing service and its http-01 responder.

    @param clock: the time source of ACME renewal (default: C{reactor}).
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    store = makeRoutingStore(config, reactor)
    top = ServerService(store, reactor)
    before, after, hard = raiseFileLimit()
    log.info("Open files limit: {before} raised to {after} (hard limit {hard})" if after != before else "Open files limit: {after} (hard limit {hard})",
             before=before, after=after, hard=hard)
    factory = makeServerFactory(config, reactor, clock, store)
    listening: Any = factory if config.router is None else makeRouterFactory(config, reactor, factory)
    limits = config.limits
    # Connections over a cap are held unread (no TLS) for the handshake
    # timeout, as long as that leaves 1024 descriptors besides the
    # half-open ones for real work.
    handshaking = HalfOpenCounter(limits.handshakes, limits.handshakesPerSource)

    def gate(factory: Any) -> HalfOpenGate:
        return HalfOpenGate(
            factory, handshaking, reactor, log, holdFor=config.handshakeTimeout, maxHeld=max(0, after - limits.handshakes - 1024)
        )

    listening = gate(listening)
    if config.cluster.shared:
        from tpproxy.cluster.peer import ClusterService, PeerLinks

        assert config.cluster.peerListen is not None
        tp = factory.wrappedFactory
        links = PeerLinks(reactor, store, tp.registry, tp.serverTLS, config.connectTimeout, config.handshakeTimeout)
        ClusterService(links, config.cluster.peerListen, gate).setServiceParent(top)
        top.links = links  # type: ignore[attr-defined]
        log.info(
            "Cluster: instance {instance} on etcd {etcd} (prefix {prefix}, lease TTL {ttl} s)",
            instance=config.cluster.instance, etcd=", ".join(config.cluster.etcd), prefix=config.cluster.prefix, ttl=config.cluster.leaseTTL,
        )
    for description in config.listen:
        listener = strports.service(withBacklog(description, limits.backlog), listening, reactor=reactor)
        listener.setName(f"tls:{description}")
        listener.setServiceParent(top)
    quicListeners: list[QuicListener] = []
    drain = DrainService(factory.wrappedFactory, quicListeners, reactor)
    drain.setServiceParent(top)
    resetSecret = loadResetSecret(config.stateDir) if config.quic else None
    for address in config.quic:
        # One listener per socket: a DatagramProtocol has one transport.
        quic = makeQuicListener(config, reactor, factory.wrappedFactory, resetSecret)
        quicListeners.append(quic)
        udp = UDPListenerService(reactor, address, quic)
        udp.setName(f"quic:{address[0]}:{address[1]}")
        udp.setServiceParent(drain)
    if config.cluster.shared and quicListeners:
        # QUIC packets of a client whose address changed may reach another
        # instance or worker: route them by connection id (docs/cluster.md).
        from tpproxy.cluster.quicroute import QuicRouter, QuicRouteService, udpAddressOf
        from tpproxy.transports.cidroute import installTaggedIds

        assert config.cluster.peerListen is not None
        serverTLS = tp.serverTLS
        router = QuicRouter(store, links, quicListeners, lambda: serverTLS.key, installTaggedIds(None), reactor)
        QuicRouteService(reactor, router, udpAddressOf(config.cluster.peerListen)).setServiceParent(drain)
    metrics = makeMetrics(reactor, factory, handshaking, quicListeners)
    backends = [q.h3backend for q in quicListeners if q.h3backend is not None]
    if backends:
        metrics.gauge("tp_quic_h3_backend_flows", "QUIC connections passed to the HTTP/3 backend, live (docs/quic.md)", (),
                      lambda: {(): sum(len(b.flows) for b in backends)})
        metrics.gauge("tp_quic_h3_backend_connections", "QUIC connections passed to the HTTP/3 backend", (),
                      lambda: {(): sum(b.connections for b in backends)}, counter=True)
        metrics.gauge(
            "tp_quic_h3_backend_datagrams", "QUIC datagrams between clients and the HTTP/3 backend, by direction", ("direction",),
            lambda: {("to_backend",): sum(b.toBackend for b in backends), ("from_backend",): sum(b.fromBackendCount for b in backends)}, counter=True,
        )

        def backendDrops() -> dict[tuple[str, ...], float]:
            drops: dict[tuple[str, ...], float] = {}
            for b in backends:
                for reason, count in b.dropped.items():
                    drops[(reason,)] = drops.get((reason,), 0) + count
                drops[("send_error",)] = drops.get(("send_error",), 0) + b.sendErrors
            return drops

        metrics.gauge(
            "tp_quic_h3_backend_dropped", "QUIC datagrams the HTTP/3 routing dropped, by reason (unreadable_initial, pending_full, hello_timeout, flows_full, socket, send_error; unconfirmed_replaced and unconfirmed_timeout count flows forgotten before the client answered the backend)",
            ("reason",), backendDrops, counter=True,
        )
    if config.cluster.shared and quicListeners:
        metrics.gauge(
            "tp_quic_route_dropped", "QUIC packets between instances dropped: rejected (bad MAC or framing, or not for this instance's slot) or undelivered (no live holder of the slot)",
            ("reason",), lambda: {("rejected",): router.rejected, ("undelivered",): router.undelivered}, counter=True,
        )
        metrics.gauge(
            "tp_quic_returned_datagrams", "QUIC packets of this instance's connections sent back through the instance that received the client's packets (a NAT in front)",
            (), lambda: {(): router.returned}, counter=True,
        )
        metrics.gauge("tp_quic_slot", "The QUIC routing slot this instance's connection ids name (-1: none yet)", (),
                      lambda: {(): -1 if router.slot is None else router.slot})
    if config.cluster.shared:
        clusterMetrics(metrics, store, top.links)  # type: ignore[attr-defined]
    top.metrics = metrics  # type: ignore[attr-defined]
    counting = MetricsService(metrics)
    counting.setName("metrics")
    counting.setServiceParent(top)
    tp = factory.wrappedFactory
    from tpproxy.config import loadServerConfig

    load: Any = loadServerConfig
    if config.worker is not None:
        # A worker reloads the file as it runs it (its ports and instance id).
        from tpproxy.workers import workerConfig

        load = lambda path, worker=config.worker: workerConfig(loadServerConfig(path), worker)  # noqa: E731
    reloader = Reloader(
        config, tp, tp.serverTLS, quicListeners, handshaking, metrics, acmeManaged=config.acme is not None and bool(config.acme.names), load=load
    )
    top.reloader = reloader  # type: ignore[attr-defined]
    from tpproxy.workers import takeHeldHangup

    ReloadService(reloader, reactor, held=takeHeldHangup if config.worker is not None else lambda: False).setServiceParent(top)
    if config.admin is not None:
        started = reactor.seconds()
        admin, adminTLS = makeAdmin(
            config, metrics, tp.serverTLS, reactor, lambda: serverStatus(tp, reloader, started, reactor.seconds, getattr(top, "links", None)), reloader.reload
        )
        if adminTLS is not None:
            reloader.alsoTLS.append(adminTLS)
        admin.setServiceParent(top)
        log.info(
            "Admin listener on {listen}: /metrics, /status, POST /reload{who}",
            listen=config.admin.listen,
            who=f", mutual TLS, for {', '.join(sorted(config.admin.identities))}" if config.admin.identities else "",
        )
    IdleService(factory.wrappedFactory, reactor).setServiceParent(top)
    trimmer = MemoryTrimmer(reactor, lambda: len(factory.protocols))
    trimmer.setName("memory")
    trimmer.setServiceParent(top)
    issuing = factory.issuing  # type: ignore[attr-defined]
    if issuing is not None:
        serverTLS = factory.wrappedFactory.serverTLS

        def installed(name: str, chain: list[Any], key: Any) -> None:
            if issuing.ownNames and name == issuing.ownNames[0]:
                serverTLS.setCertificate(chain, key)
                for quic in quicListeners:
                    quic.setCertificate(chain, key)
                log.info("Now serving the new certificate of {name} to new connections", name=name)
            elif serverTLS.replaceName(name, chain, key):
                log.info("Now serving the new certificate of E2E name {name} to new connections", name=name)

        issuing.onCertificate = installed
        issuing.setName("acme")
        issuing.setServiceParent(top)
        assert config.acme is not None
        if config.acme.http01Listen:
            from twisted.web.server import Site

            responder = strports.service(config.acme.http01Listen, Site(issuing.http01), reactor=reactor)
            responder.setName(f"acme-http01:{config.acme.http01Listen}")
            responder.setServiceParent(top)
    if config.router is not None:
        log.info(
            "Sharing {listen} with a web site: TP's clients get TP, others go to {backend}{terminate}",
            listen=", ".join(config.listen),
            backend=config.router.backend or "TP (no backend)",
            terminate=(
                f"; TLS for {', '.join(config.router.terminateNames)} ends here, plaintext to {config.router.terminateBackend}"
                if config.router.terminateNames
                else ""
            )
            + _h3Summary(config.router.h3),
        )
    log.info(
        "TP serving TLS (ALPN tp/1) on {listen} and QUIC on {quic}, with {rules} policy rule(s), config {path}",
        listen=", ".join(config.listen),
        quic=", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in config.quic) or "nothing",
        rules=len(config.policy.rules),
        path=config.path,
    )
    return top
