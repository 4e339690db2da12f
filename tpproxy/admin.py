# -*- test-case-name: tpproxy.test.test_metrics -*-
"""
TP's admin listener: C{/metrics} (Prometheus text format), C{/status}
(JSON) and C{POST /reload}, off unless C{[admin] listen} names an endpoint.

It listens on its own endpoint, separate from the proxy's port, so that a
firewall or C{interface=127.0.0.1} keeps it private.  With C{[admin]
identities}, it speaks TLS 1.3 and asks for a client certificate from TP's
client CAs, decided by the same verdict as the proxy (deny lists, CRLs),
and serves only the identities listed.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from prometheus_client.twisted import MetricsResource
from twisted.application import service, strports
from twisted.internet.interfaces import IProtocolFactory
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from tpproxy.metrics import Metrics
from tpproxy.pki import identityOf


class _Refused(resource.Resource):
    isLeaf = True

    def __init__(self, code: int, message: str) -> None:
        super().__init__()
        self.code = code
        self.message = message

    def render(self, request: IRequest) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (self.message + "\n").encode()


class _JSON(resource.Resource):
    """
    C{GET} answers C{read()} as JSON.
    """

    isLeaf = True

    def __init__(self, read: Callable[[], Any]) -> None:
        super().__init__()
        self.read = read

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.read(), indent=1).encode() + b"\n"


class _Reload(resource.Resource):
    """
    C{POST} reloads the configuration file: 200 with the summary if it took
    effect, 422 with the error (the old configuration stays) if not.
    """

    isLeaf = True

    def __init__(self, reload: Callable[[], tuple[bool, str]]) -> None:
        super().__init__()
        self.reload = reload

    def render_POST(self, request: IRequest) -> bytes:
        ok, message = self.reload()
        request.setResponseCode(200 if ok else 422)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"ok": ok, "message": message}).encode() + b"\n"


class AdminRoot(resource.Resource):
    """
    The admin listener's tree: C{/metrics}, and with a server behind it
    C{/status} (JSON, docs/operations.md) and C{POST /reload}.

    @param identities: if not L{None}, only requests over TLS whose client
        certificate names one of these identities are served.
    """

    def __init__(
        self,
        metrics: Metrics,
        identities: frozenset[str] | None = None,
        status: Callable[[], Any] | None = None,
        reload: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        super().__init__()
        self.identities = identities
        self.putChild(b"metrics", MetricsResource(registry=metrics.registry))
        if status is not None:
            self.putChild(b"status", _JSON(status))
        if reload is not None:
            self.putChild(b"reload", _Reload(reload))

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        served = ", ".join("/" + name.decode() for name in sorted(self.children))
        return _Refused(404, f"Not found: the admin listener serves {served}")

    def getChildWithDefault(self, path: bytes, request: IRequest) -> resource.Resource:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        return super().getChildWithDefault(path, request)

    def _refusal(self, request: IRequest) -> resource.Resource | None:
        if self.identities is None:
            return None
        peer = _peerCertificate(request)
        if peer is None:
            return _Refused(403, "The admin listener needs a client certificate")
        identity = identityOf(peer).name
        if identity not in self.identities:
            return _Refused(403, f"{identity} may not use the admin listener")
        return None


def _peerCertificate(request: IRequest) -> Any:
    transport = getattr(request.channel, "transport", None)  # type: ignore[attr-defined]
    getPeer = getattr(transport, "getPeerCertificate", None)
    if getPeer is None:
        return None
    cert = getPeer()
    return cert.to_cryptography() if cert is not None else None


def adminSite(
    metrics: Metrics,
    identities: frozenset[str] | None = None,
    status: Callable[[], Any] | None = None,
    reload: Callable[[], tuple[bool, str]] | None = None,
) -> server.Site:
    site = server.Site(AdminRoot(metrics, identities, status, reload))
    site.displayTracebacks = False
    site.noisy = False
    return site


def adminService(listen: str, factory: IProtocolFactory, reactor: Any = None) -> service.IService:
    """
    A service listening on the endpoint description C{listen}; a failed
    bind stops startup.
    """
    svc = strports.service(listen, factory, reactor=reactor)
    svc.setName("admin")
    svc._raiseSynchronously = True  # type: ignore[attr-defined]
    return svc
