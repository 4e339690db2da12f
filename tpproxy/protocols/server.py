# -*- test-case-name: tpproxy.test.test_server -*-
"""
The TP server protocol over TLS: handshake, ClientHello, authorization,
dial, ServerHello, then a splice to the destination.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy.dial import DialError, Dialer
from tpproxy.pki import PeerIdentity, identityOf
from tpproxy.reverse.registry import Exposure, ReverseError
from tpproxy.transports.servertls import NameTLS
from tpproxy.transports.tls import TLSFactory, describeTLSFailure
from tpproxy.wire import ALPN, ClientHello, ErrorCode, FrameDecoder, ServerHello, WireError, encodeEvent, parseEvent
from tpproxy.protocols.relay import RelayEnd, noDelay, splice
from tpproxy.protocols.relay import describeAddress as _addr

log = Logger(namespace="tpproxy.server")
audit = Logger(namespace="tpproxy.audit")

#: How long a refused peer has to read its ServerHello before TP hangs up.
LINGER = 5.0


class Outbound(RelayEnd):
    """
    TP's connection to a destination.
    """

    def connectionMade(self) -> None:
        noDelay(self.transport)


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
    event = "connect"
    exposure: Exposure | None = None
    inner: Any = None
    flow: Any = None
    innerEnd: RelayEnd | None = None
    innerClosed = False
    sid: str | None = None
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
        noDelay(self.transport)
        self.setTimeout(self.factory.config.handshakeTimeout)

    # --- TLS handshake ------------------------------------------------------

    def handshakeCompleted(self) -> None:
        if self.state != "handshake":
            # Renegotiation is disabled; a second notification is a bug.
            self._refuse(ErrorCode.BAD_REQUEST, "unexpected renegotiation")
            return
        self.state = "hello"
        challenge = getattr(self.transport, "tpACMEChallenge", None)
        if challenge is not None:
            # An ACME validator fetched the tls-alpn-01 certificate: it has
            # no client certificate and gets nothing but the handshake.
            self.state = "refused"
            self.result = "acme_challenge"
            self.detail = f"tls-alpn-01 challenge for {challenge}"
            log.info("Served the tls-alpn-01 challenge for {name} to {peer}", name=challenge, peer=self.peerAddress)
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        cert = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        try:
            self.identity = identityOf(cert.to_cryptography())
        except (ValueError, AttributeError) as e:
            self._refuse(ErrorCode.FORBIDDEN, f"no usable identity in the client certificate: {e}")
            return
        sniName = getattr(self.transport, "tpSNIName", None)
        if sniName is not None and self._sniDialer(sniName):
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
        state = self.state
        if state == "e2e":
            self.inner.dataReceived(data)  # type: ignore[union-attr]
            return
        if state == "udp":
            self.flow.streamData(data)  # type: ignore[union-attr]
            return
        if state == "listening":
            self._controlData(data)
            return
        if state != "hello":
            # Bytes read while dialling or waiting wait for the splice.  The
            # transport is paused, so at most what one read decrypted lands
            # here.
            if state in ("dialling", "waiting"):
                self.pending += data
            return
        try:
            frame = self.decoder.feedFrame(data)
            if frame is None:
                return
            self.hello = ClientHello.fromObject(frame)
        except WireError as e:
            self._refuse(e.code, e.message)
            return
        self.pending = self.decoder.takeRest()
        self.setTimeout(None)
        self.event = self.hello.op
        self.result = "aborted"  # until the request ends: the client left first
        self.transport.pauseProducing()  # type: ignore[union-attr]
        assert self.identity is not None
        if self.hello.op == "listen":
            self._listen(self.hello)
        elif self.hello.op == "udp":
            self._udp(self.hello)
        elif self.hello.op == "accept":
            self._accept(self.hello)
        elif self.factory.registry.nameExposure(self.hello.host) is not None:
            self._connectE2E(self.hello)
        else:
            self.state = "dialling"
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

    # --- UDP flows ---------------------------------------------------------------

    def _udp(self, hello: ClientHello) -> None:
        assert self.identity is not None
        self.state = "dialling"
        self.dialling = self.factory.dialer.allowedAddresses(self.identity.name, hello.host, hello.port, "udp")
        self.dialling.addCallbacks(self._udpAllowed, self._dialFailed)

    def _udpAllowed(self, addresses: list[str]) -> None:
        from tpproxy.transports.udp import ServerFlow

        self.dialling = None
        if self.state != "dialling":
            return
        assert self.hello is not None
        self.address = addresses[0]
        self.flow = ServerFlow(self.factory.reactor, self, self.address, self.hello.port)
        self.state = "udp"
        self.result = "ok"
        framing = "datagram" if self.flow.quic is not None else "stream"
        self.transport.write(  # type: ignore[union-attr]
            ServerHello.success(address=self.address, flow=self.flow.quarterId, framing=framing).toFrame()
        )
        rest, self.pending = self.pending, b""
        self.transport.resumeProducing()  # type: ignore[union-attr]
        if rest:
            self.flow.streamData(rest)

    # --- reverse: listen ------------------------------------------------------

    def _listen(self, hello: ClientHello) -> None:
        self.state = "registering"
        assert self.identity is not None
        d = self.factory.registry.expose(self, self.identity.name, hello.mode, port=hello.port, name=hello.name)
        d.addCallbacks(self._listening, self._reverseFailed)

    def _listening(self, exposure: Exposure) -> None:
        if self.state != "registering":
            self.factory.registry.remove(exposure)
            return
        self.exposure = exposure
        self.state = "listening"
        self.result = "ok"
        self.address = exposure.describe()
        info = {"port": exposure.port} if exposure.mode == "public" else {"name": exposure.name}
        self.transport.write(ServerHello.success(**info).toFrame())  # type: ignore[union-attr]
        log.info("{identity} exposes {exposure}", identity=exposure.owner, exposure=exposure.describe())
        self.transport.resumeProducing()  # type: ignore[union-attr]
        rest, self.pending = self.pending, b""
        self._schedulePing()
        self._resetDeadline()
        if rest:
            self._controlData(rest)

    def _reverseFailed(self, failure: Failure) -> None:
        if self.state in ("refused", "closed"):
            return
        if failure.check(ReverseError):
            err: ReverseError = failure.value  # type: ignore[assignment]
            self._refuse(err.code, err.message)
        else:
            log.failure("Unexpected error in {op} for {identity}", failure, op=self.event, identity=self.identity and self.identity.name)
            self._refuse(ErrorCode.INTERNAL, "internal error")

    def _controlData(self, data: bytes) -> None:
        self.decoder.feed(data)
        while True:
            try:
                frame = self.decoder.nextFrame()
                if frame is None:
                    return
                event, _ = parseEvent(frame)
            except WireError as e:
                self.closeControl(f"bad event from the exposer: {e.message}")
                return
            self._resetDeadline()
            if event == "ping":
                self.transport.write(encodeEvent("pong"))  # type: ignore[union-attr]

    def _schedulePing(self) -> None:
        self._pinger = self.factory.reactor.callLater(self.factory.config.keepalive, self._ping)

    def _ping(self) -> None:
        self.transport.write(encodeEvent("ping"))  # type: ignore[union-attr]
        self._schedulePing()

    def _resetDeadline(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None and deadline.active():
            deadline.reset(3 * self.factory.config.keepalive)
        else:
            self._deadline = self.factory.reactor.callLater(
                3 * self.factory.config.keepalive,
                self.closeControl,
                f"nothing heard from the exposer for {3 * self.factory.config.keepalive:g} s",
            )

    def sendIncoming(self, session: str, identity: str | None, peer: str) -> None:
        quic = getattr(self.transport, "session", None)
        if quic is not None and hasattr(self.transport, "streamId"):
            # Over QUIC the session is a new stream TP opens on the same
            # connection: it can never land anywhere else, and needs no
            # accept (the connection is the exposer's, authenticated).
            assert self.identity is not None
            quic.openStream(IncomingStreamEnd(self.factory.registry, session, self.identity.name, identity, peer))
            return
        self.transport.write(encodeEvent("incoming", session=session, identity=identity, peer=peer))  # type: ignore[union-attr]

    def closeControl(self, reason: str) -> None:
        if self.state == "listening":
            self.detail = reason
            self.state = "closing"
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _stopControl(self) -> None:
        for name in ("_pinger", "_deadline"):
            call = getattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
        if self.exposure is not None:
            self.factory.registry.remove(self.exposure)
            log.info("{identity} no longer exposes {exposure}", identity=self.exposure.owner, exposure=self.exposure.describe())

    # --- reverse: accept ------------------------------------------------------

    def _accept(self, hello: ClientHello) -> None:
        assert self.identity is not None and hello.session is not None
        try:
            pending = self.factory.registry.claim(hello.session, self.identity.name)
        except ReverseError as e:
            self._refuse(e.code, e.message)
            return
        self.state = "spliced"
        self.result = "ok"
        self.address = pending.exposure.describe()
        self.detail = f"dialer {pending.dialerIdentity or pending.peer}"
        self.transport.write(ServerHello.success().toFrame())  # type: ignore[union-attr]
        rest, self.pending = self.pending, b""
        pending.dialer.sessionJoined(self)
        if rest:
            self.bytesIn += len(rest)
            self.peer.transport.write(rest)  # type: ignore[union-attr]
        self.transport.resumeProducing()  # type: ignore[union-attr]

    # --- E2E: through a TP tunnel, and direct by SNI ---------------------------

    def _connectE2E(self, hello: ClientHello) -> None:
        assert self.identity is not None
        name = hello.host.lower().rstrip(".")
        decision = self.factory.config.policy.checkName(self.identity.name, name, hello.port, hello.transport)
        if not decision.allowed:
            self._refuse(ErrorCode.FORBIDDEN, decision.reason)
            return
        exposure = self.factory.registry.nameExposure(name)
        if name not in self.factory.serverTLS.innerNames:
            # Exposed, but its certificate is still being obtained.
            self._refuse(ErrorCode.NOT_ACCEPTED, f"{name} is not ready yet (TP is getting its certificate); try again shortly")
            return
        self.state = "e2e"
        self.result = "e2e_handshake"
        self.address = f"E2E {name}"
        self.transport.write(ServerHello.success(e2e=name).toFrame())  # type: ignore[union-attr]
        innerFactory = TLSFactory(
            NameTLS(self.factory.serverTLS, name),
            False,
            Factory.forProtocol(lambda: E2EDialer(self, exposure, framed=True)),
            clock=self.factory.reactor,
        )
        self.inner = innerFactory.buildProtocol(self.transport.getPeer())  # type: ignore[union-attr]
        self.inner.makeConnection(self.transport)
        # The inner handshake gets the same bound as the outer one.
        self.setTimeout(self.factory.config.handshakeTimeout)
        self.transport.resumeProducing()  # type: ignore[union-attr]
        rest, self.pending = self.pending, b""
        if rest:
            self.inner.dataReceived(rest)

    def preSpliceEOF(self) -> None:
        """
        The client sent EOF before any splice.  After a connect or accept
        hello it is carried into the splice; anywhere else it ends the
        connection (a signalling connection closing, say).
        """
        if self.state == "e2e" and self.inner is not None:
            self.inner.connectionLost(Failure(error.ConnectionDone("the tunnel was closed")))
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif self.state in ("hello", "registering", "listening", "udp"):
            self.detail = self.detail or "the client closed its side"
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _sniDialer(self, name: str) -> bool:
        """
        The handshake chose the context of an E2E name: this connection is
        a dialer of that exposure, with no TP protocol on it.
        """
        exposure = self.factory.registry.nameExposure(name)
        self.event = "sni"
        self.hello = ClientHello.connect(name, 443)
        if exposure is None:
            self._closeWith("not_accepted", f"{name} is no longer exposed")
            return True
        assert self.identity is not None
        # The handshake already ran the name's dialers check; checking again
        # here keeps a context mix-up from ever letting a dialer through.
        decision = self.factory.registry.mayDial(exposure, self.identity.name)
        if not decision.allowed:
            self._closeWith("forbidden", decision.reason)
            return True
        self.setTimeout(None)  # the registry bounds the wait for an accept
        self.state = "waiting"
        self.result = "aborted"
        self.address = f"E2E {name}"
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.sid = self.factory.registry.incoming(exposure, self, self.identity.name, self.peerAddress)
        return True

    def sessionJoined(self, acceptEnd: RelayEnd) -> None:
        self.state = "spliced"
        self.result = "ok"
        pending, self.pending = self.pending, b""
        splice(self, acceptEnd, fromA=pending)
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def sessionFailed(self, code: ErrorCode, message: str) -> None:
        self._closeWith(code.value, message)

    def _closeWith(self, result: str, detail: str) -> None:
        self.state = "refused"
        self.result = result
        self.detail = detail
        self.transport.loseConnection()  # type: ignore[union-attr]
        self.transport.resumeProducing()  # type: ignore[union-attr]
        if self.state != "closed":  # a transport may close at once
            self.setTimeout(LINGER)

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
        if self.state != "closed":  # a transport may close at once
            self.setTimeout(LINGER)

    # --- end ------------------------------------------------------------------

    def connectionLost(self, reason: Failure) -> None:
        self.setTimeout(None)
        if self.state == "handshake":
            self.detail = self.detail or getattr(self.transport, "tpRefusal", None) or describeTLSFailure(reason)
        wasState, self.state = self.state, "closed"
        if self.dialling is not None:
            self.dialling.cancel()
        if self.exposure is not None or wasState == "registering":
            self._stopControl()
        if self.inner is not None and not self.innerClosed:
            self.inner.connectionLost(reason)
        if self.flow is not None:
            self.flow.close()
        if wasState == "waiting" and self.sid is not None:
            self.factory.registry.dialerGone(self.sid)
        super().connectionLost(reason)
        self._audit()

    def _audit(self) -> None:
        hello = self.hello
        # The end that was spliced: this connection, or the inside of an
        # E2E connection.
        counted: RelayEnd = self.innerEnd if self.innerEnd is not None else self
        audit.info(
            "{identity} {destination}: {result}{detail_sep}{detail}",
            event=self.event,
            peer=self.peerAddress,
            identity=self.identity.name if self.identity else None,
            serial=self.identity.serial if self.identity else None,
            destination=(f"{hello.host}:{hello.port}" if hello.op in ("connect", "udp") else self.address) if hello else None,
            transport=hello.transport if hello else None,
            via=getattr(self.transport, "carrier", "tls"),
            address=self.address,
            result=self.result,
            detail=self.detail,
            detail_sep=" - " if self.detail else "",
            bytes_up=self.flow.bytesOut if self.flow is not None else counted.bytesIn,
            bytes_down=(
                self.flow.socket.bytesIn
                if self.flow is not None
                else counted.peer.bytesIn if counted.peer is not None else 0
            ),
            duration=round(self.factory.reactor.seconds() - self.started, 3),
        )


class TPServerFactory(Factory):
    """
    Builds L{TPServerProtocol}s; wrap it in L{tpproxy.transports.tls.TLSFactory} with a
    L{tpproxy.transports.servertls.ServerTLS}.
    """

    def __init__(self, config: Any, reactor: Any, dialer: Dialer | None = None, serverTLS: Any = None, registry: Any = None) -> None:
        self.config = config
        self.reactor = reactor
        self.dialer = dialer or Dialer(reactor, config.policy, config.connectTimeout)
        self.serverTLS = serverTLS
        self.registry = registry if registry is not None else _NoReverse()

    def buildProtocol(self, addr: Any) -> TPServerProtocol:
        return TPServerProtocol(self)



class _NoReverse:
    """
    The registry of a server built without reverse tunnels (unit tests).
    """

    def nameExposure(self, name: str) -> None:
        return None

    def expose(self, *args: Any, **kw: Any) -> Any:
        return defer.fail(ReverseError(ErrorCode.FORBIDDEN, "reverse tunnels are not enabled on this server"))

    def claim(self, sid: str, identity: str) -> Any:
        raise ReverseError(ErrorCode.BAD_SESSION, "unknown session")


@implementer(IHandshakeListener)
class E2EDialer(RelayEnd):
    """
    The inside of an E2E connection made through a TP tunnel: a TLS server
    for the exposure's name runs inside the tunnel; once the dialer's
    certificate passed (and policy lets it dial the name), the exposer is
    asked to accept.  With C{framed}, a ServerHello inside the inner TLS
    tells the tp client how that went.
    """

    sid: str | None = None

    def __init__(self, outer: TPServerProtocol, exposure: Exposure, framed: bool) -> None:
        self.outer = outer
        self.exposure = exposure
        self.framed = framed
        self.pending = b""

    def handshakeCompleted(self) -> None:
        self.outer.setTimeout(None)  # the registry bounds the wait for an accept
        self.outer.innerEnd = self
        cert = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        if cert is None:
            # Cannot happen with the inner context (it requires one); a
            # check of its own all the same, since an identity is needed.
            self.sessionFailed(ErrorCode.FORBIDDEN, "a client certificate is required")
            return
        identity = identityOf(cert.to_cryptography()).name
        self.outer.detail = f"inner identity {identity}"
        self.outer.result = "aborted"
        self.transport.pauseProducing()  # type: ignore[union-attr]
        decision = self.outer.factory.registry.mayDial(self.exposure, identity)
        if not decision.allowed:
            self.sessionFailed(ErrorCode.FORBIDDEN, f"not allowed to dial {self.exposure.name}: {decision.reason}")
            return
        registry = self.outer.factory.registry
        if registry.nameExposure(self.exposure.name) is not self.exposure:
            self.sessionFailed(ErrorCode.NOT_ACCEPTED, f"{self.exposure.name} is no longer exposed")
            return
        self.sid = registry.incoming(self.exposure, self, identity, self.outer.peerAddress)

    def preSpliceData(self, data: bytes) -> None:
        self.pending += data

    def sessionJoined(self, acceptEnd: RelayEnd) -> None:
        self.sid = None
        self.outer.result = "ok"
        if self.framed:
            self.transport.write(ServerHello.success().toFrame())  # type: ignore[union-attr]
        pending, self.pending = self.pending, b""
        splice(self, acceptEnd, fromA=pending)
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def sessionFailed(self, code: ErrorCode, message: str) -> None:
        self.sid = None
        self.outer.result = code.value
        self.outer.detail += f"; {message}"
        if self.framed:
            self.transport.write(ServerHello.failure(code, message).toFrame())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]
        self.transport.resumeProducing()  # type: ignore[union-attr]
        if self.outer.state != "closed":
            self.outer.setTimeout(LINGER)

    def connectionLost(self, reason: Failure) -> None:
        self.outer.innerClosed = True
        if self.sid is not None:
            self.outer.factory.registry.dialerGone(self.sid)
        refusal = getattr(self.transport, "tpRefusal", None)
        if refusal:
            self.outer.result = "e2e_refused"
            self.outer.detail = refusal
        super().connectionLost(reason)
        self.outer.transport.loseConnection()  # type: ignore[union-attr]


class IncomingStreamEnd(RelayEnd):
    """
    The server's end of a stream it opened to an exposer over QUIC for one
    incoming session: announces the session on the stream, then carries it.
    """

    def __init__(self, registry: Any, sid: str, owner: str, identity: str | None, peer: str) -> None:
        self.registry = registry
        self.sid = sid
        self.owner = owner
        self.identity = identity
        self.peerText = peer

    def connectionMade(self) -> None:
        self.transport.write(encodeEvent("incoming", session=self.sid, identity=self.identity, peer=self.peerText))  # type: ignore[union-attr]
        try:
            pending = self.registry.claim(self.sid, self.owner)
        except ReverseError:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        pending.dialer.sessionJoined(self)

    def preSpliceData(self, data: bytes) -> None:
        pass
