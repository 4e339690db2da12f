"""
QUIC through a real 5-tuple-hashing load balancer in front of three TP
instances (issue 14, part B; docs/cluster.md "QUIC behind a load
balancer"): an nftables C{jhash} DNAT in a network namespace the test
makes, real etcd, real OpenSSH, and C{tp --transport quic connect} as the
ssh ProxyCommand, moved to a new UDP port (SIGUSR1) again and again
mid-transfer, so that its packets hash to another instance.

Topology (all namespaces made here, removed at cleanup):

    client ns                lb ns                         servers ns
    10.201.1.2  ---veth---  10.201.1.1 (the VIP)
                            10.201.2.1   ---veth---   10.201.2.11  tp-1
                            nft: udp to VIP:4433 ->   10.201.2.12  tp-2
                            jhash(saddr . sport) % 3  10.201.2.13  tp-3
                                                      127.0.0.1    etcd, sshd
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from tpproxy.cluster.testing import etcdBinary
from tpproxy.test.netns import Namespaces
from tpproxy.test.support import SSHD, Background, cleanEnv, tpCommand, twistCommand
from tpproxy.testing import TestPKI

VIP = "10.201.1.1"
PORT = 4433
SERVERS = {1: "10.201.2.11", 2: "10.201.2.12", 3: "10.201.2.13"}


def logged(process: Background, marker: bytes, times: int = 1, timeout: float = 60) -> defer.Deferred[None]:
    from tpproxy.test.test_cluster import logged as _logged

    return _logged(process, marker, times, timeout)


class Streaming(protocol.ProcessProtocol):
    """
    A process fed its stdin piece by piece, whose stdout is counted and
    hashed as it arrives.
    """

    def __init__(self) -> None:
        self.received = 0
        self.hash = hashlib.sha256()
        self.err = b""
        self.waiting: tuple[int, defer.Deferred[None]] | None = None
        self.errWaiting: tuple[bytes, int, defer.Deferred[None]] | None = None
        self.done: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.hash.update(data)
        if self.waiting is not None and self.received >= self.waiting[0]:
            d, self.waiting = self.waiting[1], None
            d.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data
        if self.errWaiting is not None and self.err.count(self.errWaiting[0]) >= self.errWaiting[1]:
            d = self.errWaiting[2]
            self.errWaiting = None
            d.callback(None)

    def processEnded(self, reason: Any) -> None:
        for waiting in (self.waiting, self.errWaiting):
            if waiting is not None and not waiting[-1].called:
                waiting[-1].errback(AssertionError(f"ssh ended; its stderr:\n{self.err[-3000:].decode(errors='replace')}"))
        self.done.callback(reason.value.exitCode)

    def until(self, total: int, timeout: float = 60) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self.received >= total:
            d.callback(None)
            return d
        self.waiting = (total, d)
        return d.addTimeout(timeout, reactor)

    def untilErr(self, marker: bytes, times: int, timeout: float = 30) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self.err.count(marker) >= times:
            d.callback(None)
            return d
        self.errWaiting = (marker, times, d)
        return d.addTimeout(timeout, reactor)


class LoadBalancedQuicTests(TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.net = net = Namespaces(self)
        for name in ("c", "lb", "s"):
            net.add(name)
        net.link("c", ["10.201.1.2/24"], "lb", [f"{VIP}/24"])
        net.link("lb", ["10.201.2.1/24"], "s", [f"{a}/24" for a in SERVERS.values()])
        net.route("c", VIP)
        net.route("s", "10.201.2.1")
        net.forwarding("lb")
        backends = ", ".join(f"{i - 1} : {a}" for i, a in SERVERS.items())
        net.nftables("lb", f"""
table ip tplb {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {VIP} udp dport {PORT} dnat to jhash ip saddr . udp sport mod 3 map {{ {backends} }}
  }}
}}
""")
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        d = self.pki.directory
        self.pki.ca.issue("tp.test", dns=("tp.test",), ips=(VIP, *SERVERS.values()), server=True).write(d / "server.pem", d / "server.key")
        etcdDir = d / "etcd"
        self.etcd = Background(self, net.exec("s") + [
            etcdBinary(), "--name", "tp-test", "--data-dir", str(etcdDir),
            "--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
            "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "tp-test=http://127.0.0.1:2380",
            "--heartbeat-interval", "10", "--election-timeout", "100", "--log-level", "warn",
        ])
        self.sshd = yield SSHD.start(self, net, "s")
        self.servers = {}
        for i, address in SERVERS.items():
            path = d / f"tp-{i}.toml"
            path.write_text(f"""
