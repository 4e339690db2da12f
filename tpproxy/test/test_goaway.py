"""
Tests for L{tpproxy.reverse.expose.Exposer}: TP going away, a renewed
certificate, losses and stopping, in memory (a fake TP end on a
L{StringTransport}, time on a L{Clock}); then C{goaway} from a real TP on
loopback, over TLS and QUIC.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy.certwatch import Materials
from tpproxy.protocols.client import Refused, ServerAddress, TunnelError
from tpproxy.reverse.expose import ControlFactory, ControlProtocol, Exposer, ExposerState
from tpproxy.wire import ClientHello, ErrorCode, FrameDecoder, ServerHello, encodeEvent


@dataclass(frozen=True)
class FakeSettings:
    server: ServerAddress = ServerAddress("tp.example", 443)
    connectTimeout: float = 15.0


class TPEnd:
    """
    TP's end of one fake signalling connection.
    """

    def __init__(self, proto: ControlProtocol, transport: StringTransport) -> None:
        self.proto = proto
        self.transport = transport

    def hello(self) -> ClientHello:
        decoder = FrameDecoder()
        decoder.feed(self.transport.value())
        frame = decoder.nextFrame()
        assert frame is not None
        return ClientHello.fromObject(frame)

    def answer(self, **info: Any) -> None:
        self.proto.dataReceived(ServerHello.success(**info).toFrame())

    def refuse(self, code: ErrorCode, message: str) -> None:
        self.proto.dataReceived(ServerHello.failure(code, message).toFrame())
        self.close()

    def send(self, event: str, **fields: Any) -> None:
        self.proto.dataReceived(encodeEvent(event, **fields))

    def close(self) -> None:
        if not self.proto.done.called:
            self.proto.connectionLost(Failure(ConnectionDone("closed")))

    @property
    def closedByExposer(self) -> bool:
        return bool(self.transport.disconnecting)


class FakeUplink:
    """
    An L{tpproxy.reverse.expose.Uplink} whose connections are L{TPEnd}s.
    """

    connector = None
    chosen = "tls"

    def __init__(self, exposer: Exposer, settings: Any, previous: Any = None) -> None:
        self.settings = settings
        self.ends: list[TPEnd] = []
        self.retired = False
        self.closed = False
        self.unreachable = False

    #: Connections wait for L{finishConnecting} (a slow network).
    slow = False

    def connect(self, factory: ControlFactory) -> defer.Deferred[Any]:
        if self.unreachable:
            return defer.fail(ConnectionRefusedError("nobody listens"))
        if self.slow:
            self.connecting = defer.Deferred()
            return self.connecting.addCallback(lambda _: self._made(factory))
        return defer.succeed(self._made(factory))

    def _made(self, factory: ControlFactory) -> ControlProtocol:
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.ends.append(TPEnd(proto, transport))
        return proto

    def retire(self) -> None:
        self.retired = True

    def close(self) -> None:
        self.closed = True


def someMaterials() -> Materials:
    from tpproxy.pki import CertificateAuthority

    ca = CertificateAuthority.create("test CA")
    issued = ca.issue("alice", client=True, hours=1)
    return Materials([ca.cert], [issued.cert], issued.key)


class ExposerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.stderr = io.StringIO()
        self.uplinks: list[FakeUplink] = []

        def makeUplink(exposer: Exposer, settings: Any, previous: Any = None) -> FakeUplink:
            uplink = FakeUplink(exposer, settings, previous)
            self.uplinks.append(uplink)
            return uplink

        self.exposer = Exposer(
            self.clock,  # type: ignore[arg-type]
            FakeSettings(),
            ("127.0.0.1", 22),
            ClientHello("listen", mode="public", port=0),
            15.0,
            self.stderr,
            uplink=makeUplink,  # type: ignore[arg-type]
        )

    def ends(self) -> list[TPEnd]:
        return [end for uplink in self.uplinks for end in uplink.ends]

    def lines(self) -> list[str]:
        return self.stderr.getvalue().splitlines()

    def registered(self, port: int = 4000) -> TPEnd:
        """
        Start the exposer and let TP take its first registration.
        """
        first = self.exposer.start()
        [end] = self.ends()
        end.answer(port=port)
        self.assertEqual(self.successResultOf(first), {"port": port})
        self.assertIs(self.exposer.state, ExposerState.UP)
        return end


class GoawayTests(ExposerTestCase):
    def test_goawayReconnectsAtOnce(self) -> None:
        """
        On C{goaway} the exposer says one line and registers on a new
        connection (a new uplink) at once, without the clock moving; the
        new one asks for the port TP gave the old one.  Only once TP took
        the new registration is the old connection closed, quietly.
        """
        old = self.registered(4000)
        old.send("goaway", reason="TP is stopping")
        self.assertEqual(self.lines()[-1], "TP is going away: TP is stopping; reconnecting")
        self.assertEqual(len(self.uplinks), 2)
        [new] = self.uplinks[1].ends
        self.assertEqual(new.hello().port, 4000)
        self.assertFalse(old.closedByExposer)
        self.assertIs(self.exposer.state, ExposerState.MOVING)

        new.answer(port=4000)
        self.assertTrue(old.closedByExposer)
        self.assertTrue(self.uplinks[0].retired)
        old.close()
        self.assertIs(self.exposer.active, new.proto)
        self.assertIs(self.exposer.state, ExposerState.UP)
        self.assertEqual(
            self.lines()[1:],
            [
                "TP is going away: TP is stopping; reconnecting",
                "Exposing 127.0.0.1:22 as public port 4000 again via tp.example:443 (v1, tls); Ctrl-C stops",
            ],
        )

    def test_oldConnectionLostFirst(self) -> None:
        """
        If TP closes the old connection (it stops) before the new
        registration is answered, that loss says nothing more; the attempt
        under way goes on.
        """
        old = self.registered()
        old.send("goaway", reason="bye")
        old.close()
        self.assertIs(self.exposer.state, ExposerState.CONNECTING)
        self.assertEqual(self.lines()[-1], "TP is going away: bye; reconnecting")
        [new] = self.uplinks[1].ends
        new.answer(port=4000)
        self.assertIs(self.exposer.state, ExposerState.UP)
        self.assertNotIn("Lost", self.stderr.getvalue())

    def test_moveRefusedKeepsOld(self) -> None:
        """
        A refused move keeps the old registration and tries again with
        backoff; a second goaway meanwhile tries at once.
        """
        old = self.registered()
        old.send("goaway", reason="bye")
        [new] = self.uplinks[1].ends
        new.refuse(ErrorCode.PORT_UNAVAILABLE, "busy")
        self.assertIs(self.exposer.state, ExposerState.MOVE_WAITING)
        self.assertIn("keeping the current one", self.lines()[-1])
        self.assertFalse(old.closedByExposer)
        self.clock.advance(2)
        self.assertIs(self.exposer.state, ExposerState.MOVING)
        [again] = self.uplinks[1].ends[1:]
        again.refuse(ErrorCode.PORT_UNAVAILABLE, "busy")
        old.send("goaway", reason="really")
        self.assertIs(self.exposer.state, ExposerState.MOVING)
        self.assertEqual(len(self.ends()), 4)

    def test_goawayFromOldConnectionIgnored(self) -> None:
        """
        A goaway while a move is under way starts no second one.
        """
        old = self.registered()
        old.send("goaway", reason="one")
        old.send("goaway", reason="two")
        self.assertEqual(len(self.ends()), 2)
        self.assertEqual(self.stderr.getvalue().count("going away"), 1)


class LossAndStopTests(ExposerTestCase):
    def test_lostReconnectsWithBackoff(self) -> None:
        """
        A lost registration (no goaway) is said and retried after a backoff
        delay, on the same uplink, for the public port TP picked.
        """
        old = self.registered()
        old.close()
        self.assertIs(self.exposer.state, ExposerState.WAITING)
        self.assertTrue(self.lines()[-1].startswith("Lost the connection to TP"), self.lines())
        self.assertEqual(len(self.ends()), 1)
        self.clock.advance(0.7)
        self.assertEqual(len(self.ends()), 1)
        self.clock.advance(1.1)
        self.assertEqual(len(self.uplinks), 1)
        [_, new] = self.ends()
        # The port TP picked before: the exposure keeps its address (and
        # an exposer's other links ask for the same one).
        self.assertEqual(new.hello().port, 4000)
        new.answer(port=4000)
        self.assertIn("public port 4000 again", self.lines()[-1])

    def test_stopSaysStopping(self) -> None:
        """
        Stopping says so, and not that the connection was lost; the
        connection is closed and the uplinks too.
        """
        end = self.registered()
        stopped = self.exposer.stop()
        self.assertTrue(end.closedByExposer)
        end.close()
        self.successResultOf(stopped)
        self.assertEqual(self.lines()[-1], "Stopping: 127.0.0.1:22 is no longer exposed")
        self.assertNotIn("Lost", self.stderr.getvalue())
        self.assertTrue(self.uplinks[0].closed)
        self.assertIs(self.exposer.state, ExposerState.STOPPED)

    def test_stopBoundedWait(self) -> None:
        """
        A connection that does not close within STOP_GRACE does not hold
        the stop up.
        """
        self.registered()
        stopped = self.exposer.stop()
        self.assertNoResult(stopped)
        self.clock.advance(2.5)
        self.successResultOf(stopped)
        self.assertTrue(self.uplinks[0].closed)

    def test_stopWhileRegistering(self) -> None:
        """
        Stopping while the first registration is unanswered closes that
        connection; one still being made is closed as soon as it is made,
        before it sends its hello.
        """
        self.exposer.start()
        [end] = self.ends()
        stopped = self.exposer.stop(quietly=True)
        self.assertTrue(end.closedByExposer)
        end.close()
        self.successResultOf(stopped)
        self.assertEqual(self.lines(), [])

        self.setUp()
        self.uplinks[0].slow = True
        self.exposer.start()
        self.successResultOf(self.exposer.stop(quietly=True))
        self.uplinks[0].connecting.callback(None)
        [late] = self.ends()
        self.assertEqual(late.transport.value(), b"")
        self.assertTrue(late.transport.disconnecting)

    def test_firstRefusalFails(self) -> None:
        """
        A refused first registration fails C{start} with TP's code, and
        nothing is retried.
        """
        first = self.exposer.start()
        [end] = self.ends()
        end.refuse(ErrorCode.FORBIDDEN, "no")
        error = self.failureResultOf(first, Refused).value
        self.assertEqual(error.code, "forbidden")
        self.assertIs(self.exposer.state, ExposerState.FAILED)
        self.clock.advance(60)
        self.assertEqual(len(self.ends()), 1)

    def test_firstUnreachable(self) -> None:
        """
        TP unreachable on the first attempt: C{start} fails saying so.
        """
        self.uplinks[0].unreachable = True
        first = self.exposer.start()
        error = self.failureResultOf(first, TunnelError).value
        self.assertIn("cannot reach TP at tp.example:443", str(error))


class RenewalTests(ExposerTestCase):
    def renew(self) -> Materials:
        loaded = someMaterials()
        self.exposer.renewed(loaded)
        return loaded

    def test_renewalMovesMakeBeforeBreak(self) -> None:
        """
        A renewed certificate gets a new uplink (with the renewed
        settings); the exposure registers there first, and only then is
        the old connection closed and the old uplink retired.
        """
        old = self.registered()
        loaded = self.renew()
        self.assertIn("Loaded the renewed client certificate", self.lines()[-1])
        self.assertEqual(self.uplinks[1].settings.materials()[1], loaded.chain)
        [new] = self.uplinks[1].ends
        self.assertFalse(old.closedByExposer)
        self.assertFalse(self.uplinks[0].retired)
        new.answer(port=4000)
        self.assertTrue(old.closedByExposer)
        self.assertTrue(self.uplinks[0].retired)
        self.assertIs(self.exposer.uplink, self.uplinks[1])

    def test_renewalWhileConnecting(self) -> None:
        """
        A renewal while a registration is under way lets it finish, then
        moves at once to the renewed certificate.
        """
        self.exposer.start()
        [first] = self.ends()
        self.renew()
        self.assertEqual(len(self.ends()), 1)
        first.answer(port=4000)
        self.assertIs(self.exposer.state, ExposerState.MOVING)
        [new] = self.uplinks[1].ends
        new.answer(port=4000)
        self.assertTrue(first.closedByExposer)
        self.assertIs(self.exposer.state, ExposerState.UP)

    def test_renewalWhileWaiting(self) -> None:
        """
        A renewal while waiting to retry (perhaps TP refused the expired
        certificate) retries at once with it.
        """
        old = self.registered()
        old.close()
        self.assertIs(self.exposer.state, ExposerState.WAITING)
        self.renew()
        self.assertIs(self.exposer.state, ExposerState.CONNECTING)
        [new] = self.uplinks[1].ends
        new.answer(port=4000)
        self.assertIs(self.exposer.state, ExposerState.UP)
        self.clock.advance(60)
        self.assertEqual(len(self.ends()), 2)

    def test_oldLostDuringMove(self) -> None:
        """
        The old connection lost during a move (not a goaway) is said; the
        move goes on as the registration.
        """
        old = self.registered()
        self.renew()
        old.close()
        self.assertIn("Lost the connection", self.lines()[-1])
        self.assertIs(self.exposer.state, ExposerState.CONNECTING)
        self.assertTrue(self.uplinks[0].retired)
        [new] = self.uplinks[1].ends
        new.answer(port=4000)
        self.assertIs(self.exposer.state, ExposerState.UP)


# --- on loopback, with a real TP --------------------------------------------


class Talker(protocol.Protocol):
    """
    One long-lived connection through a tunnel to an echo service:
    C{echo(data)} fires with what came back.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.want = 0
        self.waiting: defer.Deferred[bytes] | None = None
        self.closed: defer.Deferred[None] = defer.Deferred()

    def echo(self, data: bytes, timeout: float = 10) -> defer.Deferred[bytes]:
        self.buffer, self.want = b"", len(data)
        self.waiting = defer.Deferred()
        self.waiting.addTimeout(timeout, reactor)
        self.transport.write(data)  # type: ignore[union-attr]
        return self.waiting

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.waiting is not None and len(self.buffer) >= self.want:
            waiting, self.waiting = self.waiting, None
            waiting.callback(self.buffer)

    def connectionLost(self, reason: Any) -> None:
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            waiting.callback(self.buffer)
        self.closed.callback(None)


