"""
Workers (issue 14, part A): several TP processes on one machine sharing its
ports (C{SO_REUSEPORT}), each an instance of the cluster, run by one
C{twist tp}.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IReactorUDP
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy.cluster.testing import EtcdServer
from tpproxy.config import ConfigError, loadServerConfig
from tpproxy.test.support import Background, Echo, echoThrough, freePort, freePortRun, listenLocal, run, tpCommand, twistCommand, waitForPort
from tpproxy.test.test_cluster import logged
from tpproxy.testing import TestPKI
from tpproxy.workers import ReusePortReactor, shiftPort, workerConfig


class Counting(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted += 1  # type: ignore[attr-defined]
        self.transport.loseConnection()  # type: ignore[union-attr]


class ReusePortReactorTests(TestCase):
    """
    L{ReusePortReactor}'s listeners share a port, with real sockets.
    """

    def listen(self, r: Any, port: int = 0) -> Any:
        factory = protocol.Factory.forProtocol(Counting)
        factory.accepted = 0  # type: ignore[attr-defined]
        listening = r.listenTCP(port, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        return listening, factory

    def test_interfaces(self) -> None:
        """
        It provides what the reactor provides (endpoints look for them).
        """
        proxy = ReusePortReactor(reactor)
        for interface in (IReactorTCP, IReactorUDP, IReactorTime):
            self.assertTrue(interface.providedBy(proxy), interface)
        self.assertIs(proxy.callLater.__self__, reactor.callLater.__self__)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_twoListenersShareAPort(self) -> Any:
        """
        Two TCP listeners on one port: both bind, and connections reach
        them; a listener without C{SO_REUSEPORT} cannot join.
        """
        proxy = ReusePortReactor(reactor)
        port = freePort()
        first, a = self.listen(proxy, port)
        second, b = self.listen(proxy, port)
        self.assertEqual(second.getHost().port, port)
        with self.assertRaises(error.CannotListenError):
            reactor.listenTCP(port, protocol.Factory.forProtocol(Counting), interface="127.0.0.1")
        for _ in range(40):
            yield echoThroughClosed(port)
        self.assertEqual(a.accepted + b.accepted, 40)
        self.assertTrue(a.accepted and b.accepted, (a.accepted, b.accepted))

    def test_exclusivePorts(self) -> None:
        """
        A worker's own ports (peer, admin) and ports the kernel picks are
        bound without SO_REUSEPORT: a second listener there fails, as two
        processes on one peer port must.
        """
        port = freePort()
        proxy = ReusePortReactor(reactor, frozenset({port}))
        self.listen(proxy, port)
        with self.assertRaises(error.CannotListenError):
            proxy.listenTCP(port, protocol.Factory(), interface="127.0.0.1")
        picked, _ = self.listen(proxy, 0)
        with self.assertRaises(error.CannotListenError):
            ReusePortReactor(reactor).listenTCP(picked.getHost().port, protocol.Factory(), interface="127.0.0.1")

    def test_portHeldWithoutReusePort(self) -> None:
        """
        A port a plain listener holds is refused with the usual error, which
        names the port.
        """
        plain = reactor.listenTCP(0, protocol.Factory.forProtocol(Counting), interface="127.0.0.1")
        self.addCleanup(plain.stopListening)
        port = plain.getHost().port
        with self.assertRaises(error.CannotListenError) as caught:
            ReusePortReactor(reactor).listenTCP(port, protocol.Factory(), interface="127.0.0.1")
        self.assertEqual(caught.exception.port, port)

    def test_udp(self) -> None:
        """
        Two UDP listeners share a port; a datagram to it reaches one.
        """
        proxy = ReusePortReactor(reactor)
        got: list[bytes] = []

        class Receiver(protocol.DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                got.append(data)

        port = freeUDPPort()
        first = proxy.listenUDP(port, Receiver(), interface="127.0.0.1")
        self.addCleanup(first.stopListening)
        second = proxy.listenUDP(port, Receiver(), interface="127.0.0.1")
        self.addCleanup(second.stopListening)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sender.close)
        sender.sendto(b"hello", ("127.0.0.1", port))
        return waitFor(lambda: got == [b"hello"])


def freeUDPPort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@defer.inlineCallbacks
def echoThroughClosed(port: int) -> Any:
    """
    Connect to C{port} on 127.0.0.1 and wait for the server to close.
    """
    done: defer.Deferred[None] = defer.Deferred()

    class Client(protocol.Protocol):
        def connectionLost(self, reason: Any) -> None:
            done.callback(None)

    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Client())
    yield done


@defer.inlineCallbacks
def waitFor(condition: Any, timeout: float = 10) -> Any:
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not met in time")
        yield deferLater(reactor, 0.01, lambda: None)


def serverToml(pki: TestPKI, port: int, peerPort: int, adminPort: int, etcd: str, workers: int = 2, extra: str = "") -> str:
    return f"""
