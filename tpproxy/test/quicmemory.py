"""
QUIC in memory: TP's real QUIC classes (L{QuicListener}, L{ServerSession},
L{ClientSession}, L{ClientSocket}, L{QuicStreamTransport}) on a fake
network and a fake clock, in the style of aioquic's own tests (two
connections and a C{transfer()} loop), so the logic of TP's QUIC transport
is tested in milliseconds and without sleeps.

L{MemoryNetwork} is the network: its C{reactor} (a L{MemoryReactorClock}
that also provides L{IReactorUDP}) gives every C{listenUDP} a
L{MemoryUDPPort}, and L{MemoryNetwork.run} moves datagrams between the
ports and advances the clock to the next timer until a condition holds or
nothing is left to do.  Datagrams arrive in the order sent, at once, unless
a test's C{filter} drops them (a path that loses them silently: a black
hole) or C{routeMTU} refuses them at the sender (the kernel's C{EMSGSIZE}
for a datagram larger than the route's MTU, with "don't fragment" set); a
datagram larger than the receiving port's C{maxPacketSize} arrives cut to
it, as C{recvfrom} cuts it.
"""

from __future__ import annotations

import errno
import time
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort, IReactorUDP, IUDPTransport
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy import logbridge
from tpproxy.config import LimitsConfig
from tpproxy.pki import loadCertificates, loadKey
from tpproxy.testing import TestPKI
from tpproxy.transports.h3 import H3Response
from tpproxy.transports.quic import (
    RECEIVE_SIZE,
    ClientSession,
    ClientVerifier,
    QuicListener,
    clientConfiguration,
    connectQuic,
    serverConfiguration,
)
from tpproxy.verify import ClientCertChecker

#: The address of TP's listener on the memory network.
SERVER = ("127.0.0.1", 443)

Address = tuple[str, int]


class _Handle:
    """
    The socket under a L{MemoryUDPPort}: takes socket options and ignores
    them.
    """

    def setsockopt(self, *args: Any) -> None:
        pass


@implementer(IUDPTransport, IListeningPort)
class MemoryUDPPort:
    """
    One bound UDP port of a L{MemoryNetwork}.
    """

    def __init__(self, network: MemoryNetwork, protocol: DatagramProtocol, address: Address, maxPacketSize: int) -> None:
        self.network = network
        self.protocol = protocol
        self.address = address
        self.maxPacketSize = maxPacketSize
        self.connectedTo: Address | None = None
        self.listening = False
        self.broadcast = False

    def startListening(self) -> None:
        self.listening = True
        self.network.ports[self.address] = self
        self.protocol.makeConnection(self)  # type: ignore[arg-type]

    def stopListening(self) -> defer.Deferred[None]:
        if self.listening:
            self.listening = False
            del self.network.ports[self.address]
            # As Twisted's udp.Port: the protocol loses its transport, then
            # its stopProtocol runs.
            self.protocol.doStop()
        return defer.succeed(None)

    def write(self, datagram: bytes, addr: Address | None = None) -> None:
        if addr is None:
            if self.connectedTo is None:
                raise ValueError("write() without an address on an unconnected port")
            addr = self.connectedTo
        mtu = self.network.routeMTU
        if mtu is not None and len(datagram) > mtu:
            self.network.refused += 1
            raise OSError(errno.EMSGSIZE, "Message too long")
        if self.network.watch is not None:
            self.network.watch(self.address, (addr[0], int(addr[1])), bytes(datagram))
        self.network.inFlight.append((self.address, (addr[0], int(addr[1])), bytes(datagram)))

    def connect(self, host: str, port: int) -> None:
        self.connectedTo = (host, port)

    def getHost(self) -> IPv4Address | IPv6Address:
        host, port = self.address
        return IPv6Address("UDP", host, port) if ":" in host else IPv4Address("UDP", host, port)

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self.broadcast = enabled

    def getBroadcastAllowed(self) -> bool:
        return self.broadcast

    def getHandle(self) -> _Handle:
        return _Handle()