def waitUntil(condition: Any, what: str, timeout: float = 10) -> defer.Deferred[None]:
    """
    Fires once C{condition()} is true (looked at every 20 ms); fails
    naming C{what} after C{timeout} seconds.
    """
    from tpproxy.test.support import deferLater

    @defer.inlineCallbacks
    def wait() -> Any:
        deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
        while not condition():
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                raise AssertionError(f"timed out waiting for {what}")
            yield deferLater(0.02)

    return wait()


class RealTPTestCase(TestCase):
    """
    A real TP (L{tpproxy.service.makeService}) on 127.0.0.1, TLS and QUIC
    on one port number, letting C{alice} expose public ports; an echo
    service to expose.
    """

    timeout = 120

    def setUp(self) -> None:
        from tpproxy.test.support import Echo, auditObserver, listenLocal
        from tpproxy.testing import TestPKI

        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        self.observer = auditObserver(self)
        self.echoPort, self.echo = listenLocal(self, Echo)

    def startTP(self) -> None:
        from tpproxy.service import makeService
        from tpproxy.test.support import freePort
        from tpproxy.testing import REVERSE_RULES, reverseTables

        self.port = freePort()
        config = self.pki.serverConfig(
            REVERSE_RULES,
            listen=f"tcp:{self.port}:interface=127.0.0.1",
            quic=[f"127.0.0.1:{self.port}"],
            **reverseTables(self.pki),
        )
        self.service = makeService(config, reactor)
        self.service.startService()
        self.addCleanup(lambda: self.service.stopService() if self.service.running else None)
        self.registry = self.service.reloader.factory.registry  # type: ignore[attr-defined]
        self.quicListener = self.service.reloader.quicListeners[0]  # type: ignore[attr-defined]

    def quicConnections(self) -> int:
        return len(set(self.quicListener.sessions.values()))

    @defer.inlineCallbacks
    def talk(self, port: int) -> Any:
        talker = Talker()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), talker)
        self.addCleanup(lambda: talker.closed.called or talker.transport.abortConnection())
        return talker


