"""
End-to-end tests on loopback: a TP server in this process, the real C{tp}
client, real OpenSSH, real certificates made at test time.
"""

from __future__ import annotations

import os
import re
import socket
import ssl as stdlib_ssl
import struct
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from tpproxy.pki import CertificateAuthority
from tpproxy.test.support import (
    SSHD,
    Background,
    Echo,
    HashSink,
    auditObserver,
    audits,
    cleanEnv,
    echoRoundTrips,
    listenLocal,
    run,
    sha256,
    startServer,
    tpCommand,
    waitForAudits,
)
from tpproxy.testing import TestPKI

TEN_MB = 10 * 1024 * 1024


def writeClientConfig(pki: TestPKI, port: int, cert: str | None = None, key: str | None = None, name: str = "client.toml") -> str:
    cert = cert or str(pki.directory / "alice.pem")
    key = key or str(pki.directory / "alice.key")
    path = pki.directory / name
    path.write_text(f'server = "localhost:{port}"\ncert = "{cert}"\nkey = "{key}"\nca = "{pki.caPath}"\n')
    return str(path)


class TPTestCase(TestCase):
    """
    A PKI with client C{alice}, and a TP server allowing loopback.
    """

    timeout = 180

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        self.observer = auditObserver(self)

    def startTP(self, rules: list[dict[str, Any]] | None = None, **server: Any) -> int:
        self.config = self.pki.serverConfig(rules, **server)
        self.port = startServer(self, self.config)
        self.clientConfig = writeClientConfig(self.pki, self.port)
        return self.port


