"""
Tests for L{tpproxy.web.site}: TP's HTTPS pages on its own TLS port, for
real over TLS on loopback.  TP runs in-process with C{[webtransport]};
the client is Python's C{ssl} and C{http.client} in a thread (a browser's
part: ALPN C{http/1.1}, a client certificate of TP's CA).
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from tpproxy.pki import loadCertificates
from tpproxy.service import makeServerFactory
from tpproxy.test.support import Echo, auditObserver, audits, listenLocal
from tpproxy.testing import TestPKI
from tpproxy.web.site import STATIC, makeSite
from tpproxy.wire import ClientHello, FrameDecoder, ServerHello

#: What a client that gets no HTTP answer sees: the handshake (or the
#: first read after it, in TLS 1.3) fails, or the connection closes.
NO_ANSWER = (ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class WebSiteTestCase(TestCase):
    timeout = 60
    #: The [webtransport] table, or None for TP without it.
    webtransport: dict[str, Any] | None = {}

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        extra: dict[str, Any] = {} if self.webtransport is None else {"webtransport": dict(self.webtransport)}
        config = self.pki.serverConfig(quic=["127.0.0.1:4433"], deny={"identities": ["mallory"]}, **extra)
        self.factory = makeServerFactory(config, reactor)  # type: ignore[arg-type]
        self.tp = self.factory.wrappedFactory
        if self.webtransport is not None:
            # The static files, with a subdirectory, and a file beside them
            # that must never be served.
            root = Path(self.mktemp())
            root.mkdir()
            (root / "secret.txt").write_text("secret\n")
            static = root / "static"
            shutil.copytree(STATIC, static)
            (static / "sub").mkdir()
            (static / "sub" / "file.txt").write_text("in sub\n")
            self.tp.web = makeSite(self.tp.gate, reactor, str(static))  # type: ignore[arg-type]
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.port = port.getHost().port
        self.origin = f"https://localhost:{self.port}"

        def stop() -> Any:
            for proto in list(self.factory.protocols):
                proto.transport.abortConnection()
            return port.stopListening()

        self.addCleanup(stop)
        self.audits = auditObserver(self)

    def context(self, name: str | None = "alice", alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.pki.caPath)
        ctx.set_alpn_protocols(list(alpn))
        if name is not None:
            d = self.pki.directory
            ctx.load_cert_chain(str(d / f"{name}.pem"), str(d / f"{name}.key"))
        return ctx

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, name: str | None = "alice", body: bytes | None = None) -> defer.Deferred[Response]:
        """
        One HTTPS request with C{name}'s client certificate, in a thread.
        """
        ctx = self.context(name)

        def run() -> Response:
            conn = http.client.HTTPSConnection("localhost", self.port, context=ctx, timeout=10)
            try:
                conn.request(method, path, body=body, headers=headers or {})
                r = conn.getresponse()
                return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
            finally:
                conn.close()

        return threads.deferToThread(run)

    def raw(self, alpn: tuple[str, ...], send: bytes = b"", name: str = "alice", enough: int | None = None) -> defer.Deferred[tuple[str | None, bytes]]:
        """
        A TLS connection offering C{alpn}: send C{send}, read until the
        server closes (or, with C{enough}, until a ServerHello and
        C{enough} bytes after it came); return the negotiated ALPN and
        the bytes.
        """
        ctx = self.context(name, alpn)

        def run() -> tuple[str | None, bytes]:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                    if send:
                        tls.sendall(send)
                    got = b""
                    try:
                        while True:
                            chunk = tls.recv(65536)
                            if not chunk:
                                break
                            got += chunk
                            if enough is not None and _complete(got, enough):
                                break
                    except (socket.timeout, ssl.SSLError, ConnectionError):
                        pass
                    return tls.selected_alpn_protocol(), got

        return threads.deferToThread(run)


def _complete(data: bytes, rest: int) -> bool:
    decoder = FrameDecoder()
    decoder.feed(data)
    return decoder.nextFrame() is not None and len(decoder.takeRest()) >= rest


def serverHello(data: bytes) -> tuple[ServerHello, bytes]:
    decoder = FrameDecoder()
    decoder.feed(data)
    frame = decoder.nextFrame()
    assert frame is not None, data
    return ServerHello.fromObject(frame), decoder.takeRest()


class TokenTests(WebSiteTestCase):
    """
    C{POST /tp/token}.
    """

    @defer.inlineCallbacks
    def test_mint(self) -> Any:
        """
        A POST with an allowed C{Origin}: 200, JSON with a token the gate
        redeems for that origin (bound to the certificate of the
        connection), alice's identity, and the WebTransport URL; CORS lets
        that origin read it; the mint is audited.
        """
        r = yield self.request("POST", "/tp/token", {"Origin": self.origin})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.headers["content-type"], "application/json")
        self.assertEqual(r.headers["cache-control"], "no-store")
        self.assertEqual(r.headers["access-control-allow-origin"], self.origin)
        self.assertEqual(r.headers["access-control-allow-credentials"], "true")
        self.assertIn("Origin", r.headers["vary"])
        self.assertEqual(r.headers["x-content-type-options"], "nosniff")
        body = r.json()
        self.assertEqual(body["identity"], "alice")
        self.assertEqual(body["url"], f"https://localhost:{self.port}/tp")
        self.assertLess(abs(body["expires"] - reactor.seconds() - self.tp.gate.lifetime), 5)  # type: ignore[attr-defined]
        grant = self.tp.gate.redeem(body["token"], self.origin, reactor.seconds())  # type: ignore[attr-defined]
        self.assertEqual(grant.certificate, loadCertificates(str(self.pki.directory / "alice.pem"))[0])
        self.assertEqual(grant.audience, self.origin)
        [event] = audits(self.audits)
        self.assertEqual((event["event"], event["identity"], event["origin"]), ("token", "alice", self.origin))
        self.assertNotIn(body["token"], json.dumps(event, default=str))

    @defer.inlineCallbacks
    def test_tokenForItsOriginOnly(self) -> Any:
        """
        The token is bound to the Origin of the request: another allowed
        origin cannot redeem it.
        """
        r = yield self.request("POST", "/tp/token", {"Origin": self.origin})
        e = self.assertRaises(Exception, self.tp.gate.redeem, r.json()["token"], f"https://127.0.0.1:{self.port}", reactor.seconds())  # type: ignore[attr-defined]
        self.assertEqual(getattr(e, "reason", None), "wrong_audience")

    @defer.inlineCallbacks
    def test_noOrigin(self) -> Any:
        """
        Without C{Origin}: 403 C{no_origin}, no CORS header, no token.
        """
        r = yield self.request("POST", "/tp/token")
        self.assertEqual(r.status, 403)
        self.assertEqual(r.json()["error"], "no_origin")
        self.assertNotIn("token", r.json())
        self.assertNotIn("access-control-allow-origin", r.headers)
        self.assertEqual(self.tp.gate.minted, 0)

    @defer.inlineCallbacks
    def test_originNotAllowed(self) -> Any:
        """
        From an origin that is not one of TP's names (or not https): 403,
        and no CORS header, so the page cannot even read the refusal.
        """
        for origin in ("https://evil.example", f"http://localhost:{self.port}", "null"):
            r = yield self.request("POST", "/tp/token", {"Origin": origin})
            self.assertEqual(r.status, 403, origin)
            self.assertEqual(r.json()["error"], "origin_not_allowed")
            self.assertNotIn("access-control-allow-origin", r.headers)
        self.assertEqual(self.tp.gate.minted, 0)
        self.assertEqual(audits(self.audits), [])

    @defer.inlineCallbacks
    def test_preflight(self) -> Any:
        """
        CORS preflight: 204 with the allowed method for an allowed origin,
        403 without CORS headers for another.
        """
        r = yield self.request("OPTIONS", "/tp/token", {"Origin": self.origin, "Access-Control-Request-Method": "POST"})
        self.assertEqual(r.status, 204)
        self.assertEqual(r.headers["access-control-allow-origin"], self.origin)
        self.assertEqual(r.headers["access-control-allow-methods"], "POST")
        r = yield self.request("OPTIONS", "/tp/token", {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        self.assertEqual(r.status, 403)
        self.assertNotIn("access-control-allow-origin", r.headers)

    @defer.inlineCallbacks
    def test_get(self) -> Any:
        """
        GET /tp/token: 405, POST allowed.
        """
        r = yield self.request("GET", "/tp/token", {"Origin": self.origin})
        self.assertEqual(r.status, 405)
        self.assertEqual(r.headers["allow"], "POST")
        self.assertEqual(self.tp.gate.minted, 0)


class FileTests(WebSiteTestCase):
    """
    The static files under C{/tp/}.
    """

    @defer.inlineCallbacks
    def test_tpjs(self) -> Any:
        """
        C{/tp/tp.js} is served as JavaScript (a module script needs the
        type), not sniffed, not framed.
        """
        r = yield self.request("GET", "/tp/tp.js")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers["content-type"].split(";")[0], "text/javascript")
        self.assertEqual(r.headers["x-content-type-options"], "nosniff")
        self.assertEqual(r.headers["x-frame-options"], "DENY")
        self.assertEqual(r.body, (Path(STATIC) / "tp.js").read_bytes())

    @defer.inlineCallbacks
    def test_scriptCharset(self) -> Any:
        """
        Scripts are served with the content type the site sets for them,
        C{text/javascript; charset=utf-8}, wherever they are (the bundle
        is not ASCII).
        """
        for path in ("/tp/tp.js", "/tp/ssh-demo.js"):
            r = yield self.request("GET", path)
            self.assertEqual(r.headers["content-type"], "text/javascript; charset=utf-8", path)

    @defer.inlineCallbacks
    def test_rootRedirects(self) -> Any:
        """
        C{/tp/} redirects to the demo page.
        """
        r = yield self.request("GET", "/tp/")
        self.assertIn(r.status, (301, 302, 303, 307, 308))
        self.assertTrue(r.headers["location"].endswith("ssh.html"), r.headers)

    @defer.inlineCallbacks
    def test_noListing(self) -> Any:
        """
        A directory is not listed (404); its files are served.
        """
        r = yield self.request("GET", "/tp/sub/")
        self.assertEqual(r.status, 404)
        self.assertNotIn(b"file.txt", r.body)
        r = yield self.request("GET", "/tp/sub")
        self.assertNotIn(b"file.txt", r.body)
        r = yield self.request("GET", "/tp/sub/file.txt")
        self.assertEqual((r.status, r.body), (200, b"in sub\n"))

    @defer.inlineCallbacks
    def test_traversal(self) -> Any:
        """
        Nothing outside the static directory is served, however the path
        is written: 404 (or, for an empty segment, the redirect of C{/tp/}),
        never the file, never a server error.
        """
        for path in (
            "/tp/../secret.txt",
            "/tp/sub/../../secret.txt",
            "/tp/%2e%2e/secret.txt",
            "/tp/%2E%2E%2Fsecret.txt",
            "/tp/..%2fsecret.txt",
            "/tp/sub/..%2f..%2fsecret.txt",
            "/tp/..%5csecret.txt",
            "/tp//etc/passwd",
            "/tp/%2fetc%2fpasswd",
            "/secret.txt",
            "/",
        ):
            r = yield self.request("GET", path)
            self.assertIn(r.status, (404, 302), path)
            self.assertNotIn(b"secret", r.body, path)
            self.assertNotIn(b"root:", r.body, path)


class HandshakeTests(WebSiteTestCase):
    """
    Who gets an HTTP answer at all: only a verified client certificate.
    """

    def assertNoAnswer(self, name: str | None) -> Any:
        d = self.request("POST", "/tp/token", {"Origin": self.origin}, name=name)
        return self.assertFailure(d, *NO_ANSWER)

    @defer.inlineCallbacks
    def test_noCertificate(self) -> Any:
        yield self.assertNoAnswer(None)
        self.assertEqual(self.tp.gate.minted, 0)

    @defer.inlineCallbacks
    def test_expiredCertificate(self) -> Any:
        self.pki.expiredClient("alice")
        yield self.assertNoAnswer("alice-expired")
        self.assertEqual(self.tp.gate.minted, 0)

    @defer.inlineCallbacks
    def test_deniedCertificate(self) -> Any:
        self.pki.client("mallory")
        yield self.assertNoAnswer("mallory")
        self.assertEqual(self.tp.gate.minted, 0)

    @defer.inlineCallbacks
    def test_otherCA(self) -> Any:
        other = TestPKI.create(self.mktemp())
        other.client("alice")
        shutil.copy(other.directory / "alice.pem", self.pki.directory / "eve.pem")
        shutil.copy(other.directory / "alice.key", self.pki.directory / "eve.key")
        yield self.assertNoAnswer("eve")
        self.assertEqual(self.tp.gate.minted, 0)

    @defer.inlineCallbacks
    def test_tpClientSamePort(self) -> Any:
        """
        A TP client (ALPN tp/1, or tp/1 and http/1.1) on the same port
        still gets its tunnel.
        """
        echoPort, _ = listenLocal(self, Echo)
        for alpn in (("tp/1",), ("tp/1", "http/1.1"), ("http/1.1", "tp/1")):
            negotiated, data = yield self.raw(alpn, ClientHello.connect("127.0.0.1", echoPort).toFrame() + b"hello", enough=5)
            self.assertEqual(negotiated, "tp/1", alpn)
            hello, rest = serverHello(data)
            self.assertTrue(hello.ok, hello)
            self.assertEqual(rest, b"hello")


class WithoutWebTransportTests(WebSiteTestCase):
    """
    Without C{[webtransport]}, TP serves no HTTPS: a browser-like client
    (ALPN http/1.1 only) gets TP's refusal, as before WebTransport.
    """

    webtransport = None

    @defer.inlineCallbacks
    def test_http11Refused(self) -> Any:
        """
        ALPN http/1.1 alone: no protocol negotiated, and a failed
        ServerHello C{bad_request} naming tp/1, then the close.
        """
        negotiated, data = yield self.raw(("http/1.1",), b"POST /tp/token HTTP/1.1\r\nHost: localhost\r\nOrigin: https://localhost\r\nContent-Length: 0\r\n\r\n")
        self.assertIsNone(negotiated)
        hello, rest = serverHello(data)
        self.assertEqual((hello.ok, hello.code), (False, "bad_request"), hello)
        self.assertIn("tp/1", hello.message)
        self.assertEqual(rest, b"")

    @defer.inlineCallbacks
    def test_tpClient(self) -> Any:
        echoPort, _ = listenLocal(self, Echo)
        negotiated, data = yield self.raw(("tp/1", "http/1.1"), ClientHello.connect("127.0.0.1", echoPort).toFrame() + b"x", enough=1)
        self.assertEqual(negotiated, "tp/1")
        hello, rest = serverHello(data)
        self.assertTrue(hello.ok, hello)
