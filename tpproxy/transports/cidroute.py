# -*- test-case-name: tpproxy.test.test_cidroute -*-
"""
QUIC connection ids that name their worker, and the datagrams that carry a
QUIC packet from the worker that received it to the worker that owns its
connection (issue 14, part B; docs/workers.md).

The kernel gives each UDP 4-tuple to one of the workers sharing TP's port.
When a client's address changes (roaming, a NAT rebinding), its packets
may land on another worker, which does not know the connection.  Every
connection id a worker issues starts with a byte that names it, so that
worker forwards such a packet to the owner, which answers the client from
the same shared address and port.

Format of a connection id TP issues (8 bytes, aioquic's default length):

    byte 0      0b01WWWWWW   W: the worker's number, 0-63
    bytes 1-7   random (56 bits from the OS CSPRNG)

The leading C{01} is QUIC-LB's "config rotation" field set to 1 (C{11}
marks an id that no load balancer may route).  Ids stay unlinkable across
connections but for the worker number, which an observer of a connection's
path could learn anyway.

A forwarded packet travels as one UDP datagram on 127.0.0.1 to the owner's
forwarding port, framed by L{encodeForward} (which names the destination
worker) and signed with an HMAC keyed from the secret the workers share in
TP's state directory (L{tpproxy.workers.QuicForwarder}).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

#: Length of the connection ids TP issues (aioquic's default).
CID_LENGTH = 8
#: The top two bits of a tagged id's first byte.
_TAGGED = 0x40


def tagFor(worker: int) -> int:
    if not 0 <= worker < 64:
        raise ValueError(f"a worker number is 0 to 63, not {worker}")
    return _TAGGED | worker


def workerOf(cid: bytes) -> int | None:
    """
    The worker a connection id TP issued names, or C{None} for an id of
    another form (a client's own Initial id).
    """
    if len(cid) != CID_LENGTH or cid[0] & 0xC0 != _TAGGED:
        return None
    return cid[0] & 0x3F


class _TaggedRandom:
    """
    What aioquic's connection module sees as C{os}: C{urandom(8)} (a new
    connection id) starts with the worker's byte; everything else is the
    real C{os}.  (aioquic's 8-byte PATH_CHALLENGE data also gets the
    prefix: it stays 56 random bits, which is what it must be.)
    """

    def __init__(self, tag: int) -> None:
        self.tag = bytes([tag])

    def urandom(self, n: int) -> bytes:
        if n == CID_LENGTH:
            return self.tag + os.urandom(n - 1)
        return os.urandom(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def installTaggedIds(worker: int) -> None:
    """
    Make every connection id aioquic issues in this process name
    C{worker}, and check that it does: aioquic draws its ids with
    C{os.urandom(connection_id_length)} in L{aioquic.quic.connection}, a
    private detail (docs/private-apis.md), so this fails closed with
    L{RuntimeError} if a new connection's ids do not carry the tag.
    """
    from aioquic.quic import connection
    from aioquic.quic.configuration import QuicConfiguration

    connection.os = _TaggedRandom(tagFor(worker))  # type: ignore[attr-defined]
    probe = connection.QuicConnection(configuration=QuicConfiguration(is_client=True, connection_id_length=CID_LENGTH))
    if workerOf(probe.host_cid) != worker:
        raise RuntimeError("aioquic no longer draws its connection ids from os.urandom: QUIC packets cannot be routed between workers")


_ADDRESS = struct.Struct("!BBB16sH")


def encodeForward(worker: int, listener: int, addr: tuple[str, int], data: bytes) -> bytes:
    """
    A QUIC datagram received from C{addr} on listener number C{listener},
    as a message to C{worker}, which owns its connection.
    """
    host, port = addr[0], addr[1]
    if ":" in host:
        family, packed = 6, socket.inet_pton(socket.AF_INET6, host)
    else:
        family, packed = 4, socket.inet_pton(socket.AF_INET, host).ljust(16, b"\0")
    return _ADDRESS.pack(worker, listener, family, packed, port) + data


def decodeForward(message: bytes) -> tuple[int, int, tuple[str, int], bytes]:
    """
    The destination worker, listener number, client address and QUIC
    datagram of a message from another worker.

    @raise ValueError: if it is not one.
    """
    if len(message) < _ADDRESS.size:
        raise ValueError("too short")
    worker, listener, family, packed, port = _ADDRESS.unpack_from(message)
    if family == 4:
        host = socket.inet_ntop(socket.AF_INET, packed[:4])
    elif family == 6:
        host = socket.inet_ntop(socket.AF_INET6, packed)
    else:
        raise ValueError(f"address family {family}")
    return worker, listener, (host, port), message[_ADDRESS.size :]