class ConnectTests(TPTestCase):
    """
    C{tp connect}, the stdio mode used as ssh's ProxyCommand.
    """

    @defer.inlineCallbacks
    def test_uploadWithEOFGetsReply(self) -> Any:
        """
        Bytes from stdin reach the destination, the EOF after them is carried
        through TLS as a half-close, and the destination's answer after that
        EOF comes back on stdout; the status line is on stderr.
        """
        sinkPort, sink = listenLocal(self, HashSink)
        self.startTP()
        data = os.urandom(3 * 1024 * 1024 + 17)
        result = yield run(tpCommand() + ["--config", self.clientConfig, "connect", f"127.0.0.1:{sinkPort}"], stdin=data)
        self.assertEqual(result.status, 0, result)
        self.assertEqual(result.out.decode(), f"{len(data)} {sha256(data)}\n")
        self.assertEqual(
            result.err.decode().strip(), f"Connecting to 127.0.0.1:{sinkPort} via localhost:{self.port} (v1, tls)"
        )
        self.assertEqual(sink.accepted, 1)
        [event] = yield waitForAudits(self.observer, 1)
        self.assertEqual(event["result"], "ok")
        self.assertEqual(event["identity"], "alice")
        self.assertEqual(event["destination"], f"127.0.0.1:{sinkPort}")
        self.assertEqual(event["address"], "127.0.0.1")
        self.assertEqual(event["bytes_up"], len(data))
        self.assertEqual(event["bytes_down"], len(result.out))

    @defer.inlineCallbacks
    def test_optionsAfterSubcommand(self) -> Any:
        """
        Connection options work after the subcommand as well as before it,
        and override the config file.
        """
        sinkPort, sink = listenLocal(self, HashSink)
        self.startTP()
        bob = self.pki.client("bob")
        broken = writeClientConfig(self.pki, 1, cert="/nonexistent.pem", key="/nonexistent.key", name="broken.toml")
        result = yield run(
            tpCommand()
            + ["--config", broken, "connect", f"127.0.0.1:{sinkPort}", "--server", f"localhost:{self.port}", "--cert", bob[0], "--key", bob[1]],
            stdin=b"x",
        )
        self.assertEqual(result.status, 0, result)
        self.assertEqual(result.out, f"1 {sha256(b'x')}\n".encode())
        [event] = yield waitForAudits(self.observer, 1)
        self.assertEqual(event["identity"], "bob")

    @defer.inlineCallbacks
    def test_forbiddenDialsNothing(self) -> Any:
        """
        A destination no rule allows gets C{forbidden} on stderr, exit status
        3, and TP never connects to it.
        """
        sinkPort, sink = listenLocal(self, HashSink)
        otherPort = sinkPort + 1 if sinkPort < 65535 else sinkPort - 1
        self.startTP([{"identities": "alice", "hosts": "127.0.0.1/32", "ports": otherPort}])
        result = yield run(tpCommand() + ["--config", self.clientConfig, "connect", f"127.0.0.1:{sinkPort}"], stdin=b"secret")
        self.assertEqual(result.status, 3, result)
        self.assertIn(b"refused by TP: forbidden:", result.err)
        self.assertEqual(result.out, b"")
        self.assertEqual(sink.accepted, 0)
        [event] = yield waitForAudits(self.observer, 1)
        self.assertEqual(event["result"], "forbidden")

    @defer.inlineCallbacks
    def test_nameRuleDoesNotGrantLoopback(self) -> Any:
        """
        A name rule matching C{localhost} does not let it reach the loopback
        address it resolves to: the resolved address is what is checked.
        """
        sinkPort, sink = listenLocal(self, HashSink)
        self.startTP([{"identities": "*", "hosts": "localhost", "ports": "*"}])
        result = yield run(tpCommand() + ["--config", self.clientConfig, "connect", f"localhost:{sinkPort}"], stdin=b"")
        self.assertEqual(result.status, 3, result)
        self.assertIn(b"forbidden", result.err)
        self.assertIn(b"loopback", result.err)
        self.assertEqual(sink.accepted, 0)

    @defer.inlineCallbacks
    def test_connectRefused(self) -> Any:
        """
        A closed destination port gives C{connect_refused}.
        """
        self.startTP()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        result = yield run(tpCommand() + ["--config", self.clientConfig, "connect", f"127.0.0.1:{closed}"], stdin=b"")
        self.assertEqual(result.status, 3, result)
        self.assertIn(b"connect_refused", result.err)

    @defer.inlineCallbacks
    def test_ipv6Destination(self) -> Any:
        """
        An IPv6 destination is dialled over IPv6.
        """
        sinkPort, sink = listenLocal(self, HashSink, interface="::1")
        self.startTP()
        result = yield run(tpCommand() + ["--config", self.clientConfig, "connect", f"[::1]:{sinkPort}"], stdin=b"six")
        self.assertEqual(result.status, 0, result)
        self.assertEqual(result.out, f"3 {sha256(b'six')}\n".encode())
        [event] = yield waitForAudits(self.observer, 1)
        self.assertEqual(event["address"], "::1")

    @defer.inlineCallbacks
    def test_missingSettings(self) -> Any:
        """
        Without a server or certificate, tp says what is missing and exits 2.
        """
        env = cleanEnv(HOME=self.mktemp(), XDG_CONFIG_HOME=self.mktemp())
        result = yield run(tpCommand() + ["connect", "example.org:22"], env=env)
        self.assertEqual(result.status, 2, result)
        self.assertIn(b"missing --server, --cert, --key, --ca", result.err)


