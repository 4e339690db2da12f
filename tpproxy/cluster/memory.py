# -*- test-case-name: tpproxy.test.test_cluster_store -*-
"""
The routing store in memory: the default for a single instance (no etcd),
and a verified fake for tests of several instances on one L{Clock}.

L{MemoryBackend} plays etcd's part: leases that expire on the injected
clock, compare-and-set claims, watches.  Each L{MemoryRoutingStore} is one
instance's view of a backend, with the same lease logic as the etcd store
(L{LeasedStore}).  The conformance suite runs against both.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from tpproxy.cluster.store import (
    Event,
    Holder,
    HolderAdded,
    HolderRemoved,
    Instance,
    InstanceDown,
    InstanceUp,
    IRoutingStore,
    IRoutingWatch,
    LeasedStore,
    LeaseGone,
    Route,
    RouteTaken,
    RoutingView,
    StoreUnavailable,
)


class MemoryBackend:
    """
    The shared state of instances in one process: leases on C{clock},
    instances, holders, watchers.

    @ivar available: set it to C{False} to make every request of every
        store fail with L{StoreUnavailable} (as an unreachable etcd does);
        leases still expire meanwhile (as in a partition).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.available = True
        self._ids = itertools.count(0x1000)
        self._leases: dict[int, tuple[int, IDelayedCall]] = {}
        self._instances: dict[str, tuple[Instance, int]] = {}
        self._holders: dict[Route, dict[str, tuple[str, int]]] = {}
        self._watchers: list[Callable[[Event], None]] = []

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("the in-memory store is made unavailable")

    def _publish(self, event: Event) -> None:
        for watcher in list(self._watchers):
            watcher(event)

    # --- leases ---------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        self._check()
        lease = next(self._ids)
        self._leases[lease] = (ttl, self.clock.callLater(ttl, self.revoke, lease))
        return lease

    def keepalive(self, lease: int) -> int:
        """
        @return: the lease's TTL, renewed; 0 if the lease does not exist.
        """
        self._check()
        if lease not in self._leases:
            return 0
        ttl, expiry = self._leases[lease]
        expiry.reset(ttl)
        return ttl

    def revoke(self, lease: int) -> None:
        """
        End C{lease} and delete its keys (what its expiry does, too).
        Not checked against L{available}: a test revokes a lease to act
        as the lease's expiry.
        """
        entry = self._leases.pop(lease, None)
        if entry is None:
            return
        if entry[1].active():
            entry[1].cancel()
        for route, holders in list(self._holders.items()):
            for instance, (identity, held) in list(holders.items()):
                if held == lease:
                    del holders[instance]
                    self._publish(HolderRemoved(Holder(route, instance, identity)))
            if not holders:
                del self._holders[route]
        for iid, (instance, held) in list(self._instances.items()):
            if held == lease:
                del self._instances[iid]
                self._publish(InstanceDown(instance))

    def _requireLease(self, lease: int) -> None:
        if lease not in self._leases:
            raise LeaseGone(f"lease {lease} not found")

    # --- keys -------------------------------------------------------------------

    def register(self, instance: Instance, lease: int) -> None:
        self._check()
        self._requireLease(lease)
        old = self._instances.get(instance.id)
        self._instances[instance.id] = (instance, lease)
        if old is None or old[0] != instance:
            if old is not None:
                self._publish(InstanceDown(old[0]))
            self._publish(InstanceUp(instance))

    def claim(self, route: Route, identity: str, instance: str, lease: int) -> None:
        """
        Hold C{route} for C{identity} on C{instance} under C{lease} if
        nobody, or only C{identity}, holds it.

        @raise RouteTaken: if another identity holds it.
        """
        self._check()
        holders = self._holders.get(route, {})
        others = {i for i, _ in holders.values()} - {identity}
        if others:
            raise RouteTaken(route, frozenset(others))
        self._requireLease(lease)
        old = holders.get(instance)
        self._holders.setdefault(route, {})[instance] = (identity, lease)
        if old is None:
            self._publish(HolderAdded(Holder(route, instance, identity)))

    def delete(self, route: Route, instance: str) -> None:
        self._check()
        holders = self._holders.get(route, {})
        old = holders.pop(instance, None)
        if not holders:
            self._holders.pop(route, None)
        if old is not None:
            self._publish(HolderRemoved(Holder(route, instance, old[0])))

    def holders(self, route: Route) -> frozenset[Holder]:
        self._check()
        return frozenset(Holder(route, i, identity) for i, (identity, _) in self._holders.get(route, {}).items())

    def instances(self) -> dict[str, Instance]:
        self._check()
        return {iid: instance for iid, (instance, _) in self._instances.items()}

    def snapshot(self) -> tuple[dict[str, Instance], set[Holder]]:
        holders = {
            Holder(route, i, identity) for route, hs in self._holders.items() for i, (identity, _) in hs.items()
        }
        return self.instances(), holders

    def subscribe(self, watcher: Callable[[Event], None]) -> None:
        self._watchers.append(watcher)

    def unsubscribe(self, watcher: Callable[[Event], None]) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)