[server]
listen = "tcp:{port}:interface=127.0.0.1"
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"
workers = {workers}

[[rules]]
identities = "*"
hosts = ["127.0.0.0/8", "*.localhost"]
ports = "*"

[[exposures]]
identities = ["alice"]
public_ports = "1024-65535"
names = "*.localhost"
dialers = ["alice", "bob"]

[reverse]
public_interface = "127.0.0.1"

[cluster]
etcd = ["{etcd}"]
instance = "tp"
advertise = "127.0.0.1:{peerPort}"
peer_listen = "tcp:{peerPort}:interface=127.0.0.1"
lease_ttl = 2

[admin]
listen = "tcp:{adminPort}:interface=127.0.0.1"
{extra}"""


class WorkerConfigTests(SynchronousTestCase):
    """
    C{server.workers}: checked at load, and what each worker runs.
    """

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.path = self.pki.directory / "server.toml"

    def load(self, text: str) -> Any:
        self.path.write_text(text)
        return loadServerConfig(self.path)

    def test_workerConfig(self) -> None:
        """
        Worker I is instance C{INSTANCE-wI}, with its peer listener, its
        advertised address and its admin listener on their ports plus I;
        the rest is the same.
        """
        config = self.load(serverToml(self.pki, 8443, 7000, 9090, "http://127.0.0.1:2379", workers=3))
        self.assertEqual(config.workers, 3)
        w2 = workerConfig(config, 2)
        self.assertEqual(
            (w2.cluster.instance, w2.cluster.advertise, w2.cluster.peerListen, w2.admin.listen if w2.admin else None, w2.worker, w2.workers),
            ("tp-w2", "127.0.0.1:7002", "tcp:7002:interface=127.0.0.1", "tcp:9092:interface=127.0.0.1", 2, 3),
        )
        self.assertEqual((w2.listen, w2.quic, w2.policy), (config.listen, config.quic, config.policy))

    def test_needsCluster(self) -> None:
        text = serverToml(self.pki, 8443, 7000, 9090, "http://127.0.0.1:2379").replace('etcd = ["http://127.0.0.1:2379"]\n', "")
        with self.assertRaises(ConfigError) as caught:
            self.load(text.replace("[cluster]\n", "[cluster]\n").replace('instance = "tp"\n', "").replace('advertise = "127.0.0.1:7000"\n', "").replace('peer_listen = "tcp:7000:interface=127.0.0.1"\n', "").replace("lease_ttl = 2\n", ""))
        self.assertIn("server.workers: more than one worker needs [cluster] etcd", str(caught.exception))

    def test_bounds(self) -> None:
        for bad in ("0", "65", "true", '"2"', "1.5"):
            with self.assertRaises(ConfigError) as caught:
                self.load(serverToml(self.pki, 8443, 7000, 9090, "http://127.0.0.1:2379").replace("workers = 2", f"workers = {bad}"))
            self.assertIn("server.workers: expected a whole number of processes from 1 to 64", str(caught.exception))

    def test_portsMustFit(self) -> None:
        """
        A worker whose peer port would pass 65535 is refused at load,
        naming the key.
        """
        with self.assertRaises(ConfigError) as caught:
            self.load(serverToml(self.pki, 8443, 65535, 9090, "http://127.0.0.1:2379"))
        self.assertIn("worker 1 would", str(caught.exception))

    def test_shiftPort(self) -> None:
        self.assertEqual(shiftPort("tcp:9090", 3, "k"), "tcp:9093")
        self.assertEqual(shiftPort("tcp6:9090:interface=\\:\\:1", 1, "k"), "tcp6:9091:interface=\\:\\:1")
        with self.assertRaises(ConfigError) as caught:
            shiftPort("unix:/run/tp.sock", 1, "admin.listen")
        self.assertIn("admin.listen: with server.workers above 1 this must be a tcp: or tcp6: endpoint", str(caught.exception))


class TwoWorkers:
    """
    One C{twist tp} with C{workers = 2} and a real etcd, each worker with
    its admin listener; mixed into a L{TestCase}.
    """

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        d = self.pki.directory
        self.pki.ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",), server=True).write(d / "server.pem", d / "server.key")
        self.etcd = yield EtcdServer.start(self)
        self.port, self.peerPort, self.adminPort = freePort(), freePortRun(2), freePortRun(2)
        self.config = d / "server.toml"
        self.config.write_text(serverToml(self.pki, self.port, self.peerPort, self.adminPort, self.etcd.url))
        self.client = d / "alice.toml"
        self.client.write_text(f'server = "127.0.0.1:{self.port}"\ncert = "{d / "alice.pem"}"\nkey = "{d / "alice.key"}"\nca = "{self.pki.caPath}"\n')
        self.master = Background(self, twistCommand() + ["--log-format=text", "--log-file=+", "tp", "--config", str(self.config)])
        yield logged(self.master, b"Peer links on", times=2, timeout=60)
        yield logged(self.master, b"Admin listener on", times=2, timeout=60)
        yield waitForPort(self.port)

    def pids(self) -> dict[int, int]:
        """
        The latest pid of each worker, from the pool's log.
        """
        return {int(w): int(p) for w, p in re.findall(rb"Worker (\d+) started \(pid (\d+)\)", self.master.stderr)}

    def served(self, worker: int) -> int:
        return self.master.stderr.count(f"[tpproxy.audit#info w{worker}]".encode())

    @defer.inlineCallbacks
    def tunnels(self, count: int) -> Any:
        """
        C{count} tunnels to an echo server, each on its own TLS connection
        (C{tp up} over TLS opens one per local connection).
        """
        echoPort, echo = listenLocal(self, Echo)
        up = Background(self, tpCommand() + ["--config", str(self.client), "--transport", "tls", "up", f"127.0.0.1:{echoPort}", "0"])
        line = yield up.waitForStderr(b"Ctrl-C stops")
        localPort = int(re.search(rb"Forwarding 127\.0\.0\.1:(\d+) to", line).group(1))  # type: ignore[union-attr]
        for _ in range(count):
            yield echoThrough("127.0.0.1", localPort, 16 * 1024)
        self.assertEqual(echo.accepted, count)
        yield up.stop()



class WorkersProcessTests(TwoWorkers, TestCase):
    """
    Two worker processes share TP's port and serve tunnels; a killed
    worker is restarted while the other serves; SIGHUP reloads both;
    SIGTERM stops all.
    """

    @defer.inlineCallbacks
    def test_workersShareThePort(self) -> Any:
        """
        Two worker processes run (two pids, neither the pool's), and 40
        tunnels over TLS are served by both: the kernel spreads connections
        over their listeners.  Over QUIC too.
        """
        pids = self.pids()
        self.assertEqual(sorted(pids), [0, 1])
        self.assertNotIn(self.master.transport.pid, pids.values())
        yield self.tunnels(40)
        yield waitFor(lambda: self.served(0) + self.served(1) >= 40)
        self.assertTrue(self.served(0) and self.served(1), (self.served(0), self.served(1)))
        echoPort, echo = listenLocal(self, Echo)
        for _ in range(2):
            result = yield run(tpCommand() + ["--config", str(self.client), "--transport", "quic", "connect", f"127.0.0.1:{echoPort}"], stdin=b"over quic")
            self.assertEqual(result.out, b"over quic", result.err)

    @defer.inlineCallbacks
    def test_killedWorkerRestarted(self) -> Any:
        """
        C{kill -9} worker 1: the pool logs it and starts it again (a new
        pid, back in the cluster), and every tunnel meanwhile is served.
        """
        old = self.pids()[1]
        os.kill(old, signal.SIGKILL)
        yield self.master.waitForStderr(f"Worker 1 (pid {old}) ended".encode())
        yield self.tunnels(10)
        yield logged(self.master, b"Worker 1 started", times=2)
        # A reload asked for while worker 1 starts (Python is still
        # loading: SIGHUP's default action would end it) is applied once
        # it runs, and kills nothing.
        self.master.transport.signalProcess("HUP")
        yield logged(self.master, b"Peer links on", times=3)
        yield logged(self.master, b"w1] Reloaded")
        yield logged(self.master, b"w0] Reloaded")
        self.assertNotEqual(self.pids()[1], old)
        self.assertIn(b"killed by signal 9; restarting it", self.master.stderr)
        self.assertNotIn(b"killed by signal 1", self.master.stderr)

    @defer.inlineCallbacks
    def test_reloadAndStop(self) -> Any:
        """
        SIGHUP to the pool reloads each worker; SIGTERM stops the workers
        and then the pool, which exits 0, and no worker is left running.
        """
        pids = self.pids()
        self.master.transport.signalProcess("HUP")
        yield logged(self.master, b"Reloaded", times=2)
        self.assertIn(b"w0] Reloaded", self.master.stderr)
        self.assertIn(b"w1] Reloaded", self.master.stderr)
        # Each worker compares the file with what it runs (its own ports
        # and id), so an unchanged file changes nothing that needs a restart.
        self.assertNotIn(b"restart", self.master.stderr.split(b"Reloading: SIGHUP")[1])
        self.master.transport.signalProcess("TERM")
        yield self.master.proto.done
        # Each worker stopped as one twist tp does on SIGTERM (its reactor
        # stops, then it ends by the signal, as twist does), then the pool.
        for worker, pid in pids.items():
            self.assertIn(f"Worker {worker} (pid {pid}) stopped: killed by signal 15".encode(), self.master.stderr)
            self.assertIn(f"[twisted.internet.base#info w{worker}] Main loop terminated.".encode(), self.master.stderr)
        self.assertTrue(self.master.stderr.rstrip().endswith(b"[twisted.internet.base#info] Main loop terminated."), self.master.stderr[-2000:])
        for pid in pids.values():
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)


class QuicRoutingProcessTests(TwoWorkers, TestCase):
    """
    QUIC packets routed by connection id between two workers (issue 14
    part B): a client that changes its address mid-transfer keeps its
    connection whichever worker its new 4-tuple hashes to.
    """

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        # Connection ids drawn before a worker holds its slot are
        # unroutable (docs/cluster.md): wait for both claims before the
        # connection is made (a busy CI box once made it first).
        yield logged(self.master, b"QUIC routing slot", times=2, timeout=60)

    @defer.inlineCallbacks
    def metricSum(self, name: str, **labels: str) -> Any:
        """
        The sum over both workers' C{/metrics} of the samples C{name} with
        C{labels}.
        """
        import treq
        from prometheus_client.parser import text_string_to_metric_families
        from twisted.web.client import HTTPConnectionPool

        total = 0.0
        for worker in (0, 1):
            response = yield treq.get(f"http://127.0.0.1:{self.adminPort + worker}/metrics", pool=HTTPConnectionPool(reactor, persistent=False))
            for family in text_string_to_metric_families((yield response.text())):
                for sample in family.samples:
                    if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                        total += sample.value
        return total

    def forwarded(self) -> Any:
        return self.metricSum("tp_quic_forwarded_datagrams_total")

    @defer.inlineCallbacks
    def test_clientMovesBetweenWorkers(self) -> Any:
        """
        The client rebinds its UDP socket (a new source port: the kernel
        may give the new 4-tuple to the other worker) after each 64 KiB
        echoed, until at least one packet was forwarded between workers
        and twice more after; every byte comes back, in order, on the same
        connection.
        """
        from tpproxy.pki import loadCertificates, loadKey
        from tpproxy.protocols.client import TPClientProtocol
        from tpproxy.transports.quic import clientConfiguration, connectQuic
        from tpproxy.wire import ClientHello

        echoPort, echo = listenLocal(self, Echo)
        d = self.pki.directory
        config = clientConfiguration("localhost", loadCertificates(str(d / "ca.pem")), loadCertificates(str(d / "alice.pem")), loadKey(str(d / "alice.key")))
        session = connectQuic(reactor, ("127.0.0.1", self.port), config)
        self.addCleanup(lambda: (session.closed or session.close(0, "done"), session.socket.stop()))
        yield session.ready
        ready: defer.Deferred[Any] = defer.Deferred()
        session.openStream(TPClientProtocol(ClientHello.connect("127.0.0.1", echoPort), ready))
        end = yield ready
        end.transport.resumeProducing()
        sent = b""
        rebinds, after = 0, 0
        while after < 2:
            chunk = os.urandom(64 * 1024)
            sent += chunk
            end.transport.write(chunk)
            yield waitFor(lambda: len(end.rest) >= len(sent), timeout=20)
            self.assertEqual(end.rest, sent)
            session.rebind()
            rebinds += 1
            self.assertLess(rebinds, 40, "40 new source ports, and not one packet went to the other worker")
            if (yield self.forwarded()):
                after += 1
        self.assertEqual(echo.accepted, 1)
        self.assertFalse(session.closed)
        # Every message between the workers was theirs.
        self.assertEqual((yield self.metricSum("tp_quic_route_dropped_total", reason="rejected")), 0)
        print(f"\n{rebinds} rebinds, {(yield self.forwarded()):g} packets forwarded between workers")


class PoolKilledTests(TwoWorkers, TestCase):
    @defer.inlineCallbacks
    def test_workersEndWithThePool(self) -> Any:
        """
        C{kill -9} the pool: its workers end too (PR_SET_PDEATHSIG), and
        leave nothing holding TP's ports or their instance ids.
        """
        pids = self.pids()
        os.kill(self.master.transport.pid, signal.SIGKILL)
        yield self.master.proto.done

        def gone() -> bool:
            for pid in pids.values():
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    continue
                return False
            return True

        yield waitFor(gone, timeout=30)
