# -*- test-case-name: tpproxy.test.test_udp -*-
"""
UDP flows through TP.

A flow is opened like a TCP tunnel, with a C{udp} ClientHello on its own
stream.  Its packets then travel:

- over QUIC, in DATAGRAM frames (RFC 9221) whose payload starts with the
  flow's quarter stream ID (the stream ID divided by 4, as in RFC 9297) as
  a QUIC variable-length integer;
- over the TLS fallback, on the tunnel itself, each packet preceded by its
  length as 2 bytes, big-endian.

The stream lives as long as the flow: closing it ends the flow.  Both ends
expire a flow that has been idle for L{IDLE_TIMEOUT} seconds.

A packet that a UDP socket cannot send (too large for its address family:
the stream framing carries up to 65,535 bytes, IPv4 at most 65,507) is
dropped, as a network would, and the flow goes on: the server counts drops
in the flow's audit event, C{tp up -u} says so once per flow.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from aioquic.buffer import Buffer, BufferReadError, size_uint_var
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from tpproxy.reactors import IUDPReactor

log = Logger(namespace="tpproxy.udp")

IDLE_TIMEOUT = 60.0
#: Receive buffer of TP's UDP sockets: larger than any UDP payload (65,527
#: bytes over IPv6), so that no datagram is cut short silently.
RECEIVE_SIZE = 65536
#: Larger packets do not fit a QUIC DATAGRAM frame in a 1200-byte packet:
#: they go on the flow's stream, framed, which always works.
MAX_DATAGRAM_PAYLOAD = 1100
_LENGTH = struct.Struct("!H")



def encodeFlowDatagram(quarterId: int, payload: bytes) -> bytes:
    buf = Buffer(capacity=size_uint_var(quarterId))
    buf.push_uint_var(quarterId)
    return buf.data + payload


def decodeFlowDatagram(data: bytes) -> tuple[int, bytes] | None:
    buf = Buffer(data=data)
    try:
        quarterId = buf.pull_uint_var()
    except BufferReadError:
        return None
    return quarterId, data[buf.tell() :]


def deliverFlowDatagram(flows: dict[int, Any], data: bytes) -> None:
    """
    Hand a received flow datagram to its flow in C{flows} (by flow id);
    one for no live flow, or that does not parse, is dropped.
    """
    decoded = decodeFlowDatagram(data)
    if decoded is not None:
        flow = flows.get(decoded[0])
        if flow is not None:
            flow.fromPeer(decoded[1])


class StreamFramer:
    """
    Length-prefixed packets on a byte stream (the TLS fallback).
    """

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self.deliver = deliver
        self.buffer = bytearray()

    @staticmethod
    def frame(payload: bytes) -> bytes:
        return _LENGTH.pack(len(payload)) + payload

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            (length,) = _LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < 2 + length:
                return
            packet = bytes(self.buffer[2 : 2 + length])
            del self.buffer[: 2 + length]
            self.deliver(packet)


def sendPacket(quic: Any, quarterId: int | None, transport: Any, data: bytes) -> None:
    """
    Send one packet of a flow: as a QUIC datagram when it fits, else framed
    on the flow's stream.
    """
    if quic is not None and len(data) <= MAX_DATAGRAM_PAYLOAD:
        quic.sendFlowDatagram(quarterId, data)
    else:
        transport.write(StreamFramer.frame(data))


def writeDatagram(transport: Any, data: bytes, addr: Any = None) -> bool:
    """
    Write one datagram on a UDP port; C{False} if it was too large to send.

    L{twisted.internet.udp.Port.write} raises L{MessageLengthError} for a
    datagram over the size the socket's family allows; callers drop it.
    """
    try:
        if addr is None:
            transport.write(data)
        else:
            transport.write(data, addr)
    except MessageLengthError:
        return False
    return True


class IdleTimer:
    def __init__(self, clock: IReactorTime, timeout: float, expired: Callable[[], None]) -> None:
        self.call = clock.callLater(timeout, expired)
        self.timeout = timeout

    def touch(self) -> None:
        if self.call.active():
            self.call.reset(self.timeout)

    def cancel(self) -> None:
        if self.call.active():
            self.call.cancel()


class DestinationSocket(DatagramProtocol):
    """
    TP's UDP socket to one destination, for one flow.
    """

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self.deliver = deliver
        self.packetsIn = 0
        self.bytesIn = 0
        #: Packets too large for this socket, dropped, and the largest.
        self.dropped = 0
        self.largestDropped = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.packetsIn += 1
        self.bytesIn += len(data)
        self.deliver(data)

    def connectionRefused(self) -> None:
        # ICMP port unreachable from the destination: UDP has no answer to
        # give; the flow stays until idle.
        pass

    def send(self, data: bytes) -> bool:
        """
        Send C{data} to the destination.

        @return: C{False} if it was dropped as too large for the socket.
        """
        if self.transport is not None:
            try:
                if not writeDatagram(self.transport, data):
                    self.dropped += 1
                    self.largestDropped = max(self.largestDropped, len(data))
                    return False
            except OSError as e:
                log.debug("UDP send failed: {error}", error=e)
        return True


class ServerFlow:
    """
    The server end of a UDP flow: a connected UDP socket to the
    destination, fed from the tunnel (QUIC datagrams or stream frames).

    @param tunnel: the TP server protocol of the flow's stream.
    """

    def __init__(self, reactor: IUDPReactor, tunnel: Any, address: str, port: int) -> None:
        self.tunnel = tunnel
        self.reactor = reactor
        transport = tunnel.transport
        self.quic = getattr(transport, "session", None) if hasattr(transport, "streamId") else None
        self.quarterId = transport.streamId // 4 if self.quic is not None else None
        self.framer = StreamFramer(self.send)
        self.socket = DestinationSocket(self.received)
        interface = "::" if ":" in address else "0.0.0.0"
        self.port = reactor.listenUDP(0, self.socket, interface=interface, maxPacketSize=RECEIVE_SIZE)
        self.socket.transport.connect(address, port)
        self.idle = IdleTimer(reactor, IDLE_TIMEOUT, self.expire)
        self.packetsOut = 0
        self.bytesOut = 0
        if self.quic is not None:
            self.quic.flows[self.quarterId] = self

    def received(self, data: bytes) -> None:
        """
        A packet from the destination: to the client.
        """
        self.idle.touch()
        sendPacket(self.quic, self.quarterId, self.tunnel.transport, data)


    def fromPeer(self, data: bytes) -> None:
        self.send(data)

    def send(self, data: bytes) -> None:
        """
        A packet from the client: to the destination.
        """
        self.idle.touch()
        if not self.socket.send(data):
            self.tooLarge(len(data))
            return
        self.packetsOut += 1
        self.bytesOut += len(data)

    def tooLarge(self, size: int) -> None:
        """
        A packet of C{size} bytes from the client could not be sent to the
        destination: say so in the flow's audit event (its C{detail}), and
        once in the log.
        """
        dropped, largest = self.socket.dropped, self.socket.largestDropped
        self.tunnel.detail = (
            f"{dropped} UDP packet{'s' if dropped > 1 else ''} from the client dropped as too large "
            f"for the destination (largest {largest} bytes)"
        )
        if dropped == 1:
            log.warn(
                "UDP packet of {size} bytes from {identity} to {address} dropped: too large to send",
                size=size,
                identity=getattr(self.tunnel.identity, "name", None),
                address=self.tunnel.address,
            )

    def streamData(self, data: bytes) -> None:
        self.framer.feed(data)

    def expire(self) -> None:
        self.tunnel.detail = f"UDP flow idle for {IDLE_TIMEOUT:g} s"
        self.tunnel.transport.loseConnection()

    def close(self) -> None:
        self.idle.cancel()
        if self.quic is not None:
            self.quic.flows.pop(self.quarterId, None)
        if self.port is not None:
            self.port.stopListening()
            self.port = None


class ClientFlow:
    """
    The client end of a UDP flow (C{tp up -u}): packets from one local
    source address, through its own tunnel.
    """

    readClosed = False
    closed = False
    #: Packets from the destination too large for the local socket.
    dropped = 0

    def __init__(self, forwarder: UDPForwarder, source: Any) -> None:
        self.forwarder = forwarder
        self.source = source
        self.transport = self  # the tunnel writes stream bytes to us
        self.queue: list[bytes] = []
        self.tunnel: Any = None
        self.quic: Any = None
        self.quarterId: int | None = None
        self.framer = StreamFramer(self.fromPeer)
        self.idle = IdleTimer(forwarder.reactor, IDLE_TIMEOUT, self.expire)
        d = forwarder.connector.open(forwarder.hello)
        d.addCallbacks(self.ready, self.failed)

    def ready(self, tunnel: Any) -> None:
        if self.closed:
            tunnel.transport.loseConnection()
            return
        self.tunnel = tunnel
        stream = tunnel.transport
        if hasattr(stream, "streamId"):
            self.quic = stream.session
            self.quarterId = stream.streamId // 4
            self.quic.flows[self.quarterId] = self
        tunnel.peer = self  # stream bytes (framed packets) come to write()
        tunnel.onClose = lambda end, reason: self.close()
        if tunnel.rest:
            self.framer.feed(tunnel.rest)
        tunnel.transport.resumeProducing()
        queued, self.queue = self.queue, []
        for packet in queued:
            self.send(packet)

    def failed(self, failure: Any) -> None:
        self.forwarder.say(f"UDP flow from {self.source[0]}:{self.source[1]}: {failure.getErrorMessage()}")
        self.close()

    def send(self, data: bytes) -> None:
        """
        A packet from the local source: into the tunnel.
        """
        self.idle.touch()
        if self.tunnel is None:
            if len(self.queue) < 64:
                self.queue.append(data)
            return
        sendPacket(self.quic, self.quarterId, self.tunnel.transport, data)

    def fromPeer(self, data: bytes) -> None:
        """
        A packet from the destination: back to the local source.
        """
        self.idle.touch()
        if not writeDatagram(self.forwarder.transport, data, self.source):
            self.dropped += 1
            if self.dropped == 1:
                self.forwarder.say(
                    f"UDP flow from {self.source[0]}:{self.source[1]}: a packet of {len(data)} bytes from the "
                    "destination was dropped, too large to deliver here"
                )

    # The tunnel's splice-peer interface: stream bytes are framed packets.
    def write(self, data: bytes) -> None:
        self.framer.feed(data)

    def loseWriteConnection(self) -> None:
        self.close()

    def loseConnection(self) -> None:
        self.close()

    def unregisterProducer(self) -> None:
        pass

    def expire(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.idle.cancel()
        self.forwarder.flows.pop(self.source, None)
        if self.quic is not None:
            self.quic.flows.pop(self.quarterId, None)
        if self.tunnel is not None:
            self.tunnel.transport.loseConnection()


class UDPForwarder(DatagramProtocol):
    """
    C{tp up -u}: a local UDP port whose packets go, one flow per source
    address, to a UDP destination through TP.
    """

    def __init__(self, reactor: IReactorTime, connector: Any, hello: Any, say: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.connector = connector
        self.hello = hello
        self.say = say
        self.flows: dict[Any, ClientFlow] = {}

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            flow = self.flows[addr] = ClientFlow(self, addr)
        flow.send(data)
