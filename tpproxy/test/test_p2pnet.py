"""
Issue 16's groundwork in network namespaces (root; L{tpproxy.test.p2pnet}):
the NAT topology itself, TP's STUN answer seen through a NAT, and ICE
(aioice) between two hosts behind two NATs using TP's STUN, directly
between the NATs' public addresses, and failing within a bound when UDP
between the NATs is blocked, or when the NATs lack a WAN firewall.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from tpproxy.test.p2pnet import LAN, NAT_PUBLIC, OTHER, TP, Child, P2PNet
from tpproxy.test.support import Background, twistCommand
from tpproxy.testing import TestPKI

QUIC_PORT = 4433
REFLECTOR_PORT = 3478


class TopologyTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_masqueradeKeepsThePort(self) -> Any:
        """
        From hostA and hostB, UDP reaches both public destinations and
        arrives from the NAT's public address, on the socket's own port for
        both destinations: with one host behind each NAT, masquerade's
        mapping is endpoint-independent (the port is kept).  The NAT's
        counters saw the datagrams to TP's address.
        """
        p2p = P2PNet(self)
        reflector = p2p.reflector(REFLECTOR_PORT)
        yield reflector.next()
        for side in ("A", "B"):
            results = p2p.probe(f"host{side}", [
                {"socket": "s", "bind": ["0.0.0.0", 0], "to": [TP, REFLECTOR_PORT]},
                {"socket": "s", "bind": None, "to": [OTHER, REFLECTOR_PORT]},
            ])
            local = results[0]["local"][1]
            print(f"\nhost{side} {LAN[side][1]}:{local} -> {[r['mapped'] for r in results]}")
            self.assertEqual([r["mapped"] for r in results], [[NAT_PUBLIC[side], local]] * 2)
            self.assertGreaterEqual(p2p.counters(f"nat{side}")["toTP"][0], 1)

    @defer.inlineCallbacks
    def test_clashRemapsButStaysEndpointIndependent(self) -> Any:
        """
        A second host behind natA using the same port toward the same
        destination cannot keep the port there and is mapped to another
        one; toward a second destination it gets that same other port, not
        its own (still free) port: Linux NAT reuses the mapping of a source
        that has a live conntrack entry (C{find_appropriate_src}), so the
        mapping stays endpoint-independent even after a clash.
        """
        p2p = P2PNet(self)
        second = "10.1.0.3"
        p2p.net.sh(p2p.net.ip, "-n", p2p.net.ns("ha"), "addr", "add", f"{second}/24", "dev", f"{p2p.net.prefix}hana")
        reflector = p2p.reflector(REFLECTOR_PORT)
        yield reflector.next()
        results = p2p.probe("hostA", [
            {"socket": "first", "bind": [LAN["A"][1], 0], "to": [TP, REFLECTOR_PORT]},
            {"socket": "second", "bind": [second, "first"], "to": [TP, REFLECTOR_PORT]},
            {"socket": "second", "bind": None, "to": [OTHER, REFLECTOR_PORT]},
        ])
        port = results[0]["local"][1]
        mapped = [r["mapped"] for r in results]
        print(f"\nport {port} from {LAN['A'][1]} and {second}: mapped {mapped}")
        self.assertEqual(mapped[0], [NAT_PUBLIC["A"], port])
        self.assertEqual(mapped[1][0], NAT_PUBLIC["A"])
        self.assertNotEqual(mapped[1][1], port)
        self.assertEqual(mapped[2], mapped[1])

    @defer.inlineCallbacks
    def test_randomPortsAreEndpointDependent(self) -> Any:
        """
        With C{randomPorts} (masquerade random-fully) one socket gets a
        different public port for each destination: a symmetric NAT.
        """
        p2p = P2PNet(self, randomPorts=True)
        reflector = p2p.reflector(REFLECTOR_PORT)
        yield reflector.next()
        results = p2p.probe("hostA", [
            {"socket": "s", "bind": ["0.0.0.0", 0], "to": [TP, REFLECTOR_PORT]},
            {"socket": "s", "bind": None, "to": [OTHER, REFLECTOR_PORT]},
        ])
        mapped = [r["mapped"] for r in results]
        print(f"\nport {results[0]['local'][1]}: mapped {mapped}")
        self.assertEqual({m[0] for m in mapped}, {NAT_PUBLIC["A"]})
        self.assertNotEqual(mapped[0][1], mapped[1][1])


def startTP(testCase: TestCase, p2p: P2PNet) -> Background:
    """
    C{twist tp} in the public namespace with TLS and QUIC on TP's address
    (QUIC on L{QUIC_PORT}, which answers STUN).
    """
    pki = TestPKI.create(testCase.mktemp())
    d = pki.directory
    pki.ca.issue("tp.test", dns=("tp.test",), ips=(TP,), server=True).write(d / "server.pem", d / "server.key")
    path = d / "tp.toml"
    path.write_text(f"""