def _call(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return defer.maybeDeferred(f, *args)


@implementer(IRoutingWatch)
class MemoryWatch:
    def __init__(self, backend: MemoryBackend, onEvent: Callable[[Event], None]) -> None:
        self._backend = backend
        self._onEvent = onEvent
        self._view = RoutingView()

    def _start(self) -> None:
        instances, holders = self._backend.snapshot()
        for event in self._view.replace(instances, holders):
            self._onEvent(event)
        self._backend.subscribe(self._received)

    def _received(self, event: Event) -> None:
        if self._view.apply(event):
            self._onEvent(event)

    def reopen(self) -> None:
        """
        Nothing to do: an in-memory watch has no connection to lose.
        """

    def stop(self) -> Deferred[None]:
        self._backend.unsubscribe(self._received)
        return defer.succeed(None)

    def holders(self, route: Route) -> frozenset[Holder]:
        return self._view.holders(route)

    def routes(self, kind: str) -> frozenset[Route]:
        return self._view.routes(kind)

    def instances(self) -> dict[str, Instance]:
        return self._view.instances()


@implementer(IRoutingStore)
class MemoryRoutingStore(LeasedStore):
    """
    One instance's routing store on a L{MemoryBackend}: its own (the
    default, a single instance) or one shared with other instances of the
    same process (tests).

    @param clock: the clock of the lease renewal (and of the backend's
        leases, if this store makes its own backend).
    """

    def __init__(
        self,
        clock: IReactorTime,
        instance: str = "local",
        advertise: str = "",
        ttl: int = 10,
        backend: MemoryBackend | None = None,
    ) -> None:
        super().__init__(clock, instance, advertise, ttl)
        self.backend = backend if backend is not None else MemoryBackend(clock)

    def _grant(self, ttl: int) -> Deferred[int]:
        return _call(self.backend.grant, ttl)

    def _keepalive(self, lease: int) -> Deferred[int]:
        return _call(self.backend.keepalive, lease)

    def _revoke(self, lease: int) -> Deferred[None]:
        if not self.backend.available:
            return defer.fail(StoreUnavailable("the in-memory store is made unavailable"))
        return _call(self.backend.revoke, lease)

    def _register(self, lease: int) -> Deferred[None]:
        return _call(self.backend.register, self.instance, lease)

    def _claim(self, route: Route, identity: str, lease: int) -> Deferred[None]:
        return _call(self.backend.claim, route, identity, self.instance.id, lease)

    def _delete(self, route: Route) -> Deferred[None]:
        return _call(self.backend.delete, route, self.instance.id)

    def _closeConnections(self) -> Deferred[None]:
        return defer.succeed(None)

    def holders(self, route: Route) -> Deferred[frozenset[Holder]]:
        return _call(self.backend.holders, route)

    def instances(self) -> Deferred[dict[str, Instance]]:
        return _call(self.backend.instances)

    def _watch(self, onEvent: Callable[[Event], None]) -> Deferred[MemoryWatch]:
        w = MemoryWatch(self.backend, onEvent)
        return _call(lambda: (w._start(), w)[1])
