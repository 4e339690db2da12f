# -*- test-case-name: tpproxy.test.test_website -*-
"""
TP's HTTPS pages for browsers, on TP's own TLS port (docs/webtransport.md).

With C{[webtransport]}, TP's TLS listener also offers ALPN C{http/1.1}.  A
browser gets there only through the same handshake as every TP client: a
client certificate from TP's CAs, checked against the deny lists and CRLs.
Then this site serves, under the WebTransport path (C{/tp}):

  - C{POST /tp/token}: a token for a WebTransport session
    (L{tpproxy.webtoken}), bound to the request's C{Origin}, carrying the
    certificate the handshake verified; CORS lets allowed origins read it;
  - C{GET /tp/...}: the files of C{tpproxy/web/static} (C{tp.js}, the SSH
    demo); C{/tp/} redirects to the demo.

Anything else is 404.  Nothing here is served without a verified client
certificate: the handshake refuses a browser without one.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import resource, server, static
from twisted.web.iweb import IRequest
from twisted.web.util import Redirect

from tpproxy.pki import identityOf
from tpproxy.webtoken import Gate, TokenError

log = Logger(namespace="tpproxy.web")
audit = Logger(namespace="tpproxy.audit")

STATIC = os.path.join(os.path.dirname(__file__), "static")
#: Seconds a browser's idle HTTPS connection is kept.
IDLE_TIMEOUT = 30


def _common(request: IRequest) -> None:
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"referrer-policy", b"no-referrer")


def _json(request: IRequest, status: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode() + b"\n"


def _peerCertificate(request: IRequest) -> Any:
    """
    The client certificate TP's TLS handshake verified on this connection
    (a C{cryptography} certificate), or C{None}.
    """
    getter = getattr(request.transport, "getPeerCertificate", None)  # type: ignore[attr-defined]
    cert = getter() if getter is not None else None
    return cert.to_cryptography() if cert is not None else None


class TokenResource(resource.Resource):
    """
    C{POST}: a WebTransport token for the certificate of this connection.
    """

    isLeaf = True

    def __init__(self, gate: Gate, clock: IReactorTime) -> None:
        super().__init__()
        self.gate = gate
        self.clock = clock

    def _cors(self, request: IRequest) -> str | None:
        origin = request.getHeader(b"origin")
        text = origin.decode("utf-8", "replace") if origin is not None else None
        request.setHeader(b"vary", b"Origin")
        if text is not None and self.gate.originAllowed(text):
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"access-control-allow-credentials", b"true")
        return text

    def render_OPTIONS(self, request: IRequest) -> bytes:
        _common(request)
        origin = self._cors(request)
        if origin is None or not self.gate.originAllowed(origin):
            request.setResponseCode(403)
            return b""
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", b"POST")
        request.setHeader(b"access-control-max-age", b"600")
        return b""

    def render_POST(self, request: IRequest) -> bytes:
        _common(request)
        origin = self._cors(request)
        certificate = _peerCertificate(request)
        peer = request.getClientAddress()
        if certificate is None:
            # Cannot happen: the site is reached only after a verified handshake.
            return _json(request, 403, {"error": "no_certificate", "message": "a client certificate is required"})
        identity = identityOf(certificate)
        try:
            token = self.gate.mint(certificate, origin, self.clock.seconds())
        except TokenError as e:
            log.info("WebTransport token refused to {identity} from {peer}: {reason} - {message}", identity=identity.name, peer=getattr(peer, "host", peer), reason=e.reason, message=e.message)
            return _json(request, 403, {"error": e.reason, "message": e.message})
        host = (request.getHeader(b"host") or b"").decode("ascii", "replace")
        audit.info(
            "{identity} token for {origin}",
            event="token",
            peer=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
            identity=identity.name,
            serial=identity.serial,
            origin=origin,
            lifetime=self.gate.lifetime,
        )
        return _json(
            request,
            200,
            {
                "token": token,
                "identity": identity.name,
                "expires": round(self.clock.seconds() + self.gate.lifetime, 3),
                "url": f"https://{host}{self.gate.path}",
                # For new WebTransport(url, {serverCertificateHashes}): the
                # certificate TP serves there (tpproxy.transports.webtransport).
                "serverCertificateHashes": [
                    {"algorithm": "sha-256", "value": value} for value in (self.gate.certificate.hashes() if self.gate.certificate else ())
                ],
            },
        )

    def render_GET(self, request: IRequest) -> bytes:
        _common(request)
        request.setHeader(b"allow", b"POST")
        return _json(request, 405, {"error": "method", "message": "POST for a token"})


#: What the static files are served as (module scripts in UTF-8).
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8", ".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8"}


class _Files(static.File):
    """
    The static files, without directory listings.
    """

    contentTypes = {**static.File.contentTypes, **CONTENT_TYPES}

    def directoryListing(self) -> resource.Resource:
        return resource.NoResource("Not found")

    def render_GET(self, request: IRequest) -> Any:
        _common(request)
        request.setHeader(b"cache-control", b"no-cache")
        return super().render_GET(request)


class _Root(resource.Resource):
    """
    The WebTransport path: C{token}, the static files, and C{/tp/} to the demo.
    """

    def __init__(self, gate: Gate, clock: IReactorTime, staticDir: str) -> None:
        super().__init__()
        self.putChild(b"token", TokenResource(gate, clock))
        self.files = _Files(staticDir)

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        if path == b"":
            return Redirect(b"ssh.html")
        return self.files.getChild(path, request)


def makeSite(gate: Gate, clock: IReactorTime, staticDir: str = STATIC) -> server.Site:
    """
    The site of TP's HTTPS pages, rooted at the gate's path.
    """
    root = resource.Resource()
    node = root
    parts = [p.encode() for p in gate.path.strip("/").split("/")]
    for part in parts[:-1]:
        child = resource.Resource()
        node.putChild(part, child)
        node = child
    node.putChild(parts[-1], _Root(gate, clock, staticDir))
    site = server.Site(root, timeout=IDLE_TIMEOUT)
    site.displayTracebacks = False
    site.noisy = False
    return site
