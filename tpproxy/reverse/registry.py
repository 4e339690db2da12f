# -*- test-case-name: tpproxy.test.test_reverse -*-
"""
Reverse tunnels on the server: exposures (public ports and E2E names) held
by signalling connections, and the one-use sessions that join a waiting
dialer to the exposer's C{accept} connection.
"""

from __future__ import annotations

import base64
import hashlib
import random
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable
from typing import Protocol as TypingProtocol

from twisted.internet import defer, error
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from tpproxy.certsource import CertificateUnavailable, ICertificateSource
from tpproxy.cluster.store import NAME, PORT, IRoutingStore, Route, RouteTaken, StoreError, StoreUnavailable
from tpproxy.names import normalize
from tpproxy.policy import Decision, ExposureRule, Policy
from tpproxy.protocols.relay import RelayEnd, noDelay, splice
from tpproxy.reactors import IServerReactor
from tpproxy.wire import ErrorCode

log = Logger(namespace="tpproxy.reverse")
audit = Logger(namespace="tpproxy.audit")

#: How many spent (used or expired) session ids are remembered, to tell a
#: replayed id from an unknown one in the log.
SPENT_MEMORY = 4096
#: Dialers that may wait for one exposure at once; more are turned away
#: (a public port is open to anyone, and each waiting dialer costs a timer,
#: an event to the exposer and, there, a connection).
MAX_PENDING = 256
#: Seconds a pool member that let a session expire gets no new dialers
#: while other members answer (a connection that died silently, such as a
#: QUIC exposer killed outright, is only noticed after 3 x keepalive).
MISS_MEMORY = 30.0
#: Characters at the start of a session id that name the instance that
#: made it (L{instanceTag}); the 32 after them are the secret.
TAG_LENGTH = 8


