"""
Tests for L{tpproxy.protocols.sessions} and the dispatcher's own machine
(L{tpproxy.protocols.server.TPServerProtocol}): every machine's table, and
its transitions driven over a L{StringTransport} on a L{MemoryReactorClock}
with a real registry and real certificates.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import crypto
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.control import ControlLoop
from tpproxy.machine import IllegalTransition, Machine
from tpproxy.protocols import sessions
from tpproxy.protocols.server import ConnState, TPServerProtocol
from tpproxy.service import makeServerFactory
from tpproxy.testing import REVERSE_RULES, TestPKI, reverseTables
from tpproxy.wire import ALPN, ClientHello, FrameDecoder, ServerHello, encodeEvent, encodeFrame

MACHINES: list[type[Machine[Any]]] = [
    TPServerProtocol,
    sessions.ConnectSession,
    sessions.UdpSession,
    sessions.ListenSession,
    sessions.AcceptSession,
    sessions.E2ESession,
    sessions.E2EDialer,
    sessions.SNISession,
    ControlLoop,
]

KEEPALIVE = 15.0


class TableTests(SynchronousTestCase):
    """
    The tables themselves: illegal inputs raise, every state is used, every
    output exists.
    """

    def test_illegalInputsRaise(self) -> None:
        """
        In every state, every input of the machine that has no row raises
        L{IllegalTransition} and leaves the state as it was.
        """
        for cls in MACHINES:
            states = {state for state, _ in cls.TRANSITIONS} | {to for to, _ in cls.TRANSITIONS.values()}
            for state in states:
                for name in cls.inputs():
                    if (state, name) in cls.TRANSITIONS:
                        continue
                    machine = cls.__new__(cls)
                    machine.state = state
                    with self.assertRaises(IllegalTransition, msg=f"{cls.__name__} {state} {name}") as caught:
                        machine._input(name)
                    self.assertEqual((caught.exception.state, caught.exception.input), (state, name))
                    self.assertIs(machine.state, state)

    def test_everyStateUsed(self) -> None:
        """
        Every member of each machine's state enum appears in its table.
        """
        for cls in MACHINES:
            enum = type(next(iter(cls.TRANSITIONS))[0])
            used = {state for state, _ in cls.TRANSITIONS} | {to for to, _ in cls.TRANSITIONS.values()}
            self.assertEqual(used, set(enum), cls.__name__)

    def test_outputsExist(self) -> None:
        """
        Every output a row names is a method of its machine.
        """
        for cls in MACHINES:
            for (state, name), (to, output) in cls.TRANSITIONS.items():
                if output is not None:
                    self.assertTrue(callable(getattr(cls, output, None)), f"{cls.__name__}.{output}")

    def test_closedIsFinal(self) -> None:
        """
        No row leaves C{closed}, in any session or the dispatcher.
        """
        for cls in MACHINES:
            for (state, name), (to, output) in cls.TRANSITIONS.items():
                if getattr(state, "value", None) == "closed":
                    self.assertEqual(to, state, f"{cls.__name__} {name}")

    def test_sessionInputs(self) -> None:
        """
        Every session takes C{start}, C{refused} and C{lost}.
        """
        for cls in MACHINES:
            if issubclass(cls, sessions.Session):
                self.assertTrue({"start", "refused", "lost"} <= cls.inputs(), cls.__name__)


class CertTransport(StringTransport):
    """
    A L{StringTransport} with what the TLS layer tells the server protocol:
    a peer certificate and the negotiated ALPN.
    """

    negotiatedProtocol = ALPN

    def __init__(self, cert: Any) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "198.51.100.7", 40000), lenient=True)
        self.cert = cert
        self.aborted = False

    def getPeerCertificate(self) -> Any:
        return self.cert

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def frames(data: bytes) -> list[dict[str, Any]]:
    decoder = FrameDecoder()
    decoder.feed(data)
    out = []
    while (frame := decoder.nextFrame()) is not None:
        out.append(frame)
    return out


class SessionTestMixin:
    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())  # type: ignore[attr-defined]
        self.reactor = MemoryReactorClock()
        config = self.pki.serverConfig(REVERSE_RULES, **reverseTables(self.pki, keepalive=KEEPALIVE))
        self.factory = makeServerFactory(config, self.reactor).wrappedFactory
        self.registry = self.factory.registry
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def connect(self, identity: str = "alice") -> tuple[TPServerProtocol, CertTransport]:
        issued = self.pki.ca.issue(identity, client=True)
        transport = CertTransport(crypto.X509.from_cryptography(issued.cert))
        server = self.factory.buildProtocol(transport.getPeer())
        server.makeConnection(transport)
        server.handshakeCompleted()
        return server, transport

    def close(self, server: TPServerProtocol) -> None:
        server.connectionLost(Failure(error.ConnectionDone()))

    def audits(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "tpproxy.audit" and e.get("event") != "incoming"]


class DispatcherTests(SessionTestMixin, SynchronousTestCase):
    def test_helloStartsSession(self) -> None:
        """
        After the handshake the connection waits for a hello; a C{connect}
        hello hands it to a L{ConnectSession}, which dials.
        """
        server, transport = self.connect()
        self.assertIs(server.state, ConnState.HELLO)
        server.dataReceived(ClientHello.connect("127.0.0.1", 22).toFrame() + b"early")
        self.assertIs(server.state, ConnState.SESSION)
        self.assertIsInstance(server.session, sessions.ConnectSession)
        self.assertEqual(server.phase, "dialling")
        self.assertEqual(server.session.pending, b"early")  # type: ignore[union-attr]
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_renegotiation(self) -> None:
        """
        A second handshake notification (renegotiation is disabled) refuses
        the connection; a third changes nothing.
        """
        server, transport = self.connect()
        server.handshakeCompleted()
        self.assertEqual(server.phase, "refused")
        [answer] = frames(transport.value())
        self.assertEqual(ServerHello.fromObject(answer).message, "unexpected renegotiation")
        server.handshakeCompleted()
        self.assertEqual(len(frames(transport.value())), 1)

    def test_renegotiationInSession(self) -> None:
        """
        Renegotiation while a dial runs refuses, and the session is told:
        the dial's late success closes the outbound connection.
        """
        server, transport = self.connect()
        server.dataReceived(ClientHello.connect("127.0.0.1", 22).toFrame())
        session = server.session
        server.handshakeCompleted()
        self.assertIs(session.state, sessions.ConnectState.REFUSED)  # type: ignore[union-attr]
        outbound = sessions.Outbound()
        outboundTransport = StringTransport()
        outbound.makeConnection(outboundTransport)
        session._input("dialled", outbound, "127.0.0.1")  # type: ignore[union-attr]
        self.assertTrue(outboundTransport.disconnecting)
        self.assertEqual(len(frames(transport.value())), 1)

    def test_dataAfterRefusalDropped(self) -> None:
        """
        Bytes read while a refused connection closes are dropped.
        """
        server, transport = self.connect()
        server.dataReceived(b"\x00\x00\x00\x02[]")
        self.assertEqual(server.phase, "refused")
        server.dataReceived(ClientHello.connect("127.0.0.1", 22).toFrame())
        self.assertEqual(self.reactor.tcpClients, [])

    def test_lostIsFinal(self) -> None:
        """
        After C{connectionLost}, a further one is a bug: it raises.
        """
        server, transport = self.connect()
        self.close(server)
        self.assertEqual(server.phase, "closed")
        self.assertRaises(IllegalTransition, self.close, server)
        self.assertEqual(len(self.audits()), 1)

    def test_lingerThenAbort(self) -> None:
        """
        A refused client that does not close is aborted after the linger.
        """
        server, transport = self.connect()
        server.dataReceived(b"\x00\x00\x00\x02[]")
        self.reactor.advance(5)
        self.assertTrue(transport.aborted)


class ListenSessionTests(SessionTestMixin, SynchronousTestCase):
    """
    The signalling connection on TP's side: registration, keepalive,
    deadline, events, close.
    """

    def listen(self) -> tuple[TPServerProtocol, CertTransport]:
        server, transport = self.connect()
        server.dataReceived(ClientHello("listen", mode="public", port=0).toFrame())
        self.assertEqual(server.phase, "listening")
        [answer] = frames(transport.value())
        self.assertTrue(ServerHello.fromObject(answer).ok)
        transport.clear()
        return server, transport

    def test_registered(self) -> None:
        """
        A public exposure is registered and answered with its port; TP then
        pings every keepalive.
        """
        server, transport = self.listen()
        self.assertEqual(list(self.registry.byPort), [1024])
        self.reactor.advance(KEEPALIVE)
        self.assertEqual(frames(transport.value()), [{"event": "ping"}])

    def test_pingAnswered(self) -> None:
        """
        An exposer's ping gets a pong; the ServerHello's pipelined bytes
        count (here a ping in the hello's own read).
        """
        server, transport = self.connect()
        server.dataReceived(ClientHello("listen", mode="public", port=0).toFrame() + encodeEvent("ping"))
        self.assertEqual(frames(transport.value())[1:], [{"event": "pong"}])

    def test_silentExposer(self) -> None:
        """
        Three keepalives without a frame: TP aborts the connection, and the
        exposure goes with it; the audit event says why.
        """
        server, transport = self.listen()
        self.reactor.advance(3 * KEEPALIVE - 1)
        server.dataReceived(encodeEvent("pong"))
        self.reactor.advance(3 * KEEPALIVE - 1)
        self.assertFalse(transport.aborted)
        self.reactor.advance(1)
        self.assertTrue(transport.aborted)
        self.assertEqual(server.phase, "closing")
        self.close(server)
        self.assertEqual(self.registry.byPort, {})
        [event] = self.audits()
        self.assertEqual(event["detail"], "nothing heard from the exposer for 45 s")
        self.assertEqual(event["result"], "ok")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_malformedEvent(self) -> None:
        """
        A frame that is not an event ends the signalling connection.
        """
        server, transport = self.listen()
        server.dataReceived(encodeFrame({"no": "event"}))
        self.assertTrue(transport.aborted)
        self.close(server)
        [event] = self.audits()
        self.assertEqual(event["detail"], "bad event from the exposer: field 'event' must be a string")

    def test_takeOver(self) -> None:
        """
        The same identity registering the same port again closes the first
        signalling connection (C{closeControl}), once.
        """
        first, firstTransport = self.listen()
        second, secondTransport = self.connect()
        second.dataReceived(ClientHello("listen", mode="public", port=1024).toFrame())
        self.assertEqual(second.phase, "listening")
        self.assertTrue(firstTransport.aborted)
        self.assertEqual(first.phase, "closing")
        first.session.closeControl("again")  # type: ignore[union-attr]
        self.assertEqual(first.detail, "public port 1024 was taken over by a new session of alice")

    def test_incoming(self) -> None:
        """
        A dialer for the exposure becomes an C{incoming} event.
        """
        server, transport = self.listen()
        exposure = self.registry.byPort[1024]
        dialer = sessions.SNISession.__new__(sessions.SNISession)
        sid = self.registry.incoming(exposure, dialer, None, "192.0.2.1:5")
        [event] = frames(transport.value())
        self.assertEqual(event, {"event": "incoming", "session": sid, "identity": None, "peer": "192.0.2.1:5"})

    def test_eof(self) -> None:
        """
        The exposer closing its side ends the connection.
        """
        server, transport = self.listen()
        server.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.close(server)
        self.assertEqual(self.audits()[0]["detail"], "the client closed its side")

    def test_refusedRegistration(self) -> None:
        """
        A port the identity may not expose is refused; the session ends in
        C{refused}, then C{closed}.
        """
        server, transport = self.connect()
        server.dataReceived(ClientHello("listen", mode="public", port=80).toFrame())
        self.assertEqual(server.phase, "refused")
        session = server.session
        self.assertIs(session.state, sessions.ListenState.REFUSED)  # type: ignore[union-attr]
        self.close(server)
        self.assertIs(session.state, sessions.ListenState.CLOSED)  # type: ignore[union-attr]
        self.assertEqual(self.audits()[0]["result"], "forbidden")


class AcceptSessionTests(SessionTestMixin, SynchronousTestCase):
    def test_unknownSession(self) -> None:
        """
        An accept for an unknown session is refused with C{bad_session}.
        """
        server, transport = self.connect()
        server.dataReceived(ClientHello("accept", session="x" * 32).toFrame())
        [answer] = frames(transport.value())
        self.assertEqual(ServerHello.fromObject(answer).code, "bad_session")
        self.assertIs(server.session.state, sessions.AcceptState.REFUSED)  # type: ignore[union-attr]
