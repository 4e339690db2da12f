# -*- test-case-name: tpproxy.test.test_acme -*-
"""
An RFC 8555 (ACME) client on treq, with certbot's C{acme} package as the
message and JWS layer.

Why not C{acme.client.ClientV2} in a thread: its calls block, its polls
sleep in pool threads and cannot be cancelled, and a reactor stopping
while a poll sleeps waits for it.  Here every request is one treq call
with a timeout, waits between polls are C{deferLater} on the reactor
(honouring C{Retry-After}), and stopping TP cancels an order in flight at
once.  C{acme.jws.JWS} signs requests and C{acme.messages.Error} reads the
CA's problem documents, so nothing of the protocol's encoding is
reimplemented; what is written here is the request flow of RFC 8555
section 7: nonces (with C{badNonce} retries), account, order,
authorizations, challenges, finalization and download.

Challenges are answered by an L{IChallengeResponder}: TP has one for
http-01 (a web resource) and one for tls-alpn-01 (RFC 8737, served on its
own TLS listener by ALPN C{acme-tls/1}); see L{tpproxy.acme.service}.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import json
import math
from typing import Any

import josepy as jose
from acme import jws, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier
from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from zope.interface import Attribute, Interface, implementer

from tpproxy.pki import newKey, selfSignedBuilder

log = Logger()

#: RFC 8737: the certificate extension carrying the key authorization digest.
ID_PE_ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")

HTTP01 = "http-01"
TLSALPN01 = "tls-alpn-01"
CHALLENGE_TYPES = (TLSALPN01, HTTP01)

JOSE_JSON = b"application/jose+json"
PEM_CHAIN = b"application/pem-certificate-chain"


class AcmeError(Exception):
    """
    The CA refused or failed a request, or an order could not complete.

    @ivar code: the ACME error code (C{badNonce}, C{rateLimited}, ...) when
        the CA sent a problem document, else C{None}.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def accountJWK(key: Any) -> jose.JWK:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return jose.JWKEC(key=key)
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key)
    raise TypeError(f"unsupported ACME account key type {type(key).__name__}")


def _signatureAlgorithm(key: Any) -> jose.JWASignature:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {256: jose.ES256, 384: jose.ES384, 521: jose.ES512}[key.curve.key_size]
    return jose.RS256


def keyAuthorization(token: str, accountKey: Any) -> str:
    """
    RFC 8555 section 8.1: C{token || '.' || base64url(JWK thumbprint)}.
    """
    thumbprint = accountJWK(accountKey).public_key().thumbprint(hashes.SHA256)
    return f"{token}.{_b64(thumbprint)}"