def instanceTag(instance: str) -> str:
    """
    What starts the session ids instance C{instance} makes: the first
    L{TAG_LENGTH} characters of the base64url SHA-256 of its id (48 bits:
    the instances of one service never share one by chance).  Any instance
    that received an C{accept} tells from it, and from the instances its
    watch last saw, which instance holds the session; no lookup.
    """
    digest = hashlib.sha256(instance.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")[:TAG_LENGTH]


def shortSession(sid: str) -> str:
    """
    A session id as logs show it: the instance tag and 8 characters of the
    secret (48 of its 192 bits).
    """
    return sid[: TAG_LENGTH + 8]


class ReverseError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class Dialer(TypingProtocol):
    """
    What waits for an exposer to accept: a public TCP connection, an E2E
    connection through a TP tunnel, or a direct SNI connection.
    """

    def sessionJoined(self, acceptEnd: RelayEnd) -> None: ...

    def sessionFailed(self, code: ErrorCode, message: str) -> None: ...


class Control(TypingProtocol):
    """
    The signalling side of an exposure.
    """

    def sendIncoming(self, session: str, identity: str | None, peer: str) -> None: ...

    def closeControl(self, reason: str) -> None: ...

    def goaway(self, reason: str) -> None: ...


class AcceptEnd(TypingProtocol):
    """
    An exposer's C{accept} that arrived at this instance for a session
    another instance made, while a peer link carries it there.
    """

    def linkJoined(self, link: RelayEnd, rest: bytes) -> None:
        """
        The instance that made the session gave it to this exposer: splice
        to C{link} (C{rest}: what followed its answer).
        """

    def linkFailed(self, code: ErrorCode, message: str) -> None:
        """
        It refused, or could not be reached.
        """


@dataclass(eq=False)
class Member:
    """
    One signalling connection of an exposure (a pool has several).

    @ivar key: the C{member} its C{listen} named (L{tpproxy.wire.ClientHello}),
        or C{None} (a client that names none): a new C{listen} of the same
        identity and key replaces this member's connection (a reconnect
        that beat the old connection's timeout).
    @ivar sessions: the pending sessions it was told of.
    """

    control: Control
    key: str | None = None
    sessions: set[str] = field(default_factory=set)
    #: When a session told to it was last not accepted in time (its
    #: connection may be dead and not yet known to be); cleared when it
    #: accepts one.
    missedAt: float | None = None


class Exposure:
    """
    A public port or an E2E name held by one identity, served by one or
    more signalling connections (L{Member}s: a B{pool}), each told of
    dialers in turn (at random).
    """

    def __init__(
        self,
        owner: str,
        mode: str,
        control: Control,
        port: int | None = None,
        name: str | None = None,
        grantedBy: ExposureRule | None = None,
        member: str | None = None,
    ) -> None:
        self.owner = owner
        self.mode = mode
        self.port = port
        self.name = name
        self.listening: Any = None
        #: The exposure rule that let C{owner} expose C{name}, recorded
        #: when the name was registered: its dialers, and no other rule's,
        #: may dial this exposure.  C{None} for a public port (which has
        #: no dialers).
        self.grantedBy = grantedBy
        self.members: list[Member] = [Member(control, member)]

    @property
    def control(self) -> Control:
        """
        The first member's control (the only one, but in a pool).
        """
        return self.members[0].control

    def memberOf(self, control: Control) -> Member | None:
        for member in self.members:
            if member.control is control:
                return member
        return None

    @property
    def sessions(self) -> set[str]:
        """
        The pending sessions of this exposure: those its members were told
        of (each pending session is its member's).
        """
        return set().union(*(m.sessions for m in self.members))

    def introducers(self) -> list[Member]:
        """
        The members that offered to be introduced to dialers (P2P,
        docs/p2p.md).
        """
        return [m for m in self.members if getattr(m.control, "offersP2P", False)]

    def pick(self, now: float = 0.0) -> Member:
        """
        The member to tell of a new dialer: one at random (the members of
        a pool share its dialers), among those that have not let a session
        expire in the last L{MISS_MEMORY} seconds while there are such.
        """
        if len(self.members) == 1:
            return self.members[0]
        answering = [m for m in self.members if m.missedAt is None or now - m.missedAt >= MISS_MEMORY]
        return random.choice(answering or self.members)

    def describe(self) -> str:
        return f"public port {self.port}" if self.mode == "public" else f"E2E name {self.name}"


@dataclass(eq=False)
class PendingSession:
    id: str
    exposure: Exposure
    dialer: Dialer
    dialerIdentity: str | None
    peer: str
    timer: Any
    #: The member of the exposure that was told of it.
    member: Member


class Registry:
    """
    All live exposures of one server, and their pending sessions.

    @param reactor: C{IReactorTCP} (public listeners) and C{IReactorTime}
        (session expiry).
    @param store: the routing store shared with the other instances of the
        service (docs/cluster.md), started by the caller: each E2E name and
        public port is claimed there before it is registered here, and
        released when its exposure goes.  C{None}: no store (one instance,
        nothing claimed).
    """

    def __init__(
        self,
        reactor: IServerReactor,
        policy: Policy,
        serverTLS: Any,
        certificates: ICertificateSource,
        publicInterface: str = "0.0.0.0",
        acceptTimeout: float = 10.0,
        store: IRoutingStore | None = None,
    ) -> None:
        self.reactor = reactor
        self.store = store
        if store is not None:
            store.observeLoss(self._routeLost)
        self.policy = policy
        self.serverTLS = serverTLS
        self.certificates = certificates
        self.publicInterface = publicInterface
        self.acceptTimeout = acceptTimeout
        self.byPort: dict[int, Exposure] = {}
        self.byName: dict[str, Exposure] = {}
        self.sessions: dict[str, PendingSession] = {}
        self.spent: OrderedDict[str, str] = OrderedDict()
        #: Exposures held on other instances of the cluster, that this one
        #: forwards dialers to over a peer link
        #: (L{tpproxy.cluster.peer.ClusterRouter} keeps them).  A local
        #: exposure of the same route comes first.
        self.remoteNames: dict[str, Exposure] = {}
        self.remotePorts: dict[int, Exposure] = {}
        #: Called with a L{Route} when a local exposure of it went (the
        #: cluster router then serves the route's remote holders again).
        self.onLocalGone: Any = None
        #: This instance's L{instanceTag}: every session id it makes
        #: starts with it.
        self.tag = instanceTag(store.instance.id if store is not None else "")
        #: Called with a session id made by another instance, the
        #: exposer's identity and the accept end (L{AcceptEnd}) when an
        #: C{accept} arrives here for it: the cluster
        #: (L{tpproxy.cluster.peer.PeerLinks.accept}) forwards it to the
        #: instance that made it.  C{None}: one instance, every id is ours.
        self.forwardAccept: Callable[[str, str, AcceptEnd], None] | None = None

    # --- exposures ------------------------------------------------------------

    @defer.inlineCallbacks
    def expose(self, control: Control, identity: str, mode: str, port: int = 0, name: str | None = None, member: str | None = None) -> Any:
        """
        Register an exposure for C{identity}, served by C{control}.  If
        C{identity} already exposes that name or port here, C{control}
        joins it (L{_join}): as a new member of its pool, or, with the
        C{member} key of one of its members, in that member's place.

        @return: a Deferred firing with the L{Exposure}, or failing with
            L{ReverseError}.
        """
        if mode == "public":
            return (yield self._exposePort(control, identity, port, member))
        assert name is not None
        return (yield self._exposeName(control, identity, name, member))

    def _join(self, existing: Exposure, control: Control, identity: str, member: str | None) -> Exposure:
        """
        C{identity} exposes C{existing} again, with C{control}.  A member
        with the same C{member} key (a reconnect that beat the old
        connection's timeout, or a move to a renewed certificate) hands
        over to it: its old connection is closed, and the sessions it was
        told of stay pending (their C{accept}s name the session, not the
        connection).  Another key makes C{control} a new member of the
        exposure's pool.  The route stays claimed in the store as it was.
        """
        if existing.owner != identity:
            what = existing.describe()
            raise ReverseError(ErrorCode.PORT_UNAVAILABLE if existing.mode == "public" else ErrorCode.NAME_TAKEN, f"{what} is held by another identity")
        what = existing.describe()
        same = next((m for m in existing.members if m.key == member), None)
        if same is not None:
            old, same.control = same.control, control
            log.info("{identity} takes over {what} from its previous session", identity=identity, what=what)
            old.closeControl(f"{what} was taken over by a new session of {identity}")
            # The dialers told to the old connection (most likely dead:
            # that is why the exposer connected again) are told again here;
            # an accept is single-use, so a second one is refused.
            for sid in sorted(same.sessions):
                pending = self.sessions.get(sid)
                if pending is not None:
                    control.sendIncoming(sid, pending.dialerIdentity, pending.peer)
        else:
            existing.members.append(Member(control, member))
            log.info("{identity} adds a member to the pool of {what} ({count} members)", identity=identity, what=what, count=len(existing.members))
        return existing

    @defer.inlineCallbacks
    def _claim(self, route: Route, identity: str, code: ErrorCode) -> Any:
        """
        Hold C{route} for C{identity} in the routing store (if any), or
        fail with L{ReverseError}: C{code} if another identity holds it
        anywhere, L{ErrorCode.INTERNAL} if the store cannot say (then
        nothing is registered: never two identities on one route).
        """
        if self.store is None:
            return
        try:
            yield self.store.claim(route, identity)
        except ValueError as e:
            # An identity the store cannot record (control characters, or
            # longer than 1024 characters).
            raise ReverseError(ErrorCode.FORBIDDEN, f"{route} cannot be held by this identity: {e}") from None
        except RouteTaken:
            raise ReverseError(code, f"{route} is held by another identity") from None
        except StoreUnavailable as e:
            log.warn("Refused {route} to {identity}: the routing store is unavailable ({error})", route=str(route), identity=identity, error=str(e))
            raise ReverseError(
                ErrorCode.INTERNAL, f"{route} cannot be registered now: TP cannot reach its routing store to claim it; try again later"
            ) from None
        except StoreError as e:
            log.warn("Refused {route} to {identity}: the routing store refused the claim ({error})", route=str(route), identity=identity, error=str(e))
            raise ReverseError(ErrorCode.INTERNAL, f"{route} cannot be registered now: the routing store refused the claim") from None

    def _release(self, route: Route) -> None:
        """
        Stop holding C{route} in the store, unless a live exposure of this
        instance still holds it.  A release the store cannot take now is
        retried by the store itself.
        """
        if self.store is None:
            return
        if (route.kind == PORT and int(route.key) in self.byPort) or (route.kind == NAME and route.key in self.byName):
            return
        self.store.release(route).addErrback(lambda f: f.trap(StoreError))

    def _routeLost(self, taken: RouteTaken, identity: str) -> None:
        """
        The store lost a route this instance held for C{identity} (its
        lease lapsed and another identity claimed the route meanwhile):
        close the exposure that serves it here.
        """
        route = taken.route
        exposure = self.byPort.get(int(route.key)) if route.kind == PORT else self.byName.get(route.key)
        if exposure is None or exposure.owner != identity:
            return
        log.warn("Closing {exposure} of {identity}: its route was lost to {holders}", exposure=exposure.describe(), identity=identity, holders=sorted(taken.holders))
        self.remove(exposure, release=False)
        for member in exposure.members:
            member.control.closeControl(f"the {exposure.describe()} was lost while TP could not reach its routing store")

    @defer.inlineCallbacks
    def _exposePort(self, control: Control, identity: str, port: int, member: str | None) -> Any:
        kept = None
        if port:
            decision = self.policy.mayExposePort(identity, port)
            if not decision.allowed:
                raise ReverseError(ErrorCode.FORBIDDEN, decision.reason)
            existing = self.byPort.get(port)
            if existing is not None:
                return self._join(existing, control, identity, member)
            yield self._claim(Route.port(port), identity, ErrorCode.PORT_UNAVAILABLE)
            existing = self.byPort.get(port)
            if existing is not None:  # registered while the store answered
                return self._join(existing, control, identity, member)
            candidates = [port]
        else:
            ranges = self.policy.publicPortRanges(identity)
            if not ranges:
                raise ReverseError(ErrorCode.FORBIDDEN, f"no exposure rule lets {identity} expose a public port")
            candidates = [0] if (1, 65535) in ranges else [p for lo, hi in ranges for p in range(lo, hi + 1)][:2000]
        if port and port in self.remotePorts:
            # This instance forwards the port to another holder: its
            # exposure here takes the listening socket over.
            remote = self.remotePorts[port]
            kept, remote.listening = remote.listening, None
        exposure = Exposure(owner=identity, mode="public", control=control, member=member)
        factory = PublicDialerFactory(self, exposure)
        if port and kept is not None:
            kept.factory = factory
            exposure.listening = kept
            candidates = []
        for candidate in candidates:
            if candidate and candidate in self.byPort:
                continue
            if candidate and not port:
                try:
                    yield self._claim(Route.port(candidate), identity, ErrorCode.PORT_UNAVAILABLE)
                except ReverseError as e:
                    if e.code is ErrorCode.PORT_UNAVAILABLE:
                        continue  # held elsewhere in the cluster
                    raise
            try:
                exposure.listening = self.reactor.listenTCP(candidate, factory, interface=self.publicInterface)
            except error.CannotListenError as e:
                if candidate:
                    self._release(Route.port(candidate))
                if port:
                    raise ReverseError(ErrorCode.PORT_UNAVAILABLE, f"cannot listen on port {port}: {e.socketError}") from None
                continue
            if not candidate:
                # TP picked the port: claim it now, or pick another.
                picked = exposure.listening.getHost().port
                try:
                    yield self._claim(Route.port(picked), identity, ErrorCode.PORT_UNAVAILABLE)
                except ReverseError as e:
                    exposure.listening.stopListening()
                    exposure.listening = None
                    if e.code is ErrorCode.PORT_UNAVAILABLE and len(candidates) < 8:
                        candidates.append(0)
                        continue
                    raise
            break
        else:
            if exposure.listening is None:
                raise ReverseError(ErrorCode.PORT_UNAVAILABLE, "no free port in the ranges this identity may expose")
        exposure.port = exposure.listening.getHost().port
        self.byPort[exposure.port] = exposure
        return exposure

    @defer.inlineCallbacks
    def _exposeName(self, control: Control, identity: str, name: str, member: str | None) -> Any:
        decision = self.policy.mayExposeName(identity, name)
        if not decision.allowed:
            raise ReverseError(ErrorCode.FORBIDDEN, decision.reason)
        if self.serverTLS.servesOwnName(name):
            raise ReverseError(ErrorCode.FORBIDDEN, f"{name} is a name of TP itself and cannot be exposed")
        existing = self.byName.get(name)
        if existing is not None:
            return self._join(existing, control, identity, member)
        route = Route.name(name)
        yield self._claim(route, identity, ErrorCode.NAME_TAKEN)
        existing = self.byName.get(name)
        if existing is not None:  # registered while the store answered
            return self._join(existing, control, identity, member)
        assert decision.rule is not None
        grantedBy = self.policy.exposures[decision.rule]
        exposure = Exposure(owner=identity, mode="e2e", control=control, name=name, grantedBy=grantedBy, member=member)
        # Hold the name while the certificate is fetched.
        self.byName[name] = exposure
        try:
            chain, key = yield self.certificates.certificateFor(name)
        except CertificateUnavailable as e:
            if self.byName.get(name) is exposure:
                del self.byName[name]
                self._release(route)
            # Connections that joined (or took over) while the certificate
            # was fetched were told they are listening: they are not.
            for joined in exposure.members:
                if joined.control is not control:
                    joined.control.closeControl(f"no certificate for {name}")
            raise ReverseError(ErrorCode.NO_CERTIFICATE, f"no certificate for {name}: {e}") from None
        if self.byName.get(name) is not exposure:
            raise ReverseError(ErrorCode.NAME_TAKEN, f"E2E name {name} was taken meanwhile")
        self.serverTLS.addName(name, chain, key, lambda ident: self.mayDial(exposure, ident))
        if exposure.memberOf(control) is None:
            # A new connection of the same member took over meanwhile: it
            # holds the exposure; this one is refused.
            raise ReverseError(ErrorCode.NAME_TAKEN, f"E2E name {name} was taken over by a newer session of {identity}")
        return exposure

    def goaway(self, reason: str) -> int:
        """
        Tell every exposer TP is going away (a graceful stop), so each
        registers again at once.

        @return: how many were told.
        """
        members = [m for exposure in [*self.byPort.values(), *self.byName.values()] for m in exposure.members]
        for member in members:
            member.control.goaway(reason)
        return len(members)

    def reconfigure(self, policy: Policy, acceptTimeout: float) -> None:
        """
        A reload: decide with C{policy} from now on.  Each live E2E
        exposure that the new exposure rules still allow is bound to the
        rule that now grants it, so its dialers are the new rule's; one
        they no longer allow keeps its old rule until the reload closes
        its signalling connection.
        """
        self.policy = policy
        self.acceptTimeout = acceptTimeout
        for exposure in [*self.byName.values(), *self.remoteNames.values()]:
            decision = policy.mayExposeName(exposure.owner, exposure.name)  # type: ignore[arg-type]
            if decision.allowed and decision.rule is not None:
                exposure.grantedBy = policy.exposures[decision.rule]

    def leave(self, exposure: Exposure, control: Control) -> None:
        """
        The signalling connection C{control} of C{exposure} is gone.  The
        last member takes the exposure with it (L{remove}).  Else the
        dialers it was told of and that still wait are told to another
        member at once: the pool serves them, and no new dialer is sent
        to a member whose connection is known dead.
        """
        member = exposure.memberOf(control)
        if member is None:
            return  # replaced by a new connection of the same member
        if len(exposure.members) == 1:
            self.remove(exposure)
            return
        exposure.members.remove(member)
        log.info(
            "A member of the pool of {exposure} of {owner} left ({count} remain)",
            exposure=exposure.describe(), owner=exposure.owner, count=len(exposure.members),
        )
        for sid in sorted(member.sessions):
            pending = self.sessions.get(sid)
            if pending is None:
                continue
            other = pending.member = exposure.pick(self.reactor.seconds())
            other.sessions.add(sid)
            other.control.sendIncoming(sid, pending.dialerIdentity, pending.peer)
        member.sessions.clear()

    def remove(self, exposure: Exposure, release: bool = True) -> None:
        """
        The exposure goes (its last signalling connection is gone, or its
        route was lost): stop listening or unbind the name at once, fail
        its pending dialers, and (unless C{release} is false) release its
        route in the store.
        """
        gone: list[Route] = []
        if exposure.port is not None and self.byPort.get(exposure.port) is exposure:
            del self.byPort[exposure.port]
            remote = self.remotePorts.get(exposure.port)
            if remote is not None and remote.listening is None and exposure.listening is not None:
                # Other instances still hold the port: forward it to them.
                remote.listening, exposure.listening = exposure.listening, None
                remote.listening.factory = PublicDialerFactory(self, remote)
            if release:
                self._release(Route.port(exposure.port))
            gone.append(Route.port(exposure.port))
        if exposure.name is not None and self.byName.get(exposure.name) is exposure:
            del self.byName[exposure.name]
            self.serverTLS.removeName(exposure.name)
            if release:
                self._release(Route.name(exposure.name))
            gone.append(Route.name(exposure.name))
        if exposure.listening is not None:
            exposure.listening.stopListening()
            exposure.listening = None
        for sid in sorted(exposure.sessions):
            pending = self.sessions.pop(sid, None)
            if pending is not None:
                pending.timer.cancel()
                self._spend(sid, "exposure closed")
                pending.dialer.sessionFailed(ErrorCode.NOT_ACCEPTED, f"the {exposure.describe()} went away")
        for member in exposure.members:
            member.sessions.clear()
        if self.onLocalGone is not None:
            for route in gone:
                self.onLocalGone(route)

    def mayDial(self, exposure: Exposure, identity: str) -> Decision:
        """
        May C{identity} dial the E2E C{exposure}?  Asked by every path to
        it (the handshake of a direct SNI dialer, the inner handshake in a
        TP tunnel, and again before the exposer is asked), always of the
        rule that authorized this exposure's owner for its name (recorded
        at registration), never of a fresh lookup by the name.
        """
        if exposure.grantedBy is None or exposure.name is None:
            return Decision(False, f"the {exposure.describe()} has no dialers")
        return self.policy.mayDialExposure(exposure.grantedBy, identity, exposure.name)

    def nameExposure(self, name: str) -> Exposure | None:
        """
        The exposure of E2E name C{name}: this instance's, else one held
        on another instance of the cluster (reached over a peer link).
        """
        name = normalize(name)
        return self.byName.get(name) or self.remoteNames.get(name)

    def failSession(self, sid: str, code: ErrorCode, message: str) -> None:
        """
        The pending session C{sid} cannot be joined (a peer link failed):
        fail its dialer now.
        """
        pending = self.sessions.pop(sid, None)
        if pending is None:
            return
        pending.timer.cancel()
        self._forget(pending)
        self._spend(sid, "failed")
        pending.dialer.sessionFailed(code, message)

    # --- sessions -------------------------------------------------------------

    def incoming(self, exposure: Exposure, dialer: Dialer, identity: str | None, peer: str, p2p: dict[str, Any] | None = None) -> str | None:
        """
        A dialer arrived for C{exposure}: make a one-use session id and tell
        the exposer.  With L{MAX_PENDING} dialers already waiting, the
        dialer is turned away instead (and L{None} returned).  With C{p2p}
        (a P2P introduction, docs/p2p.md), only a member that offered P2P
        is told, with C{p2p}.
        """
        if sum(len(m.sessions) for m in exposure.members) >= MAX_PENDING:
            log.warn("Turning away {peer}: {limit} dialers already wait for {exposure}", peer=peer, limit=MAX_PENDING, exposure=exposure.describe())
            dialer.sessionFailed(ErrorCode.NOT_ACCEPTED, f"{MAX_PENDING} dialers already wait for this exposure")
            return None
        # The instance's tag, then 192 bits from the OS CSPRNG.
        sid = self.tag + secrets.token_urlsafe(24)
        timer = self.reactor.callLater(self.acceptTimeout, self._expire, sid)
        member = exposure.pick(self.reactor.seconds())
        if p2p is not None and not getattr(member.control, "offersP2P", False):
            member = exposure.introducers()[0]
        self.sessions[sid] = PendingSession(sid, exposure, dialer, identity, peer, timer, member)
        member.sessions.add(sid)
        audit.info(
            "incoming {peer} for {exposure} of {owner}",
            event="incoming",
            exposure=exposure.describe(),
            owner=exposure.owner,
            peer=peer,
            identity=identity,
            session=shortSession(sid),
        )
        if p2p is not None:
            member.control.sendIncoming(sid, identity, peer, p2p=p2p)
        else:
            member.control.sendIncoming(sid, identity, peer)
        return sid

    def madeHere(self, sid: str) -> bool:
        """
        Does C{sid} name this instance (else another instance of the
        cluster made it, or nobody did)?
        """
        return sid.startswith(self.tag)

    def _expire(self, sid: str) -> None:
        pending = self.sessions.pop(sid, None)
        if pending is None:
            return
        self._forget(pending)
        self._spend(sid, "expired")
        if len(pending.exposure.members) > 1:
            pending.member.missedAt = self.reactor.seconds()
        log.info("Session {session} for {exposure} was not accepted within {timeout} s", session=shortSession(sid), exposure=pending.exposure.describe(), timeout=self.acceptTimeout)
        pending.dialer.sessionFailed(
            ErrorCode.NOT_ACCEPTED, f"the {pending.exposure.describe()} did not accept within {self.acceptTimeout:g} s"
        )

    @staticmethod
    def _forget(pending: PendingSession) -> None:
        pending.member.sessions.discard(pending.id)

    def _spend(self, sid: str, why: str) -> None:
        self.spent[sid] = why
        while len(self.spent) > SPENT_MEMORY:
            self.spent.popitem(last=False)

    def dialerGone(self, sid: str) -> None:
        pending = self.sessions.pop(sid, None)
        if pending is not None:
            pending.timer.cancel()
            self._forget(pending)
            self._spend(sid, "dialer left")

    def claim(self, sid: str, identity: str) -> PendingSession:
        """
        An C{accept} for C{sid} by C{identity}: hand over the pending
        session, once.

        @raise ReverseError: L{ErrorCode.BAD_SESSION} for an unknown, used,
            expired or foreign id.  The message to the peer does not tell a
            foreign id from an unknown one; the log does.
        """
        pending = self.sessions.get(sid)
        if pending is None:
            why = self.spent.get(sid, "unknown")
            log.warn("Refused accept of {why} session {session} by {identity}", why=why, session=shortSession(sid), identity=identity)
            raise ReverseError(ErrorCode.BAD_SESSION, f"session is {why}" if why != "unknown" else "unknown session")
        if pending.exposure.owner != identity:
            log.warn(
                "Refused accept of session {session} of {owner} by {identity}",
                session=shortSession(sid), owner=pending.exposure.owner, identity=identity,
            )
            raise ReverseError(ErrorCode.BAD_SESSION, "unknown session")
        del self.sessions[sid]
        pending.timer.cancel()
        self._forget(pending)
        self._spend(sid, "used")
        pending.member.missedAt = None
        return pending


class PublicDialer(RelayEnd):
    """
    A connection to a public exposure port, waiting for its session.
    """

    sid: str | None = None

    def __init__(self, registry: Registry, exposure: Exposure) -> None:
        self.registry = registry
        self.exposure = exposure
        self.pending = b""

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.transport.pauseProducing()  # type: ignore[union-attr]
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peerText = f"{peer.host}:{peer.port}"
        self.sid = self.registry.incoming(self.exposure, self, None, self.peerText)

    def preSpliceData(self, data: bytes) -> None:
        self.pending += data

    def sessionJoined(self, acceptEnd: RelayEnd) -> None:
        pending, self.pending = self.pending, b""
        splice(self, acceptEnd, fromA=pending)
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def sessionFailed(self, code: ErrorCode, message: str) -> None:
        self._failure = message
        self.transport.loseConnection()  # type: ignore[union-attr]
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def sessionFailedReason(self) -> str:
        return getattr(self, "_failure", "")

    def connectionLost(self, reason: Failure) -> None:
        if self.peer is None and self.sid is not None:
            self.registry.dialerGone(self.sid)
        joined = self.peer is not None
        super().connectionLost(reason)
        audit.info(
            "public dialer {peer} of {exposure}: {result}",
            event="public",
            peer=self.peerText,
            identity=None,
            exposure=self.exposure.describe(),
            owner=self.exposure.owner,
            result="ok" if joined else "not_accepted",
            detail=self.sessionFailedReason(),
            bytes_up=self.bytesIn,
            bytes_down=self.peer.bytesIn if self.peer is not None else 0,
        )


class PublicDialerFactory(Factory):
    noisy = False

    def __init__(self, registry: Registry, exposure: Exposure) -> None:
        self.registry = registry
        self.exposure = exposure

    def buildProtocol(self, addr: Any) -> PublicDialer:
        return PublicDialer(self.registry, self.exposure)
