"""
Regression tests for review findings on the TLS that runs inside a TP
tunnel to an E2E name: the inner SNI cannot choose another name's
certificate and dialer check, tls-alpn-01 is never answered there, and a
name whose certificate is still being obtained is refused cleanly.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy.acme.client import tlsALPNCertificate
from tpproxy.protocols.client import Refused, ServerAddress, TLSClientEndpoint, TunnelError, openTunnel
from tpproxy.test.test_reverse import ControlClient, ReverseTestCase
from tpproxy.wire import ClientHello


@implementer(IOpenSSLClientConnectionCreator)
class ValidatorLike:
    """
    Client TLS as an ACME tls-alpn-01 validator makes it: ALPN acme-tls/1
    alone, no client certificate, no verification.
    """

    def __init__(self, sni: bytes) -> None:
        self.sni = sni

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_alpn_protos([b"acme-tls/1"])
        ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
        conn = SSL.Connection(ctx, None)
        conn.set_tlsext_host_name(self.sni)
        conn.set_app_data(tlsProtocol)
        return conn


class Pending:
    """
    A certificate source whose answer never comes (an ACME order running).
    """

    def certificateFor(self, name: str) -> Any:
        return defer.Deferred()


class InnerTLSTests(ReverseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.startWithExposures(
            [
                {"identities": ["alice"], "names": "secret.localhost", "dialers": ["alice"]},
                {"identities": ["alice"], "names": "*.localhost", "dialers": ["alice", "mallory"]},
            ]
        )

    def opts(self, who: str, sni: str) -> Any:
        return self.tlsOptions(who, sni)

    @defer.inlineCallbacks
    def register(self, name: str) -> Any:
        factory = protocol.Factory.forProtocol(lambda: ControlClient(ClientHello("listen", mode="e2e", name=name)))
        endpoint = TLSClientEndpoint(reactor, ServerAddress("localhost", self.port), self.opts("alice", "localhost"))
        control = yield endpoint.connect(factory)
        self.addCleanup(lambda: control.lost.called or control.transport.abortConnection())
        return control

    def tunnel(self, name: str, innerTLS: Any) -> Any:
        return openTunnel(
            reactor, ServerAddress("localhost", self.port), self.opts("mallory", "localhost"), ClientHello.connect(name, 443), innerTLS=innerTLS, timeout=5
        )

    @defer.inlineCallbacks
    def assertOnlyAliceArrives(self, control: Any, name: str) -> Any:
        """
        alice, an allowed dialer, dials C{name}: her incoming event must be
        the first and only one its exposer hears, so an event caused by an
        earlier refused attempt would show up here.  Her dial failing
        fails the test at once.
        """
        arrived: defer.Deferred[Any] = defer.Deferred()

        def settle(outcome: Any) -> None:
            # The first of alice's event and her dial's failure decides.
            if not arrived.called:
                (arrived.errback if isinstance(outcome, Failure) else arrived.callback)(outcome)

        control.incoming.get().addCallback(settle)
        openTunnel(
            reactor,
            ServerAddress("localhost", self.port),
            self.opts("alice", "localhost"),
            ClientHello.connect(name, 443),
            innerTLS=lambda inner: self.opts("alice", inner),
            timeout=5,
        ).addErrback(settle)
        event = yield arrived
        self.assertEqual(event.get("identity"), "alice")
        self.assertEqual(control.incoming.pending, [])

    @defer.inlineCallbacks
    def test_innerSNICannotPickAnotherName(self) -> Any:
        """
        Mallory may dial open.localhost but not secret.localhost.  A tunnel
        to secret.localhost whose inner ClientHello names open.localhost
        gets secret.localhost's certificate and check, so it fails, and the
        exposer of secret.localhost hears of no dialer.
        """
        secret = yield self.register("secret.localhost")
        self.assertTrue((yield secret.answer).ok)
        opened = yield self.register("open.localhost")
        self.assertTrue((yield opened.answer).ok)
        yield self.assertFailure(self.tunnel("secret.localhost", lambda name: self.opts("mallory", "open.localhost")), TunnelError)
        yield self.assertOnlyAliceArrives(secret, "secret.localhost")
        yield self.assertOnlyAliceArrives(opened, "open.localhost")

    @defer.inlineCallbacks
    def test_innerSameNameStillChecked(self) -> Any:
        """
        The straightforward attempt is refused too, as before.
        """
        secret = yield self.register("secret.localhost")
        self.assertTrue((yield secret.answer).ok)
        yield self.assertFailure(self.tunnel("secret.localhost", lambda name: self.opts("mallory", name)), TunnelError)
        yield self.assertOnlyAliceArrives(secret, "secret.localhost")

    @defer.inlineCallbacks
    def test_noACMEChallengeInsideATunnel(self) -> Any:
        """
        With a tls-alpn-01 challenge pending (TP renewing its own name), an
        inner handshake offering acme-tls/1 without a certificate fails: the
        challenge is answered on the listener only.
        """
        opened = yield self.register("open.localhost")
        self.assertTrue((yield opened.answer).ok)
        self.factory.wrappedFactory.serverTLS.challengeCertificates["localhost"] = tlsALPNCertificate("localhost", "tok.thumb")
        failure = yield self.assertFailure(self.tunnel("open.localhost", lambda name: ValidatorLike(b"localhost")), TunnelError)
        self.assertIn("certificate required", str(failure))
        yield self.assertOnlyAliceArrives(opened, "open.localhost")
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_dialWhileCertificatePending(self) -> Any:
        """
        A name exposed while its certificate is still being obtained is
        refused to dialers with not_accepted, and nothing breaks.
        """
        self.factory.wrappedFactory.registry.certificates = Pending()
        yield self.register("open.localhost")
        failure = yield self.assertFailure(self.tunnel("open.localhost", lambda name: self.opts("mallory", name)), Refused)
        self.assertEqual(failure.code, "not_accepted")
        self.assertIn("not ready", failure.message)
        self.assertEqual(self.flushLoggedErrors(), [])
