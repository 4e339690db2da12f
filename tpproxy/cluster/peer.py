# -*- test-case-name: tpproxy.test.test_cluster -*-
"""
Peer links: how an instance of the cluster forwards a dialer to the
instance that holds the route (docs/cluster.md).

A dialer of an E2E name, or a connection to a public port, arrives at
instance C; the exposure is held at instance A (the routing store says
so).  C keeps a I{remote exposure} for each route held elsewhere
(L{PeerLinks.sync}, from the store's watch): it serves the name's TLS
and checks the dialer with its own policy as for a local exposure, and it
listens on every public port held anywhere.  When a dialer arrives, the
remote exposure's control (L{RemoteControl}) opens a peer link to A
(L{PeerDial}): mutual TLS, then one C{peer-dial} frame; A's
L{tpproxy.protocols.sessions.PeerSession} checks again, asks its exposer
for a session and answers; the link then is the accept end of C's
session, and the bytes splice dialer <-> C <-> A <-> exposer.

Over TLS an exposer opens a new connection for each C{accept}, and the
network may send it to instance B rather than A, where its signalling
connection is.  Session ids start with the tag of the instance that made
them (L{tpproxy.reverse.registry.instanceTag}): B sees that the id is A's,
opens a peer link to A (L{PeerAccept}) and sends one C{peer-accept} frame;
A claims the session for the exposer's identity as for a local accept,
and B splices the exposer's connection to the link.

Who is a peer: the other end presents a certificate whose public key is
that of this instance's own server certificate (instances of one service
share TP's certificate and key: it is what an anycast address needs), and
connects from the host of a live instance's C{advertise} address, as the
store's watch last saw it.
"""

from __future__ import annotations

import enum
import os
import random
from collections import Counter
from typing import Any, Callable

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from OpenSSL import SSL, crypto
from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import ClientFactory, Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy.cluster.store import NAME, PORT, Event, Holder, HolderAdded, HolderRemoved, IRoutingStore, IRoutingWatch, Route
from tpproxy.config import ConfigError, hostPort
from tpproxy.protocols.relay import RelayEnd, noDelay
from tpproxy.reactors import IServerReactor
from tpproxy.protocols.sessions import MachineEnd, PeerSession
from tpproxy.reverse.registry import TAG_LENGTH, AcceptEnd, Exposure, PublicDialerFactory, Registry, ReverseError, instanceTag, shortSession
from tpproxy.transports.tls import TLSFactory
from tpproxy.wire import ErrorCode, FrameDecoder, ServerHello, WireError, encodeFrame

log = Logger(namespace="tpproxy.cluster")

#: Seconds dials avoid an instance a peer link could not reach, while
#: other holders remain (its lease may take up to its TTL to end).
SUSPECT_FOR = 10.0
#: The ALPN of a peer link: nothing else speaks it.
PEER_ALPN = b"tp-peer/1"


def _publicKey(cert: Any) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
class PeerTLS:
    """
    The TLS of peer links, both ends: TLS 1.3, TP's own certificate and
    key (read at each connection, so a renewal or reload takes effect),
    a certificate required from the other end, which L{pinned} checks
    after the handshake (OpenSSL's chain check is not used: TP's server
    certificate need not be a client certificate, nor come from the
    client CA).
    """

    def __init__(self, serverTLS: Any) -> None:
        self.serverTLS = serverTLS
        self._cached: tuple[Any, SSL.Context] | None = None

    def _context(self) -> SSL.Context:
        chain, key = self.serverTLS.chain, self.serverTLS.key
        if self._cached is not None and self._cached[0] is chain:
            return self._cached[1]
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.use_certificate(crypto.X509.from_cryptography(chain[0]))
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
        ctx.check_privatekey()
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda conn, cert, errno, depth, ok: True)
        ctx.set_alpn_protos([PEER_ALPN])
        ctx.set_alpn_select_callback(lambda conn, offered: PEER_ALPN if PEER_ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS)
        self._cached = (chain, ctx)
        return ctx

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._context(), None)
        conn.set_accept_state()
        return conn

    def clientConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._context(), None)
        conn.set_connect_state()
        return conn

    def pinned(self, transport: Any) -> bool:
        """
        Did the other end present a certificate with TP's own public key?
        """
        cert = transport.getPeerCertificate()
        if cert is None:
            return False
        return _publicKey(cert.to_cryptography()) == _publicKey(self.serverTLS.chain[0])


