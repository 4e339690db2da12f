# -*- test-case-name: tpproxy.test.test_acme -*-
"""
The two ACME challenge responders: http-01 as a Twisted Web resource and
tls-alpn-01 as certificates the TLS listener serves for C{acme-tls/1}.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web import resource
from twisted.web.server import Request
from zope.interface import implementer

from tpproxy.acme.client import HTTP01, TLSALPN01, IChallengeResponder, tlsALPNCertificate
from tpproxy.transports.servertls import ServerTLS

log = Logger()


@implementer(IChallengeResponder)
class HTTP01Responder(resource.Resource):
    """
    RFC 8555 section 8.3: answers C{GET /.well-known/acme-challenge/TOKEN}
    with the key authorization while the challenge is pending; 404 for
    anything else.  Serve it with C{twisted.web.server.Site} on port 80.
    """

    isLeaf = True
    challengeType = HTTP01

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[str, str] = {}

    def start(self, name: str, token: str, keyAuthorization: str) -> None:
        self.tokens[token] = keyAuthorization

    def stop(self, name: str, token: str) -> None:
        self.tokens.pop(token, None)

    def render_GET(self, request: Request) -> bytes:
        path = request.path.decode("ascii", "replace")
        prefix = "/.well-known/acme-challenge/"
        answer = self.tokens.get(path[len(prefix) :]) if path.startswith(prefix) else None
        if answer is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"not found\n"
        log.info("Answered the http-01 challenge {path} for {peer}", path=path, peer=str(request.getClientAddress()))
        request.setHeader(b"content-type", b"text/plain")
        return answer.encode("ascii")


@implementer(IChallengeResponder)
class TLSALPN01Responder:
    """
    RFC 8737: serves the challenge certificate on TP's own TLS listener to
    a client that offers ALPN C{acme-tls/1} alone with the name's SNI (see
    L{tpproxy.transports.servertls.ServerTLS._selectALPN}).
    """

    challengeType = TLSALPN01

    def __init__(self, serverTLS: ServerTLS) -> None:
        self.serverTLS = serverTLS

    def start(self, name: str, token: str, keyAuthorization: str) -> None:
        self.serverTLS.challengeCertificates[name] = tlsALPNCertificate(name, keyAuthorization)

    def stop(self, name: str, token: str) -> None:
        self.serverTLS.challengeCertificates.pop(name, None)
