"""
Several TP instances as one service (issue 13): the registry claiming its
routes in the routing store shared by the instances, and (below) real
instances on 127.0.0.1, 127.0.0.2 and 127.0.0.3 with a real etcd.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from tpproxy.cluster.memory import MemoryBackend, MemoryRoutingStore
from tpproxy.cluster.store import Holder, Route, StoreUnavailable
from tpproxy.cluster.testing import EtcdServer, _freePorts
from tpproxy.reverse.registry import TAG_LENGTH, Registry, ReverseError, instanceTag
from tpproxy.service import certificateSource, makeServerTLS
from tpproxy.test.support import (
    Background,
    Echo,
    HashSink,
    echoThrough,
    freePort,
    listenLocal,
    run,
    scrapeMetrics,
    tpCommand,
    twistCommand,
    waitForPort,
)
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


class RecordingDialer:
    """
    A dialer waiting in a registry session: how it ended.
    """

    def __init__(self) -> None:
        self.failed: list[tuple[ErrorCode, str]] = []

    def sessionJoined(self, acceptEnd: Any) -> None:
        raise AssertionError("not joined in these tests")

    def sessionFailed(self, code: ErrorCode, message: str) -> None:
        self.failed.append((code, message))


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
        first = RecordingControl()
        exposure = yield a.expose(first, "alice", "e2e", name="svc.localhost")
        self.assertEqual(self.holders(route), {Holder(route, "a", "alice")})
        e = yield self.assertFailure(b.expose(RecordingControl(), "bob", "e2e", name="svc.localhost"), ReverseError)
        self.assertEqual((e.code, e.message), (ErrorCode.NAME_TAKEN, "E2E name svc.localhost is held by another identity"))
        self.assertIsNone(b.nameExposure("svc.localhost"))
        pooled = yield b.expose(RecordingControl(), "alice", "e2e", name="svc.localhost")
        self.assertEqual(self.holders(route), {Holder(route, "a", "alice"), Holder(route, "b", "alice")})
        # A takeover by alice's new session of the same member at A keeps
        # the claim and the exposure.
        second = RecordingControl()
        again = yield a.expose(second, "alice", "e2e", name="svc.localhost")
        self.assertIs(again, exposure)
        self.assertEqual(first.closed, ["E2E name svc.localhost was taken over by a new session of alice"])
        self.assertEqual(self.holders(route), {Holder(route, "a", "alice"), Holder(route, "b", "alice")})
        a.leave(exposure, first)  # the old session's connection ends: nothing changes
        self.assertEqual([m.control for m in exposure.members], [second])
        self.assertEqual(self.holders(route), {Holder(route, "a", "alice"), Holder(route, "b", "alice")})
        # Another member of alice's joins the pool at A; the route is
        # released when the last member leaves.
        third = RecordingControl()
        joined = yield a.expose(third, "alice", "e2e", name="svc.localhost", member="other")
        self.assertEqual(([m.control for m in joined.members], third.closed, second.closed), ([second, third], [], []))
        a.leave(exposure, second)
        self.assertEqual(self.holders(route), {Holder(route, "a", "alice"), Holder(route, "b", "alice")})
        a.leave(exposure, third)
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
    def test_sessionIdsNameTheirInstance(self) -> Any:
        """
        Each instance's session ids start with its tag (no other instance
        has it), then 192 random bits: ids differ every time, and each
        registry tells its own ids from the other's.
        """
        a, b = self.registries["a"], self.registries["b"]
        self.assertEqual((a.tag, b.tag), (instanceTag("a"), instanceTag("b")))
        self.assertNotEqual(a.tag, b.tag)
        sids = {}
        for instance, registry in self.registries.items():
            control = RecordingControl()
            exposure = yield registry.expose(control, "alice", "e2e", name=f"svc-{instance}.localhost")
            for _ in range(2):
                registry.incoming(exposure, RecordingDialer(), "bob", "test")
            sids[instance] = [sid for sid, _, _ in control.incoming]
            self.addCleanup(registry.remove, exposure)
        for instance, own in sids.items():
            registry = self.registries[instance]
            other = sids["b" if instance == "a" else "a"]
            self.assertEqual(len(set(own)), 2)
            for sid in own:
                self.assertEqual((len(sid), sid[:TAG_LENGTH]), (TAG_LENGTH + 32, registry.tag))
                self.assertTrue(registry.madeHere(sid))
            self.assertFalse(any(registry.madeHere(sid) for sid in other))

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


class OpenTunnel(protocol.Protocol):
    """
    A TCP connection kept open across a test: each L{roundTrip} sends
    bytes and fires once they came back (an echo behind what is tested).
    """

    def __init__(self) -> None:
        self.received = b""
        self.expected = b""
        self.echoed: defer.Deferred[None] | None = None
        self.lost: defer.Deferred[None] = defer.Deferred()

    def roundTrip(self, data: bytes, timeout: float = 10) -> defer.Deferred[None]:
        self.expected += data
        self.echoed = defer.Deferred()
        self.transport.write(data)  # type: ignore[union-attr]
        return self.echoed.addTimeout(timeout, reactor)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echoed is not None and self.received == self.expected:
            echoed, self.echoed = self.echoed, None
            echoed.callback(None)

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)
        if self.echoed is not None:
            echoed, self.echoed = self.echoed, None
            echoed.errback(AssertionError(f"the tunnel closed: {reason.getErrorMessage()}"))


class PeerMachineTests(TestCase):
    """
    The peer link's two machines obey the rules every session machine
    does (C{tpproxy.test.test_sessions.TableTests}).
    """

    def test_tables(self) -> None:
        from tpproxy.cluster.peer import PeerAccept, PeerDial
        from tpproxy.machine import IllegalTransition
        from tpproxy.protocols.sessions import PeerSession

        for cls in (PeerSession, PeerDial, PeerAccept):
            table = cls.TRANSITIONS
            states = {state for state, _ in table} | {to for to, _ in table.values()}
            self.assertEqual(states, set(type(next(iter(table))[0])), cls.__name__)
            for state in states:
                for name in cls.inputs():
                    if (state, name) in table:
                        continue
                    machine = cls.__new__(cls)
                    machine.state = state
                    self.assertRaises(IllegalTransition, machine._input, name)
            for (state, name), (to, output) in table.items():
                if output is not None:
                    self.assertTrue(callable(getattr(cls, output, None)), f"{cls.__name__}.{output}")
                if state.value == "closed":
                    self.assertEqual(to, state, f"{cls.__name__} {name}")
            self.assertIn("lost", cls.inputs())


class PeerSessionTests(TestCase):
    @defer.inlineCallbacks
    def test_noDelay(self) -> Any:
        """
        The holder's end of a peer link turns Nagle's algorithm off, as
        every relay end does: its answer must not wait for a delayed ACK.
        """
        from tpproxy.protocols.sessions import PeerSession

        class Link:
            def __init__(self) -> None:
                self.reactor = reactor
                self.registry = None

        made: defer.Deferred[Any] = defer.Deferred()
        lost: defer.Deferred[None] = defer.Deferred()

        class Recording(PeerSession):
            def connectionMade(self) -> None:
                super().connectionMade()
                made.callback(self.transport.getTcpNoDelay())  # type: ignore[union-attr]

            def connectionLost(self, reason: Any) -> None:
                super().connectionLost(reason)
                lost.callback(None)

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: Recording(Link(), 10)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), protocol.Protocol())
        noDelay = yield made
        client.transport.loseConnection()
        yield lost
        self.assertTrue(noDelay)


class PeerDialDeadlineTests(TestCase):
    @defer.inlineCallbacks
    def test_silentHolder(self) -> Any:
        """
        A holder that accepts the peer link's connection and never answers
        is given up on after the accept and connect timeouts: the dialer
        fails with C{unreachable} saying so, and the link is closed (it
        used to stay open after its dialer was gone; found in review).
        """
        from tpproxy.cluster.peer import PeerDial, PeerLinks

        pki = TestPKI.create(self.mktemp())
        config = pki.serverConfig(REVERSE_RULES, **reverseTables(pki, acceptTimeout=0.5))
        store = MemoryRoutingStore(reactor, "a", "127.0.0.1:7443", ttl=3, backend=MemoryBackend(reactor))
        store.start()
        self.addCleanup(store.stop)
        serverTLS = makeServerTLS(config)
        registry = Registry(reactor, config.policy, serverTLS, certificateSource(config, reactor), "127.0.0.1", acceptTimeout=5, store=store)
        links = PeerLinks(reactor, store, registry, serverTLS, connectTimeout=0.5)
        registry.acceptTimeout = 0.5
        silent = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        exposure = yield registry.expose(RecordingControl(), "alice", "e2e", name="svc.localhost")
        self.addCleanup(registry.remove, exposure)
        dialer = RecordingDialer()
        registry.acceptTimeout = 30  # the dialer waits longer than the link
        sid = registry.incoming(exposure, dialer, "bob", "192.0.2.1:1")
        registry.acceptTimeout = 0.5
        link = PeerDial(links, sid, exposure, {"op": "peer-dial", "name": "svc.localhost"}, "tp-silent")
        links._open(link, "127.0.0.1", silent.getHost().port)
        started = reactor.seconds()
        while not dialer.failed:
            yield deferLater(reactor, 0.05, lambda: None)
            self.assertLess(reactor.seconds() - started, 10)
        [(code, message)] = dialer.failed
        self.assertEqual(code, ErrorCode.UNREACHABLE)
        self.assertIn("instance tp-silent did not answer within 1 s", message)
        while link.transport is not None and link.transport.connected:
            yield deferLater(reactor, 0.05, lambda: None)
            self.assertLess(reactor.seconds() - started, 10)
        self.assertIn("tp-silent", links.suspects)


class PeerListenerGateTests(TestCase):
    @defer.inlineCallbacks
    def test_halfOpenCapped(self) -> Any:
        """
        The peer listener takes the server's half-open gate: a silent
        connection from one source beyond its per-source cap gets no
        protocol (closed at accept here, as no place to hold it is
        allowed), as on TP's own port (docs/hardening.md).
        """
        from twisted.logger import Logger

        from tpproxy.cluster.peer import ClusterService
        from tpproxy.limits import HalfOpenCounter, HalfOpenGate

        accepted: list[protocol.Protocol] = []

        class Silent(protocol.Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)

        class Links:
            def __init__(self) -> None:
                self.reactor = reactor
                self.me = "a"
                self.store = type("S", (), {"instance": type("I", (), {"advertise": "127.0.0.1:0"})()})()

            def listenerFactory(self) -> protocol.Factory:
                return protocol.Factory.forProtocol(Silent)

            def start(self) -> Any:
                return defer.succeed(None)

            def stop(self) -> Any:
                return defer.succeed(None)

        gates: list[HalfOpenGate] = []

        def gate(factory: Any) -> HalfOpenGate:
            gates.append(HalfOpenGate(factory, HalfOpenCounter(100, 2), reactor, Logger(), holdFor=30))
            return gates[-1]

        port = freePort()
        svc = ClusterService(Links(), f"tcp:{port}:interface=127.0.0.1", gate)  # type: ignore[arg-type]
        svc.startService()
        yield svc.starting
        self.addCleanup(svc.stopService)
        clients = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
            self.addCleanup(s.close)
            clients.append(s)
        for _ in range(200):
            if gates and gates[0].refused == 1:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual((len(accepted), gates[0].refused), (2, 1))


def logged(process: Background, marker: bytes, times: int = 1, timeout: float = 30) -> defer.Deferred[None]:
    """
    Fires once C{process} has written C{marker} to its stderr C{times}
    times in all.
    """
    done: defer.Deferred[None] = defer.Deferred()
    before = process.proto.onStderr

    def seen(err: bytes) -> None:
        if before is not None:
            before(err)
        if not done.called and err.count(marker) >= times:
            process.proto.onStderr = before
            done.callback(None)

    process.proto.onStderr = seen
    seen(process.stderr)

    def timedOut(f: Any) -> Any:
        f.trap(defer.TimeoutError)
        ended = "it exited" if process.proto.done.called else "it still runs"
        raise AssertionError(
            f"{process.stderr.count(marker)} of {times} {marker!r} on stderr within {timeout:g} s ({ended}); "
            f"its stderr ends:\n{process.stderr[-4000:].decode(errors='replace')}"
        )

    return done.addTimeout(timeout, reactor).addErrback(timedOut)


class ThreeInstances:
    """
    Three C{twist tp} processes on 127.0.0.1 (A), 127.0.0.2 (B) and
    127.0.0.3 (C), on the same port (as behind an anycast address), sharing
    a real etcd; mixed into a L{TestCase}.  C{alice} and C{bob} may expose
    C{*.localhost} and public ports and dial each other's names;
    C{mallory} may connect but not dial.
    """

    timeout = 180
    TTL = 2

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.pki = TestPKI.create(self.mktemp())
        for name in ("alice", "bob", "mallory"):
            self.pki.client(name)
        # One certificate for the service, valid for each instance's address.
        self.pki.ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1", "127.0.0.2", "127.0.0.3"), server=True).write(
            self.pki.directory / "server.pem", self.pki.directory / "server.key"
        )
        self.etcd = yield EtcdServer.start(self)
        self.port = freePort()
        self.peerPort = freePort()
        self.adminPort = freePort()
        self.servers: dict[int, Background] = {}
        for i in (1, 2, 3):
            self.startInstance(i)
        for i in (1, 2, 3):
            # Three processes start at once on a busy 2-core machine.
            yield self.servers[i].waitForStderr(b"Peer links on", timeout=60)
            yield self.waitForListener(i)

    def startInstance(self, i: int) -> Background:
        d = self.pki.directory
        path = d / f"tp-{i}.toml"
        path.write_text(f"""