class RemoteControl:
    """
    The control of a remote exposure: a dialer waits in session C{sid} of
    this instance's registry; open a peer link to a holder for it.
    """

    def __init__(self, links: PeerLinks, exposure: Exposure | None = None) -> None:
        self.links = links
        self.exposure = exposure

    def sendIncoming(self, session: str, identity: str | None, peer: str) -> None:
        assert self.exposure is not None
        self.links.dial(self.exposure, session, identity, peer)

    def closeControl(self, reason: str) -> None:
        pass  # no signalling connection here: the holder has it

    def goaway(self, reason: str) -> None:
        pass


class DialState(str, enum.Enum):
    CONNECTING = "connecting"
    ANSWER = "answer"
    SPLICED = "spliced"
    FAILED = "failed"
    CLOSED = "closed"


@implementer(IHandshakeListener)
class PeerLink(MachineEnd):
    """
    This instance's end of a peer link it opened: sends one frame
    (C{hello}), reads the other instance's ServerHello, then is spliced to
    what waits here.  L{PeerDial} and L{PeerAccept} say what waits, and
    what an answer or a failure does to it.
    """

    S = DialState
    #: The other instance answered (a ServerHello, either way).
    answered = False
    TRANSITIONS = {
        (S.CONNECTING, "handshake"): (S.ANSWER, "_send"),
        (S.ANSWER, "data"): (S.ANSWER, "_answer"),
        (S.ANSWER, "joined"): (S.SPLICED, "_joined"),
        (S.ANSWER, "failed"): (S.FAILED, "_fail"),
        (S.CONNECTING, "failed"): (S.FAILED, "_fail"),
        (S.FAILED, "failed"): (S.FAILED, None),
        (S.FAILED, "data"): (S.FAILED, None),
        (S.CLOSED, "failed"): (S.CLOSED, None),
        **{(s, "lost"): (DialState.CLOSED, "_lost") for s in (S.CONNECTING, S.ANSWER, S.SPLICED, S.FAILED)},
    }

    def __init__(self, links: PeerLinks, hello: dict[str, Any], instance: str) -> None:
        self.links = links
        self.hello = hello
        self.instance = instance
        self.decoder = FrameDecoder()
        self.state = DialState.CONNECTING

    _deadline: Any = None

    def connectionMade(self) -> None:
        noDelay(self.transport)
        # The other instance answers once its exposer accepted (up to the
        # accept timeout): one that never answers is given up on, so that
        # the link does not stay open after its dialer is gone.
        wait = self.links.registry.acceptTimeout + self.links.connectTimeout
        self._deadline = self.links.reactor.callLater(wait, self._noAnswer, wait)

    def _noAnswer(self, wait: float) -> None:
        self._deadline = None
        if self.state in (DialState.CONNECTING, DialState.ANSWER):
            self._input("failed", ErrorCode.UNREACHABLE, f"instance {self.instance} did not answer within {wait:g} s")

    def _stopDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Failure) -> None:
        self._stopDeadline()
        super().connectionLost(reason)

    def _send(self) -> None:
        if not self.links.tls.pinned(self.transport):
            self._input("failed", ErrorCode.UNREACHABLE, f"instance {self.instance} did not present TP's certificate")
            return
        self.transport.write(encodeFrame(self.hello))  # type: ignore[union-attr]

    def _answer(self, data: bytes) -> None:
        try:
            obj = self.decoder.feedFrame(data)
            if obj is None:
                return
            answer = ServerHello.fromObject(obj)
        except WireError as e:
            self._input("failed", ErrorCode.INTERNAL, f"instance {self.instance} answered badly: {e.message}")
            return
        self.answered = True
        self._stopDeadline()
        if not answer.ok:
            try:
                code = ErrorCode(answer.code)
            except ValueError:
                code = ErrorCode.NOT_ACCEPTED
            self._input("failed", code, f"{answer.message} (at instance {self.instance})")
            return
        self._input("joined", self.decoder.takeRest())

    def _joined(self, rest: bytes) -> None:
        raise NotImplementedError

    def _fail(self, code: ErrorCode, message: str) -> None:
        raise NotImplementedError

    def _lost(self, reason: Failure) -> None:
        RelayEnd.connectionLost(self, reason)