def tlsALPNCertificate(name: str, keyAuthz: str) -> tuple[x509.Certificate, Any]:
    """
    RFC 8737 section 3: a self-signed certificate for C{name} with the
    critical acmeIdentifier extension holding SHA-256(key authorization).
    """
    key = newKey()
    digest = hashlib.sha256(keyAuthz.encode("ascii")).digest()
    cert = (
        selfSignedBuilder("ACME tls-alpn-01 challenge", key, datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # DER OCTET STRING of the 32-byte digest.
        .add_extension(x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def certificateRequest(names: list[str], key: Any) -> bytes:
    """
    A DER CSR for C{names}, the first as common name.
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


class IChallengeResponder(Interface):
    """
    Something that can prove control of a name to the CA by one challenge
    type.
    """

    challengeType = Attribute("the challenge type, e.g. C{http-01}")

    def start(name: str, token: str, keyAuthorization: str) -> None:
        """
        Begin answering the challenge for C{name}.
        """

    def stop(name: str, token: str) -> None:
        """
        Stop answering it.
        """


class IAcmeClient(Interface):
    """
    One ACME account at one CA, as the issuing service uses it.

    L{AcmeClient} speaks RFC 8555 over HTTP;
    L{tpproxy.acme.testing.FakeAcmeClient} stands in for it in the
    scheduling tests.  Both pass the same conformance suite
    (L{tpproxy.test.test_acme_conformance}), which also runs L{AcmeClient}
    against an in-memory CA (L{tpproxy.acme.testing.MemoryCA}) and Pebble.
    """

    directoryURL = Attribute("the CA's directory URL, as stored beside each certificate")
    timeout = Attribute("seconds each request to the CA may take")
    orderTimeout = Attribute("seconds a whole order may take, polls included")
    reactor = Attribute("the L{IReactorTime} the requests and waits run on")

    def register() -> defer.Deferred[str]:
        """
        Create the account, or find the one the key already has.

        @return: a Deferred firing with the account URL.
        """

    def issue(names: list[str], key: Any, responders: dict[str, Any]) -> defer.Deferred[list[x509.Certificate]]:
        """
        Order a certificate for C{names} (the first as common name) with
        the private C{key}, proving control of each name with the first
        challenge type of C{responders} (L{IChallengeResponder}s by type,
        in order of preference) that the CA offers.  Each responder is
        started for its challenge and stopped once the CA has decided.

        @return: a Deferred firing with the chain, leaf first, the leaf
            certifying C{key} for (at least) C{names}; or failing with an
            L{AcmeError}: C{code="unsupportedChallenge"} when the CA offers
            none of the types, C{code="invalid"} when a challenge failed
            validation.
        """


def retryAfter(headers: Any, default: float, now: float, limit: float = 300) -> float:
    """
    Seconds to wait according to a C{Retry-After} header (seconds or an
    HTTP date), else C{default}; never more than C{limit}.
    """
    values = headers.getRawHeaders(b"retry-after") or []
    if not values:
        return default
    text = values[0].decode("latin-1").strip()
    try:
        delay = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return default
        delay = when.timestamp() - now
    if not math.isfinite(delay):
        return default
    # A floor keeps a CA answering "Retry-After: 0" from a busy loop.
    return max(0.5, min(delay, limit))


@implementer(IAcmeClient)
class AcmeClient:
    """
    One ACME account at one CA directory.

    @param directory: the directory URL.
    @param accountKey: the account's private key (EC P-256/384 or RSA).
    @param reactor: the reactor for requests (unless C{http} is given: then
        only their timeouts) and waits between polls.
    @param trustRoots: CA certificates to trust for the directory's HTTPS
        instead of the system's (private CAs, tests).
    @param contact: e.g. C{("mailto:admin@example.org",)}.
    @param http: the HTTP client to reach the CA with; by default a treq
        L{HTTPClient} on an L{Agent} of C{reactor} trusting C{trustRoots}.
        Tests pass one on an in-memory agent
        (L{tpproxy.acme.testing.MemoryCA.httpClient}).
    """

    timeout = 30.0
    pollInterval = 1.0
    orderTimeout = 120.0

    def __init__(
        self,
        directory: str,
        accountKey: Any,
        reactor: IReactorTime,
        trustRoots: list[x509.Certificate] | None = None,
        contact: tuple[str, ...] = (),
        http: HTTPClient | None = None,
    ) -> None:
        self.directoryURL = directory
        self.accountKey = accountKey
        self.jwk = accountJWK(accountKey)
        self.alg = _signatureAlgorithm(accountKey)
        self.reactor = reactor
        self.contact = contact
        if http is None:
            if trustRoots:
                from twisted.internet.ssl import Certificate, trustRootFromCertificates

                policy = BrowserLikePolicyForHTTPS(
                    trustRootFromCertificates([Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in trustRoots])
                )
            else:
                policy = BrowserLikePolicyForHTTPS()
            http = HTTPClient(Agent(reactor, contextFactory=policy))
        self.http = http
        self.directory: dict[str, Any] | None = None
        self.accountURL: str | None = None
        self._nonces: list[str] = []

    # -- transport ---------------------------------------------------

    def _keepNonce(self, response: Any) -> None:
        for value in response.headers.getRawHeaders(b"replay-nonce") or []:
            self._nonces.append(value.decode("ascii"))

    @defer.inlineCallbacks
    def _getDirectory(self) -> Any:
        if self.directory is None:
            response = yield self.http.get(self.directoryURL, timeout=self.timeout, reactor=self.reactor, unbuffered=True)
            body = yield self._body(response)
            if response.code != 200:
                raise AcmeError(f"ACME directory {self.directoryURL} answered HTTP {response.code}")
            try:
                directory = json.loads(body)
                for key in ("newNonce", "newAccount", "newOrder"):
                    if not isinstance(directory.get(key), str):
                        raise ValueError(f"no {key}")
            except ValueError as e:
                raise AcmeError(f"ACME directory {self.directoryURL} is not a valid directory: {e}") from None
            self.directory = directory
        return self.directory

    @defer.inlineCallbacks
    def _nonce(self) -> Any:
        if not self._nonces:
            directory = yield self._getDirectory()
            response = yield self.http.head(directory["newNonce"], timeout=self.timeout, reactor=self.reactor, unbuffered=True)
            yield self._body(response)
            self._keepNonce(response)
            if not self._nonces:
                raise AcmeError("the CA gave no Replay-Nonce")
        return self._nonces.pop()

    @defer.inlineCallbacks
    def _post(self, url: str, payload: Any, accept: bytes = b"application/json", useKid: bool = True) -> Any:
        """
        A signed POST (C{payload=None}: POST-as-GET).  A C{badNonce}
        refusal is retried with the fresh nonce it carries, as RFC 8555
        section 6.5 says.

        @return: a Deferred firing with C{(response, body bytes)}.
        """
        body = b"" if payload is None else json.dumps(payload).encode()
        for attempt in range(4):
            nonce = yield self._nonce()
            kid = self.accountURL if useKid else None
            signed = jws.JWS.sign(body, key=self.jwk, alg=self.alg, nonce=jose.decode_b64jose(nonce), url=url, kid=kid)
            response = yield self.http.post(
                url,
                data=signed.json_dumps().encode(),
                headers={b"Content-Type": [JOSE_JSON], b"Accept": [accept]},
                timeout=self.timeout,
                reactor=self.reactor,
                unbuffered=True,
            )
            content = yield self._body(response)
            self._keepNonce(response)
            if response.code < 400:
                return response, content
            error = self._problem(response, content)
            if error.code == "badNonce" and attempt < 3:
                log.debug("ACME badNonce from {url}; retrying", url=url)
                continue
            raise error
        raise AssertionError("unreachable")

    def _body(self, response: Any) -> defer.Deferred[bytes]:
        """
        The body of C{response}, within the request timeout (treq's own
        timeout ends at the headers): a CA that stalls mid-body is cut off.
        """
        reading = response.content()

        def stalled(failure: Any) -> Any:
            if failure.check(defer.TimeoutError, defer.CancelledError):
                # Twisted's Response holds a TransportProxyProducer around
                # the connection: abort the connection itself.
                proxy = getattr(response.original, "_transport", None)
                transport = getattr(proxy, "_producer", None) or proxy
                if hasattr(transport, "abortConnection"):
                    transport.abortConnection()
                elif transport is not None:
                    transport.stopProducing()
                raise AcmeError(f"the CA's answer stalled for {self.timeout:g} s")
            return failure

        return reading.addTimeout(self.timeout, self.reactor).addErrback(stalled)

    @staticmethod
    def _problem(response: Any, content: bytes) -> AcmeError:
        try:
            problem = messages.Error.from_json(json.loads(content))
        except (ValueError, jose.DeserializationError):
            return AcmeError(f"HTTP {response.code} from the CA: {content[:200]!r}")
        return AcmeError(f"the CA refused: {problem}", problem.code)

    @staticmethod
    def _json(content: bytes, what: str) -> dict[str, Any]:
        try:
            value = json.loads(content)
        except ValueError:
            raise AcmeError(f"the CA's {what} is not JSON") from None
        if not isinstance(value, dict):
            raise AcmeError(f"the CA's {what} is not a JSON object")
        return value

    # -- account ------------------------------------------------------

    @defer.inlineCallbacks
    def register(self) -> Any:
        """
        Create the account, or find it if the key already has one (the CA
        answers 200 with its URL).

        @return: a Deferred firing with the account URL.
        """
        directory = yield self._getDirectory()
        payload: dict[str, Any] = {"termsOfServiceAgreed": True}
        if self.contact:
            payload["contact"] = list(self.contact)
        response, content = yield self._post(directory["newAccount"], payload, useKid=False)
        location = response.headers.getRawHeaders(b"location") or []
        if not location:
            raise AcmeError("the CA gave no account URL")
        account = self._json(content, "account")
        if account.get("status") not in (None, "valid"):
            raise AcmeError(f"the ACME account is {account.get('status')}")
        self.accountURL = location[0].decode("ascii")
        log.info("ACME account {account} at {directory}", account=self.accountURL, directory=self.directoryURL)
        return self.accountURL

    # -- issuance ------------------------------------------------------

    @defer.inlineCallbacks
    def _poll(self, url: str, what: str, done: tuple[str, ...], deadline: float) -> Any:
        while True:
            response, content = yield self._post(url, None)
            resource = self._json(content, what)
            status = resource.get("status")
            if status in done:
                return resource
            if status == "invalid":
                raise AcmeError(f"the {what} became invalid: {self._failure(resource)}", "invalid")
            if status not in ("pending", "processing", "ready"):
                raise AcmeError(f"the {what} is {status!r}")
            now = self.reactor.seconds()
            if now >= deadline:
                raise AcmeError(f"the {what} is still {status} after {self.orderTimeout:.0f} s")
            delay = retryAfter(response.headers, self.pollInterval, now, limit=deadline - now)
            yield task.deferLater(self.reactor, delay, lambda: None)

    @staticmethod
    def _failure(resource: dict[str, Any]) -> str:
        problems = []
        for challenge in resource.get("challenges", []):
            error = challenge.get("error")
            if error:
                try:
                    problems.append(f"{challenge.get('type')}: {messages.Error.from_json(error)}")
                except (jose.DeserializationError, TypeError):
                    problems.append(f"{challenge.get('type')}: {error!r}")
        if resource.get("error"):
            problems.append(repr(resource["error"]))
        return "; ".join(problems) or "no reason given"

    @defer.inlineCallbacks
    def _authorize(self, url: str, responders: dict[str, Any], deadline: float) -> Any:
        response, content = yield self._post(url, None)
        authz = self._json(content, "authorization")
        name = authz.get("identifier", {}).get("value", "?")
        if authz.get("status") == "valid":
            return
        offered = {c.get("type"): c for c in authz.get("challenges", [])}
        usable = [t for t in responders if t in offered]
        if not usable:
            raise AcmeError(
                f"the CA offers {sorted(t for t in offered if t)} for {name}; TP is set to answer {list(responders)}", "unsupportedChallenge"
            )
        challenge = offered[usable[0]]
        responder = responders[usable[0]]
        token = challenge["token"]
        responder.start(name, token, keyAuthorization(token, self.accountKey))
        try:
            log.info("ACME {challenge} challenge for {name}", challenge=usable[0], name=name)
            yield self._post(challenge["url"], {})
            yield self._poll(url, f"authorization of {name}", ("valid",), deadline)
        finally:
            responder.stop(name, token)

    @defer.inlineCallbacks
    def issue(self, names: list[str], key: Any, responders: dict[str, Any]) -> Any:
        """
        Order a certificate for C{names} with C{key}, proving control with
        the first challenge type in C{responders} (ordered by preference)
        the CA offers.

        @return: a Deferred firing with the chain, leaf first.
        """
        if self.accountURL is None:
            yield self.register()
        directory = yield self._getDirectory()
        deadline = self.reactor.seconds() + self.orderTimeout
        try:
            response, content = yield self._post(
                directory["newOrder"], {"identifiers": [{"type": "dns", "value": n} for n in names]}
            )
        except AcmeError as e:
            if e.code not in ("accountDoesNotExist", "unauthorized"):
                raise
            # The CA forgot the account (a test CA restarted): register
            # again, once.  (A deactivated account's key stays refused.)
            yield self.register()
            response, content = yield self._post(
                directory["newOrder"], {"identifiers": [{"type": "dns", "value": n} for n in names]}
            )
        location = response.headers.getRawHeaders(b"location") or []
        if not location:
            raise AcmeError("the CA gave no order URL")
        orderURL = location[0].decode("ascii")
        order = self._json(content, "order")
        for authzURL in order.get("authorizations", []):
            yield self._authorize(authzURL, responders, deadline)
        order = yield self._poll(orderURL, "order", ("ready", "valid"), deadline)
        if order["status"] == "ready":
            yield self._post(order["finalize"], {"csr": _b64(certificateRequest(names, key))})
            order = yield self._poll(orderURL, "order", ("valid",), deadline)
        if not isinstance(order.get("certificate"), str):
            raise AcmeError("the valid order has no certificate URL")
        response, content = yield self._post(order["certificate"], None, accept=PEM_CHAIN)
        try:
            chain = x509.load_pem_x509_certificates(content)
        except ValueError as e:
            raise AcmeError(f"the CA's certificate chain does not parse: {e}") from None
        leafKey = chain[0].public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        ourKey = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if leafKey != ourKey:
            raise AcmeError("the CA's certificate is not for the key TP sent")
        try:
            san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            certified = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
        except x509.ExtensionNotFound:
            certified = set()
        if not set(names) <= certified:
            raise AcmeError(f"the CA's certificate is for {sorted(certified)}, not {names}")
        if chain[0].not_valid_after_utc.timestamp() <= self.reactor.seconds():
            raise AcmeError("the CA's certificate has already expired")
        return chain
