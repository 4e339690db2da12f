# -*- test-case-name: tpproxy.test.test_h3backend -*-
"""
Sharing TP's UDP port with a real HTTP/3 server (issue 14, part C;
docs/quic.md "Sharing UDP/443 with an HTTP/3 server").

With C{[router.h3] backend = "udp:HOST:PORT"}, TP's QUIC listener reads
the ClientHello out of each new connection's Initial packets
(L{tpproxy.transports.quicinitial}), keeps connections that offer ALPN
C{tp/1} and passes every other one, untouched, to the backend.  Then it
keeps routing that connection's packets, in this order:

  1. a TP connection's connection id (L{QuicListener.sessions}): TP;
  2. the client's address and port of a backend connection (a
     L{BackendFlow}): the backend;
  3. a connection id the backend chose, seen as the source id of its
     long-header packets: the backend (the client's address changed);
  4. an id in TP's own format naming a live instance of the cluster
     (L{tpproxy.cluster.quicroute}): that instance;
  5. anything else that is not an Initial: the backend.

Each backend connection gets a UDP socket of its own towards the backend
(a connected socket on an ephemeral port), so the backend's answers come
back on the socket of the client they are for; TP sends them to the
client from its own port.  The backend sees every client at TP's address
(as behind a NAT); it cannot learn the client's.

What does not survive, and why: a client whose address changes keeps
its backend connection only if the backend accepts a migration (it sees a
new socket of TP's: a new address), and only if the packet carries an id
TP saw (3) or none that looks like a live TP instance's (4: an id of the
backend's that happens to look like one, about 1 in 256 per instance of
the cluster, is sent there and lost); a flow idle for L{IDLE} seconds is
forgotten (QUIC connections idle longer are closed by their ends anyway).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from twisted.internet.interfaces import IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from tpproxy.transports.quicinitial import ClientHelloAssembler, InitialError

log = Logger(namespace="tpproxy.quic")

#: Seconds without a packet either way after which a backend flow is forgotten.
IDLE = 120.0
#: Seconds a connection attempt may take to send its whole ClientHello.
HELLO_TIMEOUT = 5.0


class BackendFlow(DatagramProtocol):
    """
    One client connection to the backend: a UDP socket of TP's, connected
    to the backend, and the client's address.
    """

    def __init__(self, router: H3Backend, client: Any) -> None:
        self.router = router
        self.client = client
        self.port: Any = None
        self.cids: set[bytes] = set()
        self.lastSeen = self.started = router.clock.seconds()
        #: The backend sent something on this flow.
        self.answered = False
        #: The client sent something after that: it receives what is sent
        #: to its address, so the address is no spoofed one.
        self.confirmed = False

    def send(self, data: bytes) -> None:
        self.lastSeen = self.router.clock.seconds()
        if self.transport is None:
            return  # the socket is gone (L{stopProtocol})
        try:
            self.transport.write(data)
        except OSError as e:
            # Refused (the backend is down) or the buffer is full: lost, as the network may lose it.
            self.router.sendErrors += 1
            log.debug("QUIC to the HTTP/3 backend failed: {error}", error=e)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.lastSeen = self.router.clock.seconds()
        self.router.fromBackend(self, data)

    def connectionRefused(self) -> None:
        self.router.sendErrors += 1

    def stopProtocol(self) -> None:
        """
        The socket closed without L{close}: Twisted's epoll reactor closes
        a connected UDP socket when an ICMP "port unreachable" comes back
        (the backend is down) instead of calling L{connectionRefused}.
        Count it as a send error and forget the flow, so that the client's
        next packet opens a new socket (and finds the backend if it is
        back) instead of writing to a closed one.
        """
        if self.port is None:
            return
        self.port = None
        self.router.sendErrors += 1
        self.router.lost(self)

    def close(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            port.stopListening()


class _Pending:
    def __init__(self, now: float) -> None:
        self.assembler = ClientHelloAssembler()
        self.datagrams: list[bytes] = []
        self.started = now


class H3Backend:
    """
    The routing of one QUIC listener's non-TP connections to an HTTP/3
    backend at C{address} (an IP address and port).

    @param isTP: says whether a ClientHello's ALPN list is TP's.
    @param toTP: hands an Initial datagram to TP's own QUIC engine.
    @param sendOut: sends a datagram to a client from TP's port.
    """

    #: At most this many confirmed backend flows; new connections beyond are dropped.
    MAX_FLOWS = 16384
    #: At most this many flows not yet confirmed (L{BackendFlow.confirmed});
    #: a new one beyond takes the oldest one's place.
    MAX_UNCONFIRMED = 1024
    #: At most this many connection attempts whose ClientHello is not whole
    #: (one more makes the oldest give up its place).
    MAX_PENDING = 1024

    def __init__(
        self,
        reactor: IReactorUDP,
        clock: IReactorTime,
        address: tuple[str, int],
        toTP: Callable[[bytes, Any], None],
        sendOut: Callable[[bytes, Any], None],
        isTP: Callable[[tuple[str, ...]], bool],
        hostCidLength: int = 8,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.address = address
        self.toTP = toTP
        self.sendOut = sendOut
        self.isTP = isTP
        self.hostCidLength = hostCidLength
        self.flows: dict[Any, BackendFlow] = {}
        #: The flows not confirmed yet, oldest first: a packet from a
        #: spoofed address (any non-Initial, or a forged Initial) opens a
        #: flow and a socket, so those are bounded apart and forgotten
        #: after L{HELLO_TIMEOUT} unless the client answers the backend.
        self.unconfirmed: OrderedDict[Any, BackendFlow] = OrderedDict()
        self.byCid: dict[bytes, BackendFlow] = {}
        self.cidLengths: set[int] = set()
        self.pending: OrderedDict[tuple[Any, bytes], _Pending] = OrderedDict()
        #: Counters (metrics): connections sent to the backend, datagrams
        #: each way, Initials dropped (garbage, over a bound), send errors.
        self.connections = 0
        self.toBackend = 0
        self.fromBackendCount = 0
        self.dropped: dict[str, int] = {}
        self.sendErrors = 0
        self._sweeper: Any = None

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    # --- packets from clients -------------------------------------------------------

    def flowOf(self, data: bytes, addr: Any, dcid: bytes, short: bool) -> BackendFlow | None:
        """
        The backend flow a client's packet belongs to, by the client's
        address, else by a connection id the backend chose (then the flow
        follows the client to its new address).
        """
        flow = self.flows.get(addr)
        if flow is not None:
            return flow
        if short:
            for length in self.cidLengths:
                flow = self.byCid.get(data[1 : 1 + length])
                if flow is not None:
                    break
        else:
            flow = self.byCid.get(dcid)
        if flow is not None:
            self._move(flow, addr)
        return flow

    def _move(self, flow: BackendFlow, addr: Any) -> None:
        if self.flows.get(flow.client) is flow:
            del self.flows[flow.client]
        if self.unconfirmed.get(flow.client) is flow:
            del self.unconfirmed[flow.client]
            self.unconfirmed[addr] = flow
        flow.client = addr
        self.flows[addr] = flow

    def fromClient(self, flow: BackendFlow, data: bytes) -> None:
        """
        A client's packet on its flow: to the backend.  The first after
        the backend answered confirms the flow.
        """
        if not flow.confirmed and flow.answered:
            flow.confirmed = True
            if self.unconfirmed.get(flow.client) is flow:
                del self.unconfirmed[flow.client]
        self.toBackend += 1
        flow.send(data)

    def forward(self, data: bytes, addr: Any) -> bool:
        """
        Send a client's packet to the backend on its flow (a new one if
        the client has none); C{False} if no flow could be made.
        """
        flow = self.flows.get(addr)
        if flow is None:
            flow = self._newFlow(addr)
            if flow is None:
                return False
        self.fromClient(flow, data)
        return True

    def _newFlow(self, addr: Any) -> BackendFlow | None:
        if len(self.flows) - len(self.unconfirmed) >= self.MAX_FLOWS:
            self._drop("flows_full")
            return None
        if len(self.unconfirmed) >= self.MAX_UNCONFIRMED:
            oldAddr, oldest = next(iter(self.unconfirmed.items()))
            self._forget(oldAddr, oldest)
            self._drop("unconfirmed_replaced")
        flow = BackendFlow(self, addr)
        family = "::" if ":" in self.address[0] else "0.0.0.0"
        try:
            flow.port = self.reactor.listenUDP(0, flow, interface=family)
            flow.transport.connect(*self.address)
        except OSError as e:
            log.warn("Cannot open a UDP socket to the HTTP/3 backend {host}:{port}: {error}", host=self.address[0], port=self.address[1], error=e)
            self._drop("socket")
            flow.close()
            return None
        self.flows[addr] = flow
        self.unconfirmed[addr] = flow
        self.connections += 1
        self._sweepLater()
        return flow

    def initial(self, data: bytes, addr: Any, dcid: bytes) -> None:
        """
        An Initial of no known connection: read its ClientHello (over as
        many datagrams as it takes), then give the connection's datagrams
        to TP or to the backend.  A datagram that is not a readable
        Initial is dropped, without disturbing the attempt it claims to
        belong to.
        """
        key = (addr, dcid)
        now = self.clock.seconds()
        pending = self.pending.get(key)
        fresh = pending is None
        if fresh:
            self._expirePending(now)
            pending = _Pending(now)
        try:
            hello = pending.assembler.feed(data)
        except InitialError as e:
            self._drop("unreadable_initial")
            log.debug("QUIC Initial from {addr} dropped: {error}", addr=addr, error=str(e))
            if pending.assembler.datagrams > pending.assembler.maxDatagrams:
                self.pending.pop(key, None)
            return
        if hello is None:
            pending.datagrams.append(data)
            if fresh:
                # A hello whole in one datagram needs no place; a new
                # attempt past the bound takes the oldest one's, so that a
                # flood of first halves delays nobody who sends both halves
                # faster than MAX_PENDING others arrive.
                if len(self.pending) >= self.MAX_PENDING:
                    del self.pending[next(iter(self.pending))]
                    self._drop("pending_full")
                self.pending[key] = pending
                self._sweepLater()
            return
        self.pending.pop(key, None)
        datagrams = pending.datagrams + [data]
        if self.isTP(hello.alpn):
            for datagram in datagrams:
                self.toTP(datagram, addr)
            return
        for datagram in datagrams:
            if not self.forward(datagram, addr):
                return

    def _expirePending(self, now: float) -> None:
        while self.pending:
            key, oldest = next(iter(self.pending.items()))
            if now - oldest.started < HELLO_TIMEOUT:
                break
            del self.pending[key]
            self._drop("hello_timeout")

    # --- packets from the backend -----------------------------------------------------

    def fromBackend(self, flow: BackendFlow, data: bytes) -> None:
        if self.flows.get(flow.client) is not flow:
            return  # forgotten
        self.fromBackendCount += 1
        flow.answered = True
        if data and data[0] & 0x80:
            self._learn(flow, data)
        self.sendOut(data, flow.client)

    def _learn(self, flow: BackendFlow, data: bytes) -> None:
        """
        Note the backend's connection id from the source id of its long
        headers, so that the client's packets to it are found when the
        client's address changes.
        """
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self.hostCidLength)
        except ValueError:
            return
        if header.packet_type == QuicPacketType.VERSION_NEGOTIATION or not header.source_cid:
            return
        cid = header.source_cid
        if cid not in flow.cids and len(flow.cids) < 8:
            flow.cids.add(cid)
            self.byCid[cid] = flow
            self.cidLengths.add(len(cid))

    # --- housekeeping ---------------------------------------------------------------

    def _sweepLater(self) -> None:
        if self._sweeper is None or not self._sweeper.active():
            self._sweeper = self.clock.callLater(HELLO_TIMEOUT if self.unconfirmed or self.pending else IDLE / 4, self.sweep)

    def sweep(self) -> None:
        """
        Forget flows idle for L{IDLE} seconds, and attempts whose hello
        did not come whole in time.
        """
        now = self.clock.seconds()
        for addr, flow in list(self.unconfirmed.items()):
            if now - flow.started < HELLO_TIMEOUT:
                break
            self._forget(addr, flow)
            self._drop("unconfirmed_timeout")
        for addr, flow in list(self.flows.items()):
            if now - flow.lastSeen >= IDLE:
                self._forget(addr, flow)
        self._expirePending(now)
        if self.flows or self.pending:
            self._sweepLater()

    def lost(self, flow: BackendFlow) -> None:
        """
        C{flow}'s socket is gone: forget the flow.
        """
        if self.flows.get(flow.client) is flow:
            self._forget(flow.client, flow)

    def _forget(self, addr: Any, flow: BackendFlow) -> None:
        del self.flows[addr]
        if self.unconfirmed.get(addr) is flow:
            del self.unconfirmed[addr]
        for cid in flow.cids:
            if self.byCid.get(cid) is flow:
                del self.byCid[cid]
        flow.close()

    def stop(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        for addr, flow in list(self.flows.items()):
            self._forget(addr, flow)
        self.pending.clear()