[server]
listen = "tcp:{PORT}:interface={address}"
quic = ["{address}:{PORT}"]
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"
state_dir = "state-{i}"

[[rules]]
identities = "*"
hosts = ["127.0.0.0/8"]
ports = "*"

[cluster]
etcd = ["http://127.0.0.1:2379"]
instance = "tp-{i}"
advertise = "{address}:7443"
peer_listen = "tcp:7443:interface={address}"
lease_ttl = 2

[admin]
listen = "tcp:9090:interface={address}"
""")
            self.servers[i] = Background(self, net.exec("s") + twistCommand() + ["--log-format=text", "--log-file=+", "tp", "--config", str(path)])
        for i in SERVERS:
            yield logged(self.servers[i], b"QUIC routing slot", timeout=90)
        self.client = d / "alice.toml"
        self.client.write_text(f'server = "{VIP}:{PORT}"\ncert = "{d / "alice.pem"}"\nkey = "{d / "alice.key"}"\nca = "{self.pki.caPath}"\n')

    def metric(self, name: str) -> float:
        total = 0.0
        for address in SERVERS.values():
            text = self.net.fetch("s", f"http://{address}:9090/metrics")
            for line in text.splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def tpPid(self) -> int:
        found = subprocess.run(["pgrep", "-f", "-n", f"config {self.client} --transport quic connect"], capture_output=True, text=True).stdout.split()
        self.assertTrue(found, "no tp connect process")
        return int(found[0])

    @defer.inlineCallbacks
    def test_sshSurvivesAddressChanges(self) -> Any:
        """
        ssh through C{tp --transport quic connect} to the load balancer's
        address echoes a stream (remote C{cat}) that is sha-checked, while
        the client moves to a new UDP port after each piece: new source
        ports hash to other instances, which forward its packets to the
        instance that owns the connection and send its answers back from
        the address the balancer expects.  The session never breaks.
        """
        proxy = " ".join(tpCommand()) + f" --config {self.client} --transport quic connect %h:%p"
        argv = self.net.exec("c") + self.sshd.args("127.0.0.1", self.sshd.port, "cat", proxy=proxy)
        ssh = Streaming()
        process = reactor.spawnProcess(ssh, argv[0], argv, env=cleanEnv())  # type: ignore[attr-defined]

        def kill() -> Any:
            if not ssh.done.called:
                process.signalProcess("KILL")
            return ssh.done.addErrback(lambda f: None)

        self.addCleanup(kill)
        piece = 256 * 1024
        sent = hashlib.sha256()
        total = 0
        moves = 0
        forwarded = 0.0
        while moves < 40:
            data = os.urandom(piece)
            process.write(data)
            sent.update(data)
            total += len(data)
            yield ssh.until(total)
            if moves >= 12 and forwarded > 0:
                break
            os.kill(self.tpPid(), 10)  # SIGUSR1: move to a new UDP port
            moves += 1
            yield ssh.untilErr(b"QUIC connection moved", moves)
            if moves % 6 == 0:
                forwarded = self.metric("tp_quic_forwarded_datagrams_total")
        process.closeStdin()
        status = yield ssh.done
        self.assertEqual(status, 0, ssh.err[-3000:])
        self.assertEqual((ssh.received, ssh.hash.hexdigest()), (total, sent.hexdigest()))
        forwarded = self.metric("tp_quic_forwarded_datagrams_total")
        returned = self.metric("tp_quic_returned_datagrams_total")
        rejected = self.metric("tp_quic_route_dropped_total")
        print(f"\n{total} bytes each way, {moves} moves, {forwarded:g} packets forwarded between instances, {returned:g} answers sent back through them")
        self.assertGreater(forwarded, 0, "no move hashed to another instance")
        self.assertGreater(returned, 0, "answers did not go back through the receiving instance")
        self.assertEqual(rejected, 0)
        slots = {re.search(rb"QUIC routing slot (\d+)", s.stderr).group(1) for s in self.servers.values()}  # type: ignore[union-attr]
        self.assertEqual(len(slots), 3, "each instance holds its own slot")
