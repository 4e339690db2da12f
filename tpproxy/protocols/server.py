# -*- test-case-name: tpproxy.test.test_server,tpproxy.test.test_sessions -*-
"""
The TP server protocol: one connection from its TLS handshake (or QUIC
stream) to its close.  L{TPServerProtocol} reads the handshake's verdict
and the ClientHello, then hands the connection to the session of the
operation asked for (L{tpproxy.protocols.sessions}); it owns refusals,
timeouts and the one audit event per connection.
"""

from __future__ import annotations

import enum
import time
from collections import Counter, OrderedDict
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy.config import LimitsConfig, ServerConfig
from tpproxy.dial import Dialer
from tpproxy.firstframe import FirstFrameReader, Frame, Malformed
from tpproxy.limits import TokenBucket
from tpproxy.machine import Machine
from tpproxy.pki import PeerIdentity, certificateOf, identityOf
from tpproxy.protocols.relay import RelayEnd
from tpproxy.protocols.relay import describeAddress as _addr
from tpproxy.protocols.relay import noDelay
from tpproxy.protocols.sessions import (
    AcceptSession,
    ConnectSession,
    E2ESession,
    ListenSession,
    Outbound,
    OutboundFactory,
    Session,
    SNISession,
    UdpSession,
)
from tpproxy.reactors import IServerReactor
from tpproxy.reverse.registry import Registry, ReverseError
from tpproxy.transports.servertls import ServerTLS
from tpproxy.transports.tls import describeTLSFailure
from tpproxy.verify import leafRefusal
from tpproxy.wire import ALPN, ClientHello, ErrorCode, ServerHello

__all__ = ["LINGER", "Outbound", "OutboundFactory", "TPServerFactory", "TPServerProtocol"]

log = Logger(namespace="tpproxy.server")
#: The ALPN of TP's HTTPS pages for browsers (with C{[webtransport]}).
HTTP11 = b"http/1.1"
audit = Logger(namespace="tpproxy.audit")

#: How long a refused peer has to read its ServerHello before TP hangs up.
LINGER = 5.0



class ConnState(str, enum.Enum):
    HANDSHAKE = "handshake"
    HELLO = "hello"
    SESSION = "session"  # a session serves the connection
    REFUSED = "refused"  # answered with an error, closing
    CLOSED = "closed"


