# -*- test-case-name: tpproxy.test.test_reverse,tpproxy.test.test_goaway,tpproxy.test.test_certwatch -*-
"""
C{tp expose}: keep an exposure registered with TP and serve its incoming
sessions from a local port.

The exposure lives on a signalling connection (a L{ControlProtocol}).  An
L{Exposer} keeps one registered: after a lost connection it registers
again with backoff; when TP says it is going away (the C{goaway} event) or
the client certificate was renewed, it I{moves} the exposure
make-before-break: it registers on a new connection (TP hands an exposure
over to a new session of the same identity) and only then lets the old one
go.  Tunnels already accepted are left alone: each runs until it ends.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import replace
from typing import Any, Callable

from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy.certwatch import LoadedSettings, Materials, loadMaterials, watchCertificate
from tpproxy.connector import quicRefusal
from tpproxy.control import ControlLoop, IControlEnd
from tpproxy.firstframe import FirstFrameReader, Frame, Malformed, Raw
from tpproxy.machine import Machine
from tpproxy.protocols.client import Refused, TLSClientEndpoint, TunnelError, certificateRefusal, openTunnel, tcpEndpoint
from tpproxy.protocols.relay import RelayEnd, noDelay, splice
from tpproxy.reactors import IDialReactor
from tpproxy.transports.tls import describeTLSFailure, receivedAlert
from tpproxy.wire import VERSION, ClientHello, ErrorCode, ServerHello, WireError, parseEvent

#: Seconds to wait for TP's answer to an E2E registration once connected.
E2E_ANSWER_TIMEOUT = 150.0
#: Seconds C{tp expose} waits, when stopping, for its signalling
#: connections to close (TLS close_notify) before closing QUIC.
STOP_GRACE = 2.0


@implementer(IHandshakeListener, IControlEnd)
class ControlProtocol(Protocol):
    """
    One signalling connection: a C{listen} hello, TP's ServerHello (read by
    a L{FirstFrameReader}), then events both ways (a L{ControlLoop}).  It
    reports to its L{Exposer}, naming itself: C{registered} once TP
    accepted the exposure, C{refused} if it did not (or the connection
    ended first), C{goaway} when TP says it is going away, C{lost} when a
    registered connection ends.

    @ivar attempt: the L{ControlFactory} of the attempt that made it.
    @ivar uplink: the L{Uplink} it runs on.
    """

    handshakeDone = False
    retired = False

    def __init__(self, exposer: Exposer, attempt: ControlFactory) -> None:
        self.exposer = exposer
        self.attempt = attempt
        self.uplink = attempt.uplink
        self.hello = attempt.hello
        self.reader: FirstFrameReader[ServerHello] = FirstFrameReader(ServerHello.fromObject)
        self.loop = ControlLoop(exposer.reactor, exposer.keepalive, self)
        self.answered = False
        self.registered = False
        self.error: Exception | None = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self._answerDeadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        if self.attempt.dropped:
            # The exposer stopped while this connection was being made.
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        noDelay(self.transport)
        self.transport.write(self.hello.toFrame())  # type: ignore[union-attr]
        # Bound the TLS handshake and TP's answer: a listener that accepts
        # TCP and never speaks must not hang us.
        self._answerDeadline = self.exposer.reactor.callLater(self.exposer.settings.connectTimeout, self._noAnswer)

    def _noAnswer(self) -> None:
        self._fail(TunnelError(f"no answer from TP within {self.exposer.settings.connectTimeout:g} s"))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True
        deadline = self._answerDeadline
        if self.hello.mode == "e2e" and deadline is not None and deadline.active():
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
        self.registered = True
        self.loop.start()
        self.exposer.registered(self, hello.info)
        if rest:
            self.loop.feed(rest)

    def retire(self) -> None:
        """
        The exposer is done with this connection (the exposure moved, or
        the exposer stops): close it; its loss is not news.
        """
        self.retired = True
        self.loop.stop()
        if self.transport is not None and not self.done.called:
            self.transport.loseConnection()

    # --- IControlEnd ----------------------------------------------------------

    def writeControl(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def controlEvent(self, event: str, fields: dict[str, Any]) -> None:
        if event == "incoming":
            self.exposer.incoming(fields["session"], fields.get("identity"), fields.get("peer") or "?", p2p=fields.get("p2p"))
        elif event == "goaway":
            self.exposer.goaway(self, str(fields.get("reason") or "no reason given"))

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
        if self.registered:
            self.exposer.lost(self, reason)
        else:
            self.exposer.refused(self, self.error or closedBeforeAnswer(reason, self.uplink.connector))
        self.done.callback(None)


class ControlFactory(Factory):
    """
    One attempt to register: builds the L{ControlProtocol} of a connection
    on C{uplink} asking for C{hello}.

    @ivar dropped: the exposer stopped; a connection made now is closed.
    """

    noisy = False
    dropped = False
    #: The connection's protocol, once built.
    built: ControlProtocol | None = None

    def __init__(self, exposer: Exposer, uplink: Uplink, hello: ClientHello) -> None:
        self.exposer = exposer
        self.uplink = uplink
        self.hello = hello

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        self.built = ControlProtocol(self.exposer, self)
        return self.built


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


class Uplink:
    """
    How an exposer's new connections reach TP with one client
    certificate: the settings holding it, their TLS options, and a
    L{tpproxy.connector.Connector} (over QUIC, one connection carries the
    signalling stream and the sessions TP opens).  A move (a renewed
    certificate, TP going away) gets a new uplink, so a new QUIC
    connection; the old one keeps the tunnels it carries until they end.

    @param previous: the uplink this one replaces: its choice of QUIC or
        TLS is kept.
    """

    def __init__(self, exposer: Exposer, settings: Any, previous: Uplink | None = None) -> None:
        from tpproxy.connector import Connector

        self.exposer = exposer
        self.settings = settings
        self.tlsOptions = settings.tlsOptions()
        self.connector = Connector(exposer.reactor, settings)
        if previous is not None and previous.chosen is not None:
            self.connector.chosen = previous.chosen
        # An exposer pings TP more often over QUIC: after a TP crash, its
        # next packet gets the stateless reset, so this bounds how long it
        # takes to notice and register again (docs/quic.md).
        self.connector.quicKeepalive = EXPOSER_QUIC_KEEPALIVE

    @property
    def chosen(self) -> str | None:
        """
        C{"quic"} or C{"tls"} once decided.
        """
        return self.connector.chosen

    @defer.inlineCallbacks
    def connect(self, factory: ControlFactory) -> Any:
        """
        A signalling connection over whatever the connector chose: a
        stream on the QUIC connection (incoming sessions then arrive as
        streams TP opens), or a TLS connection.
        """
        exposer = self.exposer
        transport = yield self.connector.choose()
        if transport == "tls":
            endpoint = TLSClientEndpoint(exposer.reactor, self.settings.server, self.tlsOptions, self.settings.connectTimeout)
            return (yield endpoint.connect(factory))
        session = yield self.connector.quicSession(self.settings.connectTimeout)
        session.incomingHandler = exposer.incomingStream
        protocol = factory.buildProtocol(None)
        session.openStream(protocol)
        return protocol

    def accept(self, session: str) -> defer.Deferred[Any]:
        """
        Claim an incoming session over a new TLS connection.
        """
        return openTunnel(
            self.exposer.reactor, self.settings.server, self.tlsOptions, ClientHello("accept", session=session), self.settings.connectTimeout
        )

    def retire(self) -> None:
        """
        No new connection goes this way: the QUIC connection closes once
        the tunnels on it have ended.
        """
        session = self.connector.session
        if session is not None and not session.closed:
            session.closeWhenIdle("the exposure moved to a new connection")

    def close(self) -> None:
        """
        The exposer stops: close the QUIC connection now.
        """
        self.connector.close()


class ExposerState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"  # registering, nothing registered
    WAITING = "waiting"  # nothing registered, a retry is scheduled
    FAILED = "failed"  # the first registration failed: the command ends
    UP = "up"  # registered
    MOVING = "moving"  # registered, and registering on a new connection
    MOVE_WAITING = "move_waiting"  # registered; the move failed, a retry is scheduled
    STOPPED = "stopped"


class Exposer(Machine[ExposerState]):
    """
    Keeps one exposure registered with TP and serves its sessions from
    C{local}.

    Its inputs come from its connections (each names itself; news from a
    connection it no longer uses is dropped), from the certificate watcher
    (C{renewed}), its retry timer and the command (C{start}, C{stop}).

    @param uplink: makes an L{Uplink} (a test gives a fake).
    """

    S = ExposerState
    TRANSITIONS = {
        (S.IDLE, "start"): (S.CONNECTING, "_connect"),
        (S.IDLE, "stop"): (S.STOPPED, "_stop"),
        (S.CONNECTING, "registered"): (S.UP, "_registered"),
        (S.CONNECTING, "refused"): (S.WAITING, "_refused"),
        (S.CONNECTING, "firstRefused"): (S.FAILED, "_failed"),
        # The attempt under way finishes; if it registers with the old
        # certificate, the exposure moves at once.
        (S.CONNECTING, "renewed"): (S.CONNECTING, "_useUplink"),
        (S.CONNECTING, "stop"): (S.STOPPED, "_stop"),
        (S.WAITING, "retry"): (S.CONNECTING, "_connect"),
        (S.WAITING, "renewed"): (S.CONNECTING, "_connectWith"),
        (S.WAITING, "stop"): (S.STOPPED, "_stop"),
        (S.UP, "lost"): (S.WAITING, "_lost"),
        (S.UP, "goaway"): (S.MOVING, "_goaway"),
        (S.UP, "renewed"): (S.MOVING, "_connectWith"),
        (S.UP, "stop"): (S.STOPPED, "_stop"),
        (S.MOVING, "registered"): (S.UP, "_moved"),
        (S.MOVING, "refused"): (S.MOVE_WAITING, "_moveRefused"),
        (S.MOVING, "lost"): (S.CONNECTING, "_lostWhileMoving"),
        (S.MOVING, "goaway"): (S.MOVING, None),  # already moving
        (S.MOVING, "renewed"): (S.MOVING, "_useUplink"),
        (S.MOVING, "stop"): (S.STOPPED, "_stop"),
        (S.MOVE_WAITING, "retry"): (S.MOVING, "_connect"),
        (S.MOVE_WAITING, "lost"): (S.WAITING, "_lostWhileMoving"),
        (S.MOVE_WAITING, "goaway"): (S.MOVING, "_goaway"),
        (S.MOVE_WAITING, "renewed"): (S.MOVING, "_connectWith"),
        (S.MOVE_WAITING, "stop"): (S.STOPPED, "_stop"),
        (S.FAILED, "renewed"): (S.FAILED, None),
        # One link of several: another registered, so this one tries again.
        (S.FAILED, "retry"): (S.CONNECTING, "_connect"),
        (S.FAILED, "stop"): (S.STOPPED, "_stop"),
        (S.STOPPED, "renewed"): (S.STOPPED, None),
        (S.STOPPED, "stop"): (S.STOPPED, None),
    }

    active: ControlProtocol | None = None
    attempt: ControlFactory | None = None
    _retry: IDelayedCall | None = None
    _goneAway: ControlProtocol | None = None
    #: A first registration that fails is retried like a later one
    #: (L{ExposerLinks} sets it once another link is up).
    keepTrying = False
    #: Starts each line this exposer says (L{ExposerLinks}: which link).
    label = ""

    def __init__(
        self,
        reactor: IDialReactor,
        settings: Any,
        local: tuple[str, int],
        hello: ClientHello,
        keepalive: float,
        stderr: Any,
        uplink: Callable[..., Uplink] = Uplink,
    ) -> None:
        self.state = ExposerState.IDLE
        self.reactor = reactor
        self.settings = settings
        self.local = local
        self.hello = hello
        self.keepalive = keepalive
        self.stderr = stderr
        self.makeUplink = uplink
        self.uplink = uplink(self, settings)
        self.uplinks = [self.uplink]
        self.retryPolicy = backoffPolicy(initialDelay=0.5, maxDelay=30.0)
        self.failures = 0
        self.registrations = 0
        self.first: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.info: dict[str, Any] = {}

    def say(self, line: str) -> None:
        self.stderr.write(self.label + line + "\n")
        self.stderr.flush()

    # --- inputs ---------------------------------------------------------------

    def start(self) -> defer.Deferred[dict[str, Any]]:
        """
        Register; the result fires with TP's answer to the first
        registration, or fails with why there was none.
        """
        self._input("start")
        return self.first

    def stop(self, quietly: bool = False) -> defer.Deferred[None]:
        """
        Close every connection (unless C{quietly}, saying so); fires once
        they are closed.
        """
        result = self._input("stop", quietly)
        return result if result is not None else defer.succeed(None)

    def keepGoing(self) -> None:
        """
        Another link of this exposure is up: a first registration that
        fails here is retried, and one that failed already is tried again.
        """
        self.keepTrying = True
        if self.state is ExposerState.FAILED:
            self._input("retry")

    def registered(self, proto: ControlProtocol, info: dict[str, Any]) -> None:
        if proto.attempt is self.attempt:
            self._input("registered", proto, info)
        else:
            proto.retire()

    def refused(self, proto: ControlProtocol, error: Exception) -> None:
        if proto.attempt is self.attempt:
            self._refusedAttempt(error)

    def _refusedAttempt(self, error: Exception) -> None:
        self._input("firstRefused" if self.registrations == 0 and not self.keepTrying else "refused", error)

    def lost(self, proto: ControlProtocol, reason: Failure) -> None:
        if proto is self.active:
            self._input("lost", proto, reason)
        elif proto.uplink is not self.uplink:
            proto.uplink.retire()

    def goaway(self, proto: ControlProtocol, reason: str) -> None:
        """
        TP is going away (it stops): register on a new connection at once.
        """
        if proto is self.active:
            self._input("goaway", proto, reason)

    def renewed(self, loaded: Materials) -> None:
        """
        The certificate watcher found a renewed certificate: move to it.
        """
        self.say(f"Loaded the renewed client certificate (valid until {loaded.validUntil()}); moving the exposure to it")
        self._input("renewed", self._newUplink(LoadedSettings(self.settings, loaded)))

    # --- outputs --------------------------------------------------------------

    def _newUplink(self, settings: Any) -> Uplink:
        uplink = self.makeUplink(self, settings, self.uplink)
        self.uplinks.append(uplink)
        return uplink

    def _connect(self) -> None:
        self._retry = None
        attempt = self.attempt = ControlFactory(self, self.uplink, self.hello)
        connecting = self.uplink.connect(attempt)

        def cannotConnect(f: Failure) -> None:
            if attempt is self.attempt:
                self._refusedAttempt(TunnelError(f"cannot reach TP at {self.settings.server}: {f.getErrorMessage()}"))

        connecting.addErrback(cannotConnect)

    def _connectWith(self, uplink: Uplink) -> None:
        self._cancelRetry()
        self.uplink = uplink
        self._connect()

    def _useUplink(self, uplink: Uplink) -> None:
        self.uplink = uplink

    def _scheduleRetry(self) -> None:
        self.failures += 1
        self._retry = self.reactor.callLater(self.retryPolicy(self.failures), self._input, "retry")

    def _cancelRetry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _where(self, info: dict[str, Any]) -> str:
        return f"public port {info.get('port')}" if self.hello.mode == "public" else f"E2E name {info.get('name')}"

    def _registered(self, proto: ControlProtocol, info: dict[str, Any]) -> None:
        self.active = proto
        self.attempt = None
        self.failures = 0
        self.registrations += 1
        self.info = info
        if self.hello.mode == "public" and not self.hello.port and info.get("port"):
            # TP picked the port: reconnects and moves ask for it again
            # (and the other links of an exposer ask for it too).
            self.hello = replace(self.hello, port=info["port"])
        lhost, lport = self.local
        again = " again" if self.registrations > 1 else ""
        self.say(
            f"Exposing {lhost}:{lport} as {self._where(info)}{again} via {self.settings.server} (v{VERSION}, {proto.uplink.chosen}); Ctrl-C stops"
        )
        if not self.first.called:
            self.first.callback(info)
        if proto.uplink is not self.uplink:
            # Registered with a certificate renewed meanwhile: move on.
            self._input("renewed", self.uplink)

    def _moved(self, proto: ControlProtocol, info: dict[str, Any]) -> None:
        old = self.active
        self._registered(proto, info)
        if old is not None:
            # TP has handed the exposure over to the new session already.
            old.retire()
            if old.uplink is not proto.uplink:
                old.uplink.retire()

    def _refused(self, error: Exception) -> None:
        self.attempt = None
        self.say(f"TP did not take the exposure: {error}; retrying")
        self._scheduleRetry()

    def _failed(self, error: Exception) -> None:
        self.attempt = None
        self.first.errback(error)

    def _moveRefused(self, error: Exception) -> None:
        self.attempt = None
        self.say(f"TP did not take the exposure on a new connection: {error}; keeping the current one and retrying")
        self._scheduleRetry()

    def _lost(self, proto: ControlProtocol, reason: Failure) -> None:
        self.active = None
        self.say(f"Lost the connection to TP ({describeTLSFailure(reason)}); reconnecting")
        self._scheduleRetry()

    def _goaway(self, proto: ControlProtocol, reason: str) -> None:
        self._cancelRetry()
        self._goneAway = proto
        self.say(f"TP is going away: {reason}; reconnecting")
        # A new connection: over QUIC, the old one goes to the TP that is
        # going away.
        self.uplink = self._newUplink(self.uplink.settings)
        self._connect()

    def _lostWhileMoving(self, proto: ControlProtocol, reason: Failure) -> None:
        self.active = None
        if proto.uplink is not self.uplink:
            proto.uplink.retire()
        if proto is not self._goneAway:
            self.say(f"Lost the connection to TP ({describeTLSFailure(reason)}); reconnecting")

    def _stop(self, quietly: bool) -> defer.Deferred[None]:
        self._cancelRetry()
        if not quietly:
            lhost, lport = self.local
            self.say(f"Stopping: {lhost}:{lport} is no longer exposed")
        closing = []
        if self.attempt is not None:
            self.attempt.dropped = True
        for proto in (self.active, self.attempt and self.attempt.built):
            if proto is not None and not proto.done.called:
                # Wait on a Deferred of our own: the timeout below cancels
                # what it waits on, and proto.done has other waiters.
                closed: defer.Deferred[None] = defer.Deferred()
                proto.done.addBoth(lambda result, closed=closed: (closed.called or closed.callback(None), result)[1])
                closing.append(closed)
                proto.retire()
        self.active = self.attempt = None
        done = defer.DeferredList(closing, consumeErrors=True)
        done.addTimeout(STOP_GRACE, self.reactor)

        def closeUplinks(_: Any) -> None:
            for uplink in self.uplinks:
                uplink.close()

        return done.addBoth(closeUplinks)

    # --- sessions -------------------------------------------------------------

    #: Introductions answered at once (each holds an ICE agent: a UDP
    #: socket per local address); more are declined, and their dialers
    #: come through TP.
    MAX_INTRODUCTIONS = 16
    introducing = 0

    def _introduced(self, session: str, identity: str | None, offer: dict[str, Any]) -> None:
        from tpproxy.p2p.client import answerIntroduction

        uplink = self.uplink
        settings = uplink.settings

        def accept(hello: ClientHello) -> Any:
            return openTunnel(self.reactor, settings.server, uplink.tlsOptions, hello, settings.connectTimeout)

        if self.introducing >= self.MAX_INTRODUCTIONS:
            # An accept without an answer declines: the dialer goes through TP.
            accept(ClientHello("accept", session=session)).addCallbacks(lambda end: end.transport.loseConnection(), lambda f: None)
            return
        self.introducing += 1

        def done(result: Any) -> Any:
            self.introducing -= 1
            return result

        answerIntroduction(self.reactor, settings, accept, self.local, session, identity, offer, self.say).addBoth(done)

    def incomingStream(self) -> IncomingStream:
        return IncomingStream(self)

    def serveStream(self, end: IncomingStream, fields: dict[str, Any]) -> None:
        """
        Over QUIC, TP opened a stream for an incoming session: connect the
        local service and splice.
        """
        who = f"{fields.get('identity')} from {fields.get('peer')}" if fields.get("identity") else str(fields.get("peer"))
        target = connectProtocol(tcpEndpoint(self.reactor, self.local[0], self.local[1], 10), LocalTarget())

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

    def incoming(self, session: str, identity: str | None, peer: str, p2p: dict[str, Any] | None = None) -> None:
        """
        Over TLS, TP announced an incoming session on the signalling
        connection: claim it on a new connection (with the current
        certificate) and splice it to the local service.  With C{p2p}, TP
        introduces a dialer for a direct path instead (docs/p2p.md).
        """
        who = f"{identity} from {peer}" if identity else peer
        if p2p is not None and self.hello.p2p:
            self._introduced(session, identity, p2p)
            return
        tunnel = self.uplink.accept(session)
        target = connectProtocol(tcpEndpoint(self.reactor, self.local[0], self.local[1], 10), LocalTarget())
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


#: Signalling connections C{tp expose} keeps by default to the addresses
#: one server name resolves to (C{--links}).
DEFAULT_LINKS = 2


class ExposerLinks:
    """
    One exposure kept on several signalling connections (B{links}), each
    an L{Exposer} of its own to one TP instance: exposer HA.  Each link
    names itself in its C{listen} (C{member}), so TP tells a reconnect of a
    link from another link: links that land on one instance form a pool
    there, and links on several instances hold the route on each (the
    cluster sends a dial to any live holder, docs/cluster.md).

    The command is up once one link is registered; a link whose first
    registration fails then keeps trying with backoff.  It fails only if
    every link's first registration failed.  A public port TP picks is
    asked for on the other links once the first link has it.
    """

    def __init__(self, links: list[Exposer]) -> None:
        self.links = links
        self.first: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.errors: list[Failure] = []
        if len(links) > 1:
            for link in links:
                link.label = f"[{link.settings.server}] "

    def start(self) -> defer.Deferred[dict[str, Any]]:
        hello = self.links[0].hello
        if hello.mode == "public" and not hello.port:
            self._startInTurn(list(self.links))
        else:
            for link in self.links:
                self._start(link)
        return self.first

    def _start(self, link: Exposer) -> None:
        link.start().addCallbacks(lambda info: self._up(link, info), lambda f: self._failed(link, f))

    def _startInTurn(self, waiting: list[Exposer]) -> None:
        """
        Register the links one at a time until one is up (a public port
        TP picks: the others then ask for that port).
        """
        link = waiting.pop(0)

        def up(info: dict[str, Any]) -> None:
            # Every other link asks for this port: those still waiting, and
            # those that failed before (tried again by _up).
            for other in self.links:
                if other is not link:
                    other.hello = replace(other.hello, port=info.get("port") or 0)
            for other in waiting:
                self._start(other)
            self._up(link, info)

        def failed(f: Failure) -> None:
            self._failed(link, f)
            if waiting and not self.first.called:
                self._startInTurn(waiting)

        link.start().addCallbacks(up, failed)

    def _up(self, link: Exposer, info: dict[str, Any]) -> None:
        for other in self.links:
            if other is not link:
                other.keepGoing()
        if not self.first.called:
            self.first.callback(info)

    def _failed(self, link: Exposer, f: Failure) -> None:
        self.errors.append(f)
        if self.first.called:
            link.keepGoing()
        elif len(self.errors) == len(self.links):
            # Every link failed: the command ends with the first error TP
            # gave (a refusal says more than an unreachable instance).
            refusals = [e for e in self.errors if e.check(Refused)]
            self.first.errback((refusals or self.errors)[0])

    def stop(self, quietly: bool = False) -> defer.Deferred[Any]:
        return defer.DeferredList([link.stop(quietly) for link in self.links], consumeErrors=True)

    def renewed(self, loaded: Materials) -> None:
        for link in self.links:
            link.renewed(loaded)

    def say(self, line: str) -> None:
        self.links[0].stderr.write(line + "\n")
        self.links[0].stderr.flush()


@defer.inlineCallbacks
def linkAddresses(reactor: IDialReactor, servers: list[Any], links: int) -> Any:
    """
    The servers an exposer keeps a link to: each of C{servers}, and, for a
    name that resolves to several addresses of one family (its first
    answer's), up to C{links} of them, each pinned to its address.  One
    address per family is taken as one host (C{localhost}, or a host with
    IPv4 and IPv6): one link, unpinned.  A name that does not resolve now
    gets one unpinned link, which reports that itself.
    """
    from tpproxy.dial import resolveHost

    result = []
    for server in servers:
        try:
            addresses = yield resolveHost(reactor, server.host, server.port)  # type: ignore[arg-type]
        except Exception:
            addresses = []
        if addresses:
            family = ":" in addresses[0]
            addresses = list(dict.fromkeys(a for a in addresses if (":" in a) == family))
        if links > 1 and len(addresses) > 1:
            result.extend(replace(server, address=a) for a in addresses[:links])
        else:
            result.append(server)
    return result


@defer.inlineCallbacks
def runExpose(
    reactor: IDialReactor,
    settings: Any,
    local: tuple[str, int],
    hello: ClientHello,
    keepalive: float,
    stderr: Any,
    servers: list[Any] | None = None,
    links: int = DEFAULT_LINKS,
) -> Any:
    """
    Register, and keep the exposure up until interrupted.  A refusal on the
    first attempt ends the command (exit status 3, or 1 if TP could not be
    reached); after a first success, TP going away means registering again,
    and a renewed certificate (its files rewritten) means moving to it.

    @param servers: the TP servers to keep a link to (default: the
        settings' one); see L{linkAddresses} and L{ExposerLinks}.
    """
    try:
        loaded = loadMaterials(settings)
    except ValueError as e:
        raise TunnelError(str(e)) from None
    targets = yield linkAddresses(reactor, servers or [settings.server], links)
    group = ExposerLinks(
        [
            Exposer(reactor, LoadedSettings(replace(settings, server=server), loaded), local, replace(hello, member=secrets.token_urlsafe(12)), keepalive, stderr)
            for server in targets
        ]
    )
    try:
        yield group.start()
    except Exception:
        yield group.stop(quietly=True)
        raise
    watcher = watchCertificate(reactor, settings, loaded, group.renewed, group.say)
    reactor.addSystemEventTrigger("before", "shutdown", watcher.stop)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", group.stop)  # type: ignore[attr-defined]
    yield defer.Deferred()  # until the reactor stops