class QuicFailureTests(TPTestCase):
    """
    How the client takes QUIC failures (docs/quic.md, "Client").
    """

    @defer.inlineCallbacks
    def test_noQuicListenerNoticedAtOnce(self) -> Any:
        """
        C{--transport quic} to a port with no QUIC listener fails at once
        (ICMP port unreachable on the connected UDP socket), not after the
        connect timeout.
        """
        self.startTP(quic=False)
        started = time.monotonic()
        result = yield run(tpCommand() + ["--config", self.clientConfig, "--transport", "quic", "--connect-timeout", "60", "connect", "127.0.0.1:9"])
        self.assertEqual(result.status, 1, result)
        self.assertIn(b"UDP port unreachable", result.err)
        self.assertLess(time.monotonic() - started, 30)

    @defer.inlineCallbacks
    def test_serverCertificateFailureDoesNotPinTLS(self) -> Any:
        """
        When TP's certificate does not verify (the client trusts another
        CA), C{auto} fails on both transports, says so, and does not
        remember TLS for this server: QUIC itself got through.
        """
        from tpproxy.service import makeQuicListener, makeServerFactory

        self.config = self.pki.serverConfig()
        factory = makeServerFactory(self.config, reactor)
        tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(tcp.stopListening)
        self.port = tcp.getHost().port
        udp = reactor.listenUDP(self.port, makeQuicListener(self.config, reactor, factory.wrappedFactory), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(udp.stopListening)
        self.clientConfig = writeClientConfig(self.pki, self.port)
        other = TestPKI.create(self.mktemp())
        env = cleanEnv(XDG_CACHE_HOME=os.path.abspath(self.mktemp()))
        result = yield run(tpCommand() + ["--config", self.clientConfig, "--ca", other.caPath, "connect", "127.0.0.1:9"], env=env)
        self.assertEqual(result.status, 1, result)
        self.assertIn(b"handshake with TP failed", result.err)
        self.assertNotIn(b"client certificate", result.err)
        memory = Path(env["XDG_CACHE_HOME"]) / "tp" / "transport.json"
        self.assertNotIn(f"localhost:{self.port}", memory.read_text() if memory.exists() else "")


class CertificateTests(TPTestCase):
    """
    Client certificates are checked during the TLS handshake.
    """

    @defer.inlineCallbacks
    def refusedWith(self, cert: tuple[str, str], reason: str) -> Any:
        sinkPort, sink = listenLocal(self, HashSink)
        self.startTP(deny={"identities": ["mallory"], "serials": []})
        result = yield run(
            tpCommand() + ["--config", self.clientConfig, "--cert", cert[0], "--key", cert[1], "connect", f"127.0.0.1:{sinkPort}"],
            stdin=b"x",
        )
        self.assertEqual(result.status, 1, result)
        self.assertIn(b"TP refused the TLS connection", result.err)
        self.assertEqual(sink.accepted, 0)
        [event] = yield waitForAudits(self.observer, 1)
        self.assertEqual(event["result"], "handshake_failed")
        self.assertIsNone(event["identity"])
        self.assertIn(reason, event["detail"])

    def test_expired(self) -> Any:
        return self.refusedWith(self.pki.expiredClient("alice"), "expired")

    def test_otherCA(self) -> Any:
        other = TestPKI.create(self.mktemp())
        return self.refusedWith(other.client("alice"), "unknown issuer")

    def test_selfSigned(self) -> Any:
        ca = CertificateAuthority.create("alice")
        d = Path(self.mktemp())
        d.mkdir()
        (d / "c.pem").write_bytes(ca.certPEM)
        from tpproxy.pki import keyPEM, writePrivate

        writePrivate(d / "c.key", keyPEM(ca.key))
        return self.refusedWith((str(d / "c.pem"), str(d / "c.key")), "self-signed")

    def test_deniedIdentity(self) -> Any:
        return self.refusedWith(self.pki.client("mallory"), "deny list")

    def test_revokedByCRL(self) -> Any:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert = self.pki.client("carol")
        serial = x509.load_pem_x509_certificate(Path(cert[0]).read_bytes()).serial_number
        (self.pki.directory / "crl.pem").write_bytes(self.pki.ca.crl([serial]).public_bytes(serialization.Encoding.PEM))
        sinkPort, sink = listenLocal(self, HashSink)
        self.startTP(crl="crl.pem")
        d = run(tpCommand() + ["--config", self.clientConfig, "--cert", cert[0], "--key", cert[1], "connect", f"127.0.0.1:{sinkPort}"], stdin=b"")

        def check(result: Any) -> None:
            self.assertEqual(result.status, 1, result)
            [event] = audits(self.observer)
            self.assertIn("revoked", event["detail"])
            self.assertEqual(sink.accepted, 0)

        return d.addCallback(check)

    @defer.inlineCallbacks
    def test_noClientCertificate(self) -> Any:
        """
        A TLS client that presents no certificate is refused at the
        handshake and never gets to send a hello.
        """
        self.startTP()
        ctx = stdlib_ssl.create_default_context(cafile=self.pki.caPath)
        ctx.set_alpn_protocols(["tp/1"])

        def attempt() -> bytes:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(struct.pack("!I", 2) + b"{}")
                    return tls.recv(100)

        from twisted.internet.threads import deferToThread

        error = yield self.assertFailure(deferToThread(attempt), stdlib_ssl.SSLError, ConnectionError)
        self.assertIn("CERTIFICATE_REQUIRED", str(error).upper())
        [event] = yield waitForAudits(self.observer, 1)
        self.assertEqual(event["result"], "handshake_failed")
        self.assertIn("did not return a certificate", event["detail"])


class BadHelloTests(TPTestCase):
    """
    Garbage, oversize and unfinished hellos are answered or timed out, and
    the server keeps serving others.
    """

    def rawClient(self) -> Any:
        ctx = stdlib_ssl.create_default_context(cafile=self.pki.caPath)
        ctx.load_cert_chain(str(self.pki.directory / "alice.pem"), str(self.pki.directory / "alice.key"))
        ctx.set_alpn_protocols(["tp/1"])
        return ctx

    def exchange(self, payload: bytes, wait: float = 10, alpn: list[str] | None = None) -> defer.Deferred[bytes]:
        ctx = self.rawClient()
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)

        def attempt() -> bytes:
            with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(payload)
                    chunks = []
                    while True:
                        try:
                            b = tls.recv(65536)
                        except (stdlib_ssl.SSLError, OSError):
                            break
                        if not b:
                            break
                        chunks.append(b)
                    return b"".join(chunks)

        from twisted.internet.threads import deferToThread

        return deferToThread(attempt)

    def decode(self, answer: bytes) -> dict[str, Any]:
        import json

        (length,) = struct.unpack("!I", answer[:4])
        self.assertEqual(len(answer), 4 + length, answer)
        return json.loads(answer[4:])

    @defer.inlineCallbacks
    def stillServes(self) -> Any:
        sinkPort, _ = listenLocal(self, HashSink)
        result = yield run(tpCommand() + ["--config", self.clientConfig, "connect", f"127.0.0.1:{sinkPort}"], stdin=b"ok")
        self.assertEqual(result.status, 0, result)
        self.assertEqual(result.out, f"2 {sha256(b'ok')}\n".encode())

    @defer.inlineCallbacks
    def test_garbage(self) -> Any:
        self.startTP()
        answer = yield self.exchange(b"\x00\x00\x00\x05hello")
        reply = self.decode(answer)
        self.assertEqual((reply["ok"], reply["error"]), (False, "bad_request"))
        self.assertIn("not valid JSON", reply["message"])
        yield self.stillServes()

    @defer.inlineCallbacks
    def test_oversize(self) -> Any:
        self.startTP()
        answer = yield self.exchange(struct.pack("!I", 10**8) + b"{")
        reply = self.decode(answer)
        self.assertEqual(reply["error"], "bad_request")
        self.assertIn("exceeds the limit", reply["message"])
        yield self.stillServes()

    @defer.inlineCallbacks
    def test_unsupportedVersion(self) -> Any:
        self.startTP()
        body = b'{"v":2,"op":"connect","host":"127.0.0.1","port":1}'
        reply = self.decode((yield self.exchange(struct.pack("!I", len(body)) + body)))
        self.assertEqual(reply["error"], "unsupported_version")

    @defer.inlineCallbacks
    def test_wrongALPN(self) -> Any:
        """
        A client that offers ALPN without C{tp/1} (a browser, say) is told
        this is a TP server and closed.
        """
        self.startTP()
        reply = self.decode((yield self.exchange(b"GET / HTTP/1.1\r\n\r\n", alpn=["h2", "http/1.1"])))
        self.assertEqual(reply["error"], "bad_request")
        self.assertIn("ALPN tp/1 expected, client offered h2, http/1.1", reply["message"])
        [event] = yield waitForAudits(self.observer, 1)
        self.assertEqual(event["identity"], "alice")

    @defer.inlineCallbacks
    def test_neverFinishedHello(self) -> Any:
        """
        A hello that never completes is answered with C{bad_request} once
        the hello timeout passes, while another client is served meanwhile.
        """
        self.startTP(hello_timeout=1.5)
        pending = self.exchange(b"\x00\x00\x00\x40{\"v\":1", wait=20)
        yield self.stillServes()
        reply = self.decode((yield pending))
        self.assertEqual(reply["error"], "bad_request")
        self.assertIn("no complete ClientHello within 1.5 s", reply["message"])

    @defer.inlineCallbacks
    def test_slowHandshake(self) -> Any:
        """
        A TCP client that never starts TLS is dropped after the handshake
        timeout.
        """
        self.startTP(handshake_timeout=1)
        closed: defer.Deferred[None] = defer.Deferred()

        class Idle(protocol.Protocol):
            def connectionLost(self, reason: Any) -> None:
                closed.callback(None)

        started = reactor.seconds()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), Idle())
        yield closed.addTimeout(15, reactor)
        self.assertLess(reactor.seconds() - started, 10)
        [event] = yield waitForAudits(self.observer, 1)
        self.assertIn("no TLS handshake within 1 s", event["detail"])


