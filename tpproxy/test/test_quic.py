"""
QUIC on loopback, end to end with real UDP sockets and TP's whole server:
a refused client, streams through TP, ssh over QUIC, many concurrent
streams, reverse tunnels, and fallback to TLS.  The logic of the QUIC
transport (verdicts, streams, flow control, migration, datagrams) is tested
in memory: test_quic_memory.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Callable

from aioquic.quic.configuration import QuicConfiguration
from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from tpproxy.pki import loadCertificates, loadKey
from tpproxy.protocols.client import TPClientProtocol, TunnelError
from tpproxy.service import makeQuicListener, makeServerFactory
from tpproxy.test.support import (
    SSHD,
    Background,
    Echo,
    HashSink,
    auditObserver,
    audits,
    echoRoundTrips,
    listenLocal,
    run,
    sha256,
    tpCommand,
    waitForAudits,
    waitUntilRefused,
)
from tpproxy.test.test_integration import TEN_MB, writeClientConfig
from tpproxy.testing import REVERSE_RULES, TestPKI, reverseTables
from tpproxy.transports.quic import clientConfiguration, connectQuic
from tpproxy.wire import ALPN, ClientHello


@defer.inlineCallbacks
def waitUntil(condition: Callable[[], object], what: str, timeout: float = 10) -> Any:
    """
    Wait until C{condition()} is true, checking every 20 ms.

    @raise AssertionError: naming C{what} if it is still false after
        C{timeout} seconds.
    """
    from tpproxy.test.support import deferLater

    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while not condition():
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"not within {timeout:g} s: {what}")
        yield deferLater(0.02)


class QuicTestCase(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        for name in ("alice", "bob"):
            self.pki.client(name)
        self.observer = auditObserver(self)

    def startTP(self, quic: bool = True, **server: Any) -> int:
        """
        TLS and QUIC on the same port number of 127.0.0.1.
        """
        self.config = self.pki.serverConfig(REVERSE_RULES, **reverseTables(self.pki), **server)
        factory = makeServerFactory(self.config, reactor)
        self.tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self.tcp.getHost().port
        self.addCleanup(self.tcp.stopListening)
        self.tpFactory = factory
        if quic:
            self.listener = makeQuicListener(self.config, reactor, factory.wrappedFactory)
            self.udp = reactor.listenUDP(self.port, self.listener, interface="127.0.0.1")
            self.addCleanup(self.udp.stopListening)
        for name in ("alice", "bob"):
            writeClientConfig(
                self.pki, self.port, cert=str(self.pki.directory / f"{name}.pem"), key=str(self.pki.directory / f"{name}.key"), name=f"{name}.toml"
            )
        return self.port

    def clientConfig(self, name: str = "alice") -> str:
        return str(self.pki.directory / f"{name}.toml")

    def quicConfig(self, name: str | None = "alice", caDir: Any = None) -> QuicConfiguration:
        d = self.pki.directory
        cas = loadCertificates(str((caDir or d) / "ca.pem"))
        if name is None:
            config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN.decode()], server_name="localhost")
            from cryptography.hazmat.primitives import serialization

            config.cadata = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cas)
            return config
        return clientConfiguration("localhost", cas, loadCertificates(str(d / f"{name}.pem")), loadKey(str(d / f"{name}.key")))

    def closeSession(self, session: Any) -> None:
        if not session.closed:
            session.close(0, "test done")
        session.socket.stop()
        session.abandon()


class MutualTLSTests(QuicTestCase):
    """
    A refused client over real UDP sockets.  The verdicts themselves are
    tested in memory (test_quic_memory.VerdictTests).
    """

    @defer.inlineCallbacks
    def refused(self, config: QuicConfiguration, reason: str) -> Any:
        """
        In TLS 1.3 the client finishes its handshake before the server has
        checked its certificate; the server then closes the connection, and
        a stream the client opened meanwhile is never served.
        """
        self.startTP()
        sinkPort, sink = listenLocal(self, HashSink)
        session = connectQuic(reactor, ("127.0.0.1", self.port), config)
        self.addCleanup(self.closeSession, session)
        try:
            yield session.ready
        except TunnelError:
            pass  # the refusal came before the client's handshake ended
        else:
            ready: defer.Deferred[Any] = defer.Deferred()
            session.openStream(TPClientProtocol(ClientHello.connect("127.0.0.1", sinkPort), ready))
            yield self.assertFailure(ready, Exception)
        yield session.done.addTimeout(10, reactor)
        self.assertEqual(sink.accepted, 0)
        [event] = yield waitForAudits(self.observer, 1)
        self.assertEqual((event["result"], event["event"]), ("handshake_failed", "quic"))
        self.assertIn(reason, event["detail"])
        self.assertEqual(len(self.listener.sessions), 0)

    def test_noCertificate(self) -> Any:
        """
        A client that sends no certificate is refused in the handshake
        (alert certificate_required) and no stream is served.
        """
        return self.refused(self.quicConfig(None), "no client certificate")


class StreamTests(QuicTestCase):
    @defer.inlineCallbacks
    def test_connectOverQuic(self) -> Any:
        """
        C{tp connect --transport quic} moves data with a half-close through
        a QUIC stream; the status line says quic.
        """
        sinkPort, sink = listenLocal(self, HashSink)
        self.startTP()
        data = os.urandom(3 * 1024 * 1024)
        result = yield run(tpCommand() + ["--config", self.clientConfig(), "--transport", "quic", "connect", f"127.0.0.1:{sinkPort}"], stdin=data)
        self.assertEqual(result.status, 0, result)
        self.assertEqual(result.out.decode(), f"{len(data)} {sha256(data)}\n")
        self.assertIn(b"(v1, quic)", result.err)
        events = [e for e in (yield waitForAudits(self.observer, 1)) if e["event"] == "connect"]
        self.assertEqual(events[0]["result"], "ok")
        self.assertEqual(events[0]["bytes_up"], len(data))

    @defer.inlineCallbacks
    def test_hundredStreams(self) -> Any:
        """
        100 concurrent tunnels through one C{tp up --transport quic} (one
        QUIC connection, a stream each) move their data intact.
        """
        echoPort, echo = listenLocal(self, Echo)
        self.startTP()
        up = Background(self, tpCommand() + ["--config", self.clientConfig(), "--transport", "quic", "up", f"127.0.0.1:{echoPort}", "0"])
        line = yield up.waitForStderr(b"; Ctrl-C stops")
        self.assertIn(b"(v1, quic)", line)
        localPort = int(re.search(rb"Forwarding 127\.0\.0\.1:(\d+) to", line).group(1))  # type: ignore[union-attr]
        yield echoRoundTrips(localPort, 100, 128 * 1024)
        self.assertEqual(echo.accepted, 100)
        self.assertEqual(len({id(s) for s in self.listener.sessions.values()}), 1)

    @defer.inlineCallbacks
    def test_forbiddenOverQuic(self) -> Any:
        sinkPort, sink = listenLocal(self, HashSink)
        self.startTP()
        result = yield run(tpCommand() + ["--config", self.clientConfig(), "--transport", "quic", "connect", f"10.255.255.1:{sinkPort}"], stdin=b"")
        self.assertEqual(result.status, 3, result)
        self.assertIn(b"forbidden", result.err)


class RevokedConnectionTests(QuicTestCase):
    @defer.inlineCallbacks
    def test_deniedSinceHandshake(self) -> Any:
        """
        Alice's QUIC connection is open, with one tunnel done, when a
        reload puts her on the deny list: a new stream on the same
        connection is not served, and the connection is closed.
        """
        from tpproxy.verify import ClientCertChecker

        echoPort, echo = listenLocal(self, Echo)
        self.startTP()
        session = connectQuic(reactor, ("127.0.0.1", self.port), self.quicConfig("alice"))
        self.addCleanup(self.closeSession, session)
        yield session.ready
        ready: defer.Deferred[Any] = defer.Deferred()
        session.openStream(TPClientProtocol(ClientHello.connect("127.0.0.1", echoPort), ready))
        end = yield ready
        end.transport.loseConnection()
        serverTLS = self.tpFactory.wrappedFactory.serverTLS
        serverTLS.reconfigure(serverTLS.clientCAs, ClientCertChecker(deniedIdentities=frozenset({"alice"})))
        again: defer.Deferred[Any] = defer.Deferred()
        session.openStream(TPClientProtocol(ClientHello.connect("127.0.0.1", echoPort), again))
        yield self.assertFailure(again, Exception)
        yield session.done.addTimeout(10, reactor)
        self.assertEqual(echo.accepted, 1)


class FallbackTests(QuicTestCase):
    @defer.inlineCallbacks
    def test_noQuicListener(self) -> Any:
        """
        With no QUIC listener, C{auto} ends on TLS quickly and works; the
        status line says tls.
        """
        sinkPort, _ = listenLocal(self, HashSink)
        self.startTP(quic=False)
        started = time.monotonic()
        result = yield run(tpCommand() + ["--config", self.clientConfig(), "connect", f"127.0.0.1:{sinkPort}"], stdin=b"fallback")
        self.assertEqual(result.status, 0, result)
        self.assertIn(b"(v1, tls)", result.err)
        self.assertEqual(result.out, f"8 {sha256(b'fallback')}\n".encode())
        self.assertLess(time.monotonic() - started, 10)

    @defer.inlineCallbacks
    def test_udpDropped(self) -> Any:
        """
        When the QUIC port swallows every packet (UDP filtered), C{auto}
        gives QUIC its short bound, then uses TLS, and remembers that: the
        next connection goes straight to TLS.
        """
        sinkPort, _ = listenLocal(self, HashSink)
        self.startTP(quic=False)
        blackhole = reactor.listenUDP(self.port, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(blackhole.stopListening)
        from tpproxy.test.support import cleanEnv

        env = cleanEnv(XDG_CACHE_HOME=os.path.abspath(self.mktemp()))
        argv = tpCommand() + ["--config", self.clientConfig(), "connect", f"127.0.0.1:{sinkPort}"]
        started = time.monotonic()
        result = yield run(argv, stdin=b"one", env=env)
        first = time.monotonic() - started
        self.assertEqual(result.status, 0, result)
        self.assertIn(b"(v1, tls)", result.err)
        self.assertGreater(first, 1.4)  # it did wait for QUIC
        started = time.monotonic()
        result = yield run(argv, stdin=b"two", env=env)
        self.assertEqual(result.status, 0, result)
        self.assertLess(time.monotonic() - started, first)
        memory = os.path.join(env["XDG_CACHE_HOME"], "tp", "transport.json")
        self.assertIn('"tls"', open(memory).read())


class SSHOverQuicTests(QuicTestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        self.sshd = yield SSHD.start(self)
        self.startTP()

    @defer.inlineCallbacks
    def check(self, host: str, port: int, proxy: str) -> Any:
        up = os.urandom(TEN_MB)
        result = yield run(self.sshd.args(host, port, "sha256sum", proxy=proxy), stdin=up)
        self.assertEqual(result.status, 0, result)
        self.assertEqual(result.out.split()[0].decode(), sha256(up))
        self.assertIn(b"(v1, quic)", result.err)
        payload = os.urandom(TEN_MB)
        (self.sshd.dir / "down.bin").write_bytes(payload)
        result = yield run(self.sshd.args(host, port, "cat", str(self.sshd.dir / "down.bin"), proxy=proxy), stdin=b"")
        self.assertEqual(result.status, 0, result.err)
        self.assertEqual((len(result.out), sha256(result.out)), (TEN_MB, sha256(payload)))

    def test_sshOverQuic(self) -> Any:
        """
        ssh with ProxyCommand="tp connect --transport quic %h:%p" moves 10 MB
        each way intact.
        """
        proxy = " ".join(tpCommand()) + f" --config {self.clientConfig()} --transport quic connect %h:%p"
        return self.check("127.0.0.1", self.sshd.port, proxy)

    @defer.inlineCallbacks
    def test_e2eOverQuic(self) -> Any:
        """
        An E2E exposure (registered over TLS) dialled over QUIC: the inner
        handshake runs inside a QUIC stream.
        """
        exposer = Background(self, tpCommand() + ["--config", self.clientConfig("alice"), "--transport", "tls", "expose", f"127.0.0.1:{self.sshd.port}", "--e2e", "ssh.alice.localhost"])
        yield exposer.waitForStderr(b"; Ctrl-C stops")
        proxy = " ".join(tpCommand()) + f" --config {self.clientConfig('bob')} --transport quic connect %h:%p"
        yield self.check("ssh.alice.localhost", 22, proxy)
        inner = [e for e in audits(self.observer) if e.get("destination") == "ssh.alice.localhost:22"]
        self.assertTrue(inner and all(e["result"] == "ok" for e in inner), inner)


class ReverseSSHOverQuicTests(QuicTestCase):
    """
    A real sshd exposed over QUIC, publicly and by E2E name.
    """

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        self.sshd = yield SSHD.start(self)
        self.startTP()

    @defer.inlineCallbacks
    def test_publicAndE2E(self) -> Any:
        public = Background(self, tpCommand() + ["--config", self.clientConfig("alice"), "--transport", "quic", "expose", f"127.0.0.1:{self.sshd.port}", "--public"])
        line = yield public.waitForStderr(b"; Ctrl-C stops")
        port = int(re.search(rb"as public port (\d+)", line).group(1))  # type: ignore[union-attr]
        e2e = Background(self, tpCommand() + ["--config", self.clientConfig("alice"), "--transport", "quic", "expose", f"127.0.0.1:{self.sshd.port}", "--e2e", "ssh.alice.localhost"])
        yield e2e.waitForStderr(b"; Ctrl-C stops")
        payload = os.urandom(2 * 1024 * 1024)
        result = yield run(self.sshd.args("127.0.0.1", port, "sha256sum"), stdin=payload)
        self.assertEqual((result.status, result.out.split()[:1]), (0, [sha256(payload).encode()]), result)
        proxy = " ".join(tpCommand()) + f" --config {self.clientConfig('bob')} --transport quic connect %h:%p"
        result = yield run(self.sshd.args("ssh.alice.localhost", 22, "sha256sum", proxy=proxy), stdin=payload)
        self.assertEqual((result.status, result.out.split()[:1]), (0, [sha256(payload).encode()]), result)


class ReverseOverQuicTests(QuicTestCase):
    """
    C{tp expose --transport quic}: the signalling is a stream, and each
    incoming session is a stream TP opens on the same connection.
    """

    @defer.inlineCallbacks
    def expose(self, local: int, *mode: str) -> Any:
        exposer = Background(self, tpCommand() + ["--config", self.clientConfig("alice"), "--transport", "quic", "expose", f"127.0.0.1:{local}", *mode])
        line = yield exposer.waitForStderr(b"; Ctrl-C stops")
        self.assertIn(b"(v1, quic)", line)
        match = re.search(rb"as public port (\d+)", line)
        return exposer, int(match.group(1)) if match else None

    @defer.inlineCallbacks
    def test_publicOverQuic(self) -> Any:
        """
        Dialers of a public exposure held over QUIC reach the local service
        through streams TP opens; no accept connection is made.
        """
        echoPort, echo = listenLocal(self, Echo)
        self.startTP()
        exposer, public = yield self.expose(echoPort, "--public")
        yield echoRoundTrips(public, 10, 64 * 1024)
        self.assertEqual(echo.accepted, 10)
        events = audits(self.observer)
        self.assertEqual([e for e in events if e.get("event") == "accept"], [])
        sessions = {id(s) for s in self.listener.sessions.values()}
        self.assertEqual(len(sessions), 1)

    @defer.inlineCallbacks
    def test_e2eOverQuic(self) -> Any:
        """
        An E2E exposure held over QUIC, dialled over QUIC and over TLS.
        """
        sinkPort, sink = listenLocal(self, HashSink)
        self.startTP()
        yield self.expose(sinkPort, "--e2e", "sink.alice.localhost")
        for transport in ("quic", "tls"):
            data = os.urandom(256 * 1024)
            result = yield run(
                tpCommand() + ["--config", self.clientConfig("bob"), "--transport", transport, "connect", "sink.alice.localhost:9"],
                stdin=data,
            )
            self.assertEqual(result.status, 0, result)
            self.assertEqual(result.out.decode(), f"{len(data)} {sha256(data)}\n")
        self.assertEqual(sink.accepted, 2)

    @defer.inlineCallbacks
    def test_exposerGoneClosesPort(self) -> Any:
        """
        When the exposer's QUIC connection ends, TP closes the public port.
        """
        echoPort, _ = listenLocal(self, Echo)
        self.startTP()
        exposer, public = yield self.expose(echoPort, "--public")
        exposer.transport.signalProcess("TERM")
        yield exposer.proto.done
        yield waitUntilRefused(public, "the exposer ended")
