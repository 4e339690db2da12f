"""
TP sharing its TLS port with a web site (C{[router]}), end to end on
loopback: the real TP service (L{tpproxy.service.makeService} in this
process, and once the real C{twist tp --config FILE} process), a real HTTPS
site (Twisted web, HTTP/1.1 and HTTP/2, its own certificate from a CA of
its own), curl, the C{tp} CLI and TP tunnels, all on one port.
"""

from __future__ import annotations

import json
import os
import random
import socket
import ssl as stdlib_ssl
import struct
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from tpproxy.clienthello import ALERT_UNEXPECTED_MESSAGE
from tpproxy.pki import CertificateAuthority, loadCertificates, loadKey
from tpproxy.protocols.client import ServerAddress, openTunnel
from tpproxy.protocols.relay import RelayEnd, splice
from tpproxy.proxyproto import PROXY, ProxyProtocolError, parseProxyV2
from tpproxy.router import RouterProtocol, alertRecord
from tpproxy.service import makeService
from tpproxy.test.support import (
    Background,
    Echo,
    auditObserver,
    audits,
    freePort,
    listenLocal,
    requireTool,
    run,
    sha256,
    tpCommand,
    twistCommand,
    waitForAudits,
    waitForPort,
)
from tpproxy.test.test_integration import writeClientConfig
from tpproxy.test.test_router import routerLog, serverOptions, waitForNoConnections
from tpproxy.testing import TestPKI
from tpproxy.transports.tls import clientTLS
from tpproxy.wire import ClientHello

#: The fixed part of every page: 32 KiB that must arrive intact.
BLOB = random.Random(6).randbytes(32 * 1024)


def page(label: bytes, path: bytes) -> bytes:
    return label + b" " + path + b"\n" + BLOB


class PageResource(Resource):
    """
    Answers L{page}C{(label, path)} and remembers the paths asked for.
    """

    isLeaf = True

    def __init__(self, label: bytes) -> None:
        super().__init__()
        self.label = label
        self.paths: list[bytes] = []

    def render_GET(self, request: Any) -> bytes:
        self.paths.append(request.path)
        request.setHeader(b"content-type", b"application/octet-stream")
        return page(self.label, request.path)


# --- the PROXY v2 backend -----------------------------------------------------


class _ToTarget(RelayEnd):
    early = b""

    def preSpliceData(self, data: bytes) -> None:
        self.early += data


@implementer(IHalfCloseableProtocol)
class ProxyV2Relay(RelayEnd):
    """
    A backend for the router with C{proxy_protocol = true}: reads the PROXY
    v2 header, records it in C{factory.infos}, then relays the rest (the
    client's untouched TLS stream, or the plaintext after TP's TLS
    termination) to 127.0.0.1:C{factory.targetPort}.
    """

    info: Any = None

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.buffer = b""

    def preSpliceData(self, data: bytes) -> None:
        self.buffer += data
        if self.info is not None:
            return  # connecting to the site
        try:
            info, rest = parseProxyV2(self.buffer)
        except ProxyProtocolError as e:
            self.factory.errors.append(str(e))
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if info is None:
            return
        self.info, self.buffer = info, rest
        self.factory.infos.append(info)
        self.transport.pauseProducing()  # type: ignore[union-attr]
        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.factory.targetPort), _ToTarget())
        d.addCallbacks(self._connected, lambda f: self.transport.loseConnection())  # type: ignore[union-attr]

    def _connected(self, target: _ToTarget) -> None:
        if self.closed:
            target.transport.loseConnection()  # type: ignore[union-attr]
            return
        pending, self.buffer = self.buffer, b""
        splice(self, target, fromA=pending, fromB=target.early)
        if not self.closed and not self.readClosed:
            self.transport.resumeProducing()  # type: ignore[union-attr]


class ProxyV2RelayFactory(Factory):
    noisy = False

    def __init__(self, targetPort: int) -> None:
        self.targetPort = targetPort
        self.infos: list[Any] = []
        self.errors: list[str] = []

    def buildProtocol(self, addr: Any) -> ProxyV2Relay:
        return ProxyV2Relay(self)


# --- an in-process TP tunnel --------------------------------------------------


