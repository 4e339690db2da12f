"""
Regression tests for review findings on reverse tunnels: who may dial an
E2E name directly by SNI, timeouts that must (and must not) cut a
connection, TP's own name, keepalives of different periods, a public port
taken over by a new session of its owner, C{tp expose} stopping and giving
up promptly, and the byte counts of the audit log.
"""

from __future__ import annotations

import os
import socket
import ssl as stdlib_ssl
import time
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from tpproxy.protocols.client import ServerAddress, TLSClientEndpoint, openTunnel
from tpproxy.service import makeServerFactory
from tpproxy.test.support import Echo, audits, deferLater, freePort, listenLocal, run, tpCommand
from tpproxy.test.test_integration import writeClientConfig
from tpproxy.test.test_reverse import ControlClient, ReverseTestCase
from tpproxy.testing import REVERSE_RULES, reverseTables
from tpproxy.wire import ClientHello, FrameDecoder, ServerHello, parseEvent

E2E_NAME = "echo.alice.localhost"


class EventClient(ControlClient):
    """
    A L{ControlClient} that also records every event after the ServerHello
    (C{pong} included) in L{events}.
    """

    def __init__(self, hello: ClientHello) -> None:
        super().__init__(hello)
        self.events: defer.DeferredQueue[dict[str, Any]] = defer.DeferredQueue()

    def dataReceived(self, data: bytes) -> None:
        self.decoder.feed(data)
        while (frame := self.decoder.nextFrame()) is not None:
            if not self.answer.called:
                self.answer.callback(ServerHello.fromObject(frame))
                continue
            event, fields = parseEvent(frame)
            self.events.put(fields)
            if event == "incoming":
                self.incoming.put(fields)


