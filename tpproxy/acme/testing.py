# -*- test-case-name: tpproxy.test.test_acme_conformance,tpproxy.test.test_acme -*-
"""
Verified fakes for ACME.

  - L{MemoryCA}: an in-memory ACME CA, the subset of RFC 8555 that
    L{AcmeClient} speaks (directory, nonces, accounts, orders,
    authorizations, challenges, finalization, certificate download), as a
    Twisted Web resource that a real L{AcmeClient} reaches through an
    in-memory agent (treq's L{RequestTraversalAgent}).  It checks what a
    real CA checks: the JWS signature, its nonce (each once), its URL, the
    account behind C{kid}, who owns what, the key authorization of the
    challenge it validates, and the CSR; a broken client fails against it.
  - L{FakeAcmeClient}: an L{IAcmeClient} without HTTP or JWS, for the
    issuing service's scheduling tests.
  - L{ChallengeTargets}: where the names point, as a CA's validator sees
    them: http-01 requests go to a web resource (an L{HTTP01Responder}),
    tls-alpn-01 handshakes to a TLS connection creator (a L{ServerTLS}),
    both in memory.  L{MemoryCA} and L{FakeAcmeClient} validate with it.

The fake and the real client pass one conformance suite,
L{tpproxy.test.test_acme_conformance}, which also runs the real client
against Pebble: the fake cannot drift from what the real thing does.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import itertools
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import josepy as jose
from acme import jws
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from zope.interface import implementer

from tpproxy.acme.client import (
    HTTP01,
    ID_PE_ACME_IDENTIFIER,
    TLSALPN01,
    AcmeClient,
    AcmeError,
    IAcmeClient,
    IChallengeResponder,
    keyAuthorization,
)
from tpproxy.config import DNS_NAME
from tpproxy.pki import CertificateAuthority
from tpproxy.testing import handshakeInMemory
from tpproxy.transports.servertls import ACME_TLS_ALPN

DNS01 = "dns-01"
#: What Pebble and Let's Encrypt offer for a name, in their order.
OFFERED = (HTTP01, DNS01, TLSALPN01)
PROBLEM = "urn:ietf:params:acme:error:"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- in-memory HTTP ------------------------------------------------------------


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body of bytes, written at once (the default body producer of
    treq cooperates on the global reactor, which in-memory tests do not run).
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def memoryHTTPClient(resource: IResource) -> HTTPClient:
    """
    A treq client whose every request, whatever its host, is served by
    C{resource} through a real L{twisted.web.server.Site} over an in-memory
    connection.
    """
    return HTTPClient(RequestTraversalAgent(resource), data_to_body_producer=BytesProducer)


def runUntilFired(clock: Any, d: defer.Deferred[Any], limit: int = 10000) -> defer.Deferred[Any]:
    """
    Move C{clock} (a L{twisted.internet.task.Clock}) from one delayed call
    to the next until C{d} has fired (or nothing is scheduled any more).

    @return: C{d}.
    """
    for _ in range(limit):
        if d.called:
            break
        calls = clock.getDelayedCalls()
        if not calls:
            break
        clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))
    return d


# -- validation ----------------------------------------------------------------


class ChallengeFailed(Exception):
    """
    A validation failed.

    @ivar code: the ACME error code: C{connection}, C{incorrectResponse},
        C{unauthorized} or C{tls}.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class _Connection:
    """
    The protocol a TLS connection creator is given (it may mark it).
    """


