"""
Who may dial an E2E exposure: the dialers of the exposure rule that let
its exposer expose its name, and never those of another rule that matches
the name (issue 10, section 2: an insider allowed by one rule reached an
exposure whose rule did not list it).  Unit tests of the policy and the
registry, and real TLS on 127.0.0.1 over both dial paths (a tunnel with
the inner handshake, and a direct SNI connection).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.policy import parsePolicy
from tpproxy.protocols.client import ServerAddress, TLSClientEndpoint, TunnelError, openTunnel
from tpproxy.reverse import Exposure, Registry
from tpproxy.service import makeServerFactory
from tpproxy.testing import REVERSE_RULES
from tpproxy.tls import clientTLS, loadCertificates, loadKey
from tpproxy.wire import ClientHello

from .test_reverse import ControlClient, ReverseTestCase

#: dev (alice and mallory) may expose any *.localhost name to dev; bob may
#: expose bob.localhost to alice only.  alice is in both dialer lists.
GROUPS = {"dev": ["alice", "mallory"]}
RULE_DEV = {"identities": ["group:dev"], "names": "*.localhost", "dialers": ["group:dev"]}
RULE_BOB = {"identities": ["bob"], "names": "bob.localhost", "dialers": ["alice"]}


class PolicyTests(SynchronousTestCase):
    """
    L{Policy.mayExposeName} names the rule that authorized the exposer;
    L{Policy.mayDialExposure} answers by that rule's dialers only.
    """

    def check(self, exposures: list[dict[str, Any]]) -> None:
        policy = parsePolicy([], GROUPS, exposures)
        bobs = policy.mayExposeName("bob", "bob.localhost")
        self.assertTrue(bobs.allowed)
        self.assertEqual(policy.exposures[bobs.rule].identities, ("bob",))  # type: ignore[index]
        self.assertTrue(policy.mayDialExposure(bobs.rule, "alice", "bob.localhost").allowed)  # type: ignore[arg-type]
        refused = policy.mayDialExposure(bobs.rule, "mallory", "bob.localhost")  # type: ignore[arg-type]
        self.assertFalse(refused.allowed)
        self.assertIn("mallory is not among the dialers of bob.localhost", refused.reason)
        # The same name exposed by a dev member is governed by the dev rule.
        alices = policy.mayExposeName("alice", "bob.localhost")
        self.assertTrue(alices.allowed)
        self.assertTrue(policy.mayDialExposure(alices.rule, "mallory", "bob.localhost").allowed)  # type: ignore[arg-type]
        self.assertFalse(policy.mayDialExposure(alices.rule, "bob", "bob.localhost").allowed)  # type: ignore[arg-type]

    def test_devRuleFirst(self) -> None:
        self.check([RULE_DEV, RULE_BOB])

    def test_bobRuleFirst(self) -> None:
        self.check([RULE_BOB, RULE_DEV])

    def test_firstGrantingRuleDecides(self) -> None:
        """
        When several rules let the same exposer expose the name, the first
        of them (in file order) gives the dialers: as everywhere in the
        policy, the first match decides.
        """
        wide = {"identities": ["bob"], "names": "*.localhost", "dialers": ["mallory"]}
        policy = parsePolicy([], GROUPS, [RULE_BOB, wide])
        rule = policy.mayExposeName("bob", "bob.localhost").rule
        self.assertEqual(rule, 0)
        self.assertFalse(policy.mayDialExposure(rule, "mallory", "bob.localhost").allowed)  # type: ignore[arg-type]
        policy = parsePolicy([], GROUPS, [wide, RULE_BOB])
        rule = policy.mayExposeName("bob", "bob.localhost").rule
        self.assertEqual(rule, 0)
        self.assertTrue(policy.mayDialExposure(rule, "mallory", "bob.localhost").allowed)  # type: ignore[arg-type]
        self.assertFalse(policy.mayDialExposure(rule, "alice", "bob.localhost").allowed)  # type: ignore[arg-type]


class RegistryTests(SynchronousTestCase):
    def test_exposureWithoutRuleHasNoDialers(self) -> None:
        """
        An exposure that records no authorizing rule (a public port, or a
        bug) is dialable by nobody: the check fails closed.
        """
        registry = Registry(reactor, parsePolicy([], GROUPS, [RULE_DEV]), None, None)  # type: ignore[arg-type]
        exposure = Exposure(owner="alice", mode="e2e", control=None, name="a.localhost")  # type: ignore[arg-type]
        self.assertFalse(registry.mayDial(exposure, "alice").allowed)
        exposure.rule = 0
        self.assertTrue(registry.mayDial(exposure, "alice").allowed)


class DialerRuleTests(ReverseTestCase):
    """
    bob exposes bob.localhost (allowed by his own rule, dialers: alice).
    mallory, allowed to dial dev's exposures by the dev rule whose names
    also match bob.localhost, reaches it by no path; alice does.
    """

    exposures = [RULE_DEV, RULE_BOB]

    def setUp(self) -> None:
        super().setUp()
        tables = {
            "groups": GROUPS,
            "exposures": self.exposures,
            "reverse": {"public_interface": "127.0.0.1"},
            "e2e": {"ca_certificate": "ca.pem", "ca_key": "ca.key"},
        }
        self.config = self.pki.serverConfig(REVERSE_RULES, **tables)
        self.factory = makeServerFactory(self.config, reactor)
        self.server = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.server.getHost().port
        self.addCleanup(self.stopTP)

    def opts(self, who: str, sni: str = "localhost") -> Any:
        d = self.pki.directory
        return clientTLS(sni, loadCertificates(str(d / "ca.pem")), loadCertificates(str(d / f"{who}.pem")), loadKey(str(d / f"{who}.key")))

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
        self.addCleanup(lambda: handshake.called or proto.transport.abortConnection())
        return proto, handshake

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
        self.tunnel("alice", "bob.localhost").addErrback(lambda f: None)
        event = yield control.incoming.get()
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
        yield self.sni("alice", "bob.localhost")
        event = yield control.incoming.get()
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
        self.tunnel("alice", "bob.localhost").addErrback(lambda f: None)
        event = yield control.incoming.get()
        self.assertEqual(event.get("identity"), "alice")


class DialerRuleOtherOrderTests(DialerRuleTests):
    """
    The same with bob's rule first: the order of the rules does not matter
    here, since only bob's rule authorizes bob.
    """

    exposures = [RULE_BOB, RULE_DEV]