class _EOFTransport(StringTransport):
    """
    The local side of a test tunnel: collects what comes out of it; the
    tunnel's EOF (or close) fires C{done} with the bytes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def loseWriteConnection(self) -> None:
        if not self.done.called:
            self.done.callback(self.value())

    def unregisterProducer(self) -> None:
        # The relay unregisters at EOF and again at the close.
        self.producer = None
        self.streaming = None

    def loseConnection(self) -> None:
        super().loseConnection()
        self.loseWriteConnection()


class Collector(RelayEnd):
    def __init__(self) -> None:
        self.transport = _EOFTransport()


# --- a TLS client whose ClientHello is sent one byte at a time ---------------


class SlowHelloClient:
    """
    A blocking TLS client over a socket (stdlib C{ssl.SSLObject} with memory
    BIOs), for a thread: its ClientHello goes out one byte per TCP segment,
    C{delay} seconds apart; the rest of the handshake and the data go as
    usual.
    """

    def __init__(self, port: int, context: stdlib_ssl.SSLContext, serverName: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.localPort = self.sock.getsockname()[1]
        self.incoming = stdlib_ssl.MemoryBIO()
        self.outgoing = stdlib_ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=serverName)
        self.eof = False
        self.buffer = b""

    def handshake(self, delay: float) -> int:
        """
        Handshake, the ClientHello byte by byte; returns its size.
        """
        try:
            self.tls.do_handshake()
        except stdlib_ssl.SSLWantReadError:
            pass
        hello = self.outgoing.read()
        for i in range(len(hello)):
            self.sock.sendall(hello[i : i + 1])
            time.sleep(delay)
        while True:
            try:
                self.tls.do_handshake()
                break
            except stdlib_ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()
        return len(hello)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
            if self.eof:
                raise ConnectionError("EOF during the TLS handshake")
            self.eof = True

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def recv(self) -> bytes:
        """
        The next decrypted bytes; C{b""} at the end.
        """
        while True:
            try:
                return self.tls.read(65536)
            except stdlib_ssl.SSLWantReadError:
                if self.eof:
                    return b""
                self._flush()
                self._fill()
            except (stdlib_ssl.SSLZeroReturnError, stdlib_ssl.SSLEOFError):
                return b""

    def recvExactly(self, n: int) -> bytes:
        out, self.buffer = self.buffer, b""
        while len(out) < n:
            chunk = self.recv()
            if not chunk:
                raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
            out += chunk
        out, self.buffer = out[:n], out[n:]
        return out

    def recvAll(self) -> bytes:
        chunks = [self.buffer]
        self.buffer = b""
        while True:
            chunk = self.recv()
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def close(self) -> None:
        self.sock.close()


def rawExchange(port: int, payload: bytes, wait: float = 10) -> tuple[bytes, float]:
    """
    Send C{payload} on a plain TCP connection and read until the server
    closes; returns what came back and the seconds until the close.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        start = time.monotonic()
        if payload:
            sock.sendall(payload)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks), time.monotonic() - start


def realClientHello(serverName: str) -> bytes:
    """
    The ClientHello stdlib ssl sends for C{serverName}.
    """
    context = stdlib_ssl.create_default_context()
    tls = context.wrap_bio(stdlib_ssl.MemoryBIO(), out := stdlib_ssl.MemoryBIO(), server_hostname=serverName)
    try:
        tls.do_handshake()
    except stdlib_ssl.SSLWantReadError:
        pass
    return out.read()


# --- the tests -----------------------------------------------------------------