@implementer(IHandshakeListener)
class TPServerProtocol(RelayEnd, TimeoutMixin, Machine[ConnState]):
    """
    One client connection, from TLS handshake to close: the dispatcher.

    Its own states are in L{ConnState}; while a session serves it,
    L{phase} is the session's state.  Exactly one audit event is logged
    per connection, when it closes.

    The fields of that event are attributes the sessions (and
    L{tpproxy.transports.udp.ServerFlow}) fill in: C{event}, C{result},
    C{detail}, C{address}, with C{identity} and C{hello}.
    """

    C = ConnState
    TRANSITIONS = {
        (C.HANDSHAKE, "handshake"): (C.HELLO, "_handshook"),
        # Renegotiation is disabled; a second notification is a bug.
        (C.HELLO, "handshake"): (C.HELLO, "_renegotiated"),
        (C.SESSION, "handshake"): (C.SESSION, "_renegotiated"),
        (C.REFUSED, "handshake"): (C.REFUSED, None),
        (C.HELLO, "challenge"): (C.REFUSED, "_servedChallenge"),
        (C.HELLO, "sni"): (C.SESSION, "_startSNI"),
        (C.HELLO, "hello"): (C.SESSION, "_startSession"),
        (C.HANDSHAKE, "data"): (C.HANDSHAKE, None),
        (C.HELLO, "data"): (C.HELLO, "_readHello"),
        (C.SESSION, "data"): (C.SESSION, "_sessionData"),
        (C.REFUSED, "data"): (C.REFUSED, None),
        (C.HANDSHAKE, "eof"): (C.HANDSHAKE, None),
        (C.HELLO, "eof"): (C.HELLO, "_clientClosed"),
        (C.SESSION, "eof"): (C.SESSION, "_sessionEOF"),
        (C.REFUSED, "eof"): (C.REFUSED, None),
        (C.HANDSHAKE, "timeout"): (C.HANDSHAKE, "_handshakeTimedOut"),
        (C.HELLO, "timeout"): (C.HELLO, "_helloTimedOut"),
        (C.SESSION, "timeout"): (C.SESSION, "_abort"),
        (C.REFUSED, "timeout"): (C.REFUSED, "_abort"),
        (C.HELLO, "refuse"): (C.REFUSED, "_refuse"),
        (C.SESSION, "refuse"): (C.REFUSED, "_refuse"),
        (C.REFUSED, "refuse"): (C.REFUSED, None),
        (C.CLOSED, "refuse"): (C.CLOSED, None),
        (C.HANDSHAKE, "lost"): (C.CLOSED, "_lostInHandshake"),
        (C.HELLO, "lost"): (C.CLOSED, "_lost"),
        (C.SESSION, "lost"): (C.CLOSED, "_lost"),
        (C.REFUSED, "lost"): (C.CLOSED, "_lost"),
    }

    event = "connect"
    session: Session | None = None
    identity: PeerIdentity | None = None
    hello: ClientHello | None = None
    address: str | None = None
    result = "handshake_failed"
    detail = ""
    #: The client certificate's leaf (cryptography), once the handshake
    #: verified it: re-checked on reload (tpproxy.reload).
    certificate: Any = None
    #: C{(result, detail)} once TP ended the connection on its own
    #: initiative (L{revoke}): what the audit event says, whatever the
    #: session had recorded.
    revokedAs: tuple[str, str] | None = None
    _expiry: Any = None
    #: Counted in the factory's L{Usage} (released when the connection ends).
    _counted = False
    #: When the ClientHello was read, and seconds from it to the ServerHello.
    helloAt: float | None = None
    setup: float | None = None

    def __init__(self, factory: TPServerFactory) -> None:
        self.factory = factory
        self.state = ConnState.HANDSHAKE
        self.reader: FirstFrameReader[ClientHello] = FirstFrameReader(ClientHello.fromObject)

    @property
    def phase(self) -> str:
        """
        The connection's state, or its session's while one serves it: what
        a test or a log line reads (C{"dialling"}, C{"listening"}, ...).
        """
        if self.state is ConnState.SESSION and self.session is not None:
            return str(self.session.state.value)
        return self.state.value

    def callLater(self, delay: float, f: Any, *a: Any, **kw: Any) -> Any:
        return self.factory.reactor.callLater(delay, f, *a, **kw)

    def connectionMade(self) -> None:
        self.started = self.factory.reactor.seconds()
        self.peerAddress = _addr(self.transport.getPeer())  # type: ignore[union-attr]
        noDelay(self.transport)
        self.setTimeout(self.factory.config.handshakeTimeout)
        self.factory.live.add(self)

    # --- inputs ---------------------------------------------------------------

    def handshakeCompleted(self) -> None:
        self._input("handshake")

    def preSpliceData(self, data: bytes) -> None:
        self._input("data", data)

    def preSpliceEOF(self) -> None:
        """
        The client sent EOF before any splice.  After a connect or accept
        hello it is carried into the splice; anywhere else it ends the
        connection (a signalling connection closing, say).
        """
        self._input("eof")

    def timeoutConnection(self) -> None:
        self._input("timeout")

    def refuse(self, code: ErrorCode, message: str, answer: bool = True) -> None:
        """
        Refuse the request: a failed ServerHello (unless C{answer} is
        false: a direct SNI dialer has no TP protocol), then close.
        """
        self._input("refuse", code, message, answer)

    def connectionLost(self, reason: Failure) -> None:
        self._input("lost", reason)

    # --- handshake and hello --------------------------------------------------

    def _handshook(self) -> None:
        challenge = getattr(self.transport, "tpACMEChallenge", None)
        if challenge is not None:
            self._input("challenge", challenge)
            return
        cert = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        try:
            self.certificate = certificateOf(cert)
            self.identity = identityOf(self.certificate)
        except (ValueError, AttributeError) as e:
            self.refuse(ErrorCode.FORBIDDEN, f"no usable identity in the client certificate: {e}")
            return
        if self.transport.negotiatedProtocol == HTTP11 and self.factory.web is not None:  # type: ignore[union-attr]
            self._serveWeb()
            return
        self._watchExpiry()
        sniName = getattr(self.transport, "tpSNIName", None)
        if sniName is not None:
            self._input("sni", sniName)
            return
        negotiated = self.transport.negotiatedProtocol  # type: ignore[union-attr]
        offered = getattr(self.transport, "tpALPNOffered", None)
        if negotiated != ALPN and offered is not None:
            names = ", ".join(p.decode("ascii", "replace") for p in offered)
            self.refuse(ErrorCode.BAD_REQUEST, f"this is a TP server: ALPN {ALPN.decode()} expected, client offered {names}")
            return
        self.result = "hello_timeout"
        self.setTimeout(self.factory.config.helloTimeout)

    def _serveWeb(self) -> None:
        """
        A browser with a verified client certificate (ALPN C{http/1.1},
        offered with C{[webtransport]}): TP's HTTPS pages and token endpoint
        (L{tpproxy.web.site}) serve the connection from now on, in place of
        this protocol.  It is no tunnel: no audit event of its own (a
        minted token is audited).
        """
        self.setTimeout(None)
        self.factory.live.discard(self)
        self.state = ConnState.CLOSED
        tls = self.transport
        channel = self.factory.web.buildProtocol(tls.getPeer())  # type: ignore[union-attr]
        tls.wrappedProtocol = channel  # type: ignore[union-attr]
        channel.makeConnection(tls)

    def _watchExpiry(self) -> None:
        """
        With C{server.disconnect_expired_cert} (the default), end the
        connection when its client certificate expires: a short-lived
        certificate then bounds how long a stolen one lasts, tunnels
        included.
        """
        assert self.identity is not None
        self.factory.renewals.seen(self.identity.name, self.certificate)
        if not self.factory.config.disconnectExpiredCert:
            return
        self._scheduleExpiry(self.certificate)

    def _scheduleExpiry(self, certificate: Any) -> None:
        delay = max(0.0, certificate.not_valid_after_utc.timestamp() - self.factory.wallClock())
        self._expiry = self.callLater(delay, self._expired, certificate)

    def _expired(self, certificate: Any) -> None:
        """
        The certificate this connection's identity is held to expired.  If
        the same identity has since proven itself to TP with a renewed
        certificate that TP still accepts, the connection goes on until
        that one expires (a long-running client moves to its renewed
        certificate without dropping its tunnels: docs/operations.md);
        else it ends.
        """
        assert self.identity is not None
        if not self.factory.config.disconnectExpiredCert:
            return
        renewed = self.factory.renewals.latest(self.identity.name)
        checker = self.factory.serverTLS.checker if self.factory.serverTLS is not None else None
        if (
            renewed is not None
            and renewed.not_valid_after_utc > certificate.not_valid_after_utc
            and renewed.not_valid_after_utc.timestamp() > self.factory.wallClock()
            and (checker is None or leafRefusal(checker, renewed) is None)
        ):
            self._scheduleExpiry(renewed)
            return
        self.revoke("expired", f"the client certificate expired at {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")

    def revoke(self, result: str, detail: str, gently: bool = False) -> None:
        """
        End this connection now, on TP's initiative (a reload that no
        longer allows it, an expired certificate): the audit event says
        C{result} and C{detail}.  The tunnel's other end closes with it.

        @param gently: close after what was written (a C{goaway}) has gone
            out, instead of aborting.
        """
        if self.state is ConnState.CLOSED or self.revokedAs is not None:
            return
        self.revokedAs = (result, detail)
        log.info(
            "Closing {identity}'s {op} connection from {peer}: {result} - {detail}",
            identity=self.identity.name if self.identity else None,
            op=self.event,
            peer=self.peerAddress,
            result=result,
            detail=detail,
        )
        peer = self.peer
        if gently:
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.linger()
        else:
            self.transport.abortConnection()  # type: ignore[union-attr]
        if peer is not None and peer.transport is not None:
            peer.transport.abortConnection()

    def answer(self, hello: ServerHello) -> None:
        """
        Send the successful ServerHello; the time from the ClientHello to
        it is the audit event's C{setup} (policy, resolution, dial or
        registration).
        """
        self.transport.write(hello.toFrame())  # type: ignore[union-attr]
        if self.helloAt is not None and self.setup is None:
            self.setup = round(self.factory.reactor.seconds() - self.helloAt, 4)

    def _renegotiated(self) -> None:
        self.refuse(ErrorCode.BAD_REQUEST, "unexpected renegotiation")

    def _servedChallenge(self, name: str) -> None:
        # An ACME validator fetched the tls-alpn-01 certificate: it has no
        # client certificate and gets nothing but the handshake.
        self.result = "acme_challenge"
        self.detail = f"tls-alpn-01 challenge for {name}"
        log.info("Served the tls-alpn-01 challenge for {name} to {peer}", name=name, peer=self.peerAddress)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _handshakeTimedOut(self) -> None:
        self.detail = f"no TLS handshake within {self.factory.config.handshakeTimeout:g} s"
        log.info("Timing out TLS handshake from {peer}", peer=self.peerAddress)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _helloTimedOut(self) -> None:
        self.refuse(ErrorCode.BAD_REQUEST, f"no complete ClientHello within {self.factory.config.helloTimeout:g} s")

    def _abort(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _readHello(self, data: bytes) -> None:
        match self.reader.feed(data):
            case Frame(message=hello, rest=rest):
                self._input("hello", hello, rest)
            case Malformed(error=error):
                self.refuse(error.code, error.message)

    def _clientClosed(self) -> None:
        self.detail = self.detail or "the client closed its side"
        self.transport.loseConnection()  # type: ignore[union-attr]

    # --- sessions -------------------------------------------------------------

    def _startSession(self, hello: ClientHello, rest: bytes) -> None:
        self.hello = hello
        self.helloAt = self.factory.reactor.seconds()
        self.setTimeout(None)
        self.event = hello.op
        self.result = "aborted"  # until the request ends: the client left first
        assert self.identity is not None
        allowed = getattr(self.transport, "tpOperations", None)
        if allowed is not None and hello.op not in allowed:
            self.refuse(ErrorCode.BAD_REQUEST, f"operation {hello.op!r} is not served over {self.transport.carrier}: only {', '.join(sorted(allowed))}")  # type: ignore[union-attr]
            return
        over = self.factory.usage.admit(self.identity.name, hello.op, self.factory.config.limits, self.factory.reactor.seconds())
        if over is not None:
            self.refuse(ErrorCode.LIMIT_EXCEEDED, over)
            return
        self._counted = True
        self.transport.pauseProducing()  # type: ignore[union-attr]
        kind: type[Any]
        if hello.op == "listen":
            kind = ListenSession
        elif hello.op == "udp":
            kind = UdpSession
        elif hello.op == "accept":
            kind = AcceptSession
        elif self.factory.registry.nameExposure(hello.host) is not None:
            kind = E2ESession
        else:
            kind = ConnectSession
        self.session = kind(self, hello)
        self.session.start(rest)

    def _startSNI(self, name: str) -> None:
        self.event = "sni"
        self.hello = ClientHello.connect(name, 443)
        assert self.identity is not None
        over = self.factory.usage.admit(self.identity.name, "connect", self.factory.config.limits, self.factory.reactor.seconds())
        if over is not None:
            self.refuse(ErrorCode.LIMIT_EXCEEDED, over, answer=False)
            return
        self._counted = True
        self.session = SNISession(self, name)
        self.session.start(b"")

    def _sessionData(self, data: bytes) -> None:
        assert self.session is not None
        self.session.data(data)

    def _sessionEOF(self) -> None:
        assert self.session is not None
        self.session.eof()

    # --- end ------------------------------------------------------------------

    def _refuse(self, code: ErrorCode, message: str, answer: bool) -> None:
        self.result = code.value
        self.detail = message
        if self.session is not None:
            self.session.refused()
        if answer:
            self.transport.write(ServerHello.failure(code, message).toFrame())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]
        # Reading again (it is paused while dialling) lets the peer's close
        # reach us; LINGER bounds a peer that never closes.
        self.transport.resumeProducing()  # type: ignore[union-attr]
        self.linger()

    def linger(self) -> None:
        """
        The connection is closing: give the peer L{LINGER} seconds to read
        what it was sent, then abort.
        """
        if self.state is not ConnState.CLOSED:  # a transport may close at once
            self.setTimeout(LINGER)

    def _lostInHandshake(self, reason: Failure) -> None:
        self.detail = self.detail or getattr(self.transport, "tpRefusal", None) or describeTLSFailure(reason)
        self._lost(reason)

    def _lost(self, reason: Failure) -> None:
        self.setTimeout(None)
        self.factory.live.discard(self)
        if self._counted:
            assert self.identity is not None and self.hello is not None
            self.factory.usage.release(self.identity.name, self.hello.op)
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        if self.session is not None:
            self.session.lost(reason)
        super().connectionLost(reason)
        self._audit()

    def _audit(self) -> None:
        hello = self.hello
        if self.session is not None:
            bytesUp, bytesDown = self.session.counts()
        else:
            bytesUp, bytesDown = self.bytesIn, self.peer.bytesIn if self.peer is not None else 0
        if self.revokedAs is not None:
            self.result, self.detail = self.revokedAs
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
            bytes_up=bytesUp,
            bytes_down=bytesDown,
            duration=round(self.factory.reactor.seconds() - self.started, 3),
            setup=self.setup,
        )