class ChallengeTargets:
    """
    Where every name points for a CA's validator, in memory, as Pebble's
    DNS server points every name at 127.0.0.1.

    @param http01: the web resource on port 80 (C{None}: nothing listens).
    @param tlsALPN: the TLS server on port 443 (C{None}: nothing listens).
    """

    def __init__(
        self,
        http01: IResource | None = None,
        tlsALPN: IOpenSSLServerConnectionCreator | None = None,
    ) -> None:
        self.http01 = http01
        self.tlsALPN = tlsALPN
        #: C{(type, name, token)} of every validation attempted.
        self.attempts: list[tuple[str, str, str]] = []

    def validate(self, challengeType: str, name: str, token: str, keyAuthz: str) -> defer.Deferred[None]:
        """
        Validate one challenge as RFC 8555 8.3 (http-01) and RFC 8737 3
        (tls-alpn-01) say.

        @return: a Deferred firing with C{None} when the expected key
            authorization was served, else failing with L{ChallengeFailed}.
        """
        self.attempts.append((challengeType, name, token))
        if challengeType == HTTP01:
            return self._http01(name, token, keyAuthz)
        if challengeType == TLSALPN01:
            return defer.maybeDeferred(self._tlsALPN01, name, keyAuthz)
        return defer.fail(ChallengeFailed("unauthorized", f"no {challengeType} record for {name}"))

    @defer.inlineCallbacks
    def _http01(self, name: str, token: str, keyAuthz: str) -> Any:
        if self.http01 is None:
            raise ChallengeFailed("connection", f"{name}:80: connection refused")
        http = memoryHTTPClient(self.http01)
        response = yield http.get(f"http://{name}/.well-known/acme-challenge/{token}")
        body = yield response.content()
        if response.code != 200:
            raise ChallengeFailed("unauthorized", f"http-01 for {name}: HTTP {response.code}")
        if body.rstrip() != keyAuthz.encode("ascii"):
            raise ChallengeFailed("incorrectResponse", f"http-01 for {name}: the key authorization {body[:100]!r} is not {keyAuthz!r}")

    def _tlsALPN01(self, name: str, keyAuthz: str) -> None:
        if self.tlsALPN is None:
            raise ChallengeFailed("connection", f"{name}:443: connection refused")
        server = self.tlsALPN.serverConnectionForTLS(_Connection())  # type: ignore[arg-type]
        server.set_accept_state()
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_alpn_protos([ACME_TLS_ALPN])
        client = SSL.Connection(context, None)
        client.set_tlsext_host_name(name.encode("ascii"))
        client.set_connect_state()
        handshakeInMemory(server, client)
        if client.get_alpn_proto_negotiated() != ACME_TLS_ALPN:
            raise ChallengeFailed("tls", f"tls-alpn-01 for {name}: acme-tls/1 was not negotiated")
        peer = client.get_peer_certificate()
        if peer is None:
            raise ChallengeFailed("tls", f"tls-alpn-01 for {name}: no certificate")
        cert = peer.to_cryptography()
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            identifier = cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
        except x509.ExtensionNotFound as e:
            raise ChallengeFailed("unauthorized", f"tls-alpn-01 for {name}: {e}") from None
        if list(san) != [x509.DNSName(name)]:
            raise ChallengeFailed("unauthorized", f"tls-alpn-01 for {name}: the certificate is for {list(san)}")
        expected = b"\x04\x20" + hashlib.sha256(keyAuthz.encode("ascii")).digest()
        if not identifier.critical or identifier.value.value != expected:  # type: ignore[attr-defined]
            raise ChallengeFailed("unauthorized", f"tls-alpn-01 for {name}: wrong acmeIdentifier")


def checkNames(names: list[str]) -> list[str]:
    """
    The names a CA accepts in an order (lower case, each once).

    @raise AcmeError: C{rejectedIdentifier} for what is not a DNS name.
    """
    if not names:
        raise AcmeError("the order names nothing", "malformed")
    checked: list[str] = []
    for name in names:
        if not isinstance(name, str) or not DNS_NAME.fullmatch(name.lower()) or name.startswith("*."):
            raise AcmeError(f"the CA will not issue for {name!r}", "rejectedIdentifier")
        if name.lower() not in checked:
            checked.append(name.lower())
    return checked


