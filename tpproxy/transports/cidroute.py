# -*- test-case-name: tpproxy.test.test_cidroute -*-
"""
QUIC connection ids that name the TP instance that issued them, and the
messages that carry a QUIC packet from the instance that received it to
the one that owns its connection (issue 14, part B; docs/workers.md and
docs/cluster.md).

A load balancer that hashes the 5-tuple (ECMP, an nftables C{jhash}
DNAT), and the kernel between the workers sharing TP's port, give each
UDP 4-tuple to one instance.  When a client's address changes (roaming,
a NAT rebinding), its packets may land on another instance, which does
not know the connection.  Every connection id an instance issues starts
with a byte that names its I{slot}, a number from 0 to 63 it holds in the
cluster's routing store (L{tpproxy.cluster.quicroute}), so the receiving
instance forwards such a packet to the owner.

Format of a connection id TP issues (8 bytes, aioquic's default length):

    byte 0      0b01SSSSSS   S: the issuing instance's slot, 0-63
    bytes 1-7   random (56 bits from the OS CSPRNG)

The leading C{01} is QUIC-LB's "config rotation" field set to 1.  An
instance that holds no slot (not in a cluster, or before its claim is
answered) issues ids starting C{0b11} (QUIC-LB: not routable), whose
other 62 bits are random.  Ids stay unlinkable across connections but for
the slot, which an observer of a connection's path could learn anyway.

A forwarded packet travels as one UDP datagram to the owner's routing
socket (its peer port, UDP), framed by L{encodeForward}; the owner's
answers travel back the same way, framed by L{encodeReturn}, when the
client must see them come from the instance it sent to (a NAT in front).
Both are signed (L{tpproxy.cluster.quicroute.QuicRouter}).
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
#: ... and of an id no load balancer may route.
_UNROUTABLE = 0xC0
#: The number of slots.
SLOTS = 64


def tagFor(slot: int) -> int:
    if not 0 <= slot < SLOTS:
        raise ValueError(f"a slot is 0 to {SLOTS - 1}, not {slot}")
    return _TAGGED | slot


def slotOf(cid: bytes) -> int | None:
    """
    The slot a connection id TP issued names, or C{None} for an id of
    another form (a client's own Initial id, an unroutable id).
    """
    if len(cid) != CID_LENGTH or cid[0] & 0xC0 != _TAGGED:
        return None
    return cid[0] & 0x3F


class TaggedRandom:
    """
    What aioquic's connection module sees as C{os}: C{urandom(8)} (a new
    connection id) starts with the slot's byte (or, without a slot, with
    C{0b11} and six random bits); everything else is the real C{os}.
    (aioquic's 8-byte PATH_CHALLENGE data also gets the prefix: it stays
    56 random bits, which is what it must be.)

    @ivar slot: the slot new ids name; set it with L{setSlot}.
    """

    slot: int | None = None

    def setSlot(self, slot: int | None) -> None:
        if slot is not None:
            tagFor(slot)
        self.slot = slot

    def urandom(self, n: int) -> bytes:
        if n == CID_LENGTH:
            if self.slot is None:
                first = os.urandom(n)
                return bytes([_UNROUTABLE | first[0] & 0x3F]) + first[1:]
            return bytes([tagFor(self.slot)]) + os.urandom(n - 1)
        return os.urandom(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def installTaggedIds(slot: int | None = None) -> TaggedRandom:
    """
    Make every connection id aioquic issues in this process name C{slot}
    (or be unroutable while it is C{None}; L{TaggedRandom.setSlot} changes
    it later), and check that it does: aioquic draws its ids with
    C{os.urandom(connection_id_length)} in L{aioquic.quic.connection}, a
    private detail (docs/private-apis.md), so this fails closed with
    L{RuntimeError} if a new connection's ids do not carry the tag.
    """
    from aioquic.quic import connection
    from aioquic.quic.configuration import QuicConfiguration

    ids = connection.os if isinstance(connection.os, TaggedRandom) else TaggedRandom()  # type: ignore[attr-defined]
    connection.os = ids  # type: ignore[attr-defined]
    for probeSlot in (5, None):
        ids.setSlot(probeSlot)
        probe = connection.QuicConnection(configuration=QuicConfiguration(is_client=True, connection_id_length=CID_LENGTH))
        tagged = slotOf(probe.host_cid) == probeSlot if probeSlot is not None else probe.host_cid[0] & 0xC0 == _UNROUTABLE
        if not tagged:
            raise RuntimeError("aioquic no longer draws its connection ids from os.urandom: QUIC packets cannot be routed between instances")
    ids.setSlot(slot)
    return ids


#: Message kinds.
FORWARD = 1
RETURN = 2
#: Flag of a FORWARD: answer through the sender (L{encodeForward}).
ANSWER_VIA_SENDER = 1

_HEAD = struct.Struct("!BBBBBB16sH")


def _packAddress(addr: tuple[str, int]) -> tuple[int, bytes, int]:
    host, port = addr[0], addr[1]
    if ":" in host:
        return 6, socket.inet_pton(socket.AF_INET6, host), port
    return 4, socket.inet_pton(socket.AF_INET, host).ljust(16, b"\0"), port


def encodeForward(slot: int, sender: int, listener: int, addr: tuple[str, int], data: bytes, answerViaSender: bool = False) -> bytes:
    """
    A QUIC datagram received from C{addr} on listener number C{listener}
    of the instance holding slot C{sender}, as a message to the instance
    holding C{slot}, which owns its connection.  With C{answerViaSender},
    the owner sends its answers to C{addr} back through the sender
    (L{encodeReturn}), so that they leave from the address the client sent
    to (a load balancer that NATs answers only what went through it).
    """
    family, packed, port = _packAddress(addr)
    flags = ANSWER_VIA_SENDER if answerViaSender else 0
    return _HEAD.pack(FORWARD, slot, sender, listener, flags, family, packed, port) + data


def encodeReturn(slot: int, sender: int, listener: int, addr: tuple[str, int], data: bytes) -> bytes:
    """
    A QUIC datagram for the instance holding C{slot} to send to C{addr}
    from its listener number C{listener}: an answer of the owner (slot
    C{sender}) to a client whose packets that instance forwarded.
    """
    family, packed, port = _packAddress(addr)
    return _HEAD.pack(RETURN, slot, sender, listener, 0, family, packed, port) + data


def decodeMessage(message: bytes) -> tuple[int, int, int, int, int, tuple[str, int], bytes]:
    """
    The kind (L{FORWARD} or L{RETURN}), destination slot, sender's slot,
    listener number, flags, client address and QUIC datagram of a message
    from another instance.

    @raise ValueError: if it is not one.
    """
    if len(message) < _HEAD.size:
        raise ValueError("too short")
    kind, slot, sender, listener, flags, family, packed, port = _HEAD.unpack_from(message)
    if kind not in (FORWARD, RETURN):
        raise ValueError(f"message kind {kind}")
    if slot >= SLOTS or sender >= SLOTS:
        raise ValueError("slot out of range")
    if family == 4:
        if packed[4:] != bytes(12):
            raise ValueError("bad IPv4 address")
        host = socket.inet_ntop(socket.AF_INET, packed[:4])
    elif family == 6:
        host = socket.inet_ntop(socket.AF_INET6, packed)
    else:
        raise ValueError(f"address family {family}")
    return kind, slot, sender, listener, flags, (host, port), message[_HEAD.size :]
