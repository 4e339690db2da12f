"""
Real OpenSSH through a cluster of TP instances (issue 13): a real sshd
exposed by E2E name at instance A, reached by a real C{ssh} whose
ProxyCommand is C{tp connect} to instance B or C, over TLS and over QUIC:
each dial crosses a peer link from B or C to A.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.protocols.portforward import ProxyFactory
from twisted.trial.unittest import TestCase

from tpproxy.test.support import SSHD, ProcessResult, run, sha256, tpCommand
from tpproxy.test.test_cluster import ThreeInstances, logged

NAME = "ssh.alice.localhost"
MiB = 1024 * 1024


class CountingForward(ProxyFactory):
    """
    A plain TCP forward to the sshd that counts the connections it passes
    on: what the sshd saw.
    """

    accepted = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.accepted += 1
        return super().buildProtocol(addr)


class SSHThroughClusterTests(ThreeInstances, TestCase):
    """
    alice exposes a real sshd at A (C{tp expose --e2e ssh.alice.localhost});
    a real C{ssh} whose ProxyCommand is C{tp connect} to B or C reaches it
    over the peer link from that instance to A, or is refused there.
    """

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        # sshd first: without OpenSSH the test skips (fails under CI=true)
        # before three instances start.
        self.sshd = yield SSHD.start(self)
        self.forward = CountingForward("127.0.0.1", self.sshd.port)
        port = reactor.listenTCP(0, self.forward, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.forwardPort = port.getHost().port
        yield super().setUp()

    @defer.inlineCallbacks
    def exposeSSHD(self, transport: str) -> Any:
        """
        alice exposes the sshd at A as C{NAME}, signalling over
        C{transport}; B and C route the name to A.
        """
        yield self.expose(self.forwardPort, "--e2e", NAME, "--transport", transport)
        for i in (2, 3):
            yield self.servers[i].waitForStderr(f"Routing E2E name {NAME} of alice to instance(s) ['tp-1']".encode())

    def ssh(
        self, who: str, at: int, transport: str, *command: str, stdin: bytes = b""
    ) -> defer.Deferred[ProcessResult]:
        """
        Run C{ssh NAME command} as C{who}: its ProxyCommand is C{tp connect}
        to instance C{at} over C{transport}.
        """
        proxy = " ".join(tpCommand()) + f" --config {self.client(who, at)} --transport {transport} connect %h:%p"
        return run(self.sshd.args(NAME, 22, *command, proxy=proxy), stdin=stdin, timeout=60)

    def explain(self, result: ProcessResult) -> str:
        """
        What to read when an ssh run went wrong: its result and the tail of
        each instance's log.
        """
        logs = b"".join(b"\n--- tp-%d\n" % i + s.stderr[-2000:] for i, s in self.servers.items())
        return f"{result!r}{logs.decode(errors='replace')}"

    def assertVia(self, result: ProcessResult, at: int, transport: str) -> None:
        """
        C{result} is a successful ssh run whose C{tp connect} went to
        instance C{at} over C{transport}.
        """
        self.assertEqual(result.status, 0, self.explain(result))
        self.assertIn(f"Connecting to {NAME}:22 via 127.0.0.{at}:{self.port} (v1, {transport})".encode(), result.err)

    @defer.inlineCallbacks
    def sshThroughBAndC(self) -> Any:
        """
        bob's ssh through C over TLS, through B over TLS and through C over
        QUIC echoes a random token back (only the sshd could run the
        command), then 1 MiB goes up (C{cat > file}, over TLS) and another
        comes down (C{cat file}, over QUIC) through C, intact.  A's log
        shows each dial arriving over the peer link of the instance it was
        sent to, and B's and C's audit logs each dialler's success.
        """
        for transport, at in (("tls", 3), ("tls", 2), ("quic", 3)):
            token = os.urandom(16).hex()
            result = yield self.ssh("bob", at, transport, "echo", token)
            self.assertVia(result, at, transport)
            self.assertEqual(result.out, f"{token}\n".encode())

        up, down = self.sshd.dir / "up.bin", self.sshd.dir / "down.bin"
        data = os.urandom(MiB)
        result = yield self.ssh("bob", 3, "tls", "cat", ">", str(up), stdin=data)
        self.assertVia(result, 3, "tls")
        self.assertEqual(sha256(up.read_bytes()), sha256(data))
        data = os.urandom(MiB)
        down.write_bytes(data)
        result = yield self.ssh("bob", 3, "quic", "cat", str(down))
        self.assertVia(result, 3, "quic")
        self.assertEqual((len(result.out), sha256(result.out)), (MiB, sha256(data)))

        self.assertEqual(self.forward.accepted, 5)
        # A was told of each dialer by the instance that forwarded it.
        incoming = f" for E2E name {NAME} of alice".encode()
        yield logged(self.servers[1], b"via tp-3" + incoming, times=4)
        yield logged(self.servers[1], b"via tp-2" + incoming, times=1)
        self.assertEqual(self.servers[1].stderr.count(b"] incoming "), 5)
        # B and C log each dialer's end (after ssh has exited).
        ok = f"bob {NAME}:22: ok - inner identity bob".encode()
        yield logged(self.servers[3], ok, times=4)
        yield logged(self.servers[2], ok, times=1)

    def test_exposerOverQUIC(self) -> Any:
        """
        The exposer signals A over QUIC (each session is a stream A opens on
        its connection): ssh through B and C reaches the sshd.
        """
        return self.exposeSSHD("quic").addCallback(lambda _: self.sshThroughBAndC())

    def test_exposerOverTLS(self) -> Any:
        """
        The exposer signals A over TLS (each session is a new connection it
        opens to A): ssh through B and C reaches the sshd.
        """
        return self.exposeSSHD("tls").addCallback(lambda _: self.sshThroughBAndC())

    @defer.inlineCallbacks
    def test_dialerNotAllowed(self) -> Any:
        """
        mallory (not among the name's dialers) runs the same ssh through C,
        over TLS and over QUIC: ssh fails, C logs that mallory may not dial
        the name, and nothing reaches A or the sshd.  bob's ssh through C
        afterwards does (so the sshd would have seen mallory's connection).
        """
        yield self.exposeSSHD("quic")
        for transport in ("tls", "quic"):
            result = yield self.ssh("mallory", 3, transport, "echo", "reached")
            self.assertEqual((result.status, result.out), (255, b""), self.explain(result))
            self.assertIn(f"via 127.0.0.3:{self.port} (v1, {transport})".encode(), result.err)
            self.assertIn(f"tp: TP refused the E2E TLS connection to {NAME}".encode(), result.err)
        why = f"mallory {NAME}:22: e2e_refused - not allowed to dial {NAME}: mallory is not among the dialers of {NAME}"
        yield logged(self.servers[3], why.encode(), times=2)
        self.assertNotIn(b"] incoming ", self.servers[1].stderr)
        self.assertEqual(self.forward.accepted, 0)

        result = yield self.ssh("bob", 3, "tls", "echo", "reached")
        self.assertVia(result, 3, "tls")
        self.assertEqual(result.out, b"reached\n")
        self.assertEqual(self.forward.accepted, 1)
        yield logged(self.servers[1], f"via tp-3 for E2E name {NAME}".encode())
        self.assertEqual(self.servers[1].stderr.count(b"] incoming "), 1)