class Usage:
    """
    What authenticated identities hold, against C{[limits]}: live tunnels
    (all of TP's and each identity's, by operation) and a per-minute budget
    of new ones per identity.  Exposures are counted as their signalling
    (C{listen}) connections, UDP flows as their C{udp} tunnels.
    """

    #: Identities whose per-minute budget is remembered at most; beyond,
    #: the oldest is forgotten (it starts again with a full budget).
    MAX_BUCKETS = 100_000

    def __init__(self) -> None:
        self.total = 0
        self.byIdentity: dict[str, Counter[str]] = {}
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def admit(self, identity: str, op: str, limits: LimitsConfig, now: float) -> str | None:
        """
        Count a new tunnel of C{identity} for C{op}, or say which limit
        refuses it (and count nothing).
        """
        held = self.byIdentity.get(identity)
        mine = sum(held.values()) if held else 0
        if self.total >= limits.tunnels:
            return f"TP carries its maximum of {limits.tunnels} tunnels (limits.tunnels); try again later"
        if mine >= limits.tunnelsPerIdentity:
            return f"{identity} holds its maximum of {limits.tunnelsPerIdentity} tunnels (limits.tunnels_per_identity)"
        if op == "listen" and held and held["listen"] >= limits.exposuresPerIdentity:
            return f"{identity} holds its maximum of {limits.exposuresPerIdentity} exposures (limits.exposures_per_identity)"
        if op == "udp" and held and held["udp"] >= limits.udpFlowsPerIdentity:
            return f"{identity} holds its maximum of {limits.udpFlowsPerIdentity} UDP flows (limits.udp_flows_per_identity)"
        perMinute = limits.tunnelsPerIdentityPerMinute
        bucket = self.buckets.get(identity)
        if bucket is None or bucket.burst != perMinute:
            bucket = self.buckets[identity] = TokenBucket(perMinute / 60.0, perMinute)
            if len(self.buckets) > self.MAX_BUCKETS:
                self.buckets.popitem(last=False)
        self.buckets.move_to_end(identity)
        if not bucket.take(now):
            return f"{identity} opened more than {perMinute} tunnels in a minute (limits.tunnels_per_identity_per_minute); slow down"
        self.total += 1
        self.byIdentity.setdefault(identity, Counter())[op] += 1
        return None

    def release(self, identity: str, op: str) -> None:
        self.total -= 1
        held = self.byIdentity[identity]
        held[op] -= 1
        if held[op] <= 0:
            del held[op]
        if not held:
            del self.byIdentity[identity]


