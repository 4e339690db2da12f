# -*- test-case-name: tpproxy.test.test_client -*-
"""
The client side of the TP protocol: open a TLS connection to TP, send the
ClientHello, wait for the ServerHello, then hand the tunnel over for a
splice.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy.firstframe import FirstFrameReader, Frame, Malformed, Raw
from tpproxy.protocols.relay import RelayEnd, noDelay
from tpproxy.reactors import IDialReactor
from tpproxy.transports.tls import TLSFactory, describeTLSFailure, receivedAlert
from tpproxy.verify import humanReason
from tpproxy.wire import ClientHello, ServerHello


class TunnelError(Exception):
    """
    The tunnel could not be opened: TP unreachable, TLS refused, or a
    broken answer.  Exit status 1 in the CLI.

    @ivar alert: the TLS alert TP refused the client certificate with, if
        that is why (its one-line reason is the message).
    """

    alert: int | None = None


def certificateRefusal(alert: int | None, transport: str = "TLS", name: str | None = None) -> TunnelError | None:
    """
    The error for TP's refusal of the client certificate with the TLS alert
    C{alert} on C{transport} (C{"TLS"}, C{"QUIC"}, or C{"E2E TLS"} to the
    E2E name C{name}): its message is one line a person can act on
    (L{tpproxy.verify.HUMAN_REASONS}); L{None} if C{alert} is not about
    the certificate.
    """
    line = humanReason(alert, transport, name) if alert is not None else None
    if line is None:
        return None
    error = TunnelError(line)
    error.alert = alert
    return error


class Refused(TunnelError):
    """
    TP answered with an error code.  Exit status 3 in the CLI.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message



@dataclass(frozen=True)
class ServerAddress:
    """
    Where TP is: C{host} (the name its certificate is checked against, and
    else resolved) and C{port}; C{address}, if set, is the one address of
    C{host} to connect to (an exposer's link to one instance).
    """

    host: str
    port: int
    address: str | None = None

    @property
    def connectHost(self) -> str:
        return self.address or self.host

    def __str__(self) -> str:
        text = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"{text} (at {self.address})" if self.address else text