[server]
listen = "tcp:{self.port}:interface=127.0.0.{i}"
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"
state_dir = "state-{i}"

[[rules]]
identities = "*"
hosts = ["127.0.0.0/8", "*.localhost"]
ports = "*"

[[exposures]]
identities = ["alice", "bob"]
public_ports = "1024-65535"
names = "*.localhost"
dialers = ["alice", "bob"]

[reverse]
public_interface = "127.0.0.{i}"

[e2e]
ca_certificate = "ca.pem"
ca_key = "ca.key"

[cluster]
etcd = ["{self.etcd.url}"]
instance = "tp-{i}"
advertise = "127.0.0.{i}:{self.peerPort}"
peer_listen = "tcp:{self.peerPort}:interface=127.0.0.{i}"
lease_ttl = {self.TTL}

[admin]
listen = "tcp:{self.adminPort}:interface=127.0.0.{i}"
""")
        for name in ("alice", "bob", "mallory"):
            (d / f"{name}-{i}.toml").write_text(
                f'server = "127.0.0.{i}:{self.port}"\ncert = "{d / name}.pem"\nkey = "{d / name}.key"\nca = "{self.pki.caPath}"\n'
            )
        server = Background(self, twistCommand() + ["--log-format=text", "--log-file=+", "tp", "--config", str(path)])
        self.servers[i] = server
        return server

    def metricsOf(self, i: int) -> Any:
        """
        Instance C{i}'s C{/metrics}, as C{{(name, ((label, value), ...)): value}}.
        """
        return scrapeMetrics(f"http://127.0.0.{i}:{self.adminPort}/metrics")

    @defer.inlineCallbacks
    def statusOf(self, i: int) -> Any:
        """
        Instance C{i}'s C{/status} document.
        """
        import treq
        from twisted.web.client import HTTPConnectionPool

        response = yield treq.get(f"http://127.0.0.{i}:{self.adminPort}/status", pool=HTTPConnectionPool(reactor, persistent=False))
        return (yield response.json())

    def waitForListener(self, i: int) -> Any:
        return waitForPort(self.port, host=f"127.0.0.{i}")

    def client(self, name: str, i: int) -> str:
        return str(self.pki.directory / f"{name}-{i}.toml")

    @defer.inlineCallbacks
    def expose(self, local: int, *mode: str, identity: str = "alice", at: int = 1) -> Any:
        exposer = Background(self, tpCommand() + ["--config", self.client(identity, at), "expose", f"127.0.0.1:{local}", *mode])
        line = yield exposer.waitForStderr(b"; Ctrl-C stops")
        match = re.search(rb"as public port (\d+)", line)
        exposer.publicPort = int(match.group(1)) if match else None  # type: ignore[attr-defined]
        return exposer



class ThreeInstancesTests(ThreeInstances, TestCase):
    """
    What an exposer registers at A is reached through B and C over peer
    links.
    """

    @defer.inlineCallbacks
    def test_e2eThroughOtherInstances(self) -> Any:
        """
        An E2E name exposed at A is dialled through B and C (C{tp connect}
        to 127.0.0.2 and 127.0.0.3): C authorizes the dialer, A checks
        again and asks the exposer, and the bytes echo.  An identity that
        is not among the name's dialers is refused at B.
        """
        echoPort, echo = listenLocal(self, Echo)
        yield self.expose(echoPort, "--e2e", "echo.alice.localhost")
        for i in (2, 3):
            yield self.servers[i].waitForStderr(b"Routing E2E name echo.alice.localhost of alice to instance(s) ['tp-1']")
        payload = os.urandom(64 * 1024)
        for i in (2, 3, 1):
            result = yield run(tpCommand() + ["--config", self.client("bob", i), "connect", "echo.alice.localhost:7"], stdin=payload)
            self.assertEqual((result.status, len(result.out)), (0, len(payload)), result.err + b"\n---B\n" + self.servers[i].stderr[-3000:] + b"\n---A\n" + self.servers[1].stderr[-3000:])
            self.assertEqual(result.out, payload)
        self.assertEqual(echo.accepted, 3)
        # Over QUIC to C: the same peer link behind.
        result = yield run(tpCommand() + ["--config", self.client("bob", 3), "--transport", "quic", "connect", "echo.alice.localhost:7"], stdin=payload)
        self.assertEqual(result.out, payload, result.err)
        self.assertEqual(echo.accepted, 4)
        refused = yield run(tpCommand() + ["--config", self.client("mallory", 2), "connect", "echo.alice.localhost:7"], stdin=b"hi")
        self.assertNotEqual(refused.status, 0)
        self.assertEqual(echo.accepted, 4)

    @defer.inlineCallbacks
    def test_publicPortOnEveryInstance(self) -> Any:
        """
        A public port registered at A answers on B and C, on the same port
        of their own address.
        """
        echoPort, echo = listenLocal(self, Echo)
        exposer = yield self.expose(echoPort, "--public")
        port = exposer.publicPort
        for i in (2, 3):
            yield self.servers[i].waitForStderr(f"Forwarding public port {port} to instance(s) ['tp-1']".encode())
        for i in (1, 2, 3):
            yield echoThrough(f"127.0.0.{i}", port)
        self.assertEqual(echo.accepted, 3)

    @defer.inlineCallbacks
    def test_raceForOneName(self) -> Any:
        """
        alice at A and bob at B register one name at the same moment:
        exactly one gets it, and the other is told it is taken.
        """
        echoPort, echo = listenLocal(self, Echo)
        exposers = {
            who: Background(self, tpCommand() + ["--config", self.client(who, at), "expose", f"127.0.0.1:{echoPort}", "--e2e", "race.localhost"])
            for who, at in (("alice", 1), ("bob", 2))
        }
        outcomes: dict[str, str] = {}

        def outcome(who: str) -> defer.Deferred[None]:
            """
            Fires when C{who}'s exposer says it won or lost the name.
            """
            exposer = exposers[who]
            decided: defer.Deferred[None] = defer.Deferred()
            before = exposer.proto.onStderr

            def seen(err: bytes) -> None:
                before(err)
                if who not in outcomes and (b"; Ctrl-C stops" in err or b"name_taken" in err):
                    outcomes[who] = "won" if b"; Ctrl-C stops" in err else "lost"
                    decided.callback(None)

            exposer.proto.onStderr = seen
            seen(exposer.stderr)
            return decided.addTimeout(30, reactor)

        yield defer.gatherResults([outcome("alice"), outcome("bob")], consumeErrors=True)
        self.assertEqual(sorted(outcomes.values()), ["lost", "won"], outcomes)

    @defer.inlineCallbacks
    def test_killedInstanceRoutesVanish(self) -> Any:
        """
        C{kill -9} A: its routes vanish from B and C within the lease TTL
        (measured), B stops forwarding the port, and a dial through B is
        refused instead of hanging.  A restarted rejoins: its exposer
        registers again and B routes to it.
        """
        echoPort, echo = listenLocal(self, Echo)
        exposer = yield self.expose(echoPort, "--public")
        port = exposer.publicPort
        yield self.expose(echoPort, "--e2e", "gone.alice.localhost")
        for i in (2, 3):
            yield self.servers[i].waitForStderr(b"Routing E2E name gone.alice.localhost")
            yield self.servers[i].waitForStderr(f"Forwarding public port {port}".encode())
        killed = reactor.seconds()
        os.kill(self.servers[1].transport.pid, signal.SIGKILL)
        for i in (2, 3):
            yield self.servers[i].waitForStderr(b"No longer routing E2E name gone.alice.localhost", timeout=self.TTL + 5)
            yield self.servers[i].waitForStderr(f"No longer forwarding public port {port}".encode(), timeout=self.TTL + 5)
        gap = reactor.seconds() - killed
        print(f"\nroutes of a killed instance gone from B and C after {gap:.2f} s (lease TTL {self.TTL} s)")
        self.assertLess(gap, self.TTL + 1)
        result = yield run(tpCommand() + ["--config", self.client("bob", 2), "connect", "gone.alice.localhost:7"], stdin=b"hi")
        self.assertNotEqual(result.status, 0)
        # A restarts and rejoins: the exposer registers there again, and B
        # routes the name to it again.
        restarted = self.startInstance(1)
        yield restarted.waitForStderr(b"Peer links on")
        yield logged(self.servers[2], b"Routing E2E name gone.alice.localhost", times=2, timeout=60)
        result = yield run(tpCommand() + ["--config", self.client("bob", 2), "connect", "gone.alice.localhost:7"], stdin=b"back")
        self.assertEqual(result.out, b"back", result.err)

    def tlsOptions(self, name: str) -> Any:
        from tpproxy.pki import loadCertificates, loadKey
        from tpproxy.transports.tls import clientTLS

        d = self.pki.directory
        return clientTLS("localhost", loadCertificates(str(d / "ca.pem")), loadCertificates(str(d / f"{name}.pem")), loadKey(str(d / f"{name}.key")))

    def acceptAt(self, i: int, session: str, identity: str = "alice") -> Any:
        """
        An exposer's C{accept} of C{session}, over a new TLS connection to
        instance C{i}.
        """
        from tpproxy.protocols.client import ServerAddress, openTunnel
        from tpproxy.wire import ClientHello

        return openTunnel(reactor, ServerAddress(f"127.0.0.{i}", self.port), self.tlsOptions(identity), ClientHello("accept", session=session))

    @defer.inlineCallbacks
    def test_acceptLandsOnAnotherInstance(self) -> Any:
        """
        The TLS fallback: an exposer signals at A, and the network sends its
        C{accept} connections to B.  B sees from the session id that A made
        the session and forwards the accept over a peer link; A claims it
        for the exposer's identity, as for a local accept, and the dial
        works, for a dialer at A and for one at C (dialer -> C -> A -> B ->
        exposer).  The same checks hold across the hop: another identity's
        accept, a forged id (with A's tag or none), a used id, all refused
        with C{bad_session}.
        """
        from tpproxy.protocols.client import Refused, ServerAddress, TLSClientEndpoint
        from tpproxy.protocols.relay import splice
        from tpproxy.reverse.expose import LocalTarget
        from tpproxy.test.test_reverse import ControlClient
        from tpproxy.wire import ClientHello

        echoPort, echo = listenLocal(self, Echo)
        factory = protocol.Factory.forProtocol(lambda: ControlClient(ClientHello("listen", mode="public", port=0)))
        control = yield TLSClientEndpoint(reactor, ServerAddress("127.0.0.1", self.port), self.tlsOptions("alice")).connect(factory)
        self.addCleanup(lambda: control.lost.called or control.transport.abortConnection())
        answer = yield control.answer
        self.assertTrue(answer.ok, answer)
        public = answer.info["port"]
        yield self.servers[3].waitForStderr(f"Forwarding public port {public} to instance(s) ['tp-1']".encode())

        @defer.inlineCallbacks
        def acceptAtB(sid: str) -> Any:
            tunnel = yield self.acceptAt(2, sid)
            local = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", echoPort), LocalTarget())
            splice(tunnel, local, fromA=tunnel.rest, fromB=local.pending)
            tunnel.transport.resumeProducing()
            local.transport.resumeProducing()

        for i, dialled in enumerate((1, 3)):
            dial = echoThrough(f"127.0.0.{dialled}", public)
            incoming = yield control.incoming.get()
            sid = incoming["session"]
            if i == 0:
                tag = sid[:TAG_LENGTH]
                self.assertEqual(tag, instanceTag("tp-1"))
                for forged, who in ((sid, "bob"), (tag + sid[TAG_LENGTH:][::-1], "alice"), (sid[TAG_LENGTH:], "alice")):
                    e = yield self.assertFailure(self.acceptAt(2, forged, who), Refused)
                    self.assertEqual((e.code, e.message.split(" (at")[0]), ("bad_session", "unknown session"), forged)
            yield acceptAtB(sid)
            yield dial
            e = yield self.assertFailure(self.acceptAt(2, sid), Refused)
            self.assertEqual((e.code, e.message), ("bad_session", "session is used (at instance tp-1)"))
        self.assertEqual(echo.accepted, 2)
        self.assertEqual(self.servers[2].stderr.count(b"Forwarding accept of session"), 6)

    @defer.inlineCallbacks
    def test_etcdStoppedAndRestarted(self) -> Any:
        """
        etcd stops mid-test: open tunnels (at A, and through B over a peer
        link) keep echoing, and a new dial through B still reaches A's
        exposer (B routes from what its watch last saw); a new registration
        is refused, saying the routing store cannot be reached.  etcd
        restarts (same data): the lease survived, the watches come back,
        the open tunnels are untouched, and the refused registration goes
        through and is routed through B.
        """
        echoPort, echo = listenLocal(self, Echo)
        exposer = yield self.expose(echoPort, "--public")
        port = exposer.publicPort
        yield self.servers[2].waitForStderr(f"Forwarding public port {port} to instance(s) ['tp-1']".encode())
        tunnels = []
        for i in (1, 2):
            tunnel = OpenTunnel()
            yield connectProtocol(TCP4ClientEndpoint(reactor, f"127.0.0.{i}", port), tunnel)
            self.addCleanup(lambda t=tunnel: t.lost.called or t.transport.abortConnection())
            yield tunnel.roundTrip(b"before " * 1000)
            tunnels.append(tunnel)

        yield self.etcd.stop()
        yield self.servers[1].waitForStderr(b"The routing store is unavailable")
        yield self.servers[2].waitForStderr(b"The routing watch lost its stream")
        for tunnel in tunnels:
            yield tunnel.roundTrip(b"during " * 1000)
        yield echoThrough("127.0.0.2", port, 64 * 1024)
        refused = yield run(tpCommand() + ["--config", self.client("alice", 1), "expose", f"127.0.0.1:{echoPort}", "--e2e", "late.alice.localhost"])
        self.assertNotEqual(refused.status, 0)
        self.assertIn(b"cannot reach its routing store", refused.err)
        self.assertEqual(echo.accepted, 3)
        # Counted: the store is down for A, and renewals went unanswered.
        down = yield self.metricsOf(1)
        self.assertEqual(down[("tp_cluster_store_up", ())], 0)
        self.assertGreater(down[("tp_cluster_store_unavailable_total", ())], 0)

        yield self.etcd.run()
        yield logged(self.servers[1], b"The routing store answers again")
        up = yield self.metricsOf(1)
        self.assertEqual(up[("tp_cluster_store_up", ())], 1)
        yield logged(self.servers[2], b"The routing watch is back")
        for tunnel in tunnels:
            yield tunnel.roundTrip(b"after " * 1000)
        self.assertFalse(any(tunnel.lost.called for tunnel in tunnels))
        # The lease survived the outage (etcd renews every lease on its
        # return): nothing was claimed again, nothing closed.
        self.assertNotIn(b"of instance tp-1 was lost", self.servers[1].stderr)
        self.assertNotIn(b"its route was lost", self.servers[1].stderr)
        yield self.expose(echoPort, "--e2e", "late.alice.localhost")
        yield self.servers[2].waitForStderr(b"Routing E2E name late.alice.localhost of alice to instance(s) ['tp-1']")
        result = yield run(tpCommand() + ["--config", self.client("bob", 2), "connect", "late.alice.localhost:7"], stdin=b"recovered")
        self.assertEqual(result.out, b"recovered", result.err)
        yield echoThrough("127.0.0.2", port, 64 * 1024)
        self.assertEqual(echo.accepted, 5)

    @defer.inlineCallbacks
    def peerDial(self, source: str, serverTLS: Any, hello: dict[str, Any]) -> Any:
        """
        Open a peer link to A from C{source}, presenting C{serverTLS}'s
        certificate and key, send C{hello}, and answer A's ServerHello (or
        C{None} if the link closed without one).
        """
        from twisted.internet.interfaces import IHandshakeListener
        from zope.interface import implementer

        from tpproxy.cluster.peer import PeerTLS
        from tpproxy.transports.tls import TLSFactory
        from tpproxy.wire import FrameDecoder, ServerHello, encodeFrame

        done: defer.Deferred[Any] = defer.Deferred()
        decoder = FrameDecoder()

        @implementer(IHandshakeListener)
        class Link(protocol.Protocol):
            answer = None

            def handshakeCompleted(self) -> None:
                self.transport.write(encodeFrame(hello))  # type: ignore[union-attr]

            echoed = b""

            def dataReceived(self, data: bytes) -> None:
                if self.answer is not None:
                    self.echoed += data
                    if self.echoed == b"ping":
                        self.transport.loseConnection()  # type: ignore[union-attr]
                    return
                obj = decoder.feedFrame(data)
                if obj is not None:
                    self.answer = ServerHello.fromObject(obj)
                    if self.answer.ok:
                        # Spliced to the exposer's service: an echo.
                        self.transport.write(b"ping")  # type: ignore[union-attr]

            def connectionLost(self, reason: Any) -> None:
                if self.answer is not None:
                    self.answer.info["echoed"] = self.echoed
                done.callback(self.answer)

        factory = TLSFactory(PeerTLS(serverTLS), True, protocol.ClientFactory.forProtocol(Link), clock=reactor)
        reactor.connectTCP("127.0.0.1", self.peerPort, factory, bindAddress=(source, 0))
        return (yield done.addTimeout(30, reactor))

    @defer.inlineCallbacks
    def test_peerLinkRefusals(self) -> Any:
        """
        A's peer listener serves only live instances holding TP's key: a
        link from an address no instance advertises, or with another key
        (a client certificate of the same CA), is refused; so is a dial of a
        name A does not hold, or by a dialer the name's rule does not list.
        From B with TP's key, a dial of a held name is accepted.
        """
        from tpproxy.pki import loadCertificates, loadKey

        echoPort, echo = listenLocal(self, Echo)
        yield self.expose(echoPort, "--e2e", "echo.alice.localhost")
        d = self.pki.directory

        class Pair:
            def __init__(self, stem: str) -> None:
                self.chain = loadCertificates(str(d / f"{stem}.pem"))
                self.key = loadKey(str(d / f"{stem}.key"))

        tp, alice = Pair("server"), Pair("alice")
        dial = {"op": "peer-dial", "name": "echo.alice.localhost", "identity": "bob", "peer": "test"}
        answer = yield self.peerDial("127.0.0.4", tp, dial)
        self.assertEqual((answer.code, answer.message), ("forbidden", "127.0.0.4 is not the address of a live instance of this cluster"))
        answer = yield self.peerDial("127.0.0.2", alice, dial)
        self.assertEqual((answer.code, answer.message), ("forbidden", "its certificate is not TP's own"))
        answer = yield self.peerDial("127.0.0.2", tp, {**dial, "name": "other.alice.localhost"})
        self.assertEqual(answer.code, "not_exposed")
        answer = yield self.peerDial("127.0.0.2", tp, {**dial, "identity": "mallory"})
        self.assertEqual(answer.code, "forbidden")
        self.assertEqual(echo.accepted, 0)
        answer = yield self.peerDial("127.0.0.2", tp, dial)
        self.assertEqual((answer.ok, answer.info["echoed"]), (True, b"ping"))
        self.assertEqual(echo.accepted, 1)


class Named(protocol.Protocol):
    """
    Says its factory's C{name} and closes: which backend a dial reached.
    """

    def connectionMade(self) -> None:
        self.factory.accepted += 1  # type: ignore[attr-defined]
        self.transport.write(self.factory.name)  # type: ignore[attr-defined,union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


@defer.inlineCallbacks
def whoAnswers(host: str, port: int, timeout: float = 15) -> Any:
    """
    Connect to C{host:port} and read until the close: what the backend
    behind it said (b"" if the dial failed after connecting).
    """
    received: list[bytes] = []
    done: defer.Deferred[None] = defer.Deferred()

    class Reader(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.append(data)

        def connectionLost(self, reason: Any) -> None:
            done.callback(None)

    proto = yield connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=timeout), Reader())
    yield done.addTimeout(timeout, reactor, onTimeoutCancel=lambda *_: proto.transport.abortConnection())
    return b"".join(received)


class HighAvailabilityTests(ThreeInstances, TestCase):
    """
    Exposer HA (one C{tp expose} with links to A and B) and pools (two
    exposers of one identity at A), with real processes: dials spread over
    the holders, and none fails once a lost holder is known.
    """

    def exposeTo(self, local: int, *args: str, at: int = 1) -> Background:
        return Background(self, tpCommand() + ["--config", self.client("alice", at), "expose", f"127.0.0.1:{local}", *args])

    def backend(self, name: bytes) -> tuple[int, Any]:
        port, factory = listenLocal(self, Named)
        factory.name = name
        return port, factory

    @defer.inlineCallbacks
    def test_exposerOnTwoInstances(self) -> Any:
        """
        One exposer linked to A and B (its client config lists both; a
        public port TP picks at A, then asked for at B): C forwards to both and dials spread over
        them.  C{kill -9} A: no dial through C fails, before or after C
        drops A from the route (the gap is measured), and dials through B
        go on.  A restarted: the exposer's link to A registers again and
        C routes to both again.
        """
        backendPort, backend = self.backend(b"svc")
        # The client config lists both servers (tp expose keeps a link to
        # each; the --server flags do the same, tested in test_exposer_links).
        d = self.pki.directory
        config = d / "alice-ha.toml"
        config.write_text(
            f'server = ["127.0.0.1:{self.port}", "127.0.0.2:{self.port}"]\ncert = "{d / "alice.pem"}"\nkey = "{d / "alice.key"}"\nca = "{self.pki.caPath}"\n'
        )
        exposer = Background(self, tpCommand() + ["--config", str(config), "expose", f"127.0.0.1:{backendPort}", "--public", "--transport", "tls"])
        yield logged(exposer, b"; Ctrl-C stops", times=2)
        ports = set(re.findall(rb"as public port (\d+)", exposer.stderr))
        self.assertEqual(len(ports), 1, exposer.stderr)
        port = int(ports.pop())
        self.assertIn(f"[127.0.0.1:{self.port}] Exposing".encode(), exposer.stderr)
        self.assertIn(f"[127.0.0.2:{self.port}] Exposing".encode(), exposer.stderr)
        yield self.servers[3].waitForStderr(f"Forwarding public port {port} to instance(s) ['tp-1', 'tp-2']".encode())
        status = yield self.statusOf(3)
        self.assertEqual(
            (status["cluster"]["instance"], status["cluster"]["store_up"], [i["id"] for i in status["cluster"]["instances"]]),
            ("tp-3", True, ["tp-1", "tp-2", "tp-3"]),
        )
        self.assertEqual(
            status["cluster"]["remote"], [{"kind": "public", "port": port, "name": None, "identity": "alice", "instances": ["tp-1", "tp-2"]}]
        )
        for _ in range(20):
            self.assertEqual((yield whoAnswers("127.0.0.3", port)), b"svc")
        viaC = [self.servers[i].stderr.count(b"via tp-3") for i in (1, 2)]
        self.assertTrue(all(viaC), f"dials through C reached A and B {viaC} times")

        killed = reactor.seconds()
        os.kill(self.servers[1].transport.pid, signal.SIGKILL)
        updated = self.servers[3].waitForStderr(f"Forwarding public port {port} to instance(s) ['tp-2']".encode(), timeout=self.TTL + 5)
        routeGone: list[float] = []
        updated.addCallback(lambda _: routeGone.append(reactor.seconds() - killed))
        failures, before, after = [], 0, 0
        while after < 20:
            try:
                answer = yield whoAnswers("127.0.0.3", port)
            except Exception as e:
                answer = repr(e).encode()
            if answer != b"svc":
                failures.append((reactor.seconds() - killed, answer))
            if routeGone:
                after += 1
            else:
                before += 1
        yield updated
        metrics = yield self.metricsOf(3)
        self.assertGreater(metrics[("tp_cluster_peer_links_total", (("kind", "dial"), ("result", "retried")))], 0)
        self.assertEqual(metrics[("tp_cluster_peer_links_total", (("kind", "dial"), ("result", "ok")))], 20 + before + after)
        self.assertNotIn(("tp_cluster_peer_links_total", (("kind", "dial"), ("result", "unreachable"))), metrics)
        self.assertEqual((metrics[("tp_cluster_instances", ())], metrics[("tp_cluster_remote_routes", (("kind", "public"),))]), (2, 1))
        print(f"\nkill -9 A: C dropped A from the route after {routeGone[0]:.2f} s (TTL {self.TTL} s); dials through C: {before} before, {after} after, {len(failures)} failed")
        self.assertEqual(failures, [])
        self.assertGreater(before, 0)
        self.assertEqual((yield whoAnswers("127.0.0.2", port)), b"svc")

        restarted = self.startInstance(1)
        yield restarted.waitForStderr(b"Peer links on")
        yield logged(exposer, f"[127.0.0.1:{self.port}] Exposing 127.0.0.1:{backendPort} as public port {port} again".encode(), timeout=60)
        yield logged(self.servers[3], f"Forwarding public port {port} to instance(s) ['tp-1', 'tp-2']".encode(), times=2)
        self.assertEqual((yield whoAnswers("127.0.0.1", port)), b"svc")

    @defer.inlineCallbacks
    def test_poolOfTwoExposers(self) -> Any:
        """
        Two exposers of alice at A for one public port, each in front of
        its own backend: dials at A and through C reach both.  C{kill -9}
        one exposer: once A has seen its connection end, every dial (at A
        and through C) reaches the other, none fails.
        """
        onePort, one = self.backend(b"one")
        twoPort, two = self.backend(b"two")
        port = freePort()
        first = self.exposeTo(onePort, "--public", str(port), "--transport", "tls")
        yield first.waitForStderr(b"; Ctrl-C stops")
        second = self.exposeTo(twoPort, "--public", str(port), "--transport", "tls")
        yield second.waitForStderr(b"; Ctrl-C stops")
        yield self.servers[1].waitForStderr(f"adds a member to the pool of public port {port} (2 members)".encode())
        yield self.servers[3].waitForStderr(f"Forwarding public port {port} to instance(s) ['tp-1']".encode())
        answers = []
        for host in ("127.0.0.1", "127.0.0.3"):
            for _ in range(20):
                answers.append((yield whoAnswers(host, port)))
        self.assertEqual(set(answers), {b"one", b"two"}, answers)
        self.assertTrue(one.accepted and two.accepted)

        os.kill(second.transport.pid, signal.SIGKILL)
        yield self.servers[1].waitForStderr(f"A member of the pool of public port {port} of alice left (1 remain)".encode())
        reached = two.accepted
        answers = []
        for host in ("127.0.0.1", "127.0.0.3"):
            for _ in range(20):
                answers.append((yield whoAnswers(host, port)))
        self.assertEqual(answers, [b"one"] * 40)
        self.assertEqual(two.accepted, reached)


class PeerListenerInUseTests(TestCase):
    """
    An instance that cannot listen on its peer port is no part of the
    cluster: it stops with one line saying why (exit status 1), so that
    what runs it starts it again.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_peerPortInUse(self) -> Any:
        pki = TestPKI.create(self.mktemp())
        d = pki.directory
        pki.ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",), server=True).write(d / "server.pem", d / "server.key")
        etcd = yield EtcdServer.start(self)
        taken = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        peerPort = taken.getHost().port
        path = d / "tp.toml"
        path.write_text(f"""
[server]
listen = "tcp:{freePort()}:interface=127.0.0.1"
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"
quic = false

[cluster]
etcd = ["{etcd.url}"]
instance = "tp-1"
advertise = "127.0.0.1:{peerPort}"
peer_listen = "tcp:{peerPort}:interface=127.0.0.1"
""")
        result = yield run(twistCommand() + ["--log-format=text", "--log-file=+", "tp", "--config", str(path)], timeout=45)
        self.assertEqual(result.status, 1, result.err[-3000:])
        self.assertIn(f"Cannot listen on cluster.peer_listen tcp:{peerPort}:interface=127.0.0.1: ".encode(), result.err)
        self.assertIn(b"Address already in use", result.err)
