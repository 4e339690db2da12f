"""
Several TP instances as one service (issue 13): the registry claiming its
routes in the routing store shared by the instances, and (below) real
instances on 127.0.0.1, 127.0.0.2 and 127.0.0.3 with a real etcd.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tpproxy.cluster.memory import MemoryBackend, MemoryRoutingStore
from tpproxy.cluster.store import Holder, Route, StoreUnavailable
from tpproxy.cluster.testing import _freePorts
from tpproxy.reverse.registry import Registry, ReverseError
from tpproxy.service import certificateSource, makeServerTLS
from tpproxy.test.support import HashSink, listenLocal
from tpproxy.testing import REVERSE_RULES, TestPKI, reverseTables
from tpproxy.wire import ErrorCode


class RecordingControl:
    """
    The signalling side of an exposure, as the registry sees it: what it
    was told.
    """

    def __init__(self) -> None:
        self.incoming: list[tuple[str, str | None, str]] = []
        self.closed: list[str] = []

    def sendIncoming(self, session: str, identity: str | None, peer: str) -> None:
        self.incoming.append((session, identity, peer))

    def closeControl(self, reason: str) -> None:
        self.closed.append(reason)

    def goaway(self, reason: str) -> None:
        pass


class RegistryStoreTests(TestCase):
    """
    Two instances' registries on one in-memory backend (the same lease
    logic as etcd's, on a L{Clock}): each claims an E2E name or public port
    in the store before it registers it, and releases it when it goes.
    """

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.clock = Clock()
        self.backend = MemoryBackend(self.clock)
        config = self.pki.serverConfig(REVERSE_RULES, **reverseTables(self.pki, exposers=("alice", "bob")))
        self.registries = {}
        self.stores = {}
        for instance in ("a", "b"):
            store = MemoryRoutingStore(self.clock, instance, f"127.0.0.{len(self.stores) + 1}:7443", ttl=3, backend=self.backend)
            store.start()
            self.addCleanup(store.stop)
            self.stores[instance] = store
            self.registries[instance] = Registry(
                reactor, config.policy, makeServerTLS(config), certificateSource(config, reactor), "127.0.0.1", store=store
            )

    def holders(self, route: Route) -> set[Holder]:
        return set(self.successResultOf(self.stores["a"].holders(route)))

    @defer.inlineCallbacks
    def test_nameClaimedAcrossInstances(self) -> Any:
        """
        alice's E2E name registered at A is refused to bob at B
        (C{name_taken}, as on one instance), accepted for alice at B (a
        pool), and released from the store when each exposure goes.
        """
        a, b = self.registries["a"], self.registries["b"]
        route = Route.name("svc.localhost")
        exposure = yield a.expose(RecordingControl(), "alice", "e2e", name="svc.localhost")
        self.assertEqual(self.holders(route), {Holder(route, "a", "alice")})
        e = yield self.assertFailure(b.expose(RecordingControl(), "bob", "e2e", name="svc.localhost"), ReverseError)
        self.assertEqual((e.code, e.message), (ErrorCode.NAME_TAKEN, "E2E name svc.localhost is held by another identity"))
        self.assertIsNone(b.nameExposure("svc.localhost"))
        pooled = yield b.expose(RecordingControl(), "alice", "e2e", name="svc.localhost")
        self.assertEqual(self.holders(route), {Holder(route, "a", "alice"), Holder(route, "b", "alice")})
        # A takeover by alice's new session at A keeps the claim.
        again = yield a.expose(RecordingControl(), "alice", "e2e", name="svc.localhost")
        self.assertEqual(exposure.control.closed, ["E2E name svc.localhost was taken over by a new session of alice"])
        self.assertEqual(self.holders(route), {Holder(route, "a", "alice"), Holder(route, "b", "alice")})
        a.remove(exposure)  # the old session's connection ends: nothing changes
        self.assertEqual(self.holders(route), {Holder(route, "a", "alice"), Holder(route, "b", "alice")})
        a.remove(again)
        b.remove(pooled)
        self.assertEqual(self.holders(route), set())
        yield b.expose(RecordingControl(), "bob", "e2e", name="svc.localhost")
        self.assertEqual(self.holders(route), {Holder(route, "b", "bob")})

    @defer.inlineCallbacks
    def test_portClaimedAcrossInstances(self) -> Any:
        """
        A public port alice holds at A is refused to bob at B before B
        listens on it (C{port_unavailable}); released when it goes.
        """
        a, b = self.registries["a"], self.registries["b"]
        port = listenLocal(self, HashSink)[0]
        free = self.freePort()
        route = Route.port(free)
        exposure = yield a.expose(RecordingControl(), "alice", "public", port=free)
        self.addCleanup(a.remove, exposure)
        self.assertEqual(self.holders(route), {Holder(route, "a", "alice")})
        e = yield self.assertFailure(b.expose(RecordingControl(), "bob", "public", port=free), ReverseError)
        self.assertEqual((e.code, e.message), (ErrorCode.PORT_UNAVAILABLE, f"public port {free} is held by another identity"))
        self.assertEqual(b.byPort, {})
        # A port this instance cannot bind is released again.
        e = yield self.assertFailure(b.expose(RecordingControl(), "bob", "public", port=port), ReverseError)
        self.assertEqual(e.code, ErrorCode.PORT_UNAVAILABLE)
        self.assertEqual(self.holders(Route.port(port)), set())
        a.remove(exposure)
        self.assertEqual(self.holders(route), set())

    def freePort(self) -> int:
        return _freePorts(1)[0]

    @defer.inlineCallbacks
    def test_storeUnavailable(self) -> Any:
        """
        While the store cannot be reached, a registration is refused with a
        message that says so, and nothing is registered: two identities
        never hold one route.
        """
        a = self.registries["a"]
        self.backend.available = False
        e = yield self.assertFailure(a.expose(RecordingControl(), "alice", "e2e", name="svc.localhost"), ReverseError)
        self.assertEqual(e.code, ErrorCode.INTERNAL)
        self.assertIn("cannot reach its routing store", e.message)
        self.assertEqual((a.byName, self.stores["a"].held()), ({}, {}))
        self.assertFalse(a.serverTLS.names)
        self.backend.available = True
        yield a.expose(RecordingControl(), "alice", "e2e", name="svc.localhost")
        self.assertEqual(set(a.byName), {"svc.localhost"})

    @defer.inlineCallbacks
    def test_lostRouteClosesExposure(self) -> Any:
        """
        A's lease expires while the store is out of its reach, and bob
        claims alice's name at B meanwhile: when A reaches the store again
        it is told of the loss and closes alice's exposure.
        """
        a, b = self.registries["a"], self.registries["b"]
        control = RecordingControl()
        yield a.expose(control, "alice", "e2e", name="svc.localhost")
        # A is partitioned: only its renewals fail.
        renew = self.stores["a"]._keepalive
        self.stores["a"]._keepalive = lambda lease: defer.fail(StoreUnavailable("partitioned"))
        self.clock.advance(4)  # past the TTL: the lease expires in the backend
        yield b.expose(RecordingControl(), "bob", "e2e", name="svc.localhost")
        self.assertEqual(control.closed, [])
        self.stores["a"]._keepalive = renew
        self.clock.advance(1)
        self.assertEqual(len(control.closed), 1)
        self.assertIn("was lost", control.closed[0])
        self.assertIsNone(a.nameExposure("svc.localhost"))
        self.assertNotIn("svc.localhost", a.serverTLS.names)
