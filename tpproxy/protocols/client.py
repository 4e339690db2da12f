# -*- test-case-name: tpproxy.test.test_client -*-
"""
The client side of the TP protocol: open a TLS connection to TP, send the
ClientHello, wait for the ServerHello, then hand the tunnel over for a
splice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from ..tls import TLSFactory, describeTLSFailure
from ..wire import ClientHello, FrameDecoder, ServerHello, WireError
from .relay import RelayEnd, noDelay


class TunnelError(Exception):
    """
    The tunnel could not be opened: TP unreachable, TLS refused, or a
    broken answer.  Exit status 1 in the CLI.
    """


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
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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

    def __init__(self, hello: ClientHello, ready: defer.Deferred[TPClientProtocol]) -> None:
        self.hello = hello
        self.ready = ready
        self.decoder = FrameDecoder()

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.transport.write(self.hello.toFrame())  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True

    def preSpliceData(self, data: bytes) -> None:
        if self.serverHello is not None:
            self.rest += data
            return
        self.decoder.feed(data)
        try:
            frame = self.decoder.nextFrame()
            if frame is None:
                return
            self.serverHello = ServerHello.fromObject(frame)
        except WireError as e:
            self._fail(TunnelError(f"TP sent a malformed ServerHello: {e.message}"))
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if not self.serverHello.ok:
            self._fail(Refused(self.serverHello.code or "unknown", self.serverHello.message))
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.rest = self.decoder.takeRest()
        self.transport.pauseProducing()  # type: ignore[union-attr]
        if not self.ready.called:
            self.ready.callback(self)

    def _fail(self, error: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(error)

    def connectionLost(self, reason: Failure) -> None:
        if not self.ready.called:
            if self.handshakeDone:
                what = "TP closed the connection before answering"
                detail = describeTLSFailure(reason)
                if "alert" in detail:
                    what = "TP refused the TLS connection (client certificate not accepted?)"
            else:
                what = "TLS handshake with TP failed"
                detail = describeTLSFailure(reason)
            self._fail(TunnelError(f"{what}: {detail}"))
        super().connectionLost(reason)


def openTunnel(
    reactor: Any, server: ServerAddress, tlsOptions: Any, hello: ClientHello, timeout: float = 15.0
) -> defer.Deferred[TPClientProtocol]:
    """
    Connect to TP and ask for C{hello}.

    @return: a L{Deferred} firing with the connected L{TPClientProtocol}
        (paused; splice it, then resume it), or failing with L{TunnelError}.
    """
    ready: defer.Deferred[TPClientProtocol] = defer.Deferred()
    factory = TLSFactory(tlsOptions, True, Factory.forProtocol(lambda: TPClientProtocol(hello, ready)), clock=reactor)
    endpoint = HostnameEndpoint(reactor, server.host, server.port, timeout=max(1, int(timeout)))
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