class GoawayLoopbackTests(RealTPTestCase):
    @defer.inlineCallbacks
    def goaway(self, transport: str) -> Any:
        """
        A real C{tp expose} over C{transport}; TP tells it to go away
        (L{tpproxy.reverse.registry.Registry.goaway}): it says so, registers
        again on a new connection, TP hands the port over, and a tunnel
        accepted before keeps echoing; new dialers reach the new
        registration.  Then SIGTERM: it says it is stopping.
        """
        from tpproxy.test.support import Background, echoRoundTrips, tpCommand
        from tpproxy.test.test_integration import writeClientConfig

        self.startTP()
        config = writeClientConfig(self.pki, self.port, name="alice.toml")
        argv = tpCommand() + ["--config", config, "--transport", transport, "expose", f"127.0.0.1:{self.echoPort}", "--public"]
        exposer = Background(self, argv)
        err = yield exposer.waitForStderr(b"; Ctrl-C stops")
        self.assertIn(f"(v1, {transport})".encode(), err)
        port = int(re.search(rb"as public port (\d+)", err).group(1))  # type: ignore[union-attr]
        old = self.registry.byPort[port].control
        talker = yield self.talk(port)
        self.assertEqual((yield talker.echo(b"before goaway")), b"before goaway")

        self.assertEqual(self.registry.goaway("a test says bye"), 1)
        yield exposer.waitForStderr(b"TP is going away: a test says bye; reconnecting\n")
        err = yield exposer.waitForStderr(b"again via")
        self.assertIn(f"as public port {port} again via".encode(), err)
        self.assertIsNot(self.registry.byPort[port].control, old)
        self.assertNotIn(b"Lost the connection", exposer.stderr)
        self.assertEqual((yield talker.echo(b"after goaway")), b"after goaway")
        yield echoRoundTrips(port, 2, 1000)
        return exposer, talker

    @defer.inlineCallbacks
    def stopped(self, exposer: Any) -> Any:
        exposer.transport.signalProcess("TERM")
        result = yield exposer.proto.done
        self.assertEqual(result.status, 0, result)
        self.assertIn(f"Stopping: 127.0.0.1:{self.echoPort} is no longer exposed".encode(), result.err)
        self.assertNotIn(b"Lost the connection", result.err)

    @defer.inlineCallbacks
    def test_tls(self) -> Any:
        """
        Over TLS.
        """
        exposer, talker = yield self.goaway("tls")
        yield self.stopped(exposer)

    @defer.inlineCallbacks
    def test_quic(self) -> Any:
        """
        Over QUIC: the new registration is on a new QUIC connection; the
        old one carries the tunnel accepted before until it ends, then
        closes.
        """
        exposer, talker = yield self.goaway("quic")
        self.assertEqual(self.quicConnections(), 2)
        talker.transport.loseConnection()
        yield talker.closed
        yield waitUntil(lambda: self.quicConnections() == 1, "the old QUIC connection to close")
        yield self.stopped(exposer)
