"""
TP's QUIC listener under hostile traffic (issue 10, section 1), in memory:
the listener is fed datagrams on a fake clock and its answers go to real
aioquic client connections.  Undecryptable Initials keep no state; many
half-open handshakes meet a cap, a Retry, and a deadline; connection IDs
are forgotten per session; and a restarted listener answers packets of
connections it forgot with a stateless reset that the client recognizes.
"""

from __future__ import annotations

import os
import time
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy.config import LimitsConfig
from tpproxy.test.support import (
    Background,
    Echo,
    auditObserver,
    audits,
    freePort,
    listenLocal,
    tpCommand,
    twistCommand,
    waitForPort,
)
from tpproxy.test.test_integration import writeClientConfig
from tpproxy.testing import TestPKI, loopbackServerTOML
from tpproxy.transports.quic import (
    RETRY_TOKEN_LIFETIME,
    ClientSession,
    ClientVerifier,
    QuicListener,
    TPQuicConnection,
    clientConfiguration,
    loadResetSecret,
    resetToken,
    serverConfiguration,
)
from tpproxy.verify import ClientCertChecker

SERVER = ("127.0.0.1", 443)


class Wire:
    """
    The listener's UDP transport: records what it sends.
    """

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", *SERVER)


def garbageInitial(size: int = 1200) -> bytes:
    """
    A long-header Initial with random connection IDs and a random payload:
    well formed enough for the header parser, undecryptable.
    """
    head = bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([8]) + os.urandom(8) + bytes([8]) + os.urandom(8) + b"\x00"
    left = size - len(head) - 2
    return head + (0x4000 | left).to_bytes(2, "big") + os.urandom(left)


class ListenerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.observer = auditObserver(self)

    def listener(self, secret: bytes | None = None, **limits: Any) -> tuple[QuicListener, Wire]:
        d = self.pki.directory
        from tpproxy.pki import loadCertificates, loadKey

        chain, key = loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key"))
        verifier = ClientVerifier([self.pki.ca.cert], ClientCertChecker(), self.clock)
        listener = QuicListener(
            self.clock, serverConfiguration(chain, key), verifier, None, limits=LimitsConfig(**limits), handshakeTimeout=10, resetSecret=secret
        )
        wire = Wire()
        listener.transport = wire  # type: ignore[assignment]
        return listener, wire

    def client(self) -> TPQuicConnection:
        d = self.pki.directory
        from tpproxy.pki import loadCertificates, loadKey

        config = clientConfiguration("localhost", [self.pki.ca.cert], loadCertificates(str(d / "alice.pem")), loadKey(str(d / "alice.key")))
        conn = TPQuicConnection(configuration=config)
        conn.connect(SERVER, now=self.clock.seconds())
        return conn

    def pump(self, listener: QuicListener, wire: Wire, clients: dict[Any, TPQuicConnection], rounds: int = 200) -> None:
        """
        Move datagrams between the clients (by address) and the listener
        until nothing moves for a while, letting 5 ms of the fake clock
        pass whenever nothing is in flight (aioquic paces its sending).
        """
        idle = 0
        for _ in range(rounds):
            moved = False
            now = self.clock.seconds()
            for addr, conn in clients.items():
                timer = conn.get_timer()
                if timer is not None and timer <= now:
                    conn.handle_timer(now=now)
                for data, _ in conn.datagrams_to_send(now=now):
                    listener.datagramReceived(data, addr)
                    moved = True
            self.clock.advance(0)
            sent, wire.sent = wire.sent, []
            for data, to in sent:
                if to in clients:
                    clients[to].receive_datagram(data, SERVER, now=self.clock.seconds())
                    moved = True
            if moved:
                idle = 0
                continue
            idle += 1
            if idle > 20:
                return
            self.clock.advance(0.005)

    def completed(self, conn: TPQuicConnection) -> bool:
        while (event := conn.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                return True
        return False


class InitialFloodTests(ListenerTestCase):
    def test_undecryptableInitialKeepsNoState(self) -> None:
        """
        A 1200-byte Initial that does not decrypt makes no session, no
        timer and no half-open place, and gets no answer.
        """
        listener, wire = self.listener()
        for port in range(1000, 1100):
            listener.datagramReceived(garbageInitial(), ("127.0.0.1", port))
        self.assertEqual(listener.sessions, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(listener.halfOpen.count, 0)
        self.assertEqual(wire.sent, [])
        self.assertEqual(listener.dropped, {"undecryptable": 100})

    def test_handshakeStillCompletes(self) -> None:
        """
        A real client gets through, and is half-open no more afterwards:
        no place taken and no deadline left.
        """
        listener, wire = self.listener()
        conn = self.client()
        self.pump(listener, wire, {("127.0.0.1", 5000): conn})
        self.assertTrue(self.completed(conn))
        self.assertEqual(listener.halfOpen.count, 0)
        [session] = set(listener.sessions.values())
        self.assertEqual(session.identity, "alice")
        self.assertIsNone(session.deadline)

    def test_perSourceAndGlobalCaps(self) -> None:
        """
        Never-finished handshakes (real client Initials, never answered)
        meet the per-prefix cap, then the global one; the places come back
        when their deadline closes them, with one audit event each.
        """
        listener, wire = self.listener(quicHandshakes=5, quicHandshakesPerSource=3, quicRetryAbove=1000)
        for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            for port in range(2000, 2004):
                for data, _ in self.client().datagrams_to_send(now=self.clock.seconds()):
                    listener.datagramReceived(data, (host, port))
        self.assertEqual(listener.halfOpen.count, 5)
        self.assertEqual(listener.halfOpen.bySource, {"127.0.0.1": 3, "127.0.0.2": 2})
        self.assertEqual(listener.dropped["cap"], 7)
        self.assertEqual(len(set(listener.sessions.values())), 5)
        self.clock.advance(10)
        self.assertEqual(listener.sessions, {})
        self.assertEqual(listener.halfOpen.count, 0)
        failed = [e for e in audits(self.observer) if e["result"] == "handshake_failed"]
        self.assertEqual(len(failed), 5)
        self.assertEqual({e["detail"] for e in failed}, {"no QUIC handshake within 10 s"})
        # Places are back: a real client now gets through.
        conn = self.client()
        self.pump(listener, wire, {("127.0.0.1", 6000): conn})
        self.assertTrue(self.completed(conn))

    def test_deadlineNotIdleTimeout(self) -> None:
        """
        A handshake left half-done is closed at the handshake timeout (10 s
        here), long before the 60 s idle timeout.
        """
        listener, wire = self.listener()
        for data, _ in self.client().datagrams_to_send(now=self.clock.seconds()):
            listener.datagramReceived(data, ("127.0.0.1", 7000))
        self.assertEqual(listener.halfOpen.count, 1)
        self.clock.advance(9.9)
        self.assertEqual(listener.halfOpen.count, 1)
        self.clock.advance(0.1)
        self.assertEqual((listener.halfOpen.count, listener.sessions), (0, {}))

    def test_forgetTouchesOnlyItsOwnIds(self) -> None:
        """
        Ending a session removes exactly its connection IDs without
        walking the table of all sessions.
        """
        listener, wire = self.listener()
        clients = {("127.0.0.1", 8000 + i): self.client() for i in range(3)}
        self.pump(listener, wire, clients)
        sessions = set(listener.sessions.values())
        self.assertEqual(len(sessions), 3)

        class NoWalk(dict):  # type: ignore[type-arg]
            def items(self) -> Any:
                raise AssertionError("forget walked every session")

            def values(self) -> Any:
                raise AssertionError("forget walked every session")

        listener.sessions = NoWalk(listener.sessions)
        first = next(iter(sessions))
        owned = set(first.cids)
        self.assertTrue(owned)
        listener.forget(first)
        self.assertFalse(owned & set(listener.sessions.keys()))
        self.assertEqual({id(s) for s in dict.values(listener.sessions)}, {id(s) for s in sessions - {first}})


class RetryTests(ListenerTestCase):
    def firstAndRetry(self, listener: QuicListener, wire: Wire, addr: Any) -> tuple[TPQuicConnection, bytes]:
        """
        A client's first Initial, answered with a Retry; return the client
        (which took the Retry) and its next Initial, which carries the token.
        """
        conn = self.client()
        for data, _ in conn.datagrams_to_send(now=self.clock.seconds()):
            listener.datagramReceived(data, addr)
        before = dict(listener.sessions)
        [(retry, to)] = wire.sent
        wire.sent.clear()
        self.assertEqual(to, addr)
        self.assertEqual(pull_quic_header(Buffer(data=retry), host_cid_length=8).packet_type, QuicPacketType.RETRY)
        self.assertEqual(listener.sessions, before)
        conn.receive_datagram(retry, SERVER, now=self.clock.seconds())
        [second] = [d for d, _ in conn.datagrams_to_send(now=self.clock.seconds())]
        self.assertTrue(pull_quic_header(Buffer(data=second), host_cid_length=8).token)
        return conn, second

    def test_retryThenHandshake(self) -> None:
        """
        With C{quic_retry_above = 0} every new client gets a Retry first, and
        an aioquic client that follows it completes the handshake.
        """
        listener, wire = self.listener(quicRetryAbove=0)
        addr = ("127.0.0.1", 9000)
        conn, second = self.firstAndRetry(listener, wire, addr)
        listener.datagramReceived(second, addr)
        self.pump(listener, wire, {addr: conn})
        self.assertTrue(self.completed(conn))
        self.assertEqual(listener.dropped, {"retry": 1})

    def test_retryOnlyAboveThreshold(self) -> None:
        """
        Below the threshold no Retry is sent; above it, new clients get one.
        """
        listener, wire = self.listener(quicRetryAbove=2)
        for port in (9100, 9101):
            for data, _ in self.client().datagrams_to_send(now=self.clock.seconds()):
                listener.datagramReceived(data, ("127.0.0.1", port))
        self.assertNotIn("retry", listener.dropped)
        self.assertEqual(listener.halfOpen.count, 2)
        wire.sent.clear()
        self.firstAndRetry(listener, wire, ("127.0.0.1", 9102))
        self.assertEqual(listener.dropped["retry"], 1)

    def test_tokenFromAnotherAddress(self) -> None:
        """
        A token is good for the address it was sent to only: the same
        Initial from another address or port makes no state and no answer.
        """
        listener, wire = self.listener(quicRetryAbove=0)
        addr = ("127.0.0.1", 9200)
        conn, second = self.firstAndRetry(listener, wire, addr)
        for other in (("127.0.0.1", 9201), ("127.0.0.2", 9200)):
            listener.datagramReceived(second, other)
        self.assertEqual((listener.sessions, wire.sent, listener.dropped.get("bad_token")), ({}, [], 2))
        listener.datagramReceived(second, addr)
        self.pump(listener, wire, {addr: conn})
        self.assertTrue(self.completed(conn))

    def test_expiredOrForgedToken(self) -> None:
        """
        A token used after its lifetime, or altered, makes no state.
        """
        listener, wire = self.listener(quicRetryAbove=0)
        addr = ("127.0.0.1", 9300)
        _, second = self.firstAndRetry(listener, wire, addr)
        token = pull_quic_header(Buffer(data=second), host_cid_length=8).token
        forged = second.replace(token, token[:-1] + bytes([token[-1] ^ 1]))
        listener.datagramReceived(forged, addr)
        self.clock.advance(RETRY_TOKEN_LIFETIME + 0.5)
        listener.datagramReceived(second, addr)
        self.assertEqual((listener.sessions, wire.sent, listener.dropped.get("bad_token")), ({}, [], 2))


class FakeSocket:
    transport = None

    def __init__(self) -> None:
        self.stopped = False

    def sendDatagram(self, data: bytes, addr: Any) -> None:
        pass

    def stop(self) -> None:
        self.stopped = True


class StatelessResetTests(ListenerTestCase):
    def established(self, secret: bytes) -> tuple[TPQuicConnection, Any]:
        listener, wire = self.listener(secret=secret)
        conn = self.client()
        addr = ("127.0.0.1", 9400)
        self.pump(listener, wire, {addr: conn})
        self.assertTrue(self.completed(conn))
        return conn, addr

    def resetFrom(self, secret: bytes, conn: TPQuicConnection, addr: Any) -> list[bytes]:
        """
        What a new listener with C{secret} answers to the client's next
        packet (a PING).
        """
        listener, wire = self.listener(secret=secret)
        conn.send_ping(1)
        self.clock.advance(0.1)
        packets = [d for d, _ in conn.datagrams_to_send(now=self.clock.seconds())]
        self.assertTrue(packets)
        for data in packets:
            self.assertFalse(data[0] & 0x80)
            listener.datagramReceived(data, addr)
        self.assertEqual(listener.sessions, {})
        sent = [d for d, _ in wire.sent]
        for reset, trigger in zip(sent, packets):
            self.assertTrue(21 <= len(reset) < len(trigger))
        return sent

    def test_restartedListenerResets(self) -> None:
        """
        After a restart with the same secret, TP answers the client's next
        packet with a stateless reset, and the client session ends at once
        (no idle timeout) with a reason that says so.
        """
        secret = os.urandom(32)
        conn, addr = self.established(secret)
        [reset] = self.resetFrom(secret, conn, addr)
        self.assertTrue(conn.isStatelessReset(reset))
        session = ClientSession(self.clock, conn, FakeSocket(), SERVER)  # type: ignore[arg-type]
        session.ready.callback(session)
        session.datagramReceived(reset, SERVER)
        self.assertTrue(session.done.called)
        self.assertTrue(session.closed)
        self.assertTrue(session.socket.stopped)  # type: ignore[attr-defined]

    def test_otherSecretNoReset(self) -> None:
        """
        A listener with another secret sends a packet the client does not
        take for a reset of its connection.
        """
        conn, addr = self.established(os.urandom(32))
        [reset] = self.resetFrom(os.urandom(32), conn, addr)
        self.assertFalse(conn.isStatelessReset(reset))

    def test_tokensDerivedFromSecret(self) -> None:
        """
        Every connection ID the server issues carries the token derived
        from the listener's secret, the first (in the transport
        parameters) and those of NEW_CONNECTION_ID frames alike.
        """
        secret = os.urandom(32)
        conn, _ = self.established(secret)
        peers = [conn._peer_cid] + conn._peer_cid_available
        self.assertGreater(len(peers), 1)
        for cid in peers:
            self.assertEqual(cid.stateless_reset_token, resetToken(secret, cid.cid))

    def test_noResetForTinyPackets(self) -> None:
        """
        A short packet (21 bytes or fewer) gets no reset: a reset is always
        smaller than its trigger and cannot be made that small.
        """
        listener, wire = self.listener()
        listener.datagramReceived(bytes([0x40]) + os.urandom(20), ("127.0.0.1", 9500))
        self.assertEqual(wire.sent, [])

    def test_resetsRateLimited(self) -> None:
        """
        A flood of short packets for unknown connections gets at most the
        burst of resets at once; the rest are dropped and counted.
        """
        listener, wire = self.listener()
        for i in range(300):
            listener.datagramReceived(bytes([0x40]) + os.urandom(60), ("127.0.0.1", 10000 + i))
        self.assertEqual(len(wire.sent), 200)
        self.assertEqual(listener.dropped["reset_limited"], 100)


class ResetSecretTests(SynchronousTestCase):
    def test_keptInStateDirectory(self) -> None:
        """
        The secret is made once, 0600 in a 0700 directory, and read back
        the same after a restart.
        """
        state = os.path.join(self.mktemp(), "state")
        first = loadResetSecret(state)
        self.assertEqual(len(first), 32)
        self.assertEqual(os.stat(state).st_mode & 0o777, 0o700)
        self.assertEqual(os.stat(os.path.join(state, "quic-reset.key")).st_mode & 0o777, 0o600)
        self.assertEqual(loadResetSecret(state), first)

    def test_noStateDirectory(self) -> None:
        """
        Without a state directory each call makes a new secret.
        """
        self.assertNotEqual(loadResetSecret(None), loadResetSecret(None))


SERVER_TOML_EXTRA = """
[[exposures]]
identities = ["alice"]
names = "*.localhost"
dialers = ["alice", "bob"]

[reverse]
public_interface = "127.0.0.1"

[e2e]
ca_certificate = "ca.pem"
ca_key = "ca.key"
"""


class RestartTests(TestCase):
    """
    A real C{twist tp} restarted under a C{tp expose --transport quic}: the
    exposer is told at once (CONNECTION_CLOSE on a clean stop, a stateless
    reset from the new process after a crash) and registers again, long
    before the 45-60 s it took to notice before.  The time is measured in
    benchmarks/quic_flood.py; here the bound is only well under that.
    """

    timeout = 120

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        self.port = freePort()
        self.path = self.pki.directory / "server.toml"
        self.path.write_text(loopbackServerTOML(self.port, "127.0.0.0/8, *.localhost", SERVER_TOML_EXTRA))
        writeClientConfig(self.pki, self.port, cert=str(self.pki.directory / "alice.pem"), key=str(self.pki.directory / "alice.key"), name="alice.toml")

    @defer.inlineCallbacks
    def startServer(self) -> Any:
        server = Background(self, twistCommand() + ["tp", "--config", str(self.path)])
        yield waitForPort(self.port)
        return server

    @defer.inlineCallbacks
    def restartedExposer(self, signal: str, keepalive: list[str] = ["--keepalive", "1"], within: float = 20) -> Any:
        echoPort, _ = listenLocal(self, Echo)
        server = yield self.startServer()
        exposer = Background(
            self,
            tpCommand()
            + ["--config", str(self.pki.directory / "alice.toml"), "--transport", "quic", "expose", *keepalive, f"127.0.0.1:{echoPort}", "--e2e", "echo.alice.localhost"],
        )
        line = yield exposer.waitForStderr(b"; Ctrl-C stops")
        self.assertIn(b"(v1, quic)", line)
        server.transport.signalProcess(signal)
        yield server.proto.done
        yield self.startServer()
        line = yield exposer.waitForStderr(b"echo.alice.localhost again via", timeout=within)
        self.assertIn(b"quic", line)
        self.assertTrue((self.pki.directory / "state" / "quic-reset.key").exists())
        return exposer

    @defer.inlineCallbacks
    def test_cleanRestart(self) -> Any:
        """
        C{twist tp} stopped with SIGTERM tells its exposer to go away (and
        says goodbye to QUIC connections), so the exposer reconnects as
        soon as the new process listens.
        """
        exposer = yield self.restartedExposer("TERM")
        self.assertIn(b"TP is going away: TP is stopping", exposer.stderr)

    @defer.inlineCallbacks
    def test_crashRestart(self) -> Any:
        """
        After SIGKILL nothing says goodbye: the exposer's next packet gets a
        stateless reset from the new process, derived from the secret in
        the state directory.
        """
        exposer = yield self.restartedExposer("KILL")
        self.assertIn(b"stateless reset", exposer.stderr)

    @defer.inlineCallbacks
    def test_crashRestartDefaultKeepalive(self) -> Any:
        """
        With the default keepalives (15 s for the signalling), an exposer
        still notices a crashed TP within seconds: over QUIC it pings every
        3 s, and the first ping after the restart gets the reset.  (With
        the 15 s PING of other clients it took up to 15 s.)
        """
        exposer = yield self.restartedExposer("KILL", keepalive=[], within=10)
        self.assertIn(b"stateless reset", exposer.stderr)


class RetryUnderFloodTests(ListenerTestCase):
    def test_manyInitialsMeanRetry(self) -> None:
        """
        More than RETRY_RATE new-connection Initials in a second make TP
        answer new clients with a Retry (cheap) instead of building a
        connection for each (the garbage is not even decrypted), even with
        no connection half-open; a quiet second later, it stops.
        """
        from tpproxy.transports.quic import RETRY_RATE

        listener, wire = self.listener()
        for port in range(RETRY_RATE):
            listener.datagramReceived(garbageInitial(), ("127.0.0.2", port))
        self.assertEqual(listener.dropped, {"undecryptable": RETRY_RATE})
        listener.datagramReceived(garbageInitial(), ("127.0.0.2", 60000))
        self.assertEqual(listener.dropped, {"undecryptable": RETRY_RATE, "retry": 1})
        self.assertEqual(listener.halfOpen.count, 0)
        self.assertEqual(listener.sessions, {})
        # A real client then gets a Retry, follows it, and connects.
        conn = self.client()
        self.pump(listener, wire, {("127.0.0.1", 7777): conn})
        self.assertTrue(self.completed(conn))
        self.assertEqual(listener.dropped["retry"], 2)
        self.clock.advance(2.5)
        wire.sent.clear()
        conn = self.client()
        self.pump(listener, wire, {("127.0.0.1", 7778): conn})
        self.assertTrue(self.completed(conn))
        self.assertEqual(listener.dropped["retry"], 2)