class Renewals:
    """
    The certificate with the latest notAfter each identity has completed a
    handshake with (bounded: the oldest identity is forgotten first).
    """

    MAX = 100_000

    def __init__(self) -> None:
        self.byIdentity: OrderedDict[str, Any] = OrderedDict()

    def seen(self, identity: str, certificate: Any) -> None:
        known = self.byIdentity.get(identity)
        if known is None or certificate.not_valid_after_utc > known.not_valid_after_utc:
            self.byIdentity[identity] = certificate
        self.byIdentity.move_to_end(identity)
        if len(self.byIdentity) > self.MAX:
            self.byIdentity.popitem(last=False)

    def latest(self, identity: str) -> Any:
        return self.byIdentity.get(identity)


class TPServerFactory(Factory):
    """
    Builds L{TPServerProtocol}s; wrap it in L{tpproxy.transports.tls.TLSFactory} with a
    L{tpproxy.transports.servertls.ServerTLS}.
    """

    def __init__(
        self,
        config: ServerConfig,
        reactor: IServerReactor,
        dialer: Dialer | None = None,
        serverTLS: ServerTLS | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.dialer = dialer or Dialer(reactor, config.policy, config.connectTimeout)
        self.serverTLS = serverTLS
        self.registry: Any = registry if registry is not None else _NoReverse()
        #: Connections from connectionMade to connectionLost.
        self.live: set[TPServerProtocol] = set()
        #: What each identity holds, against the limits.
        self.usage = Usage()
        #: Each identity's latest certificate, for connections that outlive
        #: an older one.
        self.renewals = Renewals()
        #: The time certificates are checked against (Unix time).
        self.wallClock: Callable[[], float] = time.time
        #: P2P introductions (docs/p2p.md): introduced, declined, not_accepted.
        self.p2p: Counter[str] = Counter()
        #: With C{[webtransport]}: the site (a L{twisted.web.server.Site})
        #: that serves browsers on ALPN C{http/1.1} (L{tpproxy.web.site}).
        self.web: Any = None

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
