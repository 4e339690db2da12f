# -*- test-case-name: tpproxy.test.test_relay -*-
"""
Splicing two connections: bytes both ways, flow control, half-close.

Each side of a splice is a L{RelayEnd}.  Once two ends are joined with
L{splice}, each registers the other's transport as its streaming producer,
so a slow reader on one side pauses reading on the other instead of letting
TP buffer without bound.  An EOF read on one side becomes a
C{loseWriteConnection} on the other; when both directions have ended, both
connections are closed.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer


def describeAddress(address: Any) -> str:
    """
    C{host:port} (C{[host]:port} for IPv6) of a Twisted address.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def noDelay(transport: object) -> None:
    """
    Turn off Nagle's algorithm on a TCP transport (or the TCP transport
    under a TLS one).  A relay must not add delay of its own: with Nagle on,
    a small write (a ServerHello after the TLS 1.3 session tickets, or a
    keystroke in ssh) waits up to a delayed ACK, ~40 ms, measured.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass


@implementer(IHalfCloseableProtocol)
class RelayEnd(Protocol):
    """
    One side of a splice.

    Before it is spliced, a subclass handles its own bytes in
    L{preSpliceData} (a hello, say).  After, every byte goes to the peer.

    @ivar bytesIn: bytes read from this side and passed to the peer.
    @ivar peer: the other end, once spliced.
    """

    peer: RelayEnd | None = None
    bytesIn = 0
    readClosed = False
    closed = False
    onClose: Callable[[RelayEnd, Failure], None] | None = None

    def dataReceived(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.preSpliceData(data)
            return
        self.bytesIn += len(data)
        peer.transport.write(data)  # type: ignore[union-attr]

    def preSpliceData(self, data: bytes) -> None:
        """
        Bytes arrived before the splice.  By default they are a protocol
        error: nothing should be read before the splice.
        """
        raise NotImplementedError(f"{self.__class__.__name__} got data before the splice")

    def readConnectionLost(self) -> None:
        self.readClosed = True
        peer = self.peer
        if peer is None:
            self.preSpliceEOF()
            return
        # This side will produce nothing more for the peer.  A registered
        # producer would also hold back a TLS transport's close.
        peer.transport.unregisterProducer()  # type: ignore[union-attr]
        if peer.readClosed:
            self.transport.loseConnection()  # type: ignore[union-attr]
            peer.transport.loseConnection()  # type: ignore[union-attr]
        else:
            peer.transport.loseWriteConnection()  # type: ignore[union-attr]

    def preSpliceEOF(self) -> None:
        """
        EOF arrived before the splice; L{splice} carries it over.
        """

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.transport.unregisterProducer()  # type: ignore[union-attr]
            peer.transport.loseConnection()  # type: ignore[union-attr]
        if self.onClose is not None:
            self.onClose(self, reason)


def splice(a: RelayEnd, b: RelayEnd, fromA: bytes = b"", fromB: bytes = b"") -> None:
    """
    Join two connected ends.

    @param fromA: bytes already read from C{a} (after its hello) that are
        owed to C{b}; likewise C{fromB}.  An EOF either end read before the
        splice is passed on after these bytes.
    """
    a.peer = b
    b.peer = a
    a.transport.registerProducer(b.transport, True)  # type: ignore[union-attr]
    b.transport.registerProducer(a.transport, True)  # type: ignore[union-attr]
    for src, dst, pending in ((a, b, fromA), (b, a, fromB)):
        if pending:
            src.bytesIn += len(pending)
            dst.transport.write(pending)  # type: ignore[union-attr]
    for end in (a, b):
        if end.readClosed:
            end.readClosed = False
            end.readConnectionLost()