@implementer(IHalfCloseableProtocol)
class RoundTrip(protocol.Protocol):
    """
    Sends C{data}, then EOF, and collects everything until the close.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(b"".join(self.received))


class Silent(protocol.Protocol):
    """
    Accepts TCP and never says a word.
    """

    def connectionMade(self) -> None:
        self.factory.open.append(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any) -> None:
        self.factory.open.remove(self)  # type: ignore[attr-defined]


def withTimeout(d: defer.Deferred[Any], seconds: float, what: str) -> defer.Deferred[Any]:
    """
    C{d}, or an AssertionError naming C{what} after C{seconds}.  The
    original Deferred is left alone (chained, not cancelled).
    """
    result: defer.Deferred[Any] = defer.Deferred()
    timer = reactor.callLater(seconds, lambda: result.called or result.errback(AssertionError(f"{what}: nothing after {seconds:g} s")))  # type: ignore[attr-defined]

    def fired(value: Any) -> Any:
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback(value)
        return value

    d.addBoth(fired)
    return result


def portOpen(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return False
    return True


def recvExactly(tls: Any, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = tls.recv(count - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return data


class FixesTestCase(ReverseTestCase):
    timeout = 60

    def startTP(  # type: ignore[override]
        self,
        port: int = 0,
        acceptTimeout: float = 10,
        keepalive: float = 15,
        exposers: tuple[str, ...] = ("alice",),
        names: list[str] | None = None,
        **server: Any,
    ) -> int:
        """
        Like L{ReverseTestCase.startTP}, with extra C{[server]} keys
        (C{handshake_timeout}, say) and, optionally, other exposure names.
        """
        tables = reverseTables(self.pki, acceptTimeout, keepalive, exposers)
        if names is not None:
            tables["exposures"][0]["names"] = names
        self.config = self.pki.serverConfig(REVERSE_RULES, **tables, **server)
        self.factory = makeServerFactory(self.config, reactor)
        self.server = reactor.listenTCP(port, self.factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.port = self.server.getHost().port
        self.addCleanup(self.stopTP)
        for name in ("alice", "bob", "mallory"):
            writeClientConfig(
                self.pki, self.port, cert=str(self.pki.directory / f"{name}.pem"), key=str(self.pki.directory / f"{name}.key"), name=f"{name}.toml"
            )
        return self.port

    @defer.inlineCallbacks
    def control(self, hello: ClientHello, identity: str = "alice") -> Any:
        """
        A hand-driven signalling connection; fires with it once TP answered
        (see C{control.answer} for the ServerHello).
        """
        factory = protocol.Factory.forProtocol(lambda: EventClient(hello))
        endpoint = TLSClientEndpoint(reactor, ServerAddress("localhost", self.port), self.tlsOptions(identity))
        control = yield endpoint.connect(factory)
        self.addCleanup(lambda: control.lost.called or control.transport.abortConnection())
        yield withTimeout(control.answer, 10, "ServerHello for the listen hello")
        return control

    def directTLS(self, identity: str, serverName: str, alpn: bool = False) -> Any:
        """
        A blocking TLS socket to TP with SNI C{serverName} and the client
        certificate of C{identity} (for use in a thread).
        """
        ctx = stdlib_ssl.create_default_context(cafile=self.pki.caPath)
        ctx.load_cert_chain(str(self.pki.directory / f"{identity}.pem"), str(self.pki.directory / f"{identity}.key"))
        if alpn:
            ctx.set_alpn_protocols(["tp/1"])
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        try:
            return ctx.wrap_socket(raw, server_hostname=serverName)
        except BaseException:
            raw.close()
            raise

    @defer.inlineCallbacks
    def waitForAudit(self, match: Any, timeout: float = 10) -> Any:
        """
        Wait for an audit event for which C{match(event)} is true.
        """
        deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
        while True:
            found = [e for e in audits(self.observer) if match(e)]
            if found:
                return found[0]
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                seen = [(e.get("event"), e.get("result"), e.get("destination") or e.get("exposure")) for e in audits(self.observer)]
                raise AssertionError(f"no matching audit event after {timeout:g} s; seen: {seen}")
            yield deferLater(0.05)

    @defer.inlineCallbacks
    def roundTrip(self, port: int, data: bytes) -> Any:
        client = RoundTrip(data)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        received = yield withTimeout(client.done, 10, f"echo through port {port}")
        return received


class DirectSNITests(FixesTestCase):
    @defer.inlineCallbacks
    def test_dialerNotAmongDialersRefusedAtHandshake(self) -> Any:
        """
        TLS straight to TP with SNI = an E2E name, with a valid certificate
        of an identity that is not among the name's C{dialers} (mallory):
        the handshake is refused (the name's own verification runs, not
        TP's general one), nothing reaches the exposed service, and the
        audit says why.  An allowed dialer (bob) still gets through.
        """
        echoPort, echo = listenLocal(self, Echo)
        self.startTP()
        yield self.expose(echoPort, "--e2e", E2E_NAME)

        def attempt(identity: str) -> Any:
            try:
                with self.directTLS(identity, E2E_NAME) as tls:
                    tls.sendall(b"hello from " + identity.encode())
                    return tls.recv(100)
            except (stdlib_ssl.SSLError, ConnectionError) as e:
                return e

        outcome = yield deferToThread(attempt, "mallory")
        if isinstance(outcome, bytes):
            # b"" is a close after a completed handshake: too late.
            self.fail(f"mallory's handshake for {E2E_NAME} was not refused; it read {outcome!r}")
        event = yield self.waitForAudit(lambda e: "mallory" in (e.get("detail") or "") or e["identity"] == "mallory")
        self.assertEqual(event["result"], "handshake_failed", event)
        self.assertIn(f"not allowed to dial {E2E_NAME}", event["detail"])
        # bob's session, made after mallory's refusal, is accepted: had
        # mallory's reached the exposer, the echo would have had two.
        answer = yield deferToThread(attempt, "bob")
        self.assertEqual(answer, b"hello from bob")
        self.assertEqual(echo.accepted, 1)

    @defer.inlineCallbacks
    def test_longSessionNotCutByHandshakeTimeout(self) -> Any:
        """
        A direct SNI session that outlives C{handshake_timeout} (1 s here)
        keeps working: data sent before and 2.5 s after are both echoed.
        """
        echoPort, echo = listenLocal(self, Echo)
        self.startTP(handshake_timeout=1)
        yield self.expose(echoPort, "--e2e", E2E_NAME)

        def session() -> tuple[bytes, Any]:
            with self.directTLS("bob", E2E_NAME) as tls:
                tls.sendall(b"first")
                first = recvExactly(tls, 5)
                time.sleep(2.5)
                try:
                    tls.sendall(b"second")
                    second: Any = recvExactly(tls, 6)
                except (AssertionError, stdlib_ssl.SSLError, ConnectionError) as e:
                    second = f"cut: {e!r}"
                return first, second

        answers = yield deferToThread(session)
        self.assertEqual(answers, (b"first", b"second"))
        self.assertEqual(echo.accepted, 1)


class OwnNameTests(FixesTestCase):
    @defer.inlineCallbacks
    def test_ownNameCannotBeExposed(self) -> Any:
        """
        Even with an exposure rule whose names cover it, TP's own server
        name (C{localhost} for the test PKI) cannot be registered as an E2E
        name: the ServerHello is C{forbidden} and says it is TP's own.
        Ordinary TP clients (SNI C{localhost}) keep working afterwards.
        """
        echoPort, echo = listenLocal(self, Echo)
        self.startTP(names=["*"])
        control = yield self.control(ClientHello("listen", mode="e2e", name="localhost"))
        answer = control.answer.result
        self.assertFalse(answer.ok, f"TP let alice expose its own name: {answer}")
        self.assertEqual(answer.code, "forbidden")
        self.assertIn("TP itself", answer.message)
        self.assertIsNone(self.factory.wrappedFactory.registry.nameExposure("localhost"))

        # A name the rule covers that is not TP's still works, so the
        # refusal above is about TP's name, not the rule.
        other = yield self.control(ClientHello("listen", mode="e2e", name="other.localhost"))
        self.assertTrue(other.answer.result.ok, other.answer.result)

        tunnel = yield withTimeout(
            openTunnel(reactor, ServerAddress("localhost", self.port), self.tlsOptions("bob"), ClientHello.connect("127.0.0.1", echoPort)),
            10,
            "a normal tunnel after the refused exposure",
        )
        received: list[bytes] = []
        got: defer.Deferred[None] = defer.Deferred()

        def dataReceived(data: bytes) -> None:
            received.append(data)
            if b"".join(received) == b"still TP" and not got.called:
                got.callback(None)

        tunnel.dataReceived = dataReceived  # collect instead of splicing
        tunnel.transport.resumeProducing()
        tunnel.transport.write(b"still TP")
        yield withTimeout(got, 10, "echo through a normal tunnel")
        tunnel.transport.loseConnection()
        self.assertEqual(echo.accepted, 1)


class E2EHandshakeTimeoutTests(FixesTestCase):
    @defer.inlineCallbacks
    def test_innerHandshakeBounded(self) -> Any:
        """
        A client that asks for an E2E name, reads the ServerHello carrying
        C{e2e}, then never starts the inner TLS handshake, is disconnected
        after C{handshake_timeout} (1 s here).
        """
        self.startTP(handshake_timeout=1)
        control = yield self.control(ClientHello("listen", mode="e2e", name="silent.localhost"))
        self.assertTrue(control.answer.result.ok, control.answer.result)

        def silentClient() -> tuple[ServerHello, str, float]:
            with self.directTLS("bob", "localhost", alpn=True) as tls:
                tls.sendall(ClientHello.connect("silent.localhost", 443).toFrame())
                decoder = FrameDecoder()
                while (frame := decoder.nextFrame()) is None:
                    chunk = tls.recv(4096)
                    if not chunk:
                        raise AssertionError("TP closed before its ServerHello")
                    decoder.feed(chunk)
                hello = ServerHello.fromObject(frame)
                started = time.monotonic()
                tls.settimeout(8)
                try:
                    data = tls.recv(4096)
                    outcome = f"eof {data!r}"
                except socket.timeout:
                    outcome = "still open"
                except (stdlib_ssl.SSLError, ConnectionError) as e:
                    outcome = f"closed ({e.__class__.__name__})"
                return hello, outcome, time.monotonic() - started

        hello, outcome, waited = yield deferToThread(silentClient)
        self.assertTrue(hello.ok, hello)
        self.assertEqual(hello.info.get("e2e"), "silent.localhost")
        self.assertNotEqual(outcome, "still open", f"TP kept a silent E2E client for {waited:.1f} s")
        self.assertIn(outcome, ("eof b''", "closed (ConnectionResetError)", "closed (SSLEOFError)", "closed (SSLError)"))
        self.assertLess(waited, 4)

    @defer.inlineCallbacks
    def test_establishedE2ESessionNotCut(self) -> Any:
        """
        The bound is on the inner handshake only: an E2E session through a
        TP tunnel that lasts longer than C{handshake_timeout} (1 s) keeps
        working.  (A guard for the fix above, not a regression of the old
        code.)
        """
        echoPort, echo = listenLocal(self, Echo)
        self.startTP(handshake_timeout=1)
        yield self.expose(echoPort, "--e2e", E2E_NAME)
        inner = yield withTimeout(
            openTunnel(
                reactor,
                ServerAddress("localhost", self.port),
                self.tlsOptions("bob"),
                ClientHello.connect(E2E_NAME, 7),
                innerTLS=lambda name: self.tlsOptions("bob", name),
            ),
            10,
            "E2E tunnel",
        )
        received: list[bytes] = []
        waiting: list[tuple[bytes, defer.Deferred[None]]] = []
        closed: defer.Deferred[None] = defer.Deferred()

        def dataReceived(data: bytes) -> None:
            received.append(data)
            for want, d in list(waiting):
                if b"".join(received) == want:
                    waiting.remove((want, d))
                    d.callback(None)

        def expect(want: bytes) -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            waiting.append((want, d))
            dataReceived(b"")
            return withTimeout(d, 5, f"echo of {want!r}")

        inner.dataReceived = dataReceived  # collect instead of splicing
        inner.connectionLost = lambda reason: closed.called or closed.callback(None)
        inner.transport.resumeProducing()
        inner.transport.write(b"first")
        yield expect(b"first")
        yield deferLater(2.5)
        self.assertFalse(closed.called, "the E2E session was cut")
        inner.transport.write(b"second")
        yield expect(b"firstsecond")
        inner.transport.loseConnection()
        yield withTimeout(closed, 5, "close of the E2E session")
        self.assertEqual(echo.accepted, 1)


class KeepaliveTests(FixesTestCase):
    @defer.inlineCallbacks
    def assertStaysUp(self, exposer: Any, seconds: float) -> Any:
        yield deferLater(seconds)
        self.assertNotIn(b"reconnecting", exposer.stderr)
        self.assertNotIn(b"again via", exposer.stderr)
        self.assertFalse(exposer.proto.done.called, exposer.stderr)
        data = os.urandom(20000)
        self.assertEqual((yield self.roundTrip(exposer.publicPort, data)), data)

    @defer.inlineCallbacks
    def test_exposerPingsFasterThanTP(self) -> Any:
        """
        TP keepalive 15 s, C{tp expose --keepalive 1}: TP answers the
        exposer's pings with pongs, so the exposer (which wants to hear from
        TP every 3 s) does not give up; the exposure keeps working.
        """
        echoPort, _ = listenLocal(self, Echo)
        self.startTP(keepalive=15)
        exposer = yield self.expose(echoPort, "--public", keepalive=1)
        yield self.assertStaysUp(exposer, 4.5)

    @defer.inlineCallbacks
    def test_tpPingsFasterThanExposer(self) -> Any:
        """
        TP keepalive 1 s, C{tp expose} at its default 15 s: the exposer
        answers TP's pings with pongs, so TP (which wants to hear from the
        exposer every 3 s) keeps the signalling connection.
        """
        echoPort, _ = listenLocal(self, Echo)
        self.startTP(keepalive=1)
        exposer = yield self.expose(echoPort, "--public")
        yield self.assertStaysUp(exposer, 4.5)

    @defer.inlineCallbacks
    def test_pingGetsPong(self) -> Any:
        """
        A C{ping} event on a signalling connection is answered with a
        C{pong}.
        """
        self.startTP(keepalive=15)
        control = yield self.control(ClientHello("listen", mode="public", port=0))
        self.assertTrue(control.answer.result.ok)
        control.ping()
        event = yield withTimeout(control.events.get(), 5, "answer to a ping")
        self.assertEqual(event, {"event": "pong"})


class TakeOverTests(FixesTestCase):
    @defer.inlineCallbacks
    def test_sameIdentitySamePortTakesOver(self) -> Any:
        """
        The same identity registering the same explicit public port while
        its first signalling connection is still up (a reconnect that beat
        the old connection's timeout) gets the port; the old signalling
        connection is closed, and dialers of the port now reach the new
        session.
        """
        self.startTP()
        wanted = freePort()
        first = yield self.control(ClientHello("listen", mode="public", port=wanted))
        self.assertEqual(first.answer.result.info.get("port"), wanted, first.answer.result)
        second = yield self.control(ClientHello("listen", mode="public", port=wanted))
        answer = second.answer.result
        self.assertTrue(answer.ok, f"the takeover of port {wanted} was refused: {answer}")
        self.assertEqual(answer.info.get("port"), wanted)
        yield withTimeout(first.lost, 5, "close of the old signalling connection")

        dialer = RoundTrip(b"to the new session")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", wanted), dialer)
        incoming = yield withTimeout(second.incoming.get(), 5, "incoming on the new session")
        tunnel = yield openTunnel(
            reactor, ServerAddress("localhost", self.port), self.tlsOptions("alice"), ClientHello("accept", session=incoming["session"])
        )
        tunnel.transport.resumeProducing()
        tunnel.transport.write(b"from the new session")
        tunnel.transport.loseConnection()
        self.assertEqual((yield withTimeout(dialer.done, 5, "dialer's answer")), b"from the new session")
        self.assertEqual(first.incoming.pending, [])


class ExposeProcessTests(FixesTestCase):
    @defer.inlineCallbacks
    def test_sigtermStopsPromptly(self) -> Any:
        """
        C{tp expose} exits within 3 s of SIGTERM, and TP closes the public
        port within 2 s (TP closes a signalling connection whose exposer
        sent close_notify).
        """
        echoPort, _ = listenLocal(self, Echo)
        self.startTP()
        exposer = yield self.expose(echoPort, "--public")
        port = exposer.publicPort
        self.assertTrue(portOpen(port))
        exposer.transport.signalProcess("TERM")
        started = reactor.seconds()  # type: ignore[attr-defined]
        closedAfter = None
        while reactor.seconds() - started < 3:  # type: ignore[attr-defined]
            if closedAfter is None and not portOpen(port):
                closedAfter = reactor.seconds() - started  # type: ignore[attr-defined]
            if closedAfter is not None and exposer.proto.done.called:
                break
            yield deferLater(0.1)
        self.assertTrue(exposer.proto.done.called, f"tp expose still runs 3 s after SIGTERM; stderr: {exposer.stderr!r}")
        self.assertIsNotNone(closedAfter, f"public port {port} still open 3 s after SIGTERM")
        self.assertLess(closedAfter, 2)

    @defer.inlineCallbacks
    def test_silentServerGivesUp(self) -> Any:
        """
        C{tp expose --connect-timeout 2} against a listener that accepts TCP
        and never speaks exits non-zero within 10 s with a message, instead
        of waiting forever for a TLS handshake.
        """
        factory = protocol.Factory.forProtocol(Silent)
        factory.open = []  # type: ignore[attr-defined]
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in list(factory.open)])  # type: ignore[attr-defined]
        config = writeClientConfig(
            self.pki, listening.getHost().port, cert=str(self.pki.directory / "alice.pem"), key=str(self.pki.directory / "alice.key"), name="silent.toml"
        )
        started = reactor.seconds()  # type: ignore[attr-defined]
        result = yield run(tpCommand() + ["--config", config, "--connect-timeout", "2", "expose", "127.0.0.1:1", "--public"], timeout=20)
        elapsed = reactor.seconds() - started  # type: ignore[attr-defined]
        self.assertNotIn(result.status, (0, None), result)
        self.assertLess(elapsed, 10, result)
        self.assertIn(b"tp: ", result.err)


class AuditBytesTests(FixesTestCase):
    @defer.inlineCallbacks
    def test_e2eConnectCountsBytes(self) -> Any:
        """
        The C{connect} audit event of an E2E connection through C{tp
        connect} counts the bytes of the inner stream both ways.
        """
        echoPort, _ = listenLocal(self, Echo)
        self.startTP()
        yield self.expose(echoPort, "--e2e", E2E_NAME)
        payload = os.urandom(30000)
        result = yield run(
            tpCommand() + ["--config", self.clientConfig("bob"), "--transport", "tls", "connect", f"{E2E_NAME}:7"], stdin=payload, timeout=30
        )
        self.assertEqual((result.status, len(result.out)), (0, len(payload)), result)
        self.assertEqual(result.out, payload)
        event = yield self.waitForAudit(lambda e: e["event"] == "connect" and e["destination"] == f"{E2E_NAME}:7")
        self.assertEqual(event["result"], "ok", event)
        self.assertEqual((event["bytes_up"], event["bytes_down"]), (len(payload), len(payload)), event)

    @defer.inlineCallbacks
    def test_publicDialerAudited(self) -> Any:
        """
        A public dialer's connection is audited (C{event="public"}) when it
        closes, with its byte counts.
        """
        echoPort, _ = listenLocal(self, Echo)
        self.startTP()
        exposer = yield self.expose(echoPort, "--public")
        payload = os.urandom(20000)
        self.assertEqual((yield self.roundTrip(exposer.publicPort, payload)), payload)
        event = yield self.waitForAudit(lambda e: e["event"] == "public")
        self.assertEqual(event["result"], "ok", event)
        self.assertEqual(event["exposure"], f"public port {exposer.publicPort}")
        self.assertEqual(event["owner"], "alice")
        self.assertEqual((event["bytes_up"], event["bytes_down"]), (len(payload), len(payload)), event)
