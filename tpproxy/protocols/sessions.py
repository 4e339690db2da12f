# -*- test-case-name: tpproxy.test.test_sessions,tpproxy.test.test_server -*-
"""
One session per operation of the TP server protocol.

L{tpproxy.protocols.server.TPServerProtocol} owns the connection: the TLS
handshake, the ClientHello, refusals, timeouts and the one audit event.
Once it knows what the client asked for, it hands the connection to one of
these sessions:

    - L{ConnectSession}: dial a destination, then splice;
    - L{UdpSession}: check a UDP destination, then carry a flow;
    - L{ListenSession}: register an exposure, then run the signalling
      connection's event loop (L{tpproxy.control.ControlLoop});
    - L{AcceptSession}: claim an incoming session, then splice;
    - L{E2ESession}: a TLS server for an exposure's name inside the tunnel
      (L{E2EDialer} is its inside);
    - L{SNISession}: a direct E2E dialer, chosen by the handshake's SNI;
    - L{PeerSession}: another instance of the cluster forwards a dialer of
      a route this instance holds (a peer link, docs/cluster.md).

Each is a L{Machine}: its states are an enum and its behaviour the
C{TRANSITIONS} table at the top of its class.  Every session takes
C{start}, C{refused} (the connection answered with an error) and C{lost}
(the connection is gone) besides its own inputs; the connection gives it
bytes (C{data}) and an EOF (C{eof}) read before any splice.  One module
for all of them: each is short, they share the base and the connection's
vocabulary, and a reader sees the five machines side by side.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy.control import ControlLoop, IControlEnd
from tpproxy.dial import DialError
from tpproxy.machine import Machine
from tpproxy.names import normalize
from tpproxy.pki import certificateOf, identityOf
from tpproxy.protocols.relay import RelayEnd, noDelay, splice
from tpproxy.reverse.registry import Exposure, PendingSession, ReverseError
from tpproxy.transports.servertls import NameTLS
from tpproxy.transports.tls import TLSFactory
from tpproxy.wire import ClientHello, ErrorCode, ServerHello, WireError, encodeEvent

if TYPE_CHECKING:
    from tpproxy.protocols.server import TPServerProtocol

log = Logger(namespace="tpproxy.server")


class Outbound(RelayEnd):
    """
    TP's connection to a destination.
    """

    def connectionMade(self) -> None:
        noDelay(self.transport)


class MachineEnd(RelayEnd, Machine[Any]):
    """
    A relay end whose every event is an input of its transition table: the
    TLS handshake, bytes before the splice, the registry's C{joined} and
    C{failed}, and the connection's loss.
    """

    def handshakeCompleted(self) -> None:
        self._input("handshake")

    def preSpliceData(self, data: bytes) -> None:
        self._input("data", data)

    def sessionJoined(self, acceptEnd: RelayEnd) -> None:
        self._input("joined", acceptEnd)

    def sessionFailed(self, code: ErrorCode, message: str) -> None:
        self._input("failed", code, message)

    def connectionLost(self, reason: Failure) -> None:
        self._input("lost", reason)


class OutboundFactory(Factory):
    protocol = Outbound
    noisy = False


class Session(Machine[Any]):
    """
    The part of one connection that serves its operation.

    @ivar conn: the connection (its transport, identity, ClientHello and
        audit fields).
    """

    def __init__(self, conn: TPServerProtocol) -> None:
        self.conn = conn
        self.factory = conn.factory

    # Inputs every session takes.

    def start(self, rest: bytes) -> None:
        """
        Begin; C{rest} is what followed the ClientHello in its read.
        """
        self._input("start", rest)

    def data(self, data: bytes) -> None:
        self._input("data", data)

    def eof(self) -> None:
        self._input("eof")

    def refused(self) -> None:
        self._input("refused")

    def lost(self, reason: Failure) -> None:
        self._input("lost", reason)

    def counts(self) -> tuple[int, int]:
        """
        Bytes from the client and to it, for the audit event.
        """
        peer = self.conn.peer
        return self.conn.bytesIn, peer.bytesIn if peer is not None else 0

    # Outputs sessions share.

    def _clientClosed(self) -> None:
        """
        EOF from the client where nothing carries it on: end the connection.
        """
        self.conn.detail = self.conn.detail or "the client closed its side"
        self.conn.transport.loseConnection()  # type: ignore[union-attr]

    def _dialFailed(self, failure: Failure) -> None:
        if failure.check(DialError):
            err: DialError = failure.value  # type: ignore[assignment]
            self.conn.address = err.address
            hello = self.conn.hello
            if err.code is ErrorCode.RESOLVE_FAILED and hello is not None and self.factory.config.policy.exposableName(normalize(hello.host)):
                # A name only an exposure can have, and nobody exposes it.
                self.conn.refuse(ErrorCode.NOT_EXPOSED, f"nobody exposes {normalize(hello.host)} right now")
                return
            self.conn.refuse(err.code, err.message)
        else:
            identity = self.conn.identity
            log.failure("Unexpected error while dialling for {identity}", failure, identity=identity and identity.name)
            self.conn.refuse(ErrorCode.INTERNAL, "internal error while connecting")


def _rows(states: Any, input: str, to: Any | None, output: str | None) -> dict[tuple[Any, str], tuple[Any, str | None]]:
    """
    The same row for several states: to C{to} (L{None}: stay).
    """
    return {(s, input): (to if to is not None else s, output) for s in states}


# --- connect ----------------------------------------------------------------


class ConnectState(str, enum.Enum):
    NEW = "new"
    DIALLING = "dialling"
    SPLICED = "spliced"
    REFUSED = "refused"
    CLOSED = "closed"


class ConnectSession(Session):
    """
    C{connect}: dial the destination (the L{tpproxy.dial.Dialer} applies the
    policy), answer, splice.  Bytes the client sent after its hello wait
    for the splice.
    """

    S = ConnectState
    TRANSITIONS = {
        (S.NEW, "start"): (S.DIALLING, "_dial"),
        (S.DIALLING, "data"): (S.DIALLING, "_hold"),
        (S.DIALLING, "eof"): (S.DIALLING, None),  # the splice carries it on
        (S.DIALLING, "dialled"): (S.SPLICED, "_splice"),
        (S.DIALLING, "dialFailed"): (S.REFUSED, "_dialFailed"),
        # A dial that ends after the client left or was refused.
        (S.REFUSED, "dialled"): (S.REFUSED, "_dropOutbound"),
        (S.CLOSED, "dialled"): (S.CLOSED, "_dropOutbound"),
        (S.REFUSED, "dialFailed"): (S.REFUSED, None),
        (S.CLOSED, "dialFailed"): (S.CLOSED, None),
        **_rows((S.DIALLING, S.SPLICED, S.REFUSED), "refused", S.REFUSED, None),
        **_rows((S.DIALLING, S.SPLICED, S.REFUSED), "lost", S.CLOSED, "_lost"),
    }

    dialling: defer.Deferred[Any] | None = None
    outbound: Outbound | None = None

    def __init__(self, conn: TPServerProtocol, hello: ClientHello) -> None:
        super().__init__(conn)
        self.hello = hello
        self.state = ConnectState.NEW
        self.pending = b""

    def _dial(self, rest: bytes) -> None:
        self.pending = rest
        identity = self.conn.identity
        assert identity is not None
        self.dialling = self.factory.dialer.dial(identity.name, self.hello.host, self.hello.port, OutboundFactory())
        self.dialling.addCallbacks(self._dialled, self._failed)

    def _dialled(self, result: tuple[Outbound, str]) -> None:
        self.dialling = None
        self._input("dialled", *result)

    def _failed(self, failure: Failure) -> None:
        self.dialling = None
        self._input("dialFailed", failure)

    def _hold(self, data: bytes) -> None:
        # The transport is paused, so at most what one read decrypted
        # lands here.
        self.pending += data

    def _splice(self, outbound: Outbound, address: str) -> None:
        conn = self.conn
        self.outbound = outbound
        conn.address = address
        conn.result = "ok"
        conn.answer(ServerHello.success(address=address))
        pending, self.pending = self.pending, b""
        splice(conn, outbound, fromA=pending)
        conn.transport.resumeProducing()  # type: ignore[union-attr]

    def _dropOutbound(self, outbound: Outbound, address: str) -> None:
        outbound.transport.loseConnection()  # type: ignore[union-attr]

    def _lost(self, reason: Failure) -> None:
        if self.dialling is not None:
            self.dialling.cancel()


# --- udp --------------------------------------------------------------------


class UdpState(str, enum.Enum):
    NEW = "new"
    CHECKING = "dialling"
    FLOWING = "udp"
    REFUSED = "refused"
    CLOSED = "closed"


class UdpSession(Session):
    """
    C{udp}: check the destination against the policy, answer, then carry
    the flow (L{tpproxy.transports.udp.ServerFlow}).
    """

    S = UdpState
    TRANSITIONS = {
        (S.NEW, "start"): (S.CHECKING, "_check"),
        (S.CHECKING, "data"): (S.CHECKING, "_hold"),
        (S.CHECKING, "eof"): (S.CHECKING, None),
        (S.CHECKING, "allowed"): (S.FLOWING, "_open"),
        (S.CHECKING, "dialFailed"): (S.REFUSED, "_dialFailed"),
        (S.FLOWING, "data"): (S.FLOWING, "_stream"),
        (S.FLOWING, "eof"): (S.FLOWING, "_clientClosed"),
        **_rows((S.REFUSED, S.CLOSED), "allowed", None, None),
        **_rows((S.REFUSED, S.CLOSED), "dialFailed", None, None),
        **_rows((S.CHECKING, S.FLOWING, S.REFUSED), "refused", S.REFUSED, None),
        **_rows((S.CHECKING, S.FLOWING, S.REFUSED), "lost", S.CLOSED, "_lost"),
    }

    checking: defer.Deferred[Any] | None = None
    flow: Any = None

    def __init__(self, conn: TPServerProtocol, hello: ClientHello) -> None:
        super().__init__(conn)
        self.hello = hello
        self.state = UdpState.NEW
        self.pending = b""

    def _check(self, rest: bytes) -> None:
        self.pending = rest
        identity = self.conn.identity
        assert identity is not None
        self.checking = self.factory.dialer.allowedAddresses(identity.name, self.hello.host, self.hello.port, "udp")
        self.checking.addCallbacks(self._allowed, self._failed)

    def _allowed(self, addresses: list[str]) -> None:
        self.checking = None
        self._input("allowed", addresses)

    def _failed(self, failure: Failure) -> None:
        self.checking = None
        self._input("dialFailed", failure)

    def _hold(self, data: bytes) -> None:
        self.pending += data

    def _open(self, addresses: list[str]) -> None:
        from tpproxy.transports.udp import ServerFlow

        conn = self.conn
        conn.address = addresses[0]
        self.flow = ServerFlow(self.factory.reactor, conn, conn.address, self.hello.port)
        conn.result = "ok"
        framing = "datagram" if self.flow.quic is not None else "stream"
        conn.answer(ServerHello.success(address=conn.address, flow=self.flow.quarterId, framing=framing))
        rest, self.pending = self.pending, b""
        conn.transport.resumeProducing()  # type: ignore[union-attr]
        if rest:
            self.flow.streamData(rest)

    def _stream(self, data: bytes) -> None:
        self.flow.streamData(data)

    def _lost(self, reason: Failure) -> None:
        if self.checking is not None:
            self.checking.cancel()
        if self.flow is not None:
            self.flow.close()

    def counts(self) -> tuple[int, int]:
        if self.flow is None:
            return super().counts()
        return self.flow.bytesOut, self.flow.socket.bytesIn


# --- listen -----------------------------------------------------------------


class ListenState(str, enum.Enum):
    NEW = "new"
    REGISTERING = "registering"
    LISTENING = "listening"
    CLOSING = "closing"
    REFUSED = "refused"
    CLOSED = "closed"


@implementer(IControlEnd)
class ListenSession(Session):
    """
    C{listen}: register an exposure, answer, then keep the signalling
    connection (pings, deadline, C{incoming} events).  It is the
    exposure's L{tpproxy.reverse.registry.Control}.
    """

    S = ListenState
    _IGNORES_CLOSE = (S.NEW, S.REGISTERING, S.CLOSING, S.REFUSED, S.CLOSED)
    TRANSITIONS = {
        (S.NEW, "start"): (S.REGISTERING, "_register"),
        # The transport is paused while registering; what one read still
        # brought is dropped (the exposer sends nothing before the answer).
        (S.REGISTERING, "data"): (S.REGISTERING, None),
        (S.REGISTERING, "eof"): (S.REGISTERING, "_clientClosed"),
        (S.REGISTERING, "registered"): (S.LISTENING, "_listening"),
        (S.REGISTERING, "registerFailed"): (S.REFUSED, "_registerFailed"),
        (S.LISTENING, "data"): (S.LISTENING, "_control"),
        (S.LISTENING, "eof"): (S.LISTENING, "_clientClosed"),
        (S.LISTENING, "closeControl"): (S.CLOSING, "_closeControl"),
        (S.CLOSING, "data"): (S.CLOSING, None),
        (S.CLOSING, "eof"): (S.CLOSING, None),
        **_rows(_IGNORES_CLOSE, "closeControl", None, None),
        # A registration that ends after the client left or was refused.
        **_rows((S.REFUSED, S.CLOSED), "registered", None, "_unregister"),
        **_rows((S.REFUSED, S.CLOSED), "registerFailed", None, None),
        **_rows((S.REGISTERING, S.LISTENING, S.CLOSING, S.REFUSED), "refused", S.REFUSED, None),
        **_rows((S.REGISTERING, S.LISTENING, S.CLOSING, S.REFUSED), "lost", S.CLOSED, "_lost"),
    }

    exposure: Exposure | None = None

    def __init__(self, conn: TPServerProtocol, hello: ClientHello) -> None:
        super().__init__(conn)
        self.hello = hello
        self.state = ListenState.NEW
        self.loop = ControlLoop(self.factory.reactor, self.factory.config.keepalive, self)

    def _register(self, rest: bytes) -> None:
        self.rest = rest
        identity = self.conn.identity
        assert identity is not None
        d = self.factory.registry.expose(self, identity.name, self.hello.mode, port=self.hello.port, name=self.hello.name, member=self.hello.member)
        d.addCallbacks(lambda exposure: self._input("registered", exposure), lambda f: self._input("registerFailed", f))

    def _listening(self, exposure: Exposure) -> None:
        conn = self.conn
        self.exposure = exposure
        conn.result = "ok"
        conn.address = exposure.describe()
        info = {"port": exposure.port} if exposure.mode == "public" else {"name": exposure.name}
        conn.answer(ServerHello.success(**info))
        log.info("{identity} exposes {exposure}", identity=exposure.owner, exposure=exposure.describe())
        conn.transport.resumeProducing()  # type: ignore[union-attr]
        rest, self.rest = self.rest, b""
        self.loop.start()
        if rest:
            self.loop.feed(rest)

    def _registerFailed(self, failure: Failure) -> None:
        if failure.check(ReverseError):
            err: ReverseError = failure.value  # type: ignore[assignment]
            self.conn.refuse(err.code, err.message)
        else:
            identity = self.conn.identity
            log.failure("Unexpected error in {op} for {identity}", failure, op=self.conn.event, identity=identity and identity.name)
            self.conn.refuse(ErrorCode.INTERNAL, "internal error")

    def _unregister(self, exposure: Exposure) -> None:
        self.factory.registry.leave(exposure, self)

    def _control(self, data: bytes) -> None:
        self.loop.feed(data)

    def closeControl(self, reason: str) -> None:
        """
        End the signalling connection (the registry's takeover, a silent or
        misbehaving exposer); the exposure goes with it.
        """
        self._input("closeControl", reason)

    def _closeControl(self, reason: str) -> None:
        self.conn.detail = reason
        self.conn.transport.abortConnection()  # type: ignore[union-attr]

    @property
    def offersP2P(self) -> bool:
        """
        Whether this exposer may be introduced to dialers (docs/p2p.md): it
        said so in its C{listen}, over TLS (over QUIC, incoming sessions are
        streams TP opens, which carry no introduction).
        """
        return self.hello.p2p is True and not hasattr(self.conn.transport, "streamId")

    def sendIncoming(self, session: str, identity: str | None, peer: str, p2p: dict[str, Any] | None = None) -> None:
        """
        Tell the exposer a dialer waits in C{session} (with C{p2p}: a dialer
        to introduce, with its ICE offer and certificate).
        """
        transport = self.conn.transport
        if p2p is not None:
            transport.write(encodeEvent("incoming", session=session, identity=identity, peer=peer, p2p=p2p))  # type: ignore[union-attr]
            return
        quic = getattr(transport, "session", None)
        if quic is not None and hasattr(transport, "streamId"):
            # Over QUIC the session is a new stream TP opens on the same
            # connection: it can never land anywhere else, and needs no
            # accept (the connection is the exposer's, authenticated).
            owner = self.conn.identity
            assert owner is not None
            quic.openStream(IncomingStreamEnd(self.factory.registry, session, owner.name, identity, peer))
            return
        transport.write(encodeEvent("incoming", session=session, identity=identity, peer=peer))  # type: ignore[union-attr]

    def goaway(self, reason: str) -> None:
        """
        Tell the exposer TP is going away, so that it registers again at
        once (elsewhere, where there is an elsewhere); its accepted tunnels
        are not affected.
        """
        self.conn.transport.write(encodeEvent("goaway", reason=reason))  # type: ignore[union-attr]

    # IControlEnd

    def writeControl(self, data: bytes) -> None:
        self.conn.transport.write(data)  # type: ignore[union-attr]

    def controlEvent(self, event: str, fields: dict[str, Any]) -> None:
        pass  # an exposer sends nothing but pings and pongs

    def controlSilent(self, seconds: float) -> None:
        self.closeControl(f"nothing heard from the exposer for {seconds:g} s")

    def controlMalformed(self, error: WireError) -> None:
        self.closeControl(f"bad event from the exposer: {error.message}")

    def _lost(self, reason: Failure) -> None:
        self.loop.stop()
        if self.exposure is not None:
            self.factory.registry.leave(self.exposure, self)
            log.info("{identity} no longer exposes {exposure}", identity=self.exposure.owner, exposure=self.exposure.describe())


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


# --- accept -----------------------------------------------------------------


class AcceptState(str, enum.Enum):
    NEW = "new"
    CLAIMING = "claiming"
    FORWARDING = "forwarding"
    SPLICED = "spliced"
    REFUSED = "refused"
    CLOSED = "closed"


class AcceptSession(Session):
    """
    C{accept}: claim the pending session (once, by its exposer), answer,
    and splice to the dialer waiting in it.

    In a cluster, a session id made by another instance (over TLS each
    accept is a new connection, which the network may send to any
    instance) is forwarded: a peer link carries the accept to the instance
    the id names, which claims it for this exposer with the same checks;
    once it answers, this connection is spliced to the link.
    """

    S = AcceptState
    TRANSITIONS = {
        (S.NEW, "start"): (S.CLAIMING, "_claim"),
        (S.CLAIMING, "claimed"): (S.SPLICED, "_join"),
        (S.CLAIMING, "forward"): (S.FORWARDING, "_forward"),
        # The transport is paused: at most what one read brought.
        (S.FORWARDING, "data"): (S.FORWARDING, "_hold"),
        (S.FORWARDING, "eof"): (S.FORWARDING, None),  # the splice carries it on
        (S.FORWARDING, "linked"): (S.SPLICED, "_linked"),
        (S.FORWARDING, "linkFailed"): (S.REFUSED, "_linkFailed"),
        # A link that ends after the exposer left or was refused.
        **_rows((S.REFUSED, S.CLOSED), "linked", None, "_dropLink"),
        **_rows((S.REFUSED, S.CLOSED), "linkFailed", None, None),
        **_rows((S.CLAIMING, S.FORWARDING, S.SPLICED, S.REFUSED), "refused", S.REFUSED, None),
        **_rows((S.CLAIMING, S.FORWARDING, S.SPLICED, S.REFUSED), "lost", S.CLOSED, None),
    }

    def __init__(self, conn: TPServerProtocol, hello: ClientHello) -> None:
        super().__init__(conn)
        self.hello = hello
        self.state = AcceptState.NEW
        self.pending = b""

    def _claim(self, rest: bytes) -> None:
        identity = self.conn.identity
        assert identity is not None and self.hello.session is not None
        registry = self.factory.registry
        if registry.forwardAccept is not None and not registry.madeHere(self.hello.session):
            self._input("forward", rest)
            return
        try:
            pending = registry.claim(self.hello.session, identity.name)
        except ReverseError as e:
            self.conn.refuse(e.code, e.message)
            return
        self._input("claimed", pending, rest)

    def _join(self, pending: PendingSession, rest: bytes) -> None:
        conn = self.conn
        conn.result = "ok"
        self.exposure = pending.exposure
        conn.address = pending.exposure.describe()
        conn.detail = f"dialer {pending.dialerIdentity or pending.peer}"
        conn.answer(ServerHello.success())
        pending.dialer.sessionJoined(conn)
        if rest and conn.peer is not None:  # a P2P introduction splices nothing
            conn.bytesIn += len(rest)
            conn.peer.transport.write(rest)  # type: ignore[union-attr]
        conn.transport.resumeProducing()  # type: ignore[union-attr]

    # Forwarded to the instance that made the session.

    def _forward(self, rest: bytes) -> None:
        identity = self.conn.identity
        assert identity is not None and self.hello.session is not None
        self.pending = rest
        self.conn.address = "a session of another instance"
        self.factory.registry.forwardAccept(self.hello.session, identity.name, self)

    def _hold(self, data: bytes) -> None:
        self.pending += data

    def linkJoined(self, link: RelayEnd, rest: bytes) -> None:
        self._input("linked", link, rest)

    def linkFailed(self, code: ErrorCode, message: str) -> None:
        self._input("linkFailed", code, message)

    def _linked(self, link: RelayEnd, rest: bytes) -> None:
        conn = self.conn
        conn.result = "ok"
        conn.detail = f"forwarded to instance {getattr(link, 'instance', '?')}"
        conn.answer(ServerHello.success())
        pending, self.pending = self.pending, b""
        splice(conn, link, fromA=pending, fromB=rest)
        conn.transport.resumeProducing()  # type: ignore[union-attr]

    def _linkFailed(self, code: ErrorCode, message: str) -> None:
        self.conn.refuse(code, message)

    def _dropLink(self, link: RelayEnd, rest: bytes) -> None:
        link.transport.loseConnection()  # type: ignore[union-attr]


# --- E2E through a TP tunnel --------------------------------------------------


class E2EState(str, enum.Enum):
    NEW = "new"
    CHECKING = "checking"
    INTRODUCING = "introducing"  # P2P: waiting for the exposer's ICE answer
    TUNNEL = "e2e"
    REFUSED = "refused"
    CLOSED = "closed"


class E2ESession(Session):
    """
    C{connect} to an exposure's E2E name: TP answers, then serves the
    name's TLS inside the tunnel (L{E2EDialer} is its inside, which waits
    for the exposer's accept).
    """

    S = E2EState
    TRANSITIONS = {
        (S.NEW, "start"): (S.CHECKING, "_check"),
        (S.CHECKING, "opened"): (S.TUNNEL, "_openTunnel"),
        (S.CHECKING, "introduce"): (S.INTRODUCING, "_introduce"),
        (S.TUNNEL, "data"): (S.TUNNEL, "_toInner"),
        (S.TUNNEL, "eof"): (S.TUNNEL, "_innerEOF"),
        # A dialer sends nothing before its answer: what it sends is dropped.
        (S.INTRODUCING, "data"): (S.INTRODUCING, None),
        (S.INTRODUCING, "eof"): (S.INTRODUCING, "_leftIntroduction"),
        (S.INTRODUCING, "introduced"): (S.INTRODUCING, "_introduced"),
        **_rows((S.CHECKING, S.INTRODUCING, S.TUNNEL, S.REFUSED), "refused", S.REFUSED, None),
        **_rows((S.CHECKING, S.INTRODUCING, S.TUNNEL, S.REFUSED, S.CLOSED), "lost", S.CLOSED, "_lost"),
    }

    #: The P2P introduction's session id, while the exposer is asked.
    sid: str | None = None

    inner: Any = None
    #: The spliced inside, once its handshake completed (its bytes are
    #: the connection's in the audit event).
    innerEnd: E2EDialer | None = None
    innerClosed = False

    def __init__(self, conn: TPServerProtocol, hello: ClientHello) -> None:
        super().__init__(conn)
        self.hello = hello
        self.state = E2EState.NEW

    def _check(self, rest: bytes) -> None:
        identity = self.conn.identity
        assert identity is not None
        name = self.hello.host.lower().rstrip(".")
        decision = self.factory.config.policy.checkName(identity.name, name, self.hello.port, self.hello.transport)
        if not decision.allowed:
            self.conn.refuse(ErrorCode.FORBIDDEN, decision.reason)
            return
        exposure = self.factory.registry.nameExposure(name)
        if self.hello.p2pFailed is not None and self.factory.registry.spent.get(self.hello.p2pFailed) == "used":
            # Only a session that was introduced counts (an id made up by
            # the dialer does not).
            self.factory.p2p["fell_back"] += 1
            log.info(
                "{identity} dials {name} through TP: P2P session {session} found no direct path",
                identity=identity.name, name=name, session=self.hello.p2pFailed[:12],
            )
        if self.hello.p2p is not None and self._mayIntroduce(exposure):
            # A relayed dial meets the exposure's dialers in the inner TLS
            # handshake; an introduction has none, so they are checked here.
            allowed = self.factory.registry.mayDial(exposure, identity.name)
            if not allowed.allowed:
                self.conn.refuse(ErrorCode.FORBIDDEN, allowed.reason)
                return
            self._input("introduce", name, exposure)
            return
        if name not in self.factory.serverTLS.innerNames:
            # Exposed, but its certificate is still being obtained.
            self.conn.refuse(ErrorCode.NOT_ACCEPTED, f"{name} is not ready yet (TP is getting its certificate); try again shortly")
            return
        self._input("opened", name, exposure, rest)

    # --- P2P (docs/p2p.md) ----------------------------------------------------

    def _mayIntroduce(self, exposure: Exposure) -> bool:
        """
        Whether this dial may go direct: the exposure rule allows it and a
        member of the exposure offered it (the policy and the exposure's
        dialers were checked already, as for every dial).
        """
        rule = exposure.grantedBy
        if self.factory.registry.forwardAccept is not None:
            # In a cluster the exposer's accept may reach another instance,
            # whose peer link carries no answer: no introductions there yet
            # (docs/p2p.md); the dial stays a relayed one.
            return False
        return rule is not None and rule.p2p and bool(exposure.introducers())

    def _introduce(self, name: str, exposure: Exposure) -> None:
        """
        Tell the exposer a dialer wants a direct path: its ICE offer and its
        certificate, as TP verified it.  The exposer answers with an
        C{accept} of the session carrying its own offer (L{introduced}).
        """
        from cryptography.hazmat.primitives.serialization import Encoding

        conn = self.conn
        identity = conn.identity
        assert identity is not None and conn.certificate is not None
        conn.result = "p2p_not_answered"
        conn.address = f"P2P {name}"
        conn.setTimeout(None)  # the registry's accept timeout bounds the wait
        offer = {**self.hello.p2p, "certificate": conn.certificate.public_bytes(Encoding.PEM).decode("ascii")}
        self.sid = self.factory.registry.incoming(exposure, _Introducer(self), identity.name, conn.peerAddress, p2p=offer)
        # Read on (what comes is dropped): a dialer that leaves is noticed,
        # and its session released, at once.
        conn.transport.resumeProducing()  # type: ignore[union-attr]

    def introduced(self, acceptConn: TPServerProtocol) -> None:
        """
        The exposer accepted the session (its C{accept} was answered): pass
        its answer and certificate to the dialer, and end both connections.
        """
        self._input("introduced", acceptConn)

    def _introduced(self, acceptConn: TPServerProtocol) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding

        conn = self.conn
        hello = getattr(acceptConn, "hello", None)
        answer = hello.p2p if hello is not None else None
        exposer = getattr(acceptConn, "identity", None)
        self.sid = None
        acceptConn.transport.loseConnection()  # type: ignore[union-attr]
        if answer is None or exposer is None or getattr(acceptConn, "certificate", None) is None:
            acceptConn.detail = f"declined a direct path for {conn.identity.name if conn.identity else '?'}"
            self.factory.p2p["declined"] += 1
            conn.refuse(ErrorCode.NOT_ACCEPTED, "the exposer declined a direct path: dial without P2P")
            return
        acceptConn.detail = f"P2P introduction of {conn.identity.name if conn.identity else '?'}"
        self.factory.p2p["introduced"] += 1
        conn.result = "p2p"
        conn.detail = f"introduced to {exposer.name}; bytes go direct, TP does not see them"
        peer = {"identity": exposer.name, "certificate": acceptConn.certificate.public_bytes(Encoding.PEM).decode("ascii")}
        conn.answer(ServerHello.success(address=conn.address, p2p={"session": acceptConn.hello.session, **peer, **answer}))
        conn.transport.loseConnection()  # type: ignore[union-attr]
        conn.linger()

    def _leftIntroduction(self) -> None:
        self.conn.transport.loseConnection()  # type: ignore[union-attr]

    def introductionFailed(self, code: ErrorCode, message: str) -> None:
        self.sid = None
        self.factory.p2p["not_accepted"] += 1
        self.conn.refuse(code, message)

    def _openTunnel(self, name: str, exposure: Exposure, rest: bytes) -> None:
        conn = self.conn
        conn.result = "e2e_handshake"
        conn.address = f"E2E {name}"
        conn.answer(ServerHello.success(e2e=name))
        innerFactory = TLSFactory(
            NameTLS(self.factory.serverTLS, name),
            False,
            Factory.forProtocol(lambda: E2EDialer(self, exposure, framed=True)),
            clock=self.factory.reactor,
        )
        self.inner = innerFactory.buildProtocol(conn.transport.getPeer())  # type: ignore[union-attr]
        self.inner.makeConnection(conn.transport)
        # The inner handshake gets the same bound as the outer one.
        conn.setTimeout(self.factory.config.handshakeTimeout)
        conn.transport.resumeProducing()  # type: ignore[union-attr]
        if rest:
            self.inner.dataReceived(rest)

    def _toInner(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def _innerEOF(self) -> None:
        self.inner.connectionLost(Failure(error.ConnectionDone("the tunnel was closed")))
        self.conn.transport.loseConnection()  # type: ignore[union-attr]

    def _lost(self, reason: Failure) -> None:
        if self.sid is not None:
            self.factory.registry.dialerGone(self.sid)
            self.sid = None
        if self.inner is not None and not self.innerClosed:
            self.inner.connectionLost(reason)

    def counts(self) -> tuple[int, int]:
        end = self.innerEnd
        if end is None:
            return super().counts()
        return end.bytesIn, end.peer.bytesIn if end.peer is not None else 0


class _Introducer:
    """
    The registry's dialer of a P2P introduction (L{E2ESession._introduce}):
    the exposer's C{accept} is passed on, never spliced.
    """

    def __init__(self, session: E2ESession) -> None:
        self.session = session

    def sessionJoined(self, acceptEnd: Any) -> None:
        self.session.introduced(acceptEnd)

    def sessionFailed(self, code: ErrorCode, message: str) -> None:
        self.session.introductionFailed(code, message)


class DialerState(str, enum.Enum):
    HANDSHAKE = "handshake"
    WAITING = "waiting"
    SPLICED = "spliced"
    FAILED = "failed"
    CLOSED = "closed"


@implementer(IHandshakeListener)
class E2EDialer(MachineEnd):
    """
    The inside of an E2E connection made through a TP tunnel: a TLS server
    for the exposure's name runs inside the tunnel; once the dialer's
    certificate passed (and policy lets it dial the name), the exposer is
    asked to accept.  With C{framed}, a ServerHello inside the inner TLS
    tells the tp client how that went.
    """

    S = DialerState
    TRANSITIONS = {
        (S.HANDSHAKE, "handshake"): (S.WAITING, "_handshook"),
        **_rows((S.HANDSHAKE, S.WAITING), "data", None, "_hold"),
        (S.FAILED, "data"): (S.FAILED, None),
        (S.WAITING, "joined"): (S.SPLICED, "_join"),
        (S.WAITING, "failed"): (S.FAILED, "_fail"),
        **_rows((S.HANDSHAKE, S.WAITING, S.SPLICED, S.FAILED), "lost", S.CLOSED, "_lost"),
    }

    sid: str | None = None

    def __init__(self, session: E2ESession, exposure: Exposure, framed: bool) -> None:
        self.session = session
        self.outer = session.conn
        self.exposure = exposure
        self.framed = framed
        self.pending = b""
        self.state = DialerState.HANDSHAKE

    def _handshook(self) -> None:
        outer = self.outer
        outer.setTimeout(None)  # the registry bounds the wait for an accept
        self.session.innerEnd = self
        cert = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        if cert is None:
            # Cannot happen with the inner context (it requires one); a
            # check of its own all the same, since an identity is needed.
            self.sessionFailed(ErrorCode.FORBIDDEN, "a client certificate is required")
            return
        identity = identityOf(certificateOf(cert)).name
        outer.detail = f"inner identity {identity}"
        outer.result = "aborted"
        self.transport.pauseProducing()  # type: ignore[union-attr]
        registry = outer.factory.registry
        decision = registry.mayDial(self.exposure, identity)
        if not decision.allowed:
            self.sessionFailed(ErrorCode.FORBIDDEN, f"not allowed to dial {self.exposure.name}: {decision.reason}")
            return
        if registry.nameExposure(self.exposure.name) is not self.exposure:
            self.sessionFailed(ErrorCode.NOT_ACCEPTED, f"{self.exposure.name} is no longer exposed")
            return
        self.sid = registry.incoming(self.exposure, self, identity, outer.peerAddress)

    def _hold(self, data: bytes) -> None:
        self.pending += data

    def _join(self, acceptEnd: RelayEnd) -> None:
        self.sid = None
        self.outer.result = "ok"
        if self.framed:
            self.transport.write(ServerHello.success().toFrame())  # type: ignore[union-attr]
        pending, self.pending = self.pending, b""
        splice(self, acceptEnd, fromA=pending)
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def _fail(self, code: ErrorCode, message: str) -> None:
        self.sid = None
        self.outer.result = code.value
        self.outer.detail += f"; {message}"
        if self.framed:
            self.transport.write(ServerHello.failure(code, message).toFrame())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]
        self.transport.resumeProducing()  # type: ignore[union-attr]
        self.outer.linger()

    def _lost(self, reason: Failure) -> None:
        self.session.innerClosed = True
        if self.sid is not None:
            self.outer.factory.registry.dialerGone(self.sid)
        refusal = getattr(self.transport, "tpRefusal", None)
        if refusal:
            self.outer.result = "e2e_refused"
            self.outer.detail = refusal
        RelayEnd.connectionLost(self, reason)
        self.outer.transport.loseConnection()  # type: ignore[union-attr]


# --- E2E direct, by SNI -------------------------------------------------------


class SNIState(str, enum.Enum):
    NEW = "new"
    CHECKING = "checking"
    WAITING = "waiting"
    SPLICED = "spliced"
    REFUSED = "refused"
    CLOSED = "closed"


class SNISession(Session):
    """
    The handshake chose the context of an E2E name: the connection is a
    dialer of that exposure, with no TP protocol on it (refusals close it
    without a ServerHello).
    """

    S = SNIState
    TRANSITIONS = {
        (S.NEW, "start"): (S.CHECKING, "_check"),
        (S.CHECKING, "wait"): (S.WAITING, "_wait"),
        (S.WAITING, "data"): (S.WAITING, "_hold"),
        (S.WAITING, "eof"): (S.WAITING, None),  # the splice carries it on
        (S.WAITING, "joined"): (S.SPLICED, "_join"),
        (S.WAITING, "failed"): (S.REFUSED, "_fail"),
        (S.REFUSED, "failed"): (S.REFUSED, None),
        **_rows((S.CHECKING, S.WAITING, S.SPLICED, S.REFUSED), "refused", S.REFUSED, None),
        **_rows((S.CHECKING, S.WAITING, S.SPLICED, S.REFUSED), "lost", S.CLOSED, "_lost"),
    }

    sid: str | None = None

    def __init__(self, conn: TPServerProtocol, name: str) -> None:
        super().__init__(conn)
        self.name = name
        self.state = SNIState.NEW
        self.pending = b""

    def sessionJoined(self, acceptEnd: RelayEnd) -> None:
        self._input("joined", acceptEnd)

    def sessionFailed(self, code: ErrorCode, message: str) -> None:
        self._input("failed", code, message)

    def _check(self, rest: bytes) -> None:
        exposure = self.factory.registry.nameExposure(self.name)
        if exposure is None:
            self.conn.refuse(ErrorCode.NOT_ACCEPTED, f"{self.name} is no longer exposed", answer=False)
            return
        identity = self.conn.identity
        assert identity is not None
        # The handshake already ran the name's dialers check; checking again
        # here keeps a context mix-up from ever letting a dialer through.
        decision = self.factory.registry.mayDial(exposure, identity.name)
        if not decision.allowed:
            self.conn.refuse(ErrorCode.FORBIDDEN, decision.reason, answer=False)
            return
        self._input("wait", exposure)

    def _wait(self, exposure: Exposure) -> None:
        conn = self.conn
        identity = conn.identity
        assert identity is not None
        conn.setTimeout(None)  # the registry bounds the wait for an accept
        conn.result = "aborted"
        conn.address = f"E2E {self.name}"
        conn.transport.pauseProducing()  # type: ignore[union-attr]
        self.sid = self.factory.registry.incoming(exposure, self, identity.name, conn.peerAddress)

    def _hold(self, data: bytes) -> None:
        self.pending += data

    def _join(self, acceptEnd: RelayEnd) -> None:
        self.sid = None
        conn = self.conn
        conn.result = "ok"
        pending, self.pending = self.pending, b""
        splice(conn, acceptEnd, fromA=pending)
        conn.transport.resumeProducing()  # type: ignore[union-attr]

    def _fail(self, code: ErrorCode, message: str) -> None:
        self.sid = None
        self.conn.refuse(code, message, answer=False)

    def _lost(self, reason: Failure) -> None:
        if self.sid is not None:
            self.factory.registry.dialerGone(self.sid)


# --- a peer's dial, from another instance of the cluster ----------------------


class PeerState(str, enum.Enum):
    HANDSHAKE = "handshake"
    HELLO = "hello"
    WAITING = "waiting"
    SPLICED = "spliced"
    FAILED = "failed"
    CLOSED = "closed"


@implementer(IHandshakeListener)
class PeerSession(MachineEnd):
    """
    The holding instance's end of a peer link (docs/cluster.md): another
    instance of the cluster (C) forwards a dialer of an E2E name or public
    port this instance holds.  After the mutual TLS handshake, C is checked
    against the live instances (C{link.authorize}); C sends one frame,
    C{{"op": "peer-dial", "name": NAME, "identity": DIALER}} or
    C{{"op": "peer-dial", "port": PORT}}; this instance checks again that
    it holds the route and that the dialer may dial it, asks its exposer
    for a session, answers a ServerHello frame and splices C to the
    exposer's accept.

    Or C forwards an exposer's accept (which the network sent to C) of a
    session this instance made: C{{"op": "peer-accept", "session": SID,
    "identity": EXPOSER}}.  This instance claims the session for that
    identity as for a local accept (once, by the exposure's owner),
    answers, and splices the waiting dialer to the link.

    @param link: what checks peers (L{tpproxy.cluster.peer.PeerLinks}):
        C{authorize(transport) -> str | None} (a refusal) and C{registry}.
    """

    S = PeerState
    TRANSITIONS = {
        (S.HANDSHAKE, "handshake"): (S.HELLO, "_authorize"),
        (S.HELLO, "data"): (S.HELLO, "_hello"),
        **_rows((S.HANDSHAKE, S.HELLO), "timeout", S.FAILED, "_timedOut"),
        (S.HELLO, "dial"): (S.WAITING, "_dial"),
        (S.HELLO, "accepted"): (S.SPLICED, "_accepted"),
        (S.WAITING, "data"): (S.WAITING, "_hold"),
        (S.WAITING, "joined"): (S.SPLICED, "_join"),
        **_rows((S.HELLO, S.WAITING), "failed", S.FAILED, "_fail"),
        **_rows((S.WAITING, S.SPLICED, S.FAILED, S.CLOSED), "timeout", None, None),
        **_rows((S.FAILED, S.CLOSED), "failed", None, None),
        (S.FAILED, "data"): (S.FAILED, None),
        **_rows((S.HANDSHAKE, S.HELLO, S.WAITING, S.SPLICED, S.FAILED), "lost", S.CLOSED, "_lost"),
    }

    sid: str | None = None
    peerInstance = "?"

    def __init__(self, link: Any, timeout: float) -> None:
        from tpproxy.wire import FrameDecoder

        self.link = link
        self.registry = link.registry
        self.decoder = FrameDecoder()
        self.pending = b""
        self.state = PeerState.HANDSHAKE
        self.timer = link.reactor.callLater(timeout, self._input, "timeout")
        self.what = "?"

    def connectionMade(self) -> None:
        # As every relay end: else the answer on the link waits for the
        # other end's delayed ACK (~40 ms a connection, measured).
        noDelay(self.transport)

    def _authorize(self) -> None:
        refusal, self.peerInstance = self.link.authorize(self.transport)
        if refusal is not None:
            log.warn("Refused a peer link from {peer}: {refusal}", peer=describePeer(self.transport), refusal=refusal)
            self.sessionFailed(ErrorCode.FORBIDDEN, refusal)

    def _hello(self, data: bytes) -> None:
        try:
            obj = self.decoder.feedFrame(data)
        except WireError as e:
            self.sessionFailed(e.code, e.message)
            return
        if obj is None:
            return
        self.pending = self.decoder.takeRest()
        op = obj.get("op")
        if op == "peer-accept":
            self._peerAccept(obj)
        elif op == "peer-dial":
            self._peerDial(obj)
        else:
            self.sessionFailed(ErrorCode.BAD_REQUEST, "a peer link opens with op peer-dial or peer-accept")

    def _peerDial(self, obj: dict[str, Any]) -> None:
        name, port, identity = obj.get("name"), obj.get("port"), obj.get("identity")
        if (name is None) == (port is None):
            self.sessionFailed(ErrorCode.BAD_REQUEST, "peer-dial needs a name or a port")
            return
        if name is not None:
            if not isinstance(name, str) or not isinstance(identity, str) or not identity:
                self.sessionFailed(ErrorCode.BAD_REQUEST, "peer-dial of a name needs string fields name and identity")
                return
            exposure = self.registry.byName.get(normalize(name))
            if exposure is None:
                self.sessionFailed(ErrorCode.NOT_EXPOSED, f"E2E name {normalize(name)} is not held on this instance")
                return
            decision = self.registry.mayDial(exposure, identity)
            if not decision.allowed:
                self.sessionFailed(ErrorCode.FORBIDDEN, f"not allowed to dial {exposure.name}: {decision.reason}")
                return
        else:
            if isinstance(port, bool) or not isinstance(port, int) or identity is not None:
                self.sessionFailed(ErrorCode.BAD_REQUEST, "peer-dial of a port needs an integer port and no identity")
                return
            exposure = self.registry.byPort.get(port)
            if exposure is None:
                self.sessionFailed(ErrorCode.NOT_EXPOSED, f"public port {port} is not held on this instance")
                return
        peer = obj.get("peer")
        self._input("dial", exposure, identity, peer if isinstance(peer, str) else "?")

    def _peerAccept(self, obj: dict[str, Any]) -> None:
        session, identity = obj.get("session"), obj.get("identity")
        if not isinstance(session, str) or not isinstance(identity, str) or not identity:
            self.sessionFailed(ErrorCode.BAD_REQUEST, "peer-accept needs string fields session and identity")
            return
        try:
            pending = self.registry.claim(session, identity)
        except ReverseError as e:
            self.sessionFailed(e.code, e.message)
            return
        self._input("accepted", pending)

    def _accepted(self, pending: PendingSession) -> None:
        self.timer.cancel()
        self.what = f"accept of {pending.exposure.describe()} via {self.peerInstance}"
        self.transport.write(ServerHello.success().toFrame())  # type: ignore[union-attr]
        rest, self.pending = self.pending, b""
        pending.dialer.sessionJoined(self)
        if rest and self.peer is not None:
            self.bytesIn += len(rest)
            self.peer.transport.write(rest)  # type: ignore[union-attr]

    def _dial(self, exposure: Exposure, identity: str | None, peer: str) -> None:
        self.timer.cancel()  # the registry bounds the wait for an accept
        self.what = exposure.describe()
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.sid = self.registry.incoming(exposure, self, identity, f"{peer} via {self.peerInstance}")

    def _hold(self, data: bytes) -> None:
        self.pending += data

    def _join(self, acceptEnd: RelayEnd) -> None:
        self.sid = None
        self.transport.write(ServerHello.success().toFrame())  # type: ignore[union-attr]
        pending, self.pending = self.pending, b""
        splice(self, acceptEnd, fromA=pending)
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def _fail(self, code: ErrorCode, message: str) -> None:
        self.sid = None
        if self.timer.active():
            self.timer.cancel()
        self.transport.write(ServerHello.failure(code, message).toFrame())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def _timedOut(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _lost(self, reason: Failure) -> None:
        if self.timer.active():
            self.timer.cancel()
        if self.sid is not None:
            self.registry.dialerGone(self.sid)
        RelayEnd.connectionLost(self, reason)


def describePeer(transport: Any) -> str:
    peer = transport.getPeer()
    return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
