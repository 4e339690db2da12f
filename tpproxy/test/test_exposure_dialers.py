"""
Who may dial an E2E exposure: the dialers of the exposure rule that let
its exposer expose its name, and never those of another rule that matches
the name (issue 10, section 2: an insider allowed by one rule reached an
exposure whose rule did not list it).  Unit tests of the policy and the
registry, and real TLS on 127.0.0.1 over both dial paths (a tunnel with
the inner handshake, and a direct SNI connection).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.policy import parsePolicy
from tpproxy.protocols.client import ServerAddress, TLSClientEndpoint, TunnelError, openTunnel
from tpproxy.reverse.registry import Exposure, Registry
from tpproxy.service import makeQuicListener, makeServerFactory
from tpproxy.test.support import Background, HashSink, listenLocal, run, sha256, tpCommand
from tpproxy.test.test_integration import writeClientConfig
from tpproxy.test.test_quic import QuicTestCase
from tpproxy.test.test_reverse import ControlClient, ReverseTestCase
from tpproxy.testing import REVERSE_RULES
from tpproxy.wire import ClientHello

#: dev (alice and mallory) may expose any *.localhost name to dev; bob may
#: expose bob.localhost to alice only.  alice is in both dialer lists.
GROUPS = {"dev": ["alice", "mallory"]}
RULE_DEV = {"identities": ["group:dev"], "names": "*.localhost", "dialers": ["group:dev"]}
RULE_BOB = {"identities": ["bob"], "names": "bob.localhost", "dialers": ["alice"]}


class RegistryTests(SynchronousTestCase):
    """
    L{Registry.mayDial} asks the rule recorded on the exposure.
    """

    def test_exposureWithoutRuleHasNoDialers(self) -> None:
        """
        An exposure that records no authorizing rule (a public port, or a
        bug) is dialable by nobody: the check fails closed.
        """
        registry = Registry(reactor, parsePolicy([], GROUPS, [RULE_DEV]), None, None)  # type: ignore[arg-type]
        exposure = Exposure(owner="alice", mode="e2e", control=None, name="a.localhost")  # type: ignore[arg-type]
        self.assertFalse(registry.mayDial(exposure, "alice").allowed)
        exposure.grantedBy = registry.policy.exposures[0]
        self.assertTrue(registry.mayDial(exposure, "alice").allowed)
        self.assertFalse(registry.mayDial(exposure, "bob").allowed)


class DialerRuleTests(ReverseTestCase):
    """
    bob exposes bob.localhost (allowed by his own rule, dialers: alice).
    mallory, allowed to dial dev's exposures by the dev rule whose names
    also match bob.localhost, reaches it by no path; alice does.
    """

    exposures = [RULE_DEV, RULE_BOB]

    def setUp(self) -> None:
        super().setUp()
        self.startWithExposures(self.exposures, groups=GROUPS)

    def opts(self, who: str, sni: str = "localhost") -> Any:
        return self.tlsOptions(who, sni)

    @defer.inlineCallbacks
    def register(self, name: str, who: str) -> Any:
        factory = protocol.Factory.forProtocol(lambda: ControlClient(ClientHello("listen", mode="e2e", name=name)))
        endpoint = TLSClientEndpoint(reactor, ServerAddress("localhost", self.port), self.opts(who))
        control = yield endpoint.connect(factory)
        self.addCleanup(lambda: control.lost.called or control.transport.abortConnection())
        return control

    def tunnel(self, who: str, name: str) -> Any:
        return openTunnel(
            reactor,
            ServerAddress("localhost", self.port),
            self.opts(who),
            ClientHello.connect(name, 443),
            innerTLS=lambda inner: self.opts(who, inner),
            timeout=10,
        )

    @defer.inlineCallbacks
    def sni(self, who: str, name: str) -> Any:
        """
        A direct TLS connection with SNI C{name}: fires with the connected
        protocol once the handshake has passed, or fails.
        """
        handshake: defer.Deferred[None] = defer.Deferred()

        class Probe(protocol.Protocol):
            def connectionMade(self) -> None:
                # With TLS 1.3 the client's handshake ends before the
                # server has checked its certificate: write, so that a
                # refusal arrives as a lost connection.
                self.transport.write(b"x")  # type: ignore[union-attr]

            def dataReceived(self, data: bytes) -> None:
                pass

            def connectionLost(self, reason: Any) -> None:
                if not handshake.called:
                    handshake.errback(reason)

        endpoint = TLSClientEndpoint(reactor, ServerAddress("localhost", self.port), self.opts(who, name))
        proto = yield endpoint.connect(protocol.Factory.forProtocol(Probe))

        def abort() -> None:
            # Our own abort of a connection that passed: not a result.
            if not handshake.called:
                handshake.addErrback(lambda f: None)
                proto.transport.abortConnection()

        self.addCleanup(abort)
        return proto, handshake

    def firstIncoming(self, control: Any, attempt: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """
        The first incoming event C{control} hears, or the failure of the
        dial C{attempt} that should have caused it, whichever comes first
        (so a refused dial fails the test at once instead of waiting).
        """
        result: defer.Deferred[Any] = defer.Deferred()

        def arrived(event: Any) -> None:
            if not result.called:
                result.callback(event)

        def failed(reason: Any) -> None:
            if not result.called:
                result.errback(reason)

        control.incoming.get().addCallback(arrived)
        attempt.addErrback(failed)
        return result

    @defer.inlineCallbacks
    def exposeBob(self) -> Any:
        control = yield self.register("bob.localhost", "bob")
        answer = yield control.answer
        self.assertTrue(answer.ok, answer)
        return control

    @defer.inlineCallbacks
    def test_tunnelPath(self) -> Any:
        """
        Through a TP tunnel: mallory's inner handshake is refused and bob
        hears of no dialer; alice's dial then reaches bob as the first and
        only incoming event (so mallory's would have come before it).
        """
        control = yield self.exposeBob()
        failure = yield self.assertFailure(self.tunnel("mallory", "bob.localhost"), TunnelError)
        self.assertIn("bob.localhost", str(failure))
        event = yield self.firstIncoming(control, self.tunnel("alice", "bob.localhost"))
        self.assertEqual(event.get("identity"), "alice")
        self.assertEqual(control.incoming.pending, [])

    @defer.inlineCallbacks
    def test_sniPath(self) -> Any:
        """
        Directly by SNI: mallory's handshake is refused by the name's
        dialer check; alice's reaches bob as the only incoming event.
        """
        control = yield self.exposeBob()
        _, refused = yield self.sni("mallory", "bob.localhost")
        yield self.assertFailure(refused, Exception)
        _, passed = yield self.sni("alice", "bob.localhost")
        event = yield self.firstIncoming(control, passed)
        self.assertEqual(event.get("identity"), "alice")
        self.assertEqual(control.incoming.pending, [])

    @defer.inlineCallbacks
    def test_takeoverRefused(self) -> Any:
        """
        mallory may expose *.localhost by the dev rule, but cannot take
        bob.localhost over while bob holds it (which would make the dev
        rule's dialers apply): name_taken, and bob's exposure keeps its
        dialers.
        """
        control = yield self.exposeBob()
        other = yield self.register("bob.localhost", "mallory")
        answer = yield other.answer
        self.assertFalse(answer.ok)
        self.assertEqual(answer.code, "name_taken")
        yield self.assertFailure(self.tunnel("mallory", "bob.localhost"), TunnelError)
        event = yield self.firstIncoming(control, self.tunnel("alice", "bob.localhost"))
        self.assertEqual(event.get("identity"), "alice")

    @defer.inlineCallbacks
    def test_devMemberExposesTheName(self) -> Any:
        """
        alice, a dev member, exposes bob.localhost while bob does not: the
        dev rule let her, so its dialers apply and bob's rule (which
        matches the name but does not list alice as an exposer) has no
        say.  bob is refused; mallory, a dev dialer, arrives as the first
        and only incoming event.
        """
        control = yield self.register("bob.localhost", "alice")
        answer = yield control.answer
        self.assertTrue(answer.ok, answer)
        yield self.assertFailure(self.tunnel("bob", "bob.localhost"), TunnelError)
        event = yield self.firstIncoming(control, self.tunnel("mallory", "bob.localhost"))
        self.assertEqual(event.get("identity"), "mallory")
        self.assertEqual(control.incoming.pending, [])


class DialerRuleOtherOrderTests(DialerRuleTests):
    """
    The same with bob's rule first: the order of the rules does not change
    who may dial, since each exposure keeps the rule that authorized its
    exposer (only bob's rule lists bob; only the dev rule lists alice).
    """

    exposures = [RULE_BOB, RULE_DEV]


class QuicDialerRuleTests(QuicTestCase):
    """
    The same hole over QUIC, with the real C{tp} client: bob exposes
    bob.localhost over QUIC; C{tp connect --transport quic} as mallory (a
    dev member, whose rule matches the name) is refused, and alice's gets
    through.  Each dial over QUIC is a stream TP serves with the same
    server protocol as over TLS.
    """

    def startTP(self, quic: bool = True, **server: Any) -> int:
        self.pki.client("mallory")
        self.config = self.pki.serverConfig(
            REVERSE_RULES,
            groups=GROUPS,
            exposures=[RULE_DEV, RULE_BOB],
            reverse={"public_interface": "127.0.0.1"},
            e2e={"ca_certificate": "ca.pem", "ca_key": "ca.key"},
        )
        factory = makeServerFactory(self.config, reactor)
        self.tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self.tcp.getHost().port
        self.addCleanup(self.tcp.stopListening)
        self.listener = makeQuicListener(self.config, reactor, factory.wrappedFactory)
        self.udp = reactor.listenUDP(self.port, self.listener, interface="127.0.0.1")
        self.addCleanup(self.udp.stopListening)
        for name in ("alice", "bob", "mallory"):
            d = self.pki.directory
            writeClientConfig(self.pki, self.port, cert=str(d / f"{name}.pem"), key=str(d / f"{name}.key"), name=f"{name}.toml")
        return self.port

    @defer.inlineCallbacks
    def test_quicTunnelPath(self) -> Any:
        sinkPort, sink = listenLocal(self, HashSink)
        self.startTP()
        exposer = Background(
            self, tpCommand() + ["--config", self.clientConfig("bob"), "--transport", "quic", "expose", f"127.0.0.1:{sinkPort}", "--e2e", "bob.localhost"]
        )
        yield exposer.waitForStderr(b"; Ctrl-C stops")
        connect = ["--transport", "quic", "connect", "bob.localhost:9"]
        refused = yield run(tpCommand() + ["--config", self.clientConfig("mallory"), *connect], stdin=b"from mallory")
        self.assertNotEqual(refused.status, 0, refused)
        self.assertIn(b"bob.localhost", refused.err)
        data = os.urandom(4096)
        result = yield run(tpCommand() + ["--config", self.clientConfig("alice"), *connect], stdin=data)
        self.assertEqual(result.status, 0, result)
        self.assertEqual(result.out.decode(), f"{len(data)} {sha256(data)}\n")
        # mallory's session, had it been let through, would have come first.
        self.assertEqual(sink.accepted, 1)