class PeerDial(PeerLink):
    """
    A peer link for a dialer waiting in session C{sid} here: once the
    holder answers, the link is the accept end of that session.
    """

    def __init__(self, links: PeerLinks, sid: str, exposure: Exposure, hello: dict[str, Any], instance: str, tried: frozenset[str] = frozenset()) -> None:
        super().__init__(links, hello, instance)
        self.sid = sid
        self.exposure = exposure
        #: The holders tried for this dialer before this one.
        self.tried = tried | {instance}
        self.settled = False

    def _joined(self, rest: bytes) -> None:
        self.settled = True
        self.links.reached(self.instance)
        self.links.outcomes["dial", "ok"] += 1
        registry = self.links.registry
        try:
            pending = registry.claim(self.sid, self.exposure.owner)
        except ReverseError:
            # The dialer left, or its wait ended, meanwhile.
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        pending.dialer.sessionJoined(self)
        if rest and self.peer is not None:
            self.bytesIn += len(rest)
            self.peer.transport.write(rest)  # type: ignore[union-attr]

    def _fail(self, code: ErrorCode, message: str) -> None:
        self.settled = True
        self.links.dialFailed(self, code, message)
        if self.transport is not None:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _lost(self, reason: Failure) -> None:
        if self.peer is None and not self.settled:
            # Closed before the holder answered (it died, or is stopping).
            self.settled = True
            self.links.dialFailed(self, ErrorCode.UNREACHABLE, f"the peer link to instance {self.instance} closed before it answered")
        RelayEnd.connectionLost(self, reason)


class PeerAccept(PeerLink):
    """
    A peer link for an exposer's C{accept} that arrived here for a session
    instance C{instance} made (C{end}, waiting in
    L{tpproxy.protocols.sessions.AcceptSession}): once that instance
    claimed the session for the exposer, C{end} is spliced to the link.
    """

    def __init__(self, links: PeerLinks, end: AcceptEnd, hello: dict[str, Any], instance: str) -> None:
        super().__init__(links, hello, instance)
        self.end = end

    def _joined(self, rest: bytes) -> None:
        self.links.outcomes["accept", "ok"] += 1
        self.end.linkJoined(self, rest)

    def _fail(self, code: ErrorCode, message: str) -> None:
        self.links.outcomes["accept", code.value] += 1
        self.end.linkFailed(code, message)
        if self.transport is not None:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _lost(self, reason: Failure) -> None:
        if self.peer is None:  # told again after a failure: it ignores that
            self.end.linkFailed(ErrorCode.NOT_ACCEPTED, f"the peer link to instance {self.instance} closed")
        RelayEnd.connectionLost(self, reason)


class PeerLinkFactory(ClientFactory):
    noisy = False

    def __init__(self, link: PeerLink) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> PeerLink:
        return self.link

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.link._input("failed", ErrorCode.UNREACHABLE, f"cannot reach instance {self.link.instance}: {reason.getErrorMessage()}")


