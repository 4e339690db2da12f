"""
Tests for L{tpproxy.test.pebble}: the Pebble fixture starts a real ACME
server that answers, issues certificates only after a real validation, and
can be stopped and started again.
"""

from __future__ import annotations

import datetime
import json
import socket
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tpproxy.pki import keyPEM, newKey
from tpproxy.test.pebble import Pebble
from tpproxy.test.support import freePort, waitUntilRefused

NAME = "test.example"


class ChallengeResponder(Resource):
    """
    An C{http-01} responder: answers C{/.well-known/acme-challenge/TOKEN}
    with the key authorization set in L{tokens}, and records the requests.

    @ivar tokens: key authorization by token.
    @ivar seen: C{(path, Host header, User-Agent header)} of each request.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[str, str] = {}
        self.seen: list[tuple[bytes, bytes | None, bytes | None]] = []

    def render_GET(self, request: Request) -> bytes:
        self.seen.append((request.path, request.getHeader(b"host"), request.getHeader(b"user-agent")))
        prefix = b"/.well-known/acme-challenge/"
        token = request.path[len(prefix):].decode("ascii", "replace") if request.path.startswith(prefix) else None
        if token is None or token not in self.tokens:
            request.setResponseCode(404)
            return b"no such token\n"
        request.setHeader(b"content-type", b"text/plain")
        return self.tokens[token].encode("ascii")


def listenResponder(testCase: TestCase) -> tuple[int, ChallengeResponder]:
    """
    Serve a L{ChallengeResponder} on a free port of 127.0.0.1 until the end
    of C{testCase}.

    @return: the port and the responder.
    """
    responder = ChallengeResponder()
    port = reactor.listenTCP(0, Site(responder), interface="127.0.0.1")  # type: ignore[attr-defined]
    testCase.addCleanup(port.stopListening)
    return port.getHost().port, responder


class AcmeSession:
    """
    A blocking ACME client (certbot's C{acme} library) for a L{Pebble}: run
    its methods with L{deferToThread}.
    """

    def __init__(self, pebble: Pebble) -> None:
        import josepy as jose
        from acme import client, messages

        self.messages = messages
        key = jose.JWKRSA(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
        self.net = client.ClientNetwork(key, verify_ssl=pebble.caBundle, user_agent="tp-test-pebble")
        directory = client.ClientV2.get_directory(pebble.directory, self.net)
        self.client = client.ClientV2(directory, self.net)
        self.account = self.client.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))

    def order(self, name: str) -> tuple[Any, Any, str, str]:
        """
        Order a certificate for C{name}.

        @return: the order, its C{http-01} challenge, the challenge's token
            and the key authorization to serve for it.
        """
        from acme import challenges, crypto_util

        csr = crypto_util.make_csr(keyPEM(newKey()), [name])
        order = self.client.new_order(csr)
        (authz,) = order.authorizations
        (challb,) = [c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)]
        response, validation = challb.response_and_validation(self.net.key)
        return order, challb, challb.chall.encode("token"), validation

    def answerAndFinalize(self, order: Any, challb: Any, seconds: float = 20) -> Any:
        """
        Tell Pebble the challenge is ready, wait for the authorization and
        finalize the order.

        @return: the finalized order (with C{fullchain_pem}).
        """
        self.client.answer_challenge(challb, challb.response(self.net.key))
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=seconds)
        return self.client.poll_and_finalize(order, deadline)

    def orderStatus(self, order: Any) -> Any:
        """
        Fetch the order again (POST-as-GET).

        @return: the order body.
        """
        return self.messages.Order.from_json(self.client._post_as_get(order.uri).json())


def fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


class PebbleTests(TestCase):
    """
    The fixture runs a real Pebble.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_directory(self) -> Any:
        """
        The directory answers over HTTPS trusted through C{caBundle} and
        names the ACME resources on the same loopback server.
        """
        pebble = yield Pebble.start(self, httpPort=freePort(), tlsPort=freePort())
        directory = json.loads((yield pebble.get(pebble.directory)))
        for resource in ("newAccount", "newOrder", "newNonce"):
            self.assertTrue(
                directory[resource].startswith(f"https://127.0.0.1:{pebble.port}/"), (resource, directory)
            )
        self.assertFalse(directory["meta"]["externalAccountRequired"])

    @defer.inlineCallbacks
    def test_roots(self) -> Any:
        """
        C{roots} gives Pebble's self-signed root CA, and C{intermediates}
        a CA that root signed.
        """
        pebble = yield Pebble.start(self, httpPort=freePort(), tlsPort=freePort())
        (root,) = yield pebble.roots()
        (intermediate,) = yield pebble.intermediates()
        for ca in (root, intermediate):
            self.assertTrue(ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertEqual(root.issuer, root.subject)
        self.assertEqual(intermediate.issuer, root.subject)
        intermediate.verify_directly_issued_by(root)

    @defer.inlineCallbacks
    def test_stopAndRestart(self) -> Any:
        """
        C{stop} stops Pebble, whose port then refuses connections;
        C{restart} brings it back on the same port, with a new root.
        """
        pebble = yield Pebble.start(self, httpPort=freePort(), tlsPort=freePort())
        (before,) = yield pebble.roots()
        yield pebble.stop()
        self.assertFalse(pebble.running)
        for port in (pebble.port, pebble.managementPort):
            with self.assertRaises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
        yield pebble.restart()
        self.assertTrue(pebble.running)
        directory = json.loads((yield pebble.get(pebble.directory)))
        self.assertIn("newOrder", directory)
        (after,) = yield pebble.roots()
        self.assertNotEqual(fingerprint(before), fingerprint(after))
        yield pebble.stop()
        yield waitUntilRefused(pebble.port, "a second stop")

    @defer.inlineCallbacks
    def test_environment(self) -> Any:
        """
        Pebble runs with the caller's extra environment (here: reject half
        the good nonces), and refuses to skip validation.
        """
        with self.assertRaises(ValueError):
            yield Pebble.start(self, httpPort=freePort(), tlsPort=freePort(), env={"PEBBLE_VA_ALWAYS_VALID": "1"})
        pebble = yield Pebble.start(self, httpPort=freePort(), tlsPort=freePort(), env={"PEBBLE_WFE_NONCEREJECT": "50"})
        self.assertEqual(pebble.env["PEBBLE_WFE_NONCEREJECT"], "50")
        self.assertEqual(pebble.env["PEBBLE_VA_NOSLEEP"], "1")
        log = b"".join(pebble.process.proto.out)
        self.assertIn(b"Configured to reject 50% of good nonces", log)
        self.assertIn(b"Disabling random VA sleeps", log)
        self.assertNotIn(b"VA always returns valid", log)

    @defer.inlineCallbacks
    def test_issueAfterHTTP01(self) -> Any:
        """
        An ACME client gets a certificate for a name once Pebble has fetched
        the key authorization from the responder on C{httpPort}; the chain
        verifies up to Pebble's root; the certificate lives as long as
        asked.
        """
        httpPort, responder = listenResponder(self)
        pebble = yield Pebble.start(self, httpPort=httpPort, tlsPort=freePort(), certificateValidity=3600)
        session = yield deferToThread(AcmeSession, pebble)
        order, challb, token, validation = yield deferToThread(session.order, NAME)
        responder.tokens[token] = validation
        finalized = yield deferToThread(session.answerAndFinalize, order, challb)

        path = f"/.well-known/acme-challenge/{token}".encode()
        validations = [s for s in responder.seen if s[0] == path]
        self.assertTrue(validations, responder.seen)
        self.assertEqual(validations[0][1], f"{NAME}:{httpPort}".encode())
        self.assertIn(b"Pebble", validations[0][2] or b"")

        chain = x509.load_pem_x509_certificates(finalized.fullchain_pem.encode())
        leaf = chain[0]
        self.assertEqual(
            leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName),
            [NAME],
        )
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        self.assertLessEqual(abs(lifetime.total_seconds() - 3600), 1, lifetime)
        (intermediate,) = yield pebble.intermediates()
        self.assertEqual(leaf.issuer, intermediate.subject)
        leaf.verify_directly_issued_by(intermediate)
        (root,) = yield pebble.roots()
        path = yield pebble.verifyChain(finalized.fullchain_pem.encode(), NAME)
        self.assertEqual(fingerprint(path[-1]), fingerprint(root))

    @defer.inlineCallbacks
    def test_noResponderNoCertificate(self) -> Any:
        """
        With nothing listening on C{httpPort}, the authorization becomes
        invalid, so does the order, and no certificate is issued.
        """
        from acme import errors, messages

        pebble = yield Pebble.start(self, httpPort=freePort(), tlsPort=freePort(), strict=False)
        session = yield deferToThread(AcmeSession, pebble)
        order, challb, token, validation = yield deferToThread(session.order, NAME)
        error = yield self.assertFailure(deferToThread(session.answerAndFinalize, order, challb), errors.ValidationError)
        (authz,) = error.failed_authzrs
        self.assertEqual(authz.body.status, messages.STATUS_INVALID)
        (failed,) = [c for c in authz.body.challenges if c.error is not None]
        self.assertEqual(failed.error.code, "connection")
        body = yield deferToThread(session.orderStatus, order)
        self.assertEqual(body.status, messages.STATUS_INVALID)
        self.assertIsNone(body.certificate)