def certify(ca: CertificateAuthority, publicKey: Any, names: list[str], now: float, lifetime: float) -> x509.Certificate:
    """
    A server certificate from C{ca} for C{publicKey} and C{names}, valid from
    5 minutes before C{now} for C{lifetime} seconds from C{now}.
    """
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(publicKey)
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(now - 300, datetime.timezone.utc))
        .not_valid_after(datetime.datetime.fromtimestamp(now + lifetime, datetime.timezone.utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


# -- the fake client -------------------------------------------------------------


@implementer(IAcmeClient)
class FakeAcmeClient:
    """
    An account at a CA in one object, with no HTTP and no JWS: it offers
    http-01, dns-01 and tls-alpn-01 for every name, starts the responder of
    the type chosen as L{AcmeClient} does, validates it through
    C{targets}, and signs from a CA of its own.

    @param clock: the time certificates are valid from.
    @param targets: where the names point.
    @param accountKey: the account's key (for key authorizations).
    @param lifetime: seconds the certificates are valid.
    @ivar down: while true, every request fails as if the CA were down.
    @ivar orders: the names of every order, in order.
    """

    timeout = 30.0
    orderTimeout = 120.0
    directoryURL = "https://ca.invalid/dir"

    def __init__(
        self,
        clock: IReactorTime,
        targets: ChallengeTargets,
        accountKey: Any = None,
        lifetime: float = 90 * 86400.0,
        ca: CertificateAuthority | None = None,
    ) -> None:
        from tpproxy.pki import newKey

        self.reactor = clock
        self.targets = targets
        self.accountKey = accountKey if accountKey is not None else newKey()
        self.lifetime = lifetime
        self.ca = ca if ca is not None else CertificateAuthority.create("TP fake ACME CA", days=3650)
        self.down = False
        self.orders: list[list[str]] = []
        self.accountURL: str | None = None
        self._accounts = itertools.count(1)

    def forgetAccounts(self) -> None:
        """
        The CA forgets the account (a restarted test CA).
        """
        self.accountURL = None

    def register(self) -> defer.Deferred[str]:
        if self.down:
            return defer.fail(AcmeError("the CA is down (FakeAcmeClient.down)"))
        if self.accountURL is None:
            self.accountURL = f"https://ca.invalid/acct/{next(self._accounts)}"
        return defer.succeed(self.accountURL)

    @defer.inlineCallbacks
    def issue(self, names: list[str], key: Any, responders: dict[str, Any]) -> Any:
        self.orders.append(list(names))
        yield self.register()
        names = checkNames(list(names))
        for name in names:
            usable = [t for t in responders if t in OFFERED]
            if not usable:
                raise AcmeError(f"the CA offers {sorted(OFFERED)} for {name}; TP is set to answer {list(responders)}", "unsupportedChallenge")
            responder: IChallengeResponder = responders[usable[0]]
            token = secrets.token_urlsafe(32)
            keyAuthz = keyAuthorization(token, self.accountKey)
            responder.start(name, token, keyAuthz)
            try:
                yield self.targets.validate(usable[0], name, token, keyAuthz)
            except ChallengeFailed as e:
                raise AcmeError(f"the authorization of {name} became invalid: {usable[0]}: {e}", "invalid") from None
            finally:
                responder.stop(name, token)
        leaf = certify(self.ca, key.public_key(), names, self.reactor.seconds(), self.lifetime)
        return [leaf, self.ca.cert]


# -- the in-memory CA ---------------------------------------------------------------


class _Problem(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass
class _Account:
    url: str
    jwk: jose.JWK
    contact: list[str]
    status: str = "valid"


@dataclass
class _Challenge:
    type: str
    url: str
    token: str
    status: str = "pending"
    error: dict[str, Any] | None = None


@dataclass
class _Authorization:
    url: str
    account: _Account
    name: str
    challenges: list[_Challenge]
    status: str = "pending"


@dataclass
class _Order:
    url: str
    account: _Account
    names: list[str]
    authorizations: list[_Authorization]
    finalizeURL: str
    status: str = "pending"
    certificateURL: str | None = None
    chain: list[x509.Certificate] = field(default_factory=list)


class MemoryCA:
    """
    An ACME CA in memory: L{resource} serves RFC 8555's directory, nonces,
    accounts, orders, authorizations, challenges, finalization and
    certificates; L{client} makes a real L{AcmeClient} that reaches it.

    Validation and issuance take time on C{clock}, as at a real CA: a
    challenge is validated C{validationDelay} seconds after the client
    asks, and a certificate issued C{issueDelay} seconds after
    finalization; meanwhile the client polls (with C{Retry-After: 1}).
    Drive the clock with L{runUntilFired}.

    @param clock: the CA's time (validity of certificates, delays).
    @param targets: where the names point for validation.
    @param lifetime: seconds the certificates are valid.
    @ivar ca: the CA the certificates are signed by (made at construction).
    @ivar rejectNonces: how many more valid nonces to refuse as C{badNonce}
        (as Pebble's C{PEBBLE_WFE_NONCEREJECT}).
    @ivar requests: C{(method, path)} of every request.
    """

    base = "https://acme.test"
    validationDelay = 1.0
    issueDelay = 1.0

    def __init__(self, clock: IReactorTime, targets: ChallengeTargets, lifetime: float = 90 * 86400.0) -> None:
        self.clock = clock
        self.targets = targets
        self.lifetime = lifetime
        self.ca = CertificateAuthority.create("TP in-memory ACME CA", days=3650)
        self.directoryURL = self.base + "/dir"
        self.resource = _ACMEResource(self)
        self.rejectNonces = 0
        self.requests: list[tuple[str, str]] = []
        self._nonces: set[str] = set()
        self._ids = itertools.count(1)
        self._accounts: dict[bytes, _Account] = {}
        self._accountsByURL: dict[str, _Account] = {}
        self._orders: dict[str, _Order] = {}
        self._authorizations: dict[str, _Authorization] = {}
        self._challenges: dict[str, tuple[_Challenge, _Authorization]] = {}
        self._finalize: dict[str, _Order] = {}
        self._certificates: dict[str, _Order] = {}

    def httpClient(self) -> HTTPClient:
        """
        A treq client whose requests this CA answers in memory.
        """
        return memoryHTTPClient(self.resource)

    def client(self, accountKey: Any, **kw: Any) -> AcmeClient:
        """
        A real L{AcmeClient} for this CA, on C{clock}.
        """
        return AcmeClient(self.directoryURL, accountKey, self.clock, http=self.httpClient(), **kw)

    def forgetAccounts(self) -> None:
        """
        Forget every account, as a restarted test CA does.
        """
        self._accounts.clear()
        self._accountsByURL.clear()

    # -- state ----------------------------------------------------------------

    def _url(self, kind: str) -> str:
        return f"{self.base}/{kind}/{next(self._ids)}"

    def newNonce(self) -> str:
        nonce = _b64(secrets.token_bytes(16))
        self._nonces.add(nonce)
        return nonce

    def _orderStatus(self, order: _Order) -> str:
        if order.status == "pending":
            statuses = {a.status for a in order.authorizations}
            if "invalid" in statuses:
                order.status = "invalid"
            elif statuses == {"valid"}:
                order.status = "ready"
        return order.status

    def _orderJSON(self, order: _Order) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": self._orderStatus(order),
            "identifiers": [{"type": "dns", "value": n} for n in order.names],
            "authorizations": [a.url for a in order.authorizations],
            "finalize": order.finalizeURL,
        }
        if order.certificateURL:
            body["certificate"] = order.certificateURL
        return body

    def _authzJSON(self, authz: _Authorization) -> dict[str, Any]:
        return {
            "status": authz.status,
            "identifier": {"type": "dns", "value": authz.name},
            "challenges": [self._challengeJSON(c) for c in authz.challenges],
        }

    @staticmethod
    def _challengeJSON(challenge: _Challenge) -> dict[str, Any]:
        body: dict[str, Any] = {"type": challenge.type, "url": challenge.url, "token": challenge.token, "status": challenge.status}
        if challenge.error:
            body["error"] = challenge.error
        return body

    # -- requests -------------------------------------------------------------

    def verifiedPost(self, request: Request, url: str, body: bytes) -> tuple[_Account | jose.JWK, Any]:
        """
        Check a POST as RFC 8555 6.2-6.5 says: a flattened JWS with a
        protected header only, a supported algorithm, a nonce this CA gave
        and nobody used, the URL it is posted to, C{jwk} for C{newAccount}
        and C{kid} (a known, valid account) for the rest, and a signature by
        that key.

        @return: the account (or, for C{newAccount}, the JWK) and the
            payload (C{None} for POST-as-GET).
        """
        if request.getHeader(b"content-type") != b"application/jose+json":
            raise _Problem(415, "malformed", "the Content-Type of a JWS must be application/jose+json")
        try:
            outer = json.loads(body)
            if not isinstance(outer, dict) or set(outer) != {"protected", "payload", "signature"}:
                raise ValueError("not a flattened JWS with a protected header only")
            protected = json.loads(_unb64(outer["protected"]))
            payloadBytes = _unb64(outer["payload"])
            signed = jws.JWS.json_loads(body)
        except (ValueError, TypeError, KeyError, jose.DeserializationError) as e:
            raise _Problem(400, "malformed", f"not a JWS: {e}") from None
        if protected.get("alg") not in ("ES256", "ES384", "ES512", "RS256"):
            raise _Problem(400, "badSignatureAlgorithm", f"algorithm {protected.get('alg')!r} is not supported")
        nonce = protected.get("nonce")
        if not isinstance(nonce, str) or nonce not in self._nonces:
            raise _Problem(400, "badNonce", "the nonce is not one this CA gave, or was used")
        self._nonces.discard(nonce)
        if self.rejectNonces > 0:
            self.rejectNonces -= 1
            raise _Problem(400, "badNonce", "this valid nonce is refused (rejectNonces)")
        if protected.get("url") != url:
            raise _Problem(401, "unauthorized", f"the JWS is for {protected.get('url')!r}, not {url}")
        if ("jwk" in protected) == ("kid" in protected):
            raise _Problem(400, "malformed", "the JWS must have either jwk or kid")
        signer: _Account | jose.JWK
        if url == self.base + "/new-account":
            if "jwk" not in protected:
                raise _Problem(400, "malformed", "newAccount is signed with jwk")
            try:
                key = jose.JWK.from_json(protected["jwk"])
            except jose.DeserializationError as e:
                raise _Problem(400, "malformed", f"bad jwk: {e}") from None
            signer = key
        else:
            if "kid" not in protected:
                raise _Problem(400, "malformed", "requests other than newAccount are signed with kid")
            account = self._accountsByURL.get(protected["kid"])
            if account is None:
                raise _Problem(400, "accountDoesNotExist", f"no account {protected['kid']}")
            if account.status != "valid":
                raise _Problem(401, "unauthorized", f"the account is {account.status}")
            key = account.jwk
            signer = account
        try:
            good = signed.verify(key)
        except Exception:
            good = False
        if not good:
            raise _Problem(400, "malformed", "the JWS signature does not verify")
        if not payloadBytes:
            return signer, None
        try:
            return signer, json.loads(payloadBytes)
        except ValueError:
            raise _Problem(400, "malformed", "the payload is not JSON") from None

    def post(self, request: Request, url: str, body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """
        Answer a POST to C{url}.

        @return: the status, headers and body.
        """
        signer, payload = self.verifiedPost(request, url, body)
        if url == self.base + "/new-account":
            assert isinstance(signer, jose.JWK)
            return self._newAccount(signer, payload)
        assert isinstance(signer, _Account)
        account = signer
        if url == self.base + "/new-order":
            return self._newOrder(account, payload)
        if url in self._accountsByURL:
            if self._accountsByURL[url] is not account:
                raise _Problem(401, "unauthorized", "another account")
            return 200, {b"content-type": b"application/json"}, json.dumps({"status": account.status, "contact": account.contact}).encode()
        if url in self._orders:
            order = self._own(self._orders[url], account)
            self._asGet(payload)
            headers = {b"content-type": b"application/json"}
            if self._orderStatus(order) == "processing":
                headers[b"retry-after"] = b"1"
            return 200, headers, json.dumps(self._orderJSON(order)).encode()
        if url in self._authorizations:
            authz = self._own(self._authorizations[url], account)
            self._asGet(payload)
            headers = {b"content-type": b"application/json"}
            if authz.status == "pending":
                headers[b"retry-after"] = b"1"
            return 200, headers, json.dumps(self._authzJSON(authz)).encode()
        if url in self._challenges:
            challenge, authz = self._challenges[url]
            self._own(authz, account)
            if payload is not None:
                if payload != {}:
                    raise _Problem(400, "malformed", "a challenge is answered with {}")
                self._respond(challenge, authz)
            headers = {b"content-type": b"application/json", b"link": f'<{authz.url}>;rel="up"'.encode()}
            return 200, headers, json.dumps(self._challengeJSON(challenge)).encode()
        if url in self._finalize:
            return self._finalizeOrder(self._own(self._finalize[url], account), payload)
        if url in self._certificates:
            order = self._own(self._certificates[url], account)
            self._asGet(payload)
            pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in order.chain)
            return 200, {b"content-type": b"application/pem-certificate-chain"}, pem
        raise _Problem(404, "malformed", f"no resource {url}")

    @staticmethod
    def _asGet(payload: Any) -> None:
        if payload is not None:
            raise _Problem(400, "malformed", "this resource is read with POST-as-GET (an empty payload)")

    @staticmethod
    def _own(thing: Any, account: _Account) -> Any:
        if thing.account is not account:
            raise _Problem(401, "unauthorized", "this resource belongs to another account")
        return thing

    def _newAccount(self, key: jose.JWK, payload: Any) -> tuple[int, dict[bytes, bytes], bytes]:
        if not isinstance(payload, dict):
            raise _Problem(400, "malformed", "newAccount takes a JSON object")
        thumbprint = key.thumbprint()
        account = self._accounts.get(thumbprint)
        status = 200
        if account is None:
            if payload.get("onlyReturnExisting"):
                raise _Problem(400, "accountDoesNotExist", "no account for this key")
            if payload.get("termsOfServiceAgreed") is not True:
                raise _Problem(403, "userActionRequired", "the terms of service must be agreed to")
            contact = payload.get("contact", [])
            if not isinstance(contact, list) or not all(isinstance(c, str) and c.startswith("mailto:") for c in contact):
                raise _Problem(400, "invalidContact", f"contacts are mailto: URLs, not {contact!r}")
            account = _Account(self._url("acct"), key, contact)
            self._accounts[thumbprint] = account
            self._accountsByURL[account.url] = account
            status = 201
        headers = {b"content-type": b"application/json", b"location": account.url.encode()}
        return status, headers, json.dumps({"status": account.status, "contact": account.contact}).encode()

    def _newOrder(self, account: _Account, payload: Any) -> tuple[int, dict[bytes, bytes], bytes]:
        identifiers = payload.get("identifiers") if isinstance(payload, dict) else None
        if not isinstance(identifiers, list) or not all(isinstance(i, dict) and i.get("type") == "dns" for i in identifiers):
            raise _Problem(400, "malformed", "an order names DNS identifiers")
        try:
            names = checkNames([i.get("value") for i in identifiers])
        except AcmeError as e:
            raise _Problem(400, e.code or "malformed", str(e)) from None
        authorizations = []
        for name in names:
            challenges = [_Challenge(t, self._url("chall"), _b64(secrets.token_bytes(32))) for t in OFFERED]
            authz = _Authorization(self._url("authz"), account, name, challenges)
            self._authorizations[authz.url] = authz
            for c in challenges:
                self._challenges[c.url] = (c, authz)
            authorizations.append(authz)
        order = _Order(self._url("order"), account, names, authorizations, self._url("finalize"))
        self._orders[order.url] = order
        self._finalize[order.finalizeURL] = order
        headers = {b"content-type": b"application/json", b"location": order.url.encode()}
        return 201, headers, json.dumps(self._orderJSON(order)).encode()

    def _respond(self, challenge: _Challenge, authz: _Authorization) -> None:
        """
        The client says the challenge is ready: validate it soon (once;
        one challenge per authorization).
        """
        if challenge.status != "pending" or authz.status != "pending":
            return
        if any(c.status != "pending" for c in authz.challenges):
            return
        challenge.status = "processing"
        keyAuthz = f"{challenge.token}.{_b64(authz.account.jwk.thumbprint())}"

        def validated(_: None) -> None:
            challenge.status = authz.status = "valid"

        def failed(reason: Any) -> None:
            error = reason.value
            code = error.code if isinstance(error, ChallengeFailed) else "connection"
            challenge.status = authz.status = "invalid"
            challenge.error = {"type": PROBLEM + code, "detail": str(error), "status": 403}

        def validate() -> None:
            self.targets.validate(challenge.type, authz.name, challenge.token, keyAuthz).addCallbacks(validated, failed)

        self.clock.callLater(self.validationDelay, validate)

    def _finalizeOrder(self, order: _Order, payload: Any) -> tuple[int, dict[bytes, bytes], bytes]:
        if self._orderStatus(order) != "ready":
            raise _Problem(403, "orderNotReady", f"the order is {order.status}, not ready")
        try:
            csr = x509.load_der_x509_csr(_unb64(payload["csr"]))
        except (TypeError, KeyError, ValueError) as e:
            raise _Problem(400, "badCSR", f"the CSR does not parse: {e}") from None
        if not csr.is_signature_valid:
            raise _Problem(400, "badCSR", "the CSR's signature does not verify")
        try:
            sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            sans = []
        if sorted({n.lower() for n in sans}) != sorted(order.names):
            raise _Problem(400, "badCSR", f"the CSR names {sorted(sans)}, the order {sorted(order.names)}")
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if csr.public_key().public_bytes(*spki) == order.account.jwk.key.public_bytes(*spki):
            raise _Problem(400, "badCSR", "the certificate key is the account key")
        order.status = "processing"

        def issue() -> None:
            order.chain = [certify(self.ca, csr.public_key(), order.names, self.clock.seconds(), self.lifetime), self.ca.cert]
            order.certificateURL = self._url("cert")
            self._certificates[order.certificateURL] = order
            order.status = "valid"

        self.clock.callLater(self.issueDelay, issue)
        headers = {b"content-type": b"application/json", b"location": order.url.encode(), b"retry-after": b"1"}
        return 200, headers, json.dumps(self._orderJSON(order)).encode()


class _ACMEResource(Resource):
    """
    The HTTP face of a L{MemoryCA}.
    """

    isLeaf = True

    def __init__(self, ca: MemoryCA) -> None:
        super().__init__()
        self.ca = ca

    def render(self, request: Request) -> bytes:
        ca = self.ca
        path = request.path.decode("ascii", "replace")
        method = request.method.decode("ascii", "replace")
        ca.requests.append((method, path))
        url = ca.base + path
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"replay-nonce", ca.newNonce().encode())
        try:
            if path == "/dir" and method == "GET":
                status, headers, body = 200, {b"content-type": b"application/json"}, self._directory()
            elif path == "/new-nonce" and method in ("HEAD", "GET"):
                status, headers, body = (200 if method == "HEAD" else 204), {}, b""
            elif method == "POST":
                status, headers, body = ca.post(request, url, request.content.read())
            else:
                raise _Problem(405, "malformed", f"{method} {path} is not allowed (ACME reads with POST-as-GET)")
        except _Problem as p:
            status = p.status
            headers = {b"content-type": b"application/problem+json"}
            body = json.dumps({"type": PROBLEM + p.code, "detail": p.detail, "status": p.status}).encode()
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body

    def _directory(self) -> bytes:
        base = self.ca.base
        return json.dumps(
            {
                "newNonce": base + "/new-nonce",
                "newAccount": base + "/new-account",
                "newOrder": base + "/new-order",
                "meta": {"termsOfService": base + "/terms", "externalAccountRequired": False},
            }
        ).encode()


__all__ = [
    "BytesProducer",
    "ChallengeFailed",
    "ChallengeTargets",
    "FakeAcmeClient",
    "MemoryCA",
    "certify",
    "checkNames",
    "memoryHTTPClient",
    "runUntilFired",
]