[server]
listen = "tcp:8443:interface={TP}"
quic = ["{TP}:{QUIC_PORT}"]
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"
state_dir = "state"

[[rules]]
identities = "*"
hosts = ["127.0.0.0/8"]
ports = "*"
""")
    return Background(testCase, p2p.exec("public") + twistCommand() + ["--log-format=text", "--log-file=+", "tp", "--config", str(path)])


class StunThroughNatTests(TestCase):
    timeout = 60

    def test_reflexiveAddressIsTheNats(self) -> None:
        """
        A binding request from hostA to TP's QUIC port (twist tp in the
        public namespace) is answered with natA's public address and the
        port natA mapped the request to (the socket's own: one host, port
        kept), not hostA's private address.
        """
        p2p = P2PNet(self)
        startTP(self, p2p)
        answer = p2p.stun("hostA", (TP, QUIC_PORT))
        self.assertEqual(answer["class"], "RESPONSE")
        self.assertEqual(answer["mapped"], [NAT_PUBLIC["A"], answer["local"][1]])
        self.assertGreaterEqual(p2p.counters("natA")["fromTP"][0], 1)


class IceTests(TestCase):
    timeout = 60

    def agents(self, p2p: P2PNet, *extra: str) -> tuple[Child, Child]:
        startTP(self, p2p)
        # TP answers STUN: aioice gives up on a server-reflexive candidate
        # after 5 s, so wait for TP first.
        p2p.stun("hostA", (TP, QUIC_PORT))
        stun = f"--stun={TP}:{QUIC_PORT}"
        return (
            Child(self, p2p.python("hostA", "agent", "--controlling", stun, *extra)),
            Child(self, p2p.python("hostB", "agent", stun, *extra)),
        )

    @defer.inlineCallbacks
    def signal(self, p2p: P2PNet, a: Child, b: Child) -> Any:
        """
        Be the signalling channel: pass each agent's credentials and
        candidates to the other, as TP will; return both offers.

        hostA gets hostB's first and starts its checks; hostB gets hostA's
        only once natB has seen one of them come in unsolicited, so the
        order that breaks hole punching through a NAT without a WAN
        firewall (L{tpproxy.test.p2pnet}) happens in every run.
        """
        offerA, offerB = yield defer.gatherResults([a.next(), b.next()], consumeErrors=True)
        a.send({"ice": offerB["ice"]})
        yield waitFor(lambda: p2p.counters("natB")["unsolicited"][0] > 0, "natB to see hostA's first check")
        b.send({"ice": offerA["ice"]})
        return offerA, offerB

    @defer.inlineCallbacks
    def test_directBetweenNats(self) -> Any:
        """
        ICE between hostA (controlling) and hostB, each behind its NAT,
        with TP's STUN: each gathers a host and a server-reflexive
        candidate (its NAT's public address), ICE connects on a pair whose
        remote end is the peer NAT's public address (host/srflx: aioice
        pairs its host socket, whose packets leave as its srflx address),
        8 KiB go each way intact, and natA's counters show the bytes went
        straight to and from natB's public address, with only a few STUN
        packets to TP.
        """
        p2p = P2PNet(self)
        a, b = self.agents(p2p)
        offers = yield self.signal(p2p, a, b)
        for offer, side in zip(offers, "AB"):
            types = sorted(sdp.split()[7] for sdp in offer["ice"]["candidates"])
            self.assertEqual(types, ["host", "srflx"], offer)
            srflx = [sdp.split() for sdp in offer["ice"]["candidates"] if sdp.split()[7] == "srflx"][0]
            self.assertEqual(srflx[4], NAT_PUBLIC[side])
        connectedA, connectedB = yield defer.gatherResults([a.next(), b.next()], consumeErrors=True)
        print(f"\ngathered in {offers[0]['gathered']:.2f} / {offers[1]['gathered']:.2f} s\nA: {connectedA}\nB: {connectedB}")
        for connected, peer in ((connectedA, "B"), (connectedB, "A")):
            self.assertIn("connected", connected, connected)
            self.assertEqual(connected["connected"]["local"]["type"], "host")
            self.assertEqual(connected["connected"]["remote"]["type"], "srflx")
            self.assertEqual(connected["connected"]["remote"]["host"], NAT_PUBLIC[peer])
        dataA, dataB = yield defer.gatherResults([a.next(), b.next()], consumeErrors=True)
        self.assertEqual((dataA["received"], dataB["received"]), (dataB["sent"], dataA["sent"]))
        counters = p2p.counters("natA")
        print(f"natA counters (packets, bytes): {counters}")
        self.assertGreater(counters["toPeer"][1], 8 * 1024)
        self.assertGreater(counters["fromPeer"][1], 8 * 1024)
        self.assertLess(counters["toTP"][1], 1024)
        a.send({"bye": True})
        b.send({"bye": True})
        self.assertEqual((yield a.done), 0, a.err.decode(errors="replace"))
        self.assertEqual((yield b.done), 0, b.err.decode(errors="replace"))

    @defer.inlineCallbacks
    def test_failsWhenUdpBetweenNatsIsBlocked(self) -> Any:
        """
        With UDP between the two NATs' public addresses dropped (TP still
        reachable), both agents still learn their server-reflexive
        addresses from TP, but ICE fails: aioice reports the failure itself
        once every check has timed out, which with 2 retransmissions
        (0.5 + 1 + 2 s) is about 3.5 s after the last check started.
        """
        p2p = P2PNet(self, blockUdpBetweenPeers=True)
        a, b = self.agents(p2p, "--retransmissions=2", "--connect-timeout=20")
        offerA, offerB = yield defer.gatherResults([a.next(), b.next()], consumeErrors=True)
        a.send({"ice": offerB["ice"]})
        b.send({"ice": offerA["ice"]})
        resultA, resultB = yield defer.gatherResults([a.next(), b.next()], consumeErrors=True)
        print(f"\nA: {resultA}\nB: {resultB}")
        for result in (resultA, resultB):
            self.assertEqual(result["failed"], "ConnectionError: ICE negotiation failed")
            self.assertLess(result["seconds"], 10)
        counters = p2p.counters("natA")
        self.assertGreater(counters["dropped"][0], 0)
        self.assertEqual(counters["fromPeer"][0], 0)
        self.assertEqual((yield a.done), 0)
        self.assertEqual((yield b.done), 0)

    @defer.inlineCallbacks
    def test_natWithoutWanFirewallBreaksHolePunching(self) -> Any:
        """
        Without the NATs' WAN firewall, the same exchange as
        L{test_directBetweenNats} fails: hostA's first check, accepted by
        natB itself, takes the 5-tuple natB needs for hostB's flow to natA,
        which natB therefore maps to another port.  (Why L{P2PNet} drops
        unsolicited flows by default; real routers do.)
        """
        p2p = P2PNet(self, wanFirewall=False)
        a, b = self.agents(p2p, "--retransmissions=2", "--connect-timeout=20")
        offers = yield self.signal(p2p, a, b)
        resultA, resultB = yield defer.gatherResults([a.next(), b.next()], consumeErrors=True)
        print(f"\nA: {resultA}\nB: {resultB}")
        for result in (resultA, resultB):
            self.assertEqual(result["failed"], "ConnectionError: ICE negotiation failed")
        # natA saw hostB's checks arrive from another port than hostB's
        # server-reflexive one, as new flows to itself.
        self.assertGreater(p2p.counters("natA")["unsolicited"][0], 0)
        self.assertEqual(p2p.counters("natA")["fromPeer"][0], 0)
        srflxB = [sdp.split() for sdp in offers[1]["ice"]["candidates"] if sdp.split()[7] == "srflx"][0]
        self.assertEqual(srflxB[4], NAT_PUBLIC["B"])


@defer.inlineCallbacks
def waitFor(condition: Callable[[], bool], what: str, timeout: float = 10) -> Any:
    """
    Poll C{condition} every 50 ms until it holds; fail after C{timeout}
    seconds, saying C{what} was awaited.
    """
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while not condition():
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"waited {timeout:g} s for {what}")
        yield task.deferLater(reactor, 0.05, lambda: None)
