# -*- test-case-name: tpproxy.test.test_router -*-
"""
Sharing a TCP port (443) between TP and other TLS services: route each
connection by its ClientHello, without terminating TLS.

A L{RouterProtocol} reads the first bytes of a connection and feeds them to
L{tpproxy.clienthello.ClientHelloParser}, buffering them, until the
ClientHello is complete.  Then it asks the factory's C{route} callable,
C{route(info) -> Route}, where the connection goes:

  - L{ToFactory}: to a protocol built by an in-process factory.  The
    protocol is connected to the router's own transport, so it writes to
    the socket directly, and it gets every buffered byte, exactly once and
    in order, as if it had read them itself.  On a reactor transport the
    protocol then becomes the transport's protocol, so the router is off
    the data path; on other transports (tests) the router forwards what the
    transport reports: C{dataReceived}, C{connectionLost}, and half-close
    (C{readConnectionLost}, C{writeConnectionLost}; to a protocol that does
    not do half-close, an EOF read closes the connection, as the reactor
    itself would).  Which factory is used makes the mode:

      - TP itself: its listening factory (L{tpproxy.transports.tls.TLSFactory} around
        the TP protocol), so TP's TLS handshake starts from the buffered
        ClientHello;
      - passthrough, L{toBackend}: a L{BackendFactory}, whose protocol
        connects to a backend (the web server's own TLS port), sends an
        optional PROXY protocol v2 header (L{tpproxy.proxyproto}) and then
        the untouched bytes, and relays both ways with flow control and
        half-close (L{tpproxy.protocols.relay});
      - termination, L{terminateTLS}: TP's TLS layer around a
        L{BackendFactory}: TLS ends in TP and the plaintext goes on to the
        backend.

  - L{Refuse}: close the connection, after a TLS alert.

A ClientHello that is malformed, larger than the limit, or not complete
within the timeout closes the connection too, with the reason logged
(namespace C{tpproxy.router}) beside the peer's address.  Nothing a client
sends can reach the listener: every failure ends one connection only.

L{defaultRoute} builds the usual rule: ALPN C{tp/1} or a TP name as SNI
goes to TP, anything else to the backend (or to TP when there is none, to
be refused in the TLS handshake).
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Iterable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy.clienthello import (
    ALERT_HANDSHAKE_FAILURE,
    DEFAULT_LIMIT,
    ClientHelloError,
    ClientHelloInfo,
    ClientHelloParser,
)
from tpproxy.limits import holdPlace
from tpproxy.names import normalize
from tpproxy.protocols.relay import RelayEnd, describeAddress, noDelay, splice
from tpproxy.proxyproto import proxyV2Header
from tpproxy.transports.tls import HalfCloseTLSProtocol, TLSFactory

log = Logger(namespace="tpproxy.router")

#: The ALPN name that sends a client to TP.
TP_ALPN = "tp/1"
#: How long a client has to send its whole ClientHello, by default.
DEFAULT_TIMEOUT = 10.0


def alertRecord(description: int) -> bytes:
    """
    A TLS record holding one fatal alert (level 2) with C{description}.
    """
    return b"\x15\x03\x03\x00\x02\x02" + bytes([description])


# --- routes ---------------------------------------------------------------


class Route:
    """
    Where a connection goes; what a route callable returns.

    A route is either a L{Refuse}, or anything with a C{name} and a
    C{buildProtocol(address) -> IProtocol | None} method (L{ToFactory} is
    the usual one): the protocol it builds gets the connection.

    @ivar name: names the route in the log.
    """

    name = "route"


class ToFactory(Route):
    """
    Hand the connection to a protocol built by C{factory}.

    The protocol is built with C{factory.buildProtocol(peerAddress)} and
    connected to the client's transport with C{makeConnection}; a factory
    that answers L{None} refuses the connection.
    """

    def __init__(self, factory: IProtocolFactory, name: str = "local") -> None:
        self.factory = factory
        self.name = name

    def buildProtocol(self, address: Any) -> IProtocol | None:
        return self.factory.buildProtocol(address)

    def __repr__(self) -> str:
        return f"<ToFactory {self.name} {self.factory!r}>"


class Refuse(Route):
    """
    Close the connection, after the TLS alert C{alert} (none if L{None}).
    """

    def __init__(self, reason: str, alert: int | None = ALERT_HANDSHAKE_FAILURE) -> None:
        self.reason = reason
        self.alert = alert
        self.name = "refuse"

    def __repr__(self) -> str:
        return f"<Refuse {self.reason!r}>"


# --- the relay to a backend -------------------------------------------------


class _BackendEnd(RelayEnd):
    """
    The router's connection to a backend.
    """

    def connectionMade(self) -> None:
        noDelay(self.transport)

    early = b""

    def preSpliceData(self, data: bytes) -> None:
        # The splice happens as the connection is made, so nothing should
        # come first; if something does, it is passed on at the splice.
        self.early += data


_BACKEND_ENDS = Factory.forProtocol(_BackendEnd)
_BACKEND_ENDS.noisy = False


@implementer(IHalfCloseableProtocol)
class BackendRelay(RelayEnd):
    """
    The client's side of a relay to a backend: connects to the backend,
    holding the client's bytes (and pausing the client) until then; sends
    the PROXY header if asked, then splices the two connections.
    """

    connecting: Deferred[Any] | None = None

    def __init__(self, factory: BackendFactory, address: Any) -> None:
        self.factory = factory
        self.address = address
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        noDelay(self.transport)
        # Hold the client until the backend is there: what it sends meanwhile
        # waits in the kernel, not here.
        self.transport.pauseProducing()  # type: ignore[union-attr]
        d = self.connecting = self.factory.endpoint.connect(_BACKEND_ENDS)
        d.addCallbacks(self._connected, self._failed)
        d.addErrback(self._bug)

    def preSpliceData(self, data: bytes) -> None:
        self.pending.append(data)

    def _connected(self, backend: _BackendEnd) -> None:
        self.connecting = None
        if self.closed:
            backend.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self.factory.proxyHeader:
            header = proxyV2Header(self.transport.getPeer(), self.transport.getHost())  # type: ignore[union-attr]
            backend.transport.write(header)  # type: ignore[union-attr]
        pending, self.pending = b"".join(self.pending), []
        splice(self, backend, fromA=pending, fromB=backend.early)
        if not self.closed and not self.readClosed:
            # (After an EOF, resuming would read the EOF again.)
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _failed(self, failure: Failure) -> None:
        self.connecting = None
        if failure.check(CancelledError) and self.closed:
            return
        log.warn(
            "Cannot reach backend {backend} for {peer}: {error}",
            backend=self.factory.name,
            peer=describeAddress(self.address),
            error=failure.getErrorMessage(),
        )
        if not self.closed:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _bug(self, failure: Failure) -> None:
        log.failure("Relaying {peer} to backend {backend} failed", failure, peer=describeAddress(self.address), backend=self.factory.name)
        if not self.closed:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True
        if self.connecting is not None:
            self.connecting.cancel()
        super().connectionLost(reason)


class BackendFactory(Factory):
    """
    Builds L{BackendRelay}s to C{endpoint}.

    @ivar proxyHeader: send a PROXY protocol v2 header with the client's
        address before the client's bytes.
    @ivar name: names the backend in the log.
    """

    noisy = False

    def __init__(self, endpoint: IStreamClientEndpoint, proxyHeader: bool = False, name: str = "backend") -> None:
        self.endpoint = endpoint
        self.proxyHeader = proxyHeader
        self.name = name

    def buildProtocol(self, addr: Any) -> BackendRelay:
        return BackendRelay(self, addr)


def toBackend(endpoint: IStreamClientEndpoint, proxyHeader: bool = False, name: str = "backend") -> ToFactory:
    """
    The passthrough route: the connection's bytes, untouched, to
    C{endpoint}, after a PROXY v2 header if C{proxyHeader}.
    """
    return ToFactory(BackendFactory(endpoint, proxyHeader, name), name)


def terminateTLS(
    contextFactory: Any, endpoint: IStreamClientEndpoint, proxyHeader: bool = False, name: str = "terminate"
) -> ToFactory:
    """
    The terminating route: TLS ends here, with C{contextFactory} (an
    L{twisted.internet.interfaces.IOpenSSLServerConnectionCreator} such as
    a L{twisted.internet.ssl.CertificateOptions}), and the plaintext goes
    to C{endpoint}, after a PROXY v2 header if C{proxyHeader}.  TLS
    half-close (C{close_notify}) becomes a TCP half-close to the backend
    and back.
    """
    return ToFactory(TLSFactory(contextFactory, False, BackendFactory(endpoint, proxyHeader, name)), name)


# --- the rule ---------------------------------------------------------------


class DefaultRoute:
    """
    The usual rule: a client that offers ALPN C{tp/1}, or names one of TP's
    names in SNI, goes to TP; an SNI of C{terminateNames} to C{terminate}
    (TLS ended here); any other to C{backend}, or to TP if there is no
    backend (TP refuses it in the handshake).

    @ivar factories: the factories of the routes, for L{RouterFactory} to
        start and stop.
    """

    def __init__(
        self,
        tpNames: Callable[[str], bool] | Collection[str],
        tpFactory: IProtocolFactory,
        backend: Route | None = None,
        terminate: Route | None = None,
        terminateNames: Collection[str] = (),
    ) -> None:
        if callable(tpNames):
            self.isTPName: Callable[[str], bool] = tpNames
        else:
            names = frozenset(normalize(n) for n in tpNames)
            self.isTPName = names.__contains__
        self.tp = ToFactory(tpFactory, "tp")
        self.backend = backend
        self.terminate = terminate
        self.terminateNames = frozenset(normalize(n) for n in terminateNames)
        self.factories: list[IProtocolFactory] = [r.factory for r in (self.tp, backend, terminate) if isinstance(r, ToFactory)]

    def __call__(self, info: ClientHelloInfo) -> Route:
        if TP_ALPN in info.alpn:
            return self.tp
        name = info.serverName
        if name is not None:
            if self.isTPName(name):
                return self.tp
            if self.terminate is not None and name in self.terminateNames:
                return self.terminate
        return self.backend if self.backend is not None else self.tp


def defaultRoute(
    tpNames: Callable[[str], bool] | Collection[str],
    tpFactory: IProtocolFactory,
    backend: Route | None = None,
    terminate: Route | None = None,
    terminateNames: Collection[str] = (),
) -> DefaultRoute:
    """
    The usual rule (see L{DefaultRoute}).

    @param tpNames: TP's server names: a set, or a predicate on a
        lowercased name without a trailing dot.
    @param tpFactory: TP's listening factory (see
        L{tpproxy.service.makeServerFactory}).
    @param backend: where the rest goes (L{toBackend}), if anywhere.
    @param terminate: the route for C{terminateNames} (L{terminateTLS}).
    """
    return DefaultRoute(tpNames, tpFactory, backend, terminate, terminateNames)


# --- the router -----------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class RouterProtocol(Protocol):
    """
    One connection: read the ClientHello, then hand the connection over.

    @ivar info: the parsed ClientHello, once complete.
    @ivar route: the route taken.
    @ivar inner: the protocol the connection was handed to.
    """

    factory: RouterFactory
    info: ClientHelloInfo | None = None
    route: Route | None = None
    inner: IProtocol | None = None
    refused = False
    _timer: Any = None

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.parser = ClientHelloParser(self.factory.limit)
        self.buffered = bytearray()
        self.received = 0
        self._timer = self.factory.reactor.callLater(self.factory.timeout, self._timedOut)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # --- before the hand-over ---------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        inner = self.inner
        if inner is not None:
            inner.dataReceived(data)
            return
        if self.refused:
            return
        self.buffered += data
        self.received += len(data)
        try:
            info = self.parser.feed(data)
        except ClientHelloError as e:
            self.refuse(f"bad ClientHello: {e}", e.alert)
            return
        if info is not None:
            self.info = info
            self._handOver(info)

    def _timedOut(self) -> None:
        self._timer = None
        if self.inner is None and not self.refused:
            self.refuse(f"no complete ClientHello within {self.factory.timeout:g} s ({self.received} bytes)", None)

    def refuse(self, reason: str, alert: int | None = ALERT_HANDSHAKE_FAILURE) -> None:
        """
        Close the connection (after a TLS alert, unless C{alert} is
        L{None} or the factory sends none) and log why.
        """
        self._cancelTimer()
        self.refused = True
        self.buffered = bytearray()
        info = self.info
        log.info(
            "Refusing {peer}: {reason}",
            peer=describeAddress(self.peer),
            reason=reason,
            sni=info.serverName if info else None,
            alpn=info.alpn if info else None,
        )
        if alert is not None and self.factory.sendAlerts:
            self.transport.write(alertRecord(alert))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _handOver(self, info: ClientHelloInfo) -> None:
        self._cancelTimer()
        try:
            route = self.factory.route(info)
            if isinstance(route, Refuse):
                self.refuse(route.reason, route.alert)
                return
            inner = route.buildProtocol(self.peer)  # type: ignore[attr-defined]
        except Exception:
            log.failure("Routing {peer} (SNI {sni}, ALPN {alpn}) failed", peer=describeAddress(self.peer), sni=info.serverName, alpn=info.alpn)
            self.refuse("routing failed", None)
            return
        if inner is None:
            self.refuse(f"route {route.name} turned the connection away", None)
            return
        log.debug(
            "Routing {peer} (SNI {sni}, ALPN {alpn}) to {route}",
            peer=describeAddress(self.peer),
            sni=info.serverName,
            alpn=info.alpn,
            route=route.name,
        )
        self.route = route
        self.inner = inner
        place = getattr(self, "tpHalfOpen", None)
        if place is not None:
            # The half-open place (tpproxy.limits.HalfOpenGate) follows the
            # connection to TP's TLS, until its handshake completes; a
            # connection handed to a web route is no longer TP's handshake.
            if isinstance(inner, HalfCloseTLSProtocol):
                holdPlace(inner, place)
            else:
                place.release()
        buffered, self.buffered = bytes(self.buffered), bytearray()
        inner.makeConnection(self.transport)
        if hasattr(self.transport, "protocol"):
            # A reactor transport: let it deliver to the inner protocol
            # directly, so the router is off the data path (and EOF and
            # half-close reach the inner protocol as from a listener).  The
            # forwarding methods below serve other transports.
            self.transport.protocol = inner  # type: ignore[union-attr]
        inner.dataReceived(buffered)

    # --- the transport's other events -------------------------------------------

    def readConnectionLost(self) -> None:
        inner = self.inner
        if inner is None:
            if self.refused:
                return
            if self.received == 0:
                # A health check or port probe: not worth a log line.
                self.refused = True
                log.debug("{peer} closed without sending anything", peer=describeAddress(self.peer))
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.refuse(f"EOF after {self.received} bytes, before a complete ClientHello", None)
            return
        halfCloseable = IHalfCloseableProtocol(inner, None)
        if halfCloseable is not None:
            halfCloseable.readConnectionLost()
        else:
            # What the reactor does for a protocol without half-close: the
            # connection is lost at once (not after pending writes drain).
            self.transport.abortConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        halfCloseable = IHalfCloseableProtocol(self.inner, None) if self.inner is not None else None
        if halfCloseable is not None:
            halfCloseable.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        self._cancelTimer()
        inner = self.inner
        if inner is not None:
            inner.connectionLost(reason)
        elif not self.refused:
            if self.received:
                log.info(
                    "{peer} closed after {count} bytes, before a complete ClientHello",
                    peer=describeAddress(self.peer),
                    count=self.received,
                )
            else:
                log.debug("{peer} closed without sending anything", peer=describeAddress(self.peer))


class RouterFactory(ServerFactory):
    """
    Listen with this factory to route connections by their ClientHello.

    @ivar route: C{route(info: ClientHelloInfo) -> Route}.
    @ivar reactor: for the timeout.
    @ivar timeout: seconds a client has to send its ClientHello.
    @ivar limit: the largest ClientHello accepted, in bytes.
    @ivar sendAlerts: send a TLS alert before closing on a bad ClientHello.
    @ivar factories: in-process factories the routes hand connections to;
        they are started and stopped with this factory.  By default, the
        route's C{factories} attribute if it has one (L{DefaultRoute} does).
    """

    protocol = RouterProtocol
    noisy = False

    def __init__(
        self,
        route: Callable[[ClientHelloInfo], Route],
        reactor: IReactorTime | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        limit: int = DEFAULT_LIMIT,
        sendAlerts: bool = True,
        factories: Iterable[IProtocolFactory] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.route = route
        self.reactor = reactor
        self.timeout = timeout
        self.limit = limit
        self.sendAlerts = sendAlerts
        self.factories = list(factories if factories is not None else getattr(route, "factories", ()))

    def startFactory(self) -> None:
        for factory in self.factories:
            factory.doStart()

    def stopFactory(self) -> None:
        for factory in self.factories:
            factory.doStop()