@implementer(IReactorUDP)
class MemoryUDPReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} whose C{listenUDP} binds L{MemoryUDPPort}s on a
    L{MemoryNetwork}.
    """

    def __init__(self, network: MemoryNetwork) -> None:
        super().__init__()
        self.network = network

    def listenUDP(self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192) -> MemoryUDPPort:  # type: ignore[override]
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(interface, interface)
        if port == 0:
            port = self.network.nextPort
            self.network.nextPort += 1
        if (host, port) in self.network.ports:
            from twisted.internet.error import CannotListenError

            raise CannotListenError(host, port, OSError("address in use"))
        udp = MemoryUDPPort(self.network, protocol, (host, port), maxPacketSize)
        udp.startListening()
        return udp


class MemoryNetwork:
    """
    UDP ports, the datagrams in flight between them, and one clock (at the
    real time of day when made, so certificates are valid on it).

    @ivar filter: when set, C{filter(source, destination, datagram)} says
        whether a datagram is delivered (C{False}: lost).
    @ivar routeMTU: when set, the largest datagram (UDP payload) a port
        sends: a larger one makes its C{write} raise C{OSError(EMSGSIZE)},
        counted in C{refused}.
    @ivar watch: when set, C{watch(source, destination, datagram)} sees
        every datagram a port sends, as it is sent (before C{filter}).
    """

    def __init__(self) -> None:
        self.reactor = MemoryUDPReactor(self)
        self.reactor.advance(time.time())
        self.ports: dict[Address, MemoryUDPPort] = {}
        self.inFlight: list[tuple[Address, Address, bytes]] = []
        self.nextPort = 50000
        self.filter: Callable[[Address, Address, bytes], bool] | None = None
        self.routeMTU: int | None = None
        self.watch: Callable[[Address, Address, bytes], None] | None = None
        self.delivered = 0
        self.lost = 0
        self.refused = 0

    def deliver(self) -> int:
        """
        Deliver every datagram now in flight (those they cause are sent on
        the next call); return how many moved.  A datagram to an unbound
        port from a connected one makes an ICMP "port unreachable", which
        the sender's protocol gets as C{connectionRefused}.
        """
        batch, self.inFlight = self.inFlight, []
        for source, destination, data in batch:
            if self.filter is not None and not self.filter(source, destination, data):
                self.lost += 1
                continue
            port = self.ports.get(destination)
            if port is None:
                sender = self.ports.get(source)
                if sender is not None and sender.connectedTo == destination:
                    sender.protocol.connectionRefused()
                continue
            if port.connectedTo is not None and port.connectedTo != source:
                continue
            self.delivered += 1
            port.protocol.datagramReceived(data[: port.maxPacketSize], source)
        return len(batch)

    def run(self, until: Callable[[], object] | None = None, timeout: float = 30.0, quiet: float = 1.0) -> None:
        """
        Deliver datagrams and fire timers, advancing the clock to the next
        timer whenever nothing is in flight.

        @param until: stop as soon as C{until()} is true; L{AssertionError}
            if it is still false after C{timeout} seconds of fake time, or
            when nothing is left to happen.  Without it, stop when the
            network is quiet: nothing in flight and no timer due within
            C{quiet} seconds (idle timeouts, keepalives and handshake
            deadlines are left alone).
        """
        clock = self.reactor
        deadline = clock.seconds() + timeout
        while True:
            clock.advance(0)
            if self.inFlight:
                self.deliver()
                continue
            if until is not None and until():
                return
            due = [c.getTime() for c in clock.getDelayedCalls() if c.active()]
            if not due:
                if until is None:
                    return
                raise AssertionError("nothing left to happen, and the condition is still false")
            step = max(0.0, min(due) - clock.seconds())
            if until is None and step > quiet:
                return
            if clock.seconds() + step > deadline:
                if until is None:
                    return
                raise AssertionError(f"the condition is still false after {timeout:g} s of fake time")
            clock.advance(step)

    def advance(self, seconds: float) -> None:
        """
        Let C{seconds} of fake time pass with nothing delivered meanwhile
        (a network that is down), then deliver what is due.
        """
        self.reactor.advance(seconds)


# --- TP's listener and client on the network ----------------------------------


class QuicWorld:
    """
    A test PKI (CA, server certificate, clients C{alice} and C{bob}), a
    L{MemoryNetwork}, and helpers to start TP's QUIC listener and TP's QUIC
    client on it.
    """

    def __init__(self, directory: str) -> None:
        # aioquic's warnings (a refused peer's close) go to twisted.logger,
        # as in TP itself, not to the test's standard error.
        logbridge.install()
        self.pki = TestPKI.create(directory)
        for name in ("alice", "bob"):
            self.pki.client(name)
        self.network = MemoryNetwork()
        self.reactor = self.network.reactor

    def verifier(self, **checks: Any) -> ClientVerifier:
        """
        The verifier of TP's listener for this PKI; C{checks} go to
        L{ClientCertChecker} (C{deniedIdentities}, C{crls}, ...).
        """
        return ClientVerifier([self.pki.ca.cert], ClientCertChecker(**checks), self.reactor)

    def listen(
        self,
        factory: Any = None,
        h3: H3Response | None = None,
        address: Address = SERVER,
        handshakeTimeout: float = 10.0,
        resetSecret: bytes | None = None,
        verifier: ClientVerifier | None = None,
        **limits: Any,
    ) -> QuicListener:
        """
        Start TP's QUIC listener at C{address}, streams served by C{factory}
        (a L{RecordingFactory} by default, as C{self.factory}).
        """
        d = self.pki.directory
        chain, key = loadCertificates(str(d / "server.pem")), loadKey(str(d / "server.key"))
        self.factory = factory if factory is not None else RecordingFactory()
        listener = QuicListener(
            self.reactor,
            serverConfiguration(chain, key),
            verifier if verifier is not None else self.verifier(),
            self.factory,
            h3=h3,
            limits=LimitsConfig(**limits),
            handshakeTimeout=handshakeTimeout,
            resetSecret=resetSecret,
        )
        # The read size of TP's service (tpproxy.service).
        self.reactor.listenUDP(address[1], listener, interface=address[0], maxPacketSize=RECEIVE_SIZE)
        return listener

    def clientConfiguration(self, name: str | None = "alice", pki: TestPKI | None = None) -> Any:
        """
        TP's client configuration with C{name}'s certificate (of C{pki}, by
        default this world's), trusting this world's CA; with C{name=None},
        no client certificate.
        """
        cas = [self.pki.ca.cert]
        if name is None:
            from aioquic.quic.configuration import QuicConfiguration
            from cryptography.hazmat.primitives import serialization

            config = QuicConfiguration(is_client=True, alpn_protocols=["tp/1"], server_name="localhost")
            config.cadata = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cas)
            return config
        d = (pki or self.pki).directory
        return clientConfiguration("localhost", cas, loadCertificates(str(d / f"{name}.pem")), loadKey(str(d / f"{name}.key")))

    def connect(self, name: str | None = "alice", configuration: Any = None, address: Address = SERVER) -> ClientSession:
        """
        Start TP's QUIC client (L{connectQuic}) towards C{address}; run the
        network to see it through.
        """
        return connectQuic(self.reactor, address, configuration if configuration is not None else self.clientConfiguration(name))

    def connected(self, name: str = "alice", **kw: Any) -> ClientSession:
        """
        A client whose handshake completed.
        """
        session = self.connect(name, **kw)
        self.network.run(until=lambda: session.ready.called)
        result = []
        session.ready.addBoth(result.append)
        if isinstance(result[0], Failure):
            result[0].raiseException()
        # The first one went to the callback chain: give it back.
        session.ready = defer.succeed(session)
        return session


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """
    A stream's protocol that records what happens to it; with C{echo}, it
    writes back what it reads and half-closes when the peer does.
    """

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received: list[bytes] = []
        self.readClosed = False
        self.lostReason: Failure | None = None
        self.handshakes = 0

    @property
    def data(self) -> bytes:
        return b"".join(self.received)

    @property
    def lost(self) -> bool:
        return self.lostReason is not None

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if self.echo:
            self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.readClosed = True
        if self.echo:
            self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lostReason = reason


class RecordingFactory(Factory):
    """
    Builds a L{Recorder} per stream and keeps them, in order, in C{built}.
    """

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: Any) -> Recorder:
        protocol = Recorder(self.echo)
        protocol.factory = self
        self.built.append(protocol)
        return protocol