class PeerLinks:
    """
    This instance's side of the cluster's routing: the remote exposures
    (kept from the store's watch), the peer listener's sessions, and the
    links it opens.

    @param reactor: for connections, listeners (public ports held
        elsewhere) and timers.
    @param store: the started routing store.
    @param registry: this instance's registry.
    @param serverTLS: TP's own certificate and key (peer links use them)
        and the E2E names served.
    """

    def __init__(
        self, reactor: IServerReactor, store: IRoutingStore, registry: Registry, serverTLS: Any, connectTimeout: float = 10, helloTimeout: float = 10
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.registry = registry
        self.serverTLS = serverTLS
        self.connectTimeout = connectTimeout
        self.helloTimeout = helloTimeout
        self.tls = PeerTLS(serverTLS)
        self.watch: IRoutingWatch | None = None
        self._early: set[Route] = set()
        self.me = store.instance.id
        try:
            self.ownHost: str | None = hostPort(store.instance.advertise, "advertise")[0]
        except ConfigError:
            self.ownHost = None
        registry.onLocalGone = self.sync
        registry.forwardAccept = self.accept
        #: Instances a peer link could not reach, and until when dials
        #: avoid them (L{SUSPECT_FOR}): known dead before their lease ends.
        self.suspects: dict[str, float] = {}
        #: The holders last logged for each route routed elsewhere.
        self.routedTo: dict[Route, list[str]] = {}
        #: Peer links opened, by (kind, result): C{ok}, C{retried} (a
        #: dial sent to another holder) or the error code (metrics).
        self.outcomes: Counter[tuple[str, str]] = Counter()

    # --- the watch ------------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.watch = yield self.store.watch(self._event)
        early, self._early = self._early, set()
        for route in sorted(early | self.watch.routes(NAME) | self.watch.routes(PORT)):
            self.sync(route)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        watch, self.watch = self.watch, None
        if watch is not None:
            yield watch.stop()
        for name, remote in list(self.registry.remoteNames.items()):
            self._dropName(name, remote)
        for port, remote in list(self.registry.remotePorts.items()):
            del self.registry.remotePorts[port]
            self.registry.remove(remote)

    def _event(self, event: Event) -> None:
        if isinstance(event, (HolderAdded, HolderRemoved)) and event.holder.route.kind not in (NAME, PORT):
            return  # a QUIC routing slot (tpproxy.cluster.quicroute reads them from the watch)
        if self.watch is None:
            if isinstance(event, (HolderAdded, HolderRemoved)):
                self._early.add(event.holder.route)
            return
        if isinstance(event, (HolderAdded, HolderRemoved)):
            self.sync(event.holder.route)
        else:
            # An instance came or went: every route may change.
            routes = self.watch.routes(NAME) | self.watch.routes(PORT)
            routes |= {Route.name(n) for n in self.registry.remoteNames} | {Route.port(p) for p in self.registry.remotePorts}
            for route in sorted(routes):
                self.sync(route)

    def remoteHolders(self, route: Route) -> list[Holder]:
        """
        The holders of C{route} on other live instances, as last seen.
        """
        if self.watch is None:
            return []
        live = self.watch.instances()
        return sorted(h for h in self.watch.holders(route) if h.instance != self.me and h.instance in live)

    def sync(self, route: Route) -> None:
        """
        Make this instance's remote exposure of C{route} match the holders
        last seen.
        """
        holders = self.remoteHolders(route)
        if route.kind == NAME:
            self._syncName(route.key, holders)
        else:
            self._syncPort(int(route.key), holders)

    def _syncName(self, name: str, holders: list[Holder]) -> None:
        registry = self.registry
        remote = registry.remoteNames.get(name)
        if remote is not None and (not holders or remote.owner != holders[0].identity):
            self._dropName(name, remote)
            remote = None
        if not holders or self.serverTLS.servesOwnName(name):
            return
        if remote is None:
            owner = holders[0].identity
            decision = registry.policy.mayExposeName(owner, name)
            if not decision.allowed or decision.rule is None:
                log.warn(
                    "Not routing E2E name {name} held by {owner} at {instances}: this instance's exposure rules do not let {owner} expose it ({reason})",
                    name=name, owner=owner, instances=[h.instance for h in holders], reason=decision.reason,
                )
                return
            control = RemoteControl(self)
            remote = Exposure(owner=owner, mode="e2e", control=control, name=name, grantedBy=registry.policy.exposures[decision.rule])
            control.exposure = remote
            registry.remoteNames[name] = remote
        self._holdersSeen(Route.name(name), holders, "Routing E2E name {name} of {owner} to instance(s) {instances}", name=name, owner=remote.owner)
        if name not in registry.byName and name not in self.serverTLS.innerNames:
            self._serveName(name, remote)

    def _serveName(self, name: str, remote: Exposure) -> None:
        registry = self.registry

        def got(result: tuple[list[Any], Any]) -> None:
            chain, key = result
            if registry.remoteNames.get(name) is remote and name not in registry.byName:
                self.serverTLS.addName(name, chain, key, lambda identity: registry.mayDial(remote, identity))

        def failed(f: Failure) -> None:
            log.warn("No certificate for remote E2E name {name}: {error}", name=name, error=f.getErrorMessage())

        registry.certificates.certificateFor(name).addCallbacks(got, failed)

    def _holdersSeen(self, route: Route, holders: list[Holder], message: str, **fields: Any) -> None:
        """
        Log C{message} with the holders' instances when they changed since
        last logged for C{route}.
        """
        instances = [h.instance for h in holders]
        if self.routedTo.get(route) != instances:
            self.routedTo[route] = instances
            log.info(message, instances=instances, **fields)

    def _dropName(self, name: str, remote: Exposure) -> None:
        registry = self.registry
        self.routedTo.pop(Route.name(name), None)
        if registry.remoteNames.get(name) is remote:
            del registry.remoteNames[name]
        if name not in registry.byName:
            self.serverTLS.removeName(name)
        registry.remove(remote)
        log.info("No longer routing E2E name {name} to other instances", name=name)

    def _syncPort(self, port: int, holders: list[Holder]) -> None:
        registry = self.registry
        remote = registry.remotePorts.get(port)
        if not holders:
            self.routedTo.pop(Route.port(port), None)
            if remote is not None:
                del registry.remotePorts[port]
                registry.remove(remote)
                log.info("No longer forwarding public port {port} to other instances", port=port)
            return
        if remote is None:
            remote = Exposure(owner=holders[0].identity, mode="public", control=RemoteControl(self), port=port)
            remote.control.exposure = remote  # type: ignore[attr-defined]
            registry.remotePorts[port] = remote
        if port not in registry.byPort and remote.listening is None:
            try:
                remote.listening = self.reactor.listenTCP(port, PublicDialerFactory(registry, remote), interface=registry.publicInterface)
            except error.CannotListenError as e:
                log.warn("Cannot forward public port {port} held at {instances}: {error}", port=port, instances=[h.instance for h in holders], error=str(e.socketError))
                return
        if remote.listening is not None:
            self._holdersSeen(Route.port(port), holders, "Forwarding public port {port} to instance(s) {instances}", port=port)

    # --- links ------------------------------------------------------------------------

    def dial(self, exposure: Exposure, sid: str, identity: str | None, peer: str, tried: frozenset[str] = frozenset()) -> None:
        """
        A dialer waits in session C{sid} for the remote C{exposure}: open a
        peer link to one of its holders, at random among the live ones not
        C{tried} yet for it, avoiding those a link recently failed to reach
        (L{suspects}) while there are others.
        """
        route = self._route(exposure)
        holders = [h for h in self.remoteHolders(route) if h.instance not in tried]
        instances = self.watch.instances() if self.watch is not None else {}
        if not holders:
            if tried:
                self.registry.failSession(sid, ErrorCode.UNREACHABLE, f"no live instance holding {route} could be reached (tried {', '.join(sorted(tried))})")
            else:
                self.registry.failSession(sid, ErrorCode.NOT_ACCEPTED, f"no live instance holds {route} any more")
            return
        now = self.reactor.seconds()
        for instance, until in list(self.suspects.items()):
            if until <= now:
                del self.suspects[instance]
        trusted = [h for h in holders if h.instance not in self.suspects]
        holder = random.choice(trusted or holders)
        try:
            host, port = hostPort(instances[holder.instance].advertise, "advertise")
        except (ConfigError, KeyError):
            self.dial(exposure, sid, identity, peer, tried | {holder.instance})
            return
        hello: dict[str, Any] = {"op": "peer-dial", "peer": peer, "instance": self.me}
        if route.kind == NAME:
            hello.update(name=route.key, identity=identity)
        else:
            hello["port"] = int(route.key)
        self._open(PeerDial(self, sid, exposure, hello, holder.instance, tried), host, port)

    def dialFailed(self, link: PeerDial, code: ErrorCode, message: str) -> None:
        """
        The peer link C{link} did not join its dialer.  If the holder could
        not be reached (or no longer holds the route), and the dialer still
        waits, try another holder: a pool fails over.  Else the dialer
        fails with the holder's answer.
        """
        if not link.answered:
            # Not reached at all (refused, timed out, closed, or not TP):
            # dials avoid it for a while.
            self.suspects[link.instance] = self.reactor.seconds() + SUSPECT_FOR
        else:
            self.reached(link.instance)
        pending = self.registry.sessions.get(link.sid)
        if pending is None:
            return  # the dialer left, or its wait ended
        others = {h.instance for h in self.remoteHolders(self._route(link.exposure))} - link.tried
        if others and (not link.answered or code is ErrorCode.NOT_EXPOSED):
            log.info("Session {session}: {message}; trying another holder", session=shortSession(link.sid), message=message)
            self.outcomes["dial", "retried"] += 1
            self.dial(link.exposure, link.sid, pending.dialerIdentity, str(link.hello.get("peer", "?")), link.tried)
            return
        self.outcomes["dial", code.value] += 1
        self.registry.failSession(link.sid, code, message)

    def reached(self, instance: str) -> None:
        """
        A peer link to C{instance} was answered (joined, or refused with an
        answer): it is not suspect.
        """
        self.suspects.pop(instance, None)

    @staticmethod
    def _route(exposure: Exposure) -> Route:
        return Route.name(exposure.name) if exposure.mode == "e2e" else Route.port(exposure.port)  # type: ignore[arg-type]

    def accept(self, sid: str, identity: str, end: AcceptEnd) -> None:
        """
        An exposer (C{identity}) sent its C{accept} of session C{sid} to
        this instance, and another instance made that session (its tag
        says which, L{instanceTag}): open a peer link to that instance,
        which claims the session for C{identity} as for a local accept.
        A tag of no live instance is refused as an unknown session.
        """
        tag = sid[:TAG_LENGTH]
        instances = self.watch.instances() if self.watch is not None else {}
        owners = [i for i in instances.values() if i.id != self.me and instanceTag(i.id) == tag]
        if not owners:
            log.warn("Refused accept of session {session} by {identity}: no live instance made it", session=shortSession(sid), identity=identity)
            end.linkFailed(ErrorCode.BAD_SESSION, "unknown session")
            return
        owner = owners[0]
        try:
            host, port = hostPort(owner.advertise, "advertise")
        except ConfigError:
            end.linkFailed(ErrorCode.UNREACHABLE, f"instance {owner.id} has no usable advertise address")
            return
        log.info("Forwarding accept of session {session} by {identity} to instance {instance}", session=shortSession(sid), identity=identity, instance=owner.id)
        hello = {"op": "peer-accept", "session": sid, "identity": identity, "instance": self.me}
        self._open(PeerAccept(self, end, hello, owner.id), host, port)

    def _open(self, link: PeerLink, host: str, port: int) -> None:
        """
        Connect C{link} to the peer listener at C{host:port}, from this
        instance's advertise host (the other end checks it).
        """
        factory = TLSFactory(self.tls, True, PeerLinkFactory(link), clock=self.reactor)
        bind = (self.ownHost, 0) if self.ownHost is not None else None
        # Well inside the dialer's wait, so that a holder whose host does
        # not answer leaves time to try another.
        timeout = max(1.0, min(self.connectTimeout, self.registry.acceptTimeout / 4))
        self.reactor.connectTCP(host, port, factory, timeout=timeout, bindAddress=bind)

    def authorize(self, transport: Any) -> tuple[str | None, str]:
        """
        May the other end of a peer link (server side) use it?  Answers a
        refusal (or C{None}) and the peer's instance id.
        """
        if not self.tls.pinned(transport):
            return "its certificate is not TP's own", "?"
        host = transport.getPeer().host
        instances = self.watch.instances() if self.watch is not None else {}
        for instance in instances.values():
            try:
                if instance.id != self.me and hostPort(instance.advertise, "advertise")[0] == host:
                    return None, instance.id
            except ConfigError:
                continue
        return f"{host} is not the address of a live instance of this cluster", "?"

    def listenerFactory(self) -> TLSFactory:
        """
        The peer listener's: TP's half-closing TLS around L{PeerSession}.
        """
        return TLSFactory(self.tls, False, Factory.forProtocol(lambda: PeerSession(self, self.helloTimeout)), clock=self.reactor)


class ClusterService(service.Service):
    """
    While running: the watch that keeps the remote exposures, and the peer
    listener on C{peer_listen}.  Started by L{tpproxy.service.ServerService}
    once the store has its lease.
    """

    name = "cluster"

    def __init__(self, links: PeerLinks, peerListen: str, gate: Callable[[Any], Any] = lambda factory: factory) -> None:
        self.links = links
        self.peerListen = peerListen
        #: Wraps the listener's factory: the server's half-open gate, so a
        #: flood of unfinished handshakes on the peer port is capped like
        #: one on TP's own port.
        self.gate = gate
        self.port: Any = None
        self.starting: defer.Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        self.starting = self._start()
        self.starting.addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        """
        Without its peer listener or watch this instance is no part of the
        cluster, though it would still serve what it holds: stop it (exit
        status 1), so that what runs it (systemd, the worker pool) starts
        it again, and say why in one line.
        """
        if failure.check(error.CannotListenError):
            e = failure.value
            log.critical(
                "Cannot listen on cluster.peer_listen {listen}: {error}; stopping",
                listen=self.peerListen, error=str(getattr(e, "socketError", e)),
            )
        else:
            log.failure("The cluster's peer listener or watch did not start; stopping", failure)
        reactor = self.links.reactor
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)  # type: ignore[attr-defined]
        reactor.stop()  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def _start(self) -> Any:
        endpoint = serverFromString(self.links.reactor, self.peerListen)
        self.port = yield endpoint.listen(self.gate(self.links.listenerFactory()))
        log.info("Peer links on {listen} (instance {instance}, advertised as {advertise})",
                 listen=self.peerListen, instance=self.links.me, advertise=self.links.store.instance.advertise)
        yield self.links.start()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        yield self.links.stop()
