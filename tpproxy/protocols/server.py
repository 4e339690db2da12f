# -*- test-case-name: tpproxy.test.test_server -*-
"""
The TP server protocol over TLS: handshake, ClientHello, authorization,
dial, ServerHello, then a splice to the destination.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from ..dial import DialError, Dialer
from ..pki import PeerIdentity, identityOf
from ..tls import describeTLSFailure
from ..wire import ALPN, ClientHello, ErrorCode, FrameDecoder, ServerHello, WireError
from .relay import RelayEnd, splice

log = Logger(namespace="tpproxy.server")
audit = Logger(namespace="tpproxy.audit")

#: How long a refused peer has to read its ServerHello before TP hangs up.
LINGER = 5.0


class Outbound(RelayEnd):
    """
    TP's connection to a destination.
    """


class OutboundFactory(Factory):
    protocol = Outbound
    noisy = False


@implementer(IHandshakeListener)
class TPServerProtocol(RelayEnd, TimeoutMixin):
    """
    One client connection, from TLS handshake to close.

    States: C{handshake} -> C{hello} -> C{dialling} -> C{spliced}, or
    C{refused}; C{closed} at the end.  Exactly one audit event is logged
    per connection, when it closes.
    """

    state = "handshake"
    identity: PeerIdentity | None = None
    hello: ClientHello | None = None
    address: str | None = None
    result = "handshake_failed"
    detail = ""

    def __init__(self, factory: TPServerFactory) -> None:
        self.factory = factory
        self.decoder = FrameDecoder()
        self.pending = b""
        self.dialling: defer.Deferred[Any] | None = None
        self.outbound: Outbound | None = None

    def callLater(self, delay: float, f: Any, *a: Any, **kw: Any) -> Any:
        return self.factory.reactor.callLater(delay, f, *a, **kw)

    def connectionMade(self) -> None:
        self.started = self.factory.reactor.seconds()
        self.peerAddress = _addr(self.transport.getPeer())  # type: ignore[union-attr]
        self.setTimeout(self.factory.config.handshakeTimeout)

    # --- TLS handshake ------------------------------------------------------

    def handshakeCompleted(self) -> None:
        if self.state != "handshake":
            # Renegotiation is disabled; a second notification is a bug.
            self._refuse(ErrorCode.BAD_REQUEST, "unexpected renegotiation")
            return
        self.state = "hello"
        cert = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        try:
            self.identity = identityOf(cert.to_cryptography())
        except (ValueError, AttributeError) as e:
            self._refuse(ErrorCode.FORBIDDEN, f"no usable identity in the client certificate: {e}")
            return
        negotiated = self.transport.negotiatedProtocol  # type: ignore[union-attr]
        offered = getattr(self.transport, "tpALPNOffered", None)
        if negotiated != ALPN and offered is not None:
            names = ", ".join(p.decode("ascii", "replace") for p in offered)
            self._refuse(ErrorCode.BAD_REQUEST, f"this is a TP server: ALPN {ALPN.decode()} expected, client offered {names}")
            return
        self.result = "hello_timeout"
        self.setTimeout(self.factory.config.helloTimeout)

    def timeoutConnection(self) -> None:
        if self.state == "handshake":
            self.detail = f"no TLS handshake within {self.factory.config.handshakeTimeout:g} s"
            log.info("Timing out TLS handshake from {peer}", peer=self.peerAddress)
            self.transport.abortConnection()  # type: ignore[union-attr]
        elif self.state == "hello":
            self._refuse(ErrorCode.BAD_REQUEST, f"no complete ClientHello within {self.factory.config.helloTimeout:g} s")
        else:
            self.transport.abortConnection()  # type: ignore[union-attr]

    # --- hello ----------------------------------------------------------------

    def preSpliceData(self, data: bytes) -> None:
        if self.state != "hello":
            # Bytes read while dialling wait for the splice.  The transport
            # is paused, so at most what one read decrypted lands here.
            if self.state == "dialling":
                self.pending += data
            return
        self.decoder.feed(data)
        try:
            frame = self.decoder.nextFrame()
            if frame is None:
                return
            self.hello = ClientHello.fromObject(frame)
        except WireError as e:
            self._refuse(e.code, e.message)
            return
        self.pending = self.decoder.takeRest()
        self.setTimeout(None)
        self.state = "dialling"
        self.result = "aborted"  # until the dial ends: the client left first
        self.transport.pauseProducing()  # type: ignore[union-attr]
        assert self.identity is not None
        factory = OutboundFactory()
        self.dialling = self.factory.dialer.dial(self.identity.name, self.hello.host, self.hello.port, factory)
        self.dialling.addCallbacks(self._connected, self._dialFailed)

    def _connected(self, result: tuple[Outbound, str]) -> None:
        outbound, self.address = result
        self.dialling = None
        if self.state != "dialling":
            outbound.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.outbound = outbound
        self.state = "spliced"
        self.result = "ok"
        self.transport.write(ServerHello.success(address=self.address).toFrame())  # type: ignore[union-attr]
        pending, self.pending = self.pending, b""
        splice(self, outbound, fromA=pending)
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def _dialFailed(self, failure: Failure) -> None:
        self.dialling = None
        if self.state != "dialling":
            # The client went away and connectionLost cancelled the dial.
            return
        if failure.check(DialError):
            err: DialError = failure.value  # type: ignore[assignment]
            self.address = err.address
            self._refuse(err.code, err.message)
        else:
            log.failure("Unexpected error while dialling for {identity}", failure, identity=self.identity and self.identity.name)
            self._refuse(ErrorCode.INTERNAL, "internal error while connecting")

    def _refuse(self, code: ErrorCode, message: str) -> None:
        if self.state in ("refused", "closed"):
            return
        self.state = "refused"
        self.result = code.value
        self.detail = message
        self.transport.write(ServerHello.failure(code, message).toFrame())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]
        # Reading again (it is paused while dialling) lets the peer's close
        # reach us; LINGER bounds a peer that never closes.
        self.transport.resumeProducing()  # type: ignore[union-attr]
        self.setTimeout(LINGER)

    # --- end ------------------------------------------------------------------

    def connectionLost(self, reason: Failure) -> None:
        self.setTimeout(None)
        if self.state == "handshake":
            self.detail = self.detail or getattr(self.transport, "tpRefusal", None) or describeTLSFailure(reason)
        self.state = "closed"
        if self.dialling is not None:
            self.dialling.cancel()
        super().connectionLost(reason)
        self._audit()

    def _audit(self) -> None:
        hello = self.hello
        outbound = self.outbound
        audit.info(
            "{identity} {destination}: {result}{detail_sep}{detail}",
            event="connect",
            peer=self.peerAddress,
            identity=self.identity.name if self.identity else None,
            serial=self.identity.serial if self.identity else None,
            destination=f"{hello.host}:{hello.port}" if hello else None,
            transport=hello.transport if hello else None,
            address=self.address,
            result=self.result,
            detail=self.detail,
            detail_sep=" - " if self.detail else "",
            bytes_up=self.bytesIn,
            bytes_down=outbound.bytesIn if outbound else 0,
            duration=round(self.factory.reactor.seconds() - self.started, 3),
        )


def _addr(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TPServerFactory(Factory):
    """
    Builds L{TPServerProtocol}s; wrap it in L{tpproxy.tls.TLSFactory} with a
    L{tpproxy.tls.ServerTLS}.
    """

    def __init__(self, config: Any, reactor: Any, dialer: Dialer | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.dialer = dialer or Dialer(reactor, config.policy, config.connectTimeout)

    def buildProtocol(self, addr: Any) -> TPServerProtocol:
        return TPServerProtocol(self)

