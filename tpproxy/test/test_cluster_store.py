"""
One conformance suite for L{IRoutingStore}, run against the in-memory
store (on a L{Clock}) and the etcd store (against a real etcd started by
the test on free loopback ports, skipped when etcd is not installed, an
error under C{CI=true}).  Then tests of the parts each has alone.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import defer, reactor, task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tpproxy.cluster.etcd import EtcdRoutingStore, Keys, _b64
from tpproxy.cluster.memory import MemoryBackend, MemoryRoutingStore
from tpproxy.cluster.store import (
    NAME,
    PORT,
    Event,
    Holder,
    HolderAdded,
    HolderRemoved,
    Instance,
    InstanceDown,
    InstanceUp,
    IRoutingStore,
    IRoutingWatch,
    Route,
    RouteTaken,
    RoutingView,
    StoreUnavailable,
)
from tpproxy.cluster.testing import EtcdServer

SSH = Route.name("ssh.laptop.example.org")
WEB = Route.name("web.laptop.example.org")
PORT_2222 = Route.port(2222)


def clusterLog(observer: EventLoggingObserver, level: str, words: str) -> list[dict[str, Any]]:
    return [
        e for e in observer
        if e.get("log_namespace") == "tpproxy.cluster" and e["log_level"].name == level and words in e["log_format"]
    ]


class RoutingStoreContract:
    """
    What every L{IRoutingStore} does.  A concrete class provides
    C{makeStore}, C{eventually}, C{revokeLease}, C{makeUnavailable},
    C{makeAvailable}, C{ttl} (the lease TTL its stores use) and C{rounds}
    (how many times the race is run).
    """

    ttl: int
    rounds: int
    makeStore: Callable[..., Any]
    eventually: Callable[..., Any]
    revokeLease: Callable[..., Any]
    makeUnavailable: Callable[..., Any]
    makeAvailable: Callable[..., Any]

    @defer.inlineCallbacks
    def started(self, instance: str, advertise: str = "") -> Any:
        store = self.makeStore(instance, advertise or f"{instance}.internal:7443")
        self.addCleanup(store.stop)  # type: ignore[attr-defined]
        yield store.start()
        return store

    @defer.inlineCallbacks
    def watching(self, store: Any) -> Any:
        events: list[Event] = []
        w = yield store.watch(events.append)
        self.addCleanup(w.stop)  # type: ignore[attr-defined]
        return w, events

    @defer.inlineCallbacks
    def test_interfaces(self) -> Any:
        """
        The store and its watch provide their interfaces.
        """
        a = yield self.started("a")
        verifyObject(IRoutingStore, a)
        w, _ = yield self.watching(a)
        verifyObject(IRoutingWatch, w)

    @defer.inlineCallbacks
    def test_startRegisters(self) -> Any:
        """
        A started instance is listed, with the address it advertises.
        """
        a = yield self.started("a", "10.0.0.1:7443")
        b = yield self.started("b", "10.0.0.2:7443")
        found = yield b.instances()
        self.assertEqual(found, {"a": Instance("a", "10.0.0.1:7443"), "b": Instance("b", "10.0.0.2:7443")})  # type: ignore[attr-defined]
        self.assertEqual(a.instance, Instance("a", "10.0.0.1:7443"))  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_claim(self) -> Any:
        """
        A claimed route is held, on this instance, for that identity;
        claiming it again for the same identity succeeds.
        """
        a = yield self.started("a")
        yield a.claim(SSH, "alice")
        yield a.claim(SSH, "alice")
        yield a.claim(PORT_2222, "alice")
        self.assertEqual((yield a.holders(SSH)), {Holder(SSH, "a", "alice")})  # type: ignore[attr-defined]
        self.assertEqual((yield a.holders(PORT_2222)), {Holder(PORT_2222, "a", "alice")})  # type: ignore[attr-defined]
        self.assertEqual((yield a.holders(WEB)), frozenset())  # type: ignore[attr-defined]
        self.assertEqual(a.held(), {SSH: "alice", PORT_2222: "alice"})  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_otherIdentityRefused(self) -> Any:
        """
        A route held by one identity cannot be claimed for another, on
        another instance or on the same one; the refusal names the holder.
        """
        a = yield self.started("a")
        b = yield self.started("b")
        yield a.claim(SSH, "alice")
        for store in (a, b):
            taken = yield self.assertFailure(store.claim(SSH, "bob"), RouteTaken)  # type: ignore[attr-defined]
            self.assertEqual((taken.route, taken.holders), (SSH, frozenset({"alice"})))  # type: ignore[attr-defined]
        self.assertEqual((yield b.holders(SSH)), {Holder(SSH, "a", "alice")})  # type: ignore[attr-defined]
        self.assertEqual(b.held(), {})  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_pool(self) -> Any:
        """
        The same identity holds a route on two instances (a pool); each
        releases its own; once both released, another identity may claim.
        """
        a = yield self.started("a")
        b = yield self.started("b")
        yield a.claim(SSH, "alice")
        yield b.claim(SSH, "alice")
        self.assertEqual((yield a.holders(SSH)), {Holder(SSH, "a", "alice"), Holder(SSH, "b", "alice")})  # type: ignore[attr-defined]
        yield self.assertFailure(b.claim(SSH, "bob"), RouteTaken)  # type: ignore[attr-defined]
        yield b.release(SSH)
        self.assertEqual((yield a.holders(SSH)), {Holder(SSH, "a", "alice")})  # type: ignore[attr-defined]
        yield self.assertFailure(b.claim(SSH, "bob"), RouteTaken)  # type: ignore[attr-defined]
        yield a.release(SSH)
        yield a.release(SSH)
        self.assertEqual((yield a.holders(SSH)), frozenset())  # type: ignore[attr-defined]
        yield b.claim(SSH, "bob")
        self.assertEqual((yield a.holders(SSH)), {Holder(SSH, "b", "bob")})  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_race(self) -> Any:
        """
        Three identities claim one route at once from three instances:
        exactly one wins, every time, and the losers are told who won.
        """
        stores = yield defer.gatherResults([self.started(i) for i in ("a", "b", "c")])
        identities = ["alice", "bob", "carol"]
        wins = dict.fromkeys(identities, 0)
        for n in range(self.rounds):
            route = Route.name(f"r{n}.race.example.org")
            order = n % 3
            racers = [(stores[(i + order) % 3], identities[(i + order) % 3]) for i in range(3)]
            results = yield defer.DeferredList(
                [store.claim(route, identity) for store, identity in racers], consumeErrors=True
            )
            winners = [identity for (ok, _), (_, identity) in zip(results, racers) if ok]
            self.assertEqual(len(winners), 1, f"round {n}: {results}")  # type: ignore[attr-defined]
            for (ok, result), _ in zip(results, racers):
                if not ok:
                    result.trap(RouteTaken)
                    self.assertEqual(result.value.holders, {winners[0]})  # type: ignore[attr-defined]
            holders = yield stores[0].holders(route)
            self.assertEqual({h.identity for h in holders}, {winners[0]})  # type: ignore[attr-defined]
            wins[winners[0]] += 1
        self.raceWins = wins
        self.assertEqual(sum(wins.values()), self.rounds)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_deadInstanceExpires(self) -> Any:
        """
        An instance that dies (no revoke, no renewal) loses its registration
        and its routes when its lease expires, within the TTL (plus the
        store's expiry granularity); a live instance keeps its lease
        renewed over the same time.
        """
        a = yield self.started("a")
        b = yield self.started("b")
        yield a.claim(WEB, "alice")
        yield b.claim(SSH, "bob")
        yield b.crash()
        self.assertEqual((yield a.holders(SSH)), {Holder(SSH, "b", "bob")})  # type: ignore[attr-defined]
        began = self.now()
        yield self.eventually(lambda: a.holders(SSH).addCallback(lambda h: not h), within=self.ttl + 2)
        self.expiredAfter = self.now() - began
        self.assertGreater(self.expiredAfter, self.ttl * 2 / 3 - 0.01)  # type: ignore[attr-defined]
        self.assertEqual(set((yield a.instances())), {"a"})  # type: ignore[attr-defined]
        self.assertEqual((yield a.holders(WEB)), {Holder(WEB, "a", "alice")})  # type: ignore[attr-defined]
        yield a.claim(SSH, "carol")

    @defer.inlineCallbacks
    def test_cleanStop(self) -> Any:
        """
        A clean stop removes the instance and its routes at once.
        """
        a = yield self.started("a")
        b = yield self.started("b")
        yield b.claim(SSH, "bob")
        yield b.claim(PORT_2222, "bob")
        yield b.stop()
        self.assertEqual(set((yield a.instances())), {"a"})  # type: ignore[attr-defined]
        self.assertEqual((yield a.holders(SSH)), frozenset())  # type: ignore[attr-defined]
        self.assertEqual((yield a.holders(PORT_2222)), frozenset())  # type: ignore[attr-defined]
        self.assertEqual(b.held(), {})  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_watch(self) -> Any:
        """
        A watch first delivers the state as it is, then every change: a
        claim, a release, an instance that starts, and one that stops (with
        its routes).  Its view answers what it saw.
        """
        a = yield self.started("a", "10.0.0.1:7443")
        yield a.claim(SSH, "alice")
        w, events = yield self.watching(a)
        self.assertEqual(events, [InstanceUp(Instance("a", "10.0.0.1:7443")), HolderAdded(Holder(SSH, "a", "alice"))])  # type: ignore[attr-defined]
        del events[:]
        yield a.claim(PORT_2222, "alice")
        yield self.eventually(lambda: bool(events))
        self.assertEqual(events, [HolderAdded(Holder(PORT_2222, "a", "alice"))])  # type: ignore[attr-defined]
        self.assertEqual(w.routes(PORT), {PORT_2222})  # type: ignore[attr-defined]
        self.assertEqual(w.routes(NAME), {SSH})  # type: ignore[attr-defined]
        del events[:]
        yield a.release(SSH)
        yield self.eventually(lambda: bool(events))
        self.assertEqual(events, [HolderRemoved(Holder(SSH, "a", "alice"))])  # type: ignore[attr-defined]
        del events[:]
        b = yield self.started("b", "10.0.0.2:7443")
        yield b.claim(PORT_2222, "alice")
        yield self.eventually(lambda: len(events) == 2)
        self.assertEqual(events, [InstanceUp(Instance("b", "10.0.0.2:7443")), HolderAdded(Holder(PORT_2222, "b", "alice"))])  # type: ignore[attr-defined]
        self.assertEqual(w.holders(PORT_2222), {Holder(PORT_2222, "a", "alice"), Holder(PORT_2222, "b", "alice")})  # type: ignore[attr-defined]
        del events[:]
        yield b.stop()
        yield self.eventually(lambda: len(events) == 2)
        self.assertEqual(  # type: ignore[attr-defined]
            set(events), {InstanceDown(Instance("b", "10.0.0.2:7443")), HolderRemoved(Holder(PORT_2222, "b", "alice"))}
        )
        self.assertEqual(w.instances(), {"a": Instance("a", "10.0.0.1:7443")})  # type: ignore[attr-defined]
        self.assertEqual(w.holders(PORT_2222), {Holder(PORT_2222, "a", "alice")})  # type: ignore[attr-defined]
        yield w.stop()
        del events[:]
        yield a.claim(WEB, "alice")
        yield a.holders(WEB)
        self.assertEqual(events, [])  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_unavailable(self) -> Any:
        """
        While the store is unavailable every call fails with
        L{StoreUnavailable} and nothing is claimed; the renewal loop logs
        it once and keeps trying.  When the store is back, the instance
        still holds what it held, a release made meanwhile is done, new
        claims work, and the watch delivers changes again.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        a = yield self.started("a")
        yield a.claim(SSH, "alice")
        yield a.claim(PORT_2222, "alice")
        w, events = yield self.watching(a)
        yield self.makeUnavailable()
        yield self.assertFailure(a.claim(WEB, "alice"), StoreUnavailable)  # type: ignore[attr-defined]
        yield self.assertFailure(a.holders(SSH), StoreUnavailable)  # type: ignore[attr-defined]
        yield self.assertFailure(a.instances(), StoreUnavailable)  # type: ignore[attr-defined]
        yield self.assertFailure(a.release(PORT_2222), StoreUnavailable)  # type: ignore[attr-defined]
        self.assertEqual(a.held(), {SSH: "alice"})  # type: ignore[attr-defined]
        yield self.eventually(lambda: a._failures >= 2, within=self.ttl * 2)
        self.assertEqual(len(clusterLog(observer, "warn", "unavailable")), 1)  # type: ignore[attr-defined]
        self.assertEqual(w.holders(SSH), {Holder(SSH, "a", "alice")})  # type: ignore[attr-defined]
        yield self.makeAvailable()
        yield self.eventually(lambda: a._failures == 0, within=self.ttl * 2)
        self.assertEqual(len(clusterLog(observer, "info", "answers again")), 1)  # type: ignore[attr-defined]
        yield self.eventually(lambda: a.holders(PORT_2222).addCallback(lambda h: not h), within=self.ttl * 2)
        self.assertEqual((yield a.holders(SSH)), {Holder(SSH, "a", "alice")})  # type: ignore[attr-defined]
        self.assertEqual(set((yield a.instances())), {"a"})  # type: ignore[attr-defined]
        yield a.claim(WEB, "alice")
        yield self.eventually(lambda: HolderAdded(Holder(WEB, "a", "alice")) in events, within=10)
        self.assertEqual(w.holders(PORT_2222), frozenset())  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_lostLeaseClaimedAgain(self) -> Any:
        """
        If the lease ends anyway (expired while the store was unreachable),
        the next renewal gets a new one, registers the instance again and
        claims again what it held.
        """
        a = yield self.started("a")
        b = yield self.started("b")
        yield a.claim(SSH, "alice")
        old = a.lease
        yield self.revokeLease(a)
        self.assertEqual((yield b.holders(SSH)), frozenset())  # type: ignore[attr-defined]
        yield self.eventually(lambda: b.holders(SSH).addCallback(bool), within=self.ttl)
        self.assertNotEqual(a.lease, old)  # type: ignore[attr-defined]
        self.assertEqual((yield b.holders(SSH)), {Holder(SSH, "a", "alice")})  # type: ignore[attr-defined]
        self.assertEqual(set((yield b.instances())), {"a", "b"})  # type: ignore[attr-defined]
        self.assertEqual(a.held(), {SSH: "alice"})  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_lostLeaseTakenMeanwhile(self) -> Any:
        """
        A route another identity claimed while this instance's lease was
        lost is not taken back: it is dropped from what this instance
        holds and reported to the loss observers.  Routes nobody took are
        claimed again.  Two identities never hold it at once.
        """
        a = yield self.started("a")
        b = yield self.started("b")
        losses: list[tuple[RouteTaken, str]] = []
        a.observeLoss(lambda taken, identity: losses.append((taken, identity)))
        yield a.claim(SSH, "alice")
        yield a.claim(WEB, "alice")
        # Hold a's renewal back while its lease is lost and bob claims.
        yield a._lock.acquire()
        try:
            yield self.revokeLease(a)
            yield b.claim(SSH, "bob")
        finally:
            a._lock.release()
        yield self.eventually(lambda: bool(losses), within=self.ttl)
        [(taken, identity)] = losses
        self.assertEqual((taken.route, taken.holders, identity), (SSH, frozenset({"bob"}), "alice"))  # type: ignore[attr-defined]
        self.assertEqual(a.held(), {WEB: "alice"})  # type: ignore[attr-defined]
        self.assertEqual((yield b.holders(SSH)), {Holder(SSH, "b", "bob")})  # type: ignore[attr-defined]
        yield self.eventually(lambda: b.holders(WEB).addCallback(bool), within=self.ttl)
        self.assertEqual((yield b.holders(WEB)), {Holder(WEB, "a", "alice")})  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_claimAfterLeaseGone(self) -> Any:
        """
        A claim that finds the lease gone gets a new lease (registering the
        instance again) and succeeds.
        """
        a = yield self.started("a")
        yield a._lock.acquire()
        try:
            yield self.revokeLease(a)
            self.assertEqual((yield a.instances()), {})  # type: ignore[attr-defined]
        finally:
            a._lock.release()
        yield a.claim(SSH, "alice")
        self.assertEqual((yield a.holders(SSH)), {Holder(SSH, "a", "alice")})  # type: ignore[attr-defined]
        self.assertEqual(set((yield a.instances())), {"a"})  # type: ignore[attr-defined]


class MemoryRoutingStoreTests(RoutingStoreContract, TestCase):
    """
    The conformance suite against L{MemoryRoutingStore} on a L{Clock}.
    """

    ttl = 10
    rounds = 300

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.backend = MemoryBackend(self.clock)

    def makeStore(self, instance: str, advertise: str) -> MemoryRoutingStore:
        return MemoryRoutingStore(self.clock, instance, advertise, ttl=self.ttl, backend=self.backend)

    def now(self) -> float:
        return self.clock.seconds()

    @defer.inlineCallbacks
    def eventually(self, check: Callable[[], Any], within: float = 5, step: float = 0.1) -> Any:
        began = self.clock.seconds()
        while not (yield defer.maybeDeferred(check)):
            if self.clock.seconds() - began > within:
                raise AssertionError(f"not true within {within} s (clock)")
            self.clock.advance(step)

    def revokeLease(self, store: MemoryRoutingStore) -> None:
        self.backend.revoke(store.lease)  # type: ignore[arg-type]

    def makeUnavailable(self) -> None:
        self.backend.available = False

    def makeAvailable(self) -> None:
        self.backend.available = True

    @defer.inlineCallbacks
    def test_expiryExact(self) -> Any:
        """
        On the clock, a dead instance's keys last exactly the TTL after its
        last renewal.
        """
        a = yield self.started("a")
        b = yield self.started("b")
        yield b.claim(SSH, "bob")
        self.clock.advance(self.ttl / 3)
        yield b.crash()
        self.clock.advance(self.ttl - 0.001)
        self.assertEqual((yield a.holders(SSH)), {Holder(SSH, "b", "bob")})
        self.clock.advance(0.001)
        self.assertEqual((yield a.holders(SSH)), frozenset())

    def test_defaultBackend(self) -> None:
        """
        A store made without a backend has its own: the single instance of
        the default configuration.
        """
        store = MemoryRoutingStore(self.clock)
        self.successResultOf(store.start())
        self.successResultOf(store.claim(SSH, "alice"))
        self.assertEqual(self.successResultOf(store.holders(SSH)), {Holder(SSH, "local", "alice")})
        self.successResultOf(store.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class EtcdRoutingStoreTests(RoutingStoreContract, TestCase):
    """
    The conformance suite against L{EtcdRoutingStore} and a real etcd
    (one per test: it starts in about 0.1 s).
    """

    ttl = 2
    rounds = 60
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.etcd = yield EtcdServer.start(self)

    def makeStore(self, instance: str, advertise: str) -> EtcdRoutingStore:
        return EtcdRoutingStore(reactor, [self.etcd.url], instance, advertise, ttl=self.ttl, prefix="/tp-test/", timeout=2)

    def now(self) -> float:
        return reactor.seconds()  # type: ignore[attr-defined,no-any-return]

    @defer.inlineCallbacks
    def eventually(self, check: Callable[[], Any], within: float = 5, step: float = 0.05) -> Any:
        began = reactor.seconds()  # type: ignore[attr-defined]
        while True:
            try:
                done = yield defer.maybeDeferred(check)
            except StoreUnavailable:
                done = False
            if done:
                return
            if reactor.seconds() - began > within:  # type: ignore[attr-defined]
                raise AssertionError(f"not true within {within} s")
            yield task.deferLater(reactor, step, lambda: None)

    @defer.inlineCallbacks
    def raw(self, path: str, body: dict[str, Any]) -> Any:
        import treq

        response = yield treq.post(f"{self.etcd.url}/v3/{path}", data=json.dumps(body).encode(), persistent=False)
        answer = yield response.json()
        return answer

    @defer.inlineCallbacks
    def revokeLease(self, store: EtcdRoutingStore) -> Any:
        answer = yield self.raw("lease/revoke", {"ID": str(store.lease)})
        self.assertNotIn("error", answer)

    def makeUnavailable(self) -> Any:
        return self.etcd.stop()

    def makeAvailable(self) -> Any:
        return self.etcd.run()

    @defer.inlineCallbacks
    def test_keyLayout(self) -> Any:
        """
        The keys and values in etcd are those docs/cluster.md describes,
        each bound to its instance's lease.
        """
        a = yield self.started("a", "10.0.0.1:7443")
        yield a.claim(SSH, "alice")
        yield a.claim(PORT_2222, "alice")
        answer = yield self.raw("kv/range", {"key": _b64(b"/tp-test/"), "range_end": _b64(b"/tp-test0")})
        import base64

        found = {base64.b64decode(kv["key"]): (base64.b64decode(kv["value"]), int(kv["lease"])) for kv in answer["kvs"]}
        self.assertEqual(found, {
            b"/tp-test/instances/a": (b'{"advertise": "10.0.0.1:7443"}', a.lease),
            b"/tp-test/routes/name/ssh.laptop.example.org/a": (b"alice", a.lease),
            b"/tp-test/routes/port/2222/a": (b"alice", a.lease),
        })

    @defer.inlineCallbacks
    def test_watchAcrossRestart(self) -> Any:
        """
        A watch whose stream breaks (etcd restarted) reconnects from the
        revision after the last it saw: a change made while it was away is
        delivered, once.
        """
        a = yield self.started("a")
        b = yield self.started("b")
        w, events = yield self.watching(a)
        yield b.claim(SSH, "bob")
        yield self.eventually(lambda: HolderAdded(Holder(SSH, "b", "bob")) in events)
        yield self.etcd.stop()
        yield self.etcd.run()
        yield b.release(SSH)
        yield self.eventually(lambda: HolderRemoved(Holder(SSH, "b", "bob")) in events, within=10)
        yield b.claim(WEB, "bob")
        yield self.eventually(lambda: HolderAdded(Holder(WEB, "b", "bob")) in events, within=10)
        self.assertEqual(events.count(HolderAdded(Holder(SSH, "b", "bob"))), 1)

    @defer.inlineCallbacks
    def test_watchAfterCompaction(self) -> Any:
        """
        A watch whose next revision etcd compacted away while its stream was
        down reads a new snapshot and delivers the difference.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        a = yield self.started("a")
        b = yield self.started("b")
        yield b.claim(SSH, "bob")
        w, events = yield self.watching(a)
        del events[:]
        # Break the stream (it reconnects after 0.5 s) and, meanwhile,
        # change the state and compact the history.
        w._stream.stop()
        yield b.release(SSH)
        yield b.claim(WEB, "bob")
        answer = yield self.raw("kv/range", {"key": _b64(b"/"), "limit": "1"})
        compacted = yield self.raw("kv/compaction", {"revision": answer["header"]["revision"], "physical": True})
        self.assertNotIn("error", compacted)
        yield self.eventually(lambda: len(events) == 2, within=10)
        self.assertEqual(events, [HolderRemoved(Holder(SSH, "b", "bob")), HolderAdded(Holder(WEB, "b", "bob"))])
        self.assertEqual(w.holders(WEB), {Holder(WEB, "b", "bob")})
        self.assertEqual(len(clusterLog(observer, "warn", "lost its stream")), 1)
        yield b.claim(PORT_2222, "bob")
        yield self.eventually(lambda: HolderAdded(Holder(PORT_2222, "b", "bob")) in events, within=10)

    @defer.inlineCallbacks
    def test_secondEndpoint(self) -> Any:
        """
        An endpoint that refuses connections is skipped for the next one.
        """
        from tpproxy.cluster.testing import _freePorts

        [dead] = _freePorts(1)
        a = EtcdRoutingStore(reactor, [f"http://127.0.0.1:{dead}", self.etcd.url], "a", "x:1", ttl=self.ttl, prefix="/tp-test/")
        self.addCleanup(a.stop)
        yield a.start()
        yield a.claim(SSH, "alice")
        self.assertEqual((yield a.holders(SSH)), {Holder(SSH, "a", "alice")})

    @defer.inlineCallbacks
    def test_stalledEtcd(self) -> Any:
        """
        An etcd that accepts but does not answer (stopped with SIGSTOP, as
        behind a black hole) makes calls fail with L{StoreUnavailable}
        after the request timeout (or two: a renewal under way first), not
        hang; when it answers again, so do
        the calls.
        """
        import os
        import signal

        a = yield self.started("a")
        pid = self.etcd.process.pid
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)
        began = reactor.seconds()  # type: ignore[attr-defined]
        failure = yield self.assertFailure(a.claim(SSH, "alice"), StoreUnavailable)
        # At most two timeouts: a renewal under way holds the lock for one.
        self.assertLess(reactor.seconds() - began, 2 * 2 + 1)  # type: ignore[attr-defined]
        self.assertIn("TimeoutError", str(failure))
        self.assertEqual(a.held(), {})
        os.kill(pid, signal.SIGCONT)
        yield self.eventually(lambda: a.claim(SSH, "alice").addCallback(lambda _: True), within=10)
        self.assertEqual((yield a.holders(SSH)), {Holder(SSH, "a", "alice")})

    def test_startTime(self) -> None:
        """
        etcd starts (answers) within 2 s (measured: about 0.1 s idle).
        """
        self.assertLess(self.etcd.startSeconds, 2)


class UnreachableEtcdTests(TestCase):
    """
    The etcd store with no etcd at all.
    """

    @defer.inlineCallbacks
    def test_startFails(self) -> Any:
        """
        Starting without any etcd fails with L{StoreUnavailable}, and
        nothing is left running.
        """
        from tpproxy.cluster.testing import _freePorts

        ports = _freePorts(2)
        store = EtcdRoutingStore(reactor, [f"http://127.0.0.1:{p}" for p in ports], "a", "x:1", ttl=2)
        failure = yield self.assertFailure(store.start(), StoreUnavailable)
        self.assertIn("no etcd endpoint accepts connections", str(failure))
        yield store.stop()


class ValuesTests(SynchronousTestCase):
    """
    Routes, instance ids, identities and keys are checked.
    """

    def test_routes(self) -> None:
        self.assertEqual(Route.name("SSH.Example.org."), Route(NAME, "ssh.example.org"))
        self.assertEqual(Route.port(443), Route(PORT, "443"))
        for bad in ("a_b.example", "*.example.org", "", "a/b", "1.2.3.4"):
            self.assertRaises(ValueError, Route.name, bad)
        for badPort in (0, 65536, -1, True, "22"):
            self.assertRaises(ValueError, Route.port, badPort)
        self.assertRaises(ValueError, Route.parse, "port", "022")
        self.assertRaises(ValueError, Route.parse, "name", "SSH.example.org")
        self.assertEqual(Route.parse("port", "22"), Route.port(22))

    def test_instanceAndIdentity(self) -> None:
        clock = task.Clock()
        for bad in ("", "a/b", "-a", "x" * 64, "é"):
            self.assertRaises(ValueError, MemoryRoutingStore, clock, bad)
        for badTTL in (0, 1.5, True):
            self.assertRaises(ValueError, MemoryRoutingStore, clock, "a", "", badTTL)
        store = MemoryRoutingStore(clock)
        self.assertRaises(ValueError, store.claim, SSH, "")
        self.assertRaises(ValueError, store.claim, SSH, "a\nb")

    def test_keys(self) -> None:
        keys = Keys("/tp/")
        self.assertEqual(keys.holder(SSH, "a"), b"/tp/routes/name/ssh.laptop.example.org/a")
        self.assertEqual(keys.parse(b"/tp/routes/port/22/b", b"bob"), Holder(Route.port(22), "b", "bob"))
        self.assertEqual(keys.parse(b"/tp/instances/a", b'{"advertise": "h:1"}'), Instance("a", "h:1"))
        self.assertEqual(keys.parse(b"/tp/instances/a", None), ("instance", "a"))
        self.assertIsNone(keys.parse(b"/tp/routes/name/bad_name/a", b"x"))
        self.assertIsNone(keys.parse(b"/tp/instances/a", b"not json"))
        for bad in ("tp/", "/tp", "/tp//"):
            self.assertRaises(ValueError, Keys, bad)

    def test_viewReplace(self) -> None:
        """
        A view turned into a new state says what changed, removals first.
        """
        view = RoutingView()
        a, b = Instance("a", "h:1"), Instance("b", "h:2")
        view.replace({"a": a}, {Holder(SSH, "a", "alice")})
        events = view.replace({"b": b}, {Holder(SSH, "b", "alice")})
        self.assertEqual(events, [
            HolderRemoved(Holder(SSH, "a", "alice")), InstanceDown(a), InstanceUp(b), HolderAdded(Holder(SSH, "b", "alice")),
        ])
        self.assertEqual(view.replace({"b": b}, {Holder(SSH, "b", "alice")}), [])
