# -*- test-case-name: tpproxy.test.test_proxyproto -*-
"""
PROXY protocol version 2: the binary header a proxy sends to a backend
before the relayed bytes, so the backend learns the client's address.

The format (HAProxy's proxy-protocol.txt, section 2.2), all big-endian::

    12 bytes  signature  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
     1 byte   version (high nibble, 2) and command (low: 0 LOCAL, 1 PROXY)
     1 byte   address family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
              and transport protocol (low: 0 UNSPEC, 1 STREAM, 2 DGRAM)
     2 bytes  the length of what follows: the addresses, then TLVs
              INET:  source, destination (4 bytes each), ports (2 each)
              INET6: the same with 16-byte addresses
              UNIX:  source, destination paths (108 bytes each)
              then TLVs: type (1 byte), length (2 bytes), value

L{proxyV2Header} writes one; L{parseProxyV2} is a strict sans-IO reader of
one, for backends and tests: it answers "need more" until the header is
complete, refuses what is not a v2 header as soon as the first bytes show
it, and returns the bytes that follow the header untouched.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

#: The 12 bytes that open every v2 header.
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

LOCAL = 0
PROXY = 1

AF_UNSPEC = 0
AF_INET = 1
AF_INET6 = 2
AF_UNIX = 3

STREAM = 1
DGRAM = 2

_ADDRESS_SIZE = {AF_INET: 12, AF_INET6: 36, AF_UNIX: 216}

Address = IPv4Address | IPv6Address | UNIXAddress


class ProxyProtocolError(ValueError):
    """
    The bytes are not a well-formed PROXY protocol v2 header.
    """


@dataclass(frozen=True)
class ProxyInfo:
    """
    A parsed v2 header.

    @ivar command: L{PROXY} or L{LOCAL} (a connection the proxy made for
        itself, a health check: the addresses are to be ignored).
    @ivar source: the client's address (L{None} for LOCAL or UNSPEC).
    @ivar destination: the address the client connected to.
    @ivar tlvs: the type-length-value entries after the addresses.
    """

    command: int
    source: Address | None = None
    destination: Address | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()


def _ip(address: IPv4Address | IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    host = address.host.split("%", 1)[0]  # a scope ID is local to the proxy
    ip = ipaddress.ip_address(host)
    return ip


def proxyV2Header(
    source: object,
    destination: object,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """
    The v2 header for a connection from C{source} to C{destination}.

    TCP addresses of one family give a PROXY header for that family; an
    IPv4 and an IPv6 address are both written as IPv6 (the IPv4 one mapped
    into C{::ffff:0:0/96}), and two IPv4-mapped IPv6 addresses are written
    as IPv4.  UDP addresses give DGRAM.  Anything else (UNIX sockets, an
    unknown address) gives a LOCAL header, which tells the backend to use
    the connection's own addresses.

    @param source: the client's address, as the proxy's transport's
        C{getPeer()} gives it.
    @param destination: the address the client reached, as
        C{getHost()} gives it.
    @param tlvs: TLV entries to append.
    """
    tail = b"".join(struct.pack(">BH", t, len(v)) + v for t, v in tlvs)
    if (
        isinstance(source, (IPv4Address, IPv6Address))
        and isinstance(destination, (IPv4Address, IPv6Address))
        and source.type == destination.type
        and source.type in ("TCP", "UDP")
    ):
        proto = STREAM if source.type == "TCP" else DGRAM
        src, dst = _ip(source), _ip(destination)
        if src.version != dst.version:
            src, dst = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst))
        if src.version == 6:
            mapped = [a.ipv4_mapped for a in (src, dst)]  # type: ignore[union-attr]
            if mapped[0] is not None and mapped[1] is not None:
                src, dst = mapped[0], mapped[1]
        family = AF_INET if src.version == 4 else AF_INET6
        body = src.packed + dst.packed + struct.pack(">HH", source.port, destination.port) + tail
        return SIGNATURE + struct.pack(">BBH", 0x20 | PROXY, family << 4 | proto, len(body)) + body
    return SIGNATURE + struct.pack(">BBH", 0x20 | LOCAL, AF_UNSPEC << 4, len(tail)) + tail


def _parseTLVs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 3:
            raise ProxyProtocolError(f"PROXY v2: a truncated TLV header ({len(data) - pos} bytes)")
        kind, length = struct.unpack_from(">BH", data, pos)
        pos += 3
        if length > len(data) - pos:
            raise ProxyProtocolError(f"PROXY v2: TLV {kind:#04x} of {length} bytes, only {len(data) - pos} left")
        tlvs.append((kind, data[pos : pos + length]))
        pos += length
    return tuple(tlvs)


def _unixPath(raw: bytes) -> bytes:
    return raw.split(b"\x00", 1)[0]


def parseProxyV2(data: bytes) -> tuple[ProxyInfo | None, bytes]:
    """
    Read the v2 header at the start of C{data}, all the bytes received so
    far.

    @return: C{(info, rest)}: the header and the bytes after it, or
        C{(None, data)} if more bytes are needed.
    @raise ProxyProtocolError: if C{data} does not start with a well-formed
        v2 header.
    """
    head = data[: len(SIGNATURE)]
    if not SIGNATURE.startswith(head):
        raise ProxyProtocolError(f"not a PROXY v2 header: starts with {data[:12]!r}")
    if len(data) > 12:
        if data[12] >> 4 != 2:
            raise ProxyProtocolError(f"PROXY protocol version {data[12] >> 4}, expected 2")
        command = data[12] & 0x0F
        if command not in (LOCAL, PROXY):
            raise ProxyProtocolError(f"PROXY v2: unknown command {command}")
    if len(data) > 13:
        family, proto = data[13] >> 4, data[13] & 0x0F
        if family > AF_UNIX or proto > DGRAM:
            raise ProxyProtocolError(f"PROXY v2: unknown address family/protocol byte {data[13]:#04x}")
    if len(data) < 16:
        return None, data
    (length,) = struct.unpack_from(">H", data, 14)
    if len(data) < 16 + length:
        return None, data
    block, rest = data[16 : 16 + length], data[16 + length :]
    if command == LOCAL or family == AF_UNSPEC or proto == 0:
        if command == PROXY:
            # UNSPEC with PROXY: "the receiver should ignore address
            # information"; the block is not ours to read.
            return ProxyInfo(PROXY), rest
        return ProxyInfo(LOCAL), rest
    size = _ADDRESS_SIZE[family]
    if length < size:
        raise ProxyProtocolError(f"PROXY v2: {length} bytes of addresses, family {family} needs {size}")
    source: Address
    destination: Address
    kind = "TCP" if proto == STREAM else "UDP"
    if family == AF_INET:
        src, dst, sport, dport = struct.unpack_from(">4s4sHH", block)
        source = IPv4Address(kind, str(ipaddress.IPv4Address(src)), sport)  # type: ignore[arg-type]
        destination = IPv4Address(kind, str(ipaddress.IPv4Address(dst)), dport)  # type: ignore[arg-type]
    elif family == AF_INET6:
        src, dst, sport, dport = struct.unpack_from(">16s16sHH", block)
        source = IPv6Address(kind, str(ipaddress.IPv6Address(src)), sport)  # type: ignore[arg-type]
        destination = IPv6Address(kind, str(ipaddress.IPv6Address(dst)), dport)  # type: ignore[arg-type]
    else:
        source = UNIXAddress(_unixPath(block[:108]))
        destination = UNIXAddress(_unixPath(block[108:216]))
    return ProxyInfo(PROXY, source, destination, _parseTLVs(block[size:])), rest
