# -*- test-case-name: tpproxy.test.test_reverse -*-
"""
C{tp expose}: keep a signalling connection to TP and serve incoming
sessions from a local port.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy.connector import quicRefusal
from tpproxy.control import ControlLoop, IControlEnd
from tpproxy.firstframe import FirstFrameReader, Frame, Malformed, Raw
from tpproxy.protocols.client import Refused, TLSClientEndpoint, TunnelError, certificateRefusal, openTunnel
from tpproxy.protocols.relay import RelayEnd, noDelay, splice
from tpproxy.reactors import IDialReactor
from tpproxy.transports.tls import describeTLSFailure, receivedAlert
from tpproxy.wire import VERSION, ClientHello, ErrorCode, ServerHello, WireError, parseEvent

#: Seconds to wait for TP's answer to an E2E registration once connected.
E2E_ANSWER_TIMEOUT = 150.0


@implementer(IHandshakeListener, IControlEnd)
class ControlProtocol(Protocol):
    """
    The signalling connection: a C{listen} hello, TP's ServerHello (read by
    a L{FirstFrameReader}), then events both ways (a L{ControlLoop}).  It
    reports to its L{Exposer}: C{registered(info)} once TP accepted the
    exposure, C{refused(error)} if it did not (or the connection ended
    first), C{lost(reason)} when a registered connection ends.
    """

    handshakeDone = False

    def __init__(self, exposer: Exposer) -> None:
        self.exposer = exposer
        self.reader: FirstFrameReader[ServerHello] = FirstFrameReader(ServerHello.fromObject)
        self.loop = ControlLoop(exposer.reactor, exposer.keepalive, self)
        self.answered = False
        self.error: Exception | None = None
        self._answerDeadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.transport.write(self.exposer.hello.toFrame())  # type: ignore[union-attr]
        # Bound the TLS handshake and TP's answer: a listener that accepts
        # TCP and never speaks must not hang us.
        self._answerDeadline = self.exposer.reactor.callLater(self.exposer.settings.connectTimeout, self._noAnswer)

    def _noAnswer(self) -> None:
        self._fail(TunnelError(f"no answer from TP within {self.exposer.settings.connectTimeout:g} s"))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True
        deadline = self._answerDeadline
        if self.exposer.hello.mode == "e2e" and deadline is not None and deadline.active():
            # TP may first have to get the name's certificate from its ACME
            # CA (its own bound is 120 s): wait for that answer longer.
            deadline.reset(max(self.exposer.settings.connectTimeout, E2E_ANSWER_TIMEOUT))

    def dataReceived(self, data: bytes) -> None:
        match self.reader.feed(data):
            case Frame(message=hello, rest=rest):
                self._answer(hello, rest)
            case Raw(data=events):
                self.loop.feed(events)
            case Malformed(error=error):
                self.controlMalformed(error)

    def _answer(self, hello: ServerHello, rest: bytes) -> None:
        self.answered = True
        if self._answerDeadline is not None and self._answerDeadline.active():
            self._answerDeadline.cancel()
        if not hello.ok:
            self._fail(Refused(hello.code or "unknown", hello.message))
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.loop.start()
        self.exposer.registered(hello.info)
        if rest:
            self.loop.feed(rest)

    # --- IControlEnd ----------------------------------------------------------

    def writeControl(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def controlEvent(self, event: str, fields: dict[str, Any]) -> None:
        if event == "incoming":
            self.exposer.incoming(fields["session"], fields.get("identity"), fields.get("peer") or "?")

    def controlSilent(self, seconds: float) -> None:
        self.exposer.say(f"No word from TP for {seconds:g} s; reconnecting")
        self.transport.abortConnection()  # type: ignore[union-attr]

    def controlMalformed(self, error: WireError) -> None:
        self._fail(TunnelError(f"TP sent a malformed message: {error.message}"))
        self.transport.abortConnection()  # type: ignore[union-attr]

    # --- end ------------------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error

    def connectionLost(self, reason: Failure) -> None:
        self.loop.stop()
        if self._answerDeadline is not None and self._answerDeadline.active():
            self._answerDeadline.cancel()
        if self.error is not None or not self.answered:
            self.exposer.refused(self.error or closedBeforeAnswer(reason, self.exposer.connector))
        else:
            self.exposer.lost(reason)


class ControlFactory(Factory):
    noisy = False

    def __init__(self, exposer: Exposer) -> None:
        self.exposer = exposer

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.exposer)


class LocalTarget(RelayEnd):
    """
    The exposer's connection to its local service.
    """

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.pending = b""

    def preSpliceData(self, data: bytes) -> None:
        self.pending += data


def closedBeforeAnswer(reason: Failure, connector: Any) -> TunnelError:
    """
    The error for a signalling connection that ended before TP answered:
    one line a person can act on if TP refused the client certificate (in
    the TLS handshake, or by closing the QUIC connection with its alert),
    else what the connection says.
    """
    refused = certificateRefusal(receivedAlert(reason))
    session = getattr(connector, "session", None)
    if refused is None and session is not None and session.closed:
        refused = quicRefusal(session)
    if refused is not None:
        return refused
    return TunnelError(f"TP closed the connection: {describeTLSFailure(reason)}")


#: QUIC PING interval of an exposer's connection (a PING and its ACK are
#: under 100 bytes).
EXPOSER_QUIC_KEEPALIVE = 3.0


class Exposer:
    """
    Keeps one exposure registered with TP (reconnecting with backoff) and
    serves its sessions from C{local}.
    """

    def __init__(
        self,
        reactor: IDialReactor,
        settings: Any,
        local: tuple[str, int],
        hello: ClientHello,
        keepalive: float,
        stderr: Any,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.local = local
        self.hello = hello
        self.keepalive = keepalive
        self.stderr = stderr
        from tpproxy.connector import Connector

        self.tlsOptions = settings.tlsOptions()
        self.connector = Connector(reactor, settings)
        # An exposer pings TP more often over QUIC: after a TP crash, its
        # next packet gets the stateless reset, so this bounds how long it
        # takes to notice and register again (docs/quic.md).
        self.connector.quicKeepalive = EXPOSER_QUIC_KEEPALIVE
        endpoint = ChosenEndpoint(self)
        self.service = ClientService(
            endpoint,
            ControlFactory(self),
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=30.0),
            clock=reactor,
        )
        # Registration happens on the connection, not in ClientService's
        # prepareConnection: a failed prepareConnection leaves the connection
        # open, and its later loss is a NoTransition in Twisted 26.10.
        self.registrations = 0
        self.first: defer.Deferred[dict[str, Any]] = defer.Deferred()

    def say(self, line: str) -> None:
        self.stderr.write(line + "\n")
        self.stderr.flush()

    def registered(self, info: dict[str, Any]) -> None:
        self.registrations += 1
        lhost, lport = self.local
        where = f"public port {info.get('port')}" if self.hello.mode == "public" else f"E2E name {info.get('name')}"
        again = " again" if self.registrations > 1 else ""
        self.say(
            f"Exposing {lhost}:{lport} as {where}{again} via {self.settings.server} (v{VERSION}, {self.connector.chosen}); Ctrl-C stops"
        )
        if not self.first.called:
            self.first.callback(info)

    def refused(self, error: Exception) -> None:
        if not self.first.called:
            self.first.errback(error)
        else:
            self.say(f"TP did not take the exposure: {error}; retrying")

    def incomingStream(self) -> IncomingStream:
        return IncomingStream(self)

    def serveStream(self, end: IncomingStream, fields: dict[str, Any]) -> None:
        """
        Over QUIC, TP opened a stream for an incoming session: connect the
        local service and splice.
        """
        who = f"{fields.get('identity')} from {fields.get('peer')}" if fields.get("identity") else str(fields.get("peer"))
        target = connectProtocol(HostnameEndpoint(self.reactor, self.local[0], self.local[1], timeout=10), LocalTarget())

        def joined(local: LocalTarget) -> None:
            if end.closed:
                local.transport.loseConnection()  # type: ignore[union-attr]
                return
            pending, local.pending = local.pending, b""
            splice(end, local, fromA=end.rest, fromB=pending)
            end.transport.resumeProducing()  # type: ignore[union-attr]
            local.transport.resumeProducing()  # type: ignore[union-attr]

        def failed(f: Failure) -> None:
            self.say(f"Connection from {who} failed: {f.getErrorMessage()}")
            end.transport.loseConnection()  # type: ignore[union-attr]

        target.addCallbacks(joined, failed)

    def lost(self, reason: Failure) -> None:
        self.say(f"Lost the connection to TP ({describeTLSFailure(reason)}); reconnecting")

    def incoming(self, session: str, identity: str | None, peer: str) -> None:
        who = f"{identity} from {peer}" if identity else peer
        tunnel = openTunnel(
            self.reactor, self.settings.server, self.tlsOptions, ClientHello("accept", session=session), self.settings.connectTimeout
        )
        target = connectProtocol(HostnameEndpoint(self.reactor, self.local[0], self.local[1], timeout=10), LocalTarget())
        opened: list[Any] = []
        failedAlready: list[bool] = []

        def arrived(end: Any) -> Any:
            if failedAlready:
                # The other half failed first: this one is not wanted.
                end.transport.loseConnection()
            else:
                opened.append(end)
            return end

        for d in (tunnel, target):
            d.addCallback(arrived)
        both = defer.gatherResults([tunnel, target], consumeErrors=True)

        def joined(ends: list[Any]) -> None:
            remote, local = ends
            pending, local.pending = local.pending, b""
            splice(remote, local, fromA=remote.rest, fromB=pending)
            remote.transport.resumeProducing()
            local.transport.resumeProducing()

        def failed(f: Failure) -> None:
            error = f.value.subFailure if isinstance(f.value, defer.FirstError) else f
            self.say(f"Connection from {who} failed: {error.getErrorMessage()}")
            failedAlready.append(True)
            for end in opened:
                end.transport.loseConnection()

        both.addCallbacks(joined, failed)


def parseIncoming(obj: dict[str, Any]) -> dict[str, Any]:
    """
    The first frame of a stream TP opened over QUIC: an C{incoming} event.

    @raise WireError: for any other frame.
    """
    event, fields = parseEvent(obj)
    if event != "incoming":
        raise WireError(ErrorCode.BAD_REQUEST, f"a session stream opens with event 'incoming', not {event!r}")
    return fields


class IncomingStream(RelayEnd):
    """
    A stream TP opened over QUIC for one incoming session: its first frame
    is the C{incoming} event, then the session's bytes.
    """

    rest = b""

    def __init__(self, exposer: Exposer) -> None:
        self.exposer = exposer
        self.reader: FirstFrameReader[dict[str, Any]] = FirstFrameReader(parseIncoming)

    def preSpliceData(self, data: bytes) -> None:
        match self.reader.feed(data):
            case Frame(message=fields, rest=rest):
                self.rest = rest
                self.transport.pauseProducing()  # type: ignore[union-attr]
                self.exposer.serveStream(self, fields)
            case Raw(data=more):
                self.rest += more
            case Malformed():
                self.transport.loseConnection()  # type: ignore[union-attr]


@implementer(IStreamClientEndpoint)
class ChosenEndpoint:
    """
    The signalling connection over whatever the connector chose: a stream on
    the QUIC connection (incoming sessions then arrive as streams TP opens),
    or a TLS connection.
    """

    def __init__(self, exposer: Exposer) -> None:
        self.exposer = exposer

    @defer.inlineCallbacks
    def connect(self, factory: Any) -> Any:
        exposer = self.exposer
        connector = exposer.connector
        transport = yield connector.choose()
        if transport == "tls":
            endpoint = TLSClientEndpoint(exposer.reactor, exposer.settings.server, exposer.tlsOptions, exposer.settings.connectTimeout)
            return (yield endpoint.connect(factory))
        session = yield connector.quicSession(exposer.settings.connectTimeout)
        session.incomingHandler = exposer.incomingStream
        protocol = factory.buildProtocol(None)
        session.openStream(protocol)
        return protocol


@defer.inlineCallbacks
def runExpose(reactor: IDialReactor, settings: Any, local: tuple[str, int], hello: ClientHello, keepalive: float, stderr: Any) -> Any:
    """
    Register, and keep the exposure up until interrupted.  A refusal on the
    first attempt ends the command (exit status 3, or 1 if TP could not be
    reached); after a first success, TP going away means retrying.
    """
    exposer = Exposer(reactor, settings, local, hello, keepalive, stderr)
    exposer.service.startService()
    try:
        yield exposer.service.whenConnected(failAfterFailures=1)
    except Exception as e:
        yield exposer.service.stopService()
        raise TunnelError(f"cannot reach TP at {settings.server}: {e}") from None
    try:
        yield exposer.first
    except Exception:
        yield exposer.service.stopService()
        raise
    reactor.addSystemEventTrigger("before", "shutdown", exposer.service.stopService)
    reactor.addSystemEventTrigger("before", "shutdown", exposer.connector.close)
    yield defer.Deferred()  # until the reactor stops
