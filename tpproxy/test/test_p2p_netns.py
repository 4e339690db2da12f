"""
P2P end to end (issue 16), in network namespaces (root; tpproxy.test.p2pnet):
TP in the "public" namespace; bob's sshd and `tp expose --e2e --p2p` behind
natB; alice's ssh with `tp connect --p2p` as its ProxyCommand behind natA.
TP authorizes and introduces; the bytes go directly between the NATs.
With UDP between the NATs blocked, `--p2p auto` falls back to TP.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tpproxy.test.p2pnet import NAMES, P2PNet, writeDeployment
from tpproxy.test.support import SSHD, Background, run, tpCommand, twistCommand

PORT = 4443
NAME = "ssh.p2p.test"


class P2PNetCase(TestCase):
    """
    The topology with TP, bob's sshd and exposer, and alice's ssh.
    """

    timeout = 180
    blocked = False

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.net = P2PNet(self, blockUdpBetweenPeers=self.blocked)
        self.directory = d = Path(self.mktemp())
        writeDeployment(d, PORT, NAME)
        self.tp = Background(self, self.net.exec("public") + twistCommand() + ["--log-format=text", "--log-file=+", "tp", "--config", str(d / "tp.toml")])
        yield self.tp.waitForStderr(b"TP serving", timeout=60)
        self.sshd = yield SSHD.start(self, self.net.net, NAMES["hostB"])
        self.exposer = Background(
            self, self.net.exec("hostB") + tpCommand() + ["--config", str(d / "bob.toml"), "expose", f"127.0.0.1:{self.sshd.port}", "--e2e", NAME, "--p2p"]
        )
        yield self.exposer.waitForStderr(b"Exposing", timeout=60)

    def ssh(self, *command: str, stdin: bytes = b"", p2p: str = "only") -> Any:
        proxy = " ".join(tpCommand()) + f" --config {self.directory / 'alice.toml'} connect --p2p {p2p} %h:%p"
        return run(self.net.exec("hostA") + self.sshd.args(NAME, 22, *command, proxy=proxy), stdin=stdin, timeout=120)

    def tpAudit(self) -> str:
        return self.tp.stderr.decode(errors="replace")


class P2PEndToEndTests(P2PNetCase):
    @defer.inlineCallbacks
    def test_sshDirect(self) -> Any:
        """
        ssh through `tp connect --p2p only` logs in and runs a command; the
        status line says p2p; 10 MB each way (cat) come back intact; the
        bytes crossed natA towards natB's public address, and TP audited an
        introduction (result p2p), not a tunnel.
        """
        result = yield self.ssh("echo", "hello")
        self.assertEqual(result.out, b"hello\n", result)
        self.assertIn(b"(v1, p2p)", result.err)
        data = os.urandom(10 * 1024 * 1024)
        before = self.net.counters("natA")
        result = yield self.ssh("cat", stdin=data)
        self.assertEqual(result.status, 0, result.err[-2000:])
        self.assertEqual(hashlib.sha256(result.out).hexdigest(), hashlib.sha256(data).hexdigest())
        after = self.net.counters("natA")
        toPeer = after["toPeer"][1] - before["toPeer"][1]
        fromPeer = after["fromPeer"][1] - before["fromPeer"][1]
        self.assertGreater(toPeer, len(data))
        self.assertGreater(fromPeer, len(data))
        audit = self.tpAudit()
        self.assertEqual(audit.count(f"alice {NAME}:22: p2p - introduced to bob; bytes go direct, TP does not see them"), 2)
        # No tunnel went through TP: no relayed dial of alice's was audited.
        self.assertNotIn(f"alice {NAME}:22: ok", audit)
        self.assertNotIn(f"alice {NAME}:22: e2e", audit)
        self.assertNotIn("inner identity", audit)
        print(f"\nthrough natA towards natB: {toPeer} B out, {fromPeer} B back for {len(data)} B each way")


class P2PFallbackTests(P2PNetCase):
    """
    UDP between the two NATs is dropped: no direct path.
    """

    blocked = True

    @defer.inlineCallbacks
    def test_fallsBackToTP(self) -> Any:
        """
        `--p2p auto`: ICE finds no path within its bound, and the dial goes
        through TP as an ordinary E2E tunnel: ssh works, the status line
        says so, TP audited the introduction and then the relayed tunnel
        with its bytes.  `--p2p only` fails instead.
        """
        data = os.urandom(1024 * 1024)
        result = yield self.ssh("cat", stdin=data, p2p="auto")
        self.assertEqual(result.status, 0, result.err[-2000:])
        self.assertEqual(hashlib.sha256(result.out).hexdigest(), hashlib.sha256(data).hexdigest())
        self.assertIn(b"No direct path", result.err)
        self.assertNotIn(b"(v1, p2p)", result.err)
        audit = self.tpAudit()
        self.assertIn(f"alice {NAME}:22: p2p - introduced to bob", audit)
        self.assertIn(f"alice {NAME}:22: ok - inner identity alice", audit)
        self.assertIn(f"alice dials {NAME} through TP: P2P session", audit)
        counters = self.net.counters("natA")
        self.assertEqual(counters["toPeer"][1], 0)
        result = yield self.ssh("echo", "hello", p2p="only")
        self.assertNotEqual(result.status, 0)
        self.assertIn(b"no direct path", result.err)
