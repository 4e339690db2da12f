# -*- test-case-name: tpproxy.test.test_cluster_store -*-
"""
TP's routing state, shared by the instances of one service: the interface
(L{IRoutingStore}), its value types and the view a watch keeps.

What is stored:

  - the live instances, each with the address its peers reach it at
    (L{Instance});
  - the holders of each route (an E2E name or a public port, L{Route}):
    which identity holds it on which instance (L{Holder}).  Two different
    identities never hold one route at once, even when they race from two
    instances: a claim is a compare-and-set.  The same identity may hold
    it on several instances: that is a pool.

Everything an instance writes is bound to its lease: when the instance
dies its keys vanish within the lease's TTL, when it stops cleanly they
vanish at once (it revokes the lease).  The store's clock is injected
(C{IReactorTime}); every call answers with a L{Deferred}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Union

from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from tpproxy.names import isCertificateName, normalize

log = Logger(namespace="tpproxy.cluster")

#: An instance id: what names an instance in keys, logs and (later) its
#: peer certificate.  No C{/}, so that it can end a key.
INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

#: An identity as the store keeps it: any non-empty text without control
#: characters, at most 1024 characters (a certificate's SAN URI or DNS
#: name, as L{tpproxy.verify} reads it).
_IDENTITY = re.compile(r"[^\x00-\x1f\x7f]{1,1024}")

NAME = "name"
PORT = "port"
#: A QUIC routing slot (L{tpproxy.cluster.quicroute}): held by an
#: instance, under its own id as the identity.
SLOT = "quic"


class StoreError(Exception):
    """
    The store refused a request, or answered something TP cannot read: a
    bug or a misconfiguration, not an outage.
    """


class StoreUnavailable(StoreError):
    """
    The store could not be reached (connection refused or lost, no answer
    in time, no leader): nothing was decided.  Try again later.
    """


class RouteTaken(Exception):
    """
    A claim lost: another identity holds the route.

    @ivar route: the L{Route} claimed.
    @ivar holders: the identities that hold it (one, since two different
        identities never hold a route at once; a set since the check and
        the read are one transaction but a reader should not rely on it).
    """

    def __init__(self, route: Route, holders: frozenset[str]) -> None:
        super().__init__(f"{route} is held by {', '.join(sorted(holders)) or 'another identity'}")
        self.route = route
        self.holders = holders


@dataclass(frozen=True, order=True)
class Route:
    """
    Something an exposure holds: an E2E name (C{kind} L{NAME}, C{key} the
    normalized name) or a public port (C{kind} L{PORT}, C{key} the port
    number in decimal); or a QUIC routing slot an instance holds (C{kind}
    L{SLOT}, C{key} 0-63 in decimal).  Make one with L{Route.name},
    L{Route.port} or L{Route.slot}.
    """

    kind: str
    key: str

    @classmethod
    def name(cls, name: str) -> Route:
        if not isCertificateName(name):
            raise ValueError(f"not an E2E name: {name!r}")
        return cls(NAME, normalize(name))

    @classmethod
    def port(cls, port: int) -> Route:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"not a port: {port!r}")
        return cls(PORT, str(port))

    @classmethod
    def slot(cls, slot: int) -> Route:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < 64:
            raise ValueError(f"not a QUIC routing slot: {slot!r}")
        return cls(SLOT, str(slot))

    @classmethod
    def parse(cls, kind: str, key: str) -> Route:
        """
        The route of C{kind} and C{key} as read back from the store.

        @raise ValueError: if they are not a route's.
        """
        if kind == NAME:
            route = cls.name(key)
        elif kind == PORT and key.isdigit() and key == str(int(key)):
            route = cls.port(int(key))
        elif kind == SLOT and key.isdigit() and key == str(int(key)):
            route = cls.slot(int(key))
        else:
            raise ValueError(f"not a route: {kind!r} {key!r}")
        if route.key != key:
            raise ValueError(f"not a route in its stored form: {key!r}")
        return route

    def __str__(self) -> str:
        if self.kind == SLOT:
            return f"QUIC routing slot {self.key}"
        return f"E2E name {self.key}" if self.kind == NAME else f"public port {self.key}"


@dataclass(frozen=True, order=True)
class Instance:
    """
    A live TP instance: its id, and the address its peers reach it at
    (the C{advertise} of its C{[cluster]} table, C{HOST:PORT}).
    """

    id: str
    advertise: str


@dataclass(frozen=True, order=True)
class Holder:
    """
    C{identity} holds C{route} on the instance C{instance}.
    """

    route: Route
    instance: str
    identity: str


@dataclass(frozen=True)
class HolderAdded:
    holder: Holder


@dataclass(frozen=True)
class HolderRemoved:
    holder: Holder


@dataclass(frozen=True)
class InstanceUp:
    instance: Instance


@dataclass(frozen=True)
class InstanceDown:
    instance: Instance


Event = Union[HolderAdded, HolderRemoved, InstanceUp, InstanceDown]


def checkInstanceId(instance: str) -> str:
    if not isinstance(instance, str) or not INSTANCE_ID.fullmatch(instance):
        raise ValueError(f"not an instance id (letters, digits, '.', '_', '-', at most 63): {instance!r}")
    return instance


def checkIdentity(identity: str) -> str:
    if not isinstance(identity, str) or not _IDENTITY.fullmatch(identity):
        raise ValueError(f"not an identity: {identity!r}")
    return identity


class IRoutingWatch(Interface):
    """
    A running watch of the whole routing state (L{IRoutingStore.watch}).
    It keeps what it last saw, so that an instance can go on routing from
    it while the store is unreachable.
    """

    def stop() -> Deferred[None]:
        """
        Stop watching: no event is delivered after this is called.  Fires
        when the watch's connection (if any) is closed.
        """

    def holders(route: Route) -> frozenset[Holder]:
        """
        The holders of C{route} last seen.
        """

    def routes(kind: str) -> frozenset[Route]:
        """
        The routes of C{kind} (L{NAME} or L{PORT}) held anywhere, last seen.
        """

    def instances() -> dict[str, Instance]:
        """
        The live instances last seen, by id.
        """


class IRoutingStore(Interface):
    """
    The routing state of a TP service, as one instance sees and changes it.

    An instance L{start}s (gets a lease and registers itself), L{claim}s
    and L{release}s routes for identities, reads and L{watch}es, and
    L{stop}s (revokes its lease: everything it held vanishes at once).
    Every key it writes is bound to its lease, renewed every third of the
    TTL; if the lease is lost anyway (the store unreachable for longer
    than the TTL), the instance gets a new one and claims again, by the
    same compare-and-set, every route it held: a route that another
    identity took meanwhile is lost, and reported to the observers of
    L{observeLoss}.

    Every method that answers with a Deferred fails with
    L{StoreUnavailable} when the store cannot be reached.
    """

    instance = Attribute("This instance, an L{Instance}.")
    ttl = Attribute("The lease's time to live, in seconds (an int).")

    def start() -> Deferred[None]:
        """
        Get a lease and register this instance under it.  Fails with
        L{StoreUnavailable} (then call it again) or L{StoreError}.
        """

    def stop() -> Deferred[None]:
        """
        Stop renewing the lease, stop the watches, and revoke the lease: the
        instance and its routes vanish at once.  If the store cannot be
        reached they vanish when the lease expires; this still fires
        (successfully) once everything local is stopped.
        """

    def claim(route: Route, identity: str) -> Deferred[None]:
        """
        Hold C{route} for C{identity} on this instance, if no other identity
        holds it anywhere (compare-and-set).  Claiming a route this
        instance already holds for C{identity} again succeeds.

        Fails with L{RouteTaken} if another identity holds it (on this
        instance or another), L{StoreUnavailable} if the store cannot be
        reached (nothing is held then).
        """

    def release(route: Route) -> Deferred[None]:
        """
        Stop holding C{route} on this instance (other instances of a pool
        keep it).  The release stands even if the store cannot be reached:
        it fails with L{StoreUnavailable} then, and is retried with every
        renewal of the lease until it is done (or the lease ends).
        """

    def held() -> dict[Route, str]:
        """
        The routes this instance holds (or believes it holds, while the
        store is unreachable), with the identity each is held for.
        """

    def holders(route: Route) -> Deferred[frozenset[Holder]]:
        """
        The holders of C{route} on every instance, read from the store.
        """

    def instances() -> Deferred[dict[str, Instance]]:
        """
        The live instances, read from the store, by id.
        """

    def watch(onEvent: Callable[[Event], None]) -> Deferred[IRoutingWatch]:
        """
        Watch every change of instances and holders.  C{onEvent} is called
        first with the state as it is (an L{InstanceUp} and a L{HolderAdded}
        for each), then with every change, in the store's order.  The
        Deferred fires once that first state was delivered and the watch
        sees every later change.  If the store's connection breaks, the
        watch reconnects by itself and delivers what changed meanwhile.
        """

    def observeLoss(observer: Callable[[RouteTaken, str], None]) -> None:
        """
        Call C{observer(taken, identity)} when a route this instance held
        for C{identity} was lost (its lease expired and another identity
        claimed it before this instance could claim it again).  The route
        is no longer in L{held}: the caller must close what serves it.
        """


class RoutingView:
    """
    The routing state as a watch has seen it: what L{IRoutingWatch} answers
    from, and how a watch that reconnects turns a new snapshot into events.
    """

    def __init__(self) -> None:
        self._holders: dict[Route, set[Holder]] = {}
        self._instances: dict[str, Instance] = {}

    def apply(self, event: Event) -> bool:
        """
        Take C{event} into the view.

        @return: whether it changed anything (a watch delivers only those).
        """
        if isinstance(event, HolderAdded):
            holders = self._holders.setdefault(event.holder.route, set())
            if event.holder in holders:
                return False
            holders.add(event.holder)
        elif isinstance(event, HolderRemoved):
            holders = self._holders.get(event.holder.route, set())
            if event.holder not in holders:
                return False
            holders.discard(event.holder)
            if not holders:
                del self._holders[event.holder.route]
        elif isinstance(event, InstanceUp):
            if self._instances.get(event.instance.id) == event.instance:
                return False
            self._instances[event.instance.id] = event.instance
        else:
            if self._instances.get(event.instance.id) != event.instance:
                return False
            del self._instances[event.instance.id]
        return True

    def replace(self, instances: dict[str, Instance], holders: set[Holder]) -> list[Event]:
        """
        The events that turn this view into the given state (removals
        first), applied.
        """
        events: list[Event] = []
        mine = {h for hs in self._holders.values() for h in hs}
        events += [HolderRemoved(h) for h in sorted(mine - holders)]
        events += [InstanceDown(i) for i in sorted(set(self._instances.values()) - set(instances.values()))]
        events += [InstanceUp(i) for i in sorted(set(instances.values()) - set(self._instances.values()))]
        events += [HolderAdded(h) for h in sorted(holders - mine)]
        for event in events:
            self.apply(event)
        return events

    def holders(self, route: Route) -> frozenset[Holder]:
        return frozenset(self._holders.get(route, ()))

    def routes(self, kind: str) -> frozenset[Route]:
        return frozenset(r for r in self._holders if r.kind == kind)

    def instances(self) -> dict[str, Instance]:
        return dict(self._instances)


class LeaseGone(StoreError):
    """
    The lease a write was bound to does not exist any more (it expired or
    was revoked): the store must get a new lease before writing again.
    Raised by an implementation's primitives; L{LeasedStore} handles it.
    """


class LeasedStore:
    """
    What both implementations share: the lease, its renewal, claiming again
    after a lost lease, releases retried until done, loss observers.  A
    subclass provides the primitives (C{_grant}, C{_keepalive},
    C{_revoke}, C{_register}, C{_claim}, C{_delete}, C{_watch},
    C{_closeConnections}); each fails with L{StoreUnavailable} when the
    store cannot be reached and C{_claim} and C{_register} with
    L{LeaseGone} when the lease is gone.

    @ivar lease: the current lease's id, or C{None} before L{start} and
        after L{stop}.
    @ivar lapsed: C{True} while the lease may have expired: the last
        renewal the store answered was more than the TTL ago.  What this
        instance holds is then claimed again (or lost) when the store
        answers.
    @ivar failedRenewals: renewals in a row the store did not answer
        (0: it answers).
    @ivar unavailableTotal: renewals the store did not answer since start.
    """

    @property
    def failedRenewals(self) -> int:
        return self._failures

    def __init__(self, clock: IReactorTime, instance: str, advertise: str, ttl: int) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"the lease TTL must be a whole number of seconds, at least 1: {ttl!r}")
        self.instance = Instance(checkInstanceId(instance), advertise)
        self.ttl = ttl
        self.lease: int | None = None
        self.lapsed = False
        self._clock = clock
        self._held: dict[Route, str] = {}
        #: Routes held but not yet claimed under the current lease (after
        #: a lost lease); claimed again at every renewal until done.
        self._unconfirmed: set[Route] = set()
        #: Routes released locally whose key the store has not yet deleted.
        self._releasing: set[Route] = set()
        self._lock = DeferredLock()
        self._loop: LoopingCall | None = None
        self._loopDone: Deferred[Any] | None = None
        self._deadline = 0.0
        self._failures = 0
        self.unavailableTotal = 0
        self._observers: list[Callable[[RouteTaken, str], None]] = []
        self._watches: set[Any] = set()
        self._stopped = False

    # --- the interface ------------------------------------------------------------

    @inlineCallbacks
    def start(self) -> Any:
        if self._stopped:
            raise StoreError("this store was stopped")
        if self.lease is not None:
            return
        yield self._lock.run(self._newLease)
        if self._loop is None:
            self._loop = LoopingCall(self._renew)
            self._loop.clock = self._clock
            self._loopDone = self._loop.start(self.ttl / 3, now=False)
            self._loopDone.addErrback(lambda f: log.failure("The lease renewal loop stopped", f))

    @inlineCallbacks
    def stop(self) -> Any:
        """
        See L{IRoutingStore.stop}.
        """
        if self._stopped:
            return
        lease = self.lease
        yield self._halt()
        if lease is not None:
            try:
                yield self._revoke(lease)
            except StoreError as e:
                log.warn("Could not revoke lease {lease} ({error}): this instance's routes vanish when it expires", lease=lease, error=str(e))
        yield self._closeConnections()

    @inlineCallbacks
    def crash(self) -> Any:
        """
        For tests: stop as a killed process would, without revoking the
        lease: the store removes this instance's keys when the lease
        expires.
        """
        yield self._halt()
        yield self._closeConnections()

    def claim(self, route: Route, identity: str) -> Deferred[None]:
        checkIdentity(identity)
        return self._lock.run(self._claimLocked, route, identity)

    def release(self, route: Route) -> Deferred[None]:
        return self._lock.run(self._releaseLocked, route)

    def held(self) -> dict[Route, str]:
        return dict(self._held)

    @inlineCallbacks
    def watch(self, onEvent: Callable[[Event], None]) -> Any:
        if self._stopped:
            raise StoreError("this store was stopped")
        w = yield self._watch(onEvent)
        self._watches.add(w)
        return w

    def observeLoss(self, observer: Callable[[RouteTaken, str], None]) -> None:
        self._observers.append(observer)

    # --- the lease ------------------------------------------------------------------

    @inlineCallbacks
    def _newLease(self) -> Any:
        """
        Grant a lease, register this instance under it, and claim again
        what this instance holds (under the lock).
        """
        asked = self._clock.seconds()
        lease = yield self._grant(self.ttl)
        yield self._register(lease)
        old, self.lease = self.lease, lease
        self._deadline = asked + self.ttl
        self.lapsed = False
        if old is not None:
            # The old lease took its keys with it.
            self._releasing.clear()
            self._unconfirmed = set(self._held)
            log.warn(
                "Lease {old} of instance {instance} was lost; new lease {lease}, claiming {count} routes again",
                old=old, lease=lease, instance=self.instance.id, count=len(self._unconfirmed),
            )
        yield self._confirm()

    @inlineCallbacks
    def _confirm(self) -> Any:
        """
        Claim again, under the current lease, each route held but not yet
        claimed under it.  A route another identity took is lost: dropped
        from L{held}, and reported to the observers.
        """
        for route in sorted(self._unconfirmed):
            identity = self._held.get(route)
            if identity is None:
                self._unconfirmed.discard(route)
                continue
            try:
                yield self._claim(route, identity, self.lease)
            except RouteTaken as taken:
                self._unconfirmed.discard(route)
                del self._held[route]
                log.warn(
                    "Lost {route} of {identity}: {holders} took it while this instance's lease was lost",
                    route=str(route), identity=identity, holders=sorted(taken.holders),
                )
                for observer in list(self._observers):
                    try:
                        observer(taken, identity)
                    except Exception:
                        log.failure("A loss observer failed")
            else:
                self._unconfirmed.discard(route)

    def _renew(self) -> Deferred[None]:
        return self._lock.run(self._renewLocked)

    @inlineCallbacks
    def _renewLocked(self) -> Any:
        if self._stopped or self.lease is None:
            return
        asked = self._clock.seconds()
        try:
            ttl = yield self._keepalive(self.lease)
            if ttl <= 0:
                yield self._newLease()
            else:
                self._deadline = asked + ttl
                self.lapsed = False
                yield self._confirm()
                yield self._retryReleases()
        except StoreUnavailable as e:
            self._failures += 1
            self.unavailableTotal += 1
            if self._failures == 1:
                log.warn(
                    "The routing store is unavailable ({error}); instance {instance} keeps serving what it holds and retries every {every:g} s",
                    error=str(e), instance=self.instance.id, every=self.ttl / 3,
                )
            if not self.lapsed and self._clock.seconds() > self._deadline:
                self.lapsed = True
                log.warn(
                    "Lease {lease} of instance {instance} may have expired: its {count} routes will be claimed again when the store answers",
                    lease=self.lease, instance=self.instance.id, count=len(self._held),
                )
            return
        except StoreError:
            log.failure("Renewing lease {lease} failed", lease=self.lease)
            return
        if self._failures:
            log.info(
                "The routing store answers again, after {failures} failed renewals", failures=self._failures
            )
            self._failures = 0
            for w in list(self._watches):
                w.reopen()

    @inlineCallbacks
    def _retryReleases(self) -> Any:
        for route in sorted(self._releasing):
            yield self._delete(route)
            self._releasing.discard(route)

    @inlineCallbacks
    def _halt(self) -> Any:
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        watches, self._watches = self._watches, set()
        for w in watches:
            yield w.stop()
        # Let a renewal or claim under way end (each request is bounded by
        # its timeout): nothing of this store runs after stop.
        yield self._lock.run(lambda: None)
        self.lease = None
        self._held.clear()
        self._unconfirmed.clear()
        self._releasing.clear()

    # --- routes -----------------------------------------------------------------

    @inlineCallbacks
    def _claimLocked(self, route: Route, identity: str) -> Any:
        if self.lease is None:
            raise StoreError("the store is not started")
        try:
            yield self._claim(route, identity, self.lease)
        except LeaseGone:
            yield self._newLease()
            yield self._claim(route, identity, self.lease)
        self._held[route] = identity
        self._unconfirmed.discard(route)
        self._releasing.discard(route)

    @inlineCallbacks
    def _releaseLocked(self, route: Route) -> Any:
        if self._held.pop(route, None) is None and route not in self._releasing:
            return
        self._unconfirmed.discard(route)
        self._releasing.add(route)
        yield self._delete(route)
        self._releasing.discard(route)