class UpTests(TPTestCase):
    """
    C{tp up}: a local port forwarded through TP.
    """

    @defer.inlineCallbacks
    def test_hundredConcurrent(self) -> Any:
        """
        100 concurrent connections through one C{tp up} each move 1 MB to an
        echo server and get the same 1 MB back.
        """
        echoPort, echo = listenLocal(self, Echo)
        self.startTP()
        up = Background(self, tpCommand() + ["--config", self.clientConfig, "up", f"127.0.0.1:{echoPort}", "0"])
        line = yield up.waitForStderr(b"; Ctrl-C stops")
        localPort = int(re.search(rb"Forwarding 127\.0\.0\.1:(\d+) to", line).group(1))  # type: ignore[union-attr]

        yield echoRoundTrips(localPort, 100, 1024 * 1024)
        self.assertEqual(echo.accepted, 100)
        events = audits(self.observer)
        self.assertEqual(len(events), 100)
        self.assertEqual({e["result"] for e in events}, {"ok"})
        self.assertEqual({e["bytes_up"] for e in events}, {1024 * 1024})


class SSHTests(TPTestCase):
    """
    Real OpenSSH through C{ProxyCommand="tp connect %h:%p"}.
    """

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        self.sshd = yield SSHD.start(self)
        self.sshPort = self.sshd.port
        self.startTP()

    def sshArgs(self, *command: str) -> list[str]:
        proxy = " ".join(tpCommand()) + f" --config {self.clientConfig} connect %h:%p"
        return self.sshd.args("127.0.0.1", self.sshPort, *command, proxy=proxy)

    @defer.inlineCallbacks
    def test_remoteCommand(self) -> Any:
        """
        ssh runs a remote command through TP; the tp status line reaches
        ssh's stderr.
        """
        result = yield run(self.sshArgs("echo", "hello-through-tp"), stdin=b"")
        self.assertEqual(result.status, 0, result)
        self.assertEqual(result.out, b"hello-through-tp\n")
        self.assertIn(f"Connecting to 127.0.0.1:{self.sshPort} via localhost:{self.port} (v1, tls)".encode(), result.err)

    @defer.inlineCallbacks
    def test_tenMegabytesEachWay(self) -> Any:
        """
        10 MB up and 10 MB down through ssh over TP arrive intact.
        """
        up = os.urandom(TEN_MB)
        result = yield run(self.sshArgs("sha256sum"), stdin=up)
        self.assertEqual(result.status, 0, result)
        self.assertEqual(result.out.split()[0].decode(), sha256(up))
        down = self.sshd.dir / "down.bin"
        payload = os.urandom(TEN_MB)
        down.write_bytes(payload)
        result = yield run(self.sshArgs("cat", str(down)), stdin=b"")
        self.assertEqual(result.status, 0, result.err)
        self.assertEqual((len(result.out), sha256(result.out)), (TEN_MB, sha256(payload)))