class SharedPortTests(TestCase):
    """
    One TP port shared with a web site: TP's own clients get TP, the rest
    reach the site untouched (or, for a terminated name, TP ends TLS and
    passes plain HTTP on).
    """

    timeout = 60

    def setUp(self) -> None:
        self.curl = requireTool("curl")
        self.addCleanup(waitForNoConnections)
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        d = self.pki.directory
        # The web site's own CA, nothing to do with TP's.
        webCA = CertificateAuthority.create("shared-port web CA")
        self.webCA = d / "web-ca.pem"
        self.webCA.write_bytes(webCA.certPEM)
        self.siteCert = webCA.issue("site.test", dns=("site.test",), server=True)
        # The certificate TP ends TLS with for web.test, from a third CA.
        termCA = CertificateAuthority.create("shared-port terminate CA")
        self.termCA = d / "term-ca.pem"
        self.termCA.write_bytes(termCA.certPEM)
        termCA.issue("web.test", dns=("web.test",), server=True).write(d / "web.pem", d / "web.key")

        self.site = PageResource(b"site")
        site = Site(self.site)
        site.noisy = False
        self.sitePort = self.listen(TLSMemoryBIOFactory(serverOptions(self.siteCert, [b"h2", b"http/1.1"]), False, site))
        self.plain = PageResource(b"plain")
        plain = Site(self.plain)
        plain.noisy = False
        self.plainPort = self.listen(plain)
        self.echoPort, self.echo = listenLocal(self, Echo)
        self.observer = auditObserver(self)

    def listen(self, factory: Any) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def routerTable(
        self,
        backendPort: int | None = None,
        proxyProtocol: bool = False,
        helloTimeout: float = 10,
        plainPort: int | None = None,
        terminateProxyProtocol: bool = False,
    ) -> dict[str, Any]:
        d = self.pki.directory
        return {
            "backend": f"tcp:127.0.0.1:{backendPort or self.sitePort}",
            "proxy_protocol": proxyProtocol,
            "hello_timeout": helloTimeout,
            "terminate": {
                "names": ["web.test"],
                "certificate": str(d / "web.pem"),
                "key": str(d / "web.key"),
                "backend": f"tcp:127.0.0.1:{plainPort or self.plainPort}",
                "proxy_protocol": terminateProxyProtocol,
            },
        }

    def startTP(self, **router: Any) -> int:
        """
        TP's whole service, as C{twist tp} composes it, on a free port
        shared with the site.
        """
        self.port = freePort()
        config = self.pki.serverConfig(listen=f"tcp:{self.port}:interface=127.0.0.1", quic=False, router=self.routerTable(**router))
        self.assertIsNotNone(config.router)
        service = makeService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.clientConfig = writeClientConfig(self.pki, self.port)
        return self.port

    # --- clients ---------------------------------------------------------------

    @defer.inlineCallbacks
    def curlGet(self, path: str, http: str, name: str = "site.test", ca: Path | None = None, port: int | None = None) -> Any:
        """
        curl C{https://name:PORT/path} through TP's port, verifying the
        server against C{ca} (the web CA by default); returns (body, HTTP
        version, curl's local port).
        """
        port = port or self.port
        result = yield run(
            [
                self.curl, "-sS", "--fail", "--max-time", "20", f"--{http}", "--cacert", str(ca or self.webCA),
                "--resolve", f"{name}:{port}:127.0.0.1", "-w", "\n%{http_version} %{local_port}", f"https://{name}:{port}{path}",
            ]
        )
        self.assertEqual(result.status, 0, result)
        body, _, trailer = result.out.rpartition(b"\n")
        version, localPort = trailer.decode().split()
        return body, version, int(localPort)

    @defer.inlineCallbacks
    def assertSite(self, path: str, http: str, expected: str, name: str = "site.test", ca: Path | None = None) -> Any:
        """
        curl gets the page of C{path} intact, with HTTP version
        C{expected}: from the site, or for web.test from the plain backend
        behind TP's TLS termination.  Returns curl's local port.
        """
        body, version, localPort = yield self.curlGet(path, http, name, ca)
        wanted = page(b"plain" if name == "web.test" else b"site", path.encode())
        self.assertEqual((len(body), sha256(body)), (len(wanted), sha256(wanted)))
        self.assertEqual(version, expected)
        return localPort

    @defer.inlineCallbacks
    def tpConnect(self, data: bytes, port: int | None = None, clientConfig: str | None = None) -> Any:
        """
        The C{tp connect} CLI through TP's port to the echo server.
        """
        port = port or self.port
        result = yield run(tpCommand() + ["--config", clientConfig or self.clientConfig, "connect", f"127.0.0.1:{self.echoPort}"], stdin=data)
        self.assertEqual(result.status, 0, result)
        self.assertEqual((len(result.out), sha256(result.out)), (len(data), sha256(data)))
        self.assertIn(f"Connecting to 127.0.0.1:{self.echoPort} via localhost:{port} (v1, tls)".encode(), result.err)

    def clientOptions(self) -> Any:
        d = self.pki.directory
        return clientTLS("localhost", [self.pki.ca.cert], loadCertificates(str(d / "alice.pem")), loadKey(str(d / "alice.key")))

    @defer.inlineCallbacks
    def tunnel(self, data: bytes) -> Any:
        """
        An in-process TP tunnel (ALPN tp/1, client certificate) through the
        shared port to the echo server: C{data} up, then EOF; returns what
        came back before the EOF.
        """
        hello = ClientHello.connect("127.0.0.1", self.echoPort)
        end = yield openTunnel(reactor, ServerAddress("127.0.0.1", self.port), self.clientOptions(), hello)
        self.assertEqual(end.transport.negotiatedProtocol, b"tp/1")
        local = Collector()
        splice(end, local, fromA=end.rest)
        end.transport.resumeProducing()
        end.transport.write(data)
        end.transport.loseWriteConnection()
        try:
            got = yield local.transport.done.addTimeout(20, reactor)
        finally:
            end.transport.loseConnection()
        return got

    @defer.inlineCallbacks
    def assertTunnel(self, size: int) -> Any:
        data = os.urandom(size)
        got = yield self.tunnel(data)
        self.assertEqual((len(got), sha256(got)), (size, sha256(data)))

    # --- a. passthrough ----------------------------------------------------------

    @defer.inlineCallbacks
    def test_curlPassthrough(self) -> Any:
        """
        curl gets the site through TP's port with HTTP/1.1 and HTTP/2,
        verifying the site's own certificate against the site's CA: the TLS
        stream went through untouched.
        """
        self.startTP()
        yield self.assertSite("/one", "http1.1", "1.1")
        yield self.assertSite("/two", "http2", "2")
        self.assertEqual(self.site.paths, [b"/one", b"/two"])
        # TP's own CA does not vouch for what answers site.test.
        result = yield run(
            [self.curl, "-sS", "--cacert", self.pki.caPath, "--resolve", f"site.test:{self.port}:127.0.0.1", f"https://site.test:{self.port}/x"]
        )
        self.assertEqual(result.status, 60, result)  # CURLE_PEER_FAILED_VERIFICATION
        self.assertEqual(self.site.paths, [b"/one", b"/two"])

    # --- b. the tp CLI --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_tpConnect(self) -> Any:
        """
        C{tp connect} through the same port reaches the echo server, and
        the bytes come back intact after the half-close.
        """
        self.startTP()
        yield self.tpConnect(os.urandom(1024 * 1024 + 3))
        [event] = yield waitForAudits(self.observer, 1)
        self.assertEqual((event["result"], event["identity"]), ("ok", "alice"))
        self.assertEqual(event["destination"], f"127.0.0.1:{self.echoPort}")
        self.assertEqual(self.echo.accepted, 1)
        self.assertEqual(self.site.paths, [])

    # --- c. both at once --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_concurrent(self) -> Any:
        """
        50 curl requests (half HTTP/1.1, half HTTP/2) and 50 TP tunnels
        through the same port at the same time: every page and every echo
        arrives intact.
        """
        self.startTP()
        requests = [self.assertSite(f"/c{i}", "http1.1" if i % 2 else "http2", "1.1" if i % 2 else "2") for i in range(50)]
        tunnels = [self.assertTunnel(100 * 1024 + i) for i in range(50)]
        yield defer.gatherResults(requests + tunnels, consumeErrors=True)
        self.assertEqual(sorted(self.site.paths), sorted(f"/c{i}".encode() for i in range(50)))
        self.assertEqual(self.echo.accepted, 50)
        events = yield waitForAudits(self.observer, 50)
        self.assertEqual([e["result"] for e in events], ["ok"] * 50)

    # --- d. a ClientHello one byte at a time -------------------------------------------

    @defer.inlineCallbacks
    def test_oneByteAtATime(self) -> Any:
        """
        A real ClientHello sent one byte per TCP segment, 1 ms apart, is
        routed like any other: with SNI site.test to the site (its
        certificate verified, a page fetched over HTTP/1.1), with ALPN tp/1
        to TP (client certificate, a tunnel to the echo server).  The router
        saw each hello in many reads.
        """
        self.startTP()
        reads: dict[int, int] = {}
        original = RouterProtocol.dataReceived

        def counting(proto: RouterProtocol, data: bytes) -> None:
            if proto.inner is None:
                reads[proto.peer.port] = reads.get(proto.peer.port, 0) + 1  # type: ignore[attr-defined]
            original(proto, data)

        self.patch(RouterProtocol, "dataReceived", counting)

        siteContext = stdlib_ssl.create_default_context(cafile=str(self.webCA))
        siteContext.set_alpn_protocols(["http/1.1"])
        tpContext = stdlib_ssl.create_default_context(cafile=self.pki.caPath)
        tpContext.load_cert_chain(str(self.pki.directory / "alice.pem"), str(self.pki.directory / "alice.key"))
        tpContext.set_alpn_protocols(["tp/1"])
        data = os.urandom(50000)

        def toSite() -> tuple[int, int, str | None, bytes]:
            client = SlowHelloClient(self.port, siteContext, "site.test")
            try:
                size = client.handshake(0.001)
                client.send(b"GET /slow HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
                return client.localPort, size, client.tls.selected_alpn_protocol(), client.recvAll()
            finally:
                client.close()

        def toTP() -> tuple[int, int, str | None, bytes]:
            client = SlowHelloClient(self.port, tpContext, "localhost")
            try:
                size = client.handshake(0.001)
                client.send(ClientHello.connect("127.0.0.1", self.echoPort).toFrame())
                (length,) = struct.unpack("!I", client.recvExactly(4))
                answer = json.loads(client.recvExactly(length))
                if not answer.get("ok"):
                    raise AssertionError(f"TP refused: {answer}")
                client.send(data)
                return client.localPort, size, client.tls.selected_alpn_protocol(), client.recvExactly(len(data))
            finally:
                client.close()

        (sitePort, siteHello, siteALPN, response), (tpPort, tpHello, tpALPN, echoed) = yield defer.gatherResults(
            [threads.deferToThread(toSite), threads.deferToThread(toTP)], consumeErrors=True
        )
        head, _, body = response.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertEqual(sha256(body), sha256(page(b"site", b"/slow")))
        self.assertEqual(siteALPN, "http/1.1")
        self.assertEqual(tpALPN, "tp/1")
        self.assertEqual(sha256(echoed), sha256(data))
        self.assertEqual(self.site.paths, [b"/slow"])
        self.assertEqual(self.echo.accepted, 1)
        # One read per byte, give or take what the loopback coalesced.
        self.assertGreater(siteHello, 200)
        self.assertGreater(tpHello, 200)
        self.assertGreater(reads[sitePort], siteHello // 4, reads)
        self.assertGreater(reads[tpPort], tpHello // 4, reads)

    # --- e. PROXY protocol v2 ---------------------------------------------------------

    @defer.inlineCallbacks
    def test_proxyProtocol(self) -> Any:
        """
        With C{proxy_protocol = true}, the backend gets a PROXY v2 header
        with the client's own address and port, then the untouched TLS
        stream (curl still verifies the site); TP's clients get no header.
        """
        relay = ProxyV2RelayFactory(self.sitePort)
        self.startTP(backendPort=self.listen(relay), proxyProtocol=True)
        port1 = yield self.assertSite("/p1", "http1.1", "1.1")
        port2 = yield self.assertSite("/p2", "http2", "2")
        yield self.assertTunnel(10000)
        self.assertEqual(relay.errors, [])
        self.assertEqual([i.command for i in relay.infos], [PROXY, PROXY])
        self.assertEqual([i.source for i in relay.infos], [IPv4Address("TCP", "127.0.0.1", p) for p in (port1, port2)])
        self.assertEqual([i.destination for i in relay.infos], [IPv4Address("TCP", "127.0.0.1", self.port)] * 2)
        self.assertEqual(self.site.paths, [b"/p1", b"/p2"])

    # --- f. TLS terminated by TP ----------------------------------------------------------

    @defer.inlineCallbacks
    def test_terminate(self) -> Any:
        """
        For a name of C{[router.terminate]}, TP ends TLS with that name's
        certificate (curl verifies it against its own CA) and the plain
        HTTP/1.1 reaches the plain backend; TP offers only http/1.1, so a
        curl asking for HTTP/2 gets 1.1.  Other names still pass through.
        """
        self.startTP()
        yield self.assertSite("/t1", "http1.1", "1.1", name="web.test", ca=self.termCA)
        yield self.assertSite("/t2", "http2", "1.1", name="web.test", ca=self.termCA)
        self.assertEqual(self.plain.paths, [b"/t1", b"/t2"])
        yield self.assertSite("/t3", "http2", "2")
        self.assertEqual(self.site.paths, [b"/t3"])

    @defer.inlineCallbacks
    def test_terminateProxyProtocol(self) -> Any:
        """
        C{[router.terminate] proxy_protocol = true}: the plain backend gets
        a PROXY v2 header with the client's address, then the plaintext.
        """
        relay = ProxyV2RelayFactory(self.plainPort)
        self.startTP(plainPort=self.listen(relay), terminateProxyProtocol=True)
        localPort = yield self.assertSite("/tp", "http1.1", "1.1", name="web.test", ca=self.termCA)
        self.assertEqual(relay.errors, [])
        [info] = relay.infos
        self.assertEqual((info.command, info.source), (PROXY, IPv4Address("TCP", "127.0.0.1", localPort)))
        self.assertEqual(info.destination, IPv4Address("TCP", "127.0.0.1", self.port))
        self.assertEqual(self.plain.paths, [b"/tp"])

    # --- g. bad clients ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_badClients(self) -> Any:
        """
        Garbage, a plain HTTP request, a handshake that is not a
        ClientHello, a ClientHello never finished and a silent client are
        closed (the first three at once, the last two after the router's
        C{hello_timeout}, here 2 s), each with the reason logged; TP serves
        TP clients and web clients meanwhile and afterwards.
        """
        self.startTP(helloTimeout=2)
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        hello = realClientHello("site.test")
        cases = {
            "garbage": b"\x00\x01\x02garbage\xff" * 10,
            "http": b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n",
            "not a ClientHello": b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
            "unfinished": hello[: len(hello) // 2],
            "silent": b"",
        }
        pending = {name: threads.deferToThread(rawExchange, self.port, payload) for name, payload in cases.items()}
        # Served while the unfinished ones wait for their timeout.
        yield defer.gatherResults([self.assertSite("/during", "http2", "2"), self.assertTunnel(20000)], consumeErrors=True)
        self.assertFalse(pending["unfinished"].called)
        self.assertFalse(pending["silent"].called)
        results = {}
        for name, d in pending.items():
            results[name] = yield d
        self.assertEqual(results["garbage"][0], b"")
        self.assertEqual(results["http"][0], b"")
        self.assertEqual(results["not a ClientHello"][0], alertRecord(ALERT_UNEXPECTED_MESSAGE))
        for name in ("garbage", "http", "not a ClientHello"):
            self.assertLess(results[name][1], 1.5, name)
        for name in ("unfinished", "silent"):
            self.assertEqual(results[name][0], b"", name)
            self.assertTrue(1.9 <= results[name][1] < 6, (name, results[name][1]))
        messages = "\n".join(routerLog(observer))
        self.assertIn("not a TLS handshake", messages)
        self.assertIn("not a ClientHello", messages)
        self.assertIn(f"no complete ClientHello within 2 s ({len(hello) // 2} bytes)", messages)
        self.assertIn("no complete ClientHello within 2 s (0 bytes)", messages)
        # Still serving both kinds.
        yield self.assertSite("/after", "http1.1", "1.1")
        yield self.tpConnect(b"after")
        self.assertEqual(self.site.paths, [b"/during", b"/after"])
        self.assertEqual({e["result"] for e in audits(self.observer)}, {"ok"})

    # --- the real twist tp process ---------------------------------------------------

    @defer.inlineCallbacks
    def test_twistProcess(self) -> Any:
        """
        C{twist tp --config FILE} with a C{[router]} table in the file:
        curl gets the site (HTTP/1.1 and 2) and the terminated name, and
        C{tp connect} gets TP, all on the one port.
        """
        d = self.pki.directory
        self.port = freePort()
        table = self.routerTable(helloTimeout=2)
        terminate = table["terminate"]
        config = d / "shared.toml"
        config.write_text(
            f"""[server]
listen = "tcp:{self.port}:interface=127.0.0.1"
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"
quic = false

[[rules]]
identities = "*"
hosts = ["127.0.0.0/8", "::1/128"]
ports = "*"

[router]
backend = "{table["backend"]}"
proxy_protocol = false
hello_timeout = {table["hello_timeout"]}

[router.terminate]
names = ["web.test"]
certificate = "{terminate["certificate"]}"
key = "{terminate["key"]}"
backend = "{terminate["backend"]}"
"""
        )
        server = Background(self, twistCommand() + ["--log-format=text", "tp", "--config", str(config)])
        yield waitForPort(self.port)
        self.clientConfig = writeClientConfig(self.pki, self.port)
        yield self.assertSite("/h1", "http1.1", "1.1")
        yield self.assertSite("/h2", "http2", "2")
        yield self.assertSite("/term", "http1.1", "1.1", name="web.test", ca=self.termCA)
        yield self.tpConnect(os.urandom(100000))
        self.assertEqual(self.site.paths, [b"/h1", b"/h2"])
        self.assertEqual(self.plain.paths, [b"/term"])
        self.assertEqual(self.echo.accepted, 1)
        self.assertFalse(server.proto.done.called)
        output = b"".join(server.proto.out) + server.stderr
        self.assertIn(f"Sharing tcp:{self.port}:interface=127.0.0.1 with a web site".encode(), output)
        self.assertNotIn(b"Traceback", output)
