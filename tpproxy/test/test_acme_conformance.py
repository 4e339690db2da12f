"""
One conformance suite for L{IAcmeClient}, run against three things:

  - L{FakeAcmeClient}, the fake the issuing service's scheduling tests use;
  - the real L{AcmeClient} against L{MemoryCA}, an in-memory RFC 8555 CA
    reached through treq's in-memory agent;
  - the real L{AcmeClient} against Pebble on loopback (skipped when Pebble
    is not installed, an error under C{CI=true}).

Then the checks L{MemoryCA} makes, shown by clients broken on purpose: a
client that gets the protocol wrong fails against it.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

import tpproxy.acme.client as clientModule
from tpproxy.acme.client import (
    HTTP01,
    TLSALPN01,
    AcmeClient,
    AcmeError,
    IAcmeClient,
    IChallengeResponder,
    accountJWK,
    keyAuthorization,
)
from tpproxy.acme.responders import HTTP01Responder, TLSALPN01Responder
from tpproxy.acme.testing import ChallengeTargets, FakeAcmeClient, MemoryCA, runUntilFired
from tpproxy.pki import CertificateAuthority, loadCertificates, newKey
from tpproxy.test.pebble import Pebble
from tpproxy.transports.servertls import ServerTLS
from tpproxy.verify import ClientCertChecker


@implementer(IChallengeResponder)
class Recording:
    """
    An L{IChallengeResponder} that records its calls and passes them on,
    the key authorization changed by C{tamper}.
    """

    def __init__(self, responder: Any, tamper: Any = lambda keyAuthz: keyAuthz) -> None:
        self.responder = responder
        self.challengeType = responder.challengeType
        self.tamper = tamper
        self.calls: list[tuple[str, ...]] = []

    def start(self, name: str, token: str, keyAuthorization: str) -> None:
        self.calls.append(("start", name, token, keyAuthorization))
        self.responder.start(name, token, self.tamper(keyAuthorization))

    def stop(self, name: str, token: str) -> None:
        self.calls.append(("stop", name, token))
        self.responder.stop(name, token)


def names(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName))


def spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class AcmeClientContract:
    """
    What the issuing service relies on from an L{IAcmeClient}.  A backend
    provides C{startCA()} (may return a Deferred), C{makeClient(key)},
    C{settle(d)} (a Deferred firing when C{d} has, driving a test clock
    if it has one) and C{forgetAccounts()} (may return a Deferred).

    The suite's responders are real: an L{HTTP01Responder} (served where
    the CA validates http-01) and a L{TLSALPN01Responder} on a
    L{ServerTLS} (served where it validates tls-alpn-01).
    """

    startCA: Any
    makeClient: Any
    settle: Any
    forgetAccounts: Any

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        ca = CertificateAuthority.create("TP conformance client CA", days=2)
        server = ca.issue("tp.test", dns=("tp.test",), server=True)
        self.http01 = HTTP01Responder()
        self.serverTLS = ServerTLS([server.cert], server.key, [ca.cert], ClientCertChecker(frozenset(), frozenset(), ()))
        self.tlsALPN = TLSALPN01Responder(self.serverTLS)
        self.targets = ChallengeTargets(http01=self.http01, tlsALPN=self.serverTLS)
        self.accountKey = newKey()
        yield self.startCA()
        self.client = self.makeClient(self.accountKey)

    def issue(self, names: list[str], responders: list[Any]) -> defer.Deferred[Any]:
        self.key = newKey()
        return self.settle(self.client.issue(names, self.key, {r.challengeType: r for r in responders}))

    def assertIssued(self, chain: list[x509.Certificate], wanted: list[str]) -> None:
        """
        The chain is a leaf for the key sent and the names, valid now,
        signed by the next certificate.
        """
        leaf = chain[0]
        self.assertEqual(spki(leaf.public_key()), spki(self.key.public_key()))  # type: ignore[attr-defined]
        self.assertTrue(set(wanted) <= names(leaf), (wanted, names(leaf)))  # type: ignore[attr-defined]
        now = self.client.reactor.seconds()
        self.assertTrue(leaf.not_valid_before_utc.timestamp() <= now < leaf.not_valid_after_utc.timestamp())  # type: ignore[attr-defined]
        leaf.verify_directly_issued_by(chain[1])

    def assertAnsweredAndStopped(self, responder: Recording, wanted: list[str]) -> None:
        """
        The responder was started for each name with the key authorization
        of the client's account, and stopped for each.
        """
        starts = [c for c in responder.calls if c[0] == "start"]
        stops = [c for c in responder.calls if c[0] == "stop"]
        self.assertEqual(sorted(c[1] for c in starts), sorted(wanted))  # type: ignore[attr-defined]
        for _, name, token, keyAuthz in starts:
            self.assertEqual(keyAuthz, keyAuthorization(token, self.accountKey))  # type: ignore[attr-defined]
        self.assertEqual(sorted(c[1:] for c in stops), sorted(c[1:3] for c in starts))  # type: ignore[attr-defined]

    def test_provides(self) -> None:
        """
        The client provides L{IAcmeClient}.
        """
        self.assertTrue(verifyObject(IAcmeClient, self.client))  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_registerTwice(self) -> Any:
        """
        C{register} gives the account URL; the same key registering again
        finds the same account.
        """
        first = yield self.settle(self.client.register())
        self.assertTrue(first.startswith("https://"), first)  # type: ignore[attr-defined]
        again = yield self.settle(self.makeClient(self.accountKey).register())
        self.assertEqual(again, first)  # type: ignore[attr-defined]
        other = yield self.settle(self.makeClient(newKey()).register())
        self.assertNotEqual(other, first)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_http01(self) -> Any:
        """
        A certificate for one name by http-01: the responder is started
        with the account's key authorization and stopped after.
        """
        responder = Recording(self.http01)
        chain = yield self.issue(["one.test"], [responder])
        self.assertIssued(chain, ["one.test"])
        self.assertAnsweredAndStopped(responder, ["one.test"])
        self.assertEqual(self.http01.tokens, {})  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_tlsALPN01(self) -> Any:
        """
        A certificate by tls-alpn-01, answered on the TLS server.
        """
        responder = Recording(self.tlsALPN)
        chain = yield self.issue(["alpn.test"], [responder])
        self.assertIssued(chain, ["alpn.test"])
        self.assertAnsweredAndStopped(responder, ["alpn.test"])
        self.assertEqual(self.serverTLS.challengeCertificates, {})  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_twoNames(self) -> Any:
        """
        One certificate for two names: one authorization each.
        """
        responder = Recording(self.http01)
        chain = yield self.issue(["a.test", "b.test"], [responder])
        self.assertIssued(chain, ["a.test", "b.test"])
        self.assertAnsweredAndStopped(responder, ["a.test", "b.test"])

    @defer.inlineCallbacks
    def test_preferenceOrder(self) -> Any:
        """
        The first type of C{responders} the CA offers is the one used.
        """
        alpn, http = Recording(self.tlsALPN), Recording(self.http01)
        chain = yield self.issue(["pref.test"], [alpn, http])
        self.assertIssued(chain, ["pref.test"])
        self.assertAnsweredAndStopped(alpn, ["pref.test"])
        self.assertEqual(http.calls, [])  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_noUsableChallenge(self) -> Any:
        """
        With no responder for a type the CA offers, the order fails with
        C{unsupportedChallenge}.
        """
        failure = yield self.assertFailure(self.issue(["none.test"], []), AcmeError)  # type: ignore[attr-defined]
        self.assertEqual(failure.code, "unsupportedChallenge")  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_wrongKeyAuthorization(self) -> Any:
        """
        A responder serving the wrong key authorization fails validation:
        C{invalid}, and the responder is stopped all the same.
        """
        responder = Recording(self.http01, tamper=lambda keyAuthz: keyAuthz[::-1])
        failure = yield self.assertFailure(self.issue(["wrong.test"], [responder]), AcmeError)  # type: ignore[attr-defined]
        self.assertEqual(failure.code, "invalid")  # type: ignore[attr-defined]
        self.assertEqual([c[0] for c in responder.calls], ["start", "stop"])  # type: ignore[attr-defined]
        self.assertEqual(self.http01.tokens, {})  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_wrongTLSALPNAnswer(self) -> Any:
        """
        A tls-alpn-01 certificate for another key authorization fails.
        """
        responder = Recording(self.tlsALPN, tamper=lambda keyAuthz: keyAuthz + "x")
        failure = yield self.assertFailure(self.issue(["wrongalpn.test"], [responder]), AcmeError)  # type: ignore[attr-defined]
        self.assertEqual(failure.code, "invalid")  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_caForgotAccount(self) -> Any:
        """
        A CA that forgot the account (a restarted test CA): the next order
        registers again and succeeds.
        """
        first = yield self.settle(self.client.register())
        yield self.forgetAccounts()
        responder = Recording(self.http01)
        chain = yield self.issue(["again.test"], [responder])
        self.assertIssued(chain, ["again.test"])
        self.assertAnsweredAndStopped(responder, ["again.test"])
        second = yield self.settle(self.client.register())
        self.assertNotEqual(second, first)  # type: ignore[attr-defined]


class _ClockBackend:
    """
    A backend on a L{task.Clock} at the current time.
    """

    def settle(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        return runUntilFired(self.clock, d)

    def makeClock(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(time.time())


class FakeAcmeClientTests(_ClockBackend, AcmeClientContract, TestCase):
    """
    The fake the scheduling tests use keeps the contract.
    """

    def startCA(self) -> None:
        self.makeClock()
        self.fakeCA = CertificateAuthority.create("TP fake ACME CA", days=2)
        self.fakes: list[FakeAcmeClient] = []

    def makeClient(self, accountKey: Any) -> FakeAcmeClient:
        # One CA: a client with the same key finds the same account.
        for fake in self.fakes:
            if spki(fake.accountKey.public_key()) == spki(accountKey.public_key()):
                again = FakeAcmeClient(self.clock, self.targets, accountKey, ca=self.fakeCA)
                again.accountURL = fake.accountURL
                return again
        fake = FakeAcmeClient(self.clock, self.targets, accountKey, ca=self.fakeCA)
        fake._accounts = itertools.count(len(self.fakes) * 1000 + 1)
        self.fakes.append(fake)
        return fake

    def forgetAccounts(self) -> None:
        for fake in self.fakes:
            fake.forgetAccounts()


class MemoryCATests(_ClockBackend, AcmeClientContract, TestCase):
    """
    The real client against the in-memory CA.
    """

    def startCA(self) -> None:
        self.makeClock()
        self.ca = MemoryCA(self.clock, self.targets)

    def makeClient(self, accountKey: Any) -> AcmeClient:
        return self.ca.client(accountKey)

    def forgetAccounts(self) -> None:
        self.ca.forgetAccounts()


class PebbleTests(AcmeClientContract, TestCase):
    """
    The real client against Pebble, validating on loopback.
    """

    timeout = 120

    @defer.inlineCallbacks
    def startCA(self) -> Any:
        http = reactor.listenTCP(0, Site(self.http01), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(http.stopListening)
        tls = reactor.listenTCP(  # type: ignore[attr-defined]
            0, TLSMemoryBIOFactory(self.serverTLS, False, Factory.forProtocol(Protocol)), interface="127.0.0.1"
        )
        self.addCleanup(tls.stopListening)
        self.pebble = yield Pebble.start(self, http.getHost().port, tls.getHost().port)

    def makeClient(self, accountKey: Any) -> AcmeClient:
        client = AcmeClient(self.pebble.directory, accountKey, reactor, loadCertificates(self.pebble.caBundle))  # type: ignore[arg-type]
        client.pollInterval = 0.5
        return client

    def settle(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        return d

    def forgetAccounts(self) -> defer.Deferred[Any]:
        return self.pebble.restart()


# -- what the in-memory CA checks ---------------------------------------------------


class MemoryCAChecksTests(SynchronousTestCase):
    """
    L{MemoryCA} refuses what a real CA refuses: a client broken on purpose
    fails against it.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.http01 = HTTP01Responder()
        self.ca = MemoryCA(self.clock, ChallengeTargets(http01=self.http01))
        self.accountKey = newKey()
        self.client = self.ca.client(self.accountKey)

    def issue(self, client: AcmeClient | None = None) -> defer.Deferred[Any]:
        return runUntilFired(self.clock, (client or self.client).issue(["svc.test"], newKey(), {HTTP01: self.http01}))

    def refused(self, code: str) -> AcmeError:
        failure = self.failureResultOf(self.issue(), AcmeError)
        self.assertEqual(failure.value.code, code, failure.value)
        return failure.value

    def test_works(self) -> None:
        """
        The unbroken client gets a certificate (the tests below would pass
        for a CA that refused everything otherwise).
        """
        chain = self.successResultOf(self.issue())
        self.assertEqual(names(chain[0]), {"svc.test"})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reusedNonce(self) -> None:
        """
        A nonce is good once.
        """
        self.successResultOf(runUntilFired(self.clock, self.client.register()))
        stale = self.ca.newNonce()
        self.client._nonces = [stale]
        self.client._nonce = lambda: defer.succeed(stale)  # type: ignore[method-assign]
        self.refused("badNonce")

    def test_madeUpNonce(self) -> None:
        """
        A nonce the CA did not give is refused.
        """
        self.client._nonce = lambda: defer.succeed("bm9ub25jZQ")  # type: ignore[method-assign]
        self.refused("badNonce")

    def test_badNonceRetried(self) -> None:
        """
        The client retries a C{badNonce} refusal with the fresh nonce it
        carries (RFC 8555 6.5), up to four attempts.
        """
        self.ca.rejectNonces = 3
        self.successResultOf(self.issue())
        self.ca.rejectNonces = 4
        self.refused("badNonce")

    def test_signedByAnotherKey(self) -> None:
        """
        A request under the account's C{kid} signed by another key is
        refused.
        """
        self.successResultOf(runUntilFired(self.clock, self.client.register()))
        self.client.jwk = accountJWK(newKey())
        self.refused("malformed")

    def test_unknownAccount(self) -> None:
        """
        A C{kid} the CA does not know is C{accountDoesNotExist} (what
        makes the client register again, see the contract's
        C{test_caForgotAccount}).
        """
        self.successResultOf(runUntilFired(self.clock, self.client.register()))
        self.client.accountURL = self.ca.base + "/acct/999"
        d = runUntilFired(self.clock, self.client._post(self.ca.base + "/new-order", {"identifiers": [{"type": "dns", "value": "svc.test"}]}))
        self.assertEqual(self.failureResultOf(d, AcmeError).value.code, "accountDoesNotExist")

    def test_urlMismatch(self) -> None:
        """
        A JWS signed for one URL and posted to another is refused.
        """
        sign = clientModule.jws.JWS.sign

        def wrongURL(payload: bytes, **kw: Any) -> Any:
            kw["url"] = kw["url"] + "x"
            return sign(payload, **kw)

        self.patch(clientModule.jws.JWS, "sign", wrongURL)
        self.refused("unauthorized")

    def test_wrongKeyAuthorization(self) -> None:
        """
        A key authorization made with another key fails validation.
        """
        self.patch(clientModule, "keyAuthorization", lambda token, key: keyAuthorization(token, newKey()))
        error = self.refused("invalid")
        self.assertIn("incorrectResponse", str(error))

    def test_responderNotStarted(self) -> None:
        """
        A client that does not start its responder fails validation (404).
        """
        self.http01.start = lambda name, token, keyAuthz: None  # type: ignore[method-assign]
        error = self.refused("invalid")
        self.assertIn("HTTP 404", str(error))

    def test_csrForOtherNames(self) -> None:
        """
        A CSR for other names than the order's is C{badCSR}.
        """
        request = clientModule.certificateRequest
        self.patch(clientModule, "certificateRequest", lambda names, key: request(["other.test"], key))
        self.refused("badCSR")

    def test_csrWithAccountKey(self) -> None:
        """
        The certificate's key may not be the account key.
        """
        d = runUntilFired(self.clock, self.client.issue(["svc.test"], self.accountKey, {HTTP01: self.http01}))
        self.assertEqual(self.failureResultOf(d, AcmeError).value.code, "badCSR")

    def test_wrongContentType(self) -> None:
        """
        A JWS sent as plain JSON is refused.
        """
        post = self.client.http.post

        def plain(url: str, **kw: Any) -> Any:
            kw["headers"] = {b"Content-Type": [b"application/json"]}
            return post(url, **kw)

        self.client.http.post = plain  # type: ignore[method-assign]
        self.refused("malformed")

    def test_otherAccountsOrder(self) -> None:
        """
        Another account cannot read an order.
        """
        owner = self.ca.client(newKey())
        self.successResultOf(runUntilFired(self.clock, owner.issue(["mine.test"], newKey(), {HTTP01: self.http01})))
        (orderPath,) = {path for method, path in self.ca.requests if path.startswith("/order/")}
        self.successResultOf(runUntilFired(self.clock, self.client.register()))
        d = runUntilFired(self.clock, self.client._post(self.ca.base + orderPath, None))
        self.assertEqual(self.failureResultOf(d, AcmeError).value.code, "unauthorized")

    def test_tlsALPNWithoutServer(self) -> None:
        """
        tls-alpn-01 with nothing listening is C{invalid} (connection).
        """
        d = runUntilFired(self.clock, self.client.issue(["svc.test"], newKey(), {TLSALPN01: TLSALPN01Responder(type("S", (), {"challengeCertificates": {}})())}))
        failure = self.failureResultOf(d, AcmeError)
        self.assertEqual(failure.value.code, "invalid")
        self.assertIn("connection", str(failure.value))

    def test_rejectedIdentifier(self) -> None:
        """
        A name that is not a DNS name is refused at the order.
        """
        d = runUntilFired(self.clock, self.client.issue(["not_a.name"], newKey(), {HTTP01: self.http01}))
        self.assertEqual(self.failureResultOf(d, AcmeError).value.code, "rejectedIdentifier")
