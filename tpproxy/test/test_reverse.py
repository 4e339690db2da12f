"""
Reverse tunnels on loopback: C{tp expose} in public and E2E modes with a
real sshd, concurrency, refusals, the signalling connection going away, and
session ids that must not work.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import ssl as stdlib_ssl
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from tpproxy.pki import loadCertificates, loadKey
from tpproxy.protocols.client import Refused, ServerAddress, TLSClientEndpoint, openTunnel
from tpproxy.service import makeServerFactory
from tpproxy.test.support import (
    SSHD,
    Background,
    Echo,
    auditObserver,
    audits,
    echoRoundTrips,
    freePort,
    listenLocal,
    run,
    sha256,
    tpCommand,
    waitUntilRefused,
)
from tpproxy.test.test_integration import TEN_MB, writeClientConfig
from tpproxy.testing import REVERSE_RULES, TestPKI, reverseTables
from tpproxy.transports.tls import clientTLS
from tpproxy.wire import ClientHello, FrameDecoder, ServerHello, encodeEvent, parseEvent

E2E_NAME = "ssh.alice.localhost"


class ReverseTestCase(TestCase):
    timeout = 240

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        for name in ("alice", "bob", "mallory"):
            self.pki.client(name)
        self.observer = auditObserver(self)
        self.server: Any = None

    def startTP(self, port: int = 0, acceptTimeout: float = 10, keepalive: float = 15, exposers: tuple[str, ...] = ("alice",)) -> int:
        self.config = self.pki.serverConfig(REVERSE_RULES, **reverseTables(self.pki, acceptTimeout, keepalive, exposers))
        self.factory = makeServerFactory(self.config, reactor)
        self.server = reactor.listenTCP(port, self.factory, interface="127.0.0.1")
        self.port = self.server.getHost().port
        self.addCleanup(self.stopTP)
        for name in ("alice", "bob", "mallory"):
            writeClientConfig(
                self.pki, self.port, cert=str(self.pki.directory / f"{name}.pem"), key=str(self.pki.directory / f"{name}.key"), name=f"{name}.toml"
            )
        return self.port

    def startWithExposures(self, exposures: list[dict[str, Any]], **tables: Any) -> int:
        """
        TP on 127.0.0.1 with these C{[[exposures]]} (and other tables, such
        as C{groups}), E2E certificates from the test CA, public ports on
        127.0.0.1.
        """
        tables = {
            "exposures": exposures,
            "reverse": {"public_interface": "127.0.0.1"},
            "e2e": {"ca_certificate": "ca.pem", "ca_key": "ca.key"},
            **tables,
        }
        self.config = self.pki.serverConfig(REVERSE_RULES, **tables)
        self.factory = makeServerFactory(self.config, reactor)
        self.server = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.server.getHost().port
        self.addCleanup(self.stopTP)
        return self.port

    def stopTP(self) -> Any:
        if self.server is None:
            return None
        server, self.server = self.server, None
        for proto in list(self.factory.protocols):
            proto.transport.abortConnection()
        return server.stopListening()

    def clientConfig(self, name: str = "alice") -> str:
        return str(self.pki.directory / f"{name}.toml")

    def tlsOptions(self, name: str, serverName: str = "localhost") -> Any:
        d = self.pki.directory
        return clientTLS(serverName, loadCertificates(str(d / "ca.pem")), loadCertificates(str(d / f"{name}.pem")), loadKey(str(d / f"{name}.key")))

    @defer.inlineCallbacks
    def expose(self, local: int, *mode: str, identity: str = "alice", keepalive: float | None = None) -> Any:
        argv = tpCommand() + ["--config", self.clientConfig(identity), "expose", f"127.0.0.1:{local}", *mode]
        if keepalive is not None:
            argv += ["--keepalive", str(keepalive)]
        exposer = Background(self, argv)
        line = yield exposer.waitForStderr(b"; Ctrl-C stops")
        exposer.line = line
        match = re.search(rb"as public port (\d+)", line)
        exposer.publicPort = int(match.group(1)) if match else None
        return exposer


class SSHThroughReverseTests(ReverseTestCase):
    """
    A real sshd behind C{tp expose}, reached by a real ssh.
    """

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        self.sshd = yield SSHD.start(self)
        self.startTP()

    @defer.inlineCallbacks
    def moveTenMegabytes(self, host: str, port: int, proxy: str | None) -> Any:
        result = yield run(self.sshd.args(host, port, "echo", "reverse-ok", proxy=proxy), stdin=b"")
        self.assertEqual((result.status, result.out), (0, b"reverse-ok\n"), result)
        up = os.urandom(TEN_MB)
        result = yield run(self.sshd.args(host, port, "sha256sum", proxy=proxy), stdin=up)
        self.assertEqual(result.status, 0, result)
        self.assertEqual(result.out.split()[0].decode(), sha256(up))
        payload = os.urandom(TEN_MB)
        (self.sshd.dir / "down.bin").write_bytes(payload)
        result = yield run(self.sshd.args(host, port, "cat", str(self.sshd.dir / "down.bin"), proxy=proxy), stdin=b"")
        self.assertEqual(result.status, 0, result.err)
        self.assertEqual((len(result.out), sha256(result.out)), (TEN_MB, sha256(payload)))

    @defer.inlineCallbacks
    def test_public(self) -> Any:
        """
        C{tp expose --public}: plain ssh to the port TP opened reaches the
        exposed sshd; a command runs and 10 MB move each way intact.
        """
        exposer = yield self.expose(self.sshd.port, "--public")
        self.assertIsNotNone(exposer.publicPort)
        yield self.moveTenMegabytes("127.0.0.1", exposer.publicPort, None)

    @defer.inlineCallbacks
    def test_e2e(self) -> Any:
        """
        C{tp expose --e2e NAME}: ssh with C{ProxyCommand="tp connect %h:%p"}
        to NAME reaches the exposed sshd through the inner handshake.
        """
        yield self.expose(self.sshd.port, "--e2e", E2E_NAME)
        proxy = " ".join(tpCommand()) + f" --config {self.clientConfig('bob')} connect %h:%p"
        yield self.moveTenMegabytes(E2E_NAME, 22, proxy)
        events = [e for e in audits(self.observer) if e["event"] == "connect" and e["destination"] == f"{E2E_NAME}:22"]
        self.assertEqual({e["result"] for e in events}, {"ok"})
        self.assertIn("inner identity bob", events[0]["detail"])


class ExposureTests(ReverseTestCase):
    @defer.inlineCallbacks
    def test_twentyConcurrentDialers(self) -> Any:
        """
        20 concurrent dialers through one public exposure each get their own
        data back intact.
        """
        echoPort, echo = listenLocal(self, Echo)
        self.startTP()
        exposer = yield self.expose(echoPort, "--public")
        yield echoRoundTrips(exposer.publicPort, 20, 512 * 1024)
        self.assertEqual(echo.accepted, 20)

    @defer.inlineCallbacks
    def test_e2eThroughTpUp(self) -> Any:
        """
        C{tp up NAME:PORT} forwards local connections to an E2E exposure.
        """
        echoPort, echo = listenLocal(self, Echo)
        self.startTP()
        yield self.expose(echoPort, "--e2e", "echo.alice.localhost")
        up = Background(self, tpCommand() + ["--config", self.clientConfig("bob"), "up", "echo.alice.localhost:7", "0"])
        line = yield up.waitForStderr(b"; Ctrl-C stops")
        localPort = int(re.search(rb"Forwarding 127\.0\.0\.1:(\d+) to", line).group(1))  # type: ignore[union-attr]
        yield echoRoundTrips(localPort, 5, 256 * 1024)
        self.assertEqual(echo.accepted, 5)

    @defer.inlineCallbacks
    def test_dialerNotAllowedForName(self) -> Any:
        """
        An identity that may connect to NAME on the outer layer but is not
        among its dialers is refused at the inner handshake, and the
        exposer's service never sees a connection.
        """
        echoPort, echo = listenLocal(self, Echo)
        self.startTP()
        yield self.expose(echoPort, "--e2e", "echo.alice.localhost")
        result = yield run(tpCommand() + ["--config", self.clientConfig("mallory"), "connect", "echo.alice.localhost:7"], stdin=b"hi")
        self.assertEqual(result.status, 1, result)
        self.assertIn(b"echo.alice.localhost", result.err)
        self.assertEqual(echo.accepted, 0)
        [event] = [e for e in audits(self.observer) if e["identity"] == "mallory"]
        self.assertEqual(event["result"], "e2e_refused")
        self.assertIn("not allowed to dial echo.alice.localhost", event["detail"])

    @defer.inlineCallbacks
    def test_directSNI(self) -> Any:
        """
        Without the tp client: TLS to TP with SNI = NAME gets the
        certificate for NAME, requires an allowed client certificate, and
        then reaches the exposed service.  No certificate: refused at the
        handshake.
        """
        sinkPort, sink = listenLocal(self, Echo)
        self.startTP()
        yield self.expose(sinkPort, "--e2e", "echo.alice.localhost")

        def attempt(withCert: bool) -> bytes:
            ctx = stdlib_ssl.create_default_context(cafile=self.pki.caPath)
            if withCert:
                ctx.load_cert_chain(str(self.pki.directory / "bob.pem"), str(self.pki.directory / "bob.key"))
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="echo.alice.localhost") as tls:
                    self.assertEqual(tls.getpeercert()["subject"], ((("commonName", "echo.alice.localhost"),),))
                    tls.sendall(b"ping over sni")
                    return tls.recv(100)

        from twisted.internet.threads import deferToThread

        answer = yield deferToThread(attempt, True)
        self.assertEqual(answer, b"ping over sni")
        yield self.assertFailure(deferToThread(attempt, False), stdlib_ssl.SSLError, ConnectionError)
        self.assertEqual(sink.accepted, 1)

    @defer.inlineCallbacks
    def test_nameTakenByOtherIdentity(self) -> Any:
        """
        A name held by a live exposure cannot be taken by another identity.
        """
        self.startTP(exposers=("alice", "bob"))
        yield self.expose(freePort(), "--e2e", "taken.localhost")
        result = yield run(tpCommand() + ["--config", self.clientConfig("bob"), "expose", "127.0.0.1:1", "--e2e", "taken.localhost"])
        self.assertEqual(result.status, 3, result)
        self.assertIn(b"name_taken", result.err)
        result = yield run(tpCommand() + ["--config", self.clientConfig("mallory"), "expose", "127.0.0.1:1", "--e2e", "other.localhost"])
        self.assertEqual(result.status, 3, result)
        self.assertIn(b"forbidden", result.err)


class SignallingTests(ReverseTestCase):
    @defer.inlineCallbacks
    def test_killedExposerClosesPort(self) -> Any:
        """
        When the signalling connection dies, TP closes the public port at
        once.
        """
        echoPort, _ = listenLocal(self, Echo)
        self.startTP()
        exposer = yield self.expose(echoPort, "--public")
        port = exposer.publicPort
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        exposer.transport.signalProcess("KILL")
        yield exposer.proto.done
        yield waitUntilRefused(port, "the exposer died")

    @defer.inlineCallbacks
    def test_restartedTPComesBack(self) -> Any:
        """
        TP restarts: C{tp expose} reconnects by itself, registers the same
        public port again, and the exposure works.
        """
        echoPort, echo = listenLocal(self, Echo)
        tpPort = self.startTP(keepalive=1)
        wanted = freePort()
        exposer = yield self.expose(echoPort, "--public", str(wanted), keepalive=1)
        self.assertEqual(exposer.publicPort, wanted)
        yield self.stopTP()
        yield exposer.waitForStderr(b"reconnecting")
        self.startTP(port=tpPort, keepalive=1)
        yield exposer.waitForStderr(b"again via")
        yield echoRoundTrips(wanted, 2, 1000)
        self.assertEqual(echo.accepted, 2)


class ControlClient(protocol.Protocol):
    """
    A hand-driven signalling connection: registers, records events, never
    accepts by itself.
    """

    def __init__(self, hello: ClientHello) -> None:
        self.hello = hello
        self.decoder = FrameDecoder()
        self.answer: defer.Deferred[ServerHello] = defer.Deferred()
        self.incoming: defer.DeferredQueue[dict[str, Any]] = defer.DeferredQueue()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.hello.toFrame())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.decoder.feed(data)
        while (frame := self.decoder.nextFrame()) is not None:
            if not self.answer.called:
                self.answer.callback(ServerHello.fromObject(frame))
                continue
            event, fields = parseEvent(frame)
            if event == "incoming":
                self.incoming.put(fields)

    def ping(self) -> None:
        self.transport.write(encodeEvent("ping"))  # type: ignore[union-attr]

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class SessionTests(ReverseTestCase):
    """
    Session ids: one use, bound to the exposer's identity, expiring.
    """

    @defer.inlineCallbacks
    def register(self, identity: str = "alice") -> Any:
        factory = protocol.Factory.forProtocol(lambda: ControlClient(ClientHello("listen", mode="public", port=0)))
        endpoint = TLSClientEndpoint(reactor, ServerAddress("localhost", self.port), self.tlsOptions(identity))
        control = yield endpoint.connect(factory)
        self.addCleanup(lambda: control.lost.called or control.transport.abortConnection())
        answer = yield control.answer
        self.assertTrue(answer.ok, answer)
        return control, answer.info["port"]

    def accept(self, session: str, identity: str = "alice") -> Any:
        return openTunnel(
            reactor, ServerAddress("localhost", self.port), self.tlsOptions(identity), ClientHello("accept", session=session)
        )

    @defer.inlineCallbacks
    def dial(self, port: int) -> Any:
        closed: defer.Deferred[bytes] = defer.Deferred()
        received: list[bytes] = []

        class Dialer(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

            def connectionLost(self, reason: Any) -> None:
                closed.callback(b"".join(received))

        dialer = Dialer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), dialer)
        return dialer, closed

    @defer.inlineCallbacks
    def assertBadSession(self, session: str, fragment: str, identity: str = "alice") -> Any:
        error = yield self.assertFailure(self.accept(session, identity), Refused)
        self.assertEqual(error.code, "bad_session")
        self.assertIn(fragment, error.message)

    @defer.inlineCallbacks
    def test_forgedReusedForeign(self) -> Any:
        """
        A forged id, another identity's id and a used id are refused with
        C{bad_session}; the real one works once.
        """
        self.startTP()
        control, port = yield self.register()
        dialer, closed = yield self.dial(port)
        incoming = yield control.incoming.get()
        sid = incoming["session"]
        self.assertGreaterEqual(len(sid), 22)  # >= 128 bits in base64url
        yield self.assertBadSession(secrets.token_urlsafe(24), "unknown session")
        yield self.assertBadSession(sid, "unknown session", identity="bob")
        tunnel = yield self.accept(sid)
        tunnel.transport.resumeProducing()
        tunnel.transport.write(b"from the exposer")
        tunnel.transport.loseConnection()
        self.assertEqual((yield closed), b"from the exposer")
        yield self.assertBadSession(sid, "session is used")

    @defer.inlineCallbacks
    def test_pendingDialersCapped(self) -> Any:
        """
        Beyond MAX_PENDING waiting dialers, a new dialer of a public port is
        turned away at once instead of queueing.
        """
        from tpproxy.reverse import registry as reverse

        self.patch(reverse, "MAX_PENDING", 2)
        self.startTP(acceptTimeout=60)
        control, port = yield self.register()
        first = yield self.dial(port)
        second = yield self.dial(port)
        for _ in range(2):
            yield control.incoming.get()
        third, closed = yield self.dial(port)
        self.assertEqual((yield closed.addTimeout(5, reactor)), b"")
        self.assertFalse(first[1].called or second[1].called)
        for dialer, _ in (first, second):
            dialer.transport.abortConnection()

    @defer.inlineCallbacks
    def test_expired(self) -> Any:
        """
        A session not accepted within accept_timeout expires: the dialer is
        disconnected, and a late accept is refused as expired.
        """
        self.startTP(acceptTimeout=0.5)
        control, port = yield self.register()
        dialer, closed = yield self.dial(port)
        incoming = yield control.incoming.get()
        self.assertEqual((yield closed), b"")
        yield self.assertBadSession(incoming["session"], "session is expired")

    @defer.inlineCallbacks
    def test_pendingDialerFailsWhenSignallingDies(self) -> Any:
        """
        Dialers waiting when the signalling connection dies are disconnected
        at once (public), or told C{not_accepted} (E2E via tp connect), and
        the port closes.
        """
        self.startTP(acceptTimeout=60)
        control, port = yield self.register()
        dialer, closed = yield self.dial(port)
        yield control.incoming.get()
        started = reactor.seconds()
        control.transport.abortConnection()
        self.assertEqual((yield closed), b"")
        self.assertLess(reactor.seconds() - started, 5)
        yield self.assertFailure(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol.Protocol()), Exception)

    @defer.inlineCallbacks
    def test_e2ePendingDialerGetsError(self) -> Any:
        """
        An E2E dialer through tp connect whose exposure goes away while it
        waits gets C{not_accepted} and exit status 3.
        """
        self.startTP(acceptTimeout=60)
        factory = protocol.Factory.forProtocol(lambda: ControlClient(ClientHello("listen", mode="e2e", name="wait.localhost")))
        endpoint = TLSClientEndpoint(reactor, ServerAddress("localhost", self.port), self.tlsOptions("alice"))
        control = yield endpoint.connect(factory)
        self.assertTrue((yield control.answer).ok)
        dialing = run(tpCommand() + ["--config", self.clientConfig("bob"), "connect", "wait.localhost:22"], stdin=None)
        yield control.incoming.get()
        control.transport.abortConnection()
        result = yield dialing
        self.assertEqual(result.status, 3, result)
        self.assertIn(b"not_accepted", result.err)