@implementer(IHandshakeListener)
class TPClientProtocol(RelayEnd):
    """
    Sends one ClientHello and reads one ServerHello.  On success C{ready}
    fires with this protocol, its transport paused; the bytes that followed
    the ServerHello are in L{rest}.
    """

    handshakeDone = False
    serverHello: ServerHello | None = None
    rest = b""
    inner: Any = None

    def __init__(self, hello: ClientHello, ready: defer.Deferred[Any], innerTLS: Any = None) -> None:
        self.hello = hello
        self.ready = ready
        self.innerTLS = innerTLS
        self.reader: FirstFrameReader[ServerHello] = FirstFrameReader(ServerHello.fromObject)

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.transport.write(self.hello.toFrame())  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True

    def preSpliceData(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        match self.reader.feed(data):
            case Frame(message=hello, rest=rest):
                self._answered(hello, rest)
            case Raw(data=more):
                self.rest += more
            case Malformed(error=error):
                self._fail(TunnelError(f"TP sent a malformed ServerHello: {error.message}"))
                self.transport.loseConnection()  # type: ignore[union-attr]

    def _answered(self, hello: ServerHello, rest: bytes) -> None:
        self.serverHello = hello
        if not hello.ok:
            self._fail(Refused(hello.code or "unknown", hello.message))
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.rest = rest
        name = hello.info.get("e2e")
        if name is not None:
            if str(name) != self.hello.host.lower().rstrip("."):
                # The inner handshake must authenticate the name we asked
                # for, not one TP chose.
                self._fail(TunnelError(f"TP answered with E2E name {name!r} for {self.hello.host!r}"))
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self._startE2E(str(name))
            return
        self.transport.pauseProducing()  # type: ignore[union-attr]
        if not self.ready.called:
            self.ready.callback(self)

    def _startE2E(self, name: str) -> None:
        """
        The destination is an E2E exposure: run a second TLS handshake
        inside the tunnel, with the exposure's name, and splice its inside.
        """
        if self.innerTLS is None:
            self._fail(TunnelError(f"{name} is an E2E exposure, which needs a certificate for the inner handshake"))
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        factory = TLSFactory(self.innerTLS(name), True, Factory.forProtocol(lambda: InnerClient(name, self.ready)))
        self.inner = factory.buildProtocol(None)
        self.inner.makeConnection(self.transport)
        rest, self.rest = self.rest, b""
        if rest:
            self.inner.dataReceived(rest)

    def preSpliceEOF(self) -> None:
        if self.inner is not None:
            self.inner.connectionLost(Failure(ConnectionDone("TP closed the tunnel")))
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _fail(self, error: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(error)

    def connectionLost(self, reason: Failure) -> None:
        if self.inner is not None:
            if self.inner.connected:
                self.inner.connectionLost(reason)
        elif not self.ready.called:
            refused = certificateRefusal(receivedAlert(reason))
            if refused is not None:
                self._fail(refused)
            else:
                if self.handshakeDone:
                    what = "TP closed the connection before answering"
                    detail = describeTLSFailure(reason)
                    if "alert" in detail:
                        what = "TP refused the TLS connection"
                else:
                    what = "TLS handshake with TP failed"
                    detail = describeTLSFailure(reason)
                self._fail(TunnelError(f"{what}: {detail}"))
        super().connectionLost(reason)


@implementer(IHandshakeListener)
class InnerClient(RelayEnd):
    """
    The inside of an E2E connection: after the inner handshake, TP sends a
    ServerHello saying whether the exposer accepted.
    """

    rest = b""
    handshakeDone = False

    def __init__(self, name: str, ready: defer.Deferred[Any]) -> None:
        self.name = name
        self.ready = ready
        self.reader: FirstFrameReader[ServerHello] = FirstFrameReader(ServerHello.fromObject)

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True

    def preSpliceData(self, data: bytes) -> None:
        match self.reader.feed(data):
            case Frame(message=hello, rest=rest):
                if not hello.ok:
                    self._fail(Refused(hello.code or "unknown", hello.message))
                    return
                self.rest = rest
                self.transport.pauseProducing()  # type: ignore[union-attr]
                if not self.ready.called:
                    self.ready.callback(self)
            case Raw(data=more):
                self.rest += more
            case Malformed(error=error):
                self._fail(TunnelError(f"{self.name} sent a malformed answer: {error.message}"))

    def _fail(self, error: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(error)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure) -> None:
        refused = certificateRefusal(receivedAlert(reason), "E2E TLS", self.name) if not self.ready.called else None
        if refused is not None:
            # TP checks the inner handshake's certificate and dialer
            # (NameTLS): say why in one line.
            self.ready.errback(refused)
        elif not self.ready.called:
            detail = describeTLSFailure(reason)
            if self.handshakeDone:
                self.ready.errback(TunnelError(f"the E2E exposure {self.name} refused this client certificate or closed: {detail}"))
            else:
                self.ready.errback(TunnelError(f"E2E TLS handshake with {self.name} failed: {detail}"))
        super().connectionLost(reason)


def tcpEndpoint(reactor: IDialReactor, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    A TCP client endpoint to C{host}: a L{HostnameEndpoint} for a name, a
    plain TCP endpoint for an IP address (a HostnameEndpoint would
    "resolve" it too, by C{getaddrinfo} in a thread, for every tunnel).
    """
    seconds = max(1, int(timeout))
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=seconds)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, str(address), port, timeout=seconds)
    return TCP4ClientEndpoint(reactor, str(address), port, timeout=seconds)


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """
    TLS (with L{HalfCloseTLSProtocol}) over TCP (L{tcpEndpoint}); fires
    with the application protocol.
    """

    def __init__(self, reactor: IDialReactor, server: ServerAddress, tlsOptions: Any, timeout: float = 15.0) -> None:
        self.reactor = reactor
        self.server = server
        self.tlsOptions = tlsOptions
        self.timeout = timeout

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        tlsFactory = TLSFactory(self.tlsOptions, True, factory, clock=self.reactor)
        endpoint = tcpEndpoint(self.reactor, self.server.connectHost, self.server.port, self.timeout)
        return endpoint.connect(tlsFactory).addCallback(lambda tlsProtocol: tlsProtocol.wrappedProtocol)


def openTunnel(
    reactor: IDialReactor,
    server: ServerAddress,
    tlsOptions: Any,
    hello: ClientHello,
    timeout: float = 15.0,
    innerTLS: Any = None,
) -> defer.Deferred[Any]:
    """
    Connect to TP and ask for C{hello}.

    @param innerTLS: C{name -> client TLS options} for the inner handshake
        when the destination turns out to be an E2E exposure.
    @return: a L{Deferred} firing with the end to splice (a
        L{TPClientProtocol}, or an L{InnerClient} for an E2E exposure),
        paused, with the bytes that followed its ServerHello in C{rest}; or
        failing with L{TunnelError}.
    """
    ready: defer.Deferred[TPClientProtocol] = defer.Deferred()
    factory = TLSFactory(tlsOptions, True, Factory.forProtocol(lambda: TPClientProtocol(hello, ready, innerTLS)), clock=reactor)
    endpoint = tcpEndpoint(reactor, server.connectHost, server.port, timeout)
    connecting = endpoint.connect(factory)
    connected: list[Any] = []

    def cannotConnect(f: Failure) -> None:
        if not ready.called:
            ready.errback(TunnelError(f"cannot reach TP at {server}: {f.getErrorMessage()}"))

    connecting.addCallbacks(connected.append, cannotConnect)

    def timedOut(f: Failure) -> Failure:
        if f.check(defer.TimeoutError, defer.CancelledError):
            connecting.cancel()
            for tlsProtocol in connected:
                tlsProtocol.abortConnection()
            raise TunnelError(f"no answer from TP at {server} within {timeout:g} s")
        return f

    ready.addTimeout(timeout, reactor)
    ready.addErrback(timedOut)
    return ready
