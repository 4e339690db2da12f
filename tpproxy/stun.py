# -*- test-case-name: tpproxy.test.test_stun -*-
"""
STUN binding (RFC 8489) on TP's UDP port, sans-IO: a client learns the
address and port TP sees it from (its server-reflexive address, what ICE
needs to try a direct path) without a third party's STUN server (issue 16,
docs/p2p.md).

TP's QUIC port tells STUN from QUIC by the first byte (RFC 7983): STUN
messages start with 0-3, every QUIC packet with 64 or more (the fixed bit).
L{answer} turns a binding request into its success response, or says why
there is none; nothing here touches a socket.

What TP answers is bounded: only binding requests (no other method, no
indication), well-formed (header, length, attribute layout, a
FINGERPRINT if present must match), and a response is at most 52 bytes,
for requests of at least 20: the listener also rate-limits them
(L{tpproxy.transports.quic.QuicListener}), so TP is a poor reflector.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib

MAGIC_COOKIE = 0x2112A442
HEADER = struct.Struct("!HHI12s")
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
XOR_MAPPED_ADDRESS = 0x0020
SOFTWARE = 0x8022
FINGERPRINT = 0x8028
_FINGERPRINT_XOR = 0x5354554E
#: The largest request TP reads (a binding request for a reflexive address
#: carries no attribute TP needs; ICE's own checks go between peers).
MAX_REQUEST = 548


class NotStun(ValueError):
    """
    Not a STUN binding request TP answers; the message says why.
    """


def isStun(data: bytes) -> bool:
    """
    Whether a datagram on TP's UDP port is STUN's rather than QUIC's
    (RFC 7983: STUN's first byte is 0 to 3).
    """
    return bool(data) and data[0] < 4


def _fingerprint(message: bytes) -> int:
    return (zlib.crc32(message) & 0xFFFFFFFF) ^ _FINGERPRINT_XOR


def parseBindingRequest(data: bytes) -> bytes:
    """
    Check C{data} is a binding request and return its transaction id.

    @raise NotStun: why it is not answered.
    """
    if len(data) < HEADER.size:
        raise NotStun("shorter than a STUN header")
    if len(data) > MAX_REQUEST:
        raise NotStun("larger than a binding request")
    kind, length, cookie, transaction = HEADER.unpack_from(data)
    if cookie != MAGIC_COOKIE:
        raise NotStun("no STUN magic cookie")
    if length % 4 or HEADER.size + length != len(data):
        raise NotStun("the STUN length does not match the datagram")
    if kind != BINDING_REQUEST:
        raise NotStun(f"STUN message type {kind:#06x} is not a binding request")
    offset = HEADER.size
    while offset < len(data):
        if offset + 4 > len(data):
            raise NotStun("a STUN attribute is cut short")
        attribute, size = struct.unpack_from("!HH", data, offset)
        end = offset + 4 + size
        if end > len(data):
            raise NotStun("a STUN attribute is longer than the message")
        if attribute == FINGERPRINT:
            if size != 4 or end != len(data):
                raise NotStun("FINGERPRINT must be the last attribute, of 4 bytes")
            (value,) = struct.unpack_from("!I", data, offset + 4)
            if value != _fingerprint(data[:offset]):
                raise NotStun("the STUN FINGERPRINT does not match")
        offset = end + (-size % 4)
    return transaction


def xorMappedAddress(transaction: bytes, host: str, port: int) -> bytes:
    """
    The value of an XOR-MAPPED-ADDRESS attribute for C{host}:C{port}.
    """
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    xport = port ^ (MAGIC_COOKIE >> 16)
    if isinstance(address, ipaddress.IPv4Address):
        packed = (int(address) ^ MAGIC_COOKIE).to_bytes(4, "big")
        return struct.pack("!BBH", 0, 1, xport) + packed
    mask = struct.pack("!I", MAGIC_COOKIE) + transaction
    packed = bytes(a ^ b for a, b in zip(address.packed, mask))
    return struct.pack("!BBH", 0, 2, xport) + packed


def bindingSuccess(transaction: bytes, host: str, port: int) -> bytes:
    """
    A binding success response for C{transaction} saying the request came
    from C{host}:C{port}, with a FINGERPRINT.
    """
    value = xorMappedAddress(transaction, host, port)
    attributes = struct.pack("!HH", XOR_MAPPED_ADDRESS, len(value)) + value
    length = len(attributes) + 8  # and the FINGERPRINT
    message = HEADER.pack(BINDING_SUCCESS, length, MAGIC_COOKIE, transaction) + attributes
    return message + struct.pack("!HHI", FINGERPRINT, 4, _fingerprint(message))


def answer(data: bytes, host: str, port: int) -> bytes:
    """
    The response to the binding request C{data} from C{host}:C{port}.

    @raise NotStun: it is not one TP answers.
    """
    return bindingSuccess(parseBindingRequest(data), host, port)
